"""Links, addresses and routes over netlink: a network's bridge or anchor holding its gateway, an endpoint's
veth pair, routed mode's proxy ARP and `/32` route.

- Bridge mode: a Linux bridge `vpc-<id11>` holds the gateway address; each endpoint's host veth is on it.
- Routed and ebpf modes: an anchor (one end of a veth pair `vpc-<id11>`/`vpp-<id11>`: this kernel may lack
  the dummy driver) holds the gateway, so the host answers for it and its connected route keeps unknown
  addresses of the host CIDR off the default route. Each endpoint's host veth is on no bridge, has
  `proxy_arp=1`, `proxy_delay=0` (over netlink, vpcnet.datapath.rtnl: /proc/sys is read-only in a managed plugin),
  and the host routes `<container ip>/32 dev <host veth>`.
- Every host-side link vpcnet makes (bridge, anchor and its peer, host veth) has IPv6 off
  (`disable_ipv6=1`, and `accept_ra=0`, `autoconf=0` so that turning IPv6 on later starts safe), but a
  dual-stack bridge network's bridge and a routed endpoint's host veth with IPv6 (vpcnet.datapath.ipv6,
  with its own guards): a link with IPv6 on takes router advertisements from any container behind
  it (routes and SLAAC addresses on the host: the CVE-2020-13401 class), unfiltered by vpcnet's IPv4-only
  firewall and eBPF checks. The kernel takes these only under /proc/sys (netlink refuses IPv6 devconf): a
  managed plugin writes them through its mount of the host's /proc/sys/net (vpcnet.datapath.netlink);
  where neither is writable (a plugin built without that mount) they cannot be set: said once at WARNING.
Every call is idempotent: create what is missing, accept what exists.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
from typing import Sequence

from pyroute2 import IPRoute, NetlinkError

from vpcnet.datapath import rtnl
from vpcnet.datapath.netlink import Netlink
from vpcnet.datapath.spec import NetworkSpec, anchor_peer
from vpcnet.errors import DataplaneError

log = logging.getLogger(__name__)
SCOPE_LINK = 253
# What a host-side link wants of IPv6, in the order written (RAs ignored before IPv6 goes off); the values
# as rtnl.dump_links reports them: (disable_ipv6, accept_ra, autoconf).
IPV6_OFF = (("ipv6/accept_ra", "0"), ("ipv6/autoconf", "0"), ("ipv6/disable_ipv6", "1"))
IPV6_OFF_VIEW = (1, 0, 0)
# A routed endpoint's host veth whose IPv6 comes next (vpcnet.datapath.ipv6.IPV6_ON): what IPv6 may not take
# meanwhile, without turning IPv6 off and on again
IPV6_QUIET = IPV6_OFF[:2]


class Links:
    def __init__(self, netlink: Netlink):
        self.nl = netlink
        self.ipv6_settable = True       # False once /proc/sys refused a write (read-only): not retried

    def ipv6_off(self, names: Sequence[str], fresh: bool = False,
                 wanted: Sequence[tuple[str, str]] = IPV6_OFF) -> list[str]:
        """IPv6 off on these host-side links (IPV6_OFF, or `wanted`: IPV6_QUIET); returns what was on
        ("<name> disable_ipv6=0"). `fresh`: links just made, written without a look first (per endpoint, each
        read counts)."""
        if not self.ipv6_settable:
            return []
        try:
            return self.nl.link_sysctls(names, wanted, fresh)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise DataplaneError(f"cannot turn IPv6 off on {', '.join(names)}: {exc}") from None
            self.ipv6_settable = False
            log.warning("cannot turn IPv6 off on vpcnet's links (/proc/sys: %s): a container's IPv6 router "
                        "advertisements can give this host routes and addresses; see docs/datapath.md", exc)
            return []

    def ensure_gateway_link(self, spec: NetworkSpec) -> int:
        """The bridge or anchor, its address, MTU and state. Returns its index."""
        with self.nl.ipr() as ipr:
            idx = self.nl.link_index(ipr, spec.bridge)
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
                idx = self.nl.link_index(ipr, spec.bridge)
            if idx is None:
                raise DataplaneError(f"{spec.bridge} vanished while it was being configured")
            if not spec.bridged_ipv6:   # an IPv6 bridge: vpcnet.datapath.ipv6.RoutedIpv6.ensure_bridge
                self.ipv6_off([spec.bridge, anchor_peer(spec.bridge)] if spec.routed else [spec.bridge])
            if spec.routed:
                peer = self.nl.link_index(ipr, anchor_peer(spec.bridge))
                if peer is not None:
                    ipr.link("set", index=peer, state="up")
            try:
                ipr.link("set", index=idx, mtu=spec.mtu)
                if spec.ipv4:           # an IPv6-only network's anchor holds no address (the IPv6 gateway is per veth)
                    ipr.addr("add", index=idx, address=spec.gateway, prefixlen=spec.prefixlen)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise DataplaneError(f"cannot configure bridge {spec.bridge}: {exc}") from None
            ipr.link("set", index=idx, state="up")
        return idx

    def ensure_veth(self, ipr: IPRoute, spec: NetworkSpec, host_veth: str, peer_veth: str,
                    mac: str, ipv6: bool = False) -> int | None:
        """The endpoint's veth pair, up, with the network's MTU (bridge mode: host end on the bridge), its host
        end's IPv6 off (IPV6_OFF); with `ipv6` (a routed endpoint whose IPv6 comes next: vpcnet.datapath.ipv6
        turns it on) only router advertisements and autoconfiguration off (IPV6_QUIET): turning
        disable_ipv6 to 1 and back to 0 makes the kernel take the link's IPv6 down and up, waiting for
        others (~15 ms per endpoint at p99 on a loaded host, against 0.5 ms). Returns the host end's index;
        None for a pair just made in bridge mode, which needs nothing more (one lookup fewer per endpoint).
        Over the raw rtnetlink socket (vpcnet.datapath.rtnl); pyroute2's, and its error, where that fails."""
        br = self.nl.index_of(ipr, spec.bridge)
        if br is None:
            raise DataplaneError(f"{'anchor' if spec.routed else 'bridge'} {spec.bridge} is missing")
        master = None if spec.routed else br
        try:
            fresh, host_idx = self._veth_raw(spec, host_veth, peer_veth, mac, master)
        except OSError:
            self.nl.drop_rtnl()
            fresh, host_idx = self._veth_pyroute2(ipr, spec, host_veth, peer_veth, mac, master)
        # Up, but without carrier until Docker moves the peer into the sandbox and brings it up: nothing
        # IPv6 has happened on the host end yet (no link-local, no router advertisement can reach it).
        self.ipv6_off([host_veth], fresh, IPV6_QUIET if ipv6 else IPV6_OFF)
        if not spec.routed:
            return host_idx
        if host_idx is None:
            host_idx = self.nl.index_of(ipr, host_veth)
        if host_idx is None:
            raise DataplaneError(f"veth {host_veth} vanished while it was being configured")
        return host_idx

    def _veth_raw(self, spec: NetworkSpec, host_veth: str, peer_veth: str, mac: str,
                  master: int | None) -> tuple[bool, int | None]:
        """(made now, the host end's index where it existed). One request: the pair is born (on the bridge)
        and up; a pair that exists is made right (MTU, up, bridge)."""
        sock = self.nl.rtnl()
        try:
            rtnl.create_veth(sock, host_veth, peer_veth, spec.mtu, mac, master)
            return True, None
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        host_idx = rtnl.link_index(sock, host_veth)
        if host_idx is None:
            raise DataplaneError(f"cannot create veth {host_veth}: the name of its peer {peer_veth} is taken")
        rtnl.set_link(sock, host_idx, mtu=spec.mtu, up=True, master=master)
        return False, host_idx

    def _veth_pyroute2(self, ipr: IPRoute, spec: NetworkSpec, host_veth: str, peer_veth: str, mac: str,
                       master: int | None) -> tuple[bool, int | None]:
        """_veth_raw through pyroute2 (where the raw socket failed)."""
        bridge = {} if master is None else {"master": master}
        try:
            ipr.link("add", ifname=host_veth, kind="veth", mtu=spec.mtu, state="up", **bridge,
                     peer={"ifname": peer_veth, "address": mac, "mtu": spec.mtu})
            return True, None
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DataplaneError(f"cannot create veth {host_veth}: {exc}") from None
        host_idx = self.nl.link_index(ipr, host_veth)      # it exists: make sure it is right
        if host_idx is None:
            raise DataplaneError(f"cannot create veth {host_veth}: the name of its peer {peer_veth} is taken")
        try:
            ipr.link("set", index=host_idx, mtu=spec.mtu, state="up", **bridge)
        except NetlinkError as exc:
            raise DataplaneError(f"cannot configure veth {host_veth}: {exc}") from None
        return False, host_idx

    def proxy_arp(self, host_idx: int, host_veth: str) -> None:
        """Proxy ARP answers the container for every address the host routes elsewhere (its neighbours on
        other veths, the cluster); the gateway is a local address, answered anyway. No delay."""
        try:
            sock = self.nl.rtnl()
            rtnl.set_proxy_arp(sock, host_idx)
            rtnl.set_arp_proxy_delay(sock, host_idx, 0)
        except OSError as exc:
            self.nl.drop_rtnl()
            raise DataplaneError(f"cannot turn on proxy ARP for {host_veth}: {exc}") from None

    def route_endpoint(self, ipr: IPRoute, address: str, host_idx: int, host_veth: str) -> None:
        """`<address>/32 dev <host veth>` (proto static, scope link), made or replaced; over the raw rtnetlink
        socket, pyroute2's (and its error) where that fails."""
        try:
            rtnl.replace_route(self.nl.rtnl(), address, 32, host_idx)
            return
        except OSError:
            self.nl.drop_rtnl()
        try:
            ipr.route("replace", dst=address, dst_len=32, oif=host_idx, scope=SCOPE_LINK)
        except NetlinkError as exc:
            raise DataplaneError(f"cannot route {address} to {host_veth}: {exc}") from None

    @staticmethod
    def routed_via(ipr: IPRoute, address: str) -> int | None:
        """The link the host routes `address` over, or None."""
        try:
            got = ipr.route("get", dst=address)
            return got[0].get_attr("RTA_OIF") if got else None
        except NetlinkError:
            return None

    def overlapping_routes(self, cidr: str) -> list[str]:
        """Kernel routes (main table, not the default route) overlapping `cidr` (either family), described for
        humans."""
        net = ipaddress.ip_network(cidr)
        found = []
        with self.nl.ipr() as ipr:
            names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
            for route in ipr.route("dump", table=254, family=2 if net.version == 4 else 10):
                dst, dst_len = route.get("RTA_DST"), route.get("dst_len")
                if not dst or not dst_len:
                    continue
                other = ipaddress.ip_network(f"{dst}/{dst_len}", strict=False)
                if other.overlaps(net):
                    found.append(f"{other} dev {names.get(route.get('RTA_OIF'), '?')}")
        return found
