//! The end of a migration, against a running `ferry serve` and real `ferry-agent`s (scan
//! tracker on image files): `ferry failover --vm VM` makes the VM's permanent disks exactly at a
//! point and the server stops expecting its agent; `ferry complete-migration` refuses what would
//! lose data unasked, then, while the server holds the store, ends the VM's replication: its agent
//! is refused (and exits), its points, replica and holds go, the journal segments another VM's
//! deduplicated data names stay (that VM still restores exactly), the failed-over disks stay, and a
//! restarted server and agent keep it ended. Then, with no server, the command does the work
//! itself. Costs ~25 s.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{agent_bin, ferry, ok, spawn_serve, Env};
use ferry_testkit::proc::Proc;

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn agent(env: &Env, addr: &str, vm: &str, disk: &Path) -> Proc {
    agent_with(env, addr, vm, disk, &[])
}

fn agent_with(env: &Env, addr: &str, vm: &str, disk: &Path, extra: &[&str]) -> Proc {
    let mut c = Command::new(agent_bin());
    c.env("FERRY_LOG", "info")
        .args(["--server", addr, "--vm", vm, "--tracker", "scan"])
        .args(["--crash-interval", "1h", "--app-interval", "off", "--disk"])
        .arg(disk)
        .arg("--hooks-dir")
        .arg(env.path("hooks.d"))
        .arg("--state-dir")
        .arg(env.path(&format!("agent-{vm}")))
        .args(extra);
    Proc::spawn(c, &env.path(&format!("agent-{vm}.log")))
}

/// `ferry-agent cut` of the VM's agent, retried until it is connected: the new point's id.
fn cut(env: &Env, vm: &str) -> String {
    let t = Instant::now();
    loop {
        let o = Command::new(agent_bin())
            .args(["cut", "--timeout", "60s", "--state-dir"])
            .arg(env.path(&format!("agent-{vm}")))
            .output()
            .unwrap();
        if o.status.success() {
            return String::from_utf8_lossy(&o.stdout).trim().to_owned();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "cut of {vm}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn cmd(env: &Env, args: &[&str]) -> std::process::Output {
    ferry()
        .args(args)
        .arg("--store")
        .arg(env.store())
        .arg("--key-file")
        .arg(env.key())
        .arg("--state-dir")
        .arg(env.path("ps-state"))
        .output()
        .unwrap()
}

fn points_of(env: &Env, vm: &str) -> Vec<serde_json::Value> {
    env.points().into_iter().filter(|p| p["vm"] == vm).collect()
}

/// Every path under the store, relative, sorted (what the test prints before and after).
fn listing(root: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn vm_status(env: &Env, vm: &str) -> Option<serde_json::Value> {
    let st = crate::common::status_json(env);
    st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == vm)
        .cloned()
}

fn payload_b3(vhd: &Path) -> String {
    let v = std::fs::read(vhd).unwrap();
    assert_eq!(
        &v[v.len() - 512..v.len() - 504],
        b"conectix",
        "not a fixed VHD"
    );
    blake3::hash(&v[..v.len() - 512]).to_hex().to_string()
}

#[test]
fn failover_then_complete_migration_ends_replication_and_removes_only_that_vm_data() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("ps-state")).unwrap();
    let serve = || {
        spawn_serve(
            crate::common::serve_cmd(&env, "512MiB"),
            Some("127.0.0.1:0"),
            &env.path("serve.log"),
        )
    };
    let (mut srv, addr) = serve();
    crate::common::register_agent(&env, &addr, "agent-web01");
    crate::common::register_agent(&env, &addr, "agent-db01");
    // The same 4 MiB on both disks: db01's copy is deduplicated into web01's segments.
    let (web, db) = (env.path("web01.img"), env.path("db01.img"));
    std::fs::File::create(&web)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    crate::common::write_random(&web, &mut crate::common::Rng(11), 0, 4 << 20);
    std::fs::copy(&web, &db).unwrap();
    let mut a_web = agent(&env, &addr, "web01", &web);
    cut(&env, "web01");
    let mut a_db = agent(&env, &addr, "db01", &db);
    cut(&env, "db01");
    assert_eq!(points_of(&env, "web01").len(), 1);
    assert_eq!(points_of(&env, "db01").len(), 1);

    // Not failed over: refused, nothing changes.
    let o = cmd(&env, &["complete-migration", "--vm", "web01"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("has not been failed over") && e.contains("--force"),
        "{e}"
    );
    assert!(env.store().join("manifests/web01.json").exists());
    // No final point without a cutover: refused, with what to do instead.
    let o = cmd(&env, &["failover", "--vm", "web01", "--point", "final"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("ferry-agent cutover"));

    // The failover: the VM's permanent disks, exactly the point, while the agent still runs.
    let to = env.path("vms");
    std::fs::create_dir(&to).unwrap();
    let o = cmd(
        &env,
        &[
            "failover",
            "--vm",
            "web01",
            "--to",
            to.to_str().unwrap(),
            "--json",
            "--verify",
        ],
    );
    ok(&o, "failover");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["kind"], "failover", "{r:#}");
    assert_eq!(r["state"], "ready", "{r:#}");
    assert_eq!(r["dir"], to.join("web01").to_str().unwrap(), "{r:#}");
    let vhd = PathBuf::from(r["disks"][0]["path"].as_str().unwrap());
    let point_b3 = r["disks"][0]["blake3"].as_str().unwrap().to_owned();
    assert_eq!(payload_b3(&vhd), point_b3);
    let point = points_of(&env, "web01")
        .into_iter()
        .find(|p| p["id"] == r["point"])
        .expect("the failover's point is listed");
    assert_eq!(point["disks"][0]["blake3"], point_b3.as_str());
    // A second failover of the VM is refused.
    let o = cmd(
        &env,
        &["failover", "--vm", "web01", "--to", to.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("failed over already"));
    // The server no longer expects the agent: no protection alarm for web01.
    wait_for("web01 shown failed over", Duration::from_secs(20), || {
        vm_status(&env, "web01").is_some_and(|v| v["protection"] == "failed over")
    });

    // A test failover open on db01 stops even a forced completion.
    let tf = env.path("tf");
    std::fs::create_dir(&tf).unwrap();
    ok(
        &cmd(
            &env,
            &[
                "failover",
                "--test",
                "--vm",
                "db01",
                "--to",
                tf.to_str().unwrap(),
            ],
        ),
        "test failover of db01",
    );
    let o = cmd(&env, &["complete-migration", "--vm", "db01", "--force"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("clean it up first"));
    ok(
        &cmd(&env, &["failover", "--test", "--cleanup", "--vm", "db01"]),
        "cleanup",
    );

    // Complete the migration while the server holds the store.
    let before = listing(&env.store());
    eprintln!("store before:\n  {}", before.join("\n  "));
    let has = |l: &[String], p: &str| l.iter().any(|x| x == p);
    assert!(has(&before, "manifests/web01.json") && has(&before, "replicas/web01"));
    // The failover's hold went once its disks were written (retention goes on).
    assert!(
        !before.iter().any(|p| p.starts_with("pins/web01.")),
        "{before:?}"
    );
    let o = cmd(&env, &["complete-migration", "--vm", "web01", "--json"]);
    ok(&o, "complete-migration");
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c["state"], "retired", "{c:#}");
    assert!(c["removed"]["points"].as_u64().unwrap() >= 1, "{c:#}");
    assert_eq!(c["removed"]["holds"], 0, "{c:#}");
    assert!(
        c["removed"]["segments_kept"].as_u64().unwrap() >= 1,
        "db01's deduplicated chunks live in web01's segments: {c:#}"
    );
    let after = listing(&env.store());
    eprintln!("store after:\n  {}", after.join("\n  "));
    for p in &after {
        assert!(
            !(p.starts_with("manifests/web01")
                || p.starts_with("replicas/web01")
                || p.starts_with("pins/web01")
                || p.starts_with("disk-ids/web01")),
            "{p} is left of web01"
        );
    }
    assert!(has(&after, "journal/web01"), "kept segments");
    assert!(has(&after, "manifests/db01.json") && has(&after, "lifecycle/web01.json"));
    // The failed-over disk stays, unchanged.
    assert_eq!(payload_b3(&vhd), point_b3);
    // The agent is refused for good and exits, saying why.
    wait_for("web01's agent to exit", Duration::from_secs(30), || {
        a_web.exited().is_some()
    });
    // Status 3: the shipped unit does not restart it (RestartPreventExitStatus=2 3).
    assert_eq!(a_web.exited().and_then(|s| s.code()), Some(3));
    assert!(
        a_web.log_text().contains("complete-migration"),
        "{}",
        a_web.log_text()
    );
    // The server shows it no more; the event log has it.
    wait_for(
        "web01 gone from the status",
        Duration::from_secs(20),
        || vm_status(&env, "web01").is_none(),
    );
    let ev = ferry()
        .args(["events", "--vm", "web01", "--state-dir"])
        .arg(env.path("ps-state"))
        .output()
        .unwrap();
    let ev = String::from_utf8_lossy(&ev.stdout);
    assert!(
        ev.contains("failover failover-") && ev.contains("migration completed"),
        "{ev}"
    );
    // Idempotent.
    let o = cmd(&env, &["complete-migration", "--vm", "web01"]);
    ok(&o, "complete-migration again");
    assert!(String::from_utf8_lossy(&o.stdout).contains("was completed already"));

    // db01 replicates on, and its newest point restores exactly (its chunks in web01's kept
    // segments included).
    let n = points_of(&env, "db01").len();
    crate::common::write_random(&db, &mut crate::common::Rng(12), 8 << 20, 1 << 20);
    cut(&env, "db01");
    assert_eq!(points_of(&env, "db01").len(), n + 1);
    let out = env.path("db01-restored.img");
    let o = env.restore("latest", &out, &["--vm", "db01", "--verify"]);
    ok(&o, "restore db01");

    // A restarted server and a restarted agent: still ended.
    srv.term();
    a_db.term();
    let (mut srv, addr) = serve();
    let mut again = agent(&env, &addr, "web01", &web);
    wait_for(
        "the restarted web01 agent to exit",
        Duration::from_secs(30),
        || again.exited().is_some(),
    );
    assert_eq!(again.exited().and_then(|s| s.code()), Some(3));
    assert!(again.log_text().contains("complete-migration"));
    assert!(!env.store().join("manifests/web01.json").exists());
    // `ferry replicate` refuses the name too.
    let o = env.replicate(&[&web], &["--vm", "web01"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("migration was completed"));

    // No server: the command does the work itself (forced: db01 was never failed over).
    srv.term();
    let o = cmd(
        &env,
        &["complete-migration", "--vm", "db01", "--force", "--json"],
    );
    ok(&o, "complete-migration --force with no server");
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c["state"], "retired", "{c:#}");
    assert_eq!(c["forced"], true, "{c:#}");
    let last = listing(&env.store());
    eprintln!("store at the end:\n  {}", last.join("\n  "));
    // Both ended: no VM's journal, manifest or replica is left.
    for p in &last {
        assert!(
            !(p.starts_with("journal/")
                || p.starts_with("manifests/")
                || p.starts_with("replicas/")),
            "{p} is left"
        );
    }
    let l = ferry()
        .args(["failover", "list", "--store"])
        .arg(env.store())
        .output()
        .unwrap();
    let l = String::from_utf8_lossy(&l.stdout);
    assert!(
        l.contains("VM web01: retired") && l.contains("VM db01: retired"),
        "{l}"
    );
}

/// `ferry failover --vm VM --shutdown-source`: the appliance asks the source's agent, through the
/// running server, to cut over (hooks with `cutover`, final point), then fails over to that final
/// point; an agent that does not allow it refuses, and nothing is failed over. Costs ~4 s.
#[test]
fn shutdown_source_cuts_the_source_over_through_the_server_then_fails_over_to_its_final_point() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    std::fs::create_dir_all(env.path("ps-state")).unwrap();
    let hooks = env.path("hooks.d");
    std::fs::create_dir(&hooks).unwrap();
    std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = env.path("hooks.log");
    let hook = hooks.join("10-app");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1 $FERRY_VM\" >> {}\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mut srv, addr) = spawn_serve(
        crate::common::serve_cmd(&env, "512MiB"),
        Some("127.0.0.1:0"),
        &env.path("serve.log"),
    );
    crate::common::register_agent(&env, &addr, "agent-web01");
    crate::common::register_agent(&env, &addr, "agent-db01");
    let (web, db) = (env.path("web01.img"), env.path("db01.img"));
    for (p, seed) in [(&web, 31), (&db, 32)] {
        std::fs::File::create(p).unwrap().set_len(8 << 20).unwrap();
        crate::common::write_random(p, &mut crate::common::Rng(seed), 0, 2 << 20);
    }
    let mut a_web = agent_with(&env, &addr, "web01", &web, &["--allow-remote-cutover"]);
    let mut a_db = agent(&env, &addr, "db01", &db);
    cut(&env, "web01");
    cut(&env, "db01");
    let to = env.path("vms");
    std::fs::create_dir(&to).unwrap();

    // db01's agent does not allow it: refused, nothing failed over, the source untouched.
    let o = cmd(
        &env,
        &[
            "failover",
            "--vm",
            "db01",
            "--shutdown-source",
            "--shutdown-wait",
            "30s",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    // Refused by the server itself: the agent never said it allows it.
    assert!(
        e.contains("the VM's agent does not allow")
            && e.contains("allow_remote_cutover")
            && e.contains("nothing was failed over"),
        "{e}"
    );
    assert!(!to.join("db01").exists());
    assert!(!env.path("agent-db01/cutover.json").exists());

    // web01's does: the source cuts over, then the failover takes its final point.
    let o = cmd(
        &env,
        &[
            "failover",
            "--vm",
            "web01",
            "--shutdown-source",
            "--shutdown-wait",
            "60s",
            "--json",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    ok(&o, "failover --shutdown-source");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let st: serde_json::Value = {
        let o = Command::new(agent_bin())
            .args(["status", "--state-dir"])
            .arg(env.path("agent-web01"))
            .output()
            .unwrap();
        ok(&o, "agent status");
        serde_json::from_slice(&o.stdout).unwrap()
    };
    assert_eq!(st["cutover"]["final_point"], r["point"], "{st:#} {r:#}");
    assert_eq!(r["point_kind"], "app", "{r:#}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "cutover web01\n");
    let vhd = PathBuf::from(r["disks"][0]["path"].as_str().unwrap());
    assert_eq!(payload_b3(&vhd), r["disks"][0]["blake3"].as_str().unwrap());
    // The server's record names the same final point.
    let life: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.store().join("lifecycle/web01.json")).unwrap())
            .unwrap();
    assert_eq!(life["final_point"], r["point"], "{life:#}");
    assert_eq!(life["state"], "failed-over", "{life:#}");
    a_web.term();
    a_db.term();
    srv.term();
}
