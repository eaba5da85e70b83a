"""How vpcnet tells its routes apart on EC2: marker tags on the route's target instance, the table tags of
older versions, and tombstones for the routes of gone instances.

Ownership marker. EC2 routes carry no name, description or tags, and a route table holds at most 50
tags, so vpcnet marks each route on its *target*: the instance a route `D -> i-x` points at carries the
tag `vpcnet:route:<D>` = `cluster=<name>` (e.g. `vpcnet:route:10.200.3.0/24` = `cluster=10.200.0.0-16`).
A route is vpcnet's exactly when its next-hop instance carries the tag naming its destination, so a
table holds as many vpcnet routes as its route quota allows (L-93826ACB, up to 1,000): each instance
carries one tag per block it owns (one per cluster CIDR; an instance holds 50 tags), whatever the number
of hosts. The same tag marks the host's route in every table (vpcnet puts the same block in each). A
hand-made route to an instance that carries no tag for that destination stays unmarked, and a route
re-pointed by hand (ReplaceRoute) to another instance no longer matches a tag of its target. The tags
are read with one DescribeTags call per 200 next-hop instances of the table (filters `resource-type =
instance`, `key = vpcnet:route:*`, `resource-id`), so a listing is DescribeRouteTables + ceil(n/200)
DescribeTags. The tag is written (CreateTags on this instance) right after a successful CreateRoute and
removed (DeleteTags, conditional on its value) once no listed table routes that destination to the
instance any more.

Table tags (the marker of older vpcnet versions, and tombstones). Routes made by older versions are marked
by a route-table tag `vpcnet:route:<D>` = `<instance>[ cluster=<name>]`; those tags are still read (a
route is vpcnet's when the table tag names its next-hop instance) and removed with their route, so an
existing deployment keeps working without a migration, and its new routes are marked on the instance.
The same table tag is the tombstone that keeps `routes gc` working after an instance is gone: a
terminated instance stays visible (with its tags) for about an hour only, and then its routes (now
`blackhole`, sometimes naming only the deleted ENI) would look foreign forever. So every listing
remembers, in `<state_dir>/aws-route-markers.json`, which routes it saw marked through their instance;
when such a route is still there unchanged but its instance's tag has gone and the instance no longer
exists (DescribeInstances), the provider writes the table tag `vpcnet:route:<D>` = `<instance>
eni=<eni> cluster=<name>` for it. Any live host of the cluster does this on its next pass; `routes gc`
then sees the route as vpcnet's (the next hop is reported as the instance even when the blackhole route
names only the ENI) and deletes it with its tombstone. Tombstones only exist between a host's death and
the next gc, so the 50-tag limit of a table bounds how many dead hosts' routes can wait for gc (past it
the provider logs the `aws ec2 delete-route` to run by hand), not the number of live routes.

This module makes no API call: the provider reads and writes the tags, and hands the answers here.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable

from vpcnet.cloud import ROUTE_MARKER, Route, route_description, route_name
from vpcnet.errors import VpcnetError

log = logging.getLogger(__name__)

TAG_PREFIX = f"{ROUTE_MARKER}:route:"     # marker tag key prefix (instance or table): vpcnet:route:<destination>
MARKER_FILE = "aws-route-markers.json"   # routes last seen marked through their instance (for tombstones)

# Route.next_hop for routes that do not point at an instance or ENI.
_GATEWAY_KEYS = (
    ("GatewayId", "Gateway"), ("NatGatewayId", "NatGateway"), ("TransitGatewayId", "TransitGateway"),
    ("VpcPeeringConnectionId", "VpcPeeringConnection"), ("LocalGatewayId", "LocalGateway"),
    ("EgressOnlyInternetGatewayId", "EgressOnlyInternetGateway"), ("CarrierGatewayId", "CarrierGateway"),
    ("CoreNetworkArn", "CoreNetwork"),
)
_STATUS = {"active": "Available", "blackhole": "Blackhole"}
# Origins of routes that are part of the table itself, not anybody's custom entry.
_SYSTEM_ORIGINS = ("CreateRouteTable", "EnableVgwRoutePropagation")


def tag_key(destination: str) -> str:
    return TAG_PREFIX + destination


def _cluster_of(description: str) -> str:
    """The cluster identity a route description names ("" when none)."""
    return Route(destination="", next_hop="", name=ROUTE_MARKER, description=description).cluster


def marker_value(description: str) -> str:
    """The instance tag's value: ` cluster=<name>` when the description names one."""
    cluster = _cluster_of(description)
    return f"cluster={cluster}" if cluster else ""


def tag_owner(value: str) -> tuple[str, str, str]:
    """(instance, cluster, eni) from a table tag value ("" for what it does not hold)."""
    parts = value.split()
    instance = parts[0] if parts and "=" not in parts[0] else ""

    def field(name: str) -> str:
        return next((p[len(name) + 1:] for p in parts if p.startswith(name + "=")), "")

    return instance, field("cluster"), field("eni")


def route_hops(r: dict) -> set[str]:
    """The instance and ENI a described route points at (either may be missing)."""
    return {h for h in (r.get("InstanceId"), r.get("NetworkInterfaceId")) if h}


def tags_of(described: dict) -> dict[str, str]:
    return {t.get("Key", ""): t.get("Value", "") for t in described.get("Tags", []) or []}


def to_route(r: dict, table_tags: dict[str, str], markers: dict[str, dict[str, str]], table: str) -> Route:
    """A described EC2 route as a Route: named and described as vpcnet's when its target instance carries
    the marker for its destination, or a table tag (older marker, tombstone) names its next hop."""
    destination = (r.get("DestinationCidrBlock") or r.get("DestinationIpv6CidrBlock")
                   or r.get("DestinationPrefixListId") or "")
    if r.get("InstanceId"):
        hop, hop_type = r["InstanceId"], "Instance"
    elif r.get("NetworkInterfaceId"):
        hop, hop_type = r["NetworkInterfaceId"], "NetworkInterface"
    else:
        hop, hop_type = "", ""
        for key, kind in _GATEWAY_KEYS:
            if r.get(key):
                hop, hop_type = r[key], kind
                break
    state = r.get("State", "")
    status = _STATUS.get(state, state.capitalize() if state else "Available")
    kind = "System" if r.get("Origin") in _SYSTEM_ORIGINS else "Custom"
    name = description = ""
    key = tag_key(destination)
    owner, table_cluster, eni = tag_owner(table_tags.get(key, ""))
    if kind == "Custom" and r.get("InstanceId") and key in markers.get(r["InstanceId"], {}):
        cluster = tag_owner(markers[r["InstanceId"]][key])[1]
        name, description = route_name(destination), _description(destination, hop, cluster)
        description += f" (tag {key} on {hop})"
    elif kind == "Custom" and owner and (owner == r.get("InstanceId") or (
            not r.get("InstanceId") and eni and eni == r.get("NetworkInterfaceId"))):
        # The older table-tag marker, or a tombstone: its next hop is the instance it names (a
        # blackhole route of a gone instance may name only the deleted ENI).
        hop, hop_type = owner, "Instance"
        name, description = route_name(destination), _description(destination, hop, table_cluster)
        description += f" (route table tag {key})"
    return Route(destination=destination, next_hop=hop, status=status, kind=kind, name=name,
                 description=description, route_id="", next_hop_type=hop_type, table=table)


def _description(destination: str, hop: str, cluster: str) -> str:
    return (route_description(destination, hop, cluster) if cluster else
            f"{ROUTE_MARKER}: host CIDR {destination} of {hop}")


class Tombstones:
    """Routes last seen marked through their instance (`<state_dir>/aws-route-markers.json`), and the
    tombstone table tag of such a route once its instance (with its tag) is gone."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir or ".", MARKER_FILE)
        self._seen_markers: dict[str, dict[str, list[str]]] | None = None

    def _seen(self) -> dict[str, dict[str, list[str]]]:
        """{table: {destination: [instance, eni, cluster]}}: routes last seen marked through their instance."""
        if self._seen_markers is None:
            try:
                with open(self.path) as fh:
                    data = json.load(fh)
                self._seen_markers = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._seen_markers = {}
        return self._seen_markers

    def update(self, table: str, raw: list[dict], routes: list[Route], by_instance: set[str],
               gone: Callable[[str], bool | None], keep: Callable[[str, str, str, str], None]) -> list[Route]:
        """Remember the routes of a listing marked through their instance (`by_instance`); for a route that
        was marked so, is still there unchanged, and whose instance (with its tag) is `gone`, `keep`
        (table, destination, instance, tag value) writes the tombstone, and the route is listed as vpcnet's."""
        seen = self._seen()
        before = seen.get(table, {})
        by_dest = {route.destination: (r, route) for r, route in zip(raw, routes, strict=True)}
        now = {route.destination: [route.next_hop, r.get("NetworkInterfaceId", ""), route.cluster]
               for r, route in zip(raw, routes, strict=True) if route.destination in by_instance}
        out = list(routes)
        for destination, (instance, eni, cluster) in before.items():
            if destination in now or destination not in by_dest:
                continue
            r, route = by_dest[destination]
            if route.marked or not route_hops(r) & {instance, eni}:
                continue                        # marked otherwise, or re-pointed: nothing to keep
            is_gone = gone(instance)
            if is_gone is None:                 # cannot tell now: remember it for the next listing
                now[destination] = [instance, eni, cluster]
                continue
            if not is_gone:
                log.warning("aws: the marker tag %s of live instance %s was removed by hand: route %s in %s is "
                            "no longer vpcnet's", tag_key(destination), instance, destination, table)
                continue
            value = " ".join(v for v in (instance, f"eni={eni}" if eni else "",
                                         f"cluster={cluster}" if cluster else "") if v)
            try:
                keep(table, destination, instance, value)
            except VpcnetError as exc:
                log.warning("aws: route %s -> %s in %s belongs to a gone instance and its marker cannot be kept on "
                            "the table (%s); `vpcnet routes gc` will not see it: remove it with `aws ec2 "
                            "delete-route --route-table-id %s --destination-cidr-block %s`",
                            destination, instance, table, exc, table, destination)
                now[destination] = [instance, eni, cluster]      # tried again on the next listing
                continue
            log.info("aws: instance %s is gone: kept the marker of its route %s on %s for `vpcnet routes gc`",
                     instance, destination, table)
            marked = to_route(r, {tag_key(destination): value}, {}, table)
            out = [marked if x is route else x for x in out]
        if now != before:
            seen[table] = now
            self._save()
        return out

    def _save(self) -> None:
        path = self.path
        try:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump(self._seen(), fh)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("aws: cannot write %s: %s", path, exc)
