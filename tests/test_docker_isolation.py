"""Real Docker: a vpcnet network and a Docker bridge network on one host are isolated from each other as two
Docker bridge networks are (docs/datapath.md, Isolation), in every mode and both directions. A vpcnet
container is to the bridge network what any outside client is: its published port answers, its
unpublished one does not; a bridge container cannot open a connection to a vpcnet container."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import DockerSession, PluginProcess, is_root, next_cluster, require, run, unique

pytestmark = pytest.mark.docker

PORT = 8080
LISTEN = ("sh", "-c", f"while true; do echo hi | nc -l -p {PORT}; done")
WEB = ("sh", "-c", f"(while true; do echo hi | nc -l -p {PORT}; done) & while true; do echo hi | nc -l -p 80; done")


@dataclass
class Site:
    plugin: PluginProcess
    dock: DockerSession
    web: str              # a container on a Docker bridge network: port 80 published, PORT not
    web_ip: str
    published: int        # the host port Docker gave port 80


def answers(where: list[str], address: str, port: int) -> bool:
    """A TCP connection from `where` (a command prefix: docker exec, or nothing for the host) to address:port
    got the listener's "hi"."""
    out = run([*where, "sh", "-c", f"nc -w 2 {address} {port} </dev/null"], check=False, timeout=30).stdout
    return "hi" in out


@pytest.fixture(scope="module")
def site(tmp_path_factory, docker_engine, test_image):
    """One plugin, one Docker bridge network with its web container, shared by every mode."""
    require(is_root(), "needs root")
    plugin = PluginProcess(tmp_path_factory.mktemp("isolation"))
    dock = DockerSession(docker_engine, test_image)
    try:
        plugin.start()
        bnet = unique("bnet")
        dock("network", "create", bnet)
        dock.networks.append(bnet)
        web = dock.run_container(bnet, "-p", "80", cmd=WEB).name
        published = int(dock("port", web, "80/tcp").stdout.split()[0].rsplit(":", 1)[1])
        yield Site(plugin, dock, web, dock.ip_of(web), published)
    finally:
        dock.cleanup()
        plugin.cleanup()


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_a_vpcnet_network_and_a_docker_bridge_network_are_isolated_both_ways(site, mode):
    dock = site.dock
    made = dock.network_create(site.plugin, None, "--subnet", next_cluster(), "-o", f"vpcnet.mode={mode}",
                               check=False)
    require(made.returncode == 0, f"{mode} network: {made.stderr.strip()}")
    vpc = dock.run_container(made.name, cmd=LISTEN).name
    vpc_ip = dock.ip_of(vpc)
    gateway = next(n["gateway"] for n in site.plugin.status()["networks"] if n["mode"] == mode)
    in_vpc, in_web = [*dock.docker, "exec", vpc], [*dock.docker, "exec", site.web]
    # both listeners answer the host (OUTPUT, not forwarding): a refusal below is the firewall's
    assert answers(in_web, "127.0.0.1", PORT) and answers(in_vpc, "127.0.0.1", PORT), "listeners up"
    # vpcnet -> the bridge network: as any outside client, the published port answers (host address:port,
    # replies included), the unpublished one does not
    assert answers(in_vpc, gateway, site.published), f"{mode}: published port of a bridge container"
    assert not answers(in_vpc, site.web_ip, PORT), f"{mode}: unpublished port of a bridge container"
    # the bridge network -> vpcnet: no new connection across the host
    assert not answers(in_web, vpc_ip, PORT), f"{mode}: bridge container -> vpcnet container"
