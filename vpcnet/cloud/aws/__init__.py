"""The `aws` provider: EC2 route tables, `host CIDR -> this instance` in each, through botocore.

Calls: DescribeRouteTables, CreateRoute (`InstanceId`), DeleteRoute, ReplaceRoute, CreateTags/DeleteTags
on this instance (the marker) and on route tables (older markers, tombstones), DescribeTags,
DescribeInstances, DescribeInstanceAttribute, ModifyInstanceAttribute,
DescribeNetworkInterfaces, ModifyNetworkInterfaceAttribute and DescribeSubnets. The IAM policy of the
instance (or of the keys given) must allow those `ec2:` actions. Every request passes through `_api`
(the one place to count or time API calls).

Route tables: `VPCNET_AWS_ROUTE_TABLE_ID` takes one id or a comma-separated list. Without it the tables
are discovered once: for each subnet of the VPC (or each subnet named in `VPCNET_AWS_SUBNET_IDS`), the
table explicitly associated with it (`association.subnet-id`), else the VPC's main table; sorted by id,
so every host derives the same list. A subnet that is neither (no association and no main table) is
refused, naming the candidates and the settings. The quota per table is `VPCNET_ROUTE_TABLE_QUOTA`, or
AWS's default of 50 routes (Service Quotas code L-93826ACB, raisable to 1,000).

Source/destination check: `check_forwarding` reads the instance's SourceDestCheck (and that of its
secondary ENIs) and, unless `VPCNET_AWS_DISABLE_SOURCE_DEST_CHECK=false`, turns it off
(ModifyInstanceAttribute / ModifyNetworkInterfaceAttribute, as flannel's aws-vpc backend did); when that
is not allowed it says exactly what to run.
Requests are signed by botocore (never by hand); credentials come from botocore's normal chain
(environment, shared config/credentials files, container role, instance profile).

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

Uncertain creates: if the tag cannot be written after a create for a reason retrying cannot fix, the
fresh route is deleted again rather than left behind unowned; if tagging keeps failing retryably, the
RouteKeeper has recorded the create as uncertain in its state dir and tags (adopts) the route on a later
pass (`mark_route`).

Retries belong to `vpcnet.routes.RouteKeeper` (bounded exponential backoff with jitter), so botocore's
own retries are switched off (`total_max_attempts=1`): one provider call = one HTTP request, and a
throttled or failed call comes back at once as `Retryable`. CreateRoute has no ClientToken; the keeper's
token is used instead to recognise "our own earlier attempt landed but its answer was lost": when a
create that ended in a retryable failure is retried with the same token and EC2 says
RouteAlreadyExists for a route that points at this instance, the create is completed (tagged) instead of
reported as a duplicate.

Identity: `VPCNET_AWS_INSTANCE_ID` / `VPCNET_AWS_REGION` / `VPCNET_AWS_ROUTE_TABLE_ID` win; what is missing
comes from IMDSv2 at `VPCNET_AWS_METADATA_URL` (token PUT, then GETs; 2 s timeouts, no proxy). The route
table, when not configured, is the one associated with this instance's subnet, else the VPC's main table.
botocore's own metadata lookups (instance-profile credentials) are pointed at the same URL through the
session's `ec2_metadata_service_endpoint` variable (this session only, not the process environment), and
when credentials are present in the environment the instance-profile provider is removed from this
session's chain, so botocore never touches a metadata service at all.

Secrets: no secret key or session token is ever formatted into a message; messages are also scrubbed of
the session's secret values as a second line of defence, and botocore's DEBUG logging (which prints
request headers, including `X-Amz-Security-Token`) is capped at INFO unless the operator configured the
`botocore` logger explicitly.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request

import botocore.config
import botocore.exceptions
import botocore.session

from vpcnet.cloud import (
    ROUTE_MARKER,
    DuplicateRoute,
    Provider,
    QuotaExceeded,
    Route,
    route_description,
    route_name,
    table_list,
)
from vpcnet.errors import Busy, Fatal, Retryable, VpcnetError
from vpcnet.observability import events

log = logging.getLogger(__name__)

TAG_PREFIX = f"{ROUTE_MARKER}:route:"     # marker tag key prefix (instance or table): vpcnet:route:<destination>
MARKER_FILE = "aws-route-markers.json"   # routes last seen marked through their instance (for tombstones)
TAG_FILTER_VALUES = 200                  # most values one EC2 filter takes
DEFAULT_ROUTE_LIMIT = 50                  # routes per route table, AWS default quota
IMDS_TIMEOUT = 2.0
IMDS_TOKEN_TTL = 21600
MAX_PAGES = 100                           # bound on any paged listing

# Error codes worth retrying (besides any HTTP 5xx). ConcurrentTagAccess: two hosts tagging the same
# route table at the same moment.
RETRYABLE_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "SlowDown", "InternalError",
    "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout", "RequestTimeoutException",
    "ConcurrentTagAccess", "PriorRequestNotComplete",
})
# Of those, the ones meaning "not now" (throttled, or another change in progress): retried until a
# deadline that covers a boot storm.
BUSY_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "SlowDown", "ConcurrentTagAccess",
    "PriorRequestNotComplete",
})
QUOTA_CODE = "L-93826ACB"               # Service Quotas: Amazon VPC "Routes per route table"
QUOTA_HINT = (f"raise \"Routes per route table\" (Service Quotas code {QUOTA_CODE}, up to 1,000): `aws "
              f"service-quotas request-service-quota-increase --service-code vpc --quota-code {QUOTA_CODE} "
              "--desired-value N`, then set VPCNET_ROUTE_TABLE_QUOTA=N; or remove unused routes "
              "(`vpcnet routes gc`)")

_CONNECTION_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,      # ReadTimeoutError, ConnectionClosedError, ...
)
_CREDENTIAL_ERRORS = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
)

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

_HOP_LIMIT_HINT = (
    "set VPCNET_AWS_INSTANCE_ID and VPCNET_AWS_REGION (and VPCNET_AWS_ROUTE_TABLE_ID), or make IMDSv2 "
    "reachable: from inside a managed Docker plugin the metadata token's hop limit must be at least 2 "
    "(aws ec2 modify-instance-metadata-options --instance-id <id> --http-endpoint enabled "
    "--http-put-response-hop-limit 2)")


def _cap_botocore_debug() -> None:
    """botocore's DEBUG records print request headers (the session token among them): keep them out."""
    logger = logging.getLogger("botocore")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def tag_key(destination: str) -> str:
    return TAG_PREFIX + destination


def _cluster_of(description: str) -> str:
    """The cluster identity a route description names ("" when none)."""
    return Route(destination="", next_hop="", name=ROUTE_MARKER, description=description).cluster


def _marker_value(description: str) -> str:
    """The instance tag's value: ` cluster=<name>` when the description names one."""
    cluster = _cluster_of(description)
    return f"cluster={cluster}" if cluster else ""


def _tag_value(instance: str, description: str) -> str:
    """A table tag's value (older marker): the instance, then ` cluster=<name>`."""
    cluster = _cluster_of(description)
    return f"{instance} cluster={cluster}" if cluster else instance


def _tag_owner(value: str) -> tuple[str, str, str]:
    """(instance, cluster, eni) from a table tag value ("" for what it does not hold)."""
    parts = value.split()
    instance = parts[0] if parts and "=" not in parts[0] else ""

    def field(name: str) -> str:
        return next((p[len(name) + 1:] for p in parts if p.startswith(name + "=")), "")

    return instance, field("cluster"), field("eni")


def _hops(r: dict) -> set[str]:
    """The instance and ENI a described route points at (either may be missing)."""
    return {h for h in (r.get("InstanceId"), r.get("NetworkInterfaceId")) if h}


def _tags(described: dict) -> dict[str, str]:
    return {t.get("Key", ""): t.get("Value", "") for t in described.get("Tags", []) or []}


class _ApiError(Exception):
    """An EC2 error answer, before it is mapped to vpcnet's error family."""

    def __init__(self, what: str, code: str, message: str, status: int):
        super().__init__(f"{what}: {code}: {message}")
        self.what, self.code, self.message, self.status = what, code, message, status

    def mapped(self) -> VpcnetError:
        text = f"{self.what}: EC2 answered {self.code or 'HTTP ' + str(self.status)}: {self.message}"
        if self.code in BUSY_CODES or self.status == 429:
            return Busy(text)
        if self.code in RETRYABLE_CODES or self.status >= 500:
            return Retryable(text)
        return Fatal(text)


class _ImdsMissing(Fatal):
    """IMDS answered, but not this path (HTTP 404)."""


class _Imds:
    """IMDSv2 client: a session token (PUT), then GETs carrying it. Never through a proxy."""

    def __init__(self, url: str):
        self.url = (url or "http://169.254.169.254").rstrip("/")
        self._token = ""
        self._token_expires = 0.0
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._lock = threading.Lock()

    def _fail(self, what: str, reason: object) -> Fatal:
        return Fatal(f"EC2 instance metadata service (IMDSv2) at {self.url} did not answer {what} "
                     f"({reason}); {_HOP_LIMIT_HINT}")

    def _open(self, request: urllib.request.Request, what: str) -> str:
        if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            raise Fatal(f"cannot read {what}: the instance metadata service is disabled "
                        "(AWS_EC2_METADATA_DISABLED=true); set VPCNET_AWS_INSTANCE_ID and VPCNET_AWS_REGION")
        try:
            with self._opener.open(request, timeout=IMDS_TIMEOUT) as resp:
                return resp.read(65536).decode("utf-8", "replace").strip()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise _ImdsMissing(f"EC2 instance metadata at {self.url} has no {what} (HTTP 404)") from None
            raise self._fail(what, f"HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise self._fail(what, f"{type(reason).__name__}: {reason}" if str(reason) else
                             type(reason).__name__) from None

    def token(self) -> str:
        with self._lock:
            if not self._token or time.monotonic() >= self._token_expires:
                req = urllib.request.Request(
                    self.url + "/latest/api/token", method="PUT", data=b"",
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)})
                self._token = self._open(req, "the token request (PUT /latest/api/token)")
                if not self._token:
                    raise self._fail("the token request", "empty token")
                self._token_expires = time.monotonic() + IMDS_TOKEN_TTL - 60
            return self._token

    def get(self, path: str) -> str:
        req = urllib.request.Request(self.url + path, headers={"X-aws-ec2-metadata-token": self.token()})
        return self._open(req, f"GET {path}")


class AwsProvider(Provider):
    name = "aws"
    instant = False
    checks_forwarding = True
    quota_hint = QUOTA_HINT

    def __init__(self, config, session: botocore.session.Session | None = None):
        self.config = config
        self._given_session = session
        self._imds = _Imds(config.aws_metadata_url)
        self._instance = config.aws_instance_id
        self._region = config.aws_region
        self._tables = table_list(config.aws_route_table_id)
        self._vpc_id = ""
        self._session: botocore.session.Session | None = None
        self._client = None
        self._lock = threading.RLock()
        # (client_token, destination) of creates whose outcome is unknown (retryable failure, or the
        # route landed but tagging failed): a retry with the same token may finish them.
        self._uncertain: set[tuple[str, str, str]] = set()   # (client token, destination, table)
        self._disabled_checks: set[str] = set()   # instance/ENI ids whose check vpcnet turned off
        self._seen_markers: dict[str, dict[str, list[str]]] | None = None   # see _tombstones
        _cap_botocore_debug()

    # -- identity ---------------------------------------------------------------------------------
    def instance_id(self) -> str:
        with self._lock:
            if not self._instance:
                self._instance = self._imds.get("/latest/meta-data/instance-id")
            return self._instance

    def region(self) -> str:
        with self._lock:
            if not self._region:
                try:
                    self._region = self._imds.get("/latest/meta-data/placement/region")
                except _ImdsMissing:
                    doc = self._imds.get("/latest/dynamic/instance-identity/document")
                    try:
                        self._region = str(json.loads(doc)["region"])
                    except (ValueError, KeyError, TypeError):
                        raise Fatal(f"EC2 instance identity document at {self._imds.url} has no region; "
                                    "set VPCNET_AWS_REGION") from None
            return self._region

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

    # -- botocore ---------------------------------------------------------------------------------
    def _make_session(self) -> botocore.session.Session:
        session = self._given_session or botocore.session.get_session()
        # botocore's own IMDS lookups (instance-profile credentials) go to the configured URL, for this
        # session only; no process-wide environment change.
        session.set_config_variable("ec2_metadata_service_endpoint", self._imds.url + "/")
        session.set_config_variable("metadata_service_timeout", IMDS_TIMEOUT)
        session.set_config_variable("metadata_service_num_attempts", 1)
        # "auto" defaults mode would ask IMDS for the region: fixed defaults instead.
        session.set_config_variable("defaults_mode", "legacy")
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            # Keys in the environment: the chain stops there anyway; removing the instance-profile
            # provider makes sure this session never contacts a metadata service.
            try:
                session.get_component("credential_provider").remove("iam-role")
            except Exception:  # noqa: BLE001 - best effort, the env provider comes first regardless
                pass
        return session

    def _ec2(self):
        with self._lock:
            if self._client is None:
                region = self.region()
                self._session = self._make_session()
                self._client = self._session.create_client(
                    "ec2", region_name=region, endpoint_url=self.config.aws_endpoint_url or None,
                    config=botocore.config.Config(
                        connect_timeout=3, read_timeout=10,
                        # botocore's retries are OFF (one attempt per call): the RouteKeeper retries
                        # Retryable answers with its own bounded backoff and jitter.
                        retries={"total_max_attempts": 1, "mode": "standard"}))
                events.instrument_botocore(self._client, "aws")
            return self._client

    def _secrets(self) -> list[str]:
        creds = None
        try:
            creds = self._session._credentials if self._session else None  # resolved by create_client
        except AttributeError:
            pass
        if creds is None:
            return []
        values = []
        for attr in ("_secret_key", "secret_key", "_token", "token"):
            value = vars(creds).get(attr)
            if isinstance(value, str) and len(value) >= 8:
                values.append(value)
        return values

    def _scrub(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text

    def _api(self, what: str, op: str, **params):
        """One EC2 call; EC2 error answers raise `_ApiError`, everything else vpcnet's errors."""
        client = self._ec2()
        try:
            return getattr(client, op)(**params)
        except botocore.exceptions.ClientError as exc:
            err = exc.response.get("Error", {}) or {}
            status = int((exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
            raise _ApiError(what, str(err.get("Code", "")), self._scrub(str(err.get("Message", ""))),
                            status) from None
        except _CREDENTIAL_ERRORS as exc:
            raise Fatal(f"{what}: no usable AWS credentials ({self._scrub(str(exc))}): give the instance "
                        "an instance profile, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
        except _CONNECTION_ERRORS as exc:
            raise Retryable(f"{what}: EC2 API unreachable: {self._scrub(str(exc))}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise Fatal(f"{what}: {type(exc).__name__}: {self._scrub(str(exc))}") from None

    def _call(self, what: str, op: str, **params):
        try:
            return self._api(what, op, **params)
        except _ApiError as exc:
            raise exc.mapped() from None

    def _describe_table(self, table: str = "") -> dict:
        table = table or self.table_id()
        try:
            tables = self._api(f"describe route table {table}", "describe_route_tables",
                               RouteTableIds=[table])["RouteTables"]
        except _ApiError as exc:
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
        table_tags = _tags(described)
        markers = self._instance_markers(sorted({r["InstanceId"] for r in raw if r.get("InstanceId")}))
        routes = [self._route(r, table_tags, markers, table) for r in raw]
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
                except _ApiError as exc:
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

    def _route(self, r: dict, table_tags: dict[str, str], markers: dict[str, dict[str, str]],
               table: str) -> Route:
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
        owner, table_cluster, eni = _tag_owner(table_tags.get(key, ""))
        if kind == "Custom" and r.get("InstanceId") and key in markers.get(r["InstanceId"], {}):
            cluster = _tag_owner(markers[r["InstanceId"]][key])[1]
            name, description = route_name(destination), self._description(destination, hop, cluster)
            description += f" (tag {key} on {hop})"
        elif kind == "Custom" and owner and (owner == r.get("InstanceId") or (
                not r.get("InstanceId") and eni and eni == r.get("NetworkInterfaceId"))):
            # The older table-tag marker, or a tombstone: its next hop is the instance it names (a
            # blackhole route of a gone instance may name only the deleted ENI).
            hop, hop_type = owner, "Instance"
            name, description = route_name(destination), self._description(destination, hop, table_cluster)
            description += f" (route table tag {key})"
        return Route(destination=destination, next_hop=hop, status=status, kind=kind, name=name,
                     description=description, route_id="", next_hop_type=hop_type, table=table)

    @staticmethod
    def _description(destination: str, hop: str, cluster: str) -> str:
        return (route_description(destination, hop, cluster) if cluster else
                f"{ROUTE_MARKER}: host CIDR {destination} of {hop}")

    # -- tombstones: the marker of a gone instance's routes, kept on the table until gc --------------
    def _markers_path(self) -> str:
        return os.path.join(getattr(self.config, "state_dir", "") or ".", MARKER_FILE)

    def _seen(self) -> dict[str, dict[str, list[str]]]:
        """{table: {destination: [instance, eni, cluster]}}: routes last seen marked through their instance."""
        if self._seen_markers is None:
            try:
                with open(self._markers_path()) as fh:
                    data = json.load(fh)
                self._seen_markers = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._seen_markers = {}
        return self._seen_markers

    def _tombstones(self, table: str, raw: list[dict], routes: list[Route], by_instance: set[str]) -> list[Route]:
        """Remember the routes marked through their instance; write the tombstone table tag of a route
        that was marked so, is still there unchanged, and whose instance (with its tag) is gone."""
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
            if route.marked or not _hops(r) & {instance, eni}:
                continue                        # marked otherwise, or re-pointed: nothing to keep
            gone = self._gone(instance)
            if gone is None:                    # cannot tell now: remember it for the next listing
                now[destination] = [instance, eni, cluster]
                continue
            if not gone:
                log.warning("aws: the marker tag %s of live instance %s was removed by hand: route %s in %s is "
                            "no longer vpcnet's", tag_key(destination), instance, destination, table)
                continue
            value = " ".join(v for v in (instance, f"eni={eni}" if eni else "",
                                         f"cluster={cluster}" if cluster else "") if v)
            try:
                self._call(f"keep the marker of {destination} (instance {instance} gone) on {table}",
                           "create_tags", Resources=[table], Tags=[{"Key": tag_key(destination), "Value": value}])
            except VpcnetError as exc:
                log.warning("aws: route %s -> %s in %s belongs to a gone instance and its marker cannot be kept on "
                            "the table (%s); `vpcnet routes gc` will not see it: remove it with `aws ec2 "
                            "delete-route --route-table-id %s --destination-cidr-block %s`",
                            destination, instance, table, exc, table, destination)
                now[destination] = [instance, eni, cluster]      # tried again on the next listing
                continue
            log.info("aws: instance %s is gone: kept the marker of its route %s on %s for `vpcnet routes gc`",
                     instance, destination, table)
            marked = self._route(r, {tag_key(destination): value}, {}, table)
            out = [marked if x is route else x for x in out]
        if now != before:
            seen[table] = now
            self._save_seen()
        return out

    def _save_seen(self) -> None:
        path = self._markers_path()
        try:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump(self._seen(), fh)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("aws: cannot write %s: %s", path, exc)

    # -- writes -----------------------------------------------------------------------------------
    def _find(self, destination: str, table: str) -> tuple[dict | None, dict[str, str]]:
        described = self._describe_table(table)
        for r in described.get("Routes", []) or []:
            if destination in (r.get("DestinationCidrBlock"), r.get("DestinationIpv6CidrBlock")):
                return r, _tags(described)
        return None, _tags(described)

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
        except _ApiError as exc:
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
                   Resources=[me], Tags=[{"Key": tag_key(destination), "Value": _marker_value(description)}])

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
            hops = _hops(current)
            owner, _, eni = _tag_owner(tags.get(tag_key(route.destination), ""))
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
            except _ApiError as exc:
                if exc.code != "InvalidRoute.NotFound":
                    raise exc.mapped() from None
        value = tags.get(tag_key(route.destination), "")
        if route.next_hop and value and _tag_owner(value)[0] == route.next_hop:
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
        except _ApiError as exc:
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
        except _ApiError as exc:
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
            except _ApiError as exc:
                if exc.code == "UnauthorizedOperation":
                    log.warning("aws: not allowed to list subnets of %s (ec2:DescribeSubnets); host blocks "
                                "are not checked against subnet CIDRs", self._vpc_id)
                    return []
                raise exc.mapped() from None
            for subnet in resp.get("Subnets", []):
                cidr = subnet.get("CidrBlock")
                if cidr:
                    cidrs.append(str(ipaddress.IPv4Network(cidr, strict=False)))
            token = resp.get("NextToken")
            if not token:
                break
            params["NextToken"] = token
        return sorted(set(cidrs), key=ipaddress.IPv4Network)

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
        except _ApiError as exc:
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
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
