//! What the process server holds of each VM's disks, and which replica each disk is.
//!
//! Job: answer an agent's `Inventory` with a `Holding` — per disk, the replica it goes to (found
//! by the disk's stable identity, so a disk the kernel now names differently keeps its replica)
//! and the last run of it held durably (committed in the store, or tagged in the cache) — and
//! refuse a `Begin` whose bases are not exactly those runs. The agent trusts its chunk maps only
//! as far as the `Holding` confirms them, so a rebuilt appliance, another store, an emptied store
//! or a renamed VM costs a resync, never a point that restores wrong bytes.
//!
//! State: seeded at start from the store's manifests, then the cache's undrained run marks (in
//! order: they are newer); afterwards updated as records are *received* (a received record is
//! made durable by the committer before anything after it is acknowledged, or the server stops
//! and starts again from the durable state). Disk identities are kept per VM in
//! `STORE/disk-ids/VM.json`, written durably before the `Holding` that uses them is sent.
//!
//! Must not: let a run build on a state of a disk the server does not hold.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_cache::Mark;
use ferry_format::manifest::JournalPos;
use ferry_format::segment::Record;
use ferry_store::LocalStore;
use ferry_wire::{HeldDisk, InvDisk, Message, RunId, NO_RUN};

/// The chunk the pipeline and replicas work in.
const CHUNK: u64 = ferry_format::CHUNK_SIZE as u64;
use serde::{Deserialize, Serialize};

/// `STORE/disk-ids/VM.json`.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct DiskIds {
    pub format: String,
    pub version: u32,
    /// Replica name → the stable identity of the disk it replicates.
    pub disks: BTreeMap<String, String>,
}

pub(crate) const DISK_IDS_FORMAT: &str = "ferry-disk-ids";

impl DiskIds {
    pub fn parse(bytes: &[u8]) -> Result<DiskIds, String> {
        let d: DiskIds = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if d.format != DISK_IDS_FORMAT || d.version != 1 {
            return Err(format!(
                "format {:?} version {} (expected {DISK_IDS_FORMAT:?} version 1)",
                d.format, d.version
            ));
        }
        Ok(d)
    }
}

/// `journal/VM/DISK` directories: (VM, its disks).
fn journal_dirs(dir: &Path) -> Vec<(String, Vec<String>)> {
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    names(dir)
        .into_iter()
        .map(|vm| {
            let disks = names(&dir.join(&vm));
            (vm, disks)
        })
        .collect()
}

fn ids_path(root: &Path, vm: &str) -> PathBuf {
    root.join("disk-ids").join(format!("{vm}.json"))
}

/// A run whose `Begin` is held without its `Tag`: its id and disks (name, size).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Open {
    run: RunId,
    disks: Vec<(String, u64)>,
}

#[derive(Default)]
struct VmHeld {
    /// Replica → the last run of it held (tagged).
    last: HashMap<String, RunId>,
    /// The run whose `Begin` is held without its `Tag`.
    open: Option<Open>,
    /// Replica → its size, as the last `Begin` naming it said.
    sizes: HashMap<String, u64>,
}

impl VmHeld {
    fn tagged<'a>(&mut self, run: RunId, disks: impl Iterator<Item = &'a String>) {
        for d in disks {
            self.last.insert(d.clone(), run);
        }
        if self.open.as_ref().is_some_and(|o| o.run == run) {
            self.open = None;
        }
    }

    fn begun(&mut self, run: RunId, disks: &[(String, u64)]) {
        for (d, size) in disks {
            self.sizes.insert(d.clone(), *size);
        }
        self.open = Some(Open {
            run,
            disks: disks.to_vec(),
        });
    }
}

/// The refusal for a disk whose size changed.
pub(crate) fn resize_message(vm: &str, disk: &str, was: u64, now: u64) -> String {
    format!(
        "disk '{disk}' of VM '{vm}' was {was} bytes and is now {now}; resizes are not followed yet — protect the machine under a new --vm name (a full send) or the disk as a new disk"
    )
}

/// Longest replica name (`ferry_job::validate_name`).
const MAX_REPLICA_NAME: usize = 64;

pub(crate) struct Held {
    root: PathBuf,
    store_id: String,
    vms: Mutex<HashMap<String, VmHeld>>,
    /// Serializes the read-modify-write of the disk-ids files (a replaced connection may still
    /// be finishing its inventory).
    ids_lock: Mutex<()>,
}

/// What the store holds of `vm`: its manifest's points, then its journal past each disk's applied
/// position.
fn seed_vm(store: &LocalStore, vm: &str) -> Result<VmHeld, String> {
    let root = store.root();
    let mut e = VmHeld::default();
    let manifest = ferry_store::load_manifest_at(root, vm).map_err(|e| e.to_string())?;
    if let Some(m) = &manifest {
        for p in &m.points {
            let mut run = NO_RUN;
            if hex::decode_to_slice(&p.run, &mut run).is_err() {
                continue;
            }
            for d in &p.disks {
                e.last.insert(d.name.clone(), run);
            }
        }
        for (d, ds) in &m.disks {
            if let Some(size) = ds.known_size() {
                e.sizes.insert(d.clone(), size);
            }
        }
    }
    let Some((_, disks)) = journal_dirs(&root.join("journal"))
        .into_iter()
        .find(|(v, _)| v == vm)
    else {
        return Ok(e);
    };
    // Each disk's journal is its own sequence; the open run is the newest Begin that is the last
    // boundary of some disk (by its time), over the disks that hold it.
    let mut begins: Vec<(u64, RunId, String, u64)> = Vec::new();
    let mut unreadable = false;
    for disk in disks {
        let from = manifest
            .as_ref()
            .and_then(|m| m.disks.get(&disk))
            .map(|d| d.applied)
            .unwrap_or_default();
        let Some((last, size)) = last_boundary(store, vm, &disk, from) else {
            unreadable = true;
            continue;
        };
        if let Some(size) = size {
            e.sizes.insert(disk.clone(), size);
        }
        match last {
            Some(Boundary::Tag(run)) => {
                e.last.insert(disk.clone(), run);
            }
            Some(Boundary::Begin { run, time_ns, size }) => {
                begins.push((time_ns, run, disk, size));
            }
            None => {}
        }
    }
    // With a journal unread, the open run's disks are not known: none is open (an agent
    // continuing one starts it again).
    if !unreadable {
        if let Some((_, run, _, _)) = begins.iter().max_by_key(|b| b.0) {
            let run = *run;
            let disks: Vec<(String, u64)> = begins
                .iter()
                .filter(|b| b.1 == run)
                .map(|b| (b.2.clone(), b.3))
                .collect();
            e.open = Some(Open { run, disks });
        }
    }
    Ok(e)
}

/// The last run boundary a disk's journal holds past its applied position.
enum Boundary {
    Begin { run: RunId, time_ns: u64, size: u64 },
    Tag(RunId),
}

impl Held {
    /// Seeds from the store's manifests (committed points), then its journal past each disk's
    /// applied position (drained from the cache, not yet committed), then the cache's marks
    /// (not yet drained): oldest to newest.
    pub fn load(store: &LocalStore, marks: &[Mark]) -> Result<Held, String> {
        let root = store.root();
        let mut names = ferry_store::list_vms_at(root).map_err(|e| e.to_string())?;
        for (vm, _) in journal_dirs(&root.join("journal")) {
            if !names.contains(&vm) {
                names.push(vm);
            }
        }
        let mut vms: HashMap<String, VmHeld> = HashMap::new();
        for vm in names {
            // A VM whose manifest or journal cannot be read holds nothing here: its agent sends
            // everything again, and the applier quarantines the VM if its data is at fault.
            let e = seed_vm(store, &vm).unwrap_or_else(|e| {
                tracing::error!(vm, error = %e, "cannot read what the store holds of the VM; its agent sends everything again");
                VmHeld::default()
            });
            vms.insert(vm, e);
        }
        for m in marks {
            match m {
                Mark::Begin { vm, run, disks } => {
                    vms.entry(vm.clone()).or_default().begun(*run, disks)
                }
                Mark::Tag { vm, run, disks } => vms
                    .entry(vm.clone())
                    .or_default()
                    .tagged(*run, disks.iter()),
            }
        }
        Ok(Held {
            root: root.to_owned(),
            store_id: store.store_id().to_owned(),
            vms: Mutex::new(vms),
            ids_lock: Mutex::new(()),
        })
    }

    /// Forgets what was received of `vm` and holds again only what the store holds (after a
    /// quarantine release voided its journal, with no record of it left in the cache).
    pub fn reseed(&self, store: &LocalStore, vm: &str) -> Result<(), String> {
        let e = seed_vm(store, vm)?;
        self.lock().insert(vm.to_owned(), e);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmHeld>> {
        self.vms.lock().expect("held lock")
    }

    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    /// The answer to an inventory: the VM's open run and, per disk, its replica and last run.
    /// New identities are bound to replicas (durably) first. `Err`: the refusal's code and text.
    /// The caller owns the VM (one connection at a time), so the identities file of `vm` is
    /// written by one task at a time; the shared lock is not held while it is.
    pub fn inventory(
        &self,
        vm: &str,
        disks: &[InvDisk],
    ) -> Result<(RunId, Vec<HeldDisk>), (u16, String)> {
        let protocol = |s: String| (ferry_wire::refuse::PROTOCOL, s);
        let internal = |s: String| (ferry_wire::refuse::INTERNAL, s);
        for (i, d) in disks.iter().enumerate() {
            if let Some(other) = disks[..i].iter().find(|x| x.id == d.id) {
                return Err(protocol(format!(
                    "disk '{}' and disk '{}' have the same identity {}; give each disk once",
                    other.name, d.name, d.id
                )));
            }
        }
        let _ids = self.ids_lock.lock().expect("ids lock");
        let path = ids_path(&self.root, vm);
        let mut ids = match std::fs::read(&path) {
            Ok(b) => DiskIds::parse(&b).map_err(|e| {
                tracing::error!(file = %path.display(), error = %e, "cannot read the VM's disk identities");
                internal(format!("the process server cannot read {}: {e}; see its log", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DiskIds {
                format: DISK_IDS_FORMAT.into(),
                version: 1,
                disks: BTreeMap::new(),
            },
            Err(e) => {
                return Err(internal(format!(
                    "the process server cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let manifest = ferry_store::load_manifest_at(&self.root, vm).map_err(|e| {
            internal(format!(
                "the process server cannot read the VM's manifest: {e}"
            ))
        })?;
        let tagged: Vec<String> = self
            .lock()
            .get(vm)
            .map(|e| e.last.keys().cloned().collect())
            .unwrap_or_default();
        // Names that hold something: a replica with an identity, in a manifest, or tagged.
        let known = |n: &str, ids: &DiskIds| {
            ids.disks.contains_key(n)
                || tagged.iter().any(|t| t == n)
                || manifest.as_ref().is_some_and(|m| m.disks.contains_key(n))
        };
        let mut changed = false;
        let mut replicas = Vec::with_capacity(disks.len());
        for d in disks {
            let found = ids
                .disks
                .iter()
                .find(|(_, id)| **id == d.id)
                .map(|(n, _)| n.clone());
            let replica = match found {
                Some(n) => n,
                None => {
                    let legacy = known(&d.name, &ids) && !ids.disks.contains_key(&d.name);
                    let name = if legacy || !known(&d.name, &ids) {
                        d.name.clone()
                    } else {
                        // The name belongs to another disk: this one is new, under a new name
                        // (the base shortened so that name and suffix stay a valid name).
                        (2..)
                            .map(|i| {
                                let suffix = format!("-{i}");
                                let mut base = d.name.clone();
                                while base.len() + suffix.len() > MAX_REPLICA_NAME {
                                    base.pop();
                                }
                                format!("{base}{suffix}")
                            })
                            .find(|n| !known(n, &ids) && !replicas.contains(n))
                            .expect("some suffix is free")
                    };
                    if legacy {
                        tracing::info!(vm, replica = %name, id = %d.id, "an existing replica without a recorded disk identity is bound to the disk now called so");
                    } else {
                        tracing::info!(vm, disk = %d.name, replica = %name, id = %d.id, "a new disk: its replica is created");
                    }
                    ids.disks.insert(name.clone(), d.id.clone());
                    changed = true;
                    name
                }
            };
            if replica != d.name {
                tracing::info!(vm, disk = %d.name, replica = %replica, id = %d.id, "the disk now named so keeps its replica (same identity)");
            }
            replicas.push(replica);
        }
        if changed {
            let bytes = serde_json::to_vec_pretty(&ids).expect("serializable");
            let dir = path.parent().expect("has a parent");
            ferry_durable::create_dir_durable(dir)
                .and_then(|()| ferry_durable::durable_write(&path, &bytes))
                .map_err(|err| {
                    tracing::error!(file = %path.display(), error = %err, "cannot save the VM's disk identities");
                    internal(format!("the process server cannot save {}; see its log", path.display()))
                })?;
        }
        let vms = self.lock();
        let e = vms.get(vm);
        let out = replicas
            .into_iter()
            .map(|replica| HeldDisk {
                last_run: e
                    .and_then(|e| e.last.get(&replica).copied())
                    .unwrap_or(NO_RUN),
                point_seq: manifest
                    .as_ref()
                    .and_then(|m| {
                        m.points
                            .iter()
                            .rev()
                            .find(|p| p.disks.iter().any(|x| x.name == replica))
                    })
                    .map_or(0, |p| p.seq),
                replica,
            })
            .collect();
        let open = e.and_then(|e| e.open.as_ref()).map_or(NO_RUN, |o| o.run);
        Ok((open, out))
    }

    /// A record received from the connection that owns `vm`, before it goes to the cache: a
    /// `Begin` whose bases are the last runs held (and sizes unchanged) opens a run; other records
    /// must belong to the open run, name its disks and stay inside them; a `Tag` must be the open
    /// run's, with its disks, and closes it. `Err`: the refusal's code and text.
    pub fn record(&self, vm: &str, m: &Message) -> Result<(), (u16, String)> {
        use ferry_wire::refuse::{PROTOCOL, STALE_BASE};
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_default();
        let outside = || {
            (
                STALE_BASE,
                format!("a record of VM '{vm}' outside any run this process server holds the start of; start a new run"),
            )
        };
        match m {
            Message::Begin {
                run, disks, bases, ..
            } => {
                if let Some(d) = duplicate(disks.iter().map(|(n, _)| n)) {
                    return Err((PROTOCOL, format!("the Begin names disk '{d}' twice")));
                }
                for ((d, size), base) in disks.iter().zip(bases) {
                    if *size == 0 || *size > ferry_wire::MAX_DISK_SIZE {
                        return Err((PROTOCOL, format!(
                            "disk '{d}' of {size} bytes: Ferry replicates disks of 1 byte to {} bytes (8 TiB less 1 MiB: a fixed VHD in the largest Azure page blob)",
                            ferry_wire::MAX_DISK_SIZE
                        )));
                    }
                    let held = e.last.get(d).copied().unwrap_or(NO_RUN);
                    if *base != held {
                        return Err((STALE_BASE, format!(
                            "run {} of VM '{vm}' builds on run {} of disk '{d}', but this process server holds run {} of it; the agent resyncs against what it holds",
                            hex::encode(run),
                            hex::encode(base),
                            hex::encode(held)
                        )));
                    }
                    if let Some(was) = e.sizes.get(d).filter(|was| **was != *size) {
                        return Err((PROTOCOL, resize_message(vm, d, *was, *size)));
                    }
                }
                e.begun(*run, disks);
                Ok(())
            }
            Message::Write {
                disk, offset, data, ..
            } => in_run(e.open.as_ref(), disk, *offset, data.len() as u64).ok_or_else(outside)?,
            Message::Zero {
                disk, offset, len, ..
            }
            | Message::Discard {
                disk, offset, len, ..
            } => in_run(e.open.as_ref(), disk, *offset, *len).ok_or_else(outside)?,
            Message::Tag { tag, .. } => {
                let Some(o) = &e.open else {
                    return Err(outside());
                };
                if o.run != tag.run {
                    return Err((
                        STALE_BASE,
                        format!(
                            "a Tag of run {} of VM '{vm}' while run {} is open; start a new run",
                            hex::encode(tag.run),
                            hex::encode(o.run)
                        ),
                    ));
                }
                if let Some(d) = duplicate(tag.disks.iter().map(|x| &x.name)) {
                    return Err((PROTOCOL, format!("the tag names disk '{d}' twice")));
                }
                let same = tag.disks.len() == o.disks.len()
                    && tag
                        .disks
                        .iter()
                        .all(|d| o.disks.iter().any(|(n, s)| *n == d.name && *s == d.size));
                if !same {
                    return Err((
                        STALE_BASE,
                        format!(
                            "the tag of run {} names other disks or sizes than its Begin",
                            hex::encode(tag.run)
                        ),
                    ));
                }
                e.tagged(tag.run, tag.disks.iter().map(|d| &d.name));
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A record of `len` bytes at `offset` of `disk` inside the open run: `None` if no run is open;
/// `Some(Err)` if it names a disk the run did not announce or passes the disk's end.
fn in_run(
    open: Option<&Open>,
    disk: &str,
    offset: u64,
    len: u64,
) -> Option<Result<(), (u16, String)>> {
    let o = open?;
    Some(match o.disks.iter().find(|(n, _)| n == disk) {
        None => Err((
            ferry_wire::refuse::STALE_BASE,
            format!(
                "record for disk '{disk}', which the open run did not announce; start a new run"
            ),
        )),
        Some((_, size)) if offset.saturating_add(len) > *size => Err((
            ferry_wire::refuse::PROTOCOL,
            format!("record past the end of disk '{disk}' ({size} bytes)"),
        )),
        // What the pipeline and the replica accept: whole 64 KiB chunks, the disk's last one
        // possibly shorter. Checked here, before the ack: a record acknowledged and then refused
        // downstream would stop the server at every restart.
        Some((_, size))
            if len == 0
                || !offset.is_multiple_of(CHUNK)
                || (!len.is_multiple_of(CHUNK) && offset.saturating_add(len) != *size) =>
        {
            Err((
                ferry_wire::refuse::PROTOCOL,
                format!("record of {len} bytes at offset {offset} of disk '{disk}' is not whole 64 KiB chunks (only the disk's last chunk may be shorter)"),
            ))
        }
        Some(_) => Ok(()),
    })
}

/// A name given twice, if any.
fn duplicate<'a>(names: impl Iterator<Item = &'a String>) -> Option<&'a String> {
    let mut seen = std::collections::HashSet::new();
    names.into_iter().find(|n| !seen.insert(*n))
}

/// The last `Begin` or `Tag` in the journal of `vm`/`disk` at or past `from`, and the size the
/// latest `Begin` there gave; `None` if the journal cannot be read.
fn last_boundary(
    store: &LocalStore,
    vm: &str,
    disk: &str,
    from: JournalPos,
) -> Option<(Option<Boundary>, Option<u64>)> {
    let segs = match store.list_segments(vm, disk) {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(vm, disk, error = %err, "cannot list the journal; an agent continuing a run of this disk starts it again");
            return None;
        }
    };
    let mut last = None;
    let mut begun_size = None;
    for seq in segs.into_iter().filter(|s| *s >= from.segment) {
        let idx = match store.read_segment_index(vm, disk, seq) {
            Ok(i) => i,
            Err(err) => {
                tracing::warn!(vm, disk, segment = seq, error = %err, "cannot read a journal segment's index; an agent continuing a run of this disk starts it again");
                return None;
            }
        };
        for (i, rec) in idx.records.iter().enumerate() {
            let pos = JournalPos {
                segment: seq,
                record: i as u32,
            };
            if pos < from {
                continue;
            }
            match rec {
                Record::Begin { run, time_ns, size } => {
                    begun_size = Some(*size);
                    last = Some(Boundary::Begin {
                        run: *run,
                        time_ns: *time_ns,
                        size: *size,
                    })
                }
                Record::Tag(t) => last = Some(Boundary::Tag(t.run)),
                _ => {}
            }
        }
    }
    Some((last, begun_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_ids_file_golden() {
        let golden = br#"{"format":"ferry-disk-ids","version":1,"disks":{"sda":"wwid:naa.5000c500a1b2c3d4","sdb":"file:2049:12:0"}}"#;
        let d = DiskIds::parse(golden).unwrap();
        assert_eq!(d.disks["sda"], "wwid:naa.5000c500a1b2c3d4");
        assert_eq!(serde_json::to_vec(&d).unwrap(), golden.to_vec());
        assert!(DiskIds::parse(br#"{"format":"x","version":1,"disks":{}}"#).is_err());
        assert!(DiskIds::parse(br#"{"format":"ferry-disk-ids","version":2,"disks":{}}"#).is_err());
    }
}
