//! Recovery plans against the real binary: a two-group plan (the database, then two web VMs)
//! fails over in order, scripts before and after a group see what was made so far, `--test
//! --cleanup` removes every test failover of the plan, a failing script stops the plan before
//! the next group, a script others may write is refused, and the real plan fails every VM over.
//! Costs ~3 s.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::{ferry, ok, write_random, Env, Rng};

fn plan_cmd(env: &Env, args: &[&str]) -> std::process::Output {
    ferry()
        .args(["failover", "--plans-dir"])
        .arg(env.path("plans"))
        .args(args)
        .arg("--store")
        .arg(env.store())
        .arg("--key-file")
        .arg(env.key())
        .arg("--state-dir")
        .arg(env.path("no-server"))
        .output()
        .unwrap()
}

fn script(p: &Path, body: &str, mode: u32) {
    std::fs::write(p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn failovers(env: &Env) -> Vec<serde_json::Value> {
    let o = ferry()
        .args(["failover", "list", "--json", "--store"])
        .arg(env.store())
        .output()
        .unwrap();
    ok(&o, "failover list");
    serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).unwrap()
}

#[test]
fn a_two_group_plan_fails_over_in_order_with_its_scripts_test_and_cleanup_included() {
    let env = Env::new();
    let mut rng = Rng(3);
    for vm in ["db01", "web01", "web02"] {
        let d = env.path(&format!("{vm}.img"));
        std::fs::File::create(&d).unwrap().set_len(4 << 20).unwrap();
        write_random(&d, &mut rng, 0, 1 << 20);
        env.replicate_ok(&[&d], &["--vm", vm, "--disk", "os"]);
    }
    let plans = env.path("plans");
    std::fs::create_dir(&plans).unwrap();
    let log = env.path("scripts.log");
    let (post_db, pre_web) = (plans.join("db-up.sh"), plans.join("web-pre.sh"));
    // The database's check sees db01 made; the web tier's pre script runs after it.
    script(
        &post_db,
        &format!(
            "echo \"post $FERRY_GROUP $FERRY_PLAN_MODE $FERRY_VMS\" >> {l}\ngrep -q '\"vm\": \"db01\"' \"$FERRY_PLAN_RESULT\" || exit 9\n[ ! -e {fail} ]",
            l = log.display(),
            fail = env.path("fail-db").display()
        ),
        0o755,
    );
    script(
        &pre_web,
        &format!(
            "echo noise; echo \"pre $FERRY_GROUP $FERRY_PLAN_MODE $FERRY_VMS\" >> {}",
            log.display()
        ),
        0o755,
    );
    std::fs::write(
        plans.join("shop.toml"),
        format!(
            "description = \"the shop: database first\"\n[[group]]\nname = \"database\"\nvms = [\"db01\"]\npost = \"{}\"\nwait = \"1s\"\n\n[[group]]\nname = \"web\"\nvms = [\"web01\", \"web02\"]\npre = \"{}\"\n",
            post_db.display(),
            pre_web.display()
        ),
    )
    .unwrap();
    let to = env.path("tf");
    std::fs::create_dir(&to).unwrap();

    // The test plan.
    let o = plan_cmd(
        &env,
        &[
            "--plan",
            "shop",
            "--test",
            "--json",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    ok(&o, "plan --test");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["ok"], true, "{r:#}");
    let order: Vec<&str> = r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["db01", "web01", "web02"]);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "post database test db01\npre web test web01 web02\n"
    );
    let made = failovers(&env);
    assert_eq!(made.len(), 3);
    let created: Vec<&str> = made
        .iter()
        .map(|f| f["created"].as_str().unwrap())
        .collect();
    assert!(
        created[1] > created[0],
        "the web tier after the database and its 1 s wait: {created:?}"
    );
    for f in &made {
        assert_eq!(f["kind"], "test");
        assert!(Path::new(f["disks"][0]["path"].as_str().unwrap()).exists());
    }

    // Its cleanup removes all three.
    let o = plan_cmd(&env, &["--plan", "shop", "--test", "--cleanup"]);
    ok(&o, "plan --test --cleanup");
    for f in failovers(&env) {
        assert_eq!(f["state"], "cleaned", "{f:#}");
        assert!(!Path::new(f["disks"][0]["path"].as_str().unwrap()).exists());
    }
    assert_eq!(
        std::fs::read_dir(&to).unwrap().count(),
        0,
        "left behind in {}",
        to.display()
    );

    // A failing check stops the plan before the web tier.
    std::fs::write(env.path("fail-db"), b"").unwrap();
    let o = plan_cmd(
        &env,
        &["--plan", "shop", "--test", "--to", to.to_str().unwrap()],
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("db-up.sh") && e.contains("plan stops"), "{e}");
    let open: Vec<String> = failovers(&env)
        .into_iter()
        .filter(|f| f["state"] == "ready")
        .map(|f| f["vm"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(open, ["db01"]);
    ok(
        &plan_cmd(&env, &["--plan", "shop", "--test", "--cleanup"]),
        "cleanup after a stop",
    );
    std::fs::remove_file(env.path("fail-db")).unwrap();

    // A script others may write is not run.
    std::fs::set_permissions(&pre_web, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = plan_cmd(
        &env,
        &["--plan", "shop", "--test", "--to", to.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("writable by no one else"));
    ok(
        &plan_cmd(&env, &["--plan", "shop", "--test", "--cleanup"]),
        "cleanup",
    );
    std::fs::set_permissions(&pre_web, std::fs::Permissions::from_mode(0o755)).unwrap();

    // Mistakes in the plan file get a clear error.
    std::fs::write(
        plans.join("bad.toml"),
        "[[group]]\nname = \"a\"\nvms = []\n",
    )
    .unwrap();
    let o = plan_cmd(&env, &["--plan", "bad", "--test"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no VMs"));
    let o = plan_cmd(&env, &["--plan", "nope", "--test"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.toml"));

    // The real plan: every VM failed over, in order, each its permanent disks.
    let real = env.path("vms");
    std::fs::create_dir(&real).unwrap();
    let o = plan_cmd(
        &env,
        &["--plan", "shop", "--json", "--to", real.to_str().unwrap()],
    );
    ok(&o, "plan (real)");
    for vm in ["db01", "web01", "web02"] {
        assert!(real.join(vm).join(format!("{vm}-os.vhd")).exists());
        assert!(env.store().join(format!("lifecycle/{vm}.json")).exists());
    }
}
