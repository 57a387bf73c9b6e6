//! A write that is still in flight when its chunk is drained and read must be reported again once
//! it completes. The loop device's writes are held back for real: the loop driver does direct I/O
//! on its backing file, and the writer runs in a blkio/io cgroup that allows 2 writes a second on
//! the backing disk, so each write stays in flight ~0.5 s while the test drains every 50 ms.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::*;
use ferry_ebpf::{Tracker, CHUNK_SIZE};

/// A cgroup whose members may issue `iops` writes per second to one disk; removed on drop.
struct SlowCgroup {
    dir: PathBuf,
}

impl SlowCgroup {
    /// Ok(None) with the reason when this machine has no usable blkio (v1) or io (v2) controller.
    fn new(disk: (u32, u32), iops: u32) -> Result<Result<SlowCgroup, String>> {
        let name = format!("ferry-ebpf-test-{}", std::process::id());
        let (maj, min) = disk;
        let v1 = Path::new("/sys/fs/cgroup/blkio");
        if v1.join("blkio.throttle.write_iops_device").exists() {
            let dir = v1.join(name);
            fs::create_dir_all(&dir)?;
            let cg = SlowCgroup { dir };
            fs::write(
                cg.dir.join("blkio.throttle.write_iops_device"),
                format!("{maj}:{min} {iops}"),
            )?;
            return Ok(Ok(cg));
        }
        let v2 = Path::new("/sys/fs/cgroup");
        let controllers = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "io") {
            fs::write(v2.join("cgroup.subtree_control"), "+io")
                .context("enable the io controller")?;
            let dir = v2.join(name);
            fs::create_dir_all(&dir)?;
            let cg = SlowCgroup { dir };
            fs::write(cg.dir.join("io.max"), format!("{maj}:{min} wiops={iops}"))?;
            return Ok(Ok(cg));
        }
        Ok(Err(
            "no blkio (cgroup v1) or io (cgroup v2) controller to hold writes back".into(),
        ))
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for SlowCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The whole disk holding `file`, as (major, minor), if it is a real block device.
fn backing_disk(file: &Path) -> Option<(u32, u32)> {
    let dev = fs::metadata(file).ok()?.dev();
    let sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(dev),
        libc::minor(dev)
    ));
    let sys = fs::canonicalize(sys).ok()?;
    let disk = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    let text = fs::read_to_string(disk.join("dev")).ok()?;
    let (a, b) = text.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn loud_skip(test: &str, why: &str) {
    ferry_testkit::skip(
        test,
        &format!("{why} (in-flight re-marking NOT tested on this machine)"),
        "FERRY_REQUIRE_EBPF",
    );
}

#[test]
fn a_chunk_read_while_its_write_is_in_flight_is_reported_again() -> Result<()> {
    const TEST: &str = "a_chunk_read_while_its_write_is_in_flight_is_reported_again";
    if skip(TEST) {
        return Ok(());
    }
    let lo = match Loop::with_direct_io(16 * MIB, 21) {
        Ok(lo) => lo,
        Err(e) => {
            loud_skip(TEST, &format!("no direct-I/O loop device: {e:#}"));
            return Ok(());
        }
    };
    let Some(disk) = backing_disk(&lo.file) else {
        loud_skip(TEST, "the loop's backing file is not on a block device");
        return Ok(());
    };
    let cg = match SlowCgroup::new(disk, 2)? {
        Ok(cg) => cg,
        Err(why) => {
            loud_skip(TEST, &why);
            return Ok(());
        }
    };
    let first_chunk = 40u64;
    let count = 6u64;
    let data = lo.dir().join("data");
    let mut bytes = vec![0u8; (count * CHUNK_SIZE) as usize];
    Rng::new(22).fill(&mut bytes);
    fs::write(&data, &bytes)?;

    let before = read_image(&lo.dev)?;
    let mut tracker = Tracker::open(std::slice::from_ref(&lo.dev))?;
    // One 64 KiB O_DIRECT write per chunk, one after the other, each held ~0.5 s by the cgroup.
    let script = format!(
        "echo $$ > {} && exec dd if={} of={} bs=64k count={count} seek={first_chunk} \
         oflag=direct conv=notrunc status=none",
        cg.procs().display(),
        data.display(),
        lo.path()
    );
    let mut child = Command::new("sh").args(["-c", &script]).spawn()?;

    let reader = open_direct(&lo.dev, false)?;
    let mut buf = Aligned::new(CHUNK_SIZE as usize);
    let mut replica = before.clone();
    let mut reports: BTreeMap<u64, u32> = BTreeMap::new();
    let start = Instant::now();
    loop {
        let exited = child.try_wait()?;
        if exited.is_none() && start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            bail!("the throttled writer did not finish in 60 s");
        }
        let set = tracker.drain(0)?;
        assert!(!set.needs_resync(), "{:?}", set.resync);
        for c in set.chunks() {
            read_chunk(&reader, c, &mut buf)?;
            let at = (c * CHUNK_SIZE) as usize;
            replica[at..at + CHUNK_SIZE as usize].copy_from_slice(buf.as_ref());
            *reports.entry(c).or_default() += 1;
        }
        if let Some(status) = exited {
            assert!(status.success(), "dd failed: {status}");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = read_image(&lo.dev)?;
    let at = (first_chunk * CHUNK_SIZE) as usize;
    assert_eq!(
        &after[at..at + bytes.len()],
        &bytes[..],
        "dd wrote the data"
    );
    let written: Vec<u64> = (first_chunk..first_chunk + count).collect();
    assert_eq!(reports.keys().copied().collect::<Vec<_>>(), written);
    eprintln!("reports per chunk: {reports:?}, took {:?}", start.elapsed());
    let stale = changed(&replica, &after);
    assert!(
        stale.is_empty(),
        "chunks read in flight and never reported again: {stale:?}"
    );
    assert!(
        reports.values().any(|&n| n >= 2),
        "no chunk was drained while its write was in flight: the cgroup did not hold writes back"
    );
    Ok(())
}
