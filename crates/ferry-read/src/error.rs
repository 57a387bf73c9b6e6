//! The crate's one error type.

use std::path::PathBuf;

/// Errors of opening a disk and reading its chunks.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// the queue depth is out of range
    #[error("queue depth {depth} is out of range 1..={max}; pass e.g. 16", max = crate::MAX_DEPTH)]
    BadDepth { depth: u32 },
    /// the disk cannot be opened
    #[error("cannot open {} for reading: {source}; check that it exists and this process may read it", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// not a regular file or block device
    #[error("{} is neither a block device nor a regular file; pass the disk's device node", path.display())]
    NotADisk { path: PathBuf },
    /// the size or logical block size cannot be read
    #[error("cannot find the {what} of {}: {source}; is it a working block device?", path.display())]
    Geometry {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// the caller's chunk list is invalid
    #[error("invalid chunk list for {}: {reason}; pass ascending, distinct indexes below the chunk count", path.display())]
    BadChunks { path: PathBuf, reason: String },
    /// a read failed
    #[error("reading {len} bytes at offset {offset} of {} failed: {source}; check the device (dmesg) and retry", path.display())]
    Io {
        path: PathBuf,
        offset: u64,
        len: u64,
        source: std::io::Error,
    },
    /// the disk ended early
    #[error("{} ended at offset {offset}, before the {len} bytes expected there; it shrank while open — reopen it", path.display())]
    Eof {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    /// the io_uring itself failed
    #[error("io_uring on {} failed: {source}; reopen the reader (it falls back to pread if io_uring keeps failing)", path.display())]
    Ring {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the reader lost track of in-flight I/O and gave up its buffers
    #[error("the reader of {} could not wait for its in-flight I/O and is unusable; open a new one", path.display())]
    Unusable { path: PathBuf },
    /// the sink failed
    #[error("the chunk sink failed: {0}")]
    Sink(String),
}

impl ReadError {
    /// True when retrying the same call cannot succeed: the request or the path is wrong. Read
    /// errors, a shrunk disk and sink errors are worth a retry (on a new reader for `Unusable`).
    pub fn is_permanent(&self) -> bool {
        match self {
            ReadError::BadDepth { .. }
            | ReadError::NotADisk { .. }
            | ReadError::BadChunks { .. } => true,
            ReadError::Open { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ),
            ReadError::Geometry { .. }
            | ReadError::Io { .. }
            | ReadError::Eof { .. }
            | ReadError::Ring { .. }
            | ReadError::Unusable { .. }
            | ReadError::Sink(_) => false,
        }
    }
}
