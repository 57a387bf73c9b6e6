//! End-to-end tests of the spine on the real binary, real files and the real local store.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use proptest::prelude::*;

const CHUNK: u64 = 65536;

fn point_ids(env: &Env) -> Vec<String> {
    env.points()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every point restores byte-identical to the copy of the source saved when it was cut.
fn check_points(env: &Env, saved: &[(String, std::path::PathBuf)]) {
    for (id, copy) in saved {
        let out = env.path("check.img");
        let o = env.restore(id, &out, &["--verify"]);
        assert!(
            o.status.success(),
            "restore {id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            same_bytes(&out, copy),
            "point {id} differs from the source at its cut"
        );
        assert_eq!(
            fs::metadata(&out).unwrap().len(),
            fs::metadata(copy).unwrap().len(),
            "raw restore has the source's size"
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    Random { off: u64, len: u64 },
    Zero { off: u64, len: u64 },
    Hole { off: u64, len: u64 },
}

fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
    let op = (0..3u8, 0..size, 1..(size / 4).max(2)).prop_map(move |(k, off, len)| {
        let len = len.min(size - off).max(1);
        match k {
            0 => Op::Random { off, len },
            1 => Op::Zero { off, len },
            _ => Op::Hole { off, len },
        }
    });
    prop::collection::vec(op, 1..6)
}

fn case() -> impl Strategy<Value = (u64, Vec<Vec<Op>>, u64)> {
    // Sizes from one sector to 6 MiB, mostly not multiples of 64 KiB.
    (512u64..6 << 20).prop_flat_map(|size| {
        (
            Just(size),
            prop::collection::vec(ops(size), 1..4),
            any::<u64>(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, failure_persistence: None, .. ProptestConfig::default() })]
    #[test]
    fn every_point_restores_exactly((size, rounds, seed) in case()) {
        let env = Env::new();
        let mut rng = Rng(seed | 1);
        let disk = env.path("disk.img");
        fs::File::create(&disk).unwrap().set_len(size).unwrap();
        // Start from mixed content: some random, rest sparse zeros.
        write_random(&disk, &mut rng, 0, (size / 2) as usize);
        let mut saved = Vec::new();
        for (i, round) in std::iter::once(Vec::new()).chain(rounds).enumerate() {
            for op in round {
                match op {
                    Op::Random { off, len } => write_random(&disk, &mut rng, off, len as usize),
                    Op::Zero { off, len } => write_zeros(&disk, off, len as usize),
                    Op::Hole { off, len } => punch_hole(&disk, off, len),
                }
            }
            let copy = env.path(&format!("v{i}.img"));
            fs::copy(&disk, &copy).unwrap();
            let j = env.replicate_ok(&[&disk], &[]);
            let id = j["point"]["id"].as_str().unwrap().to_owned();
            prop_assert_eq!(j["point"]["disks"][0]["blake3"].as_str().unwrap(), b3(&copy));
            saved.push((id, copy));
        }
        prop_assert_eq!(point_ids(&env), saved.iter().map(|s| s.0.clone()).collect::<Vec<_>>());
        check_points(&env, &saved);
    }
}

#[test]
fn unchanged_disk_ships_nothing_and_changes_ship_only_their_chunks() {
    let env = Env::new();
    let disk = env.path("web01.img");
    let mut rng = Rng(7);
    fs::File::create(&disk).unwrap().set_len(32 << 20).unwrap();
    write_random(&disk, &mut rng, 0, 16 << 20);
    let first = env.replicate_ok(&[&disk], &[]);
    assert_eq!(first["vm"], "web01");
    assert_eq!(
        first["disks"][0]["changed_chunks"], 256,
        "16 MiB of data, zeros not shipped"
    );
    let again = env.replicate_ok(&[&disk], &[]);
    assert_eq!(again["disks"][0]["changed_chunks"], 0);
    assert_eq!(again["stored"]["unique_bytes"], 0);
    // One byte in chunk 3, and chunk 5 zeroed: two chunks, one of them a zero record.
    write_random(&disk, &mut rng, 3 * CHUNK + 17, 1);
    write_zeros(&disk, 5 * CHUNK, CHUNK as usize);
    let inc = env.replicate_ok(&[&disk], &[]);
    assert_eq!(inc["disks"][0]["changed_chunks"], 2);
    assert_eq!(inc["disks"][0]["zeroed_chunks"], 1);
    assert_eq!(inc["stored"]["unique_bytes"], CHUNK);
    assert_eq!(point_ids(&env).len(), 3);
}

#[test]
fn empty_source_is_refused_clearly() {
    let env = Env::new();
    let disk = env.path("empty.img");
    fs::write(&disk, b"").unwrap();
    let o = env.replicate(&[&disk], &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("is empty"), "{e}");
    assert!(!env.store().join("manifests").exists() || env.points().is_empty());
}

#[test]
fn several_disks_share_one_point_and_ambiguity_is_refused_with_choices() {
    let env = Env::new();
    let (a, b) = (env.path("os.img"), env.path("data.raw"));
    let mut rng = Rng(3);
    for (p, n) in [(&a, 3u64), (&b, 5)] {
        fs::File::create(p).unwrap().set_len(n << 20).unwrap();
        write_random(p, &mut rng, 0, (n << 20) as usize / 2);
    }
    let j = env.replicate_ok(&[&a, &b], &["--vm", "web01"]);
    assert_eq!(j["point"]["disks"].as_array().unwrap().len(), 2);
    // A second VM in the same store.
    let c = env.path("db.img");
    fs::File::create(&c).unwrap().set_len(1 << 20).unwrap();
    env.replicate_ok(&[&c], &[]);
    let out = env.path("x.img");
    let o = env.restore("latest", &out, &[]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--vm") && e.contains("web01") && e.contains("db"),
        "{e}"
    );
    let o = env.restore("latest", &out, &["--vm", "web01"]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--disk") && e.contains("os") && e.contains("data"),
        "{e}"
    );
    for (d, src) in [("os", &a), ("data", &b)] {
        let o = env.restore("latest", &out, &["--vm", "web01", "--disk", d, "--verify"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(same_bytes(&out, src));
    }
}

#[test]
fn vhd_restore_is_a_valid_fixed_vhd() {
    let env = Env::new();
    let disk = env.path("vm.img");
    let size = (3 << 20) + 4096 + 512; // not a multiple of 1 MiB
    fs::File::create(&disk).unwrap().set_len(size).unwrap();
    write_random(&disk, &mut Rng(11), 4096, 100_000);
    env.replicate_ok(&[&disk], &[]);
    let out = env.path("vm.vhd");
    let o = env.restore("latest", &out, &["--verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = fs::read(&out).unwrap();
    assert_eq!(
        b.len() as u64,
        (4 << 20) + 512,
        "rounded up to 1 MiB plus the footer"
    );
    let f = ferry_format::vhd::decode(&b[b.len() - 512..]).unwrap();
    assert_eq!(f.current_size, 4 << 20);
    assert_eq!(f.disk_type, 2);
    assert_eq!(&b[..size as usize], &fs::read(&disk).unwrap()[..]);
    assert!(b[size as usize..(4 << 20)].iter().all(|&x| x == 0));
    // An independent reader agrees (qemu-utils is a test prerequisite: scripts/test installs it).
    let o = std::process::Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json"])
        .arg(&out)
        .output()
        .expect("qemu-img not found: install qemu-utils (scripts/test does)");
    assert!(
        o.status.success(),
        "qemu-img rejects the VHD: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["virtual-size"].as_u64().unwrap(), 4 << 20, "{j}");
}

fn newest_segment(store: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = walk(store)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort_by_key(|p| fs::metadata(p).unwrap().modified().unwrap());
    segs.pop().unwrap()
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(p).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn corrupt_segment_and_wrong_key_fail_clearly_and_other_points_still_restore() {
    let env = Env::new();
    let disk = env.path("app.img");
    let mut rng = Rng(5);
    fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    write_random(&disk, &mut rng, 0, 4 << 20);
    let v1 = env.path("v1.img");
    fs::copy(&disk, &v1).unwrap();
    let p1 = env.replicate_ok(&[&disk], &[])["point"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Point 2 changes chunks 80..90 (previously zero): its data lives only in the newest segment.
    write_random(&disk, &mut rng, 80 * CHUNK, 10 * CHUNK as usize);
    let p2 = env.replicate_ok(&[&disk], &[])["point"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let seg = newest_segment(&env.store());
    let mut b = fs::read(&seg).unwrap();
    b[64 + 1000] ^= 0x01; // one byte inside the first chunk blob
    fs::write(&seg, &b).unwrap();
    let out = env.path("r.img");
    let o = env.restore(&p2, &out, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(&p2), "names the point: {e}");
    assert!(
        e.contains(seg.file_name().unwrap().to_str().unwrap()),
        "names the file: {e}"
    );
    assert!(e.contains("offset"), "names the offset: {e}");
    let o = env.restore(&p1, &out, &["--verify"]);
    assert!(
        o.status.success(),
        "older point still restores: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(same_bytes(&out, &v1));

    // A wrong key is refused up front, naming the key file.
    let wrong = env.path("wrong.key");
    fs::write(&wrong, "11".repeat(32)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let o = ferry()
        .args(["restore", "--point", &p1, "--force", "--store"])
        .arg(env.store())
        .arg("--key-file")
        .arg(&wrong)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    // Refused, naming the file and both key ids; the earlier restore's output is untouched.
    let marker: serde_json::Value =
        serde_json::from_slice(&fs::read(env.store().join("ferry-store.json")).unwrap()).unwrap();
    let store_key = marker["key_id"].as_str().unwrap();
    let wrong_key = ferry_crypto::MasterKey::from_bytes(&[0x11; 32], &wrong)
        .id()
        .to_string();
    assert_ne!(store_key, wrong_key);
    assert!(
        e.contains("wrong.key")
            && e.contains(&format!("created with key {store_key}"))
            && e.contains(&format!("has id {wrong_key}")),
        "{e}"
    );
    assert!(same_bytes(&out, &v1), "a refused restore wrote to --out");
    // A missing key for an existing store is not silently replaced by a new one.
    let o = ferry()
        .args(["replicate", "--once", "--store"])
        .arg(env.store())
        .arg("--key-file")
        .arg(env.path("nokey"))
        .arg("--cache-dir")
        .arg(env.path("cache"))
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(!env.path("nokey").exists());
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
}

#[test]
fn identical_second_disk_grows_the_store_by_under_two_percent() {
    let env = Env::new();
    let size: u64 = 256 << 20;
    let a = env.path("first.img");
    fs::File::create(&a).unwrap().set_len(size).unwrap();
    let mut rng = Rng(99);
    // Incompressible data in most of the disk, so dedupe (not zstd) must do the work.
    for i in 0..(size / (1 << 20)) {
        if i % 8 != 7 {
            write_random(&a, &mut rng, i << 20, 1 << 20);
        }
    }
    env.replicate_ok(&[&a], &[]);
    let before = du(&env.store());
    let b = env.path("second.img");
    fs::copy(&a, &b).unwrap();
    let j = env.replicate_ok(&[&b], &[]);
    assert_eq!(j["stored"]["unique_bytes"], 0);
    let after = du(&env.store());
    let growth = (after - before) as f64 / before as f64;
    eprintln!("store {before} -> {after} bytes: +{:.3}%", growth * 100.0);
    assert!(growth < 0.02, "grew {:.2}%", growth * 100.0);
    let out = env.path("r.img");
    let o = env.restore("latest", &out, &["--vm", "second", "--verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Allocated bytes under a directory (what the store really costs on disk).
fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walk(p)
        .iter()
        .map(|f| fs::metadata(f).unwrap().blocks() * 512)
        .sum()
}

#[test]
fn a_cache_directory_of_another_store_is_refused() {
    let env = Env::new();
    let disk = env.path("c.img");
    fs::File::create(&disk).unwrap().set_len(2 << 20).unwrap();
    write_random(&disk, &mut Rng(5), 0, 1 << 20);
    env.replicate_ok(&[&disk], &[]);
    let id = fs::read_to_string(env.path("cache/store-id")).unwrap();
    // A second store, pointed at the first store's cache by mistake.
    let mut c = ferry();
    c.arg("replicate").arg(&disk).arg("--once");
    c.arg("--store").arg(env.path("other-store"));
    c.arg("--key-file").arg(env.key());
    c.arg("--cache-dir").arg(env.path("cache"));
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("belongs to store") && err.contains(id.trim()) && err.contains("--cache-dir"),
        "{err}"
    );
    assert!(
        !env.path("other-store/manifests/c.json").exists(),
        "no point in the other store"
    );
}

#[test]
fn a_damaged_segment_of_one_vm_does_not_stop_restores_of_another() {
    let env = Env::new();
    let b = env.path("b.img");
    fs::File::create(&b).unwrap().set_len(4 << 20).unwrap();
    let mut rng = Rng(19);
    write_random(&b, &mut rng, 0, 2 << 20);
    env.replicate_ok(&[&b], &["--vm", "vmb"]);
    // VM a holds what VM b held first: its chunks dedupe into b's first segment.
    let a = env.path("a.img");
    fs::copy(&b, &a).unwrap();
    write_random(&b, &mut rng, 2 << 20, 1 << 20);
    env.replicate_ok(&[&b], &["--vm", "vmb"]);
    env.replicate_ok(&[&a], &["--vm", "vma"]);
    // b's newest segment gets a damaged index (its last bytes).
    let mut segs: Vec<_> = fs::read_dir(env.store().join("journal/vmb/b"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let newest = segs.last().unwrap().clone();
    let mut bytes = fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x40;
    fs::write(&newest, &bytes).unwrap();
    let out = env.path("ra.img");
    let o = env.restore("latest", &out, &["--vm", "vma", "--verify"]);
    assert!(
        o.status.success(),
        "VM a's restore must not depend on b's damaged segment: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(same_bytes(&out, &a));
    // VM b's newest point needs that segment: refused, naming it.
    let o = env.restore("latest", &env.path("rb.img"), &["--vm", "vmb"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(newest.file_name().unwrap().to_str().unwrap()),
        "names the damaged segment: {e}"
    );
}
