"""The claim rules as pure functions over route listings: no cloud, no store, no clock, no log.

The route tables are the cluster's shared record of who owns which block. A host finds its block as the
vpcnet-marked custom entry inside the cluster CIDR whose next hop is this instance (in the first table
that has one: `find_mine`); failing that it picks a free block (`next_block`: not equal to, inside or
around any entry of ANY table, nor a reserved vSwitch/subnet CIDR when the provider knows them) and
creates its route in the first table, the arbiter every host of the cluster writes to first; a
duplicate-destination answer means another host won that block, so it takes the next
(`after_duplicate`). The search starts at a block derived from the instance id (`start_index`), not at
the lowest block, so hosts booting together spread over the cluster CIDR instead of all racing for the
same block (the local provider, a file on one host, starts at the lowest). An existing entry is adopted
only when it points at this instance AND carries vpcnet's marker. A host never ends with different
blocks in different tables: its other blocks of a cluster are `stale`.

Clusters: every route carries a cluster identity (`cluster=<name>` in its description or AWS tag;
`VPCNET_CLUSTER_NAME`, default the cluster CIDR as `10.200.0.0-16`: `cluster_name`). A route of another
cluster is never claimed, adopted, released, collected or repaired; one inside this host's cluster CIDR
means the two clusters' CIDRs overlap (`overlap`): a host without a block refuses to claim one, and a
host with one keeps its own route in place but reports the overlap as a FATAL problem naming the other
cluster. Routes made before routes carried a name count as this cluster's.

Ownership (`owned_in`, `ownership`, `collectable`): vpcnet only ever deletes a route whose next hop is
this instance, whose destination lies in one of this host's cluster CIDRs, which carries vpcnet's marker
(`Route.marked`) and this cluster's identity — or, for `routes gc`, such a route of this cluster whose
next-hop instance the cloud says no longer exists. System routes, other live hosts' routes, other
clusters' routes and hand-made routes are never touched, not even hand-made ones pointing at this
instance.

Quota: before each create the table's custom entries (every owner's) are compared with the table's
quota (`quota_full`); at the quota the pass stops with a FATAL problem (`quota_message`) naming the
table, the figures and how to raise the quota.

Families: a cluster CIDR is IPv4 or IPv6 (VPCNET_CLUSTER_CIDR_V6; /80 blocks, VPCNET_HOST_PREFIX_V6) and every
rule looks only at routes of its own family: an IPv4 route never takes, owns or overlaps anything of an IPv6
cluster, nor the other way round. An IPv6 cluster's default identity writes its colons as dots
(`fd12.3456.789a..-48`), which the marker's `cluster=` can carry. A /48 holds 2**32 /80 blocks, so the block
search (`first_free`) jumps over taken ranges instead of trying blocks one by one.

Kinds of problem a pass reports (what waiting can fix): PENDING (a route is Pending/Deleting: list again
shortly), TRANSIENT (the cloud failed retryably even after the backoff: try again later), FATAL
(configuration, quota, a block held by someone else: needs a person).
"""
from __future__ import annotations

import hashlib
import ipaddress
from typing import Iterable, Mapping

from vpcnet.cloud import Route
from vpcnet.errors import Retryable

PENDING = "pending"         # the route is Pending/Deleting: list again shortly
TRANSIENT = "transient"     # the cloud failed retryably even after the backoff: try again later
FATAL = "fatal"             # configuration, quota, a block held by someone else: needs a person

Listings = Mapping[str, list[Route]]      # route table id -> its entries, in the providers' table order


def kind_of(exc: Exception) -> str:
    return TRANSIENT if isinstance(exc, Retryable) else FATAL


def worst_kind(kinds: Iterable[str]) -> str:
    """The kind that decides what waiting can fix: FATAL over TRANSIENT over PENDING; "" for none."""
    kinds = set(kinds)
    return next((k for k in (FATAL, TRANSIENT, PENDING) if k in kinds), "")


# -- clusters ---------------------------------------------------------------------------------------
def default_cluster_name(cluster: str) -> str:
    """A cluster's identity when VPCNET_CLUSTER_NAME is not set: its CIDR, e.g. `10.200.0.0-16`, or for an
    IPv6 one with its colons as dots (the marker's `cluster=` takes letters, digits, '.', '_', '-'), e.g.
    `fd12.3456.789a..-48`."""
    return cluster.replace("/", "-").replace(":", ".")


def cluster_name(cluster: str, configured: str = "") -> str:
    """The cluster identity written into this host's routes of `cluster` (`configured`:
    VPCNET_CLUSTER_NAME, or "")."""
    return configured or default_cluster_name(cluster)


def static_host_cidr(config, cluster: str) -> str:
    """The configured block (VPCNET_HOST_CIDR) when `cluster` is the configured cluster CIDR, else ""."""
    if config.host_cidr and cluster == config.cluster_cidr:
        return config.host_cidr
    return ""


Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def network(cidr: str) -> Net | None:
    """`cidr` as a network of either family, or None when it is not one (a malformed destination)."""
    try:
        return ipaddress.ip_network(cidr)
    except ValueError:
        return None


def is_v4(cidr: str) -> bool:
    found = network(cidr)
    return found is not None and found.version == 4


def same_family(cidr: str, net: Net) -> Net | None:
    """`cidr` as a network if it is one of `net`'s family (a v4 route never counts inside a v6 cluster, nor
    the other way round), else None."""
    found = network(cidr)
    return found if found is not None and found.version == net.version else None


def inside(cidr: str, net: Net) -> bool:
    found = same_family(cidr, net)
    return found is not None and found.subnet_of(net)  # type: ignore[arg-type]


def overlap(cluster: str, name: str, listings: Listings) -> str:
    """Another vpcnet cluster's route inside this cluster CIDR (two clusters would claim each other's
    blocks): the refusal to give, or "". Such routes are never claimed, adopted or repaired."""
    net = ipaddress.ip_network(cluster)
    for table, routes in listings.items():
        for r in routes:
            dest = same_family(r.destination, net)
            if r.kind == "Custom" and r.cluster and r.cluster != name and dest is not None and dest.overlaps(net):
                return (f"cluster CIDR {cluster} (cluster {name}) overlaps route {r.destination} -> "
                        f"{r.next_hop or '?'} of vpcnet cluster {r.cluster} in route table {table}: two "
                        "clusters sharing a VPC need disjoint cluster CIDRs; choose another "
                        f"VPCNET_CLUSTER_CIDR, or set VPCNET_CLUSTER_NAME={r.cluster} if this host "
                        "belongs to that cluster")
    return ""


# -- ownership --------------------------------------------------------------------------------------
def owned_in(route: Route, me: str, cluster: str, name: str) -> bool:
    """A route this host may delete in `cluster` (identity `name`): vpcnet's, to this instance, inside the
    cluster CIDR and of that cluster (or made before routes carried a cluster)."""
    return (route.kind == "Custom" and route.marked and route.next_hop == me
            and route.cluster in ("", name)
            and inside(route.destination, ipaddress.ip_network(cluster)))


def owned(route: Route, me: str, clusters: list[str], configured_name: str = "") -> bool:
    """`owned_in` any of this host's clusters."""
    return any(owned_in(route, me, c, cluster_name(c, configured_name)) for c in clusters)


def of_clusters(route: Route, clusters: list[str], configured_name: str = "") -> bool:
    """Inside one of `clusters` and of its identity (or of none), whoever the next hop is."""
    return any(inside(route.destination, ipaddress.ip_network(c))
               and route.cluster in ("", cluster_name(c, configured_name)) for c in clusters)


def ownership(route: Route, me: str, clusters: list[str], configured_name: str = "") -> str:
    """How `routes list` labels a route: mine, ours-other-host (vpcnet's, another instance, this host's
    clusters), ours-other-cluster (vpcnet's, another cluster or outside this host's cluster CIDRs) or
    foreign."""
    if owned(route, me, clusters, configured_name):
        return "mine"
    if route.kind == "Custom" and route.marked:
        same = of_clusters(route, clusters, configured_name)
        return "ours-other-host" if same and route.next_hop != me else "ours-other-cluster"
    return "foreign"


def collectable(route: Route, me: str, clusters: list[str], configured_name: str = "") -> bool:
    """A route `routes gc` removes if its next-hop instance is gone: vpcnet's, of this host's clusters,
    to another instance."""
    return bool(route.kind == "Custom" and route.marked and route.next_hop and route.next_hop != me
                and of_clusters(route, clusters, configured_name))


def find_mine(cluster: str, name: str, listings: Listings, me: str, prefix: int) -> str | None:
    """This host's block of `cluster`: the one in the first table that has one (the claiming table),
    else the lowest; one block whatever the tables say."""
    for routes in listings.values():
        mine = sorted((r.destination for r in routes if owned_in(r, me, cluster, name)
                       and ipaddress.ip_network(r.destination).prefixlen == prefix),
                      key=ipaddress.ip_network)
        if mine:
            return mine[0]
    return None


def stale(routes: list[Route], wanted: str, me: str, cluster: str, name: str) -> list[Route]:
    """This host's other Available blocks of `cluster` in one table (an earlier claim): one block per
    cluster, so these go."""
    return [r for r in routes if r.destination != wanted and owned_in(r, me, cluster, name)
            and r.status == "Available"]


def landed_unmarked(routes: list[Route], destination: str, me: str) -> Route | None:
    """The entry for `destination` if it is a custom route to this instance without vpcnet's marker: a
    create of ours whose marking did not happen, to be marked (adopted)."""
    entry = next((r for r in routes if r.destination == destination), None)
    if entry is not None and entry.kind == "Custom" and entry.next_hop == me and not entry.marked:
        return entry
    return None


# -- which block to claim ---------------------------------------------------------------------------
def start_index(instance: str, cluster: Net, prefix: int) -> int:
    """Where this instance starts looking for a free block: stable for it, spread across instances."""
    blocks = 2 ** (prefix - cluster.prefixlen)
    return int.from_bytes(hashlib.sha256(instance.encode()).digest()[:8], "big") % blocks


def first_free(cluster: Net, prefix: int, taken: list[Net], start: int = 0) -> Net | None:
    """The first block of the cluster, from block number `start` on (wrapping around), not equal to,
    inside or around any taken destination. A taken destination wider than a block is skipped whole, so
    the search looks at no more than len(taken) + 1 blocks per side of the wrap, however many blocks the
    cluster holds (an IPv6 /48 holds 2**32 /80s)."""
    blocks = 2 ** (prefix - cluster.prefixlen)
    size = 2 ** (cluster.max_prefixlen - prefix)
    base = int(cluster.network_address)
    spans = sorted(((int(t.network_address) - base) // size,
                    (int(t.broadcast_address) - base) // size) for t in taken
                   if t.version == cluster.version and t.overlaps(cluster))
    start %= blocks
    for low, high in ((start, blocks - 1), (0, start - 1)):
        index = low
        for first, last in spans:
            if index > high:
                break
            if last < index:
                continue
            if first > index:
                break
            index = last + 1
        if index <= high:
            return ipaddress.ip_network((base + index * size, prefix))
    return None


def taken(cluster: Net, listings: Listings) -> list[Net]:
    """Destinations of any table that make a block of `cluster` unavailable. Entries inside the cluster
    CIDR block what they overlap; wider ones (a default route, a VPN route covering the whole cluster)
    do not, since a host route is more specific than them."""
    return [d for routes in listings.values()
            for d in (same_family(r.destination, cluster) for r in routes)
            if d is not None and d.overlaps(cluster) and d.prefixlen > cluster.prefixlen]


def reserved_networks(cidrs: Iterable[str]) -> tuple[list[Net], list[str]]:
    """The provider's reserved (vSwitch/subnet) CIDRs as networks of either family, and those ignored (not
    a network). Host bits are tolerated: a reserved range is avoided whatever its spelling."""
    nets: list[Net] = []
    ignored = []
    for cidr in cidrs:
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            ignored.append(cidr)
    return nets, ignored


def next_block(cluster: Net, prefix: int, listings: Listings, reserved: list[Net], start: int,
               refused: Net | None = None) -> Net | None:
    """The block to try to claim: the first free one from `start` given every table's entries, the
    reserved CIDRs and the block just `refused` (a duplicate the listing may not show yet)."""
    avoid = taken(cluster, listings) + reserved + ([refused] if refused is not None else [])
    return first_free(cluster, prefix, avoid, start)


def after_duplicate(candidate: str, first: str, listings: Listings, me: str, cluster: str, name: str,
                    prefix: int) -> tuple[str | None, str]:
    """A create of `candidate` in table `first` met an existing entry; with fresh `listings`, decide:
    (the block to adopt, or None to try the next one; why, for the log). Our own marked route there is
    adopted; so is a marked block of ours found elsewhere meanwhile; a hand-made route to this instance
    never is."""
    entry = next((r for r in listings[first] if r.destination == candidate), None)
    if entry is not None and owned_in(entry, me, cluster, name):
        return candidate, f"block {candidate} already routed to this instance by vpcnet: adopted"
    found = find_mine(cluster, name, listings, me, prefix)
    if found:                       # ours appeared elsewhere meanwhile (another process of ours)
        return found, f"found this host's block {found} meanwhile: adopted"
    if entry is not None and entry.next_hop == me:
        return None, f"block {candidate} has a hand-made route to this instance: not adopted, trying the next block"
    holder = (entry.next_hop if entry else "") or "another host"
    return None, f"block {candidate} was taken by {holder} meanwhile; trying the next one"


def claimed_missing(listings: Listings, me: str, cluster: str, name: str, prefix: int) -> list[Route]:
    """Other hosts' claims that a batch write of this host may copy into the further tables: entries of
    the first (claiming) table that are vpcnet's, of this cluster by name, a block of the host prefix
    inside the cluster CIDR, Available, pointing at another instance, and missing from a further table;
    one Route per (claim, table missing it), with that table set. A block is only ever copied from its
    owner's claim, as the owner wrote it (next hop, name, description): nothing here claims a block."""
    tables = list(listings)
    if len(tables) < 2:
        return []
    net = ipaddress.ip_network(cluster)
    out = []
    for r in listings[tables[0]]:
        if not (r.kind == "Custom" and r.marked and r.cluster == name and r.next_hop and r.next_hop != me
                and r.status == "Available" and inside(r.destination, net)
                and ipaddress.ip_network(r.destination).prefixlen == prefix):
            continue
        for table in tables[1:]:
            if not any(e.destination == r.destination for e in listings[table]):
                out.append(Route(r.destination, r.next_hop, status="", name=r.name, description=r.description,
                                 next_hop_type=r.next_hop_type, table=table))
    return out


def missing_from(listings: Listings, destination: str) -> list[str]:
    """The tables with no entry for `destination`."""
    return [t for t, routes in listings.items() if not any(r.destination == destination for r in routes)]


def entry_problem(wanted: str, me: str, table: str, entry: Route | None) -> tuple[str, str] | None:
    """What is wrong with this host's route `wanted` in `table` (its entry there, or None): (problem,
    kind), or None when it is in place and Available."""
    if entry is None:
        return f"route {wanted} -> {me} not visible in {table} after create", TRANSIENT
    if entry.next_hop != me:
        return (f"route for {wanted} in {table} points at {entry.next_hop or entry.next_hop_type or '?'}, "
                f"not this instance {me}: another host or a hand-made route holds this block; vpcnet does "
                "not touch routes it does not own", FATAL)
    if entry.status in ("Pending", "Deleting"):
        return f"route {wanted} -> {me} is {entry.status} in {table}", PENDING
    if entry.status != "Available":
        return f"route {wanted} -> {me} is {entry.status} in {table}", TRANSIENT
    return None


# -- quota ------------------------------------------------------------------------------------------
def family(cidr: str) -> int:
    """4 or 6: the address family of a destination (an unparsable one counts as IPv4)."""
    found = network(cidr)
    return found.version if found is not None else 4


def custom_entries(routes: list[Route], version: int = 0) -> int:
    """Custom entries of a table, every owner's: what its quota counts. With `version` (4 or 6), only that
    family's: for a cloud that counts each family against its own quota (AWS)."""
    return sum(1 for r in routes if r.kind == "Custom" and (not version or family(r.destination) == version))


def quota_full(used: int, quota: int) -> bool:
    """At the quota (0 = unknown: never full)."""
    return bool(quota) and used >= quota


def quota_message(table: str, used: int, quota: int, hint: str = "") -> str:
    hint = hint or "raise the route table quota with your cloud"
    return (f"route table {table} is full: {used}/{quota or '?'} custom entries; vpcnet does not create "
            f"more and does not retry: {hint}")
