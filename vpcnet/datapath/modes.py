"""One strategy per datapath mode: what a network of that mode wants from the kernel's firewall.

- `bridge`: a Linux bridge holds the gateway; the network's traffic is named by the bridge (`-i/-o br`).
  Its anti-spoofing is no rule here: a tc filter per bridge port (vpcnet.datapath.guard).
- `routed`: no bridge; an anchor holds the gateway, the host routes each container by /32 over its host
  veth. Traffic is named by the host veths (`vh+`) and the network's addresses; the host-wide
  anti-spoofing rule (vpcnet.datapath.firewall.ANTI_SPOOFING) keeps one network's containers from
  sending as another's.
- `ebpf`: routed, plus the tc fast path (vpcnet.datapath.ebpf); the firewall is routed mode's, for the traffic the
  fast path hands back.

Common to all: a filter chain sending the network's forwarding to the host-wide isolation chains
(vpcnet.datapath.firewall.isolation_chains; docs/datapath.md, Isolation): what leaves the network goes to
`VPCNET-EGRESS`, accepted towards vpcnet's links and the uplinks, else left to FORWARD's later rules
(Docker's: a Docker bridge's published port answers, its unpublished ones do not); what enters it goes to
`VPCNET-INGRESS`, accepted from vpcnet's links and the uplinks or as a reply, else dropped (Docker sets
FORWARD's policy to DROP, so vpcnet's accepts are needed at all). Bridge mode names the network by its
bridge (`-i br -j VPCNET-EGRESS`, `-o br -j VPCNET-INGRESS`), the routed modes by the host veths and the
host CIDR (`-s host_cidr -i vh+ -j VPCNET-EGRESS`, `-d host_cidr -o vh+ -j VPCNET-INGRESS`). `--internal`
keeps both to the cluster CIDR and drops the rest of the network's traffic (and bridge mode accepts
`-i br -o br` first). Then a raw chain marking cluster traffic NOTRACK (stateless accept, never NATed;
gateway traffic stays tracked), and, unless `--internal`, a nat chain masquerading only what leaves the
cluster CIDR and the no-NAT list.

Published ports (`-p`, the spec's `ports`): a nat chain `VPCNET-P-<tag>` (jumped to from the host-wide
`VPCNET-DNAT`, itself jumped to from PREROUTING and OUTPUT for the host's own addresses) DNATs each host
port to its container; the raw chain keeps the replies of each published container port tracked (RETURN
ahead of the NOTRACK rules, so conntrack un-DNATs them also towards the cluster CIDR), and the nat chain
masquerades a container's connection to its own published port (hairpin). The isolation chains accept a
DNATed connection whatever link it came by (vpcnet.datapath.firewall). These are the IPv4 ports; the IPv6
ones are the same in ip6tables (vpcnet.datapath.ports6).

The IPv6 drop of vpcnet's links (vpcnet.datapath.firewall.Ipv6Guard), and the rules letting IPv6 endpoints
through it (vpcnet.datapath.ipv6: a reverse-path check for the routed modes, a rule per endpoint and bridge
port for bridge mode), are host-wide, one ip6tables transaction, and not part of any network's rules; so are
an --internal network's IPv6 rules (vpcnet.datapath.ipv6.forward_rules). An IPv6-only network
(`--ipv4=false`) has no rules here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vpcnet.datapath.firewall import (
    DNAT_CHAIN,
    EGRESS_CHAIN,
    FORWARD_CHAIN,
    HOST_VETHS,
    INGRESS_CHAIN,
    NAT_CHAIN,
    RAW_CHAIN,
    NetworkRules,
    rule,
)

if TYPE_CHECKING:
    from vpcnet.datapath.spec import NetworkSpec


class BridgeMode:
    name = "bridge"
    routed = False
    ebpf = False

    def _came(self, spec: NetworkSpec, **kw: str) -> str:
        return rule(iif=spec.bridge, **kw)

    def _goes(self, spec: NetworkSpec, **kw: str) -> str:
        return rule(oif=spec.bridge, **kw)

    def forward_rules(self, spec: NetworkSpec, comment: str) -> list[str]:
        """From the network: on to vpcnet's links and the uplinks (EGRESS_CHAIN), else left to FORWARD's
        later rules; to the network: from those, or a reply (INGRESS_CHAIN, which drops the rest).
        `--internal`: only within the cluster CIDR, the rest dropped here."""
        c = {"comment": comment}
        if not spec.internal:
            return [self._came(spec, target=EGRESS_CHAIN, **c), self._goes(spec, target=INGRESS_CHAIN, **c)]
        return [rule(iif=spec.bridge, oif=spec.bridge, target="ACCEPT", **c),
                self._came(spec, dst=spec.cluster_cidr, target=EGRESS_CHAIN, **c),
                self._goes(spec, src=spec.cluster_cidr, target=INGRESS_CHAIN, **c),
                self._came(spec, target="DROP", **c),
                self._goes(spec, target="DROP", **c)]

    def nat_local_return(self, spec: NetworkSpec, comment: str) -> list[str]:
        return [rule(oif=spec.bridge, comment=comment, target="RETURN")]

    def firewall(self, spec: NetworkSpec) -> NetworkRules:
        if not spec.ipv4:       # IPv6-only: no IPv4 rules (its IPv6 is the host-wide ip6tables chains')
            return NetworkRules(tag=spec.tag)
        comment = f"vpcnet {spec.tag}"
        gateway = spec.gateway + "/32"
        ports = [p for p in spec.ports if p.family == "ipv4"]     # IPv6 ones: ip6tables (vpcnet.datapath.ports6)
        published = sorted({(p.address, p.proto, p.container_port) for p in ports})
        chains = {
            ("filter", spec.filter_chain): self.forward_rules(spec, comment),
            ("raw", spec.raw_chain): [
                rule(dst=gateway, comment=comment, target="RETURN"),
                rule(src=gateway, comment=comment, target="RETURN"),
                # a published port's replies stay tracked: conntrack undoes the DNAT of a client in the
                # cluster CIDR (the request, to a host address, was tracked)
                *[rule(src=f"{address}/32", match=f"-p {proto} -m {proto} --sport {port}", comment=comment,
                       target="RETURN") for address, proto, port in published],
                rule(src=spec.host_cidr, dst=spec.cluster_cidr, comment=comment, target="CT --notrack"),
                rule(src=spec.cluster_cidr, dst=spec.host_cidr, comment=comment, target="CT --notrack")],
        }
        links = [("filter", FORWARD_CHAIN, rule(target=spec.filter_chain)),
                 ("raw", RAW_CHAIN, rule(target=spec.raw_chain))]
        if ports:
            chains[("nat", spec.ports_chain)] = [
                rule(dst=f"{p.host_ip}/32" if p.host_ip else "",
                     match=f"-p {p.proto} -m {p.proto} --dport {p.host_port}", comment=comment,
                     target=f"DNAT --to-destination {p.address}:{p.container_port}")
                for p in ports]
            links.append(("nat", DNAT_CHAIN, rule(target=spec.ports_chain)))
        if not spec.internal:
            chains[("nat", spec.nat_chain)] = (
                # a container reaching its own published port (hairpin): its reply must come back by the host
                [rule(src=f"{address}/32", dst=f"{address}/32", match=f"-p {proto} -m {proto} --dport {port}",
                      comment=comment, target="MASQUERADE") for address, proto, port in published]
                + [rule(dst=dest, comment=comment, target="RETURN") for dest in (spec.cluster_cidr, *spec.no_nat)]
                + self.nat_local_return(spec, comment) + [rule(comment=comment, target="MASQUERADE")])
            links.append(("nat", NAT_CHAIN, rule(src=spec.host_cidr, target=spec.nat_chain)))
        return NetworkRules(tag=spec.tag, chains=chains, links=links)


class RoutedMode(BridgeMode):
    name = "routed"
    routed = True

    def _came(self, spec: NetworkSpec, **kw: str) -> str:
        return rule(src=kw.pop("src", spec.host_cidr), iif=HOST_VETHS, **kw)

    def _goes(self, spec: NetworkSpec, **kw: str) -> str:
        return rule(dst=kw.pop("dst", spec.host_cidr), oif=HOST_VETHS, **kw)

    def forward_rules(self, spec: NetworkSpec, comment: str) -> list[str]:
        c = {"comment": comment}
        if not spec.internal:
            return [self._came(spec, target=EGRESS_CHAIN, **c), self._goes(spec, target=INGRESS_CHAIN, **c)]
        # within the host CIDR is covered by "to the cluster" (the host CIDR is inside it)
        return [self._came(spec, dst=spec.cluster_cidr, target=EGRESS_CHAIN, **c),
                self._goes(spec, src=spec.cluster_cidr, target=INGRESS_CHAIN, **c),
                self._came(spec, target="DROP", **c),
                self._goes(spec, target="DROP", **c)]

    def nat_local_return(self, spec: NetworkSpec, comment: str) -> list[str]:
        return []


class EbpfMode(RoutedMode):
    name = "ebpf"
    ebpf = True


STRATEGIES = {m.name: m for m in (BridgeMode(), RoutedMode(), EbpfMode())}


def strategy(mode: str) -> BridgeMode:
    return STRATEGIES[mode]
