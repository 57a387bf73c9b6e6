//! `ferry-agent`: the mobility agent. Thin: parse arguments, call the library, map errors to exit
//! codes (0 ok, 1 error, 2 usage).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use ferry_agent::{AgentError, RunOptions};
use ferry_wire::PointKind;

#[derive(Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Ferry's mobility agent: ships the changed blocks of protected disks to a process server.",
    args_conflicts_with_subcommands = true,
    after_help = "First `ferry-agent register --server HOST:PORT --passphrase-file FILE --state-dir DIR` \
(the passphrase comes from `ferry passphrase show` on the process server), then \
`ferry-agent --server HOST:PORT --disk /dev/sdX --state-dir DIR`.\n\
Logs go to stderr (FERRY_LOG=debug for more). Exit codes: 0 ok, 1 error, 2 usage."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
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
        #[arg(long, default_value = "/var/lib/ferry-agent")]
        state_dir: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The process server, HOST:PORT.
    #[arg(long)]
    server: Option<String>,
    /// A protected disk (block device or raw image file); repeat for several.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Where the agent keeps its credential and state.
    #[arg(long, default_value = "/var/lib/ferry-agent")]
    state_dir: PathBuf,
    /// Name of this machine in the store. Default: the host name.
    #[arg(long)]
    vm: Option<String>,
    /// Cut one point and exit.
    #[arg(long)]
    once: bool,
    /// Time between points without --once.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let r = match cli.cmd {
        Some(Cmd::Register {
            server,
            passphrase_file,
            state_dir,
        }) => ferry_agent::register(&server, &passphrase_file, &state_dir).map(|id| {
            println!("registered as agent {} with {server}", id.agent_id);
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

fn disk_name(p: &std::path::Path) -> String {
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

fn run(a: RunArgs) -> Result<(), AgentError> {
    let Some(server) = a.server else {
        return Err(AgentError::Usage(
            "give --server HOST:PORT and at least one --disk (or a subcommand; see --help)".into(),
        ));
    };
    if a.disks.is_empty() {
        return Err(AgentError::Usage("give at least one --disk".into()));
    }
    let names: Vec<String> = a.disks.iter().map(|d| disk_name(d)).collect();
    for (i, n) in names.iter().enumerate() {
        if n.is_empty() || names[..i].contains(n) {
            return Err(AgentError::Usage(format!(
                "disk name '{n}' (from {}) is empty or used twice; rename the image files",
                a.disks[i].display()
            )));
        }
    }
    let o = RunOptions {
        server,
        disks: a.disks,
        names,
        vm: a.vm.unwrap_or_else(ferry_agent::hostname),
        state_dir: a.state_dir,
        kind: PointKind::Crash,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| AgentError::Usage(format!("cannot install signal handler: {e}")))?;
    }
    loop {
        let started = Instant::now();
        let s = ferry_agent::run_once(&o, &stop)?;
        println!(
            "run {} acknowledged: {} records, {} data bytes, {} reconnect(s)",
            s.run, s.records, s.data_bytes, s.reconnects
        );
        if a.once {
            return Ok(());
        }
        while started.elapsed() < a.interval {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
