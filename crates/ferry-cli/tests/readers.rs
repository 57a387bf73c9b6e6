//! Readers beside the writer: restores run while a continuous `ferry replicate` keeps writing the
//! same local store (no waiting on its lock), stay exact while retention prunes behind them, and a
//! pinned point is never pruned.

mod common;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `c` to completion, failing the test if it takes longer than `limit` (a reader that waits
/// on the writer would hang here).
fn run_within(mut c: Command, limit: Duration) -> std::process::Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?} (waiting on the writer?): {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Writer(Child);
impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn restores_run_and_stay_exact_while_replicate_writes_and_prunes() {
    let env = Env::new();
    let disk = env.path("busy.img");
    // 80 MiB: 1280 pages, more than one 1024-page restore window, so undo deltas that appear
    // between windows are picked up mid-restore.
    fs::File::create(&disk).unwrap().set_len(80 << 20).unwrap();
    let mut rng = Rng(41);
    write_random(&disk, &mut rng, 0, 80 << 20);
    let mut c = ferry();
    c.arg("replicate").arg(&disk);
    c.args(["--interval", "1s", "--retention", "3s"]);
    c.arg("--store").arg(env.store());
    c.arg("--key-file").arg(env.key());
    c.arg("--cache-dir").arg(env.path("cache"));
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut writer = Writer(c.spawn().unwrap());
    let t0 = Instant::now();
    while !env.store().join("manifests").exists() || env.points().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no first point");
        assert!(writer.0.try_wait().unwrap().is_none(), "replicate exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = env.path("r.img");
    let (mut verified, mut pruned_meanwhile) = (0, 0);
    let mut first_seen = String::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(14) {
        // Keep the writer busy: every cut has changes, so every point adds undo deltas.
        for _ in 0..8 {
            let off = rng.below(79) << 20;
            write_random(&disk, &mut rng, off, 1 << 20);
        }
        let pts = env.points();
        let oldest = pts.first().unwrap()["id"].as_str().unwrap().to_owned();
        if first_seen.is_empty() {
            first_seen = oldest.clone();
        }
        // The oldest listed point: the one retention is about to prune.
        let mut c = ferry();
        c.args([
            "restore",
            "--point",
            &oldest,
            "--threads",
            "1",
            "--verify",
            "--force",
        ]);
        c.arg("--store").arg(env.store());
        c.arg("--key-file").arg(env.key());
        c.arg("--out").arg(&out);
        let o = run_within(c, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            verified += 1;
        } else {
            // Pruned between `points list` and the restore's pin: said clearly, nothing restored.
            assert!(
                err.contains("was just pruned") || err.contains("no point"),
                "{err}"
            );
            pruned_meanwhile += 1;
        }
        // `points list` never waits either.
        let mut c = ferry();
        c.args(["points", "list", "--json"])
            .arg("--store")
            .arg(env.store());
        assert!(run_within(c, Duration::from_secs(10)).status.success());
        assert!(writer.0.try_wait().unwrap().is_none(), "replicate exited");
    }
    let last = env.points();
    eprintln!(
        "readers: {verified} verified restores, {pruned_meanwhile} pruned before pinning; oldest point {first_seen} -> {}",
        last.first().unwrap()["id"]
    );
    assert!(verified >= 3, "only {verified} restores verified");
    // The writer kept committing and pruning meanwhile: it never waited on the readers.
    assert_ne!(
        last.first().unwrap()["id"].as_str().unwrap(),
        first_seen,
        "retention pruned nothing while the readers ran"
    );
}

#[test]
fn a_pinned_point_is_kept_and_a_dead_readers_pin_is_not() {
    let env = Env::new();
    let disk = env.path("pin.img");
    fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let mut rng = Rng(43);
    let mut digests = Vec::new();
    for _ in 0..3 {
        write_random(&disk, &mut rng, 0, 4 << 20);
        digests.push(b3(&disk));
        env.replicate_ok(&[&disk], &[]);
    }
    let pts = env.points();
    assert_eq!(pts.len(), 3);
    let seq1 = pts[0]["id"].as_str().unwrap().split('-').next().unwrap();
    let seq1: u64 = seq1.parse().unwrap();
    // This test process is the live reader holding the pin.
    let pin = ferry_store::readers::pin_point(&env.store(), "pin", seq1).unwrap();
    // Pinned two hours ago (a stuck reader): still honoured, and reported with who holds it.
    let pin_file = fs::read_dir(env.store().join("pins"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let st = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(&pin_file)
        .status()
        .unwrap();
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(1100));
    let o = env.replicate(&[&disk], &["--retention", "1s", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["pruned"]["points"].as_array().unwrap().len(), 0, "{j}");
    let err = ferry_testkit::proc::strip_ansi(&String::from_utf8_lossy(&o.stderr));
    assert!(
        err.contains(&format!(
            "point {seq1} of a VM has been pinned by a live reader (pid {}) for over 2 h",
            std::process::id()
        )) && err.contains("vm=\"pin\""),
        "an old pin is reported: {err}"
    );
    assert_eq!(env.points().len(), 4);
    let out = env.path("r.img");
    let o = env.restore(pts[0]["id"].as_str().unwrap(), &out, &["--verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(b3(&out), digests[0]);
    drop(pin);
    // A dead reader's pin (nobody holds its lock), even naming a live pid (ours), must not count.
    let dead = env
        .store()
        .join(format!("pins/pin.1.{}.dead.pin", std::process::id()));
    fs::write(
        &dead,
        format!(
            r#"{{"vm":"pin","seq":1,"pid":{},"command":"gone"}}"#,
            std::process::id()
        ),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let j = env.replicate_ok(&[&disk], &["--retention", "1s"]);
    assert_eq!(j["pruned"]["points"].as_array().unwrap().len(), 4, "{j}");
    assert!(!dead.exists(), "the dead reader's pin was not removed");
}

#[test]
fn a_second_writer_says_who_holds_the_store() {
    let env = Env::new();
    let disk = env.path("w.img");
    fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
    write_random(&disk, &mut Rng(47), 0, 1 << 20);
    let mut c = ferry();
    c.arg("replicate").arg(&disk).args(["--interval", "1s"]);
    c.arg("--store").arg(env.store());
    c.arg("--key-file").arg(env.key());
    c.arg("--cache-dir").arg(env.path("cache"));
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let writer = Writer(c.spawn().unwrap());
    let t0 = Instant::now();
    while !env.store().join("manifests").exists() || env.points().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no first point");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = ferry();
    c.env("FERRY_LOG", "info");
    c.arg("replicate").arg(&disk).arg("--once");
    c.arg("--store").arg(env.store());
    c.arg("--key-file").arg(env.key());
    c.arg("--cache-dir").arg(env.path("cache2"));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut second = c.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let _ = second.kill();
    let o = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let pid = writer.0.id().to_string();
    assert!(
        err.contains(&format!("pid {pid}")) && err.contains("replicate") && err.contains("waiting"),
        "the waiting writer must name the holder (pid {pid}): {err}"
    );
}
