//! One simulated agent on the wire: registration, connection, and the run (Begin, records under
//! credit, Tag, the Tag's Ack), timing every record from the start of its send to its Ack.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use blake3::hazmat::ChainingValue;
use ferry_benches::{disk_hash, SplitMix64, CHUNK};
use ferry_wire::{
    client_config, server_name, AgentId, AgentKey, AsyncFrameReader, AsyncFrameWriter, Credits,
    DiskCut, Message, Nonce, Passphrase, PointKind, PointTag, RunId, WIRE_VERSION,
};
use tokio::io::{split, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::Args;

type Tls = TlsStream<TcpStream>;
type Reader = AsyncFrameReader<ReadHalf<Tls>>;
type Writer = AsyncFrameWriter<WriteHalf<Tls>>;

/// The disk every simulated agent protects.
const DISK: &str = "disk0";

/// What one agent measured.
#[derive(Default, Debug)]
pub(crate) struct AgentStats {
    pub records: u64,
    pub write_bytes_sent: u64,
    pub write_bytes_acked: u64,
    /// Write bytes whose Ack arrived before the writing window closed.
    pub write_bytes_acked_in_window: u64,
    pub zero_records: u64,
    /// Per Write or Zero record, from the start of its send (credit in hand) to the arrival of the
    /// Ack covering it, in microseconds.
    pub ack_us: Vec<u64>,
    pub tag_ack_us: u64,
    /// Tags acknowledged (the last one and those of --cut-every).
    pub points_acked: u64,
    /// Time spent with a record ready but not enough credit for it (backpressure).
    pub credit_wait: Duration,
    pub credit_grants: u64,
    /// `Point` messages received before the connection closed.
    pub point_notices: u64,
    /// When the Tag's Ack arrived.
    pub done: Option<Instant>,
}

/// An authenticated connection with its VM announced, and its first credit.
pub(crate) struct Conn {
    r: Reader,
    w: Writer,
    credits: u64,
    /// The last run of the disk the server holds (what the first run builds on).
    base: RunId,
}

/// TCP + pinned TLS 1.3 + Hello/HelloAck: the framed halves and the connection's nonce.
async fn hello(
    server: &str,
    pass: &Passphrase,
) -> anyhow::Result<(Reader, Writer, Nonce, ferry_wire::Binding)> {
    let tcp = tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(server))
        .await
        .map_err(|_| anyhow!("connect to {server} timed out"))?
        .with_context(|| format!("cannot connect to {server}"))?;
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(client_config(pass.fingerprint)?);
    let tls = tokio::time::timeout(
        Duration::from_secs(30),
        connector.connect(server_name(), tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake with {server} timed out"))?
    .context("TLS handshake")?;
    let binding = ferry_wire::agentkey::tls_binding(tls.get_ref().1)?;
    let (rd, wr) = split(tls);
    let (mut r, mut w) = (AsyncFrameReader::new(rd), AsyncFrameWriter::new(wr));
    w.send(&Message::Hello {
        min_version: WIRE_VERSION,
        max_version: WIRE_VERSION,
        software: concat!("ferry-simagents ", env!("CARGO_PKG_VERSION")).into(),
    })
    .await?;
    w.flush().await?;
    match r.read().await? {
        Some(Message::HelloAck { version, nonce }) => {
            r.set_version(version);
            w.set_version(version);
            Ok((r, w, nonce, binding))
        }
        m => Err(unexpected(m)),
    }
}

fn unexpected(m: Option<Message>) -> anyhow::Error {
    match m {
        Some(Message::Refused { code, message }) => {
            anyhow!("refused by the process server (code {code}): {message}")
        }
        Some(m) => anyhow!("unexpected {} from the process server", m.ty().name()),
        None => anyhow!("the process server closed the connection"),
    }
}

/// Registers agent `i` with the passphrase and a key of its own: its id and key.
pub(crate) async fn register(
    a: &Args,
    pass: &Passphrase,
    i: usize,
) -> anyhow::Result<(AgentId, AgentKey)> {
    let key = AgentKey::generate().map_err(|e| anyhow!(e))?;
    let (mut r, mut w, nonce, _) = hello(&a.server, pass).await?;
    w.send(&Message::Register {
        proof: pass.prove(&nonce),
        hostname: a.vm_name(i),
        public_key: key.public(),
    })
    .await?;
    w.flush().await?;
    match r.read().await? {
        Some(Message::Registered { agent_id }) => Ok((agent_id, key)),
        m => Err(unexpected(m)),
    }
}

/// Hello, Auth, Welcome, Inventory.
pub(crate) async fn connect(
    a: &Args,
    pass: &Passphrase,
    i: usize,
    id: AgentId,
    key: &AgentKey,
) -> anyhow::Result<Conn> {
    let (mut r, mut w, nonce, binding) = hello(&a.server, pass).await?;
    w.send(&Message::Auth {
        agent_id: id,
        public_key: key.public(),
        signature: key.sign(&id, &nonce, &binding),
        legacy: [0; 32],
    })
    .await?;
    w.flush().await?;
    let credits = match r.read().await? {
        Some(Message::Welcome { credits, .. }) => credits,
        m => return Err(unexpected(m)),
    };
    w.send(&Message::Inventory {
        vm: a.vm_name(i),
        disks: vec![ferry_wire::InvDisk {
            name: DISK.into(),
            size: a.disk_size,
            id: format!("sim:{}", a.vm_name(i)),
        }],
    })
    .await?;
    w.flush().await?;
    let mut credits = credits;
    let base = loop {
        match r.read().await? {
            Some(Message::Holding { disks, .. }) if disks.len() == 1 => {
                if disks[0].replica != DISK {
                    bail!(
                        "the server put the simulated disk in replica '{}'; use a fresh store",
                        disks[0].replica
                    );
                }
                break disks[0].last_run;
            }
            Some(Message::Credit { bytes }) => credits += bytes,
            // The replication policy's cut intervals: a simulated agent cuts once, at its end.
            Some(Message::Policy { .. }) => {}
            m => return Err(unexpected(m)),
        }
    };
    Ok(Conn {
        r,
        w,
        credits,
        base,
    })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The simulated disk: makes the records and tracks the blake3 of what they leave on the replica.
struct SimDisk<'z> {
    rng: SplitMix64,
    size: u64,
    write_size: u64,
    zero_every: u64,
    /// Chaining value of every chunk as the replica holds it after the records made so far.
    cvs: Vec<ChainingValue>,
    zero_cvs: &'z [ChainingValue],
    made: u64,
}

impl SimDisk<'_> {
    /// The next Write (or every `zero_every`th, a Zero) at a random chunk-aligned offset.
    fn next_record(&mut self, seq: u64) -> Message {
        self.made += 1;
        let per = self.write_size / CHUNK as u64;
        let first = self.rng.below(self.size / CHUNK as u64 - per + 1);
        let offset = first * CHUNK as u64;
        let chunks = first as usize..(first + per) as usize;
        if self.zero_every > 0 && self.made.is_multiple_of(self.zero_every) {
            self.cvs[chunks.clone()].copy_from_slice(&self.zero_cvs[chunks]);
            return Message::Zero {
                seq,
                disk: DISK.into(),
                offset,
                len: self.write_size,
            };
        }
        let mut data = vec![0u8; self.write_size as usize];
        self.rng.fill(&mut data);
        for (c, piece) in chunks.zip(data.chunks(CHUNK)) {
            self.cvs[c] = disk_hash::chunk_cv(c as u64, piece);
        }
        Message::write(seq, DISK, offset, data)
    }

    fn tag(&self, seq: u64, run: RunId) -> Message {
        Message::Tag {
            seq,
            tag: PointTag {
                run,
                time_ns: now_ns(),
                kind: PointKind::Crash,
                disks: vec![DiskCut {
                    name: DISK.into(),
                    size: self.size,
                    blake3: disk_hash::root(&self.cvs, self.size),
                }],
            },
        }
    }
}

/// A record sent and not yet acknowledged.
struct Sent {
    seq: u64,
    /// When its send started (credit in hand).
    at: Instant,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    Begin,
    /// With its data bytes.
    Write(u64),
    Zero,
    Tag,
}

/// The sending side of a run and what it measured so far.
struct Session {
    w: Writer,
    credit: Credits,
    unacked: VecDeque<Sent>,
    st: AgentStats,
    deadline: Instant,
    /// The seq of the Tag sent at the end (its Ack ends the run).
    final_tag: Option<u64>,
}

impl Session {
    /// Takes a message from the server that arrived at `at`.
    async fn on_event(&mut self, at: Instant, m: Message) -> anyhow::Result<()> {
        match m {
            Message::Ack { seq } => {
                while self.unacked.front().is_some_and(|s| s.seq <= seq) {
                    let sent = self.unacked.pop_front().expect("front exists");
                    let us = at.saturating_duration_since(sent.at).as_micros() as u64;
                    let st = &mut self.st;
                    match sent.kind {
                        Kind::Write(bytes) => {
                            st.write_bytes_acked += bytes;
                            if at <= self.deadline {
                                st.write_bytes_acked_in_window += bytes;
                            }
                            st.ack_us.push(us);
                        }
                        Kind::Zero => st.ack_us.push(us),
                        // A cut before the end (--cut-every) is a point like the last.
                        Kind::Tag if Some(sent.seq) != self.final_tag => st.points_acked += 1,
                        Kind::Tag => {
                            st.tag_ack_us = us;
                            st.points_acked += 1;
                            st.done = Some(at);
                        }
                        // Begin makes the server read the VM's manifest: not a data record.
                        Kind::Begin => {}
                    }
                }
            }
            Message::Credit { bytes } => {
                self.credit.grant(bytes);
                self.st.credit_grants += 1;
            }
            Message::Ping { token } => {
                self.w.send(&Message::Pong { token }).await?;
            }
            // A point committed while the connection is still open (usually it is not: the
            // pipeline commits after the agent has left; benches/agents.sh reads the server log).
            Message::Point { .. } => self.st.point_notices += 1,
            Message::Pong { .. } | Message::CutRequest { .. } | Message::Policy { .. } => {}
            m => return Err(unexpected(Some(m))),
        }
        Ok(())
    }

    /// Sends `m` as record `seq`, started at `now`.
    async fn send(&mut self, m: &Message, seq: u64, now: Instant) -> anyhow::Result<Kind> {
        let kind = match m {
            Message::Write { data, .. } => Kind::Write(data.len() as u64),
            Message::Zero { .. } => Kind::Zero,
            Message::Tag { .. } => Kind::Tag,
            _ => Kind::Begin,
        };
        match kind {
            Kind::Write(bytes) => self.st.write_bytes_sent += bytes,
            Kind::Zero => self.st.zero_records += 1,
            _ => {}
        }
        self.st.records += 1;
        self.unacked.push_back(Sent { seq, at: now, kind });
        self.w.send(m).await?;
        self.w.flush().await?;
        Ok(kind)
    }
}

type Events = mpsc::UnboundedReceiver<(Instant, anyhow::Result<Message>)>;

/// Agent `i`'s run on `conn`: Begin, records until `--seconds` after `start`, Tag, its Ack.
pub(crate) async fn run(
    a: &Args,
    i: usize,
    conn: Conn,
    start: Instant,
    zero_cvs: &[ChainingValue],
) -> anyhow::Result<AgentStats> {
    let Conn {
        mut r,
        w,
        credits,
        base,
    } = conn;
    // Messages from the server, stamped on arrival so a busy sender does not inflate latencies.
    let (ev_tx, mut events): (_, Events) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            let m = match r.read().await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(anyhow!("the process server closed the connection")),
                Err(e) => Err(e.into()),
            };
            let end = m.is_err();
            if ev_tx.send((Instant::now(), m)).is_err() || end {
                return;
            }
        }
    });
    let _abort = AbortOnDrop(reader);
    let mut s = Session {
        w,
        credit: Credits::new(credits),
        unacked: VecDeque::new(),
        st: AgentStats::default(),
        deadline: start + Duration::from_secs_f64(a.seconds),
        final_tag: None,
    };
    // --cut-every: a point every so often while writing, as a real agent's crash points.
    let every = (a.cut_every > 0.0).then(|| Duration::from_secs_f64(a.cut_every));
    let mut next_cut = every.map(|e| start + e);
    let mut last_is_final = false;
    let mut reopen: Option<RunId> = None;
    let mut disk = SimDisk {
        rng: SplitMix64::new(a.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        size: a.disk_size,
        write_size: a.write_size,
        zero_every: a.zero_every,
        cvs: zero_cvs.to_vec(),
        zero_cvs,
        made: 0,
    };
    let mut run_id: RunId = [0; 16];
    disk.rng.fill(&mut run_id);
    let mut seq = now_ns();
    let mut pending = Some(Message::Begin {
        seq: seq + 1,
        run: run_id,
        time_ns: now_ns(),
        disks: vec![(DISK.into(), a.disk_size)],
        bases: vec![base],
    });
    // Bytes of Write and Zero records sent, for --rate.
    let mut paced = 0u64;
    let mut tagged = false;
    while s.st.done.is_none() {
        while let Ok((at, ev)) = events.try_recv() {
            s.on_event(at, ev?).await?;
        }
        if pending.is_none() {
            // A Tag closes its run: the next records belong to a new one based on it.
            pending = reopen.take().map(|base| Message::Begin {
                seq: seq + 1,
                run: run_id,
                time_ns: now_ns(),
                disks: vec![(DISK.into(), a.disk_size)],
                bases: vec![base],
            });
        }
        if !tagged && pending.is_none() {
            let now = Instant::now();
            pending = Some(if now >= s.deadline {
                last_is_final = true;
                disk.tag(seq + 1, run_id)
            } else if let Some((c, e)) = next_cut.zip(every).filter(|(c, _)| now >= *c) {
                next_cut = Some(c + e);
                disk.tag(seq + 1, run_id)
            } else {
                disk.next_record(seq + 1)
            });
        }
        let Some(m) = pending.take() else {
            // Everything sent: wait for the Tag's Ack.
            let limit = Duration::from_secs_f64(a.tag_timeout);
            match tokio::time::timeout(limit, events.recv()).await {
                Ok(Some((at, ev))) => s.on_event(at, ev?).await?,
                Ok(None) => bail!("connection reader ended before the Tag was acked"),
                Err(_) => bail!("no Ack for the Tag within {limit:?}"),
            }
            continue;
        };
        // Pacing (--rate): a Write or Zero waits for its turn; Begin and Tag never do.
        let due = match &m {
            Message::Write { .. } | Message::Zero { .. } if a.rate > 0 => {
                Some(start + Duration::from_secs_f64(paced as f64 / a.rate as f64))
            }
            _ => None,
        };
        let now = Instant::now();
        let on_time = due.is_none_or(|d| d <= now);
        if on_time && s.credit.try_take(m.frame_len()? as u64) {
            seq += 1;
            match s.send(&m, seq, now).await? {
                Kind::Write(_) | Kind::Zero => paced += a.write_size,
                Kind::Tag if last_is_final => {
                    s.final_tag = Some(seq);
                    tagged = true;
                }
                Kind::Tag => {
                    reopen = Some(run_id);
                    disk.rng.fill(&mut run_id);
                }
                Kind::Begin => {}
            }
            continue;
        }
        pending = Some(m);
        // Not sendable yet: wait for the server (credit, acks) or the pacing clock.
        let wake = due.unwrap_or(now + Duration::from_secs(3600));
        tokio::select! {
            ev = events.recv() => {
                let (at, ev) = ev.ok_or_else(|| anyhow!("connection reader ended"))?;
                if on_time {
                    s.st.credit_wait += at.saturating_duration_since(now);
                }
                s.on_event(at, ev?).await?;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    // A clean TLS close (close_notify), so the server logs a plain disconnect.
    let _ = s.w.flush().await;
    let _ = s.w.into_inner().shutdown().await;
    Ok(s.st)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
