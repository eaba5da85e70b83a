#!/usr/bin/env python3
"""Single-host plugin benchmark (root; a running Docker engine for 1 and 4's docker run).

1. `docker run --rm --network <net> IMAGE true` on a vpcnet network per mode (`--modes`: the default one,
   created with no -o option, and each explicit `-o vpcnet.mode=`) versus Docker's built-in bridge
   network, interleaved in one run, N rounds each: medians and their ratio (goal <= 1.05).
2. Per mode, plugin-side CreateEndpoint + Join latency over the unix socket, as Docker calls it, with the
   real datapath (veths in a namespace of the bench's own, a fresh plugin per mode): p50 / p99 at
   --endpoints endpoints (goal p99 <= 15 ms at 500), and the split between the two calls;
3. and the plugin's RSS (master + workers) with those endpoints (goal <= 80 MB at 500).
4. The cost of metrics: two plugins at once, each in a namespace of its own, one with
   VPCNET_METRICS_ADDR off and one with it on (and scraped every --scrape-every seconds meanwhile),
   CreateEndpoint + Join calls alternating between them so both see the same machine: p99 on versus off
   (target within 5 %); then the scrape time of `/metrics` with 500 endpoints (target <= 50 ms) and the
   RSS of the plugin with metrics on (target <= 80 MB).

`default` is what a user gets without -o: the mode the plugin resolves it to is read back from its
store (`vpcnet status`) and reported. Each goal is checked and printed with its verdict.

Writes plugin.json (1-3) and metrics.json (4) into --out (default bench/results), and prints Markdown.
    python3 bench/plugin_bench.py [--rounds 20] [--endpoints 500] [--modes default,ebpf] [--out DIR]
                                  [--only all|metrics|endpoints|docker-run] [--metrics-endpoints 500]
    python3 bench/plugin_bench.py --endpoints-only FILE    2 and 3 only (no Docker engine needed), to FILE
    --ipv6: 2 and 3 on dual-stack networks (each endpoint an IPv4 and an IPv6 address)
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
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "lab")]  # vpcnet, vpcnet_lab

from vpcnet_lab import image, plugin_client  # noqa: E402


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


MODES = ("default", "bridge", "routed", "ebpf")         # default: no -o vpcnet.mode, the plugin's choice
MODE_CLUSTERS = {"default": "", "bridge": "10.234.0.0/16", "routed": "10.235.0.0/16", "ebpf": "10.236.0.0/16"}
GOALS = {  # the per-container cost goals
    "docker_run_ratio": 1.05,        # docker run on vpcnet / on Docker's bridge network
    "create_join_p99_ms": 15.0,      # CreateEndpoint + Join p99, at 500 endpoints
    "rss_mb": 80.0,                  # plugin RSS (master + workers), at 500 endpoints
}
GOAL_ENDPOINTS = 500
VERDICT = {True: "yes", False: "**no**", None: "not checked"}


def generic_options(mode: str) -> dict:
    """CreateNetwork's Options for a mode, as Docker sends `-o vpcnet.mode=...` (none for the default)."""
    return {} if mode == "default" else {"com.docker.network.generic": {"vpcnet.mode": mode}}


def stored_modes(state: str) -> dict[str, str]:
    """Network ID -> the mode the plugin stored for it (`vpcnet status --json` on its state dir)."""
    env = dict(os.environ, VPCNET_STATE_DIR=state)
    proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", "status", "--config", os.devnull, "--json"],
                          capture_output=True, text=True, timeout=60, env=env)
    try:
        return {n["network_id"]: n["mode"] for n in json.loads(proc.stdout)["networks"]}
    except (ValueError, KeyError):
        return {}


def bench_docker_run(rounds: int, img: str, modes: list[str]) -> dict:
    name = f"vpcbench{uuid.uuid4().hex[:6]}"
    nets = {f"vpcnet-{m}" if m != "default" else "vpcnet": (f"{name}-{m}", m) for m in modes}
    bnet = f"{name}-b"
    with tempfile.TemporaryDirectory() as state:
        plugin = Plugin(name, state)
        try:
            resolved = {}
            for label, (net, mode) in nets.items():
                extra = ["--subnet", MODE_CLUSTERS[mode], "-o", f"vpcnet.mode={mode}"] if mode != "default" else []
                sh("docker", "network", "create", "-d", name, "--ipam-driver", name, *extra, net)
                nid = sh("docker", "network", "inspect", "-f", "{{.Id}}", net).stdout.strip()
                resolved[label] = stored_modes(state).get(nid, "unknown")
            sh("docker", "network", "create", "-d", "bridge", bnet)
            everything = [*((label, net) for label, (net, _m) in nets.items()), ("bridge", bnet)]
            times: dict[str, list[float]] = {label: [] for label, _ in everything}
            for _label, net in everything:       # warm-up, not counted
                sh("docker", "run", "--rm", "--network", net, img, "true")
            for r in range(rounds):
                k = r % len(everything)
                for label, net in everything[k:] + everything[:k]:
                    started = time.perf_counter()
                    sh("docker", "run", "--rm", "--network", net, img, "true")
                    times[label].append(time.perf_counter() - started)
        finally:
            for net, _mode in nets.values():
                sh("docker", "network", "rm", net, check=False)
            sh("docker", "network", "rm", bnet, check=False)
            plugin.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"rounds": rounds, "resolved_modes": resolved, "median_s": med,
            "min_s": {k: min(v) for k, v in times.items()}, "max_s": {k: max(v) for k, v in times.items()},
            "ratio_over_bridge": {k: med[k] / med["bridge"] for k in med if k != "bridge"}}


def _prefix_for(count: int) -> int:
    """The smallest host block holding `count` endpoints plus network, gateway and broadcast addresses."""
    prefix = 32
    while 2 ** (32 - prefix) < count + 4:
        prefix -= 1
    return max(prefix, 16)


def bench_endpoints(count: int, mode: str = "default", ipv6: bool = False) -> dict:
    """CreateEndpoint + Join latency over `count` endpoints of one network of `mode`; `ipv6`: a dual-stack
    network (an IPv6 pool from the default IPv6 cluster CIDR, each endpoint an IPv6 address too)."""
    netns = f"vpcbench{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", netns)
    name = f"vpcbench{uuid.uuid4().hex[:6]}"
    try:
        with tempfile.TemporaryDirectory() as state:
            plugin = Plugin(name, state, netns=netns, cluster="10.231.0.0/16", prefix=_prefix_for(count))
            try:
                rss_idle = plugin.rss_bytes()
                pool = call(plugin.sock, "/IpamDriver.RequestPool", {"Pool": ""})
                nid = uuid.uuid4().hex + uuid.uuid4().hex
                gateway = pool["Data"]["com.docker.network.gateway"]
                create_net = {"NetworkID": nid, "Options": generic_options(mode),
                              "IPv4Data": [{"Pool": pool["Pool"], "Gateway": gateway}]}
                pool6 = call(plugin.sock, "/IpamDriver.RequestPool", {"Pool": "", "V6": True}) if ipv6 else None
                if pool6 is not None:
                    create_net["Options"] = {**create_net["Options"], "com.docker.network.enable_ipv6": True}
                    create_net["IPv6Data"] = [{"Pool": pool6["Pool"],
                                               "Gateway": pool6["Data"]["com.docker.network.gateway"]}]
                call(plugin.sock, "/NetworkDriver.CreateNetwork", create_net)
                create, join, both = [], [], []
                for _ in range(count):
                    eid = uuid.uuid4().hex + uuid.uuid4().hex
                    interface = {"Address": call(plugin.sock, "/IpamDriver.RequestAddress",
                                                 {"PoolID": pool["PoolID"]})["Address"]}
                    if pool6 is not None:
                        interface["AddressIPv6"] = call(plugin.sock, "/IpamDriver.RequestAddress",
                                                        {"PoolID": pool6["PoolID"]})["Address"]
                    t0 = time.perf_counter()
                    call(plugin.sock, "/NetworkDriver.CreateEndpoint",
                         {"NetworkID": nid, "EndpointID": eid, "Interface": interface})
                    t1 = time.perf_counter()
                    call(plugin.sock, "/NetworkDriver.Join", {"NetworkID": nid, "EndpointID": eid,
                                                              "SandboxKey": "/var/run/docker/netns/bench"})
                    t2 = time.perf_counter()
                    create.append(t1 - t0), join.append(t2 - t1), both.append(t2 - t0)
                rss_full = plugin.rss_bytes()
            finally:
                plugin.stop()
            resolved = stored_modes(state).get(nid, "unknown")
    finally:
        sh("ip", "netns", "del", netns, check=False)
    ms = lambda v: round(v * 1000, 2)   # noqa: E731
    return {"endpoints": count, "mode": mode, "resolved_mode": resolved, "dual_stack": ipv6,
            "create_endpoint_plus_join_ms": {"p50": ms(pct(both, 0.5)), "p99": ms(pct(both, 0.99)),
                                             "max": ms(max(both))},
            "create_endpoint_ms": {"p50": ms(pct(create, 0.5)), "p99": ms(pct(create, 0.99))},
            "join_ms": {"p50": ms(pct(join, 0.5)), "p99": ms(pct(join, 0.99))},
            "rss_mb": {"idle": round(rss_idle / 2**20, 1), f"with_{count}_endpoints": round(rss_full / 2**20, 1)}}


def check_goals(result: dict) -> list[dict]:
    """The per-container goals against a plugin.json-shaped result: one verdict per mode and goal.
    Latency and memory goals are set at 500 endpoints: a run with fewer is not a verdict (met None)."""
    out = []
    for mode, r in result.get("endpoints", {}).items():
        n = r["endpoints"]
        scale = "" if n == GOAL_ENDPOINTS else f" (measured at {n} endpoints, not {GOAL_ENDPOINTS})"
        p99 = r["create_endpoint_plus_join_ms"]["p99"]
        rss = r["rss_mb"][f"with_{n}_endpoints"]
        out.append({"mode": mode, "goal": f"CreateEndpoint + Join p99 <= {GOALS['create_join_p99_ms']:g} ms{scale}",
                    "value": p99, "met": p99 <= GOALS["create_join_p99_ms"] if n >= GOAL_ENDPOINTS else None})
        out.append({"mode": mode, "goal": f"plugin RSS <= {GOALS['rss_mb']:g} MB{scale}", "value": rss,
                    "met": rss <= GOALS["rss_mb"] if n >= GOAL_ENDPOINTS else None})
    for label, ratio in result.get("docker_run", {}).get("ratio_over_bridge", {}).items():
        mode = "default" if label == "vpcnet" else label.removeprefix("vpcnet-")
        out.append({"mode": mode, "goal": f"docker run <= {GOALS['docker_run_ratio']:g} x Docker's bridge network",
                    "value": round(ratio, 3), "met": ratio <= GOALS["docker_run_ratio"]})
    return out


def goals_markdown(result: dict) -> str:
    lines = ["| mode | goal | value | met |", "|---|---|---|---|"]
    for g in check_goals(result):
        lines.append(f"| {g['mode']} | {g['goal']} | {g['value']} | {VERDICT[g['met']]} |")
    return "\n".join(lines)


def endpoints_markdown(by_mode: dict) -> str:
    lines = ["| mode | endpoints | CreateEndpoint + Join p50 / p99 / max | CreateEndpoint p50 / p99 | "
             "Join p50 / p99 | RSS idle / full |", "|---|---|---|---|---|---|"]
    for mode, r in by_mode.items():
        both, c, j = r["create_endpoint_plus_join_ms"], r["create_endpoint_ms"], r["join_ms"]
        label = mode if mode != "default" else f"default (resolved: {r['resolved_mode']})"
        full = r["rss_mb"][f"with_{r['endpoints']}_endpoints"]
        lines.append(f"| {label} | {r['endpoints']} | {both['p50']} / {both['p99']} / {both['max']} ms | "
                     f"{c['p50']} / {c['p99']} ms | {j['p50']} / {j['p99']} ms | {r['rss_mb']['idle']} / {full} MB |")
    return "\n".join(lines)


def docker_run_markdown(d: dict) -> str:
    lines = [f"| network | docker run --rm true, median ({d['rounds']} rounds, interleaved) | ratio to bridge |",
             "|---|---|---|"]
    for label, med in d["median_s"].items():
        resolved = d.get("resolved_modes", {}).get(label)
        name = label + (f" (no -o: {resolved})" if label == "vpcnet" and resolved else "")
        ratio = d["ratio_over_bridge"].get(label)
        lines.append(f"| {name} | {med * 1000:.0f} ms | {f'{ratio:.3f}' if ratio is not None else '–'} |")
    return "\n".join(lines)


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


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or '(none)'} unknown "
                                         f"(known: {', '.join(MODES)})")
    return list(dict.fromkeys(modes))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--rounds", type=int, default=20, help="docker run rounds (default 20)")
    parser.add_argument("--endpoints", type=int, default=GOAL_ENDPOINTS,
                        help=f"endpoints per mode for the latency and memory figures (default {GOAL_ENDPOINTS})")
    parser.add_argument("--modes", type=_modes, default=list(MODES),
                        help=f"comma-separated modes to measure (default {','.join(MODES)}; default = no -o)")
    parser.add_argument("--endpoints-only", metavar="FILE",
                        help="only the CreateEndpoint + Join latency and RSS (no Docker engine needed), to FILE")
    parser.add_argument("--metrics-endpoints", type=int, default=500)
    parser.add_argument("--ipv6", action="store_true", help="endpoints bench: dual-stack networks and endpoints")
    parser.add_argument("--scrape-every", type=float, default=5.0, metavar="S",
                        help="seconds between scrapes during the on/off comparison (Prometheus' default is 15)")
    parser.add_argument("--only", choices=("all", "metrics", "endpoints", "docker-run"), default="all")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    args = parser.parse_args()
    if not 1 <= args.endpoints <= 4000 or not 1 <= args.rounds <= 500:
        parser.error("--endpoints 1..4000, --rounds 1..500")
    if args.endpoints_only:
        by_mode = {m: bench_endpoints(args.endpoints, m, args.ipv6) for m in args.modes}
        only = {"endpoints": by_mode, "when": _now()}
        only["goals"] = check_goals(only)
        with open(args.endpoints_only, "w") as fh:
            json.dump(only, fh, indent=2)
        print(endpoints_markdown(by_mode) + "\n\n" + goals_markdown(only))
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.only in ("all", "metrics"):
        metrics = bench_metrics(args.metrics_endpoints, args.scrape_every)
        metrics["when"] = _now()
        with open(os.path.join(args.out, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        print_metrics(metrics)
        if args.only == "metrics":
            return 0
    result: dict = {}
    if args.only in ("all", "docker-run"):
        result["docker_run"] = bench_docker_run(args.rounds, image.build(), args.modes)
    if args.only in ("all", "endpoints"):
        result["endpoints"] = {m: bench_endpoints(args.endpoints, m, args.ipv6) for m in args.modes}
    result["when"] = _now()
    result["goals"] = check_goals(result)
    with open(os.path.join(args.out, "plugin.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    if "docker_run" in result:
        print(docker_run_markdown(result["docker_run"]) + "\n")
    if "endpoints" in result:
        print(endpoints_markdown(result["endpoints"]) + "\n")
    print(goals_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
