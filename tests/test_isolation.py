"""What vpcnet isolates, against the real kernel, in every mode and both directions (docs/datapath.md,
Isolation): cluster traffic enters and leaves by the uplinks and vpcnet's own links only.

Host A (two_hosts: its uplink leads to host B) carries, besides a vpcnet network:
- a plain Linux bridge `br-0a0b0c0d0e0f` standing in for a Docker bridge network, with a "bridged"
  container behind it (172.30.0.2), and the rules Docker 20.10 writes for it at the top of FORWARD (ahead of
  vpcnet's jump, as for a bridge network created after it): policy DROP, a published port (A's uplink
  address :8081 DNATed to 172.30.0.2:80), replies and the bridge's own outgoing traffic accepted;
- a second interface `lan0` that is not an uplink, behind which a "lan" host routes the cluster CIDR via A
  and holds a cluster address (10.77.9.2) A routes to it.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import require, run
from test_dataplane import attach_container, counters, ns_run, spec, two_hosts  # noqa: F401  (a fixture)

from vpcnet.datapath.dataplane import Dataplane

pytestmark = pytest.mark.root

PORT, PUBLISHED, PUBLISHED_TO = 8080, 8081, 80
BR = "br-0a0b0c0d0e0f"          # named as Docker names a bridge network's bridge

SERVE = textwrap.dedent("""
    import selectors, socket, sys
    sel = selectors.DefaultSelector()
    for port in map(int, sys.argv[1:]):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(16); sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    while sel.get_map():
        events = sel.select(timeout=60)
        if not events:
            break
        for key, _ in events:
            c, _addr = key.fileobj.accept(); c.sendall(b"hello"); c.close()
""")

CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5) as c:
            c.settimeout(1.5)
            print("hello" if c.recv(5) == b"hello" else "no answer")
    except OSError as exc:
        print(type(exc).__name__)
""")


def connects(ns: str, address: str, port: int = PORT) -> bool:
    out = run(["ip", "netns", "exec", ns, sys.executable, "-c", CONNECT, address, str(port)], timeout=10).stdout
    return out.strip() == "hello"


@pytest.fixture
def servers():
    """serve(ns, *ports): a TCP server answering "hello" on each port in `ns`, killed at the end."""
    procs: list[subprocess.Popen] = []

    def serve(ns: str, *ports: int) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVE, *map(str, ports)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    yield serve
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def docker_bridge(a: str, netns_factory) -> str:
    """The Docker bridge stand-in on host `a` and its container (172.30.0.2); Docker's rules for it."""
    bridged = netns_factory("vpcdk")
    run(["ip", "-n", a, "link", "add", BR, "type", "bridge"])
    run(["ip", "-n", a, "addr", "add", "172.30.0.1/24", "dev", BR])
    run(["ip", "-n", a, "link", "set", BR, "up"])
    run(["ip", "-n", a, "link", "add", "vdk0", "type", "veth", "peer", "name", "eth0", "netns", bridged])
    run(["ip", "-n", a, "link", "set", "vdk0", "master", BR, "up"])
    run(["ip", "-n", bridged, "addr", "add", "172.30.0.2/24", "dev", "eth0"])
    run(["ip", "-n", bridged, "link", "set", "eth0", "up"])
    run(["ip", "-n", bridged, "route", "add", "default", "via", "172.30.0.1"])
    ns_run(a, "iptables", "-P", "FORWARD", "DROP")
    # ahead of vpcnet's jump, as Docker 20.10 inserts a bridge network's rules made after it (in this order)
    docker_rules = (["-o", BR, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
                    ["-d", "172.30.0.2/32", "!", "-i", BR, "-o", BR, "-p", "tcp", "-m", "tcp",
                     "--dport", str(PUBLISHED_TO), "-j", "ACCEPT"],
                    ["-i", BR, "!", "-o", BR, "-j", "ACCEPT"],
                    ["-i", BR, "-o", BR, "-j", "ACCEPT"])
    for at, docker_rule in enumerate(docker_rules, 1):
        ns_run(a, "iptables", "-I", "FORWARD", str(at), *docker_rule)
    ns_run(a, "iptables", "-t", "nat", "-A", "PREROUTING", "-d", "192.0.2.10/32", "-p", "tcp", "--dport",
           str(PUBLISHED), "-j", "DNAT", "--to-destination", f"172.30.0.2:{PUBLISHED_TO}")
    ns_run(a, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.30.0.0/24", "!", "-o", BR,
           "-j", "MASQUERADE")
    return bridged


def lan_host(a: str, netns_factory) -> str:
    """A host behind `lan0`, a second interface of `a` that is not an uplink: 198.18.5.2, and the cluster
    address 10.77.9.2 that `a` routes to it; it routes the cluster CIDR via `a`."""
    lan = netns_factory("vpclan")
    run(["ip", "-n", a, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lan])
    run(["ip", "-n", a, "addr", "add", "198.18.5.1/24", "dev", "lan0"])
    run(["ip", "-n", a, "link", "set", "lan0", "up"])
    run(["ip", "-n", a, "route", "add", "10.77.9.0/24", "via", "198.18.5.2"])
    run(["ip", "-n", lan, "addr", "add", "198.18.5.2/24", "dev", "eth0"])
    run(["ip", "-n", lan, "addr", "add", "10.77.9.2/32", "dev", "eth0"])
    run(["ip", "-n", lan, "link", "set", "eth0", "up"])
    run(["ip", "-n", lan, "route", "add", "10.77.0.0/16", "via", "198.18.5.1"])
    ns_run(lan, "iptables", "-A", "INPUT", "-p", "tcp", "--syn", "-d", "10.77.9.2", "-m", "comment",
           "--comment", "syn")
    return lan


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_cluster_traffic_enters_and_leaves_only_by_the_uplinks_and_vpcnets_links(two_hosts, netns_factory,  # noqa: F811
                                                                                    servers, mode):
    a, b = two_hosts
    sa, sb = spec(mode=mode), spec(mode=mode, tag="b1b2c3d4e5f6", host="10.77.4.0/24")
    dpa, dpb = Dataplane(netns=a), Dataplane(netns=b)
    if mode == "ebpf":
        require(dpa.features().supports("ebpf"), dpa.features().why_not("ebpf"))
    dpa.ensure_network(sa)
    dpb.ensure_network(sb)
    bridged, lan = docker_bridge(a, netns_factory), lan_host(a, netns_factory)
    ca = attach_container(a, dpa, sa, netns_factory, "10.77.3.2", "a" * 64)
    cb = attach_container(b, dpb, sb, netns_factory, "10.77.4.2", "b" * 64)
    for ns in (ca, cb, bridged, lan):
        servers(ns, PORT)
    servers(bridged, PUBLISHED_TO)
    # the host itself talks to the lan host: its neighbour is resolved (the fast path's lookup needs that)
    assert ns_run(a, "busybox", "ping", "-c1", "-W2", "10.77.9.2", check=False).returncode == 0

    # (c) by the uplink, both ways, and the container's own network and host
    assert connects(ca, "10.77.4.2") and connects(cb, "10.77.3.2"), "container <-> other host's container"
    # (a) a Docker bridge network: its unpublished port is refused to the vpcnet container, and its
    # container cannot open a connection to the vpcnet container
    assert not connects(ca, "172.30.0.2"), "vpcnet container -> bridge container's unpublished port"
    assert not connects(bridged, "10.77.3.2"), "bridge container -> vpcnet container"
    # (d) its published port (DNAT on the host's address) works, replies included
    assert connects(ca, "192.0.2.10", PUBLISHED), "vpcnet container -> published port"
    # (b) a second interface that is not an uplink: nothing new comes in by it, cluster traffic does not
    # leave by it (the fast path included: not one SYN reaches the cluster address routed over it)
    assert not connects(lan, "10.77.3.2"), "second interface -> vpcnet container"
    assert not connects(ca, "10.77.9.2"), "vpcnet container -> cluster address routed over a second interface"
    assert counters(lan, "filter", "INPUT")["syn"] == 0, "a SYN left by the second interface"
    assert not connects(ca, "198.18.5.2"), "vpcnet container -> second interface (FORWARD's policy: DROP)"
    # the bridge container's own traffic to the lan host still flows: Docker's rules, untouched by vpcnet
    assert connects(bridged, "198.18.5.2"), "bridge container -> second interface"


def test_an_interface_named_in_vpcnet_uplinks_carries_cluster_traffic_both_ways(two_hosts, netns_factory,  # noqa: F811
                                                                                  servers):
    """VPCNET_UPLINKS (a host whose VPC NIC does not carry the default route): the named interface counts as
    an uplink; one not named stays refused."""
    a, _b = two_hosts
    s = spec(mode="routed")
    dp = Dataplane(netns=a, extra_uplinks=("lan0",))
    dp.ensure_network(s)
    lan = lan_host(a, netns_factory)
    ca = attach_container(a, dp, s, netns_factory, "10.77.3.2", "a" * 64)
    ns_run(a, "iptables", "-P", "FORWARD", "DROP")
    for ns in (ca, lan):
        servers(ns, PORT)
    assert connects(lan, "10.77.3.2") and connects(ca, "10.77.9.2") and connects(ca, "198.18.5.2")
    assert "-A VPCNET-EGRESS -o lan0 -j ACCEPT" in ns_run(a, "iptables", "-S", "VPCNET-EGRESS").stdout
    Dataplane(netns=a).ensure_host()                   # the same host without the setting
    assert not connects(lan, "10.77.3.2") and not connects(ca, "10.77.9.2")


def test_the_isolation_chains_follow_the_default_route_and_an_up_to_date_pass_writes_nothing(two_hosts):  # noqa: F811
    a, _b = two_hosts
    s = spec(mode="routed")
    dp = Dataplane(netns=a)
    dp.ensure_network(s)
    egress = lambda: ns_run(a, "iptables", "-S", "VPCNET-EGRESS").stdout     # noqa: E731
    assert "-o uplink0 -j ACCEPT" in egress()
    run(["ip", "-n", a, "link", "add", "wan1", "type", "veth", "peer", "name", "wan1p"])
    run(["ip", "-n", a, "addr", "add", "198.18.0.10/24", "dev", "wan1"])
    run(["ip", "-n", a, "link", "set", "wan1", "up"])
    run(["ip", "-n", a, "route", "replace", "default", "via", "198.18.0.20", "dev", "wan1"])
    repairs = dp.repair([(s, [])])
    assert [r.what for r in repairs if "VPCNET-EGRESS" in r.what] == [
        "filter chain VPCNET-EGRESS holds 5 rule(s), 4 of 5 wanted (uplinks: wan1)"], repairs
    assert "-o wan1 -j ACCEPT" in egress() and "uplink0" not in egress()
    runs = dp.firewall.runs
    assert dp.repair([(s, [])]) == [] and dp.firewall.runs == runs + 1, "one iptables-save, nothing written"
