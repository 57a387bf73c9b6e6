//! The thaw watchdog: a separate process that thaws the frozen filesystems when the freeze
//! outlives its bound, when the agent dies, or never if the agent ends the cut in time.
//!
//! It is the small binary `ferry-thaw-watchdog` (shipped by this crate), spawned — not forked,
//! so the agent's memory is not shared copy-on-write during the freeze window — before anything
//! is frozen. Its standard input is one end of a `SOCK_SEQPACKET` socket pair; the agent holds
//! the other end and nothing else does, so the agent's death, however it happens (SIGKILL
//! included), reaches the watchdog as end-of-file at once.
//!
//! Protocol (one message per packet; agent → watchdog unless marked):
//! - watchdog → agent `R`: it opened every mount point and checked each is the expected
//!   filesystem; only then does the agent freeze anything. `E<text>`: it could not.
//! - `F` + deadline (i64 ns of `CLOCK_MONOTONIC`, native endian): freezing starts now; thaw at
//!   the deadline. The agent's own clock reading is used, so a late wake-up of the watchdog
//!   does not move the deadline.
//! - `D`: the cut is done, the agent is about to thaw. Answer (watchdog → agent): `K` if the
//!   watchdog has thawed nothing, `T` if it has (the cut is then not consistent).
//! - `Q`: the agent has thawed; exit without touching anything.
//! - end-of-file (the agent closed the socket or died): thaw everything, exit.
//! - deadline reached: send `T` (before thawing: a watchdog killed mid-thaw must not leave the
//!   agent believing the freeze held), thaw everything (reverse freeze order), and keep thawing
//!   every 100 ms until `Q` or end-of-file: a FIFREEZE still in progress at the deadline
//!   completes after the first thaw and must not survive.
//!
//! The watchdog ignores SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGPIPE and leaves the terminal's process
//! group, so a Ctrl-C or a `systemctl stop` that takes the agent down cannot take it down
//! first; it exits by itself right after the agent's end. SIGKILL of the whole cgroup kills it
//! too: that case is the restart path's (`thaw_all`).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::discover::Dev;
use crate::error::FreezeError;
use crate::sys;

/// File name of the watchdog binary.
pub const WATCHDOG_NAME: &str = "ferry-thaw-watchdog";
/// First argument: the protocol version, so a stale installed binary is refused, not misread.
const PROTOCOL: &str = "ferry-thaw-watchdog-v1";

const MSG_READY: u8 = b'R';
const MSG_ERROR: u8 = b'E';
const MSG_ARM: u8 = b'F';
const MSG_DONE: u8 = b'D';
const MSG_QUIT: u8 = b'Q';
const MSG_OK: u8 = b'K';
const MSG_FIRED: u8 = b'T';

/// How long the agent waits for the watchdog to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the agent waits for the answer to `D`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the agent waits for the watchdog to exit before killing it.
const EXIT_TIMEOUT: Duration = Duration::from_secs(2);
/// A watchdog never armed gives up after this (nothing was frozen under it).
const ARM_TIMEOUT_NS: i64 = 60_000_000_000;
/// After firing, the watchdog thaws again at this period.
const RETHAW_NS: i64 = 100_000_000;

/// Directories searched for the watchdog after the agent's own: where packages put helper
/// binaries, then the system's binary directories. Never `$PATH` or the environment: the agent
/// runs as root and freezes filesystems with whatever it finds.
const SYSTEM_DIRS: &[&str] = &[
    "/usr/libexec/ferry",
    "/usr/lib/ferry",
    "/usr/local/libexec/ferry",
    "/usr/local/lib/ferry",
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
];

/// Why the watchdog at `path` must not be run, if it must not: the file ([`crate::trust`]:
/// a regular file, not a link, owned by root or the agent's user, not group/world-writable) and
/// every directory above it.
fn untrusted(path: &Path) -> Option<String> {
    if let Err(why) = crate::trust::open_executable(path) {
        return Some(match why {
            crate::trust::Refused::Skip(w) => w.to_string(),
            crate::trust::Refused::Insecure(w) => w,
            crate::trust::Refused::Io(e) => e.to_string(),
        });
    }
    match crate::trust::insecure_dirs(path.parent().unwrap_or(Path::new("/"))) {
        Ok(None) => None,
        Ok(Some((at, why))) => Some(format!("its directory {} is {why}", at.display())),
        Err(e) => Some(e.to_string()),
    }
}

/// Finds the watchdog binary: next to the agent's executable (and one directory up, where cargo
/// puts the binaries tests run), then the [`SYSTEM_DIRS`]. A candidate that is there but not
/// trusted is reported, not run, and the search goes on.
pub fn locate_watchdog() -> Result<PathBuf, FreezeError> {
    let mut looked = Vec::new();
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(dir.clone());
        if let Some(up) = dir.parent() {
            dirs.push(up.to_path_buf());
        }
    }
    dirs.extend(SYSTEM_DIRS.iter().map(PathBuf::from));
    for d in dirs {
        let p = d.join(WATCHDOG_NAME);
        if std::fs::symlink_metadata(&p).is_err() {
            looked.push(p.display().to_string());
            continue;
        }
        match untrusted(&p) {
            None => return Ok(p),
            Some(why) => {
                tracing::warn!(path = %p.display(), %why, "not using this thaw watchdog binary");
                looked.push(format!("{} (not used: {why})", p.display()));
            }
        }
    }
    Err(FreezeError::WatchdogMissing {
        looked: looked.join(", "),
    })
}

fn send(fd: RawFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is a valid buffer for its length; MSG_NOSIGNAL turns a closed peer into
    // EPIPE instead of SIGPIPE.
    let r = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout_ns` (negative: forever) for a packet. `Ok(None)` on timeout,
/// `Ok(Some(empty))` on end-of-file.
fn recv_timeout(fd: RawFd, timeout_ns: i64) -> io::Result<Option<Vec<u8>>> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: (timeout_ns.max(0) / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns.max(0) % 1_000_000_000) as libc::c_long,
    };
    let tsp = if timeout_ns < 0 {
        std::ptr::null()
    } else {
        &ts as *const libc::timespec
    };
    // SAFETY: `pfd` is one valid pollfd; `tsp` is null or points at `ts`, alive for the call.
    let r = unsafe { libc::ppoll(&mut pfd, 1, tsp, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(e)
        };
    }
    if r == 0 {
        return Ok(None);
    }
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            // The peer is gone: same as end-of-file.
            Some(libc::ECONNRESET) => Ok(Some(Vec::new())),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut sv = [0 as RawFd; 2];
    // SAFETY: `sv` is a writable array of two ints, as socketpair expects.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by socketpair and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// What the watchdog said about the cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It thawed nothing before the cut was done: the freeze held.
    Held,
    /// It thawed (bound expired) before the cut was done.
    Fired,
    /// It vanished or did not answer: we cannot tell.
    Lost(String),
}

/// The agent's handle on a running watchdog.
pub(crate) struct Watchdog {
    child: Child,
    sock: OwnedFd,
    fired: bool,
}

impl Watchdog {
    /// Spawns the watchdog for `mounts` (in freeze order) and waits until it holds them all.
    pub fn spawn(binary: &Path, mounts: &[(Dev, &Path)]) -> Result<Watchdog, FreezeError> {
        let start = |what, source| FreezeError::WatchdogStart { what, source };
        // Checked and run from one open descriptor (crate::trust), every time.
        let file = crate::trust::open_executable(binary).map_err(|why| {
            start(
                "checking the binary",
                match why {
                    crate::trust::Refused::Io(e) => e,
                    crate::trust::Refused::Skip(w) => io::Error::other(w),
                    crate::trust::Refused::Insecure(w) => io::Error::other(w),
                },
            )
        })?;
        if let Some((at, why)) =
            crate::trust::insecure_dirs(binary.parent().unwrap_or(Path::new("/")))
                .map_err(|e| start("checking its directories", e))?
        {
            return Err(start(
                "checking its directories",
                io::Error::other(format!("{} is {why}", at.display())),
            ));
        }
        let (ours, theirs) = socket_pair().map_err(|e| start("socketpair", e))?;
        let mut cmd = crate::trust::command_for(&file, binary);
        cmd.arg(PROTOCOL);
        for (dev, path) in mounts {
            cmd.arg(dev.to_string()).arg(path);
        }
        // Stdio::from dup2()s the socket onto fd 0 of the child, clearing close-on-exec there
        // only. Nothing else of ours is inherited (std opens everything close-on-exec).
        cmd.stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .map_err(|e| start("spawn ferry-thaw-watchdog", e))?;
        let mut wd = Watchdog {
            child,
            sock: ours,
            fired: false,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                wd.kill();
                return Err(start(
                    "waiting for it to be ready",
                    io::Error::new(io::ErrorKind::TimedOut, "no answer within 5 s"),
                ));
            }
            match recv_timeout(wd.sock.as_raw_fd(), left.as_nanos() as i64) {
                Ok(None) => continue,
                Ok(Some(m)) if m.first() == Some(&MSG_READY) => return Ok(wd),
                Ok(Some(m)) => {
                    let text = if m.first() == Some(&MSG_ERROR) {
                        String::from_utf8_lossy(&m[1..]).into_owned()
                    } else if m.is_empty() {
                        "it exited at once (wrong version of the binary?)".to_owned()
                    } else {
                        format!("unexpected message {:?}", String::from_utf8_lossy(&m))
                    };
                    wd.kill();
                    return Err(start("checking the mount points", io::Error::other(text)));
                }
                Err(e) => {
                    wd.kill();
                    return Err(start("waiting for it to be ready", e));
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the clock: the watchdog thaws at `deadline_ns` (CLOCK_MONOTONIC).
    pub fn arm(&self, deadline_ns: i64) -> io::Result<()> {
        let mut msg = [0u8; 9];
        msg[0] = MSG_ARM;
        msg[1..].copy_from_slice(&deadline_ns.to_ne_bytes());
        send(self.sock.as_raw_fd(), &msg)
    }

    /// Whether the watchdog has announced that it fired (non-blocking).
    pub fn fired(&mut self) -> bool {
        while !self.fired {
            match recv_timeout(self.sock.as_raw_fd(), 0) {
                Ok(Some(m)) if m.first() == Some(&MSG_FIRED) => self.fired = true,
                Ok(Some(m)) if !m.is_empty() => continue,
                _ => break,
            }
        }
        self.fired
    }

    /// Tells the watchdog the cut is done and asks whether it held.
    pub fn done(&mut self) -> Verdict {
        if self.fired() {
            return Verdict::Fired;
        }
        if let Err(e) = send(self.sock.as_raw_fd(), &[MSG_DONE]) {
            // Gone: it may still have said "fired" before going.
            return if self.fired() {
                Verdict::Fired
            } else {
                Verdict::Lost(format!("it was gone when the cut ended ({e})"))
            };
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Verdict::Lost("it did not answer within 1 s".into());
            }
            match recv_timeout(self.sock.as_raw_fd(), left.as_nanos() as i64) {
                Ok(None) => continue,
                Ok(Some(m)) => match m.first() {
                    Some(&MSG_FIRED) => {
                        self.fired = true;
                        return Verdict::Fired;
                    }
                    Some(&MSG_OK) => return Verdict::Held,
                    Some(_) => continue,
                    None => return Verdict::Lost("it exited before answering".into()),
                },
                Err(e) => return Verdict::Lost(format!("reading its answer: {e}")),
            }
        }
    }

    /// Ends the watchdog: `Q` if the agent thawed everything (`thawed`), otherwise just
    /// end-of-file so the watchdog thaws once more itself; then waits for it to exit, so no
    /// stale watchdog can thaw a later freeze.
    pub fn release(mut self, thawed: bool) {
        if thawed {
            let _ = send(self.sock.as_raw_fd(), &[MSG_QUIT]);
        }
        // Closing our end is the end-of-file.
        // SAFETY: shutdown on an open socket we own; the fd stays valid until dropped.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_micros(200)),
                // ECHILD: someone else reaped it (SIGCHLD ignored): it is gone.
                Err(_) => return,
            }
        }
        tracing::warn!(
            pid = self.child.id(),
            "thaw watchdog did not exit within 2 s of the end of the cut; killing it"
        );
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The watchdog process itself (`ferry-thaw-watchdog`): a thin `main` calls `run`.

/// The watchdog's entry point: `ferry-thaw-watchdog ferry-thaw-watchdog-v1 (M:m PATH)...`, with
/// the agent's socket on standard input. Returns the exit code.
#[doc(hidden)]
pub fn run(args: Vec<OsString>) -> i32 {
    const SOCK: RawFd = 0;
    detach();
    let mut it = args.into_iter().skip(1);
    if it.next().as_deref() != Some(std::ffi::OsStr::new(PROTOCOL)) {
        let msg = format!(
            "{WATCHDOG_NAME}: started with another protocol than {PROTOCOL}: install the \
             {WATCHDOG_NAME} built with this agent"
        );
        eprintln!("{msg}");
        let _ = send(SOCK, format!("E{msg}").as_bytes());
        return 2;
    }
    let rest: Vec<OsString> = it.collect();
    let mut fds: Vec<(OwnedFd, PathBuf)> = Vec::new();
    for pair in rest.chunks(2) {
        let [dev, path] = pair else {
            let _ = send(SOCK, b"Eodd number of arguments");
            return 2;
        };
        let path = PathBuf::from(OsString::from_vec(path.clone().into_vec()));
        match open_checked(dev, &path) {
            Ok(fd) => fds.push((fd, path)),
            Err(e) => {
                let _ = send(SOCK, format!("E{}: {e}", path.display()).as_bytes());
                return 1;
            }
        }
    }
    if send(SOCK, &[MSG_READY]).is_err() {
        return 1;
    }
    // Thaw in reverse freeze order.
    let thaw_order: Vec<RawFd> = fds.iter().rev().map(|(fd, _)| fd.as_raw_fd()).collect();
    let thaw_all = || {
        for &fd in &thaw_order {
            let _ = sys::raw_thaw(fd);
        }
    };
    let mut deadline: Option<i64> = None;
    let mut fired = false;
    let mut done = false;
    let give_up = sys::monotonic_ns().saturating_add(ARM_TIMEOUT_NS);
    loop {
        let target = deadline.unwrap_or(give_up);
        let wait = target.saturating_sub(sys::monotonic_ns()).max(0);
        match recv_timeout(SOCK, wait) {
            Ok(Some(m)) => match m.first() {
                None => {
                    // End-of-file: the agent ended, on purpose or not (perhaps inside FIFREEZE,
                    // with RCU grace periods expedited: put that back too).
                    thaw_all();
                    if let Err(e) = crate::rcu::restore_if_ours() {
                        eprintln!(
                            "{WATCHDOG_NAME}: cannot put {} back to 0: {e}",
                            crate::rcu::KNOB
                        );
                    }
                    if deadline.is_some() && !done {
                        eprintln!("{WATCHDOG_NAME}: the agent ended during a freeze; thawed");
                    }
                    return 0;
                }
                Some(&MSG_ARM) if m.len() >= 9 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&m[1..9]);
                    deadline = Some(i64::from_ne_bytes(b));
                }
                Some(&MSG_DONE) => {
                    done = true;
                    let _ = send(SOCK, &[if fired { MSG_FIRED } else { MSG_OK }]);
                }
                Some(&MSG_QUIT) => return 0,
                Some(_) => {}
            },
            Ok(None) => {
                let now = sys::monotonic_ns();
                if now < target {
                    continue; // interrupted early
                }
                if deadline.is_none() {
                    return 0; // never armed: nothing was frozen under us
                }
                if !fired && !done {
                    let _ = send(SOCK, &[MSG_FIRED]);
                }
                if !fired {
                    eprintln!(
                        "{WATCHDOG_NAME}: the freeze outlived its bound; thawing {} filesystem(s)",
                        thaw_order.len()
                    );
                }
                fired = true;
                thaw_all();
                deadline = Some(sys::monotonic_ns().saturating_add(RETHAW_NS));
            }
            Err(_) => {
                thaw_all();
                return 1;
            }
        }
    }
}

/// Opens a mount point and checks it is the filesystem the agent meant.
fn open_checked(dev: &OsString, path: &Path) -> Result<OwnedFd, String> {
    let want = dev.to_str().unwrap_or_default();
    let fd = sys::open_dir(path).map_err(|e| format!("cannot open: {e}"))?;
    let got = Dev::from_dev_t(sys::fd_dev(&fd).map_err(|e| format!("cannot stat: {e}"))?);
    if got.to_string() != want {
        return Err(format!(
            "is filesystem {got}, the agent expected {want} (mounts changed?)"
        ));
    }
    Ok(fd)
}

/// Leaves the terminal's process group and ignores the signals a stop or a Ctrl-C sends.
fn detach() {
    // SAFETY: setsid has no preconditions; it fails harmlessly if we lead a group already.
    unsafe { libc::setsid() };
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGPIPE,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: SIG_IGN is a valid disposition for these catchable signals.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    // Be scheduled promptly and never paged out while a freeze runs; both are best effort
    // (need CAP_SYS_NICE / CAP_IPC_LOCK, which the freezing agent has as root).
    // SAFETY: plain system calls on this process, no pointers.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, -10);
        libc::mlockall(libc::MCL_CURRENT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_watchdog_others_could_change_is_not_used() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(WATCHDOG_NAME);
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(untrusted(&p), None);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(untrusted(&p).unwrap().contains("writable"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(untrusted(&p).unwrap().contains("directory"));
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(untrusted(&link).unwrap().contains("symbolic link"));
    }
}
