//! `ferry failover --test` on a local store, against the real binaries: a VM of two disks at an
//! older point, made while `ferry serve` holds the store, as fixed VHDs whose payloads are the
//! disks at that point byte for byte (and that `qemu-img` reads as VHDs), in a new private
//! directory; the point is held against retention (and still restores) until `--cleanup`, which
//! removes exactly what the failover made; a failed failover removes what it made; `list` keeps
//! the audit record. Costs ~6 s.

mod common;

use std::path::Path;
use std::process::Output;

use common::{ferry, ok, spawn_serve, write_random, Env, Rng};

const SIZE: u64 = 32 << 20;

fn failover(env: &Env, args: &[&str]) -> Output {
    ferry()
        .arg("failover")
        .args(args)
        .arg("--store")
        .arg(env.store())
        .arg("--key-file")
        .arg(env.key())
        .output()
        .unwrap()
}

fn ids(env: &Env) -> Vec<String> {
    env.points()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

fn payload_equals(vhd: &Path, img: &Path) -> bool {
    let v = std::fs::read(vhd).unwrap();
    let i = std::fs::read(img).unwrap();
    // A fixed VHD: the disk, then a 512-byte footer starting with "conectix".
    v.len() == i.len() + 512 && v[..i.len()] == i[..] && &v[i.len()..i.len() + 8] == b"conectix"
}

#[test]
fn a_test_failover_is_exact_held_against_retention_and_cleaned_up_exactly() {
    let env = Env::new();
    let (os, data) = (env.path("os.img"), env.path("data.img"));
    for p in [&os, &data] {
        std::fs::File::create(p).unwrap().set_len(SIZE).unwrap();
    }
    let mut rng = Rng(7);
    write_random(&os, &mut rng, 0, 4 << 20);
    write_random(&data, &mut rng, 8 << 20, 2 << 20);
    let rep = |extra: &[&str]| {
        let mut args = vec!["--vm", "web01", "--disk", "os", "--disk", "data"];
        args.extend_from_slice(extra);
        env.replicate_ok(&[&os, &data], &args)
    };
    rep(&[]);
    std::fs::copy(&os, env.path("os-at-1.img")).unwrap();
    std::fs::copy(&data, env.path("data-at-1.img")).unwrap();
    let p1 = ids(&env)[0].clone();
    write_random(&os, &mut rng, 1 << 20, 1 << 20);
    write_random(&data, &mut rng, 20 << 20, 1 << 20);
    rep(&[]);
    assert_eq!(ids(&env).len(), 2);

    // While `ferry serve` holds the store's writer lock.
    let serve = common::serve_cmd(&env, "256MiB");
    let (mut server, _) = spawn_serve(serve, Some("127.0.0.1:0"), &env.path("serve.log"));
    let tf = env.path("tf");
    std::fs::create_dir(&tf).unwrap();
    let o = failover(
        &env,
        &[
            "--test",
            "--vm",
            "web01",
            "--point",
            &p1[..4],
            "--to",
            tf.to_str().unwrap(),
            "--json",
            "--verify",
        ],
    );
    ok(&o, "failover --test while ferry serve runs");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["point"], p1.as_str(), "{r:#}");
    assert_eq!(r["state"], "ready", "{r:#}");
    let disks = r["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{r:#}");
    // In a new directory of its own, private.
    let made = std::path::PathBuf::from(r["dir"].as_str().unwrap());
    assert_eq!(made.parent(), Some(tf.as_path()), "{r:#}");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&made).unwrap().permissions())
            & 0o777,
        0o700
    );
    let (os_vhd, data_vhd) = (made.join("web01-os.vhd"), made.join("web01-data.vhd"));
    assert_eq!(disks[0]["path"], os_vhd.to_str().unwrap(), "{r:#}");
    assert!(
        payload_equals(&os_vhd, &env.path("os-at-1.img")),
        "os disk differs from point 1"
    );
    assert!(
        payload_equals(&data_vhd, &env.path("data-at-1.img")),
        "data disk differs from point 1"
    );
    assert!(r["qemu"].as_str().unwrap().contains("format=vpc"), "{r:#}");
    // An independent reader of the format: qemu-img (qemu-utils, installed by scripts/test),
    // as QEMU boots it (`format=vpc`: a fixed VHD has its footer at the end only, so QEMU does not
    // probe it): the virtual size, and the content against the disk at point 1.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json"])
        .arg(&os_vhd)
        .output()
        .expect("qemu-img (qemu-utils) is needed");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        (info["format"].as_str(), info["virtual-size"].as_u64()),
        (Some("vpc"), Some(SIZE)),
        "{info:#}"
    );
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw"])
        .arg(&data_vhd)
        .arg(env.path("data-at-1.img"))
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // One at a time per VM.
    let o = failover(&env, &["--test", "--vm", "web01"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--cleanup"));
    server.term();

    // Held: retention of 1 s keeps point 1 (and what it needs) while the failover exists.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write_random(&os, &mut rng, 2 << 20, 1 << 20);
    rep(&["--retention", "1s"]);
    assert!(
        ids(&env).contains(&p1),
        "retention removed a held point: {:?}",
        ids(&env)
    );
    let hold = std::fs::read_dir(env.store().join("pins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".hold"));
    assert!(
        hold.as_deref().is_some_and(|h| h.starts_with("web01.1.")),
        "{hold:?}"
    );

    // ... and it still restores exactly.
    let back = env.path("back.img");
    ok(
        &env.restore(&p1, &back, &["--vm", "web01", "--disk", "os"]),
        "restore of the held point",
    );
    assert!(common::same_bytes(&back, &env.path("os-at-1.img")));

    // Cleanup removes the failover's files, not another file in its directory, and the hold.
    std::fs::write(made.join("notes.txt"), b"mine").unwrap();
    let o = failover(&env, &["--test", "--cleanup", "--vm", "web01", "--json"]);
    ok(&o, "cleanup");
    assert!(!os_vhd.exists() && !data_vhd.exists());
    assert_eq!(std::fs::read(made.join("notes.txt")).unwrap(), b"mine");
    assert!(std::fs::read_dir(env.store().join("pins"))
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".hold")));
    let o = failover(&env, &["--test", "--cleanup", "--vm", "web01"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a second cleanup has nothing to do"
    );
    // The audit record stays.
    let o = ferry()
        .args(["failover", "list", "--json", "--store"])
        .arg(env.store())
        .output()
        .unwrap();
    ok(&o, "failover list");
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(l.as_array().unwrap().len(), 1, "{l:#}");
    assert_eq!(l[0]["state"], "cleaned", "{l:#}");
    assert!(l[0]["cleaned"].is_string(), "{l:#}");

    // No longer held: the next prune takes point 1.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write_random(&os, &mut rng, 3 << 20, 1 << 20);
    rep(&["--retention", "1s"]);
    assert!(!ids(&env).contains(&p1), "{:?}", ids(&env));

    // Raw images, exact; a cleanup with nothing else there removes the directory it made, and
    // leaves --to as it was.
    let o = failover(
        &env,
        &[
            "--test",
            "--vm",
            "web01",
            "--format",
            "raw",
            "--to",
            tf.to_str().unwrap(),
            "--json",
        ],
    );
    ok(&o, "raw failover");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let made2 = std::path::PathBuf::from(r["dir"].as_str().unwrap());
    assert!(common::same_bytes(&made2.join("web01-os.img"), &os));
    assert!(common::same_bytes(&made2.join("web01-data.img"), &data));
    ok(
        &failover(&env, &["--test", "--cleanup", "--vm", "web01"]),
        "cleanup 2",
    );
    assert!(!made2.exists(), "the cleanup left the directory it made");
    let left: Vec<_> = std::fs::read_dir(&tf)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![made.file_name().unwrap().to_owned()],
        "only the first one's kept directory"
    );

    // A failover that fails after its record removes what it made, hold included.
    let pins = env.store().join("pins");
    std::fs::rename(&pins, env.path("pins.away")).unwrap();
    std::fs::write(&pins, b"not a directory").unwrap();
    let o = failover(
        &env,
        &["--test", "--vm", "web01", "--to", tf.to_str().unwrap()],
    );
    assert_ne!(o.status.code(), Some(0));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("is removed"), "{e}");
    std::fs::remove_file(&pins).unwrap();
    std::fs::rename(env.path("pins.away"), &pins).unwrap();
    assert_eq!(
        std::fs::read_dir(&tf).unwrap().count(),
        1,
        "a failed failover left a directory"
    );
    // ... and does not block the next one.
    ok(
        &failover(
            &env,
            &["--test", "--vm", "web01", "--to", tf.to_str().unwrap()],
        ),
        "failover after a failed one",
    );
    ok(
        &failover(&env, &["--test", "--cleanup", "--vm", "web01"]),
        "cleanup 3",
    );
}

#[test]
fn failover_mistakes_get_clear_errors() {
    let env = Env::new();
    let img = env.path("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    env.replicate_ok(&[&img], &["--vm", "v1"]);
    for (args, want) in [
        (&["--vm", "v1", "--point", "final"][..], "no final point"),
        (
            &["--test", "--vm", "v1", "--point", "final"][..],
            "ferry-agent cutover",
        ),
        (&["--test"][..], "--vm"),
        (&["--test", "--vm", "nope"][..], "nope"),
        (&["--test", "--vm", "v1", "--point", "9999"][..], "9999"),
        (
            &["--test", "--vm", "v1", "--to", "/nonexistent/x"][..],
            "not a directory",
        ),
        (
            &["--test", "--vm", "v1", "--to", "azure://a/c/p"][..],
            "Azure",
        ),
        (&["--test", "--vm", "../v1"][..], "not allowed"),
    ] {
        let o = failover(&env, args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    // Nothing was made by a refused failover.
    assert!(!env.store().join("failovers").exists());

    // A record edited to name another file (the store's owner can write records): the cleanup
    // refuses and removes nothing.
    let o = failover(
        &env,
        &[
            "--test",
            "--vm",
            "v1",
            "--to",
            env.dir.path().to_str().unwrap(),
        ],
    );
    ok(&o, "failover");
    let victim = env.path("victim.txt");
    std::fs::write(&victim, b"keep").unwrap();
    let rec = std::fs::read_dir(env.store().join("failovers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .unwrap();
    let mut r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    r["disks"][0]["path"] = victim.to_str().unwrap().into();
    std::fs::write(&rec, serde_json::to_vec(&r).unwrap()).unwrap();
    let o = failover(&env, &["--test", "--cleanup", "--vm", "v1"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("not one Ferry wrote"));
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
}
