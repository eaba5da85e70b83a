"""The route-entry actions of the API: Create/DeleteRouteEntry, their batch forms, DescribeRouteEntryList.

Here are the checks a real VPC makes on a write: a known instance as next hop, no duplicate destination,
no overlap with a System entry, the table's quota, ClientToken idempotency, and the VPC-wide write lock.
Like the real VPC, route-table writes are serialised per VPC, not per table: while any entry of any
table of the VPC is Pending or Deleting, or less than `write_interval` seconds after the VPC's last
accepted write, every create or delete in that VPC answers `TaskConflict`. The batch calls
(CreateRouteEntries / DeleteRouteEntries, at most 50 entries each) are one write.
"""
from __future__ import annotations

import ipaddress
import threading
from typing import Callable

from vpcnet_lab.emulator.errors import ApiError, missing
from vpcnet_lab.emulator.instances import Instances
from vpcnet_lab.emulator.tables import RouteTables, normalize_cidr, public

#: Most entries one CreateRouteEntries / DeleteRouteEntries call takes (Alibaba's limit).
MAX_BATCH = 50
MAX_CLIENT_TOKENS = 50_000


class RouteEntries:
    """Creates, deletes and lists entries of `tables` for the API, next hops checked against `instances`.
    Shares `lock` with the rest of the emulator; `changed()` is called with it held after every change."""

    def __init__(self, lock: threading.RLock, changed: Callable[[], None], tables: RouteTables,
                 instances: Instances):
        self._lock = lock
        self._changed = changed
        self._tables = tables
        self._instances = instances
        self.write_interval = 0.0
        self._last_write: dict[str, float] = {}     # vpc id -> time of its last accepted write
        self._conflicts = 0                          # TaskConflicts answered for the write lock
        self.client_tokens: dict[str, dict] = {}    # token -> {"fingerprint": [...], "entry_id": ...}

    def configure(self, *, write_interval: float | None = None) -> None:
        with self._lock:
            if write_interval is not None:
                write_interval = float(write_interval)
                if not 0.0 <= write_interval <= 60.0:
                    raise ValueError("write_interval must be between 0 and 60 seconds")
                self.write_interval = write_interval

    def restore(self, data: dict) -> None:
        """Take the ClientTokens from a state file's contents (a retry after a restart gets the same id)."""
        self.client_tokens = dict(data.get("client_tokens", {}))

    # ------------------------------------------------------------------ the VPC write lock

    def _check_writable(self, vpc_id: str, now: float | None = None) -> None:
        """The VPC-wide write lock: TaskConflict while any table of the VPC is changing, or within
        `write_interval` seconds of the VPC's last accepted write. Caller holds the lock."""
        now = self._tables.clock() if now is None else now
        for tid, table in self._tables.tables.items():
            if table["vpc_id"] != vpc_id:
                continue
            for entry in table["entries"].values():
                if entry["Status"] in ("Pending", "Deleting"):
                    self._conflicts += 1
                    raise ApiError("TaskConflict", f"The VPC {vpc_id} is being changed ({entry['RouteEntryId']}"
                                   f" in route table {tid} is {entry['Status']}); try again later.")
        last = self._last_write.get(vpc_id)
        if last is not None and now - last < self.write_interval:
            self._conflicts += 1
            raise ApiError("TaskConflict", f"The VPC {vpc_id} is processing another route table change; "
                           "try again later.")

    def _wrote(self, vpc_id: str) -> None:
        self._last_write[vpc_id] = self._tables.clock()

    @property
    def conflicts(self) -> int:
        """TaskConflicts answered because of the VPC write lock (injected faults not counted)."""
        with self._lock:
            return self._conflicts

    def _batch_locked(self, entries: list[dict]) -> set[str]:
        """A batch call's checks: 1..MAX_BATCH entries, known tables, their VPCs not busy (one write).
        Returns the VPCs it writes to. Caller holds the lock."""
        if not entries:
            raise ApiError("MissingParameter", "RouteEntries must hold at least one entry.")
        if len(entries) > MAX_BATCH:
            raise ApiError("InvalidParameter.RouteEntries", f"At most {MAX_BATCH} route entries per request "
                           f"({len(entries)} given).")
        self._tables.advance()
        vpcs = {self._tables.table(e.get("RouteTableId", ""))["vpc_id"] for e in entries}
        for vpc in vpcs:
            self._check_writable(vpc)
        return vpcs

    # ------------------------------------------------------------------ create

    def create_route_entry(self, route_table_id: str, destination: str, next_hop_type: str,
                           next_hop_id: str, name: str = "", description: str = "",
                           client_token: str = "") -> str:
        """CreateRouteEntry; returns the RouteEntryId (the same one again for a repeated ClientToken)."""
        with self._lock:
            self._tables.advance()
            return self._create_locked(route_table_id, destination, next_hop_type, next_hop_id, name,
                                       description, client_token, check_writable=True)

    def create_route_entries(self, entries: list[dict], client_token: str = "") -> tuple[list[str], list[dict]]:
        """CreateRouteEntries: up to MAX_BATCH entries ({RouteTableId, DstCidrBlock, NextHopType, NextHop,
        Name, Description}), one write for the VPC write lock. Returns (ids created, failures as
        {DstCidrBlock, NextHop, RouteTableId, FailedCode, FailedMessage})."""
        with self._lock:
            vpcs = self._batch_locked(entries)
            ids, failed = [], []
            for i, e in enumerate(entries):
                token = f"{client_token}#{i}" if client_token else ""
                try:
                    ids.append(self._create_locked(e.get("RouteTableId", ""), e.get("DstCidrBlock", ""),
                                                   e.get("NextHopType") or "Instance", e.get("NextHop", ""),
                                                   e.get("Name", ""), e.get("Description", ""), token,
                                                   check_writable=False))
                except ApiError as exc:
                    failed.append({"DstCidrBlock": e.get("DstCidrBlock", ""), "NextHop": e.get("NextHop", ""),
                                   "RouteTableId": e.get("RouteTableId", ""), "FailedCode": exc.code,
                                   "FailedMessage": exc.message})
            if ids:
                for vpc in vpcs:
                    self._wrote(vpc)
            return ids, failed

    def _create_locked(self, route_table_id: str, destination: str, next_hop_type: str, next_hop_id: str,
                       name: str, description: str, client_token: str, check_writable: bool) -> str:
        table = self._tables.table(route_table_id)
        dest = normalize_cidr(destination)
        if next_hop_type != "Instance":
            raise ApiError("InvalidNextHopType.NotSupported",
                           f"The emulator supports NextHopType=Instance only, not {next_hop_type!r}.")
        if not next_hop_id:
            raise missing("NextHopId")
        if next_hop_id not in self._instances.ips:
            raise ApiError("InvalidInstanceId.NotFound",
                           f"The specified instance {next_hop_id} does not exist.", 404)
        fingerprint = [route_table_id, dest, next_hop_type, next_hop_id, name, description]
        if client_token:
            seen = self.client_tokens.get(client_token)
            if seen is not None:
                if seen["fingerprint"] != fingerprint:
                    raise ApiError("IdempotentParameterMismatch", "The request uses the same "
                                   "ClientToken as a previous, but non-identical request.")
                return seen["entry_id"]
        entries = table["entries"].values()
        for entry in entries:
            if entry["DestinationCidrBlock"] == dest:
                raise ApiError("InvalidCIDRBlock.Duplicate", f"The specified DestinationCidrBlock {dest} "
                               f"already exists in route table {route_table_id}.")
        net = ipaddress.ip_network(dest)
        if net.prefixlen > 0:
            for entry in entries:
                other = ipaddress.ip_network(entry["DestinationCidrBlock"])
                if entry["Type"] == "System" and other.version == net.version and net.overlaps(other):
                    raise ApiError("InvalidCidrBlock", f"The specified DestinationCidrBlock {dest} "
                                   f"overlaps the system route {entry['DestinationCidrBlock']}.")
        custom = sum(1 for e in entries if e["Type"] != "System")
        quota = self._tables.quota_of(table)
        if custom >= quota:
            raise ApiError("QuotaExceeded.RouteEntry", f"The route table {route_table_id} already "
                           f"holds {custom} custom route entries; its quota is {quota}.")
        if check_writable:
            self._check_writable(table["vpc_id"])
        entry = self._tables.insert_pending(route_table_id, dest, next_hop_id, next_hop_type, name, description)
        if client_token:
            self.client_tokens[client_token] = {"fingerprint": fingerprint, "entry_id": entry["RouteEntryId"]}
            while len(self.client_tokens) > MAX_CLIENT_TOKENS:
                del self.client_tokens[next(iter(self.client_tokens))]
        if check_writable:
            self._wrote(table["vpc_id"])
        self._changed()
        return entry["RouteEntryId"]

    # ------------------------------------------------------------------ delete

    def delete_route_entry(self, route_table_id: str = "", entry_id: str = "", destination: str = "",
                           next_hop_id: str = "") -> str:
        """DeleteRouteEntry by RouteEntryId, or by DestinationCidrBlock (+NextHopId). Returns the id."""
        with self._lock:
            self._tables.advance()
            found = self._find_locked(route_table_id, entry_id, destination, next_hop_id)
            vpc = self._tables.tables[found["RouteTableId"]]["vpc_id"]
            self._check_writable(vpc)
            self._tables.start_delete(found)
            self._wrote(vpc)
            return found["RouteEntryId"]

    def delete_route_entries(self, entries: list[dict]) -> tuple[list[str], list[dict]]:
        """DeleteRouteEntries: up to MAX_BATCH entries ({RouteTableId, RouteEntryId} or {RouteTableId,
        DstCidrBlock, NextHop}), one write. Returns (ids deleted, failures)."""
        with self._lock:
            vpcs = self._batch_locked(entries)
            done, failed = [], []
            for e in entries:
                try:
                    found = self._find_locked(e.get("RouteTableId", ""), e.get("RouteEntryId", ""),
                                              e.get("DstCidrBlock", ""), e.get("NextHop", ""))
                    self._tables.start_delete(found)
                    done.append(found["RouteEntryId"])
                except ApiError as exc:
                    failed.append({"RouteEntryId": e.get("RouteEntryId", ""), "DstCidrBlock": e.get("DstCidrBlock", ""),
                                   "RouteTableId": e.get("RouteTableId", ""), "FailedCode": exc.code,
                                   "FailedMessage": exc.message})
            if done:
                for vpc in vpcs:
                    self._wrote(vpc)
            return done, failed

    def _find_locked(self, route_table_id: str, entry_id: str, destination: str, next_hop_id: str) -> dict:
        """The deletable entry a delete call names, or the API's refusal. Caller holds the lock."""
        tables = self._tables.tables
        if route_table_id:
            self._tables.table(route_table_id)
        ids = [route_table_id] if route_table_id else list(tables)
        found = None
        if entry_id:
            for tid in ids:
                found = tables[tid]["entries"].get(entry_id) or found
        elif destination:
            try:
                dest = normalize_cidr(destination)
            except ApiError:
                dest = destination
            for tid in ids:
                for entry in tables[tid]["entries"].values():
                    if entry["DestinationCidrBlock"] != dest:
                        continue
                    if next_hop_id and entry["NextHops"]["NextHop"][0]["NextHopId"] != next_hop_id:
                        continue
                    found = entry
                    break
                if found:
                    break
        else:
            raise ApiError("MissingParameter", "Either RouteEntryId or DestinationCidrBlock must be "
                           "supplied.")
        if found is None:
            raise ApiError("InvalidRouteEntry.NotFound", "The specified route entry "
                           f"{entry_id or destination} does not exist.", 404)
        if found["Type"] == "System":
            raise ApiError("OperationDenied.SystemRouteEntry",
                           f"The route entry {found['RouteEntryId']} is a System entry and cannot be "
                           "deleted.", 403)
        if found["Status"] != "Available":
            raise ApiError("IncorrectRouteEntryStatus", f"The route entry {found['RouteEntryId']} is "
                           f"{found['Status']}; only Available entries can be deleted.")
        return found

    # ------------------------------------------------------------------ list

    def describe_route_entries(self, route_table_id: str, filters: dict[str, str] | None = None,
                               max_result: int = 100, next_token: str = "") -> tuple[list[dict], str]:
        """DescribeRouteEntryList: one page of matching entries and the token of the next ('' at the end)."""
        filters = {k: v for k, v in (filters or {}).items() if v}
        if "DestinationCidrBlock" in filters:
            try:
                filters["DestinationCidrBlock"] = normalize_cidr(filters["DestinationCidrBlock"])
            except ApiError:
                pass
        after = 0
        if next_token:
            try:
                if not next_token.startswith("nt-"):
                    raise ValueError
                after = int(next_token[3:])
            except ValueError:
                raise ApiError("InvalidNextToken", "The specified NextToken is invalid.") from None
        with self._lock:
            self._tables.advance()
            table = self._tables.table(route_table_id)
            matching = []
            for entry in sorted(table["entries"].values(), key=lambda e: e["_seq"]):
                if entry["_seq"] <= after:
                    continue
                hop = entry["NextHops"]["NextHop"][0]
                checks = {
                    "RouteEntryId": entry["RouteEntryId"],
                    "RouteEntryName": entry["RouteEntryName"],
                    "DestinationCidrBlock": entry["DestinationCidrBlock"],
                    "RouteEntryType": entry["Type"],
                    "NextHopId": hop["NextHopId"],
                    "NextHopType": hop["NextHopType"],
                    "IpVersion": entry["IpVersion"],
                }
                if all(checks.get(k, v) == v or (k == "IpVersion" and checks[k] == v.lower())
                       for k, v in filters.items()):
                    matching.append(entry)
                    if len(matching) > max_result:
                        break
            page = matching[:max_result]
            token = f"nt-{page[-1]['_seq']}" if len(matching) > max_result else ""
            return [public(e) for e in page], token
