//! Azure store end to end, against real Azurite (installed by scripts/install-azurite): direct and
//! split mode, an independent reader (Microsoft's Python SDK), kill -9 of `ferry apply`, an outage in
//! the middle of an upload, and a wrong account key.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use ferry_azure::azurite::Azurite;

const CONTAINER: &str = "ferry";

struct Az {
    azurite: Azurite,
    env: Env,
}

impl Az {
    fn start() -> Option<Az> {
        Some(Az {
            azurite: Azurite::start_or_skip()?,
            env: Env::new(),
        })
    }
    fn url(&self) -> String {
        format!("azure://devstoreaccount1/{CONTAINER}")
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = ferry();
        c.env(
            "AZURE_STORAGE_CONNECTION_STRING",
            self.azurite.connection_string(),
        );
        c.env("FERRY_STATE_DIR", self.env.path("state"));
        c.env("FERRY_KEY_FILE", self.env.key());
        c.args(args);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    fn replicate(&self, disk: &Path, extra: &[&str]) -> serde_json::Value {
        let url = self.url();
        let mut args = vec![
            "replicate",
            disk.to_str().unwrap(),
            "--store",
            &url,
            "--once",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = self.run(&args);
        assert!(
            o.status.success(),
            "replicate: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }
    fn points(&self) -> Vec<serde_json::Value> {
        let o = self.run(&["points", "list", "--json", "--store", &self.url()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }
    fn restore_exact(&self, id: &str, want: &Path) {
        let out = self.env.path("restored.img");
        let o = self.run(&[
            "restore",
            "--store",
            &self.url(),
            "--point",
            id,
            "--force",
            "--verify",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "restore {id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(same_bytes(&out, want), "point {id} is not byte-identical");
    }
}

fn make_disk(env: &Env, name: &str, size: u64, seed: u64) -> (PathBuf, Rng) {
    let p = env.path(name);
    fs::File::create(&p).unwrap().set_len(size).unwrap();
    let mut rng = Rng(seed);
    write_random(&p, &mut rng, 0, (size / 3) as usize);
    (p, rng)
}

fn python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/pyenv/bin/python");
    for p in [venv, PathBuf::from("python3")] {
        let ok = Command::new(&p)
            .args(["-c", "import azure.storage.blob"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(p);
        }
    }
    None
}

#[test]
fn direct_mode_points_are_exact_and_an_independent_client_reads_the_vhd_and_snapshots() {
    let Some(az) = Az::start() else { return };
    let size = (24 << 20) + 7 * 512; // not a multiple of 1 MiB
    let (disk, mut rng) = make_disk(&az.env, "web01.img", size, 1);
    let mut saved = Vec::new();
    for i in 0..3 {
        if i > 0 {
            let at = rng.below(size - 300_000);
            write_random(&disk, &mut rng, at, 300_000);
            write_zeros(&disk, rng.below(size - 200_000), 200_000);
        }
        let copy = az.env.path(&format!("v{i}.img"));
        fs::copy(&disk, &copy).unwrap();
        let j = az.replicate(&disk, &[]);
        assert!(j["wan_bytes"].as_u64().unwrap() > 0);
        saved.push((j["point"].clone(), copy));
    }
    let pts = az.points();
    assert_eq!(pts.len(), 3);
    for (p, copy) in &saved {
        az.restore_exact(p["id"].as_str().unwrap(), copy);
    }
    // Restore into a new page blob by server-side copy.
    let o = az.run(&[
        "restore",
        "--store",
        &az.url(),
        "--point",
        saved[0].0["id"].as_str().unwrap(),
        "--verify",
        "--out",
        "azure://devstoreaccount1/ferry/failover/web01-os.vhd",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let Some(py) = python() else {
        if std::env::var_os("FERRY_REQUIRE_AZURITE").is_some() {
            panic!("python azure-storage-blob is required (scripts/test installs it)");
        }
        eprintln!(
            "SKIP (partial): python azure-storage-blob not installed; independent check not run"
        );
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/py/check_page_blob.py");
    let mut c = Command::new(py);
    c.env(
        "AZURE_STORAGE_CONNECTION_STRING",
        az.azurite.connection_string(),
    );
    c.arg(&script)
        .arg(CONTAINER)
        .arg("replicas/web01/web01.vhd")
        .arg(size.to_string())
        .arg(&saved[2].1);
    for (p, copy) in &saved {
        c.arg(format!(
            "{}={}",
            p["disks"][0]["snapshot"].as_str().unwrap(),
            copy.display()
        ));
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "python check: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn split_mode_apply_survives_kill_9_and_every_point_is_exact() {
    let Some(az) = Az::start() else { return };
    let size: u64 = 96 << 20;
    let (disk, mut rng) = make_disk(&az.env, "db01.img", size, 2);
    let mut copies = std::collections::HashMap::new();
    let mut wan_split = 0;
    let runs = 8;
    for i in 0..runs {
        if i > 0 {
            for _ in 0..40 {
                let at = rng.below(size - 65536);
                write_random(&disk, &mut rng, at, 65536);
            }
        }
        let copy = az.env.path(&format!("s{i}.img"));
        fs::copy(&disk, &copy).unwrap();
        copies.insert(b3(&copy), copy);
        let j = az.replicate(&disk, &["--split"]);
        wan_split += j["wan_bytes"].as_u64().unwrap();
    }
    assert!(
        az.points().is_empty(),
        "split mode publishes nothing until `ferry apply`"
    );
    assert!(wan_split > 0);
    // kill -9 `ferry apply` at random moments until it was killed mid-way 10 times; each restart
    // resumes where the last published point left off.
    let mut killed = 0;
    let mut attempts = 0;
    while killed < 10 && attempts < 40 {
        attempts += 1;
        let mut child = az
            .cmd(&["apply", "--store", &az.url(), "--once"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Early enough that one run rarely publishes every point: a fast applier (an idle
        // machine) finished all 8 within 6 kills at 30-280 ms, before 10 had landed.
        std::thread::sleep(Duration::from_millis(10 + rng.below(110)));
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        child.kill().ok();
        child.wait().unwrap();
        if az.points().len() == runs {
            break;
        }
    }
    eprintln!("ferry apply killed mid-way {killed} times in {attempts} attempts");
    assert!(killed >= 10, "only {killed} kills landed mid-way");
    let o = az.run(&["apply", "--store", &az.url(), "--once"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pts = az.points();
    assert_eq!(pts.len(), runs, "every cut became exactly one point");
    for p in &pts {
        let copy = &copies[p["disks"][0]["blake3"].as_str().unwrap()];
        az.restore_exact(p["id"].as_str().unwrap(), copy);
    }
}

#[test]
fn an_outage_mid_upload_is_retried_and_nothing_is_lost() {
    let Some(mut az) = Az::start() else { return };
    let size: u64 = 160 << 20;
    let p = az.env.path("big.img");
    fs::File::create(&p).unwrap().set_len(size).unwrap();
    let mut rng = Rng(9);
    write_random(&p, &mut rng, 0, size as usize);
    let url = az.url();
    let mut child = az
        .cmd(&["replicate", p.to_str().unwrap(), "--store", &url, "--once"])
        .env("FERRY_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    az.azurite.stop();
    std::thread::sleep(Duration::from_secs(20));
    // 20 s into the outage the run is still retrying: it neither gave up nor finished without
    // the store.
    assert!(
        child.try_wait().unwrap().is_none(),
        "replicate ended during the outage instead of retrying"
    );
    az.azurite.restart().unwrap();
    let o = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "replication completes after the outage: {log}"
    );
    assert!(
        log.to_lowercase().contains("retry") || log.to_lowercase().contains("retrying"),
        "retries show in the log: {log}"
    );
    az.restore_exact("latest", &p);
}

#[test]
fn a_wrong_account_key_fails_fast_with_a_clear_error() {
    let Some(az) = Az::start() else { return };
    let (disk, _) = make_disk(&az.env, "x.img", 4 << 20, 3);
    let bad = az
        .azurite
        .connection_string()
        .replace("AccountKey=Eby8", "AccountKey=AAAA");
    let t0 = Instant::now();
    let o = az
        .cmd(&[
            "replicate",
            disk.to_str().unwrap(),
            "--store",
            &az.url(),
            "--once",
        ])
        .env("AZURE_STORAGE_CONNECTION_STRING", bad)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert!(e.to_lowercase().contains("key"), "says what to check: {e}");
}

#[test]
fn retention_prunes_expired_points_and_their_snapshots_but_never_the_newest() {
    let Some(az) = Az::start() else { return };
    let (disk, mut rng) = make_disk(&az.env, "ret.img", 8 << 20, 4);
    let first = az.replicate(&disk, &["--retention", "0"]);
    write_random(&disk, &mut rng, 0, 1 << 20);
    az.replicate(&disk, &["--retention", "0"]);
    std::thread::sleep(Duration::from_millis(2100));
    write_random(&disk, &mut rng, 2 << 20, 1 << 20);
    let last = az.replicate(&disk, &["--retention", "2s"]);
    let pts = az.points();
    assert_eq!(pts.len(), 1, "{pts:?}");
    assert_eq!(pts[0]["id"], last["point"]["id"]);
    az.restore_exact("latest", &disk);
    // The expired point's snapshot is gone from the store.
    let blobs = ferry_azure::AzureBlobs::new(az.azurite.config(CONTAINER)).unwrap();
    let snap = first["point"]["disks"][0]["snapshot"].as_str().unwrap();
    let r = blobs.get_range("replicas/ret/ret.vhd", Some(snap), 0, 512);
    assert!(
        r.is_err(),
        "snapshot {snap} of an expired point still exists"
    );
    // Retention alone, with nothing new, never removes the newest point.
    std::thread::sleep(Duration::from_millis(2100));
    let again = az.replicate(&disk, &["--retention", "1s"]);
    assert_eq!(az.points().len(), 1);
    assert_eq!(az.points()[0]["id"], again["point"]["id"]);
}

#[test]
fn a_rebuilt_appliance_with_fresh_local_state_keeps_the_store_consistent() {
    let Some(az) = Az::start() else { return };
    let (disk, mut rng) = make_disk(&az.env, "app01.img", 8 << 20, 6);
    az.replicate(&disk, &[]);
    write_random(&disk, &mut rng, 1 << 20, 1 << 20);
    az.replicate(&disk, &[]);
    // The process server's state directory is lost (a rebuilt appliance): a fresh staging store
    // ships the disk again into the same container. Data that became zero meanwhile must not
    // survive in the replica.
    write_random(&disk, &mut rng, 3 << 20, 1 << 20);
    write_zeros(&disk, 0, 1 << 20);
    let url = az.url();
    let o = az
        .cmd(&[
            "replicate",
            disk.to_str().unwrap(),
            "--store",
            &url,
            "--once",
            "--json",
        ])
        .env("FERRY_STATE_DIR", az.env.path("state-rebuilt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pts = az.points();
    assert_eq!(pts.len(), 3, "{pts:?}");
    let seqs: Vec<&str> = pts.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert!(
        seqs[2].starts_with("0003-"),
        "the store numbers its own points: {seqs:?}"
    );
    az.restore_exact("latest", &disk);
}

#[test]
fn a_fresh_container_behind_old_staging_state_is_refused_then_resynced_in_full() {
    let Some(az) = Az::start() else { return };
    let (disk, mut rng) = make_disk(&az.env, "db01.img", 8 << 20, 9);
    az.replicate(&disk, &[]);
    let marker = ferry_azure::AzureBlobs::new(az.azurite.config(CONTAINER))
        .unwrap()
        .get_blob("ferry-store.json")
        .unwrap()
        .expect("the first run writes the store marker");
    let id = serde_json::from_slice::<serde_json::Value>(&marker).unwrap()["store_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The same account and container name, but a new, empty store (a fresh Azurite).
    let fresh = Azurite::start_or_skip().expect("a second Azurite");
    write_random(&disk, &mut rng, 2 << 20, 64 << 10);
    let url = az.url();
    let run = |extra_env: Option<(&str, PathBuf)>| {
        let mut c = az.cmd(&[
            "replicate",
            disk.to_str().unwrap(),
            "--store",
            &url,
            "--once",
        ]);
        c.env("AZURE_STORAGE_CONNECTION_STRING", fresh.connection_string());
        if let Some((k, v)) = extra_env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let o = run(None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a run on stale staging state must be refused"
    );
    assert!(
        err.contains("no store marker") && err.contains(&id) && err.contains("mv "),
        "the refusal names the old store id and what to do: {err}"
    );
    let blobs = ferry_azure::AzureBlobs::new(fresh.config(CONTAINER)).unwrap();
    assert!(
        blobs.list("manifests/").unwrap().is_empty(),
        "no point may be published on the wrong base"
    );
    // Following the advice: the staging directory moved aside, a full resync, exact points.
    let stage = az.env.path("state/stage/devstoreaccount1").join(CONTAINER);
    assert!(stage.is_dir(), "{}", stage.display());
    fs::rename(&stage, stage.with_extension("old")).unwrap();
    let o = run(None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = az.env.path("fresh.img");
    let o = az
        .cmd(&[
            "restore", "--store", &url, "--point", "latest", "--verify", "--out",
        ])
        .arg(&out)
        .env("AZURE_STORAGE_CONNECTION_STRING", fresh.connection_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(same_bytes(&out, &disk), "the resynced point is exact");
    let id2 = serde_json::from_slice::<serde_json::Value>(
        &blobs.get_blob("ferry-store.json").unwrap().unwrap(),
    )
    .unwrap()["store_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(id, id2, "the new container is a new store");
}

#[test]
fn a_pinned_point_survives_retention_and_an_expired_pin_does_not_count() {
    let Some(az) = Az::start() else { return };
    let (disk, mut rng) = make_disk(&az.env, "pin01.img", 4 << 20, 11);
    let v1 = az.env.path("v1.img");
    for i in 0..3 {
        write_random(&disk, &mut rng, 0, 1 << 20);
        if i == 0 {
            fs::copy(&disk, &v1).unwrap();
        }
        az.replicate(&disk, &[]);
    }
    let pts = az.points();
    assert_eq!(pts.len(), 3);
    let id1 = pts[0]["id"].as_str().unwrap().to_owned();
    let seq1: u64 = id1.split('-').next().unwrap().parse().unwrap();
    let blobs = ferry_azure::AzureBlobs::new(az.azurite.config(CONTAINER)).unwrap();
    // This test is the reader: its pin keeps point 1 (and so every newer one) from retention.
    let pin = ferry_job::azure_pins::pin_point(&blobs, "pin01", seq1).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    az.replicate(&disk, &["--retention", "1s"]);
    assert_eq!(az.points().len(), 4, "a pinned point was pruned");
    az.restore_exact(&id1, &v1);
    drop(pin);
    assert!(
        blobs.list("pins/").unwrap().is_empty(),
        "a released pin is deleted"
    );
    // A pin past its expiry (its reader is gone) does not count, and retention removes it.
    let stale = "pins/pin01/1.dead.json";
    blobs
        .put_block_blob(
            stale,
            format!(r#"{{"vm":"pin01","seq":{seq1},"expires":1}}"#).into_bytes(),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    az.replicate(&disk, &["--retention", "1s"]);
    assert_eq!(az.points().len(), 1, "{:?}", az.points());
    assert!(
        blobs.get_blob(stale).unwrap().is_none(),
        "the expired pin was not removed"
    );
}

/// A test failover of an Azure store: each disk a new page blob under the test prefix (a
/// server-side copy of the point's snapshot), exact as Microsoft's Python SDK reads it, with the
/// `az` commands to make a VM of them; `--cleanup` deletes exactly those blobs; mistakes get
/// clear errors.
#[test]
fn an_azure_test_failover_makes_page_blobs_an_independent_client_reads_and_cleanup_deletes_them() {
    let Some(az) = Az::start() else { return };
    let size = 8 << 20;
    let (disk, mut rng) = make_disk(&az.env, "os.img", size, 5);
    az.replicate(&disk, &["--vm", "web01", "--disk", "os"]);
    let at1 = az.env.path("os-at-1.img");
    fs::copy(&disk, &at1).unwrap();
    let p1 = az.points()[0]["id"].as_str().unwrap().to_owned();
    write_random(&disk, &mut rng, 1 << 20, 1 << 20);
    az.replicate(&disk, &["--vm", "web01", "--disk", "os"]);
    let url = az.url();
    let fo = |extra: &[&str]| {
        let mut a = vec!["failover", "--store", url.as_str()];
        a.extend_from_slice(extra);
        az.run(&a)
    };
    let o = fo(&[
        "--test",
        "--vm",
        "web01",
        "--point",
        &p1,
        "--verify",
        "--json",
        "--to",
        "azure://devstoreaccount1/ferry/tf",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["state"], "ready", "{r:#}");
    let blob = r["disks"][0]["path"].as_str().unwrap().to_owned();
    assert!(
        blob.starts_with("tf/web01-test-") && blob.ends_with("/web01-os.vhd"),
        "{blob}"
    );
    let cmds: Vec<&str> = r["az"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        cmds[0].starts_with("az disk create") && cmds[0].contains(&blob),
        "{cmds:?}"
    );
    assert!(cmds.last().unwrap().starts_with("az vm create"), "{cmds:?}");
    // One at a time per VM.
    let o = fo(&["--test", "--vm", "web01"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("has a test failover already"));

    // Microsoft's SDK reads the page blob: the disk at point 1, a fixed VHD.
    let py = python();
    let blobs_under = |prefix: &str| -> Option<usize> {
        let py = py.as_ref()?;
        let o = Command::new(py)
            .env("AZURE_STORAGE_CONNECTION_STRING", az.azurite.connection_string())
            .args([
                "-c",
                "import os,sys\nfrom azure.storage.blob import BlobServiceClient\nc=BlobServiceClient.from_connection_string(os.environ['AZURE_STORAGE_CONNECTION_STRING']).get_container_client(sys.argv[1])\nprint(sum(1 for _ in c.list_blobs(name_starts_with=sys.argv[2])))",
                CONTAINER,
                prefix,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Some(String::from_utf8_lossy(&o.stdout).trim().parse().unwrap())
    };
    match &py {
        Some(py) => {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/py/check_page_blob.py");
            let o = Command::new(py)
                .env(
                    "AZURE_STORAGE_CONNECTION_STRING",
                    az.azurite.connection_string(),
                )
                .arg(&script)
                .arg(CONTAINER)
                .arg(&blob)
                .arg(size.to_string())
                .arg(&at1)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "python check: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(blobs_under("tf/"), Some(1));
        }
        None if std::env::var_os("FERRY_REQUIRE_AZURITE").is_some() => {
            panic!("python azure-storage-blob is required (scripts/test installs it)")
        }
        None => eprintln!("SKIP (partial): python azure-storage-blob not installed"),
    }

    // Cleanup deletes exactly its blobs; the record stays as `cleaned`.
    let o = fo(&["--test", "--cleanup", "--vm", "web01"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    if py.is_some() {
        assert_eq!(blobs_under("tf/"), Some(0));
        assert_eq!(blobs_under("replicas/web01/"), Some(1), "the replica stays");
    }
    let o = az.run(&["failover", "list", "--json", "--store", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(l[0]["state"], "cleaned", "{l:#}");

    // Mistakes.
    for (args, want) in [
        (
            &["--test", "--vm", "web01", "--to", "azure://other/ferry/x"][..],
            "store's own container",
        ),
        (
            &["--test", "--vm", "web01", "--format", "raw"][..],
            "page blobs",
        ),
        (
            &[
                "--test",
                "--vm",
                "web01",
                "--to",
                "azure://devstoreaccount1/ferry/failover",
            ][..],
            "not starting with one of Ferry's own",
        ),
        (
            &["--test", "--vm", "web01", "--point", "final"][..],
            "has no final point",
        ),
    ] {
        let o = fo(args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(want),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// A real failover of an Azure store: page blobs under `failover/`, the VM recorded failed over
/// (a second one refused, test cleanups never touch it); then the failed-over VM writes (5 % of
/// the disk, and a discard) and `ferry failback --from azure://…` brings the original disk, as
/// it was at the point, to the blob's state, writing only the chunks that differ, downloading
/// only written pages, and verifying.
#[test]
fn an_azure_failover_then_failback_from_the_page_blob_moves_only_what_differs() {
    let Some(az) = Az::start() else { return };
    let size: u64 = 16 << 20;
    let (disk, _) = make_disk(&az.env, "os.img", size, 9);
    az.replicate(&disk, &["--vm", "web02", "--disk", "os"]);
    let url = az.url();
    // One real failover of a VM at a time, across machines: a claim blob another one holds
    // refuses this one, which makes nothing.
    let blobs = ferry_azure::AzureBlobs::new(az.azurite.config(CONTAINER)).unwrap();
    blobs
        .put_block_blob("failovers/web02.claim", b"{\"pid\": 1}".to_vec())
        .unwrap();
    let o = az.run(&["failover", "--vm", "web02", "--store", &url]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("another failover of web02 is running"), "{e}");
    assert!(blobs.list("failover/").unwrap().is_empty());
    blobs.delete_blob("failovers/web02.claim").unwrap();
    let o = az.run(&["failover", "--vm", "web02", "--json", "--store", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        blobs.blob_size("failovers/web02.claim").unwrap().is_none(),
        "the claim is released"
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["kind"].as_str(), r["state"].as_str()),
        (Some("failover"), Some("ready")),
        "{r:#}"
    );
    let blob = r["disks"][0]["path"].as_str().unwrap().to_owned();
    assert_eq!(blob, "failover/web02/web02-os.vhd");
    assert!(
        r["az"][1]
            .as_str()
            .unwrap()
            .contains("az vm create -g RESOURCE_GROUP -n web02 "),
        "{r:#}"
    );
    // Recorded: a second failover is refused; a test cleanup finds nothing to remove.
    let o = az.run(&["failover", "--vm", "web02", "--store", &url]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("failed over already"), "{e}");
    let o = az.run(&[
        "failover",
        "--test",
        "--cleanup",
        "--vm",
        "web02",
        "--store",
        &url,
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let life: serde_json::Value = serde_json::from_slice(
        &fs::read(
            az.env
                .path("state/stage/devstoreaccount1/ferry/lifecycle/web02.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(life["state"], "failed-over", "{life:#}");

    // The failed-over VM runs in Azure: it writes 5 % of the disk in 64 KiB pieces spread over
    // the disk and discards 1 MiB (Clear Pages). Written with Microsoft's Python SDK.
    let py = python().expect("python azure-storage-blob (scripts/test installs it)");
    let mut expect = fs::read(&disk).unwrap();
    let mut rng = Rng(77);
    let mut writes = String::new();
    let n = (size / 20) / (64 << 10);
    for i in 0..n {
        let off = (i * (size / n)) & !((64 << 10) - 1);
        let mut b = vec![0u8; 64 << 10];
        for x in b.chunks_mut(8) {
            x.copy_from_slice(&rng.next().to_le_bytes());
        }
        expect[off as usize..off as usize + b.len()].copy_from_slice(&b);
        let f = az.env.path(&format!("w{i}"));
        fs::write(&f, &b).unwrap();
        writes.push_str(&format!("{off} {}\n", f.display()));
    }
    let clear_at: u64 = 3 << 20;
    expect[clear_at as usize..(clear_at + (1 << 20)) as usize].fill(0);
    fs::write(az.env.path("writes.txt"), &writes).unwrap();
    let o = Command::new(&py)
        .env("AZURE_STORAGE_CONNECTION_STRING", az.azurite.connection_string())
        .args([
            "-c",
            "import os,sys\nfrom azure.storage.blob import BlobServiceClient\nb=BlobServiceClient.from_connection_string(os.environ['AZURE_STORAGE_CONNECTION_STRING']).get_blob_client(sys.argv[1],sys.argv[2])\nfor l in open(sys.argv[3]):\n  off,f=l.split()\n  d=open(f,'rb').read()\n  b.upload_page(d,offset=int(off),length=len(d))\nb.clear_page(offset=int(sys.argv[4]),length=1<<20)",
            CONTAINER,
            &blob,
            az.env.path("writes.txt").to_str().unwrap(),
            &clear_at.to_string(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let changed = expect
        .chunks(64 << 10)
        .zip(fs::read(&disk).unwrap().chunks(64 << 10))
        .filter(|(a, b)| a != b)
        .count() as u64
        * (64 << 10);

    // Failback onto the original disk (as it was at the point), then onto a new one.
    let from = format!("{url}/{blob}");
    let o = az.run(&[
        "failback",
        "--vm",
        "web02",
        "--from",
        &from,
        "--to",
        disk.to_str().unwrap(),
        "--verify",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fb: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let moved = fb["bytes_moved"].as_u64().unwrap();
    eprintln!(
        "MEASURE azure failback: {moved} bytes written of {size} ({:.3}x the {changed} changed bytes), {} downloaded",
        moved as f64 / changed as f64,
        fb["disks"][0]["bytes_downloaded"]
    );
    assert_eq!(moved, changed, "{fb:#}");
    // Only written pages are downloaded: the disk's first third (random) and the VM's writes.
    let down = fb["disks"][0]["bytes_downloaded"].as_u64().unwrap();
    assert!(
        down >= changed - (1 << 20) && down < size / 2,
        "{down} bytes downloaded: {fb:#}"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("export the managed disk"),
        "no note that the failover's own blob is not the running VM's disk"
    );

    assert!(fb["disks"][0]["blake3"].is_string(), "{fb:#}");
    assert!(
        fs::read(&disk).unwrap() == expect,
        "the failed-back disk is not the blob's state"
    );
    let fresh = az.env.path("new.img");
    let o = az.run(&[
        "failback",
        "--vm",
        "web02",
        "--from",
        &from,
        "--to",
        fresh.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f2: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f2["disks"][0]["created"], true, "{f2:#}");
    let got = fs::read(&fresh).unwrap();
    assert!(
        got.len() as u64 >= size
            && got[..size as usize] == expect[..]
            && got[size as usize..].iter().all(|&b| b == 0)
    );
    // Complete the migration (no server runs: the command removes the data itself): the VM's
    // manifest, replica and snapshots go; the failed-over disk and the records stay.
    let count = |prefix: &str| -> usize {
        let o = Command::new(&py)
            .env("AZURE_STORAGE_CONNECTION_STRING", az.azurite.connection_string())
            .args([
                "-c",
                "import os,sys\nfrom azure.storage.blob import BlobServiceClient\nc=BlobServiceClient.from_connection_string(os.environ['AZURE_STORAGE_CONNECTION_STRING']).get_container_client(sys.argv[1])\nprint(sum(1 for _ in c.list_blobs(name_starts_with=sys.argv[2],include=['snapshots'])))",
                CONTAINER,
                prefix,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    };
    assert!(
        count("replicas/web02/") >= 2,
        "a replica and its point's snapshot"
    );
    let o = az.run(&[
        "complete-migration",
        "--vm",
        "web02",
        "--json",
        "--store",
        &url,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c["state"], "retired", "{c:#}");
    assert_eq!(
        (
            count("replicas/web02/"),
            count("manifests/web02.json"),
            count("pins/web02/")
        ),
        (0, 0, 0)
    );
    // Snapshots included: the disk stays, and the snapshots the failbacks read are deleted.
    assert_eq!(
        count(&blob),
        1,
        "the failed-over disk stays, with no snapshot left"
    );
    assert!(count("failovers/") >= 1, "the records stay");
    let o = az.run(&["points", "list", "--json", "--store", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("web02"));
    let o = az.run(&[
        "replicate",
        disk.to_str().unwrap(),
        "--store",
        &url,
        "--once",
        "--vm",
        "web02",
        "--disk",
        "os",
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a retired VM replicates again: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Off the appliance (no process server state here, as after losing the site): a failover is
    // recorded in the container only, and complete-migration deletes the container's data.
    let (d3, _) = make_disk(&az.env, "db.img", 4 << 20, 3);
    az.replicate(&d3, &["--vm", "db03", "--disk", "os"]);
    let elsewhere = |args: &[&str]| {
        let mut c = az.cmd(args);
        c.env("FERRY_STATE_DIR", az.env.path("another-machine"));
        c.output().unwrap()
    };
    let o = elsewhere(&["failover", "--vm", "db03", "--store", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no process server state"));
    let o = elsewhere(&[
        "complete-migration",
        "--vm",
        "db03",
        "--json",
        "--store",
        &url,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (c["state"].as_str(), c["forced"].as_bool()),
        (Some("retired"), Some(false)),
        "{c:#}"
    );
    assert_eq!(
        (count("replicas/db03/"), count("manifests/db03.json")),
        (0, 0)
    );
    assert_eq!(count("failover/db03/"), 1, "the failed-over disk stays");
    assert_eq!(count("lifecycle/db03.retired"), 1);

    // Mistakes: no such blob, a blob that is not a VHD.
    for (f, want) in [
        (format!("{url}/failover/nope.vhd"), "no such blob"),
        (format!("{url}/failovers/x"), "no such blob"),
        (
            format!("{url}/failovers/{}.json", r["id"].as_str().unwrap()),
            "not a fixed VHD",
        ),
        (
            "azure://devstoreaccount1".to_string(),
            "azure://ACCOUNT/CONTAINER/PATH",
        ),
    ] {
        let o = az.run(&[
            "failback",
            "--vm",
            "web02",
            "--from",
            &f,
            "--to",
            az.env.path("x.img").to_str().unwrap(),
            "--dry-run",
        ]);
        assert_eq!(o.status.code(), Some(2), "{f}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(want),
            "{f}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
