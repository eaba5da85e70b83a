"""ECS network interfaces and their address prefixes (the ECS API 2014-05-26 side of the emulator).

Every registered instance has one primary ENI (`eni-...`, a MAC in Alibaba's 00:16:3e range, Type
Primary, its vSwitch: the one whose CIDR holds the instance's underlay address, else the VPC's first).
Its IPv4 /28 prefixes come only from the vSwitch's reserved CIDR blocks of type Prefix (settable, listed
by the VPC API's ListVSwitchCidrReservations), its IPv6 /80s from the vSwitch's IPv6 CIDR (settable). An
instance type fixes how many address slots an interface has (DescribeInstanceTypes); a prefix takes one
slot, the primary address another.

A reserved range must lie inside its vSwitch's CIDR (IPv4) or IPv6 CIDR (IPv6), and a prefix asked for by
name (`Ipv4Prefix.N`, `Ipv6Prefix.N`) inside the interface's vSwitch's CIDR of its family, as a real VPC
requires; the codes of those two refusals are not documented anywhere found, so they are the closest
documented ones (see RESERVATION_OUTSIDE_VSWITCH and PREFIX_OUTSIDE_VSWITCH). The system-reserved addresses
of a vSwitch (its first and last three, IPv6 nine) are not modelled: a range may hold them here.

Errors are the real codes (names from the ECS SDK models and Terway); which of the two "full" codes the
real API gives when is not documented: here `QuotaExceeded.PrivateIpAddress` when no IPv4 slot is left at
all, `InvalidOperation.Ipv4CountExceeded` when some are but fewer than asked (IPv6: always
`InvalidOperation.Ipv6CountExceeded`). Unassigning a prefix the interface does not hold refuses the whole
call (`InvalidIp.IpUnassigned`), the pessimistic reading, so a client must cope with it.

A ClientToken makes an assign idempotent: the same token with the same parameters gets the first answer
again, with other parameters `IdempotentFailed`. `hold(eni, seconds)` makes every write to an interface
answer `Operation.Conflict` meanwhile (a concurrent operation, as the real API has).

The router delivers every address of a prefix to its instance: `kernel_routes()` gives
`prefix -> underlay address` (IPv6 prefixes via the instance's IPv6 underlay address), mirrored into the
router namespace as route entries are.
"""
from __future__ import annotations

import hashlib
import ipaddress
import threading
import time
from typing import Callable

from vpcnet_lab.emulator.errors import ApiError, missing

IPV4_PREFIX_LEN = 28
IPV6_PREFIX_LEN = 80
MAX_PER_CALL = 10
MAX_CLIENT_TOKENS = 10000
#: CreateVSwitchCidrReservation of a range outside the vSwitch's CIDR: no code is documented for it; this is
#: the VPC API's documented code for an address that does not belong to the vSwitch named
#: (CheckCanAllocateVpcPrivateIpAddress: "The vswitch and privateIpAddress are mismatched").
RESERVATION_OUTSIDE_VSWITCH = "Mismatch.VSwitchAndPrivateIpAddress"
#: Ipv4Prefix.N / Ipv6Prefix.N outside the interface's vSwitch: no prefix code is documented; this is the ECS
#: API's documented code for an address outside the vSwitch's CIDR (ModifyInstanceVpcAttribute: "Specified
#: private IP address is not in the CIDR block of virtual switch").
PREFIX_OUTSIDE_VSWITCH = "InvalidPrivateIpAddress.Mismatch"
DEFAULT_INSTANCE_TYPE = "ecs.g7.large"
#: Instance types the emulator knows, with the DescribeInstanceTypes limits vpcnet reads (figures of the
#: real families' small sizes; the last one has a single address slot: no room for any prefix).
INSTANCE_TYPES: dict[str, dict[str, int]] = {
    "ecs.g7.large": {"EniQuantity": 3, "EniPrivateIpAddressQuantity": 6, "EniIpv6AddressQuantity": 6},
    "ecs.g7.xlarge": {"EniQuantity": 4, "EniPrivateIpAddressQuantity": 15, "EniIpv6AddressQuantity": 15},
    "ecs.g7.2xlarge": {"EniQuantity": 6, "EniPrivateIpAddressQuantity": 15, "EniIpv6AddressQuantity": 15},
    "ecs.t5-lc1m1.small": {"EniQuantity": 1, "EniPrivateIpAddressQuantity": 1, "EniIpv6AddressQuantity": 0},
}


def _derived(seed: str, size: int) -> bytes:
    return hashlib.sha256(seed.encode()).digest()[:size]


def eni_id_of(instance_id: str) -> str:
    """The primary ENI id of an instance: derived from its id, so it survives a restart of the emulator."""
    return "eni-emu" + _derived("eni:" + instance_id, 8).hex()


def mac_of(instance_id: str) -> str:
    tail = _derived("mac:" + instance_id, 3)
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in tail)


def _within(prefix: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Whether `prefix` lies inside `net` (of either family)."""
    inner = ipaddress.ip_network(prefix)
    return (inner.version == net.version and int(inner.network_address) >= int(net.network_address)
            and int(inner.broadcast_address) <= int(net.broadcast_address))


class NetworkInterfaces:
    """`enis` (eni id -> interface dict), the reserved ranges, vSwitch IPv6 CIDRs and ClientTokens, guarded
    by `lock` (shared with the rest of the emulator); `changed()` is called with it held after a change.
    `vswitch_of(ip)` names the vSwitch an underlay address is in; `vswitch_cidr(vsw)` gives a vSwitch's
    IPv4 CIDR ("" for an unknown vSwitch)."""

    def __init__(self, lock: threading.RLock, changed: Callable[[], None], *, region: str, vpc_id: str,
                 vswitch_of: Callable[[str], str], vswitch_cidr: Callable[[str], str],
                 clock: Callable[[], float] | None = None):
        self._lock = lock
        self._changed = changed
        self.region = region
        self.vpc_id = vpc_id
        self._vswitch_of = vswitch_of
        self._vswitch_cidr = vswitch_cidr
        self._clock = clock or time.monotonic
        self.enis: dict[str, dict] = {}
        self.instance_types: dict[str, str] = {}       # instance id -> instance type
        self.reservations: dict[str, list[dict]] = {}  # vSwitch id -> reserved CIDR blocks
        self.vswitch_ipv6: dict[str, str] = {}         # vSwitch id -> its IPv6 CIDR
        self.client_tokens: dict[str, dict] = {}       # token -> {"fingerprint": [...], "answer": [...]}
        self._held: dict[str, float] = {}              # eni id -> until when writes conflict (not persisted)

    # ------------------------------------------------------------------ instances and settings

    def attach_primary(self, instance_id: str, underlay_ip: str, underlay_ip6: str = "",
                       instance_type: str = "") -> None:
        """Give an instance its primary ENI (kept with its prefixes when it is registered again)."""
        kind = instance_type or self.instance_types.get(instance_id) or DEFAULT_INSTANCE_TYPE
        if kind not in INSTANCE_TYPES:
            raise ValueError(f"unknown instance type {kind!r}; known: {', '.join(INSTANCE_TYPES)}")
        with self._lock:
            self.instance_types[instance_id] = kind
            eni_id = eni_id_of(instance_id)
            eni = self.enis.get(eni_id)
            if eni is None:
                eni = {"id": eni_id, "instance": instance_id, "mac": mac_of(instance_id),
                       "vswitch": self._vswitch_of(underlay_ip), "ipv4_prefixes": [], "ipv6_prefixes": []}
                self.enis[eni_id] = eni
            eni["ip"], eni["ip6"] = underlay_ip, underlay_ip6
            self._changed()

    def detach_instance(self, instance_id: str) -> None:
        """The instance is released: so is its primary ENI, and its prefixes return to the pool."""
        with self._lock:
            if self.enis.pop(eni_id_of(instance_id), None) is not None:
                self._changed()

    def add_reservation(self, vswitch_id: str, cidr: str, kind: str = "Prefix") -> str:
        """A reserved CIDR block of the vSwitch (`kind` Prefix: where IPv4 prefixes come from), inside the
        vSwitch's CIDR of its family (ApiError otherwise, as CreateVSwitchCidrReservation answers)."""
        net = ipaddress.ip_network(cidr, strict=True)
        if net.version == 4 and net.prefixlen > IPV4_PREFIX_LEN:
            raise ValueError(f"a reserved range must hold at least one /{IPV4_PREFIX_LEN}, not {cidr}")
        with self._lock:
            home = self._vswitch_cidr(vswitch_id)
            if not home:
                raise ApiError("InvalidVSwitchId.NotFound", f"The specified vSwitch {vswitch_id} does not exist.",
                               404)
            if net.version == 6:
                home = self.vswitch_ipv6.get(vswitch_id, "")
            if not home or not _within(str(net), ipaddress.ip_network(home)):
                raise ApiError(RESERVATION_OUTSIDE_VSWITCH, f"The reserved CIDR block {net} is not inside the "
                               f"IPv{net.version} CIDR block of vSwitch {vswitch_id} ({home or 'none'}).")
            taken = self.reservations.setdefault(vswitch_id, [])
            for other in taken:
                if (other["cidr"], other["type"]) == (str(net), kind):    # again (a restart on a state file)
                    return str(other["id"])
                if ipaddress.ip_network(other["cidr"]).overlaps(net):
                    raise ValueError(f"{cidr} overlaps the reserved range {other['cidr']} of {vswitch_id}")
            reservation_id = "vcr-emu" + _derived(f"vcr:{vswitch_id}:{net}", 8).hex()
            taken.append({"id": reservation_id, "cidr": str(net), "type": kind,
                          "ip_version": f"IPv{net.version}"})
            self._changed()
            return reservation_id

    def set_vswitch_ipv6(self, vswitch_id: str, cidr: str) -> None:
        net = ipaddress.IPv6Network(cidr, strict=True)
        if net.prefixlen > IPV6_PREFIX_LEN:
            raise ValueError(f"a vSwitch IPv6 CIDR must hold /{IPV6_PREFIX_LEN}s, not {cidr}")
        with self._lock:
            self.vswitch_ipv6[vswitch_id] = str(net)
            self._changed()

    def hold(self, eni_id: str, seconds: float) -> None:
        """Writes to `eni_id` answer Operation.Conflict for `seconds` (another operation in progress)."""
        with self._lock:
            self._held[eni_id] = self._clock() + float(seconds)

    # ------------------------------------------------------------------ reading

    def _eni(self, eni_id: str) -> dict:
        if not eni_id:
            raise missing("NetworkInterfaceId")
        eni = self.enis.get(eni_id)
        if eni is None:
            raise ApiError("InvalidEniId.NotFound", f"The specified NetworkInterfaceId {eni_id} does not exist.",
                           404)
        return eni

    def _public(self, eni: dict) -> dict:
        ipv6 = [{"Ipv6Address": eni["ip6"]}] if eni.get("ip6") else []
        return {
            "NetworkInterfaceId": eni["id"], "Status": "InUse", "Type": "Primary", "InstanceId": eni["instance"],
            "VpcId": self.vpc_id, "VSwitchId": eni["vswitch"], "ZoneId": f"{self.region}-a",
            "MacAddress": eni["mac"], "PrivateIpAddress": eni["ip"], "NetworkInterfaceName": "",
            "Description": "", "ResourceGroupId": "",
            "PrivateIpSets": {"PrivateIpSet": [{"PrivateIpAddress": eni["ip"], "Primary": True}]},
            "Ipv6Sets": {"Ipv6Set": ipv6},
            "Ipv4PrefixSets": {"Ipv4PrefixSet": [{"Ipv4Prefix": p} for p in eni["ipv4_prefixes"]]},
            "Ipv6PrefixSets": {"Ipv6PrefixSet": [{"Ipv6Prefix": p} for p in eni["ipv6_prefixes"]]},
        }

    def describe(self, eni_ids: list[str], instance_id: str, max_results: int,
                 next_token: str) -> tuple[list[dict], str, int]:
        """(interfaces of this page, the next page's token or "", how many match in all)."""
        with self._lock:
            found = [e for e in sorted(self.enis.values(), key=lambda e: e["id"])
                     if (not eni_ids or e["id"] in eni_ids) and (not instance_id or e["instance"] == instance_id)]
            start = 0
            if next_token:
                if not next_token.isdigit() or int(next_token) > len(found):
                    raise ApiError("InvalidNextToken.Malformed", "The specified NextToken is not valid.")
                start = int(next_token)
            page = found[start:start + max_results]
            rest = start + max_results
            return [self._public(e) for e in page], (str(rest) if rest < len(found) else ""), len(found)

    def describe_instance_types(self, names: list[str]) -> list[dict]:
        return [{"InstanceTypeId": name, "InstanceTypeFamily": name.rsplit(".", 1)[0], **limits}
                for name, limits in INSTANCE_TYPES.items() if not names or name in names]

    def instance_type(self, instance_id: str) -> str:
        with self._lock:
            return self.instance_types.get(instance_id, DEFAULT_INSTANCE_TYPE)

    def list_reservations(self, vswitch_id: str, ip_version: str) -> list[dict]:
        with self._lock:
            out = []
            for r in self.reservations.get(vswitch_id, []):
                if ip_version and r["ip_version"].lower() != ip_version.lower():
                    continue
                net = ipaddress.ip_network(r["cidr"])
                size = IPV4_PREFIX_LEN if net.version == 4 else IPV6_PREFIX_LEN
                total = 2 ** (size - net.prefixlen) if r["type"] == "Prefix" else 0
                used = len([p for p in self._all_prefixes(net.version) if _within(p, net)])
                out.append({"VSwitchCidrReservationId": r["id"], "VSwitchCidrReservationCidr": r["cidr"],
                            "Type": r["type"], "IpVersion": r["ip_version"], "Status": "Assigned",
                            "VSwitchId": vswitch_id, "VpcId": self.vpc_id, "AssignedCidrCount": used,
                            "AvailableCidrCount": max(0, total - used), "VSwitchCidrReservationName": "",
                            "VSwitchCidrReservationDescription": "", "CreationTime": "", "Tags": []})
            return out

    def _all_prefixes(self, version: int) -> list[str]:
        key = "ipv4_prefixes" if version == 4 else "ipv6_prefixes"
        return [p for e in self.enis.values() for p in e[key]]

    def kernel_routes(self) -> dict[str, str]:
        """prefix -> the owning instance's underlay address of the prefix's family (none without one)."""
        with self._lock:
            routes = {}
            for eni in self.enis.values():
                for prefix in eni["ipv4_prefixes"]:
                    routes[prefix] = eni["ip"]
                if eni.get("ip6"):
                    for prefix in eni["ipv6_prefixes"]:
                        routes[prefix] = eni["ip6"]
            return routes

    # ------------------------------------------------------------------ writing

    def _check_free(self, eni: dict) -> None:
        if self._held.get(eni["id"], 0.0) > self._clock():
            raise ApiError("Operation.Conflict", f"Another operation on {eni['id']} is in progress; try "
                           "again later.")

    def _limits(self, eni: dict) -> dict[str, int]:
        return INSTANCE_TYPES[self.instance_types.get(eni["instance"], DEFAULT_INSTANCE_TYPE)]

    def assign(self, version: int, eni_id: str, count: int, wanted: list[str], client_token: str) -> list[str]:
        """Assign `count` new prefixes, or exactly `wanted`, of IP `version` to the interface."""
        with self._lock:
            fingerprint = [version, eni_id, count, sorted(wanted)]
            if client_token:
                seen = self.client_tokens.get(client_token)
                if seen is not None:
                    if seen["fingerprint"] != fingerprint:
                        raise ApiError("IdempotentFailed", "The request uses the same ClientToken as a previous, "
                                       "but non-identical request.")
                    return list(seen["answer"])
            eni = self._eni(eni_id)
            self._check_free(eni)
            asked = len(wanted) or count
            if not 1 <= asked <= MAX_PER_CALL:
                name = "Ipv4PrefixCount" if version == 4 else "Ipv6PrefixCount"
                raise ApiError(f"InvalidParameter.{name}", f"The number of prefixes must be between 1 and "
                               f"{MAX_PER_CALL}.")
            self._check_room(version, eni, asked)
            pool = self._pool(version, eni)
            if wanted:
                prefixes = [self._check_wanted(version, p, pool, eni) for p in wanted]
            else:
                prefixes = self._free(version, pool, asked)
            eni["ipv4_prefixes" if version == 4 else "ipv6_prefixes"].extend(prefixes)
            if client_token:
                self.client_tokens[client_token] = {"fingerprint": fingerprint, "answer": prefixes}
                while len(self.client_tokens) > MAX_CLIENT_TOKENS:
                    del self.client_tokens[next(iter(self.client_tokens))]
            self._changed()
            return list(prefixes)

    def _check_room(self, version: int, eni: dict, asked: int) -> None:
        limits = self._limits(eni)
        if version == 4:
            free = limits["EniPrivateIpAddressQuantity"] - 1 - len(eni["ipv4_prefixes"])
            if free <= 0:
                raise ApiError("QuotaExceeded.PrivateIpAddress", f"The private IP addresses of {eni['id']} "
                               "have reached the quota of its instance type.")
            if asked > free:
                raise ApiError("InvalidOperation.Ipv4CountExceeded", f"{eni['id']} can hold {free} more IPv4 "
                               f"addresses or prefixes, not {asked}.")
        else:
            held6 = len(eni["ipv6_prefixes"]) + (1 if eni.get("ip6") else 0)
            free = limits["EniIpv6AddressQuantity"] - held6
            if asked > free:
                raise ApiError("InvalidOperation.Ipv6CountExceeded", f"{eni['id']} can hold {max(free, 0)} "
                               f"more IPv6 addresses or prefixes, not {asked}.")

    def _pool(self, version: int, eni: dict) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """Where this interface's new prefixes may come from."""
        if version == 4:
            return [ipaddress.ip_network(r["cidr"]) for r in self.reservations.get(eni["vswitch"], [])
                    if r["type"] == "Prefix" and r["ip_version"] == "IPv4"]
        cidr = self.vswitch_ipv6.get(eni["vswitch"])
        return [ipaddress.ip_network(cidr)] if cidr else []

    def _free(self, version: int, pool: list, count: int) -> list[str]:
        size = IPV4_PREFIX_LEN if version == 4 else IPV6_PREFIX_LEN
        taken = set(self._all_prefixes(version))
        # an IPv6 /80 comes from the vSwitch's /64, where instances have their own addresses: never over one
        # (a reserved IPv4 range holds none by definition)
        addresses = [ipaddress.ip_address(e["ip6"]) for e in self.enis.values() if e.get("ip6")] if version == 6 else []
        out: list[str] = []
        for net in pool:
            step = 2 ** (net.max_prefixlen - size)
            for index in range(2 ** (size - net.prefixlen)):
                network = ipaddress.ip_network((int(net.network_address) + index * step, size))
                candidate = str(network)
                if candidate not in taken and not any(a in network for a in addresses):
                    out.append(candidate)
                    if len(out) == count:
                        return out
                if index > 65536:        # an IPv6 /64 holds 65536 /80s: never scan beyond that
                    break
        what = (f"no free /{IPV4_PREFIX_LEN} in a reserved CIDR block of type Prefix" if version == 4 else
                f"no free /{IPV6_PREFIX_LEN} in the IPv6 CIDR")
        raise ApiError("InvalidVSwitchId.IpNotEnough", f"The specified vSwitch has not enough free IP "
                       f"addresses ({what}).")

    def _check_wanted(self, version: int, prefix: str, pool: list, eni: dict) -> str:
        size = IPV4_PREFIX_LEN if version == 4 else IPV6_PREFIX_LEN
        try:
            net = ipaddress.ip_network(prefix, strict=True)
        except ValueError:
            raise ApiError("InvalidParameter", f"The specified prefix {prefix!r} is malformed.") from None
        if net.version != version or net.prefixlen != size:
            raise ApiError("InvalidParameter", f"The specified prefix {prefix} is not an IPv{version} /{size}.")
        home = self._vswitch_cidr(eni["vswitch"]) if version == 4 else self.vswitch_ipv6.get(eni["vswitch"], "")
        if not home or not _within(str(net), ipaddress.ip_network(home)):
            raise ApiError(PREFIX_OUTSIDE_VSWITCH, f"The specified prefix {prefix} is not in the CIDR block of "
                           f"vSwitch {eni['vswitch']} ({home or f'no IPv{version} CIDR'}).")
        if not any(_within(str(net), p) for p in pool):
            raise ApiError("InvalidVSwitchId.IpNotEnough", f"The specified prefix {prefix} is not in a range "
                           "the vSwitch assigns prefixes from.")
        if str(net) in self._all_prefixes(version):
            raise ApiError("InvalidIp.IpAssigned", f"The specified prefix {prefix} is already assigned.")
        return str(net)

    def unassign(self, version: int, eni_id: str, prefixes: list[str]) -> None:
        if not prefixes:
            raise missing("Ipv4Prefix.1" if version == 4 else "Ipv6Prefix.1")
        with self._lock:
            eni = self._eni(eni_id)
            self._check_free(eni)
            key = "ipv4_prefixes" if version == 4 else "ipv6_prefixes"
            held = set(eni[key])
            wanted = []
            for p in prefixes:
                try:
                    wanted.append(str(ipaddress.ip_network(p, strict=True)))
                except ValueError:
                    raise ApiError("InvalidParameter", f"The specified prefix {p!r} is malformed.") from None
            gone = [p for p in wanted if p not in held]
            if gone:
                raise ApiError("InvalidIp.IpUnassigned", f"The specified prefix {gone[0]} is not assigned to "
                               f"{eni_id}.")
            eni[key] = [p for p in eni[key] if p not in wanted]
            self._changed()

    # ------------------------------------------------------------------ state file

    def dump(self) -> dict:
        return {"enis": self.enis, "instance_types": self.instance_types, "reservations": self.reservations,
                "vswitch_ipv6": self.vswitch_ipv6, "eni_client_tokens": self.client_tokens}

    def restore(self, data: dict) -> None:
        self.enis = {k: dict(v) for k, v in data.get("enis", {}).items()}
        self.instance_types = dict(data.get("instance_types", {}))
        self.reservations = {k: [dict(r) for r in v] for k, v in data.get("reservations", {}).items()}
        self.vswitch_ipv6 = dict(data.get("vswitch_ipv6", {}))
        self.client_tokens = dict(data.get("eni_client_tokens", {}))
