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

Usage: `route_table_usage()` returns `{table id: (custom entries, quota)}` as of the last listing (quota
0 = unknown; `VPCNET_ROUTE_TABLE_QUOTA`, default the cloud's): the values of
`vpcnet_route_table_entries{table}` and `vpcnet_route_table_quota{table}`.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from vpcnet.cloud import PROVIDERS, Provider, Route, make_provider, provider_class
from vpcnet.errors import Fatal, Retryable
from vpcnet.observability import events
from vpcnet.routes.backoff import Backoff
from vpcnet.routes.claims import custom_entries, reserved_networks

log = logging.getLogger(__name__)

RESERVED_DEADLINE = 5.0     # longest retrying of the optional reserved-CIDR lookup


@dataclass(frozen=True)
class TableUsage:
    table: str
    entries: int      # custom entries, every owner's
    quota: int        # 0 = unknown


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
        self.usage: dict[str, TableUsage] = {}

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

    def retry(self, what: str, fn: Callable, on_retry: Callable[[Exception], None] | None = None):
        return self.backoff.run(what, fn, on_retry=on_retry, stop=self._stop)

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
        usage = self.usage[table] = TableUsage(table, custom_entries(routes), self.provider.table_quota(table))
        events.RECONCILER.table_listed(table, usage.entries, usage.quota)
        return routes

    def route_table_usage(self) -> dict[str, tuple[int, int]]:
        """{table id: (custom entries, quota)} as of the last listing; quota 0 = unknown. For
        `vpcnet_route_table_entries{table}` / `vpcnet_route_table_quota{table}`."""
        return {t: (u.entries, u.quota) for t, u in self.usage.items()}

    def quota(self, table: str) -> int:
        return self.provider.table_quota(table)

    def quota_hint(self) -> str:
        return getattr(self.provider, "quota_hint", "")

    def reserved_cidrs(self) -> list[ipaddress.IPv4Network]:
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
            log.debug("ignoring reserved CIDR %r (not IPv4)", cidr)
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
                     me: str) -> None:
        """One create, retried with the same ClientToken."""
        self.calls["create"] += 1
        self.retry(f"create route {destination} -> {me} in {table}",
                   lambda: self.provider.create_route(destination, name, description, token, table=table))

    def create_routes(self, destination: str, name: str, description: str, token: str, tables: list[str],
                      me: str) -> dict:
        """One batch create into several tables (counted once): {table: None or that entry's error}."""
        self.calls["create"] += 1
        return self.retry(f"create route {destination} -> {me} in {', '.join(tables)}",
                          lambda: self.provider.create_routes(destination, name, description, token, tables))

    def mark_route(self, table: str, route: Route, name: str, description: str) -> bool:
        return self.retry(f"mark route {route.destination} in {table}",
                          lambda: self.provider.mark_route(route, name, description))

    def delete_route(self, route: Route) -> None:
        self.calls["delete"] += 1
        self.retry(f"delete route {route.destination} from {route.table or self.provider.table_id()}",
                   lambda: self.provider.delete_route(route))
