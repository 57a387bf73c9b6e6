//! `ferry failback` against the real binary: a VM replicated into a local store is failed over
//! (a fixed VHD), the failed-over disk then diverges by 5 % (and the on-premises disk a little
//! too, as after an unplanned failover); failback brings the on-premises disk to the failed-over
//! state byte for byte, moving at most 1.1× the changed bytes (the figure is printed), a dry run
//! writes nothing, and protecting the disk again stores only what the store lacks. Costs ~3 s.

use std::path::Path;

use crate::common::{b3, ferry, ok, write_random, Env, Rng};

const SIZE: u64 = 64 << 20;
const CHUNK: u64 = 64 << 10;

fn failback(env: &Env, args: &[&str]) -> std::process::Output {
    ferry()
        .args(["failback", "--vm", "web01"])
        .args(args)
        .arg("--state-dir")
        .arg(env.path("no-server"))
        .output()
        .unwrap()
}

/// Writes random bytes over `chunks` chunks from chunk `first` of the disk payload at `p`.
fn scribble(p: &Path, rng: &mut Rng, first: u64, chunks: u64) -> u64 {
    write_random(p, rng, first * CHUNK, (chunks * CHUNK) as usize);
    chunks * CHUNK
}

#[test]
fn failback_moves_only_what_diverged_and_leaves_the_disk_identical() {
    let env = Env::new();
    let disk = env.path("web01.img");
    std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
    let mut rng = Rng(21);
    write_random(&disk, &mut rng, 0, 24 << 20);
    write_random(&disk, &mut rng, 40 << 20, 8 << 20);
    env.replicate_ok(&[&disk], &["--vm", "web01", "--disk", "os"]);
    let to = env.path("azure-side");
    std::fs::create_dir(&to).unwrap();
    let o = ferry()
        .args(["failover", "--vm", "web01", "--json", "--to"])
        .arg(&to)
        .arg("--store")
        .arg(env.store())
        .arg("--key-file")
        .arg(env.key())
        .arg("--state-dir")
        .arg(env.path("no-server"))
        .output()
        .unwrap();
    ok(&o, "failover");
    let vhd = to.join("web01/web01-os.vhd");
    assert!(vhd.exists());

    // The failed-over VM runs and writes 5 % of its disk (in runs of chunks, some in what was
    // all zeros); the on-premises disk had written 1 % after the point, elsewhere.
    let chunks = SIZE / CHUNK;
    let mut changed = 0;
    for (first, n) in [(10, 20), (300, 12), (700, 10), (1000, 9)] {
        changed += scribble(&vhd, &mut rng, first, n);
    }
    assert_eq!(
        changed,
        chunks * 5 / 100 * CHUNK,
        "5 % of the disk: 51 of 1024 chunks"
    );
    changed += scribble(&disk, &mut rng, 500, 10);
    let before = b3(&disk);

    // A dry run says what would move and writes nothing.
    let o = failback(
        &env,
        &[
            "--from",
            vhd.to_str().unwrap(),
            "--to",
            disk.to_str().unwrap(),
            "--dry-run",
            "--json",
        ],
    );
    ok(&o, "failback --dry-run");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["bytes_moved"], changed, "{r:#}");
    assert_eq!(b3(&disk), before, "a dry run wrote");

    let o = failback(
        &env,
        &[
            "--from",
            vhd.to_str().unwrap(),
            "--to",
            disk.to_str().unwrap(),
            "--verify",
            "--json",
        ],
    );
    ok(&o, "failback");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let moved = r["bytes_moved"].as_u64().unwrap();
    eprintln!(
        "MEASURE failback: moved {moved} bytes of a {SIZE}-byte disk ({:.2} %); changed bytes {changed}; ratio {:.3}",
        100.0 * moved as f64 / SIZE as f64,
        moved as f64 / changed as f64
    );
    assert!(moved as f64 <= 1.1 * changed as f64, "{r:#}");
    assert_eq!(r["disks"][0]["format"], "vhd");
    assert!(r["disks"][0]["blake3"].is_string(), "{r:#}");
    // Byte for byte the failed-over disk's payload.
    let v = std::fs::read(&vhd).unwrap();
    let d = std::fs::read(&disk).unwrap();
    assert_eq!(d.len() as u64, SIZE);
    assert!(
        v[..SIZE as usize] == d[..],
        "the disk differs from the failed-over disk"
    );
    // Again: nothing differs, nothing moves.
    let o = failback(
        &env,
        &[
            "--from",
            vhd.to_str().unwrap(),
            "--to",
            disk.to_str().unwrap(),
            "--json",
        ],
    );
    ok(&o, "failback again");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["bytes_moved"], 0, "{r:#}");

    // Protected again: the store receives the failed-over VM's new data only, not a full copy.
    let run = env.replicate_ok(&[&disk], &["--vm", "web01", "--disk", "os"]);
    let unique = run["stored"]["unique_bytes"].as_u64().unwrap();
    assert!(
        unique <= changed && unique > 0,
        "protecting it again stored {unique} new bytes; {changed} changed: {run:#}"
    );

    // A new disk (a file that does not exist) is created at the disk's size.
    let fresh = env.path("new-disk.img");
    let o = failback(
        &env,
        &[
            "--from",
            vhd.to_str().unwrap(),
            "--to",
            fresh.to_str().unwrap(),
            "--verify",
        ],
    );
    ok(&o, "failback to a new disk");
    assert_eq!(std::fs::read(&fresh).unwrap(), d);

    // Mistakes: a disk too small, pairs that do not match, a .vhd that is not one.
    let small = env.path("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(SIZE / 2)
        .unwrap();
    let fake = env.path("fake.vhd");
    std::fs::write(&fake, vec![1u8; 4096]).unwrap();
    let (v, sm, fk) = (
        vhd.to_str().unwrap(),
        small.to_str().unwrap(),
        fake.to_str().unwrap(),
    );
    for (args, want) in [
        (&["--from", v, "--to", sm][..], "at least as large"),
        (
            &["--from", v, "--from", v, "--to", sm][..],
            "one --to per --from",
        ),
        (&["--from", fk, "--to", sm][..], "no VHD footer"),
    ] {
        let o = failback(&env, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    }
}
