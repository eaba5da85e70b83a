"""The datapath's written interface: what the driver and the reconciler need from the kernel side.

`vpcnet.datapath.dataplane.Dataplane` (netlink, iptables-restore, tc) implements it; so does tests/fakes.py's
`FakeDataplane`, and a test checks both against this Protocol, so the fake cannot drift from the real.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ContextManager, Protocol, Sequence

if TYPE_CHECKING:
    from vpcnet.datapath.features import Features
    from vpcnet.datapath.spec import EndpointSpec, NetworkSpec, Repair


class Datapath(Protocol):
    #: The networks (tags) the last `repair` could not put right (each logged as an ERROR).
    unrepaired: list[str]

    def uplink_mtu(self) -> int: ...

    def features(self) -> Features: ...

    def overlapping_routes(self, cidr: str) -> list[str]: ...

    def ensure_host(self) -> list[str]: ...

    def ensure_network(self, spec: NetworkSpec) -> None: ...

    def delete_network(self, spec: NetworkSpec) -> None: ...

    def network_exists(self, spec: NetworkSpec) -> bool: ...

    def stale_chains(self, known_tags: set[str]) -> list[tuple[str, str]]: ...

    def drop_stale_chain(self, table: str, chain: str) -> None: ...

    def drop_stale_uplink_programs(self, known_tags: set[str]) -> list[str]: ...

    def ensure_endpoint(self, spec: NetworkSpec, host_veth: str, peer_veth: str, mac: str,
                        address: str) -> None: ...

    def ensure_endpoint_ipv6(self, spec: NetworkSpec, host_veth: str, address: str) -> None: ...

    def delete_endpoint(self, host_veth: str) -> None: ...

    def link_exists(self, name: str) -> bool: ...

    def repair(self, networks: Sequence[tuple[NetworkSpec, Sequence[EndpointSpec]]],
               lock_for: Callable[[NetworkSpec], ContextManager] | None = None,
               still_wanted: Callable[[str], bool] | None = None) -> list[Repair]: ...
