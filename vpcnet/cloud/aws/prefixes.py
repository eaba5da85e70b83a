"""The `aws` prefix provider: IPv4 /28 and IPv6 /80 prefixes on this instance's primary network interface
(`VPCNET_ADDRESSING=eni-prefix`), through the same botocore client as the route provider (`client`).

Calls: DescribeNetworkInterfaces (what the interface holds, and its subnet), AssignPrivateIpAddresses
(`Ipv4PrefixCount`) and UnassignPrivateIpAddresses (`Ipv4Prefix.N`), AssignIpv6Addresses (`Ipv6PrefixCount`)
and UnassignIpv6Addresses (`Ipv6Prefix.N`), DescribeInstanceTypes (capacity), DescribeInstances (the
instance type when this instance's id is configured rather than read from metadata) and
GetSubnetCidrReservations (the subnet's reserved ranges of type prefix, for `vpcnet doctor`). The IAM policy
of eni-prefix mode lists exactly these (docs/deploy-aws.md).

The interface: `VPCNET_AWS_NETWORK_INTERFACE_ID`, else IMDS `network/interfaces/macs/<mac>/interface-id` of
the instance's `mac` (its primary interface).

No client token on AWS: AssignPrivateIpAddresses and AssignIpv6Addresses have none (`idempotent_assign` is
False). An assign whose answer is lost (connection dropped, timeout, 5xx) raises `Retryable` and may have
assigned prefixes; the caller lists the interface before and after and adopts exactly what appeared.

Capacity: `DescribeInstanceTypes`. Each IPv4 prefix takes one of the interface's `Ipv4AddressesPerInterface`
slots and the primary address takes one, so at most `Ipv4AddressesPerInterface - 1` IPv4 prefixes; IPv6
prefixes take `Ipv6AddressesPerInterface` slots. Only Nitro instances take prefixes: `Hypervisor` is `nitro`,
or absent on bare-metal types (which are Nitro systems too); `xen` means no prefixes at all.

Errors: `InsufficientCidrBlocks` / `InsufficientFreeAddressesInSubnet` -> NoFreePrefix (reserve a range of
type prefix), `PrivateIpAddressLimitExceeded` -> InterfaceFull, `UnsupportedOperation` on an assign ->
PrefixesUnsupported, throttling -> Busy, 5xx and lost answers -> Retryable (`client.ApiError.mapped`).
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

import botocore.session

from vpcnet.cloud.aws.client import ApiError, Ec2Client
from vpcnet.cloud.aws.metadata import Identity, Imds
from vpcnet.cloud.prefixes import (
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

MAX_PAGES = 20                                      # bound on the reservations listing
NO_FREE_CODES = frozenset({"InsufficientCidrBlocks", "InsufficientFreeAddressesInSubnet"})
FULL_CODES = frozenset({"PrivateIpAddressLimitExceeded"})
UNSUPPORTED_CODES = frozenset({"UnsupportedOperation"})
DENIED_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})
INTERFACE_GONE = "InvalidNetworkInterfaceID.NotFound"
RESERVE_HINT = ("reserve a range of type prefix in the subnet (`aws ec2 create-subnet-cidr-reservation "
                "--subnet-id {subnet} --cidr <CIDR> --reservation-type prefix`), or free addresses in it")
INTERFACE_HINT = "set VPCNET_AWS_NETWORK_INTERFACE_ID to this instance's primary network interface"


class AwsPrefixes(PrefixProvider):
    """The prefixes of this EC2 instance's primary network interface."""

    name = "aws"
    idempotent_assign = False        # EC2's assign calls take no client token

    def __init__(self, config, session: botocore.session.Session | None = None):
        self.config = config
        self._imds = Imds(config.aws_metadata_url)
        self._identity = Identity(config, self._imds)
        self._ec2 = Ec2Client(config, self._imds.url, self._identity.region, session)
        self._interface = getattr(config, "aws_network_interface_id", "")
        self._subnet = ""
        self._capacity: PrefixCapacity | None = None   # an instance type cannot change while it runs
        self._lock = threading.Lock()

    # -- identity ---------------------------------------------------------------------------------
    def interface_id(self) -> str:
        with self._lock:
            if not self._interface:
                try:
                    mac = self._imds.get("/latest/meta-data/mac")
                    self._interface = self._imds.get(f"/latest/meta-data/network/interfaces/macs/{mac}/interface-id")
                except Fatal as exc:
                    raise Fatal(f"{exc}; or {INTERFACE_HINT}") from None
            return self._interface

    def _instance_type(self) -> str:
        """From IMDS, unless this instance's id is configured (metadata then may be out of reach)."""
        instance = getattr(self.config, "aws_instance_id", "")
        if not instance:
            return self._imds.get("/latest/meta-data/instance-type")
        resp = self._call(f"describe instance {instance}", "describe_instances", InstanceIds=[instance])
        types = {i.get("InstanceType", "") for r in resp.get("Reservations", []) or []
                 for i in r.get("Instances", []) or [] if i.get("InstanceId") == instance}
        types.discard("")
        if len(types) != 1:
            raise Fatal(f"EC2 does not list instance {instance} (VPCNET_AWS_INSTANCE_ID): cannot tell its type")
        return types.pop()

    # -- EC2 --------------------------------------------------------------------------------------
    def _call(self, what: str, op: str, **params):
        try:
            return self._ec2.api(what, op, **params)
        except ApiError as exc:
            raise self._mapped(exc) from None

    def _mapped(self, exc: ApiError) -> VpcnetError:
        text = f"{exc.what}: EC2 answered {exc.code}: {exc.message}"
        if exc.code == INTERFACE_GONE:
            return Fatal(f"{text}: network interface {self._interface} does not exist; {INTERFACE_HINT}")
        if exc.code in DENIED_CODES:
            return Fatal(f"{text}: the instance's IAM policy must allow this call (docs/deploy-aws.md, the "
                         "eni-prefix policy)")
        return exc.mapped()

    # -- the interface ------------------------------------------------------------------------------
    def describe(self) -> InterfacePrefixes:
        eni = self.interface_id()
        resp = self._call(f"describe network interface {eni}", "describe_network_interfaces",
                          NetworkInterfaceIds=[eni])
        found = [i for i in resp.get("NetworkInterfaces", []) or [] if i.get("NetworkInterfaceId") == eni]
        if not found:
            raise Fatal(f"EC2 does not list network interface {eni}; {INTERFACE_HINT}")
        described = found[0]
        self._subnet = described.get("SubnetId", "") or self._subnet
        return InterfacePrefixes(
            interface_id=eni,
            ipv4=tuple(p["Ipv4Prefix"] for p in described.get("Ipv4Prefixes", []) or [] if p.get("Ipv4Prefix")),
            ipv6=tuple(p["Ipv6Prefix"] for p in described.get("Ipv6Prefixes", []) or [] if p.get("Ipv6Prefix")),
            ipv4_addresses=len(described.get("PrivateIpAddresses", []) or []) or 1,
            ipv6_addresses=len(described.get("Ipv6Addresses", []) or []))

    def assign(self, version: int, count: int, client_token: str) -> list[str]:
        """`client_token` is not sent: EC2 has none for these calls (see the module docstring)."""
        if version not in (4, 6) or not 1 <= count <= MAX_PER_CALL:
            raise ValueError(f"assign: IP version 4 or 6 and 1..{MAX_PER_CALL} prefixes, not {version}/{count}")
        eni = self.interface_id()
        what = f"assign {count} IPv{version} prefix(es) to {eni}"
        error: VpcnetError
        try:
            if version == 4:
                resp = self._ec2.api(what, "assign_private_ip_addresses", NetworkInterfaceId=eni,
                                     Ipv4PrefixCount=count)
                return [p["Ipv4Prefix"] for p in resp.get("AssignedIpv4Prefixes", []) or [] if p.get("Ipv4Prefix")]
            resp = self._ec2.api(what, "assign_ipv6_addresses", NetworkInterfaceId=eni, Ipv6PrefixCount=count)
            return [str(p) for p in resp.get("AssignedIpv6Prefixes", []) or []]
        except ApiError as exc:
            error = self._assign_error(exc, version)
        except Retryable as exc:        # timeout, dropped connection: the answer is lost
            error = exc
        if isinstance(error, Retryable) and not isinstance(error, Busy):
            error = Retryable(f"{error} (the assign may have taken effect: list the interface and adopt the "
                              "prefixes that appeared)")
        raise error from None

    def _assign_error(self, exc: ApiError, version: int) -> VpcnetError:
        text = f"{exc.what}: EC2 answered {exc.code}: {exc.message}"
        if exc.code in NO_FREE_CODES:
            subnet = self._subnet or "<subnet>"
            return NoFreePrefix(f"{text}: subnet {subnet} has no free /{28 if version == 4 else 80} block; "
                                + RESERVE_HINT.format(subnet=subnet))
        if exc.code in FULL_CODES:
            return InterfaceFull(f"{text}: the interface holds as many addresses and prefixes as its instance "
                                 "type allows (DescribeInstanceTypes, Ipv4AddressesPerInterface); free some, or "
                                 "use a larger instance type")
        if exc.code in UNSUPPORTED_CODES:
            return PrefixesUnsupported(f"{text}: this instance cannot hold prefixes (EC2 assigns them to Nitro "
                                       "instances only); use a Nitro instance type, or VPCNET_ADDRESSING=route-table")
        return self._mapped(exc)

    def unassign(self, version: int, prefixes: Sequence[str]) -> None:
        if version not in (4, 6):
            raise ValueError(f"unassign: IP version 4 or 6, not {version}")
        wanted = list(prefixes)
        # A prefix already gone makes EC2 refuse the whole call (with a code it does not document for
        # prefixes; InvalidParameterValue for addresses), and gone is what we want: on a refusal that is
        # not "not now" nor "not allowed", the second round takes only what the interface still holds.
        for attempt in range(2):
            if not wanted:
                return
            try:
                self._unassign_call(version, wanted)
                return
            except ApiError as exc:
                if exc.code == INTERFACE_GONE:
                    log.warning("aws: network interface %s is gone, and its prefixes with it", self._interface)
                    return
                mapped = self._mapped(exc)
                if attempt or isinstance(mapped, Retryable) or exc.code in DENIED_CODES:
                    raise mapped from None
            held = self.describe()
            wanted = [p for p in wanted if p in (held.ipv4 if version == 4 else held.ipv6)]

    def _unassign_call(self, version: int, prefixes: list[str]) -> None:
        eni = self.interface_id()
        what = f"unassign IPv{version} prefix(es) {', '.join(prefixes)} from {eni}"
        if version == 4:
            self._ec2.api(what, "unassign_private_ip_addresses", NetworkInterfaceId=eni, Ipv4Prefixes=prefixes)
        else:
            self._ec2.api(what, "unassign_ipv6_addresses", NetworkInterfaceId=eni, Ipv6Prefixes=prefixes)

    # -- the instance type and the subnet -----------------------------------------------------------
    def capacity(self, held: InterfacePrefixes | None = None) -> PrefixCapacity:
        if self._capacity is not None:
            return self._capacity
        kind = self._instance_type()
        resp = self._call(f"describe instance type {kind}", "describe_instance_types", InstanceTypes=[kind])
        infos = [t for t in resp.get("InstanceTypes", []) or [] if t.get("InstanceType") == kind]
        if not infos:
            raise Fatal(f"EC2 does not describe instance type {kind} in {self._identity.region()}")
        info = infos[0]
        network = info.get("NetworkInfo", {}) or {}
        hypervisor = info.get("Hypervisor", "")
        # Bare-metal types have no hypervisor and are Nitro systems: they take prefixes.
        nitro = hypervisor == "nitro" or (not hypervisor and bool(info.get("BareMetal")))
        if not nitro:
            self._capacity = PrefixCapacity(
                instance_type=kind, ipv4_prefixes=0, ipv6_prefixes=0, supported=False,
                reason=f"{kind} runs on the {hypervisor or 'unknown'} hypervisor and EC2 assigns prefixes to Nitro "
                       "instances only: use a Nitro instance type (e.g. m5, c6i, t3), or "
                       "VPCNET_ADDRESSING=route-table")
        else:
            self._capacity = PrefixCapacity(
                instance_type=kind,
                ipv4_prefixes=max(int(network.get("Ipv4AddressesPerInterface", 0) or 0) - 1, 0),
                ipv6_prefixes=int(network.get("Ipv6AddressesPerInterface", 0) or 0))
        return self._capacity

    def reserved_ranges(self, version: int = 4) -> list[str] | None:
        if not self._subnet:
            self.describe()
        if not self._subnet:
            return None
        key = "SubnetIpv4CidrReservations" if version == 4 else "SubnetIpv6CidrReservations"
        found: list[str] = []
        params: dict = {"SubnetId": self._subnet}
        for _ in range(MAX_PAGES):
            try:
                resp = self._ec2.api(f"list the reserved ranges of {self._subnet}", "get_subnet_cidr_reservations",
                                     **params)
            except ApiError as exc:
                if exc.code in DENIED_CODES:
                    log.warning("aws: not allowed to list the reserved ranges of %s (ec2:GetSubnetCidrReservations)",
                                self._subnet)
                    return None
                raise self._mapped(exc) from None
            found += [r["Cidr"] for r in resp.get(key, []) or []
                      if r.get("ReservationType") == "prefix" and r.get("Cidr")]
            params["NextToken"] = resp.get("NextToken")
            if not params["NextToken"]:
                break
        return found

    def close(self) -> None:
        self._ec2.close()
