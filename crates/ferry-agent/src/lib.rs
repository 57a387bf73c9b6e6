//! Ferry's mobility agent: finds what changed on the protected disks and ships it to a process
//! server, one recovery point per run.
//!
//! Job: register once with the appliance's passphrase (keeping the agent id, credential and the
//! server's pinned certificate fingerprint in `STATE_DIR/agent.json`, mode `0600`); then, per run,
//! scan every disk against the digests of what the process server has acknowledged, send `Begin`,
//! the changed chunks as `Write`/`Zero` records within the credit granted, and `Tag`, and wait for
//! the tag's ack.
//!
//! Tracker: this version uses the **scan tracker** (read every disk, compare 64 KiB chunk digests)
//! because it needs no kernel support and is always correct; the eBPF tracker (`ferry-ebpf`) will
//! replace it for block devices.
//!
//! Invariants:
//! - **Dirty state is cleared only by acks.** The per-disk digest maps (`STATE_DIR/maps/DISK.map`)
//!   are updated, durably, only once the run's `Tag` — and so every record before it — has been
//!   acknowledged: a chunk's new digest is never recorded before the process server holds the
//!   chunk durably *and* the run that carries it can become a point. After a crash or restart the
//!   agent rescans against the last acknowledged state, so nothing is lost.
//! - **Unacked records are sent again.** Records sent but not acked when a connection drops are
//!   re-sent, in order, on the next connection (new sequence numbers, same run), then the run
//!   continues; re-sent writes, zero ranges and tags are idempotent on the process server.
//! - The agent never holds the master key; its chunk digests are its own (a fixed local key).
//!
//! Must not: decide what a point is on the server, or skip a chunk it cannot prove acknowledged.

mod run;
mod state;

pub use run::{run_once, RunOptions, RunSummary};
pub use state::{AgentIdentity, IDENTITY_FILE};

use std::path::Path;
use std::time::Duration;

use ferry_wire::{
    client_config, server_name, AsyncFrameReader, AsyncFrameWriter, Message, Nonce, Passphrase,
    WIRE_VERSION,
};
use tokio::io::{split, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Errors of the agent. Each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// the process server refused us
    #[error("the process server refused the agent (code {code}, {}): {message}", refusal_name(*code))]
    Refused { code: u16, message: String },
    /// cannot reach the server
    #[error("cannot connect to the process server at {server}: {detail}")]
    Connect { server: String, detail: String },
    #[error(transparent)]
    Wire(#[from] ferry_wire::WireError),
    #[error(transparent)]
    Tls(#[from] ferry_wire::TlsError),
    #[error(transparent)]
    Passphrase(#[from] ferry_wire::PassphraseError),
    #[error(transparent)]
    Scan(#[from] ferry_scan::ScanError),
    /// not registered
    #[error("this agent is not registered (no {0}); run `ferry-agent register --server HOST:PORT --passphrase-file FILE --state-dir DIR` first")]
    NotRegistered(String),
    /// state file problem
    #[error("agent state {path}: {detail}")]
    State { path: String, detail: String },
    /// the server said something out of turn
    #[error("unexpected reply from the process server: {0}")]
    Protocol(String),
    /// bad arguments
    #[error("{0}")]
    Usage(String),
}

/// What a refusal code means (docs/WIRE.md, *Refusal codes*).
pub fn refusal_name(code: u16) -> &'static str {
    use ferry_wire::refuse;
    match code {
        refuse::VERSION => "no common wire version",
        refuse::BAD_PASSPHRASE => "wrong passphrase",
        refuse::UNKNOWN_AGENT => "unknown agent",
        refuse::BAD_CREDENTIAL => "bad credential",
        refuse::PROTOCOL => "protocol violation",
        refuse::BUSY => "busy",
        refuse::INTERNAL => "internal error",
        _ => "unknown code",
    }
}

impl AgentError {
    /// Worth reconnecting for (network trouble, a restarting server), or not (refused for good,
    /// local problems).
    pub fn is_permanent(&self) -> bool {
        match self {
            AgentError::Refused { code, .. } => !matches!(
                *code,
                ferry_wire::refuse::BUSY | ferry_wire::refuse::INTERNAL
            ),
            AgentError::Connect { .. } | AgentError::Protocol(_) => false,
            AgentError::Wire(e) => e.is_permanent(),
            _ => true,
        }
    }

    /// 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Usage(_) => 2,
            _ => 1,
        }
    }
}

type Tls = TlsStream<TcpStream>;
pub(crate) type Reader = AsyncFrameReader<ReadHalf<Tls>>;
pub(crate) type Writer = AsyncFrameWriter<WriteHalf<Tls>>;

/// TCP + pinned TLS 1.3 + Hello/HelloAck. Returns the framed halves and the connection's nonce.
pub(crate) async fn hello(
    server: &str,
    pin: ferry_wire::Fingerprint,
) -> Result<(Reader, Writer, Nonce), AgentError> {
    let connect_err = |detail: String| AgentError::Connect {
        server: server.to_string(),
        detail,
    };
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(server))
        .await
        .map_err(|_| connect_err("timed out after 10 s".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(client_config(pin)?);
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(server_name(), tcp),
    )
    .await
    .map_err(|_| connect_err("TLS handshake timed out".into()))?
    .map_err(|e| connect_err(format!("TLS: {e}")))?;
    let (rd, wr) = split(tls);
    let (mut r, mut w) = (AsyncFrameReader::new(rd), AsyncFrameWriter::new(wr));
    w.send(&Message::Hello {
        min_version: WIRE_VERSION,
        max_version: WIRE_VERSION,
        software: concat!("ferry-agent ", env!("CARGO_PKG_VERSION")).into(),
    })
    .await?;
    w.flush().await?;
    match r.read().await? {
        Some(Message::HelloAck { version, nonce }) => {
            r.set_version(version);
            w.set_version(version);
            Ok((r, w, nonce))
        }
        m => Err(unexpected(m)),
    }
}

pub(crate) fn unexpected(m: Option<Message>) -> AgentError {
    match m {
        Some(Message::Refused { code, message }) => AgentError::Refused { code, message },
        Some(m) => AgentError::Protocol(format!("got {}", m.ty().name())),
        None => AgentError::Protocol("the server closed the connection".into()),
    }
}

/// This machine's host name (for registration and the default VM name).
pub fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = h
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if h.is_empty() || h.starts_with('.') {
        "agent".into()
    } else {
        h
    }
}

/// `ferry-agent register`: proves the passphrase to the server (pinned by the fingerprint the
/// passphrase carries) and saves the agent id and credential in `state_dir`.
pub fn register(
    server: &str,
    passphrase_file: &Path,
    state_dir: &Path,
) -> Result<AgentIdentity, AgentError> {
    let pass = Passphrase::read_file(passphrase_file)?;
    let rt = runtime()?;
    let (agent_id, credential) = rt.block_on(async {
        let (mut r, mut w, nonce) = hello(server, pass.fingerprint).await?;
        w.send(&Message::Register {
            proof: pass.prove(&nonce),
            hostname: hostname(),
        })
        .await?;
        w.flush().await?;
        match r.read().await? {
            Some(Message::Registered {
                agent_id,
                credential,
            }) => Ok((agent_id, credential)),
            m => Err(unexpected(m)),
        }
    })?;
    let id = AgentIdentity {
        server: server.to_string(),
        agent_id,
        credential,
        fingerprint: pass.fingerprint,
    };
    id.save(state_dir)?;
    Ok(id)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, AgentError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AgentError::Usage(format!("cannot start the async runtime: {e}")))
}
