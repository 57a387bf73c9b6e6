//! The process server's commands: `serve` (flags over the config file over defaults), `status`
//! and `passphrase show`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ferry_job::{JobError, StoreLocation};

use crate::{config, init_logging, parse_store, status, threads, units, KeyArgs};

#[derive(Args)]
pub(crate) struct ConfigArg {
    /// Configuration file (TOML; see docs/CONFIGURATION.md). Default: /etc/ferry/ferry.toml as
    /// root, else ~/.config/ferry/ferry.toml, used only if it exists.
    #[arg(long, env = "FERRY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    pub fn load(&self) -> Result<config::Loaded, JobError> {
        config::load(self.config.as_deref()).map_err(JobError::Usage)
    }
}

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// The process server's state directory (as given to `ferry serve`). Default: state_dir of
    /// the config file's [serve] table, else STATE_ROOT/server.
    #[arg(long, env = "FERRY_SERVER_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Read the last points from this store's manifests. Default: the store the server's status
    /// file names, else store of the config file's [serve] table.
    #[arg(long, value_parser = parse_store)]
    pub(crate) store: Option<StoreLocation>,
    /// One JSON object on stdout (fields in docs/OPERATIONS.md).
    #[arg(long)]
    json: bool,
    /// Show it again every --interval until Ctrl-C (with --json: one object per interval).
    #[arg(long)]
    pub(crate) watch: bool,
    /// How often --watch refreshes.
    #[arg(long, default_value = "2s", value_parser = units::parse_interval)]
    pub(crate) interval: std::time::Duration,
    #[command(flatten)]
    pub(crate) config: ConfigArg,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Address to listen on, HOST:PORT (port 0: one the kernel picks; the log and `ferry status`
    /// show the address bound). [default: 0.0.0.0:7443]
    #[arg(long)]
    listen: Option<String>,
    /// The store: a directory (created if missing or empty), or azure://ACCOUNT/CONTAINER (direct
    /// mode; credentials as for `replicate`). Required, here or in the config file.
    #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
    store: Option<StoreLocation>,
    #[command(flatten)]
    key: KeyArgs,
    /// Cache directory (durable staging). Default: STATE_ROOT/server-cache.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Cache quota; above 80 % of it agents get no new credit until it drains below 60 %.
    /// [default: 4GiB]
    #[arg(long, value_parser = units::parse_size)]
    cache_size: Option<u64>,
    /// TLS identity, registration passphrase, agent registry and status.json.
    /// Default: STATE_ROOT/server.
    #[arg(long, env = "FERRY_SERVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Worker threads for the pipeline. Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Keep recovery points this long (e.g. 24h, 7d); older ones (never a VM's newest) and the data
    /// only they need are deleted, checked at least once a minute. `0` keeps everything.
    /// [default: 24h]
    #[arg(long, value_parser = units::parse_retention)]
    retention: Option<Duration>,
    /// Serve Prometheus metrics at http://IP:PORT/metrics (e.g. 127.0.0.1:9464; docs/METRICS.md).
    /// `off` serves none. [default: none]
    #[arg(long)]
    metrics_listen: Option<String>,
}

fn server_state_dir(d: Option<PathBuf>) -> PathBuf {
    d.unwrap_or_else(|| ferry_job::default_state_root().join("server"))
}

/// Flags (and environment variables) over the config file over the defaults.
fn serve_options(
    a: ServeArgs,
    f: config::ServeFile,
    config_path: Option<PathBuf>,
) -> Result<ferry_serve::ServeOptions, JobError> {
    let config::ServeFile {
        listen,
        store,
        key_file,
        cache_dir,
        cache_size,
        state_dir,
        threads: file_threads,
        retention,
        log_json: _,
        metrics_listen,
        throttle_ingest,
        throttle_upload,
        admin_group,
    } = f;
    let store = match (a.store, store) {
        (Some(s), _) => s,
        (None, Some(s)) => StoreLocation::parse(&s)
            .map_err(|e| JobError::Usage(format!("config file, [serve] store: {e}")))?,
        (None, None) => {
            return Err(JobError::Usage(
                "no store: pass --store STORE, set FERRY_STORE, or set store in the [serve] table of the config file (--config)".into(),
            ))
        }
    };
    let retention = a.retention.or(retention).unwrap_or(DEFAULT_RETENTION);
    let state_dir = server_state_dir(a.state_dir.or(state_dir));
    Ok(ferry_serve::ServeOptions {
        listen: a.listen.or(listen).unwrap_or_else(|| "0.0.0.0:7443".into()),
        store,
        key_file: a
            .key
            .key_file
            .or(key_file)
            .unwrap_or_else(ferry_job::default_key_file),
        cache_dir: a
            .cache_dir
            .or(cache_dir)
            .unwrap_or_else(|| ferry_job::default_state_root().join("server-cache")),
        state_dir: state_dir.clone(),
        cache_size: a.cache_size.or(cache_size).unwrap_or(4 << 30),
        pipeline: ferry_pipeline::PipelineConfig {
            threads: threads(a.threads.or(file_threads)),
            ..Default::default()
        },
        window: 32 << 20,
        retention: (!retention.is_zero()).then_some(retention),
        metrics_listen: a
            .metrics_listen
            .or(metrics_listen)
            .filter(|m| m != "off" && !m.is_empty()),
        initial_throttles: (throttle_ingest, throttle_upload),
        admin: Some(ferry_serve::AdminSetup {
            group: admin_group.unwrap_or_else(|| ferry_serve::admin::DEFAULT_GROUP.into()),
            handler: crate::remote::handler(state_dir.clone(), config_path),
        }),
    })
}

const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

pub(crate) fn serve(a: ServeArgs, cfg: config::Loaded, log_json: bool) -> ExitCode {
    init_logging(log_json || cfg.serve.log_json == Some(true));
    if let Some(p) = &cfg.path {
        tracing::info!(config = %p.display(), "read the config file");
    }
    let config_path = cfg.path.clone();
    let o = match serve_options(a, cfg.serve, config_path) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("error: cannot install signal handler: {e}");
            return ExitCode::from(1);
        }
    }
    match ferry_serve::serve(&o, stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

pub(crate) fn status_cmd(a: StatusArgs) -> Result<StatusOutcome, JobError> {
    let cfg = a.config.load()?;
    let state_dir = server_state_dir(a.state_dir.clone().or(cfg.serve.state_dir));
    let now = std::time::SystemTime::now();
    let server = status::read_server(&state_dir, now);
    let store = match a.store {
        Some(s) => Some(s),
        None => server
            .file
            .as_ref()
            .map(|f| f.store.clone())
            .or(cfg.serve.store)
            .map(|s| StoreLocation::parse(&s))
            .transpose()?,
    };
    if server.file.is_none() && store.is_none() {
        return Err(JobError::Usage(format!(
            "{}; or pass --store STORE to see the store's points",
            server.problem.as_deref().unwrap_or("no status file")
        )));
    }
    loop {
        let now = std::time::SystemTime::now();
        let server = status::read_server(&state_dir, now);
        let manifests = store.as_ref().map(status::read_store);
        let r = status::report(&server, store.as_ref().zip(manifests.as_ref()), now);
        if a.watch && !a.json && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            // Clear the screen, home the cursor.
            out!("\x1b[2J\x1b[H");
        }
        if a.json {
            outln!("{}", serde_json::to_string_pretty(&r).expect("json"));
        } else {
            status::print_human(&r);
        }
        if !a.watch {
            return Ok(if r["health"] == "critical" {
                StatusOutcome::Critical
            } else {
                StatusOutcome::Ok
            });
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::thread::sleep(a.interval);
    }
}

/// What `ferry status` found: [`StatusOutcome::Critical`] exits 3.
pub(crate) enum StatusOutcome {
    Ok,
    Critical,
}

/// `--state-dir`, else the config file's `[serve] state_dir`, else STATE_ROOT/server.
pub(crate) fn resolve_state_dir(
    state_dir: Option<PathBuf>,
    config: &ConfigArg,
) -> Result<PathBuf, JobError> {
    match state_dir {
        Some(d) => Ok(d),
        None => Ok(server_state_dir(config.load()?.serve.state_dir)),
    }
}

pub(crate) fn passphrase_show(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    fingerprint: bool,
) -> ExitCode {
    let state_dir = match state_dir {
        Some(d) => d,
        None => match config.load() {
            Ok(c) => server_state_dir(c.serve.state_dir),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    match ferry_serve::passphrase(&state_dir) {
        Ok(p) if fingerprint => {
            println!("{}", p.fingerprint);
            ExitCode::SUCCESS
        }
        Ok(p) => {
            println!("{p}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
