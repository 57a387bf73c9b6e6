//! A VM whose migration was completed (`ferry_apply::lifecycle`) never comes back: records of it
//! still in a cache (the server was stopped when `ferry complete-migration` removed its data) are
//! consumed unapplied, and a new pipeline (a restart) does not replay what is left of its journal
//! (segments another VM's deduplicated data uses). Real cache, real store, real applier.

use ferry_apply::lifecycle::{self, Lifecycle};
use ferry_cache::{Cache, CacheConfig};
use ferry_crypto::MasterKey;
use ferry_format::cache::CacheEntry;
use ferry_format::segment::{DiskCut, PointKind, PointTag};
use ferry_pipeline::{Pipeline, PipelineConfig};
use ferry_store::LocalStore;

const CHUNK: usize = ferry_format::CHUNK_SIZE;
const SIZE: u64 = 4 * CHUNK as u64;

fn run_entries(key: &MasterKey, vm: &str, run: u8, data: &[u8]) -> Vec<CacheEntry> {
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
            offset: 0,
            digest: key.digest(data),
            data: data.to_vec(),
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

fn drain(store: &LocalStore, cache: &Cache) -> Vec<String> {
    let cfg = PipelineConfig {
        threads: 1,
        ..PipelineConfig::default()
    };
    let mut p = Pipeline::new(store, cfg).unwrap();
    let mut reader = cache.reader();
    p.drain(cache, &mut reader, true).unwrap();
    p.take_committed().into_iter().map(|c| c.vm).collect()
}

#[test]
fn a_retired_vm_is_neither_applied_from_the_cache_nor_replayed_from_its_kept_journal() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::from_bytes(&[7; 32], d.path().join("key"));
    let store = LocalStore::open(&d.path().join("store"), key.clone(), true).unwrap();
    let cfg = CacheConfig {
        dir: d.path().join("cache"),
        quota: 64 << 20,
        file_size: 8 << 20,
    };
    let (cache, _) = Cache::open(cfg.clone(), key.clone()).unwrap();
    // "old" first, then "new" with the same chunk: deduplicated into old's segment.
    let shared = vec![0x5a; CHUNK];
    append(&cache, &run_entries(&key, "old", 1, &shared));
    append(&cache, &run_entries(&key, "new", 1, &shared));
    assert_eq!(drain(&store, &cache), ["old", "new"]);

    // old's migration completes with no server running, while the cache still holds a run of it.
    append(&cache, &run_entries(&key, "old", 2, &[0x11; CHUNK]));
    lifecycle::save(store.root(), &Lifecycle::new("old", lifecycle::RETIRING)).unwrap();
    let removed = {
        let _lock = store.lock().unwrap();
        lifecycle::retire(&store, "old").unwrap()
    };
    assert_eq!(removed.points, 1);
    assert_eq!(
        removed.segments_kept, 1,
        "new's chunk lives in old's segment"
    );
    assert!(store.load_manifest("old").unwrap().is_none());

    // A restart: the cached run of old is consumed, nothing of old is applied or replayed.
    drop(cache);
    let (cache, _) = Cache::open(cfg, key.clone()).unwrap();
    append(&cache, &run_entries(&key, "new", 2, &[0x22; CHUNK]));
    assert_eq!(drain(&store, &cache), ["new"]);
    assert!(
        store.load_manifest("old").unwrap().is_none(),
        "old came back"
    );
    assert_eq!(cache.backlog(), 0, "old's cached records are consumed");
    assert_eq!(
        store.list_segments("old", "os").unwrap().len(),
        1,
        "nothing of old was written to the journal again"
    );
    // new's first point still reads its chunk from old's kept segment.
    let m = store.load_manifest("new").unwrap().unwrap();
    assert_eq!(m.points.len(), 2);
    let loc = {
        let _lock = store.lock().unwrap();
        store
            .open_index()
            .unwrap()
            .lookup(&key.digest(&shared))
            .unwrap()
            .expect("the shared chunk is indexed")
    };
    assert!(loc.segment.starts_with("journal/old/"), "{}", loc.segment);
    assert_eq!(store.read_chunk(&loc).unwrap(), shared);
    let r = lifecycle::load(store.root(), "old").unwrap().unwrap();
    assert_eq!(r.state, lifecycle::RETIRED);

    // A record that cannot be read (damaged, from a newer Ferry) decides nothing: the VM's
    // records are applied as before, nothing of it is dropped.
    std::fs::write(lifecycle::dir(store.root()).join("new.json"), b"{ not json").unwrap();
    assert!(lifecycle::is_retired(store.root(), "new").is_err());
    append(&cache, &run_entries(&key, "new", 3, &[0x33; CHUNK]));
    assert_eq!(drain(&store, &cache), ["new"]);
    assert_eq!(store.load_manifest("new").unwrap().unwrap().points.len(), 3);
}
