//! What the agent keeps on disk between runs, besides its identity (docs/AGENT.md, *State*).
//!
//! - `maps/DISK.cv` (DISK: the replica's name): the chunk CVs of the disk as of the last run the
//!   process server acknowledged (header + 32 bytes per chunk), updated in place, entry by entry.
//!   The header binds the CVs to a store id, VM, stable disk identity and that run (`base`).
//! - `pending/RUN.bin`: the chunk CVs a tagged run will commit, per disk with the run it built on,
//!   written (and synced) *before* its tag is sent and folded into the maps once the tag is
//!   acknowledged. Found at start-up, the process server's `Holding` decides: folded if the
//!   server holds the run, its chunks made unknown if not.
//! - `clean.json`: written by a clean stop only — the chunks still dirty and each disk's kernel
//!   write counters. At start-up, if the boot and the counters are unchanged, nothing wrote to the
//!   disks while the agent was away, and the dirty set is all there is to send (no resync).
//!
//! Invariants: a map is trusted only if the process server says it holds exactly the map's base
//! run of that disk, in the same store, for the same VM and disk identity; a CV in a trusted map
//! is never newer than that run (so a chunk equal to it really is on the replica); a torn or
//! unreadable file is treated as "unknown", which only ever costs a re-send.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_format::agent::{encode_pending, parse_pending, CV_HEADER_LEN};
pub use ferry_format::agent::{CleanDisk, CleanStop, CvHeader, DiskCounters, PendingDisk, RunCvs};
use ferry_wire::NO_RUN;

use crate::cv::{Cv, UNKNOWN};
use crate::AgentError;

use crate::state_err as err;

fn sync_dir(dir: &Path) -> Result<(), AgentError> {
    ferry_durable::fsync_dir(dir).map_err(|e| err(dir, e))
}

const CV_HEADER: u64 = CV_HEADER_LEN as u64;

/// A disk's committed CV map, updated in place. Its header ([`CvHeader`]) says what the CVs
/// describe: a store, a VM, a disk identity and the last run of the disk the process server holds.
pub struct CvFile {
    path: PathBuf,
    file: File,
    header: CvHeader,
}

impl CvFile {
    pub fn path(state_dir: &Path, disk: &str) -> PathBuf {
        state_dir.join("maps").join(format!("{disk}.cv"))
    }

    /// Opens the map of replica `disk` (`size` bytes) and returns it with its CVs. A missing map,
    /// one made for another size, or a damaged one is replaced by an all-[`UNKNOWN`] one bound to
    /// nothing (an empty store id, VM and disk id, base [`NO_RUN`]).
    pub fn open(state_dir: &Path, disk: &str, size: u64) -> Result<(CvFile, Vec<Cv>), AgentError> {
        let path = Self::path(state_dir, disk);
        let chunks = size.div_ceil(crate::cv::CHUNK) as usize;
        if let Some((header, cvs)) = read_cv_file(&path, size, chunks) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| err(&path, e))?;
            return Ok((CvFile { path, file, header }, cvs));
        }
        let header = CvHeader {
            size,
            chunks: chunks as u64,
            base: NO_RUN,
            store: String::new(),
            vm: String::new(),
            disk_id: String::new(),
        };
        let file = create_cv_file(&path, &header)?;
        Ok((CvFile { path, file, header }, vec![UNKNOWN; chunks]))
    }

    /// What the map describes.
    pub fn header(&self) -> &CvHeader {
        &self.header
    }

    /// Replaces the map by an all-[`UNKNOWN`] one with `header` (durable on return).
    pub fn reset(&mut self, header: CvHeader) -> Result<(), AgentError> {
        self.file = create_cv_file(&self.path, &header)?;
        self.header = header;
        Ok(())
    }

    /// Sets the header. A change of the base run only (the common case: a commit) rewrites the
    /// header's last sector in place, which a power cut cannot tear (not yet durable: call
    /// [`CvFile::sync`]). A change of the first sector too (a version-2 map, or a new binding)
    /// would rewrite two sectors, which a power cut could tear into a header that fails its
    /// checksum (a full re-send): the map is then copied whole with the new header to a temporary
    /// file and renamed over (durable on return).
    pub fn set_header(&mut self, header: CvHeader) -> Result<(), AgentError> {
        let new = header.encode();
        let mut head = [0u8; 512];
        self.file
            .read_exact_at(&mut head, 0)
            .map_err(|e| err(&self.path, e))?;
        if head[..] == new[..512] {
            self.file
                .write_all_at(&new[512..], 512)
                .map_err(|e| err(&self.path, e))?;
        } else {
            self.file = copy_with_header(&self.path, &self.file, &new)?;
        }
        self.header = header;
        Ok(())
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
        ferry_durable::sync_data(&self.file).map_err(|e| err(&self.path, e))
    }
}

/// Writes a new all-unknown map (temp file, fsync, rename, directory fsync) and opens it.
fn create_cv_file(path: &Path, header: &CvHeader) -> Result<File, AgentError> {
    let dir = path.parent().expect("maps/ has a parent");
    ferry_durable::create_dir_durable(dir).map_err(|e| err(dir, e))?;
    let chunks = header.chunks as usize;
    replace_map(path, &header.encode(), |f, tmp| {
        let ones = vec![0xffu8; 32 * 4096];
        let mut left = chunks * 32;
        while left > 0 {
            let n = left.min(ones.len());
            f.write_all(&ones[..n]).map_err(|e| err(tmp, e))?;
            left -= n;
        }
        Ok(())
    })
}

/// Writes `header` and the CVs of `from` to a temporary file, syncs it and renames it over
/// `path` (directory synced); opens the result.
fn copy_with_header(path: &Path, from: &File, header: &[u8]) -> Result<File, AgentError> {
    let len = from.metadata().map_err(|e| err(path, e))?.len();
    replace_map(path, header, |f, tmp| {
        let mut buf = vec![0u8; 1 << 20];
        let mut at = CV_HEADER;
        while at < len {
            let n = buf.len().min((len - at) as usize);
            from.read_exact_at(&mut buf[..n], at)
                .map_err(|e| err(path, e))?;
            f.write_all(&buf[..n]).map_err(|e| err(tmp, e))?;
            at += n as u64;
        }
        Ok(())
    })
}

/// A map replaced whole: `header`, then what `body` writes, into `PATH.cv.tmp` (mode 0600), made
/// durable and renamed over `path`; the new file opened.
fn replace_map(
    path: &Path,
    header: &[u8],
    body: impl FnOnce(&mut File, &Path) -> Result<(), AgentError>,
) -> Result<File, AgentError> {
    let tmp = path.with_extension("cv.tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| err(&tmp, e))?;
        f.write_all(header).map_err(|e| err(&tmp, e))?;
        body(&mut f, &tmp)?;
    }
    ferry_durable::durable_rename(&tmp, path).map_err(|e| err(path, e))?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| err(path, e))
}

fn read_cv_file(path: &Path, size: u64, chunks: usize) -> Option<(CvHeader, Vec<Cv>)> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(map = %path.display(), error = %e, "cannot read the chunk map; every chunk is read and sent again");
            return None;
        }
    };
    let header = CvHeader::decode(&bytes);
    let ok = bytes.len() as u64 == CV_HEADER + chunks as u64 * 32
        && header
            .as_ref()
            .is_some_and(|h| h.size == size && h.chunks == chunks as u64);
    if !ok {
        tracing::warn!(map = %path.display(), "chunk map is for another disk size, of an older version or damaged; every chunk is read and sent again");
        return None;
    }
    Some((
        header.expect("checked"),
        bytes[CV_HEADER as usize..]
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect(),
    ))
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

/// A pending run as read back: its run id and CVs.
pub type PendingRun = ([u8; 16], RunCvs);

/// Every pending run left by an earlier process: (file, its run and CVs, or `None` if torn).
pub fn leftover_pending(state_dir: &Path) -> Vec<(PathBuf, Option<PendingRun>)> {
    let Ok(rd) = fs::read_dir(pending_dir(state_dir)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        let parsed = fs::read(&p).ok().and_then(|b| parse_pending(&b));
        out.push((p, parsed));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
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
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn cv_maps_update_in_place_keep_their_header_and_refuse_another_size() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, cvs) = CvFile::open(dir.path(), "sda", 5 * 65536 + 1).unwrap();
        assert!(cvs.len() == 6 && cvs.iter().all(|c| *c == UNKNOWN));
        assert_eq!(f.header().base, NO_RUN);
        f.write(&[(0, [1; 32]), (5, [2; 32])]).unwrap();
        let mut h = f.header().clone();
        h.base = [7; 16];
        h.store = "s1".into();
        h.vm = "web".into();
        h.disk_id = "serial:ABC".into();
        f.set_header(h.clone()).unwrap();
        f.sync().unwrap();
        drop(f);
        let (mut f, cvs) = CvFile::open(dir.path(), "sda", 5 * 65536 + 1).unwrap();
        assert_eq!(f.header(), &h);
        assert_eq!((cvs[0], cvs[1], cvs[5]), ([1; 32], UNKNOWN, [2; 32]));
        // A commit (the base only) rewrites the header's last sector in place, never its first;
        // a new binding (the first sector changes too) replaces the file by a copy.
        let p = CvFile::path(dir.path(), "sda");
        let (before, ino) = (fs::read(&p).unwrap(), fs::metadata(&p).unwrap().ino());
        h.base = [9; 16];
        f.set_header(h.clone()).unwrap();
        f.sync().unwrap();
        let after = fs::read(&p).unwrap();
        assert_eq!(before[..512], after[..512]);
        assert_ne!(before[512..1024], after[512..1024]);
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino, "in place");
        h.vm = "web-renamed".into();
        f.set_header(h.clone()).unwrap();
        assert_ne!(fs::metadata(&p).unwrap().ino(), ino, "a copy renamed over");
        f.write(&[(1, [3; 32])]).unwrap();
        f.sync().unwrap();
        drop(f);
        let (mut f, cvs) = CvFile::open(dir.path(), "sda", 5 * 65536 + 1).unwrap();
        assert_eq!(f.header(), &h);
        assert_eq!((cvs[0], cvs[1], cvs[5]), ([1; 32], [3; 32], [2; 32]));
        // A reset forgets every CV and takes the new binding.
        h.base = [8; 16];
        f.reset(h.clone()).unwrap();
        drop(f);
        let (f, cvs) = CvFile::open(dir.path(), "sda", 5 * 65536 + 1).unwrap();
        assert_eq!(f.header(), &h);
        assert!(cvs.iter().all(|c| *c == UNKNOWN));
        // Another size: a new, unbound map.
        let (f, cvs) = CvFile::open(dir.path(), "sda", 7 * 65536).unwrap();
        assert!(cvs.iter().all(|c| *c == UNKNOWN));
        assert_eq!(f.header().base, NO_RUN);
        assert!(f.header().store.is_empty());
        // A damaged header: unbound, unknown.
        drop(f);
        let p = CvFile::path(dir.path(), "sda");
        let mut b = fs::read(&p).unwrap();
        b[30] ^= 1;
        fs::write(&p, &b).unwrap();
        let (f, cvs) = CvFile::open(dir.path(), "sda", 7 * 65536).unwrap();
        assert!(cvs.iter().all(|c| *c == UNKNOWN) && f.header().store.is_empty());
    }

    #[test]
    fn pending_runs_round_trip_and_torn_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let run = [4u8; 16];
        let cvs = vec![
            PendingDisk {
                name: "sda".into(),
                base: [3; 16],
                cvs: vec![(3, [9u8; 32]), (7, [8u8; 32])],
            },
            PendingDisk {
                name: "sdb".into(),
                base: NO_RUN,
                cvs: vec![],
            },
        ];
        write_pending(dir.path(), &run, &cvs).unwrap();
        assert_eq!(read_pending(dir.path(), &run).unwrap(), cvs);
        let left = leftover_pending(dir.path());
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.as_ref().unwrap(), &(run, cvs));
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
