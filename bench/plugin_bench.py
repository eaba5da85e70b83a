#!/usr/bin/env python3
"""Single-host plugin benchmark (root, a running Docker engine).

1. `docker run --rm --network <net> IMAGE true` on a vpcnet network versus Docker's built-in bridge
   network, interleaved in one run, N rounds each: medians and their ratio (target <= 1.10).
2. Plugin-side CreateEndpoint + Join latency over the unix socket, as Docker calls it, with the real
   dataplane (veths in a namespace of the bench's own): p50 / p99 (target p99 <= 25 ms), and the split
   between the two calls.
3. Plugin RSS (master + workers) with 200 endpoints (target <= 80 MB).
4. The cost of metrics (issue 10): two plugins at once, each in a namespace of its own, one with
   VPCNET_METRICS_ADDR off and one with it on (and scraped every --scrape-every seconds meanwhile),
   CreateEndpoint + Join calls alternating between them so both see the same machine: p99 on versus off
   (target within 5 %); then the scrape time of `/metrics` with 500 endpoints (target <= 50 ms) and the
   RSS of the plugin with metrics on (target <= 80 MB).

Writes bench/results/plugin.json (1-3) and bench/results/metrics.json (4), and prints Markdown tables.
    python3 bench/plugin_bench.py [--rounds 20] [--endpoints 200] [--metrics-endpoints 500] [--only metrics]
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
import threading
import time
import urllib.request
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
                 prefix: int = 24, metrics_addr: str = ""):
        self.sock = f"/run/docker/plugins/{name}.sock"
        env = dict(os.environ, VPCNET_SOCKET=self.sock, VPCNET_STATE_DIR=state, VPCNET_CLUSTER_CIDR=cluster,
                   VPCNET_HOST_PREFIX=str(prefix), VPCNET_LOG_LEVEL="WARNING", VPCNET_CONFIG=os.devnull,
                   VPCNET_METRICS_ADDR=metrics_addr)
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


class Network:
    """One network of a running plugin, for making endpoints on it."""

    def __init__(self, plugin: Plugin):
        self.plugin = plugin
        self.pool = call(plugin.sock, "/IpamDriver.RequestPool", {"Pool": ""})
        self.nid = uuid.uuid4().hex + uuid.uuid4().hex
        call(plugin.sock, "/NetworkDriver.CreateNetwork", {
            "NetworkID": self.nid, "Options": {},
            "IPv4Data": [{"Pool": self.pool["Pool"], "Gateway": self.pool["Data"]["com.docker.network.gateway"]}]})

    def endpoint(self) -> float:
        """RequestAddress (not timed), then CreateEndpoint + Join as Docker calls them: their seconds."""
        eid = uuid.uuid4().hex + uuid.uuid4().hex
        addr = call(self.plugin.sock, "/IpamDriver.RequestAddress", {"PoolID": self.pool["PoolID"]})["Address"]
        t0 = time.perf_counter()
        call(self.plugin.sock, "/NetworkDriver.CreateEndpoint",
             {"NetworkID": self.nid, "EndpointID": eid, "Interface": {"Address": addr}})
        call(self.plugin.sock, "/NetworkDriver.Join", {"NetworkID": self.nid, "EndpointID": eid,
                                                       "SandboxKey": "/var/run/docker/netns/bench"})
        return time.perf_counter() - t0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _enter_netns(name: str) -> None:
    """Move the calling thread (only) into a named network namespace: setns(2) is per thread."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:            # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def _scrape(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    body = urllib.request.urlopen(url, timeout=10).read()
    return time.perf_counter() - t0, len(body)


def bench_metrics(count: int, scrape_every: float, scrapes: int = 30) -> dict:
    """Metrics on versus off, interleaved; then scrape time and RSS with `count` endpoints."""
    tag = uuid.uuid4().hex[:6]
    namespaces = [f"vpcbench{tag}{side}" for side in ("off", "on")]
    for ns in namespaces:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    addr = f"127.0.0.1:{_free_port()}"
    url = f"http://{addr}/metrics"
    stop = threading.Event()
    scraped: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as state_off, tempfile.TemporaryDirectory() as state_on:
            off = Plugin(f"vpcbench{tag}off", state_off, netns=namespaces[0], cluster="10.232.0.0/16", prefix=23)
            on = Plugin(f"vpcbench{tag}on", state_on, netns=namespaces[1], cluster="10.233.0.0/16", prefix=23,
                        metrics_addr=addr)
            # The listener is on the loopback of the plugin's namespace: scrape from a thread in it.
            from concurrent.futures import ThreadPoolExecutor

            inside = ThreadPoolExecutor(1, initializer=_enter_netns, initargs=(namespaces[1],))
            try:
                nets = {"off": Network(off), "on": Network(on)}

                def scraper():
                    while not stop.wait(scrape_every):
                        try:
                            scraped.append(inside.submit(_scrape, url).result()[0])
                        except OSError:
                            pass
                thread = threading.Thread(target=scraper, daemon=True)
                thread.start()
                times: dict[str, list[float]] = {"off": [], "on": []}
                for i in range(count):
                    for side in (("off", "on") if i % 2 == 0 else ("on", "off")):
                        times[side].append(nets[side].endpoint())
                stop.set()
                thread.join(timeout=15)
                inside.submit(_scrape, url).result()                  # warm
                samples = [inside.submit(_scrape, url).result() for _ in range(scrapes)]
                scrape_s = [t for t, _ in samples]
                rss = on.rss_bytes()
                rss_off = off.rss_bytes()
                text = inside.submit(lambda: urllib.request.urlopen(url, timeout=10).read().decode()).result()
                series = sum(1 for line in text.splitlines() if line.startswith("vpcnet_endpoint_"))
            finally:
                inside.shutdown(wait=False)
                for plugin in (off, on):
                    plugin.stop()
    finally:
        stop.set()
        for ns in namespaces:
            sh("ip", "netns", "del", ns, check=False)
    ms = lambda v: round(v * 1000, 2)   # noqa: E731
    p99 = {side: pct(v, 0.99) for side, v in times.items()}
    return {"endpoints_per_plugin": count, "scrape_every_s_during_calls": scrape_every,
            "scrapes_during_calls": len(scraped),
            "create_endpoint_plus_join_ms": {side: {"p50": ms(pct(v, 0.5)), "p99": ms(pct(v, 0.99)),
                                                    "max": ms(max(v))} for side, v in times.items()},
            "p99_on_over_off": round(p99["on"] / p99["off"], 3),
            "scrape_ms_with_endpoints": {"median": ms(statistics.median(scrape_s)), "p99": ms(pct(scrape_s, 0.99)),
                                         "max": ms(max(scrape_s)), "scrapes": scrapes,
                                         "bytes": samples[-1][1], "endpoint_series": series},
            "rss_mb": {"metrics_on": round(rss / 2**20, 1), "metrics_off": round(rss_off / 2**20, 1)}}


def print_metrics(m: dict) -> None:
    on, off = m["create_endpoint_plus_join_ms"]["on"], m["create_endpoint_plus_join_ms"]["off"]
    s = m["scrape_ms_with_endpoints"]
    print("| metric | value | target |\n|---|---|---|")
    print(f"| CreateEndpoint + Join p99, metrics off / on ({m['endpoints_per_plugin']} each, interleaved, "
          f"scraped every {m['scrape_every_s_during_calls']:g} s) | {off['p99']} / {on['p99']} ms | |")
    print(f"| ratio on / off | {m['p99_on_over_off']} | <= 1.05 |")
    print(f"| /metrics scrape with {m['endpoints_per_plugin']} endpoints, median / max of {s['scrapes']} | "
          f"{s['median']} / {s['max']} ms | <= 50 ms |")
    print(f"| plugin RSS, metrics on / off, {m['endpoints_per_plugin']} endpoints | {m['rss_mb']['metrics_on']} / "
          f"{m['rss_mb']['metrics_off']} MB | <= 80 MB |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--endpoints", type=int, default=200)
    parser.add_argument("--endpoints-only", metavar="FILE",
                        help="only the CreateEndpoint + Join latency (no Docker engine needed), to FILE")
    parser.add_argument("--metrics-endpoints", type=int, default=500)
    parser.add_argument("--scrape-every", type=float, default=5.0, metavar="S",
                        help="seconds between scrapes during the on/off comparison (Prometheus' default is 15)")
    parser.add_argument("--only", choices=("all", "metrics"), default="all")
    args = parser.parse_args()
    if args.endpoints_only:
        only = {"plugin": bench_endpoints(args.endpoints), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(args.endpoints_only, "w") as fh:
            json.dump(only, fh, indent=2)
        print(json.dumps(only["plugin"], indent=2))
        return 0
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    metrics = bench_metrics(args.metrics_endpoints, args.scrape_every)
    metrics["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(os.path.join(HERE, "results", "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    print_metrics(metrics)
    if args.only == "metrics":
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
