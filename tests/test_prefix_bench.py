"""bench/prefix_bench.py run tiny (the figures of docs/eni-prefix.md): a boot storm of real PrefixPools over
HTTP to the real emulator, the route-table storm on its fake clock, and one host's containers in both
addressings; and `docker run` on a real engine (Docker 28 in its sandbox) in both, every container and network
removed afterwards. The figures themselves are run by hand; this keeps the harness and its checks honest."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import PLUGIN_DIR, run

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


@pytest.mark.docker
def test_docker_runs_on_a_real_engine_in_both_addressings_and_nothing_left(current_docker, tmp_path):
    out = tmp_path / "docker-runs.json"
    done = subprocess.run([sys.executable, BENCH, "--storm", "", "--vstorm", "", "--containers", "0",
                           "--rounds", "1", "--docker-runs", "4", "--latency", "0.05", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["docker_runs"]
    assert runs["engine"] and runs["containers"] == 4 and runs["goal"] == 1.10
    assert [r["mode"] for r in runs["rounds"]] == ["route-table", "eni-prefix"]
    for r in runs["rounds"]:
        assert r["started"] == 4 and r["left_after_cleanup"] == 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    route, eni = runs["rounds"]
    assert route["cloud_calls"] == 0 and route["prefixes_held"] == 0
    # the 4 containers took the warm /28: the background pass assigned the next one
    assert eni["prefixes_held"] >= 2 and eni["requests"].get("AssignPrivateIpAddresses", 0) >= 1
    assert runs["p99_ratio"]["median"] == runs["p99_ratio"]["min"] > 0
    left = run(["docker", "ps", "-aq", "--filter", "label=vpcnet-bench"]).stdout.split()
    nets = run(["docker", "network", "ls", "-q", "--filter", "name=vpcnet-bench-"]).stdout.split()
    assert left == [] and nets == [], "the bench removes every container and network it made"
    assert not [f for f in os.listdir(PLUGIN_DIR) if f.startswith("vpcnet-bench-")], "plugin sockets left"
