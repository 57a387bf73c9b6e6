//! What the agent keeps on disk between runs, besides its identity (docs/AGENT.md, *State*).
//!
//! - `maps/DISK.cv`: the chunk CVs of the disk as of the last point the process server
//!   acknowledged (header + 32 bytes per chunk). Updated in place, entry by entry.
//! - `pending/RUN.bin`: the chunk CVs a tagged run will commit, written (and synced) *before* its
//!   tag is sent and folded into the maps once the tag is acknowledged. Found at start-up it means
//!   "this run may or may not be a point": its chunks become unknown, so they are read and sent.
//! - `clean.json`: written by a clean stop only — the chunks still dirty and each disk's kernel
//!   write counters. At start-up, if the boot and the counters are unchanged, nothing wrote to the
//!   disks while the agent was away, and the dirty set is all there is to send (no resync).
//!
//! Invariants: a CV in a map is never newer than what the process server holds as the last
//! point (so a chunk equal to it really is on the replica); a torn or unreadable file is treated
//! as "unknown", which only ever costs a re-send.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_format::agent::{encode_pending, parse_pending};
pub use ferry_format::agent::{CleanDisk, CleanStop, DiskCounters, RunCvs};

use crate::cv::{Cv, UNKNOWN};
use crate::AgentError;

const CV_MAGIC: &[u8; 8] = b"FERRYCV1";
const CV_HEADER: u64 = 64;

use crate::state_err as err;

fn sync_dir(dir: &Path) -> Result<(), AgentError> {
    ferry_durable::fsync_dir(dir).map_err(|e| err(dir, e))
}

/// A disk's committed CV map, updated in place.
pub struct CvFile {
    path: PathBuf,
    file: File,
}

impl CvFile {
    pub fn path(state_dir: &Path, disk: &str) -> PathBuf {
        state_dir.join("maps").join(format!("{disk}.cv"))
    }

    /// Opens the map of a disk of `size` bytes and returns it with its CVs. A missing map, or one
    /// made for another size, is replaced by an all-[`UNKNOWN`] one (and `fresh` says so).
    pub fn open(
        state_dir: &Path,
        disk: &str,
        size: u64,
    ) -> Result<(CvFile, Vec<Cv>, bool), AgentError> {
        let path = Self::path(state_dir, disk);
        let chunks = size.div_ceil(crate::cv::CHUNK) as usize;
        if let Some(cvs) = read_cv_file(&path, size, chunks) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| err(&path, e))?;
            return Ok((CvFile { path, file }, cvs, false));
        }
        let dir = path.parent().expect("maps/ has a parent");
        ferry_durable::create_dir_durable(dir).map_err(|e| err(dir, e))?;
        let mut header = [0u8; CV_HEADER as usize];
        header[..8].copy_from_slice(CV_MAGIC);
        header[8..16].copy_from_slice(&size.to_le_bytes());
        header[16..24].copy_from_slice(&(chunks as u64).to_le_bytes());
        let tmp = path.with_extension("cv.tmp");
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| err(&tmp, e))?;
            f.write_all(&header).map_err(|e| err(&tmp, e))?;
            let ones = vec![0xffu8; 32 * 4096];
            let mut left = chunks * 32;
            while left > 0 {
                let n = left.min(ones.len());
                f.write_all(&ones[..n]).map_err(|e| err(&tmp, e))?;
                left -= n;
            }
        }
        ferry_durable::durable_rename(&tmp, &path).map_err(|e| err(&path, e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| err(&path, e))?;
        Ok((CvFile { path, file }, vec![UNKNOWN; chunks], true))
    }

    /// Writes `entries` in place (not yet durable: call [`CvFile::sync`]).
    pub fn write(&self, entries: &[(u64, Cv)]) -> Result<(), AgentError> {
        for (chunk, cv) in entries {
            self.file
                .write_all_at(cv, CV_HEADER + chunk * 32)
                .map_err(|e| err(&self.path, e))?;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<(), AgentError> {
        self.file.sync_data().map_err(|e| err(&self.path, e))
    }
}

fn read_cv_file(path: &Path, size: u64, chunks: usize) -> Option<Vec<Cv>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(map = %path.display(), error = %e, "cannot read the chunk map; every chunk is read and compared again");
            return None;
        }
    };
    let ok = bytes.len() as u64 == CV_HEADER + chunks as u64 * 32
        && &bytes[..8] == CV_MAGIC
        && bytes[8..16] == size.to_le_bytes()
        && bytes[16..24] == (chunks as u64).to_le_bytes();
    if !ok {
        tracing::warn!(map = %path.display(), "chunk map is for another disk size or damaged; every chunk is read and compared again");
        return None;
    }
    Some(
        bytes[CV_HEADER as usize..]
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect(),
    )
}

fn pending_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pending")
}

fn pending_path(state_dir: &Path, run: &[u8; 16]) -> PathBuf {
    pending_dir(state_dir).join(format!("{}.bin", hex::encode(run)))
}

/// Writes (durably) what run `run` will commit, before its tag is sent.
pub fn write_pending(state_dir: &Path, run: &[u8; 16], cvs: &RunCvs) -> Result<(), AgentError> {
    let dir = pending_dir(state_dir);
    ferry_durable::create_dir_durable(&dir).map_err(|e| err(&dir, e))?;
    let path = pending_path(state_dir, run);
    // Temp + fsync + rename + fsync dir: the file is whole or absent, never torn.
    ferry_wire::write_private(&path, &encode_pending(run, cvs)).map_err(|e| err(&path, e))
}

/// Reads the pending file of `run` (written by this process).
pub fn read_pending(state_dir: &Path, run: &[u8; 16]) -> Result<RunCvs, AgentError> {
    let path = pending_path(state_dir, run);
    let bytes = fs::read(&path).map_err(|e| err(&path, e))?;
    match parse_pending(&bytes) {
        Some((r, cvs)) if r == *run => Ok(cvs),
        _ => Err(err(&path, "damaged pending-run file")),
    }
}

pub fn remove_pending(state_dir: &Path, run: &[u8; 16]) -> Result<(), AgentError> {
    let path = pending_path(state_dir, run);
    fs::remove_file(&path).map_err(|e| err(&path, e))?;
    sync_dir(&pending_dir(state_dir))
}

/// Every pending run left by an earlier process: (file, its CVs or `None` if torn).
pub fn leftover_pending(state_dir: &Path) -> Vec<(PathBuf, Option<RunCvs>)> {
    let Ok(rd) = fs::read_dir(pending_dir(state_dir)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        let parsed = fs::read(&p)
            .ok()
            .and_then(|b| parse_pending(&b))
            .map(|(_, c)| c);
        out.push((p, parsed));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Removes (durably) the map of every disk not named in `keep`. For a pending run found at
/// start-up that may cover disks no longer protected: their maps could claim a CV the replica
/// lacks, or lack one it holds. A removed map only costs one full send if the disk comes back.
pub fn forget_maps_except(state_dir: &Path, keep: &[&str]) -> Result<(), AgentError> {
    let dir = state_dir.join("maps");
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(&dir, e)),
    };
    for entry in rd {
        let path = entry.map_err(|e| err(&dir, e))?.path();
        if path.extension().and_then(|x| x.to_str()) != Some("cv") {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if keep.contains(&name) {
            continue;
        }
        tracing::warn!(map = %path.display(), "a run that may be a point may cover this disk, which is no longer protected: its chunk map is dropped (one full send if it is protected again)");
        ferry_durable::remove_durable(&path).map_err(|e| err(&path, e))?;
    }
    Ok(())
}

/// The counters of the block device at `path`, `None` for anything else.
pub fn disk_counters(path: &Path) -> Option<DiskCounters> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let text = fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/stat")).ok()?;
    let f: Vec<u64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Some(DiskCounters {
        writes: *f.get(4)?,
        write_sectors: *f.get(6)?,
        in_flight: *f.get(8)?,
        discards: f.get(11).copied().unwrap_or(0),
    })
}

pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn clean_path(state_dir: &Path) -> PathBuf {
    state_dir.join("clean.json")
}

pub fn save_clean(state_dir: &Path, c: &CleanStop) -> Result<(), AgentError> {
    let path = clean_path(state_dir);
    let bytes = serde_json::to_vec(c).map_err(|e| err(&path, e))?;
    ferry_wire::write_private(&path, &bytes).map_err(|e| err(&path, e))
}

/// Takes the clean-stop record (it is removed durably: from now on a crash is an unclean stop).
pub fn take_clean(state_dir: &Path) -> Result<Option<CleanStop>, AgentError> {
    let path = clean_path(state_dir);
    let mut s = String::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_string(&mut s).map_err(|e| err(&path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(&path, e)),
    }
    fs::remove_file(&path).map_err(|e| err(&path, e))?;
    sync_dir(state_dir)?;
    match CleanStop::parse(s.as_bytes()) {
        Some(c) => Ok(Some(c)),
        None => {
            tracing::warn!(file = %path.display(), "unreadable clean-stop record; treating the last stop as unclean");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cv_maps_update_in_place_and_refuse_another_size() {
        let dir = tempfile::tempdir().unwrap();
        let (f, cvs, fresh) = CvFile::open(dir.path(), "sda", 5 * 65536 + 1).unwrap();
        assert!(fresh && cvs.len() == 6 && cvs.iter().all(|c| *c == UNKNOWN));
        f.write(&[(0, [1; 32]), (5, [2; 32])]).unwrap();
        f.sync().unwrap();
        drop(f);
        let (_, cvs, fresh) = CvFile::open(dir.path(), "sda", 5 * 65536 + 1).unwrap();
        assert!(!fresh);
        assert_eq!((cvs[0], cvs[1], cvs[5]), ([1; 32], UNKNOWN, [2; 32]));
        let (_, cvs, fresh) = CvFile::open(dir.path(), "sda", 7 * 65536).unwrap();
        assert!(fresh && cvs.iter().all(|c| *c == UNKNOWN));
    }

    #[test]
    fn pending_runs_round_trip_and_torn_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let run = [4u8; 16];
        let cvs = vec![vec![(3, [9u8; 32]), (7, [8u8; 32])], vec![]];
        write_pending(dir.path(), &run, &cvs).unwrap();
        assert_eq!(read_pending(dir.path(), &run).unwrap(), cvs);
        let left = leftover_pending(dir.path());
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.as_ref().unwrap(), &cvs);
        // Every truncation is torn, never misread.
        let bytes = fs::read(&left[0].0).unwrap();
        for n in 0..bytes.len() {
            assert!(parse_pending(&bytes[..n]).is_none(), "cut at {n}");
        }
        remove_pending(dir.path(), &run).unwrap();
        assert!(leftover_pending(dir.path()).is_empty());
    }

    #[test]
    fn clean_stop_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = CleanStop {
            version: 1,
            boot_id: boot_id(),
            disks: vec![CleanDisk {
                name: "sda".into(),
                size: 1 << 20,
                counters: DiskCounters {
                    writes: 1,
                    write_sectors: 8,
                    discards: 0,
                    in_flight: 0,
                },
                dirty: vec![(2, 5)],
            }],
        };
        save_clean(dir.path(), &c).unwrap();
        let back = take_clean(dir.path()).unwrap().unwrap();
        assert_eq!(back.disks[0].dirty, vec![(2, 5)]);
        assert!(take_clean(dir.path()).unwrap().is_none());
    }
}
