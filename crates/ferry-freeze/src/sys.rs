//! The few raw system calls this crate needs, each wrapped once.
//!
//! Everything here that the watchdog child calls after `fork()` is async-signal-safe: plain
//! system calls on integers and stack buffers, no allocation, no locks, no panics.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `_IOWR('X', 119, int)`: freeze the filesystem of the file descriptor (linux/fs.h).
pub(crate) const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`: thaw it.
pub(crate) const FITHAW: libc::c_ulong = 0xC004_5878;

/// Opens a directory read-only, for an ioctl on its filesystem. Opening reads nothing and writes
/// nothing (no atime update), so it also works on a frozen filesystem.
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `FIFREEZE` on the filesystem of `fd`. Blocks while the kernel syncs it.
pub(crate) fn freeze_fd(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: FIFREEZE takes an int argument that the kernel ignores; `fd` is open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FIFREEZE, 0 as libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `syncfs()`: write back the whole filesystem of `fd`.
pub(crate) fn syncfs(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: syncfs takes an open descriptor and nothing else.
    if unsafe { libc::syncfs(fd.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Result of one `FITHAW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Thawed {
    /// It was frozen and is thawed now.
    Yes,
    /// It was not frozen (`EINVAL`): nothing to do.
    WasNotFrozen,
}

/// `FITHAW` on the filesystem of `fd`; `EINVAL` (not frozen) is not an error.
pub(crate) fn thaw_fd(fd: RawFd) -> io::Result<Thawed> {
    match raw_thaw(fd) {
        0 => Ok(Thawed::Yes),
        libc::EINVAL => Ok(Thawed::WasNotFrozen),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// `FITHAW`, returning 0 or the errno. Async-signal-safe (used by the watchdog child).
#[inline]
pub(crate) fn raw_thaw(fd: RawFd) -> i32 {
    // SAFETY: FITHAW takes an int argument that the kernel ignores; an invalid fd only yields
    // EBADF.
    let r = unsafe { libc::ioctl(fd, FITHAW, 0 as libc::c_int) };
    if r < 0 {
        errno()
    } else {
        0
    }
}

/// The calling thread's errno. Async-signal-safe.
#[inline]
pub(crate) fn errno() -> i32 {
    // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds. Async-signal-safe.
#[inline]
pub(crate) fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let (sec, nsec): (i64, i64) = (ts.tv_sec, ts.tv_nsec);
    sec.wrapping_mul(1_000_000_000).wrapping_add(nsec)
}

/// `(st_dev, st_mode, st_rdev)` of a path (following symlinks).
pub(crate) fn stat(path: &Path) -> io::Result<libc::stat> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: all-zero bytes are a valid `stat` (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable; both outlive the call.
    if unsafe { libc::stat(c.as_ptr(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// `st_dev` of an open file descriptor.
pub(crate) fn fd_dev(fd: &OwnedFd) -> io::Result<libc::dev_t> {
    // SAFETY: all-zero bytes are a valid `stat` (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is writable.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_dev)
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
