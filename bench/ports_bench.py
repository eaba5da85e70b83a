#!/usr/bin/env python3
"""What publishing a port costs, on the default (ebpf) datapath, against the real kernel (root).

Two hosts in network namespaces of the bench's own, their uplinks the two ends of one veth (the VPC), each
routing the other's host CIDR to it; an ebpf-mode network on each; a server container on host A, a
client container on host B (whose network keeps the host addresses unmasqueraded, as a VPC's no-NAT list
does). Three contenders, measured side by side in one run, rounds in a rotated order:
  unpublished     the client reaches the server at its own address; nothing published (the fast path
                  both ways)
  published       the same connection, while the server's port is published (`-p 8080:5201` and the
                  RR port): the server's replies from that port now take host A's stack and conntrack
                  (vpcnet.datapath.ebpf), the requests still the fast path
  via host port   the client reaches the server through host A's address and the published port (DNAT,
                  conntrack both ways)
Metrics per round: TCP throughput (iperf3, 1 stream, --duration s), RR p50 (bench/rr.py, 64-byte
ping-pongs on one connection), connections/s (bench/rr.py crr). Printed: medians, and each contender's
ratio of medians to `unpublished` with the spread (min and max of the per-round ratios).

    python3 bench/ports_bench.py [--rounds 5] [--duration 2] [--out bench/results/ports.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vpcnet.datapath.dataplane import Dataplane  # noqa: E402
from vpcnet.datapath.spec import EndpointSpec, NetworkSpec, PortMapping, bridge_name, mac_for, veth_names  # noqa: E402

IPERF, RR = 5201, 7001
PUBLISHED_IPERF, PUBLISHED_RR = 8080, 8081
A_IP, B_IP = "192.0.2.10", "192.0.2.20"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)


def spec(tag: str, host: str, ports: tuple = (), no_nat: tuple = ()) -> NetworkSpec:
    return NetworkSpec(tag=tag, bridge=bridge_name(tag + "0" * 52), gateway=host.rsplit(".", 1)[0] + ".1",
                       host_cidr=host, cluster_cidr="10.77.0.0/16", mtu=1500, no_nat=no_nat, mode="ebpf",
                       ports=ports)


def container(host_ns: str, dp: Dataplane, net: NetworkSpec, ip: str, eid: str, made: list[str]) -> str:
    sandbox = f"vpcbs-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", sandbox)
    made.append(sandbox)
    host_veth, peer = veth_names(eid)
    dp.ensure_endpoint(net, host_veth, peer, mac_for(ip), ip)
    sh("ip", "-n", host_ns, "link", "set", peer, "netns", sandbox)
    sh("ip", "-n", sandbox, "link", "set", peer, "name", "eth0")
    sh("ip", "-n", sandbox, "addr", "add", f"{ip}/24", "dev", "eth0")
    sh("ip", "-n", sandbox, "link", "set", "eth0", "up")
    sh("ip", "-n", sandbox, "link", "set", "lo", "up")
    sh("ip", "-n", sandbox, "route", "add", "default", "via", net.gateway)
    return sandbox


def hosts(made: list[str]) -> tuple[str, str]:
    a, b = f"vpcbh-{uuid.uuid4().hex[:6]}", f"vpcbh-{uuid.uuid4().hex[:6]}"
    for ns in (a, b):
        sh("ip", "netns", "add", ns)
        made.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", a, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0", "netns", b)
    for ns, me, other, block in ((a, A_IP, B_IP, "10.77.4.0/24"), (b, B_IP, A_IP, "10.77.3.0/24")):
        sh("ip", "-n", ns, "addr", "add", f"{me}/24", "dev", "uplink0")
        sh("ip", "-n", ns, "link", "set", "uplink0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", other)
        sh("ip", "-n", ns, "route", "add", block, "via", other)
    return a, b


def tcp(client: str, address: str, port: int, duration: float) -> float:
    for _ in range(50):
        proc = sh("ip", "netns", "exec", client, "iperf3", "-c", address, "-p", str(port), "-t", str(duration), "-J",
                  check=False)
        try:
            return json.loads(proc.stdout)["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError):
            time.sleep(0.1)
    raise RuntimeError(f"iperf3 to {address}:{port} failed: {proc.stdout[-300:]}")


def rr(client: str, address: str, port: int, mode: str, duration: float) -> dict:
    args = ["client", "--count", "3000"] if mode == "rr" else ["crr", "--seconds", str(duration)]
    proc = sh("ip", "netns", "exec", client, sys.executable, os.path.join(HERE, "rr.py"), *args, "--host", address,
              "--port", str(port), check=False)
    result = json.loads(proc.stdout)
    if "error" in result:
        raise RuntimeError(f"rr.py {mode} to {address}:{port}: {result['error']}")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "ports.json"))
    args = p.parse_args()
    made: list[str] = []
    servers: list[subprocess.Popen] = []
    try:
        a, b = hosts(made)
        sa, sb = spec("a1b2c3d4e5f6", "10.77.3.0/24"), spec("b1b2c3d4e5f6", "10.77.4.0/24", no_nat=("192.0.2.0/24",))
        dpa, dpb = Dataplane(netns=a), Dataplane(netns=b)
        for dp, s in ((dpa, sa), (dpb, sb)):
            dp.ensure_host()
            dp.ensure_network(s)
        server = container(a, dpa, sa, "10.77.3.2", "a" * 64, made)
        client = container(b, dpb, sb, "10.77.4.2", "b" * 64, made)
        # the host port's client is another container: a connection to the same container port directly and
        # through the DNAT from one client address may reuse a source port whose conntrack entry (the direct
        # one's reply direction) is still there, and the kernel drops the SYN (docs/datapath.md); measured
        # apart, each path is measured alone
        via_client = container(b, dpb, sb, "10.77.4.3", "c" * 64, made)
        for ns in (a, b):
            sh("ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "DROP")
        servers.append(subprocess.Popen(["ip", "netns", "exec", server, "iperf3", "-s", "-p", str(IPERF)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        servers.append(subprocess.Popen(["ip", "netns", "exec", server, sys.executable, os.path.join(HERE, "rr.py"),
                                         "server", "--port", str(RR), "--max-seconds", "3600"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        endpoint = [EndpointSpec(*veth_names("a" * 64), mac_for("10.77.3.2"), "10.77.3.2")]
        published = NetworkSpec(**{**sa.__dict__, "ports": (
            PortMapping("tcp", "", PUBLISHED_IPERF, "10.77.3.2", IPERF),
            PortMapping("tcp", "", PUBLISHED_RR, "10.77.3.2", RR))})
        contenders = {"unpublished": (sa, client, "10.77.3.2", IPERF, RR),
                      "published": (published, client, "10.77.3.2", IPERF, RR),
                      "via host port": (published, via_client, A_IP, PUBLISHED_IPERF, PUBLISHED_RR)}
        names = list(contenders)
        samples: dict[str, dict[str, list[float]]] = {n: {"tcp_bps": [], "rr_p50_us": [], "crr_per_s": []}
                                                      for n in names}
        time.sleep(0.5)
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                net, source, address, iperf_port, rr_port = contenders[name]
                dpa.ensure_ports(net, endpoint, adding=bool(net.ports))
                samples[name]["tcp_bps"].append(tcp(source, address, iperf_port, args.duration))
                samples[name]["rr_p50_us"].append(rr(source, address, rr_port, "rr", args.duration)["p50_us"])
                samples[name]["crr_per_s"].append(rr(source, address, rr_port, "crr", args.duration)["cps"])
        load.append(os.getloadavg()[0])
        result = {"rounds": args.rounds, "duration_s": args.duration, "mode": "ebpf", "samples": samples,
                  "load_average_1m": {"start": load[0], "end": load[1], "cpus": os.cpu_count()},
                  "medians": {n: {m: statistics.median(v) for m, v in ms.items()} for n, ms in samples.items()},
                  "ratios": {n: {m: {"median": statistics.median(v) / statistics.median(samples["unpublished"][m]),
                                     "min": min(x / y for x, y in zip(v, samples["unpublished"][m], strict=True)),
                                     "max": max(x / y for x, y in zip(v, samples["unpublished"][m], strict=True))}
                                 for m, v in ms.items()} for n, ms in samples.items()}}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} CPUs")
        print("| contender | TCP Gbit/s | RR p50 µs | connections/s | ratio TCP | ratio RR p50 | ratio conn/s |")
        print("|---|---|---|---|---|---|---|")
        for n in names:
            med, rat = result["medians"][n], result["ratios"][n]
            cells = [f"{rat[m]['median']:.2f} ({rat[m]['min']:.2f}-{rat[m]['max']:.2f})"
                     for m in ("tcp_bps", "rr_p50_us", "crr_per_s")]
            print(f"| {n} | {med['tcp_bps'] / 1e9:.2f} | {med['rr_p50_us']:.0f} | {med['crr_per_s']:.0f} | "
                  + " | ".join(cells) + " |")
        return 0
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
