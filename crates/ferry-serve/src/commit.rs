//! The group committer: one thread owns the cache writer, appends what connections hand it, syncs
//! (`fdatasync`) every few milliseconds or when much is buffered, and only then tells each
//! connection the highest record seq of its own that is durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use ferry_cache::{CacheError, CacheWriter};
use ferry_format::cache::CacheEntry;
use tokio::sync::watch;

/// What a connection learns from the committer: its last durable record seq and the total frame
/// bytes made durable so far (the bytes its credit may be topped up by).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    pub seq: u64,
    pub bytes: u64,
}

/// One record of one connection, already turned into cache entries.
pub struct Append {
    pub conn: Arc<watch::Sender<Durable>>,
    pub seq: u64,
    /// The record's frame length (its credit cost).
    pub cost: u64,
    pub entries: Vec<CacheEntry>,
}

/// How long appended data may wait for its sync, and how much may pile up before one.
pub struct GroupCommit {
    pub window: Duration,
    pub max_bytes: u64,
    /// Frame bytes handed over and not yet durable (connections add, the committer subtracts):
    /// the server's memory budget for records in flight.
    pub inflight: Arc<AtomicU64>,
}

/// Runs until every sender is gone; returns the first cache error (the server then stops: acking
/// anything after a failed sync would break "acked means durable").
pub fn run(
    mut writer: CacheWriter,
    rx: Receiver<Append>,
    cfg: GroupCommit,
) -> Result<(), CacheError> {
    let mut pending: Vec<(Arc<watch::Sender<Durable>>, u64, u64)> = Vec::new();
    let mut buffered = 0u64;
    let mut deadline: Option<Instant> = None;
    loop {
        let msg = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match msg {
            Ok(a) => {
                for e in a.entries {
                    writer.append_owned(e)?;
                }
                buffered += a.cost;
                pending.push((a.conn, a.seq, a.cost));
                deadline.get_or_insert_with(|| Instant::now() + cfg.window);
                if buffered < cfg.max_bytes {
                    continue;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                commit(&mut writer, &mut pending, &cfg.inflight)?;
                return Ok(());
            }
        }
        commit(&mut writer, &mut pending, &cfg.inflight)?;
        buffered = 0;
        deadline = None;
    }
}

fn commit(
    writer: &mut CacheWriter,
    pending: &mut Vec<(Arc<watch::Sender<Durable>>, u64, u64)>,
    inflight: &AtomicU64,
) -> Result<(), CacheError> {
    if pending.is_empty() {
        return Ok(());
    }
    writer.sync()?;
    for (conn, seq, cost) in pending.drain(..) {
        inflight.fetch_sub(cost, Ordering::Relaxed);
        conn.send_modify(|d| {
            d.seq = d.seq.max(seq);
            d.bytes += cost;
        });
    }
    Ok(())
}
