"""This host's blocks and their VPC routes: claim a host CIDR, keep `host CIDR -> this instance` in place.

The route table is the cluster's shared record of who owns which block. A host finds its block as the
vpcnet-marked custom entry inside the cluster CIDR whose next hop is this instance; failing that it
picks the first free block (not equal to, inside or around any entry's destination, nor a reserved
vSwitch/subnet CIDR when the provider knows them) and creates its route; a duplicate-destination answer
means another host won that block, so it takes the next one (an existing entry is adopted only when it
points at this instance AND carries vpcnet's marker). The claim is written to the store so IPAM answers
at once, and IPAM never waits on the cloud: until a claim exists it answers
"host CIDR not yet claimed: <reason>".

Ownership: vpcnet only ever deletes a route whose next hop is this instance, whose destination lies in
one of this host's cluster CIDRs, and which carries vpcnet's marker (`Route.marked`) — or, for
`routes gc`, a marked route in those cluster CIDRs whose next-hop instance the cloud says no longer
exists. System routes, other live hosts' routes and hand-made routes are never touched, not even
hand-made ones pointing at this instance.

Retries: every cloud call goes through `Backoff` (bounded exponential backoff with full jitter, bounded
in attempts and in time, interruptible by `stop()`); a create keeps one ClientToken across its retries.
Every wait is bounded; the background loop never spins (a pass is followed by a pause of at least
`MIN_PASS_GAP`), and an unreachable cloud only delays the claim: the plugin keeps serving.

One reconciler runs per host whatever the number of gunicorn workers: the worker holding an exclusive
flock on `<state_dir>/reconciler.lock` runs it; if that worker dies the lock passes to another (within
`LEADER_POLL` seconds). Each pass (and `routes sync`/`release`/`gc` from the CLI) also holds
`<state_dir>/routes.lock`, so the plugin and the CLI never claim for the same host at the same time.

Cloud-call accounting (`RouteKeeper.calls`, logical calls; a retried call counts once): first start =
1 listing pass + 1 create (+ the listings needed to see Pending -> Available, + one `reserved` lookup
of vSwitch CIDRs, cached by the provider); restart = 1 listing pass; per container = 0 (IPAM reads
the store only).
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from vpcnet import metrics
from vpcnet.cloud import ROUTE_MARKER, DuplicateRoute, Provider, QuotaExceeded, Route, make_provider
from vpcnet.errors import Fatal, NotReady, Retryable, VpcnetError

log = logging.getLogger(__name__)

PENDING_POLL = 1.0          # seconds between listings while a route is Pending
MIN_PASS_GAP = 0.5          # background passes start at least this far apart, however often woken
MAX_FAILURE_PAUSE = 60.0    # cap of the growing pause after failed passes (also capped by the interval)
MAX_CLAIM_ATTEMPTS = 64     # creates tried for one block claim in one pass before giving up until the next
LEADER_POLL = 5.0           # a worker waiting to become the reconciler retries the flock this often
RESERVED_DEADLINE = 5.0     # longest retrying of the optional reserved-CIDR lookup
PASS_LOCK_WAIT = 150.0      # longest wait for another process's pass (a pass is bounded by the backoff)

# Kinds of problem a pass reports (SyncResult.kinds): what waiting can fix, and what it cannot.
PENDING = "pending"         # the route is Pending/Deleting: list again shortly
TRANSIENT = "transient"     # the cloud failed retryably even after the backoff: try again later
FATAL = "fatal"             # configuration, quota, a block held by someone else: needs a person


@dataclass
class Backoff:
    """Bounded exponential backoff with full jitter for retryable cloud answers."""

    attempts: int = 8
    base: float = 0.2
    cap: float = 5.0
    deadline: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def run(self, what: str, fn: Callable, on_retry: Callable[[Exception], None] | None = None,
            stop: threading.Event | None = None):
        """`fn()` until it succeeds, raises a non-retryable error, or the attempts or time run out.

        `on_retry(exc)` is told about each retryable failure; `stop`, once set, ends the waiting."""
        start = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Retryable as exc:
                elapsed = time.monotonic() - start
                if attempt == self.attempts or elapsed >= self.deadline:
                    raise Retryable(f"{what}: still failing after {attempt} attempts: {exc}") from None
                if stop is not None and stop.is_set():
                    raise Retryable(f"{what}: stopped while retrying: {exc}") from None
                delay = random.uniform(0, min(self.cap, self.base * 2 ** attempt))
                delay = min(delay, max(0.0, self.deadline - elapsed))
                log.info("%s: retryable (%s), attempt %d, retrying in %.2fs", what, exc, attempt, delay)
                if on_retry is not None:
                    on_retry(exc)
                if stop is not None and self.sleep is time.sleep:
                    if stop.wait(delay):
                        raise Retryable(f"{what}: stopped while retrying: {exc}") from None
                else:
                    self.sleep(delay)
        raise AssertionError("unreachable")


@dataclass
class SyncResult:
    ok: bool
    problems: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)     # one of PENDING/TRANSIENT/FATAL per problem

    def add(self, problem: str, kind: str) -> None:
        self.ok = False
        self.problems.append(problem)
        self.kinds.append(kind)

    @property
    def pending_only(self) -> bool:
        """Every problem is a route in transition: listing again shortly will see it settle."""
        return bool(self.kinds) and all(k == PENDING for k in self.kinds)


def _kind(exc: Exception) -> str:
    return TRANSIENT if isinstance(exc, Retryable) else FATAL


class RouteKeeper:
    def __init__(self, config, store, provider_factory: Callable[[], Provider] | None = None,
                 backoff: Backoff | None = None):
        self.config = config
        self.store = store
        self._factory = provider_factory or (lambda: make_provider(config))
        self._provider: Provider | None = None
        self._provider_lock = threading.Lock()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.backoff = backoff or Backoff()
        # Logical cloud calls, for the benchmark: a call retried by the backoff counts once.
        self.calls = {"list": 0, "create": 0, "delete": 0, "reserved": 0, "instance": 0}
        self.on_leader: Callable[[], None] = lambda: None   # told when this process becomes the reconciler

    # -- provider ---------------------------------------------------------------------------------
    @property
    def provider(self) -> Provider:
        if self._provider is None:
            with self._provider_lock:
                if self._provider is None:
                    self._provider = self._factory()
        return self._provider

    @property
    def instant(self) -> bool:
        """True when the provider is local and instant, so IPAM may claim inline."""
        from vpcnet.cloud import PROVIDERS
        return PROVIDERS.get(self.config.provider, "").startswith("vpcnet.cloud.local:") or bool(
            self._provider and self._provider.instant)

    def close(self) -> None:
        """Stop the background reconciler (if any) and release the provider's connections."""
        self.stop()
        if self._provider is not None:
            self._provider.close()

    def _retry(self, what: str, fn: Callable, on_retry: Callable[[Exception], None] | None = None):
        return self.backoff.run(what, fn, on_retry=on_retry, stop=self._stop)

    def _list(self, on_retry: Callable[[Exception], None] | None = None) -> list[Route]:
        self.calls["list"] += 1
        routes = self._retry(f"list routes of {self.provider.table_id()}", self.provider.list_routes, on_retry)
        metrics.RECONCILER.table_listed(self.provider, routes)
        return routes

    def _me(self) -> str:
        return self._retry("find this instance's id", self.provider.instance_id)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This host's route changes one at a time across processes (plugin workers, the CLI)."""
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        with open(os.path.join(self.config.state_dir, "routes.lock"), "a") as fh:
            deadline = time.monotonic() + PASS_LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Retryable(f"another vpcnet process on this host has been changing routes for "
                                        f"over {PASS_LOCK_WAIT:.0f} s (lock {fh.name})") from None
                    if self._stop.wait(0.05):
                        raise Retryable("stopping") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

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
            with self._lock, self._exclusive():
                self._reconcile_clusters([cluster_cidr])
            claim = self.store.claim(cluster_cidr)
            if claim and claim.host_cidr:
                return claim.host_cidr
        self._wake.set()
        claim = self.store.claim(cluster_cidr)
        reason = (claim.reason if claim else "") or "claim in progress"
        raise NotReady(f"host CIDR not yet claimed: {reason} (cluster CIDR {cluster_cidr}, provider "
                       f"{self.config.provider}; see `vpcnet routes sync`)")

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

        With `wait_pending` (seconds), keep listing every PENDING_POLL seconds, within that bound, while
        the only problems are routes in transition (Pending/Deleting).
        """
        deadline = time.monotonic() + max(0.0, wait_pending)
        with self._lock:
            result = self._pass()
            while not result.ok and result.pending_only and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._stop.wait(min(PENDING_POLL, remaining)):
                    break
                result = self._pass()
            return result

    def _pass(self) -> SyncResult:
        try:
            with self._exclusive():
                return self._reconcile_clusters(self.clusters())
        except Retryable as exc:        # the pass lock: another process is mid-pass, or we are stopping
            return SyncResult(ok=False, problems=[str(exc)], kinds=[TRANSIENT])

    def _reconcile_clusters(self, clusters: list[str]) -> SyncResult:
        result = SyncResult(ok=True)

        def still_trying(exc: Exception) -> None:
            # The cloud is slow or refusing: say so at once to RequestPool, not after the whole backoff.
            for cluster in clusters:
                claim = self.store.claim(cluster)
                if claim is None or not claim.host_cidr:
                    self._note(cluster, f"{self.config.provider} route table not answering yet ({exc}); "
                                        "retrying")

        try:
            routes = self._list(on_retry=still_trying)
            me = self._me()
        except VpcnetError as exc:
            if isinstance(exc, Retryable):
                reason = f"{self.config.provider} route table unreachable: {exc}"
            else:
                reason = f"cannot read the {self.config.provider} route table: {exc}"
            for cluster in clusters:
                self._note(cluster, reason)
            log.warning("%s", reason)
            result.add(reason, _kind(exc))
            return result
        except Exception as exc:  # a provider bug or an unexpected library error: keep serving
            log.exception("reconcile failed")
            reason = f"reconcile failed: {type(exc).__name__}: {exc}"
            for cluster in clusters:
                self._note(cluster, reason)
            result.add(reason, TRANSIENT)
            return result
        for cluster in clusters:
            try:
                problem, kind, routes = self._reconcile_cluster(cluster, routes, me)
            except VpcnetError as exc:
                problem, kind = str(exc), _kind(exc)
                self._note(cluster, problem)
            except Exception as exc:
                log.exception("reconcile of cluster %s failed", cluster)
                problem, kind = f"reconcile failed: {type(exc).__name__}: {exc}", TRANSIENT
                self._note(cluster, problem)
            if problem:
                result.add(f"{cluster}: {problem}", kind)
        return result

    def _note(self, cluster: str, reason: str) -> None:
        claim = self.store.claim(cluster)
        if claim is None or not claim.host_cidr:
            self.store.record_claim(cluster, None, reason=reason)
        else:
            self.store.record_claim(cluster, claim.host_cidr, claim.static, reason=reason, route_ok=False)

    def _reconcile_cluster(self, cluster: str, routes: list[Route], me: str) -> tuple[str, str, list[Route]]:
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
        problem, kind = "", ""
        if entry is None:
            problem, kind = f"route {wanted} -> {me} not visible after create", TRANSIENT
        elif entry.next_hop != me:
            problem, kind = (f"route for {wanted} in {self.provider.table_id()} points at "
                             f"{entry.next_hop or entry.next_hop_type or '?'}, not this instance {me}: another "
                             "host or a hand-made route holds this block; vpcnet does not touch routes it "
                             "does not own"), FATAL
        elif entry.status in ("Pending", "Deleting"):
            problem, kind = f"route {wanted} -> {me} is {entry.status}", PENDING
        elif entry.status != "Available":
            problem, kind = f"route {wanted} -> {me} is {entry.status}", TRANSIENT
        self.store.record_claim(cluster, wanted, static=bool(static), reason=problem, route_ok=not problem)
        return problem, kind, routes

    def _find_mine(self, cluster: str, routes: list[Route], me: str) -> str | None:
        net = ipaddress.IPv4Network(cluster)
        mine = sorted(
            (r.destination for r in routes
             if r.kind == "Custom" and r.next_hop == me and r.marked and _inside(r.destination, net)
             and ipaddress.IPv4Network(r.destination).prefixlen == self.config.host_prefix),
            key=lambda d: ipaddress.IPv4Network(d))
        return mine[0] if mine else None

    def _reserved(self) -> list[ipaddress.IPv4Network]:
        """The provider's reserved CIDRs (vSwitches/subnets); none known when it cannot tell."""
        self.calls["reserved"] += 1
        # Optional knowledge, so a short backoff: without it an overlap is refused by the cloud anyway.
        quick = Backoff(attempts=min(3, self.backoff.attempts), base=self.backoff.base, cap=self.backoff.cap,
                        deadline=min(RESERVED_DEADLINE, self.backoff.deadline), sleep=self.backoff.sleep)
        try:
            cidrs = quick.run("list reserved (vSwitch/subnet) CIDRs", self.provider.reserved_cidrs,
                              stop=self._stop)
        except (Retryable, Fatal) as exc:
            log.warning("cannot list the reserved (vSwitch/subnet) CIDRs (%s): claiming without avoiding "
                        "them; an overlap would be refused by the cloud", exc)
            return []
        out = []
        for cidr in cidrs:
            try:
                out.append(ipaddress.IPv4Network(cidr, strict=False))
            except ValueError:
                log.debug("ignoring reserved CIDR %r (not IPv4)", cidr)
        return out

    def _claim_new(self, cluster: str, routes: list[Route], me: str) -> tuple[str, list[Route]]:
        net = ipaddress.IPv4Network(cluster)
        reserved = self._reserved()

        def taken_by(listing: list[Route]) -> list[ipaddress.IPv4Network]:
            # Entries inside the cluster CIDR block what they overlap; wider ones (a default route, a VPN
            # route covering the whole cluster) do not, since a host route is more specific than them.
            return [d for d in (ipaddress.IPv4Network(r.destination) for r in listing if _is_v4(r.destination))
                    if d.overlaps(net) and d.prefixlen > net.prefixlen]

        taken = taken_by(routes) + reserved
        for _ in range(MAX_CLAIM_ATTEMPTS):
            candidate = _first_free(net, self.config.host_prefix, taken)
            if candidate is None:
                raise Fatal(f"no free /{self.config.host_prefix} block left in cluster CIDR {cluster} "
                            f"(route table {self.provider.table_id()})")
            try:
                self._create(str(candidate), me)
            except DuplicateRoute:
                routes = self._list()
                entry = next((r for r in routes if r.destination == str(candidate)), None)
                if entry is not None and entry.kind == "Custom" and entry.next_hop == me and entry.marked:
                    log.info("block %s already routed to this instance by vpcnet: adopted", candidate)
                    return str(candidate), routes          # our own earlier create: done
                found = self._find_mine(cluster, routes, me)
                if found:                                  # ours appeared elsewhere meanwhile (another
                    log.info("found this host's block %s meanwhile: adopted", found)   # process of ours)
                    return found, routes
                if entry is not None and entry.next_hop == me:
                    log.info("block %s has a hand-made route to this instance: not adopted, trying the next "
                             "block", candidate)
                else:
                    log.info("block %s was taken by %s meanwhile; trying the next one",
                             candidate, (entry.next_hop if entry else "") or "another host")
                taken = taken_by(routes) + reserved + [candidate]
                continue
            log.info("claimed block %s in cluster %s (route table %s)", candidate, cluster,
                     self.provider.table_id())
            return str(candidate), self._list()
        raise Retryable(f"no block of {cluster} claimed after {MAX_CLAIM_ATTEMPTS} attempts (other hosts "
                        "keep winning them); trying again on the next pass")

    def _create(self, destination: str, me: str) -> None:
        token = uuid.uuid4().hex   # one token per logical create, reused by its retries
        name = f"{ROUTE_MARKER}-{destination.replace('.', '-').replace('/', '-')}"
        description = f"{ROUTE_MARKER}: host CIDR {destination} of {me}"
        self.calls["create"] += 1
        try:
            self._retry(f"create route {destination} -> {me}",
                        lambda: self.provider.create_route(destination, name, description, token))
        except QuotaExceeded as exc:
            raise Fatal(f"route table {self.provider.table_id()} is full: {exc}") from None

    # -- ownership and removal --------------------------------------------------------------------
    def owned(self, route: Route, me: str, clusters: list[str] | None = None) -> bool:
        """A route this host may delete: vpcnet's, to this instance, inside one of its cluster CIDRs."""
        clusters = clusters or self.clusters()
        return (route.kind == "Custom" and route.marked and route.next_hop == me
                and any(_inside(route.destination, ipaddress.IPv4Network(c)) for c in clusters))

    def ownership(self, route: Route, me: str, clusters: list[str] | None = None) -> str:
        """How `routes list` labels a route: mine, ours-other-host (vpcnet's, another instance),
        ours-other-cluster (vpcnet's, this instance, outside this host's cluster CIDRs) or foreign."""
        clusters = clusters or self.clusters()
        if self.owned(route, me, clusters):
            return "mine"
        if route.kind == "Custom" and route.marked:
            return "ours-other-cluster" if route.next_hop == me else "ours-other-host"
        return "foreign"

    def table(self) -> tuple[str, str, list[Route]]:
        """(route table id, this instance id, every entry) for `routes list`. Changes nothing."""
        with self._lock:
            routes = self._list()
            return self.provider.table_id(), self._me(), routes

    def release(self) -> list[Route]:
        """Remove this host's routes (decommissioning) and forget its claims."""
        with self._lock, self._exclusive():
            me = self._me()
            clusters = self.clusters()
            removed = [r for r in self._list() if self.owned(r, me, clusters)]
            for route in removed:
                self._delete(route)
                log.info("released route %s -> %s", route.destination, me)
            for cluster in clusters:
                self.store.forget_claim(cluster)
            return removed

    def garbage(self) -> list[Route]:
        """vpcnet-marked routes in our cluster CIDRs whose next-hop instance no longer exists."""
        with self._lock:
            me = self._me()
            clusters = [ipaddress.IPv4Network(c) for c in self.clusters()]
            exists: dict[str, bool] = {}
            out = []
            for route in self._list():
                if not (route.kind == "Custom" and route.marked and route.next_hop and route.next_hop != me
                        and any(_inside(route.destination, c) for c in clusters)):
                    continue
                if route.next_hop not in exists:
                    self.calls["instance"] += 1
                    exists[route.next_hop] = self.provider.instance_exists(route.next_hop)
                if not exists[route.next_hop]:
                    out.append(route)
            return out

    def _delete(self, route: Route) -> None:
        self.calls["delete"] += 1
        self._retry(f"delete route {route.destination}", lambda: self.provider.delete_route(route))

    def delete_garbage(self, routes: list[Route]) -> list[Route]:
        """Delete routes `garbage()` found; returns those deleted."""
        with self._lock, self._exclusive():
            for route in routes:
                self._delete(route)
                log.info("removed route %s -> %s (instance gone)", route.destination, route.next_hop)
            return list(routes)

    # -- the background reconciler ----------------------------------------------------------------
    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="vpcnet-reconciler", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        try:
            lock_path = os.path.join(self.config.state_dir, "reconciler.lock")
            with open(lock_path, "a") as lock:
                while True:                         # wait to become the host's one reconciler
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if self._stop.wait(LEADER_POLL):
                            return
                log.info("reconciler running (pid %d, every %.0fs)", os.getpid(),
                         self.config.reconcile_interval)
                self.on_leader()
                self._loop()
        except Exception:   # never take the worker down; the flock passes to another worker
            log.exception("reconciler stopped by an unexpected error")

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            started, started_wall, creates = time.monotonic(), time.time(), self.calls["create"]
            try:
                result = self.reconcile()
            except Exception as exc:
                log.exception("reconcile pass failed")
                result = SyncResult(ok=False, problems=[f"{type(exc).__name__}: {exc}"], kinds=[TRANSIENT])
            metrics.reconcile_pass(result, repaired=self.calls["create"] > creates)
            if result.ok:
                failures = 0
                pause = self.config.reconcile_interval
            elif result.pending_only:
                pause = PENDING_POLL
            else:
                log.warning("routes not in place: %s", "; ".join(result.problems))
                failures += 1
                pause = min(self.config.reconcile_interval, MAX_FAILURE_PAUSE, 2.0 ** min(failures, 6))
            self._idle(max(pause, MIN_PASS_GAP), started, started_wall)

    def _idle(self, pause: float, started: float, started_wall: float) -> None:
        """Wait `pause` seconds after a pass (which began at `started`); end early, but never sooner
        than MIN_PASS_GAP after its start, when woken or when another worker wants a new cluster CIDR."""
        until = time.monotonic() + pause
        while not self._stop.is_set():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            if self._wake.wait(min(1.0, remaining)) or self._new_wants(started_wall):
                self._wake.clear()
                gap = started + MIN_PASS_GAP - time.monotonic()
                if gap > 0:
                    self._stop.wait(gap)
                return

    def _new_wants(self, since: float) -> bool:
        """A cluster CIDR asked for (by any worker) since the last pass began and not claimed yet."""
        try:
            return any(c.host_cidr is None and c.updated >= since and c.reason == "claim in progress"
                       for c in self.store.claims())
        except Exception:   # a busy or broken store must not stop the reconciler
            log.debug("cannot read the claims", exc_info=True)
            return False


def _is_v4(cidr: str) -> bool:
    try:
        ipaddress.IPv4Network(cidr)
        return True
    except ValueError:
        return False


def _inside(cidr: str, net: ipaddress.IPv4Network) -> bool:
    return _is_v4(cidr) and ipaddress.IPv4Network(cidr).subnet_of(net)


def _first_free(cluster: ipaddress.IPv4Network, prefix: int,
                taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network | None:
    """The first block of the cluster not equal to, inside or around any taken destination."""
    for block in cluster.subnets(new_prefix=prefix):
        if not any(block.overlaps(t) for t in taken):
            return block
    return None
