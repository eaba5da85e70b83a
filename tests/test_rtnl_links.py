"""CreateEndpoint's links, addresses and routes over the raw rtnetlink socket (vpcnet.datapath.rtnl: the veth
pair, the /32 and /128 routes, the IPv6 gateway), against the real kernel in namespaces the tests make: they
leave the kernel exactly as the pyroute2 requests they replaced (still the fallback) did, as `ip` and `tc`
show it, and a refused request says which link and leaves no veth and no route behind."""
from __future__ import annotations

import dataclasses
import errno
import json
import re

import pytest
from conftest import run

from vpcnet.datapath import rtnl
from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.ipv6 import Ipv6Endpoint, link_gateway
from vpcnet.datapath.spec import NetworkSpec, bridge_name, mac_for, veth_names
from vpcnet.errors import DataplaneError

pytestmark = pytest.mark.root
TAG = "e1d2c3b4a5f6"
RAW = ("create_veth", "set_link", "delete_link", "add_address", "replace_route", "delete_route")
ENDPOINTS = (("a" * 64, "10.79.3.2", "fd00:79:3:0:1::2"), ("b" * 64, "10.79.3.3", "fd00:79:3:0:1::3"))
# what differs between two namespaces made the same way: indexes, the host ends' and bridges' random MACs,
# counters, the programs' ids
VOLATILE = {"ifindex", "link_index", "address", "broadcast", "stats64", "stats", "link_netnsid", "altnames",
            "parentbus", "parentdev", "perm_address", "bridge_id", "root_id", "designated_root"}
PROGRAM_ID = re.compile(r" id \d+ ")


def spec(mode: str, mtu: int = 1500) -> NetworkSpec:
    return NetworkSpec(tag=TAG, bridge=bridge_name(TAG + "0" * 52), gateway="10.79.3.1", host_cidr="10.79.3.0/24",
                       cluster_cidr="10.79.0.0/16", mtu=mtu, mode=mode, host_cidr_v6="fd00:79:3:0:1::/80",
                       cluster_cidr_v6="fd00:79::/48")


def host(netns_factory) -> str:
    ns = netns_factory("vpcrl")
    run(["ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p"])
    run(["ip", "-n", ns, "addr", "add", "192.0.2.10/24", "dev", "uplink0"])
    for dev in ("uplink0p", "uplink0"):
        run(["ip", "-n", ns, "link", "set", dev, "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", "192.0.2.1"])
    return ns


def dataplane(ns: str, wanted: list[Ipv6Endpoint]) -> Dataplane:
    dp = Dataplane(netns=ns)
    dp.ipv6_endpoints = lambda: list(wanted)
    return dp


def endpoints(dp: Dataplane, s: NetworkSpec, wanted: list[Ipv6Endpoint], twice: bool = False) -> None:
    """CreateEndpoint's datapath calls for ENDPOINTS, dual-stack; `twice`: all of it again (a replay)."""
    for eid, ip4, ip6 in ENDPOINTS:
        host_veth, peer = veth_names(eid)
        wanted.append(Ipv6Endpoint(host_veth, ip6, "" if s.routed else s.bridge))
        for _ in range(2 if twice else 1):
            dp.ensure_endpoint(s, host_veth, peer, mac_for(ip4), ip4)
            dp.ensure_endpoint_ipv6(s, host_veth, ip6)


def ip_json(ns: str, *args: str) -> list[dict]:
    return json.loads(run(["ip", "-n", ns, "-j", *args]).stdout or "[]")


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def kernel_view(ns: str) -> dict:
    """The endpoints' links (both ends, all details), addresses, routes of both families and tc filters,
    as `ip -d` and `tc` print them, with what differs between namespaces anyway (indexes, random MACs) left out."""
    view: dict = {}
    for eid, _ip4, _ip6 in ENDPOINTS:
        for name in veth_names(eid):
            view[name] = strip(ip_json(ns, "-d", "link", "show", "dev", name))
            view[name + " addresses"] = strip(ip_json(ns, "addr", "show", "dev", name))
            view[name + " tc"] = [PROGRAM_ID.sub(" id - ", run(["ip", "netns", "exec", ns, "tc", "filter", "show",
                                                                 "dev", name, hook]).stdout)
                                  for hook in ("ingress", "egress")]
            view[name + " peer of"] = run(["ip", "-n", ns, "-o", "link", "show", "dev", name]).stdout.split(":")[1]
    for family in ("-4", "-6"):
        view[f"routes {family}"] = strip(ip_json(ns, family, "route", "show", "table", "all"))
    return view


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_the_raw_requests_leave_the_kernel_as_pyroute2s_did(netns_factory, monkeypatch, mode):
    """The same dual-stack endpoints made twice, in two namespaces: once with the raw requests refused (each
    falls back to pyroute2's, the code before them), once over the raw socket; then made again (a replay:
    the pair exists). Both namespaces then look the same to `ip -d` and `tc`."""
    views = []
    for raw in (False, True):
        ns = host(netns_factory)
        wanted: list[Ipv6Endpoint] = []
        dp = dataplane(ns, wanted)
        s = spec(mode)
        if mode == "ebpf" and not dp.features().supports("ebpf"):
            pytest.skip(f"this kernel cannot do ebpf mode: {dp.features().why_not('ebpf')}")
        dp.ensure_network(s)
        with monkeypatch.context() as patch:
            if not raw:
                for name in RAW:
                    patch.setattr(rtnl, name, _refused)
            endpoints(dp, s, wanted, twice=True)
        views.append(kernel_view(ns))
    assert views[0] == views[1]
    # and what they are, in a few words (equal and wrong would pass the line above)
    host_veth, peer = veth_names(ENDPOINTS[0][0])
    (link,), (other,) = views[1][host_veth], views[1][peer]
    assert link["mtu"] == 1500 and "UP" in link["flags"] and link["linkinfo"]["info_kind"] == "veth"
    assert other["mtu"] == 1500 and "UP" not in other["flags"]
    assert views[1][peer + " peer of"].strip() == f"{peer}@{host_veth}"
    assert run(["ip", "-n", ns, "-o", "link", "show", "dev", peer]).stdout.split("link/ether ")[1].startswith(
        mac_for(ENDPOINTS[0][1]))
    routes4 = run(["ip", "-n", ns, "-4", "route"]).stdout
    routes6 = run(["ip", "-n", ns, "-6", "route"]).stdout
    if mode == "bridge":
        assert link.get("master") == s.bridge and f"dev {host_veth}" not in routes4
    else:
        assert "master" not in link
        assert f"{ENDPOINTS[0][1]} dev {host_veth} proto static scope link" in routes4, routes4
        assert f"{ENDPOINTS[0][2]} dev {host_veth} proto static metric 1024" in routes6, routes6
        assert f"{link_gateway(host_veth)}/64" in run(["ip", "-n", ns, "-6", "addr", "show", "dev", host_veth]).stdout


def _refused(*_args, **_kw):
    raise OSError(errno.EPROTO, "test: the raw socket is out of order")


def test_the_raw_helpers_one_by_one(netns_factory):
    """Each helper against `ip`: EEXIST and absence answered as documented, a refusal as OSError."""
    ns = host(netns_factory)
    sock = rtnl.open_socket(ns)
    try:
        rtnl.create_veth(sock, "vhraw", "vcraw", 1400, "02:42:0a:4f:03:09")
        with pytest.raises(OSError) as taken:
            rtnl.create_veth(sock, "vhraw2", "vcraw", 1400)           # the peer's name is taken: neither made
        assert taken.value.errno == errno.EEXIST
        assert rtnl.link_index(sock, "vhraw2") is None
        index = rtnl.link_index(sock, "vhraw")
        assert index is not None
        rtnl.set_link(sock, index, mtu=1300, up=False)
        shown = run(["ip", "-n", ns, "-o", "link", "show", "dev", "vhraw"]).stdout
        assert "mtu 1300" in shown and ",UP" not in shown, shown
        rtnl.set_link(sock, index, up=True)
        assert ",UP" in run(["ip", "-n", ns, "-o", "link", "show", "dev", "vhraw"]).stdout
        assert rtnl.add_address(sock, index, "fe80::1", 64, 0x02) is True
        assert rtnl.add_address(sock, index, "fe80::1", 64, 0x02) is False
        assert rtnl.add_address(sock, index, "10.79.9.1", 24) is True
        addrs = run(["ip", "-n", ns, "addr", "show", "dev", "vhraw"]).stdout
        assert "inet 10.79.9.1/24 scope global vhraw" in addrs and "inet6 fe80::1/64 scope link nodad" in addrs, addrs
        rtnl.replace_route(sock, "10.79.9.7", 32, index)
        rtnl.replace_route(sock, "10.79.9.7", 32, index)              # replaced, not doubled
        rtnl.replace_route(sock, "fd00:79::7", 128, index)
        assert run(["ip", "-n", ns, "-4", "route", "show", "10.79.9.7/32"]).stdout.strip() == \
            "10.79.9.7 dev vhraw proto static scope link linkdown"
        assert rtnl.delete_route(sock, "fd00:79::7", 128, index) is True
        assert rtnl.delete_route(sock, "fd00:79::7", 128, index) is False
        assert "fd00:79::7" not in run(["ip", "-n", ns, "-6", "route"]).stdout
        with pytest.raises(OSError) as gone:
            rtnl.replace_route(sock, "10.79.9.8", 32, 99999)
        assert gone.value.errno == errno.ENODEV
        assert rtnl.delete_link(sock, index) is True and rtnl.delete_link(sock, index) is False
        assert rtnl.link_index(sock, "vcraw") is None, "the peer went with it"
        assert "10.79.9.7" not in run(["ip", "-n", ns, "-4", "route"]).stdout, "and the route with the link"
    finally:
        sock.close()


def vpcnet_links(ns: str) -> list[str]:
    return [link["ifname"] for link in ip_json(ns, "link", "show") if link["ifname"].startswith(("vh", "vc"))]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "pyroute2"])
def test_a_refused_veth_says_which_and_leaves_nothing(netns_factory, monkeypatch, raw):
    """An MTU the veth driver refuses (above 65535) and a peer name already taken: a DataplaneError naming
    the veth, no pair made, the link holding the name untouched; over the raw socket and over pyroute2."""
    ns = host(netns_factory)
    dp = dataplane(ns, [])
    s = spec("routed")
    dp.ensure_network(s)
    if not raw:
        for name in RAW:
            monkeypatch.setattr(rtnl, name, _refused)
    host_veth, peer = veth_names("c" * 64)
    with pytest.raises(DataplaneError, match=f"cannot create veth {host_veth}: .*(Invalid argument|EINVAL)"):
        dp.ensure_endpoint(dataclasses.replace(s, mtu=70000), host_veth, peer, mac_for("10.79.3.9"), "10.79.3.9")
    assert vpcnet_links(ns) == []
    run(["ip", "-n", ns, "link", "add", peer, "type", "veth", "peer", "name", "someone"])
    with pytest.raises(DataplaneError, match=f"cannot create veth {host_veth}: the name of its peer {peer} is taken"):
        dp.ensure_endpoint(s, host_veth, peer, mac_for("10.79.3.9"), "10.79.3.9")
    assert sorted(vpcnet_links(ns)) == [peer], "the other link is left as it was, nothing added"
    assert "10.79.3.9" not in run(["ip", "-n", ns, "-4", "route"]).stdout


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "pyroute2"])
def test_a_refused_ipv6_gateway_names_the_veth_and_the_undo_leaves_no_veth_or_route(netns_factory, monkeypatch,
                                                                                      raw):
    """A dual-stack network with an MTU below IPv6's 1280: the kernel gives the veth no IPv6 and refuses its
    gateway address, after the pair and its /32 route were made. The error names the veth; the driver's undo
    (Dataplane.delete_endpoint) then leaves no veth, no /32 and no /128."""
    ns = host(netns_factory)
    wanted: list[Ipv6Endpoint] = []
    dp = dataplane(ns, wanted)
    s = spec("routed", mtu=1200)
    dp.ensure_network(s)
    if not raw:
        for name in RAW:
            monkeypatch.setattr(rtnl, name, _refused)
    eid, ip4, ip6 = ENDPOINTS[0]
    host_veth, peer = veth_names(eid)
    wanted.append(Ipv6Endpoint(host_veth, ip6))
    dp.ensure_endpoint(s, host_veth, peer, mac_for(ip4), ip4)
    assert f"{ip4} dev {host_veth}" in run(["ip", "-n", ns, "-4", "route"]).stdout
    with pytest.raises(DataplaneError, match=f"cannot put the IPv6 gateway {link_gateway(host_veth)} on {host_veth}"):
        dp.ensure_endpoint_ipv6(s, host_veth, ip6)
    dp.delete_endpoint(host_veth)
    assert vpcnet_links(ns) == []
    assert ip4 not in run(["ip", "-n", ns, "-4", "route"]).stdout
    assert ip6 not in run(["ip", "-n", ns, "-6", "route", "show", "table", "all"]).stdout


def ipv6_conf(ns: str, link: str) -> dict[str, str]:
    keys = ("disable_ipv6", "accept_ra", "autoconf", "accept_dad")
    return {key: run(["ip", "netns", "exec", ns, "cat", f"/proc/sys/net/ipv6/conf/{link}/{key}"]).stdout.strip()
            for key in keys}


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_a_dual_stack_endpoints_host_veth_is_never_turned_off_and_on(netns_factory, mode):
    """CreateEndpoint of a dual-stack endpoint (`ipv6=True`, as the driver says): in the routed modes the host
    veth takes no router advertisement nor autoconfiguration from birth but keeps IPv6 on for
    ensure_endpoint_ipv6 (turning it off and on again costs the kernel a link down and up); an IPv4-only
    endpoint's and a bridge port's have IPv6 off, as before."""
    ns = host(netns_factory)
    wanted: list[Ipv6Endpoint] = []
    dp = dataplane(ns, wanted)
    s = spec(mode)
    if mode == "ebpf" and not dp.features().supports("ebpf"):
        pytest.skip(f"this kernel cannot do ebpf mode: {dp.features().why_not('ebpf')}")
    dp.ensure_network(s)
    assert run(["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv6.conf.default.disable_ipv6"]).stdout.strip() == "0"
    (eid, ip4, ip6), (eid4, ip4_only, _) = ENDPOINTS
    host_veth, peer = veth_names(eid)
    wanted.append(Ipv6Endpoint(host_veth, ip6, "" if s.routed else s.bridge))
    dp.ensure_endpoint(s, host_veth, peer, mac_for(ip4), ip4, ipv6=True)
    off = {"disable_ipv6": "1", "accept_ra": "0", "autoconf": "0", "accept_dad": "1"}
    quiet = {"disable_ipv6": "0", "accept_ra": "0", "autoconf": "0", "accept_dad": "1"}
    assert ipv6_conf(ns, host_veth) == (quiet if s.routed else off)
    dp.ensure_endpoint_ipv6(s, host_veth, ip6)
    assert ipv6_conf(ns, host_veth) == ({**quiet, "accept_dad": "0"} if s.routed else off)
    dp.ensure_endpoint(s, host_veth, peer, mac_for(ip4), ip4, ipv6=True)          # a replay leaves it so
    assert ipv6_conf(ns, host_veth) == ({**quiet, "accept_dad": "0"} if s.routed else off)
    dp.ensure_endpoint(s, *veth_names(eid4), mac_for(ip4_only), ip4_only)
    assert ipv6_conf(ns, veth_names(eid4)[0]) == off


def test_a_targeted_answer_larger_than_the_buffer_is_an_error_not_a_short_read(netns_factory, monkeypatch):
    """Targeted answers are read into rtnl.ANSWER_MAX bytes: one that does not fit is refused (EMSGSIZE), and
    the socket stays in step (the next request gets its own answer); Netlink.index_of then asks pyroute2."""
    ns = host(netns_factory)
    sock = rtnl.open_socket(ns)
    try:
        index = rtnl.link_index(sock, "uplink0")
        monkeypatch.setattr(rtnl, "ANSWER_MAX", 64)           # a link's answer is well over 64 bytes
        with pytest.raises(OSError) as short:
            rtnl.link_index(sock, "uplink0")
        assert short.value.errno == errno.EMSGSIZE
        dp = Dataplane(netns=ns)
        with dp.nl.ipr() as ipr:
            assert dp.nl.index_of(ipr, "uplink0") == index, "pyroute2's answer"
        monkeypatch.undo()
        assert rtnl.link_index(sock, "uplink0p") == rtnl.link_index(sock, "uplink0p") != index
    finally:
        sock.close()
