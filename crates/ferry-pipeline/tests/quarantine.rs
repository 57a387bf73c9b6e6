//! A VM whose cached data the applier cannot take is quarantined; every other VM goes on, the
//! pipeline keeps running, a new pipeline (a restart) neither trips over the data again nor
//! releases the VM, and a release voids the VM's unapplied journal and lets it replicate again.
//! Real cache, real store, real applier.

use std::sync::Arc;

use ferry_apply::quarantine::{self, Quarantines};
use ferry_cache::{Cache, CacheConfig};
use ferry_crypto::MasterKey;
use ferry_format::cache::CacheEntry;
use ferry_format::segment::{DiskCut, PointKind, PointTag};
use ferry_pipeline::{Pipeline, PipelineConfig};
use ferry_store::LocalStore;

const CHUNK: usize = ferry_format::CHUNK_SIZE;
const SIZE: u64 = 4 * CHUNK as u64;

fn run_entries(key: &MasterKey, vm: &str, run: u8, offset: u64) -> Vec<CacheEntry> {
    let data = vec![run ^ vm.len() as u8; CHUNK];
    vec![
        CacheEntry::Begin {
            vm: vm.into(),
            run: [run; 16],
            time_ns: 1_000 + run as u64,
            disks: vec![("os".into(), SIZE)],
        },
        CacheEntry::Write {
            vm: vm.into(),
            disk: "os".into(),
            offset,
            digest: key.digest(&data),
            data,
        },
        CacheEntry::Tag {
            vm: vm.into(),
            tag: PointTag {
                run: [run; 16],
                time_ns: 2_000 + run as u64,
                kind: PointKind::Crash,
                disks: vec![DiskCut {
                    name: "os".into(),
                    size: SIZE,
                    blake3: [0; 32],
                }],
            },
        },
    ]
}

fn append(cache: &Cache, entries: &[CacheEntry]) {
    let mut w = cache.writer().unwrap();
    for e in entries {
        w.append(e).unwrap();
    }
    w.sync().unwrap();
}

fn drain(store: &LocalStore, cache: &Cache, q: &Arc<Quarantines>) -> Vec<String> {
    let cfg = PipelineConfig {
        threads: 1,
        quarantine: Some(q.clone()),
        ..PipelineConfig::default()
    };
    let mut p = Pipeline::new(store, cfg).unwrap();
    let mut reader = cache.reader();
    p.drain(cache, &mut reader, true).unwrap();
    p.take_committed().into_iter().map(|c| c.vm).collect()
}

#[test]
fn a_bad_record_quarantines_its_vm_only_and_a_release_lets_it_go_on() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::from_bytes(&[7; 32], d.path().join("key"));
    let store = LocalStore::open(&d.path().join("store"), key.clone(), true).unwrap();
    let cfg = CacheConfig {
        dir: d.path().join("cache"),
        quota: 64 << 20,
        file_size: 8 << 20,
    };
    let (cache, _) = Cache::open(cfg.clone(), key.clone()).unwrap();
    let q = Arc::new(Quarantines::load(store.root()).unwrap());

    // One good run each, then "bad" sends a write off the chunk grid; "good" goes on after it.
    append(&cache, &run_entries(&key, "good", 1, 0));
    append(&cache, &run_entries(&key, "bad", 1, 0));
    let mut bad_run = run_entries(&key, "bad", 2, 0);
    if let CacheEntry::Write { offset, .. } = &mut bad_run[1] {
        *offset = 512;
    }
    append(&cache, &bad_run);
    append(&cache, &run_entries(&key, "bad", 3, CHUNK as u64));
    append(&cache, &run_entries(&key, "good", 2, CHUNK as u64));

    let committed = drain(&store, &cache, &q);
    assert_eq!(committed, ["good", "bad", "good"], "points in cache order");
    assert!(q.contains("bad") && !q.contains("good"));
    let reason = &q.all()["bad"].reason;
    assert!(reason.contains("offset 512"), "{reason}");
    let bad = store.load_manifest("bad").unwrap().unwrap();
    assert_eq!(
        bad.points.len(),
        1,
        "nothing after the bad record is a point"
    );
    assert_eq!(
        store.load_manifest("good").unwrap().unwrap().points.len(),
        2
    );
    assert_eq!(
        cache.backlog(),
        0,
        "the quarantined VM's records are consumed"
    );

    // Its uncommitted journal rots on disk: retention (prune and garbage collection) still works
    // for everyone else instead of failing on it.
    let last = *store.list_segments("bad", "os").unwrap().last().unwrap();
    let seg = store
        .root()
        .join(LocalStore::segment_path("bad", "os", last));
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 8] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let pruned = ferry_apply::retention::prune(&store, std::time::Duration::from_secs(1)).unwrap();
    assert_eq!(pruned.points.len(), 1, "good's older point: {pruned:?}");
    assert!(seg.exists(), "an unreadable segment is kept");

    // A restart: the record holds, nothing fails, nothing more of "bad" is applied.
    drop(cache);
    let (cache, _) = Cache::open(cfg.clone(), key.clone()).unwrap();
    let q = Arc::new(Quarantines::load(store.root()).unwrap());
    assert!(q.contains("bad"));
    assert!(drain(&store, &cache, &q).is_empty());
    // Records of the quarantined VM last in the cache are consumed too (nothing else comes after
    // them to carry the position: a release waits for exactly this).
    append(&cache, &run_entries(&key, "bad", 5, 0));
    assert!(drain(&store, &cache, &q).is_empty());
    assert_eq!(
        cache.backlog(),
        0,
        "skipped records at the tail are consumed"
    );

    // The release: the applier voids the unapplied journal; then the VM replicates again.
    quarantine::request_release(store.root(), "bad").unwrap();
    assert_eq!(q.releases_requested(), ["bad".to_string()]);
    let cfg_p = PipelineConfig {
        threads: 1,
        quarantine: Some(q.clone()),
        ..PipelineConfig::default()
    };
    {
        let mut p = Pipeline::new(&store, cfg_p).unwrap();
        p.applier().release("bad").unwrap();
    }
    q.remove("bad").unwrap();
    let m = store.load_manifest("bad").unwrap().unwrap();
    let next = store.list_segments("bad", "os").unwrap().last().unwrap() + 1;
    assert_eq!(
        m.disks["os"].applied.segment, next,
        "applied moved past the journal"
    );
    assert_eq!(m.disks["os"].known_size(), Some(SIZE), "its size is kept");
    append(&cache, &run_entries(&key, "bad", 4, 2 * CHUNK as u64));
    assert_eq!(drain(&store, &cache, &q), ["bad"]);
    let m = store.load_manifest("bad").unwrap().unwrap();
    assert_eq!(m.points.len(), 2);
    assert_eq!(m.points[1].run, hex::encode([4u8; 16]));
    assert!(quarantine::list(store.root()).unwrap().is_empty());
}

#[test]
fn without_quarantine_a_bad_record_still_fails_the_pipeline() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::from_bytes(&[7; 32], d.path().join("key"));
    let store = LocalStore::open(&d.path().join("store"), key.clone(), true).unwrap();
    let (cache, _) = Cache::open(
        CacheConfig {
            dir: d.path().join("cache"),
            quota: 64 << 20,
            file_size: 8 << 20,
        },
        key.clone(),
    )
    .unwrap();
    let mut bad = run_entries(&key, "bad", 1, 0);
    if let CacheEntry::Write { offset, .. } = &mut bad[1] {
        *offset = 512;
    }
    append(&cache, &bad);
    let cfg = PipelineConfig {
        threads: 1,
        ..PipelineConfig::default()
    };
    let mut p = Pipeline::new(&store, cfg).unwrap();
    let mut reader = cache.reader();
    let e = p.drain(&cache, &mut reader, true).unwrap_err();
    assert!(e.to_string().contains("offset 512"), "{e}");
}
