//! `ferry-track`: attaches the eBPF tracker (`ferry_ebpf::Tracker`) to block devices and drains it
//! the way the agent does, with no agent around it; used by `benches/tracker-overhead.sh`.
//!
//! ```text
//! ferry-track [--interval SECONDS] DEVICE...
//! ```
//! Prints `ready` on stdout once the BPF programs are attached, then drains every disk every
//! `--interval` seconds (default 1) with `drain_all()`, counting dirty chunks and resync requests.
//! On SIGTERM or SIGINT it drains once more, prints one JSON object (drains, dirty chunks and
//! resyncs per disk, drain times, and the BPF programs' run counts and run time, which the kernel
//! keeps only while `kernel.bpf_stats_enabled` is 1) on stdout and exits 0. Needs root (or
//! CAP_BPF + CAP_PERFMON).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_ebpf::Tracker;

/// What the drains of one disk found, over the whole run.
#[derive(Default)]
struct DiskTotals {
    dirty_chunks: u64,
    /// Drains that found at least one dirty chunk.
    nonempty_drains: u64,
    resyncs: u64,
    reasons: Vec<String>,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-track: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut interval = Duration::from_secs(1);
    let mut disks = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--interval" => {
                let secs: f64 = args
                    .next()
                    .context("--interval needs a value in seconds")?
                    .parse()
                    .context("--interval: not a number")?;
                if !(secs > 0.0 && secs.is_finite()) {
                    bail!("--interval must be positive");
                }
                interval = Duration::from_secs_f64(secs);
            }
            "-h" | "--help" => {
                println!("usage: ferry-track [--interval SECONDS] DEVICE...");
                return Ok(());
            }
            _ => disks.push(PathBuf::from(arg)),
        }
    }
    if disks.is_empty() {
        bail!("usage: ferry-track [--interval SECONDS] DEVICE...");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handler")?;
    }
    if let Err(why) = Tracker::available() {
        bail!("the eBPF tracker cannot run here: {why}");
    }
    let opened = Instant::now();
    let mut tracker = Tracker::open(&disks).context("cannot attach the tracker")?;
    let attach_ms = opened.elapsed().as_secs_f64() * 1e3;
    println!("ready");

    let mut totals: Vec<DiskTotals> = disks.iter().map(|_| DiskTotals::default()).collect();
    let mut drains = 0u64;
    let mut drain_us: Vec<f64> = Vec::new();
    let mut next = Instant::now() + interval;
    let started = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping || Instant::now() >= next {
            let t = Instant::now();
            let sets = tracker.drain_all().context("drain failed")?;
            drain_us.push(t.elapsed().as_secs_f64() * 1e6);
            drains += 1;
            for (tot, set) in totals.iter_mut().zip(&sets) {
                tot.dirty_chunks += set.len();
                tot.nonempty_drains += u64::from(!set.is_empty());
                if set.needs_resync() {
                    tot.resyncs += 1;
                    // The first few reasons say enough; a tracker that resyncs every drain
                    // would otherwise grow this without bound.
                    let room = 16usize.saturating_sub(tot.reasons.len());
                    tot.reasons
                        .extend(set.resync.iter().take(room).map(|r| r.to_string()));
                }
            }
            next += interval;
            if stopping {
                break;
            }
        }
        // Short naps so a signal is answered within 50 ms.
        std::thread::sleep(
            next.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50)),
        );
    }

    let programs = program_stats(&tracker.program_ids());
    drain_us.sort_by(f64::total_cmp);
    let pct = |p: f64| drain_us[((drain_us.len() - 1) as f64 * p).round() as usize];
    let summary = serde_json::json!({
        "seconds": started.elapsed().as_secs_f64(),
        "attach_ms": attach_ms,
        "interval_s": interval.as_secs_f64(),
        "drains": drains,
        "drain_us": { "p50": pct(0.5), "max": pct(1.0) },
        "dirty_chunks": totals.iter().map(|t| t.dirty_chunks).sum::<u64>(),
        "resyncs": totals.iter().map(|t| t.resyncs).sum::<u64>(),
        "programs": programs,
        "disks": disks.iter().zip(&totals).map(|(d, t)| serde_json::json!({
            "path": d.display().to_string(),
            "dirty_chunks": t.dirty_chunks,
            "nonempty_drains": t.nonempty_drains,
            "resyncs": t.resyncs,
            "resync_reasons": t.reasons,
        })).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}

/// Run counts and run time of the tracker's BPF programs, from this process's `/proc/self/fdinfo`
/// (the kernel counts them only while `kernel.bpf_stats_enabled` is 1; they cover every block
/// device's bios, tracked or not).
fn program_stats(ids: &[(&'static str, u32)]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        let Some(id) = field("prog_id:") else {
            continue;
        };
        let Some(&(name, _)) = ids.iter().find(|(_, i)| u64::from(*i) == id) else {
            continue;
        };
        let (runs, ns) = (
            field("run_cnt:").unwrap_or(0),
            field("run_time_ns:").unwrap_or(0),
        );
        out.push(serde_json::json!({
            "name": name, "id": id, "run_cnt": runs, "run_time_ns": ns,
            "ns_per_run": if runs > 0 { ns as f64 / runs as f64 } else { 0.0 },
        }));
    }
    out.sort_by_key(|v| v["id"].as_u64());
    // Several fds can refer to one program; keep one entry per id.
    out.dedup_by_key(|v| v["id"].as_u64());
    out
}
