"""Every kernel change vpcnet makes: bridges, veth pairs, MTU, forwarding, and a few firewall rules.

Per network: a bridge (`vpc-<network id[:11]>`) holding the gateway address; per endpoint: a veth pair,
host end (`vh<endpoint id[:11]>`) on the bridge, container end (`vc...`) handed to Docker to move into
the sandbox. Links and addresses go through pyroute2; the firewall through `iptables` (the same binary
Docker uses, so both see one rule set).

Routed mode (`-o vpcnet.mode=routed`, per network): a leaner path with no bridge. The gateway address
sits on a per-network anchor (one end of a veth pair `vpc-<id11>`/`vpp-<id11>`: this kernel may lack the
dummy driver), so the host answers for it and its connected route keeps unknown addresses of the host
CIDR off the default route. Per endpoint the host end of the veth is on no bridge and has no address;
it has `proxy_arp=1` and `proxy_delay=0` (set over netlink by vpcnet.rtnl: /proc/sys is read-only in a
managed plugin) and the host routes `<container ip>/32 dev <host end>`. The container keeps the pool
prefix Docker assigns: it ARPs for neighbours and the gateway, the host end answers, and the host
routes by /32. Each packet between hosts thus skips the bridge and br_netfilter (Docker turns
bridge-nf-call-iptables on host-wide): one device and one netfilter pass fewer per direction. Firewall
rules match the veths (`vh+`) and the host CIDR instead of `-i <bridge>`, and a reverse-path check
drops what a veth sends from an address not routed back to it; masquerade and --internal behave as in
bridge mode.

eBPF mode (`-o vpcnet.mode=ebpf`, and the default where vpcnet.datapath.features finds the kernel and
capabilities for it): routed mode, plus the fast path of vpcnet.ebpf. A tc
program on each endpoint's host veth (ingress) and one per network on the uplink (ingress of the default
route's device; filter `vpcnet-<id12>`, one handle per network) hand the traffic between the host CIDR and
the rest of the cluster CIDR straight between the container and the uplink (and between two
containers of the network on this host, veth to veth): no pass through the host's
IP forwarding or netfilter (the same traffic the conntrack bypass below already accepts statelessly and
never NATs). Everything else, and anything the programs cannot resolve, takes routed mode's path.

Firewall: computed per mode by vpcnet.datapath.modes and written by vpcnet.datapath.firewall in one
`iptables-restore --noflush` transaction, in chains of vpcnet's own so removing a network removes exactly
its rules:
- filter `VPCNET-FORWARD` (jumped to from FORWARD): accepts the network's traffic even though Docker
  sets FORWARD's policy to DROP; one chain per network `VPCNET-F-<id12>`. Its jump sits right after
  Docker's `-j DOCKER-USER` when there is one (first otherwise), so a user's DOCKER-USER rules apply to
  vpcnet's traffic as to Docker's own networks; Docker 28's DOCKER-FORWARD comes after it and matches
  only Docker's bridges.
- nat `VPCNET-POSTROUTING` (jumped to from POSTROUTING): per network `VPCNET-N-<id12>` masquerades
  traffic from the host CIDR only when it leaves for a destination outside the cluster CIDR and the
  no-NAT list. Container-to-container traffic inside the VPC keeps its own source address.
- `--internal` networks: forwarding only within the cluster CIDR, no masquerade.
- raw `VPCNET-RAW` (jumped to from raw PREROUTING): the routed modes' anti-spoofing rule, and per network
  `VPCNET-R-<id12>` marks forwarded traffic between the host CIDR and the cluster CIDR NOTRACK. That
  traffic is accepted statelessly and never NATed, so conntrack (a lookup and an entry per flow, on every
  packet) buys nothing; bypassing it lifted cross-host TCP and UDP packet rate on the lab. Traffic to or
  from the gateway (host <-> container, local delivery) stays tracked, so a host firewall relying on
  conntrack in INPUT keeps working. Untracked packets skip the nat table: fine, cluster traffic is never
  masqueraded.

Every operation is idempotent: create what is missing, accept what exists, ignore what is gone. `repair`
is the periodic pass's half (vpcnet.datapath.reconciler): one dump of links, addresses, routes and
qdiscs and one iptables-save find what differs from the store; only those networks get a targeted look
under their lock, and each difference put right is returned as a `Repair`.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import subprocess
import threading
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

from pyroute2 import IPRoute, NetlinkError

from vpcnet import ebpf, rtnl
from vpcnet.datapath.features import Features, probe
from vpcnet.datapath.firewall import FORWARD_CHAIN, HOST_VETHS, NAT_CHAIN, PARENTS, PREFIXES, RAW_CHAIN, FirewallTable  # noqa: F401 - re-exported: vpcnet.dataplane's public names
from vpcnet.datapath.modes import strategy
from vpcnet.errors import DataplaneError

log = logging.getLogger(__name__)
_no_lock = nullcontext

MODES = ("bridge", "routed", "ebpf")
SCOPE_LINK = 253
DEFAULT_MTU = 1500
TC_INGRESS = 0xFFFFFFF2           # clsact's ingress hook
ETH_P_IP = 0x0800
ENDPOINT_FILTER = (0x7F00, 1)     # (prio, handle) of the program on an endpoint's host veth
UPLINK_PRIO = 0x7F01              # the uplink's programs: one handle per network (uplink_handle)


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

    @property
    def routed(self) -> bool:
        """No bridge: the anchor, proxy ARP and /32 routes (routed and ebpf modes)."""
        return self.mode in ("routed", "ebpf")

    @property
    def ebpf(self) -> bool:
        return self.mode == "ebpf"

    @property
    def tc_name(self) -> str:
        return f"vpcnet-{self.tag}"

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.host_cidr).prefixlen

    @property
    def filter_chain(self) -> str:
        return f"VPCNET-F-{self.tag}"

    @property
    def nat_chain(self) -> str:
        return f"VPCNET-N-{self.tag}"

    @property
    def raw_chain(self) -> str:
        return f"VPCNET-R-{self.tag}"


class NetworkGone(Exception):
    """Raised by a repair pass's lock when the network left the store while the pass waited for it."""


@dataclass(frozen=True)
class EndpointSpec:
    host_veth: str
    peer_veth: str
    mac: str
    address: str                # bare IP


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
    uplink_programs: dict[str, set[int]]   # tc filter name -> link indexes


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
    so peers' ARP caches stay right."""
    octets = ipaddress.IPv4Address(ip).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in octets)


class Dataplane:
    def __init__(self, netns: str | None = None, iptables: str = "iptables"):
        self.netns = netns
        self.iptables = iptables
        self._local = threading.local()
        self.firewall = FirewallTable(self._cmd(), iptables)

    # -- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def _ipr(self) -> Iterator[IPRoute]:
        """This thread's netlink socket, opened once: opening one costs more than the request itself."""
        ipr = getattr(self._local, "ipr", None)
        if ipr is None or self._local.pid != os.getpid():
            ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
            self._local.ipr, self._local.pid = ipr, os.getpid()
        try:
            yield ipr
        except NetlinkError:
            raise                               # the kernel said no; the socket is fine
        except BaseException:
            self._local.ipr = None              # anything else may have broken it: open a new one next time
            try:
                ipr.close()
            except Exception:
                pass
            raise

    def _rtnl(self):
        """This thread's raw rtnetlink socket (vpcnet.rtnl), for what pyroute2 has no call for."""
        sock = getattr(self._local, "rtnl", None)
        if sock is None or self._local.rtnl_pid != os.getpid():
            sock = rtnl.open_socket(self.netns)
            self._local.rtnl, self._local.rtnl_pid = sock, os.getpid()
        return sock

    def _drop_rtnl(self) -> None:
        """Close and forget this thread's rtnetlink socket (after a failure it may be out of step)."""
        sock, self._local.rtnl = getattr(self._local, "rtnl", None), None
        if sock is not None:
            sock.close()

    def _cmd(self, *args: str) -> list[str]:
        return (["ip", "netns", "exec", self.netns] if self.netns else []) + list(args)

    def _sysctl(self, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        if self.netns:
            subprocess.run(self._cmd("sysctl", "-qw", f"{key}={value}"), check=False, timeout=10,
                           capture_output=True)
            return
        try:
            with open(path) as fh:
                if fh.read().strip() == value:
                    return
            with open(path, "w") as fh:
                fh.write(value)
        except OSError as exc:
            raise DataplaneError(f"cannot set {key}={value}: {exc}") from None

    # -- host-wide --------------------------------------------------------------------------------
    def uplink_mtu(self) -> int:
        """MTU of the interface carrying the default route (the VPC link), 1500 without one."""
        with self._ipr() as ipr:
            for index in self._uplinks(ipr):
                links = ipr.link("get", index=index)
                return int(links[0].get("IFLA_MTU") or DEFAULT_MTU)
        return DEFAULT_MTU

    @staticmethod
    def _uplinks(ipr: IPRoute) -> list[int]:
        """Indexes of the devices carrying the default route (main table), in route order."""
        out: list[int] = []
        for route in ipr.route("dump", table=254, family=2):
            if route.get("dst_len") == 0:
                hops = [route.get("RTA_OIF")] + [hop["oif"] for hop in route.get("RTA_MULTIPATH") or []]
                out += [index for index in hops if index and index not in out]
        return out

    def features(self) -> Features:
        """What each datapath mode needs, probed once per process on this namespace (vpcnet.datapath.features)."""
        return probe(self.netns)

    def overlapping_routes(self, cidr: str) -> list[str]:
        """Kernel routes (main table, not the default route) overlapping `cidr`, described for humans."""
        net = ipaddress.IPv4Network(cidr)
        found = []
        with self._ipr() as ipr:
            names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
            for route in ipr.route("dump", table=254, family=2):
                dst, dst_len = route.get("RTA_DST"), route.get("dst_len")
                if not dst or not dst_len:
                    continue
                other = ipaddress.IPv4Network(f"{dst}/{dst_len}", strict=False)
                if other.overlaps(net):
                    found.append(f"{other} dev {names.get(route.get('RTA_OIF'), '?')}")
        return found

    def ensure_host(self) -> list[str]:
        """ip_forward, the shared chains, the builtin chains' jumps to them, the anti-spoofing rule.
        Returns what was wrong."""
        self._sysctl("net.ipv4.ip_forward", "1")
        return self.firewall.apply([], host=True)

    # -- networks ---------------------------------------------------------------------------------
    def ensure_network(self, spec: NetworkSpec) -> None:
        self._ensure_links(spec, firewall=True)

    def _ensure_links(self, spec: NetworkSpec, firewall: bool = False) -> None:
        """The bridge or anchor, its address, MTU and state, the uplink programs; with `firewall`, the
        network's rules (between the links and the programs, as a first creation needs)."""
        self._sysctl("net.ipv4.ip_forward", "1")
        with self._ipr() as ipr:
            idx = self._link_index(ipr, spec.bridge)
            if idx is None:
                try:
                    if spec.routed:     # the anchor: one end of a veth pair (no dummy driver needed)
                        ipr.link("add", ifname=spec.bridge, kind="veth", mtu=spec.mtu,
                                 peer={"ifname": anchor_peer(spec.bridge), "mtu": spec.mtu})
                    else:
                        ipr.link("add", ifname=spec.bridge, kind="bridge")
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise DataplaneError(f"cannot create {spec.bridge}: {exc}") from None
                idx = self._link_index(ipr, spec.bridge)
            if spec.routed:
                peer = self._link_index(ipr, anchor_peer(spec.bridge))
                if peer is not None:
                    ipr.link("set", index=peer, state="up")
            try:
                ipr.link("set", index=idx, mtu=spec.mtu)
                ipr.addr("add", index=idx, address=spec.gateway, prefixlen=spec.prefixlen)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise DataplaneError(f"cannot configure bridge {spec.bridge}: {exc}") from None
            ipr.link("set", index=idx, state="up")
        if idx is None:
            raise DataplaneError(f"{spec.bridge} vanished while it was being configured")
        if firewall:
            self._ensure_firewall(spec)
        if spec.ebpf:
            self._ensure_uplink_programs(spec, idx)

    def _ensure_uplink_programs(self, spec: NetworkSpec, anchor: int) -> None:
        """The network's program on each uplink, replaced in place (a restart never opens a gap). Without a
        default route there is no uplink yet: traffic from other hosts takes the routed path meanwhile."""
        program = ebpf.uplink_program(spec.host_cidr, spec.cluster_cidr, anchor)
        with self._ipr() as ipr:
            uplinks = self._uplinks(ipr)
            if not uplinks:
                log.warning("network %s: no default route, so no uplink for the eBPF fast path yet; traffic "
                            "from other hosts takes the routed path", spec.tag)
            for index in uplinks:
                self._attach(ipr, index, program, "vpcnet_uplink", spec.tc_name, UPLINK_PRIO,
                             uplink_handle(spec.tag))
            # The default route moved (a new uplink, a renamed or replaced device): the program leaves the
            # devices that no longer carry it.
            for index, handle, name in list(self._uplink_programs(ipr)):
                if name == spec.tc_name and index not in uplinks:
                    log.warning("network %s: eBPF uplink program left on link %d, which no longer carries "
                                "the default route: removed", spec.tag, index)
                    self._drop_uplink_program(ipr, index, handle)

    def _attach(self, ipr: IPRoute, index: int, program: bytes, prog_name: str, filter_name: str, prio: int,
                handle: int) -> None:
        fd = ebpf.load(program, prog_name)
        try:
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise DataplaneError(f"cannot add the clsact qdisc to link {index}: {exc}") from None
            try:
                ipr.tc("replace-filter", "bpf", index, handle, fd=fd, name=filter_name, parent=TC_INGRESS,
                       classid=1, direct_action=True, prio=prio, protocol=ETH_P_IP)
            except NetlinkError as exc:
                raise DataplaneError(f"cannot attach eBPF program {filter_name} to link {index}: {exc}") from None
        finally:
            os.close(fd)               # the filter holds the program now

    def _uplink_programs(self, ipr: IPRoute, clsact: set[int] | None = None) -> Iterator[tuple[int, int, str]]:
        """(link index, handle, name) of every vpcnet uplink program on this host: one qdisc dump finds
        the links with a clsact qdisc (unless `clsact` lists them already), only those are asked for
        their filters."""
        if clsact is None:
            clsact = {q["index"] for q in ipr.get_qdiscs() if q.get_attr("TCA_KIND") == "clsact"}
        for index in sorted(clsact):
            try:
                filters = ipr.get_filters(index=index, parent=TC_INGRESS)
            except NetlinkError:
                continue                 # the link went away meanwhile
            for f in filters:
                options = f.get_attr("TCA_OPTIONS")
                fname = options.get_attr("TCA_BPF_NAME") if options else None
                if f["info"] >> 16 == UPLINK_PRIO and fname and fname.startswith("vpcnet-"):
                    yield index, f["handle"], fname

    def _drop_uplink_program(self, ipr: IPRoute, index: int, handle: int) -> None:
        try:
            ipr.tc("del-filter", "bpf", index, handle, parent=TC_INGRESS, prio=UPLINK_PRIO, protocol=ETH_P_IP)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise DataplaneError(f"cannot remove eBPF program from link {index}: {exc}") from None

    def drop_stale_uplink_programs(self, known_tags: set[str]) -> list[str]:
        """Remove uplink programs of networks vpcnet no longer knows and whose anchor is gone (as for
        chains: an anchor that exists may be another vpcnet instance's network). Returns their names."""
        dropped = []
        with self._ipr() as ipr:
            for index, handle, name in list(self._uplink_programs(ipr)):
                tag = name[len("vpcnet-"):]
                if tag not in known_tags and self._link_index(ipr, bridge_name(tag)) is None:
                    self._drop_uplink_program(ipr, index, handle)
                    dropped.append(name)
        return dropped

    def _ensure_firewall(self, spec: NetworkSpec) -> list[str]:
        """The network's chains and the host's, in one transaction; returns what was wrong."""
        return self.firewall.apply([strategy(spec.mode).firewall(spec)], host=True)

    def delete_network(self, spec: NetworkSpec) -> None:
        self.firewall.apply([], unwanted=[spec.tag], host=False)
        if spec.ebpf:
            with self._ipr() as ipr:
                for index, handle, name in list(self._uplink_programs(ipr)):
                    if name == spec.tc_name:
                        self._drop_uplink_program(ipr, index, handle)
        self._delete_link(spec.bridge)

    def network_exists(self, spec: NetworkSpec) -> bool:
        with self._ipr() as ipr:
            return self._link_index(ipr, spec.bridge) is not None

    def stale_chains(self, known_tags: set[str]) -> list[tuple[str, str]]:
        """(table, chain) of per-network chains whose network vpcnet no longer knows and whose bridge is
        gone. A chain whose bridge still exists may belong to another vpcnet instance on this host (a
        managed plugin beside a systemd one, say): never touch it."""
        out = []
        saved = self.firewall.save()
        with self._ipr() as ipr:
            for table, prefix in PREFIXES.items():
                for chain in saved.chains(table):
                    tag = chain[len(prefix):]
                    if chain.startswith(prefix) and tag not in known_tags and \
                            self._link_index(ipr, bridge_name(tag)) is None:
                        out.append((table, chain))
        return out

    def drop_stale_chain(self, table: str, chain: str) -> None:
        self.firewall.drop([(table, chain)])

    # -- endpoints --------------------------------------------------------------------------------
    def ensure_endpoint(self, spec: NetworkSpec, host_veth: str, peer_veth: str, mac: str, address: str) -> None:
        """A veth pair for an endpoint of network `spec`. Bridge mode: host end on the bridge. Routed and
        ebpf modes: host end on no bridge, answering ARP for the container's neighbours and gateway (proxy
        ARP), and a route `<address>/32 dev <host end>` (it goes with the veth); ebpf mode also attaches the
        container program to the host end (it goes with the veth too)."""
        with self._ipr() as ipr:
            br = self._link_index(ipr, spec.bridge)
            if br is None:
                raise DataplaneError(f"{'anchor' if spec.routed else 'bridge'} {spec.bridge} is missing")
            master = {} if spec.routed else {"master": br}
            host_idx = None
            try:   # one request: the pair is born (on the bridge) and up
                ipr.link("add", ifname=host_veth, kind="veth", mtu=spec.mtu, state="up", **master,
                         peer={"ifname": peer_veth, "address": mac, "mtu": spec.mtu})
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise DataplaneError(f"cannot create veth {host_veth}: {exc}") from None
                host_idx = self._link_index(ipr, host_veth)      # it exists: make sure it is right
                ipr.link("set", index=host_idx, mtu=spec.mtu, state="up", **master)
            if not spec.routed:
                return
            if host_idx is None:
                host_idx = self._link_index(ipr, host_veth)
            if host_idx is None:
                raise DataplaneError(f"veth {host_veth} vanished while it was being configured")
        # Proxy ARP answers the container for every address the host routes elsewhere (its neighbours
        # on other veths, the cluster); the gateway is a local address, answered anyway. No delay.
        # Over netlink: a managed plugin's /proc/sys is read-only.
        try:
            sock = self._rtnl()
            rtnl.set_proxy_arp(sock, host_idx)
            rtnl.set_arp_proxy_delay(sock, host_idx, 0)
        except OSError as exc:
            self._drop_rtnl()
            raise DataplaneError(f"cannot turn on proxy ARP for {host_veth}: {exc}") from None
        with self._ipr() as ipr:
            try:
                ipr.route("replace", dst=address, dst_len=32, oif=host_idx, scope=SCOPE_LINK)
            except NetlinkError as exc:
                raise DataplaneError(f"cannot route {address} to {host_veth}: {exc}") from None
            if spec.ebpf:
                self._attach(ipr, host_idx, ebpf.container_program(spec.host_cidr, spec.cluster_cidr, address, br),
                             "vpcnet_ctr", spec.tc_name, *ENDPOINT_FILTER)

    def delete_endpoint(self, host_veth: str) -> None:
        self._delete_link(host_veth)       # the peer goes with it, wherever it is

    def link_exists(self, name: str) -> bool:
        with self._ipr() as ipr:
            return self._link_index(ipr, name) is not None

    # -- the periodic pass: drift found by reading the kernel -------------------------------------------
    def view(self, with_tc: bool = True) -> KernelView:
        """One read of the kernel: links, addresses, routes (raw netlink dumps, vpcnet.rtnl: a fraction of
        pyroute2's cost per message) and, with `with_tc` (ebpf networks exist), qdiscs and uplink programs."""
        try:
            sock = self._rtnl()
            links = rtnl.dump_links(sock)
            addresses = rtnl.dump_addresses(sock)
            routes, uplinks = rtnl.dump_routes(sock)
            clsact = {i for i, kinds in rtnl.dump_qdisc_kinds(sock).items() if "clsact" in kinds} \
                if with_tc else set()
        except OSError as exc:
            self._drop_rtnl()
            raise DataplaneError(f"cannot read the kernel's links and routes: {exc}") from None
        programs: dict[str, set[int]] = {}
        if with_tc:
            with self._ipr() as ipr:
                for index, _handle, name in self._uplink_programs(ipr, clsact):
                    programs.setdefault(name, set()).add(index)
        return KernelView(links, addresses, routes, clsact, uplinks, programs)

    def repair(self, networks: Sequence[tuple[NetworkSpec, Sequence[EndpointSpec]]],
               lock_for: Callable[[NetworkSpec], ContextManager] | None = None,
               still_wanted: Callable[[str], bool] | None = None) -> list[Repair]:
        """Make the kernel hold what `networks` want, reading it first; returns what was wrong (nothing,
        on a host left alone). A network that looks wrong in the dumps is looked at again under its
        lock (`lock_for`), where no Docker call is changing it, and only then repaired."""
        repairs: list[Repair] = []
        view = self.view(with_tc=any(spec.ebpf for spec, _ in networks))
        saved = self.firewall.save()
        repairs += [Repair("firewall", "-", p) for p in self.firewall.apply([], host=True, saved=saved)]
        # The firewall of every drifted network in one transaction (a mass flush costs one restore, not one
        # per network). The rules are the store rows' (fixed for a network's life); a network deleted
        # since the store was read is dropped first by `still_wanted`.
        drifted = [strategy(spec.mode).firewall(spec) for spec, _ in networks
                   if self.firewall.differs(saved, strategy(spec.mode).firewall(spec))]
        if still_wanted is not None:
            drifted = [rules for rules in drifted if still_wanted(rules.tag)]
        if drifted:
            for problem in self.firewall.apply(drifted, host=False):
                tag = next((r.tag for r in drifted if r.tag in problem), "-")
                repairs.append(Repair("firewall", tag, problem))
        for spec, endpoints in networks:
            if not self._suspect(spec, endpoints, view):
                continue
            try:
                with (lock_for(spec) if lock_for else _no_lock()):
                    repairs += self._repair_network(spec, endpoints)
            except NetworkGone:                   # deleted (or its creation undone) meanwhile
                continue
            except Exception as exc:              # one broken network never stops the pass
                log.error("network %s: cannot repair the datapath: %s", spec.tag, exc)
        return repairs

    def _suspect(self, spec: NetworkSpec, endpoints: Sequence[EndpointSpec], view: KernelView) -> bool:
        link = view.links.get(spec.bridge)
        if link is None or not link["up"] or link["mtu"] != spec.mtu:
            return True
        if f"{spec.gateway}/{spec.prefixlen}" not in view.addresses.get(link["index"], set()):
            return True
        if spec.ebpf and view.uplink_programs.get(spec.tc_name, set()) != set(view.uplinks):
            return True
        for ep in endpoints:
            host = view.links.get(ep.host_veth)
            if host is None:
                continue                          # no veth: the container is gone, Docker will say so
            if not spec.routed and host["master"] != link["index"]:
                return True
            if spec.routed and view.routes.get(f"{ep.address}/32") != host["index"]:
                return True
            if spec.ebpf and host["index"] not in view.clsact:
                return True
        return False

    def _repair_network(self, spec: NetworkSpec, endpoints: Sequence[EndpointSpec]) -> list[Repair]:
        """Under the network's lock: a targeted look at each piece, repaired where still wrong."""
        repairs: list[Repair] = []
        with self._ipr() as ipr:
            idx = self._link_index(ipr, spec.bridge)
            state = ipr.link("get", index=idx)[0] if idx is not None else None
            addrs = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)} \
                if idx is not None else set()
            uplinks = self._uplinks(ipr)
            programs = {i for i, _h, name in self._uplink_programs(ipr) if name == spec.tc_name} \
                if spec.ebpf else set()
        what = "anchor" if spec.routed else "bridge"
        if state is None:
            repairs.append(Repair("link", spec.tag, f"{what} {spec.bridge} missing"))
        elif not state["flags"] & 1:
            repairs.append(Repair("link", spec.tag, f"{what} {spec.bridge} down"))
        elif state.get_attr("IFLA_MTU") != spec.mtu:
            repairs.append(Repair("link", spec.tag, f"{what} {spec.bridge} has MTU {state.get_attr('IFLA_MTU')}"))
        elif f"{spec.gateway}/{spec.prefixlen}" not in addrs:
            repairs.append(Repair("address", spec.tag, f"gateway {spec.gateway} missing on {spec.bridge}"))
        elif spec.ebpf and programs != set(uplinks):
            repairs.append(Repair("tc", spec.tag, f"uplink programs on links {sorted(programs)}, default "
                                                   f"route on {sorted(uplinks)}"))
        if repairs:
            self._ensure_links(spec)          # rebuilds what is missing, accepts what is there
        for ep in endpoints:
            repairs += self._repair_endpoint(spec, ep)
        return repairs

    def _repair_endpoint(self, spec: NetworkSpec, ep: EndpointSpec) -> list[Repair]:
        with self._ipr() as ipr:
            host_idx = self._link_index(ipr, ep.host_veth)
            if host_idx is None:
                return []
            link = ipr.link("get", index=host_idx)[0]
            problem = ""
            if not spec.routed:
                master = self._link_index(ipr, spec.bridge)
                if link.get_attr("IFLA_MASTER") != master:
                    problem = f"host veth {ep.host_veth} of {ep.address} not on bridge {spec.bridge}"
            else:
                try:
                    got = ipr.route("get", dst=ep.address)
                    oif = got[0].get_attr("RTA_OIF") if got else None
                except NetlinkError:
                    oif = None
                if oif != host_idx:
                    problem = f"route {ep.address}/32 dev {ep.host_veth} missing"
                elif spec.ebpf and not any(f.get_attr("TCA_KIND") == "bpf"
                                           for f in ipr.get_filters(index=host_idx, parent=TC_INGRESS)):
                    problem = f"eBPF program on {ep.host_veth} missing"
            if not problem and not link["flags"] & 1:
                problem = f"host veth {ep.host_veth} down"
        if not problem:
            return []
        self.ensure_endpoint(spec, ep.host_veth, ep.peer_veth, ep.mac, ep.address)
        kind = "route" if "route" in problem else "tc" if "eBPF" in problem else "link"
        return [Repair(kind, spec.tag, problem)]

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _link_index(ipr: IPRoute, name: str) -> int | None:
        # A targeted RTM_GETLINK by name: link_lookup() would dump every link, which grows with the
        # number of endpoints on the host.
        try:
            return ipr.link("get", ifname=name)[0]["index"]
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise

    def _delete_link(self, name: str) -> None:
        with self._ipr() as ipr:
            idx = self._link_index(ipr, name)
            if idx is None:
                return
            try:
                ipr.link("del", index=idx)
            except NetlinkError as exc:
                if exc.code not in (errno.ENODEV, errno.ENOENT):
                    raise DataplaneError(f"cannot delete {name}: {exc}") from None
