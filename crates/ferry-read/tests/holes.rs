//! Holes are not read: an image file's own, and a loop device's (its backing file's, at the loop's
//! offset, and through a partition), while every chunk handed over is exactly what a plain read of
//! the file gives. A loop device's reads are counted by the kernel (`/sys/block/loopN/stat`), so a
//! hole read anyway shows. Loop devices need root; skips loudly otherwise (fails instead with
//! FERRY_REQUIRE_EBPF=1).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use ferry_read::{ChunkReader, CHUNK_SIZE};
use ferry_testkit::loopdev::{Loop as TestLoop, LoopOptions};

/// Not tmpfs: the backing files live on a real filesystem that reports holes.
const DIR: &str = "/var/tmp";
const MIB: u64 = 1 << 20;

/// A sparse file of `size` bytes holding `writes` (each at a 4 KiB-aligned offset), synced.
struct Image {
    file: tempfile::NamedTempFile,
    writes: Vec<(u64, Vec<u8>)>,
}

impl Image {
    fn new(size: u64, writes: Vec<(u64, Vec<u8>)>) -> Image {
        let file = tempfile::Builder::new()
            .prefix("ferry-read-holes-")
            .tempfile_in(DIR)
            .expect("create the image");
        file.as_file().set_len(size).expect("size the image");
        for (at, data) in &writes {
            file.as_file().write_all_at(data, *at).expect("write");
        }
        file.as_file().sync_all().expect("sync");
        Image { file, writes }
    }

    /// The layout the tests share: data not aligned to chunks, a region of written zeros (data
    /// to the filesystem: read), a run of whole chunks, and the tail.
    fn mixed(size: u64) -> Image {
        Image::new(
            size,
            vec![
                (MIB + 4096, random_bytes(200 * 1024, 1)),
                (10 * MIB, random_bytes(2 * MIB as usize, 2)),
                (20 * MIB, vec![0u8; MIB as usize]),
                (size - 12 * 1024, random_bytes(12 * 1024, 3)),
            ],
        )
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).expect("read the image")
    }

    /// Bytes of the chunks of `[from, from + len)` of the file that no write touches.
    fn hole_bytes(&self, from: u64, len: u64) -> u64 {
        (0..len.div_ceil(CHUNK_SIZE))
            .map(|c| {
                let a = from + c * CHUNK_SIZE;
                let b = (a + CHUNK_SIZE).min(from + len);
                let touched = self
                    .writes
                    .iter()
                    .any(|(at, d)| *at < b && at + d.len() as u64 > a);
                if touched {
                    0
                } else {
                    b - a
                }
            })
            .sum()
    }
}

/// Reads every chunk of `dev`, checks each against `want`, and returns the hole bytes the reader
/// reported and the bytes the kernel says were read from `dev` meanwhile (`None` for a file).
fn read_all(dev: &Path, want: &[u8]) -> (u64, Option<u64>) {
    let mut reader = ChunkReader::open(dev, 16).expect("open");
    assert_eq!(reader.size(), want.len() as u64);
    assert!(
        reader.knows_holes(),
        "{} should know its holes",
        dev.display()
    );
    let all: Vec<u64> = (0..reader.size().div_ceil(CHUNK_SIZE)).collect();
    let before = sectors_read(dev);
    let mut seen = 0u64;
    let stats = reader
        .read_chunks(&all, |i, got| {
            if got != expected_chunk(want, i) {
                return Err(format!("chunk {i} differs from a plain read of the file"));
            }
            seen += 1;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{}: {e}", dev.display()));
    assert_eq!(seen, all.len() as u64);
    assert_eq!(stats.bytes, want.len() as u64);
    let read = before.map(|b| (sectors_read(dev).expect("stat") - b) * 512);
    (stats.hole_bytes, read)
}

/// Sectors read from a block device so far, per the kernel (`/sys/class/block/NAME/stat`).
fn sectors_read(dev: &Path) -> Option<u64> {
    let name = dev.file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/class/block/{name}/stat")).ok()?;
    s.split_whitespace().nth(2)?.parse().ok()
}

fn loop_or_skip(test: &str, file: &Path, o: &LoopOptions) -> Option<TestLoop> {
    if skip(test, loop_unavailable()) {
        return None;
    }
    match TestLoop::attach_with(file, o) {
        Ok(l) => Some(l),
        Err(why) => {
            skip(test, Some(why));
            None
        }
    }
}

/// Data read: at most the data chunks and the slack of a udev probe on attach.
fn assert_read_only_data(read: u64, size: u64, holes: u64) {
    assert!(
        read <= size - holes + 4 * MIB,
        "read {read} bytes of a device whose data chunks are {} bytes",
        size - holes
    );
}

#[test]
fn an_image_file_s_holes_are_handed_over_as_zeros_not_read() {
    let size = 64 * MIB + 7 * 512;
    let img = Image::mixed(size);
    let (holes, _) = read_all(img.file.path(), &img.contents());
    assert_eq!(holes, img.hole_bytes(0, size));
    assert!(holes > 55 * MIB, "{holes}");
}

#[test]
fn a_loop_device_s_holes_are_its_backing_file_s() {
    let test = "a_loop_device_s_holes_are_its_backing_file_s";
    let size = 64 * MIB;
    let img = Image::mixed(size);
    let Some(lo) = loop_or_skip(test, img.file.path(), &LoopOptions::default()) else {
        return;
    };
    let (holes, read) = read_all(&lo.dev, &img.contents());
    assert_eq!(holes, img.hole_bytes(0, size));
    assert_read_only_data(read.expect("a block device"), size, holes);
}

#[test]
fn a_loop_device_at_an_offset_maps_its_holes_there() {
    let test = "a_loop_device_at_an_offset_maps_its_holes_there";
    let size = 64 * MIB;
    // 3 MiB + 4 KiB in: chunk boundaries of the device are not the file's.
    let offset = 3 * MIB + 4096;
    let img = Image::mixed(size);
    let o = LoopOptions {
        offset: Some(offset),
        ..Default::default()
    };
    let Some(lo) = loop_or_skip(test, img.file.path(), &o) else {
        return;
    };
    let (holes, read) = read_all(&lo.dev, &img.contents()[offset as usize..]);
    assert_eq!(holes, img.hole_bytes(offset, size - offset));
    assert_read_only_data(read.expect("a block device"), size - offset, holes);
}

#[test]
fn a_partition_of_a_loop_device_maps_its_holes_at_its_start() {
    let test = "a_partition_of_a_loop_device_maps_its_holes_at_its_start";
    if skip(test, loop_unavailable()) {
        return;
    }
    let size = 64 * MIB;
    let img = Image::mixed(size);
    // The table goes into the file before the loop sees it (its sectors are data, outside the
    // partition).
    let table = "label: gpt\nstart=2056, size=126976, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n";
    let out = ferry_testkit::sys::sh(&format!(
        "printf '{}' | sfdisk -q {} 2>&1; echo rc=$?",
        table.replace('\n', "\\n"),
        img.file.path().display()
    ));
    assert!(out.trim_end().ends_with("rc=0"), "sfdisk: {out}");
    let o = LoopOptions {
        partitions: 1,
        ..Default::default()
    };
    let Some(lo) = loop_or_skip(test, img.file.path(), &o) else {
        return;
    };
    let (start, len) = (2056 * 512, 126_976 * 512);
    let want = &img.contents()[start as usize..(start + len) as usize];
    let part: PathBuf = lo.part(1);
    let (holes, read) = read_all(&part, want);
    assert_eq!(holes, img.hole_bytes(start, len));
    assert_read_only_data(read.expect("a block device"), len, holes);
}

/// A filesystem's metadata is written through the device's own page cache; what is dirty there
/// is not in the backing file yet, but a read of the device returns it. The reader must too.
#[test]
fn data_dirty_in_the_device_s_page_cache_is_read_not_taken_for_a_hole() {
    let test = "data_dirty_in_the_device_s_page_cache_is_read_not_taken_for_a_hole";
    let size = 64 * MIB;
    let img = Image::mixed(size);
    let Some(lo) = loop_or_skip(test, img.file.path(), &LoopOptions::default()) else {
        return;
    };
    // Into a hole, buffered, not synced: dirty in /dev/loopN's page cache.
    let at = 40 * MIB + 8192;
    let data = random_bytes(8192, 4);
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.dev)
        .expect("open the device to write");
    dev.write_all_at(&data, at).expect("write");
    let mut want = img.contents();
    want[at as usize..at as usize + data.len()].copy_from_slice(&data);
    let (holes, _) = read_all(&lo.dev, &want);
    assert_eq!(holes, img.hole_bytes(0, size) - CHUNK_SIZE);
    drop(dev);
}

/// A file that shrank while open is an error, not zeros for the bytes that are gone (the kernel
/// reports what follows its new end as "no data" too).
#[test]
fn a_file_that_shrank_is_an_error_not_zeros() {
    let size = 8 * MIB;
    let img = Image::new(size, vec![(0, random_bytes(MIB as usize, 5))]);
    let mut reader = ChunkReader::open(img.file.path(), 4).expect("open");
    img.file.as_file().set_len(2 * MIB).expect("truncate");
    let all: Vec<u64> = (0..size / CHUNK_SIZE).collect();
    let mut past_the_end = 0;
    let r = reader.read_chunks(&all, |i, _| {
        if i * CHUNK_SIZE >= 2 * MIB {
            past_the_end += 1;
        }
        Ok::<(), String>(())
    });
    assert!(
        matches!(r, Err(ferry_read::ReadError::Eof { .. })),
        "not an end-of-file error: {r:?}; {past_the_end} chunks past the new end handed over"
    );
    assert_eq!(past_the_end, 0);
}
