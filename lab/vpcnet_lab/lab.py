"""The multi-host lab: a VPC router namespace running the emulator, and N simulated hosts.

Addresses (all inside namespaces the lab creates; the machine's own interfaces are never touched):

    underlay       192.168.240.0/24 and fd00:192:168:240::/64 (dual-stack)
    router         192.168.240.1 and fd00:192:168:240::1 (on lo of `vpclab-vpc`; the emulator listens on
                   192.168.240.1:8790)
    host K         192.168.240.(10+K) and fd00:192:168:240::(10+K), interface `uplink` in `vpclab-hK`, point
                   to point with the router (router side `to-hK`), default routes via the router
    containers     the cluster CIDR (default 10.240.0.0/16), one /24 per host, claimed by each host's
                   plugin as a route `host CIDR -> i-vpclab-hK` in the emulated route table, which the
                   emulator installs in the router namespace as `host CIDR via 192.168.240.(10+K)`;
                   on dual-stack networks also the IPv6 cluster CIDR (default fd00:10:240::/48), one /80
                   per host, installed as `block via fd00:192:168:240::(10+K)` (the instance's IPv6
                   underlay address, registered with the emulator as "ip6")

eni-prefix addressing (`--addressing eni-prefix`, docs/eni-prefix.md): no host claims a block in the route
table, which stays empty of vpcnet routes. The cluster CIDR is instead the emulated vSwitch's reserved range
of type Prefix (IPv4 /28s; the IPv6 cluster CIDR is the vSwitch's IPv6 CIDR, for /80s), identical on every
host, and host K is registered with the emulator with its instance type (`--instance-type`) and its primary
ENI, which its plugin is told (VPCNET_ALIYUN_NETWORK_INTERFACE_ID) along with the ECS endpoint (the
emulator's URL). The plugins assign prefixes to their ENIs through the ECS API; the emulator installs each
assigned prefix in the router namespace as `prefix via <host K's underlay address>`. One zone only: a
reserved range belongs to one vSwitch. A VPC reserves a range inside the vSwitch's CIDR, so in this mode
the lab's vSwitch is 192.168.240.0/22: the hosts in its first /24 (the underlay above), the reserved range
in the rest (default 192.168.242.0/23); IPv6 /80s come from the vSwitch's IPv6 CIDR, the IPv6 cluster CIDR.

`--ipv6` makes the lab's network (vpc0) dual-stack: `docker network create --ipv6`, on the IPv6 cluster CIDR
the hosts' plugins are given (VPCNET_CLUSTER_CIDR_V6).
The underlay is dual-stack with or without it, so `create_network(..., ipv6=True)` works on any lab.

Zones (`--zones N`, N <= 4): host K is in zone z = (K-1) % N + 1, with underlay address
192.168.(239+z).(10+K) (and fd00:192:168:(239+z)::(10+K)) in vSwitch `vsw-zone<z>` (192.168.(239+z).0/24).
Zone 1's vSwitch is bound to the VPC's system table vtb-emu0001, zone z's to its own custom table
vtb-emu000<z>. The emulator installs each emulated table into its own kernel table (100+z) of the router
namespace, and the router forwards a packet by the table of the zone it came from: one `ip rule iif to-hK
lookup 100+z` per host and family (by incoming link, not source address: container packets keep their own
source addresses), with an `unreachable` route for the cluster CIDR (and the IPv6 one) in each zone table so
a missing host route never falls through to another table. So cross-zone traffic works only while both
tables hold both hosts' routes, as in a VPC with a route table per zone. The hosts' plugins are not told the
tables: they discover them from the vSwitches bound to them (DescribeRouteTableList). With one zone (the
default) everything is in the main table and the addresses are those above.

Files: /run/vpclab (lab.json with pids and settings, sockets, exec roots), /var/lib/vpclab (data roots,
plugin state, logs, the emulator's state). `down()` removes all of it, also after a half-failed `up()`,
by looking at what exists (namespaces, folders, cgroups) rather than trusting lab.json alone.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any

from vpcnet_lab import engine as engine_mod
from vpcnet_lab import netns
from vpcnet_lab.engine import DATA_ROOT, RUN_ROOT, Host, alive
from vpcnet_lab.netns import LabError, run

log = logging.getLogger(__name__)

PREFIX = "vpclab-"
ROUTER_NS = "vpclab-vpc"
UNDERLAY = ipaddress.IPv4Network("192.168.240.0/24")
UNDERLAY_ALL = ipaddress.IPv4Network("192.168.240.0/22")   # every zone's vSwitch
MAX_ZONES = 4
ZONE_KERNEL_TABLE_BASE = 100          # zone z's route table is kernel table 100+z in the router netns
RULE_PREF_BASE = 1000                 # host K's `ip rule iif to-hK` has priority 1000+K
ROUTER_IP = "192.168.240.1"
ROUTER_IP6 = "fd00:192:168:240::1"
HOST_IP_BASE = 10                      # host K is 192.168.240.(10+K)
MAX_HOSTS = 200
EMULATOR_PORT = 8790
DEFAULT_CLUSTER = "10.240.0.0/16"
DEFAULT_ENI_RANGE = "192.168.242.0/23"   # eni-prefix addressing: the reserved range, inside the lab vSwitch
DEFAULT_CLUSTER_V6 = "fd00:10:240::/48"
DEFAULT_NETWORK = "vpc0"
DEFAULT_RECONCILE = 5.0
HOST_IF = "uplink"
METRICS_PORT = 9753         # each host's plugin serves /metrics on host_ip(k):METRICS_PORT
REGION, VPC_ID, TABLE_ID = "cn-emu-1", "vpc-emu0001", "vtb-emu0001"
KEY_ID = "vpclab"
LAB_VSWITCH = "vsw-emu0001"       # with one zone: the emulator's vSwitch of the underlay (its first)
ADDRESSING_MODES = ("route-table", "eni-prefix")
DEFAULT_INSTANCE_TYPE = "ecs.g7.large"
STATE_FILE = os.path.join(RUN_ROOT, "lab.json")
LOCK_FILE = os.path.join(RUN_ROOT, ".lock")
EMULATOR_PIDFILE = os.path.join(RUN_ROOT, "emulator.pid")
EMULATOR_LOG = os.path.join(DATA_ROOT, "emulator.log")
EMULATOR_STATE = os.path.join(DATA_ROOT, "emulator.json")
NETWORK_TIMEOUT = 60.0
CLOSED_PORT_URL = "http://127.0.0.1:9"   # metadata: never 100.100.100.200; loopback of the host netns


def host_netns(k: int) -> str:
    return f"{PREFIX}h{k}"


def host_ip(k: int, zone: int = 1) -> str:
    if not 1 <= k <= MAX_HOSTS:
        raise LabError(f"host number {k} is out of range 1..{MAX_HOSTS}")
    return str(zone_subnet(zone).network_address + HOST_IP_BASE + k)


def host_ip6(k: int, zone: int = 1) -> str:
    """Host K's IPv6 underlay address, fd00:192:168:(239+zone)::(10+K): its IPv4 one written into IPv6."""
    host_ip(k, zone)
    return str(ipaddress.IPv6Address(f"fd00:192:168:{239 + zone}::{HOST_IP_BASE + k}"))


def router_ip6(zone: int = 1) -> str:
    return str(ipaddress.IPv6Address(f"fd00:192:168:{239 + zone}::1"))


def zone_subnet(zone: int) -> ipaddress.IPv4Network:
    """Zone z's vSwitch: 192.168.(239+z).0/24."""
    return ipaddress.IPv4Network((int(UNDERLAY.network_address) + (zone - 1) * 256, 24))


def zone_table(zone: int) -> str:
    return TABLE_ID if zone == 1 else f"vtb-emu{zone:04d}"


def zone_vswitch(zone: int) -> str:
    return f"vsw-zone{zone}"


def instance_id(k: int) -> str:
    return f"i-vpclab-h{k}"


class Lab:
    """The lab, as an object. `with Lab(hosts=2) as lab:` brings it up and always takes it down."""

    def __init__(self, hosts: int = 2, cluster_cidr: str | None = None, network: str = DEFAULT_NETWORK,
                 reconcile_interval: float = DEFAULT_RECONCILE, load_image: bool = True,
                 out=None, mode: str = "default", zones: int = 1, ipv6: bool = False,
                 cluster_cidr_v6: str = DEFAULT_CLUSTER_V6, addressing: str = "route-table",
                 instance_type: str = DEFAULT_INSTANCE_TYPE):
        if not 1 <= hosts <= MAX_HOSTS:
            raise LabError(f"--hosts must be 1..{MAX_HOSTS}")
        if not 1 <= zones <= MAX_ZONES:
            raise LabError(f"--zones must be 1..{MAX_ZONES}")
        from vpcnet.datapath.spec import MODES  # here: the lab's CLI stays free of pyroute2 until used
        if mode not in ("default", *MODES):     # default: no -o, the mode the plugins resolve (VPCNET_DEFAULT_MODE)
            raise LabError(f"--mode {mode}: unknown vpcnet mode (known: default, {', '.join(MODES)})")
        if addressing not in ADDRESSING_MODES:
            raise LabError(f"--addressing {addressing}: unknown (known: {', '.join(ADDRESSING_MODES)})")
        if addressing == "eni-prefix":
            if zones != 1:
                raise LabError("--addressing eni-prefix takes one zone: the range prefixes come from is reserved "
                               "in one vSwitch")
            if mode == "bridge":
                raise LabError("--addressing eni-prefix refuses --mode bridge: a bridge needs one on-link block "
                               "per host, and the range is shared by all hosts (docs/eni-prefix.md)")
        from vpcnet_lab.emulator.enis import INSTANCE_TYPES, IPV4_PREFIX_LEN
        if instance_type not in INSTANCE_TYPES:
            raise LabError(f"--instance-type {instance_type}: unknown to the emulator (known: "
                           f"{', '.join(INSTANCE_TYPES)})")
        if cluster_cidr is None:
            cluster_cidr = DEFAULT_ENI_RANGE if addressing == "eni-prefix" else DEFAULT_CLUSTER
        cluster = ipaddress.IPv4Network(cluster_cidr, strict=True)
        if addressing == "eni-prefix" and cluster.prefixlen > IPV4_PREFIX_LEN:
            raise LabError(f"cluster CIDR {cluster}: a reserved range of type Prefix holds at least one "
                           f"/{IPV4_PREFIX_LEN}")
        if addressing == "eni-prefix":
            # the emulator, as a VPC, reserves a range only inside its vSwitch: here the lab vSwitch
            if not cluster.subnet_of(UNDERLAY_ALL) or cluster.overlaps(UNDERLAY):
                raise LabError(f"cluster CIDR {cluster}: with --addressing eni-prefix it is the vSwitch's reserved "
                               f"range, so it must lie inside the lab vSwitch {UNDERLAY_ALL} and outside the hosts' "
                               f"{UNDERLAY} (e.g. {DEFAULT_ENI_RANGE})")
        elif cluster.overlaps(UNDERLAY_ALL):
            raise LabError(f"cluster CIDR {cluster} overlaps the lab underlay {UNDERLAY_ALL}")
        try:
            cluster6 = ipaddress.IPv6Network(cluster_cidr_v6, strict=True)
        except ValueError as exc:
            raise LabError(f"--cluster-cidr-v6 {cluster_cidr_v6}: {exc}") from None
        if cluster6.prefixlen > 64:
            raise LabError(f"--cluster-cidr-v6 {cluster6}: too small for several /80 host blocks (at most /64)")
        if cluster6.overlaps(ipaddress.IPv6Network("fd00:192:168::/48")):
            raise LabError(f"--cluster-cidr-v6 {cluster6} overlaps the lab's IPv6 underlay fd00:192:168::/48")
        self.hosts = hosts
        self.cluster_cidr = str(cluster)
        self.cluster_cidr_v6 = str(cluster6)
        self.ipv6 = bool(ipv6)
        self.network = network
        self.mode = mode
        self.zones = zones
        self.addressing = addressing
        self.instance_type = instance_type
        self.reconcile_interval = float(reconcile_interval)
        self.load_image = load_image
        self.out = out
        self.state: dict[str, Any] = {}

    # -- small accessors ---------------------------------------------------------------------------
    emulator_url = f"http://{ROUTER_IP}:{EMULATOR_PORT}/"
    router_netns = ROUTER_NS

    @staticmethod
    def host_netns(k: int) -> str:
        return host_netns(k)

    def zone_of(self, k: int) -> int:
        return (k - 1) % self.zones + 1

    def host_ip(self, k: int) -> str:
        return host_ip(k, self.zone_of(k))

    def host_ip6(self, k: int) -> str:
        return host_ip6(k, self.zone_of(k))

    def zone_tables(self) -> list[str]:
        return [zone_table(z) for z in range(1, self.zones + 1)]

    @staticmethod
    def host(k: int) -> Host:
        return Host(k, host_netns(k))

    def docker_cmd(self, k: int) -> list[str]:
        return self.host(k).docker

    def docker(self, k: int, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return run([*self.docker_cmd(k), *args], check=check, timeout=timeout)

    def host_indexes(self) -> list[int]:
        return sorted(int(h) for h in self._load_state().get("hosts", {}))

    def emulator(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        """An admin call to the emulator (`/_emulator/...`), made from inside the router namespace."""
        return netns.http_json(ROUTER_NS, method, self.emulator_url.rstrip("/") + path, body, timeout)

    def routes(self, table: str = TABLE_ID) -> list[dict]:
        """The entries of one emulated route table (default: the system table, zone 1's)."""
        state = self.emulator("GET", "/_emulator/state")
        for found in state["route_tables"]:
            if found["RouteTableId"] == table:
                return found["entries"]
        return []

    def route_of(self, k: int, table: str = TABLE_ID, family: int = 4) -> dict | None:
        """Host k's custom entry of `family` (4 or 6) in `table`, or None."""
        for entry in self.routes(table):
            hops = entry.get("NextHops", {}).get("NextHop", [])
            if (entry.get("Type") == "Custom" and any(h.get("NextHopId") == instance_id(k) for h in hops)
                    and (":" in entry.get("DestinationCidrBlock", "")) == (family == 6)):
                return entry
        return None

    def host_cidr(self, k: int, network: str | None = None, family: int = 4) -> str:
        """Host k's block of `network` (default: the lab's) in `family` (4 or 6), or "". From host k's
        plugin state (read-only, as `vpcnet status` reads it): Docker's IPAM.Config shows a `--subnet` as
        given (the cluster CIDR), not the block the plugin answered; from Docker where there is no state."""
        if not (network or self.network):
            return ""
        proc = self.docker(k, "network", "inspect", network or self.network, "-f",
                           "{{.Id}} {{range .IPAM.Config}}{{.Subnet}} {{end}}", check=False, timeout=30)
        words = proc.stdout.split() if proc.returncode == 0 else []
        if not words:
            return ""
        row = self._plugin_network(k, words[0])
        if row is not None:
            return (row.host_cidr_v6 if family == 6 else row.host_cidr) or ""
        found = [s for s in words[1:] if (":" in s) == (family == 6)]
        return found[0] if found else ""

    def _plugin_network(self, k: int, network_id: str):
        """Host k's `vpcnet serve` state of network `network_id` (None without one)."""
        import sqlite3

        from vpcnet.state.store import Store

        db = os.path.join(self.host(k).paths.state_dir, "vpcnet.db")
        try:
            store = Store(db, readonly=True)
        except FileNotFoundError:
            return None
        try:
            return store.network(network_id)
        except sqlite3.Error:
            return None
        finally:
            store.close()

    def interface(self, k: int) -> dict:
        """Host k's primary ENI as the emulator holds it (`id`, `vswitch`, `ipv4_prefixes`, `ipv6_prefixes`,
        ...), or {} when the emulator does not know it."""
        return self._interfaces().get(instance_id(k), {})

    def _interfaces(self) -> dict[str, dict]:
        """instance id -> its primary ENI, from the emulator's state."""
        state = self.emulator("GET", "/_emulator/state")
        return {eni["instance"]: eni for eni in state.get("network_interfaces", {}).values()}

    def kernel_routes(self, zone: int | None = None, family: int = 4) -> list[str]:
        """The router's routes of `family` (4 or 6): of the main table, or of zone `zone`'s kernel table."""
        table = ["table", str(ZONE_KERNEL_TABLE_BASE + zone)] if zone else []
        return run(["ip", "-n", ROUTER_NS, f"-{family}", "route", "show", *table], check=False).stdout.splitlines()

    def _say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    # -- state ------------------------------------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            with open(STATE_FILE) as fh:
                self.state = json.load(fh)
        except (OSError, ValueError):
            self.state = {}
        if self.state:
            self.zones = int(self.state.get("zones", 1))
            self.ipv6 = bool(self.state.get("ipv6"))
            self.cluster_cidr_v6 = self.state.get("cluster_cidr_v6", DEFAULT_CLUSTER_V6)
            self.addressing = self.state.get("addressing", "route-table")
            self.instance_type = self.state.get("instance_type", DEFAULT_INSTANCE_TYPE)
        return self.state

    def _save_state(self) -> None:
        os.makedirs(RUN_ROOT, mode=0o700, exist_ok=True)
        tmp = STATE_FILE + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.state, fh, indent=2)
        os.replace(tmp, STATE_FILE)

    @contextmanager
    def _locked(self):
        os.makedirs(RUN_ROOT, mode=0o700, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LabError("another `vpcnet lab` command holds the lab lock (waited 120s)") from None
                    time.sleep(0.2)
            yield
        finally:
            os.close(fd)

    # -- up ---------------------------------------------------------------------------------------
    def up(self) -> "Lab":
        self._check_tools()
        with self._locked():
            wanted_zones, wanted6 = self.zones, (self.ipv6, self.cluster_cidr_v6)
            wanted_addressing = (self.addressing, self.instance_type)
            state = self._load_state()
            if state and (self.addressing, self.instance_type) != wanted_addressing:
                raise LabError(f"the lab is already up with --addressing {self.addressing} (instance type "
                               f"{self.instance_type}); run `vpcnet lab down` first to change it")
            if state and int(state.get("zones", 1)) != wanted_zones:
                raise LabError(f"the lab is already up with {state.get('zones', 1)} zone(s); run "
                               "`vpcnet lab down` first to change it")
            self.zones = wanted_zones
            self.ipv6, self.cluster_cidr_v6 = wanted6
            if state and state.get("cluster_cidr") != self.cluster_cidr:
                raise LabError(f"the lab is already up with cluster CIDR {state.get('cluster_cidr')}; "
                               "run `vpcnet lab down` first to change it")
            if state and (bool(state.get("ipv6")), state.get("cluster_cidr_v6", DEFAULT_CLUSTER_V6)) != wanted6:
                raise LabError("the lab is already up " + (f"with --ipv6 (IPv6 cluster CIDR "
                               f"{state.get('cluster_cidr_v6')})" if state.get("ipv6") else "without --ipv6")
                               + "; run `vpcnet lab down` first to change it")
            if not state:
                self.state = {"cluster_cidr": self.cluster_cidr, "network": self.network, "mode": self.mode,
                              "zones": self.zones, "ipv6": self.ipv6, "cluster_cidr_v6": self.cluster_cidr_v6,
                              "addressing": self.addressing, "instance_type": self.instance_type,
                              "reconcile_interval": self.reconcile_interval,
                              "key_secret": secrets.token_hex(16), "hosts": {}}
                self._save_state()
            else:
                self.network = state.get("network", self.network)
                self.mode = state.get("mode", "default")
                self.reconcile_interval = state.get("reconcile_interval", self.reconcile_interval)
            self._router_up()
            wanted = max(self.hosts, len(self.state["hosts"]))
            for k in range(1, wanted + 1):
                self._host_up(k)
        return self

    def add_host(self) -> int:
        """A host joining a running lab: returns its number."""
        with self._locked():
            self._load_state()
            if not self.state:
                raise LabError("the lab is not up")
            k = max((int(h) for h in self.state["hosts"]), default=0) + 1
            self._host_up(k)
            self.hosts = max(self.hosts, k)
            return k

    def _check_tools(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, Docker engines, mounts)")
        missing = [t for t in ("ip", "nsenter", "unshare", "dockerd", "docker", "mount") if not shutil.which(t)]
        if missing:
            raise LabError("missing tools: " + ", ".join(missing))

    def _router_up(self) -> None:
        netns.add(ROUTER_NS)
        netns.sysctl(ROUTER_NS, "net.ipv4.ip_forward", "1")
        netns.sysctl(ROUTER_NS, "net.ipv6.conf.all.forwarding", "1")
        # Hosts reach each other only through the router; it must not tell them to go direct.
        netns.sysctl(ROUTER_NS, "net.ipv4.conf.all.send_redirects", "0")
        netns.sysctl(ROUTER_NS, "net.ipv4.conf.default.send_redirects", "0")
        run(["ip", "-n", ROUTER_NS, "addr", "replace", f"{ROUTER_IP}/32", "dev", "lo"])
        run(["ip", "-n", ROUTER_NS, "-6", "addr", "replace", f"{ROUTER_IP6}/128", "dev", "lo", "nodad"])
        pid = self.state.get("emulator_pid")
        if pid and alive(pid) and "emulator" in engine_mod._cmdline(pid) and self._emulator_answers():
            return
        os.makedirs(DATA_ROOT, mode=0o711, exist_ok=True)
        env = engine_mod.with_code_path(engine_mod._clean_env())
        env["VPCNET_EMULATOR_ACCESS_KEYS"] = f"{KEY_ID}:{self.state['key_secret']}"
        cmd = ["nsenter", f"--net={netns.path(ROUTER_NS)}", "--", sys.executable, "-m", "vpcnet.cli",
               "emulator", "--router-netns", ROUTER_NS, "--listen", f"{ROUTER_IP}:{EMULATOR_PORT}",
               "--state", EMULATOR_STATE, "--region", REGION, "--vpc-id", VPC_ID, "--route-table-id", TABLE_ID,
               "--log-level", "warning"]
        if self.zones == 1:
            # eni-prefix: the vSwitch holds the hosts and the reserved range beside them, as in a VPC
            cmd += ["--vswitch-cidr", str(UNDERLAY_ALL if self.addressing == "eni-prefix" else UNDERLAY)]
            if self.addressing == "eni-prefix":
                # the range prefixes come from, and the vSwitch's IPv6 CIDR (always: the underlay is
                # dual-stack with or without --ipv6, so a dual-stack network works on any lab)
                cmd += ["--prefix-range", f"{LAB_VSWITCH}={self.cluster_cidr}",
                        "--vswitch-ipv6", f"{LAB_VSWITCH}={self.cluster_cidr_v6}"]
        else:
            for z in range(1, self.zones + 1):
                cmd += ["--vswitch-cidr", str(zone_subnet(z)),
                        "--route-table", f"{zone_table(z)}={zone_vswitch(z)}:{zone_subnet(z)}",
                        "--kernel-table", f"{zone_table(z)}={ZONE_KERNEL_TABLE_BASE + z}"]
        for k in sorted(int(h) for h in self.state["hosts"]):
            cmd += ["--instance", f"{instance_id(k)}={self.host_ip(k)},{self.host_ip6(k)}"]
        with open(EMULATOR_LOG, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env)
        self.state["emulator_pid"] = proc.pid
        self._save_state()
        with open(EMULATOR_PIDFILE, "w") as fh:
            fh.write(f"{proc.pid}\n")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"the emulator exited {proc.returncode}:\n" + engine_mod._tail(EMULATOR_LOG))
            if self._emulator_answers():
                self._say(f"router {ROUTER_NS}: emulator on {self.emulator_url} (router netns)"
                          + (f", {self.zones} zones: tables {', '.join(self.zone_tables())}" if self.zones > 1
                             else ""))
                self._zone_tables_up(self.cluster_cidr)
                self._zone_tables_up(self.cluster_cidr_v6)
                return
            time.sleep(0.2)
        raise LabError("the emulator did not answer within 20s:\n" + engine_mod._tail(EMULATOR_LOG))

    def _zone_tables_up(self, cluster_cidr: str) -> None:
        """Each zone's kernel table ends in `unreachable <cluster CIDR>` (either family): a host route
        missing from the zone's table must not fall through to another table."""
        family = "-6" if ":" in cluster_cidr else "-4"
        for z in range(1, self.zones + 1) if self.zones > 1 else ():
            run(["ip", "-n", ROUTER_NS, family, "route", "replace", "unreachable", cluster_cidr,
                 "table", str(ZONE_KERNEL_TABLE_BASE + z)])

    def _zone_rule(self, k: int) -> None:
        """Packets from host K are routed by its zone's table (by incoming link)."""
        if self.zones == 1:
            return
        pref = str(RULE_PREF_BASE + k)
        for family in ("-4", "-6"):
            run(["ip", "-n", ROUTER_NS, family, "rule", "del", "pref", pref], check=False)
            run(["ip", "-n", ROUTER_NS, family, "rule", "add", "pref", pref, "iif", f"to-h{k}",
                 "lookup", str(ZONE_KERNEL_TABLE_BASE + self.zone_of(k))])

    def _emulator_answers(self) -> bool:
        try:
            self.emulator("GET", "/_emulator/state", timeout=3)
            return True
        except LabError:
            return False

    def plugin_settings(self, k: int) -> dict[str, str]:
        settings = {
            "VPCNET_PROVIDER": "aliyun",
            "VPCNET_CLUSTER_CIDR": self.cluster_cidr,
            "VPCNET_CLUSTER_CIDR_V6": self.cluster_cidr_v6,
            "VPCNET_RECONCILE_INTERVAL": str(self.reconcile_interval),
            "VPCNET_LOG_LEVEL": "INFO",
            "VPCNET_ALIYUN_ENDPOINT": self.emulator_url,
            "VPCNET_ALIYUN_REGION_ID": REGION,
            "VPCNET_ALIYUN_VPC_ID": VPC_ID,
            # several zones: the plugin finds the tables from the vSwitches bound to them
            "VPCNET_ALIYUN_ROUTE_TABLE_ID": TABLE_ID if self.zones == 1 else "",
            "VPCNET_ALIYUN_INSTANCE_ID": instance_id(k),
            "VPCNET_ALIYUN_ACCESS_KEY_ID": KEY_ID,
            "VPCNET_ALIYUN_ACCESS_KEY_SECRET": self.state["key_secret"],
            "VPCNET_ALIYUN_METADATA_URL": CLOSED_PORT_URL,
            # /metrics on the host's underlay address: a Prometheus in the router's namespace scrapes every host
            "VPCNET_METRICS_ADDR": f"{self.host_ip(k)}:{METRICS_PORT}",
            # the names come from this host's own engine (the plugin runs in its mount namespace)
            "VPCNET_DOCKER_SOCKET": self.host(k).paths.socket,
        }
        if self.addressing == "eni-prefix":
            from vpcnet_lab.emulator.enis import eni_id_of
            settings.update({
                "VPCNET_ADDRESSING": "eni-prefix",       # VPCNET_CLUSTER_CIDR above: the reserved range
                "VPCNET_ALIYUN_ECS_ENDPOINT": self.emulator_url,
                "VPCNET_ALIYUN_NETWORK_INTERFACE_ID": eni_id_of(instance_id(k)),
            })
        return settings

    def _host_up(self, k: int) -> None:
        name, ip, ip6 = host_netns(k), self.host_ip(k), self.host_ip6(k)
        self.state["hosts"].setdefault(str(k), {"netns": name, "ip": ip, "ip6": ip6, "zone": self.zone_of(k)})
        self._save_state()
        netns.add(name)
        netns.p2p_link(ROUTER_NS, f"to-h{k}", ROUTER_IP, name, HOST_IF, ip,
                       router_ip6=router_ip6(self.zone_of(k)), host_ip6=ip6)
        self._zone_rule(k)
        netns.sysctl(name, "net.ipv4.ip_forward", "1")
        self.emulator("POST", "/_emulator/instances", {"instance_id": instance_id(k), "ip": ip, "ip6": ip6,
                                                       "instance_type": self.instance_type})
        host = self.host(k)
        started = host.engine_pid() is None
        host.start_engine()
        host.start_plugin(self.plugin_settings(k))
        if self.load_image:
            from vpcnet_lab import image
            image.build(docker=host.docker)
        cidr = self._ensure_network(k)
        self.state["hosts"][str(k)].update({"docker_host": host.paths.docker_host, "host_cidr": cidr})
        self._save_state()
        cidr6 = self.host_cidr(k, family=6) if self.ipv6 and self.network else ""
        if cidr6:
            self.state["hosts"][str(k)]["host_cidr6"] = cidr6
            self._save_state()
        where = (f"ENI {self.plugin_settings(k)['VPCNET_ALIYUN_NETWORK_INTERFACE_ID']} ({self.instance_type})"
                 if self.addressing == "eni-prefix" else f"host CIDR {cidr}{' ' + cidr6 if cidr6 else ''}")
        self._say(f"h{k}: {'started' if started else 'already up'}  netns {name}  underlay {ip} {ip6}  {where}\n"
                  f"    export DOCKER_HOST={host.paths.docker_host}")

    def _ensure_network(self, k: int, timeout: float = NETWORK_TIMEOUT) -> str:
        """The lab's network on host k (none when the lab has no network name): its host CIDR, "" in
        eni-prefix addressing, where a host has prefixes instead of a block."""
        if not self.network:
            return ""
        cidr = self.host_cidr(k)
        if cidr:
            return cidr
        self.create_network(self.network, mode=self.mode, hosts=[k], timeout=timeout, ipv6=self.ipv6)
        if self.addressing == "eni-prefix":
            return ""
        cidr = self.host_cidr(k)
        if not cidr:
            raise LabError(f"h{k}: network {self.network} has no host CIDR")
        if self.ipv6 and not self.host_cidr(k, family=6):
            raise LabError(f"h{k}: network {self.network} has no IPv6 host block")
        return cidr

    def create_network(self, name: str, cluster_cidr: str | None = None, mode: str = "default",
                       hosts: list[int] | None = None, timeout: float = NETWORK_TIMEOUT, ipv6: bool = False,
                       cluster_cidr_v6: str | None = None) -> None:
        """A vpcnet network on each host (all by default), on `cluster_cidr` (default: the lab's) in
        `mode` (default: no -o vpcnet.mode, so the plugin's default); with `ipv6`, dual-stack on
        `cluster_cidr_v6` (given as an IPv6 --subnet; default: none, the plugins' default, the lab's). A
        host claims its block of a new cluster CIDR on the first request ("claim in progress"), so each
        create is retried until it succeeds or `timeout` passes. Safe to repeat."""
        options = ["--subnet", cluster_cidr] if cluster_cidr else []
        if cluster_cidr:
            self._zone_tables_up(cluster_cidr)
        if ipv6:
            options += ["--ipv6", *(("--subnet", cluster_cidr_v6) if cluster_cidr_v6 else ())]
            self._zone_tables_up(cluster_cidr_v6 or self.cluster_cidr_v6)
        if mode != "default":
            options += ["-o", f"vpcnet.mode={mode}"]
        for k in hosts or self.host_indexes():
            deadline = time.monotonic() + timeout
            while True:
                proc = self.docker(k, "network", "create", "-d", "vpcnet", "--ipam-driver", "vpcnet", *options,
                                   name, check=False, timeout=60)
                if proc.returncode == 0 or "already exists" in proc.stderr:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"h{k}: network {name} not created within {timeout:.0f}s: "
                                   f"{proc.stderr.strip()}\n" + engine_mod._tail(self.host(k).paths.plugin_log))
                time.sleep(1.0)

    # -- plugin control (tests) ----------------------------------------------------------------------
    def kill_plugin(self, k: int) -> None:
        self.host(k).kill_plugin(signal.SIGKILL)

    def start_plugin(self, k: int) -> int:
        self._load_state()
        return self.host(k).start_plugin(self.plugin_settings(k))

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        state = self._load_state()
        if not state:
            return {"up": False, "leftovers": self.leftovers()}
        emulator_up = self._emulator_answers()
        entries = self.routes() if emulator_up else []
        interfaces = self._interfaces() if emulator_up else {}
        hosts = []
        for k in sorted(int(h) for h in state.get("hosts", {})):
            host = self.host(k)
            engine_up = host.engine_pid() is not None
            route = route6 = None
            for entry in entries:
                hops = entry.get("NextHops", {}).get("NextHop", [])
                if entry.get("Type") == "Custom" and any(h.get("NextHopId") == instance_id(k) for h in hops):
                    found = {"destination": entry["DestinationCidrBlock"], "status": entry["Status"],
                             "entry_id": entry["RouteEntryId"]}
                    if ":" in found["destination"]:
                        route6 = found
                    else:
                        route = found
            hosts.append({
                "host": f"h{k}", "netns": host_netns(k), "underlay_ip": self.host_ip(k),
                "underlay_ip6": self.host_ip6(k), "instance_id": instance_id(k),
                "zone": self.zone_of(k),
                "docker_host": host.paths.docker_host, "engine_up": engine_up,
                "plugin_up": host.plugin_pid() is not None,
                "host_cidr": (self.host_cidr(k) if engine_up else "") or state["hosts"][str(k)].get("host_cidr", ""),
                "route": route, "route_available": bool(route and route["status"] == "Available"),
                "host_cidr6": ((self.host_cidr(k, family=6) if engine_up else "")
                               or state["hosts"][str(k)].get("host_cidr6", "")),
                "route6": route6, "route6_available": bool(route6 and route6["status"] == "Available"),
                "network_interface_id": interfaces.get(instance_id(k), {}).get("id", ""),
                "prefixes": list(interfaces.get(instance_id(k), {}).get("ipv4_prefixes", [])),
                "prefixes6": list(interfaces.get(instance_id(k), {}).get("ipv6_prefixes", [])),
            })
        return {"up": emulator_up and all(h["engine_up"] and h["plugin_up"] for h in hosts),
                "cluster_cidr": state.get("cluster_cidr"), "network": state.get("network"),
                "ipv6": bool(state.get("ipv6")), "cluster_cidr_v6": self.cluster_cidr_v6,
                "mode": state.get("mode", "bridge"),
                "addressing": state.get("addressing", "route-table"),
                "instance_type": state.get("instance_type", DEFAULT_INSTANCE_TYPE),
                "router_netns": ROUTER_NS, "emulator_url": self.emulator_url, "emulator_up": emulator_up,
                "hosts": hosts,
                "zones": self.zones,
                "route_tables": {t: [e["DestinationCidrBlock"] + " -> " + ",".join(
                    h.get("NextHopId", "") for h in e.get("NextHops", {}).get("NextHop", []))
                    for e in (self.routes(t) if emulator_up else []) if e["Type"] == "Custom"]
                    for t in self.zone_tables()} if self.zones > 1 else {},
                "route_table": [{"destination": e["DestinationCidrBlock"], "type": e["Type"],
                                 "status": e["Status"], "entry_id": e["RouteEntryId"],
                                 "next_hop": ",".join(h.get("NextHopId", "") for h in
                                                      e.get("NextHops", {}).get("NextHop", []))}
                                for e in entries],
                "kernel_routes": self.kernel_routes() if netns.exists(ROUTER_NS) else [],
                "kernel_routes6": self.kernel_routes(family=6) if netns.exists(ROUTER_NS) else []}

    @staticmethod
    def leftovers() -> dict:
        """What of the lab exists on this machine (empty lists after a clean `down`)."""
        dockerds = [pid for pid in (int(p) for p in os.listdir("/proc") if p.isdigit())
                    if any(RUN_ROOT + "/" in part for part in engine_mod._cmdline(pid))]
        return {"netns": netns.listed(PREFIX), "processes": dockerds, "mounts": engine_mod.lab_mounts(),
                "dirs": [d for d in (RUN_ROOT, DATA_ROOT) if os.path.exists(d)]}

    @classmethod
    def present(cls) -> dict:
        """What of a lab is on this machine (empty: none), after removing the files of a lab whose machine
        went away under it. Files alone, with no namespace, engine, mount or emulator left and the lab lock
        free, are what a reboot or a torn-down sandbox leaves: they block nothing and are removed here."""
        left = {kind: items for kind, items in cls.leftovers().items() if items}
        if set(left) != {"dirs"}:
            return left
        if os.path.isdir(RUN_ROOT):
            fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return left                                   # a `vpcnet lab` command is running
                if alive(engine_mod._read_pid(EMULATOR_PIDFILE)):
                    return left
                shutil.rmtree(RUN_ROOT, ignore_errors=True)
            finally:
                os.close(fd)
        engine_mod._remove_tree(DATA_ROOT)
        return {kind: items for kind, items in cls.leftovers().items() if items}

    # -- down -------------------------------------------------------------------------------------
    def down(self) -> list[str]:
        """Remove everything of the lab that exists. Returns what could not be removed (empty: clean)."""
        os.makedirs(RUN_ROOT, mode=0o700, exist_ok=True)
        with self._locked():
            state = self._load_state()
            indexes = {int(h) for h in state.get("hosts", {})}
            for name in netns.listed(PREFIX + "h"):
                if name[len(PREFIX) + 1:].isdigit():
                    indexes.add(int(name[len(PREFIX) + 1:]))
            for root in (RUN_ROOT, DATA_ROOT):
                if os.path.isdir(root):
                    for entry in os.listdir(root):
                        if entry.startswith("h") and entry[1:].isdigit():
                            indexes.add(int(entry[1:]))
            for k in sorted(indexes):
                host = self.host(k)
                host.stop_engine()           # containers first, while the plugin still answers
                host.stop_plugin()
            pid = state.get("emulator_pid") or engine_mod._read_pid(EMULATOR_PIDFILE)
            if pid and "emulator" in engine_mod._cmdline(pid) and ROUTER_NS in engine_mod._cmdline(pid):
                engine_mod._stop_pid(pid, group=True, timeout=10.0)
            for k in sorted(indexes):
                engine_mod.kill_cgroup(self.host(k).paths.cgroup_parent)
                netns.delete(host_netns(k))
            for name in netns.listed(PREFIX):
                netns.delete(name)
            for k in sorted(indexes):
                self.host(k).remove_files()
            engine_mod._remove_tree(DATA_ROOT)
            for mnt in sorted(engine_mod.lab_mounts(RUN_ROOT), reverse=True):
                run(["umount", "-l", mnt], check=False)
            for entry in os.listdir(RUN_ROOT) if os.path.isdir(RUN_ROOT) else []:
                if entry != os.path.basename(LOCK_FILE):
                    p = os.path.join(RUN_ROOT, entry)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
        shutil.rmtree(RUN_ROOT, ignore_errors=True)
        self.state = {}
        left = self.leftovers()
        return [f"{kind}: {items}" for kind, items in left.items() if items]

    # -- context manager --------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc) -> None:
        self.down()
