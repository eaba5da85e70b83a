#!/usr/bin/env python3
"""Single-host plugin benchmark (root, a running Docker engine).

1. `docker run --rm --network <net> IMAGE true` on a vpcnet network versus Docker's built-in bridge
   network, interleaved in one run, N rounds each: medians and their ratio (target <= 1.10).
2. Plugin-side CreateEndpoint + Join latency over the unix socket, as Docker calls it, with the real
   dataplane (veths in a namespace of the bench's own): p50 / p99 (target p99 <= 25 ms), and the split
   between the two calls.
3. Plugin RSS (master + workers) with 200 endpoints (target <= 80 MB).

Writes bench/results/plugin.json and prints a Markdown table.
    python3 bench/plugin_bench.py [--rounds 20] [--endpoints 200]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vpcnet import image, plugin_client  # noqa: E402


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=300)


def call(sock_path: str, path: str, body) -> dict:
    status, answer = plugin_client.call(sock_path, path, body, timeout=30)
    if status != 200:
        raise RuntimeError(f"{path}: {answer}")
    return answer


class Plugin:
    def __init__(self, name: str, state: str, netns: str | None = None, cluster: str = "10.230.0.0/16",
                 prefix: int = 24):
        self.sock = f"/run/docker/plugins/{name}.sock"
        env = dict(os.environ, VPCNET_SOCKET=self.sock, VPCNET_STATE_DIR=state, VPCNET_CLUSTER_CIDR=cluster,
                   VPCNET_HOST_PREFIX=str(prefix), VPCNET_LOG_LEVEL="WARNING", VPCNET_CONFIG=os.devnull)
        prefix_cmd = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        self.proc = subprocess.Popen([*prefix_cmd, sys.executable, "-m", "vpcnet.cli", "serve"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                call(self.sock, "/Plugin.Activate", None)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("plugin did not start")

    def rss_bytes(self) -> int:
        pids = [self.proc.pid] + [int(p) for p in sh("pgrep", "-g", str(self.proc.pid), check=False).stdout.split()]
        total = 0
        for pid in set(pids):
            try:
                with open(f"/proc/{pid}/status") as fh:
                    for line in fh:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_docker_run(rounds: int, img: str) -> dict:
    name = f"vpcbench{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as state:
        plugin = Plugin(name, state)
        vnet, bnet = f"{name}-v", f"{name}-b"
        try:
            sh("docker", "network", "create", "-d", name, "--ipam-driver", name, vnet)
            sh("docker", "network", "create", "-d", "bridge", bnet)
            times = {"vpcnet": [], "bridge": []}
            for net in (vnet, bnet):       # warm-up, not counted
                sh("docker", "run", "--rm", "--network", net, img, "true")
            for _ in range(rounds):
                for label, net in (("vpcnet", vnet), ("bridge", bnet)):
                    started = time.perf_counter()
                    sh("docker", "run", "--rm", "--network", net, img, "true")
                    times[label].append(time.perf_counter() - started)
        finally:
            sh("docker", "network", "rm", vnet, check=False)
            sh("docker", "network", "rm", bnet, check=False)
            plugin.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"rounds": rounds, "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
            "max_s": {k: max(v) for k, v in times.items()}, "ratio_vpcnet_over_bridge": med["vpcnet"] / med["bridge"]}


def bench_endpoints(count: int) -> dict:
    netns = f"vpcbench{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", netns)
    name = f"vpcbench{uuid.uuid4().hex[:6]}"
    try:
        with tempfile.TemporaryDirectory() as state:
            plugin = Plugin(name, state, netns=netns, cluster="10.231.0.0/16", prefix=23)
            try:
                rss_idle = plugin.rss_bytes()
                pool = call(plugin.sock, "/IpamDriver.RequestPool", {"Pool": ""})
                nid = uuid.uuid4().hex + uuid.uuid4().hex
                call(plugin.sock, "/NetworkDriver.CreateNetwork", {
                    "NetworkID": nid, "Options": {}, "IPv4Data": [{"Pool": pool["Pool"],
                                                                   "Gateway": pool["Data"]["com.docker.network.gateway"]}]})
                create, join, both = [], [], []
                for _ in range(count):
                    eid = uuid.uuid4().hex + uuid.uuid4().hex
                    addr = call(plugin.sock, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
                    t0 = time.perf_counter()
                    call(plugin.sock, "/NetworkDriver.CreateEndpoint",
                         {"NetworkID": nid, "EndpointID": eid, "Interface": {"Address": addr}})
                    t1 = time.perf_counter()
                    call(plugin.sock, "/NetworkDriver.Join", {"NetworkID": nid, "EndpointID": eid,
                                                              "SandboxKey": "/var/run/docker/netns/bench"})
                    t2 = time.perf_counter()
                    create.append(t1 - t0), join.append(t2 - t1), both.append(t2 - t0)
                rss_full = plugin.rss_bytes()
            finally:
                plugin.stop()
    finally:
        sh("ip", "netns", "del", netns, check=False)
    ms = lambda v: round(v * 1000, 2)   # noqa: E731
    return {"endpoints": count,
            "create_endpoint_plus_join_ms": {"p50": ms(pct(both, 0.5)), "p99": ms(pct(both, 0.99)),
                                             "max": ms(max(both))},
            "create_endpoint_ms": {"p50": ms(pct(create, 0.5)), "p99": ms(pct(create, 0.99))},
            "join_ms": {"p50": ms(pct(join, 0.5)), "p99": ms(pct(join, 0.99))},
            "rss_mb": {"idle": round(rss_idle / 2**20, 1), f"with_{count}_endpoints": round(rss_full / 2**20, 1)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--endpoints", type=int, default=200)
    parser.add_argument("--endpoints-only", metavar="FILE",
                        help="only the CreateEndpoint + Join latency (no Docker engine needed), to FILE")
    args = parser.parse_args()
    if args.endpoints_only:
        only = {"plugin": bench_endpoints(args.endpoints), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(args.endpoints_only, "w") as fh:
            json.dump(only, fh, indent=2)
        print(json.dumps(only["plugin"], indent=2))
        return 0
    img = image.build()
    result = {"docker_run": bench_docker_run(args.rounds, img), "plugin": bench_endpoints(args.endpoints),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "plugin.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    d, p = result["docker_run"], result["plugin"]
    print("| metric | value | target |\n|---|---|---|")
    print(f"| docker run --rm true, vpcnet median | {d['median_s']['vpcnet']*1000:.0f} ms | |")
    print(f"| docker run --rm true, bridge median | {d['median_s']['bridge']*1000:.0f} ms | |")
    print(f"| ratio vpcnet / bridge ({d['rounds']} rounds, interleaved) | {d['ratio_vpcnet_over_bridge']:.3f} | <= 1.10 |")
    print(f"| CreateEndpoint + Join p50 / p99 | {p['create_endpoint_plus_join_ms']['p50']} / "
          f"{p['create_endpoint_plus_join_ms']['p99']} ms | p99 <= 25 ms |")
    print(f"| of which CreateEndpoint p50 / p99 | {p['create_endpoint_ms']['p50']} / {p['create_endpoint_ms']['p99']} ms | |")
    print(f"| of which Join p50 / p99 | {p['join_ms']['p50']} / {p['join_ms']['p99']} ms | |")
    full = p["rss_mb"]["with_%d_endpoints" % p["endpoints"]]
    print(f"| plugin RSS idle / with {p['endpoints']} endpoints | {p['rss_mb']['idle']} / {full} MB | <= 80 MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
