//! Power-loss proof for the replicate commit path (cache, segments, replica deltas and page map,
//! manifest): with `ferry_durable::crashsim` recording every sync, the crash state "nothing that
//! was not synced survived" is materialized after *every* sync of four replicate runs, plus two
//! torn states while each file sync is in flight (a random mix of the file's old and new sectors:
//! writes between syncs reach the disk in any order), and on each:
//! - every point acknowledged (its run returned) before that sync is still listed,
//! - every listed point restores to exactly the bytes it records, which are bytes the disk held,
//! - recovery (the next run on that state) succeeds and its point is exact.
//!
//! Removing an fsync / fdatasync / directory fsync on these paths makes this test fail (see the
//! mutation table in the closing notes).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ferry_apply::OutputFormat;
use ferry_durable::crashsim;
use ferry_job::stores::FileJob;
use ferry_job::{NoProgress, ReplicateOptions, StoreLocation};

const DISK: u64 = 1 << 20;

fn b3(p: &Path) -> String {
    blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
}

fn options(root: &Path, disk: &Path, key: &Path) -> ReplicateOptions {
    let mut o = ReplicateOptions::new(
        vec![disk.to_owned()],
        "vm",
        vec!["disk".into()],
        StoreLocation::Local(root.join("store")),
        key.to_owned(),
        root.join("cache"),
    );
    // Small cache files: the runs rotate and consume them.
    o.cache_size = 2 << 20;
    // Group commits every 256 KiB: the scan's background syncs (`sync_behind`) run, several per
    // run, and their crash states are taken too.
    o.group_commit = 256 << 10;
    o.pipeline.threads = 2;
    o
}

/// Every listed point of the store at `root` restores exactly; returns (id, digest) of each.
fn check_points(root: &Path, key: &Path, scratch: &Path) -> Vec<(String, String)> {
    let store = root.join("store");
    let m = match ferry_store::load_manifest_at(&store, "vm") {
        Ok(Some(m)) => m,
        Ok(None) => return Vec::new(),
        Err(e) => panic!(
            "{}: manifest unreadable in a legal crash state: {e}",
            root.display()
        ),
    };
    let rec = ferry_job::open_recovery(&StoreLocation::Local(store), Some(key)).unwrap();
    let mut out = Vec::new();
    for p in &m.points {
        let dst = scratch.join("restored.img");
        let _ = fs::remove_file(&dst);
        let job = FileJob {
            vm: "vm",
            point: p,
            disk: "disk",
            out: &dst,
            format: OutputFormat::Raw,
            threads: 1,
        };
        rec.restore_to_file(&job, &|_| {})
            .unwrap_or_else(|e| panic!("{}: point {} does not restore: {e}", root.display(), p.id));
        let got = b3(&dst);
        assert_eq!(
            got,
            p.disks[0].blake3,
            "{}: point {} restores other bytes than it records",
            root.display(),
            p.id
        );
        out.push((p.id.clone(), got));
    }
    out
}

#[test]
fn every_crash_state_of_four_runs_keeps_acked_points_and_recovers_exactly() {
    let dir = tempfile::Builder::new()
        .prefix("ferry-crashsim-")
        .tempdir_in(std::env::var_os("FERRY_TEST_DIR").unwrap_or_else(|| "/var/tmp".into()))
        .unwrap();
    let root = dir.path().join("root");
    let key = dir.path().join("master.key");
    ferry_crypto::MasterKey::create(&key).unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; DISK as usize]).unwrap();

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let states = {
        let acked = acked.clone();
        crashsim::take_states(&root, &dir.path().join("crashes"), 2, move || {
            acked.lock().unwrap().clone()
        })
        .unwrap()
    };
    let mut versions = HashSet::new();
    let mut seed = 7u64;
    for run in 0..4 {
        // Change some 4 KiB blocks (the first run: about half the disk).
        let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        let blocks = if run == 0 { 128 } else { 6 };
        for _ in 0..blocks {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = (seed >> 33) % (DISK / 4096) * 4096;
            f.write_all_at(&[(seed >> 24) as u8 | 1; 4096], at).unwrap();
        }
        drop(f);
        versions.insert(b3(&disk));
        let r = ferry_job::replicate_once(
            &options(&root, &disk, &key),
            &NoProgress,
            &AtomicBool::new(false),
        )
        .unwrap();
        acked.lock().unwrap().push(r.point.expect("a point").id);
    }
    let taken = crashsim::finish(&states);
    assert!(taken.len() > 40, "only {} syncs recorded", taken.len());
    let torn = taken
        .iter()
        .filter(|(p, _)| p.to_string_lossy().contains("-torn"))
        .count();
    assert!(torn >= 10, "only {torn} torn states taken");
    let scratch = dir.path().join("scratch");
    fs::create_dir_all(&scratch).unwrap();
    let mut points_checked = 0;
    for (state, acked) in &taken {
        let listed = check_points(state, &key, &scratch);
        points_checked += listed.len();
        for id in acked {
            assert!(
                listed.iter().any(|(l, _)| l == id),
                "{}: acknowledged point {id} is gone: {listed:?}",
                state.display()
            );
        }
        for (id, digest) in &listed {
            assert!(
                versions.contains(digest),
                "{}: point {id} holds bytes the disk never had",
                state.display()
            );
        }
        // Recovery on this state never fails, and the next run is exact.
        let r = ferry_job::replicate_once(
            &options(state, &disk, &key),
            &NoProgress,
            &AtomicBool::new(false),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{}: recovery failed on a legal crash state: {e}",
                state.display()
            )
        });
        let p = r.point.expect("a point");
        assert_eq!(p.disks[0].blake3, b3(&disk));
        let after = check_points(state, &key, &scratch);
        assert!(after.iter().any(|(id, _)| *id == p.id));
        fs::remove_dir_all(state).unwrap();
    }
    eprintln!(
        "crashsim: {} crash states ({torn} of them torn), {points_checked} listed points restored exactly",
        taken.len()
    );
}
