//! `ferry-agent`: the mobility agent. Thin: parse arguments and the configuration file, call the
//! library, map errors to exit codes (0 ok, 1 error, 2 usage).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_agent::config::{default_disks, duration, AgentConfig, DEFAULT_CONFIG};
use ferry_agent::{AgentError, AgentOptions, MysqlOptions, TrackerChoice};
use ferry_wire::PointKind;

const DEFAULT_STATE_DIR: &str = "/var/lib/ferry-agent";

#[derive(Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Ferry's mobility agent: tracks the changed blocks of this machine's disks, ships them \
to a process server continuously, and cuts crash- and app-consistent recovery points.",
    args_conflicts_with_subcommands = true,
    after_help = "Getting started:\n  \
1. on the appliance: `ferry passphrase show` → save it to /root/ferry.pass (mode 600)\n  \
2. `ferry-agent register --server ps.example:9443 --passphrase-file /root/ferry.pass`\n  \
3. `ferry-agent --config /etc/ferry/agent.toml` (or the flags below; systemd: ferry-agent.service)\n  \
4. `ferry-agent cut --app` for an application-consistent point now.\n\n\
Tracker: eBPF on the block layer when the kernel has BTF and the disks are block devices (writes \
are shipped as they happen); otherwise the scan tracker (each point reads every disk), chosen \
automatically with a log line saying why. Points: crash-consistent every --crash-interval, \
app-consistent every --app-interval (pre-freeze/post-thaw hooks from --hooks-dir, the MariaDB/MySQL \
hook with --mysql-*), each with every filesystem on the disks frozen (at most --freeze-bound).\n\
Logs go to stderr (FERRY_LOG=debug for more). Exit codes: 0 ok, 1 error (transient: the unit \
restarts the agent), 2 usage or configuration (an agent not registered yet included), 3 the VM's \
migration was completed (neither is restarted). docs/AGENT.md."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
    /// Log as JSON lines on stderr (for journald or log shippers) instead of text.
    #[arg(long, global = true, env = "FERRY_LOG_JSON")]
    log_json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Register with a process server (once): proves the passphrase, stores the credential.
    Register {
        /// The process server, HOST:PORT.
        #[arg(long)]
        server: String,
        /// File holding the passphrase printed by `ferry passphrase show`.
        #[arg(long)]
        passphrase_file: PathBuf,
        /// Where the agent keeps its credential and state (mode 0600 files).
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Ask the running agent for a point now; prints its id once the process server has it.
    Cut {
        /// Application-consistent (hooks + MariaDB/MySQL lock + freeze); default crash-consistent.
        #[arg(long)]
        app: bool,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Give up waiting after this long.
        #[arg(long, default_value = "10min", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Planned failover (migration): stop the application (hooks with `cutover`), make every
    /// filesystem of the protected disks read-only, cut the final app-consistent point, wait
    /// until the process server has committed it, and print its id. The source stays
    /// write-blocked until `--rollback`; on the appliance, `ferry failover --vm VM --point final`
    /// materializes that point.
    ///
    /// A process that keeps a file open for writing on a protected filesystem stops the cutover
    /// (the error names the mount point): stop it in a hook. Any failure rolls everything back.
    /// `--rollback`: filesystems writable again, hooks with `cutover-rollback` (start the
    /// application), replication goes on from where it was (no full resync).
    ///
    /// Examples:
    ///   ferry-agent cutover
    ///   ferry-agent cutover --json
    ///   ferry-agent cutover --rollback
    #[command(verbatim_doc_comment)]
    Cutover {
        /// Undo the cutover: the source writable and replicating again.
        #[arg(long)]
        rollback: bool,
        /// A filesystem that cannot be made read-only (a process keeps a file open for writing
        /// there, as journald does on /) stays writable, is frozen for the final point and is
        /// listed, instead of stopping the cutover.
        #[arg(long, conflicts_with = "rollback")]
        allow_writable: bool,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Give up waiting after this long (the final point may have to send what the
        /// application wrote last).
        #[arg(long, default_value = "30min", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the running agent read every chunk again and send what differs (a checksum resync);
    /// points wait until it is done.
    Resync {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// The running agent's state (tracker, dirty chunks, points waiting for acknowledgement) as JSON.
    Status {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TrackerArg {
    Auto,
    Ebpf,
    Scan,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Crash,
    App,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML; every flag below has a key, flags win). Default
    /// /etc/ferry/agent.toml if it exists.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The process server, HOST:PORT. Default: the one registered with.
    #[arg(long)]
    server: Option<String>,
    /// A protected disk (whole block device, or a raw image file); repeat for several.
    /// Default: every non-removable disk.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Where the agent keeps its credential and state [default: /var/lib/ferry-agent].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Name of this machine in the store. Default: the host name.
    #[arg(long)]
    vm: Option<String>,
    /// Which change tracker to use [default: auto].
    #[arg(long, value_enum)]
    tracker: Option<TrackerArg>,
    /// Time between crash-consistent points (at least 10s) [default: 30s].
    #[arg(long, alias = "interval")]
    crash_interval: Option<String>,
    /// Time between app-consistent points, or "off" [default: 60min].
    #[arg(long)]
    app_interval: Option<String>,
    /// Longest a freeze may last; the watchdog thaws then and the cut is abandoned [default: 2s].
    #[arg(long)]
    freeze_bound: Option<String>,
    /// Do not expedite the kernel's RCU grace periods during FIFREEZE. By default the agent sets
    /// /sys/kernel/rcu_expedited to 1 while FIFREEZE runs (if it is 0; milliseconds, longer with
    /// much dirty data to flush), which shortens the time writers are blocked (docs/AGENT.md)
    /// [key expedite_rcu = false].
    #[arg(long)]
    no_expedite_rcu: bool,
    /// Most this agent sends, for a guest on a thin uplink: 20MiB/s, 100Mbit/s or unlimited
    /// [default: unlimited; the process server's throttles apply as well].
    #[arg(long)]
    max_rate: Option<String>,
    /// Pre-freeze / post-thaw hook executables [default: /etc/ferry/hooks.d].
    #[arg(long)]
    hooks_dir: Option<PathBuf>,
    /// Timeout of each hook [default: 30s].
    #[arg(long)]
    hook_timeout: Option<String>,
    /// Let the process server ask this machine to cut over (`ferry failover --vm VM
    /// --shutdown-source`: hooks with `cutover`, filesystems read-only, final point), as
    /// `ferry-agent cutover --allow-writable` would [default: off; key allow_remote_cutover].
    #[arg(long)]
    allow_remote_cutover: bool,
    /// MariaDB/MySQL hook: the server's unix socket (enables the hook).
    #[arg(long)]
    mysql_socket: Option<PathBuf>,
    /// MariaDB/MySQL hook: TCP host (enables the hook; --mysql-port, default 3306).
    #[arg(long)]
    mysql_host: Option<String>,
    #[arg(long)]
    mysql_port: Option<u16>,
    /// MariaDB/MySQL hook user [default: root].
    #[arg(long)]
    mysql_user: Option<String>,
    /// File holding the MariaDB/MySQL password (mode 600).
    #[arg(long)]
    mysql_password_file: Option<PathBuf>,
    /// A program run while the filesystems are frozen (tests, diagnostics: e.g. copy the device);
    /// gets FERRY_VM, FERRY_RUN, FERRY_CUT_TIME_NS; counts against --freeze-bound.
    #[arg(long)]
    frozen_hook: Option<PathBuf>,
    /// Cut one point, wait until the process server has it, and exit.
    #[arg(long)]
    once: bool,
    /// With --once: the kind of point [default: crash].
    #[arg(long, value_enum, requires = "once")]
    point: Option<KindArg>,
    /// With --once: print the point as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ferry_agent::log_colors());
    if cli.log_json {
        b.json().init();
    } else {
        b.init();
    }
    let r = match cli.cmd {
        Some(Cmd::Register {
            server,
            passphrase_file,
            state_dir,
        }) => ferry_agent::register(&server, &passphrase_file, &state_dir).map(|id| {
            println!("registered as agent {} with {server}", id.agent_id);
        }),
        Some(Cmd::Cut {
            app,
            state_dir,
            timeout,
            json,
        }) => ferry_agent::request_cut(&state_dir, app, timeout).map(|p| print_point(&p, json)),
        Some(Cmd::Cutover {
            rollback,
            allow_writable,
            state_dir,
            timeout,
            json,
        }) => ferry_agent::request_cutover(&state_dir, rollback, allow_writable, timeout).map(|v| {
            if json {
                println!("{v}");
            } else if rollback {
                println!("cutover rolled back: the source is writable and replicates again");
            } else {
                let ro: Vec<&str> = v["mounts_read_only"]
                    .as_array()
                    .map(|m| m.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                println!(
                    "cut over: final point {} ({}); {}",
                    v["final_point"].as_str().unwrap_or("?"),
                    v["kind"].as_str().unwrap_or("?"),
                    if ro.is_empty() {
                        "no filesystem of the protected disks is mounted here to make read-only: what writes them must be stopped by a cutover hook".to_string()
                    } else {
                        format!("read-only now: {}", ro.join(", "))
                    }
                );
                if let Some(w) = v["mounts_writable"].as_array().filter(|w| !w.is_empty()) {
                    for m in w {
                        println!(
                            "  still writable (frozen for the final point; later writes are in no point): {} ({})",
                            m["mount"].as_str().unwrap_or("?"),
                            m["why"].as_str().unwrap_or("")
                        );
                    }
                }
                println!("On the appliance: ferry failover --vm VM --point final");
                println!("To undo: ferry-agent cutover --rollback");
            }
        }),
        Some(Cmd::Resync { state_dir }) => ferry_agent::request_resync(&state_dir)
            .map(|()| println!("resync started; `ferry-agent status` shows the chunks left")),
        Some(Cmd::Status { state_dir }) => ferry_agent::request_status(&state_dir).map(|s| {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        }),
        None => run(cli.run),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn print_point(p: &ferry_agent::CutReply, json: bool) {
    if json {
        println!("{}", serde_json::to_string(p).unwrap_or_default());
        return;
    }
    match &p.point {
        Some(id) => println!("{id}"),
        None => println!("run {} (the process server did not name the point)", p.run),
    }
    if let Some(n) = &p.note {
        eprintln!("note: {n}");
    }
}

fn disk_name(p: &Path) -> String {
    let n: String = p
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("disk")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    n.trim_start_matches('.').to_string()
}

fn options(a: RunArgs) -> Result<(AgentOptions, bool), AgentError> {
    let cfg = match &a.config {
        Some(p) => AgentConfig::load(p, true)?,
        None => AgentConfig::load(Path::new(DEFAULT_CONFIG), false)?,
    };
    let state_dir = a
        .state_dir
        .or(cfg.state_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let server = match a.server.or(cfg.server) {
        Some(s) => s,
        None => ferry_agent::AgentIdentity::load(&state_dir)?.server,
    };
    let mut disks = if a.disks.is_empty() {
        cfg.disks.unwrap_or_default()
    } else {
        a.disks
    };
    if disks.is_empty() {
        disks = default_disks();
        if disks.is_empty() {
            return Err(AgentError::Usage(
                "no disks to protect: give --disk (or disks = [...] in the configuration)".into(),
            ));
        }
        tracing::info!(?disks, "protecting every non-removable disk");
    }
    let names: Vec<String> = disks.iter().map(|d| disk_name(d)).collect();
    for (i, n) in names.iter().enumerate() {
        if n.is_empty() || names[..i].contains(n) {
            return Err(AgentError::Usage(format!(
                "disk name '{n}' (from {}) is empty or used twice; rename the image files",
                disks[i].display()
            )));
        }
    }
    let tracker = match a.tracker {
        Some(TrackerArg::Auto) => TrackerChoice::Auto,
        Some(TrackerArg::Ebpf) => TrackerChoice::Ebpf,
        Some(TrackerArg::Scan) => TrackerChoice::Scan,
        None => match cfg.tracker.as_deref() {
            None | Some("auto") => TrackerChoice::Auto,
            Some("ebpf") => TrackerChoice::Ebpf,
            Some("scan") => TrackerChoice::Scan,
            Some(t) => {
                return Err(AgentError::Config(format!(
                    "tracker = \"{t}\": use \"auto\", \"ebpf\" or \"scan\""
                )))
            }
        },
    };
    let crash_interval = duration(
        "crash_interval",
        a.crash_interval
            .as_deref()
            .or(cfg.crash_interval.as_deref())
            .unwrap_or("30s"),
    )?;
    let max_rate = match a.max_rate.as_deref().or(cfg.max_rate.as_deref()) {
        None => None,
        Some(r) => ferry_wire::rate::parse_rate(r)
            .map_err(|e| AgentError::Config(format!("max_rate: {e}")))?
            .bytes(),
    };
    let once = a.once;
    if crash_interval < Duration::from_secs(10) && !once {
        return Err(AgentError::Usage(format!(
            "crash_interval {crash_interval:?} is below the 10 s minimum"
        )));
    }
    let app_interval = match a
        .app_interval
        .as_deref()
        .or(cfg.app_interval.as_deref())
        .unwrap_or("60min")
    {
        "off" => None,
        v => Some(duration("app_interval", v)?),
    };
    let freeze_bound = duration(
        "freeze_bound",
        a.freeze_bound
            .as_deref()
            .or(cfg.freeze_bound.as_deref())
            .unwrap_or("2s"),
    )?;
    let hook_timeout = duration(
        "hook_timeout",
        a.hook_timeout
            .as_deref()
            .or(cfg.hook_timeout.as_deref())
            .unwrap_or("30s"),
    )?;
    let mcfg = cfg.mysql.unwrap_or_default();
    let mysql_on = a.mysql_socket.is_some()
        || a.mysql_host.is_some()
        || mcfg.socket.is_some()
        || mcfg.host.is_some()
        || mcfg.user.is_some();
    let mysql = if mysql_on {
        let host = a.mysql_host.or(mcfg.host);
        let target = match (a.mysql_socket.or(mcfg.socket), host) {
            (Some(s), _) => ferry_freeze::MysqlTarget::Socket(s),
            (None, Some(host)) => ferry_freeze::MysqlTarget::Tcp {
                host,
                port: a.mysql_port.or(mcfg.port).unwrap_or(3306),
            },
            (None, None) => {
                ferry_freeze::MysqlTarget::Socket(PathBuf::from("/run/mysqld/mysqld.sock"))
            }
        };
        Some(MysqlOptions {
            target,
            user: a.mysql_user.or(mcfg.user).unwrap_or_else(|| "root".into()),
            password_file: a.mysql_password_file.or(mcfg.password_file),
            timeout: match mcfg.timeout {
                Some(t) => duration("mysql.timeout", &t)?,
                None => ferry_freeze::DEFAULT_DB_TIMEOUT,
            },
        })
    } else {
        None
    };
    let o = AgentOptions {
        server,
        disks,
        names,
        vm: a.vm.or(cfg.vm).unwrap_or_else(ferry_agent::hostname),
        state_dir,
        tracker,
        crash_interval,
        app_interval,
        freeze_bound,
        expedite_rcu: !a.no_expedite_rcu && cfg.expedite_rcu.unwrap_or(true),
        max_rate,
        hooks_dir: a
            .hooks_dir
            .or(cfg.hooks_dir)
            .unwrap_or_else(|| PathBuf::from(ferry_freeze::DEFAULT_HOOKS_DIR)),
        hook_timeout,
        allow_remote_cutover: a.allow_remote_cutover || cfg.allow_remote_cutover.unwrap_or(false),
        mysql,
        frozen_hook: a.frozen_hook,
        once: once.then_some(match a.point {
            Some(KindArg::App) => PointKind::App,
            _ => PointKind::Crash,
        }),
        drain_every: Duration::from_millis(250),
        resync_asked: Default::default(),
    };
    Ok((o, a.json))
}

fn run(a: RunArgs) -> Result<(), AgentError> {
    let (o, json) = options(a)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| AgentError::Usage(format!("cannot install signal handler: {e}")))?;
    }
    let s = loop {
        match ferry_agent::run_agent(&o, &stop) {
            // A rebuilt appliance, another store, a lost cache: start again, binding the chunk
            // maps to what the process server says it holds now.
            Err(AgentError::Diverged(why)) if !stop.load(Ordering::Relaxed) => {
                tracing::warn!(%why, "the process server does not hold what this agent sent; starting again against what it holds (maps that no longer match are resynced)");
                std::thread::sleep(Duration::from_secs(1));
            }
            r => break r?,
        }
    };
    if o.once.is_some() {
        for p in &s.points {
            print_point(p, json);
        }
        eprintln!(
            "{} records, {} data bytes, {} reconnect(s), tracker {}",
            s.records, s.data_bytes, s.reconnects, s.tracker
        );
    }
    Ok(())
}
