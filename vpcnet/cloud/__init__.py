"""Cloud route providers: one small interface, one module per cloud, chosen by name.

A provider only moves routes: list the route table, create `destination -> this instance`, delete a
route, and say who this instance is. Claiming blocks, ownership and retries live in `vpcnet.routes`, so
a new cloud is one new module registered in `PROVIDERS`, not an edit across the tree (flannel's backends).

Errors a provider raises (from `vpcnet.errors`): `Retryable` for anything worth retrying (throttling,
conflicts, 5xx, timeouts), `DuplicateRoute` when the destination already has an entry, `QuotaExceeded`
when the table is full, `Fatal` for the rest. Messages never contain a secret.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass

from vpcnet.errors import Fatal, Retryable  # noqa: F401  (re-exported for providers)

# Every vpcnet-created route carries this marker in its name (Alibaba RouteEntryName, the local table's
# name field) and description, so vpcnet can tell its own routes from system and hand-made ones.
ROUTE_MARKER = "vpcnet"


class DuplicateRoute(Fatal):
    """The destination already has a route (ours or someone else's: list and compare)."""


class QuotaExceeded(Fatal):
    """The route table holds as many custom routes as it may."""


@dataclass(frozen=True)
class Route:
    destination: str              # CIDR, e.g. "10.200.3.0/24"
    next_hop: str                 # instance id, or "" when the next hop is not an instance
    status: str = "Available"     # Available | Pending | Deleting (Alibaba's words; others map to them)
    kind: str = "Custom"          # Custom | System
    name: str = ""
    description: str = ""
    route_id: str = ""
    next_hop_type: str = "Instance"

    @property
    def marked(self) -> bool:
        """Carries vpcnet's marker: created by vpcnet (on some host)."""
        return self.name.startswith(ROUTE_MARKER) or self.description.startswith(ROUTE_MARKER)


class Provider(abc.ABC):
    """The route table of one VPC, seen from one instance."""

    name = "?"
    #: True when calls are local and instant (no network): IPAM may then claim inline.
    instant = False

    @abc.abstractmethod
    def instance_id(self) -> str:
        """This host's instance id (the next hop of its routes)."""

    @abc.abstractmethod
    def table_id(self) -> str:
        """The route table's id, for messages and `routes list`."""

    @abc.abstractmethod
    def list_routes(self) -> list[Route]:
        """Every entry of the table (all pages), custom and system."""

    @abc.abstractmethod
    def create_route(self, destination: str, name: str, description: str, client_token: str) -> None:
        """Create `destination -> this instance`. Raises DuplicateRoute if the destination is taken."""

    @abc.abstractmethod
    def delete_route(self, route: Route) -> None:
        """Delete one entry; an entry already gone is not an error."""

    def instance_exists(self, instance_id: str) -> bool:
        """Whether an instance still exists (for `routes gc`). Providers that cannot tell say True."""
        return True

    def reserved_cidrs(self) -> list[str]:
        """CIDRs a host block must not overlap (vSwitch/subnet CIDRs), when the provider knows them."""
        return []

    def preflight(self) -> list[str]:
        """Problems with this instance's setup worth a warning (e.g. AWS source/dest check on)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional: a provider without connections keeps this no-op
        """Release connections."""


PROVIDERS = {
    "local": "vpcnet.cloud.local:LocalProvider",
    "aliyun": "vpcnet.cloud.aliyun:AliyunProvider",
    "aws": "vpcnet.cloud.aws:AwsProvider",
}


def provider_names() -> list[str]:
    return list(PROVIDERS)


def make_provider(config) -> Provider:
    """Instantiate the provider named by `config.provider` (imported only when chosen)."""
    module_name, _, class_name = PROVIDERS[config.provider].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config)
