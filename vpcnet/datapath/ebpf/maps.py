"""The per-host peer map of vpcnet's traffic counting (`vpcnet_endpoint_peer_*`, vpcnet.observability.metrics),
created, found and read with the bpf(2) syscall through ctypes, as loader.py loads programs.

One map per host, `vpcnet_peers` (BPF_MAP_TYPE_LRU_PERCPU_HASH, MAX_ENTRIES keys): per CPU, so counting
takes no lock and no atomic (each CPU adds to its own copy; a read sums them); LRU, so a host whose
containers talk to more peers than it holds forgets the least recently counted instead of refusing new
ones (the exporter keeps cumulative totals, so an eviction never lowers a counter, only loses what was
counted between the last scrape and the eviction).

Key (KEY_SIZE = 40 bytes, IPv6-ready): the endpoint's address (16 bytes, IPv4 as ::ffff:a.b.c.d), the
direction (u32: TRANSMIT or RECEIVE, from the container's side), 4 bytes of padding, the peer's address
(16 bytes; all zero for OUTSIDE: any address beyond the cluster CIDR, summed in the kernel into one key so
the map stays small). Value: {bytes u64, packets u64}. The endpoint is keyed by address, not by its host
veth's index: the map is the kernel's, not a namespace's, and addresses are unique in a cluster where
interface indexes are not (the lab's hosts are namespaces of one kernel); a deleted endpoint's keys are
dropped (`forget`), as IPAM may hand its address out again.

No pinning, no file: the map lives as long as a program using it (the programs hold it) or a process
holding its descriptor. Where the process may look maps up by id (BPF_MAP_GET_NEXT_ID: CAP_SYS_ADMIN),
every process finds it again by name, so several workers and a restarted plugin share one map, and the
last program detached (network delete) frees it; two workers creating it at the same moment make two
maps: readers sum every map of that name, so nothing is lost or counted twice. Where it may not (the
managed plugin and the systemd unit have CAP_BPF and CAP_NET_ADMIN only), the map is the process's own
(`local`): created once, held until the process ends, read by that process; a new process's datapath
pass re-attaches the counting programs so they write its map (vpcnet.datapath.dataplane), and the old map
goes with the old programs. With several workers, a worker then reads only what its own programs count.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import platform
import struct
import threading
from typing import Iterator

from vpcnet.errors import DataplaneError

MAP_NAME = b"vpcnet_peers"
MAX_ENTRIES = 65536
KEY_SIZE, VALUE_SIZE = 40, 16
TRANSMIT, RECEIVE = 0, 1
OUTSIDE = bytes(16)

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
BPF_MAP_GET_NEXT_ID, BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 12, 14, 15
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
SYS_BPF = {"x86_64": 321, "aarch64": 280}
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytearray) -> tuple[int, int]:
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    ret = _libc.syscall(nr, cmd, buf, len(attr))
    err = ctypes.get_errno() if ret < 0 else 0
    attr[:] = buf.raw[:len(attr)]
    return ret, err


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key: the kernel's possible CPUs ("0-3,5")."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def _address(text: str | None) -> bytes:
    if text is None:
        return OUTSIDE
    addr = ipaddress.ip_address(text)
    return b"\0" * 10 + b"\xff\xff" + addr.packed if addr.version == 4 else addr.packed


def _text(raw: bytes) -> str | None:
    if raw == OUTSIDE:
        return None
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def peer_key(endpoint: str, direction: int, peer: str | None) -> bytes:
    """The key of (endpoint address, direction, peer address or None for OUTSIDE)."""
    return _address(endpoint) + struct.pack("<II", direction, 0) + _address(peer)


def parse_key(raw: bytes) -> tuple[str | None, int, str | None]:
    """(endpoint address, direction, peer address or None for OUTSIDE) of a key."""
    return _text(raw[:16]), struct.unpack_from("<I", raw, 16)[0], _text(raw[24:40])


def create() -> int:
    attr = bytearray(72)
    struct.pack_into("<IIIII", attr, 0, BPF_MAP_TYPE_LRU_PERCPU_HASH, KEY_SIZE, VALUE_SIZE, MAX_ENTRIES, 0)
    attr[28:28 + len(MAP_NAME)] = MAP_NAME
    fd, err = _bpf(BPF_MAP_CREATE, attr)
    if fd < 0:
        raise DataplaneError(f"cannot create the eBPF map {MAP_NAME.decode()}: {os.strerror(err)}")
    return fd


def _info(fd: int) -> tuple[int, int, int, int, bytes]:
    """(type, id, key size, value size, name) of the map behind `fd`."""
    info = ctypes.create_string_buffer(80)
    attr = bytearray(16)
    struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    ret, err = _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    if ret < 0:
        raise OSError(err, os.strerror(err))
    mtype, mid, ksize, vsize = struct.unpack_from("<IIII", info.raw, 0)
    return mtype, mid, ksize, vsize, info.raw[24:40].rstrip(b"\0")


_local: list[int] = []                           # this process's own map (when it may not look maps up)
_local_lock = threading.Lock()


def local() -> bool:
    """This process may not look maps up by id: its map is its own."""
    attr = bytearray(12)
    ret, err = _bpf(BPF_MAP_GET_NEXT_ID, attr)
    return ret < 0 and err in (errno.EPERM, errno.EACCES)


def find_all() -> list[int]:
    """Descriptors (the caller's to close) of every vpcnet peer map on this host, oldest first; where
    this process may not look them up, its own map (if it made one)."""
    fds: list[int] = []
    start = 0
    for _ in range(1 << 20):                     # bounded: map ids are finite
        attr = bytearray(12)
        struct.pack_into("<I", attr, 0, start)
        ret, err = _bpf(BPF_MAP_GET_NEXT_ID, attr)
        if ret < 0:
            if start == 0 and err in (errno.EPERM, errno.EACCES):
                return [os.dup(fd) for fd in _local]
            break                                # ENOENT: no more
        start = struct.unpack_from("<I", attr, 4)[0]
        attr = bytearray(12)
        struct.pack_into("<I", attr, 0, start)
        fd, err = _bpf(BPF_MAP_GET_FD_BY_ID, attr)
        if fd < 0:
            continue                             # gone meanwhile
        try:
            mtype, _id, ksize, vsize, name = _info(fd)
        except OSError:
            os.close(fd)
            continue
        if (name, mtype, ksize, vsize) == (MAP_NAME, BPF_MAP_TYPE_LRU_PERCPU_HASH, KEY_SIZE, VALUE_SIZE):
            fds.append(fd)
        else:
            os.close(fd)
    return fds


def find_or_create() -> int:
    """The host's peer map (the oldest, when a race made two), created when there is none; where this
    process may not look maps up, its own (made once, kept open)."""
    if local():
        with _local_lock:
            if not _local:
                _local.append(create())
            return os.dup(_local[0])
    fds = find_all()
    for fd in fds[1:]:
        os.close(fd)
    return fds[0] if fds else create()


def map_id(fd: int) -> int:
    return _info(fd)[1]


def entries(fd: int, ncpus: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """Every (key, bytes, packets) of the map, summed over the CPUs. A key evicted during the walk may end
    it early: what it missed is read at the next scrape."""
    ncpus = ncpus or possible_cpus()
    key = ctypes.create_string_buffer(KEY_SIZE)
    nxt = ctypes.create_string_buffer(KEY_SIZE)
    value = ctypes.create_string_buffer(VALUE_SIZE * ncpus)
    first = True
    for _ in range(4 * MAX_ENTRIES):             # bounded: the map holds MAX_ENTRIES keys
        attr = bytearray(32)
        struct.pack_into("<IIQQ", attr, 0, fd, 0, 0 if first else ctypes.addressof(key), ctypes.addressof(nxt))
        ret, _err = _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        if ret < 0:
            return
        first = False
        ctypes.memmove(key, nxt, KEY_SIZE)
        attr = bytearray(32)
        struct.pack_into("<IIQQ", attr, 0, fd, 0, ctypes.addressof(key), ctypes.addressof(value))
        ret, _err = _bpf(BPF_MAP_LOOKUP_ELEM, attr)
        if ret < 0:
            continue                             # evicted meanwhile
        total_bytes = total_packets = 0
        for cpu in range(ncpus):
            b, p = struct.unpack_from("<QQ", value.raw, cpu * VALUE_SIZE)
            total_bytes += b
            total_packets += p
        yield key.raw, total_bytes, total_packets


def delete(fd: int, key: bytes) -> bool:
    """Remove `key` from the map behind `fd`; False: it was not there."""
    raw = ctypes.create_string_buffer(key, len(key))
    attr = bytearray(32)
    struct.pack_into("<IIQ", attr, 0, fd, 0, ctypes.addressof(raw))
    ret, _err = _bpf(BPF_MAP_DELETE_ELEM, attr)
    return ret == 0


# -- plain maps (vpcnet.datapath.ebpf.endpoints) ------------------------------------------------------------

def create_map(map_type: int, key_size: int, value_size: int, max_entries: int, name: bytes, flags: int = 0) -> int:
    """A new map (the descriptor is the caller's); a refusal raises DataplaneError naming the map."""
    attr = bytearray(72)
    struct.pack_into("<IIIII", attr, 0, map_type, key_size, value_size, max_entries, flags)
    attr[28:28 + min(len(name), 15)] = name[:15]
    fd, err = _bpf(BPF_MAP_CREATE, attr)
    if fd < 0:
        hint = {errno.EPERM: "needs CAP_BPF (or CAP_SYS_ADMIN)", errno.ENOSYS: "this kernel has no bpf(2)",
                errno.ENOMEM: "out of memory (or the locked-memory limit, before Linux 5.11)",
                }.get(err, os.strerror(err))
        raise DataplaneError(f"cannot create the eBPF map {name.decode()}: {hint}")
    return fd


def update(fd: int, key: bytes, value: bytes) -> None:
    """Create or replace `key`'s value (atomically: a program sees the old value or the new one)."""
    raw_key = ctypes.create_string_buffer(key, len(key))
    raw_value = ctypes.create_string_buffer(value, len(value))
    attr = bytearray(32)
    struct.pack_into("<IIQQQ", attr, 0, fd, 0, ctypes.addressof(raw_key), ctypes.addressof(raw_value), 0)
    ret, err = _bpf(BPF_MAP_UPDATE_ELEM, attr)
    if ret < 0:
        hint = " (the map is full)" if err == errno.E2BIG else ""
        raise DataplaneError(f"cannot write an eBPF map entry: {os.strerror(err)}{hint}")


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """`key`'s value in a (not per-CPU) map; None: not there."""
    raw_key = ctypes.create_string_buffer(key, len(key))
    value = ctypes.create_string_buffer(value_size)
    attr = bytearray(32)
    struct.pack_into("<IIQQ", attr, 0, fd, 0, ctypes.addressof(raw_key), ctypes.addressof(value))
    return value.raw if _bpf(BPF_MAP_LOOKUP_ELEM, attr)[0] == 0 else None


def items(fd: int, key_size: int, value_size: int, limit: int) -> dict[bytes, bytes]:
    """Every key and value of a (not per-CPU) map, at most `limit` of them."""
    key = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    value = ctypes.create_string_buffer(value_size)
    out: dict[bytes, bytes] = {}
    first = True
    for _ in range(limit):
        attr = bytearray(32)
        struct.pack_into("<IIQQ", attr, 0, fd, 0, 0 if first else ctypes.addressof(key), ctypes.addressof(nxt))
        if _bpf(BPF_MAP_GET_NEXT_KEY, attr)[0] < 0:
            break
        first = False
        ctypes.memmove(key, nxt, key_size)
        attr = bytearray(32)
        struct.pack_into("<IIQQ", attr, 0, fd, 0, ctypes.addressof(key), ctypes.addressof(value))
        if _bpf(BPF_MAP_LOOKUP_ELEM, attr)[0] == 0:
            out[key.raw] = value.raw
    return out


def read_all() -> dict[tuple[str | None, int, str | None], tuple[int, int]]:
    """(endpoint address, direction, peer or None for outside) -> (bytes, packets), over every peer map
    of this host."""
    out: dict[tuple[str | None, int, str | None], tuple[int, int]] = {}
    ncpus = possible_cpus()
    for fd in find_all():
        try:
            for raw, nbytes, npackets in entries(fd, ncpus):
                k = parse_key(raw)
                b, p = out.get(k, (0, 0))
                out[k] = (b + nbytes, p + npackets)
        finally:
            os.close(fd)
    return out


def forget(addresses: set[str]) -> None:
    """Drop the keys of these endpoint addresses (a deleted endpoint: IPAM may hand its address out again)."""
    if not addresses:
        return
    wanted = {_address(a) for a in addresses}
    for fd in find_all():
        try:
            doomed = [raw for raw, _b, _p in entries(fd) if raw[:16] in wanted]
            for raw in doomed:
                delete(fd, raw)
        finally:
            os.close(fd)
