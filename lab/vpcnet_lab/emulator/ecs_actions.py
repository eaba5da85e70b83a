"""The ECS API's (2014-05-26) network-interface actions: request parsing and answer shapes.

The state and every decision live in `enis.py`; this module only reads RPC parameters and writes
Alibaba's answer shapes (names from the ECS SDK models and PROTOCOL.md, "ENI prefixes"). Note the two
shapes of an assign's answer: IPv4 prefixes nested in `AssignedPrivateIpAddressesSet.Ipv4PrefixSet.
Ipv4Prefixes`, IPv6 prefixes top-level in `Ipv6PrefixSets.Ipv6Prefix`.
"""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Callable

from vpcnet_lab.emulator.errors import ApiError, missing

if TYPE_CHECKING:
    from vpcnet_lab.emulator.state import Emulator

ECS_VERSION = "2014-05-26"


def numbered(p: dict, name: str) -> list[str]:
    """`Name.1=a`, `Name.2=b` -> [a, b] in index order (an RPC list of plain values)."""
    items = {}
    for key, value in p.items():
        if key.startswith(name + "."):
            index = key[len(name) + 1:]
            if not index.isdigit():
                raise ApiError("InvalidParameter", f"The parameter {key} is malformed.")
            items[int(index)] = value
    return [items[i] for i in sorted(items)]


def _count(p: dict, name: str) -> int:
    raw = p.get(name, "")
    if raw == "":
        return 0
    if not raw.isdigit():
        raise ApiError(f"InvalidParameter.{name}", f"The specified {name} {raw!r} is not an integer.")
    return int(raw)


def _prefix_request(p: dict, version: int) -> tuple[str, int, list[str]]:
    eni = p.get("NetworkInterfaceId", "")
    if not eni:
        raise missing("NetworkInterfaceId")
    count_name, list_name = ("Ipv4PrefixCount", "Ipv4Prefix") if version == 4 else ("Ipv6PrefixCount", "Ipv6Prefix")
    count, wanted = _count(p, count_name), numbered(p, list_name)
    if count and wanted:
        raise ApiError("InvalidParameter", f"{count_name} and {list_name}.N cannot be given together.")
    if not count and not wanted:
        raise missing(count_name)
    return eni, count, wanted


def _assign_private_ip_addresses(emu: Emulator, p: dict) -> dict:
    if p.get("SecondaryPrivateIpAddressCount") or numbered(p, "PrivateIpAddress"):
        raise ApiError("InvalidParameter", "The emulator assigns prefixes only (Ipv4PrefixCount, Ipv4Prefix.N).")
    eni, count, wanted = _prefix_request(p, 4)
    prefixes = emu.enis.assign(4, eni, count, wanted, p.get("ClientToken", ""))
    return {"AssignedPrivateIpAddressesSet": {"NetworkInterfaceId": eni, "PrivateIpSet": {"PrivateIpAddress": []},
                                              "Ipv4PrefixSet": {"Ipv4Prefixes": prefixes}}}


def _unassign_private_ip_addresses(emu: Emulator, p: dict) -> dict:
    if numbered(p, "PrivateIpAddress"):
        raise ApiError("InvalidParameter", "The emulator unassigns prefixes only (Ipv4Prefix.N).")
    emu.enis.unassign(4, p.get("NetworkInterfaceId", ""), numbered(p, "Ipv4Prefix"))
    return {}


def _assign_ipv6_addresses(emu: Emulator, p: dict) -> dict:
    if p.get("Ipv6AddressCount") or numbered(p, "Ipv6Address"):
        raise ApiError("InvalidParameter", "The emulator assigns prefixes only (Ipv6PrefixCount, Ipv6Prefix.N).")
    eni, count, wanted = _prefix_request(p, 6)
    prefixes = emu.enis.assign(6, eni, count, wanted, p.get("ClientToken", ""))
    return {"NetworkInterfaceId": eni, "Ipv6Sets": {"Ipv6Address": []}, "Ipv6PrefixSets": {"Ipv6Prefix": prefixes}}


def _unassign_ipv6_addresses(emu: Emulator, p: dict) -> dict:
    if numbered(p, "Ipv6Address"):
        raise ApiError("InvalidParameter", "The emulator unassigns prefixes only (Ipv6Prefix.N).")
    emu.enis.unassign(6, p.get("NetworkInterfaceId", ""), numbered(p, "Ipv6Prefix"))
    return {}


def _describe_network_interfaces(emu: Emulator, p: dict) -> dict:
    raw = p.get("MaxResults", "")
    if raw and (not raw.isdigit() or not 10 <= int(raw) <= 500):
        raise ApiError("InvalidParameter.MaxResults", "The specified MaxResults must be between 10 and 500.")
    max_results = int(raw) if raw else 10
    interfaces, token, total = emu.enis.describe(numbered(p, "NetworkInterfaceId"), p.get("InstanceId", ""),
                                                 max_results, p.get("NextToken", ""))
    return {"NetworkInterfaceSets": {"NetworkInterfaceSet": interfaces}, "NextToken": token,
            "TotalCount": total, "PageNumber": 1, "PageSize": max_results}


def _describe_instance_types(emu: Emulator, p: dict) -> dict:
    return {"InstanceTypes": {"InstanceType": emu.enis.describe_instance_types(numbered(p, "InstanceTypes"))},
            "NextToken": ""}


ECS_ACTIONS: dict[str, Callable[[Emulator, dict], dict]] = {
    "AssignPrivateIpAddresses": _assign_private_ip_addresses,
    "UnassignPrivateIpAddresses": _unassign_private_ip_addresses,
    "AssignIpv6Addresses": _assign_ipv6_addresses,
    "UnassignIpv6Addresses": _unassign_ipv6_addresses,
    "DescribeNetworkInterfaces": _describe_network_interfaces,
    "DescribeInstanceTypes": _describe_instance_types,
}


def list_vswitch_cidr_reservations(emu: Emulator, p: dict) -> dict:
    """The VPC API's (2016-04-28) ListVSwitchCidrReservations: a top-level `VSwitchCidrReservations` list
    (shape from the VPC SDK models; all on one page here)."""
    vswitch = p.get("VSwitchId", "")
    if not vswitch:
        raise missing("VSwitchId")
    found = emu.enis.list_reservations(vswitch, p.get("IpVersion", ""))
    return {"VSwitchCidrReservations": found, "TotalCount": len(found), "NextToken": "",
            "MaxResults": len(found)}


def create_vswitch_cidr_reservation(emu: Emulator, p: dict) -> dict:
    """The VPC API's (2016-04-28) CreateVSwitchCidrReservation by CIDR (`VSwitchCidrReservationCidr`; a
    `VSwitchCidrReservationMask` alone is not served), of type Prefix unless told. Assigned at once (the
    real call is asynchronous: Assigning, then Assigned)."""
    vswitch, cidr = p.get("VSwitchId", ""), p.get("VSwitchCidrReservationCidr", "")
    if not vswitch:
        raise missing("VSwitchId")
    if not cidr:
        raise missing("VSwitchCidrReservationCidr")
    kind = {"prefix": "Prefix", "explicit": "Explicit"}.get(p.get("VSwitchCidrReservationType", "").lower(),
                                                           "Prefix")
    version = p.get("IpVersion", "IPv4") or "IPv4"
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError:
        # the VPC API's documented form for a bad value (public error codes: IllegalParam.<name>)
        raise ApiError("IllegalParam.VSwitchCidrReservationCidr", f"The param of {cidr!r} is illegal.") from None
    if f"IPv{net.version}".lower() != version.lower():
        raise ApiError("IllegalParam.VSwitchCidrReservationCidr", f"{cidr} is not an {version} CIDR block.")
    try:
        reservation_id = emu.add_cidr_reservation(vswitch, str(net), kind)
    except ValueError as exc:             # smaller than a /28, or overlapping another reserved range
        raise ApiError("IllegalParam.VSwitchCidrReservationCidr", str(exc)) from None
    return {"VSwitchCidrReservationId": reservation_id, "VpcInstanceId": emu.vpc_id,
            "RegionId": emu.region}
