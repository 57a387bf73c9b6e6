//! Crash-state recorder: what a power cut could leave of files written through this crate.
//!
//! SIGKILL keeps the page cache, so a kill test cannot see a missing fsync, and this kernel has no
//! dm-flakey / dm-log-writes. Instead, while recording is on ([`start`]), every sync that goes
//! through [`crate::sync_file`], [`crate::sync_data`] and [`crate::fsync_dir`] is recorded:
//! - a file sync records the file's whole content at that moment, keyed by inode identity (device,
//!   inode, birth time), so it follows renames;
//! - a directory sync records the directory's entries (name → inode identity) at that moment.
//!
//! [`materialize`] then builds the crash state in which **nothing that was not synced survived**:
//! a directory holds exactly the entries of its last sync (none if it was never synced), a file
//! holds exactly its content at its last sync (empty if it was never synced). That is a legal state
//! after a power cut on a POSIX file system, and the harshest one, so any missing `fsync`,
//! `fdatasync` or directory `fsync` on a durable path shows up as lost or stale data in it. Tests
//! take such states at every sync ([`set_hook`]) and check their invariants on each.
//!
//! Off by default: when recording is off the cost is one relaxed atomic load per sync.
//! Test-only in spirit: it holds copies of synced files in memory.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// Identity of a file or directory: device, inode, birth time (inode numbers are reused).
pub type Ident = (u64, u64, Option<SystemTime>);

type Hook = Box<dyn FnMut(u64) + Send>;

#[derive(Default)]
struct Recorded {
    files: HashMap<Ident, Vec<u8>>,
    dirs: HashMap<Ident, Vec<(String, Ident, bool)>>,
    syncs: u64,
}

static ON: AtomicBool = AtomicBool::new(false);
static REC: Mutex<Option<Recorded>> = Mutex::new(None);
static HOOK: Mutex<Option<Hook>> = Mutex::new(None);

fn ident(m: &fs::Metadata) -> Ident {
    (m.dev(), m.ino(), m.created().ok())
}

/// Starts recording (clearing anything recorded before).
pub fn start() {
    *REC.lock().unwrap_or_else(|e| e.into_inner()) = Some(Recorded::default());
    ON.store(true, Ordering::SeqCst);
}

/// Stops recording; what was recorded stays available to [`materialize`].
pub fn stop() {
    ON.store(false, Ordering::SeqCst);
}

/// Calls `hook(n)` after the n-th recorded sync (outside the recorder's lock). The hook runs on
/// the syncing thread, in the middle of the code under test: it should only call [`materialize`].
pub fn set_hook(hook: Option<Hook>) {
    *HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

fn after_sync() {
    let n = {
        let mut r = REC.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = r.as_mut() else { return };
        r.syncs += 1;
        r.syncs
    };
    if let Some(h) = HOOK.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        h(n);
    }
}

pub(crate) fn file_synced(f: &File) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let Ok(m) = f.metadata() else { return };
    if !m.is_file() {
        return;
    }
    // The fd may be write-only: read the same inode through /proc.
    let mut data = Vec::new();
    let ok = File::open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .and_then(|mut r| r.read_to_end(&mut data))
        .is_ok();
    if !ok {
        return;
    }
    if let Some(r) = REC.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        r.files.insert(ident(&m), data);
    }
    after_sync();
}

pub(crate) fn dir_synced(dir: &Path) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let Ok(m) = fs::metadata(dir) else { return };
    let mut entries = Vec::new();
    if let Ok(it) = fs::read_dir(dir) {
        for e in it.flatten() {
            if let (Ok(md), Some(name)) = (e.metadata(), e.file_name().to_str()) {
                entries.push((name.to_owned(), ident(&md), md.is_dir()));
            }
        }
    }
    if let Some(r) = REC.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        r.dirs.insert(ident(&m), entries);
    }
    after_sync();
}

/// Number of syncs recorded so far.
pub fn syncs() -> u64 {
    REC.lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or(0, |r| r.syncs)
}

/// Writes into `out` (created) the crash state of the directory `root` (see the module doc).
/// `root` itself must exist; its recorded entries decide what is in it.
pub fn materialize(root: &Path, out: &Path) -> io::Result<()> {
    let root_id = ident(&fs::metadata(root)?);
    let rec = REC.lock().unwrap_or_else(|e| e.into_inner());
    let empty = Recorded::default();
    let rec = rec.as_ref().unwrap_or(&empty);
    fs::create_dir_all(out)?;
    build(rec, &root_id, out)
}

fn build(rec: &Recorded, dir: &Ident, out: &Path) -> io::Result<()> {
    let Some(entries) = rec.dirs.get(dir) else {
        return Ok(()); // never synced: no entry of it is durable
    };
    for (name, id, is_dir) in entries {
        let p = out.join(name);
        if *is_dir {
            fs::create_dir(&p)?;
            build(rec, id, &p)?;
        } else {
            fs::write(&p, rec.files.get(id).map(Vec::as_slice).unwrap_or(&[]))?;
        }
    }
    Ok(())
}

/// What [`take_states`] collects: each crash state's directory, with what the test knew then.
pub type States<T> = std::sync::Arc<Mutex<Vec<(std::path::PathBuf, T)>>>;

/// Starts recording and, after every sync, materializes the crash state of `root` into a new
/// directory under `into`, paired with `known()` (what the test had acknowledged at that moment).
/// Stop with [`finish`]. `root` is created here, so its own entries are recorded from the start.
pub fn take_states<T: Send + 'static>(
    root: &Path,
    into: &Path,
    known: impl Fn() -> T + Send + 'static,
) -> io::Result<States<T>> {
    fs::create_dir_all(into)?;
    start();
    fs::create_dir(root)?;
    crate::fsync_dir(root)?;
    let states: States<T> = Default::default();
    let (root, into, out) = (root.to_owned(), into.to_owned(), states.clone());
    set_hook(Some(Box::new(move |n| {
        let dir = into.join(format!("{n:05}"));
        if let Err(e) = materialize(&root, &dir) {
            panic!("cannot materialize crash state {}: {e}", dir.display());
        }
        let k = known();
        out.lock().unwrap_or_else(|e| e.into_inner()).push((dir, k));
    })));
    Ok(states)
}

/// Stops [`take_states`] and returns the states taken.
pub fn finish<T: Clone>(states: &States<T>) -> Vec<(std::path::PathBuf, T)> {
    set_hook(None);
    stop();
    states.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
