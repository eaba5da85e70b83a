#!/usr/bin/env python3
"""vpcnet versus the underlay, Docker's VXLAN overlay and Docker's bridge network, on one lab, in one run.

    python3 bench/run.py [--rounds 9] [--duration 3] [--crr-seconds 2] [--flows-seconds 2] [--profile]
                         [--profile-runs 1] [--ipv6] [--addressing route-table|eni-prefix]
    python3 bench/run.py --rounds 9 --profile --estimate      how long that takes, without running it

Builds a `vpcnet lab` (root; refuses to run next to a lab already up) and measures two groups of
contenders.

Across hosts (a client on host 1, its server on host 2):
  underlay       host namespace <-> host namespace (the limit of this setup: every packet crosses the router)
  vpcnet         container <-> container on `vpc0`, the lab's vpcnet network, created with no -o option:
                 what a user gets from the README's commands (the mode it resolves to is in the results)
  vpcnet-bridge, vpcnet-routed, vpcnet-ebpf
                 the same on a network per explicit mode (`-o vpcnet.mode=<mode>`, a cluster CIDR each).
                 The explicit mode the default resolves to is left out (it is the same datapath twice)
                 unless --all-modes.
  overlay        Docker's overlay (swarm across the lab engines, `-d overlay --attachable`)
  bridge         Docker's default bridge on each host, the server's ports published on h2 (NAT both ends)
With --ipv6 (the lab comes up with `--ipv6`: vpc0 dual-stack), also across hosts, over IPv6:
  underlay-v6    host namespace <-> host namespace, between their IPv6 underlay addresses
  vpcnet-v6      the `vpcnet` contender's two containers on vpc0, between their IPv6 addresses
  overlay-v6     Docker's overlay made dual-stack (`ov6`: --ipv6 and an IPv6 --subnet), between the
                 containers' IPv6 addresses. Where Docker's overlay does not carry IPv6 across hosts, the
                 contender is left out, and the results (`meta.not_measured`) and the Markdown say so with
                 what was seen: a container that cannot attach (with the engine log's task error), the same
                 IPv6 address on both, or no reply between them (with the neighbour entry: the overlay adds
                 neighbour entries for the containers' IPv4 addresses only, moby/moby#47125).
  Each is held to the IPv4 goals against the baselines of its own family (bench/goals.py). A flag, not
  always: the IPv6 contenders add a third to every round, and runs without it stay comparable with the
  IPv4-only runs before them (the lab, its network and contenders unchanged).
With --addressing eni-prefix (the lab comes up with `vpcnet lab up --addressing eni-prefix`: each host's
containers take their addresses from /28 (and /80) prefixes its plugin assigns to its ENI, the route table
holds no vpcnet route, docs/eni-prefix.md):
  vpcnet-eni     in place of `vpcnet`: the containers on vpc0 (no -o option), in that addressing; with --ipv6
                 `vpcnet-eni-v6` in place of `vpcnet-v6`. Held to the same goals as `vpcnet`.
  No explicit-mode contenders: a host has one vpcnet network per range in that addressing (the lab's range
  is vpc0's), and bridge mode is refused there; the results' `meta.not_measured` says so. The underlay,
  Docker's overlay and bridge are measured as in route-table addressing (they do not depend on it).
  Results go to eni-prefix.{json,md,png}, so latest.* stays the route-table run's (--readme is refused).
On one host (client and server containers both on host 1):
  vpcnet, vpcnet-<mode>   two containers on the same vpcnet network (vpcnet-eni: --addressing eni-prefix)
  docker-bridge           two containers on a user-defined `docker network create` bridge network
Each round runs every metric for every contender, in a rotated order, so drifts hit all alike.

The measuring programs are the host's own iperf3 and bench/rr.py, entered into each contender's network
namespace with `nsenter --net=` (for containers: /proc/<container pid>/ns/net), so the only thing that
differs between contenders is the network path.

Metrics:
  TCP throughput, 1 and 4 streams   iperf3, receiver bits/s, --duration seconds
  UDP 64 B datagrams                iperf3 `-u -l 64 -b 0`: (packets - lost) / seconds
  RR p50, p99                       bench/rr.py client: 64-byte ping-pongs on one warm connection
  connections/s (TCP_CRR shape)     bench/rr.py crr: connect, one 64-byte request and response, close,
                                    for --crr-seconds; also each connection's p50/p99
  64 flows transactions/s           bench/rr.py flows: 64 connections with a request in flight each, for
                                    --flows-seconds. Why this one for "many flows": with 64 in flight
                                    the CPUs never idle, so the rate is set by the CPU each transaction
                                    costs, i.e. by what the path does per packet of every flow (rule
                                    walks, conntrack lookups, forwarding, the bridge), where the
                                    one-connection RR measures the delay and leaves the CPUs idle; and
                                    CRR covers the per-connection cost (conntrack entries, SYN handling).
                                    64 parallel bulk streams would measure bytes, which GRO and TSO
                                    batch, and hide a per-flow cost.
  docker run -d                     wall time on host 1, per network (the ratio to Docker's bridge
                                    network is a goal)
  MTU                               each contender's client interface
  CPU ms per GB (--profile)         perf during one more TCP stream per cross-host contender
                                    (bench/cpu_profile.py); --profile-runs N: N such streams per
                                    contender, the contenders rotated each run, so the CPU goal is
                                    judged on paired runs as the others on rounds
The Python of rr.py costs the same on every path; it is part of each figure, so ratios between paths
understate the paths' own differences a little (absolute rates are rr.py's, not the kernel's limit).

Goals (checked by bench/goals.py for the default network and each explicit mode, naming the
fastest): in the results' `goals` and the Markdown's goal table.

Writes latest.json, latest.md and latest.png (not with --no-chart) into --out (default bench/results), or
eni-prefix.* with --addressing eni-prefix;
--readme also puts the table into docs/benchmarks.md between its markers. The lab is always taken down at
the end. The chart needs matplotlib (`pip install '.[bench]'`): a run without it stops before it starts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "lab")]  # vpcnet, vpcnet_lab

import cpu_profile  # noqa: E402  (bench/, next to this file)
import goals  # noqa: E402
import report  # noqa: E402

from vpcnet_lab import Lab, LabError  # noqa: E402
from vpcnet_lab.lab import ADDRESSING_MODES  # noqa: E402

IMAGE = "vpcnet-testbox:latest"
CLUSTER = "10.240.0.0/16"                # vpc0, the lab's network: no -o option (route-table addressing;
                                         # eni-prefix takes the lab's reserved range inside its vSwitch)
DEFAULT_NET = "vpc0"
MODES = ("bridge", "routed", "ebpf")
MODE_NETWORKS = {"bridge": ("vpcb", "10.243.0.0/16"), "routed": ("vpcr", "10.241.0.0/16"),
                 "ebpf": ("vpce", "10.242.0.0/16")}
DOCKER_BRIDGE_NET = "benchbr"            # the same-host baseline: a user-defined bridge network on h1
CROSS, SAME = goals.CROSS, goals.SAME
CROSS_NAMES, SAME_NAMES, METRICS, FLOWS = report.CROSS_NAMES, report.SAME_NAMES, report.METRICS, report.FLOWS
ALL = [(CROSS, n) for n in CROSS_NAMES] + [(SAME, n) for n in SAME_NAMES]
RR = os.path.join(HERE, "rr.py")
PROBES = ("tcp1", "tcp4", "udp", "rr", "crr", "flows", "start")   # one measurement each, in this order
# Seconds each step takes on this 2-CPU machine, for --estimate (a 1-round run at --duration 2, load ~4:
# 113 s for 10 contenders and 7 networks, 144 s in all; set-up and take-down padded for a slower start).
COST = {"iperf_overhead": 0.15, "rr_per_pingpong": 50e-6, "client_start": 0.1, "flows_connect": 0.05,
        "docker_run": 0.8, "setup": 60.0, "setup_per_container": 1.0, "profile_per_contender": 8.0,
        "teardown": 20.0}
V6_CONTENDERS = ("underlay-v6", "vpcnet-v6", "overlay-v6")   # --ipv6: the IPv6 twins of these three
OVERLAY_V6 = ("ov6", "10.0.250.0/24", "fd00:250::/64")      # Docker's dual-stack overlay: name, subnets
OVERLAY_V6_ADDRESS = "fd00:250::a2"                        # --ip6 of h2's container, if needed (overlay_v6)
ENI_PREFIX = "eni-prefix"                                  # --addressing: the lab's, as `vpcnet lab up` takes it


def addressing(args) -> str:
    return getattr(args, "addressing", "route-table")


def default_contender(args) -> str:
    """The name of the default network's contender: `vpcnet`, or `vpcnet-eni` in eni-prefix addressing."""
    return goals.ENI if addressing(args) == ENI_PREFIX else goals.DEFAULT


def results_name(args) -> str:
    """The results files' name: latest.* for route-table runs, eni-prefix.* for the other addressing."""
    return "latest" if addressing(args) == "route-table" else addressing(args)


def sh(cmd: list[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ports(group: str, name: str) -> tuple[int, int, int]:
    """(iperf3, rr, rr flows) ports of a contender: distinct for every contender."""
    i = ALL.index((group, name))
    return 5201 + i, 5301 + i, 5401 + i


class Endpoint:
    """One side of a contender: a network namespace path, and the address the peer uses to reach it."""

    def __init__(self, ns_path: str, address: str, mtu_dev: str, address6: str = ""):
        self.ns_path, self.address, self.mtu_dev, self.address6 = ns_path, address, mtu_dev, address6

    def cmd(self, *args: str) -> list[str]:
        return ["nsenter", f"--net={self.ns_path}", "--", *args]

    def mtu(self) -> int:
        words = sh(self.cmd("ip", "-o", "link", "show", "dev", self.mtu_dev)).stdout.split()
        return int(words[words.index("mtu") + 1])       # (/sys is the host's under nsenter --net)


@dataclass
class Contender:
    group: str
    name: str
    client: Endpoint
    server: Endpoint
    target: str                       # the address the client sends to
    network: str | None               # the Docker network (for `docker run` time); None: no containers

    @property
    def ports(self) -> tuple[int, int, int]:
        return ports(self.group, self.name)

    @property
    def key(self) -> str:
        return f"{self.group}:{self.name}"


def wanted_modes(args, default_mode: str | None) -> list[str]:
    """The explicit modes to measure: all but --skip-mode, and but the one the default already is. None in
    eni-prefix addressing: a host has one vpcnet network per range there, the lab's."""
    if addressing(args) == ENI_PREFIX:
        return []
    return [m for m in MODES if m not in args.skip_mode and (args.all_modes or m != default_mode)]


def estimate(args, default_mode: str | None = "bridge") -> dict:
    """Expected seconds of a run with these options (COST: this machine's figures)."""
    modes = len(wanted_modes(args, default_mode))
    ipv6 = getattr(args, "ipv6", False)
    v6 = len(V6_CONTENDERS) if ipv6 else 0
    cross = 3 + modes + (0 if args.no_bridge else 1) + v6       # underlay, vpcnet, overlay (+ bridge, + IPv6's)
    same = 0 if args.no_same_host else 2 + modes                # vpcnet, docker-bridge
    networks = 2 + modes + (0 if args.no_bridge else 1) + (0 if args.no_same_host else 1) + (1 if ipv6 else 0)
    c = COST
    per_contender = (3 * (args.duration + c["iperf_overhead"]) + args.rr_count * c["rr_per_pingpong"]
                     + args.crr_seconds + args.flows_seconds + c["flows_connect"] + 3 * c["client_start"])
    per_round = (cross + same) * per_contender + networks * c["docker_run"]
    # two containers per cross-host contender but the underlays (vpcnet-v6 shares vpcnet's), ~one per same-host
    setup = c["setup"] + c["setup_per_container"] * 2 * (cross - 1 - v6 + same + (1 if ipv6 else 0))
    runs = getattr(args, "profile_runs", 1)
    profile = runs * cross * (args.duration + c["profile_per_contender"]) if args.profile else 0.0
    total = setup + args.rounds * per_round + profile + c["teardown"]
    return {"contenders": {"cross": cross, "same": same}, "setup_s": setup, "per_round_s": per_round,
            "profile_s": profile, "total_s": total, "addressing": addressing(args)}


def estimate_text(est: dict, rounds: int) -> str:
    where = f" ({est['addressing']} addressing)" if est.get("addressing", "route-table") != "route-table" else ""
    return (f"{est['contenders']['cross']} cross-host + {est['contenders']['same']} same-host contenders{where}, "
            f"{rounds} rounds: expected ~{est['total_s'] / 60:.0f} min (set-up {est['setup_s'] / 60:.1f} min, "
            f"{est['per_round_s']:.0f} s per round, profile {est['profile_s'] / 60:.1f} min; "
            "this 2-CPU machine's figures, more when it is busy)")


class Bench:
    def __init__(self, lab: Lab, args):
        self.lab, self.args = lab, args
        self.servers: list[subprocess.Popen] = []
        self.contenders: list[Contender] = []
        self.samples: dict[str, dict[str, dict[str, list[float]]]] = {
            g: {m[0]: {} for m in METRICS} for g in (CROSS, SAME)}
        self.mtu: dict[str, dict[str, int]] = {CROSS: {}, SAME: {}}
        self.default_mode: str | None = None
        self.modes: list[str] = []
        self.cpu: dict[str, dict] = {}
        self.not_measured: dict[str, str] = {}          # contender -> why it was left out

    # -- set-up -----------------------------------------------------------------------------------
    def container(self, k: int, name: str, network: str, *extra: str) -> Endpoint:
        self.lab.docker(k, "run", "-d", "--name", name, "--network", network, *extra, IMAGE, "sleep", "86400")
        pid = self.lab.docker(k, "inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
        net = f"(index .NetworkSettings.Networks \"{network}\")"
        out = self.lab.docker(k, "inspect", "-f", f"{{{{{net}.IPAddress}}}} {{{{{net}.GlobalIPv6Address}}}}",
                              name).stdout
        ip, _, ip6 = out.strip("\n").partition(" ")
        return Endpoint(f"/proc/{pid}/ns/net", ip.strip(), "eth0", ip6.strip())

    def create_vpcnet_network(self, name: str, cluster: str, mode: str, timeout: float = 90.0) -> None:
        """`-o vpcnet.mode=<mode>` on every lab host (Lab.create_network's "bridge" may mean no -o). A host
        claims its block of a new cluster CIDR on the first request, so retry until created."""
        for k in self.lab.host_indexes():
            deadline = time.monotonic() + timeout
            while True:
                proc = self.lab.docker(k, "network", "create", "-d", "vpcnet", "--ipam-driver", "vpcnet",
                                       "--subnet", cluster, "-o", f"vpcnet.mode={mode}", name, check=False, timeout=60)
                if proc.returncode == 0 or "already exists" in proc.stderr:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"h{k}: network {name} not created within {timeout:.0f}s: {proc.stderr.strip()}")
                time.sleep(1.0)

    def network_mode(self, k: int, network: str) -> str | None:
        """The mode host k's plugin stored for a network (`vpcnet status`); None if it cannot be read."""
        nid = self.lab.docker(k, "network", "inspect", "-f", "{{.Id}}", network).stdout.strip()
        env = dict(os.environ, VPCNET_STATE_DIR=self.lab.host(k).paths.state_dir)
        proc = sh([sys.executable, "-m", "vpcnet.cli", "status", "--config", os.devnull, "--json"], env=env,
                  check=False, timeout=60)
        try:
            found = [n for n in json.loads(proc.stdout)["networks"] if n["network_id"] == nid]
        except (ValueError, KeyError):
            return None
        return found[0].get("mode") if found else None

    def check_default_network(self) -> None:
        options = self.lab.docker(1, "network", "inspect", "-f", "{{json .Options}}", DEFAULT_NET).stdout
        if "vpcnet.mode" in options:
            raise RuntimeError(f"the lab created {DEFAULT_NET} with {options.strip()}: the default contender must "
                               "have no -o vpcnet.mode option")
        self.default_mode = self.network_mode(1, DEFAULT_NET)

    def add(self, group: str, name: str, client: Endpoint, server: Endpoint, target: str,
            network: str | None) -> None:
        self.contenders.append(Contender(group, name, client, server, target, network))

    def setup(self) -> None:
        lab, args = self.lab, self.args
        self.check_default_network()
        self.modes = wanted_modes(args, self.default_mode)
        if addressing(args) == ENI_PREFIX:
            self.not_measured.update(self.eni_prefix_left_out())
        print(f"default network {DEFAULT_NET} (no -o, {addressing(args)} addressing): mode "
              f"{self.default_mode or 'unknown'}; explicit modes measured: {', '.join(self.modes) or 'none'}",
              flush=True)
        h1 = Endpoint(f"/run/netns/{lab.host_netns(1)}", lab.host_ip(1), "uplink")
        h2 = Endpoint(f"/run/netns/{lab.host_netns(2)}", lab.host_ip(2), "uplink")
        self.add(CROSS, "underlay", h1, h2, h2.address, None)
        if args.ipv6:
            h1_6 = Endpoint(h1.ns_path, lab.host_ip6(1), "uplink", lab.host_ip6(1))
            h2_6 = Endpoint(h2.ns_path, lab.host_ip6(2), "uplink", lab.host_ip6(2))
            self.add(CROSS, "underlay-v6", h1_6, h2_6, h2_6.address6, None)
        default = default_contender(args)
        vpcnets = [(default, DEFAULT_NET)]
        for mode in self.modes:
            network, cluster = MODE_NETWORKS[mode]
            self.create_vpcnet_network(network, cluster, mode)
            vpcnets.append((f"vpcnet-{mode}", network))
        for name, network in vpcnets:
            a, b = self.container(1, f"bench-{network}-1", network), self.container(2, f"bench-{network}-2", network)
            self.add(CROSS, name, a, b, b.address, network)
            if args.ipv6 and network == DEFAULT_NET:
                if not (a.address6 and b.address6):
                    raise RuntimeError(f"--ipv6: the containers on {DEFAULT_NET} got no IPv6 address "
                                       f"({a.address6 or '-'}, {b.address6 or '-'}): is the lab's network dual-stack?")
                self.add(CROSS, default + goals.V6, a, b, b.address6, network)
            if not args.no_same_host:
                s = self.container(1, f"bench-{network}-s", network)
                self.add(SAME, name, a, s, s.address, network)
        # Docker's overlay: a swarm across the lab's two engines (lab engines only, never the default one).
        lab.docker(1, "swarm", "init", "--advertise-addr", lab.host_ip(1), "--listen-addr", f"{lab.host_ip(1)}:2377")
        token = lab.docker(1, "swarm", "join-token", "-q", "worker").stdout.strip()
        lab.docker(2, "swarm", "join", "--token", token, "--advertise-addr", lab.host_ip(2),
                   "--listen-addr", f"{lab.host_ip(2)}:2377", f"{lab.host_ip(1)}:2377", timeout=60)
        lab.docker(1, "network", "create", "-d", "overlay", "--attachable", "ov")
        a, b = self.container(1, "bench-ov1", "ov"), self.container(2, "bench-ov2", "ov")
        self.add(CROSS, "overlay", a, b, b.address, "ov")
        if args.ipv6:
            self.overlay_v6()
        if not args.no_bridge:
            ip, rr, fl = ports(CROSS, "bridge")
            a = self.container(1, "bench-br1", "bridge")
            b = self.container(2, "bench-br2", "bridge", "-p", f"{ip}:{ip}", "-p", f"{ip}:{ip}/udp",
                               "-p", f"{rr}:{rr}", "-p", f"{fl}:{fl}")
            self.add(CROSS, "bridge", a, b, lab.host_ip(2), "bridge")     # published ports on h2's address
        if not args.no_same_host:
            lab.docker(1, "network", "create", "-d", "bridge", DOCKER_BRIDGE_NET)
            a = self.container(1, "bench-dbr1", DOCKER_BRIDGE_NET)
            b = self.container(1, "bench-dbr2", DOCKER_BRIDGE_NET)
            self.add(SAME, "docker-bridge", a, b, b.address, DOCKER_BRIDGE_NET)
        for c in self.contenders:
            ip, rr, fl = c.ports
            for cmd in (c.server.cmd("iperf3", "-s", "-p", str(ip)),
                        c.server.cmd(sys.executable, RR, "server", "--port", str(rr), "--flows-port", str(fl),
                                     "--max-seconds", "7200")):
                self.servers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                     start_new_session=True))
            self.mtu[c.group][c.name] = c.client.mtu()
        for c in self.contenders:           # a new cluster CIDR's route on each host is a reconcile away
            self.wait_reachable(c)
        time.sleep(1.0)

    def eni_prefix_left_out(self) -> dict[str, str]:
        """The explicit-mode contenders eni-prefix addressing cannot have, and why (the default's own mode
        is left out as in route-table addressing: the same datapath twice)."""
        why = {"bridge": "bridge mode is refused in eni-prefix addressing: a bridge needs an on-link block of its "
                         "own per host, and the range is shared by all hosts (docs/eni-prefix.md)"}
        for mode in MODES:
            if mode not in why and mode != self.default_mode:
                why[mode] = (f"a host has one vpcnet network per range in eni-prefix addressing, and the lab's range "
                             f"is {DEFAULT_NET}'s (`{goals.ENI}`, {self.default_mode or 'unknown'} mode): a network "
                             f"with -o vpcnet.mode={mode} would need a range of its own")
        return {f"vpcnet-{mode}": text for mode, text in why.items()}

    def overlay_v6(self, timeout: float = 30.0) -> None:
        """Docker's overlay over IPv6 (`ov6`, dual-stack), or why not: `not_measured["overlay-v6"]`."""
        name, subnet4, subnet6 = OVERLAY_V6
        proc = self.lab.docker(1, "network", "create", "-d", "overlay", "--attachable", "--ipv6", "--subnet", subnet4,
                               "--subnet", subnet6, name, check=False)
        if proc.returncode != 0:
            self.not_measured["overlay-v6"] = (f"`docker network create -d overlay --ipv6 --subnet {subnet6}` "
                                               f"refused: {proc.stderr.strip()}")
            return
        why = self._overlay_v6_contender(name, timeout)
        if not why:
            return
        self.not_measured["overlay-v6"] = why
        print(f"overlay-v6 left out: {why}", flush=True)
        for k, cname in ((1, "bench-ov6-1"), (2, "bench-ov6-2")):
            self.lab.docker(k, "rm", "-f", cname, check=False)
        self.lab.docker(1, "network", "rm", name, check=False)

    def _overlay_v6_contender(self, name: str, timeout: float) -> str:
        """Adds the overlay-v6 contender on network `name`; else says why it cannot be measured. Where both
        containers got the same IPv6 address, h2's is asked for another with --ip6. (In one lab run on
        Docker 20.10 the two attached, a ping6 to h2's answered and iperf3's connection to it was refused:
        most likely the client's own address; a later run's attachments failed, see task_errors.)"""
        try:
            a = self.container(1, "bench-ov6-1", name)
        except (LabError, RuntimeError) as exc:
            return f"no container on {name}: {exc}" + self.task_errors(1)
        try:
            b = self.container(2, "bench-ov6-2", name)
        except (LabError, RuntimeError) as exc:
            return f"no container on {name}: {exc}" + self.task_errors(2)
        if not (a.address6 and b.address6):
            return f"the containers on {name} got no IPv6 address ({a.address6 or '-'}, {b.address6 or '-'})"
        if a.address6 == b.address6:
            same = f"both containers on {name} got the same IPv6 address {a.address6}"
            self.lab.docker(2, "rm", "-f", "bench-ov6-2", check=False)
            try:
                b = self.container(2, "bench-ov6-2", name, "--ip6", OVERLAY_V6_ADDRESS)
            except (LabError, RuntimeError) as exc:
                return f"{same}, and `docker run --ip6 {OVERLAY_V6_ADDRESS}` on h2 failed: {exc}" + self.task_errors(2)
            if b.address6 != OVERLAY_V6_ADDRESS:
                return f"{same}, and `docker run --ip6 {OVERLAY_V6_ADDRESS}` on h2 gave {b.address6 or 'none'}"
        c = Contender(CROSS, "overlay-v6", a, b, b.address6, name)
        if not self.reachable(c, timeout):
            neigh = sh(a.cmd("ip", "-6", "neigh", "show", b.address6), check=False).stdout.strip() or "none"
            v4 = sh(a.cmd("busybox", "ping", "-c1", "-W2", b.address), check=False).returncode == 0
            return (f"{a.address6} on h1 got no reply from {b.address6} on h2 within {timeout:.0f} s (ping6; "
                    f"IPv4 between the same two containers: {'answers' if v4 else 'no answer either'}; h1's "
                    f"neighbour entry for it: {neigh}): this engine's overlay does not carry IPv6 across hosts")
        self.contenders.append(c)
        return ""

    def task_errors(self, k: int, limit: int = 3) -> str:
        """The last swarm task errors in host k's engine log: why an overlay attachment failed, which the
        client's "context deadline exceeded" does not say. "" when there are none, or no log."""
        try:
            with open(self.lab.host(k).paths.engine_log, errors="replace") as fh:
                lines = [line for line in fh.read().splitlines()[-5000:] if "fatal task error" in line]
        except (OSError, AttributeError):
            return ""
        found = [m.group(1) for m in (re.search(r'error="([^"]*)"', line) for line in lines[-limit:]) if m]
        return f" (h{k}'s engine log: fatal task error: {'; '.join(found)})" if found else ""

    def reachable(self, c: Contender, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sh(c.client.cmd("busybox", "ping", "-c1", "-W1", c.target), check=False).returncode == 0:
                return True
            time.sleep(1.0)
        return False

    def wait_reachable(self, c: Contender, timeout: float = 60.0) -> None:
        if not self.reachable(c, timeout):
            raise RuntimeError(f"{c.key}: {c.target} not reachable within {timeout:.0f}s")

    def teardown(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)

    # -- one measurement --------------------------------------------------------------------------
    def iperf_cmd(self, c: Contender, *extra: str) -> list[str]:
        return c.client.cmd("iperf3", "-c", c.target, "-p", str(c.ports[0]), "-t", str(self.args.duration), "-J",
                            *extra)

    def iperf(self, c: Contender, *extra: str) -> dict:
        cmd = self.iperf_cmd(c, *extra)
        for _attempt in range(3):             # the server is busy for a moment after a run: retry, bounded
            proc = sh(cmd, timeout=self.args.duration + 30, check=False)
            try:
                data = json.loads(proc.stdout)
            except ValueError:
                data = {"error": proc.stderr.strip() or "no JSON"}
            if "error" not in data:
                return data
            time.sleep(1.0)
        raise RuntimeError(f"{c.key}: iperf3 {' '.join(extra)} failed: {data['error']}")

    def rr(self, c: Contender, mode: str, port: int, *extra: str, timeout: float = 120) -> dict:
        proc = sh(c.client.cmd(sys.executable, RR, mode, "--host", c.target, "--port", str(port), *extra),
                  timeout=timeout, check=False)
        return parse_rr(c.key, mode, proc.stdout, proc.stderr)

    def measure(self, c: Contender, probe: str) -> dict[str, float]:
        """Metric -> value of one probe on one contender."""
        a = self.args
        if probe == "tcp1":
            return {"tcp_1stream_bps": self.iperf(c)["end"]["sum_received"]["bits_per_second"]}
        if probe == "tcp4":
            return {"tcp_4stream_bps": self.iperf(c, "-P", "4")["end"]["sum_received"]["bits_per_second"]}
        if probe == "udp":
            end = self.iperf(c, "-u", "-l", "64", "-b", "0")["end"]["sum"]
            return {"udp_64b_pps": (end["packets"] - end["lost_packets"]) / end["seconds"]}
        if probe == "rr":
            out = self.rr(c, "client", c.ports[1], "--count", str(a.rr_count))
            return {"rr_p50_us": out["p50_us"], "rr_p99_us": out["p99_us"]}
        if probe == "crr":
            out = self.rr(c, "crr", c.ports[1], "--seconds", str(a.crr_seconds), timeout=a.crr_seconds + 60)
            return {"crr_cps": out["cps"], "crr_p50_us": out["p50_us"], "crr_p99_us": out["p99_us"]}
        if probe == "flows":
            out = self.rr(c, "flows", c.ports[2], "--flows", str(FLOWS), "--seconds", str(a.flows_seconds),
                          timeout=a.flows_seconds + 60)
            return {"flows_tps": out["tps"]}
        raise KeyError(probe)

    def docker_run_time(self, network: str) -> float:
        cname = "bench-start"
        self.lab.docker(1, "rm", "-f", cname, check=False)
        t0 = time.monotonic()
        self.lab.docker(1, "run", "-d", "--name", cname, "--network", network, IMAGE, "sleep", "60")
        took = time.monotonic() - t0
        self.lab.docker(1, "rm", "-f", cname, check=False)
        return took

    def record(self, c: Contender, values: dict[str, float]) -> None:
        for metric, value in values.items():
            self.samples[c.group][metric].setdefault(c.name, []).append(value)

    def run(self) -> None:
        order = list(self.contenders)
        networks = list(dict.fromkeys(c.network for c in order if c.network))
        started_all = time.monotonic()
        for r in range(self.args.rounds):
            turn = order[r % len(order):] + order[:r % len(order)]
            started = time.monotonic()
            for probe in PROBES:
                if probe == "start":        # per network, once: every contender on it gets the figure
                    k = r % len(networks)
                    for network in networks[k:] + networks[:k]:
                        took = self.docker_run_time(network)
                        for c in order:
                            if c.network == network:
                                self.record(c, {"container_start_s": took})
                    continue
                for c in turn:
                    self.record(c, self.measure(c, probe))
            took = time.monotonic() - started
            left = (self.args.rounds - r - 1) * (time.monotonic() - started_all) / (r + 1)
            tcp = self.samples[CROSS]["tcp_1stream_bps"]
            print(f"round {r + 1}/{self.args.rounds} done in {took:.0f}s (about {left / 60:.0f} min of rounds "
                  "left): " + ", ".join(f"{n} {v[-1] / 1e9:.2f}" for n, v in tcp.items()) + " Gbit/s (1 stream)",
                  flush=True)

    def profile(self) -> None:
        """One more TCP stream per cross-host contender under perf: CPU ms per GB by datapath piece. With
        --profile-runs N, N passes over the contenders in a rotated order; each contender's pieces are
        the medians of its runs, and its runs' totals are kept as samples (paired run by run)."""
        cross = [c for c in self.contenders if c.group == CROSS]
        runs = self.args.profile_runs
        found: dict[str, list[dict[str, float]]] = {c.name: [] for c in cross}
        for r in range(runs):
            for c in cross[r % len(cross):] + cross[:r % len(cross)]:
                for _attempt in range(3):
                    proc, seconds = cpu_profile.record(self.iperf_cmd(c), timeout=self.args.duration + 60)
                    try:
                        delivered = json.loads(proc.stdout)["end"]["sum_received"]["bytes"]
                        break
                    except (ValueError, KeyError):
                        time.sleep(1.0)
                else:
                    raise RuntimeError(f"{c.key}: iperf3 under perf failed: {proc.stderr.strip()[-300:]}")
                found[c.name].append(cpu_profile.per_gigabyte(seconds, delivered))
                print(f"profile {r + 1}/{runs} {c.name}: {found[c.name][-1]['total']:.0f} CPU ms/GB", flush=True)
        for name, each in found.items():
            self.cpu[name] = each[0] if runs == 1 else cpu_profile.median_of(each)

    # -- results ----------------------------------------------------------------------------------
    def meta(self, elapsed_s: float) -> dict:
        a = self.args
        explicit = {f"vpcnet-{m}": f"-o vpcnet.mode={m} (network {MODE_NETWORKS[m][0]}, --subnet "
                                   f"{MODE_NETWORKS[m][1]})" for m in self.modes}
        default = default_contender(a)
        how = (" in eni-prefix addressing (addresses from /28 and /80 prefixes on each host's ENI, delivered by "
               "the emulated VPC; no route entry)" if addressing(a) == ENI_PREFIX else " (routed by the emulated VPC)")
        return {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python3 bench/run.py " + " ".join(sys.argv[1:]),
            "rounds": a.rounds, "duration_s": a.duration, "rr_count": a.rr_count, "crr_seconds": a.crr_seconds,
            "flows": FLOWS, "flows_seconds": a.flows_seconds, "elapsed_s": round(elapsed_s),
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_at_end": open("/proc/loadavg").read().split()[:3],   # other work on the machine skews it
            "docker": sh(self.lab.docker_cmd(1) + ["version", "-f", "{{.Server.Version}}"]).stdout.strip(),
            "iperf3": sh(["iperf3", "--version"]).stdout.splitlines()[0],
            "default_mode": self.default_mode, "addressing": addressing(a),
            "ipv6": bool(a.ipv6), "profile_runs": a.profile_runs if a.profile else 0,
            **({"not_measured": dict(self.not_measured)} if self.not_measured else {}),
            "contenders": {
                CROSS: {
                    "underlay": "host netns h1 <-> host netns h2 (through the router netns)",
                    default: f"container on vpcnet network {DEFAULT_NET} (no -o option: mode "
                             f"{self.default_mode or 'unknown'}) on h1 <-> on h2{how}",
                    **{n: f"container on {d} on h1 <-> on h2" for n, d in explicit.items()},
                    "overlay": "container on swarm overlay `ov` (VXLAN) on h1 <-> on h2",
                    "bridge": "container on docker0 on h1 -> published port on h2 (NAT both ends)",
                    **({"underlay-v6": f"host netns h1 <-> host netns h2 over IPv6 ({self.lab.host_ip6(1)} <-> "
                                       f"{self.lab.host_ip6(2)}, through the router netns)",
                        default + goals.V6: f"the {default} contender's containers on {DEFAULT_NET} (dual-stack, "
                                            "`vpcnet lab up --ipv6`), between their IPv6 addresses",
                        "overlay-v6": f"container on swarm overlay `{OVERLAY_V6[0]}` (VXLAN; --ipv6 --subnet "
                                      f"{OVERLAY_V6[2]}) on h1 <-> on h2, between their IPv6 addresses"}
                       if a.ipv6 else {}),
                },
                SAME: {
                    default: f"two containers on {DEFAULT_NET} on h1",
                    **{n: f"two containers on {d} on h1" for n, d in explicit.items()},
                    "docker-bridge": f"two containers on a user-defined bridge network ({DOCKER_BRIDGE_NET}) on h1",
                },
            },
            "method": "iperf3 and bench/rr.py (64-byte TCP request-response, TCP_NODELAY) from the host, entered "
                      "into each contender's network namespace with nsenter; rounds interleave contenders",
        }

    def results(self, elapsed_s: float) -> dict:
        return assemble(self.meta(elapsed_s), self.samples, self.mtu, self.cpu)


def parse_rr(key: str, mode: str, stdout: str, stderr: str = "") -> dict:
    """rr.py's one JSON line; a clear error naming the contender if it failed."""
    try:
        out = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"{key}: rr.py {mode} printed no result: {stderr.strip()[-300:] or stdout[-300:]}") from None
    if not isinstance(out, dict) or "error" in out:
        raise RuntimeError(f"{key}: rr.py {mode} failed: {out.get('error') if isinstance(out, dict) else out}")
    return out


def summarize(samples: dict[str, list[float]]) -> dict[str, dict]:
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
            for name, v in samples.items() if v}


def assemble(meta: dict, samples: dict, mtu: dict, cpu: dict) -> dict:
    """The results document: per metric and contender median/min/max/samples, ratios, goal verdicts."""
    out: dict = {"meta": meta}
    for metric, *_ in METRICS:                       # cross-host at the top level, as before
        out[metric] = summarize(samples[CROSS][metric])
    out["same_host"] = {metric: summarize(samples[SAME][metric]) for metric, *_ in METRICS}
    out["mtu"] = dict(mtu[CROSS])
    out["same_host_mtu"] = dict(mtu[SAME])
    if cpu:
        out["cpu_ms_per_gb"] = cpu
    ratios = {}
    for group, versus, prefix in ((CROSS, ("underlay", "overlay", "bridge"), ""), (SAME, ("docker-bridge",), "same:")):
        for metric, *_ in METRICS:
            data = out[metric] if group == CROSS else out["same_host"][metric]
            for mine in data:
                if not goals.is_vpcnet(mine):
                    continue
                for other in (goals.baseline(v, mine) for v in versus):      # vpcnet-v6: underlay-v6, ...
                    if other in data and data[other]["median"]:
                        ratios[f"{prefix}{metric}:{mine}/{other}"] = data[mine]["median"] / data[other]["median"]
    out["ratios"] = ratios
    out["goals"] = goals.evaluate(out)
    out["fastest"] = goals.fastest(out["goals"], out)
    return out


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9, help="rounds, each running every contender (default 9)")
    p.add_argument("--hosts", type=int, default=2, help="lab hosts (default 2; the bench uses h1 and h2)")
    p.add_argument("--duration", type=int, default=3, help="seconds per iperf3 run (default 3)")
    p.add_argument("--rr-count", type=int, default=5000, help="ping-pongs per RR sample (default 5000)")
    p.add_argument("--crr-seconds", type=float, default=2.0, help="seconds per connection-rate sample (default 2)")
    p.add_argument("--flows-seconds", type=float, default=2.0,
                   help=f"seconds per {FLOWS}-flow sample (default 2)")
    p.add_argument("--no-bridge", action="store_true", help="leave out Docker's bridge + published port")
    p.add_argument("--no-same-host", action="store_true", help="leave out the same-host contenders")
    p.add_argument("--skip-mode", action="append", default=[], choices=MODES,
                   help="leave out vpcnet's explicit contender in that mode (repeatable)")
    p.add_argument("--all-modes", action="store_true",
                   help="also measure the explicit mode the default network resolves to")
    p.add_argument("--profile", action="store_true",
                   help="also sample the CPU (perf) during one TCP stream per contender: where the cost goes")
    p.add_argument("--profile-runs", type=int, default=1,
                   help="with --profile: that many profiled streams per contender, rotated (default 1); from 2 "
                        "on, the CPU goal gets a verdict on paired runs")
    p.add_argument("--ipv6", action="store_true",
                   help="also measure over IPv6: the lab comes up dual-stack, with underlay-v6, vpcnet-v6 (vpc0's "
                        "IPv6) and overlay-v6 (Docker's overlay with --ipv6, where it carries IPv6) contenders")
    p.add_argument("--addressing", default="route-table", choices=ADDRESSING_MODES,
                   help="the lab's addressing (vpcnet lab up --addressing): route-table (default) or eni-prefix, "
                        "where the default network is measured as `vpcnet-eni` and the results go to "
                        "eni-prefix.{json,md,png}")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    p.add_argument("--readme", action="store_true", help="also put the Markdown table into docs/benchmarks.md")
    p.add_argument("--estimate", action="store_true", help="print how long the run would take, and stop")
    p.add_argument("--no-chart", action="store_true", help="write no latest.png (no matplotlib needed)")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 50 or not 1 <= args.duration <= 60 or args.hosts < 2:
        print("--rounds 1..50, --duration 1..60, --hosts >= 2", file=sys.stderr)
        return 2
    if not 0.2 <= args.crr_seconds <= 60 or not 0.2 <= args.flows_seconds <= 60 or not 100 <= args.rr_count <= 10**6:
        print("--crr-seconds and --flows-seconds 0.2..60, --rr-count 100..1000000", file=sys.stderr)
        return 2
    if not 1 <= args.profile_runs <= 20 or (args.profile_runs > 1 and not args.profile):
        print("--profile-runs 1..20, and more than 1 only with --profile", file=sys.stderr)
        return 2
    if args.addressing == ENI_PREFIX and (args.readme or args.all_modes or args.skip_mode):
        print("--addressing eni-prefix measures the default network alone (a host has one vpcnet network per "
              "range there), without --all-modes or --skip-mode, and writes eni-prefix.{json,md,png}: "
              "docs/benchmarks.md's table (--readme) is the route-table run's", file=sys.stderr)
        return 2
    # the chart is drawn last: find out now, not after the whole run
    problem = None if args.estimate or args.no_chart else report.chart_unavailable()
    if problem:
        print(f"bench/run.py: {problem}", file=sys.stderr)
        return 2
    print(estimate_text(estimate(args), args.rounds), flush=True)
    if args.estimate:
        return 0
    if os.geteuid() != 0:
        print("bench/run.py needs root (it builds a vpcnet lab)", file=sys.stderr)
        return 2
    left = Lab.present()
    if left:
        print(f"a vpcnet lab is already on this machine ({left}); run `vpcnet lab down` first", file=sys.stderr)
        return 2
    if args.profile and not cpu_profile.available():
        print("--profile needs perf (Debian: apt-get install linux-perf) allowed to sample every CPU",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    cluster = CLUSTER if args.addressing == "route-table" else None
    lab = Lab(hosts=args.hosts, cluster_cidr=cluster, out=sys.stdout, ipv6=args.ipv6, addressing=args.addressing)
    bench = None
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupted)      # a kill still stops the servers and takes the lab down
    try:
        lab.up()
        bench = Bench(lab, args)
        bench.setup()
        bench.run()
        if args.profile:
            bench.profile()
        res = bench.results(time.monotonic() - started)
    except (LabError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        return 130
    finally:
        if bench is not None:
            bench.teardown()
        left = lab.down()
        if left:
            print("lab down left: " + "; ".join(left), file=sys.stderr)
    name = results_name(args)
    with open(os.path.join(args.out, f"{name}.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    md = report.markdown(res)
    with open(os.path.join(args.out, f"{name}.md"), "w") as fh:
        fh.write(md)
    if not args.no_chart:
        report.chart(res, os.path.join(args.out, f"{name}.png"))
    if args.readme:
        report.update_readme(os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md"), md)
    print(md)
    print(f"whole run: {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
