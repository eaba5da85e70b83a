"""The eBPF fast path's tc side (ebpf mode): vpcnet.datapath.ebpf's programs attached, found and removed over netlink.

- Per endpoint: the container program on the ingress of its host veth (clsact, prio/handle
  `ENDPOINT_FILTER`); it goes with the veth.
- Per network: the uplink program on the ingress of every uplink: each device carrying the default route,
  and those named by VPCNET_UPLINKS (filter
  `vpcnet-<tag>`, prio `UPLINK_PRIO`, one handle per network: `uplink_handle`). It follows the default
  route: a device that no longer carries it loses the program.
- Peer counting (VPCNET_PEER_METRICS, `TcPrograms.peers`): the host's peer map (vpcnet.datapath.ebpf.maps),
  written by a counting program on the egress of every endpoint's host veth (prio/handle `COUNT_FILTER`:
  what the container receives), by the container program (ebpf mode: what it sends, counted first) or,
  in routed and bridge modes, by a counting program in the container program's place (ingress,
  `ENDPOINT_FILTER`), and by the uplink program (ebpf mode: what it hands into a container with
  bpf_redirect_peer, which passes no hook of the host veth). They go with the veth; the map goes with
  the last program holding it.
Programs are replaced in place (`replace-filter`), so re-applying never opens a gap.
"""
from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from typing import Iterator

from pyroute2 import IPRoute, NetlinkError

from vpcnet.datapath import ebpf
from vpcnet.datapath.ebpf import maps
from vpcnet.datapath.netlink import Netlink
from vpcnet.datapath.spec import NetworkSpec, bridge_name, uplink_handle
from vpcnet.errors import DataplaneError

log = logging.getLogger(__name__)

TC_INGRESS = 0xFFFFFFF2           # clsact's ingress hook
TC_EGRESS = 0xFFFFFFF3            # clsact's egress hook
ETH_P_IP = 0x0800
ENDPOINT_FILTER = (0x7F00, 1)     # (prio, handle) of the program on an endpoint's host veth
COUNT_FILTER = (0x7F02, 1)        # (prio, handle) of the receive counting program (egress of the host veth)
UPLINK_PRIO = 0x7F01              # the uplink's programs: one handle per network (uplink_handle)


class TcPrograms:
    def __init__(self, netlink: Netlink, peers: bool = False):
        self.nl = netlink
        self.peers = peers               # VPCNET_PEER_METRICS: count per peer
        self.peers_off = "" if peers else "VPCNET_PEER_METRICS=off"   # why peers are not counted ("": they are)
        # What this process attached counting programs to (host veth indexes, network filter names): where
        # the map is the process's own (maps.local), the others write an earlier process's map.
        self.counted: set[int] = set()
        self.counted_uplinks: set[str] = set()

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

    def attach(self, ipr: IPRoute, index: int, program: bytes, prog_name: str, filter_name: str, prio: int,
               handle: int, parent: int = TC_INGRESS) -> None:
        fd = ebpf.load(program, prog_name)
        try:
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise DataplaneError(f"cannot add the clsact qdisc to link {index}: {exc}") from None
            try:
                ipr.tc("replace-filter", "bpf", index, handle, fd=fd, name=filter_name, parent=parent,
                       classid=1, direct_action=True, prio=prio, protocol=ETH_P_IP)
            except NetlinkError as exc:
                raise DataplaneError(f"cannot attach eBPF program {filter_name} to link {index}: {exc}") from None
        finally:
            os.close(fd)               # the filter holds the program now

    # -- per endpoint -------------------------------------------------------------------------------
    def attach_endpoint(self, ipr: IPRoute, spec: NetworkSpec, host_idx: int, address: str) -> None:
        """The container program for the endpoint holding `address` (its only source on the fast path);
        the anchor's index keeps same-host traffic to unknown addresses on the routed path, and only the
        uplinks of this moment take other hosts' traffic (re-attached when the default route moves:
        vpcnet.datapath.dataplane's repair; until then such traffic takes the routed path). The replies of
        the endpoint's published ports (`spec.ports`) are left to the host (re-attached when they change)."""
        anchor = self.nl.link_index(ipr, spec.bridge)
        if anchor is None:
            raise DataplaneError(f"anchor {spec.bridge} is missing")
        with self.peer_map() as map_fd:
            program = ebpf.container_program(spec.host_cidr, spec.cluster_cidr, address, anchor,
                                             self.nl.all_uplinks(ipr), map_fd=map_fd,
                                             published=spec.published(address))
            self.attach(ipr, host_idx, program, "vpcnet_ctr", spec.tc_name, *ENDPOINT_FILTER)
            if map_fd is not None:
                self._attach_receive_count(ipr, spec, host_idx, map_fd, address)
                self.counted.add(host_idx)

    def attach_counting(self, ipr: IPRoute, spec: NetworkSpec, host_idx: int, address: str) -> None:
        """Routed and bridge modes: the counting programs of the endpoint holding `address` on its host veth
        (ingress: what the container sends from it; egress: what it receives at it); nothing with
        counting off."""
        with self.peer_map() as map_fd:
            if map_fd is None:
                return
            program = ebpf.count_program(maps.TRANSMIT, spec.cluster_cidr, map_fd, address)
            try:
                self.attach(ipr, host_idx, program, "vpcnet_count", spec.tc_name, *ENDPOINT_FILTER)
                self._attach_receive_count(ipr, spec, host_idx, map_fd, address)
                self.counted.add(host_idx)
            except DataplaneError as exc:     # never worth an endpoint: counted nowhere, said once
                if not self.peers_off:
                    log.warning("peer counting is off: %s", exc)
                self.peers_off = str(exc)

    def _attach_receive_count(self, ipr: IPRoute, spec: NetworkSpec, host_idx: int, map_fd: int,
                              address: str) -> None:
        program = ebpf.count_program(maps.RECEIVE, spec.cluster_cidr, map_fd, address)
        self.attach(ipr, host_idx, program, "vpcnet_count", spec.tc_name, *COUNT_FILTER, parent=TC_EGRESS)

    @staticmethod
    def endpoint_has_program(ipr: IPRoute, host_idx: int) -> bool:
        return any(f.get_attr("TCA_KIND") == "bpf" for f in ipr.get_filters(index=host_idx, parent=TC_INGRESS))

    @staticmethod
    def endpoint_counts(ipr: IPRoute, host_idx: int) -> bool:
        """The receive counting program is on the endpoint's host veth (its ingress half is checked by
        endpoint_has_program)."""
        return any(f.get_attr("TCA_KIND") == "bpf" for f in ipr.get_filters(index=host_idx, parent=TC_EGRESS)) \
            and TcPrograms.endpoint_has_program(ipr, host_idx)

    # -- per network, on the uplinks ----------------------------------------------------------------
    def ensure_uplink_programs(self, spec: NetworkSpec, anchor: int) -> None:
        """The network's program on each uplink, replaced in place (a restart never opens a gap). Without a
        default route there is no uplink yet: traffic from other hosts takes the routed path meanwhile."""
        with self.peer_map() as map_fd:
            program = ebpf.uplink_program(spec.host_cidr, spec.cluster_cidr, anchor, map_fd=map_fd)
            self._ensure_uplink_programs(spec, program)
            if map_fd is not None:
                self.counted_uplinks.add(spec.tc_name)

    def _ensure_uplink_programs(self, spec: NetworkSpec, program: bytes) -> None:
        with self.nl.ipr() as ipr:
            uplinks = self.nl.all_uplinks(ipr)
            if not uplinks:
                log.warning("network %s: no default route, so no uplink for the eBPF fast path yet; traffic "
                            "from other hosts takes the routed path", spec.tag)
            for index in uplinks:
                self.attach(ipr, index, program, "vpcnet_uplink", spec.tc_name, UPLINK_PRIO,
                            uplink_handle(spec.tag))
            # The default route moved (a new uplink, a renamed or replaced device): the program leaves the
            # devices that no longer carry it.
            for index, handle, name in list(self.uplink_programs(ipr)):
                if name == spec.tc_name and index not in uplinks:
                    log.warning("network %s: eBPF uplink program left on link %d, which no longer carries "
                                "the default route: removed", spec.tag, index)
                    self.drop_uplink_program(ipr, index, handle)

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
                if f["info"] >> 16 == UPLINK_PRIO and fname and fname.startswith("vpcnet-"):
                    yield index, f["handle"], fname

    def network_uplinks(self, ipr: IPRoute, spec: NetworkSpec) -> set[int]:
        """The links carrying this network's uplink program."""
        return {i for i, _h, name in self.uplink_programs(ipr) if name == spec.tc_name}

    def drop_uplink_program(self, ipr: IPRoute, index: int, handle: int) -> None:
        try:
            ipr.tc("del-filter", "bpf", index, handle, parent=TC_INGRESS, prio=UPLINK_PRIO, protocol=ETH_P_IP)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise DataplaneError(f"cannot remove eBPF program from link {index}: {exc}") from None

    def drop_network_programs(self, spec: NetworkSpec) -> None:
        with self.nl.ipr() as ipr:
            for index, handle, name in list(self.uplink_programs(ipr)):
                if name == spec.tc_name:
                    self.drop_uplink_program(ipr, index, handle)

    def drop_stale_uplink_programs(self, known_tags: set[str]) -> list[str]:
        """Remove uplink programs of networks vpcnet no longer knows and whose anchor is gone (as for
        chains: an anchor that exists may be another vpcnet instance's network). Returns their names."""
        dropped = []
        with self.nl.ipr() as ipr:
            for index, handle, name in list(self.uplink_programs(ipr)):
                tag = name[len("vpcnet-"):]
                if tag not in known_tags and self.nl.link_index(ipr, bridge_name(tag)) is None:
                    self.drop_uplink_program(ipr, index, handle)
                    dropped.append(name)
        return dropped
