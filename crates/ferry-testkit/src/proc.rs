//! Child processes under test (the Ferry binaries): spawned with stderr appended to a log file,
//! stopped with SIGTERM (expecting a clean exit) or SIGKILL, killed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A binary built next to `exe` (a test's `CARGO_BIN_EXE_*`), e.g. another package's binary in
/// the same target directory. Panics, saying how to build it, if it is missing.
pub fn sibling_bin(exe: &str, name: &str) -> PathBuf {
    let p = Path::new(exe).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build --release --bins, the profile of the tests)",
        p.display()
    );
    p
}

/// A running child whose stderr goes to `log` (appended: restarts share one log).
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
    /// Length of the log when this process started: its own lines follow.
    pub log_from: u64,
}

impl Proc {
    /// Spawns `c` with stdout discarded and stderr appended to `log`.
    pub fn spawn(mut c: Command, log: &Path) -> Proc {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let log_from = f.metadata().map(|m| m.len()).unwrap_or(0);
        let child = c
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {c:?}: {e}"));
        Proc {
            child: Some(child),
            log: log.to_owned(),
            log_from,
        }
    }

    /// The whole log (every start), escape sequences removed.
    pub fn log_text(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// What this process (not an earlier one sharing the log) has logged, escapes removed.
    pub fn own_log(&self) -> String {
        let all = fs::read(&self.log).unwrap_or_default();
        let from = (self.log_from as usize).min(all.len());
        strip_ansi(&String::from_utf8_lossy(&all[from..]))
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it has exited (reaping it), with its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `limit` for a line of its own log for which `find` returns something; panics,
    /// showing the log, if it exits or the time runs out first.
    pub fn wait_log<T>(
        &mut self,
        what: &str,
        limit: Duration,
        find: impl Fn(&str) -> Option<T>,
    ) -> T {
        let t = Instant::now();
        loop {
            let log = self.own_log();
            // Whole lines only: a line being written may be cut short.
            let done = log.rfind('\n').map_or("", |i| &log[..i]);
            if let Some(v) = done.lines().find_map(&find) {
                return v;
            }
            if let Some(st) = self.exited() {
                panic!("exited {st} before {what}:\n{log}");
            }
            assert!(t.elapsed() < limit, "no {what} after {limit:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for it to exit by itself.
    pub fn wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().map(|mut c| c.wait().expect("wait"))
    }

    /// SIGTERM, then waits; panics unless it exits successfully.
    pub fn term(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) with the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().expect("wait");
            assert!(st.success(), "exited {st}: {}", self.log_text());
        }
    }

    /// SIGKILL, then waits.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `s` without terminal escape sequences (tracing colours its fields).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            it.next();
            for d in it.by_ref() {
                if ('@'..='~').contains(&d) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_stripped_and_a_process_log_is_its_own() {
        assert_eq!(
            strip_ansi("\u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m1"),
            "addr=1"
        );
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        fs::write(&log, "old line addr=1\n").unwrap();
        let mut c = Command::new("sh");
        c.args(["-c", "echo 'new addr=2' >&2; sleep 5"]);
        let mut p = Proc::spawn(c, &log);
        let got = p.wait_log("an address", Duration::from_secs(5), |l| {
            l.split_once("addr=").map(|(_, a)| a.to_owned())
        });
        assert_eq!(got, "2", "the earlier process's line is not this one's");
        p.kill9();
    }
}
