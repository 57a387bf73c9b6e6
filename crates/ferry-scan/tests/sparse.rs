//! A sparse image is scanned by reading its data, not its holes, and the point's digest stays
//! exactly `b3sum`'s. Its own test binary: the read count is the process's (`/proc/self/io`,
//! counted by the kernel), so no other test may read files beside it.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;

use common::{data_blocks, pattern};
use ferry_crypto::{Digest, MasterKey, ZERO_DIGEST};
use ferry_format::CHUNK_SIZE;
use ferry_scan::{scan, Change, Source, BLOCK_SIZE};

/// Bytes this process has read through read(2)/pread(2) so far (the kernel's count).
fn rchar() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .expect("rchar line")
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn a_sparse_image_reads_its_data_not_its_holes_and_digests_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    // 4 GiB and an odd tail; data in four places, one of them explicit zeros (an allocated extent
    // that must be read, and then sent as a zero range, not data).
    let size: u64 = (4 << 30) + 12_345;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let regions: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(3 << 20, 1)),
        ((1 << 30) + 100_000, pattern(6 << 20, 2)), // unaligned, across blocks
        (3 << 30, vec![0u8; 2 << 20]),              // written zeros
        (size - 5_000, pattern(5_000, 3)),          // the tail
    ];
    for (off, data) in &regions {
        f.write_all_at(data, *off).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    // The blocks holding data: what must be read, and no more.
    let data_blocks = data_blocks(&regions);
    let data_block_bytes: u64 = data_blocks
        .iter()
        .map(|b| (size - b * BLOCK_SIZE as u64).min(BLOCK_SIZE as u64))
        .sum();

    let key = MasterKey::from_bytes(&[5; 32], "k");
    let stop = AtomicBool::new(false);
    let mut writes: Vec<(u64, Digest, Vec<u8>)> = Vec::new();
    let mut zeros = 0u64;
    let before = rchar();
    let src = Source::open(&path).unwrap();
    let r = scan(
        &src,
        &key,
        2,
        |_, old| {
            old.fill(pattern_digest_of_garbage());
            Ok(())
        },
        |c| {
            match c {
                Change::Write {
                    offset,
                    digest,
                    data,
                } => writes.push((offset, digest, data)),
                Change::Zero { len, .. } => zeros += len,
            }
            Ok(())
        },
        |_| {},
        &stop,
    )
    .unwrap();
    let read = rchar() - before;
    drop(src);

    // Read: the data blocks (and a few bytes of /proc), not the 4 GiB.
    assert!(
        read >= data_block_bytes && read < data_block_bytes + (1 << 20),
        "read {read} bytes; the blocks holding data are {data_block_bytes} bytes of {size}"
    );
    assert_eq!(r.bytes_read, size);
    assert_eq!(r.hole_bytes, size - data_block_bytes);

    // The digest: b3sum's, hashed here from the whole file as read(2) gives it.
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(&path).unwrap())
        .unwrap();
    assert_eq!(r.blake3, *h.finalize().as_bytes(), "whole-source digest");

    // The changes: every non-zero chunk as data with its keyed digest, everything else zero
    // (against a map that held something else everywhere).
    let mut image = std::collections::BTreeMap::new();
    for (off, data) in &regions {
        for (i, b) in data.iter().enumerate() {
            image.insert(off + i as u64, *b);
        }
    }
    let chunk_of = |c: u64| -> Vec<u8> {
        let start = c * CHUNK_SIZE as u64;
        let end = (start + CHUNK_SIZE as u64).min(size);
        let mut v = vec![0u8; (end - start) as usize];
        for (o, b) in image.range(start..end) {
            v[(o - start) as usize] = *b;
        }
        v
    };
    let mut expected = Vec::new();
    let chunks = size.div_ceil(CHUNK_SIZE as u64);
    let nonzero_chunks: std::collections::BTreeSet<u64> = image
        .iter()
        .filter(|(_, b)| **b != 0)
        .map(|(o, _)| o / CHUNK_SIZE as u64)
        .collect();
    for c in nonzero_chunks {
        let data = chunk_of(c);
        expected.push((c * CHUNK_SIZE as u64, key.digest(&data), data));
    }
    assert_eq!(writes.len(), expected.len());
    assert!(writes == expected, "the written chunks differ");
    let written: u64 = writes.iter().map(|w| w.2.len() as u64).sum();
    assert_eq!(
        zeros + written,
        size,
        "every chunk was sent, as data or zero"
    );
    assert_eq!(r.chunks, chunks);
    println!(
        "sparse: {} of {} read ({} in holes not read), {} data chunks",
        read,
        size,
        r.hole_bytes,
        writes.len()
    );
}

/// A digest no chunk has, so every chunk of the image counts as changed.
fn pattern_digest_of_garbage() -> Digest {
    let mut d = ZERO_DIGEST;
    d[0] = 0x5a;
    d
}
