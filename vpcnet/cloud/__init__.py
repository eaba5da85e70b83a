"""Cloud route providers: one small interface, one module per cloud, chosen by name.

A provider only moves routes: list a route table, create `destination -> this instance` in one, delete
a route, and say who this instance is. A provider programs one or more route tables (`table_ids()`: a
multi-zone VPC has one per zone, and every one of them needs every host's route); each call names its
table, and `""` means the first one. Claiming blocks, ownership and retries live in `vpcnet.routes`, so
a new cloud is one new module registered in `PROVIDERS`, not an edit across the tree (flannel's backends).

Errors a provider raises (from `vpcnet.errors`): `Busy` (a `Retryable`) when the cloud says "not now"
(a concurrent route-table write, throttling), `Retryable` for anything else worth retrying (5xx,
timeouts), `DuplicateRoute` when the destination already has an entry, `QuotaExceeded` when the table is
full, `Fatal` for the rest. Messages never contain a secret.

The ownership marker: vpcnet names its routes `vpcnet-...` and describes them
`vpcnet: host CIDR <dest> of <instance> cluster=<name>` (`route_description`); a provider without
names or descriptions (AWS) keeps the same facts elsewhere and fills `Route.name`/`description` from
them. `Route.cluster` is the cluster identity parsed back out ("" for routes made before clusters had
names).
"""
from __future__ import annotations

import abc
import importlib
import importlib.util
import re
from dataclasses import dataclass

from vpcnet.errors import Busy, Fatal, Retryable  # noqa: F401  (re-exported for providers)

# Every vpcnet-created route carries this marker in its name (Alibaba RouteEntryName, the local table's
# name field) and description, so vpcnet can tell its own routes from system and hand-made ones.
ROUTE_MARKER = "vpcnet"


class DuplicateRoute(Fatal):
    """The destination already has a route (ours or someone else's: list and compare)."""


class QuotaExceeded(Fatal):
    """The route table holds as many custom routes as it may."""


class BatchUnsupported(Fatal):
    """The provider (or its endpoint) has no call writing several tables at once: create one by one."""


_CLUSTER_RE = re.compile(r"(?:^|\s)cluster=([A-Za-z0-9._-]+)")


def route_name(destination: str) -> str:
    return f"{ROUTE_MARKER}-{destination.replace('.', '-').replace('/', '-')}"


def route_description(destination: str, instance: str, cluster: str) -> str:
    return f"{ROUTE_MARKER}: host CIDR {destination} of {instance} cluster={cluster}"


def table_list(value) -> list[str]:
    """A table setting (`"vtb-a, vtb-b"` or a sequence) as a list of ids, order kept, no duplicates."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    out: list[str] = []
    for item in (str(i).strip() for i in items):
        if item and item not in out:
            out.append(item)
    return out


@dataclass(frozen=True)
class Route:
    destination: str              # CIDR, e.g. "10.200.3.0/24" or "fd12:3456:789a::/80"
    next_hop: str                 # instance id, or "" when the next hop is not an instance
    status: str = "Available"     # Available | Pending | Deleting (Alibaba's words; others map to them)
    kind: str = "Custom"          # Custom | System
    name: str = ""
    description: str = ""
    route_id: str = ""
    next_hop_type: str = "Instance"
    table: str = ""               # the route table holding it ("" = the provider's first table)

    @property
    def marked(self) -> bool:
        """Carries vpcnet's marker: created by vpcnet (on some host)."""
        return self.name.startswith(ROUTE_MARKER) or self.description.startswith(ROUTE_MARKER)

    @property
    def cluster(self) -> str:
        """The cluster identity in vpcnet's marker; "" when unmarked or made before clusters had names."""
        if not self.marked:
            return ""
        found = _CLUSTER_RE.search(self.description)
        return found.group(1) if found else ""


class Provider(abc.ABC):
    """The route table of one VPC, seen from one instance."""

    name = "?"
    #: True when calls are local and instant (no network): IPAM may then claim inline.
    instant = False
    #: True when `check_forwarding` asks the cloud something: the route pass then calls it on its first
    #: pass, then every FORWARDING_EVERY-th (vpcnet.routes.sync), and every pass while it finds a problem.
    checks_forwarding = False

    def __init__(self, config) -> None:  # noqa: B027 - every provider is built from the one config object
        pass
    #: How to raise a full table's quota, for the error that stops at it.
    quota_hint = ""
    #: True when `create_routes` writes several tables in one call (Alibaba's CreateRouteEntries).
    batch_create = False
    #: True when the cloud counts IPv4 and IPv6 routes against separate quotas of `table_quota()` each (AWS);
    #: False: every custom entry counts against one quota (Alibaba's documents name one 200-entry quota per table).
    quota_per_family = False

    @abc.abstractmethod
    def instance_id(self) -> str:
        """This host's instance id (the next hop of its routes)."""

    @abc.abstractmethod
    def table_id(self) -> str:
        """The first route table's id, for messages."""

    def table_ids(self) -> list[str]:
        """Every route table this host's routes go into (configured, or discovered), first one first.
        Raises Fatal when discovery is ambiguous."""
        return [self.table_id()]

    def table_quota(self, table: str = "") -> int:
        """Custom entries the table may hold (0: unknown)."""
        return 0

    @abc.abstractmethod
    def list_routes(self, table: str = "") -> list[Route]:
        """Every entry of the table (all pages), custom and system."""

    @abc.abstractmethod
    def create_route(self, destination: str, name: str, description: str, client_token: str,
                     table: str = "") -> None:
        """Create `destination -> this instance`. Raises DuplicateRoute if the destination is taken."""

    def create_routes(self, destination: str, name: str, description: str, client_token: str,
                      tables: list[str], others: list[Route] | None = None) -> dict:
        """Create `destination -> this instance` in each of `tables` with one call (`batch_create`):
        {table: None, or the error of that table's entry}. `others` ride along in the same call: other
        hosts' claimed routes, each copied as it is (destination, next hop, name, description) into
        `route.table`; their failures are not reported (each owner sees its own route). What fails the
        whole call is raised (retry it with the same token and entries); BatchUnsupported when there is
        no such call (then create one by one)."""
        raise BatchUnsupported(f"the {self.name} provider has no batch create")

    @abc.abstractmethod
    def delete_route(self, route: Route) -> None:
        """Delete one entry (from `route.table`); an entry already gone is not an error."""

    def mark_route(self, route: Route, name: str, description: str) -> bool:
        """Mark an existing route to this instance as vpcnet's, where the marker is written apart from
        the route (AWS tags). False when the provider cannot (its marker is part of the create)."""
        return False

    def check_forwarding(self, disable: bool) -> list[str]:
        """Make sure the cloud forwards traffic this instance routes for others (AWS source/destination
        check): turn the check off when `disable`, else only look. Returns problems, each saying what to
        run; [] when all is well or the provider has no such check."""
        return []

    def instance_exists(self, instance_id: str) -> bool:
        """Whether an instance still exists (for `routes gc`). Providers that cannot tell say True."""
        return True

    def reserved_cidrs(self) -> list[str]:
        """CIDRs a host block must not overlap (vSwitch/subnet CIDRs), when the provider knows them."""
        return []

    def close(self) -> None:  # noqa: B027 - optional: a provider without connections keeps this no-op
        """Release connections."""


class ProviderUnavailable(Fatal):
    """The chosen provider needs a module that is not installed (botocore for aws)."""


@dataclass(frozen=True)
class Registered:
    """A provider as the registry knows it, before its module is imported: where its class lives, and
    what it needs beyond vpcnet's own dependencies (checked first, so a missing one is one clear line)."""
    path: str                          # "module:Class"
    requires: tuple[str, ...] = ()     # modules the provider imports beyond vpcnet's dependencies
    extra: str = ""                    # the vpcnet extra that installs them


PROVIDERS = {
    "local": Registered("vpcnet.cloud.local:LocalProvider"),
    "aliyun": Registered("vpcnet.cloud.aliyun.provider:AliyunProvider"),
    "aws": Registered("vpcnet.cloud.aws.provider:AwsProvider", requires=("botocore",), extra="aws"),
}


def provider_names() -> list[str]:
    return list(PROVIDERS)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):     # a finder refusing it, or a stub without a spec
        return False


def missing_requirements(name: str) -> str:
    """"" when the provider registered as `name` can be imported here; else one line saying what it
    needs and how to install it."""
    registered = PROVIDERS[name]
    missing = [m for m in registered.requires if not _importable(m)]
    if not missing:
        return ""
    extra = registered.extra
    how = (f"python3 -m vpcnet.bootstrap --extras {extra} (or pip install 'vpcnet[{extra}]')" if extra
           else f"pip install {' '.join(missing)}")
    return (f"VPCNET_PROVIDER={name} needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {how}")


def provider_class(name: str) -> type[Provider]:
    """The provider class registered as `name`, its module imported only now (a provider's own
    dependencies, botocore for aws, are needed only where it is chosen). ProviderUnavailable when
    they are not installed."""
    problem = missing_requirements(name)
    if problem:
        raise ProviderUnavailable(problem)
    module_name, _, class_name = PROVIDERS[name].path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_provider(config) -> Provider:
    """Instantiate the provider named by `config.provider`."""
    return provider_class(config.provider)(config)
