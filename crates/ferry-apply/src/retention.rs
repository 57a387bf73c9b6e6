//! Retention: expired recovery points and the data only they needed are deleted.
//!
//! Points expire oldest first (the newest point is never pruned), so pruning a point only drops its
//! undo delta. Then a mark-and-sweep over every replica of the store (current maps, undo deltas) and
//! every unapplied journal record finds the live chunks; a segment none of whose chunks is live, and
//! that lies before its disk's applied position, is deleted — after its dedupe-index entries, so no
//! new reference can name it.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use ferry_format::manifest::Manifest;
use ferry_format::segment::Record;
use ferry_store::{LocalStore, Replica};

use crate::ApplyError;

/// What retention removed.
#[derive(Clone, Debug, Default)]
pub struct Pruned {
    pub points: Vec<(String, String)>,
    pub segments: u64,
    pub segment_bytes: u64,
}

/// The points of `m` that `retention` expires at `now` (never the newest).
pub fn expired(m: &Manifest, retention: Duration, now: SystemTime) -> Vec<u64> {
    expired_pinned(m, retention, now, None)
}

/// The points of `m` that `retention` expires at `now`: an oldest-first run by point seq that
/// stops at the first point still within `retention`, at the newest point, and at `pinned` (the
/// lowest point seq a live reader has pinned).
///
/// Only a prefix by seq is ever pruned, whatever the point times say: a replica's undo chain needs
/// every newer undo to rebuild an older point, so pruning a middle point (a clock step on the
/// machine that stamped the times can make a newer point look older) would make every older point
/// restore wrong bytes.
pub fn expired_pinned(
    m: &Manifest,
    retention: Duration,
    now: SystemTime,
    pinned: Option<u64>,
) -> Vec<u64> {
    let mut by_seq: Vec<&ferry_format::manifest::Point> = m.points.iter().collect();
    by_seq.sort_by_key(|p| p.seq);
    let Some(newest) = by_seq.last().map(|p| p.seq) else {
        return Vec::new();
    };
    by_seq
        .iter()
        .take_while(|p| p.seq != newest && pinned.is_none_or(|pin| p.seq < pin))
        .take_while(|p| {
            humantime::parse_rfc3339(&p.time)
                .map(|t| now.duration_since(t).unwrap_or_default() > retention)
                .unwrap_or(false)
        })
        .map(|p| p.seq)
        .collect()
}

/// Damage to stored data (not an I/O failure): what quarantines a VM.
fn is_data(e: &ferry_store::StoreError) -> bool {
    matches!(
        e,
        ferry_store::StoreError::Format { .. } | ferry_store::StoreError::WrongKey { .. }
    )
}

/// Collects nothing this time: `vm`'s data cannot be read, so what it needs is not known.
fn skip_gc(vm: &str, e: &ferry_store::StoreError) -> (u64, u64) {
    tracing::warn!(vm, error = %e, "garbage collection skipped: the VM's data cannot be read (it is quarantined); no segment is removed until it is repaired or released");
    (0, 0)
}

/// Applies retention to every VM of a local store, then collects garbage. Hold the store lock.
pub fn prune(store: &LocalStore, retention: Duration) -> Result<Pruned, ApplyError> {
    prune_with(store, retention, &mut |_, _, _| Ok(true))
}

/// [`prune`], where `may_delete(vm, disk, seq)` can veto deleting a segment and is told about every
/// deletion it allows (split mode deletes the store's copy there, once `ferry apply` is past it).
pub fn prune_with(
    store: &LocalStore,
    retention: Duration,
    may_delete: &mut dyn FnMut(&str, &str, u64) -> Result<bool, ApplyError>,
) -> Result<Pruned, ApplyError> {
    let mut out = Pruned::default();
    let now = SystemTime::now();
    let vms = ferry_store::list_vms_at(store.root())?;
    let pins = ferry_store::readers::live_pins(store.root())?;
    for vm in &vms {
        // A VM whose manifest rotted (it is quarantined) keeps its points; the others go on.
        let mut m = match store.load_manifest(vm) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) if is_data(&e) => {
                tracing::warn!(vm, error = %e, "retention skips a VM whose manifest cannot be read");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let gone = expired_pinned(&m, retention, now, pins.get(vm).copied());
        if gone.is_empty() {
            continue;
        }
        for p in m.points.iter().filter(|p| gone.contains(&p.seq)) {
            out.points.push((vm.clone(), p.id.clone()));
        }
        m.points.retain(|p| !gone.contains(&p.seq));
        store.commit_manifest(&m)?;
        // Pins read again after the commit: a reader that pinned a point and saw it listed just
        // before the commit still finds every undo it needs (ferry_store::readers).
        let pin = ferry_store::readers::live_pins(store.root())?
            .get(vm)
            .copied();
        for disk in m.disks.keys() {
            let dir = store.replica_dir(vm, disk);
            if dir.join("current.map").exists() {
                let keep: Vec<u64> = m
                    .points
                    .iter()
                    .filter(|p| p.disks.iter().any(|d| &d.name == disk))
                    .map(|p| p.seq)
                    .collect();
                Replica::open(&dir)?.gc_undo(&keep, pin)?;
            }
        }
        tracing::info!(vm = %vm, pruned = gone.len(), "retention pruned expired points");
    }
    if !out.points.is_empty() {
        let (n, b) = collect_garbage(store, may_delete)?;
        out.segments = n;
        out.segment_bytes = b;
    }
    Ok(out)
}

/// Deletes segments whose chunks no replica, point or unapplied record needs.
pub fn collect_garbage(
    store: &LocalStore,
    may_delete: &mut dyn FnMut(&str, &str, u64) -> Result<bool, ApplyError>,
) -> Result<(u64, u64), ApplyError> {
    let root = store.root().to_owned();
    let mut live = HashSet::new();
    let mut candidates = Vec::new();
    let mut vms = ferry_store::list_vms_at(&root)?;
    for v in crate::list_dirs(&root.join("journal"))? {
        if !vms.contains(&v) {
            vms.push(v);
        }
    }
    // Damaged data of one VM (it is quarantined) must neither stop retention for all nor let a
    // segment go that something unread may need: an unreadable manifest or replica map means
    // nothing is collected this time; an unreadable uncommitted segment is skipped (its run can
    // only be voided); an unreadable candidate is kept.
    for vm in &vms {
        let m = match store.load_manifest(vm) {
            Ok(m) => m,
            Err(e) if is_data(&e) => return Ok(skip_gc(vm, &e)),
            Err(e) => return Err(e.into()),
        };
        for disk in crate::list_dirs(&root.join("journal").join(vm))? {
            let dir = store.replica_dir(vm, &disk);
            if dir.join("current.map").exists() {
                let r = Replica::open(&dir).and_then(|r| r.live_digests(&mut live));
                match r {
                    Ok(_) => {}
                    Err(e) if is_data(&e) => return Ok(skip_gc(vm, &e)),
                    Err(e) => return Err(e.into()),
                }
            }
            let applied = m
                .as_ref()
                .and_then(|m| m.disks.get(&disk))
                .map(|d| d.applied.segment)
                .unwrap_or(0);
            for seq in store.list_segments(vm, &disk)? {
                if seq >= applied {
                    // Not yet committed: everything it writes or references stays.
                    match store.read_segment_index(vm, &disk, seq) {
                        Ok(idx) => {
                            for r in idx.records {
                                if let Record::Write { digest, .. } = r {
                                    live.insert(digest);
                                }
                            }
                        }
                        Err(e) if is_data(&e) => {
                            tracing::warn!(vm, disk = %disk, seq, error = %e, "garbage collection cannot read an uncommitted segment; it stays")
                        }
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    candidates.push((vm.clone(), disk.clone(), seq));
                }
            }
        }
    }
    let index = store.open_index()?;
    let (mut n, mut bytes) = (0, 0);
    for (vm, disk, seq) in candidates {
        let path = LocalStore::segment_path(&vm, &disk, seq);
        let idx = match store.read_segment_index(&vm, &disk, seq) {
            Ok(idx) => idx,
            Err(e) if is_data(&e) => {
                tracing::warn!(vm, disk = %disk, seq, error = %e, "garbage collection cannot read a segment; it stays");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let own: Vec<_> = idx
            .records
            .iter()
            .filter_map(|r| match r {
                Record::Write { digest, loc, .. } if loc.segment == path => Some(*digest),
                _ => None,
            })
            .collect();
        if own.iter().any(|d| live.contains(d)) || !may_delete(&vm, &disk, seq)? {
            continue;
        }
        index.remove_for_segment(&path, &own)?;
        let p = root.join(&path);
        bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(&p).map_err(|source| ferry_store::StoreError::Io {
            path: p.clone(),
            op: "remove",
            source,
        })?;
        n += 1;
    }
    if n > 0 {
        tracing::info!(
            segments = n,
            bytes,
            "garbage collection removed unneeded segments"
        );
    }
    Ok((n, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_format::manifest::Point;

    fn manifest(times: &[(u64, &str)]) -> Manifest {
        Manifest {
            format: "ferry-manifest".into(),
            version: 1,
            vm: "vm".into(),
            key_id: "k".into(),
            disks: Default::default(),
            points: times
                .iter()
                .map(|(seq, t)| Point {
                    id: format!("{seq}"),
                    seq: *seq,
                    run: String::new(),
                    time: (*t).into(),
                    kind: "crash".into(),
                    disks: Vec::new(),
                })
                .collect(),
            next_seq: times.len() as u64 + 1,
        }
    }

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-12-04T12:00:00Z").unwrap()
    }

    #[test]
    fn a_clock_step_never_prunes_a_middle_point() {
        // Point 2 was stamped after a forward clock step, point 3 after the clock stepped back.
        let m = manifest(&[
            (1, "2026-12-04T08:00:00Z"),
            (2, "2026-12-04T11:59:00Z"),
            (3, "2026-12-04T08:30:00Z"),
            (4, "2026-12-04T08:40:00Z"),
        ]);
        assert_eq!(expired(&m, Duration::from_secs(3600), now()), vec![1]);
    }

    #[test]
    fn prunes_oldest_first_never_the_newest_and_stops_at_a_pin() {
        let m = manifest(&[
            (1, "2026-12-04T08:00:00Z"),
            (2, "2026-12-04T08:10:00Z"),
            (3, "2026-12-04T08:20:00Z"),
        ]);
        assert_eq!(expired(&m, Duration::from_secs(60), now()), vec![1, 2]);
        assert_eq!(
            expired_pinned(&m, Duration::from_secs(60), now(), Some(2)),
            vec![1]
        );
        assert!(expired_pinned(&m, Duration::from_secs(60), now(), Some(1)).is_empty());
        assert!(expired(&m, Duration::from_secs(5 * 3600), now()).is_empty());
    }
}
