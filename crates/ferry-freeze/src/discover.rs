//! Discovery: which mounted filesystems live on the protected disks.
//!
//! A filesystem lives on a protected disk when its block device is that disk, a partition of it,
//! or a device-mapper/md device built (at any depth) on one of those: the walk follows
//! `/sys/dev/block/M:m/partition` (a partition's parent disk is its sysfs parent directory) and
//! `/sys/dev/block/M:m/slaves/`. Filesystems whose `st_dev` is anonymous (`0:N`, e.g. btrfs) are
//! mapped through the mount source when it is a block device.
//!
//! Each filesystem is returned once, at one mount point that really reaches it (bind mounts and
//! btrfs subvolumes share a superblock, and one FIFREEZE freezes all of them). The order is the
//! freeze order: a filesystem on a loop device whose backing file lives on another returned
//! filesystem comes before it, so flushing it never waits on an already-frozen one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::FreezeError;
use crate::sys;

/// A block device number, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dev {
    pub major: u32,
    pub minor: u32,
}

impl Dev {
    /// Splits a kernel `dev_t` (glibc's encoding).
    pub fn from_dev_t(d: libc::dev_t) -> Dev {
        let d: u64 = d;
        Dev {
            major: (((d >> 8) & 0xfff) | ((d >> 32) & !0xfff)) as u32,
            minor: ((d & 0xff) | ((d >> 12) & !0xff)) as u32,
        }
    }

    fn parse(s: &str) -> Option<Dev> {
        let (a, b) = s.trim().split_once(':')?;
        Some(Dev {
            major: a.parse().ok()?,
            minor: b.parse().ok()?,
        })
    }
}

impl fmt::Display for Dev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// A filesystem to freeze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where to open it (the mount point that reaches its root, or the shortest one).
    pub mount_point: PathBuf,
    /// The filesystem's `st_dev` as /proc/self/mountinfo shows it.
    pub fs_dev: Dev,
    /// The block device it sits on (differs from `fs_dev` for btrfs and the like).
    pub block_dev: Dev,
    pub fstype: String,
    /// The mount source (e.g. `/dev/sdb1`).
    pub source: String,
    /// Its other mount points (bind mounts, subvolumes): frozen with it, not on their own.
    pub also_at: Vec<PathBuf>,
}

impl AsRef<Path> for Mount {
    fn as_ref(&self) -> &Path {
        &self.mount_point
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub dev: Dev,
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes the octal escapes (`\040` for a space...) the kernel writes in mountinfo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // id parent major:minor root mount-point options [optional...] - fstype source super-options
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    if l.len() < 6 || r.len() < 2 {
        return None;
    }
    Some(MountEntry {
        id: l[0].parse().ok()?,
        dev: Dev::parse(l[2])?,
        root: unescape(l[3]),
        mount_point: PathBuf::from(unescape(l[4])),
        fstype: unescape(r[0]),
        source: unescape(r[1]),
    })
}

/// Reads /proc/self/mountinfo.
pub(crate) fn read_mountinfo() -> Result<Vec<MountEntry>, FreezeError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| FreezeError::System {
        path: path.into(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// Walks /sys/dev/block to find the devices a device is built on.
struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    fn dir(&self, d: Dev) -> Option<PathBuf> {
        fs::canonicalize(self.root.join(d.to_string())).ok()
    }

    fn dev_of(dir: &Path) -> Option<Dev> {
        Dev::parse(&fs::read_to_string(dir.join("dev")).ok()?)
    }

    /// `d` itself, its parent disk if it is a partition, and, recursively, every device
    /// it is built on (device-mapper, md).
    fn lower(&self, d: Dev) -> BTreeSet<Dev> {
        let mut seen = BTreeSet::new();
        self.walk(d, &mut seen, 0);
        seen
    }

    fn walk(&self, d: Dev, seen: &mut BTreeSet<Dev>, depth: u32) {
        if depth > 16 || !seen.insert(d) {
            return;
        }
        let Some(dir) = self.dir(d) else { return };
        if dir.join("partition").exists() {
            if let Some(parent) = dir.parent().and_then(Self::dev_of) {
                self.walk(parent, seen, depth + 1);
            }
        }
        if let Ok(rd) = fs::read_dir(dir.join("slaves")) {
            for e in rd.flatten() {
                if let Some(s) = fs::canonicalize(e.path())
                    .ok()
                    .as_deref()
                    .and_then(Self::dev_of)
                {
                    self.walk(s, seen, depth + 1);
                }
            }
        }
    }

    /// The backing file of a loop device, if `d` is one.
    fn loop_backing_file(&self, d: Dev) -> Option<PathBuf> {
        let s = fs::read_to_string(self.dir(d)?.join("loop/backing_file")).ok()?;
        let s = s.trim_end_matches('\n');
        (!s.is_empty()).then(|| PathBuf::from(s))
    }
}

/// The block device a mount entry sits on: its st_dev, or for anonymous devices (btrfs...) the
/// device of its source.
fn block_dev_of(e: &MountEntry) -> Option<Dev> {
    if e.dev.major != 0 {
        return Some(e.dev);
    }
    if !e.source.starts_with('/') {
        return None;
    }
    let st = sys::stat(Path::new(&e.source)).ok()?;
    (st.st_mode & libc::S_IFMT == libc::S_IFBLK).then(|| Dev::from_dev_t(st.st_rdev))
}

/// The device number of a protected disk path.
fn disk_dev(path: &Path) -> Result<Dev, FreezeError> {
    let st = sys::stat(path).map_err(|e| FreezeError::BadDisk {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFBLK {
        return Err(FreezeError::BadDisk {
            path: path.into(),
            reason: "not a block device".into(),
        });
    }
    Ok(Dev::from_dev_t(st.st_rdev))
}

/// Finds every mounted filesystem that lives on `disks` (whole disks; a partition given
/// directly works too) and returns one mount point for each, in freeze order.
pub fn discover<P: AsRef<Path>>(disks: &[P]) -> Result<Vec<Mount>, FreezeError> {
    let protected = disks
        .iter()
        .map(|p| disk_dev(p.as_ref()))
        .collect::<Result<BTreeSet<_>, _>>()?;
    let entries = read_mountinfo()?;
    let sysfs = Sysfs {
        root: PathBuf::from("/sys/dev/block"),
    };
    discover_in(&entries, &sysfs, &protected)
}

fn discover_in(
    entries: &[MountEntry],
    sysfs: &Sysfs,
    protected: &BTreeSet<Dev>,
) -> Result<Vec<Mount>, FreezeError> {
    // Group the mount entries on protected disks by filesystem (superblock).
    let mut groups: BTreeMap<Dev, (Dev, Vec<&MountEntry>)> = BTreeMap::new();
    let mut lower_of: BTreeMap<Dev, BTreeSet<Dev>> = BTreeMap::new();
    for e in entries {
        let Some(bdev) = block_dev_of(e) else {
            continue;
        };
        let lower = lower_of.entry(bdev).or_insert_with(|| sysfs.lower(bdev));
        if lower.is_disjoint(protected) {
            continue;
        }
        groups.entry(e.dev).or_insert((bdev, Vec::new())).1.push(e);
    }
    let mut mounts = Vec::new();
    for (fs_dev, (block_dev, mut cands)) in groups {
        // Prefer a mount of the filesystem's root, then the shortest path, then the oldest.
        cands.sort_by_key(|e| (e.root != "/", e.mount_point.as_os_str().len(), e.id));
        let reaches = |e: &MountEntry| match sys::stat(&e.mount_point) {
            Ok(st) => Dev::from_dev_t(st.st_dev) == fs_dev,
            Err(_) => false,
        };
        let chosen = cands
            .iter()
            .find(|e| reaches(e))
            // Anonymous devices (btrfs subvolumes) may stat differently: take the best guess.
            .or_else(|| cands.first().filter(|_| fs_dev.major == 0));
        let Some(chosen) = chosen else {
            return Err(FreezeError::Hidden {
                dev: fs_dev.to_string(),
                mounts: cands
                    .iter()
                    .map(|e| e.mount_point.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        mounts.push(Mount {
            mount_point: chosen.mount_point.clone(),
            fs_dev,
            block_dev,
            fstype: chosen.fstype.clone(),
            source: chosen.source.clone(),
            also_at: cands
                .iter()
                .filter(|e| e.id != chosen.id)
                .map(|e| e.mount_point.clone())
                .collect(),
        });
    }
    mounts.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    Ok(freeze_order(mounts, |m| {
        lower_of
            .get(&m.block_dev)
            .into_iter()
            .flatten()
            .filter_map(|d| sysfs.loop_backing_file(*d))
            .filter_map(|f| sys::stat(&f).ok())
            .map(|st| Dev::from_dev_t(st.st_dev))
            .collect()
    }))
}

/// Orders mounts so that a filesystem comes before every filesystem that holds one of its
/// loop devices' backing files (flushing it writes into them). Stable otherwise.
fn freeze_order(mounts: Vec<Mount>, backing_devs: impl Fn(&Mount) -> Vec<Dev>) -> Vec<Mount> {
    let n = mounts.len();
    // must_precede[i] = the mounts i must be frozen before.
    let must_precede: Vec<Vec<usize>> = mounts
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let devs = backing_devs(m);
            (0..n)
                .filter(|&k| k != i && devs.contains(&mounts[k].fs_dev))
                .collect()
        })
        .collect();
    let mut indegree = vec![0usize; n];
    for succ in &must_precede {
        for &k in succ {
            indegree[k] += 1;
        }
    }
    let mut order = Vec::with_capacity(n);
    let mut done = vec![false; n];
    while order.len() < n {
        // The first mount (in path order) nothing still waits to precede; on a cycle, the first left.
        let next = (0..n)
            .find(|&i| !done[i] && indegree[i] == 0)
            .or_else(|| (0..n).find(|&i| !done[i]));
        let Some(i) = next else { break };
        done[i] = true;
        for &k in &must_precede[i] {
            indegree[k] = indegree[k].saturating_sub(1);
        }
        order.push(i);
    }
    let mut slots: Vec<Option<Mount>> = mounts.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// Whether `path` is a mount point in this mount namespace.
pub(crate) fn is_mount_point(entries: &[MountEntry], path: &Path) -> io::Result<bool> {
    let canon = fs::canonicalize(path)?;
    Ok(entries.iter().any(|e| e.mount_point == canon))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
36 22 7:3 / /mnt/a rw,relatime shared:10 - ext4 /dev/loop3 rw
37 22 7:3 /sub /srv/bind\\040dir rw,relatime shared:10 - ext4 /dev/loop3 rw
38 22 259:1 / /mnt/x rw master:2 unbindable - xfs /dev/loop4p1 rw,attr2
39 22 0:45 /@home /home rw - btrfs /dev/sdb2 rw,space_cache
garbage line
";

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let e = parse_mountinfo(SAMPLE);
        assert_eq!(e.len(), 5);
        assert_eq!(e[2].mount_point, PathBuf::from("/srv/bind dir"));
        assert_eq!(e[2].root, "/sub");
        assert_eq!(
            e[3].dev,
            Dev {
                major: 259,
                minor: 1
            }
        );
        assert_eq!(e[3].fstype, "xfs");
        assert_eq!(e[3].source, "/dev/loop4p1");
        assert_eq!(
            e[4].dev,
            Dev {
                major: 0,
                minor: 45
            }
        );
        assert_eq!(e[4].root, "/@home");
    }

    #[test]
    fn unescapes_octal_and_keeps_stray_backslashes() {
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("x\\9y\\04"), "x\\9y\\04");
    }

    #[test]
    fn dev_t_round_trip() {
        let d = libc::makedev(259, 70_000);
        assert_eq!(
            Dev::from_dev_t(d),
            Dev {
                major: 259,
                minor: 70_000
            }
        );
    }

    fn m(path: &str, dev: u32) -> Mount {
        Mount {
            mount_point: path.into(),
            fs_dev: Dev {
                major: 7,
                minor: dev,
            },
            block_dev: Dev {
                major: 7,
                minor: dev,
            },
            fstype: "ext4".into(),
            source: String::new(),
            also_at: vec![],
        }
    }

    #[test]
    fn stacked_filesystems_freeze_first() {
        // /a holds the backing file of the loop disk under /z: /z must freeze before /a.
        let order = freeze_order(vec![m("/a", 1), m("/b", 2), m("/z", 3)], |x| {
            if x.mount_point == Path::new("/z") {
                vec![Dev { major: 7, minor: 1 }]
            } else {
                vec![]
            }
        });
        let names: Vec<_> = order.iter().map(|x| x.mount_point.clone()).collect();
        assert_eq!(names, vec![PathBuf::from("/b"), "/z".into(), "/a".into()]);
    }
}
