//! The admin socket against a real `ferry serve`: an operator in the admin group (here `nogroup`,
//! named by `admin_group`) runs the commands as user `nobody`, who cannot read or write the state
//! files (checked: the same reads with `FERRY_ADMIN_SOCKET=off` fail), so the changes and reads
//! below went through the running server; others are refused; a stopped server removes its
//! socket, a killed one's is replaced at the next start.
//!
//! Needs root (it runs commands as `nobody` with `setpriv`) and the `nogroup` group (Debian).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::{ferry, ok, spawn_serve, Env};

/// The `ferry` binary where `nobody` may run it (the build may sit under a 0700 home).
fn ferry_for_all(env: &Env) -> std::path::PathBuf {
    let p = env.path("ferry-bin");
    if !p.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_ferry"), &p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    p
}

fn as_user_env(env: &Env, uid: u32, gid: u32, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(ferry_for_all(env))
        .args(args)
        .env("FERRY_LOG", "warn")
        .env("HOME", "/nonexistent")
        .envs(vars.iter().copied());
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// `daemon`: a group that is not the admin group.
const OTHER: u32 = 1;

#[test]
fn the_admin_group_operates_a_running_server_through_its_socket() {
    if !ferry_testkit::sys::is_root() {
        ferry_testkit::skip(
            "the_admin_group_operates_a_running_server_through_its_socket",
            "needs root (runs commands as nobody with setpriv)",
            "FERRY_REQUIRE_ROOT_TESTS",
        );
        return;
    }
    let nogroup = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("nogroup:x:65534:"));
    assert!(nogroup, "this test needs the nogroup group (gid 65534)");
    let env = Env::new();
    // nobody may traverse to the socket (the state files stay 0600 root).
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = env.path("ps-state");
    let cfg = env.path("ferry.toml");
    std::fs::write(
        &cfg,
        format!(
            "[serve]\nstore = {:?}\nkey_file = {:?}\ncache_dir = {:?}\nstate_dir = {:?}\ncache_size = \"256MiB\"\nadmin_group = \"nogroup\"\n",
            env.store(),
            env.key(),
            env.path("ps-cache"),
            state
        ),
    )
    .unwrap();
    // As the shipped unit makes it (UMask=0077): no one but its owner may enter.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let serve = || {
        let mut c = ferry();
        c.arg("serve").arg("--config").arg(&cfg);
        spawn_serve(c, Some("127.0.0.1:0"), &env.path("serve.log"))
    };
    let as_user = |uid: u32, gid: u32, args: &[&str]| as_user_env(&env, uid, gid, args, &[]);
    let (mut server, _addr) = serve();
    let sock = state.join("admin.sock");
    let sd = state.to_str().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no admin socket: {}",
            server.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");
    // The admin group may enter the state directory (search), not list it.
    let m = std::fs::metadata(&state).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::gid(&m),
            m.permissions().mode() & 0o777
        ),
        (NOGROUP, 0o710),
        "state directory group and mode"
    );

    // nobody cannot read the files themselves (passphrase show never uses the socket)...
    let o = as_user(NOBODY, NOGROUP, &["passphrase", "show", "--state-dir", sd]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("Permission denied"), "{}", text(&o));
    let o = as_user(NOBODY, NOGROUP, &["throttle", "show", "--state-dir", sd]);
    ok(&o, "throttle show as nobody:nogroup");
    // ...but changes the throttle through the server, which applies it and records who asked.
    let o = as_user(
        NOBODY,
        NOGROUP,
        &[
            "throttle",
            "set",
            "30MiB/s",
            "--vm",
            "web01",
            "--state-dir",
            sd,
        ],
    );
    ok(&o, "throttle set as nobody:nogroup");
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("throttle.json")).unwrap()).unwrap();
    assert!(t.to_string().contains("30MiB/s"), "{t}");
    server.wait_log(
        "the server applying it",
        std::time::Duration::from_secs(5),
        |l| (l.contains("web01") && l.contains("30 MiB/s")).then_some(()),
    );
    let o = as_user(
        NOBODY,
        NOGROUP,
        &["policy", "set", "--rpo-threshold", "15m", "--state-dir", sd],
    );
    ok(&o, "policy set as nobody:nogroup");
    let o = as_user(
        NOBODY,
        NOGROUP,
        &["policy", "show", "--json", "--state-dir", sd],
    );
    ok(&o, "policy show");
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(p["default"]["rpo_threshold_seconds"], 900, "{p}");
    let o = as_user(NOBODY, NOGROUP, &["events", "--json", "--state-dir", sd]);
    ok(&o, "events");
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        ev.to_string().contains("operator set ingest from VM web01"),
        "{ev}"
    );
    let o = as_user(NOBODY, NOGROUP, &["status", "--json", "--state-dir", sd]);
    let st = common::status_answer(&o);
    assert_eq!(st["server"]["running"], true, "{st}");
    ok(
        &as_user(NOBODY, NOGROUP, &["vms", "list", "--state-dir", sd]),
        "vms list",
    );
    ok(
        &as_user(NOBODY, NOGROUP, &["agents", "list", "--state-dir", sd]),
        "agents list",
    );
    // The same reads as nobody without the socket fail: what passed above went through it.
    for args in [
        &["throttle", "show", "--state-dir", sd][..],
        &["policy", "show", "--state-dir", sd],
        &["events", "--state-dir", sd],
    ] {
        let o = as_user_env(
            &env,
            NOBODY,
            NOGROUP,
            args,
            &[("FERRY_ADMIN_SOCKET", "off")],
        );
        assert_ne!(
            o.status.code(),
            Some(0),
            "{args:?} without the socket: {}",
            text(&o)
        );
        assert!(
            text(&o).contains("Permission denied"),
            "{args:?}: {}",
            text(&o)
        );
    }
    // Usage errors come back as the command's own, with its exit status.
    let o = as_user(
        NOBODY,
        NOGROUP,
        &["throttle", "set", "5Mb/s", "--state-dir", sd],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("Mbit/s"), "{}", text(&o));

    // Someone outside the admin group is refused, and told what to do.
    let o = as_user(
        NOBODY,
        OTHER,
        &["throttle", "set", "1MiB/s", "--state-dir", sd],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("admin group"), "{}", text(&o));
    let t = std::fs::read_to_string(state.join("throttle.json")).unwrap();
    assert!(!t.contains("1MiB/s"), "{t}");

    // Only operator commands run inside the server.
    for args in [
        vec!["serve".to_string()],
        vec!["passphrase".into(), "show".into()],
    ] {
        let r = raw_call(&sock, args.clone());
        assert_eq!(r.exit, 2, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("operator's commands only"),
            "{args:?}: {r:?}"
        );
    }

    // A store sent to the server is refused: the caller's store is the caller's to read.
    for args in [
        vec!["status".to_string(), "--store".into(), "/".into()],
        vec!["policy".into(), "show".into(), "--store=/etc".into()],
    ] {
        let r = raw_call(&sock, args.clone());
        assert_eq!(r.exit, 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains("server's own store"), "{args:?}: {r:?}");
    }

    // Stopped: the socket goes, and nobody gets the files' own refusal.
    server.term();
    assert!(!sock.exists(), "the socket outlived the server");
    let o = as_user(NOBODY, NOGROUP, &["throttle", "show", "--state-dir", sd]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("Permission denied"), "{}", text(&o));
    // Root works on the files while it is stopped.
    ok(
        &ferry()
            .args(["throttle", "set", "40MiB/s", "--state-dir", sd])
            .output()
            .unwrap(),
        "throttle set with the server stopped",
    );

    // Killed: the socket stays behind; commands fall back to the files; the next start replaces it.
    let (mut server, _) = serve();
    server.kill9();
    assert!(sock.exists());
    ok(
        &ferry()
            .args(["throttle", "show", "--state-dir", sd])
            .output()
            .unwrap(),
        "throttle show beside a dead server's socket",
    );
    let (mut server, _) = serve();
    let o = as_user(
        NOBODY,
        NOGROUP,
        &["throttle", "show", "--json", "--state-dir", sd],
    );
    ok(&o, "throttle show after a restart");
    assert!(text(&o).contains("40"), "{}", text(&o));
    server.term();
}

fn raw_call(sock: &std::path::Path, args: Vec<String>) -> ferry_serve::admin::Reply {
    match ferry_serve::admin::call(
        sock.parent().unwrap(),
        args,
        std::time::Duration::from_secs(30),
    ) {
        ferry_serve::admin::Reach::Ran(r) => r,
        other => panic!("{other:?}"),
    }
}
