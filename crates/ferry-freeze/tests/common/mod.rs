//! Real loop disks and filesystems for the freeze tests, and loud skips.
#![allow(dead_code)]

use std::io::Write;

use ferry_testkit::loopdev::{Loop, LoopOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// With this set to 1, a skip is a failure (for CI machines that have everything).
pub const REQUIRE_ENV: &str = "FERRY_REQUIRE_FREEZE_TESTS";

/// Declines to run `test` (`ferry_testkit::skip`: seen in a passing run, a failure with
/// `FERRY_REQUIRE_FREEZE_TESTS=1`).
pub fn skip(test: &str, why: &str) {
    ferry_testkit::skip(test, why, REQUIRE_ENV);
}

pub use ferry_testkit::sys::have;

/// Why the loop-device tests cannot run here, if they cannot.
pub fn loop_skip_reason(tools: &[&str]) -> Option<String> {
    if !ferry_freeze::is_root() {
        return Some("not running as root (loop devices and FIFREEZE need it)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("the kernel has no loop devices (/dev/loop-control missing)".into());
    }
    for c in ["losetup", "mount", "umount", "partx"].iter().chain(tools) {
        if !have(c) {
            return Some(format!(
                "{c} is not installed (apt: util-linux, fdisk, e2fsprogs, xfsprogs)"
            ));
        }
    }
    None
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// losetup and partition scanning race when tests set disks up in parallel.
static SETUP: Mutex<()> = Mutex::new(());

/// A loop disk on a sparse image, with the filesystems mounted from it.
pub struct LoopDisk {
    pub dev: String,
    pub dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
    // Declared last: dropped (detached) after `drop` thawed and unmounted `mounts`.
    lo: Loop,
}

impl LoopDisk {
    /// A `size_mib` disk; with `partitions`, an MBR with those sizes (MiB) and `losetup -P`.
    pub fn new(size_mib: u64, partitions: &[u64]) -> LoopDisk {
        let _g = SETUP.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("ferry-freeze-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        if !partitions.is_empty() {
            let script: String = partitions.iter().map(|p| format!(",{p}M,L\n")).collect();
            let mut c = Command::new("sfdisk")
                .args(["--quiet", "--label", "dos", img.to_str().unwrap()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            c.stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            assert!(c.wait().unwrap().success(), "sfdisk failed");
        }
        let lo = Loop::attach_with(
            &img,
            &LoopOptions {
                partitions: partitions.len() as u32,
                ..Default::default()
            },
        )
        .unwrap();
        let disk = LoopDisk {
            dev: lo.path().to_owned(),
            dir,
            mounts: Vec::new(),
            lo,
        };
        disk
    }

    /// The block device of partition `n` (1-based).
    pub fn part(&self, n: usize) -> String {
        format!("{}p{n}", self.dev)
    }

    /// Makes a filesystem on `dev` and mounts it at `dir/name`.
    pub fn mkfs_mount(&mut self, dev: &str, fstype: &str, name: &str) -> PathBuf {
        match fstype {
            "ext4" => run(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    dev,
                ],
            ),
            "xfs" => run("mkfs.xfs", &["-q", "-f", dev]),
            other => panic!("no mkfs for {other}"),
        };
        let mnt = self.dir.path().join(name);
        std::fs::create_dir_all(&mnt).unwrap();
        run("mount", &[dev, mnt.to_str().unwrap()]);
        self.mounts.push(mnt.clone());
        mnt
    }

    /// Attaches an existing image (a copy of a disk) and mounts it at `dir/name`.
    pub fn attach_and_mount(image: &Path, name: &str) -> (LoopDisk, PathBuf) {
        let _g = SETUP.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("ferry-freeze-")
            .tempdir()
            .unwrap();
        let lo = Loop::attach(image).unwrap();
        let mnt = dir.path().join(name);
        std::fs::create_dir(&mnt).unwrap();
        let disk = LoopDisk {
            dev: lo.path().to_owned(),
            dir,
            mounts: vec![mnt.clone()],
            lo,
        };
        run("mount", &[&disk.dev, mnt.to_str().unwrap()]);
        (disk, mnt)
    }

    /// Bind-mounts `from` at `dir/name`.
    pub fn bind(&mut self, from: &Path, name: &str) -> PathBuf {
        let mnt = self.dir.path().join(name);
        std::fs::create_dir_all(&mnt).unwrap();
        run(
            "mount",
            &["--bind", from.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        self.mounts.push(mnt.clone());
        mnt
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        // Never leave a test filesystem frozen, then unmount (lazily: a leaked watchdog may still
        // hold a mount point open) and detach.
        let _ = ferry_freeze::thaw_all(&self.mounts);
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        // `lo` detaches the device when it drops, after this.
    }
}

/// The watchdog binary cargo built for these tests.
pub fn freezer() -> ferry_freeze::Freezer {
    ferry_freeze::Freezer::with_watchdog(env!("CARGO_BIN_EXE_ferry-thaw-watchdog"))
}

/// Writes and fsyncs a small file under `mnt` on another thread; the receiver gets the time the
/// write took once it is done.
pub fn write_in_thread(mnt: &Path, name: &str) -> std::sync::mpsc::Receiver<Duration> {
    let path = mnt.join(name);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"written while frozen?\n").unwrap();
        f.sync_all().unwrap();
        let _ = tx.send(t.elapsed());
    });
    rx
}

/// Whether process `pid` is gone (or a zombie nobody reaped).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(") ")
            .map(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
            .unwrap_or(false),
    }
}
