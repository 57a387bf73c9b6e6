//! `ferry serve`'s memory stays bounded with many agents (issue 12: under 512 MiB with 200): a
//! real server, 200 agents on the wire protocol (`ferry-simagents`, built next to `ferry` by
//! `cargo build --release --bins`) writing incompressible 64 KiB records as fast as the server's
//! credit allows, and the server's peak resident memory (VmHWM, the kernel's figure) read just
//! before it stops. Before the budget work the same run reached ~900 MiB within 3 s (a 1 MiB
//! buffer per replica, sealed chunks at twice their size, glibc's arenas, 1 MiB of credit per
//! agent). Every agent's point is committed, and one is restored and checked byte for byte.
//! Costs ~10 s and ~2 GB of disk for a moment.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ferry, ok, spawn_serve, Env};

const AGENTS: u32 = 200;
const LIMIT_MIB: u64 = 512;

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a VmHWM line")
}

#[test]
fn two_hundred_agents_flat_out_stay_under_512_mib() {
    let env = Env::new();
    let (mut serve, addr) = spawn_serve(
        common::serve_cmd(&env, "8GiB"),
        Some("127.0.0.1:0"),
        &env.path("serve.log"),
    );
    let pid = serve.pid().expect("running");
    let pass = common::passphrase_txt(&env);
    let sim = ferry_testkit::proc::sibling_bin(env!("CARGO_BIN_EXE_ferry"), "ferry-simagents");
    let out = Command::new(sim)
        .args(["--server", &addr, "--agents", &AGENTS.to_string()])
        .arg("--passphrase-file")
        .arg(&pass)
        .args(["--seconds", "6", "--disk-size", &(16u64 << 20).to_string()])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(env.path("sim.log")).unwrap())
        .output()
        .unwrap();
    ok(&out, "ferry-simagents");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["agents_ok"], AGENTS, "{report}");
    let acked = report["write_bytes_acked"].as_u64().unwrap();
    // Data went through (not a rate: the server paces agents to its drain): at least 1 MiB per
    // agent, a few times the credit each one holds.
    assert!(
        acked >= u64::from(AGENTS) << 20,
        "only {acked} bytes acknowledged"
    );
    // Every agent's point, committed by the drain.
    serve.wait_log("every point committed", Duration::from_secs(120), |_| {
        let log = std::fs::read_to_string(env.path("serve.log")).unwrap_or_default();
        let n = log.matches("recovery point committed").count();
        (n >= AGENTS as usize).then_some(())
    });
    let hwm_mib = vm_hwm_kib(pid) / 1024;
    serve.term();
    println!(
        "memory: {AGENTS} agents, {:.0} MiB acknowledged: ferry serve VmHWM {hwm_mib} MiB",
        acked as f64 / 1048576.0
    );
    assert!(
        hwm_mib < LIMIT_MIB,
        "ferry serve peaked at {hwm_mib} MiB with {AGENTS} agents (limit {LIMIT_MIB} MiB)"
    );
    // The data is right, not only small: one agent's point restores to the digest its Tag
    // carried (the blake3 of the disk as the agent wrote it).
    let r = ferry()
        .args(["restore", "--store"])
        .arg(env.store())
        .arg("--key-file")
        .arg(env.key())
        .args(["--vm", "sim-000", "--point", "latest", "--verify", "--out"])
        .arg(env.path("restored.img"))
        .output()
        .unwrap();
    ok(&r, "ferry restore --verify");
}
