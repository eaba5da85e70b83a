"""Route tables as data: their entries, the vSwitches bound to them, each entry's timed status, quotas.

Entries move `Pending -> Available` after `pending_delay` seconds (or, with `pending_delay_max` above
it, after a delay drawn per entry from uniform(pending_delay, pending_delay_max) by a seeded generator:
real Alibaba entries stay Pending for a varying few seconds) and `Deleting -> gone` after
`deleting_delay`; `advance()` applies what is due (the emulator calls it on every access and from a
ticker thread). Time is read from `clock` (default `time.time`; a storm on a fake clock passes its own).
Each table has its own custom-entry quota (default: the emulator-wide `quota`), and a vSwitch is bound
to exactly one table (DescribeRouteTableList shows each table's `VSwitchIds`).

The API's checks on writes (the VPC write lock, ClientTokens, duplicates) are in `entries.py`; here is
what the console could do by hand, and what the Describe calls for tables and vSwitches show.
"""
from __future__ import annotations

import ipaddress
import random
import threading
import time
from typing import Callable

from vpcnet_lab.emulator.errors import ApiError, missing

#: System entries of a fresh route table: a vSwitch CIDR (next hop local) and the cloud service range.
DEFAULT_VSWITCH_CIDRS = ("192.168.0.0/24",)
SERVICE_CIDR = "100.64.0.0/10"


def normalize_cidr(value: str) -> str:
    """'10.1.2.0/24' or 'fd00:1::/80' -> canonical string; raises InvalidCidrBlock.Malformed (host bits clear).
    Alibaba's DestinationCidrBlock takes IPv4 and IPv6 CIDR blocks alike."""
    text = (value or "").strip()
    try:
        if "/" not in text:
            raise ValueError("no prefix length")
        net = ipaddress.ip_network(text, strict=True)
    except (ValueError, TypeError) as exc:
        raise ApiError("InvalidCidrBlock.Malformed",
                       f"The specified DestinationCidrBlock {value!r} is not a valid IPv4 or IPv6 CIDR block "
                       f"({exc}).") from None
    return str(net)


def ip_version(cidr: str) -> str:
    """An entry's `IpVersion` as DescribeRouteEntryList shows it."""
    return "ipv6" if ":" in cidr else "ipv4"


def check_quota(value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 0:
        raise ValueError("quota must be a non-negative integer")
    return int(value)


def public(entry: dict) -> dict:
    """An entry as the API shows it (internal bookkeeping fields start with '_')."""
    out = {k: v for k, v in entry.items() if not k.startswith("_")}
    out["NextHops"] = {"NextHop": [dict(h) for h in entry["NextHops"]["NextHop"]]}
    return out


def _delay(value, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 3600.0:
        raise ValueError(f"{name} must be between 0 and 3600 seconds")
    return value


class RouteTables:
    """Every route table of the emulated region. `tables` (id -> {"vpc_id", "entries", "kind", "quota"})
    and `vswitches` (id -> {"vpc_id", "cidr", "zone", "table"}) are guarded by `lock`, shared with the
    rest of the emulator; `changed()` is called with it held after every change."""

    def __init__(self, lock: threading.RLock, changed: Callable[[], None], *, region: str, vpc_id: str,
                 route_table_id: str, vswitch_cidrs: tuple[str, ...] | list[str] = DEFAULT_VSWITCH_CIDRS,
                 clock: Callable[[], float] | None = None, seed: int | None = None):
        self._lock = lock
        self._changed = changed
        self.region = region
        self.vpc_id = vpc_id
        self.route_table_id = route_table_id
        self.vswitch_cidrs = [str(ipaddress.IPv4Network(c, strict=True)) for c in vswitch_cidrs]
        self.clock: Callable[[], float] = clock or (lambda: time.time())   # looked up at each call
        self.pending_delay = 0.0
        self.pending_delay_max = 0.0      # above pending_delay: each entry's delay is uniform between them
        self._pending_rng = random.Random(seed)
        self.deleting_delay = 0.0
        self.quota = 200
        self.seq = 0
        self.tables: dict[str, dict] = {}
        self.vswitches: dict[str, dict] = {}

    def configure(self, *, pending_delay: float | None = None, deleting_delay: float | None = None,
                  quota: int | None = None, pending_delay_max: float | None = None) -> None:
        with self._lock:
            low = self.pending_delay if pending_delay is None else _delay(pending_delay, "pending_delay")
            high = self.pending_delay_max if pending_delay_max is None else _delay(pending_delay_max,
                                                                                   "pending_delay_max")
            if high and high < low:
                raise ValueError(f"pending_delay_max ({high:g} s) must be 0 (a fixed delay) or at least "
                                 f"pending_delay ({low:g} s)")
            self.pending_delay, self.pending_delay_max = low, high
            if deleting_delay is not None:
                self.deleting_delay = _delay(deleting_delay, "deleting_delay")
            if quota is not None:
                self.quota = check_quota(quota)

    # ------------------------------------------------------------------ tables and vSwitches

    def table(self, route_table_id: str) -> dict:
        """The table with this id, or the API's refusal. Caller holds the lock."""
        if not route_table_id:
            raise missing("RouteTableId")
        table = self.tables.get(route_table_id)
        if table is None:
            raise ApiError("InvalidRouteTableId.NotFound",
                           f"The specified route table {route_table_id} does not exist.", 404)
        return table

    def add_table_locked(self, route_table_id: str, vpc_id: str, kind: str = "System") -> None:
        """A fresh table with its System entries (vSwitch CIDRs, the service range). Caller holds the lock."""
        self.tables[route_table_id] = {"vpc_id": vpc_id, "entries": {}, "kind": kind, "quota": None}
        for cidr in self.vswitch_cidrs:
            self.insert_entry(route_table_id, cidr, "System", "", "local", status="Available")
        self.insert_entry(route_table_id, SERVICE_CIDR, "System", "", "service", status="Available")

    def add_route_table(self, route_table_id: str, vpc_id: str | None = None, quota: int | None = None,
                        vswitches: dict[str, str] | None = None) -> None:
        """A custom route table (the first table of a VPC is its system table). `quota` overrides
        the emulator-wide custom-entry quota for this table; `vswitches` ({vSwitch id: CIDR}) are created
        (or re-bound) and bound to it."""
        with self._lock:
            if route_table_id in self.tables:
                raise ValueError(f"route table {route_table_id} already exists")
            vpc = vpc_id or self.vpc_id
            first = not any(t["vpc_id"] == vpc for t in self.tables.values())
            self.add_table_locked(route_table_id, vpc, kind="System" if first else "Custom")
            if quota is not None:
                self.tables[route_table_id]["quota"] = check_quota(quota)
            for vsw, cidr in (vswitches or {}).items():
                self._bind_locked(vsw, cidr, route_table_id)
            self._changed()

    def set_table_quota(self, route_table_id: str, quota: int | None) -> None:
        """This table's custom-entry quota (None: the emulator-wide `quota`)."""
        with self._lock:
            self.table(route_table_id)["quota"] = None if quota is None else check_quota(quota)
            self._changed()

    def table_quota(self, route_table_id: str) -> int:
        with self._lock:
            return self.quota_of(self.table(route_table_id))

    def quota_of(self, table: dict) -> int:
        return self.quota if table.get("quota") is None else table["quota"]

    def add_vswitch(self, vswitch_id: str, cidr: str, route_table_id: str | None = None,
                    zone_id: str = "") -> None:
        """A vSwitch (CIDR), bound to `route_table_id` (default: the VPC's system table). A vSwitch is
        bound to exactly one table: adding it again re-binds it."""
        with self._lock:
            self._bind_locked(vswitch_id, cidr, route_table_id or self.route_table_id, zone_id)
            self._changed()

    def _bind_locked(self, vswitch_id: str, cidr: str, route_table_id: str, zone_id: str = "") -> None:
        table = self.table(route_table_id)
        net = str(ipaddress.IPv4Network(cidr, strict=True))
        self.vswitches[vswitch_id] = {"vpc_id": table["vpc_id"], "cidr": net, "table": route_table_id,
                                      "zone": zone_id or f"{self.region}-a"}

    def bound_to(self, route_table_id: str) -> list[str]:
        """The vSwitches bound to a table, sorted. Caller holds the lock."""
        return sorted(v for v, sw in self.vswitches.items() if sw["table"] == route_table_id)

    def copy_vswitches(self) -> dict[str, dict]:
        with self._lock:
            return {k: dict(v) for k, v in self.vswitches.items()}

    def list_tables(self) -> list[dict]:
        with self._lock:
            return [{"RouteTableId": tid, "VpcId": t["vpc_id"]} for tid, t in self.tables.items()]

    # ------------------------------------------------------------------ entries (direct access)

    def insert_entry(self, route_table_id: str, destination: str, kind: str, next_hop_id: str,
                     next_hop_type: str, *, name: str = "", description: str = "",
                     status: str = "Available", due: float | None = None) -> dict:
        """Store a new entry as given (no checks). Caller holds the lock."""
        self.seq += 1
        prefix = "rte-sys" if kind == "System" else "rte-emu"
        entry = {
            "RouteEntryId": f"{prefix}{self.seq:010d}",
            "RouteEntryName": name,
            "RouteTableId": route_table_id,
            "DestinationCidrBlock": destination,
            "Type": kind,
            "Status": status,
            "Description": description,
            "IpVersion": ip_version(destination),
            "NextHops": {"NextHop": [{"NextHopId": next_hop_id, "NextHopType": next_hop_type,
                                      "Enabled": 1, "Weight": 0}]},
            "_seq": self.seq,
            "_due": due,
        }
        self.tables[route_table_id]["entries"][entry["RouteEntryId"]] = entry
        return entry

    def insert_pending(self, route_table_id: str, destination: str, next_hop_id: str, next_hop_type: str,
                       name: str, description: str) -> dict:
        """A Custom entry the API created: Pending for `pending_delay` seconds (or a delay drawn from
        uniform(pending_delay, pending_delay_max)). Caller holds the lock."""
        delay = self.pending_delay
        if self.pending_delay_max > delay:
            delay = self._pending_rng.uniform(delay, self.pending_delay_max)
        return self.insert_entry(route_table_id, destination, "Custom", next_hop_id, next_hop_type,
                                 name=name, description=description,
                                 status="Pending" if delay > 0 else "Available",
                                 due=self.clock() + delay if delay > 0 else None)

    def start_delete(self, entry: dict) -> None:
        """An entry the API deletes: Deleting for `deleting_delay` seconds, then gone. Caller holds the lock."""
        if self.deleting_delay > 0:
            entry["Status"] = "Deleting"
            entry["_due"] = self.clock() + self.deleting_delay
        else:
            del self.tables[entry["RouteTableId"]]["entries"][entry["RouteEntryId"]]
        self._changed()

    def add_system_entry(self, destination: str, next_hop_type: str = "local", next_hop_id: str = "",
                         route_table_id: str | None = None) -> str:
        """Add a System entry (e.g. another vSwitch CIDR); returns its RouteEntryId."""
        dest = normalize_cidr(destination)
        with self._lock:
            table_id = route_table_id or self.route_table_id
            self.table(table_id)
            entry = self.insert_entry(table_id, dest, "System", next_hop_id, next_hop_type)
            self._changed()
            return entry["RouteEntryId"]

    def add_custom_entry(self, destination: str, next_hop_id: str, *, name: str = "", description: str = "",
                         route_table_id: str | None = None, next_hop_type: str = "Instance",
                         status: str = "Available") -> str:
        """Add a hand-made Custom entry as the console would (no quota, conflict or instance checks,
        no duplicate check either: tests use it to set up odd tables). Returns its RouteEntryId."""
        dest = normalize_cidr(destination)
        if status not in ("Available", "Pending", "Deleting"):
            raise ValueError("status must be Available, Pending or Deleting")
        with self._lock:
            table_id = route_table_id or self.route_table_id
            self.table(table_id)
            entry = self.insert_entry(table_id, dest, "Custom", next_hop_id, next_hop_type,
                                      name=name, description=description, status=status)
            self._changed()
            return entry["RouteEntryId"]

    def remove_entry(self, entry_id: str) -> bool:
        """Remove an entry at once, whatever its status (a change behind vpcnet's back)."""
        with self._lock:
            for table in self.tables.values():
                if table["entries"].pop(entry_id, None) is not None:
                    self._changed()
                    return True
            return False

    def entries(self, route_table_id: str | None = None) -> list[dict]:
        """Snapshot of the entries of one table (default: every table), in creation order."""
        with self._lock:
            self.advance()
            tables = [route_table_id] if route_table_id else list(self.tables)
            out: list[dict] = []
            for tid in tables:
                table = self.tables.get(tid)
                if table is None:
                    raise KeyError(f"no route table {tid}")
                out.extend(public(e) for e in table["entries"].values())
            return out

    def instance_routes(self, instances: dict[str, str], route_table_id: str | None = None,
                        instances6: dict[str, str] | None = None) -> dict[str, str]:
        """destination -> underlay IP of the next hop, for every Available (or Deleting) entry whose next
        hop is one of `instances`, of one table (default: all; the first table wins a destination two
        tables hold). An IPv6 destination goes to the instance's IPv6 underlay address (`instances6`; the
        kernel takes no IPv4 gateway for an IPv6 route): without one it has no kernel route."""
        with self._lock:
            self.advance()
            out: dict[str, str] = {}
            for tid, table in self.tables.items():
                if route_table_id is not None and tid != route_table_id:
                    continue
                for entry in sorted(table["entries"].values(), key=lambda e: e["_seq"]):
                    if entry["Type"] == "System" or entry["Status"] not in ("Available", "Deleting"):
                        continue
                    hop = entry["NextHops"]["NextHop"][0]
                    ip = instances.get(hop["NextHopId"])
                    if ":" in entry["DestinationCidrBlock"]:
                        ip = (instances6 or {}).get(hop["NextHopId"]) if ip else None
                    if hop["NextHopType"] == "Instance" and ip:
                        out.setdefault(entry["DestinationCidrBlock"], ip)
            return out

    # ------------------------------------------------------------------ describe calls

    def describe_route_tables(self, vpc_id: str = "", route_table_id: str = "",
                              vswitch_id: str = "") -> list[dict]:
        with self._lock:
            out = []
            for tid, table in self.tables.items():
                if vpc_id and table["vpc_id"] != vpc_id:
                    continue
                if route_table_id and tid != route_table_id:
                    continue
                bound = self.bound_to(tid)
                if vswitch_id and vswitch_id not in bound:
                    continue
                out.append({"RouteTableId": tid, "VpcId": table["vpc_id"],
                            "RouteTableType": table.get("kind", "System"),
                            "RouterType": "VRouter", "RouterId": "vrt-" + tid.split("-", 1)[-1],
                            "Status": "Available", "RouteTableName": "", "Description": "",
                            "VSwitchIds": {"VSwitchId": bound}, "ResourceGroupId": ""})
            return out

    def describe_vswitches(self, vpc_id: str = "") -> list[dict]:
        """vSwitches of a VPC: those added with `add_vswitch`, then the destinations of System entries with
        next hop `local` in its tables that no added vSwitch covers."""
        with self._lock:
            out: dict[tuple, dict] = {}
            for vsw, sw in self.vswitches.items():
                if vpc_id and sw["vpc_id"] != vpc_id:
                    continue
                out[(sw["vpc_id"], sw["cidr"])] = {
                    "VSwitchId": vsw, "VpcId": sw["vpc_id"], "CidrBlock": sw["cidr"], "ZoneId": sw["zone"],
                    "Status": "Available", "VSwitchName": "", "Description": "",
                    "RouteTable": {"RouteTableId": sw["table"],
                                   "RouteTableType": self.tables[sw["table"]].get("kind", "System")}}
            for table in self.tables.values():
                if vpc_id and table["vpc_id"] != vpc_id:
                    continue
                for entry in sorted(table["entries"].values(), key=lambda e: e["_seq"]):
                    if entry["Type"] != "System" or entry["NextHops"]["NextHop"][0]["NextHopType"] != "local":
                        continue
                    cidr = entry["DestinationCidrBlock"]
                    key = (table["vpc_id"], cidr)
                    if key not in out:
                        out[key] = {"VSwitchId": f"vsw-emu{len(out) + 1:04d}", "VpcId": table["vpc_id"],
                                    "CidrBlock": cidr, "ZoneId": f"{self.region}-a", "Status": "Available",
                                    "VSwitchName": "", "Description": ""}
            return list(out.values())

    def summary(self) -> list[dict]:
        """Every table with its quota, vSwitches and entries, for the emulator's state page."""
        with self._lock:
            return [{"RouteTableId": tid, "VpcId": t["vpc_id"], "RouteTableType": t.get("kind"),
                     "quota": self.quota_of(t), "VSwitchIds": self.bound_to(tid),
                     "entries": [public(e) for e in t["entries"].values()]}
                    for tid, t in self.tables.items()]

    # ------------------------------------------------------------------ transitions

    def advance(self, now: float | None = None) -> bool:
        """Apply due transitions (Pending -> Available, Deleting -> gone)."""
        now = self.clock() if now is None else now
        changed = False
        with self._lock:
            for table in self.tables.values():
                for entry_id, entry in list(table["entries"].items()):
                    due = entry.get("_due")
                    if due is None or due > now:
                        continue
                    if entry["Status"] == "Pending":
                        entry["Status"] = "Available"
                        entry["_due"] = None
                        changed = True
                    elif entry["Status"] == "Deleting":
                        del table["entries"][entry_id]
                        changed = True
                    else:
                        entry["_due"] = None
            if changed:
                self._changed()
        return changed

    def next_due(self) -> float | None:
        with self._lock:
            dues = [e["_due"] for t in self.tables.values() for e in t["entries"].values()
                    if e.get("_due") is not None]
            return min(dues) if dues else None

    # ------------------------------------------------------------------ persistence

    def dump(self) -> dict:
        """This piece of the state file (the lock held)."""
        return {"seq": self.seq,
                "tables": {tid: {"vpc_id": t["vpc_id"], "entries": list(t["entries"].values()),
                                 "kind": t.get("kind", "System"), "quota": t.get("quota")}
                           for tid, t in self.tables.items()},
                "vswitches": self.vswitches}

    def restore(self, data: dict) -> None:
        """Take the tables, vSwitches and id counter from a state file's contents."""
        tables = {}
        for tid, t in data["tables"].items():
            tables[tid] = {"vpc_id": t["vpc_id"],
                           "entries": {e["RouteEntryId"]: e for e in t["entries"]},
                           "kind": t.get("kind", "System"), "quota": t.get("quota")}
        self.tables = tables
        self.vswitches = {k: dict(v) for k, v in data.get("vswitches", {}).items()}
        self.seq = int(data["seq"])
