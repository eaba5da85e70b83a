"""The two tc programs of the fast path, assembled at load time: `container_program` (tc ingress of an
endpoint's host veth) and `uplink_program` (tc ingress of the uplink). What they do and why is in the
package docstring (vpcnet.datapath.ebpf). With a peer map (vpcnet.datapath.ebpf.maps), both also count
bytes and packets per peer (`_count`), and `count_program` does only that (tc ingress and egress of an
endpoint's host veth, in every mode)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Sequence

from vpcnet.datapath.ebpf.assembler import (
    FP,
    JEQ,
    JGT,
    JLE,
    JLT,
    JNE,
    Asm,
    _s32,
)

# helpers (enum bpf_func_id)
MAP_LOOKUP, MAP_UPDATE = 1, 2
BPF_NOEXIST = 1
REDIRECT, FIB_LOOKUP, REDIRECT_NEIGH, REDIRECT_PEER = 23, 69, 152, 155
# bpf_fib_lookup() results
FIB_SUCCESS = 0
# tc verdicts
TC_ACT_UNSPEC = -1
AF_INET = 2
ETH_P_IP_LE = 0x0008                       # htons(0x0800) as a little-endian load sees it

# __sk_buff fields
SKB_LEN, SKB_IFINDEX, SKB_DATA, SKB_DATA_END = 0, 40, 76, 80
# packet offsets: Ethernet, then the IPv4 header
ETH_DST, ETH_SRC, ETH_TYPE, ETH_LEN = 0, 6, 12, 14
IP_TOS, IP_FRAG, IP_TTL, IP_PROTO, IP_CHECK, IP_SADDR, IP_DADDR = (ETH_LEN + n for n in (1, 6, 8, 9, 10, 12, 16))
PARSED = ETH_LEN + 20
FRAG_MASK_LE = 0xFF3F                      # htons(0x3FFF) (more fragments, offset) as a little-endian load sees it
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
MAX_PUBLISHED = 64                         # published ports one container program compares a packet against
# struct bpf_fib_lookup (64 bytes) on the stack at FIB, struct bpf_redir_neigh (20 bytes) at NH
FIB = -64
F_FAMILY, F_L4, F_IFINDEX, F_TOS, F_SRC, F_DST, F_SMAC, F_DMAC = (FIB + n for n in (0, 1, 8, 12, 16, 32, 52, 58))
NH = -88
NH_LEN = 20
# the peer map's key (40 bytes: endpoint address, direction, pad, peer address) and a new value (16 bytes)
KEY, KEY_LEN, VAL = -128, 40, -144
TRANSMIT, RECEIVE = 0, 1                   # vpcnet.datapath.ebpf.maps.TRANSMIT/RECEIVE
# the endpoint map's key (the host veth's index) at EP_KEY; its value (vpcnet.datapath.ebpf.endpoints) is
# held in r9 (callee-saved: it outlives helper calls) from `_endpoint` on
EP_KEY = -152
EP = 9
EP_PUBLISHED, EP_PORTS = 4, 8              # IPv4 value: address at 0 (vpcnet.datapath.ebpf.endpoints.value)
# the local map's key (the destination address: 4 or 16 bytes) at LOCAL_KEY; its value
# (vpcnet.datapath.ebpf.endpoints.local_value) in r9 from `_local_endpoint` on (the uplink programs do not use
# r9 otherwise, the container programs no longer need the endpoint's own entry by then)
LOCAL_KEY = -168
LOCAL = 9
LOCAL_IFINDEX, LOCAL_MAXLEN, LOCAL_DMAC, LOCAL_SMAC = 0, 4, 8, 14     # endpoints.local_value


def _le(addr: ipaddress.IPv4Address) -> int:
    """An address as a 32-bit load from packet memory sees it (network bytes, little-endian load)."""
    return int.from_bytes(addr.packed, "little")


def _net(cidr: str) -> tuple[int, int]:
    net = ipaddress.IPv4Network(cidr, strict=True)
    return _le(net.network_address), _le(net.netmask)


# -- the two programs ----------------------------------------------------------------------------------
# Registers: r6 the skb context, r7 the source address, r8 the destination, r9 the endpoint's entry (the
# per-endpoint programs), r2/r3 packet start/end after each (re)load; r1-r5 are clobbered by every helper call.

def _parse(a: Asm) -> None:
    """r2/r3 = packet start/end; not IPv4 over Ethernet with a whole header -> pass; r7/r8 = saddr/daddr."""
    a.mov(6, 1)
    _packet(a)
    a.ldx(2, 4, 2, ETH_TYPE)
    a.jump(JNE, 4, "pass", imm=ETH_P_IP_LE)
    a.ldx(4, 7, 2, IP_SADDR)
    a.ldx(4, 8, 2, IP_DADDR)


def _packet(a: Asm) -> None:
    a.ldx(4, 2, 6, SKB_DATA)
    a.ldx(4, 3, 6, SKB_DATA_END)
    a.mov(4, 2)
    a.addi(4, PARSED)
    a.jump(JGT, 4, "pass", src=3)


def _require_in(a: Asm, reg: int, cidr: str, inside: bool = True) -> None:
    net, mask = _net(cidr)
    a.mov(4, reg)
    a.andi32(4, mask)
    a.jump(JNE if inside else JEQ, 4, "pass", imm=net, wide=False)


def _fib_lookup(a: Asm) -> None:
    """TTL > 1, then bpf_fib_lookup() on the packet's header, from the device it arrived on."""
    a.ldx(1, 4, 2, IP_TTL)
    a.jump(JLE, 4, "pass", imm=1)                 # about to expire: the stack sends time-exceeded
    for off in range(FIB, 0, 8):
        a.st(8, FP, off, 0)
    a.st(1, FP, F_FAMILY, AF_INET)
    a.ldx(1, 4, 2, IP_PROTO)
    a.stx(1, FP, F_L4, 4)
    # tot_len stays 0: the helper then checks the skb itself against the egress MTU, GSO included
    # (a tot_len would be compared as is, and a 64 KB GSO packet always "needs fragmentation").
    a.ldx(4, 4, 6, SKB_IFINDEX)
    a.stx(4, FP, F_IFINDEX, 4)
    a.ldx(1, 4, 2, IP_TOS)
    a.stx(1, FP, F_TOS, 4)
    a.stx(4, FP, F_SRC, 7)
    a.stx(4, FP, F_DST, 8)
    a.mov(1, 6)
    a.mov(2, FP)
    a.addi(2, FIB)
    a.movi(3, 64)
    a.movi(4, 0)
    a.call(FIB_LOOKUP)


def _decrement_ttl(a: Asm, done: str) -> None:
    """As the kernel's ip_decrease_ttl(): TTL - 1, checksum + htons(0x0100) with end-around carry.
    Packet pointers are reloaded first (the helper call clobbered r2/r3). `done` names a fresh label."""
    _packet(a)
    a.ldx(1, 4, 2, IP_TTL)
    a.subi(4, 1)
    a.stx(1, 2, IP_TTL, 4)
    a.ldx(2, 4, 2, IP_CHECK)
    a.addi(4, 1)
    a.jump(JLT, 4, done, imm=0xFFFF)
    a.addi(4, 1)
    a.label(done)
    a.stx(2, 2, IP_CHECK, 4)


def _redirect_neigh(a: Asm) -> None:
    """bpf_redirect_neigh(fib.ifindex, {AF_INET, fib.ipv4_dst = the next hop}) and return its verdict."""
    a.st(4, FP, NH, AF_INET)
    a.ldx(4, 4, FP, F_DST)
    a.stx(4, FP, NH + 4, 4)
    for off in range(NH + 8, NH + NH_LEN, 4):
        a.st(4, FP, off, 0)
    a.ldx(4, 1, FP, F_IFINDEX)
    a.mov(2, FP)
    a.addi(2, NH)
    a.movi(3, NH_LEN)
    a.movi(4, 0)
    a.call(REDIRECT_NEIGH)
    a.exit()


def _pass(a: Asm) -> None:
    a.label("pass")
    a.movi(0, TC_ACT_UNSPEC)                      # not ours: the next filter, then the normal path
    a.exit()


def _endpoint(a: Asm, endpoints_fd: int) -> None:
    """r9 = the entry of the endpoint whose host veth the packet is on (skb->ifindex, on both of its tc
    hooks), from the family's endpoint map (vpcnet.datapath.ebpf.endpoints); none (not an endpoint this
    process knows) -> pass. Packet pointers must be reloaded after (the helper clobbers r1-r5)."""
    a.ldx(4, 4, 6, SKB_IFINDEX)
    a.stx(4, FP, EP_KEY, 4)
    a.ld_map(1, endpoints_fd)
    a.mov(2, FP)
    a.addi(2, EP_KEY)
    a.call(MAP_LOOKUP)
    a.jump(JEQ, 0, "pass", imm=0)
    a.mov(EP, 0)


def _count(a: Asm, map_fd: int, direction: int, cluster_cidr: str, tag: str, own: bool) -> None:
    """Add the packet (skb->len bytes, one packet) to the peer map's key (the endpoint's address,
    `direction`, the peer's address), addresses as ::ffff:a.b.c.d; a peer beyond the cluster CIDR is all
    zero (outside). The endpoint is the source of what it transmits (r7), the destination of what it
    receives (r8). `own`: only the endpoint's own address (its entry's, r9) is counted; a packet whose
    endpoint-side address is any other (a forged source, a frame a bridge flooded to this veth) is counted
    under no one (False: the uplink program, where the fib lookup has just routed the destination to the
    endpoint's own /32). Per-CPU values: a plain add, no lock. Clobbers r0-r5 (packet pointers included)."""
    endpoint, peer = (7, 8) if direction == TRANSMIT else (8, 7)
    if own:
        a.ldx(4, 4, EP, 0)
        a.jump(JNE, endpoint, f"{tag}_done", src=4, wide=False)
    net, mask = _net(cluster_cidr)
    for off in range(KEY, KEY + KEY_LEN, 8):
        a.st(8, FP, off, 0)
    a.st(4, FP, KEY + 8, _s32(0xFFFF0000))                # ::ffff:
    a.stx(4, FP, KEY + 12, endpoint)
    a.st(4, FP, KEY + 16, direction)
    a.mov(4, peer)
    a.andi32(4, mask)
    a.jump(JNE, 4, f"{tag}_key", imm=net, wide=False)     # outside: the address stays all zero
    a.st(4, FP, KEY + 32, _s32(0xFFFF0000))
    a.stx(4, FP, KEY + 36, peer)
    a.label(f"{tag}_key")
    _add_to_map(a, map_fd, tag)


def _add_to_map(a: Asm, map_fd: int, tag: str) -> None:
    """The key built at KEY: its per-CPU value gets skb->len bytes and one packet (a new key: created with
    them). Ends at the label `<tag>_done`. Clobbers r0-r5."""
    a.ld_map(1, map_fd)
    a.mov(2, FP)
    a.addi(2, KEY)
    a.call(MAP_LOOKUP)
    a.jump(JEQ, 0, f"{tag}_new", imm=0)
    a.ldx(8, 4, 0, 0)
    a.ldx(4, 5, 6, SKB_LEN)
    a.add(4, 5)
    a.stx(8, 0, 0, 4)
    a.ldx(8, 4, 0, 8)
    a.addi(4, 1)
    a.stx(8, 0, 8, 4)
    a.goto(f"{tag}_done")
    a.label(f"{tag}_new")                              # first packet of this key on this CPU
    a.ldx(4, 5, 6, SKB_LEN)
    a.stx(8, FP, VAL, 5)
    a.st(8, FP, VAL + 8, 1)
    a.ld_map(1, map_fd)
    a.mov(2, FP)
    a.addi(2, KEY)
    a.mov(3, FP)
    a.addi(3, VAL)
    a.movi(4, BPF_NOEXIST)
    a.call(MAP_UPDATE)                             # full map: the LRU evicts; a race: the other CPU's key
    a.label(f"{tag}_done")


def count_program(direction: int, cluster_cidr: str, map_fd: int, endpoints_fd: int) -> bytes:
    """Counting only (tc on an endpoint's host veth: ingress = what the container sent, egress = what it
    receives), of the endpoint whose entry the veth has in the IPv4 endpoint map `endpoints_fd` (one
    program per network, shared by its endpoints: only the entry's address counts); every packet continues
    as if the program were not there (TC_ACT_UNSPEC)."""
    a = Asm()
    _parse(a)
    _endpoint(a, endpoints_fd)
    _count(a, map_fd, direction, cluster_cidr, "count", True)
    _pass(a)
    return a.assemble()


def _published_ports(a: Asm, published_off: int, proto_off: int, port_off: int,
                     readable: Callable[[Asm], None] | None = None) -> None:
    """The endpoint's published ports, from its entry (r9; vpcnet.datapath.ebpf.endpoints: the count at
    `published_off`, the slots after it): a packet from one of them (the source port at packet offset
    `port_off`, the protocol at `proto_off`) -> pass; past MAX_PUBLISHED, any TCP, UDP or SCTP packet ->
    pass; nothing to compare for an endpoint that publishes none. `readable`: the family's checks that the
    port can be read (they jump to pass when not), before the compares. Clobbers r1, r4, r5."""
    a.ldx(4, 1, EP, published_off)
    a.jump(JEQ, 1, "published_done", imm=0)
    a.ldx(1, 5, 2, proto_off)
    a.jump(JLE, 1, "published_each", imm=MAX_PUBLISHED)
    for number in sorted(set(PROTO_NUMBERS.values())):
        a.jump(JEQ, 5, "pass", imm=number)
    a.goto("published_done")
    a.label("published_each")
    if readable is not None:
        readable(a)
    a.ldx(2, 4, 2, port_off)                          # the source port, as a little-endian load sees it
    a.lshi(4, 16)
    a.or_(4, 5)                                       # [proto, 0, port]: an entry's slot (endpoints.slot)
    for n in range(MAX_PUBLISHED):                    # the count bounds the compares (unrolled: no loop)
        a.jump(JLE, 1, "published_done", imm=n)
        a.ldx(4, 5, EP, published_off + 4 + 4 * n)
        a.jump(JEQ, 5, "pass", src=4, wide=False)
    a.label("published_done")


def _ports_readable(a: Asm) -> None:
    """IPv4: a fragment or a header with options -> pass (the ports may not be where they are looked for);
    no source port in the packet -> pass. Keeps r1 and r5."""
    a.ldx(2, 4, 2, IP_FRAG)
    a.andi32(4, FRAG_MASK_LE)
    a.jump(JNE, 4, "pass", imm=0, wide=False)          # a fragment: the ports may not be in it
    a.ldx(1, 4, 2, ETH_LEN)
    a.jump(JNE, 4, "pass", imm=0x45)                  # IPv4 with options: the stack decides
    a.mov(4, 2)
    a.addi(4, PARSED + 2)
    a.jump(JGT, 4, "pass", src=3)                     # no source port in the packet


def _published_replies(a: Asm) -> None:
    """A reply from a published container port -> pass: the host's conntrack must undo the DNAT (the client
    reached the host's port, not the container's). So does any packet whose ports cannot be read cheaply
    (a fragment, IP options), while the endpoint publishes anything. An endpoint publishing more than
    MAX_PUBLISHED ports (a wide range) leaves all its TCP, UDP and SCTP cluster traffic to the host. The
    ports are the endpoint's entry's (r9)."""
    _published_ports(a, EP_PUBLISHED, IP_PROTO, PARSED, _ports_readable)


def container_program(host_cidr: str, cluster_cidr: str, endpoints_fd: int, anchor_ifindex: int = 0,
                      uplinks: Sequence[int] | None = None, *, map_fd: int | None = None,
                      local_fd: int | None = None, shared: bool = False) -> bytes:
    """tc ingress of an endpoint's host veth: container -> another host of the cluster, or -> another
    container of this network on this host. One program per network, shared by its endpoints: the facts of
    each (vpcnet.datapath.ebpf.endpoints) are its entry in the IPv4 endpoint map `endpoints_fd`, by the host
    veth's index: its own address, the only source that takes the fast path (what the routed path's
    anti-spoofing check would let through), and its published ports, whose replies take the normal path
    (`_published_replies`); a veth without an entry: the normal path. `uplinks`: the only devices
    (indexes) another host's traffic is redirected out of; a lookup naming any other (a cluster address
    routed over a second NIC or a Docker bridge) takes the normal path, where the firewall's isolation
    chains decide (None: any device). `map_fd`: the peer map, where every IPv4 packet the container sends
    from its address is counted first, whatever happens to it next; a forged source, never. `local_fd`: the
    IPv4 map of this host's endpoints by address (vpcnet.datapath.ebpf.endpoints.local_value): another
    container of the network found there is delivered to without `bpf_fib_lookup` (`_local_endpoint`); not
    found (or None): the fib lookup, as before. `shared`: `host_cidr` is a range shared with other hosts
    (eni-prefix addressing), so an address in it is no sign of this host's container: one found in the
    local map is delivered to, any other takes the fib lookup, out of an uplink (another host's) or not
    fast at all (the normal path routes it by its /32)."""
    a = Asm()
    _parse(a)
    _endpoint(a, endpoints_fd)
    if map_fd is not None:
        _count(a, map_fd, TRANSMIT, cluster_cidr, "tx", True)
    _packet(a)
    a.ldx(4, 4, EP, 0)
    a.jump(JNE, 7, "pass", src=4, wide=False)           # not the endpoint's own address
    _require_in(a, 8, cluster_cidr)
    _published_replies(a)
    if shared:                                        # the range is the cluster CIDR, required above
        if local_fd is not None:                      # this host's own containers: straight into theirs
            _ttl_above_one(a)
            _local_endpoint(a, local_fd, _key4, "remote")
            _deliver_local(a, "local_map_ttl_done", peer=False)
            a.label("remote")
            _packet(a)
        _shared_fib(a, endpoints_fd, anchor_ifindex, uplinks)
        _pass(a)
        return a.assemble()
    net, mask = _net(host_cidr)
    a.mov(4, 8)
    a.andi32(4, mask)
    a.jump(JEQ, 4, "local", imm=net, wide=False)     # this host's own containers: straight into theirs
    if uplinks is not None and not uplinks:
        a.goto("pass")                            # no uplink (no default route yet): the normal path
    else:
        _fib_lookup(a)
        a.jump(JNE, 0, "pass", imm=FIB_SUCCESS)
        if uplinks is not None:
            a.ldx(4, 5, FP, F_IFINDEX)
            for index in uplinks:
                a.jump(JEQ, 5, "uplink", imm=index)
            a.goto("pass")
            a.label("uplink")
        _decrement_ttl(a, "ttl_done")
        _redirect_neigh(a)
    a.label("local")
    if local_fd is not None:
        _ttl_above_one(a)
        _local_endpoint(a, local_fd, _key4, "local_fib")
        _deliver_local(a, "local_map_ttl_done", peer=False)
        a.label("local_fib")
        _packet(a)
    _fib_lookup(a)
    _to_endpoint(a, anchor_ifindex, "local_ttl_done", peer=False)
    _pass(a)
    return a.assemble()


def _endpoint_veth(a: Asm, endpoints_fd: int, miss: str) -> None:
    """After a successful fib lookup: its device an endpoint's host veth (one with an entry in the endpoint
    map `endpoints_fd`), else -> `miss`; r0 = FIB_SUCCESS again for `_to_endpoint`. Clobbers r0-r5."""
    a.ldx(4, 4, FP, F_IFINDEX)
    a.stx(4, FP, EP_KEY, 4)
    a.ld_map(1, endpoints_fd)
    a.mov(2, FP)
    a.addi(2, EP_KEY)
    a.call(MAP_LOOKUP)
    a.jump(JEQ, 0, miss, imm=0)
    a.movi(0, FIB_SUCCESS)


@dataclass(frozen=True)
class FibFamily:
    """One address family's steps around a fib lookup, for the emitters both families share
    (`_shared_fib`): the lookup of the packet's header, the TTL (hop limit) decrement and the redirect to
    the lookup's next hop, with the names of the labels the decrements end at (fresh per program)."""
    lookup: Callable[[Asm], None]
    decrement: Callable[[Asm, str], None]
    redirect_neigh: Callable[[Asm], None]
    local_done: str
    remote_done: str


IPV4 = FibFamily(_fib_lookup, _decrement_ttl, _redirect_neigh, "local_ttl_done", "ttl_done")


def _shared_fib(a: Asm, endpoints_fd: int, anchor_ifindex: int, uplinks: Sequence[int] | None,
                family: FibFamily = IPV4) -> None:
    """A shared range's container program after its local map: the fib lookup of the destination; out of
    one of `uplinks` (None: any device but an endpoint's) to the neighbour: another host's container; to an
    endpoint's host veth (an entry in the family's endpoint map `endpoints_fd`: a packet the local map did
    not take, a GSO one): into it; else -> pass. Every address of the range not on this host may be
    another host's. `family`: IPv4's steps, or IPv6's (vpcnet.datapath.ebpf.programs6.IPV6)."""
    family.lookup(a)
    a.jump(JNE, 0, "pass", imm=FIB_SUCCESS)
    if uplinks:
        a.ldx(4, 5, FP, F_IFINDEX)
        for index in uplinks:
            a.jump(JEQ, 5, "uplink", imm=index)
    _endpoint_veth(a, endpoints_fd, "uplink" if uplinks is None else "pass")
    _to_endpoint(a, anchor_ifindex, family.local_done, peer=False, decrement=family.decrement)
    if uplinks is None or uplinks:
        a.label("uplink")
        family.decrement(a, family.remote_done)
        family.redirect_neigh(a)


def uplink_program(host_cidr: str, cluster_cidr: str, anchor_ifindex: int, map_fd: int | None = None,
                   local_fd: int | None = None, shared: bool = False, endpoints_fd: int | None = None) -> bytes:
    """tc ingress of the uplink: another host of the cluster -> a container of this network. `map_fd`: the
    peer map, where each packet handed into a container is counted as received (bpf_redirect_peer passes
    no hook of the host veth, where the counting program would see it). `local_fd`: the IPv4 map of this
    host's endpoints by address: a destination found there is delivered without `bpf_fib_lookup`
    (`_local_endpoint`); not found (or None): the fib lookup finds the endpoint's /32 route, as before.
    `shared`: `host_cidr` is a range shared with other hosts (eni-prefix addressing), so the fib lookup's
    device must be an endpoint's host veth (an entry in the IPv4 endpoint map `endpoints_fd`: not another
    uplink, where a peer redirect fails); without that map, only the local map's destinations are
    delivered and the rest takes the normal path."""
    a = Asm()
    _parse(a)
    _require_in(a, 7, cluster_cidr)
    _require_in(a, 8, host_cidr)
    if shared and endpoints_fd is None:
        if local_fd is not None:
            _ttl_above_one(a)
            _local_endpoint(a, local_fd, _key4, "pass")
            _deliver_local(a, "map_ttl_done", count=None if map_fd is None else
                           lambda asm: _count(asm, map_fd, RECEIVE, cluster_cidr, "lrx", False))
        _pass(a)
        return a.assemble()
    if local_fd is not None:
        _ttl_above_one(a)
        _local_endpoint(a, local_fd, _key4, "fib")
        _deliver_local(a, "map_ttl_done", count=None if map_fd is None else
                       lambda asm: _count(asm, map_fd, RECEIVE, cluster_cidr, "lrx", False))
        a.label("fib")
        _packet(a)
    _fib_lookup(a)
    if shared and endpoints_fd is not None:
        a.jump(JNE, 0, "pass", imm=FIB_SUCCESS)
        _endpoint_veth(a, endpoints_fd, "pass")
    _to_endpoint(a, anchor_ifindex, "ttl_done", map_fd=map_fd, cluster_cidr=cluster_cidr)
    _pass(a)
    return a.assemble()


def _ttl_above_one(a: Asm) -> None:
    """TTL <= 1 -> pass (the stack sends time exceeded), as `_fib_lookup` checks it (r2: the packet)."""
    a.ldx(1, 4, 2, IP_TTL)
    a.jump(JLE, 4, "pass", imm=1)


def _key4(a: Asm) -> None:
    a.stx(4, FP, LOCAL_KEY, 8)                        # the destination address (r8)


def _local_endpoint(a: Asm, local_fd: int, key: Callable[[Asm], None], miss: str) -> None:
    """r9 = the entry of the packet's destination in the family's map of this host's endpoints (`local_fd`,
    vpcnet.datapath.ebpf.endpoints.local_value; `key` stores the address at LOCAL_KEY). Not there, or the
    frame longer than the host veth's MTU allows (a GSO packet, one needing fragmentation: `bpf_fib_lookup`
    checks those against the MTU as it always did) -> `miss` (packet pointers to be reloaded); the veth the
    packet came in by -> pass, as after a fib lookup. Clobbers r0-r5."""
    key(a)
    a.ld_map(1, local_fd)
    a.mov(2, FP)
    a.addi(2, LOCAL_KEY)
    a.call(MAP_LOOKUP)
    a.jump(JEQ, 0, miss, imm=0)
    a.mov(LOCAL, 0)
    a.ldx(4, 4, 6, SKB_LEN)
    a.ldx(4, 5, LOCAL, LOCAL_MAXLEN)
    a.jump(JGT, 4, miss, src=5)
    a.ldx(4, 5, LOCAL, LOCAL_IFINDEX)
    a.ldx(4, 4, 6, SKB_IFINDEX)
    a.jump(JEQ, 5, "pass", src=4)


def _set_macs(a: Asm, base: int, dmac: int, smac: int) -> None:
    """The frame's destination MAC = the container's, source MAC = the host veth's, read 2 bytes at a time
    from register `base` + `dmac` and + `smac` (the fib lookup's answer on the stack, or a local entry)."""
    for off in range(0, 6, 2):
        a.ldx(2, 4, base, dmac + off)
        a.stx(2, 2, ETH_DST + off, 4)
        a.ldx(2, 4, base, smac + off)
        a.stx(2, 2, ETH_SRC + off, 4)


def _deliver_local(a: Asm, done: str, peer: bool = True, *, decrement: Callable[[Asm, str], None] | None = None,
                   count: Callable[[Asm], None] | None = None) -> None:
    """After `_local_endpoint` found the destination (r9): TTL (hop limit) decremented, MACs from the entry
    (the container's, the host veth's), `count`ed, and into the container as `_to_endpoint` hands it
    (`peer`: bpf_redirect_peer; else bpf_redirect out of the host veth)."""
    (decrement or _decrement_ttl)(a, done)
    _set_macs(a, LOCAL, LOCAL_DMAC, LOCAL_SMAC)
    if count is not None:
        count(a)
    a.ldx(4, 1, LOCAL, LOCAL_IFINDEX)
    a.movi(2, 0)
    a.call(REDIRECT_PEER if peer else REDIRECT)
    a.exit()


def _to_endpoint(a: Asm, anchor_ifindex: int, done: str, peer: bool = True, map_fd: int | None = None,
                 cluster_cidr: str = "", *, decrement: Callable[[Asm, str], None] | None = None,
                 count: Callable[[Asm], None] | None = None) -> None:
    """After a fib lookup towards the host CIDR: into the container behind the /32 route's host veth
    (MACs from the lookup, TTL decremented). `peer`: bpf_redirect_peer, straight into the container's
    namespace (no second queueing on the veth); else bpf_redirect out of the host veth, which then counts
    the packet as the container's (vpcnet_endpoint_receive_* read the host veth's transmit counters).
    `decrement` and `count`: the family's TTL (hop limit) decrement and receive counting (IPv4's by
    default: `_decrement_ttl`, `_count` into `map_fd`; vpcnet.datapath.ebpf.programs6 passes IPv6's)."""
    # Only to an endpoint's veth: not back out where it came from, not to the network's anchor (an
    # address no endpoint holds, routed by the connected route: the normal path answers it). The gateway
    # is a local address: the lookup does not succeed for it.
    a.ldx(4, 5, FP, F_IFINDEX)
    a.jump(JEQ, 5, "pass", imm=anchor_ifindex)
    a.ldx(4, 4, 6, SKB_IFINDEX)
    a.jump(JEQ, 5, "pass", src=4)
    a.jump(JNE, 0, "pass", imm=FIB_SUCCESS)
    (decrement or _decrement_ttl)(a, done)
    _set_macs(a, FP, F_DMAC, F_SMAC)
    if count is not None:
        count(a)
    elif map_fd is not None:
        _count(a, map_fd, RECEIVE, cluster_cidr, "rx", False)
    a.ldx(4, 1, FP, F_IFINDEX)
    a.movi(2, 0)
    a.call(REDIRECT_PEER if peer else REDIRECT)
    a.exit()
