//! Health conditions, evaluated every second by the status writer (named like the incumbent's;
//! each has a warning and a critical level; docs/OPERATIONS.md#health lists them):
//!
//! | condition | warning | critical |
//! | --- | --- | --- |
//! | `rpo_over_threshold` | newest point older than the VM's RPO threshold | older than twice it |
//! | `no_recovery_point` | no point yet | none yet a whole RPO threshold after the VM was first seen |
//! | `agent_disconnected` | for 60 s | for longer than the RPO threshold |
//! | `app_point_overdue` | newest app point older than 1.5 × the app interval | 3 × |
//! | `resync_in_progress` | a resync runs | for longer than the RPO threshold |
//! | `vm_quarantined` | — | always |
//! | `cache_free_space` | under 30 % of the quota free | under 25 % |
//! | `cpu` | over 80 % (1-minute average, all cores) | over 95 % |
//! | `memory` | over 80 % used | over 95 % |
//! | `upload_backlog` | the cache cannot drain within 30 min at the current rate | 45 min |
//!
//! A change of level is an event (`ferry events --kind health`) and every condition is a gauge
//! ([`crate::metrics::CONDITION`]).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::events::{Event, Recorder};
use crate::policy::Policies;
use crate::status::{Condition, Host, StatusFile};

/// How long a VM may be disconnected before it is a warning (a restart of either side).
pub const DISCONNECT_GRACE: Duration = Duration::from_secs(60);
/// The window of the CPU average and the drain rate.
const WINDOW: Duration = Duration::from_secs(60);

/// Every condition a VM can have, for the gauges.
pub const VM_CONDITIONS: &[&str] = &[
    "rpo_over_threshold",
    "no_recovery_point",
    "agent_disconnected",
    "app_point_overdue",
    "resync_in_progress",
    "vm_quarantined",
];
/// Every server-wide condition.
pub const SERVER_CONDITIONS: &[&str] = &["cache_free_space", "cpu", "memory", "upload_backlog"];

/// The status writer's health state.
pub struct Health {
    pub policies: Arc<Mutex<Policies>>,
    pub retention_default: Option<Duration>,
    pub cache_dir: PathBuf,
    /// Bytes the drain has taken from the cache (set by the drain loop).
    pub drained: Arc<AtomicU64>,
    pub events: Recorder,
    cpu: VecDeque<(Instant, u64, u64)>,
    drain: VecDeque<(Instant, u64)>,
    /// Since when the cache has held data while nothing drained.
    stuck_since: Option<Instant>,
    /// Per VM: bytes received at the last evaluation.
    received: BTreeMap<String, (Instant, u64)>,
    /// The level of each (vm or `*`, condition) last time.
    levels: BTreeMap<(String, String), String>,
    /// The store (its VMs' lifecycle records: a failed-over VM is no longer expected).
    store_root: PathBuf,
}

/// Conditions that say a VM's protection is behind: a VM cut over or failed over is expected to
/// stop making points, so none of them is raised for it.
const PROTECTION_CONDITIONS: [&str; 5] = [
    "rpo_over_threshold",
    "no_recovery_point",
    "agent_disconnected",
    "app_point_overdue",
    "resync_in_progress",
];

fn cond(name: &str, level: &str, message: String) -> Condition {
    Condition {
        name: name.into(),
        level: level.into(),
        message,
    }
}

/// `1.5 GiB`.
fn size(b: u64) -> String {
    let f = b as f64;
    if f >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", f / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// `(busy, total)` jiffies of all CPUs from /proc/stat.
fn cpu_times() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Used memory in percent (MemTotal − MemAvailable).
fn memory_percent() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let get = |k: &str| -> Option<f64> {
        s.lines()
            .find(|l| l.starts_with(k))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let (total, avail) = (get("MemTotal:")?, get("MemAvailable:")?);
    Some(100.0 * (total - avail) / total)
}

/// Bytes available to the cache on its file system.
fn fs_available(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

impl Health {
    pub fn new(
        policies: Arc<Mutex<Policies>>,
        retention_default: Option<Duration>,
        cache_dir: PathBuf,
        drained: Arc<AtomicU64>,
        events: Recorder,
        store_root: PathBuf,
    ) -> Health {
        Health {
            policies,
            retention_default,
            cache_dir,
            drained,
            events,
            cpu: VecDeque::new(),
            drain: VecDeque::new(),
            stuck_since: None,
            received: BTreeMap::new(),
            levels: BTreeMap::new(),
            store_root,
        }
    }

    /// Fills `snap`'s rates, RPOs and conditions, and reports changes of level.
    pub fn evaluate(&mut self, snap: &mut StatusFile) {
        let now = SystemTime::now();
        let mono = Instant::now();
        // Drain rate over the window.
        let drained = self.drained.load(Ordering::Relaxed);
        self.drain.push_back((mono, drained));
        while self
            .drain
            .front()
            .is_some_and(|(t, _)| mono.duration_since(*t) > WINDOW)
        {
            self.drain.pop_front();
        }
        let rate = match (self.drain.front(), self.drain.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
            }
            _ => 0.0,
        };
        snap.drain_rate_bytes_per_second = rate;
        // Host.
        if let Some((busy, total)) = cpu_times() {
            self.cpu.push_back((mono, busy, total));
            while self
                .cpu
                .front()
                .is_some_and(|(t, _, _)| mono.duration_since(*t) > WINDOW)
            {
                self.cpu.pop_front();
            }
        }
        let cpu = match (self.cpu.front(), self.cpu.back()) {
            (Some(a), Some(b)) if b.2 > a.2 => 100.0 * (b.1 - a.1) as f64 / (b.2 - a.2) as f64,
            _ => 0.0,
        };
        let mem = memory_percent().unwrap_or(0.0);
        let quota = snap.cache_size_bytes.max(1);
        let by_quota = quota.saturating_sub(snap.cache_used_bytes);
        let free = fs_available(&self.cache_dir).map_or(by_quota, |f| f.min(by_quota));
        let cache_free = 100.0 * free as f64 / quota as f64;
        snap.host = Some(Host {
            cpu_percent: (cpu * 10.0).round() / 10.0,
            memory_percent: (mem * 10.0).round() / 10.0,
            cache_free_percent: (cache_free * 10.0).round() / 10.0,
        });
        let mut server = Vec::new();
        let two = |v: f64, warn: f64, crit: f64, name: &str, what: String| {
            if v > crit {
                Some(cond(name, "critical", what))
            } else if v > warn {
                Some(cond(name, "warning", what))
            } else {
                None
            }
        };
        server.extend(two(
            -cache_free,
            -30.0,
            -25.0,
            "cache_free_space",
            format!(
                "the cache has {cache_free:.0} % of its quota free ({} of {} used, file system permitting): agents are paused above 80 % used; give the cache more room or let it drain (check the store and the upload)",
                size(snap.cache_used_bytes),
                size(quota),
            ),
        ));
        server.extend(two(
            cpu,
            80.0,
            95.0,
            "cpu",
            format!("the appliance's CPUs are {cpu:.0} % busy over the last minute: give it more vCPUs or throttle ingest (ferry throttle)"),
        ));
        server.extend(two(
            mem,
            80.0,
            95.0,
            "memory",
            format!("the appliance's memory is {mem:.0} % used: give it more memory"),
        ));
        let backlog = snap.cache_used_bytes;
        if backlog == 0 || rate > 0.0 {
            self.stuck_since = None;
        } else if self.stuck_since.is_none() {
            self.stuck_since = Some(mono);
        }
        let eta = if backlog > 0 && rate > 0.0 {
            Some(Duration::from_secs_f64(backlog as f64 / rate))
        } else {
            self.stuck_since.map(|t| mono.duration_since(t))
        };
        if let Some(eta) = eta.filter(|_| backlog > (64 << 20)) {
            let msg = if rate > 0.0 {
                format!(
                    "the cache holds {} that drains at {} : about {} to go; check the store's speed and the upload throttle",
                    size(backlog),
                    crate::throttle::human_rate(rate as u64),
                    human(eta)
                )
            } else {
                format!(
                    "the cache holds {} and nothing has drained for {}: check the store and the server log",
                    size(backlog),
                    human(eta)
                )
            };
            server.extend(two(
                eta.as_secs_f64(),
                1800.0,
                2700.0,
                "upload_backlog",
                msg,
            ));
        }
        snap.conditions = server;
        // VMs.
        let policies = self.policies.lock().expect("policies lock").clone();
        let lifecycle = ferry_apply::lifecycle::list(&self.store_root).unwrap_or_default();
        for v in &mut snap.vms {
            let p =
                policies.effective(Some(&v.vm), self.retention_default.unwrap_or(Duration::MAX));
            let threshold = p.rpo_threshold;
            let received: u64 = v.disks.iter().map(|d| d.bytes_received).sum();
            if let Some((t, b)) = self.received.insert(v.vm.clone(), (mono, received)) {
                let dt = mono.duration_since(t).as_secs_f64();
                if dt > 0.0 {
                    v.rate_in_bytes_per_second = received.saturating_sub(b) as f64 / dt;
                }
            }
            v.backlog_eta_seconds =
                (v.backlog_bytes > 0 && rate > 0.0).then(|| v.backlog_bytes as f64 / rate);
            let age = |t: &str| {
                humantime::parse_rfc3339_weak(t)
                    .ok()
                    .map(|t| now.duration_since(t).unwrap_or_default())
            };
            let first_seen = v.first_seen.as_deref().and_then(age).unwrap_or_default();
            let rpo = v.last_point.as_ref().and_then(|p| age(&p.time));
            v.rpo_seconds = rpo.map(|r| r.as_secs_f64().round());
            let mut c = Vec::new();
            if let Some(q) = &v.quarantine {
                c.push(cond(
                    "vm_quarantined",
                    "critical",
                    format!(
                        "quarantined: {q}; fix the cause, then `ferry vms release {}`",
                        v.vm
                    ),
                ));
            }
            match rpo {
                Some(r) if r > threshold.saturating_mul(2) => c.push(cond(
                    "rpo_over_threshold",
                    "critical",
                    format!(
                        "the newest point is {} old, over twice the RPO threshold ({})",
                        human(r),
                        human(threshold)
                    ),
                )),
                Some(r) if r > threshold => c.push(cond(
                    "rpo_over_threshold",
                    "warning",
                    format!(
                        "the newest point is {} old, over the RPO threshold ({})",
                        human(r),
                        human(threshold)
                    ),
                )),
                Some(_) => {}
                None if first_seen > threshold => c.push(cond(
                    "no_recovery_point",
                    "critical",
                    format!(
                        "no recovery point yet, {} after the VM was first seen (RPO threshold {})",
                        human(first_seen),
                        human(threshold)
                    ),
                )),
                None => c.push(cond(
                    "no_recovery_point",
                    "warning",
                    "no recovery point yet (initial sync)".to_string(),
                )),
            }
            if !v.connected && v.quarantine.is_none() {
                let gone = v.since.as_deref().and_then(age).unwrap_or(first_seen);
                if gone > threshold {
                    c.push(cond(
                        "agent_disconnected",
                        "critical",
                        format!("the agent has not been connected for {}, longer than the RPO threshold; check the machine and `ferry-agent status` on it", human(gone)),
                    ));
                } else if gone > DISCONNECT_GRACE {
                    c.push(cond(
                        "agent_disconnected",
                        "warning",
                        format!("the agent has not been connected for {}", human(gone)),
                    ));
                }
            }
            let app_every = match p.app_every {
                Some(a) => a,
                None => v
                    .intervals
                    .as_ref()
                    .and_then(|i| i.app_every_seconds)
                    .map(Duration::from_secs_f64),
            };
            if let Some(every) = app_every.filter(|_| v.quarantine.is_none()) {
                let since = v
                    .last_app_point
                    .as_ref()
                    .and_then(|p| age(&p.time))
                    .unwrap_or(first_seen);
                let msg = |lvl: &str| {
                    format!(
                        "the newest app-consistent point is {} old (every {} expected{}); `ferry events --kind hook --vm {}` says why cuts fell back",
                        human(since),
                        human(every),
                        if lvl == "critical" { ", 3 intervals missed" } else { "" },
                        v.vm
                    )
                };
                if since.as_secs_f64() > 3.0 * every.as_secs_f64() {
                    c.push(cond("app_point_overdue", "critical", msg("critical")));
                } else if since.as_secs_f64() > 1.5 * every.as_secs_f64() {
                    c.push(cond("app_point_overdue", "warning", msg("warning")));
                }
            }
            if let Some(r) = &v.resync {
                let long = age(&r.time).unwrap_or_default();
                let level = if long > threshold {
                    "critical"
                } else {
                    "warning"
                };
                c.push(cond(
                    "resync_in_progress",
                    level,
                    format!(
                        "resync for {}: {}; no point until it is done",
                        human(long),
                        r.why
                    ),
                ));
            }
            if let Some(Ok(l)) = lifecycle.get(&v.vm) {
                v.protection = match l.state.as_str() {
                    ferry_apply::lifecycle::CUT_OVER => "cut over".into(),
                    ferry_apply::lifecycle::FAILED_OVER => "failed over".into(),
                    _ => "completing migration".into(),
                };
                c.retain(|c| !PROTECTION_CONDITIONS.contains(&c.name.as_str()));
            }
            v.conditions = c;
        }
        self.report(snap);
    }

    /// Gauges for every condition, and an event for every change of level.
    fn report(&mut self, snap: &StatusFile) {
        let mut now: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
        for c in &snap.conditions {
            now.insert(
                ("*".into(), c.name.clone()),
                (c.level.clone(), c.message.clone()),
            );
        }
        for v in &snap.vms {
            for c in &v.conditions {
                now.insert(
                    (v.vm.clone(), c.name.clone()),
                    (c.level.clone(), c.message.clone()),
                );
            }
        }
        let level = |l: Option<&str>| match l {
            Some("critical") => 2.0,
            Some("warning") => 1.0,
            _ => 0.0,
        };
        for name in SERVER_CONDITIONS {
            let l = now.get(&("*".into(), (*name).into())).map(|x| x.0.as_str());
            metrics::gauge!(crate::metrics::CONDITION, "condition" => *name, "vm" => "*")
                .set(level(l));
        }
        for v in &snap.vms {
            for name in VM_CONDITIONS {
                let l = now
                    .get(&(v.vm.clone(), (*name).into()))
                    .map(|x| x.0.as_str());
                metrics::gauge!(crate::metrics::CONDITION, "condition" => *name, "vm" => v.vm.clone())
                    .set(level(l));
            }
        }
        for (key, (lvl, msg)) in &now {
            if self.levels.get(key) != Some(lvl) {
                let vm = (key.0 != "*").then_some(key.0.as_str());
                self.events.record(
                    Event::new("health", vm, format!("{} {lvl}: {msg}", key.1))
                        .with(serde_json::json!({"condition": key.1, "level": lvl})),
                );
            }
        }
        for key in self.levels.keys() {
            if !now.contains_key(key) {
                let vm = (key.0 != "*").then_some(key.0.as_str());
                self.events.record(
                    Event::new("health", vm, format!("{} cleared", key.1))
                        .with(serde_json::json!({"condition": key.1, "level": "ok"})),
                );
            }
        }
        self.levels = now.into_iter().map(|(k, (l, _))| (k, l)).collect();
    }
}
