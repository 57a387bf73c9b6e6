//! Azure stores (`azure://ACCOUNT/CONTAINER`): replicas are page blobs (`replicas/VM/DISK.vhd`, fixed
//! VHD: data rounded up to 1 MiB + footer), points are blob snapshots, manifests are block blobs
//! (`manifests/VM.json`, written last: the commit point), and in split mode segments are block blobs
//! (`journal/VM/DISK/SEQ.seg`).
//!
//! The process side keeps a local staging store (journal, digest maps, dedupe index) under the state
//! directory: the scan compares against its digest maps, and in direct mode the applier reads chunk
//! data from its journal to write page blobs.

use std::collections::HashMap;
use std::path::PathBuf;

use ferry_apply::{ApplyError, ReplicaTarget, RunOp, RunSpan, TargetError};
use ferry_azure::AzureBlobs;
use ferry_format::manifest::{DiskState, Manifest, Point};
use ferry_format::vhd;
use ferry_store::LocalStore;

use crate::JobError;

/// Where a store lives.
#[derive(Clone, Debug)]
pub enum StoreLocation {
    Local(PathBuf),
    Azure {
        url: String,
        account: String,
        container: String,
    },
}

impl StoreLocation {
    /// `azure://ACCOUNT/CONTAINER` or a path.
    pub fn parse(s: &str) -> Result<Self, JobError> {
        if let Some(rest) = s.strip_prefix("azure://") {
            let mut it = rest.trim_end_matches('/').splitn(2, '/');
            let account = it.next().unwrap_or_default().to_owned();
            let container = it.next().unwrap_or_default().to_owned();
            if account.is_empty() || container.is_empty() || container.contains('/') {
                return Err(JobError::Usage(format!(
                    "'{s}' is not a store URL; write azure://ACCOUNT/CONTAINER"
                )));
            }
            return Ok(StoreLocation::Azure {
                url: format!("azure://{account}/{container}"),
                account,
                container,
            });
        }
        Ok(StoreLocation::Local(PathBuf::from(s)))
    }

    /// The local directory that holds the store (local) or its staging store (Azure).
    pub fn local_dir(&self) -> PathBuf {
        match self {
            StoreLocation::Local(p) => p.clone(),
            StoreLocation::Azure {
                account, container, ..
            } => crate::default_state_root()
                .join("stage")
                .join(account)
                .join(container),
        }
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Local(p) => write!(f, "{}", p.display()),
            StoreLocation::Azure { url, .. } => f.write_str(url),
        }
    }
}

/// Connects to an Azure store (credentials from the environment), creating the container if needed.
pub fn connect(url: &str) -> Result<AzureBlobs, JobError> {
    connect_limited(url, None)
}

/// [`connect`], with uploads held to `bytes_per_sec` (token bucket; one second of burst).
pub fn connect_limited(url: &str, bytes_per_sec: Option<u64>) -> Result<AzureBlobs, JobError> {
    let mut cfg = ferry_azure::AzureConfig::from_url(url).map_err(az)?;
    cfg.tuning.rate_limit = bytes_per_sec.map(|b| ferry_azure::RateLimit {
        bytes_per_sec: b,
        one_time_burst: b,
    });
    let blobs = AzureBlobs::new(cfg).map_err(az)?;
    if let Err(e) = blobs.ensure_container() {
        // A SAS scoped to one container may not create containers; the container then has to
        // exist, and the first real request says so clearly if it does not.
        if !e.is_auth() {
            return Err(az(e));
        }
        tracing::debug!(error = %e, "cannot create the container with these credentials; assuming it exists");
    }
    Ok(blobs)
}

pub(crate) fn az(e: ferry_azure::AzureError) -> JobError {
    JobError::Azure(e.to_string())
}

fn az_apply(e: ferry_azure::AzureError) -> ApplyError {
    ApplyError::Target(TargetError(e.to_string()))
}

pub fn replica_blob(vm: &str, disk: &str) -> String {
    format!("replicas/{vm}/{disk}.vhd")
}

pub fn manifest_blob(vm: &str) -> String {
    format!("manifests/{vm}.json")
}

/// Loads a VM's manifest from the store, if it has one.
pub fn load_manifest(blobs: &AzureBlobs, vm: &str) -> Result<Option<Manifest>, ApplyError> {
    match blobs.get_blob(&manifest_blob(vm)).map_err(az_apply)? {
        None => Ok(None),
        Some(b) => Manifest::from_json(&b)
            .map(Some)
            .map_err(|e| TargetError(format!("{}: {e}", manifest_blob(vm))).into()),
    }
}

/// VMs with a manifest in the store.
pub fn list_vms(blobs: &AzureBlobs) -> Result<Vec<String>, JobError> {
    let mut v: Vec<String> = blobs
        .list("manifests/")
        .map_err(az)?
        .into_iter()
        .filter_map(|(n, _)| {
            n.strip_prefix("manifests/")
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_owned)
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Makes sure the replica page blob of a disk exists with the right size and a fixed-VHD footer.
/// With `fresh` (the writer's first run of this disk holds every non-zero chunk), an existing blob's
/// data pages are cleared first so nothing stale survives under the new run.
pub fn ensure_replica(
    blobs: &AzureBlobs,
    vm: &str,
    disk: &str,
    size: u64,
    fresh: bool,
) -> Result<(), ApplyError> {
    let name = replica_blob(vm, disk);
    let vsize = vhd::vhd_size(size);
    match blobs.blob_size(&name).map_err(az_apply)? {
        Some(s) if s == vsize + vhd::FOOTER_LEN as u64 => {
            if fresh {
                tracing::info!(blob = %name, "first run of this disk from this process: clearing the existing replica's data pages");
                blobs.clear_pages(&name, 0, vsize).map_err(az_apply)?;
            }
            Ok(())
        }
        Some(s) => Err(TargetError(format!(
            "{name} is {s} bytes but disk {disk} needs {}; Ferry does not follow a resize",
            vsize + vhd::FOOTER_LEN as u64
        ))
        .into()),
        None if !fresh => Err(TargetError(format!(
            "{name} is missing, but this run only carries the changes since the disk's last point: \
             the store lost the replica (a container emptied or re-created while Ferry ran?). \
             Nothing was published; stop Ferry and start it again, and it will say how to resync"
        ))
        .into()),
        None => {
            blobs
                .create_page_blob(&name, vsize + vhd::FOOTER_LEN as u64)
                .map_err(az_apply)?;
            let mut uid = [0u8; 16];
            ferry_crypto::random_bytes(&mut uid).map_err(|e| TargetError(e.to_string()))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            blobs
                .put_pages(&name, vsize, vhd::encode(vsize, uid, now).to_vec())
                .map_err(az_apply)?;
            Ok(())
        }
    }
}

/// Bytes of page writes batched before one parallel upload.
const BATCH: usize = 64 << 20;

/// Writes one disk's run to its page blob: Put Page for data (512-aligned, adjacent writes coalesced
/// and uploaded in parallel), Clear Pages for zero ranges. Order is kept wherever it matters: a batch
/// is flushed before a clear, before a second write to the same offset, and at the end.
pub fn write_run(
    blobs: &AzureBlobs,
    name: &str,
    ops: impl Iterator<Item = Result<RunOp, ApplyError>>,
) -> Result<(), ApplyError> {
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut offsets = std::collections::HashSet::new();
    let mut bytes = 0usize;
    let mut clear: Option<(u64, u64)> = None;
    let flush_writes =
        |w: &mut Vec<(u64, Vec<u8>)>, o: &mut std::collections::HashSet<u64>, b: &mut usize| {
            if w.is_empty() {
                return Ok(());
            }
            o.clear();
            *b = 0;
            blobs
                .put_pages_many(name, std::mem::take(w))
                .map_err(az_apply)
        };
    for op in ops {
        match op? {
            RunOp::Write { offset, mut data } => {
                if let Some((s, e)) = clear.take() {
                    blobs.clear_pages(name, s, e - s).map_err(az_apply)?;
                }
                if offsets.contains(&offset) {
                    flush_writes(&mut writes, &mut offsets, &mut bytes)?;
                }
                data.resize(data.len().div_ceil(512) * 512, 0);
                bytes += data.len();
                offsets.insert(offset);
                writes.push((offset, data));
                if bytes >= BATCH {
                    flush_writes(&mut writes, &mut offsets, &mut bytes)?;
                }
            }
            RunOp::Zero { offset, len } => {
                flush_writes(&mut writes, &mut offsets, &mut bytes)?;
                let end = offset + len.div_ceil(512) * 512;
                clear = match clear {
                    Some((s, e)) if e == offset => Some((s, end)),
                    Some((s, e)) => {
                        blobs.clear_pages(name, s, e - s).map_err(az_apply)?;
                        Some((offset, end))
                    }
                    None => Some((offset, end)),
                };
            }
        }
    }
    flush_writes(&mut writes, &mut offsets, &mut bytes)?;
    if let Some((s, e)) = clear {
        blobs.clear_pages(name, s, e - s).map_err(az_apply)?;
    }
    Ok(())
}

/// Direct mode: committed runs are written from the local journal to the Azure page blobs, then
/// snapshotted, then the Azure manifest is replaced.
pub struct AzureTarget {
    blobs: AzureBlobs,
    key_id: String,
    manifests: HashMap<String, Manifest>,
}

impl AzureTarget {
    pub fn new(blobs: AzureBlobs, key_id: String) -> Self {
        AzureTarget {
            blobs,
            key_id,
            manifests: HashMap::new(),
        }
    }
}

/// Cuts a point on the store: snapshots every disk's page blob and publishes the manifest. Shared by
/// direct mode and `ferry apply`.
pub fn publish_point(
    blobs: &AzureBlobs,
    m: &mut Manifest,
    mut point: Point,
    spans: &[RunSpan],
) -> Result<Point, ApplyError> {
    for d in point.disks.iter_mut() {
        d.snapshot = Some(
            blobs
                .snapshot(&replica_blob(&m.vm, &d.name))
                .map_err(az_apply)?,
        );
    }
    // The store's manifest numbers its own points: another staging store (a rebuilt appliance,
    // another host) may have published points this one never saw.
    let seq = m.next_seq.max(m.points.last().map_or(0, |p| p.seq + 1));
    if point.seq != seq {
        point.id = ferry_format::manifest::point_id(
            seq,
            humantime::parse_rfc3339(&point.time).unwrap_or(std::time::UNIX_EPOCH),
        );
        point.seq = seq;
    }
    m.next_seq = seq + 1;
    m.points.push(point.clone());
    for s in spans {
        m.disks.insert(
            s.disk.clone(),
            DiskState {
                size: s.size,
                applied: s.to,
            },
        );
    }
    blobs
        .put_block_blob(&manifest_blob(&m.vm), m.to_json())
        .map_err(az_apply)?;
    Ok(point)
}

impl ReplicaTarget for AzureTarget {
    fn commit_run(
        &mut self,
        store: &LocalStore,
        vm: &str,
        spans: &[RunSpan],
        point: Point,
    ) -> Result<Point, ApplyError> {
        if !self.manifests.contains_key(vm) {
            let m =
                load_manifest(&self.blobs, vm)?.unwrap_or_else(|| Manifest::new(vm, &self.key_id));
            self.manifests.insert(vm.to_owned(), m);
        }
        let m = self.manifests.get_mut(vm).expect("loaded");
        if let Some(p) = m.points.iter().find(|p| p.run == point.run) {
            return Ok(p.clone());
        }
        for span in spans {
            ensure_replica(&self.blobs, vm, &span.disk, span.size, span.fresh)?;
            write_run(
                &self.blobs,
                &replica_blob(vm, &span.disk),
                ferry_apply::run_ops(store, vm, span),
            )?;
        }
        publish_point(&self.blobs, m, point, spans)
    }
}

/// Retention for an Azure store: the local staging store is pruned as a local store is; expired
/// points leave the Azure manifests (the commit), then their snapshots are deleted. In split mode a
/// journal segment is deleted from the store only once `ferry apply` has applied past it.
pub fn prune(
    store: &LocalStore,
    blobs: &AzureBlobs,
    retention: std::time::Duration,
    split: bool,
) -> Result<ferry_apply::retention::Pruned, JobError> {
    let rules = move |_: &str| ferry_apply::retention::Rules::window(retention);
    prune_by(store, blobs, &rules, split)
}

/// [`prune`] with each VM's own [`ferry_apply::retention::Rules`] (the server's policy).
pub fn prune_by(
    store: &LocalStore,
    blobs: &AzureBlobs,
    rules: &dyn Fn(&str) -> ferry_apply::retention::Rules,
    split: bool,
) -> Result<ferry_apply::retention::Pruned, JobError> {
    if !split {
        prune_manifests_by(blobs, rules)?;
    }
    // In split mode `ferry apply` owns the store's manifests (and prunes them with its own
    // --retention). Here a segment may go only once apply is past every segment this side has
    // committed: until then an unapplied run may still reference it through dedupe.
    let lagging = split && apply_lags(store, blobs)?;
    if lagging {
        tracing::info!(
            "ferry apply is behind this process; keeping journal segments until it catches up"
        );
    }
    let mut remote: HashMap<String, Option<Manifest>> = HashMap::new();
    let mut veto = |vm: &str, disk: &str, seq: u64| -> Result<bool, ApplyError> {
        if !split {
            return Ok(true);
        }
        if lagging {
            return Ok(false);
        }
        if !remote.contains_key(vm) {
            remote.insert(vm.to_owned(), load_manifest(blobs, vm)?);
        }
        let applied = remote[vm]
            .as_ref()
            .and_then(|m| m.disks.get(disk))
            .map_or(0, |d| d.applied.segment);
        if seq >= applied {
            return Ok(false);
        }
        blobs
            .delete_blob(&ferry_store::LocalStore::segment_path(vm, disk, seq))
            .map_err(az_apply)?;
        Ok(true)
    };
    Ok(ferry_apply::retention::prune_with(store, rules, &mut veto)?)
}

/// Restores one disk of a point from its page-blob snapshot to a local raw image or fixed VHD.
/// Only the snapshot's written page ranges are downloaded (in parallel); the rest stays sparse.
/// Restores one disk of a point from its page-blob snapshot to a local raw image or fixed VHD.
/// Only the snapshot's written page ranges are downloaded (in parallel); the rest stays sparse.
pub fn restore_to_file(
    blobs: &AzureBlobs,
    r: &crate::stores::FileJob<'_>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, JobError> {
    use std::os::unix::fs::FileExt;
    let crate::stores::FileJob {
        vm,
        point,
        disk,
        out,
        format,
        threads,
    } = *r;
    let pd = point
        .disks
        .iter()
        .find(|d| d.name == disk)
        .ok_or_else(|| JobError::Usage(format!("point {} has no disk {disk}", point.id)))?;
    let snap = pd.snapshot.clone().ok_or_else(|| {
        JobError::Azure(format!(
            "point {} of {vm}/{disk} has no snapshot recorded; the manifest is damaged",
            point.id
        ))
    })?;
    let name = replica_blob(vm, disk);
    let size = pd.size;
    let oerr = |e: std::io::Error| JobError::Usage(format!("cannot write {}: {e}", out.display()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(oerr)?;
    f.set_len(size).map_err(oerr)?;
    let mut pieces = Vec::new();
    for (s, e) in blobs.list_page_ranges(&name, Some(&snap)).map_err(az)? {
        let (s, e) = (s.min(size), e.min(size));
        let mut o = s;
        while o < e {
            let n = (e - o).min(4 << 20);
            pieces.push((o, n));
            o += n;
        }
    }
    let total: u64 = pieces.iter().map(|p| p.1).sum();
    let done = std::sync::atomic::AtomicU64::new(0);
    let next = std::sync::Mutex::new(pieces.into_iter());
    let first_err = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let Some((o, n)) = next.lock().expect("poisoned").next() else {
                    return;
                };
                let r = blobs
                    .get_range(&name, Some(&snap), o, n)
                    .map_err(az)
                    .and_then(|b| {
                        if b.len() as u64 != n {
                            return Err(JobError::Azure(format!(
                                "{name}@{snap}: short read at {o} ({} of {n} bytes)",
                                b.len()
                            )));
                        }
                        f.write_all_at(&b, o).map_err(oerr)
                    });
                match r {
                    Ok(()) => {
                        let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                        progress(d * size / total.max(1));
                    }
                    Err(e) => {
                        first_err.lock().expect("poisoned").get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().expect("poisoned") {
        return Err(e);
    }
    if format == ferry_apply::OutputFormat::Vhd {
        let vsize = vhd::vhd_size(size);
        f.set_len(vsize).map_err(oerr)?;
        let footer = blobs
            .get_range(&name, Some(&snap), vsize, vhd::FOOTER_LEN as u64)
            .map_err(az)?;
        f.write_all_at(&footer, vsize).map_err(oerr)?;
    }
    f.sync_all().map_err(oerr)?;
    Ok(size)
}

/// Restores a point into a new page blob of the same store by server-side copy of its snapshot.
pub fn restore_to_blob(
    blobs: &AzureBlobs,
    vm: &str,
    point: &Point,
    disk: &str,
    dst: &str,
    verify: bool,
) -> Result<u64, JobError> {
    let pd = point
        .disks
        .iter()
        .find(|d| d.name == disk)
        .ok_or_else(|| JobError::Usage(format!("point {} has no disk {disk}", point.id)))?;
    let snap = pd
        .snapshot
        .clone()
        .ok_or_else(|| JobError::Azure(format!("point {} has no snapshot recorded", point.id)))?;
    blobs
        .copy_from_snapshot(&replica_blob(vm, disk), &snap, dst)
        .map_err(az)?;
    if verify {
        let mut h = blake3::Hasher::new();
        let mut o = 0;
        while o < pd.size {
            let n = (pd.size - o).min(4 << 20);
            h.update(&blobs.get_range(dst, None, o, n).map_err(az)?);
            o += n;
        }
        let found = h.finalize().to_hex().to_string();
        if found != pd.blake3 {
            return Err(JobError::Azure(format!(
                "verification failed: {dst} has blake3 {found}, point {} recorded {}",
                point.id, pd.blake3
            )));
        }
    }
    Ok(pd.size)
}

/// True if, for any disk, `ferry apply` has not reached the journal position this side committed.
fn apply_lags(store: &LocalStore, blobs: &AzureBlobs) -> Result<bool, JobError> {
    for vm in ferry_store::list_vms_at(store.root())? {
        let Some(local) = store.load_manifest(&vm)? else {
            continue;
        };
        let remote = load_manifest(blobs, &vm)?;
        for (disk, st) in &local.disks {
            let r = remote
                .as_ref()
                .and_then(|m| m.disks.get(disk))
                .map(|d| d.applied)
                .unwrap_or_default();
            if r < st.applied {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Drops expired points from every manifest of the store (the commit), then deletes their snapshots.
/// Returns how many points were pruned.
pub fn prune_manifests(
    blobs: &AzureBlobs,
    retention: std::time::Duration,
) -> Result<usize, JobError> {
    prune_manifests_by(blobs, &|_| ferry_apply::retention::Rules::window(retention))
}

/// [`prune_manifests`] with each VM's own rules.
pub fn prune_manifests_by(
    blobs: &AzureBlobs,
    rules: &dyn Fn(&str) -> ferry_apply::retention::Rules,
) -> Result<usize, JobError> {
    let now = std::time::SystemTime::now();
    let mut n = 0;
    let pins = crate::azure_pins::live_pins(blobs)?;
    for vm in list_vms(blobs)? {
        let Some(mut m) = load_manifest(blobs, &vm)? else {
            continue;
        };
        let gone: Vec<u64> =
            ferry_apply::retention::plan(&m, &rules(&vm), now, pins.get(&vm).copied())
                .into_iter()
                .map(|(seq, _)| seq)
                .collect();
        if gone.is_empty() {
            continue;
        }
        let (dead, keep): (Vec<Point>, Vec<Point>) =
            m.points.drain(..).partition(|p| gone.contains(&p.seq));
        m.points = keep;
        blobs
            .put_block_blob(&manifest_blob(&vm), m.to_json())
            .map_err(az)?;
        // A reader that pinned one of these points and saw it listed just before the commit
        // still reads its snapshot: leave those snapshots behind.
        let pinned_now = crate::azure_pins::live_pins(blobs)?.get(&vm).copied();
        for p in dead {
            n += 1;
            if pinned_now.is_some_and(|pin| p.seq >= pin) {
                tracing::warn!(vm = %vm, point = %p.id, "a reader pinned this point as it was pruned: its snapshots are left behind");
                continue;
            }
            for d in p.disks {
                if let Some(s) = d.snapshot {
                    if let Err(e) = blobs.delete_snapshot(&replica_blob(&vm, &d.name), &s) {
                        tracing::warn!(vm = %vm, point = %p.id, error = %e, "cannot delete an expired snapshot; it is left behind");
                    }
                }
            }
        }
    }
    Ok(n)
}

/// What [`remove_vm`] deleted from the container.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AzureRemoved {
    /// Points the VM's manifest listed.
    pub points: usize,
    /// Replica page blobs (each with its snapshots: the points' data).
    pub replicas: usize,
    pub replica_bytes: u64,
    /// Other blobs: journal segments (split mode) and pins.
    pub other: usize,
}

/// Deletes a VM's replication data from an Azure store, for `ferry complete-migration`: its
/// manifest first (the commit: its points are no longer listed, nothing restores them), then its
/// replica page blobs with their snapshots, its journal segments and its pins. Idempotent: a
/// retry after a failure deletes what is left. Failed-over disks (`failover/…`) and records
/// (`failovers/…`) are not the VM's replication data and stay.
pub fn remove_vm(blobs: &AzureBlobs, vm: &str) -> Result<AzureRemoved, JobError> {
    crate::validate_name("VM", vm)?;
    let mut r = AzureRemoved {
        points: load_manifest(blobs, vm)
            .map_err(|e| JobError::Azure(e.to_string()))?
            .map_or(0, |m| m.points.len()),
        ..Default::default()
    };
    // A reader (a restore, a test failover, on any machine) still copying a point: not under it.
    if let Some(seq) = crate::azure_pins::live_pins(blobs)?.get(vm) {
        return Err(JobError::Usage(format!(
            "a restore or test failover is reading {vm}'s point {seq} (its pin is under pins/{vm}/): the VM's data is deleted once it ends (a pin expires {} min after its reader stops)",
            crate::azure_pins::LIFETIME.as_secs() / 60
        )));
    }
    // Marked first: a split-mode `ferry apply` skips the VM from then on (it would otherwise
    // make the manifest and replicas again from segments not yet deleted).
    blobs
        .put_block_blob(
            &retired_blob(vm),
            format!("{{\"vm\": {vm:?}, \"retired\": true}}\n").into_bytes(),
        )
        .map_err(az)?;
    for (name, _) in blobs.list(&format!("journal/{vm}/")).map_err(az)? {
        blobs.delete_blob(&name).map_err(az)?;
        r.other += 1;
    }
    blobs.delete_blob(&manifest_blob(vm)).map_err(az)?;
    for (name, size) in blobs.list(&format!("replicas/{vm}/")).map_err(az)? {
        blobs.delete_blob(&name).map_err(az)?;
        r.replicas += 1;
        r.replica_bytes += size;
    }
    for (name, _) in blobs.list(&format!("pins/{vm}/")).map_err(az)? {
        blobs.delete_blob(&name).map_err(az)?;
        r.other += 1;
    }
    Ok(r)
}

/// `lifecycle/VM.retired`: the VM's migration was completed; its data is (being) deleted.
pub fn retired_blob(vm: &str) -> String {
    format!("lifecycle/{vm}.retired")
}

/// Whether [`remove_vm`] marked the VM retired in the container.
pub fn is_retired(blobs: &AzureBlobs, vm: &str) -> Result<bool, JobError> {
    Ok(blobs.blob_size(&retired_blob(vm)).map_err(az)?.is_some())
}
