//! `/etc/ferry/agent.toml`: every setting of a running agent (docs/CONFIGURATION.md, *Agent*).
//! Flags override the file; unknown keys are refused with the file and key named.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::AgentError;

/// The agent's default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/ferry/agent.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub server: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub vm: Option<String>,
    pub disks: Option<Vec<PathBuf>>,
    /// "auto" | "ebpf" | "scan"
    pub tracker: Option<String>,
    pub crash_interval: Option<String>,
    /// A duration, or "off" (app-consistent points only on demand).
    pub app_interval: Option<String>,
    pub freeze_bound: Option<String>,
    /// Expedite RCU grace periods during FIFREEZE (default true).
    pub expedite_rcu: Option<bool>,
    /// Most bytes per second this agent sends (`20MiB/s`, `100Mbit/s`, `unlimited`).
    pub max_rate: Option<String>,
    pub hooks_dir: Option<PathBuf>,
    pub hook_timeout: Option<String>,
    /// Let the process server ask for a cutover (`ferry failover --shutdown-source`).
    pub allow_remote_cutover: Option<bool>,
    pub mysql: Option<MysqlConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// Unix socket (default /run/mysqld/mysqld.sock unless host is given).
    pub socket: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub timeout: Option<String>,
}

impl AgentConfig {
    /// Reads `path`; a missing file is an empty configuration only when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<AgentConfig, AgentError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(AgentConfig::default())
            }
            Err(e) => {
                return Err(AgentError::Config(format!(
                    "cannot read the configuration {}: {e}",
                    path.display()
                )))
            }
        };
        Self::parse(&text).map_err(|e| {
            AgentError::Config(format!(
                "configuration {}: {e}(see docs/CONFIGURATION.md, section Agent)",
                path.display()
            ))
        })
    }

    /// Parses the text of a configuration file (no file system; unknown keys are errors).
    pub fn parse(text: &str) -> Result<AgentConfig, toml::de::Error> {
        toml::from_str(text)
    }
}

/// Parses a duration setting ("30s", "60min", "2s").
pub fn duration(key: &str, v: &str) -> Result<Duration, AgentError> {
    humantime::parse_duration(v).map_err(|e| {
        AgentError::Config(format!(
            "{key} = \"{v}\": {e} (write e.g. \"30s\", \"60min\")"
        ))
    })
}

/// Every non-removable disk of this machine: whole disks in /sys/block that are not loop, RAM,
/// optical, device-mapper or md devices, nor removable, nor empty.
pub fn default_disks() -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if ["loop", "ram", "zram", "sr", "dm-", "md", "nbd", "fd"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
        if read("removable").trim() == "1" || read("size").trim() == "0" {
            continue;
        }
        out.push(PathBuf::from("/dev").join(&name));
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "server = \"ps:9443\"\ncrash_intervall = \"30s\"\n").unwrap();
        let e = AgentConfig::load(&p, true).unwrap_err().to_string();
        assert!(
            e.contains("crash_intervall") && e.contains("agent.toml"),
            "{e}"
        );
        std::fs::write(
            &p,
            "server = \"ps:9443\"\ndisks = [\"/dev/sdb\"]\napp_interval = \"off\"\n[mysql]\nuser = \"root\"\n",
        )
        .unwrap();
        let c = AgentConfig::load(&p, true).unwrap();
        assert_eq!(c.disks.unwrap(), vec![PathBuf::from("/dev/sdb")]);
        assert_eq!(c.mysql.unwrap().user.as_deref(), Some("root"));
        assert!(AgentConfig::load(&dir.path().join("none.toml"), false).is_ok());
        assert!(AgentConfig::load(&dir.path().join("none.toml"), true).is_err());
        assert!(duration("crash_interval", "thirty").is_err());
    }
}
