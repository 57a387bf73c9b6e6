//! Draining while writers run: the union of the drains covers every changed chunk, and a replica
//! kept up to date only by reading the drained chunks ends up identical to the disk (so a chunk
//! read while a write to it was still in flight is always reported again).

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use common::*;
use ferry_ebpf::{Tracker, CHUNK_SIZE};

const SIZE: u64 = 256 * MIB;
const RUN_FOR: Duration = Duration::from_secs(3);

/// Direct writes go to the first half of the disk and buffered ones to the second: the kernel fails
/// a buffered writer's fsync with EIO when a direct write cannot invalidate its cached pages.
const HALF: u64 = SIZE / 2;

/// Paces the writers so that a drain finds a few hundred chunks, not thousands.
fn pause(rng: &mut Rng) {
    std::thread::sleep(Duration::from_micros(200 + rng.below(800)));
}

/// O_DIRECT writes of 4 KiB..256 KiB at 4 KiB-aligned offsets, and now and then a zeroed range.
fn direct_writer(
    dev: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> Result<()> {
    let f = open_direct(&dev, true)?;
    let mut rng = Rng::new(11);
    let mut buf = Aligned::new(256 * 1024);
    while !stop.load(Ordering::Relaxed) {
        let len = (1 + rng.below(64)) * 4096;
        let off = rng.below((HALF - len) / 4096) * 4096;
        if rng.below(10) == 0 {
            // SAFETY: fallocate on an open fd with in-range arguments; no memory is passed.
            let rc = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            };
            ensure!(rc == 0, "fallocate: {}", std::io::Error::last_os_error());
        } else {
            let b = &mut buf.as_mut()[..len as usize];
            rng.fill(b);
            f.write_all_at(b, off)?;
        }
        ops.fetch_add(1, Ordering::Relaxed);
        pause(&mut rng);
    }
    Ok(())
}

/// Buffered writes at any byte offset, written back by fdatasync every few writes.
fn buffered_writer(
    dev: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(&dev)?;
    let mut rng = Rng::new(12);
    let mut buf = vec![0u8; 100_000];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let len = 1 + rng.below(buf.len() as u64);
        let off = HALF + rng.below(HALF - len);
        let b = &mut buf[..len as usize];
        rng.fill(b);
        f.write_all_at(b, off)?;
        n += 1;
        if n & 7 == 0 {
            f.sync_data()?;
        }
        ops.fetch_add(1, Ordering::Relaxed);
        pause(&mut rng);
    }
    f.sync_all()?;
    Ok(())
}

#[test]
fn drains_under_concurrent_writes_lose_nothing() -> Result<()> {
    if skip("drains_under_concurrent_writes_lose_nothing") {
        return Ok(());
    }
    let lo = Loop::new(SIZE, 6)?;
    let before = read_image(&lo.dev)?;
    let mut tracker = Tracker::open(std::slice::from_ref(&lo.dev))?;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let writers = [
        {
            let (d, s, o) = (lo.dev.clone(), stop.clone(), ops.clone());
            std::thread::spawn(move || direct_writer(d, s, o))
        },
        {
            let (d, s, o) = (lo.dev.clone(), stop.clone(), ops.clone());
            std::thread::spawn(move || buffered_writer(d, s, o))
        },
    ];

    // The "shipper": drain, read what was drained into the replica, repeat.
    let reader = open_direct(&lo.dev, false)?;
    let mut buf = Aligned::new(CHUNK_SIZE as usize);
    let mut replica = before.clone();
    let mut union = BTreeSet::new();
    let mut ship = |set: &ferry_ebpf::DirtySet, replica: &mut Vec<u8>| -> Result<()> {
        for c in set.chunks() {
            read_chunk(&reader, c, &mut buf)?;
            let at = (c * CHUNK_SIZE) as usize;
            replica[at..at + CHUNK_SIZE as usize].copy_from_slice(buf.as_ref());
        }
        Ok(())
    };
    let mut rng = Rng::new(13);
    let mut drains = 0u32;
    let mut drain_time = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < RUN_FOR {
        let t = Instant::now();
        let set = tracker.drain(0)?;
        drain_time += t.elapsed();
        assert!(!set.needs_resync(), "{:?}", set.resync);
        ship(&set, &mut replica)?;
        union.extend(set.chunks());
        drains += 1;
        std::thread::sleep(Duration::from_millis(rng.below(10)));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer panicked")?;
    }
    // Every write has completed: one more drain holds the rest.
    let last = tracker.drain(0)?;
    assert!(!last.needs_resync(), "{:?}", last.resync);
    ship(&last, &mut replica)?;
    union.extend(last.chunks());

    let after = read_image(&lo.dev)?;
    let really = changed(&before, &after);
    let writes = ops.load(Ordering::Relaxed);
    eprintln!(
        "{writes} writes, {drains} drains ({:?} each), {} chunks changed, {} reported",
        drain_time / drains.max(1),
        really.len(),
        union.len()
    );
    assert!(drains >= 50, "only {drains} drains");
    assert!(writes >= 500, "only {writes} writes");
    let missed: Vec<_> = really.difference(&union).collect();
    assert!(missed.is_empty(), "changed but never reported: {missed:?}");
    let stale = changed(&replica, &after);
    assert!(stale.is_empty(), "replica chunks stale: {stale:?}");
    Ok(())
}
