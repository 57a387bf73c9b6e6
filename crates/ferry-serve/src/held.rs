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
use ferry_format::segment::PointTag;
use ferry_wire::{HeldDisk, InvDisk, RunId, NO_RUN};
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

fn ids_path(root: &Path, vm: &str) -> PathBuf {
    root.join("disk-ids").join(format!("{vm}.json"))
}

#[derive(Default)]
struct VmHeld {
    /// Replica → the last run of it held (tagged).
    last: HashMap<String, RunId>,
    /// The run whose `Begin` is held without its `Tag`.
    open: Option<RunId>,
}

pub(crate) struct Held {
    root: PathBuf,
    store_id: String,
    vms: Mutex<HashMap<String, VmHeld>>,
}

impl Held {
    /// Seeds from the manifests of the store at `root`, then from the cache's marks.
    pub fn load(root: &Path, store_id: &str, marks: &[Mark]) -> Result<Held, String> {
        let mut vms: HashMap<String, VmHeld> = HashMap::new();
        for vm in ferry_store::list_vms_at(root).map_err(|e| e.to_string())? {
            let Some(m) = ferry_store::load_manifest_at(root, &vm).map_err(|e| e.to_string())?
            else {
                continue;
            };
            let e = vms.entry(vm).or_default();
            for p in &m.points {
                let mut run = NO_RUN;
                if hex::decode_to_slice(&p.run, &mut run).is_err() {
                    continue;
                }
                for d in &p.disks {
                    e.last.insert(d.name.clone(), run);
                }
            }
        }
        let held = Held {
            root: root.to_owned(),
            store_id: store_id.to_owned(),
            vms: Mutex::new(vms),
        };
        for m in marks {
            match m {
                Mark::Begin { vm, run } => {
                    held.lock().entry(vm.clone()).or_default().open = Some(*run)
                }
                Mark::Tag { vm, run, disks } => held.tagged(vm, *run, disks.iter()),
            }
        }
        Ok(held)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmHeld>> {
        self.vms.lock().expect("held lock")
    }

    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    /// The answer to an inventory: the VM's open run and, per disk, its replica and last run.
    /// New identities are bound to replicas (durably) first. `Err` is the refusal's text.
    pub fn inventory(&self, vm: &str, disks: &[InvDisk]) -> Result<(RunId, Vec<HeldDisk>), String> {
        for (i, d) in disks.iter().enumerate() {
            if disks[..i].iter().any(|x| x.id == d.id) {
                return Err(format!(
                    "disk '{}' and disk '{}' have the same identity {}; give each disk once",
                    disks[..i]
                        .iter()
                        .find(|x| x.id == d.id)
                        .expect("found")
                        .name,
                    d.name,
                    d.id
                ));
            }
        }
        let path = ids_path(&self.root, vm);
        let mut ids = match std::fs::read(&path) {
            Ok(b) => DiskIds::parse(&b).map_err(|e| {
                tracing::error!(file = %path.display(), error = %e, "cannot read the VM's disk identities");
                format!("the process server cannot read {}: {e}; see its log", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DiskIds {
                format: DISK_IDS_FORMAT.into(),
                version: 1,
                disks: BTreeMap::new(),
            },
            Err(e) => return Err(format!("the process server cannot read {}: {e}", path.display())),
        };
        let manifest = ferry_store::load_manifest_at(&self.root, vm).map_err(|e| e.to_string())?;
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_default();
        // Names that hold something: a replica with an identity, in a manifest, or tagged.
        let known = |n: &str, ids: &DiskIds| {
            ids.disks.contains_key(n)
                || e.last.contains_key(n)
                || manifest.as_ref().is_some_and(|m| m.disks.contains_key(n))
        };
        let mut changed = false;
        let mut out = Vec::with_capacity(disks.len());
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
                        // The name belongs to another disk: this one is new, under a new name.
                        (2..)
                            .map(|i| format!("{}-{i}", d.name))
                            .find(|n| !known(n, &ids) && n.len() <= ferry_wire::MAX_NAME)
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
            let point_seq = manifest
                .as_ref()
                .and_then(|m| {
                    m.points
                        .iter()
                        .rev()
                        .find(|p| p.disks.iter().any(|x| x.name == replica))
                })
                .map_or(0, |p| p.seq);
            out.push(HeldDisk {
                last_run: e.last.get(&replica).copied().unwrap_or(NO_RUN),
                replica,
                point_seq,
            });
        }
        if changed {
            let bytes = serde_json::to_vec_pretty(&ids).expect("serializable");
            let dir = path.parent().expect("has a parent");
            ferry_durable::create_dir_durable(dir)
                .and_then(|()| ferry_durable::durable_write(&path, &bytes))
                .map_err(|err| {
                    tracing::error!(file = %path.display(), error = %err, "cannot save the VM's disk identities");
                    format!("the process server cannot save {}; see its log", path.display())
                })?;
        }
        Ok((e.open.unwrap_or(NO_RUN), out))
    }

    /// A `Begin` received: its bases must be the last runs held; it opens the run.
    pub fn begin(
        &self,
        vm: &str,
        run: RunId,
        disks: &[(String, u64)],
        bases: &[RunId],
    ) -> Result<(), String> {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_default();
        for ((d, _), base) in disks.iter().zip(bases) {
            let held = e.last.get(d).copied().unwrap_or(NO_RUN);
            if *base != held {
                return Err(format!(
                    "run {} of VM '{vm}' builds on run {} of disk '{d}', but this process server holds run {} of it; the agent resyncs against what it holds",
                    hex::encode(run),
                    hex::encode(base),
                    hex::encode(held)
                ));
            }
        }
        e.open = Some(run);
        Ok(())
    }

    /// A `Tag` received (or found in the cache): its run is the last of each of its disks.
    pub fn tag(&self, vm: &str, tag: &PointTag) {
        self.tagged(vm, tag.run, tag.disks.iter().map(|d| &d.name));
    }

    fn tagged<'a>(&self, vm: &str, run: RunId, disks: impl Iterator<Item = &'a String>) {
        let mut vms = self.lock();
        let e = vms.entry(vm.to_owned()).or_default();
        for d in disks {
            e.last.insert(d.clone(), run);
        }
        if e.open == Some(run) {
            e.open = None;
        }
    }
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
