//! The admin socket: how the operator's commands reach a running `ferry serve`.
//!
//! `STATE_DIR/admin.sock` is a Unix stream socket. A command connects, sends one request (one
//! line of JSON, at most [`MAX_REQUEST`] bytes) and reads one reply (one line of JSON), then the
//! connection closes:
//!
//! ```text
//! → {"format":"ferry-admin","version":1,"args":["throttle","set","50MiB/s","--vm","web"]}
//! ← {"format":"ferry-admin","version":1,"exit":0,"stdout":"…","stderr":"…"}
//! ```
//!
//! `args` are the `ferry` command line after the program name. The server runs the command itself
//! (the handler is the CLI's, [`Handler`]), on its own state directory, configuration and store,
//! and answers with what the command printed and its exit status: the same commands, the same
//! output, whether they run here or in a stopped server's state directory.
//!
//! Who may connect is the kernel's check of the socket file's permissions, as for Docker's or
//! libvirt's sockets:
//! - The socket is bound in a private 0700 directory, given mode 0600 (the server's user; root
//!   passes every check), or 0660 and the admin group (`ferry` unless `admin_group` says
//!   otherwise) when that group exists and the server's user may give it the socket, then renamed
//!   into place: no one can connect before its permissions are final. The state directory then
//!   gets the group's search bit (`g+x`, never read: members reach the socket by name, and cannot
//!   list the directory).
//! - The server does not check `SO_PEERCRED` against a list: under the shipped unit it runs in a
//!   private user namespace (`PrivateUsers=yes`) where callers other than root and its own user
//!   show as `nobody`. It logs the peer's pid and uid with each command (changes at info level,
//!   reads at debug).
//! - A socket that cannot be made (a file in the way, a path too long for a socket address) is a
//!   warning: the server runs without one, and the commands work on the files. Only a socket that
//!   answers (another server on the same state directory) stops the start.
//!
//! At most [`MAX_CLIENTS`] commands run at once, the last slot kept for root; more are answered
//! "busy" (exit 75). A request must arrive whole within [`READ_TIMEOUT`], and a reply that the
//! client does not read within 30 s is dropped.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The socket, in the state directory.
pub const SOCKET: &str = "admin.sock";
/// The group whose members may use the socket unless the configuration names another.
pub const DEFAULT_GROUP: &str = "ferry";
/// The largest request accepted, bytes (a command line).
pub const MAX_REQUEST: usize = 64 << 10;
/// The largest reply a client accepts, bytes.
pub const MAX_REPLY: usize = 64 << 20;
/// The most arguments in one request.
pub const MAX_ARGS: usize = 64;
/// Commands running at once.
pub const MAX_CLIENTS: usize = 8;
/// How long the server waits for a request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit status of a reply refused because [`MAX_CLIENTS`] commands run (EX_TEMPFAIL).
pub const EXIT_BUSY: u8 = 75;

const FORMAT: &str = "ferry-admin";
const VERSION: u32 = 1;

/// One command for the server to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    format: String,
    version: u32,
    /// The `ferry` command line after the program name.
    pub args: Vec<String>,
}

impl Request {
    pub fn new(args: Vec<String>) -> Request {
        Request {
            format: FORMAT.into(),
            version: VERSION,
            args,
        }
    }
}

/// What the command printed and how it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    format: String,
    version: u32,
    pub exit: u8,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    pub fn new(exit: u8, stdout: String, stderr: String) -> Reply {
        Reply {
            format: FORMAT.into(),
            version: VERSION,
            exit,
            stdout,
            stderr,
        }
    }

    fn error(exit: u8, msg: impl Into<String>) -> Reply {
        let mut m = msg.into();
        m.push('\n');
        Reply::new(exit, String::new(), format!("error: {m}"))
    }
}

fn check_header(format: &str, version: u32) -> Result<(), String> {
    if format != FORMAT {
        return Err(format!("not a Ferry admin message (format {format:?})"));
    }
    if version != VERSION {
        return Err(format!(
            "admin protocol version {version}; this ferry speaks version {VERSION}: use the ferry binary of the same release as the server"
        ));
    }
    Ok(())
}

/// Parses a request line (without its newline).
pub fn parse_request(bytes: &[u8]) -> Result<Request, String> {
    if bytes.len() > MAX_REQUEST {
        return Err(format!(
            "request of {} bytes; the most is {MAX_REQUEST}",
            bytes.len()
        ));
    }
    let r: Request = serde_json::from_slice(bytes).map_err(|e| format!("bad request: {e}"))?;
    check_header(&r.format, r.version)?;
    if r.args.is_empty() {
        return Err("empty command line".into());
    }
    if r.args.len() > MAX_ARGS {
        return Err(format!(
            "{} arguments; the most is {MAX_ARGS}",
            r.args.len()
        ));
    }
    if r.args.iter().any(|a| a.contains('\0')) {
        return Err("an argument holds a NUL byte".into());
    }
    Ok(r)
}

/// Parses a reply line (without its newline).
pub fn parse_reply(bytes: &[u8]) -> Result<Reply, String> {
    if bytes.len() > MAX_REPLY {
        return Err(format!(
            "reply of {} bytes; the most is {MAX_REPLY}",
            bytes.len()
        ));
    }
    let r: Reply = serde_json::from_slice(bytes).map_err(|e| format!("bad reply: {e}"))?;
    check_header(&r.format, r.version)?;
    Ok(r)
}

/// Runs one command line for a client: `args` as sent. Called on the connection's own thread.
pub type Handler = Arc<dyn Fn(Vec<String>) -> Reply + Send + Sync>;

/// The peer of a connection, from `SO_PEERCRED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// The credentials of the process at the other end of `s`.
pub fn peer(s: &UnixStream) -> std::io::Result<Peer> {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` is a valid ucred and `len` its size; the fd is open for the call's duration.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Peer {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    })
}

/// The id of group `name`, if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `group` is plain old data (integers and pointers); all-zero is a valid value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 << 10];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `grp`'s fields (we
    // only read gr_gid, a plain integer).
    let r = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    (r == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// The admin socket of a running server. Accepts on its own thread from [`AdminServer::start`]
/// until dropped; the drop stops the thread and removes the socket if it is still this one.
pub struct AdminServer {
    path: PathBuf,
    /// (dev, ino) of the socket bound: a drop removes only that one.
    ident: (u64, u64),
    admin_gid: Option<u32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Why the socket could not be opened: [`StartError::Taken`] stops the start (two servers on one
/// state directory); any other is a warning and the server runs without a socket.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Taken(String),
    #[error("{0}")]
    Failed(String),
}

struct Conns {
    handler: Handler,
    running: AtomicUsize,
}

/// Gives back a command slot when dropped (also when the command panics).
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AdminServer {
    /// Binds `STATE_DIR/admin.sock` and starts accepting. Call only while holding the store's
    /// lock (one server per store). The socket is bound in a private 0700 directory, given its
    /// mode (and group) there, and renamed into place: no one can connect before its permissions
    /// are final, and a socket a killed server left is replaced in one step.
    pub fn start(
        state_dir: &Path,
        group: &str,
        handler: Handler,
    ) -> Result<AdminServer, StartError> {
        use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
        let path = state_dir.join(SOCKET);
        let fail = |what: &str, e: std::io::Error| StartError::Failed(format!("{what}: {e}"));
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(StartError::Failed(format!(
                    "{} exists and is not a socket; move it away (ferry serve makes its admin socket there)",
                    path.display()
                )));
            }
            Ok(_) => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(StartError::Taken(format!(
                        "{} answers: another ferry serve uses this state directory; stop it first",
                        path.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(&path.display().to_string(), e)),
        }
        let private = state_dir.join(format!(".admin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&private);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(|e| fail(&private.display().to_string(), e))?;
        struct Cleanup<'a>(&'a Path);
        impl Drop for Cleanup<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(self.0);
            }
        }
        let _cleanup = Cleanup(&private);
        let tmp = private.join("s");
        let listener = UnixListener::bind(&tmp).map_err(|e| fail(&tmp.display().to_string(), e))?;
        let admin_gid = group_id(group);
        let mut mode = 0o600;
        if let Some(g) = admin_gid {
            // The server's own group needs no chown (and the shipped unit's system-call filter
            // refuses chown): only another group does, which the server's user must be in.
            let own = std::fs::metadata(&tmp).map(|m| m.gid()).ok();
            let r = if own == Some(g) {
                Ok(())
            } else {
                std::os::unix::fs::chown(&tmp, None, Some(g))
            };
            match r {
                Ok(()) => mode = 0o660,
                Err(e) => {
                    tracing::warn!(group, error = %e, "cannot give the admin socket to the admin group: root and the server's user only (mode 0600)")
                }
            }
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail(&tmp.display().to_string(), e))?;
        if mode == 0o660 {
            if let Some(g) = admin_gid {
                group_may_search(state_dir, g);
            }
        }
        std::fs::rename(&tmp, &path).map_err(|e| fail(&path.display().to_string(), e))?;
        let m =
            std::fs::symlink_metadata(&path).map_err(|e| fail(&path.display().to_string(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(&path.display().to_string(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Conns {
            handler,
            running: AtomicUsize::new(0),
        });
        let st = stop.clone();
        let shown = path.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-admin-accept".into())
            .spawn(move || accept_loop(&listener, &conns, &st, &shown))
            .map_err(|e| fail("cannot start the admin socket's thread", e))?;
        Ok(AdminServer {
            path,
            ident: (m.dev(), m.ino()),
            admin_gid: (mode == 0o660).then_some(admin_gid).flatten(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The admin group, when the socket is its (mode 0660).
    pub fn group_id(&self) -> Option<u32> {
        self.admin_gid
    }
}

/// Gives group `g` search permission (never read) on the state directory, through a descriptor
/// opened without following a symlink. Failures are warnings: the group then cannot reach the
/// socket, root still can.
fn group_may_search(state_dir: &Path, g: u32) {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let r = (|| -> std::io::Result<()> {
        let d = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(state_dir)?;
        let m = d.metadata()?;
        if m.gid() != g {
            std::os::unix::fs::fchown(&d, None, Some(g))?;
        }
        if m.mode() & 0o010 == 0 {
            d.set_permissions(std::fs::Permissions::from_mode((m.mode() & 0o7777) | 0o010))?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!(dir = %state_dir.display(), error = %e, "cannot let the admin group into the state directory (g+x): only root and the server's user can reach the admin socket");
    }
}

fn accept_loop(listener: &UnixListener, conns: &Arc<Conns>, stop: &AtomicBool, path: &Path) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => serve_one(conns, s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "admin socket: accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Commands that change nothing: logged at debug level, the others at info (who asked what).
fn read_only(args: &[String]) -> bool {
    let a: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    matches!(
        a.as_slice(),
        ["status", ..] | ["events", ..] | [_, "show", ..] | [_, "list", ..]
    ) && !args.iter().any(|a| a == "set")
}

fn serve_one(conns: &Arc<Conns>, s: UnixStream) {
    let _ = s.set_nonblocking(false);
    let peer = match peer(&s) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "admin socket: cannot read the peer's credentials; connection refused");
            return;
        }
    };
    // The last slot is root's: others filling the rest cannot lock root out.
    let n = conns.running.fetch_add(1, Ordering::SeqCst);
    let slot = Slot(&conns.running);
    if n >= MAX_CLIENTS || (n + 1 >= MAX_CLIENTS && peer.uid != 0) {
        drop(slot);
        let _ = answer(
            &s,
            &Reply::error(
                EXIT_BUSY,
                format!("the server runs {MAX_CLIENTS} admin commands already; try again"),
            ),
        );
        return;
    }
    std::mem::forget(slot);
    let c = conns.clone();
    let spawned = std::thread::Builder::new()
        .name("ferry-admin".into())
        .spawn(move || {
            let _slot = Slot(&c.running);
            let reply = match read_request(&s) {
                Ok(r) => {
                    if read_only(&r.args) {
                        tracing::debug!(uid = peer.uid, pid = peer.pid, args = ?r.args, "admin command");
                    } else {
                        tracing::info!(uid = peer.uid, pid = peer.pid, args = ?r.args, "admin command");
                    }
                    // A command that panics answers an error; the server goes on.
                    let h = c.handler.clone();
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(r.args)))
                        .unwrap_or_else(|_| {
                            Reply::error(1, "the command failed inside the server (see its log)")
                        })
                }
                Err(e) => Reply::error(2, e),
            };
            let _ = answer(&s, &reply);
        });
    if let Err(e) = spawned {
        conns.running.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(error = %e, "admin socket: cannot start a thread");
    }
}

impl Drop for AdminServer {
    /// Stops accepting; removes the socket if it is still the one this server bound.
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.ident) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads one request line, within [`READ_TIMEOUT`] in all.
fn read_request(mut s: &UnixStream) -> Result<Request, String> {
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no whole request within {}",
                humantime::format_duration(READ_TIMEOUT)
            ));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(format!("cannot read the request: {e}")),
        };
        if n == 0 {
            return Err("the request ended without a newline".into());
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(i) = line.iter().position(|b| *b == b'\n') {
            line.truncate(i);
            return parse_request(&line);
        }
        if line.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
    }
}

/// Writes the reply, giving up after 30 s in all (a client that does not read).
fn answer(mut s: &UnixStream, r: &Reply) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut b = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    b.push(b'\n');
    for piece in b.chunks(64 << 10) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client does not read",
            ));
        }
        s.set_write_timeout(Some(left))?;
        s.write_all(piece)?;
    }
    s.flush()
}

/// What a client found at a state directory's admin socket.
#[derive(Debug)]
pub enum Reach {
    /// The server ran the command.
    Ran(Reply),
    /// No server answers there (no socket, or one left by a server that is gone): the command
    /// may work on the state directory itself.
    NoServer,
    /// A server runs but cannot be used (permission, protocol): the message says why.
    Failed(String),
}

/// Sends `args` to the server of `state_dir` and waits up to `timeout` for its reply.
pub fn call(state_dir: &Path, args: Vec<String>, timeout: Duration) -> Reach {
    let path = state_dir.join(SOCKET);
    let s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ConnectionRefused
                    // A path too long for a socket address: no server can be there either.
                    | std::io::ErrorKind::InvalidInput
            ) =>
        {
            return Reach::NoServer
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Reach::Failed(format!(
                "cannot use the running server's admin socket {}: permission denied; run the command as root, or as a member of the server's admin group (`ferry` unless admin_group says otherwise; docs/SECURITY.md)",
                path.display()
            ))
        }
        Err(e) => {
            return Reach::Failed(format!(
                "cannot reach the running server's admin socket {}: {e}",
                path.display()
            ))
        }
    };
    let run = || -> Result<Reply, String> {
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut b = serde_json::to_vec(&Request::new(args)).map_err(|e| e.to_string())?;
        b.push(b'\n');
        (&s).write_all(&b)
            .map_err(|e| format!("cannot send the command: {e}"))?;
        let mut line = Vec::new();
        BufReader::new(&s)
            .take(MAX_REPLY as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                    "the server did not answer within {}",
                    humantime::format_duration(timeout)
                ),
                _ => format!("cannot read the server's answer: {e}"),
            })?;
        if line.pop() != Some(b'\n') {
            return Err("the server closed the connection without an answer (did it stop?)".into());
        }
        parse_reply(&line)
    };
    match run() {
        Ok(r) => Reach::Ran(r),
        Err(e) => Reach::Failed(format!("admin socket {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let r = Request::new(vec!["throttle".into(), "show".into()]);
        let b = serde_json::to_vec(&r).unwrap();
        assert_eq!(parse_request(&b).unwrap(), r);
        for bad in [
            &br#"{"format":"ferry-admin","version":1,"args":[]}"#[..],
            br#"{"format":"ferry-admin","version":2,"args":["status"]}"#,
            br#"{"format":"other","version":1,"args":["status"]}"#,
            br#"{"format":"ferry-admin","version":1,"args":["st\u0000atus"]}"#,
            br#"{"format":"ferry-admin","version":1,"args":["status"],"x":1}"#,
            b"not json",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let many = Request::new(vec!["x".into(); MAX_ARGS + 1]);
        assert!(parse_request(&serde_json::to_vec(&many).unwrap()).is_err());
        assert!(parse_request(&vec![b' '; MAX_REQUEST + 1]).is_err());
    }

    #[test]
    fn a_server_answers_and_refuses_a_second_one_then_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let h: Handler = Arc::new(|args: Vec<String>| Reply::new(4, args.join(" "), "e".into()));
        let s = AdminServer::start(d.path(), "no-such-group-ferry-test", h.clone()).unwrap();
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        match call(
            d.path(),
            vec!["a".into(), "b c".into()],
            Duration::from_secs(5),
        ) {
            Reach::Ran(r) => assert_eq!(
                (r.exit, r.stdout.as_str(), r.stderr.as_str()),
                (4, "a b c", "e")
            ),
            other => panic!("{other:?}"),
        }
        // A malformed request gets an error reply, and the server goes on.
        let mut raw = UnixStream::connect(d.path().join(SOCKET)).unwrap();
        raw.write_all(b"{oops}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&raw).read_line(&mut line).unwrap();
        let r = parse_reply(line.trim_end().as_bytes()).unwrap();
        assert_eq!(r.exit, 2);
        assert!(r.stderr.contains("bad request"), "{}", r.stderr);
        // A client that sends part of a line and stalls is dropped within READ_TIMEOUT, and
        // holds no slot after that.
        let stalled = UnixStream::connect(d.path().join(SOCKET)).unwrap();
        (&stalled).write_all(b"{\"format\"").unwrap();
        assert!(matches!(
            AdminServer::start(d.path(), "x", h.clone()),
            Err(StartError::Taken(_))
        ));
        // Nothing but the socket is left of the private bind directory.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SOCKET)]);
        drop(s);
        assert!(!d.path().join(SOCKET).exists());
        assert!(matches!(
            call(d.path(), vec!["x".into()], Duration::from_secs(1)),
            Reach::NoServer
        ));
        drop(stalled);
        // A socket left behind (server killed) is replaced; a drop removes only its own.
        let stale = UnixListener::bind(d.path().join(SOCKET)).unwrap();
        drop(stale);
        assert!(matches!(
            call(d.path(), vec!["x".into()], Duration::from_secs(1)),
            Reach::NoServer
        ));
        let s = AdminServer::start(d.path(), "x", h.clone()).unwrap();
        std::fs::remove_file(d.path().join(SOCKET)).unwrap();
        let other = UnixListener::bind(d.path().join(SOCKET)).unwrap();
        drop(s);
        assert!(
            d.path().join(SOCKET).exists(),
            "a drop removed a socket it did not bind"
        );
        drop(other);
        // A file that is not a socket is left alone, and is no reason to stop the server.
        std::fs::remove_file(d.path().join(SOCKET)).unwrap();
        std::fs::write(d.path().join(SOCKET), b"keep").unwrap();
        assert!(matches!(
            AdminServer::start(d.path(), "x", h),
            Err(StartError::Failed(_))
        ));
        assert_eq!(std::fs::read(d.path().join(SOCKET)).unwrap(), b"keep");
    }

    #[test]
    fn reads_and_changes_are_told_apart_for_the_log() {
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert!(read_only(&v("status --json")));
        assert!(read_only(&v("throttle show")));
        assert!(read_only(&v("vms list --json")));
        assert!(!read_only(&v("throttle set 5MiB/s")));
        assert!(!read_only(&v("agents revoke abc")));
        assert!(!read_only(&v("policy set --vm show")));
    }
}
