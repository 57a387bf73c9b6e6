//! A loop device over a sparse file is scanned by reading its data, not its holes (found in its
//! backing file), and the digest stays exactly `b3sum`'s of the device. The reads are the
//! kernel's count for the device (`/sys/class/block/loopN/stat`). Needs root; skips loudly
//! otherwise (fails instead with FERRY_REQUIRE_EBPF=1).

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;

use common::{data_blocks, pattern};
use ferry_crypto::MasterKey;
use ferry_scan::{scan, Source, BLOCK_SIZE};
use ferry_testkit::loopdev::Loop;

fn sectors_read(dev: &std::path::Path) -> u64 {
    let name = dev.file_name().unwrap().to_str().unwrap();
    let s = std::fs::read_to_string(format!("/sys/class/block/{name}/stat")).expect("stat");
    s.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn a_sparse_loop_device_reads_its_data_not_its_holes_and_digests_exactly() {
    let test = "a_sparse_loop_device_reads_its_data_not_its_holes_and_digests_exactly";
    if !ferry_testkit::sys::is_root() || !std::path::Path::new("/dev/loop-control").exists() {
        ferry_testkit::skip(
            test,
            "loop devices need root and /dev/loop-control",
            "FERRY_REQUIRE_EBPF",
        );
        return;
    }
    // On a real filesystem (not tmpfs), which reports holes.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("sparse.img");
    let size: u64 = 1 << 30;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let regions: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(1 << 20, 1)),
        ((300 << 20) + 4096, pattern(5 << 20, 2)),
        (700 << 20, vec![0u8; 1 << 20]),
        (size - 8192, pattern(8192, 3)),
    ];
    for (off, data) in &regions {
        f.write_all_at(data, *off).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let data_blocks = data_blocks(&regions);
    let data_block_bytes = data_blocks.len() as u64 * BLOCK_SIZE as u64;

    let lo = match Loop::attach(&path) {
        Ok(l) => l,
        Err(why) => {
            ferry_testkit::skip(test, &why, "FERRY_REQUIRE_EBPF");
            return;
        }
    };
    let src = Source::open(&lo.dev).unwrap();
    assert!(src.knows_holes(), "a loop device knows its holes");
    let key = MasterKey::from_bytes(&[5; 32], "k");
    let stop = AtomicBool::new(false);
    let before = sectors_read(&lo.dev);
    let r = scan(&src, &key, 2, |_, _| Ok(()), |_| Ok(()), |_| {}, &stop).unwrap();
    let read = (sectors_read(&lo.dev) - before) * 512;
    drop(src);

    assert_eq!(r.hole_bytes, size - data_block_bytes);
    // At most the data blocks, and a udev probe's and readahead's worth besides. (No lower bound:
    // a probe on attach may have cached some data blocks already. A hole taken for data shows
    // here; data taken for a hole, in the digest below.)
    assert!(
        read < data_block_bytes + (4 << 20),
        "read {read} bytes of {}; the blocks holding data are {data_block_bytes} bytes",
        lo.dev.display()
    );
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(&path).unwrap())
        .unwrap();
    assert_eq!(r.blake3, *h.finalize().as_bytes(), "whole-device digest");
}
