//! What `ferry status` reads: `STATE_DIR/status.json`, written every second by the running server
//! from its in-memory board (temp file + rename, never on the ack path). The file format is
//! [`StatusFile`]; `ferry status` turns it into its own documented `--json` object.
//!
//! Backlog of a VM: the write payload bytes of its records that were acknowledged (durable in the
//! cache) since the last tag that became a point, i.e. data the agent considers shipped but that no
//! recovery point holds yet. It counts what this server process received: data a previous run of the
//! server left in the cache is only in the server-wide `cache_used_bytes`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ferry_format::manifest::Point;
use serde::{Deserialize, Serialize};

/// The status file's name in the state directory.
pub const STATUS_FILE: &str = "status.json";
/// `format` of the status file.
pub const STATUS_FORMAT: &str = "ferry-serve-status";
/// `version` of the status file; readers refuse others.
pub const STATUS_VERSION: u32 = 1;
/// How often the running server rewrites the file. A file older than [`STALE_AFTER`] means the
/// server is not running (or hung).
pub const WRITE_EVERY: Duration = Duration::from_secs(1);
/// See [`WRITE_EVERY`].
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// `STATE_DIR/status.json`, as written by `ferry serve`. Times are RFC 3339 UTC.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusFile {
    pub format: String,
    pub version: u32,
    /// When this file was written; the server rewrites it every second while it runs.
    pub written_at: String,
    /// False in the last file a server wrote as it stopped cleanly.
    pub running: bool,
    pub pid: u32,
    pub started_at: String,
    /// The address the server listens on.
    pub listen: String,
    /// The store: an absolute directory, or `azure://ACCOUNT/CONTAINER`.
    pub store: String,
    pub cache_dir: String,
    /// Bytes of cache files on disk (records not yet drained into the store, all VMs).
    pub cache_used_bytes: u64,
    pub cache_size_bytes: u64,
    /// Points older than this are pruned; `null`: kept forever.
    pub retention_seconds: Option<u64>,
    /// Server-wide health conditions that hold now (see docs/OPERATIONS.md#health).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The appliance's CPU and memory.
    #[serde(default)]
    pub host: Option<Host>,
    /// Bytes per second the drain (cache → store) took over the last minute.
    #[serde(default)]
    pub drain_rate_bytes_per_second: f64,
    /// The Prometheus endpoint, if one is served.
    #[serde(default)]
    pub metrics_url: Option<String>,
    pub vms: Vec<VmStatus>,
}

/// One health condition that holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// `rpo_over_threshold`, `cache_free_space`, `cpu`, `memory`, `upload_backlog`,
    /// `agent_disconnected`, `no_recovery_point`, `app_point_overdue`, `resync_in_progress`,
    /// `vm_quarantined`, `server_not_running`.
    pub name: String,
    /// `warning` or `critical`.
    pub level: String,
    /// What holds and what to do, for a person.
    pub message: String,
}

/// The appliance's load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// All cores, averaged over the last minute.
    pub cpu_percent: f64,
    /// (MemTotal − MemAvailable) / MemTotal.
    pub memory_percent: f64,
    /// Free space of the cache: what the quota and its file system both still allow, as a
    /// percentage of the quota.
    pub cache_free_percent: f64,
}

/// A VM's cut intervals, as its agent reported them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Intervals {
    pub crash_every_seconds: f64,
    /// `null`: app-consistent points only on demand.
    pub app_every_seconds: Option<f64>,
    /// `agent` (its own config) or `server` (the policy).
    pub from: String,
}

/// Something that happened, with why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Note {
    pub time: String,
    pub why: String,
}

/// One VM the server has seen since it started, or that has points in the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmStatus {
    pub vm: String,
    /// The agent replicating it (last connection), if one connected since the server started.
    pub agent: Option<String>,
    pub connected: bool,
    /// The agent's address (last connection).
    pub peer: Option<String>,
    /// Connected since (when `connected`), else disconnected since; `null` if never connected.
    pub since: Option<String>,
    /// `replicating`, `applying`, `idle`, `disconnected` or `quarantined` (see OPERATIONS.md).
    pub state: String,
    /// Why the VM is quarantined (state `quarantined`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
    /// Acknowledged write bytes not yet in a recovery point (see the module docs).
    pub backlog_bytes: u64,
    /// Write payload bytes acknowledged since the server started.
    #[serde(default)]
    pub acked_bytes: u64,
    /// Held back by an ingest throttle within the last second (its agent sends slower than it
    /// could; its RPO may grow).
    #[serde(default)]
    pub throttled: bool,
    /// The VM's own ingest throttle in effect now, bytes/s (`null`: none; the global one may
    /// still apply).
    #[serde(default)]
    pub ingest_limit_bytes_per_second: Option<u64>,
    pub last_point: Option<PointRef>,
    /// The newest app-consistent point.
    #[serde(default)]
    pub last_app_point: Option<PointRef>,
    /// When this server process first saw the VM.
    #[serde(default)]
    pub first_seen: Option<String>,
    #[serde(default)]
    pub intervals: Option<Intervals>,
    /// A resync in progress (the agent reads and compares whole disks; no point until done).
    #[serde(default)]
    pub resync: Option<Note>,
    #[serde(default)]
    pub last_abandoned_cut: Option<Note>,
    /// Age of the newest point (`null`: none yet).
    #[serde(default)]
    pub rpo_seconds: Option<f64>,
    /// `initial sync N%`, `resyncing N%`, `throttled`, `paused`, `protected`, `disconnected` or
    /// `quarantined`.
    #[serde(default)]
    pub protection: String,
    /// Write bytes per second received over the last status interval.
    #[serde(default)]
    pub rate_in_bytes_per_second: f64,
    /// The backlog over the drain rate (`null`: no backlog, or nothing drains).
    #[serde(default)]
    pub backlog_eta_seconds: Option<f64>,
    /// Health conditions of this VM that hold now.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    pub disks: Vec<DiskStatus>,
}

/// One disk of a VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskStatus {
    pub name: String,
    pub state: String,
    /// Highest record seq of this disk that is durable and acknowledged (`Begin` and `Tag` count
    /// for each of their disks); 0 if none since the server started.
    pub last_acked_seq: u64,
    /// `Write`, `Zero` and `Discard` records received for the disk since the server started.
    pub records_received: u64,
    /// Write payload bytes received for the disk since the server started.
    pub bytes_received: u64,
    /// The newest point that holds this disk.
    pub last_point: Option<PointRef>,
}

/// A recovery point, as the status names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRef {
    pub id: String,
    /// RFC 3339 time of the cut.
    pub time: String,
    /// `crash` or `app`.
    pub kind: String,
}

impl From<&Point> for PointRef {
    fn from(p: &Point) -> Self {
        PointRef {
            id: p.id.clone(),
            time: p.time.clone(),
            kind: p.kind.clone(),
        }
    }
}

/// Errors reading a status file.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// the file cannot be read
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the file is not a status file of a version this build knows
    #[error("{} is not a ferry serve status file this version understands: {detail}", path.display())]
    Format { path: PathBuf, detail: String },
}

/// Reads a status file; refuses other formats and versions.
pub fn read_status(path: &Path) -> Result<StatusFile, StatusError> {
    let bytes = std::fs::read(path).map_err(|source| StatusError::Read {
        path: path.into(),
        source,
    })?;
    parse_status(&bytes).map_err(|detail| StatusError::Format {
        path: path.into(),
        detail,
    })
}

/// Parses a status file's bytes; refuses other formats and versions. The error is the detail of
/// [`StatusError::Format`].
pub fn parse_status(bytes: &[u8]) -> Result<StatusFile, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let (format, version) = (v["format"].as_str(), v["version"].as_u64());
    if format != Some(STATUS_FORMAT) || version != Some(STATUS_VERSION as u64) {
        return Err(format!(
            "format {format:?} version {version:?}, expected {STATUS_FORMAT:?} version {STATUS_VERSION}"
        ));
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// The bytes the server writes for `status`.
pub fn encode_status(status: &StatusFile) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec_pretty(status)
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Writes `status` to `path` atomically (temp file, rename). Not fsynced: the file is rewritten
/// every second and a reader treats an unreadable one as "no status"; syncing it would cost the
/// cache disk a flush per second for nothing.
pub(crate) fn write_status(path: &Path, status: &StatusFile) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let body = encode_status(status).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::board::tests::board;

    #[test]
    fn status_files_round_trip_and_other_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATUS_FILE);
        let b = board();
        b.connected(
            "vm",
            "agent",
            "peer",
            1,
            tokio::sync::mpsc::unbounded_channel().0,
        );
        write_status(&p, &b.snapshot(true, 5)).unwrap();
        let s = read_status(&p).unwrap();
        assert_eq!((s.vms.len(), s.cache_used_bytes, s.running), (1, 5, true));
        assert!(humantime::parse_rfc3339(&s.written_at).is_ok());
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        v["version"] = 2.into();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = read_status(&p).unwrap_err().to_string();
        assert!(e.contains("version Some(2)"), "{e}");
    }
}
