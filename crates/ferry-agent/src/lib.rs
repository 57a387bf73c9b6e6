//! Ferry's mobility agent: tracks what changes on the protected disks, ships it to a process
//! server continuously, and cuts crash- and app-consistent points.
//!
//! Job: register once with the appliance's passphrase (keeping the agent id, credential and the
//! server's pinned certificate fingerprint in `STATE_DIR/agent.json`, mode `0600`); then run the
//! engine (`engine.rs`: tracker → reader → shipper, cuts with fsfreeze), listen for on-demand cuts
//! on `STATE_DIR/agent.sock` (`control.rs`), and keep the state that makes restarts cheap and
//! crashes safe (`persist.rs`). docs/AGENT.md is the operator's view.
//!
//! Invariants:
//! - **Dirty state is cleared only by acks.** A chunk's CV reaches the committed map only once the
//!   tag of its run — and so every record before it — is acknowledged; until then a crash makes
//!   the chunk unknown and it is sent again.
//! - **Unacked records are sent again.** Records sent but not acked when a connection drops are
//!   re-sent, in order, on the next connection; re-sent records are idempotent on the server.
//! - The agent never holds the master key; its chunk CVs are plain BLAKE3 subtree hashes.
//!
//! Must not: decide what a point is on the server, or skip a chunk it cannot prove acknowledged.

mod bits;
pub mod config;
pub mod control;
pub mod cutover;
pub mod cv;
mod engine;
pub mod ident;
mod persist;
mod ship;
mod state;

pub use control::{request_cut, request_cutover, request_resync, request_status, CutReply};
pub use engine::{run_agent, AgentOptions, AgentSummary, MysqlOptions, TrackerChoice};
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
    Read(#[from] ferry_read::ReadError),
    #[error("eBPF tracker: {0}")]
    Tracker(ferry_ebpf::TrackerError),
    /// a cut failed
    #[error("cut failed: {0}")]
    Cut(String),
    /// a cutover or its rollback failed (the message says what state the source is in)
    #[error("{0}")]
    Cutover(String),
    /// the configuration file is wrong
    #[error("{0}")]
    Config(String),
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
    /// The process server does not hold what this agent's state says it holds (a rebuilt or
    /// replaced appliance, another store, lost cache): the agent starts again against what the
    /// server says it holds (maps that no longer match are resynced).
    #[error("the process server's state differs from this agent's: {0}")]
    Diverged(String),
    /// Asked to stop while records could not be handed to the shipper (the process server is
    /// unreachable): a clean stop, what was not sent stays dirty.
    #[error("stopping")]
    Stopping,
}

/// A problem with a file of the state directory.
pub(crate) fn state_err(path: &Path, detail: impl ToString) -> AgentError {
    AgentError::State {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
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
        refuse::STALE_BASE => "run built on a state the server does not hold",
        refuse::NOT_OWNER => "VM owned by another agent",
        refuse::QUARANTINED => "VM quarantined on the process server",
        refuse::RETIRED => "VM migrated: its replication ended (complete-migration)",
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
                ferry_wire::refuse::BUSY
                    | ferry_wire::refuse::INTERNAL
                    | ferry_wire::refuse::QUARANTINED
            ),
            AgentError::Connect { .. } | AgentError::Protocol(_) => false,
            AgentError::Wire(e) => e.is_permanent(),
            _ => true,
        }
    }

    /// 2 for usage and configuration errors (an agent not registered yet included: restarting
    /// cannot fix them, and the unit does not), 3 when the VM's replication ended for good (its
    /// migration was completed: the unit must not restart the agent), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Usage(_) | AgentError::Config(_) | AgentError::NotRegistered(_) => 2,
            AgentError::Refused { code, .. } if *code == ferry_wire::refuse::RETIRED => 3,
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
) -> Result<(Reader, Writer, Nonce, ferry_wire::Binding), AgentError> {
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
    // What this TLS session (and no other) derives: the Auth signature covers it.
    let binding = ferry_wire::agentkey::tls_binding(tls.get_ref().1)
        .map_err(|e| connect_err(format!("TLS exporter: {e}")))?;
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
            Ok((r, w, nonce, binding))
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
/// passphrase carries), sends the public half of a key it makes, and saves the agent id and the
/// key in `state_dir`.
pub fn register(
    server: &str,
    passphrase_file: &Path,
    state_dir: &Path,
) -> Result<AgentIdentity, AgentError> {
    let pass = Passphrase::read_file(passphrase_file)?;
    let rt = runtime()?;
    // The agent's own key: only its public half leaves this machine.
    let key = ferry_wire::AgentKey::generate()
        .map_err(|e| AgentError::Usage(format!("cannot make the agent's key: {e}")))?;
    let agent_id = rt.block_on(async {
        let (mut r, mut w, nonce, _) = hello(server, pass.fingerprint).await?;
        w.send(&Message::Register {
            proof: pass.prove(&nonce),
            hostname: hostname(),
            public_key: key.public(),
        })
        .await?;
        w.flush().await?;
        match r.read().await? {
            Some(Message::Registered { agent_id }) => Ok(agent_id),
            m => Err(unexpected(m)),
        }
    })?;
    let id = AgentIdentity {
        server: server.to_string(),
        agent_id,
        key: Some(key),
        legacy: None,
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

/// Whether log lines may carry colour escapes: only on a terminal, and never with `NO_COLOR` set
/// (<https://no-color.org>); journald and files get plain text.
pub fn log_colors() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
