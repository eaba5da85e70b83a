#!/usr/bin/env python3
"""The fast path's own cost per packet: the container and uplink programs of this tree against another
checkout's, in one run (root).

The kernel runs each program on a crafted packet (BPF_PROG_TEST_RUN, once per call, `--repeat` calls per
sample: the median of the kernel's ns per run), arriving on an endpoint's host veth in a namespace set up as a
vpcnet host (an uplink with a resolved next hop for the cluster, the anchor, two endpoints' veths with their
/32 and /128 routes and resolved neighbours: the shape of tests/test_ebpf.py's routed_host). Cases, each for
IPv4 and IPv6: to another host (`bpf_fib_lookup`, then `bpf_redirect_neigh`), to another container of this
host (lookup, MACs, `bpf_redirect`), and the same from an endpoint publishing two ports (the published-port
compare); the uplink program (arriving on the uplink) to this host's container (lookup, MACs,
`bpf_redirect_peer`), and to one that has no entry in the map of this host's endpoints by address (where
the tree has that map: its miss, then the fib lookup; in a tree without it, the same fib path as the case
before). The map's entries are those vpcnet writes: the container's MAC, the host veth's index, MAC and MTU.
Peer counting off (the counting adds the same map update in both trees: bench/peers_bench.py).

Each round runs this script once per tree (`--child`, with PYTHONPATH on the tree: its own programs, as
built by its own API: the address and ports built in, or the endpoint's entry in a map), alternating which
goes first. Per tree and case: the median of the rounds' samples with min-max, and the ratio this/other.
    python3 bench/fastpath_cost.py --other /path/to/old/checkout [--rounds 7] [--repeat 3000]
Writes bench/results/fastpath_cost.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import ctypes
import inspect
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
THIS = os.path.dirname(HERE)
HOST, CLUSTER = "10.77.3.0/24", "10.77.0.0/16"
HOST6, CLUSTER6 = "fd00:77:3:0:1::/80", "fd00:77::/32"
ME, OTHER, REMOTE = "10.77.3.2", "10.77.3.3", "10.77.4.2"
ME6, OTHER6, REMOTE6 = "fd00:77:3:0:1::2", "fd00:77:3:0:1::3", "fd00:77:4:0:1::2"
PUBLISHED = (("tcp", 8080), ("udp", 5353))
BPF_PROG_TEST_RUN = 10


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


def host_namespace() -> str:
    """A namespace set up as a vpcnet host of the network 10.77.3.0/24 (see the docstring)."""
    ns = f"vpccost{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    ip = lambda *a: sh("ip", "-n", ns, *a)            # noqa: E731
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    for a, b in (("uplink0", "uplink0p"), ("vpc-anchor", "vpp-anchor"), ("vhendpoint", "vcendpoint"),
                 ("vhother", "vcother")):
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        ip("link", "set", a, "up")
        ip("link", "set", b, "up")
    ip("addr", "add", "192.0.2.10/24", "dev", "uplink0")
    ip("-6", "addr", "add", "fd77:a::10/64", "dev", "uplink0", "nodad")
    ip("addr", "add", "10.77.3.1/24", "dev", "vpc-anchor")
    ip("route", "add", CLUSTER, "via", "192.0.2.1")
    ip("-6", "route", "add", CLUSTER6, "via", "fd77:a::1")
    ip("neigh", "replace", "192.0.2.1", "lladdr", "02:bb:00:00:00:01", "dev", "uplink0", "nud", "permanent")
    ip("-6", "neigh", "replace", "fd77:a::1", "lladdr", "02:bb:00:00:00:01", "dev", "uplink0", "nud", "permanent")
    for dev, v4, v6, mac in (("vhendpoint", ME, ME6, "02:42:0a:4d:03:02"),
                             ("vhother", OTHER, OTHER6, "02:42:0a:4d:03:03")):
        ip("route", "add", f"{v4}/32", "dev", dev, "scope", "link")
        ip("neigh", "replace", v4, "lladdr", mac, "dev", dev, "nud", "permanent")
        ip("-6", "route", "add", f"{v6}/128", "dev", dev)
        ip("-6", "neigh", "replace", v6, "lladdr", mac, "dev", dev, "nud", "permanent")
    return ns


def packet4(src: str, dst: str, sport: int = 4000) -> bytes:
    import ipaddress
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 64, 1, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + header + struct.pack("!HHHH", sport, 53, 72, 0) \
        + b"\x00" * 64


def packet6(src: str, dst: str, sport: int = 4000) -> bytes:
    import ipaddress
    header = struct.pack("!IHBB16s16s", 0x6000_0000, 8 + 64, 17, 64, ipaddress.IPv6Address(src).packed,
                         ipaddress.IPv6Address(dst).packed)
    return b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x86\xdd" + header + struct.pack("!HHHH", sport, 53, 72, 0) \
        + b"\x00" * 64


def ns_per_run(fd: int, packet: bytes, ifindex: int, runs: int) -> float:
    """The median of the kernel's ns for one run of the program on `packet` arriving on `ifindex`, over
    `runs` runs. One run per BPF_PROG_TEST_RUN: with a repeat count the kernel runs the program again on the
    packet it just rewrote (the TTL decremented each time, until the stack's turn)."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx = ctypes.create_string_buffer(192)              # struct __sk_buff, all zero but ifindex
    struct.pack_into("<I", ctx, 40, ifindex)
    attr = bytearray(80)
    struct.pack_into("<IIIIQQII", attr, 0, fd, 0, len(packet), len(data_out), ctypes.addressof(data_in),
                     ctypes.addressof(data_out), 1, 0)
    struct.pack_into("<IIQQ", attr, 40, len(ctx), 0, ctypes.addressof(ctx), 0)
    libc = ctypes.CDLL(None, use_errno=True)
    nr = {"x86_64": 321, "aarch64": 280}[platform.machine()]
    durations = []
    for _ in range(runs):
        buf = ctypes.create_string_buffer(bytes(attr), len(attr))
        if libc.syscall(nr, BPF_PROG_TEST_RUN, buf, len(attr)) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        retval, duration = struct.unpack_from("<i", buf.raw, 4)[0], struct.unpack_from("<I", buf.raw, 36)[0]
        if retval != 7:                                # TC_ACT_REDIRECT: the fast path taken
            raise RuntimeError(f"the program did not redirect the packet (verdict {retval})")
        durations.append(duration)
    return statistics.median(durations)


def child(repeat: int) -> dict[str, int]:
    """In the host namespace, with this tree's vpcnet: ns per packet of each case."""
    from vpcnet.datapath.ebpf import loader, programs, programs6
    index = {line.split(":")[1].strip().split("@")[0]: int(line.split(":")[0])
             for line in sh("ip", "-o", "link").splitlines()}
    me, anchor, uplinks = index["vhendpoint"], index["vpc-anchor"], [index["uplink0"]]
    shared = "address" not in inspect.signature(programs.container_program).parameters
    local = "local_fd" in inspect.signature(programs.uplink_program).parameters
    keep = []

    def local_entries(facts, family: int, wanted: tuple[str, ...]) -> dict:
        """The local map's entries of these containers (vhendpoint's, vhother's), as vpcnet writes them."""
        from vpcnet.datapath.ebpf import endpoints
        links = {link["ifname"]: link for link in json.loads(sh("ip", "-j", "link"))}
        for dev, v4, v6, mac in (("vhendpoint", ME, ME6, "02:42:0a:4d:03:02"),
                                 ("vhother", OTHER, OTHER6, "02:42:0a:4d:03:03")):
            address = v4 if family == 4 else v6
            if address in wanted:
                facts.write_local(links[dev]["ifindex"], address, endpoints.local_value(
                    links[dev]["ifindex"], links[dev]["mtu"], mac, links[dev]["address"]))
        return {"local_fd": facts.local_fd(family)}

    if shared:                                         # one program per network, the endpoint in a map
        from vpcnet.datapath.ebpf.endpoints import EndpointFacts

        def build(family: int, published: tuple) -> bytes:
            facts = EndpointFacts()
            keep.append(facts)
            facts.write(me, ME if family == 4 else ME6, published)
            extra = local_entries(facts, family, (OTHER, OTHER6)) if local else {}
            if family == 4:
                return programs.container_program(HOST, CLUSTER, facts.fd(4), anchor, uplinks, **extra)
            return programs6.container_program6(HOST6, CLUSTER6, facts.fd(6), anchor, uplinks, **extra)
    else:                                              # the address and ports built in
        def build(family: int, published: tuple) -> bytes:
            if family == 4:
                return programs.container_program(HOST, CLUSTER, ME, anchor, uplinks, published=published)
            return programs6.container_program6(HOST6, CLUSTER6, ME6, anchor, uplinks, published=published)
    def build_uplink(family: int) -> bytes:
        extra = {}
        if local:                                      # vhendpoint's entry only: vhother's address misses
            from vpcnet.datapath.ebpf.endpoints import EndpointFacts
            facts = EndpointFacts()
            keep.append(facts)
            extra = local_entries(facts, family, (ME, ME6))
        if family == 4:
            return programs.uplink_program(HOST, CLUSTER, anchor, **extra)
        return programs6.uplink_program6(HOST6, CLUSTER6, anchor, **extra)

    out = {}
    for family, remote, other, make in ((4, REMOTE, OTHER, packet4), (6, REMOTE6, OTHER6, packet6)):
        for label, published in (("", ()), (", publishing 2 ports", PUBLISHED)):
            fd = loader.load(build(family, published), "vpcnet_cost")
            try:
                src = ME if family == 4 else ME6
                out[f"IPv{family} to another host{label}"] = ns_per_run(fd, make(src, remote), me, repeat)
                out[f"IPv{family} to this host's container{label}"] = ns_per_run(fd, make(src, other), me, repeat)
            finally:
                os.close(fd)
        fd = loader.load(build_uplink(family), "vpcnet_cost")
        try:
            mine = ME if family == 4 else ME6
            out[f"IPv{family} uplink to this host's container"] = ns_per_run(fd, make(remote, mine), index["uplink0"],
                                                                             repeat)
            out[f"IPv{family} uplink to a container without a local entry"] = ns_per_run(
                fd, make(remote, other), index["uplink0"], repeat)
        finally:
            os.close(fd)
    for facts in keep:
        facts.close()
    return out


def code_of(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "log", "--format=%h %s", "-1"], capture_output=True, text=True,
                          check=True).stdout.strip()[:100]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", help="a checkout of vpcnet to compare against")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "fastpath_cost.json"))
    args = parser.parse_args()
    if not 1 <= args.rounds <= 100 or not 1 <= args.repeat <= 10_000_000:
        parser.error("--rounds 1..100, --repeat 1..10000000")
    if args.child:
        print(json.dumps(child(args.repeat)))
        return 0
    if not args.other:
        parser.error("--other is required")
    other = os.path.abspath(args.other)
    if not os.path.isfile(os.path.join(other, "vpcnet", "__init__.py")):
        parser.error(f"--other {other}: not a vpcnet checkout (no vpcnet/__init__.py)")
    trees = {"this": THIS, "other": other}
    ns = host_namespace()
    samples: dict[str, dict[str, list[int]]] = {"this": {}, "other": {}}
    try:
        for r in range(args.rounds):
            for which in (("this", "other") if r % 2 == 0 else ("other", "this")):
                proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--child",
                                       "--repeat", str(args.repeat)], cwd=trees[which],
                                      env=dict(os.environ, PYTHONPATH=trees[which]), capture_output=True, text=True,
                                      check=False, timeout=600)
                if proc.returncode != 0:
                    raise RuntimeError(f"{which} ({trees[which]}): {proc.stderr[-2000:]}")
                for case, value in json.loads(proc.stdout).items():
                    samples[which].setdefault(case, []).append(value)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    summary = lambda v: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}   # noqa: E731
    results = {case: {"this": summary(samples["this"][case]), "other": summary(samples["other"][case]),
                      "ratio_this_over_other": round(statistics.median(samples["this"][case])
                                                     / statistics.median(samples["other"][case]), 3)}
               for case in samples["this"]}
    doc = {"command": f"python3 bench/fastpath_cost.py --other {other} --rounds {args.rounds} --repeat {args.repeat}",
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "this": code_of(THIS), "other": code_of(other),
           "unit": "ns per packet (median of single BPF_PROG_TEST_RUN runs)", "results": results}
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    print(f"this: {doc['this']}\nother: {doc['other']}\n")
    print("| case | this ns | other ns | ratio this/other |")
    print("|---|---|---|---|")
    for case, row in results.items():
        t, o = row["this"], row["other"]
        print(f"| {case} | {t['median']} ({t['min']}-{t['max']}) | {o['median']} ({o['min']}-{o['max']}) | "
              f"{row['ratio_this_over_other']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
