//! The scan tracker: the portable way to find what changed on a disk.
//!
//! Job: read a source (raw image file or block device) sequentially in large blocks, hash each 64 KiB
//! chunk with the keyed digest, compare with the digests the replica holds (its page map) and hand
//! every differing chunk to a sink — all-zero chunks as zero ranges, never as data. In the same pass it
//! computes the plain blake3 of the whole source, which becomes the point's digest.
//!
//! Invariants:
//! - The data handed to the sink and the whole-source digest come from the same bytes read, so a point
//!   built from them restores to exactly the digest it records, even if the source changed during the
//!   scan (a live source needs a freeze for the point to be *consistent*; that is the cutter's job).
//! - Memory is bounded by `threads * 2 + 4` blocks in flight, whatever the source size.
//! - Hashing runs on `threads` workers; the whole-source digest on its own thread.
//!
//! - Sparse sources: a block (4 MiB) that lies wholly in a hole (`SEEK_DATA` on an image file, or
//!   on a loop device's backing file: [`ferry_read::holes`]) is not read. Its chunks are zero by
//!   definition and its share of the whole-source digest is hashed from zeros in memory, so the
//!   digest stays exactly `b3sum`'s while a 1 TiB image holding 10 GiB reads about 10 GiB. Other
//!   block devices are read whole: a disk's allocation is not visible from inside a VM.
//!
//! Must not: write anything. It reads the source and reports.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::bounded;
use ferry_crypto::{is_zero, Digest, MasterKey, ZERO_DIGEST};
use ferry_format::CHUNK_SIZE;
use ferry_read::holes::{DataMap, Found};

/// Bytes read per I/O: 64 chunks.
pub const BLOCK_SIZE: usize = 64 * CHUNK_SIZE;
const CHUNKS_PER_BLOCK: usize = BLOCK_SIZE / CHUNK_SIZE;

/// Errors of the scan.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// cannot {op} source {path}: {source}
    #[error("cannot {op} source {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    /// the source shrank during the scan
    #[error("source {} shrank during the scan (from {was} to {now} bytes); nothing of this scan is kept — run it again", path.display())]
    Shrank { path: PathBuf, was: u64, now: u64 },
    /// source is empty
    #[error("source {} is empty (0 bytes); nothing to replicate — check the path", path.display())]
    Empty { path: PathBuf },
    /// not a file or block device
    #[error("source {} is neither a regular file nor a block device", path.display())]
    NotADisk { path: PathBuf },
    /// the sink failed
    #[error("{0}")]
    Sink(String),
    /// the page map could not be read
    #[error("reading the replica's page map: {0}")]
    Map(String),
    /// stopped
    #[error("scan stopped before the end of {}", path.display())]
    Stopped { path: PathBuf },
}

/// An opened source disk.
pub struct Source {
    pub path: PathBuf,
    file: File,
    pub size: u64,
    /// Where the data lies, where the kernel can say: a regular file's own holes, a loop
    /// device's backing file's ([`ferry_read::holes`]); other block devices read whole.
    map: Option<DataMap>,
}

impl Source {
    /// Opens a regular file or block device read-only and finds its size.
    pub fn open(path: &Path) -> Result<Source, ScanError> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileTypeExt;
        let err = |op| {
            move |source| ScanError::Io {
                path: path.to_owned(),
                op,
                source,
            }
        };
        let mut file = File::open(path).map_err(err("open"))?;
        let ft = file.metadata().map_err(err("stat"))?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(ScanError::NotADisk { path: path.into() });
        }
        let size = file.seek(SeekFrom::End(0)).map_err(err("size"))?;
        if size == 0 {
            return Err(ScanError::Empty { path: path.into() });
        }
        // SAFETY: posix_fadvise only takes a valid fd and plain integers.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        let map = match DataMap::of(&file, path) {
            Found::Map(m) => Some(m),
            Found::Whole(_) => None,
        };
        Ok(Source {
            path: path.to_owned(),
            file,
            size,
            map,
        })
    }

    /// The first offset at or after `offset` that may hold data, per `SEEK_DATA` on the file or
    /// a loop device's backing file (the source's size where only a hole follows), made true for
    /// `[offset, offset + len)` first ([`DataMap::settle`]). Where the kernel cannot tell,
    /// `offset` itself, so everything is read.
    fn next_data(&self, offset: u64, len: u64) -> Result<u64, ScanError> {
        let Some(map) = &self.map else {
            return Ok(offset);
        };
        let err = |source| ScanError::Io {
            path: self.path.clone(),
            op: "find the data of",
            source,
        };
        match map.settle(&self.file, offset, len) {
            Ok(true) => {}
            // Not attached as when opened, or its page cache cannot be written: read it.
            Ok(false) => return Ok(offset),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot settle the loop device's page cache: reading the block");
                return Ok(offset);
            }
        }
        match map.next_data(&self.file, offset).map_err(err)? {
            Some(at) => Ok(at.min(self.size)),
            // Only a hole to the end, or the file shrank under the scan (zeros are never made
            // up for bytes that are gone).
            None => {
                self.check_size()?;
                Ok(self.size)
            }
        }
    }

    /// Whether holes are found without reading (a file, a loop device).
    pub fn knows_holes(&self) -> bool {
        self.map.is_some()
    }

    fn read_block(&self, offset: u64, buf: &mut [u8]) -> Result<(), ScanError> {
        self.file.read_exact_at(buf, offset).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                if let Err(shrank) = self.check_size() {
                    return shrank;
                }
            }
            ScanError::Io {
                path: self.path.clone(),
                op: "read",
                source,
            }
        })
    }

    /// [`ScanError::Shrank`] if the source is now shorter than when it was opened.
    fn check_size(&self) -> Result<(), ScanError> {
        use std::io::{Seek, SeekFrom};
        let now = (&self.file)
            .seek(SeekFrom::End(0))
            .map_err(|source| ScanError::Io {
                path: self.path.clone(),
                op: "size",
                source,
            })?;
        if now < self.size {
            return Err(ScanError::Shrank {
                path: self.path.clone(),
                was: self.size,
                now,
            });
        }
        Ok(())
    }
}

/// One change found by the scan.
pub enum Change {
    /// The chunk at `offset` now holds `data` (digest `digest`).
    Write {
        offset: u64,
        digest: Digest,
        data: Vec<u8>,
    },
    /// `len` bytes at `offset` are now zero.
    Zero { offset: u64, len: u64 },
}

/// What a scan found.
#[derive(Debug, Default, Clone)]
pub struct ScanReport {
    /// Bytes of the source scanned (its size, at the end), holes included.
    pub bytes_read: u64,
    /// Bytes of those in holes of a sparse file: known zero, never read.
    pub hole_bytes: u64,
    pub chunks: u64,
    pub changed_chunks: u64,
    pub changed_bytes: u64,
    pub zeroed_chunks: u64,
    /// Plain blake3 of the whole source.
    pub blake3: [u8; 32],
}

/// Scans `src` against `old_map` (fills digests of pages `first..first+n` as the replica holds them),
/// sending changes to `sink` in ascending offset order. `progress` gets bytes read so far. `stop`
/// aborts between blocks.
pub fn scan(
    src: &Source,
    key: &MasterKey,
    threads: usize,
    mut old_map: impl FnMut(u64, &mut [Digest]) -> Result<(), String>,
    mut sink: impl FnMut(Change) -> Result<(), String>,
    mut progress: impl FnMut(u64),
    stop: &AtomicBool,
) -> Result<ScanReport, ScanError> {
    let threads = threads.max(1);
    let blocks = src.size.div_ceil(BLOCK_SIZE as u64);
    let (job_tx, job_rx) = bounded::<(u64, Buf)>(threads * 2);
    let (done_tx, done_rx) = bounded::<(u64, Buf, Vec<Digest>, BlockHash)>(threads * 2);
    // Recycled read buffers: no allocation (or page faults) per block.
    let (free_tx, free_rx) = bounded::<Vec<u8>>(threads * 4 + 4);
    for _ in 0..threads * 4 + 4 {
        free_tx
            .send(vec![0u8; BLOCK_SIZE])
            .expect("room for every buffer");
    }
    let single_block = src.size <= BLOCK_SIZE as u64;
    let mut report = ScanReport::default();
    let mut cvs: Vec<blake3::hazmat::ChainingValue> = Vec::new();
    std::thread::scope(|s| -> Result<(), ScanError> {
        // Reader.
        let reader = s.spawn(move || -> Result<(), ScanError> {
            for b in 0..blocks {
                if stop.load(Ordering::Relaxed) {
                    return Err(ScanError::Stopped {
                        path: src.path.clone(),
                    });
                }
                let off = b * BLOCK_SIZE as u64;
                let len = (src.size - off).min(BLOCK_SIZE as u64) as usize;
                // Asked for each block (one lseek per 4 MiB): data written into a hole while the
                // scan runs is read when the scan gets there, as a plain read would.
                let data_at = src.next_data(off, len as u64)?;
                let buf = if data_at >= off + len as u64 {
                    // Wholly in a hole: zeros, not read.
                    Buf {
                        data: Data::Hole(len),
                        home: free_tx.clone(),
                    }
                } else {
                    let Ok(mut buf) = free_rx.recv() else { break };
                    buf.resize(len, 0);
                    src.read_block(off, &mut buf)?;
                    Buf {
                        data: Data::Read(buf),
                        home: free_tx.clone(),
                    }
                };
                if job_tx.send((b, buf)).is_err() {
                    break;
                }
            }
            Ok(())
        });
        // Hash workers.
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            s.spawn(move || {
                for (b, buf) in job_rx {
                    let d = if buf.is_hole() {
                        vec![ZERO_DIGEST; buf.len().div_ceil(CHUNK_SIZE)]
                    } else {
                        buf.chunks(CHUNK_SIZE)
                            .map(|c| {
                                if is_zero(c) {
                                    ZERO_DIGEST
                                } else {
                                    key.digest(c)
                                }
                            })
                            .collect()
                    };
                    let h = block_hash(b, &buf, single_block);
                    if done_tx.send((b, buf, d, h)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(job_rx);
        drop(done_tx);
        // Collector: reorder, compare, emit.
        let mut pending = std::collections::BTreeMap::new();
        let mut next = 0u64;
        let mut old = vec![ZERO_DIGEST; CHUNKS_PER_BLOCK];
        let mut result = Ok(());
        for item in done_rx.iter() {
            pending.insert(item.0, item);
            while let Some((b, buf, digests, h)) = pending.remove(&next) {
                match h {
                    BlockHash::Root(r) => report.blake3 = r,
                    BlockHash::Cv(cv) => cvs.push(cv),
                }
                if result.is_ok() {
                    result = emit(
                        b,
                        &buf,
                        &digests,
                        &mut old,
                        &mut old_map,
                        &mut sink,
                        &mut report,
                    );
                    report.bytes_read += buf.len() as u64;
                    if buf.is_hole() {
                        report.hole_bytes += buf.len() as u64;
                    }
                    progress(report.bytes_read);
                }
                next += 1;
            }
            if result.is_err() {
                break;
            }
        }
        drop(done_rx);
        let read = reader.join().expect("reader thread panicked");
        result?;
        read
    })?;
    if report.bytes_read != src.size {
        return Err(ScanError::Stopped {
            path: src.path.clone(),
        });
    }
    if !single_block {
        report.blake3 = merge_root(&cvs, src.size);
    }
    Ok(report)
}

/// A read buffer that goes back to the pool when the last user drops it, or a block of a hole.
struct Buf {
    data: Data,
    home: crossbeam_channel::Sender<Vec<u8>>,
}

enum Data {
    Read(Vec<u8>),
    /// This many zero bytes, never read (a hole of a sparse file).
    Hole(usize),
    Gone,
}

/// Zeros the size of a block, for the blocks of holes (allocated zeroed: its pages are the
/// kernel's shared zero page until written, and it is never written).
static ZEROS: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| vec![0u8; BLOCK_SIZE]);

impl Buf {
    fn is_hole(&self) -> bool {
        matches!(self.data, Data::Hole(_))
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.data {
            Data::Read(v) => v,
            Data::Hole(n) => &ZEROS[..*n],
            Data::Gone => unreachable!("present until drop"),
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Data::Read(d) = std::mem::replace(&mut self.data, Data::Gone) {
            let _ = self.home.try_send(d);
        }
    }
}

/// The whole-source blake3 is computed in parallel: each worker hashes its block as a BLAKE3
/// subtree (blocks are 4 MiB, a power of two, at aligned offsets), and the collector merges the
/// chaining values in tree order. The result equals `b3sum` of the source.
enum BlockHash {
    /// The source is a single block: its plain hash.
    Root([u8; 32]),
    Cv(blake3::hazmat::ChainingValue),
}

fn block_hash(b: u64, data: &[u8], single: bool) -> BlockHash {
    use blake3::hazmat::HasherExt;
    if single {
        return BlockHash::Root(*blake3::hash(data).as_bytes());
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(b * BLOCK_SIZE as u64);
    h.update(data);
    BlockHash::Cv(h.finalize_non_root())
}

/// Merges block chaining values into the root hash of an input of `len` bytes (more than one block).
fn merge_root(cvs: &[blake3::hazmat::ChainingValue], len: u64) -> [u8; 32] {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, Mode};
    fn sub(cvs: &[blake3::hazmat::ChainingValue], len: u64) -> blake3::hazmat::ChainingValue {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let left = left_subtree_len(len);
        let n = (left / BLOCK_SIZE as u64) as usize;
        merge_subtrees_non_root(
            &sub(&cvs[..n], left),
            &sub(&cvs[n..], len - left),
            Mode::Hash,
        )
    }
    let left = left_subtree_len(len);
    let n = (left / BLOCK_SIZE as u64) as usize;
    *merge_subtrees_root(
        &sub(&cvs[..n], left),
        &sub(&cvs[n..], len - left),
        Mode::Hash,
    )
    .as_bytes()
}

fn emit(
    b: u64,
    buf: &[u8],
    digests: &[Digest],
    old: &mut [Digest],
    old_map: &mut impl FnMut(u64, &mut [Digest]) -> Result<(), String>,
    sink: &mut impl FnMut(Change) -> Result<(), String>,
    report: &mut ScanReport,
) -> Result<(), ScanError> {
    let first = b * CHUNKS_PER_BLOCK as u64;
    let old = &mut old[..digests.len()];
    old_map(first, old).map_err(ScanError::Map)?;
    for (i, (d, o)) in digests.iter().zip(old.iter()).enumerate() {
        report.chunks += 1;
        if d == o {
            continue;
        }
        let offset = (first + i as u64) * CHUNK_SIZE as u64;
        let data = &buf[i * CHUNK_SIZE..((i + 1) * CHUNK_SIZE).min(buf.len())];
        report.changed_chunks += 1;
        report.changed_bytes += data.len() as u64;
        let c = if *d == ZERO_DIGEST {
            report.zeroed_chunks += 1;
            Change::Zero {
                offset,
                len: data.len() as u64,
            }
        } else {
            Change::Write {
                offset,
                digest: *d,
                data: data.to_vec(),
            }
        };
        sink(c).map_err(ScanError::Sink)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exactly_the_changed_chunks_and_the_whole_digest() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        let size = 5 * BLOCK_SIZE + 3 * CHUNK_SIZE + 1234;
        let mut data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        data[CHUNK_SIZE * 2..CHUNK_SIZE * 3].fill(0);
        std::fs::write(&p, &data).unwrap();
        let key = MasterKey::from_bytes(&[1; 32], "k");
        let src = Source::open(&p).unwrap();
        let stop = AtomicBool::new(false);
        let mut map: Vec<Digest> = vec![ZERO_DIGEST; size.div_ceil(CHUNK_SIZE)];
        let mut changes = Vec::new();
        let r = scan(
            &src,
            &key,
            2,
            |f, out| {
                out.copy_from_slice(&map[f as usize..f as usize + out.len()]);
                Ok(())
            },
            |c| {
                changes.push(c);
                Ok(())
            },
            |_| {},
            &stop,
        )
        .unwrap();
        assert_eq!(r.blake3, *blake3::hash(&data).as_bytes());
        // Against an empty replica: every non-zero chunk, the zero one not at all.
        assert_eq!(changes.len(), map.len() - 1);
        for c in &changes {
            if let Change::Write {
                offset,
                digest,
                data: d,
            } = c
            {
                let o = *offset as usize;
                assert_eq!(&data[o..o + d.len()], &d[..]);
                map[o / CHUNK_SIZE] = *digest;
            }
        }
        // Change one byte and zero one chunk: exactly two changes.
        data[CHUNK_SIZE * 40 + 5] ^= 1;
        data[CHUNK_SIZE * 7..CHUNK_SIZE * 8].fill(0);
        std::fs::write(&p, &data).unwrap();
        let src = Source::open(&p).unwrap();
        let mut changes = Vec::new();
        scan(
            &src,
            &key,
            1,
            |f, out| {
                out.copy_from_slice(&map[f as usize..f as usize + out.len()]);
                Ok(())
            },
            |c| {
                changes.push(c);
                Ok(())
            },
            |_| {},
            &stop,
        )
        .unwrap();
        assert_eq!(changes.len(), 2);
        assert!(
            matches!(changes[0], Change::Zero { offset, .. } if offset == 7 * CHUNK_SIZE as u64)
        );
        assert!(
            matches!(changes[1], Change::Write { offset, .. } if offset == 40 * CHUNK_SIZE as u64)
        );
    }

    #[test]
    fn whole_digest_equals_plain_blake3_for_every_shape() {
        let d = tempfile::tempdir().unwrap();
        let key = MasterKey::from_bytes(&[1; 32], "k");
        let stop = AtomicBool::new(false);
        for size in [
            1,
            1023,
            CHUNK_SIZE,
            BLOCK_SIZE - 1,
            BLOCK_SIZE,
            BLOCK_SIZE + 1,
            2 * BLOCK_SIZE,
            3 * BLOCK_SIZE + 5,
            4 * BLOCK_SIZE,
            7 * BLOCK_SIZE - 3,
            9 * BLOCK_SIZE,
        ] {
            let p = d.path().join("x.img");
            let data: Vec<u8> = (0..size)
                .map(|i| (i % 253) as u8 ^ (i >> 16) as u8)
                .collect();
            std::fs::write(&p, &data).unwrap();
            let src = Source::open(&p).unwrap();
            let r = scan(
                &src,
                &key,
                2,
                |_, o| {
                    o.fill(ZERO_DIGEST);
                    Ok(())
                },
                |_| Ok(()),
                |_| {},
                &stop,
            )
            .unwrap();
            assert_eq!(r.blake3, *blake3::hash(&data).as_bytes(), "size {size}");
        }
    }

    #[test]
    fn empty_source_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("e.img");
        std::fs::write(&p, b"").unwrap();
        let e = Source::open(&p).err().unwrap().to_string();
        assert!(e.contains("is empty"), "{e}");
    }
}
