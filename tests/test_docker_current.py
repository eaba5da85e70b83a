"""What current engines (Docker 28/29) send, and their firewall, against the real engine: each case is
honoured or refused with a clear error, and a refusal leaves nothing behind.

Tests taking `current_docker` need Docker 28+ (`.ci/run` runs them through tests/engines/with-docker.sh)
and skip on older engines; the firewall test for DOCKER-USER runs on every engine.
"""
from __future__ import annotations

import pytest
from conftest import run, source_seen_by, unique, wait_for

pytestmark = pytest.mark.docker


def ping(dock, container: str, target: str) -> bool:
    return dock.exec(container, "ping", "-c1", "-W2", target, check=False).returncode == 0


def ip_on(dock, container: str, network: str) -> str:
    return dock("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
                container).stdout.strip()


def leftovers(plugin) -> tuple[int, list[str]]:
    """(endpoints vpcnet holds, its host veths on this host)."""
    endpoints = sum(len(n["endpoints"]) for n in plugin.status()["networks"])
    return endpoints, [w.rstrip(":").split("@")[0] for w in run(["ip", "-o", "link"]).stdout.split()
                       if w.startswith("vh")]


def test_gw_alloc_check_refuses_a_bad_network_before_any_pool_and_ipv4_off_names_the_flag(
        current_docker, plugin_factory, dock):
    plugin = plugin_factory()
    refused = dock.network_create(plugin, None, "--ipv4=false", check=False)     # neither family
    assert refused.returncode != 0 and "--ipv4=false" in refused.stderr, refused.stderr
    refused = dock.network_create(plugin, None, "--ipv4=false", "--ipv6", "-o", "vpcnet.mode=bridge", check=False)
    assert refused.returncode != 0 and "needs -o vpcnet.mode=routed or ebpf" in refused.stderr, refused.stderr
    # a fresh cluster CIDR with an option vpcnet does not know: refused before RequestPool claims a block
    refused = dock.network_create(plugin, None, "--subnet", "10.97.0.0/16", "-o", "bogus=1", check=False)
    assert refused.returncode != 0 and "unknown option -o bogus" in refused.stderr, refused.stderr
    assert "/IpamDriver.RequestPool" not in plugin.log()
    assert "10.97.0.0/16" not in [c["cluster_cidr"] for c in plugin.status()["host_cidrs"]], "no block claimed"
    assert plugin.status()["networks"] == []
    # and a good network goes through the check
    net = dock.network_create(plugin).name
    assert "/NetworkDriver.GwAllocCheck -> 200" in plugin.log()
    assert ping(dock, dock.run_container(net).name, plugin.status()["networks"][0]["gateway"])


def test_endpoint_sysctls_reach_vpcnets_interface_and_ifname_is_refused_leaving_nothing(
        current_docker, plugin_factory, dock):
    plugin = plugin_factory()
    net = dock.network_create(plugin).name
    sysctl = "com.docker.network.endpoint.sysctls=net.ipv4.conf.IFNAME.log_martians=1"
    c = dock.run_container(f"name={net},driver-opt={sysctl}").name
    assert dock.exec(c, "cat", "/proc/sys/net/ipv4/conf/eth0/log_martians").stdout.strip() == "1"
    before = leftovers(plugin)
    assert before[0] == 1
    refused = dock.run_container(f"name={net},driver-opt=com.docker.network.endpoint.ifname=app0", check=False)
    assert refused.returncode != 0
    assert "endpoint.ifname=app0: Docker does not let a network plugin name" in refused.stderr, refused.stderr
    bad = dock.run_container(f"name={net},driver-opt=com.docker.network.endpoint.sysctls="
                             "net.ipv4.conf.IFNAME.no_such_sysctl=1", check=False)
    assert bad.returncode != 0 and "no_such_sysctl" in bad.stderr, bad.stderr
    assert leftovers(plugin) == before, "the refused containers left no endpoint, address or veth"
    assert ping(dock, dock.run_container(net).name, dock.ip_of(c)), "the next address is still free to use"


def test_gw_priority_picks_the_default_route_and_cluster_traffic_stays_on_vpcnet(
        current_docker, plugin_factory, dock, remote_host):
    """A container on vpcnet and on a Docker bridge network: whichever gives the default route
    (gw-priority), traffic to other hosts' blocks goes out of vpcnet's interface, unNATed. Docker 29
    then sends ProgramExternalConnectivity to the gateway endpoint only: vpcnet needs none of it."""
    link = unique("vr")
    plugin = plugin_factory({"VPCNET_UPLINKS": link})
    vnet = dock.network_create(plugin).name
    bnet = unique("bnet")
    dock("network", "create", bnet)
    dock.networks.append(bnet)
    info = plugin.status()["networks"][0]
    remote, peer = remote_host(plugin.cluster, link)

    on_vpcnet = dock.run_container(f"name={vnet},gw-priority=10", "--network", f"name={bnet}").name
    assert f"default via {info['gateway']} " in dock.exec(on_vpcnet, "ip", "route").stdout

    on_bridge = dock.run_container(f"name={vnet}", "--network", f"name={bnet},gw-priority=10").name
    routes = dock.exec(on_bridge, "ip", "route").stdout
    assert f"default via {info['gateway']} " not in routes and "default via " in routes, routes
    assert f"{plugin.cluster} via {info['gateway']} dev " in routes, routes
    for c in (on_vpcnet, on_bridge):
        assert source_seen_by(remote, peer, dock, c) == ip_on(dock, c, vnet), "the container's own address"
        assert ping(dock, c, peer)


@pytest.mark.parametrize("how", ["-o vpcnet.mode=bridge", "-o vpcnet.mode=routed", "VPCNET_DEFAULT_MODE=routed",
                                 "the default"])
def test_a_docker_user_drop_blocks_a_vpcnet_flow_and_removing_it_restores_it(plugin_factory, dock, remote_host,
                                                                           how):
    """The user's DOCKER-USER rules see vpcnet's forwarded traffic (its jump sits after DOCKER-USER's) in
    bridge and routed mode, per network (-o) or host-wide (VPCNET_DEFAULT_MODE=routed): the supported way
    to filter cluster traffic on the host. The default (ebpf, on this kernel) hands cluster traffic
    past netfilter, DOCKER-USER included, as the README says: the DROP does not stop it."""
    link = unique("vr")
    plugin = plugin_factory({"VPCNET_UPLINKS": link, **(dict([how.split("=")]) if how.startswith("VPCNET_") else {})})
    net = dock.network_create(plugin, None, *(how.split(" ") if how.startswith("-o") else ())).name
    [status] = plugin.status()["networks"]
    assert status["mode"] == {"the default": "ebpf"}.get(how, how.split("=")[-1]), status
    remote, peer = remote_host(plugin.cluster, link)      # before the container: its program knows the uplinks
    c = dock.run_container(net).name
    jumps = [line.split()[-1] for line in run(["iptables", "-S", "FORWARD"]).stdout.splitlines()
             if line.startswith("-A FORWARD -j ")]
    assert jumps.index("DOCKER-USER") < jumps.index("VPCNET-FORWARD"), jumps
    assert ping(dock, c, peer)
    rule = ["DOCKER-USER", "-s", dock.ip_of(c), "-d", peer, "-m", "comment", "--comment", unique("vpct-"),
            "-j", "DROP"]
    run(["iptables", "-I", *rule])
    try:
        if status["mode"] == "ebpf":
            assert ping(dock, c, peer), "ebpf mode: cluster traffic does not meet DOCKER-USER (README)"
            counters = run(["iptables", "-v", "-S", "DOCKER-USER"]).stdout
            [line] = [line for line in counters.splitlines() if rule[-3] in line]
            assert " -c 0 0" in line, f"the DROP rule saw nothing: {line}"
        else:
            assert not ping(dock, c, peer), "a DOCKER-USER DROP applies to vpcnet traffic"
    finally:
        run(["iptables", "-D", *rule])
    # within a few pings: one lost echo on a loaded machine is not a DROP left behind
    assert wait_for(lambda: ping(dock, c, peer), 10), "and removing it restores the flow"


def test_docker28_forward_chains_and_direct_routing_drops_leave_vpcnet_traffic_alone(
        current_docker, plugin_factory, dock, remote_host):
    """Docker 28: FORWARD policy DROP, DOCKER-USER then DOCKER-FORWARD, and raw PREROUTING DROPs against
    direct routing to its own bridge containers (with a published port): vpcnet's traffic, both ways
    between another host's block and containers of a bridge and a routed network, passes."""
    policy = run(["iptables", "-S", "FORWARD"]).stdout.splitlines()[0].split()[-1]
    run(["iptables", "-P", "FORWARD", "DROP"])
    try:
        bnet = unique("bnet")
        dock("network", "create", bnet)
        dock.networks.append(bnet)
        dock.run_container(bnet, "-p", "127.0.0.1:18080:80")
        raw = run(["iptables", "-t", "raw", "-S", "PREROUTING"]).stdout
        assert "-j DROP" in raw, raw
        assert "-A FORWARD -j DOCKER-FORWARD" in run(["iptables", "-S", "FORWARD"]).stdout
        containers = []
        for mode in ("bridge", "routed"):
            link = unique("vr")
            plugin = plugin_factory({"VPCNET_UPLINKS": link})
            remote, peer = remote_host(plugin.cluster, link)
            c = dock.run_container(dock.network_create(plugin, None, "-o", f"vpcnet.mode={mode}").name).name
            assert ping(dock, c, peer), mode
            assert source_seen_by(remote, peer, dock, c) == dock.ip_of(c), mode
            assert run(["ip", "netns", "exec", remote, "busybox", "ping", "-c1", "-W2", dock.ip_of(c)],
                       check=False).returncode == 0, f"{mode}: another host's container reaches it"
            containers.append(c)
        a, b = containers
        assert ping(dock, a, dock.ip_of(b)) and ping(dock, b, dock.ip_of(a))
    finally:
        run(["iptables", "-P", "FORWARD", policy])


# -- Compose v2 -----------------------------------------------------------------------------------------
COMPOSE_FILE = """\
services:
  a:
    image: {image}
    command: ["sleep", "3600"]
    networks: [vnet]
  b:
    image: {image}
    command: ["sleep", "3600"]
    networks: [vnet]
networks:
  vnet:
    driver: {driver}
    driver_opts:
      vpcnet.mode: {mode}
    ipam:
      driver: {driver}
"""
SUBNET = """      config:
        - subnet: {subnet}
"""


def compose_up_and_down(docker: list[str], tmp_path, driver: str, image: str, mode: str = "bridge",
                        subnet: str = "") -> dict:
    """`docker compose up -d` of two services on a vpcnet network (`subnet`: a cluster CIDR), check they
    reach each other by service name, then `down`; returns what was seen while it was up."""
    require_compose(docker)
    project = unique("vpcc")
    path = tmp_path / f"{project}.yml"
    path.write_text(COMPOSE_FILE.format(image=image, driver=driver, mode=mode)
                    + (SUBNET.format(subnet=subnet) if subnet else ""))
    compose = [*docker, "compose", "-p", project, "-f", str(path)]
    try:
        run([*compose, "up", "-d"], timeout=180)
        network = f"{project}_vnet"
        seen = {"network": network,
                "driver": run([*docker, "network", "inspect", "-f", "{{.Driver}} {{.IPAM.Driver}} {{.Id}}",
                               network]).stdout.split(),
                "ping": run([*compose, "exec", "-T", "a", "ping", "-c1", "-W2", "b"], check=False).returncode == 0}
    finally:
        down = run([*compose, "down", "--timeout", "1"], check=False, timeout=180)
    assert down.returncode == 0, down.stderr
    seen["left"] = run([*docker, "network", "ls", "-q", "--filter", f"name={network}"]).stdout.split()
    return seen


def require_compose(docker: list[str]) -> None:
    if run([*docker, "compose", "version"], check=False).returncode != 0:
        pytest.fail("needs Compose v2 (`docker compose`): tests/engines/with-docker.sh provides it")


@pytest.mark.parametrize("mode", ["bridge", "routed"])
def test_compose_up_and_down_on_a_vpcnet_network_leaves_nothing_behind(current_docker, plugin_factory, dock,
                                                                      tmp_path, mode):
    plugin = plugin_factory()
    seen = compose_up_and_down(current_docker, tmp_path, plugin.name, dock.image, mode)
    assert seen["driver"][:2] == [plugin.name, plugin.name]
    assert seen["ping"], "service b by name from a, over vpcnet"
    assert seen["left"] == [], "compose down removed the network"
    assert plugin.status()["networks"] == [], "no network, endpoint or address left in vpcnet's store"
    assert leftovers(plugin) == (0, []), "no veth left"
    assert_network_gone(seen["driver"][2])


def assert_network_gone(network_id: str) -> None:
    """No bridge (or anchor), firewall chain or route of the network is left on this host."""
    from vpcnet.datapath.spec import bridge_name

    tag = network_id[:12]
    assert tag not in run(["iptables-save"]).stdout, "no chain or rule of the network"
    assert bridge_name(network_id) not in run(["ip", "-o", "link"]).stdout, "no bridge or anchor"
