//! The appliance (docs/APPLIANCE.md): `ferry appliance configure` on a scratch root, the master
//! key's export and import, racing first starts, and the whole OVA: built by
//! appliance-image/build, checked (descriptor, manifest, disks), booted under QEMU (TCG) with a
//! NoCloud volume and forwarded ports, an agent installed from its download page's package,
//! registered through it, a loop disk protected, points cut and restored exactly from the store
//! the appliance writes (Azurite on the host).
//!
//! The OVA test needs root, debootstrap and a Debian mirror once per machine (the base is cached
//! in /var/cache/ferry-appliance), QEMU, dosfstools, mtools, syslinux, xmllint, curl and Azurite;
//! it skips loudly otherwise, and fails instead when FERRY_REQUIRE_APPLIANCE_TEST=1 (scripts/test
//! as root). Cost here: build ~35 s with the base cached (~1.5 min more without), boot ~25-60 s.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{agent_bin, ferry, ok, same_bytes, write_random, Env, Proc, Rng};
use ferry_testkit::loopdev::Loop;
use ferry_testkit::sys::{missing, Need};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn configure(root: &Path, args: &[&str]) -> Output {
    ferry()
        .args(["appliance", "configure", "--root"])
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

const KEY_A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

#[test]
fn configure_writes_the_appliance_files_and_a_bad_setting_changes_nothing() {
    let env = Env::new();
    let root = env.path("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(
        root.join("etc/shadow"),
        "root::0:0:99999:7:::\nferry:!:20000::::::\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nferry:x:4242:\n").unwrap();
    let cid = env.path("cidata");
    fs::create_dir_all(&cid).unwrap();
    fs::write(
        cid.join("meta-data"),
        "instance-id: i-1\nlocal-hostname: ps07\n",
    )
    .unwrap();
    fs::write(
        cid.join("user-data"),
        format!(
            "#cloud-config\nferry:\n  store: azure://acct/replicas\n  azure_sas_token: \"sv=2024&sig=a%2Fb\"\n  cache_size: 8GiB\n  retention: 7d\n  throttle_ingest: 'mon-fri 08:00-18:00 20MiB/s; * unlimited'\n  master_key: {KEY_A}\n  root_password_hash: '$6$abc$def'\n"
        ),
    )
    .unwrap();
    fs::write(
        cid.join("network-config"),
        "version: 2\nethernets:\n  en:\n    match: {name: 'en*'}\n    addresses: [192.0.2.10/24]\n    gateway4: 192.0.2.1\n    nameservers: {addresses: [192.0.2.53]}\n",
    )
    .unwrap();
    let o = configure(&root, &["--nocloud", cid.to_str().unwrap(), "--json"]);
    ok(&o, "configure");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["master_key"], "imported");
    assert_eq!(v["settings"]["azure_sas_token"], "(set)");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("sig=")
            && !String::from_utf8_lossy(&o.stdout).contains(KEY_A),
        "secrets never printed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // ferry.toml: what ferry serve reads, and `ferry serve` itself accepts it (a dry check through
    // the same parser: ferry_job::serve_config).
    let toml = fs::read_to_string(root.join("etc/ferry/ferry.toml")).unwrap();
    let parsed = ferry_job::serve_config::parse_file_config(&toml).unwrap();
    assert_eq!(parsed.serve.store.as_deref(), Some("azure://acct/replicas"));
    assert_eq!(parsed.serve.cache_size, Some(8 << 30));
    assert_eq!(parsed.serve.retention, Some(Duration::from_secs(7 * 86400)));
    assert_eq!(
        parsed.serve.key_file.as_deref(),
        Some(Path::new("/var/lib/ferry/master.key"))
    );
    assert_eq!(
        parsed.serve.throttle_ingest.as_deref(),
        Some("mon-fri 08:00-18:00 20MiB/s; * unlimited")
    );
    assert_eq!(mode(&root.join("etc/ferry/ferry.toml")), 0o640);
    let env_file = root.join("etc/ferry/serve.env");
    assert_eq!(mode(&env_file), 0o600);
    assert_eq!(
        fs::read_to_string(&env_file)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
        "AZURE_STORAGE_SAS_TOKEN=\"sv=2024&sig=a%2Fb\""
    );
    let net = fs::read_to_string(root.join("etc/systemd/network/10-ferry-0.network")).unwrap();
    assert!(
        net.ends_with("[Match]\nName=en*\n\n[Network]\nAddress=192.0.2.10/24\nGateway=192.0.2.1\nDNS=192.0.2.53\n"),
        "{net}"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "ps07\n"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/shadow")).unwrap(),
        "root:$6$abc$def::0:99999:7:::\nferry:!:20000::::::\n"
    );
    let key = root.join("var/lib/ferry/master.key");
    assert_eq!(fs::read_to_string(&key).unwrap().trim(), KEY_A);
    assert_eq!(mode(&key), 0o600);
    assert!(
        root.join("var/lib/ferry/master.key.exported").exists(),
        "a key from the settings has a copy outside: no backup reminder"
    );
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(root.join("etc/ferry/ferry.toml"))
                .unwrap()
                .gid(),
            4242,
            "ferry.toml belongs to the group ferry (ferry serve reads it)"
        );
    }

    // Every boot again: the same files, the key "already in place".
    let o = configure(&root, &["--nocloud", cid.to_str().unwrap(), "--json"]);
    ok(&o, "configure again");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["master_key"], "already in place");
    assert_eq!(
        fs::read_to_string(root.join("etc/ferry/ferry.toml")).unwrap(),
        toml
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/systemd/network/10-ferry-0.network")).unwrap(),
        net
    );

    // A bad setting: exit 2 naming it, and no file changes (ferry.toml keeps the good settings).
    let before: Vec<(PathBuf, Vec<u8>)> = [
        "etc/ferry/ferry.toml",
        "etc/ferry/serve.env",
        "etc/hostname",
    ]
    .iter()
    .map(|p| (root.join(p), fs::read(root.join(p)).unwrap()))
    .collect();
    let ud = fs::read_to_string(cid.join("user-data")).unwrap();
    for (good, bad, named) in [
        ("cache_size: 8GiB", "cache_size: plenty", "cache_size"),
        ("retention: 7d", "retention: forever", "retention"),
        (
            "throttle_ingest: 'mon-fri",
            "throttle_ingest: 'mon-fry",
            "throttle_ingest",
        ),
        (KEY_A, "ffff", "master_key"),
        (
            "store: azure://acct/replicas",
            "store: azure://acct",
            "store",
        ),
    ] {
        assert!(ud.contains(good), "{good}");
        fs::write(cid.join("user-data"), ud.replace(good, bad)).unwrap();
        let o = configure(&root, &["--nocloud", cid.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(named), "{bad}: {err}");
        for (p, b) in &before {
            assert_eq!(
                &fs::read(p).unwrap(),
                b,
                "{} changed by a bad setting",
                p.display()
            );
        }
    }
    // A failure found while rendering (no root entry in shadow): exit 1, nothing written.
    let shadow = fs::read(root.join("etc/shadow")).unwrap();
    fs::write(root.join("etc/shadow"), "daemon:*:1::::::\n").unwrap();
    fs::write(
        cid.join("user-data"),
        ud.replace("retention: 7d", "retention: 9d"),
    )
    .unwrap();
    let o = configure(&root, &["--nocloud", cid.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("no root entry"));
    for (p, b) in &before {
        assert_eq!(
            &fs::read(p).unwrap(),
            b,
            "{} changed by a failed configure",
            p.display()
        );
    }
    fs::write(root.join("etc/shadow"), shadow).unwrap();
    // Another key in the cidata while one is in place: refused, the key file unchanged.
    fs::write(cid.join("user-data"), ud.replace(KEY_A, &"e".repeat(64))).unwrap();
    let o = configure(&root, &["--nocloud", cid.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to replace"));
    assert_eq!(fs::read_to_string(&key).unwrap().trim(), KEY_A);

    // No settings source: the operator's edits stay; a fresh root gets the defaults.
    fs::write(
        root.join("etc/ferry/ferry.toml"),
        "[serve]\nstore = \"/srv/mine\"\n",
    )
    .unwrap();
    ok(&configure(&root, &[]), "configure without a source");
    assert_eq!(
        fs::read_to_string(root.join("etc/ferry/ferry.toml")).unwrap(),
        "[serve]\nstore = \"/srv/mine\"\n"
    );
    let fresh = env.path("fresh");
    fs::create_dir_all(&fresh).unwrap();
    ok(
        &configure(&fresh, &["--cache-fs", "/"]),
        "configure a fresh root",
    );
    let toml = fs::read_to_string(fresh.join("etc/ferry/ferry.toml")).unwrap();
    assert!(toml.contains("store = \"/var/lib/ferry/store\""), "{toml}");
    assert!(toml.contains("metrics_listen = \"0.0.0.0:9464\""), "{toml}");
    assert!(
        fs::read_to_string(fresh.join("etc/systemd/network/10-ferry-dhcp.network"))
            .unwrap()
            .contains("DHCP=ipv4")
    );
    assert!(!fresh.join("etc/ferry/serve.env").exists());
}

#[test]
fn key_export_then_import_round_trips_and_never_replaces_another_key() {
    let env = Env::new();
    let key = env.path("master.key");
    // A key made the usual way: by the first replicate into a new store.
    let img = env.path("d.img");
    fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    env.replicate_ok(&[&img], &[]);
    let o = ferry()
        .args(["key", "export", "--key-file"])
        .arg(&key)
        .output()
        .unwrap();
    ok(&o, "key export");
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.starts_with("# Ferry master key (id "), "{text}");
    assert_eq!(
        text.lines().last().unwrap(),
        fs::read_to_string(&key).unwrap().trim(),
        "the export holds the key"
    );
    let marker = env.path("master.key.exported");
    assert!(fs::read_to_string(&marker).unwrap().contains("exported at"));
    let saved = env.path("backup.txt");
    fs::write(&saved, &text).unwrap();

    // The appliance is lost with its key: the key file from the export reads the store exactly.
    fs::rename(&key, env.path("lost.key")).unwrap();
    let key2 = key.clone();
    let o = ferry()
        .args(["key", "import"])
        .arg(&saved)
        .arg("--key-file")
        .arg(&key2)
        .output()
        .unwrap();
    ok(&o, "key import");
    assert_eq!(mode(&key2), 0o600);
    let pts = env.points();
    let id = pts[0]["id"].as_str().unwrap();
    let out = env.path("restored.img");
    let o = env.restore(id, &out, &[]);
    ok(&o, "restore with the imported key");
    assert!(same_bytes(&out, &img));

    // --out: a new 0600 file, never overwriting.
    let o = ferry()
        .args(["key", "export", "--key-file"])
        .arg(&key)
        .arg("--out")
        .arg(&saved)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "an existing --out file is refused"
    );
    let o2 = env.path("second.txt");
    ok(
        &ferry()
            .args(["key", "export", "--key-file"])
            .arg(&key)
            .arg("--out")
            .arg(&o2)
            .output()
            .unwrap(),
        "key export --out",
    );
    assert_eq!(mode(&o2), 0o600);

    // Importing another key over one in place: refused, nothing changed.
    let other = env.path("other.txt");
    fs::write(&other, format!("# another\n{}\n", "a".repeat(64))).unwrap();
    let before = fs::read(&key2).unwrap();
    let o = ferry()
        .args(["key", "import"])
        .arg(&other)
        .arg("--key-file")
        .arg(&key2)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to replace"));
    assert_eq!(fs::read(&key2).unwrap(), before);
    // Not a key at all.
    fs::write(&other, "hello\n").unwrap();
    let o = ferry()
        .args(["key", "import"])
        .arg(&other)
        .arg("--key-file")
        .arg(env.path("k3"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("64 hex digits"));
    assert!(!env.path("k3").exists());
    // Exporting a key that is not there.
    let o = ferry()
        .args(["key", "export", "--key-file"])
        .arg(env.path("nope.key"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
}

/// Registers the agent in ENV/agent at `addr` with `passphrase`; the fingerprint it pinned.
fn register(env: &Env, addr: &str, passphrase: &str) -> String {
    let pass = env.path("pass.txt");
    fs::write(&pass, format!("{}\n", passphrase.trim())).unwrap();
    common::register_with(env, addr, &pass, "agent");
    let id: serde_json::Value =
        serde_json::from_slice(&fs::read(env.path("agent/agent.json")).unwrap()).unwrap();
    id["fingerprint"].as_str().unwrap().to_string()
}

/// A first `ferry serve` and several `ferry passphrase show` racing on an empty state directory
/// agree on one identity: every passphrase printed is the one the server uses, and an agent
/// registers with it.
#[test]
fn racing_first_starts_agree_on_one_identity() {
    // The shows start 0-15 ms after the server, from another thread: some before it creates the
    // identity, some while it does, some after.
    for (round, delay_ms) in [0u64, 2, 5, 15].into_iter().enumerate() {
        let env = Env::new();
        let state = env.path("ps-state");
        let shows = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            let children: Vec<std::process::Child> = (0..6)
                .map(|_| {
                    ferry()
                        .args(["passphrase", "show", "--state-dir"])
                        .arg(&state)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            children
                .into_iter()
                .map(|c| c.wait_with_output().unwrap())
                .collect::<Vec<_>>()
        });
        let (mut srv, addr) = common::spawn_serve(
            common::serve_cmd(&env, "64MiB"),
            Some("127.0.0.1:0"),
            &env.path("serve.log"),
        );
        let mut seen = Vec::new();
        for o in shows.join().unwrap() {
            ok(&o, "passphrase show racing the first start");
            seen.push(String::from_utf8(o.stdout).unwrap());
        }
        // What the server itself serves: the passphrase it loads now is the one printed.
        let o = ferry()
            .args(["passphrase", "show", "--state-dir"])
            .arg(env.path("ps-state"))
            .output()
            .unwrap();
        ok(&o, "passphrase show after the start");
        seen.push(String::from_utf8(o.stdout).unwrap());
        seen.dedup();
        assert_eq!(
            seen.len(),
            1,
            "round {round}: different passphrases: {seen:?}"
        );
        let pinned = register(&env, &addr, &seen[0]);
        let o = ferry()
            .args(["passphrase", "show", "--fingerprint", "--state-dir"])
            .arg(env.path("ps-state"))
            .output()
            .unwrap();
        ok(&o, "passphrase show --fingerprint");
        assert_eq!(
            String::from_utf8(o.stdout).unwrap().trim(),
            pinned,
            "the fingerprint shown is the certificate the agent pinned"
        );
        srv.term();
    }
}

// --- The OVA -------------------------------------------------------------------------------------

const TEST: &str = "the_ova_boots_into_a_process_server_that_replicates_and_restores_exactly";
const REQUIRE: &str = "FERRY_REQUIRE_APPLIANCE_TEST";

fn sh_ok(cmd: &str) -> String {
    let o = Command::new("bash").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every attribute `name="…"` of the element lines holding `elem` in `xml`, in order.
fn attrs(xml: &str, elem: &str, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&format!("<{elem} ")) {
        let tag = &rest[i..];
        let end = tag.find('>').unwrap();
        let tag = &tag[..end];
        if let Some(j) = tag.find(&format!(" {name}=\"")) {
            let v = &tag[j + name.len() + 3..];
            out.push(v[..v.find('"').unwrap()].to_string());
        }
        rest = &rest[i + end..];
    }
    out
}

/// The OVA's structure: the descriptor first, then the manifest; every referenced file present
/// with its size; the manifest's digests right; each disk's capacity what the VMDK holds; the
/// ProductSection's properties exactly the appliance's settings. The two VMDKs' paths.
fn check_ova(ova: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let list = sh_ok(&format!("tar -tf {}", ova.display()));
    let names: Vec<&str> = list.lines().collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(
        names[0].ends_with(".ovf") && names[1].ends_with(".mf"),
        "{names:?}"
    );
    sh_ok(&format!("tar -C {} -xf {}", dir.display(), ova.display()));
    let ovf_path = dir.join(names[0]);
    sh_ok(&format!("xmllint --noout {}", ovf_path.display()));
    let ovf = fs::read_to_string(&ovf_path).unwrap();
    assert!(ovf.contains("<Envelope") && ovf.contains("ovf:version=\"1.0\""));
    let hrefs = attrs(&ovf, "File", "ovf:href");
    let sizes = attrs(&ovf, "File", "ovf:size");
    assert_eq!(hrefs.len(), 2, "{hrefs:?}");
    for (h, s) in hrefs.iter().zip(&sizes) {
        assert_eq!(
            fs::metadata(dir.join(h)).unwrap().len().to_string(),
            *s,
            "{h}: size in the descriptor"
        );
    }
    let mf = fs::read_to_string(dir.join(names[1])).unwrap();
    let mut listed = 0;
    for line in mf.lines() {
        let (f, d) = line
            .strip_prefix("SHA256(")
            .and_then(|l| l.split_once(")= "))
            .unwrap_or_else(|| panic!("manifest line {line:?}"));
        let got = sh_ok(&format!("sha256sum {}", dir.join(f).display()));
        assert_eq!(got.split_whitespace().next().unwrap(), d, "{f}: digest");
        listed += 1;
    }
    assert_eq!(listed, 3, "the descriptor and both disks: {mf}");
    // Capacities: what qemu-img reads from each VMDK.
    let caps = attrs(&ovf, "Disk", "ovf:capacity");
    let units = attrs(&ovf, "Disk", "ovf:capacityAllocationUnits");
    for ((h, c), u) in hrefs.iter().zip(&caps).zip(&units) {
        let info: serde_json::Value = serde_json::from_str(&sh_ok(&format!(
            "qemu-img info --output=json {}",
            dir.join(h).display()
        )))
        .unwrap();
        let shift = match u.as_str() {
            "byte * 2^20" => 20,
            "byte * 2^30" => 30,
            other => panic!("units {other}"),
        };
        assert_eq!(
            info["virtual-size"].as_u64().unwrap(),
            c.parse::<u64>().unwrap() << shift,
            "{h}: capacity"
        );
        assert_eq!(
            info["format-specific"]["data"]["create-type"], "streamOptimized",
            "{h}"
        );
        // A disk of its own, not a child of another (the build fixes the random CID only).
        let head = fs::read(dir.join(h)).unwrap();
        let desc = String::from_utf8_lossy(&head[..head.len().min(64 << 10)]).into_owned();
        assert!(desc.contains("\nparentCID=ffffffff\n"), "{h}: {desc}");
    }
    // The properties: ferry.KEY for every appliance setting, nothing else.
    let mut props: Vec<String> = attrs(&ovf, "Property", "ovf:key")
        .into_iter()
        .map(|k| k.strip_prefix("ferry.").expect("ferry.KEY").to_string())
        .collect();
    props.sort();
    let mut keys: Vec<String> = ferry_job::appliance::KEYS
        .iter()
        .map(|(k, _)| k.to_string())
        .collect();
    keys.sort();
    assert_eq!(
        props, keys,
        "the OVF properties are the appliance's settings"
    );
    (dir.join(&hrefs[0]), dir.join(&hrefs[1]))
}

fn http(url: &str) -> Option<Vec<u8>> {
    let o = Command::new("curl")
        .args(["-sf", "--max-time", "10", url])
        .output()
        .ok()?;
    o.status.success().then_some(o.stdout)
}

/// Boots the appliance: TCG, 2 vCPUs, virtio disks, the OVF's E1000 NIC, the agent, metrics and
/// download ports forwarded; the settings on a NoCloud volume (a `.img`) or, as VMware gives an
/// OVF environment, on an ISO in the CD-ROM drive (a `.iso`). A port taken between picking and binding makes QEMU fail at once:
/// pick again.
fn boot(
    env: &Env,
    os: &Path,
    cache: &Path,
    cidata: &Path,
    serial: &Path,
) -> (Proc, (u16, u16, u16)) {
    for _ in 0..3 {
        let ports = (free_port(), free_port(), free_port());
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", "tcg", "-m", "2048", "-smp", "2", "-display", "none"])
            .args(["-monitor", "none", "-no-reboot", "-serial"])
            .arg(format!("file:{}", serial.display()))
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if=virtio", os.display()))
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if=virtio", cache.display()))
            .args(if cidata.extension().is_some_and(|e| e == "iso") {
                vec!["-cdrom".to_string(), cidata.display().to_string()]
            } else {
                vec![
                    "-drive".to_string(),
                    format!("file={},format=raw,if=virtio,readonly=on", cidata.display()),
                ]
            })
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:7443,hostfwd=tcp:127.0.0.1:{}-:9464,hostfwd=tcp:127.0.0.1:{}-:8080",
                ports.0, ports.1, ports.2
            ))
            .args(["-device", "e1000,netdev=n0"]);
        let mut p = Proc::spawn(c, &env.path("qemu.log"));
        std::thread::sleep(Duration::from_secs(2));
        if p.exited().is_none() {
            return (p, ports);
        }
    }
    panic!(
        "qemu did not start: {}",
        fs::read_to_string(env.path("qemu.log")).unwrap_or_default()
    );
}

/// Seconds from `since` until `ferry serve` in the guest answers on its metrics port.
fn wait_healthy(vm: &mut Proc, port: u16, serial: &Path, since: Instant) -> f64 {
    let console =
        || ferry_testkit::proc::strip_ansi(&fs::read_to_string(serial).unwrap_or_default());
    loop {
        if let Some(m) = http(&format!("http://127.0.0.1:{port}/metrics")) {
            if String::from_utf8_lossy(&m).contains("ferry_cache_quota_bytes") {
                return since.elapsed().as_secs_f64();
            }
        }
        assert!(vm.exited().is_none(), "QEMU exited: {}", console());
        assert!(
            since.elapsed() < Duration::from_secs(420),
            "ferry serve in the appliance did not answer within 7 min; serial console:\n{}",
            console()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The registration passphrase the console shows.
fn console_passphrase(serial: &Path, since: Instant) -> String {
    loop {
        let s = ferry_testkit::proc::strip_ansi(&fs::read_to_string(serial).unwrap_or_default());
        if let Some(l) = s
            .lines()
            .find(|l| l.contains("Registration passphrase:") && l.contains("FERRY1-"))
        {
            return l.split_whitespace().last().unwrap().to_string();
        }
        assert!(
            since.elapsed() < Duration::from_secs(480),
            "no passphrase on the console:\n{s}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn the_ova_boots_into_a_process_server_that_replicates_and_restores_exactly() {
    let why = missing(&[
        Need::Root,
        Need::LoopDevices,
        Need::Tool("debootstrap"),
        Need::Tool("qemu-system-x86_64"),
        Need::Tool("qemu-img"),
        Need::Tool("mkfs.vfat"),
        Need::Tool("mcopy"),
        Need::Tool("syslinux"),
        Need::Tool("sfdisk"),
        Need::Tool("xmllint"),
        Need::Tool("curl"),
        Need::Tool("genisoimage"),
    ]);
    if let Some(why) = why {
        ferry_testkit::skip(TEST, &why, REQUIRE);
        return;
    }
    let Some(azurite) = ferry_azure::azurite::Azurite::start_or_skip() else {
        return;
    };
    let env = Env::new();
    let out = env.path("out");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_ferry")).parent().unwrap();
    let t0 = Instant::now();
    let o = Command::new("bash")
        .arg(repo().join("appliance-image/build"))
        .arg("--out")
        .arg(&out)
        .arg("--no-build")
        .arg("--bin-dir")
        .arg(bin_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() && err.contains("debootstrap failed") {
        ferry_testkit::skip(TEST, &format!("no Debian base: {}", err.trim()), REQUIRE);
        return;
    }
    assert!(o.status.success(), "appliance-image/build failed: {err}");
    let build_s = t0.elapsed().as_secs_f64();
    let ova = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let ova_size = fs::metadata(&ova).unwrap().len();
    let deb = fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the agent package next to the OVA");
    let info = fs::read_to_string(ova.with_extension("build.txt")).unwrap();
    // Reproducible: the same inputs (base, binaries, SOURCE_DATE_EPOCH) give the same bytes.
    let out2 = env.path("out2");
    let o = Command::new("bash")
        .arg(repo().join("appliance-image/build"))
        .arg("--out")
        .arg(&out2)
        .arg("--no-build")
        .arg("--bin-dir")
        .arg(bin_dir)
        .output()
        .unwrap();
    ok(&o, "the second build");
    let ova2 = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(
        fs::read(&ova).unwrap() == fs::read(&ova2).unwrap(),
        "two builds from the same inputs differ"
    );
    fs::remove_dir_all(&out2).unwrap();
    assert!(
        info.contains("(BTF: yes)") && info.contains("\n  systemd "),
        "{info}"
    );

    let unpacked = env.path("ova");
    fs::create_dir_all(&unpacked).unwrap();
    let (os_vmdk, cache_vmdk) = check_ova(&ova, &unpacked);
    // What a Proxmox or plain-QEMU operator does: convert the disks.
    let os_base = env.path("os-base.qcow2");
    let cache = env.path("cache.qcow2");
    sh_ok(&format!(
        "qemu-img convert -O qcow2 {} {} && qemu-img convert -O qcow2 {} {} && rm -rf {}",
        os_vmdk.display(),
        os_base.display(),
        cache_vmdk.display(),
        cache.display(),
        unpacked.display()
    ));
    // Each boot's OS disk: a fresh copy of the OVA's (a copy-on-write overlay).
    let fresh_os = |name: &str| {
        let p = env.path(name);
        sh_ok(&format!(
            "qemu-img create -q -f qcow2 -b {} -F qcow2 {}",
            os_base.display(),
            p.display()
        ));
        p
    };

    // The NoCloud volume: the store is Azurite on the host (10.0.2.2 from the guest), the master
    // key an existing one (the host restores with it).
    let container = "appliance";
    let url = format!("azure://devstoreaccount1/{container}");
    let host_cs = azurite.connection_string();
    let guest_cs = host_cs.replace("127.0.0.1", "10.0.2.2");
    assert_ne!(host_cs, guest_cs, "{host_cs}");
    let key_hex = "5eed".repeat(16);
    let key_file = env.path("master.key");
    fs::write(&key_file, format!("{key_hex}\n")).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    let cid = env.path("cid");
    fs::create_dir_all(&cid).unwrap();
    fs::write(cid.join("meta-data"), "instance-id: ferry-test-1\n").unwrap();
    fs::write(
        cid.join("user-data"),
        format!(
            "#cloud-config\nhostname: ps-under-test\nferry:\n  store: {url}\n  azure_connection_string: \"{guest_cs}\"\n  master_key: {key_hex}\n  cache_size: 2GiB\n  azure_allow_http: true\n"
        ),
    )
    .unwrap();
    let cidata = env.path("cidata.img");
    sh_ok(&format!(
        "mkfs.vfat -n CIDATA -C {img} 1024 >/dev/null && MTOOLS_SKIP_CHECK=1 mcopy -i {img} {d}/user-data {d}/meta-data ::/",
        img = cidata.display(),
        d = cid.display()
    ));

    let serial = env.path("serial.log");
    let os = fresh_os("os1.qcow2");
    let (mut vm, ports) = boot(&env, &os, &cache, &cidata, &serial);
    let booted = Instant::now();
    let serial_text =
        || ferry_testkit::proc::strip_ansi(&fs::read_to_string(&serial).unwrap_or_default());
    let healthy = wait_healthy(&mut vm, ports.1, &serial, booted);
    let pass = console_passphrase(&serial, booted);
    let s = serial_text();
    // The key came from the settings: a copy exists outside, so no backup reminder.
    assert!(!s.contains("THE MASTER KEY IS NOT BACKED UP"), "{s}");
    assert!(s.contains("master key: imported"), "{s}");
    assert!(s.contains("settings from: nocloud"), "{s}");
    assert!(s.contains("formatting the blank disk"), "{s}");
    assert!(!s.contains("SETUP FAILED"), "{s}");

    // The download page and the package it serves: the one built, never the passphrase. (The
    // server starts after the banner that wrote the page: it may take a moment more.)
    let asked = Instant::now();
    let page = loop {
        if let Some(p) = http(&format!("http://127.0.0.1:{}/", ports.2)) {
            break String::from_utf8(p).unwrap();
        }
        assert!(
            asked.elapsed() < Duration::from_secs(120),
            "no download page after 2 min; console:\n{}",
            serial_text()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let deb_name = deb.file_name().unwrap().to_str().unwrap();
    let deb_sum = sh_ok(&format!("sha256sum {}", deb.display()));
    let deb_sum = deb_sum.split_whitespace().next().unwrap();
    assert!(page.contains(deb_name) && page.contains(deb_sum), "{page}");
    assert!(
        !page.contains(&pass),
        "the page must not show the passphrase"
    );
    let got = http(&format!("http://127.0.0.1:{}/{deb_name}", ports.2)).expect("the package");
    assert_eq!(
        got,
        fs::read(&deb).unwrap(),
        "the served package is the built one"
    );
    let sums =
        String::from_utf8(http(&format!("http://127.0.0.1:{}/SHA256SUMS", ports.2)).unwrap())
            .unwrap();
    assert_eq!(sums, format!("{deb_sum}  {deb_name}\n"));
    // The package as downloaded installs into a throwaway root (tests/package.rs checks its
    // maintainer scripts in depth).
    let dl = env.path(deb_name);
    fs::write(&dl, &got).unwrap();
    let droot = env.path("dpkg-root");
    for d in [
        "var/lib/dpkg/updates",
        "var/lib/dpkg/info",
        "etc",
        "usr/bin",
    ] {
        fs::create_dir_all(droot.join(d)).unwrap();
    }
    fs::write(droot.join("var/lib/dpkg/status"), "").unwrap();
    sh_ok(&format!(
        "DPKG_ROOT={r} dpkg --root={r} --force-depends --force-script-chrootless -i {deb} >/dev/null && test -x {r}/usr/bin/ferry-agent",
        r = droot.display(),
        deb = dl.display()
    ));

    // Register through the forwarded port with the console's passphrase; protect a loop disk.
    let pinned = register(&env, &format!("127.0.0.1:{}", ports.0), &pass);
    // The certificate the agent pinned is the one the console shows.
    assert!(pinned.starts_with("sha256:"), "{pinned}");
    let s = serial_text();
    assert!(
        s.lines()
            .any(|l| l.contains("Certificate fingerprint:") && l.trim_end().ends_with(&pinned)),
        "the console's fingerprint is not the pinned {pinned}:\n{s}"
    );
    let backing = env.path("disk.img");
    let size: u64 = 24 << 20;
    fs::File::create(&backing).unwrap().set_len(size).unwrap();
    let mut rng = Rng(7);
    for i in 0..12u64 {
        write_random(&backing, &mut rng, i * (2 << 20), 1 << 20);
    }
    let lo = Loop::attach(&backing).unwrap();
    let dev = lo.path().to_string();
    let azure_env = [("AZURE_STORAGE_CONNECTION_STRING", host_cs.clone())];
    // Writes a few random blocks through the loop device.
    let mut churn = |n: usize| {
        for _ in 0..n {
            let off = rng.below(size / 4096 - 16) * 4096;
            write_random(Path::new(&dev), &mut rng, off, 16 << 10);
        }
    };
    // One `ferry-agent --once` through the appliance's agent port, and the disk as it was cut.
    let run_agent = |port: u16, copy: &str| {
        let o = Command::new(agent_bin())
            .env("FERRY_LOG", "info")
            .args([
                "--server",
                &format!("127.0.0.1:{port}"),
                "--vm",
                "app01",
                "--once",
                "--disk",
                &dev,
                "--state-dir",
            ])
            .arg(env.path("agent"))
            .output()
            .unwrap();
        ok(&o, "agent run through the appliance");
        let copy = env.path(copy);
        fs::write(&copy, fs::read(&dev).unwrap()).unwrap();
        copy
    };
    // The points land in the appliance's store (Azure): wait for `n` of them.
    let points = |n: usize| {
        let waited = Instant::now();
        loop {
            let o = ferry()
                .envs(azure_env.iter().cloned())
                .args(["points", "list", "--json", "--vm", "app01", "--store", &url])
                .output()
                .unwrap();
            let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
            if v.len() == n {
                return v;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(180),
                "{n} points never appeared: {v:?} {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    };
    // The host restores a point with the key and compares it with the disk at its cut.
    let restores_exactly = |p: &serde_json::Value, copy: &Path| {
        let id = p["id"].as_str().unwrap();
        let restored = env.path(&format!("restored-{id}.img"));
        let o = ferry()
            .envs(azure_env.iter().cloned())
            .args([
                "restore",
                "--store",
                &url,
                "--point",
                id,
                "--vm",
                "app01",
                "--force",
                "--verify",
                "--key-file",
            ])
            .arg(&key_file)
            .arg("--out")
            .arg(&restored)
            .output()
            .unwrap();
        ok(&o, "restore from the appliance's store");
        assert!(
            same_bytes(&restored, copy),
            "point {id} differs from the disk at its cut"
        );
    };
    let mut copies = vec![run_agent(ports.0, "copy0.img")];
    churn(8);
    copies.push(run_agent(ports.0, "copy1.img"));
    for (p, copy) in points(2).iter().zip(&copies) {
        restores_exactly(p, copy);
    }
    // Power loss, then the upgrade path: a new appliance (a fresh OS disk from the OVA) with the
    // old cache disk. Nothing is formatted; the identity, the registry, the key and every point
    // are kept: the registered agent goes on, and its next point restores exactly.
    vm.kill9();
    let serial2 = env.path("serial2.log");
    let os2 = fresh_os("os2.qcow2");
    // This time the settings come as VMware gives them: OVF properties in an OVF environment on
    // an ISO labelled "OVF ENV" (the same settings, and the same key).
    let envdir = env.path("ovfenv");
    fs::create_dir_all(&envdir).unwrap();
    let prop = |k: &str, v: &str| {
        let v = v
            .replace('&', "&amp;")
            .replace('"', "&quot;")
            .replace('<', "&lt;");
        format!("    <Property oe:key=\"ferry.{k}\" oe:value=\"{v}\"/>\n")
    };
    fs::write(
        envdir.join("ovf-env.xml"),
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Environment xmlns=\"http://schemas.dmtf.org/ovf/environment/1\" xmlns:oe=\"http://schemas.dmtf.org/ovf/environment/1\" oe:id=\"ferry-appliance\">\n  <PropertySection>\n{}{}{}{}{}{}{}  </PropertySection>\n</Environment>\n",
            prop("hostname", "ps-upgraded"),
            prop("store", &url),
            prop("azure_connection_string", &guest_cs),
            prop("azure_allow_http", "true"),
            prop("master_key", &key_hex),
            prop("cache_size", "2GiB"),
            prop("retention", ""),
        ),
    )
    .unwrap();
    let iso = env.path("ovfenv.iso");
    sh_ok(&format!(
        "genisoimage -quiet -V 'OVF ENV' -r -J -o {} {}",
        iso.display(),
        envdir.display()
    ));
    let (mut vm, ports) = boot(&env, &os2, &cache, &iso, &serial2);
    let booted2 = Instant::now();
    let healthy2 = wait_healthy(&mut vm, ports.1, &serial2, booted2);
    assert_eq!(
        console_passphrase(&serial2, booted2),
        pass,
        "the same identity after the upgrade"
    );
    let s2 = ferry_testkit::proc::strip_ansi(&fs::read_to_string(&serial2).unwrap());
    assert!(!s2.contains("formatting the blank disk"), "{s2}");
    assert!(s2.contains("master key: already in place"), "{s2}");
    assert!(s2.contains("settings from: ovf-env"), "{s2}");
    assert!(
        s2.contains("ps-upgraded"),
        "the OVF environment's host name: {s2}"
    );
    churn(4);
    let copy = run_agent(ports.0, "copy2.img");
    restores_exactly(&points(3)[2], &copy);
    drop(lo);
    vm.kill9();
    let line = format!(
        "appliance: OVA {:.0} MiB, build {build_s:.0} s, boot to healthy {healthy:.0} s, after the upgrade {healthy2:.0} s (TCG)",
        ova_size as f64 / (1 << 20) as f64
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
}
