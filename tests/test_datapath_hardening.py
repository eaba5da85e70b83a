"""The datapath's host-safety against the real kernel, inside network namespaces the tests make: a container
cannot configure the host's IPv6 (router advertisements, the CVE-2020-13401 class), and a host vpcnet turns
forwarding on for does not forward between its other interfaces."""
from __future__ import annotations

import errno
import logging
import subprocess
import sys
import time

import pytest
from conftest import require, run, unique
from test_datapath_ipv6 import port_drops
from test_dataplane import attach_container, host, ns_run, peer_host, ping, spec  # noqa: F401  (host: a fixture)

from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.firewall import IPV6_CHAIN, IPV6_RULES, Ipv6Guard
from vpcnet.datapath.guard import GuardFacts
from vpcnet.datapath.netlink import Netlink
from vpcnet.datapath.spec import EndpointSpec, anchor_peer, mac_for, veth_names
from vpcnet.datapath.tc import GUARD_FILTER

pytestmark = pytest.mark.root

# Run inside the container's namespace: a router advertisement from eth0 (link-local fe80::1) to ff02::1
# with a default route (lifetime 1800 s), a prefix-information option (on-link, autonomous: SLAAC) for
# 2001:db8:77::/64 and a route-information option for 2001:db8:99::/48; the kernel fills in the checksum.
SEND_RA = r"""
import socket, struct
ifindex = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
s.bind(("fe80::1", 0, 0, ifindex))
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
pio = struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0, socket.inet_pton(socket.AF_INET6, "2001:db8:77::"))
rio = struct.pack("!BBBBI8s", 24, 2, 48, 0, 1800, socket.inet_pton(socket.AF_INET6, "2001:db8:99::")[:8])
for _ in range(3):
    s.sendto(ra + pio + rio, ("ff02::1", 0, 0, ifindex))
"""

# Run inside the container's namespace: an echo request to every node on eth0's link (ff02::1); prints the
# source of each echo reply that is not the container's own.
PING_ALL_NODES = r"""
import socket, struct, time
ifindex = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
s.bind(("fe80::1", 0, 0, ifindex))
s.settimeout(0.1)
seen, deadline, next_send = set(), time.monotonic() + 1.5, 0.0
while time.monotonic() < deadline:
    if time.monotonic() >= next_send:
        s.sendto(struct.pack("!BBHHH", 128, 0, 0, 7, 1) + b"vpcnet", ("ff02::1", 0, 0, ifindex))
        next_send = time.monotonic() + 0.5
    try:
        data, source = s.recvfrom(2048)
    except socket.timeout:
        continue
    if data[0] == 129 and source[0].split("%")[0] != "fe80::1":
        seen.add(source[0])
print("\n".join(sorted(seen)))
"""


def in_ns(ns: str, script: str) -> str:
    return run(["ip", "netns", "exec", ns, sys.executable, "-c", script]).stdout


def ipv6_state(ns: str) -> tuple[str, str]:
    """What router advertisements change: IPv6 routes (main table, no link-local or multicast ones) and
    addresses of global scope."""
    routes = [line for line in run(["ip", "-n", ns, "-6", "route", "show"]).stdout.splitlines()
              if not line.startswith(("fe80::", "multicast", "ff00::"))]
    return "\n".join(routes), run(["ip", "-n", ns, "-6", "-o", "addr", "show", "scope", "global"]).stdout


def sysctl(ns: str, key: str) -> str:
    return ns_run(ns, "cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_a_containers_router_advertisement_configures_nothing_on_the_host(host, netns_factory, mode):  # noqa: F811
    """IPv6 is off on every host-side link vpcnet makes: the host neither takes a route or address from a
    container's router advertisement nor answers its IPv6."""
    dp = Dataplane(netns=host)
    if mode == "ebpf":
        require(dp.features().supports("ebpf"), dp.features().why_not("ebpf"))
    s = spec(mode=mode)
    dp.ensure_network(s)
    sandbox = attach_container(host, dp, s, netns_factory, "10.77.3.2", "a" * 64)
    run(["ip", "-n", sandbox, "-6", "addr", "add", "fe80::1/64", "dev", "eth0", "nodad"])
    time.sleep(1.2)              # DAD of whatever link-local the host gave its end (none, unless IPv6 is on)
    before = ipv6_state(host)
    assert "2001:db8" not in "".join(before) and "default" not in before[0]

    in_ns(sandbox, SEND_RA)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline and ipv6_state(host) == before:
        time.sleep(0.1)
    assert ipv6_state(host) == before, "the container's router advertisement configured the host"
    assert in_ns(sandbox, PING_ALL_NODES).split() == [], "the host answered the container's IPv6"
    for link in [s.bridge, veth_names("a" * 64)[0]] + ([anchor_peer(s.bridge)] if s.routed else []):
        assert run(["ip", "-n", host, "-6", "-o", "addr", "show", "dev", link]).stdout == "", link
        for key, value in (("disable_ipv6", "1"), ("accept_ra", "0"), ("autoconf", "0")):
            assert sysctl(host, f"net.ipv6.conf.{link}.{key}") == value, (link, key)


@pytest.mark.parametrize("mode", ["bridge", "routed"])
def test_ipv6_turned_back_on_is_found_and_turned_off_by_the_periodic_pass(host, netns_factory, mode):  # noqa: F811
    dp = Dataplane(netns=host)
    s = spec(mode=mode)
    dp.ensure_network(s)
    host_veth, peer = veth_names("a" * 64)
    attach_container(host, dp, s, netns_factory, "10.77.3.2", "a" * 64)
    wanted = [(s, [EndpointSpec(host_veth, peer, mac_for("10.77.3.2"), "10.77.3.2")])]
    assert dp.repair(wanted) == []
    flipped = [s.bridge, host_veth] + ([anchor_peer(s.bridge)] if s.routed else [])
    for link in flipped:
        ns_run(host, "sysctl", "-qw", f"net.ipv6.conf.{link}.disable_ipv6=0", f"net.ipv6.conf.{link}.accept_ra=1")
    repairs = dp.repair(wanted)
    assert sorted(r.kind for r in repairs) == ["link", "link"], repairs
    text = " ".join(r.what for r in repairs)
    for link in flipped:
        assert f"{link} disable_ipv6=0" in text and f"{link} accept_ra=1" in text, text
        assert sysctl(host, f"net.ipv6.conf.{link}.disable_ipv6") == "1"
        assert sysctl(host, f"net.ipv6.conf.{link}.accept_ra") == "0"
    assert dp.repair(wanted) == [], "put right: the next pass finds nothing"


def outside(host_ns: str, netns_factory, subnet: str) -> str:
    """An 'outside' netns on a link of its own to `host_ns`: `<subnet>.2`, routed via the host's `<subnet>.1`,
    with no relation to vpcnet (another VM's network, a VPN, a second NIC)."""
    ns = netns_factory("vpcext")
    link = unique("vx")
    run(["ip", "-n", host_ns, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "-n", host_ns, "addr", "add", f"{subnet}.1/24", "dev", link])
    run(["ip", "-n", host_ns, "link", "set", link, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{subnet}.2/24", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", f"{subnet}.1"])
    return ns


def forward_policy(ns: str) -> str:
    return ns_run(ns, "iptables", "-S", "FORWARD").stdout.splitlines()[0].split()[2]


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_vpcnet_turning_forwarding_on_forwards_only_what_a_chain_accepts(host, netns_factory, mode, caplog):  # noqa: F811
    """A reboot: vpcnet starts before Docker, on a host with forwarding off and FORWARD's policy ACCEPT.
    vpcnet turns forwarding on and, as Docker does then, the policy to DROP: its containers' traffic still
    flows (its chain accepts it), the host's other interfaces are not routed into each other."""
    dp = Dataplane(netns=host)
    if mode == "ebpf":
        require(dp.features().supports("ebpf"), dp.features().why_not("ebpf"))
    ns_run(host, "sysctl", "-qw", "net.ipv4.ip_forward=0")        # a new namespace may inherit 1
    assert forward_policy(host) == "ACCEPT"
    a = outside(host, netns_factory, "172.31.1")
    outside(host, netns_factory, "172.31.2")
    peer_host(host, netns_factory)

    with caplog.at_level(logging.WARNING, logger="vpcnet.datapath.dataplane"):
        dp.ensure_host()                                        # what the driver's restore does first
        s = spec(mode=mode)
        dp.ensure_network(s)
    assert sysctl(host, "net.ipv4.ip_forward") == "1" and forward_policy(host) == "DROP"
    assert "net.ipv4.ip_forward was 0: vpcnet turned it on and set the filter table's FORWARD policy to DROP" \
        in caplog.text
    container = attach_container(host, dp, s, netns_factory, "10.77.3.2", "a" * 64)
    assert ping(container, "10.77.9.2"), "cluster traffic (another host's container) is forwarded"
    assert ping(container, "198.51.100.2"), "traffic leaving the cluster (masqueraded) is forwarded"
    assert not ping(a, "172.31.2.2"), "the host routed between two interfaces that are none of vpcnet's"
    ns_run(host, "iptables", "-P", "FORWARD", "ACCEPT")          # what a host was left with before
    assert ping(a, "172.31.2.2")


def test_forwarding_someone_else_turned_on_keeps_its_policy(host, caplog):  # noqa: F811
    ns_run(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    dp = Dataplane(netns=host)
    with caplog.at_level(logging.WARNING, logger="vpcnet.datapath.dataplane"):
        dp.ensure_host()
        dp.ensure_network(spec())
    assert forward_policy(host) == "ACCEPT", "someone else decided (`vpcnet doctor` names it)"
    assert "ip_forward" not in caplog.text


# -- the second guard: ip6tables, for where /proc/sys is read-only (a managed plugin) ----------------------

def read_only_proc_sys(self, names, wanted, fresh=False):
    raise OSError(errno.EROFS, "Read-only file system")


def ip6_rules(ns: str) -> list[str]:
    return ns_run(ns, "ip6tables", "-t", "raw", "-S").stdout.splitlines()


def dropped(ns: str) -> int:
    lines = ns_run(ns, "ip6tables", "-t", "raw", "-L", IPV6_CHAIN, "-v", "-n", "-x").stdout.splitlines()[2:]
    return sum(int(line.split()[0]) for line in lines)


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_without_the_ipv6_sysctls_ip6tables_keeps_a_containers_ipv6_off_the_host(host, netns_factory, mode,  # noqa: F811
                                                                                 monkeypatch, caplog):
    """As in a managed plugin: /proc/sys refuses the links' IPv6 settings, so IPv6 stays on; the host still
    takes no route or address from a container's router advertisement and does not answer its IPv6,
    because ip6tables drops it (in bridge mode the port's anti-spoofing filter drops it first: a network
    without IPv6 lets no IPv6 through its ports)."""
    monkeypatch.setattr(Netlink, "link_sysctls", read_only_proc_sys)
    dp = Dataplane(netns=host)
    if mode == "ebpf":
        require(dp.features().supports("ebpf"), dp.features().why_not("ebpf"))
    with caplog.at_level(logging.WARNING, logger="vpcnet.datapath.links"):
        dp.ensure_host()
        s = spec(mode=mode)
        dp.ensure_network(s)
        sandbox = attach_container(host, dp, s, netns_factory, "10.77.3.2", "a" * 64)
    assert "cannot turn IPv6 off on vpcnet's links" in caplog.text
    host_veth = veth_names("a" * 64)[0]
    assert sysctl(host, f"net.ipv6.conf.{host_veth}.disable_ipv6") == "0", "the sysctl guard is not there"
    run(["ip", "-n", sandbox, "-6", "addr", "add", "fe80::1/64", "dev", "eth0", "nodad"])
    time.sleep(1.2)
    before = ipv6_state(host)
    assert "2001:db8" not in "".join(before) and "default" not in before[0]

    in_ns(sandbox, SEND_RA)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline and ipv6_state(host) == before:
        time.sleep(0.1)
    assert ipv6_state(host) == before, "the container's router advertisement configured the host"
    assert in_ns(sandbox, PING_ALL_NODES).split() == [], "the host answered the container's IPv6"
    if mode == "bridge":
        assert port_drops(host, host_veth) >= 3, "the port's filter dropped them"
    else:
        assert dropped(host) >= 3, "ip6tables dropped them"


def test_a_flushed_ipv6_guard_is_put_back_by_the_periodic_pass(host):  # noqa: F811
    dp = Dataplane(netns=host)
    dp.ensure_host()
    assert dp.repair([]) == []
    wanted = [f"-A {IPV6_CHAIN} {r}" for r in IPV6_RULES] + [f"-A PREROUTING -j {IPV6_CHAIN}"]
    assert set(wanted) <= set(ip6_rules(host))
    ns_run(host, "ip6tables", "-t", "raw", "-F", IPV6_CHAIN)
    assert [r.what for r in dp.repair([])] == [f"ip6tables raw chain {IPV6_CHAIN} holds 0 rule(s), 0 of 3 wanted"]
    assert set(wanted) <= set(ip6_rules(host))
    ns_run(host, "ip6tables", "-t", "raw", "-F", "PREROUTING")
    assert [r.what for r in dp.repair([])] == [f"ip6tables raw PREROUTING has no jump to {IPV6_CHAIN}"]
    assert set(wanted) <= set(ip6_rules(host))
    runs = dp.ipv6_guard.table.runs
    assert dp.repair([]) == [] and dp.ipv6_guard.table.runs == runs + 1, "one ip6tables-save, nothing written"


def test_network_and_endpoint_calls_cost_no_ip6tables_run_once_the_guard_is_in_place(host, netns_factory):  # noqa: F811
    """The guard is one rule per link name prefix, written at start: nothing per network or endpoint."""
    dp = Dataplane(netns=host)
    dp.ensure_host()
    runs = dp.ipv6_guard.table.runs
    for mode in ("bridge", "routed"):
        s = spec(tag=mode[0] * 12, host="10.77.4.0/24" if mode == "routed" else "10.77.3.0/24", mode=mode)
        dp.ensure_network(s)
        attach_container(host, dp, s, netns_factory, s.gateway[:-1] + "2", mode[0] * 64)
        dp.delete_network(s)
    assert dp.ipv6_guard.table.runs == runs


def test_without_ip6tables_the_guard_is_said_once_and_nothing_fails(caplog):
    guard = Ipv6Guard(iptables="/nonexistent/iptables")
    with caplog.at_level(logging.INFO, logger="vpcnet.datapath.firewall"):
        assert guard.apply() == [] and guard.apply() == []
    assert caplog.text.count("cannot drop IPv6 from vpcnet's links with /nonexistent/ip6tables") == 1
    assert not guard.in_place


# Run inside a container's namespace (argv: the MAC of the sending container, seconds): what arrives at eth0
# from it, one line each: "ip <source>" per UDP packet to port 9999, "arp <sender address>" per ARP packet
# whose sender hardware address is that MAC. Prints "ready" first.
SNIFF = r"""
import socket, struct, sys, time
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
s.settimeout(0.1)
print("ready", flush=True)
seen, deadline = set(), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    kind = struct.unpack("!H", f[12:14])[0]
    if kind == 0x0800 and f[23] == 17 and struct.unpack("!H", f[36:38])[0] == 9999:
        seen.add("ip " + socket.inet_ntoa(f[26:30]))
    if kind == 0x0806 and f[22:28] == mac:
        seen.add("arp " + socket.inet_ntoa(f[28:32]))
print("\n".join(sorted(seen)))
"""

# Run inside a container's namespace (argv: destination, neighbour's MAC, sources...): a raw IPv4/UDP packet
# (IP_HDRINCL: any source) to the destination's port 9999 from each source, and from eth0 for each source
# a gratuitous ARP (broadcast) and an ARP reply to the neighbour's MAC, both claiming the source address.
FORGE = r"""
import socket, struct, sys, time
dest, neighbour, sources = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), sys.argv[3:]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
link = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
link.bind(("eth0", 0))
mine = link.getsockname()[4]
def arp(op, to, spa, tha, tpa):
    return (to + mine + struct.pack("!HHHBBH", 0x0806, 1, 0x0800, 6, 4, op) + mine + socket.inet_aton(spa)
            + tha + socket.inet_aton(tpa))
for _ in range(3):
    for src in sources:
        udp = struct.pack("!HHHH", 4000, 9999, 8 + 6, 0) + b"vpcnet"
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src),
                         socket.inet_aton(dest))
        raw.sendto(ip + udp, (dest, 0))
        link.send(arp(1, b"\xff" * 6, src, b"\0" * 6, src))
        link.send(arp(2, neighbour, src, neighbour, src))
    time.sleep(0.2)
"""


def sniffing(ns: str, mac: str, secs: float):
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SNIFF, mac, str(secs)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def sniffed(proc) -> set[str]:
    out, _ = proc.communicate(timeout=30)
    return set(out.split("\n")) - {""}


def test_a_bridge_mode_container_sends_ipv4_and_arp_only_as_itself(host, netns_factory):  # noqa: F811
    """Bridge mode: the routed modes' reverse-path check (-i vh+) never sees bridged traffic, so each bridge
    port has its own guard (vpcnet.datapath.guard). A container sending raw packets from a
    neighbour's address, an unused one of its block or one outside reaches neither the neighbour on the
    bridge nor another host; nor does an ARP packet claiming such an address; its own do."""
    dp = Dataplane(netns=host)
    s = spec()
    dp.ensure_network(s)
    other = peer_host(host, netns_factory)                        # holds 10.77.9.2 (a cluster address)
    a = attach_container(host, dp, s, netns_factory, "10.77.3.2", "a" * 64)
    b = attach_container(host, dp, s, netns_factory, "10.77.3.3", "b" * 64)
    ns_run(host, "iptables", "-P", "FORWARD", "DROP")            # as Docker sets it
    mac_a, mac_b = mac_for("10.77.3.2"), mac_for("10.77.3.3")
    assert ping(a, "10.77.3.3") and ping(a, "10.77.9.2")
    forged = ["10.77.3.3", "10.77.3.77", "10.77.9.99", "192.0.2.99", "0.0.0.0"]
    for dest, ns in (("10.77.3.3", b), ("10.77.9.2", other)):
        proc = sniffing(ns, mac_a if ns == b else "00:00:00:00:00:00", 3.0)
        run(["ip", "netns", "exec", a, sys.executable, "-c", FORGE, dest, mac_b, "10.77.3.2", *forged])
        seen = sniffed(proc)
        assert "ip 10.77.3.2" in seen, f"the container's own packets reach {dest}: {seen}"
        assert not {f"ip {src}" for src in forged} & seen, f"forged sources reached {dest}: {seen}"
        if ns == b:
            assert "arp 10.77.3.2" in seen, seen
            assert not {f"arp {src}" for src in forged} & seen, f"forged ARP reached the neighbour: {seen}"
    assert ping(a, "10.77.3.3") and ping(b, "10.77.9.2"), "the containers' own traffic still flows"


MAC_FORGE = r"""
import socket, struct, sys, time
forged, to = (bytes.fromhex(m.replace(":", "")) for m in sys.argv[1:3])
src, dst = socket.inet_aton(sys.argv[3]), socket.inet_aton(sys.argv[4])
link = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
link.bind(("eth0", 0))
mine = link.getsockname()[4]
udp = struct.pack("!HHHH", 4000, 9999, 8 + 6, 0) + b"vpcnet"
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
for _ in range(3):
    link.send(to + forged + b"\x08\x00" + ip + udp)             # its own address, another MAC
    link.send(to + mine + struct.pack("!HHHBBH", 0x0806, 1, 0x0800, 6, 4, 2) + forged + src + to + dst)
    time.sleep(0.2)
"""


def test_a_bridge_mode_container_sends_only_with_its_own_mac(host, netns_factory):  # noqa: F811
    """A frame from another MAC would teach the bridge to send that MAC's frames to this port, and an ARP
    answer naming another MAC would point a neighbour's traffic there: the port's guard lets neither on,
    even with the container's own IPv4 address as the source."""
    dp = Dataplane(netns=host)
    s = spec()
    dp.ensure_network(s)
    a = attach_container(host, dp, s, netns_factory, "10.77.3.2", "a" * 64)
    b = attach_container(host, dp, s, netns_factory, "10.77.3.3", "b" * 64)
    assert ping(a, "10.77.3.3") and ping(b, "10.77.3.2")         # b knows a's MAC
    forged = "02:42:66:66:66:66"
    run(["ip", "netns", "exec", a, sys.executable, "-c", MAC_FORGE, forged, mac_for("10.77.3.3"),
         "10.77.3.2", "10.77.3.3"])
    assert forged not in run(["bridge", "-n", host, "fdb", "show", "br", s.bridge]).stdout, "the bridge learnt it"
    assert forged not in ns_run(b, "ip", "neigh", "show", "10.77.3.2").stdout, "b's neighbour entry changed"
    assert ping(a, "10.77.3.3"), "its own traffic still flows"


def test_a_bridge_ports_deleted_anti_spoofing_filter_is_put_back_by_the_periodic_pass(host, netns_factory):  # noqa: F811
    dp = Dataplane(netns=host)
    s = spec()
    dp.ensure_network(s)
    a = attach_container(host, dp, s, netns_factory, "10.77.3.2", "a" * 64)
    attach_container(host, dp, s, netns_factory, "10.77.3.3", "b" * 64)
    host_veth, peer = veth_names("a" * 64)
    endpoints = [EndpointSpec(host_veth=host_veth, peer_veth=peer, mac=mac_for("10.77.3.2"), address="10.77.3.2"),
                 EndpointSpec(host_veth=veth_names("b" * 64)[0], peer_veth=veth_names("b" * 64)[1],
                              mac=mac_for("10.77.3.3"), address="10.77.3.3")]
    assert dp.repair([(s, endpoints)]) == [], "nothing to put right on a host left alone"
    run(["tc", "-n", host, "filter", "del", "dev", host_veth, "ingress", "pref", str(GUARD_FILTER[0])])
    repairs = dp.repair([(s, endpoints)])
    assert [(r.kind, r.what) for r in repairs] == \
        [("tc", f"anti-spoofing filter for 10.77.3.2 on {host_veth} missing or out of date")], repairs
    with Netlink(host).ipr() as ipr:
        index = Netlink.link_index(ipr, host_veth)
    assert index is not None and dp.tc.has_guard(index, GuardFacts(mac_for("10.77.3.2"), "10.77.3.2"))
    assert dp.repair([(s, endpoints)]) == []
    assert ping(a, "10.77.3.3")
