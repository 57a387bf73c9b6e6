//! The replication policy (`ferry policy`): RPO threshold, retention of crash- and app-consistent
//! points, thinning, and the cut intervals the server tells agents. Kept in the server's state
//! directory as `policy.json`: a default for all VMs and per-VM overrides, each field optional.
//!
//! Effective policy of a VM: its override, else the file's default, else the built-in default
//! ([`Policy::BUILTIN`]: RPO threshold 60 min, retention 24 h, app-consistent points every hour
//! kept 24 h, crash-consistent every 30 s, no thinning). The cut intervals are the exception: set
//! neither for the VM nor as the default, the agent keeps its own (`crash_interval`,
//! `app_interval` in agent.toml), and the server judges "app point overdue" by what the agent
//! reports it uses.
//!
//! Writers hold `control.lock` and write atomically and durably; a running server re-reads the file
//! within [`crate::control::WATCH_EVERY`], tells connected agents their new intervals, and applies
//! the new retention at its next check.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The policy file in the state directory.
pub const POLICY_FILE: &str = "policy.json";
const FORMAT: &str = "ferry-policy";
const VERSION: u32 = 1;

/// Shortest crash-consistent interval a policy may set (the agent's floor).
pub const MIN_CRASH_EVERY: Duration = Duration::from_secs(10);

/// One set of settings; every field optional (absent: inherited).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_threshold: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// A duration or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_every: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_retention: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_every: Option<String>,
    /// Thinning rules (see [`parse_thin`]), or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin: Option<String>,
}

impl Fields {
    /// Checks every field that is set.
    pub fn check(&self) -> Result<(), String> {
        if let Some(v) = &self.rpo_threshold {
            duration("rpo_threshold", v)?;
        }
        if let Some(v) = &self.retention {
            let d = duration("retention", v)?;
            if d < Duration::from_secs(10) {
                return Err(format!("retention {v}: at least 10s"));
            }
        }
        if let Some(v) = &self.app_every {
            if v != "off" {
                let d = duration("app_every", v)?;
                if d < MIN_CRASH_EVERY {
                    return Err(format!("app_every {v}: at least 10s, or off"));
                }
            }
        }
        if let Some(v) = &self.app_retention {
            duration("app_retention", v)?;
        }
        if let Some(v) = &self.crash_every {
            let d = duration("crash_every", v)?;
            if d < MIN_CRASH_EVERY {
                return Err(format!("crash_every {v}: at least 10s"));
            }
        }
        if let Some(v) = &self.thin {
            parse_thin(v)?;
        }
        Ok(())
    }

    /// `over`'s fields where set, else these.
    fn overlay(&self, over: &Fields) -> Fields {
        Fields {
            rpo_threshold: over.rpo_threshold.clone().or(self.rpo_threshold.clone()),
            retention: over.retention.clone().or(self.retention.clone()),
            app_every: over.app_every.clone().or(self.app_every.clone()),
            app_retention: over.app_retention.clone().or(self.app_retention.clone()),
            crash_every: over.crash_every.clone().or(self.crash_every.clone()),
            thin: over.thin.clone().or(self.thin.clone()),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Fields::default()
    }
}

/// The longest duration a policy may give (a century: "forever" for any purpose).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86400);

fn duration(field: &str, v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v.trim())
        .map_err(|e| format!("{field} {v:?}: {e}; write e.g. 30s, 60m, 24h or 7d"))?;
    if d > MAX_DURATION {
        return Err(format!("{field} {v:?}: at most 100 years"));
    }
    Ok(d)
}

/// One thinning rule: points younger than `within` keep at most one per `every` (`None`: all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thin {
    pub within: Duration,
    pub every: Option<Duration>,
}

/// Parses `2h:all,24h:hourly,7d:daily` (buckets: `all`, `hourly`, `daily`, `weekly`, or a
/// duration like `15m`), youngest first; `none` is no thinning. Points older than the last rule's
/// window are kept only by the retention (they are kept one per the last rule's bucket).
pub fn parse_thin(s: &str) -> Result<Vec<Thin>, String> {
    let s = s.trim();
    if s.is_empty() || s == "none" {
        return Ok(Vec::new());
    }
    let help = "write rules like '2h:all,24h:hourly,7d:daily' (younger than 2 h: every point; younger than 24 h: one an hour; younger than 7 d: one a day)";
    let mut out: Vec<Thin> = Vec::new();
    for part in s.split(',') {
        let (w, b) = part
            .split_once(':')
            .ok_or_else(|| format!("thin rule {part:?}: no ':'; {help}"))?;
        let within = humantime::parse_duration(w.trim())
            .map_err(|e| format!("thin rule {part:?}: {e}; {help}"))?;
        let every = match b.trim() {
            "all" => None,
            "hourly" => Some(Duration::from_secs(3600)),
            "daily" => Some(Duration::from_secs(86400)),
            "weekly" => Some(Duration::from_secs(7 * 86400)),
            other => Some(
                humantime::parse_duration(other)
                    .map_err(|e| format!("thin rule {part:?}: {e}; {help}"))?,
            ),
        };
        if every == Some(Duration::ZERO) {
            return Err(format!("thin rule {part:?}: a bucket of 0; {help}"));
        }
        if within > MAX_DURATION || every.is_some_and(|e| e > MAX_DURATION) {
            return Err(format!("thin rule {part:?}: at most 100 years"));
        }
        if out.last().is_some_and(|l| l.within >= within) {
            return Err(format!(
                "thin rule {part:?}: windows must grow from rule to rule; {help}"
            ));
        }
        out.push(Thin { within, every });
    }
    Ok(out)
}

/// The effective policy of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub rpo_threshold: Duration,
    pub retention: Duration,
    /// `None`: the agent's own; `Some(None)`: off.
    pub app_every: Option<Option<Duration>>,
    pub app_retention: Duration,
    /// `None`: the agent's own.
    pub crash_every: Option<Duration>,
    pub thin: Vec<Thin>,
}

impl Policy {
    /// The built-in defaults (the incumbent's: RPO threshold 60 min, retention 24 h,
    /// app-consistent every 1 h; Ferry's 30 s crash points are the agent's default).
    pub const BUILTIN: Fields = Fields {
        rpo_threshold: None,
        retention: None,
        app_every: None,
        app_retention: None,
        crash_every: None,
        thin: None,
    };
    pub const DEFAULT_RPO_THRESHOLD: Duration = Duration::from_secs(3600);
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
    pub const DEFAULT_APP_EVERY: Duration = Duration::from_secs(3600);
    pub const DEFAULT_CRASH_EVERY: Duration = Duration::from_secs(30);

    fn from_fields(f: &Fields, retention_default: Duration) -> Policy {
        let d = |v: &Option<String>| v.as_deref().and_then(|v| duration("", v).ok());
        let retention = d(&f.retention).unwrap_or(retention_default);
        Policy {
            rpo_threshold: d(&f.rpo_threshold).unwrap_or(Self::DEFAULT_RPO_THRESHOLD),
            retention,
            app_every: f.app_every.as_deref().map(|v| match v {
                "off" => None,
                v => duration("", v).ok(),
            }),
            app_retention: d(&f.app_retention).unwrap_or(retention),
            crash_every: d(&f.crash_every),
            thin: f
                .thin
                .as_deref()
                .and_then(|t| parse_thin(t).ok())
                .unwrap_or_default(),
        }
    }

    /// The intervals to tell the agent ([`ferry_wire::Message::Policy`]).
    pub fn wire(&self) -> (u64, u64) {
        let crash = self
            .crash_every
            .map_or(ferry_wire::POLICY_OWN, |d| d.as_millis() as u64);
        let app = match self.app_every {
            None => ferry_wire::POLICY_OWN,
            Some(None) => ferry_wire::POLICY_OFF,
            Some(Some(d)) => d.as_millis() as u64,
        };
        (crash, app)
    }
}

/// `policy.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policies {
    #[serde(default)]
    pub default: Fields,
    #[serde(default)]
    pub vms: BTreeMap<String, Fields>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: String,
    version: u32,
    #[serde(flatten)]
    policies: Policies,
}

impl Policies {
    pub fn parse(bytes: &[u8]) -> Result<Policies, String> {
        let f: File = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if f.format != FORMAT {
            return Err(format!("not a policy file (format {:?})", f.format));
        }
        if f.version != VERSION {
            return Err(format!(
                "policy file version {} (this Ferry reads version {VERSION}); upgrade Ferry",
                f.version
            ));
        }
        f.policies
            .default
            .check()
            .map_err(|e| format!("default: {e}"))?;
        for (vm, p) in &f.policies.vms {
            ferry_wire::check_name("VM name", vm)?;
            p.check().map_err(|e| format!("{vm}: {e}"))?;
        }
        Ok(f.policies)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(&File {
            format: FORMAT.into(),
            version: VERSION,
            policies: self.clone(),
        })
        .expect("serializable");
        v.push(b'\n');
        v
    }

    /// The effective policy of `vm` (`None`: the default). `retention_default` is the server's
    /// `--retention` (or `retention` of ferry.toml), used where no policy sets one.
    pub fn effective(&self, vm: Option<&str>, retention_default: Duration) -> Policy {
        let mut f = Policy::BUILTIN.overlay(&self.default);
        if let Some(o) = vm.and_then(|vm| self.vms.get(vm)) {
            f = f.overlay(o);
        }
        Policy::from_fields(&f, retention_default)
    }

    /// Where each field of `vm`'s effective policy comes from: `vm`, `default` or `built-in`.
    pub fn sources(&self, vm: Option<&str>) -> BTreeMap<&'static str, &'static str> {
        let o = vm.and_then(|vm| self.vms.get(vm));
        let mut out = BTreeMap::new();
        let pick = |get: fn(&Fields) -> &Option<String>| {
            if o.is_some_and(|o| get(o).is_some()) {
                "vm"
            } else if get(&self.default).is_some() {
                "default"
            } else {
                "built-in"
            }
        };
        out.insert("rpo_threshold", pick(|f| &f.rpo_threshold));
        out.insert("retention", pick(|f| &f.retention));
        out.insert("app_every", pick(|f| &f.app_every));
        out.insert("app_retention", pick(|f| &f.app_retention));
        out.insert("crash_every", pick(|f| &f.crash_every));
        out.insert("thin", pick(|f| &f.thin));
        out
    }
}

/// Reads `STATE_DIR/policy.json`; none there: every default.
pub fn load(state_dir: &Path) -> Result<Policies, String> {
    let path = state_dir.join(POLICY_FILE);
    match std::fs::read(&path) {
        Ok(b) => Policies::parse(&b).map_err(|why| {
            format!(
                "{}: {why}; it is written only by `ferry policy`: fix or remove it (removed, the defaults apply)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Policies::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Changes `policy.json` under the control lock, durably.
pub fn update(
    state_dir: &Path,
    f: impl FnOnce(&mut Policies) -> Result<(), String>,
) -> Result<Policies, String> {
    let c = crate::control::Control::new(state_dir);
    let _l = c.lock().map_err(|e| e.to_string())?;
    let mut p = load(state_dir)?;
    f(&mut p)?;
    let path = state_dir.join(POLICY_FILE);
    ferry_durable::write_private(&path, &p.to_json())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(p)
}

/// The identity of the file, to notice changes.
pub fn stamp(state_dir: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(state_dir.join(POLICY_FILE)).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_policy_layers_vm_over_default_over_builtin() {
        let mut p = Policies::default();
        let day = Duration::from_secs(86400);
        let e = p.effective(Some("web01"), day);
        assert_eq!(e.rpo_threshold, Duration::from_secs(3600));
        assert_eq!((e.retention, e.app_retention), (day, day));
        assert_eq!((e.crash_every, e.app_every), (None, None));
        assert_eq!(e.wire(), (ferry_wire::POLICY_OWN, ferry_wire::POLICY_OWN));
        p.default = Fields {
            retention: Some("48h".into()),
            app_every: Some("off".into()),
            ..Default::default()
        };
        p.vms.insert(
            "web01".into(),
            Fields {
                crash_every: Some("1m".into()),
                app_retention: Some("7d".into()),
                ..Default::default()
            },
        );
        let e = p.effective(Some("web01"), day);
        assert_eq!(e.retention, 2 * day);
        assert_eq!(e.app_retention, 7 * day);
        assert_eq!(e.wire(), (60_000, ferry_wire::POLICY_OFF));
        let other = p.effective(Some("db01"), day);
        assert_eq!(other.app_retention, 2 * day);
        assert_eq!(
            other.wire(),
            (ferry_wire::POLICY_OWN, ferry_wire::POLICY_OFF)
        );
        let src = p.sources(Some("web01"));
        assert_eq!(
            (src["crash_every"], src["retention"], src["rpo_threshold"]),
            ("vm", "default", "built-in")
        );
        let back = Policies::parse(&p.to_json()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn bad_values_are_refused_with_what_to_write() {
        for (f, want) in [
            (
                Fields {
                    crash_every: Some("5s".into()),
                    ..Default::default()
                },
                "at least 10s",
            ),
            (
                Fields {
                    retention: Some("forever".into()),
                    ..Default::default()
                },
                "write e.g.",
            ),
            (
                Fields {
                    thin: Some("24h:hourly,2h:all".into()),
                    ..Default::default()
                },
                "must grow",
            ),
            (
                Fields {
                    thin: Some("2h".into()),
                    ..Default::default()
                },
                "no ':'",
            ),
        ] {
            let e = f.check().unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert_eq!(
            parse_thin("2h:all,24h:hourly,7d:daily").unwrap(),
            vec![
                Thin {
                    within: Duration::from_secs(7200),
                    every: None
                },
                Thin {
                    within: Duration::from_secs(86400),
                    every: Some(Duration::from_secs(3600))
                },
                Thin {
                    within: Duration::from_secs(7 * 86400),
                    every: Some(Duration::from_secs(86400))
                },
            ]
        );
    }
}
