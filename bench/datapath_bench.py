#!/usr/bin/env python3
"""The datapath pass at scale, against the real kernel in a network namespace of the bench's own (root).

For N networks with M endpoints each (half bridge, half routed mode; every endpoint's veth present, as
on a host whose containers run):
1. start-up restore (`NetworkDriver.restore()`, what a plugin restart runs) on an intact kernel, and on
   one where every network's firewall chains and bridges/anchors are gone (the veths stay): wall time;
2. the periodic pass on an idle host: CPU seconds per pass (this process plus its iptables children),
   as a share of one CPU at the default interval (VPCNET_DATAPATH_INTERVAL, 30 s);
3. time to repair each fault: firewall flushed, a /32 route deleted, a bridge deleted (the pass's own
   time; detection adds at most one interval).

Writes bench/results/datapath.json and prints a Markdown table.
    python3 bench/datapath_bench.py [--scales 10x10,25x10,50x10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vpcnet import config as config_mod  # noqa: E402
from vpcnet.datapath.dataplane import Dataplane  # noqa: E402
from vpcnet.datapath.spec import bridge_name, mac_for, veth_names
from vpcnet.datapath.reconciler import spec_of  # noqa: E402
from vpcnet.driver import NetworkDriver  # noqa: E402
from vpcnet.store import Endpoint, Network, Store  # noqa: E402

INTERVAL = 30.0


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def build(ns: str, state: str, networks: int, per: int):
    config = config_mod.load(environ={"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": state,
                                      "VPCNET_SOCKET": os.path.join(state, "b.sock")}, check_socket_dir=False)
    store = Store(os.path.join(state, "vpcnet.db"))
    dp = Dataplane(netns=ns)
    for n in range(networks):
        nid = f"{n:04d}" + uuid.uuid4().hex * 2
        nid = nid[:64]
        net = Network(network_id=nid, host_cidr=f"10.{100 + n}.1.0/24", cluster_cidr=f"10.{100 + n}.0.0/16",
                      gateway=f"10.{100 + n}.1.1", bridge=bridge_name(nid), mtu=1500, internal=False,
                      no_nat=(), mode="routed" if n % 2 else "bridge")
        with store.tx() as db:
            store.add_network(db, net)
        dp.ensure_network(spec_of(net))
        for e in range(per):
            eid = f"{n:04d}{e:03d}" + uuid.uuid4().hex * 2
            eid = eid[:64]
            ip = f"10.{100 + n}.1.{e + 2}"
            host, peer = veth_names(eid)
            dp.ensure_endpoint(spec_of(net), host, peer, mac_for(ip), ip)
            with store.tx() as db:
                store.add_endpoint(db, Endpoint(eid, nid, ip, mac_for(ip), host, peer))
    return config, store, dp


def measure(networks: int, per: int) -> dict:
    ns = f"vpcbench-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    state = tempfile.mkdtemp(prefix="vpcnet-bench-")
    out: dict = {"networks": networks, "endpoints": networks * per}
    try:
        t0 = time.monotonic()
        config, store, dp = build(ns, state, networks, per)
        out["build_s"] = round(time.monotonic() - t0, 2)
        # 1. start-up restore, intact kernel (a plugin restart)
        driver = NetworkDriver(config, store, Dataplane(netns=ns))
        t0 = time.monotonic()
        driver.restore()
        out["restore_intact_s"] = round(time.monotonic() - t0, 3)
        # ... and with every network's firewall and bridge/anchor gone
        for table in ("filter", "nat", "raw"):
            sh("ip", "netns", "exec", ns, "iptables", "-t", table, "-F")
        for net in store.networks():
            sh("ip", "-n", ns, "link", "del", net.bridge)
        driver = NetworkDriver(config, store, Dataplane(netns=ns))
        t0 = time.monotonic()
        driver.restore()
        out["restore_rebuild_s"] = round(time.monotonic() - t0, 3)
        # 2. idle periodic pass
        reconciler = driver.reconciler
        reconciler.reconcile()
        passes = 5
        c0, t0 = cpu(), time.monotonic()
        for _ in range(passes):
            assert reconciler.reconcile() == [], "an idle host needs no repair"
        per_pass_cpu = (cpu() - c0) / passes
        out["idle_pass_wall_s"] = round((time.monotonic() - t0) / passes, 3)
        out["idle_pass_cpu_s"] = round(per_pass_cpu, 3)
        out["idle_cpu_share_at_30s"] = f"{100 * per_pass_cpu / INTERVAL:.2f} %"
        # 3. faults
        nets = store.networks()
        routed = next(n for n in nets if n.mode == "routed")
        bridged = next(n for n in nets if n.mode == "bridge")
        ep = store.endpoints(routed.network_id)[0]
        faults = {
            "firewall flushed": lambda: [sh("ip", "netns", "exec", ns, "iptables", "-t", t, "-F")
                                         for t in ("filter", "nat", "raw")],
            "a /32 route deleted": lambda: sh("ip", "-n", ns, "route", "del", f"{ep.address}/32"),
            "a bridge deleted": lambda: sh("ip", "-n", ns, "link", "del", bridged.bridge),
        }
        out["repair_s"] = {}
        for name, inject in faults.items():
            inject()
            t0 = time.monotonic()
            repairs = reconciler.reconcile()
            out["repair_s"][name] = round(time.monotonic() - t0, 3)
            assert repairs, f"{name}: nothing repaired"
            assert reconciler.reconcile() == [], f"{name}: not fully repaired"
        store.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["rm", "-rf", state], check=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="10x10,25x10,50x10", help="NETWORKSxENDPOINTS_EACH,...")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "datapath.json"))
    args = parser.parse_args()
    results = [measure(*map(int, scale.split("x"))) for scale in args.scales.split(",")]
    with open(args.json, "w") as fh:
        json.dump({"command": "python3 bench/datapath_bench.py --scales " + args.scales, "results": results},
                  fh, indent=2)
        fh.write("\n")
    print("| networks | endpoints | restore (intact) | restore (rebuild) | idle pass CPU | share of 1 CPU @30s |"
          " firewall flushed | /32 deleted | bridge deleted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        f = r["repair_s"]
        print(f"| {r['networks']} | {r['endpoints']} | {r['restore_intact_s']} s | {r['restore_rebuild_s']} s | "
              f"{r['idle_pass_cpu_s']} s | {r['idle_cpu_share_at_30s']} | {f['firewall flushed']} s | "
              f"{f['a /32 route deleted']} s | {f['a bridge deleted']} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
