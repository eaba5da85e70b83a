"""Published ports on the host's IPv6 addresses: the ip6tables half of a network's published ports (the
`ipv6` rows of its `spec.ports`), beside the iptables half vpcnet.datapath.modes computes.

The same shape as IPv4's, in ip6tables' nat table:
- the host-wide chain `VPCNET-DNAT`, jumped to from PREROUTING and OUTPUT for the host's own addresses
  (`-m addrtype --dst-type LOCAL`; OUTPUT never for ::1, which the kernel never routes out);
- per network with IPv6 ports `VPCNET-P-<tag>`: one DNAT per host port, to `[container IPv6]:port`
  (`-d <address>/128` for a port published on one address);
- per network `VPCNET-N-<tag>`, jumped to from `VPCNET-POSTROUTING` (itself from POSTROUTING): the hairpin,
  a container reaching its own published port through the host's address is masqueraded so the reply
  comes back by the host. Nothing else: vpcnet does no NAT66 (a container's IPv6 leaves with its own
  address).
No raw rule is needed: vpcnet never marks IPv6 NOTRACK, so the replies are tracked and un-DNATed by
conntrack. The filter side is the guard's `VPCNET-FORWARD6` (vpcnet.datapath.ipv6.forward_rules), which
accepts a DNATed connection to a container whatever link it came by.

`Ports6.apply` is one ip6tables-save and, when something differs, one ip6tables-restore --noflush holding
every chain and jump that differs (the same transaction for all of a network's IPv6 ports, and for every
drifted network of a repair pass). It names only its own chains (`VPCNET-P-`/`VPCNET-N-` of the nat
table), so other ip6tables chains of a network are none of its business.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from vpcnet.datapath.firewall import ATTEMPTS, DNAT_CHAIN, NAT_CHAIN, FirewallTable, NetworkRules, Saved, _drop, rule
from vpcnet.datapath.spec import NetworkSpec
from vpcnet.errors import DataplaneError

log = logging.getLogger(__name__)

# builtin chain -> the jump to vpcnet's chain, as ip6tables-save prints it
HOST_JUMPS = {DNAT_CHAIN: [("PREROUTING", f"-m addrtype --dst-type LOCAL -j {DNAT_CHAIN}"),
                           ("OUTPUT", f"! -d ::1/128 -m addrtype --dst-type LOCAL -j {DNAT_CHAIN}")],
              NAT_CHAIN: [("POSTROUTING", f"-j {NAT_CHAIN}")]}


def wanted(spec: NetworkSpec) -> NetworkRules | None:
    """The network's IPv6 published ports as ip6tables nat rules, or None when it has none."""
    ports = [p for p in spec.ports if p.family == "ipv6"]
    if not ports:
        return None
    comment = f"vpcnet {spec.tag}"
    published = sorted({(p.address, p.proto, p.container_port) for p in ports})
    chains = {
        ("nat", spec.ports_chain): [
            rule(dst=f"{p.host_ip}/128" if p.host_ip else "", match=f"-p {p.proto} -m {p.proto} --dport {p.host_port}",
                 comment=comment, target=f"DNAT --to-destination [{p.address}]:{p.container_port}") for p in ports],
        ("nat", spec.nat_chain): [
            rule(src=f"{address}/128", dst=f"{address}/128", match=f"-p {proto} -m {proto} --dport {port}",
                 comment=comment, target="MASQUERADE") for address, proto, port in published],
    }
    links = [("nat", DNAT_CHAIN, rule(target=spec.ports_chain)), ("nat", NAT_CHAIN, rule(target=spec.nat_chain))]
    return NetworkRules(tag=spec.tag, chains=chains, links=links)


def diff(saved: Saved, specs: Sequence[NetworkSpec]) -> tuple[list[str], str]:
    """What differs between the kernel (`saved`) and the IPv6 ports of `specs` (a network without any loses
    its chains, if it has them), and the ip6tables-restore script putting it right ("" when none)."""
    problems: list[str] = []
    lines: list[str] = []
    nets = [r for r in (wanted(spec) for spec in specs) if r is not None]
    if nets:
        for parent, jumps in HOST_JUMPS.items():
            if saved.chain("nat", parent) is None:
                problems.append(f"ip6tables nat chain {parent} missing")
                lines.append(f":{parent} - [0:0]")
            for builtin, jump in jumps:
                if jump not in (saved.chain("nat", builtin) or []):
                    problems.append(f"ip6tables nat {builtin} has no jump to {parent}")
                    lines.append(f"-A {builtin} {jump}")
    for net in nets:
        for (_table, chain), rules in net.chains.items():
            have = saved.chain("nat", chain)
            if have != rules:
                problems.append(f"ip6tables nat chain {chain} " + ("missing" if have is None else
                                f"holds {len(have)} rule(s), {sum(r in rules for r in have)} of {len(rules)} wanted"))
                lines += [f":{chain} - [0:0]"] + [f"-A {chain} {r}" for r in rules]
        for _table, chain, r in net.links:
            if r not in (saved.chain("nat", chain) or []):
                problems.append(f"ip6tables nat {chain} has no rule '{r}'")
                lines.append(f"-A {chain} {r}")
    have_ports = {r.tag for r in nets}
    for spec in specs:
        if spec.tag in have_ports:
            continue
        for chain in (spec.ports_chain, spec.nat_chain):
            if saved.chain("nat", chain) is not None:
                problems.append(f"ip6tables nat chain {chain} of no IPv6 published port")
                lines += _drop(saved, "nat", chain)
    return problems, ("*nat\n" + "".join(line + "\n" for line in lines) + "COMMIT\n" if lines else "")


class Ports6:
    """The applier, on the ip6tables FirewallTable the IPv6 guard uses (one lock, one repair-loop canary)."""

    def __init__(self, table: FirewallTable):
        self.table = table

    @staticmethod
    def available() -> bool:
        return os.path.exists("/proc/net/if_inet6")

    def save(self) -> Saved | None:
        """ip6tables' rules, or None where the kernel has no IPv6 or ip6tables cannot be run."""
        if not self.available():
            return None
        try:
            return self.table.save()
        except DataplaneError as exc:
            log.debug("no ip6tables rules to read: %s", exc)
            return None

    def apply(self, specs: Sequence[NetworkSpec], saved: Saved | None = None) -> list[str]:
        """Make ip6tables hold the IPv6 published ports of `specs` (and none of theirs beyond); returns what
        was wrong. Without IPv6 in the kernel nothing is wanted and nothing is done; ip6tables failing where
        IPv6 ports are wanted raises DataplaneError."""
        need = any(p.family == "ipv6" for spec in specs for p in spec.ports)
        if not self.available():
            if need:
                raise DataplaneError("this kernel has no IPv6: the IPv6 published ports cannot be written")
            return []
        with self.table._lock:
            error = ""
            for attempt in range(ATTEMPTS):   # a concurrent writer (another worker) may win
                try:
                    current = saved if saved is not None and attempt == 0 else self.table.save()
                except DataplaneError:
                    if need:
                        raise
                    return []                 # no ip6tables: nothing of vpcnet's there either
                problems, script = diff(current, specs)
                if not script:
                    self.table.loops.seen(current, "")
                    return problems
                proc = self.table._restore(script)
                if proc.returncode == 0:
                    self.table.loops.seen(current, script)
                    return problems
                error = proc.stderr.strip()
            raise DataplaneError(f"{self.table.restore_cmd} failed: {error}")
