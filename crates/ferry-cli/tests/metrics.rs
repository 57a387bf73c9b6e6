//! The Prometheus endpoint of a real `ferry serve` (`--metrics-listen`), scraped after a real
//! agent made a point, and parsed by the Prometheus project's own Python parser
//! (`prometheus_client.parser`, installed by scripts/test into tools/pyenv; without it the test
//! fails when `FERRY_REQUIRE_PROM_PARSER` is set, and otherwise prints SKIP). Costs ~5 s.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{agent_bin, ferry, ok, spawn_serve, Env};

fn python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/pyenv/bin/python");
    [venv, PathBuf::from("python3")].into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import prometheus_client.parser"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// `GET /metrics` over plain HTTP/1.0: the status line and the body.
fn scrape(addr: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

#[test]
fn the_metrics_endpoint_serves_prometheus_text_an_independent_parser_reads() {
    let env = Env::new();
    let state = env.path("ps-state");
    std::fs::create_dir_all(&state).unwrap();
    ok(
        &ferry()
            .args(["throttle", "set", "50MiB/s", "--state-dir"])
            .arg(&state)
            .output()
            .unwrap(),
        "throttle set",
    );
    let mut c = ferry();
    c.args([
        "serve",
        "--cache-size",
        "512MiB",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .arg("--store")
    .arg(env.store())
    .arg("--key-file")
    .arg(env.key())
    .arg("--cache-dir")
    .arg(env.path("ps-cache"))
    .arg("--state-dir")
    .arg(&state);
    let (mut srv, addr) = spawn_serve(c, Some("127.0.0.1:0"), &env.path("serve.log"));
    let metrics = srv.wait_log("the metrics line", Duration::from_secs(10), |l| {
        let l = ferry_testkit::proc::strip_ansi(l);
        let (_, rest) = l.split_once("url=http://")?;
        Some(rest.split('/').next()?.to_owned())
    });
    common::register_agent(&env, &addr, "agent");
    let disk = env.path("disk.img");
    std::fs::File::create(&disk).unwrap();
    common::write_random(&disk, &mut common::Rng(3), 0, 16 << 20);
    let o = Command::new(agent_bin())
        .args([
            "--server",
            &addr,
            "--vm",
            "web01",
            "--once",
            "--tracker",
            "scan",
            "--disk",
        ])
        .arg(&disk)
        .arg("--state-dir")
        .arg(env.path("agent"))
        .output()
        .unwrap();
    ok(&o, "agent --once");
    // Published every second.
    std::thread::sleep(Duration::from_millis(2500));
    let (status, body) = scrape(&metrics);
    assert!(status.contains("200"), "{status}");
    let file = env.path("metrics.txt");
    std::fs::write(&file, &body).unwrap();
    let Some(py) = python() else {
        if std::env::var_os("FERRY_REQUIRE_PROM_PARSER").is_some() {
            panic!(
                "python prometheus_client is required (scripts/test installs it into tools/pyenv)"
            );
        }
        eprintln!("SKIP (partial): python prometheus_client not installed; the exposition was not parsed independently");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/py/check_metrics.py");
    let o = Command::new(py)
        .arg(script)
        .arg(&file)
        .arg("web01")
        .arg((16u64 << 20).to_string())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the Prometheus parser refused or a check failed: {}\n--- exposition ---\n{body}",
        String::from_utf8_lossy(&o.stderr)
    );
    srv.term();
    // The same run's events, persisted across the server's stop.
    let o = ferry()
        .args(["events", "--json", "--since", "1h", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    ok(&o, "events");
    let ev: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let has = |kind: &str, vm: Option<&str>, text: &str| {
        ev.iter().any(|e| {
            e["kind"] == kind
                && e["vm"].as_str() == vm
                && e["message"].as_str().unwrap().contains(text)
        })
    };
    for (kind, vm, text) in [
        (
            "throttle",
            None,
            "operator set ingest from all agents together: '* 50MiB/s'",
        ),
        ("server", None, "process server started"),
        ("throttle", None, "throttles in effect: ingest 50 MiB/s"),
        ("agent", None, "registered"),
        ("agent", Some("web01"), "agent connected from 127.0.0.1"),
        ("agent", Some("web01"), "agent disconnected"),
        ("server", None, "process server stopped"),
    ] {
        assert!(has(kind, vm, text), "no {kind} event {text:?} in {ev:#?}");
    }
    let o = ferry()
        .args(["events", "--vm", "web01", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    ok(&o, "events --vm");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.lines().all(|l| l.contains(" web01 ")),
        "another VM's or the server's events: {text}"
    );
    assert!(
        text.contains("agent connected from") && text.contains("agent disconnected"),
        "{text}"
    );
    // A taken metrics port stops the start with a message that says what to do.
    let mut c = common::serve_cmd(&env, "512MiB");
    c.args(["--listen", "127.0.0.1:0", "--metrics-listen", &metrics]);
    let _hold = std::net::TcpListener::bind(&metrics).unwrap();
    let o = c.output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("metrics_listen"), "{e}");
}
