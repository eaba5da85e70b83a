"""The kernel under the datapath: the modules each mode needs, forwarding and reverse-path sysctls, MTU
against the uplink, links and chains versus the state (stale or missing), and the mode a network made
without -o vpcnet.mode gets. The firewall's jumps are firewall.py's."""
from __future__ import annotations

import ipaddress
import json
import os

from vpcnet.cli.doctor.findings import Checks, Finding, ok, problem


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def _sysctl(key: str) -> str:
    return _read("/proc/sys/" + key.replace(".", "/"))


# A symbol each feature's code defines: /proc/kallsyms lists it whether the code is built in or loaded.
KERNEL_SYMBOLS = {"veth": "veth_xmit", "bridge": "br_dev_xmit", "cls_bpf": "cls_bpf_classify",
                  "sch_ingress": "clsact_init"}


def _module_available(name: str) -> bool:
    """Loaded, built in, or present as a loadable module (all read-only facts)."""
    if os.path.isdir(f"/sys/module/{name}"):
        return True
    release = os.uname().release
    for listing in (f"/lib/modules/{release}/modules.builtin", f"/lib/modules/{release}/modules.dep"):
        try:
            with open(listing) as fh:
                if any(os.path.basename(line.split(":")[0]).split(".")[0] == name for line in fh):
                    return True
        except OSError:
            continue
    symbol = KERNEL_SYMBOLS.get(name)
    if symbol:
        try:
            with open("/proc/kallsyms") as fh:
                return any(line.rstrip("\n").split(" ")[-1:] == [symbol] for line in fh)
        except OSError:
            pass
    return False


class DatapathChecks(Checks):
    def check_kernel(self) -> list[Finding]:
        needed = {"veth": "veth pairs for every endpoint"}
        modes = self.ctx.modes()
        if "bridge" in modes:
            needed["bridge"] = "the bridge of bridge-mode networks"
        if "ebpf" in modes:
            needed["cls_bpf"] = "the tc programs of ebpf-mode networks"
            needed["sch_ingress"] = "the clsact qdisc of ebpf-mode networks"
        out = []
        for module, why in needed.items():
            if _module_available(module):
                out.append(ok("kernel", f"{module} available ({why})"))
            else:
                out.append(problem("kernel", f"kernel module {module} is not available ({why})",
                                   f"modprobe {module}, or use a kernel built with it"))
        if "ebpf" in modes and not os.path.exists("/proc/sys/kernel/unprivileged_bpf_disabled"):
            out.append(problem("kernel", "this kernel has no bpf(2) (CONFIG_BPF_SYSCALL), needed by ebpf mode",
                               "recreate the networks with -o vpcnet.mode=routed, or use a kernel with BPF"))
        return out

    def check_default_mode(self) -> list[Finding]:
        """The mode a network made without -o vpcnet.mode gets: as the plugin resolved it at its start, with
        its capabilities (a managed plugin's differ from doctor's); probed here only if it never said."""
        from vpcnet.datapath.features import DEFAULT_MODE_KEY, DefaultMode, default_mode, probe

        store = self.ctx.store
        raw = store.get_meta(DEFAULT_MODE_KEY, "") if store is not None else ""
        if raw:
            default, source = DefaultMode(**json.loads(raw)), "as the plugin resolved it at its start"
        else:
            default, source = default_mode(self.config.default_mode, probe()), "probed by doctor itself"
        line = f"networks created without -o vpcnet.mode get {default.describe()} ({source})"
        if default.unsupported:
            return [problem("default_mode", line, "give the plugin what the mode needs, or set "
                                                  "VPCNET_DEFAULT_MODE=auto and restart the plugin")]
        if default.fallback:
            return [problem("default_mode", line, "give the plugin CAP_BPF and CAP_NET_ADMIN (the managed plugin "
                                                  "and the systemd unit have them) on Linux 5.10 or newer and "
                                                  "restart it, or pin VPCNET_DEFAULT_MODE to the mode it fell "
                                                  "back to")]
        return [ok("default_mode", line)]

    def check_peer_counting(self) -> list[Finding]:
        """Who talks to whom (VPCNET_PEER_METRICS): on or off, and why; on a host that cannot load eBPF
        programs (the features probe) it counts nothing."""
        from vpcnet.datapath.ebpf import maps
        from vpcnet.datapath.features import probe

        if self.config.peer_metrics != "on":
            return [ok("peer_counting", "off (VPCNET_PEER_METRICS=off): no vpcnet_endpoint_peer_* families")]
        if self.config.endpoint_metrics != "container":
            return [ok("peer_counting", "off (VPCNET_ENDPOINT_METRICS=service: per-peer series need "
                                        "per-container metrics)")]
        features = probe()
        if not features.supports("ebpf"):
            return [problem("peer_counting", "VPCNET_PEER_METRICS=on, but this host cannot load eBPF programs "
                                             f"({features.why_not('ebpf')}): peer counting is off, "
                                             "vpcnet_endpoint_peer_* stay empty",
                            "give the plugin CAP_BPF and CAP_NET_ADMIN on Linux 5.10 or newer, or set "
                            "VPCNET_PEER_METRICS=off")]
        fds = maps.find_all()
        try:
            keys = sum(1 for fd in fds for _ in maps.entries(fd))
        finally:
            for fd in fds:
                os.close(fd)
        missing = self._uncounted()
        if missing:
            return [problem("peer_counting", f"on, but {len(missing)} endpoint host veth(s) have no receive "
                                             f"counting program: {', '.join(missing[:5])}",
                            "recreate those containers (the periodic pass puts a removed clsact qdisc back, "
                            "not a single filter deleted from it)")]
        return [ok("peer_counting", f"on: {keys} endpoint-peer key(s) in {len(fds)} "
                                    f"{maps.MAP_NAME.decode()} map(s) (at most {maps.MAX_ENTRIES})")]

    def _uncounted(self) -> list[str]:
        """Host veths of this host's endpoints (present now) without the egress counting program."""
        from pyroute2 import IPRoute, NetlinkError

        from vpcnet.datapath.tc import TC_EGRESS

        out = []
        with IPRoute() as ipr:
            for ep in self.ctx.endpoints:
                found = ipr.link_lookup(ifname=ep.host_veth)
                if not found:
                    continue
                try:
                    filters = ipr.get_filters(index=found[0], parent=TC_EGRESS)
                except NetlinkError:
                    filters = []
                if not any(f.get_attr("TCA_KIND") == "bpf" for f in filters):
                    out.append(ep.host_veth)
        return out

    def check_forwarding(self) -> list[Finding]:
        value = _sysctl("net.ipv4.ip_forward")
        if value != "1":
            return [problem("ip_forward", f"net.ipv4.ip_forward is {value}: the host does not route container "
                                          "traffic", "sysctl -w net.ipv4.ip_forward=1 (and set it in "
                                                     "/etc/sysctl.d so it survives a reboot)")]
        return [ok("ip_forward", "net.ipv4.ip_forward is 1")]

    def check_routed_sysctls(self) -> list[Finding]:
        networks = self.ctx.networks
        routed = [n for n in networks if n.mode in ("routed", "ebpf")]
        if not routed:
            return [ok("routed_sysctls", "no routed-mode network: rp_filter and br_netfilter not relevant")]
        out = []
        veths = [ep.host_veth for ep in self.ctx.endpoints if any(n.network_id == ep.network_id for n in routed)]
        base = int(_sysctl("net.ipv4.conf.all.rp_filter") or 0)
        for dev in veths:
            try:
                value = max(base, int(_sysctl(f"net.ipv4.conf.{dev}.rp_filter")))
            except OSError:
                continue                        # the veth is gone: check_kernel_objects names it
            if value == 1:
                out.append(problem("rp_filter", f"strict reverse-path filtering (rp_filter=1) on {dev}: routed "
                                                "mode's asymmetric paths get dropped",
                                   "sysctl -w net.ipv4.conf.all.rp_filter=2 and "
                                   f"net.ipv4.conf.{dev}.rp_filter=2 (loose)"))
        if os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables") and \
                _sysctl("net.bridge.bridge-nf-call-iptables") == "1" and any(n.mode == "bridge" for n in networks):
            out.append(ok("br_netfilter", "bridge-nf-call-iptables=1: bridged traffic passes FORWARD, where "
                                          "vpcnet's jump accepts it (routed mode has no bridge)"))
        return out or [ok("rp_filter", f"no strict rp_filter on {len(veths)} routed veth(s)")]

    def check_mtu(self) -> list[Finding]:
        from vpcnet.datapath.dataplane import Dataplane

        uplink = Dataplane().uplink_mtu()
        out = []
        if self.config.mtu and self.config.mtu > uplink:
            out.append(problem("mtu", f"VPCNET_MTU {self.config.mtu} is above the uplink's MTU {uplink}: large "
                                      "packets are dropped or fragmented", f"set VPCNET_MTU to {uplink} or 0"))
        for net in self.ctx.networks:
            if net.mtu > uplink:
                out.append(problem("mtu", f"network {net.network_id[:12]} has MTU {net.mtu}, above the uplink's "
                                          f"{uplink}", f"recreate it with -o com.docker.network.driver.mtu={uplink}"))
        return out or [ok("mtu", f"{len(self.ctx.networks)} network(s) within the uplink's MTU {uplink}")]

    def check_kernel_objects(self) -> list[Finding]:
        """Links, routes and chains against the state: a veth or chain no network owns, a link one lacks."""
        from pyroute2 import IPRoute

        from vpcnet.datapath.dataplane import Dataplane
        from vpcnet.datapath.reconciler import spec_of
        from vpcnet.datapath.spec import anchor_peer

        networks, endpoints = self.ctx.networks, self.ctx.endpoints
        with IPRoute() as ipr:
            links = {link.get("IFLA_IFNAME"): link for link in ipr.get_links()}
            by_index = {link["index"]: name for name, link in links.items()}
            routes = ipr.route("dump", table=254, family=2)
        out = []
        stored = {ep.host_veth for ep in endpoints}
        bridges = {n.bridge for n in networks if n.mode == "bridge"}
        routed = [ipaddress.IPv4Network(n.host_cidr) for n in networks if n.mode != "bridge" and n.host_cidr]
        for name, link in sorted(links.items()):
            if not name or not name.startswith("vh") or name in stored:
                continue
            master = by_index.get(link.get("IFLA_MASTER"))
            if master in bridges:
                out.append(problem("stale_veth", f"veth {name} is on vpcnet's bridge {master} but no endpoint "
                                                 "in vpcnet's state has it", f"ip link del {name}"))
        for route in routes:
            dst, dev = route.get("RTA_DST"), by_index.get(route.get("RTA_OIF"))
            if dst and route.get("dst_len") == 32 and dev and dev.startswith("vh") and dev not in stored and \
                    any(ipaddress.IPv4Address(dst) in net for net in routed):
                out.append(problem("stale_veth", f"veth {dev} routes {dst} of a routed vpcnet network but no "
                                                 "endpoint in vpcnet's state has it", f"ip link del {dev}"))
        for ep in endpoints:
            if ep.host_veth not in links:
                out.append(problem("missing_veth", f"endpoint {ep.endpoint_id[:12]} (network "
                                                   f"{ep.network_id[:12]}, {ep.address or ep.address_v6}) has no "
                                                   "host veth "
                                                   f"{ep.host_veth}", "docker rm -f the container that used it "
                                                                      "(its network namespace is gone), or "
                                                                      "restart it"))
        for net in networks:
            if net.bridge not in links:
                out.append(problem("missing_bridge", f"network {net.network_id[:12]} has no {net.bridge} link",
                                   "restart the plugin: it rebuilds every known network at start"))
            elif net.mode != "bridge" and anchor_peer(net.bridge) not in links:
                out.append(problem("missing_bridge", f"routed network {net.network_id[:12]} lost its anchor peer "
                                                     f"{anchor_peer(net.bridge)}", "restart the plugin"))
        for table, chain in Dataplane().stale_chains({spec_of(n).tag for n in networks}):
            out.append(problem("stale_chain", f"{table} chain {chain} belongs to no network vpcnet knows",
                               "restart the plugin (it drops stale chains at start), or iptables -t "
                               f"{table} -F {chain} && iptables -t {table} -X {chain} after removing its jump"))
        if not out:
            out.append(ok("kernel_objects", f"{len(stored)} veth(s) and {len(networks)} network link(s) "
                                            "match the state"))
        return out
