//! A real loop device with a real ext4 filesystem, replicated while mounted and idle.
//! Needs root and util-linux/e2fsprogs; skips loudly otherwise.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use ferry_testkit::loopdev::Loop;
use ferry_testkit::sys::{missing, Need};

fn run(cmd: &str, args: &[&str]) -> String {
    ferry_testkit::sys::run(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Copies a block device's bytes to a file (fs::copy refuses devices).
fn copy_device(dev: &Path, to: &Path) {
    let mut src = fs::File::open(dev).unwrap();
    let mut dst = fs::File::create(to).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
}

fn skip_reason() -> Option<String> {
    missing(&[
        Need::Root,
        Need::LoopDevices,
        Need::Tool("losetup"),
        Need::Tool("mkfs.ext4"),
        Need::Tool("e2fsck"),
        Need::Tool("mount"),
        Need::Tool("umount"),
    ])
}

#[test]
fn ext4_on_a_loop_device_replicated_while_mounted_restores_exactly() {
    if let Some(why) = skip_reason() {
        ferry_testkit::skip(
            "ext4_on_a_loop_device_replicated_while_mounted_restores_exactly",
            &why,
            "FERRY_REQUIRE_FREEZE_TESTS",
        );
        return;
    }
    let env = Env::new();
    let img = env.path("backing.img");
    fs::File::create(&img).unwrap().set_len(192 << 20).unwrap();
    let mut lp = Loop::attach(&img).unwrap();
    let dev = lp.path().to_owned();
    let mnt = env.path("mnt");
    // No lazy init: nothing may write to the disk in the background once it is idle.
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            &dev,
        ],
    );
    lp.mount(Path::new(&dev), &mnt, "").unwrap();
    let mut rng = Rng(42);
    for i in 0..20 {
        let mut b = vec![0u8; 300_000 + i * 10_000];
        rng.fill(&mut b);
        fs::write(mnt.join(format!("file{i}.bin")), &b).unwrap();
    }
    fs::write(mnt.join("notes.txt"), "ferry ".repeat(200_000)).unwrap();
    run("sync", &[]);
    std::thread::sleep(std::time::Duration::from_millis(500));

    let devp = Path::new(&dev);
    let j1 = env.replicate_ok(&[devp], &["--vm", "web01", "--disk", "sda"]);
    let copy1 = env.path("dev-at-point1.img");
    copy_device(devp, &copy1);
    assert_eq!(
        j1["point"]["disks"][0]["blake3"].as_str().unwrap(),
        b3(&copy1),
        "the disk stayed idle while mounted"
    );

    // Change files, replicate again.
    fs::remove_file(mnt.join("file3.bin")).unwrap();
    let mut b = vec![0u8; 2_000_000];
    rng.fill(&mut b);
    fs::write(mnt.join("new.bin"), &b).unwrap();
    run("sync", &[]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let j2 = env.replicate_ok(&[devp], &["--vm", "web01", "--disk", "sda"]);
    let copy2 = env.path("dev-at-point2.img");
    copy_device(devp, &copy2);
    assert_eq!(
        j2["point"]["disks"][0]["blake3"].as_str().unwrap(),
        b3(&copy2)
    );
    drop(lp);

    for (j, copy) in [(&j1, &copy1), (&j2, &copy2)] {
        let id = j["point"]["id"].as_str().unwrap();
        let out = env.path("restored.img");
        let o = env.restore(id, &out, &["--verify"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(same_bytes(&out, copy), "point {id} differs from the device");
        let fsck = Command::new("e2fsck")
            .args(["-fn", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck -fn on point {id}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
}
