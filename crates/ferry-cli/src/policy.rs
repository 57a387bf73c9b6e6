//! `ferry policy …`: the replication policy of the process server (`ferry_serve::policy`), kept in
//! its state directory; and what the next prune would remove under it (read from the store's
//! manifests, nothing changed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_job::{JobError, StoreLocation};
use ferry_serve::policy::{self, Fields, Policies, Policy};
use serde_json::{json, Value};

use crate::server::ConfigArg;

fn state(state_dir: Option<PathBuf>, config: &ConfigArg) -> Result<PathBuf, JobError> {
    crate::admin::existing_state_dir(state_dir, config)
}

fn status(dir: &Path) -> Option<ferry_serve::status::StatusFile> {
    ferry_serve::status::read_status(&dir.join(ferry_serve::status::STATUS_FILE)).ok()
}

/// The server's retention where no policy sets one: what its status file says (`--retention`),
/// else the built-in 24 h; `None`: forever.
fn retention_default(st: Option<&ferry_serve::status::StatusFile>) -> Option<Duration> {
    match st {
        Some(s) => s.retention_seconds.map(Duration::from_secs),
        None => Some(Policy::DEFAULT_RETENTION),
    }
}

fn secs(d: Duration) -> Value {
    if d == Duration::MAX {
        Value::Null
    } else {
        json!(d.as_secs())
    }
}

fn describe(p: &Policies, vm: Option<&str>, retention: Option<Duration>) -> Value {
    let e = p.effective(vm, retention.unwrap_or(Duration::MAX));
    let src = p.sources(vm);
    let app = match e.app_every {
        None => json!("agent"),
        Some(None) => json!("off"),
        Some(Some(d)) => json!(d.as_secs()),
    };
    json!({
        "rpo_threshold_seconds": e.rpo_threshold.as_secs(),
        "retention_seconds": secs(e.retention),
        "app_retention_seconds": secs(e.app_retention),
        "app_every_seconds": app,
        "crash_every_seconds": e.crash_every.map_or(json!("agent"), |d| json!(d.as_secs())),
        "thin": p.effective(vm, Duration::MAX).thin.iter().map(|t| json!({
            "within_seconds": t.within.as_secs(),
            "every_seconds": t.every.map(|e| e.as_secs()),
        })).collect::<Vec<_>>(),
        "from": src,
    })
}

/// What the next prune would remove, per VM, from the store's manifests.
fn preview(
    p: &Policies,
    retention: Option<Duration>,
    store: &Path,
    only: Option<&str>,
) -> Result<Value, JobError> {
    let now = std::time::SystemTime::now();
    let pins = ferry_store::readers::live_pins(store).unwrap_or_default();
    let mut out = serde_json::Map::new();
    let vms = ferry_store::list_vms_at(store).map_err(|e| {
        JobError::Usage(format!(
            "cannot list the VMs of the store {}: {e}",
            store.display()
        ))
    })?;
    for vm in vms.iter().filter(|v| only.is_none_or(|o| o == v.as_str())) {
        let Ok(Some(m)) = ferry_store::load_manifest_at(store, vm) else {
            continue;
        };
        let e = p.effective(Some(vm), retention.unwrap_or(Duration::MAX));
        let rules = ferry_apply::retention::Rules {
            retention: e.retention,
            app_retention: e.app_retention,
            thin: e.thin.iter().map(|t| (t.within, t.every)).collect(),
        };
        let gone = ferry_apply::retention::plan(&m, &rules, now, pins.get(vm).copied());
        let list: Vec<Value> = gone
            .iter()
            .filter_map(|(seq, why)| {
                let pt = m.points.iter().find(|x| x.seq == *seq)?;
                Some(json!({"id": pt.id, "time": pt.time, "kind": pt.kind, "why": why}))
            })
            .collect();
        out.insert(
            vm.clone(),
            json!({"points": m.points.len(), "would_remove": list}),
        );
    }
    Ok(Value::Object(out))
}

fn store_dir(
    store: Option<StoreLocation>,
    st: Option<&ferry_serve::status::StatusFile>,
) -> Option<PathBuf> {
    match store {
        Some(s) => Some(s.local_dir()),
        None => st
            .and_then(|s| StoreLocation::parse(&s.store).ok())
            .map(|s| s.local_dir()),
    }
}

/// `ferry policy set`.
pub(crate) fn set(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    vm: Option<&str>,
    fields: Fields,
    dry_run: bool,
    store: Option<StoreLocation>,
) -> Result<(), JobError> {
    if let Some(vm) = vm {
        ferry_job::validate_name("VM", vm)?;
    }
    if fields.is_empty() {
        return Err(JobError::Usage(
            "nothing to set: give at least one of --rpo-threshold, --retention, --app-every, --app-retention, --crash-every, --thin (`ferry policy show` shows what applies)".into(),
        ));
    }
    fields.check().map_err(JobError::Usage)?;
    let dir = state(state_dir, &config)?;
    let apply = |p: &mut Policies| {
        let target = match vm {
            None => &mut p.default,
            Some(vm) => p.vms.entry(vm.to_owned()).or_default(),
        };
        let f = fields.clone();
        macro_rules! take {
            ($($name:ident),*) => { $( if f.$name.is_some() { target.$name = f.$name; } )* };
        }
        take!(
            rpo_threshold,
            retention,
            app_every,
            app_retention,
            crash_every,
            thin
        );
    };
    let st = status(&dir);
    let retention = retention_default(st.as_ref());
    if dry_run {
        let mut p = policy::load(&dir).map_err(JobError::Usage)?;
        apply(&mut p);
        let Some(store) = store_dir(store, st.as_ref()) else {
            return Err(JobError::Usage(
                "--dry-run needs the store: give --store (the server's status file names none)"
                    .into(),
            ));
        };
        let pv = preview(&p, retention, &store, vm)?;
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "dry_run": true,
                "policy": describe(&p, vm, retention),
                "next_prune": pv,
            }))
            .expect("json")
        );
        return Ok(());
    }
    let p = policy::update(&dir, |p| {
        apply(p);
        Ok(())
    })
    .map_err(JobError::Usage)?;
    let who = vm.map_or("the default".to_string(), |v| format!("VM {v}"));
    let set: Vec<String> = serde_json::to_value(&fields)
        .expect("json")
        .as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
        .collect();
    crate::admin::operator_event(
        &dir,
        ferry_serve::events::Event::new(
            "policy",
            vm,
            format!("operator set the policy of {who}: {}", set.join(", ")),
        )
        .with(serde_json::to_value(&fields).expect("json")),
    );
    let e = describe(&p, vm, retention);
    outln!("policy of {who}: {}", set.join(", "));
    outln!("{}", summary(&e));
    errln!("a running ferry serve applies it within a second (connected agents get their new cut intervals); `ferry policy show` shows what the next prune would remove");
    Ok(())
}

fn summary(e: &Value) -> String {
    let d = |v: &Value| match v {
        Value::Null => "forever".to_string(),
        Value::String(s) if s == "agent" => "the agent's own".to_string(),
        Value::String(s) => s.clone(),
        v => humantime::format_duration(Duration::from_secs(v.as_u64().unwrap_or(0))).to_string(),
    };
    let thin = e["thin"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|r| {
                    format!(
                        "{}:{}",
                        d(&r["within_seconds"]),
                        r["every_seconds"]
                            .as_u64()
                            .map_or("all".to_string(), |s| d(&json!(s)))
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none".into());
    format!(
        "  RPO threshold {}, retention {}, app-consistent every {} kept {}, crash-consistent every {}, thinning {}",
        d(&e["rpo_threshold_seconds"]),
        d(&e["retention_seconds"]),
        d(&e["app_every_seconds"]),
        d(&e["app_retention_seconds"]),
        d(&e["crash_every_seconds"]),
        thin
    )
}

/// `ferry policy show`.
pub(crate) fn show(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    vm: Option<&str>,
    store: Option<StoreLocation>,
    as_json: bool,
) -> Result<(), JobError> {
    let dir = state(state_dir, &config)?;
    let p = policy::load(&dir).map_err(JobError::Usage)?;
    let st = status(&dir);
    let retention = retention_default(st.as_ref());
    let mut names: std::collections::BTreeSet<String> = p.vms.keys().cloned().collect();
    names.extend(st.iter().flat_map(|s| s.vms.iter().map(|v| v.vm.clone())));
    if let Some(vm) = vm {
        names.retain(|n| n == vm);
        names.insert(vm.to_owned());
    }
    let mut vms = serde_json::Map::new();
    for n in &names {
        vms.insert(n.clone(), describe(&p, Some(n), retention));
    }
    let next = match store_dir(store, st.as_ref()) {
        Some(s) if s.is_dir() => Some(preview(&p, retention, &s, vm)?),
        _ => None,
    };
    let out = json!({
        "default": describe(&p, None, retention),
        "vms": vms,
        "next_prune": next,
    });
    if as_json {
        outln!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    if vm.is_none() {
        outln!("default:\n{}", summary(&out["default"]));
    }
    for (n, e) in &vms {
        let own: Vec<&str> = e["from"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(_, v)| *v == "vm")
                    .map(|(k, _)| k.as_str())
                    .collect()
            })
            .unwrap_or_default();
        outln!(
            "{n}{}:\n{}",
            if own.is_empty() {
                " (the default)".to_string()
            } else {
                format!(" (own {})", own.join(", "))
            },
            summary(e)
        );
    }
    match &out["next_prune"] {
        Value::Object(m) => {
            let mut any = false;
            for (vm, v) in m {
                let list = v["would_remove"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    continue;
                }
                any = true;
                outln!(
                    "next prune would remove {} of {}'s {} points:",
                    list.len(),
                    vm,
                    v["points"]
                );
                for x in list {
                    outln!(
                        "  {} {} {} ({})",
                        x["id"].as_str().unwrap_or("?"),
                        x["time"].as_str().unwrap_or("?"),
                        x["kind"].as_str().unwrap_or("?"),
                        x["why"].as_str().unwrap_or("?")
                    );
                }
            }
            if !any {
                outln!("next prune would remove nothing");
            }
        }
        _ => outln!("(what the next prune would remove: give --store; the server's status file names no store)"),
    }
    Ok(())
}
