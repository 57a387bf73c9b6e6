//! Container and block-blob operations against a real Azurite.

mod common;

use common::{pattern, setup};
use ferry_azure::azurite::Azurite;
use ferry_azure::{AzureBlobs, AzureConfig};

#[test]
fn block_blob_put_get_range_list_delete() {
    let Some((_az, blobs)) = setup("blocks") else {
        return;
    };
    // Idempotent.
    blobs.ensure_container().expect("second ensure_container");

    let seg = pattern(1, 1 << 20);
    let manifest = br#"{"vm":"vm1","points":[]}"#.to_vec();
    blobs
        .put_block_blob("journal/vm1/disk0/000001.seg", seg.clone())
        .expect("put seg");
    blobs
        .put_block_blob("journal/vm1/disk0/000002.seg", pattern(2, 4096))
        .expect("put seg 2");
    blobs
        .put_block_blob("manifests/vm1.json", manifest.clone())
        .expect("put manifest");
    blobs
        .put_block_blob("empty", Vec::new())
        .expect("put empty");

    assert_eq!(
        blobs.get_blob("journal/vm1/disk0/000001.seg").expect("get"),
        Some(seg.clone())
    );
    assert_eq!(
        blobs.get_blob("manifests/vm1.json").expect("get"),
        Some(manifest.clone())
    );
    assert_eq!(
        blobs.get_blob("empty").expect("get empty"),
        Some(Vec::new())
    );
    assert_eq!(blobs.get_blob("missing").expect("get missing"), None);

    let r = blobs
        .get_range("journal/vm1/disk0/000001.seg", None, 1000, 5000)
        .expect("range");
    assert_eq!(r, seg[1000..6000]);
    // A range running past the end is cut short.
    let tail = blobs
        .get_range("journal/vm1/disk0/000001.seg", None, (1 << 20) - 10, 100)
        .expect("tail");
    assert_eq!(tail, seg[(1 << 20) - 10..]);

    // Replace.
    blobs
        .put_block_blob("manifests/vm1.json", b"{}".to_vec())
        .expect("replace");
    assert_eq!(
        blobs.get_blob("manifests/vm1.json").expect("get"),
        Some(b"{}".to_vec())
    );

    assert_eq!(
        blobs.list("journal/").expect("list"),
        vec![
            ("journal/vm1/disk0/000001.seg".to_string(), 1 << 20),
            ("journal/vm1/disk0/000002.seg".to_string(), 4096),
        ]
    );
    assert_eq!(blobs.list("").expect("list all").len(), 4);
    assert_eq!(blobs.list("nothing/").expect("list none"), vec![]);
    assert_eq!(
        blobs
            .blob_size("journal/vm1/disk0/000002.seg")
            .expect("size"),
        Some(4096)
    );
    assert_eq!(blobs.blob_size("missing").expect("size"), None);

    blobs
        .delete_blob("journal/vm1/disk0/000001.seg")
        .expect("delete");
    blobs
        .delete_blob("journal/vm1/disk0/000001.seg")
        .expect("deleting a missing blob is fine");
    assert_eq!(
        blobs.get_blob("journal/vm1/disk0/000001.seg").expect("get"),
        None
    );
    assert_eq!(blobs.list("journal/").expect("list").len(), 1);

    let s = blobs.stats();
    assert!(s.requests > 10, "{s:?}");
    assert!(s.bytes_sent >= (1 << 20) + 4096, "{s:?}");
    assert!(s.bytes_received >= (1 << 20), "{s:?}");
    assert_eq!(s.retries, 0, "{s:?}");
}

#[test]
fn list_follows_every_page() {
    let Some((az, _)) = setup("paging") else {
        return;
    };
    let mut cfg = az.config("paging");
    cfg.tuning.list_page_size = Some(2);
    let blobs = AzureBlobs::new(cfg).expect("client");
    let mut want = Vec::new();
    for i in 0..7 {
        let name = format!("journal/vm/d/{i:06}.seg");
        blobs
            .put_block_blob(&name, vec![i as u8; i * 10])
            .expect("put");
        want.push((name, (i * 10) as u64));
    }
    blobs.put_block_blob("other", vec![1]).expect("put");
    let before = blobs.stats().requests;
    assert_eq!(blobs.list("journal/").expect("list"), want);
    assert!(
        blobs.stats().requests - before >= 4,
        "7 blobs at 2 per page need 4 requests"
    );
}

#[test]
fn large_block_blob_goes_up_in_blocks() {
    let Some((_az, blobs)) = setup("large") else {
        return;
    };
    // Above the single-request limit (64 MiB): staged blocks + commit.
    let data = pattern(9, 65 * 1024 * 1024 + 123);
    blobs
        .put_block_blob("journal/big.seg", data.clone())
        .expect("put");
    assert_eq!(
        blobs.blob_size("journal/big.seg").expect("size"),
        Some(data.len() as u64)
    );
    let back = blobs
        .get_blob("journal/big.seg")
        .expect("get")
        .expect("exists");
    assert!(back == data, "large blob differs");
}

#[test]
fn connection_string_from_environment_works() {
    common::init_tracing();
    let Some(az) = Azurite::start_or_skip() else {
        return;
    };
    let cs = az.connection_string();
    let cfg = AzureConfig::from_url_with_env("azure://devstoreaccount1/fromenv", |k| {
        (k == "AZURE_STORAGE_CONNECTION_STRING").then(|| cs.clone())
    })
    .expect("config");
    assert_eq!(cfg.endpoint, az.endpoint());
    let blobs = AzureBlobs::new(cfg).expect("client");
    blobs.ensure_container().expect("container");
    blobs.put_block_blob("a/b", b"hello".to_vec()).expect("put");
    assert_eq!(blobs.get_blob("a/b").expect("get"), Some(b"hello".to_vec()));
}

/// A marker is created once: a second create (another process racing, or a retry) leaves the
/// first content in place and says so; many threads racing: exactly one wins.
#[test]
fn create_block_blob_creates_once_and_exactly_one_racer_wins() {
    let Some((_az, blobs)) = setup("create-once") else {
        return;
    };
    assert!(blobs.create_block_blob("m1", b"first".to_vec()).unwrap());
    assert!(!blobs.create_block_blob("m1", b"second".to_vec()).unwrap());
    assert_eq!(blobs.get_blob("m1").unwrap(), Some(b"first".to_vec()));
    let blobs = std::sync::Arc::new(blobs);
    let wins: Vec<bool> = (0..8u8)
        .map(|i| {
            let b = blobs.clone();
            std::thread::spawn(move || b.create_block_blob("m2", vec![i; 16]).unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{wins:?}");
    let winner = wins.iter().position(|w| *w).unwrap() as u8;
    assert_eq!(blobs.get_blob("m2").unwrap(), Some(vec![winner; 16]));
}
