"""Route entries as kernel routes in a "VPC router" network namespace.

Each Available entry `DEST -> instance` becomes `DEST via <instance's underlay IP>` in the namespace's
main table (or, with several emulated tables, in the kernel table given for its emulated table), so
packets between simulated hosts really follow the emulated route table. Only routes with
our own `proto` value are ever listed, replaced or removed: routes someone else installed are left alone.

`KernelMirror` keeps every kernel table in step with the emulated tables: once at start, after every
change, and every few seconds anyway (that repairs routes removed by hand and retries routes whose
gateway was not reachable yet).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import threading
from typing import Callable

log = logging.getLogger(__name__)

#: The rtnetlink protocol number marking routes installed by the emulator (unassigned upstream).
RTPROT_EMULATOR = 188
MAIN_TABLE = 254


class KernelRouteError(Exception):
    pass


class KernelRoutes:
    """Keeps the emulator's routes in one kernel routing table of one network namespace (IPv4 and IPv6: an
    IPv6 destination goes via the instance's IPv6 underlay address, since the kernel takes no IPv4 gateway
    for an IPv6 route)."""

    def __init__(self, netns: str, proto: int = RTPROT_EMULATOR, table: int = MAIN_TABLE):
        if not netns or "/" in netns or netns in (".", ".."):
            raise KernelRouteError(f"invalid network namespace name {netns!r}")
        if not os.path.exists(os.path.join("/run/netns", netns)):
            raise KernelRouteError(f"network namespace {netns!r} does not exist (create it with "
                                   f"`ip netns add {netns}`)")
        self.netns = netns
        self.proto = proto
        self.table = table

    def _open(self):
        from pyroute2 import NetNS
        # flags=0: never create the namespace, only enter an existing one.
        return NetNS(self.netns, flags=0)

    def current(self) -> dict[str, str]:
        """destination -> gateway of the routes carrying our proto."""
        ns = self._open()
        try:
            return self._current(ns)
        finally:
            ns.close()

    def _current(self, ns) -> dict[str, str]:
        return self._routes(ns)[0]

    def _routes(self, ns) -> tuple[dict[str, str], set[str]]:
        """(ours: dest -> gateway, foreign: destinations of other routes in the same table)."""
        ours, foreign = {}, set()
        routes = list(ns.get_routes(family=2, table=self.table)) + list(ns.get_routes(family=10, table=self.table))
        for route in routes:
            if route.get_attr("RTA_TABLE", route["table"]) != self.table:
                continue
            dst = route.get_attr("RTA_DST") or ("::" if route["family"] == 10 else "0.0.0.0")
            net = str(ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False))
            if route["proto"] == self.proto:
                ours[net] = route.get_attr("RTA_GATEWAY") or ""
            else:
                foreign.add(net)
        return ours, foreign

    def sync(self, desired: dict[str, str]) -> list[str]:
        """Replace/add routes so ours are exactly `desired` (dest -> gateway). Idempotent.
        Returns one message per route that could not be set (e.g. gateway not reachable yet)."""
        problems: list[str] = []
        ns = self._open()
        try:
            current, foreign = self._routes(ns)
            for dest in current:
                if dest not in desired:
                    try:
                        ns.route("del", dst=dest, proto=self.proto, table=self.table, family=_family(dest))
                    except Exception as exc:  # already gone or not ours: nothing to undo
                        if getattr(exc, "code", None) != 3:
                            problems.append(f"cannot remove route {dest}: {exc}")
            for dest, gateway in desired.items():
                if current.get(dest) == gateway:
                    continue
                if dest in foreign and dest not in current:
                    problems.append(f"not installing {dest} via {gateway}: the namespace already has a "
                                    "route to it that the emulator did not install")
                    continue
                try:
                    ns.route("replace", dst=dest, gateway=gateway, proto=self.proto, table=self.table,
                             family=_family(dest))
                except Exception as exc:
                    problems.append(f"cannot install route {dest} via {gateway}: {exc}")
        finally:
            ns.close()
        return problems

    def clear(self) -> list[str]:
        """Remove every route we installed."""
        return self.sync({})


def _family(cidr: str) -> int:
    return 10 if ":" in cidr else 2


class KernelMirror:
    """The emulated tables' routes in a router namespace. `kernel_tables` maps an emulated table to its
    kernel table number (empty: every table's routes go into the main table, the first table winning a
    destination several hold); `desired(table or None)` gives destination -> gateway for a table (None:
    all of them)."""

    def __init__(self, netns: str, kernel_tables: dict[str, int],
                 desired: Callable[[str | None], dict[str, str]]):
        self.netns = netns
        self.kernel_tables = kernel_tables
        self._desired = desired
        self._kernels = {number: KernelRoutes(netns, table=number)
                         for number in sorted(set(kernel_tables.values()) or {MAIN_TABLE})}
        self._lock = threading.Lock()
        self._dirty = threading.Event()

    def sync(self) -> list[str]:
        """Make the namespace's routes (our proto only) match the tables now. Returns problems."""
        problems = []
        with self._lock:
            for number, kernel in self._kernels.items():
                if not self.kernel_tables:
                    desired = self._desired(None)
                else:
                    desired = {}
                    for table in [t for t, n in self.kernel_tables.items() if n == number]:
                        for dest, ip in self._desired(table).items():
                            desired.setdefault(dest, ip)
                problems += kernel.sync(desired)
        for problem in problems:
            log.warning("router netns %s: %s", self.netns, problem)
        return problems

    def poke(self) -> None:
        """Something changed (or the emulator is closing): run a pass now."""
        self._dirty.set()

    def run(self, closed: threading.Event) -> None:
        """The mirror's thread: a pass on every poke and every 5 s, until `closed` is set."""
        while not closed.is_set():
            self._dirty.wait(timeout=5.0)
            self._dirty.clear()
            if closed.is_set():
                break
            try:
                self.sync()
            except Exception:   # keep the emulator serving; the next pass retries
                log.exception("router netns %s: reconcile failed", self.netns)
