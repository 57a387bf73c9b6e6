//! Quarantined VMs: a VM whose stored data the applier cannot apply stops replicating alone.
//!
//! Job: when a VM's journal fails in a way that only that VM's data can cause (a malformed or
//! unreadable segment, records the replica refuses), the applier records the VM here instead of
//! failing, skips its segments from then on, and every other VM goes on. The record is
//! `STORE/quarantine/VM.json`, written durably before anything depends on it, so a restart keeps
//! the VM quarantined (and does not trip over the same data again) and `ferry status` names it.
//!
//! Release: `ferry vms release VM` creates `STORE/quarantine/VM.release`. The process server then
//! skips whatever the cache still holds of the VM, voids the VM's uncommitted journal (every
//! disk's applied position moves past its last stored segment; the replicas drop their pending
//! changes) and removes both files. The VM's committed points stay as they were; its next run
//! starts from the newest of them, and the agent, told that the server holds only that point,
//! sends again everything it cannot prove the server has.
//!
//! Must not: quarantine for a failure the VM's data did not cause (a full disk, a lost store, an
//! unreachable Azure account): those stop the server as before, because they hit every VM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// `format` of a quarantine record.
pub const QUARANTINE_FORMAT: &str = "ferry-quarantine";

/// `STORE/quarantine/VM.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quarantined {
    pub format: String,
    pub version: u32,
    pub vm: String,
    /// What failed, as the applier or pipeline said it (names only this VM's disks and segments).
    pub reason: String,
    /// When the VM was quarantined (RFC 3339 UTC).
    pub since: String,
}

/// A quarantine record, or why the bytes are not one (fuzzed: `server_state_json`).
pub fn parse(bytes: &[u8]) -> Result<Quarantined, String> {
    let q: Quarantined = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if q.format != QUARANTINE_FORMAT || q.version != 1 {
        return Err(format!(
            "format {:?} version {} is not this Ferry's",
            q.format, q.version
        ));
    }
    Ok(q)
}

/// The quarantine directory of a store.
pub fn dir(store_root: &Path) -> PathBuf {
    store_root.join("quarantine")
}

fn record_path(store_root: &Path, vm: &str) -> PathBuf {
    dir(store_root).join(format!("{vm}.json"))
}

fn release_path(store_root: &Path, vm: &str) -> PathBuf {
    dir(store_root).join(format!("{vm}.release"))
}

/// Every quarantine record of the store, by VM. A record that cannot be read still quarantines
/// its VM (with the read error as its reason): an unreadable record must not release a VM.
pub fn list(store_root: &Path) -> std::io::Result<BTreeMap<String, Quarantined>> {
    let mut out = BTreeMap::new();
    let rd = match std::fs::read_dir(dir(store_root)) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let Some(vm) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        let q = std::fs::read(e.path())
            .map_err(|e| e.to_string())
            .and_then(|b| parse(&b))
            .unwrap_or_else(|err| Quarantined {
                format: QUARANTINE_FORMAT.into(),
                version: 1,
                vm: vm.into(),
                reason: format!("the quarantine record cannot be read ({err})"),
                since: String::new(),
            });
        out.insert(vm.to_owned(), q);
    }
    Ok(out)
}

/// Asks the process server to release `vm` (see the module docs). Fails if it is not quarantined.
pub fn request_release(store_root: &Path, vm: &str) -> std::io::Result<()> {
    if !record_path(store_root, vm).exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "VM '{vm}' is not quarantined in this store (`ferry vms list` shows which are)"
            ),
        ));
    }
    ferry_durable::durable_write(&release_path(store_root, vm), b"release\n")
}

/// Whether a release of `vm` was asked for.
pub fn release_requested(store_root: &Path, vm: &str) -> bool {
    release_path(store_root, vm).exists()
}

/// The quarantined VMs of one store, as the applier and pipeline of one process see them.
pub struct Quarantines {
    root: PathBuf,
    vms: Mutex<BTreeMap<String, Quarantined>>,
    /// Newly quarantined VMs not yet taken by [`Self::take_new`].
    new: Mutex<Vec<Quarantined>>,
    /// How many VMs are quarantined: `contains` takes no lock while it is 0 (checked per record).
    count: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Quarantines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quarantines")
            .field("root", &self.root)
            .field("vms", &self.vms.lock().expect("poisoned").keys())
            .finish()
    }
}

impl Quarantines {
    /// Reads the store's quarantine records.
    pub fn load(store_root: &Path) -> std::io::Result<Quarantines> {
        let vms = list(store_root)?;
        Ok(Quarantines {
            root: store_root.to_owned(),
            count: std::sync::atomic::AtomicUsize::new(vms.len()),
            vms: Mutex::new(vms),
            new: Mutex::new(Vec::new()),
        })
    }

    /// Whether `vm` is quarantined.
    pub fn contains(&self, vm: &str) -> bool {
        self.count.load(std::sync::atomic::Ordering::Acquire) != 0
            && self.vms.lock().expect("poisoned").contains_key(vm)
    }

    /// The quarantined VMs.
    pub fn all(&self) -> BTreeMap<String, Quarantined> {
        self.vms.lock().expect("poisoned").clone()
    }

    /// Quarantines `vm` for `reason`, durably, before returning. A VM already quarantined keeps its
    /// first reason. A stale release request of the VM is removed first: releasing is the
    /// operator's decision about this quarantine, not an earlier one.
    pub fn add(&self, vm: &str, reason: &str) -> std::io::Result<()> {
        let mut vms = self.vms.lock().expect("poisoned");
        if vms.contains_key(vm) {
            return Ok(());
        }
        let q = Quarantined {
            format: QUARANTINE_FORMAT.into(),
            version: 1,
            vm: vm.into(),
            reason: reason.into(),
            since: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        ferry_durable::create_dir_durable(&dir(&self.root))?;
        match std::fs::remove_file(release_path(&self.root, vm)) {
            Ok(()) => ferry_durable::fsync_dir(&dir(&self.root))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let bytes = serde_json::to_vec_pretty(&q).map_err(std::io::Error::other)?;
        ferry_durable::durable_write(&record_path(&self.root, vm), &bytes)?;
        tracing::error!(vm, reason, "VM quarantined: its replication stops, every other VM goes on; fix the cause, then `ferry vms release {vm}`");
        vms.insert(vm.to_owned(), q.clone());
        self.count
            .store(vms.len(), std::sync::atomic::Ordering::Release);
        self.new.lock().expect("poisoned").push(q);
        Ok(())
    }

    /// VMs quarantined since the last call.
    pub fn take_new(&self) -> Vec<Quarantined> {
        std::mem::take(&mut *self.new.lock().expect("poisoned"))
    }

    /// Quarantined VMs whose release was asked for.
    pub fn releases_requested(&self) -> Vec<String> {
        self.vms
            .lock()
            .expect("poisoned")
            .keys()
            .filter(|vm| release_requested(&self.root, vm))
            .cloned()
            .collect()
    }

    /// Ends the quarantine of `vm`: removes its record, then the release request (durably).
    pub fn remove(&self, vm: &str) -> std::io::Result<()> {
        let mut vms = self.vms.lock().expect("poisoned");
        for p in [record_path(&self.root, vm), release_path(&self.root, vm)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        ferry_durable::fsync_dir(&dir(&self.root))?;
        vms.remove(vm);
        self.count
            .store(vms.len(), std::sync::atomic::Ordering::Release);
        tracing::info!(
            vm,
            "VM released from quarantine: it replicates again from its newest point"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarantine_survives_a_reload_and_ends_only_when_released() {
        let d = tempfile::tempdir().unwrap();
        let q = Quarantines::load(d.path()).unwrap();
        assert!(!q.contains("web"));
        assert!(request_release(d.path(), "web").is_err(), "not quarantined");
        q.add("web", "segment 3 is corrupt").unwrap();
        q.add("web", "a second reason").unwrap();
        assert_eq!(q.take_new().len(), 1);
        let again = Quarantines::load(d.path()).unwrap();
        assert_eq!(again.all()["web"].reason, "segment 3 is corrupt");
        assert!(again.releases_requested().is_empty());
        request_release(d.path(), "web").unwrap();
        assert_eq!(again.releases_requested(), vec!["web".to_string()]);
        again.remove("web").unwrap();
        assert!(list(d.path()).unwrap().is_empty());
        assert!(!release_requested(d.path(), "web"));
    }

    #[test]
    fn an_unreadable_record_still_quarantines() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir(d.path())).unwrap();
        std::fs::write(record_path(d.path(), "db"), b"{not json").unwrap();
        let q = Quarantines::load(d.path()).unwrap();
        assert!(q.contains("db"));
        assert!(q.all()["db"].reason.contains("cannot be read"));
    }

    #[test]
    fn a_new_quarantine_drops_a_stale_release_request() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir(d.path())).unwrap();
        std::fs::write(release_path(d.path(), "web"), b"release\n").unwrap();
        let q = Quarantines::load(d.path()).unwrap();
        q.add("web", "bad").unwrap();
        assert!(q.releases_requested().is_empty());
    }
}
