"""`vpcnet status`: host CIDRs, networks, endpoints and their addresses and published ports, read from the state.

Published ports are shown here because `docker port` and `docker ps` cannot show a network plugin's: the
daemon reads them from EndpointOperInfo only as Go `[]types.PortBinding` (moby `getEndpointPortMapInfo`),
and a remote driver's answer arrives as decoded JSON (`[]interface{}`), which that type assertion skips.

In eni-prefix addressing (docs/eni-prefix.md) it shows, instead of host CIDRs, this host's prefixes per
family: held, addresses in use and free, how many more the interface takes, and a growth pause with its
reason (`PrefixPool.status()`, what the last pass wrote in the store).

Reads the store directly, so it works whether or not the plugin is running, and makes no cloud call. The
store is opened read-only: never migrated or written, so a running plugin's database (possibly of another
schema version) stays exactly as the plugin left it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time

from vpcnet import config as config_mod
from vpcnet.datapath.features import DEFAULT_MODE_KEY, DefaultMode
from vpcnet.routes.prefixes import PrefixPool
from vpcnet.state.store import Port, Store


def collect(config) -> dict:
    if not os.path.exists(config.db_path):
        return {"state_dir": config.state_dir, "provider": config.provider, "socket": config.socket,
                "socket_up": os.path.exists(config.socket), "addressing": config.addressing, "host_cidrs": [],
                "prefixes": None, "networks": [], "datapath_repairs": {}, "default_mode": None,
                "peer_counting": peer_line(config, None)}
    store = Store(config.db_path, readonly=True)
    try:
        networks = []
        published: dict[str, list[dict]] = {}
        for port in _ports(store):
            published.setdefault(port.endpoint_id, []).append(
                {"proto": port.proto, "host_ip": port.host_ip or ("::" if port.family == "ipv6" else "0.0.0.0"),
                 "host_port": port.host_port,
                 "container_port": port.container_port, "family": port.family})
        for net in store.networks():
            networks.append({
                "network_id": net.network_id, "bridge": net.bridge, "host_cidr": net.host_cidr,
                "cluster_cidr": net.cluster_cidr, "gateway": net.gateway, "mtu": net.mtu, "mode": net.mode,
                "internal": net.internal, "state": net.state, "host_cidr_v6": net.host_cidr_v6,
                "cluster_cidr_v6": net.cluster_cidr_v6, "gateway_v6": net.gateway_v6,
                "endpoints": [{"endpoint_id": ep.endpoint_id, "address": ep.address, "mac": ep.mac,
                               "host_veth": ep.host_veth, "state": ep.state, "address_v6": ep.address_v6,
                               "ports": published.get(ep.endpoint_id, [])} for ep in store.endpoints(net.network_id)],
            })
        repairs = store.repair_counts()
        default = _recorded_default(store)
        claims = [{"cluster_cidr": c.cluster_cidr, "host_cidr": c.host_cidr, "static": c.static,
                   "route_ok": c.route_ok, "reason": c.reason} for c in store.claims()]
        return {"state_dir": config.state_dir, "provider": config.provider, "socket": config.socket,
                "socket_up": os.path.exists(config.socket), "addressing": config.addressing,
                "host_cidrs": claims, "prefixes": _prefixes(config, store), "networks": networks,
                "datapath_repairs": repairs, "default_mode": default,
                "peer_counting": peer_line(config, default)}
    finally:
        store.close()


def _prefixes(config, store: Store) -> dict | None:
    """This host's prefixes in eni-prefix addressing (None in route-table addressing), from the store:
    PrefixPool.status() makes no cloud call. A state of a plugin before schema 8 has none."""
    if config.addressing != "eni-prefix":
        return None
    try:
        return json.loads(json.dumps(dataclasses.asdict(PrefixPool(config, store).status())))   # lists, as --json
    except sqlite3.OperationalError:
        return {"interface_id": "", "instance_type": "", "supported": True, "families": [],
                "reason": "the state was written by a plugin without eni-prefix addressing (schema before 8)"}


def _ports(store: Store) -> list[Port]:
    """The published ports; none from a state a plugin before schema 5 wrote (it has no such table)."""
    try:
        return store.ports()
    except sqlite3.OperationalError:
        return []


def _recorded_default(store: Store) -> dict | None:
    """The default mode the plugin resolved at its last start (with its own capabilities), if recorded."""
    try:
        return json.loads(store.get_meta(DEFAULT_MODE_KEY, "")) or None
    except ValueError:
        return None


def default_line(default: dict | None) -> str:
    if not default:
        return "default mode for new networks: not recorded yet (the plugin records it when it starts)"
    return "default mode for new networks: " + DefaultMode(**default).describe()


def peer_line(config, default: dict | None) -> str:
    """Who talks to whom (VPCNET_PEER_METRICS): on, or off and why. A plugin whose default mode fell back
    from ebpf cannot load eBPF programs, so it counts no peer either."""
    if config.peer_metrics != "on":
        return "peer counting: off (VPCNET_PEER_METRICS=off)"
    if config.endpoint_metrics != "container":
        return "peer counting: off (VPCNET_ENDPOINT_METRICS=service)"
    if default and default.get("fallback"):
        return f"peer counting: off, this host cannot load eBPF programs ({default['fallback']})"
    return "peer counting: on (vpcnet_endpoint_peer_*)"


def render(status: dict) -> str:
    lines = [f"provider {status['provider']}, socket {status['socket']} "
             f"({'up' if status['socket_up'] else 'down'}), state {status['state_dir']}"]
    eni_prefix = status.get("addressing") == "eni-prefix"
    if eni_prefix:
        lines += prefix_lines(status.get("prefixes"))
    if not eni_prefix or status["host_cidrs"]:
        lines.append("host CIDRs:")
    if not eni_prefix and not status["host_cidrs"]:
        lines.append("  (none claimed yet)")
    for c in status["host_cidrs"]:
        state = "route ok" if c["route_ok"] else (c["reason"] or "route not checked yet")
        lines.append(f"  {c['cluster_cidr']:<18} -> {c['host_cidr'] or '(not claimed)':<18} "
                     f"{'static, ' if c['static'] else ''}{state}")
    lines.append("networks:")
    if not status["networks"]:
        lines.append("  (none)")
    for n in status["networks"]:
        lines.append(f"  {n['network_id'][:12]}  {n['bridge']:<15} {n['host_cidr'] or '(IPv6 only)':<18} "
                     f"gw {n['gateway'] or '-'} "
                     f"mtu {n['mtu']} {n['mode']}{' internal' if n['internal'] else ''}  "
                     f"{len(n['endpoints'])} endpoint(s)")
        if n.get("host_cidr_v6"):
            lines.append(f"  {'':<12}  {'':<15} {n['host_cidr_v6']} (IPv6, cluster {n['cluster_cidr_v6']})")
        for ep in n["endpoints"]:
            v6 = f"  {ep['address_v6']}" if ep.get("address_v6") else ""
            lines.append(f"    {ep['endpoint_id'][:12]}  {ep['address'] or '-':<15} {ep['mac']}  {ep['host_veth']}{v6}")
            for p in ep.get("ports", []):
                host, container = (f"[{p['host_ip']}]", f"[{ep.get('address_v6')}]") if p.get("family") == "ipv6" \
                    else (p["host_ip"], ep["address"])
                lines.append(f"      published {host}:{p['host_port']} -> {container}:"
                             f"{p['container_port']}/{p['proto']}")
    lines.append(default_line(status.get("default_mode")))
    if status.get("peer_counting"):
        lines.append(status["peer_counting"])
    repairs = status.get("datapath_repairs") or {}
    lines.append("datapath repairs (drift found in the kernel and put right): " +
                 (", ".join(f"{kind} {n}" for kind, n in sorted(repairs.items())) or "none"))
    return "\n".join(lines)


def prefix_lines(prefixes: dict | None, now: float | None = None) -> list[str]:
    """The eni-prefix section of `render`: the interface, then one line per family (and its pause)."""
    prefixes = prefixes or {}
    interface = prefixes.get("interface_id")
    if not interface:
        head = "addressing eni-prefix, interface: not described yet (the plugin's first prefix pass does it)"
    else:
        head = f"addressing eni-prefix, interface {interface}" + (
            f" ({prefixes['instance_type']})" if prefixes.get("instance_type") else "")
    lines = [head + ":"]
    if prefixes.get("reason"):
        lines.append(f"  {'no prefixes on this instance: ' if not prefixes.get('supported', True) else ''}"
                     f"{prefixes['reason']}")
    now = time.time() if now is None else now
    for family in prefixes.get("families") or []:
        name = f"IPv{family['version']}"
        held = family["prefixes"]
        releasing = f" ({len(family['releasing'])} being released)" if family["releasing"] else ""
        room = ("room not known yet" if family["room"] is None else
                f"the interface takes {family['room']} more (of {family['capacity']})")
        lines.append(f"  {name}: {len(held)} prefix(es){releasing}"
                     f"{': ' + ', '.join(held[:8]) if held else ''}{' ...' if len(held) > 8 else ''}")
        # IPv6 has no warm pool (a host holds at most one /80): its wholly free count says nothing
        wholly = f", {family['free_prefixes']} prefix(es) wholly free" if family["version"] == 4 else ""
        lines.append(f"  {'':<{len(name)}}  {family['addresses_in_use']} address(es) in use, "
                     f"{family['addresses_free']} free{wholly}; {room}")
        if family.get("paused_until"):
            lines.append(f"  {'':<{len(name)}}  new prefixes paused for another "
                         f"{max(0.0, family['paused_until'] - now):.0f} s: {family['pause_reason']}")
    if not prefixes.get("families"):
        lines.append("  (no prefix held yet)")
    return lines


def register(sub) -> None:
    from vpcnet.config import add_config_argument

    parser = sub.add_parser("status", help="show host CIDRs (or prefixes), networks, endpoints and addresses")
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")

    def func(args) -> int:
        config = config_mod.load(args.config, check_socket_dir=False)
        status = collect(config)
        print(json.dumps(status, indent=2) if args.json else render(status))
        return 0

    parser.set_defaults(func=func)
