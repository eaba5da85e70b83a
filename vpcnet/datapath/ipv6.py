"""The routed modes' IPv6 datapath: what an endpoint with an IPv6 address needs of the host, as values and
appliers beside the IPv4 ones (vpcnet.datapath.links, .firewall). The driver uses it for `--ipv6` networks in
routed and ebpf mode (docs/ipv6-plan.md says what is left).

Per endpoint (`ensure_endpoint`):
- The container has its address as a `/128` (vpcnet's IPAM answers so) and its default route via
  `GATEWAY` (fe80::1) on its interface: Join answers that as `GatewayIPv6`. With no on-link prefix, every
  packet of the container goes to the gateway, its neighbours' on this host too.
- The host veth holds `GATEWAY` itself (a link-local address: the same one on every host veth is fine,
  each is scoped to its link), without duplicate address detection, so the container's neighbour
  solicitation for it is answered by the host at once. No proxy NDP: Linux's proxy NDP wants one entry per
  proxied address, and with the gateway on the veth none is needed (the AWS VPC CNI does the same with
  fe80::1; Calico answers with the veth's own link-local address). Its IPv6 sysctls are written in the
  order `IPV6_ON` gives: router advertisements and autoconfiguration off before IPv6 comes on, so no
  advertisement from the container is ever taken (and with forwarding on the kernel ignores them anyway,
  unless accept_ra=2).
- The host routes `<address>/128 dev <host veth>`.

Host-wide (`ensure_host`): net.ipv6.conf.all.forwarding=1. With forwarding on, Linux ignores router
advertisements on every interface whose accept_ra is 1, and a cloud host may get its own IPv6 default route
that way (AWS, Alibaba): each uplink whose accept_ra is 1 gets 2 first (take them even when forwarding), so
turning forwarding on never costs the host its default route.

The ip6tables side (`guard_rules`, written by vpcnet.datapath.firewall.Ipv6Guard in raw PREROUTING, before
routing, conntrack and ndisc): a packet from a host veth passes only with a source the host routes back to
that veth, which is an IPv6 endpoint's own /128 and nothing else (anti-spoofing, as IPv4's reverse-path
check), or as neighbour discovery (solicitation, advertisement) from a link-local address; everything else
IPv6 from a vpcnet link is dropped as before: router advertisements and solicitations, redirects, any other
source. The rules are the same for any number of endpoints (none per endpoint: creating one costs the
firewall nothing), present while the host has an IPv6 endpoint. `forward_rules` accept the endpoints'
traffic in ip6tables' filter FORWARD (Docker 27+ sets its policy to DROP when it turns IPv6 forwarding
on), and towards the containers only what the uplinks or other vpcnet containers send, or replies (the
IPv4 isolation's ingress half; its egress half, towards the uplinks and vpcnet's links only, is not
repeated for IPv6 yet).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Sequence

from pyroute2 import IPRoute, NetlinkError

from vpcnet.datapath.netlink import Netlink
from vpcnet.errors import DataplaneError

log = logging.getLogger(__name__)

GATEWAY = "fe80::1"
FORWARDING = "/proc/sys/net/ipv6/conf/all/forwarding"
AF_INET6 = 10
SCOPE_LINK = 253
IFA_F_NODAD = 0x02
# A host veth carrying IPv6, in the order written: advertisements and autoconfiguration off, no duplicate
# address detection (the gateway address is the host's own on every veth), IPv6 on last.
IPV6_ON = (("ipv6/accept_ra", "0"), ("ipv6/autoconf", "0"), ("ipv6/accept_dad", "0"),
           ("ipv6/disable_ipv6", "0"))
HOST_VETHS = "vh+"             # every endpoint's host end (vpcnet.datapath.spec.veth_names)
ND_TYPES = ("135", "136")      # neighbour solicitation, advertisement (numbers: as ip6tables-save prints them)


@dataclass(frozen=True)
class Ipv6Endpoint:
    host_veth: str
    address: str                # bare IPv6 address

    def __post_init__(self) -> None:
        if ipaddress.ip_address(self.address).version != 6:
            raise ValueError(f"{self.address} is not an IPv6 address")


def unavailable(path: str = FORWARDING) -> str:
    """Why this process cannot give endpoints IPv6 ("" when it can). The kernel takes a link's IPv6 settings
    (accept_ra, autoconf, forwarding) only under /proc/sys (netlink refuses IPv6 devconf), which Docker mounts
    read-only in a managed plugin's container: there IPv6 is refused when a network asks for it, before any
    block is claimed, rather than failing each container."""
    if not os.path.exists(path):
        return "this kernel has no IPv6 (no /proc/sys/net/ipv6)"
    if not os.access(path, os.W_OK):
        return ("/proc/sys is read-only here (a managed plugin: Docker mounts it read-only in the plugin's container) "
                "and the kernel takes a link's IPv6 settings only there; run vpcnet as a service (`vpcnet serve`, "
                "docs/systemd.md) for IPv6. Swarm, which needs the managed plugin, gets IPv4 only")
    return ""


def guard_rules(any_ipv6: bool) -> list[str]:
    """The raw-table rules letting IPv6 endpoints' own traffic through, to go before the guard's drops: a
    packet whose source the host routes back to the veth it came in by (strict reverse path: only an IPv6
    endpoint's own /128 is routed to its veth, so a container cannot send as another, nor as anyone
    outside), and neighbour solicitations and advertisements from link-local addresses. Everything else
    from a host veth is dropped by the guard, router advertisements (always link-local) included. The
    same few rules for any number of endpoints: an endpoint costs the firewall nothing, its /128 route is
    its permission. None while the host has no IPv6 endpoint (the guard then drops all IPv6, as before).
    Written as ip6tables-save prints them, so a pass that finds them in place writes nothing."""
    if not any_ipv6:
        return []
    rules = [f"-s fe80::/10 -i {HOST_VETHS} -p ipv6-icmp -m icmp6 --icmpv6-type {kind} "
             f'-m comment --comment "vpcnet: neighbour discovery" -j RETURN' for kind in ND_TYPES]
    rules.append(f'! -s fe80::/10 -i {HOST_VETHS} -m rpfilter -m comment --comment "vpcnet: own IPv6" -j RETURN')
    return rules


def forward_rules(any_ipv6: bool, uplinks: Sequence[str] = ()) -> list[str]:
    """ip6tables filter rules for the endpoints' forwarded traffic, as the IPv4 isolation chains do: what a
    container sends (its source already checked by the raw guard) is accepted; towards the containers, only
    what comes by the uplinks or from another vpcnet container, or a reply; the rest to a host veth is
    dropped (a Docker bridge network's container, a VPN, a second NIC never reach a vpcnet container).
    None while the host has no IPv6 endpoint."""
    if not any_ipv6:
        return []
    rules = [f"-i {HOST_VETHS} -j ACCEPT"]
    rules += [f"-i {uplink} -o {HOST_VETHS} -j ACCEPT" for uplink in sorted({u for u in uplinks if u})]
    rules += [f"-o {HOST_VETHS} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", f"-o {HOST_VETHS} -j DROP"]
    return rules


class RoutedIpv6:
    """The appliers: host forwarding, an endpoint's veth settings, gateway address and /128 route."""

    def __init__(self, netlink: Netlink):
        self.nl = netlink

    def ensure_host(self, uplinks: Sequence[str]) -> list[str]:
        """IPv6 forwarding on, after each uplink taking router advertisements (accept_ra=1) is told to keep
        taking them with forwarding on (2). Returns what was changed."""
        changed = []
        try:
            for name in uplinks:
                if self.nl.read_sysctl(f"net.ipv6.conf.{name}.accept_ra") == "1":
                    self.nl.sysctl(f"net.ipv6.conf.{name}.accept_ra", "2")
                    changed.append(f"{name} accept_ra=1 (now 2: kept with forwarding on)")
            if self.nl.read_sysctl("net.ipv6.conf.all.forwarding") != "1":
                self.nl.sysctl("net.ipv6.conf.all.forwarding", "1")
                changed.append("net.ipv6.conf.all.forwarding=0 (now 1)")
        except (DataplaneError, OSError) as exc:
            raise DataplaneError(f"cannot turn IPv6 forwarding on: {exc}") from None
        for what in changed:
            log.warning("IPv6 datapath: %s", what)
        return changed

    def ensure_endpoint(self, ipr: IPRoute, host_veth: str, address: str) -> int:
        """IPv6 on for the host veth (IPV6_ON), the gateway on it, `<address>/128` routed to it. Idempotent.
        Returns the veth's index."""
        idx = self.nl.link_index(ipr, host_veth)
        if idx is None:
            raise DataplaneError(f"veth {host_veth} is missing")
        try:
            self.nl.link_sysctls([host_veth], IPV6_ON)
        except OSError as exc:
            raise DataplaneError(f"cannot turn IPv6 on for {host_veth} (/proc/sys: {exc})") from None
        try:
            ipr.addr("add", index=idx, family=AF_INET6, address=GATEWAY, prefixlen=64, flags=IFA_F_NODAD)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DataplaneError(f"cannot put the IPv6 gateway {GATEWAY} on {host_veth}: {exc}") from None
        try:
            ipr.route("replace", family=AF_INET6, dst=str(ipaddress.IPv6Address(address)), dst_len=128, oif=idx,
                      scope=SCOPE_LINK)
        except NetlinkError as exc:
            raise DataplaneError(f"cannot route {address} to {host_veth}: {exc}") from None
        return idx

    def unroute(self, ipr: IPRoute, host_veth: str, address: str) -> None:
        """Remove `<address>/128 dev <host veth>`; one already gone (or the veth) is not an error."""
        idx = self.nl.link_index(ipr, host_veth)
        if idx is None:
            return
        try:
            ipr.route("del", family=AF_INET6, dst=str(ipaddress.IPv6Address(address)), dst_len=128, oif=idx)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise DataplaneError(f"cannot remove the route of {address} from {host_veth}: {exc}") from None

    @staticmethod
    def routed_via(ipr: IPRoute, address: str) -> int | None:
        """The link the host routes an IPv6 `address` over, or None."""
        try:
            got = ipr.route("get", family=AF_INET6, dst=address)
            return got[0].get_attr("RTA_OIF") if got else None
        except NetlinkError:
            return None
