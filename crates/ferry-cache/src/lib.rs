//! The cache: where data becomes durable before Ferry counts it as shipped.
//!
//! Job: an append-only log of sealed [`CacheEntry`] records in files `CACHE/SEQ.log` (64 MiB each by
//! default). A [`CacheWriter`] appends and group-commits (`fdatasync`); only records covered by a sync
//! are *durable*, and only durable records are visible to the [`CacheReader`] that drains the log into
//! the pipeline. When the drained data is safely in the store, [`Cache::consume_through`] records the
//! new start of the log (`consumed`, written durably) and deletes whole files below it.
//!
//! Invariants:
//! - A record is returned by `sync` as durable only after `fdatasync` of its file; `sync_behind`
//!   publishes it as durable (to [`Cache::durable_seq`] and the reader) only after the same.
//! - Quota: appends block (after syncing, so the drainer can progress) while the files on disk exceed
//!   the quota. A full cache means backpressure, never dropped data or unbounded memory.
//! - Recovery ([`Cache::open`]) scans every file from the consumed position. A torn or corrupt
//!   record in the *last* file is a tail that was never synced (nothing in it was acknowledged): the
//!   file is truncated there. A bad record in any earlier file is damage to acknowledged data
//!   (every file is synced before the next one starts): recovery stops with
//!   [`CacheError::Damaged`], naming the file and offset, and drops nothing.
//! - A writer always starts a new file with a fresh salt, so no record is ever sealed under the key
//!   and nonce of one that a truncation discarded.
//!
//! - Memory first: records appended with [`CacheWriter::append_owned`] are also kept in memory, up
//!   to [`MEMORY_BUDGET`] bytes, from the sync that makes them durable until the reader takes them.
//!   The reader returns those without reading or decrypting the file (the same bytes were sealed
//!   into it); it reads the file only for what memory did not keep (a reader behind by more than
//!   the budget, a restart). Either way it returns exactly the durable records, in order.
//!
//! Must not: interpret records. It stores and returns them in order.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ferry_crypto::{MasterKey, Sealer};
use ferry_durable as durable;
use ferry_format::cache::{
    decode_record, encode_record, CacheEntry, CacheFileHeader, Decoded, CACHE_HEADER_LEN,
    RECORD_HEADER_LEN,
};

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// cannot {op} {path}: {source}
    #[error("cache: cannot {op} {}: {source}{}", path.display(), next_step(source))]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    /// {path}: {source}
    #[error("cache file {}: {source}", path.display())]
    Format {
        path: PathBuf,
        source: ferry_format::FormatError,
    },
    /// the cache was closed
    #[error("the cache was closed")]
    Closed,
    /// acknowledged records are damaged
    #[error("cache file {} is damaged at offset {offset} ({why}); records after it were acknowledged, so Ferry stops instead of dropping them. Keep it for diagnosis: stop Ferry, move the cache directory {} aside, start again, and resync the affected VMs (`ferry-agent resync` on each guest; `ferry replicate` rescans by itself)", path.display(), path.parent().unwrap_or(path).display())]
    Damaged {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    /// quota too small
    #[error("cache quota {quota} bytes is smaller than two cache files ({file_size} bytes each); raise --cache-size")]
    QuotaTooSmall { quota: u64, file_size: u64 },
}

/// What an operator does about an I/O error of the cache, where there is something to say.
fn next_step(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull => {
            " (the cache's file system is full: free space there, or move the cache directory whole to a larger file system and point --cache-dir at it, or lower --cache-size; then start again: every record already synced is kept and goes into the store first)"
        }
        std::io::ErrorKind::QuotaExceeded => {
            " (the disk quota on the cache's file system is used up: raise it, or lower --cache-size; then start again: every record already synced is kept)"
        }
        _ => "",
    }
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Sizing of the cache.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Bytes of cache files allowed on disk before appends wait.
    pub quota: u64,
    /// Size at which a new cache file is started.
    pub file_size: u64,
}

#[derive(Debug)]
struct FileInfo {
    first_seq: u64,
    path: PathBuf,
    salt: [u8; 16],
    /// Bytes known durable (readers never read past this).
    len: u64,
}

struct State {
    files: VecDeque<FileInfo>,
    /// Durable records kept in memory for the reader, ascending seq, not always contiguous.
    mem: VecDeque<MemRecord>,
    mem_bytes: u64,
    /// Every record with seq < durable is durable.
    durable: u64,
    /// Every record with seq < consumed has been drained into the store.
    consumed: u64,
    closed: bool,
}

/// A record kept in memory ([`MEMORY_BUDGET`]): the entry, and where its bytes end in its file.
struct MemRecord {
    seq: u64,
    /// First seq of the file holding it, and the offset just past it there.
    file_first: u64,
    end: u64,
    bytes: u64,
    entry: CacheEntry,
}

/// Bytes the reader reads from a file at a time (what memory did not keep).
const READ_AHEAD: usize = 4 << 20;

/// Bytes of durable records kept in memory for the reader (see the module's invariants).
pub const MEMORY_BUDGET: u64 = 32 << 20;

fn mem_cost(e: &CacheEntry) -> u64 {
    match e {
        CacheEntry::Write { data, .. } => data.len() as u64 + 128,
        _ => 512,
    }
}

struct Shared {
    memory_budget: std::sync::atomic::AtomicU64,
    cfg: CacheConfig,
    key: MasterKey,
    state: Mutex<State>,
    cond: Condvar,
}

/// What recovery found.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// Durable records not yet drained.
    pub pending_records: u64,
    /// Bytes dropped from a torn or corrupt tail.
    pub dropped_bytes: u64,
    /// The runs' starts and tags among the records not yet drained, in order: what the process
    /// server holds beyond the store's manifests.
    pub marks: Vec<Mark>,
}

/// A run boundary found in the cache at recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    Begin {
        vm: String,
        run: [u8; 16],
        disks: Vec<(String, u64)>,
    },
    Tag {
        vm: String,
        run: [u8; 16],
        disks: Vec<String>,
    },
}

/// A cache directory.
#[derive(Clone)]
pub struct Cache {
    shared: Arc<Shared>,
}

fn file_name(first_seq: u64) -> String {
    format!("{first_seq:016}.log")
}

impl Cache {
    /// Opens (creating if needed) and recovers the cache.
    pub fn open(cfg: CacheConfig, key: MasterKey) -> Result<(Cache, Recovery), CacheError> {
        if cfg.quota < 2 * cfg.file_size {
            return Err(CacheError::QuotaTooSmall {
                quota: cfg.quota,
                file_size: cfg.file_size,
            });
        }
        durable::create_dir_durable(&cfg.dir).map_err(io(&cfg.dir, "create"))?;
        let cp = cfg.dir.join("consumed");
        let consumed = match fs::read_to_string(&cp) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(1).max(1),
            Err(_) => 1,
        };
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for e in fs::read_dir(&cfg.dir).map_err(io(&cfg.dir, "list"))? {
            let e = e.map_err(io(&cfg.dir, "list"))?;
            if let Some(s) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                names.push((s, e.path()));
            }
        }
        names.sort();
        let mut rec = Recovery::default();
        let mut files = VecDeque::new();
        let mut next = consumed;
        for (i, (first, path)) in names.iter().enumerate() {
            let last_file = i + 1 == names.len();
            let later_first = names.get(i + 1).map(|n| n.0);
            if later_first.is_some_and(|l| l <= consumed) {
                // Entirely drained.
                fs::remove_file(path).map_err(io(path, "remove"))?;
                continue;
            }
            let bytes = fs::read(path).map_err(io(path, "read"))?;
            let header = match CacheFileHeader::decode(&bytes, key.id()) {
                Ok(h) if h.first_seq == *first => h,
                // A last file no longer than a header whose header does not decode: the header
                // never became durable (zeros or garbage after a power cut); nothing in it was
                // acknowledged.
                Ok(_) | Err(_) if last_file && bytes.len() <= CACHE_HEADER_LEN => {
                    // A file whose header never became durable: nothing in it was acknowledged.
                    tracing::warn!(file = %path.display(), "removing a cache file with a torn header");
                    rec.dropped_bytes += bytes.len() as u64;
                    fs::remove_file(path).map_err(io(path, "remove"))?;
                    continue;
                }
                Ok(_) => {
                    return Err(CacheError::Format {
                        path: path.clone(),
                        source: ferry_format::FormatError::Corrupt {
                            what: "cache file",
                            offset: 40,
                            detail: "first sequence number differs from the file name".into(),
                        },
                    })
                }
                Err(source) => {
                    return Err(CacheError::Format {
                        path: path.clone(),
                        source,
                    })
                }
            };
            let sealer = key.cache_sealer(&header.salt);
            let mut pos = CACHE_HEADER_LEN;
            let mut seq = *first;
            loop {
                if pos == bytes.len() {
                    break;
                }
                match decode_record(&sealer, &bytes[pos..], pos as u64) {
                    Ok(Decoded::Record(s, entry, n)) if s == seq => {
                        if s >= consumed {
                            match entry {
                                CacheEntry::Begin { vm, run, disks, .. } => {
                                    rec.marks.push(Mark::Begin { vm, run, disks })
                                }
                                CacheEntry::Tag { vm, tag } => rec.marks.push(Mark::Tag {
                                    vm,
                                    run: tag.run,
                                    disks: tag.disks.into_iter().map(|d| d.name).collect(),
                                }),
                                _ => {}
                            }
                        }
                        pos += n;
                        seq += 1;
                    }
                    other => {
                        let why = match other {
                            Ok(Decoded::Incomplete) => "torn record".to_string(),
                            Ok(Decoded::Record(s, ..)) => format!("sequence {s}, expected {seq}"),
                            Err(e) => e.to_string(),
                        };
                        if !last_file {
                            tracing::error!(file = %path.display(), offset = pos, %why, "damaged cache record before the last file");
                            return Err(CacheError::Damaged {
                                path: path.clone(),
                                offset: pos as u64,
                                why,
                            });
                        }
                        let dropped = bytes.len() - pos;
                        rec.dropped_bytes += dropped as u64;
                        tracing::warn!(file = %path.display(), offset = pos, dropped, %why, "truncating the cache's torn tail (never synced, never acknowledged)");
                        let f = OpenOptions::new()
                            .write(true)
                            .open(path)
                            .map_err(io(path, "open"))?;
                        f.set_len(pos as u64).map_err(io(path, "truncate"))?;
                        durable::sync_file(&f).map_err(io(path, "sync"))?;
                        break;
                    }
                }
            }
            // Files follow each other without a gap: a file that ends early (a tail cut by an
            // earlier recovery, then a new file) must end exactly where the next one starts.
            if let Some(l) = later_first {
                if seq != l {
                    return Err(CacheError::Damaged {
                        path: path.clone(),
                        offset: pos as u64,
                        why: format!("its records end before sequence {seq}, but the next file starts at {l}"),
                    });
                }
            }
            // What recovery keeps may still be only in the page cache (a kill -9 without a power
            // cut): make it durable before anything new is written after it.
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| durable::sync_file(&f))
                .map_err(io(path, "sync"))?;
            if seq > consumed {
                rec.pending_records += seq - consumed.max(*first);
            }
            next = next.max(seq);
            files.push_back(FileInfo {
                first_seq: *first,
                path: path.clone(),
                salt: header.salt,
                len: pos as u64,
            });
        }
        let consumed = consumed.min(next);
        let shared = Arc::new(Shared {
            memory_budget: std::sync::atomic::AtomicU64::new(MEMORY_BUDGET),
            cfg,
            key,
            state: Mutex::new(State {
                mem: VecDeque::new(),
                mem_bytes: 0,
                files,
                durable: next,
                consumed,
                closed: false,
            }),
            cond: Condvar::new(),
        });
        Ok((Cache { shared }, rec))
    }

    /// Starts appending (one writer at a time).
    pub fn writer(&self) -> Result<CacheWriter, CacheError> {
        let next = self.shared.state.lock().expect("poisoned").durable;
        let mut w = CacheWriter {
            shared: self.shared.clone(),
            behind: None,
            file: None,
            sealer: None,
            buf: Vec::with_capacity(8 << 20),
            next_seq: next,
            file_len: 0,
            file_first: next,
            stash: Vec::new(),
            stash_bytes: 0,
            poisoned: None,
            #[cfg(test)]
            fail_sync: false,
        };
        w.start_file()?;
        Ok(w)
    }

    /// Reads durable records from the consumed position on.
    pub fn reader(&self) -> CacheReader {
        let consumed = self.shared.state.lock().expect("poisoned").consumed;
        CacheReader {
            shared: self.shared.clone(),
            next_seq: consumed,
            cur: None,
            buf: Vec::new(),
            buf_pos: 0,
            file_pos: 0,
            jump: None,
            from_memory: 0,
            decoded: 0,
        }
    }

    /// Sets how many bytes of durable records are kept in memory for the reader (default
    /// [`MEMORY_BUDGET`]; 0 reads everything back from the files).
    pub fn set_memory_budget(&self, bytes: u64) {
        self.shared
            .memory_budget
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records that every record with seq < `seq` is safely in the store; frees their files.
    pub fn consume_through(&self, seq: u64) -> Result<(), CacheError> {
        let cp = self.shared.cfg.dir.join("consumed");
        durable::durable_write(&cp, format!("{seq}\n").as_bytes()).map_err(io(&cp, "write"))?;
        let mut st = self.shared.state.lock().expect("poisoned");
        st.consumed = st.consumed.max(seq);
        let mut drained = Vec::new();
        while st.files.len() > 1 && st.files[1].first_seq <= st.consumed {
            drained.push(st.files.pop_front().expect("len > 1").path);
        }
        if !drained.is_empty() {
            // Unlinking a 64 MiB file can take tens of milliseconds (discard on ext4); the files are
            // already out of the log (consumed is durable), so do it off the drain path.
            std::thread::spawn(move || {
                for p in drained {
                    if let Err(e) = fs::remove_file(&p) {
                        tracing::warn!(file = %p.display(), error = %e, "cannot remove drained cache file");
                    }
                }
            });
        }
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Every record with seq < this is durable.
    pub fn durable_seq(&self) -> u64 {
        self.shared.state.lock().expect("poisoned").durable
    }

    /// Every record with seq < this is drained into the store ([`Self::consume_through`]).
    pub fn consumed_seq(&self) -> u64 {
        self.shared.state.lock().expect("poisoned").consumed
    }

    /// Bytes of cache files on disk.
    pub fn used_bytes(&self) -> u64 {
        let st = self.shared.state.lock().expect("poisoned");
        st.files.iter().map(|f| f.len).sum()
    }

    /// Number of durable records not yet consumed.
    pub fn backlog(&self) -> u64 {
        let st = self.shared.state.lock().expect("poisoned");
        st.durable - st.consumed
    }

    /// Wakes readers waiting for records: no more will come.
    pub fn close(&self) {
        self.shared.state.lock().expect("poisoned").closed = true;
        self.shared.cond.notify_all();
    }
}

/// Appends records; see [`CacheWriter::sync`] and [`CacheWriter::sync_behind`].
pub struct CacheWriter {
    shared: Arc<Shared>,
    /// The thread of [`Self::sync_behind`], started by its first call.
    behind: Option<Behind>,
    file: Option<(File, PathBuf)>,
    sealer: Option<Sealer>,
    buf: Vec<u8>,
    next_seq: u64,
    file_len: u64,
    /// First seq of the file being written.
    file_first: u64,
    /// Records appended since the last sync, to be kept in memory once durable.
    stash: Vec<MemRecord>,
    stash_bytes: u64,
    /// A sync of this writer failed: what it was. A failed `fdatasync` may have dropped the dirty
    /// pages it was to write, and a second one would report success over them, so nothing this
    /// writer appended since its last successful sync is ever published as durable.
    poisoned: Option<String>,
    /// Tests: the next blocking sync fails (without syncing).
    #[cfg(test)]
    fail_sync: bool,
}

/// A group commit handed to the background syncer by [`CacheWriter::sync_behind`]: the records
/// below `next_seq`, all written to `file` (the one whose first record is `file_first`) below
/// `file_len`.
struct SyncJob {
    file: File,
    path: PathBuf,
    file_first: u64,
    file_len: u64,
    next_seq: u64,
    stash: Vec<MemRecord>,
    stash_bytes: u64,
}

#[derive(Default)]
struct BehindState {
    job: Option<SyncJob>,
    /// A job was handed over and is not finished yet.
    busy: bool,
    /// The last job's sync failed (or the thread died): for the writer's next call.
    failed: Option<CacheError>,
    quit: bool,
    /// Bytes of the job's records bound for memory, counted against the budget until published.
    inflight_bytes: u64,
    /// Tests: the syncer takes no job while set.
    #[cfg(test)]
    hold: bool,
    /// Tests: what happens to the next job instead of its sync.
    #[cfg(test)]
    inject: Option<Inject>,
}

/// Tests: a failure put in place of the next background sync (built only by tests).
#[derive(Clone, Copy)]
#[cfg_attr(not(test), allow(dead_code))]
enum Inject {
    /// The sync fails (without syncing).
    Fail,
    /// The sync thread panics.
    Panic,
}

/// The failure a test put in place of this job's sync (never outside tests).
fn take_inject(_b: &mut BehindState) -> Option<Inject> {
    #[cfg(test)]
    return _b.inject.take();
    #[cfg(not(test))]
    None
}

type BehindSlot = Arc<(Mutex<BehindState>, Condvar)>;

fn lock_behind(slot: &BehindSlot) -> std::sync::MutexGuard<'_, BehindState> {
    slot.0.lock().unwrap_or_else(|e| e.into_inner())
}

struct Behind {
    slot: BehindSlot,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Publishes records below `next_seq`, written to the file whose first record is `file_first`
/// below `file_len`, as durable: called only after their `fdatasync`.
fn publish(
    shared: &Shared,
    file_first: u64,
    file_len: u64,
    next_seq: u64,
    stash: &mut Vec<MemRecord>,
) {
    let mut st = shared.state.lock().expect("poisoned");
    debug_assert!(next_seq >= st.durable, "the durable position moves back");
    // Always the last file: a rotation waits for the job in flight before it starts a new one.
    debug_assert_eq!(st.files.back().map(|f| f.first_seq), Some(file_first));
    if let Some(f) = st
        .files
        .iter_mut()
        .rev()
        .find(|f| f.first_seq == file_first)
    {
        f.len = file_len;
    }
    st.durable = next_seq;
    // Durable now: the reader may take them from memory, as far as the budget allows (the rest
    // it reads from the file).
    let budget = shared
        .memory_budget
        .load(std::sync::atomic::Ordering::Relaxed);
    for m in stash.drain(..) {
        if st.mem_bytes + m.bytes > budget {
            break;
        }
        st.mem_bytes += m.bytes;
        st.mem.push_back(m);
    }
    stash.clear();
    shared.cond.notify_all();
}

/// Ends the syncer's job however the thread leaves it: a panic (a poisoned lock, a test hook)
/// fails the job instead of leaving the writer waiting for it forever.
struct JobGuard<'a> {
    slot: &'a BehindSlot,
    stash_bytes: u64,
    result: Option<Result<(), CacheError>>,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        let r = self.result.take().unwrap_or_else(|| {
            Err(CacheError::Io {
                path: PathBuf::new(),
                op: "sync",
                source: std::io::Error::other("the cache's sync thread panicked"),
            })
        });
        let mut b = lock_behind(self.slot);
        b.busy = false;
        b.inflight_bytes = b.inflight_bytes.saturating_sub(self.stash_bytes);
        if let Err(e) = r {
            b.failed = Some(e);
        }
        self.slot.1.notify_all();
    }
}

fn syncer(shared: Arc<Shared>, slot: BehindSlot) {
    loop {
        let (mut job, inject) = {
            let mut b = lock_behind(&slot);
            loop {
                #[cfg(test)]
                if b.hold && !b.quit {
                    b = slot.1.wait(b).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                if let Some(j) = b.job.take() {
                    break (j, take_inject(&mut b));
                }
                if b.quit {
                    return;
                }
                b = slot.1.wait(b).unwrap_or_else(|e| e.into_inner());
            }
        };
        let mut guard = JobGuard {
            slot: &slot,
            stash_bytes: job.stash_bytes,
            result: None,
        };
        let r = match inject {
            // Only the job's bytes need to be durable; the writer may be appending past them.
            None => durable::sync_data_appended(&job.file, job.file_len),
            Some(Inject::Fail) => Err(std::io::Error::other("injected")),
            Some(Inject::Panic) => panic!("injected panic"),
        }
        .map_err(io(&job.path, "sync"));
        if r.is_ok() {
            publish(
                &shared,
                job.file_first,
                job.file_len,
                job.next_seq,
                &mut job.stash,
            );
        }
        guard.result = Some(r);
    }
}

impl Drop for CacheWriter {
    /// Lets a job in flight finish (its records become durable and visible), then stops the
    /// syncer. Records appended after the last sync stay unsynced, as without it.
    fn drop(&mut self) {
        if let Some(mut b) = self.behind.take() {
            lock_behind(&b.slot).quit = true;
            b.slot.1.notify_all();
            if let Some(t) = b.thread.take() {
                if t.join().is_err() {
                    tracing::error!("the cache's sync thread panicked");
                }
            }
        }
    }
}

impl CacheWriter {
    /// Starts the next file; on any failure the writer is poisoned (it has no file to append to,
    /// and a failed sync must not be retried).
    fn start_file(&mut self) -> Result<(), CacheError> {
        self.start_file_inner().map_err(|e| self.poison(e))
    }

    fn start_file_inner(&mut self) -> Result<(), CacheError> {
        let dir = self.shared.cfg.dir.clone();
        // Always a new file with a fresh salt, never appending to one recovery found: its torn tail
        // may have been sealed under the nonces the next records would get. A last file that holds
        // no record and has this name is replaced.
        {
            let mut st = self.shared.state.lock().expect("poisoned");
            if st
                .files
                .back()
                .is_some_and(|l| l.first_seq == self.next_seq && l.len == CACHE_HEADER_LEN as u64)
            {
                st.files.pop_back();
            }
        }
        let salt = ferry_crypto::random_salt().map_err(|e| CacheError::Io {
            path: dir.clone(),
            op: "seed",
            source: std::io::Error::other(e.to_string()),
        })?;
        let path = dir.join(file_name(self.next_seq));
        let h = CacheFileHeader {
            key_id: self.shared.key.id(),
            salt,
            first_seq: self.next_seq,
        }
        .encode();
        let mut f = File::create(&path).map_err(io(&path, "create"))?;
        f.write_all(&h).map_err(io(&path, "write"))?;
        durable::sync_file(&f).map_err(io(&path, "sync"))?;
        durable::fsync_dir(&dir).map_err(io(&dir, "sync"))?;
        self.sealer = Some(self.shared.key.cache_sealer(&salt));
        self.file_len = CACHE_HEADER_LEN as u64;
        self.file_first = self.next_seq;
        self.file = Some((f, path.clone()));
        let mut st = self.shared.state.lock().expect("poisoned");
        st.files.push_back(FileInfo {
            first_seq: self.next_seq,
            path,
            salt,
            len: CACHE_HEADER_LEN as u64,
        });
        Ok(())
    }

    /// Appends a record (buffered: durable only once a sync covers it, [`Self::sync`] or
    /// [`Self::sync_behind`]). Returns its sequence number. Fails once a sync has failed.
    /// Waits while the cache is over quota.
    pub fn append(&mut self, e: &CacheEntry) -> Result<u64, CacheError> {
        self.check()?;
        if self.file_len + self.buf.len() as u64 >= self.shared.cfg.file_size {
            self.sync()?;
            self.file = None;
            self.start_file()?;
            self.wait_for_room()?;
        }
        let seq = self.next_seq;
        encode_record(
            self.sealer.as_ref().expect("a file is open"),
            seq,
            e,
            &mut self.buf,
        );
        self.next_seq += 1;
        if self.buf.len() >= 8 << 20 {
            self.write_buf()?;
        }
        Ok(seq)
    }

    /// [`Self::append`], taking the entry: once durable, the reader gets it from memory (within
    /// the budget) instead of reading the file back.
    pub fn append_owned(&mut self, e: CacheEntry) -> Result<u64, CacheError> {
        let seq = self.append(&e)?;
        let bytes = mem_cost(&e);
        let budget = self
            .shared
            .memory_budget
            .load(std::sync::atomic::Ordering::Relaxed);
        let inflight = self
            .behind
            .as_ref()
            .map_or(0, |b| lock_behind(&b.slot).inflight_bytes);
        if self.stash_bytes + inflight + bytes <= budget {
            self.stash_bytes += bytes;
            self.stash.push(MemRecord {
                seq,
                file_first: self.file_first,
                end: self.file_len + self.buf.len() as u64,
                bytes,
                entry: e,
            });
        }
        Ok(seq)
    }

    fn wait_for_room(&mut self) -> Result<(), CacheError> {
        let mut st = self.shared.state.lock().expect("poisoned");
        let mut warned = false;
        loop {
            let used: u64 = st.files.iter().map(|f| f.len).sum();
            if used + self.shared.cfg.file_size <= self.shared.cfg.quota || st.files.len() <= 2 {
                return Ok(());
            }
            if st.closed {
                return Err(CacheError::Closed);
            }
            if !warned {
                tracing::info!(
                    used,
                    quota = self.shared.cfg.quota,
                    "cache full: waiting for the pipeline to drain (backpressure)"
                );
                warned = true;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, Duration::from_millis(200))
                .expect("poisoned")
                .0;
        }
    }

    fn write_buf(&mut self) -> Result<(), CacheError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let (f, p) = self.file.as_mut().expect("a file is open");
        f.write_all_at(&self.buf, self.file_len)
            .map_err(io(p, "write"))?;
        self.file_len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Makes every appended record durable and visible to readers. Returns the first sequence number
    /// not yet appended.
    pub fn sync(&mut self) -> Result<u64, CacheError> {
        self.check()?;
        self.write_buf()?;
        self.wait_behind()?;
        #[cfg(test)]
        let inject = std::mem::take(&mut self.fail_sync);
        let (f, p) = self
            .file
            .as_ref()
            .expect("a file is open (start_file poisons when it fails)");
        let r = durable::sync_data(f);
        #[cfg(test)]
        let r = if inject {
            Err(std::io::Error::other("injected"))
        } else {
            r
        };
        if let Err(e) = r {
            let e = io(p, "sync")(e);
            return Err(self.poison(e));
        }
        self.stash_bytes = 0;
        publish(
            &self.shared,
            self.file_first,
            self.file_len,
            self.next_seq,
            &mut self.stash,
        );
        Ok(self.next_seq)
    }

    /// Records that a sync failed; returns its error.
    fn poison(&mut self, e: CacheError) -> CacheError {
        self.poisoned.get_or_insert_with(|| e.to_string());
        e
    }

    /// The error of every call after a failed sync.
    fn check(&self) -> Result<(), CacheError> {
        match &self.poisoned {
            None => Ok(()),
            Some(why) => Err(CacheError::Io {
                path: self.shared.cfg.dir.clone(),
                op: "sync",
                source: std::io::Error::other(format!(
                    "an earlier sync of this cache writer failed ({why}); nothing appended since is made durable: restart the process (recovery keeps every record that was synced)"
                )),
            }),
        }
    }

    /// A group commit that does not wait for the disk: hands every record appended so far to a
    /// background thread, which syncs them and then makes them durable and visible to readers,
    /// as [`Self::sync`] does, while the caller goes on appending. Returns once the previous
    /// one has finished (one is in flight at a time), with its error if it failed; [`Self::sync`]
    /// waits for it too. A record counts as durable only once [`Cache::durable_seq`] is past it.
    pub fn sync_behind(&mut self) -> Result<(), CacheError> {
        self.check()?;
        self.write_buf()?;
        self.wait_behind()?;
        self.start_behind()?;
        let (f, p) = self.file.as_ref().expect("a file is open");
        let job = SyncJob {
            file: f
                .try_clone()
                .map_err(io(p, "duplicate the descriptor of"))?,
            path: p.clone(),
            file_first: self.file_first,
            file_len: self.file_len,
            next_seq: self.next_seq,
            stash: std::mem::take(&mut self.stash),
            stash_bytes: std::mem::take(&mut self.stash_bytes),
        };
        let b = self.behind.as_ref().expect("started above");
        let mut st = lock_behind(&b.slot);
        st.inflight_bytes += job.stash_bytes;
        st.busy = true;
        st.job = Some(job);
        b.slot.1.notify_all();
        Ok(())
    }

    /// Starts the thread of [`Self::sync_behind`] if it is not running yet.
    fn start_behind(&mut self) -> Result<(), CacheError> {
        if self.behind.is_some() {
            return Ok(());
        }
        let slot: BehindSlot = Arc::new((Mutex::new(BehindState::default()), Condvar::new()));
        let (shared, s2) = (self.shared.clone(), slot.clone());
        let thread = std::thread::Builder::new()
            .name("ferry-fsync".into())
            .spawn(move || syncer(shared, s2))
            .map_err(io(&self.shared.cfg.dir, "start the sync thread of"))?;
        self.behind = Some(Behind {
            slot,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Tests: holds the syncer before its next job (`hold`), and puts `inject` in place of that
    /// job's sync.
    #[cfg(test)]
    fn gate_behind(&mut self, hold: bool, inject: Option<Inject>) {
        self.start_behind().unwrap();
        let b = self.behind.as_ref().expect("started");
        let mut st = lock_behind(&b.slot);
        st.hold = hold;
        st.inject = inject;
        b.slot.1.notify_all();
    }

    /// Waits for the job of [`Self::sync_behind`] in flight; its error, or a later call's once
    /// one failed.
    fn wait_behind(&mut self) -> Result<(), CacheError> {
        let Some(b) = &self.behind else {
            return Ok(());
        };
        let failed = {
            let mut st = lock_behind(&b.slot);
            while st.busy {
                st = b.slot.1.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.failed.take()
        };
        match failed {
            Some(e) => Err(self.poison(e)),
            None => Ok(()),
        }
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// Returns durable records in order.
pub struct CacheReader {
    shared: Arc<Shared>,
    next_seq: u64,
    /// The file being read: first seq, path, sealer.
    cur: Option<(u64, PathBuf, Sealer, File)>,
    buf: Vec<u8>,
    buf_pos: usize,
    /// File offset of buf[0].
    file_pos: u64,
    /// Where the file of this first seq is to be read from when it is opened (past records
    /// taken from memory).
    jump: Option<(u64, u64)>,
    from_memory: u64,
    /// Records decrypted from the files (skipped ones included).
    decoded: u64,
}

/// What [`CacheReader::next`] found.
pub enum Next {
    Record(u64, CacheEntry),
    /// Nothing durable right now (only with `wait == false`).
    Idle,
    /// The cache was closed and everything was read.
    Closed,
}

impl CacheReader {
    /// The next durable record. With `wait`, blocks until one is durable or the cache is closed.
    pub fn next(&mut self, wait: bool) -> Result<Next, CacheError> {
        self.next_within(if wait { None } else { Some(Duration::ZERO) })
    }

    /// The next durable record, waiting at most `timeout` (None: forever) for one.
    pub fn next_within(&mut self, timeout: Option<Duration>) -> Result<Next, CacheError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(m) = self.take_from_memory() {
                return Ok(m);
            }
            if let Some((_, path, sealer, _)) = &self.cur {
                if self.buf_pos < self.buf.len() {
                    let at = self.file_pos + self.buf_pos as u64;
                    match decode_record(sealer, &self.buf[self.buf_pos..], at) {
                        Ok(Decoded::Record(seq, e, n)) => {
                            self.buf_pos += n;
                            self.decoded += 1;
                            if seq < self.next_seq {
                                continue;
                            }
                            if seq != self.next_seq {
                                return Err(CacheError::Format {
                                    path: path.clone(),
                                    source: ferry_format::FormatError::Corrupt {
                                        what: "cache record",
                                        offset: at,
                                        detail: format!(
                                            "sequence {seq}, expected {}",
                                            self.next_seq
                                        ),
                                    },
                                });
                            }
                            self.next_seq += 1;
                            return Ok(Next::Record(seq, e));
                        }
                        Ok(Decoded::Incomplete) => {}
                        Err(source) => {
                            return Err(CacheError::Format {
                                path: path.clone(),
                                source,
                            })
                        }
                    }
                }
            }
            let st = self.shared.state.lock().expect("poisoned");
            if self.next_seq >= st.durable {
                if st.closed {
                    return Ok(Next::Closed);
                }
                let now = std::time::Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return Ok(Next::Idle);
                }
                // At most until the deadline: a longer wait would hold an idle caller (the
                // start-up recovery drain, the flush of a partial segment) past its timeout.
                let wait = deadline.map_or(Duration::from_millis(100), |d| {
                    (d - now).min(Duration::from_millis(100))
                });
                let _unused = self.shared.cond.wait_timeout(st, wait).expect("poisoned");
                continue;
            }
            let fi = st
                .files
                .iter()
                .rev()
                .find(|f| f.first_seq <= self.next_seq)
                .ok_or(CacheError::Closed)?;
            let (first, path, salt, len) = (fi.first_seq, fi.path.clone(), fi.salt, fi.len);
            drop(st);
            if self.cur.as_ref().map(|c| c.0) != Some(first) {
                let f = File::open(&path).map_err(io(&path, "open"))?;
                self.cur = Some((first, path.clone(), self.shared.key.cache_sealer(&salt), f));
                self.buf.clear();
                self.buf_pos = 0;
                self.file_pos = match self.jump.take() {
                    Some((f, at)) if f == first => at,
                    _ => CACHE_HEADER_LEN as u64,
                };
            }
            // Drop decoded bytes, then read more of the durable part.
            self.buf.drain(..self.buf_pos);
            self.file_pos += self.buf_pos as u64;
            self.buf_pos = 0;
            let start = self.file_pos + self.buf.len() as u64;
            if start >= len {
                return Err(CacheError::Format {
                    path,
                    source: ferry_format::FormatError::Truncated {
                        what: "cache file",
                        offset: start,
                    },
                });
            }
            let want = ((len - start) as usize).min(READ_AHEAD);
            let old = self.buf.len();
            self.buf.resize(old + want, 0);
            let f = &self.cur.as_ref().expect("set above").3;
            f.read_exact_at(&mut self.buf[old..], start)
                .map_err(io(&path, "read"))?;
        }
    }

    /// Sequence number of the next record this reader returns.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records this reader took from memory rather than from the files.
    pub fn from_memory(&self) -> u64 {
        self.from_memory
    }

    /// Records this reader decrypted from the files, including any it passed over.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// The next record, if memory holds it; the file position then moves past it.
    fn take_from_memory(&mut self) -> Option<Next> {
        let m = {
            let mut st = self.shared.state.lock().expect("poisoned");
            while st.mem.front().is_some_and(|m| m.seq < self.next_seq) {
                let m = st.mem.pop_front().expect("front");
                st.mem_bytes -= m.bytes;
            }
            if st.mem.front()?.seq != self.next_seq {
                return None;
            }
            let m = st.mem.pop_front().expect("front");
            st.mem_bytes -= m.bytes;
            m
        };
        match &self.cur {
            Some((first, ..)) if *first == m.file_first => {
                let buffered = self.file_pos..=self.file_pos + self.buf.len() as u64;
                if self.buf_pos as u64 + self.file_pos <= m.end && buffered.contains(&m.end) {
                    self.buf_pos = (m.end - self.file_pos) as usize;
                } else {
                    self.buf.clear();
                    self.buf_pos = 0;
                    self.file_pos = m.end;
                }
            }
            _ => {
                self.cur = None;
                self.jump = Some((m.file_first, m.end));
            }
        }
        self.next_seq += 1;
        self.from_memory += 1;
        Some(Next::Record(m.seq, m.entry))
    }
}

/// Size of the fixed record header, for callers estimating space.
pub const RECORD_OVERHEAD: usize = RECORD_HEADER_LEN + ferry_crypto::TAG_LEN;

#[cfg(test)]
mod tests;
