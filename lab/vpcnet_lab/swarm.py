"""The lab's hosts as a Docker swarm on vpcnet's managed plugin (see docs/swarm.md).

Docker refuses legacy socket plugins in swarm mode, so each host's `vpcnet serve` is stopped and its
engine gets the managed plugin (plugin/build.sh of this checkout, no registry), set up as the lab's
plugin was: the aliyun provider against the emulator, as instance i-vpclab-hK, its state in
/var/lib/vpclab/hK/vpcnet-managed, built with `--docker-socket` and given the host's own engine socket
(/run/vpclab/hK/docker.sock), so its metrics name each task's container, swarm service and stack. A
driver answering `Scope: local` is node-local in swarm: every node runs its own IPAM, so a swarm-scoped
vpcnet network is made from a `--config-only` network on every node (`swarm_network`), and each task
gets an address of its own host's block. A config-only network made with `--ipv6` (`ipv6=`) makes the swarm
network ask for IPv6 on every node: its tasks are dual-stack (the managed plugin writes the links' IPv6
settings through its host-sys-net mount, docs/swarm.md).
"""
from __future__ import annotations

import os

from vpcnet_lab.netns import LabError, run

PLUGIN = "vpcnet:latest"
BUILD_TIMEOUT = 900.0


def build_script() -> str:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "plugin", "build.sh")
    if not os.path.exists(path):
        raise LabError(f"{path} not found: the lab's managed plugin is built from a vpcnet checkout")
    return path


def managed_state_dir(k: int) -> str:
    return f"/var/lib/vpclab/h{k}/vpcnet-managed"


def install_managed_plugin(lab, k: int, cluster_cidr: str, name: str = PLUGIN) -> None:
    """Replace host k's `vpcnet serve` by the managed plugin `name`, enabled, on `cluster_cidr`, with
    host k's engine socket (build.sh --docker-socket) for the metrics' names."""
    host = lab.host(k)
    host.stop_plugin()
    settings = dict(lab.plugin_settings(k), VPCNET_CLUSTER_CIDR=cluster_cidr)
    settings.pop("VPCNET_DOCKER_SOCKET")    # the build's default: where the docker-socket mount puts it
    os.makedirs(managed_state_dir(k), mode=0o700, exist_ok=True)
    run(["bash", build_script(), "--docker-socket", name, f"state.source={managed_state_dir(k)}",
         f"docker-socket.source={host.paths.socket}",
         *(f"{key}={value}" for key, value in settings.items())],
        env=dict(os.environ, DOCKER_HOST=host.paths.docker_host), timeout=BUILD_TIMEOUT)


def init_swarm(lab, hosts: list[int]) -> None:
    """hosts[0] initialises the swarm (the manager), the others join it as workers."""
    first = hosts[0]
    lab.docker(first, "swarm", "init", "--advertise-addr", lab.host_ip(first),
               "--listen-addr", f"{lab.host_ip(first)}:2377")
    token = lab.docker(first, "swarm", "join-token", "-q", "worker").stdout.strip()
    for k in hosts[1:]:
        lab.docker(k, "swarm", "join", "--token", token, "--advertise-addr", lab.host_ip(k),
                   f"{lab.host_ip(first)}:2377", timeout=60)


def swarm_network(lab, hosts: list[int], network: str, cluster_cidr: str, name: str = PLUGIN,
                  options: tuple[str, ...] = (), ipv6: str = "", check: bool = True):
    """A swarm-scoped vpcnet network: `NET-config` (--config-only, vpcnet IPAM on the cluster CIDR,
    `options` as -o; with `ipv6`, an IPv6 cluster CIDR, also `--ipv6 --subnet <it>`, which the swarm network
    inherits: Docker refuses --ipv6 beside --config-from) on every host, then the network itself on the
    manager, hosts[0]. Returns the last `docker network create` (check=False: its failure too)."""
    six = ("--ipv6", "--subnet", ipv6) if ipv6 else ()
    for k in hosts:
        lab.docker(k, "network", "create", "--config-only", "--ipam-driver", name, "--subnet", cluster_cidr, *six,
                   *(arg for opt in options for arg in ("-o", opt)), f"{network}-config")
    return lab.docker(hosts[0], "network", "create", "-d", name, "--scope", "swarm", "--attachable",
                      "--config-from", f"{network}-config", network, check=check)
