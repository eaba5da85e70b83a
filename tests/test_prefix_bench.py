"""bench/prefix_bench.py run tiny (the figures of docs/eni-prefix.md): a boot storm of real PrefixPools over
HTTP to the real emulator, the route-table storm on its fake clock, and one host's containers in both
addressings. The figures themselves are run by hand; this keeps the harness and its checks honest."""
from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "prefix_bench.py")


def test_a_tiny_run_gives_every_host_its_own_prefix_and_counts_the_calls(tmp_path):
    out = tmp_path / "prefixes.json"
    done = subprocess.run([sys.executable, BENCH, "--storm", "25", "--vstorm", "3", "--rounds", "1",
                           "--containers", "20", "--gap", "0.01", "--latency", "0.05", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    storm = result["storms"][0]["rounds"][0]
    assert storm["finished"] == storm["hosts"] == 25 and storm["with_problems"] == 0
    assert storm["hosts_with_one_prefix"] == storm["distinct_prefixes"] == 25 and storm["route_entries"] == 0
    assert storm["requests"]["AssignPrivateIpAddresses"] == 25 and storm["calls_per_host"] <= 5
    assert storm["goal_met"]
    assert result["route_table_storms"][0]["rounds"][0]["complete"]
    modes = {r["mode"]: r for r in result["containers"]["rounds"]}
    assert modes["route-table"]["cloud_calls"] == 0 and modes["route-table"]["distinct_addresses"] == 20
    eni = modes["eni-prefix"]
    # 20 containers in 0.2 s outrun a warm /28 (13 addresses in the range's first one): a second prefix came
    assert eni["distinct_addresses"] == 20 and eni["prefixes_held"] >= 2
    assert eni["requests"].get("AssignPrivateIpAddresses", 0) >= 1
    assert result["containers"]["p99_ratio"]["median"] > 0 and "load_avg_after" in result["host"]
