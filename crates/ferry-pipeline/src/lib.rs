//! The pipeline: turns durable cache records into sealed segments in the store.
//!
//! Job: per disk, in order: dedupe each chunk (zero chunks are zero records; a chunk whose keyed
//! digest is already stored — in this segment or in the store's dedupe index, any disk, any VM —
//! becomes a reference), compress the rest with zstd (kept raw unless smaller), seal them with
//! AES-256-GCM, and write segments (≈32 MiB) to the store. Each stored segment goes to the
//! [`Applier`], and only then is the cache told the records are consumed.
//!
//! Invariants:
//! - Order: a disk's records keep their cache order inside and across its segments.
//! - Durability chain: cache record → durable segment → dedupe-index entry → cache consumed. A crash
//!   anywhere replays from the cache or the journal; nothing acknowledged is lost.
//! - Memory: at most one open segment per disk (≈ target size) plus the bounded worker queue.
//! - Compression and encryption run on `threads` crossbeam workers.
//!
//! Must not: decide what changed (the tracker does) or what a point is (the applier does).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use ferry_apply::quarantine::Quarantines;
use ferry_apply::{Applier, ApplyError, Committed};
use ferry_cache::{Cache, CacheError, CacheReader, Next};
use ferry_crypto::Digest;
use ferry_format::cache::CacheEntry;
use ferry_format::segment::{BlobSealer, ChunkLoc, Codec, Record, SegmentBuilder};
use ferry_format::CHUNK_SIZE;
use ferry_store::{ChunkIndex, LocalStore, StoreError};

/// Errors of the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// the segment upload failed
    #[error("uploading segment {path}: {detail}")]
    Upload { path: String, detail: String },
    /// a cached record is malformed
    #[error("cached record for {vm}/{disk} at offset {offset}: {detail}")]
    BadRecord {
        vm: String,
        disk: String,
        offset: u64,
        detail: String,
    },
}

/// Tuning of the pipeline.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Compression/encryption workers.
    pub threads: usize,
    /// zstd level (1 is fast; 3 is zstd's default).
    pub zstd_level: i32,
    /// Segment size at which segments are sealed and stored.
    pub segment_target: usize,
    /// Quarantine a VM whose own data fails (its records are then skipped) instead of failing
    /// ([`ferry_apply::quarantine`]); the process server sets it, one-VM jobs do not.
    pub quarantine: Option<Arc<Quarantines>>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            zstd_level: 1,
            segment_target: 32 << 20,
            quarantine: None,
        }
    }
}

/// Counters of what the pipeline did.
#[derive(Clone, Debug, Default)]
pub struct PipelineStats {
    pub records: u64,
    /// Bytes of chunk data received (non-zero writes).
    pub data_bytes: u64,
    /// Bytes covered by zero records.
    pub zero_bytes: u64,
    /// Bytes of chunks that were already stored (references).
    pub dedupe_bytes: u64,
    /// Bytes of chunks stored (before compression).
    pub unique_bytes: u64,
    /// Sealed bytes of stored chunks (after compression and encryption).
    pub sealed_bytes: u64,
    pub segments: u64,
    /// Total bytes of segment files written.
    pub segment_bytes: u64,
    /// Records of quarantined VMs consumed without being applied.
    pub skipped: u64,
}

struct Job {
    data: Vec<u8>,
    blob: u32,
    sealer: Arc<BlobSealer>,
    reply: Sender<Done>,
}

struct Done {
    blob: u32,
    sealed: Vec<u8>,
    codec: Codec,
    raw_len: u32,
}

enum Item {
    Rec(Record),
    /// A write whose chunk is blob `blob` of this segment.
    Local {
        offset: u64,
        len: u32,
        digest: Digest,
        blob: u32,
    },
}

struct OpenSegment {
    builder: SegmentBuilder,
    items: Vec<Item>,
    reply_tx: Sender<Done>,
    reply_rx: Receiver<Done>,
    outstanding: usize,
    bytes: usize,
    local: HashMap<Digest, u32>,
}

/// Drains a cache into the store.
pub struct Pipeline<'s> {
    index: ChunkIndex,
    applier: Applier<'s>,
    disp: Dispatch<'s>,
    workers: Vec<std::thread::JoinHandle<()>>,
    pub stats: PipelineStats,
    committed: Vec<Committed>,
    sink: Option<SegmentSink<'s>>,
    /// See [`Pipeline::set_turn`].
    turn: Option<Duration>,
}

/// The dispatching half: reads records in order, dedupes, hands chunks to the workers and fills
/// segments. Sealed segments go to the committing half (its own thread) in order.
struct Dispatch<'s> {
    store: &'s LocalStore,
    cfg: PipelineConfig,
    open: BTreeMap<(String, String), OpenSegment>,
    next_seq: HashMap<(String, String), u64>,
    jobs: Option<Sender<Job>>,
    open_bytes: usize,
    stats: PipelineStats,
    /// VMs found sending a record the applier cannot take, with why, to be quarantined by the
    /// committer after the segments of the next flush.
    quarantining: Vec<(String, String)>,
    /// VMs whose records are skipped until the committer has quarantined them: VM → the flush
    /// position that carries the quarantine (`u64::MAX` until flushed).
    skipping: HashMap<String, u64>,
    /// VMs whose migration was completed (`ferry_apply::lifecycle`): whatever a cache still
    /// holds of them is consumed unapplied (their data is gone, and must not come back).
    retired: std::collections::HashSet<String>,
    /// A record was skipped since the last flush (its position must still reach the committer).
    skipped_unflushed: bool,
}

type Batch = Vec<((String, String), OpenSegment)>;

/// Receives every sealed segment before it is stored locally (split mode uploads it).
pub type SegmentSink<'s> = Box<dyn FnMut(&str, &[u8]) -> Result<(), String> + Send + 's>;

impl<'s> Pipeline<'s> {
    /// Opens the dedupe index, starts the workers and lets the applier finish anything a crash
    /// interrupted. Hold the store lock for the pipeline's lifetime.
    pub fn new(store: &'s LocalStore, cfg: PipelineConfig) -> Result<Self, PipelineError> {
        Self::with(store, cfg, None, None)
    }

    /// Like [`Self::new`], with a remote replica target for the applier (direct mode) and/or a sink
    /// every segment goes to before it is stored (split mode).
    pub fn with(
        store: &'s LocalStore,
        cfg: PipelineConfig,
        target: Option<Box<dyn ferry_apply::ReplicaTarget + 's>>,
        sink: Option<SegmentSink<'s>>,
    ) -> Result<Self, PipelineError> {
        let index = store.open_index()?;
        let mut applier = Applier::new(store);
        if let Some(t) = target {
            applier.set_target(t);
        }
        if let Some(q) = &cfg.quarantine {
            applier.set_quarantine(q.clone());
        }
        let committed = applier.recover()?;
        let (tx, rx) = bounded::<Job>(cfg.threads * 8);
        let workers = (0..cfg.threads.max(1))
            .map(|_| {
                let rx = rx.clone();
                let level = cfg.zstd_level;
                std::thread::Builder::new()
                    .name("ferry-seal".into())
                    .spawn(move || worker(rx, level))
                    .expect("cannot start a pipeline worker")
            })
            .collect();
        Ok(Pipeline {
            index,
            applier,
            disp: Dispatch {
                store,
                cfg,
                open: BTreeMap::new(),
                next_seq: HashMap::new(),
                jobs: Some(tx),
                open_bytes: 0,
                stats: PipelineStats::default(),
                quarantining: Vec::new(),
                skipping: HashMap::new(),
                retired: ferry_apply::lifecycle::retired_set(store.root()),
                skipped_unflushed: false,
            },
            workers,
            stats: PipelineStats::default(),
            committed,
            sink,
            turn: None,
        })
    }

    /// Points committed so far (including by crash recovery at start).
    pub fn take_committed(&mut self) -> Vec<Committed> {
        std::mem::take(&mut self.committed)
    }

    /// The applier (for manifests).
    pub fn applier(&mut self) -> &mut Applier<'s> {
        &mut self.applier
    }

    /// Makes every [`Pipeline::drain`] with `until_idle` also return once `turn` has passed, even
    /// when records keep coming (it then seals what is open, as a pause in the input would): a
    /// server draining a cache that never goes idle gets control back to report committed
    /// points, prune and release. None (the default): only when idle.
    pub fn set_turn(&mut self, turn: Option<Duration>) {
        self.turn = turn;
    }

    /// Drains `reader` until the cache is closed (or, with `until_idle`, until nothing is durable
    /// and unread, or the turn of [`Pipeline::set_turn`] has passed). Segments are sealed as they fill, at every tag, and whenever input pauses; a
    /// committer thread stores, indexes and applies them in order while dispatching goes on, and the
    /// cache is told records are consumed only once the committer is past them.
    pub fn drain(
        &mut self,
        cache: &Cache,
        reader: &mut CacheReader,
        until_idle: bool,
    ) -> Result<(), PipelineError> {
        self.drain_waiting(cache, reader, until_idle, IDLE_WAIT)
    }

    /// Drains what is durable and unread now, and returns as soon as the reader finds nothing
    /// more: for a cache no one is writing (what a crashed run left), where waiting for more
    /// input only delays the start (by 50 ms per `ferry replicate`).
    pub fn drain_backlog(
        &mut self,
        cache: &Cache,
        reader: &mut CacheReader,
    ) -> Result<(), PipelineError> {
        self.drain_waiting(cache, reader, true, Duration::ZERO)
    }

    fn drain_waiting(
        &mut self,
        cache: &Cache,
        reader: &mut CacheReader,
        until_idle: bool,
        idle_wait: Duration,
    ) -> Result<(), PipelineError> {
        let Pipeline {
            index,
            applier,
            disp,
            committed,
            sink,
            stats,
            turn,
            ..
        } = self;
        let index: &ChunkIndex = index;
        let store = disp.store;
        let done = AtomicU64::new(0);
        let mut cstats = PipelineStats::default();
        let (tx, rx) = bounded::<(Batch, u64, Vec<(String, String)>)>(1);
        let quarantine = disp.cfg.quarantine.clone();
        let r = std::thread::scope(|s| {
            let (done_ref, cstats_ref) = (&done, &mut cstats);
            let mut c = Committer {
                store,
                index,
                applier,
                sink,
                stats: cstats_ref,
                committed,
            };
            let committer = std::thread::Builder::new()
                .name("ferry-commit".into())
                .spawn_scoped(s, move || -> Result<(), PipelineError> {
                    for (batch, through, quarantining) in rx {
                        c.commit_batch(batch)?;
                        for (vm, reason) in quarantining {
                            if let Some(q) = &quarantine {
                                q.add(&vm, &reason).map_err(|source| StoreError::Io {
                                    path: ferry_apply::quarantine::dir(store.root()),
                                    op: "write the quarantine record in",
                                    source,
                                })?;
                            }
                        }
                        done_ref.store(through, Ordering::Release);
                    }
                    Ok(())
                })
                .expect("cannot start the pipeline's committer");
            let mut consumed = 0u64;
            let flush = |disp: &mut Dispatch<'_>, through: u64| -> bool {
                disp.open_bytes = 0;
                let batch: Batch = std::mem::take(&mut disp.open).into_iter().collect();
                let quarantining = std::mem::take(&mut disp.quarantining);
                for (vm, _) in &quarantining {
                    disp.skipping.insert(vm.clone(), through);
                }
                // Records skipped for a quarantined VM are consumed too: an empty batch carries
                // their position through the committer.
                let skipped = std::mem::take(&mut disp.skipped_unflushed);
                (batch.is_empty() && quarantining.is_empty() && !skipped)
                    || tx.send((batch, through, quarantining)).is_ok()
            };
            let started = std::time::Instant::now();
            let turn = *turn;
            let dispatched = (|| -> Result<(), PipelineError> {
                loop {
                    let d = done.load(Ordering::Acquire);
                    if d > consumed {
                        cache.consume_through(d)?;
                        consumed = d;
                    }
                    // Quarantined by the committer by now: skipped through the quarantine set.
                    disp.skipping.retain(|_, through| *through > d);
                    match reader.next_within(Some(idle_wait))? {
                        Next::Record(_, e) => {
                            let is_tag = matches!(e, CacheEntry::Tag { .. });
                            disp.dispatch(index, e)?;
                            if (is_tag || disp.open_bytes >= disp.cfg.segment_target)
                                && !flush(disp, reader.next_seq())
                            {
                                return Ok(()); // the committer failed; its error is reported
                            }
                            if until_idle && turn.is_some_and(|t| started.elapsed() >= t) {
                                flush(disp, reader.next_seq());
                                return Ok(());
                            }
                        }
                        Next::Idle => {
                            if !flush(disp, reader.next_seq()) || until_idle {
                                return Ok(());
                            }
                        }
                        Next::Closed => {
                            flush(disp, reader.next_seq());
                            return Ok(());
                        }
                    }
                }
            })();
            drop(tx);
            let committed_ok = committer.join().expect("committer thread panicked");
            if committed_ok.is_ok() {
                // Every flush was committed: the VMs it quarantined are in the quarantine set.
                disp.skipping.clear();
            }
            let d = done.load(Ordering::Acquire);
            if committed_ok.is_ok() && d > consumed {
                cache.consume_through(d)?;
            }
            committed_ok.and(dispatched)
        });
        stats.add(&disp.stats);
        stats.add(&cstats);
        disp.stats = PipelineStats::default();
        r
    }
}

/// How long [`Pipeline::drain`] waits for input before it seals what is open (and, with
/// `until_idle`, returns).
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// The turn `ferry serve` gives its drain ([`Pipeline::set_turn`]).
pub const DRAIN_TURN: Duration = Duration::from_secs(1);

impl<'s> Dispatch<'s> {
    fn segment(&mut self, vm: &str, disk: &str) -> Result<&mut OpenSegment, PipelineError> {
        let k = (vm.to_owned(), disk.to_owned());
        if !self.open.contains_key(&k) {
            let seq = match self.next_seq.get(&k) {
                Some(s) => *s,
                None => self
                    .store
                    .list_segments(vm, disk)?
                    .last()
                    .map_or(1, |s| s + 1),
            };
            self.next_seq.insert(k.clone(), seq + 1);
            let salt = ferry_crypto::random_salt().map_err(|e| StoreError::Index(e.to_string()))?;
            let builder = SegmentBuilder::new(
                self.store.key(),
                salt,
                vm,
                disk,
                seq,
                LocalStore::segment_path(vm, disk, seq),
            );
            let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
            self.open.insert(
                k.clone(),
                OpenSegment {
                    builder,
                    items: Vec::new(),
                    reply_tx,
                    reply_rx,
                    outstanding: 0,
                    bytes: 0,
                    local: HashMap::new(),
                },
            );
        }
        Ok(self.open.get_mut(&k).expect("inserted"))
    }

    fn dispatch(&mut self, index: &ChunkIndex, e: CacheEntry) -> Result<(), PipelineError> {
        self.stats.records += 1;
        if !self.retired.is_empty() {
            let vm = match &e {
                CacheEntry::Begin { vm, .. }
                | CacheEntry::Zero { vm, .. }
                | CacheEntry::Tag { vm, .. }
                | CacheEntry::Write { vm, .. } => vm,
            };
            if self.retired.contains(vm) {
                self.stats.skipped += 1;
                self.skipped_unflushed = true;
                return Ok(());
            }
        }
        if let Some(q) = self.cfg.quarantine.clone() {
            let vm = match &e {
                CacheEntry::Begin { vm, .. }
                | CacheEntry::Zero { vm, .. }
                | CacheEntry::Tag { vm, .. }
                | CacheEntry::Write { vm, .. } => vm,
            };
            if q.contains(vm) || self.skipping.contains_key(vm) {
                // Consumed unapplied: the release voids the VM's run and its agent sends again.
                self.stats.skipped += 1;
                self.skipped_unflushed = true;
                return Ok(());
            }
            if let Err(PipelineError::BadRecord {
                vm,
                disk,
                offset,
                detail,
            }) = check_record(&e)
            {
                // The committer quarantines the VM once it has applied what came before (the
                // segments of this flush): the runs the VM completed before stay points.
                let reason =
                    format!("cached record for disk '{disk}' at offset {offset}: {detail}");
                self.skipping.insert(vm.clone(), u64::MAX);
                self.quarantining.push((vm, reason));
                self.stats.skipped += 1;
                self.skipped_unflushed = true;
                return Ok(());
            }
        }
        self.dispatch_unchecked(index, e)
    }

    fn dispatch_unchecked(
        &mut self,
        index: &ChunkIndex,
        e: CacheEntry,
    ) -> Result<(), PipelineError> {
        match e {
            CacheEntry::Begin {
                vm,
                run,
                time_ns,
                disks,
            } => {
                for (disk, size) in disks {
                    self.segment(&vm, &disk)?
                        .items
                        .push(Item::Rec(Record::Begin { run, time_ns, size }));
                }
            }
            CacheEntry::Zero {
                vm,
                disk,
                offset,
                len,
            } => {
                self.stats.zero_bytes += len;
                self.segment(&vm, &disk)?
                    .items
                    .push(Item::Rec(Record::Zero { offset, len }));
            }
            CacheEntry::Tag { vm, tag } => {
                for d in &tag.disks {
                    self.segment(&vm, &d.name)?
                        .items
                        .push(Item::Rec(Record::Tag(tag.clone())));
                }
            }
            CacheEntry::Write {
                vm,
                disk,
                offset,
                digest,
                data,
            } => {
                if offset % CHUNK_SIZE as u64 != 0 || data.is_empty() || data.len() > CHUNK_SIZE {
                    return check_record(&CacheEntry::Write {
                        vm,
                        disk,
                        offset,
                        digest,
                        data,
                    });
                }
                let len = data.len() as u32;
                self.stats.data_bytes += len as u64;
                // Dedupe: this segment first, then the store.
                let in_segment = self
                    .open
                    .get(&(vm.clone(), disk.clone()))
                    .and_then(|s| s.local.get(&digest).copied());
                if let Some(blob) = in_segment {
                    self.stats.dedupe_bytes += len as u64;
                    self.segment(&vm, &disk)?.items.push(Item::Local {
                        offset,
                        len,
                        digest,
                        blob,
                    });
                    return Ok(());
                }
                if let Some(loc) = index.lookup(&digest)? {
                    self.stats.dedupe_bytes += len as u64;
                    self.segment(&vm, &disk)?
                        .items
                        .push(Item::Rec(Record::Write {
                            offset,
                            len,
                            digest,
                            loc,
                        }));
                    return Ok(());
                }
                self.stats.unique_bytes += len as u64;
                let jobs = self.jobs.clone().expect("workers running");
                let seg = self.segment(&vm, &disk)?;
                let blob = seg.builder.reserve_blob();
                seg.local.insert(digest, blob);
                seg.items.push(Item::Local {
                    offset,
                    len,
                    digest,
                    blob,
                });
                seg.outstanding += 1;
                seg.bytes += len as usize;
                let job = Job {
                    data,
                    blob,
                    sealer: seg.builder.sealer(),
                    reply: seg.reply_tx.clone(),
                };
                self.open_bytes += len as usize;
                jobs.send(job).expect("workers outlive the pipeline");
            }
        }
        Ok(())
    }
}

/// A record the applier cannot take, whatever else the VM sent: a write that is not one aligned
/// chunk, a zero range that does not start on a chunk.
fn check_record(e: &CacheEntry) -> Result<(), PipelineError> {
    let bad = |vm: &str, disk: &str, offset: u64, detail: String| {
        Err(PipelineError::BadRecord {
            vm: vm.into(),
            disk: disk.into(),
            offset,
            detail,
        })
    };
    match e {
        CacheEntry::Write {
            vm,
            disk,
            offset,
            data,
            ..
        } if offset % CHUNK_SIZE as u64 != 0 || data.is_empty() || data.len() > CHUNK_SIZE => bad(
            vm,
            disk,
            *offset,
            format!("{} bytes, not one aligned chunk", data.len()),
        ),
        CacheEntry::Zero {
            vm,
            disk,
            offset,
            len,
        } if offset % CHUNK_SIZE as u64 != 0 || *len == 0 => bad(
            vm,
            disk,
            *offset,
            format!("zero range of {len} bytes not starting on a chunk"),
        ),
        _ => Ok(()),
    }
}

/// The committing half: everything a sealed segment needs, borrowed from the pipeline.
struct Committer<'a, 's> {
    store: &'s LocalStore,
    index: &'a ChunkIndex,
    applier: &'a mut Applier<'s>,
    sink: &'a mut Option<SegmentSink<'s>>,
    stats: &'a mut PipelineStats,
    committed: &'a mut Vec<Committed>,
}

impl Committer<'_, '_> {
    /// Stores the sealed segments of one flush, indexes their new chunks and applies them:
    /// - every segment is finished (its blobs laid out) and, in split mode, handed to the sink, in
    ///   order;
    /// - all are stored durably at once, on up to [`STORE_PARALLEL`] threads: the fsyncs of
    ///   different disks' segments overlap (one journal commit of the file system serves many),
    ///   where one after the other they bounded the drain with many agents;
    /// - only once every one is durable are their new chunks indexed, in one transaction (an
    ///   index entry never names a segment that a crash could lose);
    /// - then the applier takes them in flush order, so a disk's segments keep their order.
    fn commit_batch(&mut self, batch: Batch) -> Result<(), PipelineError> {
        if batch.is_empty() {
            return Ok(());
        }
        let Committer {
            store,
            index,
            applier,
            sink,
            stats,
            committed,
        } = self;
        let store: &LocalStore = store;
        let finished = par_map(batch, |((vm, disk), seg)| {
            let seq = seg.builder.seq();
            finish_segment(seg).map(|(bytes, records, new)| (vm, disk, seq, bytes, records, new))
        });
        let finished = finished.into_iter().collect::<Result<Vec<_>, _>>()?;
        if let Some(sink) = sink.as_mut() {
            for (vm, disk, seq, bytes, ..) in &finished {
                let path = LocalStore::segment_path(vm, disk, *seq);
                sink(&path, bytes).map_err(|detail| PipelineError::Upload {
                    path: path.clone(),
                    detail,
                })?;
            }
        }
        let refs: Vec<_> = finished.iter().collect();
        par_map(refs, |(vm, disk, seq, bytes, ..)| {
            store.put_segment(&LocalStore::segment_path(vm, disk, *seq), bytes)
        })
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
        let mut new = Vec::new();
        let mut applying = Vec::with_capacity(finished.len());
        // The segments' bytes are stored: freed here, not held through the index and the apply.
        for (vm, disk, seq, bytes, records, n) in finished {
            stats.segments += 1;
            stats.segment_bytes += bytes.len() as u64;
            stats.sealed_bytes += n.iter().map(|(_, l)| l.sealed_len as u64).sum::<u64>();
            new.extend(n);
            applying.push((vm, disk, seq, records));
        }
        index.insert_many(&new)?;
        for (vm, disk, seq, records) in applying {
            committed.extend(applier.push_segment(&vm, &disk, seq, records)?);
        }
        Ok(())
    }
}

/// Threads that store the segments of one flush at once ([`Committer::commit_batch`]).
pub const STORE_PARALLEL: usize = 16;

/// `f` over `items` on up to [`STORE_PARALLEL`] scoped threads (the calling one included), results
/// in the items' order.
fn par_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let n = items.len();
    if n <= 1 {
        return items.into_iter().map(f).collect();
    }
    let width = n.min(STORE_PARALLEL);
    let mut lanes: Vec<Vec<(usize, T)>> = (0..width).map(|_| Vec::new()).collect();
    for (i, t) in items.into_iter().enumerate() {
        lanes[i % width].push((i, t));
    }
    let f = &f;
    let mut out: Vec<(usize, R)> = std::thread::scope(|s| {
        let mut lanes = lanes.into_iter();
        let mine = lanes.next().expect("width >= 2");
        let handles: Vec<_> = lanes
            .map(|lane| {
                s.spawn(move || lane.into_iter().map(|(i, t)| (i, f(t))).collect::<Vec<_>>())
            })
            .collect();
        let mut out: Vec<(usize, R)> = mine.into_iter().map(|(i, t)| (i, f(t))).collect();
        for h in handles {
            out.extend(h.join().expect("a store thread panicked"));
        }
        out
    });
    out.sort_unstable_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

impl PipelineStats {
    fn add(&mut self, o: &PipelineStats) {
        self.records += o.records;
        self.data_bytes += o.data_bytes;
        self.zero_bytes += o.zero_bytes;
        self.dedupe_bytes += o.dedupe_bytes;
        self.unique_bytes += o.unique_bytes;
        self.sealed_bytes += o.sealed_bytes;
        self.segments += o.segments;
        self.segment_bytes += o.segment_bytes;
        self.skipped += o.skipped;
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        self.disp.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Waits for the segment's blobs, lays them out in blob order and builds the final records.
#[allow(clippy::type_complexity)]
fn finish_segment(
    mut seg: OpenSegment,
) -> Result<(Vec<u8>, Vec<Record>, Vec<(Digest, ChunkLoc)>), PipelineError> {
    let mut done: Vec<Option<Done>> = (0..seg.outstanding).map(|_| None).collect();
    drop(seg.reply_tx);
    for _ in 0..seg.outstanding {
        let d = seg
            .reply_rx
            .recv()
            .expect("a worker replies to every job it takes");
        let i = d.blob as usize;
        done[i] = Some(d);
    }
    seg.builder
        .reserve(done.iter().flatten().map(|d| d.sealed.len()).sum());
    let mut locs: Vec<Option<ChunkLoc>> = vec![None; done.len()];
    for d in done.into_iter().flatten() {
        let loc = seg.builder.push_blob(d.blob, &d.sealed, d.codec, d.raw_len);
        locs[d.blob as usize] = Some(loc);
    }
    let mut new = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for it in seg.items {
        let r = match it {
            Item::Rec(r) => r,
            Item::Local {
                offset,
                len,
                digest,
                blob,
            } => {
                let loc = locs[blob as usize].clone().expect("every blob was sealed");
                if seen.insert(blob) {
                    new.push((digest, loc.clone()));
                }
                Record::Write {
                    offset,
                    len,
                    digest,
                    loc,
                }
            }
        };
        seg.builder.push_record(r);
    }
    let (bytes, records) = seg.builder.finish();
    Ok((bytes, records, new))
}

fn worker(rx: Receiver<Job>, level: i32) {
    let mut z = zstd::bulk::Compressor::new(level).expect("valid zstd level");
    for job in rx {
        let raw_len = job.data.len() as u32;
        let (codec, bytes) = compress(&mut z, job.data);
        let sealed = job.sealer.seal(job.blob, bytes);
        let _ = job.reply.send(Done {
            blob: job.blob,
            sealed,
            codec,
            raw_len,
        });
    }
}

/// Bytes of a chunk tried first: if they do not shrink, the chunk is stored raw without compressing
/// the rest (random and already-compressed data cost 1/8 of a full attempt).
const SAMPLE: usize = 8 << 10;

/// zstd if it makes the chunk smaller, else the raw bytes.
fn compress(z: &mut zstd::bulk::Compressor<'_>, data: Vec<u8>) -> (Codec, Vec<u8>) {
    if data.len() > 2 * SAMPLE {
        match z.compress(&data[..SAMPLE]) {
            Ok(c) if c.len() * 100 < SAMPLE * 97 => {}
            _ => return (Codec::Raw, data),
        }
    }
    match z.compress(&data) {
        Ok(c) if c.len() < data.len() => (Codec::Zstd, c),
        _ => (Codec::Raw, data),
    }
}

/// Compresses and seals one chunk the way the workers do (for benchmarks).
pub fn encode_chunk(
    z: &mut zstd::bulk::Compressor<'_>,
    sealer: &BlobSealer,
    blob: u32,
    data: Vec<u8>,
) -> usize {
    let (_, bytes) = compress(z, data);
    sealer.seal(blob, bytes).len()
}
