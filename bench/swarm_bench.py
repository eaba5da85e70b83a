"""Swarm convergence: time from `docker service create --replicas N` until all N tasks run, over the
lab's hosts, on a swarm-scoped vpcnet network (managed plugin, per-node config, docs/swarm.md) against
Docker's overlay network. Rounds alternate between the two; each service is removed (and its tasks gone)
before the next.

    python3 bench/swarm_bench.py [--hosts 3] [--replicas 6] [--rounds 3]

Root; builds and removes its own `vpcnet lab` (needs what the lab and plugin/build.sh need). Writes
bench/results/swarm.json. Run it on a current engine with tests/engines/with-docker.sh.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "lab")]     # this checkout's vpcnet and vpcnet_lab

from vpcnet_lab import Lab  # noqa: E402
from vpcnet_lab import swarm as lab_swarm  # noqa: E402

LAB_CLUSTER = "10.241.0.0/16"
SWARM_CLUSTER = "10.247.0.0/16"
IMAGE = "vpcnet-testbox:latest"
TIMEOUT = 180.0


def running(lab, service: str) -> int:
    out = lab.docker(1, "service", "ps", "--filter", "desired-state=running", "--format", "{{.CurrentState}}",
                     service, check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("Running"))


def converge(lab, network: str, replicas: int, hosts: int) -> float:
    service = f"conv-{network}"
    started = time.monotonic()
    lab.docker(1, "service", "create", "--detach", "--no-resolve-image", "--name", service, "--network", network,
               "--replicas", str(replicas), IMAGE, "sleep", "86400", timeout=60)
    deadline = started + TIMEOUT
    while time.monotonic() < deadline and running(lab, service) < replicas:
        time.sleep(0.1)
    took = time.monotonic() - started
    ok = running(lab, service) == replicas
    lab.docker(1, "service", "rm", service)
    deadline = time.monotonic() + TIMEOUT     # the tasks' containers gone on every host
    while time.monotonic() < deadline and any(
            lab.docker(k, "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}").stdout.strip()
            for k in range(1, hosts + 1)):
        time.sleep(0.2)
    if not ok:
        raise RuntimeError(f"{network}: {replicas} replicas not running within {TIMEOUT:.0f}s")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "swarm.json"))
    args = ap.parse_args()
    hosts = list(range(1, args.hosts + 1))
    lab = Lab(hosts=args.hosts, cluster_cidr=LAB_CLUSTER, reconcile_interval=2.0)
    samples: dict[str, list[float]] = {"vpcnet": [], "overlay": []}
    try:
        lab.up()
        for k in hosts:
            lab_swarm.install_managed_plugin(lab, k, SWARM_CLUSTER)
        lab_swarm.init_swarm(lab, hosts)
        lab_swarm.swarm_network(lab, hosts, "vpcs", SWARM_CLUSTER)
        lab.docker(1, "network", "create", "-d", "overlay", "--attachable", "ov")
        engine = lab.docker(1, "version", "--format", "{{.Server.Version}}").stdout.strip()
        for _ in range(args.rounds):
            for name, network in (("vpcnet", "vpcs"), ("overlay", "ov")):
                samples[name].append(converge(lab, network, args.replicas, args.hosts))
                print(f"{name}: {samples[name][-1]:.2f} s", flush=True)
    finally:
        lab.down()
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "engine": engine, "hosts": args.hosts,
              "replicas": args.replicas, "rounds": args.rounds, "seconds": samples,
              "median": {k: statistics.median(v) for k, v in samples.items()}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"Docker {engine}, {args.hosts} hosts, {args.replicas} replicas, {args.rounds} rounds: time until all "
          f"tasks run, median (min-max): " + "; ".join(
              f"{k} {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})" for k, v in samples.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
