//! The crate's error type and the reasons a drain can ask for a resync.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Errors of the eBPF tracker.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// the eBPF tracker cannot run here: {0}
    #[error("the eBPF tracker cannot run here: {0}; use the scan tracker")]
    Unavailable(String),
    /// cannot {op} {path}: {source}
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    /// {path} is not a block device
    #[error("{} is not a block device; the eBPF tracker tracks disks (use the scan tracker for image files)", path.display())]
    NotBlockDevice { path: PathBuf },
    /// {path} is a partition of {disk}
    #[error(
        "{} is partition {number} of /dev/{disk}, starting at byte {start}; track the whole disk \
         /dev/{disk} (chunk indexes are whole-disk offsets)",
        path.display()
    )]
    Partition {
        path: PathBuf,
        disk: String,
        number: u32,
        start: u64,
    },
    /// {path} names the same disk as {first}
    #[error("{} and {} are the same disk ({major}:{minor}); list each disk once", path.display(), first.display())]
    Duplicate {
        path: PathBuf,
        first: PathBuf,
        major: u32,
        minor: u32,
    },
    /// {path} is larger than the tracker's maximum
    #[error(
        "{} is {size} bytes, more than the tracker's maximum of {max} bytes per disk; raise \
         TrackerOptions::max_disk_bytes",
        path.display()
    )]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    /// bad number of disks
    #[error("cannot track {count} disks: give between 1 and {max}")]
    DiskCount { count: usize, max: usize },
    /// the bitmaps do not fit one BPF array
    #[error(
        "the bitmaps of these disks need {words} words, more than one BPF array holds ({max})"
    )]
    BitmapTooLarge { words: u64, max: u64 },
    /// libbpf failed
    #[error("cannot {what} the BPF tracker: {source}")]
    Bpf {
        what: &'static str,
        source: libbpf_rs::Error,
    },
    /// mmap of a BPF map failed
    #[error("cannot map BPF map {map} into memory: {source}")]
    Mmap {
        map: &'static str,
        source: std::io::Error,
    },
    /// no disk with this index
    #[error("no tracked disk has index {index} (the tracker has {count})")]
    UnknownDisk { index: usize, count: usize },
    /// programs still marking the old epoch after the grace timeout
    #[error(
        "BPF programs were still marking the old bitmap of {} after {waited:?}; the drain was not \
         read, retry it",
        path.display()
    )]
    GraceTimeout { path: PathBuf, waited: Duration },
}

impl TrackerError {
    /// True when retrying the same call cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, TrackerError::GraceTimeout { .. })
    }
}

/// Why a drain's chunks may not be all that changed: the disk needs a resync (scan) before the
/// next point can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncReason {
    /// Write bios reached past the end of the bitmap (the disk grew while tracked).
    Overflow { bios: u64 },
    /// Write bios could not be remembered until completion (the in-flight table was full).
    Untracked { bios: u64 },
    /// The kernel skipped runs of the tracker's programs (recursion on one CPU), on any disk.
    MissedRuns { runs: u64 },
}

impl fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResyncReason::Overflow { bios } => {
                write!(f, "{bios} write(s) past the end of the bitmap (disk grew)")
            }
            ResyncReason::Untracked { bios } => write!(
                f,
                "{bios} write(s) not remembered until completion (in-flight table full)"
            ),
            ResyncReason::MissedRuns { runs } => {
                write!(
                    f,
                    "the kernel skipped {runs} run(s) of the tracker programs"
                )
            }
        }
    }
}
