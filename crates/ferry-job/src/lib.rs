//! Ferry's jobs, as the `ferry` command runs them on one host.
//!
//! Job: wire the tracker, cache, pipeline, store and applier into `replicate` (one run = one
//! consistent point for all disks of a VM), and resolve what `points list` and `restore` ask for.
//!
//! A replicate run: take the store lock → finish whatever a crash left (journal replay, then drain
//! the cache: a run whose tag reached the cache becomes its point) → write `Begin` to the cache →
//! scan every source against its replica's page map, appending changes to the cache (group commit)
//! while the pipeline drains it concurrently → write the `Tag` with each disk's size and blake3 →
//! sync → the pipeline stores the last segments and the applier commits the point.
//!
//! Must not: print. Progress goes through [`Progress`]; the binary decides how to show it.

pub mod appliance;
pub mod azure;
pub mod azure_pins;
pub mod identity;
mod paths;
pub mod plan;
mod points;
pub mod remote;
pub mod serve_config;
pub mod stores;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_apply::Committed;
use ferry_cache::{Cache, CacheConfig, CacheError};
use ferry_crypto::{MasterKey, ZERO_DIGEST};
use ferry_format::cache::CacheEntry;
use ferry_format::manifest::Point;
use ferry_format::segment::{DiskCut, PointKind, PointTag};
use ferry_pipeline::{Pipeline, PipelineConfig, PipelineError, PipelineStats};
use ferry_scan::{Change, ScanError, ScanReport, Source};
use ferry_store::{LocalStore, Replica, StoreError};

pub use azure::StoreLocation;
pub use paths::{
    default_cache_root, default_key_file, default_state_root, disk_name_from_path, validate_name,
};
pub use points::{list_points, resolve_point, restore_point, PointSelector, RestoreRequest};
pub use stores::{open_recovery, RecoveryStore};

/// Errors of jobs. Each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Key(#[from] ferry_crypto::CryptoError),
    #[error(transparent)]
    Restore(#[from] ferry_apply::RestoreError),
    #[error(transparent)]
    Apply(#[from] ferry_apply::ApplyError),
    /// the request is ambiguous or names something that does not exist (exit code 2)
    #[error("{0}")]
    Usage(String),
    /// key file missing for an existing store
    #[error("store {} was created with key {store_key}, and the key file {} does not exist; pass the store's key with --key-file (or FERRY_KEY_FILE)", store.display(), key.display())]
    MissingKey {
        store: PathBuf,
        store_key: String,
        key: PathBuf,
    },
    /// Azure store error
    #[error("Azure: {0}")]
    Azure(String),
    /// the run was stopped by a signal before its cut
    #[error("stopped before the point was cut; nothing was lost, the next run continues")]
    Stopped,
}

impl JobError {
    /// 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            JobError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Receives progress of long work.
pub trait Progress: Sync {
    /// A phase starts (`total` bytes, if known).
    fn start(&self, what: &str, total: u64);
    /// Bytes done so far in the current phase.
    fn update(&self, done: u64);
    /// The phase ended.
    fn finish(&self);
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn update(&self, _: u64) {}
    fn finish(&self) {}
}

/// Loads an existing key file.
pub fn load_key(key_file: &Path) -> Result<MasterKey, JobError> {
    Ok(MasterKey::load(key_file)?)
}

/// Opens a store, creating it (and a key, if the key file does not exist) when `create`.
pub fn open_store(store: &Path, key_file: &Path, create: bool) -> Result<LocalStore, JobError> {
    let existing = ferry_store::peek(store)?;
    let key = if key_file.exists() {
        MasterKey::load(key_file)?
    } else if let Some((_, store_key)) = existing {
        return Err(JobError::MissingKey {
            store: store.into(),
            store_key,
            key: key_file.into(),
        });
    } else if create {
        let k = MasterKey::create(key_file)?;
        tracing::warn!(key = %key_file.display(), id = %k.id(), "created a new master key; back it up — without it nothing in the store can be restored");
        k
    } else {
        return Err(StoreError::NotAStore { path: store.into() }.into());
    };
    Ok(LocalStore::open(store, key, create)?)
}

/// Opens (and recovers) the cache of `store` in `dir` with a quota of `quota` bytes.
pub fn open_cache(store: &LocalStore, dir: &Path, quota: u64) -> Result<Cache, JobError> {
    open_cache_recovering(store, dir, quota).map(|(c, _)| c)
}

/// [`open_cache`], also returning what recovery found (the run marks of undrained records).
pub fn open_cache_recovering(
    store: &LocalStore,
    dir: &Path,
    quota: u64,
) -> Result<(Cache, ferry_cache::Recovery), JobError> {
    ferry_durable::create_dir_durable(dir).map_err(|source| StoreError::Io {
        path: dir.to_owned(),
        op: "create",
        source,
    })?;
    identity::bind_cache(store, dir)?;
    let (cache, rec) = Cache::open(
        CacheConfig {
            dir: dir.to_owned(),
            quota,
            file_size: (quota / 8).clamp(1 << 20, 64 << 20),
        },
        store.key().clone(),
    )?;
    if rec.pending_records > 0 || rec.dropped_bytes > 0 {
        tracing::info!(
            pending = rec.pending_records,
            dropped_bytes = rec.dropped_bytes,
            "cache recovered after an interruption; its durable records go into the store first"
        );
    }
    Ok((cache, rec))
}

/// What `replicate` replicates and how.
#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    pub sources: Vec<PathBuf>,
    pub vm: String,
    /// One name per source.
    pub disks: Vec<String>,
    pub store: StoreLocation,
    /// Azure only: upload sealed segments and let `ferry apply` write the replicas near the store.
    pub split: bool,
    pub key_file: PathBuf,
    /// The cache directory (one per store).
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub kind: PointKind,
    pub pipeline: PipelineConfig,
    /// Group commit size: a sync once this many bytes of data were appended since the last one
    /// (the first after 2 MiB, each next one doubling up to this; 0: after every record).
    pub group_commit: u64,
    /// Points older than this are pruned (the newest never is); None keeps everything.
    pub retention: Option<std::time::Duration>,
    /// Azure: cap on upload bytes per second (None: unlimited).
    pub rate_limit: Option<u64>,
}

impl ReplicateOptions {
    /// The options `ferry replicate --once` uses by default, for one VM on `store`.
    pub fn new(
        sources: Vec<PathBuf>,
        vm: &str,
        disks: Vec<String>,
        store: StoreLocation,
        key_file: PathBuf,
        cache_dir: PathBuf,
    ) -> Self {
        ReplicateOptions {
            sources,
            vm: vm.to_owned(),
            disks,
            store,
            split: false,
            key_file,
            cache_dir,
            cache_size: 4 << 30,
            kind: PointKind::Crash,
            pipeline: PipelineConfig::default(),
            group_commit: 64 << 20,
            retention: Some(std::time::Duration::from_secs(24 * 3600)),
            rate_limit: None,
        }
    }
}

/// What one run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// Points committed by this run (crash leftovers first, then this run's point).
    pub committed: Vec<Committed>,
    /// The point this run cut, if it reached its tag.
    pub point: Option<Point>,
    pub scans: Vec<(String, ScanReport)>,
    pub pipeline: PipelineStats,
    /// What retention removed after the run.
    pub pruned: ferry_apply::retention::Pruned,
    /// Bytes sent to a remote store (request bodies): the WAN bytes.
    pub wan_bytes: u64,
    pub seconds: f64,
}

/// Runs one replication cycle: recovery, scan of every source, one point for all of them. Takes
/// the store's writer lock for the run.
pub fn replicate_once(
    o: &ReplicateOptions,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<RunReport, JobError> {
    replicate_run(o, progress, stop, None)
}

/// Takes the writer lock of the store `o` replicates to, for a caller that runs many cycles
/// ([`replicate_held`]) and must own the store in between (continuous `ferry replicate`).
pub fn lock_store(o: &ReplicateOptions) -> Result<ferry_store::StoreLock, JobError> {
    let store = open_store(&o.store.local_dir(), &o.key_file, true)?;
    Ok(store.lock()?)
}

/// [`replicate_once`] under a writer lock the caller already holds ([`lock_store`]).
pub fn replicate_held(
    o: &ReplicateOptions,
    progress: &dyn Progress,
    stop: &AtomicBool,
    held: &ferry_store::StoreLock,
) -> Result<RunReport, JobError> {
    replicate_run(o, progress, stop, Some(held))
}

fn replicate_run(
    o: &ReplicateOptions,
    progress: &dyn Progress,
    stop: &AtomicBool,
    held: Option<&ferry_store::StoreLock>,
) -> Result<RunReport, JobError> {
    let t0 = Instant::now();
    validate_name("VM", &o.vm)?;
    if o.sources.is_empty() || o.sources.len() != o.disks.len() {
        return Err(JobError::Usage(
            "give at least one SOURCE, and one --disk name per SOURCE".into(),
        ));
    }
    for (i, d) in o.disks.iter().enumerate() {
        validate_name("disk", d)?;
        if o.disks[..i].contains(d) {
            return Err(JobError::Usage(format!(
                "two sources are both named disk '{d}'; name them with --disk NAME (once per SOURCE)"
            )));
        }
    }
    // Open sources first: a bad path should fail before anything is written.
    let sources = o
        .sources
        .iter()
        .map(|p| Source::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let blobs = match &o.store {
        StoreLocation::Azure { url, .. } => Some(azure::connect_limited(url, o.rate_limit)?),
        StoreLocation::Local(_) if o.split => {
            return Err(JobError::Usage(
                "--split needs an azure:// store (it uploads segments for `ferry apply`)".into(),
            ))
        }
        StoreLocation::Local(_) => None,
    };
    let wan0 = blobs.as_ref().map_or(0, |b| b.stats().bytes_sent);
    let store = open_store(&o.store.local_dir(), &o.key_file, true)?;
    if ferry_apply::lifecycle::is_retired(store.root(), &o.vm).map_err(JobError::Usage)? {
        return Err(JobError::Usage(format!(
            "VM {}'s migration was completed in this store (ferry failover list says when): its replication ended for good; replicate the machine under another --vm name",
            o.vm
        )));
    }
    let _lock = match held {
        Some(_) => None,
        None => Some(store.lock()?),
    };
    if let (Some(b), StoreLocation::Azure { url, .. }) = (&blobs, &o.store) {
        identity::bind_azure(&store, b, url)?;
    }
    let cache = open_cache(&store, &o.cache_dir, o.cache_size)?;
    let (target, sink): (
        Option<Box<dyn ferry_apply::ReplicaTarget>>,
        Option<ferry_pipeline::SegmentSink>,
    ) = match &blobs {
        Some(b) if o.split => {
            let b = b.clone();
            (
                None,
                Some(Box::new(move |path: &str, bytes: &[u8]| {
                    b.put_block_blob(path, bytes.to_vec())
                        .map_err(|e| e.to_string())
                })),
            )
        }
        Some(b) => (
            Some(Box::new(azure::AzureTarget::new(
                b.clone(),
                store.key().id().to_string(),
            ))),
            None,
        ),
        None => (None, None),
    };
    let mut pipeline = Pipeline::with(&store, o.pipeline.clone(), target, sink)?;
    // Finish what a crashed run made durable.
    let mut reader = cache.reader();
    pipeline.drain_backlog(&cache, &mut reader)?;

    // Split mode: the store's journal must be this process's journal. Segments this side never
    // wrote (a lost state directory, another appliance) would be overwritten by name.
    if let (Some(b), true) = (&blobs, o.split) {
        for d in &o.disks {
            let local = store.list_segments(&o.vm, d)?.last().copied().unwrap_or(0);
            let remote = b
                .list(&format!("journal/{}/{d}/", o.vm))
                .map_err(azure::az)?
                .iter()
                .filter_map(|(n, _)| {
                    n.rsplit('/')
                        .next()?
                        .strip_suffix(".seg")?
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .unwrap_or(0);
            if remote > local {
                return Err(JobError::Usage(format!(
                    "the store's journal for {}/{d} has segments up to {remote}, but this process's staging store only knows {local} (lost state directory, or another appliance?); let `ferry apply` catch up, then delete journal/{}/{d}/ from the container (everything in it is applied), or use a new container",
                    o.vm, o.vm
                )));
            }
        }
    }
    // Refuse resizes before shipping anything.
    let manifest = pipeline.applier().manifest(&o.vm)?.clone();
    for (s, d) in sources.iter().zip(&o.disks) {
        if let Some(was) = manifest.disks.get(d).and_then(|ds| ds.known_size()) {
            if was != s.size {
                return Err(JobError::Usage(format!(
                    "disk '{d}' of VM '{}' was {} bytes and {} is now {} bytes; Ferry does not follow a resize yet — replicate it under a new --disk name",
                    o.vm,
                    was,
                    s.path.display(),
                    s.size
                )));
            }
        }
    }

    let mut run = [0u8; 16];
    ferry_crypto::random_bytes(&mut run)?;
    let now_ns = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    let mut writer = cache.writer()?;
    writer.append(&CacheEntry::Begin {
        vm: o.vm.clone(),
        run,
        time_ns: now_ns(SystemTime::now()),
        disks: o
            .disks
            .iter()
            .zip(&sources)
            .map(|(d, s)| (d.clone(), s.size))
            .collect(),
    })?;

    let (scans, pipeline_result) = std::thread::scope(|s| {
        let cache2 = cache.clone();
        let drainer = s.spawn(move || {
            let r = pipeline.drain(&cache2, &mut reader, false);
            (pipeline, r)
        });
        let scans = scan_all(o, &store, &sources, &mut writer, run, progress, stop);
        // Whatever happened, make what was appended durable and let the drainer finish.
        let synced = writer.sync();
        cache.close();
        let (pipeline, r) = drainer.join().expect("pipeline thread panicked");
        (
            scans.and_then(|s| synced.map(|_| s).map_err(JobError::from)),
            (pipeline, r),
        )
    });
    let (mut pipeline, drained) = pipeline_result;
    drained?;
    let scans = scans?;
    let committed = pipeline.take_committed();
    let stats = pipeline.stats.clone();
    drop(pipeline);
    let pruned = match (o.retention, &blobs) {
        (None, _) => Default::default(),
        (Some(r), None) => ferry_apply::retention::prune(&store, r)?,
        (Some(r), Some(b)) => azure::prune(&store, b, r, o.split)?,
    };
    let run_hex = hex::encode(run);
    let point = committed
        .iter()
        .find(|c| c.vm == o.vm && c.point.run == run_hex)
        .map(|c| c.point.clone());
    if scans.is_none() {
        return Err(JobError::Stopped);
    }
    Ok(RunReport {
        committed,
        point,
        scans: scans.unwrap_or_default(),
        pipeline: stats,
        pruned,
        wan_bytes: blobs.as_ref().map_or(0, |b| b.stats().bytes_sent) - wan0,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The first group commit of a run, in bytes; each next one doubles, up to `group_commit`.
const FIRST_GROUP_COMMIT: u64 = 2 << 20;

/// Scans every source into the cache and appends the tag. `Ok(None)`: stopped before the tag.
fn scan_all(
    o: &ReplicateOptions,
    store: &LocalStore,
    sources: &[Source],
    writer: &mut ferry_cache::CacheWriter,
    run: [u8; 16],
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<Option<Vec<(String, ScanReport)>>, JobError> {
    let mut reports = Vec::new();
    let mut cuts = Vec::new();
    // The drain sees only what a sync made durable, so the first groups are small and double up to
    // `group_commit`: at 64 MiB from the start the drain sat idle for the first ~0.15 s of a run.
    let mut sync_at = FIRST_GROUP_COMMIT.min(o.group_commit);
    for (src, disk) in sources.iter().zip(&o.disks) {
        let dir = store.replica_dir(&o.vm, disk);
        let replica = if dir.join("current.map").exists() {
            Some(Replica::open(&dir)?)
        } else {
            None
        };
        let mut since_sync = 0u64;
        let mut sink_err: Option<CacheError> = None;
        progress.start(&format!("scanning {}", src.path.display()), src.size);
        let r = ferry_scan::scan(
            src,
            store.key(),
            o.pipeline.threads,
            |first, out| match &replica {
                Some(r) => r.read_map(first, out).map_err(|e| e.to_string()),
                None => {
                    out.fill(ZERO_DIGEST);
                    Ok(())
                }
            },
            |c| {
                let e = match c {
                    Change::Write {
                        offset,
                        digest,
                        data,
                    } => {
                        since_sync += data.len() as u64;
                        CacheEntry::Write {
                            vm: o.vm.clone(),
                            disk: disk.clone(),
                            offset,
                            digest,
                            data,
                        }
                    }
                    Change::Zero { offset, len } => CacheEntry::Zero {
                        vm: o.vm.clone(),
                        disk: disk.clone(),
                        offset,
                        len,
                    },
                };
                let r = writer.append_owned(e).and_then(|_| {
                    if since_sync >= sync_at {
                        since_sync = 0;
                        sync_at = (sync_at * 2).min(o.group_commit);
                        // The scan goes on while the group is synced (the drain takes it once it
                        // is durable); this waits only for the previous group's sync. A cache
                        // file's rotation and the last sync, after the tag, wait for theirs.
                        writer.sync_behind()
                    } else {
                        Ok(())
                    }
                });
                r.map_err(|e| {
                    let s = e.to_string();
                    sink_err = Some(e);
                    s
                })
            },
            |done| progress.update(done),
            stop,
        );
        progress.finish();
        if let Some(e) = sink_err {
            return Err(e.into());
        }
        let r = match r {
            Err(ScanError::Stopped { .. }) => return Ok(None),
            r => r?,
        };
        tracing::info!(
            disk = %disk,
            read = r.bytes_read - r.hole_bytes,
            holes = r.hole_bytes,
            changed_chunks = r.changed_chunks,
            "scan finished"
        );
        cuts.push(DiskCut {
            name: disk.clone(),
            size: src.size,
            blake3: r.blake3,
        });
        reports.push((disk.clone(), r));
    }
    writer.append(&CacheEntry::Tag {
        vm: o.vm.clone(),
        tag: PointTag {
            run,
            time_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            kind: o.kind,
            disks: cuts,
        },
    })?;
    Ok(Some(reports))
}
