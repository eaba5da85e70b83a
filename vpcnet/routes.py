"""This host's blocks and their VPC routes: claim a host CIDR, keep `host CIDR -> this instance` in place.

The route table is the cluster's shared record of who owns which block. A host finds its block as the
vpcnet-marked custom entry inside the cluster CIDR whose next hop is this instance; failing that it
picks the first free block and creates its route; a duplicate-destination answer means another host won
that block, so it takes the next one. The claim is written to the store so IPAM answers at once, and
IPAM never waits on the cloud: until a claim exists it answers "host CIDR not yet claimed: <reason>".

Ownership: vpcnet only ever deletes a route whose next hop is this instance, whose destination lies in
one of this host's cluster CIDRs, and which carries vpcnet's marker (`Route.marked`). System routes,
other hosts' routes and hand-made routes are never touched.

One reconciler runs per host whatever the number of gunicorn workers: the worker holding an exclusive
flock on `<state_dir>/reconciler.lock` runs it; if that worker dies the lock passes to another.
"""
from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from vpcnet.cloud import ROUTE_MARKER, DuplicateRoute, Provider, QuotaExceeded, Route, make_provider
from vpcnet.errors import Fatal, NotReady, Retryable, VpcnetError

log = logging.getLogger(__name__)

PENDING_POLL = 1.0          # seconds between listings while a route is Pending or a claim is open
MAX_CLAIM_ATTEMPTS = 64     # candidate blocks tried in one pass before giving up until the next


@dataclass
class Backoff:
    """Bounded exponential backoff with full jitter for retryable cloud answers."""

    attempts: int = 8
    base: float = 0.2
    cap: float = 5.0
    deadline: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def run(self, what: str, fn: Callable):
        start = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Retryable as exc:
                elapsed = time.monotonic() - start
                if attempt == self.attempts or elapsed >= self.deadline:
                    raise Retryable(f"{what}: still failing after {attempt} attempts: {exc}") from None
                delay = random.uniform(0, min(self.cap, self.base * 2 ** attempt))
                log.info("%s: retryable (%s), attempt %d, retrying in %.2fs", what, exc, attempt, delay)
                self.sleep(min(delay, max(0.0, self.deadline - elapsed)))
        raise AssertionError("unreachable")


@dataclass
class SyncResult:
    ok: bool
    problems: list[str] = field(default_factory=list)


class RouteKeeper:
    def __init__(self, config, store, provider_factory: Callable[[], Provider] | None = None,
                 backoff: Backoff | None = None):
        self.config = config
        self.store = store
        self._factory = provider_factory or (lambda: make_provider(config))
        self._provider: Provider | None = None
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.backoff = backoff or Backoff()
        self.calls = {"list": 0, "create": 0, "delete": 0}   # cloud API calls, for the benchmark

    # -- provider ---------------------------------------------------------------------------------
    @property
    def provider(self) -> Provider:
        if self._provider is None:
            self._provider = self._factory()
        return self._provider

    @property
    def instant(self) -> bool:
        """True when the provider is local and instant, so IPAM may claim inline."""
        from vpcnet.cloud import PROVIDERS
        return PROVIDERS.get(self.config.provider, "").startswith("vpcnet.cloud.local:") or bool(
            self._provider and self._provider.instant)

    def _list(self) -> list[Route]:
        self.calls["list"] += 1
        return self.backoff.run(f"list routes of {self.provider.table_id()}", self.provider.list_routes)

    # -- what IPAM asks ---------------------------------------------------------------------------
    def host_cidr(self, cluster_cidr: str) -> str:
        """This host's block in `cluster_cidr`, from the store. Never waits on a cloud."""
        claim = self.store.claim(cluster_cidr)
        if claim and claim.host_cidr:
            return claim.host_cidr
        static = self._static_host_cidr(cluster_cidr)
        if static:
            self.store.record_claim(cluster_cidr, static, static=True, reason="static; route not yet checked")
            self._wake.set()
            return static
        if claim is None:
            self.store.want_claim(cluster_cidr, "claim in progress")
        if self.instant:
            with self._lock:
                self._reconcile_clusters([cluster_cidr])
            claim = self.store.claim(cluster_cidr)
            if claim and claim.host_cidr:
                return claim.host_cidr
        self._wake.set()
        claim = self.store.claim(cluster_cidr)
        reason = claim.reason if claim else "claim in progress"
        raise NotReady(f"host CIDR not yet claimed for cluster CIDR {cluster_cidr}: {reason}")

    def _static_host_cidr(self, cluster_cidr: str) -> str:
        if self.config.host_cidr and cluster_cidr == self.config.cluster_cidr:
            return self.config.host_cidr
        return ""

    def clusters(self) -> list[str]:
        known = {c.cluster_cidr for c in self.store.claims()}
        known.add(self.config.cluster_cidr)
        return sorted(known)

    # -- one reconcile pass -----------------------------------------------------------------------
    def reconcile(self, wait_pending: float = 0.0) -> SyncResult:
        """One pass over every cluster CIDR: claim what is missing, repair what drifted.

        With `wait_pending`, keep listing (bounded) until Pending routes turn Available.
        """
        with self._lock:
            result = self._reconcile_clusters(self.clusters())
            deadline = time.monotonic() + wait_pending
            while not result.ok and wait_pending and time.monotonic() < deadline and all(
                    "Pending" in p for p in result.problems):
                time.sleep(min(PENDING_POLL, max(0.0, deadline - time.monotonic())))
                result = self._reconcile_clusters(self.clusters())
            return result

    def _reconcile_clusters(self, clusters: list[str]) -> SyncResult:
        result = SyncResult(ok=True)
        try:
            routes = self._list()
            me = self.provider.instance_id()
        except VpcnetError as exc:
            reason = f"{self.config.provider} route table unreachable: {exc}"
            for cluster in clusters:
                self._note(cluster, reason)
            log.warning("%s", reason)
            return SyncResult(ok=False, problems=[reason])
        except Exception as exc:  # a provider bug or an unexpected library error: keep serving
            log.exception("reconcile failed")
            return SyncResult(ok=False, problems=[f"reconcile failed: {type(exc).__name__}: {exc}"])
        for cluster in clusters:
            try:
                problem, routes = self._reconcile_cluster(cluster, routes, me)
            except VpcnetError as exc:
                problem = str(exc)
                self._note(cluster, problem)
            if problem:
                result.ok = False
                result.problems.append(f"{cluster}: {problem}")
        return result

    def _note(self, cluster: str, reason: str) -> None:
        claim = self.store.claim(cluster)
        if claim is None:
            self.store.record_claim(cluster, None, reason=reason)
        else:
            self.store.record_claim(cluster, claim.host_cidr, claim.static, reason=reason, route_ok=False)

    def _reconcile_cluster(self, cluster: str, routes: list[Route], me: str) -> tuple[str, list[Route]]:
        claim = self.store.claim(cluster)
        static = self._static_host_cidr(cluster)
        wanted = static or (claim.host_cidr if claim else None)
        if not wanted:
            wanted = self._find_mine(cluster, routes, me)
            if wanted:
                log.info("found this host's block %s in cluster %s (route table %s)",
                         wanted, cluster, self.provider.table_id())
        if not wanted:
            wanted, routes = self._claim_new(cluster, routes, me)
            self.store.record_claim(cluster, wanted, reason="route created, waiting for Available")
        entry = next((r for r in routes if r.destination == wanted), None)
        if entry is None:
            log.warning("route %s -> %s missing from %s: creating it", wanted, me, self.provider.table_id())
            self._create(wanted, me)
            routes = self._list()
            entry = next((r for r in routes if r.destination == wanted), None)
        problem = ""
        if entry is None:
            problem = f"route {wanted} -> {me} not visible after create"
        elif entry.next_hop != me:
            problem = (f"route for {wanted} in {self.provider.table_id()} points at {entry.next_hop or '?'}, "
                       f"not this instance {me}: another host or a hand-made route holds this block; "
                       "vpcnet does not touch routes it does not own")
        elif entry.status != "Available":
            problem = f"route {wanted} -> {me} is {entry.status}"
        self.store.record_claim(cluster, wanted, static=bool(static), reason=problem, route_ok=not problem)
        return problem, routes

    def _find_mine(self, cluster: str, routes: list[Route], me: str) -> str | None:
        net = ipaddress.IPv4Network(cluster)
        mine = sorted(
            (r.destination for r in routes
             if r.next_hop == me and r.marked and _inside(r.destination, net)
             and ipaddress.IPv4Network(r.destination).prefixlen == self.config.host_prefix),
            key=lambda d: ipaddress.IPv4Network(d))
        return mine[0] if mine else None

    def _claim_new(self, cluster: str, routes: list[Route], me: str) -> tuple[str, list[Route]]:
        net = ipaddress.IPv4Network(cluster)
        # Entries inside the cluster CIDR block what they overlap; wider ones (a default route, a VPN
        # route covering the whole cluster) do not, since a host route is more specific than them.
        taken = [d for d in (ipaddress.IPv4Network(r.destination) for r in routes if _is_v4(r.destination))
                 if d.overlaps(net) and d.prefixlen > net.prefixlen]
        taken += [ipaddress.IPv4Network(c) for c in self.provider.reserved_cidrs()]
        for candidate in _free_blocks(cluster, self.config.host_prefix, taken):
            try:
                self._create(str(candidate), me)
            except DuplicateRoute:
                routes = self._list()
                entry = next((r for r in routes if r.destination == str(candidate)), None)
                if entry is not None and entry.next_hop == me:
                    return str(candidate), routes          # our own earlier create: done
                log.info("block %s was taken by %s meanwhile; trying the next one",
                         candidate, entry.next_hop if entry else "another host")
                taken.append(candidate)
                continue
            log.info("claimed block %s in cluster %s (route table %s)", candidate, cluster,
                     self.provider.table_id())
            return str(candidate), self._list()
        raise Fatal(f"no free /{self.config.host_prefix} block left in cluster CIDR {cluster} "
                    f"(route table {self.provider.table_id()})")

    def _create(self, destination: str, me: str) -> None:
        token = uuid.uuid4().hex   # one token per logical create, reused by its retries
        name = f"{ROUTE_MARKER}-{destination.replace('.', '-').replace('/', '-')}"
        description = f"{ROUTE_MARKER}: host CIDR {destination} of {me}"
        self.calls["create"] += 1
        try:
            self.backoff.run(f"create route {destination} -> {me}",
                             lambda: self.provider.create_route(destination, name, description, token))
        except QuotaExceeded as exc:
            raise Fatal(f"route table {self.provider.table_id()} is full: {exc}") from None

    # -- ownership and removal --------------------------------------------------------------------
    def owned(self, route: Route, me: str, clusters: list[str] | None = None) -> bool:
        clusters = clusters or self.clusters()
        return (route.kind == "Custom" and route.marked and route.next_hop == me
                and any(_inside(route.destination, ipaddress.IPv4Network(c)) for c in clusters))

    def release(self) -> list[Route]:
        """Remove this host's routes (decommissioning) and forget its claims."""
        with self._lock:
            me = self.provider.instance_id()
            clusters = self.clusters()
            removed = [r for r in self._list() if self.owned(r, me, clusters)]
            for route in removed:
                self._delete(route)
            for cluster in clusters:
                self.store.forget_claim(cluster)
            return removed

    def garbage(self) -> list[Route]:
        """vpcnet-marked routes in our cluster CIDRs whose next-hop instance no longer exists."""
        clusters = [ipaddress.IPv4Network(c) for c in self.clusters()]
        out = []
        for route in self._list():
            if (route.kind == "Custom" and route.marked and route.next_hop
                    and any(_inside(route.destination, c) for c in clusters)
                    and not self.provider.instance_exists(route.next_hop)):
                out.append(route)
        return out

    def _delete(self, route: Route) -> None:
        self.calls["delete"] += 1
        self.backoff.run(f"delete route {route.destination}", lambda: self.provider.delete_route(route))

    def delete_garbage(self, routes: list[Route]) -> None:
        for route in routes:
            self._delete(route)

    # -- the background reconciler ----------------------------------------------------------------
    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="vpcnet-reconciler", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        lock_path = os.path.join(self.config.state_dir, "reconciler.lock")
        with open(lock_path, "a") as lock:
            while not self._stop.is_set():          # wait to become the host's one reconciler
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    self._stop.wait(5.0)
            log.info("reconciler running (pid %d, every %.0fs)", os.getpid(), self.config.reconcile_interval)
            while not self._stop.is_set():
                result = self.reconcile()
                if not result.ok:
                    log.warning("routes not in place: %s", "; ".join(result.problems))
                    pause = PENDING_POLL if any("Pending" in p or "claim" in p for p in result.problems) \
                        else min(self.config.reconcile_interval, 5.0)
                else:
                    pause = self.config.reconcile_interval
                self._wake.wait(pause)
                self._wake.clear()


def _is_v4(cidr: str) -> bool:
    try:
        ipaddress.IPv4Network(cidr)
        return True
    except ValueError:
        return False


def _inside(cidr: str, net: ipaddress.IPv4Network) -> bool:
    return _is_v4(cidr) and ipaddress.IPv4Network(cidr).subnet_of(net)


def _free_blocks(cluster: str, prefix: int, taken: list[ipaddress.IPv4Network]):
    """Blocks of the cluster that are not equal to, inside or around any taken destination."""
    count = 0
    for block in ipaddress.IPv4Network(cluster).subnets(new_prefix=prefix):
        if any(block.overlaps(t) for t in taken):
            continue
        yield block
        count += 1
        if count >= MAX_CLAIM_ATTEMPTS:
            return
