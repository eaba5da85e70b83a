"""End to end with the real Docker engine and kernel: what a user does with `docker network create -d vpcnet`."""
from __future__ import annotations

import concurrent.futures
import subprocess
import time

import pytest
from conftest import run, source_seen_by, unique

pytestmark = pytest.mark.docker

OUTSIDE_HOST_IP, OUTSIDE_PEER_IP = "198.51.100.1", "198.51.100.2"   # TEST-NET-2, inside a test netns


def ping(dock, container: str, target: str) -> bool:
    return dock.exec(container, "ping", "-c1", "-W2", target, check=False).returncode == 0


@pytest.fixture
def outside_link():
    """The host's end of `outside`'s veth: not the default route's device, so a plugin that reaches the
    outside through it names it among its uplinks (VPCNET_UPLINKS)."""
    return unique("vo")


@pytest.fixture
def outside(netns_factory, outside_link):
    """An 'outside world' namespace behind a veth from the host: 198.51.100.2, reached via .1."""
    ns = netns_factory("vpco")
    host_if = outside_link
    run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "addr", "add", f"{OUTSIDE_HOST_IP}/30", "dev", host_if])
    run(["ip", "link", "set", host_if, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{OUTSIDE_PEER_IP}/30", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    yield ns
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def peer_seen_by(ns: str, dock, container: str, port: int = 7007) -> str:
    """The source address the outside peer saw for a TCP connection from the container."""
    return source_seen_by(ns, OUTSIDE_PEER_IP, dock, container, port)


def test_two_containers_reach_each_other_by_name_and_address_and_the_host(plugin_factory, dock):
    plugin = plugin_factory()
    net = dock.network_create(plugin).name
    a = dock.run_container(net).name
    b = dock.run_container(net).name
    ip_a, ip_b = dock.ip_of(a), dock.ip_of(b)
    host_cidr = plugin.status()["networks"][0]["host_cidr"]
    assert ip_a != ip_b
    assert ping(dock, b, a), "by name through Docker's embedded DNS"
    assert ping(dock, a, ip_b)
    assert run(["busybox", "ping", "-c1", "-W2", ip_a], check=False).returncode == 0, "host -> container"
    gateway = plugin.status()["networks"][0]["gateway"]
    assert ping(dock, a, gateway), "container -> host (gateway)"
    inspect = dock("network", "inspect", net, "-f", "{{(index .IPAM.Config 0).Subnet}}").stdout.strip()
    assert inspect == host_cidr
    # no docker_gwbridge attachment: one interface besides lo
    links = dock.exec(a, "ip", "-o", "link").stdout
    assert len([line for line in links.splitlines() if "lo:" not in line]) == 1, links


def test_outside_traffic_is_masqueraded_but_no_nat_destinations_keep_the_source(plugin_factory, dock, outside,
                                                                               outside_link):
    plugin = plugin_factory({"VPCNET_UPLINKS": outside_link})
    net = dock.network_create(plugin).name
    c = dock.run_container(net).name
    assert peer_seen_by(outside, dock, c) == OUTSIDE_HOST_IP

    plugin2 = plugin_factory({"VPCNET_NO_NAT_CIDRS": "198.51.100.0/30", "VPCNET_UPLINKS": outside_link})
    net2 = dock.network_create(plugin2).name
    c2 = dock.run_container(net2).name
    host_cidr = plugin2.status()["networks"][0]["host_cidr"]
    run(["ip", "-n", outside, "route", "add", host_cidr, "via", OUTSIDE_HOST_IP])
    assert peer_seen_by(outside, dock, c2) == dock.ip_of(c2)


def test_internal_network_has_no_outside_access(plugin_factory, dock, outside, outside_link):
    plugin = plugin_factory({"VPCNET_UPLINKS": outside_link})         # even by an uplink
    net = dock.network_create(plugin, None, "--internal").name
    a = dock.run_container(net).name
    b = dock.run_container(net).name
    assert ping(dock, a, b)
    assert peer_seen_by(outside, dock, a) == ""
    assert not ping(dock, a, OUTSIDE_PEER_IP)


def test_requested_ip_is_honoured_and_a_taken_one_refused(plugin_factory, dock):
    plugin = plugin_factory()
    # Docker honours --ip only on networks with a user-configured subnet: give the cluster CIDR.
    net = dock.network_create(plugin, None, "--subnet", plugin.cluster).name
    host_cidr = plugin.status()["networks"][0]["host_cidr"]
    wanted = host_cidr.rsplit(".", 1)[0] + ".77"
    a = dock.run_container(net, "--ip", wanted).name
    assert dock.ip_of(a) == wanted
    refused = dock.run_container(net, "--ip", wanted, check=False)
    assert refused.returncode != 0
    assert f"address {wanted} is already in use" in refused.stderr
    other_block = plugin.cluster.split(".")[0] + "." + plugin.cluster.split(".")[1] + ".200.5"
    refused = dock.run_container(net, "--ip", other_block, check=False)    # another host's block
    assert refused.returncode != 0 and other_block in refused.stderr
    assert ping(dock, a, plugin.status()["networks"][0]["gateway"])


def test_mtu_option_and_uplink_default(plugin_factory, dock):
    plugin = plugin_factory()
    net = dock.network_create(plugin, None, "-o", "com.docker.network.driver.mtu=9000").name
    c = dock.run_container(net).name
    assert "mtu 9000" in dock.exec(c, "ip", "link", "show", "eth0").stdout
    bridge = plugin.status()["networks"][0]["bridge"]
    assert "mtu 9000" in run(["ip", "link", "show", bridge]).stdout
    # without the option: the uplink's MTU, never the overlay's 1450
    plugin2 = plugin_factory()
    net2 = dock.network_create(plugin2).name
    c2 = dock.run_container(net2).name
    uplink = run(["ip", "route", "show", "default"]).stdout.split()
    dev = uplink[uplink.index("dev") + 1] if "dev" in uplink else None
    want = int(open(f"/sys/class/net/{dev}/mtu").read()) if dev else 1500
    assert f"mtu {want}" in dock.exec(c2, "ip", "link", "show", "eth0").stdout
    bad = dock.network_create(plugin2, None, "-o", "com.docker.network.driver.mtu=abc", "--subnet", "10.98.0.0/16",
                              check=False)
    assert bad.returncode != 0 and "not a number" in bad.stderr
    assert len(plugin2.status()["networks"]) == 1


def test_second_network_on_the_default_cluster_cidr_is_refused_at_once(plugin_factory, dock):
    """Docker re-asks forever for an auto pool that overlaps a host route: vpcnet must refuse instead."""
    plugin = plugin_factory()
    dock.network_create(plugin)
    started = time.monotonic()
    dup = dock.network_create(plugin, check=False)
    assert dup.returncode != 0 and "already used by network" in dup.stderr
    assert time.monotonic() - started < 10
    assert plugin.log().count("/IpamDriver.RequestPool") < 10


def test_two_networks_on_different_cluster_cidrs(plugin_factory, dock):
    plugin = plugin_factory()
    net1 = dock.network_create(plugin).name
    other_cluster = "10.99.0.0/16"
    net2 = dock.network_create(plugin, None, "--subnet", other_cluster).name
    subnets = {n["cluster_cidr"]: n["host_cidr"] for n in plugin.status()["networks"]}
    assert set(subnets) == {plugin.cluster, other_cluster}
    assert subnets[other_cluster].startswith("10.99.")
    a = dock.run_container(net1).name
    b = dock.run_container(net2).name
    assert dock.ip_of(b).startswith("10.99.")
    assert ping(dock, a, dock.ip_of(b)), "routed between the two bridges, no NAT inside the host"
    dup = dock.network_create(plugin, None, "--subnet", other_cluster, check=False)
    assert dup.returncode != 0 and "already used by network" in dup.stderr
    bad = dock.network_create(plugin, None, "--subnet", "192.168.250.0/24", check=False)
    assert bad.returncode != 0 and "neither a cluster CIDR" in bad.stderr
    # the refused creates released nothing the first networks use
    assert ping(dock, a, dock.ip_of(b))


def test_twenty_parallel_runs_get_distinct_reachable_addresses(plugin_factory, dock):
    plugin = plugin_factory()
    net = dock.network_create(plugin).name
    names = [unique("p") for _ in range(20)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda n: dock.run_container(net, name=n, check=False), names))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    ips = [dock.ip_of(n) for n in names]
    assert len(set(ips)) == 20
    for ip in ips:
        assert run(["busybox", "ping", "-c1", "-W2", ip], check=False).returncode == 0, ip
    status = plugin.status()
    assert sorted(ep["address"] for ep in status["networks"][0]["endpoints"]) == sorted(ips)


def test_pool_exhaustion_is_a_clear_error(plugin_factory, dock):
    plugin = plugin_factory({"VPCNET_HOST_PREFIX": "29"})     # gateway + 5 containers
    net = dock.network_create(plugin).name
    for _ in range(5):
        dock.run_container(net)
    refused = dock.run_container(net, check=False)
    assert refused.returncode != 0
    assert "exhausted: all 5 container addresses are in use" in refused.stderr


def test_plugin_kill9_keeps_traffic_and_restart_serves_old_and_new(plugin_factory, dock):
    plugin = plugin_factory()
    net = dock.network_create(plugin).name
    a = dock.run_container(net).name
    b = dock.run_container(net).name
    plugin.kill9()
    assert ping(dock, a, dock.ip_of(b)), "the kernel forwards while the plugin is down"
    assert plugin.start() < 1.0, "socket up within one second"
    c = dock.run_container(net).name
    assert ping(dock, c, a)
    dock("rm", "-f", b)
    assert len(plugin.status()["networks"][0]["endpoints"]) == 2


def test_sigterm_removes_socket_keeps_datapath_and_stale_socket_is_replaced(plugin_factory, dock):
    import os
    import stat

    plugin = plugin_factory()
    assert stat.S_IMODE(os.stat(plugin.socket).st_mode) & 0o007 == 0, "socket not world-accessible"
    net = dock.network_create(plugin).name
    a = dock.run_container(net).name
    b = dock.run_container(net).name
    assert plugin.stop() == 0
    assert not os.path.exists(plugin.socket)
    assert ping(dock, a, dock.ip_of(b))
    plugin.kill9() if plugin.proc.poll() is None else None
    # a stale socket file (left by a crash) is replaced at start
    import socket as socketlib
    stale = socketlib.socket(socketlib.AF_UNIX)
    stale.bind(plugin.socket)
    stale.close()
    plugin.start()
    assert ping(dock, dock.run_container(net).name, a)


def test_removal_leaves_nothing_behind(plugin_factory, dock):
    plugin = plugin_factory()
    net = dock.network_create(plugin).name
    for _ in range(3):
        dock.run_container(net)
    status = plugin.status()["networks"][0]
    bridge, tag = status["bridge"], status["network_id"][:12]
    veths = [ep["host_veth"] for ep in status["endpoints"]]
    dock.cleanup()
    assert plugin.status()["networks"] == []
    links = run(["ip", "-o", "link"]).stdout
    assert bridge not in links and not any(v in links for v in veths)
    rules = run(["iptables-save"]).stdout
    assert tag not in rules
    assert status["host_cidr"] not in run(["ip", "route"]).stdout


def test_start_after_a_reboot_rebuilds_bridge_and_rules_from_state(plugin_factory, dock):
    plugin = plugin_factory()
    net = dock.network_create(plugin).name
    status = plugin.status()["networks"][0]
    bridge, tag = status["bridge"], status["network_id"][:12]
    assert plugin.stop() == 0
    # what a reboot leaves: state on disk, no bridge, no rules
    run(["ip", "link", "del", bridge])
    for table, parent, chain in (("filter", "VPCNET-FORWARD", f"VPCNET-F-{tag}"),
                                 ("nat", "VPCNET-POSTROUTING", f"VPCNET-N-{tag}")):
        rules = run(["iptables", "-t", table, "-S", parent]).stdout.splitlines()
        for rule in rules:
            if rule.endswith(f"-j {chain}"):
                run(["iptables", "-t", table, "-D", *rule.split()[1:]])
        run(["iptables", "-t", table, "-F", chain])
        run(["iptables", "-t", table, "-X", chain])
    plugin.start()
    addrs = run(["ip", "-4", "-o", "addr", "show", bridge]).stdout
    assert f"{status['gateway']}/" in addrs
    rules = run(["iptables-save"]).stdout
    assert f"VPCNET-F-{tag}" in rules and f"VPCNET-N-{tag}" in rules
    a = dock.run_container(net).name
    b = dock.run_container(net).name
    assert ping(dock, a, b) and ping(dock, a, status["gateway"])


def test_routed_mode_network_without_a_bridge(plugin_factory, dock, outside, outside_link):
    """`-o vpcnet.mode=routed`: no bridge, proxy ARP and a /32 route per container; same behaviour."""
    plugin = plugin_factory({"VPCNET_UPLINKS": outside_link})
    net = dock.network_create(plugin, None, "-o", "vpcnet.mode=routed").name
    status = plugin.status()["networks"][0]
    anchor, gateway = status["bridge"], status["gateway"]
    assert "bridge" not in run(["ip", "-d", "link", "show", anchor]).stdout
    a = dock.run_container(net).name
    b = dock.run_container(net).name
    ip_a = dock.ip_of(a)
    host_veth = next(ep["host_veth"] for ep in plugin.status()["networks"][0]["endpoints"] if ep["address"] == ip_a)
    assert "master" not in run(["ip", "-d", "link", "show", host_veth]).stdout
    assert f"{ip_a} dev {host_veth}" in run(["ip", "-4", "route", "show"]).stdout
    assert ping(dock, b, a), "by name through Docker's embedded DNS"
    assert ping(dock, a, dock.ip_of(b))
    assert ping(dock, a, gateway), "container -> host (gateway)"
    assert run(["busybox", "ping", "-c1", "-W2", ip_a], check=False).returncode == 0, "host -> container"
    assert peer_seen_by(outside, dock, a) == OUTSIDE_HOST_IP, "outside: masqueraded"
    bad = dock.network_create(plugin, None, "-o", "vpcnet.mode=ipvlan", "--subnet", "10.98.0.0/16", check=False)
    assert bad.returncode != 0 and "unknown mode" in bad.stderr
    dock.cleanup()
    assert anchor not in run(["ip", "-o", "link"]).stdout and host_veth not in run(["ip", "-o", "link"]).stdout
    assert ip_a not in run(["ip", "-4", "route", "show"]).stdout
    assert status["network_id"][:12] not in run(["iptables-save"]).stdout
