//! `ferry status`: the process server's status file (`STATE_DIR/status.json`, rewritten every
//! second by `ferry serve`) joined with the store's manifests, per VM and disk. RPO is computed
//! here, at read time: now − the time of the newest point.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ferry_format::manifest::Manifest;
use ferry_job::StoreLocation;
use ferry_serve::status::{self as st, PointRef, StatusFile, VmStatus};
use serde_json::{json, Value};

use crate::units;

/// What the status file says about the server, as of `now`.
pub struct ServerView {
    pub path: PathBuf,
    pub file: Option<StatusFile>,
    /// Why the file could not be used (missing, unreadable, other version).
    pub problem: Option<String>,
    pub running: bool,
    pub age: Option<Duration>,
}

/// Reads the status file. The server counts as running only if its last file says so and was
/// written within [`st::STALE_AFTER`].
pub fn read_server(state_dir: &Path, now: SystemTime) -> ServerView {
    let path = std::path::absolute(state_dir)
        .unwrap_or_else(|_| state_dir.to_owned())
        .join(st::STATUS_FILE);
    let (file, problem) = match st::read_status(&path) {
        Ok(f) => (Some(f), None),
        Err(st::StatusError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            (
                None,
                Some(format!(
                    "no status file at {} (ferry serve has not run with this state directory; pass --state-dir)",
                    path.display()
                )),
            )
        }
        Err(e) => (None, Some(e.to_string())),
    };
    let age = file
        .as_ref()
        .and_then(|f| humantime::parse_rfc3339_weak(&f.written_at).ok())
        .map(|t| now.duration_since(t).unwrap_or_default());
    let fresh = age.is_some_and(|a| a <= st::STALE_AFTER);
    // A stale file of a process that still runs is a server that cannot write its status (a full
    // or read-only disk, a hang): running, and said so, never reported as stopped.
    let alive = file
        .as_ref()
        .is_some_and(|f| f.running && !fresh && serve_alive(f.pid));
    let running = file.as_ref().is_some_and(|f| f.running) && (fresh || alive);
    let problem = match (problem, alive) {
        (None, true) => Some(format!(
            "ferry serve (pid {}) runs but has not written {} for {}s: its state directory may be full or read-only, or it hangs; see its log",
            file.as_ref().map_or(0, |f| f.pid),
            path.display(),
            age.map_or(0, |a| a.as_secs())
        )),
        (p, _) => p,
    };
    ServerView {
        path,
        file,
        problem,
        running,
        age,
    }
}

/// Whether `pid` is a running `ferry serve`.
fn serve_alive(pid: u32) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    args.first()
        .is_some_and(|a| a.ends_with(b"ferry") || a.ends_with(b"ferry (deleted)"))
        && args.iter().any(|a| *a == b"serve")
}

/// Each VM's manifest, or why the store could not be read.
pub type Manifests = Result<BTreeMap<String, Manifest>, String>;

/// Points of each VM in the store, oldest first, or why they could not be read.
pub fn read_store(loc: &StoreLocation) -> Manifests {
    let store = ferry_job::open_recovery(loc, None).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for vm in store.vms().map_err(|e| e.to_string())? {
        if let Some(m) = store.manifest(&vm).map_err(|e| e.to_string())? {
            out.insert(vm, m);
        }
    }
    Ok(out)
}

fn rpo(p: Option<&PointRef>, now: SystemTime) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(&p?.time).ok()?;
    Some(now.duration_since(t).unwrap_or_default().as_secs())
}

fn point_json(p: Option<&PointRef>) -> Value {
    p.map_or(
        Value::Null,
        |p| json!({"id": p.id, "time": p.time, "kind": p.kind}),
    )
}

/// The stable `--json` object (documented in OPERATIONS.md).
pub fn report(
    server: &ServerView,
    store: Option<(&StoreLocation, &Manifests)>,
    now: SystemTime,
) -> Value {
    let f = server.file.as_ref();
    let manifests = store.and_then(|(_, r)| r.as_ref().ok());
    let live: BTreeMap<&str, &VmStatus> = f
        .map(|f| f.vms.iter().map(|v| (v.vm.as_str(), v)).collect())
        .unwrap_or_default();
    let mut names: Vec<&str> = live.keys().copied().collect();
    for vm in manifests.into_iter().flat_map(|m| m.keys()) {
        if !live.contains_key(vm.as_str()) {
            names.push(vm);
        }
    }
    names.sort_unstable();
    let vms: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let v = live.get(name);
            let m = manifests.and_then(|m| m.get(name));
            let newest = |disk: Option<&str>, app: bool| -> Option<PointRef> {
                m?.points
                    .iter()
                    .rev()
                    .filter(|p| !app || p.kind == "app")
                    .find(|p| disk.is_none_or(|d| p.disks.iter().any(|x| x.name == d)))
                    .map(PointRef::from)
            };
            let last = newest(None, false).or_else(|| v.and_then(|v| v.last_point.clone()));
            let state = match v {
                _ if !server.running => "stopped".to_string(),
                Some(v) => v.state.clone(),
                None => "disconnected".to_string(),
            };
            let mut disks: BTreeMap<String, Value> = BTreeMap::new();
            for d in v.map(|v| v.disks.as_slice()).unwrap_or_default() {
                let lp = newest(Some(&d.name), false).or_else(|| d.last_point.clone());
                disks.insert(
                    d.name.clone(),
                    json!({
                        "name": d.name,
                        "state": if server.running { d.state.as_str() } else { "stopped" },
                        "last_acked_seq": d.last_acked_seq,
                        "records_received": d.records_received,
                        "bytes_received": d.bytes_received,
                        "rpo_seconds": rpo(lp.as_ref(), now),
                        "last_point": point_json(lp.as_ref()),
                    }),
                );
            }
            for d in m.into_iter().flat_map(|m| m.disks.keys()) {
                if !disks.contains_key(d) {
                    let lp = newest(Some(d), false);
                    disks.insert(
                        d.clone(),
                        json!({
                            "name": d,
                            "state": state,
                            "last_acked_seq": 0,
                            "records_received": 0,
                            "bytes_received": 0,
                            "rpo_seconds": rpo(lp.as_ref(), now),
                            "last_point": point_json(lp.as_ref()),
                        }),
                    );
                }
            }
            let conditions: Vec<Value> = match v {
                Some(v) if server.running => v
                    .conditions
                    .iter()
                    .map(|c| json!({"name": c.name, "level": c.level, "message": c.message}))
                    .collect(),
                _ => Vec::new(),
            };
            json!({
                "vm": name,
                "state": state,
                "conditions": conditions,
                "protection": match v {
                    _ if !server.running => "unknown (server not running)".to_string(),
                    Some(v) => v.protection.clone(),
                    None => "disconnected".to_string(),
                },
                "rate_in_bytes_per_second": v.filter(|_| server.running).map(|v| v.rate_in_bytes_per_second.round()),
                "backlog_eta_seconds": v.filter(|_| server.running).and_then(|v| v.backlog_eta_seconds.map(f64::round)),
                "throttled": v.is_some_and(|v| v.throttled && server.running),
                "intervals": v.and_then(|v| v.intervals.clone()),
                "resync": v.and_then(|v| v.resync.clone()),
                "last_abandoned_cut": v.and_then(|v| v.last_abandoned_cut.clone()),
                "connected": server.running && v.is_some_and(|v| v.connected),
                "agent": v.and_then(|v| v.agent.clone()),
                "peer": v.and_then(|v| v.peer.clone()),
                "since": v.and_then(|v| v.since.clone()),
                "backlog_bytes": v.map_or(0, |v| v.backlog_bytes),
                "quarantine": v.and_then(|v| v.quarantine.clone()),
                "rpo_seconds": rpo(last.as_ref(), now),
                "last_point": point_json(last.as_ref()),
                "last_app_point": point_json(newest(None, true).as_ref()),
                "points": m.map(|m| m.points.len()),
                "disks": disks.into_values().collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut conditions: Vec<Value> = f
        .filter(|_| server.running)
        .map(|f| {
            f.conditions
                .iter()
                .map(|c| json!({"name": c.name, "level": c.level, "message": c.message}))
                .collect()
        })
        .unwrap_or_default();
    if let (true, Some(p)) = (server.running, &server.problem) {
        // A minute without a status is a server that does not work, whatever its process does.
        let level = if server.age.is_some_and(|a| a > Duration::from_secs(60)) {
            "critical"
        } else {
            "warning"
        };
        conditions.push(json!({"name": "server_status_stale", "level": level, "message": p}));
    }
    if !server.running {
        conditions.push(json!({
            "name": "server_not_running",
            "level": "critical",
            "message": format!(
                "ferry serve is not running ({}); agents cannot replicate: start it (systemctl start ferry-serve)",
                server.problem.clone().unwrap_or_else(|| "its last status says it stopped".into())
            ),
        }));
    }
    let critical = conditions.iter().any(|c| c["level"] == "critical")
        || vms.iter().any(|v| {
            v["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["level"] == "critical"))
        });
    let warning = conditions.iter().any(|c| c["level"] == "warning")
        || vms.iter().any(|v| {
            v["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["level"] == "warning"))
        });
    json!({
        "time": st::rfc3339(now),
        "health": if critical { "critical" } else if warning { "warning" } else { "ok" },
        "conditions": conditions,
        "server": {
            "running": server.running,
            "status_file": server.path,
            "problem": server.problem,
            "written_at": f.map(|f| f.written_at.clone()),
            "age_seconds": server.age.map(|a| (a.as_secs_f64() * 10.0).round() / 10.0),
            "pid": f.map(|f| f.pid),
            "started_at": f.map(|f| f.started_at.clone()),
            "listen": f.map(|f| f.listen.clone()),
            "cache_dir": f.map(|f| f.cache_dir.clone()),
            "cache_used_bytes": f.map(|f| f.cache_used_bytes),
            "cache_size_bytes": f.map(|f| f.cache_size_bytes),
            "retention_seconds": f.and_then(|f| f.retention_seconds),
            "host": f.filter(|_| server.running).and_then(|f| f.host.clone()),
            "drain_rate_bytes_per_second": f.filter(|_| server.running).map(|f| f.drain_rate_bytes_per_second.round()),
        },
        "store": {
            "location": store.map(|(l, _)| location(l)),
            "error": store.and_then(|(_, r)| r.as_ref().err().cloned()),
        },
        "vms": vms,
    })
}

pub fn location(l: &StoreLocation) -> String {
    match l {
        StoreLocation::Local(p) => p.display().to_string(),
        StoreLocation::Azure { url, .. } => url.clone(),
    }
}

/// `4s`, `3m12s`, `2h05m`, `3d04h`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The compact table.
pub fn print_human(r: &Value) {
    let s = &r["server"];
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    if s["running"].as_bool() == Some(true) {
        outln!(
            "ferry serve is running (pid {}, listening on {}; status written {}s ago); cache {} used of {}",
            s["pid"],
            text(&s["listen"]),
            s["age_seconds"],
            units::human(s["cache_used_bytes"].as_u64().unwrap_or(0)),
            units::human(s["cache_size_bytes"].as_u64().unwrap_or(0)),
        );
    } else if let Some(w) = s["written_at"].as_str() {
        outln!("ferry serve is not running (status last written at {w})");
    } else {
        outln!(
            "ferry serve is not running ({})",
            s["problem"].as_str().unwrap_or("no status file")
        );
    }
    match (
        r["store"]["location"].as_str(),
        r["store"]["error"].as_str(),
    ) {
        (Some(l), None) => outln!("store {l}"),
        (Some(l), Some(e)) => outln!("store {l}: cannot read its manifests: {e}"),
        _ => {}
    }
    if let Some(h) = s["host"].as_object() {
        outln!(
            "appliance: CPU {}%, memory {}%, cache {}% free; draining {}/s",
            h["cpu_percent"],
            h["memory_percent"],
            h["cache_free_percent"],
            units::human(s["drain_rate_bytes_per_second"].as_f64().unwrap_or(0.0) as u64)
        );
    }
    let show = |c: &Value, indent: &str| {
        outln!(
            "{indent}{} {}: {}",
            c["level"].as_str().unwrap_or("?").to_uppercase(),
            ferry_serve::events::printable(c["name"].as_str().unwrap_or("?")),
            ferry_serve::events::printable(c["message"].as_str().unwrap_or(""))
        );
    };
    for c in r["conditions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        show(c, "");
    }
    outln!("health: {}", r["health"].as_str().unwrap_or("?"));
    let vms = r["vms"].as_array().map(Vec::as_slice).unwrap_or_default();
    if vms.is_empty() {
        outln!("no VMs yet");
        return;
    }
    outln!();
    outln!(
        "{:<20} {:<12} {:>8} {:>10}  {:<30} DETAIL",
        "VM / DISK",
        "STATE",
        "RPO",
        "BACKLOG",
        "LAST POINT"
    );
    let rpo = |v: &Value| v["rpo_seconds"].as_u64().map_or("-".into(), age);
    let point = |v: &Value| match v["last_point"]["id"].as_str() {
        Some(id) => format!("{id} {}", text(&v["last_point"]["kind"])),
        None => "-".into(),
    };
    for v in vms {
        let detail = match (v["connected"].as_bool(), v["since"].as_str()) {
            (Some(true), Some(t)) => format!(
                "agent {} at {} since {t}",
                text(&v["agent"]),
                text(&v["peer"])
            ),
            (_, Some(t)) if v["agent"].is_string() => {
                format!("agent {} gone since {t}", text(&v["agent"]))
            }
            _ => String::new(),
        };
        let detail = match v["points"].as_u64() {
            Some(n) => format!("{n} point(s); {detail}"),
            None => detail,
        };
        let detail = match v["protection"].as_str() {
            Some(p) if !p.is_empty() => format!("{p}; {detail}"),
            _ => detail,
        };
        outln!(
            "{:<20} {:<12} {:>8} {:>10}  {:<30} {}",
            text(&v["vm"]),
            text(&v["state"]),
            rpo(v),
            units::human(v["backlog_bytes"].as_u64().unwrap_or(0)),
            point(v),
            detail.trim_end_matches("; "),
        );
        for c in v["conditions"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            show(c, "  ");
        }
        if let Some(q) = v["quarantine"].as_str() {
            outln!(
                "  QUARANTINED: {q}\n  every other VM goes on; fix the cause, then: ferry vms release {}",
                text(&v["vm"])
            );
        }
        for d in v["disks"].as_array().map(Vec::as_slice).unwrap_or_default() {
            outln!(
                "  {:<18} {:<12} {:>8} {:>10}  {:<30} {} records, {} received, acked seq {}",
                text(&d["name"]),
                text(&d["state"]),
                rpo(d),
                "",
                point(d),
                d["records_received"],
                units::human(d["bytes_received"].as_u64().unwrap_or(0)),
                d["last_acked_seq"],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, running: bool, written: SystemTime) {
        let v = json!({
            "format": st::STATUS_FORMAT, "version": st::STATUS_VERSION,
            "written_at": st::rfc3339(written), "running": running, "pid": 1,
            "started_at": st::rfc3339(written), "listen": "127.0.0.1:7443", "store": "/s",
            "cache_dir": "/c", "cache_used_bytes": 0, "cache_size_bytes": 1,
            "retention_seconds": null,
            "vms": [{"vm": "web01", "agent": "a", "connected": true, "peer": "p", "since": null,
                     "state": "idle", "backlog_bytes": 0,
                     "last_point": {"id": "0001-x", "time": st::rfc3339(written - Duration::from_secs(90)), "kind": "crash"},
                     "disks": []}],
        });
        std::fs::write(dir.join(st::STATUS_FILE), v.to_string()).unwrap();
    }

    #[test]
    fn a_stale_or_final_file_means_not_running_and_rpo_is_computed_now() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        file(dir.path(), true, now - Duration::from_secs(2));
        let s = read_server(dir.path(), now);
        assert!(s.running);
        let r = report(&s, None, now);
        assert_eq!(r["vms"][0]["state"], "idle");
        assert_eq!(r["vms"][0]["rpo_seconds"], 92);
        // Stale: the server stopped writing (killed).
        file(
            dir.path(),
            true,
            now - st::STALE_AFTER - Duration::from_secs(1),
        );
        let s = read_server(dir.path(), now);
        assert!(!s.running);
        let r = report(&s, None, now);
        assert_eq!(
            (&r["vms"][0]["state"], &r["vms"][0]["connected"]),
            (&json!("stopped"), &json!(false))
        );
        // Its last file, written as it stopped.
        file(dir.path(), false, now);
        assert!(!read_server(dir.path(), now).running);
        // No file at all.
        let s = read_server(&dir.path().join("nowhere"), now);
        assert!(!s.running && s.problem.unwrap().contains("no status file"));
        assert_eq!(
            (age(59), age(61), age(7322), age(90000)),
            ("59s".into(), "1m01s".into(), "2h02m".into(), "1d01h".into())
        );
    }
}
