//! Discovery and freezing on real loop disks: ext4 on a whole disk, xfs on a partition.
//! Needs root, util-linux (losetup, mount, fsfreeze), fdisk (sfdisk), e2fsprogs and xfsprogs;
//! skips loudly otherwise.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ferry_freeze::{discover, thaw_all, FreezeError};

/// Tools of the tests with an ext4 disk only, and of those that also partition and use xfs.
const EXT4: &[&str] = &["mkfs.ext4"];
const BOTH: &[&str] = &["mkfs.ext4", "sfdisk", "mkfs.xfs", "fsfreeze"];

/// An ext4 whole disk and an xfs on partition 1 of a partitioned disk (partition 2 unused).
struct Pair {
    a: LoopDisk,
    b: LoopDisk,
    ext4: PathBuf,
    xfs: PathBuf,
}

fn pair() -> Pair {
    let mut a = LoopDisk::new(64, &[]);
    let dev = a.dev.clone();
    let ext4 = a.mkfs_mount(&dev, "ext4", "ext4");
    // xfsprogs refuses filesystems under 300 MiB.
    let mut b = LoopDisk::new(400, &[320, 40]);
    let p1 = b.part(1);
    let xfs = b.mkfs_mount(&p1, "xfs", "xfs");
    Pair { a, b, ext4, xfs }
}

macro_rules! need_loop {
    ($name:expr, $tools:expr) => {
        if let Some(why) = loop_skip_reason($tools) {
            skip($name, &why);
            return;
        }
    };
}

#[test]
fn discovery_finds_ext4_on_the_disk_and_xfs_on_a_partition_once_each() {
    need_loop!(
        "discovery_finds_ext4_on_the_disk_and_xfs_on_a_partition_once_each",
        BOTH
    );
    let mut p = pair();
    let ext4 = p.ext4.clone();
    let bind = p.a.bind(&ext4, "ext4-bind");

    let found = discover(&[&p.a.dev, &p.b.dev]).unwrap();
    assert_eq!(found.len(), 2, "{found:#?}");
    let e = found
        .iter()
        .find(|m| m.fstype == "ext4")
        .expect("ext4 found");
    assert_eq!(e.mount_point, ext4);
    assert_eq!(
        e.also_at,
        vec![bind],
        "the bind mount is folded into the same filesystem"
    );
    let x = found.iter().find(|m| m.fstype == "xfs").expect("xfs found");
    assert_eq!(x.mount_point, p.xfs);
    assert_eq!(x.source, p.b.part(1));

    // Only the disks asked for.
    let only_b = discover(&[&p.b.dev]).unwrap();
    assert_eq!(only_b.len(), 1);
    assert_eq!(only_b[0].mount_point, p.xfs);
    // A partition given directly works too.
    let part = discover(&[p.b.part(1)]).unwrap();
    assert_eq!(part.len(), 1);
    // A disk with nothing mounted has nothing to freeze.
    let idle = LoopDisk::new(16, &[]);
    assert!(discover(&[&idle.dev]).unwrap().is_empty());
    // Not a block device: a clear error.
    let err = discover(&[p.a.dir.path()]).unwrap_err();
    assert!(matches!(err, FreezeError::BadDisk { .. }), "{err}");
}

#[test]
fn writes_block_while_frozen_and_complete_after_thaw() {
    need_loop!("writes_block_while_frozen_and_complete_after_thaw", BOTH);
    let p = pair();
    let mounts = discover(&[&p.a.dev, &p.b.dev]).unwrap();
    let guard = freezer().freeze(&mounts, Duration::from_secs(5)).unwrap();
    assert_eq!(guard.mounts().count(), 2);

    // A thread writes to ext4, another process to xfs.
    let ext4_write = write_in_thread(&p.ext4, "thread.txt");
    let target = p.xfs.join("process.bin");
    let mut dd = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", target.display()),
            "bs=64k",
            "count=16",
            "conv=fsync",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        ext4_write.try_recv().is_err(),
        "a write to frozen ext4 went through"
    );
    assert!(
        dd.try_wait().unwrap().is_none(),
        "a write to frozen xfs went through"
    );

    let stats = guard.finish().expect("the freeze held");
    assert_eq!(stats.mounts, 2);
    assert!(stats.window >= Duration::from_millis(700), "{stats:?}");
    let took = ext4_write
        .recv_timeout(Duration::from_secs(5))
        .expect("write after thaw");
    assert!(
        took >= Duration::from_millis(600),
        "it had blocked: {took:?}"
    );
    let t = Instant::now();
    while dd.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "dd still blocked after thaw"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 16 * 65536);
    // Nothing is left frozen and a second thaw is a no-op.
    assert!(thaw_all(&mounts).unwrap().is_empty());
}

#[test]
fn watchdog_thaws_a_forgotten_guard_within_the_bound() {
    need_loop!("watchdog_thaws_a_forgotten_guard_within_the_bound", EXT4);
    let mut a = LoopDisk::new(64, &[]);
    let dev = a.dev.clone();
    let mnt = a.mkfs_mount(&dev, "ext4", "m");
    let bound = Duration::from_millis(1000);
    let started = Instant::now();
    let guard = freezer().freeze(&[&mnt], bound).unwrap();
    let wd = guard.watchdog_pid().unwrap();
    let w = write_in_thread(&mnt, "late.txt");
    std::mem::forget(guard); // never finished, never dropped
    w.recv_timeout(bound + Duration::from_secs(2))
        .expect("the watchdog thawed");
    let thawed_after = started.elapsed();
    eprintln!(
        "forgotten guard: writable again {thawed_after:?} after the freeze (bound {bound:?})"
    );
    assert!(
        thawed_after >= bound - Duration::from_millis(50),
        "{thawed_after:?}"
    );
    assert!(
        thawed_after < bound + Duration::from_millis(300),
        "{thawed_after:?}"
    );
    // The leaked watchdog keeps re-thawing until its agent ends; end it so the disk can go.
    // SAFETY: kill() with a pid we started; no memory involved.
    unsafe { libc::kill(wd as i32, libc::SIGKILL) };
}

#[test]
fn finish_reports_overrun_when_the_cut_outlives_the_bound() {
    need_loop!(
        "finish_reports_overrun_when_the_cut_outlives_the_bound",
        EXT4
    );
    let mut a = LoopDisk::new(64, &[]);
    let dev = a.dev.clone();
    let mnt = a.mkfs_mount(&dev, "ext4", "m");
    let f = freezer();

    // In time: Ok, and the window is inside the bound.
    let g = f.freeze(&[&mnt], Duration::from_secs(2)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let stats = g.finish().unwrap();
    assert!(stats.window < Duration::from_secs(2), "{stats:?}");
    assert!(stats.held >= Duration::from_millis(50), "{stats:?}");

    // Too slow: the watchdog thaws at the bound, writes go through before finish(), and finish
    // says the cut is not consistent.
    let bound = Duration::from_millis(500);
    let g = f.freeze(&[&mnt], bound).unwrap();
    let wd = g.watchdog_pid().unwrap();
    let w = write_in_thread(&mnt, "during.txt");
    w.recv_timeout(Duration::from_secs(2))
        .expect("thawed by the watchdog before finish()");
    match g.finish() {
        Err(FreezeError::Overrun { bound: b }) => assert_eq!(b, bound),
        other => panic!("expected Overrun, got {other:?}"),
    }
    assert!(process_gone(wd), "finish() waited for the watchdog to exit");
    assert!(thaw_all(&[&mnt]).unwrap().is_empty());
}

#[test]
fn a_failed_freeze_thaws_the_ones_before_it() {
    need_loop!("a_failed_freeze_thaws_the_ones_before_it", BOTH);
    let p = pair();
    // Someone else froze the xfs.
    run("fsfreeze", &["--freeze", p.xfs.to_str().unwrap()]);
    let err = freezer()
        .freeze(&[&p.ext4, &p.xfs], Duration::from_secs(2))
        .map(|_| ())
        .unwrap_err();
    run("fsfreeze", &["--unfreeze", p.xfs.to_str().unwrap()]);
    assert!(
        matches!(&err, FreezeError::AlreadyFrozen { path } if *path == p.xfs),
        "{err}"
    );
    assert!(err.to_string().contains("fsfreeze -u"), "{err}");
    // ext4 was frozen first, then thawed again.
    write_in_thread(&p.ext4, "after.txt")
        .recv_timeout(Duration::from_secs(2))
        .expect("ext4 is writable");
}

#[test]
fn refuses_paths_that_are_not_mount_points_and_a_missing_watchdog() {
    need_loop!(
        "refuses_paths_that_are_not_mount_points_and_a_missing_watchdog",
        EXT4
    );
    let mut a = LoopDisk::new(64, &[]);
    let dev = a.dev.clone();
    let mnt = a.mkfs_mount(&dev, "ext4", "m");
    let sub = mnt.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let err = freezer()
        .freeze(&[&sub], Duration::from_secs(2))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, FreezeError::NotAMountPoint { .. }), "{err}");

    let err = ferry_freeze::Freezer::with_watchdog("/nonexistent/ferry-thaw-watchdog")
        .freeze(&[&mnt], Duration::from_secs(2))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, FreezeError::WatchdogStart { .. }), "{err}");
    assert!(err.to_string().contains("nothing was frozen"), "{err}");
    write_in_thread(&mnt, "ok.txt")
        .recv_timeout(Duration::from_secs(2))
        .expect("nothing frozen");
}

// ---- a freezing child process, killed -------------------------------------------------------

const CHILD_ENV: &str = "FERRY_FREEZE_TEST_CHILD_MOUNT";

/// Not a test on its own: the body of the child process the kill tests start (re-running this
/// test binary). It freezes, says so, and waits to be killed.
#[test]
fn child_freezes_and_waits_to_be_killed() {
    let Ok(mnt) = std::env::var(CHILD_ENV) else {
        return;
    };
    let guard = freezer()
        .freeze(&[Path::new(&mnt)], Duration::from_secs(2))
        .unwrap();
    println!("FROZEN {}", guard.watchdog_pid().unwrap());
    std::thread::sleep(Duration::from_secs(60));
    drop(guard);
}

/// Starts the child on `mnt` and returns it with its watchdog's pid once it has frozen.
fn frozen_child(mnt: &Path) -> (std::process::Child, u32, Instant) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_freezes_and_waits_to_be_killed",
            "--nocapture",
        ])
        .env(CHILD_ENV, mnt)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(pid) = line.strip_prefix("FROZEN ") {
            return (child, pid.trim().parse().unwrap(), Instant::now());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the child did not freeze");
}

#[test]
fn a_sigkilled_freezer_leaves_nothing_frozen() {
    need_loop!("a_sigkilled_freezer_leaves_nothing_frozen", EXT4);
    let mut a = LoopDisk::new(64, &[]);
    let dev = a.dev.clone();
    let mnt = a.mkfs_mount(&dev, "ext4", "m");
    let (mut child, wd, frozen_at) = frozen_child(&mnt);
    let w = write_in_thread(&mnt, "blocked.txt");
    std::thread::sleep(Duration::from_millis(200));
    assert!(w.try_recv().is_err(), "the child's freeze holds");

    let killed = Instant::now();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let took = w
        .recv_timeout(Duration::from_secs(3))
        .expect("thawed after the kill");
    let after_kill = killed.elapsed();
    let after_freeze = frozen_at.elapsed();
    eprintln!(
        "SIGKILLed freezer: writable {after_kill:?} after the kill, {after_freeze:?} after the \
         freeze (bound 2 s); the write waited {took:?}"
    );
    assert!(after_freeze < Duration::from_secs(3), "bound + 1 s");
    assert!(after_kill < Duration::from_secs(1), "{after_kill:?}");
    let t = Instant::now();
    while !process_gone(wd) {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the watchdog exits after thawing"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn restart_path_thaws_what_a_killed_agent_and_watchdog_left_frozen() {
    need_loop!(
        "restart_path_thaws_what_a_killed_agent_and_watchdog_left_frozen",
        EXT4
    );
    let mut a = LoopDisk::new(64, &[]);
    let dev = a.dev.clone();
    let mnt = a.mkfs_mount(&dev, "ext4", "m");
    let (mut child, wd, _) = frozen_child(&mnt);
    // The worst case: the watchdog dies first (a kill of the whole cgroup), then the agent.
    // SAFETY: kill() with a pid of a process this test started (through its child).
    unsafe { libc::kill(wd as i32, libc::SIGKILL) };
    child.kill().unwrap();
    child.wait().unwrap();
    let w = write_in_thread(&mnt, "stuck.txt");
    // Past the 2 s bound nobody thaws.
    assert!(
        w.recv_timeout(Duration::from_millis(2500)).is_err(),
        "still frozen"
    );
    // What the agent's restart path does:
    let thawed = thaw_all(&[&mnt]).unwrap();
    assert_eq!(thawed, vec![mnt.clone()]);
    w.recv_timeout(Duration::from_secs(2))
        .expect("writable after thaw_all");
    assert!(
        thaw_all(&[&mnt]).unwrap().is_empty(),
        "EINVAL (not frozen) is fine"
    );
}
