"""bench/run.py's results as Markdown (latest.md, and docs/benchmarks.md between its markers) and a chart.

What is reported lives here too: the metrics with their labels and units, and the contenders' order.
"""
from __future__ import annotations

import cpu_profile
import goals

CROSS, SAME = goals.CROSS, goals.SAME
CROSS_NAMES = ("underlay", "vpcnet", "vpcnet-eni", "vpcnet-bridge", "vpcnet-routed", "vpcnet-ebpf", "overlay",
               "bridge", "underlay-v6", "vpcnet-v6", "vpcnet-eni-v6", "overlay-v6")  # -v6: bench/run.py --ipv6
SAME_NAMES = ("vpcnet", "vpcnet-eni", "vpcnet-bridge", "vpcnet-routed", "vpcnet-ebpf", "docker-bridge")
FLOWS = 64
METRICS = [  # key, label, unit, higher is better
    ("tcp_1stream_bps", "TCP throughput, 1 stream", "Gbit/s", True),
    ("tcp_4stream_bps", "TCP throughput, 4 streams", "Gbit/s", True),
    ("udp_64b_pps", "UDP 64 B datagrams received", "kpps", True),
    ("rr_p50_us", "TCP request-response p50", "µs", False),
    ("rr_p99_us", "TCP request-response p99", "µs", False),
    ("crr_cps", "TCP connect + request + close", "k conn/s", True),
    ("crr_p50_us", "… per connection, p50", "µs", False),
    ("crr_p99_us", "… per connection, p99", "µs", False),
    ("flows_tps", f"{FLOWS} concurrent flows, request-response", "k trans/s", True),
    ("container_start_s", "container start (docker run -d)", "s", False),
]
README_START = "<!-- latest bench/run.py table -->"
README_END = "<!-- end of the latest bench/run.py table -->"


def fmt(metric: str, value: float) -> str:
    if metric.endswith("_bps"):
        return f"{value / 1e9:.2f}"
    if metric == "udp_64b_pps":
        return f"{value / 1e3:.0f}"
    if metric in ("crr_cps", "flows_tps"):
        return f"{value / 1e3:.2f}"
    if metric.endswith("_us"):
        return f"{value:.1f}"
    return f"{value:.2f}"


def group_data(res: dict, group: str, metric: str) -> dict:
    return res.get(metric, {}) if group == CROSS else res.get("same_host", {}).get(metric, {})


def present(res: dict, group: str, v6: bool | None = None) -> list[str]:
    """The contenders of a group in the run, in their order; `v6` True/False: only those over IPv6/IPv4."""
    order = CROSS_NAMES if group == CROSS else SAME_NAMES
    mtu = res.get("mtu" if group == CROSS else "same_host_mtu", {})
    return [n for n in order if n in mtu and (v6 is None or goals.is_v6(n) == v6)]


def _metric_table(res: dict, group: str, v6: bool | None = None) -> list[str]:
    names = present(res, group, v6)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric, label, unit, _hib in METRICS:
        data = group_data(res, group, metric)
        if not data:
            continue
        row = [f"{label} ({unit})"]
        for n in names:
            d = data.get(n)
            row.append(f"{fmt(metric, d['median'])} ({fmt(metric, d['min'])}–{fmt(metric, d['max'])})" if d else "–")
        lines.append("| " + " | ".join(row) + " |")
    mtu = res["mtu" if group == CROSS else "same_host_mtu"]
    lines.append("| MTU in the container | " + " | ".join(str(mtu[n]) for n in names) + " |")
    return lines


def _ratio_table(res: dict, group: str) -> list[str]:
    names = present(res, group)
    versus = ("underlay", "overlay") if group == CROSS else ("docker-bridge",)
    prefix = "" if group == CROSS else "same:"
    pairs = [(c, goals.baseline(o, c)) for c in names if goals.is_vpcnet(c) for o in versus
             if goals.baseline(o, c) in names]
    if not pairs:
        return []
    lines = ["| metric | " + " | ".join(f"{c}/{o}" for c, o in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for metric, label, _unit, _hib in METRICS:
        cells = [res["ratios"].get(f"{prefix}{metric}:{c}/{o}") for c, o in pairs]
        if any(r is not None for r in cells):
            lines.append(f"| {label.strip()} | " + " | ".join(f"{r:.2f}" if r is not None else "–" for r in cells)
                         + " |")
    return lines


def _goal_table(res: dict) -> list[str]:
    verdicts = res["goals"]
    mine = goals.vpcnet_contenders(res)
    if not mine:
        return []
    fastest = res.get("fastest")
    mode = res["meta"].get("default_mode") or "unknown"

    def head(n: str) -> str:
        tags = (["no -o: " + mode] if goals.is_default(n) else []) + (["fastest"] if n == fastest else [])
        return n + (f" ({', '.join(tags)})" if tags else "")

    by = {(v["contender"], v["goal"]): v for v in verdicts}
    lines = ["| goal | " + " | ".join(head(n) for n in mine) + " |", "|---|" + "---|" * len(mine)]
    for goal in goals.GOALS:
        lines.append(f"| {goal.text()} | " + " | ".join(_goal_cell(by.get((n, goal.text()))) for n in mine) + " |")
    lines += ["", "Ratio of medians, verdict, and on how many rounds the goal held (each round's contender against "
              "the same round's baseline). yes: met on the medians and on at least 2/3 of the rounds; **no**: "
              "missed on both; within noise: anything between; one sample: one sample per contender, "
              "no spread to judge it by, so no verdict."
              + (" A `-v6` contender is held to each goal against the baseline over IPv6 (`underlay-v6`, "
                 "`overlay-v6`)." if any(goals.is_v6(n) for n in mine) else ""), ""]
    defaults = [d for d in goals.DEFAULTS if d in mine]
    for n in dict.fromkeys([*defaults, fastest, *(d + goals.V6 for d in defaults)]):
        if n in mine:
            count = goals.summary(verdicts, n)
            what = ("the default network" if goals.is_default(n) else "the default network over IPv6"
                    if goals.is_default(n.removesuffix(goals.V6)) else "the fastest mode")
            if goals.is_default(n) and n == fastest:
                what += " (also the fastest)"
            measured = sum(count[k] for k in goals.VERDICTS)
            others = [f"{count[k]} {k}" for k in (goals.MISSED, goals.NOISE) if count[k]]
            others += [f"{count[goals.ONE]} on one sample"] if count[goals.ONE] else []
            missing = count["not measured"]
            lines.append(f"- {what}, `{n}`: {count[goals.MET]} of {measured} goals met"
                         + (f" ({', '.join(others)})" if others else "")
                         + (f"; {missing} not measured in this run" if missing else "") + ".")
    return lines


def _goal_cell(v: dict | None) -> str:
    """One goal for one contender: ratio of medians, verdict, rounds it held on."""
    if v is None or v["ratio"] is None:
        return "–"
    word = {goals.MET: "yes", goals.MISSED: "**no**"}.get(v["verdict"], v["verdict"])
    counted = v.get("rounds")
    if v["verdict"] == goals.ONE or not counted:
        return f"{v['ratio']:.2f} {word}"
    return f"{v['ratio']:.2f} {word} ({counted[0]}/{counted[1]} rounds)"


def _naming(meta: dict, mode: str) -> str:
    """What the vpcnet contenders' names stand for, and in which addressing the lab ran."""
    if meta.get("addressing", "route-table") == "eni-prefix":
        return ("Addressing: **eni-prefix** (`bench/run.py --addressing eni-prefix`: each host's containers take "
                "their addresses from /28 and /80 prefixes assigned to its ENI, the route table holds no vpcnet "
                f"route). `{goals.ENI}` is the lab's network created with no `-o` option (here: {mode} mode), "
                "the only vpcnet network a host can have on the range.")
    return (f"Addressing: route-table. `vpcnet` is the network created with no `-o` option (here: {mode} mode); "
            "`vpcnet-<mode>` has `-o vpcnet.mode=<mode>`.")


def markdown(res: dict) -> str:
    m = res["meta"]
    mode = m.get("default_mode") or "unknown"
    lines = [f"Benchmark {m['date']}: {m['rounds']} rounds interleaved, iperf3 runs of {m['duration_s']} s, "
             f"{m['rr_count']} ping-pongs per RR sample, {m.get('crr_seconds', '–')} s of connections per CRR "
             f"sample, {m.get('flows', FLOWS)} flows for {m.get('flows_seconds', '–')} s per flows sample; "
             f"kernel {m['kernel']}, {m['cpus']} CPUs, Docker {m['docker']}, {m['iperf3']}; load average at the end "
             f"{' '.join(m.get('loadavg_at_end', []))}. Median (min–max) per contender. {_naming(m, mode)}", "",
             "Across hosts (client container on h1, server on h2):", "",
             *_metric_table(res, CROSS, False if present(res, CROSS, True) else None)]
    if present(res, CROSS, True):
        lines += ["", "Across hosts over IPv6 (`bench/run.py --ipv6`: the lab's underlay, `vpc0` dual-stack, and "
                  "a dual-stack Docker overlay, each measured between their IPv6 addresses):", "",
                  *_metric_table(res, CROSS, True)]
    for name, why in (m.get("not_measured") or {}).items():
        lines += ["", f"Not measured: `{name}`: {' '.join(why.split())}"]      # one paragraph, whatever it quotes
    if present(res, SAME):
        lines += ["", "On one host (both containers on h1; `docker-bridge` is a user-defined Docker bridge "
                  "network):", "", *_metric_table(res, SAME)]
    lines += ["", "Ratios of medians:", "", *_ratio_table(res, CROSS)]
    if present(res, SAME):
        lines += ["", *_ratio_table(res, SAME)]
    goal_lines = _goal_table(res)
    if goal_lines:
        lines += ["", *goal_lines]
    cpu = res.get("cpu_ms_per_gb")
    if cpu:
        shown = [n for n in present(res, CROSS) if n in cpu]
        runs = max((len(cpu[n].get("samples") or [0]) for n in shown), default=1)
        each = ("during one TCP stream" if runs <= 1 else
                f"during a TCP stream, {runs} runs per contender in rotated order (`--profile-runs`): each "
                "piece's median, the total the median of the runs' totals, its min–max below")
        lines += ["", f"Where the CPU goes (`--profile`): CPU milliseconds per GB delivered {each}, "
                  "both CPUs sampled by perf, kernel symbols grouped by datapath piece (bench/cpu_profile.py).", "",
                  "| piece | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for group in cpu_profile.ORDER + ["total"]:
            lines.append(f"| {group} | " + " | ".join(f"{cpu[n][group]:.0f}" for n in shown) + " |")
        if runs > 1:
            lines.append("| total, min–max | " + " | ".join(
                f"{min(cpu[n]['samples']):.0f}–{max(cpu[n]['samples']):.0f}" if cpu[n].get("samples") else "–"
                for n in shown) + " |")
    lines += ["", f"Reproduce: `{m['command']}` (root; builds and removes its own `vpcnet lab`"
              + (f"; this run took {m['elapsed_s'] / 60:.0f} min" if m.get("elapsed_s") else "") + ")."]
    return "\n".join(lines) + "\n"


def replace_readme_table(text: str, md: str) -> str:
    """docs/benchmarks.md's text with everything between the two markers replaced by `md`."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"docs/benchmarks.md needs the markers {README_START} and, after it, {README_END}")
    return text[:start + len(README_START)] + "\n" + md.rstrip("\n") + "\n" + text[end:]


def update_readme(path: str, md: str) -> None:
    with open(path) as fh:
        text = fh.read()
    with open(path, "w") as fh:
        fh.write(replace_readme_table(text, md))


def chart_unavailable() -> str | None:
    """Why `chart` could not draw (matplotlib, the `bench` extra, not importable), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"the chart (latest.png) needs matplotlib ({exc}): pip install '.[bench]', or run with --no-chart"
    return None


def chart(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"underlay": "#7f7f7f", "vpcnet": "#2ca02c", "vpcnet-bridge": "#c7e9c0", "vpcnet-routed": "#98df8a",
              "vpcnet-ebpf": "#006d2c", "overlay": "#d62728", "bridge": "#1f77b4", "docker-bridge": "#1f77b4",
              "underlay-v6": "#c7c7c7", "vpcnet-v6": "#74c476", "overlay-v6": "#ff9896", "vpcnet-eni": "#2ca02c",
              "vpcnet-eni-v6": "#74c476"}
    panels = [("tcp_1stream_bps", "TCP 1 stream (Gbit/s)", 1e9), ("tcp_4stream_bps", "TCP 4 streams (Gbit/s)", 1e9),
              ("udp_64b_pps", "UDP 64 B received (kpps)", 1e3), ("rr_p50_us", "TCP RR p50 (µs, lower is better)", 1),
              ("rr_p99_us", "TCP RR p99 (µs, lower is better)", 1), ("crr_cps", "connections/s (k)", 1e3),
              ("flows_tps", f"{FLOWS} flows, transactions/s (k)", 1e3),
              ("container_start_s", "docker run -d (s, lower is better)", 1)]
    cpu = res.get("cpu_ms_per_gb") or {}
    same = bool(present(res, SAME))
    cols = 5
    rows = 2 + (2 if same else 0)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows))
    flat = list(axes.flat)
    for a in flat:
        a.axis("off")

    def bars(ax, group: str, metric: str, title: str, scale: float) -> None:
        data = group_data(res, group, metric)
        shown = [n for n in present(res, group) if n in data]
        if not shown:
            return
        ax.axis("on")
        med = [data[n]["median"] / scale for n in shown]
        low = [med[i] - data[n]["min"] / scale for i, n in enumerate(shown)]
        high = [data[n]["max"] / scale - med[i] for i, n in enumerate(shown)]
        ax.bar(shown, med, yerr=[low, high], capsize=4, color=[colors.get(n, "#999999") for n in shown])
        ax.set_title(("same host: " if group == SAME else "") + title, fontsize=9)
        for i, v in enumerate(med):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)

    for ax, (metric, title, scale) in zip(flat, panels, strict=False):
        bars(ax, CROSS, metric, title, scale)
    if cpu:                     # where the CPU goes: one stacked bar per contender, a colour per piece
        ax = flat[len(panels)]
        ax.axis("on")
        shown = [n for n in present(res, CROSS) if n in cpu]
        bottom = [0.0] * len(shown)
        for group, colour in zip(cpu_profile.ORDER, plt.get_cmap("tab20").colors, strict=False):
            values = [cpu[n][group] for n in shown]
            ax.bar(shown, values, bottom=bottom, color=colour, label=group)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        runs = max((len(cpu[n].get("samples") or [0]) for n in shown), default=1)
        ax.set_title("CPU ms per GB, " + ("one TCP stream" if runs <= 1 else f"median of {runs} TCP streams")
                     + " (lower is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.legend(fontsize=6, loc="lower left", ncol=2)
    if same:
        for ax, (metric, title, scale) in zip(flat[2 * cols:], panels, strict=False):
            bars(ax, SAME, metric, title, scale)
    addressing = res["meta"].get("addressing", "route-table")
    fig.suptitle(f"vpcnet ({addressing} addressing) vs underlay, Docker overlay and bridge — "
                 f"{res['meta']['rounds']} rounds, median with "
                 f"min–max ({res['meta']['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
