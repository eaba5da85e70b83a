"""The provider's route tables as the routes room calls them: every call retried through `Backoff`,
counted, and each listing's size kept against the table's quota.

A provider programs one or more tables (`Provider.table_ids()`: a multi-zone VPC has a table per zone,
and hosts behind one table reach this host only if that table holds its route). The provider is made on
first use, so a process that never touches the cloud (an IPAM answer from the store) never builds one.

Cloud-call accounting (`calls`, also `RouteKeeper.calls`: logical calls; a retried call counts once),
per table T: first start = T listings + T creates (2 with a batch call) (+ the listings needed to see
Pending -> Available, + one `reserved` lookup of vSwitch CIDRs, cached by the provider, + on AWS one
`forwarding` check); restart = T listings (+ the forwarding check); per container = 0 (IPAM reads the
store only).

Usage: `route_table_usage()` returns `{table id: {family: (custom entries, quota)}}` as of the last listing
(quota 0 = unknown; `VPCNET_ROUTE_TABLE_QUOTA`, default the cloud's). `family` is "all" where the cloud
counts both families against one quota (Alibaba, as far as its documents say), and "ipv4" and "ipv6" where
it counts each against its own (AWS: `Provider.quota_per_family`): the values of
`vpcnet_route_table_entries{table,family}` and `vpcnet_route_table_quota{table,family}`.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Callable

from vpcnet.cloud import PROVIDERS, Provider, Route, make_provider, provider_class
from vpcnet.errors import Busy, Fatal, Retryable
from vpcnet.observability import events
from vpcnet.routes.backoff import Backoff
from vpcnet.routes.claims import Net, custom_entries, reserved_networks

log = logging.getLogger(__name__)

RESERVED_DEADLINE = 5.0     # longest retrying of the optional reserved-CIDR lookup
SETTLE_EVERY = 5.0          # a batch create looks at most this often whether other hosts still claim
SETTLE_MAX = 60.0           # and waits for them at most this long before writing anyway


@dataclass
class _Plan:
    """What a batch create writes, as last planned (RouteTables.create_routes)."""
    tables: list[str]
    others: list[Route]
    token: str
    looked: float            # when the first table was last looked at for new claims
    since: float             # when the waiting began
    fresh: bool = False      # planned from listings made since the last busy answer


@dataclass(frozen=True)
class TableUsage:
    table: str
    entries: int      # custom entries, every owner's, of `family`
    quota: int        # 0 = unknown
    family: str = "all"   # "all": one quota for both families; "ipv4" or "ipv6": that family's own


FAMILIES = {4: "ipv4", 6: "ipv6"}
FAMILY_NAMES = {"ipv4": "IPv4", "ipv6": "IPv6"}


def table_usage(table: str, routes: list[Route], quota: int, per_family: bool) -> list[TableUsage]:
    """What `routes` (a full listing of `table`) use of its quota: one figure for both families, or (a cloud
    counting each family against its own quota) one per family."""
    if not per_family:
        return [TableUsage(table, custom_entries(routes), quota)]
    return [TableUsage(table, custom_entries(routes, version), quota, name) for version, name in FAMILIES.items()]


class RouteTables:
    """One provider, made lazily, and the calls the routes room makes to it."""

    def __init__(self, config, provider_factory: Callable[[], Provider] | None, backoff: Backoff,
                 stop: threading.Event):
        self.config = config
        self._factory = provider_factory or (lambda: make_provider(config))
        self._provider: Provider | None = None
        self._provider_lock = threading.Lock()
        self.backoff = backoff
        self._stop = stop             # ends any retrying at once
        # Logical cloud calls, for the benchmark: a call retried by the backoff counts once.
        self.calls = {"list": 0, "create": 0, "delete": 0, "reserved": 0, "instance": 0}
        # Entries and quota per route table, as of the last listing (for `routes list` and metrics).
        self.usage: dict[str, list[TableUsage]] = {}

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
        return self.config.provider in PROVIDERS and provider_class(self.config.provider).instant

    def close(self) -> None:
        if self._provider is not None:
            self._provider.close()

    def retry(self, what: str, fn: Callable, on_retry: Callable[[Exception], None] | None = None,
              progress: Callable[[], bool] | None = None):
        return self.backoff.run(what, fn, on_retry=on_retry, stop=self._stop, progress=progress)

    @staticmethod
    def fingerprint(listings: dict[str, list[Route]]) -> frozenset:
        """What the progress probe compares: every entry's table, destination, next hop and status."""
        return frozenset((t, r.destination, r.next_hop, r.status) for t, routes in listings.items()
                         for r in routes)

    def progress_probe(self, baseline: dict[str, list[Route]]) -> Callable[[], bool]:
        """For a busy wait (vpcnet.routes.backoff): True when the tables of `baseline` (the listings the
        pass started from) changed since the probe last looked (an entry added, removed or changed
        status: another host's write went through), False when nothing moved. One listing per table per
        look; looks come once per BUSY_DEADLINE of busy answers."""
        seen = [self.fingerprint(baseline)]
        tables = list(baseline)

        def probe() -> bool:
            now = self.fingerprint({t: self.provider.list_routes(t) for t in tables})
            self.calls["list"] += len(tables)
            moved = now != seen[0]
            seen[0] = now
            return moved
        return probe

    # -- reads ------------------------------------------------------------------------------------
    def table_ids(self) -> list[str]:
        return self.retry("find the route tables", self.provider.table_ids)

    def instance_id(self) -> str:
        return self.retry("find this instance's id", self.provider.instance_id)

    def list_routes(self, table: str = "", on_retry: Callable[[Exception], None] | None = None) -> list[Route]:
        """Every entry of `table` (each naming its table), noting the table's usage."""
        table = table or self.provider.table_id()
        self.calls["list"] += 1
        routes = self.retry(f"list routes of {table}", lambda: self.provider.list_routes(table), on_retry)
        routes = [r if r.table else dataclasses.replace(r, table=table) for r in routes]
        usage = self.usage[table] = table_usage(table, routes, self.provider.table_quota(table),
                                                getattr(self.provider, "quota_per_family", False))
        events.RECONCILER.table_listed(table, {u.family: (u.entries, u.quota) for u in usage})
        return routes

    def route_table_usage(self) -> dict[str, dict[str, tuple[int, int]]]:
        """{table id: {family: (custom entries, quota)}} as of the last listing; quota 0 = unknown. For
        `vpcnet_route_table_entries{table,family}` / `vpcnet_route_table_quota{table,family}`."""
        return {t: {u.family: (u.entries, u.quota) for u in usage} for t, usage in self.usage.items()}

    def quota(self, table: str) -> int:
        return self.provider.table_quota(table)

    def quota_hint(self) -> str:
        return getattr(self.provider, "quota_hint", "")

    def reserved_cidrs(self) -> list[Net]:
        """The provider's reserved CIDRs (vSwitches/subnets); none known when it cannot tell."""
        self.calls["reserved"] += 1
        # Optional knowledge, so a short backoff: without it an overlap is refused by the cloud anyway.
        b = self.backoff
        quick = Backoff(attempts=min(3, b.attempts), base=b.base, cap=b.cap,
                        deadline=min(RESERVED_DEADLINE, b.deadline), sleep=b.sleep, monotonic=b.monotonic)
        try:
            cidrs = quick.run("list reserved (vSwitch/subnet) CIDRs", self.provider.reserved_cidrs,
                              stop=self._stop)
        except (Retryable, Fatal) as exc:
            log.warning("cannot list the reserved (vSwitch/subnet) CIDRs (%s): claiming without avoiding "
                        "them; an overlap would be refused by the cloud", exc)
            return []
        nets, ignored = reserved_networks(cidrs)
        for cidr in ignored:
            log.debug("ignoring reserved CIDR %r (not a CIDR)", cidr)
        return nets

    def instance_exists(self, instance: str) -> bool:
        self.calls["instance"] += 1
        return self.provider.instance_exists(instance)

    def check_forwarding(self) -> list[str]:
        """The cloud's source/destination check (AWS only; [] elsewhere): problems it cannot fix."""
        if not getattr(self.provider, "checks_forwarding", False):
            return []
        self.calls["forwarding"] = self.calls.get("forwarding", 0) + 1
        return self.retry("check the source/destination check", lambda: self.provider.check_forwarding(
            disable=self.config.aws_disable_source_dest_check))

    # -- writes -----------------------------------------------------------------------------------
    def create_route(self, destination: str, name: str, description: str, token: str, table: str,
                     me: str, progress: Callable[[], bool] | None = None) -> None:
        """One create, retried with the same ClientToken (a busy VPC for as long as `progress` says it
        moves: vpcnet.routes.backoff)."""
        self.calls["create"] += 1
        self.retry(f"create route {destination} -> {me} in {table}",
                   lambda: self.provider.create_route(destination, name, description, token, table=table),
                   progress=progress)

    def create_routes(self, destination: str, name: str, description: str, token: str, tables: list[str],
                      me: str, progress: Callable[[], bool] | None = None,
                      others: list[Route] | None = None,
                      replan: Callable[[], tuple[list[str], list[Route]]] | None = None,
                      settled: Callable[[], bool] | None = None) -> dict:
        """One batch create into several tables (counted once): {table: None or that entry's error}.
        `others`: other hosts' claimed routes copied along (Provider.create_routes).

        With `replan` and `settled` (a boot storm, vpcnet.routes.sync): the batch waits, as if the VPC
        were busy, while other hosts are still claiming — `settled()`, asked at most every SETTLE_EVERY
        seconds (one listing of the first table), is False while new claims appear there — for at most
        SETTLE_MAX seconds; then `replan()` says which of `tables` still miss the route (another host's
        batch may have copied it) and which claims to copy along, and the call is made: one batch then
        covers the claims made meanwhile, instead of one batch per host racing the claims for the VPC.
        A changed plan gets a new ClientToken (what landed is listed, so never created twice); no table
        left: nothing to write."""
        self.calls["create"] += 1
        clock = self.backoff.monotonic
        plan = _Plan(list(tables), list(others or []), token, looked=clock(), since=clock())

        def attempt() -> dict:
            if replan is not None and settled is not None and not plan.fresh:
                now = clock()
                if now - plan.since < SETTLE_MAX:
                    if now - plan.looked < SETTLE_EVERY:
                        raise Busy("waiting for other hosts' claims to settle before the batch write")
                    plan.looked = now
                    if not settled():
                        raise Busy("other hosts are still claiming blocks: waiting before the batch write")
                fresh_tables, fresh_others = replan()
                plan.fresh = True
                if (fresh_tables, fresh_others) != (plan.tables, plan.others):
                    plan.tables, plan.others, plan.token = fresh_tables, fresh_others, uuid.uuid4().hex
            if not plan.tables:
                return {}
            try:
                if plan.others:
                    return self.provider.create_routes(destination, name, description, plan.token, plan.tables,
                                                       others=plan.others)
                return self.provider.create_routes(destination, name, description, plan.token, plan.tables)
            except Busy:
                plan.fresh = False            # lost the race for the VPC: look again before the next try
                plan.looked = clock()
                raise

        extra = f" (and {len(others)} other hosts' claimed routes)" if others else ""
        return self.retry(f"create route {destination} -> {me} in {', '.join(tables)}{extra}", attempt,
                          progress=progress)

    def mark_route(self, table: str, route: Route, name: str, description: str) -> bool:
        return self.retry(f"mark route {route.destination} in {table}",
                          lambda: self.provider.mark_route(route, name, description))

    def delete_route(self, route: Route) -> None:
        self.calls["delete"] += 1
        self.retry(f"delete route {route.destination} from {route.table or self.provider.table_id()}",
                   lambda: self.provider.delete_route(route))
