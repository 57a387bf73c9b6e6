//! The continuous agent on real parts: loop devices with ext4 and a partitioned xfs, the eBPF
//! tracker, fsfreeze cuts, fio --verify + file churn + fstrim running, MariaDB, kill -9.
//! The real `ferry serve` and `ferry-agent` binaries on loopback, a real local store.
//!
//! Needs root, loop devices, BTF (eBPF), e2fsprogs, xfsprogs, fio, mariadb-server; skips loudly
//! otherwise, and fails instead of skipping when FERRY_REQUIRE_EBPF=1 (scripts/test as root).

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{agent_bin, b3, ferry, same_bytes, spawn_serve, Env, Proc, Rng};
use ferry_testkit::loopdev::{Loop, LoopOptions};
use ferry_testkit::mariadb::{Mariadb, MariadbOptions};
use ferry_testkit::sys::{missing, sh, Need};

/// Why these tests cannot run here, if they cannot.
fn skip_reason(extra: &[Need]) -> Option<String> {
    let base = [
        Need::Root,
        Need::LoopDevices,
        Need::Btf,
        Need::Tool("losetup"),
        Need::Tool("mkfs.ext4"),
        Need::Tool("e2fsck"),
        Need::Tool("mount"),
        Need::Tool("umount"),
        Need::Tool("fstrim"),
    ];
    missing(&base).or_else(|| missing(extra))
}

fn skip(test: &str, extra: &[Need]) -> bool {
    match skip_reason(extra) {
        None => false,
        Some(why) => {
            ferry_testkit::skip(test, &why, "FERRY_REQUIRE_EBPF");
            true
        }
    }
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A loop device (`ferry_testkit::loopdev`) with its node as the string the agent's `--disk` takes.
struct LoopDisk {
    lo: Loop,
    dev: String,
}

impl LoopDisk {
    /// A new sparse backing file of `size` bytes, attached with partition scanning on (a table
    /// may be written through it later).
    fn new(backing: &Path, size: u64) -> LoopDisk {
        fs::File::create(backing).unwrap().set_len(size).unwrap();
        Self::attach(backing, 0)
    }
    /// Attaches `backing` as it is, with `partitions` partition nodes expected.
    fn attach(backing: &Path, partitions: u32) -> LoopDisk {
        let lo = Loop::attach_with(
            backing,
            &LoopOptions {
                partitions,
                partscan: true,
                ..Default::default()
            },
        )
        .unwrap();
        let dev = lo.path().to_owned();
        LoopDisk { lo, dev }
    }
    fn mount(&mut self, part: &str, at: &Path) {
        self.lo.mount(Path::new(part), at, "").unwrap();
    }
    fn umount_all(&mut self) {
        self.lo.umount_all().unwrap();
    }
}

/// A shell script run in the background, its stderr in `log`.
fn background(script: String, log: &Path) -> Proc {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script);
    Proc::spawn(c, log)
}

/// `ferry serve` on loopback with a local store; an agent registered in `agent-state`.
struct Site {
    env: Env,
    addr: String,
    server: Proc,
}

impl Site {
    fn new() -> Site {
        let env = Env::new();
        let (server, addr) = Site::spawn_server(&env, "127.0.0.1:0");
        common::register_agent(&env, &addr, "agent-state");
        Site { env, addr, server }
    }

    /// `ferry serve` for this site (its log appended to serve.log) on `listen`, once it listens;
    /// and the address it bound.
    fn spawn_server(env: &Env, listen: &str) -> (Proc, String) {
        spawn_serve(
            common::serve_cmd(env, "1GiB"),
            Some(listen),
            &env.path("serve.log"),
        )
    }

    fn agent_cmd(&self, disks: &[&str], extra: &[&str]) -> Command {
        let mut c = Command::new(agent_bin());
        c.env("FERRY_LOG", "info")
            .args(["--server", &self.addr, "--vm", "vm1", "--state-dir"])
            .arg(self.env.path("agent-state"))
            .args(["--hooks-dir"])
            .arg(self.env.path("hooks.d"));
        for d in disks {
            c.args(["--disk", d]);
        }
        c.args(extra);
        c
    }

    /// A running agent (continuous mode; cuts on demand only).
    fn start_agent(&self, disks: &[&str], extra: &[&str]) -> Proc {
        let mut c = self.agent_cmd(disks, extra);
        c.args(["--crash-interval", "1h", "--app-interval", "off"]);
        let p = Proc::spawn(c, &self.env.path("agent.log"));
        let sock = self.env.path("agent-state/agent.sock");
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "agent did not start: {}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// `ferry-agent cut [--app] --json`: the point's reply.
    fn cut(&self, app: bool) -> Result<serde_json::Value, String> {
        self.cut_within(app, "5min")
    }

    fn cut_within(&self, app: bool, timeout: &str) -> Result<serde_json::Value, String> {
        let mut c = Command::new(agent_bin());
        c.args(["cut", "--json", "--timeout", timeout, "--state-dir"])
            .arg(self.env.path("agent-state"));
        if app {
            c.arg("--app");
        }
        let o = c.output().unwrap();
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&o.stdout).unwrap())
    }

    /// The store's points of vm1 (from its manifest, which also names each point's run).
    fn manifest_points(&self) -> Vec<serde_json::Value> {
        let m: serde_json::Value =
            serde_json::from_slice(&fs::read(self.env.store().join("manifests/vm1.json")).unwrap())
                .unwrap();
        m["points"].as_array().unwrap().clone()
    }

    fn restore(&self, point: &str, disk: &str, out: &Path) {
        let o = ferry()
            .args([
                "restore", "--point", point, "--vm", "vm1", "--disk", disk, "--verify", "--store",
            ])
            .arg(self.env.store())
            .arg("--key-file")
            .arg(self.env.key())
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        ok(&o, &format!("restore {point} {disk}"));
    }
}

fn disk_name(dev: &str) -> String {
    Path::new(dev)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A hook run while frozen that copies every protected device to copies/RUN-NAME.img.
fn copy_hook(env: &Env, devs: &[&str]) -> PathBuf {
    let copies = env.path("copies");
    fs::create_dir_all(&copies).unwrap();
    let mut script = String::from("#!/bin/sh\nset -e\n");
    for d in devs {
        script.push_str(&format!(
            "dd if={d} of={}/$FERRY_RUN-{}.img bs=4M iflag=direct conv=sparse status=none\n",
            copies.display(),
            disk_name(d)
        ));
    }
    let hook = env.path("frozen-hook.sh");
    fs::write(&hook, script).unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    hook
}

#[test]
fn ext4_and_partitioned_xfs_under_fio_churn_and_fstrim_every_point_is_exact() {
    if skip(
        "ext4_and_partitioned_xfs_under_fio_churn_and_fstrim_every_point_is_exact",
        &[
            Need::Tool("mkfs.xfs"),
            Need::Tool("xfs_repair"),
            Need::Tool("sfdisk"),
            Need::Tool("fio"),
        ],
    ) {
        return;
    }
    let site = Site::new();
    let env = &site.env;
    // Disk A: ext4 on the whole disk. Disk B: a GPT partition at 1 MiB with xfs (the partition
    // trap: the tracker sees whole-disk offsets).
    let mut a = LoopDisk::new(&env.path("a.img"), 160 << 20);
    let mut b = LoopDisk::new(&env.path("b.img"), 352 << 20);
    sh(&format!("mkfs.ext4 -q -F {}", a.dev));
    sh(&format!(
        "printf 'label: gpt\\nstart=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\\n' | sfdisk -q {} && partx -u {} || true",
        b.dev, b.dev
    ));
    let b1 = format!("{}p1", b.dev);
    let t0 = Instant::now();
    while !Path::new(&b1).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{b1} did not appear"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sh(&format!("mkfs.xfs -q -f {b1}"));
    let (ma, mb) = (env.path("mnt-a"), env.path("mnt-b"));
    a.mount(&a.dev.clone(), &ma);
    b.mount(&b1, &mb);
    let hook = copy_hook(env, &[&a.dev, &b.dev]);
    let mut agent = site.start_agent(
        &[&a.dev, &b.dev],
        &[
            "--freeze-bound",
            "20s",
            "--frozen-hook",
            hook.to_str().unwrap(),
        ],
    );

    // The workload: fio with verification on ext4, create/rename/delete/fsync churn on xfs,
    // fstrim on both, all running through the cuts.
    let fio_log = env.path("fio.log");
    let mut fio = Command::new("fio")
        .args([
            "--name=verify",
            "--rw=randwrite",
            "--bs=4k",
            "--size=24M",
            "--numjobs=1",
            "--verify=crc32c",
            "--do_verify=1",
            "--loops=6",
            "--ioengine=psync",
            "--fsync=64",
        ])
        .arg(format!("--directory={}", ma.display()))
        // fio leaves its verify-state file in the working directory.
        .current_dir(env.dir.path())
        .stdout(fs::File::create(&fio_log).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut churn = background(
        format!(
            "i=0; while [ ! -e {stop} ]; do i=$((i+1)); \
             dd if=/dev/urandom of={m}/f$((i%40)).tmp bs=64k count=$((i%7+1)) conv=fsync status=none; \
             mv {m}/f$((i%40)).tmp {m}/g$((i%40)); [ $((i%5)) -eq 0 ] && rm -f {m}/g$(((i+13)%40)); \
             [ $((i%17)) -eq 0 ] && fstrim {m} && fstrim {a}; done",
            stop = env.path("stop-churn").display(),
            m = mb.display(),
            a = ma.display()
        ),
        &env.path("churn.log"),
    );
    let mut replies = Vec::new();
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(1500));
        let r = site
            .cut(i % 2 == 1)
            .unwrap_or_else(|e| panic!("cut {i}: {e}\nagent log:\n{}", agent.log_text()));
        replies.push(r);
    }
    let fio_st = fio.wait().unwrap();
    fs::write(env.path("stop-churn"), b"").unwrap();
    churn.wait();
    assert!(
        fio_st.success(),
        "fio --verify failed: {}",
        fs::read_to_string(&fio_log).unwrap_or_default()
    );
    // One more, with the workload stopped, app-consistent.
    replies.push(site.cut(true).unwrap());
    // These points come from the block-layer tracker, not from the scan fallback.
    let log = agent.log_text();
    assert!(
        log.contains("tracker: eBPF"),
        "the agent did not track with eBPF: {log}"
    );
    agent.term();
    a.umount_all();
    b.umount_all();
    site_stop(site, replies, &a.dev, &b.dev);
}

/// Stops the server (it drains into the store), then checks every point against its frozen copy
/// and with the filesystem checkers.
fn site_stop(mut site: Site, replies: Vec<serde_json::Value>, dev_a: &str, dev_b: &str) {
    site.server.term();
    let env = &site.env;
    let points = site.manifest_points();
    assert_eq!(points.len(), replies.len(), "{points:?}");
    for (p, r) in points.iter().zip(&replies) {
        let run = p["run"].as_str().unwrap();
        assert_eq!(run, r["run"].as_str().unwrap());
        assert_eq!(p["kind"], r["kind"]);
        // `ferry-agent cut` printed the point's id as the store lists it.
        assert_eq!(p["id"], r["point"], "{r}");
        let id = p["id"].as_str().unwrap();
        for (dev, fsck) in [(dev_a, "ext4"), (dev_b, "xfs")] {
            let name = disk_name(dev);
            let out = env.path(&format!("restored-{id}-{name}.img"));
            site.restore(id, &name, &out);
            let copy = env.path(&format!("copies/{run}-{name}.img"));
            assert!(
                same_bytes(&out, &copy),
                "point {id} disk {name} differs from the copy taken while frozen"
            );
            assert_eq!(
                p["disks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|d| d["name"] == name.as_str())
                    .unwrap()["blake3"]
                    .as_str()
                    .unwrap(),
                b3(&copy)
            );
            if fsck == "ext4" {
                sh(&format!("e2fsck -fn {}", out.display()));
            } else {
                let lo = LoopDisk::attach(&out, 1);
                let p1 = format!("{}p1", lo.dev);
                // A frozen xfs keeps its log (lazy superblock counters): mounting replays it, as
                // the failed-over machine's boot would; then the checker must find nothing.
                let m = env.path("xfs-check");
                fs::create_dir_all(&m).unwrap();
                sh(&format!(
                    "mount {p1} {} && umount {}",
                    m.display(),
                    m.display()
                ));
                sh(&format!("xfs_repair -n {p1}"));
            }
            let _ = fs::remove_file(&out);
        }
    }
}

#[test]
fn restarts_clean_unclean_and_a_forced_resync_move_only_what_differs() {
    if skip(
        "restarts_clean_unclean_and_a_forced_resync_move_only_what_differs",
        &[],
    ) {
        return;
    }
    let site = Site::new();
    let env = &site.env;
    // A raw disk (no filesystem): the test writes to it directly.
    let d = LoopDisk::new(&env.path("raw.img"), 64 << 20);
    sh(&format!(
        "dd if=/dev/urandom of={} bs=1M count=48 oflag=direct status=none",
        d.dev
    ));
    let once = |what: &str| -> (serde_json::Value, String) {
        let o = site
            .agent_cmd(&[&d.dev], &["--once", "--json"])
            .output()
            .unwrap();
        ok(&o, what);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            err.contains("tracker: eBPF"),
            "{what}: not the eBPF tracker: {err}"
        );
        (serde_json::from_slice(&o.stdout).unwrap(), err)
    };
    let save = |n: usize| {
        let p = env.path(&format!("copy-{n}.img"));
        sh(&format!(
            "dd if={} of={} bs=4M status=none",
            d.dev,
            p.display()
        ));
        p
    };
    let mut copies = vec![];
    let (_, err) = once("initial sync");
    assert!(err.contains("initial sync"), "{err}");
    copies.push(save(0));
    // Clean restart: nothing written meanwhile → no resync, nothing to send.
    let (_, err) = once("clean restart");
    assert!(err.contains("clean restart"), "{err}");
    assert!(
        err.contains(" 0 data bytes"),
        "a clean restart sent data: {err}"
    );
    copies.push(save(1));
    // Writes while the agent is away: the counters show them → resync; only the 3 changed
    // chunks (1 MiB apart) move.
    for off in [1u64, 9, 33] {
        sh(&format!(
            "dd if=/dev/urandom of={} bs=64k count=1 seek={} oflag=direct conv=notrunc status=none",
            d.dev,
            off * 16
        ));
    }
    let (_, err) = once("restart after writes while stopped");
    assert!(
        err.contains("write(s) reached the disk while the agent was stopped"),
        "{err}"
    );
    assert!(err.contains(&format!(" {} data bytes", 3 * 65536)), "{err}");
    copies.push(save(2));
    // An unclean stop: kill -9 of a running agent while writes happen → resync at the next
    // start; the point restores exactly.
    let mut running = site.start_agent(&[&d.dev], &[]);
    sh(&format!(
        "dd if=/dev/urandom of={} bs=64k count=4 seek=100 oflag=direct conv=notrunc status=none",
        d.dev
    ));
    std::thread::sleep(Duration::from_millis(800));
    running.kill9();
    let (_, err) = once("restart after kill -9");
    assert!(err.contains("the last stop was not clean"), "{err}");
    copies.push(save(3));
    // A forced resync (`ferry-agent resync`) in a running agent: a cut asked for right after
    // waits for it, and only differing chunks move.
    let mut running = site.start_agent(&[&d.dev], &[]);
    let o = Command::new(agent_bin())
        .args(["resync", "--state-dir"])
        .arg(env.path("agent-state"))
        .output()
        .unwrap();
    ok(&o, "resync");
    let r = site.cut(false).unwrap();
    assert_eq!(r["kind"], "crash");
    copies.push(save(4));
    running.term();
    let log = running.own_log();
    assert!(log.contains("resync requested"), "{log}");

    let mut site = site;
    site.server.term();
    let points = site.manifest_points();
    assert_eq!(points.len(), copies.len());
    for (p, copy) in points.iter().zip(&copies) {
        let id = p["id"].as_str().unwrap();
        let out = site.env.path(&format!("r-{id}.img"));
        site.restore(id, &disk_name(&d.dev), &out);
        assert!(same_bytes(&out, copy), "point {id} differs");
    }
    // Devices first, then the scratch directory that holds their backing files.
    drop(d);
    drop(site);
}

#[test]
fn kill_9_of_the_agent_mid_cut_thaws_within_the_bound() {
    if skip("kill_9_of_the_agent_mid_cut_thaws_within_the_bound", &[]) {
        return;
    }
    let site = Site::new();
    let env = &site.env;
    let mut d = LoopDisk::new(&env.path("k.img"), 64 << 20);
    sh(&format!("mkfs.ext4 -q -F {}", d.dev));
    let mnt = env.path("mnt");
    d.mount(&d.dev.clone(), &mnt);
    // The frozen hook says "frozen" (outside the frozen filesystem) and then hangs.
    let marker = env.path("frozen-now");
    let hook = env.path("hang.sh");
    fs::write(
        &hook,
        format!("#!/bin/sh\ntouch {}\nexec sleep 60\n", marker.display()),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let mut agent = site.start_agent(&[&d.dev], &["--frozen-hook", hook.to_str().unwrap()]);
    let s2 = env.path("agent-state");
    let cutter = std::thread::spawn(move || {
        Command::new(agent_bin())
            .args(["cut", "--state-dir"])
            .arg(s2)
            .output()
            .unwrap()
    });
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never froze: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Frozen now: a write blocks. Kill the agent and time how long until a write gets through.
    let writer = {
        let p = mnt.join("after-kill");
        std::thread::spawn(move || {
            let mut f = fs::File::create(&p).unwrap();
            f.write_all(b"x").unwrap();
            f.sync_all().unwrap();
            Instant::now()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let killed = Instant::now();
    agent.kill9();
    let done = writer.join().unwrap();
    let waited = done.saturating_duration_since(killed);
    eprintln!("filesystem writable {waited:?} after kill -9 of the agent");
    assert!(
        waited < Duration::from_secs(2),
        "the filesystem stayed frozen {waited:?} after the agent died (bound 2 s)"
    );
    let o = cutter.join().unwrap();
    assert!(!o.status.success(), "a cut whose agent died must fail");
    let _ = Command::new("pkill")
        .args(["-f", hook.to_str().unwrap()])
        .status();
}

#[test]
fn mariadb_app_consistent_point_starts_cleanly_with_every_committed_row() {
    if skip(
        "mariadb_app_consistent_point_starts_cleanly_with_every_committed_row",
        &ferry_testkit::mariadb::TOOLS,
    ) {
        return;
    }
    let site = Site::new();
    let env = &site.env;
    let mut d = LoopDisk::new(&env.path("db.img"), 256 << 20);
    sh(&format!("mkfs.ext4 -q -F {}", d.dev));
    let mnt = env.path("mnt");
    d.mount(&d.dev.clone(), &mnt);
    let mut mo = MariadbOptions::new(&mnt.join("datadir"), &env.path("mariadb"));
    mo.args.push("--innodb-flush-log-at-trx-commit=1".into());
    let db = Mariadb::start(&mo).unwrap();
    let sock = db.socket();
    // t.m tells an app point from a crash point: a MyISAM table with delayed key writes keeps its
    // index blocks in MariaDB's key cache and its "open" mark set until FLUSH TABLES (the app
    // point's FLUSH TABLES WITH READ LOCK). Restored from a crash point it is "not closed
    // properly" (CHECK TABLE warns, the server logs it as crashed); from an app point it is clean.
    db.sql("create database t; create table t.r (id int primary key) engine=innodb; create table t.m (id int primary key, v varchar(64)) engine=myisam delay_key_write=1;").unwrap();
    let mut agent = site.start_agent(
        &[&d.dev],
        &[
            "--mysql-socket",
            sock.to_str().unwrap(),
            "--mysql-user",
            "root",
        ],
    );
    // Inserts, each committed before its id is logged.
    let committed = env.path("committed.log");
    let mut ins = background(
        format!(
            "i=0; while [ ! -e {stop} ]; do i=$((i+1)); mariadb -S {s} -u root -e \"insert into t.r values ($i); insert into t.m values ($i, repeat('x', 60))\" && echo $i >> {log}; done",
            stop = env.path("stop-ins").display(),
            s = sock.display(),
            log = committed.display()
        ),
        &env.path("ins.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let before: u64 = fs::read_to_string(&committed)
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .max()
        .unwrap();
    let r = site.cut(true).unwrap();
    assert_eq!(r["kind"], "app", "{r}");
    std::thread::sleep(Duration::from_millis(500));
    fs::write(env.path("stop-ins"), b"").unwrap();
    ins.wait();
    agent.term();
    db.stop();
    d.umount_all();
    let mut site = site;
    site.server.term();
    let points = site.manifest_points();
    let p = points.last().unwrap();
    assert_eq!(p["kind"], "app");
    let out = site.env.path("restored-db.img");
    site.restore(p["id"].as_str().unwrap(), &disk_name(&d.dev), &out);
    let mut rd = LoopDisk::attach(&out, 0);
    let rmnt = site.env.path("rmnt");
    rd.mount(&rd.dev.clone(), &rmnt);
    let db2 = Mariadb::start(&MariadbOptions {
        install: false,
        ..MariadbOptions::new(&rmnt.join("datadir"), &site.env.path("mariadb2"))
    })
    .unwrap();
    let n: u64 = db2
        .sql("select count(*) from t.r")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let max: u64 = db2
        .sql("select coalesce(max(id),0) from t.r")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Every row committed before the cut was asked for; no gaps.
    assert!(
        max >= before,
        "point holds rows up to {max}, {before} were committed before the cut"
    );
    assert_eq!(n, max, "rows 1..={max} with gaps: {n}");
    // The app point's proof: the MyISAM table was flushed and closed at the cut.
    let check = db2.sql("check table t.m").unwrap();
    assert!(
        check.lines().all(|l| l.contains("\tstatus\tOK")),
        "CHECK TABLE t.m on the restored point (an app point closes MyISAM tables):\n{check}"
    );
    let m: u64 = db2
        .sql("select count(*) from t.m")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        m + 1 >= before,
        "t.m holds {m} rows, {before} were committed before the cut"
    );
    db2.stop();
    let log2 = fs::read_to_string(site.env.path("mariadb2/error.log")).unwrap_or_default();
    assert!(
        !log2.contains("[ERROR]"),
        "MariaDB on the restored point logged errors:\n{log2}"
    );
    rd.umount_all();
    drop(rd);
    drop(d);
    drop(site);
}

#[test]
fn app_points_run_the_hooks_and_a_failing_hook_downgrades_the_point() {
    if skip(
        "app_points_run_the_hooks_and_a_failing_hook_downgrades_the_point",
        &[],
    ) {
        return;
    }
    let site = Site::new();
    let env = &site.env;
    let mut d = LoopDisk::new(&env.path("h.img"), 64 << 20);
    sh(&format!("mkfs.ext4 -q -F {}", d.dev));
    let mnt = env.path("mnt");
    d.mount(&d.dev.clone(), &mnt);
    let hooks = env.path("hooks.d");
    fs::create_dir_all(&hooks).unwrap();
    fs::set_permissions(&hooks, fs::Permissions::from_mode(0o755)).unwrap();
    let log = env.path("hooks.log");
    let hook = |name: &str, body: &str| {
        let p = hooks.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    };
    hook(
        "10-record",
        &format!("echo \"$1 $FERRY_VM\" >> {}", log.display()),
    );
    let mut agent = site.start_agent(&[&d.dev], &[]);
    let r = site.cut(true).unwrap();
    assert_eq!(r["kind"], "app", "{r}");
    assert!(r["note"].is_null(), "{r}");
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "pre-freeze vm1\npost-thaw vm1\n"
    );
    // A crash point runs no hooks.
    let r = site.cut(false).unwrap();
    assert_eq!(r["kind"], "crash");
    assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 2);
    // A failing pre-freeze hook: the point is made, crash-consistent, and says why.
    hook(
        "20-fail",
        "echo 'database not ready' >&2; [ \"$1\" = post-thaw ] || exit 3",
    );
    let r = site.cut(true).unwrap();
    assert_eq!(r["kind"], "crash", "{r}");
    let note = r["note"].as_str().unwrap();
    assert!(
        note.contains("20-fail")
            && note.contains("exited with 3")
            && note.contains("database not ready"),
        "{note}"
    );
    agent.term();
    assert!(
        agent.log_text().contains("downgraded to crash-consistent"),
        "{}",
        agent.log_text()
    );
    let mut site = site;
    site.server.term();
    let kinds: Vec<String> = site
        .manifest_points()
        .iter()
        .map(|p| p["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["app", "crash", "crash"]);
    drop(d);
    drop(site);
}

/// Removes terminal colour sequences (`ESC [ … m`) from a log.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Issue 7 §6, the chaos run: `ferry serve` and an eBPF agent protect a live ext4 filesystem
/// under churn; every 0.5–2 s the server or the agent (at random) is killed with SIGKILL and
/// started again, with cuts asked for in between. At the end: every run the agent logged as
/// acknowledged is a point in the store (nothing acknowledged is lost), and every point restores
/// byte for byte to the copy its frozen hook took and is fsck-clean. `FERRY_CHAOS_KILLS` kills
/// (default 20, about 2 min here); `FERRY_CHAOS_SEED` picks the sequence (printed).
#[test]
fn chaos_kill_9_of_server_or_agent_loses_nothing_and_every_point_is_exact() {
    if skip(
        "chaos_kill_9_of_server_or_agent_loses_nothing_and_every_point_is_exact",
        &[],
    ) {
        return;
    }
    let kills: usize = std::env::var("FERRY_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("FERRY_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("chaos: {kills} kills, FERRY_CHAOS_SEED={seed}");
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut site = Site::new();
    let mut d = LoopDisk::new(&site.env.path("c.img"), 96 << 20);
    sh(&format!("mkfs.ext4 -q -F {}", d.dev));
    let mnt = site.env.path("mnt");
    d.mount(&d.dev.clone(), &mnt);
    let hook = copy_hook(&site.env, &[&d.dev]);
    let hook_s = hook.to_str().unwrap().to_owned();
    let agent_args = ["--freeze-bound", "20s", "--frozen-hook", hook_s.as_str()];
    let mut agent = site.start_agent(&[&d.dev], &agent_args);
    let mut churn = background(
        format!(
            "i=0; while [ ! -e {stop} ]; do i=$((i+1)); \
             dd if=/dev/urandom of={m}/f$((i%50)).tmp bs=16k count=$((i%9+1)) status=none; \
             mv {m}/f$((i%50)).tmp {m}/g$((i%50)); [ $((i%7)) -eq 0 ] && rm -f {m}/g$(((i+11)%50)); \
             [ $((i%13)) -eq 0 ] && sync; done",
            stop = site.env.path("stop-churn").display(),
            m = mnt.display()
        ),
        &site.env.path("churn.log"),
    );
    let (mut server_kills, mut agent_kills, mut cuts_ok) = (0, 0, 0);
    for _ in 0..kills {
        if site.cut_within(false, "20s").is_ok() {
            cuts_ok += 1;
        }
        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
        if rng.below(2) == 0 {
            site.server.kill9();
            site.server = Site::spawn_server(&site.env, &site.addr).0;
            server_kills += 1;
        } else {
            agent.kill9();
            let _ = fs::remove_file(site.env.path("agent-state/agent.sock"));
            agent = site.start_agent(&[&d.dev], &agent_args);
            agent_kills += 1;
        }
    }
    fs::write(site.env.path("stop-churn"), b"").unwrap();
    churn.wait();
    // A last point, the workload stopped: it must be made.
    let last = (0..3)
        .find_map(|_| site.cut_within(false, "2min").ok())
        .unwrap_or_else(|| {
            let log = strip_ansi(&agent.log_text());
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "no point after the chaos (FERRY_CHAOS_SEED={seed}); the agent log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        });
    cuts_ok += 1;
    let log = strip_ansi(&agent.log_text());
    assert!(
        log.contains("tracker: eBPF"),
        "the agent did not track with eBPF"
    );
    agent.term();
    d.umount_all();
    site.server.term();

    // Nothing acknowledged is lost: every run the agent logged as acknowledged is a point.
    let acked: Vec<String> = log
        .lines()
        .filter(|l| l.contains("point acknowledged by the process server"))
        .filter_map(|l| l.split("run=").nth(1))
        .map(|r| r.chars().take(32).collect())
        .collect();
    let points = site.manifest_points();
    let runs: Vec<&str> = points.iter().map(|p| p["run"].as_str().unwrap()).collect();
    for r in &acked {
        assert!(
            runs.contains(&r.as_str()),
            "acknowledged run {r} is not a point"
        );
    }
    assert!(runs.contains(&last["run"].as_str().unwrap()));
    assert!(
        acked.len() >= 2,
        "only {} acknowledged points in the chaos run",
        acked.len()
    );
    // Every point is exact and fsck-clean.
    let name = disk_name(&d.dev);
    for p in &points {
        let (id, run) = (p["id"].as_str().unwrap(), p["run"].as_str().unwrap());
        let out = site.env.path("restored.img");
        let _ = fs::remove_file(&out);
        site.restore(id, &name, &out);
        let copy = site.env.path(&format!("copies/{run}-{name}.img"));
        assert!(
            same_bytes(&out, &copy),
            "point {id} differs from the copy taken while frozen"
        );
        sh(&format!("e2fsck -fn {}", out.display()));
    }
    eprintln!(
        "chaos: {kills} kills ({server_kills} server, {agent_kills} agent), {cuts_ok} cuts answered, {} acknowledged, {} points exact and fsck-clean, {} agent restarts on divergence, {:.0} s",
        acked.len(),
        points.len(),
        log.matches("starting again").count(),
        started.elapsed().as_secs_f64()
    );
    drop(d);
}

/// `ferry-agent cutover` on a VM of two disks with MariaDB inserting: the cutover hook stops the
/// database, both filesystems become read-only (no insert, no write succeeds after it), the final
/// point is app-consistent and holds every row committed before; `ferry failover --point final`
/// materializes it (the time from the cutover to the disks ready is printed); `--rollback` makes
/// the source writable again, inserts resume and replication goes on without a full resync.
#[test]
fn cutover_with_mariadb_inserting_blocks_writes_and_the_final_point_holds_every_row() {
    if skip(
        "cutover_with_mariadb_inserting_blocks_writes_and_the_final_point_holds_every_row",
        &ferry_testkit::mariadb::TOOLS,
    ) {
        return;
    }
    let site = Site::new();
    let env = &site.env;
    let mut d = LoopDisk::new(&env.path("db.img"), 256 << 20);
    let mut d2 = LoopDisk::new(&env.path("files.img"), 64 << 20);
    sh(&format!("mkfs.ext4 -q -F {}", d.dev));
    sh(&format!("mkfs.ext4 -q -F {}", d2.dev));
    let (mnt, mnt2) = (env.path("mnt"), env.path("mnt2"));
    d.mount(&d.dev.clone(), &mnt);
    d2.mount(&d2.dev.clone(), &mnt2);
    fs::write(mnt2.join("before.txt"), b"written before the cutover\n").unwrap();
    let mo = MariadbOptions::new(&mnt.join("datadir"), &env.path("mariadb"));
    let db = Mariadb::start(&mo).unwrap();
    let sock = db.socket();
    db.sql("create database t; create table t.r (id int primary key) engine=innodb;")
        .unwrap();
    let mut agent = site.start_agent(&[&d.dev, &d2.dev], &[]);
    site.cut(false).unwrap();
    // A process holding a file open for writing stops the cutover, which rolls back whatever
    // it did: every filesystem is writable, nothing is recorded.
    let mut holder = background(
        format!("exec 3>>{}; exec sleep 30", mnt2.join("held.txt").display()),
        &env.path("holder.log"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let o = Command::new(agent_bin())
        .args(["cutover", "--state-dir"])
        .arg(env.path("agent-state"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("open for writing") && e.contains("fuser -vm") && e.contains("rolled back"),
        "{e}"
    );
    fs::write(mnt.join("still-writable"), b"x").unwrap();
    fs::write(mnt2.join("still-writable"), b"x").unwrap();
    assert!(!env.path("agent-state/cutover.json").exists());
    // With --allow-writable the busy filesystems stay writable, are frozen for the final point,
    // and are listed; a rollback undoes the rest.
    let o = Command::new(agent_bin())
        .args(["cutover", "--allow-writable", "--json", "--state-dir"])
        .arg(env.path("agent-state"))
        .output()
        .unwrap();
    ok(&o, "cutover --allow-writable");
    let aw: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        !aw["mounts_writable"].as_array().unwrap().is_empty(),
        "{aw:#}"
    );
    assert_eq!(aw["kind"], "app", "{aw:#}");
    ok(
        &Command::new(agent_bin())
            .args(["cutover", "--rollback", "--state-dir"])
            .arg(env.path("agent-state"))
            .output()
            .unwrap(),
        "rollback of the --allow-writable cutover",
    );
    holder.kill9();
    fs::write(mnt.join("still-writable"), b"y").unwrap();
    fs::write(mnt2.join("still-writable"), b"y").unwrap();
    // The cutover hook stops the database (as `systemctl stop mariadb` would); the rollback hook
    // only records (the test starts the database again).
    let hooks = env.path("hooks.d");
    fs::create_dir_all(&hooks).unwrap();
    fs::set_permissions(&hooks, fs::Permissions::from_mode(0o755)).unwrap();
    let log = env.path("hooks.log");
    let hook = hooks.join("10-mariadb");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n  cutover) mariadb-admin -S {s} -u root shutdown && echo \"cutover $FERRY_VM\" >> {l} ;;\n  cutover-rollback) echo \"rollback $FERRY_VM\" >> {l} ;;\nesac\n",
            s = sock.display(),
            l = log.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let committed = env.path("committed.log");
    let mut ins = background(
        format!(
            "i=0; while [ ! -e {stop} ]; do i=$((i+1)); mariadb -S {s} -u root -e \"insert into t.r values ($i)\" 2>/dev/null && echo $i >> {log}; sleep 0.01; done",
            stop = env.path("stop-ins").display(),
            s = sock.display(),
            log = committed.display()
        ),
        &env.path("ins.log"),
    );
    let count = || -> usize {
        fs::read_to_string(&committed)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let t = Instant::now();
    while count() < 20 {
        assert!(t.elapsed() < Duration::from_secs(30), "inserts do not run");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = |what: &str| -> serde_json::Value {
        let o = Command::new(agent_bin())
            .args(["status", "--state-dir"])
            .arg(env.path("agent-state"))
            .output()
            .unwrap();
        ok(&o, what);
        serde_json::from_slice(&o.stdout).unwrap()
    };

    // The cutover.
    let started = Instant::now();
    let o = Command::new(agent_bin())
        .args(["cutover", "--json", "--state-dir"])
        .arg(env.path("agent-state"))
        .output()
        .unwrap();
    ok(&o, "ferry-agent cutover");
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let final_point = c["final_point"].as_str().unwrap().to_owned();
    assert_eq!(c["kind"], "app", "{c:#}");
    assert_eq!(c["mounts_read_only"].as_array().unwrap().len(), 2, "{c:#}");
    assert_eq!(fs::read_to_string(&log).unwrap(), "cutover vm1\n");
    // Nothing is written on the source any more: no insert, no file.
    let at_cutover = count();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count(), at_cutover, "an insert succeeded after the cutover");
    let e = fs::write(mnt2.join("after.txt"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let st = status("status while cut over");
    assert_eq!(st["cutover"]["final_point"], final_point.as_str(), "{st:#}");
    assert!(c["mounts_writable"].as_array().unwrap().is_empty(), "{c:#}");
    // The server holds the final point against retention while the source is cut over.
    let held = || {
        fs::read_dir(env.store().join("pins"))
            .map(|d| {
                d.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .ends_with(".cutover-final.hold")
                })
            })
            .unwrap_or(false)
    };
    let t = Instant::now();
    while !held() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the final point is not held"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A second cutover is refused while this one lasts.
    let o = Command::new(agent_bin())
        .args(["cutover", "--state-dir"])
        .arg(env.path("agent-state"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cut over already"));

    // The appliance materializes the final point (a test failover here, so that the rollback
    // below can be tried too; a real failover makes the same disks).
    let to = env.path("failover");
    fs::create_dir(&to).unwrap();
    let wait = Instant::now();
    let r = loop {
        let o = ferry()
            .args([
                "failover", "--test", "--vm", "vm1", "--point", "final", "--format", "raw",
            ])
            .args(["--json", "--to"])
            .arg(&to)
            .arg("--store")
            .arg(env.store())
            .arg("--key-file")
            .arg(env.key())
            .output()
            .unwrap();
        if o.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap();
        }
        // The server records the final point when the agent's notice arrives (within a second).
        assert!(
            wait.elapsed() < Duration::from_secs(20),
            "failover --point final: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let ready = started.elapsed();
    eprintln!(
        "MEASURE cutover to failed-over disks ready: {:.2} s (2 disks, {} MiB, MariaDB; cutover itself {:.0} ms, writes blocked {:.0} ms before the point)",
        ready.as_secs_f64(),
        (256 + 64),
        c["took_ms"].as_f64().unwrap(),
        c["writes_blocked_for_ms"].as_f64().unwrap()
    );
    assert_eq!(r["point"], final_point.as_str(), "{r:#}");
    let db_img = r["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["disk"] == disk_name(&d.dev).as_str())
        .map(|x| PathBuf::from(x["path"].as_str().unwrap()))
        .unwrap();
    let mut rd = LoopDisk::attach(&db_img, 0);
    let rmnt = env.path("rmnt");
    rd.mount(&rd.dev.clone(), &rmnt);
    let db2 = Mariadb::start(&MariadbOptions {
        install: false,
        ..MariadbOptions::new(&rmnt.join("datadir"), &env.path("mariadb2"))
    })
    .unwrap();
    let max: usize = db2
        .sql("select coalesce(max(id),0) from t.r")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let n: usize = db2
        .sql("select count(*) from t.r")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        max >= at_cutover && n == max,
        "the final point holds {n} rows up to {max}; {at_cutover} were committed before the cutover"
    );
    db2.stop();
    let log2 = fs::read_to_string(env.path("mariadb2/error.log")).unwrap_or_default();
    assert!(
        !log2.contains("[ERROR]"),
        "MariaDB on the final point:\n{log2}"
    );
    assert!(
        !log2.contains("crash recovery"),
        "not a clean shutdown:\n{log2}"
    );
    rd.umount_all();
    drop(rd);
    ok(
        &ferry()
            .args(["failover", "--test", "--cleanup", "--vm", "vm1", "--store"])
            .arg(env.store())
            .output()
            .unwrap(),
        "cleanup",
    );

    // The rollback: writable again, the application back, replication on with no full resync.
    let sent_before = status("status before the rollback")["data_bytes_sent"]
        .as_u64()
        .unwrap();
    let o = Command::new(agent_bin())
        .args(["cutover", "--rollback", "--state-dir"])
        .arg(env.path("agent-state"))
        .output()
        .unwrap();
    ok(&o, "ferry-agent cutover --rollback");
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "cutover vm1\nrollback vm1\n"
    );
    fs::write(mnt2.join("after.txt"), b"written after the rollback\n").unwrap();
    drop(db);
    let db = Mariadb::start(&MariadbOptions {
        install: false,
        ..mo.clone()
    })
    .unwrap();
    let t = Instant::now();
    while count() < at_cutover + 20 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "inserts did not resume"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = site.cut(false).unwrap();
    let sent = status("status after the rollback")["data_bytes_sent"]
        .as_u64()
        .unwrap()
        - sent_before;
    assert!(
        sent < 64 << 20,
        "{sent} bytes sent after the rollback: a full resync of 320 MiB?"
    );
    assert!(status("status")["cutover"].is_null());
    // The server forgot the final point, and released it.
    let life = env.store().join("lifecycle/vm1.json");
    let t = Instant::now();
    while life.exists() || held() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the server kept the cutover"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = ferry()
        .args([
            "failover", "--test", "--vm", "vm1", "--point", "final", "--store",
        ])
        .arg(env.store())
        .arg("--key-file")
        .arg(env.key())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no final point"));
    fs::write(env.path("stop-ins"), b"").unwrap();
    ins.wait();
    assert!(p["point"].is_string(), "{p}");
    agent.term();
    db.stop();
    d.umount_all();
    d2.umount_all();
    drop(site);
}

/// The boot test: a small Debian disk (partition table, ext4 root, extlinux), live and protected
/// by the agent with a writer running, gets a marker file, a point, a test failover; the VHD the
/// test failover made boots under QEMU and its systemd unit prints the marker read from the
/// disk; the cleanup leaves nothing behind. The Debian tree comes from tests/boot/debian-rootfs
/// (debootstrap, cached per machine: ~2 min once, then nothing); the boot itself takes ~5 s with
/// KVM, ~40 s under TCG. Needs debootstrap, qemu-system-x86_64, extlinux and network access to
/// a Debian mirror once; FERRY_REQUIRE_BOOT_TEST=1 makes a missing one a failure.
#[test]
fn a_test_failover_of_a_live_debian_disk_boots_under_qemu_and_prints_the_marker() {
    const TEST: &str =
        "a_test_failover_of_a_live_debian_disk_boots_under_qemu_and_prints_the_marker";
    let mbr = Path::new("/usr/lib/syslinux/mbr/mbr.bin");
    let why = skip_reason(&[
        Need::Tool("debootstrap"),
        Need::Tool("qemu-system-x86_64"),
        Need::Tool("extlinux"),
        Need::Tool("sfdisk"),
        Need::Tool("tar"),
    ])
    .or_else(|| (!mbr.exists()).then(|| format!("{} missing (syslinux-common)", mbr.display())));
    if let Some(why) = why {
        ferry_testkit::skip(TEST, &why, "FERRY_REQUIRE_BOOT_TEST");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/boot/debian-rootfs");
    let o = Command::new("bash").arg(&script).output().unwrap();
    if !o.status.success() {
        // No Debian mirror here (or debootstrap failed): a skip, a failure when required.
        ferry_testkit::skip(
            TEST,
            &format!(
                "tests/boot/debian-rootfs failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            "FERRY_REQUIRE_BOOT_TEST",
        );
        return;
    }
    let tarball = PathBuf::from(String::from_utf8(o.stdout).unwrap().trim());

    let site = Site::new();
    let env = &site.env;
    // The disk: an MBR table with one bootable Linux partition at 1 MiB, ext4 labelled for the
    // kernel's root=LABEL=ferryroot, the Debian tree, extlinux in its boot sector and the MBR
    // boot code in the disk's first sector.
    let img = env.path("debian.img");
    fs::File::create(&img).unwrap().set_len(640 << 20).unwrap();
    sh(&format!(
        "printf 'label: dos\\nstart=2048, type=83, bootable\\n' | sfdisk -q {}",
        img.display()
    ));
    let mut disk = LoopDisk::attach(&img, 1);
    let p1 = format!("{}p1", disk.dev);
    // extlinux reads ext4 without the 64bit feature.
    sh(&format!("mkfs.ext4 -q -F -O ^64bit -L ferryroot {p1}"));
    let mnt = env.path("root");
    disk.mount(&p1, &mnt);
    sh(&format!(
        "tar -C {} --numeric-owner -xf {} && extlinux --install {}/boot/extlinux >/dev/null && dd if={} of={} bs=440 count=1 conv=notrunc status=none && sync",
        mnt.display(),
        tarball.display(),
        mnt.display(),
        mbr.display(),
        disk.dev
    ));
    let mut agent = site.start_agent(&[&disk.dev], &["--freeze-bound", "20s"]);
    site.cut(false).unwrap();
    // A writer keeps the filesystem busy from here to the end: the test failover is taken while
    // replication goes on.
    let mut writer = background(
        format!(
            "i=0; while [ ! -e {stop} ]; do i=$((i+1)); dd if=/dev/urandom of={m}/var/tmp/w$((i%20)) bs=64k count=4 conv=fsync status=none; sleep 0.05; done",
            stop = env.path("stop-writer").display(),
            m = mnt.display()
        ),
        &env.path("writer.log"),
    );
    let marker = format!("ferry-{:016x}", Rng(std::process::id() as u64).next());
    fs::write(mnt.join("etc/ferry-marker"), format!("{marker}\n")).unwrap();
    let point = site.cut(true).unwrap();
    let point = point["point"].as_str().unwrap().to_owned();
    // Written after the point: the booted disk must not have it.
    fs::write(mnt.join("etc/ferry-marker"), b"after-the-point\n").unwrap();
    site.cut(false).unwrap();

    let tf = env.path("tf");
    fs::create_dir(&tf).unwrap();
    let o = ferry()
        .args([
            "failover", "--test", "--vm", "vm1", "--point", &point, "--json", "--to",
        ])
        .arg(&tf)
        .arg("--store")
        .arg(env.store())
        .arg("--key-file")
        .arg(env.key())
        .output()
        .unwrap();
    ok(&o, "failover --test");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let vhd = PathBuf::from(r["disks"][0]["path"].as_str().unwrap());
    assert!(vhd.extension().is_some_and(|x| x == "vhd"), "{r:#}");

    // Boot it under TCG (software emulation: the same everywhere; KVM inside this kind of VM
    // fails in the BIOS). -snapshot: the guest's writes go to a temporary overlay, the
    // failed-over VHD stays as made.
    let serial = env.path("serial.log");
    let qlog = env.path("qemu.log");
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-snapshot", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!("file={},format=vpc,if=virtio", vhd.display()))
        .stdout(fs::File::create(&qlog).unwrap())
        .stderr(fs::File::create(env.path("qemu.err")).unwrap())
        .spawn()
        .unwrap();
    let text = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    let want = format!("FERRY-BOOT-MARKER {marker}");
    let mut exited = None;
    while !text(&serial).contains(&want) {
        exited = exited.or_else(|| qemu.try_wait().unwrap());
        if exited.is_some() || started.elapsed() > Duration::from_secs(400) {
            let _ = qemu.kill();
            panic!(
                "the failed-over disk did not boot to the marker {marker} ({:?}, qemu {exited:?}); serial console:\n{}\nqemu: {}",
                started.elapsed(),
                text(&serial),
                text(&env.path("qemu.err"))
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "MEASURE test failover boot to marker: {:.1} s (TCG)",
        started.elapsed().as_secs_f64()
    );
    // The unit powers the machine off after the marker.
    let t = Instant::now();
    while qemu.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!(
                "the guest did not power off after the marker: {}",
                text(&serial)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = text(&serial);
    assert!(!out.contains("after-the-point"), "{out}");
    assert!(out.contains("Linux version"), "{out}");

    // The cleanup removes what the test failover made, and only that.
    ok(
        &ferry()
            .args(["failover", "--test", "--cleanup", "--vm", "vm1", "--store"])
            .arg(env.store())
            .output()
            .unwrap(),
        "cleanup",
    );
    assert_eq!(
        fs::read_dir(&tf).unwrap().count(),
        0,
        "left in {}",
        tf.display()
    );
    let holds: Vec<_> = fs::read_dir(env.store().join("pins"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(holds.is_empty(), "holds left: {holds:?}");
    let o = ferry()
        .args(["failover", "list", "--json", "--store"])
        .arg(env.store())
        .output()
        .unwrap();
    ok(&o, "failover list");
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(l[0]["state"], "cleaned", "{l:#}");
    // Replication went on throughout.
    site.cut(false).unwrap();
    fs::write(env.path("stop-writer"), b"").unwrap();
    writer.wait();
    agent.term();
    disk.umount_all();
    drop(site);
}
