"""Dual-stack vpcnet networks against the real engine: `docker network create --ipv6` on a routed network
gives each container an IPv6 /128 of this host's block beside its IPv4 address, a link-local IPv6 gateway of its
host link's own,
and two containers reach each other over IPv6 through the host; on a bridge-mode network the same, with
the block on the bridge's link, so the two resolve and reach each other on the bridge. Runs on every engine.

The plugin turns IPv6 forwarding on for the namespace it serves (the machine's own, on the shared engine):
the test puts the forwarding and accept_ra sysctls back as they were.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import uuid

import pytest
from conftest import free_cluster, run, unique
from test_doctor import doctor

from vpcnet.datapath.guard import GuardFacts
from vpcnet.datapath.netlink import Netlink
from vpcnet.datapath.tc import TcPrograms

pytestmark = pytest.mark.docker


@pytest.fixture
def ipv6_sysctls_kept():
    """The namespace's IPv6 forwarding and every interface's accept_ra, put back at the end."""
    keys = ["net.ipv6.conf.all.forwarding"] + [f"net.ipv6.conf.{name}.accept_ra" for name in
                                                run(["ls", "/proc/sys/net/ipv6/conf"]).stdout.split()]
    before = {k: run(["sysctl", "-n", k], check=False).stdout.strip() for k in keys}
    yield
    for key, value in before.items():
        if value:
            run(["sysctl", "-qw", f"{key}={value}"], check=False)


def ping6(dock, container: str, target: str) -> bool:
    return dock.exec(container, "ping", "-6", "-c1", "-W2", target, check=False).returncode == 0


def addresses(dock, container: str, network: str) -> tuple[str, str]:
    fmt = f'{{{{with index .NetworkSettings.Networks "{network}"}}}}{{{{.IPAddress}}}} {{{{.GlobalIPv6Address}}}}' \
          f'/{{{{.GlobalIPv6PrefixLen}}}} {{{{.IPv6Gateway}}}}{{{{end}}}}'
    ip4, ip6, gw6 = dock("inspect", "-f", fmt, container).stdout.split()
    return ip4, ip6 + " " + gw6


@pytest.mark.parametrize("mode", ["routed", "bridge"])
def test_dual_stack_network_containers_reach_each_other_over_ipv6(plugin_factory, dock, ipv6_sysctls_kept, mode):
    cluster6 = f"fd{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::/48"
    plugin = plugin_factory({"VPCNET_CLUSTER_CIDR_V6": cluster6})
    # --subnet for the IPv6 cluster CIDR: Docker before 25 asks a remote IPAM for an IPv6 pool only then
    net = dock.network_create(plugin, None, "--ipv6", "--subnet", plugin.cluster, "--subnet", cluster6,
                              "-o", f"vpcnet.mode={mode}").name
    status = plugin.status()["networks"][0]
    bridge = status["bridge"] if mode == "bridge" else ""
    block = ipaddress.IPv6Network(status["host_cidr_v6"])
    assert block.prefixlen == 80 and block.subnet_of(ipaddress.IPv6Network(cluster6))
    a, b = dock.run_container(net).name, dock.run_container(net).name
    ip4_a, six_a = addresses(dock, a, net)
    ip6_a, gw6 = six_a.split()
    assert gw6.startswith("fe80::1:") and ipaddress.IPv6Interface(ip6_a).network.prefixlen == 128   # link_gateway
    assert ipaddress.IPv6Interface(ip6_a).ip in block
    ip6_b = addresses(dock, b, net)[1].split()[0].split("/")[0]
    assert ping6(dock, a, ip6_b) and ping6(dock, b, ip6_a.split("/")[0])
    assert dock.exec(a, "ping", "-c1", "-W2", dock.ip_of(b), check=False).returncode == 0, "IPv4 as before"
    if bridge:      # Join's connected route: the block is on the link, b's address resolved on the bridge
        assert f"{block} dev eth0" in dock.exec(a, "ip", "-6", "route").stdout
        assert ip6_b in dock.exec(a, "ip", "-6", "neigh").stdout
    # docker run --ip6: the address asked for; the same again is refused and leaves nothing behind
    wanted = str(block.network_address + 0x99)
    c = dock.run_container(net, "--ip6", wanted).name
    assert addresses(dock, c, net)[1].split()[0] == f"{wanted}/128" and ping6(dock, a, wanted)
    taken = dock.run_container(net, "--ip6", wanted, check=False)
    assert taken.returncode != 0 and "already in use" in taken.stderr, taken.stderr
    assert len(plugin.status()["networks"][0]["endpoints"]) == 3
    host_veth = next(ep["host_veth"] for ep in plugin.status()["networks"][0]["endpoints"] if ep["address"] == ip4_a)
    if bridge:      # the block routed to the bridge, a's port filter lets a's MAC and addresses through
        assert f"{block} dev {bridge}" in run(["ip", "-6", "route", "show"]).stdout
        mac_a = dock("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").MacAddress}}}}', a).stdout
        assert TcPrograms(Netlink()).guard_facts(socket.if_nametoindex(host_veth)) == \
            GuardFacts(mac_a.strip(), ip4_a, ip6_a.split("/")[0])
    else:
        assert f"{ip6_a.split('/')[0]} dev {host_veth}" in run(["ip", "-6", "route", "show"]).stdout
    # a container's router advertisement never configures the host (the guard drops its IPv6 but its own)
    assert run(["sysctl", "-n", f"net.ipv6.conf.{bridge or host_veth}.accept_ra"]).stdout.strip() == "0"
    assert "ipv6_guard" not in doctor(plugin)[1], "doctor knows the IPv6 endpoints' rules and links"
    # kill -9 and a restart: the kernel keeps forwarding IPv6 meanwhile, the restarted plugin rewrites the
    # guard from its state (its endpoints' rules kept) and serves a new dual-stack container
    plugin.kill9()
    assert ping6(dock, a, ip6_b)
    plugin.start()
    d = dock.run_container(net).name
    assert ping6(dock, d, ip6_a.split("/")[0]) and ping6(dock, a, ip6_b)
    dock("rm", "-f", d)
    dock.cleanup()
    assert ip6_a.split("/")[0] not in run(["ip", "-6", "route", "show"]).stdout
    assert not bridge or bridge not in run(["ip", "-6", "route", "show"]).stdout, "the bridge's block went too"
    assert host_veth not in run(["ip6tables-save", "-t", "raw"]).stdout, "its guard rules went with it"


def test_ipv6_alone_takes_the_default_ipv6_cluster_cidr(
        current_docker, plugin_factory, dock, ipv6_sysctls_kept):
    """Docker 25+ asks a remote IPAM for an IPv6 pool on `--ipv6` alone: this host's /80 of the default IPv6
    cluster CIDR (a ULA /48 derived from the cluster identity). An ebpf network carries it on its IPv6 fast path."""
    plugin = plugin_factory()
    net = dock.network_create(plugin, None, "--ipv6").name      # the host's default mode (ebpf where it can)
    status = plugin.status()["networks"][0]
    block = ipaddress.IPv6Network(status["host_cidr_v6"])
    assert block.subnet_of(ipaddress.IPv6Network("fd00::/8")) and block.prefixlen == 80
    assert status["cluster_cidr_v6"].endswith("/48")
    a, b = dock.run_container(net).name, dock.run_container(net).name
    assert ping6(dock, a, addresses(dock, b, net)[1].split()[0].split("/")[0])


# -- Compose: enable_ipv6 ------------------------------------------------------------------------------
WITH_SUBNET = """\
  a:
    image: {image}
    command: ["sleep", "3600"]
    networks:
      withsub:
        ipv6_address: {wanted}
  b:
    image: {image}
    command: ["sleep", "3600"]
    networks: [withsub]
""", """\
  withsub:
    driver: {driver}
    enable_ipv6: true
    driver_opts:
      vpcnet.mode: routed
    ipam:
      driver: {driver}
      config:
        - subnet: {cluster4}
        - subnet: {cluster6}
"""
WITHOUT_SUBNET = """\
  c:
    image: {image}
    command: ["sleep", "3600"]
    networks: [nosub]
  d:
    image: {image}
    command: ["sleep", "3600"]
    networks: [nosub]
""", """\
  nosub:
    driver: {driver}
    enable_ipv6: true
    ipam:
      driver: {driver}
"""


def compose_command(docker: list[str]) -> tuple[list[str], dict | None]:
    """`docker compose` and its environment: the engine's own Compose v2, else the one
    tests/engines/fetch-docker.sh keeps beside Docker 28 (a CLI plugin also Docker 20.10's CLI runs)."""
    if run([*docker, "compose", "version"], check=False).returncode == 0:
        return [*docker, "compose"], None
    fetch = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engines", "fetch-docker.sh")
    cache = run([fetch], check=False, timeout=900).stdout.strip()
    env = dict(os.environ, DOCKER_CONFIG=os.path.join(cache, "docker-config"))
    if not cache or run([*docker, "compose", "version"], check=False, env=env).returncode != 0:
        pytest.fail("needs Compose v2: the engine's `docker compose`, or tests/engines/fetch-docker.sh's")
    return [*docker, "compose"], env


def test_compose_enable_ipv6_with_and_without_an_ipv6_subnet_and_ipv6_address(
        plugin_factory, dock, tmp_path, ipv6_sysctls_kept):
    """Compose's `enable_ipv6: true` on two vpcnet networks, one with IPv4 and IPv6 `ipam.config` subnets
    (cluster CIDRs) and a service's `ipv6_address`, one without any (the default cluster CIDRs): the two
    services of each are dual-stack and reach each other over IPv6, and `down` leaves no network, endpoint,
    veth or IPv6 route. (One network per container: two dual-stack vpcnet networks on one container are not
    supported, docs/usage.md.)"""
    cluster6 = f"fd{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::/48"
    default6 = f"fd{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::/48"
    plugin = plugin_factory({"VPCNET_CLUSTER_CIDR_V6": default6})
    cluster4 = free_cluster(100, 227, (plugin.cluster,))
    wanted = str(ipaddress.IPv6Network(cluster6).network_address + 0x77)   # in this host's first /80 of it
    command, env = compose_command(dock.docker)
    parts = [WITH_SUBNET, WITHOUT_SUBNET]
    projects = {}
    veths = lambda: {w for w in run(["ip", "-o", "link"]).stdout.split() if w.startswith("vh")}   # noqa: E731
    before = veths()

    def project(parts) -> list[str]:
        name = unique("vpc6c")
        path = tmp_path / f"{name}.yml"
        text = "services:\n" + "".join(p[0] for p in parts) + "networks:\n" + "".join(p[1] for p in parts)
        path.write_text(text.format(image=dock.image, driver=plugin.name, wanted=wanted, cluster4=cluster4,
                                    cluster6=cluster6))
        projects[name] = [*command, "-p", name, "-f", str(path)]
        return projects[name]

    try:
        compose = project(parts)
        up = run([*compose, "up", "-d"], check=False, timeout=180, env=env)
        assert up.returncode == 0, up.stderr
        nets = {n["cluster_cidr"]: n for n in plugin.status()["networks"]}
        assert set(nets) == {cluster4, plugin.cluster}, nets
        assert ipaddress.IPv6Network(nets[cluster4]["host_cidr_v6"]).subnet_of(ipaddress.IPv6Network(cluster6))
        assert ipaddress.IPv6Network(nets[plugin.cluster]["host_cidr_v6"]).subnet_of(ipaddress.IPv6Network(default6))
        name = compose[compose.index("-p") + 1]
        for network, one, other in (("withsub", "a", "b"), ("nosub", "c", "d")):
            full, one, other = f"{name}_{network}", f"{name}-{one}-1", f"{name}-{other}-1"
            ip6_one = addresses(dock, one, full)[1].split()[0].split("/")[0]
            ip6_other = addresses(dock, other, full)[1].split()[0].split("/")[0]
            if network == "withsub":
                assert ip6_one == wanted, "ipv6_address honoured"
            assert ping6(dock, one, ip6_other) and ping6(dock, other, ip6_one), network
        routes = run(["ip", "-6", "route", "show"]).stdout
        assert f"{wanted} dev vh" in routes, routes
    finally:
        downs = [run([*compose, "down", "--timeout", "1"], check=False, timeout=180, env=env)
                 for compose in projects.values()]
    assert all(down.returncode == 0 for down in downs), [down.stderr for down in downs]
    for name in projects:
        assert run([*dock.docker, "network", "ls", "-q", "--filter", f"name={name}_"]).stdout.split() == []
    assert plugin.status()["networks"] == [], "no network, endpoint or address left in vpcnet's store"
    assert wanted not in run(["ip", "-6", "route", "show"]).stdout
    assert veths() == before, "no veth left"


def test_a_container_on_two_dual_stack_networks_gets_each_ones_routes_on_its_own_interface(
        plugin_factory, dock, ipv6_sysctls_kept):
    """Docker installs a Join's next-hop routes without naming the interface: it asks the kernel which link
    reaches the next hop. With one fe80::1 behind every vpcnet link, the second network's IPv6 route went out
    of the first interface, and the container answered that network's traffic from the wrong link (dropped
    by the first link's anti-spoofing). Each link's own gateway (vpcnet.datapath.ipv6.link_gateway) keeps
    both ways working."""
    def cluster6() -> str:        # as `ip` prints it (no leading zeros)
        return str(ipaddress.IPv6Network(f"fd{uuid.uuid4().hex[:10]}".ljust(12, "0")[:4] + ":"
                                         + f"{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::/48"))

    first6, second6 = cluster6(), cluster6()
    plugin = plugin_factory({"VPCNET_CLUSTER_CIDR_V6": first6})
    second4 = free_cluster(120, 200, exclude=(plugin.cluster,))
    one = dock.network_create(plugin, None, "--ipv6", "--subnet", plugin.cluster, "--subnet", first6).name
    two = dock.network_create(plugin, None, "--ipv6", "--subnet", second4, "--subnet", second6).name
    a, b, c = dock.run_container(one).name, dock.run_container(two).name, dock.run_container(one).name
    dock("network", "connect", two, a)
    routes = dock.exec(a, "ip", "-6", "route").stdout
    gw_one, gw_two = (addresses(dock, a, net)[1].split()[1] for net in (one, two))
    assert gw_one != gw_two, (gw_one, gw_two)
    assert f"{first6} via {gw_one} dev eth0" in routes and f"{second6} via {gw_two} dev eth1" in routes, routes
    a_on_two = addresses(dock, a, two)[1].split()[0].split("/")[0]
    b6 = addresses(dock, b, two)[1].split()[0].split("/")[0]
    c6 = addresses(dock, c, one)[1].split()[0].split("/")[0]
    assert ping6(dock, b, a_on_two), "b reaches a on their network, and a answers from that network's link"
    a_on_one = addresses(dock, a, one)[1].split()[0].split("/")[0]
    assert ping6(dock, a, b6) and ping6(dock, a, c6) and ping6(dock, c, a_on_one)
    dock("network", "disconnect", two, a)
    assert ping6(dock, a, c6), "the first network untouched"
