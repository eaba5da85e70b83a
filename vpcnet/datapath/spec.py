"""What the store wants of the kernel, as values: a network's and an endpoint's specs, the names vpcnet gives
its links, filters and chains, and what a repair pass reports (`Repair`, the `KernelView` it reads).

Every other piece of vpcnet.datapath takes these; none of them holds kernel state.
"""
from __future__ import annotations

import ipaddress
import zlib
from dataclasses import dataclass, field

MODES = ("bridge", "routed", "ebpf")
DEFAULT_MTU = 1500
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}     # Docker's PortBinding.Proto numbers -> iptables' names


@dataclass(frozen=True, order=True)
class PortMapping:
    """One published port (`-p`): the host's `host_port` (on `host_ip`, or every host address when empty) to
    `container_port` of the endpoint holding `address`. Always one host port: Docker's ranges and `-P` are
    resolved to one by the driver (vpcnet.docker.ports). `family` "ipv6": an IPv6 host address (or every
    one) to the endpoint's IPv6 `address`, written with ip6tables (vpcnet.datapath.ports6)."""
    proto: str                  # tcp | udp | sctp
    host_ip: str                # bare IP, or "" for every address of the host
    host_port: int
    address: str                # the container's (endpoint's) address
    container_port: int
    family: str = "ipv4"

    def __str__(self) -> str:
        if self.family == "ipv6":
            return f"[{self.host_ip or '::'}]:{self.host_port}->[{self.address}]:{self.container_port}/{self.proto}"
        return f"{self.host_ip or '0.0.0.0'}:{self.host_port}->{self.address}:{self.container_port}/{self.proto}"


@dataclass(frozen=True)
class NetworkSpec:
    tag: str                    # short stable id (network id prefix) for names and chains
    bridge: str
    gateway: str                # bare IP
    host_cidr: str
    cluster_cidr: str
    mtu: int
    internal: bool = False
    no_nat: tuple[str, ...] = ()
    mode: str = "bridge"        # "routed": no bridge, proxy ARP and a /32 route per endpoint; "ebpf": routed
                                # plus the tc fast path
    ports: tuple[PortMapping, ...] = ()     # the published ports of the network's endpoints (sorted)
    host_cidr_v6: str = ""      # the network's IPv6 block and cluster CIDR ("": no IPv6); the ebpf fast
    cluster_cidr_v6: str = ""   # path's IPv6 programs have them built in
    # eni-prefix addressing: host_cidr is the range every host shares (its prefixes are this host's part),
    # so nothing treats the whole of it as this host's: the anchor holds the gateway as a /32 (no on-link
    # range), and the ebpf programs tell this host's containers by their map of local endpoints; so does
    # host_cidr_v6, the IPv6 range (IPv6 has no on-link block on the host in any routed mode)
    shared_range: bool = False

    def published(self, address: str) -> tuple[tuple[str, int], ...]:
        """(proto, container port) the endpoint holding `address` publishes: the replies the ebpf fast
        path must leave to the host (its conntrack undoes the DNAT). An endpoint's IPv4 and IPv6 addresses
        name its ports of each family apart: `published(address_v6)` are those of its IPv6 program."""
        return tuple(sorted({(p.proto, p.container_port) for p in self.ports if p.address == address}))

    @property
    def routed(self) -> bool:
        """No bridge: the anchor, proxy ARP and /32 routes (routed and ebpf modes)."""
        return self.mode in ("routed", "ebpf")

    @property
    def bridged_ipv6(self) -> bool:
        """Bridge mode with IPv6: the bridge carries it (vpcnet.datapath.ipv6.RoutedIpv6.ensure_bridge)."""
        return bool(self.host_cidr_v6) and not self.routed

    @property
    def ebpf(self) -> bool:
        return self.mode == "ebpf"

    @property
    def tc_name(self) -> str:
        return f"vpcnet-{self.tag}"

    @property
    def ipv4(self) -> bool:
        """The network has IPv4 (a host block): not an IPv6-only one (`--ipv4=false`), which has no IPv4
        gateway, rules, routes or programs at all."""
        return bool(self.host_cidr)

    @property
    def tc_name6(self) -> str:
        """The name of the network's IPv6 uplink program (vpcnet.datapath.tc)."""
        return f"vpcnet6-{self.tag}"

    @property
    def prefixlen(self) -> int:
        """The prefix length of the gateway address on the bridge or anchor (its connected route): the
        host block's; a /32 for a shared range, whose other addresses may be other hosts' containers."""
        if self.shared_range and self.host_cidr:
            return 32
        return ipaddress.IPv4Network(self.host_cidr).prefixlen if self.host_cidr else 0

    @property
    def filter_chain(self) -> str:
        return f"VPCNET-F-{self.tag}"

    @property
    def nat_chain(self) -> str:
        return f"VPCNET-N-{self.tag}"

    @property
    def raw_chain(self) -> str:
        return f"VPCNET-R-{self.tag}"

    @property
    def ports_chain(self) -> str:
        return f"VPCNET-P-{self.tag}"


class NetworkGone(Exception):
    """Raised by a repair pass's lock when the network left the store while the pass waited for it."""


@dataclass(frozen=True)
class EndpointSpec:
    host_veth: str
    peer_veth: str
    mac: str
    address: str                # bare IPv4 address, "" on an IPv6-only network


@dataclass(frozen=True)
class Repair:
    """One thing the kernel had wrong, found by reading it, and put right."""
    kind: str                   # firewall | link | address | route | tc
    network: str                # the network's tag
    what: str                   # what was wrong, for the log


@dataclass
class KernelView:
    """One read of what the kernel holds (a link dump, a route dump, a qdisc dump): the periodic pass
    compares every network against it, and only suspects get a second, targeted look."""
    links: dict[str, dict]      # name -> {index, master, up, mtu}
    addresses: dict[int, set]   # link index -> {"ip/len"}
    routes: dict[str, int]      # "<ip>/32" (main table) -> output link index
    clsact: set[int]            # link indexes with a clsact qdisc
    uplinks: list[int]
    uplink_programs: dict[str, set[int]]   # tc filter name (both families') -> link indexes
    # (family, host veth index) -> entry in this process's endpoint maps (vpcnet.datapath.ebpf.endpoints),
    # read before the links: an entry there has its veth in `links` unless the veth has gone
    facts: dict[tuple[int, int], bytes] = field(default_factory=dict)
    # (family, address key) -> entry in this process's maps of this host's endpoints by address, read before
    # the facts: an entry there was written after its facts (vpcnet.datapath.tc.attach_endpoint), so its
    # facts are in `facts` unless the endpoint has gone meanwhile
    local: dict[tuple[int, bytes], bytes] = field(default_factory=dict)


def bridge_name(network_id: str) -> str:
    return f"vpc-{network_id[:11]}"           # 15 characters: the kernel's limit


def anchor_peer(anchor: str) -> str:
    """The other end of a routed network's anchor veth (`vpc-<id11>` -> `vpp-<id11>`)."""
    return "vpp-" + anchor[4:]


def veth_names(endpoint_id: str) -> tuple[str, str]:
    return f"vh{endpoint_id[:11]}", f"vc{endpoint_id[:11]}"


def uplink_handle(tag: str) -> int:
    """The tc filter handle of a network's program on the uplink: stable, never 0."""
    return zlib.crc32(tag.encode()) or 1


def mac_for(ip: str) -> str:
    """Deterministic MAC from the IPv4 address (as Docker's bridge does): a reused address keeps its MAC,
    so peers' ARP caches stay right. An IPv6-only endpoint's from its IPv6 address's last 32 bits."""
    octets = ipaddress.ip_address(ip).packed[-4:]
    return "02:42:" + ":".join(f"{b:02x}" for b in octets)
