#!/usr/bin/env bash
# Freeze window of the agent's cuts while 50 MB/s of writes run, and agent CPU per GB shipped.
#
# A loop disk with ext4, `ferry serve` + `ferry-agent` (eBPF tracker) on loopback, fio writing at
# RATE (default 50m) into the filesystem; N cuts (default 40, alternating crash/app, one every
# GAP seconds); the window (first FIFREEZE → last FITHAW) of each from `ferry-agent cut --json`;
# agent CPU (utime+stime from /proc) divided by the data bytes it shipped (`ferry-agent status`).
# The window's two parts are recorded when the agent reports them: inside FIFREEZE (the kernel
# flushing) and held (the agent reading the last writes and making the tag while frozen).
# AGENT_DIR: a directory with another ferry-agent and ferry-thaw-watchdog to measure (e.g. an
# older build, for a before/after in one session). TRACE=1 also records, with perf, the FIFREEZE
# ioctls, the block requests of the loop device and of the disk under its backing file, and the
# journal's commits, and says per freeze what the time inside FIFREEZE went to
# (benches/freeze-trace.py: cache flushes outstanding, FUA writes, journal commits). Root only.
# Results: benches/results/cut-window-DATE.json (and cut-window-trace-DATE.json).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-40} GAP=${GAP:-1} RATE=${RATE:-50m} SIZE=${SIZE:-1G}
T=${CARGO_TARGET_DIR:-target}/release
A=${AGENT_DIR:-$T}
cargo build --release -q -p ferry-cli -p ferry-agent -p ferry-freeze
W=$(mktemp -d /var/tmp/ferry-cutwin.XXXXXX)
DEV="" SERVE="" AGENT="" FIO="" PERF=""
cleanup() {
    [ -n "$PERF" ] && kill -INT "$PERF" 2>/dev/null && wait "$PERF" 2>/dev/null || true
    [ -n "$FIO" ] && kill "$FIO" 2>/dev/null || true
    [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null || true
    [ -n "$SERVE" ] && kill "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null || true
    umount "$W/mnt" 2>/dev/null || true
    [ -n "$DEV" ] && losetup -d "$DEV" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
truncate -s "$SIZE" "$W/disk.img"
DEV=$(losetup --find --show "$W/disk.img")
mkfs.ext4 -q -F "$DEV"
mkdir "$W/mnt" && mount "$DEV" "$W/mnt"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$T/ferry" serve --listen 127.0.0.1:$PORT --store "$W/store" --key-file "$W/key" \
    --cache-dir "$W/cache" --state-dir "$W/ps" --cache-size 4GiB 2>"$W/serve.log" &
SERVE=$!
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
"$T/ferry" passphrase show --state-dir "$W/ps" > "$W/pass"
"$A/ferry-agent" register --server 127.0.0.1:$PORT --passphrase-file "$W/pass" --state-dir "$W/as" >/dev/null
"$A/ferry-agent" --server 127.0.0.1:$PORT --disk "$DEV" --vm bench --state-dir "$W/as" \
    --crash-interval 1h --app-interval off 2>"$W/agent.log" &
AGENT=$!
for _ in $(seq 300); do [ -S "$W/as/agent.sock" ] && break; sleep 0.1; done
# Initial sync done before measuring: a first cut.
"$A/ferry-agent" cut --state-dir "$W/as" --json > /dev/null
fio --name=w --directory="$W/mnt" --rw=randwrite --bs=64k --size=512M --rate="$RATE" \
    --time_based --runtime=3600 --ioengine=psync --fsync=32 >/dev/null 2>&1 &
FIO=$!
sleep 2
cpu0=$(awk '{print $14+$15}' /proc/$AGENT/stat)
bytes0=$("$A/ferry-agent" status --state-dir "$W/as" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data_bytes_sent"])')
: > "$W/cuts.jsonl"
fails=0
if [ "${TRACE:-0}" = 1 ]; then
    perf record -q -o "$W/perf.data" -a -e syscalls:sys_enter_ioctl -e syscalls:sys_exit_ioctl \
        -e block:block_rq_issue -e block:block_rq_complete -e jbd2:jbd2_start_commit \
        -e jbd2:jbd2_end_commit 2>"$W/perf.log" &
    PERF=$!
    sleep 1
fi
for i in $(seq "$N"); do
    app=""; [ $((i % 2)) -eq 0 ] && app="--app"
    if ! "$A/ferry-agent" cut $app --state-dir "$W/as" --json >> "$W/cuts.jsonl" 2>>"$W/cut-errors.log"; then
        fails=$((fails + 1))
    fi
    sleep "$GAP"
done
cpu1=$(awk '{print $14+$15}' /proc/$AGENT/stat)
bytes1=$("$A/ferry-agent" status --state-dir "$W/as" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data_bytes_sent"])')
kill "$FIO"; wait "$FIO" 2>/dev/null || true; FIO=""
if [ -n "$PERF" ]; then
    kill -INT "$PERF"; wait "$PERF" 2>/dev/null || true; PERF=""
    perf script -i "$W/perf.data" > "$W/perf.txt" 2>/dev/null
    TOUT=benches/results/cut-window-trace-$(date -u +%Y-%m-%dT%H%M%SZ).json
    python3 benches/freeze-trace.py "$W/perf.txt" "$(lsblk -dno MAJ:MIN "$DEV" | tr -d ' ' | tr : ,)" \
        "$(findmnt -no MAJ:MIN -T "$W" | tr -d ' ' | tr : ,)" > "$TOUT"
    python3 -c "import json; r=json.load(open('$TOUT')); print('inside FIFREEZE, medians over', r['freezes'], 'freezes:', json.dumps(r['median']))"
fi
TICK=$(getconf CLK_TCK)
OUT=benches/results/cut-window-$(date -u +%Y-%m-%dT%H%M%SZ).json
python3 - "$W/cuts.jsonl" "$cpu0" "$cpu1" "$bytes0" "$bytes1" "$TICK" "$fails" "$RATE" > "$OUT" <<'PY'
import json, sys, statistics, platform
path, c0, c1, b0, b1, tick, fails, rate = sys.argv[1:]
cuts = [json.loads(l) for l in open(path) if l.strip()]
w = sorted(c["freeze_ms"] for c in cuts if c.get("freeze_ms") is not None)
def pct(p, w=w):
    return w[min(len(w) - 1, int(round(p / 100 * (len(w) - 1))))] if w else None
def part(k):
    v = sorted(c[k] for c in cuts if c.get(k) is not None)
    return {"p50": pct(50, v), "p99": pct(99, v)} if v else None
cpu = (int(c1) - int(c0)) / int(tick)
gb = (int(b1) - int(b0)) / 1e9
print(json.dumps({
    "kernel": platform.release(), "write_rate": rate, "cuts": len(cuts), "failed_cuts": int(fails),
    "app_points": sum(1 for c in cuts if c["kind"] == "app"),
    "freeze_window_ms": {"p50": pct(50), "p99": pct(99), "max": w[-1] if w else None, "all": w},
    "in_fifreeze_ms": part("freeze_kernel_ms"), "held_ms": part("freeze_held_ms"),
    "agent_cpu_s": cpu, "shipped_gb": gb, "agent_cpu_s_per_gb": cpu / gb if gb else None,
}, indent=1))
PY
python3 -c "import json,sys; r=json.load(open('$OUT')); print(f\"freeze window p50 {r['freeze_window_ms']['p50']:.1f} ms, p99 {r['freeze_window_ms']['p99']:.1f} ms over {r['cuts']} cuts ({r['failed_cuts']} failed) at {r['write_rate']}B/s; agent {r['agent_cpu_s_per_gb']:.2f} CPU s per GB shipped ({r['shipped_gb']:.2f} GB)\")"
echo "$OUT"
