"""`vpcnet routes list|sync|release|gc`: this host's VPC routes, from the command line.

- `list` shows every route table this host programs, with its custom entries against its quota
  (`used/quota`), and vpcnet's view of each entry: `mine` (this host's, vpcnet may delete it),
  `ours-other-host` (made by vpcnet for another instance of this host's clusters), `ours-other-cluster`
  (made by vpcnet for another cluster, or for this instance outside this host's cluster CIDRs) or
  `foreign` (system, hand-made, anything else).
- `sync` runs one reconcile pass (claim the block if needed, re-create a missing route) and waits, within
  `--wait` seconds after it, for Pending routes to become Available. Exit 0 when this host's routes are in
  place. A busy VPC is waited for while its tables keep changing (a boot storm: vpcnet.routes.backoff),
  and given up on after `--wait` seconds without any change.
  With `VPCNET_ADDRESSING=eni-prefix` (docs/eni-prefix.md) there is no route to write: `sync` runs one
  pass of this host's prefix pool instead (PrefixPool.sync: settle a lost assign, keep the warm target,
  give back what cooled), prints what it did and the prefixes per family, and exits 0 when the pass met
  no problem (a full interface or a growth pause is said, not a failure: the pass did all it could).
- `release` removes this host's routes from every table and forgets its claims (decommissioning). It
  asks nothing, but refuses while vpcnet networks still use one of those blocks (their containers would
  lose their route): delete the networks first, or pass `--force`.
- `gc` lists vpcnet-made routes of this host's clusters, in every table, whose next-hop instance no
  longer exists; `--yes` deletes them.

With `VPCNET_ADDRESSING=eni-prefix` no route is written, and the commands are about this host's prefixes:
`list` shows them per family from the store (state, addresses in use; no cloud call), `release` gives them
all back through the prefix provider (PrefixPool.release_all: refused while vpcnet networks or addresses
use them, unless `--force`), and `gc` refuses (exit 2): a vanished instance's prefixes went with its
interface, so there is nothing to collect; it names `routes release` and `routes sync` instead.

Exit codes: 0 done; 1 a cloud or route problem (the reason on stderr); 2 a configuration error.
All of them read the same configuration and state dir as `vpcnet serve`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from vpcnet import config as config_mod
from vpcnet.cloud import Route
from vpcnet.routes.tables import FAMILY_NAMES
from vpcnet.state.store import Network

EXIT_PROBLEM = 1
EXIT_CONFIG = 2


def register(sub) -> None:
    from vpcnet.config import add_config_argument

    routes = sub.add_parser("routes", help="this host's VPC routes: list, sync, release, gc",
                            description="This host's VPC routes. Exit 0 done, 1 a cloud or route "
                            "problem (reason on stderr), 2 a configuration error.")
    actions = routes.add_subparsers(dest="routes_command", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("list", help="show the route table, vpcnet's routes marked (eni-prefix addressing: "
                                        "this host's prefixes)")
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("sync", help="one reconcile pass; exit 0 when this host's routes are in place "
                                        "(eni-prefix addressing: one prefix pass)")
    add_config_argument(p)
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to keep trying: retries of failing cloud calls (at least 2 s, at most "
                        "60); a busy VPC (TaskConflict, throttling: a boot storm) while its route tables "
                        "do not change at all (one that keeps changing is waited for, up to 900 s); Pending "
                        "routes becoming Available, after the pass (default 60; eni-prefix addressing: "
                        "unused, a prefix pass has its own bound)")
    p.set_defaults(func=cmd_sync)

    p = actions.add_parser("release", help="remove this host's routes (eni-prefix addressing: give back its "
                                           "prefixes; decommissioning); asks nothing, but refuses while networks "
                                           "use them")
    add_config_argument(p)
    p.add_argument("--force", action="store_true", help="release even while vpcnet networks on this host use "
                                                        "the blocks or prefixes (their containers lose their "
                                                        "routes, or addresses)")
    p.set_defaults(func=cmd_release)

    p = actions.add_parser("gc", help="vpcnet routes whose next-hop instance is gone (dry run unless --yes; "
                                      "refused in eni-prefix addressing)")
    add_config_argument(p)
    p.add_argument("--yes", action="store_true", help="delete them (default: only show them)")
    p.set_defaults(func=cmd_gc)


# -- plumbing ---------------------------------------------------------------------------------------
def _open(args, deadline: float | None = None, busy_deadline: float | None = None):
    """(config, store, keeper) for a command; logging to stderr, quiet unless VPCNET_LOG_LEVEL=DEBUG.
    `deadline` bounds the retries of one failing cloud call (default: the keeper's 60 s),
    `busy_deadline` those of a busy cloud (default: the keeper's BUSY_DEADLINE)."""
    from vpcnet.observability.logs import setup_logging
    from vpcnet.routes.backoff import Backoff
    from vpcnet.routes.keeper import RouteKeeper
    from vpcnet.state.store import Store

    config = config_mod.load(args.config, check_socket_dir=False)
    setup_logging("DEBUG" if config.log_level.upper() == "DEBUG" else "WARNING")
    store = Store(config.db_path)
    backoff = None
    if deadline is not None or busy_deadline is not None:
        backoff = Backoff(deadline=60.0 if deadline is None else deadline, busy_deadline=busy_deadline)
    return config, store, RouteKeeper(config, store, backoff=backoff)


def sync_deadlines(wait: float) -> dict[str, float]:
    """The backoff bounds of `routes sync --wait WAIT` (`Backoff` fields): also used by the storm harness
    (vpcnet_lab.emulator.vstorm), which runs what `routes sync` runs on a fake clock."""
    return {"deadline": max(2.0, min(60.0, wait)), "busy_deadline": max(2.0, wait)}


def _close(store, keeper) -> None:
    keeper.close()
    store.close()


def _line(route: Route, owner: str) -> str:
    hop = route.next_hop or (f"({route.next_hop_type})" if route.next_hop_type else "-")
    return f"{route.destination:<20} {hop:<24} {route.status:<10} {route.kind:<8} {owner}"


def _usage(used: int, quota: int) -> str:
    return f"{used}/{quota}" if quota else f"{used}/?"


def _usage_line(usage: dict[str, tuple[int, int]]) -> str:
    """`3/200`, or where each family has its own quota `IPv4 3/50, IPv6 1/50`."""
    if set(usage) <= {"all"}:
        return _usage(*usage.get("all", (0, 0)))
    return ", ".join(f"{FAMILY_NAMES[f]} {_usage(*usage[f])}" for f in sorted(usage))


def _route_json(route: Route, owner: str) -> dict:
    return {"destination": route.destination, "next_hop": route.next_hop, "next_hop_type": route.next_hop_type,
            "status": route.status, "kind": route.kind, "name": route.name, "description": route.description,
            "route_id": route.route_id, "route_table": route.table, "owner": owner}


def _warn_if_serving(config, what: str) -> None:
    if os.path.exists(config.socket):
        print(f"note: the plugin socket {config.socket} exists: if `vpcnet serve` is running, its "
              f"reconciler will {what}; stop it first when decommissioning", file=sys.stderr)


# -- commands ---------------------------------------------------------------------------------------
def _eni_prefix(args: argparse.Namespace) -> bool:
    return config_mod.load(args.config, check_socket_dir=False).addressing == "eni-prefix"


def _open_pool(args):
    """(config, store, pool) for a command in eni-prefix addressing; logging as `_open`'s."""
    from vpcnet.observability.logs import setup_logging
    from vpcnet.routes.prefixes import PrefixPool
    from vpcnet.state.store import Store

    config = config_mod.load(args.config, check_socket_dir=False)
    setup_logging("DEBUG" if config.log_level.upper() == "DEBUG" else "ERROR")
    store = Store(config.db_path)
    return config, store, PrefixPool(config, store)


def cmd_list(args: argparse.Namespace) -> int:
    if _eni_prefix(args):
        return _prefix_list(args)
    config, store, keeper = _open(args)
    try:
        tables, me, routes = keeper.table()
        clusters = keeper.clusters()
        rows = [(r, keeper.ownership(r, me)) for r in routes]       # of every cluster it may own, IPv6 too
        claims = store.claims()
        usage = keeper.route_table_usage()
        names = {c: keeper.cluster_name(c) for c in clusters}
    finally:
        _close(store, keeper)
    if args.json:
        print(json.dumps({
            "provider": config.provider, "route_table": tables[0], "instance": me, "cluster_cidrs": clusters,
            "cluster_names": names,
            "route_tables": [{"id": t, "usage": [{"family": f, "entries": n, "quota": q}
                                                 for f, (n, q) in sorted(usage.get(t, {"all": (0, 0)}).items())]}
                             for t in tables],
            "claims": [{"cluster_cidr": c.cluster_cidr, "host_cidr": c.host_cidr, "route_ok": c.route_ok,
                        "reason": c.reason} for c in claims],
            "routes": [_route_json(r, owner) for r, owner in rows]}, indent=2))
        return 0
    print(f"provider {config.provider}, this instance {me}, cluster CIDRs "
          + ", ".join(f"{c} ({names[c]})" for c in clusters))
    for table in tables:
        print(f"\nroute table {table}: {_usage_line(usage.get(table, {}))} custom entries used")
        print(f"{'DESTINATION':<20} {'NEXT HOP':<24} {'STATUS':<10} {'KIND':<8} OWNER")
        for route, owner in rows:
            if route.table == table:
                print(_line(route, owner))
    mine = sum(1 for _, owner in rows if owner == "mine")
    print(f"\n{len(rows)} entries in {len(tables)} table(s), {mine} of them this host's")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    if args.wait < 0:
        print("vpcnet: --wait must be 0 or more seconds", file=sys.stderr)
        return 2
    if _eni_prefix(args):
        return _prefix_sync(args)
    config, store, keeper = _open(args, **sync_deadlines(args.wait))
    try:
        result = keeper.reconcile(wait_pending=args.wait)
        claims = store.claims()
    finally:
        _close(store, keeper)
    for claim in claims:
        state = "route Available" if claim.route_ok else (claim.reason or "route not checked")
        print(f"{claim.cluster_cidr} -> {claim.host_cidr or '(not claimed)'}: {state}")
    if result.ok:
        print("routes in place")
        return 0
    for problem in result.problems:
        print(f"vpcnet: {problem}", file=sys.stderr)
    if result.pending_only:
        print(f"vpcnet: still not Available after {args.wait:g} s (try a longer --wait)", file=sys.stderr)
    return EXIT_PROBLEM


def _prefix_sync(args: argparse.Namespace) -> int:
    """`routes sync` in eni-prefix addressing: one pass of this host's prefix pool, what it did, and the
    prefixes per family after it."""
    config, store, pool = _open_pool(args)
    try:
        result = pool.sync()
        status = pool.status()
    finally:
        pool.close()
        store.close()
    for verb, prefixes in (("assigned", result.assigned), ("adopted (an assign whose answer was lost)", result.adopted),
                           ("released", result.released), ("forgotten (gone from the interface)", result.gone)):
        for prefix in prefixes:
            print(f"{verb} {prefix}")
    for version in result.full:
        target = f"the warm target ({config.warm_prefixes} free)" if version == 4 else "its one /80"
        print(f"IPv{version}: short of {target}, and the interface holds all the prefixes its instance type "
              "allows")
    for version, why in sorted(result.paused.items()):
        print(f"IPv{version}: new prefixes paused: {why}")
    for family in status.families:
        room = "?" if family.room is None else str(family.room)
        print(f"IPv{family.version} on {status.interface_id or '?'}: {len(family.prefixes)} prefix(es) held, "
              f"{family.addresses_in_use} address(es) in use, {family.addresses_free} free, room for {room} more")
    calls = ", ".join(f"{kind} {n}" for kind, n in sorted(result.calls.items())) or "none"
    if result.ok:
        print(f"prefixes in place (cloud calls: {calls})")
        return 0
    for problem in result.problems:
        print(f"vpcnet: {problem}", file=sys.stderr)
    return EXIT_PROBLEM


def _prefix_list(args: argparse.Namespace) -> int:
    """`routes list` in eni-prefix addressing: this host's prefixes per family, from the store (what the
    last pass learnt of the interface; no cloud call), each with its state and addresses in use."""
    import ipaddress

    config, store, pool = _open_pool(args)
    try:
        status = pool.status()
        held = store.held_prefixes()
        used = {family: {ipaddress.ip_address(a) for a in store.addresses_in_use(family)}
                for family in {p.family for p in held}}
        cluster_cidrs = [c for c in (config.cluster_cidr, config.default_cluster_cidr_v6)
                         if any(f.version == ipaddress.ip_network(c).version for f in status.families)]
    finally:
        pool.close()
        store.close()
    rows = [(p, sum(1 for a in used[p.family] if a in ipaddress.ip_network(p.prefix))) for p in held]
    if args.json:
        print(json.dumps({
            "provider": config.provider, "addressing": "eni-prefix", "interface_id": status.interface_id,
            "instance_type": status.instance_type, "cluster_cidrs": cluster_cidrs,
            "families": [{"version": f.version, "addresses_in_use": f.addresses_in_use,
                          "addresses_free": f.addresses_free, "free_prefixes": f.free_prefixes,
                          "capacity": f.capacity, "room": f.room, "paused_until": f.paused_until,
                          "pause_reason": f.pause_reason,
                          "prefixes": [{"prefix": p.prefix, "state": p.state, "addresses_in_use": n}
                                       for p, n in rows if p.family == f"ipv{f.version}"]}
                         for f in status.families]}, indent=2))
        return 0
    print(f"provider {config.provider}, addressing eni-prefix (no route is written: this host's prefixes), "
          f"interface {status.interface_id or '? (no pass yet)'}, ranges {', '.join(cluster_cidrs)}")
    for family in status.families:
        room = "?" if family.room is None else str(family.room)
        print(f"\nIPv{family.version}: {len(family.prefixes)} prefix(es), {family.addresses_in_use} address(es) "
              f"in use, {family.addresses_free} free, room for {room} more"
              + (f"; new prefixes paused: {family.pause_reason}" if family.paused_until else ""))
        print(f"{'PREFIX':<24} {'STATE':<10} IN USE")
        for prefix, count in rows:
            if prefix.family == f"ipv{family.version}":
                print(f"{prefix.prefix:<24} {prefix.state:<10} {count}")
    print(f"\n{len(held)} prefix(es) held, from the store as of the last pass (`vpcnet routes sync` runs one)")
    return 0


def _refuse_release(using: list[Network], what: str, loss: str, name: Callable[[Network], str]) -> int:
    """`routes release` refused while networks of this host still depend on what it would give back."""
    names = ", ".join(name(n) for n in using[:5])
    more = f" and {len(using) - 5} more" if len(using) > 5 else ""
    print(f"vpcnet: not released: {len(using)} vpcnet network(s) on this host {what}: {names}{more}; their "
          f"containers would {loss}. Delete those networks first (docker network rm), or pass --force",
          file=sys.stderr)
    return EXIT_PROBLEM


def _prefix_release(args: argparse.Namespace) -> int:
    """`routes release` in eni-prefix addressing: give back every prefix of this host (decommissioning)."""
    config, store, pool = _open_pool(args)
    try:
        using = store.networks()
        if using and not args.force:
            return _refuse_release(using, "still take addresses from its prefixes", "lose them",
                                   lambda n: n.network_id[:12])
        _warn_if_serving(config, "assign prefixes again (its warm pool)")
        result = pool.release_all(force=args.force)
        left = [p.prefix for p in store.held_prefixes()]
    finally:
        pool.close()
        store.close()
    for prefix in result.adopted:
        print(f"adopted {prefix} (an assign whose answer was lost)")
    for prefix in result.released:
        print(f"released {prefix}")
    for problem in result.problems:
        print(f"vpcnet: {problem}", file=sys.stderr)
    if left:
        print(f"vpcnet: {len(left)} prefix(es) still held: {', '.join(left)}", file=sys.stderr)
    if result.problems or left:
        return EXIT_PROBLEM
    print(f"released: {len(result.released)} prefix(es) given back")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    if _eni_prefix(args):
        return _prefix_release(args)
    config, store, keeper = _open(args)
    try:
        clusters = set(keeper.clusters())
        blocks = {c.host_cidr for c in store.claims() if c.host_cidr}
        using = [n for n in store.networks() if n.cluster_cidr in clusters or n.host_cidr in blocks]
        if using and not args.force:
            return _refuse_release(using, "still use its block(s)", "lose their routes",
                                   lambda n: f"{n.network_id[:12]} ({n.host_cidr})")
        _warn_if_serving(config, "claim a block again")
        removed = keeper.release()
    finally:
        _close(store, keeper)
    for route in removed:
        print(f"removed {route.destination} -> {route.next_hop} from {route.table} ({route.route_id or 'no id'})")
    print(f"released: {len(removed)} route(s) removed, claims forgotten")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    if _eni_prefix(args):
        print("vpcnet: routes gc does not apply in eni-prefix addressing: no route is written, and a vanished "
              "instance's prefixes went with its network interface, so there is nothing to collect. This "
              "host's prefixes: `vpcnet routes list`; unused ones are given back after VPCNET_PREFIX_COOLDOWN "
              "by the plugin or `vpcnet routes sync`; all of them (decommissioning): `vpcnet routes release`",
              file=sys.stderr)
        return EXIT_CONFIG
    config, store, keeper = _open(args)
    try:
        garbage = keeper.garbage()
        if args.yes and garbage:
            keeper.delete_garbage(garbage)
    finally:
        _close(store, keeper)
    verb = "removed" if args.yes else "would remove"
    for route in garbage:
        print(f"{verb} {route.destination} -> {route.next_hop} from {route.table} ({route.route_id or 'no id'}): "
              "instance gone")
    if not garbage:
        print("no vpcnet route points at a vanished instance")
    elif not args.yes:
        print(f"{len(garbage)} route(s) would be removed: run again with --yes to delete them")
    return 0

