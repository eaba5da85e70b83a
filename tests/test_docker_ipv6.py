"""Dual-stack vpcnet networks against the real engine: `docker network create --ipv6` on a routed network
gives each container an IPv6 /128 of this host's block beside its IPv4 address, fe80::1 as its IPv6 gateway,
and two containers reach each other over IPv6 through the host; on a bridge-mode network the same, with
the block on the bridge's link, so the two resolve and reach each other on the bridge. Runs on every engine.

The plugin turns IPv6 forwarding on for the namespace it serves (the machine's own, on the shared engine):
the test puts the forwarding and accept_ra sysctls back as they were.
"""
from __future__ import annotations

import ipaddress
import uuid

import pytest
from conftest import run
from test_doctor import doctor

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
    assert gw6 == "fe80::1" and ipaddress.IPv6Interface(ip6_a).network.prefixlen == 128
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
    if bridge:      # the block routed to the bridge, the guard's rule for a's port and address
        assert f"{block} dev {bridge}" in run(["ip", "-6", "route", "show"]).stdout
        assert f"-s {ip6_a} -i {bridge} -m physdev --physdev-in {host_veth}" in \
            run(["ip6tables-save", "-t", "raw"]).stdout
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
