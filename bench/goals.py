"""The benchmark goals for vpcnet's contenders, checked on the medians of one bench/run.py run.

Pure functions over the results dictionary (no I/O), so the verdicts can be tested on numbers.

Two groups of contenders: `cross` (container on host 1 <-> container on host 2, against the underlay and
Docker's overlay) and `same` (two containers on host 1, against Docker's bridge network). Each vpcnet
contender is checked: the default network (`vpcnet`, created without any `-o` option) and every explicit
mode (`vpcnet-<mode>`); the fastest of them is named, because both the default and the
fastest mode to meet every goal.

A ratio is mine / versus on medians. For "lower is better" metrics (latency, CPU, `docker run` time)
the bound is an upper one.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT = "vpcnet"                       # the network created with no -o option
MODE_PREFIX = "vpcnet-"                  # vpcnet-bridge, vpcnet-routed, vpcnet-ebpf: -o vpcnet.mode=<mode>
CROSS, SAME = "cross", "same"


@dataclass(frozen=True)
class Goal:
    group: str            # cross | same
    metric: str           # a key of the results (cpu_ms_per_gb: the --profile table's total)
    versus: str           # the contender it is compared with, in the same group
    op: str               # >=, >, <=
    bound: float
    label: str

    def text(self) -> str:
        op = {">=": "≥", ">": ">", "<=": "≤"}[self.op]
        where = "same host: " if self.group == SAME else ""
        return f"{where}{self.label} {op} {self.bound:g} × {self.versus}"

    def met(self, ratio: float) -> bool:
        if self.op == ">=":
            return ratio >= self.bound
        if self.op == ">":
            return ratio > self.bound
        return ratio <= self.bound


GOALS = [
    Goal(CROSS, "tcp_1stream_bps", "underlay", ">=", 0.97, "TCP 1 stream"),
    Goal(CROSS, "tcp_4stream_bps", "underlay", ">=", 0.97, "TCP 4 streams"),
    Goal(CROSS, "tcp_1stream_bps", "overlay", ">=", 1.25, "TCP 1 stream"),
    Goal(CROSS, "tcp_4stream_bps", "overlay", ">=", 1.25, "TCP 4 streams"),
    Goal(CROSS, "udp_64b_pps", "underlay", ">=", 0.95, "UDP 64 B pps"),
    Goal(CROSS, "rr_p50_us", "underlay", "<=", 1.05, "RR p50"),
    Goal(CROSS, "rr_p99_us", "underlay", "<=", 1.10, "RR p99"),
    Goal(CROSS, "cpu_ms_per_gb", "underlay", "<=", 1.0, "CPU ms per GB"),
    Goal(CROSS, "crr_cps", "underlay", ">=", 0.9, "connections/s"),
    Goal(CROSS, "crr_cps", "overlay", ">", 1.0, "connections/s"),
    Goal(CROSS, "flows_tps", "underlay", ">=", 0.9, "64 flows transactions/s"),
    Goal(CROSS, "flows_tps", "overlay", ">", 1.0, "64 flows transactions/s"),
    Goal(SAME, "tcp_1stream_bps", "docker-bridge", ">=", 1.0, "TCP 1 stream"),
    Goal(SAME, "tcp_4stream_bps", "docker-bridge", ">=", 1.0, "TCP 4 streams"),
    Goal(SAME, "udp_64b_pps", "docker-bridge", ">=", 1.0, "UDP 64 B pps"),
    Goal(SAME, "rr_p50_us", "docker-bridge", "<=", 1.0, "RR p50"),
    Goal(SAME, "rr_p99_us", "docker-bridge", "<=", 1.0, "RR p99"),
    Goal(SAME, "crr_cps", "docker-bridge", ">=", 1.0, "connections/s"),
    Goal(SAME, "flows_tps", "docker-bridge", ">=", 1.0, "64 flows transactions/s"),
    Goal(SAME, "container_start_s", "docker-bridge", "<=", 1.05, "docker run -d time"),
]


def is_vpcnet(name: str) -> bool:
    return name == DEFAULT or name.startswith(MODE_PREFIX)


def medians(res: dict, group: str, metric: str) -> dict[str, float]:
    """Contender -> median of one metric in one group of a bench/run.py result."""
    if metric == "cpu_ms_per_gb":
        cpu = (res.get("cpu_ms_per_gb") or {}) if group == CROSS else {}
        return {name: groups["total"] for name, groups in cpu.items()}
    table = res.get(metric, {}) if group == CROSS else res.get("same_host", {}).get(metric, {})
    return {name: d["median"] for name, d in table.items()}


def ratio(res: dict, goal: Goal, mine: str) -> float | None:
    values = medians(res, goal.group, goal.metric)
    if mine not in values or not values.get(goal.versus):
        return None
    return values[mine] / values[goal.versus]


def vpcnet_contenders(res: dict) -> list[str]:
    """vpcnet's contenders in the run: the default first, then the explicit modes, in either group."""
    names: list[str] = []
    for group in (CROSS, SAME):
        for metric in ("tcp_1stream_bps", "container_start_s"):
            names += [n for n in medians(res, group, metric) if is_vpcnet(n) and n not in names]
    order = [DEFAULT] + [MODE_PREFIX + m for m in ("bridge", "routed", "ebpf")]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def evaluate(res: dict) -> list[dict]:
    """One verdict per goal and vpcnet contender: ratio (None: not measured in this run) and met."""
    out = []
    for mine in vpcnet_contenders(res):
        for goal in GOALS:
            r = ratio(res, goal, mine)
            out.append({"goal": goal.text(), "group": goal.group, "metric": goal.metric, "versus": goal.versus,
                        "contender": mine, "ratio": r, "met": None if r is None else goal.met(r)})
    return out


def fastest(verdicts: list[dict], res: dict) -> str | None:
    """The vpcnet contender meeting the most goals; a tie goes to the higher TCP 1 stream median."""
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v["contender"]] = counts.get(v["contender"], 0) + bool(v["met"])
    if not counts:
        return None
    tcp = medians(res, CROSS, "tcp_1stream_bps")
    return max(counts, key=lambda n: (counts[n], tcp.get(n, 0.0)))


def summary(verdicts: list[dict], contender: str) -> tuple[int, int, int]:
    """(met, measured, not measured) for one contender."""
    mine = [v for v in verdicts if v["contender"] == contender]
    measured = [v for v in mine if v["met"] is not None]
    return sum(1 for v in measured if v["met"]), len(measured), len(mine) - len(measured)
