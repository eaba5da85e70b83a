"""The Docker engine, over its API socket: its version (old enough to lack what vpcnet needs, or one of the
releases whose dockerd crashes under a remote network driver), whether it finds the plugin (the socket
folder, or the managed plugin enabled), networks of vpcnet's driver the state does not know; and `docker
plugin inspect` of a managed plugin, whose settings doctor then checks with. `vpcnet serve` logs the same
version verdict (engine_crash). The API client itself is vpcnet.docker.engine_api."""
from __future__ import annotations

import os
import re
import time

from vpcnet.cli.doctor.findings import Checks, Finding, ok, problem
from vpcnet.docker.engine_api import docker_get

DOCKER_PLUGIN_DIRS = ("/run/docker/plugins", "/etc/docker/plugins", "/usr/lib/docker/plugins")
MIN_DOCKER = (20, 10)
# Releases whose dockerd crashes on every stop of a container whose gateway endpoint belongs to a remote
# (plugin) network driver, which on a vpcnet network is every container: [first, fixed).
CRASHING_DOCKER = ((29, 0, 0), (29, 0, 3))
CRASH_FIX = "upgrade the Docker engine to 29.0.3 or later"
_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of an engine's version string as builds and distributions spell it ("29.0.2",
    "29.0.2-1", "29.0.2+dfsg1", "v29.0.2", "5:29.0.2-1~debian.12", "29.0"); None when it names none."""
    text = text.strip()
    if re.match(r"\d+:", text):                          # a package epoch
        text = text.split(":", 1)[1]
    match = _VERSION.match(text)
    if match is None:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def engine_crash(version: str) -> str | None:
    """Why an engine of this version crashes under vpcnet (one sentence), or None."""
    numbers = parse_version(version)
    first, fixed = CRASHING_DOCKER
    if numbers is None or not first <= numbers < fixed:
        return None
    return (f"Docker {version} crashes (dockerd exits) whenever a container on a vpcnet network stops: a bug of "
            f"29.0.0 to 29.0.2 with remote network drivers, fixed in 29.0.3")


def version_findings(version: dict) -> list[Finding]:
    """The `docker` (old enough?) and `docker_version` (a crashing release?) verdicts on GET /version."""
    text = str(version.get("Version", "?"))
    numbers = parse_version(text)
    out = []
    if numbers is not None and numbers[:2] < MIN_DOCKER:
        out.append(problem("docker", f"Docker {text} is older than {'.'.join(map(str, MIN_DOCKER))}",
                           "upgrade the Docker engine"))
    else:
        out.append(ok("docker", f"Docker {text} (API {version.get('ApiVersion', '?')})"))
    crash = engine_crash(text)
    if crash:
        out.append(problem("docker_version", crash, CRASH_FIX))
    elif numbers is None:
        out.append(ok("docker_version", f"Docker {text}: not a version number, so not checked against known "
                                        f"crashes"))
    else:
        out.append(ok("docker_version", f"Docker {text} has no known crash with remote network drivers"))
    return out


def managed_plugin(name: str, docker_socket: str) -> tuple[dict, dict[str, str]]:
    """(`docker plugin inspect NAME`, its VPCNET_* settings with the state dir as seen from the host)."""
    from urllib.parse import quote

    info = docker_get(docker_socket, f"/plugins/{quote(name, safe='')}/json")
    env = dict(item.split("=", 1) for item in info.get("Settings", {}).get("Env", []) if "=" in item)
    environ = {k: v for k, v in env.items() if k.startswith("VPCNET_")}
    for mount in info.get("Settings", {}).get("Mounts", []):
        if mount.get("Destination") == environ.get("VPCNET_STATE_DIR", "/var/lib/vpcnet"):
            environ["VPCNET_STATE_DIR"] = mount.get("Source") or mount["Destination"]
    environ["VPCNET_CONFIG"] = os.devnull          # the plugin's settings are all in its Env
    return info, environ


class EngineChecks(Checks):
    def check_docker(self) -> list[Finding]:
        ctx = self.ctx
        try:
            version = docker_get(ctx.docker_socket, "/version")
        except (OSError, ValueError) as exc:
            return [problem("docker", f"the Docker engine at {ctx.docker_socket} does not answer: {exc}",
                            "start Docker (systemctl start docker), or pass --docker-socket")]
        out = version_findings(version)
        if ctx.plugin:
            if not ctx.plugin.get("Enabled"):
                out.append(problem("discovery", f"managed plugin {ctx.driver_name} is disabled",
                                   f"docker plugin enable {ctx.driver_name}"))
        elif os.path.dirname(self.config.socket) not in DOCKER_PLUGIN_DIRS:
            out.append(problem("discovery", f"socket {self.config.socket} is outside the folders Docker looks in "
                                            f"({', '.join(DOCKER_PLUGIN_DIRS)})",
                               "set VPCNET_SOCKET=/run/docker/plugins/vpcnet.sock"))
        networks = docker_get(ctx.docker_socket, "/networks")
        ours = {n["Id"]: n.get("Name", "?") for n in networks if n.get("Driver") == ctx.driver_name}
        known = {n.network_id for n in ctx.networks}
        for network_id, name in sorted(ours.items()):
            if network_id not in known:
                out.append(problem("discovery", f"Docker network {name} ({network_id[:12]}) uses driver "
                                                f"{ctx.driver_name} but vpcnet's state does not know it",
                                   f"docker network rm {name} and create it again (its state was lost)"))
        out.append(ok("discovery", f"Docker uses driver {ctx.driver_name} for {len(ours)} network(s)"))
        out += stranded_findings(ctx.networks, {n["Id"] for n in networks}, time.time())
        return out


#: A network row younger than this may be a CreateNetwork Docker has not seen answered yet (gunicorn ends a
#: call after 60 s).
STRANDED_AFTER = 90.0


def stranded_findings(networks: list, docker_ids: set[str], now: float) -> list[Finding]:
    """The other direction of `discovery`: networks in vpcnet's state that Docker does not have (its
    CreateNetwork's answer never reached Docker). Each blocks its cluster CIDR on this host."""
    out = []
    for net in networks:
        if net.network_id in docker_ids or now - net.created < STRANDED_AFTER:
            continue
        block, cluster = net.host_cidr or net.host_cidr_v6, net.cluster_cidr or net.cluster_cidr_v6
        out.append(problem("stranded", f"network {net.network_id[:12]} (host CIDR {block} of cluster {cluster}) is "
                                       "in vpcnet's state but Docker does not have it: "
                                       "`docker network create` on that cluster CIDR is refused",
                           f"vpcnet network forget {net.network_id[:12]}"))
    if not out:
        out.append(ok("stranded", "every network in vpcnet's state is one Docker has"))
    return out
