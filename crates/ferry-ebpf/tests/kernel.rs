//! The eBPF tracker on the real kernel, with real loop devices and the real tools (dd, blkdiscard,
//! fallocate). Needs root, BTF and loop devices; skips loudly without them.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;
use common::*;
use ferry_ebpf::{BlockDevice, ResyncReason, Tracker, TrackerError, TrackerOptions, CHUNK_SIZE};

const KIB: u64 = 1024;

/// One operation of the first test: what it runs and which whole-disk bytes it writes.
struct Op {
    what: &'static str,
    cmd: &'static str,
    args: Vec<String>,
    /// Whole-disk byte range written (empty for reads).
    range: Option<(u64, u64)>,
}

fn op(what: &'static str, cmd: &'static str, args: &[&str], range: Option<(u64, u64)>) -> Op {
    Op {
        what,
        cmd,
        args: args.iter().map(|s| s.to_string()).collect(),
        range,
    }
}

#[test]
fn writes_partitions_discards_and_zeroes_are_all_tracked() -> Result<()> {
    if skip("writes_partitions_discards_and_zeroes_are_all_tracked") {
        return Ok(());
    }
    // Partition 1 starts 1 KiB past 1 MiB: not chunk-aligned, so a partition offset that is
    // chunk-aligned is not one on the disk.
    let part_start_sector = 2050u32;
    let lo = Loop::with_mbr(256 * MIB, 1, part_start_sector)?;
    let p1 = lo.part(1);
    let part = BlockDevice::resolve(&p1)?
        .partition
        .expect("p1 is a partition");
    assert_eq!(part.start, u64::from(part_start_sector) * 512);
    let pstart = part.start;

    // Tracking a partition is refused, naming its disk.
    match Tracker::open(std::slice::from_ref(&p1)) {
        Err(TrackerError::Partition { disk, start, .. }) => {
            assert_eq!(PathBuf::from("/dev").join(&disk), lo.dev);
            assert_eq!(start, pstart);
        }
        other => panic!("tracking a partition: {other:?}"),
    }

    let before = read_image(&lo.dev)?;
    let mut tracker = Tracker::open(std::slice::from_ref(&lo.dev))?;
    assert_eq!(tracker.disks()[0].chunks, 256 * MIB / CHUNK_SIZE);
    let dev = lo.path();
    let p1s = p1.to_str().unwrap();
    let ops = [
        // O_DIRECT, 8 KiB across the boundary of chunks 1 and 2.
        op(
            "dd direct across a chunk boundary",
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={dev}"),
                "bs=1k",
                "count=8",
                "seek=124",
                "oflag=direct",
                "conv=notrunc",
                "status=none",
            ],
            Some((124 * KIB, 8 * KIB)),
        ),
        // Buffered, then fsync: written back by the page cache.
        op(
            "dd buffered + fsync",
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={dev}"),
                "bs=4k",
                "count=3",
                "seek=25602",
                "conv=fsync,notrunc",
                "status=none",
            ],
            Some((25602 * 4 * KIB, 12 * KIB)),
        ),
        // To the partition: must land on the disk at partition start + offset (chunks 16 and 17).
        op(
            "dd direct to the partition",
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={p1s}"),
                "bs=1k",
                "count=4",
                "seek=60",
                "oflag=direct",
                "conv=notrunc",
                "status=none",
            ],
            Some((pstart + 60 * KIB, 4 * KIB)),
        ),
        op(
            "dd buffered + fsync to the partition",
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={p1s}"),
                "bs=4k",
                "count=1",
                "seek=1000",
                "conv=fsync,notrunc",
                "status=none",
            ],
            Some((pstart + 4000 * KIB, 4 * KIB)),
        ),
        op(
            "discard",
            "blkdiscard",
            &[
                "-o",
                &(64 * MIB).to_string(),
                "-l",
                &(4 * MIB).to_string(),
                dev,
            ],
            Some((64 * MIB, 4 * MIB)),
        ),
        // A large discard not aligned to the bitmap's words: exercises the coarse bitmap.
        op(
            "large unaligned discard",
            "blkdiscard",
            &[
                "-o",
                &(200 * MIB + 4 * KIB).to_string(),
                "-l",
                &(40 * MIB + 8 * KIB).to_string(),
                dev,
            ],
            Some((200 * MIB + 4 * KIB, 40 * MIB + 8 * KIB)),
        ),
        op(
            "write-zeroes (blkdiscard -z)",
            "blkdiscard",
            &[
                "-z",
                "-o",
                &(128 * MIB).to_string(),
                "-l",
                &MIB.to_string(),
                dev,
            ],
            Some((128 * MIB, MIB)),
        ),
        op(
            "zero range (fallocate -z)",
            "fallocate",
            &[
                "-z",
                "-o",
                &(160 * MIB).to_string(),
                "-l",
                &(192 * KIB).to_string(),
                dev,
            ],
            Some((160 * MIB, 192 * KIB)),
        ),
        op(
            "punch hole (fallocate -p)",
            "fallocate",
            &[
                "-p",
                "-o",
                &(170 * MIB).to_string(),
                "-l",
                &(128 * KIB).to_string(),
                dev,
            ],
            Some((170 * MIB, 128 * KIB)),
        ),
        // Reads change nothing and must mark nothing.
        op(
            "direct read",
            "dd",
            &[
                &format!("if={dev}"),
                "of=/dev/null",
                "bs=1M",
                "count=16",
                "skip=32",
                "iflag=direct",
                "status=none",
            ],
            None,
        ),
    ];
    let mut touched = BTreeSet::new();
    for o in &ops {
        let args: Vec<&str> = o.args.iter().map(String::as_str).collect();
        run(o.cmd, &args).map_err(|e| e.context(o.what))?;
        if let Some((off, len)) = o.range {
            touched.extend(chunks_of(off, len));
        }
    }

    let dirty = tracker.drain(0)?;
    let after = read_image(&lo.dev)?;
    let drained: BTreeSet<u64> = dirty.chunks().collect();
    let really = changed(&before, &after);
    assert!(!dirty.needs_resync(), "{:?}", dirty.resync);
    let missed: Vec<_> = really.difference(&drained).collect();
    assert!(missed.is_empty(), "changed but not reported: {missed:?}");
    let extra: Vec<_> = drained.difference(&touched).collect();
    assert!(extra.is_empty(), "reported but never written: {extra:?}");
    // Every write-direction op is reported, also where it changed nothing.
    for o in &ops {
        if let Some((off, len)) = o.range {
            let want: BTreeSet<u64> = chunks_of(off, len).collect();
            assert!(
                want.is_subset(&drained),
                "{}: {want:?} not all reported",
                o.what
            );
        }
    }
    assert!(
        drained.contains(&16) && drained.contains(&17),
        "partition write"
    );
    assert!(
        drained.contains(&1) && drained.contains(&2),
        "boundary write"
    );
    assert!(
        !drained.contains(&(32 * MIB / CHUNK_SIZE)),
        "a read was reported"
    );

    // Nothing happened since: the next drain is empty.
    let again = tracker.drain(0)?;
    assert!(again.is_empty(), "{:?}", again.runs());
    assert!(!again.needs_resync());
    Ok(())
}

#[test]
fn two_disks_are_kept_apart() -> Result<()> {
    if skip("two_disks_are_kept_apart") {
        return Ok(());
    }
    let a = Loop::new(64 * MIB, 2)?;
    let b = Loop::new(64 * MIB, 3)?;
    let untracked = Loop::new(64 * MIB, 4)?;
    let mut tracker = Tracker::open(&[a.dev.clone(), b.dev.clone()])?;
    let write = |lo: &Loop, chunk: u64| -> Result<()> {
        let f = open_direct(&lo.dev, true)?;
        let mut buf = Aligned::new(4096);
        Rng::new(chunk).fill(buf.as_mut());
        std::os::unix::fs::FileExt::write_all_at(&f, buf.as_ref(), chunk * CHUNK_SIZE + 8192)?;
        Ok(())
    };
    write(&a, 3)?;
    write(&a, 100)?;
    write(&b, 7)?;
    write(&b, 500)?;
    write(&untracked, 3)?;
    write(&untracked, 9)?;
    let sets = tracker.drain_all()?;
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].chunks().collect::<Vec<_>>(), vec![3, 100], "disk a");
    assert_eq!(sets[1].chunks().collect::<Vec<_>>(), vec![7, 500], "disk b");

    write(&b, 1000)?;
    assert!(tracker.drain(0)?.is_empty(), "disk a was not written");
    assert_eq!(tracker.drain(1)?.chunks().collect::<Vec<_>>(), vec![1000]);
    assert!(matches!(
        tracker.drain(2),
        Err(TrackerError::UnknownDisk { index: 2, .. })
    ));
    // The same disk twice is refused.
    let link = a.dir().join("again");
    std::os::unix::fs::symlink(&a.dev, &link)?;
    assert!(matches!(
        Tracker::open(&[a.dev.clone(), link]),
        Err(TrackerError::Duplicate { .. })
    ));
    Ok(())
}

#[test]
fn a_disk_that_grows_asks_for_a_resync() -> Result<()> {
    if skip("a_disk_that_grows_asks_for_a_resync") {
        return Ok(());
    }
    let lo = Loop::new(32 * MIB, 5)?;
    let mut tracker = Tracker::open(std::slice::from_ref(&lo.dev))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.file)?
        .set_len(64 * MIB)?;
    run("losetup", &["-c", lo.path()])?;
    assert_eq!(BlockDevice::resolve(&lo.dev)?.size, 64 * MIB);
    let f = open_direct(&lo.dev, true)?;
    let mut buf = Aligned::new(4096);
    Rng::new(9).fill(buf.as_mut());
    std::os::unix::fs::FileExt::write_all_at(&f, buf.as_ref(), 48 * MIB)?;
    std::os::unix::fs::FileExt::write_all_at(&f, buf.as_ref(), MIB)?;
    let set = tracker.drain(0)?;
    assert_eq!(
        set.chunks().collect::<Vec<_>>(),
        vec![MIB / CHUNK_SIZE],
        "the write inside the bitmap"
    );
    assert!(
        matches!(set.resync.as_slice(), [ResyncReason::Overflow { bios: 1 }]),
        "{:?}",
        set.resync
    );
    // Reported once: the next drain is clean again.
    assert!(!tracker.drain(0)?.needs_resync());
    Ok(())
}

/// A zram device, hot-added and removed on drop: a bio-based disk (no blk-mq), whose writes the
/// tracker follows to completion through its in-flight table.
struct Zram {
    id: String,
    dev: PathBuf,
}

impl Zram {
    fn new(size: u64) -> Result<Option<Zram>> {
        let control = std::path::Path::new("/sys/class/zram-control/hot_add");
        if !control.exists() {
            return Ok(None);
        }
        let id = std::fs::read_to_string(control)?.trim().to_owned();
        let z = Zram {
            dev: PathBuf::from(format!("/dev/zram{id}")),
            id,
        };
        std::fs::write(
            format!("/sys/block/zram{}/disksize", z.id),
            size.to_string(),
        )?;
        Ok(Some(z))
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("/sys/block/zram{}/reset", self.id), "1");
        let _ = std::fs::write("/sys/class/zram-control/hot_remove", &self.id);
    }
}

#[test]
fn a_bio_based_disk_is_tracked_to_completion() -> Result<()> {
    const TEST: &str = "a_bio_based_disk_is_tracked_to_completion";
    if skip(TEST) {
        return Ok(());
    }
    let Some(z) = Zram::new(64 * MIB)? else {
        ferry_testkit::skip(
            TEST,
            "no zram (bio-based disks NOT tested on this machine)",
            "FERRY_REQUIRE_EBPF",
        );
        return Ok(());
    };
    let dev = BlockDevice::resolve(&z.dev)?;
    assert!(!dev.blk_mq, "zram is bio-based");
    // A tiny in-flight table: if completions did not free their entries it would fill at once
    // and the drain would ask for a resync.
    let opts = TrackerOptions {
        max_in_flight: 16,
        ..TrackerOptions::default()
    };
    let mut tracker = Tracker::open_with(std::slice::from_ref(&z.dev), &opts)?;
    let f = open_direct(&z.dev, true)?;
    let mut buf = Aligned::new(4096);
    let mut want = BTreeSet::new();
    let mut rng = Rng::new(31);
    for _ in 0..2000 {
        let off = rng.below(64 * MIB / 4096) * 4096;
        rng.fill(buf.as_mut());
        std::os::unix::fs::FileExt::write_all_at(&f, buf.as_ref(), off)?;
        want.insert(off / CHUNK_SIZE);
    }
    run(
        "blkdiscard",
        &[
            "-o",
            &(32 * MIB).to_string(),
            "-l",
            &MIB.to_string(),
            z.dev.to_str().unwrap(),
        ],
    )?;
    want.extend(chunks_of(32 * MIB, MIB));
    let dirty = tracker.drain(0)?;
    assert!(!dirty.needs_resync(), "{:?}", dirty.resync);
    assert_eq!(dirty.chunks().collect::<BTreeSet<_>>(), want);
    Ok(())
}
