//! Readers beside the writer: who holds the writer lock, point pins, and a page-map reader that
//! stays exact while the writer commits new points.
//!
//! Restores, verification and `points list` never take the writer lock (`.lock`), so a test
//! failover runs while `ferry serve` or `ferry replicate` keeps protecting the machine, and the writer
//! never waits on a reader.
//!
//! - **Holder**: the writer writes `pid`, command line and start time into `.lock` once it holds it,
//!   so anyone who must wait (a second writer) can say who it waits for.
//! - **Pins**: a reader writes `pins/VM.SEQ.PID.RAND.pin` before it reads point SEQ and removes it when
//!   done. Retention never unlists a pinned point, and never deletes an undo delta (nor, through
//!   the garbage collector's mark phase, a chunk) that a pinned point still needs. Pins of dead
//!   processes are ignored and removed by the writer.
//! - **Holds**: a test failover keeps its point for as long as it exists, across restarts of every
//!   process: `pins/VM.SEQ.ID.hold`, written durably before the point is read and removed by its
//!   cleanup ([`hold_point`], [`release_hold`]). Retention treats a hold as a pin that is always
//!   live.
//! - **Exact reads under a moving writer**: committing point N+1 makes `undo/N.delta` durable before
//!   it touches `current.map` (see [`crate::replica`]). [`LiveReader`] reads a window of
//!   `current.map` and only then lists the undo directory, so every page the writer changed under
//!   it has its older digest in an undo delta the reader applies. An undo of a commit that never
//!   reached the manifest holds the digests `current.map` still has, so applying it is harmless.
//! - **Chunk locations without the dedupe index** (redb is single-process): [`locate_chunks`] reads
//!   segment indexes and keeps only each segment's own chunks (never a reference into another
//!   segment, which the garbage collector may have removed).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_crypto::{Digest, ZERO_DIGEST};
use ferry_format::delta::MAP_HEADER_LEN;
use ferry_format::segment::{ChunkLoc, Record};
use serde::{Deserialize, Serialize};

use crate::replica::DeltaReader;
use crate::{LocalStore, StoreError};

const DIGEST: u64 = 32;

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Who holds (or last held) a store's writer lock, as written into `.lock`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    pub since: String,
}

impl Holder {
    /// This process.
    pub fn me() -> Self {
        Holder {
            pid: std::process::id(),
            command: own_command(),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }

    /// "pid 123 (ferry serve --config …) since 2026-…".
    pub fn describe(&self) -> String {
        if self.pid == 0 {
            return "another process (it did not say which)".into();
        }
        format!("pid {} ({}) since {}", self.pid, self.command, self.since)
    }
}

fn own_command() -> String {
    let mut s = std::env::args().collect::<Vec<_>>().join(" ");
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Parses the holder written into a lock file (empty or garbage: unknown holder).
pub fn parse_holder(bytes: &[u8]) -> Holder {
    serde_json::from_slice(bytes).unwrap_or_default()
}

/// Reads the holder of `root`'s writer lock (unknown if the file says nothing usable).
pub fn lock_holder(root: &Path) -> Holder {
    fs::read(root.join(".lock"))
        .map(|b| parse_holder(&b))
        .unwrap_or_default()
}

/// Takes an exclusive `flock` on `file`; if another process holds it, says who every 30 s and
/// waits up to `wait` (None: until it is released).
pub(crate) fn lock_file(
    file: &File,
    path: &Path,
    what: &str,
    wait: Option<Duration>,
) -> Result<(), StoreError> {
    let t0 = Instant::now();
    let mut next_say = t0;
    loop {
        // SAFETY: flock on a valid, owned file descriptor has no memory-safety preconditions.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io(path, "lock")(e));
        }
        let mut b = Vec::new();
        let holder = (&*file)
            .seek(SeekFrom::Start(0))
            .and_then(|_| (&*file).read_to_end(&mut b))
            .map(|_| parse_holder(&b))
            .unwrap_or_default();
        let waited = t0.elapsed();
        if let Some(w) = wait {
            if waited >= w {
                return Err(StoreError::Busy {
                    what: what.to_owned(),
                    path: path.to_owned(),
                    holder: holder.describe(),
                    waited,
                });
            }
        }
        if Instant::now() >= next_say {
            let how_long = match wait {
                Some(w) => format!("up to {}s more", w.saturating_sub(waited).as_secs()),
                None => "until it exits (Ctrl-C to give up)".into(),
            };
            tracing::warn!(
                "{what} {} is in use by {}; waiting {how_long}",
                path.parent().unwrap_or(path).display(),
                holder.describe()
            );
            next_say = Instant::now() + Duration::from_secs(30);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Records this process as the holder of a lock file it has just locked.
pub(crate) fn write_holder(file: &File, path: &Path) -> Result<(), StoreError> {
    let b = serde_json::to_vec(&Holder::me()).expect("holder serializes");
    file.set_len(0).map_err(io(path, "truncate"))?;
    file.write_all_at(&b, 0).map_err(io(path, "write"))
}

/// Tries the lock without waiting: Some(file) if taken (hold the file to keep it).
pub fn try_lock(path: &Path) -> Result<Option<File>, StoreError> {
    let f = open_lock_file(path)?;
    // SAFETY: flock on a valid, owned file descriptor has no memory-safety preconditions.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(io(path, "lock")(e))
    }
}

/// Opens a lock file without truncating what its holder wrote.
pub(crate) fn open_lock_file(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io(path, "create"))
}

// ---- pins ----

#[derive(Serialize, Deserialize)]
struct PinFile {
    vm: String,
    seq: u64,
    pid: u32,
    command: String,
}

/// A point pinned against retention while this value lives: the pin file, held with a shared
/// `flock`. Liveness is the lock, not the pid: a reader in another pid namespace, a reused pid or
/// an unreadable /proc cannot make a live pin look dead or a dead one look alive.
#[must_use = "the pin is released when dropped"]
pub struct Pin {
    path: PathBuf,
    _file: File,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Pins point `seq` of `vm` in the store at `root` (see the module doc).
pub fn pin_point(root: &Path, vm: &str, seq: u64) -> Result<Pin, StoreError> {
    let dir = root.join("pins");
    crate::durable::create_dir_durable(&dir).map_err(io(&dir, "create"))?;
    let pid = std::process::id();
    let mut r = [0u8; 8];
    ferry_crypto::random_bytes(&mut r).map_err(|e| StoreError::Index(e.to_string()))?;
    let path = dir.join(format!("{vm}.{seq}.{pid}.{}.pin", hex::encode(r)));
    let body = PinFile {
        vm: vm.to_owned(),
        seq,
        pid,
        command: own_command(),
    };
    // Locked before its content is written, so the writer never sees it unlocked while this
    // reader lives. No fsync: a pin only matters while this process lives.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io(&path, "create"))?;
    // A root reader's pin in a store a service user owns: the writer must be able to open it.
    crate::durable::adopt_owner(&f, &dir).map_err(io(&path, "chown"))?;
    // SAFETY: flock on a valid, owned file descriptor has no memory-safety preconditions.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH) } != 0 {
        return Err(io(&path, "lock")(std::io::Error::last_os_error()));
    }
    f.write_all_at(&serde_json::to_vec(&body).expect("pin serializes"), 0)
        .map_err(io(&path, "write"))?;
    Ok(Pin { path, _file: f })
}

/// Age at which a live pin is reported (it is still honoured).
pub const PIN_WARN_AGE: Duration = Duration::from_secs(3600);

/// How long ago the pin file was made (its modification time: written once, at pinning).
fn pin_age(f: &File) -> Option<Duration> {
    let m = f.metadata().ok()?.modified().ok()?;
    std::time::SystemTime::now().duration_since(m).ok()
}

/// True the first time this process sees `p` here.
fn warn_once(p: &Path) -> bool {
    static SEEN: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.iter().any(|x| x == p) {
        return false;
    }
    if seen.len() >= 1024 {
        seen.clear(); // bounded: at worst an old pin is reported again
    }
    seen.push(p.to_owned());
    true
}

/// (VM, SEQ) from a pin file name `VM.SEQ.PID.RAND.pin` (VM names may hold dots).
fn pin_name(name: &str) -> Option<(String, u64)> {
    let stem = name.strip_suffix(".pin")?;
    let mut it = stem.rsplitn(3, '.');
    let (_rand, _pid, head) = (it.next()?, it.next()?, it.next()?);
    let (vm, seq) = head.rsplit_once('.')?;
    Some((vm.to_owned(), seq.parse().ok()?))
}

/// Whether `id` may name a hold: 1 to 64 of `[A-Za-z0-9_-]` (no dot: the file name is parsed from
/// the right).
fn hold_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The hold file of point `seq` of `vm` for `id`.
pub fn hold_path(root: &Path, vm: &str, seq: u64, id: &str) -> PathBuf {
    root.join("pins").join(format!("{vm}.{seq}.{id}.hold"))
}

/// Keeps point `seq` of `vm` against retention until [`release_hold`] (a test failover): durable
/// before it returns, so no prune after it can remove the point. `why` is stored in the file for
/// whoever lists the pins.
pub fn hold_point(
    root: &Path,
    vm: &str,
    seq: u64,
    id: &str,
    why: &str,
) -> Result<PathBuf, StoreError> {
    if !hold_id_ok(id) {
        return Err(StoreError::Index(format!(
            "hold id {id:?}: use 1 to 64 of A-Z a-z 0-9 - _"
        )));
    }
    check_hold_vm(vm)?;
    let path = hold_path(root, vm, seq, id);
    let body =
        serde_json::json!({"vm": vm, "seq": seq, "id": id, "why": why, "pid": std::process::id()});
    crate::durable::durable_write(&path, body.to_string().as_bytes())
        .map_err(io(&path, "write"))?;
    Ok(path)
}

/// Removes a hold made by [`hold_point`] (absent: fine).
pub fn release_hold(root: &Path, vm: &str, seq: u64, id: &str) -> Result<(), StoreError> {
    check_hold_vm(vm)?;
    let path = hold_path(root, vm, seq, id);
    match ferry_durable::remove_durable(&path) {
        // No pins directory (something else there): no hold either.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(()),
        r => r.map_err(io(&path, "remove")),
    }
}

/// A VM name in a hold's file name: no path separator, no leading dot, nothing empty.
fn check_hold_vm(vm: &str) -> Result<(), StoreError> {
    if vm.is_empty() || vm.starts_with('.') || vm.contains('/') || vm.contains('\0') {
        return Err(StoreError::Index(format!(
            "VM name {vm:?} cannot name a hold"
        )));
    }
    Ok(())
}

/// (VM, SEQ) from a hold file name `VM.SEQ.ID.hold`.
fn hold_name(name: &str) -> Option<(String, u64)> {
    let stem = name.strip_suffix(".hold")?;
    let (head, id) = stem.rsplit_once('.')?;
    if !hold_id_ok(id) {
        return None;
    }
    let (vm, seq) = head.rsplit_once('.')?;
    Some((vm.to_owned(), seq.parse().ok()?))
}

/// The lowest pinned point seq per VM, from pins some live process holds locked and from holds.
/// Pins nobody holds (their reader is gone) are removed.
pub fn live_pins(root: &Path) -> Result<HashMap<String, u64>, StoreError> {
    let dir = root.join("pins");
    let mut out: HashMap<String, u64> = HashMap::new();
    let it = match fs::read_dir(&dir) {
        Ok(it) => it,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(&dir, "list")(e)),
    };
    for e in it {
        let e = e.map_err(io(&dir, "list"))?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "hold") {
            // A test failover's: held until its cleanup, whoever runs.
            let Some((vm, seq)) = hold_name(&e.file_name().to_string_lossy()) else {
                tracing::warn!(hold = %p.display(), "a .hold file whose name is not VM.SEQ.ID.hold: not counted; remove it if it is not Ferry's");
                continue;
            };
            // Retention keeps the point and every newer one while the hold lasts: say so when it
            // has lasted long (once per hold and process).
            let age = fs::metadata(&p)
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok());
            if age.is_some_and(|a| a >= PIN_WARN_AGE) && warn_once(&p) {
                tracing::warn!(hold = %p.display(), vm = ?vm, seq, hours = age.map_or(0, |a| a.as_secs() / 3600),
                    "a test failover has held point {seq} for over an hour: retention keeps it and every newer point of the VM until `ferry failover --test --cleanup`");
            }
            let m = out.entry(vm).or_insert(seq);
            *m = (*m).min(seq);
            continue;
        }
        if p.extension().is_none_or(|x| x != "pin") {
            continue;
        }
        // A pin that exists but cannot be opened (another user's) counts as held: breaking a
        // live reader is worse than keeping a point a little longer.
        let (held, f) = match File::open(&p) {
            Ok(f) => {
                // SAFETY: flock on a valid, owned file descriptor has no memory-safety
                // preconditions.
                let held =
                    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 };
                (held, Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // released meanwhile
            Err(e) => {
                tracing::warn!(pin = %p.display(), error = %e, "cannot open a reader's pin; counting it as held (give the store's owner access to it)");
                (true, None)
            }
        };
        if !held {
            tracing::info!(pin = %p.display(), "removing the pin of a reader that is gone");
            let _ = fs::remove_file(&p);
            continue;
        }
        // Held by a live reader. Its name (VM.SEQ.PID.RAND.pin) says what it pins, even before its
        // content is written.
        let Some((vm, seq)) = pin_name(&e.file_name().to_string_lossy()) else {
            continue;
        };
        // A live reader is never broken, however long it reads; but one that holds a point for
        // hours (a stuck restore, a test failover left running) keeps retention from pruning it
        // and everything it needs: say so, once per pin and process.
        if let Some((f, age)) = f.as_ref().and_then(|f| Some((f, pin_age(f)?))) {
            if age >= PIN_WARN_AGE && warn_once(&p) {
                // Read at most 4 KiB of it; its command goes in a field (escaped), never into
                // the message, where a newline could forge a log line.
                let mut body = Vec::new();
                let _ = f.take(4096).read_to_end(&mut body);
                let holder = serde_json::from_slice::<PinFile>(&body).ok();
                tracing::warn!(pin = %p.display(), vm = ?vm, seq,
                    pid = holder.as_ref().map(|h| h.pid),
                    command = ?holder.as_ref().map(|h| h.command.as_str()),
                    age = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                    "point {seq} of a VM has been pinned by a live reader (pid {}) for over {} h: retention keeps it, and every older point it needs, until that reader ends; stop it if it is stuck",
                    holder.as_ref().map_or_else(|| "unknown".into(), |h| h.pid.to_string()),
                    age.as_secs() / 3600);
            }
        }
        let m = out.entry(vm).or_insert(seq);
        *m = (*m).min(seq);
    }
    Ok(out)
}

// ---- reading a point while the writer moves on ----

type Undo = (u64, u64, DeltaReader, Option<(u64, Digest)>);

/// Reads the page map of one point of one replica without any lock, exact while the writer commits
/// newer points (see the module doc). Pin the point first.
pub struct LiveReader {
    dir: PathBuf,
    map: File,
    pages: u64,
    seq: u64,
    /// Open undo deltas with seq >= `seq`, newest first: (seq, inode, reader, next unread entry).
    /// Keyed by inode too: a writer that crashed and committed again replaces an undo under the
    /// same name, and both copies hold digests of that same committed point.
    undos: Vec<Undo>,
    next_page: u64,
}

impl LiveReader {
    /// Opens the replica at `dir` to read point `seq`. Fails with [`StoreError::Behind`] while the
    /// replica has not reached `seq` (a commit the writer has still to finish).
    pub fn open(dir: &Path, seq: u64) -> Result<Self, StoreError> {
        let (map, header) = crate::replica::open_map(dir, false)?;
        if header.generation < seq {
            return Err(StoreError::Behind {
                replica: dir.to_owned(),
                generation: header.generation,
                seq,
            });
        }
        Ok(LiveReader {
            dir: dir.to_owned(),
            map,
            pages: header.pages,
            seq,
            undos: Vec::new(),
            next_page: 0,
        })
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Opens every undo delta with seq >= the point's that is not open yet, positioned at `first`.
    fn refresh_undos(&mut self, first: u64) -> Result<(), StoreError> {
        let d = self.dir.join("undo");
        let mut found = Vec::new();
        for e in fs::read_dir(&d).map_err(io(&d, "list"))? {
            let e = e.map_err(io(&d, "list"))?;
            if let Some(s) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".delta"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                let ino = std::os::unix::fs::DirEntryExt::ino(&e);
                if s >= self.seq && !self.undos.iter().any(|u| u.0 == s && u.1 == ino) {
                    found.push((s, ino));
                }
            }
        }
        for (s, _listed_ino) in found {
            let p = d.join(format!("{s}.delta"));
            let mut r = match DeltaReader::open(&p) {
                Ok(r) => r,
                // Replaced or removed between the listing and the open: a commit that never reached
                // the manifest was redone, or recovery dropped it; its content matched current.map.
                Err(StoreError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            // The inode of the file actually opened (the name may have been replaced since the
            // listing).
            let ino = r.inode().map_err(io(&p, "stat"))?;
            if self.undos.iter().any(|u| u.0 == s && u.1 == ino) {
                continue;
            }
            let mut head = r.next().transpose()?;
            while let Some((page, _)) = head {
                if page >= first {
                    break;
                }
                head = r.next().transpose()?;
            }
            self.undos.push((s, ino, r, head));
        }
        self.undos.sort_by_key(|u| std::cmp::Reverse(u.0));
        Ok(())
    }

    /// Fills `out` with the digests of pages `first..first + out.len()` at the point. Windows must
    /// be read in ascending order.
    pub fn read(&mut self, first: u64, out: &mut [Digest]) -> Result<(), StoreError> {
        let end = first + out.len() as u64;
        if end > self.pages || first < self.next_page {
            return Err(StoreError::Index(format!(
                "pages {first}..{end} out of order or beyond the {} pages of {}",
                self.pages,
                self.dir.display()
            )));
        }
        let mp = self.dir.join("current.map");
        // SAFETY: [u8; 32] has no padding and any byte pattern is valid; the length is exactly
        // out.len() * 32.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, out.len() * DIGEST as usize)
        };
        self.map
            .read_exact_at(bytes, MAP_HEADER_LEN as u64 + first * DIGEST)
            .map_err(io(&mp, "read"))?;
        // Only after reading the map: any page the writer changed under us has its undo by now.
        self.refresh_undos(first)?;
        // Newest first, so the oldest undo with seq >= the point's wins.
        for (_, _, r, head) in self.undos.iter_mut() {
            while let Some((page, d)) = *head {
                if page >= end {
                    break;
                }
                if page >= first {
                    out[(page - first) as usize] = d;
                }
                *head = r.next().transpose()?;
            }
        }
        self.next_page = end;
        Ok(())
    }
}

/// The generation (newest applied point) of the replica at `dir`.
pub fn replica_generation(dir: &Path) -> Result<u64, StoreError> {
    Ok(crate::replica::open_map(dir, false)?.1.generation)
}

/// Every non-zero digest of point `seq` of the replica at `dir`.
pub fn point_digests(dir: &Path, seq: u64) -> Result<HashSet<Digest>, StoreError> {
    let mut r = LiveReader::open(dir, seq)?;
    let mut out = HashSet::new();
    let mut buf = vec![ZERO_DIGEST; 4096];
    let mut first = 0;
    while first < r.pages() {
        let n = (r.pages() - first).min(4096) as usize;
        r.read(first, &mut buf[..n])?;
        out.extend(buf[..n].iter().filter(|d| **d != ZERO_DIGEST));
        first += n as u64;
    }
    Ok(out)
}

/// Where the chunks in `wanted` are stored, read from segment indexes (no dedupe index, no lock):
/// `prefer`'s journal (VM, disk) first, then every other journal of the store, until all are found.
/// Digests found nowhere are missing from the result. A segment whose index cannot be read (damaged,
/// another VM's problem) is skipped with a warning; its error is returned only if a wanted chunk
/// is found nowhere else.
pub fn locate_chunks(
    store: &LocalStore,
    prefer: (&str, &str),
    mut wanted: HashSet<Digest>,
) -> Result<HashMap<Digest, ChunkLoc>, StoreError> {
    let mut out = HashMap::with_capacity(wanted.len());
    let mut skipped: Option<StoreError> = None;
    let journal = store.root().join("journal");
    let mut disks = vec![(prefer.0.to_owned(), prefer.1.to_owned())];
    for vm in list_dirs(&journal)? {
        for disk in list_dirs(&journal.join(&vm))? {
            if (vm.as_str(), disk.as_str()) != prefer {
                disks.push((vm.clone(), disk));
            }
        }
    }
    'all: for (vm, disk) in disks {
        // Newest first: recent points reference recent segments.
        for seq in store.list_segments(&vm, &disk)?.into_iter().rev() {
            if wanted.is_empty() {
                break 'all;
            }
            let own = LocalStore::segment_path(&vm, &disk, seq);
            let idx = match store.read_segment_index(&vm, &disk, seq) {
                Ok(i) => i,
                // Collected meanwhile: nothing a pinned point needs lived only there.
                Err(StoreError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue
                }
                Err(e) => {
                    tracing::warn!(vm = %vm, disk = %disk, seq, error = %e, "skipping a segment whose index cannot be read");
                    skipped.get_or_insert(e);
                    continue;
                }
            };
            for r in idx.records {
                if let Record::Write { digest, loc, .. } = r {
                    if loc.segment == own && wanted.remove(&digest) {
                        out.insert(digest, loc);
                    }
                }
            }
        }
    }
    match skipped {
        Some(e) if !wanted.is_empty() => Err(e),
        _ => Ok(out),
    }
}

fn list_dirs(d: &Path) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    match fs::read_dir(d) {
        Ok(it) => {
            for e in it {
                let e = e.map_err(io(d, "list"))?;
                if e.file_type().map_err(io(d, "stat"))?.is_dir() {
                    if let Some(n) = e.file_name().to_str() {
                        out.push(n.to_owned());
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(d, "list")(e)),
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod hold_tests {
    use super::*;

    #[test]
    fn a_hold_pins_its_point_until_released_and_survives_its_maker() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        assert!(live_pins(root).unwrap().is_empty());
        let p = hold_point(root, "web.01", 7, "test-web-7-x", "test failover").unwrap();
        assert!(p.ends_with("pins/web.01.7.test-web-7-x.hold"));
        // No process holds it locked: still live (a reader's pin would be removed here).
        assert_eq!(live_pins(root).unwrap().get("web.01"), Some(&7));
        assert_eq!(live_pins(root).unwrap().get("web.01"), Some(&7));
        let reader = pin_point(root, "web.01", 9).unwrap();
        assert_eq!(
            live_pins(root).unwrap().get("web.01"),
            Some(&7),
            "the lowest wins"
        );
        release_hold(root, "web.01", 7, "test-web-7-x").unwrap();
        assert_eq!(live_pins(root).unwrap().get("web.01"), Some(&9));
        drop(reader);
        assert!(live_pins(root).unwrap().is_empty());
        release_hold(root, "web.01", 7, "test-web-7-x").unwrap();
        for bad in ["", "a.b", "a/b", &"x".repeat(65)] {
            assert!(hold_point(root, "v", 1, bad, "").is_err(), "{bad:?}");
        }
        for bad in ["", "../x", "a/b", ".x"] {
            assert!(hold_point(root, bad, 1, "id", "").is_err(), "{bad:?}");
            assert!(release_hold(root, bad, 1, "id").is_err(), "{bad:?}");
        }
        // Three holds: the lowest seq wins, whatever the directory order.
        for (seq, id) in [(12, "a"), (5, "b"), (9, "c")] {
            hold_point(root, "w", seq, id, "").unwrap();
        }
        assert_eq!(live_pins(root).unwrap().get("w"), Some(&5));
        assert_eq!(hold_name("a.b.3.id-1.hold"), Some(("a.b".into(), 3)));
        assert_eq!(hold_name("v.x.id.hold"), None);
    }
}
