//! Page-blob operations, snapshots and server-side copy against a real Azurite.

mod common;

use common::{pattern, setup};
use ferry_azure::AzureError;

const MIB: u64 = 1024 * 1024;

/// Apply `(offset, data)` writes to an in-memory model of the blob.
fn apply(model: &mut [u8], writes: &[(u64, Vec<u8>)]) {
    for (off, d) in writes {
        model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
}

#[test]
fn page_blob_write_clear_snapshot_copy() {
    let Some((_az, blobs)) = setup("pages") else {
        return;
    };
    let name = "replicas/vm1/disk0.vhd";
    let size = 16 * MIB + 512; // raw image rounded to 1 MiB + VHD footer
    blobs.create_page_blob(name, size).expect("create");
    blobs
        .create_page_blob(name, size)
        .expect("create again is a no-op");
    match blobs.create_page_blob(name, 8 * MIB) {
        Err(AzureError::SizeMismatch {
            existing, wanted, ..
        }) => {
            assert_eq!((existing, wanted), (size, 8 * MIB));
        }
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
    assert!(matches!(
        blobs.create_page_blob("odd", 1000),
        Err(AzureError::InvalidArgument { .. })
    ));
    blobs
        .put_block_blob("a-block-blob", vec![0; 512])
        .expect("put");
    let e = blobs
        .create_page_blob("a-block-blob", 512)
        .expect_err("type clash");
    assert!(e.to_string().contains("not a page blob"), "{e}");
    assert_eq!(blobs.blob_size(name).expect("size"), Some(size));

    // Unaligned input is refused before anything is sent.
    let before = blobs.stats().requests;
    let e = blobs
        .put_pages_many(name, vec![(0, vec![1; 512]), (1024, vec![2; 100])])
        .expect_err("unaligned");
    assert!(matches!(e, AzureError::InvalidArgument { .. }), "{e:?}");
    assert!(e.to_string().contains("512-byte aligned"), "{e}");
    let e = blobs
        .put_pages(name, 100, vec![0; 512])
        .expect_err("unaligned offset");
    assert!(e.is_permanent());
    let e = blobs
        .put_pages(name, 0, vec![0; 8 * MIB as usize])
        .expect_err("too big");
    assert!(e.to_string().contains("4 MiB"), "{e}");
    assert_eq!(blobs.stats().requests, before, "nothing sent for bad input");

    // Scattered, adjacent and large (> 4 MiB) writes.
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(1, 4096)),
        (4096, pattern(2, 8192)), // adjacent: merged with the first
        (MIB, pattern(3, 6 * MIB as usize)),
        (10 * MIB, pattern(4, 512)),
        (size - 512, pattern(5, 512)), // the footer
    ];
    let mut model = vec![0u8; size as usize];
    apply(&mut model, &writes);
    blobs.put_pages_many(name, writes).expect("put_pages_many");
    blobs
        .put_pages(name, 12 * MIB, pattern(6, 1024))
        .expect("put_pages");
    apply(&mut model, &[(12 * MIB, pattern(6, 1024))]);
    let back = blobs.get_range(name, None, 0, size).expect("read back");
    assert!(back == model, "page blob content differs from the model");
    assert_eq!(
        blobs.list_page_ranges(name, None).expect("ranges"),
        vec![
            (0, 12288),
            (MIB, 7 * MIB),
            (10 * MIB, 10 * MIB + 512),
            (12 * MIB, 12 * MIB + 1024),
            (size - 512, size)
        ]
    );

    // Clear a piece in the middle of the big write.
    blobs.clear_pages(name, 2 * MIB, MIB).expect("clear");
    model[2 * MIB as usize..3 * MIB as usize].fill(0);
    let back = blobs
        .get_range(name, None, MIB, 6 * MIB)
        .expect("read back");
    assert!(back == model[MIB as usize..7 * MIB as usize], "clear_pages");
    assert!(blobs.clear_pages(name, 1, 512).is_err());

    // Snapshot, overwrite, the snapshot keeps the old bytes.
    let snap = blobs.snapshot(name).expect("snapshot");
    assert!(!snap.is_empty());
    let at_snapshot = model.clone();
    blobs
        .put_pages_many(name, vec![(0, vec![0xEE; 8192]), (MIB, vec![0xDD; 4096])])
        .expect("overwrite");
    apply(
        &mut model,
        &[(0, vec![0xEE; 8192]), (MIB, vec![0xDD; 4096])],
    );
    let old = blobs
        .get_range(name, Some(&snap), 0, 2 * MIB)
        .expect("read snapshot");
    assert!(old == at_snapshot[..2 * MIB as usize], "snapshot changed");
    let new = blobs
        .get_range(name, None, 0, 2 * MIB)
        .expect("read current");
    assert!(new == model[..2 * MIB as usize], "current blob");
    let snap_ranges = blobs
        .list_page_ranges(name, Some(&snap))
        .expect("snapshot ranges");
    assert!(snap_ranges.contains(&(size - 512, size)), "{snap_ranges:?}");

    // Server-side copy of the snapshot to a new blob.
    let dst = "restore/vm1/disk0.vhd";
    blobs.copy_from_snapshot(name, &snap, dst).expect("copy");
    assert_eq!(blobs.blob_size(dst).expect("size"), Some(size));
    let copied = blobs.get_range(dst, None, 0, size).expect("read copy");
    assert!(copied == at_snapshot, "copy differs from the snapshot");
    let e = blobs
        .copy_from_snapshot(name, "2001-01-01T00:00:00.0000000Z", "restore/none")
        .expect_err("missing snapshot");
    assert!(e.is_permanent(), "{e:?}");

    // Snapshot deletion, then the blob with its snapshots.
    blobs.delete_snapshot(name, &snap).expect("delete snapshot");
    blobs
        .delete_snapshot(name, &snap)
        .expect("again: not an error");
    assert!(blobs.get_range(name, Some(&snap), 0, 512).is_err());
    let snap2 = blobs.snapshot(name).expect("snapshot 2");
    blobs.delete_blob(name).expect("delete blob with snapshots");
    assert_eq!(blobs.blob_size(name).expect("size"), None);
    assert!(blobs
        .get_range(name, Some(&snap2), 0, 512)
        .expect_err("gone")
        .is_not_found());
    assert_eq!(blobs.stats().retries, 0);
}

#[test]
fn sas_token_works_for_pages_snapshots_and_copy() {
    common::init_tracing();
    let Some(az) = ferry_azure::azurite::Azurite::start_or_skip() else {
        return;
    };
    let sas = common::account_sas("devstoreaccount1", ferry_azure::config::AZURITE_KEY);
    // A connection string with only a SAS, as the portal hands out.
    let cs = format!("BlobEndpoint={};SharedAccessSignature={sas}", az.endpoint());
    let cfg = ferry_azure::AzureConfig::from_url_with_env("azure://devstoreaccount1/sas", |k| {
        (k == "AZURE_STORAGE_CONNECTION_STRING").then(|| cs.clone())
    })
    .expect("config");
    assert!(matches!(
        cfg.credential,
        ferry_azure::Credential::Sas { .. }
    ));
    let blobs = ferry_azure::AzureBlobs::new(cfg).expect("client");
    blobs.ensure_container().expect("container");
    blobs.create_page_blob("src", 2 * MIB).expect("create");
    let data = pattern(7, MIB as usize);
    blobs
        .put_pages_many("src", vec![(0, data.clone())])
        .expect("put");
    let snap = blobs.snapshot("src").expect("snapshot");
    blobs.put_pages("src", 0, vec![0; 4096]).expect("overwrite");
    // The copy source URL carries the SAS so the service can read it.
    blobs.copy_from_snapshot("src", &snap, "dst").expect("copy");
    assert!(blobs.get_range("dst", None, 0, MIB).expect("read") == data);
    assert_eq!(blobs.list("").expect("list").len(), 2);

    // A SAS signed with another key is refused at once.
    let bad = common::account_sas("devstoreaccount1", "d3Jvbmcga2V5");
    let cs = format!("BlobEndpoint={};SharedAccessSignature={bad}", az.endpoint());
    let cfg = ferry_azure::AzureConfig::from_url_with_env("azure://devstoreaccount1/sas", |k| {
        (k == "AZURE_STORAGE_CONNECTION_STRING").then(|| cs.clone())
    })
    .expect("config");
    let e = ferry_azure::AzureBlobs::new(cfg)
        .expect("client")
        .get_blob("dst")
        .expect_err("bad SAS");
    assert!(e.is_auth() && e.to_string().contains("SAS"), "{e}");
}
