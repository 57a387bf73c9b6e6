//! Helpers for the real-kernel tests: loop devices, images read with O_DIRECT, chunk arithmetic.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use ferry_ebpf::{Tracker, CHUNK_SIZE};

pub const MIB: u64 = 1 << 20;

/// Says why the kernel tests cannot run here, or None. With `FERRY_REQUIRE_EBPF=1` a reason is a
/// test failure instead of a skip (for CI machines that are known to have everything).
pub fn skip(test: &str) -> bool {
    let Some(why) = skip_reason() else {
        return false;
    };
    ferry_testkit::skip(
        test,
        &format!("{why} (the eBPF tracker is NOT tested on this machine)"),
        "FERRY_REQUIRE_EBPF",
    );
    true
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (loop devices and BPF need root)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no loop devices (/dev/loop-control missing)".into());
    }
    for tool in ["losetup", "partx", "blkdiscard", "fallocate", "dd"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} not installed (util-linux / coreutils)"));
        }
    }
    Tracker::available().err()
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A loop device over a file in a temporary directory, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
    pub file: PathBuf,
    lo: ferry_testkit::loopdev::Loop,
    _dir: tempfile::TempDir,
}

impl Loop {
    /// A loop device of `size` bytes filled with a pattern derived from `seed` (never zero), so
    /// discards and zeroing change what they touch.
    pub fn new(size: u64, seed: u64) -> Result<Loop> {
        Loop::create(size, seed, None, false)
    }

    /// Like `new`, with an MBR whose partition 1 starts at sector `part_start` (and runs to the
    /// end); the partition node appears as `DEVp1`.
    pub fn with_mbr(size: u64, seed: u64, part_start: u32) -> Result<Loop> {
        Loop::create(size, seed, Some(part_start), false)
    }

    /// Like `new`, with the loop driver doing direct I/O on its backing file (so its writes reach
    /// the backing disk's queue, where a cgroup can throttle them).
    pub fn with_direct_io(size: u64, seed: u64) -> Result<Loop> {
        Loop::create(size, seed, None, true)
    }

    /// The partition table is written by hand and added with `partx`, which does not depend on the
    /// kernel's partition parsers (this machine's kernel has none).
    fn create(size: u64, seed: u64, part_start: Option<u32>, direct_io: bool) -> Result<Loop> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-ebpf-")
            .tempdir_in("/var/tmp")?;
        let file = dir.path().join("disk.img");
        let f = File::create(&file)?;
        fill(&f, size, seed)?;
        if let Some(start) = part_start {
            f.write_all_at(&mbr(start, (size / 512) as u32 - start), 0)?;
        }
        f.sync_all()?;
        drop(f);
        let lo = ferry_testkit::loopdev::Loop::attach_with(
            &file,
            &ferry_testkit::loopdev::LoopOptions {
                partitions: u32::from(part_start.is_some()),
                direct_io,
                ..Default::default()
            },
        )
        .map_err(anyhow::Error::msg)?;
        Ok(Loop {
            dev: lo.dev.clone(),
            file,
            lo,
            _dir: dir,
        })
    }

    /// The node of partition `n`.
    pub fn part(&self, n: u32) -> PathBuf {
        self.lo.part(n)
    }

    /// The temporary directory holding the backing file.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    pub fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }
}

/// xorshift64*: a cheap, reproducible, never-all-zero byte stream.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn fill(f: &File, size: u64, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        rng.fill(&mut buf);
        let n = (size - off).min(MIB) as usize;
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// A DOS partition table with one Linux partition.
fn mbr(start: u32, sectors: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    let e = &mut m[446..462];
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS unused: LBA only
    e[4] = 0x83;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

/// A 4 KiB-aligned buffer for O_DIRECT.
pub struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + 4096];
        let off = raw.as_ptr().align_offset(4096);
        Aligned { raw, off, len }
    }
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
    pub fn as_ref(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
}

/// Opens a device for O_DIRECT reads (and writes when `write`).
pub fn open_direct(dev: &Path, write: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .with_context(|| format!("open {}", dev.display()))
}

/// Reads the whole device with O_DIRECT, past any page cache.
pub fn read_image(dev: &Path) -> Result<Vec<u8>> {
    let f = open_direct(dev, false)?;
    let size = ferry_ebpf::BlockDevice::resolve(dev)?.size;
    let mut out = Vec::with_capacity(size as usize);
    let mut buf = Aligned::new(MIB as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        f.read_exact_at(&mut buf.as_mut()[..n], off)?;
        out.extend_from_slice(&buf.as_ref()[..n]);
        off += n as u64;
    }
    Ok(out)
}

/// Reads chunk `c` of the device with O_DIRECT.
pub fn read_chunk(f: &File, c: u64, buf: &mut Aligned) -> Result<()> {
    f.read_exact_at(buf.as_mut(), c * CHUNK_SIZE)?;
    Ok(())
}

/// Chunks whose bytes differ between two images.
pub fn changed(a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    let cs = CHUNK_SIZE as usize;
    a.chunks(cs)
        .zip(b.chunks(cs))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// Chunks overlapped by bytes [offset, offset + len).
pub fn chunks_of(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = offset / CHUNK_SIZE;
    let end = (offset + len).div_ceil(CHUNK_SIZE);
    first..end
}
