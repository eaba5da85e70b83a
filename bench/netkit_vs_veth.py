#!/usr/bin/env python3
"""Does netkit close the fast path's last gap? veth+tc against netkit, side by side, against the real kernel
(root; network namespaces of the bench's own, no Docker, no lab).

Topology (the lab's underlay in small): hosts A and B (namespaces), each joined to a router namespace by a
veth; each host routes its own container block (10.77.3.0/24 on A, 10.77.4.0/24 on B) and the router
routes each block to its host. On each host, containers (namespaces) attached three ways:
  veth+tc         a veth pair as vpcnet's ebpf mode makes it: the container program on tc ingress of the host
                  veth (bpf_fib_lookup, TTL - 1, bpf_redirect_neigh to the uplink for other hosts'
                  addresses), the uplink program on tc ingress of the uplink (bpf_fib_lookup to the
                  endpoint's /32 route, bpf_redirect_peer into the container)
  netkit          a netkit pair (L2 mode: the container side has a MAC, as Docker expects), the same container
                  program attached to the netkit peer (BPF_LINK_CREATE, BPF_NETKIT_PEER on the primary's
                  index): it runs in the container device's own transmit path, no backlog queue, no softirq
                  pass; the same uplink program (bpf_redirect_peer into the netkit peer)
  veth routed     a veth pair without the container program: what the container sends is routed by the
                  host's stack (vpcnet's routed mode, in small); received traffic takes the uplink program
  netkit forward  a netkit pair without a program (policy forward): what the container sends goes up the
                  host's stack and is routed; received traffic still takes the uplink program
and the bare underlay: host A's namespace to host B's, through the router (what the containers are
measured against). The programs are vpcnet's own (vpcnet.datapath.ebpf.programs: the uplink program
as is, the container program's building blocks without its maps): what differs is the device only.

Per round, contenders in a rotated order, client on A, server on B: iperf3 TCP 1 stream and 4 streams
(received bits/s), iperf3 UDP 64-byte datagrams at `-b 0` (received packets/s, as bench/run.py counts
them), TCP RR p50 (bench/rr.py, 64-byte ping-pongs on one connection). Printed: medians, and each
contender's ratio of medians to the underlay with the min-max of the per-round ratios (RR p50: underlay /
contender, so above 1 is better everywhere), and the packets the hosts' own stacks forwarded per contender
(none for a fast path that took everything). A kernel without netkit: the error, exit 2; `--without-netkit`
then measures the underlay and the veth contenders alone (the most netkit could win is the gap left).

    python3 bench/netkit_vs_veth.py [--rounds 7] [--duration 3] [--out bench/results/netkit_vs_veth.json]
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vpcnet.datapath import rtnl  # noqa: E402
from vpcnet.datapath.ebpf import load, programs  # noqa: E402
from vpcnet.datapath.ebpf.assembler import JNE, Asm  # noqa: E402

IPERF, RR = 5201, 7001
CLUSTER = "10.77.0.0/16"
ROUTER_A, HOST_A, ROUTER_B, HOST_B = "192.0.2.1", "192.0.2.10", "198.51.100.1", "198.51.100.20"
BLOCK = {"a": "10.77.3", "b": "10.77.4"}
CONTENDERS = ("underlay", "veth+tc", "veth routed", "netkit", "netkit forward")
HOST_OCTET = {"veth+tc": 2, "netkit": 3, "netkit forward": 4, "veth routed": 5}   # the address in its block
METRICS = ("tcp1_bps", "tcp4_bps", "udp64_pps", "rr_p50_us")

# rtnetlink (uapi linux/rtnetlink.h, linux/if_link.h)
RTM_NEWLINK = 16
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
IFLA_IFNAME, IFLA_LINKINFO = 3, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_NETKIT_PEER_INFO, IFLA_NETKIT_POLICY, IFLA_NETKIT_PEER_POLICY, IFLA_NETKIT_MODE = 1, 3, 4, 5
NETKIT_PASS, NETKIT_L2 = 0, 0
# bpf(2) (uapi linux/bpf.h)
BPF_PROG_QUERY, BPF_LINK_CREATE = 16, 28
BPF_NETKIT_PRIMARY, BPF_NETKIT_PEER = 54, 55
SYS_BPF = {"x86_64": 321, "aarch64": 280}
TC_INGRESS, ETH_P_IP = 0xFFFFFFF2, 0x0800
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


# -- netkit over raw rtnetlink (iproute2 before 6.7 has no `type netkit`) -----------------------------------
def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _ifinfo() -> bytes:
    return struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, 0, 0, 0)


def netkit_request(primary: str, peer: str) -> bytes:
    """RTM_NEWLINK for a netkit pair in L2 mode, both policies forward (a packet no program redirects goes
    on as over a veth): `primary` stays in the namespace asked in, `peer` is the container's side."""
    data = (_nla(IFLA_NETKIT_MODE, struct.pack("=I", NETKIT_L2))
            + _nla(IFLA_NETKIT_POLICY, struct.pack("=I", NETKIT_PASS))
            + _nla(IFLA_NETKIT_PEER_POLICY, struct.pack("=I", NETKIT_PASS))
            + _nla(IFLA_NETKIT_PEER_INFO, _ifinfo() + _nla(IFLA_IFNAME, peer.encode() + b"\0")))
    info = _nla(IFLA_INFO_KIND, b"netkit") + _nla(IFLA_INFO_DATA, data)
    return _ifinfo() + _nla(IFLA_IFNAME, primary.encode() + b"\0") + _nla(IFLA_LINKINFO, info)


def create_netkit(netns: str, primary: str, peer: str) -> None:
    """The pair in `netns`; a refusal raises OSError with the kernel's errno."""
    sock = rtnl.open_socket(netns)
    try:
        body = netkit_request(primary, peer)
        seq = int(time.monotonic_ns() & 0x7FFFFFFF)
        sock.send(struct.pack("=IHHII", 16 + len(body), RTM_NEWLINK,
                              NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, 0) + body)
        for _ in range(16):
            data = sock.recv(65536)
            length, kind, _flags, got_seq, _pid = struct.unpack_from("=IHHII", data)
            if kind == NLMSG_ERROR and got_seq == seq:
                code = -struct.unpack_from("=i", data, 16)[0]
                if code:
                    raise OSError(code, f"RTM_NEWLINK netkit: {os.strerror(code)}")
                return
        raise OSError(errno.EPROTO, "no netlink acknowledgement")
    finally:
        sock.close()


# -- bpf(2): a link on the netkit peer, and what is attached there ------------------------------------------
def _bpf(cmd: int, attr: bytearray) -> int:
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    result = _libc.syscall(SYS_BPF[platform.machine()], cmd, buf, len(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    attr[:] = buf.raw
    return result


def attach_netkit(netns: str, primary_index: int, prog_fd: int, attach_type: int = BPF_NETKIT_PEER) -> int:
    """BPF_LINK_CREATE: `prog_fd` on the netkit pair whose primary is `primary_index` in `netns` (the index
    is looked up in the caller's namespace, hence the thread in `netns`); BPF_NETKIT_PEER: the program runs
    when the peer (the container's side) transmits. Returns the link's fd: closing it detaches."""
    attr = bytearray(64)
    struct.pack_into("=IIII", attr, 0, prog_fd, primary_index, attach_type, 0)
    return rtnl.in_netns(netns, lambda: _bpf(BPF_LINK_CREATE, attr))


def query_netkit(netns: str, primary_index: int, attach_type: int) -> dict:
    """BPF_PROG_QUERY on the pair: how many programs are attached at `attach_type`, the mprog revision."""
    attr = bytearray(64)
    struct.pack_into("=II", attr, 0, primary_index, attach_type)
    rtnl.in_netns(netns, lambda: _bpf(BPF_PROG_QUERY, attr))
    return {"count": struct.unpack_from("=I", attr, 24)[0], "revision": struct.unpack_from("=Q", attr, 56)[0]}


# -- the programs ----------------------------------------------------------------------------------------
def container_program(host_block: str) -> bytes:
    """The container program's forwarding core (vpcnet.datapath.ebpf.programs.container_program without its
    endpoint, peer and local maps): a cluster address outside this host's block -> bpf_fib_lookup from the
    device the packet is on (skb->ifindex: the host veth on its tc ingress; on a netkit peer's transmit path
    the primary, which netkit_xmit makes skb->dev before the program runs), TTL - 1, bpf_redirect_neigh out
    of the device found; anything else -> TC_ACT_UNSPEC (netkit: NETKIT_NEXT, the value of TC_ACT_UNSPEC;
    after the last program it passes the packet up the primary, as NETKIT_PASS)."""
    a = Asm()
    programs._parse(a)
    programs._require_in(a, 8, CLUSTER)
    programs._require_in(a, 8, host_block, inside=False)
    programs._fib_lookup(a)
    a.jump(JNE, 0, "pass", imm=programs.FIB_SUCCESS)
    programs._decrement_ttl(a, "ttl_done")
    programs._redirect_neigh(a)
    programs._pass(a)
    return a.assemble()


# -- the topology --------------------------------------------------------------------------------------------
@dataclass
class Topology:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    namespaces: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)                # loaded programs and netkit links
    hosts: dict[str, str] = field(default_factory=dict)         # "a"/"b" -> namespace
    containers: dict[tuple[str, str], str] = field(default_factory=dict)   # (host, contender) -> namespace
    findings: dict[str, object] = field(default_factory=dict)
    with_netkit: bool = True

    def contenders(self) -> list[str]:
        return [c for c in CONTENDERS if self.with_netkit or "netkit" not in c]

    def ns(self, role: str) -> str:
        name = f"nkb{role}-{self.tag}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return name

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)

    def build(self) -> None:
        router = self.ns("r")
        for side, me, gw in (("a", HOST_A, ROUTER_A), ("b", HOST_B, ROUTER_B)):
            host = self.hosts[side] = self.ns(side)
            sh("ip", "-n", router, "link", "add", f"to{side}", "type", "veth", "peer", "name", "uplink0",
               "netns", host)
            sh("ip", "-n", router, "addr", "add", f"{gw}/24", "dev", f"to{side}")
            sh("ip", "-n", router, "link", "set", f"to{side}", "up")
            sh("ip", "-n", router, "route", "add", f"{BLOCK[side]}.0/24", "via", me)
            sh("ip", "-n", host, "addr", "add", f"{me}/24", "dev", "uplink0")
            sh("ip", "-n", host, "link", "set", "uplink0", "up")
            sh("ip", "-n", host, "route", "add", "default", "via", gw)
        if not self.with_netkit:                  # recorded with the figures: why netkit is not among them
            try:
                create_netkit(self.hosts["a"], "nkbprobe0", "nkbprobe1")
                self.findings["netkit"] = "available (left out by --without-netkit)"
            except OSError as exc:
                self.findings["netkit"] = f"unavailable: {exc}"
        for side, host in self.hosts.items():
            self.host_programs(side, host)
            for contender in self.contenders()[1:]:
                self.container(side, host, contender)

    def host_programs(self, side: str, host: str) -> None:
        fd = load(programs.uplink_program(f"{BLOCK[side]}.0/24", CLUSTER, 0), "nkb_uplink")
        self.fds.append(fd)
        sock = rtnl.open_socket(host)
        try:
            index = link(host, "uplink0")["ifindex"]
            rtnl.add_clsact(sock, index)
            rtnl.replace_bpf_filter(sock, index, TC_INGRESS, 0x7F01, ETH_P_IP, 1, fd, "nkb-uplink")
        finally:
            sock.close()

    def container(self, side: str, host: str, contender: str) -> None:
        address = f"{BLOCK[side]}.{HOST_OCTET[contender]}"
        sandbox = self.containers[(side, contender)] = self.ns(f"{side}{HOST_OCTET[contender]}")
        outer, inner = f"nkb{HOST_OCTET[contender]}h", f"nkb{HOST_OCTET[contender]}c"
        if contender.startswith("veth"):
            sh("ip", "-n", host, "link", "add", outer, "type", "veth", "peer", "name", inner)
        else:
            create_netkit(host, outer, inner)
        # as Docker does: the container's side moved into the sandbox (by a process's pid, on host A's netkit
        # pair: Docker's path; by the namespace's name elsewhere), then renamed
        if side == "a" and contender == "netkit":
            self.findings["peer moved by pid"] = move_by_pid(host, inner, sandbox)
        else:
            sh("ip", "-n", host, "link", "set", inner, "netns", sandbox)
        sh("ip", "-n", sandbox, "link", "set", inner, "name", "eth0")
        sh("ip", "-n", sandbox, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", sandbox, "link", "set", "eth0", "up")
        sh("ip", "-n", host, "link", "set", outer, "up")
        outside, eth0 = link(host, outer), link(sandbox, "eth0")
        # static neighbours both ways: no ARP in what is measured (vpcnet answers it by proxy ARP)
        sh("ip", "-n", sandbox, "neigh", "replace", f"{BLOCK[side]}.1", "lladdr", outside["address"], "dev", "eth0",
           "nud", "permanent")
        sh("ip", "-n", sandbox, "route", "add", "default", "via", f"{BLOCK[side]}.1")
        sh("ip", "-n", host, "route", "add", f"{address}/32", "dev", outer)
        sh("ip", "-n", host, "neigh", "replace", address, "lladdr", eth0["address"], "dev", outer, "nud", "permanent")
        if contender in ("netkit forward", "veth routed"):
            return
        fd = load(container_program(f"{BLOCK[side]}.0/24"), "nkb_container")
        self.fds.append(fd)
        if contender == "veth+tc":
            sock = rtnl.open_socket(host)
            try:
                rtnl.add_clsact(sock, outside["ifindex"])
                rtnl.replace_bpf_filter(sock, outside["ifindex"], TC_INGRESS, 0x7F00, ETH_P_IP, 1, fd, "nkb-container")
            finally:
                sock.close()
            return
        self.fds.append(attach_netkit(host, outside["ifindex"], fd))
        if side == "a":
            self.findings["netkit attached"] = {
                "peer": query_netkit(host, outside["ifindex"], BPF_NETKIT_PEER),
                "primary": query_netkit(host, outside["ifindex"], BPF_NETKIT_PRIMARY),
                "ip -d link (host side)": sh("ip", "-n", host, "-d", "link", "show", outer).stdout.strip(),
                "ip -d link (container side)": sh("ip", "-n", sandbox, "-d", "link", "show", "eth0").stdout.strip()}


def link(netns: str, name: str) -> dict:
    return json.loads(sh("ip", "-n", netns, "-j", "link", "show", "dev", name).stdout)[0]


def move_by_pid(host: str, device: str, sandbox: str) -> str:
    """`ip link set <device> netns <pid>` with a process inside `sandbox`, as Docker moves an endpoint's
    interface into a container by its sandbox (RTM_SETLINK, IFLA_NET_NS_PID/FD). Returns the command."""
    holder = subprocess.Popen(["ip", "netns", "exec", sandbox, "sleep", "30"])
    try:
        want = os.stat(os.path.join(rtnl.NETNS_DIR, sandbox)).st_ino
        for _ in range(200):                                       # until the process has joined (<= 2 s)
            try:
                if os.stat(f"/proc/{holder.pid}/ns/net").st_ino == want:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        else:
            raise RuntimeError(f"the holder process never joined {sandbox}")
        command = ("ip", "-n", host, "link", "set", device, "netns", str(holder.pid))
        sh(*command)
        return " ".join(command[3:]).replace(str(holder.pid), "<pid>") + ": ok"
    finally:
        holder.kill()
        holder.wait(timeout=10)


# -- measurements --------------------------------------------------------------------------------------------
def iperf(client: str, address: str, duration: float, *extra: str) -> dict:
    proc = None
    for _ in range(30):                                           # a server not listening yet: retried (<= 3 s)
        proc = sh("ip", "netns", "exec", client, "iperf3", "-c", address, "-p", str(IPERF), "-t", str(duration),
                  "-J", *extra, check=False, timeout=duration + 30)
        try:
            return json.loads(proc.stdout)["end"]
        except (ValueError, KeyError):
            time.sleep(0.1)
    raise RuntimeError(f"iperf3 {' '.join(extra)} to {address} failed: {proc.stdout[-300:] if proc else ''}")


def probe(client: str, address: str, metric: str, duration: float) -> float:
    if metric == "tcp1_bps":
        return iperf(client, address, duration)["sum_received"]["bits_per_second"]
    if metric == "tcp4_bps":
        return iperf(client, address, duration, "-P", "4")["sum_received"]["bits_per_second"]
    if metric == "udp64_pps":
        end = iperf(client, address, duration, "-u", "-l", "64", "-b", "0")["sum"]
        return (end["packets"] - end["lost_packets"]) / end["seconds"]
    proc = sh("ip", "netns", "exec", client, sys.executable, os.path.join(HERE, "rr.py"), "client", "--count",
              "3000", "--host", address, "--port", str(RR), check=False, timeout=60)
    result = json.loads(proc.stdout)
    if "error" in result:
        raise RuntimeError(f"rr.py to {address}: {result['error']}")
    return result["p50_us"]


def forwarded(netns: str) -> int:
    """Packets `netns`'s own stack has forwarded (Ip ForwDatagrams): what a fast path hands past it, it never
    counts, so a contender's count shows whether its programs took the packets."""
    lines = [line.split() for line in sh("ip", "netns", "exec", netns, "cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith("Ip:")]
    return int(lines[1][lines[0].index("ForwDatagrams")])


def reachable(client: str, address: str) -> None:
    """A short RR exchange to `address` succeeds, retried while its server starts (<= 30 tries)."""
    out = ""
    for _ in range(30):
        proc = sh("ip", "netns", "exec", client, sys.executable, os.path.join(HERE, "rr.py"), "client", "--count",
                  "200", "--warmup", "20", "--host", address, "--port", str(RR), check=False, timeout=30)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 and "error" not in json.loads(proc.stdout or "{}"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{address} not reachable from {client}: {out[-300:]}")


def summarise(samples: dict[str, dict[str, list[float]]]) -> dict:
    base = samples["underlay"]
    ratios: dict[str, dict] = {}
    for name, ms in samples.items():
        ratios[name] = {}
        for m, values in ms.items():
            # RR p50: lower is better, so underlay / contender (above 1 is better, as for the others)
            per_round = [(b / v if m == "rr_p50_us" else v / b) for v, b in zip(values, base[m], strict=True)]
            med = statistics.median(base[m]) / statistics.median(values) if m == "rr_p50_us" else \
                statistics.median(values) / statistics.median(base[m])
            ratios[name][m] = {"median": med, "min": min(per_round), "max": max(per_round)}
    return ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "netkit_vs_veth.json"))
    p.add_argument("--without-netkit", action="store_true",
                   help="underlay and veth+tc only (a kernel without netkit): the most netkit could win here")
    args = p.parse_args()
    topo = Topology(with_netkit=not args.without_netkit)
    servers: list[subprocess.Popen] = []
    try:
        try:
            topo.build()
        except OSError as exc:
            if "RTM_NEWLINK netkit" in str(exc):
                print(f"netkit is not available here: {exc} (kernel {platform.release()}); "
                      "--without-netkit measures the underlay and the veth contenders alone")
                return 2
            raise
        targets = {"underlay": (topo.hosts["a"], topo.hosts["b"], HOST_B)}
        for contender in topo.contenders()[1:]:
            octet = HOST_OCTET[contender]
            targets[contender] = (topo.containers[("a", contender)], topo.containers[("b", contender)],
                                  f"{BLOCK['b']}.{octet}")
        for _client, server, _address in targets.values():
            servers.append(subprocess.Popen(["ip", "netns", "exec", server, "iperf3", "-s", "-p", str(IPERF)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            servers.append(subprocess.Popen(["ip", "netns", "exec", server, sys.executable,
                                             os.path.join(HERE, "rr.py"), "server", "--port", str(RR),
                                             "--max-seconds", "3600"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for client, _server, address in targets.values():             # reachability (servers up), warm paths
            reachable(client, address)
        names = topo.contenders()
        samples: dict[str, dict[str, list[float]]] = {n: {m: [] for m in METRICS} for n in names}
        stack_forwarded = {n: 0 for n in names}
        load_avg = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                client, _server, address = targets[name]
                before = sum(forwarded(h) for h in topo.hosts.values())
                for metric in METRICS:
                    samples[name][metric].append(probe(client, address, metric, args.duration))
                stack_forwarded[name] += sum(forwarded(h) for h in topo.hosts.values()) - before
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        load_avg.append(os.getloadavg()[0])
        result = {"rounds": args.rounds, "duration_s": args.duration, "kernel": platform.release(),
                  "load_average_1m": {"start": load_avg[0], "end": load_avg[1], "cpus": os.cpu_count()},
                  "contenders": names, "findings": topo.findings, "samples": samples,
                  "packets_forwarded_by_the_hosts_stacks": stack_forwarded,
                  "medians": {n: {m: statistics.median(v) for m, v in ms.items()} for n, ms in samples.items()},
                  "ratios_to_underlay": summarise(samples)}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print_table(result)
        return 0
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)
        topo.close()


def print_table(result: dict) -> None:
    load_avg = result["load_average_1m"]
    print(f"kernel {result['kernel']}, {result['rounds']} rounds of {result['duration_s']} s, load average "
          f"{load_avg['start']:.1f} -> {load_avg['end']:.1f} on {load_avg['cpus']} CPUs; packets the hosts' "
          f"stacks forwarded: {result['packets_forwarded_by_the_hosts_stacks']}")
    print("| contender | TCP 1 stream Gbit/s | TCP 4 streams Gbit/s | UDP 64 B kpps | RR p50 µs |")
    print("|---|---|---|---|---|")
    for n in result["contenders"]:
        med, rat = result["medians"][n], result["ratios_to_underlay"][n]
        values = {"tcp1_bps": f"{med['tcp1_bps'] / 1e9:.2f}", "tcp4_bps": f"{med['tcp4_bps'] / 1e9:.2f}",
                  "udp64_pps": f"{med['udp64_pps'] / 1e3:.0f}", "rr_p50_us": f"{med['rr_p50_us']:.0f}"}
        cells = [v if n == "underlay" else
                 f"{v} ({rat[m]['median']:.2f}, {rat[m]['min']:.2f}-{rat[m]['max']:.2f})" for m, v in values.items()]
        print(f"| {n} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    sys.exit(main())
