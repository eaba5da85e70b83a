"""The eBPF fast path of ebpf-mode networks (the default where vpcnet.datapath.features finds the kernel and
capabilities for it, else `-o vpcnet.mode=ebpf`): two small tc programs, assembled here.

Why: on the lab, the cost of a vpcnet packet over the underlay's is the host namespace's own IP stack on
both hosts — the forward (fib lookups, ip_forward) and netfilter (Docker's and vpcnet's iptables-nft
chains). The traffic that pays it is exactly the traffic vpcnet already accepts statelessly and never
NATs: host CIDR <-> cluster CIDR (the conntrack bypass in vpcnet.datapath). These programs hand that
traffic straight between the container's veth and the uplink, as Cilium's "BPF host routing" does:

- `container_program` (tc ingress of each endpoint's host veth, i.e. packets leaving the container):
  source the endpoint's own address (what the routed path's anti-spoofing rule lets through),
  destination in the cluster CIDR, TTL > 1 -> `bpf_fib_lookup` in the host namespace (its routing table
  decides the egress and next hop), TTL decremented, then
  - outside the host CIDR (another host): `bpf_redirect_neigh` out of that device (the neighbour
    subsystem fills L2 and keeps the entry confirmed);
  - inside it (another container of this network on this host): MACs from the lookup, as the uplink
    program below, and `bpf_redirect` out of the other container's host veth, so same-host traffic
    skips the host's forwarding and netfilter too. Not `bpf_redirect_peer` (tc ingress may use it into
    any veth's peer since 5.10, and it would save the veth's queueing): it bypasses the host veth's
    transmit counters, which vpcnet's per-container receive metrics read.
- `uplink_program` (tc ingress of the uplink, one filter per network): source in the cluster CIDR,
  destination in the host CIDR, TTL > 1 -> `bpf_fib_lookup` (the endpoint's /32 route gives its host
  veth), MACs rewritten from the lookup, TTL decremented, `bpf_redirect_peer` straight into the
  container's namespace (no second queueing on the veth).

Only a lookup that succeeds is taken: the helper then has also checked the packet (GSO included) against
the egress MTU. Everything else — ARP, the gateway, the host itself, traffic leaving the VPC
(masqueraded), a spoofed source, a TTL about to expire, a packet needing fragmentation, a next hop whose
neighbour is not resolved yet (the stack resolves it; the following packets go the short way) — returns
TC_ACT_UNSPEC and takes the normal path, with vpcnet's firewall rules. So the fast path only ever
shortens what the slow path would have done (vpcnet's own rules accept that traffic statelessly), never
decides anything the routing table did not; what it bypasses is the host's other rules, DOCKER-USER
included (README, Firewall).

The programs are a few dozen instructions: assembled from this file at load time (no compiler, no object
file), loaded with the bpf(2) syscall and attached by vpcnet.datapath.tc through netlink. They are declared
"Dual BSD/GPL" to the kernel (bpf_fib_lookup is a GPL-only helper), as Cilium's datapath is.
Little-endian machines only (x86_64, arm64): packet fields are compared as loaded.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import platform
import struct
import sys

from vpcnet.errors import DataplaneError

# -- the instruction set (linux/bpf.h, linux/bpf_common.h) -------------------------------------------
LDX, ST, STX, ALU, JMP, JMP32, ALU64 = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
MEM = 0x60
K, X = 0x00, 0x08
ADD, SUB, AND, MOV = 0x00, 0x10, 0x50, 0xB0
JEQ, JGT, JNE, JLT, JLE, CALL, EXIT = 0x10, 0x20, 0x50, 0xA0, 0xB0, 0x80, 0x90
SIZES = {1: B, 2: H, 4: W, 8: DW}
FP = 10                                    # the frame pointer register (read only)

# helpers (enum bpf_func_id)
REDIRECT, FIB_LOOKUP, REDIRECT_NEIGH, REDIRECT_PEER = 23, 69, 152, 155
# bpf_fib_lookup() results
FIB_SUCCESS = 0
# tc verdicts
TC_ACT_UNSPEC = -1
AF_INET = 2
ETH_P_IP_LE = 0x0008                       # htons(0x0800) as a little-endian load sees it

# __sk_buff fields
SKB_IFINDEX, SKB_DATA, SKB_DATA_END = 40, 76, 80
# packet offsets: Ethernet, then the IPv4 header
ETH_DST, ETH_SRC, ETH_TYPE, ETH_LEN = 0, 6, 12, 14
IP_TOS, IP_TTL, IP_PROTO, IP_CHECK, IP_SADDR, IP_DADDR = (ETH_LEN + n for n in (1, 8, 9, 10, 12, 16))
PARSED = ETH_LEN + 20
# struct bpf_fib_lookup (64 bytes) on the stack at FIB, struct bpf_redir_neigh (20 bytes) at NH
FIB = -64
F_FAMILY, F_L4, F_IFINDEX, F_TOS, F_SRC, F_DST, F_SMAC, F_DMAC = (FIB + n for n in (0, 1, 8, 12, 16, 32, 52, 58))
NH = -88
NH_LEN = 20


class Asm:
    """A minimal eBPF assembler: one method per instruction form, labels for forward jumps."""

    def __init__(self):
        self.insns: list[list[int]] = []          # [code, dst, src, off, imm]
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.insns.append([code, dst, src, off, imm])

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = len(self.insns)

    # moves and arithmetic
    def mov(self, dst: int, src: int) -> None:
        self._emit(ALU64 | MOV | X, dst, src)

    def movi(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | MOV | K, dst, imm=imm)

    def addi(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | ADD | K, dst, imm=imm)

    def subi(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | SUB | K, dst, imm=imm)

    def andi32(self, dst: int, imm: int) -> None:
        self._emit(ALU | AND | K, dst, imm=_s32(imm))

    # memory
    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        self._emit(LDX | MEM | SIZES[size], dst, src, off)

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        self._emit(STX | MEM | SIZES[size], dst, src, off)

    def st(self, size: int, dst: int, off: int, imm: int) -> None:
        self._emit(ST | MEM | SIZES[size], dst, off=off, imm=imm)

    # control flow
    def jump(self, op: int, dst: int, target: str, imm: int | None = None, src: int | None = None,
             wide: bool = True) -> None:
        cls = JMP if wide else JMP32
        if src is not None:
            self._emit(cls | op | X, dst, src)
        else:
            self._emit(cls | op | K, dst, imm=_s32(imm or 0))
        self.fixups.append((len(self.insns) - 1, target))

    def call(self, helper: int) -> None:
        self._emit(JMP | CALL, imm=helper)

    def exit(self) -> None:
        self._emit(JMP | EXIT)

    def assemble(self) -> bytes:
        for at, target in self.fixups:
            self.insns[at][3] = self.labels[target] - at - 1
        return b"".join(struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
                        for code, dst, src, off, imm in self.insns)


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _le(addr: ipaddress.IPv4Address) -> int:
    """An address as a 32-bit load from packet memory sees it (network bytes, little-endian load)."""
    return int.from_bytes(addr.packed, "little")


def _net(cidr: str) -> tuple[int, int]:
    net = ipaddress.IPv4Network(cidr, strict=True)
    return _le(net.network_address), _le(net.netmask)


# -- the two programs ----------------------------------------------------------------------------------
# Registers: r6 the skb context, r7 the source address, r8 the destination, r2/r3 packet start/end after
# each (re)load; r1-r5 are clobbered by every helper call.

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


def container_program(host_cidr: str, cluster_cidr: str, address: str | None = None,
                      anchor_ifindex: int = 0) -> bytes:
    """tc ingress of an endpoint's host veth: container -> another host of the cluster, or -> another
    container of this network on this host. `address`: the endpoint's own address, the only source that
    takes the fast path (what the routed path's anti-spoofing check would let through); without it, any
    source in the host CIDR (the probe's form)."""
    a = Asm()
    _parse(a)
    if address is not None:
        a.jump(JNE, 7, "pass", imm=_s32(_le(ipaddress.IPv4Address(address))), wide=False)
    else:
        _require_in(a, 7, host_cidr)
    _require_in(a, 8, cluster_cidr)
    net, mask = _net(host_cidr)
    a.mov(4, 8)
    a.andi32(4, mask)
    a.jump(JEQ, 4, "local", imm=net, wide=False)     # this host's own containers: straight into theirs
    _fib_lookup(a)
    a.jump(JNE, 0, "pass", imm=FIB_SUCCESS)
    _decrement_ttl(a, "ttl_done")
    _redirect_neigh(a)
    a.label("local")
    _fib_lookup(a)
    _to_endpoint(a, anchor_ifindex, "local_ttl_done", peer=False)
    _pass(a)
    return a.assemble()


def uplink_program(host_cidr: str, cluster_cidr: str, anchor_ifindex: int) -> bytes:
    """tc ingress of the uplink: another host of the cluster -> a container of this network."""
    a = Asm()
    _parse(a)
    _require_in(a, 7, cluster_cidr)
    _require_in(a, 8, host_cidr)
    _fib_lookup(a)
    _to_endpoint(a, anchor_ifindex, "ttl_done")
    _pass(a)
    return a.assemble()


def _to_endpoint(a: Asm, anchor_ifindex: int, done: str, peer: bool = True) -> None:
    """After a fib lookup towards the host CIDR: into the container behind the /32 route's host veth
    (MACs from the lookup, TTL decremented). `peer`: bpf_redirect_peer, straight into the container's
    namespace (no second queueing on the veth); else bpf_redirect out of the host veth, which then counts
    the packet as the container's (vpcnet_endpoint_receive_* read the host veth's transmit counters)."""
    # Only to an endpoint's veth: not back out where it came from, not to the network's anchor (an
    # address no endpoint holds, routed by the connected route: the normal path answers it). The gateway
    # is a local address: the lookup does not succeed for it.
    a.ldx(4, 5, FP, F_IFINDEX)
    a.jump(JEQ, 5, "pass", imm=anchor_ifindex)
    a.ldx(4, 4, 6, SKB_IFINDEX)
    a.jump(JEQ, 5, "pass", src=4)
    a.jump(JNE, 0, "pass", imm=FIB_SUCCESS)
    _decrement_ttl(a, done)
    for off in range(0, 6, 2):                    # dst MAC = the container's, src MAC = the host veth's
        a.ldx(2, 4, FP, F_DMAC + off)
        a.stx(2, 2, ETH_DST + off, 4)
        a.ldx(2, 4, FP, F_SMAC + off)
        a.stx(2, 2, ETH_SRC + off, 4)
    a.ldx(4, 1, FP, F_IFINDEX)
    a.movi(2, 0)
    a.call(REDIRECT_PEER if peer else REDIRECT)
    a.exit()


# -- loading ------------------------------------------------------------------------------------------
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
SYS_BPF = {"x86_64": 321, "aarch64": 280}
LICENSE = b"Dual BSD/GPL\0"
_libc = ctypes.CDLL(None, use_errno=True)


def load(insns: bytes, name: str) -> int:
    """Load a tc (sched_cls) program; the file descriptor is the caller's to close. A refusal raises
    DataplaneError with the reason (and, for the verifier, the end of its log)."""
    if sys.byteorder != "little":
        raise DataplaneError("vpcnet.mode=ebpf needs a little-endian machine")
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise DataplaneError(f"vpcnet.mode=ebpf does not know the bpf syscall on {platform.machine()}")
    # First without the verifier's log: asking for one makes the kernel format every step of the
    # verification, which costs more than the load itself. Only a refusal is loaded again, with the log,
    # to say why.
    fd, err = _prog_load(nr, insns, name, None)
    if fd >= 0:
        return fd
    log = ctypes.create_string_buffer(1 << 16)
    fd, err = _prog_load(nr, insns, name, log)
    if fd >= 0:              # refused once, accepted now (a transient failure): fine
        return fd
    verifier = log.value.decode(errors="replace").strip().splitlines()[-6:]
    hint = {errno.EPERM: "needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN)",
            errno.EINVAL: "this kernel refuses it (eBPF host routing needs Linux 5.10 or newer)",
            errno.ENOSYS: "this kernel has no bpf(2)"}.get(err, os.strerror(err))
    raise DataplaneError(f"cannot load eBPF program {name}: {hint}"
                         + (f"; verifier: {' | '.join(verifier)}" if verifier else ""))


def _prog_load(nr: int, insns: bytes, name: str, log) -> tuple[int, int]:
    """One BPF_PROG_LOAD (retried on EAGAIN, as the verifier asks); `log`: a buffer for the verifier's log
    (log level 1), or None for none. Returns (fd or -1, errno)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(LICENSE, len(LICENSE))
    attr = bytearray(128)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_SCHED_CLS, len(insns) // 8,
                     ctypes.addressof(code), ctypes.addressof(lic), 1 if log is not None else 0,
                     len(log) if log is not None else 0, ctypes.addressof(log) if log is not None else 0)
    attr[48:48 + 15] = name.encode()[:15].ljust(15, b"\0")
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    fd, err = -1, 0
    for _ in range(3):                                            # EAGAIN: the verifier asks to retry
        fd = _libc.syscall(nr, BPF_PROG_LOAD, buf, len(attr))
        err = ctypes.get_errno()
        if fd >= 0 or err != errno.EAGAIN:
            break
    return fd, err
