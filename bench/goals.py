"""The benchmark goals for vpcnet's contenders, checked on one bench/run.py run: on the ratio of medians and
on each round, so that a verdict is not named from medians whose ranges overlap.

Pure functions over the results dictionary (no I/O), so the verdicts can be tested on numbers.

Two groups of contenders: `cross` (container on host 1 <-> container on host 2, against the underlay and
Docker's overlay) and `same` (two containers on host 1, against Docker's bridge network). Each vpcnet
contender is checked: the default network (`vpcnet`, created without any `-o` option) and every explicit
mode (`vpcnet-<mode>`); the fastest of them is named too, since the goals are meant for both the default
and the fastest mode.

IPv6 (`bench/run.py --ipv6`): a contender whose name ends in `-v6` (`vpcnet-v6`, the default network over
IPv6) is held to the same goals against the baselines of its own family (`underlay-v6`, `overlay-v6`):
`baseline()` names them, so an IPv6 path is never judged against an IPv4 one. The fastest mode is named
among the IPv4 contenders only (IPv6 is measured on the default network alone).

eni-prefix addressing (`bench/run.py --addressing eni-prefix`): the default network is named `vpcnet-eni`
(`vpcnet-eni-v6` over IPv6), so a result never passes for the route-table one; it is held to the same goals
as `vpcnet`. Explicit modes do not exist there (one vpcnet network per range per host).

A ratio is mine / versus. For "lower is better" metrics (latency, CPU, `docker run` time) the bound is an
upper one. Each goal gets one verdict:

  met            the goal holds on the ratio of medians AND on at least 2/3 of the paired rounds
  missed         it fails on the ratio of medians AND on at least 2/3 of the paired rounds
  within noise   anything between: the rounds split, they disagree with the medians, or they cannot be
                 paired (not one sample per round each)
  one sample     the goal rests on one sample per contender (a 1-round run, or the CPU goal: `--profile`
                 takes one perf run per contender; a CPU entry with `samples`, several runs' totals, is
                 judged like rounds), so there is no spread to judge it against

A paired round is one round's sample of the contender against the same round's sample of the baseline.
Why paired rounds and not a noise margin from the spread: bench/run.py runs every contender in every
round, in a rotated order, so a change in the shared machine's load hits a round's contenders alike.
Pairing cancels that drift; a margin computed from the spread across rounds would mostly measure the
machine's load (min–max ranges of ±30 % and more are usual there) and call nearly every goal noise.
2/3 is a majority rule, not a significance test; more rounds make it sharper.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT = "vpcnet"                       # the network created with no -o option
ENI = "vpcnet-eni"                       # the same network in eni-prefix addressing (bench/run.py --addressing)
DEFAULTS = (DEFAULT, ENI)
MODE_PREFIX = "vpcnet-"                  # vpcnet-bridge, vpcnet-routed, vpcnet-ebpf: -o vpcnet.mode=<mode>
V6 = "-v6"                               # a contender measured over IPv6: underlay-v6, vpcnet-v6, overlay-v6
CROSS, SAME = "cross", "same"
MET, MISSED, NOISE, ONE = "met", "missed", "within noise", "one sample"
VERDICTS = (MET, MISSED, NOISE, ONE)
MOST = (2, 3)                            # "most rounds": the share of paired rounds a verdict needs


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


def is_default(name: str) -> bool:
    """The network created with no -o option, in either addressing."""
    return name in DEFAULTS


def is_v6(name: str) -> bool:
    return name.endswith(V6)


def baseline(versus: str, mine: str) -> str:
    """The contender `mine` is compared with for a goal against `versus`: the one of its own family."""
    return versus + V6 if is_v6(mine) and not is_v6(versus) else versus


def _table(res: dict, group: str, metric: str) -> dict:
    if metric == "cpu_ms_per_gb":
        return (res.get("cpu_ms_per_gb") or {}) if group == CROSS else {}
    return res.get(metric, {}) if group == CROSS else res.get("same_host", {}).get(metric, {})


def medians(res: dict, group: str, metric: str) -> dict[str, float]:
    """Contender -> median of one metric in one group of a bench/run.py result."""
    key = "total" if metric == "cpu_ms_per_gb" else "median"
    return {name: d[key] for name, d in _table(res, group, metric).items()}


def samples(res: dict, group: str, metric: str) -> dict[str, list[float]]:
    """Contender -> its per-round samples, in round order. A CPU profile entry is one sample (its total)
    unless it carries `samples`, the totals of several profile runs."""
    key = "total" if metric == "cpu_ms_per_gb" else "median"
    return {name: list(d.get("samples") or [d[key]]) for name, d in _table(res, group, metric).items()}


def ratio(res: dict, goal: Goal, mine: str) -> float | None:
    values = medians(res, goal.group, goal.metric)
    versus = baseline(goal.versus, mine)
    if mine not in values or not values.get(versus):
        return None
    return values[mine] / values[versus]


def rounds(res: dict, goal: Goal, mine: str) -> tuple[int, int] | None:
    """(rounds the goal held on, paired rounds): round i of `mine` against round i of the baseline.
    None when the two do not have one sample per round each (they cannot be paired)."""
    pairs = _pairs(res, goal, mine)
    if pairs is None:
        return None
    return sum(1 for x, y in pairs if goal.met(x / y)), len(pairs)


def _pairs(res: dict, goal: Goal, mine: str) -> list[tuple[float, float]] | None:
    by = samples(res, goal.group, goal.metric)
    a, b = by.get(mine, []), by.get(baseline(goal.versus, mine), [])
    if not a or len(a) != len(b):
        return None
    return [(x, y) for x, y in zip(a, b, strict=True) if y]


def spread(res: dict, goal: Goal, mine: str) -> tuple[float, float] | None:
    """(lowest, highest) of the paired rounds' ratios: how far one round's ratio strays from the medians'.
    None when the rounds cannot be paired or there are fewer than two."""
    pairs = _pairs(res, goal, mine)
    if not pairs or len(pairs) < 2:
        return None
    each = [x / y for x, y in pairs]
    return min(each), max(each)


def verdict(goal: Goal, r: float | None, counted: tuple[int, int] | None) -> str | None:
    """met / missed / within noise / one sample (the module docstring), None when not measured."""
    if r is None:
        return None
    if counted is None:
        return NOISE
    held, paired = counted
    if paired <= 1:
        return ONE
    def most(n: int) -> bool:                 # in integers: 6 of 9 is 2/3, not 0.666… short of it
        return n * MOST[1] >= paired * MOST[0]

    if goal.met(r) and most(held):
        return MET
    if not goal.met(r) and most(paired - held):
        return MISSED
    return NOISE


def vpcnet_contenders(res: dict) -> list[str]:
    """vpcnet's contenders in the run: the default first, then the explicit modes, in either group."""
    names: list[str] = []
    for group in (CROSS, SAME):
        for metric in ("tcp_1stream_bps", "container_start_s"):
            names += [n for n in medians(res, group, metric) if is_vpcnet(n) and n not in names]
    order = [DEFAULT, ENI] + [MODE_PREFIX + m for m in ("bridge", "routed", "ebpf")]

    def key(n: str) -> tuple[bool, int, str]:            # IPv4 first, then the same order over IPv6
        bare = n[:-len(V6)] if is_v6(n) else n
        return is_v6(n), order.index(bare) if bare in order else len(order), n
    return sorted(names, key=key)


def evaluate(res: dict) -> list[dict]:
    """One verdict per goal and vpcnet contender: the ratio of medians (None: not measured in this run),
    `rounds` [held, paired] (None: not measured, or the rounds cannot be paired), `spread` [lowest,
    highest] of the paired rounds' ratios (None: fewer than two pairs) and `verdict`. `versus` is the
    baseline actually used (`underlay-v6` for `vpcnet-v6`), `goal` the goal's text as in GOALS."""
    out = []
    for mine in vpcnet_contenders(res):
        for goal in GOALS:
            r = ratio(res, goal, mine)
            counted = None if r is None else rounds(res, goal, mine)
            band = None if r is None else spread(res, goal, mine)
            out.append({"goal": goal.text(), "group": goal.group, "metric": goal.metric,
                        "versus": baseline(goal.versus, mine), "contender": mine, "ratio": r,
                        "rounds": None if counted is None else list(counted),
                        "spread": None if band is None else list(band), "verdict": verdict(goal, r, counted)})
    return out


def fastest(verdicts: list[dict], res: dict) -> str | None:
    """The IPv4 vpcnet contender meeting the most goals; a tie goes to the higher TCP 1 stream median."""
    counts: dict[str, int] = {}
    for v in verdicts:
        if not is_v6(v["contender"]):
            counts[v["contender"]] = counts.get(v["contender"], 0) + (v["verdict"] == MET)
    if not counts:
        return None
    tcp = medians(res, CROSS, "tcp_1stream_bps")
    return max(counts, key=lambda n: (counts[n], tcp.get(n, 0.0)))


def summary(verdicts: list[dict], contender: str) -> dict[str, int]:
    """For one contender: how many goals got each verdict, and how many were not measured (None)."""
    mine = [v["verdict"] for v in verdicts if v["contender"] == contender]
    return {**{name: mine.count(name) for name in VERDICTS}, "not measured": mine.count(None)}
