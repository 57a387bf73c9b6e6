//! The dirty-chunk reader: reads chosen 64 KiB chunks of a block device, fast and without
//! polluting the page cache.
//!
//! Job: the mobility agent's tracker hands over, per disk, the ascending indexes of the 64 KiB chunks
//! written since the last cycle. [`ChunkReader::read_chunks`] reads exactly those chunks and gives
//! each one to a sink, in ascending order. Runs of consecutive chunks are coalesced into extents of
//! at most [`MAX_EXTENT`] (1 MiB, 16 chunks), and up to `depth` extents are in flight at once on an
//! io_uring, read with `O_DIRECT` into a fixed pool of `depth` aligned 1 MiB buffers: no allocation
//! per I/O, no copy through the page cache, no eviction of the guest's working set.
//!
//! Fallback: when io_uring is missing (old kernel, `ENOSYS`, seccomp `EPERM`, `io_uring_disabled`)
//! or the filesystem refuses `O_DIRECT` (`EINVAL`), the reader uses plain buffered `pread`, one
//! extent at a time, and logs one `info` line saying why. [`ChunkReader::mode`] tells which is in
//! use. `open` proves the fast path with one real read of chunk 0 before trusting it.
//!
//! | step | where |
//! | --- | --- |
//! | chunk list → validated → extents (≤ 1 MiB runs) | `plan.rs` |
//! | size (`BLKGETSIZE64`), logical block (`BLKSSZGET`), `O_DIRECT` open | `sys.rs` |
//! | aligned buffer pool | `buf.rs` |
//! | io_uring engine (window of `depth` extents, in-order delivery) | `uring.rs` |
//! | pread engine | `buffered.rs` |
//!
//! Invariants:
//! - The sink sees each requested chunk exactly once, in ascending index order, with
//!   [`CHUNK_SIZE`] bytes — except the disk's last chunk when the size is not a multiple of
//!   [`CHUNK_SIZE`], which has `size - index * CHUNK_SIZE` bytes. An `O_DIRECT` read of that chunk is
//!   rounded up to the logical block size (512 minimum) and the result cut back to the disk size.
//! - Short reads are completed by resubmitting the remainder; `EINTR`/`EAGAIN` are retried (a
//!   bounded number of times in a row); any other error names the path, offset and length.
//! - When `read_chunks` returns — success, I/O error or sink error — no I/O is in flight: the kernel
//!   never writes into a buffer that is handed out again or freed. Dropping the reader drains too.
//! - Memory is `depth` × 1 MiB (one 1 MiB buffer in buffered mode), whatever the disk size.
//!
//! Must not: write to the disk (it is opened read-only), allocate per I/O, or hand the sink a
//! byte past the end of the disk.

mod buf;
mod buffered;
mod error;
pub mod holes;
mod plan;
mod sys;
mod uring;

use std::fmt;

use holes::DataMap;
use std::path::Path;

pub use error::ReadError;

use buffered::BufferedEngine;
use plan::Extents;
use sys::Disk;
use uring::UringEngine;

/// Bytes per chunk: the unit the tracker marks dirty.
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// Largest coalesced I/O: 16 chunks.
pub const MAX_EXTENT: u64 = 1 << 20;
/// Largest queue depth `open` accepts (`MAX_DEPTH` MiB of buffers).
pub const MAX_DEPTH: u32 = 256;

/// How a [`ChunkReader`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadMode {
    /// io_uring with `O_DIRECT`: the fast path.
    IoUringDirect,
    /// Buffered `pread`, one extent at a time; `why` says what ruled out the fast path.
    Buffered { why: String },
}

impl fmt::Display for ReadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadMode::IoUringDirect => f.write_str("io_uring + O_DIRECT"),
            ReadMode::Buffered { why } => write!(f, "buffered pread ({why})"),
        }
    }
}

/// What one [`ChunkReader::read_chunks`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Coalesced extents read (a resubmitted remainder of a short read is not counted again).
    pub ios: u64,
    /// Bytes handed to the sink.
    pub bytes: u64,
    /// Bytes of those in holes (of an image file, or of a loop device's backing file): known zero,
    /// handed over as zeros, never read.
    pub hole_bytes: u64,
}

enum Engine {
    /// Boxed: the ring's bookkeeping is large and the enum lives inline in the reader.
    Uring(Box<UringEngine>),
    Buffered(BufferedEngine),
}

/// Reads chosen chunks of one disk. See the crate documentation.
pub struct ChunkReader {
    // Declared before `disk`: the engine drains its in-flight I/O on drop, before the file closes.
    engine: Engine,
    disk: Disk,
    mode: ReadMode,
    /// Where the data lies, where the kernel can say ([`holes`]).
    map: Option<DataMap>,
}

/// Why the fast path could not be set up: either a reason to fall back, or a real error.
enum DirectError {
    Fallback(String),
    Fatal(ReadError),
}

impl ChunkReader {
    /// Opens `path` (block device or regular file) read-only. Tries `O_DIRECT` + io_uring with queue
    /// depth `depth` (1..=[`MAX_DEPTH`], e.g. 16); if either is unavailable, falls back to buffered
    /// `pread` and logs one `info` line saying why.
    pub fn open(path: &Path, depth: u32) -> Result<ChunkReader, ReadError> {
        if depth == 0 || depth > MAX_DEPTH {
            return Err(ReadError::BadDepth { depth });
        }
        // Checked by path first: opening a FIFO would block, a directory would mislead the fallback.
        sys::check_kind(path)?;
        match Self::open_direct(path, depth) {
            Ok(reader) => {
                tracing::debug!(path = %path.display(), depth, "reading with io_uring + O_DIRECT");
                Ok(reader)
            }
            Err(DirectError::Fatal(e)) => Err(e),
            Err(DirectError::Fallback(why)) => {
                tracing::info!(
                    path = %path.display(),
                    why = %why,
                    "reading with buffered pread instead of io_uring + O_DIRECT"
                );
                Self::open_buffered(path, why)
            }
        }
    }

    /// Device or file size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.size
    }

    /// How this reader reads.
    pub fn mode(&self) -> ReadMode {
        self.mode.clone()
    }

    /// Reads `chunks` (ascending, no duplicates, each below `size().div_ceil(CHUNK_SIZE)`) and calls
    /// `f(chunk_index, data)` once per chunk in ascending order. Consecutive chunks are coalesced into
    /// extents of at most [`MAX_EXTENT`] bytes, up to `depth` of them in flight. An error from `f`
    /// stops reading and is returned as [`ReadError::Sink`].
    pub fn read_chunks<E: fmt::Display>(
        &mut self,
        chunks: &[u64],
        mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<ReadStats, ReadError> {
        plan::validate(chunks, self.disk.size).map_err(|reason| ReadError::BadChunks {
            path: self.disk.path.clone(),
            reason,
        })?;
        let mut sink = |index: u64, data: &[u8]| f(index, data).map_err(|e| e.to_string());
        let ChunkReader {
            engine, disk, map, ..
        } = self;
        let Some(mut holes) = map.as_ref().and_then(|m| Holes::settled(m, disk, chunks)) else {
            return run(engine, disk, chunks, &mut sink);
        };
        // Runs of chunks alike (all data or all hole), in ascending order: data read, holes
        // handed over as zeros.
        let mut stats = ReadStats::default();
        let mut i = 0;
        while i < chunks.len() {
            let hole = holes.is_hole(chunks[i]);
            let mut j = i + 1;
            while j < chunks.len() && holes.is_hole(chunks[j]) == hole {
                j += 1;
            }
            if hole {
                for &c in &chunks[i..j] {
                    let len = (disk.size - c * CHUNK_SIZE).min(CHUNK_SIZE) as usize;
                    sink(c, &ZEROS[..len]).map_err(ReadError::Sink)?;
                    stats.bytes += len as u64;
                    stats.hole_bytes += len as u64;
                }
            } else {
                let s = run(engine, disk, &chunks[i..j], &mut sink)?;
                stats.ios += s.ios;
                stats.bytes += s.bytes;
            }
            i = j;
        }
        Ok(stats)
    }

    /// Whether the kernel says where the source's data lies: a regular file, or a loop device
    /// over one ([`holes`]).
    pub fn knows_holes(&self) -> bool {
        self.map.is_some()
    }

    /// The fast path: `O_DIRECT` open, io_uring, and one probe read to prove both work.
    fn open_direct(path: &Path, depth: u32) -> Result<ChunkReader, DirectError> {
        let file = match sys::open_direct(path) {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(DirectError::Fallback(format!(
                    "the filesystem refuses O_DIRECT ({e})"
                )))
            }
            Err(source) => {
                return Err(DirectError::Fatal(ReadError::Open {
                    path: path.to_owned(),
                    source,
                }))
            }
        };
        let disk = Disk::new(file, path).map_err(DirectError::Fatal)?;
        if let Some(why) = disk.direct_obstacle() {
            return Err(DirectError::Fallback(why));
        }
        let engine = UringEngine::new(depth, disk.align())
            .map_err(|e| DirectError::Fallback(format!("io_uring is unavailable ({e})")))?;
        let mut reader = ChunkReader {
            engine: Engine::Uring(Box::new(engine)),
            map: data_map(&disk),
            disk,
            mode: ReadMode::IoUringDirect,
        };
        if reader.size() > 0 {
            // Read for real, hole or not: the probe proves the engine.
            run(&mut reader.engine, &reader.disk, &[0], &mut |_, _| Ok(())).map_err(|e| {
                DirectError::Fallback(format!(
                    "a probe read with io_uring + O_DIRECT failed ({e})"
                ))
            })?;
        }
        Ok(reader)
    }

    /// The fallback: a plain read-only open and one 1 MiB buffer.
    fn open_buffered(path: &Path, why: String) -> Result<ChunkReader, ReadError> {
        let file = std::fs::File::open(path).map_err(|source| ReadError::Open {
            path: path.to_owned(),
            source,
        })?;
        let disk = Disk::new(file, path)?;
        Ok(ChunkReader {
            engine: Engine::Buffered(BufferedEngine::new()),
            map: data_map(&disk),
            disk,
            mode: ReadMode::Buffered { why },
        })
    }
}

/// Zeros for the chunks of holes.
static ZEROS: [u8; CHUNK_SIZE as usize] = [0; CHUNK_SIZE as usize];

fn data_map(disk: &Disk) -> Option<DataMap> {
    match DataMap::of(&disk.file, &disk.path) {
        holes::Found::Map(m) => {
            if let Some(b) = m.backing() {
                tracing::info!(path = %disk.path.display(), backing = %b.display(), "a loop device: the holes of its backing file are not read");
            }
            Some(m)
        }
        holes::Found::Whole(why) => {
            tracing::debug!(path = %disk.path.display(), %why, "holes unknown: read whole");
            None
        }
    }
}

/// Classifies ascending chunks as hole or data with as few seeks as the layout allows: one
/// `SEEK_DATA` and one `SEEK_HOLE` per data extent met. An error from the kernel makes the rest
/// of the call data (read), with a log line.
struct Holes<'a> {
    map: &'a DataMap,
    file: &'a std::fs::File,
    size: u64,
    /// The next data at or after the last chunk asked about, and where it ends (`size` at most).
    data: Option<(u64, u64)>,
    broken: bool,
}

fn run(
    engine: &mut Engine,
    disk: &Disk,
    chunks: &[u64],
    sink: &mut plan::Sink<'_>,
) -> Result<ReadStats, ReadError> {
    let extents = Extents::new(chunks, disk.size);
    match engine {
        Engine::Uring(engine) => engine.run(disk, extents, sink),
        Engine::Buffered(engine) => engine.run(disk, extents, sink),
    }
}

impl<'a> Holes<'a> {
    /// The hole finder for one call, once the map is made true for the range of `chunks`; `None`
    /// when it cannot be trusted now (everything is read).
    fn settled(map: &'a DataMap, disk: &'a Disk, chunks: &[u64]) -> Option<Holes<'a>> {
        let (first, last) = (*chunks.first()?, *chunks.last()?);
        let start = first * CHUNK_SIZE;
        let end = ((last + 1) * CHUNK_SIZE).min(disk.size);
        match map.settle(&disk.file, start, end - start) {
            Ok(true) => Some(Holes {
                map,
                file: &disk.file,
                size: disk.size,
                data: None,
                broken: false,
            }),
            Ok(false) => {
                tracing::warn!(path = %disk.path.display(), "the loop device is no longer attached as when it was opened: read whole");
                None
            }
            Err(e) => {
                tracing::warn!(path = %disk.path.display(), error = %e, "cannot settle the loop device's page cache: read whole");
                None
            }
        }
    }

    fn is_hole(&mut self, chunk: u64) -> bool {
        if self.broken {
            return false;
        }
        let a = chunk * CHUNK_SIZE;
        let b = (a + CHUNK_SIZE).min(self.size);
        if self.data.is_none_or(|(_, end)| a >= end) {
            match self.window(a) {
                Ok(w) => self.data = Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, offset = a, "cannot find the holes: the rest is read");
                    self.broken = true;
                    return false;
                }
            }
        }
        let (start, _) = self.data.expect("set above");
        b <= start
    }

    /// The first data at or after `a`, and its end.
    fn window(&self, a: u64) -> std::io::Result<(u64, u64)> {
        let Some(start) = self.map.next_data(self.file, a)? else {
            // Only a hole to the end, or a file that shrank: then the read says so (zeros are
            // never made up for bytes that are gone).
            if self.map.is_file() && self.file.metadata()?.len() < self.size {
                return Err(std::io::Error::other("the file shrank while open"));
            }
            return Ok((self.size, self.size));
        };
        let start = start.min(self.size);
        if start >= self.size {
            return Ok((self.size, self.size));
        }
        let end = self.map.next_hole(self.file, start)?.unwrap_or(self.size);
        // A hole must end after the data starts; anything else is read (never made up).
        Ok((start, end.clamp(start + 1, self.size)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn assert_send<T: Send>() {}

    #[test]
    fn reader_can_move_to_a_worker_thread() {
        assert_send::<ChunkReader>();
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    /// The buffered engine is what the fast path falls back to; it is forced here because this
    /// machine may well support the fast path.
    #[test]
    fn buffered_engine_reads_the_same_bytes() {
        let size = 3 * CHUNK_SIZE as usize + 1234;
        let data = pattern(size);
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(&data).expect("write");
        let mut reader =
            ChunkReader::open_buffered(file.path(), "forced by the test".into()).expect("open");
        assert_eq!(
            reader.mode(),
            ReadMode::Buffered {
                why: "forced by the test".into()
            }
        );
        let mut seen = Vec::new();
        let stats = reader
            .read_chunks(&[0, 1, 3], |i, d| {
                let start = (i * CHUNK_SIZE) as usize;
                assert_eq!(d, &data[start..(start + d.len())], "chunk {i}");
                seen.push((i, d.len()));
                Ok::<(), std::convert::Infallible>(())
            })
            .expect("read");
        let chunk = CHUNK_SIZE as usize;
        assert_eq!(seen, vec![(0, chunk), (1, chunk), (3, 1234)]);
        assert_eq!(
            stats,
            ReadStats {
                ios: 2,
                bytes: (2 * chunk + 1234) as u64,
                hole_bytes: 0,
            }
        );
    }

    #[test]
    fn depth_out_of_range_is_refused() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        for depth in [0, MAX_DEPTH + 1] {
            match ChunkReader::open(file.path(), depth) {
                Err(ReadError::BadDepth { depth: d }) => assert_eq!(d, depth),
                Err(other) => panic!("depth {depth}: wrong error {other}"),
                Ok(_) => panic!("depth {depth} accepted"),
            }
        }
    }

    #[test]
    fn a_directory_is_not_a_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            ChunkReader::open(dir.path(), 4),
            Err(ReadError::NotADisk { .. })
        ));
    }
}
