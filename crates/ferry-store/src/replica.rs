//! A local replica: the embedded store's equivalent of an Azure page blob.
//!
//! Laid out as the page blob is: a virtual size rounded up to 1 MiB with a 512-byte fixed-VHD footer
//! (`footer.vhd`), pages that were never written cost nothing. Page contents are kept by reference —
//! `current.map` holds one keyed digest per 64 KiB page, and the dedupe index says where the chunk with
//! that digest is stored — so identical content across disks and VMs is stored once.
//!
//! Points are copy-on-write: committing point N+1 writes `redo/N+1.delta` (the new digests of the pages
//! changed since point N) and `undo/N.delta` (their digests at point N), then the manifest commit, then
//! the redo is applied in place to `current.map`. Cost: O(pages changed), never a copy of the disk.
//! The digest of a page at point S is found in the oldest undo with seq >= S that has it, else in
//! `current.map` ([`crate::readers::LiveReader`], which stays exact while the writer commits).
//!
//! Crash safety: `current.map`'s header carries the generation (point seq) it reflects; a redo newer than
//! that generation and listed in the manifest is re-applied on open (idempotent); one not listed is
//! discarded.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_crypto::{Digest, ZERO_DIGEST};
use ferry_format::delta::{
    decode_entry, encode_entry, DeltaHeader, MapHeader, DELTA_ENTRY_LEN, DELTA_HEADER_LEN,
    DELTA_TRAILER_LEN, MAP_HEADER_LEN,
};
use ferry_format::vhd;
use ferry_format::CHUNK_SIZE;

use crate::durable::{create_dir_durable, durable_rename, durable_write, fsync_dir};
use crate::StoreError;

const DIGEST: u64 = 32;

/// Number of 64 KiB pages covering `size` bytes.
pub fn pages_for(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE as u64)
}

/// Opens `dir/current.map` (for writing too with `write`) and checks its header and length.
pub(crate) fn open_map(dir: &Path, write: bool) -> Result<(File, MapHeader), StoreError> {
    let map_path = dir.join("current.map");
    let map = OpenOptions::new()
        .read(true)
        .write(write)
        .open(&map_path)
        .map_err(io(&map_path, "open"))?;
    let mut hb = [0u8; MAP_HEADER_LEN];
    map.read_exact_at(&mut hb, 0)
        .map_err(io(&map_path, "read"))?;
    let header = MapHeader::decode(&hb).map_err(|source| StoreError::Format {
        path: map_path.clone(),
        source,
    })?;
    let len = map.metadata().map_err(io(&map_path, "stat"))?.len();
    if len != MAP_HEADER_LEN as u64 + header.pages * DIGEST {
        return Err(StoreError::Format {
            path: map_path,
            source: ferry_format::FormatError::Truncated {
                what: "page map",
                offset: len,
            },
        });
    }
    Ok((map, header))
}

/// An open local replica.
pub struct Replica {
    dir: PathBuf,
    map: File,
    header: MapHeader,
    pending: Option<Pending>,
}

struct Pending {
    w: BufWriter<File>,
    count: u64,
    last: Option<u64>,
    sorted: bool,
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

impl Replica {
    /// Opens the replica at `dir`, creating it for a disk of `size` bytes if it does not exist.
    pub fn open_or_create(dir: &Path, size: u64) -> Result<Self, StoreError> {
        let map_path = dir.join("current.map");
        if !map_path.exists() {
            create_dir_durable(&dir.join("undo")).map_err(io(dir, "create"))?;
            create_dir_durable(&dir.join("redo")).map_err(io(dir, "create"))?;
            let mut uid = [0u8; 16];
            ferry_crypto::random_bytes(&mut uid).map_err(|e| StoreError::Index(e.to_string()))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let footer = vhd::encode(vhd::vhd_size(size), uid, now);
            let fp = dir.join("footer.vhd");
            durable_write(&fp, &footer).map_err(io(&fp, "write"))?;
            let pages = pages_for(size);
            let tmp = dir.join(".current.map.tmp");
            let f = File::create(&tmp).map_err(io(&tmp, "create"))?;
            f.write_all_at(
                &MapHeader {
                    pages,
                    generation: 0,
                }
                .encode(),
                0,
            )
            .map_err(io(&tmp, "write"))?;
            // Sparse: unwritten digests read as zero, which means "zero page".
            f.set_len(MAP_HEADER_LEN as u64 + pages * DIGEST)
                .map_err(io(&tmp, "extend"))?;
            drop(f);
            durable_rename(&tmp, &map_path).map_err(io(&map_path, "rename"))?;
        }
        Self::open(dir)
    }

    /// Opens an existing replica.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, true)
    }

    /// Opens an existing replica for reading only (readers beside the writer).
    pub fn open_readonly(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, false)
    }

    fn open_with(dir: &Path, write: bool) -> Result<Self, StoreError> {
        let (map, header) = open_map(dir, write)?;
        Ok(Replica {
            dir: dir.to_owned(),
            map,
            header,
            pending: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pages(&self) -> u64 {
        self.header.pages
    }

    /// The point sequence number `current.map` reflects.
    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    /// The fixed-VHD footer of this replica.
    pub fn footer(&self) -> Result<[u8; vhd::FOOTER_LEN], StoreError> {
        let p = self.dir.join("footer.vhd");
        let b = fs::read(&p).map_err(io(&p, "read"))?;
        vhd::decode(&b).map_err(|source| StoreError::Format {
            path: p.clone(),
            source,
        })?;
        Ok(b.try_into().expect("decode checked the length"))
    }

    /// Reads the current digests of pages `first..first + out.len()`.
    pub fn read_map(&self, first: u64, out: &mut [Digest]) -> Result<(), StoreError> {
        let p = self.dir.join("current.map");
        if first + out.len() as u64 > self.header.pages {
            return Err(StoreError::Index(format!(
                "page {} beyond the end of {}",
                first + out.len() as u64,
                p.display()
            )));
        }
        // SAFETY: [u8; 32] has no padding and any byte pattern is valid, so viewing the digest array as
        // bytes is sound; the length is exactly out.len() * 32.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, out.len() * DIGEST as usize)
        };
        self.map
            .read_exact_at(bytes, MAP_HEADER_LEN as u64 + first * DIGEST)
            .map_err(io(&p, "read"))
    }

    fn pending_path(&self) -> PathBuf {
        self.dir.join("pending.tmp")
    }

    /// Forgets changes recorded since the last commit (a new run began).
    pub fn reset_pending(&mut self) -> Result<(), StoreError> {
        let p = self.pending_path();
        let f = File::create(&p).map_err(io(&p, "create"))?;
        // 64 KiB: a process server holds one per disk being replicated (1 MiB each made 200
        // agents' replicas 200 MiB of the server's memory).
        self.pending = Some(Pending {
            w: BufWriter::with_capacity(64 << 10, f),
            count: 0,
            last: None,
            sorted: true,
        });
        Ok(())
    }

    /// Records that page `page` now holds the chunk `digest` (ZERO_DIGEST: zeros). Takes effect at the
    /// next commit. Not durable by itself: the journal is.
    pub fn record(&mut self, page: u64, digest: &Digest) -> Result<(), StoreError> {
        if page >= self.header.pages {
            return Err(StoreError::Index(format!(
                "write to page {page} beyond the end of the replica ({} pages)",
                self.header.pages
            )));
        }
        if self.pending.is_none() {
            self.reset_pending()?;
        }
        let p = self.pending_path();
        let pend = self.pending.as_mut().expect("just set");
        if pend.last.is_some_and(|l| page <= l) {
            pend.sorted = false;
        }
        pend.last = Some(page);
        pend.count += 1;
        pend.w
            .write_all(&encode_entry(page, digest))
            .map_err(io(&p, "write"))
    }

    /// Number of page updates recorded since the last commit.
    pub fn pending_count(&self) -> u64 {
        self.pending.as_ref().map_or(0, |p| p.count)
    }

    /// First half of a commit: makes `redo/SEQ.delta` and `undo/GEN.delta` durable. The caller then
    /// commits the manifest, then calls [`Self::apply_redo`].
    pub fn prepare(&mut self, seq: u64) -> Result<(), StoreError> {
        let redo_path = self.dir.join("redo").join(format!("{seq}.delta"));
        let pp = self.pending_path();
        // Sorted, unique entries of this run.
        let entries: Box<dyn Iterator<Item = Result<(u64, Digest), StoreError>>> = match self
            .pending
            .take()
        {
            None => Box::new(std::iter::empty()),
            Some(mut p) => {
                p.w.flush().map_err(io(&pp, "write"))?;
                drop(p.w);
                let r =
                    BufReader::with_capacity(1 << 20, File::open(&pp).map_err(io(&pp, "open"))?);
                if p.sorted {
                    Box::new(EntryIter {
                        r,
                        left: p.count,
                        path: pp.clone(),
                    })
                } else {
                    // Out-of-order runs (the eBPF tracker's initial sync or a resync): sorted in
                    // bounded memory, the last write of a page winning.
                    let unsorted = EntryIter {
                        r,
                        left: p.count,
                        path: pp.clone(),
                    };
                    sort_entries(unsorted, &self.dir, SORT_RUN)?
                }
            }
        };
        let undo_path = self
            .dir
            .join("undo")
            .join(format!("{}.delta", self.header.generation));
        let mut redo = DeltaWriter::create(&redo_path)?;
        let mut undo = if self.header.generation > 0 {
            Some(DeltaWriter::create(&undo_path)?)
        } else {
            None
        };
        let mut old = [ZERO_DIGEST; 1];
        for e in entries {
            let (page, d) = e?;
            self.read_map(page, &mut old)?;
            if old[0] == d {
                continue;
            }
            redo.push(page, &d)?;
            if let Some(u) = undo.as_mut() {
                u.push(page, &old[0])?;
            }
        }
        redo.finish()?;
        let _ = fs::remove_file(self.dir.join("sorted.tmp"));
        if let Some(u) = undo {
            u.finish()?;
        }
        let _ = fs::remove_file(&pp);
        Ok(())
    }

    /// Second half of a commit (also run by recovery): writes `redo/SEQ.delta` into `current.map`,
    /// records generation SEQ, syncs, removes the redo.
    pub fn apply_redo(&mut self, seq: u64) -> Result<(), StoreError> {
        let redo_path = self.dir.join("redo").join(format!("{seq}.delta"));
        let mp = self.dir.join("current.map");
        let mut run_start = 0u64;
        let mut run: Vec<u8> = Vec::with_capacity(1 << 16);
        for e in DeltaReader::open(&redo_path)? {
            let (page, d) = e?;
            if page >= self.header.pages {
                return Err(StoreError::Index(format!(
                    "{} names page {page} beyond the replica",
                    redo_path.display()
                )));
            }
            let next = run_start + (run.len() as u64 / DIGEST);
            if run.is_empty() || page != next || run.len() >= 1 << 20 {
                if !run.is_empty() {
                    self.map
                        .write_all_at(&run, MAP_HEADER_LEN as u64 + run_start * DIGEST)
                        .map_err(io(&mp, "write"))?;
                }
                run.clear();
                run_start = page;
            }
            run.extend_from_slice(&d);
        }
        if !run.is_empty() {
            self.map
                .write_all_at(&run, MAP_HEADER_LEN as u64 + run_start * DIGEST)
                .map_err(io(&mp, "write"))?;
        }
        ferry_durable::sync_data(&self.map).map_err(io(&mp, "sync"))?;
        self.header.generation = seq;
        self.map
            .write_all_at(&self.header.encode(), 0)
            .map_err(io(&mp, "write"))?;
        ferry_durable::sync_data(&self.map).map_err(io(&mp, "sync"))?;
        fs::remove_file(&redo_path).map_err(io(&redo_path, "remove"))?;
        Ok(())
    }

    /// Brings the replica to the newest committed point `latest` (0: none) after a crash.
    ///
    /// `latest` 0 with a replica past point 0 means no retained point includes this disk any more
    /// (it was dropped from its VM and retention pruned every point that had it): the replica stays
    /// at its own generation. A commit interrupted between its manifest and its redo is always still
    /// listed at this point (retention runs only after the redo is applied), so nothing is lost.
    pub fn recover(&mut self, latest: u64) -> Result<(), StoreError> {
        let latest = if latest == 0 && self.header.generation > 0 {
            tracing::info!(replica = %self.dir.display(), generation = self.header.generation, "no retained point includes this replica; keeping it as it is");
            self.header.generation
        } else {
            latest
        };
        if self.header.generation < latest {
            let redo = self.dir.join("redo").join(format!("{latest}.delta"));
            if !redo.exists() {
                return Err(StoreError::Index(format!(
                    "replica {} is at point {} but the manifest's newest point is {latest} and {} is missing",
                    self.dir.display(),
                    self.header.generation,
                    redo.display()
                )));
            }
            tracing::info!(replica = %self.dir.display(), seq = latest, "finishing an interrupted commit");
            self.apply_redo(latest)?;
        } else if self.header.generation > latest {
            return Err(StoreError::Index(format!(
                "replica {} is at point {} but the manifest's newest point is {latest}",
                self.dir.display(),
                self.header.generation
            )));
        }
        // Leftovers of a commit that never reached the manifest.
        for sub in ["redo", "undo"] {
            let d = self.dir.join(sub);
            for e in fs::read_dir(&d).map_err(io(&d, "list"))? {
                let e = e.map_err(io(&d, "list"))?;
                let name = e.file_name();
                let seq = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".delta"))
                    .and_then(|n| n.parse::<u64>().ok());
                let stale = match (sub, seq) {
                    ("redo", Some(s)) => s > latest || s <= self.header.generation,
                    ("undo", Some(s)) => s >= latest,
                    _ => true,
                };
                if stale {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Every digest this replica can still restore: the current map and all undo deltas.
    pub fn live_digests(
        &self,
        out: &mut std::collections::HashSet<Digest>,
    ) -> Result<(), StoreError> {
        let mut buf = vec![ZERO_DIGEST; 4096];
        let mut first = 0;
        while first < self.header.pages {
            let n = (self.header.pages - first).min(4096) as usize;
            self.read_map(first, &mut buf[..n])?;
            out.extend(buf[..n].iter().filter(|d| **d != ZERO_DIGEST));
            first += n as u64;
        }
        let d = self.dir.join("undo");
        for e in fs::read_dir(&d).map_err(io(&d, "list"))? {
            let p = e.map_err(io(&d, "list"))?.path();
            if p.extension().is_some_and(|x| x == "delta") {
                for e in DeltaReader::open(&p)? {
                    let (_, dg) = e?;
                    if dg != ZERO_DIGEST {
                        out.insert(dg);
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes the undo deltas no retained point needs: those older than the oldest point in
    /// `keep` (the point seqs that include this disk) and than `pinned` (a reader of that point
    /// needs every seq >= it). The page of point S is found in the oldest undo with seq >= S, so
    /// an undo between two retained points stays even when its own point was pruned (thinning):
    /// an older retained point still reads through it.
    pub fn gc_undo(&self, keep: &[u64], pinned: Option<u64>) -> Result<(), StoreError> {
        let d = self.dir.join("undo");
        let oldest = keep.iter().min().copied();
        for e in fs::read_dir(&d).map_err(io(&d, "list"))? {
            let e = e.map_err(io(&d, "list"))?;
            let seq = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".delta"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(s) = seq {
                if s < self.header.generation
                    && oldest.is_none_or(|o| s < o)
                    && pinned.is_none_or(|p| s < p)
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Removes the undo of point `seq` (retention): older points lose nothing they need only if the
    /// caller merged it first; used when `seq` is the oldest retained point being dropped.
    pub fn drop_undo(&self, seq: u64) -> Result<(), StoreError> {
        let p = self.dir.join("undo").join(format!("{seq}.delta"));
        match fs::remove_file(&p) {
            Ok(()) => fsync_dir(&self.dir.join("undo")).map_err(io(&p, "sync")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&p, "remove")(e)),
        }
    }
}

/// Writes a delta file: header, sorted entries, blake3 trailer; durable on finish.
struct DeltaWriter {
    path: PathBuf,
    tmp: PathBuf,
    w: BufWriter<File>,
    hasher: blake3::Hasher,
    count: u64,
}

impl DeltaWriter {
    fn create(path: &Path) -> Result<Self, StoreError> {
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp, "create"))?;
        f.write_all(&[0u8; DELTA_HEADER_LEN])
            .map_err(io(&tmp, "write"))?;
        Ok(DeltaWriter {
            path: path.to_owned(),
            tmp,
            w: BufWriter::with_capacity(1 << 20, f),
            hasher: blake3::Hasher::new(),
            count: 0,
        })
    }

    fn push(&mut self, page: u64, d: &Digest) -> Result<(), StoreError> {
        let e = encode_entry(page, d);
        self.hasher.update(&e);
        self.count += 1;
        self.w.write_all(&e).map_err(io(&self.tmp, "write"))
    }

    fn finish(mut self) -> Result<(), StoreError> {
        self.w
            .write_all(self.hasher.finalize().as_bytes())
            .map_err(io(&self.tmp, "write"))?;
        let f = self.w.into_inner().map_err(|e| StoreError::Io {
            path: self.tmp.clone(),
            op: "write",
            source: e.into_error(),
        })?;
        f.write_all_at(&DeltaHeader { count: self.count }.encode(), 0)
            .map_err(io(&self.tmp, "write"))?;
        drop(f);
        durable_rename(&self.tmp, &self.path).map_err(io(&self.path, "rename"))
    }
}

/// Streams a delta file. Before it yields anything, [`DeltaReader::open`] checks that the file is
/// exactly header + count entries + trailer long and that the trailer is the blake3 of the entries
/// (one streaming pass), so a damaged delta is refused before a single page is applied; while
/// streaming it checks that pages ascend.
pub struct DeltaReader {
    path: PathBuf,
    r: BufReader<File>,
    left: u64,
    done: bool,
    last: Option<u64>,
    offset: u64,
}

impl DeltaReader {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let f = File::open(path).map_err(io(path, "open"))?;
        let len = f.metadata().map_err(io(path, "stat"))?.len();
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut h = [0u8; DELTA_HEADER_LEN];
        r.read_exact(&mut h).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Format {
                    path: path.to_owned(),
                    source: ferry_format::FormatError::Truncated {
                        what: "page delta",
                        offset: len,
                    },
                }
            } else {
                io(path, "read")(e)
            }
        })?;
        let header = DeltaHeader::decode(&h).map_err(|source| StoreError::Format {
            path: path.to_owned(),
            source,
        })?;
        let corrupt = |offset: u64, detail: String| StoreError::Format {
            path: path.to_owned(),
            source: ferry_format::FormatError::Corrupt {
                what: "page delta",
                offset,
                detail,
            },
        };
        let want = header
            .count
            .checked_mul(DELTA_ENTRY_LEN as u64)
            .and_then(|n| n.checked_add((DELTA_HEADER_LEN + DELTA_TRAILER_LEN) as u64));
        if want != Some(len) {
            return Err(corrupt(
                0,
                format!("{} entries do not fit a file of {len} bytes", header.count),
            ));
        }
        // First pass: the trailer must match before any entry is trusted.
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut left = header.count * DELTA_ENTRY_LEN as u64;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..n]).map_err(io(path, "read"))?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        let mut t = [0u8; DELTA_TRAILER_LEN];
        r.read_exact(&mut t).map_err(io(path, "read"))?;
        if t != *hasher.finalize().as_bytes() {
            return Err(corrupt(
                len - DELTA_TRAILER_LEN as u64,
                "entry checksum mismatch".into(),
            ));
        }
        r.seek(std::io::SeekFrom::Start(DELTA_HEADER_LEN as u64))
            .map_err(io(path, "seek"))?;
        Ok(DeltaReader {
            path: path.to_owned(),
            r,
            left: header.count,
            done: false,
            last: None,
            offset: DELTA_HEADER_LEN as u64,
        })
    }

    /// Inode number of the open file.
    pub fn inode(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.r.get_ref().metadata()?.ino())
    }

    fn corrupt(&self, detail: &str) -> StoreError {
        StoreError::Format {
            path: self.path.clone(),
            source: ferry_format::FormatError::Corrupt {
                what: "page delta",
                offset: self.offset,
                detail: detail.into(),
            },
        }
    }
}

impl Iterator for DeltaReader {
    type Item = Result<(u64, Digest), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.left == 0 {
            return None;
        }
        let mut e = [0u8; DELTA_ENTRY_LEN];
        if let Err(err) = self.r.read_exact(&mut e) {
            // Checked at open: the file changed under us.
            self.done = true;
            return Some(Err(io(&self.path, "read")(err)));
        }
        let (page, d) = decode_entry(&e);
        if self.last.is_some_and(|l| page <= l) {
            self.done = true;
            return Some(Err(self.corrupt("pages out of order")));
        }
        self.last = Some(page);
        self.left -= 1;
        self.offset += DELTA_ENTRY_LEN as u64;
        Some(Ok((page, d)))
    }
}

struct EntryIter {
    r: BufReader<File>,
    left: u64,
    path: PathBuf,
}

/// A stream of page updates.
type Entries = Box<dyn Iterator<Item = Result<(u64, Digest), StoreError>>>;

/// Entries sorted in memory at a time: 1 Mi entries, about 48 MiB (a 64 GiB stretch of a disk).
const SORT_RUN: usize = 1 << 20;

/// Sorts page updates by page, the last update of a page winning, holding at most `run` entries in
/// memory: sorted runs go to `dir/sort-N.tmp` and are merged into `dir/sorted.tmp`, which is
/// streamed back. One run needs no file. (A 1 TiB initial sync: 16 runs, 17 MiB of merge buffers.)
fn sort_entries(
    mut input: impl Iterator<Item = Result<(u64, Digest), StoreError>>,
    dir: &Path,
    run: usize,
) -> Result<Entries, StoreError> {
    // One sorted, unique run: a stable sort keeps arrival order among equal pages; keep the last.
    fn sorted_run(mut v: Vec<(u64, Digest)>) -> Vec<(u64, Digest)> {
        v.sort_by_key(|e| e.0);
        let mut out: Vec<(u64, Digest)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(l) if l.0 == e.0 => *l = e,
                _ => out.push(e),
            }
        }
        out
    }
    let mut files: Vec<(PathBuf, u64)> = Vec::new();
    loop {
        let mut chunk = Vec::with_capacity(run.min(1 << 16));
        for e in input.by_ref().take(run) {
            chunk.push(e?);
        }
        let done = chunk.len() < run;
        let sorted = sorted_run(chunk);
        if done && files.is_empty() {
            return Ok(Box::new(sorted.into_iter().map(Ok)));
        }
        if !sorted.is_empty() {
            let p = dir.join(format!("sort-{}.tmp", files.len()));
            let mut w =
                BufWriter::with_capacity(1 << 20, File::create(&p).map_err(io(&p, "create"))?);
            for (pg, d) in &sorted {
                w.write_all(&encode_entry(*pg, d))
                    .map_err(io(&p, "write"))?;
            }
            w.flush().map_err(io(&p, "write"))?;
            files.push((p, sorted.len() as u64));
        }
        if done {
            break;
        }
    }
    // Merge: the smallest page first; among runs holding it, the latest run's entry wins.
    let mut its = Vec::with_capacity(files.len());
    for (p, n) in &files {
        let f = File::open(p).map_err(io(p, "open"))?;
        its.push(EntryIter {
            r: BufReader::with_capacity(1 << 20, f),
            left: *n,
            path: p.clone(),
        });
    }
    let mut heads: Vec<Option<(u64, Digest)>> = Vec::with_capacity(its.len());
    for it in its.iter_mut() {
        heads.push(it.next().transpose()?);
    }
    let out = dir.join("sorted.tmp");
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&out).map_err(io(&out, "create"))?);
    let mut n = 0u64;
    while let Some(page) = heads.iter().flatten().map(|e| e.0).min() {
        let mut winner = None;
        for (i, h) in heads.iter_mut().enumerate() {
            if h.is_some_and(|e| e.0 == page) {
                winner = h.take();
                *h = its[i].next().transpose()?;
            }
        }
        let (pg, d) = winner.expect("some run holds the page");
        w.write_all(&encode_entry(pg, &d))
            .map_err(io(&out, "write"))?;
        n += 1;
    }
    w.flush().map_err(io(&out, "write"))?;
    drop(its);
    for (p, _) in &files {
        let _ = fs::remove_file(p);
    }
    let f = File::open(&out).map_err(io(&out, "open"))?;
    Ok(Box::new(EntryIter {
        r: BufReader::with_capacity(1 << 20, f),
        left: n,
        path: out,
    }))
}

impl Iterator for EntryIter {
    type Item = Result<(u64, Digest), StoreError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut e = [0u8; DELTA_ENTRY_LEN];
        Some(
            self.r
                .read_exact(&mut e)
                .map(|_| decode_entry(&e))
                .map_err(io(&self.path, "read")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounded sort gives what an in-memory map gives: ascending pages, the last update of
    /// each winning, whether the input fits one run or spills into many.
    #[test]
    fn out_of_order_updates_sort_in_bounded_runs_and_the_last_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut input = Vec::new();
        for i in 0..5000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&i.to_le_bytes());
            input.push((x % 700, d));
        }
        let mut want = std::collections::BTreeMap::new();
        for (p, d) in &input {
            want.insert(*p, *d);
        }
        let want: Vec<(u64, Digest)> = want.into_iter().collect();
        for run in [7, 100, 4999, 5000, 1 << 20] {
            let got: Vec<(u64, Digest)> =
                sort_entries(input.iter().copied().map(Ok), dir.path(), run)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
            assert_eq!(got, want, "runs of {run}");
            let left: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().starts_with("sort-"))
                .collect();
            assert!(left.is_empty(), "{left:?}");
        }
    }
}
