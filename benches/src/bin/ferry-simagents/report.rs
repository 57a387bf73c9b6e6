//! The JSON report. MB = 10^6 bytes; latencies in milliseconds; distributions are nearest-rank
//! p50/p99/max.
//!
//! - `acked_mb_per_s`: Write bytes acknowledged, over the time from the common start to the last
//!   Tag's Ack (so the backlog a closed window leaves behind counts against it);
//!   `acked_in_window_mb_per_s`: bytes whose Ack arrived within the `--seconds` window, over it.
//! - `ack_latency_ms`: per Write/Zero record, from the start of its send (credit in hand; the time
//!   a full socket blocks the send is included) to the arrival of the cumulative Ack covering it:
//!   `pooled` over all records, `per_agent_p50` / `per_agent_p99` the spread over agents of each
//!   agent's own p50 / p99.
//! - `tag_ack_latency_ms`: the same for each agent's Tag.
//! - `credit_wait_s`: per agent, time with a record ready but too little credit (backpressure).
//! - `per_agent_acked_mb`: fairness — how evenly the server's throughput was shared.

use std::time::Instant;

use crate::agent::AgentStats;
use crate::Args;

/// What the run produced.
pub(crate) struct Outcome {
    pub connect_s: f64,
    /// When writing started (all agents connected).
    pub start: Instant,
    pub results: Vec<anyhow::Result<AgentStats>>,
}

/// Nearest-rank percentile of sorted values (0 for none).
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// p50/p99/max of microsecond values, in milliseconds.
fn dist_ms(mut v: Vec<u64>) -> serde_json::Value {
    v.sort_unstable();
    let ms = |us: u64| round(us as f64 / 1e3, 2);
    serde_json::json!({
        "p50": ms(pct(&v, 0.5)), "p99": ms(pct(&v, 0.99)), "max": ms(pct(&v, 1.0)),
    })
}

pub(crate) fn report(a: &Args, register_s: f64, o: Outcome, cpu_s: f64) -> serde_json::Value {
    let mut errors = Vec::new();
    let mut ok = Vec::new();
    for r in o.results {
        match r {
            Ok(s) => ok.push(s),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    errors.sort();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    for s in &mut ok {
        s.ack_us.sort_unstable();
        p50s.push(pct(&s.ack_us, 0.5));
        p99s.push(pct(&s.ack_us, 0.99));
    }
    let sum = |f: fn(&AgentStats) -> u64| ok.iter().map(f).sum::<u64>();
    let acked = sum(|s| s.write_bytes_acked);
    let in_window = sum(|s| s.write_bytes_acked_in_window);
    let end = ok.iter().filter_map(|s| s.done).max().unwrap_or(o.start);
    let total_s = end.duration_since(o.start).as_secs_f64();
    let mbps = |bytes: u64, s: f64| {
        if s > 0.0 {
            round(bytes as f64 / s / 1e6, 1)
        } else {
            0.0
        }
    };
    let mut per_agent: Vec<u64> = ok.iter().map(|s| s.write_bytes_acked).collect();
    per_agent.sort_unstable();
    let mut waits: Vec<u64> = ok
        .iter()
        .map(|s| s.credit_wait.as_micros() as u64)
        .collect();
    waits.sort_unstable();
    let mb = |b: u64| round(b as f64 / 1e6, 1);
    let secs = |us: u64| round(us as f64 / 1e6, 3);
    serde_json::json!({
        "agents": a.agents,
        "agents_ok": ok.len(),
        "seconds": a.seconds,
        "disk_size": a.disk_size,
        "write_size": a.write_size,
        "rate_per_agent": a.rate,
        "zero_every": a.zero_every,
        "register_seconds": round(register_s, 3),
        "connect_seconds": round(o.connect_s, 3),
        "records": sum(|s| s.records),
        "points_acked": sum(|s| s.points_acked),
        "zero_records": sum(|s| s.zero_records),
        "write_bytes_sent": sum(|s| s.write_bytes_sent),
        "write_bytes_acked": acked,
        "total_seconds": round(total_s, 3),
        "acked_mb_per_s": mbps(acked, total_s),
        "acked_in_window_mb_per_s": mbps(in_window, a.seconds),
        "per_agent_acked_mb": {
            "min": mb(per_agent.first().copied().unwrap_or(0)),
            "p50": mb(pct(&per_agent, 0.5)),
            "max": mb(pct(&per_agent, 1.0)),
        },
        "ack_latency_ms": {
            "pooled": dist_ms(ok.iter().flat_map(|s| s.ack_us.iter().copied()).collect()),
            "per_agent_p50": dist_ms(p50s),
            "per_agent_p99": dist_ms(p99s),
        },
        "tag_ack_latency_ms": dist_ms(ok.iter().map(|s| s.tag_ack_us).collect()),
        "credit_wait_s": {
            "p50": secs(pct(&waits, 0.5)),
            "max": secs(pct(&waits, 1.0)),
        },
        "credit_grants": sum(|s| s.credit_grants),
        "point_notices": sum(|s| s.point_notices),
        "client_cpu_seconds": round(cpu_s, 2),
        "errors": {
            "count": errors.len(),
            "first": errors.iter().take(10).collect::<Vec<_>>(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!((pct(&v, 0.5), pct(&v, 0.99), pct(&v, 1.0)), (50, 99, 100));
        assert_eq!(pct(&[], 0.5), 0);
        assert_eq!(pct(&[7], 0.99), 7);
    }
}
