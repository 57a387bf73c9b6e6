//! A shared mapping of a `BPF_F_MMAPABLE` array map, seen as atomics.
//!
//! The kernel side updates the same memory with atomic instructions while we read it, so the only
//! safe view from Rust is one of atomics: this type hands out nothing else.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::TrackerError;

pub(crate) struct MapMemory {
    ptr: NonNull<u64>,
    len: usize,
}

// SAFETY: the memory is only reached through atomics (`words`, `u32_at`), so sharing the mapping
// between threads is as safe as sharing a `&[AtomicU64]`.
unsafe impl Send for MapMemory {}
// SAFETY: as above.
unsafe impl Sync for MapMemory {}

impl MapMemory {
    /// Maps `len` bytes of the array map `fd` read-write and shared.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        map: &'static str,
    ) -> Result<MapMemory, TrackerError> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = len.div_ceil(page) * page;
        // SAFETY: a fresh mapping (addr NULL) of a map fd; the kernel checks `len` against the
        // map's size and fails the call if it is larger. Nothing else aliases the new range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(TrackerError::Mmap {
                map,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u64>()).ok_or(TrackerError::Mmap {
            map,
            source: std::io::Error::other("mmap returned NULL"),
        })?;
        Ok(MapMemory { ptr, len })
    }

    /// The whole mapping as 64-bit words.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `len` bytes, page-aligned (so aligned for u64), valid until drop,
        // and AtomicU64 has the layout of u64. All access goes through the atomics.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    /// The 32-bit word at byte offset `offset` (must be 4-aligned and inside the mapping).
    pub(crate) fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset & 3 == 0 && offset + 4 <= self.len,
            "offset {offset} out of the mapping"
        );
        // SAFETY: in bounds and aligned (checked above), valid until drop, accessed atomically only.
        unsafe {
            &*self
                .ptr
                .as_ptr()
                .cast::<u8>()
                .add(offset)
                .cast::<AtomicU32>()
        }
    }
}

impl Drop for MapMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mapped in `new`; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
