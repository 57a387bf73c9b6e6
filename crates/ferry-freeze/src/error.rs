//! The errors at this crate's boundary. Each message names what failed and what to do next.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// A path and the I/O error it met; a list of them prints one per line.
#[derive(Debug)]
pub struct PathError {
    pub path: PathBuf,
    pub error: io::Error,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.error)
    }
}

fn list(items: &[PathError]) -> String {
    items
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Errors of discovery, freezing and thawing.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// A protected disk path is unusable.
    #[error("protected disk {}: {reason}; give the whole-disk block device (e.g. /dev/sdb or the loop device)", path.display())]
    BadDisk { path: PathBuf, reason: String },
    /// /proc or /sys could not be read.
    #[error("cannot read {}: {source}; is /proc (and /sys) mounted in this namespace?", path.display())]
    System { path: PathBuf, source: io::Error },
    /// A filesystem on a protected disk has no reachable mount point.
    #[error("the filesystem {dev} on a protected disk is mounted only at {mounts} where another mount hides it; unmount the mount on top (a cut could not freeze it)")]
    Hidden { dev: String, mounts: String },
    /// A path given to `freeze` is not a mount point.
    #[error("{} is not a mount point: pass the mount point of each filesystem (discover() returns them); freezing a subdirectory would freeze the whole filesystem that holds it", path.display())]
    NotAMountPoint { path: PathBuf },
    /// Nothing to freeze.
    #[error("no mount points given: nothing to freeze (a cut of unmounted disks needs no freeze)")]
    Empty,
    /// The bound is zero.
    #[error("freeze bound must be more than zero (default 2 s)")]
    ZeroBound,
    /// Opening a mount point failed.
    #[error("cannot open mount point {}: {source}; check it is still mounted", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// The filesystem is frozen by someone else already.
    #[error("{} is already frozen by someone else (EBUSY): another cut or `fsfreeze` is running, or a crashed agent left it frozen — run the agent's thaw-all (or `fsfreeze -u {}`) if nothing else is cutting", path.display(), path.display())]
    AlreadyFrozen { path: PathBuf },
    /// The filesystem does not support freezing.
    #[error("{} cannot be frozen ({source}): its filesystem has no freeze support; unmount it or leave its disk out of app/crash-consistent cuts", path.display())]
    Unsupported { path: PathBuf, source: io::Error },
    /// Not allowed to freeze.
    #[error("not permitted to freeze {}: FIFREEZE needs CAP_SYS_ADMIN — run the agent as root", path.display())]
    NotPermitted { path: PathBuf },
    /// FIFREEZE failed otherwise.
    #[error("FIFREEZE {} failed: {source}; the filesystems frozen before it were thawed again", path.display())]
    Freeze { path: PathBuf, source: io::Error },
    /// FITHAW failed.
    #[error("FITHAW failed: {}; the watchdog retries, but check `dmesg` and thaw by hand with `fsfreeze -u MOUNTPOINT` if writes stay blocked", list(failures))]
    Thaw { failures: Vec<PathError> },
    /// The watchdog binary is not installed.
    #[error("the thaw watchdog binary ferry-thaw-watchdog was not found (looked at {looked}); install it next to the agent or in /usr/libexec/ferry, owned by root and not group/world-writable — nothing is frozen without it")]
    WatchdogMissing { looked: String },
    /// The watchdog could not be started.
    #[error("cannot start the thaw watchdog ({what}): {source}; nothing was frozen")]
    WatchdogStart {
        what: &'static str,
        source: io::Error,
    },
    /// The watchdog disappeared during the freeze.
    #[error("the thaw watchdog (pid {pid}) vanished during the freeze ({why}); the cut is discarded to be safe — look for something killing ferry processes (OOM killer, a kill of the cgroup)")]
    WatchdogLost { pid: i32, why: String },
    /// The watchdog thawed because the bound expired: the cut is not consistent.
    #[error("the freeze outlived its bound of {bound:?} and the watchdog thawed the filesystems; the cut is aborted (a point cut after the thaw would not be consistent) — retry the cut; if it keeps happening, ship more often so the residual is smaller, or raise the bound")]
    Overrun { bound: Duration },
}

impl FreezeError {
    /// Whether retrying the same call later cannot help (configuration or environment must change).
    pub fn is_permanent(&self) -> bool {
        match self {
            FreezeError::BadDisk { .. }
            | FreezeError::System { .. }
            | FreezeError::Hidden { .. }
            | FreezeError::NotAMountPoint { .. }
            | FreezeError::Empty
            | FreezeError::ZeroBound
            | FreezeError::Unsupported { .. }
            | FreezeError::NotPermitted { .. }
            | FreezeError::WatchdogMissing { .. } => true,
            FreezeError::Open { .. }
            | FreezeError::AlreadyFrozen { .. }
            | FreezeError::Freeze { .. }
            | FreezeError::Thaw { .. }
            | FreezeError::WatchdogStart { .. }
            | FreezeError::WatchdogLost { .. }
            | FreezeError::Overrun { .. } => false,
        }
    }
}

/// Errors of the hook runner and the MariaDB/MySQL hook.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hooks directory could not be listed.
    #[error("cannot list hooks directory {}: {source}; fix its permissions or point the agent at another directory", path.display())]
    Dir { path: PathBuf, source: io::Error },
    /// The hooks directory is writable by others: running from it would hand root to them.
    #[error("hooks directory {} is {reason}; no hook was run — make it owned by root and not group/world-writable (chmod go-w)", path.display())]
    InsecureDir { path: PathBuf, reason: String },
    /// The password file could not be read.
    #[error("cannot read the database password file {}: {source}; create it (mode 0600) with the password on one line", path.display())]
    PasswordFile { path: PathBuf, source: io::Error },
    /// Connecting to the database failed.
    #[error("cannot connect to the database at {target} as {user}: {detail}; check the socket/host, the user and its password file")]
    Connect {
        target: String,
        user: String,
        detail: String,
    },
    /// `FLUSH TABLES WITH READ LOCK` did not get the lock in time.
    #[error("FLUSH TABLES WITH READ LOCK did not complete within {timeout:?} ({detail}); a long query or transaction is holding tables — the cut goes on crash-consistent")]
    LockTimeout { timeout: Duration, detail: String },
    /// A database statement failed.
    #[error("database statement `{statement}` failed: {detail}; the user needs the RELOAD privilege (GRANT RELOAD ON *.* TO ...) for the read lock")]
    Statement {
        statement: &'static str,
        detail: String,
    },
}

impl HookError {
    /// Whether retrying the same call later cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            HookError::Dir { .. }
            | HookError::InsecureDir { .. }
            | HookError::PasswordFile { .. } => true,
            HookError::Connect { .. }
            | HookError::LockTimeout { .. }
            | HookError::Statement { .. } => false,
        }
    }
}
