//! Applying the journal to replicas, making recovery points, and restoring them.
//!
//! Job: [`Applier`] takes each disk's segments in order and applies their records to the disk's
//! replica; at a tag that every disk of the cut has reached, it commits a recovery point (replica
//! deltas durable → manifest replaced → deltas applied). [`restore`] materializes any listed point as a
//! raw image or fixed VHD, with an optional read-back verification.
//!
//! Invariants:
//! - A disk never applies records past a tag that is not yet committed (tag barrier), so a point holds
//!   exactly the records of its run and nothing after.
//! - Applying is idempotent: records before a disk's `applied` position are skipped, and a tag whose
//!   run is already a point is skipped. After a crash, [`Applier::recover`] replays the journal from
//!   the last committed position.
//! - A `Begin` voids a run's uncommitted changes (a run that died before its tag leaves nothing behind).
//!
//! Must not: read sources or decide when points are taken.

pub mod lifecycle;
pub mod quarantine;
mod restore;
pub mod retention;
mod target;

pub use target::{run_ops, ReplicaTarget, RunOp, RunSpan, TargetError};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use ferry_crypto::ZERO_DIGEST;
use ferry_format::manifest::{point_id, DiskState, JournalPos, Manifest, Point, PointDisk};
use ferry_format::segment::{PointTag, Record};
use ferry_format::CHUNK_SIZE;
use ferry_store::replica::pages_for;
use ferry_store::{LocalStore, Replica, StoreError};

pub use restore::{
    restore, verify_file, OutputFormat, RestoreError, RestoreOptions, RestoreReport,
};

/// Errors of the applier.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// the journal is inconsistent
    #[error("journal of {vm}/{disk} segment {segment}: {detail}")]
    Journal {
        vm: String,
        disk: String,
        segment: u64,
        detail: String,
    },
    /// the replica target (e.g. Azure) failed
    #[error(transparent)]
    Target(#[from] TargetError),
}

impl ApplyError {
    /// Whether only the VM's own stored data can cause this (a journal the replica refuses, a
    /// malformed segment or manifest), so that quarantining the VM is the answer; I/O, index,
    /// lock and target failures hit every VM and are not.
    pub fn is_vm_data(&self) -> bool {
        matches!(
            self,
            ApplyError::Journal { .. }
                | ApplyError::Store(StoreError::Format { .. })
                | ApplyError::Store(StoreError::WrongKey { .. })
        )
    }
}

/// A point the applier committed.
#[derive(Clone, Debug)]
pub struct Committed {
    pub vm: String,
    pub point: Point,
}

struct DiskCursor {
    replica: Option<Replica>,
    /// Where the current run began (its Begin record).
    run_start: Option<JournalPos>,
    queue: VecDeque<(u64, Vec<Record>, usize)>,
    /// Waiting for this run's tag to commit.
    blocked_on: Option<[u8; 16]>,
}

struct VmState {
    manifest: Manifest,
    disks: BTreeMap<String, DiskCursor>,
    reached: HashMap<[u8; 16], (PointTag, BTreeMap<String, JournalPos>)>,
}

/// Applies segments to replicas and commits points.
pub struct Applier<'s> {
    store: &'s LocalStore,
    vms: HashMap<String, VmState>,
    target: Option<Box<dyn ReplicaTarget + 's>>,
    quarantine: Option<Arc<quarantine::Quarantines>>,
}

impl<'s> Applier<'s> {
    pub fn new(store: &'s LocalStore) -> Self {
        Applier {
            store,
            vms: HashMap::new(),
            target: None,
            quarantine: None,
        }
    }

    /// Quarantines a VM whose own data fails ([`ApplyError::is_vm_data`]) instead of failing, and
    /// skips the segments of quarantined VMs ([`quarantine`]). Without it every failure is the
    /// caller's.
    pub fn set_quarantine(&mut self, q: Arc<quarantine::Quarantines>) {
        self.quarantine = Some(q);
    }

    fn quarantined(&self, vm: &str) -> bool {
        self.quarantine.as_ref().is_some_and(|q| q.contains(vm))
    }

    /// `r` for `vm`, or, for a failure of the VM's own data with quarantine on, the VM
    /// quarantined (its state dropped) and nothing committed.
    fn or_quarantine(
        &mut self,
        vm: &str,
        r: Result<Vec<Committed>, ApplyError>,
    ) -> Result<Vec<Committed>, ApplyError> {
        match (r, &self.quarantine) {
            (Err(e), Some(q)) if e.is_vm_data() => {
                q.add(vm, &e.to_string()).map_err(|source| {
                    ApplyError::Store(StoreError::Io {
                        path: quarantine::dir(self.store.root()),
                        op: "write the quarantine record in",
                        source,
                    })
                })?;
                self.vms.remove(vm);
                Ok(Vec::new())
            }
            (r, _) => r,
        }
    }

    /// The applier's half of ending the quarantine of `vm`: voids its uncommitted journal (each
    /// disk's applied position moves past its last stored segment, and its replica drops its
    /// pending changes). Committed points are untouched. The caller then removes the quarantine
    /// record ([`quarantine::Quarantines::remove`]). The caller makes sure no record of
    /// the VM that predates the release is still to come (the process server drains its cache
    /// first).
    pub fn release(&mut self, vm: &str) -> Result<(), ApplyError> {
        self.vms.remove(vm);
        let mut m = match self.store.load_manifest(vm)? {
            Some(m) => m,
            None => Manifest::new(vm, &self.store.key().id().to_string()),
        };
        for disk in list_dirs(&self.store.root().join("journal").join(vm))? {
            let next = self
                .store
                .list_segments(vm, &disk)?
                .last()
                .map_or(0, |s| s + 1);
            let dir = self.store.replica_dir(vm, &disk);
            if dir.join("current.map").exists() {
                // An interrupted commit is finished first, as at any start.
                let latest = m
                    .points
                    .iter()
                    .filter(|p| p.disks.iter().any(|d| d.name == disk))
                    .map(|p| p.seq)
                    .max()
                    .unwrap_or(0);
                let mut r = Replica::open(&dir)?;
                r.recover(latest)?;
                r.reset_pending()?;
            }
            let d = m.disks.entry(disk).or_insert(DiskState {
                size: 0,
                applied: JournalPos::default(),
            });
            d.applied = d.applied.max(JournalPos {
                segment: next,
                record: 0,
            });
        }
        self.store.commit_manifest(&m)?;
        Ok(())
    }

    /// Also applies every committed run to `target` (e.g. Azure page blobs) before the point is
    /// committed locally.
    pub fn set_target(&mut self, target: Box<dyn ReplicaTarget + 's>) {
        self.target = Some(target);
    }

    fn vm(&mut self, vm: &str) -> Result<&mut VmState, ApplyError> {
        if !self.vms.contains_key(vm) {
            let manifest = match self.store.load_manifest(vm)? {
                Some(m) => m,
                None => Manifest::new(vm, &self.store.key().id().to_string()),
            };
            if manifest.key_id != self.store.key().id().to_string() {
                return Err(ApplyError::Store(StoreError::WrongKey {
                    store: self.store.root().into(),
                    store_key: manifest.key_id.clone(),
                    key: self.store.key().id().to_string(),
                    key_path: self.store.key().path().into(),
                }));
            }
            self.vms.insert(
                vm.to_owned(),
                VmState {
                    manifest,
                    disks: BTreeMap::new(),
                    reached: HashMap::new(),
                },
            );
        }
        Ok(self.vms.get_mut(vm).expect("inserted"))
    }

    /// The manifest of `vm` as the applier sees it (committed state).
    pub fn manifest(&mut self, vm: &str) -> Result<&Manifest, ApplyError> {
        Ok(&self.vm(vm)?.manifest)
    }

    /// Finishes interrupted commits and replays every VM's journal from its last committed position.
    /// Returns points committed by the replay.
    pub fn recover(&mut self) -> Result<Vec<Committed>, ApplyError> {
        let root = self.store.root().to_owned();
        let mut vms: Vec<String> = ferry_store::list_vms_at(&root)?;
        for v in list_dirs(&root.join("journal"))? {
            if !vms.contains(&v) {
                vms.push(v);
            }
        }
        let mut out = Vec::new();
        for vm in vms {
            // A VM whose migration was completed: what is left of its journal (segments other
            // VMs' data still uses) is never applied again.
            match lifecycle::is_retired(&root, &vm) {
                Ok(true) => continue,
                Ok(false) => {}
                // Unreadable: applied as before (nothing is dropped on a record's say-so).
                Err(e) => {
                    tracing::warn!(vm, error = %e, "cannot read the VM's lifecycle record; its journal is applied as usual")
                }
            }
            if self.quarantined(&vm) {
                tracing::warn!(
                    vm,
                    "VM is quarantined: its journal is not applied (`ferry vms list` says why)"
                );
                continue;
            }
            let r = self.recover_vm(&vm);
            out.extend(self.or_quarantine(&vm, r)?);
        }
        Ok(out)
    }

    fn recover_vm(&mut self, vm: &str) -> Result<Vec<Committed>, ApplyError> {
        let root = self.store.root().to_owned();
        let vm = vm.to_owned();
        let mut out = Vec::new();
        {
            let manifest = self.vm(&vm)?.manifest.clone();
            for disk in manifest.disks.keys() {
                let latest = manifest
                    .points
                    .iter()
                    .filter(|p| p.disks.iter().any(|d| &d.name == disk))
                    .map(|p| p.seq)
                    .max()
                    .unwrap_or(0);
                let dir = self.store.replica_dir(&vm, disk);
                if dir.join("current.map").exists() {
                    let mut r = Replica::open(&dir)?;
                    r.recover(latest)?;
                }
            }
            let disks = list_dirs(&root.join("journal").join(&vm))?;
            for disk in disks {
                let from = manifest
                    .disks
                    .get(&disk)
                    .map(|d| d.applied)
                    .unwrap_or_default();
                for seq in self.store.list_segments(&vm, &disk)? {
                    if seq < from.segment {
                        continue;
                    }
                    let idx = self.store.read_segment_index(&vm, &disk, seq)?;
                    out.extend(self.push_unchecked(&vm, &disk, seq, idx.records)?);
                }
            }
        }
        Ok(out)
    }

    /// Queues one stored segment of `vm`/`disk` and applies whatever can be applied. Returns the
    /// points committed as a result.
    /// With quarantine on, a quarantined VM's segments are skipped, and a failure of the VM's own
    /// data quarantines it.
    pub fn push_segment(
        &mut self,
        vm: &str,
        disk: &str,
        seq: u64,
        records: Vec<Record>,
    ) -> Result<Vec<Committed>, ApplyError> {
        if self.quarantined(vm) {
            return Ok(Vec::new());
        }
        let r = self.push_unchecked(vm, disk, seq, records);
        self.or_quarantine(vm, r)
    }

    fn push_unchecked(
        &mut self,
        vm: &str,
        disk: &str,
        seq: u64,
        records: Vec<Record>,
    ) -> Result<Vec<Committed>, ApplyError> {
        let store = self.store;
        self.vm(vm)?;
        let target = self.target.as_deref_mut();
        let st = self.vms.get_mut(vm).expect("loaded");
        let cur = st
            .disks
            .entry(disk.to_owned())
            .or_insert_with(|| DiskCursor {
                replica: None,
                run_start: None,
                queue: VecDeque::new(),
                blocked_on: None,
            });
        cur.queue.push_back((seq, records, 0));
        advance(store, vm, st, target)
    }

    /// Disks with a tag reached but not committed (waiting for other disks of the cut).
    pub fn waiting(&self) -> usize {
        self.vms
            .values()
            .flat_map(|v| v.disks.values())
            .filter(|d| d.blocked_on.is_some())
            .count()
    }
}

pub(crate) fn list_dirs(p: &std::path::Path) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    match fs::read_dir(p) {
        Ok(it) => {
            for e in it {
                let e = e.map_err(|source| StoreError::Io {
                    path: p.into(),
                    op: "list",
                    source,
                })?;
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    if let Some(n) = e.file_name().to_str() {
                        out.push(n.to_owned());
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StoreError::Io {
                path: p.into(),
                op: "list",
                source,
            })
        }
    }
    out.sort();
    Ok(out)
}

fn advance(
    store: &LocalStore,
    vm: &str,
    st: &mut VmState,
    mut target: Option<&mut (dyn ReplicaTarget + '_)>,
) -> Result<Vec<Committed>, ApplyError> {
    let mut committed = Vec::new();
    loop {
        let mut progress = false;
        for (name, cur) in st.disks.iter_mut() {
            if cur.blocked_on.is_some() {
                continue;
            }
            let applied = st
                .manifest
                .disks
                .get(name)
                .map(|d| d.applied)
                .unwrap_or_default();
            while let Some((seg, records, idx)) = cur.queue.front_mut() {
                if *idx >= records.len() {
                    cur.queue.pop_front();
                    continue;
                }
                let pos = JournalPos {
                    segment: *seg,
                    record: *idx as u32,
                };
                let seg = *seg;
                let rec = &records[*idx];
                *idx += 1;
                progress = true;
                if pos < applied {
                    continue;
                }
                let jerr = |detail: String| ApplyError::Journal {
                    vm: vm.into(),
                    disk: name.clone(),
                    segment: seg,
                    detail,
                };
                match rec {
                    Record::Begin { size, .. } => {
                        let dir = store.replica_dir(vm, name);
                        let r = Replica::open_or_create(&dir, *size)?;
                        if r.pages() != pages_for(*size) {
                            return Err(jerr(format!(
                                "disk is now {size} bytes but its replica has {} pages; Ferry does not follow a resize",
                                r.pages()
                            )));
                        }
                        let r = cur.replica.insert(r);
                        r.reset_pending()?;
                        cur.run_start = Some(pos);
                    }
                    Record::Write { offset, .. } | Record::Zero { offset, .. }
                        if offset % CHUNK_SIZE as u64 != 0 =>
                    {
                        return Err(jerr(format!("unaligned record at offset {offset}")));
                    }
                    Record::Write { offset, digest, .. } => {
                        let r = open_replica(store, vm, name, &mut cur.replica)
                            .ok_or_else(|| jerr("write before any begin".into()))??;
                        r.record(offset / CHUNK_SIZE as u64, digest)?;
                    }
                    Record::Zero { offset, len } => {
                        let r = open_replica(store, vm, name, &mut cur.replica)
                            .ok_or_else(|| jerr("zero before any begin".into()))??;
                        let first = offset / CHUNK_SIZE as u64;
                        for p in first..first + len.div_ceil(CHUNK_SIZE as u64) {
                            r.record(p, &ZERO_DIGEST)?;
                        }
                    }
                    Record::Tag(t) => {
                        let run = hex::encode(t.run);
                        if st.manifest.points.iter().any(|p| p.run == run) {
                            continue;
                        }
                        let e = st
                            .reached
                            .entry(t.run)
                            .or_insert_with(|| (t.clone(), BTreeMap::new()));
                        e.1.insert(
                            name.clone(),
                            JournalPos {
                                segment: seg,
                                record: pos.record + 1,
                            },
                        );
                        cur.blocked_on = Some(t.run);
                        break;
                    }
                }
            }
        }
        // Commit every tag all of whose disks arrived.
        let ready: Vec<[u8; 16]> = st
            .reached
            .iter()
            .filter(|(_, (t, r))| t.disks.iter().all(|d| r.contains_key(&d.name)))
            .map(|(k, _)| *k)
            .collect();
        for run in ready {
            let (tag, reached) = st.reached.remove(&run).expect("listed");
            committed.push(commit(
                store,
                vm,
                st,
                &tag,
                &reached,
                target.as_deref_mut(),
            )?);
            for cur in st.disks.values_mut() {
                if cur.blocked_on == Some(run) {
                    cur.blocked_on = None;
                }
            }
            progress = true;
        }
        if !progress {
            return Ok(committed);
        }
    }
}

/// The manifest entry for a cut: numbered `seq`, at the tag's time.
pub fn point_from_tag(seq: u64, tag: &PointTag) -> Point {
    let time = UNIX_EPOCH + Duration::from_nanos(tag.time_ns);
    Point {
        id: point_id(seq, time),
        seq,
        run: hex::encode(tag.run),
        time: humantime::format_rfc3339_seconds(time).to_string(),
        kind: tag.kind.as_str().into(),
        disks: tag
            .disks
            .iter()
            .map(|d| PointDisk {
                name: d.name.clone(),
                size: d.size,
                blake3: hex::encode(d.blake3),
                snapshot: None,
            })
            .collect(),
    }
}

fn open_replica<'a>(
    store: &LocalStore,
    vm: &str,
    disk: &str,
    slot: &'a mut Option<Replica>,
) -> Option<Result<&'a mut Replica, StoreError>> {
    if slot.is_none() {
        let dir = store.replica_dir(vm, disk);
        if !dir.join("current.map").exists() {
            return None;
        }
        match Replica::open(&dir) {
            Ok(r) => *slot = Some(r),
            Err(e) => return Some(Err(e)),
        }
    }
    slot.as_mut().map(Ok)
}

fn commit(
    store: &LocalStore,
    vm: &str,
    st: &mut VmState,
    tag: &PointTag,
    reached: &BTreeMap<String, JournalPos>,
    target: Option<&mut (dyn ReplicaTarget + '_)>,
) -> Result<Committed, ApplyError> {
    let seq = st.manifest.next_seq;
    for d in &tag.disks {
        let cur = st.disks.get_mut(&d.name).expect("reached implies a cursor");
        let r = open_replica(store, vm, &d.name, &mut cur.replica).ok_or_else(|| {
            ApplyError::Journal {
                vm: vm.into(),
                disk: d.name.clone(),
                segment: reached[&d.name].segment,
                detail: "tag for a disk that has no replica".into(),
            }
        })??;
        if r.pages() != pages_for(d.size) {
            return Err(ApplyError::Journal {
                vm: vm.into(),
                disk: d.name.clone(),
                segment: reached[&d.name].segment,
                detail: format!("cut says {} bytes, replica has {} pages", d.size, r.pages()),
            });
        }
        r.prepare(seq)?;
    }
    let mut point = point_from_tag(seq, tag);
    if let Some(t) = target {
        // The remote replica first: its manifest is the remote commit point. Re-applying after a
        // crash is idempotent (same bytes), and a point the target already has is not cut again.
        let spans: Vec<RunSpan> = tag
            .disks
            .iter()
            .map(|d| {
                let cur = &st.disks[&d.name];
                RunSpan {
                    disk: d.name.clone(),
                    size: d.size,
                    from: cur.run_start.unwrap_or_default(),
                    to: reached[&d.name],
                    fresh: !st
                        .manifest
                        .points
                        .iter()
                        .any(|p| p.disks.iter().any(|x| x.name == d.name)),
                }
            })
            .collect();
        // The remote side numbers its own points (its manifest may hold points this staging store
        // never saw); locally only the snapshot ids are kept.
        let remote = t.commit_run(store, vm, &spans, point.clone())?;
        for d in point.disks.iter_mut() {
            d.snapshot = remote
                .disks
                .iter()
                .find(|r| r.name == d.name)
                .and_then(|r| r.snapshot.clone());
        }
    }
    let mut m = st.manifest.clone();
    m.points.push(point.clone());
    m.next_seq = seq + 1;
    for d in &tag.disks {
        m.disks.insert(
            d.name.clone(),
            DiskState {
                size: d.size,
                applied: reached[&d.name],
            },
        );
    }
    store.commit_manifest(&m)?;
    st.manifest = m;
    for d in &tag.disks {
        let cur = st.disks.get_mut(&d.name).expect("checked");
        cur.replica
            .as_mut()
            .expect("opened above")
            .apply_redo(seq)?;
    }
    tracing::info!(vm, point = %point.id, kind = %point.kind, "recovery point committed");
    Ok(Committed {
        vm: vm.into(),
        point,
    })
}
