//! The cutter's primitives: make a filesystem-consistent instant on the protected disks.
//!
//! Job:
//! - [`discover`]: from the protected whole disks, find every mounted filesystem on them, their
//!   partitions, or device-mapper/md devices built on them; one mount point per filesystem
//!   (bind mounts once), in a safe freeze order.
//! - [`Freezer::freeze`]: `FIFREEZE` them in order under a hard bound and return a
//!   [`FreezeGuard`]; [`FreezeGuard::finish`] thaws (`FITHAW`) and says whether the freeze held
//!   for the whole cut. [`thaw_all`] is the agent's restart-path recovery.
//! - [`run_hooks`]: pre-freeze / post-thaw hook executables with timeouts, and
//!   [`MysqlHook`], which holds `FLUSH TABLES WITH READ LOCK` across the freeze.
//!
//! Invariants:
//! - Never stuck frozen (DESIGN.md §4.3). Before anything is frozen, a watchdog *process*
//!   (`ferry-thaw-watchdog`, a binary of this crate) opens every mount point and says it is ready;
//!   it thaws all of them when the bound expires, or at once when the agent dies (its socket
//!   reaches end-of-file, SIGKILL included). The guard thaws on `finish`, `thaw` and drop, and
//!   waits for the watchdog to exit, so no stale watchdog can thaw a later freeze.
//! - A cut is consistent only if the freeze held until it was done: if the watchdog had to
//!   thaw first, `finish` returns [`FreezeError::Overrun`] and the caller must discard the cut.
//! - A failed freeze leaves nothing frozen: the filesystems frozen before the failure are thawed
//!   in reverse order before the error is returned.
//! - Hook failures never stop a cut by themselves: they are reported, and a failed pre-freeze
//!   hook downgrades the point to crash-consistent ([`HookReport::consistency`]); the caller
//!   decides.
//!
//! Must not:
//! - freeze without a watchdog that answered, or freeze a path that is not a mount point (that
//!   would freeze whatever filesystem holds it, maybe `/`);
//! - write to a frozen filesystem from the thread that holds the guard (it would block until the
//!   watchdog thaws): logs and temp files of the cutter belong elsewhere while frozen;
//! - run hooks that others can write (the agent is root).
//!
//! Everything here is Linux-only and needs CAP_SYS_ADMIN to freeze.

mod discover;
mod error;
mod freeze;
mod hooks;
mod mysql;
pub mod rcu;
mod sys;
mod trust;
pub mod watchdog;

pub use discover::{discover, parse_mountinfo, Dev, Mount, MountEntry};
pub use error::{FreezeError, HookError, PathError};
pub use freeze::{thaw_all, FreezeGuard, FreezeStats, Freezer, DEFAULT_BOUND};
pub use hooks::{
    run_hooks, run_hooks_with_env, Consistency, HookOutcome, HookReport, HookStatus, Phase,
    DEFAULT_HOOKS_DIR, DEFAULT_HOOK_TIMEOUT,
};
pub use mysql::{MysqlHook, MysqlTarget, DEFAULT_DB_TIMEOUT};
pub use sys::is_root;
pub use watchdog::{locate_watchdog, WATCHDOG_NAME};
