//! `ferry serve --config` and `ferry status` end to end: the real `ferry serve` (configured by a
//! TOML file, one setting overridden by a flag) and `ferry-agent` binaries on loopback, a real
//! local store; `ferry status` read while the server runs and after it stopped; retention run by
//! the server.
//!
//! `ferry-agent` is another package's binary: build it first (`cargo build --release --bins`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{agent_bin, ferry, same_bytes, spawn_serve, write_random, Env, Proc, Rng};
use serde_json::Value;

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `ferry.toml` in the env's directory with every `[serve]` key; paths are relative to it.
fn write_config(env: &Env, listen: &str, retention: &str) -> PathBuf {
    let p = env.path("ferry.toml");
    fs::write(
        &p,
        format!(
            r#"# ferry serve, as a test runs it
[serve]
listen = "{listen}"
store = "store"
key_file = "master.key"
cache_dir = "ps-cache"
cache_size = "256MiB"
state_dir = "ps-state"
threads = 2
retention = "{retention}"
log_json = false
"#
        ),
    )
    .unwrap();
    p
}

/// A `ferry serve --config FILE [flags]` process logging to a file, and the address it bound.
struct Server {
    proc: Proc,
    addr: String,
}

impl Server {
    /// With `listen`, `--listen LISTEN` overrides the file's address.
    fn start(env: &Env, config: &Path, flags: &[&str], listen: Option<&str>) -> Server {
        let mut c = ferry();
        c.env_remove("FERRY_STORE")
            .env_remove("FERRY_SERVER_STATE_DIR")
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(flags);
        let (proc, addr) = spawn_serve(c, listen, &env.path("serve.log"));
        Server { proc, addr }
    }
    fn log_text(&self) -> String {
        self.proc.log_text()
    }
    /// SIGTERM and wait: the server drains the cache into the store and exits 0.
    fn stop(&mut self) {
        self.proc.term();
    }
}

/// Registers an agent (state in `agent/`) with the passphrase the config's server made.
fn register(env: &Env, config: &Path, addr: &str) {
    let o = ferry()
        .args(["passphrase", "show", "--config"])
        .arg(config)
        .env_remove("FERRY_SERVER_STATE_DIR")
        .output()
        .unwrap();
    ok(&o, "passphrase show --config");
    let pass = env.path("pass.txt");
    fs::write(&pass, &o.stdout).unwrap();
    common::register_with(env, addr, &pass, "agent");
}

/// One `ferry-agent --once` run of VM web01.
fn run_agent(env: &Env, addr: &str, disk: &Path) {
    let o = Command::new(agent_bin())
        .env("FERRY_LOG", "warn")
        .args(["--server", addr, "--vm", "web01", "--once", "--disk"])
        .arg(disk)
        .arg("--state-dir")
        .arg(env.path("agent"))
        .output()
        .unwrap();
    ok(&o, "agent run");
}

fn make_image(path: &Path, rng: &mut Rng, size: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let mut off = 0;
    while off < size {
        if rng.below(4) != 0 {
            write_random(path, rng, off, 1 << 20);
        }
        off += 1 << 20;
    }
}

fn status(env: &Env, json: bool) -> Output {
    let mut c = ferry();
    c.env_remove("FERRY_SERVER_STATE_DIR")
        .args(["status", "--state-dir"])
        .arg(env.path("ps-state"));
    if json {
        c.arg("--json");
    }
    c.output().unwrap()
}

fn status_json(env: &Env) -> Value {
    common::status_answer(&status(env, true))
}

fn vm<'a>(s: &'a Value, name: &str) -> Option<&'a Value> {
    s["vms"].as_array()?.iter().find(|v| v["vm"] == name)
}

/// Polls `ferry status --json` until `done` holds (the file is rewritten every second).
fn wait_status(env: &Env, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let s = status_json(env);
        if done(&s) {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{what}: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn status_shows_the_vm_its_disk_and_last_point_then_a_stopped_server() {
    let env = Env::new();
    // The file names another address (the discard port, never bound here); the flag wins.
    let config = write_config(&env, "127.0.0.1:9", "24h");
    let mut srv = Server::start(&env, &config, &[], Some("127.0.0.1:0"));
    let addr = srv.addr.clone();
    assert_ne!(
        addr, "127.0.0.1:9",
        "--listen overrides the config's listen"
    );
    register(&env, &config, &addr);
    let disk = env.path("disk.img");
    make_image(&disk, &mut Rng(0x57a7), 8 << 20);
    run_agent(&env, &addr, &disk);

    // The agent is done once its tag is acked; the point follows when the pipeline stored the run.
    let s = wait_status(&env, "the point and no backlog", |s| {
        // The manifest names the point at once; the server's file within a second.
        // (`ferry status` takes points from the manifest, connections and counters from the
        // server's file, rewritten every second: wait for a file written after the agent left.)
        vm(s, "web01").is_some_and(|v| {
            v["agent"].is_string()
                && v["last_point"].is_object()
                && v["backlog_bytes"] == 0
                && v["connected"] == false
                && v["disks"][0]["records_received"].as_u64() > Some(0)
        })
    });
    let points = env.points();
    assert_eq!(points.len(), 1, "{points:?}");
    let v = vm(&s, "web01").unwrap();
    assert_eq!(v["last_point"]["id"], points[0]["id"], "{s:#}");
    assert_eq!(v["last_point"]["kind"], "crash");
    assert_eq!(v["points"], 1);
    let rpo = v["rpo_seconds"].as_u64().expect("an RPO");
    assert!(rpo <= 120, "implausible RPO {rpo}: {s:#}");
    assert!(v["agent"].is_string(), "{s:#}");
    assert!(
        v["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{s:#}"
    );
    assert_eq!(v["connected"], false, "the --once agent has left: {s:#}");
    assert_eq!(v["state"], "disconnected");
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{s:#}");
    let d = &disks[0];
    assert_eq!(d["name"], "disk");
    assert_eq!(d["last_point"]["id"], points[0]["id"]);
    assert!(d["records_received"].as_u64().unwrap() > 0, "{s:#}");
    assert!(d["bytes_received"].as_u64().unwrap() > 0, "{s:#}");
    assert!(d["last_acked_seq"].as_u64().unwrap() > 0, "{s:#}");
    assert!(d["rpo_seconds"].as_u64().unwrap() <= 120, "{s:#}");
    let server = &s["server"];
    assert_eq!(server["running"], true, "{s:#}");
    assert_eq!(server["listen"], addr.as_str());
    assert_eq!(server["retention_seconds"], 86400);
    assert_eq!(server["cache_size_bytes"], 256u64 << 20);
    // The store comes from the status file (no --store given), as an absolute path.
    assert_eq!(
        s["store"]["location"],
        env.store().to_str().unwrap(),
        "{s:#}"
    );
    assert!(s["store"]["error"].is_null(), "{s:#}");

    let o = status(&env, false);
    ok(&o, "status");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("ferry serve is running"), "{text}");
    assert!(
        text.contains("web01") && text.contains(points[0]["id"].as_str().unwrap()),
        "{text}"
    );

    srv.stop();
    let o = status(&env, false);
    // A stopped server is a critical condition: exit 3.
    assert_eq!(o.status.code(), Some(3), "status after stop: {o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("CRITICAL server_not_running"));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("ferry serve is not running (status last written at "),
        "{text}"
    );
    let s = status_json(&env);
    assert_eq!(s["server"]["running"], false, "{s:#}");
    let v = vm(&s, "web01").unwrap();
    assert_eq!(
        (&v["state"], &v["connected"]),
        (&"stopped".into(), &false.into())
    );
    assert_eq!(v["last_point"]["id"], points[0]["id"]);
}

#[test]
fn serve_prunes_expired_points_with_its_retention() {
    let env = Env::new();
    // The config's own address (port 0: one the kernel picks), no flag.
    let config = write_config(&env, "127.0.0.1:0", "3s");
    let mut srv = Server::start(&env, &config, &[], None);
    let addr = srv.addr.clone();
    // The file's address was used, not the default (0.0.0.0:7443).
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":7443"),
        "{addr}"
    );
    register(&env, &config, &addr);
    let disk = env.path("disk.img");
    let mut rng = Rng(0x9e7a);
    make_image(&disk, &mut rng, 8 << 20);
    run_agent(&env, &addr, &disk);
    std::thread::sleep(Duration::from_secs(4));
    write_random(&disk, &mut rng, 1 << 20, 256 << 10);
    let copy = env.path("copy.img");
    fs::copy(&disk, &copy).unwrap();
    run_agent(&env, &addr, &disk);
    // The first point is older than 3 s and no longer the newest: the drain loop prunes it.
    let t0 = Instant::now();
    loop {
        let p = env.points();
        if p.len() == 1 && p[0]["id"].as_str().unwrap().starts_with("0002-") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not pruned: {p:?}\n{}",
            srv.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(srv.log_text().contains("retention pruned expired points"));
    // Serving goes on after the prune (the pipeline is rebuilt): a third run becomes a point.
    write_random(&disk, &mut rng, 5 << 20, 128 << 10);
    run_agent(&env, &addr, &disk);
    let s = wait_status(&env, "the third point", |s| {
        vm(s, "web01").is_some_and(|v| {
            v["last_point"]["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("0003-"))
        })
    });
    assert_eq!(s["server"]["retention_seconds"], 3);
    srv.stop();
    let ids: Vec<String> = env
        .points()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!ids.iter().any(|i| i.starts_with("0001-")), "{ids:?}");
    assert!(ids.last().unwrap().starts_with("0003-"), "{ids:?}");
    // Point 0002 is exact if still kept (the newest, 0003, always is).
    if let Some(id) = ids.iter().find(|i| i.starts_with("0002-")) {
        let out = env.path("restored.img");
        let o = env.restore(id, &out, &["--vm", "web01", "--verify"]);
        ok(&o, "restore");
        assert!(same_bytes(&out, &copy), "point {id} differs from its copy");
    }
    let out = env.path("restored-latest.img");
    let o = env.restore("latest", &out, &["--vm", "web01", "--verify"]);
    ok(&o, "restore latest");
    assert!(
        same_bytes(&out, &disk),
        "the newest point differs from the disk"
    );
}

#[test]
fn config_mistakes_are_usage_errors_that_name_the_key_and_the_file() {
    let env = Env::new();
    let bad = env.path("bad.toml");
    fs::write(&bad, "[serve]\nstore = \"store\"\ncache_sise = \"1GiB\"\n").unwrap();
    let missing = env.path("missing.toml");
    let empty = env.path("empty.toml");
    fs::write(&empty, "# nothing\n").unwrap();
    for (file, want) in [
        (&bad, "unknown field `cache_sise`"),
        (&missing, "cannot read the config file"),
        (&empty, "no store"),
    ] {
        let o = ferry()
            .env_remove("FERRY_STORE")
            .arg("serve")
            .arg("--config")
            .arg(file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "{err}");
        if file != &empty {
            assert!(err.contains(file.to_str().unwrap()), "{err}");
        }
    }
}
