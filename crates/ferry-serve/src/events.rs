//! What happened and when (`ferry events`): an append-only log of JSON lines in the server's state
//! directory, written by the running server (connections, points pruned, quarantines, health
//! transitions, what agents report: cuts abandoned, hook failures, resyncs) and by the operator's
//! commands (throttle and policy changes, revocations, moves).
//!
//! - One line per event, appended with one `write` under `events.lock` (an exclusive `flock`, so
//!   the server and commands never interleave or race a rotation) and `fdatasync`ed: an event the
//!   log shows happened; a crash loses at most the event being written.
//! - Bounded: when `events.jsonl` passes [`ROTATE_AT`] it becomes `events.1.jsonl` (replacing the
//!   older one), so the log holds at most about twice that.
//! - Readers skip a line that does not parse (a torn last line after power loss) and say so.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The current log.
pub const EVENTS_FILE: &str = "events.jsonl";
/// The previous log (after a rotation).
pub const EVENTS_OLD_FILE: &str = "events.1.jsonl";
const LOCK_FILE: &str = "events.lock";
/// Size at which the log rotates.
pub const ROTATE_AT: u64 = 4 << 20;
/// Longest message kept (longer ones are cut).
const MAX_MESSAGE: usize = 2048;

/// One event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    /// What kind of thing happened (see docs/OPERATIONS.md#events): `server`, `agent`, `throttle`,
    /// `policy`, `health`, `quarantine`, `prune`, `cut`, `hook`, `resync`, …
    pub kind: String,
    /// The VM it concerns, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// What happened, for a person.
    pub message: String,
    /// Machine-readable details.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Event {
    pub fn new(kind: &str, vm: Option<&str>, message: impl Into<String>) -> Event {
        let mut message = printable(&message.into());
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            kind: kind.to_owned(),
            vm: vm.map(str::to_owned),
            message,
            data: serde_json::Value::Null,
        }
    }

    pub fn with(mut self, data: serde_json::Value) -> Event {
        self.data = data;
        self
    }

    /// When it happened.
    pub fn at(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.time).ok()
    }
}

/// `s` with control characters (terminal escapes an agent could send) written as `\u{..}`.
pub fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Appends `e` to the log of `state_dir` (see the module docs).
pub fn append(state_dir: &Path, e: &Event) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(state_dir.join(LOCK_FILE))?;
    // Made by root (an operator's command) while the server runs as its own user: the server's.
    ferry_durable::adopt_owner(&lock, state_dir)?;
    // SAFETY: flock on an fd this function owns; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let path = state_dir.join(EVENTS_FILE);
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if size >= ROTATE_AT {
        std::fs::rename(&path, state_dir.join(EVENTS_OLD_FILE))?;
        ferry_durable::fsync_dir(state_dir)?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    ferry_durable::adopt_owner(&f, state_dir)?;
    // A line torn by a crash has no newline: end it, so this event is not glued to it.
    let len = f.metadata()?.len();
    if len > 0 {
        use std::os::unix::fs::FileExt;
        let mut last = [0u8];
        f.read_exact_at(&mut last, len - 1)?;
        if last[0] != b'\n' {
            line.insert(0, b'\n');
        }
    }
    f.write_all(&line)?;
    ferry_durable::sync_data(&f)?;
    if len == 0 {
        ferry_durable::fsync_dir(state_dir)?;
    }
    Ok(())
}

/// Appends, logging (not returning) a failure: an event that cannot be recorded must not stop
/// what it reports on.
pub fn record(state_dir: &Path, e: Event) {
    if let Err(err) = append(state_dir, &e) {
        tracing::warn!(error = %err, kind = %e.kind, message = %e.message, "cannot record the event");
    }
}

/// Records events from async tasks and hot loops without blocking them: a channel to one writer
/// thread ([`Recorder::run`]).
#[derive(Clone)]
pub struct Recorder {
    tx: crossbeam_channel::Sender<Event>,
}

/// The writer half of a [`Recorder`].
pub struct Writer {
    rx: crossbeam_channel::Receiver<Event>,
    state_dir: PathBuf,
}

impl Recorder {
    /// A recorder into `state_dir` and the writer to run on a thread of its own.
    pub fn new(state_dir: &Path) -> (Recorder, Writer) {
        // Bounded: a flood of events (a flapping agent) must not grow memory; the excess is
        // dropped and counted in the log.
        let (tx, rx) = crossbeam_channel::bounded(4096);
        (
            Recorder { tx },
            Writer {
                rx,
                state_dir: state_dir.to_owned(),
            },
        )
    }

    pub fn record(&self, e: Event) {
        if self.tx.try_send(e).is_err() {
            tracing::warn!("events arrive faster than they can be recorded; one was dropped");
        }
    }
}

impl Writer {
    /// Writes events until `finished` is set and nothing is left.
    pub fn run(self, finished: &std::sync::atomic::AtomicBool) {
        use std::sync::atomic::Ordering;
        loop {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(e) => record(&self.state_dir, e),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if finished.load(Ordering::Relaxed) {
                        while let Ok(e) = self.rx.try_recv() {
                            record(&self.state_dir, e);
                        }
                        return;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

/// What a read found.
#[derive(Debug, Default)]
pub struct Read {
    pub events: Vec<Event>,
    /// Lines that did not parse (a torn write).
    pub skipped: usize,
}

/// The events of `state_dir`, oldest first, that match `since` and `vm`.
pub fn read(state_dir: &Path, since: Option<Duration>, vm: Option<&str>) -> std::io::Result<Read> {
    let cutoff = since.and_then(|s| SystemTime::now().checked_sub(s));
    let mut out = Read::default();
    for f in [EVENTS_OLD_FILE, EVENTS_FILE] {
        let text = match std::fs::read(state_dir.join(f)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(e) = serde_json::from_slice::<Event>(line) else {
                out.skipped += 1;
                continue;
            };
            if cutoff.is_some_and(|c| e.at().is_some_and(|t| t < c)) {
                continue;
            }
            if vm.is_some_and(|vm| e.vm.as_deref() != Some(vm)) {
                continue;
            }
            out.events.push(e);
        }
    }
    Ok(out)
}

/// The path of the current log, for messages.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(EVENTS_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_append_filter_rotate_and_survive_a_torn_line() {
        let d = tempfile::tempdir().unwrap();
        append(d.path(), &Event::new("throttle", None, "ingest 50 MiB/s")).unwrap();
        append(
            d.path(),
            &Event::new("quarantine", Some("web01"), "segment rotted")
                .with(serde_json::json!({"reason": "x"})),
        )
        .unwrap();
        let r = read(d.path(), None, None).unwrap();
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.events[1].data["reason"], "x");
        let r = read(d.path(), None, Some("web01")).unwrap();
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].kind, "quarantine");
        // An old event falls outside --since.
        let mut old = Event::new("server", None, "started");
        old.time = humantime::format_rfc3339_millis(SystemTime::now() - Duration::from_secs(7200))
            .to_string();
        append(d.path(), &old).unwrap();
        assert_eq!(
            read(d.path(), Some(Duration::from_secs(3600)), None)
                .unwrap()
                .events
                .len(),
            2
        );
        // A torn last line is skipped and counted.
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join(EVENTS_FILE))
            .unwrap();
        f.write_all(b"{\"time\":\"2026-").unwrap();
        drop(f);
        let r = read(d.path(), None, None).unwrap();
        assert_eq!((r.events.len(), r.skipped), (3, 1));
        // Past ROTATE_AT the log moves to events.1.jsonl; both are read; the older goes.
        let big = "x".repeat(MAX_MESSAGE);
        let n = ROTATE_AT as usize / MAX_MESSAGE + 2;
        for _ in 0..n {
            append(d.path(), &Event::new("agent", Some("db01"), big.clone())).unwrap();
        }
        assert!(d.path().join(EVENTS_OLD_FILE).exists());
        let total: u64 = [EVENTS_FILE, EVENTS_OLD_FILE]
            .iter()
            .map(|f| std::fs::metadata(d.path().join(f)).unwrap().len())
            .sum();
        assert!(total <= 2 * ROTATE_AT + 4096, "{total}");
        let r = read(d.path(), None, Some("db01")).unwrap();
        assert_eq!(r.events.len(), n);
        for _ in 0..n {
            append(d.path(), &Event::new("agent", Some("db02"), big.clone())).unwrap();
        }
        // The first batch rotated out entirely.
        assert!(read(d.path(), None, Some("db01")).unwrap().events.len() < n);
        assert!(read(d.path(), None, Some("web01"))
            .unwrap()
            .events
            .is_empty());
    }
}
