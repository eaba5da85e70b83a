#!/usr/bin/env python3
"""vpcnet versus the underlay and Docker's VXLAN overlay, on one lab, in one run.

    python3 bench/run.py [--rounds 5] [--hosts 2] [--duration 5] [--no-bridge]

Builds a `vpcnet lab` (root; refuses to run next to a lab already up), then measures, between host 1
and host 2 of the lab:
  underlay  host namespace <-> host namespace (the limit of this setup: every packet crosses the router)
  vpcnet    container on the vpcnet network on h1 <-> container on h2 (routed by the emulated VPC)
  vpcnet-routed  the same on a second vpcnet network in routed mode (`-o vpcnet.mode=routed`, no bridge)
  vpcnet-ebpf    the same on a third, in ebpf mode (`-o vpcnet.mode=ebpf`: routed plus the tc fast path)
  overlay   Docker's overlay (swarm across the lab engines, `-d overlay --attachable`), same two hosts
  bridge    Docker's default bridge on each host, server port published on h2 (NAT both ends)
Each round runs every metric for every contender, in a rotated order, so drifts hit all alike.

The measuring programs are the host's own iperf3 and bench/rr.py, entered into each contender's network
namespace with `nsenter --net=` (for containers: /proc/<container pid>/ns/net), so the only thing that
differs between contenders is the network path.

Metrics: iperf3 TCP throughput, 1 and 4 streams (receiver bits/s); iperf3 UDP 64-byte datagrams
(`-u -l 64 -b 0`, datagrams/s received = (packets - lost) / seconds); TCP request-response latency p50
and p99 of 64-byte ping-pongs (bench/rr.py); `docker run -d` wall time per network; each contender's MTU.

Writes bench/results/latest.json, latest.md and latest.png. The lab is always taken down at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import cpu_profile  # noqa: E402  (bench/, next to this file)
from vpcnet.lab import Lab, LabError  # noqa: E402

IMAGE = "vpcnet-testbox:latest"
CLUSTER = "10.240.0.0/16"
ROUTED_CLUSTER = "10.241.0.0/16"         # the routed-mode network's own cluster CIDR
EBPF_CLUSTER = "10.242.0.0/16"           # the ebpf-mode network's
ROUTED, EBPF = "vpcnet-routed", "vpcnet-ebpf"
MINE = ("vpcnet", ROUTED, EBPF)          # vpcnet's contenders, one per mode
NAMES = ("underlay", "vpcnet", ROUTED, EBPF, "overlay", "bridge")
NETWORKS = {"vpcnet": "vpc0", ROUTED: "vpcr", EBPF: "vpce", "overlay": "ov", "bridge": "bridge"}
EXTRA_MODES = {ROUTED: ("routed", ROUTED_CLUSTER), EBPF: ("ebpf", EBPF_CLUSTER)}
RR = os.path.join(HERE, "rr.py")
# per contender: (iperf3 port, rr port)
PORTS = {"underlay": (5201, 5301), "vpcnet": (5202, 5302), "overlay": (5203, 5303), "bridge": (5204, 5304),
         ROUTED: (5205, 5305), EBPF: (5206, 5306)}
METRICS = [  # key, label, unit, higher is better
    ("tcp_1stream_bps", "TCP throughput, 1 stream", "Gbit/s", True),
    ("tcp_4stream_bps", "TCP throughput, 4 streams", "Gbit/s", True),
    ("udp_64b_pps", "UDP 64 B datagrams received", "kpps", True),
    ("rr_p50_us", "TCP request-response p50", "µs", False),
    ("rr_p99_us", "TCP request-response p99", "µs", False),
    ("container_start_s", "container start (docker run -d)", "s", False),
]
GOALS = [  # (metric, versus, comparison, bound, text)
    ("tcp_1stream_bps", "underlay", ">=", 0.95, "TCP 1 stream ≥ 0.95 × underlay"),
    ("tcp_4stream_bps", "underlay", ">=", 0.95, "TCP 4 streams ≥ 0.95 × underlay"),
    ("tcp_1stream_bps", "overlay", ">=", 1.20, "TCP 1 stream ≥ 1.20 × overlay"),
    ("tcp_4stream_bps", "overlay", ">=", 1.20, "TCP 4 streams ≥ 1.20 × overlay"),
    ("rr_p50_us", "underlay", "<=", 1.10, "RR p50 ≤ 1.10 × underlay"),
    ("udp_64b_pps", "overlay", ">=", 1.20, "UDP 64 B pps ≥ 1.2 × overlay"),
]


def sh(cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Endpoint:
    """One side of a contender: a network namespace path, and the address the peer uses to reach it."""

    def __init__(self, ns_path: str, address: str, mtu_dev: str):
        self.ns_path, self.address, self.mtu_dev = ns_path, address, mtu_dev

    def cmd(self, *args: str) -> list[str]:
        return ["nsenter", f"--net={self.ns_path}", "--", *args]

    def mtu(self) -> int:
        words = sh(self.cmd("ip", "-o", "link", "show", "dev", self.mtu_dev)).stdout.split()
        return int(words[words.index("mtu") + 1])       # (/sys is the host's under nsenter --net)


class Bench:
    def __init__(self, lab: Lab, args):
        self.lab, self.args = lab, args
        self.servers: list[subprocess.Popen] = []
        self.pairs: dict[str, tuple[Endpoint, Endpoint, str]] = {}   # name -> (client, server, target)
        self.samples: dict[str, dict[str, list[float]]] = {m[0]: {} for m in METRICS}
        self.mtu: dict[str, int] = {}
        self.notes: list[str] = []

    # -- set-up -----------------------------------------------------------------------------------
    def container(self, k: int, name: str, network: str, *extra: str) -> Endpoint:
        self.lab.docker(k, "run", "-d", "--name", name, "--network", network, *extra, IMAGE, "sleep", "86400")
        pid = self.lab.docker(k, "inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
        ip = self.lab.docker(k, "inspect", "-f", f"{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}",
                             name).stdout.strip()
        return Endpoint(f"/proc/{pid}/ns/net", ip, "eth0")

    def setup(self) -> None:
        lab = self.lab
        h1 = Endpoint(f"/run/netns/{lab.host_netns(1)}", lab.host_ip(1), "uplink")
        h2 = Endpoint(f"/run/netns/{lab.host_netns(2)}", lab.host_ip(2), "uplink")
        self.pairs["underlay"] = (h1, h2, h2.address)
        a, b = self.container(1, "bench-vpc1", "vpc0"), self.container(2, "bench-vpc2", "vpc0")
        self.pairs["vpcnet"] = (a, b, b.address)
        for name, (mode, cluster) in EXTRA_MODES.items():
            if mode in self.args.skip_mode:
                continue
            lab.create_network(NETWORKS[name], cluster, mode=mode, timeout=90)
            a = self.container(1, f"bench-{mode}1", NETWORKS[name])
            b = self.container(2, f"bench-{mode}2", NETWORKS[name])
            self.pairs[name] = (a, b, b.address)
            self.wait_reachable(name)       # each host's route for the new cluster CIDR: a reconcile away
        # Docker's overlay: a swarm across the lab's two engines (lab engines only, never the default one).
        lab.docker(1, "swarm", "init", "--advertise-addr", lab.host_ip(1), "--listen-addr", f"{lab.host_ip(1)}:2377")
        token = lab.docker(1, "swarm", "join-token", "-q", "worker").stdout.strip()
        lab.docker(2, "swarm", "join", "--token", token, "--advertise-addr", lab.host_ip(2),
                   "--listen-addr", f"{lab.host_ip(2)}:2377", f"{lab.host_ip(1)}:2377", timeout=60)
        lab.docker(1, "network", "create", "-d", "overlay", "--attachable", "ov")
        a, b = self.container(1, "bench-ov1", "ov"), self.container(2, "bench-ov2", "ov")
        self.pairs["overlay"] = (a, b, b.address)
        if not self.args.no_bridge:
            ip, rr = PORTS["bridge"]
            a = self.container(1, "bench-br1", "bridge")
            b = self.container(2, "bench-br2", "bridge", "-p", f"{ip}:{ip}", "-p", f"{ip}:{ip}/udp",
                               "-p", f"{rr}:{rr}")
            self.pairs["bridge"] = (a, b, lab.host_ip(2))             # published port on h2's address
        for name, (client, server, _target) in self.pairs.items():
            ip, rr = PORTS[name]
            for cmd in (server.cmd("iperf3", "-s", "-p", str(ip)),
                        server.cmd(sys.executable, RR, "server", "--port", str(rr), "--max-seconds", "7200")):
                self.servers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                     start_new_session=True))
            self.mtu[name] = client.mtu()
        time.sleep(1.0)

    def wait_reachable(self, name: str, timeout: float = 60.0) -> None:
        client, _server, target = self.pairs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sh(client.cmd("busybox", "ping", "-c1", "-W1", target), check=False).returncode == 0:
                return
            time.sleep(1.0)
        raise RuntimeError(f"{name}: {target} not reachable within {timeout:.0f}s")

    def teardown(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)

    # -- one measurement --------------------------------------------------------------------------
    def iperf_cmd(self, name: str, *extra: str) -> list[str]:
        client, _server, target = self.pairs[name]
        return client.cmd("iperf3", "-c", target, "-p", str(PORTS[name][0]), "-t", str(self.args.duration), "-J",
                          *extra)

    def iperf(self, name: str, *extra: str) -> dict:
        cmd = self.iperf_cmd(name, *extra)
        for attempt in range(3):              # the server is busy for a moment after a run: retry, bounded
            proc = sh(cmd, timeout=self.args.duration + 30, check=False)
            try:
                data = json.loads(proc.stdout)
            except ValueError:
                data = {"error": proc.stderr.strip() or "no JSON"}
            if "error" not in data:
                return data
            time.sleep(1.0)
        raise RuntimeError(f"{name}: iperf3 {' '.join(extra)} failed: {data['error']}")

    def measure(self, name: str, metric: str) -> float | None:
        if metric == "tcp_1stream_bps":
            return self.iperf(name)["end"]["sum_received"]["bits_per_second"]
        if metric == "tcp_4stream_bps":
            return self.iperf(name, "-P", "4")["end"]["sum_received"]["bits_per_second"]
        if metric == "udp_64b_pps":
            end = self.iperf(name, "-u", "-l", "64", "-b", "0")["end"]["sum"]
            return (end["packets"] - end["lost_packets"]) / end["seconds"]
        if metric in ("rr_p50_us", "rr_p99_us"):
            if metric == "rr_p99_us":
                return self._rr[name]["p99_us"]
            client, _server, target = self.pairs[name]
            proc = sh(client.cmd(sys.executable, RR, "client", "--host", target, "--port", str(PORTS[name][1]),
                                 "--count", str(self.args.rr_count)), timeout=120)
            self._rr[name] = json.loads(proc.stdout)
            return self._rr[name]["p50_us"]
        if metric == "container_start_s":
            network = NETWORKS.get(name)
            if network is None:
                return None
            cname = f"bench-start-{name}"
            self.lab.docker(1, "rm", "-f", cname, check=False)
            t0 = time.monotonic()
            self.lab.docker(1, "run", "-d", "--name", cname, "--network", network, IMAGE, "sleep", "60")
            took = time.monotonic() - t0
            self.lab.docker(1, "rm", "-f", cname, check=False)
            return took
        raise KeyError(metric)

    def run(self) -> None:
        names = list(self.pairs)
        self._rr: dict[str, dict] = {}
        for r in range(self.args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            started = time.monotonic()
            for metric, *_ in METRICS:
                for name in order:
                    value = self.measure(name, metric)
                    if value is not None:
                        self.samples[metric].setdefault(name, []).append(value)
            print(f"round {r + 1}/{self.args.rounds} done in {time.monotonic() - started:.0f}s: "
                  + ", ".join(f"{n} {self.samples['tcp_1stream_bps'][n][-1] / 1e9:.2f}" for n in names)
                  + " Gbit/s (1 stream)", flush=True)

    def profile(self) -> None:
        """One more TCP stream per contender under perf: CPU ms per GB by datapath piece (cpu_profile)."""
        self.cpu: dict[str, dict[str, float]] = {}
        for name in self.pairs:
            for attempt in range(3):
                proc, seconds = cpu_profile.record(self.iperf_cmd(name), timeout=self.args.duration + 60)
                try:
                    delivered = json.loads(proc.stdout)["end"]["sum_received"]["bytes"]
                    break
                except (ValueError, KeyError):
                    time.sleep(1.0)
            else:
                raise RuntimeError(f"{name}: iperf3 under perf failed: {proc.stderr.strip()[-300:]}")
            self.cpu[name] = cpu_profile.per_gigabyte(seconds, delivered)
            print(f"profile {name}: {self.cpu[name]['total']:.0f} CPU ms/GB", flush=True)

    # -- results ----------------------------------------------------------------------------------
    def results(self) -> dict:
        out: dict = {"meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python3 bench/run.py " + " ".join(sys.argv[1:]),
            "rounds": self.args.rounds, "duration_s": self.args.duration, "rr_count": self.args.rr_count,
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_at_end": open("/proc/loadavg").read().split()[:3],   # other work on the machine skews it
            "docker": sh(self.lab.docker_cmd(1) + ["version", "-f", "{{.Server.Version}}"]).stdout.strip(),
            "iperf3": sh(["iperf3", "--version"]).stdout.splitlines()[0],
            "contenders": {
                "underlay": "host netns h1 <-> host netns h2 (through the router netns)",
                "vpcnet": "container on vpcnet network vpc0 on h1 <-> on h2 (routed by the emulated VPC)",
                ROUTED: f"container on vpcnet network vpcr (-o vpcnet.mode=routed, --subnet {ROUTED_CLUSTER}) "
                        "on h1 <-> on h2",
                EBPF: f"container on vpcnet network vpce (-o vpcnet.mode=ebpf, --subnet {EBPF_CLUSTER}) "
                      "on h1 <-> on h2",
                "overlay": "container on swarm overlay `ov` (VXLAN) on h1 <-> on h2",
                "bridge": "container on docker0 on h1 -> published port on h2 (NAT both ends)",
            },
            "method": "iperf3 and bench/rr.py (64-byte TCP ping-pong, TCP_NODELAY) from the host, entered into "
                      "each contender's network namespace with nsenter; rounds interleave contenders",
        }}
        for metric, *_ in METRICS:
            out[metric] = {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
                           for name, v in self.samples[metric].items()}
        out["mtu"] = dict(self.mtu)
        if getattr(self, "cpu", None):
            out["cpu_ms_per_gb"] = self.cpu
        ratios = {}
        for metric, *_ in METRICS:
            data = out[metric]
            for mine in MINE:
                if mine in data:
                    for other in ("underlay", "overlay", "bridge"):
                        if other in data and data[other]["median"]:
                            ratios[f"{metric}:{mine}/{other}"] = data[mine]["median"] / data[other]["median"]
        out["ratios"] = ratios
        goals = []
        for mine in MINE:
            for metric, versus, op, bound, text in GOALS:
                ratio = ratios.get(f"{metric}:{mine}/{versus}")
                if ratio is None and mine != "vpcnet":
                    continue
                ok = ratio is not None and (ratio >= bound if op == ">=" else ratio <= bound)
                goals.append({"goal": f"{mine}: {text}", "contender": mine, "ratio": ratio, "met": ok})
        out["goals"] = goals
        return out


def fmt(metric: str, value: float) -> str:
    if metric.endswith("_bps"):
        return f"{value / 1e9:.2f}"
    if metric == "udp_64b_pps":
        return f"{value / 1e3:.0f}"
    if metric.endswith("_us"):
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown(res: dict) -> str:
    names = [n for n in NAMES if n in res["mtu"]]
    mine = [n for n in MINE if n in names]
    m = res["meta"]
    lines = [f"Benchmark {m['date']}: {m['rounds']} rounds interleaved, iperf3 runs of {m['duration_s']} s, "
             f"{m['rr_count']} ping-pongs per RR sample; kernel {m['kernel']}, {m['cpus']} CPUs, Docker {m['docker']}, "
             f"{m['iperf3']}. Median (min–max) per contender.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric, label, unit, _hib in METRICS:
        row = [f"{label} ({unit})"]
        for n in names:
            d = res[metric].get(n)
            row.append(f"{fmt(metric, d['median'])} ({fmt(metric, d['min'])}–{fmt(metric, d['max'])})" if d else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| MTU in the container | " + " | ".join(str(res["mtu"][n]) for n in names) + " |")
    pairs = [(c, o) for c in mine for o in ("underlay", "overlay")]
    lines += ["", "Ratios of medians:", "", "| metric | " + " | ".join(f"{c}/{o}" for c, o in pairs) + " |",
              "|---|" + "---|" * len(pairs)]
    for metric, label, _unit, _hib in METRICS:
        cells = [res["ratios"].get(f"{metric}:{c}/{o}") for c, o in pairs]
        if any(r is not None for r in cells):
            lines.append(f"| {label} | " + " | ".join(f"{r:.2f}" if r is not None else "–" for r in cells) + " |")
    lines += ["", "| goal | ratio | met |", "|---|---|---|"]
    for g in res["goals"]:
        lines.append(f"| {g['goal']} | {g['ratio']:.2f} | {'yes' if g['met'] else '**no**'} |")
    cpu = res.get("cpu_ms_per_gb")
    if cpu:
        shown = [n for n in names if n in cpu]
        lines += ["", "Where the CPU goes (`--profile`): CPU milliseconds per GB delivered during one TCP stream, "
                  "both CPUs sampled by perf, kernel symbols grouped by datapath piece (bench/cpu_profile.py).", "",
                  "| piece | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for group in cpu_profile.ORDER + ["total"]:
            lines.append(f"| {group} | " + " | ".join(f"{cpu[n][group]:.0f}" for n in shown) + " |")
    lines += ["", f"Reproduce: `{m['command']}` (root; builds and removes its own `vpcnet lab`)."]
    return "\n".join(lines) + "\n"


def chart(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in NAMES if n in res["mtu"]]
    colors = {"underlay": "#7f7f7f", "vpcnet": "#2ca02c", ROUTED: "#98df8a", EBPF: "#006d2c", "overlay": "#d62728",
              "bridge": "#1f77b4"}
    panels = [("tcp_1stream_bps", "TCP 1 stream (Gbit/s)", 1e9), ("tcp_4stream_bps", "TCP 4 streams (Gbit/s)", 1e9),
              ("udp_64b_pps", "UDP 64 B received (kpps)", 1e3), ("rr_p50_us", "TCP RR p50 (µs, lower is better)", 1),
              ("rr_p99_us", "TCP RR p99 (µs, lower is better)", 1),
              ("container_start_s", "docker run -d (s, lower is better)", 1)]
    cpu = res.get("cpu_ms_per_gb") or {}
    fig, axes = plt.subplots(2, 4 if cpu else 3, figsize=(19 if cpu else 14, 8))
    for ax, (metric, title, scale) in zip(axes.flat, panels):
        shown = [n for n in names if n in res[metric]]
        med = [res[metric][n]["median"] / scale for n in shown]
        low = [med[i] - res[metric][n]["min"] / scale for i, n in enumerate(shown)]
        high = [res[metric][n]["max"] / scale - med[i] for i, n in enumerate(shown)]
        ax.bar(shown, med, yerr=[low, high], capsize=4, color=[colors[n] for n in shown])
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(med):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    if cpu:                     # where the CPU goes: one stacked bar per contender, a colour per piece
        ax = axes.flat[len(panels)]
        shown = [n for n in names if n in cpu]
        bottom = [0.0] * len(shown)
        for group, colour in zip(cpu_profile.ORDER, plt.get_cmap("tab20").colors):
            values = [cpu[n][group] for n in shown]
            ax.bar(shown, values, bottom=bottom, color=colour, label=group)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title("CPU ms per GB, one TCP stream (lower is better)", fontsize=10)
        axes.flat[len(panels) + 1].legend(*ax.get_legend_handles_labels(), loc="center", fontsize=9)
        axes.flat[len(panels) + 1].axis("off")
    for ax in axes.flat:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"vpcnet vs underlay vs Docker overlay — {res['meta']['rounds']} rounds, median with min–max "
                 f"({res['meta']['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds, each running every contender (default 5)")
    p.add_argument("--hosts", type=int, default=2, help="lab hosts (default 2; the bench uses h1 and h2)")
    p.add_argument("--duration", type=int, default=5, help="seconds per iperf3 run (default 5)")
    p.add_argument("--rr-count", type=int, default=5000, help="ping-pongs per RR sample (default 5000)")
    p.add_argument("--no-bridge", action="store_true", help="leave out Docker's bridge + published port")
    p.add_argument("--skip-mode", action="append", default=[], choices=[m for m, _ in EXTRA_MODES.values()],
                   help="leave out vpcnet's contender in that mode (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="also sample the CPU (perf) during one TCP stream per contender: where the cost goes")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/run.py needs root (it builds a vpcnet lab)", file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= 50 or not 1 <= args.duration <= 60 or args.hosts < 2:
        print("--rounds 1..50, --duration 1..60, --hosts >= 2", file=sys.stderr)
        return 2
    left = {k: v for k, v in Lab.leftovers().items() if v}
    if left:
        print(f"a vpcnet lab is already on this machine ({left}); run `vpcnet lab down` first", file=sys.stderr)
        return 2
    if args.profile and not cpu_profile.available():
        print("--profile needs perf (Debian: apt-get install linux-perf) allowed to sample every CPU",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    lab = Lab(hosts=args.hosts, cluster_cidr=CLUSTER, out=sys.stdout)
    bench = None
    signal.signal(signal.SIGTERM, _interrupted)      # a kill still stops the servers and takes the lab down
    try:
        lab.up()
        bench = Bench(lab, args)
        bench.setup()
        bench.run()
        if args.profile:
            bench.profile()
        res = bench.results()
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
    with open(os.path.join(args.out, "latest.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    md = markdown(res)
    with open(os.path.join(args.out, "latest.md"), "w") as fh:
        fh.write(md)
    chart(res, os.path.join(args.out, "latest.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
