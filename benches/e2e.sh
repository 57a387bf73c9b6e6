#!/usr/bin/env bash
# End-to-end benchmark of `ferry replicate --once` on a deterministic mixed image.
#
# Builds `ferry` and `ferry-mkimage` in release, writes a SIZE-byte mixed image (random, text-like,
# all-zero and repeated 64 KiB chunks in roughly equal shares; see benches/src/lib.rs), then for
# each of R interleaved rounds:
#   a) initial sync into a fresh store and cache,
#   b) rewrite FRACTION of the image's chunks with random data (deterministic, different each round)
#      and run the incremental sync into the same store,
#   c) put the rewritten chunks' original content back, so every round starts from the same image.
# For each run it records wall seconds, MB/s (bytes read / wall seconds, MB = 10^6 bytes) and bytes
# stored per changed byte (growth of `du -sb STORE`, and the run's segment bytes, divided by the
# run's changed bytes). It prints medians and writes everything to benches/results/e2e-DATE.json.
#
# The page cache is not dropped: the image is read warm after it was just written whenever it fits
# in RAM; each run's record says how much of the image was resident before it started.
#
# Environment: R (rounds, default 3), SIZE (bytes, default 2 GiB), FRACTION (default 0.05),
# SEED (default: ferry_benches::DEFAULT_SEED), THREADS (ferry --threads; default all cores),
# WORKDIR (default a new mktemp dir under /var/tmp, removed at the end unless KEEP=1; a given
# WORKDIR is never removed), CARGO_TARGET_DIR.
set -euo pipefail

R=${R:-3}
SIZE=${SIZE:-$((2 << 30))}
FRACTION=${FRACTION:-0.05}
SEED=${SEED:-}
THREADS=${THREADS:-}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build --release -p ferry-cli
cargo build --release -p ferry-benches --bin ferry-mkimage
target=${CARGO_TARGET_DIR:-target}
ferry=$(realpath "$target/release/ferry")
mkimage=$(realpath "$target/release/ferry-mkimage")

if [[ -n ${WORKDIR:-} ]]; then
    mkdir -p "$WORKDIR"
    work=$(realpath "$WORKDIR")
else
    work=$(mktemp -d /var/tmp/ferry-e2e.XXXXXX)
    [[ ${KEEP:-0} == 1 ]] || trap 'rm -rf -- "$work"' EXIT
fi
img=$work/disk.img
key=$work/key
runs=$work/runs.jsonl
: >"$runs"

echo "work dir: $work"
(umask 077 && rm -f "$key" && printf '%064x\n' 7 >"$key")
echo "writing a $SIZE-byte mixed image..."
"$mkimage" create "$img" "$SIZE" ${SEED:+"$SEED"} | tee "$work/image.json"

threads_arg=()
[[ -z $THREADS ]] || threads_arg=(--threads "$THREADS")

# CPU seconds (user + sys) of each run, when GNU time is there: less sensitive to a busy machine.
timecmd=()
[[ ! -x /usr/bin/time ]] || timecmd=(/usr/bin/time -f '%U %S' -o "$work/cpu")

resident() { fincore -b -n -o RES "$1" 2>/dev/null | tr -d ' ' || echo -1; }
now() { date +%s.%N; }

# run ROUND PHASE STORE CACHE: one `ferry replicate --once --json`, appended to runs.jsonl.
run() {
    local round=$1 phase=$2 store=$3 cache=$4
    local res load before after t0 t1 out cpu
    res=$(resident "$img")
    load=$(cut -d' ' -f1 /proc/loadavg)
    rm -f "$work/cpu"
    before=$( [[ -d $store ]] && du -sb "$store" | cut -f1 || echo 0)
    out=$work/r$round-$phase.json
    t0=$(now)
    "${timecmd[@]}" "$ferry" replicate "$img" --store "$store" --once --json --key-file "$key" \
        --cache-dir "$cache" "${threads_arg[@]}" >"$out" 2>>"$work/ferry.log" || {
        echo "ferry replicate failed ($phase, round $round); its log:" >&2
        tail -n 20 "$work/ferry.log" >&2
        exit 1
    }
    t1=$(now)
    after=$(du -sb "$store" | cut -f1)
    cpu=$( [[ -s $work/cpu ]] && awk '{print $1 + $2}' "$work/cpu" || echo -1)
    python3 - "$out" "$round" "$phase" "$t0" "$t1" "$before" "$after" "$res" "$SIZE" "$cpu" "$load" \
        >>"$runs" <<'EOF'
import json, sys
out, rnd, phase, t0, t1, before, after, res, size, cpu, load = sys.argv[1:]
r = json.load(open(out))
wall = float(t1) - float(t0)
read = sum(d["bytes_read"] for d in r["disks"])
changed = sum(d["changed_bytes"] for d in r["disks"])
growth = int(after) - int(before)
seg = r["stored"]["segment_bytes"]
print(json.dumps({
    "round": int(rnd), "phase": phase, "wall_seconds": round(wall, 3),
    "job_seconds": round(r["seconds"], 3), "bytes_read": read, "changed_bytes": changed,
    "mb_per_s": round(read / wall / 1e6, 1),
    "cpu_seconds": float(cpu) if float(cpu) >= 0 else None, "loadavg_1m_before": float(load),
    "store_growth_bytes": growth, "segment_bytes": seg,
    "stored_per_changed_byte": round(growth / changed, 4) if changed else None,
    "segment_bytes_per_changed_byte": round(seg / changed, 4) if changed else None,
    "image_resident_before": int(res) / int(size) if int(res) >= 0 else None,
    "stored": r["stored"],
}))
EOF
    tail -n1 "$runs"
}

for ((round = 1; round <= R; round++)); do
    store=$work/store-$round
    cache=$work/cache-$round
    rm -rf -- "$store" "$cache"
    run "$round" initial "$store" "$cache"
    "$mkimage" rewrite "$img" "$round" "$FRACTION" ${SEED:+"$SEED"} >"$work/r$round-rewrite.json"
    run "$round" incremental "$store" "$cache"
    "$mkimage" restore "$img" "$round" "$FRACTION" ${SEED:+"$SEED"} >/dev/null
    rm -rf -- "$store" "$cache"
done

mkdir -p benches/results
result=benches/results/e2e-$(date -u +%Y-%m-%dT%H%M%SZ).json
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
python3 - "$runs" "$work/image.json" "$result" "$R" "$FRACTION" "${THREADS:-all}" "$rev" <<'EOF'
import json, os, platform, statistics, sys
runs_path, image_path, result, rounds, fraction, threads, rev = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path)]
image = json.load(open(image_path))
keys = ["wall_seconds", "mb_per_s", "cpu_seconds", "stored_per_changed_byte",
        "segment_bytes_per_changed_byte", "changed_bytes", "store_growth_bytes"]
medians = {}
for phase in ["initial", "incremental"]:
    rs = [r for r in runs if r["phase"] == phase]
    medians[phase] = {k: statistics.median(r[k] for r in rs if r[k] is not None)
                      if any(r[k] is not None for r in rs) else None for k in keys}
resident = min(r["image_resident_before"] or 0 for r in runs)
doc = {
    "what": "ferry replicate --once --json on a mixed image; medians over rounds (benches/e2e.sh)",
    "source": rev,
    "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
             "kernel": platform.release()},
    "image": image, "rounds": int(rounds), "rewrite_fraction": float(fraction),
    "threads": threads,
    "page_cache": (f"warm: at least {resident:.1%} of the image resident before every run"
                   if resident >= 0.99 else
                   f"partly cold: as little as {resident:.1%} of the image resident before a run"
                   " (see runs[].image_resident_before)"),
    "medians": medians, "runs": runs,
}
with open(result, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print()
fmt = lambda v, f: "-" if v is None else format(v, f)
print(f"{'phase':<12} {'wall s':>8} {'MB/s':>8} {'CPU s':>7} {'stored/changed (du)':>20} "
      f"{'segments/changed':>17}")
for phase, m in medians.items():
    print(f"{phase:<12} {fmt(m['wall_seconds'], '.2f'):>8} {fmt(m['mb_per_s'], '.1f'):>8} "
          f"{fmt(m['cpu_seconds'], '.2f'):>7} {fmt(m['stored_per_changed_byte'], '.4f'):>20} "
          f"{fmt(m['segment_bytes_per_changed_byte'], '.4f'):>17}")
print(f"medians of {rounds} rounds; MB = 10^6 bytes; page cache: {doc['page_cache']}")
print(f"written to {result}")
EOF
