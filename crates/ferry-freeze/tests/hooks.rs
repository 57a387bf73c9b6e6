//! The hook runner with real scripts: order, arguments, environment, failures, timeouts.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_freeze::{run_hooks, run_hooks_with_env, Consistency, HookError, HookStatus, Phase};

fn hook(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
}

fn hooks_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn runs_executables_in_name_order_with_the_phase_and_environment() {
    let d = hooks_dir();
    let log = d.path().join("log.txt");
    let logs = log.display();
    hook(
        d.path(),
        "20-second",
        &format!("echo \"20 $1 $FERRY_HOOK_PHASE $FERRY_CUT_ID\" >> {logs}"),
    );
    hook(
        d.path(),
        "10-first",
        &format!("echo \"10 $1 $FERRY_HOOK_TIMEOUT_MS\" >> {logs}"),
    );
    hook(d.path(), "30-old~", &format!("echo never >> {logs}"));
    hook(d.path(), ".hidden", &format!("echo never >> {logs}"));
    hook(d.path(), "40-x.dpkg-old", &format!("echo never >> {logs}"));
    fs::write(d.path().join("README"), "not a hook").unwrap();
    fs::create_dir(d.path().join("50-dir")).unwrap();

    let r = run_hooks_with_env(
        d.path(),
        Phase::Pre,
        Duration::from_secs(5),
        &[("FERRY_CUT_ID", "cut-7")],
    )
    .unwrap();
    assert!(r.all_ok(), "{r:?}");
    assert_eq!(r.consistency(), Consistency::App);
    let names: Vec<_> = r.hooks.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["10-first", "20-second"]);
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "10 pre-freeze 5000\n20 pre-freeze pre-freeze cut-7\n"
    );
    let skipped: Vec<_> = r.skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        skipped,
        [".hidden", "30-old~", "40-x.dpkg-old", "50-dir", "README"]
    );

    fs::remove_file(&log).unwrap();
    let r = run_hooks(d.path(), Phase::Post, Duration::from_secs(5)).unwrap();
    assert!(r.all_ok());
    assert!(fs::read_to_string(&log)
        .unwrap()
        .starts_with("10 post-thaw"));
}

#[test]
fn a_failing_pre_hook_downgrades_the_point_and_the_rest_still_run() {
    let d = hooks_dir();
    hook(
        d.path(),
        "10-fails",
        "echo 'cannot quiesce: app busy' >&2; exit 3",
    );
    hook(d.path(), "20-ok", "echo fine");
    let r = run_hooks(d.path(), Phase::Pre, Duration::from_secs(5)).unwrap();
    assert_eq!(r.hooks.len(), 2);
    assert_eq!(r.hooks[0].status, HookStatus::Failed { code: 3 });
    assert!(r.hooks[0].output.contains("cannot quiesce"));
    assert!(
        r.hooks[0].why().contains("exited with 3"),
        "{}",
        r.hooks[0].why()
    );
    assert!(
        r.hooks[0].why().contains("app busy"),
        "{}",
        r.hooks[0].why()
    );
    assert!(r.hooks[1].status.is_ok());
    assert_eq!(r.hooks[1].output, "fine\n");
    assert_eq!(r.consistency(), Consistency::Crash);
    assert_eq!(r.failed().count(), 1);
    // Post-thaw failures are reported but do not change the point.
    let r = run_hooks(d.path(), Phase::Post, Duration::from_secs(5)).unwrap();
    assert!(!r.all_ok());
    assert_eq!(r.consistency(), Consistency::App);
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn a_hook_that_overruns_is_killed_with_its_children() {
    let d = hooks_dir();
    let pidfile = d.path().join("child.pid");
    hook(
        d.path(),
        "10-slow",
        &format!("sleep 30 & echo $! > {}; wait", pidfile.display()),
    );
    let t = Instant::now();
    let r = run_hooks(d.path(), Phase::Pre, Duration::from_millis(300)).unwrap();
    let took = t.elapsed();
    assert_eq!(r.hooks[0].status, HookStatus::TimedOut);
    assert_eq!(r.consistency(), Consistency::Crash);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t = Instant::now();
    while pid_alive(pid) && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The sleep is our grandchild's child: reparented, maybe a zombie of init for a moment.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "the hook's child survived: {stat}"
    );
}

#[test]
fn a_hook_ignoring_sigterm_is_killed_after_the_grace() {
    let d = hooks_dir();
    hook(
        d.path(),
        "10-stubborn",
        "trap '' TERM; while true; do sleep 0.05; done",
    );
    hook(d.path(), "20-next", "exit 0");
    let t = Instant::now();
    let r = run_hooks(d.path(), Phase::Post, Duration::from_millis(200)).unwrap();
    let took = t.elapsed();
    assert_eq!(r.hooks[0].status, HookStatus::TimedOut);
    assert!(r.hooks[0].why().contains("timed out"));
    assert!(r.hooks[1].status.is_ok(), "the next hook still ran");
    assert!(
        took >= Duration::from_millis(700),
        "SIGTERM, 500 ms, SIGKILL: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn writable_hooks_are_not_run_and_a_missing_directory_has_no_hooks() {
    let d = hooks_dir();
    let marker = d.path().join("ran");
    hook(d.path(), "10-open", &format!("touch {}", marker.display()));
    fs::set_permissions(d.path().join("10-open"), fs::Permissions::from_mode(0o777)).unwrap();
    let r = run_hooks(d.path(), Phase::Pre, Duration::from_secs(5)).unwrap();
    assert!(
        matches!(r.hooks[0].status, HookStatus::Insecure(_)),
        "{r:?}"
    );
    assert!(!marker.exists(), "an insecure hook must not run");
    assert_eq!(r.consistency(), Consistency::Crash);

    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let err = run_hooks(d.path(), Phase::Pre, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, HookError::InsecureDir { .. }), "{err}");
    assert!(err.to_string().contains("chmod go-w"), "{err}");

    let r = run_hooks(&d.path().join("nope"), Phase::Pre, Duration::from_secs(5)).unwrap();
    assert!(r.hooks.is_empty() && r.all_ok());
    assert_eq!(r.consistency(), Consistency::App);
}

#[test]
fn a_hook_that_cannot_start_is_a_failure() {
    let d = hooks_dir();
    let p = d.path().join("10-bad-interpreter");
    fs::write(&p, "#!/nonexistent/interpreter\n").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    let r = run_hooks(d.path(), Phase::Pre, Duration::from_secs(5)).unwrap();
    assert!(
        matches!(r.hooks[0].status, HookStatus::SpawnFailed(_)),
        "{r:?}"
    );
    assert_eq!(r.consistency(), Consistency::Crash);
}

/// Issue 8, local privilege: a symbolic link in the hooks directory is not followed (even to a
/// trusted file), a directory above the hooks directory that others may write makes nothing run,
/// and a hook learns its own path from FERRY_HOOK_PATH (its `$0` is the descriptor it runs from).
#[test]
fn links_and_writable_parents_are_refused_and_a_hook_knows_its_path() {
    let top = hooks_dir();
    let d = top.path().join("hooks.d");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    let out = top.path().join("path.txt");
    hook(
        &d,
        "10-real",
        &format!("echo \"$FERRY_HOOK_PATH\" > {}", out.display()),
    );
    let marker = top.path().join("linked-ran");
    let target = top.path().join("elsewhere");
    fs::write(&target, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&target, d.join("20-link")).unwrap();

    let r = run_hooks(&d, Phase::Pre, Duration::from_secs(5)).unwrap();
    assert!(r.hooks[0].status.is_ok(), "{r:?}");
    assert_eq!(
        fs::read_to_string(&out).unwrap().trim(),
        d.join("10-real").display().to_string()
    );
    assert!(
        matches!(&r.hooks[1].status, HookStatus::Insecure(w) if w.contains("symbolic link")),
        "{r:?}"
    );
    assert!(!marker.exists(), "a linked hook must not run");

    // Others may write a directory above: nothing in it runs.
    fs::remove_file(d.join("20-link")).unwrap();
    fs::remove_file(&out).unwrap();
    fs::set_permissions(top.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let err = run_hooks(&d, Phase::Pre, Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(&err, HookError::InsecureDir { reason, .. } if reason.contains("below")),
        "{err}"
    );
    assert!(!out.exists(), "no hook runs under a writable parent");
}
