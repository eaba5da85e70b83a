"""ENI prefixes: the cloud side of eni-prefix addressing (`VPCNET_ADDRESSING=eni-prefix`).

In this mode a host's block is not one CIDR routed to it by a route-table entry, but a set of address
prefixes assigned to its primary network interface: IPv4 `/28`s and, for dual-stack, one IPv6 `/80`. The
VPC delivers every address of a prefix to the interface that holds it, so no route is written. A
`PrefixProvider` only moves prefixes on this host's interface: say what the interface holds, assign more,
unassign some, and say how many it can hold. Which prefixes are vpcnet's, the warm pool, retries and
adoption after a lost answer live above it; one module per cloud implements it, chosen by name
(`PREFIX_PROVIDERS`, as the route providers are in vpcnet.cloud).

Retries that cannot double-assign: `assign` takes a client token. A cloud that honours it (Alibaba's
`ClientToken`: the same token and parameters get the first answer again) says so with `idempotent_assign`.
One that has none (AWS's AssignPrivateIpAddresses) may have assigned prefixes whose answer was lost: the
caller lists the interface (`describe`) before and after, and takes exactly the prefixes that appeared.

Errors (from vpcnet.errors, each message naming the cause and what to do): `Busy` for throttling and a
concurrent operation on the interface, `Retryable` for 5xx, timeouts and lost answers, and the Fatal ones
below. Messages never contain a secret.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Sequence

from vpcnet.errors import Fatal

IPV4_PREFIX_LEN = 28          # the only IPv4 prefix size either cloud assigns
IPV6_PREFIX_LEN = 80          # the only IPv6 prefix size either cloud assigns
MAX_PER_CALL = 10             # Alibaba's Ipv4PrefixCount/Ipv6PrefixCount limit per call; AWS takes it too


class NoFreePrefix(Fatal):
    """The subnet (vSwitch) has no free prefix-sized block left: AWS InsufficientCidrBlocks, Alibaba
    InvalidVSwitchId.IpNotEnough. Reserving a range of type prefix is the fix; growth pauses meanwhile."""


class InterfaceFull(Fatal):
    """The interface holds as many addresses and prefixes as its instance type allows."""


class PrefixesUnsupported(Fatal):
    """The instance (type) cannot hold prefixes at all (AWS: only Nitro instances)."""


@dataclass(frozen=True)
class InterfacePrefixes:
    """What one network interface holds, as the cloud lists it."""
    interface_id: str
    ipv4: tuple[str, ...] = ()        # IPv4 prefixes (/28), as the cloud writes them
    ipv6: tuple[str, ...] = ()        # IPv6 prefixes (/80)
    ipv4_addresses: int = 1           # private IPv4 addresses besides the prefixes (primary + secondary)
    ipv6_addresses: int = 0           # IPv6 addresses besides the prefixes


@dataclass(frozen=True)
class PrefixCapacity:
    """How many prefixes the interface can hold in all, from the instance type (each prefix takes one
    address slot of the interface: Alibaba EniPrivateIpAddressQuantity, AWS Ipv4AddressesPerInterface;
    one slot is the primary address)."""
    instance_type: str
    ipv4_prefixes: int                # most IPv4 prefixes the interface can hold (held ones included)
    ipv6_prefixes: int                # most IPv6 prefixes
    supported: bool = True
    reason: str = ""                  # why not, when not `supported`


class PrefixProvider(abc.ABC):
    """The prefixes of this host's primary network interface, in one cloud."""

    name = "?"
    #: True when `assign` honours its client token: a retry with the same token cannot assign twice.
    idempotent_assign = False

    def __init__(self, config) -> None:  # noqa: B027 - every provider is built from the one config object
        pass

    @abc.abstractmethod
    def interface_id(self) -> str:
        """This host's primary network interface (configured, or from instance metadata)."""

    @abc.abstractmethod
    def describe(self) -> InterfacePrefixes:
        """What the interface holds now."""

    @abc.abstractmethod
    def assign(self, version: int, count: int, client_token: str) -> list[str]:
        """Assign `count` (1..MAX_PER_CALL) new prefixes of IP `version` (4: /28, 6: /80) to the interface;
        returns them. Raises NoFreePrefix, InterfaceFull, PrefixesUnsupported, Busy, Retryable."""

    @abc.abstractmethod
    def unassign(self, version: int, prefixes: Sequence[str]) -> None:
        """Take `prefixes` off the interface; one already gone is not an error."""

    @abc.abstractmethod
    def capacity(self, held: InterfacePrefixes | None = None) -> PrefixCapacity:
        """How many prefixes the interface can hold, from its instance type. `held`: the interface as the
        caller just described it in this pass, for a provider that would otherwise describe it again (its
        secondary addresses take slots too); None: the provider reads what it needs itself."""

    def reserved_ranges(self, version: int = 4) -> list[str] | None:
        """The subnet's (vSwitch's) reserved CIDRs of type prefix, where prefixes come from; [] when there
        is none, None when the provider cannot tell (for `vpcnet doctor`)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: a provider without connections keeps this no-op
        """Release connections."""


PREFIX_PROVIDERS = {
    "local": "vpcnet.cloud.local:LocalPrefixes",
    "aliyun": "vpcnet.cloud.aliyun.ecs:AliyunPrefixes",
    "aws": "vpcnet.cloud.aws.prefixes:AwsPrefixes",
}


def make_prefix_provider(config) -> PrefixProvider:
    """The prefix provider of `config.provider` (the same name as its route provider)."""
    path = PREFIX_PROVIDERS.get(config.provider)
    if path is None:
        raise Fatal(f"provider {config.provider!r} has no ENI prefixes: VPCNET_ADDRESSING=eni-prefix needs one "
                    f"of {', '.join(sorted(PREFIX_PROVIDERS))}")
    from vpcnet.cloud import ProviderUnavailable, missing_requirements
    missing = missing_requirements(config.provider)
    if missing:
        raise ProviderUnavailable(missing)
    module, _, cls = path.partition(":")
    provider: PrefixProvider = getattr(importlib.import_module(module), cls)(config)
    return provider
