"""`vpcnet network forget NETWORK [--force]`: the operator's escape hatch for a network Docker no longer has.

vpcnet undoes what a crashed call left behind by itself (vpcnet.docker.driver: rows pending under no
lock). What it cannot tell alone is a network Docker gave up on after vpcnet finished: its CreateNetwork's
answer never reached Docker, a state file restored from a backup, an engine whose data root was wiped. Such
a network holds the host's block of its cluster CIDR, and every `docker network create` on that cluster CIDR
is refused, naming it. This command removes it in one go: under the network's lock (no Docker call about it
runs meanwhile), its row and its endpoints' rows go in one transaction, their addresses go back to the pool,
and then its kernel state (bridge or anchor, veths, /32 routes, chains and rules, eBPF programs), as a
deletion does. What the kernel refuses to give up stays recorded and the plugin's next datapath pass
removes it.

It first asks the Docker engine (DOCKER_HOST's unix socket, else /var/run/docker.sock, or --docker-socket)
whether it has the network: a network Docker has is refused (`docker network rm` is the way), and so is
one it cannot ask about, unless --force. For a managed plugin, --plugin NAME takes its state dir from
`docker plugin inspect`, as `vpcnet doctor --plugin` does.
"""
from __future__ import annotations

import os
import re
import sys
from urllib.parse import quote

from vpcnet import config as config_mod
from vpcnet.errors import InvalidRequest, NotFound, VpcnetError

FORGET_HELP = "forget a network Docker no longer has: its rows, addresses and kernel state (refuses one Docker has)"


class Refused(VpcnetError):
    """Docker still has the network, or could not be asked."""


def docker_has(docker_socket: str, network_id: str) -> tuple[bool | None, str]:
    """(True, its name) when Docker has the network, (False, "") when it answers that it does not, (None,
    why) when it cannot be asked."""
    import json

    from vpcnet.docker.engine_api import docker_status

    try:
        status, body = docker_status(docker_socket, f"/networks/{quote(network_id, safe='')}", timeout=10.0)
    except OSError as exc:
        return None, f"the Docker engine at {docker_socket} does not answer: {exc}"
    if status == 404:
        return False, ""
    if status != 200:
        return None, f"Docker at {docker_socket} answered HTTP {status}: {body[:200].decode(errors='replace')}"
    try:
        info = json.loads(body)
    except ValueError:
        return None, f"Docker at {docker_socket} answered something other than JSON"
    if info.get("Id") != network_id:       # Docker matches a name or a prefix too: only the id counts
        return False, ""
    return True, str(info.get("Name", "?"))


def forget(config, network: str, force: bool, docker_socket: str, dataplane=None, out=print) -> int:
    from vpcnet.datapath.reconciler import DatapathReconciler
    from vpcnet.state.locks import object_lock
    from vpcnet.state.store import Store

    if not os.path.exists(config.db_path):
        raise NotFound(f"no vpcnet state at {config.db_path}: point VPCNET_STATE_DIR (or --config, --plugin) at "
                       "the state the plugin uses")
    if not re.fullmatch(r"[0-9a-z]{1,64}", network or ""):
        raise InvalidRequest(f"network {network!r}: give the network's id (or a unique prefix of it), as "
                             "`vpcnet status` lists it")
    store = Store(config.db_path)
    try:
        matches = [n for n in store.networks() if n.network_id.startswith(network)]
        if not matches:
            known = ", ".join(n.network_id[:12] for n in store.networks()) or "none"
            raise NotFound(f"vpcnet has no network {network} (its networks: {known})")
        if len(matches) > 1:
            raise InvalidRequest(f"{network} is the prefix of {len(matches)} networks "
                                 f"({', '.join(n.network_id[:12] for n in matches)}): give more of the id")
        net = matches[0]
        has, why = docker_has(docker_socket, net.network_id)
        if has and not force:
            raise Refused(f"Docker still has network {why} ({net.network_id[:12]}): remove it with `docker network "
                          f"rm {why}` (vpcnet removes its part then); --force forgets it anyway and breaks it for "
                          "Docker")
        if has is None and not force:
            raise Refused(f"cannot ask Docker whether it still has network {net.network_id[:12]} ({why}): check "
                          f"`docker network ls --no-trunc | grep {net.network_id[:12]}` (or pass --docker-socket), "
                          "and if it is not there run this again with --force")
        with object_lock(config.state_dir, net.network_id):
            again = store.network(net.network_id)
            if again is None:
                out(f"network {network}: already gone (deleted meanwhile)")
                return 0
            net = again
            endpoints = store.endpoints(net.network_id)
            store.delete_network(net.network_id, leftover=True, release_addresses=True)
            if dataplane is None:
                from vpcnet.datapath.dataplane import Dataplane

                dataplane = Dataplane()
            left = DatapathReconciler(config, store, dataplane).remove_leftovers(f"network:{net.network_id}")
        kind = "anchor" if net.mode != "bridge" else "bridge"
        state = "" if net.state == "ready" else f", {net.state}"
        block, cluster = net.host_cidr or net.host_cidr_v6, net.cluster_cidr or net.cluster_cidr_v6
        out(f"forgot network {net.network_id[:12]} ({net.mode} mode{state}, host CIDR {block} of cluster {cluster}"
            f"{', not known to Docker' if has is False else ', forced'})")
        for ep in endpoints:
            out(f"  endpoint {ep.endpoint_id[:12]}: address {ep.address or ep.address_v6} released, "
                f"veth {ep.host_veth}")
        if left:
            out(f"  the kernel kept some of it ({kind} {net.bridge}, chains, routes): recorded, the plugin's next "
                "datapath pass removes it (see its log)")
        else:
            out(f"  kernel state removed: {kind} {net.bridge}, its chains and rules"
                f"{', uplink programs' if net.mode == 'ebpf' else ''}, {len(endpoints)} veth(s)")
        out(f"  `docker network create` on {cluster} can use host CIDR {block} again")
        return 0
    finally:
        store.close()


def register(sub) -> None:
    from vpcnet.config import add_config_argument
    from vpcnet.docker.engine_api import default_docker_socket

    parser = sub.add_parser("network", help="vpcnet's own view of its networks (escape hatches)")
    group = parser.add_subparsers(dest="network_command", metavar="ACTION")
    group.required = True
    cmd = group.add_parser("forget", help=FORGET_HELP, description=FORGET_HELP + ". " + __doc__.split("\n\n")[2])
    add_config_argument(cmd)
    cmd.add_argument("network", metavar="NETWORK_ID", help="the network's id, or a unique prefix (vpcnet status)")
    cmd.add_argument("--force", action="store_true",
                     help="forget it even when Docker still has it or cannot be asked")
    cmd.add_argument("--plugin", metavar="NAME", help="a managed plugin's state (settings from docker plugin "
                                                      "inspect NAME)")
    cmd.add_argument("--docker-socket", default=default_docker_socket(), metavar="PATH",
                     help="the Docker engine's API socket (default: DOCKER_HOST's unix:// path, else "
                          "/var/run/docker.sock)")

    def func(args) -> int:
        from vpcnet.cli.doctor.engine import managed_plugin

        if args.plugin:
            _, environ = managed_plugin(args.plugin, args.docker_socket)
            config = config_mod.load(None, environ=environ, check_socket_dir=False)
        else:
            config = config_mod.load(args.config, check_socket_dir=False)
        try:
            return forget(config, args.network, args.force, args.docker_socket)
        except Refused as exc:
            print(f"vpcnet: {exc}", file=sys.stderr)
            return 3

    cmd.set_defaults(func=func)
