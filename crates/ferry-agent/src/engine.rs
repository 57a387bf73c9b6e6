//! The agent's engine: tracks, reads and ships changed chunks continuously, and cuts points.
//!
//! Job: one thread that owns the disks. With the **eBPF tracker** it drains the kernel's dirty
//! bitmaps every few hundred milliseconds, reads the dirty chunks (io_uring, O_DIRECT, coalesced)
//! and sends the ones whose content really changed, so the residual at a cut stays small; at a cut
//! it freezes every filesystem on the disks, drains and reads until a drain comes back empty,
//! tags, and thaws. With the **scan tracker** (no eBPF: no BTF, old kernel, image files) every cut
//! reads every chunk and sends what differs. The shipper (`ship.rs`) sends the records under credit
//! and reports acknowledged tags; a control socket (`control.rs`) asks for cuts on demand.
//!
//! Invariants:
//! - **Nothing is forgotten before it is a point.** Chunks leave the dirty set only when read, and
//!   their CVs reach the committed maps only after the tag of their run is acknowledged (through a
//!   pending-run file written before the tag is sent). A crash loses no change: the next start
//!   resyncs against the committed maps, and chunks of runs that may or may not be points are
//!   unknown, so they are sent.
//! - **No point while the tracker may have missed a write.** A drain that reports lost events, an
//!   unclean stop, or writes seen in the kernel's counters while the agent was away put every chunk
//!   of the disk back in the dirty set; a cut waits until all of them are read, and its whole-disk
//!   digest can only be computed when no chunk's content is unknown.
//! - **A cut is an instant.** The tag is sent only if a drain came back empty while the
//!   filesystems were frozen (or, with nothing mounted, while nothing wrote) and the freeze held
//!   until after it; otherwise the cut is abandoned (no tag) and the run goes on.
//! - Nothing is written to a protected filesystem while it is frozen (records made while frozen are
//!   held in memory and handed to the shipper after the thaw).
//!
//! Must not: publish a point whose digest it did not compute from what it read, or block a frozen
//! filesystem longer than the freeze bound.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use ferry_crypto::is_zero;
use ferry_read::ChunkReader;
use ferry_wire::{DiskCut, InvDisk, PointKind, PointTag, RunId};
use tokio::sync::mpsc;

use crate::bits::Bits;
use crate::control::{CutReply, Request};
use crate::cv::{self, chunk_cv, Cv, CHUNK, UNKNOWN};
use crate::persist::{self, CleanDisk, CleanStop, CvFile};
use crate::ship::{self, now_ns, Event, Rec, ShipStats, ShipTo};
use crate::{AgentError, AgentIdentity};

/// Which tracker to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerChoice {
    /// eBPF when the kernel and the disks allow it, else scan (with a log line saying why).
    Auto,
    Ebpf,
    Scan,
}

/// The built-in MariaDB/MySQL hook: `FLUSH TABLES WITH READ LOCK` held across the freeze of an
/// app-consistent cut.
#[derive(Clone, Debug)]
pub struct MysqlOptions {
    pub target: ferry_freeze::MysqlTarget,
    pub user: String,
    pub password_file: Option<PathBuf>,
    pub timeout: Duration,
}

/// Everything the agent needs to run.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub server: String,
    pub disks: Vec<PathBuf>,
    /// One name per disk.
    pub names: Vec<String>,
    pub vm: String,
    pub state_dir: PathBuf,
    pub tracker: TrackerChoice,
    /// Crash-consistent points this often.
    pub crash_interval: Duration,
    /// App-consistent points this often (`None`: only on demand).
    pub app_interval: Option<Duration>,
    /// Hard bound on a freeze (the watchdog thaws at this point, and the cut is abandoned).
    pub freeze_bound: Duration,
    /// Expedite RCU grace periods during FIFREEZE ([`ferry_freeze::Freezer::expedite_rcu`]).
    pub expedite_rcu: bool,
    /// Most bytes per second sent to the server (`max_rate`); `None`: as fast as its credit allows.
    pub max_rate: Option<u64>,
    pub hooks_dir: PathBuf,
    pub hook_timeout: Duration,
    /// Whether the process server may ask this agent to cut over (`ferry failover
    /// --shutdown-source`); off unless the operator of this machine opts in.
    pub allow_remote_cutover: bool,
    pub mysql: Option<MysqlOptions>,
    /// A program run while the filesystems are frozen (tests, diagnostics); its time counts
    /// against the freeze bound.
    pub frozen_hook: Option<PathBuf>,
    /// Cut one point of this kind, wait for its acknowledgement, and stop.
    pub once: Option<PointKind>,
    /// How often the eBPF tracker is drained between cuts.
    pub drain_every: Duration,
    /// `ferry-agent resync` asked before the server answered: done once it does.
    pub resync_asked: Arc<AtomicBool>,
}

/// What a finished agent did (for `--once` output and logs).
#[derive(Clone, Debug, Default)]
pub struct AgentSummary {
    pub points: Vec<CutReply>,
    pub records: u64,
    pub data_bytes: u64,
    pub reconnects: u64,
    pub tracker: String,
}

/// How long an acknowledged point may wait for its id from the process server.
const POINT_NAME_WAIT: Duration = Duration::from_secs(60);

/// Most chunks read per batch between drains (16 MiB).
const BATCH: usize = 256;

struct Disk {
    /// The replica's name (records, tags, the chunk map's file name); the kernel's name for the
    /// disk until the process server's `Holding` names the replica.
    name: String,
    /// The name it was given on this machine (device or image file name), for logs.
    label: String,
    path: PathBuf,
    size: u64,
    /// The disk's stable identity (see [`crate::ident`]).
    id: String,
    reader: ChunkReader,
    map: CvFile,
    /// Latest known CV of every chunk (what was last read; [`UNKNOWN`] if never).
    cur: Vec<Cv>,
    /// Chunks to read.
    todo: Bits,
    /// Chunks read in the current run.
    touched: Bits,
    /// The run this disk's records build on: the last run of it the process server holds (or
    /// will, once the tags already handed to the shipper arrive).
    base: RunId,
}

/// A protected disk before its replica is known: open for reading, identified.
struct Source {
    label: String,
    path: PathBuf,
    size: u64,
    id: String,
    reader: ChunkReader,
}

impl Source {
    /// Opens a protected disk (`depth` reads in flight) and reads its identity.
    fn open(path: &Path, label: &str, depth: u32) -> Result<Source, AgentError> {
        let reader = ChunkReader::open(path, depth)?;
        let size = reader.size();
        if size == 0 {
            return Err(AgentError::Usage(format!(
                "{} is empty; nothing to protect",
                path.display()
            )));
        }
        let id = crate::ident::disk_id(path)
            .map_err(|e| AgentError::Usage(format!("cannot identify {}: {e}", path.display())))?;
        Ok(Source {
            label: label.to_owned(),
            path: path.to_owned(),
            size,
            id,
            reader,
        })
    }

    /// The disk with the chunk map of replica `replica` (as it is on disk: [`recover_state`]
    /// decides whether it can be trusted).
    fn into_disk(self, state_dir: &Path, replica: &str) -> Result<Disk, AgentError> {
        let (map, cur) = CvFile::open(state_dir, replica, self.size)?;
        let chunks = self.size.div_ceil(CHUNK);
        Ok(Disk {
            name: replica.to_owned(),
            label: self.label,
            path: self.path,
            size: self.size,
            id: self.id,
            reader: self.reader,
            base: map.header().base,
            map,
            cur,
            todo: Bits::new(chunks),
            touched: Bits::new(chunks),
        })
    }
}

enum Track {
    Ebpf(Box<ferry_ebpf::Tracker>),
    Scan,
}

/// How long before a scan pass an image file's last write must lie for its modification time to
/// show a write during the pass (timestamps are coarse: a jiffy, a second, FAT's two).
const MTIME_SLACK: Duration = Duration::from_secs(2);

/// Scan mode: what shows whether a disk was written between the start of a pass and its cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Witness {
    /// A block device's kernel I/O counters (`/sys/dev/block/MAJ:MIN/stat`).
    Counters(persist::DiskCounters),
    /// An image file's modification time and length.
    File { modified: SystemTime, len: u64 },
}

impl Witness {
    fn now(path: &Path) -> Option<Witness> {
        if let Some(c) = persist::disk_counters(path) {
            return Some(Witness::Counters(c));
        }
        let m = std::fs::metadata(path).ok()?;
        if !m.is_file() {
            return None;
        }
        Some(Witness::File {
            modified: m.modified().ok()?,
            len: m.len(),
        })
    }

    /// The witness as a pass starts. An image modified within [`MTIME_SLACK`] is waited for
    /// (once): a write during the pass could not be told from one just before it. `None` if
    /// there is no witness, or the image is still being written.
    fn at_pass_start(path: &Path) -> Option<Witness> {
        for _ in 0..2 {
            let w = Witness::now(path)?;
            let Witness::File { modified, .. } = w else {
                return Some(w);
            };
            let age = SystemTime::now()
                .duration_since(modified)
                .unwrap_or(Duration::ZERO);
            if age >= MTIME_SLACK {
                return Some(w);
            }
            std::thread::sleep(MTIME_SLACK - age);
        }
        None
    }

    /// Nothing was written between `self` (a pass's start) and `now`, and nothing is in flight.
    fn unchanged(&self, now: &Witness) -> bool {
        match (self, now) {
            (Witness::Counters(a), Witness::Counters(b)) => {
                a.writes == b.writes
                    && a.write_sectors == b.write_sectors
                    && a.discards == b.discards
                    && b.in_flight == 0
            }
            (Witness::File { .. }, Witness::File { .. }) => self == now,
            _ => false,
        }
    }
}

/// A cut that was asked for.
/// How long the cutover's final point may take to read what the read-only remount flushed.
const QUIESCED_SETTLE: Duration = Duration::from_secs(600);

struct Want {
    kind: PointKind,
    reply: Option<Sender<Result<CutReply, String>>>,
    /// The cutover's final point (`crate::cutover`): no hooks, no freeze of its own.
    quiesced: bool,
    /// With `quiesced`: some protected filesystem stayed writable, so freeze for the point.
    freeze_writable: bool,
}

/// A tagged run waiting for its acknowledgement (and then for the server's point id).
struct Awaiting {
    run: RunId,
    reply: CutReply,
    waiters: Vec<Sender<Result<CutReply, String>>>,
    acked: Option<Instant>,
}

struct Engine<'a> {
    /// Cut over (`crate::cutover`): no scheduled point.
    cut_over: Arc<AtomicBool>,
    /// What a cutover the server asks for needs, and the engine's own request channel (the
    /// cutover runs on its own thread and asks the engine for the final point).
    cutover: Arc<crate::cutover::Ctx>,
    self_tx: Sender<Request>,
    o: &'a AgentOptions,
    /// Set by SIGINT/SIGTERM: checked wherever the engine could wait on the shipper.
    stop: &'a AtomicBool,
    disks: Vec<Disk>,
    track: Track,
    tx: Option<mpsc::Sender<Rec>>,
    /// Records made while frozen, sent after the thaw.
    held: Option<Vec<Rec>>,
    events: Receiver<Event>,
    requests: Receiver<Request>,
    run: RunId,
    wants: VecDeque<Want>,
    awaiting: VecDeque<Awaiting>,
    points: Vec<CutReply>,
    freezer: Option<ferry_freeze::Freezer>,
    /// Scan mode: a full pass for the next cut has been queued.
    scan_pass: bool,
    /// Scan mode: each disk's [`Witness`] as that pass began (before any of its reads); the cut
    /// compares it with the disk's now and is abandoned unless nothing wrote meanwhile.
    scan_from: Vec<Option<Witness>>,
    /// Why the last drain or start-up put whole disks back in the dirty set (for the cut's error).
    resyncing: Option<String>,
    stats: Arc<ShipStats>,
    /// Crash-consistent points this often: the server's policy if it sets one, else `--crash-interval`.
    crash_every: Duration,
    /// App-consistent points this often (`None`: on demand only): idem.
    app_every: Option<Duration>,
    /// Where the intervals come from (`agent` or `server`), for status and the server.
    intervals_from: &'static str,
    /// The server changed the intervals: the main loop reschedules.
    intervals_changed: bool,
    /// Disconnected from the server since when, and why (`None`: connected).
    disconnected: Option<(std::time::SystemTime, String)>,
}

fn new_run() -> Result<RunId, AgentError> {
    let mut run: RunId = [0; 16];
    ferry_crypto::random_bytes(&mut run).map_err(|e| AgentError::Usage(e.to_string()))?;
    Ok(run)
}

/// Runs the agent until `stop` (a clean stop: the dirty state is saved) or, with `once`, until
/// its point is acknowledged.
pub fn run_agent(o: &AgentOptions, stop: &AtomicBool) -> Result<AgentSummary, AgentError> {
    if o.disks.is_empty() || o.disks.len() != o.names.len() {
        return Err(AgentError::Usage("give at least one --disk".into()));
    }
    let id = AgentIdentity::load(&o.state_dir)?;
    let _lock = crate::control::lock_state_dir(&o.state_dir)?;
    // A frozen filesystem left by an agent that died mid-cut (the watchdog thaws those; this is
    // the belt to its braces).
    if ferry_freeze::is_root() {
        // And the RCU switch an agent that died inside FIFREEZE left on, whatever this agent's
        // settings (ferry_freeze::rcu).
        match ferry_freeze::rcu::restore_if_ours() {
            Ok(true) => tracing::warn!(
                "put {} back to 0: an earlier agent died while freezing",
                ferry_freeze::rcu::KNOB
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot put {} back to 0", ferry_freeze::rcu::KNOB)
            }
        }
        match ferry_freeze::discover(&o.disks) {
            Ok(mounts) if !mounts.is_empty() => match ferry_freeze::thaw_all(&mounts) {
                Ok(thawed) if !thawed.is_empty() => {
                    tracing::warn!(
                        ?thawed,
                        "thawed filesystems left frozen by an earlier agent"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot thaw filesystems left frozen"),
            },
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the filesystems on the protected disks")
            }
        }
    }
    let track = choose_tracker(o)?;
    let tracker_name = match track {
        Track::Ebpf(_) => "ebpf",
        Track::Scan => "scan",
    };
    let mut sources = Vec::new();
    for (path, name) in o.disks.iter().zip(&o.names) {
        let mut src = Source::open(path, name, 16)?;
        if let Some(other) = sources.iter().find(|s: &&Source| s.id == src.id) {
            let same = |p: &Path| std::fs::canonicalize(p).ok();
            if same(&other.path) == same(path) {
                return Err(AgentError::Usage(format!(
                    "{} and {} are the same disk ({}); give each disk once",
                    other.path.display(),
                    path.display(),
                    src.id
                )));
            }
            // Two disks with one serial (cloned virtual disks): tell them apart by name, which
            // may swap; say so.
            tracing::warn!(disk = %name, other = %other.label, id = %src.id, "two disks report the same identity; this one is identified by its name too, which may change across reboots");
            src.id = format!("{}@{name}", src.id);
        }
        sources.push(src);
    }

    let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
    let (req_tx, req_rx) = crossbeam_channel::unbounded();
    let (tx, rx) = mpsc::channel::<Rec>(64);
    let stats = Arc::new(ShipStats::default());
    let abandon = Arc::new(AtomicBool::new(false));
    let to = ShipTo {
        server: o.server.clone(),
        state_dir: o.state_dir.clone(),
        vm: o.vm.clone(),
        max_rate: o.max_rate,
        disks: sources
            .iter()
            .map(|s| InvDisk {
                name: s.label.clone(),
                size: s.size,
                id: s.id.clone(),
            })
            .collect(),
    };
    let rt = crate::runtime()?;
    let shipper = {
        let (stats, abandon) = (stats.clone(), abandon.clone());
        std::thread::Builder::new()
            .name("ship".into())
            .spawn(move || {
                let _ = rt.block_on(ship::ship(to, id, rx, ev_tx, &stats, &abandon));
            })
            .map_err(|e| AgentError::Usage(format!("cannot start the shipper thread: {e}")))?
    };
    let stop_shipper = |tx: mpsc::Sender<Rec>, shipper: std::thread::JoinHandle<()>| {
        abandon.store(true, Ordering::Relaxed);
        drop(tx);
        let _ = shipper.join();
    };
    // Nothing is read or sent before the process server says what it holds: the chunk maps are
    // trusted only as far as it confirms them.
    // The control socket answers from now on: `ferry-agent status` says what the agent waits for,
    // a cut asked before the server answers fails at once.
    // A cutover in effect (the agent restarted during it): the server hears of it again, and no
    // scheduled point is cut until it is rolled back.
    let cut_over = Arc::new(AtomicBool::new(false));
    match crate::cutover::load(&o.state_dir) {
        Ok(Some(c)) => {
            if let Some(p) = &c.final_point {
                cut_over.store(true, Ordering::SeqCst);
                stats.notice(ferry_wire::notice::CUTOVER, 0, p);
            }
            tracing::warn!(final_point = ?c.final_point, mounts = ?c.mounts, "cut over: `ferry-agent cutover --rollback` makes the source writable again");
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "cannot read the cutover record"),
    }
    let cutover = Arc::new(crate::cutover::Ctx {
        state_dir: o.state_dir.clone(),
        disks: o.disks.clone(),
        vm: o.vm.clone(),
        hooks_dir: o.hooks_dir.clone(),
        hook_timeout: o.hook_timeout,
        active: cut_over.clone(),
    });
    if o.allow_remote_cutover {
        // Sent at every connection: the server may ask for a cutover.
        stats.notice(ferry_wire::notice::REMOTE_CUTOVER, 0, "allowed");
    }
    let self_tx = req_tx.clone();
    let control = match crate::control::listen(&o.state_dir, req_tx, cutover.clone()) {
        Ok(c) => c,
        Err(e) => {
            stop_shipper(tx, shipper);
            return Err(e);
        }
    };
    let holding = match wait_for_holding(&ev_rx, &req_rx, stop, o, &stats) {
        Ok(Some(h)) => h,
        Ok(None) => {
            stop_shipper(tx, shipper);
            return Ok(AgentSummary {
                points: Vec::new(),
                records: 0,
                data_bytes: 0,
                reconnects: stats.reconnects.load(Ordering::Relaxed),
                tracker: tracker_name.into(),
            });
        }
        Err(e) => {
            stop_shipper(tx, shipper);
            return Err(e);
        }
    };
    if holding.open != ferry_wire::NO_RUN {
        tracing::info!(run = %hex::encode(holding.open), "the process server holds the start of a run an earlier agent left open; the new run voids it");
    }
    let mut disks = Vec::new();
    for (src, held) in sources.into_iter().zip(&holding.disks) {
        if held.replica != src.label {
            tracing::info!(disk = %src.label, replica = %held.replica, id = %src.id, "this disk's replica on the process server is named after its identity, not its current device name");
        }
        disks.push(src.into_disk(&o.state_dir, &held.replica)?);
    }
    let resyncing = match recover_state(o, &mut disks, &track, &holding) {
        Ok(r) => r,
        Err(e) => {
            stop_shipper(tx, shipper);
            return Err(e);
        }
    };
    let freezer = if ferry_freeze::is_root() {
        match ferry_freeze::Freezer::new() {
            Ok(f) => Some(f.expedite_rcu(o.expedite_rcu)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot use fsfreeze (no watchdog binary?); points are crash-consistent only while nothing writes");
                None
            }
        }
    } else {
        None
    };
    // The scan tracker's start-up pass (every chunk is dirty) is the first cut's pass, witnessed
    // before any of its chunks is read.
    let scan_pass = matches!(track, Track::Scan);
    let scan_from = if scan_pass {
        disks
            .iter()
            .map(|d| Witness::at_pass_start(&d.path))
            .collect()
    } else {
        Vec::new()
    };
    let mut e = Engine {
        o,
        stop,
        disks,
        track,
        tx: Some(tx),
        held: None,
        events: ev_rx,
        requests: req_rx,
        run: new_run()?,
        wants: VecDeque::new(),
        awaiting: VecDeque::new(),
        points: Vec::new(),
        freezer,
        scan_pass,
        scan_from,
        resyncing,
        stats: stats.clone(),
        crash_every: o.crash_interval,
        app_every: o.app_interval,
        intervals_from: "agent",
        intervals_changed: false,
        disconnected: None,
        cut_over,
        cutover,
        self_tx,
    };
    e.announce_intervals();
    if let Some(why) = &e.resyncing {
        e.stats
            .notice(ferry_wire::notice::RESYNC, 0, &format!("at start: {why}"));
    }
    if o.resync_asked.swap(false, Ordering::Relaxed) {
        e.force_resync();
    }
    if let Some(kind) = o.once {
        e.wants.push_back(Want {
            kind,
            reply: None,
            quiesced: false,
            freeze_writable: false,
        });
    }
    let r = match e.main_loop(stop) {
        // Starting again against what the server holds: keep the dirty set like a clean stop
        // (what was read but not acknowledged is in it), so the next start needs no resync if
        // nothing wrote meanwhile.
        Err(AgentError::Diverged(why)) => {
            if let Err(err) = e.clean_stop() {
                tracing::warn!(error = %err, "cannot save the dirty state; the next start resyncs");
            }
            Err(AgentError::Diverged(why))
        }
        // Stopped while the server was unreachable: a clean stop all the same.
        Err(AgentError::Stopping) => e.clean_stop(),
        r => r.and_then(|()| e.clean_stop()),
    };
    stop_shipper(
        e.tx.take().expect("sender lives while the engine runs"),
        shipper,
    );
    drop(control);
    r?;
    Ok(AgentSummary {
        points: std::mem::take(&mut e.points),
        records: stats.records.load(Ordering::Relaxed),
        data_bytes: stats.data_bytes.load(Ordering::Relaxed),
        reconnects: stats.reconnects.load(Ordering::Relaxed),
        tracker: tracker_name.into(),
    })
}

fn choose_tracker(o: &AgentOptions) -> Result<Track, AgentError> {
    use std::os::unix::fs::FileTypeExt;
    if o.tracker == TrackerChoice::Scan {
        tracing::info!("tracker: scan (chosen with --tracker scan): every cut reads every chunk");
        return Ok(Track::Scan);
    }
    let why_not = (|| {
        for d in &o.disks {
            let is_blk = std::fs::metadata(d)
                .map(|m| m.file_type().is_block_device())
                .unwrap_or(false);
            if !is_blk {
                return Err(format!(
                    "{} is not a block device (the eBPF tracker watches the block layer)",
                    d.display()
                ));
            }
        }
        ferry_ebpf::Tracker::available()?;
        ferry_ebpf::Tracker::open(&o.disks).map_err(|e| e.to_string())
    })();
    match why_not {
        Ok(t) => {
            tracing::info!(
                disks = o.disks.len(),
                "tracker: eBPF (block layer); dirty chunks are read and shipped continuously"
            );
            Ok(Track::Ebpf(Box::new(t)))
        }
        Err(why) if o.tracker == TrackerChoice::Auto => {
            tracing::info!(%why, "tracker: scan (the eBPF tracker cannot run here): every cut reads every chunk");
            Ok(Track::Scan)
        }
        Err(why) => Err(AgentError::Usage(format!(
            "the eBPF tracker cannot run here: {why}; use --tracker auto or scan"
        ))),
    }
}

/// Waits for the first connection's `Holding`; `None` if asked to stop first.
fn wait_for_holding(
    events: &Receiver<Event>,
    requests: &Receiver<Request>,
    stop: &AtomicBool,
    o: &AgentOptions,
    stats: &ShipStats,
) -> Result<Option<ship::Holding>, AgentError> {
    let server = &o.server;
    let started = Instant::now();
    let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let resync_asked = &o.resync_asked;
    let mut said = Instant::now();
    let mut last_error: Option<String> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let waiting = format!(
            "not connected: waiting for the process server at {server} since {since} ({} s){}",
            started.elapsed().as_secs(),
            last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
        while let Ok(req) = requests.try_recv() {
            match req {
                Request::Status { reply } => {
                    let _ = reply.send(serde_json::json!({
                        "vm": o.vm,
                        "server": server,
                        "connected": false,
                        "state": "waiting for the process server",
                        "waiting_since": since,
                        "last_error": last_error,
                        "conditions": [{"name": "agent_disconnected", "level": "warning", "message": waiting}],
                    }));
                }
                Request::Cut { reply, .. } | Request::CutQuiesced { reply, .. } => {
                    let _ = reply.send(Err(format!(
                        "{waiting}; no point can be made until it answers"
                    )));
                }
                // Queued: sent once connected.
                Request::Notice { kind, text } => stats.notice(kind, 0, &text),
                // Done once the server answers (the agent resyncs then).
                Request::Resync => resync_asked.store(true, Ordering::Relaxed),
            }
        }
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Holding(h)) => return Ok(Some(h)),
            Ok(Event::Failed(e)) => return Err(e),
            Ok(Event::Disconnected(why)) => last_error = Some(why),
            Ok(_) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(AgentError::Protocol("the shipper stopped".into()))
            }
        }
        if said.elapsed() >= Duration::from_secs(30) {
            tracing::warn!(%server, waited_s = started.elapsed().as_secs(), "still waiting for the process server; nothing is read or sent until it answers (changes are tracked meanwhile)");
            said = Instant::now();
        }
    }
}

/// What to do with a disk's chunk map, given what the process server holds of the disk.
#[derive(Debug, PartialEq, Eq)]
enum MapFate {
    /// The map describes exactly the server's last run of the disk.
    Keep,
    /// It does once these pending runs (acknowledged after all) are folded in, in this order.
    Fold(Vec<RunId>),
    /// It describes something else: forget every CV (every chunk is read and sent).
    Reset(String),
}

/// `have`: the map's header; `want`: the header the map must have (store, VM, disk identity and
/// the server's last run of the disk as `base`); `pending`: (run, the run it built on) of each
/// pending run that covers this disk.
fn reconcile(
    have: &persist::CvHeader,
    want: &persist::CvHeader,
    pending: &[(RunId, RunId)],
) -> MapFate {
    if have.store.is_empty() {
        return MapFate::Reset("no chunk map yet (initial sync)".into());
    }
    if have.store != want.store {
        return MapFate::Reset(format!(
            "the map describes store {}, the process server now replicates to store {}",
            have.store, want.store
        ));
    }
    if have.vm != want.vm {
        return MapFate::Reset(format!(
            "the map describes VM '{}', this agent now protects VM '{}'",
            have.vm, want.vm
        ));
    }
    if have.disk_id != want.disk_id {
        return MapFate::Reset(format!(
            "the map describes disk {}, this replica's disk is now {}",
            have.disk_id, want.disk_id
        ));
    }
    // Follow the pending runs from the map's base; a run equal to the base is folded again (its
    // CVs may have been written only in part before a crash).
    let mut chain = Vec::new();
    let mut cur = have.base;
    if let Some((r, _)) = pending.iter().find(|(r, _)| *r == cur) {
        chain.push(*r);
    }
    loop {
        if cur == want.base {
            return if chain.is_empty() {
                MapFate::Keep
            } else {
                MapFate::Fold(chain)
            };
        }
        match pending
            .iter()
            .find(|(r, b)| *b == cur && !chain.contains(r))
        {
            Some((r, _)) => {
                chain.push(*r);
                cur = *r;
            }
            None => {
                return MapFate::Reset(format!(
                    "the process server holds run {} of the disk, the map describes run {}",
                    hex::encode(want.base),
                    hex::encode(have.base)
                ))
            }
        }
    }
}

/// Start-up: each chunk map is bound to what the process server holds (kept, brought forward by
/// the pending runs it holds, or reset); the chunks of pending runs it does not hold become
/// unknown; a clean stop's dirty set is reused when nothing wrote meanwhile, and everything else
/// is resynced. Returns why a resync runs, if one does.
fn recover_state(
    o: &AgentOptions,
    disks: &mut [Disk],
    track: &Track,
    holding: &ship::Holding,
) -> Result<Option<String>, AgentError> {
    let leftover = persist::leftover_pending(&o.state_dir);
    let runs: Vec<&(RunId, persist::RunCvs)> =
        leftover.iter().filter_map(|(_, p)| p.as_ref()).collect();
    for (d, held) in disks.iter_mut().zip(&holding.disks) {
        let want = persist::CvHeader {
            size: d.size,
            chunks: d.size.div_ceil(CHUNK),
            base: held.last_run,
            store: holding.store.clone(),
            vm: o.vm.clone(),
            disk_id: d.id.clone(),
        };
        let mine = |run: &RunId| {
            runs.iter()
                .find(|(r, _)| r == run)
                .and_then(|(_, cvs)| cvs.iter().find(|x| x.name == d.name))
        };
        let pending: Vec<(RunId, RunId)> = runs
            .iter()
            .filter_map(|(r, cvs)| cvs.iter().find(|x| x.name == d.name).map(|x| (*r, x.base)))
            .collect();
        let fate = reconcile(d.map.header(), &want, &pending);
        let mut folded = Vec::new();
        match &fate {
            MapFate::Keep => {}
            MapFate::Fold(chain) => {
                for run in chain {
                    let x = mine(run).expect("in the chain");
                    d.map.write(&x.cvs)?;
                    for (c, cv) in &x.cvs {
                        if let Some(slot) = d.cur.get_mut(*c as usize) {
                            *slot = *cv;
                        }
                    }
                    folded.push(*run);
                }
                tracing::info!(disk = %d.label, replica = %d.name, runs = chain.len(), "the process server holds the runs this agent tagged before it stopped: folded into the chunk map");
            }
            MapFate::Reset(why) => {
                if d.map.header().store.is_empty() {
                    tracing::info!(disk = %d.label, replica = %d.name, "no chunk map yet: every chunk is read and sent once (initial sync)");
                } else {
                    tracing::warn!(disk = %d.label, replica = %d.name, %why, "the chunk map does not describe what the process server holds: every chunk is read and sent again");
                }
                d.map.reset(want.clone())?;
                d.cur.iter_mut().for_each(|c| *c = UNKNOWN);
            }
        }
        // Pending runs the server does not hold: their chunks are unknown (sent again).
        let mut unknown: Vec<(u64, Cv)> = Vec::new();
        for (run, cvs) in &runs {
            if folded.contains(run) {
                continue;
            }
            if let Some(x) = cvs.iter().find(|x| x.name == d.name) {
                unknown.extend(
                    x.cvs
                        .iter()
                        .filter(|(c, _)| (*c as usize) < d.cur.len())
                        .map(|(c, _)| (*c, UNKNOWN)),
                );
            }
        }
        if !unknown.is_empty() {
            tracing::info!(disk = %d.label, chunks = unknown.len(), "a run was tagged but the process server does not hold it: its chunks are sent again");
            for (c, _) in &unknown {
                d.cur[*c as usize] = UNKNOWN;
            }
            d.map.write(&unknown)?;
        }
        d.map.set_header(want)?;
        d.map.sync()?;
        d.base = held.last_run;
    }
    for (path, _) in &leftover {
        ferry_durable::remove_durable(path).map_err(|e| AgentError::State {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
    }
    let clean = persist::take_clean(&o.state_dir)?;
    let mut why: Option<String> = None;
    for d in disks.iter_mut() {
        let reuse = match (track, &clean) {
            (Track::Scan, _) => Err("scan tracker".to_string()),
            (Track::Ebpf(_), None) => {
                Err("the last stop was not clean (or this is the first start)".into())
            }
            (Track::Ebpf(_), Some(c)) => clean_dirty(c, d),
        };
        match reuse {
            Ok(dirty) => {
                tracing::info!(disk = %d.name, dirty = dirty.count(), "clean restart: the dirty set was kept and nothing wrote to the disk meanwhile; no resync");
                d.todo.union(&dirty);
            }
            Err(reason) => {
                if matches!(track, Track::Ebpf(_)) {
                    tracing::info!(disk = %d.name, %reason, "resync: every chunk is read and compared with what the process server holds; only differing chunks move");
                    why.get_or_insert(format!("resync of {} ({reason})", d.name));
                }
                d.todo.fill();
            }
        }
        for (c, cv) in d.cur.iter().enumerate() {
            if *cv == UNKNOWN {
                d.todo.set(c as u64);
            }
        }
    }
    Ok(why)
}

/// The dirty set a clean stop left for `d`, if it can be trusted.
fn clean_dirty(c: &CleanStop, d: &Disk) -> Result<Bits, String> {
    if c.boot_id != persist::boot_id() {
        return Err("the machine rebooted since the clean stop".into());
    }
    let Some(cd) = c.disks.iter().find(|x| x.name == d.name) else {
        return Err("the disk was not protected at the clean stop".into());
    };
    if cd.size != d.size {
        return Err("the disk changed size".into());
    }
    let Some(now) = persist::disk_counters(&d.path) else {
        return Err("no kernel I/O counters for the disk".into());
    };
    if now.in_flight != 0
        || now.writes != cd.counters.writes
        || now.write_sectors != cd.counters.write_sectors
        || now.discards != cd.counters.discards
    {
        return Err(format!(
            "{} write(s) reached the disk while the agent was stopped",
            now.writes.saturating_sub(cd.counters.writes)
                + now.discards.saturating_sub(cd.counters.discards)
                + now.in_flight
        ));
    }
    let mut b = Bits::new(d.todo.len());
    for (s, e) in &cd.dirty {
        b.set_range(*s, *e);
    }
    Ok(b)
}

impl Engine<'_> {
    fn main_loop(&mut self, stop: &AtomicBool) -> Result<(), AgentError> {
        self.emit(Rec::Begin {
            run: self.run,
            time_ns: now_ns(),
            bases: self.disks.iter().map(|d| d.base).collect(),
        })?;
        let start = Instant::now();
        let mut next_crash = start + self.crash_every;
        let mut next_app = self.app_every.map(|i| start + i);
        let mut last_log = Instant::now();
        loop {
            self.poll_events()?;
            if std::mem::take(&mut self.intervals_changed) {
                // Sooner if the new interval says so; never later than the old schedule.
                let now = Instant::now();
                next_crash = next_crash.min(now + self.crash_every);
                next_app = self
                    .app_every
                    .map(|i| next_app.map_or(now + i, |t| t.min(now + i)));
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if self.o.once.is_some() && self.wants.is_empty() && self.awaiting.is_empty() {
                return Ok(());
            }
            while let Ok(req) = self.requests.try_recv() {
                match req {
                    Request::Cut { kind, reply } => self.wants.push_back(Want {
                        kind,
                        reply: Some(reply),
                        quiesced: false,
                        freeze_writable: false,
                    }),
                    Request::CutQuiesced { reply, freeze } => self.wants.push_back(Want {
                        kind: PointKind::App,
                        reply: Some(reply),
                        quiesced: true,
                        freeze_writable: freeze,
                    }),
                    Request::Notice { kind, text } => self.stats.notice(kind, 0, &text),
                    Request::Status { reply } => {
                        let _ = reply.send(self.status());
                    }
                    Request::Resync => self.force_resync(),
                }
            }
            self.drain()?;
            let mut read = 0;
            for i in 0..self.disks.len() {
                read += self.process(i, BATCH)?;
            }
            if last_log.elapsed() >= Duration::from_secs(10) {
                let left: u64 = self.disks.iter().map(|d| d.todo.count()).sum();
                if left > 0 {
                    tracing::info!(chunks_left = left, "reading changed chunks");
                    let total: u64 = self
                        .disks
                        .iter()
                        .map(|d| d.size.div_ceil(ferry_format::CHUNK_SIZE as u64))
                        .sum();
                    self.stats
                        .notice(ferry_wire::notice::PROGRESS, 0, &format!("{left} {total}"));
                }
                last_log = Instant::now();
            }
            if read > 0 {
                continue;
            }
            // Caught up with the tracker. A cut due?
            let now = Instant::now();
            if self.wants.is_empty() && !self.cut_over.load(Ordering::Relaxed) {
                if next_app.is_some_and(|t| now >= t) {
                    self.wants.push_back(Want {
                        kind: PointKind::App,
                        reply: None,
                        quiesced: false,
                        freeze_writable: false,
                    });
                } else if now >= next_crash {
                    self.wants.push_back(Want {
                        kind: PointKind::Crash,
                        reply: None,
                        quiesced: false,
                        freeze_writable: false,
                    });
                }
            }
            if let Some(kind) = self.wants.front().map(|w| w.kind) {
                if matches!(self.track, Track::Scan) && !self.scan_pass {
                    // The scan tracker finds changes by reading everything.
                    self.begin_scan_pass();
                    continue;
                }
                self.scan_pass = false;
                let want = self.wants.pop_front().expect("front exists");
                match self.cut(kind, want.quiesced.then_some(want.freeze_writable)) {
                    Ok(reply) => {
                        next_crash = Instant::now() + self.crash_every;
                        if reply.kind == PointKind::App {
                            next_app = self.app_every.map(|i| Instant::now() + i);
                        }
                        let a = self.awaiting.back_mut().expect("cut queued its run");
                        a.waiters.extend(want.reply);
                    }
                    Err(why) => {
                        tracing::warn!(%why, kind = kind.as_str(), "cut abandoned; no point was made, replication goes on");
                        self.stats.notice(
                            ferry_wire::notice::CUT_ABANDONED,
                            0,
                            &format!("{} cut abandoned: {why}", kind.as_str()),
                        );
                        // Try again soon, not in a tight loop.
                        next_crash = Instant::now() + self.crash_every.min(Duration::from_secs(5));
                        match want.reply {
                            Some(r) => {
                                let _ = r.send(Err(why));
                            }
                            None if self.o.once.is_some() => {
                                return Err(AgentError::Cut(why));
                            }
                            None => {}
                        }
                    }
                }
                continue;
            }
            // Idle until the next drain (eBPF) or the next cut (scan), waking for events.
            let wait = match self.track {
                Track::Ebpf(_) => self.o.drain_every,
                Track::Scan => next_crash
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(500)),
            };
            crossbeam_channel::select! {
                recv(self.events) -> ev => { if let Ok(ev) = ev { self.on_event(ev)?; } }
                recv(self.requests) -> req => match req {
                    Ok(Request::Cut { kind, reply }) => self.wants.push_back(Want { kind, reply: Some(reply), quiesced: false, freeze_writable: false }),
                    Ok(Request::CutQuiesced { reply, freeze }) => self.wants.push_back(Want { kind: PointKind::App, reply: Some(reply), quiesced: true, freeze_writable: freeze }),
                    Ok(Request::Notice { kind, text }) => self.stats.notice(kind, 0, &text),
                    Ok(Request::Status { reply }) => { let _ = reply.send(self.status()); }
                    Ok(Request::Resync) => self.force_resync(),
                    Err(_) => {}
                },
                default(wait) => {}
            }
        }
    }

    /// Scan mode: queues a full pass for the next cut, noting each disk's [`Witness`] first.
    fn begin_scan_pass(&mut self) {
        self.scan_from = self
            .disks
            .iter()
            .map(|d| Witness::at_pass_start(&d.path))
            .collect();
        for d in &mut self.disks {
            d.todo.fill();
        }
        self.scan_pass = true;
    }

    /// Scan mode: `Ok` only if no disk was written since the pass the cut rests on began. The
    /// pass reads the disks over seconds or minutes; its chunks are one instant only if nothing
    /// wrote meanwhile (the eBPF tracker shows its instant with an empty drain instead). Each
    /// witness serves one cut: the next cut needs a new pass.
    fn scan_quiet(&mut self) -> Result<(), String> {
        if !matches!(self.track, Track::Scan) {
            return Ok(());
        }
        let from = std::mem::take(&mut self.scan_from);
        for (i, d) in self.disks.iter().enumerate() {
            match (from.get(i).copied().flatten(), Witness::now(&d.path)) {
                (Some(a), Some(b)) if a.unchanged(&b) => {}
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "disk {} was written during the scan pass, so its chunks were read at different instants (the scan tracker makes points only of disks idle for a whole pass; the eBPF tracker has no such limit)",
                        d.name
                    ))
                }
                _ => {
                    return Err(format!(
                        "cannot tell whether disk {} was written during the scan pass (no kernel I/O counters, or its image was modified just before the pass)",
                        d.name
                    ))
                }
            }
        }
        Ok(())
    }

    fn force_resync(&mut self) {
        tracing::info!("resync requested: every chunk is read and compared; only differing chunks move; points wait for it");
        self.stats.notice(
            ferry_wire::notice::RESYNC,
            0,
            "asked for (ferry-agent resync)",
        );
        for d in &mut self.disks {
            d.todo.fill();
        }
        self.resyncing = Some("a resync requested by the operator".into());
    }

    fn status(&self) -> serde_json::Value {
        let last = self.points.last();
        let mut conditions = Vec::new();
        if let Some((since, why)) = &self.disconnected {
            conditions.push(serde_json::json!({
                "name": "agent_disconnected", "level": "warning",
                "message": format!("not connected to {} since {}: {why}; changes are tracked and sent when it answers", self.o.server, humantime::format_rfc3339_seconds(*since)),
            }));
        }
        if let Some(why) = &self.resyncing {
            conditions.push(serde_json::json!({
                "name": "resync_in_progress", "level": "warning",
                "message": format!("resync: {why}; no point until it is done"),
            }));
        }
        let cutover = crate::cutover::load(&self.o.state_dir);
        if let Ok(Some(c)) = &cutover {
            conditions.push(serde_json::json!({
                "name": "cut_over", "level": "warning",
                "message": format!("cut over since {} (final point {}): the protected filesystems were made read-only; `ferry-agent cutover --rollback` undoes it", c.started, c.final_point.as_deref().unwrap_or("not made")),
            }));
        }
        let backlog: u64 = self.disks.iter().map(|d| d.todo.count()).sum();
        serde_json::json!({
            "cutover": cutover.ok().flatten(),
            "vm": self.o.vm,
            "server": self.o.server,
            "connected": self.disconnected.is_none(),
            "disconnected_since": self.disconnected.as_ref().map(|d| humantime::format_rfc3339_seconds(d.0).to_string()),
            "backlog_chunks": backlog,
            "backlog_bytes": backlog * ferry_format::CHUNK_SIZE as u64,
            "last_point": last.map(|p| serde_json::json!({
                "run": p.run, "id": p.point, "kind": p.kind.as_str(),
                "age_seconds": now_ns().saturating_sub(p.time_ns) / 1_000_000_000,
                "freeze_ms": p.freeze_ms,
            })),
            "crash_every_seconds": self.crash_every.as_secs(),
            "app_every_seconds": self.app_every.map(|a| a.as_secs()),
            "intervals_from": self.intervals_from,
            "conditions": conditions,
            "tracker": match self.track { Track::Ebpf(_) => "ebpf", Track::Scan => "scan" },
            "run": hex::encode(self.run),
            "resync": self.resyncing,
            "points_awaiting_ack": self.awaiting.len(),
            "records_sent": self.stats.records.load(Ordering::Relaxed),
            "data_bytes_sent": self.stats.data_bytes.load(Ordering::Relaxed),
            "reconnects": self.stats.reconnects.load(Ordering::Relaxed),
            "disks": self.disks.iter().map(|d| serde_json::json!({
                "name": d.name, "device": d.label, "id": d.id, "path": d.path, "size": d.size,
                "dirty_chunks": d.todo.count(), "chunks_in_run": d.touched.count(),
            })).collect::<Vec<_>>(),
        })
    }

    fn emit(&mut self, r: Rec) -> Result<(), AgentError> {
        if let Some(h) = &mut self.held {
            h.push(r);
            return Ok(());
        }
        let tx = self
            .tx
            .as_ref()
            .expect("sender lives while the engine runs");
        // The shipper's queue is full while the server is unreachable: wait, but not past a stop.
        let mut r = r;
        loop {
            match tx.try_send(r) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(back)) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(AgentError::Stopping);
                    }
                    r = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                // The shipper stopped; its Failed event says why.
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.shipper_error()),
            }
        }
    }

    fn shipper_error(&self) -> AgentError {
        while let Ok(ev) = self.events.try_recv() {
            if let Event::Failed(e) = ev {
                return e;
            }
        }
        AgentError::Protocol("the shipper stopped".into())
    }

    fn poll_events(&mut self) -> Result<(), AgentError> {
        while let Ok(ev) = self.events.try_recv() {
            self.on_event(ev)?;
        }
        // Acknowledged but not named (an older server, or the name was sent while we were
        // reconnecting): the point exists all the same; answer without its id.
        while let Some(a) = self.awaiting.front() {
            match a.acked {
                Some(t) if t.elapsed() > POINT_NAME_WAIT => {
                    let mut a = self.awaiting.pop_front().expect("front exists");
                    a.reply.note.get_or_insert_with(|| {
                        "the process server acknowledged the point but did not name it; `ferry points list` shows it".into()
                    });
                    self.finish_point(a);
                }
                _ => break,
            }
        }
        Ok(())
    }

    /// The process server asked for a cutover (`ferry failover --shutdown-source`): run it, as
    /// `ferry-agent cutover --allow-writable` would, on its own thread (it waits for the engine's
    /// final point); a failure goes back as a notice.
    fn remote_cutover(&mut self) {
        let failed = |why: String| Request::Notice {
            kind: ferry_wire::notice::CUTOVER_FAILED,
            text: why,
        };
        if !self.o.allow_remote_cutover {
            tracing::warn!(
                "the process server asked for a cutover; refused: allow_remote_cutover is off"
            );
            let _ = self.self_tx.send(failed(
                "this agent does not allow a cutover from the process server (allow_remote_cutover = true in /etc/ferry/agent.toml enables it); run `ferry-agent cutover` on the machine".into(),
            ));
            return;
        }
        // Cut over already (the request of an operator who does not know, or one that crossed
        // a reconnection): the answer is the final point it has.
        if let Ok(Some(c)) = crate::cutover::load(&self.o.state_dir) {
            if let Some(p) = c.final_point {
                self.stats.notice(ferry_wire::notice::CUTOVER, 0, &p);
                return;
            }
        }
        tracing::warn!("the process server asked for a cutover (ferry failover --shutdown-source)");
        let (ctx, tx) = (self.cutover.clone(), self.self_tx.clone());
        let spawned = std::thread::Builder::new()
            .name("remote-cutover".into())
            .spawn(move || {
                if let Err(why) = crate::cutover::start(&ctx, &tx, true) {
                    tracing::error!(%why, "the cutover the process server asked for failed");
                    let _ = tx.send(failed(why));
                }
            });
        if let Err(e) = spawned {
            let _ = self
                .self_tx
                .send(failed(format!("cannot start the cutover: {e}")));
        }
    }

    fn on_event(&mut self, ev: Event) -> Result<(), AgentError> {
        match ev {
            Event::TagAcked(run) => self.committed(run)?,
            Event::PointMade { run, id } => {
                // A point implies its tag was acknowledged (even if that ack is still queued).
                self.committed(run)?;
                if let Some(pos) = self.awaiting.iter().position(|a| a.run == run) {
                    let mut a = self.awaiting.remove(pos).expect("position exists");
                    tracing::info!(run = %hex::encode(run), point = %id, "point published");
                    a.reply.point = Some(id);
                    self.finish_point(a);
                }
            }
            Event::Disconnected(why) => {
                tracing::debug!(%why, "shipper reconnecting");
                let since = self
                    .disconnected
                    .as_ref()
                    .map_or_else(std::time::SystemTime::now, |d| d.0);
                self.disconnected = Some((since, why));
            }
            Event::Connected => self.disconnected = None,
            // Only the first connection's is sent, and it was taken before the engine started.
            Event::Holding(_) => {}
            Event::Failed(e) => return Err(e),
            Event::Policy {
                crash_every_ms,
                app_every_ms,
            } => self.apply_policy(crash_every_ms, app_every_ms),
            Event::CutoverAsked => self.remote_cutover(),
        }
        Ok(())
    }

    /// The server's policy: its intervals where it sets them, this agent's own elsewhere. A crash
    /// interval below 10 s is raised to 10 s (the agent's own floor).
    fn apply_policy(&mut self, crash_ms: u64, app_ms: u64) {
        let crash = match crash_ms {
            ferry_wire::POLICY_OWN => self.o.crash_interval,
            ms => Duration::from_millis(ms).max(Duration::from_secs(10)),
        };
        let app = match app_ms {
            ferry_wire::POLICY_OWN => self.o.app_interval,
            ferry_wire::POLICY_OFF => None,
            ms => Some(Duration::from_millis(ms).max(Duration::from_secs(10))),
        };
        let from = if crash_ms == ferry_wire::POLICY_OWN && app_ms == ferry_wire::POLICY_OWN {
            "agent"
        } else {
            "server"
        };
        if (crash, app, from) != (self.crash_every, self.app_every, self.intervals_from) {
            tracing::info!(
                crash_every = %humantime::format_duration(crash),
                app_every = %app.map_or("off".to_string(), |a| humantime::format_duration(a).to_string()),
                from,
                "cut intervals changed by the process server's policy"
            );
            self.crash_every = crash;
            self.app_every = app;
            self.intervals_from = from;
            self.intervals_changed = true;
            self.announce_intervals();
        }
    }

    /// Tells the server the cut intervals in effect.
    fn announce_intervals(&self) {
        self.stats.notice(
            ferry_wire::notice::INTERVALS,
            0,
            &format!(
                "{} {} {}",
                self.crash_every.as_millis(),
                self.app_every
                    .map_or("off".to_string(), |a| a.as_millis().to_string()),
                self.intervals_from
            ),
        );
    }

    /// The tag of `run` is acknowledged: its CVs become the committed ones (once).
    fn committed(&mut self, run: RunId) -> Result<(), AgentError> {
        let Some(a) = self
            .awaiting
            .iter_mut()
            .find(|a| a.run == run && a.acked.is_none())
        else {
            return Ok(());
        };
        a.acked = Some(Instant::now());
        let kind = a.reply.kind;
        let cvs = persist::read_pending(&self.o.state_dir, &run)?;
        for d in self.disks.iter_mut() {
            if let Some(x) = cvs.iter().find(|x| x.name == d.name) {
                // The CVs and the new base in one sync. Writes between two syncs reach the disk in
                // any order, so a power cut may leave the new base with some CVs still old, or the
                // reverse: the pending file, removed only after the sync, is then folded again by
                // the next start (idempotent) or its chunks made unknown. The base lies in one
                // sector of the header with its checksum (`CV_BASE_AT`), so its write cannot tear
                // the header (a torn header would throw the whole map away: a full resend).
                d.map.write(&x.cvs)?;
                let mut h = d.map.header().clone();
                h.base = run;
                d.map.set_header(h)?;
                d.map.sync()?;
            }
        }
        persist::remove_pending(&self.o.state_dir, &run)?;
        tracing::info!(run = %hex::encode(run), kind = kind.as_str(), "point acknowledged by the process server");
        Ok(())
    }

    fn finish_point(&mut self, a: Awaiting) {
        for w in a.waiters {
            let _ = w.send(Ok(a.reply.clone()));
        }
        // The newest few (a long-running agent cuts thousands a day).
        if self.points.len() >= 64 {
            self.points.remove(0);
        }
        self.points.push(a.reply);
    }

    /// Moves what the tracker found into the dirty sets.
    fn drain(&mut self) -> Result<(), AgentError> {
        let Track::Ebpf(t) = &mut self.track else {
            return Ok(());
        };
        let sets = t.drain_all().map_err(AgentError::Tracker)?;
        for (d, set) in self.disks.iter_mut().zip(sets) {
            if set.needs_resync() {
                let why: Vec<String> = set.resync.iter().map(ToString::to_string).collect();
                tracing::warn!(disk = %d.name, why = %why.join("; "), "the tracker may have missed writes: resyncing the disk (only differing chunks move); no point until it is done");
                self.stats.notice(
                    ferry_wire::notice::RESYNC,
                    0,
                    &format!(
                        "disk {}: the tracker may have missed writes: {}",
                        d.name,
                        why.join("; ")
                    ),
                );
                self.resyncing = Some(format!("resync of {} ({})", d.name, why.join("; ")));
                d.todo.fill();
                continue;
            }
            for c in set.chunks() {
                d.todo.set(c);
            }
        }
        Ok(())
    }

    /// Reads up to `max` dirty chunks of disk `i` and sends the ones that changed. Returns how
    /// many were read.
    fn process(&mut self, i: usize, max: usize) -> Result<usize, AgentError> {
        let batch = self.disks[i].todo.take(max);
        if batch.is_empty() {
            return Ok(0);
        }
        let mut recs: Vec<Rec> = Vec::new();
        // The CVs read reach `cur` and `touched` only once the whole batch is read: a read error
        // on a later extent drops `recs`, so a chunk read before it must keep its old CV —
        // otherwise its re-read finds it "unchanged", it is never sent, and the next tag's digest
        // and committed map count content the process server never got.
        let mut seen: Vec<(u64, Cv)> = Vec::with_capacity(batch.len());
        let d = &mut self.disks[i];
        let cur = &d.cur;
        let r = d.reader.read_chunks(&batch, |c, data| {
            let cv = chunk_cv(c, data);
            seen.push((c, cv));
            if cur[c as usize] == cv {
                return Ok::<(), String>(());
            }
            let offset = c * CHUNK;
            if is_zero(data) {
                match recs.last_mut() {
                    Some(Rec::Zero { offset: o, len, .. }) if *o + *len == offset => {
                        *len += data.len() as u64
                    }
                    _ => recs.push(Rec::Zero {
                        disk: i,
                        offset,
                        len: data.len() as u64,
                    }),
                }
            } else {
                recs.push(Rec::Write {
                    disk: i,
                    offset,
                    data: data.to_vec(),
                    cv,
                });
            }
            Ok(())
        });
        if let Err(e) = r {
            // Not read (none of it is sent, `cur` is unchanged): still dirty.
            for c in &batch {
                self.disks[i].todo.set(*c);
            }
            return Err(e.into());
        }
        let d = &mut self.disks[i];
        for (c, cv) in seen {
            d.cur[c as usize] = cv;
            d.touched.set(c);
        }
        for r in recs {
            self.emit(r)?;
        }
        if self.disks.iter().all(|d| d.todo.is_empty()) {
            self.resyncing = None;
        }
        Ok(batch.len())
    }

    /// Reads everything still dirty; with the eBPF tracker, drains until a drain is empty.
    /// `Ok(true)` when an empty drain was reached before `deadline`.
    fn settle(&mut self, deadline: Instant) -> Result<bool, String> {
        loop {
            if matches!(self.track, Track::Ebpf(_)) {
                self.drain().map_err(|e| e.to_string())?;
                if let Some(why) = &self.resyncing {
                    if self.disks.iter().any(|d| d.todo.count() == d.todo.len()) {
                        return Err(format!("the tracker lost writes during the cut ({why})"));
                    }
                }
            }
            if self.disks.iter().all(|d| d.todo.is_empty()) {
                return Ok(true);
            }
            if !matches!(self.track, Track::Ebpf(_)) {
                // Scan: one pass is all there is.
                for i in 0..self.disks.len() {
                    while self.process(i, BATCH).map_err(|e| e.to_string())? > 0 {}
                }
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            for i in 0..self.disks.len() {
                while self.process(i, BATCH).map_err(|e| e.to_string())? > 0 {}
            }
        }
    }

    /// Cuts a point: hooks, freeze, drain to empty, tag, thaw. Returns after the tag is handed to
    /// the shipper (its acknowledgement comes as an event).
    /// `quiesced`: the cutover's final point (`Some(freeze_writable)`), see [`Want`].
    fn cut(&mut self, asked: PointKind, quiesced: Option<bool>) -> Result<CutReply, String> {
        if let Some(why) = &self.resyncing {
            return Err(format!(
                "{why} is still running; a point can only be cut after it"
            ));
        }
        let mut kind = asked;
        let mut notes: Vec<String> = Vec::new();
        let scan = matches!(self.track, Track::Scan);
        match quiesced {
            Some(false) => {
                // The cutover stopped the application and made every filesystem read-only:
                // nothing writes, everything is on disk. The point is app-consistent as it is.
                let (tag, _) = self.frozen_cut(kind, true, Some(QUIESCED_SETTLE))?;
                return self.tagged(tag, kind, asked, notes, None);
            }
            Some(true) => {
                // Some filesystem stayed writable: frozen for the point, as an app point is
                // (the application is stopped already: no hooks).
                if scan {
                    kind = PointKind::Crash;
                    notes.push("a protected filesystem stayed writable and the scan tracker cannot freeze: the final point is crash-consistent for it".into());
                }
                let (tag, freeze) = self.frozen_cut(kind, scan, None)?;
                return self.tagged(tag, kind, asked, notes, freeze);
            }
            None => {}
        }
        if kind == PointKind::App && scan {
            kind = PointKind::Crash;
            notes.push("app-consistent points need the eBPF tracker (the scan tracker cannot read a whole disk within a freeze); made a crash-consistent point".into());
        }
        let app = kind == PointKind::App;
        let env_run = hex::encode(self.run);
        let env: Vec<(&str, &str)> = vec![("FERRY_RUN", &env_run), ("FERRY_VM", &self.o.vm)];
        // Application quiesce.
        if app {
            match ferry_freeze::run_hooks_with_env(
                &self.o.hooks_dir,
                ferry_freeze::Phase::Pre,
                self.o.hook_timeout,
                &env,
            ) {
                Ok(rep) => {
                    for f in rep.failed() {
                        notes.push(format!("pre-freeze hook {}", f.why()));
                    }
                    if rep.consistency() == ferry_freeze::Consistency::Crash {
                        kind = PointKind::Crash;
                    }
                }
                Err(e) => {
                    notes.push(format!("pre-freeze hooks: {e}"));
                    kind = PointKind::Crash;
                }
            }
        }
        let mut mysql = None;
        if app {
            if let Some(m) = &self.o.mysql {
                let r = ferry_freeze::MysqlHook::connect(
                    &m.target,
                    &m.user,
                    m.password_file.as_deref(),
                    m.timeout,
                )
                .and_then(|mut h| h.lock().map(|_| h));
                match r {
                    Ok(h) => mysql = Some(h),
                    Err(e) => {
                        notes.push(format!("MariaDB/MySQL hook: {e}"));
                        kind = PointKind::Crash;
                    }
                }
            }
        }
        let r = self.frozen_cut(kind, scan, None);
        if let Some(mut h) = mysql {
            if let Err(e) = h.unlock() {
                tracing::warn!(error = %e, "releasing FLUSH TABLES WITH READ LOCK");
            }
        }
        if app {
            match ferry_freeze::run_hooks_with_env(
                &self.o.hooks_dir,
                ferry_freeze::Phase::Post,
                self.o.hook_timeout,
                &env,
            ) {
                Ok(rep) => {
                    for f in rep.failed() {
                        tracing::warn!(hook = %f.why(), "post-thaw hook failed");
                        self.stats.notice(
                            ferry_wire::notice::HOOK_FAILED,
                            0,
                            &format!("post-thaw hook failed: {}", f.why()),
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "post-thaw hooks"),
            }
        }
        let (tag, freeze) = r?;
        self.tagged(tag, kind, asked, notes, freeze)
    }

    /// The rest of a cut once its tag is made: the pending state, the tag, the next run.
    fn tagged(
        &mut self,
        tag: PointTag,
        kind: PointKind,
        asked: PointKind,
        notes: Vec<String>,
        freeze: Option<ferry_freeze::FreezeStats>,
    ) -> Result<CutReply, String> {
        if kind != asked {
            tracing::warn!(notes = %notes.join("; "), "the point was downgraded to crash-consistent");
        }
        let run = self.run;
        let reply = CutReply {
            run: hex::encode(run),
            kind,
            point: None,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
            freeze_ms: freeze.map(|f| f.window.as_secs_f64() * 1e3),
            freeze_kernel_ms: freeze.map(|f| f.freeze_took.as_secs_f64() * 1e3),
            freeze_held_ms: freeze.map(|f| f.held.as_secs_f64() * 1e3),
            time_ns: tag.time_ns,
        };
        // What this run commits, durably, before its tag can be acknowledged.
        let cvs: persist::RunCvs = self
            .disks
            .iter()
            .map(|d| persist::PendingDisk {
                name: d.name.clone(),
                base: d.base,
                cvs: d
                    .touched
                    .runs()
                    .into_iter()
                    .flat_map(|(s, e)| s..e)
                    .map(|c| (c, d.cur[c as usize]))
                    .collect(),
            })
            .collect();
        persist::write_pending(&self.o.state_dir, &run, &cvs).map_err(|e| e.to_string())?;
        self.emit(Rec::Tag(tag)).map_err(|e| e.to_string())?;
        self.awaiting.push_back(Awaiting {
            run,
            reply: reply.clone(),
            waiters: Vec::new(),
            acked: None,
        });
        for d in &mut self.disks {
            d.touched.clear();
            // The next run builds on this one: the server has its tag before the next Begin.
            d.base = run;
        }
        self.run = new_run().map_err(|e| e.to_string())?;
        self.emit(Rec::Begin {
            run: self.run,
            time_ns: now_ns(),
            bases: self.disks.iter().map(|d| d.base).collect(),
        })
        .map_err(|e| e.to_string())?;
        match reply.freeze_ms {
            Some(ms) => {
                tracing::info!(run = %reply.run, kind = kind.as_str(), freeze_ms = ms, "cut")
            }
            None => tracing::info!(run = %reply.run, kind = kind.as_str(), "cut (nothing frozen)"),
        }
        self.stats.notice(
            ferry_wire::notice::CUT,
            reply.freeze_ms.map_or(0, |ms| (ms * 1000.0) as u64),
            kind.as_str(),
        );
        Ok(reply)
    }

    /// Freeze (if anything is mounted and we can), settle, compute the tag, thaw. The records
    /// made while frozen are sent after the thaw, before the tag.
    fn frozen_cut(
        &mut self,
        kind: PointKind,
        scan: bool,
        settle_within: Option<Duration>,
    ) -> Result<(PointTag, Option<ferry_freeze::FreezeStats>), String> {
        let mounts = if scan || settle_within.is_some() {
            Vec::new()
        } else {
            ferry_freeze::discover(&self.o.disks).map_err(|e| e.to_string())?
        };
        let guard = match (&self.freezer, mounts.is_empty()) {
            (Some(f), false) => Some(
                f.freeze(&mounts, self.o.freeze_bound)
                    .map_err(|e| format!("freeze failed: {e}"))?,
            ),
            (None, false) => {
                return Err("filesystems are mounted on the protected disks but cannot be frozen (needs root and the ferry-thaw-watchdog binary next to ferry-agent)".into())
            }
            (_, true) => None,
        };
        if guard.is_some() {
            // `held` is `Some` only from here to the hand-over below, which every way out of this
            // function passes. Records still held would be read chunks that `cur` counts as sent:
            // keep them (they go out with this cut's hand-over), never replace them.
            if self.held.is_none() {
                self.held = Some(Vec::new());
            }
        }
        // Leave a margin for the thaw itself.
        let deadline = match &guard {
            Some(g) => g.deadline() - self.o.freeze_bound / 4,
            None => Instant::now() + settle_within.unwrap_or(self.o.freeze_bound),
        };
        let settled = self.settle(deadline);
        let time_ns = now_ns();
        let tag = match settled {
            Ok(true) => self.scan_quiet().and_then(|()| self.tag(kind, time_ns)),
            Ok(false) => Err(if guard.is_some() {
                format!(
                    "the writes left to read did not fit in the freeze bound ({:?})",
                    self.o.freeze_bound
                )
            } else {
                "the disks never stopped being written long enough for a consistent instant (nothing is mounted to freeze)".to_string()
            }),
            Err(e) => Err(e),
        };
        // A failing frozen hook abandons the cut like any other failure: no early return, so the
        // freeze still ends below and the held records are still handed over.
        let tag = match (tag, &self.o.frozen_hook) {
            (Ok(t), Some(h)) => {
                run_frozen_hook(h, &self.o.vm, &hex::encode(self.run), time_ns, deadline)
                    .map(|()| t)
                    .map_err(|e| format!("frozen hook {}: {e}", h.display()))
            }
            (tag, _) => tag,
        };
        let stats = match guard {
            Some(g) if tag.is_ok() => Some(
                g.finish()
                    .map_err(|e| format!("the freeze did not hold: {e}")),
            ),
            Some(g) => {
                let _ = g.thaw();
                None
            }
            None => None,
        };
        // Hand over what was read while frozen (it belongs to this run, before its tag).
        if let Some(held) = self.held.take() {
            for r in held {
                self.emit(r).map_err(|e| e.to_string())?;
            }
        }
        let tag = tag?;
        let stats = stats.transpose()?;
        Ok((tag, stats))
    }

    /// The tag of the current run: every disk's size and whole-disk digest from its chunk CVs.
    fn tag(&mut self, kind: PointKind, time_ns: u64) -> Result<PointTag, String> {
        let mut cuts = Vec::new();
        for d in &mut self.disks {
            let digest = if d.size <= CHUNK {
                let mut h = [0u8; 32];
                d.reader
                    .read_chunks(&[0], |_, data| {
                        h = *blake3::hash(data).as_bytes();
                        Ok::<(), String>(())
                    })
                    .map_err(|e| e.to_string())?;
                h
            } else {
                let cur = &d.cur;
                cv::root(d.size, &|i| cur[i as usize]).ok_or_else(|| {
                    format!(
                        "disk {} has chunks never read; the resync must finish first",
                        d.name
                    )
                })?
            };
            cuts.push(DiskCut {
                name: d.name.clone(),
                size: d.size,
                blake3: digest,
            });
        }
        Ok(PointTag {
            run: self.run,
            time_ns,
            kind,
            disks: cuts,
        })
    }

    /// A clean stop: the chunks still dirty, those of the untagged run (the next start voids
    /// it), and the kernel's write counters, so the next start needs no resync.
    fn clean_stop(&mut self) -> Result<(), AgentError> {
        // A moment for outstanding acknowledgements (their pending files go away).
        let until = Instant::now() + Duration::from_secs(3);
        while self.awaiting.iter().any(|a| a.acked.is_none()) && Instant::now() < until {
            if let Ok(ev) = self.events.recv_timeout(Duration::from_millis(50)) {
                self.on_event(ev)?;
            }
        }
        let Track::Ebpf(_) = self.track else {
            return Ok(());
        };
        // Counters first, then the last drain: a write between the two is in the drain *and*
        // makes the counters differ at the next start (a needless resync, never a missed write).
        let counters: Vec<_> = self
            .disks
            .iter()
            .map(|d| persist::disk_counters(&d.path))
            .collect();
        self.drain()?;
        if self.resyncing.is_some() || counters.iter().any(Option::is_none) {
            return Ok(());
        }
        let disks = self
            .disks
            .iter()
            .zip(counters)
            .map(|(d, c)| {
                let mut dirty = d.todo.clone();
                dirty.union(&d.touched);
                CleanDisk {
                    name: d.name.clone(),
                    size: d.size,
                    counters: c.expect("checked above"),
                    dirty: dirty.runs(),
                }
            })
            .collect();
        persist::save_clean(
            &self.o.state_dir,
            &CleanStop {
                version: 1,
                boot_id: persist::boot_id(),
                disks,
            },
        )?;
        tracing::info!("clean stop: the dirty state is saved; the next start needs no resync if nothing writes meanwhile");
        Ok(())
    }
}

fn run_frozen_hook(
    hook: &Path,
    vm: &str,
    run: &str,
    time_ns: u64,
    deadline: Instant,
) -> Result<(), String> {
    let mut child = std::process::Command::new(hook)
        .env("FERRY_VM", vm)
        .env("FERRY_RUN", run)
        .env("FERRY_CUT_TIME_NS", time_ns.to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return if st.success() {
                Ok(())
            } else {
                Err(format!("exited with {st}"))
            };
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("ran out of the freeze bound and was killed".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    //! The engine over image files in a temporary directory: the scan tracker, no freeze, no
    //! server (records land in the channel the shipper would read), no root.
    use super::*;
    use std::os::unix::fs::FileExt;

    fn options(state: &Path, disks: &[&Path], names: &[&str]) -> AgentOptions {
        AgentOptions {
            server: "127.0.0.1:9".into(),
            disks: disks.iter().map(|p| p.to_path_buf()).collect(),
            names: names.iter().map(|n| n.to_string()).collect(),
            vm: "vm".into(),
            state_dir: state.to_path_buf(),
            tracker: TrackerChoice::Scan,
            crash_interval: Duration::from_secs(30),
            app_interval: None,
            max_rate: None,
            resync_asked: Default::default(),
            freeze_bound: Duration::from_secs(2),
            expedite_rcu: true,
            hooks_dir: state.join("no-hooks"),
            hook_timeout: Duration::from_secs(1),
            allow_remote_cutover: false,
            mysql: None,
            frozen_hook: None,
            once: None,
            drain_every: Duration::from_millis(250),
        }
    }

    /// An image of `chunks` chunks, none all zero, each unlike the others.
    fn image(dir: &Path, name: &str, chunks: u64, seed: u8) -> PathBuf {
        let p = dir.join(format!("{name}.img"));
        let data: Vec<u8> = (0..chunks)
            .flat_map(|i| vec![seed.wrapping_add(i as u8) | 1; CHUNK as usize])
            .collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    /// `depth` 1: one extent in flight, so an extent is delivered before the next is read.
    fn open_disk(state: &Path, path: &Path, name: &str, depth: u32) -> Disk {
        Source::open(path, name, depth)
            .unwrap()
            .into_disk(state, name)
            .unwrap()
    }

    static NEVER_STOP: AtomicBool = AtomicBool::new(false);

    fn engine<'a>(o: &'a AgentOptions, disks: Vec<Disk>) -> (Engine<'a>, mpsc::Receiver<Rec>) {
        let (tx, rx) = mpsc::channel(1024);
        let e = Engine {
            cut_over: Arc::new(AtomicBool::new(false)),
            cutover: Arc::new(crate::cutover::Ctx {
                state_dir: o.state_dir.clone(),
                disks: o.disks.clone(),
                vm: o.vm.clone(),
                hooks_dir: o.hooks_dir.clone(),
                hook_timeout: o.hook_timeout,
                active: Arc::new(AtomicBool::new(false)),
            }),
            self_tx: crossbeam_channel::unbounded().0,
            o,
            disks,
            track: Track::Scan,
            tx: Some(tx),
            held: None,
            events: crossbeam_channel::never(),
            requests: crossbeam_channel::never(),
            run: [1; 16],
            wants: VecDeque::new(),
            awaiting: VecDeque::new(),
            points: Vec::new(),
            freezer: None,
            scan_pass: false,
            scan_from: Vec::new(),
            resyncing: None,
            stats: Arc::new(ShipStats::default()),
            stop: &NEVER_STOP,
            crash_every: o.crash_interval,
            app_every: o.app_interval,
            intervals_from: "agent",
            intervals_changed: false,
            disconnected: None,
        };
        (e, rx)
    }

    /// Everything handed to the shipper so far.
    fn sent(rx: &mut mpsc::Receiver<Rec>) -> Vec<Rec> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            out.push(r);
        }
        out
    }

    /// The chunks the Write and Zero records carry, ascending.
    fn chunks_of(recs: &[Rec]) -> Vec<u64> {
        let mut out: Vec<u64> = recs
            .iter()
            .flat_map(|r| match r {
                Rec::Write { offset, data, .. } => {
                    *offset / CHUNK..(*offset + data.len() as u64).div_ceil(CHUNK)
                }
                Rec::Zero { offset, len, .. } => *offset / CHUNK..(*offset + *len).div_ceil(CHUNK),
                _ => 0..0,
            })
            .collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn a_cutover_the_server_asks_for_is_refused_unless_the_machine_allows_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let img = image(dir.path(), "a", 4, 1);
        let o = options(&state, &[&img], &["a"]);
        let (mut e, _rx) = engine(&o, vec![open_disk(&state, &img, "a", 1)]);
        let (tx, rx) = crossbeam_channel::unbounded();
        e.self_tx = tx;
        // Even if the server sent it to an agent that never allowed it: refused, nothing done.
        e.on_event(Event::CutoverAsked).unwrap();
        match rx.try_recv() {
            Ok(Request::Notice { kind, text }) => {
                assert_eq!(kind, ferry_wire::notice::CUTOVER_FAILED);
                assert!(text.contains("allow_remote_cutover"), "{text}");
            }
            _ => panic!("no refusal sent"),
        }
        assert!(rx.try_recv().is_err());
        assert!(!state.join("cutover.json").exists());
    }

    #[test]
    fn a_read_error_late_in_a_batch_leaves_the_chunks_read_before_it_to_be_sent() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // 32 chunks: two 1 MiB extents.
        let img = image(dir.path(), "a", 32, 1);
        let o = options(&state, &[&img], &["a"]);
        let (mut e, mut rx) = engine(&o, vec![open_disk(&state, &img, "a", 1)]);
        e.disks[0].todo.fill();
        // The second extent now lies past the end of the file: reading it fails, after the
        // first was read and handed to the engine.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(16 * CHUNK).unwrap();
        assert!(e.process(0, BATCH).is_err());
        assert!(
            sent(&mut rx).is_empty(),
            "nothing of a failed batch is sent"
        );
        assert_eq!(
            e.disks[0].todo.count(),
            32,
            "the whole batch is still dirty"
        );
        // The file whole again (chunks 16.. now zero): every chunk is sent, the first sixteen too.
        f.set_len(32 * CHUNK).unwrap();
        assert_eq!(e.process(0, BATCH).unwrap(), 32);
        assert_eq!(chunks_of(&sent(&mut rx)), (0..32).collect::<Vec<u64>>());
    }

    /// Issue 7 §4: a scan pass is an instant only if nothing wrote during it.
    #[test]
    fn a_scan_cut_is_abandoned_if_the_disk_was_written_during_its_pass() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let img = image(dir.path(), "a", 8, 1);
        let o = options(&state, &[&img], &["a"]);
        let (mut e, mut rx) = engine(&o, vec![open_disk(&state, &img, "a", 16)]);
        // A quiet pass: the cut is made.
        e.begin_scan_pass();
        while e.process(0, BATCH).unwrap() > 0 {}
        e.cut(PointKind::Crash, None)
            .expect("a pass over an idle disk is an instant");
        assert!(sent(&mut rx).iter().any(|r| matches!(r, Rec::Tag(_))));
        // A write lands while the next pass reads: no point.
        e.begin_scan_pass();
        e.process(0, 2).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .write_all_at(&[9u8; 4096], 0)
            .unwrap();
        while e.process(0, BATCH).unwrap() > 0 {}
        let err = e.cut(PointKind::Crash, None).unwrap_err();
        assert!(err.contains("was written during the scan pass"), "{err}");
        assert!(!sent(&mut rx).iter().any(|r| matches!(r, Rec::Tag(_))));
    }

    fn header(base: u8, store: &str, vm: &str, id: &str) -> persist::CvHeader {
        persist::CvHeader {
            size: 4 * CHUNK,
            chunks: 4,
            base: [base; 16],
            store: store.into(),
            vm: vm.into(),
            disk_id: id.into(),
        }
    }

    #[test]
    fn a_map_is_kept_brought_forward_or_reset_by_what_the_server_holds() {
        let have = header(1, "s", "vm", "id");
        // Exactly what the server holds.
        assert_eq!(
            reconcile(&have, &header(1, "s", "vm", "id"), &[]),
            MapFate::Keep
        );
        // The server holds two runs tagged after it (acknowledged, the agent died before folding).
        assert_eq!(
            reconcile(
                &have,
                &header(3, "s", "vm", "id"),
                &[([3; 16], [2; 16]), ([2; 16], [1; 16])]
            ),
            MapFate::Fold(vec![[2; 16], [3; 16]])
        );
        // A pending run equal to the base is folded again (it may be only partly in the map).
        assert_eq!(
            reconcile(&have, &header(1, "s", "vm", "id"), &[([1; 16], [0; 16])]),
            MapFate::Fold(vec![[1; 16]])
        );
        // The server does not hold a pending run: the map stays (its chunks become unknown).
        assert_eq!(
            reconcile(&have, &header(1, "s", "vm", "id"), &[([2; 16], [1; 16])]),
            MapFate::Keep
        );
        // Everything else is a reset: another store, VM, disk, or a run the agent never saw
        // (a rebuilt appliance, a restored agent state, an emptied store).
        for want in [
            header(1, "other", "vm", "id"),
            header(1, "s", "vm2", "id"),
            header(1, "s", "vm", "id2"),
            header(9, "s", "vm", "id"),
            header(0, "s", "vm", "id"),
        ] {
            assert!(
                matches!(reconcile(&have, &want, &[]), MapFate::Reset(_)),
                "{want:?}"
            );
        }
        // A map never bound (new) is an initial sync.
        assert!(matches!(
            reconcile(&header(0, "", "", ""), &header(0, "s", "vm", "id"), &[]),
            MapFate::Reset(_)
        ));
    }

    /// Two disks whose maps say every chunk is known as of run 1 in store "s", and a pending run
    /// 2 (built on run 1) covering chunk 2 of disk a only.
    fn two_bound_disks_and_a_pending_run(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let state = dir.join("state");
        let (a, b) = (image(dir, "a", 4, 1), image(dir, "b", 4, 101));
        for (p, n) in [(&a, "a"), (&b, "b")] {
            let mut d = open_disk(&state, p, n, 16);
            d.map
                .write(&(0..4).map(|c| (c, [7u8; 32])).collect::<Vec<(u64, Cv)>>())
                .unwrap();
            let h = header(1, "s", "vm", &d.id);
            d.map.set_header(h).unwrap();
            d.map.sync().unwrap();
        }
        let pd = |name: &str, cvs| persist::PendingDisk {
            name: name.into(),
            base: [1; 16],
            cvs,
        };
        persist::write_pending(
            &state,
            &[2; 16],
            &vec![pd("a", vec![(2, [3; 32])]), pd("b", vec![])],
        )
        .unwrap();
        (state, a, b)
    }

    fn holding(store: &str, last: u8) -> ship::Holding {
        ship::Holding {
            store: store.into(),
            open: [0; 16],
            disks: ["b", "a"]
                .iter()
                .map(|r| ferry_wire::HeldDisk {
                    replica: r.to_string(),
                    last_run: [last; 16],
                    point_seq: 1,
                })
                .collect(),
        }
    }

    fn recovered(dir: &Path, h: &ship::Holding) -> (Vec<Disk>, PathBuf) {
        let (state, a, b) = two_bound_disks_and_a_pending_run(dir);
        // Restarted with `--disk b.img --disk a.img`: pending runs name their disks.
        let o = options(&state, &[&b, &a], &["b", "a"]);
        let mut disks = vec![
            open_disk(&state, &b, "b", 16),
            open_disk(&state, &a, "a", 16),
        ];
        recover_state(&o, &mut disks, &Track::Scan, h).unwrap();
        assert!(persist::leftover_pending(&state).is_empty());
        (disks, state)
    }

    #[test]
    fn a_pending_run_the_server_holds_is_folded_into_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let (disks, state) = recovered(dir.path(), &holding("s", 2));
        assert_eq!(disks[1].cur[2], [3; 32]);
        assert_eq!(disks[1].cur[1], [7; 32]);
        assert_eq!(disks[0].cur[2], [7; 32]);
        assert_eq!((disks[0].base, disks[1].base), ([2; 16], [2; 16]));
        let (f, cvs) = CvFile::open(&state, "a", 4 * CHUNK).unwrap();
        assert_eq!((cvs[2], f.header().base), ([3; 32], [2; 16]));
        assert!(
            disks.iter().all(|d| d.todo.count() == 4),
            "scan: a full pass, compared"
        );
    }

    #[test]
    fn a_pending_run_the_server_does_not_hold_makes_its_chunks_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (disks, state) = recovered(dir.path(), &holding("s", 1));
        assert_eq!(disks[1].cur[2], UNKNOWN, "disk a's pending chunk is known");
        assert_eq!(disks[1].cur[1], [7; 32]);
        assert_eq!(
            disks[0].cur[2], [7; 32],
            "disk b's chunk 2 was not in the run"
        );
        let (f, cvs) = CvFile::open(&state, "a", 4 * CHUNK).unwrap();
        assert_eq!((cvs[2], f.header().base), (UNKNOWN, [1; 16]));
    }

    #[test]
    fn a_server_holding_something_else_resets_every_map() {
        for h in [
            holding("another-store", 1),
            holding("s", 5),
            holding("s", 0),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (disks, state) = recovered(dir.path(), &h);
            for d in &disks {
                assert!(d.cur.iter().all(|c| *c == UNKNOWN), "{h:?}");
                assert_eq!(d.base, h.disks[0].last_run);
            }
            let (f, cvs) = CvFile::open(&state, "a", 4 * CHUNK).unwrap();
            assert!(cvs.iter().all(|c| *c == UNKNOWN));
            assert_eq!(f.header().store, h.store);
        }
    }

    /// Issue 7 §6, the agent's commit path under power loss: three runs are cut and acknowledged
    /// while `ferry_durable::crashsim` records every sync of the state directory; after *every*
    /// sync the crash state "nothing unsynced survived" is taken, and two torn states while each
    /// file sync is in flight (the file's old and new sectors mixed). On each, for every state the
    /// server may hold then (the last acknowledged run, or the run whose tag was sent), start-up
    /// recovery must succeed and leave no chunk claiming a CV other than the one that run holds;
    /// and when the server holds a run the agent had written its pending file for, the map is
    /// kept or brought forward, never thrown away (a full resend).
    #[test]
    fn every_power_cut_of_the_agent_state_recovers_to_what_the_server_holds() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), "a", 8, 1);
        let state = dir.path().join("state");
        // (acknowledged runs, the run whose tag is sent but not yet acknowledged)
        type Known = (Vec<RunId>, Option<RunId>);
        let known: Arc<std::sync::Mutex<Known>> = Default::default();
        let k2 = known.clone();
        let states = ferry_durable::crashsim::take_states(
            &state,
            &dir.path().join("crashes"),
            2,
            move || k2.lock().unwrap().clone(),
        )
        .unwrap();
        let o = options(&state, &[&img], &["a"]);
        let mut cvs_at: std::collections::HashMap<RunId, Vec<Cv>> = Default::default();
        cvs_at.insert(ferry_wire::NO_RUN, Vec::new());
        {
            let (mut e, mut rx) = engine(&o, vec![open_disk(&state, &img, "a", 16)]);
            let h = ship::Holding {
                store: "s".into(),
                open: [0; 16],
                disks: vec![ferry_wire::HeldDisk {
                    replica: "a".into(),
                    last_run: ferry_wire::NO_RUN,
                    point_seq: 0,
                }],
            };
            recover_state(&o, &mut e.disks, &Track::Scan, &h).unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            for round in 0..3u8 {
                f.write_all_at(&[round + 7; 4096], u64::from(round) * CHUNK)
                    .unwrap();
                e.begin_scan_pass();
                while e.process(0, BATCH).unwrap() > 0 {}
                let run = e.run;
                // The tag goes to the shipper once its pending file is durable: from then on
                // the server may hold the run.
                e.cut(PointKind::Crash, None).unwrap();
                known.lock().unwrap().1 = Some(run);
                // A power cut right after the tag left (no sync marks that instant).
                let at = dir.path().join(format!("crashes/tag-{round}"));
                ferry_durable::crashsim::materialize(&state, &at).unwrap();
                states
                    .lock()
                    .unwrap()
                    .push((at, known.lock().unwrap().clone()));
                cvs_at.insert(run, e.disks[0].cur.clone());
                sent(&mut rx);
                e.committed(run).unwrap();
                let mut k = known.lock().unwrap();
                k.0.push(run);
                k.1 = None;
            }
        }
        let taken = ferry_durable::crashsim::finish(&states);
        assert!(taken.len() > 10, "only {} crash states", taken.len());
        assert!(
            taken
                .iter()
                .filter(|(p, _)| p.to_string_lossy().contains("-torn"))
                .count()
                > 3,
            "torn states taken"
        );
        let mut checked = 0;
        for (crash, (acked, sent_run)) in &taken {
            let last = acked.last().copied().unwrap_or(ferry_wire::NO_RUN);
            for held in std::iter::once(last).chain(*sent_run) {
                // Recovery works on a copy: each held state starts from the same crash state.
                let work = crash.with_extension(hex::encode(&held[..2]));
                let _ = std::fs::remove_dir_all(&work);
                copy_tree(crash, &work);
                let o = options(&work, &[&img], &["a"]);
                let mut disks = vec![open_disk(&work, &img, "a", 16)];
                let h = ship::Holding {
                    store: "s".into(),
                    open: [0; 16],
                    disks: vec![ferry_wire::HeldDisk {
                        replica: "a".into(),
                        last_run: held,
                        point_seq: 0,
                    }],
                };
                recover_state(&o, &mut disks, &Track::Scan, &h)
                    .unwrap_or_else(|e| panic!("{}: recovery failed: {e}", crash.display()));
                let truth = &cvs_at[&held];
                for (c, cv) in disks[0].cur.iter().enumerate() {
                    assert!(
                        *cv == UNKNOWN || truth.get(c) == Some(cv),
                        "{}: chunk {c} claims a CV the server's run {} does not hold",
                        crash.display(),
                        hex::encode(held)
                    );
                }
                // The server holds a run this agent tagged: nothing is thrown away but the chunks
                // of pending runs it does not hold (they may be in the map in part).
                if held != ferry_wire::NO_RUN && Some(held) == sent_run.or(acked.last().copied()) {
                    let may: std::collections::HashSet<u64> = persist::leftover_pending(crash)
                        .into_iter()
                        .filter_map(|(_, p)| p)
                        .filter(|(r, _)| *r != held)
                        .flat_map(|(_, cvs)| cvs.into_iter().flat_map(|d| d.cvs).map(|(c, _)| c))
                        .collect();
                    let lost = disks[0]
                        .cur
                        .iter()
                        .enumerate()
                        .filter(|(c, cv)| **cv == UNKNOWN && !may.contains(&(*c as u64)))
                        .count();
                    if lost != 0 {
                        let files: Vec<String> = walk(crash);
                        panic!(
                            "{}: the server holds run {} but {lost} chunks became unknown (a resend); acked {}, sent {:?}; crash state: {files:?}",
                            crash.display(),
                            hex::encode(held),
                            acked.len(),
                            sent_run.map(hex::encode)
                        );
                    }
                }
                checked += 1;
            }
        }
        let expected: usize = taken
            .iter()
            .map(|(_, (_, s))| 1 + usize::from(s.is_some()))
            .sum();
        assert_eq!(checked, expected);
    }

    fn walk(d: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(format!(
                    "{} ({} B)",
                    e.path().display(),
                    e.metadata().unwrap().len()
                ));
            }
        }
        out
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let p = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_tree(&e.path(), &p);
            } else {
                std::fs::copy(e.path(), &p).unwrap();
            }
        }
    }
}
