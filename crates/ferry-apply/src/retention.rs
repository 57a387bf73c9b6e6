//! Retention: expired recovery points and the data only they needed are deleted.
//!
//! Points go by the [`Rules`] (the newest point and the newest app-consistent point never); a
//! replica drops only the undo deltas older than its oldest retained point, so every retained
//! point restores exactly whichever points went. Then a mark-and-sweep over every replica of the store (current maps, undo deltas) and
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

/// What retention keeps of a VM's points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Points older than this go (unless another rule keeps them).
    pub retention: Duration,
    /// App-consistent points are kept this long, whatever `retention` and `thin` say.
    pub app_retention: Duration,
    /// Thinning, youngest window first: a point younger than `.0` is kept if `.1` is `None`, else
    /// only if it is the newest of its `.1`-long time bucket; points between the last window and
    /// `retention` are thinned by the last rule's bucket.
    pub thin: Vec<(Duration, Option<Duration>)>,
}

impl Rules {
    /// One window for every point, no thinning.
    pub fn window(retention: Duration) -> Rules {
        Rules {
            retention,
            app_retention: retention,
            thin: Vec::new(),
        }
    }
}

/// The points of `m` that `retention` expires at `now` (never the newest).
pub fn expired(m: &Manifest, retention: Duration, now: SystemTime) -> Vec<u64> {
    expired_pinned(m, retention, now, None)
}

/// [`plan`] with one window and no thinning.
pub fn expired_pinned(
    m: &Manifest,
    retention: Duration,
    now: SystemTime,
    pinned: Option<u64>,
) -> Vec<u64> {
    plan(m, &Rules::window(retention), now, pinned)
        .into_iter()
        .map(|(seq, _)| seq)
        .collect()
}

/// The points of `m` that `rules` remove at `now`, each with why, oldest first. Never the
/// newest point, never the newest app-consistent point, never a point whose time does not parse,
/// and never one at or after `pinned` (the lowest point seq a live reader has pinned).
///
/// Any point may go, not only the oldest: a replica keeps every undo delta a retained point
/// still reads through ([`Replica::gc_undo`]), and Azure snapshots stand alone. A clock step on
/// the machine that stamped the times therefore prunes by the stamped time, and only that point.
pub fn plan(
    m: &Manifest,
    rules: &Rules,
    now: SystemTime,
    pinned: Option<u64>,
) -> Vec<(u64, &'static str)> {
    let mut by_seq: Vec<&ferry_format::manifest::Point> = m.points.iter().collect();
    by_seq.sort_by_key(|p| p.seq);
    let Some(newest) = by_seq.last().map(|p| p.seq) else {
        return Vec::new();
    };
    let newest_app = by_seq.iter().rev().find(|p| p.kind == "app").map(|p| p.seq);
    // Newest first, so each thinning bucket keeps its newest point.
    let mut buckets: HashSet<(usize, u64)> = HashSet::new();
    let mut out = Vec::new();
    for p in by_seq.iter().rev() {
        if p.seq == newest || Some(p.seq) == newest_app || pinned.is_some_and(|pin| p.seq >= pin) {
            continue;
        }
        let Ok(t) = humantime::parse_rfc3339(&p.time) else {
            continue;
        };
        let age = now.duration_since(t).unwrap_or_default();
        if p.kind == "app" && age <= rules.app_retention {
            continue;
        }
        if age > rules.retention {
            out.push((p.seq, "older than the retention"));
            continue;
        }
        let rule = rules
            .thin
            .iter()
            .position(|(within, _)| age <= *within)
            .or_else(|| rules.thin.len().checked_sub(1));
        let Some(i) = rule else { continue };
        let Some(every) = rules.thin[i].1 else {
            continue;
        };
        let at = t
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if !buckets.insert((i, at / every.as_secs().max(1))) {
            out.push((p.seq, "thinned (a newer point holds its time bucket)"));
        }
    }
    out.reverse();
    out
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
    prune_with(store, &|_| Rules::window(retention), &mut |_, _, _| {
        Ok(true)
    })
}

/// [`prune`], where `may_delete(vm, disk, seq)` can veto deleting a segment and is told about every
/// deletion it allows (split mode deletes the store's copy there, once `ferry apply` is past it).
pub fn prune_with(
    store: &LocalStore,
    rules: &dyn Fn(&str) -> Rules,
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
        let gone: Vec<u64> = plan(&m, &rules(vm), now, pins.get(vm).copied())
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
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
        // A VM whose migration completed (its points and replicas gone): every segment of its
        // journal is a candidate, and none of its records keeps anything alive.
        let retired =
            m.is_none() && matches!(crate::lifecycle::load(&root, vm), Ok(Some(l)) if l.retired());
        if retired {
            for disk in crate::list_dirs(&root.join("journal").join(vm))? {
                for seq in store.list_segments(vm, &disk)? {
                    candidates.push((vm.clone(), disk.clone(), seq));
                }
            }
            continue;
        }
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
    fn a_clock_step_prunes_by_the_stamped_time_never_the_newest() {
        // Point 2 was stamped after a forward clock step, point 3 after the clock stepped back.
        let m = manifest(&[
            (1, "2026-12-04T08:00:00Z"),
            (2, "2026-12-04T11:59:00Z"),
            (3, "2026-12-04T08:30:00Z"),
            (4, "2026-12-04T08:40:00Z"),
        ]);
        assert_eq!(expired(&m, Duration::from_secs(3600), now()), vec![1, 3]);
    }

    fn kinds(m: &mut Manifest, app: &[u64]) {
        for p in &mut m.points {
            if app.contains(&p.seq) {
                p.kind = "app".into();
            }
        }
    }

    #[test]
    fn app_points_keep_their_own_retention_and_the_newest_app_point_stays() {
        // Every 10 minutes from 06:00 to 12:00; app points at 06:00, 08:00 and 10:00.
        let times: Vec<(u64, String)> = (0..=36)
            .map(|i| {
                (
                    i + 1,
                    format!("2026-12-04T{:02}:{:02}:00Z", 6 + i / 6, (i % 6) * 10),
                )
            })
            .collect();
        let refs: Vec<(u64, &str)> = times.iter().map(|(s, t)| (*s, t.as_str())).collect();
        let mut m = manifest(&refs);
        kinds(&mut m, &[1, 13, 25]);
        let rules = Rules {
            retention: Duration::from_secs(3600),
            app_retention: Duration::from_secs(5 * 3600),
            thin: Vec::new(),
        };
        let gone: Vec<u64> = plan(&m, &rules, now(), None).iter().map(|g| g.0).collect();
        // Kept: the last hour (seq 31..=37), app points within 5 h (13 at 08:00, 25 at 10:00).
        // App point 1 (06:00) is 6 h old: gone.
        let want: Vec<u64> = (1..31).filter(|s| *s != 13 && *s != 25).collect();
        assert_eq!(gone, want);
        // With a 1 h app retention the newest app point (25) still stays.
        let short = Rules {
            app_retention: Duration::from_secs(3600),
            ..rules.clone()
        };
        let gone: Vec<u64> = plan(&m, &short, now(), None).iter().map(|g| g.0).collect();
        assert!(gone.contains(&13) && !gone.contains(&25));
        // A pin keeps everything from it on.
        let gone: Vec<u64> = plan(&m, &rules, now(), Some(10))
            .iter()
            .map(|g| g.0)
            .collect();
        assert_eq!(gone, vec![1, 2, 3, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn thinning_keeps_all_then_the_newest_per_bucket() {
        // Every 10 minutes from 00:00 to 12:00.
        let times: Vec<(u64, String)> = (0..=72)
            .map(|i| {
                (
                    i + 1,
                    format!("2026-12-04T{:02}:{:02}:00Z", i / 6, (i % 6) * 10),
                )
            })
            .collect();
        let refs: Vec<(u64, &str)> = times.iter().map(|(s, t)| (*s, t.as_str())).collect();
        let m = manifest(&refs);
        let rules = Rules {
            retention: Duration::from_secs(24 * 3600),
            app_retention: Duration::from_secs(24 * 3600),
            thin: vec![
                (Duration::from_secs(2 * 3600), None),
                (
                    Duration::from_secs(6 * 3600),
                    Some(Duration::from_secs(3600)),
                ),
            ],
        };
        let gone: Vec<(u64, &str)> = plan(&m, &rules, now(), None);
        let kept: Vec<u64> = (1..=73)
            .filter(|s| !gone.iter().any(|g| g.0 == *s))
            .collect();
        // The last 2 h (10:00..12:00, seq 61..=73) all; from 06:00 to 10:00 one an hour, the
        // newest of each hour (xx:50); before 06:00 the last rule's hourly buckets too.
        let mut want: Vec<u64> = (0..10).map(|h| h * 6 + 6).collect(); // 00:50 .. 09:50
        want.extend(61..=73);
        assert_eq!(kept, want);
        assert!(gone.iter().all(|g| g.1.starts_with("thinned")));
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
