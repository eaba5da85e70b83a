"""The endpoints' facts the shared programs read (vpcnet.datapath.ebpf.programs, programs6): one hash map per
family, keyed by the host veth's interface index (u32, what `skb->ifindex` is on that veth's tc hooks), so one
verified program per network and family serves every endpoint, and CreateEndpoint writes an entry instead of
loading a program of its own.

Value (IPv4, VALUE4 = 264 bytes; IPv6, VALUE6 = 276): the endpoint's own address (4 or 16 bytes, network
order: the only source of the fast path, the only address counted), then `published` (u32: how many
(proto, port) the endpoint publishes; past programs.MAX_PUBLISHED, all its TCP, UDP and SCTP cluster traffic
takes the normal path and no port is listed), then MAX_PUBLISHED slots of u32, each the bytes
[proto, 0, port high, port low] (what a program builds from the packet: the source port's two bytes as
loaded, shifted up 16, or'ed with the protocol number). One entry holds all of an endpoint's facts of a
family, so replacing it (published ports changing) is one atomic update: a program sees the old facts or
the new ones, never half of each.

The maps are a process's own (`EndpointFacts`, one per Dataplane: interface indexes are per network
namespace, and the lab runs several hosts' namespaces in one process) and unpinned: a program holds the
maps it was loaded with, so after a restart (or a kill -9) every filter keeps working with the old
process's programs and maps until the new process's first datapath pass attaches its own programs and
writes its own entries (vpcnet.datapath.dataplane: an entry this process never wrote is adopted, not
drift; one it wrote and that is gone or differs is repaired). Not preallocated: memory follows the
endpoints (MAX_ENDPOINTS per family and process).

This host's endpoints by address (`local`, ebpf mode only): a second hash map per family, keyed by the
container's address (IPv4: 4 bytes, IPv6: 16, network order), whose value (LOCAL_VALUE = 24 bytes) holds what
delivering into that container needs without `bpf_fib_lookup`: the host veth's index (u32), the longest frame
(u32: the host veth's MTU + 14, the Ethernet header; a longer one, GSO included, takes the fib path, which
checks it against the MTU), the container's MAC (6 bytes: its end of the veth's, as the kernel has it), the
host veth's MAC (6), 2 bytes of padding. The uplink programs read it for every packet to this host's containers,
the container programs for every packet to another container of the network on this host (programs.py); a
miss takes the fib path as before. An entry mirrors the endpoint's /32 (/128) route: written after it, in
the same places as the endpoint's facts (vpcnet.datapath.tc.attach_endpoint, for either family), and removed
before the veth or the route goes (`remove`: only while it still names that veth, so an address handed to a
new endpoint keeps the new one's entry), so a deleted endpoint receives nothing through it at once and no
entry outlives its veth to deliver to a reused interface index. Repaired and taken over by the same pass as
the facts (vpcnet.datapath.dataplane).
"""
from __future__ import annotations

import ipaddress
import os
import struct
import threading
from typing import Sequence

from vpcnet.datapath.ebpf import maps
from vpcnet.datapath.ebpf.programs import MAX_PUBLISHED, PROTO_NUMBERS

BPF_MAP_TYPE_HASH = 1
BPF_F_NO_PREALLOC = 1
MAX_ENDPOINTS = 16384
ADDRESS = {4: 4, 6: 16}                     # bytes of the address, at offset 0
PUBLISHED = ADDRESS                         # offset of the published count: right after the address
PORTS = {family: off + 4 for family, off in PUBLISHED.items()}
VALUE = {family: off + 4 * MAX_PUBLISHED for family, off in PORTS.items()}
NAMES = {4: b"vpcnet_ep4", 6: b"vpcnet_ep6"}
LOCAL_NAMES = {4: b"vpcnet_lo4", 6: b"vpcnet_lo6"}
LOCAL_IFINDEX, LOCAL_MAXLEN, LOCAL_DMAC, LOCAL_SMAC, LOCAL_VALUE = 0, 4, 8, 14, 24
ETH_LEN = 14


def slot(proto: str, port: int) -> int:
    """A published port's slot, as the program compares it (a little-endian u32 of [proto, 0, port BE])."""
    return int.from_bytes(bytes([PROTO_NUMBERS[proto], 0]) + port.to_bytes(2, "big"), "little")


def value(address: str, published: Sequence[tuple[str, int]]) -> bytes:
    """The entry of the endpoint holding `address` (its family's map) with these published ports."""
    addr = ipaddress.ip_address(address)
    family = addr.version
    out = bytearray(VALUE[family])
    out[:ADDRESS[family]] = addr.packed
    struct.pack_into("<I", out, PUBLISHED[family], len(published))
    if len(published) <= MAX_PUBLISHED:
        for n, (proto, port) in enumerate(published):
            struct.pack_into("<I", out, PORTS[family] + 4 * n, slot(proto, port))
    return bytes(out)


def key(ifindex: int) -> bytes:
    return struct.pack("<I", ifindex)


def _mac(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return raw


def local_value(ifindex: int, mtu: int, container_mac: str, host_mac: str) -> bytes:
    """The local entry of the container behind the host veth `ifindex` (MTU `mtu`, MAC `host_mac`), whose own
    end of the veth has `container_mac`."""
    out = bytearray(LOCAL_VALUE)
    struct.pack_into("<II", out, 0, ifindex, mtu + ETH_LEN)
    out[LOCAL_DMAC:LOCAL_DMAC + 6] = _mac(container_mac)
    out[LOCAL_SMAC:LOCAL_SMAC + 6] = _mac(host_mac)
    return bytes(out)


def local_ifindex(value: bytes) -> int:
    return struct.unpack_from("<I", value, LOCAL_IFINDEX)[0]


class EndpointFacts:
    """This process's two maps (made when first needed), what it wrote to them, and their reads."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._local_fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self.written: set[tuple[int, int]] = set()     # (family, ifindex) this process wrote
        self.local: dict[tuple[int, int], bytes] = {}   # (family, ifindex) -> the address key this process wrote

    def fd(self, family: int) -> int:
        """The family's map (made on first use; this object keeps it open)."""
        with self._lock:
            if family not in self._fds:
                self._fds[family] = maps.create_map(BPF_MAP_TYPE_HASH, 4, VALUE[family], MAX_ENDPOINTS,
                                                    NAMES[family], BPF_F_NO_PREALLOC)
            return self._fds[family]

    def local_fd(self, family: int) -> int:
        """The family's map of this host's endpoints by address (made on first use; this object keeps it)."""
        with self._lock:
            if family not in self._local_fds:
                self._local_fds[family] = maps.create_map(BPF_MAP_TYPE_HASH, ADDRESS[family], LOCAL_VALUE,
                                                          MAX_ENDPOINTS, LOCAL_NAMES[family], BPF_F_NO_PREALLOC)
            return self._local_fds[family]

    def write_local(self, ifindex: int, address: str, value: bytes) -> None:
        """The local entry of the endpoint holding `address` behind the host veth `ifindex` (`local_value`)."""
        addr = ipaddress.ip_address(address)
        maps.update(self.local_fd(addr.version), addr.packed, value)
        self.local[(addr.version, ifindex)] = addr.packed

    def lookup_local(self, address: str) -> bytes | None:
        """The local entry of `address` now (None: none, or no map yet)."""
        addr = ipaddress.ip_address(address)
        fd = self._local_fds.get(addr.version)
        return maps.lookup(fd, addr.packed, LOCAL_VALUE) if fd is not None else None

    def read_local(self) -> dict[tuple[int, bytes], bytes]:
        """(family, address key) -> value of every local entry in the kernel now."""
        out: dict[tuple[int, bytes], bytes] = {}
        for family, fd in list(self._local_fds.items()):
            for raw, val in maps.items(fd, ADDRESS[family], LOCAL_VALUE, MAX_ENDPOINTS + 1).items():
                out[(family, raw)] = val
        return out

    def remove_local(self, family: int, address_key: bytes, ifindex: int) -> None:
        """The local entry of that address goes, if it still names the host veth `ifindex` (an address handed
        to a new endpoint since keeps the new one's entry)."""
        fd = self._local_fds.get(family)
        if self.local.get((family, ifindex)) == address_key:
            del self.local[(family, ifindex)]
        if fd is None:
            return
        have = maps.lookup(fd, address_key, LOCAL_VALUE)
        if have is not None and local_ifindex(have) == ifindex:
            maps.delete(fd, address_key)

    def write(self, ifindex: int, address: str, published: Sequence[tuple[str, int]]) -> None:
        family = ipaddress.ip_address(address).version
        maps.update(self.fd(family), key(ifindex), value(address, published))
        self.written.add((family, ifindex))

    def remove(self, ifindex: int, families: Sequence[int] = (4, 6)) -> None:
        """The endpoint behind `ifindex` is gone (or lost that family's address): its entries go, its local
        entry (by address) first."""
        for family in families:
            address_key = self.local.get((family, ifindex))
            if address_key is not None:
                self.remove_local(family, address_key, ifindex)
            self.written.discard((family, ifindex))
            if family in self._fds:
                maps.delete(self._fds[family], key(ifindex))

    def lookup(self, family: int, ifindex: int) -> bytes | None:
        """The entry of the host veth `ifindex` in the family's map now (None: none, or no map yet)."""
        fd = self._fds.get(family)
        return maps.lookup(fd, key(ifindex), VALUE[family]) if fd is not None else None

    def read(self) -> dict[tuple[int, int], bytes]:
        """(family, ifindex) -> value of every entry in the kernel now (none for a map not made yet)."""
        out: dict[tuple[int, int], bytes] = {}
        for family, fd in list(self._fds.items()):
            for raw, val in maps.items(fd, 4, VALUE[family], MAX_ENDPOINTS + 1).items():
                out[(family, struct.unpack("<I", raw)[0])] = val
        return out

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._local_fds.values()]:
                os.close(fd)
            self._fds.clear()
            self._local_fds.clear()
            self.written.clear()
            self.local.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:       # interpreter shutdown: os may be gone already
            pass
