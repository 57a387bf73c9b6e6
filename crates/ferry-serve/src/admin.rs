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
//! - The socket is bound under umask 0177 (mode 0600, the server's user only, from its first
//!   instant). If the admin group (`ferry` unless `admin_group` says otherwise) exists, the socket
//!   is then given to that group, mode 0660, and the state directory gets the group's search bit
//!   (`g+x`, never read: members can reach the socket by name, not list or open the 0600 files).
//! - Root passes every permission check. Nobody else can connect.
//! - The server does not check `SO_PEERCRED` against a list: under the shipped unit it runs in a
//!   private user namespace (`PrivateUsers=yes`), where every caller but root shows as `nobody`.
//!   It logs the peer's pid and uid at debug level.
//!
//! At most [`MAX_CLIENTS`] commands run at once; more are answered "busy" (exit 75). A client
//! that sends nothing for [`READ_TIMEOUT`] is dropped.

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

/// Errors of the socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// The admin socket of a running server: accepts until `finished`, then removes the socket.
pub struct AdminServer {
    listener: UnixListener,
    path: PathBuf,
    handler: Handler,
    admin_gid: Option<u32>,
    running: Arc<AtomicUsize>,
}

impl AdminServer {
    /// Binds `STATE_DIR/admin.sock`, replacing a socket left by a server that is gone (one that
    /// refuses connections). Call only while holding the store's lock (one server per state).
    pub fn bind(
        state_dir: &Path,
        group: &str,
        handler: Handler,
    ) -> Result<AdminServer, AdminError> {
        let path = state_dir.join(SOCKET);
        let io = |source| AdminError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt;
                if !m.file_type().is_socket() {
                    return Err(AdminError::Other(format!(
                        "{} exists and is not a socket; move it away (ferry serve makes its admin socket there)",
                        path.display()
                    )));
                }
                if UnixStream::connect(&path).is_ok() {
                    return Err(AdminError::Other(format!(
                        "{} answers: another ferry serve uses this state directory; stop it first",
                        path.display()
                    )));
                }
                std::fs::remove_file(&path).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // The socket is created with the process umask; no one may use it before its mode and
        // group are set: bind under a umask of 0177 (mode 0600).
        // SAFETY: umask has no preconditions; it is process-wide, restored at once.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(io)?;
        let admin_gid = group_id(group);
        if let Some(g) = admin_gid {
            std::os::unix::fs::chown(&path, None, Some(g)).map_err(io)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
            // The group must reach the socket: search (not read) permission on the state
            // directory, whose group becomes the admin group if it was another.
            let dio = |source| AdminError::Io {
                path: state_dir.to_owned(),
                source,
            };
            let m = std::fs::metadata(state_dir).map_err(dio)?;
            use std::os::unix::fs::MetadataExt;
            if m.gid() != g {
                std::os::unix::fs::chown(state_dir, None, Some(g)).map_err(dio)?;
            }
            if m.mode() & 0o010 == 0 {
                std::fs::set_permissions(
                    state_dir,
                    std::fs::Permissions::from_mode((m.mode() & 0o7777) | 0o010),
                )
                .map_err(dio)?;
            }
        }
        listener.set_nonblocking(true).map_err(io)?;
        Ok(AdminServer {
            listener,
            path,
            handler,
            admin_gid,
            running: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the admin group exists (the socket is then mode 0660, group-owned by it).
    pub fn group_id(&self) -> Option<u32> {
        self.admin_gid
    }

    /// Accepts connections until `finished`, each on its own thread; the socket is removed when
    /// the server is dropped.
    pub fn run(self, finished: &AtomicBool) {
        while !finished.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((s, _)) => self.serve_one(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::warn!(socket = %self.path.display(), error = %e, "admin socket: accept failed");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn serve_one(&self, s: UnixStream) {
        let _ = s.set_nonblocking(false);
        let peer = match peer(&s) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: cannot read the peer's credentials; connection refused");
                return;
            }
        };
        if self.running.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            self.running.fetch_sub(1, Ordering::SeqCst);
            let _ = answer(
                &s,
                &Reply::error(
                    EXIT_BUSY,
                    format!("the server runs {MAX_CLIENTS} admin commands already; try again"),
                ),
            );
            return;
        }
        let handler = self.handler.clone();
        let running = self.running.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-admin".into())
            .spawn(move || {
                let reply = match read_request(&s) {
                    Ok(r) => {
                        tracing::debug!(uid = peer.uid, pid = peer.pid, args = ?r.args, "admin command");
                        // A command that panics answers an error; the server goes on.
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(r.args)))
                            .unwrap_or_else(|_| {
                                Reply::error(1, "the command failed inside the server (see its log)")
                            })
                    }
                    Err(e) => Reply::error(2, e),
                };
                let _ = answer(&s, &reply);
                running.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.running.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "admin socket: cannot start a thread");
        }
    }
}

impl Drop for AdminServer {
    /// The socket goes with the server (run ended, or the start failed after binding it).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_request(s: &UnixStream) -> Result<Request, String> {
    s.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut r = BufReader::new(s).take(MAX_REQUEST as u64 + 1);
    r.read_until(b'\n', &mut line)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    parse_request(&line)
}

fn answer(mut s: &UnixStream, r: &Reply) -> std::io::Result<()> {
    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    let mut b = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    b.push(b'\n');
    s.write_all(&b)?;
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
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
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
        let s = AdminServer::bind(d.path(), "no-such-group-ferry-test", h.clone()).unwrap();
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        let t = std::thread::spawn(move || s.run(&f));
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
        assert!(AdminServer::bind(d.path(), "x", h.clone()).is_err());
        finished.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert!(!d.path().join(SOCKET).exists());
        assert!(matches!(
            call(d.path(), vec!["x".into()], Duration::from_secs(1)),
            Reach::NoServer
        ));
        // A socket left behind (server killed) is replaced.
        let stale = UnixListener::bind(d.path().join(SOCKET)).unwrap();
        drop(stale);
        assert!(matches!(
            call(d.path(), vec!["x".into()], Duration::from_secs(1)),
            Reach::NoServer
        ));
        AdminServer::bind(d.path(), "x", h).unwrap();
    }
}
