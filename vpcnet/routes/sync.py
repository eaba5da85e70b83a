"""One reconcile pass: list every route table, claim this host's block where it has none, put its route
into every table, and report what is still wrong (`SyncResult`).

Every table gets this host's route with the same block: the claim itself is a create in the first table
(the arbiter every host of the cluster writes to first; which block, by the rules of
vpcnet.routes.claims), then every other table gets the same route; a route missing from one table is
re-created there, and an earlier block of this host in any table is removed — unless a network in the
store still uses it (VPCNET_HOST_CIDR changed under it): that route is kept and the pass reports a FATAL
problem naming the network, since removing it would cut its containers off from every other host. The
claim is written to the store as soon as it is made, so IPAM answers at once.

Quota: before each create the table's custom entries (every owner's, from the listing just made; only the
created route's family where the cloud counts each family against its own quota, `Provider.quota_per_family`:
AWS) are compared with `Provider.table_quota()`; at the quota, and on the cloud's own quota error, the pass stops
with a FATAL problem naming the table, the figures and how to raise the quota — no create is tried and
nothing retries in a loop.

Batch creates: where the provider has a call writing several tables at once (`Provider.batch_create`,
Alibaba's CreateRouteEntries) and the route is missing from more than one table, those tables get it in
one call (`_create_batch`): the claim itself stays a single create in the first table (the arbiter), so
T tables cost 2 creates instead of T. A failure of the whole call is retried with the same token; each
entry's own failure is final for that table this pass, except a retryable one, which gets a single create.

A busy VPC (a boot storm: one route write at a time in the whole VPC, each holding it while Pending)
is waited for as long as its tables keep changing (`RouteTables.progress_probe`; the bounds and why
in vpcnet.routes.backoff), so a storm of any size converges at the pace the VPC allows.

Copies of other hosts' claims (a boot storm into several tables): the VPC takes one write at a time, so
N hosts each writing a claim and then a batch need 2N serial writes. A host's batch call therefore
also carries the routes of other hosts' claims it sees in the first table (Available, vpcnet's, this
cluster's, a host-prefix block) and misses in a further table, copied as their owners wrote them
(`claims.claimed_missing`, up to MAX_BATCH_ENTRIES and each table's quota): one write then covers every
host claimed so far, and a host whose route is already copied everywhere writes nothing more. The
block itself is only ever claimed by its host (the create in the first table); a copy never claims,
and failures of copies are left to their owners. Copies happen only on a write this host makes
anyway, never alone.

Uncertain creates: each create is recorded in the journal (vpcnet.routes.journal) until its outcome is
known, and each pass first settles what earlier passes left uncertain.

Forwarding: on AWS the instance's source/destination check is checked and turned off
(`Provider.check_forwarding`) on the first pass and then every FORWARDING_EVERY-th pass (every 5 minutes
at the default 30 s interval), and on every pass while the last check found a problem (so a fix or a
transient error is seen at once); what it cannot fix is reported with the command to run.
"""
from __future__ import annotations

import ipaddress
import logging
import uuid
from dataclasses import dataclass, field

from vpcnet.cloud import BatchUnsupported, DuplicateRoute, QuotaExceeded, Route, route_description, route_name
from vpcnet.errors import Fatal, Retryable, VpcnetError
from vpcnet.routes import claims
from vpcnet.routes.claims import FATAL, PENDING, TRANSIENT, kind_of
from vpcnet.routes.journal import Journal
from vpcnet.routes.tables import RouteTables

log = logging.getLogger(__name__)

PENDING_POLL = 1.0          # seconds between listings while a route is Pending
FORWARDING_EVERY = 10      # passes between two source/destination checks while all is well
MAX_BATCH_ENTRIES = 50      # entries one batch create takes (Alibaba's CreateRouteEntries)
MAX_CLAIM_ATTEMPTS = 64     # creates tried for one block claim in one pass before giving up until the next


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


class Sync:
    """The reconcile pass over given cluster CIDRs. The caller holds the host's route lock."""

    def __init__(self, config, store, tables: RouteTables, journal: Journal,
                 forwarding_every: int | None = None):
        self.config = config
        self.store = store
        self.tables = tables
        self.journal = journal
        self.forwarding_every = max(1, FORWARDING_EVERY if forwarding_every is None else forwarding_every)
        self._forwarding_skipped = -1             # passes since the last check; < 0: never checked
        self._forwarding_problems: list[tuple[str, str]] = []
        self._baseline: dict[str, list[Route]] = {}   # the pass's first listings (busy-wait progress probe)

    def cluster_name(self, cluster: str) -> str:
        return claims.cluster_name(cluster, self.config.cluster_name)

    def run(self, clusters: list[str]) -> SyncResult:
        """One pass over `clusters`: claim what is missing, repair what drifted."""
        result = SyncResult(ok=True)

        def still_trying(exc: Exception) -> None:
            # The cloud is slow or refusing: say so at once to RequestPool, not after the whole backoff.
            for cluster in clusters:
                claim = self.store.claim(cluster)
                if claim is None or not claim.host_cidr:
                    self._note(cluster, f"{self.config.provider} route table not answering yet ({exc}); "
                                        "retrying")

        try:
            tables = self.tables.table_ids()
            listings = {table: self.tables.list_routes(table, on_retry=still_trying) for table in tables}
            me = self.tables.instance_id()
            self._baseline = dict(listings)
        except VpcnetError as exc:
            if isinstance(exc, Retryable):
                reason = f"{self.config.provider} route table unreachable: {exc}"
            else:
                reason = f"cannot read the {self.config.provider} route table: {exc}"
            for cluster in clusters:
                self._note(cluster, reason)
            log.warning("%s", reason, extra={"event": "route_problem", "kind": kind_of(exc), "outcome": "failed"})
            result.add(reason, kind_of(exc))
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
        for problem in self.journal.settle(listings, me, self.cluster_name, self.tables.mark_route):
            result.add(problem, TRANSIENT)
        for cluster in clusters:
            try:
                problem, kind, listings = self._cluster(cluster, listings, me)
            except VpcnetError as exc:
                problem, kind = str(exc), kind_of(exc)
                self._note(cluster, problem)
            except Exception as exc:
                log.exception("reconcile of cluster %s failed", cluster)
                problem, kind = f"reconcile failed: {type(exc).__name__}: {exc}", TRANSIENT
                self._note(cluster, problem)
            if problem:
                result.add(f"{cluster}: {problem}", kind)
        return result

    def _forwarding(self) -> list[tuple[str, str]]:
        """The cloud's source/destination check (AWS only): on the first pass, every
        `forwarding_every`-th pass after a clean check, every pass while it reports a problem."""
        due = (self._forwarding_skipped < 0 or self._forwarding_problems
               or self._forwarding_skipped + 1 >= self.forwarding_every)
        if not due:
            self._forwarding_skipped += 1
            return []
        self._forwarding_skipped = 0
        try:
            problems = self.tables.check_forwarding()
        except VpcnetError as exc:
            self._forwarding_problems = [(f"cannot check the source/destination check: {exc}", kind_of(exc))]
            return self._forwarding_problems
        for problem in problems:
            log.warning("%s", problem, extra={"event": "route_problem", "kind": FATAL, "outcome": "forwarding"})
        self._forwarding_problems = [(p, FATAL) for p in problems]
        return self._forwarding_problems

    def _note(self, cluster: str, reason: str) -> None:
        claim = self.store.claim(cluster)
        if claim is None or not claim.host_cidr:
            self.store.record_claim(cluster, None, reason=reason)
        else:
            self.store.record_claim(cluster, claim.host_cidr, claim.static, reason=reason, route_ok=False)

    def _cluster(self, cluster: str, listings: dict[str, list[Route]],
                 me: str) -> tuple[str, str, dict[str, list[Route]]]:
        """One cluster CIDR: find or claim this host's block, put its route into every table, drop
        earlier blocks. Returns (problems joined, their worst kind, the listings as now known)."""
        problems: list[tuple[str, str]] = []
        name = self.cluster_name(cluster)
        overlap = claims.overlap(cluster, name, listings)
        claim = self.store.claim(cluster)
        static = claims.static_host_cidr(self.config, cluster)
        wanted = static or (claim.host_cidr if claim else None)
        if not wanted:
            wanted = claims.find_mine(cluster, name, listings, me, self.config.host_prefix_for(cluster))
            if wanted:
                log.info("found this host's block %s in cluster %s (route tables %s)",
                         wanted, cluster, ", ".join(listings),
                         extra={"event": "route_claim", "cluster": cluster, "destination": wanted,
                                "table": ",".join(listings), "outcome": "found"})
        if overlap and not wanted:
            raise Fatal(overlap)            # claiming now could take a block of the other cluster
        if overlap:                         # keep this host's own block in place, and say it loudly
            log.warning("%s", overlap, extra={"event": "route_problem", "kind": FATAL, "cluster": cluster,
                                              "destination": wanted, "outcome": "overlap"})
            problems.append((overlap, FATAL))
        if not wanted:
            wanted, listings = self._claim_new(cluster, listings, me)
            self.store.record_claim(cluster, wanted, reason="route created, waiting for Available")
        batched = self._create_batch(wanted, me, cluster, listings, problems)
        kept: dict[str, str] = {}       # earlier blocks still used by a network -> its id
        for table in list(listings):
            entry = next((r for r in listings[table] if r.destination == wanted), None)
            if entry is None and batched.get(table):
                continue                       # failed in the batch just now: its problem is recorded
            if entry is None and table not in batched:
                log.warning("route %s -> %s missing from %s: creating it", wanted, me, table,
                            extra={"event": "route_create", "cluster": cluster, "table": table,
                                   "destination": wanted, "next_hop": me, "outcome": "missing"})
                try:
                    self._create(wanted, me, table, cluster, listings[table])
                except DuplicateRoute:
                    pass                       # someone else's meanwhile: reported below
                except VpcnetError as exc:
                    problems.append((str(exc), kind_of(exc)))
                    continue
                listings[table] = self.tables.list_routes(table)
                entry = next((r for r in listings[table] if r.destination == wanted), None)
            problem = claims.entry_problem(wanted, me, table, entry)
            if problem:
                problems.append(problem)
            else:
                listings[table] = self._drop_stale(cluster, wanted, me, listings[table], kept)
        for block, network_id in sorted(kept.items()):
            in_use = self._in_use_message(cluster, block, network_id, wanted, bool(static))
            log.error("%s", in_use, extra={"event": "route_problem", "kind": FATAL, "cluster": cluster,
                                           "destination": block, "network": network_id[:12], "outcome": "in_use"})
            problems.append((in_use, FATAL))
        kind = claims.worst_kind(k for _, k in problems)
        problem_text = "; ".join(p for p, _ in problems)
        self.store.record_claim(cluster, wanted, static=bool(static), reason=problem_text,
                                route_ok=not problem_text)
        return problem_text, kind, listings

    def _drop_stale(self, cluster: str, wanted: str, me: str, routes: list[Route],
                    kept: dict[str, str]) -> list[Route]:
        """This host's other blocks of `cluster` in one table (an earlier claim): one block per cluster.
        A block a stored network still uses is kept (its containers reach other hosts through it) and
        added to `kept` with that network's id, for the caller to report."""
        stale = []
        for route in claims.stale(routes, wanted, me, cluster, self.cluster_name(cluster)):
            holder = self.store.network_by_host_cidr(route.destination)
            if holder is not None:
                kept[route.destination] = holder.network_id
            else:
                stale.append(route)
        for route in stale:
            log.warning("route %s -> %s in %s is an earlier block of this host in cluster %s (now %s): "
                        "removing it", route.destination, me, route.table, cluster, wanted,
                        extra={"event": "route_delete", "cluster": cluster, "table": route.table,
                               "destination": route.destination, "next_hop": me, "outcome": "stale"})
            self.tables.delete_route(route)
        return [r for r in routes if r not in stale]

    @staticmethod
    def _in_use_message(cluster: str, block: str, network_id: str, wanted: str, static: bool) -> str:
        short = network_id[:12]
        back = f", or set VPCNET_HOST_CIDR back to {block}" if static else ""
        return (f"this host's earlier block {block} of cluster {cluster} is still used by network {short}, "
                f"but the host's block is now {wanted}: route {block} kept so its containers still reach "
                f"other hosts; remove the network first (docker network rm {short}){back}")

    def _claim_new(self, cluster: str, listings: dict[str, list[Route]],
                   me: str) -> tuple[str, dict[str, list[Route]]]:
        """Claim a free block by creating its route in the first table (the arbiter every host of the
        cluster writes to first); a block is taken when any table has an entry overlapping it. The
        search starts at a block derived from the instance id, so hosts booting together spread out."""
        net, name = ipaddress.ip_network(cluster), self.cluster_name(cluster)
        prefix = self.config.host_prefix_for(cluster)
        reserved = self.tables.reserved_cidrs()
        first = next(iter(listings))
        start = 0 if self.tables.instant else claims.start_index(me, net, prefix)
        refused = None
        for _ in range(MAX_CLAIM_ATTEMPTS):
            candidate = claims.next_block(net, prefix, listings, reserved, start, refused)
            if candidate is None:
                raise Fatal(f"no free /{prefix} block left in cluster CIDR {cluster} "
                            f"(route tables {', '.join(listings)})")
            try:
                self._create(str(candidate), me, first, cluster, listings[first])
            except DuplicateRoute:
                listings = {**listings, first: self.tables.list_routes(first)}
                adopt, why = claims.after_duplicate(str(candidate), first, listings, me, cluster, name, prefix)
                log.info("%s", why, extra={"event": "route_claim", "cluster": cluster, "table": first,
                                           "destination": str(candidate),
                                           "outcome": "adopted" if adopt else "refused"})
                if adopt:
                    return adopt, listings
                refused = candidate
                continue
            log.info("claimed block %s in cluster %s (route table %s)", candidate, cluster, first,
                     extra={"event": "route_claim", "cluster": cluster, "table": first, "destination": str(candidate),
                            "next_hop": me, "outcome": "claimed"})
            return str(candidate), {**listings, first: self.tables.list_routes(first)}
        raise Retryable(f"no block of {cluster} claimed after {MAX_CLAIM_ATTEMPTS} attempts (other hosts "
                        "keep winning them); trying again on the next pass")

    def _used(self, routes: list[Route], destination: str) -> int:
        """The custom entries of a table that count against the quota a create of `destination` meets: every
        entry, or only its family's where the cloud counts each family on its own (AWS:
        `Provider.quota_per_family`)."""
        per_family = getattr(self.tables.provider, "quota_per_family", False)
        return claims.custom_entries(routes, claims.family(destination) if per_family else 0)

    def _quota_message(self, table: str, used: int, quota: int) -> str:
        return claims.quota_message(table, used, quota, self.tables.quota_hint())

    def _create(self, destination: str, me: str, table: str, cluster: str, routes: list[Route]) -> None:
        """Create `destination -> me` in `table`, after checking the table's quota against `routes`
        (its current listing). The attempt is recorded as uncertain until it is known to have landed
        marked, so a create whose marking failed is adopted or cleaned on a later pass."""
        used = self._used(routes, destination)
        quota = self.tables.quota(table)
        if claims.quota_full(used, quota):
            raise Fatal(self._quota_message(table, used, quota))
        token = uuid.uuid4().hex   # one token per logical create, reused by its retries
        name = route_name(destination)
        description = route_description(destination, me, self.cluster_name(cluster))
        self.journal.add(table, destination, cluster)
        try:
            self.tables.create_route(destination, name, description, token, table, me,
                                     progress=self.tables.progress_probe(self._baseline))
        except QuotaExceeded as exc:
            self.journal.drop(table, destination)
            raise Fatal(f"{self._quota_message(table, used, quota)} (the cloud says: {exc})") from None
        except (DuplicateRoute, Fatal):
            self.journal.drop(table, destination)
            raise
        self.journal.drop(table, destination)

    def _claims_in(self, routes: list[Route], cluster: str) -> frozenset:
        name, net = self.cluster_name(cluster), ipaddress.ip_network(cluster)
        return frozenset((r.destination, r.next_hop) for r in routes
                         if r.kind == "Custom" and r.marked and r.cluster == name and claims.inside(r.destination, net))

    def _room_for(self, others: list[Route], listings: dict[str, list[Route]], own: int) -> list[Route]:
        """The copies of other hosts' claims that fit: the call's MAX_BATCH_ENTRIES with this host's own
        entries first, and each table's quota (counting the copies already planned)."""
        planned: dict[str, int] = {}
        out: list[Route] = []
        for route in others:
            if own + len(out) >= MAX_BATCH_ENTRIES:
                break
            used = self._used(listings[route.table], route.destination) + planned.get(route.table, 0) + 1
            if claims.quota_full(used, self.tables.quota(route.table)):
                continue
            planned[route.table] = planned.get(route.table, 0) + 1
            out.append(route)
        return out

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
        missing = claims.missing_from(listings, destination)
        if not getattr(self.tables.provider, "batch_create", False) or not missing:
            return {}
        others = [r for r in claims.claimed_missing(listings, me, cluster, self.cluster_name(cluster),
                                                    self.config.host_prefix_for(cluster))
                  if r.destination != destination]
        if len(missing) < 2 and not others:
            return {}
        tables, failed = [], set()
        for table in missing:
            used = self._used(listings[table], destination)
            quota = self.tables.quota(table)
            if claims.quota_full(used, quota):
                problems.append((self._quota_message(table, used, quota), FATAL))
                failed.add(table)
            else:
                tables.append(table)
        if not tables or (len(tables) < 2 and not others):   # the single create (and its checks) handles it
            return {t: True for t in failed}
        others = self._room_for(others, listings, len(tables))
        planned = list(tables)

        def replan() -> tuple[list[str], list[Route]]:
            """Fresh listings: which planned tables still miss this host's route, which copies to carry."""
            fresh = {t: self.tables.provider.list_routes(t) for t in listings}
            self.tables.calls["list"] += len(fresh)
            still = [t for t in claims.missing_from(fresh, destination) if t in planned]
            copies = [r for r in claims.claimed_missing(fresh, me, cluster, self.cluster_name(cluster),
                                                        self.config.host_prefix_for(cluster))
                      if r.destination != destination]
            return still, self._room_for(copies, fresh, len(still)) if still else []

        first = next(iter(listings))
        seen = [self._claims_in(listings[first], cluster)]

        def settled() -> bool:
            """No new claim in the first table since the last look (one listing)."""
            now = self._claims_in(self.tables.provider.list_routes(first), cluster)
            self.tables.calls["list"] += 1
            same = now == seen[0]
            seen[0] = now
            return same
        log.warning("route %s -> %s missing from %s: creating it in one call%s", destination, me, ", ".join(tables),
                    f", with {len(others)} other hosts' claimed routes missing there" if others else "",
                    extra={"event": "route_create", "cluster": cluster, "table": ",".join(tables),
                           "destination": destination, "next_hop": me, "outcome": "missing"})
        token = uuid.uuid4().hex
        name = route_name(destination)
        description = route_description(destination, me, self.cluster_name(cluster))
        for table in tables:
            self.journal.add(table, destination, cluster)
        try:
            results = self.tables.create_routes(destination, name, description, token, tables, me,
                                                progress=self.tables.progress_probe(self._baseline),
                                                others=others, replan=replan, settled=settled)
        except BatchUnsupported as exc:       # nothing written: create one by one, as without a batch call
            log.info("%s; creating route %s one table at a time", exc, destination)
            for table in tables:
                self.journal.drop(table, destination)
            return {t: True for t in failed}
        except VpcnetError as exc:
            if not isinstance(exc, Retryable):
                for table in tables:
                    self.journal.drop(table, destination)
            problems.append((str(exc), kind_of(exc)))   # Retryable: the creates stay uncertain until listed
            return {t: True for t in missing}
        retry_single = set()
        for table in tables:
            error = results.get(table)
            if isinstance(error, Retryable):
                retry_single.add(table)    # this entry only: created on its own below (fresh token, backoff)
                continue
            self.journal.drop(table, destination)      # landed (marked: the marker is in the create) or not
            if error is None or isinstance(error, DuplicateRoute):
                listings[table] = self.tables.list_routes(table)   # checked by the caller like any listed entry
                continue
            failed.add(table)
            if isinstance(error, QuotaExceeded):
                used = self._used(listings[table], destination)
                problems.append((f"{self._quota_message(table, used, self.tables.quota(table))} "
                                 f"(the cloud says: {error})", FATAL))
            else:
                problems.append((str(error), kind_of(error)))
        return {t: t in failed for t in missing if t not in retry_single}
