//! Crash-state recorder: what a power cut could leave of files written through this crate.
//!
//! SIGKILL keeps the page cache, so a kill test cannot see a missing fsync, and this kernel has no
//! dm-flakey / dm-log-writes. Instead, while recording is on ([`start`]), every sync that goes
//! through [`crate::sync_file`], [`crate::sync_data`], [`crate::sync_data_appended`] and
//! [`crate::fsync_dir`] is recorded:
//! - a file sync records the file's whole content at that moment (`sync_data_appended`: only the
//!   prefix it was to make durable), keyed by inode identity (device, inode, birth time), so it
//!   follows renames;
//! - a directory sync records the directory's entries (name → inode identity) at that moment.
//!
//! [`materialize`] then builds the crash state in which **nothing that was not synced survived**:
//! a directory holds exactly the entries of its last sync (none if it was never synced), a file
//! holds exactly its content at its last sync (empty if it was never synced). That is a legal state
//! after a power cut on a POSIX file system, and the harshest one, so any missing `fsync`,
//! `fdatasync` or directory `fsync` on a durable path shows up as lost or stale data in it. Tests
//! take such states at every sync ([`set_hook`]) and check their invariants on each.
//!
//! **Torn and reordered writes** ([`set_tearing`]): between two syncs of a file, the kernel may
//! write its dirty pages back in any order, and a power cut may land in the middle, so what the
//! disk holds of a file whose sync was in flight is *any mix*, sector by sector (512 bytes, the
//! unit a disk writes atomically), of its last synced content and its new content, with either
//! length. Just before each file sync completes, the recorder also takes `samples` such states
//! (random, seeded: the same run takes the same states) in which a random subset of the changed
//! sectors reached the disk, and the file's length is its old one, its new one or, for an append,
//! a sector boundary in between. They catch code that relies on the order of writes between two
//! syncs (a header naming data that was written, but not synced, before it).
//!
//! Not generated: intermediate versions of a sector written more than once between two syncs (only
//! its last content is known at the sync), and a file torn while *another* file's sync completes
//! (its unsynced writes are dropped whole there). The random generator is process-wide: the same
//! states come back only if the syncs happen in the same order.
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

/// Called with the name of each crash state as it can be taken: `"00012"` right after the 12th
/// sync, `"00012-torn1"` for a torn state taken while the 12th sync was in flight.
type Hook = Box<dyn FnMut(&str) + Send>;

/// The unit a disk writes atomically: a torn state mixes old and new content in these.
pub const SECTOR: usize = 512;

#[derive(Default)]
struct Recorded {
    files: HashMap<Ident, Vec<u8>>,
    dirs: HashMap<Ident, Vec<(String, Ident, bool)>>,
    syncs: u64,
    /// While a torn state is being taken: the file whose sync is in flight, with the mix of its
    /// old and new content that reached the disk.
    overlay: Option<(Ident, Vec<u8>)>,
    tear_samples: u32,
    rng: u64,
}

static ON: AtomicBool = AtomicBool::new(false);
static REC: Mutex<Option<Recorded>> = Mutex::new(None);
static HOOK: Mutex<Option<Hook>> = Mutex::new(None);
/// Only syncs of files and directories under this path are recorded (tests in one process run
/// in parallel: another test's syncs are not this test's crash states, and its thread must never
/// run this test's hook).
static ROOT: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);
/// Numbers torn states uniquely (syncs on several threads may be in flight at once).
static TORN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records only what lies under `root` (canonical path), or everything with `None`.
pub fn set_root(root: Option<&Path>) {
    *ROOT.lock().unwrap_or_else(|e| e.into_inner()) =
        root.map(|r| r.canonicalize().unwrap_or_else(|_| r.to_owned()));
}

fn under_root(p: &Path) -> bool {
    match ROOT.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        None => true,
        Some(r) => p.starts_with(r),
    }
}

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

/// Sets how many torn states (see the module doc) are taken while each file sync is in flight;
/// 0 (the default after [`start`]) takes none.
pub fn set_tearing(samples: u32) {
    if let Some(r) = REC.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        r.tear_samples = samples;
    }
}

/// Calls `hook(name)` after the n-th recorded sync, `name` being `n` in five digits, and, with
/// [`set_tearing`], for each torn state while a file sync is in flight (outside the recorder's
/// lock). The hook runs on the syncing thread, in the middle of the code under test: it should only
/// call [`materialize`].
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
        h(&format!("{n:05}"));
    }
}

fn next_random(r: &mut Recorded) -> u64 {
    // splitmix64: deterministic, so a failing torn state is the same on every run.
    r.rng = r.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = r.rng;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One torn mix of `old` and `new`: a length between the two (either end, or a sector boundary
/// in between: an append cut short), then each changed sector below it from `new` or `old`, never
/// the old content whole nor the new one whole.
fn tear(r: &mut Recorded, old: &[u8], new: &[u8], changed: &[usize]) -> Vec<u8> {
    let (lo, hi) = (old.len().min(new.len()), old.len().max(new.len()));
    let len = match next_random(r) % 4 {
        0 => old.len(),
        1 => new.len(),
        _ if hi - lo > SECTOR => {
            // A sector boundary strictly between the two lengths.
            let first = lo.div_ceil(SECTOR);
            let last = (hi - 1) / SECTOR;
            if last > first {
                (first + (next_random(r) as usize) % (last - first)) * SECTOR + SECTOR
            } else {
                new.len()
            }
        }
        _ => new.len(),
    };
    let below: Vec<usize> = changed
        .iter()
        .copied()
        .filter(|s| s * SECTOR < len)
        .collect();
    let mut out = old.to_vec();
    out.resize(hi, 0);
    let take = |out: &mut Vec<u8>, s: usize| {
        let (a, b) = (s * SECTOR, ((s + 1) * SECTOR).min(hi));
        for (k, byte) in out[a..b].iter_mut().enumerate() {
            *byte = new.get(a + k).copied().unwrap_or(0);
        }
    };
    if !below.is_empty() {
        // Half the sectors each time; one stays old (unless it is the only one and the length
        // already differs from both ends), and at least one comes from `new`.
        let keep = (next_random(r) as usize) % below.len();
        let mut took = 0;
        for (i, &s) in below.iter().enumerate() {
            if (i != keep || below.len() == 1) && next_random(r) & 1 == 1 {
                take(&mut out, s);
                took += 1;
            }
        }
        if took == 0 {
            take(&mut out, below[(keep + 1) % below.len()]);
        }
    }
    out.truncate(len);
    out
}

/// Before a file's sync is recorded: its torn states, if tearing is on, the file is reachable
/// from a synced directory and at least two of its sectors changed since its last sync.
fn take_torn(id: Ident, new: &[u8]) {
    let mut mixes = Vec::new();
    let n = {
        let mut g = REC.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = g.as_mut() else { return };
        if r.tear_samples == 0 || !r.dirs.values().any(|es| es.iter().any(|e| e.1 == id)) {
            return;
        }
        let old = r.files.get(&id).cloned().unwrap_or_default();
        let sectors = old.len().max(new.len()).div_ceil(SECTOR);
        let changed: Vec<usize> = (0..sectors)
            .filter(|s| {
                let (a, b) = (s * SECTOR, (s + 1) * SECTOR);
                let part = |v: &[u8]| v.get(a.min(v.len())..b.min(v.len())).map(<[u8]>::to_vec);
                part(&old) != part(new)
            })
            .collect();
        // A change of length is one more thing a power cut may or may not have kept.
        if changed.len() + usize::from(old.len() != new.len()) < 2 {
            return; // old or new whole: the plain states already cover both
        }
        for _ in 0..r.tear_samples {
            let m = tear(r, &old, new, &changed);
            // A mix equal to either whole is a plain state: not taken again.
            if m != old && m != new {
                mixes.push(m);
            }
        }
        r.syncs + 1
    };
    for m in mixes {
        // The overlay is set only while the hook lock is held: no other thread's state (plain or
        // torn) is taken with it.
        let mut hook = HOOK.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = hook.as_mut() else { break };
        if let Some(r) = REC.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            r.overlay = Some((id, m));
        }
        let t = TORN.fetch_add(1, Ordering::SeqCst);
        h(&format!("{n:05}-torn{t}"));
        if let Some(r) = REC.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            r.overlay = None;
        }
    }
}

/// `upto`: only that many bytes of the file were to be made durable (the rest is being appended
/// by another thread), so only they are recorded.
pub(crate) fn file_synced(f: &File, upto: Option<u64>) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let Ok(m) = f.metadata() else { return };
    if !m.is_file() {
        return;
    }
    match fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())) {
        Ok(p) if under_root(&p) => {}
        _ => return,
    }
    // The fd may be write-only: read the same inode through /proc.
    let mut data = Vec::new();
    let ok = File::open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .and_then(|mut r| r.read_to_end(&mut data))
        .is_ok();
    if !ok {
        return;
    }
    if let Some(n) = upto {
        data.truncate(n as usize);
    }
    take_torn(ident(&m), &data);
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
    if !under_root(&dir.canonicalize().unwrap_or_else(|_| dir.to_owned())) {
        return;
    }
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
            let data = match &rec.overlay {
                Some((o, mix)) if o == id => Some(mix),
                _ => rec.files.get(id),
            };
            fs::write(&p, data.map(Vec::as_slice).unwrap_or(&[]))?;
        }
    }
    Ok(())
}

/// What [`take_states`] collects: each crash state's directory, with what the test knew then.
pub type States<T> = std::sync::Arc<Mutex<Vec<(std::path::PathBuf, T)>>>;

/// Starts recording and, after every sync (and, with `torn` > 0, that many torn states while each
/// file sync is in flight: [`set_tearing`]), materializes the crash state of `root` into a new
/// directory under `into`, paired with `known()` (what the test had acknowledged at that moment).
/// Stop with [`finish`]. `root` is created here, so its own entries are recorded from the start.
pub fn take_states<T: Send + 'static>(
    root: &Path,
    into: &Path,
    torn: u32,
    known: impl Fn() -> T + Send + 'static,
) -> io::Result<States<T>> {
    fs::create_dir_all(into)?;
    fs::create_dir(root)?;
    // The root first: from the start, only syncs under it are recorded.
    set_root(Some(root));
    start();
    set_tearing(torn);
    crate::fsync_dir(root)?;
    let states: States<T> = Default::default();
    let (root, into, out) = (root.to_owned(), into.to_owned(), states.clone());
    set_hook(Some(Box::new(move |name: &str| {
        let dir = into.join(name);
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
    set_root(None);
    states.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Torn states mix the old and new content sector by sector, never all of one side, and only
    /// while the sync is in flight; the plain states hold exactly the synced content.
    #[test]
    fn torn_states_mix_old_and_new_sectors_of_a_file_whose_sync_is_in_flight() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let states = take_states(&root, &d.path().join("crashes"), 8, || ()).unwrap();
        let p = root.join("f");
        let f = File::create(&p).unwrap();
        f.write_all_at(&[1u8; 4 * SECTOR], 0).unwrap();
        crate::sync_file(&f).unwrap();
        crate::fsync_dir(&root).unwrap();
        // Three sectors change, and the file grows by one.
        for s in [0usize, 2, 3] {
            f.write_all_at(&[2u8; SECTOR], (s * SECTOR) as u64).unwrap();
        }
        f.write_all_at(&[3u8; SECTOR], (4 * SECTOR) as u64).unwrap();
        crate::sync_data(&f).unwrap();
        let taken = finish(&states);
        let old = [1u8; 4 * SECTOR].to_vec();
        let new = fs::read(&p).unwrap();
        let mut torn = 0;
        for (dir, ()) in &taken {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            let got = fs::read(dir.join("f")).unwrap_or_default();
            if !name.contains("-torn") {
                continue;
            }
            torn += 1;
            assert!(got != old && got != new, "{name}: not torn");
            assert!(
                got.len() >= old.len().min(new.len())
                    && got.len() <= old.len().max(new.len())
                    && got.len() % SECTOR == 0,
                "{name}: length {}",
                got.len()
            );
            for (i, s) in got.chunks(SECTOR).enumerate() {
                // Past the old end, "old" is zeros: the size reached the disk, the data not.
                let from_old = old
                    .get(i * SECTOR..(i + 1) * SECTOR)
                    .map_or(s.iter().all(|b| *b == 0), |o| o == s);
                let from_new = new.get(i * SECTOR..(i + 1) * SECTOR) == Some(s);
                assert!(from_old || from_new, "{name}: sector {i} is neither");
            }
        }
        assert!((4..=8).contains(&torn), "{torn} torn states: {taken:?}");
        // The state after the last sync holds the new content whole.
        let last = &taken.last().unwrap().0;
        assert_eq!(fs::read(last.join("f")).unwrap(), new);
    }
}
