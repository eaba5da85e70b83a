"""`RouteKeeper`: what the rest of vpcnet asks of the routes room — IPAM's host CIDR, a reconcile pass,
`routes list|release|gc`, and the background reconciler.

The claim is written to the store so IPAM answers at once, and IPAM never waits on the cloud: until a
claim exists it answers "host CIDR not yet claimed: <reason>" (with a provider whose writes are instant,
the local one, it claims inline). A configured block (VPCNET_HOST_CIDR) is answered at once and its
route checked by the next pass.

Each pass (and `routes sync`/`release`/`gc` from the CLI) holds `<state_dir>/routes.lock` (waited for at most
PASS_LOCK_WAIT: vpcnet.state.locks.exclusive_within), so the plugin and the CLI never claim for the same
host at the same time; in one process `_lock` orders the threads.
`release` removes only this host's own routes and `gc` only routes of this host's clusters whose
next-hop instance is gone (the rules in vpcnet.routes.claims).
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from vpcnet.cloud import Provider, Route
from vpcnet.errors import NotReady, Retryable
from vpcnet.routes import claims
from vpcnet.routes.backoff import Backoff
from vpcnet.routes.claims import TRANSIENT
from vpcnet.routes.journal import Journal
from vpcnet.routes.loop import Pacing, ReconcileLoop
from vpcnet.routes.sync import PENDING_POLL, Sync, SyncResult
from vpcnet.routes.tables import RouteTables
from vpcnet.state import locks

log = logging.getLogger(__name__)

PASS_LOCK_WAIT = 150.0      # longest wait for another process's pass (a pass is bounded by the backoff)


class RouteKeeper:
    """The routes room as the plugin and the CLI see it; the work is done by `Sync` (a pass),
    `RouteTables` (the cloud calls) and `ReconcileLoop` (the background reconciler)."""

    def __init__(self, config, store, provider_factory: Callable[[], Provider] | None = None,
                 backoff: Backoff | None = None, pacing: Pacing | None = None):
        self.config = config
        self.store = store
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.tables = RouteTables(config, provider_factory, backoff or Backoff(), self._stop)
        self._sync = Sync(config, store, self.tables, Journal(config.state_dir, config.cluster_cidr))
        self._loop = ReconcileLoop(config, store, self.reconcile, lambda: self.calls["create"],
                                   self._stop, self._wake, pacing)

    # -- the provider and its accounting ----------------------------------------------------------
    @property
    def provider(self) -> Provider:
        return self.tables.provider

    @property
    def instant(self) -> bool:
        """True when the provider's writes take effect at once, so IPAM may claim inline."""
        return self.tables.instant

    @property
    def calls(self) -> dict[str, int]:
        """Logical cloud calls by kind (a retried call counts once), for the benchmark and tests."""
        return self.tables.calls

    def route_table_usage(self) -> dict[str, dict[str, tuple[int, int]]]:
        """{table id: {family ("all", or "ipv4"/"ipv6" where each has its own quota): (custom entries,
        quota)}} as of the last listing; quota 0 = unknown."""
        return self.tables.route_table_usage()

    @property
    def on_leader(self) -> Callable[[], None]:
        """Told when this process becomes the host's reconciler."""
        return self._loop.on_leader

    @on_leader.setter
    def on_leader(self, fn: Callable[[], None]) -> None:
        self._loop.on_leader = fn

    def close(self) -> None:
        """Stop the background reconciler (if any) and release the provider's connections."""
        self.stop()
        self.tables.close()

    # -- clusters ---------------------------------------------------------------------------------
    def cluster_name(self, cluster: str) -> str:
        """The cluster identity written into this host's routes of `cluster`."""
        return claims.cluster_name(cluster, self.config.cluster_name)

    def clusters(self) -> list[str]:
        """The cluster CIDRs a pass reconciles: every claim's, and the default IPv4 one (the default IPv6 one
        only once a network asked for it: a host without IPv6 networks claims no IPv6 block)."""
        known = {c.cluster_cidr for c in self.store.claims()}
        known.add(self.config.cluster_cidr)
        return sorted(known)

    def known_clusters(self) -> list[str]:
        """The cluster CIDRs whose routes this host may own or collect: `clusters()` and the default IPv6
        one, claimed or not (a host that forgot its claim, or never made one, still releases its own IPv6
        route and collects a gone host's)."""
        return sorted({*self.clusters(), self.config.default_cluster_cidr_v6})

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This host's route changes one at a time across processes (plugin workers, the CLI)."""
        with locks.exclusive_within(os.path.join(self.config.state_dir, "routes.lock"), PASS_LOCK_WAIT,
                                    "changing routes", stop=self._stop):
            yield

    # -- what IPAM asks ---------------------------------------------------------------------------
    def host_cidr(self, cluster_cidr: str) -> str:
        """This host's block in `cluster_cidr`, from the store. Never waits on a cloud."""
        claim = self.store.claim(cluster_cidr)
        if claim and claim.host_cidr:
            return claim.host_cidr
        static = claims.static_host_cidr(self.config, cluster_cidr)
        if static:
            self.store.record_claim(cluster_cidr, static, static=True, reason="static; route not yet checked")
            self._wake.set()
            return static
        if claim is None:
            self.store.want_claim(cluster_cidr, "claim in progress")
        if self.instant:
            with self._lock, self._exclusive():
                self._sync.run([cluster_cidr])
            claim = self.store.claim(cluster_cidr)
            if claim and claim.host_cidr:
                return claim.host_cidr
        self._wake.set()
        claim = self.store.claim(cluster_cidr)
        reason = (claim.reason if claim else "") or "claim in progress"
        raise NotReady(f"host CIDR not yet claimed: {reason} (cluster CIDR {cluster_cidr}, provider "
                       f"{self.config.provider}; see `vpcnet routes sync`)")

    # -- one reconcile pass -----------------------------------------------------------------------
    def reconcile(self, wait_pending: float = 0.0) -> SyncResult:
        """One pass over every cluster CIDR: claim what is missing, repair what drifted.

        With `wait_pending` (seconds), keep listing every PENDING_POLL seconds, within that bound after
        the first pass, while the only problems are routes in transition (Pending/Deleting).
        """
        clock = self._loop.pacing
        with self._lock:
            result = self._pass()
            # counted from the end of the pass: a pass that waited out a boot storm's busy VPC has just
            # written its routes, which then need their few seconds of Pending like any other
            deadline = clock.monotonic() + max(0.0, wait_pending)
            while not result.ok and result.pending_only and not self._stop.is_set():
                remaining = deadline - clock.monotonic()
                if remaining <= 0:
                    break
                if clock.wait(self._stop, min(PENDING_POLL, remaining)):
                    break
                result = self._pass()
            return result

    def _pass(self) -> SyncResult:
        try:
            with self._exclusive():
                return self._sync.run(self.clusters())
        except Retryable as exc:        # the pass lock: another process is mid-pass, or we are stopping
            return SyncResult(ok=False, problems=[str(exc)], kinds=[TRANSIENT])

    # -- ownership and removal (`routes list|release|gc`) ------------------------------------------
    def owned(self, route: Route, me: str, clusters: list[str] | None = None) -> bool:
        """A route this host may delete: vpcnet's, to this instance, inside one of its cluster CIDRs and
        of that cluster's identity (or made before routes carried one)."""
        return claims.owned(route, me, clusters or self.known_clusters(), self.config.cluster_name)

    def ownership(self, route: Route, me: str, clusters: list[str] | None = None) -> str:
        """How `routes list` labels a route: mine, ours-other-host, ours-other-cluster or foreign."""
        return claims.ownership(route, me, clusters or self.known_clusters(), self.config.cluster_name)

    def table(self) -> tuple[list[str], str, list[Route]]:
        """(route table ids, this instance id, every entry of every table) for `routes list`."""
        with self._lock:
            tables = self.tables.table_ids()
            routes = [r for table in tables for r in self.tables.list_routes(table)]
            return tables, self.tables.instance_id(), routes

    def release(self) -> list[Route]:
        """Remove this host's routes from every table (decommissioning) and forget its claims."""
        with self._lock, self._exclusive():
            me = self.tables.instance_id()
            clusters = self.known_clusters()
            removed = [r for table in self.tables.table_ids() for r in self.tables.list_routes(table)
                       if self.owned(r, me, clusters)]
            for route in removed:
                self.tables.delete_route(route)
                log.info("released route %s -> %s from %s", route.destination, me, route.table,
                         extra={"event": "route_delete", "table": route.table, "destination": route.destination,
                                "next_hop": me, "outcome": "released"})
            for cluster in clusters:
                self.store.forget_claim(cluster)
            return removed

    def garbage(self) -> list[Route]:
        """vpcnet-marked routes of this host's clusters, in any table, whose next-hop instance is gone."""
        with self._lock:
            me = self.tables.instance_id()
            clusters = self.known_clusters()
            exists: dict[str, bool] = {}
            out = []
            for route in (r for table in self.tables.table_ids() for r in self.tables.list_routes(table)):
                if not claims.collectable(route, me, clusters, self.config.cluster_name):
                    continue
                if route.next_hop not in exists:
                    exists[route.next_hop] = self.tables.instance_exists(route.next_hop)
                if not exists[route.next_hop]:
                    out.append(route)
            return out

    def delete_garbage(self, routes: list[Route]) -> list[Route]:
        """Delete routes `garbage()` found; returns those deleted."""
        with self._lock, self._exclusive():
            for route in routes:
                self.tables.delete_route(route)
                log.info("removed route %s -> %s from %s (instance gone)", route.destination, route.next_hop,
                         route.table, extra={"event": "route_delete", "table": route.table,
                                             "destination": route.destination, "next_hop": route.next_hop,
                                             "outcome": "instance_gone"})
            return list(routes)

    # -- the background reconciler (vpcnet.routes.loop) -------------------------------------------
    def start_background(self) -> threading.Thread:
        return self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
