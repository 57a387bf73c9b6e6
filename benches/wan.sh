#!/usr/bin/env bash
# WAN bytes of an incremental sync: Ferry direct mode vs Ferry split mode vs restic, side by side.
#
# Builds `ferry` and `ferry-mkimage` in release (and copies both into the work dir, so a rebuild by
# someone else during the run cannot swap binaries under it), writes a SIZE-byte mixed image v1
# (random, text-like, all-zero and repeated 64 KiB chunks; see benches/src/lib.rs), starts its own
# Azurite (loopback, free port, data in the work dir, --disableTelemetry) and, for each of R rounds:
#   1. replicates v1 three ways, each into fresh state (order rotated every round):
#        direct: `ferry replicate IMG --store azure://devstoreaccount1/direct-rN --once --json`
#        split:  the same with --split into container split-rN, then `ferry apply --once` (must succeed
#                and publish the point)
#        restic: `restic init` of a fresh local repo, then `restic backup IMG`
#   2. makes v2: rewrites FRACTION of v1's 64 KiB chunks with random data
#      (`ferry-mkimage rewrite IMG ROUND FRACTION`: different chunks every round),
#   3. syncs v2 the same three ways into the same stores/repo,
#   4. puts the original chunks back (`ferry-mkimage restore`), so every round starts from v1.
# Figures, per round, then medians:
#   - bytes sent per changed byte of v2: Ferry's `wan_bytes` (request-body bytes sent to the store)
#     / its `disks[0].changed_bytes`; restic's repository growth (`du -sb REPO` after minus before)
#     / the rewritten bytes (what ferry-mkimage reports; equal to Ferry's changed_bytes),
#   - split:restic and direct:restic (per-round quotients of the above),
#   - client CPU per GiB uploaded: user+sys CPU seconds of the `ferry replicate` process /
#     (wan_bytes / 2^30), for the v1 (initial) and the v2 runs of each mode.
# Prints a table and writes everything to benches/results/wan-DATE.json.
#
# Azurite runs on the same machine (and cores) as Ferry and restic; its CPU time per run is recorded
# too (runs[].azurite_cpu_seconds), Ferry's figures do not include it.
#
# Environment: R (rounds, default 3), SIZE (bytes, default 2 GiB), FRACTION (default 0.05),
# SEED (default: ferry_benches::DEFAULT_SEED), THREADS (ferry --threads; default all cores),
# WORKDIR (default a new mktemp dir under /var/tmp, removed at the end unless KEEP=1; a given
# WORKDIR is never removed), FERRY_AZURITE_BIN (default tools/azurite/node_modules/.bin/azurite-blob,
# installed by scripts/install-azurite when missing), CARGO_TARGET_DIR.
set -euo pipefail

R=${R:-3}
SIZE=${SIZE:-$((2 << 30))}
FRACTION=${FRACTION:-0.05}
SEED=${SEED:-}
THREADS=${THREADS:-}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
command -v restic >/dev/null || { echo "wan.sh: restic not found" >&2; exit 1; }
command -v python3 >/dev/null || { echo "wan.sh: python3 not found" >&2; exit 1; }
azurite_bin=${FERRY_AZURITE_BIN:-$repo/tools/azurite/node_modules/.bin/azurite-blob}
[[ -x $azurite_bin ]] || scripts/install-azurite
[[ -x $azurite_bin ]] || { echo "wan.sh: no azurite-blob at $azurite_bin" >&2; exit 1; }

cargo build --release -p ferry-cli
cargo build --release -p ferry-benches --bin ferry-mkimage
target=${CARGO_TARGET_DIR:-target}

work_given=0
if [[ -n ${WORKDIR:-} ]]; then
    mkdir -p "$WORKDIR"
    work=$(realpath "$WORKDIR")
    work_given=1
else
    work=$(mktemp -d /var/tmp/ferry-wan.XXXXXX)
fi
azurite_pid=
cleanup() {
    local rc=$?
    if [[ -n $azurite_pid ]] && kill -0 "$azurite_pid" 2>/dev/null; then
        kill -TERM "$azurite_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$azurite_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$azurite_pid" 2>/dev/null || true
        wait "$azurite_pid" 2>/dev/null || true
    fi
    if [[ $work_given == 0 && ${KEEP:-0} != 1 ]]; then
        rm -rf -- "$work"
    else
        echo "work dir kept: $work" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$work/bin"
cp "$target/release/ferry" "$target/release/ferry-mkimage" "$work/bin/"
ferry=$work/bin/ferry
mkimage=$work/bin/ferry-mkimage
img=$work/disk.img
key=$work/key
runs=$work/runs.jsonl
: >"$runs"
echo "work dir: $work"
(umask 077 && rm -f "$key" && printf '%064x\n' 7 >"$key")

# --- Azurite -------------------------------------------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/azurite"
"$azurite_bin" --blobHost 127.0.0.1 --blobPort "$port" --location "$work/azurite" --silent \
    --disableTelemetry --skipApiVersionCheck >"$work/azurite.log" 2>&1 &
azurite_pid=$!
for i in $(seq 300); do
    kill -0 "$azurite_pid" 2>/dev/null || { echo "azurite exited:" >&2; cat "$work/azurite.log" >&2; exit 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    [[ $i != 300 ]] || { echo "azurite did not answer on port $port" >&2; exit 1; }
    sleep 0.1
done
echo "azurite: pid $azurite_pid, http://127.0.0.1:$port"
azkey='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
export AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=$azkey;BlobEndpoint=http://127.0.0.1:$port/devstoreaccount1"
export RESTIC_PASSWORD=ferry-wan-bench
# user+sys CPU seconds of Azurite so far (clock ticks of /proc/PID/stat fields 14 and 15).
tick=$(getconf CLK_TCK)
azurite_cpu() { awk -v t="$tick" '{ sub(/^.*\) /, ""); print ($12 + $13) / t }' "/proc/$azurite_pid/stat"; }

# --- the image -----------------------------------------------------------------------------------
echo "writing a $SIZE-byte mixed image..."
"$mkimage" create "$img" "$SIZE" ${SEED:+"$SEED"} | tee "$work/image.json"

threads_arg=()
[[ -z $THREADS ]] || threads_arg=(--threads "$THREADS")

# timed CPUFILE CMD...: runs CMD, writes "USER SYS" CPU seconds of it (and its children) to CPUFILE.
timed() {
    local f=$1
    shift
    rm -f "$f"
    if [[ -x /usr/bin/time ]]; then
        /usr/bin/time -f '%U %S' -o "$f" "$@"
    else
        python3 -c '
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{u.ru_utime} {u.ru_stime}\n")
sys.exit(rc)' "$f" "$@"
    fi
}
cpu_of() { tail -n1 "$1" | awk '{ print $1 + $2 }'; }
now() { date +%s.%N; }
fail() {
    echo "$1 failed; last lines of $2:" >&2
    tail -n 20 "$2" >&2
    exit 1
}

# ferry_run ROUND MODE PHASE: one `ferry replicate --once --json` (+ `ferry apply --once` in split
# mode) into container MODE-rROUND, recorded in runs.jsonl.
ferry_run() {
    local round=$1 mode=$2 phase=$3
    local container=$mode-r$round out=$work/r$round-$mode-$phase.json
    local split=() t0 t1 a0 a1 cpu apply_out=$work/r$round-$mode-$phase-apply.json
    local apply_cpu=null apply_s=null ta
    [[ $mode != split ]] || split=(--split)
    export FERRY_STATE_DIR=$work/state-$container
    echo "$(cut -d' ' -f1 /proc/loadavg)" >"$work/load"
    a0=$(azurite_cpu)
    t0=$(now)
    timed "$work/cpu" "$ferry" replicate "$img" --store "azure://devstoreaccount1/$container" \
        "${split[@]}" --once --json --key-file "$key" "${threads_arg[@]}" \
        >"$out" 2>>"$work/ferry.log" || fail "ferry replicate ($mode, $phase, round $round)" "$work/ferry.log"
    t1=$(now)
    a1=$(azurite_cpu)
    cpu=$(cpu_of "$work/cpu")
    if [[ $mode == split ]]; then
        ta=$(now)
        timed "$work/cpu" "$ferry" apply --store "azure://devstoreaccount1/$container" --once --json \
            --key-file "$key" >"$apply_out" 2>>"$work/ferry.log" ||
            fail "ferry apply ($phase, round $round)" "$work/ferry.log"
        apply_s=$(python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))' "$ta" "$(now)")
        apply_cpu=$(cpu_of "$work/cpu")
    else
        echo null >"$apply_out"
    fi
    unset FERRY_STATE_DIR
    python3 - "$out" "$apply_out" "$round" "$mode" "$phase" "$t0" "$t1" "$cpu" "$a0" "$a1" \
        "$apply_s" "$apply_cpu" >>"$runs" <<'EOF'
import json, sys
out, apply_out, rnd, mode, phase, t0, t1, cpu, a0, a1, apply_s, apply_cpu = sys.argv[1:]
r = json.load(open(out))
changed = sum(d["changed_bytes"] for d in r["disks"])
wan = r["wan_bytes"]
cpu = float(cpu)
rec = {
    "round": int(rnd), "tool": "ferry-" + mode, "phase": phase,
    "wall_seconds": round(float(t1) - float(t0), 3), "job_seconds": round(r["seconds"], 3),
    "changed_bytes": changed, "wan_bytes": wan,
    "sent_per_changed_byte": round(wan / changed, 4) if changed else None,
    "cpu_seconds": round(cpu, 2),
    "cpu_seconds_per_wan_gib": round(cpu / (wan / 2**30), 3) if wan else None,
    "cpu_seconds_per_changed_gib": round(cpu / (changed / 2**30), 3) if changed else None,
    "azurite_cpu_seconds": round(float(a1) - float(a0), 2),
    "loadavg_1m_before": float(open(sys.argv[1].rsplit("/", 1)[0] + "/load").read()),
    "stored": r["stored"], "point": (r.get("point") or {}).get("id"),
}
if mode == "split":
    a = json.load(open(apply_out))
    if not a.get("points"):
        sys.exit(f"ferry apply --once (round {rnd}, {phase}) published no point: {a}")
    rec["apply"] = {"seconds": float(apply_s), "cpu_seconds": float(apply_cpu), **a}
print(json.dumps(rec))
EOF
    tail -n1 "$runs"
}

# restic_run ROUND PHASE CHANGED: one `restic backup IMG` into the round's repo (created at v1).
restic_run() {
    local round=$1 phase=$2 changed=$3
    local rrepo=$work/restic-r$round out=$work/r$round-restic-$phase.json before after t0 t1 cpu
    export RESTIC_REPOSITORY=$rrepo RESTIC_CACHE_DIR=$work/restic-cache-r$round
    if [[ $phase == v1 ]]; then
        rm -rf -- "$rrepo" "$RESTIC_CACHE_DIR"
        restic init >>"$work/restic.log" 2>&1 || fail "restic init (round $round)" "$work/restic.log"
    fi
    before=$(du -sb "$rrepo" | cut -f1)
    echo "$(cut -d' ' -f1 /proc/loadavg)" >"$work/load"
    t0=$(now)
    timed "$work/cpu" restic backup --json "$img" >"$out" 2>>"$work/restic.log" ||
        fail "restic backup ($phase, round $round)" "$work/restic.log"
    t1=$(now)
    after=$(du -sb "$rrepo" | cut -f1)
    cpu=$(cpu_of "$work/cpu")
    unset RESTIC_REPOSITORY RESTIC_CACHE_DIR
    python3 - "$out" "$round" "$phase" "$t0" "$t1" "$cpu" "$before" "$after" "$changed" \
        >>"$runs" <<'EOF'
import json, sys
out, rnd, phase, t0, t1, cpu, before, after, changed = sys.argv[1:]
summary = [m for m in map(json.loads, filter(str.strip, open(out)))
           if m.get("message_type") == "summary"][-1]
growth = int(after) - int(before)
changed = int(changed)
print(json.dumps({
    "round": int(rnd), "tool": "restic", "phase": phase,
    "wall_seconds": round(float(t1) - float(t0), 3), "changed_bytes": changed,
    "repo_growth_bytes": growth,
    "sent_per_changed_byte": round(growth / changed, 4) if changed else None,
    "cpu_seconds": round(float(cpu), 2),
    "loadavg_1m_before": float(open(out.rsplit("/", 1)[0] + "/load").read()),
    "data_added": summary.get("data_added"),
    "summary": summary,
}))
EOF
    tail -n1 "$runs"
}

tools=(direct split restic)
restic_version=$(restic version)
for ((round = 1; round <= R; round++)); do
    # Rotate the order every round, so no tool always runs first (warm/cold caches, busy Azurite).
    order=()
    for ((i = 0; i < 3; i++)); do order+=("${tools[(i + round - 1) % 3]}"); done
    echo "== round $round/$R (order: ${order[*]})"
    imgbytes=$(stat -c %s "$img")
    for t in "${order[@]}"; do
        case $t in
            restic) restic_run "$round" v1 "$imgbytes" ;;
            *) ferry_run "$round" "$t" v1 ;;
        esac
    done
    "$mkimage" rewrite "$img" "$round" "$FRACTION" ${SEED:+"$SEED"} | tee "$work/r$round-rewrite.json"
    rewritten=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["bytes"])' "$work/r$round-rewrite.json")
    for t in "${order[@]}"; do
        case $t in
            restic) restic_run "$round" v2 "$rewritten" ;;
            *) ferry_run "$round" "$t" v2 ;;
        esac
    done
    "$mkimage" restore "$img" "$round" "$FRACTION" ${SEED:+"$SEED"} >/dev/null
    # Local state and the restic repo of this round are no longer needed (Azurite keeps its blobs).
    rm -rf -- "$work/state-direct-r$round" "$work/state-split-r$round" "$work/restic-r$round" \
        "$work/restic-cache-r$round"
done

mkdir -p benches/results
result=benches/results/wan-$(date -u +%Y-%m-%dT%H%M%SZ).json
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
azurite_version=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' \
    "$(dirname "$(realpath "$azurite_bin")")/../../../package.json" 2>/dev/null | head -n1 || true)
python3 - "$runs" "$work/image.json" "$result" "$R" "$FRACTION" "${THREADS:-all}" "$rev" \
    "$restic_version" "${azurite_version:-unknown}" <<'EOF'
import json, os, platform, statistics, sys
runs_path, image_path, result, rounds, fraction, threads, rev, restic_v, azurite_v = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path)]
image = json.load(open(image_path))
med = lambda xs: statistics.median(xs) if xs else None
def pick(tool, phase, key):
    return [r[key] for r in sorted(runs, key=lambda r: r["round"])
            if r["tool"] == tool and r["phase"] == phase and r.get(key) is not None]
per_round = []
for rnd in sorted({r["round"] for r in runs}):
    get = lambda tool, phase, key: next(r.get(key) for r in runs
                                        if r["round"] == rnd and r["tool"] == tool and r["phase"] == phase)
    d, s, x = (get(t, "v2", "sent_per_changed_byte") for t in ("ferry-direct", "ferry-split", "restic"))
    per_round.append({
        "round": rnd, "direct_sent_per_changed": d, "split_sent_per_changed": s,
        "restic_sent_per_changed": x,
        "split_to_restic": round(s / x, 4), "direct_to_restic": round(d / x, 4),
        "direct_cpu_s_per_wan_gib_v1": get("ferry-direct", "v1", "cpu_seconds_per_wan_gib"),
        "split_cpu_s_per_wan_gib_v1": get("ferry-split", "v1", "cpu_seconds_per_wan_gib"),
        "direct_cpu_s_per_wan_gib_v2": get("ferry-direct", "v2", "cpu_seconds_per_wan_gib"),
        "split_cpu_s_per_wan_gib_v2": get("ferry-split", "v2", "cpu_seconds_per_wan_gib"),
    })
medians = {k: med([p[k] for p in per_round if p[k] is not None]) for k in per_round[0] if k != "round"}
detail = {}
for tool in ("ferry-direct", "ferry-split", "restic"):
    for phase in ("v1", "v2"):
        detail[f"{tool}/{phase}"] = {k: med(pick(tool, phase, k)) for k in
            ("changed_bytes", "wan_bytes", "repo_growth_bytes", "sent_per_changed_byte",
             "wall_seconds", "cpu_seconds", "cpu_seconds_per_wan_gib", "azurite_cpu_seconds")
            if pick(tool, phase, k)}
doc = {
    "what": "bytes sent per changed byte of an incremental sync (v2 = v1 with a fraction of its 64 KiB"
            " chunks rewritten randomly): ferry direct vs ferry split vs restic; medians over rounds"
            " (benches/wan.sh)",
    "source": rev,
    "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "kernel": platform.release(),
             "note": "Azurite (the Azure emulator) runs on the same cores"},
    "versions": {"restic": restic_v, "azurite": azurite_v},
    "image": image, "rounds": int(rounds), "rewrite_fraction": float(fraction), "threads": threads,
    "medians": medians, "medians_by_run": detail, "per_round": per_round, "runs": runs,
}
with open(result, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
m = medians
fmt = lambda v, f: "-" if v is None else format(v, f)
print()
print(f"medians of {rounds} rounds; {image['bytes']} B image, {float(fraction):.0%} of its 64 KiB chunks rewritten")
print(f"{'bytes sent per changed byte (v2)':<40} {'direct':>8} {'split':>8} {'restic':>8}")
print(f"{'':<40} {fmt(m['direct_sent_per_changed'], '.4f'):>8} {fmt(m['split_sent_per_changed'], '.4f'):>8}"
      f" {fmt(m['restic_sent_per_changed'], '.4f'):>8}")
print(f"{'split:restic':<40} {fmt(m['split_to_restic'], '.4f'):>8}")
print(f"{'direct:restic':<40} {fmt(m['direct_to_restic'], '.4f'):>8}")
print(f"{'ferry client CPU s per GiB uploaded':<40} {'direct':>8} {'split':>8}")
print(f"{'  v1 (initial)':<40} {fmt(m['direct_cpu_s_per_wan_gib_v1'], '.2f'):>8} {fmt(m['split_cpu_s_per_wan_gib_v1'], '.2f'):>8}")
print(f"{'  v2 (incremental)':<40} {fmt(m['direct_cpu_s_per_wan_gib_v2'], '.2f'):>8} {fmt(m['split_cpu_s_per_wan_gib_v2'], '.2f'):>8}")
print()
print(f"{'run':<18} {'changed B':>12} {'sent B':>12} {'sent/chg':>9} {'wall s':>7} {'CPU s':>7} {'Azurite CPU s':>14}")
for k, d in detail.items():
    sent = d.get("wan_bytes", d.get("repo_growth_bytes"))
    print(f"{k:<18} {fmt(d.get('changed_bytes'), '.0f'):>12} {fmt(sent, '.0f'):>12}"
          f" {fmt(d.get('sent_per_changed_byte'), '.4f'):>9} {fmt(d.get('wall_seconds'), '.1f'):>7}"
          f" {fmt(d.get('cpu_seconds'), '.2f'):>7} {fmt(d.get('azurite_cpu_seconds'), '.2f'):>14}")
print("(restic: sent = repository growth, du -sb; v1 changed = the whole image)")
print(f"written to {result}")
EOF
