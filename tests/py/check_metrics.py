"""Parses a Prometheus text exposition with the Prometheus project's own Python parser
(prometheus_client.parser) and checks what Ferry's metrics test expects.

usage: check_metrics.py FILE VM MIN_INGEST_BYTES

Prints one JSON object: {metric family name: {type, samples: [[name, labels, value], ...]}}
and exits 1 with a message if the exposition does not parse or a check fails.
"""
import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    path, vm, min_ingest = sys.argv[1], sys.argv[2], int(sys.argv[3])
    text = open(path, encoding="utf-8").read()
    fams = {}
    for f in text_string_to_metric_families(text):
        fams[f.name] = {
            "type": f.type,
            "samples": [[s.name, s.labels, s.value] for s in f.samples],
        }

    def value(name, **labels):
        for fam in fams.values():
            for s in fam["samples"]:
                if s[0] == name and all(s[1].get(k) == v for k, v in labels.items()):
                    return s[2]
        raise SystemExit(f"no sample {name} {labels}")

    # The parser strips _total from counter family names.
    assert fams["ferry_ingest_bytes"]["type"] == "counter", fams["ferry_ingest_bytes"]
    got = value("ferry_ingest_bytes_total", vm=vm)
    assert got >= min_ingest, f"ingest {got} < {min_ingest}"
    assert value("ferry_ingest_acked_bytes_total", vm=vm) >= min_ingest
    assert fams["ferry_cache_quota_bytes"]["type"] == "gauge"
    assert value("ferry_cache_quota_bytes") == 512 << 20
    # The --once agent is gone, its point seconds old.
    assert value("ferry_agent_connected", vm=vm) == 0.0, value("ferry_agent_connected", vm=vm)
    assert 0 <= value("ferry_rpo_seconds", vm=vm) < 60, value("ferry_rpo_seconds", vm=vm)
    assert value("ferry_condition", condition="no_recovery_point", vm=vm) == 0.0
    assert value("ferry_points_total", vm=vm, kind="crash") >= 1
    assert value("ferry_throttle_rate_bytes_per_second", link="ingest", vm="*") == 50 << 20
    assert math.isinf(value("ferry_throttle_rate_bytes_per_second", link="upload", vm="*"))
    assert value("ferry_stored_bytes_total") > 0
    assert value("ferry_pipeline_data_bytes_total") >= min_ingest
    print(json.dumps(fams, default=str))


if __name__ == "__main__":
    main()
