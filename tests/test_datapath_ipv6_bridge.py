"""Bridge mode's IPv6 datapath (vpcnet.datapath.ipv6: `ensure_bridge`, `bridge_rules`) against the real kernel,
in namespaces the tests make: containers on one bridge resolve and reach each other directly, other hosts
through a router, send only from their own address, cannot give each other a router advertisement; the
repair pass puts the bridge's IPv6 back."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import pytest
from conftest import run
from test_datapath_ipv6 import RA_SENDER, guard_drops, ns_run, ping6

from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.ipv6 import GATEWAY, Ipv6Endpoint
from vpcnet.datapath.spec import EndpointSpec, NetworkSpec, bridge_name, mac_for, veth_names

pytestmark = pytest.mark.root
TAG = "d1e2f3a4b5c6"
BLOCK = "fd00:77:3:0:2::"          # this host's /80 block
A, B, C = f"{BLOCK}2", f"{BLOCK}3", f"{BLOCK}4"
EIDS = ("a" * 64, "b" * 64)
VETHS = [veth_names(e)[0] for e in EIDS]


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
    run(["ip", "-n", sandbox, "-6", "route", "add", "default", "via", GATEWAY, "dev", "eth0"])
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
    assert ping6(ca, GATEWAY + "%eth0"), "the gateway answers on the bridge"
    shown = ns_run(host, "ip", "-6", "addr", "show", "dev", s.bridge).stdout
    assert "fe80::1/64" in shown and "nodad" in shown, shown
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
    before = guard_drops(host)
    assert not ping6(ca, B, source=C)
    assert guard_drops(host) > before
    assert not ping6(ca, "fd77:a::1", source=C), "nor towards the gateway and out"
    assert ping6(ca, B) and ping6(cb, A), "their own addresses still pass"
    # a router advertisement from a, to all nodes on the bridge: b (accept_ra=1) and the host take nothing
    before = guard_drops(host)
    ns_run(ca, sys.executable, "-c", RA_SENDER)
    time.sleep(0.3)
    assert guard_drops(host) >= before + 3
    for where in (cb, host):
        seen = ns_run(where, "ip", "-6", "route").stdout + ns_run(where, "ip", "-6", "addr").stdout
        assert "2001:db8:66" not in seen, (where, seen)
    assert "default via fe80::1" in ns_run(cb, "ip", "-6", "route").stdout
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


def test_the_repair_pass_puts_the_bridges_ipv6_back(netns_factory):
    host = make_host(netns_factory)
    dp, s, _wanted, ca, _cb = two_containers(host, netns_factory)
    endpoints = [EndpointSpec(VETHS[i], veth_names(e)[1], mac_for(f"10.77.3.{i + 2}"), f"10.77.3.{i + 2}")
                 for i, e in enumerate(EIDS)]
    assert dp.repair([(s, endpoints)]) == []           # all in place: nothing to do, the bridge's IPv6 left on
    assert ping6(ca, B)
    # drift: the block's route and the gateway go, b's rule goes from the guard, a sysctl is turned back
    run(["ip", "-n", host, "-6", "route", "del", f"{BLOCK}/80"])
    run(["ip", "-n", host, "-6", "addr", "del", "fe80::1/64", "dev", s.bridge])
    rules = ns_run(host, "ip6tables", "-t", "raw", "-S", "VPCNET-IPV6").stdout.splitlines()[1:]   # after -N
    number = next(i for i, r in enumerate(rules, 1) if f"--physdev-in {VETHS[1]}" in r)
    ns_run(host, "ip6tables", "-t", "raw", "-D", "VPCNET-IPV6", str(number))
    assert not ping6(ca, B)
    repairs = dp.repair([(s, endpoints)])
    whats = " | ".join(r.what for r in repairs)
    assert f"route {BLOCK}/80 dev {s.bridge} missing" in whats and "VPCNET-IPV6" in whats, repairs
    assert any(ping6(ca, B) for _ in range(3))
    ns_run(host, "sysctl", "-qw", f"net.ipv6.conf.{s.bridge}.accept_ra=1")
    repairs = dp.repair([(s, endpoints)])
    assert [r.what for r in repairs] == [f"IPv6 settings of {s.bridge}: accept_ra=1"], repairs
    assert "fe80::1/64" in ns_run(host, "ip", "-6", "addr", "show", "dev", s.bridge).stdout
    assert dp.repair([(s, endpoints)]) == []
    # the whole bridge deleted: made again, with its IPv6, and the ports put back on it
    run(["ip", "-n", host, "link", "del", s.bridge])
    assert dp.repair([(s, endpoints)])
    assert f"{BLOCK}/80 dev {s.bridge}" in ns_run(host, "ip", "-6", "route").stdout
    assert any(ping6(ca, B) for _ in range(3))
    assert dp.repair([(s, endpoints)]) == []


def test_a_bridge_endpoint_leaving_takes_its_rule_with_it(netns_factory):
    """Docker releases a running container's IPv6 address when the container turns IPv6 off by sysctl (the
    row forgets it), or the endpoint goes: the guard is written without the port's rule at once."""
    host = make_host(netns_factory)
    dp, _s, wanted, ca, cb = two_containers(host, netns_factory)
    assert ping6(ca, B)
    wanted.pop(0)
    dp.drop_endpoint_ipv6(VETHS[0], A)
    assert f"--physdev-in {VETHS[0]}" not in ns_run(host, "ip6tables-save", "-t", "raw").stdout
    assert not ping6(ca, B), "a can no longer send from its former address"
    wanted.pop(0)
    dp.delete_endpoint(VETHS[1])
    assert "--physdev-in" not in ns_run(host, "ip6tables-save", "-t", "raw").stdout



def test_the_guard_is_written_from_rows_read_under_the_host_lock(netns_factory):
    """The guard names each bridge-mode endpoint: two workers writing it at once must not let the one that
    read the rows first write last, so the rows are read, and the guard written, under one host lock."""
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
    assert f"--physdev-in {VETHS[0]}" in ns_run(host, "ip6tables-save", "-t", "raw").stdout


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
    assert "inet6 fe80::1/64" not in ns_run(host, "ip", "-6", "addr").stdout
