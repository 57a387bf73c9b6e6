#!/usr/bin/env bash
# One `ferry serve` and many simulated agents (DESIGN.md §6: one process server, target 200 agents).
#
# Builds `ferry` and `ferry-simagents` in release (copied into the work dir, so a rebuild by someone
# else during the run cannot swap binaries under it), starts `ferry serve` on loopback with a fresh
# local store, cache and state directory in WORKDIR, writes its registration passphrase to a file
# (`ferry passphrase show`), and runs `ferry-simagents`: AGENTS agents register, connect (TLS 1.3,
# pinned), and then all at once write WRITE_SIZE records of incompressible, never-repeated data at
# random offsets of their own DISK_SIZE disk, under the server's credit, for DURATION seconds; each
# then sends a Tag and waits for its Ack. See benches/src/bin/ferry-simagents/.
#
# While it runs, the server's VmRSS, VmHWM, RssAnon, RssFile and CPU time are sampled every 0.5 s
# from /proc/PID/{status,stat}, with the cache directory's size; per-thread CPU (/proc/PID/task) and
# the disk's writes and busy time (/proc/diskstats, the whole device under WORKDIR) are read when the
# agents are done and when the points are committed. After the agents are done the
# script waits until the pipeline has committed every agent's recovery point (the "recovery point
# committed" log lines) — the drain tail — then stops the server with SIGTERM and, with VERIFY=1,
# restores one agent's point with `ferry restore --verify` (the Tag carries the blake3 of the disk
# the agent wrote, so this checks the bytes end to end).
# Prints a one-line summary and writes everything to benches/results/agents-DATE.json.
#
# Environment: AGENTS (200), DURATION (seconds of writing, 20), DISK_SIZE (bytes per agent disk,
# 64 MiB), WRITE_SIZE (bytes per Write record, 64 KiB), RATE (bytes/s per agent, 0 = as fast as
# credit allows), ZERO_EVERY (every Nth record a Zero record, 0 = none), CACHE_SIZE (ferry serve
# --cache-size, 8GiB; credit pauses above 80% of it), THREADS (ferry serve --threads; default all
# cores), CLIENT_THREADS (ferry-simagents runtime threads; default all cores), VERIFY (1),
# DRAIN_TIMEOUT (seconds to wait for the points, 900), SERVE_CPUS (a taskset CPU list for
# `ferry serve` only, e.g. 0; the simulated agents stay unpinned), WORKDIR (default a new mktemp dir under
# /var/tmp, removed at the end unless KEEP=1; a given WORKDIR is never removed), FERRY_BIN (a `ferry`
# binary to measure instead of building ferry-cli from this tree), CARGO_TARGET_DIR.
set -euo pipefail

AGENTS=${AGENTS:-200}
DURATION=${DURATION:-20}
DISK_SIZE=${DISK_SIZE:-$((64 << 20))}
WRITE_SIZE=${WRITE_SIZE:-$((64 << 10))}
RATE=${RATE:-0}
ZERO_EVERY=${ZERO_EVERY:-0}
CACHE_SIZE=${CACHE_SIZE:-8GiB}
THREADS=${THREADS:-}
CLIENT_THREADS=${CLIENT_THREADS:-}
VERIFY=${VERIFY:-1}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-900}
# ferry serve's least credit per connection is 256 KiB (MIN_SHARE): a larger record can wait
# forever once many connections hold credit.
((WRITE_SIZE <= 192 << 10)) || echo "agents.sh: warning: WRITE_SIZE $WRITE_SIZE is above 192 KiB; with many agents a record can exceed a connection's credit share (256 KiB) and wait" >&2

die() { echo "agents.sh: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 not found"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
if [[ -n ${FERRY_BIN:-} ]]; then
    cargo build --release -p ferry-benches
else
    cargo build --release -p ferry-benches -p ferry-cli
fi
target=${CARGO_TARGET_DIR:-target}

if [[ -n ${WORKDIR:-} ]]; then
    mkdir -p "$WORKDIR"
    work=$(realpath "$WORKDIR")
    keep=1
else
    work=$(mktemp -d /var/tmp/ferry-agents.XXXXXX)
    keep=${KEEP:-0}
fi
serve_pid=""
sampler_pid=""
cleanup() {
    [[ -z $sampler_pid ]] || kill "$sampler_pid" 2>/dev/null || true
    if [[ -n $serve_pid ]]; then
        kill -TERM "$serve_pid" 2>/dev/null || true
        wait "$serve_pid" 2>/dev/null || true
    fi
    [[ $keep == 1 ]] || rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cp "${FERRY_BIN:-$target/release/ferry}" "$work/ferry"
cp "$target/release/ferry-simagents" "$work/ferry-simagents"
ferry=$work/ferry
store=$work/store
cache=$work/cache
state=$work/state
rm -rf -- "$store" "$cache" "$state"
(umask 077 && rm -f "$work/key" && printf '%064x\n' 7 >"$work/key")
"$ferry" passphrase show --state-dir "$state" >"$work/passphrase"
chmod 600 "$work/passphrase"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

threads_arg=()
[[ -z $THREADS ]] || threads_arg=(--threads "$THREADS")
client_threads_arg=()
[[ -z $CLIENT_THREADS ]] || client_threads_arg=(--threads "$CLIENT_THREADS")

echo "work dir: $work; kernel $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
pin=()
[[ -z ${SERVE_CPUS:-} ]] || pin=(taskset -c "$SERVE_CPUS")
NO_COLOR=1 "${pin[@]}" "$ferry" serve --listen "127.0.0.1:$port" --store "$store" --key-file "$work/key" \
    --cache-dir "$cache" --state-dir "$state" --cache-size "$CACHE_SIZE" "${threads_arg[@]}" \
    >"$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 300); do
    grep -q "process server listening" "$work/serve.log" && break
    kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.log" >&2; die "ferry serve exited"; }
    sleep 0.1
done
grep -q "process server listening" "$work/serve.log" || die "ferry serve did not start listening"

# Sampler: seconds since start, VmRSS, VmHWM, RssAnon, RssFile (KiB), utime+stime ticks, cache
# directory bytes.
tick=$(getconf CLK_TCK)
samples=$work/samples.tsv
(
    t0=$(date +%s.%N)
    while kill -0 "$serve_pid" 2>/dev/null; do
        mem=$(awk '/^(VmRSS|VmHWM|RssAnon|RssFile):/ {m[$1] = $2}
            END {printf "%d\t%d\t%d\t%d", m["VmRSS:"], m["VmHWM:"], m["RssAnon:"], m["RssFile:"]}' \
            "/proc/$serve_pid/status" 2>/dev/null || printf '0\t0\t0\t0')
        # Fields 14 and 15 (utime, stime); the command name (field 2) has no spaces here.
        cpu=$(awk '{print $14 + $15}' "/proc/$serve_pid/stat" 2>/dev/null || echo 0)
        bytes=$(du -sb "$cache" 2>/dev/null | cut -f1 || echo 0)
        t=$(awk -v now="$(date +%s.%N)" -v t0="$t0" 'BEGIN { printf "%.2f", now - t0 }')
        printf '%s\t%s\t%s\t%s\n' "$t" "$mem" "$cpu" "${bytes:-0}" >>"$samples"
        sleep 0.5
    done
) &
sampler_pid=$!

now() { date +%s.%N; }
# The disk under WORKDIR (shared with everything else on the machine): "sectors-written io-ms".
disk=$(basename "$(findmnt -n -o SOURCE -T "$work" 2>/dev/null || echo none)")
diskstat() { awk -v d="$disk" '$3 == d {print $10, $13; f = 1} END {if (!f) print "0 0"}' /proc/diskstats; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$serve_pid/stat" 2>/dev/null || echo 0; }
# threads_cpu FILE: the server's CPU ticks so far per thread (tid, name, ticks): is one thread the
# bottleneck?
threads_cpu() {
    local t
    for t in /proc/"$serve_pid"/task/*; do
        printf '%s\t%s\t%s\n' "${t##*/}" "$(cat "$t/comm" 2>/dev/null)" \
            "$(sed 's/.*) //' "$t/stat" 2>/dev/null | awk '{print $12 + $13}')"
    done >"$1"
}
load_before=$(cut -d' ' -f1 /proc/loadavg)
t_start=$(now)
disk_start=$(diskstat)
t_start_epoch=$(date -u +%s.%N)
cpu_start=$(cpu_ticks)
echo "ferry serve on 127.0.0.1:$port (pid $serve_pid, cache $CACHE_SIZE); $AGENTS agents x ${DURATION}s..."
rc=0
"$work/ferry-simagents" --server "127.0.0.1:$port" --passphrase-file "$work/passphrase" \
    --agents "$AGENTS" --seconds "$DURATION" --disk-size "$DISK_SIZE" --write-size "$WRITE_SIZE" \
    --rate "$RATE" --zero-every "$ZERO_EVERY" "${client_threads_arg[@]}" \
    >"$work/simagents.json" 2>"$work/simagents.err" || rc=$?
t_agents=$(now)
cpu_agents=$(cpu_ticks)
disk_agents=$(diskstat)
threads_cpu "$work/threads-agents.tsv"
cat "$work/simagents.err" >&2
[[ -s $work/simagents.json ]] || die "ferry-simagents wrote no report (exit $rc)"

points() { grep -c "recovery point committed" "$work/serve.log" || true; }
ok_agents=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["agents_ok"])' "$work/simagents.json")
echo "agents done (exit $rc, $ok_agents ok); waiting for the pipeline to commit $ok_agents points..."
deadline=$(($(date +%s) + DRAIN_TIMEOUT))
while (($(points) < ok_agents && $(date +%s) < deadline)); do
    kill -0 "$serve_pid" 2>/dev/null || break
    sleep 0.5
done
t_drained=$(now)
cpu_drained=$(cpu_ticks)
disk_drained=$(diskstat)
threads_cpu "$work/threads-drained.tsv"
n_points=$(points)
hwm_kib=$(awk '/^VmHWM/ {print $2}' "/proc/$serve_pid/status" 2>/dev/null || echo 0)
kill -0 "$serve_pid" 2>/dev/null || echo "warning: ferry serve exited early; see $work/serve.log" >&2
paused=$(grep -c "pausing credit" "$work/serve.log" || true)
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=""
kill -TERM "$serve_pid" 2>/dev/null || true
serve_rc=0
wait "$serve_pid" || serve_rc=$?
serve_pid=""
store_bytes=$(du -sb "$store" | cut -f1)

verified=null
if [[ $VERIFY == 1 && $n_points -gt 0 ]]; then
    vm=sim-000
    if "$ferry" restore --store "$store" --key-file "$work/key" --point latest --vm "$vm" \
        --out "$work/verify.img" --verify >"$work/verify.log" 2>&1; then
        verified=true
    else
        verified=false
        cat "$work/verify.log" >&2
    fi
    rm -f "$work/verify.img"
fi

mkdir -p benches/results
result=benches/results/agents-$(date -u +%Y-%m-%dT%H%M%SZ).json
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
python3 - "$work/simagents.json" "$samples" "$result" "$rev" "$tick" "$t_start" "$t_agents" \
    "$t_drained" "$cpu_start" "$cpu_agents" "$cpu_drained" "$hwm_kib" "$n_points" "$paused" \
    "$store_bytes" "$verified" "$CACHE_SIZE" "${THREADS:-all}" "$load_before" "$rc" "$serve_rc" \
    "$work/serve.log" "$t_start_epoch" "$work/threads-agents.tsv" "$work/threads-drained.tsv" \
    "$disk" "$disk_start" "$disk_agents" "$disk_drained" <<'EOF'
import datetime, json, os, platform, statistics, sys
(sim_path, samples_path, result, rev, tick, t_start, t_agents, t_drained, cpu_start, cpu_agents,
 cpu_drained, hwm_kib, n_points, paused, store_bytes, verified, cache_size, threads, load,
 rc, serve_rc, log_path, t_start_epoch, threads_agents, threads_drained, disk, disk_start,
 disk_agents, disk_drained) = sys.argv[1:]
sim = json.load(open(sim_path))
tick = float(tick)
t_start, t_agents, t_drained = float(t_start), float(t_agents), float(t_drained)
samples = [l.split("\t") for l in open(samples_path).read().splitlines() if l.count("\t") == 6]
samples = [(float(x[0]), *map(int, x[1:])) for x in samples]
agents_s = t_agents - t_start
drain_s = t_drained - t_agents
cpu_a = (int(cpu_agents) - int(cpu_start)) / tick
cpu_d = (int(cpu_drained) - int(cpu_agents)) / tick
rss = [s[1] for s in samples]
cache = [s[6] for s in samples]
acked_b = sim["write_bytes_acked"]
# When each point was committed, in seconds after the agents were done (from the server's log).
commits = []
for line in open(log_path, errors="replace"):
    if "recovery point committed" in line:
        ts = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
        commits.append(ts - float(t_start_epoch) - (t_agents - t_start))
commits.sort()
def by_thread(path):
    """tid -> (name, CPU seconds since the thread started)."""
    out = {}
    for line in open(path).read().splitlines():
        f = line.split("\t")
        if len(f) == 3 and f[2].strip():
            out[f[0]] = (f[1], int(f[2]) / tick)
    return out
th_a, th_d = by_thread(threads_agents), by_thread(threads_drained)
# The busiest threads during the agents phase; share = CPU seconds / phase seconds (1.0 = a core).
busiest = sorted(({"tid": int(tid), "name": name, "cpu_s_agents_phase": round(cpu, 2),
                   "core_share_agents_phase": round(cpu / (t_agents - t_start), 2),
                   "cpu_s_at_drained": round(th_d[tid][1], 2) if tid in th_d else None}
                  for tid, (name, cpu) in th_a.items()), key=lambda t: -t["cpu_s_agents_phase"])[:12]
mib = lambda kib: round(kib / 1024, 1)
def disk_phase(a, b, secs):
    (sa, ta), (sb, tb) = map(int, a.split()), map(int, b.split())
    return {"write_mb_per_s": round((sb - sa) * 512 / secs / 1e6, 1) if secs > 0 else None,
            "busy_share": round((tb - ta) / 1e3 / secs, 2) if secs > 0 else None}
import hashlib
binary = os.path.join(os.path.dirname(log_path), "ferry")
doc = {
    "what": "ferry serve on loopback with N simulated agents (ferry-simagents); benches/agents.sh",
    "source": rev,
    # What ran: FERRY_BIN's path (else this tree's build) and the binary's sha256.
    "ferry_binary": {"path": os.environ.get("FERRY_BIN") or "built from this tree",
                     "sha256": hashlib.sha256(open(binary, "rb").read()).hexdigest()},
    "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "kernel": platform.release(),
             "loadavg_1m_before": float(load)},
    "server": {
        "cache_size": cache_size, "pipeline_threads": threads,
        "vm_hwm_mib": mib(int(hwm_kib)),
        "vm_rss_mib": {"p50": mib(statistics.median(rss)) if rss else None,
                       "max": mib(max(rss)) if rss else None},
        "rss_anon_mib_max": mib(max(s[3] for s in samples)) if samples else None,
        "rss_file_mib_max": mib(max(s[4] for s in samples)) if samples else None,
        "cpu_seconds_during_agents": round(cpu_a, 2),
        "cpu_cores_during_agents": round(cpu_a / agents_s, 2) if agents_s > 0 else None,
        "cpu_seconds_drain_tail": round(cpu_d, 2),
        "cache_bytes_max": max(cache) if cache else None,
        "busiest_threads": busiest,
        "credit_pauses": int(paused),
        "exit_code": int(serve_rc),
    },
    "disk": {"device": disk, "note": "whole device, other work on the machine included",
             "agents_phase": disk_phase(disk_start, disk_agents, agents_s),
             "drain_tail": disk_phase(disk_agents, disk_drained, drain_s)},
    "agents_phase_seconds": round(agents_s, 2),
    # The issue-12 figures: bytes acknowledged over the writing time (acked) and over the time
    # until the last point is committed (sustained), and the drain tail as a share of the writing.
    "keeps_up": {
        "acked_mb_per_s": round(acked_b / agents_s / 1e6, 1),
        "sustained_mb_per_s": round(acked_b / (agents_s + drain_s) / 1e6, 1),
        "sustained_over_acked": round(agents_s / (agents_s + drain_s), 3),
        "tail_over_writing": round(drain_s / agents_s, 3),
    },
    "drain_tail_seconds": round(drain_s, 2),
    "points_committed": int(n_points),
    "point_commits_s_after_agents": {
        "first": round(commits[0], 2), "p50": round(statistics.median(commits), 2),
        "last": round(commits[-1], 2)} if commits else None,
    "store_bytes": int(store_bytes),
    "verified_one_point": None if verified == "null" else verified == "true",
    "simagents_exit_code": int(rc),
    "simagents": sim,
    "samples": [{"t": t, "rss_kib": r, "hwm_kib": h, "anon_kib": a, "file_kib": f, "cpu_ticks": c,
                 "cache_bytes": b} for t, r, h, a, f, c, b in samples],
}
with open(result, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
lat = sim["ack_latency_ms"]
print(f"agents: {sim['agents_ok']}/{sim['agents']} ok, {sim['errors']['count']} errors; "
      f"acked {sim['acked_mb_per_s']} MB/s ({sim['acked_in_window_mb_per_s']} MB/s within the "
      f"{sim['seconds']:g}s window); ack latency per agent p50 (median agent) "
      f"{lat['per_agent_p50']['p50']} ms, p99 (median agent) {lat['per_agent_p99']['p50']} ms, "
      f"worst agent p99 {lat['per_agent_p99']['max']} ms; server VmHWM {doc['server']['vm_hwm_mib']} MiB, "
      f"CPU {doc['server']['cpu_cores_during_agents']} cores; credit pauses {paused}; "
      f"{n_points} points in +{drain_s:.1f}s; verified: {json.dumps(doc['verified_one_point'])}")
k = doc["keeps_up"]
print(f"keeps up: acked {k['acked_mb_per_s']} MB/s over {agents_s:.1f}s of writing, sustained "
      f"{k['sustained_mb_per_s']} MB/s (x{k['sustained_over_acked']}), drain tail "
      f"{drain_s:.1f}s ({k['tail_over_writing'] * 100:.1f}% of the writing)")
print(f"written to {result}")
EOF
[[ $rc == 0 ]] || die "ferry-simagents reported errors (exit $rc); see $result"
((n_points >= ok_agents)) || die "only $n_points of $ok_agents points were committed within ${DRAIN_TIMEOUT}s"
[[ $verified != false ]] || die "the restored point of sim-000 did not verify"
