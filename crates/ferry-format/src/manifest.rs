//! The per-VM manifest (`manifests/VM.json`): the commit point of the store.
//!
//! A point exists if and only if the manifest lists it. Writers replace the whole file atomically
//! (temp + fsync + rename + fsync dir) after everything the point needs is durable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::FormatError;

pub const MANIFEST_FORMAT: &str = "ferry-manifest";
pub const MANIFEST_VERSION: u16 = 1;

/// A journal position: the next record to apply is record `record` of segment `segment`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalPos {
    pub segment: u64,
    pub record: u32,
}

/// State of one protected disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    /// Size in bytes at the newest point; 0 for a disk with no point yet whose journal a quarantine
    /// release voided (only `applied` is known of it).
    pub size: u64,
    /// Where the applier resumes: just past the newest committed tag (or the voided journal).
    pub applied: JournalPos,
}

impl DiskState {
    /// The disk's size at its newest point; `None` if it has no point yet.
    pub fn known_size(&self) -> Option<u64> {
        (self.size != 0).then_some(self.size)
    }
}

/// One disk of a recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointDisk {
    pub name: String,
    pub size: u64,
    /// blake3 of the whole disk at the cut, hex.
    pub blake3: String,
    /// Remote stores: the snapshot of the replica page blob that holds this point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// Stable identifier: `SEQ-YYYYMMDDTHHMMSSZ`.
    pub id: String,
    /// Point sequence number within the VM; also the replica generation.
    pub seq: u64,
    /// The run whose tag made this point (hex), for idempotent re-application.
    pub run: String,
    /// RFC 3339 time of the cut.
    pub time: String,
    /// "crash" or "app".
    pub kind: String,
    pub disks: Vec<PointDisk>,
}

/// The manifest of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u16,
    pub vm: String,
    /// Id of the master key every object of this VM is sealed with.
    pub key_id: String,
    pub disks: BTreeMap<String, DiskState>,
    /// Oldest first.
    pub points: Vec<Point>,
    /// Sequence number the next point gets.
    pub next_seq: u64,
}

impl Manifest {
    pub fn new(vm: &str, key_id: &str) -> Self {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            vm: vm.into(),
            key_id: key_id.into(),
            disks: BTreeMap::new(),
            points: Vec::new(),
            next_seq: 1,
        }
    }

    /// Parses and checks format and version.
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        let what = "manifest";
        // Check the version before the full schema, so a newer manifest says "upgrade", not "bad field".
        let probe: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| FormatError::Corrupt {
                what,
                offset: e.column() as u64,
                detail: e.to_string(),
            })?;
        if probe.get("format").and_then(|v| v.as_str()) != Some(MANIFEST_FORMAT) {
            return Err(FormatError::Magic { what, offset: 0 });
        }
        let v = probe.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if v != MANIFEST_VERSION as u64 {
            return Err(FormatError::Version {
                what,
                found: v.min(u16::MAX as u64) as u16,
                supported: MANIFEST_VERSION,
            });
        }
        let m: Manifest = serde_json::from_value(probe).map_err(|e| FormatError::Corrupt {
            what,
            offset: 0,
            detail: e.to_string(),
        })?;
        let mut last = 0;
        for p in &m.points {
            if p.seq <= last || p.seq >= m.next_seq {
                return Err(FormatError::Corrupt {
                    what,
                    offset: 0,
                    detail: format!("point {} out of sequence", p.id),
                });
            }
            last = p.seq;
        }
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }
}

/// Formats a point id from its sequence number and time.
pub fn point_id(seq: u64, time: std::time::SystemTime) -> String {
    let t = humantime::format_rfc3339_seconds(time).to_string();
    let compact: String = t.chars().filter(|c| *c != '-' && *c != ':').collect();
    format!("{seq:04}-{compact}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let mut m = Manifest::new("web01", "00");
        m.points.push(Point {
            id: "0001-x".into(),
            seq: 1,
            run: "ab".into(),
            time: "2026-11-22T00:00:00Z".into(),
            kind: "crash".into(),
            disks: vec![],
        });
        m.next_seq = 2;
        let j = m.to_json();
        assert_eq!(Manifest::from_json(&j).unwrap(), m);
        let bumped = String::from_utf8(j)
            .unwrap()
            .replace("\"version\": 1", "\"version\": 9");
        assert!(matches!(
            Manifest::from_json(bumped.as_bytes()),
            Err(FormatError::Version { found: 9, .. })
        ));
    }

    #[test]
    fn point_id_shape() {
        let id = point_id(3, std::time::UNIX_EPOCH);
        assert_eq!(id, "0003-19700101T000000Z");
    }
}
