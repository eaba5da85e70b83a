"""A stand-in for EC2's ENI-prefix calls: moto's EC2 server (ThreadedMotoServer on 127.0.0.1) behind a small
HTTP front on 127.0.0.1 that answers the prefix forms of four calls itself, and passes every other request
to moto unchanged. moto (5.2) accepts `Ipv4PrefixCount`, `Ipv4Prefix.N`, `Ipv6PrefixCount` and `Ipv6Prefix.N`
and silently ignores them; this front does what EC2 does with them.

Shapes are not written by hand: requests are parsed and answers (errors included) serialized by moto's
model-driven EC2 parser and serializer, from botocore's EC2 model (`ec2/2016-11-15/service-2.json`): e.g.
`assignedIpv4PrefixSet/item/ipv4Prefix` for AssignPrivateIpAddresses, `assignedIpv6PrefixSet/item` (plain
strings) for AssignIpv6Addresses. The prefixes live on moto's own network-interface objects
(`ipv4_prefixes` = [{"Ipv4Prefix": ...}], `ipv6_prefixes` = [{"Ipv6Prefix": ...}]), so moto's unchanged
DescribeNetworkInterfaces lists them through the same serializer (`ipv4PrefixSet/item/ipv4Prefix`,
`ipv6PrefixSet/item/ipv6Prefix`). DescribeInstanceTypes (moto's AWS-derived catalogue: Hypervisor,
NetworkInfo.Ipv4AddressesPerInterface, ...), CreateSubnetCidrReservation and GetSubnetCidrReservations are
moto's own.

What it assumes beyond the published shapes (EC2's documentation describes the behaviour, not these
details):
- Carving. An IPv4 /28 comes from the subnet's reservations of type prefix when it has any, else from the
  whole subnet; it must not hold an address in use (any private IP of an interface in the subnet, the
  subnet's first four and last addresses, which AWS reserves), nor overlap an explicit reservation or a
  prefix already assigned. The lowest free block is taken first. An IPv6 /80 comes from the subnet's
  (first) IPv6 CIDR and must not hold an IPv6 address or prefix of the subnet. None free:
  `InsufficientCidrBlocks`.
- Limits. On an attached interface, private IPs + IPv4 prefixes may not exceed the instance type's
  `Ipv4AddressesPerInterface`, and IPv6 addresses + IPv6 prefixes its `Ipv6AddressesPerInterface`; over it:
  `PrivateIpAddressLimitExceeded` for both families (the IPv6 code is not documented). A prefix call on an
  instance whose type's `Hypervisor` is not `nitro` (bare-metal types, which list none, count as Nitro):
  `UnsupportedOperation` (EC2's exact code for it is not documented). More than 10 per call, or count
  and list together: `InvalidParameterValue`.
- Unassigning a prefix the interface does not hold: `InvalidParameterValue` for the whole call, nothing
  changes (EC2 documents no code for it; vpcnet does not depend on which). An unknown interface:
  `InvalidNetworkInterfaceID.NotFound`.
- Explicit prefixes (`Ipv4Prefix.N` / `Ipv6Prefix.N` on an assign) are taken as given if free.
- Failures on demand (`fail`): the given code with HTTP 400, or the status given (throttling is
  `RequestLimitExceeded` with 503, as EC2 answers); the call does not take effect. A lost answer
  (`lose_answer`): the call takes effect, then the connection is closed without an answer.
"""
from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.parse import EC2QueryParser
from moto.core.serialize import EC2Serializer, XFormedAttributePicker
from moto.core.utils import get_service_model
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import ec2_backends
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto.server import ThreadedMotoServer
from werkzeug.datastructures import MultiDict

MAX_PER_CALL = 10
# The calls whose prefix form the front answers, and the members that make a request that form.
PREFIX_CALLS = {
    "AssignPrivateIpAddresses": ("Ipv4PrefixCount", "Ipv4Prefixes"),
    "UnassignPrivateIpAddresses": ("Ipv4Prefixes",),
    "AssignIpv6Addresses": ("Ipv6PrefixCount", "Ipv6Prefixes"),
    "UnassignIpv6Addresses": ("Ipv6Prefixes",),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Failure:
    code: str
    status: int
    message: str
    times: int


class StandinError(Exception):
    """An EC2 error answer of the stand-in."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class Ec2Standin:
    """moto's EC2 behind a front that answers the prefix calls. `url` is what botocore is pointed at."""

    def __init__(self, region: str):
        self.region = region
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self._model = get_service_model("ec2")
        self._lock = threading.Lock()
        self._failures: dict[str, list[Failure]] = {}
        self._lost: dict[str, int] = {}
        self.calls: list[str] = []            # every Action the front saw, in order
        self._front: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.moto_url = ""
        self.url = ""

    # -- life ---------------------------------------------------------------------------------------
    def start(self) -> "Ec2Standin":
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        assert host == "127.0.0.1"
        self.moto_url = f"http://127.0.0.1:{port}"
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:   # noqa: N802 - http.server's name
                standin._handle(self)

            def log_message(self, *args) -> None:
                pass

        try:
            self._front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self._front.daemon_threads = True
            self._thread = threading.Thread(target=self._front.serve_forever, kwargs={"poll_interval": 0.1},
                                            daemon=True)
            self._thread.start()
        except BaseException:
            self.moto.stop()
            raise
        self.url = f"http://127.0.0.1:{self._front.server_address[1]}"
        return self

    def stop(self) -> None:
        try:
            if self._front is not None:
                self._front.shutdown()
                self._front.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
        finally:
            self.moto.stop()

    # -- faults -------------------------------------------------------------------------------------
    def fail(self, action: str, code: str, status: int = 400, message: str = "", times: int = 1) -> None:
        """The next `times` calls of `action` answer `code` and do nothing."""
        with self._lock:
            self._failures.setdefault(action, []).append(
                Failure(code, status, message or f"stand-in failure {code}", times))

    def lose_answer(self, action: str, times: int = 1) -> None:
        """The next `times` calls of `action` take effect, and their answer is dropped."""
        with self._lock:
            self._lost[action] = self._lost.get(action, 0) + times

    def _take_failure(self, action: str) -> Failure | None:
        with self._lock:
            queue = self._failures.get(action) or []
            if not queue:
                return None
            failure = queue[0]
            failure.times -= 1
            if failure.times <= 0:
                queue.pop(0)
            return failure

    def _take_lost(self, action: str) -> bool:
        with self._lock:
            if self._lost.get(action, 0) > 0:
                self._lost[action] -= 1
                return True
            return False

    # -- moto's state ---------------------------------------------------------------------------------
    @property
    def backend(self):
        return ec2_backends[DEFAULT_ACCOUNT_ID][self.region]

    def prefixes(self, eni_id: str, version: int) -> list[str]:
        """What the interface holds (the stand-in's truth, as DescribeNetworkInterfaces lists it)."""
        eni = self.backend.get_network_interface(eni_id)
        key, field = ("ipv4_prefixes", "Ipv4Prefix") if version == 4 else ("ipv6_prefixes", "Ipv6Prefix")
        return [p[field] for p in getattr(eni, key, [])]

    # -- the front ----------------------------------------------------------------------------------
    def _handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        values = MultiDict(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        action = values.get("Action", "")
        with self._lock:
            self.calls.append(action)
        failure = self._take_failure(action)
        if failure is not None:
            status, headers, text = self._error(action, StandinError(failure.code, failure.message, failure.status))
        else:
            params = self._parse(action, values) if action in PREFIX_CALLS else {}
            if any(params.get(m) for m in PREFIX_CALLS.get(action, ())):
                status, headers, text = self._answer(action, params)
            else:
                status, headers, text = self._forward(req, body)
        if self._take_lost(action):
            req.close_connection = True        # the call took effect; the answer never arrives
            return
        data = text.encode("utf-8")
        req.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                req.send_header(name, value)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _forward(self, req, body: bytes) -> tuple[int, dict[str, str], str]:
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "content-length")}
        request = urllib.request.Request(self.moto_url + req.path, data=body, headers=headers, method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=30) as resp:
                return resp.status, dict(resp.headers.items()), resp.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers.items()), exc.read().decode("utf-8")

    def _parse(self, action: str, values: MultiDict) -> dict:
        request = {"values": values, "body": "", "headers": {}, "method": "POST", "url_params": {}, "url_path": "/"}
        return EC2QueryParser(self._model.operation_model(action)).parse(request)

    def _serializer(self, action: str) -> EC2Serializer:
        return EC2Serializer(self._model.operation_model(action), value_picker=XFormedAttributePicker())

    def _error(self, action: str, error: StandinError) -> tuple[int, dict[str, str], str]:
        out = self._serializer(action).serialize(EC2ClientError(error.code, error.message))
        return error.status, dict(out["headers"]), out["body"]

    def _answer(self, action: str, params: dict) -> tuple[int, dict[str, str], str]:
        try:
            with self._lock:
                result = getattr(self, "_" + action)(params)
        except StandinError as exc:
            return self._error(action, exc)
        out = self._serializer(action).serialize(result)
        return out["status_code"], dict(out["headers"]), out["body"]

    # -- the calls ----------------------------------------------------------------------------------
    def _interface(self, params: dict):
        eni_id = params.get("NetworkInterfaceId", "")
        try:
            return self.backend.get_network_interface(eni_id)
        except Exception:  # noqa: BLE001 - moto's own not-found error: answer EC2's code
            raise StandinError("InvalidNetworkInterfaceID.NotFound",
                               f"The networkInterface ID '{eni_id}' does not exist") from None

    def _check_instance(self, eni, version: int, adding: int) -> None:
        instance = eni.instance
        if instance is None:
            return
        info = INSTANCE_TYPES.get(instance.instance_type, {})
        # Bare-metal types list no hypervisor; they are Nitro systems and take prefixes.
        if info.get("Hypervisor", "nitro" if info.get("BareMetal") else "") != "nitro":
            raise StandinError("UnsupportedOperation", f"The instance type {instance.instance_type} does not "
                               "support prefix delegation")
        network = info.get("NetworkInfo", {})
        if version == 4:
            used = len(eni.private_ip_addresses) + len(getattr(eni, "ipv4_prefixes", []))
            limit = int(network.get("Ipv4AddressesPerInterface", 0))
        else:
            used = len(eni.ipv6_addresses) + len(getattr(eni, "ipv6_prefixes", []))
            limit = int(network.get("Ipv6AddressesPerInterface", 0))
        if used + adding > limit:
            raise StandinError("PrivateIpAddressLimitExceeded", f"Number of private addresses will exceed limit "
                               f"of {limit} for instance type {instance.instance_type}")

    def _subnet_enis(self, subnet_id: str) -> list:
        return [e for e in self.backend.get_all_network_interfaces()
                if e.subnet is not None and e.subnet.id == subnet_id]

    def _candidates(self, eni, version: int) -> list:
        """Free prefix-sized blocks of the interface's subnet, lowest first."""
        subnet = eni.subnet
        enis = self._subnet_enis(subnet.id)
        if version == 4:
            net = ipaddress.IPv4Network(subnet.cidr_block)
            reservations = list(getattr(subnet, "_cidr_reservations", []))
            ranges = [r.cidr for r in reservations if r.reservation_type == "prefix" and r.cidr.version == 4]
            explicit = [r.cidr for r in reservations if r.reservation_type == "explicit" and r.cidr.version == 4]
            used = {ipaddress.ip_address(p["PrivateIpAddress"]) for e in enis for p in e.private_ip_addresses}
            used |= {net.network_address + i for i in range(4)} | {net.broadcast_address}
            held = [ipaddress.ip_network(p["Ipv4Prefix"]) for e in enis for p in getattr(e, "ipv4_prefixes", [])]
            blocks = [b for r in (ranges or [net]) for b in r.subnets(new_prefix=28)]
            return [b for b in blocks if not any(a in b for a in used)
                    and not any(b.overlaps(x) for x in explicit + held)]
        assocs = [a["ipv6CidrBlock"] for a in subnet.ipv6_cidr_block_associations.values()]
        if not assocs:
            raise StandinError("InvalidParameterValue", f"subnet {subnet.id} has no IPv6 CIDR block")
        net6 = ipaddress.IPv6Network(assocs[0])
        used6 = {ipaddress.ip_address(a) for e in enis for a in e.ipv6_addresses}
        held6 = {ipaddress.ip_network(p["Ipv6Prefix"]) for e in enis for p in getattr(e, "ipv6_prefixes", [])}
        out = []
        for block in net6.subnets(new_prefix=80):      # a generator: stop at the first few free blocks
            if block not in held6 and not any(a in block for a in used6):
                out.append(block)
                if len(out) >= MAX_PER_CALL:
                    break
        return out

    def _assign(self, params: dict, version: int) -> list[str]:
        count_key, list_key = (("Ipv4PrefixCount", "Ipv4Prefixes") if version == 4
                               else ("Ipv6PrefixCount", "Ipv6Prefixes"))
        count, given = int(params.get(count_key) or 0), list(params.get(list_key) or [])
        if (count and given) or not 1 <= (count or len(given)) <= MAX_PER_CALL:
            raise StandinError("InvalidParameterValue", f"give either {count_key} (1-{MAX_PER_CALL}) or "
                               f"{list_key}, not both")
        eni = self._interface(params)
        self._check_instance(eni, version, count or len(given))
        free = self._candidates(eni, version)
        if given:
            wanted = [ipaddress.ip_network(g) for g in given]
            if not all(w in free for w in wanted):
                raise StandinError("InvalidParameterValue", f"some of {', '.join(given)} are in use or outside "
                                   "the subnet")
            chosen = wanted
        else:
            if len(free) < count:
                raise StandinError("InsufficientCidrBlocks", "The specified subnet does not have enough free cidr "
                                   "blocks to satisfy the request.")
            chosen = free[:count]
        key, field = ("ipv4_prefixes", "Ipv4Prefix") if version == 4 else ("ipv6_prefixes", "Ipv6Prefix")
        current = list(getattr(eni, key, []))
        current += [{field: str(c)} for c in chosen]
        setattr(eni, key, current)
        return [str(c) for c in chosen]

    def _unassign(self, params: dict, version: int) -> list[str]:
        eni = self._interface(params)
        key, field = ("ipv4_prefixes", "Ipv4Prefix") if version == 4 else ("ipv6_prefixes", "Ipv6Prefix")
        current = list(getattr(eni, key, []))
        held = {p[field] for p in current}
        asked = list(params.get("Ipv4Prefixes" if version == 4 else "Ipv6Prefixes") or [])
        missing = [a for a in asked if a not in held]
        if missing:
            raise StandinError("InvalidParameterValue", f"Some of the specified prefixes ({', '.join(missing)}) "
                               f"are not assigned to interface {eni.id}")
        setattr(eni, key, [p for p in current if p[field] not in asked])
        return asked

    def _AssignPrivateIpAddresses(self, params: dict) -> dict:   # noqa: N802 - EC2's action names
        assigned = self._assign(params, 4)
        return {"NetworkInterfaceId": params["NetworkInterfaceId"],
                "AssignedIpv4Prefixes": [{"Ipv4Prefix": p} for p in assigned]}

    def _UnassignPrivateIpAddresses(self, params: dict) -> dict:  # noqa: N802
        self._unassign(params, 4)
        return {}

    def _AssignIpv6Addresses(self, params: dict) -> dict:         # noqa: N802
        assigned = self._assign(params, 6)
        return {"NetworkInterfaceId": params["NetworkInterfaceId"], "AssignedIpv6Prefixes": assigned}

    def _UnassignIpv6Addresses(self, params: dict) -> dict:       # noqa: N802
        gone = self._unassign(params, 6)
        return {"NetworkInterfaceId": params["NetworkInterfaceId"], "UnassignedIpv6Prefixes": gone}
