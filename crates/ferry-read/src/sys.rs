//! The opened disk: what it is, how big, and how `O_DIRECT` must be aligned for it.
//!
//! Each raw call (`BLKGETSIZE64`, `BLKSSZGET`) is wrapped once here.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{ReadError, CHUNK_SIZE};

/// Buffer alignment and read granularity for `O_DIRECT` on regular files, and the least buffer
/// alignment anywhere. 4096 is a multiple of every common logical block size (512, 4096), so it is
/// safe without asking the filesystem (`statx` `STATX_DIOALIGN` needs Linux 6.1).
pub(crate) const DIRECT_ALIGN: u64 = 4096;
/// The smallest logical block size Linux has.
const MIN_BLOCK: u64 = 512;
/// `EINTR`/`EAGAIN` in a row on one extent before the read is reported as failed.
pub(crate) const MAX_RETRIES: u32 = 64;

/// True for the errors a read is simply tried again after.
pub(crate) fn is_retryable(errno: i32) -> bool {
    errno == libc::EINTR || errno == libc::EAGAIN
}

/// `_IOR(0x12, 114, size_t)` (linux/fs.h): the size of a block device in bytes, as a u64. This is
/// the generic ioctl encoding (x86, arm, riscv, s390x, loongarch); the others use `lseek` below.
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::Ioctl =
    ((2 << 30) | (std::mem::size_of::<usize>() << 16) | (0x12 << 8) | 114) as libc::Ioctl;

/// An opened disk.
pub(crate) struct Disk {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    /// Bytes.
    pub(crate) size: u64,
    /// `O_DIRECT` reads are whole multiples of this (the logical block size of a block device).
    pub(crate) block: u64,
}

/// Rejects anything but a regular file or a block device, by path, before opening it.
pub(crate) fn check_kind(path: &Path) -> Result<(), ReadError> {
    let meta = std::fs::metadata(path).map_err(|source| ReadError::Open {
        path: path.to_owned(),
        source,
    })?;
    is_block_device(&meta, path).map(|_| ())
}

/// Opens read-only with `O_DIRECT`. `EINVAL` means the filesystem refuses direct I/O.
pub(crate) fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

fn is_block_device(meta: &Metadata, path: &Path) -> Result<bool, ReadError> {
    let ft = meta.file_type();
    if ft.is_block_device() {
        Ok(true)
    } else if ft.is_file() {
        Ok(false)
    } else {
        Err(ReadError::NotADisk {
            path: path.to_owned(),
        })
    }
}

impl Disk {
    /// Finds the size and logical block size of an opened file or block device.
    pub(crate) fn new(file: File, path: &Path) -> Result<Disk, ReadError> {
        let geometry = |what| {
            move |source| ReadError::Geometry {
                path: path.to_owned(),
                what,
                source,
            }
        };
        let meta = file.metadata().map_err(geometry("type"))?;
        let (size, block) = if is_block_device(&meta, path)? {
            let size = device_size(&file).map_err(geometry("size (BLKGETSIZE64)"))?;
            let block = logical_block(&file).map_err(geometry("logical block size (BLKSSZGET)"))?;
            (size, block.max(MIN_BLOCK))
        } else {
            (meta.len(), DIRECT_ALIGN)
        };
        Ok(Disk {
            file,
            path: path.to_owned(),
            size,
            block,
        })
    }

    /// Alignment of the I/O buffers: at least a page, at least a logical block.
    pub(crate) fn align(&self) -> usize {
        // The block is at most CHUNK_SIZE here (see `direct_obstacle`), so it fits any usize.
        self.block.max(DIRECT_ALIGN) as usize
    }

    /// Why `O_DIRECT` cannot work on this disk's geometry, if it cannot: chunk offsets must be
    /// whole logical blocks.
    pub(crate) fn direct_obstacle(&self) -> Option<String> {
        if !self.block.is_power_of_two() || self.block > CHUNK_SIZE {
            return Some(format!(
                "the logical block size {} does not divide the {CHUNK_SIZE}-byte chunk",
                self.block
            ));
        }
        None
    }

    /// The error for a failed read of `len` bytes at `offset`.
    pub(crate) fn io_error(&self, offset: u64, len: u64, source: io::Error) -> ReadError {
        ReadError::Io {
            path: self.path.clone(),
            offset,
            len,
            source,
        }
    }

    /// The error for a read that found the end of the disk at `offset`, `len` bytes short.
    pub(crate) fn eof_error(&self, offset: u64, len: u64) -> ReadError {
        ReadError::Eof {
            path: self.path.clone(),
            offset,
            len,
        }
    }
}

#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
)))]
fn device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live u64; the fd
    // is open for the whole call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Architectures with another ioctl encoding: seeking to the end gives the same number.
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
))]
fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::End(0))
}

fn logical_block(file: &File) -> io::Result<u64> {
    let mut block: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live c_int; the fd
    // is open for the whole call.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut block as *mut libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(block).map_err(|_| io::Error::other(format!("negative block size {block}")))
}
