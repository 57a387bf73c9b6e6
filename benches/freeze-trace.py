#!/usr/bin/env python3
"""What the time inside FIFREEZE goes to: reads `perf script` output of the events recorded by
`TRACE=1 benches/cut-window.sh` (FIFREEZE ioctls, block requests, jbd2 commits) and, per freeze,
prints how long the loop device had a cache flush outstanding, how long no request at all was
outstanding on the loop device or the disk under its backing file (`io_idle_ms`), how many
flushes and FUA writes each got, the journal commits inside the window, and a timeline.
Requests are paired issue to completion by device and sector (the latest issue; flushes, which
have none, in order); a pair more than a second apart is dropped as unmatched.

Usage: freeze-trace.py PERF_SCRIPT_TXT LOOP_MAJ,MIN DISK_MAJ,MIN   (prints JSON)
"""
import json, re, statistics, sys

FIFREEZE = 0xC0045877
LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[\d+\]\s+([\d.]+):\s+(\S+):\s+(.*)$")


def union(intervals, lo, hi):
    """Time within [lo, hi] covered by the intervals."""
    spans = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, end = 0.0, lo
    for a, b in spans:
        a = max(a, end)
        if b > a:
            total += b - a
            end = b
    return total


def jdev(rest):
    """The journal's device of a jbd2 event, as MAJ,MIN."""
    m = re.search(r"dev (\d+),(\d+)", rest)
    return f"{m.group(1)},{m.group(2)}" if m else None


def main():
    path, loop, disk = sys.argv[1], sys.argv[2], sys.argv[3]
    freezes, open_ = [], {}
    issued = {}  # (dev, kind, sector) -> [issue times] in order
    reqs = []  # (dev, kind, issue, complete, bytes)
    commits, open_commit = [], {}
    events = []  # (ts, text) of the loop's and the disk's requests and the journal, for timelines
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        _, tid, ts, ev, rest = m.groups()
        ts = float(ts)
        if ev == "syscalls:sys_enter_ioctl":
            c = re.search(r"cmd: (0x[0-9a-f]+)", rest)
            if c and int(c.group(1), 16) == FIFREEZE:
                open_[tid] = ts
        elif ev == "syscalls:sys_exit_ioctl" and tid in open_:
            freezes.append((open_.pop(tid), ts))
        elif ev in ("block:block_rq_issue", "block:block_rq_complete"):
            f = rest.split()
            dev, rwbs = f[0], f[1]
            if dev not in (loop, disk):
                continue
            # A pure flush has no data (sector 0 + 0); FUA is an F after the W.
            kind = "flush" if rwbs.startswith("F") and "W" not in rwbs else (
                "fua_write" if re.match(r"F?W.*F", rwbs) else ("write" if "W" in rwbs else "other"))
            size = re.search(r"(\d+) \+ (\d+)", rest)
            sector = int(size.group(1)) if size and kind != "flush" else None
            nbytes = int(size.group(2)) * 512 if size else 0
            key = (dev, kind, sector)
            events.append((ts, f"{'loop' if dev == loop else 'disk'} {ev.split('_')[-1]} {rwbs} {nbytes}"))
            if ev.endswith("issue"):
                issued.setdefault(key, []).append((ts, nbytes))
            elif issued.get(key):
                # Flushes in order; a data request with the latest issue at its sector (an
                # issue never completed under the same key, e.g. a merged request, must not pair
                # with a much later completion), and none outstanding for more than a second.
                t0, nb = issued[key].pop(0 if sector is None else -1)
                if ts - t0 < 1.0:
                    reqs.append((dev, kind, t0, ts, nb))
        elif ev == "jbd2:jbd2_start_commit" and jdev(rest) == loop:
            open_commit[loop] = ts
            events.append((ts, "journal commit start"))
        elif ev == "jbd2:jbd2_end_commit" and jdev(rest) == loop and loop in open_commit:
            commits.append((open_commit.pop(loop), ts))
            events.append((ts, "journal commit end"))
    rows = []
    for a, b in freezes:
        row = {"fifreeze_ms": round((b - a) * 1e3, 2)}
        for dev, name in ((loop, "loop"), (disk, "disk")):
            fl = [(s, e) for d, k, s, e, _ in reqs if d == dev and k == "flush" and e > a and s < b]
            fua = [(s, e) for d, k, s, e, _ in reqs if d == dev and k == "fua_write" and e > a and s < b]
            wr = [nb for d, k, s, e, nb in reqs if d == dev and k in ("write", "fua_write") and a <= s < b]
            row[f"{name}_flushes"] = len(fl)
            row[f"{name}_flush_outstanding_ms"] = round(union(fl + fua, a, b) * 1e3, 2)
            row[f"{name}_fua_writes"] = len(fua)
            row[f"{name}_write_bytes"] = sum(wr)
        every = [(s, e) for d, k, s, e, _ in reqs if e > a and s < b]
        row["io_idle_ms"] = round(((b - a) - union(every, a, b)) * 1e3, 2)
        row["journal_commits"] = sum(1 for s, e in commits if e > a and s < b)
        row["journal_commit_ms"] = round(union(commits, a, b) * 1e3, 2)
        row["timeline"] = [f"+{(t - a) * 1e3:.2f} ms {what}" for t, what in events if a <= t <= b]
        rows.append(row)
    rows.sort(key=lambda r: r["fifreeze_ms"])
    med = lambda k: statistics.median(r[k] for r in rows) if rows else None
    summary = {k: med(k) for k in (rows[0].keys() if rows else []) if k != "timeline"}
    print(json.dumps({"freezes": len(rows), "median": summary,
                      "median_freeze": rows[len(rows) // 2] if rows else None,
                      "slowest": rows[-1] if rows else None,
                      "all": [{k: v for k, v in r.items() if k != "timeline"} for r in rows]},
                     indent=1))


main()
