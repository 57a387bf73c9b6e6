//! The operator's commands and a running `ferry serve`: the client half (try the server's admin
//! socket, `ferry_serve::admin`, before working on the state directory itself) and the server
//! half (the handler that runs a client's command line inside the server, output captured).
//!
//! - A server that runs answers every operator command (`status`, `throttle`, `policy`,
//!   `events`, `agents`, `vms`, `passphrase rotate`) itself, on its own state directory, config
//!   file and store: a member of the admin group can operate it without access to the state
//!   files, and what the command reports is what that server uses.
//! - No server there (no socket, or one a killed server left): the command works on the state
//!   directory directly, as it always could; the server picks changes up when it starts.
//! - A server that runs but refuses (permission) or fails: the command says so and exits 1; it
//!   does not silently fall back to files the server may not be reading.
//! - A command that names a store (`--store`, `FERRY_STORE`) runs here: it reads what the
//!   operator named, which need not be the server's; the server refuses a `--store` sent to it.
//! - `status` waits 15 s at most for the server and then reads the files (monitoring must not
//!   hang); the other commands wait up to 5 minutes (a prune preview reads every manifest). A
//!   command the server has started runs to its end even if the client gives up or is killed.
//! - Log lines a command writes (tracing) go to the server's log, not to the client.
//! - `FERRY_ADMIN_SOCKET=off` makes every command work on the files (for debugging).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ferry_serve::admin::{self, Reach, Reply};

use crate::server::ConfigArg;
use crate::{AgentsCmd, Cli, Cmd, PassphraseCmd, PolicyCmd, StateDirArg, ThrottleCmd, VmsCmd};

/// How long a command waits for the server's reply (a prune preview reads every manifest).
const TIMEOUT: Duration = Duration::from_secs(300);

/// The state directory and config file a command names, and whether it names a store of its own.
type Target<'a> = (&'a mut Option<PathBuf>, &'a mut ConfigArg, bool);

fn at(a: &mut StateDirArg, store: bool) -> Option<Target<'_>> {
    Some((&mut a.state_dir, &mut a.config, store))
}

fn target(cmd: &mut Cmd) -> Option<Target<'_>> {
    match cmd {
        Cmd::Status(a) => {
            let store = a.store.is_some();
            Some((&mut a.state_dir, &mut a.config, store))
        }
        Cmd::Passphrase {
            cmd: PassphraseCmd::Rotate { at: a },
        } => at(a, false),
        Cmd::Agents {
            cmd:
                AgentsCmd::List { at: a, .. }
                | AgentsCmd::Revoke { at: a, .. }
                | AgentsCmd::Token { at: a, .. },
        } => at(a, false),
        Cmd::Vms {
            cmd: VmsCmd::List { at: a, .. } | VmsCmd::Move { at: a, .. },
        } => at(a, false),
        Cmd::Vms {
            cmd: VmsCmd::Release { at: a, store, .. },
        } => {
            let s = store.is_some();
            at(a, s)
        }
        Cmd::Throttle {
            cmd:
                ThrottleCmd::Set { at: a, .. }
                | ThrottleCmd::Schedule { at: a, .. }
                | ThrottleCmd::Weight { at: a, .. }
                | ThrottleCmd::Show { at: a, .. },
        } => at(a, false),
        Cmd::Policy {
            cmd: PolicyCmd::Set { at: a, store, .. } | PolicyCmd::Show { at: a, store, .. },
        } => {
            let s = store.is_some();
            at(a, s)
        }
        Cmd::Events { at: a, .. } => at(a, false),
        Cmd::Serve(_)
        | Cmd::Appliance { .. }
        | Cmd::Key { .. }
        | Cmd::Passphrase {
            cmd: PassphraseCmd::Show { .. },
        }
        | Cmd::Replicate(_)
        | Cmd::Points { .. }
        | Cmd::Restore(_)
        | Cmd::Failover(_)
        | Cmd::CompleteMigration(_)
        | Cmd::Failback(_)
        | Cmd::Apply(_) => None,
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Where to look for a running server: the state directory the command means; for a user other
/// than root who named none, also the system one (`/var/lib/ferry/server`), so an operator in
/// the admin group needs no flags on a default install.
fn candidates(state_dir: &Option<PathBuf>, config: &ConfigArg) -> Vec<PathBuf> {
    let Ok(loaded) = config.load() else {
        // The local run reports the config file's problem.
        return Vec::new();
    };
    let named = state_dir.is_some() || loaded.serve.state_dir.is_some();
    let Ok(dir) = crate::server::resolve_state_dir(state_dir.clone(), config) else {
        return Vec::new();
    };
    // The system server, only for a user with no server state of their own: a group member
    // whose own server is stopped must not reach the production one by accident.
    let system = Path::new("/var/lib/ferry/server");
    if !named
        && !is_root()
        && std::env::var_os("FERRY_STATE_DIR").is_none()
        && dir != system
        && !dir.exists()
    {
        return vec![system.to_owned()];
    }
    vec![dir]
}

/// Runs an operator command through the running server's admin socket, if one answers. Returns
/// the exit status, or None when the command is to run here (no server, not an operator command,
/// or one that names its own store).
pub(crate) fn through_server(cmd: &mut Cmd) -> Option<u8> {
    if std::env::var_os("FERRY_ADMIN_SOCKET").is_some_and(|v| v == "off") {
        return None;
    }
    let is_status = matches!(cmd, Cmd::Status(_));
    let (watch, interval) = match cmd {
        Cmd::Status(a) => (a.watch, a.interval),
        _ => (false, Duration::ZERO),
    };
    let (state_dir, config, own_store) = target(cmd)?;
    if own_store {
        return None;
    }
    let mut args = Vec::new();
    for a in std::env::args_os().skip(1) {
        args.push(a.into_string().ok()?);
    }
    let dirs = candidates(state_dir, config);
    // `status` is what monitoring runs: it must not hang on a server that does not answer.
    let timeout = if is_status {
        Duration::from_secs(15)
    } else {
        TIMEOUT
    };
    let mut first = true;
    loop {
        let mut answered = None;
        for d in &dirs {
            match admin::call(d, args.clone(), timeout) {
                Reach::Ran(r) => {
                    tracing::debug!(socket = %d.join(admin::SOCKET).display(), "ran in the server");
                    answered = Some(r);
                    break;
                }
                Reach::NoServer => {}
                // Status reads the files when the server cannot answer (it then reports what
                // they say, e.g. a server that stopped writing its status).
                Reach::Failed(why) if is_status && !why.contains("permission denied") => {
                    eprintln!("warning: {why}; reading the state directory instead");
                    break;
                }
                Reach::Failed(why) => {
                    eprintln!("error: {why}");
                    return Some(1);
                }
            }
        }
        let Some(r) = answered else {
            // No server (any more): the command works on the state directory; `--watch` goes on
            // there.
            if !first {
                eprintln!("note: the server stopped answering; showing its state directory");
            }
            return None;
        };
        first = false;
        if watch
            && std::io::IsTerminal::is_terminal(&std::io::stdout())
            && !r.stdout.starts_with('{')
        {
            // Clear the screen, home the cursor.
            crate::out::stdout(format_args!("\x1b[2J\x1b[H"));
        }
        crate::out::stdout(format_args!("{}", r.stdout));
        crate::out::stderr(format_args!("{}", r.stderr));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if !watch || !matches!(r.exit, 0 | 3 | admin::EXIT_BUSY) {
            return Some(r.exit);
        }
        std::thread::sleep(interval);
    }
}

fn args_name_store(args: &[String]) -> bool {
    args.iter()
        .any(|a| a == "--store" || a.starts_with("--store="))
}

/// The server's handler of admin-socket commands: parses the client's command line as `ferry`
/// would, points it at this server's state directory and config file, and runs it with its output
/// captured. Only operator commands run; `--watch` is the client's to repeat.
pub(crate) fn handler(state_dir: PathBuf, config: Option<PathBuf>) -> admin::Handler {
    std::sync::Arc::new(move |args: Vec<String>| {
        let parsed = Cli::try_parse_from(std::iter::once("ferry".to_owned()).chain(args.clone()));
        // A store other than the server's is the caller's to read, in the caller's process,
        // with the caller's credentials: never through the server (the client sends none).
        if args_name_store(&args) {
            return Reply::new(
                2,
                String::new(),
                "error: through the admin socket a command uses the server's own store; leave out --store, or run it with FERRY_ADMIN_SOCKET=off where you can read that store\n".into(),
            );
        }
        let mut cli = match parsed {
            Ok(c) => c,
            Err(e) => {
                let text = e.render().to_string();
                return if e.use_stderr() {
                    Reply::new(e.exit_code() as u8, String::new(), text)
                } else {
                    // --help, --version
                    Reply::new(0, text, String::new())
                };
            }
        };
        if let Cmd::Status(a) = &mut cli.cmd {
            a.watch = false;
        }
        let Some((sd, cfg, _)) = target(&mut cli.cmd) else {
            return Reply::new(
                2,
                String::new(),
                "error: the admin socket runs the operator's commands only (status, throttle, policy, events, agents, vms, passphrase rotate)\n".into(),
            );
        };
        *sd = Some(state_dir.clone());
        cfg.config.clone_from(&config);
        let (code, out, err) = crate::out::captured(|| crate::run_operator(cli.cmd));
        Reply::new(code, out, err)
    })
}
