//! Block device identity from `stat` and `/sys/dev/block/MAJOR:MINOR`.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::TrackerError;

/// A block device as the kernel names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Kernel name, e.g. `loop0`, `nvme0n1p2`.
    pub name: String,
    pub major: u32,
    pub minor: u32,
    /// Size in bytes.
    pub size: u64,
    /// True when its disk is request-based (blk-mq: loop, virtio, NVMe, SCSI); false for
    /// bio-based disks (device mapper, md, zram), whose completions the tracker follows per bio.
    pub blk_mq: bool,
    /// Set when the device is a partition.
    pub partition: Option<Partition>,
}

/// Where a partition lies on its whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Kernel name of the whole disk, e.g. `loop0`.
    pub disk: String,
    pub disk_major: u32,
    pub disk_minor: u32,
    /// Partition number (`p1` is 1).
    pub number: u32,
    /// Offset of the partition's first byte on the disk.
    pub start: u64,
}

impl BlockDevice {
    /// Resolves the block device at `path` (a device node or a symlink to one).
    pub fn resolve(path: &Path) -> Result<BlockDevice, TrackerError> {
        let io = |op, source| TrackerError::Io {
            path: path.to_owned(),
            op,
            source,
        };
        let meta = fs::metadata(path).map_err(|e| io("stat", e))?;
        if !meta.file_type().is_block_device() {
            return Err(TrackerError::NotBlockDevice {
                path: path.to_owned(),
            });
        }
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let sys = fs::canonicalize(&sys).map_err(|e| sysfs_err(&sys, "resolve", e))?;
        let name = file_name(&sys);
        let size = read_u64(&sys.join("size"))? * 512;
        let disk_dir = if sys.join("partition").exists() {
            sys.parent()
                .ok_or_else(|| sysfs_err(&sys, "find the disk of", not_found()))?
        } else {
            &sys
        };
        let blk_mq = disk_dir.join("mq").exists();
        let partition = if sys.join("partition").exists() {
            let parent = disk_dir;
            let (disk_major, disk_minor) = read_dev(&parent.join("dev"))?;
            Some(Partition {
                disk: file_name(parent),
                disk_major,
                disk_minor,
                number: read_u64(&sys.join("partition"))? as u32,
                start: read_u64(&sys.join("start"))? * 512,
            })
        } else {
            None
        };
        Ok(BlockDevice {
            name,
            major,
            minor,
            size,
            blk_mq,
            partition,
        })
    }

    /// The device number as the kernel encodes it internally (`MKDEV`: major << 20 | minor), which
    /// is what the BPF program computes from `bio->bi_bdev->bd_disk`.
    pub fn kernel_dev(&self) -> u32 {
        (self.major << 20) | self.minor
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn not_found() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::NotFound)
}

fn sysfs_err(path: &Path, op: &'static str, source: std::io::Error) -> TrackerError {
    TrackerError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

fn read_trimmed(path: &Path) -> Result<String, TrackerError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| sysfs_err(path, "read", e))
}

fn invalid(path: &Path, text: &str) -> TrackerError {
    sysfs_err(
        path,
        "parse",
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected content {text:?}"),
        ),
    )
}

fn read_u64(path: &Path) -> Result<u64, TrackerError> {
    let text = read_trimmed(path)?;
    text.parse().map_err(|_| invalid(path, &text))
}

/// Parses a sysfs `dev` file: `MAJOR:MINOR`.
fn read_dev(path: &Path) -> Result<(u32, u32), TrackerError> {
    let text = read_trimmed(path)?;
    let parsed = text
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    parsed.ok_or_else(|| invalid(path, &text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_file_is_not_a_block_device() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let err = BlockDevice::resolve(f.path()).unwrap_err();
        assert!(matches!(err, TrackerError::NotBlockDevice { .. }), "{err}");
    }

    #[test]
    fn missing_path_names_the_path() {
        let err = BlockDevice::resolve(Path::new("/nonexistent/ferry-disk")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ferry-disk"), "{err}");
    }

    #[test]
    fn kernel_dev_encoding() {
        let d = BlockDevice {
            name: "loop3".into(),
            major: 7,
            minor: 3,
            size: 0,
            blk_mq: true,
            partition: None,
        };
        assert_eq!(d.kernel_dev(), (7 << 20) | 3);
    }
}
