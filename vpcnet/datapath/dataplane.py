"""The real datapath (vpcnet.datapath.protocol.Datapath): every kernel change vpcnet makes, composed from
vpcnet.datapath's appliers: `links` (bridges, anchors, veth pairs, addresses, routes), `tc` (the eBPF fast
path's programs), `firewall` (the chains, one iptables-restore transaction), all over `netlink`.

Per network: a bridge (`vpc-<network id[:11]>`) holding the gateway address; per endpoint: a veth pair,
host end (`vh<endpoint id[:11]>`) on the bridge, container end (`vc...`) handed to Docker to move into
the sandbox. Links and addresses go through netlink: an endpoint's (veth pair, routes, addresses, tc filters, the
lookups of CreateEndpoint and Join) over vpcnet.datapath.rtnl's raw socket, the rest and the fallback through
pyroute2; the firewall through `iptables-restore` (the same
binary family Docker uses, so both see one rule set). Bridge mode's anti-spoofing: a classic BPF tc filter
on each host end's ingress (vpcnet.datapath.guard: only the endpoint's own MAC, and IPv4, ARP and IPv6 only
as itself; routed mode's reverse-path check never sees what is bridged), with the veth, checked by `repair`.

Routed mode (`-o vpcnet.mode=routed`, per network): a leaner path with no bridge. The gateway address
sits on a per-network anchor (one end of a veth pair `vpc-<id11>`/`vpp-<id11>`: this kernel may lack the
dummy driver), so the host answers for it and its connected route keeps unknown addresses of the host
CIDR off the default route. Per endpoint the host end of the veth is on no bridge and has no address;
it has `proxy_arp=1` and `proxy_delay=0` (set over netlink by vpcnet.datapath.rtnl: /proc/sys is read-only in a
managed plugin) and the host routes `<container ip>/32 dev <host end>`. The container keeps the pool
prefix Docker assigns: it ARPs for neighbours and the gateway, the host end answers, and the host
routes by /32. Each packet between hosts thus skips the bridge and br_netfilter (Docker turns
bridge-nf-call-iptables on host-wide): one device and one netfilter pass fewer per direction. Firewall
rules match the veths (`vh+`) and the host CIDR instead of `-i <bridge>`, and a reverse-path check
drops what a veth sends from an address not routed back to it; masquerade and --internal behave as in
bridge mode.

eBPF mode (`-o vpcnet.mode=ebpf`, and the default where vpcnet.datapath.features finds the kernel and
capabilities for it): routed mode, plus the fast path of vpcnet.datapath.ebpf. A tc
program on each endpoint's host veth (ingress: one program per network, each endpoint's address and
published ports in the endpoint maps, vpcnet.datapath.ebpf.endpoints) and one per network on the uplink
(ingress of the default route's device; filter `vpcnet-<id12>`, one handle per network) hand the traffic
between the host CIDR and the rest of the cluster CIDR straight between the container and the uplink (and between two
containers of the network on this host, veth to veth): no pass through the host's
IP forwarding or netfilter (the same traffic the conntrack bypass below already accepts statelessly and
never NATs). Everything else, and anything the programs cannot resolve, takes routed mode's path.

Peer counting (VPCNET_PEER_METRICS, `peers`): in every mode, small tc programs on each endpoint's host
veth (and, in ebpf mode, the fast path's own programs) count traffic per peer into one map per host
(vpcnet.datapath.tc, vpcnet.datapath.ebpf.maps); they go with the veth, the periodic pass puts missing ones
back, and a deleted endpoint's keys leave the map (`forget_peers`).

The endpoint maps are this process's own: the periodic pass reads them, repairs an entry this process
wrote that is missing or wrong, takes over (attaches its own programs, writes its own entries; no Repair)
the endpoints whose entries another process wrote (before a restart, another worker), and drops the
entries of veths that are gone (`_drop_stale_facts`). The same for the map of this host's endpoints by
address (vpcnet.datapath.ebpf.endpoints.local_value: compared with the veth's index, MTU and MAC and its
other end's, the container's, MAC as the kernel has it), whose entries leave before the veth or the route
does (`delete_endpoint`, `drop_endpoint_ipv6`); and the uplink programs another process attached (reading
its map, which nobody updates any more) are replaced by this process's at its first pass
(`TcPrograms.own_uplinks`).

Firewall: computed per mode by vpcnet.datapath.modes and written by vpcnet.datapath.firewall in one
`iptables-restore --noflush` transaction, in chains of vpcnet's own so removing a network removes exactly
its rules:
- filter `VPCNET-FORWARD` (jumped to from FORWARD): accepts the network's traffic by the uplinks and
  vpcnet's own links even though Docker sets FORWARD's policy to DROP, through the host-wide isolation
  chains `VPCNET-EGRESS`/`VPCNET-INGRESS` (vpcnet.datapath.firewall; their uplinks are `uplink_names`,
  put right by the periodic pass when the default route moves); one chain per network `VPCNET-F-<id12>`.
  Its jump sits right after Docker's `-j DOCKER-USER` when there is one (first otherwise), so a user's
  DOCKER-USER rules apply to vpcnet's traffic as to Docker's own networks; Docker 28's DOCKER-FORWARD
  comes after it and matches only Docker's bridges (a Docker rule that comes first and would accept a
  bridge's traffic into vpcnet meets the isolation guard in the mangle table first).
- nat `VPCNET-POSTROUTING` (jumped to from POSTROUTING): per network `VPCNET-N-<id12>` masquerades
  traffic from the host CIDR only when it leaves for a destination outside the cluster CIDR and the
  no-NAT list. Container-to-container traffic inside the VPC keeps its own source address.
- `--internal` networks: forwarding only within the cluster CIDR, no masquerade.
- nat `VPCNET-DNAT` (jumped to from nat PREROUTING and OUTPUT for the host's own addresses): per network
  with published ports `VPCNET-P-<id12>`, one DNAT per host port (`ensure_ports`; vpcnet.datapath.modes
  says what else they need: tracked replies, hairpin). `port_taken` is the conflict check before one is
  chosen: a trial bind in this namespace, and Docker's own DNAT rules.
- raw `VPCNET-RAW` (jumped to from raw PREROUTING): the routed modes' anti-spoofing rule, and per network
  `VPCNET-R-<id12>` marks forwarded traffic between the host CIDR and the cluster CIDR NOTRACK. That
  traffic is accepted statelessly and never NATed, so conntrack (a lookup and an entry per flow, on every
  packet) buys nothing; bypassing it lifted cross-host TCP and UDP packet rate on the lab. Traffic to or
  from the gateway (host <-> container, local delivery) stays tracked, so a host firewall relying on
  conntrack in INPUT keeps working. Untracked packets skip the nat table: fine, cluster traffic is never
  masqueraded.

Host safety: where vpcnet turns net.ipv4.ip_forward on itself (from 0: at boot it may start before
Docker), FORWARD's policy goes to DROP first, as Docker does, so the host does not start forwarding
between all its interfaces; and every host-side link vpcnet makes has IPv6 off (vpcnet.datapath.links
says why), checked by the periodic pass like the rest. A second, independent guard drops IPv6 arriving on
those links in ip6tables (vpcnet.datapath.firewall.Ipv6Guard: raw `VPCNET-IPV6`, one rule per link name
prefix), the one that holds where /proc/sys is read-only (a managed plugin); it is written at start
and put back by the periodic pass.

IPv6 (vpcnet.datapath.ipv6): `ensure_endpoint_ipv6` gives an endpoint of a
routed or ebpf network its IPv6 (IPv6 on for its host veth, its own link-local gateway on it (ipv6.link_gateway), a /128
route; in ebpf mode the IPv6 container program, vpcnet.datapath.ebpf.programs6, and the network's IPv6
uplink program comes with the network; `drop_endpoint_ipv6` removes the program with the route), and the
guard, while `ipv6_endpoints()` (the desired state) has any, lets a veth send from what the host routes
back to it: the endpoint's own /128; the periodic pass keeps all of it, and leaves IPv6 on where it is
wanted. `ipv6_internal()` (the --internal networks with IPv6) adds their rules to the same write. An
IPv6-only network (`spec.ipv4` false) and its endpoints (address "") get nothing of IPv4: no anchor address,
chains, /32 routes, proxy ARP or IPv4 tc programs, and the repair pass looks for none. A dual-stack bridge
network's bridge holds its link-local gateway and the host's IPv6 block is routed to it (`ensure_network`); each of its
endpoints has its own guard rule (its address, from its port), written when it comes and goes; the
periodic pass keeps the bridge's IPv6 too.
Published ports on IPv6 host addresses are the same DNAT in ip6tables (vpcnet.datapath.ports6),
written by `ensure_ports` and the periodic pass beside the IPv4 ones.

Every operation is idempotent: create what is missing, accept what exists, ignore what is gone. `repair`
is the periodic pass's half (vpcnet.datapath.reconciler): one dump of links, addresses, routes and
qdiscs and one iptables-save find what differs from the store; only those networks get a targeted look
under their lock, and each difference put right is returned as a `Repair`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

from pyroute2 import NetlinkError

from vpcnet.datapath import rtnl
from vpcnet.datapath.ebpf import endpoints as ep_maps
from vpcnet.datapath.ebpf import maps
from vpcnet.datapath.features import Features, probe
from vpcnet.datapath.firewall import PREFIXES, FirewallTable, Ipv6Guard
from vpcnet.datapath.guard import GuardFacts
from vpcnet.datapath.ipv6 import Ipv6Endpoint, RoutedIpv6, forward_rules, guard_rules
from vpcnet.datapath.links import IPV6_OFF_VIEW, Links
from vpcnet.datapath.modes import strategy
from vpcnet.datapath.netlink import Netlink
from vpcnet.datapath.ports6 import Ports6
from vpcnet.datapath.spec import EndpointSpec, KernelView, NetworkGone, NetworkSpec, Repair, anchor_peer, bridge_name
from vpcnet.datapath.tc import TcPrograms
from vpcnet.errors import DataplaneError

log = logging.getLogger(__name__)
_no_lock = nullcontext
DOCKER_NAT_TTL = 2.0          # seconds port_taken reuses its read of Docker's DNAT rules


def held_in_proc(proto: str, host_ip: str, port: int, family: str = "ipv4") -> str:
    """Whether a socket of this namespace holds `port` (a TCP listener, a bound UDP socket), from
    /proc/net/{tcp,udp}{,6} (of the calling thread: see rtnl.in_netns): the check where a trial bind is not
    allowed. IPv6 (`family`): only the IPv6 tables (a socket on 0.0.0.0 holds no IPv6 port). SCTP is not
    listed there: ""."""
    if proto == "sctp":
        return ""
    want = ipaddress.ip_address(host_ip) if host_ip else None
    for name in ((proto + "6",) if family == "ipv6" else (proto, proto + "6")):
        try:
            with open(f"/proc/thread-self/net/{name}") as fh:      # this thread's namespace (rtnl.in_netns)
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or (proto == "tcp" and fields[3] != "0A"):
                continue
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            local = ipaddress.ip_address(words)
            if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped:
                local = local.ipv4_mapped
            if want is None or local.is_unspecified or local == want:
                shown = f"[{host_ip or '::'}]" if family == "ipv6" else host_ip or "0.0.0.0"
                return f"{shown}:{port}/{proto}: a socket of the host holds it ({local})"
    return ""


class Dataplane:
    def __init__(self, netns: str | None = None, iptables: str = "iptables", extra_uplinks: Sequence[str] = (),
                 peers: bool = False, local_endpoints: bool = True):
        self.netns = netns
        self.iptables = iptables
        self.nl = Netlink(netns, extra_uplinks)
        self.links = Links(self.nl)
        # peers: count traffic per peer (VPCNET_PEER_METRICS); local_endpoints: the map of this host's
        # endpoints by address (vpcnet.datapath.tc: off with several workers)
        self.tc = TcPrograms(self.nl, peers, local_endpoints)
        self.firewall = FirewallTable(self.nl.cmd(), iptables)
        self.ipv6_guard = Ipv6Guard(self.nl.cmd(), iptables)
        self.ipv6 = RoutedIpv6(self.nl)
        self.ports6 = Ports6(self.ipv6_guard.table)     # IPv6 published ports (ip6tables nat)
        # The host's endpoints with an IPv6 address, read from the desired state each time the guard is
        # written (every worker writes the whole chain, so none may go by what it alone has seen).
        self.ipv6_endpoints: Callable[[], Sequence[Ipv6Endpoint]] = tuple
        # (host IPv6 block, IPv6 cluster CIDR) of every --internal network with IPv6, read likewise
        self.ipv6_internal: Callable[[], Sequence[tuple[str, str]]] = tuple
        # Held around reading them and writing the guard: the guard names each bridge-mode endpoint, so two
        # workers writing at once must not let the one that read the store first write last.
        self.ipv6_guard_lock: Callable[[], ContextManager] = _no_lock
        self.unrepaired: list[str] = []     # networks the last repair could not put right
        # per family: (read at, Docker's nat DOCKER rules)
        self._docker_nat: dict[str, tuple[float, list[str]]] = {}
        self._v6_veths: set[str] = set()    # host veths with IPv6 on by design, as of the last repair
        self._v6_addresses: dict[str, str] = {}   # their IPv6 addresses (routed and ebpf modes), likewise
        self._guard_ipv6 = False            # the guard as last written here lets IPv6 endpoints through
        self._guard_internal: set[str] = set()    # the --internal IPv6 blocks in the guard as last written here
        self._ipv6_host = False             # IPv6 forwarding checked by this process
        self._guard_bridged = False         # the guard as last written here has bridge mode's rules
        self._bridged6: dict[str, str] = {}  # bridge ports with IPv6 by design: their addresses (last repair)

    # -- host-wide --------------------------------------------------------------------------------
    def uplink_mtu(self) -> int:
        """MTU of the interface carrying the default route (the VPC link), 1500 without one."""
        return self.nl.uplink_mtu()

    def features(self) -> Features:
        """What each datapath mode needs, probed once per process on this namespace (vpcnet.datapath.features)."""
        return probe(self.netns)

    def overlapping_routes(self, cidr: str) -> list[str]:
        return self.links.overlapping_routes(cidr)

    def ensure_host(self) -> list[str]:
        """ip_forward, the shared chains, the builtin chains' jumps to them, the anti-spoofing rule, the
        IPv6 guard. Returns what was wrong."""
        self._ensure_forwarding()
        return self.firewall.apply([], host=True, uplinks=self.uplink_names()) + self._apply_ipv6_guard()

    def _apply_ipv6_guard(self, saved=None) -> list[str]:
        """The IPv6 guard, letting IPv6 endpoints' own traffic through while the host has any
        (vpcnet.datapath.ipv6): one rule set for the routed modes' endpoints, one for bridge mode's (each
        port's own filter checks its addresses: vpcnet.datapath.guard), and the --internal networks' rules."""
        with self.ipv6_guard_lock():
            endpoints = list(self.ipv6_endpoints())
            bridged = [ep for ep in endpoints if ep.bridge]
            routed = len(bridged) < len(endpoints)
            uplinks = self.uplink_names() if endpoints else []
            internal = list(self.ipv6_internal())
            problems = self.ipv6_guard.apply(saved, allow=guard_rules(routed, bool(bridged)),
                                             forward=forward_rules(routed, uplinks, internal, bool(bridged)))
        in_place = self.ipv6_guard.in_place
        self._guard_ipv6 = routed and in_place
        self._guard_bridged = bool(bridged) and in_place
        self._guard_internal = {block for block, _ in internal} if in_place and endpoints else set()
        return problems

    def uplink_names(self) -> list[str]:
        """Names of the uplinks: the interfaces carrying the default route(s), and those VPCNET_UPLINKS names
        (present or not: iptables matches a name once it appears). With vpcnet's own links, the only ones
        cluster traffic enters and leaves by (vpcnet.datapath.firewall.isolation_chains)."""
        with self.nl.ipr() as ipr:
            names = [name for name in (self.nl.link_name(ipr, i) for i in self.nl.uplinks(ipr)) if name]
        return names + [name for name in self.nl.extra_uplinks if name not in names]

    def _ensure_forwarding(self) -> None:
        """net.ipv4.ip_forward=1. Where vpcnet turns it on itself (from 0: at boot vpcnet may start before
        Docker, which sets FORWARD's policy to DROP only when it turns forwarding on), FORWARD's policy goes
        to DROP first, as Docker does: the host then forwards only what a chain accepts (vpcnet's accepts
        its networks' traffic), not between any two of its interfaces. Where forwarding was on already,
        someone else decided: the policy is left alone (`vpcnet doctor` names an ACCEPT policy)."""
        if self.nl.read_sysctl("net.ipv4.ip_forward") == "1":
            return
        self.firewall.set_policy("FORWARD", "DROP")          # before forwarding goes on: no window
        if self.nl.sysctl("net.ipv4.ip_forward", "1") == "1":
            return                                          # another worker was first (and said so)
        log.warning("net.ipv4.ip_forward was 0: vpcnet turned it on and set the filter table's FORWARD policy "
                    "to DROP, as Docker does when it turns forwarding on (vpcnet's chain accepts its own "
                    "networks' traffic; anything else the host forwards needs a rule of its own)")

    # -- networks ---------------------------------------------------------------------------------
    def ensure_network(self, spec: NetworkSpec) -> None:
        # host-wide: written by ensure_host and the periodic pass; again for a network with IPv6, whose block
        # may be in (or, as a new --internal one, missing from) the --internal rules (one save, a write if so)
        if not self.ipv6_guard.in_place or spec.host_cidr_v6:
            self._apply_ipv6_guard()
        self._ensure_links(spec, firewall=True)

    def _ensure_links(self, spec: NetworkSpec, firewall: bool = False) -> None:
        """The bridge or anchor, its address, MTU and state, the uplink programs; with `firewall`, the
        network's rules (between the links and the programs, as a first creation needs)."""
        self._ensure_forwarding()
        idx = self.links.ensure_gateway_link(spec)
        if spec.bridged_ipv6:
            self._ensure_ipv6_host()
            with self.nl.ipr() as ipr:
                self.ipv6.ensure_bridge(ipr, spec.bridge, spec.host_cidr_v6)
        if firewall:
            self._ensure_firewall(spec)
        if spec.ebpf:                          # the IPv4 and (with an IPv6 block) IPv6 uplink programs
            self.tc.ensure_uplink_programs(spec, idx)

    def _ensure_firewall(self, spec: NetworkSpec) -> list[str]:
        """The network's chains and the host's, in one transaction; returns what was wrong."""
        return self.firewall.apply([strategy(spec.mode).firewall(spec)], host=True, uplinks=self.uplink_names())

    def delete_network(self, spec: NetworkSpec) -> None:
        if spec.internal and spec.host_cidr_v6:     # its --internal IPv6 rules go (the row went first)
            self._apply_ipv6_guard()
        self.firewall.apply([], unwanted=[spec.tag], host=False)
        if spec.host_cidr_v6:                  # its IPv6 ports' chains too (only a dual-stack one has any)
            self.ports6.apply([dataclasses.replace(spec, ports=())])
        if spec.ebpf:
            self.tc.drop_network_programs(spec)
        self.tc.forget_network(spec)
        self.nl.delete_link(spec.bridge)

    def network_exists(self, spec: NetworkSpec) -> bool:
        return self.link_exists(spec.bridge)

    def stale_chains(self, known_tags: set[str]) -> list[tuple[str, str]]:
        """(table, chain) of per-network chains whose network vpcnet no longer knows and whose bridge is
        gone. A chain whose bridge still exists may belong to another vpcnet instance on this host (a
        managed plugin beside a systemd one, say): never touch it."""
        out = []
        saved = self.firewall.save()
        with self.nl.ipr() as ipr:
            for table, prefix in PREFIXES:
                for chain in saved.chains(table):
                    tag = chain[len(prefix):]
                    if chain.startswith(prefix) and tag not in known_tags and \
                            self.nl.link_index(ipr, bridge_name(tag)) is None:
                        out.append((table, chain))
        return out

    def drop_stale_chain(self, table: str, chain: str) -> None:
        self.firewall.drop([(table, chain)])

    def drop_stale_uplink_programs(self, known_tags: set[str]) -> list[str]:
        return self.tc.drop_stale_uplink_programs(known_tags)

    # -- endpoints --------------------------------------------------------------------------------
    def ensure_endpoint(self, spec: NetworkSpec, host_veth: str, peer_veth: str, mac: str, address: str,
                        ipv6: bool = False) -> None:
        """A veth pair for an endpoint of network `spec`. Bridge mode: host end on the bridge. Routed and
        ebpf modes: host end on no bridge, answering ARP for the container's neighbours and gateway (proxy
        ARP), and a route `<address>/32 dev <host end>` (it goes with the veth); ebpf mode also attaches the
        container program to the host end (it goes with the veth too). Bridge mode: the anti-spoofing guard
        on the host end's ingress (vpcnet.datapath.guard: `mac`, and IPv4 and ARP only from `address`, no
        IPv6 until `ensure_endpoint_ipv6`; the routed modes' reverse-path check cannot see bridged traffic).
        With peer counting, the counting programs too (vpcnet.datapath.tc), in every mode. `ipv6`:
        `ensure_endpoint_ipv6` comes next (the endpoint has an IPv6 address): in the routed modes the host
        veth's IPv6 is then left for it to turn on rather than turned off here first
        (vpcnet.datapath.links.Links.ensure_veth says why)."""
        with self.nl.ipr() as ipr:
            host_idx = self.links.ensure_veth(ipr, spec, host_veth, peer_veth, mac, ipv6=ipv6 and spec.routed)
            if not address:                   # IPv6-only: its IPv6 is ensure_endpoint_ipv6's
                return
            index = host_idx
            if not spec.routed:               # bridge mode: its anti-spoofing guard, ahead of the counting
                index = self.tc.attach_guard(host_idx, GuardFacts(mac, address), host_veth)
            if self.tc.peers and not spec.ebpf and index is not None:
                self.tc.attach_counting(ipr, spec, index, address)
            if not spec.routed and spec.published(address):
                self._hairpin(ipr, host_veth)
        if not spec.routed or host_idx is None:
            return
        self.links.proxy_arp(host_idx, host_veth)
        with self.nl.ipr() as ipr:
            self.links.route_endpoint(ipr, address, host_idx, host_veth)
            if spec.ebpf:
                self.tc.attach_endpoint(ipr, spec, host_idx, address)

    def ensure_endpoint_ipv6(self, spec: NetworkSpec, host_veth: str, address: str) -> None:
        """IPv6 for an endpoint whose veth `ensure_endpoint` made. Routed and ebpf modes: IPv6 on its host
        veth, the gateway, a /128 route; in ebpf mode (with the network's IPv6 block in `spec`) the IPv6
        container program too, with `address` built in (vpcnet.datapath.ebpf.programs6), after the /128 route;
        with peer counting in the other modes, the IPv6 counting programs. Bridge mode: no IPv6 on the veth (a
        bridge port: the bridge carries the network's IPv6, `ensure_network`); the port's anti-spoofing
        filter lets `address` through from now on, the guard's bridge rules are in place (and the counting
        programs). The endpoint must already be among
        `ipv6_endpoints()` (the desired state first): the guard written here lets its traffic through."""
        if not spec.host_cidr_v6 and not spec.routed:
            raise DataplaneError(f"network {spec.tag} has no IPv6 block: bridge mode carries IPv6 only on "
                                 "networks created with --ipv6")
        self._ensure_ipv6_host()
        # the guard's rules (for a bridge port, its own), with an --internal network's own rules: written (or
        # found in place: one ip6tables-save) unless this process last wrote them so itself
        internal_missing = spec.internal and spec.host_cidr_v6 not in self._guard_internal
        if not spec.routed:
            if not self._guard_bridged or internal_missing:
                self._apply_ipv6_guard()
            with self.nl.ipr() as ipr:
                idx = self.nl.link_index(ipr, host_veth)
            if idx is None:
                raise DataplaneError(f"veth {host_veth} is missing")
            self._guard_ipv6_of(idx, host_veth, address)
            if self.tc.peers:                  # peer counting, on the bridge port as in routed mode
                with self.nl.ipr() as ipr:
                    self.tc.attach_counting(ipr, spec, idx, address)
            return
        if not self._guard_ipv6 or internal_missing:
            self._apply_ipv6_guard()
        with self.nl.ipr() as ipr:
            idx = self.ipv6.ensure_endpoint(ipr, host_veth, address)
            self.tc.attach_for(ipr, spec, idx, address)

    def _guard_ipv6_of(self, index: int, host_veth: str, address6: str) -> bool:
        """The anti-spoofing filter of bridge port `index` rewritten to let the IPv6 `address6` through (""
        to let no IPv6 through), its MAC and IPv4 address as they are; False: the port has no filter of
        ours (a routed endpoint's veth)."""
        facts = self.tc.guard_facts(index)
        if facts is None:
            return False
        if facts.address6 != address6:
            self.tc.attach_guard(index, dataclasses.replace(facts, address6=address6), host_veth)
        return True

    def _ensure_ipv6_host(self) -> None:
        if not self._ipv6_host:               # the first IPv6 network or endpoint of this process: forwarding
            self.ipv6.ensure_host(self.uplink_names())
            self._ipv6_host = True

    def drop_endpoint_ipv6(self, host_veth: str, address: str) -> None:
        """An endpoint lost its IPv6 address while its container runs (Docker released it; the row no longer
        has it): its IPv6 programs leave the veth (no fast path for the address), then its /128 route goes,
        and with it the guard's permission (the reverse path) to send from the address; a bridge port's rule
        goes from the guard; its peer counts leave the map."""
        with self.nl.ipr() as ipr:
            idx = self.nl.link_index(ipr, host_veth)
            if idx is not None:
                self.tc.drop_endpoint6(ipr, idx)
            self.ipv6.unroute(ipr, host_veth, address)
        if idx is not None:
            self._guard_ipv6_of(idx, host_veth, "")    # a bridge port: no IPv6 from it any more
        self.forget_peers([address])
        if self._bridge_rules_may_go():
            self._apply_ipv6_guard()

    def _repair_ipv6(self, endpoints: dict[str, Ipv6Endpoint], view: KernelView) -> list[Repair]:
        """IPv6 forwarding while there are IPv6 endpoints, and the endpoints whose veth is there but whose
        IPv6 (on, gateway, /128 route) is not."""
        repairs = [Repair("route", "-", f"IPv6 forwarding: {what}")
                   for what in (self.ipv6.ensure_host(self.uplink_names()) if endpoints else [])]
        for ep in endpoints.values():
            link = view.links.get(ep.host_veth)
            if link is None:
                continue
            with self.nl.ipr() as ipr:
                routed = self.ipv6.routed_via(ipr, ep.address) == link["index"]
            if routed and link.get("ipv6") in (None, (0, 0, 0)):
                continue
            with self.nl.ipr() as ipr:
                self.ipv6.ensure_endpoint(ipr, ep.host_veth, ep.address)
            repairs.append(Repair("route", "-", f"IPv6 of {ep.address} on {ep.host_veth} "
                                                f"{'off' if routed else 'not routed'}"))
        return repairs

    def _repair_bridges_ipv6(self, specs: Sequence[NetworkSpec],
                             lock_for: Callable[[NetworkSpec], ContextManager] | None) -> list[Repair]:
        """Bridge mode's IPv6 (vpcnet.datapath.ipv6.RoutedIpv6.ensure_bridge): the block's route, the gateway,
        the bridge's IPv6 settings; looked at again under the network's lock and put right. A missing
        bridge is the network repair's (it makes the bridge and this with it)."""
        repairs = []
        for spec in specs:
            try:
                with self.nl.ipr() as ipr:
                    wrong = self.ipv6.bridge_wrong(ipr, spec.bridge, spec.host_cidr_v6)
                if not wrong or wrong.startswith("bridge "):
                    continue
                with (lock_for(spec) if lock_for else _no_lock()):
                    with self.nl.ipr() as ipr:
                        wrong = self.ipv6.bridge_wrong(ipr, spec.bridge, spec.host_cidr_v6)
                        if wrong and not wrong.startswith("bridge "):
                            self.ipv6.ensure_bridge(ipr, spec.bridge, spec.host_cidr_v6)
                            repairs.append(Repair("route" if "route" in wrong else "link", spec.tag, wrong))
            except NetworkGone:
                continue
            except Exception as exc:              # one broken network never stops the pass
                log.error("network %s: cannot repair the bridge's IPv6: %s", spec.tag, exc,
                          extra={"event": "datapath_repair", "network": spec.tag, "outcome": "failed"})
                self.unrepaired.append(spec.tag)
        return repairs

    def delete_endpoint(self, host_veth: str) -> None:
        with self.nl.ipr() as ipr:
            idx = self.nl.link_index(ipr, host_veth)
        if idx is not None:                   # its entries in the endpoint maps first: from now on no packet
            self.tc.forget_endpoint(idx)      # reaches it through the map of this host's endpoints
        self.nl.delete_link(host_veth)       # the peer goes with it, wherever it is (and the filters)
        if self._bridge_rules_may_go():      # the last bridge-mode IPv6 endpoint: no bridge rules after it
            self._apply_ipv6_guard()

    def _bridge_rules_may_go(self) -> bool:
        """The guard may hold bridge mode's rules with no bridge-mode IPv6 endpoint left (the rows already
        say so): it did as this process last wrote it, or this process has not written it yet."""
        if not (self._guard_bridged or not self.ipv6_guard.in_place):
            return False
        return not any(ep.bridge for ep in self.ipv6_endpoints())

    def forget_peers(self, addresses: Sequence[str]) -> None:
        """Deleted endpoints' per-peer counts leave the peer map (IPAM may hand the addresses out again);
        one walk of the map for all of them."""
        if self.tc.peers and addresses:
            maps.forget(set(addresses))

    # -- published ports ----------------------------------------------------------------------------
    def ensure_ports(self, spec: NetworkSpec, endpoints: Sequence[EndpointSpec], adding: bool = True) -> None:
        """The network's published ports as `spec.ports` holds them: its firewall, in one transaction per
        family (ip6tables for the IPv6 ones, vpcnet.datapath.ports6), and in ebpf mode the container programs
        of `endpoints` (those whose ports changed), which leave the published ports' replies to the host.
        `adding`: the programs first (a reply is never sent the fast way while its DNAT rule exists), else
        the rules first."""
        if not adding:
            self._ensure_firewall(spec)
            if spec.host_cidr_v6:              # IPv6 ports: only on a dual-stack network (no ip6tables run else)
                self.ports6.apply([spec])
        v6 = {e.host_veth: e.address for e in self.ipv6_endpoints()} if endpoints else {}
        with self.nl.ipr() as ipr:
            for ep in endpoints:
                idx = self.nl.link_index(ipr, ep.host_veth)
                if idx is not None and spec.ebpf:
                    if ep.address:                 # an IPv6-only endpoint has no IPv4 program
                        self.tc.attach_endpoint(ipr, spec, idx, ep.address)
                    if ep.host_veth in v6:
                        self.tc.attach_endpoint(ipr, spec, idx, v6[ep.host_veth])
                elif idx is not None and not spec.routed and (
                        spec.published(ep.address) or (ep.host_veth in v6 and spec.published(v6[ep.host_veth]))):
                    self._hairpin(ipr, ep.host_veth)
        if adding:
            self._ensure_firewall(spec)
            if spec.host_cidr_v6:              # IPv6 ports: only on a dual-stack network (no ip6tables run else)
                self.ports6.apply([spec])

    def _hairpin(self, ipr, host_veth: str) -> None:
        """Bridge mode: the bridge may send a frame back out of the port it came in by (hairpin mode, as
        Docker sets it without its userland proxy), so a container reaches its own published port through
        the host's address (br_netfilter DNATs it on the bridge, back towards the same port)."""
        idx = self.nl.link_index(ipr, host_veth)
        if idx is not None:
            try:
                ipr.brport("set", index=idx, mode=1)
            except NetlinkError as exc:
                raise DataplaneError(f"cannot set hairpin mode on {host_veth}: {exc}") from None

    def port_taken(self, proto: str, host_ip: str, port: int, family: str = "ipv4") -> str:
        """Why `port` (`proto`, on `host_ip` or every address of `family`) cannot be published on this host, or
        "": a socket of the host holds it (a host process, Docker's docker-proxy: a trial bind says so; the
        address not being the host's too), or Docker's own DNAT rules publish it (nat DOCKER, Docker
        without its userland proxy; ip6tables' for IPv6). IPv6 is tried with an IPV6_V6ONLY socket: a
        listener on [::] (both families) holds it, one on 0.0.0.0 does not."""
        kind, number = {"tcp": (socket.SOCK_STREAM, socket.IPPROTO_TCP), "udp": (socket.SOCK_DGRAM, socket.IPPROTO_UDP),
                        "sctp": (socket.SOCK_STREAM, 132)}[proto]
        v6 = family == "ipv6"
        shown = f"[{host_ip or '::'}]" if v6 else host_ip or "0.0.0.0"

        def bind() -> str:
            try:
                sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind, number)
            except OSError:
                return ""                     # no such protocol here (sctp without its module, no IPv6): none holds it
            try:
                if proto != "udp":            # a connection in TIME_WAIT holds no port; a listener does
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if v6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host_ip or ("::" if v6 else "0.0.0.0"), port))
                return ""
            except PermissionError:           # a port below 1024 without CAP_NET_BIND_SERVICE (the managed
                return held_in_proc(proto, host_ip, port, family)      # plugin): the kernel's socket tables say
            except OSError as exc:
                return f"{shown}:{port}/{proto}: {exc.strerror or exc}"
            finally:
                sock.close()

        why = rtnl.in_netns(self.netns, bind)
        if why:
            return why
        now = time.monotonic()
        read_at, rules = self._docker_nat.get(family, (-DOCKER_NAT_TTL, []))
        if now - read_at > DOCKER_NAT_TTL:                  # one read for the ports of one call, not one each
            saved = self.ports6.save() if v6 else self.firewall.save()
            rules = (saved.chain("nat", "DOCKER") if saved is not None else None) or []
            self._docker_nat[family] = (now, rules)
        full = f"{host_ip}/{128 if v6 else 32}"
        for rule in rules:
            words = rule.split()
            value = dict(zip(words, words[1:], strict=False))
            if "DNAT" in words and value.get("--dport") == str(port) and value.get("-p") == proto and \
                    (not host_ip or value.get("-d", full) == full):
                return f"{shown}:{port}/{proto}: Docker publishes it (nat DOCKER: {rule})"
        return ""

    def link_exists(self, name: str) -> bool:
        """Join asks it of every endpoint's peer: one raw RTM_GETLINK (netlink.index_of)."""
        with self.nl.ipr() as ipr:
            return self.nl.index_of(ipr, name) is not None

    # -- the periodic pass: drift found by reading the kernel -------------------------------------------
    def view(self, with_tc: bool = True) -> KernelView:
        """One read of the kernel: links, addresses, routes (raw netlink dumps, vpcnet.datapath.rtnl: a fraction of
        pyroute2's cost per message) and, with `with_tc` (ebpf networks exist), qdiscs and uplink programs."""
        local = self.tc.facts.read_local()    # before the facts (KernelView.local says why)
        facts = self.tc.facts.read()          # before the links (KernelView.facts says why)
        try:
            sock = self.nl.rtnl()
            links = rtnl.dump_links(sock)
            addresses = rtnl.dump_addresses(sock)
            routes, uplinks = rtnl.dump_routes(sock)
            uplinks += [links[name]["index"] for name in self.nl.extra_uplinks
                        if name in links and links[name]["index"] not in uplinks]
            clsact = {i for i, kinds in rtnl.dump_qdisc_kinds(sock).items() if "clsact" in kinds} \
                if with_tc else set()
        except OSError as exc:
            self.nl.drop_rtnl()
            raise DataplaneError(f"cannot read the kernel's links and routes: {exc}") from None
        programs: dict[str, set[int]] = {}
        if with_tc:
            with self.nl.ipr() as ipr:
                for index, _handle, name in self.tc.uplink_programs(ipr, clsact):
                    programs.setdefault(name, set()).add(index)
        return KernelView(links, addresses, routes, clsact, uplinks, programs, facts, local)

    def repair(self, networks: Sequence[tuple[NetworkSpec, Sequence[EndpointSpec]]],
               lock_for: Callable[[NetworkSpec], ContextManager] | None = None,
               still_wanted: Callable[[str], bool] | None = None) -> list[Repair]:
        """Make the kernel hold what `networks` want, reading it first; returns what was wrong (nothing,
        on a host left alone). A network that looks wrong in the dumps is looked at again under its
        lock (`lock_for`), where no Docker call is changing it, and only then repaired."""
        repairs: list[Repair] = []
        self.unrepaired = []                      # tags of networks whose repair failed (logged below)
        view = self.view(with_tc=any(spec.ebpf for spec, _ in networks))
        saved = self.firewall.save()
        by_index = {link["index"]: name for name, link in view.links.items()}
        uplinks = [by_index[i] for i in view.uplinks if i in by_index]
        uplinks += [name for name in self.nl.extra_uplinks if name not in uplinks]
        repairs += [Repair("firewall", "-", p)
                    for p in self.firewall.apply([], host=True, saved=saved, uplinks=uplinks)]
        saved6 = self.ports6.save()
        repairs += [Repair("firewall", "-", p) for p in self._apply_ipv6_guard(saved6)]
        every6 = list(self.ipv6_endpoints())
        v6 = {ep.host_veth: ep for ep in every6 if not ep.bridge}
        self._bridged6 = {ep.host_veth: ep.address for ep in every6 if ep.bridge}
        self._v6_veths = set(v6)
        self._v6_addresses = {veth: ep.address for veth, ep in v6.items()}
        self._drop_stale_facts(view)
        self.tc.uplinks = tuple(view.uplinks)     # what endpoint programs built from now on take
        repairs += self._repair_ipv6(v6, view)
        repairs += self._repair_bridges_ipv6([spec for spec, _ in networks if spec.bridged_ipv6], lock_for)
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
        repairs += self._repair_ports6([spec for spec, _ in networks], saved6, still_wanted)
        if self.tc.peers and maps.local():
            self._adopt_counting(networks, view, lock_for)
        for spec, endpoints in networks:
            if not self._suspect(spec, endpoints, view):
                continue
            try:
                with (lock_for(spec) if lock_for else _no_lock()):
                    repairs += self._repair_network(spec, endpoints)
            except NetworkGone:                   # deleted (or its creation undone) meanwhile
                continue
            except Exception as exc:              # one broken network never stops the pass
                log.error("network %s: cannot repair the datapath: %s", spec.tag, exc,
                          extra={"event": "datapath_repair", "network": spec.tag, "outcome": "failed"})
                self.unrepaired.append(spec.tag)
        return repairs

    def _drop_stale_facts(self, view: KernelView) -> None:
        """Entries of this process's endpoint maps whose host veth has gone (an endpoint another worker
        deleted, or whose deletion failed half way): they leave the maps; so does an entry of the map of
        this host's endpoints by address that names a veth that has gone, or one whose facts do not hold that
        address. Not drift: no Repair."""
        live = {link["index"] for link in view.links.values()}
        for (family, key), value in view.local.items():
            index = ep_maps.local_ifindex(value)
            facts = view.facts.get((family, index))
            if index not in live or facts is None or facts[:ep_maps.ADDRESS[family]] != key:
                self.tc.facts.remove_local(family, key, index)
        for family, index in view.facts:
            if index not in live:
                self.tc.facts.remove(index, (family,))

    def _local_wrong(self, spec: NetworkSpec, family: int, address: str, l2: dict | None,
                     have: bytes | None) -> bool:
        """The endpoint's entry by address (`have`, None: none) is not what its veth makes (`l2`: as
        rtnl.link_l2 reads it; TcPrograms.local_entry). A veth whose entry cannot be made (its other end
        unreadable) is not looked at."""
        if not address or not self.tc.local_wanted(spec, family):
            return False
        wanted = self.tc.local_entry(l2)
        return wanted is not None and have != wanted

    def _facts_wrong(self, spec: NetworkSpec, family: int, address: str, index: int,
                     have: bytes | None) -> bool:
        """The endpoint's entry (`have`, None: none) is not what its address and published ports make."""
        return bool(address) and self.tc.facts_wanted(spec, family) and \
            have != ep_maps.value(address, spec.published(address))

    def _repair_ports6(self, specs: Sequence[NetworkSpec], saved6, still_wanted) -> list[Repair]:
        """The IPv6 published ports (ip6tables nat, vpcnet.datapath.ports6) of every network, in one
        transaction; a network without any loses chains it still has. Nothing to read without ip6tables."""
        if saved6 is None:
            return []
        from vpcnet.datapath import ports6
        drifted = [spec for spec in specs if ports6.diff(saved6, [spec])[1]]
        if still_wanted is not None:
            drifted = [spec for spec in drifted if still_wanted(spec.tag)]
        if not drifted:
            return []
        try:
            problems = self.ports6.apply(drifted, saved6)
        except DataplaneError as exc:
            log.error("cannot repair the IPv6 published ports: %s", exc)
            self.unrepaired += [spec.tag for spec in drifted]
            return []
        return [Repair("firewall", next((s.tag for s in drifted if s.tag in p), "-"), p) for p in problems]

    def _adopt_counting(self, networks: Sequence[tuple[NetworkSpec, Sequence[EndpointSpec]]], view: KernelView,
                        lock_for: Callable[[NetworkSpec], ContextManager] | None) -> None:
        """Where the peer map is this process's own (vpcnet.datapath.ebpf.maps.local: no CAP_SYS_ADMIN), the
        counting programs another process attached (before a restart) write a map this one cannot read:
        attach them again (replaced in place, no gap), so they write this process's. Not drift: no Repair."""
        adopted = 0
        v6 = {e.host_veth: e.address for e in self.ipv6_endpoints()}
        for spec, endpoints in networks:
            stale = [ep for ep in endpoints if ep.address and ep.host_veth in view.links
                     and view.links[ep.host_veth]["index"] not in self.tc.counted]
            uplinks = spec.ebpf and spec.ipv4 and spec.tc_name not in self.tc.counted_uplinks
            if not stale and not uplinks:
                continue
            try:
                with (lock_for(spec) if lock_for else _no_lock()):
                    with self.nl.ipr() as ipr:
                        for ep in stale:
                            index = self.nl.link_index(ipr, ep.host_veth)
                            if index is None:
                                continue
                            for address in (ep.address, v6.get(ep.host_veth, "")):
                                if address:
                                    self.tc.attach_for(ipr, spec, index, address)
                            adopted += 1
                        anchor = self.nl.link_index(ipr, spec.bridge) if uplinks else None
                    if anchor is not None:
                        self.tc.ensure_uplink_programs(spec, anchor)
            except NetworkGone:
                continue
            except Exception as exc:              # the normal repair below still runs
                log.warning("network %s: cannot attach the peer counting programs again: %s", spec.tag, exc)
        if adopted:
            log.info("peer counting: %d endpoint(s) now count into this process's map", adopted)

    def _adopt_endpoint(self, spec: NetworkSpec, ep: EndpointSpec, host_idx: int) -> None:
        """An endpoint whose entries this process never wrote (its programs and entries are another
        process's: the one before a restart or a kill -9, or another worker): its entries written here and
        this process's shared programs attached (replaced in place: no gap). Not drift: no Repair."""
        address6 = self._v6_addresses.get(ep.host_veth, "")
        with self.nl.ipr() as ipr:
            for address in (ep.address, address6):
                if address:
                    self.tc.attach_for(ipr, spec, host_idx, address)
        log.debug("endpoint %s: its eBPF entries and programs taken over by this process", ep.host_veth)

    def _local_suspect(self, spec: NetworkSpec, address: str, address6: str, host: dict, view: KernelView) -> bool:
        """An entry by address of the endpoint is not what its veth (`host`, as dump_links read it) makes:
        its other end's MAC read here (one targeted request per endpoint and pass, only where the map is
        wanted)."""
        wanted = [(family, a) for family, a in ((4, address), (6, address6))
                  if a and self.tc.local_wanted(spec, family)]
        if not wanted:
            return False
        try:
            peer = rtnl.peer_mac(self.nl.rtnl(), host.get("peer"), host.get("peer_netnsid"))
        except OSError:
            self.nl.drop_rtnl()
            return True                           # unreadable now: looked at again under the lock
        l2 = dict(host, peer_mac=peer)
        return any(self._local_wrong(spec, family, a, l2, view.local.get((family, ipaddress.ip_address(a).packed)))
                   for family, a in wanted)

    def _link_l2(self, index: int) -> dict | None:
        """rtnl.link_l2 of link `index` (one targeted read), as _local_wrong compares it; None: gone."""
        try:
            return rtnl.link_l2(self.nl.rtnl(), index)
        except OSError as exc:
            self.nl.drop_rtnl()
            raise DataplaneError(f"cannot read link {index}: {exc}") from None

    def _ipv6_on(self, link: dict | None) -> bool:
        """The link (as rtnl.dump_links read it) has IPv6 not as IPV6_OFF wants, and that can be put right."""
        return link is not None and link.get("ipv6") not in (None, IPV6_OFF_VIEW) and self.links.ipv6_settable

    def _suspect(self, spec: NetworkSpec, endpoints: Sequence[EndpointSpec], view: KernelView) -> bool:
        link = view.links.get(spec.bridge)
        if link is None or not link["up"] or link["mtu"] != spec.mtu:
            return True
        if (self._ipv6_on(link) and not spec.bridged_ipv6) or \
                (spec.routed and self._ipv6_on(view.links.get(anchor_peer(spec.bridge)))):
            return True
        if spec.ipv4 and f"{spec.gateway}/{spec.prefixlen}" not in view.addresses.get(link["index"], set()):
            return True
        if spec.ebpf and spec.ipv4 and view.uplink_programs.get(spec.tc_name, set()) != set(view.uplinks):
            return True
        if spec.ebpf and spec.host_cidr_v6 and view.uplink_programs.get(spec.tc_name6, set()) != set(view.uplinks):
            return True
        if spec.ebpf and spec.tag not in self.tc.own_uplinks:
            return True                           # another process's uplink programs (before a restart)
        for ep in endpoints:
            host = view.links.get(ep.host_veth)
            if host is None:
                continue                          # no veth: the container is gone, Docker will say so
            if not spec.routed and host["master"] != link["index"]:
                return True
            if not spec.routed and ep.address and not self._guarded(host["index"], self._guard_of(ep)):
                return True
            if spec.routed and ep.address and view.routes.get(f"{ep.address}/32") != host["index"]:
                return True
            if (spec.ebpf or self.tc.peers) and ep.address and host["index"] not in view.clsact:
                return True
            address6 = self._v6_addresses.get(ep.host_veth, "")
            if any(self._facts_wrong(spec, family, address, host["index"], view.facts.get((family, host["index"])))
                   for family, address in ((4, ep.address), (6, address6))):
                return True
            if self._local_suspect(spec, ep.address, address6, host, view):
                return True
            if self._ipv6_on(host) and ep.host_veth not in self._v6_veths:
                return True
        return False

    def _guard_of(self, ep: EndpointSpec) -> GuardFacts:
        """What a bridge-mode endpoint's anti-spoofing filter must hold (its IPv6 address as of the last
        repair's reading of the rows)."""
        return GuardFacts(ep.mac, ep.address, self._bridged6.get(ep.host_veth, ""))

    def _guarded(self, index: int, facts: GuardFacts) -> bool:
        """Bridge mode: the endpoint's anti-spoofing guard is in place (one small netlink request; a failed
        read makes the network a suspect, looked at again under its lock)."""
        try:
            return self.tc.has_guard(index, facts)
        except DataplaneError:
            return False

    def _repair_network(self, spec: NetworkSpec, endpoints: Sequence[EndpointSpec]) -> list[Repair]:
        """Under the network's lock: a targeted look at each piece, repaired where still wrong."""
        repairs: list[Repair] = []
        with self.nl.ipr() as ipr:
            idx = self.nl.link_index(ipr, spec.bridge)
            state = ipr.link("get", index=idx)[0] if idx is not None else None
            addrs = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)} \
                if idx is not None else set()
            uplinks = self.nl.all_uplinks(ipr)
            programs = self.tc.network_uplinks(ipr, spec) if spec.ebpf and spec.ipv4 else set()
        what = "anchor" if spec.routed else "bridge"
        if state is None:
            repairs.append(Repair("link", spec.tag, f"{what} {spec.bridge} missing"))
        elif not state["flags"] & 1:
            repairs.append(Repair("link", spec.tag, f"{what} {spec.bridge} down"))
        elif state.get_attr("IFLA_MTU") != spec.mtu:
            repairs.append(Repair("link", spec.tag, f"{what} {spec.bridge} has MTU {state.get_attr('IFLA_MTU')}"))
        elif spec.ipv4 and f"{spec.gateway}/{spec.prefixlen}" not in addrs:
            repairs.append(Repair("address", spec.tag, f"gateway {spec.gateway} missing on {spec.bridge}"))
        elif spec.ebpf and spec.ipv4 and programs != set(uplinks):
            repairs.append(Repair("tc", spec.tag, f"uplink programs on links {sorted(programs)}, default "
                                                   f"route on {sorted(uplinks)}"))
        if repairs:
            self._ensure_links(spec)          # rebuilds what is missing, accepts what is there
        elif spec.ebpf and idx is not None and spec.tag not in self.tc.own_uplinks:
            # Another process's uplink programs (before a restart): they read its map of this host's
            # endpoints, which nobody updates any more; this process's take their place (replaced in place,
            # no gap). Not drift: no Repair.
            self.tc.ensure_uplink_programs(spec, idx)
        # The endpoints' programs know the uplinks too (only those take other hosts' traffic): rebuilt
        # with the new ones when the default route moved.
        moved = spec.ebpf and spec.ipv4 and state is not None and programs != set(uplinks)
        if not repairs and not spec.bridged_ipv6:
            ipv6 = self.links.ipv6_off([spec.bridge, anchor_peer(spec.bridge)] if spec.routed else [spec.bridge])
            if ipv6:
                repairs.append(Repair("link", spec.tag, f"IPv6 on for {what} {spec.bridge} ({', '.join(ipv6)})"))
        for ep in endpoints:
            repairs += self._repair_endpoint(spec, ep, moved)
        return repairs

    def _repair_endpoint(self, spec: NetworkSpec, ep: EndpointSpec, uplinks_moved: bool = False) -> list[Repair]:
        with self.nl.ipr() as ipr:
            host_idx = self.nl.link_index(ipr, ep.host_veth)
            if host_idx is None:
                return []
            link = ipr.link("get", index=host_idx)[0]
            problem = ""
            if not spec.routed:
                master = self.nl.link_index(ipr, spec.bridge)
                if link.get_attr("IFLA_MASTER") != master:
                    problem = f"host veth {ep.host_veth} of {ep.address} not on bridge {spec.bridge}"
                elif ep.address and not self.tc.has_guard(host_idx, self._guard_of(ep)):
                    problem = f"anti-spoofing filter for {ep.address} on {ep.host_veth} missing or out of date"
            elif ep.address:                  # an IPv6-only endpoint: no /32, no program (_repair_ipv6's)
                if self.links.routed_via(ipr, ep.address) != host_idx:
                    problem = f"route {ep.address}/32 dev {ep.host_veth} missing"
                elif spec.ebpf and not self.tc.endpoint_has_program(ipr, host_idx):
                    problem = f"eBPF program on {ep.host_veth} missing"
            if not problem and self.tc.peers and ep.address and not self.tc.endpoint_counts(ipr, host_idx):
                problem = f"eBPF peer counting program on {ep.host_veth} missing"
            if not problem and spec.ebpf and spec.host_cidr_v6 and ep.host_veth in self._v6_veths \
                    and not self.tc.endpoint_has_program6(ipr, host_idx):
                problem = f"eBPF IPv6 program on {ep.host_veth} missing"
            if not problem and not link["flags"] & 1:
                problem = f"host veth {ep.host_veth} down"
            if not problem and uplinks_moved and ep.address:
                problem = f"eBPF program on {ep.host_veth} made for the old uplinks"
            adopt = False
            l2 = None
            for family, address in ((4, ep.address), (6, self._v6_addresses.get(ep.host_veth, ""))):
                have = self.tc.facts.lookup(family, host_idx)
                if problem or not self._facts_wrong(spec, family, address, host_idx, have):
                    continue
                if (family, host_idx) in self.tc.facts.written:
                    problem = f"eBPF map entry of {address} on {ep.host_veth} {'missing' if have is None else 'stale'}"
                else:
                    adopt = True          # another process's (before a restart, another worker): taken over
            for family, address in ((4, ep.address), (6, self._v6_addresses.get(ep.host_veth, ""))):
                if problem or adopt or not address or not self.tc.local_wanted(spec, family):
                    continue
                if l2 is None:
                    l2 = self._link_l2(host_idx)
                have = self.tc.facts.lookup_local(address)
                if not self._local_wrong(spec, family, address, l2, have):
                    continue
                if (family, host_idx) in self.tc.facts.local:
                    problem = (f"eBPF local endpoint entry of {address} on {ep.host_veth} "
                               f"{'missing' if have is None else 'stale'}")
                else:
                    adopt = True
        if adopt and not problem:
            self._adopt_endpoint(spec, ep, host_idx)
            return []
        if not problem and ep.host_veth in self._v6_veths:
            return []                         # IPv6 on by design: _repair_ipv6 looks after it
        if not problem:
            ipv6 = self.links.ipv6_off([ep.host_veth])
            return [Repair("link", spec.tag, f"IPv6 on for host veth {ep.host_veth} of {ep.address} "
                                             f"({', '.join(ipv6)})")] if ipv6 else []
        v6 = next((e for e in self.ipv6_endpoints() if e.host_veth == ep.host_veth), None)
        self.ensure_endpoint(spec, ep.host_veth, ep.peer_veth, ep.mac, ep.address, ipv6=v6 is not None)
        if v6 is not None:                    # its IPv6, as wanted
            self.ensure_endpoint_ipv6(spec, ep.host_veth, v6.address)
        kind = "route" if "route" in problem else "tc" if "eBPF" in problem or "filter" in problem else "link"
        return [Repair(kind, spec.tag, problem)]
