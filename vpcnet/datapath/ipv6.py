"""The IPv6 datapath: what an endpoint with an IPv6 address needs of the host, as values and appliers beside
the IPv4 ones (vpcnet.datapath.links, .firewall). The driver uses it for `--ipv6` networks in every mode:
routed and ebpf mode first below, bridge mode at the end (docs/ipv6-plan.md says what is left).

Per endpoint (`ensure_endpoint`):
- The container has its address as a `/128` (vpcnet's IPAM answers so) and its default route via its
  gateway on its interface: a link-local address of the host veth's own (`link_gateway`), which Join answers
  as `GatewayIPv6` and as a `/128` on the interface. With no on-link prefix, every packet of the container
  goes to the gateway, its neighbours' on this host too. One address per link, not fe80::1 everywhere:
  Docker asks the kernel which link reaches a route's next hop, and only an address of the link's own
  gives a container on two vpcnet networks each network's routes on that network's interface.
- The host veth holds the gateway itself, without duplicate address detection, so the container's
  neighbour solicitation for it is answered by the host at once. No proxy NDP: Linux's proxy NDP wants one
  entry per proxied address, and with the gateway on the veth none is needed (Calico answers with the veth's
  own link-local address; the AWS VPC CNI with fe80::1). Its IPv6 sysctls are written in the
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
on): what the containers send only towards the uplinks and vpcnet's links (the rest is left to FORWARD's
later rules, Docker's), and towards the containers only what the uplinks or other vpcnet containers send,
replies, or a published port's connection (vpcnet.datapath.ports6): both halves of the IPv4 isolation. An
`--internal` network's IPv6 stays inside its IPv6 cluster CIDR (two drops
per such network and kind of link, ahead of the rest), as its IPv4 stays inside the IPv4 one.

IPv6-only networks (`--ipv4=false`) take the same path: their endpoints have no IPv4 address, so nothing of
IPv4 is made for them (no /32 route, no proxy ARP, no IPv4 rules, programs or anchor address), and their
IPv6 is exactly a dual-stack endpoint's.

Bridge mode (`ensure_bridge`, `bridge_rules`): the network's bridge carries its IPv6. The bridge holds
its gateway (`link_gateway` of the bridge: without DAD, and the bridge has accept_dad=0: no container can
take it away) and the host's block
is routed to it; Join also answers the block as a connected route, so the network's containers resolve each
other on the bridge and talk directly. The ports (host veths) keep IPv6 off. The bridge's own
nf_call_ip6tables passes its IPv6 through ip6tables (br_netfilter), where the guard drops router
advertisements and redirects from any port and lets each endpoint send only from its own address by its own
port: the bridge's routes lead to the bridge, not to a port, so the reverse-path check cannot tell its
containers apart; each port's own tc filter does (vpcnet.datapath.guard), and the guard's bridge rules are
the same for any number of endpoints. `forward_rules` treat the bridges (`vpc-+`) as the host veths.
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Sequence

from pyroute2 import IPRoute, NetlinkError

from vpcnet.datapath import rtnl
from vpcnet.datapath.netlink import HOST_SYS_NET, Netlink, sysctl_path
from vpcnet.errors import DataplaneError

log = logging.getLogger(__name__)

def link_gateway(link: str) -> str:
    """The container's IPv6 gateway behind the host link `link` (its host veth; in bridge mode the bridge): a
    link-local address of its own per link, `fe80::1:` and 48 bits of SHA-256 of the link's name. Docker puts
    a next hop into the container's routes without naming the interface (moby's programRoute asks the kernel
    which link reaches the next hop): with the same fe80::1 behind every vpcnet link, a container on two
    dual-stack vpcnet networks had both networks' routes on its first interface, and answered the second
    network's traffic from the wrong link. Join also answers this address as a /128 on the interface, so the
    kernel's answer is the right link. `fe80::1:` never begins a Docker MAC's EUI-64 (`fe80::42:`)."""
    digest = hashlib.sha256(link.encode()).hexdigest()
    return str(ipaddress.IPv6Address(f"fe80::1:{digest[:4]}:{digest[4:8]}:{digest[8:12]}"))
FORWARDING = "/proc/sys/net/ipv6/conf/all/forwarding"
AF_INET6 = 10
SCOPE_LINK = 253
IFA_F_NODAD = 0x02
# A host veth carrying IPv6, in the order written: advertisements and autoconfiguration off, no duplicate
# address detection (the gateway address is the host's own on every veth), IPv6 on last.
IPV6_ON = (("ipv6/accept_ra", "0"), ("ipv6/autoconf", "0"), ("ipv6/accept_dad", "0"),
           ("ipv6/disable_ipv6", "0"))
HOST_VETHS = "vh+"             # every endpoint's host end (vpcnet.datapath.spec.veth_names)
VPCNET_LINKS = (HOST_VETHS, "vpc-+", "vpp-+")     # vpcnet's host-side links (as vpcnet.datapath.firewall's)
ND_TYPES = ("135", "136")      # neighbour solicitation, advertisement (numbers: as ip6tables-save prints them)
BRIDGES = "vpc-+"              # bridge mode's bridges (vpcnet.datapath.spec.bridge_name)
NO_BRIDGED = (("134", "router advertisement"), ("137", "redirect"))


@dataclass(frozen=True)
class Ipv6Endpoint:
    host_veth: str
    address: str                # bare IPv6 address
    bridge: str = ""            # bridge mode: the network's bridge (the host veth is a port of it); else ""

    def __post_init__(self) -> None:
        if ipaddress.ip_address(self.address).version != 6:
            raise ValueError(f"{self.address} is not an IPv6 address")


def unavailable(path: str = FORWARDING) -> str:
    """Why this process cannot give endpoints IPv6 ("" when it can). The kernel takes a link's IPv6 settings
    (accept_ra, autoconf, forwarding) only under /proc/sys (netlink refuses IPv6 devconf), which Docker mounts
    read-only in a managed plugin's container; plugin/config.json binds the host's /proc/sys/net read-write
    at vpcnet.datapath.netlink.HOST_SYS_NET for that, and vpcnet.datapath.netlink writes there. Without
    either (a plugin built before the mount) IPv6 is refused when a network asks for it, before any block is
    claimed, rather than failing each container."""
    if not os.path.exists(path):
        return "this kernel has no IPv6 (no /proc/sys/net/ipv6)"
    if os.access(path, os.W_OK):
        return ""
    if path == FORWARDING and os.access(sysctl_path("net.ipv6.conf.all.forwarding"), os.W_OK):
        return ""                   # the managed plugin's mount of the host's /proc/sys/net
    return ("/proc/sys is read-only here (a managed plugin: Docker mounts it read-only in the plugin's container) "
            f"and the kernel takes a link's IPv6 settings only there; this plugin has no {HOST_SYS_NET} mount "
            "(of the host's /proc/sys/net, which plugin/build.sh's builds have): rebuild and reinstall it, or run "
            "vpcnet as a service (`vpcnet serve`, docs/systemd.md)")


def guard_rules(any_ipv6: bool, bridged: bool = False) -> list[str]:
    """The raw-table rules letting IPv6 endpoints' own traffic through, to go before the guard's drops: a
    packet whose source the host routes back to the veth it came in by (strict reverse path: only an IPv6
    endpoint's own /128 is routed to its veth, so a container cannot send as another, nor as anyone
    outside), and neighbour solicitations and advertisements from link-local addresses. Everything else
    from a host veth is dropped by the guard, router advertisements (always link-local) included. The
    same few rules for any number of endpoints: an endpoint costs the firewall nothing, its /128 route is
    its permission. None while the host has no IPv6 endpoint (the guard then drops all IPv6, as before).

    `bridged`: the host has bridge-mode IPv6 endpoints (`bridge_rules`). Written as ip6tables-save prints
    them, so a pass that finds them in place writes nothing."""
    rules = []
    if any_ipv6:
        rules += [f"-s fe80::/10 -i {HOST_VETHS} -p ipv6-icmp -m icmp6 --icmpv6-type {kind} "
                  f'-m comment --comment "vpcnet: neighbour discovery" -j RETURN' for kind in ND_TYPES]
        rules.append(f'! -s fe80::/10 -i {HOST_VETHS} -m rpfilter -m comment --comment "vpcnet: own IPv6" -j RETURN')
    return rules + bridge_rules(bridged)


def bridge_rules(bridged: bool) -> list[str]:
    """Bridge mode's half of the guard. A bridge's IPv6 reaches ip6tables through br_netfilter (the bridge's
    own nf_call_ip6tables, set by `ensure_bridge`), bridged between two ports as well as routed, with `-i`
    the bridge. The bridge's routes all lead to the bridge, not to a port, so no rule here can tell one
    container from another: each port's own anti-spoofing filter does (vpcnet.datapath.guard: the
    endpoint's MAC, its IPv6 address or its link-local one as the source, neighbour advertisements for those
    only, no IPv6 at all without an IPv6 address), before the bridge sees the frame. Here, router
    advertisements and redirects from any port are dropped (they never reach another container nor the
    host; the port's filter drops them too), and the rest the ports let through is let on. The same rules
    for any number of endpoints (none per endpoint: creating one costs the firewall nothing); none without
    bridge-mode IPv6 endpoints (`bridged`)."""
    if not bridged:
        return []
    rules = [f"-i {BRIDGES} -p ipv6-icmp -m icmp6 --icmpv6-type {kind} "
             f'-m comment --comment "vpcnet: {what} from a container" -j DROP' for kind, what in NO_BRIDGED]
    rules.append(f'-i {BRIDGES} -m comment --comment "vpcnet: own IPv6, checked per port by its tc filter" -j RETURN')
    return rules


def forward_rules(any_ipv6: bool, uplinks: Sequence[str] = (), internal: Sequence[tuple[str, str]] = (),
                  bridged: bool = False) -> list[str]:
    """ip6tables filter rules for the endpoints' forwarded traffic, as the IPv4 isolation chains do
    (vpcnet.datapath.firewall.isolation_chains), for the host veths (`any_ipv6`: routed-mode IPv6 endpoints
    exist) and vpcnet's bridges (`bridged`: bridge-mode ones exist), whose traffic between two ports passes
    here too (br_netfilter):
    - `--internal` networks first, each given as (its host IPv6 block, its IPv6 cluster CIDR): what its
      containers send outside the cluster CIDR, and what comes to them from outside it, is dropped;
    - egress: what a container sends (its source already checked by the raw guard) is accepted towards vpcnet's
      links and the uplinks only; anything else (a Docker bridge, a second NIC, a VPN) is left to FORWARD's
      later rules (Docker's), as IPv4's VPCNET-EGRESS does;
    - ingress: towards the containers, only what comes by the uplinks or from another vpcnet container, or a
      reply, or a published port's connection (DNATed by vpcnet.datapath.ports6, whatever link it came by);
      the rest to a host veth or bridge is dropped (a Docker bridge network's container, a VPN, a
      second NIC never reach a vpcnet container).
    None while the host has no IPv6 endpoint (the guard then drops all IPv6 of vpcnet's links)."""
    if not any_ipv6 and not bridged:
        return []
    links = ([HOST_VETHS] if any_ipv6 else []) + ([BRIDGES] if bridged else [])
    rules = []
    for block, cluster in sorted(set(internal)):
        block, cluster = str(ipaddress.IPv6Network(block)), str(ipaddress.IPv6Network(cluster))
        for link in links:
            rules += [f'-s {block} ! -d {cluster} -i {link} -m comment --comment "vpcnet: --internal" -j DROP',
                      f'! -s {cluster} -d {block} -o {link} -m comment --comment "vpcnet: --internal" -j DROP']
    uplinks = sorted({u for u in uplinks if u})
    rules += [f"-i {link} -o {dst} -j ACCEPT" for link in links for dst in (*VPCNET_LINKS, *uplinks)]
    rules += [f"-i {uplink} -o {link} -j ACCEPT" for link in links for uplink in uplinks]
    rules += [f"-o {link} -m conntrack --ctstate {state} -j ACCEPT" for link in links
              for state in ("RELATED,ESTABLISHED", "DNAT")]      # DNAT: a published port (ports6)
    rules += [f"-o {link} -j DROP" for link in links]
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
        """IPv6 on for the host veth (IPV6_ON), its gateway (`link_gateway`) on it, `<address>/128` routed to
        it. Idempotent. Returns the veth's index."""
        idx = self.nl.index_of(ipr, host_veth)
        if idx is None:
            raise DataplaneError(f"veth {host_veth} is missing")
        try:
            self.nl.link_sysctls([host_veth], IPV6_ON)
        except OSError as exc:
            raise DataplaneError(f"cannot turn IPv6 on for {host_veth} (/proc/sys: {exc})") from None
        dst = str(ipaddress.IPv6Address(address))
        gateway = link_gateway(host_veth)
        try:                # the raw rtnetlink socket (vpcnet.datapath.rtnl); pyroute2's, and its error, where it fails
            sock = self.nl.rtnl()
            rtnl.add_address(sock, idx, gateway, 64, IFA_F_NODAD)
            rtnl.replace_route(sock, dst, 128, idx)
            return idx
        except OSError:
            self.nl.drop_rtnl()
        try:
            ipr.addr("add", index=idx, family=AF_INET6, address=gateway, prefixlen=64, flags=IFA_F_NODAD)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DataplaneError(f"cannot put the IPv6 gateway {gateway} on {host_veth}: {exc}") from None
        try:
            ipr.route("replace", family=AF_INET6, dst=dst, dst_len=128, oif=idx, scope=SCOPE_LINK)
        except NetlinkError as exc:
            raise DataplaneError(f"cannot route {address} to {host_veth}: {exc}") from None
        return idx

    def unroute(self, ipr: IPRoute, host_veth: str, address: str) -> None:
        """Remove `<address>/128 dev <host veth>`; one already gone (or the veth) is not an error."""
        idx = self.nl.index_of(ipr, host_veth)
        if idx is None:
            return
        try:
            rtnl.delete_route(self.nl.rtnl(), str(ipaddress.IPv6Address(address)), 128, idx)
            return
        except OSError:
            self.nl.drop_rtnl()
        try:
            ipr.route("del", family=AF_INET6, dst=str(ipaddress.IPv6Address(address)), dst_len=128, oif=idx)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise DataplaneError(f"cannot remove the route of {address} from {host_veth}: {exc}") from None

    def ensure_bridge(self, ipr: IPRoute, bridge: str, block: str) -> int:
        """Bridge mode: the bridge carries the network's IPv6. IPv6 on for it (IPV6_ON: no advertisement
        taken, no duplicate address detection), its gateway (`link_gateway`) on it (no DAD: nothing a container
        answers can take it away), the host's IPv6 `block` routed to it, and its own nf_call_ip6tables on, so its IPv6
        passes ip6tables (the guard's bridge rules, `bridge_rules`) whatever the host-wide
        bridge-nf-call-ip6tables says. Needs br_netfilter. Idempotent; returns the bridge's index."""
        idx = self.nl.link_index(ipr, bridge)
        if idx is None:
            raise DataplaneError(f"bridge {bridge} is missing")
        try:
            self.nl.read_sysctl("net.bridge.bridge-nf-call-ip6tables")
        except DataplaneError:
            raise DataplaneError("IPv6 in bridge mode needs the br_netfilter module (its ip6tables rules tell one "
                                 "container from another by bridge port): modprobe br_netfilter, or use -o "
                                 "vpcnet.mode=routed") from None
        try:
            self.nl.link_sysctls([bridge], IPV6_ON)
        except OSError as exc:
            raise DataplaneError(f"cannot turn IPv6 on for {bridge} (/proc/sys: {exc})") from None
        try:
            ipr.link("set", index=idx, kind="bridge", br_nf_call_ip6tables=1)
        except NetlinkError as exc:
            raise DataplaneError(f"cannot pass {bridge}'s IPv6 through ip6tables (nf_call_ip6tables): {exc}") from None
        try:
            ipr.addr("add", index=idx, family=AF_INET6, address=link_gateway(bridge), prefixlen=64,
                     flags=IFA_F_NODAD)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DataplaneError(f"cannot put the IPv6 gateway {link_gateway(bridge)} on {bridge}: {exc}") \
                    from None
        net = ipaddress.IPv6Network(block)
        try:
            ipr.route("replace", family=AF_INET6, dst=str(net.network_address), dst_len=net.prefixlen, oif=idx)
        except NetlinkError as exc:
            raise DataplaneError(f"cannot route {block} to {bridge}: {exc}") from None
        return idx

    def bridge_wrong(self, ipr: IPRoute, bridge: str, block: str) -> str:
        """What `ensure_bridge` would put right on this bridge (for the repair pass), or ""."""
        idx = self.nl.link_index(ipr, bridge)
        if idx is None:
            return f"bridge {bridge} missing"
        net = ipaddress.IPv6Network(block)
        if self.routed_via(ipr, str(net.network_address + 2)) != idx:
            return f"route {block} dev {bridge} missing"
        if not any(a.get_attr("IFA_ADDRESS") == link_gateway(bridge) for a in ipr.get_addr(index=idx, family=AF_INET6)):
            return f"IPv6 gateway {link_gateway(bridge)} missing on {bridge}"
        wrong = [f"{key.split('/')[1]}={have}" for key, want in IPV6_ON
                 if (have := self.nl.read_sysctl(f"net.ipv6.conf.{bridge}.{key.split('/')[1]}")) != want]
        if wrong:
            return f"IPv6 settings of {bridge}: {', '.join(wrong)}"
        return ""

    @staticmethod
    def routed_via(ipr: IPRoute, address: str) -> int | None:
        """The link the host routes an IPv6 `address` over, or None."""
        try:
            got = ipr.route("get", family=AF_INET6, dst=address)
            return got[0].get_attr("RTA_OIF") if got else None
        except NetlinkError:
            return None
