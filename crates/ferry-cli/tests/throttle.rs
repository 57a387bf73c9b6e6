//! Ingest throttles against a real `ferry serve` and real agents on the wire protocol
//! (`ferry-simagents`, built next to `ferry` by `cargo build --release --bins`): the rate the
//! server accepts follows the setting, a change applies within a second, and a churning VM cannot
//! starve a small one under the global throttle.
//!
//! The rate is read from the server's status file (each VM's bytes received, rewritten every
//! second) with the test's own clock at each rewrite, over 30 s windows. Costs ~110 s.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ferry, ok, spawn_serve, Env};

const MIB: f64 = 1048576.0;

fn simagents() -> PathBuf {
    ferry_testkit::proc::sibling_bin(env!("CARGO_BIN_EXE_ferry"), "ferry-simagents")
}

fn state(env: &Env) -> PathBuf {
    env.path("ps-state")
}

fn throttle(env: &Env, args: &[&str]) -> std::process::Output {
    ferry()
        .arg("throttle")
        .args(args)
        .arg("--state-dir")
        .arg(state(env))
        .output()
        .unwrap()
}

fn serve(env: &Env) -> (ferry_testkit::proc::Proc, String) {
    spawn_serve(
        common::serve_cmd(env, "8GiB"),
        Some("127.0.0.1:0"),
        &env.path("serve.log"),
    )
}

fn passphrase(env: &Env) -> PathBuf {
    common::passphrase_txt(env)
}

/// One simulated agent protecting VM `PREFIX-000`, writing incompressible 64 KiB records for
/// `seconds` (at `rate` bytes/s, 0 = as fast as credit allows).
fn agent(addr: &str, pass: &Path, prefix: &str, seconds: u32, rate: u64, log: &Path) -> Child {
    agent_cutting(addr, pass, prefix, seconds, rate, 0, log)
}

/// [`agent`], also cutting a crash-consistent point every `cut_every` seconds (0: only at its end).
fn agent_cutting(
    addr: &str,
    pass: &Path,
    prefix: &str,
    seconds: u32,
    rate: u64,
    cut_every: u32,
    log: &Path,
) -> Child {
    Command::new(simagents())
        .args(["--cut-every", &cut_every.to_string()])
        .args(["--server", addr, "--agents", "1", "--vm-prefix", prefix])
        .arg("--passphrase-file")
        .arg(pass)
        .args(["--seconds", &seconds.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--disk-size", &(256u64 << 20).to_string(), "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Each rewrite of the status file seen: when the test saw it, when the server wrote it (its
/// `written_at`, milliseconds), and each VM's bytes received.
type Samples = Arc<Mutex<Vec<(Instant, f64, std::collections::HashMap<String, u64>)>>>;

/// The tests of this file measure rates on a 2-core machine: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn sample(status: PathBuf, stop: Arc<AtomicBool>) -> (Samples, std::thread::JoinHandle<()>) {
    use std::os::unix::fs::MetadataExt;
    let out: Samples = Default::default();
    let o = out.clone();
    let h = std::thread::spawn(move || {
        let mut last = None;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            // Every rewrite is a rename: a new inode.
            let Ok(m) = std::fs::metadata(&status) else {
                continue;
            };
            if last == Some(m.ino()) {
                continue;
            }
            let at = Instant::now();
            let Ok(b) = std::fs::read(&status) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else {
                continue;
            };
            last = Some(m.ino());
            let written = humantime::parse_rfc3339(v["written_at"].as_str().unwrap())
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            let mut per = std::collections::HashMap::new();
            for vm in v["vms"].as_array().into_iter().flatten() {
                let bytes: u64 = vm["disks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| d["bytes_received"].as_u64().unwrap())
                    .sum();
                per.insert(vm["vm"].as_str().unwrap().to_owned(), bytes);
            }
            o.lock().unwrap().push((at, written, per));
        }
    });
    (out, h)
}

/// The rate of `vm` (bytes/s) between the first samples at or after `from` and `to`.
fn rate(s: &Samples, vm: &str, from: Instant, to: Instant) -> f64 {
    // The file is rewritten every second: wait for the first rewrite after `to`.
    let deadline = to + Duration::from_secs(10);
    while !s.lock().unwrap().iter().any(|(t, _, _)| *t >= to) {
        assert!(Instant::now() < deadline, "no status rewrite for 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = s.lock().unwrap();
    let a = s
        .iter()
        .find(|(t, _, _)| *t >= from)
        .expect("a sample after from");
    let b = s
        .iter()
        .find(|(t, _, _)| *t >= to)
        .expect("a sample after to");
    let (ba, bb) = (a.2.get(vm).copied().unwrap_or(0), b.2[vm]);
    // Timed by the server's own clock at each write.
    (bb - ba) as f64 / (b.1 - a.1)
}

/// Waits until `vm` has received data; the time it was first seen doing so.
fn started(s: &Samples, vm: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((t, _, _)) = s
            .lock()
            .unwrap()
            .iter()
            .find(|(_, _, m)| m.get(vm).is_some_and(|b| *b > 0))
        {
            return *t;
        }
        assert!(Instant::now() < deadline, "{vm} sent nothing in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

fn within(got: f64, want: f64, tolerance: f64, what: &str) {
    let ratio = got / want;
    eprintln!(
        "{what}: {:.2} MiB/s (setting {:.2} MiB/s, ratio {ratio:.3})",
        got / MIB,
        want / MIB
    );
    assert!(
        (ratio - 1.0).abs() <= tolerance,
        "{what}: {:.2} MiB/s is not within {:.0} % of {:.2} MiB/s",
        got / MIB,
        tolerance * 100.0,
        want / MIB
    );
}

#[test]
fn the_ingest_rate_follows_the_throttle_and_a_change_applies_within_a_second() {
    let _one = one_at_a_time();
    let env = Env::new();
    std::fs::create_dir_all(state(&env)).unwrap();
    // Set before the server starts: it must apply from the first byte.
    ok(&throttle(&env, &["set", "20MiB/s"]), "throttle set");
    let (mut srv, addr) = serve(&env);
    let pass = passphrase(&env);
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, sampler) = sample(state(&env).join("status.json"), stop.clone());
    let mut a = agent(&addr, &pass, "wire", 72, 0, &env.path("agent.log"));
    let t0 = started(&samples, "wire-000") + Duration::from_secs(2);
    sleep_until(t0 + Duration::from_secs(31));
    within(
        rate(&samples, "wire-000", t0, t0 + Duration::from_secs(30)),
        20.0 * MIB,
        0.05,
        "30 s at 20MiB/s",
    );
    let show = throttle(&env, &["show", "--json"]);
    ok(&show, "throttle show");
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["ingest"]["all"]["rate_bytes_per_second"], 20 << 20);
    assert_eq!(v["server_running"], true);

    ok(&throttle(&env, &["set", "50MiB/s"]), "throttle set");
    let changed = Instant::now();
    sleep_until(changed + Duration::from_secs(4) + Duration::from_millis(100));
    // Had it taken effect only after 2 s, this would be near 40 MiB/s.
    within(
        rate(
            &samples,
            "wire-000",
            changed + Duration::from_secs(1),
            changed + Duration::from_secs(4),
        ),
        50.0 * MIB,
        0.12,
        "from 1 s after the change",
    );
    let t1 = changed + Duration::from_secs(2);
    sleep_until(t1 + Duration::from_secs(31));
    within(
        rate(&samples, "wire-000", t1, t1 + Duration::from_secs(30)),
        50.0 * MIB,
        0.05,
        "30 s at 50MiB/s",
    );
    assert!(a.wait().unwrap().success(), "the simulated agent failed");
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    srv.term();
    let log = srv.log_text();
    assert!(
        log.contains("throttles in effect") && log.contains("ingest=50 MiB/s"),
        "{log}"
    );
}

#[test]
fn a_churning_vm_cannot_starve_a_small_one_under_the_global_throttle() {
    let _one = one_at_a_time();
    let env = Env::new();
    std::fs::create_dir_all(state(&env)).unwrap();
    let (mut srv, addr) = serve(&env);
    let pass = passphrase(&env);
    // Set while running.
    ok(&throttle(&env, &["set", "40MiB/s"]), "throttle set");
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, sampler) = sample(state(&env).join("status.json"), stop.clone());
    // The small VM's RPO threshold: 30 s. Both VMs cut a point every 2 s while writing.
    ok(
        &ferry()
            .args([
                "policy",
                "set",
                "--vm",
                "small-000",
                "--rpo-threshold",
                "30s",
                "--state-dir",
            ])
            .arg(state(&env))
            .output()
            .unwrap(),
        "policy set",
    );
    let small_rate = 5_000_000u64;
    let mut churn = agent_cutting(&addr, &pass, "churn", 26, 0, 2, &env.path("churn.log"));
    let mut small = agent_cutting(
        &addr,
        &pass,
        "small",
        26,
        small_rate,
        2,
        &env.path("small.log"),
    );
    let t0 =
        started(&samples, "small-000").max(started(&samples, "churn-000")) + Duration::from_secs(2);
    sleep_until(t0 + Duration::from_secs(9));
    let show = throttle(&env, &["show", "--json"]);
    ok(&show, "throttle show");
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(
        v["ingest"]["vms"]["churn-000"]["held_back_now"], true,
        "{v:#}"
    );
    assert!(
        v["ingest"]["vms"].get("small-000").is_none(),
        "the small VM is not held back: {v:#}"
    );
    // While both write flat out, the server reports the small VM's points as they commit: its
    // RPO stays near its cut interval, far under the threshold, and no condition holds.
    let st = common::status_json(&env);
    let small_vm = st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == "small-000")
        .unwrap_or_else(|| panic!("{st:#}"));
    let rpo = small_vm["rpo_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no RPO: {small_vm:#}"));
    assert!(
        rpo < 10.0,
        "small VM RPO {rpo} s with a point every 2 s: {small_vm:#}"
    );
    assert_eq!(
        small_vm["conditions"],
        serde_json::json!([]),
        "{small_vm:#}"
    );
    sleep_until(t0 + Duration::from_secs(21));
    let (from, to) = (t0, t0 + Duration::from_secs(20));
    let s = rate(&samples, "small-000", from, to);
    let c = rate(&samples, "churn-000", from, to);
    // The small VM gets all it sends; the churner the rest of the global rate.
    within(
        s,
        small_rate as f64,
        0.05,
        "the small VM under a 40MiB/s global throttle",
    );
    within(s + c, 40.0 * MIB, 0.05, "both VMs together");
    assert!(churn.wait().unwrap().success());
    assert!(small.wait().unwrap().success());
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    srv.term();
}

#[test]
fn throttle_commands_refuse_bad_input_and_explain() {
    let env = Env::new();
    let no_state = throttle(&env, &["set", "5MiB/s"]);
    assert_eq!(no_state.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&no_state.stderr).contains("not a process server state directory")
    );
    std::fs::create_dir_all(state(&env)).unwrap();
    for (args, want) in [
        (&["set", "50Mb/s"][..], "bits or bytes"),
        (&["set", "50"][..], "no unit"),
        (
            &["schedule", "mon-fri 8-18 5MiB/s"][..],
            "not a time window",
        ),
        (&["set", "5MiB/s", "--vm", "bad/name"][..], "VM name"),
        (
            &["set", "5MiB/s", "--vm", "web01", "--link", "upload"][..],
            "global",
        ),
        (&["weight", "0", "--vm", "web01"][..], "1 to 1000"),
    ] {
        let o = throttle(&env, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    // Nothing was written by the refusals.
    assert!(!state(&env).join("throttle.json").exists());
    ok(
        &throttle(
            &env,
            &[
                "schedule",
                "mon-fri 08:00-18:00 50MiB/s; sat,sun * unlimited; * 400Mbit/s",
            ],
        ),
        "schedule",
    );
    ok(
        &throttle(&env, &["set", "5MiB/s", "--vm", "web01"]),
        "set --vm",
    );
    ok(
        &throttle(&env, &["set", "100Mbit/s", "--link", "upload"]),
        "set upload",
    );
    ok(&throttle(&env, &["weight", "4", "--vm", "db01"]), "weight");
    let o = throttle(&env, &["show", "--json"]);
    ok(&o, "show");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["ingest"]["all"]["schedule"],
        "mon-fri 08:00-18:00 50MiB/s; sat,sun * unlimited; * 400Mbit/s"
    );
    assert!(v["ingest"]["all"]["next_change"]["at"].is_string(), "{v:#}");
    assert_eq!(
        v["ingest"]["vms"]["web01"]["rate_bytes_per_second"],
        5 << 20
    );
    assert_eq!(v["ingest"]["vms"]["db01"]["weight"], 4);
    assert_eq!(v["upload"]["all"]["rate_bytes_per_second"], 12_500_000);
    assert_eq!(v["server_running"], false);
    // A damaged file is an error that says what to do, for the commands and for the server.
    std::fs::write(state(&env).join("throttle.json"), b"{").unwrap();
    let o = throttle(&env, &["show"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("fix or remove it"));
}

#[test]
fn an_agent_caps_itself_with_max_rate() {
    let _one = one_at_a_time();
    let env = Env::new();
    std::fs::create_dir_all(state(&env)).unwrap();
    let (mut srv, addr) = serve(&env);
    common::register_agent(&env, &addr, "agent");
    // 128 MiB of incompressible data: an initial sync at 16 MiB/s takes 8 s.
    let disk = env.path("disk.img");
    std::fs::File::create(&disk).unwrap();
    let mut rng = common::Rng(7);
    common::write_random(&disk, &mut rng, 0, 128 << 20);
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, sampler) = sample(state(&env).join("status.json"), stop.clone());
    let conf = env.path("agent.toml");
    std::fs::write(&conf, "max_rate = \"16MiB/s\"\n").unwrap();
    let mut agent = Command::new(common::agent_bin());
    agent
        .env("FERRY_LOG", "info")
        .args([
            "--server",
            &addr,
            "--vm",
            "thin",
            "--once",
            "--tracker",
            "scan",
        ])
        .arg("--config")
        .arg(&conf)
        .arg("--disk")
        .arg(&disk)
        .arg("--state-dir")
        .arg(env.path("agent"));
    let t = Instant::now();
    let o = agent.output().unwrap();
    ok(&o, "agent --once");
    let took = t.elapsed();
    let t0 = started(&samples, "thin") + Duration::from_secs(1);
    let r = rate(&samples, "thin", t0, t0 + Duration::from_secs(5));
    within(r, 16.0 * MIB, 0.05, "an agent with max_rate = 16MiB/s");
    assert!(took >= Duration::from_secs(7), "128 MiB in {took:?}");
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    srv.term();
    // A bad max_rate is a configuration error that names the key.
    std::fs::write(&conf, "max_rate = \"16Mb/s\"\n").unwrap();
    let o = agent.output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("max_rate"));
}
