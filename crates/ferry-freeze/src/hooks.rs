//! Pre-freeze / post-thaw hooks: executables in a directory, run in name order.
//!
//! Contract (also in docs/CUTS.md):
//! - Which: regular files with an execute bit in the directory (default `/etc/ferry/hooks.d`),
//!   in byte order of their names. Hidden names, `*~` and package-manager leftovers
//!   (`.dpkg-*`, `.rpmnew`, `.rpmsave`, `.ucf-*`) are skipped and reported as skipped.
//! - Safety ([`crate::trust`]): the directory, every directory above it and each hook must be
//!   owned by root (or the agent's user) and not group- or world-writable (a sticky directory such
//!   as `/tmp` may be); otherwise nothing in it runs (directories) or that hook is reported failed
//!   (file). A hook is a regular file, never a symbolic link; it is opened once, checked on the
//!   open descriptor and executed from it, so a file swapped in after the check never runs. The
//!   agent runs as root: a writable hook would be a root shell.
//! - Call: `HOOK pre-freeze` or `HOOK post-thaw` (and `HOOK cutover` / `HOOK cutover-rollback`
//!   around a migration's cutover: see `ferry_agent::cutover`), stdin `/dev/null`, environment inherited
//!   plus `FERRY_HOOK_PATH` (the hook's path: a script's `$0` is `/proc/self/fd/N`),
//!   `FERRY_HOOK_PHASE` and `FERRY_HOOK_TIMEOUT_MS`, and whatever the caller adds
//!   (the cutter adds the cut id and the mount points). Each hook runs in its own process group.
//! - Time: each hook gets `timeout`. On overrun its whole process group gets SIGTERM, then
//!   SIGKILL 500 ms later, and it counts as failed.
//! - Result: exit 0 is success; anything else fails. A failed `pre-freeze` hook means the point
//!   can only be crash-consistent ([`HookReport::consistency`]); the caller decides whether to
//!   cut anyway. Post-thaw failures are reported only. Every hook runs even if one before failed.

use std::fs;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::HookError;

/// Where hooks live unless configured otherwise.
pub const DEFAULT_HOOKS_DIR: &str = "/etc/ferry/hooks.d";
/// Default time each hook gets.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace between SIGTERM and SIGKILL for a hook that overran.
const KILL_GRACE: Duration = Duration::from_millis(500);
/// Bytes of a hook's output kept for the report (the tail).
const OUTPUT_TAIL: usize = 4096;

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the freeze: quiesce the application.
    Pre,
    /// After the thaw: resume it.
    Post,
    /// `ferry-agent cutover`, before the source's filesystems are made read-only for the final
    /// point: stop the application (a failure stops the cutover; nothing is changed).
    Cutover,
    /// `ferry-agent cutover --rollback` (or a cutover that failed), after the filesystems are
    /// writable again: start the application again.
    CutoverRollback,
}

impl Phase {
    /// The argument a hook receives.
    pub fn arg(self) -> &'static str {
        match self {
            Phase::Pre => "pre-freeze",
            Phase::Post => "post-thaw",
            Phase::Cutover => "cutover",
            Phase::CutoverRollback => "cutover-rollback",
        }
    }
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookStatus {
    Ok,
    /// Exited non-zero.
    Failed {
        code: i32,
    },
    /// Killed by a signal it did not get from us.
    Signaled {
        signal: i32,
    },
    /// Ran past the timeout and was killed.
    TimedOut,
    /// Could not be started.
    SpawnFailed(String),
    /// Not run: writable by others or owned by another user.
    Insecure(String),
}

impl HookStatus {
    pub fn is_ok(&self) -> bool {
        *self == HookStatus::Ok
    }
}

/// One hook's run.
#[derive(Debug, Clone)]
pub struct HookOutcome {
    pub name: String,
    pub path: PathBuf,
    pub status: HookStatus,
    pub took: Duration,
    /// The last 4 KiB of what it wrote to stdout and stderr (merged).
    pub output: String,
}

impl HookOutcome {
    /// One line saying why it failed (empty if it did not).
    pub fn why(&self) -> String {
        let last = self.output.lines().last().unwrap_or("").trim();
        let base = match &self.status {
            HookStatus::Ok => return String::new(),
            HookStatus::Failed { code } => format!("exited with {code}"),
            HookStatus::Signaled { signal } => format!("killed by signal {signal}"),
            HookStatus::TimedOut => format!("timed out after {:?} and was killed", self.took),
            HookStatus::SpawnFailed(e) => format!("could not start: {e}"),
            HookStatus::Insecure(e) => format!("not run: {e}"),
        };
        if last.is_empty() {
            format!("{}: {base}", self.name)
        } else {
            format!("{}: {base} (last output: {last})", self.name)
        }
    }
}

/// What consistency the hooks allow for the point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// All pre-freeze hooks succeeded: the point is application-consistent.
    App,
    /// A pre-freeze hook failed: the point can only be crash-consistent.
    Crash,
}

/// What a hook phase did.
#[derive(Debug, Clone)]
pub struct HookReport {
    pub phase: Phase,
    /// The hooks run, in order.
    pub hooks: Vec<HookOutcome>,
    /// Files not run and why (not executable, backup file...). Not failures.
    pub skipped: Vec<(String, &'static str)>,
}

impl HookReport {
    /// The hooks that failed.
    pub fn failed(&self) -> impl Iterator<Item = &HookOutcome> {
        self.hooks.iter().filter(|h| !h.status.is_ok())
    }

    pub fn all_ok(&self) -> bool {
        self.failed().next().is_none()
    }

    /// `Crash` if this is the pre-freeze phase and a hook failed (the point is downgraded).
    pub fn consistency(&self) -> Consistency {
        if self.phase == Phase::Pre && !self.all_ok() {
            Consistency::Crash
        } else {
            Consistency::App
        }
    }
}

/// Runs the hooks of `dir` for `phase`, each with `timeout`. A missing directory means no hooks.
pub fn run_hooks(dir: &Path, phase: Phase, timeout: Duration) -> Result<HookReport, HookError> {
    run_hooks_with_env(dir, phase, timeout, &[])
}

/// [`run_hooks`] with extra environment variables for the hooks.
pub fn run_hooks_with_env(
    dir: &Path,
    phase: Phase,
    timeout: Duration,
    env: &[(&str, &str)],
) -> Result<HookReport, HookError> {
    let mut report = HookReport {
        phase,
        hooks: Vec::new(),
        skipped: Vec::new(),
    };
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(source) => {
            return Err(HookError::Dir {
                path: dir.into(),
                source,
            })
        }
    };
    let _ = meta;
    // The directory and every one above it: only root (or the agent's user) may change them.
    match crate::trust::insecure_dirs(dir) {
        Ok(None) => {}
        Ok(Some((at, why))) => {
            return Err(HookError::InsecureDir {
                path: dir.into(),
                reason: if at == dir {
                    why
                } else {
                    format!("below {}, which is {why}", at.display())
                },
            })
        }
        Err(source) => {
            return Err(HookError::Dir {
                path: dir.into(),
                source,
            })
        }
    }
    let dir_err = |source| HookError::Dir {
        path: dir.into(),
        source,
    };
    let mut names: Vec<String> = Vec::new();
    for e in fs::read_dir(dir).map_err(dir_err)? {
        let e = e.map_err(dir_err)?;
        match e.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(n) => report
                .skipped
                .push((n.to_string_lossy().into_owned(), "name is not UTF-8")),
        }
    }
    names.sort();
    for name in names {
        if let Some(why) = ignored_name(&name) {
            report.skipped.push((name, why));
            continue;
        }
        let path = dir.join(&name);
        // Opened once, not through a link, checked on the open file, run from it.
        let outcome = match crate::trust::open_executable(&path) {
            Ok(f) => run_one(name, path, &f, phase, timeout, env),
            Err(crate::trust::Refused::Skip(why)) => {
                report.skipped.push((name, why));
                continue;
            }
            Err(crate::trust::Refused::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                report.skipped.push((name, "removed while the hooks ran"));
                continue;
            }
            Err(crate::trust::Refused::Insecure(reason)) => HookOutcome {
                name,
                path,
                status: HookStatus::Insecure(reason),
                took: Duration::ZERO,
                output: String::new(),
            },
            Err(crate::trust::Refused::Io(e)) => HookOutcome {
                name,
                path,
                status: HookStatus::SpawnFailed(format!("cannot open it: {e}")),
                took: Duration::ZERO,
                output: String::new(),
            },
        };
        if !outcome.status.is_ok() {
            tracing::warn!(phase = phase.arg(), "hook failed: {}", outcome.why());
        }
        report.hooks.push(outcome);
    }
    Ok(report)
}

fn ignored_name(name: &str) -> Option<&'static str> {
    if name.starts_with('.') {
        Some("hidden file")
    } else if name.ends_with('~') {
        Some("editor backup")
    } else if [".dpkg-", ".rpmnew", ".rpmsave", ".ucf-"]
        .iter()
        .any(|s| name.contains(s))
    {
        Some("package-manager leftover")
    } else {
        None
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 expects.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Keeps the last `OUTPUT_TAIL` bytes read from `r`; signals `done` at end-of-file.
fn tail_reader(r: OwnedFd, keep: Arc<Mutex<Vec<u8>>>, done: mpsc::Sender<()>) {
    let mut f = fs::File::from(r);
    let mut buf = [0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
                k.extend_from_slice(&buf[..n]);
                if k.len() > OUTPUT_TAIL {
                    let cut = k.len() - OUTPUT_TAIL;
                    k.drain(..cut);
                }
            }
        }
    }
    let _ = done.send(());
}

fn signal_group(pgid: u32, sig: i32) {
    // SAFETY: kill() on a negative pid signals that process group; no memory involved.
    unsafe { libc::kill(-(pgid as libc::pid_t), sig) };
}

fn run_one(
    name: String,
    path: PathBuf,
    file: &fs::File,
    phase: Phase,
    timeout: Duration,
    env: &[(&str, &str)],
) -> HookOutcome {
    let started = Instant::now();
    let mut outcome = HookOutcome {
        name,
        path: path.clone(),
        status: HookStatus::Ok,
        took: Duration::ZERO,
        output: String::new(),
    };
    let spawned = pipe().and_then(|(r, w)| {
        let w2 = w.try_clone()?;
        let mut cmd = crate::trust::command_for(file, &path);
        cmd.arg(phase.arg())
            .env("FERRY_HOOK_PATH", &path)
            .env("FERRY_HOOK_PHASE", phase.arg())
            .env("FERRY_HOOK_TIMEOUT_MS", timeout.as_millis().to_string())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(w))
            .stderr(Stdio::from(w2))
            .process_group(0);
        // `cmd` (holding our copies of the write end) is dropped at the end of this closure,
        // so the reader sees end-of-file once the hook and its children are done.
        let mut tries = 0;
        loop {
            match cmd.spawn() {
                // ETXTBSY: the file is still open for writing somewhere (being installed, or a
                // descriptor inherited by a process forked meanwhile): a moment later it is not.
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r2 => return Ok((r2?, r)),
            }
        }
    });
    let (mut child, reader) = match spawned {
        Ok(x) => x,
        Err(e) => {
            outcome.status = HookStatus::SpawnFailed(e.to_string());
            return outcome;
        }
    };
    let keep = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = mpsc::channel();
    {
        let keep = keep.clone();
        std::thread::spawn(move || tail_reader(reader, keep, done_tx));
    }
    let pgid = child.id();
    let deadline = started + timeout;
    let mut timed_out = false;
    let mut sleep = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => {
                outcome.status = HookStatus::SpawnFailed(format!("waiting for it: {e}"));
                break None;
            }
        }
        let now = Instant::now();
        if now >= deadline && !timed_out {
            timed_out = true;
            signal_group(pgid, libc::SIGTERM);
        }
        if timed_out && now >= deadline + KILL_GRACE {
            signal_group(pgid, libc::SIGKILL);
            break child.wait().ok();
        }
        std::thread::sleep(
            sleep.min(
                deadline
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
            ),
        );
        sleep = (sleep * 2).min(Duration::from_millis(20));
    };
    if timed_out {
        // Leave no stragglers of a hook we gave up on.
        signal_group(pgid, libc::SIGKILL);
        outcome.status = HookStatus::TimedOut;
    } else if let Some(st) = status {
        outcome.status = match (st.code(), st.signal()) {
            (Some(0), _) => HookStatus::Ok,
            (Some(code), _) => HookStatus::Failed { code },
            (None, Some(signal)) => HookStatus::Signaled { signal },
            (None, None) => HookStatus::Failed { code: -1 },
        };
    }
    outcome.took = started.elapsed();
    // A hook may leave a child running on purpose (one that holds an application lock until the
    // post-thaw hook): do not wait for its output beyond a moment.
    let _ = done_rx.recv_timeout(Duration::from_millis(100));
    let bytes = keep.lock().unwrap_or_else(|p| p.into_inner()).clone();
    outcome.output = String::from_utf8_lossy(&bytes).into_owned();
    outcome
}
