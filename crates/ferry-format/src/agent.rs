//! The mobility agent's own state files (docs/FORMAT.md, *Agent state*): the pending-run file and
//! the clean-stop record. Both are read back only by the agent that wrote them, but they decide
//! what is re-sent after a crash, so they are checksummed and parsed defensively: a torn or
//! damaged file reads as `None` (the agent then treats the chunks as unknown and re-sends them).

use serde::{Deserialize, Serialize};

/// Magic of `pending/RUN.bin`.
pub const PENDING_MAGIC: &[u8; 8] = b"FERRYPN1";

/// The chunk CVs one tagged run commits, per disk index: `(chunk, cv)`.
pub type RunCvs = Vec<Vec<(u64, [u8; 32])>>;

/// `MAGIC(8) RUN(16) DISKS(u32) { COUNT(u64) { CHUNK(u64) CV(32) }* }* BLAKE3(32)`, little-endian.
pub fn encode_pending(run: &[u8; 16], cvs: &RunCvs) -> Vec<u8> {
    let mut buf = Vec::with_capacity(60 + cvs.iter().map(|d| 8 + d.len() * 40).sum::<usize>());
    buf.extend_from_slice(PENDING_MAGIC);
    buf.extend_from_slice(run);
    buf.extend_from_slice(&(cvs.len() as u32).to_le_bytes());
    for d in cvs {
        buf.extend_from_slice(&(d.len() as u64).to_le_bytes());
        for (c, cv) in d {
            buf.extend_from_slice(&c.to_le_bytes());
            buf.extend_from_slice(cv);
        }
    }
    let sum = blake3::hash(&buf);
    buf.extend_from_slice(sum.as_bytes());
    buf
}

/// Parses a pending-run file; `None` if it is torn, damaged or not one.
pub fn parse_pending(bytes: &[u8]) -> Option<([u8; 16], RunCvs)> {
    if bytes.len() < 8 + 16 + 4 + 32 || &bytes[..8] != PENDING_MAGIC {
        return None;
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let run: [u8; 16] = body[8..24].try_into().ok()?;
    let disks = u32::from_le_bytes(body[24..28].try_into().ok()?) as usize;
    let mut at = 28usize;
    let mut out = Vec::new();
    for _ in 0..disks {
        let n = u64::from_le_bytes(body.get(at..at.checked_add(8)?)?.try_into().ok()?);
        at += 8;
        let len = usize::try_from(n).ok()?.checked_mul(40)?;
        let entries = body.get(at..at.checked_add(len)?)?;
        at += len;
        out.push(
            entries
                .chunks_exact(40)
                .map(|e| {
                    (
                        u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                        e[8..].try_into().expect("32 bytes"),
                    )
                })
                .collect(),
        );
    }
    (at == body.len()).then_some((run, out))
}

/// A disk's kernel I/O counters (`/sys/dev/block/MAJ:MIN/stat`) at a clean stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCounters {
    pub writes: u64,
    pub write_sectors: u64,
    pub discards: u64,
    pub in_flight: u64,
}

/// `clean.json`: what a clean stop leaves for the next start.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CleanStop {
    pub version: u32,
    pub boot_id: String,
    pub disks: Vec<CleanDisk>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CleanDisk {
    pub name: String,
    pub size: u64,
    pub counters: DiskCounters,
    /// Dirty chunks as ascending `[start, end)` runs.
    pub dirty: Vec<(u64, u64)>,
}

impl CleanStop {
    /// Parses `clean.json`; `None` unless it is a version-1 record whose runs are well formed
    /// (ascending, non-empty, within the disk).
    pub fn parse(bytes: &[u8]) -> Option<CleanStop> {
        let c: CleanStop = serde_json::from_slice(bytes).ok()?;
        if c.version != 1 {
            return None;
        }
        for d in &c.disks {
            let chunks = d.size.div_ceil(crate::CHUNK_SIZE as u64);
            let mut prev = 0;
            for &(s, e) in &d.dirty {
                if s < prev || e <= s || e > chunks {
                    return None;
                }
                prev = e;
            }
        }
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_round_trips_and_every_truncation_or_flip_is_refused() {
        let cvs = vec![
            vec![(3, [9u8; 32]), (7, [8u8; 32])],
            vec![],
            vec![(1, [1; 32])],
        ];
        let b = encode_pending(&[4; 16], &cvs);
        assert_eq!(parse_pending(&b), Some(([4; 16], cvs)));
        for n in 0..b.len() {
            assert!(parse_pending(&b[..n]).is_none(), "cut at {n}");
        }
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x10;
            assert!(parse_pending(&x).is_none(), "flip at {i}");
        }
    }

    #[test]
    fn clean_stop_runs_must_be_ascending_and_inside_the_disk() {
        let mk = |dirty: Vec<(u64, u64)>| CleanStop {
            version: 1,
            boot_id: "b".into(),
            disks: vec![CleanDisk {
                name: "sda".into(),
                size: 10 * 65536,
                counters: DiskCounters {
                    writes: 1,
                    write_sectors: 8,
                    discards: 0,
                    in_flight: 0,
                },
                dirty,
            }],
        };
        let ok = serde_json::to_vec(&mk(vec![(0, 2), (5, 10)])).unwrap();
        assert!(CleanStop::parse(&ok).is_some());
        for bad in [vec![(5, 10), (0, 2)], vec![(3, 3)], vec![(0, 11)]] {
            assert!(CleanStop::parse(&serde_json::to_vec(&mk(bad)).unwrap()).is_none());
        }
    }
}
