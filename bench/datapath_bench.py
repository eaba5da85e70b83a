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

With --repair-times, instead: the time from each datapath fault until the kernel is right again, with
the periodic pass running in the background at a short interval (what a host sees: detection, up to one
interval, plus the repair), repeated; medians with min-max, to bench/results/datapath_repair.json.
One bridge, one routed and one ebpf network with an endpoint each. The faults: the firewall flushed
(filter, nat, raw), a /32 route deleted, the bridge deleted, the uplink replaced (the default route
moved to another device: the eBPF uplink program must follow; a plain rename keeps the device's index
and its programs, so it needs no repair), and FORWARD reordered (vpcnet's jump moved behind a DROP).
    python3 bench/datapath_bench.py --repair-times [--repeats 7] [--interval 0.5]
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
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vpcnet import config as config_mod  # noqa: E402
from vpcnet.datapath.dataplane import Dataplane  # noqa: E402
from vpcnet.datapath.reconciler import spec_of  # noqa: E402
from vpcnet.datapath.spec import bridge_name, mac_for, veth_names  # noqa: E402
from vpcnet.docker.driver import NetworkDriver  # noqa: E402
from vpcnet.state.store import Endpoint, Network, Store  # noqa: E402

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


def run_out(*cmd: str) -> str:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60).stdout


def repair_times(repeats: int, interval: float) -> dict:
    from vpcnet.datapath.reconciler import DatapathReconciler

    ns = f"vpcbench-{uuid.uuid4().hex[:6]}"
    state = tempfile.mkdtemp(prefix="vpcnet-bench-")
    sh("ip", "netns", "add", ns)
    try:
        for dev in ("uplink0", "uplink1"):       # two candidate uplinks; the default route starts on uplink0
            sh("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", dev + "p", "up")
        sh("ip", "-n", ns, "addr", "add", "192.0.2.10/24", "dev", "uplink0")
        sh("ip", "-n", ns, "addr", "add", "198.18.0.10/24", "dev", "uplink1")
        sh("ip", "-n", ns, "route", "add", "default", "via", "192.0.2.1", "dev", "uplink0")
        store = Store(os.path.join(state, "vpcnet.db"))
        dp = Dataplane(netns=ns)
        nets = {}
        for n, mode in enumerate(("bridge", "routed", "ebpf")):
            nid = (f"{n:04d}" + uuid.uuid4().hex * 2)[:64]
            net = Network(network_id=nid, host_cidr=f"10.{100 + n}.1.0/24", cluster_cidr=f"10.{100 + n}.0.0/16",
                          gateway=f"10.{100 + n}.1.1", bridge=bridge_name(nid), mtu=1500, internal=False,
                          no_nat=(), mode=mode)
            with store.tx() as db:
                store.add_network(db, net)
            dp.ensure_network(spec_of(net))
            eid = (f"{n:04d}001" + uuid.uuid4().hex * 2)[:64]
            ip, (host, peer) = f"10.{100 + n}.1.2", veth_names(eid)
            dp.ensure_endpoint(spec_of(net), host, peer, mac_for(ip), ip)
            with store.tx() as db:
                store.add_endpoint(db, Endpoint(eid, nid, ip, mac_for(ip), host, peer))
            nets[mode] = (net, host, ip)
        config = type("Config", (), {"state_dir": state, "datapath_interval": interval})()
        reconciler = DatapathReconciler(config, store, dp)
        bridged, bridge_veth, _ = nets["bridge"]
        _, _, routed_ip = nets["routed"]
        tc_name = spec_of(nets["ebpf"][0]).tc_name
        chain = f"VPCNET-F-{bridged.network_id[:12]}"
        uplink = ["uplink0"]

        def filters(dev: str) -> str:
            return run_out("ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "ingress")

        def move_uplink() -> None:
            uplink[0] = "uplink1" if uplink[0] == "uplink0" else "uplink0"
            via = "198.18.0.1" if uplink[0] == "uplink1" else "192.0.2.1"
            sh("ip", "-n", ns, "route", "replace", "default", "via", via, "dev", uplink[0])

        def reorder() -> None:
            sh("ip", "netns", "exec", ns, "iptables", "-D", "FORWARD", "-j", "VPCNET-FORWARD")
            sh("ip", "netns", "exec", ns, "iptables", "-A", "FORWARD", "-j", "DROP")
            sh("ip", "netns", "exec", ns, "iptables", "-A", "FORWARD", "-j", "VPCNET-FORWARD")

        def jump_first() -> bool:
            rules = run_out("ip", "netns", "exec", ns, "iptables", "-S", "FORWARD").splitlines()
            return [r for r in rules if r.startswith("-A ")][:1] == ["-A FORWARD -j VPCNET-FORWARD"]

        faults = {   # name: (inject, repaired?, tidy-up after the repair)
            "firewall flushed": (
                lambda: [sh("ip", "netns", "exec", ns, "iptables", "-t", t, "-F") for t in ("filter", "nat", "raw")],
                lambda: f"-A {chain}" in run_out("ip", "netns", "exec", ns, "iptables-save", "-t", "filter")
                and jump_first(), None),
            "route deleted": (
                lambda: sh("ip", "-n", ns, "route", "del", f"{routed_ip}/32"),
                lambda: bool(run_out("ip", "-n", ns, "route", "show", f"{routed_ip}/32").strip()), None),
            "bridge deleted": (
                lambda: sh("ip", "-n", ns, "link", "del", bridged.bridge),
                lambda: f"master {bridged.bridge}" in run_out("ip", "-n", ns, "link", "show", bridge_veth), None),
            "uplink replaced": (
                move_uplink,
                lambda: tc_name in filters(uplink[0])
                and tc_name not in filters("uplink1" if uplink[0] == "uplink0" else "uplink0"), None),
            "FORWARD reordered": (
                reorder, jump_first,
                lambda: sh("ip", "netns", "exec", ns, "iptables", "-D", "FORWARD", "-j", "DROP")),
        }
        reconciler.reconcile()
        times: dict[str, list[float]] = {name: [] for name in faults}
        thread = reconciler.start_background()
        try:
            for i in range(repeats):
                for name, (inject, repaired, tidy) in faults.items():
                    time.sleep(interval * (0.3 + 0.7 * ((i * 7 + len(name)) % 10) / 10))   # vary the phase
                    assert repaired(), f"{name}: not right before the fault"
                    inject()
                    t0 = time.monotonic()
                    deadline = t0 + 10 * interval + 10
                    while not repaired():
                        assert time.monotonic() < deadline, f"{name}: not repaired in {deadline - t0:.0f} s"
                        time.sleep(0.01)
                    times[name].append(time.monotonic() - t0)
                    if tidy:
                        tidy()
        finally:
            reconciler.stop()
            thread.join(timeout=30)
        counts = {k: int(v) for k, v in reconciler.repairs.items()}
        store.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["rm", "-rf", state], check=False)
    return {"interval_s": interval, "repeats": repeats, "repairs_counted": counts,
            "repair_s": {name: {"median": round(statistics.median(t), 3), "min": round(min(t), 3),
                                "max": round(max(t), 3)} for name, t in times.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="10x10,25x10,50x10", help="NETWORKSxENDPOINTS_EACH,...")
    parser.add_argument("--json", help="default: bench/results/datapath.json (datapath_repair.json)")
    parser.add_argument("--repair-times", action="store_true", help="time to repair each fault (see above)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--interval", type=float, default=0.5, help="the pass's interval for --repair-times")
    args = parser.parse_args()
    if args.repair_times:
        result = repair_times(args.repeats, args.interval)
        with open(args.json or os.path.join(HERE, "results", "datapath_repair.json"), "w") as fh:
            json.dump({"command": f"python3 bench/datapath_bench.py --repair-times --repeats {args.repeats} "
                                  f"--interval {args.interval}", **result}, fh, indent=2)
            fh.write("\n")
        print(f"| fault (pass every {args.interval} s, {args.repeats} repeats) | median | min-max |")
        print("|---|---|---|")
        for name, t in result["repair_s"].items():
            print(f"| {name} | {t['median']} s | {t['min']}-{t['max']} s |")
        return 0
    args.json = args.json or os.path.join(HERE, "results", "datapath.json")
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
