//! The reader on regular files: random contents and chunk sets against a plain read, coalescing,
//! sink errors, bad requests. Runs in whatever mode this machine gives (printed once).

mod common;

use std::path::Path;
use std::sync::Once;

use common::*;
use ferry_read::{ChunkReader, ReadError, ReadStats, CHUNK_SIZE, MAX_EXTENT};
use proptest::prelude::*;

/// Not tmpfs, so O_DIRECT has a real filesystem under it.
const DIR: &str = "/var/tmp";

fn open(path: &Path, depth: u32) -> ChunkReader {
    let reader = ChunkReader::open(path, depth).expect("open the test file");
    static MODE: Once = Once::new();
    MODE.call_once(|| eprintln!("ferry-read on a regular file in {DIR}: {}", reader.mode()));
    reader
}

/// A file of `chunks` full chunks (the last one `tail` bytes if `tail` > 0).
fn disk(chunks: u64, tail: u64, seed: u64) -> (tempfile::NamedTempFile, Vec<u8>) {
    let size = if tail == 0 {
        chunks * CHUNK_SIZE
    } else {
        (chunks - 1) * CHUNK_SIZE + tail
    };
    let data = random_bytes(size as usize, seed);
    (temp_file_in(Path::new(DIR), &data), data)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Sizes that are and are not multiples of 64 KiB, chunk sets from sparse to complete (runs
    /// longer than 1 MiB included), depths 1..=8: every chunk matches a plain read.
    #[test]
    fn random_chunks_match_a_plain_read(
        chunks in 1u64..=40,
        tail in prop_oneof![Just(0u64), 1u64..CHUNK_SIZE],
        density in 0u8..=4,
        picks in proptest::collection::vec(0u8..4, 40),
        depth in 1u32..=8,
        seed in any::<u64>(),
    ) {
        let (file, data) = disk(chunks, tail, seed);
        let wanted: Vec<u64> = (0..chunks).filter(|&i| picks[i as usize] < density).collect();
        let mut reader = open(file.path(), depth);
        prop_assert_eq!(reader.size(), data.len() as u64);
        read_and_check(&mut reader, &data, &wanted);
        // The same reader again, with everything: buffers are reused, nothing is left over.
        let all: Vec<u64> = (0..chunks).collect();
        read_and_check(&mut reader, &data, &all);
    }
}

#[test]
fn coalescing_counts_one_io_per_one_mib_run() {
    let (file, data) = disk(100, 0, 1);
    let mut reader = open(file.path(), 4);
    let per_io = MAX_EXTENT / CHUNK_SIZE;
    // 40 in a row = 16 + 16 + 8, then a single, then 3 in a row, then exactly 16.
    let chunks: Vec<u64> = (0..40)
        .chain([50])
        .chain(52..55)
        .chain(60..60 + per_io)
        .collect();
    let stats = read_and_check(&mut reader, &data, &chunks);
    assert_eq!(stats.ios, 3 + 1 + 1 + 1);
    // Every other chunk: nothing to coalesce.
    let sparse: Vec<u64> = (0..100).step_by(2).collect();
    assert_eq!(read_and_check(&mut reader, &data, &sparse).ios, 50);
}

#[test]
fn the_short_last_chunk_is_cut_at_the_size() {
    for tail in [1, 511, 512, 4095, 4097, CHUNK_SIZE - 1] {
        let (file, data) = disk(3, tail, tail);
        let mut reader = open(file.path(), 2);
        assert_eq!(reader.size(), 2 * CHUNK_SIZE + tail);
        for chunks in [&[2][..], &[1, 2], &[0, 1, 2], &[0, 2]] {
            read_and_check(&mut reader, &data, chunks);
        }
    }
}

#[test]
fn a_sink_error_stops_the_read_and_the_reader_stays_usable() {
    let (file, data) = disk(64, 0, 2);
    let all: Vec<u64> = (0..64).collect();
    for depth in [1, 4, 16] {
        let mut reader = open(file.path(), depth);
        let mut calls = Vec::new();
        let err = reader
            .read_chunks(&all, |i, _| {
                calls.push(i);
                if i == 20 {
                    Err("sink full")
                } else {
                    Ok(())
                }
            })
            .expect_err("the sink error must stop the read");
        assert!(is_sink_error(&err, "sink full"), "got {err}");
        assert!(!err.is_permanent());
        assert_eq!(
            calls,
            (0..=20).collect::<Vec<_>>(),
            "no call after the error"
        );
        read_and_check(&mut reader, &data, &all);
    }
}

#[test]
fn a_panicking_sink_leaves_a_usable_reader() {
    let (file, data) = disk(48, 0, 3);
    let all: Vec<u64> = (0..48).collect();
    let mut reader = open(file.path(), 8);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = reader.read_chunks(&all, |i, _| {
            assert!(i < 5, "sink panics at chunk {i}");
            Ok::<(), String>(())
        });
    }));
    assert!(caught.is_err());
    read_and_check(&mut reader, &data, &all);
}

#[test]
fn bad_chunk_lists_are_refused_before_any_read() {
    let (file, _) = disk(4, 100, 4);
    let mut reader = open(file.path(), 4);
    for chunks in [&[1, 1][..], &[2, 1], &[4], &[0, 5]] {
        let mut called = false;
        let err = reader
            .read_chunks(chunks, |_, _| {
                called = true;
                Ok::<(), String>(())
            })
            .expect_err("invalid list");
        assert!(
            matches!(err, ReadError::BadChunks { .. }),
            "{chunks:?}: {err}"
        );
        assert!(err.is_permanent());
        assert!(!called);
    }
    let none = reader
        .read_chunks(&[], |_, _| Ok::<(), String>(()))
        .expect("empty list");
    assert_eq!(none, ReadStats::default());
}

#[test]
fn an_empty_file_has_no_chunks() {
    let file = temp_file_in(Path::new(DIR), &[]);
    let mut reader = open(file.path(), 4);
    assert_eq!(reader.size(), 0);
    let ok = reader.read_chunks(&[], |_, _| Ok::<(), String>(()));
    assert_eq!(ok.expect("nothing to read"), ReadStats::default());
    assert!(reader
        .read_chunks(&[0], |_, _| Ok::<(), String>(()))
        .is_err());
}

#[test]
fn a_missing_path_says_so() {
    let err = ChunkReader::open(Path::new("/nonexistent/ferry-read-disk"), 4)
        .err()
        .expect("no such file");
    assert!(matches!(err, ReadError::Open { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/ferry-read-disk"));
    assert!(err.is_permanent());
}
