#!/usr/bin/env python3
"""The hand assembler against restricted C, for the IPv4 container program (root; clang on this machine only
for the run, never for vpcnet itself): docs/datapath.md, "Why a Python assembler, not C", has the decision.

Options, both loaded by vpcnet's own bpf(2) path (vpcnet.datapath.ebpf.loader.load) in a namespace set up as
a vpcnet host (bench/fastpath_cost.py's), with the endpoint's entry in an IPv4 endpoint map:
- `asm`: vpcnet.datapath.ebpf.programs.container_program, assembled in Python;
- `c`: bench/ebpf_c/container4.c, compiled once per run with `clang -O2 -g -target bpf -c` (as a build would
  ship it); its object is read by the small ELF reader below (the program section's instructions, the
  ld_imm64 relocations of its maps and of its read-only data) and linked per load: the maps' descriptors
  put in, and what the assembler builds into the instructions (CIDRs, anchor, uplinks, whether peers are
  counted) written into a one-entry array map, frozen read-only, that the program's .rodata loads point at
  (the verifier then sees constants, as with libbpf's `const volatile`).

Per round (`--rounds`, alternating which option goes first), each option is prepared (assembled / linked)
and loaded `--loads` times (each timed), then runs the crafted packets of bench/fastpath_cost.py through
BPF_PROG_TEST_RUN (`--repeat` single runs per case: the median of the kernel's ns). Reported per option:
instructions and bytes (as handed to the kernel), the verifier's processed instructions and the translated
and JITed sizes (bpf_prog_info), prepare and load+verify times (median, min-max over every load), ns per
packet (median over rounds, min-max). Before measuring, the equivalence check: both options, built for the
same network, endpoint and published ports, get each packet of `EQUIVALENCE` (BPF_PROG_TEST_RUN: same
verdict, same bytes out) and, with peer counting, leave the same peer map; then each is attached in turn to
the endpoint's host veth and the redirected packets must leave by the same device (the devices' counters).
    python3 bench/ebpf_c_vs_asm.py [--rounds 9] [--loads 5] [--repeat 2000]
    python3 bench/ebpf_c_vs_asm.py --check-only [--object other.o]      # the equivalence check alone
Writes bench/results/ebpf_c_vs_asm.json (not with --check-only) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
THIS = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, THIS)

import fastpath_cost  # noqa: E402  (the namespace, the packets, ns per run)

SOURCE = os.path.join(HERE, "ebpf_c", "container4.c")
SECTION, PROGRAM = "tc", "container4"
HOST, CLUSTER, ME, OTHER, REMOTE = (fastpath_cost.HOST, fastpath_cost.CLUSTER, fastpath_cost.ME,
                                    fastpath_cost.OTHER, fastpath_cost.REMOTE)
PUBLISHED = fastpath_cost.PUBLISHED
MANY = tuple(("tcp", 7000 + n) for n in range(64))      # every slot, none the packets' source port

# -- bpf(2) beyond vpcnet's loader ----------------------------------------------------------------------------
BPF_MAP_FREEZE, BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_TEST_RUN = 22, 15, 10
BPF_MAP_TYPE_ARRAY, BPF_F_RDONLY_PROG = 2, 1 << 7
BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE = 1, 2
LD_IMM64 = 0x18
R_BPF_64_64 = 1
TC_ACT_REDIRECT = 7
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> bytes:
    buf = ctypes.create_string_buffer(attr, len(attr))
    nr = {"x86_64": 321, "aarch64": 280}[platform.machine()]
    ret = _libc.syscall(nr, cmd, buf, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return ret.to_bytes(4, "little") + buf.raw


def prog_info(fd: int) -> dict[str, int]:
    """The verifier's and the JIT's view of a loaded program (struct bpf_prog_info; verified_insns: 5.16+)."""
    info = ctypes.create_string_buffer(256)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, len(info), ctypes.addressof(info)))
    jited, xlated = struct.unpack_from("<II", info.raw, 16)
    return {"xlated_bytes": xlated, "jited_bytes": jited, "verified_insns": struct.unpack_from("<I", info.raw, 216)[0]}


# -- the object file --------------------------------------------------------------------------------------------
class ElfObject:
    """What loading needs of a clang -target bpf object: sections by name, symbols, relocations."""

    def __init__(self, raw: bytes):
        if raw[:4] != b"\x7fELF" or raw[4] != 2 or raw[5] != 1:
            raise ValueError("not a little-endian 64-bit ELF object")
        if struct.unpack_from("<H", raw, 18)[0] != 247:                     # EM_BPF
            raise ValueError("not a BPF object (e_machine is not EM_BPF)")
        shoff, = struct.unpack_from("<Q", raw, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", raw, 0x3A)
        headers = [struct.unpack_from("<IIQQQQIIQQ", raw, shoff + i * shentsize) for i in range(shnum)]
        self.data = [raw[h[4]:h[4] + h[5]] if h[1] != 8 else bytes(h[5]) for h in headers]    # SHT_NOBITS
        names = self.data[shstrndx]
        self.names = [names[h[0]:names.index(b"\0", h[0])].decode() for h in headers]
        self.types = [h[1] for h in headers]
        self.info = [h[7] for h in headers]
        symtab = self.types.index(2)                                        # SHT_SYMTAB
        strtab = self.data[headers[symtab][6]]
        self.symbols = []                                                    # (name, section index, value, size)
        for off in range(0, len(self.data[symtab]), 24):
            name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", self.data[symtab], off)
            self.symbols.append((strtab[name:strtab.index(b"\0", name)].decode(), shndx, value, size))

    def section(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"the object has no section {name!r}")
        return self.names.index(name)

    def relocations(self, section: int) -> list[tuple[int, tuple[str, int, int, int]]]:
        """(instruction index, symbol) of each relocation of `section`; only ld_imm64's R_BPF_64_64 are
        understood (no calls to functions of another section: the program is one inlined function)."""
        out = []
        for i, kind in enumerate(self.types):
            if kind != 9 or self.info[i] != section:                         # SHT_REL
                continue
            for off in range(0, len(self.data[i]), 16):
                where, rinfo = struct.unpack_from("<QQ", self.data[i], off)
                symbol = self.symbols[rinfo >> 32]
                if rinfo & 0xFFFFFFFF != R_BPF_64_64:
                    raise ValueError(f"relocation type {rinfo & 0xFFFFFFFF} against {symbol[0]!r} not supported")
                out.append((where // 8, symbol))
        return out

    def rodata(self, values: dict[str, int | list[int]]) -> bytes:
        """The .rodata section with each named `const volatile` u32 (or u32 array) set."""
        index = self.section(".rodata")
        image = bytearray(self.data[index])
        for name, value in values.items():
            sym = next((s for s in self.symbols if s[0] == name and s[1] == index), None)
            if sym is None:
                raise ValueError(f"the object has no read-only variable {name!r}")
            words = value if isinstance(value, list) else [value]
            if 4 * len(words) > sym[3]:
                raise ValueError(f"{name}: {len(words)} values do not fit in {sym[3]} bytes")
            struct.pack_into(f"<{len(words)}I", image, sym[2], *words)
        return bytes(image)


def peer_map() -> int:
    """A peer map of vpcnet's shape under another name: the host's plugins find theirs by name, never this."""
    from vpcnet.datapath.ebpf import maps
    return maps.create_map(maps.BPF_MAP_TYPE_LRU_PERCPU_HASH, maps.KEY_SIZE, maps.VALUE_SIZE, 1024, b"cmp_peers")


def rodata_map(image: bytes) -> int:
    """A one-entry array map holding `image`, read-only to programs and frozen (so the verifier reads it as
    constants)."""
    from vpcnet.datapath.ebpf import maps
    fd = maps.create_map(BPF_MAP_TYPE_ARRAY, 4, len(image), 1, b"container4.ro", BPF_F_RDONLY_PROG)
    try:
        maps.update(fd, struct.pack("<I", 0), image)
        _bpf(BPF_MAP_FREEZE, struct.pack("<I", fd).ljust(16, b"\0"))
    except BaseException:
        os.close(fd)
        raise
    return fd


def link(obj: ElfObject, map_fds: dict[str, int | None], rodata_fd: int) -> bytes:
    """The program's instructions with every map relocation resolved: a map of the .maps section gets the
    descriptor `map_fds` names (None: no such map in this build; its ld_imm64 loads 0, which the verifier
    refuses as a map unless the frozen configuration rules that code out), a .rodata variable the
    (descriptor, offset) of the frozen configuration."""
    section = obj.section(SECTION)
    insns = bytearray(obj.data[section])
    maps_section = obj.names.index(".maps") if ".maps" in obj.names else -1
    rodata_section = obj.names.index(".rodata") if ".rodata" in obj.names else -1
    for at, (name, shndx, value, _size) in obj.relocations(section):
        if insns[8 * at] != LD_IMM64:
            raise ValueError(f"relocation against {name!r} at instruction {at}, which is not an ld_imm64")
        if shndx == maps_section:
            if name not in map_fds:
                raise ValueError(f"the program uses map {name!r}, which the caller does not give")
            fd = map_fds[name]
            insns[8 * at + 1] = (BPF_PSEUDO_MAP_FD << 4 if fd is not None else 0) | (insns[8 * at + 1] & 0x0F)
            struct.pack_into("<i", insns, 8 * at + 4, fd if fd is not None else 0)
        elif shndx == rodata_section:
            offset = value + struct.unpack_from("<i", insns, 8 * at + 4)[0]
            insns[8 * at + 1] = (BPF_PSEUDO_MAP_VALUE << 4) | (insns[8 * at + 1] & 0x0F)
            struct.pack_into("<i", insns, 8 * at + 4, rodata_fd)
            struct.pack_into("<i", insns, 8 * at + 12, offset)
        else:
            raise ValueError(f"relocation against {name!r} in section {obj.names[shndx]!r}: not supported")
    return bytes(insns)


def compile_c(source: str, out: str) -> str:
    """`clang -O2 -g -target bpf -c`; returns clang's version line. (Debian keeps asm/types.h per
    architecture: its directory is added when there.)"""
    include = f"/usr/include/{platform.machine()}-linux-gnu"
    cmd = ["clang", "-O2", "-g", "-target", "bpf", *(["-I", include] if os.path.isdir(include) else []),
           "-c", source, "-o", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr[-2000:]}")
    return subprocess.run(["clang", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


# -- both options, built for one network ------------------------------------------------------------------------
def _le(address: str) -> int:
    return int.from_bytes(ipaddress.IPv4Address(address).packed, "little")


def config(anchor: int, uplinks: list[int] | None, counting: bool) -> dict[str, int | list[int]]:
    host, cluster = ipaddress.IPv4Network(HOST), ipaddress.IPv4Network(CLUSTER)
    return {"host_net": _le(str(host.network_address)), "host_mask": _le(str(host.netmask)),
            "cluster_net": _le(str(cluster.network_address)), "cluster_mask": _le(str(cluster.netmask)),
            "anchor_ifindex": anchor, "any_uplink": int(uplinks is None), "n_uplinks": len(uplinks or []),
            "uplinks": list(uplinks or []), "count_peers": int(counting)}


class Options:
    """Builds and loads both options for the namespace's network; every descriptor made is closed by close()."""

    def __init__(self, obj: ElfObject, index: dict[str, int]):
        from vpcnet.datapath.ebpf.endpoints import EndpointFacts
        self.obj, self.index = obj, index
        self.facts = EndpointFacts()
        self.fds: list[int] = []

    def prepare(self, option: str, uplinks: list[int] | None, peer_fd: int | None) -> tuple[bytes, list[int]]:
        """The instructions, and the descriptors made for them (closed with the program)."""
        from vpcnet.datapath.ebpf import programs
        anchor = self.index["vpc-anchor"]
        if option == "asm":
            return programs.container_program(HOST, CLUSTER, self.facts.fd(4), anchor, uplinks, map_fd=peer_fd), []
        ro = rodata_map(self.obj.rodata(config(anchor, uplinks, peer_fd is not None)))
        return link(self.obj, {"vpcnet_ep4": self.facts.fd(4), "vpcnet_peers": peer_fd}, ro), [ro]

    def load(self, option: str, uplinks: list[int] | None, peer_fd: int | None = None) -> int:
        """`uplinks` as container_program takes them (None: any device)."""
        from vpcnet.datapath.ebpf import loader
        insns, extra = self.prepare(option, uplinks, peer_fd)
        fd = loader.load(insns, f"vpcnet_{option}")
        for extra_fd in extra:                  # the program holds its maps
            os.close(extra_fd)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.facts.close()


def test_run(fd: int, packet: bytes, ifindex: int) -> tuple[int, bytes]:
    """One BPF_PROG_TEST_RUN: (verdict, the packet as the program left it)."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx = ctypes.create_string_buffer(192)
    struct.pack_into("<I", ctx, 40, ifindex)
    attr = bytearray(80)
    struct.pack_into("<IIIIQQII", attr, 0, fd, 0, len(packet), len(data_out), ctypes.addressof(data_in),
                     ctypes.addressof(data_out), 1, 0)
    struct.pack_into("<IIQQ", attr, 40, len(ctx), 0, ctypes.addressof(ctx), 0)
    out = _bpf(BPF_PROG_TEST_RUN, bytes(attr))[4:]
    retval, size_out = struct.unpack_from("<iI", out, 4)
    return retval, data_out.raw[:size_out]


# -- the equivalence check --------------------------------------------------------------------------------------
def _options_packet(src: str, dst: str) -> bytes:
    """An IPv4 UDP packet whose header carries 4 bytes of options (IHL 6)."""
    p = bytearray(fastpath_cost.packet4(src, dst))
    return bytes(p[:14]) + bytes([0x46]) + bytes(p[15:34]) + b"\x01\x01\x01\x00" + bytes(p[34:])


def _with(packet: bytes, offset: int, raw: bytes) -> bytes:
    return packet[:offset] + raw + packet[offset + len(raw):]


def equivalence_packets() -> list[tuple[str, str, bytes]]:
    """(case, the host veth it arrives on, packet): every branch of the program but a truncated IPv4 header
    (BPF_PROG_TEST_RUN refuses one: EINVAL)."""
    p4 = fastpath_cost.packet4
    return [
        ("to another host", "vhendpoint", p4(ME, REMOTE)),
        ("to this host's container", "vhendpoint", p4(ME, OTHER)),
        ("outside the cluster", "vhendpoint", p4(ME, "198.51.100.7")),
        ("forged source", "vhendpoint", p4("10.77.3.9", REMOTE)),
        ("forged source, same host", "vhendpoint", p4("10.77.3.9", OTHER)),
        ("TTL 1", "vhendpoint", _with(p4(ME, REMOTE), 22, b"\x01")),
        ("TTL 1, same host", "vhendpoint", _with(p4(ME, OTHER), 22, b"\x01")),
        ("TTL 2", "vhendpoint", _with(p4(ME, REMOTE), 22, b"\x02")),
        ("checksum carry", "vhendpoint", _with(p4(ME, REMOTE), 24, b"\xfe\xff")),
        ("to the gateway", "vhendpoint", p4(ME, "10.77.3.1")),
        ("to an unused host address (anchor)", "vhendpoint", p4(ME, "10.77.3.77")),
        ("to itself", "vhendpoint", p4(ME, ME)),
        ("to another host, unrouted cluster", "vhendpoint", p4(ME, "10.77.200.1")),
        ("ARP", "vhendpoint", _with(p4(ME, REMOTE), 12, b"\x08\x06")),
        ("IPv6 ethertype", "vhendpoint", _with(p4(ME, REMOTE), 12, b"\x86\xdd")),
        ("from a veth without an entry", "vhother", p4(OTHER, REMOTE)),
        ("published reply tcp/8080", "vhendpoint", _with(p4(ME, REMOTE, 8080), 23, b"\x06")),
        ("published reply udp/5353", "vhendpoint", p4(ME, OTHER, 5353)),
        ("udp/8080 (tcp published)", "vhendpoint", p4(ME, REMOTE, 8080)),
        ("other port", "vhendpoint", p4(ME, REMOTE, 4000)),
        ("fragment", "vhendpoint", _with(p4(ME, REMOTE), 20, b"\x20\x00")),
        ("IP options", "vhendpoint", _options_packet(ME, REMOTE)),
        ("header only, no ports", "vhendpoint", p4(ME, REMOTE)[:34]),
        ("ICMP", "vhendpoint", _with(p4(ME, REMOTE), 23, b"\x01")),
    ]


def endpoint_setups() -> list[tuple[str, list[tuple[str, int]], list[str] | None]]:
    """(label, the endpoint's published ports, the uplinks by name: None = any device)."""
    wide = [("tcp", 10000 + n) for n in range(70)]
    up = ["uplink0"]
    return [("no ports", [], up), ("2 published ports", list(PUBLISHED), up),
            ("64 published ports", [("udp", 5353), *[("tcp", 7000 + n) for n in range(62)], ("tcp", 8080)], up),
            ("70 published ports (past the slots)", wide, up), ("no uplink yet", [], []),
            ("any device", [], None), ("two uplinks", [], ["vhother", "uplink0"]),
            ("the route's device is no uplink", [], ["vhother"])]


def check(obj: ElfObject, index: dict[str, int]) -> list[str]:
    """Both options on every packet and setup (and with peer counting); the differences, [] when none."""
    from vpcnet.datapath.ebpf import maps
    differences = []
    for label, published, uplinks in endpoint_setups():
        for counting in (False, True):
            options = Options(obj, index)
            peers = {o: peer_map() if counting else None for o in ("asm", "c")}
            try:
                options.facts.write(index["vhendpoint"], ME, published)
                up = None if uplinks is None else [index[name] for name in uplinks]
                fds = {o: options.load(o, up, peers[o]) for o in ("asm", "c")}
                for case, dev, packet in equivalence_packets():
                    try:
                        got = {o: test_run(fds[o], packet, index[dev]) for o in fds}
                    except OSError as exc:
                        raise OSError(exc.errno, f"{label}, {case}: {exc}") from None
                    if got["asm"] != got["c"]:
                        differences.append(f"{label}{', counting' if counting else ''}, {case}: verdict "
                                           f"asm {got['asm'][0]} c {got['c'][0]}, packet "
                                           f"{'same' if got['asm'][1] == got['c'][1] else 'differs'}")
                if counting:
                    counted = {o: sorted(maps.entries(fd)) for o, fd in peers.items() if fd is not None}
                    if counted["asm"] != counted["c"] or not counted["asm"]:
                        odd = set(counted["asm"]) ^ set(counted["c"])
                        differences.append(f"{label}: peer maps differ ({len(counted['asm'])} and {len(counted['c'])} "
                                           f"keys, {len(odd)} (key, bytes, packets) not in both)")
            finally:
                options.close()
                for fd in peers.values():
                    if fd is not None:
                        os.close(fd)
    return differences + check_devices(obj, index)


def _tx(dev: str) -> int:
    with open(f"/sys/class/net/{dev}/statistics/tx_packets") as fh:
        return int(fh.read())


def check_devices(obj: ElfObject, index: dict[str, int], count: int = 20) -> list[str]:
    """Each option attached in turn to the endpoint's host veth (tc ingress): `count` packets sent by the
    container side (vcendpoint) must leave by the same device under both (redirects only: what a test run
    cannot show is where a redirect goes)."""
    from vpcnet.datapath import rtnl
    differences = []
    sock = rtnl.open_socket()
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    options = Options(obj, index)
    try:
        rtnl.add_clsact(sock, index["vhendpoint"])
        options.facts.write(index["vhendpoint"], ME, [])
        fds = {o: options.load(o, [index["uplink0"]]) for o in ("asm", "c")}
        raw.bind(("vcendpoint", 0))
        for case, dst, want in (("to another host", REMOTE, "uplink0"), ("to this host's container", OTHER, "vhother")):
            left = {}
            for option, fd in fds.items():
                rtnl.replace_bpf_filter(sock, index["vhendpoint"], 0xFFFFFFF2, 1, 0x0800, 1, fd, f"cmp-{option}")
                before = {dev: _tx(dev) for dev in ("uplink0", "vhother")}
                for _ in range(count):
                    raw.send(fastpath_cost.packet4(ME, dst))
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline and max(_tx(d) - before[d] for d in before) < count:
                    time.sleep(0.01)
                left[option] = sorted(d for d in before if _tx(d) - before[d] >= count)
            if left["asm"] != left["c"] or left["asm"] != [want]:
                differences.append(f"{case}: left by {left} (expected {want} under both)")
    finally:
        raw.close()
        subprocess.run(["tc", "qdisc", "del", "dev", "vhendpoint", "clsact"], check=False, capture_output=True)
        sock.close()
        options.close()
    return differences


# -- the measurement --------------------------------------------------------------------------------------------
def links() -> dict[str, int]:
    return {line.split(":")[1].strip().split("@")[0]: int(line.split(":")[0])
            for line in fastpath_cost.sh("ip", "-o", "link").splitlines()}


def child(obj_path: str, order: list[str], loads: int, repeat: int, check_first: bool, check_only: bool) -> dict:
    """In the host namespace: the equivalence check (`check_first`), then each option's loads and ns per
    packet. The object is read once (as a process shipping it would); preparing the C option is linking it
    and writing its frozen configuration map."""
    with open(obj_path, "rb") as fh:
        obj = ElfObject(fh.read())
    index = links()
    out: dict = {"differences": check(obj, index) if check_first else None}
    if check_only:
        return out
    for counting in (False, True):
        for option in order:
            out[option + ("+peers" if counting else "")] = measure(obj, index, option, counting, loads, repeat)
    return out


def measure(obj: ElfObject, index: dict[str, int], option: str, counting: bool, loads: int, repeat: int) -> dict:
    """`loads` times prepared and loaded (each timed), then ns per packet of each case."""
    from vpcnet.datapath.ebpf import loader
    options = Options(obj, index)
    peers = peer_map() if counting else None
    try:
        options.facts.write(index["vhendpoint"], ME, [])
        prepare, load = [], []
        fd = -1
        for _ in range(loads):
            start = time.perf_counter_ns()
            insns, extra = options.prepare(option, [index["uplink0"]], peers)
            ready = time.perf_counter_ns()
            fd = loader.load(insns, f"vpcnet_{option}")
            done = time.perf_counter_ns()
            options.fds.append(fd)
            for extra_fd in extra:
                os.close(extra_fd)
            prepare.append((ready - start) / 1e6)
            load.append((done - ready) / 1e6)
        info = prog_info(fd)
        cases = {}
        for published in ((), PUBLISHED, MANY):
            options.facts.write(index["vhendpoint"], ME, list(published))
            label = f", publishing {len(published)} ports" if published else ""
            cases[f"to another host{label}"] = fastpath_cost.ns_per_run(
                fd, fastpath_cost.packet4(ME, REMOTE), index["vhendpoint"], repeat)
            cases[f"to this host's container{label}"] = fastpath_cost.ns_per_run(
                fd, fastpath_cost.packet4(ME, OTHER), index["vhendpoint"], repeat)
        return {"insns": len(insns) // 8, "bytes": len(insns), **info, "prepare_ms": prepare, "load_ms": load,
                "ns": cases}
    finally:
        options.close()
        if peers is not None:
            os.close(peers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--check-only", action="store_true",
                        help="the equivalence check alone (exit 1 on a difference)")
    parser.add_argument("--object", help="a compiled object to use instead of compiling bench/ebpf_c/container4.c")
    parser.add_argument("--child", nargs=3, metavar=("OBJECT", "ORDER", "CHECK"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "ebpf_c_vs_asm.json"))
    args = parser.parse_args()
    if not 1 <= args.rounds <= 100 or not 1 <= args.loads <= 100 or not 1 <= args.repeat <= 1_000_000:
        parser.error("--rounds 1..100, --loads 1..100, --repeat 1..1000000")
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1].split(","), args.loads, args.repeat,
                               args.child[2] == "check", args.check_only)))
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (a network namespace, bpf(2))")
    with tempfile.TemporaryDirectory(prefix="ebpf-c-") as tmp:
        obj_path = os.path.abspath(args.object) if args.object else os.path.join(tmp, "container4.o")
        if args.object and not os.path.isfile(obj_path):
            parser.error(f"--object {obj_path}: no such file")
        compiler = "given" if args.object else compile_c(SOURCE, obj_path)
        object_bytes = os.path.getsize(obj_path)
        ns = fastpath_cost.host_namespace()
        rounds = []
        try:
            for r in range(1 if args.check_only else args.rounds):
                order = "asm,c" if r % 2 == 0 else "c,asm"
                cmd = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--child", obj_path,
                       order, "check" if r == 0 else "-", "--loads", str(args.loads), "--repeat", str(args.repeat),
                       *(["--check-only"] if args.check_only else [])]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600,
                                      env=dict(os.environ, PYTHONPATH=THIS))
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-3000:])
                rounds.append(json.loads(proc.stdout))
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    differences = rounds[0]["differences"]
    print("equivalence: " + ("same verdicts, packets, peer maps and devices on every case" if not differences
                             else f"{len(differences)} differences:\n  " + "\n  ".join(differences)))
    if args.check_only:
        return 1 if differences else 0
    doc = summarise(rounds, args, compiler, object_bytes)
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    print_table(doc)
    return 1 if differences else 0


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


VARIANTS = ("asm", "c", "asm+peers", "c+peers")


def summarise(rounds: list[dict], args: argparse.Namespace, compiler: str, object_bytes: int) -> dict:
    options = {}
    for option in VARIANTS:
        first = rounds[0][option]
        options[option] = {
            "what": ("vpcnet.datapath.ebpf.programs.container_program (Python assembler)" if option.startswith("asm")
                     else f"bench/ebpf_c/container4.c ({compiler}, -O2 -g -target bpf; .rodata frozen config)")
            + (", peer counting on" if option.endswith("+peers") else ", peer counting off"),
            "insns": first["insns"], "bytes": first["bytes"], "verified_insns": first["verified_insns"],
            "xlated_bytes": first["xlated_bytes"], "jited_bytes": first["jited_bytes"],
            "prepare_ms": _spread([v for r in rounds for v in r[option]["prepare_ms"]]),
            "load_verify_ms": _spread([v for r in rounds for v in r[option]["load_ms"]]),
            "ns_per_packet": {case: _spread([r[option]["ns"][case] for r in rounds]) for case in first["ns"]}}
    return {"command": f"python3 bench/ebpf_c_vs_asm.py --rounds {args.rounds} --loads {args.loads} "
                       f"--repeat {args.repeat}",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kernel": platform.release(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "this": fastpath_cost.code_of(THIS),
            "equivalence_differences": rounds[0]["differences"], "object_file_bytes": object_bytes,
            "note": "the IPv4 container program built for one network (uplink: the namespace's uplink0), without "
                    "and with peer counting; prepare: assembling (asm) or linking the object read once and "
                    "writing its frozen configuration map (c); load+verify: BPF_PROG_LOAD without a log; ns per "
                    "packet: median over rounds of each round's median of single BPF_PROG_TEST_RUN runs",
            "options": options}


def print_table(doc: dict) -> None:
    o = doc["options"]
    fmt = lambda s: f"{s['median']} ({s['min']}-{s['max']})"          # noqa: E731
    rows = [("instructions (bytes)", lambda v: f"{v['insns']} ({v['bytes']})"),
            ("verifier: processed instructions", lambda v: v["verified_insns"]),
            ("translated / JITed bytes", lambda v: f"{v['xlated_bytes']} / {v['jited_bytes']}"),
            ("prepare ms", lambda v: fmt(v["prepare_ms"])),
            ("load+verify ms", lambda v: fmt(v["load_verify_ms"]))]
    rows += [(f"ns/packet, {case}", lambda v, case=case: fmt(v["ns_per_packet"][case]))
             for case in o["asm"]["ns_per_packet"]]
    print(f"{doc['this']}\nC object file: {doc['object_file_bytes']} bytes (-g: BTF and DWARF included)\n")
    print(f"| | {' | '.join(VARIANTS)} |\n|---{'|---' * len(VARIANTS)}|")
    for label, cell in rows:
        print(f"| {label} | {' | '.join(str(cell(o[v])) for v in VARIANTS)} |")


if __name__ == "__main__":
    sys.exit(main())
