"""The `aws` provider: EC2 route tables, `host CIDR -> this instance` in each.

Calls: DescribeRouteTables, CreateRoute (`InstanceId`), DeleteRoute, ReplaceRoute, CreateTags/DeleteTags
on this instance (the marker) and on route tables (older markers, tombstones), DescribeTags,
DescribeInstances, DescribeInstanceAttribute, ModifyInstanceAttribute,
DescribeNetworkInterfaces, ModifyNetworkInterfaceAttribute and DescribeSubnets. The IAM policy of the
instance (or of the keys given) must allow those `ec2:` actions. Every request passes through `_api`
(and so through `vpcnet.cloud.aws.client`, where botocore is set up).

Route tables: `VPCNET_AWS_ROUTE_TABLE_ID` takes one id or a comma-separated list. Without it the tables
are discovered once: for each subnet of the VPC (or each subnet named in `VPCNET_AWS_SUBNET_IDS`), the
table explicitly associated with it (`association.subnet-id`), else the VPC's main table; sorted by id,
so every host derives the same list. A subnet that is neither (no association and no main table) is
refused, naming the candidates and the settings. The quota per table is `VPCNET_ROUTE_TABLE_QUOTA`, or
AWS's default of 50 routes (Service Quotas code L-93826ACB, raisable to 1,000).

IPv6: an IPv6 host block is CreateRoute/DeleteRoute/ReplaceRoute with `DestinationIpv6CidrBlock`; AWS counts
IPv6 routes against their own quota (`quota_per_family`); the subnets' IPv6 CIDRs are reserved as their IPv4
ones. A route-table block must lie outside the VPC's /56 (docs/deploy-aws.md, "IPv6 host blocks").

Source/destination check: `check_forwarding` reads the instance's SourceDestCheck (and that of its
secondary ENIs) and, unless `VPCNET_AWS_DISABLE_SOURCE_DEST_CHECK=false`, turns it off
(ModifyInstanceAttribute / ModifyNetworkInterfaceAttribute, as flannel's aws-vpc backend did); when that
is not allowed it says exactly what to run.

Which routes are vpcnet's (marker tags on the target instance, older table tags, tombstones of gone
instances): `vpcnet.cloud.aws.markers`.

Uncertain creates: if the tag cannot be written after a create for a reason retrying cannot fix, the
fresh route is deleted again rather than left behind unowned; if tagging keeps failing retryably, the
RouteKeeper has recorded the create as uncertain in its state dir and tags (adopts) the route on a later
pass (`mark_route`). CreateRoute has no ClientToken; the keeper's token is used instead to recognise "our
own earlier attempt landed but its answer was lost": when a create that ended in a retryable failure is
retried with the same token and EC2 says RouteAlreadyExists for a route that points at this instance,
the create is completed (tagged) instead of reported as a duplicate.
"""
from __future__ import annotations

import ipaddress
import logging
import threading

import botocore.session

from vpcnet.cloud import DuplicateRoute, Provider, QuotaExceeded, Route, table_list
from vpcnet.cloud.aws.client import ApiError, Ec2Client
from vpcnet.cloud.aws.markers import (
    TAG_PREFIX,
    Tombstones,
    marker_value,
    route_hops,
    tag_key,
    tag_owner,
    tags_of,
    to_route,
)
from vpcnet.cloud.aws.metadata import Identity, Imds
from vpcnet.errors import Fatal, Retryable, VpcnetError

log = logging.getLogger(__name__)

TAG_FILTER_VALUES = 200                  # most values one EC2 filter takes
DEFAULT_ROUTE_LIMIT = 50                  # routes per route table, AWS default quota
MAX_PAGES = 100                           # bound on any paged listing
QUOTA_CODE = "L-93826ACB"               # Service Quotas: Amazon VPC "Routes per route table"
QUOTA_HINT = (f"raise \"Routes per route table\" (Service Quotas code {QUOTA_CODE}, up to 1,000): `aws "
              f"service-quotas request-service-quota-increase --service-code vpc --quota-code {QUOTA_CODE} "
              "--desired-value N`, then set VPCNET_ROUTE_TABLE_QUOTA=N; or remove unused routes "
              "(`vpcnet routes gc`)")


class AwsProvider(Provider):
    """The route tables of one VPC, seen from one EC2 instance."""

    name = "aws"
    instant = False
    checks_forwarding = True
    quota_hint = QUOTA_HINT
    quota_per_family = True      # AWS: "routes per route table" is one quota for IPv4 and one for IPv6

    def __init__(self, config, session: botocore.session.Session | None = None):
        self.config = config
        self._imds = Imds(config.aws_metadata_url)
        self._identity = Identity(config, self._imds)
        self._ec2 = Ec2Client(config, self._imds.url, self.region, session)
        self._tombs = Tombstones(getattr(config, "state_dir", ""))
        self._tables = table_list(config.aws_route_table_id)
        self._vpc_id = ""
        self._lock = threading.RLock()
        # (client_token, destination) of creates whose outcome is unknown (retryable failure, or the
        # route landed but tagging failed): a retry with the same token may finish them.
        self._uncertain: set[tuple[str, str, str]] = set()   # (client token, destination, table)
        self._disabled_checks: set[str] = set()   # instance/ENI ids whose check vpcnet turned off

    # -- identity ---------------------------------------------------------------------------------
    def instance_id(self) -> str:
        return self._identity.instance_id()

    def region(self) -> str:
        return self._identity.region()

    def table_id(self) -> str:
        return self.table_ids()[0]

    def table_ids(self) -> list[str]:
        with self._lock:
            if not self._tables:
                self._tables = self._discover_tables()
            return list(self._tables)

    def table_quota(self, table: str = "") -> int:
        return int(getattr(self.config, "route_table_quota", 0) or 0) or DEFAULT_ROUTE_LIMIT

    def _discover_tables(self) -> list[str]:
        """For each subnet of the VPC (or of VPCNET_AWS_SUBNET_IDS): its associated table, else the
        VPC's main table. Sorted, so every host derives the same list."""
        named = table_list(getattr(self.config, "aws_subnet_ids", ""))
        if named:
            subnets_resp = self._call("describe the subnets of VPCNET_AWS_SUBNET_IDS", "describe_subnets",
                                      SubnetIds=named)
            vpcs = {s.get("VpcId", "") for s in subnets_resp.get("Subnets", [])}
            if len(vpcs) != 1:
                raise Fatal(f"VPCNET_AWS_SUBNET_IDS ({', '.join(named)}) must name subnets of one VPC "
                            f"(they are in: {', '.join(sorted(vpcs)) or 'none'})")
            vpc, subnets = vpcs.pop(), named
        else:
            mac = self._imds.get("/latest/meta-data/mac")
            vpc = self._imds.get(f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-id")
            subnets = sorted(s["SubnetId"] for s in self._call(
                f"list the subnets of {vpc}", "describe_subnets",
                Filters=[{"Name": "vpc-id", "Values": [vpc]}]).get("Subnets", []))
        tables = self._call(f"list the route tables of {vpc}", "describe_route_tables",
                            Filters=[{"Name": "vpc-id", "Values": [vpc]}]).get("RouteTables", [])
        main = [t["RouteTableId"] for t in tables
                if any(a.get("Main") for a in t.get("Associations", []) or [])]
        by_subnet = {a["SubnetId"]: t["RouteTableId"] for t in tables
                     for a in t.get("Associations", []) or [] if a.get("SubnetId")}
        found: set[str] = set()
        for subnet in subnets:
            table = by_subnet.get(subnet) or (main[0] if len(main) == 1 else "")
            if not table:
                candidates = ", ".join(sorted(t["RouteTableId"] for t in tables)) or "none"
                raise Fatal(f"subnet {subnet} of {vpc} has no associated route table and the VPC has no "
                            f"single main table (candidates: {candidates}): vpcnet does not guess; set "
                            "VPCNET_AWS_ROUTE_TABLE_ID to the comma-separated list of tables, or "
                            "VPCNET_AWS_SUBNET_IDS to the subnets your hosts use")
            found.add(table)
        if not found:
            raise Fatal(f"no subnet found in {vpc}: set VPCNET_AWS_ROUTE_TABLE_ID or VPCNET_AWS_SUBNET_IDS")
        self._vpc_id = vpc
        result = sorted(found)
        log.info("aws: route tables of %s: %s", vpc, ", ".join(result))
        return result

    # -- EC2 ------------------------------------------------------------------------------------------
    def _api(self, what: str, op: str, **params):
        """One EC2 call (`Ec2Client.api`): EC2 error answers raise `ApiError`, everything else vpcnet's
        errors. Every call of this class goes through here."""
        return self._ec2.api(what, op, **params)

    def _call(self, what: str, op: str, **params):
        try:
            return self._api(what, op, **params)
        except ApiError as exc:
            raise exc.mapped() from None

    def _describe_table(self, table: str = "") -> dict:
        table = table or self.table_id()
        try:
            tables = self._api(f"describe route table {table}", "describe_route_tables",
                               RouteTableIds=[table])["RouteTables"]
        except ApiError as exc:
            if exc.code == "InvalidRouteTableID.NotFound":
                raise Fatal(f"route table {table} does not exist in {self.region()} "
                            "(VPCNET_AWS_ROUTE_TABLE_ID)") from None
            raise exc.mapped() from None
        if not tables:
            raise Fatal(f"route table {table} does not exist in {self.region()} (VPCNET_AWS_ROUTE_TABLE_ID)")
        self._vpc_id = tables[0].get("VpcId", "") or self._vpc_id
        return tables[0]

    # -- routes -----------------------------------------------------------------------------------
    def list_routes(self, table: str = "") -> list[Route]:
        table = table or self.table_id()
        described = self._describe_table(table)
        raw = described.get("Routes", []) or []
        table_tags = tags_of(described)
        markers = self._instance_markers(sorted({r["InstanceId"] for r in raw if r.get("InstanceId")}))
        routes = [to_route(r, table_tags, markers, table) for r in raw]
        by_instance = {route.destination for r, route in zip(raw, routes, strict=True)
                       if route.marked and tag_key(route.destination) in markers.get(r.get("InstanceId", ""), {})}
        return self._tombstones(table, raw, routes, by_instance)

    def _instance_markers(self, instances: list[str]) -> dict[str, dict[str, str]]:
        """{instance: {tag key: value}} of the vpcnet marker tags the instances carry (DescribeTags, one
        call per TAG_FILTER_VALUES instances and page)."""
        found: dict[str, dict[str, str]] = {}
        for i in range(0, len(instances), TAG_FILTER_VALUES):
            params: dict = {"Filters": [{"Name": "resource-type", "Values": ["instance"]},
                                        {"Name": "key", "Values": [TAG_PREFIX + "*"]},
                                        {"Name": "resource-id", "Values": instances[i:i + TAG_FILTER_VALUES]}],
                            "MaxResults": 1000}
            for _ in range(MAX_PAGES):
                try:
                    resp = self._api("read the vpcnet marker tags of the route targets", "describe_tags", **params)
                except ApiError as exc:
                    if exc.code in ("UnauthorizedOperation", "AccessDenied"):
                        raise Fatal(f"not allowed to read instance tags (ec2:DescribeTags): vpcnet marks its routes "
                                    f"with a tag on their target instance and cannot tell them apart without it: "
                                    f"{exc.message}") from None
                    raise exc.mapped() from None
                for tag in resp.get("Tags", []) or []:
                    found.setdefault(tag.get("ResourceId", ""), {})[tag.get("Key", "")] = tag.get("Value", "")
                token = resp.get("NextToken")
                if not token:
                    break
                params["NextToken"] = token
        return found

    def _tombstones(self, table: str, raw: list[dict], routes: list[Route], by_instance: set[str]) -> list[Route]:
        """Remember the routes marked through their instance, and keep the marker of a gone instance's
        route on the table (`markers.Tombstones`)."""
        return self._tombs.update(table, raw, routes, by_instance, self._gone, self._keep_marker)

    def _keep_marker(self, table: str, destination: str, instance: str, value: str) -> None:
        self._call(f"keep the marker of {destination} (instance {instance} gone) on {table}",
                   "create_tags", Resources=[table], Tags=[{"Key": tag_key(destination), "Value": value}])

    # -- writes -----------------------------------------------------------------------------------
    def _find(self, destination: str, table: str) -> tuple[dict | None, dict[str, str]]:
        described = self._describe_table(table)
        for r in described.get("Routes", []) or []:
            if destination in (r.get("DestinationCidrBlock"), r.get("DestinationIpv6CidrBlock")):
                return r, tags_of(described)
        return None, tags_of(described)

    @staticmethod
    def _dest_param(destination: str) -> dict:
        if ":" in destination:
            return {"DestinationIpv6CidrBlock": destination}
        return {"DestinationCidrBlock": destination}

    def create_route(self, destination: str, name: str, description: str, client_token: str,
                     table: str = "") -> None:
        me, table = self.instance_id(), table or self.table_id()
        key = (client_token, destination, table)
        what = f"create route {destination} -> {me} in {table}"
        try:
            self._api(what, "create_route", RouteTableId=table, InstanceId=me, **self._dest_param(destination))
        except ApiError as exc:
            if exc.code == "RouteAlreadyExists":
                existing = self._find(destination, table)[0] if key in self._uncertain else None
                if existing is not None and existing.get("InstanceId") == me:
                    log.info("aws: route %s -> %s from an earlier attempt is in place; tagging it",
                             destination, me)
                    self._tag(destination, me, description, key, table)
                    return
                raise DuplicateRoute(f"route table {table} already has a route for {destination}") from None
            if exc.code == "RouteLimitExceeded":
                raise QuotaExceeded(
                    f"route table {table} holds as many routes as it may (quota {self.table_quota(table)}; "
                    f"{QUOTA_HINT}): {exc.message}") from None
            mapped = exc.mapped()
            if isinstance(mapped, Retryable):
                self._uncertain.add(key)
            raise mapped from None
        except Retryable:
            self._uncertain.add(key)     # timeout or dropped connection: the create may have landed
            raise
        self._tag(destination, me, description, key, table)

    def _mark(self, destination: str, me: str, description: str) -> None:
        """The marker: tag `vpcnet:route:<destination>` on this instance."""
        self._call(f"tag instance {me} for {destination}", "create_tags",
                   Resources=[me], Tags=[{"Key": tag_key(destination), "Value": marker_value(description)}])

    def _tag(self, destination: str, me: str, description: str, key: tuple, table: str) -> None:
        try:
            self._mark(destination, me, description)
        except Retryable:
            self._uncertain.add(key)     # the retry (same token) finds the route and tags it
            raise
        except Fatal as exc:
            # An untagged route would look hand-made and never be released: take it back out.
            self._uncertain.discard(key)
            try:
                self._call(f"delete untagged route {destination}", "delete_route", RouteTableId=table,
                           **self._dest_param(destination))
            except VpcnetError as undo:
                log.warning("aws: could not remove untagged route %s from %s: %s", destination, table, undo)
            raise Fatal(f"route {destination} -> {me} could not be marked as vpcnet's (ec2:CreateTags on "
                        f"instance {me} is needed; an instance holds at most 50 tags): {exc}") from None
        self._uncertain.discard(key)

    def mark_route(self, route: Route, name: str, description: str) -> bool:
        """Tag this instance for an existing route to it (a create whose tagging failed, found again later)."""
        self._mark(route.destination, self.instance_id(), description)
        return True

    def delete_route(self, route: Route) -> None:
        table = route.table or self.table_id()
        current, tags = self._find(route.destination, table)
        if current is not None:
            hops = route_hops(current)
            owner, _, eni = tag_owner(tags.get(tag_key(route.destination), ""))
            if owner and eni in hops:
                hops.add(owner)              # a tombstone's blackhole route naming only the gone ENI
            if route.next_hop and route.next_hop not in hops:
                # Re-pointed since it was listed: it is not the route we were asked to delete.
                log.warning("aws: not deleting %s from %s: it now points at %s, not %s",
                            route.destination, table, ", ".join(sorted(hops)) or "?", route.next_hop)
                return
            try:
                self._api(f"delete route {route.destination} from {table}", "delete_route",
                          RouteTableId=table, **self._dest_param(route.destination))
            except ApiError as exc:
                if exc.code != "InvalidRoute.NotFound":
                    raise exc.mapped() from None
        value = tags.get(tag_key(route.destination), "")
        if route.next_hop and value and tag_owner(value)[0] == route.next_hop:
            # Conditional on the value: a tag another host wrote for this destination since stays.
            self._call(f"untag route table {table} for {route.destination}", "delete_tags",
                       Resources=[table], Tags=[{"Key": tag_key(route.destination), "Value": value}])
        if route.next_hop.startswith("i-"):
            self._unmark(route, table)

    def _unmark(self, route: Route, table: str) -> None:
        """Remove the instance's marker for `route.destination` once no table of this host routes it there
        any more (the same tag marks the route in every table)."""
        for other in self.table_ids():
            if other != table:
                r = self._find(route.destination, other)[0]
                if r is not None and route.next_hop in (r.get("InstanceId"), r.get("NetworkInterfaceId")):
                    return
        value = self._instance_markers([route.next_hop]).get(route.next_hop, {}).get(tag_key(route.destination))
        if value is None:
            return
        try:   # conditional on the value; a gone instance's tags are gone with it
            self._api(f"untag instance {route.next_hop} for {route.destination}", "delete_tags",
                      Resources=[route.next_hop], Tags=[{"Key": tag_key(route.destination), "Value": value}])
        except ApiError as exc:
            if exc.code == "InvalidInstanceID.NotFound":
                return
            if route.next_hop == self.instance_id():
                raise exc.mapped() from None      # this host's own marker: the retry removes it
            # another (gone) host's marker: its route is deleted, which is what gc is for
            log.warning("aws: route %s deleted; the marker tag on %s stays: %s", route.destination,
                        route.next_hop, exc.mapped())

    def replace_route(self, destination: str, description: str = "", table: str = "") -> None:
        """Point an existing route at this instance (ReplaceRoute) and mark it as vpcnet's."""
        me, table = self.instance_id(), table or self.table_id()
        self._call(f"replace route {destination} -> {me} in {table}", "replace_route",
                   RouteTableId=table, InstanceId=me, **self._dest_param(destination))
        self._tag(destination, me, description, ("replace", destination, table), table)

    # -- instances and the VPC --------------------------------------------------------------------
    def instance_exists(self, instance_id: str) -> bool:
        return not instance_id.startswith("i-") or self._gone(instance_id) is not True

    def _gone(self, instance_id: str) -> bool | None:
        """True when the instance is terminated or unknown to EC2, False when it exists, None when EC2
        cannot say now (unreachable, throttled, not allowed)."""
        try:
            resp = self._api(f"describe instance {instance_id}", "describe_instances", InstanceIds=[instance_id])
        except ApiError as exc:
            return True if exc.code == "InvalidInstanceID.NotFound" else None
        except VpcnetError:
            return None
        states = [i.get("State", {}).get("Name", "") for r in resp.get("Reservations", [])
                  for i in r.get("Instances", []) if i.get("InstanceId") == instance_id]
        return bool(states) and all(s == "terminated" for s in states)

    def reserved_cidrs(self) -> list[str]:
        """The VPC's subnet CIDRs (a host block must not overlap them)."""
        if not self._vpc_id:
            self._describe_table()
        if not self._vpc_id:
            return []
        cidrs: list[str] = []
        params: dict = {"Filters": [{"Name": "vpc-id", "Values": [self._vpc_id]}]}
        for _ in range(MAX_PAGES):
            try:
                resp = self._api(f"describe subnets of {self._vpc_id}", "describe_subnets", **params)
            except ApiError as exc:
                if exc.code == "UnauthorizedOperation":
                    log.warning("aws: not allowed to list subnets of %s (ec2:DescribeSubnets); host blocks "
                                "are not checked against subnet CIDRs", self._vpc_id)
                    return []
                raise exc.mapped() from None
            for subnet in resp.get("Subnets", []):
                cidr = subnet.get("CidrBlock")
                if cidr:
                    cidrs.append(str(ipaddress.IPv4Network(cidr, strict=False)))
                for assoc in subnet.get("Ipv6CidrBlockAssociationSet", []) or []:
                    cidr6 = assoc.get("Ipv6CidrBlock")
                    if cidr6 and (assoc.get("Ipv6CidrBlockState") or {}).get("State", "associated") == "associated":
                        cidrs.append(str(ipaddress.IPv6Network(cidr6, strict=False)))
            token = resp.get("NextToken")
            if not token:
                break
            params["NextToken"] = token
        return sorted(set(cidrs), key=lambda c: (":" in c, ipaddress.ip_network(c)))

    def check_forwarding(self, disable: bool) -> list[str]:
        """SourceDestCheck of this instance and its secondary ENIs: turned off when `disable` (and
        allowed), else reported with the command that turns it off."""
        problems: list[str] = []
        me = self.instance_id()
        attr = self._call(f"check source/destination check of {me}", "describe_instance_attribute",
                          InstanceId=me, Attribute="sourceDestCheck")
        if (attr.get("SourceDestCheck") or {}).get("Value"):
            problems += self._turn_off(
                me, disable, f"aws ec2 modify-instance-attribute --instance-id {me} --no-source-dest-check",
                "ModifyInstanceAttribute", "modify_instance_attribute", InstanceId=me,
                SourceDestCheck={"Value": False})
        # The instance attribute is its primary ENI's; other ENIs have their own, and container traffic
        # leaving through one of them is dropped too.
        enis = self._call(f"list network interfaces of {me}", "describe_network_interfaces",
                          Filters=[{"Name": "attachment.instance-id", "Values": [me]}])
        for eni in enis.get("NetworkInterfaces", []):
            index = (eni.get("Attachment") or {}).get("DeviceIndex", 0)
            if index != 0 and eni.get("SourceDestCheck"):
                eni_id = eni.get("NetworkInterfaceId", "?")
                problems += self._turn_off(
                    eni_id, disable, f"aws ec2 modify-network-interface-attribute --network-interface-id "
                    f"{eni_id} --no-source-dest-check", "ModifyNetworkInterfaceAttribute",
                    "modify_network_interface_attribute", NetworkInterfaceId=eni_id,
                    SourceDestCheck={"Value": False})
        return problems

    def _turn_off(self, what: str, disable: bool, command: str, action: str, op: str, **params) -> list[str]:
        on = (f"source/destination check is enabled on {what}: the VPC drops routed container traffic "
              f"to and from this host")
        if not disable:
            return [f"{on}; turn it off with `{command}` (VPCNET_AWS_DISABLE_SOURCE_DEST_CHECK=false keeps "
                    "vpcnet from doing it)"]
        try:
            self._api(f"turn off source/destination check of {what}", op, **params)
        except ApiError as exc:
            if exc.code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
                return [f"{on}, and this host may not turn it off (ec2:{action} is not allowed): run "
                        f"`{command}`, or grant ec2:{action} to the instance's role"]
            raise exc.mapped() from None
        if what in self._disabled_checks:
            log.warning("aws: source/destination check of %s was turned on again; turned it off again", what)
        else:
            log.info("aws: turned off the source/destination check of %s", what)
        self._disabled_checks.add(what)
        return []

    def close(self) -> None:
        self._ec2.close()
