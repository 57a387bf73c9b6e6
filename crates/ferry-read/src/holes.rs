//! Where a source's data lies, where the kernel can say, so that holes are not read.
//!
//! - A **regular file** (an image): `SEEK_DATA`/`SEEK_HOLE` on the file itself.
//! - A **loop device**, or a partition of one: `SEEK_DATA`/`SEEK_HOLE` on its backing file, at the
//!   loop's offset (and the partition's start). A hole of the backing file reads as zeros through
//!   the loop device, so a hole is known zero without reading it. The loop is asked again
//!   (`LOOP_GET_STATUS64`) before each use: a loop re-attached to another file, or at another
//!   offset, gives no map rather than a wrong one.
//! - **Any other block device** gives no map: it is read whole. A disk's allocation is not visible
//!   from inside a VM (virtio and SCSI disks do not report it); what the tracker sees of discards
//!   and zeroing travels as ranges anyway, never as data.
//!
//! Exactness: a range is reported a hole only where the kernel says so at the moment of asking,
//! which is what a read at that moment would have returned. Before asking about a loop device,
//! [`DataMap::settle`] writes the device's own dirty page cache (a filesystem's metadata lives
//! there) into the loop, so that the backing file holds what a read of the device would return.
//! Where the kernel cannot answer (`EINVAL`, `EOPNOTSUPP`), everything is data.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// `LOOP_GET_STATUS64` (linux/loop.h).
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
/// The block layer's sector, in which sysfs gives a partition's start.
const SECTOR: u64 = 512;
/// Major number of loop devices (partitions of them have the extended major 259).
const LOOP_MAJOR: u32 = 7;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// What a loop device was attached to when the map was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attached {
    dev: u64,
    ino: u64,
    offset: u64,
}

enum Kind {
    /// The source is a regular file: it is its own map.
    File,
    /// The source is a loop device (or a partition of one, starting `start` bytes into it).
    Loop {
        backing: File,
        backing_path: PathBuf,
        attached: Attached,
        start: u64,
    },
}

/// Where the data of one source lies. See the module documentation.
pub struct DataMap {
    kind: Kind,
}

/// What [`DataMap::of`] found.
pub enum Found {
    Map(DataMap),
    /// No map: the source is read whole; the reason is for a log line.
    Whole(String),
}

impl DataMap {
    /// The map of `source` (opened from `path`): the file itself, a loop device's backing file,
    /// or none.
    pub fn of(source: &File, path: &Path) -> Found {
        let meta = match source.metadata() {
            Ok(m) => m,
            Err(e) => return Found::Whole(format!("cannot stat it ({e})")),
        };
        if meta.file_type().is_file() {
            return Found::Map(DataMap { kind: Kind::File });
        }
        if !meta.file_type().is_block_device() {
            return Found::Whole("neither a file nor a block device".into());
        }
        match loop_map(source, meta.rdev()) {
            Ok(m) => Found::Map(m),
            Err(why) => Found::Whole(format!("{}: {why}", path.display())),
        }
    }

    /// Whether the source is a regular file (its own map).
    pub fn is_file(&self) -> bool {
        matches!(self.kind, Kind::File)
    }

    /// What backs the source, for a log line: `None` for a regular file (itself).
    pub fn backing(&self) -> Option<&Path> {
        match &self.kind {
            Kind::File => None,
            Kind::Loop { backing_path, .. } => Some(backing_path),
        }
    }

    /// Makes the map true for `[offset, offset + len)` of `source` now: a loop device's dirty page
    /// cache in the range is written into the loop (so its backing file holds it), and the loop
    /// must still be attached as when the map was made. `Ok(false)`: it is not; read the range.
    pub fn settle(&self, source: &File, offset: u64, len: u64) -> io::Result<bool> {
        let Kind::Loop { attached, .. } = &self.kind else {
            return Ok(true);
        };
        if loop_status(source).ok().as_ref() != Some(attached) {
            return Ok(false);
        }
        // SAFETY: a valid fd and plain integers.
        let r = unsafe {
            libc::sync_file_range(
                source.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }

    /// The first offset at or after `offset` of the source that may hold data; `None` when only a
    /// hole follows to the end of what backs it. For a loop device that is zeros (the loop reads
    /// zeros past its file's end); for a file, the caller checks it did not shrink (bytes that
    /// are gone are not zeros). Where the kernel cannot tell, `offset`.
    pub fn next_data(&self, source: &File, offset: u64) -> io::Result<Option<u64>> {
        self.seek(source, offset, libc::SEEK_DATA)
    }

    /// The first offset at or after `offset` (which holds data) where a hole starts; `None` when
    /// data runs to the end of what backs it.
    pub fn next_hole(&self, source: &File, offset: u64) -> io::Result<Option<u64>> {
        self.seek(source, offset, libc::SEEK_HOLE)
    }

    fn seek(&self, source: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let (file, base) = match &self.kind {
            Kind::File => (source, 0),
            Kind::Loop {
                backing,
                attached,
                start,
                ..
            } => (backing, attached.offset + start),
        };
        let at = offset
            .checked_add(base)
            .filter(|x| *x <= i64::MAX as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset past any file"))?;
        // SAFETY: lseek on a valid fd with plain integers (pread/io_uring ignore the file offset).
        let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
        if r >= 0 {
            let r = r as u64;
            // The kernel answers at or after `at` (>= base); anything else is taken for data at
            // `offset`, never for a hole.
            if r < at {
                return Ok(Some(offset));
            }
            return Ok(Some(r - base));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(offset)),
            _ => Err(e),
        }
    }
}

fn loop_status(dev: &File) -> io::Result<Attached> {
    // SAFETY: all-zero bytes are a valid LoopInfo64 (integers and byte arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 fills a struct loop_info64, which `info` is.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if info.lo_encrypt_type != 0 {
        return Err(io::Error::other("an encrypting loop device"));
    }
    Ok(Attached {
        dev: info.lo_device,
        ino: info.lo_inode,
        offset: info.lo_offset,
    })
}

fn loop_map(dev: &File, rdev: u64) -> Result<DataMap, String> {
    let sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let read = |p: &Path| std::fs::read_to_string(p).map(|s| s.trim().to_owned());
    // A partition: its start, and the whole device's sysfs directory above it.
    let (whole, start) = if sys.join("partition").exists() {
        let start: u64 = read(&sys.join("start"))
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("a partition whose start sysfs does not give")?;
        let whole = std::fs::canonicalize(&sys)
            .map_err(|e| format!("cannot resolve {} ({e})", sys.display()))?
            .parent()
            .map(Path::to_owned)
            .ok_or("a partition without a parent device")?;
        (whole, start * SECTOR)
    } else {
        if libc::major(rdev) != LOOP_MAJOR {
            return Err("not a loop device: its allocation is not visible".into());
        }
        (sys, 0)
    };
    let backing_path = match read(&whole.join("loop/backing_file")) {
        Ok(p) => PathBuf::from(p),
        Err(_) => return Err("not a loop device: its allocation is not visible".into()),
    };
    let attached = loop_status(dev).map_err(|e| format!("LOOP_GET_STATUS64: {e}"))?;
    // The path is only a hint (a user who set the loop up may have changed what it names). It is
    // opened with O_PATH first, which opens nothing (no device's open, no FIFO wait), checked to be
    // the very file the loop is attached to, and only then opened for reading, through that
    // descriptor.
    let hint = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(&backing_path)
            .map_err(|e| {
                format!(
                    "cannot open its backing file {} ({e})",
                    backing_path.display()
                )
            })?
    };
    let is_it = |f: &File| {
        f.metadata().is_ok_and(|m| {
            m.file_type().is_file() && (m.dev(), m.ino()) == (attached.dev, attached.ino)
        })
    };
    if !is_it(&hint) {
        return Err(format!(
            "{} is not the file the loop is attached to (deleted or replaced)",
            backing_path.display()
        ));
    }
    let backing = File::open(format!("/proc/self/fd/{}", hint.as_raw_fd()))
        .map_err(|e| format!("cannot open {} ({e})", backing_path.display()))?;
    if !is_it(&backing) {
        return Err(format!("{} changed while opened", backing_path.display()));
    }
    Ok(DataMap {
        kind: Kind::Loop {
            backing,
            backing_path,
            attached,
            start,
        },
    })
}
