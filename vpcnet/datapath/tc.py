"""The eBPF fast path's tc side (ebpf mode): vpcnet.datapath.ebpf's programs attached, found and removed over netlink.

- Per endpoint: the network's container program on the ingress of its host veth (clsact, prio/handle
  `ENDPOINT_FILTER`); the filter goes with the veth. One program per network and family, loaded once by
  this process (`shared`: again only when its uplinks or anchor change) and attached to every endpoint's
  veth; each endpoint's own facts (address, published ports) are its entry in this process's endpoint
  maps (`facts`, vpcnet.datapath.ebpf.endpoints), written before its filter is attached, with its entry in
  the map of this host's endpoints by address (`write_local`: what the uplink program and the other
  endpoints' container programs deliver to it by, without a fib lookup).
- Per network: the uplink program on the ingress of every uplink: each device carrying the default route,
  and those named by VPCNET_UPLINKS (filter
  `vpcnet-<tag>`, prio `UPLINK_PRIO`, one handle per network: `uplink_handle`). It follows the default
  route: a device that no longer carries it loses the program. It reads this process's map of this host's
  endpoints: `own_uplinks` are the networks whose uplink programs this process attached (after a restart,
  the periodic pass puts its own in place of the old process's).
- Peer counting (VPCNET_PEER_METRICS, `TcPrograms.peers`): the host's peer map (vpcnet.datapath.ebpf.maps),
  written by a counting program (one per network and direction, shared as the container program is) on
  the egress of every endpoint's host veth (prio/handle `COUNT_FILTER`:
  what the container receives), by the container program (ebpf mode: what it sends, counted first) or,
  in routed and bridge modes, by a counting program in the container program's place (ingress,
  `ENDPOINT_FILTER`), and by the uplink program (ebpf mode: what it hands into a container with
  bpf_redirect_peer, which passes no hook of the host veth). They go with the veth; the map goes with
  the last program holding it.
- IPv6 (vpcnet.datapath.ebpf.programs6): separate filters of protocol ETH_P_IPV6 beside the IPv4 ones (so
  neither family's program ever runs for the other's packets, and hosts whose IPv4 filters exist keep
  them): an IPv6 endpoint's container program (`ENDPOINT6_FILTER`, from `ensure_endpoint_ipv6` until its
  address goes: `drop_endpoint6`), its receive counting program (`COUNT6_FILTER`), and, per network with
  an IPv6 block, `vpcnet6-<tag>` on the uplinks (prio `UPLINK6_PRIO`, the same handle). The IPv4 default
  route's devices are the uplinks of both families.
- Bridge mode's anti-spoofing guard (`attach_guard`; the program: vpcnet.datapath.guard): a classic BPF
  filter (no bpf() syscall, no eBPF needed) on the ingress of every bridge-mode endpoint's host veth
  (prio/handle `GUARD_FILTER`, protocol all, ahead of the counting programs): the endpoint's own MAC, IPv4,
  ARP and IPv6 pass on to the next filter, the rest is dropped. It goes with the veth.
Programs are replaced in place (`replace-filter`), so re-applying never opens a gap.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from pyroute2 import IPRoute, NetlinkError

from vpcnet.datapath import ebpf, guard, rtnl
from vpcnet.datapath.ebpf import maps, programs6
from vpcnet.datapath.ebpf.endpoints import EndpointFacts, local_value
from vpcnet.datapath.guard import GuardFacts
from vpcnet.datapath.netlink import Netlink
from vpcnet.datapath.spec import NetworkSpec, bridge_name, uplink_handle
from vpcnet.errors import DataplaneError

log = logging.getLogger(__name__)

TC_INGRESS = 0xFFFFFFF2           # clsact's ingress hook
TC_EGRESS = 0xFFFFFFF3            # clsact's egress hook
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ENDPOINT_FILTER = (0x7F00, 1)     # (prio, handle) of the program on an endpoint's host veth
COUNT_FILTER = (0x7F02, 1)        # (prio, handle) of the receive counting program (egress of the host veth)
UPLINK_PRIO = 0x7F01              # the uplink's programs: one handle per network (uplink_handle)
ENDPOINT6_FILTER = (0x7F03, 1)    # IPv6: the container program (ingress of the host veth)
COUNT6_FILTER = (0x7F04, 1)       # IPv6: the receive counting program (egress of the host veth)
UPLINK6_PRIO = 0x7F05             # IPv6: the uplink's programs (`vpcnet6-<tag>`)
GUARD_FILTER = (0x7E00, 1)        # (prio, handle) of bridge mode's anti-spoofing guard (ingress, before all)
ETH_P_ALL = 0x0003
UPLINK_PRIOS = {"vpcnet-": (UPLINK_PRIO, ETH_P_IP), "vpcnet6-": (UPLINK6_PRIO, ETH_P_IPV6)}   # by name prefix


@dataclass(frozen=True)
class FamilyFilters:
    """What differs between the families on an endpoint's host veth: where its filters go, for which
    protocol, and which programs they hold (kinds and names end in `suffix`)."""
    version: int
    endpoint: tuple[int, int]         # (prio, handle): container or transmit counting program, ingress
    count_filter: tuple[int, int]     # (prio, handle): receive counting program, egress
    protocol: int
    suffix: str
    container: Callable[..., bytes]   # (host, cluster, endpoints_fd, anchor, uplinks, map_fd=, local_fd=, shared=)
    count: Callable[..., bytes]       # (direction, cluster, map_fd, endpoints_fd)

    def blocks(self, spec: NetworkSpec) -> tuple[str, str]:
        """The network's (host block, cluster CIDR) of this family ("" where it has none)."""
        return (spec.host_cidr, spec.cluster_cidr) if self.version == 4 else (spec.host_cidr_v6, spec.cluster_cidr_v6)


FAMILIES = {
    4: FamilyFilters(4, ENDPOINT_FILTER, COUNT_FILTER, ETH_P_IP, "", ebpf.container_program, ebpf.count_program),
    6: FamilyFilters(6, ENDPOINT6_FILTER, COUNT6_FILTER, ETH_P_IPV6, "6", programs6.container_program6,
                     programs6.count_program6),
}


def _version(address: str) -> int:
    return 6 if ":" in address else 4


class TcPrograms:
    def __init__(self, netlink: Netlink, peers: bool = False, local_endpoints: bool = True):
        self.nl = netlink
        self.peers = peers               # VPCNET_PEER_METRICS: count per peer
        # The map of this host's endpoints by address, read by the uplink and container programs (off: they
        # find every endpoint by the fib lookup). Off with several workers: each has its own maps, and one
        # worker's programs would keep an endpoint another deleted until its next pass.
        self.local_endpoints = local_endpoints
        self.peers_off = "" if peers else "VPCNET_PEER_METRICS=off"   # why peers are not counted ("": they are)
        # What this process attached counting programs to (host veth indexes, network filter names): where
        # the map is the process's own (maps.local), the others write an earlier process's map.
        self.counted: set[int] = set()
        self.counted_uplinks: set[str] = set()
        # The endpoints' facts the shared programs read (vpcnet.datapath.ebpf.endpoints): this process's maps.
        self.facts = EndpointFacts()
        # (kind, network tag) -> (what the program was built from, its descriptor, whether it counts): each
        # network's shared endpoint programs, loaded (verified) once and kept while their inputs hold.
        self._shared: dict[tuple[str, str], tuple[tuple, int, bool]] = {}
        self._shared_lock = threading.Lock()
        # The uplinks as last read (the uplink programs' upkeep, the periodic pass's view, or the first
        # endpoint): what the container programs built now take other hosts' traffic out of. Not read again
        # per endpoint (a dump of the whole route table, a /32 and a /128 per container).
        self.uplinks: tuple[int, ...] | None = None
        # Networks whose uplink programs this process attached (reading its endpoint maps): another process's
        # (before a restart) read that process's map of this host's endpoints, which this one never updates;
        # the periodic pass takes them over (vpcnet.datapath.dataplane).
        self.own_uplinks: set[str] = set()

    @contextmanager
    def peer_map(self) -> Iterator[int | None]:
        """The host's peer map for the programs being loaded (None: counting is off, or the map cannot be
        had: said once, and `peers_off` says why). Closed after: the programs hold it."""
        fd = None
        if self.peers:
            try:
                fd = maps.find_or_create()
            except DataplaneError as exc:
                if not self.peers_off:
                    log.warning("peer counting is off: %s", exc)
                self.peers_off = str(exc)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def shared(self, kind: str, spec: NetworkSpec, inputs: tuple, build: Callable[[int | None], bytes | None],
               prog_name: str) -> tuple[int | None, bool]:
        """(a descriptor of the network's shared program of `kind`, the caller's to close; whether it counts
        into the peer map). Loaded and verified on first use, and again only when `inputs` (what `build`,
        given the peer map or None, makes it from: the uplinks, the anchor...) change; the old one stays
        with the filters still holding it. (None, False): `build` made nothing (a counting program with
        counting off)."""
        with self._shared_lock:
            held = self._shared.get((kind, spec.tag))
            if held is None or held[0] != inputs:
                with self.peer_map() as map_fd:
                    program = build(map_fd)
                    if program is None:
                        return None, False
                    fd = ebpf.load(program, prog_name)
                    counting = map_fd is not None
                if held is not None:
                    os.close(held[1])
                held = self._shared[(kind, spec.tag)] = (inputs, fd, counting)
            return os.dup(held[1]), held[2]

    def forget_network(self, spec: NetworkSpec) -> None:
        """The network went: its shared programs are no longer this process's to hold (filters still
        holding one keep it until they go)."""
        with self._shared_lock:
            for kind_tag in [k for k in self._shared if k[1] == spec.tag]:
                os.close(self._shared.pop(kind_tag)[1])
        self.own_uplinks.discard(spec.tag)

    def close(self) -> None:
        with self._shared_lock:
            for _inputs, fd, _counting in self._shared.values():
                os.close(fd)
            self._shared.clear()
        self.facts.close()

    def attach(self, ipr: IPRoute, index: int, program: bytes, prog_name: str, filter_name: str, prio: int,
               handle: int, parent: int = TC_INGRESS, protocol: int = ETH_P_IP) -> None:
        fd = ebpf.load(program, prog_name)
        try:
            self.attach_fd(ipr, index, fd, filter_name, prio, handle, parent, protocol)
        finally:
            os.close(fd)               # the filter holds the program now

    def attach_fd(self, ipr: IPRoute, index: int, fd: int, filter_name: str, prio: int, handle: int,
                  parent: int = TC_INGRESS, protocol: int = ETH_P_IP, qdisc: bool = True) -> None:
        """A loaded program (`fd`, still the caller's) as the filter `filter_name` on link `index`; `qdisc`
        False: the caller has just made sure of the link's clsact qdisc. Over the raw rtnetlink socket
        (vpcnet.datapath.rtnl: a fraction of pyroute2's cost per request, which counts on CreateEndpoint's
        path); pyroute2's, and its error, where that fails."""
        try:
            sock = self.nl.rtnl()
            if qdisc:
                rtnl.add_clsact(sock, index)
            rtnl.replace_bpf_filter(sock, index, parent, prio, protocol, handle, fd, filter_name)
            return
        except OSError:
            self.nl.drop_rtnl()
        try:
            if qdisc:
                ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DataplaneError(f"cannot add the clsact qdisc to link {index}: {exc}") from None
        try:
            ipr.tc("replace-filter", "bpf", index, handle, fd=fd, name=filter_name, parent=parent,
                   classid=1, direct_action=True, prio=prio, protocol=protocol)
        except NetlinkError as exc:
            raise DataplaneError(f"cannot attach eBPF program {filter_name} to link {index}: {exc}") from None

    def _attach_shared(self, ipr: IPRoute, index: int, shared: tuple[int | None, bool], filter_name: str,
                       prio: int, handle: int, parent: int = TC_INGRESS, protocol: int = ETH_P_IP,
                       qdisc: bool = True) -> bool:
        """Attach what `shared` returned (closing its descriptor); False: there was nothing to attach."""
        fd, counting = shared
        if fd is None:
            return False
        try:
            self.attach_fd(ipr, index, fd, filter_name, prio, handle, parent, protocol, qdisc)
        finally:
            os.close(fd)
        return counting

    @property
    def counting(self) -> bool:
        """Peers are counted (asked for, and nothing has turned it off)."""
        return self.peers and not self.peers_off

    def _anchor_and_uplinks(self, ipr: IPRoute, spec: NetworkSpec) -> tuple[int, tuple[int, ...]]:
        anchor = self.nl.index_of(ipr, spec.bridge)
        if anchor is None:
            raise DataplaneError(f"anchor {spec.bridge} is missing")
        if self.uplinks is None or self._new_extra_uplink(ipr, self.uplinks):
            self.uplinks = tuple(self.nl.all_uplinks(ipr))
        return anchor, self.uplinks

    def _new_extra_uplink(self, ipr: IPRoute, known: tuple[int, ...]) -> bool:
        """A link named in VPCNET_UPLINKS exists and is not among the uplinks as last read (it was made
        since): one link lookup per name, so a configured uplink counts from the next endpoint on, not from
        the next pass. A moved default route still waits for the pass (it takes a route dump to see)."""
        for name in self.nl.extra_uplinks:
            index = self.nl.index_of(ipr, name)
            if index is not None and index not in known:
                return True
        return False

    def facts_wanted(self, spec: NetworkSpec, family: int) -> bool:
        """Endpoints of `spec` have an entry in the family's endpoint map (ebpf mode's container programs, or
        the counting programs, read it)."""
        if family == 4:
            return spec.ipv4 and (spec.ebpf or self.counting)
        return bool(spec.cluster_cidr_v6) and ((spec.ebpf and bool(spec.host_cidr_v6)) or self.counting)

    # -- per endpoint -------------------------------------------------------------------------------
    def attach_guard(self, index: int | None, facts: GuardFacts, name: str = "") -> int:
        """Bridge mode: the anti-spoofing guard (vpcnet.datapath.guard) of the endpoint with `facts` on its
        host veth's ingress (link `index`, or looked up by `name`), replaced in place (no gap). A few raw
        netlink requests, no program load. Returns the link's index."""
        sock = self.nl.rtnl()
        try:
            if index is None:
                index = rtnl.link_index(sock, name)
                if index is None:
                    raise DataplaneError(f"veth {name} vanished while it was being configured")
            rtnl.add_clsact(sock, index)
            rtnl.replace_classic_bpf(sock, index, TC_INGRESS, *GUARD_FILTER, ETH_P_ALL, guard.program(facts),
                                     "vpcnet_guard")
        except OSError as exc:
            if exc.errno == errno.EPROTO:
                self.nl.drop_rtnl()
            raise DataplaneError(f"cannot attach the anti-spoofing filter for {facts.address} to link "
                                 f"{index or name}: {exc.strerror or exc}") from None
        return index

    def guard_facts(self, index: int) -> GuardFacts | None:
        """The endpoint facts of the anti-spoofing guard on link `index` (None: no guard of ours there)."""
        try:
            ops = rtnl.classic_bpf_ops(self.nl.rtnl(), index, TC_INGRESS, *GUARD_FILTER, ETH_P_ALL)
        except OSError as exc:
            self.nl.drop_rtnl()
            raise DataplaneError(f"cannot read the anti-spoofing filter of link {index}: {exc}") from None
        return guard.facts(ops)

    def has_guard(self, index: int, facts: GuardFacts) -> bool:
        """The anti-spoofing guard for exactly `facts` is on link `index`."""
        return self.guard_facts(index) == facts

    def local_wanted(self, spec: NetworkSpec, family: int) -> bool:
        """Endpoints of `spec` have an entry in the family's map of this host's endpoints by address (ebpf
        mode's uplink and container programs read it)."""
        return self.local_endpoints and spec.ebpf and \
            (spec.ipv4 if family == 4 else bool(spec.host_cidr_v6 and spec.cluster_cidr_v6))

    def local_fd(self, family: int) -> int | None:
        """The family's map of this host's endpoints by address for the programs being built (None: off)."""
        return self.facts.local_fd(family) if self.local_endpoints else None

    def local_entry(self, l2: dict | None) -> bytes | None:
        """The entry by address of the endpoint behind a host veth, from what rtnl.link_l2 (or dump_links and
        peer_mac) read of it: its index, MTU and MAC, and its other end's MAC (the container's, as the kernel
        has it, wherever the container put it); None: the map is off, or something is missing (the veth
        went, its other end cannot be read): no entry, the fib lookup delivers."""
        if not self.local_endpoints or not l2 or not (l2.get("mac") and l2.get("mtu") and l2.get("peer_mac")):
            return None
        return local_value(l2["index"], l2["mtu"], l2["peer_mac"], l2["mac"])

    def write_local(self, host_idx: int, address: str) -> None:
        """The entry of the endpoint holding `address` behind the host veth `host_idx` in the map of this host's
        endpoints by address (vpcnet.datapath.ebpf.endpoints.local_value, from the veth read now:
        `local_entry`); none where `local_entry` makes none."""
        if not self.local_endpoints:
            return
        try:
            entry = self.local_entry(rtnl.link_l2(self.nl.rtnl(), host_idx))
        except OSError as exc:
            self.nl.drop_rtnl()
            raise DataplaneError(f"cannot read link {host_idx} of {address}: {exc}") from None
        if entry is not None:
            self.facts.write_local(host_idx, address, entry)

    def attach_endpoint(self, ipr: IPRoute, spec: NetworkSpec, host_idx: int, address: str) -> None:
        """ebpf mode: the endpoint holding `address` (either family: the family's filters, maps and programs,
        `FAMILIES`) gets its entry in the family's endpoint map (its address: its only source on the fast
        path; its published ports, `spec.published`, whose replies are left to the host: written again when
        they change), its entry in the map of this host's endpoints by address (`write_local`: the uplink
        program and the other endpoints' container programs deliver to it without a fib lookup), then the
        network's shared container program of that family on the ingress of its host veth (loaded once per
        network: `shared`). The anchor's index keeps same-host traffic to unknown addresses on the routed
        path, and only the uplinks of this moment take other hosts' traffic (a new program, attached again,
        when the default route moves: vpcnet.datapath.dataplane's repair; until then such traffic takes the
        routed path). With counting, the shared receive counting program too. Nothing for a family the
        network has no block of."""
        family = FAMILIES[_version(address)]
        host, cluster = family.blocks(spec)
        if not (host and cluster):
            return
        anchor, uplinks = self._anchor_and_uplinks(ipr, spec)
        self.facts.write(host_idx, address, spec.published(address))
        self.write_local(host_idx, address)
        endpoints_fd, local_fd = self.facts.fd(family.version), self.local_fd(family.version)
        shared = {"shared": True} if spec.shared_range else {}     # eni-prefix: the range is every host's
        program = self.shared(f"ctr{family.suffix}", spec, (host, cluster, anchor, uplinks, *shared),
                              lambda map_fd: family.container(host, cluster, endpoints_fd, anchor, uplinks,
                                                              map_fd=map_fd, local_fd=local_fd, **shared),
                              f"vpcnet_ctr{family.suffix}")
        if self._attach_shared(ipr, host_idx, program, spec.tc_name, *family.endpoint, protocol=family.protocol):
            self._attach_receive_count(ipr, spec, host_idx, family)
            self.counted.add(host_idx)

    def attach_counting(self, ipr: IPRoute, spec: NetworkSpec, host_idx: int, address: str) -> None:
        """Routed and bridge modes: the entry of the endpoint holding `address` (either family) and the
        network's shared counting programs of that family on its host veth (ingress: what the container
        sends from it; egress: what it receives at it); nothing with counting off, or without the family's
        cluster CIDR."""
        family = FAMILIES[_version(address)]
        if not self.peers or not family.blocks(spec)[1]:
            return
        try:
            self.facts.write(host_idx, address, spec.published(address))
            if self._attach_shared(ipr, host_idx, self._count(spec, family, maps.TRANSMIT), spec.tc_name,
                                   *family.endpoint, protocol=family.protocol):
                self._attach_receive_count(ipr, spec, host_idx, family)
                self.counted.add(host_idx)
        except DataplaneError as exc:     # never worth an endpoint: counted nowhere, said once
            if not self.peers_off:
                log.warning("peer counting is off: %s", exc)
            self.peers_off = str(exc)

    def attach_for(self, ipr: IPRoute, spec: NetworkSpec, host_idx: int, address: str) -> None:
        """What the endpoint holding `address` gets in the network's mode: its container program (ebpf
        mode) or its counting programs (the others)."""
        (self.attach_endpoint if spec.ebpf else self.attach_counting)(ipr, spec, host_idx, address)

    def _count(self, spec: NetworkSpec, family: FamilyFilters, direction: int) -> tuple[int | None, bool]:
        endpoints_fd = self.facts.fd(family.version)
        cluster = family.blocks(spec)[1]
        return self.shared(f"count{family.suffix}-{direction}", spec, (cluster,),
                           lambda map_fd: None if map_fd is None else
                           family.count(direction, cluster, map_fd, endpoints_fd), f"vpcnet_count{family.suffix}")

    def _attach_receive_count(self, ipr: IPRoute, spec: NetworkSpec, host_idx: int, family: FamilyFilters) -> None:
        self._attach_shared(ipr, host_idx, self._count(spec, family, maps.RECEIVE), spec.tc_name, *family.count_filter,
                            parent=TC_EGRESS, protocol=family.protocol, qdisc=False)

    def drop_endpoint6(self, ipr: IPRoute, host_idx: int) -> None:
        """The IPv6 programs leave the host veth (its IPv6 address went), then its IPv6 entries leave the
        endpoint maps (the one by address too: nothing reaches it through the map any more); none there:
        nothing to do."""
        six = FAMILIES[6]
        for (prio, handle), parent in ((six.endpoint, TC_INGRESS), (six.count_filter, TC_EGRESS)):
            try:
                ipr.tc("del-filter", "bpf", host_idx, handle, parent=parent, prio=prio, protocol=six.protocol)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                    raise DataplaneError(f"cannot remove the IPv6 eBPF program from link {host_idx}: {exc}") \
                        from None
        self.facts.remove(host_idx, (6,))

    def forget_endpoint(self, host_idx: int) -> None:
        """The endpoint behind the host veth `host_idx` goes: its entries go (called before its veth is
        deleted, so no packet reaches it through the map of this host's endpoints from then on)."""
        self.facts.remove(host_idx)

    @staticmethod
    def endpoint_has_program6(ipr: IPRoute, host_idx: int) -> bool:
        """The IPv6 container (or counting) program is on the host veth's ingress."""
        return any(f.get_attr("TCA_KIND") == "bpf" and f["info"] >> 16 == ENDPOINT6_FILTER[0]
                   for f in ipr.get_filters(index=host_idx, parent=TC_INGRESS))

    @staticmethod
    def endpoint_has_program(ipr: IPRoute, host_idx: int) -> bool:
        return any(f.get_attr("TCA_KIND") == "bpf" and f["info"] >> 16 == ENDPOINT_FILTER[0]
                   for f in ipr.get_filters(index=host_idx, parent=TC_INGRESS))

    @staticmethod
    def endpoint_counts(ipr: IPRoute, host_idx: int) -> bool:
        """The receive counting program is on the endpoint's host veth (its ingress half is checked by
        endpoint_has_program)."""
        return any(f.get_attr("TCA_KIND") == "bpf" for f in ipr.get_filters(index=host_idx, parent=TC_EGRESS)) \
            and TcPrograms.endpoint_has_program(ipr, host_idx)

    # -- per network, on the uplinks ----------------------------------------------------------------
    def ensure_uplink_programs(self, spec: NetworkSpec, anchor: int) -> None:
        """The network's program on each uplink, replaced in place (a restart never opens a gap), and its
        IPv6 one where it has an IPv6 block. Without a default route there is no uplink yet: traffic from
        other hosts takes the routed path meanwhile."""
        with self.peer_map() as map_fd:
            # eni-prefix: the endpoint map tells the fib lookup's endpoint veths (the range is every host's)
            endpoints_fd = self.facts.fd(4) if spec.shared_range else None
            programs = [(spec.tc_name, ebpf.uplink_program(spec.host_cidr, spec.cluster_cidr, anchor, map_fd=map_fd,
                                                           local_fd=self.local_fd(4), shared=spec.shared_range,
                                                           endpoints_fd=endpoints_fd))
                        ] if spec.ipv4 else []             # an IPv6-only network has no IPv4 program
            if spec.host_cidr_v6 and spec.cluster_cidr_v6:
                programs.append((spec.tc_name6, programs6.uplink_program6(
                    spec.host_cidr_v6, spec.cluster_cidr_v6, anchor, map_fd=map_fd, local_fd=self.local_fd(6),
                    endpoints_fd=self.facts.fd(6) if spec.shared_range else None)))
            self._ensure_uplink_programs(spec, programs)
            if map_fd is not None and spec.ipv4:
                self.counted_uplinks.add(spec.tc_name)
            self.own_uplinks.add(spec.tag)

    def _ensure_uplink_programs(self, spec: NetworkSpec, programs: list[tuple[str, bytes]]) -> None:
        with self.nl.ipr() as ipr:
            uplinks = self.nl.all_uplinks(ipr)
            self.uplinks = tuple(uplinks)
            if not uplinks:
                log.warning("network %s: no default route, so no uplink for the eBPF fast path yet; traffic "
                            "from other hosts takes the routed path", spec.tag)
            for name, program in programs:
                prio, protocol = uplink_prio(name)
                for index in uplinks:
                    self.attach(ipr, index, program, "vpcnet_uplink6" if protocol == ETH_P_IPV6 else "vpcnet_uplink",
                                name, prio, uplink_handle(spec.tag), protocol=protocol)
            # The default route moved (a new uplink, a renamed or replaced device): the program leaves the
            # devices that no longer carry it.
            names = {name for name, _ in programs}
            for index, handle, name in list(self.uplink_programs(ipr)):
                if name in names and index not in uplinks:
                    log.warning("network %s: eBPF uplink program left on link %d, which no longer carries "
                                "the default route: removed", spec.tag, index)
                    self.drop_uplink_program(ipr, index, handle, name)

    def uplink_programs(self, ipr: IPRoute, clsact: set[int] | None = None) -> Iterator[tuple[int, int, str]]:
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
                if fname and any(fname.startswith(prefix) and f["info"] >> 16 == prio
                                 for prefix, (prio, _proto) in UPLINK_PRIOS.items()):
                    yield index, f["handle"], fname

    def network_uplinks(self, ipr: IPRoute, spec: NetworkSpec) -> set[int]:
        """The links carrying this network's uplink program (with an IPv6 block: its IPv6 one too)."""
        found: dict[str, set[int]] = {}
        for i, _h, name in self.uplink_programs(ipr):
            found.setdefault(name, set()).add(i)
        links = found.get(spec.tc_name, set())
        if spec.host_cidr_v6 and spec.cluster_cidr_v6:
            links = links & found.get(spec.tc_name6, set())
        return links

    def drop_uplink_program(self, ipr: IPRoute, index: int, handle: int, name: str) -> None:
        prio, protocol = uplink_prio(name)
        try:
            ipr.tc("del-filter", "bpf", index, handle, parent=TC_INGRESS, prio=prio, protocol=protocol)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise DataplaneError(f"cannot remove eBPF program from link {index}: {exc}") from None

    def drop_network_programs(self, spec: NetworkSpec) -> None:
        with self.nl.ipr() as ipr:
            for index, handle, name in list(self.uplink_programs(ipr)):
                if name in (spec.tc_name, spec.tc_name6):
                    self.drop_uplink_program(ipr, index, handle, name)

    def drop_stale_uplink_programs(self, known_tags: set[str]) -> list[str]:
        """Remove uplink programs of networks vpcnet no longer knows and whose anchor is gone (as for
        chains: an anchor that exists may be another vpcnet instance's network). Returns their names."""
        dropped = []
        with self.nl.ipr() as ipr:
            for index, handle, name in list(self.uplink_programs(ipr)):
                tag = name.partition("-")[2]
                if tag not in known_tags and self.nl.link_index(ipr, bridge_name(tag)) is None:
                    self.drop_uplink_program(ipr, index, handle, name)
                    dropped.append(name)
        return dropped


def uplink_prio(name: str) -> tuple[int, int]:
    """(prio, protocol) of an uplink program's filter, by its name (`vpcnet-<tag>` or `vpcnet6-<tag>`)."""
    return next(value for prefix, value in UPLINK_PRIOS.items() if name.startswith(prefix))
