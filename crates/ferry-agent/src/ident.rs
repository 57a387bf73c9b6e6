//! Stable disk identities: what a protected disk *is*, whatever the kernel calls it today.
//!
//! Kernel names (`sdb`, `vdc`, `loop3`) can swap across reboots; a disk's replica must follow the
//! disk, not the name. The identity is, in order of preference:
//! - a whole disk: its WWN/WWID (`/sys/block/X/wwid`, `…/device/wwid`), else its serial
//!   (`/sys/block/X/serial`, `…/device/serial`, virtio and NVMe), else a `/dev/disk/by-id` name
//!   (`wwn-…` first) — `dev:X` only when none exists (then a warning: the name may swap);
//! - a partition: its disk's identity and `-partN`;
//! - a loop device: its backing file's identity and offset;
//! - an image file: `file:INODE:BIRTH` (birth time in ns; `file:devDEV:INODE` where the filesystem
//!   keeps no birth time) — a copy or a replaced file is another disk.
//!
//! The identity goes to the process server in `Inventory` (it maps identities to replicas) and
//! into the header of the disk's chunk map (a map is never used for another disk).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The stable identity of the disk at `path` (a block device or an image file), at most 255
/// bytes of printable text.
pub fn disk_id(path: &Path) -> Result<String, String> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let id = if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        let sys = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            libc::major(rdev),
            libc::minor(rdev)
        ));
        let sys = fs::canonicalize(&sys).map_err(|e| format!("{}: {e}", sys.display()))?;
        block_id(&sys)?
    } else if meta.file_type().is_file() {
        file_id(path, &meta)
    } else {
        return Err(format!(
            "{} is neither a block device nor a regular file",
            path.display()
        ));
    };
    Ok(clean(&id))
}

fn file_id(path: &Path, meta: &fs::Metadata) -> String {
    // Inode and birth time (statx, nanoseconds): stable across renames, reboots and the host
    // disk's device number changing, and a recreated file differs even if its inode is reused.
    // Without a birth time (old filesystems) the device number has to do.
    let birth = fs::metadata(path)
        .ok()
        .and_then(|m| m.created().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    if birth == 0 {
        format!("file:dev{}:{}", meta.dev(), meta.ino())
    } else {
        format!("file:{}:{birth}", meta.ino())
    }
}

fn read_trim(p: &Path) -> Option<String> {
    let s = fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// `sys`: the device's canonical sysfs directory (`/sys/devices/…/block/sdb[/sdb1]`).
fn block_id(sys: &Path) -> Result<String, String> {
    let kname = sys
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("?")
        .to_owned();
    if let Some(part) = read_trim(&sys.join("partition")) {
        let parent = sys
            .parent()
            .ok_or_else(|| format!("partition {kname} has no parent disk in sysfs"))?;
        return Ok(format!("{}-part{part}", block_id(parent)?));
    }
    if let Some(backing) = read_trim(&sys.join("loop/backing_file")) {
        let offset = read_trim(&sys.join("loop/offset")).unwrap_or_else(|| "0".into());
        let b = Path::new(&backing);
        return match fs::metadata(b) {
            Ok(m) if !backing.ends_with("(deleted)") => {
                Ok(format!("loop:{}@{offset}", file_id(b, &m)))
            }
            _ => {
                tracing::warn!(device = %kname, backing = %backing, "the loop device's backing file is gone; identifying it by its kernel name");
                Ok(format!("dev:{kname}"))
            }
        };
    }
    for f in ["wwid", "device/wwid"] {
        if let Some(w) = read_trim(&sys.join(f)) {
            return Ok(format!("wwid:{w}"));
        }
    }
    for f in ["serial", "device/serial"] {
        if let Some(s) = read_trim(&sys.join(f)) {
            return Ok(format!("serial:{s}"));
        }
    }
    if let Some(n) = by_id_name(&kname) {
        return Ok(format!("by-id:{n}"));
    }
    tracing::warn!(device = %kname, "the disk has no WWN, serial or /dev/disk/by-id name; it is identified by its kernel name, which may change across reboots");
    Ok(format!("dev:{kname}"))
}

/// The preferred `/dev/disk/by-id` name pointing at `/dev/KNAME` (`wwn-` first, then by name).
fn by_id_name(kname: &str) -> Option<String> {
    let target = fs::canonicalize(format!("/dev/{kname}")).ok()?;
    let mut names: Vec<String> = fs::read_dir("/dev/disk/by-id")
        .ok()?
        .flatten()
        .filter(|e| fs::canonicalize(e.path()).ok().as_ref() == Some(&target))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort_by_key(|n| (!n.starts_with("wwn-"), n.clone()));
    names.into_iter().next()
}

/// Printable, at most 255 bytes.
fn clean(id: &str) -> String {
    let mut s: String = id
        .chars()
        .map(|c| if c.is_control() { '_' } else { c })
        .collect();
    while s.len() > 255 {
        s.pop();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_file_is_identified_by_its_inode_and_a_copy_is_another_disk() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        fs::write(&a, vec![1u8; 4096]).unwrap();
        let id = disk_id(&a).unwrap();
        assert!(id.starts_with("file:"), "{id}");
        // Renamed: the same disk.
        let b = dir.path().join("b.img");
        fs::rename(&a, &b).unwrap();
        assert_eq!(disk_id(&b).unwrap(), id);
        // A copy under the old name: another disk.
        fs::copy(&b, &a).unwrap();
        assert_ne!(disk_id(&a).unwrap(), id);
        assert!(disk_id(dir.path()).is_err());
    }

    #[test]
    fn ids_are_printable_and_bounded() {
        assert_eq!(clean("a\nb"), "a_b");
        assert_eq!(clean(&"x".repeat(400)).len(), 255);
    }
}
