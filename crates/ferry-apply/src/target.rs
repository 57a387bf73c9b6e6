//! Remote replica targets: where a committed run is also written (Azure page blobs, in direct mode).
//!
//! The applier calls [`ReplicaTarget::commit_run`] when a cut is complete on every disk, before it
//! commits the point locally. The target streams the run's records out of the local journal
//! ([`run_ops`]), writes them, cuts its own point (e.g. blob snapshots) and publishes its manifest.
//! Writing only whole runs, at their tag, means a run that died before its tag never touches the
//! remote replica, and re-applying a run after a crash writes the same bytes again.

use ferry_format::manifest::{JournalPos, Point};
use ferry_format::segment::Record;
use ferry_store::LocalStore;

use crate::ApplyError;

/// One disk's part of a run: the journal records from its `Begin` (inclusive) to just past its `Tag`.
#[derive(Clone, Debug)]
pub struct RunSpan {
    pub disk: String,
    pub size: u64,
    pub from: JournalPos,
    pub to: JournalPos,
    /// The local replica had no point before this run: the run holds every non-zero chunk, so a
    /// target must start from an all-zero replica (a pre-existing remote blob is cleared first).
    pub fresh: bool,
}

/// A page operation of a run, in journal order.
#[derive(Debug)]
pub enum RunOp {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

/// An error of a remote target (its own message says what to check).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(pub String);

/// A place committed runs are also written to.
pub trait ReplicaTarget: Send {
    /// Writes the runs of all disks of a cut, cuts the point there and publishes it. Returns the point
    /// as published (e.g. with snapshot ids). A point whose run the target already published is
    /// returned as it was, without writing again.
    fn commit_run(
        &mut self,
        store: &LocalStore,
        vm: &str,
        spans: &[RunSpan],
        point: Point,
    ) -> Result<Point, ApplyError>;
}

/// Streams the page operations of one disk's run from the local journal, chunk data included.
pub fn run_ops<'a>(
    store: &'a LocalStore,
    vm: &'a str,
    span: &'a RunSpan,
) -> impl Iterator<Item = Result<RunOp, ApplyError>> + 'a {
    let mut seg = span.from.segment;
    let mut records: Vec<Record> = Vec::new();
    let mut idx = 0usize;
    let mut loaded = false;
    std::iter::from_fn(move || loop {
        if seg > span.to.segment {
            return None;
        }
        if !loaded {
            match store.read_segment_index(vm, &span.disk, seg) {
                Ok(i) => records = i.records,
                Err(e) => {
                    seg = u64::MAX;
                    return Some(Err(e.into()));
                }
            }
            loaded = true;
            idx = if seg == span.from.segment {
                span.from.record as usize
            } else {
                0
            };
        }
        let end = if seg == span.to.segment {
            (span.to.record as usize).min(records.len())
        } else {
            records.len()
        };
        if idx >= end {
            seg += 1;
            loaded = false;
            continue;
        }
        let r = &records[idx];
        idx += 1;
        match r {
            Record::Write { offset, loc, .. } => {
                return Some(
                    store
                        .read_chunk(loc)
                        .map(|data| RunOp::Write {
                            offset: *offset,
                            data,
                        })
                        .map_err(ApplyError::from),
                )
            }
            Record::Zero { offset, len } => {
                return Some(Ok(RunOp::Zero {
                    offset: *offset,
                    len: *len,
                }))
            }
            Record::Begin { .. } | Record::Tag(_) => continue,
        }
    })
}
