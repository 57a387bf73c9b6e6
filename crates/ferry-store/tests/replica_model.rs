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
            let mut rd = r.point_reader(*seq).unwrap();
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
