"""The `aliyun` provider: this host's route in the route tables of an Alibaba Cloud VPC.

Speaks the VPC OpenAPI 2016-04-28 (RPC style, `vpcnet.cloud.aliyun.rpc`) over one `requests.Session`:
CreateRouteEntry, CreateRouteEntries (a host's route into several tables in one call), DeleteRouteEntry,
DescribeRouteEntryList (NextToken paging), DescribeRouteTableList (to find the VPC's route tables),
DescribeVSwitches (CIDRs a host block must avoid) and ECS DescribeInstances (for `routes gc`).

Route tables: `VPCNET_ALIYUN_ROUTE_TABLE_ID` takes one id or a comma-separated list (every host's route
goes into each, in that order; the first is where blocks are claimed, so give every host the same
list). Without it the tables are discovered once: those the VPC's vSwitches are bound to
(DescribeRouteTableList's `VSwitchIds`), or the VPC's only table. A VPC with several tables none of
which shows a bound vSwitch is ambiguous: vpcnet refuses, naming the candidates and the setting. A
table's quota is `VPCNET_ROUTE_TABLE_QUOTA`, or Alibaba's default of 200 custom entries.

IPv6: an IPv6 host block is an entry like an IPv4 one (DestinationCidrBlock takes both families). Every
custom entry counts against the table's one quota (`Provider.quota_per_family` stays False: Alibaba's
documents name a single 200-entry quota); listings are made without `IpVersion` (the emulator then lists
both families; a real account is still to confirm it, docs/ipv6-plan.md).

Several tables: when this host's route is missing from more than one table (every table but the
claiming one after a claim, or a repair), `create_routes` writes them all with one CreateRouteEntries
call (up to 50 entries, one VPC write). A failure of the whole call (TaskConflict while another host
writes, throttling, a lost answer) is raised and retried by the RouteKeeper with the same ClientToken
and the same entries, so an entry that landed is not created twice (the ClientToken makes the repeated
call idempotent; the emulator keys each entry on the token and its position). A failure of single
entries comes back in `FailedRouteEntries`, per table: each entry is created whole or not at all, so
nothing is half-written and nothing is rolled back; a duplicate means another route holds the block in
that table (reported, never touched), a quota error names the table, the figures and the Quota Center,
a retryable one gets that table its own CreateRouteEntry (a fresh token: the batch's token covers the
whole list). An endpoint without the batch call (InvalidAction) gets one CreateRouteEntry per table from
then on (BatchUnsupported tells the RouteKeeper).

Source/destination check: not checked or changed here (AWS's provider does). Alibaba Cloud's VPC API
(2016-04-28: the route calls above) and ECS API reference (DescribeInstances) expose no ENI or instance
attribute for Alibaba's ENI source/destination check, and no ECS action and parameter for it could be
confirmed, so vpcnet makes no guessed call; docs/deploy-aliyun.md tells the operator to turn it off.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import requests

from vpcnet.cloud import BatchUnsupported, DuplicateRoute, Provider, QuotaExceeded, Route, table_list
from vpcnet.cloud.aliyun.credentials import Credentials
from vpcnet.cloud.aliyun.metadata import Identity, Metadata
from vpcnet.cloud.aliyun.rpc import GONE_CODES, UNSUPPORTED_CODES, RpcClient, classify, coded_error, short_message
from vpcnet.errors import Fatal, Retryable, VpcnetError

log = logging.getLogger(__name__)

VPC_API_VERSION = "2016-04-28"
ECS_API_VERSION = "2014-05-26"
PAGE_SIZE = 100                     # DescribeRouteEntryList's MaxResult ceiling
MAX_PAGES = 50                      # 5000 entries: far above any route table quota
VSWITCH_CACHE_SECONDS = 300.0
DEFAULT_QUOTA = 200                 # custom entries per route table unless raised with Alibaba Cloud
MAX_BATCH = 50                      # entries one CreateRouteEntries call takes
QUOTA_HINT = ("raise the quota of custom route entries per route table in the Alibaba Cloud Quota Center "
              "(https://quotas.console.aliyun.com/, product VPC, \"custom route entries per route table\"), then "
              "set VPCNET_ROUTE_TABLE_QUOTA to the new figure; or remove unused entries (`vpcnet routes gc`)")


def _ecs_endpoint(vpc_endpoint: str) -> str:
    """ECS's endpoint next to a VPC endpoint: vpc.<region>.aliyuncs.com -> ecs.<region>.aliyuncs.com.

    Any other host (a private gateway, the emulator) is assumed to serve both APIs.
    """
    parts = urlsplit(vpc_endpoint)
    host = parts.hostname or ""
    if host.startswith(("vpc.", "vpc-")):
        netloc = parts.netloc.replace(host, "ecs" + host[3:], 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return vpc_endpoint


class AliyunProvider(Provider):
    """The route table of one Alibaba Cloud VPC, seen from one ECS instance."""

    name = "aliyun"
    instant = False
    quota_hint = QUOTA_HINT
    batch_create = True      # CreateRouteEntries; turned off for an endpoint that does not know it

    def __init__(self, config, ecs_endpoint: str = ""):
        self._config = config
        self._session = requests.Session()
        self._metadata = Metadata(config.aliyun_metadata_url, self._session)
        self._identity = Identity(config, self._metadata)
        self._credentials = Credentials(config, self._metadata)
        self._ecs_endpoint = ecs_endpoint or getattr(config, "aliyun_ecs_endpoint", "")
        self._values: dict[str, str] = {}     # "tables", once known
        self._lock = threading.RLock()
        self._vpc: RpcClient | None = None
        self._ecs: RpcClient | None = None
        self._vswitches: tuple[float, list[str]] | None = None
        self._no_batch = False

    def __repr__(self) -> str:
        known = ", ".join(f"{k}={v!r}" for k, v in sorted({**self._identity.known(), **self._values}.items()))
        return f"AliyunProvider({known}, credentials={self._credentials.source!r})"

    # -- identity, resolved lazily ----------------------------------------------------------------
    def region(self) -> str:
        return self._identity.region()

    def instance_id(self) -> str:
        return self._identity.instance_id()

    def vpc_id(self) -> str:
        return self._identity.vpc_id()

    def endpoint(self) -> str:
        return self._config.aliyun_endpoint or f"https://vpc.{self.region()}.aliyuncs.com/"

    def _client(self) -> RpcClient:
        with self._lock:
            if self._vpc is None:
                self._vpc = RpcClient(self._session, self.endpoint(), VPC_API_VERSION, self.region(),
                                      self._credentials)
            return self._vpc

    def _route_tables(self) -> list[str]:
        with self._lock:
            if "tables" not in self._values:
                configured = table_list(self._config.aliyun_route_table_id)
                self._values["tables"] = ",".join(configured or self._discover_tables())
            return self._values["tables"].split(",")

    def _route_table(self, table: str = "") -> str:
        return table or self._route_tables()[0]

    def _discover_tables(self) -> list[str]:
        """The tables the VPC's vSwitches are bound to; the VPC's only table; else refuse to guess."""
        vpc = self.vpc_id()
        tables: list[dict] = []
        for page in range(1, 11):
            data = self._client().call("DescribeRouteTableList",
                                       {"VpcId": vpc, "PageSize": "50", "PageNumber": str(page)})
            batch = _items(data, "RouterTableList", "RouterTableListType") or _items(
                data, "RouteTables", "RouteTable")
            tables += batch
            total = int(data.get("TotalCount") or 0)
            if not batch or len(tables) >= total:
                break
        tables = [t for t in tables if t.get("VpcId", vpc) == vpc and t.get("RouteTableId")
                  and t.get("RouterType", "VRouter") == "VRouter"]
        if not tables:
            raise Fatal(f"no route table found for VPC {vpc} in region {self.region()}: check "
                        "VPCNET_ALIYUN_VPC_ID, or set VPCNET_ALIYUN_ROUTE_TABLE_ID")

        def rank(t: dict) -> tuple:
            return (t.get("RouteTableType", "System") != "System", t["RouteTableId"])

        tables.sort(key=rank)
        if len(tables) == 1:
            found = [tables[0]["RouteTableId"]]
        else:
            found = [t["RouteTableId"] for t in tables if _items(t, "VSwitchIds", "VSwitchId")
                     or (isinstance((t.get("VSwitchIds") or {}).get("VSwitchId"), list)
                         and t["VSwitchIds"]["VSwitchId"])]
            if not found:
                names = ", ".join(f"{t['RouteTableId']} ({t.get('RouteTableType', '?')})" for t in tables)
                raise Fatal(f"VPC {vpc} has {len(tables)} route tables ({names}) and none shows a bound "
                            "vSwitch: vpcnet does not guess which ones carry container traffic; set "
                            "VPCNET_ALIYUN_ROUTE_TABLE_ID to the comma-separated list of the tables your "
                            "hosts' vSwitches use")
        log.info("aliyun route tables of VPC %s: %s", vpc, ", ".join(found))
        return found

    def table_id(self) -> str:
        """The first table's id; a description instead when it cannot be found yet (messages only)."""
        try:
            return self._route_table()
        except VpcnetError as exc:
            return f"(route table not yet known: {exc})"

    def table_ids(self) -> list[str]:
        return list(self._route_tables())

    def table_quota(self, table: str = "") -> int:
        return int(getattr(self._config, "route_table_quota", 0) or 0) or DEFAULT_QUOTA

    # -- routes -----------------------------------------------------------------------------------
    def list_routes(self, table: str = "") -> list[Route]:
        table = self._route_table(table)
        routes: list[Route] = []
        token = ""
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            params = {"RouteTableId": table, "MaxResult": str(PAGE_SIZE)}
            if token:
                params["NextToken"] = token
            data = self._client().call("DescribeRouteEntryList", params)
            routes += [_route(e, table) for e in _items(data, "RouteEntrys", "RouteEntry")]
            token = str(data.get("NextToken") or "")
            if not token:
                return routes
            if token in seen:
                raise Retryable(f"DescribeRouteEntryList of {table}: NextToken repeated; listing again later")
            seen.add(token)
        raise Retryable(f"DescribeRouteEntryList of {table}: more than {MAX_PAGES} pages; giving up this pass")

    def create_route(self, destination: str, name: str, description: str, client_token: str,
                     table: str = "") -> None:
        table = self._route_table(table)
        try:
            self._client().call("CreateRouteEntry", {
                "RouteTableId": table, "DestinationCidrBlock": destination, "NextHopType": "Instance",
                "NextHopId": self.instance_id(), "RouteEntryName": name, "Description": description,
                "ClientToken": client_token})
        except QuotaExceeded as exc:
            raise coded_error(QuotaExceeded, f"route table {table} has no room for another custom entry "
                                             f"(quota {self.table_quota(table)} custom entries per table; "
                                             f"{QUOTA_HINT}): {exc}", getattr(exc, "code", "")) from None
        except DuplicateRoute as exc:
            raise coded_error(DuplicateRoute, f"route table {table} already has an entry for {destination}: "
                                              f"{exc}", getattr(exc, "code", "")) from None

    def create_routes(self, destination: str, name: str, description: str, client_token: str,
                      tables: list[str], others: list[Route] | None = None) -> dict[str, VpcnetError | None]:
        """`destination -> this instance` in several tables with CreateRouteEntries (one VPC write for up
        to MAX_BATCH entries). A failure of the whole call (TaskConflict, throttling, a lost answer) is
        raised, so the caller retries the same entries with the same ClientToken (entries that landed are
        not created twice); failures of single entries come back per table, nothing of them retried here.
        Where the endpoint has no batch call: BatchUnsupported (and `batch_create` turns False)."""
        if self._no_batch:
            raise BatchUnsupported(f"{self.endpoint()} has no CreateRouteEntries")
        if len(tables) > MAX_BATCH:
            raise Fatal(f"{len(tables)} route tables: CreateRouteEntries takes at most {MAX_BATCH} entries")
        me = self.instance_id()
        entries = [(table, destination, me, name, description) for table in tables]
        entries += [(r.table, r.destination, r.next_hop, r.name, r.description)
                    for r in (others or [])][:MAX_BATCH - len(entries)]
        params = {"ClientToken": client_token}
        for i, (table, dst, hop, entry_name, entry_description) in enumerate(entries, 1):
            params.update({f"RouteEntries.{i}.RouteTableId": table, f"RouteEntries.{i}.DstCidrBlock": dst,
                           f"RouteEntries.{i}.NextHopType": "Instance",
                           f"RouteEntries.{i}.NextHop": hop, f"RouteEntries.{i}.Name": entry_name,
                           # Alibaba's spelling of this field in CreateRouteEntries
                           f"RouteEntries.{i}.Describption": entry_description})
        try:
            data = self._client().call("CreateRouteEntries", params)
        except Fatal as exc:
            if getattr(exc, "code", "").lower() not in UNSUPPORTED_CODES:
                raise
            log.info("aliyun: the endpoint has no CreateRouteEntries; creating one entry per call")
            self._no_batch = True
            self.batch_create = False
            raise BatchUnsupported(f"{self.endpoint()} has no CreateRouteEntries ({exc})") from None
        failed = data.get("FailedRouteEntries") or []
        if isinstance(failed, dict):         # {"FailedRouteEntry": [...]} in some answers
            failed = next(iter(failed.values()), []) or []
        out: dict[str, VpcnetError | None] = {t: None for t in tables}
        for entry in failed:
            table = str(entry.get("RouteTableId", ""))
            dst = str(entry.get("DstCidrBlock", "") or destination)
            if others and dst != destination:       # another host's copied route: its owner sees it
                log.info("aliyun: copying route %s into %s for its owner failed: %s", dst, table,
                         entry.get("FailedCode", "?"))
                continue
            if table not in out:
                raise Retryable(f"CreateRouteEntries answered a failure for unknown route table {table!r}; "
                                "listing again")
            code = str(entry.get("FailedCode", "") or "UnknownError")
            where = (f"CreateRouteEntries, entry {destination} in {table} ({code}: "
                     f"{short_message(str(entry.get('FailedMessage', '')))})")
            err = classify(code, where)
            if isinstance(err, QuotaExceeded):
                err = coded_error(QuotaExceeded, f"route table {table} has no room for another custom entry "
                                                 f"(quota {self.table_quota(table)} custom entries per table; "
                                                 f"{QUOTA_HINT}): {where}", code)
            elif isinstance(err, DuplicateRoute):
                err = coded_error(DuplicateRoute, f"route table {table} already has an entry for {destination}: "
                                                  f"{where}", code)
            out[table] = err
        return out

    def delete_route(self, route: Route) -> None:
        params = {"RouteTableId": self._route_table(route.table)}
        if route.route_id:
            params["RouteEntryId"] = route.route_id
        else:
            params["DestinationCidrBlock"] = route.destination
            if route.next_hop:
                params["NextHopId"] = route.next_hop
        try:
            self._client().call("DeleteRouteEntry", params)
        except Fatal as exc:
            code = getattr(exc, "code", "").lower()
            if code in GONE_CODES or (code.startswith("invalidrouteentry") and "notfound" in code):
                log.info("route %s -> %s was already gone", route.destination, route.next_hop or "?")
                return
            raise

    # -- the rest of the interface ----------------------------------------------------------------
    def reserved_cidrs(self) -> list[str]:
        """The VPC's vSwitch CIDRs (a route may not overlap them); [] where DescribeVSwitches is missing
        or not permitted. Cached for a few minutes: vSwitches rarely change and claims are rare."""
        with self._lock:
            if self._vswitches and time.monotonic() - self._vswitches[0] < VSWITCH_CACHE_SECONDS:
                return list(self._vswitches[1])
        vpc = self.vpc_id()
        cidrs: list[str] = []
        try:
            for page in range(1, 11):
                data = self._client().call("DescribeVSwitches",
                                           {"VpcId": vpc, "PageSize": "50", "PageNumber": str(page)})
                batch = _items(data, "VSwitches", "VSwitch")
                cidrs += [str(v["CidrBlock"]) for v in batch if v.get("CidrBlock")]
                if not batch or len(cidrs) >= int(data.get("TotalCount") or 0):
                    break
        except Fatal as exc:
            # Optional knowledge: without it a clash shows up as CreateRouteEntry's InvalidCidrBlock.
            if getattr(exc, "code", "").lower() in UNSUPPORTED_CODES or "HTTP 404" in str(exc):
                log.info("endpoint does not support DescribeVSwitches: no vSwitch CIDRs to avoid")
            else:
                log.warning("cannot list the vSwitches of %s (%s): claiming without avoiding their CIDRs",
                            vpc, exc)
            cidrs = []
        with self._lock:
            self._vswitches = (time.monotonic(), cidrs)
        return list(cidrs)

    def instance_exists(self, instance_id: str) -> bool:
        """Whether ECS still knows the instance. True whenever unsure: `routes gc` must never delete
        the route of a live host because an API call failed."""
        try:
            with self._lock:
                if self._ecs is None:
                    self._ecs = RpcClient(self._session, self._ecs_endpoint or _ecs_endpoint(self.endpoint()),
                                          ECS_API_VERSION, self.region(), self._credentials)
            data = self._ecs.call("DescribeInstances", {"InstanceIds": json.dumps([instance_id]),
                                                        "PageSize": "10"})
            instances = data.get("Instances")
            if not isinstance(instances, dict) or not isinstance(instances.get("Instance"), list):
                log.warning("DescribeInstances answered an unexpected shape; assuming %s exists", instance_id)
                return True
            return any(i.get("InstanceId") == instance_id for i in instances["Instance"])
        except VpcnetError as exc:
            log.warning("cannot tell whether instance %s exists (%s); assuming it does", instance_id, exc)
            return True

    def close(self) -> None:
        self._session.close()


def _items(data: dict, outer: str, inner: str) -> list[dict]:
    """`data[outer][inner]` as a list of dicts, tolerating the missing or empty shapes Alibaba uses."""
    box = data.get(outer)
    if isinstance(box, dict):
        box = box.get(inner)
    if isinstance(box, dict):
        box = [box]
    return [x for x in box if isinstance(x, dict)] if isinstance(box, list) else []


def _route(entry: dict, table: str = "") -> Route:
    """One RouteEntry as a Route; `next_hop` is the instance id only for a single Instance next hop."""
    hops = _items(entry, "NextHops", "NextHop")
    if not hops and (entry.get("NextHopId") or entry.get("InstanceId")):
        hops = [{"NextHopId": entry.get("NextHopId") or entry.get("InstanceId"),
                 "NextHopType": entry.get("NextHopType", "Instance")}]
    if len(hops) == 1:
        hop_type = str(hops[0].get("NextHopType") or "")
        next_hop = str(hops[0].get("NextHopId") or "") if hop_type == "Instance" else ""
    else:
        hop_type = "ECMP" if hops else ""
        next_hop = ""
    return Route(destination=str(entry.get("DestinationCidrBlock", "")), next_hop=next_hop,
                 status=str(entry.get("Status") or "Available"), kind=str(entry.get("Type") or "Custom"),
                 name=str(entry.get("RouteEntryName") or ""), description=str(entry.get("Description") or ""),
                 route_id=str(entry.get("RouteEntryId") or ""), next_hop_type=hop_type,
                 table=str(entry.get("RouteTableId") or table))
