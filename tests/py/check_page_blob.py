#!/usr/bin/env python3
"""Independent check of a Ferry replica with Microsoft's Python SDK (azure-storage-blob).

Usage: check_page_blob.py CONTAINER BLOB SIZE EXPECTED_FILE [SNAPSHOT=EXPECTED_FILE ...]
The connection string comes from AZURE_STORAGE_CONNECTION_STRING.

Checks that the page blob (and each named snapshot) holds the expected bytes in its first SIZE bytes,
zeros up to the 1 MiB-rounded VHD size, and a valid fixed-VHD footer (cookie `conectix`, disk type 2,
current size, checksum). Exits non-zero with a message on any mismatch.
"""
import os
import struct
import sys

from azure.storage.blob import BlobServiceClient


def check(blob_client, size, expected_path, label):
    props = blob_client.get_blob_properties()
    if props.blob_type != "PageBlob":
        sys.exit(f"{label}: blob type is {props.blob_type}, expected PageBlob")
    total = props.size
    vhd_size = (size + (1 << 20) - 1) // (1 << 20) * (1 << 20)
    if total != vhd_size + 512:
        sys.exit(f"{label}: blob is {total} bytes, expected {vhd_size + 512}")
    data = blob_client.download_blob().readall()
    with open(expected_path, "rb") as f:
        want = f.read()
    if len(want) != size:
        sys.exit(f"{label}: expected file has {len(want)} bytes, not {size}")
    if data[:size] != want:
        bad = next(i for i in range(size) if data[i] != want[i])
        sys.exit(f"{label}: bytes differ from the source at offset {bad}")
    if any(data[size:vhd_size]):
        sys.exit(f"{label}: padding after the disk is not zero")
    footer = data[vhd_size:]
    if footer[:8] != b"conectix":
        sys.exit(f"{label}: footer cookie is {footer[:8]!r}")
    (disk_type,) = struct.unpack(">I", footer[60:64])
    if disk_type != 2:
        sys.exit(f"{label}: disk type {disk_type}, expected 2 (fixed)")
    (orig, cur) = struct.unpack(">QQ", footer[40:56])
    if cur != vhd_size or orig != vhd_size:
        sys.exit(f"{label}: footer sizes {orig}/{cur}, expected {vhd_size}")
    (csum,) = struct.unpack(">I", footer[64:68])
    s = sum(b for i, b in enumerate(footer) if not 64 <= i < 68)
    if csum != (~s) & 0xFFFFFFFF:
        sys.exit(f"{label}: footer checksum {csum:#x} is wrong")
    print(f"ok {label}: {size} bytes + fixed VHD footer")


def main():
    container, blob, size, expected = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    svc = BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"])
    check(svc.get_blob_client(container, blob), size, expected, blob)
    for arg in sys.argv[5:]:
        snap, path = arg.split("=", 1)
        check(svc.get_blob_client(container, blob, snapshot=snap), size, path, f"{blob}@{snap}")


if __name__ == "__main__":
    main()
