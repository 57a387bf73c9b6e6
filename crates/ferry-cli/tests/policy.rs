//! The operator's controls against a real `ferry serve` and a real `ferry-agent` (scan tracker on
//! an image file): a policy change reaches a running agent (its cut interval), retention prunes by
//! the policy and the points left restore exactly, health conditions and `ferry status`'s exit
//! status follow what holds, and the agent answers and stops while its server is unreachable.
//! Costs ~110 s.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{agent_bin, ferry, ok, spawn_serve, Env};
use ferry_testkit::proc::Proc;

fn state(env: &Env) -> std::path::PathBuf {
    env.path("ps-state")
}

fn run(env: &Env, args: &[&str]) -> std::process::Output {
    ferry()
        .args(args)
        .arg("--state-dir")
        .arg(state(env))
        .output()
        .unwrap()
}

fn serve(env: &Env) -> (Proc, String) {
    spawn_serve(
        common::serve_cmd(env, "512MiB"),
        Some("127.0.0.1:0"),
        &env.path("serve.log"),
    )
}

fn register(env: &Env, addr: &str) {
    common::register_agent(env, addr, "agent");
}

/// A continuous agent for VM web01 on `disk` that cuts on its own only once an hour.
fn agent(env: &Env, addr: &str, disk: &Path) -> Proc {
    let mut c = Command::new(agent_bin());
    c.env("FERRY_LOG", "info")
        .args(["--server", addr, "--vm", "web01", "--tracker", "scan"])
        .args(["--crash-interval", "1h", "--app-interval", "off", "--disk"])
        .arg(disk)
        .arg("--state-dir")
        .arg(env.path("agent"));
    Proc::spawn(c, &env.path("agent.log"))
}

fn points(env: &Env) -> Vec<serde_json::Value> {
    env.points()
}

fn status(env: &Env) -> (Option<i32>, serde_json::Value) {
    let o = run(env, &["status", "--json"]);
    (o.status.code(), serde_json::from_slice(&o.stdout).unwrap())
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_policy_reaches_the_running_agent_prunes_by_its_rules_and_health_follows() {
    let env = Env::new();
    std::fs::create_dir_all(state(&env)).unwrap();
    let (mut srv, addr) = serve(&env);
    register(&env, &addr);
    let disk = env.path("disk.img");
    std::fs::File::create(&disk).unwrap();
    common::write_random(&disk, &mut common::Rng(5), 0, 4 << 20);
    let mut a = agent(&env, &addr, &disk);
    // Without a policy the agent keeps its own hour: no point for a while.
    std::thread::sleep(Duration::from_secs(3));
    assert!(points(&env).is_empty());
    let (_, st) = status(&env);
    let vm = &st["vms"][0];
    assert_eq!(vm["intervals"]["from"], "agent", "{st:#}");
    assert!(
        vm["protection"]
            .as_str()
            .unwrap()
            .starts_with("initial sync"),
        "{vm:#}"
    );
    assert_eq!(vm["intervals"]["crash_every_seconds"], 3600.0);
    assert!(
        vm["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "no_recovery_point" && c["level"] == "warning"),
        "{vm:#}"
    );

    // The server's policy takes over the crash interval within a second of the change.
    ok(
        &run(
            &env,
            &["policy", "set", "--vm", "web01", "--crash-every", "10s"],
        ),
        "policy set",
    );
    let set = Instant::now();
    wait_for(
        "two points at the policy's interval",
        Duration::from_secs(40),
        || points(&env).len() >= 2,
    );
    let took = set.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "two 10 s points took {took:?}"
    );
    let (_, st) = status(&env);
    assert_eq!(st["vms"][0]["intervals"]["from"], "server", "{st:#}");
    assert_eq!(st["vms"][0]["intervals"]["crash_every_seconds"], 10.0);
    assert_eq!(st["vms"][0]["protection"], "protected", "{st:#}");
    let o = Command::new(agent_bin())
        .args(["status", "--state-dir"])
        .arg(env.path("agent"))
        .output()
        .unwrap();
    ok(&o, "ferry-agent status");
    let ast: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ast["connected"], true, "{ast:#}");
    assert_eq!(ast["intervals_from"], "server");
    assert_eq!(ast["crash_every_seconds"], 10);
    assert!(ast["last_point"]["id"].is_string(), "{ast:#}");

    // Different data in every point: after each point shows up, new data goes into the image
    // (the next cut is ~10 s later), and a copy of what the next point must restore is kept.
    let mut rng = common::Rng(77);
    let mut versions: std::collections::BTreeMap<usize, std::path::PathBuf> = Default::default();
    let v0 = env.path("v0.img");
    std::fs::copy(&disk, &v0).unwrap();
    let first = points(&env).len();
    for n in first..first + 5 {
        wait_for("the next point", Duration::from_secs(40), || {
            points(&env).len() >= n
        });
        let at = rng.below(3 << 20);
        common::write_random(&disk, &mut rng, at, 1 << 20);
        let v = env.path(&format!("v{n}.img"));
        std::fs::copy(&disk, &v).unwrap();
        versions.insert(n, v);
    }
    wait_for("the last point", Duration::from_secs(40), || {
        points(&env).len() > first + 4
    });
    // Point k (1-based, by seq) holds the last version written before it was cut: the one
    // written when point k-1 (or an earlier one) showed up; points before the first write hold
    // the initial image.
    let content = |k: usize| {
        versions
            .range(..k)
            .next_back()
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| v0.clone())
    };
    let all = points(&env);
    let seq_of = |id: &str| id[..4].parse::<usize>().unwrap();

    // A 50 s retention thinned to one point per 20 s bucket past 15 s: the dry run says what goes
    // and why, and removes nothing.
    let args = [
        "policy",
        "set",
        "--retention",
        "50s",
        "--thin",
        "15s:all,1h:20s",
    ];
    let o = ferry()
        .args(args)
        .arg("--dry-run")
        .arg("--state-dir")
        .arg(state(&env))
        .output()
        .unwrap();
    ok(&o, "policy set --dry-run");
    let dry: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let gone = dry["next_prune"]["web01"]["would_remove"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        gone.iter()
            .any(|g| g["why"].as_str().unwrap().starts_with("thinned")),
        "{dry:#}"
    );
    let newest = all
        .iter()
        .map(|p| seq_of(p["id"].as_str().unwrap()))
        .max()
        .unwrap();
    assert!(gone
        .iter()
        .all(|g| seq_of(g["id"].as_str().unwrap()) != newest));
    std::thread::sleep(Duration::from_secs(5));
    let still: Vec<String> = points(&env)
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        gone.iter()
            .all(|g| still.iter().any(|s| g["id"] == s.as_str())),
        "a dry run removed points"
    );
    ok(&run(&env, &args), "policy set");
    // Retention and thinning go on as points age and new ones come: wait until a point between
    // two kept ones is gone, then stop both (nothing pruned or cut while restoring).
    let ids = |env: &Env| -> Vec<usize> {
        points(env)
            .iter()
            .map(|p| seq_of(p["id"].as_str().unwrap()))
            .collect()
    };
    let all_seqs: Vec<usize> = all
        .iter()
        .map(|p| seq_of(p["id"].as_str().unwrap()))
        .collect();
    wait_for(
        "a point pruned between kept ones",
        Duration::from_secs(40),
        || {
            let left = ids(&env);
            let oldest = left.iter().min().copied().unwrap_or(usize::MAX);
            all_seqs.iter().any(|s| !left.contains(s) && *s > oldest)
        },
    );
    ok(
        &run(
            &env,
            &["policy", "set", "--retention", "1h", "--thin", "none"],
        ),
        "policy set",
    );
    ok(
        &run(
            &env,
            &["policy", "set", "--vm", "web01", "--crash-every", "1h"],
        ),
        "policy set",
    );
    std::thread::sleep(Duration::from_secs(2));
    let left = ids(&env);
    let pruned: Vec<usize> = all_seqs
        .iter()
        .copied()
        .filter(|s| !left.contains(s))
        .collect();
    let oldest_left = *left.iter().min().unwrap();
    assert!(
        pruned.iter().any(|p| *p > oldest_left),
        "no point between kept ones was pruned: left {left:?}, pruned {pruned:?}"
    );
    // Every point left restores exactly what was on the disk when it was cut, also those older
    // than a pruned one (they read through its undo delta).
    for p in points(&env) {
        let id = p["id"].as_str().unwrap();
        let out = env.path(&format!("restored-{id}.img"));
        ok(&env.restore(id, &out, &["--verify"]), "restore");
        assert!(
            common::same_bytes(&content(seq_of(id)), &out),
            "point {id} does not restore what was cut (left {left:?}, pruned {pruned:?})"
        );
    }
    let o = run(&env, &["events", "--kind", "prune", "--json"]);
    ok(&o, "events");
    let ev: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(ev.iter().any(|e| e["vm"] == "web01"), "{ev:#?}");

    // Health: an RPO threshold far below the points' cadence is critical, and `ferry status` says
    // so in its exit status; relaxed again, it clears.
    ok(
        &run(
            &env,
            &[
                "policy",
                "set",
                "--rpo-threshold",
                "1s",
                "--crash-every",
                "1h",
                "--vm",
                "web01",
            ],
        ),
        "policy set",
    );
    wait_for("a critical RPO", Duration::from_secs(15), || {
        let (code, st) = status(&env);
        code == Some(3)
            && st["vms"][0]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "rpo_over_threshold" && c["level"] == "critical")
    });
    ok(
        &run(
            &env,
            &["policy", "set", "--rpo-threshold", "1h", "--vm", "web01"],
        ),
        "policy set",
    );
    wait_for("health ok", Duration::from_secs(15), || {
        status(&env).0 == Some(0)
    });
    let o = run(
        &env,
        &["events", "--kind", "health", "--vm", "web01", "--json"],
    );
    let ev: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        ev.iter()
            .any(|e| e["data"]["condition"] == "rpo_over_threshold"
                && e["data"]["level"] == "critical"),
        "{ev:#?}"
    );
    assert!(
        ev.iter()
            .any(|e| e["data"]["condition"] == "rpo_over_threshold" && e["data"]["level"] == "ok"),
        "{ev:#?}"
    );
    a.term();
    srv.term();
    // Stopped: critical, exit 3, whatever the VMs.
    let (code, st) = status(&env);
    assert_eq!(code, Some(3), "{st:#}");
    assert_eq!(st["conditions"][0]["name"], "server_not_running");
}

#[test]
fn the_agent_answers_and_stops_while_its_server_is_unreachable() {
    let env = Env::new();
    std::fs::create_dir_all(state(&env)).unwrap();
    let (mut srv, addr) = serve(&env);
    register(&env, &addr);
    srv.term();
    let disk = env.path("disk.img");
    std::fs::File::create(&disk).unwrap();
    common::write_random(&disk, &mut common::Rng(9), 0, 1 << 20);
    let mut a = agent(&env, &addr, &disk);
    let sock = env.path("agent/agent.sock");
    wait_for("the control socket", Duration::from_secs(10), || {
        sock.exists()
    });
    let o = Command::new(agent_bin())
        .args(["status", "--state-dir"])
        .arg(env.path("agent"))
        .output()
        .unwrap();
    ok(&o, "status while waiting");
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["connected"], false, "{st:#}");
    assert_eq!(st["conditions"][0]["name"], "agent_disconnected");
    let t = Instant::now();
    let o = Command::new(agent_bin())
        .args(["cut", "--timeout", "60s", "--state-dir"])
        .arg(env.path("agent"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not connected"),
        "{o:?}"
    );
    let t = Instant::now();
    a.term();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    // Logs to a file carry no colour escapes.
    assert!(!a.log_text().contains('\u{1b}'), "{}", a.log_text());
}
