//! Prometheus metrics of `ferry serve`, through the `metrics` facade and
//! `metrics-exporter-prometheus` (its HTTP listener, `metrics_listen`; off unless set). Every name
//! is here, and listed with its unit and labels in docs/METRICS.md.
//!
//! Nothing on the data path touches a metric: the values are read every second from the status
//! board, the pacer, the cache and the pipeline's counters ([`publish`], [`pipeline`]), so the
//! metrics cost the same whether or not anyone scrapes them.

use std::net::SocketAddr;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};

/// Write payload bytes received from agents, per VM (`vm`).
pub const INGEST_BYTES: &str = "ferry_ingest_bytes_total";
/// Write payload bytes durable in the cache and acknowledged, per VM (`vm`).
pub const INGEST_ACKED_BYTES: &str = "ferry_ingest_acked_bytes_total";
/// Acknowledged bytes not yet in a recovery point, per VM (`vm`).
pub const BACKLOG_BYTES: &str = "ferry_backlog_bytes";
/// Age of the VM's newest recovery point (`vm`); absent until it has one.
pub const RPO_SECONDS: &str = "ferry_rpo_seconds";
/// 1 while the VM's agent is connected (`vm`).
pub const AGENT_CONNECTED: &str = "ferry_agent_connected";
/// 1 while an ingest throttle holds the VM back (`vm`).
pub const VM_THROTTLED: &str = "ferry_vm_throttled";
/// Recovery points committed by this server process (`vm`, `kind` = crash|app).
pub const POINTS: &str = "ferry_points_total";
/// Bytes of cache files on disk.
pub const CACHE_USED_BYTES: &str = "ferry_cache_used_bytes";
/// The cache quota.
pub const CACHE_QUOTA_BYTES: &str = "ferry_cache_quota_bytes";
/// Chunk data the pipeline took from the cache (non-zero writes).
pub const PIPELINE_DATA_BYTES: &str = "ferry_pipeline_data_bytes_total";
/// Bytes of zero ranges (stored as ranges, no data).
pub const ZERO_BYTES: &str = "ferry_zero_bytes_total";
/// Bytes not stored because the chunk was stored already (dedupe savings).
pub const DEDUPE_SAVED_BYTES: &str = "ferry_dedupe_saved_bytes_total";
/// Bytes saved by compression (unique chunk bytes minus their sealed size).
pub const COMPRESSION_SAVED_BYTES: &str = "ferry_compression_saved_bytes_total";
/// Bytes of segment files written to the store (what leaves the pipeline).
pub const STORED_BYTES: &str = "ferry_stored_bytes_total";
/// Requests to Azure Blob Storage (direct mode with an azure:// store).
pub const UPLOAD_REQUESTS: &str = "ferry_upload_requests_total";
/// Retried requests to Azure.
pub const UPLOAD_RETRIES: &str = "ferry_upload_retries_total";
/// Request body bytes sent to Azure.
pub const UPLOAD_BYTES: &str = "ferry_upload_bytes_total";
/// The throttle rate in effect (`link` = ingest|upload, `vm` = a VM or `*` for the link-wide
/// one); +Inf when unlimited.
pub const THROTTLE_RATE: &str = "ferry_throttle_rate_bytes_per_second";
/// Freeze time of each consistent cut, as the agents report it (`kind`).
pub const CUT_FREEZE_SECONDS: &str = "ferry_cut_freeze_seconds";
/// Health conditions (`condition`, `vm`; `*` when server-wide): 0 ok, 1 warning, 2 critical.
pub const CONDITION: &str = "ferry_condition";
/// Connected, authenticated agent connections.
pub const CONNECTIONS: &str = "ferry_agent_connections";

/// Buckets of [`CUT_FREEZE_SECONDS`]: the freeze window is milliseconds, bounded by 2 s.
pub const FREEZE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
];

/// Errors starting the exporter.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {why}; pick another metrics_listen address, or leave it unset to serve none")]
pub struct MetricsError {
    pub addr: String,
    pub why: String,
}

/// Installs the global recorder and its HTTP listener on `addr`, on the current tokio runtime.
pub fn install(addr: &str) -> Result<SocketAddr, MetricsError> {
    let fail = |why: String| MetricsError {
        addr: addr.to_owned(),
        why,
    };
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| fail(format!("not an IP:PORT address ({e})")))?;
    // Bind first, to report a taken port as such (the exporter binds in the background), and to
    // learn the port the kernel picks for port 0.
    let sock = {
        let l = std::net::TcpListener::bind(sock).map_err(|e| fail(e.to_string()))?;
        l.local_addr().map_err(|e| fail(e.to_string()))?
    };
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(sock)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(CUT_FREEZE_SECONDS.into()),
            FREEZE_BUCKETS,
        )
        .map_err(|e| fail(e.to_string()))?
        .install()
        .map_err(|e| fail(e.to_string()))?;
    describe();
    Ok(sock)
}

fn describe() {
    describe_counter!(
        INGEST_BYTES,
        Unit::Bytes,
        "Write payload bytes received from agents"
    );
    describe_counter!(
        INGEST_ACKED_BYTES,
        Unit::Bytes,
        "Write payload bytes durable in the cache and acknowledged"
    );
    describe_gauge!(
        BACKLOG_BYTES,
        Unit::Bytes,
        "Acknowledged bytes not yet in a recovery point"
    );
    describe_gauge!(
        RPO_SECONDS,
        Unit::Seconds,
        "Age of the VM's newest recovery point"
    );
    describe_gauge!(AGENT_CONNECTED, "1 while the VM's agent is connected");
    describe_gauge!(VM_THROTTLED, "1 while an ingest throttle holds the VM back");
    describe_counter!(POINTS, "Recovery points committed by this server process");
    describe_gauge!(
        CACHE_USED_BYTES,
        Unit::Bytes,
        "Bytes of cache files on disk"
    );
    describe_gauge!(CACHE_QUOTA_BYTES, Unit::Bytes, "The cache quota");
    describe_counter!(
        PIPELINE_DATA_BYTES,
        Unit::Bytes,
        "Chunk data taken from the cache"
    );
    describe_counter!(ZERO_BYTES, Unit::Bytes, "Bytes of zero ranges");
    describe_counter!(
        DEDUPE_SAVED_BYTES,
        Unit::Bytes,
        "Bytes not stored because the chunk was stored already"
    );
    describe_counter!(
        COMPRESSION_SAVED_BYTES,
        Unit::Bytes,
        "Bytes saved by compression"
    );
    describe_counter!(
        STORED_BYTES,
        Unit::Bytes,
        "Bytes of segment files written to the store"
    );
    describe_counter!(UPLOAD_REQUESTS, "Requests to Azure Blob Storage");
    describe_counter!(UPLOAD_RETRIES, "Retried requests to Azure Blob Storage");
    describe_counter!(
        UPLOAD_BYTES,
        Unit::Bytes,
        "Request body bytes sent to Azure"
    );
    describe_gauge!(
        THROTTLE_RATE,
        "Throttle rate in effect, +Inf when unlimited"
    );
    describe_histogram!(
        CUT_FREEZE_SECONDS,
        Unit::Seconds,
        "Freeze time of consistent cuts as agents report it"
    );
    describe_gauge!(CONDITION, "Health condition: 0 ok, 1 warning, 2 critical");
    describe_gauge!(CONNECTIONS, "Authenticated agent connections");
}

/// A recovery point was committed.
pub fn point(vm: &str, kind: &str) {
    counter!(POINTS, "vm" => vm.to_owned(), "kind" => kind.to_owned()).increment(1);
}

/// Publishes what the status snapshot says (every second, from the status loop).
pub fn publish(snap: &crate::status::StatusFile, now: std::time::SystemTime) {
    gauge!(CACHE_USED_BYTES).set(snap.cache_used_bytes as f64);
    gauge!(CACHE_QUOTA_BYTES).set(snap.cache_size_bytes as f64);
    for v in &snap.vms {
        let vm = v.vm.clone();
        let received: u64 = v.disks.iter().map(|d| d.bytes_received).sum();
        counter!(INGEST_BYTES, "vm" => vm.clone()).absolute(received);
        counter!(INGEST_ACKED_BYTES, "vm" => vm.clone()).absolute(v.acked_bytes);
        gauge!(BACKLOG_BYTES, "vm" => vm.clone()).set(v.backlog_bytes as f64);
        gauge!(AGENT_CONNECTED, "vm" => vm.clone()).set(f64::from(u8::from(v.connected)));
        gauge!(VM_THROTTLED, "vm" => vm.clone()).set(f64::from(u8::from(v.throttled)));
        if let Some(p) = &v.last_point {
            if let Ok(t) = humantime::parse_rfc3339(&p.time) {
                let age = now.duration_since(t).unwrap_or_default();
                gauge!(RPO_SECONDS, "vm" => vm.clone()).set(age.as_secs_f64());
            }
        }
    }
    gauge!(CONNECTIONS).set(snap.vms.iter().filter(|v| v.connected).count() as f64);
}

/// Publishes the throttles in effect.
pub fn throttles(ingest: Option<u64>, upload: Option<u64>, vms: &[(String, Option<u64>, u32)]) {
    let r = |x: Option<u64>| x.map_or(f64::INFINITY, |b| b as f64);
    gauge!(THROTTLE_RATE, "link" => "ingest", "vm" => "*").set(r(ingest));
    gauge!(THROTTLE_RATE, "link" => "upload", "vm" => "*").set(r(upload));
    for (vm, rate, _) in vms {
        gauge!(THROTTLE_RATE, "link" => "ingest", "vm" => vm.clone()).set(r(*rate));
    }
}

/// Adds what the pipeline did since `last` (its counters restart when it is rebuilt); returns
/// the chunk data bytes it took from the cache since.
pub fn pipeline(
    now: &ferry_pipeline::PipelineStats,
    last: &mut ferry_pipeline::PipelineStats,
) -> u64 {
    let d = |n: u64, l: u64| if n >= l { n - l } else { n };
    let restarted = now.records < last.records;
    let zero = ferry_pipeline::PipelineStats::default();
    let last_ref = if restarted { &zero } else { &*last };
    counter!(PIPELINE_DATA_BYTES).increment(d(now.data_bytes, last_ref.data_bytes));
    counter!(ZERO_BYTES).increment(d(now.zero_bytes, last_ref.zero_bytes));
    counter!(DEDUPE_SAVED_BYTES).increment(d(now.dedupe_bytes, last_ref.dedupe_bytes));
    let saved = |s: &ferry_pipeline::PipelineStats| s.unique_bytes.saturating_sub(s.sealed_bytes);
    counter!(COMPRESSION_SAVED_BYTES).increment(d(saved(now), saved(last_ref)));
    counter!(STORED_BYTES).increment(d(now.segment_bytes, last_ref.segment_bytes));
    let data = d(now.data_bytes, last_ref.data_bytes);
    *last = now.clone();
    data
}

/// Publishes the Azure client's counters.
pub fn upload(stats: &ferry_azure::Stats) {
    counter!(UPLOAD_REQUESTS).absolute(stats.requests);
    counter!(UPLOAD_RETRIES).absolute(stats.retries);
    counter!(UPLOAD_BYTES).absolute(stats.bytes_sent);
}
