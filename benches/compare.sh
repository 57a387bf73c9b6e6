#!/usr/bin/env bash
# Ferry side by side with the baselines of issue 12, in one run, one table (docs/PERFORMANCE.md).
#
# Part 1, the same deterministic mixed image (ferry-mkimage: random, text-like, zero and repeated
# 64 KiB chunks) through four tools, an initial copy and then an incremental one after FRACTION of
# the chunks were rewritten:
#   ferry-1c   `ferry replicate --once --threads 1`, pinned to one core (taskset)
#   ferry      `ferry replicate --once`, all cores
#   restic     `restic backup` (content-defined chunking, zstd, AES-256-CTR + Poly1305) into a local
#              repository; incremental = the next snapshot of the same file
#   zstd|enc   `zstd -1 -T0 | openssl enc -aes-256-ctr` into a file. OpenSSL's `enc` refuses AEAD
#              modes ("AEAD ciphers not supported"), so CTR, unauthenticated: a floor, not a
#              product. It has no change tracking: its incremental is the whole image again.
# Each round runs the tools in a rotated order (interleaved, so drift on a shared machine falls on
# all of them), and the table gives medians over ROUNDS: wall seconds, MB/s of image, CPU seconds
# (user+sys, GNU time), and bytes stored per changed byte (the store's growth / bytes rewritten;
# for the initial copy, / the image size).
#
# Part 2, `ferry serve` with AGENTS simulated agents (benches/agents.sh, SERVE_SECONDS of writing),
# the server pinned to one core and then to all (the simulated agents unpinned, on whatever core is
# free: on a 2-core machine they share the cores with the 2-core server, not with the 1-core one): acked MB/s, sustained MB/s (acked bytes / time until the last
# point is committed), drain tail, VmHWM. With SERVE=0 it is skipped.
#
# Environment: ROUNDS (3), SIZE (image bytes, 2 GiB), FRACTION (0.05), AGENTS (200),
# SERVE_SECONDS (20), SERVE (1), WORKDIR (default a new dir under /var/tmp, removed unless KEEP=1;
# the image, stores, caches and the servers' state all go there: WORKDIR=/dev/shm/... measures with
# everything in RAM, as issue 12's 16-core figures were taken), CARGO_TARGET_DIR. Needs restic, zstd, openssl, taskset and GNU time (apt install restic zstd
# openssl util-linux time). Writes benches/results/compare-DATE.json.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-$((2 << 30))}
FRACTION=${FRACTION:-0.05}
AGENTS=${AGENTS:-200}
SERVE_SECONDS=${SERVE_SECONDS:-20}
SERVE=${SERVE:-1}

die() { echo "compare.sh: $*" >&2; exit 1; }
for t in restic zstd openssl taskset python3; do
    command -v "$t" >/dev/null || die "$t not found (apt install restic zstd openssl util-linux python3)"
done
[[ -x /usr/bin/time ]] || die "GNU time not found (apt install time)"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build --release -p ferry-benches -p ferry-cli
target=${CARGO_TARGET_DIR:-target}
if [[ -n ${WORKDIR:-} ]]; then
    mkdir -p "$WORKDIR"
    work=$(realpath "$WORKDIR")
else
    work=$(mktemp -d /var/tmp/ferry-compare.XXXXXX)
    [[ ${KEEP:-0} == 1 ]] || trap 'rm -rf -- "$work"' EXIT
fi
cp "$target/release/ferry" "$target/release/ferry-mkimage" "$work/"
ferry=$work/ferry
mkimage=$work/ferry-mkimage
img=$work/disk.img
key=$work/key
runs=$work/runs.jsonl
: >"$runs"
(umask 077 && rm -f "$key" && printf '%064x\n' 7 >"$key" && printf 'compare-bench\n' >"$work/restic-pass")
ncpu=$(nproc)
allcores=0-$((ncpu - 1))
echo "work dir: $work; $(nproc) CPUs; kernel $(uname -r); $(restic version | head -1); $(zstd --version); $(openssl version)"
echo "writing a $SIZE-byte mixed image..."
"$mkimage" create "$img" "$SIZE" >"$work/image.json"

bytes_of() { if [[ -e $1 ]]; then du -sb "$1" | cut -f1; else echo 0; fi; }

# one TOOL PHASE ROUND CHANGED: runs TOOL's PHASE, appends a line to runs.jsonl.
one() {
    local tool=$1 phase=$2 round=$3 changed=$4 dest before after t0 t1
    case $tool in
    ferry-1c | ferry) dest=$work/$tool-store ;;
    restic) dest=$work/restic-repo ;;
    zstd-enc) dest=$work/zstd-enc ;;
    esac
    if [[ $phase == initial ]]; then
        rm -rf -- "$dest" "$work/$tool-cache"
        [[ $tool != restic ]] || RESTIC_PASSWORD_FILE=$work/restic-pass restic init -q --repo "$dest" >/dev/null
        [[ $tool != zstd-enc ]] || mkdir -p "$dest"
    fi
    before=$(bytes_of "$dest")
    rm -f "$work/cpu"
    t0=$(date +%s.%N)
    case $tool in
    ferry-1c)
        /usr/bin/time -f '%U %S' -o "$work/cpu" taskset -c 0 "$ferry" replicate "$img" --vm bench \
            --store "$dest" --cache-dir "$work/$tool-cache" --key-file "$key" --once --json \
            --threads 1 >"$work/out.json" 2>>"$work/ferry.log" ;;
    ferry)
        /usr/bin/time -f '%U %S' -o "$work/cpu" taskset -c "$allcores" "$ferry" replicate "$img" \
            --vm bench --store "$dest" --cache-dir "$work/$tool-cache" --key-file "$key" --once \
            --json >"$work/out.json" 2>>"$work/ferry.log" ;;
    restic)
        RESTIC_PASSWORD_FILE=$work/restic-pass /usr/bin/time -f '%U %S' -o "$work/cpu" \
            restic backup -q --repo "$dest" --compression auto "$img" >/dev/null ;;
    zstd-enc)
        /usr/bin/time -f '%U %S' -o "$work/cpu" bash -c 'zstd -1 -T0 -q -c "$1" |
            openssl enc -aes-256-ctr -pbkdf2 -pass "file:$2" -out "$3"' _ "$img" "$work/restic-pass" \
            "$dest/$phase-$round.zst.enc" ;;
    esac
    t1=$(date +%s.%N)
    after=$(bytes_of "$dest")
    python3 - "$tool" "$phase" "$round" "$t0" "$t1" "$before" "$after" "$changed" "$SIZE" \
        "$(awk '{print $1 + $2}' "$work/cpu")" "$(cut -d' ' -f1 /proc/loadavg)" >>"$runs" <<'EOF'
import json, sys
tool, phase, rnd, t0, t1, before, after, changed, size, cpu, load = sys.argv[1:]
wall = float(t1) - float(t0)
growth = int(after) - int(before)
print(json.dumps({"tool": tool, "phase": phase, "round": int(rnd), "wall_seconds": round(wall, 3),
                  "mb_per_s": round(int(size) / wall / 1e6, 1), "cpu_seconds": float(cpu),
                  "store_growth_bytes": growth, "changed_bytes": int(changed),
                  "stored_per_changed_byte": round(growth / int(changed), 4),
                  "loadavg_1m_before": float(load)}))
EOF
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("  round {round} {tool:<9} {phase:<12} {wall_seconds:7.2f} s {mb_per_s:8.1f} MB/s {cpu_seconds:7.2f} CPU-s  stored/changed {stored_per_changed_byte}".format(**r))' "$(tail -n1 "$runs")"
}

tools=(ferry-1c ferry restic zstd-enc)
for ((round = 1; round <= ROUNDS; round++)); do
    # Rotate the order each round.
    order=("${tools[@]:$(((round - 1) % 4))}" "${tools[@]:0:$(((round - 1) % 4))}")
    for t in "${order[@]}"; do one "$t" initial "$round" "$SIZE"; done
    changed=$("$mkimage" rewrite "$img" "$round" "$FRACTION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])')
    for t in "${order[@]}"; do one "$t" incremental "$round" "$changed"; done
    "$mkimage" restore "$img" "$round" "$FRACTION" >/dev/null
done

serve_json=()
if [[ $SERVE == 1 ]]; then
    for cores in 0 "$allcores"; do
        echo "ferry serve, $AGENTS agents, pinned to CPUs $cores..."
        rm -rf -- "$work/serve"
        FERRY_BIN=$ferry AGENTS=$AGENTS DURATION=$SERVE_SECONDS VERIFY=0 SERVE_CPUS=$cores \
            WORKDIR=$work/serve bash benches/agents.sh >"$work/agents-$cores.log" 2>&1 ||
            { tail -n 20 "$work/agents-$cores.log" >&2; die "benches/agents.sh failed"; }
        grep -E "^(agents|keeps up):" "$work/agents-$cores.log" | sed 's/^/  /'
        serve_json+=("$cores=$(sed -n 's/^written to //p' "$work/agents-$cores.log")")
    done
fi

mkdir -p benches/results
result=benches/results/compare-$(date -u +%Y-%m-%dT%H%M%SZ).json
python3 - "$runs" "$work/image.json" "$result" "$ROUNDS" "$FRACTION" \
    "$(git describe --always --dirty 2>/dev/null || echo unknown)" "${serve_json[@]}" <<'EOF'
import json, os, platform, statistics, sys
runs_path, image_path, result, rounds, fraction, rev, *serve = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path)]
med = lambda xs: statistics.median(xs) if xs else None
table = {}
for tool in ["ferry-1c", "ferry", "restic", "zstd-enc"]:
    for phase in ["initial", "incremental"]:
        rs = [r for r in runs if r["tool"] == tool and r["phase"] == phase]
        table[f"{tool} {phase}"] = {k: med([r[k] for r in rs]) for k in
                                    ["wall_seconds", "mb_per_s", "cpu_seconds",
                                     "stored_per_changed_byte"]}
serve_rows = {}
for s in serve:
    cores, path = s.split("=", 1)
    d = json.load(open(path))
    serve_rows["1 core" if cores == "0" else f"{os.cpu_count()} cores"] = {
        **d["keeps_up"], "vm_hwm_mib": d["server"]["vm_hwm_mib"],
        "drain_tail_seconds": d["drain_tail_seconds"], "agents": d["simagents"]["agents"],
        "file": path}
doc = {"what": "benches/compare.sh: ferry vs restic vs zstd|openssl, and ferry serve",
       "source": rev, "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                               "kernel": platform.release()},
       "image": json.load(open(image_path)), "rounds": int(rounds),
       "rewrite_fraction": float(fraction), "medians": table, "serve": serve_rows, "runs": runs}
with open(result, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print()
print(f"{'tool, phase':<24} {'wall s':>8} {'MB/s':>8} {'CPU s':>8} {'stored/changed':>15}")
for k, m in table.items():
    print(f"{k:<24} {m['wall_seconds']:>8.2f} {m['mb_per_s']:>8.1f} {m['cpu_seconds']:>8.2f} "
          f"{m['stored_per_changed_byte']:>15.4f}")
t = lambda k: table[k]["mb_per_s"]
print(f"replicate --once initial, {os.cpu_count()} cores / 1 core: "
      f"x{t('ferry initial') / t('ferry-1c initial'):.2f}")
if serve_rows:
    print()
    print(f"{'ferry serve':<24} {'acked MB/s':>11} {'sustained':>10} {'sust/acked':>11} "
          f"{'tail/writing':>13} {'VmHWM MiB':>10}")
    for k, r in serve_rows.items():
        print(f"{k + ', ' + str(r['agents']) + ' agents':<24} {r['acked_mb_per_s']:>11.1f} "
              f"{r['sustained_mb_per_s']:>10.1f} {r['sustained_over_acked']:>11.3f} "
              f"{r['tail_over_writing']:>13.3f} {r['vm_hwm_mib']:>10.1f}")
    if len(serve_rows) == 2:
        a, b = serve_rows.values()
        print(f"serve sustained, {os.cpu_count()} cores / 1 core: "
              f"x{b['sustained_mb_per_s'] / a['sustained_mb_per_s']:.2f}")
print(f"medians of {rounds} interleaved rounds; MB = 10^6 bytes; written to {result}")
EOF
