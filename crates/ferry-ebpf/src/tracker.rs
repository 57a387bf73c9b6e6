//! Loading, attaching and draining the BPF tracker.

use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, OpenObject, Program};

use crate::dirty::DirtySet;
use crate::mmap::MapMemory;
use crate::skel::{TrackerSkel, TrackerSkelBuilder};
use crate::{BlockDevice, ResyncReason, TrackerError, CHUNK_SIZE, MAX_DISKS};

/// Bytes of one `struct slot_ctl` in the `slots` map, and the u64 index of each of its fields.
const SLOT_CTL_BYTES: usize = 64;
const SLOT_CTL_WORDS: usize = SLOT_CTL_BYTES / 8;
/// Byte offset of `flags` (u32) in `struct slot_ctl`, and its one flag.
const CTL_FLAGS_BYTE: usize = 4;
const SLOT_BIO_BASED: u32 = 1;
const CTL_FINE: usize = 1;
const CTL_COARSE: usize = 3;
const CTL_CHUNKS: usize = 5;
const CTL_OVERFLOW: usize = 6;
const CTL_UNTRACKED: usize = 7;
const _: () = assert!(std::mem::size_of::<crate::skel::types::slot_ctl>() == SLOT_CTL_BYTES);

/// Chunks per bitmap word.
const WORD_BITS: u64 = 64;

/// Limits of a [`Tracker`]. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct TrackerOptions {
    /// Largest disk accepted, in bytes (default 8 TiB, the largest Azure page blob). Kernel memory
    /// is 2 bits per 64 KiB of each disk's actual size: 32 MiB for an 8 TiB disk.
    pub max_disk_bytes: u64,
    /// Write bios that can be in flight at once on the tracked *bio-based* disks (device mapper,
    /// md, zram; request-based disks need no table), default 65536, ~4 MiB of kernel memory.
    /// Beyond that a bio is not re-marked at completion and the disk needs a resync.
    pub max_in_flight: u32,
    /// How long a drain waits for programs still marking the old bitmap (default 1 s; they run for
    /// microseconds, so reaching it means something is badly wrong).
    pub grace_timeout: Duration,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions {
            max_disk_bytes: 8 << 40,
            max_in_flight: 65536,
            grace_timeout: Duration::from_secs(1),
        }
    }
}

/// A disk the tracker watches.
#[derive(Debug, Clone)]
pub struct TrackedDisk {
    /// The path given to [`Tracker::open`].
    pub path: PathBuf,
    /// What the kernel knows about it.
    pub device: BlockDevice,
    /// Chunks in its bitmap (its size when tracking started, rounded up to a chunk).
    pub chunks: u64,
}

struct Slot {
    disk: TrackedDisk,
    /// The epoch the kernel marks now.
    epoch: u32,
    /// An epoch flipped away from but not read yet (a drain hit its grace timeout).
    unread: Option<u32>,
    /// Index in `words` of each epoch's fine bitmap (a bit per chunk).
    fine: [u64; 2],
    /// Index in `words` of each epoch's coarse bitmap (a bit per fine word: 64 chunks).
    coarse: [u64; 2],
    fine_words: u64,
    coarse_words: u64,
    seen_overflow: u64,
    seen_untracked: u64,
    seen_missed: u64,
}

/// The eBPF tracker of a set of whole disks. Dropping it detaches the programs.
pub struct Tracker {
    // Field order is drop order: detach first, then unmap, then close the object.
    links: Vec<Link>,
    slots_mem: MapMemory,
    words_mem: MapMemory,
    skel: TrackerSkel<'static>,
    slots: Vec<Slot>,
    grace_timeout: Duration,
}

impl Tracker {
    /// Starts tracking `disks` (whole-disk block devices) with the default [`TrackerOptions`].
    ///
    /// A partition is refused with [`TrackerError::Partition`], which names its disk and its start:
    /// chunk indexes are whole-disk offsets, and silently tracking the parent disk would make a
    /// caller that thinks in partition offsets read the wrong chunks. Track the disk and subtract
    /// [`crate::Partition::start`] instead.
    ///
    /// Writes submitted before this returns are not recorded: start the first full scan after it.
    pub fn open(disks: &[PathBuf]) -> Result<Tracker, TrackerError> {
        Tracker::open_with(disks, &TrackerOptions::default())
    }

    /// [`Tracker::open`] with explicit limits.
    pub fn open_with(disks: &[PathBuf], opts: &TrackerOptions) -> Result<Tracker, TrackerError> {
        if disks.is_empty() || disks.len() > MAX_DISKS {
            return Err(TrackerError::DiskCount {
                count: disks.len(),
                max: MAX_DISKS,
            });
        }
        let tracked = resolve_disks(disks, opts)?;
        let mut slots = Vec::with_capacity(tracked.len());
        let mut next_word = 0u64;
        for disk in tracked {
            let fine_words = disk.chunks.div_ceil(WORD_BITS);
            let coarse_words = fine_words.div_ceil(WORD_BITS);
            let per_epoch = fine_words + coarse_words;
            let fine = [next_word, next_word + per_epoch];
            let coarse = [fine[0] + fine_words, fine[1] + fine_words];
            next_word += 2 * per_epoch;
            slots.push(Slot {
                disk,
                epoch: 0,
                unread: None,
                fine,
                coarse,
                fine_words,
                coarse_words,
                seen_overflow: 0,
                seen_untracked: 0,
                seen_missed: 0,
            });
        }
        let max_words = u64::from(u32::MAX);
        if next_word > max_words {
            return Err(TrackerError::BitmapTooLarge {
                words: next_word,
                max: max_words,
            });
        }
        let skel = load(slots.len() as u32, next_word as u32, opts.max_in_flight)?;

        let slots_mem = MapMemory::new(
            skel.maps.slots.as_fd(),
            slots.len() * SLOT_CTL_BYTES,
            "slots",
        )?;
        let words_mem = MapMemory::new(skel.maps.words.as_fd(), next_word as usize * 8, "words")?;
        let ctl = slots_mem.words();
        for (i, s) in slots.iter().enumerate() {
            let flags = if s.disk.device.blk_mq {
                0
            } else {
                SLOT_BIO_BASED
            };
            slots_mem
                .u32_at(i * SLOT_CTL_BYTES + CTL_FLAGS_BYTE)
                .store(flags, Ordering::Relaxed);
            let at = i * SLOT_CTL_WORDS;
            for e in 0..2 {
                ctl[at + CTL_FINE + e].store(s.fine[e], Ordering::Relaxed);
                ctl[at + CTL_COARSE + e].store(s.coarse[e], Ordering::Relaxed);
            }
            ctl[at + CTL_CHUNKS].store(s.disk.chunks, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        for (i, s) in slots.iter().enumerate() {
            let key = s.disk.device.kernel_dev().to_ne_bytes();
            let value = (i as u32).to_ne_bytes();
            skel.maps
                .disks
                .update(&key, &value, MapFlags::ANY)
                .map_err(|source| TrackerError::Bpf {
                    what: "fill the disk table of",
                    source,
                })?;
        }
        // Completions first: a bio marked at submission is then always re-marked when it completes.
        let attach = |source| TrackerError::Bpf {
            what: "attach",
            source,
        };
        let links = vec![
            skel.progs.on_rq_complete.attach().map_err(attach)?,
            skel.progs.on_bio_complete.attach().map_err(attach)?,
            skel.progs.on_bio_queue.attach().map_err(attach)?,
        ];
        Ok(Tracker {
            links,
            slots_mem,
            words_mem,
            skel,
            slots,
            grace_timeout: opts.grace_timeout,
        })
    }

    /// The tracked disks, in the order given to [`Tracker::open`]; `drain` takes an index into it.
    pub fn disks(&self) -> Vec<&TrackedDisk> {
        self.slots.iter().map(|s| &s.disk).collect()
    }

    /// The path of tracked disk `index`, for messages.
    pub fn path(&self, index: usize) -> Option<&Path> {
        self.slots.get(index).map(|s| s.disk.path.as_path())
    }

    /// Chunks written on disk `index` since its previous drain (or since `open`).
    pub fn drain(&mut self, index: usize) -> Result<DirtySet, TrackerError> {
        let mut sets = self.drain_many(&[index])?;
        Ok(sets.pop().unwrap_or_default())
    }

    /// Drains every disk with one epoch flip for all of them (one point in time for the set).
    pub fn drain_all(&mut self) -> Result<Vec<DirtySet>, TrackerError> {
        let all: Vec<usize> = (0..self.slots.len()).collect();
        self.drain_many(&all)
    }

    fn drain_many(&mut self, indexes: &[usize]) -> Result<Vec<DirtySet>, TrackerError> {
        for &index in indexes {
            if index >= self.slots.len() {
                return Err(TrackerError::UnknownDisk {
                    index,
                    count: self.slots.len(),
                });
            }
        }
        // Flip (unless a timed-out drain left an epoch to finish reading).
        for &i in indexes {
            let s = &mut self.slots[i];
            if s.unread.is_none() {
                s.unread = Some(s.epoch);
                s.epoch ^= 1;
                self.slots_mem
                    .u32_at(i * SLOT_CTL_BYTES)
                    .store(s.epoch, Ordering::SeqCst);
            }
        }
        // Orders the epoch stores before the reads of the `active` counters (the other half of
        // the Dekker pair is the fully ordered fetch-and-add in the BPF program).
        fence(Ordering::SeqCst);
        // Wait for all before reading any: on a timeout nothing has been read and cleared, and the
        // next drain resumes with the same unread epochs.
        for &i in indexes {
            if let Some(old) = self.slots[i].unread {
                self.wait_quiet(i, old)?;
            }
        }
        let missed = self.missed_runs();
        let mut sets = Vec::with_capacity(indexes.len());
        for &i in indexes {
            if let Some(old) = self.slots[i].unread.take() {
                sets.push(self.read_epoch(i, old, missed));
            }
        }
        Ok(sets)
    }

    /// Waits until no program on any CPU is marking epoch `epoch` of slot `i`.
    fn wait_quiet(&self, i: usize, epoch: u32) -> Result<(), TrackerError> {
        let key = (i as u32 * 2 + epoch).to_ne_bytes();
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            let per_cpu = self
                .skel
                .maps
                .active
                .lookup_percpu(&key, MapFlags::ANY)
                .map_err(|source| TrackerError::Bpf {
                    what: "read the activity counters of",
                    source,
                })?
                .unwrap_or_default();
            let busy = per_cpu
                .iter()
                .map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap_or([0; 8])))
                .fold(0u64, u64::wrapping_add);
            if busy == 0 {
                fence(Ordering::SeqCst);
                return Ok(());
            }
            let waited = start.elapsed();
            if waited > self.grace_timeout {
                return Err(TrackerError::GraceTimeout {
                    path: self.slots[i].disk.path.clone(),
                    waited,
                });
            }
            polls += 1;
            if polls < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// Reads and clears epoch `epoch` of slot `i`; `missed` is the programs' recursion misses now.
    fn read_epoch(&mut self, i: usize, epoch: u32, missed: u64) -> DirtySet {
        let s = &mut self.slots[i];
        let all = self.words_mem.words();
        let e = epoch as usize;
        let fine = &all[s.fine[e] as usize..][..s.fine_words as usize];
        let coarse = &all[s.coarse[e] as usize..][..s.coarse_words as usize];
        // Swap, not load + store: a late mark (a program that raced the flip) is kept for the
        // next drain of this epoch instead of being wiped.
        let take = |word: &std::sync::atomic::AtomicU64| {
            if word.load(Ordering::Relaxed) == 0 {
                0
            } else {
                word.swap(0, Ordering::AcqRel)
            }
        };
        let coarse: Vec<u64> = coarse.iter().map(take).collect();
        let mut words = Vec::new();
        for (w, word) in fine.iter().enumerate() {
            // A coarse bit means the whole fine word is dirty.
            let whole = coarse[w / 64] >> (w % 64) & 1 != 0;
            let bits = take(word) | if whole { u64::MAX } else { 0 };
            if bits != 0 {
                words.push((w as u64, bits));
            }
        }
        let ctl = &self.slots_mem.words()[i * SLOT_CTL_WORDS..][..SLOT_CTL_WORDS];
        let overflow = ctl[CTL_OVERFLOW].load(Ordering::Acquire);
        let untracked = ctl[CTL_UNTRACKED].load(Ordering::Acquire);
        let mut resync = Vec::new();
        if overflow != s.seen_overflow {
            resync.push(ResyncReason::Overflow {
                bios: overflow.wrapping_sub(s.seen_overflow),
            });
        }
        if untracked != s.seen_untracked {
            resync.push(ResyncReason::Untracked {
                bios: untracked.wrapping_sub(s.seen_untracked),
            });
        }
        if missed != s.seen_missed {
            resync.push(ResyncReason::MissedRuns {
                runs: missed.wrapping_sub(s.seen_missed),
            });
        }
        s.seen_overflow = overflow;
        s.seen_untracked = untracked;
        s.seen_missed = missed;
        DirtySet::new(words, s.disk.chunks, resync)
    }

    /// The kernel ids of the tracker's BPF programs, by name (for `bpftool prog show id ID`).
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        let progs = [
            ("on_bio_queue", &self.skel.progs.on_bio_queue),
            ("on_rq_complete", &self.skel.progs.on_rq_complete),
            ("on_bio_complete", &self.skel.progs.on_bio_complete),
        ];
        progs
            .into_iter()
            .filter_map(|(name, p)| Some((name, Program::id_from_fd(p.as_fd()).ok()?)))
            .collect()
    }

    /// Runs of the tracker's programs the kernel skipped (`recursion_misses`), all programs.
    /// Unreadable counts are taken as a miss: better a needless resync than a silent gap.
    fn missed_runs(&self) -> u64 {
        let progs = [
            &self.skel.progs.on_bio_queue,
            &self.skel.progs.on_rq_complete,
            &self.skel.progs.on_bio_complete,
        ];
        progs
            .iter()
            .map(|p| recursion_misses(p.as_fd()).unwrap_or(u64::MAX))
            .fold(0u64, u64::wrapping_add)
    }
}

/// Resolves and validates the disks to track.
fn resolve_disks(
    disks: &[PathBuf],
    opts: &TrackerOptions,
) -> Result<Vec<TrackedDisk>, TrackerError> {
    let mut out: Vec<TrackedDisk> = Vec::with_capacity(disks.len());
    for path in disks {
        let device = BlockDevice::resolve(path)?;
        if let Some(p) = &device.partition {
            return Err(TrackerError::Partition {
                path: path.clone(),
                disk: p.disk.clone(),
                number: p.number,
                start: p.start,
            });
        }
        if let Some(first) = out
            .iter()
            .find(|d| d.device.kernel_dev() == device.kernel_dev())
        {
            return Err(TrackerError::Duplicate {
                path: path.clone(),
                first: first.path.clone(),
                major: device.major,
                minor: device.minor,
            });
        }
        if device.size > opts.max_disk_bytes {
            return Err(TrackerError::TooLarge {
                path: path.clone(),
                size: device.size,
                max: opts.max_disk_bytes,
            });
        }
        // An empty disk still gets one chunk, so every slot has a bitmap.
        let chunks = device.size.div_ceil(CHUNK_SIZE).max(1);
        out.push(TrackedDisk {
            path: path.clone(),
            device,
            chunks,
        });
    }
    Ok(out)
}

/// Opens the skeleton, sizes its maps and loads it (runs the verifier). Nothing is attached.
pub(crate) fn load(
    disks: u32,
    words: u32,
    max_in_flight: u32,
) -> Result<TrackerSkel<'static>, TrackerError> {
    let bpf = |what| move |source| TrackerError::Bpf { what, source };
    // The skeleton borrows the storage of its libbpf object for its whole life. Leaking this box
    // (one pointer) per tracker gives that borrow 'static without unsafe code; the object itself
    // is still closed when the skeleton is dropped.
    let storage: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
    let mut open = TrackerSkelBuilder::default()
        .open(storage)
        .map_err(bpf("open"))?;
    let maps = &mut open.maps;
    maps.disks.set_max_entries(disks).map_err(bpf("size"))?;
    maps.slots.set_max_entries(disks).map_err(bpf("size"))?;
    maps.words
        .set_max_entries(words.max(1))
        .map_err(bpf("size"))?;
    maps.active
        .set_max_entries(disks * 2)
        .map_err(bpf("size"))?;
    maps.pending
        .set_max_entries(max_in_flight.max(1))
        .map_err(bpf("size"))?;
    open.load().map_err(bpf("load"))
}

/// `recursion_misses` of a loaded program (kernel >= 5.12).
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use libbpf_rs::libbpf_sys;
    use std::os::fd::AsRawFd;

    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: `info` is a valid, writable bpf_prog_info of `len` bytes; all its pointer fields are
    // zero, so the kernel writes nothing outside it.
    let rc = unsafe {
        libbpf_sys::bpf_prog_get_info_by_fd(
            fd.as_raw_fd(),
            (&mut info as *mut libbpf_sys::bpf_prog_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info.recursion_misses)
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("disks", &self.disks())
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_can_move_to_another_thread() {
        fn is_send<T: Send>() {}
        is_send::<Tracker>();
    }
}
