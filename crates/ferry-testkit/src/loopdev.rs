//! Loop devices: attached one at a time (concurrent `losetup --find` races for the same free
//! device), with partitions added by `partx` where the kernel has no partition parsers, the
//! filesystems mounted from them unmounted and the device detached on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sys::run;

static LOSETUP: Mutex<()> = Mutex::new(());

/// How to attach a loop device.
#[derive(Clone, Debug, Default)]
pub struct LoopOptions {
    /// The backing file holds a partition table: its partitions get nodes `DEVpN` (up to
    /// `partitions`), by the kernel's scan or by `partx -a` where the kernel cannot parse it.
    pub partitions: u32,
    /// Ask the kernel to scan the partition table (`--partscan`) even with no partitions expected
    /// yet (a table written through the device later, then `partx -u`).
    pub partscan: bool,
    /// Logical block size (`--sector-size`).
    pub sector_size: Option<u32>,
    /// The loop driver does direct I/O on its backing file.
    pub direct_io: bool,
    /// The device starts this many bytes into the file (`--offset`).
    pub offset: Option<u64>,
}

/// An attached loop device; detached (after lazily unmounting what was mounted through it) on drop.
pub struct Loop {
    pub dev: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Loop {
    /// Attaches `file` as it is.
    pub fn attach(file: &Path) -> Result<Loop, String> {
        Loop::attach_with(file, &LoopOptions::default())
    }

    /// Attaches `file` with `o`; retried for a few seconds against other processes' `losetup`.
    pub fn attach_with(file: &Path, o: &LoopOptions) -> Result<Loop, String> {
        let dev = {
            let _one = LOSETUP.lock().unwrap_or_else(|e| e.into_inner());
            let sector = o.sector_size.map(|s| s.to_string());
            let offset = o.offset.map(|x| x.to_string());
            let mut args = vec!["--find", "--show"];
            if o.partitions > 0 || o.partscan {
                args.push("--partscan");
            }
            if let Some(s) = &sector {
                args.extend(["--sector-size", s]);
            }
            if o.direct_io {
                args.push("--direct-io=on");
            }
            if let Some(x) = &offset {
                args.extend(["--offset", x]);
            }
            let f = file
                .to_str()
                .ok_or("the backing file's path is not UTF-8")?;
            args.push(f);
            let mut tries = 0;
            loop {
                match run("losetup", &args) {
                    Ok(dev) => break PathBuf::from(dev),
                    Err(_) if tries < 20 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let lo = Loop {
            dev,
            mounts: Vec::new(),
        };
        if o.partitions > 0 {
            let last = lo.part(o.partitions);
            let t = Instant::now();
            while !last.exists() && t.elapsed() < Duration::from_millis(300) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !last.exists() {
                // The kernel may lack the partition parser; partx parses in userspace and adds
                // the partitions itself (BLKPG). `-u` also copes with partitions the kernel added
                // in the meantime.
                run("partx", &["-u", lo.path()])?;
            }
            let t = Instant::now();
            while !last.exists() {
                if t.elapsed() > Duration::from_secs(5) {
                    return Err(format!("{} did not appear", last.display()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(lo)
    }

    /// The device node as a string.
    pub fn path(&self) -> &str {
        self.dev.to_str().expect("loop device paths are ASCII")
    }

    /// The node of partition `n`.
    pub fn part(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.dev.display()))
    }

    /// Mounts `what` (this device or one of its partitions) at `at` (created), with `options`
    /// (`-o`, may be empty); unmounted by [`Loop::umount_all`] or on drop.
    pub fn mount(&mut self, what: &Path, at: &Path, options: &str) -> Result<(), String> {
        std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
        let (w, a) = (what.to_string_lossy(), at.to_string_lossy());
        let mut args = vec![&*w, &*a];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        run("mount", &args)?;
        self.mounts.push(at.to_path_buf());
        Ok(())
    }

    /// Unmounts everything mounted through [`Loop::mount`], newest first; an error if one is busy.
    pub fn umount_all(&mut self) -> Result<(), String> {
        while let Some(m) = self.mounts.pop() {
            run("umount", &[&m.to_string_lossy()])?;
        }
        Ok(())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let ok = Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("warning: could not detach {}\n", self.dev.display()).as_bytes(),
            );
        }
    }
}
