#!/usr/bin/env bash
# An initial sync of a large sparse disk image: what `ferry replicate --once` reads, and the point's
# digest against b3sum-equivalent hashing of the whole image (issue 12: a 1 TiB disk holding 10 GiB
# reads ~10 GiB, not 1 TiB).
#
# Makes a SIZE-byte sparse file holding DATA bytes of incompressible data in 64 MiB extents spread
# evenly over it, runs `ferry replicate --once --json` on it, and reads the process's own I/O
# counters from the kernel (/proc/PID/io, read after the process exited and before it is reaped):
# rchar is every byte read(2)/pread(2) returned by the whole process: the scan's reads of the image
# (holes would count: the kernel returns their zeros) and the drain reading back cache records
# that did not fit its memory budget. The scan's own figure (bytes scanned less holes skipped, from
# --json) is the image's share. With VERIFY=1, `ferry restore
# --verify` then restores the point and checks the restored bytes against the digest the point
# records (crates/ferry-scan/tests/sparse.rs checks that digest against an independent b3sum).
#
# With DEVICE=1 (root) the image is attached as a loop device and the device is replicated: its
# holes are found in the backing file (crates/ferry-read/src/holes.rs), and what was read from the
# device is the kernel's own count for it (/sys/class/block/loopN/stat, sectors read).
# benches/sparse-agent.sh measures the agent's initial sync of such a device.
#
# Environment: SIZE (1 TiB), DATA (10 GiB), VERIFY (0), DEVICE (0), WORKDIR (default a new dir
# under /var/tmp, removed unless KEEP=1), CARGO_TARGET_DIR. Writes
# benches/results/sparse-DATE.json.
set -euo pipefail

SIZE=${SIZE:-$((1 << 40))}
DATA=${DATA:-$((10 << 30))}
VERIFY=${VERIFY:-0}
DEVICE=${DEVICE:-0}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build --release -p ferry-cli
target=${CARGO_TARGET_DIR:-target}
if [[ -n ${WORKDIR:-} ]]; then
    mkdir -p "$WORKDIR"
    work=$(realpath "$WORKDIR")
else
    work=$(mktemp -d /var/tmp/ferry-sparse.XXXXXX)
fi
dev=""
cleanup() {
    [[ -z $dev ]] || losetup -d "$dev" 2>/dev/null || true
    [[ -n ${WORKDIR:-} || ${KEEP:-0} == 1 ]] || rm -rf -- "$work"
}
trap cleanup EXIT
cp "$target/release/ferry" "$work/ferry"
(umask 077 && rm -f "$work/key" && printf '%064x\n' 7 >"$work/key")
img=$work/sparse.img
echo "work dir: $work; making a $SIZE-byte sparse image with $DATA bytes of data..."
python3 benches/mksparse.py "$img" "$SIZE" "$DATA"
echo "allocated: $(du -B1 "$img" | cut -f1) bytes"
src=$img
if [[ $DEVICE == 1 ]]; then
    dev=$(losetup --find --show "$img")
    src=$dev
    echo "replicating the loop device $dev over it"
fi
python3 - "$work" "$src" "$SIZE" "$DATA" "$VERIFY" "$(git describe --always --dirty 2>/dev/null || echo unknown)" "$img" <<'EOF'
import datetime, json, os, subprocess, sys, time
work, src, size, data, verify, rev, img = sys.argv[1:]
size, data = int(size), int(data)
def sectors_read(dev):
    return int(open(f"/sys/class/block/{os.path.basename(dev)}/stat").read().split()[2])
device = src.startswith("/dev/")
dev0 = sectors_read(src) if device else None
def io_of(pid):
    return {l.split(":")[0]: int(l.split(":")[1]) for l in open(f"/proc/{pid}/io")}
t0 = time.monotonic()
p = subprocess.Popen([f"{work}/ferry", "replicate", src, "--vm", "sparse", "--store",
                      f"{work}/store", "--cache-dir", f"{work}/cache", "--key-file",
                      f"{work}/key", "--once", "--json"], stdout=subprocess.PIPE,
                     stderr=open(f"{work}/ferry.log", "w"))
out = p.stdout.read()
os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: /proc/PID/io stays
io = io_of(p.pid)
wall = time.monotonic() - t0
ru = os.wait4(p.pid, 0)[2]
r = json.loads(out)
d = r["disks"][0]
res = {"what": "benches/sparse.sh: ferry replicate --once of a sparse " + ("loop device" if device else "image"),
       "source": rev, "replicated": src,
       "size": size, "data": data, "allocated": os.stat(img).st_blocks * 512,
       "wall_seconds": round(wall, 2), "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
       "source_read_bytes": d["bytes_read"] - d["hole_bytes"],
       "process_rchar": io["rchar"], "process_read_bytes_from_disk": io["read_bytes"],
       "hole_bytes": d["hole_bytes"], "stored": r["stored"], "point": r["point"],
       "blake3": d["blake3"]}
if device:
    res["device_read_bytes"] = (sectors_read(src) - dev0) * 512
if verify == "1":
    v = subprocess.run([f"{work}/ferry", "restore", "--store", f"{work}/store", "--key-file",
                        f"{work}/key", "--vm", "sparse", "--point", "latest", "--out",
                        f"{work}/restored.img", "--verify"], capture_output=True, text=True)
    res["restore_verified"] = v.returncode == 0
    if v.returncode != 0:
        print(v.stderr, file=sys.stderr)
    os.remove(f"{work}/restored.img") if os.path.exists(f"{work}/restored.img") else None
os.makedirs("benches/results", exist_ok=True)
path = "benches/results/sparse-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ") + ".json"
json.dump(res, open(path, "w"), indent=2)
src = res["source_read_bytes"]
if device:
    print(f"the kernel counted {res['device_read_bytes'] / 2**30:.2f} GiB read from {res['replicated']}")
print(f"sparse: {size / 2**30:.0f} GiB {'loop device' if device else 'image'} holding {data / 2**30:.1f} GiB: the scan read {src / 2**30:.2f} GiB "
      f"({src / data:.3f}x the data; {d['hole_bytes'] / 2**30:.1f} GiB of holes not read); the process read "
      f"{io['rchar'] / 2**30:.2f} GiB in all (rchar, the cache read-back included); "
      f"{wall:.1f} s wall, {res['cpu_seconds']} CPU-s; verified: {res.get('restore_verified')}")
print(f"written to {path}")
EOF
