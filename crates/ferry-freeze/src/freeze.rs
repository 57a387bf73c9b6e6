//! Freezing with a hard bound: `Freezer::freeze` → `FreezeGuard` → `finish()`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::discover::{self, Dev};
use crate::error::{FreezeError, PathError};
use crate::sys::{self, Thawed};
use crate::watchdog::{self, Verdict, Watchdog};

/// The default bound on a freeze (DESIGN.md §1 item 3).
pub const DEFAULT_BOUND: Duration = Duration::from_secs(2);

/// Freezes filesystems under a thaw watchdog.
#[derive(Debug, Clone)]
pub struct Freezer {
    watchdog: PathBuf,
    presync: bool,
    expedite_rcu: bool,
}

/// Timings of one freeze, for the `cut freeze time` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreezeStats {
    /// Filesystems frozen.
    pub mounts: usize,
    /// Time inside the FIFREEZE calls (the kernel syncing each filesystem).
    pub freeze_took: Duration,
    /// From the last FIFREEZE's return to the start of thawing: the time the cut used.
    pub held: Duration,
    /// Time inside the FITHAW calls.
    pub thaw_took: Duration,
    /// From the start of the first FIFREEZE to the end of the last FITHAW: the longest time a
    /// writer could have been blocked.
    pub window: Duration,
}

struct Frozen {
    path: PathBuf,
    fd: OwnedFd,
}

/// Proof that filesystems are frozen. Thaws them on `finish()`, `thaw()` or drop; a watchdog
/// process thaws them within the bound whatever happens to this process.
#[must_use = "dropping the guard thaws at once; call finish() when the cut is done"]
pub struct FreezeGuard {
    frozen: Vec<Frozen>,
    watchdog: Option<Watchdog>,
    bound: Duration,
    started: Instant,
    deadline: Instant,
    freeze_took: Duration,
    frozen_at: Instant,
}

impl Freezer {
    /// Uses the `ferry-thaw-watchdog` binary found by [`watchdog::locate_watchdog`].
    pub fn new() -> Result<Freezer, FreezeError> {
        Ok(Freezer::with_watchdog(watchdog::locate_watchdog()?))
    }

    /// Uses the given `ferry-thaw-watchdog` binary.
    pub fn with_watchdog(path: impl Into<PathBuf>) -> Freezer {
        Freezer {
            watchdog: path.into(),
            presync: true,
            expedite_rcu: true,
        }
    }

    /// Whether to `syncfs()` each filesystem before freezing (default: yes). The sync then runs
    /// while applications still write, and FIFREEZE only has to flush what was written during
    /// it: the freeze window shrinks, the cut takes a little longer overall.
    pub fn presync(mut self, on: bool) -> Freezer {
        self.presync = on;
        self
    }

    /// Whether to expedite RCU grace periods during the FIFREEZE calls (default: yes): each
    /// freeze level waits for one, and under load that is most of the time writers are blocked
    /// ([`crate::rcu`]). The machine-wide switch is on only while FIFREEZE runs, and only if it
    /// was off.
    pub fn expedite_rcu(mut self, on: bool) -> Freezer {
        self.expedite_rcu = on;
        self
    }

    /// The watchdog binary in use.
    pub fn watchdog_path(&self) -> &Path {
        &self.watchdog
    }

    /// Freezes `mounts` in the given order (discover() returns the right one), after starting a
    /// watchdog that thaws them all at most `bound` after the first FIFREEZE began. If one
    /// freeze fails, the ones before it are thawed and the error returned.
    pub fn freeze<P: AsRef<Path>>(
        &self,
        mounts: &[P],
        bound: Duration,
    ) -> Result<FreezeGuard, FreezeError> {
        if mounts.is_empty() {
            return Err(FreezeError::Empty);
        }
        if bound.is_zero() {
            return Err(FreezeError::ZeroBound);
        }
        let table = discover::read_mountinfo()?;
        let mut opened: Vec<(Dev, Frozen)> = Vec::with_capacity(mounts.len());
        for m in mounts {
            let path = m.as_ref();
            let open_err = |source| FreezeError::Open {
                path: path.into(),
                source,
            };
            if !discover::is_mount_point(&table, path).map_err(open_err)? {
                return Err(FreezeError::NotAMountPoint { path: path.into() });
            }
            let fd = sys::open_dir(path).map_err(open_err)?;
            let dev = Dev::from_dev_t(sys::fd_dev(&fd).map_err(open_err)?);
            if opened.iter().any(|(d, _)| *d == dev) {
                // A second mount point of a filesystem already in the list (bind mount).
                tracing::debug!(path = %path.display(), %dev, "same filesystem listed twice; freezing it once");
                continue;
            }
            opened.push((
                dev,
                Frozen {
                    path: path.into(),
                    fd,
                },
            ));
        }
        if self.presync {
            for (_, f) in &opened {
                // Best effort: a failure here only makes the freeze window longer.
                if let Err(e) = sys::syncfs(&f.fd) {
                    tracing::warn!(path = %f.path.display(), error = %e, "syncfs before freezing");
                }
            }
        }
        let list: Vec<(Dev, &Path)> = opened.iter().map(|(d, f)| (*d, f.path.as_path())).collect();
        let mut wd = Watchdog::spawn(&self.watchdog, &list)?;

        let started = Instant::now();
        let deadline_ns = sys::monotonic_ns().saturating_add(bound.as_nanos() as i64);
        if let Err(e) = wd.arm(deadline_ns) {
            wd.release(true);
            return Err(FreezeError::WatchdogStart {
                what: "arming it",
                source: e,
            });
        }
        let mut guard = FreezeGuard {
            frozen: Vec::with_capacity(opened.len()),
            watchdog: None,
            bound,
            started,
            deadline: started + bound,
            freeze_took: Duration::ZERO,
            frozen_at: started,
        };
        // On for the FIFREEZE calls only; put back on every way out of this loop (drop).
        let mut rcu = self.expedite_rcu.then(crate::rcu::Expedite::begin);
        for (_, f) in opened {
            if let Err(e) = sys::freeze_fd(&f.fd) {
                let err = freeze_error(&f.path, e);
                guard.watchdog = Some(wd);
                let _ = guard.end(false);
                return Err(err);
            }
            tracing::debug!(path = %f.path.display(), "frozen");
            guard.frozen.push(f);
            if wd.fired() {
                // A FIFREEZE took longer than the whole bound.
                guard.watchdog = Some(wd);
                let _ = guard.end(false);
                return Err(FreezeError::Overrun { bound });
            }
        }
        guard.frozen_at = Instant::now();
        if let Some(r) = rcu.as_mut() {
            r.end();
        }
        guard.freeze_took = guard.frozen_at - started;
        guard.watchdog = Some(wd);
        Ok(guard)
    }
}

fn freeze_error(path: &Path, e: io::Error) -> FreezeError {
    let path = path.to_path_buf();
    match e.raw_os_error() {
        Some(libc::EBUSY) => FreezeError::AlreadyFrozen { path },
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => FreezeError::Unsupported { path, source: e },
        Some(libc::EPERM) | Some(libc::EACCES) => FreezeError::NotPermitted { path },
        _ => FreezeError::Freeze { path, source: e },
    }
}

/// Thaws `frozen` in reverse order; returns the failures.
fn thaw_in_reverse(frozen: &[Frozen]) -> Vec<PathError> {
    let mut failures = Vec::new();
    for f in frozen.iter().rev() {
        match sys::thaw_fd(f.fd.as_raw_fd()) {
            Ok(Thawed::Yes) => tracing::debug!(path = %f.path.display(), "thawed"),
            Ok(Thawed::WasNotFrozen) => {
                tracing::debug!(path = %f.path.display(), "already thawed (by the watchdog)")
            }
            Err(error) => failures.push(PathError {
                path: f.path.clone(),
                error,
            }),
        }
    }
    failures
}

impl FreezeGuard {
    /// The frozen mount points, in freeze order.
    pub fn mounts(&self) -> impl Iterator<Item = &Path> {
        self.frozen.iter().map(|f| f.path.as_path())
    }

    /// When the watchdog will thaw: the cut must be done before.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left before the watchdog thaws.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The bound this freeze runs under.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// The watchdog's process id (for tests and diagnostics).
    pub fn watchdog_pid(&self) -> Option<u32> {
        self.watchdog.as_ref().map(Watchdog::pid)
    }

    /// Ends a cut that was made while frozen: thaws, and says whether the freeze held all along.
    /// `Err(Overrun)` means the watchdog thawed before this call: anything the caller did as
    /// "the cut" (the tag) is not consistent and must be discarded. Thawing happened either way.
    pub fn finish(mut self) -> Result<FreezeStats, FreezeError> {
        self.end(true)
    }

    /// Thaws without claiming a cut (the cut was abandoned). Errors only if thawing failed.
    pub fn thaw(mut self) -> Result<FreezeStats, FreezeError> {
        self.end(false)
    }

    /// The one way out: ask the watchdog for its verdict (if wanted), thaw, release it.
    fn end(&mut self, want_verdict: bool) -> Result<FreezeStats, FreezeError> {
        let Some(mut wd) = self.watchdog.take() else {
            return Err(FreezeError::WatchdogLost {
                pid: 0,
                why: "the guard was already ended".into(),
            });
        };
        let pid = wd.pid();
        let verdict = if want_verdict {
            wd.done()
        } else {
            Verdict::Held
        };
        let t = Instant::now();
        let held = t.saturating_duration_since(self.frozen_at);
        let failures = thaw_in_reverse(&self.frozen);
        let done = Instant::now();
        wd.release(failures.is_empty());
        let stats = FreezeStats {
            mounts: self.frozen.len(),
            freeze_took: self.freeze_took,
            held,
            thaw_took: done - t,
            window: done - self.started,
        };
        self.frozen.clear();
        if !failures.is_empty() {
            return Err(FreezeError::Thaw { failures });
        }
        match verdict {
            Verdict::Held => Ok(stats),
            Verdict::Fired => Err(FreezeError::Overrun { bound: self.bound }),
            Verdict::Lost(why) => Err(FreezeError::WatchdogLost {
                pid: pid as i32,
                why,
            }),
        }
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if self.watchdog.is_none() {
            return;
        }
        if let Err(e) = self.end(false) {
            tracing::error!(error = %e, "thawing on drop of the freeze guard");
        }
    }
}

/// Crash recovery for an agent's restart path: thaws every filesystem in `mounts` that is
/// frozen (`FITHAW`'s `EINVAL`, "not frozen", counts as done). Tries them all; returns the
/// mount points that were frozen, or every failure.
pub fn thaw_all<P: AsRef<Path>>(mounts: &[P]) -> Result<Vec<PathBuf>, FreezeError> {
    let mut thawed = Vec::new();
    let mut failures = Vec::new();
    for m in mounts {
        let path = m.as_ref();
        let r = sys::open_dir(path).and_then(|fd| sys::thaw_fd(fd.as_raw_fd()));
        match r {
            Ok(Thawed::Yes) => {
                tracing::warn!(path = %path.display(), "was left frozen (crashed cut?); thawed");
                thawed.push(path.to_path_buf());
            }
            Ok(Thawed::WasNotFrozen) => {}
            Err(error) => failures.push(PathError {
                path: path.to_path_buf(),
                error,
            }),
        }
    }
    if failures.is_empty() {
        Ok(thawed)
    } else {
        Err(FreezeError::Thaw { failures })
    }
}
