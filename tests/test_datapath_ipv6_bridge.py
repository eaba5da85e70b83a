"""Bridge mode's IPv6 datapath (vpcnet.datapath.ipv6: `ensure_bridge`, `bridge_rules`) against the real kernel,
in namespaces the tests make: containers on one bridge resolve and reach each other directly, other hosts
through a router, send only from their own address, cannot give each other a router advertisement; the
repair pass puts the bridge's IPv6 back."""
from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from conftest import run
from test_datapath_ipv6 import RA_SENDER, ns_run, ping6, port_drops

from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.guard import GuardFacts
from vpcnet.datapath.ipv6 import Ipv6Endpoint, link_gateway
from vpcnet.datapath.netlink import Netlink
from vpcnet.datapath.spec import EndpointSpec, NetworkSpec, bridge_name, mac_for, veth_names

pytestmark = pytest.mark.root
TAG = "d1e2f3a4b5c6"
BLOCK = "fd00:77:3:0:2::"          # this host's /80 block
A, B, C = f"{BLOCK}2", f"{BLOCK}3", f"{BLOCK}4"
EIDS = ("a" * 64, "b" * 64)
VETHS = [veth_names(e)[0] for e in EIDS]
BRIDGE_RULE = "own IPv6, checked per port by its tc filter"
UPLINK = "fd77:a::10"              # the host's uplink address (make_host): reached through the gateway


def spec(block: str = BLOCK, host4: str = "10.77.3") -> NetworkSpec:
    return NetworkSpec(tag=TAG, bridge=bridge_name(TAG + "0" * 52), gateway=f"{host4}.1", host_cidr=f"{host4}.0/24",
                       cluster_cidr="10.77.0.0/16", mtu=1500, mode="bridge", host_cidr_v6=f"{block}/80")


def make_host(netns_factory, v4: str = "192.0.2", v6: str = "fd77:a:") -> str:
    """A simulated host with an uplink (both families, default routes via .1 and ::1 beyond it). Its
    host-wide bridge-nf-call-ip6tables is off: vpcnet's bridge asks for ip6tables on its own."""
    ns = netns_factory("vpc6b")
    ns_run(ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-ip6tables=0")
    run(["ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p"])
    run(["ip", "-n", ns, "addr", "add", f"{v4}.10/24", "dev", "uplink0"])
    run(["ip", "-n", ns, "-6", "addr", "add", f"{v6}:10/64", "dev", "uplink0", "nodad"])
    for link in ("uplink0p", "uplink0"):
        run(["ip", "-n", ns, "link", "set", link, "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", f"{v4}.1"])
    run(["ip", "-n", ns, "-6", "route", "add", "default", "via", f"{v6}:1"])
    return ns


def container(host: str, dp: Dataplane, netspec: NetworkSpec, netns_factory, ip4: str, ip6: str, eid: str) -> str:
    """What Docker does at Join for a dual-stack endpoint of a bridge-mode network: the container end into a
    sandbox as eth0, the IPv4 address with the pool prefix, the IPv6 one as the /128 vpcnet's IPAM answers
    (without DAD, as Docker adds it), Join's StaticRoutes (the block on the link: CONNECTED), and the
    default routes of Gateway and GatewayIPv6. It takes router advertisements, as a container does."""
    sandbox = netns_factory("vpc6c")
    host_veth, peer = veth_names(eid)
    dp.ensure_endpoint(netspec, host_veth, peer, mac_for(ip4), ip4)
    run(["ip", "-n", host, "link", "set", peer, "netns", sandbox])
    run(["ip", "-n", sandbox, "link", "set", peer, "name", "eth0"])
    ns_run(sandbox, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0", "net.ipv6.conf.eth0.accept_ra=1",
           "net.ipv6.conf.eth0.autoconf=1")
    run(["ip", "-n", sandbox, "addr", "add", f"{ip4}/24", "dev", "eth0"])
    run(["ip", "-n", sandbox, "-6", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad"])
    run(["ip", "-n", sandbox, "link", "set", "eth0", "up"])
    run(["ip", "-n", sandbox, "-6", "route", "add", netspec.host_cidr_v6, "dev", "eth0"])
    run(["ip", "-n", sandbox, "route", "add", "default", "via", netspec.gateway])
    run(["ip", "-n", sandbox, "-6", "route", "add", "default", "via", link_gateway(netspec.bridge), "dev", "eth0"])
    return sandbox


def two_containers(host: str, netns_factory, block: str = BLOCK, host4: str = "10.77.3") -> tuple:
    dp = Dataplane(netns=host)
    s = spec(block, host4)
    wanted = [Ipv6Endpoint(VETHS[0], f"{block}2", s.bridge), Ipv6Endpoint(VETHS[1], f"{block}3", s.bridge)]
    dp.ipv6_endpoints = lambda: list(wanted)           # the store's rows, as the driver hands them
    dp.ensure_network(s)
    ca = container(host, dp, s, netns_factory, f"{host4}.2", f"{block}2", EIDS[0])
    cb = container(host, dp, s, netns_factory, f"{host4}.3", f"{block}3", EIDS[1])
    for veth, address in zip(VETHS, (f"{block}2", f"{block}3"), strict=True):
        dp.ensure_endpoint_ipv6(s, veth, address)
    ns_run(host, "ip6tables", "-P", "FORWARD", "DROP")         # as Docker 27+ sets it with IPv6 on
    return dp, s, wanted, ca, cb


def test_two_containers_on_one_bridge_resolve_and_reach_each_other_over_ipv6(netns_factory):
    host = make_host(netns_factory)
    _dp, s, _wanted, ca, cb = two_containers(host, netns_factory)
    assert ping6(ca, B) and ping6(cb, A)
    # neighbour discovery between the two containers, on the bridge: a resolved b's own MAC
    assert mac_for("10.77.3.3") in ns_run(ca, "ip", "-6", "neigh", "show", B).stdout
    assert ping6(ca, link_gateway(s.bridge) + "%eth0"), "the gateway answers on the bridge"
    shown = ns_run(host, "ip", "-6", "addr", "show", "dev", s.bridge).stdout
    assert f"{link_gateway(s.bridge)}/64" in shown and "nodad" in shown, shown
    assert f"{BLOCK}/80 dev {s.bridge}" in ns_run(host, "ip", "-6", "route").stdout
    assert ns_run(host, "sysctl", "-n", f"net.ipv6.conf.{s.bridge}.accept_ra").stdout.strip() == "0"
    assert ns_run(host, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    # the ports keep IPv6 off: the bridge carries it
    assert ns_run(host, "sysctl", "-n", f"net.ipv6.conf.{VETHS[0]}.disable_ipv6").stdout.strip() == "1"
    assert ns_run(ca, "busybox", "ping", "-c1", "-W2", "10.77.3.3", check=False).returncode == 0, "IPv4 as before"


def test_a_bridge_container_sends_only_from_its_own_address_and_its_advertisement_reaches_no_one(netns_factory):
    host = make_host(netns_factory)
    _dp, s, _wanted, ca, cb = two_containers(host, netns_factory)
    assert ping6(ca, B)
    # a forged source: a takes a third address of the block (nobody's), and b's, and sends from them
    run(["ip", "-n", ca, "-6", "addr", "add", f"{C}/128", "dev", "eth0", "nodad"])
    before = port_drops(host, VETHS[0])
    assert not ping6(ca, B, source=C)
    assert port_drops(host, VETHS[0]) > before, "a's port dropped them"
    assert not ping6(ca, "fd77:a::1", source=C), "nor towards the gateway and out"
    assert ping6(ca, B) and ping6(cb, A), "their own addresses still pass"
    # a router advertisement from a, to all nodes on the bridge: b (accept_ra=1) and the host take nothing
    before = port_drops(host, VETHS[0])
    ns_run(ca, sys.executable, "-c", RA_SENDER)
    time.sleep(0.3)
    assert port_drops(host, VETHS[0]) >= before + 3
    for where in (cb, host):
        seen = ns_run(where, "ip", "-6", "route").stdout + ns_run(where, "ip", "-6", "addr").stdout
        assert "2001:db8:66" not in seen, (where, seen)
    assert "default via fe80::1:" in ns_run(cb, "ip", "-6", "route").stdout
    assert len(ns_run(cb, "ip", "-6", "route", "show", "default").stdout.splitlines()) == 1, "no second router"


def test_bridge_containers_reach_another_hosts_containers_through_a_router_with_their_own_addresses(netns_factory):
    router = netns_factory("vpc6r")
    ns_run(router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    hosts = []
    for name, v4, v6, block in (("a", "192.0.2", "fd77:a:", BLOCK), ("b", "198.51.100", "fd77:b:", "fd00:77:4:0:2::")):
        ns = make_host(netns_factory, v4, v6)
        run(["ip", "-n", ns, "link", "set", "uplink0p", "netns", router, "name", f"r{name}"])
        run(["ip", "-n", router, "-6", "addr", "add", f"{v6}:1/64", "dev", f"r{name}", "nodad"])
        run(["ip", "-n", router, "link", "set", f"r{name}", "up"])
        run(["ip", "-n", router, "-6", "route", "add", f"{block}/80", "via", f"{v6}:10"])   # the VPC's route
        hosts.append((ns, block))
    (ha, block_a), (hb, block_b) = hosts
    _, _, _, ca, _ = two_containers(ha, netns_factory, block_a, "10.77.3")
    _, _, _, _, cb = two_containers(hb, netns_factory, block_b, "10.77.4")
    ns_run(router, "ip6tables", "-I", "FORWARD", "-s", f"{block_a}2/128", "-d", f"{block_b}3/128",
           "-p", "ipv6-icmp", "-j", "ACCEPT")
    assert any(ping6(ca, f"{block_b}3") for _ in range(3)), "the first may wait for neighbour discovery"
    assert ping6(cb, f"{block_a}2")
    seen = ns_run(router, "ip6tables", "-L", "FORWARD", "-v", "-x", "-n").stdout.splitlines()[2]
    assert int(seen.split()[0]) > 0, "the router forwarded plain IPv6 from container a's own address"


NA_SENDER = r"""
import socket, struct, sys
# unsolicited neighbour advertisements (type 136, Override) for each target named, with this link's MAC as
# the target's link-layer address, to all nodes: what a hostile container sends to take others' traffic
mac = open("/sys/class/net/eth0/address").read().strip()
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)       # the sender's own cache: untouched
for target in sys.argv[1:]:
    option = struct.pack("!BB", 2, 1) + bytes.fromhex(mac.replace(":", ""))
    na = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + socket.inet_pton(socket.AF_INET6, target) + option
    for _ in range(3):
        s.sendto(na, ("ff02::1", 0, 0, socket.if_nametoindex("eth0")))
"""


NA_SNIFFER = r"""
import socket, sys, time
# the targets of the neighbour advertisements this namespace receives for a while
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.settimeout(0.1)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        data = s.recv(2048)
    except socket.timeout:
        continue
    if data[0] == 136:
        print(socket.inet_ntop(socket.AF_INET6, data[8:24]), flush=True)
"""


def advertisements_seen(receiver: str, sender: str, targets: list[str]) -> list[str]:
    """The targets of the neighbour advertisements `receiver` got while `sender` advertised `targets`."""
    proc = subprocess.Popen(["ip", "netns", "exec", receiver, sys.executable, "-c", NA_SNIFFER, "2"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        ns_run(sender, sys.executable, "-c", NA_SENDER, *targets)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return out.split()


def lladdr(ns: str, address: str, dev: str) -> str:
    shown = ns_run(ns, "ip", "-6", "neigh", "show", address, "dev", dev).stdout.split()
    return shown[shown.index("lladdr") + 1] if "lladdr" in shown else ""


def test_a_bridge_container_cannot_advertise_the_gateway_or_a_neighbours_address(netns_factory):
    """On a bridge, a forged neighbour advertisement would take traffic from everyone: one for the gateway
    (sent from the container's own link-local address, which the ip6tables guard alone let through) points
    every container's gateway at it, one for a neighbour's address points the host's traffic for that
    neighbour at it. The port's filter lets a container advertise only its own addresses."""
    host = make_host(netns_factory)
    _dp, s, _wanted, ca, cb = two_containers(host, netns_factory)
    gateway = link_gateway(s.bridge)
    assert ping6(cb, UPLINK) and ping6(ca, B)                      # b resolves its gateway
    ping6(host, B)                                                 # the host resolves b on the bridge
    gateway_mac = ns_run(host, "cat", f"/sys/class/net/{s.bridge}/address").stdout.strip()
    mac_a, mac_b = mac_for("10.77.3.2"), mac_for("10.77.3.3")
    assert lladdr(cb, gateway, "eth0") == gateway_mac and lladdr(host, B, s.bridge) == mac_b
    before = port_drops(host, VETHS[0])
    seen = advertisements_seen(cb, ca, [gateway, B, A])
    assert port_drops(host, VETHS[0]) >= before + 6, "a's port dropped both forged kinds"
    assert gateway not in seen and B not in seen, f"b received forged advertisements: {seen}"
    assert seen.count(A) == 3, f"a's advertisements of its own address reach b: {seen}"
    assert lladdr(cb, gateway, "eth0") == gateway_mac, "b's gateway now points at a"
    assert lladdr(host, B, s.bridge) == mac_b, "the host's traffic for b now goes to a"
    assert lladdr(host, A, s.bridge) in ("", mac_a)
    assert ping6(cb, A) and ping6(ca, B) and ping6(cb, UPLINK)


def test_the_repair_pass_puts_the_bridges_ipv6_back(netns_factory):
    host = make_host(netns_factory)
    dp, s, _wanted, ca, _cb = two_containers(host, netns_factory)
    gateway = f"{link_gateway(s.bridge)}/64"
    endpoints = [EndpointSpec(VETHS[i], veth_names(e)[1], mac_for(f"10.77.3.{i + 2}"), f"10.77.3.{i + 2}")
                 for i, e in enumerate(EIDS)]
    assert dp.repair([(s, endpoints)]) == []           # all in place: nothing to do, the bridge's IPv6 left on
    assert ping6(ca, B)
    # drift: the block's route and the gateway go, b's port filter loses its IPv6 half (as an older one
    # would be), a sysctl is turned back
    run(["ip", "-n", host, "-6", "route", "del", f"{BLOCK}/80"])
    run(["ip", "-n", host, "-6", "addr", "del", gateway, "dev", s.bridge])
    with Netlink(host).ipr() as ipr:
        index_b = Netlink.link_index(ipr, VETHS[1])
    dp.tc.attach_guard(index_b, GuardFacts(mac_for("10.77.3.3"), "10.77.3.3"))
    assert not ping6(ca, B)
    repairs = dp.repair([(s, endpoints)])
    whats = " | ".join(r.what for r in repairs)
    assert f"route {BLOCK}/80 dev {s.bridge} missing" in whats, repairs
    assert f"anti-spoofing filter for 10.77.3.3 on {VETHS[1]} missing or out of date" in whats, repairs
    assert dp.tc.guard_facts(index_b) == GuardFacts(mac_for("10.77.3.3"), "10.77.3.3", B)
    assert any(ping6(ca, B) for _ in range(3))
    ns_run(host, "sysctl", "-qw", f"net.ipv6.conf.{s.bridge}.accept_ra=1")
    repairs = dp.repair([(s, endpoints)])
    assert [r.what for r in repairs] == [f"IPv6 settings of {s.bridge}: accept_ra=1"], repairs
    assert gateway in ns_run(host, "ip", "-6", "addr", "show", "dev", s.bridge).stdout
    assert dp.repair([(s, endpoints)]) == []
    # the whole bridge deleted: made again, with its IPv6, and the ports put back on it
    run(["ip", "-n", host, "link", "del", s.bridge])
    assert dp.repair([(s, endpoints)])
    assert f"{BLOCK}/80 dev {s.bridge}" in ns_run(host, "ip", "-6", "route").stdout
    assert any(ping6(ca, B) for _ in range(3))
    assert dp.repair([(s, endpoints)]) == []


def test_a_bridge_endpoint_leaving_takes_its_rule_with_it(netns_factory):
    """Docker releases a running container's IPv6 address when the container turns IPv6 off by sysctl (the
    row forgets it): its port's filter lets no IPv6 through from then on. The last bridge-mode IPv6 endpoint
    going takes the guard's bridge rules with it."""
    host = make_host(netns_factory)
    dp, _s, wanted, ca, cb = two_containers(host, netns_factory)
    assert ping6(ca, B)
    wanted.pop(0)
    dp.drop_endpoint_ipv6(VETHS[0], A)
    with Netlink(host).ipr() as ipr:
        index_a = Netlink.link_index(ipr, VETHS[0])
    assert dp.tc.guard_facts(index_a) == GuardFacts(mac_for("10.77.3.2"), "10.77.3.2"), "no IPv6 half left"
    assert not ping6(ca, B), "a can no longer send from its former address"
    assert BRIDGE_RULE in ns_run(host, "ip6tables-save", "-t", "raw").stdout, "b still has IPv6"
    wanted.pop(0)
    dp.delete_endpoint(VETHS[1])
    assert BRIDGE_RULE not in ns_run(host, "ip6tables-save", "-t", "raw").stdout, "no bridge-mode IPv6 left"



def test_the_guard_is_written_from_rows_read_under_the_host_lock(netns_factory):
    """The guard's bridge rules follow the rows (whether bridge-mode IPv6 endpoints exist): two workers
    writing it at once must not let the one that read the rows first write last, so the rows are read, and
    the guard written, under one host lock."""
    host = make_host(netns_factory)
    dp = Dataplane(netns=host)
    s = spec()
    held, reads = [], []

    @contextmanager
    def lock():
        held.append(True)
        try:
            yield
        finally:
            held.pop()

    def rows():
        reads.append(bool(held))
        return [Ipv6Endpoint(VETHS[0], A, s.bridge)]

    dp.ipv6_guard_lock = lock
    dp.ipv6_endpoints = rows
    dp.ensure_network(s)
    container(host, dp, s, netns_factory, "10.77.3.2", A, EIDS[0])
    dp.ensure_endpoint_ipv6(s, VETHS[0], A)
    assert reads and all(reads), reads
    assert BRIDGE_RULE in ns_run(host, "ip6tables-save", "-t", "raw").stdout


def test_without_br_netfilter_a_dual_stack_bridge_network_is_refused_clearly(netns_factory, monkeypatch):
    """The per-port rules see a bridge's IPv6 only through br_netfilter: without the module (no
    /proc/sys/net/bridge), the network is refused, naming it, rather than made without its guard."""
    from vpcnet.errors import DataplaneError

    host = make_host(netns_factory)
    dp = Dataplane(netns=host)
    real = dp.nl.read_sysctl

    def read(key: str) -> str:
        if key.startswith("net.bridge."):
            raise DataplaneError(f"cannot read {key}: [Errno 2] No such file or directory")
        return real(key)

    monkeypatch.setattr(dp.nl, "read_sysctl", read)
    with pytest.raises(DataplaneError, match="IPv6 in bridge mode needs the br_netfilter module"):
        dp.ensure_network(spec())
    assert "inet6 fe80::1:" not in ns_run(host, "ip", "-6", "addr").stdout
