//! Reference-model test of the copy-on-write replica: after any sequence of commits, the page map at
//! every point equals a plain in-memory model, including across crashes between the commit steps.

use std::collections::BTreeMap;

use ferry_crypto::{Digest, ZERO_DIGEST};
use ferry_store::Replica;
use proptest::prelude::*;

fn d(v: u8) -> Digest {
    if v == 0 {
        ZERO_DIGEST
    } else {
        [v; 32]
    }
}

#[derive(Debug, Clone)]
struct Commit {
    writes: Vec<(u64, u8)>,
    /// Crash after prepare (before the manifest): the commit never happened.
    crash_before_manifest: bool,
    /// Crash after the manifest, before the redo was applied: recovery must finish it.
    crash_after_manifest: bool,
}

fn commits(pages: u64) -> impl Strategy<Value = Vec<Commit>> {
    prop::collection::vec(
        (
            prop::collection::vec((0..pages, 0u8..6), 0..40),
            prop::bool::weighted(0.15),
            prop::bool::weighted(0.2),
        )
            .prop_map(|(writes, a, b)| Commit {
                writes,
                crash_before_manifest: a,
                crash_after_manifest: b && !a,
            }),
        1..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, .. ProptestConfig::default() })]
    #[test]
    fn points_match_the_model(pages in 1u64..300, commits in commits(300)) {
        let dir = tempfile::tempdir().unwrap();
        let size = pages * 65536 - 100;
        let mut r = Replica::open_or_create(dir.path(), size).unwrap();
        let mut model: Vec<Digest> = vec![ZERO_DIGEST; pages as usize];
        let mut snapshots: BTreeMap<u64, Vec<Digest>> = BTreeMap::new();
        let mut latest = 0u64;
        for c in commits {
            let seq = latest + 1;
            r.reset_pending().unwrap();
            let mut next = model.clone();
            for (p, v) in &c.writes {
                let p = p % pages;
                r.record(p, &d(*v)).unwrap();
                next[p as usize] = d(*v);
            }
            r.prepare(seq).unwrap();
            if c.crash_before_manifest {
                drop(r);
                r = Replica::open(dir.path()).unwrap();
                r.recover(latest).unwrap();
                continue;
            }
            // The manifest commit happens here.
            latest = seq;
            model = next;
            snapshots.insert(seq, model.clone());
            if c.crash_after_manifest {
                drop(r);
                r = Replica::open(dir.path()).unwrap();
                r.recover(latest).unwrap();
            } else {
                r.apply_redo(seq).unwrap();
            }
            prop_assert_eq!(r.generation(), latest);
        }
        let mut cur = vec![ZERO_DIGEST; pages as usize];
        r.read_map(0, &mut cur).unwrap();
        prop_assert_eq!(&cur, &model);
        for (seq, want) in &snapshots {
            let mut rd = ferry_store::readers::LiveReader::open(dir.path(), *seq).unwrap();
            let mut got = vec![ZERO_DIGEST; pages as usize];
            // Read in uneven windows, ascending, as restore does.
            let mut first = 0u64;
            while first < pages {
                let n = (pages - first).min(7 + first % 13);
                rd.read(first, &mut got[first as usize..(first + n) as usize]).unwrap();
                first += n;
            }
            prop_assert_eq!(&got, want, "point {}", seq);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, .. ProptestConfig::default() })]
    /// Thinning: any subset of points (the newest always kept) is pruned, `gc_undo` removes what
    /// no retained point needs, and every retained point still reads exactly.
    #[test]
    fn thinning_any_points_keeps_the_others_exact(
        pages in 1u64..120,
        writes in prop::collection::vec(prop::collection::vec((0u64..120, 0u8..6), 0..30), 2..12),
        keep_mask in prop::collection::vec(any::<bool>(), 12),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open_or_create(dir.path(), pages * 65536).unwrap();
        let mut model = vec![ZERO_DIGEST; pages as usize];
        let mut snapshots: BTreeMap<u64, Vec<Digest>> = BTreeMap::new();
        let n = writes.len() as u64;
        for (i, w) in writes.iter().enumerate() {
            let seq = i as u64 + 1;
            r.reset_pending().unwrap();
            for (p, v) in w {
                let p = p % pages;
                r.record(p, &d(*v)).unwrap();
                model[p as usize] = d(*v);
            }
            r.prepare(seq).unwrap();
            r.apply_redo(seq).unwrap();
            snapshots.insert(seq, model.clone());
        }
        let keep: Vec<u64> = (1..=n).filter(|s| *s == n || keep_mask[*s as usize - 1]).collect();
        r.gc_undo(&keep, None).unwrap();
        for seq in &keep {
            let mut rd = ferry_store::readers::LiveReader::open(dir.path(), *seq).unwrap();
            let mut got = vec![ZERO_DIGEST; pages as usize];
            rd.read(0, &mut got).unwrap();
            prop_assert_eq!(&got, &snapshots[seq], "point {} of kept {:?}", seq, keep);
        }
        // Undos older than the oldest kept point are gone (the space is reclaimed).
        let oldest = keep[0];
        let left: Vec<u64> = std::fs::read_dir(dir.path().join("undo")).unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".delta")?.parse().ok())
            .collect();
        prop_assert!(left.iter().all(|s| *s >= oldest), "{:?} left, oldest kept {}", left, oldest);
    }
}

/// One step of the writer between two window reads of a reader.
#[derive(Debug, Clone)]
enum Step {
    /// A whole commit (prepare, manifest, apply).
    Commit(Vec<(u64, u8)>),
    /// Prepare and manifest only: the reader's next window sees the undo but not the new map.
    Prepared(Vec<(u64, u8)>),
    /// Prepare, then the writer crashes and recovers: the commit never happened.
    Abandoned(Vec<(u64, u8)>),
}

fn steps(pages: u64) -> impl Strategy<Value = Vec<Step>> {
    let w = prop::collection::vec((0..pages, 0u8..6), 0..30);
    prop::collection::vec(
        prop_oneof![
            w.clone().prop_map(Step::Commit),
            w.clone().prop_map(Step::Prepared),
            w.prop_map(Step::Abandoned),
        ],
        0..20,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, .. ProptestConfig::default() })]
    /// A reader of point S (no lock) gets exactly S's page map while the writer keeps committing,
    /// preparing and abandoning commits between its window reads.
    #[test]
    fn live_reader_is_exact_while_the_writer_commits(
        pages in 1u64..200,
        before in steps(200),
        during in steps(200),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open_or_create(dir.path(), pages * 65536).unwrap();
        let mut model = vec![ZERO_DIGEST; pages as usize];
        let mut latest = 0u64;
        // A prepared, listed commit whose redo is not applied yet.
        let mut unapplied: Option<u64> = None;
        let step = |r: &mut Replica, s: &Step, latest: &mut u64, model: &mut Vec<Digest>, unapplied: &mut Option<u64>| {
            if let Some(u) = unapplied.take() {
                r.apply_redo(u).unwrap();
            }
            let (Step::Commit(w) | Step::Prepared(w) | Step::Abandoned(w)) = s;
            let seq = *latest + 1;
            r.reset_pending().unwrap();
            let mut next = model.clone();
            for (p, v) in w {
                let p = p % pages;
                r.record(p, &d(*v)).unwrap();
                next[p as usize] = d(*v);
            }
            r.prepare(seq).unwrap();
            match s {
                Step::Abandoned(_) => {
                    *r = Replica::open(dir.path()).unwrap();
                    r.recover(*latest).unwrap();
                }
                Step::Prepared(_) => {
                    *latest = seq;
                    *model = next;
                    *unapplied = Some(seq);
                }
                Step::Commit(_) => {
                    *latest = seq;
                    *model = next;
                    r.apply_redo(seq).unwrap();
                }
            }
        };
        // Point 1 first: points start at seq 1 (generation 0 is "no point yet" and has no undo).
        step(&mut r, &Step::Commit(vec![(0, 1)]), &mut latest, &mut model, &mut unapplied);
        for s in &before {
            step(&mut r, s, &mut latest, &mut model, &mut unapplied);
        }
        if let Some(u) = unapplied.take() {
            r.apply_redo(u).unwrap();
        }
        let seq = latest;
        let want = model.clone();
        let mut rd = ferry_store::readers::LiveReader::open(dir.path(), seq).unwrap();
        let mut got = vec![ZERO_DIGEST; pages as usize];
        let mut first = 0u64;
        let mut during = during.iter();
        while first < pages {
            let n = (pages - first).min(1 + first % 11);
            rd.read(first, &mut got[first as usize..(first + n) as usize]).unwrap();
            first += n;
            if let Some(s) = during.next() {
                step(&mut r, s, &mut latest, &mut model, &mut unapplied);
            }
        }
        prop_assert_eq!(&got, &want, "point {} read while the writer moved to {}", seq, latest);
    }
}

/// A damaged redo delta is refused before a single page reaches `current.map`, and a count that
/// does not fit the file (u64::MAX included) is refused at open.
#[test]
fn a_damaged_delta_is_refused_before_any_page_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open_or_create(dir.path(), 64 * 65536).unwrap();
    r.reset_pending().unwrap();
    for p in 0..10 {
        r.record(p, &d(3)).unwrap();
    }
    r.prepare(1).unwrap();
    let redo = dir.path().join("redo/1.delta");
    let good = std::fs::read(&redo).unwrap();
    let n = good.len();
    // The last entry's digest damaged: the trailer no longer matches.
    let mut bad = good.clone();
    bad[n - 40] ^= 1;
    std::fs::write(&redo, &bad).unwrap();
    assert!(ferry_store::replica::DeltaReader::open(&redo).is_err());
    assert!(r.apply_redo(1).is_err());
    let mut cur = vec![ZERO_DIGEST; 64];
    r.read_map(0, &mut cur).unwrap();
    assert!(
        cur.iter().all(|x| *x == ZERO_DIGEST),
        "pages were applied from a damaged delta"
    );
    assert_eq!(r.generation(), 0);
    // A count of u64::MAX (and any count that does not fit the file) is refused at open.
    for count in [u64::MAX, 11, 9] {
        // A well-formed header (checksum right) that lies about the count.
        let mut c = good.clone();
        c[..32].copy_from_slice(&ferry_format::delta::DeltaHeader { count }.encode());
        std::fs::write(&redo, &c).unwrap();
        assert!(
            ferry_store::replica::DeltaReader::open(&redo).is_err(),
            "count {count} accepted"
        );
    }
    std::fs::write(&redo, &good).unwrap();
    r.apply_redo(1).unwrap();
    r.read_map(0, &mut cur).unwrap();
    assert!(cur[..10].iter().all(|x| *x == d(3)));
}

/// A disk dropped from its VM whose every point was pruned: recovery with no listed point keeps the
/// replica (and the next start does not fail).
#[test]
fn recovery_of_a_replica_no_retained_point_includes() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open_or_create(dir.path(), 8 * 65536).unwrap();
    for seq in 1..=2 {
        r.reset_pending().unwrap();
        r.record(seq, &d(seq as u8)).unwrap();
        r.prepare(seq).unwrap();
        r.apply_redo(seq).unwrap();
    }
    drop(r);
    let mut r = Replica::open(dir.path()).unwrap();
    r.recover(0).unwrap();
    assert_eq!(r.generation(), 2);
    // A real inconsistency (a listed point older than the replica) is still refused.
    assert!(r.recover(1).is_err());
}

/// gc_undo keeps every undo a pinned point still needs, even of points no longer listed.
#[test]
fn gc_keeps_the_undos_of_a_pinned_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open_or_create(dir.path(), 8 * 65536).unwrap();
    let mut maps = vec![vec![ZERO_DIGEST; 8]];
    for seq in 1..=4u64 {
        r.reset_pending().unwrap();
        let mut m = maps.last().unwrap().clone();
        for p in 0..8 {
            r.record(p, &d(seq as u8 * 10 + p as u8)).unwrap();
            m[p as usize] = d(seq as u8 * 10 + p as u8);
        }
        r.prepare(seq).unwrap();
        r.apply_redo(seq).unwrap();
        maps.push(m);
    }
    // Points 1..3 were unlisted by retention, but a reader pinned point 2 just before.
    r.gc_undo(&[4], Some(2)).unwrap();
    let undo = |s: u64| dir.path().join(format!("undo/{s}.delta")).exists();
    assert!(!undo(1) && undo(2) && undo(3));
    let mut rd = ferry_store::readers::LiveReader::open(dir.path(), 2).unwrap();
    let mut got = vec![ZERO_DIGEST; 8];
    rd.read(0, &mut got).unwrap();
    assert_eq!(got, maps[2]);
    // Without the pin they go.
    r.gc_undo(&[4], None).unwrap();
    assert!(!undo(2) && !undo(3));
}
