//! Expedited RCU grace periods while FIFREEZE runs.
//!
//! Why: FIFREEZE takes the superblock's freeze levels (write, page fault, filesystem), each a
//! per-CPU rw-semaphore whose write side first waits for an RCU grace period
//! (`percpu_down_write` → `rcu_sync_enter` → `synchronize_rcu`). On a busy machine a normal grace
//! period lasts several scheduler ticks, and writers are blocked from the first level on.
//! Measured on a 2-vCPU VM at 50 MB/s of writes (`TRACE=1 benches/cut-window.sh`): of 42 ms
//! inside FIFREEZE (median), 33 ms had no block request outstanding at all. With
//! `/sys/kernel/rcu_expedited` set to 1, `synchronize_rcu` is expedited (an IPI to each CPU,
//! microseconds), and the time inside FIFREEZE fell to 9 ms, 1.6 ms of it without I/O.
//!
//! The switch is the whole machine's, so [`Expedite`] turns it on only around the FIFREEZE
//! calls, and only when it is off; a value of 1 someone else set is left alone. Before turning it
//! on it writes a marker ([`MARKER`], in `/run`, which no freeze touches; the systemd unit's
//! runtime directory) saying the 1 is Ferry's. Whoever ends first puts the switch back to 0 and
//! removes the marker: the agent when FIFREEZE returns, the thaw watchdog when the agent dies
//! ([`restore_if_ours`]), the agent's next start (whatever its settings), or the package's
//! removal. A switch Ferry cannot write (a sandbox that keeps `/sys` read-only) is said once, as
//! a warning: the freeze works, only its window is longer.

use std::io;
use std::path::{Path, PathBuf};

/// The kernel's switch.
pub const KNOB: &str = "/sys/kernel/rcu_expedited";
/// Present while the switch is 1 because Ferry set it.
pub const MARKER: &str = "/run/ferry-agent/rcu-expedited";

/// Set once the warning that the switch cannot be written has been logged.
static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn warn_once(what: &str, err: &io::Error) {
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(error = %err, "cannot {what}, so RCU grace periods are not expedited during freezes: the freeze window is longer (tens of ms under load); under systemd the unit needs ReadWritePaths={KNOB} and RuntimeDirectory=ferry-agent (systemd/ferry-agent.service has both); or set expedite_rcu = false");
    }
}

/// RCU grace periods expedited until [`Expedite::end`] or drop (see the module documentation).
pub struct Expedite {
    knob: PathBuf,
    marker: PathBuf,
    /// Ferry's 1 is in the switch: put it back to 0 at the end.
    ours: bool,
}

impl Expedite {
    /// Expedites grace periods if the switch is off (or on by a Ferry process that died).
    pub fn begin() -> Expedite {
        Expedite::begin_at(Path::new(KNOB), Path::new(MARKER))
    }

    /// [`Expedite::begin`] with other paths (tests).
    pub fn begin_at(knob: &Path, marker: &Path) -> Expedite {
        let mut e = Expedite {
            knob: knob.to_owned(),
            marker: marker.to_owned(),
            ours: false,
        };
        match std::fs::read_to_string(knob).as_deref().map(str::trim) {
            Ok("0") => {}
            // Left by a Ferry process that died with it on: ours to put back.
            Ok("1") if marker.exists() => {
                e.ours = true;
                return e;
            }
            // Someone else's choice, or no such switch (not Linux, an old kernel, no sysfs).
            _ => return e,
        }
        if let Some(dir) = marker.parent() {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        if let Err(err) = std::fs::write(marker, b"1\n") {
            warn_once(&format!("write {}", marker.display()), &err);
            return e;
        }
        match std::fs::write(knob, b"1") {
            Ok(()) => e.ours = true,
            Err(err) => {
                warn_once(&format!("write {}", knob.display()), &err);
                let _ = std::fs::remove_file(marker);
            }
        }
        e
    }

    /// Whether grace periods are expedited by this guard.
    pub fn active(&self) -> bool {
        self.ours
    }

    /// Puts the switch back to 0 if this guard set it.
    pub fn end(&mut self) {
        if std::mem::take(&mut self.ours) {
            if let Err(err) = put_back(&self.knob, &self.marker) {
                tracing::warn!(error = %err, knob = %self.knob.display(), "cannot put the RCU switch back to 0");
            }
        }
    }
}

impl Drop for Expedite {
    fn drop(&mut self) {
        self.end();
    }
}

/// Puts the switch back to 0 if Ferry's marker says a Ferry process set it (the thaw watchdog,
/// when the agent died during FIFREEZE; the agent at start).
pub fn restore_if_ours() -> io::Result<bool> {
    restore_if_ours_at(Path::new(KNOB), Path::new(MARKER))
}

/// [`restore_if_ours`] with other paths (tests).
pub fn restore_if_ours_at(knob: &Path, marker: &Path) -> io::Result<bool> {
    if !marker.exists() {
        return Ok(false);
    }
    put_back(knob, marker).map(|()| true)
}

fn put_back(knob: &Path, marker: &Path) -> io::Result<()> {
    std::fs::write(knob, b"0")?;
    match std::fs::remove_file(marker) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(v: &str, marker: bool) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let (k, m) = (d.path().join("rcu_expedited"), d.path().join("marker"));
        std::fs::write(&k, v).unwrap();
        if marker {
            std::fs::write(&m, "1").unwrap();
        }
        (d, k, m)
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap().trim().to_owned()
    }

    #[test]
    fn off_is_turned_on_for_the_freeze_and_back_off_after() {
        let (_d, k, m) = paths("0\n", false);
        let mut e = Expedite::begin_at(&k, &m);
        assert!(e.active());
        assert_eq!(read(&k), "1");
        assert!(m.exists(), "the marker is written before the switch");
        e.end();
        assert_eq!(read(&k), "0");
        assert!(!m.exists());
        // Dropped after end: nothing more.
        std::fs::write(&k, "1").unwrap();
        drop(e);
        assert_eq!(read(&k), "1");
    }

    #[test]
    fn dropping_the_guard_puts_it_back() {
        let (_d, k, m) = paths("0", false);
        drop(Expedite::begin_at(&k, &m));
        assert_eq!(read(&k), "0");
        assert!(!m.exists());
    }

    #[test]
    fn someone_else_s_1_is_left_alone() {
        let (_d, k, m) = paths("1\n", false);
        let mut e = Expedite::begin_at(&k, &m);
        assert!(!e.active());
        e.end();
        assert_eq!(read(&k), "1");
        assert!(!restore_if_ours_at(&k, &m).unwrap());
        assert_eq!(read(&k), "1");
    }

    #[test]
    fn a_1_left_by_a_dead_ferry_process_is_put_back() {
        // By the next freeze...
        let (_d, k, m) = paths("1", true);
        let e = Expedite::begin_at(&k, &m);
        assert!(e.active());
        drop(e);
        assert_eq!(read(&k), "0");
        assert!(!m.exists());
        // ...or by the watchdog.
        let (_d, k, m) = paths("1", true);
        assert!(restore_if_ours_at(&k, &m).unwrap());
        assert_eq!(read(&k), "0");
        assert!(!m.exists());
    }

    #[test]
    fn no_switch_no_change() {
        let d = tempfile::tempdir().unwrap();
        let (k, m) = (d.path().join("absent"), d.path().join("marker"));
        let e = Expedite::begin_at(&k, &m);
        assert!(!e.active());
        assert!(!m.exists());
    }
}
