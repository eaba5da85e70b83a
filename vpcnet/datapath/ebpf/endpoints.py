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


class EndpointFacts:
    """This process's two maps (made when first needed), what it wrote to them, and their reads."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self.written: set[tuple[int, int]] = set()     # (family, ifindex) this process wrote

    def fd(self, family: int) -> int:
        """The family's map (made on first use; this object keeps it open)."""
        with self._lock:
            if family not in self._fds:
                self._fds[family] = maps.create_map(BPF_MAP_TYPE_HASH, 4, VALUE[family], MAX_ENDPOINTS,
                                                    NAMES[family], BPF_F_NO_PREALLOC)
            return self._fds[family]

    def write(self, ifindex: int, address: str, published: Sequence[tuple[str, int]]) -> None:
        family = ipaddress.ip_address(address).version
        maps.update(self.fd(family), key(ifindex), value(address, published))
        self.written.add((family, ifindex))

    def remove(self, ifindex: int, families: Sequence[int] = (4, 6)) -> None:
        """The endpoint behind `ifindex` is gone (or lost that family's address): its entries go."""
        for family in families:
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
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self.written.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:       # interpreter shutdown: os may be gone already
            pass
