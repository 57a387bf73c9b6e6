#!/usr/bin/env bash
# Ingest throttles measured on the wire (issue 9): one `ferry serve` on loopback, simulated agents
# (`ferry-simagents`, 64 KiB incompressible writes as fast as credit allows), and the server's own
# per-VM byte counters read from its status file at every rewrite (timed by the `written_at` the
# server stamps, milliseconds):
#
#   1. the rate over 30 s at each of RATES (default 20 50 200 MiB/s) against the setting;
#   2. how long a change from 20 to 50 MiB/s takes to show on the wire (1 s windows);
#   3. fairness: a churner (flat out) and a 5 MB/s VM under a 40 MiB/s global throttle, both
#      cutting a point every 5 s: what each gets over 30 s (the small VM should get all it sends)
#      and the small VM's RPO as the server reports it (threshold set to 30 s: it must stay under,
#      with no rpo condition raised).
#
# Prints one table. Environment: RATES, WORKDIR (default a mktemp dir under /var/tmp, removed),
# CARGO_TARGET_DIR. Takes ~3 min. The machine's own limit shows at 200 MiB/s on 2 cores: the
# unthrottled rate is printed first for comparison.
set -euo pipefail
RATES=${RATES:-"20 50 200"}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build --release -p ferry-cli -p ferry-benches --bins >&2
bin=${CARGO_TARGET_DIR:-$repo/target}/release
work=${WORKDIR:-$(mktemp -d /var/tmp/ferry-throttle.XXXXXX)}
trap 'kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null; [[ -z ${WORKDIR:-} ]] && rm -rf "$work"' EXIT
mkdir -p "$work/state"
"$bin/ferry" serve --listen 127.0.0.1:0 --store "$work/store" --key-file "$work/key" \
    --cache-dir "$work/cache" --cache-size 16GiB --state-dir "$work/state" --retention 0 \
    >"$work/serve.log" 2>&1 &
srv=$!
for _ in $(seq 100); do grep -q "process server listening" "$work/serve.log" && break; sleep 0.1; done
addr=$(grep -o 'addr=[^ ]*' "$work/serve.log" | head -1 | cut -d= -f2)
"$bin/ferry" passphrase show --state-dir "$work/state" >"$work/pass"
BIN="$bin" WORK="$work" ADDR="$addr" RATES="$RATES" python3 - <<'PY'
import json, os, subprocess, threading, time, calendar

BIN, WORK, ADDR = os.environ["BIN"], os.environ["WORK"], os.environ["ADDR"]
MIB = 1048576.0
status = os.path.join(WORK, "state", "status.json")
samples, stop = [], threading.Event()

def sampler():
    last = None
    while not stop.is_set():
        time.sleep(0.01)
        try:
            ino = os.stat(status).st_ino
            if ino == last:
                continue
            v = json.load(open(status))
        except Exception:
            continue
        last = ino
        w = v["written_at"].rstrip("Z")
        sec, _, frac = w.partition(".")
        t = calendar.timegm(time.strptime(sec, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))
        per = {x["vm"]: sum(d["bytes_received"] for d in x["disks"]) for x in v["vms"]}
        rpo = {x["vm"]: (x.get("rpo_seconds"), [c["name"] for c in x.get("conditions", [])])
               for x in v["vms"]}
        samples.append((time.monotonic(), t, per, rpo))

threading.Thread(target=sampler, daemon=True).start()

def rate(vm, a, b):
    while not any(s[0] >= b for s in samples):
        time.sleep(0.05)
    sa = next(s for s in samples if s[0] >= a)
    sb = next(s for s in samples if s[0] >= b)
    return (sb[2].get(vm, 0) - sa[2].get(vm, 0)) / (sb[1] - sa[1])

def throttle(*args):
    subprocess.run([f"{BIN}/ferry", "throttle", *args, "--state-dir", f"{WORK}/state"],
                   check=True, capture_output=True)

def agent(prefix, seconds, rate=0, cut_every=0):
    return subprocess.Popen([f"{BIN}/ferry-simagents", "--server", ADDR, "--passphrase-file",
                             f"{WORK}/pass", "--agents", "1", "--vm-prefix", prefix,
                             "--seconds", str(seconds), "--rate", str(rate),
                             "--cut-every", str(cut_every),
                             "--disk-size", str(256 << 20), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def started(vm):
    while not any(s[2].get(vm, 0) > 0 for s in samples):
        time.sleep(0.05)
    return next(s[0] for s in samples if s[2].get(vm, 0) > 0)

rows = []
throttle("set", "unlimited")
p = agent("free", 12); t0 = started("free-000") + 1
rows.append(("unthrottled (one agent, this machine)", None, rate("free-000", t0, t0 + 10)))
p.wait()
for r in os.environ["RATES"].split():
    throttle("set", f"{r}MiB/s")
    p = agent(f"r{r}", 34); t0 = started(f"r{r}-000") + 2
    got = rate(f"r{r}-000", t0, t0 + 30)
    rows.append((f"30 s at {r} MiB/s", float(r) * MIB, got))
    p.wait()
throttle("set", "20MiB/s")
p = agent("chg", 20); t0 = started("chg-000") + 3
while time.monotonic() < t0:
    time.sleep(0.05)
throttle("set", "50MiB/s"); changed = time.monotonic()
latency = None
for k in range(0, 40):
    a = changed + k * 0.25
    r = rate("chg-000", a, a + 1.0)
    if r >= 0.9 * 50 * MIB:
        latency = k * 0.25
        break
p.wait()
throttle("set", "40MiB/s")
# Both VMs cut a point every 5 s; the small VM's RPO threshold is 30 s (critical at 60 s).
subprocess.run([f"{BIN}/ferry", "policy", "set", "--vm", "small-000", "--rpo-threshold", "30s",
                "--state-dir", f"{WORK}/state"], check=True, capture_output=True)
c = agent("churn", 36, 0, 5); s = agent("small", 36, 5_000_000, 5)
t0 = max(started("churn-000"), started("small-000")) + 3
rc, rs = rate("churn-000", t0, t0 + 30), rate("small-000", t0, t0 + 30)
window = [x[3].get("small-000", (None, [])) for x in samples if t0 <= x[0] <= t0 + 30]
rpos = [r for r, _ in window if r is not None]
over = sorted({c for _, cs in window for c in cs if c.startswith("rpo")})
c.wait(); s.wait()
stop.set()
print(f"{'measure':<44} {'setting':>12} {'on the wire':>12} {'ratio':>7}")
for name, want, got in rows:
    ws = f"{want / MIB:.1f} MiB/s" if want else "-"
    ratio = f"{got / want:.3f}" if want else "-"
    print(f"{name:<44} {ws:>12} {got / MIB:>7.2f} MiB/s {ratio:>7}")
print(f"{'change 20 -> 50 MiB/s shows (1 s window >= 90 %)':<44} {'':>12} "
      f"{'after ' + (f'{latency:.2f} s' if latency is not None else '> 10 s'):>12}")
print(f"{'fairness, 40 MiB/s global: small VM (5 MB/s)':<44} {5e6 / MIB:>7.2f} MiB/s {rs / MIB:>7.2f} MiB/s {rs / 5e6:>7.3f}")
print(f"{'fairness, 40 MiB/s global: churner':<44} {'rest':>12} {rc / MIB:>7.2f} MiB/s {(rc + rs) / (40 * MIB):>7.3f}")
rpo_max = f"{max(rpos):.1f} s" if rpos else "none"
print(f"{'small VM RPO over those 30 s (cut every 5 s)':<44} {'< 30 s':>12} {'max ' + rpo_max:>12} "
      f"{'conditions: ' + (', '.join(over) if over else 'none')}")
PY
