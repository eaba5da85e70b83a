"""The `aliyun` prefix provider: IPv4 /28 and IPv6 /80 prefixes on this ECS instance's primary ENI.

Speaks the ECS OpenAPI 2014-05-26 (RPC, the same signed client as the VPC API, `vpcnet.cloud.aliyun.rpc`):
DescribeNetworkInterfaces (what the interface holds), AssignPrivateIpAddresses / UnassignPrivateIpAddresses
(`Ipv4PrefixCount`, `Ipv4Prefix.N`), AssignIpv6Addresses / UnassignIpv6Addresses (`Ipv6PrefixCount`,
`Ipv6Prefix.N`), DescribeInstances and DescribeInstanceTypes (capacity); and the VPC API's
ListVSwitchCidrReservations (the vSwitch's reserved ranges of type Prefix, for `vpcnet doctor`).

Endpoint: `VPCNET_ALIYUN_ECS_ENDPOINT`, else the VPC endpoint's neighbour (vpc.<region> -> ecs.<region>;
with no endpoint set at all, `https://ecs.<region>.aliyuncs.com/`). The interface is
`VPCNET_ALIYUN_NETWORK_INTERFACE_ID`, else instance metadata
`network/interfaces/macs/<primary mac>/network-interface-id`.

Retries cannot double-assign: every assign carries the caller's ClientToken, which Alibaba honours (the
same token and parameters get the first answer; other parameters `IdempotentFailed`), hence
`idempotent_assign`. Unassign treats a prefix already gone (`InvalidIp.IpUnassigned`) and a vanished
interface (`InvalidEniId.NotFound`) as done; since one gone prefix may refuse a whole call, the call is
then repeated once for the prefixes the interface still holds.

Capacity: a prefix takes one address slot of the interface. IPv4 prefixes = EniPrivateIpAddressQuantity
- 1 (the primary address) - secondary addresses; IPv6 prefixes = EniIpv6AddressQuantity - IPv6 addresses
the interface holds (the same rule). An instance type with no IPv4 slot to spare holds no prefix at all:
assign then raises PrefixesUnsupported rather than InterfaceFull. The addresses held come from the describe
the caller hands in (the pool's pass just made one: a boot's pass is then four calls), else from a describe
of its own; nothing is kept between calls.
"""
from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import requests

from vpcnet.cloud.aliyun.credentials import Credentials
from vpcnet.cloud.aliyun.metadata import Identity, Metadata
from vpcnet.cloud.aliyun.provider import ECS_API_VERSION, VPC_API_VERSION, _ecs_endpoint, _items
from vpcnet.cloud.aliyun.rpc import RpcClient, _hint, coded_error
from vpcnet.cloud.prefixes import (
    IPV4_PREFIX_LEN,
    IPV6_PREFIX_LEN,
    MAX_PER_CALL,
    InterfaceFull,
    InterfacePrefixes,
    NoFreePrefix,
    PrefixCapacity,
    PrefixesUnsupported,
    PrefixProvider,
)
from vpcnet.errors import Busy, Fatal, Retryable, VpcnetError

log = logging.getLogger(__name__)

MAX_PAGES = 20                      # ListVSwitchCidrReservations pages: far more ranges than a vSwitch has

# Error codes, compared case-insensitively (vpcnet.cloud.aliyun.rpc raised them; mapped again here).
NO_FREE_CODES = {"invalidvswitchid.ipnotenough"}
FULL_CODES = {"invalidoperation.ipv4countexceeded", "invalidoperation.ipv6countexceeded",
              "quotaexceeded.privateipaddress"}
BUSY_CODES = {"operation.conflict"}
GONE_CODES = {"invalidip.ipunassigned", "invalideniid.notfound"}
FORBIDDEN_PREFIXES = ("forbidden", "nopermission")
PERMISSIONS = ("ecs:DescribeNetworkInterfaces, ecs:AssignPrivateIpAddresses, ecs:UnassignPrivateIpAddresses, "
               "ecs:AssignIpv6Addresses, ecs:UnassignIpv6Addresses, ecs:DescribeInstances, "
               "ecs:DescribeInstanceTypes and vpc:ListVSwitchCidrReservations")
RESERVE_HINT = ("reserve a range of type Prefix in the vSwitch: VPC CreateVSwitchCidrReservation with "
                "VSwitchCidrReservationType=Prefix (e.g. `aliyun vpc CreateVSwitchCidrReservation --VSwitchId "
                "{vswitch} --VSwitchCidrReservationType Prefix --VSwitchCidrReservationMask 26`); growth "
                "pauses meanwhile")


class AliyunPrefixes(PrefixProvider):
    """The prefixes of this ECS instance's primary network interface."""

    name = "aliyun"
    idempotent_assign = True

    def __init__(self, config) -> None:
        self._config = config
        self._session = requests.Session()
        self._metadata = Metadata(config.aliyun_metadata_url, self._session)
        self._identity = Identity(config, self._metadata)
        self._credentials = Credentials(config, self._metadata)
        self._lock = threading.RLock()
        self._eni = ""
        self._vswitch = ""
        self._clients: dict[str, RpcClient] = {}

    def __repr__(self) -> str:
        return f"AliyunPrefixes(interface={self._eni or '?'!r}, credentials={self._credentials.source!r})"

    # -- clients and identity ------------------------------------------------------------------------
    def _vpc_endpoint(self) -> str:
        return self._config.aliyun_endpoint or f"https://vpc.{self._identity.region()}.aliyuncs.com/"

    def ecs_endpoint(self) -> str:
        return self._config.aliyun_ecs_endpoint or _ecs_endpoint(self._vpc_endpoint())

    def _rpc(self, kind: str) -> RpcClient:
        with self._lock:
            if kind not in self._clients:
                endpoint, version = ((self.ecs_endpoint(), ECS_API_VERSION) if kind == "ecs"
                                     else (self._vpc_endpoint(), VPC_API_VERSION))
                self._clients[kind] = RpcClient(self._session, endpoint, version, self._identity.region(),
                                                self._credentials)
            return self._clients[kind]

    @property
    def _ecs(self) -> RpcClient:
        return self._rpc("ecs")

    def _client(self) -> RpcClient:
        """The VPC API (ListVSwitchCidrReservations)."""
        return self._rpc("vpc")

    def interface_id(self) -> str:
        with self._lock:
            if not self._eni:
                self._eni = self._config.aliyun_network_interface_id or self._interface_from_metadata()
            return self._eni

    def _interface_from_metadata(self) -> str:
        mac = self._metadata.get("mac", "primary MAC address (VPCNET_ALIYUN_NETWORK_INTERFACE_ID)")
        eni = self._metadata.get(f"network/interfaces/macs/{mac}/network-interface-id",
                                 f"network interface id of MAC {mac} (VPCNET_ALIYUN_NETWORK_INTERFACE_ID)")
        if not eni:
            raise Fatal(f"instance metadata gave an empty network interface id for MAC {mac}: set "
                        "VPCNET_ALIYUN_NETWORK_INTERFACE_ID")
        log.info("aliyun network interface from instance metadata: %s", eni)
        return eni

    # -- errors --------------------------------------------------------------------------------------
    def _mapped(self, exc: VpcnetError, action: str, version: int) -> VpcnetError:
        """The prefix error for an API error (`exc` from RpcClient, carrying `.code`), or `exc` itself."""
        raw = str(getattr(exc, "code", "") or "")
        code = raw.lower()
        text = str(exc)
        hint = ": " + _hint(raw)
        if text.endswith(hint):          # rpc's hint for the VPC API's codes: not the one for these calls
            text = text[:-len(hint)]
        eni = self._eni or "the interface"
        if code in NO_FREE_CODES:
            if version == 6:
                return coded_error(NoFreePrefix, f"{text}: the vSwitch has no free IPv6 /{IPV6_PREFIX_LEN}: give "
                                   "the vSwitch an IPv6 CIDR, or free prefixes of other hosts", raw)
            reserve = RESERVE_HINT.format(vswitch=self._vswitch_or_placeholder())
            return coded_error(NoFreePrefix, f"{text}: the vSwitch has no free /{IPV4_PREFIX_LEN} in a reserved "
                               f"range: {reserve}", raw)
        if code in FULL_CODES:
            return coded_error(InterfaceFull, f"{text}: {eni} holds as many addresses and prefixes as its "
                               "instance type allows: release unused prefixes or use a larger instance type", raw)
        if code in BUSY_CODES:
            return coded_error(Busy, f"{text}: another operation on {eni} is in progress", raw)
        if code == "idempotentfailed":
            return coded_error(Fatal, f"{text}: a ClientToken was reused with other parameters (a vpcnet bug: "
                               "please report it)", raw)
        if code == "invalideniid.notfound":
            return coded_error(Fatal, f"{text}: {eni} does not exist: check VPCNET_ALIYUN_NETWORK_INTERFACE_ID "
                               "and VPCNET_ALIYUN_REGION_ID", raw)
        if code.startswith(FORBIDDEN_PREFIXES):
            return coded_error(Fatal, f"{text}: the RAM user or role lacks a permission: grant it {PERMISSIONS}",
                               raw)
        if code.startswith("invalidaction"):
            return coded_error(Fatal, f"{text}: the endpoint does not know this ECS call: check "
                               "VPCNET_ALIYUN_ECS_ENDPOINT", raw)
        if code.startswith("quotaexceeded"):        # rpc raised its route-table QuotaExceeded: not that here
            return coded_error(Fatal, text, raw)
        return exc

    def _vswitch_or_placeholder(self) -> str:
        """This interface's vSwitch, for a message (looked up if not known yet; never raises)."""
        if not self._vswitch:
            try:
                self._interface()
            except VpcnetError:
                pass
        return self._vswitch or "<vSwitch id>"

    @contextmanager
    def _errors(self, action: str, version: int = 4) -> Iterator[None]:
        """Turn an API error of `action` into the prefix error it means (others pass unchanged)."""
        try:
            yield
        except VpcnetError as exc:
            mapped = self._mapped(exc, action, version)
            if mapped is exc:
                raise
            raise mapped from None

    # -- what the interface holds --------------------------------------------------------------------
    def _interface(self) -> dict:
        eni = self.interface_id()
        with self._errors("DescribeNetworkInterfaces"):
            data = self._ecs.call("DescribeNetworkInterfaces", {"NetworkInterfaceId.1": eni})
        for item in _items(data, "NetworkInterfaceSets", "NetworkInterfaceSet"):
            if item.get("NetworkInterfaceId") == eni:
                with self._lock:
                    self._vswitch = str(item.get("VSwitchId") or "")
                return item
        raise Fatal(f"DescribeNetworkInterfaces does not list {eni}: check VPCNET_ALIYUN_NETWORK_INTERFACE_ID "
                    "and VPCNET_ALIYUN_REGION_ID")

    def describe(self) -> InterfacePrefixes:
        item = self._interface()
        ipv4 = [str(p.get("Ipv4Prefix")) for p in _items(item, "Ipv4PrefixSets", "Ipv4PrefixSet")
                if p.get("Ipv4Prefix")]
        ipv6 = [str(p.get("Ipv6Prefix")) for p in _items(item, "Ipv6PrefixSets", "Ipv6PrefixSet")
                if p.get("Ipv6Prefix")]
        addresses = [p for p in _items(item, "PrivateIpSets", "PrivateIpSet") if p.get("PrivateIpAddress")]
        addresses6 = [p for p in _items(item, "Ipv6Sets", "Ipv6Set") if p.get("Ipv6Address")]
        return InterfacePrefixes(interface_id=self.interface_id(), ipv4=tuple(ipv4), ipv6=tuple(ipv6),
                                 ipv4_addresses=max(1, len(addresses)), ipv6_addresses=len(addresses6))

    # -- assign and unassign -------------------------------------------------------------------------
    def assign(self, version: int, count: int, client_token: str) -> list[str]:
        _check_version(version)
        if not 1 <= count <= MAX_PER_CALL:
            raise ValueError(f"assign takes 1 to {MAX_PER_CALL} prefixes per call, not {count}")
        if not client_token:
            raise ValueError("assign needs a client token (retries must not assign twice)")
        eni = self.interface_id()
        params = {"NetworkInterfaceId": eni, "ClientToken": client_token}
        try:
            if version == 4:
                with self._errors("AssignPrivateIpAddresses", 4):
                    data = self._ecs.call("AssignPrivateIpAddresses", {**params, "Ipv4PrefixCount": str(count)})
                box = data.get("AssignedPrivateIpAddressesSet")
                prefixes = _strings(box.get("Ipv4PrefixSet") if isinstance(box, dict) else None, "Ipv4Prefixes")
            else:
                with self._errors("AssignIpv6Addresses", 6):
                    data = self._ecs.call("AssignIpv6Addresses", {**params, "Ipv6PrefixCount": str(count)})
                prefixes = _strings(data.get("Ipv6PrefixSets"), "Ipv6Prefix")
        except InterfaceFull:
            unsupported = self._no_room_at_all()
            if unsupported is not None:
                raise unsupported from None
            raise
        if len(prefixes) != count:
            # the call went through but its answer is not one vpcnet can trust: the caller retries with the
            # same token and gets the first answer again
            raise Retryable(f"{'AssignPrivateIpAddresses' if version == 4 else 'AssignIpv6Addresses'} on {eni} "
                            f"answered {len(prefixes)} prefixes for {count} asked: retrying with the same "
                            "ClientToken")
        return prefixes

    def _no_room_at_all(self) -> PrefixesUnsupported | None:
        """Full from the start: the instance type holds no prefix at all (None when it does, or when that
        cannot be told now: then the caller's InterfaceFull stands)."""
        try:
            cap = self.capacity()
        except VpcnetError as exc:
            log.info("cannot tell whether the instance type holds prefixes at all (%s)", exc)
            return None
        if cap.supported:
            return None
        return PrefixesUnsupported(f"instance type {cap.instance_type} cannot hold address prefixes: {cap.reason}; "
                                   "use an instance type with more private addresses per ENI, or "
                                   "VPCNET_ADDRESSING=route-table")

    def unassign(self, version: int, prefixes: Sequence[str]) -> None:
        _check_version(version)
        todo = list(dict.fromkeys(prefixes))
        for start in range(0, len(todo), MAX_PER_CALL):
            chunk = todo[start:start + MAX_PER_CALL]
            for attempt in (1, 2):
                try:
                    self._unassign_chunk(version, chunk)
                    break
                except Fatal as exc:
                    code = str(getattr(exc, "code", "") or "").lower()
                    if code not in GONE_CODES:
                        raise
                    if code == "invalideniid.notfound" or attempt == 2:
                        log.info("unassign: %s already gone (%s)", ", ".join(chunk), code)
                        break
                    # one gone prefix may refuse the whole call: once more for those still held
                    held = self.describe()
                    chunk = [p for p in chunk if p in (held.ipv4 if version == 4 else held.ipv6)]
                    if not chunk:
                        break

    def _unassign_chunk(self, version: int, chunk: list[str]) -> None:
        params = {"NetworkInterfaceId": self.interface_id()}
        name = "Ipv4Prefix" if version == 4 else "Ipv6Prefix"
        params.update({f"{name}.{i}": prefix for i, prefix in enumerate(chunk, 1)})
        if version == 4:
            with self._errors("UnassignPrivateIpAddresses", 4):
                self._ecs.call("UnassignPrivateIpAddresses", params)
        else:
            with self._errors("UnassignIpv6Addresses", 6):
                self._ecs.call("UnassignIpv6Addresses", params)

    # -- capacity and reserved ranges ----------------------------------------------------------------
    def capacity(self, held: InterfacePrefixes | None = None) -> PrefixCapacity:
        # the pass's own describe, when given: a boot's pass is then four calls, not five
        held = held if held is not None else self.describe()
        instance = self._identity.instance_id()
        with self._errors("DescribeInstances"):
            data = self._ecs.call("DescribeInstances", {"InstanceIds": json.dumps([instance]), "PageSize": "10"})
        kind = next((str(i.get("InstanceType") or "") for i in _items(data, "Instances", "Instance")
                     if i.get("InstanceId") == instance), "")
        if not kind:
            raise Fatal(f"DescribeInstances does not give the instance type of {instance}: check "
                        "VPCNET_ALIYUN_INSTANCE_ID and VPCNET_ALIYUN_REGION_ID")
        with self._errors("DescribeInstanceTypes"):
            types = self._ecs.call("DescribeInstanceTypes", {"InstanceTypes.1": kind})
        limits = next((t for t in _items(types, "InstanceTypes", "InstanceType") if t.get("InstanceTypeId") == kind),
                      None)
        if limits is None:
            return PrefixCapacity(kind, 0, 0, supported=False,
                                  reason=f"DescribeInstanceTypes does not list {kind}")
        ipv4 = _int(limits.get("EniPrivateIpAddressQuantity")) - 1 - (held.ipv4_addresses - 1)
        ipv6 = _int(limits.get("EniIpv6AddressQuantity")) - held.ipv6_addresses
        if ipv4 <= 0:
            return PrefixCapacity(kind, 0, max(ipv6, 0), supported=False,
                                  reason=f"its ENIs have {_int(limits.get('EniPrivateIpAddressQuantity'))} "
                                         f"private address slot(s) and {held.ipv4_addresses} are in use")
        return PrefixCapacity(kind, ipv4, max(ipv6, 0))

    def reserved_ranges(self, version: int = 4) -> list[str] | None:
        _check_version(version)
        try:
            self._interface()
            vswitch = self._vswitch
            ranges: list[str] = []
            token = ""
            for _page in range(MAX_PAGES):
                params = {"VSwitchId": vswitch, "IpVersion": f"IPv{version}", "MaxResults": "100"}
                if token:
                    params["NextToken"] = token
                data = self._client().call("ListVSwitchCidrReservations", params)
                found = data.get("VSwitchCidrReservations")
                for r in found if isinstance(found, list) else []:
                    if isinstance(r, dict) and str(r.get("Type", "")).lower() == "prefix":
                        ranges.append(str(r.get("VSwitchCidrReservationCidr")))
                token = str(data.get("NextToken") or "")
                if not token:
                    return ranges
            log.warning("ListVSwitchCidrReservations: more than %d pages for %s; showing the first", MAX_PAGES,
                        vswitch)
            return ranges
        except VpcnetError as exc:
            log.warning("cannot list the reserved ranges of this host's vSwitch (%s)", exc)
            return None

    def close(self) -> None:
        self._session.close()


def _check_version(version: int) -> None:
    if version not in (4, 6):
        raise ValueError(f"IP version must be 4 or 6, not {version!r}")


def _strings(box, key: str) -> list[str]:
    """`box[key]` as a list of strings (Alibaba sends a bare string for a list of one at times)."""
    value = box.get(key) if isinstance(box, dict) else None
    if isinstance(value, str):
        value = [value]
    return [str(v) for v in value if v] if isinstance(value, list) else []


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
