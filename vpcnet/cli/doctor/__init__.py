"""`vpcnet doctor [--json]`: what is wrong on this host, each problem named with its fix.

It reads and never repairs: the state (read-only sqlite), /proc/sys, the kernel's links and routes
(netlink), the firewall (`iptables -S`), the Docker engine's API, the plugin's `/healthz`, and the cloud's
route table (one listing; the read-only calls `vpcnet routes list` makes). Exit 0 when every check
passes, 1 otherwise, with one line per problem.

Against `vpcnet serve` it uses the same configuration (file and VPCNET_* variables) and so the same state
dir; against the managed plugin (`--plugin NAME`) it takes the plugin's settings, state mount and socket
from `docker plugin inspect`. Run it in the namespace the plugin runs in (the host's, normally).

Each check is a method returning Findings; a check that cannot run is itself a problem, so a broken
check never hides behind a green answer.
"""
from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import logging
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

from vpcnet import config as config_mod

if TYPE_CHECKING:
    from vpcnet.state.store import Store

log = logging.getLogger(__name__)

DOCKER_SOCKET = "/var/run/docker.sock"
DOCKER_PLUGIN_DIRS = ("/run/docker/plugins", "/etc/docker/plugins", "/usr/lib/docker/plugins")
MIN_DOCKER = (20, 10)
CLOCK_SKEW_LIMIT = 300.0       # seconds; signatures fail past 15 min, so warn well before
QUOTA_WARN = 0.8
HTTP_TIMEOUT = 3.0


@dataclass
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok      {self.check}: {self.detail}"
        return f"PROBLEM {self.check}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


def ok(check: str, detail: str) -> Finding:
    return Finding(check, True, detail)


def problem(check: str, detail: str, fix: str) -> Finding:
    return Finding(check, False, detail, fix)


# -- Docker's API over its unix socket ------------------------------------------------------------------
class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def docker_get(sock: str, path: str, timeout: float = 10.0):
    """GET one Docker API path; the decoded JSON, or raises OSError / ValueError."""
    conn = _UnixHTTP(sock, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise ValueError(f"Docker answered HTTP {resp.status} for {path}: {body[:200].decode(errors='replace')}")
    return json.loads(body)


# -- small readers -------------------------------------------------------------------------------------
def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def _sysctl(key: str) -> str:
    return _read("/proc/sys/" + key.replace(".", "/"))


def _iptables(table: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", "10", "-t", table, "-S", *args], capture_output=True, text=True,
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


def _blind_to(rule: list[str], ours: Callable[[str], bool]) -> bool:
    """The rule matches a named interface (`-i X` / `-o X`, not negated) that vpcnet's traffic never
    uses, so whatever it does cannot touch that traffic (Docker's `-o docker0 -j DROP` and the like)."""
    for i, word in enumerate(rule[:-1]):
        if word in ("-i", "-o") and (i == 0 or rule[i - 1] != "!") and not ours(rule[i + 1]):
            return True
    return False


class Doctor:
    def __init__(self, config, docker_socket: str = DOCKER_SOCKET, plugin: dict | None = None,
                 provider_factory: Callable | None = None):
        self.config = config
        self.docker_socket = docker_socket
        self.plugin = plugin            # `docker plugin inspect` of a managed plugin, when checking one
        self._provider_factory = provider_factory
        self.store: Store | None = None
        self.networks: list = []
        self.endpoints: list = []
        self.claims: list = []

    @property
    def driver_name(self) -> str:
        return self.plugin["Name"] if self.plugin else self.config.driver_name

    # -- running ----------------------------------------------------------------------------------
    def checks(self) -> list[Callable[[], list[Finding]]]:
        return [self.check_state, self.check_socket, self.check_health, self.check_kernel, self.check_forwarding,
                self.check_firewall, self.check_routed_sysctls, self.check_mtu, self.check_docker,
                self.check_kernel_objects, self.check_routes, self.check_clock, self.check_metadata,
                self.check_default_mode]

    def run(self) -> list[Finding]:
        findings: list[Finding] = []
        for check in self.checks():
            name = check.__name__.removeprefix("check_")
            try:
                findings += check()
            except Exception as exc:      # a check that cannot run is a problem, never a silent pass
                log.debug("check %s failed", name, exc_info=True)
                findings.append(problem(name, f"the check could not run: {type(exc).__name__}: {exc}",
                                        "run `vpcnet doctor` as root in the plugin's network namespace"))
        if self.store is not None:
            self.store.close()
        return findings

    # -- state and the plugin process -------------------------------------------------------------
    def check_state(self) -> list[Finding]:
        from vpcnet.state.store import Store

        try:
            store = self.store = Store(self.config.db_path, readonly=True)
        except FileNotFoundError:
            return [problem("state", f"no vpcnet state at {self.config.db_path}",
                            "start the plugin (`vpcnet serve` or `docker plugin enable`), or point "
                            "VPCNET_STATE_DIR / --config at the state it uses")]
        self.networks = store.networks()
        self.endpoints = store.endpoints()
        self.claims = store.claims()
        return [ok("state", f"{self.config.db_path}: {len(self.networks)} network(s), "
                            f"{len(self.endpoints)} endpoint(s)")]

    def socket_path(self) -> str:
        if self.plugin:
            return os.path.join("/run/docker/plugins", self.plugin["Id"],
                                self.plugin["Config"]["Interface"]["Socket"])
        return self.config.socket

    def check_socket(self) -> list[Finding]:
        from vpcnet.observability.health import socket_answers

        path = self.socket_path()
        why = socket_answers(path)
        if why:
            return [problem("socket", why, "start the plugin (`systemctl start vpcnet`, `vpcnet serve`, or "
                                           "`docker plugin enable`) and check its log")]
        return [ok("socket", f"{path} answers")]

    def check_health(self) -> list[Finding]:
        from vpcnet.observability.health import read_addr

        addr = read_addr(self.config.state_dir) or self.config.metrics_addr
        if not addr:
            return [ok("health", "metrics and health listener off (VPCNET_METRICS_ADDR empty): not checked")]
        url = f"http://{addr}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            failing = {k: v.get("problem", "") for k, v in body.get("checks", {}).items() if not v.get("ok")}
            return [problem("health", f"{url}: {name} failing: {why}", _HEALTH_FIXES.get(name, "see the plugin's log"))
                    for name, why in sorted(failing.items())] or [
                problem("health", f"{url} answered HTTP {exc.code}", "see the plugin's log")]
        except (OSError, ValueError) as exc:
            return [problem("health", f"{url} does not answer: {exc}",
                            "is the plugin running, and VPCNET_METRICS_ADDR the same for it and for doctor?")]
        return [ok("health", f"{url}: " + ", ".join(sorted(body.get("checks", {}))) + " passing")]

    # -- the kernel -------------------------------------------------------------------------------
    def modes(self) -> set[str]:
        return {n.mode for n in self.networks} or {"bridge"}

    def check_kernel(self) -> list[Finding]:
        needed = {"veth": "veth pairs for every endpoint"}
        modes = self.modes()
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
        import json as json_mod

        from vpcnet.datapath.features import DEFAULT_MODE_KEY, DefaultMode, default_mode, probe

        raw = self.store.get_meta(DEFAULT_MODE_KEY, "") if self.store is not None else ""
        if raw:
            default, source = DefaultMode(**json_mod.loads(raw)), "as the plugin resolved it at its start"
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

    def check_forwarding(self) -> list[Finding]:
        value = _sysctl("net.ipv4.ip_forward")
        if value != "1":
            return [problem("ip_forward", f"net.ipv4.ip_forward is {value}: the host does not route container "
                                          "traffic", "sysctl -w net.ipv4.ip_forward=1 (and set it in "
                                                     "/etc/sysctl.d so it survives a reboot)")]
        return [ok("ip_forward", "net.ipv4.ip_forward is 1")]

    def check_firewall(self) -> list[Finding]:
        from vpcnet.datapath.firewall import FORWARD_CHAIN, NAT_CHAIN, RAW_CHAIN
        from vpcnet.docker.driver import spec_of

        out = []
        forward = _rules("filter", "FORWARD")
        if forward is None:
            return [problem("firewall", "cannot read the FORWARD chain (`iptables -S FORWARD` failed)",
                            "install iptables and run doctor as root")]
        policy = next((r[2] for r in forward if r[:2] == ["-P", "FORWARD"]), "?")
        out += self._first_jump("filter", "FORWARD", FORWARD_CHAIN, forward, policy)
        for table, parent, chain in (("nat", "POSTROUTING", NAT_CHAIN), ("raw", "PREROUTING", RAW_CHAIN)):
            rules = _rules(table, parent) or []
            if not any(r[:2] == ["-A", parent] and _target(r) == chain for r in rules):
                out.append(problem("firewall", f"no jump from {table} {parent} to {chain}",
                                   "restart the plugin: it re-creates its chains and jumps at start"))
        for net in self.networks:
            spec = spec_of(net)
            for table, parent, chain in (("filter", FORWARD_CHAIN, spec.filter_chain),
                                         ("raw", RAW_CHAIN, spec.raw_chain)):
                parent_rules = _rules(table, parent) or []
                if _rules(table, chain) is None or not any(_target(r) == chain for r in parent_rules):
                    out.append(problem("firewall", f"network {net.network_id[:12]}: chain {table} {chain} missing "
                                                   f"or not jumped to from {parent}",
                                       "restart the plugin: it restores every known network's rules"))
        return out

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
        if not hasattr(self, "_uplinks"):
            from pyroute2 import IPRoute

            from vpcnet.datapath.netlink import Netlink

            with IPRoute() as ipr:
                names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
                self._uplinks = {names.get(i) for i in Netlink.uplinks(ipr)}
        return name.rstrip("+") in self._uplinks or any(u and u.startswith(name.rstrip("+"))
                                                         for u in self._uplinks if name.endswith("+"))

    def check_routed_sysctls(self) -> list[Finding]:
        routed = [n for n in self.networks if n.mode in ("routed", "ebpf")]
        if not routed:
            return [ok("routed_sysctls", "no routed-mode network: rp_filter and br_netfilter not relevant")]
        out = []
        veths = [ep.host_veth for ep in self.endpoints if any(n.network_id == ep.network_id for n in routed)]
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
                _sysctl("net.bridge.bridge-nf-call-iptables") == "1" and any(n.mode == "bridge" for n in self.networks):
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
        for net in self.networks:
            if net.mtu > uplink:
                out.append(problem("mtu", f"network {net.network_id[:12]} has MTU {net.mtu}, above the uplink's "
                                          f"{uplink}", f"recreate it with -o com.docker.network.driver.mtu={uplink}"))
        return out or [ok("mtu", f"{len(self.networks)} network(s) within the uplink's MTU {uplink}")]

    # -- Docker -----------------------------------------------------------------------------------
    def check_docker(self) -> list[Finding]:
        try:
            version = docker_get(self.docker_socket, "/version")
        except (OSError, ValueError) as exc:
            return [problem("docker", f"the Docker engine at {self.docker_socket} does not answer: {exc}",
                            "start Docker (systemctl start docker), or pass --docker-socket")]
        text = str(version.get("Version", "?"))
        out = []
        try:
            numbers = tuple(int(x) for x in text.split("+")[0].split("-")[0].split(".")[:2])
        except ValueError:
            numbers = MIN_DOCKER
        if numbers < MIN_DOCKER:
            out.append(problem("docker", f"Docker {text} is older than {'.'.join(map(str, MIN_DOCKER))}",
                               "upgrade the Docker engine"))
        else:
            out.append(ok("docker", f"Docker {text} (API {version.get('ApiVersion', '?')})"))
        if self.plugin:
            if not self.plugin.get("Enabled"):
                out.append(problem("discovery", f"managed plugin {self.driver_name} is disabled",
                                   f"docker plugin enable {self.driver_name}"))
        elif os.path.dirname(self.config.socket) not in DOCKER_PLUGIN_DIRS:
            out.append(problem("discovery", f"socket {self.config.socket} is outside the folders Docker looks in "
                                            f"({', '.join(DOCKER_PLUGIN_DIRS)})",
                               "set VPCNET_SOCKET=/run/docker/plugins/vpcnet.sock"))
        networks = docker_get(self.docker_socket, "/networks")
        ours = {n["Id"]: n.get("Name", "?") for n in networks if n.get("Driver") == self.driver_name}
        known = {n.network_id for n in self.networks}
        for network_id, name in sorted(ours.items()):
            if network_id not in known:
                out.append(problem("discovery", f"Docker network {name} ({network_id[:12]}) uses driver "
                                                f"{self.driver_name} but vpcnet's state does not know it",
                                   f"docker network rm {name} and create it again (its state was lost)"))
        out.append(ok("discovery", f"Docker uses driver {self.driver_name} for {len(ours)} network(s)"))
        return out

    # -- kernel objects versus the state ----------------------------------------------------------
    def check_kernel_objects(self) -> list[Finding]:
        from pyroute2 import IPRoute

        from vpcnet.datapath.dataplane import Dataplane
        from vpcnet.datapath.spec import anchor_peer
        from vpcnet.docker.driver import spec_of

        with IPRoute() as ipr:
            links = {link.get("IFLA_IFNAME"): link for link in ipr.get_links()}
            by_index = {link["index"]: name for name, link in links.items()}
            routes = ipr.route("dump", table=254, family=2)
        out = []
        stored = {ep.host_veth for ep in self.endpoints}
        bridges = {n.bridge for n in self.networks if n.mode == "bridge"}
        routed = [ipaddress.IPv4Network(n.host_cidr) for n in self.networks if n.mode != "bridge"]
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
        for ep in self.endpoints:
            if ep.host_veth not in links:
                out.append(problem("missing_veth", f"endpoint {ep.endpoint_id[:12]} (network "
                                                   f"{ep.network_id[:12]}, {ep.address}) has no host veth "
                                                   f"{ep.host_veth}", "docker rm -f the container that used it "
                                                                      "(its network namespace is gone), or "
                                                                      "restart it"))
        for net in self.networks:
            if net.bridge not in links:
                out.append(problem("missing_bridge", f"network {net.network_id[:12]} has no {net.bridge} link",
                                   "restart the plugin: it rebuilds every known network at start"))
            elif net.mode != "bridge" and anchor_peer(net.bridge) not in links:
                out.append(problem("missing_bridge", f"routed network {net.network_id[:12]} lost its anchor peer "
                                                     f"{anchor_peer(net.bridge)}", "restart the plugin"))
        for table, chain in Dataplane().stale_chains({spec_of(n).tag for n in self.networks}):
            out.append(problem("stale_chain", f"{table} chain {chain} belongs to no network vpcnet knows",
                               "restart the plugin (it drops stale chains at start), or iptables -t "
                               f"{table} -F {chain} && iptables -t {table} -X {chain} after removing its jump"))
        if not out:
            out.append(ok("kernel_objects", f"{len(stored)} veth(s) and {len(self.networks)} network link(s) "
                                            "match the state"))
        return out

    # -- the cloud --------------------------------------------------------------------------------
    def provider(self):
        if not hasattr(self, "_provider"):
            from vpcnet.cloud import make_provider

            self._provider = (self._provider_factory or make_provider)(self.config)
        return self._provider

    def check_routes(self) -> list[Finding]:
        """This host's route in every table it must be in: present, Available, its next hop this
        instance; each table's quota headroom; the cloud forwarding routed traffic (AWS source/dest)."""
        from vpcnet.errors import Retryable

        provider = self.provider()
        where = self._endpoint() or provider.table_id()
        try:
            me = provider.instance_id()
            listings = {table: provider.list_routes(table) for table in provider.table_ids()}
        except Retryable as exc:
            return [problem("cloud", f"the {self.config.provider} API ({where}) is unreachable: {exc}",
                            "check the host's network path and proxy to the API endpoint, and the "
                            "endpoint setting")]
        except Exception as exc:
            return [problem("cloud", f"cannot read the {self.config.provider} route tables: {exc}",
                            "fix the credentials or ids named above")]
        out = [ok("cloud", f"{self.config.provider} route table(s) listed: "
                           + ", ".join(f"{t} ({len(r)} entries)" for t, r in listings.items()))]
        if not self.claims and self.networks:
            out.append(problem("claim", "networks exist but no host CIDR is claimed", "see the plugin's log"))
        for claim in self.claims:
            if not claim.host_cidr:
                out.append(problem("claim", f"no host CIDR claimed in {claim.cluster_cidr}: "
                                            f"{claim.reason or 'claim in progress'}",
                                   "see `vpcnet routes sync` for the reason"))
                continue
            for table, routes in listings.items():
                out.append(self._route_finding(claim.host_cidr, me, table, routes))
        for table, routes in listings.items():
            out.append(self._quota_finding(provider, table, routes))
        try:
            forwarding = provider.check_forwarding(disable=False)    # look only: doctor never repairs
        except Exception as exc:
            forwarding = [f"cannot check whether the cloud forwards this host's routed traffic: {exc}"]
        for warning in forwarding:
            out.append(problem("source_dest_check", warning, "as named"))
        return out

    @staticmethod
    def _route_finding(host_cidr: str, me: str, table: str, routes: list) -> Finding:
        entry = next((r for r in routes if r.destination == host_cidr), None)
        if entry is None:
            return problem("route", f"route {host_cidr} -> {me} is missing from {table}",
                           "the reconciler re-creates it within VPCNET_RECONCILE_INTERVAL; "
                           "`vpcnet routes sync` does it now")
        if entry.next_hop != me:
            return problem("route", f"route {host_cidr} in {table} points at {entry.next_hop or '?'}, not this "
                                    f"instance {me}", "another host or a hand-made route holds the block: "
                                                      "release it there, or give this host another block")
        if entry.status != "Available":
            return problem("route", f"route {host_cidr} -> {me} in {table} is {entry.status}",
                           "wait for the cloud to settle it; if it stays, see the cloud console")
        return ok("route", f"{host_cidr} -> {me} Available in {table}")

    @staticmethod
    def _quota_finding(provider, table: str, routes: list) -> Finding:
        quota = provider.table_quota(table) or None
        custom = sum(1 for r in routes if r.kind == "Custom")
        if not quota:
            return ok("quota", f"{table}: {custom} custom entries (no quota)")
        share = custom / quota
        if share > QUOTA_WARN:
            return problem("quota", f"route table {table} holds {custom} of {quota} custom entries ({share:.0%})",
                           "run `vpcnet routes gc`, or raise the route table quota "
                           f"({provider.quota_hint or 'see the cloud console'})")
        return ok("quota", f"{table}: {custom} of {quota} custom entries ({share:.0%})")

    def _endpoint(self) -> str:
        if self.config.provider == "aliyun":
            return self.config.aliyun_endpoint or (
                f"https://vpc.{self.config.aliyun_region_id}.aliyuncs.com/" if self.config.aliyun_region_id else "")
        if self.config.provider == "aws":
            return self.config.aws_endpoint_url or (
                f"https://ec2.{self.config.aws_region}.amazonaws.com/" if self.config.aws_region else "")
        return ""

    def check_clock(self) -> list[Finding]:
        url = self._endpoint()
        if not url:
            return [ok("clock", "no cloud endpoint to compare clocks with")]
        try:
            request = urllib.request.Request(url, method="GET")
            try:
                with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as resp:
                    date = resp.headers.get("Date")
            except urllib.error.HTTPError as exc:          # an error page still carries the Date
                date = exc.headers.get("Date")
        except OSError as exc:
            return [ok("clock", f"not compared: {url} does not answer ({exc}); see the cloud check")]
        if not date:
            return [ok("clock", f"not compared: {url} sends no Date header")]
        skew = time.time() - email.utils.parsedate_to_datetime(date).timestamp()
        if abs(skew) > CLOCK_SKEW_LIMIT:
            return [problem("clock", f"this host's clock is {skew:+.0f} s off the cloud's: request signatures "
                                     "fail past 15 minutes", "enable NTP (chrony or systemd-timesyncd)")]
        return [ok("clock", f"{skew:+.1f} s off the cloud's clock")]

    def check_metadata(self) -> list[Finding]:
        cfg = self.config
        if cfg.provider == "aliyun":
            needed = not (cfg.aliyun_region_id and cfg.aliyun_instance_id and
                          (cfg.aliyun_route_table_id or cfg.aliyun_vpc_id)) or bool(cfg.aliyun_ram_role)
            url = cfg.aliyun_metadata_url
        elif cfg.provider == "aws":
            needed = not (cfg.aws_region and cfg.aws_instance_id and cfg.aws_route_table_id) or not (
                os.environ.get("AWS_ACCESS_KEY_ID"))
            url = cfg.aws_metadata_url
        else:
            return [ok("metadata", "not needed by the local provider")]
        if not needed:
            return [ok("metadata", "not needed: ids and credentials are configured")]
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/", timeout=HTTP_TIMEOUT):
                pass
        except urllib.error.HTTPError:
            pass                               # an answer, even a 401/404, means it is reachable
        except OSError as exc:
            return [problem("metadata", f"the instance metadata service {url} is unreachable ({exc}) and the "
                                        "configuration relies on it", "configure the ids (and keys) explicitly, "
                                                                      "or allow the host to reach it")]
        return [ok("metadata", f"{url} reachable")]


_HEALTH_FIXES = {
    "socket": "the plugin's socket does not answer: restart the plugin",
    "store": "the state dir is full or read-only: free space, check the mount",
    "reconciler": "the reconciler is stuck or dead: see the plugin's log, restart the plugin",
}


# -- the command ---------------------------------------------------------------------------------------
def default_docker_socket(environ=os.environ) -> str:
    """The engine the docker CLI would talk to: DOCKER_HOST when it names a unix socket (rootless Docker,
    a second engine), else the standard socket."""
    host = environ.get("DOCKER_HOST", "")
    return host[len("unix://"):] if host.startswith("unix://") else DOCKER_SOCKET


def managed_plugin(name: str, docker_socket: str) -> tuple[dict, dict[str, str]]:
    """(`docker plugin inspect NAME`, its VPCNET_* settings with the state dir as seen from the host)."""
    from urllib.parse import quote

    info = docker_get(docker_socket, f"/plugins/{quote(name, safe='')}/json")
    env = dict(item.split("=", 1) for item in info.get("Settings", {}).get("Env", []) if "=" in item)
    environ = {k: v for k, v in env.items() if k.startswith("VPCNET_")}
    for mount in info.get("Settings", {}).get("Mounts", []):
        if mount.get("Destination") == environ.get("VPCNET_STATE_DIR", "/var/lib/vpcnet"):
            environ["VPCNET_STATE_DIR"] = mount.get("Source") or mount["Destination"]
    environ["VPCNET_CONFIG"] = os.devnull          # the plugin's settings are all in its Env
    return info, environ


def register(sub) -> None:
    from vpcnet.config import add_config_argument

    parser = sub.add_parser("doctor", help="check this host and name each problem with its fix (reads only)")
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("-v", "--verbose", action="store_true", help="also list the checks that pass")
    parser.add_argument("--plugin", metavar="NAME", help="check a managed plugin (settings from docker plugin "
                                                         "inspect NAME)")
    parser.add_argument("--docker-socket", default=default_docker_socket(), metavar="PATH",
                        help=f"the Docker engine's API socket (default: DOCKER_HOST's unix:// path, else "
                             f"{DOCKER_SOCKET})")

    def func(args) -> int:
        plugin = None
        if args.plugin:
            plugin, environ = managed_plugin(args.plugin, args.docker_socket)
            config = config_mod.load(None, environ=environ, check_socket_dir=False)
        else:
            config = config_mod.load(args.config, check_socket_dir=False)
        findings = Doctor(config, args.docker_socket, plugin).run()
        problems = [f for f in findings if not f.ok]
        if args.json:
            print(json.dumps({"ok": not problems, "findings": [asdict(f) for f in findings]}, indent=2))
        else:
            for finding in findings:
                if args.verbose or not finding.ok:
                    print(finding.line())
            print(f"vpcnet doctor: {len(problems)} problem(s), {len(findings) - len(problems)} check(s) passed")
        return 1 if problems else 0

    parser.set_defaults(func=func)
