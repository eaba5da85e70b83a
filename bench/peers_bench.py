#!/usr/bin/env python3
"""The cost of per-peer counting (VPCNET_PEER_METRICS) on the default network's datapath, side by side in
one run: two identical pairs of simulated hosts (network namespaces of the bench's own, root, no Docker),
each pair with one ebpf-mode network (the default mode where the kernel allows) and a container on each
host; one pair counts per peer, the other does not. Cross-host, through the fast path both ways (the
container program, the uplink program, and the receive counting program on the host veth).

Per round, in a rotated order so drifts hit both alike: iperf3 TCP throughput (one stream) and iperf3 UDP
packet rate with 64-byte payloads (-b 0: as fast as the sender goes; the receiver's packets per second).
Reported: the median of each variant with its min-max, and the ratio of medians (with counting / without).

Also, the cost per packet itself, which throughput on a shared 2-CPU machine cannot resolve to 2 %: the
counting program against the same program without the count (parse the headers, pass), each run a
million times on one 64-byte UDP packet by the kernel (BPF_PROG_TEST_RUN, which reports the mean ns per
run), repeated; the difference is what counting adds per packet and program (a packet between two
containers is counted twice: once sent, once received).
Writes bench/results/peers.json.
    python3 bench/peers_bench.py [--rounds 7] [--duration 3]
"""
from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vpcnet.datapath.dataplane import Dataplane  # noqa: E402
from vpcnet.datapath.ebpf import load, maps, programs  # noqa: E402
from vpcnet.datapath.ebpf.assembler import Asm  # noqa: E402
from vpcnet.datapath.ebpf.endpoints import EndpointFacts  # noqa: E402
from vpcnet.datapath.spec import NetworkSpec, bridge_name, mac_for, veth_names  # noqa: E402


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


class Pair:
    """Two hosts A and B (namespaces) on one link, an ebpf network on each, a container on each."""

    def __init__(self, name: str, second: int, peers: bool):
        self.name, self.peers = name, peers
        tag = uuid.uuid4().hex[:8]
        self.namespaces: list[str] = []
        a, b = self.ns(f"pbha{tag}"), self.ns(f"pbhb{tag}")
        sh("ip", "-n", a, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0", "netns", b)
        cluster = f"10.{second}.0.0/16"
        blocks = {a: f"10.{second}.3.0/24", b: f"10.{second}.4.0/24"}
        for ns, me, other, block in ((a, "192.0.2.10", "192.0.2.20", blocks[b]),
                                     (b, "192.0.2.20", "192.0.2.10", blocks[a])):
            sh("ip", "-n", ns, "addr", "add", f"{me}/24", "dev", "uplink0")
            sh("ip", "-n", ns, "link", "set", "uplink0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", other)
            sh("ip", "-n", ns, "route", "add", block, "via", other)
        self.boxes = []
        for ns, host in ((a, 3), (b, 4)):
            nid = uuid.uuid4().hex * 2
            spec = NetworkSpec(tag=nid[:12], bridge=bridge_name(nid), gateway=f"10.{second}.{host}.1",
                               host_cidr=blocks[ns], cluster_cidr=cluster, mtu=1500, internal=False, no_nat=(),
                               mode="ebpf")
            dp = Dataplane(netns=ns, peers=peers)
            dp.ensure_network(spec)
            ip = f"10.{second}.{host}.2"
            host_veth, peer = veth_names(uuid.uuid4().hex * 2)
            dp.ensure_endpoint(spec, host_veth, peer, mac_for(ip), ip)
            box = self.ns(f"pbc{tag}{host}")
            sh("ip", "-n", ns, "link", "set", peer, "netns", box)
            sh("ip", "-n", box, "link", "set", peer, "name", "eth0")
            sh("ip", "-n", box, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", box, "link", "set", "eth0", "up")
            sh("ip", "-n", box, "route", "add", "default", "via", spec.gateway)
            self.boxes.append((box, ip))
        self.server = subprocess.Popen(["ip", "netns", "exec", self.boxes[1][0], "iperf3", "-s"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def ns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        self.namespaces.append(name)
        return name

    def iperf(self, duration: float, *extra: str) -> dict:
        for _ in range(20):
            proc = sh("ip", "netns", "exec", self.boxes[0][0], "iperf3", "-c", self.boxes[1][1], "-t",
                      str(duration), "-J", *extra, check=False, timeout=duration + 30)
            try:
                return json.loads(proc.stdout)["end"]
            except (ValueError, KeyError):
                time.sleep(0.2)
        raise RuntimeError(f"iperf3 failed: {proc.stdout[-300:]}")

    def tcp_gbps(self, duration: float) -> float:
        return self.iperf(duration)["sum_received"]["bits_per_second"] / 1e9

    def udp_kpps(self, duration: float) -> float:
        end = self.iperf(duration, "-u", "-l", "64", "-b", "0")["sum"]
        return (end["packets"] - end["lost_packets"]) / end["seconds"] / 1e3

    def close(self) -> None:
        self.server.kill()
        self.server.wait(timeout=10)
        for name in self.namespaces:
            sh("ip", "netns", "del", name, check=False)


BPF_PROG_TEST_RUN = 10


def ns_per_run(fd: int, packet: bytes, repeat: int) -> int:
    """The kernel's mean ns per run of the program on `packet`, over `repeat` runs."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    attr = bytearray(80)
    struct.pack_into("<IIIIQQII", attr, 0, fd, 0, len(packet), len(data_out), ctypes.addressof(data_in),
                     ctypes.addressof(data_out), repeat, 0)
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(maps.SYS_BPF[platform.machine()], BPF_PROG_TEST_RUN, buf, len(attr)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return struct.unpack_from("<I", buf.raw, 36)[0]


def per_packet(repeats: int = 9, runs: int = 1_000_000) -> dict:
    """ns per run: the receive counting program and the same parse-and-pass without the count."""
    base = Asm()
    programs._parse(base)
    programs._pass(base)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 64, 1, 0, 64, 17, 0,
                         ipaddress.IPv4Address("10.81.4.2").packed, ipaddress.IPv4Address("10.81.3.2").packed)
    packet = b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + header + b"\x00" * (8 + 64)
    map_fd = maps.create()
    facts = EndpointFacts()                   # the endpoint's entry, on the device a test run uses (lo: 1)
    facts.write(1, "10.81.3.2", ())
    fds = []
    try:
        fds = [load(base.assemble(), "vpcnet_bench_b"),
               load(programs.count_program(maps.RECEIVE, "10.81.0.0/16", map_fd, facts.fd(4)), "vpcnet_bench_c")]
        samples: dict[str, list[int]] = {"without": [], "with": []}
        for _ in range(repeats):
            samples["without"].append(ns_per_run(fds[0], packet, runs))
            samples["with"].append(ns_per_run(fds[1], packet, runs))
    finally:
        for fd in (*fds, map_fd):
            os.close(fd)
        facts.close()
    out = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v} for k, v in samples.items()}
    out["added_ns_per_packet"] = out["with"]["median"] - out["without"]["median"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "peers.json"))
    args = parser.parse_args()
    cost = per_packet()
    pairs = [Pair("with peer counting", 81, True), Pair("without", 82, False)]
    samples: dict[str, dict[str, list[float]]] = {p.name: {"tcp_gbps": [], "udp64_kpps": []} for p in pairs}
    try:
        for r in range(args.rounds):
            for p in (pairs if r % 2 == 0 else pairs[::-1]):
                samples[p.name]["tcp_gbps"].append(p.tcp_gbps(args.duration))
                samples[p.name]["udp64_kpps"].append(p.udp_kpps(args.duration))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for p in pairs:
            p.close()
    result: dict = {"command": " ".join(["python3", "bench/peers_bench.py", *sys.argv[1:]]),
                    "kernel": platform.release(), "cpus": os.cpu_count(), "rounds": args.rounds,
                    "duration_s": args.duration, "variants": {}, "ratio_of_medians": {},
                    "program_ns_per_run": cost}
    for name, metrics in samples.items():
        result["variants"][name] = {m: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
                                    for m, v in metrics.items()}
    on, off = (result["variants"][p.name] for p in pairs)
    print("| metric | with peer counting (median, min-max) | without | ratio of medians |\n|---|---|---|---|")
    for m in ("tcp_gbps", "udp64_kpps"):
        ratio = on[m]["median"] / off[m]["median"]
        result["ratio_of_medians"][m] = ratio
        print(f"| {m} | {on[m]['median']:.2f} ({on[m]['min']:.2f}-{on[m]['max']:.2f}) | "
              f"{off[m]['median']:.2f} ({off[m]['min']:.2f}-{off[m]['max']:.2f}) | {ratio:.3f} |")
    for variant in ("with", "without"):
        c = cost[variant]
        print(f"program ns per run {variant} counting: {c['median']} ({c['min']}-{c['max']})")
    udp_ns = 1e9 / (off["udp64_kpps"]["median"] * 1e3)
    result["added_share_of_udp64_packet_time"] = 2 * cost["added_ns_per_packet"] / udp_ns
    print(f"counting adds {cost['added_ns_per_packet']} ns per program run; twice per packet that is "
          f"{100 * result['added_share_of_udp64_packet_time']:.2f} % of a 64-byte UDP packet's {udp_ns:.0f} ns here")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
