//! The server's in-memory view of every VM for [`crate::status`].
//!
//! Cost on the data path: a record bumps a few atomic counters and extends a per-connection
//! run-length list of unacknowledged records ([`AckTrack`]); the writer task pops that list after
//! it sends an ack. The board's lock is taken only when a connection starts or ends, on a disk's
//! first record of a connection, at `Begin` and `Tag`, and when a point is committed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ferry_format::manifest::Point;
use ferry_wire::Message;

use crate::status::{
    rfc3339, DiskStatus, Intervals, Note, PointRef, StatusFile, VmStatus, STATUS_FORMAT,
    STATUS_VERSION,
};

/// Records of one disk merge into one pending entry up to this many payload bytes: the backlog may
/// lag an ack by at most this much per connection.
const MERGE_CAP: u64 = 1 << 20;

/// Counters of one disk, bumped by connections without the board's lock.
#[derive(Default)]
pub(crate) struct DiskCounters {
    records: AtomicU64,
    bytes: AtomicU64,
    acked_seq: AtomicU64,
}

/// Counters of one VM: write payload bytes received and acknowledged, all connections.
#[derive(Default)]
pub(crate) struct VmCounters {
    received: AtomicU64,
    acked: AtomicU64,
}

struct DiskEntry {
    counters: Arc<DiskCounters>,
    last_point: Option<PointRef>,
}

/// Where a connection learns that a tag it sent became a point: (run, point id).
pub(crate) type PointNotify = tokio::sync::mpsc::UnboundedSender<([u8; 16], String)>;

struct VmEntry {
    /// The owning connection's point notifications.
    notify: Option<PointNotify>,
    agent: Option<String>,
    peer: Option<String>,
    connected: bool,
    since: Option<SystemTime>,
    /// The connection that owns the VM.
    conn: Option<u64>,
    /// Disks of the open run (its `Begin` received, its `Tag` not yet).
    run: Option<Vec<String>>,
    /// Tags received and not yet points: run id (hex) and `counters.received` at the tag.
    tags: VecDeque<(String, u64)>,
    /// `counters.received` at the last tag that became a point.
    applied: u64,
    counters: Arc<VmCounters>,
    disks: BTreeMap<String, DiskEntry>,
    last_point: Option<PointRef>,
    /// The newest app-consistent point.
    last_app: Option<PointRef>,
    /// Why the VM is quarantined, while it is.
    quarantine: Option<String>,
    /// When this server first saw the VM (a connection, or points in the store at start).
    first_seen: SystemTime,
    /// The agent's cut intervals as it reported them: crash, app (`None`: off), from where.
    intervals: Option<(Duration, Option<Duration>, String)>,
    /// A resync the agent reported, until the point of the first tag received after it: since
    /// when, why, and that tag's run once received (the agent tags nothing during a resync).
    resync: Option<(SystemTime, String, Option<String>)>,
    /// The last cut the agent abandoned: when, why.
    abandoned: Option<(SystemTime, String)>,
    /// Chunks left to read and in all, as the agent last reported (while it had any), and when.
    progress: Option<(u64, u64, SystemTime)>,
}

impl VmEntry {
    fn new() -> Self {
        VmEntry {
            notify: None,
            agent: None,
            peer: None,
            connected: false,
            since: None,
            conn: None,
            run: None,
            tags: VecDeque::new(),
            applied: 0,
            counters: Default::default(),
            disks: BTreeMap::new(),
            last_point: None,
            last_app: None,
            quarantine: None,
            first_seen: SystemTime::now(),
            intervals: None,
            resync: None,
            abandoned: None,
            progress: None,
        }
    }

    fn disk(&mut self, name: &str) -> &mut DiskEntry {
        self.disks
            .entry(name.to_owned())
            .or_insert_with(|| DiskEntry {
                counters: Default::default(),
                last_point: None,
            })
    }

    fn state(&self) -> &'static str {
        if self.quarantine.is_some() {
            "quarantined"
        } else if self.connected && self.run.is_some() {
            "replicating"
        } else if !self.tags.is_empty() {
            "applying"
        } else if self.connected {
            "idle"
        } else {
            "disconnected"
        }
    }
}

/// How protected the VM is, in the operator's words: `initial sync N %`, `resyncing N %`,
/// `paused` (cache backpressure), `protected`, `disconnected` or `quarantined` (`throttled` is set
/// by the status writer from the pacer).
fn protection(e: &VmEntry, paused: bool) -> String {
    let pct = || {
        e.progress
            .filter(|(_, total, _)| *total > 0)
            .map(|(left, total, _)| format!(" {}%", 100 - (left * 100).div_ceil(total)))
            .unwrap_or_default()
    };
    if e.quarantine.is_some() {
        "quarantined".into()
    } else if !e.connected {
        "disconnected".into()
    } else if e.last_point.is_none() {
        format!("initial sync{}", pct())
    } else if e.resync.is_some() {
        format!("resyncing{}", pct())
    } else if paused {
        "paused".into()
    } else {
        "protected".into()
    }
}

/// What the server is, for the status file.
#[derive(Clone, Debug)]
pub(crate) struct ServerInfo {
    pub listen: String,
    pub store: String,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub retention: Option<Duration>,
}

/// The server's view of every VM, shared by connections, the drain loop and the status writer.
pub(crate) struct Board {
    vms: Mutex<BTreeMap<String, VmEntry>>,
    /// Credit paused by the cache's high watermark (backpressure).
    paused: std::sync::atomic::AtomicBool,
    started: SystemTime,
    info: ServerInfo,
}

impl Board {
    pub fn new(info: ServerInfo) -> Self {
        Board {
            vms: Mutex::new(BTreeMap::new()),
            paused: Default::default(),
            started: SystemTime::now(),
            info,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VmEntry>> {
        self.vms.lock().expect("status board lock")
    }

    /// Forgets a VM (its migration completed: it has no points, and no agent may connect for it).
    pub fn forget(&self, vm: &str) {
        self.lock().remove(vm);
    }

    /// Seeds each VM's last points from the store's manifests.
    pub fn load_points(&self, root: &Path) {
        let vms = match ferry_store::list_vms_at(root) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "status: cannot list the store's VMs");
                return;
            }
        };
        for vm in vms {
            match ferry_store::load_manifest_at(root, &vm) {
                Ok(Some(m)) => {
                    for p in &m.points {
                        self.point(&vm, p);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(vm = %vm, error = %e, "status: cannot read the manifest"),
            }
        }
    }

    /// A connection claimed `vm`.
    pub fn connected(
        &self,
        vm: &str,
        agent: &str,
        peer: &str,
        conn: u64,
        notify: PointNotify,
    ) -> Arc<VmCounters> {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_insert_with(VmEntry::new);
        e.notify = Some(notify);
        e.agent = Some(agent.to_owned());
        e.peer = Some(peer.to_owned());
        e.connected = true;
        e.since = Some(SystemTime::now());
        e.conn = Some(conn);
        // A run the previous connection left open is void (the agent sends it again).
        e.run = None;
        e.counters.clone()
    }

    /// Connection `conn` of `vm` ended (a newer one may already own the VM).
    pub fn disconnected(&self, vm: &str, conn: u64) {
        if let Some(e) = self.lock().get_mut(vm) {
            if e.conn == Some(conn) {
                e.notify = None;
                e.connected = false;
                e.since = Some(SystemTime::now());
                e.conn = None;
                e.run = None;
            }
        }
    }

    fn disk_counters(&self, vm: &str, disk: &str) -> Arc<DiskCounters> {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_insert_with(VmEntry::new);
        e.disk(disk).counters.clone()
    }

    fn begin(&self, vm: &str, disks: Vec<String>) {
        if let Some(e) = self.lock().get_mut(vm) {
            for d in &disks {
                e.disk(d);
            }
            e.run = Some(disks);
        }
    }

    fn tag(&self, vm: &str, run: String) {
        if let Some(e) = self.lock().get_mut(vm) {
            e.run = None;
            let at = e.counters.received.load(Ordering::Relaxed);
            // Bounded even if the pipeline stopped committing.
            if e.tags.len() >= 1024 {
                e.tags.pop_front();
            }
            if let Some((_, _, after @ None)) = &mut e.resync {
                *after = Some(run.clone());
            }
            e.tags.push_back((run, at));
        }
    }

    /// A point was committed (or found in the store at start).
    pub fn point(&self, vm: &str, p: &Point) {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_insert_with(VmEntry::new);
        if let Some(i) = e.tags.iter().position(|(run, _)| *run == p.run) {
            e.applied = e.applied.max(e.tags[i].1);
            e.tags.drain(..=i);
        }
        // The agent that sent the tag learns the point's id (`ferry-agent cut` prints it).
        let mut run = [0u8; 16];
        if let (Some(n), Ok(())) = (&e.notify, hex::decode_to_slice(&p.run, &mut run)) {
            let _ = n.send((run, p.id.clone()));
        }
        let r = PointRef::from(p);
        for d in &p.disks {
            e.disk(&d.name).last_point = Some(r.clone());
        }
        if p.kind == "app" {
            e.last_app = Some(r.clone());
        }
        // The point of the first tag after a resync began: the resync is done (by order, not by
        // the agent's clock).
        if e.resync
            .as_ref()
            .is_some_and(|(_, _, after)| after.as_deref() == Some(p.run.as_str()))
        {
            e.resync = None;
        }
        // A point means the agent caught up.
        e.progress = None;
        e.last_point = Some(r);
    }

    /// The agent of `vm` reported its cut intervals.
    pub fn intervals(&self, vm: &str, crash: Duration, app: Option<Duration>, from: &str) {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_insert_with(VmEntry::new);
        e.intervals = Some((crash, app, from.to_owned()));
    }

    /// The agent of `vm` started a resync (why), or it is over (`None`).
    pub fn resync(&self, vm: &str, why: Option<String>) {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_insert_with(VmEntry::new);
        e.resync = why.map(|w| (SystemTime::now(), w, None));
    }

    /// Credit is paused (or granted again) because of the cache's watermarks.
    pub fn paused(&self, on: bool) {
        self.paused.store(on, Ordering::Relaxed);
    }

    /// The agent of `vm` reported how many chunks it has left to read.
    pub fn progress(&self, vm: &str, left: u64, total: u64) {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_insert_with(VmEntry::new);
        e.progress = Some((left, total, SystemTime::now()));
    }

    /// The agent of `vm` abandoned a cut.
    pub fn abandoned(&self, vm: &str, why: &str) {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_insert_with(VmEntry::new);
        e.abandoned = Some((SystemTime::now(), why.to_owned()));
    }

    /// Marks `vm` quarantined (with why) or released.
    pub fn quarantined(&self, vm: &str, reason: Option<String>) {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_insert_with(VmEntry::new);
        if reason.is_none() {
            // Nothing received before the quarantine becomes a point any more.
            e.tags.clear();
            e.run = None;
            e.applied = e.counters.acked.load(Ordering::Relaxed);
        }
        e.quarantine = reason;
    }

    /// The status file as of now.
    pub fn snapshot(&self, running: bool, cache_used: u64) -> StatusFile {
        let vms = self.lock();
        let ts = |t: Option<SystemTime>| t.map(rfc3339);
        StatusFile {
            format: STATUS_FORMAT.into(),
            version: STATUS_VERSION,
            written_at: rfc3339(SystemTime::now()),
            running,
            pid: std::process::id(),
            started_at: rfc3339(self.started),
            listen: self.info.listen.clone(),
            store: self.info.store.clone(),
            cache_dir: self.info.cache_dir.display().to_string(),
            cache_used_bytes: cache_used,
            cache_size_bytes: self.info.cache_size,
            retention_seconds: self.info.retention.map(|r| r.as_secs()),
            conditions: Vec::new(),
            host: None,
            drain_rate_bytes_per_second: 0.0,
            metrics_url: None,
            vms: vms
                .iter()
                .map(|(name, e)| {
                    let state = e.state();
                    VmStatus {
                        vm: name.clone(),
                        agent: e.agent.clone(),
                        connected: e.connected,
                        peer: e.peer.clone(),
                        since: ts(e.since),
                        state: state.into(),
                        quarantine: e.quarantine.clone(),
                        throttled: false,
                        ingest_limit_bytes_per_second: None,
                        acked_bytes: e.counters.acked.load(Ordering::Relaxed),
                        backlog_bytes: e
                            .counters
                            .acked
                            .load(Ordering::Relaxed)
                            .saturating_sub(e.applied),
                        last_point: e.last_point.clone(),
                        last_app_point: e.last_app.clone(),
                        first_seen: Some(rfc3339(e.first_seen)),
                        intervals: e.intervals.as_ref().map(|(c, a, from)| Intervals {
                            crash_every_seconds: c.as_secs_f64(),
                            app_every_seconds: a.map(|a| a.as_secs_f64()),
                            from: from.clone(),
                        }),
                        resync: e.resync.as_ref().map(|(t, why, _)| Note {
                            time: rfc3339(*t),
                            why: why.clone(),
                        }),
                        last_abandoned_cut: e.abandoned.as_ref().map(|(t, why)| Note {
                            time: rfc3339(*t),
                            why: why.clone(),
                        }),
                        rpo_seconds: None,
                        protection: protection(e, self.paused.load(Ordering::Relaxed)),
                        rate_in_bytes_per_second: 0.0,
                        backlog_eta_seconds: None,
                        conditions: Vec::new(),
                        disks: e
                            .disks
                            .iter()
                            .map(|(d, de)| {
                                let in_run = e.run.as_ref().is_some_and(|r| r.contains(d));
                                DiskStatus {
                                    name: d.clone(),
                                    state: if state == "replicating" && !in_run {
                                        "idle".into()
                                    } else {
                                        state.into()
                                    },
                                    last_acked_seq: de.counters.acked_seq.load(Ordering::Relaxed),
                                    records_received: de.counters.records.load(Ordering::Relaxed),
                                    bytes_received: de.counters.bytes.load(Ordering::Relaxed),
                                    last_point: de.last_point.clone(),
                                }
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }
}

/// Records of one connection that are not yet acknowledged, run-length coded, so that acks can be
/// turned into per-disk acked seqs and per-VM acked bytes.
pub(crate) struct AckTrack {
    vm: String,
    counters: Arc<VmCounters>,
    names: HashMap<String, usize>,
    disks: Vec<Arc<DiskCounters>>,
    pending: VecDeque<Pending>,
}

struct Pending {
    first: u64,
    last: u64,
    disks: Target,
    /// Write payload bytes of the entry's records.
    data: u64,
}

#[derive(PartialEq, Eq)]
enum Target {
    One(usize),
    /// `Begin` and `Tag` count for each of their disks.
    Many(Box<[usize]>),
}

impl AckTrack {
    pub fn new(vm: &str, counters: Arc<VmCounters>) -> Self {
        AckTrack {
            vm: vm.to_owned(),
            counters,
            names: HashMap::new(),
            disks: Vec::new(),
            pending: VecDeque::new(),
        }
    }

    /// The VM of the connection.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    fn disk(&mut self, board: &Board, name: &str) -> usize {
        if let Some(&i) = self.names.get(name) {
            return i;
        }
        self.disks.push(board.disk_counters(&self.vm, name));
        self.names.insert(name.to_owned(), self.disks.len() - 1);
        self.disks.len() - 1
    }

    /// A record with `seq` was accepted and handed to the committer.
    pub fn received(&mut self, board: &Board, seq: u64, m: &Message) {
        let (target, data) = match m {
            Message::Write { disk, data, .. } => {
                let i = self.disk(board, disk);
                let c = &self.disks[i];
                c.records.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                self.counters
                    .received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                (Target::One(i), data.len() as u64)
            }
            Message::Zero { disk, .. } | Message::Discard { disk, .. } => {
                let i = self.disk(board, disk);
                self.disks[i].records.fetch_add(1, Ordering::Relaxed);
                (Target::One(i), 0)
            }
            Message::Begin { disks, .. } => {
                let names: Vec<String> = disks.iter().map(|(d, _)| d.clone()).collect();
                let idx = names.iter().map(|d| self.disk(board, d)).collect();
                board.begin(&self.vm, names);
                (Target::Many(idx), 0)
            }
            Message::Tag { tag, .. } => {
                let idx = tag
                    .disks
                    .iter()
                    .map(|d| self.disk(board, &d.name))
                    .collect();
                board.tag(
                    &self.vm,
                    tag.run.iter().map(|b| format!("{b:02x}")).collect(),
                );
                (Target::Many(idx), 0)
            }
            _ => return,
        };
        if let Some(b) = self.pending.back_mut() {
            if matches!(target, Target::One(_)) && b.disks == target && b.data + data <= MERGE_CAP {
                b.last = seq;
                b.data += data;
                return;
            }
        }
        self.pending.push_back(Pending {
            first: seq,
            last: seq,
            disks: target,
            data,
        });
    }

    /// Every record of the connection with a seq ≤ `seq` is durable and acknowledged. Entries
    /// partition the connection's records in order and `seq` is one of them, so the entry holding
    /// it names the disk(s) of that record: per-disk seqs are exact; an entry's bytes count once
    /// all of it is acknowledged.
    pub fn acked(&mut self, seq: u64) {
        while let Some(p) = self.pending.front() {
            if p.first > seq {
                break;
            }
            let through = p.last.min(seq);
            let mark = |i: &usize| {
                self.disks[*i]
                    .acked_seq
                    .fetch_max(through, Ordering::Relaxed);
            };
            match &p.disks {
                Target::One(i) => mark(i),
                Target::Many(v) => v.iter().for_each(mark),
            }
            if p.last > seq {
                break;
            }
            self.counters.acked.fetch_add(p.data, Ordering::Relaxed);
            self.pending.pop_front();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_format::segment::{DiskCut, PointKind, PointTag};

    /// A board for tests.
    pub(crate) fn board() -> Board {
        Board::new(ServerInfo {
            listen: "127.0.0.1:1".into(),
            store: "/s".into(),
            cache_dir: "/c".into(),
            cache_size: 1 << 30,
            retention: None,
        })
    }

    fn tag(run: u8, disks: &[&str]) -> Message {
        Message::Tag {
            seq: 0,
            tag: PointTag {
                run: [run; 16],
                time_ns: 0,
                kind: PointKind::Crash,
                disks: disks
                    .iter()
                    .map(|d| DiskCut {
                        name: d.to_string(),
                        size: 1 << 20,
                        blake3: [0; 32],
                    })
                    .collect(),
            },
        }
    }

    #[test]
    fn acks_resolve_to_per_disk_seqs_and_backlog_clears_at_the_point() {
        let b = board();
        let c = b.connected(
            "vm",
            "agent",
            "peer",
            1,
            tokio::sync::mpsc::unbounded_channel().0,
        );
        let mut t = AckTrack::new("vm", c);
        let begin = Message::Begin {
            seq: 0,
            run: [7; 16],
            time_ns: 0,
            disks: vec![("a".into(), 1 << 20), ("b".into(), 1 << 20)],
            bases: vec![[0; 16]; 2],
        };
        t.received(&b, 1, &begin);
        t.received(&b, 2, &Message::write(2, "a", 0, vec![1; 4096]));
        t.received(&b, 3, &Message::write(3, "a", 65536, vec![1; 4096]));
        t.received(&b, 4, &Message::write(4, "b", 0, vec![1; 8192]));
        let s = b.snapshot(true, 0);
        assert_eq!(s.vms[0].state, "replicating");
        assert_eq!(s.vms[0].disks[0].records_received, 2);
        assert_eq!(s.vms[0].disks[1].bytes_received, 8192);
        assert_eq!(s.vms[0].backlog_bytes, 0, "nothing acked yet");
        // An ack inside disk a's entry: a is exact, b only has its Begin.
        t.acked(2);
        let s = b.snapshot(true, 0);
        assert_eq!(
            (
                s.vms[0].disks[0].last_acked_seq,
                s.vms[0].disks[1].last_acked_seq
            ),
            (2, 1)
        );
        t.received(&b, 5, &tag(7, &["a", "b"]));
        t.acked(5);
        let s = b.snapshot(true, 0);
        assert_eq!(s.vms[0].state, "applying");
        assert_eq!(s.vms[0].backlog_bytes, 16384);
        assert_eq!(
            (
                s.vms[0].disks[0].last_acked_seq,
                s.vms[0].disks[1].last_acked_seq
            ),
            (5, 5)
        );
        let p = Point {
            id: "0001-x".into(),
            seq: 1,
            run: "07".repeat(16),
            time: "2026-01-01T00:00:00Z".into(),
            kind: "crash".into(),
            disks: vec![],
        };
        b.point("vm", &p);
        let s = b.snapshot(true, 0);
        assert_eq!(
            (s.vms[0].state.as_str(), s.vms[0].backlog_bytes),
            ("idle", 0)
        );
        assert_eq!(s.vms[0].last_point.as_ref().unwrap().id, "0001-x");
        b.disconnected("vm", 1);
        assert_eq!(b.snapshot(true, 0).vms[0].state, "disconnected");
    }
}
