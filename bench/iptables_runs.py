#!/usr/bin/env python3
"""iptables process runs per network create, per endpoint, per restart pass and per delete (root).

Counts every `iptables*` process the dataplane starts (subprocess.run wrapped), against the real kernel in
a network namespace of its own, for one network of each mode with N endpoints. Run it from any checkout
to compare (`PYTHONPATH=<checkout> python3 bench/iptables_runs.py`): the figure is the checkout's.
    python3 bench/iptables_runs.py [--endpoints 10] [--json bench/results/iptables_runs.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import uuid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    from vpcnet.datapath.dataplane import Dataplane
    from vpcnet.datapath.spec import NetworkSpec, bridge_name, mac_for, veth_names
    runs = {"n": 0}
    real_run = subprocess.run

    def counting_run(cmd, *a, **kw):
        if any("iptables" in str(part) for part in cmd):
            runs["n"] += 1
        return real_run(cmd, *a, **kw)

    subprocess.run = counting_run
    ns = f"vpcbench-{uuid.uuid4().hex[:6]}"
    real_run(["ip", "netns", "add", ns], check=True)
    out = {}
    try:
        for n, mode in enumerate(("bridge", "routed")):
            tag = f"{n}" * 12
            host = f"10.9{n}.3.0/24"
            spec = NetworkSpec(tag=tag, bridge=bridge_name(tag * 2), gateway=f"10.9{n}.3.1", host_cidr=host,
                               cluster_cidr=f"10.9{n}.0.0/16", mtu=1500, mode=mode)
            dp = Dataplane(netns=ns)
            figures = {}
            runs["n"] = 0
            dp.ensure_network(spec)
            figures["network create"] = runs["n"]
            runs["n"] = 0
            for e in range(args.endpoints):
                ip = f"10.9{n}.3.{e + 2}"
                dp.ensure_endpoint(spec, *veth_names(f"{n}{e:03d}" + "e" * 60), mac_for(ip), ip)
            figures["per endpoint"] = runs["n"] / args.endpoints
            runs["n"] = 0
            dp.ensure_network(spec)
            figures["network again (restart, up to date)"] = runs["n"]
            runs["n"] = 0
            dp.delete_network(spec)
            figures["network delete"] = runs["n"]
            out[mode] = figures
    finally:
        real_run(["ip", "netns", "del", ns], check=False)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
