//! Helpers shared by the integration tests: test data, a reference reader, loop devices.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_read::{ChunkReader, ReadError, ReadStats, CHUNK_SIZE, MAX_EXTENT};

/// Deterministic pseudo-random bytes (xorshift64*), so a failing case can be replayed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A temporary file with `data` in it, in `dir`.
pub fn temp_file_in(dir: &Path, data: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix("ferry-read-test-")
        .tempfile_in(dir)
        .expect("create a temporary file");
    file.write_all(data).expect("write the temporary file");
    file.as_file().sync_all().expect("sync the temporary file");
    file
}

/// What a plain read says chunk `index` of `data` is.
pub fn expected_chunk(data: &[u8], index: u64) -> &[u8] {
    let start = (index * CHUNK_SIZE) as usize;
    let end = (start + CHUNK_SIZE as usize).min(data.len());
    &data[start..end]
}

/// The I/O count the reader must report: each run of consecutive chunks in ≤ 1 MiB pieces.
pub fn expected_ios(chunks: &[u64]) -> u64 {
    let per_io = MAX_EXTENT / CHUNK_SIZE;
    let mut ios = 0;
    let mut run = 0;
    for (i, &c) in chunks.iter().enumerate() {
        if i > 0 && chunks[i - 1] + 1 == c {
            run += 1;
        } else {
            ios += 1;
            run = 1;
        }
        if run > per_io {
            ios += 1;
            run = 1;
        }
    }
    ios
}

/// Reads `chunks` and checks every delivery against `data`, the order, the counts and the stats.
pub fn read_and_check(reader: &mut ChunkReader, data: &[u8], chunks: &[u64]) -> ReadStats {
    let mut seen = Vec::with_capacity(chunks.len());
    let stats = reader
        .read_chunks(chunks, |index, got| {
            if got != expected_chunk(data, index) {
                return Err(format!("chunk {index}: contents differ from a plain read"));
            }
            seen.push(index);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("read of {} chunks: {e}", chunks.len()));
    assert_eq!(seen, chunks, "chunks delivered once each, in order");
    let bytes: u64 = chunks
        .iter()
        .map(|&i| expected_chunk(data, i).len() as u64)
        .sum();
    assert_eq!(
        stats,
        ReadStats {
            ios: expected_ios(chunks),
            bytes,
            hole_bytes: 0,
        }
    );
    stats
}

/// Whether an error is the sink's, carrying `msg`.
pub fn is_sink_error(e: &ReadError, msg: &str) -> bool {
    matches!(e, ReadError::Sink(m) if m == msg)
}

/// Says why the loop-device tests cannot run here, and returns true to skip; with
/// `FERRY_REQUIRE_EBPF=1` (CI machines known to have everything) a reason is a failure instead.
pub fn skip(test: &str, why: Option<String>) -> bool {
    let Some(why) = why else {
        return false;
    };
    ferry_testkit::skip(
        test,
        &format!("{why} (O_DIRECT on a real block device NOT tested here)"),
        "FERRY_REQUIRE_EBPF",
    );
    true
}

/// Why loop devices cannot be used here, if they cannot.
pub fn loop_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (loop devices need root)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no loop devices (/dev/loop-control missing)".into());
    }
    None
}

/// A loop device over a file (`ferry_testkit::loopdev`), detached on drop.
pub struct Loop {
    pub dev: PathBuf,
    _lo: ferry_testkit::loopdev::Loop,
}

impl Loop {
    /// Attaches `file` with logical blocks of `sector_size` bytes.
    pub fn attach(file: &Path, sector_size: u32) -> Result<Loop, String> {
        let lo = ferry_testkit::loopdev::Loop::attach_with(
            file,
            &ferry_testkit::loopdev::LoopOptions {
                sector_size: Some(sector_size),
                ..Default::default()
            },
        )?;
        Ok(Loop {
            dev: lo.dev.clone(),
            _lo: lo,
        })
    }
}
