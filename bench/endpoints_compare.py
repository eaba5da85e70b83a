#!/usr/bin/env python3
"""CreateEndpoint + Join latency of this tree against another checkout of vpcnet, in one run, interleaved.

Each round runs `bench/plugin_bench.py --endpoints-only --modes MODE [--ipv6]` (a fresh plugin in a
namespace of its own, the real dataplane, N endpoints on one network of `--mode`, dual-stack with `--ipv6`)
once per tree, alternating which goes first, so both see the same machine load. The plugin runs the tree's
own code (PYTHONPATH and the working directory point at it); the bench driver is this tree's. Per tree and
endpoint count, for CreateEndpoint alone (the kernel's part: veth, route, programs) and CreateEndpoint +
Join: the medians of the rounds' p50 and p99 with their min-max, and the ratio this/other of the medians;
likewise the plugin's RSS (master + workers) with the endpoints, and the mode `--mode default` resolved to.

The datapath package's goal was CreateEndpoint + Join p99 no worse than before it; the other
tree was then the parent of the commit that created vpcnet/datapath (a `git worktree add --detach`).
    python3 bench/endpoints_compare.py --other /path/to/old/checkout [--counts 200,500] [--rounds 3]
                                       [--mode ebpf] [--ipv6]
Writes bench/results/endpoints_compare.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CALLS = ("create_endpoint", "create_endpoint_plus_join")      # plugin_bench's figures, *_ms
THIS = os.path.dirname(HERE)


def once(tree: str, count: int, mode: str, ipv6: bool) -> dict:
    """One plugin_bench --endpoints-only run of `mode` with the plugin from `tree`: its figures, by call
    (`create_endpoint_plus_join_ms`, `create_endpoint_ms`: the kernel's part, `join_ms`)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, PYTHONPATH=tree)
        subprocess.run([sys.executable, os.path.join(HERE, "plugin_bench.py"), "--endpoints-only", out.name,
                        "--endpoints", str(count), "--modes", mode, *(["--ipv6"] if ipv6 else [])],
                       cwd=tree, env=env, check=True, capture_output=True, timeout=900)
        with open(out.name) as fh:
            return json.load(fh)["endpoints"][mode]


def code_of(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "log", "--format=%h %s", "-1"], capture_output=True, text=True,
                          check=True).stdout.strip()[:100]


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values),
            "rounds": values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="a checkout of vpcnet to compare against")
    parser.add_argument("--counts", default="200,500", help="endpoints per run, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", default="ebpf", help="the network's mode (plugin_bench's --modes, `default`: no "
                                                       "-o, the plugin's choice; default ebpf)")
    parser.add_argument("--ipv6", action="store_true", help="dual-stack networks and endpoints")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "endpoints_compare.json"))
    args = parser.parse_args()
    other = os.path.abspath(args.other)
    if not os.path.isfile(os.path.join(other, "vpcnet", "__init__.py")):
        parser.error(f"--other {other}: not a vpcnet checkout (no vpcnet/__init__.py)")
    trees = {"this": THIS, "other": other}
    runs: dict[int, dict[str, list[dict]]] = {}
    for count in map(int, args.counts.split(",")):
        runs[count] = {"this": [], "other": []}
        for r in range(args.rounds):
            order = ("this", "other") if r % 2 == 0 else ("other", "this")
            for which in order:
                runs[count][which].append(once(trees[which], count, args.mode, args.ipv6))
    results = []
    for count, by in runs.items():
        row: dict = {"endpoints": count, "rounds": args.rounds}
        for which in ("this", "other"):
            row[which] = {f"{call}_{q}": summary([run[f"{call}_ms"][q] for run in by[which]])
                          for call in CALLS for q in ("p50", "p99")}
            row[which]["rss_mb"] = summary([run["rss_mb"][f"with_{count}_endpoints"] for run in by[which]])
            row[f"{which}_resolved_modes"] = sorted({run.get("resolved_mode", "?") for run in by[which]})
        for key in row["this"]:
            row[f"ratio_{key}_this_over_other"] = round(row["this"][key]["median"] / row["other"][key]["median"], 3)
        results.append(row)
    doc = {"command": f"python3 bench/endpoints_compare.py --other {other} --counts {args.counts} "
                      f"--rounds {args.rounds} --mode {args.mode}" + (" --ipv6" if args.ipv6 else ""),
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "this": code_of(THIS), "other": code_of(other), "results": results}
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    print(f"this: {doc['this']}\nother: {doc['other']}\n")
    print("| endpoints | call | this p50 | other p50 | p50 ratio | this p99 | other p99 | p99 ratio |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda s, unit="ms": f"{s['median']} {unit} ({s['min']}-{s['max']})"   # noqa: E731
    for row in results:
        for call in CALLS:
            this, other_ = row["this"], row["other"]
            print(f"| {row['endpoints']} | {call} | {fmt(this[call + '_p50'])} | {fmt(other_[call + '_p50'])} | "
                  f"{row[f'ratio_{call}_p50_this_over_other']} | {fmt(this[call + '_p99'])} | "
                  f"{fmt(other_[call + '_p99'])} | {row[f'ratio_{call}_p99_this_over_other']} |")
        print(f"| {row['endpoints']} | plugin RSS | {fmt(row['this']['rss_mb'], 'MB')} | "
              f"{fmt(row['other']['rss_mb'], 'MB')} | "
              f"{row['ratio_rss_mb_this_over_other']} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
