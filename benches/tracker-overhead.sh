#!/usr/bin/env bash
# Write-path cost of the eBPF tracker (crates/ferry-ebpf): fio 4 KiB random writes, O_DIRECT, libaio,
# iodepth 32, one job, on a loop device backed by a fully written file in BENCH_DIR (/var/tmp: a real
# file system, not tmpfs), with and without `ferry-track` attached. ferry-track opens
# `Tracker::open(&[DEV])` and drains every INTERVAL seconds with `drain_all()`, as the agent would.
#
# R rounds of one run per side, interleaved; the order alternates (off,on / on,off / …) so a drift in
# the machine's load hits both sides alike. Each "on" run starts a fresh ferry-track, waits for its
# "ready" (programs attached) before fio starts, and stops it with SIGTERM after fio, keeping its JSON
# summary (drains, dirty chunks, resyncs). A warm-up run (not counted) comes first.
# The measured runs have kernel.bpf_stats_enabled=0 (its accounting costs a little per program run);
# one extra "on" run afterwards (not counted) turns it on to read the programs' CPU time per run, a
# figure the machine's noise does not move. The sysctl's previous value is put back at the end.
# Reports the median IOPS of each side, their ratio (on/off; the aim is > 0.97, i.e. < 3% overhead),
# the median of the per-round ratios with a bootstrap 95% interval, and writes every run to
# benches/results/tracker-overhead-DATE.json.
#
# Usage: benches/tracker-overhead.sh    (as root: BPF and loop devices; installs fio with apt if missing)
# Environment: R (rounds, default 5), RUNTIME (seconds per fio run, default 20), WARMUP (seconds of
# the uncounted first run, default 5), SIZE_MIB (device size, default 1024), BENCH_DIR (where the
# backing file lives, default /var/tmp), DIRECT_IO (losetup --direct-io, on|off, default on: the loop
# device then bypasses the page cache of the backing file, which makes runs steadier),
# INTERVAL (ferry-track drain interval in seconds, default 1), CARGO_TARGET_DIR.
set -euo pipefail

R=${R:-5}
RUNTIME=${RUNTIME:-20}
WARMUP=${WARMUP:-5}
SIZE_MIB=${SIZE_MIB:-1024}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
DIRECT_IO=${DIRECT_IO:-on}
INTERVAL=${INTERVAL:-1}

die() { echo "tracker-overhead.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run as root (BPF programs and loop devices)"
[[ $R =~ ^[0-9]+$ && $R -ge 1 ]] || die "R must be a positive integer"
[[ $DIRECT_IO == on || $DIRECT_IO == off ]] || die "DIRECT_IO must be on or off"
command -v python3 >/dev/null || die "python3 not found"
command -v losetup >/dev/null || die "losetup not found (util-linux)"
if ! command -v fio >/dev/null; then
    echo "fio not found; installing it with apt-get"
    apt-get install -y fio >/dev/null || { apt-get update >/dev/null && apt-get install -y fio >/dev/null; } ||
        die "cannot install fio"
fi
fstype() { findmnt -n -o FSTYPE -T "$1" 2>/dev/null || stat -f -c %T "$1"; }
[[ $(fstype "$BENCH_DIR") != tmpfs ]] || echo "warning: $BENCH_DIR is tmpfs (RAM-backed)" >&2

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build --release -p ferry-benches --bin ferry-track
target=${CARGO_TARGET_DIR:-target}

work=$(mktemp -d "$BENCH_DIR/ferry-tracker-overhead.XXXXXX")
dev=""
track_pid=""
stats_before=""
cleanup() {
    if [[ -n $track_pid ]]; then
        kill "$track_pid" 2>/dev/null || true
        wait "$track_pid" 2>/dev/null || true
    fi
    [[ -z $dev ]] || losetup -d "$dev" 2>/dev/null || true
    [[ -z $stats_before ]] || sysctl -qw kernel.bpf_stats_enabled="$stats_before" || true
    rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A private copy: someone else's rebuild during the run cannot swap the binary under it.
cp "$target/release/ferry-track" "$work/ferry-track"
track=$work/ferry-track

img=$work/disk.img
echo "writing a ${SIZE_MIB} MiB backing file in $BENCH_DIR ($(fstype "$BENCH_DIR"))..."
# Fully written, so no run pays for block allocation in the backing file system.
dd if=/dev/zero of="$img" bs=1M count="$SIZE_MIB" status=none conv=fsync
dev=$(losetup -f --show --direct-io="$DIRECT_IO" "$img")
dio=$(cat "/sys/block/${dev#/dev/}/loop/dio" 2>/dev/null || echo "?")
echo "device $dev (direct I/O: $dio); kernel $(uname -r); $(nproc) CPUs; $(fio --version)"

runs=$work/runs.jsonl
: >"$runs"

# fio_run SECONDS OUT: one fio job, JSON to OUT.
fio_run() {
    fio --name=randwrite --filename="$dev" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
        --iodepth=32 --numjobs=1 --runtime="$1" --time_based --size="${SIZE_MIB}M" --randrepeat=0 \
        --group_reporting --output-format=json --output="$2" >/dev/null
}

start_tracker() {
    "$track" --interval "$INTERVAL" "$dev" >"$work/track.out" 2>"$work/track.err" &
    track_pid=$!
    for _ in $(seq 300); do
        grep -qx ready "$work/track.out" && return 0
        kill -0 "$track_pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$work/track.err" >&2
    die "ferry-track did not report ready"
}

stop_tracker() {
    kill -TERM "$track_pid"
    wait "$track_pid" || die "ferry-track failed: $(cat "$work/track.err")"
    track_pid=""
}

stats_before=$(sysctl -n kernel.bpf_stats_enabled)
[[ $stats_before == 0 ]] || echo "note: kernel.bpf_stats_enabled was $stats_before; 0 for the measured runs, restored at the end"
sysctl -qw kernel.bpf_stats_enabled=0

echo "warm-up: ${WARMUP}s (not counted)"
fio_run "$WARMUP" "$work/warmup.json"

for ((round = 1; round <= R; round++)); do
    if ((round % 2)); then order="off on"; else order="on off"; fi
    for side in $order; do
        load=$(cut -d' ' -f1 /proc/loadavg)
        summary=null
        if [[ $side == on ]]; then
            start_tracker
            fio_run "$RUNTIME" "$work/fio.json"
            stop_tracker
            summary=$(tail -n 1 "$work/track.out")
        else
            fio_run "$RUNTIME" "$work/fio.json"
        fi
        python3 - "$work/fio.json" "$round" "$side" "$load" "$summary" "$runs" <<'EOF'
import json, sys
path, rnd, side, load, summary, runs = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
w = job["write"]
clat = w.get("clat_ns", {}).get("percentile", {})
track = json.loads(summary)
r = {
    "round": int(rnd), "tracker": side, "iops": round(w["iops"]), "write_ios": w["total_ios"],
    "clat_us": {"p50": clat.get("50.000000", 0) / 1e3, "p99": clat.get("99.000000", 0) / 1e3},
    "fio_cpu_percent": {"usr": job["usr_cpu"], "sys": job["sys_cpu"]},
    "loadavg_1m_before": float(load), "ferry_track": track,
}
with open(runs, "a") as f:
    f.write(json.dumps(r) + "\n")
extra = (f"  drains {track['drains']}, dirty chunks {track['dirty_chunks']}, resyncs {track['resyncs']}"
         if track else "")
print(f"round {rnd}  tracker {side:<3}  {r['iops']:>8} IOPS  load {float(load):.2f}{extra}")
EOF
    done
done

# The extra run with BPF run-time statistics: CPU time per program run and per write.
sysctl -qw kernel.bpf_stats_enabled=1
start_tracker
fio_run "$RUNTIME" "$work/fio-stats.json"
stop_tracker
sysctl -qw kernel.bpf_stats_enabled=0
tail -n 1 "$work/track.out" >"$work/stats-track.json"

mkdir -p benches/results
result=benches/results/tracker-overhead-$(date -u +%Y-%m-%dT%H%M%SZ).json
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
python3 - "$runs" "$result" "$rev" "$R" "$RUNTIME" "$SIZE_MIB" "$BENCH_DIR" "$DIRECT_IO" "$dio" \
    "$INTERVAL" "$(fio --version)" "$(fstype "$BENCH_DIR")" "$work/stats-track.json" \
    "$work/fio-stats.json" "$stats_before" <<'EOF'
import json, os, platform, random, statistics, sys
(runs_path, result, rev, rounds, runtime, size_mib, bench_dir, direct_io, dio, interval, fio, fs,
 stats_track, stats_fio, stats_before) = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path)]
st = json.load(open(stats_track))
sw = json.load(open(stats_fio))["jobs"][0]["write"]
bpf_ns = sum(p["run_time_ns"] for p in st["programs"])
ns_per_write = bpf_ns / sw["total_ios"] if sw["total_ios"] else 0
bpf = {
    "note": "one extra run with kernel.bpf_stats_enabled=1 (not among the measured runs); run "
            "counts include every block device's bios",
    "iops": round(sw["iops"]), "write_ios": sw["total_ios"],
    "programs": [{k: p[k] for k in ("name", "run_cnt", "run_time_ns")} | {"ns_per_run": round(p["ns_per_run"], 1)}
                 for p in st["programs"]],
    # Each 4 KiB write is one bio (queue program) and one request (completion program) on the
    # tracked disk.
    "ns_per_write": round(sum(p["ns_per_run"] for p in st["programs"]), 1),
    # The programs also run (and return early) for every other disk's bios: with a loop device,
    # each write is a second bio on the backing file's disk. All program time over fio's writes:
    "ns_per_write_all_disks": round(ns_per_write, 1),
    "queue_runs_per_write": round(next((p["run_cnt"] for p in st["programs"]
                                        if p["name"] == "on_bio_queue"), 0) / max(sw["total_ios"], 1), 2),
}
# Share of one CPU the programs take at this IOPS: what the tracker can cost a submission path
# that is CPU-bound on one core.
bpf["cpu_share_at_these_iops"] = round(bpf["ns_per_write"] * sw["iops"] / 1e9, 4)
off = [r["iops"] for r in runs if r["tracker"] == "off"]
on = [r["iops"] for r in runs if r["tracker"] == "on"]
per_round = [
    next(r["iops"] for r in runs if r["round"] == k and r["tracker"] == "on")
    / next(r["iops"] for r in runs if r["round"] == k and r["tracker"] == "off")
    for k in range(1, int(rounds) + 1)
]
m_off, m_on = statistics.median(off), statistics.median(on)
# Each round's two runs are back to back, so their ratio is the figure least moved by load that
# changes over minutes; a bootstrap over rounds (fixed seed) says how far its median can be trusted.
rng = random.Random(0)
boot = sorted(statistics.median(rng.choices(per_round, k=len(per_round))) for _ in range(2000))
ci95 = [round(boot[50], 4), round(boot[1949], 4)]
tracks = [r["ferry_track"] for r in runs if r["ferry_track"]]
doc = {
    "what": "fio 4k randwrite O_DIRECT libaio iodepth 32 on a loop device, with and without the "
            "eBPF tracker attached (ferry-track, drain_all every interval); benches/tracker-overhead.sh",
    "source": rev,
    "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "kernel": platform.release(),
             "loadavg_1m_before_runs": [r["loadavg_1m_before"] for r in runs]},
    "fio": fio,
    "device": {"kind": "loop", "size_mib": int(size_mib), "backing_dir": bench_dir,
               "backing_fs": fs, "losetup_direct_io": direct_io, "loop_dio": dio},
    "rounds": int(rounds), "runtime_s": float(runtime), "drain_interval_s": float(interval),
    "median_iops": {"off": m_off, "on": m_on},
    "ratio_on_off": round(m_on / m_off, 4),
    "overhead_percent": round(100 * (1 - m_on / m_off), 2),
    "median_per_round_ratio": round(statistics.median(per_round), 4),
    "median_per_round_ratio_ci95": ci95,
    "per_round_ratios": [round(x, 4) for x in per_round],
    "bpf_stats_enabled_before": int(stats_before),
    "bpf_cost": bpf,
    "tracker_totals": {"drains": sum(t["drains"] for t in tracks),
                       "dirty_chunks": sum(t["dirty_chunks"] for t in tracks),
                       "resyncs": sum(t["resyncs"] for t in tracks)},
    "runs": runs,
}
with open(result, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print(f"tracker overhead: median IOPS off {m_off:.0f}, on {m_on:.0f}, ratio on/off "
      f"{doc['ratio_on_off']:.3f} ({doc['overhead_percent']:+.1f}% overhead; median per-round ratio "
      f"{doc['median_per_round_ratio']:.3f}, 95% CI {ci95[0]:.3f}-{ci95[1]:.3f}), {rounds} x {runtime}s, "
      f"resyncs "
      f"{doc['tracker_totals']['resyncs']}; BPF CPU {bpf['ns_per_write']:.0f} ns per write "
      f"({100 * bpf['cpu_share_at_these_iops']:.1f}% of a core at {bpf['iops']} IOPS)")
print(f"written to {result}")
EOF
