//! kill -9 of `ferry replicate` at random moments: nothing acknowledged is lost, the store stays
//! consistent, and every listed point restores exactly.

mod common;

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

use common::*;

const CHUNK: u64 = 65536;

#[test]
fn kill_9_at_random_moments_then_rerun_every_point_exact() {
    let iterations: u64 = std::env::var("FERRY_KILL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let env = Env::new();
    let disk = env.path("crashy.img");
    let size: u64 = 40 << 20;
    let mut rng = Rng(0x5eed_f00d ^ iterations);
    fs::File::create(&disk).unwrap().set_len(size).unwrap();
    write_random(&disk, &mut rng, 0, (size / 2) as usize);
    let mut versions: HashMap<String, std::path::PathBuf> = HashMap::new();
    // How long a run takes, to aim kills inside runs: adjusted whenever one ends before its kill.
    let mut max_ms = 400;
    let mut killed_mid_run = 0;
    // Points of runs that exited 0: each must still be listed at the end.
    let mut acked: Vec<String> = Vec::new();
    for i in 0..iterations {
        if i > 0 {
            // Change 2-10% of the chunks: random data, some zero ranges.
            let chunks = size / CHUNK;
            for _ in 0..rng.below(chunks / 10).max(chunks / 50) {
                let c = rng.below(chunks);
                if rng.below(5) == 0 {
                    write_zeros(&disk, c * CHUNK, CHUNK as usize);
                } else {
                    let at = c * CHUNK + rng.below(CHUNK - 4096);
                    write_random(&disk, &mut rng, at, 4096);
                }
            }
        }
        let copy = env.path(&format!("v{i}.img"));
        fs::copy(&disk, &copy).unwrap();
        versions.insert(b3(&copy), copy);
        let mut c = ferry();
        c.arg("replicate").arg(&disk).arg("--once");
        c.arg("--store").arg(env.store());
        c.arg("--key-file").arg(env.key());
        c.arg("--cache-dir").arg(env.path("cache"));
        c.arg("--cache-size").arg("16MiB").arg("--json");
        c.stdout(std::process::Stdio::piped());
        let t0 = Instant::now();
        let mut child = c.spawn().unwrap();
        let wait = Duration::from_millis(rng.below(max_ms));
        // Until the kill, or until the run ends by itself: then later kills aim within the time
        // a run takes now (incremental runs are much shorter than the first).
        let mut ended_in = None;
        while t0.elapsed() < wait {
            if child.try_wait().unwrap().is_some() {
                ended_in = Some(t0.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let finished = child.try_wait().unwrap().is_some();
        child.kill().ok(); // SIGKILL
        let o = child.wait_with_output().unwrap();
        let status = o.status;
        if status.success() {
            let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            acked.push(j["point"]["id"].as_str().unwrap().to_owned());
        }
        if !finished && !status.success() {
            killed_mid_run += 1;
        }
        if let Some(d) = ended_in {
            max_ms = (d.as_millis() as u64).max(20);
        }
        // Sometimes let a whole run finish between kills.
        if rng.below(4) == 0 {
            let j = env.replicate_ok(&[&disk], &["--cache-size", "16MiB"]);
            acked.push(j["point"]["id"].as_str().unwrap().to_owned());
        }
    }
    // A clean run after the last kill finishes whatever was left.
    let last = env.replicate_ok(&[&disk], &["--cache-size", "16MiB"]);
    let pts = env.points();
    eprintln!(
        "{iterations} iterations, {killed_mid_run} killed mid-run, {} points",
        pts.len()
    );
    assert!(
        killed_mid_run >= iterations / 4,
        "kills should land inside runs"
    );
    assert_eq!(pts.last().unwrap()["id"], last["point"]["id"]);
    let listed: Vec<&str> = pts.iter().map(|p| p["id"].as_str().unwrap()).collect();
    for id in &acked {
        assert!(
            listed.contains(&id.as_str()),
            "point {id} of a run that exited 0 is gone: {listed:?}"
        );
    }
    let out = env.path("restored.img");
    for p in &pts {
        let id = p["id"].as_str().unwrap();
        let digest = p["disks"][0]["blake3"].as_str().unwrap();
        let copy = versions
            .get(digest)
            .unwrap_or_else(|| panic!("point {id} holds a state the disk never had"));
        let o = env.restore(id, &out, &["--verify"]);
        assert!(
            o.status.success(),
            "restore {id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(same_bytes(&out, copy), "point {id} is not byte-identical");
    }
}
