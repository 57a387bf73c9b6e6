//! The reader on a real block device (a loop device over a file in /var/tmp): the fast path must
//! be taken, sizes and logical block sizes come from the ioctls, contents match. Needs root; skips
//! loudly otherwise (fails instead with FERRY_REQUIRE_EBPF=1).

mod common;

use std::path::Path;

use common::*;
use ferry_read::{ChunkReader, ReadMode, CHUNK_SIZE};

/// Not tmpfs: the loop device's backing file lives on a real filesystem.
const DIR: &str = "/var/tmp";

fn check_device(test: &str, sector_size: u32, size: u64) {
    if skip(test, loop_unavailable()) {
        return;
    }
    let data = random_bytes(size as usize, size ^ u64::from(sector_size));
    let file = temp_file_in(Path::new(DIR), &data);
    let dev = match Loop::attach(file.path(), sector_size) {
        Ok(dev) => dev,
        Err(why) => {
            skip(test, Some(why));
            return;
        }
    };
    let mut reader = ChunkReader::open(&dev.dev, 16).expect("open the loop device");
    assert_eq!(
        reader.mode(),
        ReadMode::IoUringDirect,
        "{} must be read with io_uring + O_DIRECT",
        dev.dev.display()
    );
    assert_eq!(reader.size(), size, "BLKGETSIZE64 of {}", dev.dev.display());
    let count = size.div_ceil(CHUNK_SIZE);
    let all: Vec<u64> = (0..count).collect();
    let every_third: Vec<u64> = (0..count).step_by(3).collect();
    let runs: Vec<u64> = (0..count).filter(|i| i % 37 < 20).collect();
    for chunks in [&all[..], &every_third, &runs, &[count - 1], &[0, count - 1]] {
        read_and_check(&mut reader, &data, chunks);
    }
}

/// 512-byte sectors; the last chunk is 7 sectors, so its read is rounded to 512 bytes.
#[test]
fn loop_device_with_512_byte_sectors() {
    check_device(
        "loop_device_with_512_byte_sectors",
        512,
        5 * (1 << 20) + 7 * 512,
    );
}

/// 4 KiB logical blocks (BLKSSZGET = 4096); the last chunk is 3 blocks.
#[test]
fn loop_device_with_4k_sectors() {
    check_device(
        "loop_device_with_4k_sectors",
        4096,
        3 * (1 << 20) + 3 * 4096,
    );
}
