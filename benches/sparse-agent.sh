#!/usr/bin/env bash
# The agent's initial sync of a sparse disk: what it reads from the device (issue 12: a disk
# holding little data reads about that data, not the whole disk), with the eBPF tracker.
#
# A SIZE-byte sparse file holding DATA bytes of incompressible data in 64 MiB extents is attached
# as a loop device; `ferry serve` + `ferry-agent --disk /dev/loopN` on loopback; the first cut
# (`ferry-agent cut`) returns once the initial sync is done and its point is tagged. What was read
# from the device is the kernel's count for it (/sys/class/block/loopN/stat, sectors read, from
# just before the agent starts to the cut's reply; the agent's probe read of chunk 0 included).
# The loop device's holes are its backing file's (crates/ferry-read/src/holes.rs); any other
# block device is read whole. With VERIFY=1, `ferry restore --verify` restores the point and
# checks it against the digest the agent computed. AGENT_DIR: a directory with another
# ferry-agent to measure (e.g. an older build, for a before/after in one session). Root only.
# Environment: SIZE (64 GiB), DATA (1 GiB), VERIFY (0). Results:
# benches/results/sparse-agent-DATE.json.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-$((64 << 30))} DATA=${DATA:-$((1 << 30))} VERIFY=${VERIFY:-0}
T=${CARGO_TARGET_DIR:-target}/release
A=${AGENT_DIR:-$T}
cargo build --release -q -p ferry-cli -p ferry-agent -p ferry-freeze
W=$(mktemp -d /var/tmp/ferry-sparse-agent.XXXXXX)
DEV="" SERVE="" AGENT=""
cleanup() {
    [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null || true
    [ -n "$SERVE" ] && kill "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null || true
    [ -n "$DEV" ] && losetup -d "$DEV" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
python3 benches/mksparse.py "$W/disk.img" "$SIZE" "$DATA"
DEV=$(losetup --find --show "$W/disk.img")
NAME=$(basename "$DEV")
echo "$DEV over a $SIZE-byte file holding $(du -B1 "$W/disk.img" | cut -f1) bytes"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$T/ferry" serve --listen 127.0.0.1:$PORT --store "$W/store" --key-file "$W/key" \
    --cache-dir "$W/cache" --state-dir "$W/ps" --cache-size 4GiB 2>"$W/serve.log" &
SERVE=$!
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
"$T/ferry" passphrase show --state-dir "$W/ps" > "$W/pass"
"$A/ferry-agent" register --server 127.0.0.1:$PORT --passphrase-file "$W/pass" --state-dir "$W/as" >/dev/null
read0=$(awk '{print $3}' /sys/class/block/$NAME/stat)
t0=$(date +%s.%N)
"$A/ferry-agent" --server 127.0.0.1:$PORT --disk "$DEV" --vm sparse --state-dir "$W/as" \
    --crash-interval 1h --app-interval off 2>"$W/agent.log" &
AGENT=$!
for _ in $(seq 300); do [ -S "$W/as/agent.sock" ] && break; sleep 0.1; done
"$A/ferry-agent" cut --state-dir "$W/as" --json > "$W/cut.json"
t1=$(date +%s.%N)
read1=$(awk '{print $3}' /sys/class/block/$NAME/stat)
cpu=$(awk '{print $14+$15}' /proc/$AGENT/stat)
rss=$(awk '/VmHWM/ {print $2}' /proc/$AGENT/status)
verified=null
if [ "$VERIFY" = 1 ]; then
    # The point is committed once the server has drained it; then both stop.
    for _ in $(seq 1200); do grep -q "recovery point committed" "$W/serve.log" && break; sleep 0.5; done
    kill "$AGENT"; wait "$AGENT" 2>/dev/null || true; AGENT=""
    kill "$SERVE"; wait "$SERVE" 2>/dev/null || true; SERVE=""
    if "$T/ferry" restore --store "$W/store" --key-file "$W/key" --vm sparse --point latest \
        --out "$W/restored.img" --verify > "$W/restore.log" 2>&1; then verified=true; else verified=false; cat "$W/restore.log"; fi
fi
OUT=benches/results/sparse-agent-$(date -u +%Y-%m-%dT%H%M%SZ).json
python3 - "$SIZE" "$DATA" "$read0" "$read1" "$t0" "$t1" "$cpu" "$(getconf CLK_TCK)" "$rss" "$verified" \
    "$A/ferry-agent" "$W/cut.json" "$(git describe --always --dirty 2>/dev/null || echo unknown)" > "$OUT" <<'PY'
import json, sys
size, data, r0, r1, t0, t1, cpu, tick, rss, verified, agent, cut, rev = sys.argv[1:]
print(json.dumps({
    "what": "benches/sparse-agent.sh: the agent's initial sync of a sparse loop device",
    "source": rev, "agent_binary": agent, "size": int(size), "data": int(data),
    "device_read_bytes": (int(r1) - int(r0)) * 512, "initial_sync_seconds": round(float(t1) - float(t0), 2),
    "agent_cpu_seconds": int(cpu) / int(tick), "agent_vmhwm_kib": int(rss),
    "restore_verified": json.loads(verified), "cut": json.load(open(cut)),
}, indent=1))
PY
python3 -c "import json; r=json.load(open('$OUT')); print(f\"agent initial sync: {r['size']/2**30:.0f} GiB loop device holding {r['data']/2**30:.1f} GiB: read {r['device_read_bytes']/2**30:.2f} GiB ({r['device_read_bytes']/r['data']:.3f}x the data) in {r['initial_sync_seconds']} s, {r['agent_cpu_seconds']:.1f} agent CPU-s, VmHWM {r['agent_vmhwm_kib']/1024:.0f} MiB; verified: {r['restore_verified']}\")"
echo "$OUT"
