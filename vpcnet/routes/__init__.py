"""This host's blocks and their VPC routes: claim a host CIDR, keep `host CIDR -> this instance` in place.

The route tables are the cluster's shared record of who owns which block. A provider programs one or
more tables (`Provider.table_ids()`: a multi-zone VPC has a table per zone, and hosts behind one table
reach this host only if that table holds its route), and every table gets this host's route with the
same block. A host finds its block as the vpcnet-marked custom entry inside the cluster CIDR whose next
hop is this instance (in the first table that has one); failing that it picks a free block (not equal
to, inside or around any entry of ANY table, nor a reserved vSwitch/subnet CIDR when the provider knows
them) and creates its route in the first table, the arbiter every host of the cluster writes to first;
a duplicate-destination answer means another host won that block, so it takes the next. The search
starts at a block derived from the instance id (`start_index`), not at the lowest block, so hosts
booting together spread over the cluster CIDR instead of all racing for the same block (the local
provider, a file on one host, starts at the lowest). Then every other table gets the same route; a
route missing from one table is re-created there, and an earlier block of this host in any table is
removed: a host never ends with different blocks in different tables. An existing entry is adopted only
when it points at this instance AND carries vpcnet's marker. The claim is written to the store so IPAM
answers at once, and IPAM never waits on the cloud: until a claim exists it answers
"host CIDR not yet claimed: <reason>".

Clusters: every route carries a cluster identity (`cluster=<name>` in its description or AWS tag;
`VPCNET_CLUSTER_NAME`, default the cluster CIDR as `10.200.0.0-16`). A route of another cluster is
never claimed, adopted, released, collected or repaired; one inside this host's cluster CIDR means the
two clusters' CIDRs overlap: a host without a block refuses to claim one, and a host with one keeps its
own route in place but reports the overlap as a FATAL problem naming the other cluster. Routes made
before routes carried a name count as this cluster's.

Ownership: vpcnet only ever deletes a route whose next hop is this instance, whose destination lies in
one of this host's cluster CIDRs, which carries vpcnet's marker (`Route.marked`) and this cluster's
identity — or, for `routes gc`, such a route of this cluster whose next-hop instance the cloud says no
longer exists. System routes, other live hosts' routes, other clusters' routes and hand-made routes are
never touched, not even hand-made ones pointing at this instance.

Retries: every cloud call goes through `Backoff` (bounded exponential backoff with full jitter,
interruptible by `stop()`); a create keeps one ClientToken across its retries. `Busy` answers (another
host's write in progress — Alibaba's VPC takes one route-table write at a time — or throttling) are
retried without an attempt limit until BUSY_DEADLINE (120 s; a 200-host boot storm against a VPC that
takes one write per 0.3 s converges well within it, see bench/cloud_calls.py); other retryable failures
get `attempts` tries within `deadline`. Every wait is bounded; the background loop never spins (a pass
is followed by a pause of at least `MIN_PASS_GAP`), and an unreachable cloud only delays the claim: the
plugin keeps serving.

Quota: before each create the table's custom entries (every owner's, from the listing just made) are
compared with `Provider.table_quota()` (`VPCNET_ROUTE_TABLE_QUOTA`, default the cloud's); at the quota,
and on the cloud's own quota error, the pass stops with a FATAL problem naming the table, the figures
and how to raise the quota — no create is tried and nothing retries in a loop. For metrics,
`RouteKeeper.route_table_usage()` returns `{table id: (custom entries, quota)}` as of the last listing
(quota 0 = unknown): the values of `vpcnet_route_table_entries{table}` and
`vpcnet_route_table_quota{table}`.

Uncertain creates (leaks): before each create `(table, destination, cluster)` is written to
`<state_dir>/uncertain-routes.json` and removed once the create is known to have landed marked (or not
at all). A create whose answer was lost, or whose marking failed after the route landed (AWS CreateRoute
ok, CreateTags failing), stays recorded across restarts; the next pass, before claiming anything, marks
such a route (`Provider.mark_route`) and so adopts it — it is then this host's block, or an earlier one
that the pass removes — instead of leaving an unmarked route that would look hand-made forever.

Forwarding: on AWS every pass also checks the instance's source/destination check and turns it off
(`Provider.check_forwarding`); what it cannot fix is reported with the command to run.

One reconciler runs per host whatever the number of gunicorn workers: the worker holding an exclusive
flock on `<state_dir>/reconciler.lock` runs it; if that worker dies the lock passes to another (within
`LEADER_POLL` seconds). Each pass (and `routes sync`/`release`/`gc` from the CLI) also holds
`<state_dir>/routes.lock`, so the plugin and the CLI never claim for the same host at the same time.

Batch creates: where the provider has a call writing several tables at once (`Provider.batch_create`,
Alibaba's CreateRouteEntries) and the route is missing from more than one table, those tables get it in
one call (`_create_batch`): the claim itself stays a single create in the first table (the arbiter), so
T tables cost 2 creates instead of T. A failure of the whole call is retried with the same token; each
entry's own failure is final for that table this pass, except a retryable one, which gets a single create.

Cloud-call accounting (`RouteKeeper.calls`, logical calls; a retried call counts once), per table T:
first start = T listings + T creates (2 with a batch call) (+ the listings needed to see Pending -> Available, + one
`reserved` lookup of vSwitch CIDRs, cached by the provider, + on AWS one `forwarding` check); restart =
T listings (+ the forwarding check); per container = 0 (IPAM reads the store only).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import random
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from vpcnet.cloud import (
    BatchUnsupported,
    DuplicateRoute,
    Provider,
    QuotaExceeded,
    Route,
    make_provider,
    route_description,
    route_name,
)
from vpcnet.errors import Busy, Fatal, NotReady, Retryable, VpcnetError
from vpcnet.observability import events
from vpcnet.state.locks import LEADER_POLL, become_leader

log = logging.getLogger(__name__)

PENDING_POLL = 1.0          # seconds between listings while a route is Pending
MIN_PASS_GAP = 0.5          # background passes start at least this far apart, however often woken
MAX_FAILURE_PAUSE = 60.0    # cap of the growing pause after failed passes (also capped by the interval)
MAX_CLAIM_ATTEMPTS = 64     # creates tried for one block claim in one pass before giving up until the next
RESERVED_DEADLINE = 5.0     # longest retrying of the optional reserved-CIDR lookup
PASS_LOCK_WAIT = 150.0      # longest wait for another process's pass (a pass is bounded by the backoff)
BUSY_DEADLINE = 120.0       # how long "busy" answers (TaskConflict, throttling) are retried: a boot storm
# Pauses while the cloud is busy: uniform(0, min(BUSY_CAP, BUSY_BASE * 2**n)) after the n-th busy answer.
# Settled with bench/cloud_calls.py's boot storms (one write per 0.3 s per VPC): a cap of 5 s gave 8.2
# calls per host for 50 hosts (32 s) and 17.7 for 200 (105 s); 10 s gives 7.7 (35 s) and 14.1 (115 s).
BUSY_BASE = 0.5
BUSY_CAP = 10.0
UNCERTAIN_FILE = "uncertain-routes.json"   # creates whose outcome or marking is not known yet

# Kinds of problem a pass reports (SyncResult.kinds): what waiting can fix, and what it cannot.
PENDING = "pending"         # the route is Pending/Deleting: list again shortly
TRANSIENT = "transient"     # the cloud failed retryably even after the backoff: try again later
FATAL = "fatal"             # configuration, quota, a block held by someone else: needs a person


@dataclass
class Backoff:
    """Bounded exponential backoff with full jitter for retryable cloud answers.

    A `Busy` answer (the VPC is taking another host's write, or throttling) is not a failure: it is
    retried without counting against `attempts`, until `busy_deadline` seconds have passed (default
    BUSY_DEADLINE, long enough to cover a boot storm; see bench/cloud_calls.py)."""

    attempts: int = 8
    base: float = 0.2
    cap: float = 5.0
    deadline: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    busy_deadline: float | None = None
    busy_base: float = BUSY_BASE
    busy_cap: float = BUSY_CAP

    def run(self, what: str, fn: Callable, on_retry: Callable[[Exception], None] | None = None,
            stop: threading.Event | None = None):
        """`fn()` until it succeeds, raises a non-retryable error, or the attempts or time run out.

        `on_retry(exc)` is told about each retryable failure; `stop`, once set, ends the waiting."""
        start = time.monotonic()
        busy_deadline = BUSY_DEADLINE if self.busy_deadline is None else self.busy_deadline
        failures = busy = 0
        while True:
            try:
                return fn()
            except Busy as exc:
                last: Exception = exc
                busy += 1
                elapsed = time.monotonic() - start
                if elapsed >= busy_deadline:
                    raise Retryable(f"{what}: the cloud stayed busy for {elapsed:.0f} s ({busy} answers; last: "
                                    f"{exc})") from None
                delay = random.uniform(0, min(self.busy_cap, self.busy_base * 2 ** min(busy, 16)))
                delay = min(delay, max(0.0, busy_deadline - elapsed))
                attempt = failures + busy
            except Retryable as exc:
                last = exc
                failures += 1
                elapsed = time.monotonic() - start
                if failures >= self.attempts or elapsed >= self.deadline:
                    raise Retryable(f"{what}: still failing after {failures + busy} attempts: {exc}") from None
                delay = random.uniform(0, min(self.cap, self.base * 2 ** failures))
                delay = min(delay, max(0.0, self.deadline - elapsed))
                attempt = failures + busy
            if stop is not None and stop.is_set():
                raise Retryable(f"{what}: stopped while retrying: {last}") from None
            log.info("%s: retryable (%s), attempt %d, retrying in %.2fs", what, last, attempt, delay)
            if on_retry is not None:
                on_retry(last)
            if stop is not None and self.sleep is time.sleep:
                if stop.wait(delay):
                    raise Retryable(f"{what}: stopped while retrying: {last}") from None
            else:
                self.sleep(delay)


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
        # Entries and quota per route table, as of the last listing (for `routes list` and metrics).
        self.table_usage: dict[str, TableUsage] = {}
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
        """True when the provider's writes take effect at once (its class says so), so IPAM may claim
        inline."""
        if self._provider is not None:
            return self._provider.instant
        from vpcnet.cloud import PROVIDERS, provider_class

        return self.config.provider in PROVIDERS and provider_class(self.config.provider).instant

    def close(self) -> None:
        """Stop the background reconciler (if any) and release the provider's connections."""
        self.stop()
        if self._provider is not None:
            self._provider.close()

    def _retry(self, what: str, fn: Callable, on_retry: Callable[[Exception], None] | None = None):
        return self.backoff.run(what, fn, on_retry=on_retry, stop=self._stop)

    def _tables(self) -> list[str]:
        return self._retry("find the route tables", self.provider.table_ids)

    def _list(self, table: str = "", on_retry: Callable[[Exception], None] | None = None) -> list[Route]:
        table = table or self.provider.table_id()
        self.calls["list"] += 1
        routes = self._retry(f"list routes of {table}", lambda: self.provider.list_routes(table), on_retry)
        routes = [r if r.table else dataclasses.replace(r, table=table) for r in routes]
        usage = self.table_usage[table] = TableUsage(table, sum(1 for r in routes if r.kind == "Custom"),
                                                     self.provider.table_quota(table))
        events.RECONCILER.table_listed(table, usage.entries, usage.quota)
        return routes

    def route_table_usage(self) -> dict[str, tuple[int, int]]:
        """{table id: (custom entries, quota)} as of the last listing; quota 0 = unknown. For
        `vpcnet_route_table_entries{table}` / `vpcnet_route_table_quota{table}`."""
        return {t: (u.entries, u.quota) for t, u in self.table_usage.items()}

    def cluster_name(self, cluster: str) -> str:
        """The cluster identity written into this host's routes of `cluster`."""
        return self.config.cluster_name or default_cluster_name(cluster)

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
            tables = self._tables()
            listings = {table: self._list(table, on_retry=still_trying) for table in tables}
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
        for problem, kind in self._forwarding():
            result.add(problem, kind)
        for problem in self._settle_uncertain(listings, me):
            result.add(problem, TRANSIENT)
        for cluster in clusters:
            try:
                problem, kind, listings = self._reconcile_cluster(cluster, listings, me)
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

    def _forwarding(self) -> list[tuple[str, str]]:
        """The cloud's source/destination check, re-checked every pass (AWS only)."""
        if not getattr(self.provider, "checks_forwarding", False):
            return []
        self.calls["forwarding"] = self.calls.get("forwarding", 0) + 1
        try:
            problems = self._retry("check the source/destination check", lambda: self.provider.check_forwarding(
                disable=self.config.aws_disable_source_dest_check))
        except VpcnetError as exc:
            return [(f"cannot check the source/destination check: {exc}", _kind(exc))]
        for problem in problems:
            log.warning("%s", problem)
        return [(p, FATAL) for p in problems]

    def _note(self, cluster: str, reason: str) -> None:
        claim = self.store.claim(cluster)
        if claim is None or not claim.host_cidr:
            self.store.record_claim(cluster, None, reason=reason)
        else:
            self.store.record_claim(cluster, claim.host_cidr, claim.static, reason=reason, route_ok=False)

    def _reconcile_cluster(self, cluster: str, listings: dict[str, list[Route]],
                           me: str) -> tuple[str, str, dict[str, list[Route]]]:
        problems: list[tuple[str, str]] = []
        overlap = self._overlap(cluster, listings)
        claim = self.store.claim(cluster)
        static = self._static_host_cidr(cluster)
        wanted = static or (claim.host_cidr if claim else None)
        if not wanted:
            wanted = self._find_mine(cluster, listings, me)
            if wanted:
                log.info("found this host's block %s in cluster %s (route tables %s)",
                         wanted, cluster, ", ".join(listings))
        if overlap and not wanted:
            raise Fatal(overlap)            # claiming now could take a block of the other cluster
        if overlap:                         # keep this host's own block in place, and say it loudly
            log.warning("%s", overlap)
            problems.append((overlap, FATAL))
        if not wanted:
            wanted, listings = self._claim_new(cluster, listings, me)
            self.store.record_claim(cluster, wanted, reason="route created, waiting for Available")
        batched = self._create_batch(wanted, me, cluster, listings, problems)
        for table in list(listings):
            entry = next((r for r in listings[table] if r.destination == wanted), None)
            if entry is None and batched.get(table):
                continue                       # failed in the batch just now: its problem is recorded
            if entry is None and table in batched:
                problems.append((f"route {wanted} -> {me} not visible in {table} after create", TRANSIENT))
                continue
            if entry is None:
                log.warning("route %s -> %s missing from %s: creating it", wanted, me, table)
                try:
                    self._create(wanted, me, table, cluster, listings[table])
                except DuplicateRoute:
                    pass                       # someone else's meanwhile: reported below
                except VpcnetError as exc:
                    problems.append((str(exc), _kind(exc)))
                    continue
                listings[table] = self._list(table)
                entry = next((r for r in listings[table] if r.destination == wanted), None)
            if entry is None:
                problems.append((f"route {wanted} -> {me} not visible in {table} after create", TRANSIENT))
            elif entry.next_hop != me:
                problems.append((f"route for {wanted} in {table} points at "
                                 f"{entry.next_hop or entry.next_hop_type or '?'}, not this instance {me}: another "
                                 "host or a hand-made route holds this block; vpcnet does not touch routes it "
                                 "does not own", FATAL))
            elif entry.status in ("Pending", "Deleting"):
                problems.append((f"route {wanted} -> {me} is {entry.status} in {table}", PENDING))
            elif entry.status != "Available":
                problems.append((f"route {wanted} -> {me} is {entry.status} in {table}", TRANSIENT))
            else:
                listings[table] = self._drop_stale(cluster, wanted, me, listings[table])
        # the worst kind decides what waiting can fix
        kind = next((k for k in (FATAL, TRANSIENT, PENDING) if any(pk == k for _, pk in problems)), "")
        problem = "; ".join(p for p, _ in problems)
        self.store.record_claim(cluster, wanted, static=bool(static), reason=problem, route_ok=not problem)
        return problem, kind, listings

    def _drop_stale(self, cluster: str, wanted: str, me: str, routes: list[Route]) -> list[Route]:
        """This host's other blocks of `cluster` in one table (an earlier claim): one block per cluster."""
        stale = [r for r in routes if r.destination != wanted and self._owned_in(r, me, cluster)
                 and r.status == "Available"]
        for route in stale:
            log.warning("route %s -> %s in %s is an earlier block of this host in cluster %s (now %s): "
                        "removing it", route.destination, me, route.table, cluster, wanted)
            self._delete(route)
        return [r for r in routes if r not in stale]

    def _overlap(self, cluster: str, listings: dict[str, list[Route]]) -> str:
        """Another vpcnet cluster's route inside this cluster CIDR (two clusters would claim each other's
        blocks): the refusal to give, or "". Such routes are never claimed, adopted or repaired."""
        net, name = ipaddress.IPv4Network(cluster), self.cluster_name(cluster)
        for table, routes in listings.items():
            for r in routes:
                if (r.kind == "Custom" and r.cluster and r.cluster != name and _is_v4(r.destination)
                        and ipaddress.IPv4Network(r.destination).overlaps(net)):
                    return (f"cluster CIDR {cluster} (cluster {name}) overlaps route {r.destination} -> "
                            f"{r.next_hop or '?'} of vpcnet cluster {r.cluster} in route table {table}: two "
                            "clusters sharing a VPC need disjoint cluster CIDRs; choose another "
                            f"VPCNET_CLUSTER_CIDR, or set VPCNET_CLUSTER_NAME={r.cluster} if this host "
                            "belongs to that cluster")
        return ""

    def _owned_in(self, route: Route, me: str, cluster: str) -> bool:
        return (route.kind == "Custom" and route.marked and route.next_hop == me
                and route.cluster in ("", self.cluster_name(cluster))
                and _inside(route.destination, ipaddress.IPv4Network(cluster)))

    def _find_mine(self, cluster: str, listings: dict[str, list[Route]], me: str) -> str | None:
        """This host's block of `cluster`: the one in the first table that has one (the claiming
        table), else the lowest; one block whatever the tables say."""
        for routes in listings.values():
            mine = sorted((r.destination for r in routes if self._owned_in(r, me, cluster)
                           and ipaddress.IPv4Network(r.destination).prefixlen == self.config.host_prefix),
                          key=ipaddress.IPv4Network)
            if mine:
                return mine[0]
        return None

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

    def _claim_new(self, cluster: str, listings: dict[str, list[Route]],
                   me: str) -> tuple[str, dict[str, list[Route]]]:
        """Claim a free block by creating its route in the first table (the arbiter every host of the
        cluster writes to first); a block is taken when any table has an entry overlapping it. The
        search starts at a block derived from the instance id, so hosts booting together spread out."""
        net = ipaddress.IPv4Network(cluster)
        reserved = self._reserved()
        first = next(iter(listings))

        def taken_by(all_listings: dict[str, list[Route]]) -> list[ipaddress.IPv4Network]:
            # Entries inside the cluster CIDR block what they overlap; wider ones (a default route, a VPN
            # route covering the whole cluster) do not, since a host route is more specific than them.
            return [d for routes in all_listings.values()
                    for d in (ipaddress.IPv4Network(r.destination) for r in routes if _is_v4(r.destination))
                    if d.overlaps(net) and d.prefixlen > net.prefixlen]

        start = 0 if self.instant else start_index(me, net, self.config.host_prefix)
        taken = taken_by(listings) + reserved
        for _ in range(MAX_CLAIM_ATTEMPTS):
            candidate = _first_free(net, self.config.host_prefix, taken, start)
            if candidate is None:
                raise Fatal(f"no free /{self.config.host_prefix} block left in cluster CIDR {cluster} "
                            f"(route tables {', '.join(listings)})")
            try:
                self._create(str(candidate), me, first, cluster, listings[first])
            except DuplicateRoute:
                listings = {**listings, first: self._list(first)}
                entry = next((r for r in listings[first] if r.destination == str(candidate)), None)
                if entry is not None and self._owned_in(entry, me, cluster):
                    log.info("block %s already routed to this instance by vpcnet: adopted", candidate)
                    return str(candidate), listings          # our own earlier create: done
                found = self._find_mine(cluster, listings, me)
                if found:                                  # ours appeared elsewhere meanwhile (another
                    log.info("found this host's block %s meanwhile: adopted", found)   # process of ours)
                    return found, listings
                if entry is not None and entry.next_hop == me:
                    log.info("block %s has a hand-made route to this instance: not adopted, trying the next "
                             "block", candidate)
                else:
                    log.info("block %s was taken by %s meanwhile; trying the next one",
                             candidate, (entry.next_hop if entry else "") or "another host")
                taken = taken_by(listings) + reserved + [candidate]
                continue
            log.info("claimed block %s in cluster %s (route table %s)", candidate, cluster, first)
            return str(candidate), {**listings, first: self._list(first)}
        raise Retryable(f"no block of {cluster} claimed after {MAX_CLAIM_ATTEMPTS} attempts (other hosts "
                        "keep winning them); trying again on the next pass")

    def _create(self, destination: str, me: str, table: str, cluster: str, routes: list[Route]) -> None:
        """Create `destination -> me` in `table`, after checking the table's quota against `routes`
        (its current listing). The attempt is recorded as uncertain until it is known to have landed
        marked, so a create whose marking failed is adopted or cleaned on a later pass."""
        used = sum(1 for r in routes if r.kind == "Custom")
        quota = self.provider.table_quota(table)
        if quota and used >= quota:
            raise Fatal(self._quota_message(table, used, quota))
        token = uuid.uuid4().hex   # one token per logical create, reused by its retries
        name = route_name(destination)
        description = route_description(destination, me, self.cluster_name(cluster))
        self.calls["create"] += 1
        self._uncertain_add(table, destination, cluster)
        try:
            self._retry(f"create route {destination} -> {me} in {table}",
                        lambda: self.provider.create_route(destination, name, description, token, table=table))
        except QuotaExceeded as exc:
            self._uncertain_drop(table, destination)
            raise Fatal(f"{self._quota_message(table, used, quota)} (the cloud says: {exc})") from None
        except (DuplicateRoute, Fatal):
            self._uncertain_drop(table, destination)
            raise
        self._uncertain_drop(table, destination)

    def _create_batch(self, destination: str, me: str, cluster: str, listings: dict[str, list[Route]],
                      problems: list[tuple[str, str]]) -> dict[str, bool]:
        """`destination -> me` into every table missing it in one batch call, where the provider has one
        (Alibaba's CreateRouteEntries) and more than one table needs it. Returns {table tried: failed}: a
        failed table's problem is in `problems`; the others' listings are refreshed. Tables not tried
        go through `_create`.

        A failure of the whole call (busy, lost answer) is retried with the same ClientToken and the same
        entries, so entries that landed are not created twice; a failure of single entries is final for
        this pass (duplicate: someone else's route, reported by the caller; quota and other fatal answers:
        FATAL), except a retryable one, whose table then gets its own create (a fresh token: the batch's
        token belongs to the whole entry list); the entries that landed stay: each entry is whole."""
        missing = [t for t in listings if not any(r.destination == destination for r in listings[t])]
        if not getattr(self.provider, "batch_create", False) or len(missing) < 2:
            return {}
        tables, failed = [], set()
        for table in missing:
            used = sum(1 for r in listings[table] if r.kind == "Custom")
            quota = self.provider.table_quota(table)
            if quota and used >= quota:
                problems.append((self._quota_message(table, used, quota), FATAL))
                failed.add(table)
            else:
                tables.append(table)
        if len(tables) < 2:           # one table left: the single create (and its checks) handles it
            return {t: True for t in failed}
        log.warning("route %s -> %s missing from %s: creating it in one call", destination, me, ", ".join(tables))
        token = uuid.uuid4().hex
        name = route_name(destination)
        description = route_description(destination, me, self.cluster_name(cluster))
        self.calls["create"] += 1
        for table in tables:
            self._uncertain_add(table, destination, cluster)
        try:
            results = self._retry(f"create route {destination} -> {me} in {', '.join(tables)}",
                                  lambda: self.provider.create_routes(destination, name, description, token, tables))
        except BatchUnsupported as exc:       # nothing written: create one by one, as without a batch call
            log.info("%s; creating route %s one table at a time", exc, destination)
            for table in tables:
                self._uncertain_drop(table, destination)
            return {t: True for t in failed}
        except VpcnetError as exc:
            if not isinstance(exc, Retryable):
                for table in tables:
                    self._uncertain_drop(table, destination)
            problems.append((str(exc), _kind(exc)))   # Retryable: the creates stay uncertain until listed
            return {t: True for t in missing}
        retry_single = set()
        for table in tables:
            error = results.get(table)
            if isinstance(error, Retryable):
                retry_single.add(table)    # this entry only: created on its own below (fresh token, backoff)
                continue
            self._uncertain_drop(table, destination)      # landed (marked: the marker is in the create) or not
            if error is None or isinstance(error, DuplicateRoute):
                listings[table] = self._list(table)       # checked by the caller like any listed entry
                continue
            failed.add(table)
            if isinstance(error, QuotaExceeded):
                used = sum(1 for r in listings[table] if r.kind == "Custom")
                problems.append((f"{self._quota_message(table, used, self.provider.table_quota(table))} "
                                 f"(the cloud says: {error})", FATAL))
            else:
                problems.append((str(error), _kind(error)))
        return {t: t in failed for t in missing if t not in retry_single}

    def _quota_message(self, table: str, used: int, quota: int) -> str:
        hint = getattr(self.provider, "quota_hint", "") or "raise the route table quota with your cloud"
        return (f"route table {table} is full: {used}/{quota or '?'} custom entries; vpcnet does not create "
                f"more and does not retry: {hint}")

    # -- creates whose outcome is not known yet (leaks) ---------------------------------------------
    def _uncertain_path(self) -> str:
        return os.path.join(self.config.state_dir, UNCERTAIN_FILE)

    def _uncertain(self) -> list[dict]:
        try:
            with open(self._uncertain_path()) as fh:
                data = json.load(fh)
            return [d for d in data if isinstance(d, dict) and d.get("table") and d.get("destination")]
        except (OSError, ValueError):
            return []

    def _uncertain_write(self, records: list[dict]) -> None:
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        path = self._uncertain_path()
        if not records:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(records, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _uncertain_add(self, table: str, destination: str, cluster: str) -> None:
        records = [r for r in self._uncertain() if (r["table"], r["destination"]) != (table, destination)]
        self._uncertain_write(records + [{"table": table, "destination": destination, "cluster": cluster,
                                          "since": time.time()}])

    def _uncertain_drop(self, table: str, destination: str) -> None:
        records = self._uncertain()
        kept = [r for r in records if (r["table"], r["destination"]) != (table, destination)]
        if len(kept) != len(records):
            self._uncertain_write(kept)

    def _settle_uncertain(self, listings: dict[str, list[Route]], me: str) -> list[str]:
        """Creates recorded as uncertain: a route to this instance that landed without vpcnet's marker is
        marked (adopted, and then kept or removed like any of this host's routes); anything else (never
        landed, marked after all, someone else's) is forgotten."""
        problems = []
        for record in self._uncertain():
            table, destination = record["table"], record["destination"]
            entry = next((r for r in listings.get(table, []) if r.destination == destination), None)
            if entry is not None and entry.kind == "Custom" and entry.next_hop == me and not entry.marked:
                cluster = record.get("cluster") or self.config.cluster_cidr
                name = route_name(destination)
                description = route_description(destination, me, self.cluster_name(cluster))
                try:
                    marked = self._retry(f"mark route {destination} in {table}",
                                         lambda entry=entry, name=name, description=description:
                                         self.provider.mark_route(entry, name, description))
                except VpcnetError as exc:
                    problems.append(f"route {destination} -> {me} in {table} landed without vpcnet's marker and "
                                    f"cannot be marked yet ({exc}); trying again on the next pass")
                    continue
                if marked:
                    log.warning("route %s -> %s in %s had landed without vpcnet's marker: marked (adopted)",
                                destination, me, table)
                    listings[table] = [dataclasses.replace(r, name=name, description=description)
                                       if r is entry else r for r in listings[table]]
                else:
                    log.warning("route %s -> %s in %s is unmarked and this provider cannot mark it afterwards: "
                                "left alone", destination, me, table)
            self._uncertain_drop(table, destination)
        return problems

    # -- ownership and removal --------------------------------------------------------------------
    def owned(self, route: Route, me: str, clusters: list[str] | None = None) -> bool:
        """A route this host may delete: vpcnet's, to this instance, inside one of its cluster CIDRs and
        of that cluster's identity (or made before routes carried one)."""
        clusters = clusters or self.clusters()
        return any(self._owned_in(route, me, c) for c in clusters)

    def ownership(self, route: Route, me: str, clusters: list[str] | None = None) -> str:
        """How `routes list` labels a route: mine, ours-other-host (vpcnet's, another instance, this
        host's clusters), ours-other-cluster (vpcnet's, another cluster or outside this host's cluster
        CIDRs) or foreign."""
        clusters = clusters or self.clusters()
        if self.owned(route, me, clusters):
            return "mine"
        if route.kind == "Custom" and route.marked:
            same = any(_inside(route.destination, ipaddress.IPv4Network(c))
                       and route.cluster in ("", self.cluster_name(c)) for c in clusters)
            return "ours-other-host" if same and route.next_hop != me else "ours-other-cluster"
        return "foreign"

    def table(self) -> tuple[list[str], str, list[Route]]:
        """(route table ids, this instance id, every entry of every table) for `routes list`."""
        with self._lock:
            tables = self._tables()
            routes = [r for table in tables for r in self._list(table)]
            return tables, self._me(), routes

    def release(self) -> list[Route]:
        """Remove this host's routes from every table (decommissioning) and forget its claims."""
        with self._lock, self._exclusive():
            me = self._me()
            clusters = self.clusters()
            removed = [r for table in self._tables() for r in self._list(table) if self.owned(r, me, clusters)]
            for route in removed:
                self._delete(route)
                log.info("released route %s -> %s from %s", route.destination, me, route.table)
            for cluster in clusters:
                self.store.forget_claim(cluster)
            return removed

    def garbage(self) -> list[Route]:
        """vpcnet-marked routes of this host's clusters, in any table, whose next-hop instance is gone."""
        with self._lock:
            me = self._me()
            clusters = self.clusters()
            exists: dict[str, bool] = {}
            out = []
            for route in (r for table in self._tables() for r in self._list(table)):
                if not (route.kind == "Custom" and route.marked and route.next_hop and route.next_hop != me
                        and any(_inside(route.destination, ipaddress.IPv4Network(c))
                                and route.cluster in ("", self.cluster_name(c)) for c in clusters)):
                    continue
                if route.next_hop not in exists:
                    self.calls["instance"] += 1
                    exists[route.next_hop] = self.provider.instance_exists(route.next_hop)
                if not exists[route.next_hop]:
                    out.append(route)
            return out

    def _delete(self, route: Route) -> None:
        self.calls["delete"] += 1
        self._retry(f"delete route {route.destination} from {route.table or self.provider.table_id()}",
                    lambda: self.provider.delete_route(route))

    def delete_garbage(self, routes: list[Route]) -> list[Route]:
        """Delete routes `garbage()` found; returns those deleted."""
        with self._lock, self._exclusive():
            for route in routes:
                self._delete(route)
                log.info("removed route %s -> %s from %s (instance gone)", route.destination, route.next_hop,
                         route.table)
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
                if not become_leader(lock, self._stop, LEADER_POLL):     # the host's one reconciler
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
            events.reconcile_pass(result.ok or result.pending_only, repaired=self.calls["create"] > creates)
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


@dataclass(frozen=True)
class TableUsage:
    table: str
    entries: int      # custom entries, every owner's
    quota: int        # 0 = unknown


def default_cluster_name(cluster: str) -> str:
    """A cluster's identity when VPCNET_CLUSTER_NAME is not set: its CIDR, e.g. `10.200.0.0-16`."""
    return cluster.replace("/", "-")


def start_index(instance: str, cluster: ipaddress.IPv4Network, prefix: int) -> int:
    """Where this instance starts looking for a free block: stable for it, spread across instances."""
    blocks = 2 ** (prefix - cluster.prefixlen)
    return int.from_bytes(hashlib.sha256(instance.encode()).digest()[:8], "big") % blocks


def _first_free(cluster: ipaddress.IPv4Network, prefix: int, taken: list[ipaddress.IPv4Network],
                start: int = 0) -> ipaddress.IPv4Network | None:
    """The first block of the cluster, from block number `start` on (wrapping around), not equal to,
    inside or around any taken destination."""
    blocks = 2 ** (prefix - cluster.prefixlen)
    size = 2 ** (32 - prefix)
    base = int(cluster.network_address)
    for i in range(blocks):
        block = ipaddress.IPv4Network((base + ((start + i) % blocks) * size, prefix))
        if not any(block.overlaps(t) for t in taken):
            return block
    return None
