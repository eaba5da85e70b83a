"""eni-prefix addressing (docs/eni-prefix.md): the subnet's (vSwitch's) reserved ranges of type prefix and
the cluster CIDR against them, this host's interface capacity, a growth pause, and an assign whose answer
is still not recorded. The reserved ranges are one read-only listing (`PrefixProvider.reserved_ranges`);
everything else comes from the store as the plugin's prefix passes left it (`PrefixPool.status()`), so
doctor never assigns or releases anything. In route-table addressing there is nothing to check here.

Why the cluster CIDR must be exactly a reserved range: the cloud assigns a prefix from any range of type
prefix of the subnet, and every host treats the cluster CIDR as the network's pool. A range outside the
cluster CIDR can give this host a prefix no network here can use; a cluster CIDR outside every range can
have its blocks taken by other interfaces' addresses, which fragments it.
"""
from __future__ import annotations

import ipaddress
import time
from typing import Callable

from vpcnet.cli.doctor.findings import Checks, Context, Finding, ok, problem

CAPACITY_WARN = 0.8          # share of the interface's prefix slots in use past which doctor warns
STALE_ASSIGN_PASSES = 3      # an assign unanswered for this many passes is one no pass is settling

#: How to reserve a range of type prefix, per provider; {cidr} is the cluster CIDR.
RESERVE = {
    "aliyun": "reserve it in the instance's vSwitch: `aliyun vpc CreateVSwitchCidrReservation --VSwitchId <vsw> "
              "--VSwitchCidrReservationType Prefix --VSwitchCidrReservationCidr {cidr}` (docs/deploy-aliyun.md)",
    "aws": "reserve it in the instance's subnet: `aws ec2 create-subnet-cidr-reservation --subnet-id <subnet> "
           "--cidr {cidr} --reservation-type prefix` (docs/deploy-aws.md)",
}


class PrefixChecks(Checks):
    def __init__(self, ctx: Context, provider_factory: Callable | None = None):
        super().__init__(ctx)
        self._provider_factory = provider_factory

    def _eni_prefix(self) -> bool:
        return self.config.addressing == "eni-prefix"

    def _ranges(self) -> list[tuple[int, str]]:
        """(IP version, cluster CIDR) of each family in use: IPv4, and IPv6 once it is configured or this
        host's state uses it (the pool's own rule)."""
        out = [(4, self.config.cluster_cidr)] if self.config.cluster_cidr else []
        v6 = bool(self.config.cluster_cidr_v6)
        if not v6 and self.ctx.store is not None:
            from vpcnet.routes.prefixes import PrefixPool

            v6 = 6 in PrefixPool(self.config, self.ctx.store).families()
        if v6:
            out.append((6, self.config.default_cluster_cidr_v6))
        return out

    def check_reserved_ranges(self) -> list[Finding]:
        """Per family: the subnet's reserved ranges of type prefix, and the cluster CIDR exactly one."""
        if not self._eni_prefix():
            return [ok("reserved_range", "route-table addressing: no prefix range to check")]
        from vpcnet.cloud.prefixes import make_prefix_provider
        from vpcnet.errors import VpcnetError

        try:
            provider = (self._provider_factory or make_prefix_provider)(self.config)
        except VpcnetError as exc:
            return [problem("reserved_range", f"cannot reach the {self.config.provider} prefix API: {exc}",
                            "fix the setting or credentials named above")]
        out = []
        try:
            for version, cluster in self._ranges():
                try:
                    ranges = provider.reserved_ranges(version)
                except VpcnetError as exc:
                    out.append(problem("reserved_range", f"cannot list the subnet's reserved IPv{version} ranges: "
                                                         f"{exc}", "fix the cause named above"))
                    continue
                out.extend(self._range_findings(version, cluster, ranges))
        finally:
            provider.close()
        return out

    def _range_findings(self, version: int, cluster: str, ranges: list[str] | None) -> list[Finding]:
        reserve = RESERVE.get(self.config.provider, "reserve the cluster CIDR for prefixes in the subnet").format(
            cidr=cluster)
        if ranges is None:
            return [ok("reserved_range", f"cannot tell whether the subnet has a reserved IPv{version} range of "
                                         "type prefix (the listing is not allowed or not answered): check that "
                                         f"{cluster} is one by hand")]
        if not ranges and version == 6:
            # a /64 subnet holds 65,536 /80s: no fragmentation to guard against, the subnet is the range
            return [ok("reserved_range", "the subnet has no reserved IPv6 range of type prefix: /80s come from "
                                         f"its whole IPv6 CIDR, which the cluster CIDR {cluster} must then be")]
        if not ranges:
            return [problem("reserved_range", f"the subnet has no reserved IPv{version} range of type prefix: "
                                              "prefixes come from wherever it has free blocks, outside the cluster "
                                              f"CIDR {cluster} too, and a fragmented subnet has none",
                            reserve)]
        network = ipaddress.ip_network(cluster)
        nets = [ipaddress.ip_network(r) for r in ranges]
        out = []
        outside = [str(r) for r in nets if not _inside(r, network)]
        if not any(_inside(network, r) for r in nets):
            out.append(problem("reserved_range", f"the cluster CIDR {cluster} is inside none of the subnet's "
                                                 f"reserved IPv{version} ranges of type prefix ({', '.join(ranges)})",
                               f"set VPCNET_CLUSTER_CIDR{'_V6' if version == 6 else ''} to one of them on every "
                               f"host, or {reserve}"))
        if outside:
            out.append(problem("reserved_range", f"reserved IPv{version} range(s) {', '.join(outside)} of type "
                                                 f"prefix reach outside the cluster CIDR {cluster}: the cloud may "
                                                 "give this host a prefix there, which no network here can use",
                               f"set VPCNET_CLUSTER_CIDR{'_V6' if version == 6 else ''} to the reserved range "
                               "(the same on every host), or delete the other reservation"))
        return out or [ok("reserved_range", f"the cluster CIDR {cluster} is the subnet's reserved IPv{version} "
                                            "range of type prefix")]

    def check_prefix_pool(self) -> list[Finding]:
        """From the store: capacity left per family, a growth pause, an assign whose answer is not recorded
        for several passes."""
        if not self._eni_prefix():
            return [ok("prefixes", "route-table addressing: no prefix pool")]
        store = self.ctx.store
        if store is None:
            return []                      # no state: the state check names it
        from vpcnet.routes.prefixes import PrefixPool

        status = PrefixPool(self.config, store).status()
        if not status.interface_id:
            return [problem("prefixes", "no prefix pass has described this host's interface yet",
                            "start the plugin, or run `vpcnet routes sync` (one pass) and read what it says")]
        if not status.supported:
            return [problem("prefixes", f"this instance cannot hold prefixes: {status.reason}",
                            "use an instance type that can (AWS: a Nitro type), or VPCNET_ADDRESSING=route-table")]
        now = time.time()
        out = []
        for family in status.families:
            name = f"IPv{family.version}"
            if family.capacity is None or family.room is None:
                out.append(ok("prefix_capacity", f"{name}: capacity not known yet (the next pass reads it)"))
            elif family.version == 6 and family.room <= 0 and family.addresses_free > 0:
                # a full interface is no problem while its /80s have free addresses: 2**48 each never run short
                out.append(ok("prefix_capacity", f"{name}: the interface holds the {family.capacity} /80 prefix(es) "
                                                 f"it can; {family.addresses_free} address(es) free in them"))
            else:
                out.append(self._capacity_finding(name, family.capacity, family.room, family.addresses_free))
            if family.paused_until is not None:
                out.append(problem("prefix_pause", f"{name}: new prefixes are paused for another "
                                                   f"{max(0.0, family.paused_until - now):.0f} s, the cloud had "
                                                   f"none free: {family.pause_reason}",
                                   RESERVE.get(self.config.provider, "reserve a larger range of type prefix")
                                   .format(cidr="<a larger range>") + ", or free addresses in the subnet"))
        stale = now - STALE_ASSIGN_PASSES * self.config.reconcile_interval
        for record in store.assign_records():
            if record.since < stale:
                out.append(problem("prefix_assign", f"an IPv{record.family[-1]} assign of {record.count} prefix(es) "
                                                    f"sent {now - record.since:.0f} s ago has no recorded answer: "
                                                    "no pass has settled it",
                                   "is the plugin running its passes? see its log; `vpcnet routes sync` settles "
                                   "it now"))
        return out or [ok("prefixes", f"interface {status.interface_id}: no prefix held yet")]

    @staticmethod
    def _capacity_finding(name: str, capacity: int, room: int, free: int) -> Finding:
        used = capacity - room
        if room <= 0:
            return problem("prefix_capacity", f"{name}: the interface holds all the prefixes its instance type "
                                              f"allows ({capacity}); {free} address(es) free in them",
                           "move containers to another host, or use a larger instance type")
        if capacity and used / capacity > CAPACITY_WARN:
            return problem("prefix_capacity", f"{name}: the interface holds {used} of the {capacity} prefixes its "
                                              f"instance type allows ({used / capacity:.0%}); {free} address(es) "
                                              "free in them",
                           "plan for it: move containers to another host, or use a larger instance type")
        return ok("prefix_capacity", f"{name}: {used} of {capacity} prefix slots used, {free} address(es) free")


def _inside(inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
            outer: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """`inner` is `outer` or a part of it (False across families)."""
    return inner.version == outer.version and int(outer.network_address) <= int(inner.network_address) \
        and int(inner.broadcast_address) <= int(outer.broadcast_address)
