"""IPv6-only networks (`--ipv4=false`) and the IPv6 isolation (`--internal`, the egress half) against the real
kernel, in namespaces the tests make: containers with only a /128 reach each other on one host and across two
hosts through a router; nothing of IPv4 is made for them; an --internal network's IPv6 stays inside its IPv6
cluster CIDR; a container's IPv6 goes only towards the uplinks and vpcnet's links."""
from __future__ import annotations

import pytest
from conftest import run, wait_for

from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.ipv6 import Ipv6Endpoint, link_gateway
from vpcnet.datapath.spec import EndpointSpec, NetworkSpec, bridge_name, mac_for, veth_names

pytestmark = pytest.mark.root
TAG, TAG2 = "c1d2e3f4a5b7", "c1d2e3f4a5b8"
CLUSTER, CLUSTER2 = "fd00:77::/32", "fd00:78::/32"
BLOCK, BLOCK2 = "fd00:77:3:0:1::/80", "fd00:78:3:0:1::/80"
A, B = "fd00:77:3:0:1::2", "fd00:77:3:0:1::3"


def v6_only(mode: str = "routed", tag: str = TAG, block: str = BLOCK, cluster: str = CLUSTER,
            internal: bool = False) -> NetworkSpec:
    """An IPv6-only network's spec, as vpcnet.datapath.reconciler.spec_of makes it from its row."""
    return NetworkSpec(tag=tag, bridge=bridge_name(tag + "0" * 52), gateway="", host_cidr="", cluster_cidr="",
                       mtu=1500, internal=internal, mode=mode, host_cidr_v6=block, cluster_cidr_v6=cluster)


def ns_run(ns: str, *cmd: str, check: bool = True):
    return run(["ip", "netns", "exec", ns, *cmd], check=check)


def ping6(ns: str, target: str, source: str = "") -> bool:
    extra = ["-I", source] if source else []
    return ns_run(ns, "busybox", "ping", "-6", "-c1", "-W2", *extra, target, check=False).returncode == 0


def reaches(ns: str, target: str, source: str = "") -> bool:
    """Three tries: the first packets on fresh links may wait for neighbour discovery."""
    return any(ping6(ns, target, source) for _ in range(3))


@pytest.fixture
def host(netns_factory):
    """A simulated host with an uplink holding the default routes (both families), its FORWARD policies
    DROP as Docker sets them."""
    ns = netns_factory("vpc6h")
    run(["ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p"])
    run(["ip", "-n", ns, "addr", "add", "192.0.2.10/24", "dev", "uplink0"])
    run(["ip", "-n", ns, "link", "set", "uplink0p", "up"])
    run(["ip", "-n", ns, "link", "set", "uplink0", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", "192.0.2.1"])
    ns_run(ns, "ip6tables", "-P", "FORWARD", "DROP")
    ns_run(ns, "iptables", "-P", "FORWARD", "DROP")
    return ns


def dataplane(host: str, wanted: list[Ipv6Endpoint], internal: list[tuple[str, str]] | None = None) -> Dataplane:
    dp = Dataplane(netns=host)
    dp.ipv6_endpoints = lambda: list(wanted)           # the store's rows, as vpcnet.cli.serve hands them
    dp.ipv6_internal = lambda: list(internal or [])
    return dp


def container(host: str, dp: Dataplane, netspec: NetworkSpec, netns_factory, ip6: str, eid: str,
              wanted: list[Ipv6Endpoint]) -> str:
    """CreateEndpoint (the row first, then the kernel, as the driver does) and what Docker does at Join for an
    IPv6-only endpoint: the container end into a sandbox as eth0 with only the /128 vpcnet's IPAM answers,
    and the default route GatewayIPv6 gives (no IPv4 address, no IPv4 gateway)."""
    sandbox = netns_factory("vpc6c")
    host_veth, peer = veth_names(eid)
    wanted.append(Ipv6Endpoint(host_veth, ip6))
    dp.ensure_endpoint(netspec, host_veth, peer, mac_for(ip6), "")
    dp.ensure_endpoint_ipv6(netspec, host_veth, ip6)
    run(["ip", "-n", host, "link", "set", peer, "netns", sandbox])
    run(["ip", "-n", sandbox, "link", "set", peer, "name", "eth0"])
    ns_run(sandbox, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0")
    run(["ip", "-n", sandbox, "-6", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad"])
    run(["ip", "-n", sandbox, "link", "set", "eth0", "up"])
    run(["ip", "-n", sandbox, "-6", "route", "add", "default", "via", link_gateway(host_veth), "dev", "eth0"])
    return sandbox


def neighbour(host: str, netns_factory, link: str, addresses: list[str]) -> str:
    """A namespace behind the host's `link` (the uplink's peer, or a new veth: another link of the host, as
    a Docker bridge or a VPN is) holding `addresses` (/64s, the host has the ::1 of each)."""
    far = netns_factory("vpc6f")
    if link == "uplink0":
        run(["ip", "-n", host, "link", "set", "uplink0p", "netns", far, "name", "eth0"])
    else:
        run(["ip", "-n", host, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", far])
    for address in addresses:
        prefix = address.rsplit("::", 1)[0]
        run(["ip", "-n", host, "-6", "addr", "add", f"{prefix}::1/64", "dev", link, "nodad"])
        run(["ip", "-n", far, "-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad"])
    run(["ip", "-n", host, "link", "set", link, "up"])
    run(["ip", "-n", far, "link", "set", "eth0", "up"])
    run(["ip", "-n", far, "-6", "route", "add", "default", "via", f"{addresses[0].rsplit('::', 1)[0]}::1"])
    return far


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_ipv6_only_containers_reach_each_other_and_nothing_of_ipv4_is_made(host, netns_factory, mode):
    wanted: list[Ipv6Endpoint] = []
    dp = dataplane(host, wanted)
    if mode == "ebpf" and not dp.features().supports("ebpf"):
        pytest.skip(f"this kernel cannot do ebpf mode: {dp.features().why_not('ebpf')}")
    s = v6_only(mode)
    dp.ensure_network(s)
    eids = ("a" * 64, "b" * 64)
    ca = container(host, dp, s, netns_factory, A, eids[0], wanted)
    cb = container(host, dp, s, netns_factory, B, eids[1], wanted)
    assert reaches(ca, B) and reaches(cb, A)
    veths = [veth_names(e)[0] for e in eids]
    routes6 = ns_run(host, "ip", "-6", "route").stdout
    assert f"{A} dev {veths[0]}" in routes6 and f"{B} dev {veths[1]}" in routes6
    # nothing of IPv4: no anchor address, no /32, no per-network chains, no tc program
    assert "inet " not in ns_run(host, "ip", "-4", "addr", "show", "dev", s.bridge).stdout
    assert ns_run(host, "ip", "-4", "route", "show", "dev", veths[0]).stdout.strip() == ""
    assert TAG not in ns_run(host, "iptables-save").stdout
    filters = [line for line in ns_run(host, "tc", "filter", "show", "dev", veths[0], "ingress").stdout.splitlines()
               if " bpf " in line]
    assert all("protocol ipv6 " in line for line in filters), filters       # no IPv4 program
    assert any("name vpcnet_ctr6 " in line for line in filters) == (mode == "ebpf"), filters   # IPv6's fast path
    # the repair pass finds nothing to do, then puts a lost /128 back
    endpoints = [EndpointSpec(v, veth_names(e)[1], mac_for(a), "") for v, e, a in zip(veths, eids, (A, B),
                                                                                       strict=True)]
    assert dp.repair([(s, endpoints)]) == []
    run(["ip", "-n", host, "-6", "route", "del", f"{B}/128"])
    assert [r.kind for r in dp.repair([(s, endpoints)])] == ["route"]
    assert reaches(ca, B)
    # removal (DeleteEndpoint, DeleteNetwork) leaves nothing
    wanted.clear()
    for veth in veths:
        dp.delete_endpoint(veth)
    dp.delete_network(s)
    assert not dp.link_exists(s.bridge) and not any(dp.link_exists(v) for v in veths)
    assert A not in ns_run(host, "ip", "-6", "route").stdout


def test_ipv6_only_containers_on_two_hosts_reach_each_other_through_a_router_unencapsulated(netns_factory):
    """Two hosts, each with its /80 of the IPv6 cluster CIDR routed to it by a router namespace (as the VPC
    route table's entries do, tests/test_emulator_kernel.py): an IPv6-only container on host a reaches one on
    host b, and the router forwards plain IPv6 with the containers' own source addresses."""
    router = netns_factory("vpc6r")
    ns_run(router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    blocks = {"a": "fd00:77:3:0:1::/80", "b": "fd00:77:3:0:2::/80"}
    made = {}
    for name, underlay, v4 in (("a", "fd77:a:", "192.0.2"), ("b", "fd77:b:", "198.51.100")):
        ns = netns_factory(f"vpc6{name}")
        run(["ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", f"r{name}", "netns", router])
        # a VPC host's underlay is dual-stack: its IPv4 default route names the uplink
        run(["ip", "-n", ns, "addr", "add", f"{v4}.10/24", "dev", "uplink0"])
        run(["ip", "-n", ns, "-6", "addr", "add", f"{underlay}:10/64", "dev", "uplink0", "nodad"])
        run(["ip", "-n", router, "-6", "addr", "add", f"{underlay}:1/64", "dev", f"r{name}", "nodad"])
        for where, link in ((ns, "uplink0"), (router, f"r{name}")):
            run(["ip", "-n", where, "link", "set", link, "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", f"{v4}.1"])
        run(["ip", "-n", ns, "-6", "route", "add", "default", "via", f"{underlay}:1"])
        run(["ip", "-n", router, "-6", "route", "add", blocks[name], "via", f"{underlay}:10"])
        ns_run(ns, "ip6tables", "-P", "FORWARD", "DROP")
        wanted: list[Ipv6Endpoint] = []
        dp = dataplane(ns, wanted)
        s = v6_only(block=blocks[name])
        dp.ensure_network(s)
        address = blocks[name].replace("::/80", "::2")
        made[name] = (container(ns, dp, s, netns_factory, address, name * 64, wanted), address)
    (ca, addr_a), (cb, addr_b) = made["a"], made["b"]
    ns_run(router, "ip6tables", "-I", "FORWARD", "-s", f"{addr_a}/128", "-d", f"{addr_b}/128", "-p", "ipv6-icmp",
           "-j", "ACCEPT")
    assert wait_for(lambda: ping6(ca, addr_b), 15) and ping6(cb, addr_a)
    seen = ns_run(router, "ip6tables", "-L", "FORWARD", "-v", "-x", "-n").stdout.splitlines()[2]
    assert int(seen.split()[0]) > 0, "the router forwarded IPv6 from container a's own address"


def test_internal_ipv6_stays_in_the_cluster_and_ipv6_leaves_only_by_the_uplinks(host, netns_factory):
    """An --internal network's IPv6 reaches the cluster CIDR (another host's container, behind the uplink) but
    not an address outside it, nor is it reached from outside it; a network that is not internal reaches
    both. Any container's IPv6 goes only to the uplinks and vpcnet's links: another link of the host (a Docker
    bridge, a VPN) is left to FORWARD's later rules (here, the policy DROP), as IPv4's egress half does."""
    wanted: list[Ipv6Endpoint] = []
    internal = [(BLOCK, CLUSTER)]
    dp = dataplane(host, wanted, internal)
    inside, outside = "fd00:77:9::2", "fd55::2"            # behind the uplink: another host's container, the world
    far = neighbour(host, netns_factory, "uplink0", [outside, inside])
    other = neighbour(host, netns_factory, "other0", ["fd66::2"])
    closed = v6_only(internal=True)
    dp.ensure_network(closed)
    ci = container(host, dp, closed, netns_factory, A, "a" * 64, wanted)
    opened = v6_only(tag=TAG2, block=BLOCK2, cluster=CLUSTER2)
    dp.ensure_network(opened)
    co = container(host, dp, opened, netns_factory, "fd00:78:3:0:1::2", "b" * 64, wanted)
    assert reaches(ci, inside) and reaches(far, A, source=inside)
    assert not reaches(ci, outside) and not reaches(far, A, source=outside)
    assert reaches(co, outside) and reaches(far, "fd00:78:3:0:1::2", source=outside)
    assert reaches(ci, "fd00:78:3:0:1::2") is False, "the other network is outside the internal one's cluster"
    assert not reaches(co, "fd66::2") and not reaches(other, "fd00:78:3:0:1::2")
    # the guard as written comes back from ip6tables-save as written: a second pass finds nothing to write
    assert dp._apply_ipv6_guard() == []
    # the internal network goes: its rules with it (a new network on the block is not held in)
    internal.clear()
    wanted.pop(0)
    dp.delete_endpoint(veth_names("a" * 64)[0])
    dp.delete_network(closed)
    assert "--internal" not in ns_run(host, "ip6tables-save", "-t", "filter").stdout

