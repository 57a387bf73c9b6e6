//! An aligned, zero-initialised heap buffer for `O_DIRECT`, freed on drop.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// `len` bytes aligned to `align`, owned like a `Box<[u8]>`.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer owns its memory exclusively (like `Box<[u8]>`); it holds no thread-bound state.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align`. Panics if `align` is not a power of two
    /// or `len` is 0: both are fixed by this crate, never by input.
    pub(crate) fn new(len: usize, align: usize) -> AlignedBuf {
        assert!(len > 0, "AlignedBuf of 0 bytes");
        let layout = match Layout::from_size_align(len, align) {
            Ok(layout) => layout,
            Err(e) => panic!("AlignedBuf layout {len} / {align}: {e}"),
        };
        // SAFETY: the layout has a non-zero size (asserted above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed, then only written) bytes that
        // live as long as `self`; the shared borrow of `self` keeps them from being mutated.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the exclusive borrow of `self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_aligned_zeroed_and_writable() {
        for align in [512, 4096, 65536] {
            let mut buf = AlignedBuf::new(3 * align, align);
            assert_eq!(buf.as_slice().as_ptr() as usize % align, 0);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
            buf.as_mut_slice()[align] = 7;
            assert_eq!(buf.as_slice()[align], 7);
            assert_eq!(buf.as_slice().len(), 3 * align);
        }
    }
}
