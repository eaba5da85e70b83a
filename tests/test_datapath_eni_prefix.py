"""eni-prefix addressing's datapath against the real kernel (docs/eni-prefix.md): two simulated hosts share
one range, each holding /28 prefixes of it, and a router namespace (the VPC) routes each /28 to its host.
The host's part of the range is its containers' /32s only: the anchor holds the gateway alone (no on-link
range), and other hosts' containers leave by the uplink, in routed and ebpf modes. IPv6 the same way: one
range shared by both hosts, each holding one /80 of it."""
from __future__ import annotations

import os
import shutil

import pytest
from conftest import require, run, wait_for
from test_datapath_ipv6 import container, count6, counters6, ping6
from test_dataplane import count_rule, counters, forward_counts, ns_run, ping, tc_filters, tcp_transfer

from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.ebpf import endpoints, loader, programs, programs6
from vpcnet.datapath.ipv6 import Ipv6Endpoint
from vpcnet.datapath.spec import NetworkSpec, anchor_peer, bridge_name, mac_for, veth_names

pytestmark = pytest.mark.root

RANGE, GATEWAY = "10.0.0.0/20", "10.0.0.1"
PREFIX_A, PREFIX_B = "10.0.0.16/28", "10.0.0.32/28"
RANGE6 = "fd00:9::/64"                               # the vSwitch's (subnet's) IPv6 CIDR
PREFIX6_A, PREFIX6_B = "fd00:9::/80", "fd00:9:0:0:1::/80"
A1, A2, B1 = "fd00:9::2", "fd00:9::3", "fd00:9:0:0:1::2"


def spec(tag: str, mode: str) -> NetworkSpec:
    """The network as each host has it: the same range, pool and gateway on every host."""
    return NetworkSpec(tag=tag, bridge=bridge_name(tag + "0" * 52), gateway=GATEWAY, host_cidr=RANGE,
                       cluster_cidr=RANGE, mtu=1500, mode=mode, shared_range=True)


@pytest.fixture
def vpc(netns_factory):
    """Hosts A and B, each with an uplink to the router namespace (the VPC), which routes A's prefix to A and
    B's to B, as the VPC delivers a prefix to the interface holding it (no route per host block)."""
    router, a, b = netns_factory("vpcvr"), netns_factory("vpcpa"), netns_factory("vpcpb")
    for ns, subnet, link in ((a, "192.0.2", "ra"), (b, "198.51.100", "rb")):
        run(["ip", "-n", router, "link", "add", link, "type", "veth", "peer", "name", "uplink0", "netns", ns])
        run(["ip", "-n", router, "addr", "add", f"{subnet}.1/24", "dev", link])
        run(["ip", "-n", router, "link", "set", link, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{subnet}.10/24", "dev", "uplink0"])
        run(["ip", "-n", ns, "link", "set", "uplink0", "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", f"{subnet}.1"])
    ns_run(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    run(["ip", "-n", router, "route", "add", PREFIX_A, "via", "192.0.2.10"])
    run(["ip", "-n", router, "route", "add", PREFIX_B, "via", "198.51.100.10"])
    return router, a, b


def attach(host_ns: str, dp: Dataplane, netspec: NetworkSpec, netns_factory, ip: str, eid: str) -> str:
    """Docker's Join: the container end in a sandbox as eth0 with the range's prefix length (the IPAM's
    answer), its gateway the range's first address."""
    sandbox = netns_factory("vpcsb")
    host_veth, peer = veth_names(eid)
    dp.ensure_endpoint(netspec, host_veth, peer, mac_for(ip), ip)
    run(["ip", "-n", host_ns, "link", "set", peer, "netns", sandbox])
    run(["ip", "-n", sandbox, "link", "set", peer, "name", "eth0"])
    run(["ip", "-n", sandbox, "addr", "add", f"{ip}/20", "dev", "eth0"])
    run(["ip", "-n", sandbox, "link", "set", "eth0", "up"])
    run(["ip", "-n", sandbox, "route", "add", "default", "via", GATEWAY])
    return sandbox


@pytest.mark.parametrize("uplinks", [None, [], [3], [3, 9]], ids=["any", "none", "one", "two"])
@pytest.mark.parametrize("local", [True, False], ids=["local map", "no local map"])
def test_the_verifier_accepts_a_shared_range_s_programs(uplinks, local):
    facts = endpoints.EndpointFacts()
    try:
        local_fd = facts.local_fd(4) if local else None
        made = [programs.container_program(RANGE, RANGE, facts.fd(4), 5, uplinks, local_fd=local_fd, shared=True),
                programs.uplink_program(RANGE, RANGE, 5, local_fd=local_fd, shared=True),
                programs.uplink_program(RANGE, RANGE, 5, local_fd=local_fd, shared=True, endpoints_fd=facts.fd(4))]
        for program in made:
            os.close(loader.load(program, "vpcnet_test"))
    finally:
        facts.close()


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_containers_on_two_hosts_sharing_one_range_reach_each_other(vpc, netns_factory, mode):
    _router, a, b = vpc
    sa, sb = spec("a1b2c3d4e5f6", mode), spec("a1b2c3d4e5f6", mode)      # one Docker network, on each host
    dpa, dpb = Dataplane(netns=a), Dataplane(netns=b)
    dpa.ensure_network(sa)
    dpb.ensure_network(sb)
    dpa.ensure_network(sa)                                  # idempotent
    # the anchor holds the gateway alone: no route to the range, other hosts' containers go by the default
    assert run(["ip", "-n", a, "-4", "-o", "addr", "show", sa.bridge]).stdout.count(f"inet {GATEWAY}/32 ") == 1
    assert "10.0.0.0/20" not in run(["ip", "-n", a, "-4", "route", "show", "table", "all"]).stdout
    ca = attach(a, dpa, sa, netns_factory, "10.0.0.18", "a" * 64)
    ca2 = attach(a, dpa, sa, netns_factory, "10.0.0.19", "c" * 64)
    cb = attach(b, dpb, sb, netns_factory, "10.0.0.34", "b" * 64)
    for ns in (a, b):
        ns_run(ns, "iptables", "-P", "FORWARD", "DROP")      # as Docker leaves it
    assert ping(ca, "10.0.0.34") and ping(cb, "10.0.0.18"), "across hosts: out of the uplink, the VPC's route"
    assert ping(ca, "10.0.0.19") and ping(ca2, "10.0.0.18"), "on one host: the /32 routes"
    assert ping(ca, GATEWAY) and ping(cb, GATEWAY), "the gateway, the same address on every host"
    out = run(["ip", "netns", "exec", ca, "busybox", "ping", "-c2", "-W2", "10.0.0.34"]).stdout
    assert "ttl=61" in out, out                              # host A, the VPC's router, host B
    assert "10.0.0.34" in run(["ip", "-n", ca, "neigh"]).stdout, "the neighbour is on-link: ARPed, proxied"
    # cluster traffic keeps its source (no NAT inside the range)
    count_rule(cb, "filter", "INPUT", "from-a", "-s", "10.0.0.18", "-p", "icmp")
    assert ping(ca, "10.0.0.34") and counters(cb, "filter", "INPUT")["from-a"] >= 1
    if mode == "ebpf":
        assert tc_filters(a, "uplink0").count(f"vpcnet-{sa.tag}") == 1, tc_filters(a, "uplink0")
    # removal leaves nothing of the range behind
    for dp, s, eids in ((dpa, sa, ("a" * 64, "c" * 64)), (dpb, sb, ("b" * 64,))):
        for eid in eids:
            dp.delete_endpoint(veth_names(eid)[0])
        dp.delete_network(s)
    for ns in (a, b):
        assert "10.0.0." not in run(["ip", "-n", ns, "-4", "route", "show", "table", "all"]).stdout
        links = run(["ip", "-n", ns, "link"]).stdout
        assert sa.bridge not in links and anchor_peer(sa.bridge) not in links and "vh" not in links
        assert "vpcnet" not in tc_filters(ns, "uplink0")


def test_ebpf_mode_carries_traffic_between_hosts_sharing_a_range_past_their_ip_stacks(vpc, netns_factory):
    """The fast path in a shared range: the container program sends another host's address out of the
    uplink, the uplink program delivers this host's own (found in its local map) straight in; FORWARD sees
    only the packets before a neighbour was resolved. An address of the range on neither host is left to
    the normal path."""
    require(shutil.which("iperf3") is not None, "needs iperf3")
    _router, a, b = vpc
    sa, sb = spec("a1b2c3d4e5f6", "ebpf"), spec("a1b2c3d4e5f6", "ebpf")
    dpa, dpb = Dataplane(netns=a), Dataplane(netns=b)
    dpa.ensure_network(sa)
    dpb.ensure_network(sb)
    ca = attach(a, dpa, sa, netns_factory, "10.0.0.18", "a" * 64)
    ca2 = attach(a, dpa, sa, netns_factory, "10.0.0.19", "c" * 64)
    cb = attach(b, dpb, sb, netns_factory, "10.0.0.34", "b" * 64)
    for ns in (a, b):
        ns_run(ns, "iptables", "-P", "FORWARD", "DROP")
        forward_counts(ns, ("10.0.0.18", "10.0.0.34"), ("10.0.0.34", "10.0.0.18"), ("10.0.0.18", "10.0.0.19"))
    assert tcp_transfer(ca, cb, "10.0.0.34") > 1_000_000
    assert tcp_transfer(cb, ca, "10.0.0.18") > 1_000_000
    assert tcp_transfer(ca, ca2, "10.0.0.19") > 1_000_000
    seen = {ns: counters(ns, "filter", "FORWARD") for ns in (a, b)}
    for ns in (a, b):
        assert max(seen[ns].values()) <= 3, seen
    assert not ping(ca, "10.0.0.50"), "an address of the range nobody holds: no answer, no loop"
    for dp, s, eids in ((dpa, sa, ("a" * 64, "c" * 64)), (dpb, sb, ("b" * 64,))):
        for eid in eids:
            dp.delete_endpoint(veth_names(eid)[0])
        dp.delete_network(s)


@pytest.mark.parametrize("uplinks", [None, [], [3], [3, 9]], ids=["any", "none", "one", "two"])
@pytest.mark.parametrize("local", [True, False], ids=["local map", "no local map"])
def test_the_verifier_accepts_a_shared_ipv6_range_s_programs(uplinks, local):
    facts = endpoints.EndpointFacts()
    try:
        local_fd = facts.local_fd(6) if local else None
        made = [programs6.container_program6(RANGE6, RANGE6, facts.fd(6), 5, uplinks, local_fd=local_fd, shared=True),
                programs6.uplink_program6(RANGE6, RANGE6, 5, local_fd=local_fd, endpoints_fd=facts.fd(6))]
        for program in made:
            os.close(loader.load(program, "vpcnet_test"))
    finally:
        facts.close()


def dual_stack_spec(tag: str, mode: str) -> NetworkSpec:
    return NetworkSpec(tag=tag, bridge=bridge_name(tag + "0" * 52), gateway=GATEWAY, host_cidr=RANGE,
                       cluster_cidr=RANGE, mtu=1500, mode=mode, shared_range=True, host_cidr_v6=RANGE6,
                       cluster_cidr_v6=RANGE6)


@pytest.fixture
def vpc6(vpc):
    """The VPC of `vpc` with IPv6: each uplink and the router's side of it hold an address of their own
    subnet, and the router routes A's /80 to A and B's to B (the VPC delivers a prefix to its interface)."""
    router, a, b = vpc
    ns_run(router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    for ns, subnet, link in ((a, "fd77:a:", "ra"), (b, "fd77:b:", "rb")):
        run(["ip", "-n", router, "-6", "addr", "add", f"{subnet}:1/64", "dev", link, "nodad"])
        run(["ip", "-n", ns, "-6", "addr", "add", f"{subnet}:10/64", "dev", "uplink0", "nodad"])
        run(["ip", "-n", ns, "-6", "route", "add", "default", "via", f"{subnet}:1", "dev", "uplink0"])
    run(["ip", "-n", router, "-6", "route", "add", PREFIX6_A, "via", "fd77:a::10"])
    run(["ip", "-n", router, "-6", "route", "add", PREFIX6_B, "via", "fd77:b::10"])
    return vpc


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_ipv6_containers_on_two_hosts_sharing_one_range_reach_each_other(vpc6, netns_factory, mode):
    """A dual-stack network whose IPv6 half is one range shared by two hosts, each holding a /80 of it: no
    route to the range on either host (its containers' /128s only), other hosts' containers by the default
    route. In ebpf mode the programs carry it past both hosts' ip6tables FORWARD, across the router and on
    one host; an address of the range neither host holds gets no answer (no loop)."""
    _router, a, b = vpc6
    specs = {a: dual_stack_spec("a1b2c3d4e5f6", mode), b: dual_stack_spec("a1b2c3d4e5f6", mode)}
    dps = {a: Dataplane(netns=a), b: Dataplane(netns=b)}
    if mode == "ebpf" and not dps[a].features().supports("ebpf"):
        pytest.skip(f"this kernel cannot do ebpf mode: {dps[a].features().why_not('ebpf')}")
    wanted = {a: [Ipv6Endpoint(veth_names("a" * 64)[0], A1), Ipv6Endpoint(veth_names("c" * 64)[0], A2)],
              b: [Ipv6Endpoint(veth_names("b" * 64)[0], B1)]}
    boxes = {}
    try:
        for ns, ip4, ip6, eid in ((a, "10.0.0.18", A1, "a" * 64), (a, "10.0.0.19", A2, "c" * 64),
                                  (b, "10.0.0.34", B1, "b" * 64)):
            dps[ns].ipv6_endpoints = (lambda n=ns: list(wanted[n]))
            dps[ns].ensure_network(specs[ns])
            boxes[ip6] = container(ns, dps[ns], specs[ns], netns_factory, ip4, ip6, eid)
            dps[ns].ensure_endpoint_ipv6(specs[ns], veth_names(eid)[0], ip6)
        ca, ca2, cb = boxes[A1], boxes[A2], boxes[B1]
        for ns in (a, b):
            assert RANGE6.split("/")[0] + "/64" not in ns_run(ns, "ip", "-6", "route", "show", "table", "all").stdout
            ns_run(ns, "ip6tables", "-P", "FORWARD", "DROP")          # as Docker 27+ sets it with IPv6 on
            count6(ns, (A1, B1), (B1, A1), (A1, A2))
        assert wait_for(lambda: ping6(ca, B1), 15), "across hosts: out of the uplink, the VPC's route"
        assert ping6(cb, A1) and ping6(ca, A2) and ping6(ca2, A1), "both ways, and on one host by the /128s"
        if mode == "ebpf":
            require(shutil.which("iperf3") is not None, "needs iperf3")
            assert tc_filters(a, "uplink0").count(f"vpcnet6-{specs[a].tag}") == 1, tc_filters(a, "uplink0")
            for client, server, address in ((ca, cb, B1), (cb, ca, A1), (ca, ca2, A2)):
                assert tcp_transfer(client, server, address) > 1_000_000, address
            seen = {ns: counters6(ns) for ns in (a, b)}
            for ns in (a, b):
                flows = {k: v for k, v in seen[ns].items() if ns == a or B1 in k}
                assert max(flows.values()) <= 3, seen        # only packets sent before a neighbour was resolved
        else:
            seen = {ns: counters6(ns) for ns in (a, b)}
            assert seen[a][f"{A1}>{B1}"] >= 1 and seen[b][f"{B1}>{A1}"] >= 1, seen
        assert not ping6(ca, "fd00:9:0:0:2::5"), "an address of the range nobody holds: no answer"
    finally:
        for ns, eids in ((a, ("a" * 64, "c" * 64)), (b, ("b" * 64,))):
            wanted[ns] = []
            for eid in eids:
                dps[ns].delete_endpoint(veth_names(eid)[0])
            dps[ns].delete_network(specs[ns])
    for ns in (a, b):
        assert "fd00:9:" not in ns_run(ns, "ip", "-6", "route", "show", "table", "all").stdout
        assert "vpcnet" not in tc_filters(ns, "uplink0")
