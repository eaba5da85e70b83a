"""The fast path's IPv6 programs, beside programs.py's IPv4 ones and attached as separate tc filters (protocol
ETH_P_IPV6, vpcnet.datapath.tc): `container_program6` (tc ingress of an IPv6 endpoint's host veth),
`uplink_program6` (tc ingress of the uplink, per network with an IPv6 block) and `count_program6` (peer
counting). The same shape as IPv4's (the package docstring says why and what), with IPv6's differences:

- Addresses are 16 bytes: compared word by word against the endpoint's own address and the network's IPv6
  block and cluster CIDR (their prefix lengths decide how many words, the last one masked).
- Only a plain header takes the fast path: version 6, next header TCP, UDP, SCTP or ICMPv6. Any extension
  header (hop-by-hop, routing, fragment, destination options...), so every fragment, goes to the stack.
- ICMPv6 neighbour discovery (router solicitation and advertisement, neighbour solicitation and
  advertisement, redirect: types 133-137) always goes to the stack, whatever its addresses.
- Link-local and multicast sources and destinations never take it: the source must be the endpoint's own
  (global or ULA) address and the destination inside the cluster CIDR, which the builders refuse to let
  overlap fe80::/10 or ff00::/8.
- Hop limit <= 1 goes to the stack (it sends time exceeded); else it is decremented (no header checksum).
- `bpf_fib_lookup` with AF_INET6 (flow label included), `bpf_redirect_neigh` with the IPv6 next hop; this
  host's containers are first looked up in the IPv6 map of this host's endpoints (programs._local_endpoint,
  `_key6`: the destination's 16 bytes), the fib lookup only for an address without an entry there.
- A destination in this host's IPv6 block whose route is not an endpoint's veth (no /128 for it: the
  lookup names an uplink, the anchor or the veth it came in by) takes the stack: IPv6 blocks have no
  connected route on the anchor as IPv4's host CIDR has.
- eni-prefix addressing (`shared`): the network's IPv6 block is the range every host shares (this host's
  part is its /80 prefix), so an address in it says nothing of where its container is; as IPv4's, both
  programs tell this host's containers by the maps (programs._endpoint_veth): the container program
  delivers the local map's destinations, and sends any other of the range by the fib lookup out of an
  uplink (another host's container) or into an endpoint's host veth; the uplink program delivers only
  into an endpoint's host veth.

Registers: r6 the skb context, r2/r3 packet start/end after each (re)load; r1-r5 are clobbered by every
helper call. Addresses are read from the packet each time (they do not fit a register).
"""
from __future__ import annotations

import ipaddress
from typing import Sequence

from vpcnet.datapath.ebpf.assembler import FP, JEQ, JGT, JLE, JNE, Asm, _s32
from vpcnet.datapath.ebpf.programs import (
    EP,
    F_DST,
    F_FAMILY,
    F_IFINDEX,
    F_L4,
    F_SRC,
    F_TOS,
    FIB,
    FIB_LOOKUP,
    FIB_SUCCESS,
    KEY,
    KEY_LEN,
    LOCAL_KEY,
    NH,
    NH_LEN,
    PROTO_NUMBERS,
    RECEIVE,
    REDIRECT_NEIGH,
    SKB_DATA,
    SKB_DATA_END,
    SKB_IFINDEX,
    TRANSMIT,
    FibFamily,
    _add_to_map,
    _deliver_local,
    _endpoint,
    _endpoint_veth,
    _local_endpoint,
    _pass,
    _published_ports,
    _shared_fib,
    _to_endpoint,
)

AF_INET6 = 10
ETH_P_IPV6_LE = 0xDD86                     # htons(0x86DD) as a little-endian load sees it
ETH_TYPE = 12
# packet offsets: Ethernet, then the IPv6 header (40 bytes), then the first 4 bytes of the transport header
IP6_VTC, IP6_NEXT, IP6_HOPS, IP6_SADDR, IP6_DADDR = (14 + n for n in (0, 6, 7, 8, 24))
L4 = 14 + 40
PARSED6 = L4 + 4                           # ports, or ICMPv6 type and code: read from every packet
ICMPV6 = 58
PUBLISHED6 = 16                            # IPv6 entry: address at 0, published count at 16, ports after
FAST_NEXT = sorted({*PROTO_NUMBERS.values(), ICMPV6})     # TCP, UDP, SCTP, ICMPv6: no extension header
ND_FIRST, ND_LAST = 133, 137               # router solicitation ... redirect
FLOWINFO_LE = 0xFFFFFF0F                   # htonl(0x0FFFFFFF) (traffic class + flow label) as a load sees it
NOT_FAST = [ipaddress.IPv6Network("fe80::/10"), ipaddress.IPv6Network("ff00::/8")]


def _words(addr: ipaddress.IPv6Address) -> list[int]:
    """The address as four 32-bit loads from packet memory see it (network bytes, little-endian loads)."""
    return [int.from_bytes(addr.packed[i:i + 4], "little") for i in range(0, 16, 4)]


def _net6(cidr: str) -> list[tuple[int, int]]:
    """(network word, mask word) per 32-bit word the prefix covers, as loads see them (a /0: none)."""
    net = ipaddress.IPv6Network(cidr, strict=True)
    return [(n, m) for n, m in zip(_words(net.network_address), _words(net.netmask), strict=True) if m]


def _checked(cidr: str, what: str) -> str:
    net = ipaddress.IPv6Network(cidr, strict=True)
    if net.prefixlen == 0 or any(net.overlaps(bad) for bad in NOT_FAST):
        raise ValueError(f"{what} {cidr} covers link-local or multicast addresses: no IPv6 fast path for it")
    return cidr


def _in6(a: Asm, off: int, cidr: str, outside: str) -> None:
    """Jump to `outside` unless the 16 bytes at packet offset `off` are inside `cidr` (r2 the packet)."""
    for i, (net, mask) in enumerate(_net6(cidr)):
        a.ldx(4, 4, 2, off + 4 * i)
        if mask != 0xFFFFFFFF:
            a.andi32(4, mask)
        a.jump(JNE, 4, outside, imm=_s32(net), wide=False)


def _is_own(a: Asm, off: int, other: str) -> None:
    """Jump to `other` unless the 16 bytes at packet offset `off` are the endpoint's own address (the first
    16 bytes of its entry, r9: vpcnet.datapath.ebpf.endpoints)."""
    for i in range(0, 16, 4):
        a.ldx(4, 4, 2, off + i)
        a.ldx(4, 5, EP, i)
        a.jump(JNE, 4, other, src=5, wide=False)


def _packet6(a: Asm, length: int) -> None:
    """r2/r3 = packet start/end; fewer than `length` bytes in the linear data -> pass."""
    a.ldx(4, 2, 6, SKB_DATA)
    a.ldx(4, 3, 6, SKB_DATA_END)
    a.mov(4, 2)
    a.addi(4, length)
    a.jump(JGT, 4, "pass", src=3)


def _parse6(a: Asm, length: int = PARSED6) -> None:
    """Not IPv6 over Ethernet with a whole header (and `length` bytes) -> pass."""
    a.mov(6, 1)
    _packet6(a, length)
    a.ldx(2, 4, 2, ETH_TYPE)
    a.jump(JNE, 4, "pass", imm=ETH_P_IPV6_LE)
    a.ldx(1, 4, 2, IP6_VTC)
    a.andi32(4, 0xF0)
    a.jump(JNE, 4, "pass", imm=0x60, wide=False)      # not version 6: doubtful


def _plain(a: Asm) -> None:
    """Anything but a plain TCP, UDP, SCTP or ICMPv6 packet (an extension header, a fragment) -> pass;
    ICMPv6 neighbour discovery (133-137) -> pass; hop limit <= 1 -> pass (the stack sends time exceeded)."""
    a.ldx(1, 5, 2, IP6_NEXT)
    for number in FAST_NEXT:
        if number != ICMPV6:
            a.jump(JEQ, 5, "plain", imm=number)
    a.jump(JNE, 5, "pass", imm=ICMPV6)
    a.ldx(1, 4, 2, L4)                                 # the ICMPv6 type
    a.jump(JGT, 4, "plain", imm=ND_LAST)
    a.jump(JGT, 4, "pass", imm=ND_FIRST - 1)
    a.label("plain")
    a.ldx(1, 4, 2, IP6_HOPS)
    a.jump(JLE, 4, "pass", imm=1)


def _fib_lookup6(a: Asm) -> None:
    """bpf_fib_lookup(AF_INET6) on the packet's header, from the device it arrived on (r2: the packet)."""
    for off in range(FIB, 0, 8):
        a.st(8, FP, off, 0)
    a.st(1, FP, F_FAMILY, AF_INET6)
    a.ldx(1, 4, 2, IP6_NEXT)
    a.stx(1, FP, F_L4, 4)
    a.ldx(4, 4, 6, SKB_IFINDEX)
    a.stx(4, FP, F_IFINDEX, 4)
    a.ldx(4, 4, 2, IP6_VTC)
    a.andi32(4, FLOWINFO_LE)
    a.stx(4, FP, F_TOS, 4)                             # flowinfo: traffic class and flow label
    for i in range(0, 16, 4):
        a.ldx(4, 4, 2, IP6_SADDR + i)
        a.stx(4, FP, F_SRC + i, 4)
        a.ldx(4, 4, 2, IP6_DADDR + i)
        a.stx(4, FP, F_DST + i, 4)
    a.mov(1, 6)
    a.mov(2, FP)
    a.addi(2, FIB)
    a.movi(3, 64)
    a.movi(4, 0)
    a.call(FIB_LOOKUP)


def _decrement_hops(a: Asm, done: str) -> None:
    """Hop limit - 1 (IPv6 has no header checksum). Packet pointers are reloaded first (the helper call
    clobbered r2/r3). `done` names a fresh label (the IPv4 form needs one; kept for the same signature)."""
    _packet6(a, PARSED6)
    a.ldx(1, 4, 2, IP6_HOPS)
    a.subi(4, 1)
    a.stx(1, 2, IP6_HOPS, 4)
    a.label(done)


def _redirect_neigh6(a: Asm) -> None:
    """bpf_redirect_neigh(fib.ifindex, {AF_INET6, the next hop fib.ipv6_dst}) and return its verdict."""
    a.st(4, FP, NH, AF_INET6)
    for i in range(0, NH_LEN - 4, 4):
        a.ldx(4, 4, FP, F_DST + i)
        a.stx(4, FP, NH + 4 + i, 4)
    a.ldx(4, 1, FP, F_IFINDEX)
    a.mov(2, FP)
    a.addi(2, NH)
    a.movi(3, NH_LEN)
    a.movi(4, 0)
    a.call(REDIRECT_NEIGH)
    a.exit()


IPV6 = FibFamily(_fib_lookup6, _decrement_hops, _redirect_neigh6, "local_hops_done", "hops_done")

def _count6(a: Asm, map_fd: int, direction: int, cluster_cidr6: str, tag: str, own: bool) -> None:
    """As programs._count, for IPv6 (r2: the packet, PARSED6 bytes checked): the key is (the endpoint's
    address, `direction`, the peer's address, all zero beyond the IPv6 cluster CIDR); `own`: only the
    endpoint's own address (its entry's, r9) is counted. Clobbers r0-r5."""
    endpoint, peer = (IP6_SADDR, IP6_DADDR) if direction == TRANSMIT else (IP6_DADDR, IP6_SADDR)
    if own:
        _is_own(a, endpoint, f"{tag}_done")
    for off in range(KEY, KEY + KEY_LEN, 8):
        a.st(8, FP, off, 0)
    for i in range(0, 16, 4):
        a.ldx(4, 4, 2, endpoint + i)
        a.stx(4, FP, KEY + i, 4)
    a.st(4, FP, KEY + 16, direction)
    _in6(a, peer, cluster_cidr6, f"{tag}_key")          # outside: the peer stays all zero
    for i in range(0, 16, 4):
        a.ldx(4, 4, 2, peer + i)
        a.stx(4, FP, KEY + 24 + i, 4)
    a.label(f"{tag}_key")
    _add_to_map(a, map_fd, tag)


def count_program6(direction: int, cluster_cidr6: str, map_fd: int, endpoints_fd: int) -> bytes:
    """count_program for IPv6: counting only, of the endpoint whose entry the veth has in the IPv6 endpoint
    map `endpoints_fd` (shared by a network's endpoints); every packet continues as if the program were not
    there."""
    _checked(cluster_cidr6, "cluster CIDR")
    a = Asm()
    _parse6(a, L4)
    _endpoint(a, endpoints_fd)
    _packet6(a, L4)
    _count6(a, map_fd, direction, cluster_cidr6, "count", True)
    _pass(a)
    return a.assemble()


def _published_replies6(a: Asm) -> None:
    """programs._published_replies for IPv6, from the endpoint's entry (r9): a packet from a published
    container port -> pass (the host's conntrack undoes the DNAT); past MAX_PUBLISHED ports, all TCP, UDP
    and SCTP. Fragments and extension headers never get here (_plain), so the source port is at L4."""
    _published_ports(a, PUBLISHED6, IP6_NEXT, L4)


def _not_to(a: Asm, indexes: Sequence[int]) -> None:
    """After a lookup: its device is one of `indexes` -> pass."""
    if indexes:
        a.ldx(4, 5, FP, F_IFINDEX)
        for index in indexes:
            a.jump(JEQ, 5, "pass", imm=index)


def _key6(a: Asm) -> None:
    """The destination address (r2: the packet) at LOCAL_KEY: the local map's key."""
    for i in range(0, 16, 4):
        a.ldx(4, 4, 2, IP6_DADDR + i)
        a.stx(4, FP, LOCAL_KEY + i, 4)


def container_program6(host_cidr6: str, cluster_cidr6: str, endpoints_fd: int, anchor_ifindex: int = 0,
                       uplinks: Sequence[int] | None = None, *, map_fd: int | None = None,
                       local_fd: int | None = None, shared: bool = False) -> bytes:
    """tc ingress of an IPv6 endpoint's host veth (protocol ETH_P_IPV6): container -> another host of the
    cluster, or another container of this network on this host, as programs.container_program does for
    IPv4, and as it shared by a network's endpoints: each one's facts are its entry in the IPv6 endpoint map
    `endpoints_fd` (vpcnet.datapath.ebpf.endpoints): its own IPv6 address, the only source taking the fast
    path (a forged one goes to the stack, whose reverse-path guard drops it), and its published ports;
    `uplinks`, `map_fd` (every packet sent from the address is counted first), `local_fd` (the IPv6 map of
    this host's endpoints by address: the other container found there without `bpf_fib_lookup`) as there.
    `shared`: `host_cidr6` is a range shared with other hosts (eni-prefix addressing): a destination in the
    local map is delivered to, any other takes the fib lookup, out of an uplink or into an endpoint's veth
    (programs._shared_fib, with `IPV6`'s steps)."""
    _checked(cluster_cidr6, "cluster CIDR")
    _checked(host_cidr6, "host block")
    a = Asm()
    _parse6(a)
    _endpoint(a, endpoints_fd)
    _packet6(a, PARSED6)
    if map_fd is not None:
        _count6(a, map_fd, TRANSMIT, cluster_cidr6, "tx", True)
        _packet6(a, PARSED6)
    _is_own(a, IP6_SADDR, "pass")
    _in6(a, IP6_DADDR, cluster_cidr6, "pass")
    _plain(a)
    _published_replies6(a)
    if shared:                                         # the range is the cluster CIDR, required above
        if local_fd is not None:                       # this host's own containers: straight into theirs
            _local_endpoint(a, local_fd, _key6, "remote")
            _deliver_local(a, "local_map_hops_done", peer=False, decrement=_decrement_hops)
            a.label("remote")
            _packet6(a, PARSED6)
        _shared_fib(a, endpoints_fd, anchor_ifindex, uplinks, IPV6)
        _pass(a)
        return a.assemble()
    _in6(a, IP6_DADDR, host_cidr6, "remote")
    # this host's block: straight into the other container, found in the local map or, if a /128 routes the
    # address to a veth, by the fib lookup
    if local_fd is not None:
        _local_endpoint(a, local_fd, _key6, "local_fib")
        _deliver_local(a, "local_map_hops_done", peer=False, decrement=_decrement_hops)
        a.label("local_fib")
        _packet6(a, PARSED6)
    _fib_lookup6(a)
    _not_to(a, list(uplinks or ()))
    _to_endpoint(a, anchor_ifindex, "local_hops_done", peer=False, decrement=_decrement_hops)
    a.label("remote")
    if uplinks is not None and not uplinks:
        a.goto("pass")                                 # no uplink (no default route yet): the normal path
    else:
        _fib_lookup6(a)
        a.jump(JNE, 0, "pass", imm=FIB_SUCCESS)
        if uplinks is not None:
            a.ldx(4, 5, FP, F_IFINDEX)
            for index in uplinks:
                a.jump(JEQ, 5, "uplink", imm=index)
            a.goto("pass")
            a.label("uplink")
        _decrement_hops(a, "hops_done")
        _redirect_neigh6(a)
    _pass(a)
    return a.assemble()


def uplink_program6(host_cidr6: str, cluster_cidr6: str, anchor_ifindex: int, map_fd: int | None = None,
                    local_fd: int | None = None, endpoints_fd: int | None = None) -> bytes:
    """tc ingress of the uplink (protocol ETH_P_IPV6): another host of the cluster -> a container of this
    network's IPv6 block, straight into its namespace (bpf_redirect_peer), counted as received with
    `map_fd`, found in the IPv6 map of this host's endpoints `local_fd` without `bpf_fib_lookup` (a miss,
    or None: the fib lookup), as programs.uplink_program does for IPv4. `endpoints_fd` (eni-prefix
    addressing: `host_cidr6` is a range shared with other hosts): the IPv6 endpoint map, and the fib
    lookup's device must have an entry there (an endpoint's host veth, not an uplink)."""
    _checked(cluster_cidr6, "cluster CIDR")
    _checked(host_cidr6, "host block")
    a = Asm()
    _parse6(a)
    _in6(a, IP6_SADDR, cluster_cidr6, "pass")
    _in6(a, IP6_DADDR, host_cidr6, "pass")
    _plain(a)
    if local_fd is not None:
        _local_endpoint(a, local_fd, _key6, "fib")
        _deliver_local(a, "map_hops_done", decrement=_decrement_hops, count=None if map_fd is None else
                       lambda asm: _count6(asm, map_fd, RECEIVE, cluster_cidr6, "lrx", False))
        a.label("fib")
        _packet6(a, PARSED6)
    _fib_lookup6(a)
    if endpoints_fd is not None:
        a.jump(JNE, 0, "pass", imm=FIB_SUCCESS)
        _endpoint_veth(a, endpoints_fd, "pass")

    def count(asm: Asm) -> None:
        if map_fd is not None:
            _count6(asm, map_fd, RECEIVE, cluster_cidr6, "rx", False)

    _to_endpoint(a, anchor_ifindex, "hops_done", decrement=_decrement_hops, count=count)
    _pass(a)
    return a.assemble()
