"""IPv6-only vpcnet networks (`--ipv6 --ipv4=false`, Docker 28+) and `--internal --ipv6` against the real engine.

The plugin turns IPv6 forwarding on for the namespace it serves: the sysctls are put back at the end
(test_docker_ipv6.ipv6_sysctls_kept). The "outside" of the internal test is a namespace behind a veth of this
host that the plugin counts among its uplinks (VPCNET_UPLINKS), holding an IPv6 address outside the cluster.
"""
from __future__ import annotations

import ipaddress
import subprocess
import uuid

import pytest
from conftest import run, unique, wait_for
from test_docker_ipv6 import ipv6_sysctls_kept, ping6  # noqa: F401  (a fixture, used by name)
from test_doctor import doctor
from test_metrics import scrape

pytestmark = pytest.mark.docker


def cluster_v6() -> str:
    return f"fd{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::/48"


def inspect(dock, container: str, network: str) -> tuple[str, str, str]:
    """(IPv4 address, IPv6 address/prefix, IPv6 gateway) Docker shows for the container on `network`."""
    fmt = f'{{{{with index .NetworkSettings.Networks "{network}"}}}}[{{{{.IPAddress}}}}] ' \
          f'{{{{.GlobalIPv6Address}}}}/{{{{.GlobalIPv6PrefixLen}}}} {{{{.IPv6Gateway}}}}{{{{end}}}}'
    ip4, ip6, gw6 = dock("inspect", "-f", fmt, container).stdout.split()
    return ip4.strip("[]"), ip6, gw6


def test_ipv6_only_network_two_containers_ping_and_removal_leaves_nothing(
        current_docker, plugin_factory, dock, ipv6_sysctls_kept):  # noqa: F811
    cluster6 = cluster_v6()
    plugin = plugin_factory({"VPCNET_CLUSTER_CIDR_V6": cluster6})
    url = plugin.metrics_url()
    net = dock.network_create(plugin, None, "--ipv6", "--ipv4=false", "-o", "vpcnet.mode=routed").name
    network_id = dock("network", "inspect", "-f", "{{.Id}}", net).stdout.strip()
    status = plugin.status()["networks"][0]
    assert status["host_cidr"] == "" and status["gateway"] == ""
    block = ipaddress.IPv6Network(status["host_cidr_v6"])
    assert block.prefixlen == 80 and block.subnet_of(ipaddress.IPv6Network(cluster6))
    a, b = dock.run_container(net).name, dock.run_container(net).name
    ip4_a, ip6_a, gw6 = inspect(dock, a, net)
    assert ip4_a == "" and gw6.startswith("fe80::1:") and ipaddress.IPv6Interface(ip6_a).network.prefixlen == 128
    assert ipaddress.IPv6Interface(ip6_a).ip in block
    assert "inet " not in dock.exec(a, "ip", "-4", "addr", "show", "dev", "eth0").stdout, "no IPv4 at all"
    ip6_b = inspect(dock, b, net)[1].split("/")[0]
    assert ping6(dock, a, ip6_b) and ping6(dock, b, ip6_a.split("/")[0])
    veths = [ep["host_veth"] for ep in plugin.status()["networks"][0]["endpoints"]]
    assert len(veths) == 2 and all(ep["address"] == "" for ep in plugin.status()["networks"][0]["endpoints"])
    # -p on it: refused clearly (published ports are IPv4 only so far), nothing left behind
    refused = dock.run_container(net, "-p", "18080:80", check=False)
    assert refused.returncode != 0 and "is IPv6-only" in refused.stderr, refused.stderr
    assert len(plugin.status()["networks"][0]["endpoints"]) == 2
    # the metrics name each endpoint by its IPv6 address (it has no other)
    addresses = lambda: {dict(k[1]).get("address") for k in scrape(url) if k[0] == "vpcnet_endpoint_info"}  # noqa: E731
    assert wait_for(lambda: {ip6_a.split("/")[0], ip6_b} <= addresses(), 20), addresses()
    code, problems = doctor(plugin)
    assert not {"ipv6_guard", "stale_veth", "missing_veth", "missing_bridge"} & set(problems), problems
    dock.cleanup()
    dock.networks.clear()
    assert plugin.status()["networks"] == []
    assert not any(link.startswith(f"vpc-{network_id[:11]}") or link.split("@")[0] in veths
                   for link in run(["ip", "-o", "link"]).stdout.split() if link.endswith(":"))
    routes6 = run(["ip", "-6", "route", "show"]).stdout
    assert ip6_a.split("/")[0] not in routes6 and ip6_b not in routes6


@pytest.fixture
def outside6():
    """make(link) -> the address of a namespace behind a new veth `link` of this host, outside any cluster
    CIDR (fd5e::/16), routed back through this host. Namespace and link removed at the end."""
    made: list[tuple[str, str]] = []

    def make(link: str) -> str:
        ns, prefix = unique("vpc6o"), f"fd5e:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}:1"
        run(["ip", "netns", "add", ns])
        made.append((ns, link))
        run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "-6", "addr", "add", f"{prefix}::1/64", "dev", link, "nodad"])
        run(["ip", "link", "set", link, "up"])
        run(["ip", "-n", ns, "-6", "addr", "add", f"{prefix}::2/64", "dev", "eth0", "nodad"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", ns, "-6", "route", "add", "default", "via", f"{prefix}::1"])
        return f"{prefix}::2"

    yield make
    for ns, link in made:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_internal_ipv6_network_stays_inside_the_cluster(plugin_factory, dock, outside6,
                                                        ipv6_sysctls_kept):  # noqa: F811
    """--internal --ipv6 (refused before): its containers reach each other over IPv6, and not an IPv6 address
    outside the cluster CIDR behind an uplink, which a container of a network that is not internal reaches."""
    link = unique("v6u")
    plugin = plugin_factory({"VPCNET_UPLINKS": link})
    far = outside6(link)
    # --subnet for both families: Docker before 25 asks a remote IPAM for an IPv6 pool only then
    closed = dock.network_create(plugin, None, "--internal", "--ipv6", "--subnet", plugin.cluster, "--subnet",
                                 cluster_v6(), "-o", "vpcnet.mode=routed").name
    opened = dock.network_create(plugin, None, "--ipv6", "--subnet", "10.94.0.0/16", "--subnet", cluster_v6(),
                                 "-o", "vpcnet.mode=routed").name
    assert [n["internal"] for n in plugin.status()["networks"]] == [True, False]
    a, b = dock.run_container(closed).name, dock.run_container(closed).name
    ip6_b = inspect(dock, b, closed)[1].split("/")[0]
    assert ping6(dock, a, ip6_b), "inside the internal network"
    c = dock.run_container(opened).name
    assert any(ping6(dock, c, far) for _ in range(3)), "a network that is not internal reaches the outside"
    assert not any(ping6(dock, a, far) for _ in range(2)), "the internal network's IPv6 stays in the cluster"
    assert "--internal" in run(["ip6tables-save", "-t", "filter"]).stdout
    dock.cleanup()
    dock.networks.clear()
    assert "--internal" not in run(["ip6tables-save", "-t", "filter"]).stdout, "its rules went with it"
