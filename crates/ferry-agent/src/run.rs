//! One replication run: scan every disk (on a thread) into a stream of records, send them under
//! credit, keep the unacked ones for re-sending after a reconnect, and commit the digest maps when
//! the tag is acknowledged.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_crypto::{Digest, MasterKey, ZERO_DIGEST};
use ferry_format::CHUNK_SIZE;
use ferry_scan::{Change, Source};
use ferry_wire::{Credits, DiskCut, Message, PointKind, PointTag, RunId};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::state::{load_map, save_map};
use crate::{hello, unexpected, AgentError, AgentIdentity};

/// What to replicate.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub server: String,
    pub disks: Vec<PathBuf>,
    /// One name per disk.
    pub names: Vec<String>,
    pub vm: String,
    pub state_dir: PathBuf,
    pub kind: PointKind,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    pub run: String,
    pub records: u64,
    pub data_bytes: u64,
    pub reconnects: u64,
}

/// One logical record of a run (sequence numbers are given when it is sent).
enum Rec {
    Begin {
        run: RunId,
        time_ns: u64,
        disks: Vec<(String, u64)>,
    },
    Write {
        disk: usize,
        offset: u64,
        digest: Digest,
        data: Vec<u8>,
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
    Tag(PointTag),
}

impl Rec {
    fn message(&self, seq: u64, names: &[String]) -> Message {
        match self {
            Rec::Begin {
                run,
                time_ns,
                disks,
            } => Message::Begin {
                seq,
                run: *run,
                time_ns: *time_ns,
                disks: disks.clone(),
            },
            Rec::Write {
                disk, offset, data, ..
            } => Message::write(seq, names[*disk].clone(), *offset, data.clone()),
            Rec::Zero { disk, offset, len } => Message::Zero {
                seq,
                disk: names[*disk].clone(),
                offset: *offset,
                len: *len,
            },
            Rec::Tag(tag) => Message::Tag {
                seq,
                tag: tag.clone(),
            },
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs one replication cycle: scan, ship, tag, wait for the tag's ack, save the digest maps.
pub fn run_once(o: &RunOptions, stop: &AtomicBool) -> Result<RunSummary, AgentError> {
    let id = AgentIdentity::load(&o.state_dir)?;
    if o.disks.is_empty() || o.disks.len() != o.names.len() {
        return Err(AgentError::Usage("give at least one --disk".into()));
    }
    let sources = o
        .disks
        .iter()
        .map(|p| Source::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut maps: Vec<Vec<Digest>> = sources
        .iter()
        .zip(&o.names)
        .map(|(s, n)| load_map(&o.state_dir, n, s.size.div_ceil(CHUNK_SIZE as u64) as usize))
        .collect();
    let mut run: RunId = [0; 16];
    ferry_crypto::random_bytes(&mut run).map_err(|e| AgentError::Usage(e.to_string()))?;
    tracing::info!(
        run = %hex::encode(run),
        disks = sources.len(),
        "run starts; tracker: scan (reads every disk and compares 64 KiB chunk digests — portable and \
         always correct; the eBPF tracker is not wired into the agent yet)"
    );
    let (tx, rx) = mpsc::channel::<Rec>(64);
    let rt = crate::runtime()?;
    let mut summary = RunSummary {
        run: hex::encode(run),
        ..Default::default()
    };
    let updates = std::thread::scope(|s| {
        let (sources, maps_ref, names) = (&sources, &maps, &o.names);
        let kind = o.kind;
        let producer = s.spawn(move || produce(sources, maps_ref, names, run, kind, tx, stop));
        let r = rt.block_on(ship(o, &id, rx, &mut summary));
        // A scan error (or a stop) is the root cause when both fail.
        producer.join().expect("scan thread panicked")?;
        let (updates, tagged) = r?;
        if !tagged {
            return Err(AgentError::Usage(
                "the run stopped before its tag; nothing was recorded as shipped, the next run sends it again".into(),
            ));
        }
        Ok::<_, AgentError>(updates)
    })?;
    for (disk, chunk, digest) in updates {
        maps[disk][chunk] = digest;
    }
    for (name, map) in o.names.iter().zip(&maps) {
        save_map(&o.state_dir, name, map)?;
    }
    Ok(summary)
}

/// The scan thread: Begin, every disk's changes, Tag.
fn produce(
    sources: &[Source],
    maps: &[Vec<Digest>],
    names: &[String],
    run: RunId,
    kind: PointKind,
    tx: mpsc::Sender<Rec>,
    stop: &AtomicBool,
) -> Result<(), AgentError> {
    // The agent's own digests; it never has the process server's master key.
    let key = MasterKey::from_bytes(&[0x46; 32], Path::new("agent-local-digest-key"));
    let send = |r: Rec| tx.blocking_send(r).map_err(|_| "sender gone".to_string());
    let disks = names
        .iter()
        .zip(sources)
        .map(|(n, s)| (n.clone(), s.size))
        .collect();
    if send(Rec::Begin {
        run,
        time_ns: now_ns(),
        disks,
    })
    .is_err()
    {
        return Ok(());
    }
    let mut cuts = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        let map = &maps[i];
        let r = ferry_scan::scan(
            src,
            &key,
            2,
            |first, out| {
                let first = first as usize;
                out.copy_from_slice(&map[first..first + out.len()]);
                Ok(())
            },
            |c| match c {
                Change::Write {
                    offset,
                    digest,
                    data,
                } => send(Rec::Write {
                    disk: i,
                    offset,
                    digest,
                    data,
                }),
                Change::Zero { offset, len } => send(Rec::Zero {
                    disk: i,
                    offset,
                    len,
                }),
            },
            |_| {},
            stop,
        );
        let r = match r {
            Ok(r) => r,
            // The shipper is gone (it failed for good); its error is the one to report.
            Err(ferry_scan::ScanError::Sink(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        tracing::info!(disk = %names[i], read = r.bytes_read, changed_chunks = r.changed_chunks, "scan finished");
        cuts.push(DiskCut {
            name: names[i].clone(),
            size: src.size,
            blake3: r.blake3,
        });
    }
    let _ = send(Rec::Tag(PointTag {
        run,
        time_ns: now_ns(),
        kind,
        disks: cuts,
    }));
    Ok(())
}

/// Sends the run, reconnecting with backoff; returns the acknowledged digest updates and whether
/// the tag was acknowledged (if not, the scan ended early and the updates must not be used: the
/// run is void on the process server).
async fn ship(
    o: &RunOptions,
    id: &AgentIdentity,
    mut rx: mpsc::Receiver<Rec>,
    summary: &mut RunSummary,
) -> Result<(Vec<(usize, usize, Digest)>, bool), AgentError> {
    let mut out = Outbox {
        unacked: VecDeque::new(),
        pending: VecDeque::new(),
        producer_done: false,
        updates: Vec::new(),
        tag_acked: false,
        seq: now_ns(),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(o, id, &mut rx, &mut out, summary, &mut backoff).await {
            Ok(()) => return Ok((out.updates, out.tag_acked)),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                summary.reconnects += 1;
                tracing::warn!(error = %e, retry_in = ?backoff, unacked = out.unacked.len(), "connection to the process server lost; reconnecting and re-sending what was not acknowledged");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

struct Outbox {
    /// Sent on the current connection, not yet acked: (seq, record).
    unacked: VecDeque<(u64, Rec)>,
    /// To send (re-sends first, then fresh records from the scan).
    pending: VecDeque<Rec>,
    producer_done: bool,
    /// Acked digest changes: (disk, chunk, digest).
    updates: Vec<(usize, usize, Digest)>,
    tag_acked: bool,
    seq: u64,
}

impl Outbox {
    fn ack(&mut self, seq: u64) {
        while self.unacked.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, rec) = self.unacked.pop_front().expect("front exists");
            match rec {
                Rec::Write {
                    disk,
                    offset,
                    digest,
                    ..
                } => self
                    .updates
                    .push((disk, (offset / CHUNK_SIZE as u64) as usize, digest)),
                Rec::Zero { disk, offset, len } => {
                    let first = offset / CHUNK_SIZE as u64;
                    let end = (offset + len).div_ceil(CHUNK_SIZE as u64);
                    for c in first..end {
                        self.updates.push((disk, c as usize, ZERO_DIGEST));
                    }
                }
                Rec::Tag(_) => self.tag_acked = true,
                Rec::Begin { .. } => {}
            }
        }
    }
}

async fn session(
    o: &RunOptions,
    id: &AgentIdentity,
    rx: &mut mpsc::Receiver<Rec>,
    out: &mut Outbox,
    summary: &mut RunSummary,
    backoff: &mut Duration,
) -> Result<(), AgentError> {
    // Whatever the last connection did not get acked goes first, in order.
    while let Some((_, rec)) = out.unacked.pop_back() {
        out.pending.push_front(rec);
    }
    let (mut r, mut w, nonce) = hello(&o.server, id.fingerprint).await?;
    w.send(&Message::Auth {
        agent_id: id.agent_id,
        proof: id.credential.prove(&nonce),
    })
    .await?;
    w.flush().await?;
    let credits = match r.read().await? {
        Some(Message::Welcome { credits, .. }) => credits,
        m => return Err(unexpected(m)),
    };
    *backoff = Duration::from_millis(100);
    let sizes: Vec<(String, u64)> = o
        .names
        .iter()
        .zip(&o.disks)
        .map(|(n, p)| {
            let size = Source::open(p).map(|s| s.size).unwrap_or(0);
            (n.clone(), size)
        })
        .collect();
    w.send(&Message::Inventory {
        vm: o.vm.clone(),
        disks: sizes,
    })
    .await?;
    let mut credit = Credits::new(credits);
    let (ev_tx, mut ev_rx) = mpsc::channel::<Result<Message, AgentError>>(256);
    let reader = tokio::spawn(async move {
        loop {
            let m = match r.read().await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(AgentError::Protocol(
                    "the server closed the connection".into(),
                )),
                Err(e) => Err(AgentError::Wire(e)),
            };
            let end = m.is_err();
            if ev_tx.send(m).await.is_err() || end {
                return;
            }
        }
    });
    let _abort = AbortOnDrop(reader);
    loop {
        // Events first: acks free the outbox, credit lets more go.
        while let Ok(ev) = ev_rx.try_recv() {
            handle(ev?, out, &mut credit, &mut w).await?;
        }
        let ended = out.producer_done && out.pending.is_empty() && out.unacked.is_empty();
        if out.tag_acked || ended {
            // A clean TLS close (close_notify), so the server logs a plain disconnect.
            let _ = w.flush().await;
            let _ = w.into_inner().shutdown().await;
            return Ok(());
        }
        if out.pending.is_empty() && !out.producer_done {
            match rx.try_recv() {
                Ok(rec) => out.pending.push_back(rec),
                Err(mpsc::error::TryRecvError::Disconnected) => out.producer_done = true,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
        }
        if let Some(rec) = out.pending.front() {
            let m = rec.message(out.seq + 1, &o.names);
            let cost = m.frame_len()? as u64;
            if credit.try_take(cost) {
                out.seq += 1;
                let rec = out.pending.pop_front().expect("front exists");
                if let Rec::Write { data, .. } = &rec {
                    summary.data_bytes += data.len() as u64;
                }
                summary.records += 1;
                out.unacked.push_back((out.seq, rec));
                w.send(&m).await?;
                continue;
            }
        }
        w.flush().await?;
        let want_more = out.pending.is_empty() && !out.producer_done;
        tokio::select! {
            ev = ev_rx.recv() => {
                let ev = ev.unwrap_or_else(|| Err(AgentError::Protocol("connection reader ended".into())));
                handle(ev?, out, &mut credit, &mut w).await?;
            }
            rec = rx.recv(), if want_more => match rec {
                Some(rec) => out.pending.push_back(rec),
                None => out.producer_done = true,
            },
        }
    }
}

async fn handle(
    m: Message,
    out: &mut Outbox,
    credit: &mut Credits,
    w: &mut crate::Writer,
) -> Result<(), AgentError> {
    match m {
        Message::Ack { seq } => out.ack(seq),
        Message::Credit { bytes } => credit.grant(bytes),
        Message::Ping { token } => {
            w.send(&Message::Pong { token }).await?;
        }
        Message::Pong { .. } => {}
        Message::CutRequest { .. } => {
            tracing::info!("the process server asked for a cut; this agent cuts once per run");
        }
        Message::Refused { code, message } => return Err(AgentError::Refused { code, message }),
        m => {
            return Err(AgentError::Protocol(format!(
                "unexpected {} during a run",
                m.ty().name()
            )))
        }
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_record_digests_only_up_to_the_acked_seq() {
        let mut out = Outbox {
            unacked: VecDeque::new(),
            pending: VecDeque::new(),
            producer_done: false,
            updates: Vec::new(),
            tag_acked: false,
            seq: 10,
        };
        let c = CHUNK_SIZE as u64;
        out.unacked.push_back((
            11,
            Rec::Write {
                disk: 0,
                offset: 2 * c,
                digest: [7; 32],
                data: vec![1; 16],
            },
        ));
        out.unacked.push_back((
            12,
            Rec::Zero {
                disk: 1,
                offset: c,
                len: 2 * c,
            },
        ));
        out.unacked.push_back((
            13,
            Rec::Tag(PointTag {
                run: [0; 16],
                time_ns: 0,
                kind: PointKind::Crash,
                disks: vec![],
            }),
        ));
        out.ack(12);
        assert_eq!(
            out.updates,
            vec![(0, 2, [7; 32]), (1, 1, ZERO_DIGEST), (1, 2, ZERO_DIGEST)]
        );
        assert!(!out.tag_acked);
        assert_eq!(out.unacked.len(), 1);
        out.ack(13);
        assert!(out.tag_acked && out.unacked.is_empty());
    }
}
