//! The mobility agent's own state files (docs/FORMAT.md, *Agent state*): the pending-run file and
//! the clean-stop record. Both are read back only by the agent that wrote them, but they decide
//! what is re-sent after a crash, so they are checksummed and parsed defensively: a torn or
//! damaged file reads as `None` (the agent then treats the chunks as unknown and re-sends them).

use serde::{Deserialize, Serialize};

/// Magic of `pending/RUN.bin` (version 2: disks by name, each with its base run).
pub const PENDING_MAGIC: &[u8; 8] = b"FERRYPN2";

/// One disk's part of a tagged run: the disk (its replica name), the run its records built on
/// (the map's base when the run began) and the chunk CVs the run commits, `(chunk, cv)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingDisk {
    pub name: String,
    pub base: [u8; 16],
    pub cvs: Vec<(u64, [u8; 32])>,
}

/// The chunk CVs one tagged run commits, per disk.
pub type RunCvs = Vec<PendingDisk>;

/// `MAGIC(8) RUN(16) DISKS(u32) { NAME_LEN(u16) NAME BASE(16) COUNT(u64) { CHUNK(u64) CV(32) }* }*
/// BLAKE3(32)`, little-endian.
pub fn encode_pending(run: &[u8; 16], cvs: &RunCvs) -> Vec<u8> {
    let mut buf = Vec::with_capacity(
        60 + cvs
            .iter()
            .map(|d| 26 + d.name.len() + d.cvs.len() * 40)
            .sum::<usize>(),
    );
    buf.extend_from_slice(PENDING_MAGIC);
    buf.extend_from_slice(run);
    buf.extend_from_slice(&(cvs.len() as u32).to_le_bytes());
    for d in cvs {
        buf.extend_from_slice(&(d.name.len() as u16).to_le_bytes());
        buf.extend_from_slice(d.name.as_bytes());
        buf.extend_from_slice(&d.base);
        buf.extend_from_slice(&(d.cvs.len() as u64).to_le_bytes());
        for (c, cv) in &d.cvs {
            buf.extend_from_slice(&c.to_le_bytes());
            buf.extend_from_slice(cv);
        }
    }
    let sum = blake3::hash(&buf);
    buf.extend_from_slice(sum.as_bytes());
    buf
}

/// Parses a pending-run file; `None` if it is torn, damaged, of another version or not one.
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
        let nl = u16::from_le_bytes(body.get(at..at.checked_add(2)?)?.try_into().ok()?) as usize;
        at += 2;
        let name = std::str::from_utf8(body.get(at..at.checked_add(nl)?)?)
            .ok()?
            .to_owned();
        at += nl;
        let base: [u8; 16] = body.get(at..at.checked_add(16)?)?.try_into().ok()?;
        at += 16;
        let n = u64::from_le_bytes(body.get(at..at.checked_add(8)?)?.try_into().ok()?);
        at += 8;
        let len = usize::try_from(n).ok()?.checked_mul(40)?;
        let entries = body.get(at..at.checked_add(len)?)?;
        at += len;
        out.push(PendingDisk {
            name,
            base,
            cvs: entries
                .chunks_exact(40)
                .map(|e| {
                    (
                        u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                        e[8..].try_into().expect("32 bytes"),
                    )
                })
                .collect(),
        });
    }
    (at == body.len()).then_some((run, out))
}

/// Magic of `maps/DISK.cv` (version 3: the header binds the map to a store, VM, disk and run, and
/// the run a commit changes lies in the header's last sector with the checksum).
pub const CV_MAGIC: &[u8; 8] = b"FERRYCV3";
/// Magic of a version-2 chunk map (the base run in the first sector): still read, never written.
pub const CV_MAGIC_V2: &[u8; 8] = b"FERRYCV2";
/// Length of a chunk map's header; the CVs follow, 32 bytes per chunk.
pub const CV_HEADER_LEN: usize = 1024;
/// Where the base run lies in a version-3 header: in its last 512-byte sector, with the checksum,
/// so a commit (which changes the base only) rewrites one sector, which a power cut cannot tear.
pub const CV_BASE_AT: usize = CV_HEADER_LEN - 48;

/// The header of a chunk map: what its CVs describe. The CVs are those of the disk whose stable
/// identity is `disk_id`, as replicated for `vm` into the store `store`, as of run `base` (the
/// last run of the disk the agent knows the process server holds; all zeros: none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CvHeader {
    pub size: u64,
    pub chunks: u64,
    pub base: [u8; 16],
    pub store: String,
    pub vm: String,
    pub disk_id: String,
}

impl CvHeader {
    /// `MAGIC(8) SIZE(8) CHUNKS(8) { LEN(u16) UTF-8 }×3 (store, vm, disk id), zeros to byte 976,
    /// BASE(16), BLAKE3(32) of bytes 0..992`. Strings longer than 255 bytes are cut (they never
    /// are: the wire limits them). A commit changes only BASE and the checksum: bytes 976..1024,
    /// all in the header's second sector.
    pub fn encode(&self) -> [u8; CV_HEADER_LEN] {
        let mut b = [0u8; CV_HEADER_LEN];
        b[..8].copy_from_slice(CV_MAGIC);
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.chunks.to_le_bytes());
        let mut at = 24;
        for s in [&self.store, &self.vm, &self.disk_id] {
            let mut n = s.len().min(255);
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            b[at..at + 2].copy_from_slice(&(n as u16).to_le_bytes());
            b[at + 2..at + 2 + n].copy_from_slice(&s.as_bytes()[..n]);
            at += 2 + n;
        }
        b[CV_BASE_AT..CV_BASE_AT + 16].copy_from_slice(&self.base);
        let sum = blake3::hash(&b[..CV_HEADER_LEN - 32]);
        b[CV_HEADER_LEN - 32..].copy_from_slice(sum.as_bytes());
        b
    }

    /// Parses a header (version 3, or version 2 as the previous agent wrote it); `None` if it is
    /// torn, damaged, of another version or not one.
    pub fn decode(b: &[u8]) -> Option<CvHeader> {
        let b = b.get(..CV_HEADER_LEN)?;
        let (strings_at, base_at, end) = match &b[..8] {
            m if m == CV_MAGIC => (24, CV_BASE_AT, CV_BASE_AT),
            m if m == CV_MAGIC_V2 => (40, 24, CV_HEADER_LEN - 32),
            _ => return None,
        };
        if blake3::hash(&b[..CV_HEADER_LEN - 32]).as_bytes() != &b[CV_HEADER_LEN - 32..] {
            return None;
        }
        let mut at = strings_at;
        let mut strs = Vec::new();
        for _ in 0..3 {
            let n = u16::from_le_bytes(b[at..at + 2].try_into().ok()?) as usize;
            if n > 255 {
                return None;
            }
            strs.push(std::str::from_utf8(&b[at + 2..at + 2 + n]).ok()?.to_owned());
            at += 2 + n;
        }
        if b[at..end].iter().any(|x| *x != 0) {
            return None;
        }
        let disk_id = strs.pop()?;
        let vm = strs.pop()?;
        let store = strs.pop()?;
        Some(CvHeader {
            size: u64::from_le_bytes(b[8..16].try_into().ok()?),
            chunks: u64::from_le_bytes(b[16..24].try_into().ok()?),
            base: b[base_at..base_at + 16].try_into().ok()?,
            store,
            vm,
            disk_id,
        })
    }
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
        let d = |name: &str, base: u8, cvs: Vec<(u64, [u8; 32])>| PendingDisk {
            name: name.into(),
            base: [base; 16],
            cvs,
        };
        let cvs = vec![
            d("sda", 1, vec![(3, [9u8; 32]), (7, [8u8; 32])]),
            d("sdb", 0, vec![]),
            d("data-1", 2, vec![(1, [1; 32])]),
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
