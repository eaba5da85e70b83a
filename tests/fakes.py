"""Shared test doubles and helpers for the unit tests of IPAM, driver and transport.

`FakeDataplane` has the same methods as `vpcnet.datapath.dataplane.Dataplane` and records what it was asked; the
real dataplane is tested against the kernel elsewhere. `make_plugin` assembles a real Store, RouteKeeper
(local provider, inside tmp_path), Ipam and NetworkDriver around the fake, the way `serve.Plugin` does.
"""
from __future__ import annotations

import copy
import os
import sqlite3
from dataclasses import dataclass
from typing import Any

from vpcnet import config as config_mod
from vpcnet.errors import DataplaneError

MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"

DATAPLANE_METHODS = ("ensure_host", "ensure_network", "delete_network", "network_exists", "stale_chains",
                     "drop_stale_chain", "drop_stale_uplink_programs", "ensure_endpoint", "ensure_endpoint_ipv6",
                     "drop_endpoint_ipv6", "delete_endpoint", "link_exists", "uplink_mtu", "overlapping_routes",
                     "repair", "features", "forget_peers", "ensure_ports", "port_taken")


class FakeDataplane:
    """In-memory stand-in for `Dataplane`: bridges, veth pairs and per-network chains as dicts/sets.

    `fail[method] = exc` makes the next calls of that method raise `exc` (before changing anything).
    """

    def __init__(self, uplink: int = 1500, features=None):
        from vpcnet.datapath.features import Features

        self.uplink = uplink
        # what the host supports (the real probe's answer type); ebpf, as on the machines the tests run on
        self.host_features = features or Features("ebpf")
        self.host_ready = False
        self.networks: dict[str, Any] = {}          # bridge -> NetworkSpec
        self.links: dict[str, dict] = {}            # host veth -> {peer, bridge, mac, mtu}
        self.chains: set[tuple[str, str]] = set()   # (table, chain)
        self.calls: list[tuple] = []
        self.fail: dict[str, Exception] = {}
        self.kernel_routes: list[str] = []         # what overlapping_routes() finds, e.g. "10.200.0.0/16 dev x"
        self.routes: dict[str, str] = {}           # routed modes: container address -> host veth (/32 routes)
        self.unrepaired: list[str] = []            # networks the last repair could not put right
        self.host_sockets: dict[tuple, str] = {}   # (proto, host ip, port[, family]) -> holder: port_taken
        self.programs: dict[str, tuple] = {}       # ebpf: host veth -> the published (proto, port) of its program

    def _call(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def called(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]

    def state(self) -> dict:
        """Everything the kernel would hold (not the call log): for before/after comparisons."""
        return copy.deepcopy({"host": self.host_ready, "networks": dict(self.networks),
                              "links": self.links, "chains": sorted(self.chains)})

    # -- the Dataplane interface ------------------------------------------------------------------
    def uplink_mtu(self) -> int:
        self._call("uplink_mtu")
        return self.uplink

    def features(self):
        return self.host_features

    def overlapping_routes(self, cidr: str) -> list[str]:
        self._call("overlapping_routes", cidr)
        return list(self.kernel_routes)

    def ensure_host(self) -> list[str]:
        self._call("ensure_host")
        problems = [] if self.host_ready else ["host chains missing"]
        self.host_ready = True
        return problems

    def repair(self, networks, lock_for=None, still_wanted=None) -> list:
        """As the real pass: compare with what the 'kernel' holds, repair and report the differences."""
        from vpcnet.datapath.spec import Repair

        self._call("repair", tuple(spec.tag for spec, _ in networks))
        self.unrepaired = []
        repairs = [Repair("firewall", "-", p) for p in self.ensure_host()]
        for spec, endpoints in networks:
            try:
                if lock_for is not None:            # as the real one: the store decides under the lock
                    with lock_for(spec):
                        pass
                if self.networks.get(spec.bridge) != spec:
                    self.ensure_network(spec)
                    repairs.append(Repair("link", spec.tag, f"bridge {spec.bridge} missing"))
                for ep in endpoints:
                    link = self.links.get(ep.host_veth)
                    if link is None:
                        continue
                    if link.get("bridge") != spec.bridge or (spec.routed and
                                                             self.routes.get(ep.address) != ep.host_veth):
                        self.ensure_endpoint(spec, ep.host_veth, ep.peer_veth, ep.mac, ep.address)
                        repairs.append(Repair("route" if spec.routed else "link", spec.tag,
                                              f"{ep.host_veth} of {ep.address}"))
            except Exception:       # as the real one: one broken network never stops the pass
                self.unrepaired.append(spec.tag)
                continue
        return repairs

    def ensure_network(self, spec) -> None:
        self._call("ensure_network", spec)
        self.networks[spec.bridge] = spec
        self.chains.add(("filter", spec.filter_chain))
        self.chains.add(("nat", spec.nat_chain))
        self.chains.add(("raw", spec.raw_chain))

    def delete_network(self, spec) -> None:
        self._call("delete_network", spec)
        self.networks.pop(spec.bridge, None)
        self.chains.discard(("filter", spec.filter_chain))
        self.chains.discard(("nat", spec.nat_chain))
        self.chains.discard(("raw", spec.raw_chain))

    def network_exists(self, spec) -> bool:
        self._call("network_exists", spec)
        return spec.bridge in self.networks

    def stale_chains(self, known_tags: set[str]) -> list[tuple[str, str]]:
        self._call("stale_chains", frozenset(known_tags))
        out = []
        for table, chain in sorted(self.chains):
            prefix = {"filter": "VPCNET-F-", "nat": "VPCNET-N-", "raw": "VPCNET-R-"}[table]
            if chain.startswith(prefix) and chain[len(prefix):] not in known_tags:
                out.append((table, chain))
        return out

    def drop_stale_chain(self, table: str, chain: str) -> None:
        self._call("drop_stale_chain", table, chain)
        self.chains.discard((table, chain))

    def drop_stale_uplink_programs(self, known_tags: set[str]) -> list[str]:
        self._call("drop_stale_uplink_programs", frozenset(known_tags))
        return []

    def ensure_endpoint(self, spec, host_veth: str, peer_veth: str, mac: str, address: str, ipv6: bool = False) -> None:
        # logged with the address only when the mode routes one (bridge mode: 5 arguments)
        bridge, mtu = spec.bridge, spec.mtu
        self._call("ensure_endpoint", bridge, host_veth, peer_veth, mac, mtu, *([address] if spec.routed else []))
        if bridge not in self.networks:
            raise DataplaneError(f"bridge {bridge} is missing")
        if host_veth not in self.links:        # like the real one: an existing pair is kept as it is
            self.links[host_veth] = {"peer": peer_veth, "mac": mac, "peer_present": True}
        self.links[host_veth].update(bridge=bridge, mtu=mtu)
        if not address:                        # an IPv6-only endpoint: no /32, no program (as the real one)
            return
        if spec.routed:                        # routed modes: a /32 route to the host end ("replace")
            self.links[host_veth]["route"] = f"{address}/32"
            self.routes[address] = host_veth
        if spec.ebpf:                          # the container program, with the endpoint's published ports
            self.programs[host_veth] = spec.published(address)

    def forget_peers(self, addresses) -> None:
        self._call("forget_peers", list(addresses))

    def ensure_endpoint_ipv6(self, spec, host_veth: str, address: str) -> None:
        self._call("ensure_endpoint_ipv6", spec.bridge, host_veth, address)
        if not spec.host_cidr_v6 and not spec.routed:
            raise DataplaneError(f"network {spec.tag} has no IPv6 block: bridge mode carries IPv6 only on "
                                 "networks created with --ipv6")
        if host_veth not in self.links:
            raise DataplaneError(f"veth {host_veth} is missing")
        if not spec.routed:                    # bridge mode: the bridge carries it, the guard names the port
            self.links[host_veth]["bridged6"] = address
            return
        self.links[host_veth]["route6"] = f"{address}/128"
        self.routes[address] = host_veth

    def drop_endpoint_ipv6(self, host_veth: str, address: str) -> None:
        self._call("drop_endpoint_ipv6", host_veth, address)
        if self.routes.get(address) == host_veth:
            del self.routes[address]
        self.links.get(host_veth, {}).pop("route6", None)

    def delete_endpoint(self, host_veth: str) -> None:
        self._call("delete_endpoint", host_veth)
        self.links.pop(host_veth, None)
        for address in [a for a, veth in self.routes.items() if veth == host_veth]:
            del self.routes[address]           # a route goes with its device

    def link_exists(self, name: str) -> bool:
        self._call("link_exists", name)
        if name in self.links:
            return True
        return any(link["peer"] == name and link.get("peer_present", True) for link in self.links.values())

    def ensure_ports(self, spec, endpoints, adding: bool = True) -> None:
        self._call("ensure_ports", spec.tag, tuple(str(p) for p in spec.ports), adding)
        if spec.bridge not in self.networks:
            raise DataplaneError(f"bridge {spec.bridge} is missing")
        self.networks[spec.bridge] = spec          # the network's rules, its published ports included
        if spec.ebpf:
            for ep in endpoints:
                if ep.host_veth in self.links:
                    self.programs[ep.host_veth] = spec.published(ep.address)

    def port_taken(self, proto: str, host_ip: str, port: int, family: str = "ipv4") -> str:
        self._call("port_taken", proto, host_ip, port, family)
        for key, holder in self.host_sockets.items():     # (proto, ip, port[, family: "ipv4" without])
            p, ip, number = key[:3]
            if (p, number, key[3] if len(key) > 3 else "ipv4") == (proto, port, family) and \
                    (not ip or not host_ip or ip == host_ip):
                return f"{host_ip or ('::' if family == 'ipv6' else '0.0.0.0')}:{port}/{proto}: {holder}"
        return ""

    def published(self) -> list[str]:
        """Every published port the 'kernel' holds, as text."""
        return sorted(str(p) for spec in self.networks.values() for p in spec.ports)

    # -- test helpers -----------------------------------------------------------------------------
    def lose_peer(self, host_veth: str) -> None:
        """The container end vanished (a sandbox deleted it, or a reboot took the whole pair)."""
        self.links[host_veth]["peer_present"] = False


def make_config(tmp_path, **env: str):
    """A Config from the environment only (no TOML file), with state and socket inside tmp_path."""
    os.makedirs(tmp_path, exist_ok=True)
    environ = {"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": str(tmp_path / "state"),
               "VPCNET_SOCKET": str(tmp_path / "vpcnet.sock"), "VPCNET_INSTANCE_ID": "i-test-host"}
    environ.update({k if k.startswith("VPCNET_") else "VPCNET_" + k.upper(): str(v) for k, v in env.items()})
    return config_mod.load(environ=environ)


@dataclass
class Assembled:
    config: Any
    store: Any
    routes: Any
    ipam: Any
    driver: Any
    dataplane: FakeDataplane
    clock: Any = None

    def app(self):
        from vpcnet.docker.transport import create_app

        return create_app(self.driver, self.ipam)

    def snapshot(self) -> dict:
        """Every sqlite table (as sorted rows) plus the fake dataplane's state."""
        return {"db": dump_db(self.config.db_path), "dataplane": self.dataplane.state()}


class Clock:
    """A settable clock for the replay window: (boot id, seconds since boot), as ipam.boot_clock."""

    def __init__(self, now: float = 1_000_000.0, boot: str = "boot-1"):
        self.now, self.boot = now, boot

    def __call__(self) -> tuple[str, float]:
        return self.boot, self.now


def make_plugin(tmp_path, dataplane: FakeDataplane | None = None, clock=None, **env: str) -> Assembled:
    from vpcnet.docker.driver import NetworkDriver
    from vpcnet.docker.ipam import Ipam
    from vpcnet.routes.keeper import RouteKeeper
    from vpcnet.state.store import Store

    config = make_config(tmp_path, **env)
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    store = Store(config.db_path)
    routes = RouteKeeper(config, store)
    clock = clock or Clock()
    prefixes = None
    if config.addressing == "eni-prefix":        # the real pool over the embedded LocalPrefixes
        from vpcnet.routes.prefixes import PrefixPool
        prefixes = PrefixPool(config, store)
    ipam = Ipam(config, store, routes, clock=clock, prefixes=prefixes)
    dataplane = dataplane or FakeDataplane()
    driver = NetworkDriver(config, store, dataplane)
    ipam.remove_leftovers, ipam.peer_on_host = driver.remove_leftovers, dataplane.link_exists
    ipam.drop_ipv6 = driver.drop_ipv6
    return Assembled(config, store, routes, ipam, driver, dataplane, clock)


def dump_db(path: str) -> dict[str, list[tuple]]:
    """All rows of all tables, sorted, read through a fresh connection (sees only committed data).

    `claims.updated` is a timestamp rewritten by every claim refresh; it is left out so a snapshot only
    compares what matters.
    """
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        out = {}
        for table in tables:
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            keep = [c for c in cols if not (table == "claims" and c == "updated")]
            rows = conn.execute(f"SELECT {', '.join(keep)} FROM {table}").fetchall()
            out[table] = sorted(rows, key=repr)
        return out
    finally:
        conn.close()
