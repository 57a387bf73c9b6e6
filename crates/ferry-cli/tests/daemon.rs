//! Continuous replication (no --once) and bounded memory.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn continuous_mode_cuts_points_on_interval_and_stops_cleanly_on_sigterm() {
    let env = Env::new();
    let disk = env.path("svc.img");
    fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let mut rng = Rng(17);
    write_random(&disk, &mut rng, 0, 1 << 20);
    let v1 = b3(&disk);
    let mut c = ferry();
    c.arg("replicate").arg(&disk).args(["--interval", "1s"]);
    c.arg("--store").arg(env.store());
    c.arg("--key-file").arg(env.key());
    c.arg("--cache-dir").arg(env.path("cache"));
    let mut child = c.spawn().unwrap();
    let wait_for = |pred: &dyn Fn(&[serde_json::Value]) -> bool| {
        let t0 = Instant::now();
        loop {
            if env.store().join("manifests").exists() {
                let p = env.points();
                if pred(&p) {
                    return p;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no point in time");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(&|p| p.iter().any(|x| x["disks"][0]["blake3"] == v1.as_str()));
    write_random(&disk, &mut rng, 3 << 20, 1 << 20);
    let v2 = b3(&disk);
    let pts = wait_for(&|p| p.iter().any(|x| x["disks"][0]["blake3"] == v2.as_str()));
    assert!(pts.len() >= 2);
    // SAFETY: kill with a valid pid and signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let out = env.path("r.img");
    let latest = env.points().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let o = env.restore(&latest, &out, &["--verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Peak RSS (KiB) of a `ferry replicate --once` run on `disk`.
// The child is reaped by wait4 (for its rusage), not by Child::wait.
#[allow(clippy::zombie_processes)]
fn peak_rss_kib(env: &Env, disk: &std::path::Path) -> i64 {
    let mut c = ferry();
    c.arg("replicate").arg(disk).arg("--once");
    c.arg("--store").arg(env.store());
    c.arg("--key-file").arg(env.key());
    c.arg("--cache-dir").arg(env.path("cache"));
    let child = c.spawn().unwrap();
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter; wait4 on our own child pid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(r, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "replicate failed"
    );
    ru.ru_maxrss
}

#[test]
fn memory_does_not_grow_with_disk_size() {
    let env = Env::new();
    let mut rng = Rng(23);
    let small = env.path("small.img");
    let big = env.path("big.img");
    fs::File::create(&small).unwrap().set_len(1 << 30).unwrap();
    fs::File::create(&big).unwrap().set_len(16 << 30).unwrap();
    // The same 64 MiB of data, spread over each disk.
    for i in 0..64u64 {
        write_random(&small, &mut rng, i * (16 << 20), 1 << 20);
        write_random(&big, &mut rng, i * (256 << 20), 1 << 20);
    }
    let s = peak_rss_kib(&env, &small);
    let b = peak_rss_kib(&env, &big);
    eprintln!("peak RSS: 1 GiB disk {s} KiB, 16 GiB disk {b} KiB");
    // The pipeline's buffers (read blocks, one open segment per disk, up to two sealed batches in
    // flight to the committer) vary with timing, not with the disk: allow that much slack, and hold
    // both runs to an absolute budget.
    assert!(
        (b as f64) < (s as f64) * 1.5 + 64.0 * 1024.0,
        "16x the disk must not need more memory: {s} KiB vs {b} KiB"
    );
    assert!(
        b < 320 * 1024,
        "peak RSS {b} KiB is over the 320 MiB budget"
    );
}
