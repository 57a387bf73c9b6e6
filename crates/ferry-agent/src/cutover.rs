//! `ferry-agent cutover`: the planned end of a migration on the source (the online cutover of
//! the cloud-adoption guidance): stop the application, block every write to the protected disks'
//! filesystems, cut the final point, and keep the block until the operator rolls back (or the
//! machine is switched off).
//!
//! Steps (each undone, in reverse, if a later one fails; nothing is left half-done):
//! 1. The hooks with `cutover` (`/etc/ferry/hooks.d/*`: stop the services that write). A hook
//!    that fails stops the cutover: the `cutover-rollback` hooks run and nothing else changed.
//! 2. Every filesystem on the protected disks is remounted read-only (`mount -o remount,ro`).
//!    This is the write block: it lasts as long as the cutover, with no watchdog bound (unlike a
//!    freeze, writers get `EROFS` at once instead of hanging), and the kernel refuses it while a
//!    process still has a file open for writing there — the error names the mount point, and a
//!    cutover hook is where that process is stopped. Remounting flushes every dirty page.
//!    The mounts are recorded first (`STATE_DIR/cutover.json`, durable), so a rollback after an
//!    agent restart knows what to make writable again.
//! 3. The final point: app-consistent (the application is stopped and the filesystems are clean),
//!    cut with no hooks and no freeze of its own, and acknowledged (committed) by the process
//!    server, which names it.
//! 4. The process server is told its id (a `cutover` notice): from then on `ferry failover --vm
//!    VM --point final` materializes it, and the server raises no RPO alarm for the VM.
//!
//! `--rollback`: every recorded mount is made writable again, the `cutover-rollback` hooks run
//! (start the services again), the server is told, the record goes. The agent never stopped
//! tracking, so replication resumes from where it was: no full resync.
//!
//! Filesystems that stay writable: the one holding the agent's own state directory (the agent
//! writes there until the end: keep `/var/lib/ferry-agent` off the protected disks, or accept
//! that this filesystem is frozen for the final point rather than blocked), and, with
//! `--allow-writable`, those a process keeps a file open for writing on (the root filesystem of a
//! running system, usually: journald). They are listed in the result; the final point then
//! freezes them like an app point does, so it is still consistent, but writes to them after it
//! reach no point.
//!
//! Limits: raw block devices without a mounted filesystem are not write-blocked (stop their
//! writers in a cutover hook); a reboot of the source mounts its filesystems writable again
//! (`ferry-agent status` still says cut over: roll back, or cut over again). Scheduled cuts stop
//! while cut over (nothing changes; the final point stays the newest).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::control::Request;

const FILE: &str = "cutover.json";
const FORMAT: &str = "ferry-agent-cutover";

/// What a cutover needs from the agent's options.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub state_dir: PathBuf,
    pub disks: Vec<PathBuf>,
    pub vm: String,
    pub hooks_dir: PathBuf,
    pub hook_timeout: Duration,
    /// Set while cut over (the engine cuts no scheduled point then).
    pub active: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// One cutover or rollback at a time.
static BUSY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn busy() -> Option<std::sync::MutexGuard<'static, ()>> {
    match BUSY.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// `STATE_DIR/cutover.json`: the cutover in effect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    format: String,
    pub vm: String,
    /// The mount points made read-only (to make writable again on rollback).
    pub mounts: Vec<PathBuf>,
    /// Protected filesystems left writable (frozen for the final point), with why.
    #[serde(default)]
    pub writable: Vec<(PathBuf, String)>,
    pub started: String,
    /// The final point's id, once the server acknowledged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_point: Option<String>,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// A cutover record, or why the bytes are not one (fuzzed: `agent_state`).
pub fn parse(bytes: &[u8]) -> Result<State, String> {
    let s: State = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if s.format != FORMAT {
        return Err(format!("not a cutover record (format {:?})", s.format));
    }
    Ok(s)
}

/// The cutover in effect, if any.
pub fn load(state_dir: &Path) -> Result<Option<State>, String> {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => parse(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}; it is written only by ferry-agent", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

fn save(state_dir: &Path, s: &State) -> Result<(), String> {
    let p = path(state_dir);
    ferry_durable::write_private(&p, &serde_json::to_vec_pretty(s).expect("state serializes"))
        .map_err(|e| format!("cannot write {}: {e}", p.display()))
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// `mount -o remount,ro|rw MOUNT` (util-linux keeps the other options).
fn remount(at: &Path, ro: bool) -> Result<(), String> {
    let o = std::process::Command::new("/bin/mount")
        // Its messages in English: "busy" is matched below.
        .env("LC_ALL", "C")
        .args(["-o", if ro { "remount,ro" } else { "remount,rw" }])
        .arg(at)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if o.status.success() {
        return Ok(());
    }
    // mount(8)'s first line says it; the rest points at dmesg.
    let err = String::from_utf8_lossy(&o.stderr)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    Err(if ro && err.contains("busy") {
        format!(
            "cannot make {} read-only: a process still has a file open for writing there ({err}); `fuser -vm {}` names it: stop it in a hook (/etc/ferry/hooks.d, called with `cutover`)",
            at.display(),
            at.display()
        )
    } else {
        format!(
            "cannot remount {} {}: {err}",
            at.display(),
            if ro { "read-only" } else { "read-write" }
        )
    })
}

fn hooks(ctx: &Ctx, phase: ferry_freeze::Phase) -> Result<Vec<String>, String> {
    let env: Vec<(&str, &str)> = vec![("FERRY_VM", &ctx.vm), ("FERRY_CUTOVER", "1")];
    // A cutover hook stops services, which may take longer than a quiesce: at least 2 minutes.
    let timeout = ctx.hook_timeout.max(Duration::from_secs(120));
    let rep = ferry_freeze::run_hooks_with_env(&ctx.hooks_dir, phase, timeout, &env)
        .map_err(|e| format!("{} hooks: {e}", phase.arg()))?;
    let failed: Vec<String> = rep
        .failed()
        .map(|f| format!("{} hook {}", phase.arg(), f.why()))
        .collect();
    if !failed.is_empty() {
        return Err(failed.join("; "));
    }
    Ok(rep.hooks.iter().map(|h| h.name.clone()).collect())
}

/// Undoes a cutover's write block and application stop: mounts writable again (each tried),
/// the rollback hooks. Returns what failed.
fn undo(ctx: &Ctx, mounts: &[PathBuf]) -> Vec<String> {
    let mut errors = Vec::new();
    for m in mounts.iter().rev() {
        if let Err(e) = remount(m, false) {
            errors.push(e);
        }
    }
    if let Err(e) = hooks(ctx, ferry_freeze::Phase::CutoverRollback) {
        errors.push(e);
    }
    errors
}

/// Whether the filesystem at `at` is mounted read-only already.
fn read_only(at: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(at.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    unsafe { libc::statvfs(c.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0 }
}

/// Runs a cutover (see the module docs); the JSON `ferry-agent cutover --json` prints.
/// `allow_writable`: a filesystem that cannot be made read-only stays writable (and is frozen
/// for the final point) instead of stopping the cutover.
pub fn start(
    ctx: &Ctx,
    engine: &Sender<Request>,
    allow_writable: bool,
) -> Result<serde_json::Value, String> {
    let Some(_one) = busy() else {
        return Err(
            "a cutover or its rollback is running already; wait for it (`ferry-agent status` says)"
                .into(),
        );
    };
    let t0 = Instant::now();
    // A cutover that stopped half-way (the agent was killed): the mounts it made read-only are
    // this one's to undo too.
    let mut prior: Vec<PathBuf> = Vec::new();
    if let Some(s) = load(&ctx.state_dir)? {
        if let Some(p) = &s.final_point {
            return Err(format!(
                "cut over already (since {}, final point {p}); `ferry-agent cutover --rollback` undoes it",
                s.started
            ));
        }
        prior = s.mounts;
    }
    // 1. Stop the application.
    let ran = match hooks(ctx, ferry_freeze::Phase::Cutover) {
        Ok(r) => r,
        Err(e) => {
            let undone = undo(ctx, &[]);
            return Err(format!(
                "cutover stopped, nothing changed: {e}{}",
                if undone.is_empty() {
                    String::new()
                } else {
                    format!("; and the rollback hooks failed: {}", undone.join("; "))
                }
            ));
        }
    };
    // 2. Block writes: record, then remount read-only.
    // Image files (the scan tracker's) carry no mount the agent can see: only block devices
    // are looked up (a loop-mounted image is not write-blocked: stop its writer in a hook).
    let devices: Vec<&PathBuf> = ctx
        .disks
        .iter()
        .filter(|d| {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(d).is_ok_and(|m| m.file_type().is_block_device())
        })
        .collect();
    let found = ferry_freeze::discover(&devices).map_err(|e| {
        let _ = undo(ctx, &[]);
        format!("cutover stopped, the application hooks rolled back: {e}")
    })?;
    let own = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&ctx.state_dir)
            .map(|m| ferry_freeze::Dev::from_dev_t(m.dev()))
            .ok()
    };
    let mut mounts: Vec<PathBuf> = Vec::new();
    let mut writable: Vec<(PathBuf, String)> = Vec::new();
    let mut already: Vec<PathBuf> = Vec::new();
    for m in found {
        if read_only(&m.mount_point) {
            // Read-only already: nothing to block; to undo only if a cutover made it so.
            if prior.contains(&m.mount_point) {
                already.push(m.mount_point);
            }
            continue;
        }
        if own == Some(m.fs_dev) {
            writable.push((
                m.mount_point,
                format!(
                    "holds the agent's state directory {}",
                    ctx.state_dir.display()
                ),
            ));
        } else {
            mounts.push(m.mount_point);
        }
    }
    let mut state = State {
        format: FORMAT.into(),
        vm: ctx.vm.clone(),
        mounts: already.iter().chain(&mounts).cloned().collect(),
        writable: writable.clone(),
        started: now(),
        final_point: None,
    };
    let fail = |why: String, done: &[PathBuf]| -> String {
        let undone = undo(ctx, done);
        if undone.is_empty() {
            let _ = ferry_durable::remove_durable(&path(&ctx.state_dir));
        } else {
            // Kept, naming what is still read-only: `--rollback` finishes the job.
            let _ = save(
                &ctx.state_dir,
                &State {
                    format: FORMAT.into(),
                    vm: ctx.vm.clone(),
                    mounts: done.to_vec(),
                    writable: Vec::new(),
                    started: now(),
                    final_point: None,
                },
            );
        }
        if undone.is_empty() {
            format!("cutover failed and was rolled back (the source is writable, replication goes on): {why}")
        } else {
            format!(
                "cutover failed ({why}), and rolling it back failed too: {}; fix that, then `ferry-agent cutover --rollback`",
                undone.join("; ")
            )
        }
    };
    save(&ctx.state_dir, &state).map_err(|e| fail(e, &[]))?;
    let blocked = Instant::now();
    let mut done: Vec<PathBuf> = already;
    for m in &mounts {
        match remount(m, true) {
            Ok(()) => done.push(m.clone()),
            Err(e) if allow_writable && e.contains("open for writing") => {
                tracing::warn!(mount = %m.display(), error = %e, "cutover: this filesystem stays writable (--allow-writable); it is frozen for the final point");
                writable.push((m.clone(), e));
            }
            Err(e) => return Err(fail(e, &done)),
        }
    }
    let mounts = done;
    state.mounts = mounts.clone();
    state.writable = writable.clone();
    save(&ctx.state_dir, &state).map_err(|e| fail(e, &mounts))?;
    // 3. The final point, acknowledged by the server.
    let (tx, rx) = crossbeam_channel::bounded(1);
    let req = Request::CutQuiesced {
        reply: tx,
        freeze: !writable.is_empty(),
    };
    if engine.send(req).is_err() {
        return Err(fail("the agent is stopping".into(), &mounts));
    }
    let point = match rx.recv() {
        Ok(Ok(p)) => p,
        Ok(Err(why)) => return Err(fail(format!("the final point: {why}"), &mounts)),
        Err(_) => {
            return Err(fail(
                "the agent stopped before the final point".into(),
                &mounts,
            ))
        }
    };
    let Some(id) = point.point.clone() else {
        return Err(fail(
            "the process server acknowledged the final point without naming it (an older server?)"
                .into(),
            &mounts,
        ));
    };
    state.final_point = Some(id.clone());
    save(&ctx.state_dir, &state).map_err(|e| fail(e, &mounts))?;
    ctx.active.store(true, std::sync::atomic::Ordering::SeqCst);
    // 4. Tell the server.
    let _ = engine.send(Request::Notice {
        kind: ferry_wire::notice::CUTOVER,
        text: id.clone(),
    });
    tracing::warn!(vm = %ctx.vm, point = %id, mounts = ?mounts, "cut over: the protected filesystems are read-only until `ferry-agent cutover --rollback`");
    Ok(serde_json::json!({
        "vm": ctx.vm,
        "final_point": id,
        "kind": point.kind.as_str(),
        "mounts_read_only": mounts,
        "mounts_writable": writable.iter().map(|(m, why)| serde_json::json!({"mount": m, "why": why})).collect::<Vec<_>>(),
        "hooks": ran,
        "writes_blocked_for_ms": blocked.elapsed().as_secs_f64() * 1e3,
        "took_ms": t0.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Undoes the cutover in effect (see the module docs).
pub fn rollback(ctx: &Ctx, engine: &Sender<Request>) -> Result<serde_json::Value, String> {
    // Refused, not queued, while a cutover runs: a rollback must never run after the cutover it
    // was meant to stop has been failed over.
    let Some(_one) = busy() else {
        return Err("a cutover is running; wait for it to end (`ferry-agent status` says), then roll it back".into());
    };
    let Some(s) = load(&ctx.state_dir)? else {
        return Err("not cut over (no cutover to roll back)".into());
    };
    let errors = undo(ctx, &s.mounts);
    if !errors.is_empty() {
        return Err(format!(
            "rollback incomplete: {}; the cutover record stays: fix that and run `ferry-agent cutover --rollback` again",
            errors.join("; ")
        ));
    }
    ferry_durable::remove_durable(&path(&ctx.state_dir))
        .map_err(|e| format!("cannot remove {}: {e}", path(&ctx.state_dir).display()))?;
    ctx.active.store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = engine.send(Request::Notice {
        kind: ferry_wire::notice::CUTOVER_ROLLBACK,
        text: "rolled back".into(),
    });
    tracing::warn!(vm = %ctx.vm, "cutover rolled back: the source is writable, replication goes on");
    Ok(serde_json::json!({
        "vm": ctx.vm,
        "mounts_writable": s.mounts,
        "final_point_was": s.final_point,
    }))
}
