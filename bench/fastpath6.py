#!/usr/bin/env python3
"""The eBPF fast path over IPv6 against routed mode and the bare underlay, in network namespaces (root), one run.

    python3 bench/fastpath6.py [--rounds 5] [--duration 2] [--rr-count 5000]

Two hosts (namespaces) whose uplinks meet in a router namespace that routes each host's IPv4 and IPv6
blocks to it, as the VPC does (the shape of tests/test_datapath_ipv6.py's two-host test); on each host one
`routed` and one `ebpf` network (vpcnet.datapath.dataplane.Dataplane, the real datapath), and a container
namespace per network. Contenders, all over IPv6, client on host 1 and server on host 2:
  underlay   host namespace <-> host namespace (uplink addresses: what the router alone costs)
  routed     container <-> container on the routed networks (the host's IPv6 forwarding and ip6tables)
  ebpf       container <-> container on the ebpf networks (vpcnet.datapath.ebpf.programs6)
Metrics: TCP throughput (iperf3, 1 stream, --duration s), UDP 64 B datagrams per second delivered
(iperf3 -u -l 64 -b 0), TCP_RR p50/p99 (bench/rr.py client: 64-byte ping-pongs on one connection).
Each round measures every metric for every contender, in a rotated order. Medians with min-max; ratios of
medians to the underlay. Writes bench/results/fastpath6.json and prints a Markdown table.
This machine's figures are one kernel's namespaces on 2 CPUs: relative, not a cloud's absolute rates.
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
from vpcnet.datapath.ipv6 import GATEWAY, Ipv6Endpoint  # noqa: E402
from vpcnet.datapath.spec import NetworkSpec, bridge_name, mac_for, veth_names  # noqa: E402

CONTENDERS = ("underlay", "routed", "ebpf")
METRICS = ("tcp_bps", "udp_64b_pps", "rr_p50_us", "rr_p99_us")
LOWER_IS_BETTER = {"rr_p50_us", "rr_p99_us"}


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


class Testbed:
    """The namespaces, made and removed by this process."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.addresses: dict[str, tuple[str, str, str]] = {}     # contender -> (client ns, server ns, server address)

    def netns(self, prefix: str) -> str:
        name = f"{prefix}{uuid.uuid4().hex[:6]}"
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def close(self) -> None:
        for name in self.made:
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():    # our iperf3/rr.py, if any
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", name, check=False)

    def build(self) -> None:
        router = self.netns("b6r")
        in_ns(router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1")
        hosts = []
        for k, (v4, v6) in enumerate((("192.0.2", "fd77:a:"), ("198.51.100", "fd77:b:")), start=1):
            ns = self.netns(f"b6h{k}")
            sh("ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", f"r{k}", "netns", router)
            sh("ip", "-n", ns, "addr", "add", f"{v4}.10/24", "dev", "uplink0")
            sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}:10/64", "dev", "uplink0", "nodad")
            sh("ip", "-n", router, "addr", "add", f"{v4}.1/24", "dev", f"r{k}")
            sh("ip", "-n", router, "-6", "addr", "add", f"{v6}:1/64", "dev", f"r{k}", "nodad")
            for where, link in ((ns, "uplink0"), (router, f"r{k}")):
                sh("ip", "-n", where, "link", "set", link, "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"{v4}.1")
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", f"{v6}:1")
            hosts.append((ns, f"{v6}:10"))
        self.addresses["underlay"] = (hosts[0][0], hosts[1][0], hosts[1][1])
        for net, mode in ((77, "routed"), (78, "ebpf")):
            ends = []
            for k, (ns, _) in enumerate(hosts, start=1):
                block4, block6 = f"10.{net}.{k + 2}", f"fd00:{net}:{k + 2}:0:1::"
                via4 = ("192.0.2.10", "198.51.100.10")[k - 1]
                sh("ip", "-n", router, "route", "add", f"{block4}.0/24", "via", via4)
                sh("ip", "-n", router, "-6", "route", "add", f"{block6}/80", "via", hosts[k - 1][1])
                tag = f"{mode[0]}{k}{uuid.uuid4().hex[:10]}"
                spec = NetworkSpec(tag=tag, bridge=bridge_name(tag + "0" * 52), gateway=f"{block4}.1",
                                   host_cidr=f"{block4}.0/24", cluster_cidr=f"10.{net}.0.0/16", mtu=1500, mode=mode,
                                   host_cidr_v6=f"{block6}/80", cluster_cidr_v6=f"fd00:{net}::/32")
                ip4, ip6, eid = f"{block4}.2", f"{block6}2", uuid.uuid4().hex * 2
                host_veth, peer = veth_names(eid)
                dp = Dataplane(netns=ns)
                dp.ipv6_endpoints = (lambda v=host_veth, a=ip6: [Ipv6Endpoint(v, a)])
                dp.ensure_network(spec)
                dp.ensure_endpoint(spec, host_veth, peer, mac_for(ip4), ip4)
                box = self.netns(f"b6{mode[0]}{k}")
                sh("ip", "-n", ns, "link", "set", peer, "netns", box)
                sh("ip", "-n", box, "link", "set", peer, "name", "eth0")
                in_ns(box, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0")
                sh("ip", "-n", box, "addr", "add", f"{ip4}/24", "dev", "eth0")
                sh("ip", "-n", box, "-6", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad")
                sh("ip", "-n", box, "link", "set", "eth0", "up")
                sh("ip", "-n", box, "route", "add", "default", "via", spec.gateway)
                sh("ip", "-n", box, "-6", "route", "add", "default", "via", GATEWAY, "dev", "eth0")
                dp.ensure_endpoint_ipv6(spec, host_veth, ip6)
                ends.append((box, ip6))
            self.addresses[mode] = (ends[0][0], ends[1][0], ends[1][1])
        for client, _server, address in self.addresses.values():      # neighbours resolved before measuring
            for _ in range(50):
                if in_ns(client, "busybox", "ping", "-6", "-c1", "-W1", address, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"{address} does not answer from {client}")


def iperf(client: str, server: str, address: str, duration: int, *extra: str) -> dict:
    daemon = subprocess.Popen(["ip", "netns", "exec", server, "iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            proc = in_ns(client, "iperf3", "-c", address, "-t", str(duration), "-J", *extra, check=False)
            try:
                out = json.loads(proc.stdout)
                if "end" in out and "error" not in out:
                    return out
            except ValueError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 to {address} failed: {proc.stdout[-300:]}")
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


def rr(client: str, server: str, address: str, count: int) -> dict:
    rr_py = os.path.join(HERE, "rr.py")
    daemon = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, rr_py, "server", "--port", "7777",
                               "--max-seconds", "120"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            proc = in_ns(client, sys.executable, rr_py, "client", "--host", address, "--port", "7777", "--count",
                         str(count), check=False)
            if proc.returncode == 0 and "p50_us" in proc.stdout:
                return json.loads(proc.stdout)
            time.sleep(0.1)
        raise RuntimeError(f"rr.py to {address} failed: {proc.stderr[-300:]}")
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


def measure(bed: Testbed, contender: str, args: argparse.Namespace) -> dict[str, float]:
    client, server, address = bed.addresses[contender]
    tcp = iperf(client, server, address, args.duration)["end"]["sum_received"]["bits_per_second"]
    udp = iperf(client, server, address, args.duration, "-u", "-l", "64", "-b", "0")["end"]["sum"]
    out = rr(client, server, address, args.rr_count)
    return {"tcp_bps": tcp, "udp_64b_pps": (udp["packets"] - udp["lost_packets"]) / udp["seconds"],
            "rr_p50_us": out["p50_us"], "rr_p99_us": out["p99_us"]}


def summarize(samples: dict[str, dict[str, list[float]]]) -> dict:
    out: dict = {}
    for contender, metrics in samples.items():
        out[contender] = {m: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
                          for m, v in metrics.items()}
    for contender in ("routed", "ebpf"):
        for m in METRICS:
            base = out["underlay"][m]["median"]
            out[contender][m]["ratio_to_underlay"] = out[contender][m]["median"] / base if base else None
    return out


def table(result: dict) -> str:
    def fmt(m: str, v: float) -> str:
        return f"{v / 1e9:.2f} Gb/s" if m == "tcp_bps" else f"{v / 1e3:.0f} kpps" if m == "udp_64b_pps" \
            else f"{v:.0f} µs"

    lines = ["| metric | " + " | ".join(CONTENDERS) + " | routed / underlay | ebpf / underlay |",
             "|---" * (len(CONTENDERS) + 3) + "|"]
    for m in METRICS:
        cells = [f"{fmt(m, result[c][m]['median'])} ({fmt(m, result[c][m]['min'])}–{fmt(m, result[c][m]['max'])})"
                 for c in CONTENDERS]
        ratios = [f"{result[c][m]['ratio_to_underlay']:.2f} ×" for c in ("routed", "ebpf")]
        lines.append(f"| {m} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=int, default=2, help="seconds per iperf3 run (iperf3 takes whole seconds)")
    p.add_argument("--rr-count", type=int, default=5000)
    p.add_argument("--out", default=os.path.join(HERE, "results", "fastpath6.json"))
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.duration <= 0 or args.rr_count < 1:
        print("--rounds, --duration and --rr-count must be positive", file=sys.stderr)
        return 2
    bed = Testbed()
    samples: dict[str, dict[str, list[float]]] = {c: {m: [] for m in METRICS} for c in CONTENDERS}
    try:
        bed.build()
        for r in range(args.rounds):
            order = CONTENDERS[r % 3:] + CONTENDERS[:r % 3]
            for contender in order:
                for m, v in measure(bed, contender, args).items():
                    samples[contender][m].append(v)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        bed.close()
    result = {"rounds": args.rounds, "duration_s": args.duration, "rr_count": args.rr_count,
              "kernel": os.uname().release, "results": summarize(samples)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(table(result["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
