//! The agent ↔ process-server split end to end: the real `ferry serve` and `ferry-agent` binaries
//! on loopback, real TLS 1.3, a real local store; every point restored and compared byte for byte.
//!
//! `ferry-agent` is another package's binary: build it first (`cargo test -p ferry-agent -p
//! ferry-cli` does, as does `cargo build -p ferry-agent` with the same profile).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    agent_bin, ferry, ok, same_bytes, spawn_serve, status_json, write_random, write_zeros, Env,
    Proc, Rng,
};

/// A `ferry serve` process logging to `serve.log`, and the address it listens on.
struct Server {
    proc: Proc,
    addr: String,
}

impl Server {
    fn start(env: &Env, listen: &str) -> Server {
        Self::start_with(env, listen, env.store().to_str().unwrap(), &[])
    }
    fn start_with(env: &Env, listen: &str, store: &str, vars: &[(&str, String)]) -> Server {
        Self::start_sized(env, listen, store, vars, "512MiB")
    }
    /// Listens on `listen` (`127.0.0.1:0`: a port the kernel picks; a restart passes the address
    /// of the first start).
    fn start_sized(
        env: &Env,
        listen: &str,
        store: &str,
        vars: &[(&str, String)],
        cache_size: &str,
    ) -> Server {
        let mut c = ferry();
        c.envs(vars.iter().map(|(k, v)| (k, v)))
            .args(["serve", "--cache-size", cache_size])
            .arg("--store")
            .arg(store)
            .arg("--key-file")
            .arg(env.key())
            .arg("--cache-dir")
            .arg(env.path("ps-cache"))
            .arg("--state-dir")
            .arg(env.path("ps-state"));
        let (proc, addr) = spawn_serve(c, Some(listen), &env.path("serve.log"));
        Server { proc, addr }
    }
    fn log_text(&self) -> String {
        self.proc.log_text()
    }
    /// SIGTERM and wait: the server drains the cache into the store and exits 0.
    fn stop(&mut self) {
        self.proc.term();
    }
    fn kill9(&mut self) {
        self.proc.kill9();
    }
}

/// A server on a free loopback port (`start` spawns it there) and an agent registered with it in
/// `agent/`: the address and the server.
fn serve_and_register(env: &Env, start: impl FnOnce(&str) -> Server) -> (String, Server) {
    let srv = start("127.0.0.1:0");
    let addr = srv.addr.clone();
    let pass = passphrase_file(env, &env.path("ps-state"), "pass.txt");
    ok(&register(env, &addr, &pass, "agent"), "register");
    (addr, srv)
}

fn passphrase_file(env: &Env, state: &Path, name: &str) -> PathBuf {
    let o = ferry()
        .args(["passphrase", "show", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = env.path(name);
    fs::write(&p, &o.stdout).unwrap();
    p
}

fn register(env: &Env, addr: &str, pass: &Path, state: &str) -> Output {
    Command::new(agent_bin())
        .args(["register", "--server", addr, "--passphrase-file"])
        .arg(pass)
        .arg("--state-dir")
        .arg(env.path(state))
        .output()
        .unwrap()
}

fn agent_cmd(env: &Env, addr: &str, disk: &Path, state: &str) -> Command {
    agent_cmd_vm(env, addr, disk, state, "web01")
}

fn agent_cmd_vm(env: &Env, addr: &str, disk: &Path, state: &str, vm: &str) -> Command {
    let mut c = Command::new(agent_bin());
    c.env("FERRY_LOG", "info")
        .args(["--server", addr, "--vm", vm, "--once", "--disk"])
        .arg(disk)
        .arg("--state-dir")
        .arg(env.path(state));
    c
}

fn run_agent(env: &Env, addr: &str, disk: &Path, state: &str) -> Output {
    agent_cmd(env, addr, disk, state).output().unwrap()
}

fn make_image(path: &Path, rng: &mut Rng, size: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    // Mostly random data with some zero and some untouched (sparse) areas.
    let mut off = 0;
    while off < size {
        let len = (1 << 20).min(size - off) as usize;
        if rng.below(4) != 0 {
            write_random(path, rng, off, len);
        }
        off += len as u64;
    }
}

fn mutate(path: &Path, rng: &mut Rng, size: u64) {
    for _ in 0..20 {
        let off = rng.below(size / 4096 - 64) * 4096;
        let len = 4096 * (1 + rng.below(32) as usize);
        write_random(path, rng, off, len);
    }
    write_zeros(path, 4 << 20, 1 << 20);
}

/// Restores every listed point and compares it with the copy saved at its run.
fn check_points(env: &Env, copies: &[PathBuf]) {
    let pts = env.points();
    assert_eq!(pts.len(), copies.len(), "{pts:?}");
    for (p, copy) in pts.iter().zip(copies) {
        let id = p["id"].as_str().unwrap();
        let out = env.path(&format!("restored-{id}.img"));
        let o = env.restore(id, &out, &["--vm", "web01", "--verify"]);
        ok(&o, "restore");
        assert!(same_bytes(&out, copy), "point {id} differs from its copy");
    }
}

#[test]
fn register_replicate_twice_and_restore_exactly() {
    let env = Env::new();
    let (addr, mut srv) = serve_and_register(&env, |addr| Server::start(&env, addr));
    let meta = fs::metadata(env.path("agent/agent.json")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let size = 32 << 20;
    let disk = env.path("disk.img");
    let mut rng = Rng(0x5eed);
    make_image(&disk, &mut rng, size);
    let mut copies = Vec::new();
    for run in 0..2 {
        if run > 0 {
            mutate(&disk, &mut rng, size);
        }
        let o = run_agent(&env, &addr, &disk, "agent");
        ok(&o, "agent run");
        let copy = env.path(&format!("copy{run}.img"));
        fs::copy(&disk, &copy).unwrap();
        copies.push(copy);
    }
    srv.stop();
    let o = ferry()
        .args(["points", "list", "--store"])
        .arg(env.store())
        .output()
        .unwrap();
    ok(&o, "points list");
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        text.lines().filter(|l| l.contains("web01")).count(),
        2,
        "{text}"
    );
    check_points(&env, &copies);
}

#[test]
fn strangers_are_refused_and_the_server_keeps_serving() {
    let env = Env::new();
    let (addr, mut srv) = serve_and_register(&env, |addr| Server::start(&env, addr));
    let disk = env.path("disk.img");
    let mut rng = Rng(7);
    make_image(&disk, &mut rng, 8 << 20);

    // A passphrase for the same certificate with another secret: refused as a wrong passphrase.
    let other = env.path("other-state");
    fs::create_dir_all(&other).unwrap();
    fs::copy(
        env.path("ps-state/tls-identity.pem"),
        other.join("tls-identity.pem"),
    )
    .unwrap();
    let wrong = passphrase_file(&env, &other, "wrong.txt");
    let o = register(&env, &addr, &wrong, "wrong-agent");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("wrong registration passphrase"), "{err}");
    assert!(!env.path("wrong-agent/agent.json").exists());

    // Another key (a valid one, not the registered one), and an agent id never registered:
    // refused, non-zero exit.
    let id: serde_json::Value =
        serde_json::from_slice(&fs::read(env.path("agent/agent.json")).unwrap()).unwrap();
    let other_key = hex::encode(ferry_wire::AgentKey::generate().unwrap().pkcs8());
    for (field, value, expect) in [
        ("key", other_key, "bad credential"),
        ("agent_id", "cd".repeat(16), "unknown agent"),
    ] {
        let mut forged = id.clone();
        forged[field] = value.into();
        let dir = env.path("forged");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("agent.json"), serde_json::to_vec(&forged).unwrap()).unwrap();
        let o = run_agent(&env, &addr, &disk, "forged");
        assert!(!o.status.success(), "forged {field} was accepted");
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(
            err.contains("refused") && err.contains(expect),
            "{field}: {err}"
        );
    }

    // Random bytes on the port: refused in the log; the server goes on.
    let mut junk = vec![0u8; 4096];
    rng.fill(&mut junk);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&junk);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    drop(s);

    // The registered agent still works.
    ok(&run_agent(&env, &addr, &disk, "agent"), "registered agent");
    let copy = env.path("copy.img");
    fs::copy(&disk, &copy).unwrap();
    let log = srv.log_text();
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(log.contains("wrong registration passphrase"), "{log}");
    srv.stop();
    check_points(&env, &[copy]);
}

#[test]
fn kill_9_of_the_server_mid_run_loses_nothing() {
    let env = Env::new();
    let (addr, mut srv) = serve_and_register(&env, |addr| Server::start(&env, addr));
    let size = 192 << 20;
    let disk = env.path("disk.img");
    let mut rng = Rng(99);
    make_image(&disk, &mut rng, size);
    let mut copies = Vec::new();
    let mut reconnects = 0;
    for run in 0..2 {
        if run > 0 {
            mutate(&disk, &mut rng, size);
        }
        let copy = env.path(&format!("copy{run}.img"));
        fs::copy(&disk, &copy).unwrap();
        let child = agent_cmd(&env, &addr, &disk, "agent")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if run == 0 {
            // Mid-run: the first run ships ~150 MiB; kill the server while it does.
            std::thread::sleep(Duration::from_millis(250));
            srv.kill9();
            std::thread::sleep(Duration::from_millis(300));
            srv = Server::start(&env, &addr);
        }
        let o = child.wait_with_output().unwrap();
        ok(&o, "agent run");
        // `--once` prints "N records, N data bytes, N reconnect(s), tracker …" on stderr.
        let err = String::from_utf8_lossy(&o.stderr);
        let n: u64 = err
            .lines()
            .find_map(|l| {
                let (head, _) = l.split_once(" reconnect(s)")?;
                head.rsplit(' ').next()?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no reconnect count in the agent's output: {err}"));
        reconnects += n;
        // The restarted server still holds the open run (its Begin is in the cache or the
        // journal): the agent continues it, it does not start again.
        assert!(
            !err.contains("starting again"),
            "the agent diverged after a server restart: {err}"
        );
        copies.push(copy);
    }
    assert!(
        reconnects > 0,
        "the kill did not interrupt a run; make the image larger"
    );
    // ... and the run was open when the server came back: it held its start and said so.
    let log: String = srv.proc.own_log();
    assert!(
        log.lines()
            .any(|l| l.contains("inventory") && l.contains("open=true")),
        "the restarted server did not hold the open run: {log}"
    );
    srv.stop();
    check_points(&env, &copies);
}

#[test]
fn azure_store_through_the_process_server() {
    let Some(azurite) = ferry_azure::azurite::Azurite::start_or_skip() else {
        return;
    };
    let env = Env::new();
    let url = "azure://devstoreaccount1/ferry-serve";
    let vars = [
        (
            "AZURE_STORAGE_CONNECTION_STRING",
            azurite.connection_string(),
        ),
        ("FERRY_STATE_DIR", env.path("state").display().to_string()),
    ];
    let (addr, mut srv) =
        serve_and_register(&env, |addr| Server::start_with(&env, addr, url, &vars));
    let size = 16 << 20;
    let disk = env.path("disk.img");
    let mut rng = Rng(42);
    make_image(&disk, &mut rng, size);
    let mut copies = Vec::new();
    for run in 0..2 {
        if run > 0 {
            mutate(&disk, &mut rng, size);
        }
        ok(&run_agent(&env, &addr, &disk, "agent"), "agent run");
        let copy = env.path(&format!("copy{run}.img"));
        fs::copy(&disk, &copy).unwrap();
        copies.push(copy);
    }
    srv.stop();
    let o = ferry()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .args(["points", "list", "--json", "--store", url])
        .output()
        .unwrap();
    ok(&o, "points list");
    let pts: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(pts.len(), 2, "{pts:?}");
    for (p, copy) in pts.iter().zip(&copies) {
        let id = p["id"].as_str().unwrap();
        let out = env.path(&format!("restored-{id}.img"));
        let o = ferry()
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .args([
                "restore", "--store", url, "--point", id, "--force", "--verify",
            ])
            .arg("--key-file")
            .arg(env.key())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        ok(&o, "restore from azure");
        assert!(same_bytes(&out, copy), "point {id} differs from its copy");
    }

    // The end of the VM's migration with the server running: a real failover (page blobs under
    // failover/), then complete-migration, which the server carries out (the container's
    // manifest, replica and snapshots deleted; the failed-over disk kept) and after which the
    // agent is refused.
    let mut srv = Server::start_with(&env, &addr, url, &vars);
    let cli = |args: &[&str]| {
        ferry()
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .args(args)
            .args(["--store", url, "--key-file"])
            .arg(env.key())
            .output()
            .unwrap()
    };
    let o = cli(&["failover", "--vm", "web01", "--json"]);
    ok(&o, "failover on azure");
    let f: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let blob = f["disks"][0]["path"].as_str().unwrap().to_owned();
    let o = cli(&[
        "complete-migration",
        "--vm",
        "web01",
        "--wait",
        "60s",
        "--json",
    ]);
    ok(&o, "complete-migration on azure with the server running");
    // The server did the removal (it holds the staging store), not the command.
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the process server holds the store"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c["state"], "retired", "{c:#}");
    let o = ferry()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .args(["points", "list", "--json", "--store", url])
        .output()
        .unwrap();
    ok(&o, "points list");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    let blobs = ferry_azure::AzureBlobs::new(azurite.config("ferry-serve")).unwrap();
    assert!(blobs.list("replicas/web01/").unwrap().is_empty());
    assert!(blobs.blob_size("manifests/web01.json").unwrap().is_none());
    assert!(
        blobs.blob_size(&blob).unwrap().is_some(),
        "the failed-over disk stays"
    );
    let o = run_agent(&env, &addr, &disk, "agent");
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    srv.stop();
}

#[test]
fn kill_9_of_the_agent_mid_run_then_a_clean_run_is_exact() {
    let env = Env::new();
    let (addr, mut srv) = serve_and_register(&env, |addr| Server::start(&env, addr));
    let size = 192 << 20;
    let disk = env.path("disk.img");
    let mut rng = Rng(1234);
    make_image(&disk, &mut rng, size);
    let mut child = agent_cmd(&env, &addr, &disk, "agent")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Mid-run: once the run has started (its map is made all-unknown then), not at a fixed time
    // (a slow start would be killed before it began).
    let map = env.path("agent/maps/disk.cv");
    let t0 = std::time::Instant::now();
    while !map.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the run never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    // The killed run never reached its tag: its chunk map (maps/DISK.cv: a 1024-byte header, then
    // 32 bytes per chunk, made all-unknown when the run starts) must not hold a single committed
    // chunk, so the next run sends everything again.
    let map = env.path("agent/maps/disk.cv");
    let b = fs::read(&map).unwrap_or_else(|e| panic!("{}: {e}", map.display()));
    assert_eq!(&b[..8], b"FERRYCV3", "{} is not a chunk map", map.display());
    assert_eq!(
        b.len() as u64,
        1024 + size / 65536 * 32,
        "{}",
        map.display()
    );
    assert!(
        b[1024..].iter().all(|&x| x == 0xff),
        "the killed run committed chunks to {}",
        map.display()
    );
    mutate(&disk, &mut rng, size);
    ok(
        &run_agent(&env, &addr, &disk, "agent"),
        "agent run after a kill",
    );
    let copy = env.path("copy.img");
    fs::copy(&disk, &copy).unwrap();
    srv.stop();
    check_points(&env, &[copy]);
}

#[test]
fn a_small_cache_turns_into_backpressure_not_loss() {
    let env = Env::new();
    let store = env.store().display().to_string();
    let (addr, mut srv) = serve_and_register(&env, |addr| {
        Server::start_sized(&env, addr, &store, &[], "16MiB")
    });
    let size = 96 << 20;
    let disk = env.path("disk.img");
    let mut rng = Rng(77);
    make_image(&disk, &mut rng, size);
    ok(&run_agent(&env, &addr, &disk, "agent"), "agent run");
    let copy = env.path("copy.img");
    fs::copy(&disk, &copy).unwrap();
    let log = srv.log_text();
    // The credit watermark, not the cache's own quota block, must be what held the agent back.
    assert!(
        log.contains("cache above its high watermark: pausing credit"),
        "credit was never paused at the high watermark: {log}"
    );
    srv.stop();
    check_points(&env, &[copy]);
}

/// Restores the latest point of `vm` (its disk `disk`) from `store` with `--verify` and compares it
/// with `copy`.
fn latest_is(env: &Env, store: &Path, vm: &str, disk: &str, copy: &Path) {
    let out = env.path(&format!("restored-{vm}-{disk}.img"));
    let o = ferry()
        .args(["restore", "--point", "latest", "--force", "--verify"])
        .args(["--vm", vm, "--disk", disk])
        .arg("--store")
        .arg(store)
        .arg("--key-file")
        .arg(env.key())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    ok(&o, &format!("restore of {vm}/{disk}"));
    assert!(
        same_bytes(&out, copy),
        "the latest point of {vm}/{disk} is not the disk as it was"
    );
}

/// Issue 7 §3: an agent's chunk maps describe what one store holds for one VM. Renamed VM, and then
/// a rebuilt appliance (new state, new store): each time the agent learns from the server's
/// `Holding` that it holds nothing of the disk and sends every chunk; no point restores zeros.
#[test]
fn a_renamed_vm_and_a_rebuilt_appliance_get_every_chunk_again() {
    let env = Env::new();
    let (addr, mut srv) = serve_and_register(&env, |addr| Server::start(&env, addr));
    let size = 64 << 20;
    let disk = env.path("disk.img");
    let mut rng = Rng(77);
    make_image(&disk, &mut rng, size);
    ok(&run_agent(&env, &addr, &disk, "agent"), "first run");
    // The same machine, now protected as "web02" (hostname change, or --vm changed).
    mutate(&disk, &mut rng, size);
    let o = agent_cmd_vm(&env, &addr, &disk, "agent", "web02")
        .output()
        .unwrap();
    ok(&o, "run as web02");
    let copy = env.path("copy-web02.img");
    fs::copy(&disk, &copy).unwrap();
    latest_is(&env, &env.store(), "web02", "disk", &copy);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        log.contains("the map describes VM 'web01', this agent now protects VM 'web02'"),
        "{log}"
    );
    srv.stop();

    // A rebuilt appliance: a new state directory, store and cache; the agent registers again.
    let store2 = env.path("store2");
    let mut c2 = ferry();
    c2.args(["serve", "--cache-size", "256MiB"])
        .arg("--store")
        .arg(&store2)
        .arg("--key-file")
        .arg(env.key())
        .arg("--cache-dir")
        .arg(env.path("ps2-cache"))
        .arg("--state-dir")
        .arg(env.path("ps2-state"));
    let (mut srv2, addr2) = spawn_serve(c2, Some("127.0.0.1:0"), &env.path("serve2.log"));
    let pass2 = passphrase_file(&env, &env.path("ps2-state"), "pass2.txt");
    ok(
        &register(&env, &addr2, &pass2, "agent"),
        "register with the new appliance",
    );
    mutate(&disk, &mut rng, size);
    let o = agent_cmd_vm(&env, &addr2, &disk, "agent", "web02")
        .output()
        .unwrap();
    ok(&o, "run against the rebuilt appliance");
    let copy2 = env.path("copy-rebuilt.img");
    fs::copy(&disk, &copy2).unwrap();
    latest_is(&env, &store2, "web02", "disk", &copy2);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        log.contains("the process server now replicates to store"),
        "{log}"
    );
    srv2.term();
}

/// Issue 7 §3: disks are replicated by identity, not by name. Two image files swap names between
/// runs (as `sdb` and `sdc` can across a reboot): each keeps its replica, and each replica's
/// latest point is the disk it has always been.
#[test]
fn disks_that_swap_names_keep_their_replicas() {
    let env = Env::new();
    let (addr, mut srv) = serve_and_register(&env, |addr| Server::start(&env, addr));
    let size = 16 << 20;
    let (os, data) = (env.path("os.img"), env.path("data.img"));
    let mut rng = Rng(5);
    make_image(&os, &mut rng, size);
    make_image(&data, &mut rng, size);
    let two = |a: &Path, b: &Path| {
        let mut c = Command::new(agent_bin());
        c.env("FERRY_LOG", "info")
            .args(["--server", &addr, "--vm", "web01", "--once", "--disk"])
            .arg(a)
            .arg("--disk")
            .arg(b)
            .arg("--state-dir")
            .arg(env.path("agent"));
        c.output().unwrap()
    };
    ok(&two(&os, &data), "first run");
    // Swap the names: os.img is now the data disk and data.img the OS disk.
    let tmp = env.path("swap.img");
    fs::rename(&os, &tmp).unwrap();
    fs::rename(&data, &os).unwrap();
    fs::rename(&tmp, &data).unwrap();
    // The (old) OS disk, now called data.img, changes.
    mutate(&data, &mut rng, size);
    let o = two(&os, &data);
    ok(&o, "run after the swap");
    let (copy_os, copy_data) = (env.path("copy-os.img"), env.path("copy-data.img"));
    fs::copy(&data, &copy_os).unwrap();
    fs::copy(&os, &copy_data).unwrap();
    srv.stop();
    // Replica "os" is still the OS disk (now data.img), replica "data" the data disk.
    latest_is(&env, &env.store(), "web01", "os", &copy_os);
    latest_is(&env, &env.store(), "web01", "data", &copy_data);
    // Both keep their maps: the swap cost no full resend.
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(!log.contains("every chunk is read and sent again"), "{log}");
    assert!(
        log.contains("keeps its replica") || log.contains("named after its identity"),
        "{log}"
    );
}

fn admin(env: &Env, args: &[&str]) -> Output {
    ferry()
        .args(args)
        .arg("--state-dir")
        .arg(env.path("ps-state"))
        .output()
        .unwrap()
}

fn admin_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let o = admin(env, args);
    ok(&o, &args.join(" "));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Issue 8, as an operator: a VM belongs to the agent that first replicated it; a second
/// machine using the same --vm name is refused (and told what to do); `ferry vms move` hands the
/// VM to the rebuilt machine's agent; `ferry agents revoke` locks the old one out; `ferry agents
/// list` / `ferry vms list` show it all. Real `ferry serve`, `ferry-agent` and `ferry` processes.
#[test]
fn operators_own_move_and_revoke_with_the_cli() {
    let env = Env::new();
    let (addr, mut srv) = serve_and_register(&env, |addr| Server::start(&env, addr));
    let size = 8 << 20;
    let (d1, d2) = (env.path("one.img"), env.path("two.img"));
    let mut rng = Rng(0x0a1e);
    make_image(&d1, &mut rng, size);
    make_image(&d2, &mut rng, size);
    ok(&run_agent(&env, &addr, &d1, "agent"), "first agent");
    let agents = admin_json(&env, &["agents", "list", "--json"]);
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    let id1 = agents[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(agents[0]["vms"], serde_json::json!(["web01"]), "{agents}");

    // A second machine with the same --vm name: refused, whether or not the owner is connected.
    let pass = passphrase_file(&env, &env.path("ps-state"), "pass2.txt");
    ok(
        &register(&env, &addr, &pass, "agent2"),
        "register the second agent",
    );
    let o = run_agent(&env, &addr, &d2, "agent2");
    assert!(!o.status.success(), "a second agent replicated web01");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("belongs to another agent")
            && err.contains("ferry vms move web01")
            && !err.contains(&id1),
        "{err}"
    );
    let agents = admin_json(&env, &["agents", "list", "--json"]);
    let id2 = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .find(|i| *i != id1)
        .unwrap();

    // Mistakes: an unknown agent, a wrong state directory.
    let o = admin(
        &env,
        &[
            "vms",
            "move",
            "web01",
            "--to",
            "00112233445566778899aabbccddeeff",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no registered agent"));
    let o = ferry()
        .args(["agents", "list", "--state-dir"])
        .arg(env.path("no-such-dir"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a process server state directory"));

    // The operator moves web01 to the rebuilt machine's agent: it replicates, the old one cannot.
    ok(
        &admin(&env, &["vms", "move", "web01", "--to", &id2]),
        "vms move",
    );
    let vms = admin_json(&env, &["vms", "list", "--json"]);
    assert_eq!(
        (vms[0]["vm"].as_str(), vms[0]["owner"].as_str()),
        (Some("web01"), Some(id2.as_str())),
        "{vms}"
    );
    ok(
        &run_agent(&env, &addr, &d2, "agent2"),
        "the new owner replicates",
    );
    // The rebuilt machine's disk is another disk (another identity): its own replica.
    latest_is(&env, &env.store(), "web01", "two", &d2);
    let o = run_agent(&env, &addr, &d1, "agent");
    assert!(
        !o.status.success(),
        "the former owner still replicated web01"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("code 9"), "{err}");

    // Revoked: the old agent cannot even log in; the list shows one agent.
    ok(&admin(&env, &["agents", "revoke", &id1]), "agents revoke");
    // Past the server's next look at its state directory (every 250 ms).
    std::thread::sleep(Duration::from_millis(600));
    let o = agent_cmd_vm(&env, &addr, &d1, "agent", "other01")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown agent"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let agents = admin_json(&env, &["agents", "list", "--json"]);
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    let o = admin(&env, &["agents", "revoke", &id1]);
    assert_eq!(o.status.code(), Some(2), "revoking twice says so");

    // A one-time enrollment token for web01: a third machine registers with it (no passphrase)
    // and takes web01 over; the token does not work twice; an expired one never.
    let o = admin(
        &env,
        &["agents", "token", "--vm", "web01", "--expires", "1h"],
    );
    ok(&o, "agents token");
    let token = env.path("token.txt");
    fs::write(&token, &o.stdout).unwrap();
    ok(
        &register(&env, &addr, &token, "agent3"),
        "register with the token",
    );
    let o = register(&env, &addr, &token, "agent4");
    assert!(!o.status.success(), "a token worked twice");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already used or expired"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let d3 = env.path("three.img");
    make_image(&d3, &mut rng, size);
    std::thread::sleep(Duration::from_millis(600));
    ok(
        &run_agent(&env, &addr, &d3, "agent3"),
        "the token's agent replicates web01",
    );
    latest_is(&env, &env.store(), "web01", "three", &d3);
    // The token's agent replicates its VM only: another, unowned name is refused (code 9).
    let o = agent_cmd_vm(&env, &addr, &d3, "agent3", "other01")
        .output()
        .unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("enrolled with a token"),
        "a token's agent claimed another VM: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run_agent(&env, &addr, &d2, "agent2");
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("code 9"),
        "the token took web01 from agent2: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = admin(
        &env,
        &["agents", "token", "--vm", "web02", "--expires", "1s"],
    );
    ok(&o, "agents token (short)");
    fs::write(&token, &o.stdout).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let o = register(&env, &addr, &token, "agent5");
    assert!(!o.status.success(), "an expired token worked");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already used or expired"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    srv.stop();
}

/// Issue 8, quarantine: a VM whose stored journal cannot be applied (here: the index of its newest
/// segment rots on disk while the server is stopped) is quarantined at the next start instead of
/// stopping the server; the other VM replicates and restores exactly meanwhile; the VM's agent is
/// refused (and keeps retrying) until `ferry vms release`, after which it replicates again and
/// its newest point restores exactly. Real `ferry serve`, two real agents, the operator's CLI.
#[test]
fn a_vm_whose_journal_rots_is_quarantined_alone_and_released_by_the_operator() {
    let env = Env::new();
    let (addr, mut srv) = serve_and_register(&env, |addr| Server::start(&env, addr));
    let pass = passphrase_file(&env, &env.path("ps-state"), "pass-b.txt");
    ok(&register(&env, &addr, &pass, "agent-b"), "register agent b");
    let size = 16 << 20;
    let (good, bad) = (env.path("good.img"), env.path("bad.img"));
    let mut rng = Rng(0x9a4a);
    make_image(&good, &mut rng, size);
    make_image(&bad, &mut rng, size);
    ok(&run_agent(&env, &addr, &good, "agent"), "web01's first run");
    let bad_run = |env: &Env| agent_cmd_vm(env, &addr, &bad, "agent-b", "bad01");
    ok(&bad_run(&env).output().unwrap(), "bad01's first run");
    srv.stop();

    // The rot: the last bytes (the sealed index) of bad01's newest segment, which the next start
    // reads again (its applied position is inside it).
    let jdir = env.store().join("journal").join("bad01");
    let disk_dir = fs::read_dir(&jdir).unwrap().next().unwrap().unwrap().path();
    let mut segs: Vec<PathBuf> = fs::read_dir(&disk_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let newest = segs.last().unwrap();
    let mut bytes = fs::read(newest).unwrap();
    let n = bytes.len();
    bytes[n - 8] ^= 0xff;
    fs::write(newest, &bytes).unwrap();

    let mut srv = Server::start(&env, &addr);
    srv.proc
        .wait_log("the quarantine", Duration::from_secs(30), |l| {
            (l.contains("VM quarantined") && l.contains("bad01")).then_some(())
        });
    let vm = |st: &serde_json::Value, name: &str| {
        st["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {st}"))
    };
    // The status file is rewritten every second.
    let t = std::time::Instant::now();
    let st = loop {
        let st = status_json(&env);
        if vm(&st, "bad01")["state"] == "quarantined" || t.elapsed() > Duration::from_secs(10) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(vm(&st, "bad01")["state"], "quarantined", "{st}");
    let why = vm(&st, "bad01")["quarantine"].as_str().unwrap().to_owned();
    assert!(
        why.contains("segment") || why.contains(&*newest.to_string_lossy()),
        "{why}"
    );
    let listed = admin_json(&env, &["vms", "list", "--json"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["vm"] == "bad01" && v["quarantine"].is_string()),
        "{listed}"
    );

    // The other VM goes on, exactly.
    mutate(&good, &mut rng, size);
    ok(
        &run_agent(&env, &addr, &good, "agent"),
        "web01 while bad01 is quarantined",
    );
    let disk_name = |vm: &str| {
        let m: serde_json::Value = serde_json::from_slice(
            &fs::read(env.store().join("manifests").join(format!("{vm}.json"))).unwrap(),
        )
        .unwrap();
        m["disks"]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone()
    };
    latest_is(&env, &env.store(), "web01", &disk_name("web01"), &good);

    // bad01's agent is refused as quarantined, and keeps trying.
    mutate(&bad, &mut rng, size);
    let copy = env.path("bad-copy.img");
    fs::copy(&bad, &copy).unwrap();
    let mut agent = common::Proc::spawn(bad_run(&env), &env.path("agent-b.log"));
    srv.proc
        .wait_log("the refusal", Duration::from_secs(30), |l| {
            (l.contains("refused") && l.contains("quarantined")).then_some(())
        });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        agent.exited().is_none(),
        "a quarantined VM's agent keeps retrying"
    );

    // Release: the server takes the VM back; the agent finishes its run; the point is exact.
    let o = admin(&env, &["vms", "release", "bad01"]);
    ok(&o, "ferry vms release");
    let st = agent.wait().unwrap();
    assert!(
        st.success(),
        "agent after the release: {}",
        agent.log_text()
    );
    let log = srv.proc.own_log();
    assert!(log.contains("VM released from quarantine"), "{log}");
    latest_is(&env, &env.store(), "bad01", &disk_name("bad01"), &copy);
    let t = std::time::Instant::now();
    while vm(&status_json(&env), "bad01")["quarantine"] != serde_json::Value::Null {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still quarantined in the status"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = admin(&env, &["vms", "release", "bad01"]);
    assert!(!again.status.success(), "released twice");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not quarantined"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // And a restart finds nothing quarantined.
    srv.stop();
    let mut srv = Server::start(&env, &addr);
    mutate(&bad, &mut rng, size);
    ok(&bad_run(&env).output().unwrap(), "bad01 after a restart");
    latest_is(&env, &env.store(), "bad01", &disk_name("bad01"), &bad);
    assert!(!srv.proc.own_log().contains("quarantined"));
    srv.stop();
}

/// Issue 8, agent credentials: an agent registered before keys (an identity file with a
/// credential; the server holding only its verifier) moves to a key at its first connection: the
/// real `ferry-agent` replicates, its identity file then holds a key and no credential, and the
/// server's registry only the public key.
#[test]
fn an_agent_registered_with_a_credential_moves_to_a_key() {
    let env = Env::new();
    // The legacy registration is on disk before the server starts (it reads it then).
    let control = ferry_serve::control::Control::new(&env.path("ps-state"));
    let (id, cred) = {
        let _l = control.lock().unwrap();
        control
            .registry()
            .unwrap()
            .register_legacy("old01")
            .unwrap()
    };
    let srv = Server::start(&env, "127.0.0.1:0");
    let pass = passphrase_file(&env, &env.path("ps-state"), "pass.txt");
    let fp = fs::read_to_string(&pass).unwrap();
    let fp: ferry_wire::Passphrase = fp.trim().parse().unwrap();
    fs::create_dir_all(env.path("agent")).unwrap();
    let ident = env.path("agent").join("agent.json");
    fs::write(
        &ident,
        format!(
            r#"{{"version":1,"server":"{}","agent_id":"{id}","credential":"{}","fingerprint":"{}"}}"#,
            srv.addr,
            hex::encode(cred.expose()),
            fp.fingerprint
        ),
    )
    .unwrap();
    let disk = env.path("disk.img");
    make_image(&disk, &mut Rng(5), 4 << 20);
    ok(
        &run_agent(&env, &srv.addr, &disk, "agent"),
        "the legacy agent's run",
    );
    let text = fs::read_to_string(&ident).unwrap();
    assert!(
        text.contains("\"version\": 2") && text.contains("\"key\""),
        "{text}"
    );
    assert!(!text.contains("credential"), "{text}");
    let reg = fs::read_to_string(env.path("ps-state").join("agents.json")).unwrap();
    assert!(
        reg.contains("public_key") && !reg.contains("verifier"),
        "{reg}"
    );
    // And it goes on with the key alone.
    ok(
        &run_agent(&env, &srv.addr, &disk, "agent"),
        "the agent's second run",
    );
}
