//! Restore: a recovery point back to bytes — a raw image or a fixed VHD — with optional verification.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::bounded;
use ferry_crypto::{Digest, ZERO_DIGEST};
use ferry_format::manifest::Point;
use ferry_format::{vhd, CHUNK_SIZE};
use ferry_store::{LocalStore, Replica, StoreError};

/// How to write the restored disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Exactly the disk's bytes.
    Raw,
    /// The disk rounded up to 1 MiB, then a 512-byte fixed-VHD footer (Azure-attachable).
    Vhd,
}

impl OutputFormat {
    /// `.vhd` → Vhd, anything else → Raw.
    pub fn from_path(p: &Path) -> Self {
        match p.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("vhd") => OutputFormat::Vhd,
            _ => OutputFormat::Raw,
        }
    }
}

/// What to restore, and where.
pub struct RestoreOptions<'a> {
    pub vm: &'a str,
    pub disk: &'a str,
    pub point: &'a Point,
    pub out: &'a Path,
    pub format: OutputFormat,
    pub threads: usize,
    /// Called with bytes restored so far.
    pub progress: &'a (dyn Fn(u64) + Sync),
}

/// What a restore did.
#[derive(Clone, Debug)]
pub struct RestoreReport {
    pub bytes: u64,
    pub chunks_read: u64,
}

/// Errors of restore; each names the point and, where known, the file.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// restoring point {point} of {vm}/{disk} failed: {source}
    #[error("restoring point {point} of {vm}/{disk} failed: {source}")]
    Store {
        point: String,
        vm: String,
        disk: String,
        source: StoreError,
    },
    /// output error
    #[error("cannot {op} {}: {source}", path.display())]
    Output {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    /// digest mismatch
    #[error("verification failed: {} has blake3 {found}, but point {point} recorded {expected} for disk {disk}", path.display())]
    Verify {
        path: PathBuf,
        point: String,
        disk: String,
        found: String,
        expected: String,
    },
    /// disk not in point
    #[error("point {point} has no disk {disk}; it has: {available}")]
    NoDisk {
        point: String,
        disk: String,
        available: String,
    },
}

/// Restores one disk of a point. Takes no lock: pin the point first
/// ([`ferry_store::readers::pin_point`]) so retention keeps what it needs.
pub fn restore(store: &LocalStore, o: &RestoreOptions<'_>) -> Result<RestoreReport, RestoreError> {
    let pd = o
        .point
        .disks
        .iter()
        .find(|d| d.name == o.disk)
        .ok_or_else(|| RestoreError::NoDisk {
            point: o.point.id.clone(),
            disk: o.disk.into(),
            available: o
                .point
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let serr = |source: StoreError| RestoreError::Store {
        point: o.point.id.clone(),
        vm: o.vm.into(),
        disk: o.disk.into(),
        source,
    };
    let oerr = |op| {
        move |source| RestoreError::Output {
            path: o.out.to_owned(),
            op,
            source,
        }
    };
    // No lock and no dedupe index: the writer may be committing newer points meanwhile (see
    // ferry_store::readers). The caller has pinned the point.
    let dir = store.replica_dir(o.vm, o.disk);
    let wanted = ferry_store::readers::point_digests(&dir, o.point.seq).map_err(serr)?;
    let locs = ferry_store::readers::locate_chunks(store, (o.vm, o.disk), wanted).map_err(serr)?;
    let replica = Replica::open_readonly(&dir).map_err(serr)?;
    let size = pd.size;
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(o.out)
        .map_err(oerr("create"))?;
    let is_dev = out
        .metadata()
        .map_err(oerr("stat"))?
        .file_type()
        .is_block_device();
    if !is_dev {
        // Sparse output: zero pages are never written.
        out.set_len(0).map_err(oerr("truncate"))?;
        out.set_len(size).map_err(oerr("extend"))?;
    }
    let pages = ferry_store::replica::pages_for(size);
    let mut reader = ferry_store::readers::LiveReader::open(&dir, o.point.seq).map_err(serr)?;
    let done = AtomicU64::new(0);
    let chunks_read = AtomicU64::new(0);
    let first_err: Mutex<Option<RestoreError>> = Mutex::new(None);
    const WINDOW: u64 = 1024;
    let zero = vec![0u8; CHUNK_SIZE];
    std::thread::scope(|s| -> Result<(), RestoreError> {
        let (tx, rx) = bounded::<(u64, Digest, ferry_format::segment::ChunkLoc)>(256);
        for _ in 0..o.threads.max(1) {
            let rx = rx.clone();
            let (out, first_err, done, chunks_read) = (&out, &first_err, &done, &chunks_read);
            s.spawn(move || {
                for (page, digest, loc) in rx {
                    if first_err.lock().expect("poisoned").is_some() {
                        continue;
                    }
                    let r = (|| {
                        let data = store.read_chunk(&loc).map_err(serr)?;
                        let off = page * CHUNK_SIZE as u64;
                        let want = (size - off).min(CHUNK_SIZE as u64) as usize;
                        if store.key().digest(&data) != digest || data.len() != want {
                            return Err(serr(StoreError::Format {
                                path: store.root().join(&loc.segment),
                                source: ferry_format::FormatError::Corrupt {
                                    what: "segment chunk",
                                    offset: loc.offset,
                                    detail: "content does not match its digest".into(),
                                },
                            }));
                        }
                        out.write_all_at(&data, off).map_err(oerr("write"))?;
                        chunks_read.fetch_add(1, Ordering::Relaxed);
                        (o.progress)(done.fetch_add(want as u64, Ordering::Relaxed) + want as u64);
                        Ok(())
                    })();
                    if let Err(e) = r {
                        first_err.lock().expect("poisoned").get_or_insert(e);
                    }
                }
            });
        }
        drop(rx);
        let mut digests = vec![ZERO_DIGEST; WINDOW as usize];
        let mut first = 0;
        while first < pages {
            if first_err.lock().expect("poisoned").is_some() {
                break;
            }
            let n = (pages - first).min(WINDOW) as usize;
            reader.read(first, &mut digests[..n]).map_err(serr)?;
            let wanted: Vec<(u64, Digest)> = digests[..n]
                .iter()
                .enumerate()
                .filter(|(_, d)| **d != ZERO_DIGEST)
                .map(|(i, d)| (first + i as u64, *d))
                .collect();
            for (i, d) in digests[..n].iter().enumerate() {
                if *d == ZERO_DIGEST {
                    let off = (first + i as u64) * CHUNK_SIZE as u64;
                    let len = (size - off).min(CHUNK_SIZE as u64);
                    if is_dev {
                        out.write_all_at(&zero[..len as usize], off)
                            .map_err(oerr("write"))?;
                    }
                    (o.progress)(done.fetch_add(len, Ordering::Relaxed) + len);
                }
            }
            for (page, d) in wanted {
                let loc = locs.get(&d).cloned().ok_or_else(|| {
                    serr(StoreError::Index(format!(
                        "chunk {} of page {page} is in no segment of the store; the store is damaged",
                        hex::encode(&d[..8])
                    )))
                })?;
                if tx.send((page, d, loc)).is_err() {
                    break;
                }
            }
            first += n as u64;
        }
        drop(tx);
        Ok(())
    })?;
    if let Some(e) = first_err.into_inner().expect("poisoned") {
        return Err(e);
    }
    if o.format == OutputFormat::Vhd {
        let vsize = vhd::vhd_size(size);
        if !is_dev {
            out.set_len(vsize).map_err(oerr("extend"))?;
        }
        let footer = replica.footer().map_err(serr)?;
        out.write_all_at(&footer, vsize).map_err(oerr("write"))?;
    }
    out.sync_all().map_err(oerr("sync"))?;
    Ok(RestoreReport {
        bytes: size,
        chunks_read: chunks_read.into_inner(),
    })
}

/// Re-reads the first `size` bytes of `path` and checks their blake3 against the point's digest
/// (and, for a VHD, the footer after the rounded-up size).
pub fn verify_file(
    path: &Path,
    point: &Point,
    disk: &str,
    format: OutputFormat,
    progress: &dyn Fn(u64),
) -> Result<(), RestoreError> {
    let pd = point
        .disks
        .iter()
        .find(|d| d.name == disk)
        .expect("restore checked the disk exists");
    let oerr = |op| {
        move |source| RestoreError::Output {
            path: path.to_owned(),
            op,
            source,
        }
    };
    let mut f = File::open(path).map_err(oerr("open"))?;
    let mut h = blake3::Hasher::new();
    let mut left = pd.size;
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n]).map_err(oerr("read"))?;
        h.update(&buf[..n]);
        left -= n as u64;
        done += n as u64;
        progress(done);
    }
    let found = h.finalize().to_hex().to_string();
    if found != pd.blake3 {
        return Err(RestoreError::Verify {
            path: path.into(),
            point: point.id.clone(),
            disk: disk.into(),
            found,
            expected: pd.blake3.clone(),
        });
    }
    if format == OutputFormat::Vhd {
        let mut footer = [0u8; vhd::FOOTER_LEN];
        f.read_exact_at(&mut footer, vhd::vhd_size(pd.size))
            .map_err(oerr("read footer of"))?;
        let d = vhd::decode(&footer).map_err(|e| RestoreError::Output {
            path: path.into(),
            op: "validate",
            source: std::io::Error::other(e.to_string()),
        })?;
        if d.current_size != vhd::vhd_size(pd.size) {
            return Err(RestoreError::Output {
                path: path.into(),
                op: "validate",
                source: std::io::Error::other("VHD footer size does not match the disk"),
            });
        }
    }
    Ok(())
}
