//! The fallback engine: buffered `pread`, one extent at a time, into one reused 1 MiB buffer.

use std::os::unix::fs::FileExt;

use crate::buf::AlignedBuf;
use crate::plan::{self, Extent, Extents, Sink};
use crate::sys::{self, Disk, DIRECT_ALIGN};
use crate::{ReadError, ReadStats, MAX_EXTENT};

pub(crate) struct BufferedEngine {
    buf: AlignedBuf,
}

impl BufferedEngine {
    pub(crate) fn new() -> BufferedEngine {
        BufferedEngine {
            buf: AlignedBuf::new(MAX_EXTENT as usize, DIRECT_ALIGN as usize),
        }
    }

    pub(crate) fn run(
        &mut self,
        disk: &Disk,
        extents: Extents<'_>,
        sink: &mut Sink<'_>,
    ) -> Result<ReadStats, ReadError> {
        let mut stats = ReadStats::default();
        for ext in extents {
            self.read_extent(disk, &ext)?;
            plan::deliver(&ext, self.buf.as_slice(), sink)?;
            stats.ios += 1;
            stats.bytes += ext.len;
        }
        Ok(stats)
    }

    /// Fills the first `ext.len` bytes of the buffer, completing short reads.
    fn read_extent(&mut self, disk: &Disk, ext: &Extent) -> Result<(), ReadError> {
        let want = ext.len as usize;
        let buf = &mut self.buf.as_mut_slice()[..want];
        let mut done = 0;
        let mut retries = 0;
        while done < want {
            let offset = ext.offset + done as u64;
            match disk.file.read_at(&mut buf[done..], offset) {
                Ok(0) => return Err(disk.eof_error(offset, (want - done) as u64)),
                Ok(n) => {
                    done += n;
                    retries = 0;
                }
                Err(e)
                    if e.raw_os_error().is_some_and(sys::is_retryable)
                        && retries < sys::MAX_RETRIES =>
                {
                    retries += 1;
                }
                Err(e) => return Err(disk.io_error(offset, (want - done) as u64, e)),
            }
        }
        Ok(())
    }
}
