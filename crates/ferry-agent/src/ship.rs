//! The shipper: sends the engine's stream of records (Begin, Write, Zero, Tag, Begin, …) to the
//! process server under credit, keeps the unacked ones for re-sending after a reconnect, and tells
//! the engine when a tag — a point — is acknowledged.
//!
//! Invariants: records go out in the order the engine made them; after a reconnect the unacked
//! ones go first, again in order (the server's handling of re-sent records is idempotent). An
//! acknowledged tag means the server holds the whole run durably. The shipper never decides what
//! is sent, only when.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_wire::{refuse, Credits, HeldDisk, InvDisk, Message, PointTag, RunId};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::{hello, unexpected, AgentError, AgentIdentity};

/// Where to ship, and the disks as the inventory announces them.
#[derive(Clone, Debug)]
pub struct ShipTo {
    pub server: String,
    /// Where the identity file is (rewritten once when an agent moves to a key).
    pub state_dir: std::path::PathBuf,
    pub vm: String,
    /// Most bytes per second sent (`max_rate`), paced here; `None`: unlimited.
    pub max_rate: Option<u64>,
    /// Suggested name, size and stable identity per disk, in the engine's disk order.
    pub disks: Vec<InvDisk>,
}

/// What the process server holds of the VM, from the first connection's `Holding`.
#[derive(Clone, Debug)]
pub struct Holding {
    pub store: String,
    pub open: RunId,
    /// Per disk, in the engine's order: its replica and the last run of it the server holds.
    pub disks: Vec<HeldDisk>,
}

/// What the shipper tells the engine.
#[derive(Debug)]
pub enum Event {
    /// The first connection's answer to the inventory: the engine binds its maps to it before it
    /// makes any record.
    Holding(Holding),
    /// The tag of this run is acknowledged: the run is a point.
    TagAcked(RunId),
    /// The tag of `run` became point `id` in the store.
    PointMade { run: RunId, id: String },
    /// The connection dropped; the shipper reconnects by itself.
    Disconnected(String),
    /// A later connection is up again (the first one's is [`Event::Holding`]).
    Connected,
    /// The shipper stopped for good (a refusal, a local error).
    Failed(AgentError),
    /// The server's replication policy for the VM's cut intervals ([`Message::Policy`]).
    Policy {
        crash_every_ms: u64,
        app_every_ms: u64,
    },
    /// The server asks for a cutover ([`Message::CutoverRequest`]).
    CutoverAsked,
}

/// Counters of the shipper, read by the engine for its log lines.
#[derive(Debug, Default)]
pub struct ShipStats {
    pub records: AtomicU64,
    pub data_bytes: AtomicU64,
    pub reconnects: AtomicU64,
    /// Notices for the server (cuts, abandoned cuts, hook failures, resyncs), sent as soon as a
    /// connection is up; the oldest are dropped past [`MAX_NOTICES`].
    pub notices: std::sync::Mutex<std::collections::VecDeque<Message>>,
    /// The agent's cut intervals as a notice, sent again at each new connection.
    pub intervals: std::sync::Mutex<Option<Message>>,
    /// The cutover in effect as a notice, sent again at each new connection until rolled back
    /// (a notice lost with a connection must not leave the server without the final point).
    pub cutover: std::sync::Mutex<Option<Message>>,
    /// That this agent allows a cutover asked by the server, sent again at each connection.
    pub remote_cutover: std::sync::Mutex<Option<Message>>,
}

/// Resolves once `abandon` is set (polled every 50 ms).
async fn abandoned(abandon: &AtomicBool) {
    while !abandon.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Notices kept while the server is unreachable.
pub const MAX_NOTICES: usize = 64;

impl ShipStats {
    /// Queues a notice for the server.
    pub fn notice(&self, kind: u8, freeze_us: u64, text: &str) {
        let mut text = text.to_owned();
        if text.len() > ferry_wire::MAX_TEXT {
            let mut cut = ferry_wire::MAX_TEXT - 3;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        let m = Message::Notice {
            kind,
            freeze_us,
            text,
        };
        if kind == ferry_wire::notice::INTERVALS {
            *self.intervals.lock().expect("intervals lock") = Some(m.clone());
        }
        if kind == ferry_wire::notice::REMOTE_CUTOVER {
            *self.remote_cutover.lock().expect("remote cutover lock") = Some(m.clone());
        }
        if kind == ferry_wire::notice::CUTOVER {
            *self.cutover.lock().expect("cutover lock") = Some(m.clone());
        }
        if kind == ferry_wire::notice::CUTOVER_ROLLBACK {
            *self.cutover.lock().expect("cutover lock") = None;
        }
        let mut q = self.notices.lock().expect("notices lock");
        if q.len() >= MAX_NOTICES {
            q.pop_front();
        }
        q.push_back(m);
    }

    fn take_notices(&self) -> Vec<Message> {
        self.notices
            .lock()
            .expect("notices lock")
            .drain(..)
            .collect()
    }
}

/// One logical record (sequence numbers are given when it is sent).
pub enum Rec {
    /// `bases`: per disk, the run its records build on.
    Begin {
        run: RunId,
        time_ns: u64,
        bases: Vec<RunId>,
    },
    /// `cv`: the chunk's CV as the engine computed it reading `data` (`crate::cv::chunk_cv`),
    /// which is its wire digest ([`ferry_wire::write_digest`]): not hashed a second time.
    Write {
        disk: usize,
        offset: u64,
        data: Vec<u8>,
        cv: [u8; 32],
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
    Tag(PointTag),
}

impl Rec {
    /// The record as a message (sequence number 0 until it is sent; see [`set_seq`]). The payload
    /// is moved, not copied, and its wire digest computed once, also across re-sends.
    fn into_message(self, to: &ShipTo, replicas: &[String]) -> Message {
        match self {
            Rec::Begin {
                run,
                time_ns,
                bases,
            } => Message::Begin {
                seq: 0,
                run,
                time_ns,
                disks: replicas
                    .iter()
                    .zip(&to.disks)
                    .map(|(r, d)| (r.clone(), d.size))
                    .collect(),
                bases,
            },
            Rec::Write {
                disk,
                offset,
                data,
                cv,
            } => Message::Write {
                seq: 0,
                disk: replicas[disk].clone(),
                offset,
                digest: cv,
                data,
            },
            Rec::Zero { disk, offset, len } => Message::Zero {
                seq: 0,
                disk: replicas[disk].clone(),
                offset,
                len,
            },
            Rec::Tag(tag) => Message::Tag { seq: 0, tag },
        }
    }
}

/// Gives a record message its sequence number on this connection.
fn set_seq(m: &mut Message, to: u64) {
    match m {
        Message::Begin { seq, .. }
        | Message::Write { seq, .. }
        | Message::Zero { seq, .. }
        | Message::Discard { seq, .. }
        | Message::Tag { seq, .. } => *seq = to,
        _ => {}
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Ships until the engine drops its sender and everything sent is acknowledged, or `abandon` is
/// set (a clean stop: the engine keeps what was not acknowledged as dirty), or a permanent error
/// (also reported as [`Event::Failed`]).
pub async fn ship(
    to: ShipTo,
    mut id: AgentIdentity,
    mut rx: mpsc::Receiver<Rec>,
    events: crossbeam_channel::Sender<Event>,
    stats: &ShipStats,
    abandon: &AtomicBool,
) -> Result<(), AgentError> {
    let mut out = Outbox {
        unacked: VecDeque::new(),
        pending: VecDeque::new(),
        producer_done: false,
        seq: now_ns(),
        events: events.clone(),
        replicas: Vec::new(),
        last: Vec::new(),
        open_acked: None,
    };
    let mut backoff = Duration::from_millis(100);
    // The last reconnect warning: when, its error, how many the same since (not logged).
    let mut warned: Option<(std::time::Instant, String, u64)> = None;
    loop {
        // Stopping must not wait for a connect, a handshake or a write to an unreachable server:
        // a session still running a second after `abandon` is dropped (what it did not get acked
        // stays dirty on this side).
        let r = tokio::select! {
            r = session(&to, &mut id, &mut rx, &mut out, stats, &mut backoff, abandon) => r,
            _ = async {
                abandoned(abandon).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            } => return Ok(()),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) if e.is_permanent() => {
                let msg = e.to_string();
                let _ = events.send(Event::Failed(e));
                return Err(AgentError::Protocol(msg));
            }
            Err(e) => {
                if abandon.load(Ordering::Relaxed) {
                    return Ok(());
                }
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                // The same failure every few seconds while the server is down: said once a minute
                // (with how often it happened meanwhile), a new one at once.
                let text = e.to_string();
                let now = std::time::Instant::now();
                let say = warned.as_ref().is_none_or(|(t, last, _)| {
                    *last != text || now.duration_since(*t) >= Duration::from_secs(60)
                });
                if say {
                    let repeated = warned.as_ref().map_or(0, |w| w.2);
                    tracing::warn!(error = %e, retry_in = ?backoff, unacked = out.unacked.len(), repeated, "connection to the process server lost; reconnecting and re-sending what was not acknowledged");
                    warned = Some((now, text, 0));
                } else if let Some(w) = warned.as_mut() {
                    w.2 += 1;
                    tracing::debug!(error = %e, "reconnecting");
                }
                let _ = events.send(Event::Disconnected(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = abandoned(abandon) => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

struct Outbox {
    /// Sent on the current connection, not yet acked: (seq, record).
    unacked: VecDeque<(u64, Message)>,
    /// To send (re-sends first, then fresh records from the engine).
    pending: VecDeque<Message>,
    producer_done: bool,
    seq: u64,
    events: crossbeam_channel::Sender<Event>,
    /// Replica name per disk (from the first `Holding`; empty before it).
    replicas: Vec<String>,
    /// Per disk: the last run of it the server acknowledged holding.
    last: Vec<RunId>,
    /// The run whose `Begin` is acknowledged and whose `Tag` is not.
    open_acked: Option<RunId>,
}

impl Outbox {
    fn ack(&mut self, seq: u64) {
        while self.unacked.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, m) = self.unacked.pop_front().expect("front exists");
            self.acked_record(m);
        }
    }

    /// `m` is durable on the process server.
    fn acked_record(&mut self, m: Message) {
        match m {
            Message::Tag { tag, .. } => {
                for d in &tag.disks {
                    if let Some(i) = self.replicas.iter().position(|r| *r == d.name) {
                        self.last[i] = tag.run;
                    }
                }
                self.open_acked = None;
                let _ = self.events.send(Event::TagAcked(tag.run));
            }
            Message::Begin { run, .. } => self.open_acked = Some(run),
            _ => {}
        }
    }

    /// Takes the first `Holding`, or checks a later one against what this agent knows the server
    /// acknowledged: each disk's last run is the one acknowledged or that of a tag not yet
    /// acknowledged (it may have become durable after the connection dropped), the same
    /// replicas, and a run whose `Begin` was acknowledged still open (or tagged).
    fn holding(
        &mut self,
        store: String,
        open: RunId,
        disks: Vec<HeldDisk>,
    ) -> Result<(), AgentError> {
        if self.replicas.is_empty() {
            self.replicas = disks.iter().map(|d| d.replica.clone()).collect();
            self.last = disks.iter().map(|d| d.last_run).collect();
            let _ = self
                .events
                .send(Event::Holding(Holding { store, open, disks }));
            return Ok(());
        }
        // Tags the server holds though their acks were lost with the connection: everything up to
        // the last of them is durable there (one ordered log). Count them as acknowledged and do
        // not send them again (a re-sent Begin would build on a run the server has moved past).
        let held_through = self.pending.iter().rposition(|m| match m {
            Message::Tag { tag, .. } => {
                !tag.disks.is_empty()
                    && tag.disks.iter().all(|x| {
                        self.replicas
                            .iter()
                            .position(|r| *r == x.name)
                            .is_some_and(|i| disks.get(i).is_some_and(|d| d.last_run == tag.run))
                    })
            }
            _ => false,
        });
        if let Some(k) = held_through {
            let through: Vec<Message> = self.pending.drain(..=k).collect();
            tracing::info!(records = through.len(), "the process server holds records whose acknowledgements were lost with the connection; they are not sent again");
            for m in through {
                self.acked_record(m);
            }
        }
        let unacked_tags: Vec<&PointTag> = self
            .pending
            .iter()
            .filter_map(|m| match m {
                Message::Tag { tag, .. } => Some(tag),
                _ => None,
            })
            .collect();
        for (i, d) in disks.iter().enumerate() {
            if d.replica != self.replicas[i] {
                return Err(AgentError::Diverged(format!(
                    "disk {} now goes to replica '{}', not '{}'",
                    i + 1,
                    d.replica,
                    self.replicas[i]
                )));
            }
            let known = d.last_run == self.last[i]
                || unacked_tags
                    .iter()
                    .any(|t| t.run == d.last_run && t.disks.iter().any(|x| x.name == d.replica));
            if !known {
                return Err(AgentError::Diverged(format!(
                    "it holds run {} of replica '{}', this agent last had run {} acknowledged",
                    hex::encode(d.last_run),
                    d.replica,
                    hex::encode(self.last[i])
                )));
            }
        }
        if let Some(r) = self.open_acked {
            if open != r && !disks.iter().any(|d| d.last_run == r) {
                return Err(AgentError::Diverged(format!(
                    "it no longer holds the start of run {} (it was acknowledged)",
                    hex::encode(r)
                )));
            }
        }
        let _ = self.events.send(Event::Connected);
        Ok(())
    }
}

async fn session(
    to: &ShipTo,
    id: &mut AgentIdentity,
    rx: &mut mpsc::Receiver<Rec>,
    out: &mut Outbox,
    stats: &ShipStats,
    backoff: &mut Duration,
    abandon: &AtomicBool,
) -> Result<(), AgentError> {
    // Whatever the last connection did not get acked goes first, in order.
    while let Some((_, rec)) = out.unacked.pop_back() {
        out.pending.push_front(rec);
    }
    let (mut r, mut w, nonce, binding) = hello(&to.server, id.fingerprint).await?;
    // An agent registered before keys makes one now, keeps it (with its old credential) before
    // it is sent, and proves the old credential with it: the server then keeps only the public key
    // (a retry after a lost answer sends the same key, which the server may hold already).
    if id.key.is_none() {
        id.key = Some(
            ferry_wire::AgentKey::generate()
                .map_err(|e| AgentError::Usage(format!("cannot make the agent's key: {e}")))?,
        );
        id.save(&to.state_dir)?;
    }
    let key = id.key.clone().expect("set above");
    let legacy = match &id.legacy {
        Some(c) => c.prove(&nonce),
        None => [0u8; 32],
    };
    w.send(&Message::Auth {
        agent_id: id.agent_id,
        public_key: key.public(),
        signature: key.sign(&id.agent_id, &nonce, &binding),
        legacy,
    })
    .await?;
    w.flush().await?;
    let credits = match r.read().await? {
        Some(Message::Welcome { credits, .. }) => credits,
        m => return Err(unexpected(m)),
    };
    if id.legacy.take().is_some() {
        id.save(&to.state_dir)?;
        tracing::info!("moved from the registration credential to a key: the identity file holds the key, the process server only its public half");
    }
    w.send(&Message::Inventory {
        vm: to.vm.clone(),
        disks: to.disks.clone(),
    })
    .await?;
    w.flush().await?;
    // The answer to the inventory; credit top-ups and pings may come first.
    let mut credits = credits;
    loop {
        match r.read().await? {
            Some(Message::Holding { store, open, disks }) if disks.len() == to.disks.len() => {
                out.holding(store, open, disks)?;
                // Only a connection that got this far resets the backoff: one refused at its
                // Inventory (a quarantined VM) keeps backing off, up to 5 s.
                *backoff = Duration::from_millis(100);
                break;
            }
            Some(Message::Holding { disks, .. }) => {
                return Err(AgentError::Protocol(format!(
                    "the process server answered {} disks for an inventory of {}",
                    disks.len(),
                    to.disks.len()
                )))
            }
            Some(Message::Credit { bytes }) => credits = credits.saturating_add(bytes),
            // A point of a run sent on an earlier connection may be named before the Holding.
            Some(Message::Point { run, id }) => {
                let _ = out.events.send(Event::PointMade { run, id });
            }
            // A policy change may overtake the Holding.
            Some(Message::Policy {
                crash_every_ms,
                app_every_ms,
            }) => {
                let _ = out.events.send(Event::Policy {
                    crash_every_ms,
                    app_every_ms,
                });
            }
            Some(Message::Ping { token }) => {
                w.send(&Message::Pong { token }).await?;
                w.flush().await?;
            }
            Some(Message::Refused { code, message }) => {
                return Err(AgentError::Refused { code, message })
            }
            m => return Err(unexpected(m)),
        }
    }
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
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut pace = to.max_rate.map(LocalPace::new);
    // A new connection: the server learns this agent's cut intervals again.
    let intervals = stats.intervals.lock().expect("intervals lock").clone();
    if let Some(m) = intervals {
        w.send(&m).await?;
    }
    let sticky = [
        stats.cutover.lock().expect("cutover lock").clone(),
        stats
            .remote_cutover
            .lock()
            .expect("remote cutover lock")
            .clone(),
    ];
    for m in sticky.into_iter().flatten() {
        w.send(&m).await?;
    }
    loop {
        for m in stats.take_notices() {
            w.send(&m).await?;
        }
        // Events first: acks free the outbox, credit lets more go.
        while let Ok(ev) = ev_rx.try_recv() {
            handle(ev?, out, &mut credit, &mut w).await?;
        }
        let ended = out.producer_done && out.pending.is_empty() && out.unacked.is_empty();
        if ended || abandon.load(Ordering::Relaxed) {
            // A clean TLS close (close_notify), so the server logs a plain disconnect.
            let _ = w.flush().await;
            let _ = w.into_inner().shutdown().await;
            return Ok(());
        }
        if out.pending.is_empty() && !out.producer_done {
            match rx.try_recv() {
                Ok(rec) => {
                    let m = rec.into_message(to, &out.replicas);
                    out.pending.push_back(m)
                }
                Err(mpsc::error::TryRecvError::Disconnected) => out.producer_done = true,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
        }
        // The local cap (`max_rate`): a record waits for its turn, credit or not.
        let turn = pace.as_ref().and_then(|p| p.wait());
        if let (Some(m), None) = (out.pending.front_mut(), turn) {
            set_seq(m, out.seq + 1);
            let cost = m.frame_len()? as u64;
            if credit.try_take(cost) {
                if let Some(p) = pace.as_mut() {
                    p.sent(cost);
                }
                out.seq += 1;
                let m = out.pending.pop_front().expect("front exists");
                if let Message::Write { data, .. } = &m {
                    stats
                        .data_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                stats.records.fetch_add(1, Ordering::Relaxed);
                // Unacked before it is sent: a failed send re-sends it on the next connection.
                out.unacked.push_back((out.seq, m));
                let (_, m) = out.unacked.back().expect("just pushed");
                w.send(m).await?;
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
                Some(rec) => {
                    let m = rec.into_message(to, &out.replicas);
                    out.pending.push_back(m)
                }
                None => out.producer_done = true,
            },
            // Notices `abandon` while idle.
            _ = tick.tick() => {}
            // The local cap lets the next record go.
            _ = tokio::time::sleep(turn.unwrap_or_default()), if turn.is_some() => {}
        }
    }
}

/// The agent's own rate cap: records leave at most `rate` bytes/s, with at most
/// [`LocalPace::BURST`] of saved-up time.
struct LocalPace {
    rate: f64,
    /// When the next record may go.
    next: std::time::Instant,
}

impl LocalPace {
    const BURST: Duration = Duration::from_millis(100);

    fn new(rate: u64) -> Self {
        LocalPace {
            rate: rate as f64,
            next: std::time::Instant::now(),
        }
    }

    /// How long until the next record may go; `None`: now.
    fn wait(&self) -> Option<Duration> {
        let now = std::time::Instant::now();
        (self.next > now).then(|| self.next - now)
    }

    /// A record of `bytes` went.
    fn sent(&mut self, bytes: u64) {
        let now = std::time::Instant::now();
        let from = self.next.max(now.checked_sub(Self::BURST).unwrap_or(now));
        self.next = from + Duration::from_secs_f64(bytes as f64 / self.rate);
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
        Message::Point { run, id } => {
            let _ = out.events.send(Event::PointMade { run, id });
        }
        Message::Policy {
            crash_every_ms,
            app_every_ms,
        } => {
            let _ = out.events.send(Event::Policy {
                crash_every_ms,
                app_every_ms,
            });
        }
        Message::CutoverRequest => {
            let _ = out.events.send(Event::CutoverAsked);
        }
        Message::CutRequest { app } => {
            tracing::info!(
                app,
                "the process server asked for a cut; cuts follow this agent's schedule and `ferry-agent cut`"
            );
        }
        Message::Refused { code, message } if code == refuse::STALE_BASE => {
            return Err(AgentError::Diverged(message))
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
    use ferry_wire::PointKind;

    #[test]
    fn a_tag_counts_as_acked_only_when_its_seq_is() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut out = Outbox {
            unacked: VecDeque::new(),
            pending: VecDeque::new(),
            producer_done: false,
            seq: 10,
            events: tx,
            replicas: vec!["sda".into()],
            last: vec![[0; 16]],
            open_acked: None,
        };
        out.unacked
            .push_back((11, Message::write(11, "sda", 0, vec![1; 16])));
        out.unacked.push_back((
            12,
            Message::Tag {
                seq: 12,
                tag: PointTag {
                    run: [5; 16],
                    time_ns: 0,
                    kind: PointKind::Crash,
                    disks: vec![],
                },
            },
        ));
        out.ack(11);
        assert!(rx.try_recv().is_err());
        assert_eq!(out.unacked.len(), 1);
        out.ack(12);
        assert!(matches!(rx.try_recv(), Ok(Event::TagAcked(r)) if r == [5; 16]));
        assert!(out.unacked.is_empty());
    }

    fn held(replica: &str, last: u8) -> HeldDisk {
        HeldDisk {
            replica: replica.into(),
            last_run: [last; 16],
            point_seq: 0,
        }
    }

    fn tag_msg(run: u8) -> Message {
        Message::Tag {
            seq: 0,
            tag: PointTag {
                run: [run; 16],
                time_ns: 0,
                kind: PointKind::Crash,
                disks: vec![ferry_wire::DiskCut {
                    name: "sda".into(),
                    size: 1,
                    blake3: [0; 32],
                }],
            },
        }
    }

    #[test]
    fn a_reconnect_to_a_server_holding_something_else_is_a_divergence() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut out = Outbox {
            unacked: VecDeque::new(),
            pending: VecDeque::new(),
            producer_done: false,
            seq: 0,
            events: tx,
            replicas: Vec::new(),
            last: Vec::new(),
            open_acked: None,
        };
        // The first Holding is taken and handed to the engine.
        out.holding("s".into(), [0; 16], vec![held("sda", 1)])
            .unwrap();
        assert!(matches!(rx.try_recv(), Ok(Event::Holding(_))));
        // Same state again: fine. A tag the server got but did not ack yet: fine.
        out.holding("s".into(), [0; 16], vec![held("sda", 1)])
            .unwrap();
        // The server holds tag 2 whose ack was lost with the connection: counted as acknowledged,
        // not sent again.
        out.pending.push_back(Message::Begin {
            seq: 0,
            run: [2; 16],
            time_ns: 0,
            disks: vec![("sda".into(), 1)],
            bases: vec![[1; 16]],
        });
        out.pending.push_back(tag_msg(2));
        out.pending.push_back(Message::Zero {
            seq: 0,
            disk: "sda".into(),
            offset: 0,
            len: 1,
        });
        out.holding("s".into(), [0; 16], vec![held("sda", 2)])
            .unwrap();
        assert_eq!(
            out.pending.len(),
            1,
            "the held Begin and Tag are sent again"
        );
        // Each later Holding says the connection is up again; then the tag counts as acked.
        let next = loop {
            match rx.try_recv() {
                Ok(Event::Connected) => continue,
                e => break e,
            }
        };
        assert!(matches!(next, Ok(Event::TagAcked(r)) if r == [2; 16]));
        assert_eq!(out.last, vec![[2; 16]]);
        out.pending.clear();
        out.last = vec![[1; 16]];
        // A run the agent never sent, an empty replica, another replica: diverged.
        for h in [held("sda", 9), held("sda", 0), held("sdb", 1)] {
            assert!(matches!(
                out.holding("s".into(), [0; 16], vec![h]),
                Err(AgentError::Diverged(_))
            ));
        }
        // A Begin acknowledged: the server must still hold it open (or its tag).
        out.open_acked = Some([3; 16]);
        assert!(out
            .holding("s".into(), [3; 16], vec![held("sda", 1)])
            .is_ok());
        assert!(matches!(
            out.holding("s".into(), [0; 16], vec![held("sda", 1)]),
            Err(AgentError::Diverged(_))
        ));
    }
}
