#!/usr/bin/env python3
"""Makes a sparse disk image for the sparse benches: SIZE bytes holding DATA bytes of random
(incompressible) data in 64 MiB extents spread evenly over it, each starting 4 KiB x i into its
stride (so extents straddle 4 MiB blocks), synced.

Usage: mksparse.py PATH SIZE DATA
"""
import os
import sys

path, size, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ext = 64 << 20
n = max(1, data // ext)
stride = size // n
with open(path, "wb") as f:
    f.truncate(size)
    for i in range(n):
        f.seek(i * stride + (i * 4096) % stride if stride > ext else i * ext)
        f.write(os.urandom(min(ext, data - i * ext)))
    os.fsync(f.fileno())
