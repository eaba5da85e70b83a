#!/usr/bin/env python3
"""CreateEndpoint + Join latency of this tree against another checkout of vpcnet, in one run, interleaved.

Each round runs `bench/plugin_bench.py --endpoints-only` (a fresh plugin in a namespace of its own, the
real dataplane, N endpoints on one network) once per tree, alternating which goes first, so both see the
same machine load. The plugin runs the tree's own code (PYTHONPATH and the working directory point at
it); the bench driver is this tree's. Per tree and endpoint count: the medians of the rounds' p50 and
p99 with their min-max, and the ratio this/other of the medians.

The datapath package's goal was CreateEndpoint + Join p99 no worse than before it; the other
tree was then the parent of the commit that created vpcnet/datapath (a `git worktree add --detach`).
    python3 bench/endpoints_compare.py --other /path/to/old/checkout [--counts 200,500] [--rounds 3]
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
THIS = os.path.dirname(HERE)


def once(tree: str, count: int) -> dict:
    """One plugin_bench --endpoints-only run with the plugin from `tree`: its create+join figures."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, PYTHONPATH=tree)
        subprocess.run([sys.executable, os.path.join(HERE, "plugin_bench.py"), "--endpoints-only", out.name,
                        "--endpoints", str(count)], cwd=tree, env=env, check=True, capture_output=True,
                       timeout=900)
        with open(out.name) as fh:
            return json.load(fh)["plugin"]["create_endpoint_plus_join_ms"]


def code_of(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "log", "--format=%h %s", "-1"], capture_output=True, text=True,
                          check=True).stdout.strip()[:100]


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="a checkout of vpcnet to compare against")
    parser.add_argument("--counts", default="200,500", help="endpoints per run, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
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
                runs[count][which].append(once(trees[which], count))
    results = []
    for count, by in runs.items():
        row: dict = {"endpoints": count, "rounds": args.rounds}
        for which in ("this", "other"):
            row[which] = {q: summary([run[q] for run in by[which]]) for q in ("p50", "p99")}
        for q in ("p50", "p99"):
            row[f"ratio_{q}_this_over_other"] = round(row["this"][q]["median"] / row["other"][q]["median"], 3)
        results.append(row)
    doc = {"command": f"python3 bench/endpoints_compare.py --other {other} --counts {args.counts} "
                      f"--rounds {args.rounds}",
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "this": code_of(THIS), "other": code_of(other), "results": results}
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    print(f"this: {doc['this']}\nother: {doc['other']}\n")
    print("| endpoints | this p50 | other p50 | this p99 | other p99 | p99 ratio this/other |")
    print("|---|---|---|---|---|---|")
    fmt = lambda s: f"{s['median']} ms ({s['min']}-{s['max']})"   # noqa: E731
    for row in results:
        print(f"| {row['endpoints']} | {fmt(row['this']['p50'])} | {fmt(row['other']['p50'])} | "
              f"{fmt(row['this']['p99'])} | {fmt(row['other']['p99'])} | {row['ratio_p99_this_over_other']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
