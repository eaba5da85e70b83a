"""The firewall, read with `iptables -S`: vpcnet's jump from FORWARD comes before anything that can drop
its traffic (following jumps a few chains deep), every chain and jump vpcnet writes is there, the
isolation chains name this host's uplinks (cluster traffic by any other interface is refused), and a host
that forwards does not do it for everything (FORWARD's policy ACCEPT). The IPv6 guard, read with
`ip6tables-save` and /proc/sys: the raw chain VPCNET-IPV6 holds its drops and raw PREROUTING jumps to it,
and vpcnet's links have IPv6 off."""
from __future__ import annotations

import os
import subprocess
from typing import Callable

from vpcnet.cli.doctor.findings import Checks, Finding, ok, problem


def _iptables(table: str, *args: str, binary: str = "iptables") -> subprocess.CompletedProcess:
    return subprocess.run([binary, "-w", "10", "-t", table, "-S", *args], capture_output=True, text=True,
                          timeout=30)


def _rules(table: str, chain: str) -> list[list[str]] | None:
    """`iptables -S chain` split into words per line; None when the chain does not exist."""
    proc = _iptables(table, chain)
    if proc.returncode != 0:
        return None
    return [line.split() for line in proc.stdout.splitlines()]


def _target(rule: list[str]) -> str:
    for flag in ("-j", "-g"):
        if flag in rule:
            return rule[rule.index(flag) + 1]
    return ""


def _blind_to(rule: list[str], ours: Callable[[str], bool]) -> bool:
    """The rule matches a named interface (`-i X` / `-o X`, not negated) that vpcnet's traffic never
    uses, so whatever it does cannot touch that traffic (Docker's `-o docker0 -j DROP` and the like)."""
    for i, word in enumerate(rule[:-1]):
        if word in ("-i", "-o") and (i == 0 or rule[i - 1] != "!") and not ours(rule[i + 1]):
            return True
    return False


class FirewallChecks(Checks):
    def check_firewall(self) -> list[Finding]:
        from vpcnet.datapath.firewall import FORWARD_CHAIN, NAT_CHAIN, RAW_CHAIN
        from vpcnet.datapath.reconciler import spec_of

        out = []
        forward = _rules("filter", "FORWARD")
        if forward is None:
            return [problem("firewall", "cannot read the FORWARD chain (`iptables -S FORWARD` failed)",
                            "install iptables and run doctor as root")]
        policy = next((r[2] for r in forward if r[:2] == ["-P", "FORWARD"]), "?")
        out += self._forward_policy(policy)
        out += self._first_jump("filter", "FORWARD", FORWARD_CHAIN, forward, policy)
        for table, parent, chain in (("nat", "POSTROUTING", NAT_CHAIN), ("raw", "PREROUTING", RAW_CHAIN)):
            rules = _rules(table, parent) or []
            if not any(r[:2] == ["-A", parent] and _target(r) == chain for r in rules):
                out.append(problem("firewall", f"no jump from {table} {parent} to {chain}",
                                   "restart the plugin: it re-creates its chains and jumps at start"))
        for net in self.ctx.networks:
            spec = spec_of(net)
            for table, parent, chain in (("filter", FORWARD_CHAIN, spec.filter_chain),
                                         ("raw", RAW_CHAIN, spec.raw_chain)):
                parent_rules = _rules(table, parent) or []
                if _rules(table, chain) is None or not any(_target(r) == chain for r in parent_rules):
                    out.append(problem("firewall", f"network {net.network_id[:12]}: chain {table} {chain} missing "
                                                   f"or not jumped to from {parent}",
                                       "restart the plugin: it restores every known network's rules"))
        return out + self._published() + self._isolation()

    def _published(self) -> list[Finding]:
        """The published ports: nat PREROUTING and OUTPUT jump to VPCNET-DNAT, and each network's
        VPCNET-P-<id12> holds exactly the DNAT rules of its endpoints' ports (the store's rows); the same in
        ip6tables for the IPv6 ones (vpcnet.datapath.ports6)."""
        from vpcnet.datapath import ports6
        from vpcnet.datapath.firewall import MORE_PARENTS
        from vpcnet.datapath.modes import strategy
        from vpcnet.datapath.reconciler import spec_of

        store = self.ctx.store
        try:
            rows = store.ports() if store is not None else []
        except Exception:             # a state written before schema 5: nothing published
            rows = []
        out = []
        families = {p.family for p in rows}
        jumps = [("iptables", table, parent, builtin, jump) for (table, parent), parent_jumps in MORE_PARENTS.items()
                 for builtin, jump in parent_jumps]
        if "ipv6" in families:
            jumps += [("ip6tables", "nat", parent, builtin, jump) for parent, parent_jumps in ports6.HOST_JUMPS.items()
                      for builtin, jump in parent_jumps]
        for binary, table, parent, builtin, jump in jumps:
            have = _iptables(table, builtin, binary=binary).stdout.splitlines()
            if f"-A {builtin} {jump}" not in have:
                shown = "ip6tables " if binary == "ip6tables" else ""
                out.append(problem("firewall", f"no jump from {shown}{table} {builtin} to {parent} (published "
                                               "ports do not answer)",
                                   "restart the plugin: it re-creates its chains and jumps at start"))
        count = 0
        for net in self.ctx.networks:
            spec = spec_of(net, [p for p in rows if p.endpoint_id in
                                 {ep.endpoint_id for ep in self.ctx.endpoints if ep.network_id == net.network_id}])
            for family, binary in (("ipv4", "iptables"), ("ipv6", "ip6tables")):
                mine = [p for p in spec.ports if p.family == family]
                if not mine:
                    continue
                rules = strategy(spec.mode).firewall(spec) if family == "ipv4" else ports6.wanted(spec)
                wanted = rules.chains[("nat", spec.ports_chain)] if rules is not None else []
                proc = _iptables("nat", spec.ports_chain, binary=binary)
                have = [line.split(" ", 2)[2] for line in proc.stdout.splitlines() if line.startswith("-A ")]
                count += len(mine)
                if proc.returncode != 0 or have != wanted:
                    missing = [str(p) for p, r in zip(mine, wanted, strict=True) if r not in have]
                    shown = "ip6tables " if binary == "ip6tables" else ""
                    out.append(problem("firewall", f"network {net.network_id[:12]}: {shown}nat chain "
                                                   f"{spec.ports_chain} does not hold its published ports "
                                                   f"({', '.join(missing) or 'other rules too'})",
                                       "wait for the datapath pass (VPCNET_DATAPATH_INTERVAL), or restart the plugin"))
        if count and not out:
            out.append(ok("firewall", f"{count} published port(s) in place" +
                          (" (IPv4 and IPv6)" if families == {"ipv4", "ipv6"} else "")))
        return out

    def _isolation(self) -> list[Finding]:
        """The isolation chains hold what vpcnet.datapath.firewall.isolation_chains wants for this host's
        uplinks now (a stale uplink there refuses the cluster traffic of the new one), and mangle FORWARD
        jumps to the ingress guard."""
        from vpcnet.datapath.firewall import GUARD_JUMPS, GUARD_TABLE, isolation_chains

        if not self.ctx.networks:
            return []
        uplinks = sorted(u for u in self._uplink_names() if u)
        for (table, chain), wanted in isolation_chains(uplinks).items():
            have = _rules(table, chain)
            text = [" ".join(r[2:]) for r in have or [] if r[:2] == ["-A", chain]]
            if text != wanted:
                return [problem("isolation", f"{table} chain {chain} " + ("missing" if have is None else
                                f"does not match this host's uplinks ({', '.join(uplinks) or 'none'})") +
                                ": cluster traffic by an uplink it misses is refused",
                                "wait for the next datapath pass (VPCNET_DATAPATH_INTERVAL), or restart the plugin")]
        forward = [" ".join(r[2:]) for r in _rules(GUARD_TABLE, "FORWARD") or [] if r[:2] == ["-A", "FORWARD"]]
        missing = [jump for jump in GUARD_JUMPS if jump not in forward]
        if missing:
            return [problem("isolation", f"{GUARD_TABLE} FORWARD has no rule '{missing[0]}': a Docker bridge "
                                         "network's rules may let new connections into vpcnet's containers",
                            "wait for the next datapath pass (VPCNET_DATAPATH_INTERVAL), or restart the plugin")]
        return [ok("isolation", f"cluster traffic enters and leaves by vpcnet's links and the uplinks "
                                f"({', '.join(uplinks) or 'none'}) only")]

    @staticmethod
    def _forward_policy(policy: str) -> list[Finding]:
        """Forwarding on with FORWARD's policy ACCEPT: the host routes between any two of its interfaces.
        vpcnet sets DROP where it turns forwarding on itself (as Docker does); where it found forwarding on,
        someone else decided, so it only says so here."""
        with open("/proc/sys/net/ipv4/ip_forward") as fh:
            forwarding = fh.read().strip() == "1"
        if forwarding and policy == "ACCEPT":
            return [problem("forward_policy", "net.ipv4.ip_forward is 1 and the filter FORWARD policy is ACCEPT: "
                                              "this host forwards between any two of its interfaces, not only "
                                              "vpcnet's traffic",
                            "iptables -P FORWARD DROP (vpcnet's chain accepts its own networks' traffic; Docker "
                            "does this itself when it turns forwarding on)")]
        return [ok("forward_policy", f"FORWARD policy {policy} with net.ipv4.ip_forward={int(forwarding)}")]

    def _first_jump(self, table: str, parent: str, chain: str, rules: list[list[str]], policy: str) -> list[Finding]:
        appended = [r for r in rules if r[:2] == ["-A", parent]]
        index = next((i for i, r in enumerate(appended) if _target(r) == chain and len(r) == 4), None)
        if index is None:
            return [problem("forward_chain", f"FORWARD (policy {policy}) has no jump to {chain}: container "
                                             "traffic is not accepted by vpcnet's rules",
                            f"iptables -I FORWARD 1 -j {chain}, or restart the plugin")]
        for position, rule in enumerate(appended[:index], 1):
            target = _target(rule)
            if _blind_to(rule, self._our_interface):
                continue
            if target in ("DROP", "REJECT") or (target not in ("ACCEPT", "RETURN", "LOG", "")
                                                and self._may_drop(table, target, depth=3)):
                return [problem("forward_chain", f"FORWARD rule {position} (`{' '.join(rule[2:])}`) can drop "
                                                 f"traffic before the jump to {chain} (rule {index + 1})",
                                f"move vpcnet's jump first: iptables -D FORWARD -j {chain} && "
                                f"iptables -I FORWARD 1 -j {chain}")]
        return [ok("forward_chain", f"FORWARD policy {policy}; the jump to {chain} is rule {index + 1}, "
                                    "before anything that drops")]

    def _may_drop(self, table: str, chain: str, depth: int) -> bool:
        rules = _rules(table, chain)
        if rules is None or depth == 0:
            return rules is not None
        for rule in rules:
            target = _target(rule)
            if rule[:1] == ["-A"] and not _blind_to(rule, self._our_interface) and (target in ("DROP", "REJECT") or (
                    target not in ("ACCEPT", "RETURN", "LOG", "") and self._may_drop(table, target, depth - 1))):
                return True
        return False

    def _our_interface(self, name: str) -> bool:
        """An interface vpcnet's traffic may cross: its bridges, anchors and veths, or the uplink."""
        if name.rstrip("+").startswith(("vpc-", "vpp-", "vh")) or name in ("+", ""):
            return True
        uplinks = self._uplink_names()
        return name.rstrip("+") in uplinks or any(u and u.startswith(name.rstrip("+"))
                                                  for u in uplinks if name.endswith("+"))

    def _uplink_names(self) -> set[str | None]:
        """The default route's devices and VPCNET_UPLINKS, read once."""
        if not hasattr(self, "_uplinks"):
            from pyroute2 import IPRoute

            from vpcnet.datapath.netlink import Netlink

            with IPRoute() as ipr:
                names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
                extra = getattr(self.ctx.config, "uplinks", ())       # VPCNET_UPLINKS (no config: none)
                self._uplinks = {names.get(i) for i in Netlink.uplinks(ipr)} | set(extra)
        return self._uplinks

    def check_ipv6_guard(self) -> list[Finding]:
        """A container's IPv6 (router advertisements above all) must not reach the host through vpcnet's
        links: ip6tables raw VPCNET-IPV6 drops it, and the links have disable_ipv6=1 where /proc/sys can
        be written (not in a managed plugin built without the host-sys-net mount: there the ip6tables guard
        alone stands)."""
        from vpcnet.datapath.firewall import IPV6_CHAIN, IPV6_RULES, Ipv6Guard
        from vpcnet.datapath.ipv6 import Ipv6Endpoint, forward_rules, guard_rules
        from vpcnet.errors import DataplaneError

        if not os.path.exists("/proc/net/if_inet6"):
            return [ok("ipv6_guard", "this kernel has no IPv6: nothing to guard")]
        guard = Ipv6Guard()
        try:
            saved = guard.table.save()
        except DataplaneError as exc:
            return [problem("ipv6_guard", f"cannot read the IPv6 firewall ({exc}): whether a container's IPv6 "
                                          "reaches this host is unknown",
                            f"install {guard.table.iptables} (Debian: the iptables package) and run doctor "
                            "as root")]
        # IPv6 endpoints (dual-stack networks): their own traffic is let through, and their links keep IPv6 on
        bridges = {n.network_id: n.bridge for n in self.ctx.networks if n.mode == "bridge"}
        v6 = [Ipv6Endpoint(ep.host_veth, ep.address_v6, bridges.get(ep.network_id, ""))
              for ep in self.ctx.endpoints if getattr(ep, "address_v6", "")]
        bridged = [ep for ep in v6 if ep.bridge]
        routed = len(bridged) < len(v6)
        internal = [(n.host_cidr_v6, n.cluster_cidr_v6) for n in self.ctx.networks if n.internal and n.host_cidr_v6]
        missing, _ = Ipv6Guard.diff(saved, guard_rules(routed, bool(bridged)),
                                    forward_rules(routed, [u for u in self._uplink_names() if u], internal,
                                                  bool(bridged)))
        if missing:
            by_hand = "; ".join([f"ip6tables -t raw -N {IPV6_CHAIN} (-F if it exists)",
                                 *(f"ip6tables -t raw -A {IPV6_CHAIN} {r}" for r in IPV6_RULES),
                                 f"ip6tables -t raw -I PREROUTING 1 -j {IPV6_CHAIN}"])
            return [problem("ipv6_guard", "; ".join(missing) + ": a container's IPv6 (router advertisements "
                                          "included) reaches this host unfiltered",
                            "restart the plugin (it writes the guard at start and repairs it every datapath "
                            f"pass; its log says why it could not), or by hand: {by_hand}")]
        wanted_on = {ep.host_veth for ep in v6 if not ep.bridge} | \
            {n.bridge for n in self.ctx.networks if n.mode == "bridge" and getattr(n, "host_cidr_v6", "")}
        on = [name for name in _ipv6_on_links() if name not in wanted_on]
        if on and self.ctx.plugin is None:
            return [problem("ipv6_guard", f"IPv6 is on on vpcnet link(s) {', '.join(on[:5])}"
                                          + (f" and {len(on) - 5} more" if len(on) > 5 else "")
                                          + f" (the ip6tables chain {IPV6_CHAIN} still drops their IPv6)",
                            "restart the plugin (it turns IPv6 off on its links; its log says why it could "
                            f"not), or: sysctl -w net.ipv6.conf.{on[0]}.disable_ipv6=1 for each")]
        return [ok("ipv6_guard", f"ip6tables raw {IPV6_CHAIN} drops IPv6 from vpcnet's links"
                                 + (f"; {len(on)} link(s) keep IPv6 on (a plugin without the host-sys-net mount)"
                                    if on else ""))]


def _ipv6_on_links() -> list[str]:
    """vpcnet's links (bridges, anchors and their peers, host veths) whose disable_ipv6 is 0."""
    from vpcnet.datapath.firewall import IPV6_LINKS

    prefixes = tuple(p.rstrip("+") for p in IPV6_LINKS)
    on = []
    for name in sorted(os.listdir("/sys/class/net")):
        if not name.startswith(prefixes):
            continue
        try:
            with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6") as fh:
                if fh.read().strip() == "0":
                    on.append(name)
        except OSError:           # gone meanwhile, or no IPv6 on it at all
            continue
    return on
