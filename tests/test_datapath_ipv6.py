"""The routed modes' IPv6 datapath (vpcnet.datapath.ipv6) against the real kernel, in namespaces the tests make:
containers with a /128 and their host veth's link-local gateway reach each other through the host, send only
from their own address, and never give the host a router advertisement; the repair pass keeps it so. The ebpf
fast path over IPv6 (vpcnet.datapath.ebpf.programs6): two hosts through a router namespace, what takes it and what falls
back to the stack, and peer counting of IPv6."""
from __future__ import annotations

import ipaddress
import shutil
import sys

import pytest
from conftest import require, run, wait_for

from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.ipv6 import Ipv6Endpoint, link_gateway
from vpcnet.datapath.spec import EndpointSpec, NetworkSpec, bridge_name, mac_for, veth_names

pytestmark = pytest.mark.root
TAG = "c1d2e3f4a5b6"
BLOCK = "fd00:77:3:0:1::"          # this host's /80 block (the addresses below are inside it)
A, B, C = f"{BLOCK}2", f"{BLOCK}3", f"{BLOCK}4"


def spec(mode: str) -> NetworkSpec:
    return NetworkSpec(tag=TAG, bridge=bridge_name(TAG + "0" * 52), gateway="10.77.3.1", host_cidr="10.77.3.0/24",
                       cluster_cidr="10.77.0.0/16", mtu=1500, mode=mode)


def ns_run(ns: str, *cmd: str, check: bool = True):
    return run(["ip", "netns", "exec", ns, *cmd], check=check)


def ping6(ns: str, target: str, source: str = "") -> bool:
    extra = ["-I", source] if source else []
    return ns_run(ns, "busybox", "ping", "-6", "-c1", "-W2", *extra, target, check=False).returncode == 0


@pytest.fixture
def host(netns_factory):
    """A simulated host with an uplink holding the default routes (both families)."""
    ns = netns_factory("vpc6h")
    run(["ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p"])
    run(["ip", "-n", ns, "addr", "add", "192.0.2.10/24", "dev", "uplink0"])
    run(["ip", "-n", ns, "link", "set", "uplink0p", "up"])
    run(["ip", "-n", ns, "link", "set", "uplink0", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", "192.0.2.1"])
    return ns


def container(host: str, dp: Dataplane, netspec: NetworkSpec, netns_factory, ip4: str, ip6: str, eid: str) -> str:
    """What Docker does at Join for a dual-stack endpoint: the container end into a sandbox as eth0, the
    IPv4 address with the pool prefix, the IPv6 one as the /128 vpcnet's IPAM answers, and the default
    routes Join's Gateway and GatewayIPv6 give."""
    sandbox = netns_factory("vpc6c")
    host_veth, peer = veth_names(eid)
    dp.ensure_endpoint(netspec, host_veth, peer, mac_for(ip4), ip4)
    run(["ip", "-n", host, "link", "set", peer, "netns", sandbox])
    run(["ip", "-n", sandbox, "link", "set", peer, "name", "eth0"])
    ns_run(sandbox, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0")
    run(["ip", "-n", sandbox, "addr", "add", f"{ip4}/24", "dev", "eth0"])
    run(["ip", "-n", sandbox, "-6", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad"])
    run(["ip", "-n", sandbox, "link", "set", "eth0", "up"])
    run(["ip", "-n", sandbox, "route", "add", "default", "via", netspec.gateway])
    run(["ip", "-n", sandbox, "-6", "route", "add", "default", "via", link_gateway(host_veth), "dev", "eth0"])
    return sandbox


def guard_drops(host: str) -> int:
    out = ns_run(host, "ip6tables", "-t", "raw", "-L", "VPCNET-IPV6", "-v", "-x", "-n").stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if "DROP" in line)


def port_drops(host: str, veth: str) -> int:
    """What the tc filters on `veth`'s ingress dropped (bridge mode's anti-spoofing guard: the clsact qdisc
    counts its TC_ACT_SHOT verdicts)."""
    out = ns_run(host, "tc", "-s", "qdisc", "show", "dev", veth).stdout
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("qdisc clsact"))
    return int(lines[at + 1].split("dropped ")[1].split(",")[0])


RA_SENDER = r"""
import socket, struct, sys
# a router advertisement (type 134) with a prefix information option for 2001:db8:66::/64 (on-link,
# autonomous), to all nodes: what a hostile container sends to configure the host
prefix = socket.inet_pton(socket.AF_INET6, "2001:db8:66::")
pio = struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + prefix
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + pio
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
s.setsockopt(socket.SOL_SOCKET, 25, b"eth0")
for _ in range(3):
    s.sendto(ra, ("ff02::1", 0, 0, socket.if_nametoindex("eth0")))
"""


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_two_containers_reach_each_other_over_ipv6_through_the_host(host, netns_factory, mode):
    dp = Dataplane(netns=host)
    if mode == "ebpf" and not dp.features().supports("ebpf"):
        pytest.skip(f"this kernel cannot do ebpf mode: {dp.features().why_not('ebpf')}")
    wanted: list[Ipv6Endpoint] = []
    dp.ipv6_endpoints = lambda: list(wanted)           # the store's rows, as the driver will hand them
    s = spec(mode)
    dp.ensure_network(s)
    eids = ("a" * 64, "b" * 64)
    wanted += [Ipv6Endpoint(veth_names(eids[0])[0], A), Ipv6Endpoint(veth_names(eids[1])[0], B)]
    ca = container(host, dp, s, netns_factory, "10.77.3.2", A, eids[0])
    cb = container(host, dp, s, netns_factory, "10.77.3.3", B, eids[1])
    for eid, address in zip(eids, (A, B), strict=True):
        dp.ensure_endpoint_ipv6(s, veth_names(eid)[0], address)
    ns_run(host, "ip6tables", "-P", "FORWARD", "DROP")         # as Docker 27+ sets it with IPv6 on
    assert ns_run(host, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    assert ping6(ca, B) and ping6(cb, A)
    routes = ns_run(host, "ip", "-6", "route").stdout
    assert f"{A} dev {veth_names(eids[0])[0]}" in routes and f"{B} dev {veth_names(eids[1])[0]}" in routes
    veth_a = veth_names(eids[0])[0]
    assert f"{link_gateway(veth_a)}/64" in ns_run(host, "ip", "-6", "addr", "show", "dev", veth_a).stdout
    # IPv4 still as before
    assert ns_run(ca, "busybox", "ping", "-c1", "-W2", "10.77.3.3", check=False).returncode == 0


def test_a_container_sends_ipv6_only_from_its_own_address_and_its_advertisements_never_reach_the_host(
        host, netns_factory):
    dp = Dataplane(netns=host)
    eids = ("a" * 64, "b" * 64)
    dp.ipv6_endpoints = lambda: [Ipv6Endpoint(veth_names(eids[0])[0], A), Ipv6Endpoint(veth_names(eids[1])[0], B)]
    s = spec("routed")
    dp.ensure_network(s)
    ca = container(host, dp, s, netns_factory, "10.77.3.2", A, eids[0])
    cb = container(host, dp, s, netns_factory, "10.77.3.3", B, eids[1])
    for eid, address in zip(eids, (A, B), strict=True):
        dp.ensure_endpoint_ipv6(s, veth_names(eid)[0], address)
    assert ping6(ca, B)
    # spoofing: container a takes a third address of the block (nobody's) and sends from it
    run(["ip", "-n", ca, "-6", "addr", "add", f"{C}/128", "dev", "eth0", "nodad"])
    before = guard_drops(host)
    assert not ping6(ca, B, source=C)
    assert guard_drops(host) > before
    assert ping6(cb, A) and ping6(ca, B)               # their own addresses still pass
    # a router advertisement from a container: dropped before ndisc, the host learns nothing
    before = guard_drops(host)
    ns_run(ca, sys.executable, "-c", RA_SENDER)
    assert guard_drops(host) >= before + 3
    host_routes = ns_run(host, "ip", "-6", "route").stdout + ns_run(host, "ip", "-6", "addr").stdout
    assert "2001:db8:66" not in host_routes and "default" not in ns_run(host, "ip", "-6", "route").stdout
    veth = veth_names(eids[0])[0]
    assert ns_run(host, "sysctl", "-n", f"net.ipv6.conf.{veth}.accept_ra").stdout.strip() == "0"


def test_only_the_uplinks_and_vpcnet_containers_reach_an_ipv6_container(host, netns_factory):
    """The IPv4 isolation's ingress half, for IPv6: a neighbour behind another link of the host (a Docker
    bridge network, a VPN) does not reach a vpcnet container; one behind the uplink does."""
    dp = Dataplane(netns=host)
    eid = "a" * 64
    dp.ipv6_endpoints = lambda: [Ipv6Endpoint(veth_names(eid)[0], A)]
    s = spec("routed")
    dp.ensure_network(s)
    ca = container(host, dp, s, netns_factory, "10.77.3.2", A, eid)
    dp.ensure_endpoint_ipv6(s, veth_names(eid)[0], A)
    for link, prefix in (("uplink0", "fd55"), ("other0", "fd66")):
        far = netns_factory("vpc6f")
        if link == "other0":
            run(["ip", "-n", host, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", far])
        else:
            run(["ip", "-n", host, "link", "set", "uplink0p", "netns", far, "name", "eth0"])
        run(["ip", "-n", host, "-6", "addr", "add", f"{prefix}::1/64", "dev", link, "nodad"])
        run(["ip", "-n", host, "link", "set", link, "up"])
        run(["ip", "-n", far, "-6", "addr", "add", f"{prefix}::2/64", "dev", "eth0", "nodad"])
        run(["ip", "-n", far, "link", "set", "eth0", "up"])
        run(["ip", "-n", far, "-6", "route", "add", "default", "via", f"{prefix}::1"])
        reached = any(ping6(far, A) for _ in range(3))       # the first may wait for neighbour discovery
        assert reached == (link == "uplink0"), link
    assert ping6(ca, "fd66::2"), "the container itself may still open a connection there (the reply is let in)"


def test_the_repair_pass_keeps_ipv6_endpoints_as_wanted(host, netns_factory):
    dp = Dataplane(netns=host)
    eids = ("a" * 64, "b" * 64)
    veths = [veth_names(e)[0] for e in eids]
    dp.ipv6_endpoints = lambda: [Ipv6Endpoint(veths[0], A), Ipv6Endpoint(veths[1], B)]
    s = spec("routed")
    dp.ensure_network(s)
    ca = container(host, dp, s, netns_factory, "10.77.3.2", A, eids[0])
    container(host, dp, s, netns_factory, "10.77.3.3", B, eids[1])
    for veth, address in zip(veths, (A, B), strict=True):
        dp.ensure_endpoint_ipv6(s, veth, address)
    endpoints = [EndpointSpec(veths[i], veth_names(e)[1], mac_for(f"10.77.3.{i + 2}"), f"10.77.3.{i + 2}")
                 for i, e in enumerate(eids)]
    assert dp.repair([(s, endpoints)]) == []           # all in place: nothing to do, IPv6 left on
    assert ping6(ca, B)
    # drift: b's /128 route goes, the guard is flushed
    run(["ip", "-n", host, "-6", "route", "del", f"{B}/128"])
    ns_run(host, "ip6tables", "-t", "raw", "-F", "VPCNET-IPV6")
    ns_run(host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
    repairs = dp.repair([(s, endpoints)])
    kinds = sorted({r.kind for r in repairs})
    assert kinds == ["firewall", "route"], repairs
    assert any("IPv6 forwarding" in r.what for r in repairs), repairs
    assert ping6(ca, B)
    assert dp.repair([(s, endpoints)]) == []


def test_an_endpoint_that_loses_its_ipv6_address_can_no_longer_use_it_at_once(host, netns_factory):
    """Docker releases a running container's IPv6 address when the container turns IPv6 off by sysctl: no
    route may outlive the address it served, and the container can no longer send from it (the guard's
    reverse-path check goes with the route)."""
    dp = Dataplane(netns=host)
    eids = ("a" * 64, "b" * 64)
    veths = [veth_names(e)[0] for e in eids]
    wanted = [Ipv6Endpoint(veths[0], A), Ipv6Endpoint(veths[1], B)]
    dp.ipv6_endpoints = lambda: list(wanted)
    s = spec("routed")
    dp.ensure_network(s)
    ca = container(host, dp, s, netns_factory, "10.77.3.2", A, eids[0])
    cb = container(host, dp, s, netns_factory, "10.77.3.3", B, eids[1])
    for veth, address in zip(veths, (A, B), strict=True):
        dp.ensure_endpoint_ipv6(s, veth, address)
    assert ping6(ca, B) and f"{A} dev {veths[0]}" in ns_run(host, "ip", "-6", "route").stdout
    wanted.pop(0)                                      # the store forgot it (vpcnet.docker.ipam)
    dp.drop_endpoint_ipv6(veths[0], A)
    assert A not in ns_run(host, "ip", "-6", "route").stdout
    before = guard_drops(host)
    assert not ping6(ca, B), "a's packets from its former address are dropped on the way in"
    assert guard_drops(host) > before
    assert ping6(cb, "fd66::9") is False and B in ns_run(host, "ip", "-6", "route").stdout   # b is untouched
    dp.drop_endpoint_ipv6(veths[0], A)                 # again: nothing left to remove, no error


def test_a_bridge_network_without_an_ipv6_block_refuses_ipv6_endpoints_clearly(host):
    """Bridge mode's IPv6 is the bridge's (tests/test_datapath_ipv6_bridge.py): a network made without one."""
    dp = Dataplane(netns=host)
    s = spec("bridge")
    dp.ensure_network(s)
    from vpcnet.errors import DataplaneError
    with pytest.raises(DataplaneError, match="has no IPv6 block: bridge mode carries IPv6 only on networks created "
                                             "with --ipv6"):
        dp.ensure_endpoint_ipv6(s, "vhnone", A)


def test_ipv6_endpoint_values_are_checked():
    with pytest.raises(ValueError, match="not an IPv6 address"):
        Ipv6Endpoint("vhx", "10.0.0.1")


# -- two hosts through the emulated VPC -----------------------------------------------------------------
KEY_ID, SECRET, TABLE = "v6-key", "v6-S3cret-never-logged", "vtb-v6x0001"
CLUSTER6 = "fd00:6e:1::/48"


def test_two_hosts_ipv6_containers_reach_each_other_through_the_vpc_router_unencapsulated(netns_factory, tmp_path):
    """Each host claims an IPv6 /80 through the aliyun provider from the emulator over HTTP; the emulator
    routes each block via its host's IPv6 underlay address in a real router namespace; a container on
    host A reaches one on host B, and the router forwards plain IPv6 with the containers' own addresses."""
    from aliyun_fakes import closed_port, serving_emulator

    from vpcnet.config import Config
    from vpcnet.routes.backoff import Backoff
    from vpcnet.routes.keeper import RouteKeeper
    from vpcnet.state.store import Store

    router = netns_factory("vpc6r")
    ns_run(router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1")
    hosts = {}
    for name, v4, v6 in (("a", "192.0.2", "fd77:a:"), ("b", "198.51.100", "fd77:b:")):
        ns = netns_factory(f"vpc6{name}")
        run(["ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", f"r{name}", "netns", router])
        run(["ip", "-n", ns, "addr", "add", f"{v4}.10/24", "dev", "uplink0"])
        run(["ip", "-n", ns, "-6", "addr", "add", f"{v6}:10/64", "dev", "uplink0", "nodad"])
        run(["ip", "-n", router, "addr", "add", f"{v4}.1/24", "dev", f"r{name}"])
        run(["ip", "-n", router, "-6", "addr", "add", f"{v6}:1/64", "dev", f"r{name}", "nodad"])
        for where, link in ((ns, "uplink0"), (router, f"r{name}")):
            run(["ip", "-n", where, "link", "set", link, "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", f"{v4}.1"])
        run(["ip", "-n", ns, "-6", "route", "add", "default", "via", f"{v6}:1"])
        hosts[name] = (ns, f"i-v6{name}", f"{v4}.10", f"{v6}:10")
    made = []
    with serving_emulator({}, route_table_id=TABLE, credentials={KEY_ID: SECRET}, router_netns=router) as emu:
        try:
            containers = {}
            for name, (ns, instance, ip4, ip6) in hosts.items():
                emu.register_instance(instance, ip4, ip6)
                config = Config(provider="aliyun", state_dir=str(tmp_path / name), cluster_cidr="10.77.0.0/16",
                                cluster_cidr_v6=CLUSTER6, aliyun_endpoint=emu.test_url, aliyun_region_id="cn-emu-1",
                                aliyun_route_table_id=TABLE, aliyun_vpc_id="vpc-emu0001", aliyun_instance_id=instance,
                                aliyun_access_key_id=KEY_ID, aliyun_access_key_secret=SECRET,
                                aliyun_metadata_url=f"http://127.0.0.1:{closed_port()}")
                store = Store(config.db_path)
                keeper = RouteKeeper(config, store, backoff=Backoff(attempts=5, base=0.01, cap=0.1, deadline=10))
                made.append((keeper, store))
                store.want_claim(CLUSTER6, "asked")
                assert keeper.reconcile(wait_pending=5).ok
                block = store.claim(CLUSTER6).host_cidr
                address = str(ipaddress.IPv6Network(block).network_address + 2)
                dp = Dataplane(netns=ns)
                eid = name * 64
                dp.ipv6_endpoints = (lambda e=eid, a=address: [Ipv6Endpoint(veth_names(e)[0], a)])
                s = spec("routed")
                dp.ensure_network(s)
                containers[name] = (container(ns, dp, s, netns_factory, "10.77.3.2", address, eid), address)
                dp.ensure_endpoint_ipv6(s, veth_names(eid)[0], address)
            (ca, addr_a), (cb, addr_b) = containers["a"], containers["b"]
            routes = lambda: ns_run(router, "ip", "-6", "route").stdout      # noqa: E731
            assert wait_for(lambda: all(f"via {ip6}" in routes() for _, _, _, ip6 in hosts.values()), 10), routes()
            ns_run(router, "ip6tables", "-I", "FORWARD", "-s", f"{addr_a}/128", "-d", f"{addr_b}/128",
                   "-p", "ipv6-icmp", "-j", "ACCEPT")
            # the first packets wait for neighbour discovery on links just made: allow it a few seconds
            assert wait_for(lambda: ping6(ca, addr_b), 15) and ping6(cb, addr_a)
            seen = ns_run(router, "ip6tables", "-L", "FORWARD", "-v", "-x", "-n").stdout.splitlines()[2]
            assert int(seen.split()[0]) > 0, "the router forwarded IPv6 from container a's own address"
        finally:
            for keeper, store in made:
                keeper.close()
                store.close()


# -- the ebpf fast path over IPv6 (vpcnet.datapath.ebpf.programs6) ------------------------------------------
CLUSTER6_FAST = "fd00:77::/32"


def counters6(ns: str, chain: str = "FORWARD") -> dict[str, int]:
    """Packets per rule comment in ip6tables' filter `chain` (the counting rules the test adds)."""
    out = {}
    for line in ns_run(ns, "ip6tables", "-L", chain, "-v", "-n", "-x").stdout.splitlines()[2:]:
        if "/* " in line:
            out[line.split("/* ")[1].split(" */")[0]] = int(line.split()[0])
    return out


def count6(ns: str, *flows: tuple[str, str]) -> None:
    for src, dst in flows:
        ns_run(ns, "ip6tables", "-I", "FORWARD", "1", "-s", src, "-d", dst, "-m", "comment", "--comment",
               f"{src}>{dst}")


A1, A2, B1 = "fd00:77:3:0:1::2", "fd00:77:3:0:1::3", "fd00:77:4:0:1::2"


def two_hosts6(netns_factory, mode: str, peers: bool = False):
    """Two hosts whose uplinks meet in a router namespace routing each host's IPv4 and IPv6 blocks to it (as
    the VPC does), a dual-stack network of `mode` on each, containers A1 and A2 on host a, B1 on host b.
    Returns (hosts, specs, dataplanes, {IPv6 address: container netns}, the wanted IPv6 endpoints, router)."""
    router = netns_factory("vpc6r")
    ns_run(router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1")
    hosts, specs, dps = {}, {}, {}
    for name, v4, v6, k in (("a", "192.0.2", "fd77:a:", 3), ("b", "198.51.100", "fd77:b:", 4)):
        ns = netns_factory(f"vpc6{name}")
        run(["ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", f"r{name}", "netns", router])
        run(["ip", "-n", ns, "addr", "add", f"{v4}.10/24", "dev", "uplink0"])
        run(["ip", "-n", ns, "-6", "addr", "add", f"{v6}:10/64", "dev", "uplink0", "nodad"])
        run(["ip", "-n", router, "addr", "add", f"{v4}.1/24", "dev", f"r{name}"])
        run(["ip", "-n", router, "-6", "addr", "add", f"{v6}:1/64", "dev", f"r{name}", "nodad"])
        for where, link in ((ns, "uplink0"), (router, f"r{name}")):
            run(["ip", "-n", where, "link", "set", link, "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", f"{v4}.1"])
        run(["ip", "-n", ns, "-6", "route", "add", "default", "via", f"{v6}:1"])
        run(["ip", "-n", router, "route", "add", f"10.77.{k}.0/24", "via", f"{v4}.10"])
        run(["ip", "-n", router, "-6", "route", "add", f"fd00:77:{k}:0:1::/80", "via", f"{v6}:10"])
        specs[name] = NetworkSpec(tag=f"{name}1d2e3f4a5b6", bridge=bridge_name(f"{name}1d2e3f4a5b6" + "0" * 52),
                                  gateway=f"10.77.{k}.1", host_cidr=f"10.77.{k}.0/24", cluster_cidr="10.77.0.0/16",
                                  mtu=1500, mode=mode, host_cidr_v6=f"fd00:77:{k}:0:1::/80",
                                  cluster_cidr_v6=CLUSTER6_FAST)
        dps[name] = Dataplane(netns=ns, peers=peers)
        hosts[name] = ns
    if mode == "ebpf" and not dps["a"].features().supports("ebpf"):
        pytest.skip(f"this kernel cannot do ebpf mode: {dps['a'].features().why_not('ebpf')}")
    a1, a2, b1 = A1, A2, B1
    wanted = {"a": [Ipv6Endpoint(veth_names("a" * 64)[0], a1), Ipv6Endpoint(veth_names("c" * 64)[0], a2)],
              "b": [Ipv6Endpoint(veth_names("b" * 64)[0], b1)]}
    boxes = {}
    for name, ip4, ip6, eid in (("a", "10.77.3.2", a1, "a" * 64), ("a", "10.77.3.3", a2, "c" * 64),
                                ("b", "10.77.4.2", b1, "b" * 64)):
        dp = dps[name]
        dp.ipv6_endpoints = (lambda n=name: list(wanted[n]))
        dp.ensure_network(specs[name])
        boxes[ip6] = container(hosts[name], dp, specs[name], netns_factory, ip4, ip6, eid)
        dp.ensure_endpoint_ipv6(specs[name], veth_names(eid)[0], ip6)
    return hosts, specs, dps, boxes, wanted, router


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_ebpf_mode_carries_ipv6_past_the_hosts_stacks_on_one_host_and_across_a_router(netns_factory, mode):
    """Two hosts whose uplinks meet in a router namespace (which routes each host's IPv4 and IPv6 blocks to it,
    as the VPC does). In ebpf mode, IPv6 between containers (on one host and across the router) never
    passes either host's ip6tables FORWARD chain (the programs carry it: only packets sent before a
    neighbour was resolved take the stack), while the router sees every packet with the containers' own
    addresses; routed mode sends all of it through FORWARD. Hop limit 1 still gets time exceeded from each
    host (traceroute), fragments take the stack, a forged source and router advertisements meet the guard;
    the repair pass puts a lost program back; an IPv6 address that goes takes its program with it."""
    require(shutil.which("iperf3") is not None, "needs iperf3")
    from test_dataplane import tcp_transfer

    hosts, specs, dps, boxes, wanted, router = two_hosts6(netns_factory, mode)
    a, b = hosts["a"], hosts["b"]
    a1, a2, b1 = A1, A2, B1
    ca, ca2, cb = boxes[a1], boxes[a2], boxes[b1]
    veth_a = veth_names("a" * 64)[0]
    filters = lambda ns, dev: ns_run(ns, "tc", "filter", "show", "dev", dev, "ingress", check=False).stdout  # noqa: E731
    if mode == "ebpf":
        assert "vpcnet_ctr6" in filters(a, veth_a) and "vpcnet_ctr" in filters(a, veth_a).replace("vpcnet_ctr6", "")
        uplink = filters(a, "uplink0")
        assert f"vpcnet6-{specs['a'].tag}" in uplink and f"vpcnet-{specs['a'].tag}" in uplink, uplink
    else:
        assert "vpcnet" not in filters(a, "uplink0") and "vpcnet_ctr6" not in filters(a, veth_a)
    for ns in (a, b):
        ns_run(ns, "ip6tables", "-P", "FORWARD", "DROP")              # as Docker 27+ sets it with IPv6 on
        count6(ns, (a1, b1), (b1, a1), (a1, a2), (a2, a1))
    count6(router, (a1, b1))
    assert wait_for(lambda: ping6(ca, b1), 15) and ping6(cb, a1) and ping6(ca, a2) and ping6(ca2, a1)
    for client, server, address in ((ca, cb, b1), (cb, ca, a1), (ca, ca2, a2), (ca2, ca, a1)):
        assert tcp_transfer(client, server, address) > 1_000_000, (client, address)
    seen = {ns: counters6(ns) for ns in (a, b)}
    for ns in (a, b):
        flows = {k: v for k, v in seen[ns].items() if ns == a or b1 in k}
        if mode == "ebpf":     # only the packets sent before a neighbour was resolved
            assert max(flows.values()) <= 3, seen
        else:
            assert min(flows.values()) > 100, seen                   # every packet through FORWARD
    assert counters6(router)[f"{a1}>{b1}"] > 100, "the router saw the containers' own IPv6 addresses"

    # hop limit 1: each host's stack answers with time exceeded (host A, the router, host B, the container)
    trace = ns_run(ca, "busybox", "traceroute", "-6", "-n", "-q", "1", "-w", "2", "-m", "5", b1).stdout
    hops = [line.split()[1] for line in trace.splitlines()[1:] if line.strip()]
    assert hops == ["fd77:a::10", "fd77:a::1", "fd77:b::10", b1], trace
    # fragments (a 3000-byte echo over 1500-byte links: the container fragments it) take the stack
    before = counters6(a)[f"{a1}>{b1}"]
    assert ns_run(ca, "busybox", "ping", "-6", "-c2", "-W2", "-s", "3000", b1, check=False).returncode == 0
    assert counters6(a)[f"{a1}>{b1}"] >= before + 2, "2 echoes (reassembled by conntrack) through host A's FORWARD"
    # a forged source never takes the fast path: the stack's guard drops it
    run(["ip", "-n", ca, "-6", "addr", "add", "fd00:77:3:0:1::9/128", "dev", "eth0", "nodad"])
    before = guard_drops(a)
    assert not ping6(ca, b1, source="fd00:77:3:0:1::9")
    assert guard_drops(a) > before
    run(["ip", "-n", ca, "-6", "addr", "del", "fd00:77:3:0:1::9/128", "dev", "eth0"])
    # router advertisements go to the stack, whose guard drops them
    before = guard_drops(a)
    ns_run(ca, sys.executable, "-c", RA_SENDER)
    assert guard_drops(a) >= before + 3
    if mode != "ebpf":
        return
    # the repair pass: a veth's programs lost (its qdisc deleted) come back, IPv6's included
    endpoints = [EndpointSpec(veth_names(e)[0], veth_names(e)[1], mac_for(ip), ip)
                 for e, ip in (("a" * 64, "10.77.3.2"), ("c" * 64, "10.77.3.3"))]
    assert dps["a"].repair([(specs["a"], endpoints)]) == []
    ns_run(a, "tc", "qdisc", "del", "dev", veth_a, "clsact")
    assert [r.kind for r in dps["a"].repair([(specs["a"], endpoints)])] == ["tc"]
    assert "vpcnet_ctr6" in filters(a, veth_a)
    # ... and so does the network's IPv6 uplink program
    ns_run(a, "tc", "filter", "del", "dev", "uplink0", "ingress", "pref", str(0x7F05))
    repairs = dps["a"].repair([(specs["a"], endpoints)])      # the endpoints' programs are rebuilt with it
    assert {r.kind for r in repairs} == {"tc"} and "uplink programs" in repairs[0].what, repairs
    assert f"vpcnet6-{specs['a'].tag}" in filters(a, "uplink0") and ping6(ca, b1)
    # an IPv6 address that goes takes its program with it (the IPv4 one stays)
    wanted["a"].pop(0)
    dps["a"].drop_endpoint_ipv6(veth_a, a1)
    assert "vpcnet_ctr6" not in filters(a, veth_a) and "vpcnet_ctr" in filters(a, veth_a)
    assert ns_run(ca, "busybox", "ping", "-c1", "-W2", "10.77.4.2", check=False).returncode == 0
    # the network's programs, IPv6's included, go with it
    dps["a"].delete_network(specs["a"])
    assert "vpcnet" not in filters(a, "uplink0"), filters(a, "uplink0")


PAYLOAD = 100
FRAME6 = 14 + 40 + 8 + PAYLOAD          # skb->len at tc: Ethernet, IPv6, ICMPv6 echo, payload


def ping6_counted(ns: str, target: str, count: int) -> tuple[int, int]:
    """(echo requests sent, replies received), as ping counted them."""
    import re
    out = ns_run(ns, "busybox", "ping", "-6", "-q", "-A", "-c", str(count), "-W", "2", "-s", str(PAYLOAD),
                 target, check=False).stdout
    sent, received = re.search(r"(\d+) packets transmitted, (\d+) packets received", out).groups()
    assert int(sent) == count, out
    return int(sent), int(received)


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_ipv6_traffic_is_counted_per_peer_and_direction(netns_factory, mode):
    """Peer counting (VPCNET_PEER_METRICS) counts IPv6 as IPv4: per (endpoint address, direction, peer),
    a same-host peer, another host's container and outside the IPv6 cluster CIDR (all zero), in routed
    mode by the counting programs, in ebpf mode by the container, uplink and counting programs."""
    from vpcnet.datapath.ebpf import maps
    hosts, specs, dps, boxes, _wanted, _router = two_hosts6(netns_factory, mode, peers=True)
    maps.forget({A1, A2, B1})                          # a leftover of an earlier run on this kernel
    try:
        assert wait_for(lambda: ping6(boxes[A1], B1) and ping6(boxes[A1], A2) and ping6(boxes[A1], "fd77:b::10"), 15)
        maps.forget({A1})                               # from here on, every packet is counted exactly
        counted = {A2: ping6_counted(boxes[A1], A2, 3), B1: ping6_counted(boxes[A1], B1, 4),
                   None: ping6_counted(boxes[A1], "fd77:b::10", 5)}
        got = {(d, peer): v for (ep, d, peer), v in maps.read_all().items() if ep == A1}
        for peer, (sent, received) in counted.items():
            assert got[(maps.TRANSMIT, peer)] == (sent * FRAME6, sent), (peer, got)
            assert got[(maps.RECEIVE, peer)] == (received * FRAME6, received), (peer, got)
        assert set(got) == {(d, p) for d in (maps.TRANSMIT, maps.RECEIVE) for p in (A2, B1, None)}, got
    finally:
        for name in ("a", "b"):
            dps[name].delete_network(specs[name])
        maps.forget({A1, A2, B1})


# A managed plugin's view, in a private mount and network namespace: /proc/sys read-only (Docker mounts it
# so), /run a tmpfs, and (`mounted`) the namespace's /proc/sys/net bound read-write at HOST_SYS_NET, as
# plugin/config.json's host-sys-net mount does.
PLUGIN_VIEW = ("mount -t tmpfs none /run && {bind}mount --bind /proc/sys /proc/sys && "
               "mount -o remount,bind,ro /proc/sys && exec \"$0\" -c \"$1\"")
BIND = "mkdir -p /run/vpcnet/host-sys-net && mount --bind /proc/sys/net /run/vpcnet/host-sys-net && "
IN_PLUGIN = """
import errno
from pyroute2 import IPRoute
from vpcnet.datapath.ipv6 import IPV6_ON, unavailable
from vpcnet.datapath.netlink import Netlink
with IPRoute() as ipr:
    ipr.link("add", ifname="vhx6", kind="veth", peer={"ifname": "vhx6p"})
print("why:", unavailable())
try:
    Netlink().link_sysctls(["vhx6"], IPV6_ON)
    print("forwarding_was", Netlink().sysctl("net.ipv6.conf.all.forwarding", "1"))
except OSError as exc:
    print("refused:", errno.errorcode[exc.errno])
for leaf in ("accept_ra", "autoconf", "accept_dad", "disable_ipv6"):
    print(leaf, open(f"/proc/sys/net/ipv6/conf/vhx6/{leaf}").read().strip())
print("forwarding", open("/proc/sys/net/ipv6/conf/all/forwarding").read().strip())
"""


def in_plugin_view(mounted: bool) -> dict[str, str]:
    import os

    out = run(["unshare", "-m", "-n", "--propagation", "private", "sh", "-c",
               PLUGIN_VIEW.format(bind=BIND if mounted else ""), sys.executable, IN_PLUGIN], env=dict(os.environ))
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


def test_ipv6_is_refused_naming_why_where_proc_sys_is_read_only_without_the_plugins_mount(root):
    """A managed plugin's /proc/sys is read-only (Docker mounts it so), and the kernel takes a link's IPv6
    settings only there: without config.json's host-sys-net mount (a plugin built before it) vpcnet says so
    (the driver and the IPAM refuse `--ipv6` with it, before a block is claimed) instead of failing each
    container, and writing a link's IPv6 settings fails with EROFS."""
    from vpcnet.datapath.ipv6 import unavailable

    assert unavailable() == "", "writable here"
    seen = in_plugin_view(mounted=False)
    assert "/proc/sys is read-only here" in seen["why:"] and "/run/vpcnet/host-sys-net mount" in seen["why:"]
    assert "vpcnet serve" in seen["why:"] and seen["refused:"] == "EROFS", seen
    assert seen["disable_ipv6"] == "0" and seen["accept_ra"] == "1", seen      # the kernel's defaults, untouched
    assert "no IPv6" in unavailable("/nonexistent/ipv6/forwarding")


def test_the_plugins_host_sys_net_mount_takes_the_ipv6_settings(root):
    """With the host's /proc/sys/net bound read-write at HOST_SYS_NET (plugin/config.json), /proc/sys
    read-only: IPv6 is available, and a link's IPv6 settings (IPV6_ON, in order) and IPv6 forwarding are
    written through the mount and hold in the namespace's own /proc/sys (the one the process is in: a plugin
    shares the host's)."""
    seen = in_plugin_view(mounted=True)
    assert seen.get("why:") == "", seen
    assert "refused:" not in seen and seen["forwarding_was"] == "0", seen
    assert (seen["accept_ra"], seen["autoconf"], seen["accept_dad"], seen["disable_ipv6"]) == ("0", "0", "0", "0")
    assert seen["forwarding"] == "1", seen


def test_ebpf_ipv6_endpoints_share_one_program_and_the_pass_repairs_their_entries(netns_factory):
    """One IPv6 container program per network (vpcnet.datapath.ebpf.endpoints): each IPv6 endpoint is an
    entry in the IPv6 endpoint map; the pass puts a missing one back; a released IPv6 address takes its entry
    (and only it: the endpoint's IPv4 entry stays)."""
    from vpcnet.datapath.ebpf import endpoints, maps
    hosts, specs, dps, boxes, wanted, _router = two_hosts6(netns_factory, "ebpf")
    a, dp, s = hosts["a"], dps["a"], specs["a"]
    veths = [ep.host_veth for ep in wanted["a"]]
    index = {veth: int(run(["ip", "-n", a, "-o", "link", "show", "dev", veth]).stdout.split(":")[0]) for veth in veths}
    ids = [run(["ip", "netns", "exec", a, "tc", "filter", "show", "dev", veth, "ingress", "protocol", "ipv6"]).stdout
           .split(" id ")[1].split()[0] for veth in veths]
    assert ids[0] == ids[1], "one IPv6 program for both endpoints"
    assert dp.tc.facts.lookup(6, index[veths[0]]) == endpoints.value(A1, ())
    endpoints_a = [EndpointSpec(veths[i], veth_names(e)[1], mac_for(f"10.77.3.{i + 2}"), f"10.77.3.{i + 2}")
                   for i, e in enumerate(("a" * 64, "c" * 64))]
    assert dp.repair([(s, endpoints_a)]) == []
    assert wait_for(lambda: ping6(boxes[A1], B1), 15)
    maps.delete(dp.tc.facts.fd(6), endpoints.key(index[veths[1]]))
    repairs = dp.repair([(s, endpoints_a)])
    assert [r.what for r in repairs] == [f"eBPF map entry of {A2} on {veths[1]} missing"], repairs
    assert dp.tc.facts.lookup(6, index[veths[1]]) == endpoints.value(A2, ())
    assert ping6(boxes[A1], B1) and ping6(boxes[A1], A2)
    # the IPv6 map of this host's endpoints by address: its entries, and one gone missing put back
    local = {address: dp.tc.facts.lookup_local(address) for address in (A1, A2)}
    assert {address: endpoints.local_ifindex(entry or bytes(4)) for address, entry in local.items()} == \
        {A1: index[veths[0]], A2: index[veths[1]]}
    maps.delete(dp.tc.facts.local_fd(6), ipaddress.IPv6Address(A2).packed)
    repairs = dp.repair([(s, endpoints_a)])
    assert [r.what for r in repairs] == [f"eBPF local endpoint entry of {A2} on {veths[1]} missing"], repairs
    assert dp.tc.facts.lookup_local(A2) == local[A2] and ping6(boxes[A1], A2)
    wanted["a"].pop(0)
    dp.drop_endpoint_ipv6(veths[0], A1)
    assert dp.tc.facts.lookup(6, index[veths[0]]) is None
    assert dp.tc.facts.lookup_local(A1) is None, "nothing reaches the address through the map any more"
    assert dp.tc.facts.lookup(4, index[veths[0]]) == endpoints.value("10.77.3.2", ())
    assert dp.tc.facts.lookup_local("10.77.3.2") is not None
