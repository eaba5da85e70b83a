"""`vpcnet doctor [--json]`: what is wrong on this host, each problem named with its fix.

It reads and never repairs: the state (read-only sqlite), /proc/sys, the kernel's links and routes
(netlink), the firewall (`iptables -S`), the Docker engine's API, the plugin's `/healthz`, and the cloud's
route table (one listing; the read-only calls `vpcnet routes list` makes), or in eni-prefix addressing the
subnet's reserved ranges (one listing; never an assign or a release). Exit 0 when every check
passes, 1 otherwise, with one line per problem.

Against `vpcnet serve` it uses the same configuration (file and VPCNET_* variables) and so the same state
dir; against the managed plugin (`--plugin NAME`) it takes the plugin's settings, state mount and socket
from `docker plugin inspect`. Run it in the namespace the plugin runs in (the host's, normally).

Each check is a method returning Findings; a check that cannot run is itself a problem, so a broken
check never hides behind a green answer. The checks live in one module per domain: plugin (state,
rows a crash left pending, socket, /healthz), datapath (kernel modules, sysctls, MTU, links versus the
state, default mode), firewall (chains and jumps), engine (Docker and the managed plugin, networks either
side lacks), cloud (route tables, quota, clock, metadata), prefixes (eni-prefix addressing: the reserved
range, the interface's capacity, a growth pause, an assign left unsettled; the route-table findings are
skipped in that mode); findings holds what they share and the text and JSON renderings. This module holds the order
they run in and the sub-command.
"""
from __future__ import annotations

import logging
from typing import Callable

from vpcnet import config as config_mod
from vpcnet.cli.doctor.cloud import CloudChecks
from vpcnet.cli.doctor.datapath import DatapathChecks
from vpcnet.cli.doctor.engine import EngineChecks, managed_plugin
from vpcnet.cli.doctor.findings import Context, Finding, problem, render_json, render_text
from vpcnet.cli.doctor.firewall import FirewallChecks
from vpcnet.cli.doctor.plugin import PluginChecks
from vpcnet.cli.doctor.prefixes import PrefixChecks
from vpcnet.docker.engine_api import DOCKER_SOCKET, default_docker_socket

__all__ = ["DOCKER_SOCKET", "Doctor", "Finding", "default_docker_socket", "register"]

log = logging.getLogger(__name__)


class Doctor:
    def __init__(self, config, docker_socket: str = DOCKER_SOCKET, plugin: dict | None = None,
                 provider_factory: Callable | None = None, prefix_provider_factory: Callable | None = None):
        self.ctx = Context(config, docker_socket, plugin)
        host, engine = PluginChecks(self.ctx), EngineChecks(self.ctx)
        datapath, firewall = DatapathChecks(self.ctx), FirewallChecks(self.ctx)
        cloud = CloudChecks(self.ctx, provider_factory)
        prefixes = PrefixChecks(self.ctx, prefix_provider_factory)
        # The state first: every later check reads the networks, endpoints and claims it loads.
        self._checks: list[Callable[[], list[Finding]]] = [
            host.check_state, host.check_pending, host.check_socket, host.check_health, datapath.check_kernel,
            datapath.check_forwarding, firewall.check_firewall, firewall.check_ipv6_guard,
            datapath.check_routed_sysctls, datapath.check_mtu,
            engine.check_docker, datapath.check_kernel_objects, cloud.check_routes,
            prefixes.check_reserved_ranges, prefixes.check_prefix_pool, cloud.check_clock,
            cloud.check_metadata, datapath.check_default_mode, datapath.check_peer_counting]

    def checks(self) -> list[Callable[[], list[Finding]]]:
        return list(self._checks)

    def run(self) -> list[Finding]:
        findings: list[Finding] = []
        for check in self.checks():
            name = check.__name__.removeprefix("check_")
            try:
                findings += check()
            except Exception as exc:      # a check that cannot run is a problem, never a silent pass
                log.debug("check %s failed", name, exc_info=True)
                findings.append(problem(name, f"the check could not run: {type(exc).__name__}: {exc}",
                                        "run `vpcnet doctor` as root in the plugin's network namespace"))
        if self.ctx.store is not None:
            self.ctx.store.close()
        return findings


def register(sub) -> None:
    from vpcnet.config import add_config_argument

    parser = sub.add_parser("doctor", help="check this host and name each problem with its fix (reads only)")
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("-v", "--verbose", action="store_true", help="also list the checks that pass")
    parser.add_argument("--plugin", metavar="NAME", help="check a managed plugin (settings from docker plugin "
                                                         "inspect NAME)")
    parser.add_argument("--docker-socket", default=default_docker_socket(), metavar="PATH",
                        help=f"the Docker engine's API socket (default: DOCKER_HOST's unix:// path, else "
                             f"{DOCKER_SOCKET})")

    def func(args) -> int:
        plugin = None
        if args.plugin:
            try:
                plugin, environ = managed_plugin(args.plugin, args.docker_socket)
            except (OSError, ValueError) as exc:      # nothing else can be checked without its settings
                findings = [_unreadable_plugin(args.plugin, args.docker_socket, exc)]
                print(render_json(findings) if args.json else render_text(findings, args.verbose))
                return 1
            config = config_mod.load(None, environ=environ, check_socket_dir=False)
        else:
            config = config_mod.load(args.config, check_socket_dir=False)
        findings = Doctor(config, args.docker_socket, plugin).run()
        print(render_json(findings) if args.json else render_text(findings, args.verbose))
        return 0 if all(f.ok for f in findings) else 1

    parser.set_defaults(func=func)


def _unreadable_plugin(name: str, docker_socket: str, exc: Exception) -> Finding:
    """`--plugin NAME` when Docker cannot say what the plugin is: no engine answering, or no such plugin."""
    if isinstance(exc, OSError):
        return problem("docker", f"the Docker engine at {docker_socket} does not answer ({exc}): cannot read "
                                 f"managed plugin {name}'s settings, so nothing else was checked",
                       "start Docker (systemctl start docker), or pass --docker-socket (or set DOCKER_HOST) "
                       "naming the socket of the engine that runs the plugin")
    return problem("docker", f"cannot read managed plugin {name} from the Docker engine at {docker_socket}: "
                             f"{exc}", "`docker plugin ls` lists the installed plugins: pass --plugin NAME:TAG "
                                       "as it shows (e.g. vpcnet:latest)")
