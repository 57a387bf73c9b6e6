//! A VM's place in the migration lifecycle, and retiring a migrated VM's replication data.
//!
//! Job: one record per VM that has left plain protection, `STORE/lifecycle/VM.json` (durable,
//! written only by Ferry):
//! - `cut-over`: `ferry-agent cutover` made the source's final point (`final_point`); the source
//!   is write-blocked. `--rollback` removes the record.
//! - `failed-over`: `ferry failover --vm VM` materialized a point into the VM's permanent disks
//!   (`failover`, the record id). The process server stops expecting the agent: no RPO or
//!   disconnection alarm for the VM from then on.
//! - `retiring`: `ferry complete-migration` asked for the VM's replication to end. From the
//!   moment this is durable the process server refuses the VM's agent ([`is_retired`]), and
//!   whoever holds the store lock next ([`retire`]: the running server's drain loop, or the
//!   command itself when no server runs) deletes the VM's replication data.
//! - `retired`: done; the record stays as the audit trail, with what was removed, and keeps
//!   refusing the agent (an old agent starting again must not rebuild a full copy nobody pays
//!   attention to).
//!
//! Invariants:
//! - `retire` runs under the store lock, with no applier alive (the caller drops its pipeline
//!   first, as retention does): the manifest goes first (from then on the VM has no point, and a
//!   crash anywhere later leaves a VM that [`retire`] finishes again), then the replicas, the
//!   holds, the quarantine record, the disk identities, and last the journal segments no other VM's data names (the
//!   dedupe index may point another VM's writes into this VM's segments; those stay).
//! - Only a record that reads as `retiring` or `retired` retires anything. An unreadable one
//!   (damaged, a newer format, an I/O error) neither drops the VM's cached records nor deletes
//!   anything: the VM replicates on, its agent is refused with a retryable error until the record
//!   can be read, and the server logs why.
//! - Every read-modify-write of a record holds `lifecycle/.lock` ([`update`]): a failover, a
//!   `complete-migration` and the server's cutover notices never lose each other's change.
//!
//! Must not: touch the failed-over disks (they are the migration's result, outside the store).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ApplyError;
use ferry_store::LocalStore;

/// `format` of a lifecycle record.
pub const FORMAT: &str = "ferry-vm-lifecycle";
const VERSION: u32 = 1;

/// The states, in order.
pub const CUT_OVER: &str = "cut-over";
pub const FAILED_OVER: &str = "failed-over";
pub const RETIRING: &str = "retiring";
pub const RETIRED: &str = "retired";

/// `STORE/lifecycle/VM.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    pub format: String,
    pub version: u32,
    pub vm: String,
    /// [`CUT_OVER`], [`FAILED_OVER`], [`RETIRING`] or [`RETIRED`].
    pub state: String,
    /// When it entered `state` (RFC 3339 UTC).
    pub since: String,
    /// The cutover's final point (its id), while the VM is cut over or later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_point: Option<String>,
    /// The failover that made the VM's permanent disks (its record id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<String>,
    /// Whether `complete-migration` was forced (no failover before it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// What retiring removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<Removed>,
    /// Every state change, oldest first: "TIME STATE".
    #[serde(default)]
    pub history: Vec<String>,
}

/// What [`retire`] removed (and kept) of a VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Removed {
    pub points: u64,
    pub disks: Vec<String>,
    pub replica_bytes: u64,
    pub segments: u64,
    pub segment_bytes: u64,
    /// Segments of the VM kept because another VM's data names a chunk in them.
    pub segments_kept: u64,
    pub holds: u64,
}

impl Lifecycle {
    pub fn new(vm: &str, state: &str) -> Lifecycle {
        let mut l = Lifecycle {
            format: FORMAT.into(),
            version: VERSION,
            vm: vm.into(),
            state: String::new(),
            since: String::new(),
            final_point: None,
            failover: None,
            forced: false,
            removed: None,
            history: Vec::new(),
        };
        l.enter(state);
        l
    }

    /// Moves to `state` now (and says so in the history).
    pub fn enter(&mut self, state: &str) {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        self.history.push(format!("{now} {state}"));
        self.state = state.into();
        self.since = now;
    }

    /// Whether the VM's agent is refused: its replication ended, or is ending.
    pub fn retired(&self) -> bool {
        self.state == RETIRING || self.state == RETIRED
    }
}

/// A lifecycle record, or why the bytes are not one (fuzzed: `server_state_json`).
pub fn parse(bytes: &[u8]) -> Result<Lifecycle, String> {
    let l: Lifecycle = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if l.format != FORMAT || l.version != VERSION {
        return Err(format!(
            "format {:?} version {} is not this Ferry's",
            l.format, l.version
        ));
    }
    if ![CUT_OVER, FAILED_OVER, RETIRING, RETIRED].contains(&l.state.as_str()) {
        return Err(format!("unknown state {:?}", l.state));
    }
    Ok(l)
}

/// The lifecycle directory of a store.
pub fn dir(store_root: &Path) -> PathBuf {
    store_root.join("lifecycle")
}

fn path(store_root: &Path, vm: &str) -> PathBuf {
    dir(store_root).join(format!("{vm}.json"))
}

fn damaged(p: &Path, why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{}: {why}; it is written only by Ferry: restore it from a backup (while it cannot be read, the VM's agent is refused)",
            p.display()
        ),
    )
}

/// The VM's record, if it has one.
pub fn load(store_root: &Path, vm: &str) -> std::io::Result<Option<Lifecycle>> {
    let p = path(store_root, vm);
    match std::fs::read(&p) {
        Ok(b) => {
            let l = parse(&b).map_err(|e| damaged(&p, e))?;
            if l.vm != vm {
                return Err(damaged(&p, format!("it names VM {:?}", l.vm)));
            }
            Ok(Some(l))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the VM's record (durable on return).
pub fn save(store_root: &Path, l: &Lifecycle) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(l).expect("lifecycle serializes");
    ferry_durable::durable_write(&path(store_root, &l.vm), &bytes)
}

/// Removes the VM's record (a cutover rolled back).
pub fn remove(store_root: &Path, vm: &str) -> std::io::Result<()> {
    ferry_durable::remove_durable(&path(store_root, vm))
}

/// Every record of the store, by VM; one that cannot be read is an `Err` in its place.
pub fn list(store_root: &Path) -> std::io::Result<BTreeMap<String, Result<Lifecycle, String>>> {
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
        if vm.starts_with('.') {
            continue;
        }
        out.insert(
            vm.to_owned(),
            load(store_root, vm)
                .map_err(|e| e.to_string())
                .and_then(|l| l.ok_or_else(|| "removed meanwhile".to_string())),
        );
    }
    Ok(out)
}

/// Whether the VM's replication ended (its record reads `retiring` or `retired`); `Err` when the
/// record exists but cannot be read (the caller must neither drop nor accept blindly).
pub fn is_retired(store_root: &Path, vm: &str) -> Result<bool, String> {
    match load(store_root, vm) {
        Ok(Some(l)) => Ok(l.retired()),
        Ok(None) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// The VMs whose record reads `retiring` or `retired` (unreadable records are not among them).
pub fn retired_set(store_root: &Path) -> std::collections::HashSet<String> {
    list(store_root)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(vm, l)| match l {
            Ok(l) if l.retired() => Some(vm),
            _ => None,
        })
        .collect()
}

/// Held around every read-modify-write of a record.
struct Lock(#[allow(dead_code)] std::fs::File);

fn lock(store_root: &Path) -> std::io::Result<Lock> {
    use std::os::unix::io::AsRawFd;
    let d = dir(store_root);
    ferry_durable::create_dir_durable(&d)?;
    // No link followed: root takes this lock in a directory the service user owns (and
    // `adopt_owner` would hand whatever it opened to that user).
    let f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(d.join(".lock"))?
    };
    if f.metadata()?.is_file() {
        ferry_durable::adopt_owner(&f, &d)?;
    }
    // SAFETY: flock on a valid, owned file descriptor has no memory-safety preconditions.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Lock(f))
}

/// Reads the VM's record under the lock, lets `f` decide (`Ok(Some(new))`: write it,
/// `Ok(None)`: remove it, `Err`: change nothing and return the error), and returns what `f`
/// returned. The record `f` sees is the current one, whatever was read before.
pub fn update<T>(
    store_root: &Path,
    vm: &str,
    f: impl FnOnce(Option<Lifecycle>) -> Result<(Option<Lifecycle>, T), String>,
) -> Result<T, String> {
    let _l = lock(store_root).map_err(|e| {
        format!(
            "cannot lock {}: {e}",
            dir(store_root).join(".lock").display()
        )
    })?;
    let cur = load(store_root, vm).map_err(|e| e.to_string())?;
    let (new, out) = f(cur.clone())?;
    match new {
        Some(n) if Some(&n) != cur.as_ref() => save(store_root, &n)
            .map_err(|e| format!("cannot write {}: {e}", path(store_root, vm).display()))?,
        Some(_) => {}
        None if cur.is_some() => remove(store_root, vm)
            .map_err(|e| format!("cannot remove {}: {e}", path(store_root, vm).display()))?,
        None => {}
    }
    Ok(out)
}

/// VMs whose record says `retiring`: their data is to be removed.
pub fn retiring(store_root: &Path) -> Vec<String> {
    list(store_root)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(vm, l)| match l {
            Ok(l) if l.state == RETIRING => Some(vm),
            _ => None,
        })
        .collect()
}

fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => n += dir_bytes(&e.path()),
                Ok(_) => n += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    n
}

fn io<'a>(p: &'a Path, op: &'static str) -> impl Fn(std::io::Error) -> ApplyError + 'a {
    move |source| {
        ApplyError::Store(ferry_store::StoreError::Io {
            path: p.to_owned(),
            op,
            source,
        })
    }
}

/// Removes `dir` and everything in it, then syncs its parent (absent: fine).
fn remove_tree(dir: &Path) -> Result<(), ApplyError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir, "remove")(e)),
    }
    if let Some(p) = dir.parent() {
        ferry_durable::fsync_dir(p).map_err(io(p, "sync"))?;
    }
    Ok(())
}

/// Deletes the replication data of `vm`, whose record says `retiring`, and marks it `retired`
/// with what went (see the module docs for the order). Hold the store lock, with no applier
/// alive. Running it again after a crash finishes the job.
pub fn retire(store: &LocalStore, vm: &str) -> Result<Removed, ApplyError> {
    let root = store.root().to_owned();
    // Run as root on a store the service user owns: a directory swapped for a link must not
    // lead the removal elsewhere. Every directory removed from is a real one, the store's owner's.
    {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&root).map_err(io(&root, "stat"))?.uid();
        for top in [
            "manifests",
            "replicas",
            "journal",
            "pins",
            "disk-ids",
            "quarantine",
        ] {
            for p in [root.join(top), root.join(top).join(vm)] {
                match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.file_type().is_symlink() || (m.is_dir() && m.uid() != owner) => {
                        return Err(ApplyError::Store(ferry_store::StoreError::Index(format!(
                            "{} is a link or not the store owner's: nothing removed; check the store (a link there is not Ferry's)",
                            p.display()
                        ))))
                    }
                    _ => {}
                }
            }
        }
    }
    let mut l = match load(&root, vm).map_err(io(&path(&root, vm), "read"))? {
        Some(l) if l.state == RETIRING => l,
        Some(l) if l.state == RETIRED => return Ok(l.removed.unwrap_or_default()),
        _ => {
            return Err(ApplyError::Store(ferry_store::StoreError::Index(format!(
                "VM {vm} is not being retired (no complete-migration asked for it)"
            ))))
        }
    };
    let mut out = Removed::default();
    // 1. The points: from here on the VM has none.
    if let Some(m) = store.load_manifest(vm)? {
        out.points = m.points.len() as u64;
        out.disks = m.disks.keys().cloned().collect();
    }
    let manifest = root.join("manifests").join(format!("{vm}.json"));
    ferry_durable::remove_durable(&manifest).map_err(io(&manifest, "remove"))?;
    // 2. The replicas.
    let replicas = root.join("replicas").join(vm);
    out.replica_bytes = dir_bytes(&replicas);
    for d in crate::list_dirs(&replicas)? {
        if !out.disks.contains(&d) {
            out.disks.push(d);
        }
    }
    remove_tree(&replicas)?;
    // 3. Its holds (a failover's, a test failover's) and pins of readers that are gone.
    let pins = root.join("pins");
    if let Ok(rd) = std::fs::read_dir(&pins) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".hold") && name.starts_with(&format!("{vm}.")) {
                // VM.SEQ.ID.hold: the VM is everything before the last two dots.
                let stem = &name[..name.len() - ".hold".len()];
                let owner = stem.rsplitn(3, '.').nth(2);
                if owner == Some(vm) {
                    ferry_durable::remove_durable(&e.path()).map_err(io(&e.path(), "remove"))?;
                    out.holds += 1;
                }
            }
        }
    }
    // 4. A quarantine record (and its release request), and the disk identities the server
    //    keeps for the agent's inventory.
    for q in [
        crate::quarantine::dir(&root).join(format!("{vm}.json")),
        crate::quarantine::dir(&root).join(format!("{vm}.release")),
        root.join("disk-ids").join(format!("{vm}.json")),
    ] {
        match ferry_durable::remove_durable(&q) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
            r => r.map_err(io(&q, "remove"))?,
        }
    }
    // 5. The journal: every segment of the VM whose chunks no other VM's data names.
    let journal = root.join("journal").join(vm);
    let count = |store: &LocalStore| -> Result<u64, ApplyError> {
        let mut n = 0;
        for d in crate::list_dirs(&journal)? {
            n += store.list_segments(vm, &d)?.len() as u64;
        }
        Ok(n)
    };
    let (before, before_bytes) = (count(store)?, dir_bytes(&journal));
    crate::retention::collect_garbage(store, &mut |_, _, _| Ok(true))?;
    let (after, after_bytes) = (count(store)?, dir_bytes(&journal));
    out.segments = before.saturating_sub(after);
    out.segment_bytes = before_bytes.saturating_sub(after_bytes);
    out.segments_kept = after;
    // This VM's journal, and that of any VM retired before whose last kept segments went now.
    for (other, l) in list(&root).map_err(io(&dir(&root), "list"))? {
        if other != vm && !matches!(l, Ok(ref l) if l.state == RETIRED) {
            continue;
        }
        let j = root.join("journal").join(&other);
        let mut n = 0;
        for d in crate::list_dirs(&j)? {
            n += store.list_segments(&other, &d)?.len();
        }
        if n == 0 {
            remove_tree(&j)?;
        }
    }
    l.removed = Some(out.clone());
    l.enter(RETIRED);
    update(&root, vm, |_| Ok((Some(l), ()))).map_err(|e| {
        ApplyError::Store(ferry_store::StoreError::Index(format!(
            "the VM's data is removed, but its record is not updated: {e}"
        )))
    })?;
    tracing::info!(
        vm,
        points = out.points,
        segments = out.segments,
        kept = out.segments_kept,
        "retired the VM's replication data (complete migration)"
    );
    Ok(out)
}

/// `ferry failover --shutdown-source`: the operator asks the VM's agent (through the process
/// server) to cut over. `lifecycle/VM.cutover-request` (durable) until the server has sent it
/// (then `.cutover-asked`); the outcome is the record's `final_point` (success) or
/// `lifecycle/VM.cutover-result` (why not).
pub mod remote {
    use super::*;

    fn file(store_root: &Path, vm: &str, ext: &str) -> PathBuf {
        dir(store_root).join(format!("{vm}.{ext}"))
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// Reads a small file of the lifecycle directory without following a link (root reads
    /// what the service user may have placed there).
    fn read_small(p: &Path) -> Option<String> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .ok()?;
        let mut s = String::new();
        f.take(4096).read_to_string(&mut s).ok()?;
        Some(s)
    }

    /// The deadline (Unix seconds) a request file carries; 0 when unreadable.
    fn deadline(p: &Path) -> u64 {
        read_small(p)
            .and_then(|s| s.trim().strip_prefix("until ")?.parse().ok())
            .unwrap_or(0)
    }

    /// Asks for a cutover of `vm`, valid for `wait` (the server drops it after). Refused while
    /// another live request of the VM is pending (two `--shutdown-source` at once).
    pub fn request(store_root: &Path, vm: &str, wait: std::time::Duration) -> std::io::Result<()> {
        let _l = lock(store_root)?;
        for ext in ["cutover-request", "cutover-asked"] {
            let p = file(store_root, vm, ext);
            if p.symlink_metadata().is_ok() && deadline(&p) > now() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("a cutover of {vm} is asked already (another `ferry failover --shutdown-source`?); wait for it, or remove {}", p.display()),
                ));
            }
        }
        for ext in ["cutover-result", "cutover-asked", "cutover-request"] {
            ferry_durable::remove_durable(&file(store_root, vm, ext))?;
        }
        let until = now() + wait.as_secs().max(1);
        ferry_durable::durable_write(
            &file(store_root, vm, "cutover-request"),
            format!("until {until}\n").as_bytes(),
        )
    }

    /// Withdraws a request (the operator gave up waiting).
    pub fn withdraw(store_root: &Path, vm: &str) {
        for ext in ["cutover-request", "cutover-asked"] {
            let _ = ferry_durable::remove_durable(&file(store_root, vm, ext));
        }
    }

    /// VMs with a live request not yet sent; expired ones are dropped (a command that was
    /// killed must not shut a source down days later).
    pub fn requested(store_root: &Path) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(dir(store_root)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(vm) = n
                .strip_suffix(".cutover-request")
                .filter(|vm| !vm.starts_with('.') && !vm.is_empty())
            else {
                continue;
            };
            if deadline(&e.path()) <= now() {
                tracing::warn!(
                    vm,
                    "dropping an expired cutover request (its command gave up)"
                );
                let _ = ferry_durable::remove_durable(&e.path());
                continue;
            }
            out.push(vm.to_owned());
        }
        out
    }

    /// The request of `vm` was sent to its agent.
    pub fn sent(store_root: &Path, vm: &str) -> std::io::Result<()> {
        std::fs::rename(
            file(store_root, vm, "cutover-request"),
            file(store_root, vm, "cutover-asked"),
        )?;
        ferry_durable::fsync_dir(&dir(store_root))
    }

    /// Whether a request of `vm` was sent to its agent (and not answered yet).
    pub fn asked(store_root: &Path, vm: &str) -> bool {
        file(store_root, vm, "cutover-asked")
            .symlink_metadata()
            .is_ok()
    }

    /// Whether a request of `vm` is outstanding (asked or sent).
    pub fn pending(store_root: &Path, vm: &str) -> bool {
        file(store_root, vm, "cutover-request")
            .symlink_metadata()
            .is_ok()
            || asked(store_root, vm)
    }

    /// The cutover asked for `vm` failed: why (the request goes).
    pub fn failed(store_root: &Path, vm: &str, why: &str) -> std::io::Result<()> {
        ferry_durable::durable_write(&file(store_root, vm, "cutover-result"), why.as_bytes())?;
        withdraw(store_root, vm);
        Ok(())
    }

    /// Why the cutover asked for `vm` failed, if it did.
    pub fn failure(store_root: &Path, vm: &str) -> Option<String> {
        read_small(&file(store_root, vm, "cutover-result"))
    }

    /// The request succeeded (the final point is recorded): its files go.
    pub fn done(store_root: &Path, vm: &str) {
        withdraw(store_root, vm);
        let _ = ferry_durable::remove_durable(&file(store_root, vm, "cutover-result"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cutover_request_expires_and_two_at_once_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        remote::request(root, "web01", std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(remote::requested(root), ["web01".to_string()]);
        // A second command while the first waits: refused, the first's request intact.
        let e = remote::request(root, "web01", std::time::Duration::from_secs(60)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert!(remote::pending(root, "web01"));
        // One whose command gave up long ago (its deadline passed): dropped, never sent.
        std::fs::write(dir(root).join("web01.cutover-request"), "until 1\n").unwrap();
        assert!(remote::requested(root).is_empty());
        assert!(!remote::pending(root, "web01"));
        // Then a new one may be asked.
        remote::request(root, "web01", std::time::Duration::from_secs(60)).unwrap();
        remote::sent(root, "web01").unwrap();
        assert!(remote::asked(root, "web01") && remote::requested(root).is_empty());
        remote::failed(root, "web01", "not allowed").unwrap();
        assert_eq!(
            remote::failure(root, "web01").as_deref(),
            Some("not allowed")
        );
        assert!(!remote::pending(root, "web01"));
    }

    #[test]
    fn the_lock_follows_no_link() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("store");
        std::fs::create_dir_all(dir(&root)).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"secret").unwrap();
        std::os::unix::fs::symlink(&victim, dir(&root).join(".lock")).unwrap();
        let r = update(&root, "web01", |_| {
            Ok((Some(Lifecycle::new("web01", CUT_OVER)), ()))
        });
        assert!(r.is_err(), "a linked lock was used");
        assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
        assert!(load(&root, "web01").unwrap().is_none());
    }

    #[test]
    fn an_unreadable_record_retires_nothing() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(dir(root)).unwrap();
        std::fs::write(dir(root).join("web01.json"), b"{ damaged").unwrap();
        assert!(is_retired(root, "web01").is_err());
        assert!(retired_set(root).is_empty());
        assert!(retiring(root).is_empty());
    }
}
