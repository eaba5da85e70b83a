"""The emulator's state: route tables, entries, instances, quota, timers, nonces and faults.

One `Emulator` object, safe to use from many threads (one lock). The HTTP layer (`api.py`) parses
requests and turns `ApiError` into Alibaba-shaped error answers; everything that decides an answer lives
here, so tests and the lab can also drive it directly.

Entries move `Pending -> Available` after `pending_delay` seconds and `Deleting -> gone` after
`deleting_delay`. Transitions happen lazily on every access and in a small ticker thread (so kernel
routes and the state file follow promptly even when nobody asks).

Like the real VPC, route-table writes are serialised per VPC, not per table: while any entry of any
table of the VPC is Pending or Deleting, or less than `write_interval` seconds after the VPC's last
accepted write, every create or delete in that VPC answers `TaskConflict`. The batch calls
(CreateRouteEntries / DeleteRouteEntries, at most 50 entries each) are one write. Each table has its
own custom-entry quota (default: the emulator's `quota`), and vSwitches are bound to tables (one table
per vSwitch; DescribeRouteTableList shows each table's `VSwitchIds`).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from vpcnet.cloud.aliyun.signature import verify

if TYPE_CHECKING:
    from vpcnet_lab.emulator.kernel import KernelRoutes

log = logging.getLogger(__name__)

#: Most entries one CreateRouteEntries / DeleteRouteEntries call takes (Alibaba's limit).
MAX_BATCH = 50

#: Fault codes the emulator can inject, with their HTTP status.
FAULT_STATUS = {
    "Throttling": 400,
    "Throttling.User": 400,
    "Throttling.Api": 400,
    "ServiceUnavailable": 503,
    "InternalError": 500,
    "UnknownError": 500,
    "TaskConflict": 400,
    "OperationConflict": 400,
}
DEFAULT_FAULT_CODES = ("Throttling", "ServiceUnavailable", "InternalError")

#: Timestamps further than this from the emulator's clock are refused (Alibaba: 15 minutes).
TIMESTAMP_WINDOW = 15 * 60
#: Nonces are remembered this long (past it, the timestamp check refuses a replay anyway).
NONCE_TTL = 2 * TIMESTAMP_WINDOW + 60
MAX_NONCES = 200_000
MAX_CLIENT_TOKENS = 50_000

#: System entries of a fresh route table: a vSwitch CIDR (next hop local) and the cloud service range.
DEFAULT_VSWITCH_CIDRS = ("192.168.0.0/24",)
SERVICE_CIDR = "100.64.0.0/10"

STATE_VERSION = 1


class ApiError(Exception):
    """An answer the API gives as `{"RequestId", "HostId", "Code", "Message"}` with an HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def _now() -> float:
    return time.time()


def _normalize_cidr(value: str) -> str:
    """'10.1.2.0/24' -> canonical string; raises InvalidCidrBlock.Malformed (IPv4 only, host bits clear)."""
    text = (value or "").strip()
    try:
        if "/" not in text:
            raise ValueError("no prefix length")
        net = ipaddress.IPv4Network(text, strict=True)
    except (ValueError, TypeError) as exc:
        raise ApiError("InvalidCidrBlock.Malformed",
                       f"The specified DestinationCidrBlock {value!r} is not a valid IPv4 CIDR block ({exc}).") \
            from None
    return str(net)


def _parse_timestamp(value: str) -> float:
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc).timestamp()
        except (ValueError, TypeError):
            continue
    raise ApiError("InvalidTimeStamp.Format",
                   "The specified Timestamp is not in the format YYYY-MM-DDThh:mm:ssZ (UTC).")


def _quota(value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 0:
        raise ValueError("quota must be a non-negative integer")
    return int(value)


def _public(entry: dict) -> dict:
    """An entry as the API shows it (internal bookkeeping fields start with '_')."""
    out = {k: v for k, v in entry.items() if not k.startswith("_")}
    out["NextHops"] = {"NextHop": [dict(h) for h in entry["NextHops"]["NextHop"]]}
    return out


class Emulator:
    """State of an Alibaba-Cloud-compatible VPC: route tables, entries and instances."""

    def __init__(self, *, region: str = "cn-emu-1", vpc_id: str = "vpc-emu0001",
                 route_table_id: str = "vtb-emu0001",
                 credentials: dict[str, str] | None = None,
                 pending_delay: float = 0.0, deleting_delay: float = 0.0, quota: int = 200,
                 state_file: str | None = None, router_netns: str | None = None,
                 seed: int | None = None,
                 vswitch_cidrs: tuple[str, ...] | list[str] = DEFAULT_VSWITCH_CIDRS,
                 vswitch_api: bool = False, write_interval: float = 0.0, batch_api: bool = True,
                 kernel_tables: dict[str, int] | None = None):
        self.region = region
        self.vpc_id = vpc_id
        self.route_table_id = route_table_id
        self.state_file = state_file
        self.router_netns = router_netns
        #: Emulated route table -> kernel routing table number in the router namespace. Empty: every
        #: table's routes go into the main table (the first table wins a destination held by several).
        #: Given: each emulated table gets its own kernel table, so a router forwarding by the table of
        #: the packet's vSwitch (policy rules, set up by the lab) sees exactly that table's routes.
        self.kernel_tables = dict(kernel_tables or {})
        #: Whether DescribeVSwitches is served (off by default: an endpoint without it is a case the
        #: provider must handle, and the agreed interface does not include it).
        self.vswitch_api = bool(vswitch_api)
        # False: CreateRouteEntries/DeleteRouteEntries are unknown actions (an endpoint without them)
        self.batch_api = bool(batch_api)
        self._vswitch_cidrs = [str(ipaddress.IPv4Network(c, strict=True)) for c in vswitch_cidrs]

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = threading.Event()

        # Credentials: key id -> (secret, security token or None for a plain AccessKey).
        self._credentials: dict[str, tuple[str, str | None]] = {}
        creds = {"emu-key-id": "emu-key-secret"} if credentials is None else credentials
        for key_id, secret in creds.items():
            self._credentials[key_id] = (secret, None)

        self.pending_delay = 0.0
        self.deleting_delay = 0.0
        self.quota = 200
        self.write_interval = 0.0
        self.configure(pending_delay=pending_delay, deleting_delay=deleting_delay, quota=quota,
                       write_interval=write_interval)
        self._last_write: dict[str, float] = {}     # vpc id -> time of its last accepted write
        self._conflicts = 0                          # TaskConflicts answered for the write lock

        self._rng = random.Random(seed)
        self._fault_rate = 0.0
        self._fault_codes: tuple[str, ...] = DEFAULT_FAULT_CODES
        self._latency = 0.0
        self._request_counts: dict[str, int] = {}

        self._seq = 0
        self._tables: dict[str, dict] = {}          # id -> {"vpc_id", "entries", "kind", "quota"}
        self._vswitches: dict[str, dict] = {}       # vSwitch id -> {"vpc_id", "cidr", "zone", "table"}
        self._instances: dict[str, str] = {}         # instance id -> underlay IP
        self._client_tokens: dict[str, dict] = {}   # token -> {"fingerprint": [...], "entry_id": ...}
        self._nonces: dict[str, float] = {}         # nonce -> time seen

        with self._lock:
            if state_file and os.path.exists(state_file):
                self._load(state_file)
            if route_table_id not in self._tables:
                self._add_table_locked(route_table_id, vpc_id)
            self._save_locked()

        self._kernel: dict[int, KernelRoutes] = {}
        self._kernel_lock = threading.Lock()
        self._kernel_dirty = threading.Event()
        self._threads: list[threading.Thread] = []
        if router_netns:
            from vpcnet_lab.emulator.kernel import MAIN_TABLE, KernelRoutes
            for number in sorted(set(self.kernel_tables.values()) or {MAIN_TABLE}):
                self._kernel[number] = KernelRoutes(router_netns, table=number)
            self.sync_kernel()          # reconcile the namespace with the table at start
            self._start_thread(self._kernel_loop, "vpcnet-emulator-kernel")
        self._start_thread(self._tick_loop, "vpcnet-emulator-ticker")

    # ------------------------------------------------------------------ lifecycle

    def _start_thread(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        """Stop the background threads (state is already saved after every change)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        self._kernel_dirty.set()
        for thread in self._threads:
            thread.join(timeout=5.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ configuration

    def configure(self, *, pending_delay: float | None = None, deleting_delay: float | None = None,
                  quota: int | None = None, write_interval: float | None = None) -> dict:
        with self._lock:
            if pending_delay is not None:
                pending_delay = float(pending_delay)
                if not 0.0 <= pending_delay <= 3600.0:
                    raise ValueError("pending_delay must be between 0 and 3600 seconds")
                self.pending_delay = pending_delay
            if deleting_delay is not None:
                deleting_delay = float(deleting_delay)
                if not 0.0 <= deleting_delay <= 3600.0:
                    raise ValueError("deleting_delay must be between 0 and 3600 seconds")
                self.deleting_delay = deleting_delay
            if quota is not None:
                self.quota = _quota(quota)
            if write_interval is not None:
                write_interval = float(write_interval)
                if not 0.0 <= write_interval <= 60.0:
                    raise ValueError("write_interval must be between 0 and 60 seconds")
                self.write_interval = write_interval
            return {"pending_delay": self.pending_delay, "deleting_delay": self.deleting_delay,
                    "quota": self.quota, "write_interval": self.write_interval}

    def add_credentials(self, key_id: str, secret: str) -> None:
        with self._lock:
            self._credentials[key_id] = (secret, None)

    def add_sts_credentials(self, key_id: str, secret: str, token: str) -> None:
        """A temporary (STS) key: requests must carry this SecurityToken."""
        with self._lock:
            self._credentials[key_id] = (secret, token)

    def set_faults(self, rate: float = 0.0, codes=DEFAULT_FAULT_CODES, latency: float = 0.0,
                   seed: int | None = None) -> dict:
        """With probability `rate` a signed action answers one of `codes` without changing state;
        `latency` seconds are added to every signed request. `seed` re-seeds the fault generator."""
        rate = float(rate)
        latency = float(latency)
        if isinstance(codes, str):
            codes = [c for c in codes.split(",") if c.strip()]
        codes = tuple(c.strip() for c in codes)
        if not 0.0 <= rate <= 1.0:
            raise ValueError("fault rate must be between 0 and 1")
        if not 0.0 <= latency <= 60.0:
            raise ValueError("latency must be between 0 and 60 seconds")
        unknown = [c for c in codes if c not in FAULT_STATUS]
        if unknown:
            raise ValueError(f"unknown fault code(s) {', '.join(unknown)}; known: {', '.join(FAULT_STATUS)}")
        if rate > 0 and not codes:
            raise ValueError("a fault rate above 0 needs at least one fault code")
        with self._lock:
            self._fault_rate = rate
            self._fault_codes = codes
            self._latency = latency
            if seed is not None:
                self._rng.seed(seed)
            return self.faults()

    def faults(self) -> dict:
        with self._lock:
            return {"rate": self._fault_rate, "codes": list(self._fault_codes), "latency": self._latency}

    @property
    def latency(self) -> float:
        return self._latency

    @property
    def request_counts(self) -> dict[str, int]:
        """Requests received per Action (every request naming an action, faulted or refused included)."""
        with self._lock:
            return dict(self._request_counts)

    def reset_request_counts(self) -> None:
        with self._lock:
            self._request_counts.clear()

    def count_request(self, action: str) -> None:
        with self._lock:
            self._request_counts[action] = self._request_counts.get(action, 0) + 1

    # ------------------------------------------------------------------ instances and tables

    def register_instance(self, instance_id: str, underlay_ip: str) -> None:
        ip = str(ipaddress.IPv4Address(underlay_ip))
        with self._lock:
            self._instances[instance_id] = ip
            self._changed()

    def deregister_instance(self, instance_id: str) -> bool:
        """Forget an instance (as if it were released). Its route entries stay, like in a real VPC."""
        with self._lock:
            found = self._instances.pop(instance_id, None) is not None
            if found:
                self._changed()
            return found

    def instances(self) -> dict[str, str]:
        with self._lock:
            return dict(self._instances)

    def add_route_table(self, route_table_id: str, vpc_id: str | None = None, quota: int | None = None,
                        vswitches: dict[str, str] | None = None) -> None:
        """A custom route table (the first table of a VPC is its system table). `quota` overrides
        the emulator-wide custom-entry quota for this table; `vswitches` ({vSwitch id: CIDR}) are created
        (or re-bound) and bound to it."""
        with self._lock:
            if route_table_id in self._tables:
                raise ValueError(f"route table {route_table_id} already exists")
            vpc = vpc_id or self.vpc_id
            first = not any(t["vpc_id"] == vpc for t in self._tables.values())
            self._add_table_locked(route_table_id, vpc, kind="System" if first else "Custom")
            if quota is not None:
                self._tables[route_table_id]["quota"] = _quota(quota)
            for vsw, cidr in (vswitches or {}).items():
                self._bind_locked(vsw, cidr, route_table_id)
            self._changed()

    def set_table_quota(self, route_table_id: str, quota: int | None) -> None:
        """This table's custom-entry quota (None: the emulator-wide `quota`)."""
        with self._lock:
            self._table(route_table_id)["quota"] = None if quota is None else _quota(quota)
            self._changed()

    def table_quota(self, route_table_id: str) -> int:
        with self._lock:
            table = self._table(route_table_id)
            return self.quota if table.get("quota") is None else table["quota"]

    def add_vswitch(self, vswitch_id: str, cidr: str, route_table_id: str | None = None,
                    zone_id: str = "") -> None:
        """A vSwitch (CIDR), bound to `route_table_id` (default: the VPC's system table). A vSwitch is
        bound to exactly one table: adding it again re-binds it."""
        with self._lock:
            self._bind_locked(vswitch_id, cidr, route_table_id or self.route_table_id, zone_id)
            self._changed()

    def _bind_locked(self, vswitch_id: str, cidr: str, route_table_id: str, zone_id: str = "") -> None:
        table = self._table(route_table_id)
        net = str(ipaddress.IPv4Network(cidr, strict=True))
        self._vswitches[vswitch_id] = {"vpc_id": table["vpc_id"], "cidr": net, "table": route_table_id,
                                       "zone": zone_id or f"{self.region}-a"}

    def vswitches(self) -> dict[str, dict]:
        with self._lock:
            return {k: dict(v) for k, v in self._vswitches.items()}

    def route_tables(self) -> list[dict]:
        with self._lock:
            return [{"RouteTableId": tid, "VpcId": t["vpc_id"]} for tid, t in self._tables.items()]

    def _add_table_locked(self, route_table_id: str, vpc_id: str, kind: str = "System") -> None:
        self._tables[route_table_id] = {"vpc_id": vpc_id, "entries": {}, "kind": kind, "quota": None}
        for cidr in self._vswitch_cidrs:
            self._insert_entry(route_table_id, cidr, "System", "", "local", status="Available")
        self._insert_entry(route_table_id, SERVICE_CIDR, "System", "", "service", status="Available")

    def _check_writable(self, vpc_id: str, now: float | None = None) -> None:
        """The VPC-wide write lock: TaskConflict while any table of the VPC is changing, or within
        `write_interval` seconds of the VPC's last accepted write. Caller holds the lock."""
        now = _now() if now is None else now
        for tid, table in self._tables.items():
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
        self._last_write[vpc_id] = _now()

    @property
    def conflicts(self) -> int:
        """TaskConflicts answered because of the VPC write lock (injected faults not counted)."""
        with self._lock:
            return self._conflicts

    def _table(self, route_table_id: str) -> dict:
        if not route_table_id:
            raise ApiError("MissingParameter", "The input parameter RouteTableId that is mandatory "
                           "for processing this request is not supplied.")
        table = self._tables.get(route_table_id)
        if table is None:
            raise ApiError("InvalidRouteTableId.NotFound",
                           f"The specified route table {route_table_id} does not exist.", 404)
        return table

    # ------------------------------------------------------------------ entries (direct access)

    def _insert_entry(self, route_table_id: str, destination: str, kind: str, next_hop_id: str,
                      next_hop_type: str, *, name: str = "", description: str = "",
                      status: str = "Available", due: float | None = None) -> dict:
        self._seq += 1
        prefix = "rte-sys" if kind == "System" else "rte-emu"
        entry = {
            "RouteEntryId": f"{prefix}{self._seq:010d}",
            "RouteEntryName": name,
            "RouteTableId": route_table_id,
            "DestinationCidrBlock": destination,
            "Type": kind,
            "Status": status,
            "Description": description,
            "IpVersion": "ipv4",
            "NextHops": {"NextHop": [{"NextHopId": next_hop_id, "NextHopType": next_hop_type,
                                      "Enabled": 1, "Weight": 0}]},
            "_seq": self._seq,
            "_due": due,
        }
        self._tables[route_table_id]["entries"][entry["RouteEntryId"]] = entry
        return entry

    def add_system_entry(self, destination: str, next_hop_type: str = "local", next_hop_id: str = "",
                         route_table_id: str | None = None) -> str:
        """Add a System entry (e.g. another vSwitch CIDR); returns its RouteEntryId."""
        dest = _normalize_cidr(destination)
        with self._lock:
            table_id = route_table_id or self.route_table_id
            self._table(table_id)
            entry = self._insert_entry(table_id, dest, "System", next_hop_id, next_hop_type)
            self._changed()
            return entry["RouteEntryId"]

    def add_custom_entry(self, destination: str, next_hop_id: str, *, name: str = "", description: str = "",
                         route_table_id: str | None = None, next_hop_type: str = "Instance",
                         status: str = "Available") -> str:
        """Add a hand-made Custom entry as the console would (no quota, conflict or instance checks,
        no duplicate check either: tests use it to set up odd tables). Returns its RouteEntryId."""
        dest = _normalize_cidr(destination)
        if status not in ("Available", "Pending", "Deleting"):
            raise ValueError("status must be Available, Pending or Deleting")
        with self._lock:
            table_id = route_table_id or self.route_table_id
            self._table(table_id)
            entry = self._insert_entry(table_id, dest, "Custom", next_hop_id, next_hop_type,
                                       name=name, description=description, status=status)
            self._changed()
            return entry["RouteEntryId"]

    def remove_entry(self, entry_id: str) -> bool:
        """Remove an entry at once, whatever its status (a change behind vpcnet's back)."""
        with self._lock:
            for table in self._tables.values():
                if table["entries"].pop(entry_id, None) is not None:
                    self._changed()
                    return True
            return False

    def entries(self, route_table_id: str | None = None) -> list[dict]:
        """Snapshot of the entries of one table (default: every table), in creation order."""
        with self._lock:
            self._advance()
            tables = [route_table_id] if route_table_id else list(self._tables)
            out: list[dict] = []
            for tid in tables:
                table = self._tables.get(tid)
                if table is None:
                    raise KeyError(f"no route table {tid}")
                out.extend(_public(e) for e in table["entries"].values())
            return out

    # ------------------------------------------------------------------ authentication and faults

    def authenticate(self, method: str, params: dict[str, str], now: float | None = None) -> str:
        """Check the common parameters of a signed request; returns the AccessKeyId. Raises ApiError."""
        now = _now() if now is None else now
        for name in ("AccessKeyId", "Signature", "SignatureNonce", "Timestamp"):
            if not params.get(name):
                raise ApiError("MissingParameter", f"The input parameter {name} that is mandatory for "
                               "processing this request is not supplied.")
        if params.get("SignatureMethod", "HMAC-SHA1") != "HMAC-SHA1":
            raise ApiError("InvalidSignatureMethod", "The specified SignatureMethod is not supported "
                           "(HMAC-SHA1 only).")
        if params.get("SignatureVersion", "1.0") != "1.0":
            raise ApiError("InvalidSignatureVersion", "The specified SignatureVersion is not supported (1.0).")
        key_id = params["AccessKeyId"]
        with self._lock:
            cred = self._credentials.get(key_id)
        if cred is None:
            raise ApiError("InvalidAccessKeyId.NotFound", "Specified access key is not found.", 404)
        secret, token = cred
        if not verify(method, params, secret):
            raise ApiError("SignatureDoesNotMatch", "Specified signature is not matched with our calculation.")
        stamp = _parse_timestamp(params["Timestamp"])
        if abs(now - stamp) > TIMESTAMP_WINDOW:
            raise ApiError("InvalidTimeStamp.Expired", "Specified time stamp or date value is expired "
                           "(more than 15 minutes away from the server's clock).")
        given = params.get("SecurityToken")
        if token is not None and not given:
            raise ApiError("MissingSecurityToken", "This AccessKeyId is a temporary (STS) key: "
                           "SecurityToken is required.")
        if given is not None and given != (token or ""):
            raise ApiError("InvalidSecurityToken.MismatchWithAccessKey",
                           "The SecurityToken does not match the AccessKeyId.")
        nonce = params["SignatureNonce"]
        with self._lock:
            if nonce in self._nonces:
                raise ApiError("SignatureNonceUsed", "Specified signature nonce was used already.")
            self._nonces[nonce] = now
            if len(self._nonces) > MAX_NONCES or len(self._nonces) % 1000 == 0:
                self._prune_nonces(now)
        return key_id

    def _prune_nonces(self, now: float) -> None:
        cutoff = now - NONCE_TTL
        for nonce in [n for n, t in self._nonces.items() if t < cutoff]:
            del self._nonces[nonce]
        while len(self._nonces) > MAX_NONCES:
            del self._nonces[next(iter(self._nonces))]

    def draw_fault(self) -> ApiError | None:
        """Decide whether this request fails with an injected fault (seeded, deterministic)."""
        with self._lock:
            if self._fault_rate <= 0.0 or not self._fault_codes:
                return None
            if self._rng.random() >= self._fault_rate:
                return None
            code = self._rng.choice(self._fault_codes)
        messages = {
            "ServiceUnavailable": "The request has failed due to a temporary failure of the server.",
            "InternalError": "The request processing has failed due to some unknown error.",
            "UnknownError": "The request processing has failed due to some unknown error.",
            "TaskConflict": "The operation conflicts with another task in progress (injected fault).",
            "OperationConflict": "The operation conflicts with another operation (injected fault).",
        }
        return ApiError(code, messages.get(code, "Request was denied due to request throttling."),
                        FAULT_STATUS[code])

    # ------------------------------------------------------------------ actions

    def create_route_entry(self, route_table_id: str, destination: str, next_hop_type: str,
                           next_hop_id: str, name: str = "", description: str = "",
                           client_token: str = "") -> str:
        """CreateRouteEntry; returns the RouteEntryId (the same one again for a repeated ClientToken)."""
        with self._lock:
            self._advance()
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

    def _batch_locked(self, entries: list[dict]) -> set[str]:
        """A batch call's checks: 1..MAX_BATCH entries, known tables, their VPCs not busy (one write).
        Returns the VPCs it writes to. Caller holds the lock."""
        if not entries:
            raise ApiError("MissingParameter", "RouteEntries must hold at least one entry.")
        if len(entries) > MAX_BATCH:
            raise ApiError("InvalidParameter.RouteEntries", f"At most {MAX_BATCH} route entries per request "
                           f"({len(entries)} given).")
        self._advance()
        vpcs = {self._table(e.get("RouteTableId", ""))["vpc_id"] for e in entries}
        for vpc in vpcs:
            self._check_writable(vpc)
        return vpcs

    def _create_locked(self, route_table_id: str, destination: str, next_hop_type: str, next_hop_id: str,
                       name: str, description: str, client_token: str, check_writable: bool) -> str:
        table = self._table(route_table_id)
        dest = _normalize_cidr(destination)
        if next_hop_type != "Instance":
            raise ApiError("InvalidNextHopType.NotSupported",
                           f"The emulator supports NextHopType=Instance only, not {next_hop_type!r}.")
        if not next_hop_id:
            raise ApiError("MissingParameter", "The input parameter NextHopId that is mandatory for "
                           "processing this request is not supplied.")
        if next_hop_id not in self._instances:
            raise ApiError("InvalidInstanceId.NotFound",
                           f"The specified instance {next_hop_id} does not exist.", 404)
        fingerprint = [route_table_id, dest, next_hop_type, next_hop_id, name, description]
        if client_token:
            seen = self._client_tokens.get(client_token)
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
        net = ipaddress.IPv4Network(dest)
        if net.prefixlen > 0:
            for entry in entries:
                if entry["Type"] == "System" and net.overlaps(
                        ipaddress.IPv4Network(entry["DestinationCidrBlock"])):
                    raise ApiError("InvalidCidrBlock", f"The specified DestinationCidrBlock {dest} "
                                   f"overlaps the system route {entry['DestinationCidrBlock']}.")
        custom = sum(1 for e in entries if e["Type"] != "System")
        quota = self.quota if table.get("quota") is None else table["quota"]
        if custom >= quota:
            raise ApiError("QuotaExceeded.RouteEntry", f"The route table {route_table_id} already "
                           f"holds {custom} custom route entries; its quota is {quota}.")
        if check_writable:
            self._check_writable(table["vpc_id"])
        delay = self.pending_delay
        entry = self._insert_entry(route_table_id, dest, "Custom", next_hop_id, next_hop_type,
                                   name=name, description=description,
                                   status="Pending" if delay > 0 else "Available",
                                   due=_now() + delay if delay > 0 else None)
        if client_token:
            self._client_tokens[client_token] = {"fingerprint": fingerprint,
                                                 "entry_id": entry["RouteEntryId"]}
            while len(self._client_tokens) > MAX_CLIENT_TOKENS:
                del self._client_tokens[next(iter(self._client_tokens))]
        if check_writable:
            self._wrote(table["vpc_id"])
        self._changed()
        return entry["RouteEntryId"]

    def delete_route_entry(self, route_table_id: str = "", entry_id: str = "", destination: str = "",
                           next_hop_id: str = "") -> str:
        """DeleteRouteEntry by RouteEntryId, or by DestinationCidrBlock (+NextHopId). Returns the id."""
        with self._lock:
            self._advance()
            found = self._find_locked(route_table_id, entry_id, destination, next_hop_id)
            self._check_writable(self._tables[found["RouteTableId"]]["vpc_id"])
            self._delete_locked(found)
            self._wrote(self._tables[found["RouteTableId"]]["vpc_id"])
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
                    self._delete_locked(found)
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
        if route_table_id:
            self._table(route_table_id)
        tables = [route_table_id] if route_table_id else list(self._tables)
        found = None
        if entry_id:
            for tid in tables:
                found = self._tables[tid]["entries"].get(entry_id) or found
        elif destination:
            try:
                dest = _normalize_cidr(destination)
            except ApiError:
                dest = destination
            for tid in tables:
                for entry in self._tables[tid]["entries"].values():
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

    def _delete_locked(self, found: dict) -> None:
        table = self._tables[found["RouteTableId"]]
        if self.deleting_delay > 0:
            found["Status"] = "Deleting"
            found["_due"] = _now() + self.deleting_delay
        else:
            del table["entries"][found["RouteEntryId"]]
        self._changed()

    def describe_route_entries(self, route_table_id: str, filters: dict[str, str] | None = None,
                               max_result: int = 100, next_token: str = "") -> tuple[list[dict], str]:
        """DescribeRouteEntryList: one page of matching entries and the token of the next ('' at the end)."""
        filters = {k: v for k, v in (filters or {}).items() if v}
        if "DestinationCidrBlock" in filters:
            try:
                filters["DestinationCidrBlock"] = _normalize_cidr(filters["DestinationCidrBlock"])
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
            self._advance()
            table = self._table(route_table_id)
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
                if all(checks.get(k, v) == v for k, v in filters.items()):
                    matching.append(entry)
                    if len(matching) > max_result:
                        break
            page = matching[:max_result]
            token = f"nt-{page[-1]['_seq']}" if len(matching) > max_result else ""
            return [_public(e) for e in page], token

    def describe_route_tables(self, vpc_id: str = "", route_table_id: str = "",
                              vswitch_id: str = "") -> list[dict]:
        with self._lock:
            out = []
            for tid, table in self._tables.items():
                if vpc_id and table["vpc_id"] != vpc_id:
                    continue
                if route_table_id and tid != route_table_id:
                    continue
                bound = sorted(v for v, sw in self._vswitches.items() if sw["table"] == tid)
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
            for vsw, sw in self._vswitches.items():
                if vpc_id and sw["vpc_id"] != vpc_id:
                    continue
                out[(sw["vpc_id"], sw["cidr"])] = {
                    "VSwitchId": vsw, "VpcId": sw["vpc_id"], "CidrBlock": sw["cidr"], "ZoneId": sw["zone"],
                    "Status": "Available", "VSwitchName": "", "Description": "",
                    "RouteTable": {"RouteTableId": sw["table"],
                                   "RouteTableType": self._tables[sw["table"]].get("kind", "System")}}
            for table in self._tables.values():
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

    def describe_instances(self, instance_ids: list[str] | None = None) -> list[dict]:
        with self._lock:
            ids = list(self._instances) if instance_ids is None else instance_ids
            out = []
            for iid in ids:
                ip = self._instances.get(iid)
                if ip is None:
                    continue
                out.append({"InstanceId": iid, "RegionId": self.region, "Status": "Running",
                            "InstanceNetworkType": "vpc",
                            "VpcAttributes": {"VpcId": self.vpc_id,
                                              "PrivateIpAddress": {"IpAddress": [ip]}}})
            return out

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> dict:
        """Everything but secrets, for `GET /_emulator/state`."""
        with self._lock:
            self._advance()
            return {
                "region": self.region,
                "vpc_id": self.vpc_id,
                "route_table_id": self.route_table_id,
                "route_tables": [{"RouteTableId": tid, "VpcId": t["vpc_id"], "RouteTableType": t.get("kind"),
                                  "quota": self.quota if t.get("quota") is None else t["quota"],
                                  "VSwitchIds": sorted(v for v, sw in self._vswitches.items()
                                                       if sw["table"] == tid),
                                  "entries": [_public(e) for e in t["entries"].values()]}
                                 for tid, t in self._tables.items()],
                "vswitches": {k: dict(v) for k, v in self._vswitches.items()},
                "write_conflicts": self._conflicts,
                "instances": dict(self._instances),
                "config": {"pending_delay": self.pending_delay, "deleting_delay": self.deleting_delay,
                           "quota": self.quota, "write_interval": self.write_interval},
                "faults": self.faults(),
                "request_counts": dict(self._request_counts),
                "router_netns": self.router_netns,
                "access_key_ids": len(self._credentials),
            }

    # ------------------------------------------------------------------ transitions

    def _advance(self, now: float | None = None) -> bool:
        """Apply due transitions (Pending -> Available, Deleting -> gone). Caller holds the lock."""
        now = _now() if now is None else now
        changed = False
        for table in self._tables.values():
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

    def _next_due(self) -> float | None:
        dues = [e["_due"] for t in self._tables.values() for e in t["entries"].values()
                if e.get("_due") is not None]
        return min(dues) if dues else None

    def _changed(self) -> None:
        """Called with the lock held after every change: persist, wake the ticker and the kernel."""
        self._save_locked()
        self._cond.notify_all()
        if getattr(self, "_kernel", None):
            self._kernel_dirty.set()

    def _tick_loop(self) -> None:
        with self._cond:
            while not self._closed.is_set():
                self._advance()
                nxt = self._next_due()
                timeout = 1.0 if nxt is None else min(1.0, max(0.0, nxt - _now()) + 0.001)
                self._cond.wait(timeout)

    # ------------------------------------------------------------------ kernel routes

    def desired_kernel_routes(self, route_table_id: str | None = None) -> dict[str, str]:
        """destination -> underlay IP of the next hop, for every Available (or Deleting) instance entry
        whose instance is registered, of one table (default: all; the first table wins a destination
        two tables hold)."""
        with self._lock:
            self._advance()
            out: dict[str, str] = {}
            for tid, table in self._tables.items():
                if route_table_id is not None and tid != route_table_id:
                    continue
                for entry in sorted(table["entries"].values(), key=lambda e: e["_seq"]):
                    if entry["Type"] == "System" or entry["Status"] not in ("Available", "Deleting"):
                        continue
                    hop = entry["NextHops"]["NextHop"][0]
                    ip = self._instances.get(hop["NextHopId"])
                    if hop["NextHopType"] == "Instance" and ip:
                        out.setdefault(entry["DestinationCidrBlock"], ip)
            return out

    def sync_kernel(self) -> list[str]:
        """Make the router namespace's routes (our proto only) match the tables now. Returns problems."""
        if not self._kernel:
            return []
        problems = []
        with self._kernel_lock:
            for number, kernel in self._kernel.items():
                tables = [t for t, n in self.kernel_tables.items() if n == number]
                if not self.kernel_tables:
                    desired = self.desired_kernel_routes()
                else:
                    desired = {}
                    for table in tables:
                        for dest, ip in self.desired_kernel_routes(table).items():
                            desired.setdefault(dest, ip)
                problems += kernel.sync(desired)
        for problem in problems:
            log.warning("router netns %s: %s", self.router_netns, problem)
        return problems

    def _kernel_loop(self) -> None:
        # Reconcile on every change, and every few seconds anyway (repairs routes removed by hand and
        # retries routes whose gateway was not reachable yet).
        while not self._closed.is_set():
            self._kernel_dirty.wait(timeout=5.0)
            self._kernel_dirty.clear()
            if self._closed.is_set():
                break
            try:
                self.sync_kernel()
            except Exception:   # keep the emulator serving; the next pass retries
                log.exception("router netns %s: reconcile failed", self.router_netns)

    # ------------------------------------------------------------------ persistence

    def _save_locked(self) -> None:
        if not self.state_file:
            return
        data = {
            "version": STATE_VERSION,
            "seq": self._seq,
            "tables": {tid: {"vpc_id": t["vpc_id"], "entries": list(t["entries"].values()),
                             "kind": t.get("kind", "System"), "quota": t.get("quota")}
                       for tid, t in self._tables.items()},
            "vswitches": self._vswitches,
            "instances": self._instances,
            "client_tokens": self._client_tokens,
            "nonces": self._nonces,
        }
        directory = os.path.dirname(os.path.abspath(self.state_file))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".emulator-state.", dir=directory)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _load(self, path: str) -> None:
        try:
            with open(path) as fh:
                data = json.load(fh)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported state version {data.get('version')!r}")
            tables = {}
            for tid, t in data["tables"].items():
                tables[tid] = {"vpc_id": t["vpc_id"],
                               "entries": {e["RouteEntryId"]: e for e in t["entries"]},
                               "kind": t.get("kind", "System"), "quota": t.get("quota")}
            self._tables = tables
            self._vswitches = {k: dict(v) for k, v in data.get("vswitches", {}).items()}
            self._seq = int(data["seq"])
            self._instances = dict(data.get("instances", {}))
            self._client_tokens = dict(data.get("client_tokens", {}))
            self._nonces = {k: float(v) for k, v in data.get("nonces", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot load emulator state from {path}: {exc}") from exc
        self._advance()
