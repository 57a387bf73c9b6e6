//! `ferry failback`: bring an on-premises disk (the original, or a new one) to the state of the
//! failed-over disk, moving only the 64 KiB chunks that differ.
//!
//! - Each `--from` (a fixed VHD, recognised by its footer, or a raw image, or a page blob
//!   `azure://ACCOUNT/CONTAINER/PATH.vhd` such as `ferry failover` makes) pairs with the `--to`
//!   of the same position (a block device or a raw image file; a file that does not exist is
//!   created at the disk's size, a new disk).
//! - Both sides are read chunk by chunk and compared; a chunk that differs is written to the
//!   target. Nothing else is written: the bytes moved are the diverged chunks.
//! - The target is opened exclusively (`O_EXCL` on a block device: refused while it is mounted or
//!   in use), synced (`fdatasync`) before the command reports success, and with `--verify` read
//!   back and compared (blake3) with the source as a whole.
//! - A target smaller than the source is refused; a larger one keeps what lies past the disk.
//! - A page blob is read from a snapshot taken at the start (deleted at the end), by its written
//!   page ranges (Get Page Ranges): pages never written are zeros and are not downloaded; every
//!   written range is downloaded once and compared. A target smaller than the blob's payload
//!   (rounded up to 1 MiB) is enough if it holds every written page. (Get Page
//!   Ranges against a snapshot — only what changed since the failover — is not offered by the
//!   `azure_storage_blob` crate this version uses, and Azurite ignores it.)
//! - Afterwards the disk holds the failed-over disk's bytes: protecting it again sends only what
//!   the store does not hold already (deduplicated by content), not a full copy.
//!
//! Must not: write a chunk that is equal already, or report success before the data is durable.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_job::{JobError, Progress};
use serde_json::json;

const CHUNK: usize = ferry_format::CHUNK_SIZE;
/// Read this much of each side at a time.
const BLOCK: usize = 64 * CHUNK;

fn io<'a>(p: &'a Path, what: &str) -> impl Fn(std::io::Error) -> JobError + 'a {
    let what = what.to_owned();
    move |e| JobError::Usage(format!("cannot {what} {}: {e}", p.display()))
}

/// The byte length of a disk image's payload: a fixed VHD without its 512-byte footer, a raw
/// image or block device whole.
fn source_size(p: &Path, f: &File) -> Result<(u64, &'static str), JobError> {
    let len = device_len(p, f)?;
    if len >= 512 {
        let mut foot = [0u8; 8];
        f.read_exact_at(&mut foot, len - 512)
            .map_err(io(p, "read"))?;
        if &foot == b"conectix" {
            return Ok((len - 512, "vhd"));
        }
    }
    if p.extension().is_some_and(|x| x == "vhd") {
        return Err(JobError::Usage(format!(
            "{}: named .vhd but has no VHD footer; give a fixed VHD (as `ferry failover` writes) or a raw image",
            p.display()
        )));
    }
    Ok((len, "raw"))
}

/// Length of a regular file or a block device.
fn device_len(p: &Path, f: &File) -> Result<u64, JobError> {
    let m = f.metadata().map_err(io(p, "stat"))?;
    if m.file_type().is_block_device() {
        // A block device's end is its size.
        use std::io::Seek;
        let mut r = f;
        r.seek(std::io::SeekFrom::End(0)).map_err(io(p, "size"))
    } else if m.is_file() {
        Ok(m.len())
    } else {
        Err(JobError::Usage(format!(
            "{}: not a disk image file or a block device",
            p.display()
        )))
    }
}

/// Where the failed-over disk is read from.
enum Source {
    File(File),
    /// A fixed-VHD page blob, read through a snapshot taken when the failback starts (one
    /// consistent state even if something writes the blob meanwhile; deleted at the end): its
    /// written ranges (`(start, end)`, sorted, within the payload).
    Blob {
        blobs: ferry_azure::AzureBlobs,
        name: String,
        snapshot: String,
        written: Vec<(u64, u64)>,
    },
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Blob {
            blobs,
            name,
            snapshot,
            ..
        } = self
        {
            if let Err(e) = blobs.delete_snapshot(name, snapshot) {
                errln!("warning: cannot delete the snapshot {snapshot} of {name} this failback read: {e}; delete it by hand (it costs storage only)");
            }
        }
    }
}

impl Source {
    /// Opens `from` and returns it with its payload size, format, and the disk's own size when a
    /// failover record names it (a page blob's payload is rounded up to 1 MiB).
    fn open(from: &Path) -> Result<(Source, u64, &'static str, Option<u64>), JobError> {
        let Some(url) = from.to_str().and_then(|s| s.strip_prefix("azure://")) else {
            let f = File::open(from).map_err(io(from, "open"))?;
            let (size, format) = source_size(from, &f)?;
            return Ok((Source::File(f), size, format, None));
        };
        let mut it = url.splitn(3, '/');
        let (account, container, name) = (
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
        );
        if account.is_empty()
            || container.is_empty()
            || name.is_empty()
            || name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(JobError::Usage(format!(
                "--from {}: write azure://ACCOUNT/CONTAINER/PATH/DISK.vhd (`ferry failover list --store azure://ACCOUNT/CONTAINER` shows the failed-over disks)",
                from.display()
            )));
        }
        let az = |e: ferry_azure::AzureError| JobError::Azure(e.to_string());
        // Not ferry_job::azure::connect: a mistyped container must not be created.
        let blobs = ferry_azure::AzureBlobs::new(
            ferry_azure::AzureConfig::from_url(&format!("azure://{account}/{container}"))
                .map_err(az)?,
        )
        .map_err(az)?;
        let len = blobs.blob_size(name).map_err(az)?.ok_or_else(|| {
            JobError::Usage(format!(
                "--from {}: no such blob (`ferry failover list --store azure://{account}/{container}` shows the failed-over disks)",
                from.display()
            ))
        })?;
        let foot = if len >= 512 {
            blobs.get_range(name, None, len - 512, 512).map_err(az)?
        } else {
            Vec::new()
        };
        if foot.len() != 512 || &foot[..8] != b"conectix" {
            return Err(JobError::Usage(format!(
                "--from {}: not a fixed VHD page blob (no VHD footer); give a disk `ferry failover` made, or a managed disk exported into the container",
                from.display()
            )));
        }
        let size = len - 512;
        // The disk as the failover made it: a VM made of it with `az disk create` writes to its
        // managed disk (a copy), not to this blob.
        let recorded = crate::failover::azure::records(&blobs)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.kind == "failover")
            .find_map(|r| {
                r.disks
                    .iter()
                    .find(|d| d.path.to_str() == Some(name))
                    .map(|d| d.size)
            });
        if recorded.is_some() {
            errln!(
                "note: {} is the disk as the failover made it. A VM made of it with `az disk create` writes to its managed disk, not to this blob: to fail back what that VM wrote, export the managed disk into the container first (az disk grant-access --access Read …; az storage blob copy start --source-uri SAS --destination-blob failback/DISK.vhd …) and give that blob",
                from.display()
            );
        }
        let snapshot = blobs.snapshot(name).map_err(az)?;
        // Made before the listing: dropping it (on an error below too) deletes the snapshot.
        let mut src = Source::Blob {
            blobs,
            name: name.to_owned(),
            snapshot,
            written: Vec::new(),
        };
        if let Source::Blob {
            blobs,
            name,
            snapshot,
            written,
        } = &mut src
        {
            *written = blobs
                .list_page_ranges(name, Some(snapshot))
                .map_err(az)?
                .into_iter()
                .filter_map(|(a, b)| (a < size).then_some((a, b.min(size))))
                .collect();
        }
        Ok((src, size, "page blob", recorded))
    }

    /// Fills `buf` with the disk's bytes at `off`; counts what was downloaded in `fetched`.
    fn read(
        &self,
        from: &Path,
        buf: &mut [u8],
        off: u64,
        fetched: &mut u64,
    ) -> Result<(), JobError> {
        match self {
            Source::File(f) => f.read_exact_at(buf, off).map_err(io(from, "read")),
            Source::Blob {
                blobs,
                name,
                snapshot,
                written,
            } => {
                buf.fill(0);
                let end = off + buf.len() as u64;
                let first = written.partition_point(|r| r.1 <= off);
                for &(a, b) in &written[first..] {
                    if a >= end {
                        break;
                    }
                    let (s, e) = (a.max(off), b.min(end));
                    let data = blobs
                        .get_range(name, Some(snapshot), s, e - s)
                        .map_err(|e| JobError::Azure(e.to_string()))?;
                    if data.len() as u64 != e - s {
                        return Err(JobError::Azure(format!(
                            "{name}: {} bytes read at {s}, {} asked",
                            data.len(),
                            e - s
                        )));
                    }
                    let at = (s - off) as usize;
                    buf[at..at + data.len()].copy_from_slice(&data);
                    *fetched += e - s;
                }
                Ok(())
            }
        }
    }

    /// The end of the last written byte (a page blob), or `size` (a file).
    fn data_end(&self, size: u64) -> u64 {
        match self {
            Source::File(_) => size,
            Source::Blob { written, .. } => written.last().map_or(0, |r| r.1),
        }
    }
}

/// What failback did to one disk.
struct DiskReport {
    from: PathBuf,
    to: PathBuf,
    format: &'static str,
    size: u64,
    created: bool,
    chunks: u64,
    differing: u64,
    bytes_moved: u64,
    /// Bytes downloaded from a page blob (None: a local file).
    downloaded: Option<u64>,
    verified: Option<String>,
    seconds: f64,
}

fn one(
    from: &Path,
    to: &Path,
    verify: bool,
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<DiskReport, JobError> {
    let t0 = Instant::now();
    let (src, mut size, format, recorded) = Source::open(from)?;
    let mut created = false;
    let dst = match std::fs::metadata(to) {
        Ok(m) if m.file_type().is_block_device() => OpenOptions::new()
            .read(true)
            .write(!dry_run)
            // Exclusive: refused while a filesystem on it is mounted or anything holds it.
            .custom_flags(libc::O_EXCL)
            .open(to)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    JobError::Usage(format!(
                        "{} is in use (mounted, or open in another program): unmount it and stop what uses it; failback writes the whole disk's state",
                        to.display()
                    ))
                } else {
                    io(to, "open")(e)
                }
            })?,
        Ok(m) if m.is_file() => OpenOptions::new()
            .read(true)
            .write(!dry_run)
            .open(to)
            .map_err(io(to, "open"))?,
        Ok(_) => {
            return Err(JobError::Usage(format!(
                "--to {}: not a block device or a disk image file",
                to.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dry_run => {
            // A new disk: a sparse file of the disk's size (its holes read as zeros).
            created = true;
            // A disk named by a failover record is made at the disk's own size.
            if let Some(r) = recorded.filter(|r| *r <= size && src.data_end(size) <= *r) {
                size = r;
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(to)
                .map_err(io(to, "create"))?;
            f.set_len(size).map_err(io(to, "size"))?;
            f
        }
        Err(e) => return Err(io(to, "open")(e)),
    };
    let dst_len = device_len(to, &dst)?;
    // A page blob's payload is rounded up to 1 MiB: a disk as large as its written part is enough
    // (what lies past the disk's end was never written, zeros).
    if dst_len < size && matches!(src, Source::Blob { .. }) && src.data_end(size) <= dst_len {
        size = dst_len;
    }
    if dst_len < size {
        return Err(JobError::Usage(format!(
            "{} holds {} bytes, less than the failed-over disk's {size}: give a disk at least as large",
            to.display(),
            dst_len
        )));
    }
    let (mut a, mut b) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let (mut chunks, mut differing, mut moved, mut fetched) = (0u64, 0u64, 0u64, 0u64);
    // The failed-over disk's digest, as it is read (a page blob is not downloaded twice).
    let mut want = blake3::Hasher::new();
    progress.start(
        &format!("failback {} → {}", from.display(), to.display()),
        size,
    );
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(BLOCK as u64) as usize;
        src.read(from, &mut a[..n], off, &mut fetched)?;
        want.update(&a[..n]);
        dst.read_exact_at(&mut b[..n], off)
            .map_err(io(to, "read"))?;
        let mut i = 0;
        while i < n {
            let m = (n - i).min(CHUNK);
            chunks += 1;
            if a[i..i + m] != b[i..i + m] {
                differing += 1;
                moved += m as u64;
                if !dry_run {
                    dst.write_all_at(&a[i..i + m], off + i as u64)
                        .map_err(io(to, "write"))?;
                }
            }
            i += m;
        }
        off += n as u64;
        progress.update(off);
    }
    progress.finish();
    if !dry_run {
        ferry_durable::sync_data(&dst).map_err(io(to, "sync"))?;
        if created {
            if let Some(p) = to.parent() {
                ferry_durable::fsync_dir(p).map_err(io(p, "sync"))?;
            }
        }
    }
    let verified = if verify && !dry_run {
        let mut digest = |f: &File, p: &Path| -> Result<String, JobError> {
            let mut h = blake3::Hasher::new();
            let mut off = 0u64;
            while off < size {
                let n = (size - off).min(BLOCK as u64) as usize;
                f.read_exact_at(&mut a[..n], off).map_err(io(p, "read"))?;
                h.update(&a[..n]);
                off += n as u64;
            }
            Ok(h.finalize().to_hex().to_string())
        };
        // A file is read again (it may have changed meanwhile); a page blob was read from a
        // snapshot, which cannot change: its digest is the one taken while comparing.
        let want = match &src {
            Source::File(f) => digest(f, from)?,
            Source::Blob { .. } => want.finalize().to_hex().to_string(),
        };
        // The target read back through the page cache after fdatasync: what a reader sees.
        let got = digest(&dst, to)?;
        if want != got {
            return Err(JobError::Usage(format!(
                "verification failed: {} reads back as blake3 {got}, the failed-over disk is {want}",
                to.display()
            )));
        }
        Some(want)
    } else {
        None
    };
    Ok(DiskReport {
        from: from.to_owned(),
        to: to.to_owned(),
        format,
        size,
        created,
        chunks,
        differing,
        bytes_moved: moved,
        downloaded: matches!(src, Source::Blob { .. }).then_some(fetched),
        verified,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What `ferry failback` was asked.
pub(crate) struct Args {
    pub vm: String,
    pub from: Vec<PathBuf>,
    pub to: Vec<PathBuf>,
    pub verify: bool,
    pub dry_run: bool,
    pub json: bool,
    pub state_dir: Option<PathBuf>,
}

/// `ferry failback`.
pub(crate) fn run(a: Args) -> Result<(), JobError> {
    ferry_job::validate_name("VM", &a.vm)?;
    if a.from.is_empty() || a.from.len() != a.to.len() {
        return Err(JobError::Usage(format!(
            "give one --to per --from, in the same order ({} --from, {} --to)",
            a.from.len(),
            a.to.len()
        )));
    }
    for (i, t) in a.to.iter().enumerate() {
        if a.to[..i].contains(t) || a.from.contains(t) {
            return Err(JobError::Usage(format!(
                "{} is named twice: each --to is a different disk",
                t.display()
            )));
        }
    }
    let progress = crate::progress::Bars::new();
    let mut reports = Vec::new();
    for (f, t) in a.from.iter().zip(&a.to) {
        reports.push(one(f, t, a.verify, a.dry_run, &progress)?);
    }
    let total: u64 = reports.iter().map(|r| r.bytes_moved).sum();
    let size: u64 = reports.iter().map(|r| r.size).sum();
    if !a.dry_run {
        crate::failover::event(
            &a.state_dir,
            ferry_serve::events::Event::new(
                "failback",
                Some(&a.vm),
                format!(
                    "failback of {} disk(s): {} of {} differed and was written{}",
                    reports.len(),
                    crate::units::human(total),
                    crate::units::human(size),
                    if a.verify { ", verified" } else { "" }
                ),
            ),
        );
    }
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "vm": a.vm,
                "dry_run": a.dry_run,
                "bytes_moved": total,
                "disk_bytes": size,
                "disks": reports.iter().map(|r| json!({
                    "from": r.from, "to": r.to, "format": r.format, "size": r.size,
                    "created": r.created, "chunks": r.chunks, "chunks_differing": r.differing,
                    "bytes_moved": r.bytes_moved, "bytes_downloaded": r.downloaded,
                    "blake3": r.verified, "seconds": r.seconds,
                })).collect::<Vec<_>>(),
            }))
            .expect("json")
        );
        return Ok(());
    }
    for r in &reports {
        outln!(
            "{} → {}{}: {} of {} chunks differ{}; {} {} ({:.2} % of the disk){} in {:.1} s{}",
            r.from.display(),
            r.to.display(),
            if r.created { " (new)" } else { "" },
            r.differing,
            r.chunks,
            if a.dry_run { "" } else { "ed" },
            if a.dry_run { "would move" } else { "moved" },
            crate::units::human(r.bytes_moved),
            100.0 * r.bytes_moved as f64 / r.size.max(1) as f64,
            match r.downloaded {
                Some(d) => format!(
                    "; downloaded {} (the blob's written pages)",
                    crate::units::human(d)
                ),
                None => String::new(),
            },
            r.seconds,
            match &r.verified {
                Some(_) => "; verified",
                None => "",
            }
        );
    }
    if !a.dry_run {
        outln!(
            "The on-premises disks hold the failed-over state. Protect them again (ferry-agent, or ferry replicate --vm NAME): only what the store does not hold is sent."
        );
    }
    Ok(())
}
