"""Raw rtnetlink for the few per-interface settings pyroute2 has no call for, and network namespaces.

Routed and ebpf modes need two settings on each endpoint's host veth: `proxy_arp` (the host answers the
container's ARP for its neighbours) and the ARP `proxy_delay` of 0 (or each broadcast request waits up to
0.8 s). Both are usually written under /proc/sys, which is read-only inside a managed plugin; the kernel
takes them over netlink as well, with CAP_NET_ADMIN: RTM_SETLINK with the interface's IPv4 devconf, and
RTM_SETNEIGHTBL with the interface's parameters of the ARP table. And, for CreateEndpoint's and Join's path,
where pyroute2's cost per request counts (about a millisecond of Python each): a link's index by name, the veth
pair, a link's MTU, state and bridge, an address, a route, the clsact qdisc and a tc bpf filter.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import socket
import struct
import threading
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

NLMSG_ERROR, RTM_SETLINK, RTM_SETNEIGHTBL = 2, 19, 67
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLA_F_NESTED = 0x8000
IFLA_AF_SPEC, IFLA_INET_CONF, IPV4_DEVCONF_PROXY_ARP = 26, 1, 3
NDTA_NAME, NDTA_PARMS, NDTPA_IFINDEX, NDTPA_PROXY_DELAY = 1, 6, 1, 13

_libc = None
T = TypeVar("T")
_seq = itertools.count(1)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """setns(2) for the calling thread (os.setns from Python 3.12, libc before)."""
    global _libc
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """`fn()` in `netns` (a name under /run/netns), or here without one. A namespace is joined by a thread
    of its own: sockets it makes stay in that namespace, and /proc/sys/net opened there is that namespace's."""
    if not netns:
        return fn()
    box: dict = {}

    def target() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
            try:
                setns(fd)
            finally:
                os.close(fd)
            box["result"] = fn()
        except BaseException as exc:       # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"rtnl-{netns}", daemon=True)
    thread.start()
    thread.join(10.0)
    if "error" in box:
        raise box["error"]
    if "result" not in box:
        raise OSError(errno.ETIMEDOUT, f"joining network namespace {netns}")
    return box["result"]


def open_socket(netns: str | None = None) -> socket.socket:
    """An rtnetlink socket in `netns` (a name under /run/netns), or in this process's namespace."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.settimeout(10.0)
        sock.bind((0, 0))
        return sock

    return in_netns(netns, make)


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind | (NLA_F_NESTED if nested else 0)) + payload + b"\0" * (-length % 4)


def _request(sock: socket.socket, msg_type: int, body: bytes, flags: int = 0) -> None:
    """Send one request and wait for its acknowledgement; a refusal raises OSError(errno)."""
    seq = next(_seq)
    sock.send(struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0) + body)
    for _ in range(16):                                  # only our acknowledgement is expected
        data = sock.recv(65536)
        while len(data) >= 16:
            length, kind, _flags, got_seq, _pid = struct.unpack_from("=IHHII", data)
            if kind == NLMSG_ERROR and got_seq == seq:
                code = -struct.unpack_from("=i", data, 16)[0]
                if code:
                    raise OSError(code, os.strerror(code))
                return
            data = data[(length + 3) & ~3:]
    raise OSError(errno.EPROTO, "no netlink acknowledgement")


def set_proxy_arp(sock: socket.socket, index: int, on: bool = True) -> None:
    """net.ipv4.conf.<dev>.proxy_arp, by RTM_SETLINK (IFLA_AF_SPEC / AF_INET / IFLA_INET_CONF)."""
    conf = _attr(IPV4_DEVCONF_PROXY_ARP, struct.pack("=I", int(on)))
    spec = _attr(socket.AF_INET, _attr(IFLA_INET_CONF, conf, nested=True), nested=True)
    ifinfo = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, 0, 0)
    _request(sock, RTM_SETLINK, ifinfo + _attr(IFLA_AF_SPEC, spec, nested=True))


def set_arp_proxy_delay(sock: socket.socket, index: int, msecs: int = 0) -> None:
    """net.ipv4.neigh.<dev>.proxy_delay, by RTM_SETNEIGHTBL (the ARP table's parameters of that device)."""
    parms = _attr(NDTPA_IFINDEX, struct.pack("=I", index)) + _attr(NDTPA_PROXY_DELAY, struct.pack("=Q", msecs))
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + _attr(NDTA_NAME, b"arp_cache\0") + \
        _attr(NDTA_PARMS, parms, nested=True)
    _request(sock, RTM_SETNEIGHTBL, body)


# -- dumps, parsed only as far as the datapath pass needs ------------------------------------------------
# pyroute2 decodes every attribute of every message; on a host with a thousand veths a link dump then
# costs most of a second of CPU. The periodic pass reads four fields per link, so it parses those only.
NLMSG_DONE = 3
NLM_F_DUMP = 0x300
RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE, RTM_GETQDISC = 18, 22, 26, 38
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_MULTIPATH, RTA_TABLE = 1, 4, 9, 15
TCA_KIND = 1
IFF_UP = 0x1
IFLA_INET6_CONF = 2
DEVCONF_ACCEPT_RA, DEVCONF_AUTOCONF, DEVCONF_DISABLE_IPV6 = 3, 5, 26     # uapi linux/ipv6.h


ANSWER_MAX = 1 << 16     # a targeted request's answer (one link, one filter) is a few KB


def _recv(sock: socket.socket, dump: bool) -> bytes:
    """One datagram. A dump's may be as large as the kernel makes them (1 MB asked; it caps them at 32 KB);
    a targeted answer is read into ANSWER_MAX, checked for truncation: asking 1 MB of recv() costs ~60 µs
    of allocation per call, a tenth of a link lookup's whole time."""
    if dump:
        return sock.recv(1 << 20)
    data, _ancillary, flags, _address = sock.recvmsg(ANSWER_MAX)
    if flags & socket.MSG_TRUNC:
        raise OSError(errno.EMSGSIZE, f"netlink answer larger than {ANSWER_MAX} bytes")
    return data


def _dump(sock: socket.socket, msg_type: int, body: bytes, dump: bool = True):
    """Yield (type, payload) of every message of one dump; with `dump=False`, of the one answer to a
    targeted request."""
    seq = next(_seq)
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    sock.send(struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body)
    for _ in range(100000):                              # bounded: a dump ends with NLMSG_DONE
        data = _recv(sock, dump)
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _flags, got_seq, _pid = struct.unpack_from("=IHHII", data, offset)
            if length < 16:
                raise OSError(errno.EPROTO, "malformed netlink message")
            if got_seq == seq:
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + 16)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                yield kind, data[offset + 16:offset + length]
                if not dump:
                    return
            offset += (length + 3) & ~3
    raise OSError(errno.EPROTO, "netlink dump did not end")


def _attrs(payload: bytes, start: int) -> dict[int, bytes]:
    out = {}
    offset = start
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = payload[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def _u32(raw: bytes | None) -> int | None:
    return struct.unpack("=I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def dump_links(sock: socket.socket) -> dict[str, dict]:
    """name -> {index, master, up, mtu, mac, peer, peer_netnsid, ipv6} of every link; `mac` is "aa:bb:..."
    (None: no link-layer address); `peer` the index of a veth's other end (IFLA_LINK; None: none),
    `peer_netnsid` the id of its namespace when not this one (None: this one), as `peer_mac` takes them;
    `ipv6` is (disable_ipv6, accept_ra, autoconf), None where the link has no IPv6 settings (a kernel
    without IPv6)."""
    out = {}
    for _kind, payload in _dump(sock, RTM_GETLINK, struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, 0, 0, 0)):
        _family, _pad, _type, index, flags, _change = struct.unpack_from("=BBHiII", payload)
        attrs = _attrs(payload, 16)
        name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode()
        out[name] = {"index": index, "master": _u32(attrs.get(IFLA_MASTER)), "up": bool(flags & IFF_UP),
                     "mtu": _u32(attrs.get(IFLA_MTU)), "mac": _mac(attrs.get(IFLA_ADDRESS)),
                     "peer": _u32(attrs.get(IFLA_LINK)), "peer_netnsid": _s32(attrs.get(IFLA_LINK_NETNSID)),
                     "ipv6": _ipv6_conf(attrs.get(IFLA_AF_SPEC))}
    return out


def _s32(raw: bytes | None) -> int | None:
    return struct.unpack("=i", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def _mac(raw: bytes | None) -> str | None:
    return ":".join(f"{b:02x}" for b in raw) if raw is not None and len(raw) == 6 else None


def _get_link(sock: socket.socket, index: int, netnsid: int | None = None) -> dict[int, bytes] | None:
    """The attributes of link `index` (of the namespace the kernel calls `netnsid`, relative to this
    socket's: IFLA_TARGET_NETNSID; None: this one), one targeted RTM_GETLINK; None: no such link."""
    body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, 0, 0)
    if netnsid is not None:
        body += _attr(IFLA_TARGET_NETNSID, struct.pack("=i", netnsid))
    try:
        for _kind, payload in _dump(sock, RTM_GETLINK, body, dump=False):
            return _attrs(payload, 16)
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT, errno.EINVAL):     # EINVAL: that namespace id is gone
            return None
        raise
    return None


def peer_mac(sock: socket.socket, index: int | None, netnsid: int | None) -> str | None:
    """The MAC of a veth's other end (`index` and `netnsid` as dump_links gives them), wherever it is: in
    this namespace, or a container's (no namespace is entered); None: none, or it cannot be read."""
    if not index:
        return None
    attrs = _get_link(sock, index, netnsid)
    return _mac(attrs.get(IFLA_ADDRESS)) if attrs is not None else None


def link_l2(sock: socket.socket, index: int) -> dict | None:
    """{index, mac, mtu, peer_mac} of the veth `index`: its own MAC and MTU, and its other end's MAC
    (`peer_mac`; None where it cannot be read); None: no such link, or one without an Ethernet address."""
    attrs = _get_link(sock, index)
    if attrs is None:
        return None
    mac, mtu = _mac(attrs.get(IFLA_ADDRESS)), _u32(attrs.get(IFLA_MTU))
    if mac is None or mtu is None:
        return None
    return {"index": index, "mac": mac, "mtu": mtu,
            "peer_mac": peer_mac(sock, _u32(attrs.get(IFLA_LINK)), _s32(attrs.get(IFLA_LINK_NETNSID)))}


def link_index(sock: socket.socket, name: str) -> int | None:
    """The index of the link called `name` (one targeted RTM_GETLINK, nothing parsed but the header);
    None: no such link."""
    body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
    try:
        for _kind, payload in _dump(sock, RTM_GETLINK, body, dump=False):
            return struct.unpack_from("=i", payload, 4)[0]
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return None


def _ipv6_conf(af_spec: bytes | None) -> tuple[int, int, int] | None:
    """(disable_ipv6, accept_ra, autoconf) from a link's IFLA_AF_SPEC: the kernel reports the interface's
    whole IPv6 devconf there as an array of s32 indexed by DEVCONF_* (the /proc/sys values, no file read)."""
    conf = _attrs(_attrs(af_spec or b"", 0).get(socket.AF_INET6, b""), 0).get(IFLA_INET6_CONF)
    if conf is None or len(conf) < 4 * (DEVCONF_DISABLE_IPV6 + 1):
        return None
    def at(i: int) -> int:
        return struct.unpack_from("=i", conf, 4 * i)[0]
    return at(DEVCONF_DISABLE_IPV6), at(DEVCONF_ACCEPT_RA), at(DEVCONF_AUTOCONF)


def dump_addresses(sock: socket.socket) -> dict[int, set[str]]:
    """link index -> {"a.b.c.d/len"} (IPv4)."""
    out: dict[int, set[str]] = {}
    for _kind, payload in _dump(sock, RTM_GETADDR, struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, 0)):
        _family, prefixlen, _flags, _scope, index = struct.unpack_from("=BBBBI", payload)
        attrs = _attrs(payload, 8)
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw and len(raw) == 4:
            out.setdefault(index, set()).add(f"{socket.inet_ntoa(raw)}/{prefixlen}")
    return out


def dump_routes(sock: socket.socket, table: int = 254) -> tuple[dict[str, int], list[int]]:
    """(IPv4 /32 routes of `table` as "a.b.c.d/32" -> output link, the default route's output links)."""
    hosts: dict[str, int] = {}
    uplinks: list[int] = []
    for _kind, payload in _dump(sock, RTM_GETROUTE, struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 0, 0, 0,
                                                                 0, 0)):
        _family, dst_len, _src_len, _tos, rtm_table = struct.unpack_from("=BBBBB", payload)
        attrs = _attrs(payload, 12)
        if (_u32(attrs.get(RTA_TABLE)) or rtm_table) != table:
            continue
        oif = _u32(attrs.get(RTA_OIF))
        if dst_len == 32 and RTA_DST in attrs and oif:
            hosts[f"{socket.inet_ntoa(attrs[RTA_DST][:4])}/32"] = oif
        elif dst_len == 0:
            hops = [oif] if oif else []
            multipath = attrs.get(RTA_MULTIPATH, b"")
            offset = 0
            while offset + 8 <= len(multipath):          # struct rtnexthop: len, flags, hops, ifindex
                length, _f, _h, ifindex = struct.unpack_from("=HBBi", multipath, offset)
                hops.append(ifindex)
                offset += max(8, (length + 3) & ~3)
            uplinks += [h for h in hops if h and h not in uplinks]
    return hosts, uplinks


def dump_qdisc_kinds(sock: socket.socket) -> dict[int, set[str]]:
    """link index -> kinds of its qdiscs (e.g. {"clsact", "noqueue"})."""
    out: dict[int, set[str]] = {}
    for _kind, payload in _dump(sock, RTM_GETQDISC, struct.pack("=BBHiIII", socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0)):
        index = struct.unpack_from("=i", payload, 4)[0]
        kind = _attrs(payload, 20).get(TCA_KIND, b"").split(b"\0", 1)[0].decode()
        out.setdefault(index, set()).add(kind)
    return out


# -- link counters (read-only, for metrics) ------------------------------------------------------------
IFLA_STATS64 = 23
STATS64_FIELDS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors", "tx_errors", "rx_dropped",
                  "tx_dropped")


IFLA_LINK, IFLA_LINK_NETNSID, IFLA_TARGET_NETNSID = 5, 37, 46
#: What the container's side of a veth counts that its host side does not: in ebpf mode the uplink program
#: hands packets straight into the container's namespace (bpf_redirect_peer), which skips the host end's
#: transmit path; the kernel counts them as received on the container's end (Linux 6.7 and later).
PEER_FIELDS = ("rx_packets", "rx_bytes")


def link_stats(prefix: str = "", netns: str | None = None, peers: bool = False) -> dict[str, dict[str, int]]:
    """Interface name -> its 64-bit counters (struct rtnl_link_stats64's first fields), for every link
    whose name starts with `prefix`: one RTM_GETLINK dump, parsed here, in well under a millisecond per
    hundred links (a scrape-time read: no pyroute2 socket to set up).

    With `peers`, a veth whose other end is in another namespace (a container's) also gets that end's
    counters as `peer_rx_packets` / `peer_rx_bytes`: one targeted RTM_GETLINK per link, through the peer
    namespace's id (IFLA_TARGET_NETNSID), so no namespace is entered. A peer that cannot be read (its
    namespace just went) is left out."""
    out: dict[str, dict[str, int]] = {}
    wanted = prefix.encode()
    with open_socket(netns) as sock:
        for _kind, payload in _dump(sock, RTM_GETLINK, struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, 0, 0, 0)):
            _parse_link(payload, 16, len(payload), wanted, out)
        if peers:
            for counters in out.values():
                nsid, index = counters.pop("link_netnsid", None), counters.pop("link", None)
                if nsid is None or not index:
                    continue
                peer = _peer_stats(sock, nsid, index)
                if peer is not None:
                    counters.update({f"peer_{k}": peer[k] for k in PEER_FIELDS})
    for counters in out.values():
        counters.pop("link_netnsid", None)
        counters.pop("link", None)
    return out


def _peer_stats(sock: socket.socket, nsid: int, index: int) -> dict[str, int] | None:
    """The counters of link `index` in the namespace the kernel calls `nsid` (relative to this socket's)."""
    body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, 0, 0) + _attr(IFLA_TARGET_NETNSID,
                                                                                 struct.pack("=i", nsid))
    found: dict[str, dict[str, int]] = {}
    try:
        for _kind, payload in _dump(sock, RTM_GETLINK, body, dump=False):
            _parse_link(payload, 16, len(payload), b"", found)
    except OSError:
        return None
    return next(iter(found.values()), None)


def _parse_link(data: bytes, start: int, end: int, wanted: bytes, out: dict) -> None:
    """Only as far as the name when it is not wanted: most of a host's links are not vpcnet's."""
    name, stats, link, nsid = None, None, None, None
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            return
        if kind == IFLA_IFNAME:
            name = data[start + 4:start + length].rstrip(b"\0")
            if not name.startswith(wanted):
                return
        elif kind == IFLA_STATS64 and length >= 4 + 8 * len(STATS64_FIELDS):
            stats = struct.unpack_from("=" + "Q" * len(STATS64_FIELDS), data, start + 4)
        elif kind == IFLA_LINK and length >= 8:
            link = struct.unpack_from("=I", data, start + 4)[0]
        elif kind == IFLA_LINK_NETNSID and length >= 8:
            nsid = struct.unpack_from("=i", data, start + 4)[0]
        start += (length + 3) & ~3
    if name is not None and stats is not None:
        counters: dict[str, int] = dict(zip(STATS64_FIELDS, stats, strict=True))
        if nsid is not None and nsid >= 0 and link:
            counters["link"], counters["link_netnsid"] = link, nsid
        out[name.decode()] = counters


# -- tc: the clsact qdisc and cls_bpf filters, as `tc qdisc add ... clsact` and `tc filter replace ... bpf da`
# Over this socket, a request costs a fraction of pyroute2's, which counts on CreateEndpoint's path (the
# eBPF container programs) and in every bridge port's anti-spoofing guard (vpcnet.datapath.guard);
# pyroute2 has no call for a classic BPF filter at all (its TCA_BPF_OPS is a single word).
RTM_NEWQDISC, RTM_NEWTFILTER, RTM_GETTFILTER = 36, 44, 46
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
TC_H_CLSACT, TC_H_CLSACT_HANDLE = 0xFFFFFFF1, 0xFFFF0000
TCA_OPTIONS = 2
TCA_BPF_CLASSID, TCA_BPF_OPS_LEN, TCA_BPF_OPS, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 4, 5, 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1


def _tcmsg(index: int, handle: int, parent: int, prio: int, protocol: int) -> bytes:
    return struct.pack("=BBHiIII", socket.AF_UNSPEC, 0, 0, index, handle, parent,
                       (prio << 16) | socket.htons(protocol))


def add_clsact(sock: socket.socket, index: int) -> bool:
    """The clsact qdisc on link `index`; False: it has one already. A refusal raises OSError(errno)."""
    body = _tcmsg(index, TC_H_CLSACT_HANDLE, TC_H_CLSACT, 0, 0) + _attr(TCA_KIND, b"clsact\0")
    try:
        _request(sock, RTM_NEWQDISC, body, NLM_F_CREATE | NLM_F_EXCL)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise
    return True


def _bpf_filter(index: int, parent: int, prio: int, protocol: int, handle: int, options: bytes) -> bytes:
    options += _attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT))
    return _tcmsg(index, handle, parent, prio, protocol) + _attr(TCA_KIND, b"bpf\0") + \
        _attr(TCA_OPTIONS, options, nested=True)


def replace_bpf_filter(sock: socket.socket, index: int, parent: int, prio: int, protocol: int, handle: int, fd: int,
                       name: str, classid: int = 1) -> None:
    """The loaded program `fd` as the direct-action bpf filter (`prio`, `protocol`, `handle`) on `parent` (a
    clsact hook) of link `index`, made or replaced in place. A refusal raises OSError(errno)."""
    options = (_attr(TCA_BPF_FD, struct.pack("=I", fd)) + _attr(TCA_BPF_NAME, name.encode() + b"\0")
               + _attr(TCA_BPF_CLASSID, struct.pack("=I", classid)))
    _request(sock, RTM_NEWTFILTER, _bpf_filter(index, parent, prio, protocol, handle, options),
             NLM_F_CREATE | NLM_F_REPLACE)


def replace_classic_bpf(sock: socket.socket, index: int, parent: int, prio: int, handle: int, protocol: int,
                        ops: bytes, name: str) -> None:
    """A cls_bpf filter running the classic BPF program `ops` (struct sock_filter[], 8 bytes each) in direct
    action mode (its return value is the verdict), created or replaced in place. Classic BPF needs no bpf()
    syscall: it loads wherever cls_bpf does."""
    options = _attr(TCA_BPF_OPS_LEN, struct.pack("=H", len(ops) // 8)) + _attr(TCA_BPF_OPS, ops) + \
        _attr(TCA_BPF_CLASSID, struct.pack("=I", 1)) + _attr(TCA_BPF_NAME, name.encode() + b"\0")
    _request(sock, RTM_NEWTFILTER, _bpf_filter(index, parent, prio, protocol, handle, options), NLM_F_CREATE)


def classic_bpf_ops(sock: socket.socket, index: int, parent: int, prio: int, handle: int,
                    protocol: int) -> bytes | None:
    """The classic BPF program of the cls_bpf filter (`prio`, `handle`, `protocol`) on link `index`, or None
    when there is no such filter (or it runs no classic program)."""
    try:
        for _kind, payload in _dump(sock, RTM_GETTFILTER, _tcmsg(index, handle, parent, prio, protocol),
                                    dump=False):
            attrs = _attrs(payload, 20)
            if attrs.get(TCA_KIND, b"").split(b"\0", 1)[0] != b"bpf":
                return None
            return _attrs(attrs.get(TCA_OPTIONS, b""), 0).get(TCA_BPF_OPS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return None
        raise
    return None


# -- links, addresses and routes of an endpoint, as pyroute2's `link("add", kind="veth", ...)`,
# `addr("add", ...)` and `route("replace"/"del", ...)` wrote them (the same messages, `ip` shows the same),
# for CreateEndpoint's path: pyroute2 costs about a millisecond of Python per request on this machine, a
# request here a small fraction of it.
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_NEWROUTE, RTM_DELROUTE = 16, 17, 20, 24, 25
IFLA_ADDRESS, IFLA_LINKINFO = 1, 18
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST = 254, 4, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, flags, change)


def _mac_bytes(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"{text!r} is not a MAC address")
    return raw


def create_veth(sock: socket.socket, name: str, peer: str, mtu: int, peer_mac: str = "",
                master: int | None = None) -> None:
    """The veth pair `name` (this end: up, on bridge `master` if given) and `peer` (down, MAC `peer_mac`), both
    with `mtu`, in one RTM_NEWLINK (NLM_F_EXCL: EEXIST when either name is taken). The kernel makes both ends
    or neither. A refusal raises OSError(errno)."""
    peer_attrs = _attr(IFLA_IFNAME, peer.encode() + b"\0") + _attr(IFLA_MTU, struct.pack("=I", mtu))
    if peer_mac:
        peer_attrs += _attr(IFLA_ADDRESS, _mac_bytes(peer_mac))
    info = _attr(IFLA_INFO_KIND, b"veth\0") + \
        _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, _ifinfo() + peer_attrs, nested=True), nested=True)
    body = _ifinfo(flags=IFF_UP, change=IFF_UP) + _attr(IFLA_IFNAME, name.encode() + b"\0") + \
        _attr(IFLA_MTU, struct.pack("=I", mtu)) + \
        (_attr(IFLA_MASTER, struct.pack("=I", master)) if master is not None else b"") + \
        _attr(IFLA_LINKINFO, info, nested=True)
    _request(sock, RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL)


def set_link(sock: socket.socket, index: int, mtu: int | None = None, up: bool | None = None,
             master: int | None = None) -> None:
    """Link `index`'s MTU, state and bridge (each only when given), in one RTM_NEWLINK without
    NLM_F_CREATE (ENODEV: no such link). A refusal raises OSError(errno)."""
    body = _ifinfo(index, IFF_UP if up else 0, IFF_UP if up is not None else 0)
    if mtu is not None:
        body += _attr(IFLA_MTU, struct.pack("=I", mtu))
    if master is not None:
        body += _attr(IFLA_MASTER, struct.pack("=I", master))
    _request(sock, RTM_NEWLINK, body)


def delete_link(sock: socket.socket, index: int) -> bool:
    """Delete link `index` (a veth's peer goes with it); False: there is no such link."""
    try:
        _request(sock, RTM_DELLINK, _ifinfo(index))
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):
            return False
        raise
    return True


def _family(address: str) -> tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return family, socket.inet_pton(family, address)


def add_address(sock: socket.socket, index: int, address: str, prefixlen: int, flags: int = 0) -> bool:
    """`address/prefixlen` on link `index` (`flags`: IFA_F_*, e.g. IFA_F_NODAD); False: it is there already.
    IPv4 gets IFA_LOCAL and IFA_ADDRESS as `ip addr add` sends them, IPv6 IFA_ADDRESS. A refusal raises
    OSError(errno)."""
    family, raw = _family(address)
    body = struct.pack("=BBBBI", family, prefixlen, flags, RT_SCOPE_UNIVERSE, index) + _attr(IFA_ADDRESS, raw)
    if family == socket.AF_INET:
        body += _attr(IFA_LOCAL, raw)
    try:
        _request(sock, RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise
    return True


def _route(dst: str, prefixlen: int, oif: int, scope: int, protocol: int = RTPROT_STATIC,
           kind: int = RTN_UNICAST) -> bytes:
    family, raw = _family(dst)
    return struct.pack("=BBBBBBBBI", family, prefixlen, 0, 0, RT_TABLE_MAIN, protocol, scope, kind, 0) + \
        _attr(RTA_DST, raw) + _attr(RTA_OIF, struct.pack("=I", oif))


def replace_route(sock: socket.socket, dst: str, prefixlen: int, oif: int, scope: int = RT_SCOPE_LINK) -> None:
    """`dst/prefixlen dev <oif>` in the main table (proto static, unicast; IPv4 with `scope`, the kernel sets
    IPv6's), made or replaced: `ip route replace DST/LEN dev DEV proto static scope link`. A refusal raises
    OSError(errno)."""
    _request(sock, RTM_NEWROUTE, _route(dst, prefixlen, oif, scope), NLM_F_CREATE | NLM_F_REPLACE)


def delete_route(sock: socket.socket, dst: str, prefixlen: int, oif: int) -> bool:
    """Remove `dst/prefixlen dev <oif>` from the main table, whatever its protocol and scope (as `ip route del`
    asks); False: there is no such route."""
    try:
        _request(sock, RTM_DELROUTE, _route(dst, prefixlen, oif, RT_SCOPE_NOWHERE, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
            return False
        raise
    return True
