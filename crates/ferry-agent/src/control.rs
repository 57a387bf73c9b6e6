//! The running agent's control socket, `STATE_DIR/agent.sock` (mode 0600), and its client
//! (`ferry-agent cut`, `ferry-agent status`).
//!
//! Protocol: one JSON request line, one JSON reply line. `{"cut":"app"|"crash"}` →
//! `{"ok":true,"point":{…CutReply}}` once the point is acknowledged by the process server (and
//! named by it), or `{"ok":false,"error":"why"}`; `{"status":true}` → `{"ok":true,"status":{…}}`.
//!
//! Invariants: one agent per state directory (an exclusive `flock` on `agent.lock`, held for the
//! agent's life), so the socket always belongs to the agent that holds the lock.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use ferry_wire::PointKind;
use serde::{Deserialize, Serialize};

use crate::AgentError;

pub const SOCKET_FILE: &str = "agent.sock";

/// What a cut produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CutReply {
    /// The run (hex) whose tag is the point.
    pub run: String,
    #[serde(with = "kind_str")]
    pub kind: PointKind,
    /// The point id the process server gave it (as in `ferry points list`), when it said.
    pub point: Option<String>,
    /// Why the point is not what was asked (a failed hook), if anything.
    pub note: Option<String>,
    /// How long writers were blocked (first FIFREEZE to last FITHAW), if anything was frozen.
    pub freeze_ms: Option<f64>,
    /// Of that window: the time inside FIFREEZE (the kernel flushing each filesystem) ...
    #[serde(default)]
    pub freeze_kernel_ms: Option<f64>,
    /// ... and the time the cut held the filesystems frozen (reading the last writes, the tag).
    #[serde(default)]
    pub freeze_held_ms: Option<f64>,
    pub time_ns: u64,
}

mod kind_str {
    use ferry_wire::PointKind;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(k: &PointKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.as_str())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PointKind, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "app" => Ok(PointKind::App),
            "crash" => Ok(PointKind::Crash),
            _ => Err(serde::de::Error::custom(format!("unknown point kind {s}"))),
        }
    }
}

/// A request from the socket to the engine.
pub enum Request {
    Cut {
        kind: PointKind,
        reply: Sender<Result<CutReply, String>>,
    },
    Status {
        reply: Sender<serde_json::Value>,
    },
    /// Read every chunk again and send what differs (a checksum resync).
    Resync,
    /// The cutover's final point: the application was stopped by the cutover hooks and every
    /// filesystem of the disks is read-only, so the point is app-consistent without hooks or a
    /// freeze of its own (and whatever the tracker).
    CutQuiesced {
        reply: Sender<Result<CutReply, String>>,
        /// Some protected filesystem stays writable: freeze for the point.
        freeze: bool,
    },
    /// A notice for the process server (cutover, rollback).
    Notice {
        kind: u8,
        text: String,
    },
}

/// A request on the socket, as [`parse_request`] reads it and [`encode_request`] writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Cut(PointKind),
    Status,
    Resync,
    /// `allow_writable`.
    Cutover(bool),
    Rollback,
}

/// Reads one request line: the command, or the error the agent answers with.
pub fn parse_request(line: &str) -> Result<Command, String> {
    match serde_json::from_str::<Wire>(line) {
        Ok(Wire { cut: Some(k), .. }) => match k.as_str() {
            "app" => Ok(Command::Cut(PointKind::App)),
            "crash" => Ok(Command::Cut(PointKind::Crash)),
            _ => Err(format!("unknown point kind '{k}' (app or crash)")),
        },
        Ok(Wire {
            resync: Some(true), ..
        }) => Ok(Command::Resync),
        Ok(Wire {
            cutover: Some(c), ..
        }) => match c.as_str() {
            "start" => Ok(Command::Cutover(false)),
            "start-allow-writable" => Ok(Command::Cutover(true)),
            "rollback" => Ok(Command::Rollback),
            _ => Err(format!("unknown cutover step '{c}' (start or rollback)")),
        },
        Ok(Wire {
            status: Some(true), ..
        }) => Ok(Command::Status),
        _ => Err("bad request; send {\"cut\":\"app\"|\"crash\"} or {\"status\":true}".into()),
    }
}

/// The request line (without its newline) the client sends for `c`.
pub fn encode_request(c: Command) -> Result<String, serde_json::Error> {
    let w = match c {
        Command::Cut(k) => Wire {
            cut: Some(if k == PointKind::App { "app" } else { "crash" }.into()),
            ..Default::default()
        },
        Command::Status => Wire {
            status: Some(true),
            ..Default::default()
        },
        Command::Resync => Wire {
            resync: Some(true),
            ..Default::default()
        },
        Command::Cutover(allow) => Wire {
            cutover: Some(
                if allow {
                    "start-allow-writable"
                } else {
                    "start"
                }
                .into(),
            ),
            ..Default::default()
        },
        Command::Rollback => Wire {
            cutover: Some("rollback".into()),
            ..Default::default()
        },
    };
    serde_json::to_string(&w)
}

/// A reply line, as the client reads it: `{"ok":true,…}` (the whole object) or the agent's error.
pub enum Reply {
    Ok(serde_json::Value),
    Refused(String),
}

/// Reads one reply line.
pub fn parse_reply(line: &str) -> Result<Reply, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_str(line)?;
    Ok(if v["ok"] == serde_json::Value::Bool(true) {
        Reply::Ok(v)
    } else {
        Reply::Refused(
            v["error"]
                .as_str()
                .unwrap_or("the agent refused")
                .to_string(),
        )
    })
}

#[derive(Serialize, Deserialize, Default)]
struct Wire {
    #[serde(skip_serializing_if = "Option::is_none")]
    cut: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resync: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cutover: Option<String>,
}

use crate::state_err;

/// Holds `STATE_DIR/agent.lock` exclusively for the agent's life.
pub struct StateLock(#[allow(dead_code)] File);

pub fn lock_state_dir(state_dir: &Path) -> Result<StateLock, AgentError> {
    let path = state_dir.join("agent.lock");
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| state_err(&path, e))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(state_err(
            &path,
            "another ferry-agent runs with this state directory; stop it first (or use `ferry-agent cut` to talk to it)",
        ));
    }
    Ok(StateLock(f))
}

/// The listening socket; removed when dropped.
pub struct Control {
    path: PathBuf,
    done: Arc<AtomicBool>,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        let _ = fs::remove_file(&self.path);
    }
}

/// Listens on `STATE_DIR/agent.sock` and forwards requests to the engine; a cutover is run here
/// ([`crate::cutover`]), with the engine cutting its final point.
pub fn listen(
    state_dir: &Path,
    to_engine: Sender<Request>,
    cutover: Arc<crate::cutover::Ctx>,
) -> Result<Control, AgentError> {
    let path = state_dir.join(SOCKET_FILE);
    // We hold the state lock, so a leftover socket is stale.
    let _ = fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| state_err(&path, e))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(|e| state_err(&path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| state_err(&path, e))?;
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            while !d.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let to = to_engine.clone();
                        let cutover = cutover.clone();
                        std::thread::spawn(move || {
                            if let Err(e) = serve_one(s, &to, &cutover) {
                                tracing::debug!(error = %e, "control connection");
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        })
        .map_err(|e| state_err(&path, e))?;
    Ok(Control { path, done })
}

fn serve_one(
    s: UnixStream,
    to: &Sender<Request>,
    cutover: &crate::cutover::Ctx,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let reply = match parse_request(&line) {
        Err(why) => serde_json::json!({"ok": false, "error": why}),
        Ok(Command::Cut(kind)) => {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if to.send(Request::Cut { kind, reply: tx }).is_err() {
                serde_json::json!({"ok": false, "error": "the agent is stopping"})
            } else {
                match rx.recv() {
                    Ok(Ok(p)) => serde_json::json!({"ok": true, "point": p}),
                    Ok(Err(why)) => serde_json::json!({"ok": false, "error": why}),
                    Err(_) => {
                        serde_json::json!({"ok": false, "error": "the agent stopped before the point was acknowledged"})
                    }
                }
            }
        }
        Ok(Command::Cutover(allow)) => match crate::cutover::start(cutover, to, allow) {
            Ok(v) => serde_json::json!({"ok": true, "cutover": v}),
            Err(why) => serde_json::json!({"ok": false, "error": why}),
        },
        Ok(Command::Rollback) => match crate::cutover::rollback(cutover, to) {
            Ok(v) => serde_json::json!({"ok": true, "rollback": v}),
            Err(why) => serde_json::json!({"ok": false, "error": why}),
        },
        Ok(Command::Resync) => match to.send(Request::Resync) {
            Ok(()) => serde_json::json!({"ok": true}),
            Err(_) => serde_json::json!({"ok": false, "error": "the agent is stopping"}),
        },
        Ok(Command::Status) => {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let _ = to.send(Request::Status { reply: tx });
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(v) => serde_json::json!({"ok": true, "status": v}),
                Err(_) => {
                    serde_json::json!({"ok": false, "error": "the agent did not answer within 30 s"})
                }
            }
        }
    };
    let mut w = &s;
    writeln!(w, "{reply}")?;
    w.flush()
}

fn call(
    state_dir: &Path,
    req: Command,
    timeout: Duration,
) -> Result<serde_json::Value, AgentError> {
    let path = state_dir.join(SOCKET_FILE);
    let s = UnixStream::connect(&path).map_err(|e| {
        state_err(
            &path,
            format!("{e}: is ferry-agent running with --state-dir {}? (start it first; `ferry-agent --help`)", state_dir.display()),
        )
    })?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| state_err(&path, e))?;
    let mut w = &s;
    let body = encode_request(req).map_err(|e| state_err(&path, e))?;
    writeln!(w, "{body}").map_err(|e| state_err(&path, e))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| state_err(&path, format!("no answer from the agent: {e}")))?;
    match parse_reply(&line).map_err(|e| state_err(&path, format!("bad answer: {e}")))? {
        Reply::Ok(v) => Ok(v),
        Reply::Refused(why) => Err(AgentError::Cut(why)),
    }
}

/// Asks the running agent for a point and waits (up to `timeout`) until it is acknowledged.
pub fn request_cut(state_dir: &Path, app: bool, timeout: Duration) -> Result<CutReply, AgentError> {
    let v = call(
        state_dir,
        Command::Cut(if app {
            PointKind::App
        } else {
            PointKind::Crash
        }),
        timeout,
    )?;
    serde_json::from_value(v["point"].clone())
        .map_err(|e| AgentError::Protocol(format!("bad cut reply from the agent: {e}")))
}

/// The running agent's status.
pub fn request_status(state_dir: &Path) -> Result<serde_json::Value, AgentError> {
    let v = call(state_dir, Command::Status, Duration::from_secs(35))?;
    Ok(v["status"].clone())
}

/// Asks the running agent to cut over (`rollback`: to undo it) and waits up to `timeout`.
pub fn request_cutover(
    state_dir: &Path,
    rollback: bool,
    allow_writable: bool,
    timeout: Duration,
) -> Result<serde_json::Value, AgentError> {
    let v = call(
        state_dir,
        if rollback {
            Command::Rollback
        } else {
            Command::Cutover(allow_writable)
        },
        timeout,
    )
    .map_err(|e| match e {
        AgentError::Cut(why) => AgentError::Cutover(why),
        e => e,
    })?;
    Ok(v[if rollback { "rollback" } else { "cutover" }].clone())
}

/// Asks the running agent for a checksum resync of every disk (returns at once; points wait for it).
pub fn request_resync(state_dir: &Path) -> Result<(), AgentError> {
    call(state_dir, Command::Resync, Duration::from_secs(10)).map(|_| ())
}
