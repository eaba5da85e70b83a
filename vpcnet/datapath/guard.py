"""Bridge mode's anti-spoofing guard: one classic BPF program per bridge port, built here, attached by
vpcnet.datapath.tc (`attach_guard`) on the ingress of the endpoint's host veth, ahead of every other filter.

Why a filter per port: on a bridge, containers reach each other without the host's routing, so the routed
modes' reverse-path check (IPv4) and the ip6tables guard's (IPv6) cannot tell one port from another. The
port's filter sees every frame the container sends, before the bridge learns or forwards it, and lets on
only what the endpoint may send as itself (`program`):
- the Ethernet source is the endpoint's MAC (another MAC would teach the bridge to send a neighbour's frames
  to this port);
- IPv4 only from its own address; ARP only with its own address and MAC as the sender (a container can
  neither answer nor announce for a neighbour or the gateway);
- IPv6 (an endpoint that has an IPv6 address) only from that address or from its own link-local address
  (the EUI-64 one of its MAC: the kernel's default in a container's namespace), and of ICMPv6:
  - no router advertisement or redirect (the host's ip6tables guard drops those too);
  - a neighbour advertisement only for its own address or its own link-local one (a forged one for
    the gateway would take the gateway's traffic of every container on the bridge);
  - from the link-local address, neighbour discovery only (solicitation, advertisement).
  No hop-by-hop, routing or destination-options header either (neighbour discovery behind one would pass
  unread). Without an IPv6 address (a network without `--ipv6`, or a container that turned IPv6 off): no
  IPv6 at all;
- nothing else (VLAN-tagged frames and other EtherTypes included).

A frame too short to hold a field read ends the program with 0 (TC_ACT_OK, classic BPF's rule): too short
for the kernel to take as the packet it would claim to be.

The endpoint's facts come back out of its program (`facts`), so the IPv6 half can be added and taken away by
whoever holds only the port's name and IPv6 address, in any worker process, without a store lookup.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

# classic BPF (struct sock_filter) opcodes, and the verdicts of a direct-action cls_bpf filter
LD_W, LD_H, LD_B = 0x20, 0x28, 0x30          # BPF_LD | size | BPF_ABS
JEQ = 0x15                                    # BPF_JMP | BPF_JEQ | BPF_K
RET = 0x06                                    # BPF_RET | BPF_K
TC_ACT_UNSPEC, TC_ACT_SHOT = 0xFFFFFFFF, 2    # on to the next filter; dropped
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
IPPROTO_ICMPV6 = 58
NO_EXTENSIONS = (0, 43, 60)                   # hop-by-hop, routing, destination options
ND_SOLICITATION, ND_ADVERTISEMENT = 135, 136
NO_ICMPV6 = (134, 137)                        # router advertisement, redirect

# offsets from the Ethernet header
ETH_SOURCE, ETH_TYPE = 6, 12
IPV4_SOURCE = 14 + 12
ARP_SENDER_MAC, ARP_SENDER_IP = 14 + 8, 14 + 14
IPV6_NEXT, IPV6_SOURCE = 14 + 6, 14 + 8
ICMPV6_TYPE = 14 + 40
ND_TARGET = ICMPV6_TYPE + 8
IPV4_COMPARE, IPV6_START = 9, 18              # where `program` puts the IPv4 compare, and the IPv6 half


@dataclass(frozen=True)
class GuardFacts:
    mac: str              # the container's MAC, "aa:bb:cc:dd:ee:ff"
    address: str          # its IPv4 address
    address6: str = ""    # its IPv6 address; "": none, so no IPv6


def link_local(mac: str) -> str:
    """The EUI-64 link-local address the kernel gives a link with `mac` (addr_gen_mode 0, the default)."""
    b = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([b[0] ^ 0x02]) + b[1:3] + b"\xff\xfe" + b[3:6]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


class _Program:
    """Instructions with symbolic jump targets, resolved to classic BPF's forward offsets at the end."""

    def __init__(self) -> None:
        self.ops: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ops)

    def load(self, size: int, offset: int) -> None:
        self.ops.append((size, 0, 0, offset))

    def jeq(self, value: int, yes: str | int = 0, no: str | int = 0) -> None:
        """`yes`/`no`: a label, or 0 for the next instruction."""
        self.ops.append((JEQ, yes, no, value))

    def goto(self, target: str) -> None:
        self.jeq(0, target, target)

    def ret(self, verdict: int) -> None:
        self.ops.append((RET, 0, 0, verdict))

    def words(self, offset: int, value: bytes, mismatch: str) -> None:
        """Go on only if the packet holds `value` (a multiple of 4 bytes) at `offset`, else to `mismatch`."""
        for i in range(0, len(value), 4):
            self.load(LD_W, offset + i)
            self.jeq(struct.unpack(">I", value[i:i + 4])[0], 0, mismatch)

    def mac(self, offset: int, mac: bytes, mismatch: str) -> None:
        self.load(LD_W, offset)
        self.jeq(struct.unpack(">I", mac[:4])[0], 0, mismatch)
        self.load(LD_H, offset + 4)
        self.jeq(struct.unpack(">H", mac[4:])[0], 0, mismatch)

    def assemble(self) -> bytes:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self.ops):
            offsets = [self.labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf)]
            if not all(0 <= o <= 255 for o in offsets):
                raise ValueError(f"guard program: jump out of range at {pc}")
            out.append(struct.pack("=HBBI", code, offsets[0], offsets[1], k))
        return b"".join(out)


def program(facts: GuardFacts) -> bytes:
    """The guard for the endpoint with `facts`, as struct sock_filter[] (8 bytes an instruction). Classic
    BPF jumps forward only: both verdicts come last."""
    mac = bytes.fromhex(facts.mac.replace(":", ""))
    own4 = ipaddress.IPv4Address(facts.address).packed
    p = _Program()
    p.mac(ETH_SOURCE, mac, "drop")
    p.load(LD_H, ETH_TYPE)
    p.jeq(ETH_P_IP, "ipv4")
    p.jeq(ETH_P_ARP, "arp")
    p.jeq(ETH_P_IPV6, "ipv6" if facts.address6 else "drop", "drop")
    p.label("ipv4")
    p.words(IPV4_SOURCE, own4, "drop")
    p.goto("pass")
    p.label("arp")
    p.words(ARP_SENDER_IP, own4, "drop")
    p.mac(ARP_SENDER_MAC, mac, "drop")
    p.goto("pass")
    if facts.address6:
        own6 = ipaddress.IPv6Address(facts.address6).packed
        local = ipaddress.IPv6Address(link_local(facts.mac)).packed
        p.label("ipv6")
        p.words(IPV6_SOURCE, own6, "from link-local")
        p.load(LD_B, IPV6_NEXT)                       # from its own address: all but
        for header in NO_EXTENSIONS:                  # an extension header that could hide ND
            p.jeq(header, "drop")
        p.jeq(IPPROTO_ICMPV6, 0, "pass")
        p.load(LD_B, ICMPV6_TYPE)
        for kind in NO_ICMPV6:
            p.jeq(kind, "drop")
        p.jeq(ND_ADVERTISEMENT, "advertisement", "pass")
        p.label("from link-local")
        p.words(IPV6_SOURCE, local, "drop")
        p.load(LD_B, IPV6_NEXT)                       # from its link-local address: ND only
        p.jeq(IPPROTO_ICMPV6, 0, "drop")
        p.load(LD_B, ICMPV6_TYPE)
        p.jeq(ND_SOLICITATION, "pass")
        p.jeq(ND_ADVERTISEMENT, 0, "drop")
        p.label("advertisement")                      # for its own address or link-local one only
        p.words(ND_TARGET, own6, "target link-local")
        p.goto("pass")
        p.label("target link-local")
        p.words(ND_TARGET, local, "drop")
    p.label("pass")
    p.ret(TC_ACT_UNSPEC)
    p.label("drop")
    p.ret(TC_ACT_SHOT)
    return p.assemble()


def facts(ops: bytes | None) -> GuardFacts | None:
    """The endpoint facts a guard program was built from (None: not a guard `program` built)."""
    if not ops or len(ops) % 8:
        return None
    ins = [struct.unpack_from("=HBBI", ops, i) for i in range(0, len(ops), 8)]
    try:
        mac = struct.pack(">IH", ins[1][3], ins[3][3])
        address = str(ipaddress.IPv4Address(ins[IPV4_COMPARE][3]))
        address6 = ""
        if len(ins) > IPV6_START + 2:                        # the IPv6 half (else: the two verdicts)
            address6 = str(ipaddress.IPv6Address(b"".join(struct.pack(">I", ins[IPV6_START + 2 * i + 1][3])
                                                          for i in range(4))))
        found = GuardFacts(":".join(f"{b:02x}" for b in mac), address, address6)
    except (IndexError, ValueError):
        return None
    return found if program(found) == ops else None
