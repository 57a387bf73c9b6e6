//! The fast engine: `O_DIRECT` reads on an io_uring, up to `depth` extents in flight.
//!
//! Slots: the engine owns `depth` aligned 1 MiB buffers; an extent in flight occupies one slot (its
//! buffer, its `Op`, and the slot number as the io_uring `user_data`). The window lists the busy
//! slots in submission order, which is ascending chunk order. Completions arrive in any order; the
//! window's front is handed to the sink as soon as it is complete, and its slot takes the next
//! extent. Slots are used round-robin, so the window is always a contiguous run of slot numbers.
//!
//! Safety rule: a buffer belongs to the kernel from `push` until its completion is reaped.
//! `run` therefore drains every in-flight I/O before it returns, whatever the outcome, and so does
//! `Drop`; if even waiting fails, the buffers are leaked rather than freed or reused.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::AsRawFd;

use io_uring::{opcode, types, IoUring};

use crate::buf::AlignedBuf;
use crate::plan::{self, Extent, Extents, Sink};
use crate::sys::{self, Disk};
use crate::{ReadError, ReadStats, MAX_EXTENT};

pub(crate) struct UringEngine {
    ring: IoUring,
    /// Slot `i` reads into `bufs[i]`.
    bufs: Vec<AlignedBuf>,
    /// The extent being read in each slot, `None` when the slot is free.
    ops: Vec<Option<Op>>,
    /// Busy slots in submission order: the front is delivered first.
    window: VecDeque<usize>,
    /// Reused storage for one batch of completions: (user_data, result).
    reaped: Vec<(u64, i32)>,
    /// Reads pushed whose completion has not been reaped yet.
    inflight: usize,
    /// Set when in-flight reads could not be waited for: the buffers were leaked, the engine is dead.
    poisoned: bool,
}

/// One extent being read.
struct Op {
    ext: Extent,
    /// Bytes asked of the kernel: `ext.len` rounded up to the logical block.
    want: u64,
    /// Bytes read so far.
    done: u64,
    /// `EINTR`/`EAGAIN` in a row.
    retries: u32,
    /// At least `ext.len` bytes are in the buffer.
    finished: bool,
}

/// What to do after a completion.
enum Next {
    Finished,
    Resubmit,
    Fail(ReadError),
}

impl Op {
    fn new(ext: Extent, block: u64) -> Op {
        Op {
            ext,
            want: ext.direct_len(block),
            done: 0,
            retries: 0,
            finished: false,
        }
    }

    /// Takes the result of one read of this op's remainder.
    fn advance(&mut self, res: i32, disk: &Disk) -> Next {
        let offset = self.ext.offset + self.done;
        if res < 0 {
            let errno = -res;
            if sys::is_retryable(errno) && self.retries < sys::MAX_RETRIES {
                self.retries += 1;
                return Next::Resubmit;
            }
            let source = io::Error::from_raw_os_error(errno);
            return Next::Fail(disk.io_error(offset, self.want - self.done, source));
        }
        if res == 0 {
            return Next::Fail(disk.eof_error(offset, self.ext.len - self.done));
        }
        self.done += u64::from(res.unsigned_abs());
        self.retries = 0;
        if self.done >= self.ext.len {
            self.finished = true;
            Next::Finished
        } else {
            Next::Resubmit
        }
    }
}

impl UringEngine {
    /// Sets up a ring of `depth` entries and `depth` buffers aligned to `align`.
    pub(crate) fn new(depth: u32, align: usize) -> io::Result<UringEngine> {
        let ring = IoUring::new(depth)?;
        let depth = depth as usize;
        Ok(UringEngine {
            ring,
            bufs: (0..depth)
                .map(|_| AlignedBuf::new(MAX_EXTENT as usize, align))
                .collect(),
            ops: (0..depth).map(|_| None).collect(),
            window: VecDeque::with_capacity(depth),
            reaped: Vec::with_capacity(2 * depth),
            inflight: 0,
            poisoned: false,
        })
    }

    pub(crate) fn run(
        &mut self,
        disk: &Disk,
        mut extents: Extents<'_>,
        sink: &mut Sink<'_>,
    ) -> Result<ReadStats, ReadError> {
        if self.poisoned {
            return Err(ReadError::Unusable {
                path: disk.path.clone(),
            });
        }
        // A sink that panicked mid-read (and was caught) leaves reads behind: settle them first.
        self.settle().map_err(|source| ring_error(disk, source))?;
        let result = self.pump(disk, &mut extents, sink);
        let settled = self.settle().map_err(|source| ring_error(disk, source));
        let stats = result?;
        settled.map(|()| stats)
    }

    /// Drains in-flight reads and frees every slot.
    fn settle(&mut self) -> io::Result<()> {
        let drained = self.drain();
        self.window.clear();
        self.ops.iter_mut().for_each(|op| *op = None);
        drained
    }

    /// Keeps the window full and delivers its front until every extent is delivered.
    fn pump(
        &mut self,
        disk: &Disk,
        extents: &mut Extents<'_>,
        sink: &mut Sink<'_>,
    ) -> Result<ReadStats, ReadError> {
        let mut stats = ReadStats::default();
        loop {
            self.fill(disk, extents)?;
            // `fill` leaves a free slot only when no extent is left: an empty window is the end.
            if self.window.is_empty() {
                return Ok(stats);
            }
            if !self.deliver_ready(sink, &mut stats)? {
                self.wait(disk)?;
            }
        }
    }

    /// Starts extents until every slot is busy or none are left.
    fn fill(&mut self, disk: &Disk, extents: &mut Extents<'_>) -> Result<(), ReadError> {
        let depth = self.bufs.len();
        while self.window.len() < depth {
            let Some(ext) = extents.next() else {
                return Ok(());
            };
            let slot = self.window.back().map_or(0, |&last| (last + 1) % depth);
            let op = Op::new(ext, disk.block);
            let want = op.want;
            self.ops[slot] = Some(op);
            self.window.push_back(slot);
            self.submit(disk, slot, 0, want)?;
        }
        Ok(())
    }

    /// Hands every complete extent at the front of the window to the sink; frees their slots.
    fn deliver_ready(
        &mut self,
        sink: &mut Sink<'_>,
        stats: &mut ReadStats,
    ) -> Result<bool, ReadError> {
        let mut delivered = false;
        while let Some(&slot) = self.window.front() {
            let Some(ext) = self.ops[slot]
                .as_ref()
                .filter(|op| op.finished)
                .map(|op| op.ext)
            else {
                break;
            };
            plan::deliver(&ext, self.bufs[slot].as_slice(), sink)?;
            self.ops[slot] = None;
            self.window.pop_front();
            stats.ios += 1;
            stats.bytes += ext.len;
            delivered = true;
        }
        Ok(delivered)
    }

    /// Pushes a read of `len` bytes into slot `slot`'s buffer at `at`, from the disk at the slot's
    /// extent offset + `at`.
    fn submit(&mut self, disk: &Disk, slot: usize, at: u64, len: u64) -> Result<(), ReadError> {
        let Some(op) = &self.ops[slot] else {
            return Err(ring_error(disk, io::Error::other("submit to a free slot")));
        };
        let offset = op.ext.offset + at;
        let buf = &mut self.bufs[slot].as_mut_slice()[at as usize..(at + len) as usize];
        // `len` <= MAX_EXTENT (1 MiB), far below u32::MAX.
        let entry = opcode::Read::new(
            types::Fd(disk.file.as_raw_fd()),
            buf.as_mut_ptr(),
            len as u32,
        )
        .offset(offset)
        .build()
        .user_data(slot as u64);
        // SAFETY: the entry points at `len` bytes of `bufs[slot]`, which this engine owns and neither
        // reads, reuses nor frees until this read's completion is reaped (`run` and `Drop` drain all
        // in-flight reads first; if draining fails the buffers are leaked). The fd stays open for as
        // long: the reader drops the engine (draining) before the file.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Cannot happen: the queue has >= depth entries and each slot has at most one read out.
            return Err(ring_error(disk, io::Error::other("submission queue full")));
        }
        self.inflight += 1;
        Ok(())
    }

    /// Submits what is queued, waits for at least one completion and acts on every completion.
    fn wait(&mut self, disk: &Disk) -> Result<(), ReadError> {
        self.enter().map_err(|source| ring_error(disk, source))?;
        self.reap();
        for i in 0..self.reaped.len() {
            let (slot, res) = self.reaped[i];
            self.complete(disk, slot as usize, res)?;
        }
        Ok(())
    }

    /// Acts on one completion: done, resubmit the remainder, or fail.
    fn complete(&mut self, disk: &Disk, slot: usize, res: i32) -> Result<(), ReadError> {
        let Some(op) = self.ops.get_mut(slot).and_then(Option::as_mut) else {
            return Err(ring_error(
                disk,
                io::Error::other("completion for a free slot"),
            ));
        };
        match op.advance(res, disk) {
            Next::Finished => Ok(()),
            Next::Resubmit => {
                let (at, len) = (op.done, op.want - op.done);
                self.submit(disk, slot, at, len)
            }
            Next::Fail(e) => Err(e),
        }
    }

    /// `io_uring_enter`: submit and wait for one completion. A signal retries; a full completion
    /// queue (`EBUSY`) returns so the caller reaps first.
    fn enter(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the completion queue into `reaped`.
    fn reap(&mut self) {
        self.reaped.clear();
        for cqe in self.ring.completion() {
            self.reaped.push((cqe.user_data(), cqe.result()));
        }
        self.inflight = self.inflight.saturating_sub(self.reaped.len());
    }

    /// Waits until no read is in flight. If waiting fails, leaks the buffers (the kernel may still
    /// write into them) and poisons the engine.
    fn drain(&mut self) -> io::Result<()> {
        while self.inflight > 0 {
            if let Err(e) = self.enter() {
                self.bufs.drain(..).for_each(std::mem::forget);
                self.poisoned = true;
                return Err(e);
            }
            self.reap();
        }
        Ok(())
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Only after a panic in the sink can reads still be in flight here. An error was already
        // handled by leaking the buffers; there is no one left to report it to.
        let _ = self.drain();
    }
}

fn ring_error(disk: &Disk, source: io::Error) -> ReadError {
    ReadError::Ring {
        path: disk.path.clone(),
        source,
    }
}
