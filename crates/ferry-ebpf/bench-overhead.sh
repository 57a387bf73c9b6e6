#!/usr/bin/env bash
# Write-path overhead of the eBPF tracker: fio 4 KiB random writes, O_DIRECT, iodepth 32, on a
# loop device, with and without the tracker attached (examples/track.rs, draining every second),
# in interleaved runs. Prints every run, the median IOPS of each side and the overhead ratio.
#
# Usage: crates/ferry-ebpf/bench-overhead.sh            (as root; needs fio, losetup, python3)
# Env:   RUNS=5        runs per side (at least 3)
#        RUNTIME=10    seconds per fio run
#        SIZE_MIB=1024 size of the device
#        BENCH_DIR=/var/tmp  where the backing file lives (/dev/shm: a RAM-backed loop device,
#                      which shows the per-I/O cost most sharply); /dev/ram0 is used instead when
#                      the brd module can be loaded.
set -euo pipefail

RUNS="${RUNS:-5}"
RUNTIME="${RUNTIME:-10}"
SIZE_MIB="${SIZE_MIB:-1024}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

[ "$(id -u)" -eq 0 ] || { echo "bench-overhead.sh: run as root (BPF and loop devices)" >&2; exit 1; }
[ "$RUNS" -ge 3 ] || { echo "bench-overhead.sh: RUNS must be at least 3" >&2; exit 1; }
for tool in fio losetup python3; do
    command -v "$tool" >/dev/null || { echo "bench-overhead.sh: $tool not installed" >&2; exit 1; }
done

cd "$ROOT"
cargo build --release -q -p ferry-ebpf --example track
TRACK="$ROOT/target/release/examples/track"

DEV=""
IMG=""
TRACKER_PID=""
LOG="$(mktemp)"
cleanup() {
    [ -n "$TRACKER_PID" ] && kill "$TRACKER_PID" 2>/dev/null && wait "$TRACKER_PID" 2>/dev/null
    if [ -n "$IMG" ]; then
        [ -n "$DEV" ] && losetup -d "$DEV" 2>/dev/null
        rm -f "$IMG"
    fi
    rm -f "$LOG"
}
trap cleanup EXIT

if [ -e /dev/ram0 ] || modprobe brd rd_nr=1 rd_size=$((SIZE_MIB * 1024)) 2>/dev/null; then
    DEV=/dev/ram0
    BACKING="brd ramdisk"
else
    IMG="$(mktemp -p "$BENCH_DIR" ferry-bench-XXXXXX.img)"
    # Fully written, so no run pays for block allocation in the backing file system.
    dd if=/dev/zero of="$IMG" bs=1M count="$SIZE_MIB" status=none conv=fsync
    DEV="$(losetup -f --show "$IMG")"
    BACKING="loop over a file in $BENCH_DIR ($(stat -f -c %T "$BENCH_DIR"))"
fi

fio_iops() {
    fio --name=randwrite --filename="$DEV" --rw=randwrite --bs=4k --direct=1 \
        --ioengine=libaio --iodepth=32 --numjobs=1 --runtime="$RUNTIME" --time_based \
        --size="${SIZE_MIB}M" --randrepeat=0 --output-format=json \
        | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
}

start_tracker() {
    "$TRACK" --drain-every 1 "$DEV" >"$LOG" 2>&1 &
    TRACKER_PID=$!
    for _ in $(seq 100); do
        grep -q '^ready' "$LOG" && return 0
        kill -0 "$TRACKER_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "bench-overhead.sh: the tracker did not start:" >&2
    cat "$LOG" >&2
    exit 1
}

stop_tracker() {
    kill "$TRACKER_PID"
    wait "$TRACKER_PID" 2>/dev/null || true
    TRACKER_PID=""
}

echo "device: $DEV ($BACKING), ${SIZE_MIB} MiB; fio randwrite 4k direct libaio iodepth 32, ${RUNTIME}s x $RUNS per side"
echo "kernel $(uname -r), $(nproc) CPUs"
fio_iops >/dev/null # warm-up, not counted

off=()
on=()
for i in $(seq "$RUNS"); do
    # Alternate the order so a drift over time hits both sides alike.
    if [ $((i % 2)) -eq 1 ]; then order="off on"; else order="on off"; fi
    for side in $order; do
        if [ "$side" = on ]; then
            start_tracker
            iops="$(fio_iops)"
            stop_tracker
            on+=("$iops")
        else
            iops="$(fio_iops)"
            off+=("$iops")
        fi
        printf 'run %d  tracker %-3s  %8d IOPS\n' "$i" "$side" "$iops"
    done
done

python3 - "${off[*]}" "${on[*]}" <<'EOF'
import statistics, sys
off = [int(x) for x in sys.argv[1].split()]
on = [int(x) for x in sys.argv[2].split()]
m_off, m_on = statistics.median(off), statistics.median(on)
ratio = m_on / m_off
print(f"median IOPS without tracker: {m_off:.0f}")
print(f"median IOPS with tracker:    {m_on:.0f}")
print(f"ratio with/without: {ratio:.3f}  (overhead {100 * (1 - ratio):.1f}%)")
# Each round's two runs are back to back: the median of the per-round ratios is the figure least
# moved by load that changes over minutes (other work on the machine).
paired = statistics.median(a / b for a, b in zip(on, off))
print(f"median of per-round ratios: {paired:.3f}  (overhead {100 * (1 - paired):.1f}%)")
EOF

# One more run with the kernel's BPF run-time statistics on (they cost a little themselves, so
# they stay off during the measured runs): CPU time per program run, independent of IOPS noise.
stats_before="$(sysctl -n kernel.bpf_stats_enabled)"
sysctl -qw kernel.bpf_stats_enabled=1
start_tracker
fio_iops >/dev/null
echo "CPU time per program run (kernel.bpf_stats_enabled, one extra ${RUNTIME}s run; counts include"
echo "every block device's bios, tracked or not):"
for fd in /proc/"$TRACKER_PID"/fdinfo/*; do
    grep -q '^prog_type' "$fd" 2>/dev/null || continue
    id="$(awk '/^prog_id/ {print $2}' "$fd")"
    name="$(awk -v id="$id" '$1 == "program" && $4 == id {print $2}' "$LOG")"
    awk -v name="${name:-prog $id}" '/^run_time_ns/ {t=$2} /^run_cnt/ {n=$2}
         END { printf "  %-16s %9d runs, %4.0f ns/run\n", name, n, n ? t / n : 0 }' "$fd"
done
stop_tracker
sysctl -qw kernel.bpf_stats_enabled="$stats_before"
