//! A source file cut short while it is scanned fails the scan (its own binary: the sparse test
//! counts the process's reads).

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;

use common::pattern;
use ferry_crypto::{MasterKey, ZERO_DIGEST};
use ferry_scan::{scan, Source, BLOCK_SIZE};

/// A source file cut short while it is scanned fails the scan, naming the shrink: the bytes that
/// are gone are neither read as zeros (SEEK_DATA past the end answers "no more data") nor kept.
#[test]
fn a_source_that_shrinks_during_the_scan_fails_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shrinks.img");
    // 256 MiB of data: more blocks than the scan reads ahead, so it reads past the cut.
    let f = std::fs::File::create(&path).unwrap();
    for i in 0..64u64 {
        f.write_all_at(&pattern(BLOCK_SIZE, i + 10), i * BLOCK_SIZE as u64)
            .unwrap();
    }
    drop(f);
    let key = MasterKey::from_bytes(&[5; 32], "k");
    let stop = AtomicBool::new(false);
    let src = Source::open(&path).unwrap();
    let mut cut = false;
    let r = scan(
        &src,
        &key,
        2,
        |_, old| {
            old.fill(ZERO_DIGEST);
            Ok(())
        },
        |_| {
            if !cut {
                cut = true;
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(16 << 20).unwrap();
            }
            Ok(())
        },
        |_| {},
        &stop,
    );
    match r {
        Err(e @ ferry_scan::ScanError::Shrank { .. }) => {
            assert!(e.to_string().contains("shrank during the scan"), "{e}")
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a scan of a source cut to 16 MiB of 256 MiB succeeded"),
    }
}
