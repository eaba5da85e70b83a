"""One strategy per datapath mode: what a network of that mode wants from the kernel's firewall.

- `bridge`: a Linux bridge holds the gateway; the network's traffic is named by the bridge (`-i/-o br`).
- `routed`: no bridge; an anchor holds the gateway, the host routes each container by /32 over its host
  veth. Traffic is named by the host veths (`vh+`) and the network's addresses; the host-wide
  anti-spoofing rule (vpcnet.datapath.firewall.ANTI_SPOOFING) keeps one network's containers from
  sending as another's.
- `ebpf`: routed, plus the tc fast path (vpcnet.datapath.ebpf); the firewall is routed mode's, for the traffic the
  fast path hands back.

Common to all: a filter chain accepting the network's forwarding (Docker sets FORWARD's policy to DROP),
a raw chain marking cluster traffic NOTRACK (stateless accept, never NATed; gateway traffic stays
tracked), and, unless `--internal`, a nat chain masquerading only what leaves the cluster CIDR and the
no-NAT list. The IPv6 drop of vpcnet's links (vpcnet.datapath.firewall.Ipv6Guard) is host-wide, the same
for every mode, and not part of any network's rules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vpcnet.datapath.firewall import FORWARD_CHAIN, HOST_VETHS, NAT_CHAIN, RAW_CHAIN, NetworkRules, rule

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
        c = {"comment": comment}
        if not spec.internal:
            return [self._came(spec, target="ACCEPT", **c), self._goes(spec, target="ACCEPT", **c)]
        return [rule(iif=spec.bridge, oif=spec.bridge, target="ACCEPT", **c),
                self._came(spec, dst=spec.cluster_cidr, target="ACCEPT", **c),
                self._goes(spec, src=spec.cluster_cidr, target="ACCEPT", **c),
                self._came(spec, target="DROP", **c),
                self._goes(spec, target="DROP", **c)]

    def nat_local_return(self, spec: NetworkSpec, comment: str) -> list[str]:
        return [rule(oif=spec.bridge, comment=comment, target="RETURN")]

    def firewall(self, spec: NetworkSpec) -> NetworkRules:
        comment = f"vpcnet {spec.tag}"
        gateway = spec.gateway + "/32"
        chains = {
            ("filter", spec.filter_chain): self.forward_rules(spec, comment),
            ("raw", spec.raw_chain): [
                rule(dst=gateway, comment=comment, target="RETURN"),
                rule(src=gateway, comment=comment, target="RETURN"),
                rule(src=spec.host_cidr, dst=spec.cluster_cidr, comment=comment, target="CT --notrack"),
                rule(src=spec.cluster_cidr, dst=spec.host_cidr, comment=comment, target="CT --notrack")],
        }
        links = [("filter", FORWARD_CHAIN, rule(target=spec.filter_chain)),
                 ("raw", RAW_CHAIN, rule(target=spec.raw_chain))]
        if not spec.internal:
            chains[("nat", spec.nat_chain)] = (
                [rule(dst=dest, comment=comment, target="RETURN") for dest in (spec.cluster_cidr, *spec.no_nat)]
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
            return [self._came(spec, target="ACCEPT", **c), self._goes(spec, target="ACCEPT", **c)]
        # within the host CIDR is covered by "to the cluster" (the host CIDR is inside it)
        return [rule(src=spec.host_cidr, dst=spec.cluster_cidr, iif=HOST_VETHS, target="ACCEPT", **c),
                rule(src=spec.cluster_cidr, dst=spec.host_cidr, oif=HOST_VETHS, target="ACCEPT", **c),
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
