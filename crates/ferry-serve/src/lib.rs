//! Ferry's process server (`ferry serve`): the network side of ingest.
//!
//! Job: accept agents over TLS 1.3 (the appliance's self-signed identity from the state directory),
//! register them with the passphrase or authenticate them with their credential, turn their records
//! into cache entries (Writes cut at 64 KiB boundaries, keyed-digested with the master key, zero
//! pieces as zero ranges), make them durable through one group committer, acknowledge them, and
//! drain the cache into the store through the pipeline so that every `Tag` becomes a point.
//!
//! Invariants:
//! - **Acked means durable.** An `Ack{seq}` is sent only after the committer's `fdatasync` covered
//!   every record of that connection up to `seq`. A failed sync stops the server; nothing after it
//!   is acked.
//! - **Bounded.** Credit comes from one pool (`MAX_INFLIGHT`, 96 MiB): each connection holds an
//!   equal share of it (between 256 KiB and its 32 MiB window), topped up only as its records
//!   become durable, and not at all while the cache is above its high watermark (until it drains
//!   below the low watermark) or holds more than [`DRAIN_LAG`] of the drain's rate (at least
//!   [`DRAIN_LAG_FLOOR`]; lifted while the drain makes no progress): the bytes in flight stay
//!   near the pool (up to [`conn::MIN_SHARE`] per agent beyond it), acknowledged data stays
//!   within about a second (or the floor) of its points, and a full cache pauses agents, it
//!   never drops data.
//! - **One bad peer hurts only itself.** Any malformed frame, bad version, wrong passphrase or
//!   credential, or protocol violation gets `Refused` (when the stream still allows it), a warning
//!   in the log, and the connection closed; the listener keeps serving everyone else.
//!
//! Also: every second it writes what `ferry status` shows to `STATE_DIR/status.json` (see
//! [`status`]), and with a retention window it prunes expired points from the drain loop.
//!
//! Must not: read sources or decide when points are cut (the agent does); hold the master key
//! anywhere but in this process.

pub mod admin;
mod board;
mod commit;
mod conn;
pub mod control;
pub mod events;
pub mod health;
mod held;
pub mod limits;
pub mod metrics;
pub mod pacer;
pub mod policy;
pub mod status;
pub mod throttle;
pub mod tokens;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_apply::quarantine::Quarantines;
use ferry_cache::{Cache, CacheError};
use ferry_crypto::MasterKey;
use ferry_pipeline::{Pipeline, PipelineConfig, PipelineError};
use ferry_wire::{AgentRegistry, Passphrase, ServerIdentity, MAX_FRAME};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The registry of agents in the state directory.
pub const REGISTRY_FILE: &str = "agents.json";

/// Errors of the process server. Each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] ferry_wire::TlsError),
    #[error(transparent)]
    Passphrase(#[from] ferry_wire::PassphraseError),
    #[error(transparent)]
    Registry(#[from] ferry_wire::RegistryError),
    #[error(transparent)]
    Job(#[from] ferry_job::JobError),
    #[error(transparent)]
    Store(#[from] ferry_store::StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// cannot listen
    #[error(
        "cannot listen on {addr}: {source}; pick another --listen address or stop what uses it"
    )]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    /// other I/O
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl ServeError {
    /// 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Job(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// What `ferry serve` serves.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// The store: a local directory (created if missing), or `azure://ACCOUNT/CONTAINER` (direct
    /// mode: a local staging store, and each point written to the page blobs and published there).
    pub store: ferry_job::StoreLocation,
    pub key_file: PathBuf,
    pub cache_dir: PathBuf,
    /// TLS identity, registration passphrase, agent registry.
    pub state_dir: PathBuf,
    /// Cache quota in bytes.
    pub cache_size: u64,
    pub pipeline: PipelineConfig,
    /// Credit window per connection, bytes (at least one maximum frame).
    pub window: u64,
    /// Points older than this are pruned (never a VM's newest), checked from the drain loop; None
    /// keeps everything.
    pub retention: Option<Duration>,
    /// `IP:PORT` of the Prometheus endpoint (`/metrics`); `None`: none.
    pub metrics_listen: Option<String>,
    /// Throttle schedules to start with when the state directory has none yet (`throttle_ingest`,
    /// `throttle_upload` of the config file); `ferry throttle` changes them from then on.
    pub initial_throttles: (Option<String>, Option<String>),
    /// The admin socket (`STATE_DIR/admin.sock`, [`admin`]): the group allowed besides root and
    /// the server's user, and what runs the commands. `None`: no socket.
    pub admin: Option<AdminSetup>,
}

/// How the admin socket runs commands (the CLI's handler) and who may use it.
#[derive(Clone)]
pub struct AdminSetup {
    /// Members of this group may use the socket (when it exists).
    pub group: String,
    pub handler: admin::Handler,
}

impl std::fmt::Debug for AdminSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSetup")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// State the connection tasks share.
pub(crate) struct Shared {
    /// The registration passphrase (reloaded when `ferry passphrase rotate` replaces it).
    pub passphrase: Mutex<Passphrase>,
    pub registry: Mutex<AgentRegistry>,
    /// The registry and VM owners on disk (shared with the operator's commands).
    pub control: control::Control,
    pub key: MasterKey,
    pub store_root: PathBuf,
    pub cache: Cache,
    pub commits: crossbeam_channel::Sender<commit::Append>,
    pub window: u64,
    pub high_watermark: u64,
    pub low_watermark: u64,
    /// See [`commit::GroupCommit::inflight`]; no credit is granted while it exceeds
    /// [`MAX_INFLIGHT`].
    pub inflight: Arc<AtomicU64>,
    /// Cache bytes above which no credit is granted because the drain is behind
    /// ([`DrainLag`]); `u64::MAX` while it is not measured or the drain is stalled.
    pub lag_limit: Arc<LagLimit>,
    /// VM name → the connection replicating it.
    pub vms: Mutex<std::collections::HashMap<String, conn::VmSlot>>,
    pub next_conn: AtomicU64,
    /// What `ferry status` shows.
    pub board: Arc<board::Board>,
    /// Authenticated connections, each holding a share of the credit pool ([`conn::fair_share`]).
    pub credit_holders: AtomicU64,
    /// What the server holds of each VM's disks (answers inventories, checks run bases).
    pub held: Arc<held::Held>,
    /// Quarantined VMs (refused until the operator releases them).
    pub quarantine: Arc<Quarantines>,
    /// Connection limits ([`limits`]).
    pub gate: Arc<limits::Gate>,
    /// Ingest throttles ([`pacer`], set from [`throttle`]).
    pub pacer: Arc<pacer::Pacer>,
    /// `ferry events`.
    pub events: events::Recorder,
    /// The replication policy (`policy.json`, re-read when it changes).
    pub policies: Arc<Mutex<policy::Policies>>,
    /// Retention where no policy sets one (`--retention`; `None`: keep everything).
    pub retention_default: Option<Duration>,
    /// Per VM: notice events left, when counted, how many held back ([`conn`]'s rate limit).
    pub notice_budget: Mutex<HashMap<String, (f64, Instant, u64)>>,
}

impl Shared {
    /// The effective policy of `vm`.
    pub(crate) fn policy_of(&self, vm: &str) -> policy::Policy {
        effective(
            &self.policies.lock().expect("policies lock"),
            vm,
            self.retention_default,
        )
    }
}

/// `vm`'s effective policy with the server's default retention (`None`: forever).
fn effective(p: &policy::Policies, vm: &str, retention: Option<Duration>) -> policy::Policy {
    p.effective(Some(vm), retention.unwrap_or(Duration::MAX))
}

/// What retention keeps of `vm`'s points.
fn rules(
    p: &policy::Policies,
    vm: &str,
    retention: Option<Duration>,
) -> ferry_apply::retention::Rules {
    let e = effective(p, vm, retention);
    ferry_apply::retention::Rules {
        retention: e.retention,
        app_retention: e.app_retention,
        thin: e.thin.iter().map(|t| (t.within, t.every)).collect(),
    }
}

/// Record bytes received but not yet durable, across all connections, above which no credit is
/// granted (memory budget; the committer catches up within one sync).
pub const MAX_INFLIGHT: u64 = 96 << 20;

/// The appliance's registration passphrase (created with the TLS identity on first use).
pub fn passphrase(state_dir: &Path) -> Result<Passphrase, ServeError> {
    Ok(identity_and_passphrase(state_dir)?.1)
}

/// The TLS identity and the registration passphrase, each created once: under `control.lock`,
/// so a first `ferry serve` and a `ferry passphrase show` racing on an empty state directory
/// agree on one identity (before, one of them failed with "File exists", or printed a passphrase
/// pinning a certificate the server then did not use).
fn identity_and_passphrase(state_dir: &Path) -> Result<(ServerIdentity, Passphrase), ServeError> {
    let _lock = control::Control::new(state_dir)
        .lock()
        .map_err(|e| ServeError::Io {
            what: "cannot lock the state directory to create the server's identity".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let identity = ServerIdentity::load_or_create(state_dir)?;
    let passphrase = Passphrase::load_or_generate(state_dir, identity.fingerprint())?;
    Ok((identity, passphrase))
}

/// Replaces the registration passphrase with a new one (`ferry passphrase rotate`): new agents need
/// it; registered agents are not affected. A running server uses it within a second.
pub fn rotate_passphrase(state_dir: &Path) -> Result<Passphrase, ServeError> {
    require_state(state_dir)?;
    let identity = ServerIdentity::load_or_create(state_dir)?;
    let c = control::Control::new(state_dir);
    let ctl = |e: control::ControlError| ServeError::Io {
        what: "cannot change the control files".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let _l = c.lock().map_err(ctl)?;
    let p = Passphrase::rotate(state_dir, identity.fingerprint())?;
    // A rotation answers a leak: unused enrollment tokens go too.
    let n = c.cancel_tokens_locked().map_err(ctl)?;
    if n > 0 {
        tracing::warn!(
            tokens = n,
            "cancelled the unused enrollment tokens with the old passphrase"
        );
    }
    Ok(p)
}

/// An existing process server state directory (its TLS identity made by a first start or
/// `ferry passphrase show`), never one to create from an operator's typo.
fn require_state(state_dir: &Path) -> Result<(), ServeError> {
    if state_dir.join(ferry_wire::IDENTITY_FILE).exists() {
        return Ok(());
    }
    Err(ServeError::Io {
        what: format!(
            "{} holds no process server identity: give the state directory `ferry serve` uses (start it once, or run `ferry passphrase show`, to create one)",
            state_dir.display()
        ),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

/// Makes a one-time enrollment token for VM `vm` (`ferry agents token`), valid for `lifetime`:
/// the token (a passphrase) and when it expires.
pub fn enrollment_token(
    state_dir: &Path,
    vm: &str,
    lifetime: Duration,
) -> Result<(Passphrase, std::time::SystemTime), ServeError> {
    require_state(state_dir)?;
    let pass = passphrase(state_dir)?;
    control::Control::new(state_dir)
        .make_token(vm, lifetime, &pass)
        .map_err(|e| ServeError::Io {
            what: "cannot make the enrollment token".into(),
            source: std::io::Error::other(e.to_string()),
        })
}

/// Runs the process server until `stop` is set (SIGINT/SIGTERM) or a fatal error.
pub fn serve(o: &ServeOptions, stop: Arc<AtomicBool>) -> Result<(), ServeError> {
    ferry_durable::create_dir_durable(&o.state_dir).map_err(|source| ServeError::Io {
        what: format!("cannot create state directory {}", o.state_dir.display()),
        source,
    })?;
    let (identity, passphrase) = identity_and_passphrase(&o.state_dir)?;
    let (recorder, event_writer) = events::Recorder::new(&o.state_dir);
    let registry = AgentRegistry::load(&o.state_dir.join(REGISTRY_FILE))?;
    let blobs = match &o.store {
        ferry_job::StoreLocation::Azure { url, .. } => Some(ferry_job::azure::connect(url)?),
        ferry_job::StoreLocation::Local(_) => None,
    };
    let store_root = o.store.local_dir();
    let store = ferry_job::open_store(&store_root, &o.key_file, true)?;
    let _lock = store.lock()?;
    if let (Some(b), ferry_job::StoreLocation::Azure { url, .. }) = (&blobs, &o.store) {
        ferry_job::identity::bind_azure(&store, b, url)?;
    }
    // After the store's lock: one server per store, so a socket that answers is another
    // server's on the same state directory, and one that does not is a dead server's.
    let _admin = match &o.admin {
        Some(a) => match admin::AdminServer::start(&o.state_dir, &a.group, a.handler.clone()) {
            Ok(s) => {
                if s.group_id().is_some() {
                    tracing::info!(socket = %s.path().display(), group = %a.group, "admin socket ready (mode 0660): operator commands reach this server through it");
                } else {
                    tracing::info!(socket = %s.path().display(), "admin socket ready (mode 0600: root and this server's user; see admin_group)");
                }
                Some(s)
            }
            Err(admin::StartError::Taken(why)) => {
                return Err(ServeError::Io {
                    what: "cannot open the admin socket".into(),
                    source: std::io::Error::other(why),
                })
            }
            // Replication does not depend on the socket: run without it, commands use the files.
            Err(admin::StartError::Failed(why)) => {
                tracing::warn!(error = %why, "no admin socket: operator commands work on the state directory's files instead");
                None
            }
        },
        None => None,
    };
    let (cache, recovery) = ferry_job::open_cache_recovering(&store, &o.cache_dir, o.cache_size)?;
    let held = Arc::new(
        held::Held::load(&store, &recovery.marks).map_err(|e| ServeError::Io {
            what: format!("cannot read what the store {} holds", store_root.display()),
            source: std::io::Error::other(e),
        })?,
    );
    let quarantine = Arc::new(
        Quarantines::load(&store_root).map_err(|source| ServeError::Io {
            what: format!(
                "cannot read the quarantine records of {}",
                store_root.display()
            ),
            source,
        })?,
    );
    for (vm, q) in quarantine.all() {
        tracing::warn!(vm, reason = %q.reason, since = %q.since, "VM is quarantined: refused until `ferry vms release {vm}`");
    }
    let writer = cache.writer()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            what: "cannot start the async runtime".into(),
            source,
        })?;
    if let Some(m) = &o.metrics_listen {
        let _in = rt.enter();
        let bound = metrics::install(m).map_err(|e| ServeError::Io {
            what: "metrics".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        tracing::info!(url = %format!("http://{bound}/metrics"), "serving Prometheus metrics");
    }
    let listener = rt
        .block_on(listen(&o.listen))
        .map_err(|source| ServeError::Listen {
            addr: o.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Io {
        what: "cannot read the listening address".into(),
        source,
    })?;
    tracing::info!(%addr, fingerprint = %identity.fingerprint(), "process server listening; `ferry passphrase show` prints the registration passphrase");
    let board = Arc::new(board::Board::new(board::ServerInfo {
        // The address bound (with port 0 in `--listen`, the port the kernel picked).
        listen: addr.to_string(),
        store: match &o.store {
            ferry_job::StoreLocation::Azure { url, .. } => url.clone(),
            ferry_job::StoreLocation::Local(p) => std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
        },
        cache_dir: std::path::absolute(&o.cache_dir).unwrap_or_else(|_| o.cache_dir.clone()),
        cache_size: o.cache_size,
        retention: o.retention,
    }));
    board.load_points(&store_root);
    recorder.record(
        events::Event::new(
            "server",
            None,
            format!(
                "process server started on {addr} (pid {})",
                std::process::id()
            ),
        )
        .with(serde_json::json!({"listen": addr.to_string(), "pid": std::process::id()})),
    );
    for (vm, q) in quarantine.all() {
        board.quarantined(&vm, Some(q.reason));
    }
    seed_throttles(&o.state_dir, &o.initial_throttles)?;
    let policies = Arc::new(Mutex::new(policy::load(&o.state_dir).map_err(|e| {
        ServeError::Io {
            what: "cannot read the replication policy".into(),
            source: std::io::Error::other(e),
        }
    })?));
    let pacer = Arc::new(pacer::Pacer::default());
    // The throttles in effect from the start (a bad file stops the start: the operator meant
    // something by it).
    let mut throttles = Throttling::new(
        &o.state_dir,
        pacer.clone(),
        blobs.as_ref().map(|b| b.throttle().clone()),
        recorder.clone(),
    )?;
    throttles.apply();
    let (tx, rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        registry: Mutex::new(registry),
        passphrase: Mutex::new(passphrase),
        control: control::Control::new(&o.state_dir),
        key: store.key().clone(),
        store_root: store_root.clone(),
        cache: cache.clone(),
        commits: tx,
        window: o.window.max(MAX_FRAME),
        high_watermark: o.cache_size / 10 * 8,
        low_watermark: o.cache_size / 10 * 6,
        inflight: Arc::new(AtomicU64::new(0)),
        lag_limit: Arc::new(LagLimit::default()),
        vms: Mutex::new(Default::default()),
        next_conn: AtomicU64::new(0),
        credit_holders: AtomicU64::new(0),
        board: board.clone(),
        held: held.clone(),
        quarantine: quarantine.clone(),
        gate: Default::default(),
        pacer: pacer.clone(),
        events: recorder.clone(),
        policies: policies.clone(),
        retention_default: o.retention,
        notice_budget: Default::default(),
    });
    let acceptor = TlsAcceptor::from(identity.server_config()?);

    let status_path = o.state_dir.join(status::STATUS_FILE);
    let failed: Mutex<Option<ServeError>> = Mutex::new(None);
    let fail = |e: ServeError| {
        tracing::error!(error = %e, "process server stopping");
        failed.lock().expect("failed lock").get_or_insert(e);
        stop.store(true, Ordering::Relaxed);
    };
    let finished = AtomicBool::new(false);
    let drained = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        let (store, cache, stop) = (&store, &cache, &stop);
        let drain = Drain {
            store,
            cache,
            cfg: PipelineConfig {
                quarantine: Some(quarantine.clone()),
                ..o.pipeline.clone()
            },
            blobs,
            retention: o.retention,
            policies: policies.clone(),
            drained: drained.clone(),
            lag: DrainLag::new(shared.lag_limit.clone()),
            board: &board,
            held: &held,
            quarantine: &quarantine,
            events: recorder.clone(),
            shared: Arc::downgrade(&shared),
        };
        let pipe = named(s, "ferry-drain", move || drain.run(stop));
        let group = commit::GroupCommit {
            window: Duration::from_millis(3),
            max_bytes: 16 << 20,
            inflight: shared.inflight.clone(),
        };
        // A failed sync stops the whole server: nothing after it may be acknowledged, and what
        // connections hold in memory must not outlive what the cache holds.
        let committer = named(s, "ferry-cache-sync", move || {
            let r = commit::run(writer, rx, group);
            if r.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            r
        });
        let (board, finished, status_path) = (&board, &finished, &status_path);
        let pacer = &pacer;
        let health = health::Health::new(
            policies.clone(),
            o.retention,
            o.cache_dir.clone(),
            drained.clone(),
            recorder.clone(),
            store_root.clone(),
        );
        s.spawn(move || status_loop(board, cache, pacer, health, status_path, finished));
        // Weak: the committer ends when the last sender of its channel (in `Shared`) is gone.
        let watched = Arc::downgrade(&shared);
        s.spawn(move || conn::watch_control(&watched, finished));
        s.spawn(move || throttles.run(finished));
        s.spawn(move || event_writer.run(finished));
        let watched = Arc::downgrade(&shared);
        let state_dir = o.state_dir.clone();
        s.spawn(move || watch_policy(&watched, &state_dir, finished));
        rt.block_on(accept_loop(listener, acceptor, shared, stop));
        // Connections still open are dropped with the runtime; their unacked records are the
        // agents' to send again.
        rt.shutdown_timeout(Duration::from_secs(2));
        if let Err(e) = committer.join().expect("committer thread panicked") {
            fail(e.into());
        }
        cache.close();
        if let Err(e) = pipe.join().expect("pipeline thread panicked") {
            fail(e.into());
        }
        finished.store(true, Ordering::Relaxed);
    });
    // The last word: not running, with the points the final drain committed.
    if let Err(e) = status::write_status(&status_path, &board.snapshot(false, cache.used_bytes())) {
        tracing::warn!(file = %status_path.display(), error = %e, "cannot write the status file");
    }
    let failure = failed
        .lock()
        .expect("failed lock")
        .as_ref()
        .map(|e| e.to_string());
    events::record(
        &o.state_dir,
        events::Event::new(
            "server",
            None,
            match &failure {
                None => "process server stopped".to_string(),
                Some(e) => format!("process server stopped on an error: {e}"),
            },
        ),
    );
    match failed.into_inner().expect("failed lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Listens on the first address `addr` resolves to that binds, with a long accept queue (the
/// kernel caps it at `net.core.somaxconn`): hundreds of agents reconnecting at once after a restart
/// are queued, not dropped.
async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let s = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        match s.bind(a).and_then(|()| s.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// See [`listen`].
const LISTEN_BACKLOG: u32 = 4096;

/// Re-reads `policy.json` when it changes: the new policy applies to retention at its next check,
/// and each connected agent whose cut intervals change is told them at once.
fn watch_policy(shared: &std::sync::Weak<Shared>, state_dir: &Path, finished: &AtomicBool) {
    let mut stamp = policy::stamp(state_dir);
    let mut failing = false;
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(control::WATCH_EVERY);
        let now = policy::stamp(state_dir);
        if now == stamp {
            continue;
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let new = match policy::load(state_dir) {
            Ok(p) => p,
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "cannot read the replication policy; keeping the one in effect");
                    failing = true;
                }
                continue;
            }
        };
        failing = false;
        stamp = now;
        let old = std::mem::replace(
            &mut *shared.policies.lock().expect("policies lock"),
            new.clone(),
        );
        tracing::info!("replication policy changed (ferry policy set)");
        shared.events.record(events::Event::new(
            "policy",
            None,
            "the running server applies the changed replication policy",
        ));
        let vms = shared.vms.lock().expect("vms lock");
        for (vm, slot) in vms.iter() {
            let before = effective(&old, vm, shared.retention_default).wire();
            let after = effective(&new, vm, shared.retention_default).wire();
            if before != after {
                let _ = slot.ctl.send(ferry_wire::Message::Policy {
                    crash_every_ms: after.0,
                    app_every_ms: after.1,
                });
            }
        }
    }
}

/// Writes the config file's throttles as the first `throttle.json` (none there yet).
fn seed_throttles(
    state_dir: &Path,
    (ingest, upload): &(Option<String>, Option<String>),
) -> Result<(), ServeError> {
    if (ingest.is_none() && upload.is_none()) || state_dir.join(throttle::THROTTLE_FILE).exists() {
        return Ok(());
    }
    let bad = |e: String| ServeError::Io {
        what: "config file throttles".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    };
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut sched = Vec::new();
    for (link, spec) in [
        (throttle::Link::Ingest, ingest),
        (throttle::Link::Upload, upload),
    ] {
        if let Some(spec) = spec {
            let s = throttle::Schedule::parse(spec)
                .map_err(|e| bad(format!("throttle_{link}: {e}")))?;
            sched.push((link, s));
        }
    }
    throttle::update(state_dir, |t| {
        for (link, s) in &sched {
            t.set(*link, None, s, now.clone());
        }
        Ok(())
    })
    .map_err(bad)?;
    tracing::info!(
        "throttles set from the config file (from now on `ferry throttle` changes them)"
    );
    Ok(())
}

/// Applies `throttle.json` to the ingest pacer and the upload throttle: re-read when it changes,
/// schedules evaluated against the local clock every [`throttle::EVALUATE_EVERY`].
struct Throttling {
    state_dir: PathBuf,
    pacer: Arc<pacer::Pacer>,
    upload: Option<Arc<ferry_azure::Throttle>>,
    settings: throttle::Throttles,
    stamp: Option<(u64, u64, i64, i64)>,
    /// What was applied last, to log changes once.
    applied: Option<Applied>,
    events: events::Recorder,
}

/// Ingest rate, upload rate, and each VM's own rate and weight.
type Applied = (Option<u64>, Option<u64>, Vec<(String, Option<u64>, u32)>);

impl Throttling {
    fn new(
        state_dir: &Path,
        pacer: Arc<pacer::Pacer>,
        upload: Option<Arc<ferry_azure::Throttle>>,
        events: events::Recorder,
    ) -> Result<Self, ServeError> {
        let stamp = throttle::stamp(state_dir);
        let settings = throttle::load(state_dir).map_err(|e| ServeError::Io {
            what: "cannot read the throttles".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Throttling {
            state_dir: state_dir.to_owned(),
            pacer,
            upload,
            settings,
            stamp,
            applied: None,
            events,
        })
    }

    /// Evaluates every schedule now and applies the rates.
    fn apply(&mut self) {
        let now = jiff::Zoned::now();
        let rate = |s: Option<throttle::Schedule>| s.and_then(|s| s.at_time(&now).0.bytes());
        let t = &self.settings;
        let ingest = rate(t.schedule(throttle::Link::Ingest, None));
        let upload = rate(t.schedule(throttle::Link::Upload, None));
        let mut vms: HashMap<String, (Option<u64>, u32)> = HashMap::new();
        for vm in t.ingest.vms.keys().chain(t.weights.keys()) {
            vms.insert(
                vm.clone(),
                (
                    rate(t.schedule(throttle::Link::Ingest, Some(vm))),
                    t.weight(vm),
                ),
            );
        }
        self.pacer.set(ingest, &vms);
        if let Some(u) = &self.upload {
            u.set_rate(upload.map(|b| ferry_azure::RateLimit {
                bytes_per_sec: b,
                one_time_burst: 0,
            }));
        }
        let mut list: Vec<(String, Option<u64>, u32)> =
            vms.into_iter().map(|(vm, (r, w))| (vm, r, w)).collect();
        list.sort();
        let now_applied = (ingest, upload, list);
        metrics::throttles(now_applied.0, now_applied.1, &now_applied.2);
        // A VM whose own throttle went: its gauge says unlimited, not the old rate.
        if let Some(old) = &self.applied {
            for (vm, _, _) in &old.2 {
                if !now_applied.2.iter().any(|(v, _, _)| v == vm) {
                    metrics::throttles(now_applied.0, now_applied.1, &[(vm.clone(), None, 1)]);
                }
            }
        }
        if self.applied.as_ref() != Some(&now_applied) {
            let show = |r: Option<u64>| r.map_or("unlimited".to_string(), throttle::human_rate);
            let vms: Vec<String> = now_applied
                .2
                .iter()
                .map(|(vm, r, w)| format!("{vm}={} weight {w}", show(*r)))
                .collect();
            tracing::info!(
                ingest = %show(now_applied.0),
                upload = %show(now_applied.1),
                vms = %vms.join(", "),
                "throttles in effect"
            );
            let mut msg = format!(
                "throttles in effect: ingest {}, upload {}",
                show(now_applied.0),
                show(now_applied.1)
            );
            if !vms.is_empty() {
                msg.push_str(&format!("; per VM: {}", vms.join(", ")));
            }
            self.events.record(
                events::Event::new("throttle", None, msg).with(serde_json::json!({
                    "ingest_bytes_per_second": now_applied.0,
                    "upload_bytes_per_second": now_applied.1,
                })),
            );
            self.applied = Some(now_applied);
        }
    }

    fn run(&mut self, finished: &AtomicBool) {
        let mut failing = false;
        while !finished.load(Ordering::Relaxed) {
            let stamp = throttle::stamp(&self.state_dir);
            if stamp != self.stamp {
                match throttle::load(&self.state_dir) {
                    Ok(t) => {
                        self.settings = t;
                        self.stamp = stamp;
                        failing = false;
                    }
                    Err(e) if !failing => {
                        tracing::error!(error = %e, "cannot read the throttles; keeping the ones in effect");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
            self.apply();
            std::thread::sleep(throttle::EVALUATE_EVERY);
        }
    }
}

/// Rewrites the status file every [`status::WRITE_EVERY`] until `finished`.
fn status_loop(
    board: &board::Board,
    cache: &Cache,
    pacer: &pacer::Pacer,
    mut health: health::Health,
    path: &Path,
    finished: &AtomicBool,
) {
    let mut failing = false;
    while !finished.load(Ordering::Relaxed) {
        let mut snap = board.snapshot(true, cache.used_bytes());
        let paces = pacer.snapshot();
        for v in &mut snap.vms {
            if let Some(p) = paces.get(&v.vm) {
                v.throttled = p.throttled;
                v.ingest_limit_bytes_per_second = p.cap;
                if p.throttled && v.state == "replicating" {
                    v.state = "throttled".into();
                }
                if p.throttled && v.protection == "protected" {
                    v.protection = "throttled".into();
                }
            }
        }
        health.evaluate(&mut snap);
        metrics::publish(&snap, std::time::SystemTime::now());
        match status::write_status(path, &snap) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                // Once per failure streak: `ferry status` then reports the server as stopped.
                tracing::warn!(file = %path.display(), error = %e, "cannot write the status file");
                failing = true;
            }
            Err(_) => {}
        }
        let next = Instant::now() + status::WRITE_EVERY;
        while Instant::now() < next && !finished.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The drain loop: drains the cache into the store, tells the board about each committed point,
/// and applies retention.
struct Drain<'a> {
    store: &'a ferry_store::LocalStore,
    cache: &'a Cache,
    cfg: PipelineConfig,
    blobs: Option<ferry_azure::AzureBlobs>,
    retention: Option<Duration>,
    policies: Arc<Mutex<policy::Policies>>,
    /// Chunk bytes the drain took from the cache (for the health's drain rate).
    drained: Arc<AtomicU64>,
    /// Keeps what the server acknowledges within a few seconds of what the drain commits.
    lag: DrainLag,
    board: &'a board::Board,
    held: &'a held::Held,
    quarantine: &'a Quarantines,
    events: events::Recorder,
    /// For the committer barrier of a release (weak: the committer ends when `Shared` goes).
    shared: std::sync::Weak<Shared>,
}

impl<'a> Drain<'a> {
    /// A pipeline that finishes whatever the journal holds past each disk's applied position.
    fn pipeline(&self) -> Result<Pipeline<'a>, PipelineError> {
        let target = self.blobs.clone().map(|b| {
            Box::new(ferry_job::azure::AzureTarget::new(
                b,
                self.store.key().id().to_string(),
            )) as Box<dyn ferry_apply::ReplicaTarget>
        });
        let mut p = Pipeline::with(self.store, self.cfg.clone(), target, None)?;
        // Agents write without pause: points must still reach the board within a second.
        p.set_turn(Some(ferry_pipeline::DRAIN_TURN));
        self.committed(&mut p);
        Ok(p)
    }

    /// The applier logs each point it commits; the board shows it, and each VM quarantined.
    fn committed(&self, p: &mut Pipeline<'_>) {
        for c in p.take_committed() {
            self.board.point(&c.vm, &c.point);
            metrics::point(&c.vm, &c.point.kind);
        }
        for q in self.quarantine.take_new() {
            self.events.record(events::Event::new(
                "quarantine",
                Some(&q.vm),
                format!(
                    "quarantined: {}; fix the cause, then `ferry vms release {}`",
                    q.reason, q.vm
                ),
            ));
            self.board.quarantined(&q.vm, Some(q.reason));
        }
    }

    /// Releases the quarantined VMs whose release the operator asked for, once the cache holds no
    /// record of theirs: the applier voids the VM's uncommitted journal, what the server holds of
    /// it is read again from the store, and only then is the VM accepted again. No record of a
    /// quarantined VM is handed to the committer any more (conn.rs checks under the VMs lock), so
    /// a barrier through the committer, then the cache's durable position, bound everything of
    /// the VM there is. `releasing`: VM → (that position, the last error logged). A failure is
    /// logged once per distinct error and tried again: a release must not stop the server.
    fn releases(&self, p: &mut Pipeline<'_>, releasing: &mut HashMap<String, (u64, String)>) {
        for vm in self.quarantine.releases_requested() {
            if !releasing.contains_key(&vm) {
                let Some(shared) = self.shared.upgrade() else {
                    return; // stopping
                };
                if !conn::commit_barrier_blocking(&shared) {
                    return;
                }
                releasing.insert(vm.clone(), (self.cache.durable_seq(), String::new()));
            }
            let (through, last_error) = releasing.get_mut(&vm).expect("inserted");
            if self.cache.consumed_seq() < *through {
                continue;
            }
            let r = p
                .applier()
                .release(&vm)
                .map_err(|e| e.to_string())
                .and_then(|()| self.held.reseed(self.store, &vm))
                .and_then(|()| self.quarantine.remove(&vm).map_err(|e| e.to_string()));
            match r {
                Ok(()) => {
                    releasing.remove(&vm);
                    self.board.quarantined(&vm, None);
                    self.events.record(events::Event::new(
                        "quarantine",
                        Some(&vm),
                        "released from quarantine: the agent is accepted again and resyncs what the newest point does not hold",
                    ));
                }
                Err(e) if e != *last_error => {
                    tracing::error!(vm, error = %e, "cannot release the VM from quarantine; trying again at each check (logged again only if the error changes)");
                    *last_error = e;
                }
                Err(_) => {}
            }
        }
    }

    /// Whether a VM whose migration the operator completed is ready to have its data removed:
    /// its connection is closed (no new one is accepted: conn.rs checks the lifecycle record),
    /// then a barrier through the committer and the cache's durable position bound everything of
    /// it there is, and the drain has consumed that far (its last records are applied: removing
    /// the data under a record still to come would leave that record's chunks behind).
    /// `retiring`: VM → (that position, the last error logged).
    fn retirements_due(&self, retiring: &mut HashMap<String, (u64, String)>) -> bool {
        let wanted = ferry_apply::lifecycle::retiring(self.store.root());
        retiring.retain(|vm, _| wanted.contains(vm));
        if wanted.is_empty() {
            return false;
        }
        let Some(shared) = self.shared.upgrade() else {
            return false; // stopping
        };
        let mut due = false;
        for vm in wanted {
            // A connection that claimed the VM just before its record was written: closed, and
            // the wait starts again (nothing of it reaches the committer once its slot is gone).
            let slot = shared.vms.lock().expect("vms lock").remove(&vm);
            if let Some(slot) = &slot {
                let _ = slot.cancel.send(Some(conn::Kill::Retired));
            }
            if slot.is_some() || !retiring.contains_key(&vm) {
                if !conn::commit_barrier_blocking(&shared) {
                    return false;
                }
                retiring.insert(vm.clone(), (self.cache.durable_seq(), String::new()));
            }
            due |= self.cache.consumed_seq() >= retiring[&vm].0;
        }
        due
    }

    /// Removes the replication data of every VM [`Self::retirements_due`] found ready. A
    /// failure is logged once per distinct error and tried again: it must not stop the server.
    fn retire(&self, retiring: &mut HashMap<String, (u64, String)>) {
        let ready: Vec<String> = retiring
            .iter()
            .filter(|(_, (through, _))| self.cache.consumed_seq() >= *through)
            .map(|(vm, _)| vm.clone())
            .collect();
        for vm in ready {
            // An Azure store: the container's data of the VM first (its manifest, then its page
            // blobs, segments and pins), then the staging store's, which records the VM retired.
            let azure = match &self.blobs {
                Some(b) => match ferry_job::azure::remove_vm(b, &vm) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        let e = e.to_string();
                        let last = &mut retiring.get_mut(&vm).expect("listed").1;
                        if *last != e {
                            tracing::error!(vm, error = %e, "cannot delete the retired VM's blobs; trying again at each check (logged again only if the error changes)");
                            *last = e;
                        }
                        continue;
                    }
                },
                None => None,
            };
            match ferry_apply::lifecycle::retire(self.store, &vm) {
                Ok(r) => {
                    retiring.remove(&vm);
                    if let Err(e) = self.held.reseed(self.store, &vm) {
                        tracing::warn!(vm, error = %e, "cannot forget what the server held of the retired VM");
                    }
                    self.board.forget(&vm);
                    self.events.record(
                        events::Event::new(
                            "migration",
                            Some(&vm),
                            format!(
                                "migration completed: replication ended, {} point(s), {} replica(s) and {} journal segment(s) removed{}; the agent is refused from now on",
                                azure.as_ref().map_or(r.points, |a| (a.points as u64).max(r.points)),
                                azure.as_ref().map_or(r.disks.len(), |a| a.replicas),
                                r.segments,
                                if r.segments_kept > 0 {
                                    format!(" ({} kept: other VMs' data uses them)", r.segments_kept)
                                } else {
                                    String::new()
                                }
                            ),
                        )
                        .with(serde_json::json!({"removed": r, "azure": azure})),
                    );
                }
                Err(e) => {
                    let e = e.to_string();
                    let last = &mut retiring.get_mut(&vm).expect("listed").1;
                    if *last != e {
                        tracing::error!(vm, error = %e, "cannot remove the retired VM's data; trying again at each check (logged again only if the error changes)");
                        *last = e;
                    }
                }
            }
        }
    }

    /// Drains until the cache is closed.
    fn run(mut self, stop: &AtomicBool) -> Result<(), PipelineError> {
        let r = (|| {
            let mut p = self.pipeline()?;
            let mut reader = self.cache.reader();
            let mut next_check = Instant::now();
            let mut next_release = Instant::now();
            let mut releasing = HashMap::new();
            let mut retiring = HashMap::new();
            let mut counted = Default::default();
            let mut next_metrics = Instant::now();
            loop {
                p.drain(self.cache, &mut reader, true)?;
                self.committed(&mut p);
                if Instant::now() >= next_metrics {
                    next_metrics = Instant::now() + Duration::from_secs(1);
                    let took = metrics::pipeline(&p.stats, &mut counted);
                    self.drained.fetch_add(took, Ordering::Relaxed);
                    self.lag.observe(took, self.cache.used_bytes());
                    // A policy change that shortens the retention checks applies now, not after
                    // the longer wait it replaced.
                    next_check = next_check.min(Instant::now() + self.check_every());
                    if let Some(b) = &self.blobs {
                        metrics::upload(&b.stats());
                    }
                }
                if Instant::now() >= next_release {
                    next_release = Instant::now() + control::WATCH_EVERY;
                    self.releases(&mut p, &mut releasing);
                    if self.retirements_due(&mut retiring) {
                        // As for retention: no applier alive while a VM's data goes.
                        drop(p);
                        self.retire(&mut retiring);
                        p = self.pipeline()?;
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    // Take what the committer still makes durable, until it closes the cache.
                    p.drain(self.cache, &mut reader, false)?;
                    self.committed(&mut p);
                    return Ok(());
                }
                if Instant::now() >= next_check {
                    next_check = Instant::now() + self.check_every();
                    if self.any_expired()? {
                        // The applier caches manifests and replicas: prune with no applier alive (as
                        // `replicate` does between runs), then start a new one, which replays any
                        // open run from the journal exactly as after a restart.
                        drop(p);
                        self.prune();
                        p = self.pipeline()?;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })();
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        r
    }

    /// How often retention is checked: a quarter of the shortest retention or thinning bucket
    /// any policy sets, between [`RETENTION_CHECK_MIN`] and [`RETENTION_CHECK_MAX`].
    fn check_every(&self) -> Duration {
        let p = self.policies.lock().expect("policies lock");
        let mut shortest = self.retention.unwrap_or(RETENTION_CHECK_MAX * 4);
        let vms: Vec<Option<&str>> = std::iter::once(None)
            .chain(p.vms.keys().map(|v| Some(v.as_str())))
            .collect();
        for vm in vms {
            let e = p.effective(vm, self.retention.unwrap_or(Duration::MAX));
            shortest = shortest.min(e.retention).min(e.app_retention);
            for t in &e.thin {
                shortest = shortest.min(t.every.unwrap_or(t.within));
            }
        }
        (shortest / 4).clamp(RETENTION_CHECK_MIN, RETENTION_CHECK_MAX)
    }

    fn rules_of(&self, vm: &str) -> ferry_apply::retention::Rules {
        rules(
            &self.policies.lock().expect("policies lock"),
            vm,
            self.retention,
        )
    }

    /// Whether the policy removes some point of some VM now.
    fn any_expired(&self) -> Result<bool, PipelineError> {
        let now = std::time::SystemTime::now();
        let pins = ferry_store::readers::live_pins(self.store.root())?;
        for vm in ferry_store::list_vms_at(self.store.root())? {
            // A quarantined VM's manifest may be what rotted: it is skipped, not fatal.
            if self.quarantine.contains(&vm) {
                continue;
            }
            if let Some(m) = self.store.load_manifest(&vm)? {
                let pin = pins.get(&vm).copied();
                if !ferry_apply::retention::plan(&m, &self.rules_of(&vm), now, pin).is_empty() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Prunes what the policy removes and the segments only those points needed. A failure is
    /// logged and tried again at the next check: retention must not stop ingest.
    fn prune(&self) {
        let rules = |vm: &str| self.rules_of(vm);
        let r = match &self.blobs {
            None => ferry_apply::retention::prune_with(self.store, &rules, &mut |_, _, _| Ok(true))
                .map_err(|e| e.to_string()),
            Some(b) => {
                ferry_job::azure::prune_by(self.store, b, &rules, false).map_err(|e| e.to_string())
            }
        };
        match r {
            Ok(p) => {
                tracing::info!(
                    points = p.points.len(),
                    segments = p.segments,
                    segment_bytes = p.segment_bytes,
                    "retention pruned expired points"
                );
                let mut by_vm: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
                for (vm, id) in &p.points {
                    by_vm.entry(vm).or_default().push(id);
                }
                for (vm, ids) in by_vm {
                    self.events.record(
                        events::Event::new(
                            "prune",
                            Some(vm),
                            format!(
                                "retention pruned {} point(s): {}",
                                ids.len(),
                                ids.join(", ")
                            ),
                        )
                        .with(serde_json::json!({"points": ids})),
                    );
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "retention failed; trying again at the next check")
            }
        }
    }
}

/// Spawns a scoped thread with a name (profiles and `top -H` tell the server's threads apart).
fn named<'scope, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn_scoped(s, f)
        .expect("cannot start a server thread")
}

/// Seconds of the drain's own rate the cache may hold before credit stops: what the server
/// acknowledges stays this close to what it commits (the points' lag and the drain tail after
/// the agents stop), instead of the cache filling at the ingest rate whenever ingest outruns the
/// drain (on a small appliance they share the CPU and the disk).
pub const DRAIN_LAG: Duration = Duration::from_secs(1);
/// The least backlog [`DRAIN_LAG`] allows, whatever the rate: a few cache files.
pub const DRAIN_LAG_FLOOR: u64 = 256 << 20;
/// Seconds without any drain progress (or without the drain renewing its limit at all) after which
/// the drain counts as stalled (a store outage): the cache then absorbs what the agents send, up
/// to its high watermark, as it is meant to.
pub const DRAIN_STALL: u32 = 10;

/// The cache backlog above which credit stops because the drain is behind ([`DrainLag`]), with
/// when the drain last set it: a limit the drain has not renewed for [`DRAIN_STALL`] seconds
/// (the drain blocked in a slow or failing store, a long prune) no longer applies, so the cache
/// absorbs what the agents send, up to its high watermark.
pub struct LagLimit {
    limit: AtomicU64,
    set_at: std::sync::Mutex<Instant>,
}

impl Default for LagLimit {
    /// [`DRAIN_LAG_FLOOR`] until the drain has measured its rate (and, like any limit, lifted
    /// if the drain never renews it).
    fn default() -> Self {
        LagLimit {
            limit: AtomicU64::new(DRAIN_LAG_FLOOR),
            set_at: std::sync::Mutex::new(Instant::now()),
        }
    }
}

impl LagLimit {
    fn set(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
        *self.set_at.lock().expect("lag limit lock") = Instant::now();
    }

    /// The limit in effect: `u64::MAX` when none, or when the drain has not renewed it lately.
    pub fn current(&self) -> u64 {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == u64::MAX
            || self
                .set_at
                .lock()
                .expect("lag limit lock")
                .elapsed()
                .as_secs()
                >= u64::from(DRAIN_STALL)
        {
            return u64::MAX;
        }
        limit
    }
}

/// The drain's rate (an average over a few seconds) and the backlog limit it implies, published
/// in [`Shared::lag_limit`] for the connections' credit decisions.
struct DrainLag {
    limit: Arc<LagLimit>,
    /// Bytes per second, smoothed.
    rate: f64,
    /// Consecutive observations without progress while the cache held a backlog.
    idle: u32,
    lagging: bool,
    /// The limit is lifted because the drain made no progress (logged once).
    stalled: bool,
    last: Instant,
}

impl DrainLag {
    fn new(limit: Arc<LagLimit>) -> Self {
        DrainLag {
            limit,
            rate: 0.0,
            idle: 0,
            lagging: false,
            stalled: false,
            last: Instant::now(),
        }
    }

    /// One observation, about a second after the last: `took` bytes drained since, `used` cache
    /// bytes now.
    fn observe(&mut self, took: u64, used: u64) {
        let secs = self.last.elapsed().as_secs_f64().max(0.05);
        self.last = Instant::now();
        let rate = took as f64 / secs;
        if took > 0 {
            self.idle = 0;
            self.rate = if self.rate == 0.0 {
                rate
            } else {
                0.7 * self.rate + 0.3 * rate
            };
        } else if used > DRAIN_LAG_FLOOR {
            self.idle = self.idle.saturating_add(secs.round().max(1.0) as u32);
        }
        let stalled = self.idle >= DRAIN_STALL;
        if stalled != self.stalled {
            self.stalled = stalled;
            if stalled {
                tracing::warn!(
                    backlog = used,
                    "no drain progress for {DRAIN_STALL}s: credit no longer waits for the drain; the cache absorbs what agents send, up to its high watermark"
                );
            } else {
                tracing::info!(
                    backlog = used,
                    "the drain is moving again: credit follows it"
                );
            }
        }
        let limit = if stalled {
            u64::MAX
        } else {
            ((self.rate * DRAIN_LAG.as_secs_f64()) as u64).max(DRAIN_LAG_FLOOR)
        };
        self.limit.set(limit);
        let lagging = used >= limit && !stalled;
        if lagging != self.lagging {
            self.lagging = lagging;
            if lagging {
                tracing::info!(
                    backlog = used,
                    drain_rate = self.rate as u64,
                    "the drain is behind by over {}s: holding credit back until it catches up",
                    DRAIN_LAG.as_secs()
                );
            } else {
                tracing::info!(backlog = used, "the drain caught up: granting credit again");
            }
        }
    }
}

/// How often the drain loop checks for expired points: a quarter of the retention window, within
/// these bounds.
const RETENTION_CHECK_MIN: Duration = Duration::from_secs(1);
const RETENTION_CHECK_MAX: Duration = Duration::from_secs(60);

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    stop: &AtomicBool,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (tcp, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Over the pre-auth limits: closed at once, before any TLS work.
                let slot = match shared.gate.pre_auth(peer.ip()) {
                    Ok(s) => s,
                    Err(full) => {
                        if let Some(held) = shared.gate.noisy.allow() {
                            tracing::warn!(%peer, ?full, held_back = held, "refused connection: too many connections are still authenticating (limits: {} in all, {} per address)", limits::MAX_PRE_AUTH, limits::MAX_PRE_AUTH_PER_ADDR);
                        }
                        drop(tcp);
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, shared) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let peer: SocketAddr = peer;
                    let deadline = tokio::time::Instant::now() + limits::HANDSHAKE_DEADLINE;
                    let tls = tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await;
                    match tls {
                        Ok(Ok(tls)) => match ferry_wire::agentkey::tls_binding(tls.get_ref().1) {
                            Ok(binding) => conn::serve(shared, tls, peer.to_string(), slot, (deadline, binding)).await,
                            Err(e) => tracing::warn!(%peer, error = %e, "refused connection: cannot derive the TLS session binding"),
                        },
                        Ok(Err(e)) => {
                            if let Some(held) = shared.gate.noisy.allow() {
                                tracing::warn!(%peer, error = %e, held_back = held, "refused connection: TLS handshake failed (not a Ferry agent, or not TLS 1.3)");
                            }
                        }
                        Err(_) => {
                            if let Some(held) = shared.gate.noisy.allow() {
                                tracing::warn!(%peer, held_back = held, "refused connection: no TLS handshake within {:?}", limits::HANDSHAKE_DEADLINE);
                            }
                        }
                    }
                });
            }
            _ = tick.tick() => {
                if stop.load(Ordering::Relaxed) {
                    tracing::info!("stopping: no new connections");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod first_start {
    /// Many first starts at once on an empty state directory (a `ferry serve` and `ferry
    /// passphrase show`s) all succeed and agree on one identity and one passphrase.
    #[test]
    fn racing_first_starts_agree_on_one_identity() {
        for _ in 0..5 {
            let d = tempfile::tempdir().unwrap();
            let dir = d.path().join("state");
            let got: Vec<String> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| super::passphrase(&dir).map(|p| p.to_string())))
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap().expect("a racing first start failed"))
                    .collect()
            });
            assert!(got.windows(2).all(|w| w[0] == w[1]), "{got:?}");
            let id = ferry_wire::ServerIdentity::load(&dir).unwrap();
            let p: ferry_wire::Passphrase = got[0].parse().unwrap();
            assert_eq!(p.fingerprint, id.fingerprint());
        }
    }
}

#[cfg(test)]
mod drain_lag {
    use super::*;

    /// The drain's limit follows its rate, lifts when the drain makes no progress, and lifts
    /// when the drain stops renewing it (blocked in a slow store): credit never waits on a
    /// drain that cannot move.
    #[test]
    fn the_lag_limit_follows_the_drain_and_lifts_when_it_stalls() {
        let limit = Arc::new(LagLimit::default());
        assert_eq!(
            limit.current(),
            DRAIN_LAG_FLOOR,
            "the floor until the drain measured"
        );
        let mut lag = DrainLag::new(limit.clone());
        let ago = |s: u64| Instant::now() - Duration::from_secs(s);
        // One observation, `secs` after the last.
        let step = |lag: &mut DrainLag, secs: u64, took: u64, used: u64| {
            lag.last = ago(secs);
            lag.observe(took, used);
        };
        // 2 GiB drained over 4 s: 512 MiB/s, so about DRAIN_LAG of that.
        step(&mut lag, 4, 2 << 30, 4 << 30);
        let l = limit.current();
        let want = (512u64 << 20) as f64 * DRAIN_LAG.as_secs_f64();
        assert!(
            (l as f64 - want).abs() < want * 0.05,
            "{l} for a rate of 512 MiB/s (want ~{want})"
        );
        // A slow drain: the floor.
        for _ in 0..12 {
            step(&mut lag, 1, 1 << 20, 4 << 30);
        }
        assert_eq!(limit.current(), DRAIN_LAG_FLOOR, "at least the floor");
        // No progress with a backlog: a 5 s gap counts 5 idle seconds; stalled at DRAIN_STALL.
        step(&mut lag, 5, 0, 4 << 30);
        assert_ne!(limit.current(), u64::MAX, "5 idle seconds");
        for _ in 5..DRAIN_STALL - 1 {
            step(&mut lag, 1, 0, 4 << 30);
        }
        assert_ne!(
            limit.current(),
            u64::MAX,
            "{} idle seconds",
            DRAIN_STALL - 1
        );
        step(&mut lag, 1, 0, 4 << 30);
        assert_eq!(
            limit.current(),
            u64::MAX,
            "a stalled drain does not hold credit"
        );
        // Progress again: limited again.
        step(&mut lag, 1, 1 << 30, 4 << 30);
        assert_ne!(limit.current(), u64::MAX);
        // The drain blocked (no observation at all) for DRAIN_STALL seconds: lifted ...
        *limit.set_at.lock().unwrap() = ago(u64::from(DRAIN_STALL) + 1);
        assert_eq!(
            limit.current(),
            u64::MAX,
            "a limit the drain stopped renewing"
        );
        // ... and each observation renews it.
        step(&mut lag, 1, 1 << 30, 4 << 30);
        assert_ne!(limit.current(), u64::MAX, "renewed by the next observation");
    }
}
