"""Faults a host throws at the datapath, against the real kernel (in test namespaces): the periodic pass
finds each by reading the kernel and repairs it, logs it and counts it."""
from __future__ import annotations

import json
import logging
import time

import pytest
from conftest import run, wait_for
from test_dataplane import (  # noqa: F401
    attach_container,
    count_rule,
    counters,
    host,
    ns_run,
    peer_host,
    ping,
    spec,
    tc_filters,
    two_hosts,
)

from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.reconciler import DatapathReconciler
from vpcnet.datapath.spec import mac_for, veth_names
from vpcnet.observability.logs import TEXT_FORMAT, JsonFormatter
from vpcnet.state.store import Endpoint, Network, Store

pytestmark = pytest.mark.root
INTERVAL = 0.3


class Host:
    """A store holding one network per spec, the real dataplane in `ns`, and the reconciler over both."""

    def __init__(self, tmp_path, ns: str, netns_factory):
        self.ns, self.netns_factory = ns, netns_factory
        self.config = type("Config", (), {"state_dir": str(tmp_path), "datapath_interval": INTERVAL})()
        self.store = Store(str(tmp_path / "vpcnet.db"))
        self.dp = Dataplane(netns=ns)
        self.reconciler = DatapathReconciler(self.config, self.store, self.dp)

    def network(self, s):
        net = Network(network_id=s.tag + "0" * 52, host_cidr=s.host_cidr, cluster_cidr=s.cluster_cidr,
                      gateway=s.gateway, bridge=s.bridge, mtu=s.mtu, internal=s.internal, no_nat=s.no_nat,
                      mode=s.mode)
        with self.store.tx() as db:
            self.store.add_network(db, net)
        self.dp.ensure_network(s)
        return net

    def container(self, s, ip: str, eid: str) -> str:
        sandbox = attach_container(self.ns, self.dp, s, self.netns_factory, ip, eid)
        host_veth, peer = veth_names(eid)
        with self.store.tx() as db:
            self.store.add_endpoint(db, Endpoint(eid, s.tag + "0" * 52, ip, mac_for(ip), host_veth, peer))
        return sandbox


@pytest.fixture
def box(tmp_path, host, netns_factory):  # noqa: F811
    return Host(tmp_path, host, netns_factory)


def repaired_within(box: Host, check, intervals: float = 2) -> float:
    """Run the periodic pass in the background; seconds until `check()` holds (fails after `intervals`)."""
    started = time.monotonic()
    thread = box.reconciler.start_background()
    try:
        assert wait_for(check, INTERVAL * intervals + 3.0), "not repaired in time"
        return time.monotonic() - started
    finally:
        box.reconciler.stop()
        thread.join(timeout=10)


def test_an_undisturbed_host_needs_no_repair_and_no_write(box):
    s = spec(mode="routed")
    box.network(s)
    box.container(s, "10.77.3.2", "a" * 64)
    box.reconciler.reconcile()                         # the first pass may add the host's shared rules
    runs = box.dp.firewall.runs
    assert box.reconciler.reconcile() == []
    assert box.dp.firewall.runs == runs + 1, "one iptables-save, nothing written"


def test_firewall_flushed_with_forward_drop_comes_back(box, netns_factory, caplog):
    s = spec(mode="routed")
    box.network(s)
    peer_host(box.ns, netns_factory)
    a = box.container(s, "10.77.3.2", "a" * 64)
    b = box.container(s, "10.77.3.3", "b" * 64)
    ns_run(box.ns, "iptables", "-P", "FORWARD", "DROP")
    assert ping(a, "10.77.3.3") and ping(a, "10.77.9.2")
    for table in ("filter", "nat", "raw"):             # what `iptables -F` plus a chain clean-up does
        ns_run(box.ns, "iptables", "-t", table, "-F")
    assert not ping(a, "10.77.9.2")
    caplog.set_level(logging.WARNING, logger="vpcnet.datapath.reconciler")
    took = repaired_within(box, lambda: ping(a, "10.77.9.2") and ping(b, "10.77.3.2"))
    assert any("VPCNET-F-" in r.getMessage() and "firewall" in r.getMessage() for r in caplog.records)
    assert box.store.repair_counts().get("firewall", 0) >= 1
    print(f"firewall repaired in {took:.2f}s")


def test_a_repair_line_carries_its_fields_in_json(box, caplog):
    """The pass's repair line, as `VPCNET_LOG_FORMAT=json` writes it: event, kind, network, outcome as
    fields; the text line stays the same prose, without them."""
    s = spec(mode="routed")
    box.network(s)
    box.reconciler.reconcile()
    ns_run(box.ns, "iptables", "-t", "filter", "-F")
    caplog.set_level(logging.WARNING, logger="vpcnet.datapath.reconciler")
    caplog.clear()
    assert any(r.kind == "firewall" for r in box.reconciler.reconcile())
    records = [r for r in caplog.records if r.name == "vpcnet.datapath.reconciler"]
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    firewall = [line for line in lines if line.get("kind") == "firewall"]
    assert firewall, lines
    assert all((line["event"], line["outcome"], line["level"]) == ("datapath_repair", "repaired", "WARNING")
               for line in firewall), firewall
    ours = [line for line in firewall if "network" in line]           # the host's shared chains: no network
    assert ours and all(line["network"] == s.tag for line in ours), firewall
    assert all(line["message"].startswith(f"datapath repaired (firewall, network {s.tag}): ") for line in ours)
    assert any(f"VPCNET-F-{s.tag}" in line["message"] for line in ours)
    text = logging.Formatter(TEXT_FORMAT).format(records[0])
    assert "datapath repaired (" in text and "datapath_repair" not in text and "{" not in text


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_a_containers_deleted_route_comes_back(box, netns_factory, mode, caplog):
    s = spec(mode=mode)
    box.network(s)
    a = box.container(s, "10.77.3.2", "a" * 64)
    b = box.container(s, "10.77.3.3", "b" * 64)
    assert ping(a, "10.77.3.3")
    run(["ip", "-n", box.ns, "route", "del", "10.77.3.3/32"])
    # ebpf mode: the container program finds b in the map of this host's endpoints, which needs no route
    assert ping(a, "10.77.3.3") == (mode == "ebpf")
    caplog.set_level(logging.WARNING, logger="vpcnet.datapath.reconciler")
    routed = lambda: "10.77.3.3 dev" in run(["ip", "-n", box.ns, "route"]).stdout     # noqa: E731
    repaired_within(box, lambda: routed() and ping(a, "10.77.3.3") and ping(b, "10.77.3.2"))
    assert any("route 10.77.3.3/32" in r.getMessage() for r in caplog.records)
    assert box.store.repair_counts().get("route", 0) >= 1


def test_a_deleted_bridge_comes_back_with_its_endpoints_on_it(box):
    s = spec(mode="bridge")
    box.network(s)
    a = box.container(s, "10.77.3.2", "a" * 64)
    box.container(s, "10.77.3.3", "b" * 64)
    assert ping(a, "10.77.3.3")
    run(["ip", "-n", box.ns, "link", "del", s.bridge])
    assert not ping(a, "10.77.3.3")
    repaired_within(box, lambda: ping(a, "10.77.3.3") and ping(a, s.gateway))
    for eid in ("a" * 64, "b" * 64):
        assert f"master {s.bridge}" in run(["ip", "-n", box.ns, "link", "show", veth_names(eid)[0]]).stdout
    assert box.store.repair_counts().get("link", 0) >= 1


def fast_pings(src: str, dst: str, count: int = 10) -> None:
    out = run(["ip", "netns", "exec", src, "busybox", "ping", "-c", str(count), "-i", "0.1", "-W", "2", dst],
              check=False).stdout
    assert f"{count} packets received" in out, out


def test_ebpf_fast_path_follows_a_replaced_and_then_renamed_uplink(tmp_path, two_hosts, netns_factory):  # noqa: F811
    """Host A's default route moves to a new device (a second link to host B): within one pass the
    network's uplink program leaves uplink0 for the new device, counted as a `tc` repair, and B's
    replies still skip A's FORWARD chain (its counters stay flat: the fast path, not just connectivity).
    Renaming the device keeps its index, so the program stays on it and the fast path keeps working."""
    a, b = two_hosts
    box = Host(tmp_path, a, netns_factory)
    sa, sb = spec(mode="ebpf"), spec(mode="ebpf", tag="b1b2c3d4e5f6", host="10.77.4.0/24")
    box.network(sa)
    dpb = Dataplane(netns=b)
    dpb.ensure_network(sb)
    ca = box.container(sa, "10.77.3.2", "a" * 64)
    attach_container(b, dpb, sb, netns_factory, "10.77.4.2", "b" * 64)
    ns_run(a, "iptables", "-P", "FORWARD", "DROP")
    forward = (("10.77.3.2", "10.77.4.2"), ("10.77.4.2", "10.77.3.2"))
    for src, dst in forward:
        count_rule(a, "filter", "FORWARD", f"{src}>{dst}", "-s", src, "-d", dst)

    def slow_path_packets() -> int:
        return sum(counters(a, "filter", "FORWARD").values())

    fast_pings(ca, "10.77.4.2")
    assert slow_path_packets() <= 3, counters(a, "filter", "FORWARD")    # only before the neighbour resolved

    # The replacement uplink: a second link between the hosts; both move their routes onto it.
    run(["ip", "-n", a, "link", "add", "wan1", "type", "veth", "peer", "name", "wan1", "netns", b])
    for ns, me, other, block in ((a, "198.18.0.10", "198.18.0.20", "10.77.4.0/24"),
                                 (b, "198.18.0.20", "198.18.0.10", "10.77.3.0/24")):
        run(["ip", "-n", ns, "addr", "add", f"{me}/24", "dev", "wan1"])
        run(["ip", "-n", ns, "link", "set", "wan1", "up"])
        run(["ip", "-n", ns, "route", "replace", "default", "via", other, "dev", "wan1"])
        run(["ip", "-n", ns, "route", "replace", block, "via", other, "dev", "wan1"])
    dpb.ensure_network(sb)         # B's own repair: its programs and isolation chains follow its new uplink
    took = repaired_within(box, lambda: sa.tc_name in tc_filters(a, "wan1")
                           and sa.tc_name not in tc_filters(a, "uplink0"), intervals=1)
    assert box.store.repair_counts().get("tc", 0) >= 1
    ns_run(a, "iptables", "-Z", "FORWARD")
    fast_pings(ca, "10.77.4.2")
    assert slow_path_packets() <= 3, f"B's replies took A's slow path: {counters(a, 'filter', 'FORWARD')}"
    print(f"uplink programs moved in {took:.2f}s")

    # Renamed: the device keeps its index and its programs; the pass has nothing to repair.
    run(["ip", "-n", a, "link", "set", "wan1", "down"])
    run(["ip", "-n", a, "link", "set", "wan1", "name", "wan9"])
    run(["ip", "-n", a, "link", "set", "wan9", "up"])
    run(["ip", "-n", a, "route", "replace", "default", "via", "198.18.0.20", "dev", "wan9"])
    run(["ip", "-n", a, "route", "replace", "10.77.4.0/24", "via", "198.18.0.20", "dev", "wan9"])
    assert [r for r in box.reconciler.reconcile() if r.kind == "tc"] == []
    assert sa.tc_name in tc_filters(a, "wan9") and sa.tc_name not in tc_filters(a, "uplink0")
    ns_run(a, "iptables", "-Z", "FORWARD")
    fast_pings(ca, "10.77.4.2")
    assert slow_path_packets() <= 3, counters(a, "filter", "FORWARD")


def test_the_plugin_process_repairs_a_flushed_firewall_and_counts_it(plugin_factory, host):  # noqa: F811
    """`vpcnet serve` itself: its periodic pass (VPCNET_DATAPATH_INTERVAL) brings flushed chains back and
    `vpcnet status` counts the repair."""
    plugin = plugin_factory({"VPCNET_DATAPATH_INTERVAL": "0.5"}, netns=host)
    status, pool = plugin.call("/IpamDriver.RequestPool", {"Pool": ""})
    assert status == 200, pool
    nid = "d1" * 32
    status, answer = plugin.call("/NetworkDriver.CreateNetwork", {
        "NetworkID": nid, "Options": {"com.docker.network.generic": {"vpcnet.mode": "routed"}},
        "IPv4Data": [{"Pool": pool["Pool"], "Gateway": pool["Data"]["com.docker.network.gateway"]}]})
    assert status == 200, answer
    chain = f"VPCNET-F-{nid[:12]}"
    assert f"-A {chain}" in ns_run(host, "iptables-save", "-t", "filter").stdout
    for table in ("filter", "nat", "raw"):
        ns_run(host, "iptables", "-t", table, "-F")
    assert wait_for(lambda: f"-A {chain}" in ns_run(host, "iptables-save", "-t", "filter").stdout, 5.0), \
        plugin.log()
    assert wait_for(lambda: plugin.status()["datapath_repairs"].get("firewall", 0) >= 1, 5.0)
    assert "datapath repaired (firewall, network" in plugin.log()
    plugin.call("/NetworkDriver.DeleteNetwork", {"NetworkID": nid})


def status_of(store: Store) -> dict:
    """The store as `vpcnet status --json` shows it (what test_races.ipv6_in_order compares the kernel with)."""
    ports: dict[str, list[dict]] = {}
    for p in store.ports():
        ports.setdefault(p.endpoint_id, []).append({"family": p.family, "container_port": p.container_port})
    return {"networks": [{"endpoints": [{"address_v6": ep.address_v6, "host_veth": ep.host_veth,
                                         "ports": ports.get(ep.endpoint_id, [])}
                                        for ep in store.endpoints(net.network_id)]} for net in store.networks()]}


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_dual_stack_faults_are_repaired_to_exactly_what_the_store_holds(box, mode):
    """A dual-stack network with an IPv6 published port, and the faults a host throws at it: a /128 route
    deleted, ip6tables flushed (guard, forwarding rules, DNAT), an endpoint's row gone (deleted while the
    plugin was down: its leftovers). After each pass: one /128 route per IPv6 endpoint and no other, no IPv6
    address twice, the guard and the IPv6 DNAT rules exactly the store's, and IPv6 flows again."""
    from test_datapath_ipv6 import container, ping6
    from test_races import ipv6_in_order

    from vpcnet.datapath.ipv6 import Ipv6Endpoint
    from vpcnet.datapath.reconciler import spec_of
    from vpcnet.state.store import Port

    block, a6, b6 = "fd00:77:3:0:1::/80", "fd00:77:3:0:1::2", "fd00:77:3:0:1::3"
    box.dp.ipv6_endpoints = lambda: [Ipv6Endpoint(v, a) for v, a in box.store.ipv6_endpoints()]
    s = spec(mode=mode)
    net = Network(network_id=s.tag + "0" * 52, host_cidr=s.host_cidr, cluster_cidr=s.cluster_cidr, gateway=s.gateway,
                  bridge=s.bridge, mtu=s.mtu, internal=False, no_nat=(), mode=mode, host_cidr_v6=block,
                  cluster_cidr_v6="fd00:77::/48", gateway_v6="fd00:77:3:0:1::1")
    with box.store.tx() as db:
        box.store.add_network(db, net)
    box.dp.ensure_network(s)
    sandboxes = {}
    for ip4, ip6, eid in (("10.77.3.2", a6, "a" * 64), ("10.77.3.3", b6, "b" * 64)):
        host_veth, peer = veth_names(eid)
        with box.store.tx() as db:         # the desired state first, as the driver writes it
            box.store.add_endpoint(db, Endpoint(eid, net.network_id, ip4, mac_for(ip4), host_veth, peer,
                                                address_v6=ip6))
        sandboxes[eid] = container(box.ns, box.dp, s, box.netns_factory, ip4, ip6, eid)
        box.dp.ensure_endpoint_ipv6(s, host_veth, ip6)
    box.store.set_ports("a" * 64, [Port("a" * 64, "tcp", "", 18080, 80, "18080", "ipv6")])
    box.dp.ensure_ports(spec_of(net, box.store.ports(network_id=net.network_id)), [])
    a = sandboxes["a" * 64]
    box.reconciler.reconcile()
    assert box.reconciler.reconcile() == [], "in order: nothing to repair"
    assert len(ipv6_in_order(box.ns, status_of(box.store))["dnat"]) == 1 and ping6(a, b6)

    run(["ip", "-n", box.ns, "-6", "route", "del", f"{b6}/128"])
    assert not ping6(a, b6)
    assert any("IPv6 of" in r.what and b6 in r.what for r in box.reconciler.reconcile())
    ipv6_in_order(box.ns, status_of(box.store))
    assert ping6(a, b6)

    for table in ("raw", "filter", "nat"):
        ns_run(box.ns, "ip6tables", "-t", table, "-F")
    repairs = [r.what for r in box.reconciler.reconcile()]
    assert any("VPCNET-IPV6" in w for w in repairs) and any(f"VPCNET-P-{s.tag}" in w for w in repairs), repairs
    ipv6_in_order(box.ns, status_of(box.store))
    assert ping6(a, b6) and box.reconciler.reconcile() == []

    # an endpoint deleted while the plugin was down (its row gone to the leftovers): the pass takes its veth,
    # /128 route and IPv6 DNAT; nothing of it is left
    box.store.delete_endpoint("a" * 64, leftover=True)
    box.reconciler.reconcile()
    state = ipv6_in_order(box.ns, status_of(box.store))
    assert state["dnat"] == [] and a6 not in " ".join(state["routes"])
    assert f"VPCNET-P-{s.tag}" not in ns_run(box.ns, "ip6tables-save").stdout
    assert box.reconciler.reconcile() == []
