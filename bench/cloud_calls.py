#!/usr/bin/env python3
"""Cloud API cost of vpcnet's routes, and how fast a host's route is in place.

    python3 bench/cloud_calls.py [--runs 12] [--storm 50,200] [--out bench/results/cloud_calls.json]

Everything runs on 127.0.0.1: an in-process VPC emulator (Alibaba-compatible API, signed requests) and
real `vpcnet serve` processes (gunicorn on a unix socket in a temporary directory) configured with
VPCNET_PROVIDER=aliyun and pointed at it; the metadata URL is a closed local port.

1. API calls per host, counted by the emulator (HTTP requests received, per Action), with a 1 s
   Pending delay and no faults:
   - first start: empty state dir, `vpcnet serve` until its route is Available;
   - restart: same state dir, `vpcnet serve` again, until its first reconcile pass is done;
   - per container: IpamDriver.RequestAddress + ReleaseAddress repeated N times on the running plugin
     (a container's IPAM calls; CreateEndpoint/Join are kernel-only and the network driver holds no
     reference to the route keeper at all).
2. Time from starting `vpcnet serve` to the host's route being Available in the emulator, with a 1 s
   Pending delay and 20 % injected retryable faults (Throttling, ServiceUnavailable, InternalError) on
   every API call; fresh state dir and fresh route table each run; median of --runs runs (target <= 5 s).
3. Boot storms (`--storm`, default 50 and 200 hosts): that many real `vpcnet routes sync` processes,
   distinct instance ids and state dirs, started at the same moment against an emulator that takes one
   route-table write per 0.3 s for the whole VPC and answers TaskConflict in between, with a hand-made
   and another host's route in the table beforehand (vpcnet_lab.emulator.storm). Reported: hosts, hosts that
   exited 0, seconds until the last exited, API calls per host (emulator requests / hosts), creates,
   TaskConflicts, distinct blocks, foreign entries untouched. Targets: 50 hosts each exit 0 within 60 s
   with <= 10 calls per host on average; 200 hosts within 180 s. After the largest storm the table
   holds 200 custom entries (the default quota; the foreign ones are removed first): a further host must
   stop with a clear quota error, creating nothing and touching nothing.
4. Several route tables (`--tables N --table-hosts H`, default 3 tables and 10 hosts; `--tables 1` for
   none): H hosts boot at once (as in 3.) with their route going into N tables, once with the batch call
   (CreateRouteEntries: the claim in the first table, then one call for the N-1 others) and once against
   an endpoint without it (one CreateRouteEntry per table; each host's first batch call is refused, and
   counted). Reported: route writes per host by action, calls per host, every block in every table.
5. Calls per host per hour (`--hour-hosts`, default 200; `--pending LO-HI`, default 2-5; 0 hosts: skip):
   a simulated hour on a fake clock. Each host is a real `RouteKeeper` with its background reconciler
   (`ReconcileLoop`, 30 s interval, the clock and random source injected through `Pacing`) and its own
   store, against an in-process table that counts every provider call (listings, creates, the AWS-style
   source/destination check, the reserved-CIDR lookup) and keeps each new route Pending for its delay;
   hosts do not contend for writes (that is part 3). Two cases, each "before" (the loop's old pacing:
   no jitter, a 1 s re-check while Pending, the forwarding check on every pass) and "after" (the
   defaults): steady state (routes Available at once) and a boot storm whose routes stay Pending
   uniform(LO, HI) seconds. Every host starts at t = 0 (booted together). Reported: calls per host in
   the hour by kind, and the most listings the whole VPC received in one second during the hour's last
   10 minutes (hosts in phase list together).
6. Boot storms with realistic Pending times (`--vstorm 30,50`, `--vstorm-tables 1,3`, `--rounds 3`,
   `--pending LO-HI`; `--only-vstorm` runs this part only): that many hosts run what
   `vpcnet routes sync --wait 60` runs, at once, against the real emulator whose new entries stay Pending
   uniform(LO, HI) s while the VPC refuses every other route write (TaskConflict), on a fake clock
   (vpcnet_lab.emulator.vstorm: emulated minutes in wall seconds). Round k of every case uses seed k.
   `--before REV` runs the same rounds on the code of git revision REV (exported with `git archive`,
   run in a subprocess) in the same run, for a before/after table. Reported per case: hosts that gave
   up, emulated seconds until a host's sync ended (median and max over hosts; medians over rounds with
   the range), API calls per host, the serial bound (hosts x mean Pending: one write at a time).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "lab")]     # this checkout's vpcnet and vpcnet_lab

from vpcnet.cloud import DuplicateRoute, Provider, Route  # noqa: E402
from vpcnet.config import Config  # noqa: E402
from vpcnet.routes import sync as routes_sync  # noqa: E402
from vpcnet.routes.backoff import Backoff  # noqa: E402
from vpcnet.routes.keeper import RouteKeeper  # noqa: E402
from vpcnet.routes.loop import Pacing  # noqa: E402
from vpcnet.state.store import Store  # noqa: E402
from vpcnet_lab.emulator import Emulator, serve_in_thread  # noqa: E402
from vpcnet_lab.emulator.storm import boot_storm  # noqa: E402
from vpcnet_lab.plugin_client import call  # noqa: E402

KEY_ID, SECRET = "bench-key-id", "bench-key-secret"
TABLE, VPC, REGION = "vtb-bench001", "vpc-bench001", "cn-emu-1"
ME = "i-bench-host"
CLUSTER = "10.230.0.0/16"
PENDING_DELAY = 1.0
FAULT_RATE = 0.2
TARGET_MEDIAN = 5.0
PER_CONTAINER_N = 20


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """One `vpcnet serve` process; always stopped (SIGTERM, then SIGKILL) by stop()."""

    def __init__(self, workdir: str, endpoint: str, state_dir: str, name: str):
        self.socket = os.path.join(workdir, f"{name}.sock")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VPCNET_")}
        self.env.update({
            "VPCNET_CONFIG": os.devnull, "VPCNET_SOCKET": self.socket, "VPCNET_STATE_DIR": state_dir,
            "VPCNET_CLUSTER_CIDR": CLUSTER, "VPCNET_LOG_LEVEL": "INFO", "VPCNET_RECONCILE_INTERVAL": "300",
            "VPCNET_PROVIDER": "aliyun", "VPCNET_ALIYUN_ENDPOINT": endpoint, "VPCNET_ALIYUN_REGION_ID": REGION,
            "VPCNET_ALIYUN_ROUTE_TABLE_ID": TABLE, "VPCNET_ALIYUN_VPC_ID": VPC,
            "VPCNET_ALIYUN_INSTANCE_ID": ME, "VPCNET_ALIYUN_ACCESS_KEY_ID": KEY_ID,
            "VPCNET_ALIYUN_ACCESS_KEY_SECRET": SECRET,
            "VPCNET_ALIYUN_METADATA_URL": f"http://127.0.0.1:{closed_port()}/",
        })
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen([sys.executable, "-m", "vpcnet.cli", "serve"], env=self.env, cwd=REPO,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_socket(self, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vpcnet serve exited {self.proc.returncode}: see {self.log_path}")
            try:
                if call(self.socket, "/Plugin.Activate", None)[0] == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"socket not up within {timeout}s: see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def wait_until(predicate, timeout: float, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def my_route(emu: Emulator) -> dict | None:
    for entry in emu.entries(TABLE):
        if entry["Type"] == "Custom" and entry["NextHops"]["NextHop"][0]["NextHopId"] == ME:
            return entry
    return None


def available(emu: Emulator) -> bool:
    entry = my_route(emu)
    return bool(entry and entry["Status"] == "Available")


def settle(emu: Emulator, quiet: float = 1.0, timeout: float = 15.0) -> None:
    """Wait until the emulator has seen no request for `quiet` seconds (the pass is over)."""
    deadline = time.monotonic() + timeout
    last, since = dict(emu.request_counts), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = dict(emu.request_counts)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def new_emulator(pending: float) -> tuple[Emulator, str, callable]:
    emu = Emulator(region=REGION, vpc_id=VPC, route_table_id=TABLE, credentials={KEY_ID: SECRET},
                   pending_delay=pending)
    emu.register_instance(ME, "192.168.0.10")
    url, stop = serve_in_thread(emu)
    return emu, url, stop


def measure_calls(workdir: str) -> dict:
    emu, url, stop_http = new_emulator(PENDING_DELAY)
    state = os.path.join(workdir, "calls-state")
    try:
        first = Serve(workdir, url, state, "calls-first")
        try:
            first.start()
            first.wait_socket()
            if not wait_until(lambda: available(emu), 30):
                raise RuntimeError(f"route not Available within 30 s: see {first.log_path}")
            settle(emu)
            first_counts = dict(emu.request_counts)

            # per container: a network's pool, then N containers' addresses, on the running plugin
            status, pool = call(first.socket, "/IpamDriver.RequestPool",
                                {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "", "Options": {},
                                 "V6": False})
            if status != 200:
                raise RuntimeError(f"RequestPool failed: {pool}")
            emu.reset_request_counts()
            for _ in range(PER_CONTAINER_N):
                status, addr = call(first.socket, "/IpamDriver.RequestAddress",
                                    {"PoolID": pool["PoolID"], "Address": "", "Options": {}})
                if status != 200:
                    raise RuntimeError(f"RequestAddress failed: {addr}")
                call(first.socket, "/IpamDriver.ReleaseAddress",
                     {"PoolID": pool["PoolID"], "Address": addr["Address"].split("/")[0]})
            container_counts = dict(emu.request_counts)
        finally:
            first.stop()
        route_kept = available(emu)

        emu.reset_request_counts()
        again = Serve(workdir, url, state, "calls-restart")
        try:
            again.start()
            again.wait_socket()
            if not wait_until(lambda: emu.request_counts.get("DescribeRouteEntryList", 0) >= 1, 30):
                raise RuntimeError(f"no listing after restart: see {again.log_path}")
            settle(emu)
            restart_counts = dict(emu.request_counts)
        finally:
            again.stop()
    finally:
        stop_http()
        emu.close()
    return {
        "pending_delay_s": PENDING_DELAY, "faults": 0.0,
        "first_start": first_counts, "first_start_total": sum(first_counts.values()),
        "restart": restart_counts, "restart_total": sum(restart_counts.values()),
        "per_container": {k: v / PER_CONTAINER_N for k, v in container_counts.items()},
        "per_container_total": sum(container_counts.values()) / PER_CONTAINER_N,
        "per_container_sample": PER_CONTAINER_N,
        "route_kept_after_sigterm": route_kept,
    }


def measure_time(workdir: str, runs: int) -> dict:
    samples, requests, sockets = [], [], []
    for i in range(runs):
        emu, url, stop_http = new_emulator(PENDING_DELAY)
        emu.set_faults(rate=FAULT_RATE, seed=1000 + i)
        serve = Serve(workdir, url, os.path.join(workdir, f"time-state-{i}"), f"time-{i}")
        try:
            serve.start()
            started = serve.started
            sockets.append(serve.wait_socket())
            if not wait_until(lambda emu=emu: available(emu), 60, step=0.005):
                raise RuntimeError(f"run {i}: route not Available within 60 s: see {serve.log_path}")
            samples.append(time.monotonic() - started)
            requests.append(sum(emu.request_counts.values()))
        finally:
            serve.stop()
            stop_http()
            emu.close()
        print(f"  run {i + 1:2d}/{runs}: route Available after {samples[-1]:.2f} s "
              f"({requests[-1]} API requests incl. faulted ones)", flush=True)
    median = statistics.median(samples)
    return {
        "pending_delay_s": PENDING_DELAY, "fault_rate": FAULT_RATE,
        "fault_codes": ["Throttling", "ServiceUnavailable", "InternalError"],
        "runs": len(samples), "seconds": [round(s, 3) for s in samples],
        "median_s": round(median, 3), "min_s": round(min(samples), 3), "max_s": round(max(samples), 3),
        "socket_up_median_s": round(statistics.median(sockets), 3),
        "api_requests_median": statistics.median(requests),
        "target_median_s": TARGET_MEDIAN, "target_met": median <= TARGET_MEDIAN,
    }


STORM_WRITE_INTERVAL = 0.3
STORM_CLUSTER = "10.224.0.0/16"
STORM_TARGETS = {50: (60.0, 10.0), 200: (180.0, None)}     # hosts -> (seconds per host, calls per host)
FOREIGN = "i-bench-foreign"


def measure_storm(workdir: str, hosts: int, quota_check: bool) -> dict:
    emu = Emulator(region=REGION, vpc_id=VPC, route_table_id=TABLE, credentials={KEY_ID: SECRET},
                   write_interval=STORM_WRITE_INTERVAL, quota=max(200, hosts + 2))
    emu.register_instance(FOREIGN, "172.31.0.2")
    url, stop_http = serve_in_thread(emu)
    try:
        foreign = [emu.add_custom_entry("10.224.250.0/24", FOREIGN, name="by-hand", description="ops"),
                   emu.add_custom_entry("10.224.251.0/24", FOREIGN, name="vpcnet-10-224-251-0-24",
                                        description=f"vpcnet: host CIDR 10.224.251.0/24 of {FOREIGN} "
                                                    "cluster=10.224.0.0-16")]
        before = {e["RouteEntryId"]: e for e in emu.entries(TABLE) if e["RouteEntryId"] in foreign}
        wait = 60.0 if hosts <= 50 else 175.0
        result = boot_storm(emu, url, os.path.join(workdir, f"storm-{hosts}"), hosts, cluster=STORM_CLUSTER,
                            key_id=KEY_ID, secret=SECRET, wait=wait, timeout=wait + 60)
        blocks = [b for v in result.blocks.values() for b in v]
        after = {e["RouteEntryId"]: e for e in emu.entries(TABLE)}
        limit_s, limit_calls = STORM_TARGETS.get(hosts, (180.0, None))
        out = {**result.summary(), "write_interval_s": STORM_WRITE_INTERVAL,
               "distinct_blocks": len(set(blocks)), "routes_of_storm_hosts": len(blocks),
               "foreign_untouched": all(after.get(i) == e for i, e in before.items()),
               "target_seconds": limit_s, "target_calls_per_host": limit_calls,
               "failures": {i: result.stderr.get(i, "")[-300:] for i, c in result.exits.items() if c != 0}}
        out["target_met"] = (out["converged"] == hosts and result.slowest <= limit_s
                             and out["distinct_blocks"] == hosts == len(blocks) and out["foreign_untouched"]
                             and (limit_calls is None or result.calls_per_host <= limit_calls))
        if quota_check:
            out["quota_check"] = quota_after_storm(emu, url, workdir, hosts)
            out["target_met"] = out["target_met"] and out["quota_check"]["ok"]
        return out
    finally:
        stop_http()
        emu.close()


def quota_after_storm(emu: Emulator, url: str, workdir: str, hosts: int) -> dict:
    """Fill the table to exactly 200 custom entries (the default quota), then one more host boots."""
    for entry in emu.entries(TABLE):
        if entry["Type"] == "Custom" and entry["NextHops"]["NextHop"][0]["NextHopId"] == FOREIGN:
            emu.remove_entry(entry["RouteEntryId"])
    custom = [e for e in emu.entries(TABLE) if e["Type"] == "Custom"]
    for k in range(200 - len(custom)):
        emu.add_custom_entry(f"10.225.{k}.0/24", FOREIGN, name="filler")
    emu.configure(quota=200)
    before = emu.entries(TABLE)
    extra = boot_storm(emu, url, os.path.join(workdir, "storm-quota"), 1, cluster=STORM_CLUSTER,
                       key_id=KEY_ID, secret=SECRET, wait=30, timeout=90, first=hosts + 1)
    [(instance, code)] = extra.exits.items()
    stderr = extra.stderr.get(instance, "")
    ok = (code == 1 and f"{TABLE} is full: 200/200" in stderr and "Quota Center" in stderr
          and emu.entries(TABLE) == before and extra.requests.get("CreateRouteEntry", 0) == 0)
    return {"host": instance, "exit": code, "error": stderr.strip().splitlines()[-1] if stderr.strip() else "",
            "creates": extra.requests.get("CreateRouteEntry", 0), "table_unchanged": emu.entries(TABLE) == before,
            "ok": ok}


TABLES_CLUSTER = "10.226.0.0/16"


def measure_tables(workdir: str, hosts: int, tables: int, batch: bool) -> dict:
    """A small boot storm whose hosts' routes go into `tables` route tables; `batch=False` makes the
    emulator an endpoint without CreateRouteEntries."""
    emu = Emulator(region=REGION, vpc_id=VPC, route_table_id=TABLE, credentials={KEY_ID: SECRET},
                   write_interval=STORM_WRITE_INTERVAL, quota=max(200, hosts + 2), batch_api=batch)
    ids = [TABLE] + [f"vtb-bench00{chr(ord('b') + k)}" for k in range(tables - 1)]
    for table in ids[1:]:
        emu.add_route_table(table)
    url, stop_http = serve_in_thread(emu)
    try:
        name = f"tables-{tables}-{'batch' if batch else 'single'}"
        result = boot_storm(emu, url, os.path.join(workdir, name), hosts, cluster=TABLES_CLUSTER,
                            table=",".join(ids), key_id=KEY_ID, secret=SECRET, wait=60.0, timeout=120.0)
        writes = {a: n for a, n in result.requests.items() if a.startswith("CreateRouteEntr")}
        blocks = [b for v in result.blocks.values() for b in v]
        return {"tables": tables, "batch_call": batch, **result.summary(),
                "writes_per_host": {a: round(n / hosts, 2) for a, n in sorted(writes.items())},
                "distinct_blocks": len(set(blocks)), "same_block_in_every_table": result.same_everywhere,
                "ok": len(result.converged) == hosts == len(set(blocks)) and result.same_everywhere}
    finally:
        stop_http()
        emu.close()


HOUR = 3600.0
HOUR_INTERVAL = 30.0
HOUR_CLUSTER = "10.224.0.0/16"
HOUR_TABLE = "vtb-hour001"


class SimClock:
    """One host's fake clock: moves only when its reconciler waits; `done()` at the end of the hour."""

    def __init__(self, base: float):
        self.t, self.base = 0.0, base
        self.done = lambda: None

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.base + self.t

    def wait(self, event, timeout: float) -> bool:
        if event.is_set():
            return True
        self.t += timeout
        if self.t >= HOUR:
            self.done()
        return event.is_set()


class SimTable:
    """The VPC's one route table, shared by the simulated hosts: a route is Pending for its delay,
    measured on the clock of the host asking (each host only waits on its own route)."""

    def __init__(self, pending: tuple[float, float], seed: int):
        self.routes: dict[str, tuple[Route, float]] = {}     # destination -> (route, Available from)
        self.pending, self.rand = pending, __import__("random").Random(seed)


class SimProvider(Provider):
    """An AWS-like provider (it checks forwarding) on `SimTable`, counting every call it gets."""

    name = "sim"
    checks_forwarding = True

    def __init__(self, config, table: SimTable, instance: str, clock: SimClock):
        super().__init__(config)
        self.table, self.instance, self.clock = table, instance, clock
        self.calls: dict[str, int] = {}
        self.listed: list[float] = []

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    def instance_id(self) -> str:
        return self.instance

    def table_id(self) -> str:
        return HOUR_TABLE

    def list_routes(self, table: str = "") -> list[Route]:
        self._count("list")
        self.listed.append(self.clock.t)
        now = self.clock.wall()
        return [Route(r.destination, r.next_hop, "Available" if now >= due else "Pending", name=r.name,
                      description=r.description, table=HOUR_TABLE) for r, due in self.table.routes.values()]

    def create_route(self, destination, name, description, client_token, table=""):
        self._count("create")
        if destination in self.table.routes:
            raise DuplicateRoute(destination)
        delay = self.table.rand.uniform(*self.table.pending)
        self.table.routes[destination] = (Route(destination, self.instance, name=name, description=description),
                                          self.clock.wall() + delay)

    def delete_route(self, route: Route) -> None:
        self._count("delete")
        self.table.routes.pop(route.destination, None)

    def reserved_cidrs(self) -> list[str]:
        self._count("reserved")
        return []

    def check_forwarding(self, disable: bool) -> list[str]:
        self._count("forwarding")
        return []


def simulate_hour(workdir: str, hosts: int, pending: tuple[float, float], before: bool) -> dict:
    """`hosts` reconcilers booted together, one simulated hour each; the provider calls they made."""
    import logging
    import random

    name = f"hour-{'before' if before else 'after'}-{pending[0]:g}-{pending[1]:g}"
    table = SimTable(pending, seed=7)
    saved_every = routes_sync.FORWARDING_EVERY
    routes_sync.FORWARDING_EVERY = 1 if before else saved_every
    logging.disable(logging.WARNING)
    providers: list[SimProvider] = []
    started = time.monotonic()
    try:
        base = time.time()
        for h in range(hosts):
            state = os.path.join(workdir, name, f"h{h}")
            os.makedirs(state)
            config = Config(provider="aliyun", state_dir=state, cluster_cidr=HOUR_CLUSTER, host_prefix=24,
                            reconcile_interval=HOUR_INTERVAL, socket=os.path.join(state, "none.sock"))
            clock = SimClock(base)
            pacing = (Pacing(jitter=0.0, pending_growth=1.0) if before else Pacing(rand=random.Random(h)))
            pacing.monotonic, pacing.wall, pacing.wait = clock.monotonic, clock.wall, clock.wait
            provider = SimProvider(config, table, f"i-hour-{h:04d}", clock)
            store = Store(config.db_path)
            keeper = RouteKeeper(config, store, provider_factory=lambda p=provider: p,
                                 backoff=Backoff(sleep=lambda _s: None), pacing=pacing)
            clock.done = keeper.stop
            try:
                keeper.start_background().join(300)
            finally:
                keeper.close()
                store.close()
            providers.append(provider)
    finally:
        routes_sync.FORWARDING_EVERY = saved_every
        logging.disable(logging.NOTSET)
    kinds = sorted({k for p in providers for k in p.calls})
    per_host = {k: round(sum(p.calls.get(k, 0) for p in providers) / hosts, 2) for k in kinds}
    late = [int(t) for p in providers for t in p.listed if t >= HOUR - 600]
    peak = max((late.count(sec) for sec in set(late)), default=0)
    settled = sum(1 for p in providers if any(r.next_hop == p.instance for r, _ in table.routes.values()))
    return {"hosts": hosts, "pacing": "before" if before else "after", "pending_s": list(pending),
            "calls_per_host_hour": per_host, "total_per_host_hour": round(sum(per_host.values()), 2),
            "peak_listings_per_second_last_10_min": peak, "hosts_with_a_route": settled,
            "simulated_s": HOUR, "interval_s": HOUR_INTERVAL, "wall_s": round(time.monotonic() - started, 1)}


def measure_hour(workdir: str, hosts: int, pending: tuple[float, float]) -> list[dict]:
    out = []
    for case in ((0.0, 0.0), pending):
        for before in (True, False):
            label = "steady" if case == (0.0, 0.0) else f"storm, Pending {case[0]:g}-{case[1]:g} s"
            print(f"  {hosts} hosts, {label}, {'before' if before else 'after'} ...", flush=True)
            out.append({"case": label, **simulate_hour(workdir, hosts, case, before)})
    return out


VSTORM_SCRIPT = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/lab"]
from vpcnet_lab.emulator.vstorm import virtual_storm
hosts, tables, seed = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[6])
pending = (float(sys.argv[4]), float(sys.argv[5]))
print(json.dumps(virtual_storm(hosts, tables=tables, pending=pending, seed=seed).summary()))
"""


def vstorm_round(code: str, hosts: int, tables: int, pending: tuple[float, float], seed: int) -> dict:
    """One storm round on the code in folder `code`, in a subprocess (so `before` and `after` never
    share imported modules)."""
    out = subprocess.run([sys.executable, "-c", VSTORM_SCRIPT, code, str(hosts), str(tables), str(pending[0]),
                          str(pending[1]), str(seed)], capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if out.returncode != 0:
        raise RuntimeError(f"storm round failed ({code}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_vstorms(workdir: str, sizes: list[int], tables: list[int], rounds: int, pending: tuple[float, float],
                    before: str) -> list[dict]:
    codes = [("after", REPO)]
    if before:
        old = os.path.join(workdir, "before")
        os.makedirs(old)
        archive = subprocess.run(["git", "-C", REPO, "archive", before], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        codes.insert(0, (f"before ({before})", old))
    out = []
    for hosts in sizes:
        for t in tables:
            for label, code in codes:
                runs = []
                for k in range(1, rounds + 1):     # the same seeds for before and after
                    runs.append(vstorm_round(code, hosts, t, pending, k))
                    print(f"  {hosts} hosts, {t} table(s), {label}, round {k}: {runs[-1]}", flush=True)

                def med(key: str, runs: list[dict] = runs) -> list[float]:
                    values = [r[key] for r in runs]
                    return [statistics.median(values), min(values), max(values)]
                out.append({"hosts": hosts, "tables": t, "code": label, "pending_s": list(pending), "rounds": runs,
                            "gave_up": med("gave_up"), "median_s": med("median_s"), "max_s": med("max_s"),
                            "calls_per_host": med("calls_per_host"), "serial_bound_s": runs[0]["serial_bound_s"],
                            "complete_rounds": sum(1 for r in runs if r["complete"])})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12, help="timed runs (at least 10)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "cloud_calls.json"))
    parser.add_argument("--storm", default="50,200", metavar="N,M",
                        help="boot storms to run: host counts (default 50,200; '' for none)")
    parser.add_argument("--only-storm", action="store_true", help="skip parts 1 and 2")
    parser.add_argument("--tables", type=int, default=3, help="route tables of part 4 (1: skip part 4)")
    parser.add_argument("--table-hosts", type=int, default=10, help="hosts of part 4")
    parser.add_argument("--hour-hosts", type=int, default=200, help="hosts of part 5 (0: skip part 5)")
    parser.add_argument("--pending", default="2-5", metavar="LO-HI",
                        help="part 5's boot storm: each route Pending uniform(LO, HI) seconds (default 2-5)")
    parser.add_argument("--only-hour", action="store_true", help="run part 5 only")
    parser.add_argument("--vstorm", default="30,50", metavar="N,M",
                        help="part 6: boot storms with Pending LO-HI s on a fake clock ('' for none)")
    parser.add_argument("--vstorm-tables", default="1,3", metavar="T,U", help="part 6: route tables per case")
    parser.add_argument("--rounds", type=int, default=3, help="part 6: rounds per case (seeds 1..N)")
    parser.add_argument("--before", default="", metavar="REV",
                        help="part 6: also run the rounds on git revision REV, for a before/after table")
    parser.add_argument("--only-vstorm", action="store_true", help="run part 6 only")
    args = parser.parse_args()
    lo, _, hi = args.pending.partition("-")
    pending = (float(lo), float(hi or lo))
    runs = max(10, args.runs)
    storms = [int(n) for n in args.storm.split(",") if n.strip()]
    calls = timing = None
    storm_results = []
    table_results = []
    hour_results = []
    vsizes = [int(n) for n in args.vstorm.split(",") if n.strip()]
    vtables = [int(n) for n in args.vstorm_tables.split(",") if n.strip()]
    vstorm_results: list[dict] = []
    if args.only_hour or args.only_vstorm:
        storms, args.tables, args.only_storm = [], 1, True
    if args.only_hour:
        vsizes = []
    if args.only_vstorm:
        args.hour_hosts = 0
    with tempfile.TemporaryDirectory(prefix="vpcnet-bench-") as workdir:
        if not args.only_storm:
            print("API calls per host (emulator request counts, 1 s Pending delay, no faults) ...", flush=True)
            calls = measure_calls(workdir)
            print(f"time from `vpcnet serve` to route Available ({runs} runs, 1 s Pending, "
                  f"{FAULT_RATE:.0%} faults) ...", flush=True)
            timing = measure_time(workdir, runs)
        for n in storms:
            print(f"boot storm: {n} hosts running `vpcnet routes sync` at once, one write per "
                  f"{STORM_WRITE_INTERVAL:g} s ...", flush=True)
            storm_results.append(measure_storm(workdir, n, quota_check=(n == max(storms) and n >= 200)))
        if args.tables > 1:
            for batch in (True, False):
                print(f"{args.table_hosts} hosts booting with {args.tables} route tables, "
                      f"{'with' if batch else 'without'} CreateRouteEntries ...", flush=True)
                table_results.append(measure_tables(workdir, args.table_hosts, args.tables, batch))
        if args.hour_hosts > 0:
            print(f"calls per host per hour, simulated (fake clock, {HOUR_INTERVAL:g} s interval) ...", flush=True)
            hour_results = measure_hour(workdir, args.hour_hosts, pending)
        if vsizes:
            print(f"boot storms with Pending {pending[0]:g}-{pending[1]:g} s (fake clock, {args.rounds} rounds) ...",
                  flush=True)
            vstorm_results = measure_vstorms(workdir, vsizes, vtables, max(1, args.rounds), pending, args.before)
    if args.only_storm and os.path.exists(args.out):
        with open(args.out) as fh:
            previous = json.load(fh)
        calls, timing = previous.get("api_calls_per_host"), previous.get("time_to_route_available")
        if args.only_hour or args.only_vstorm:
            storm_results, table_results = previous.get("boot_storms", []), previous.get("several_tables", [])
        if args.only_vstorm:
            hour_results = previous.get("calls_per_host_per_hour", [])
        if args.only_hour:
            vstorm_results = previous.get("storms_with_pending", [])
    result = {
        "benchmark": "cloud_calls",
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "load_avg_1m": round(os.getloadavg()[0], 2)},
        "api_calls_per_host": calls,
        "time_to_route_available": timing,
        "boot_storms": storm_results,
        "several_tables": table_results,
        "calls_per_host_per_hour": hour_results,
        "storms_with_pending": vstorm_results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")

    def fmt(counts: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items())) or "none"

    ok = True
    if calls and timing:
        rows = [
            ("first start", f"{calls['first_start_total']:g}", fmt(calls["first_start"])),
            ("restart", f"{calls['restart_total']:g}", fmt(calls["restart"])),
            ("per container", f"{calls['per_container_total']:g}",
             f"{fmt(calls['per_container'])} (over {PER_CONTAINER_N} address requests)"),
        ]
        print()
        print(f"{'API calls per host':<20} {'total':>6}  by action")
        for name, total, detail in rows:
            print(f"{name:<20} {total:>6}  {detail}")
        print(f"route kept after SIGTERM: {calls['route_kept_after_sigterm']}")
        print()
        print(f"time from `vpcnet serve` to route Available, {timing['runs']} runs, "
              f"{PENDING_DELAY:g} s Pending, {FAULT_RATE:.0%} faults:")
        print(f"  median {timing['median_s']:.2f} s (min {timing['min_s']:.2f}, max {timing['max_s']:.2f}); "
              f"target <= {TARGET_MEDIAN:g} s: {'met' if timing['target_met'] else 'NOT met'}")
        print(f"  socket up after {timing['socket_up_median_s']:.2f} s (median); "
              f"{timing['api_requests_median']:g} API requests per run (median, faulted ones included)")
        ok = ok and timing["target_met"]
    if storm_results:
        print()
        print(f"boot storms (one write per {STORM_WRITE_INTERVAL:g} s per VPC, TaskConflict in between):")
        print(f"  {'hosts':>5} {'exit 0':>6} {'seconds':>8} {'calls/host':>10} {'creates':>8} {'conflicts':>9} "
              f"{'blocks':>6}  foreign untouched  target")
        for r in storm_results:
            print(f"  {r['hosts']:>5} {r['converged']:>6} {r['seconds']:>8.1f} {r['calls_per_host']:>10.2f} "
                  f"{r['creates']:>8} {r['conflicts']:>9} {r['distinct_blocks']:>6}  "
                  f"{str(r['foreign_untouched']):<17}  {'met' if r['target_met'] else 'NOT met'}")
            if "quota_check" in r:
                q = r["quota_check"]
                print(f"  host {r['hosts'] + 1} on a full 200-entry table: exit {q['exit']}, {q['creates']} "
                      f"creates, table unchanged {q['table_unchanged']}: {q['error']}")
            ok = ok and r["target_met"]
    if table_results:
        print()
        print("several route tables (each host's route in every table; one write per "
              f"{STORM_WRITE_INTERVAL:g} s per VPC):")
        print(f"  {'tables':>6} {'batch':>5} {'hosts':>5} {'exit 0':>6} {'seconds':>8} {'calls/host':>10}  "
              "route writes per host by action")
        for r in table_results:
            writes = ", ".join(f"{a} {n:g}" for a, n in r["writes_per_host"].items())
            print(f"  {r['tables']:>6} {str(r['batch_call']):>5} {r['hosts']:>5} {r['converged']:>6} "
                  f"{r['seconds']:>8.1f} {r['calls_per_host']:>10.2f}  {writes}; same block in every table: "
                  f"{r['same_block_in_every_table']}")
            ok = ok and r["ok"]
    if hour_results:
        print()
        print(f"calls per host per hour ({hour_results[0]['hosts']} hosts booted together, simulated hour, "
              f"{HOUR_INTERVAL:g} s interval; peak = most listings the VPC got in one second, last 10 min):")
        print(f"  {'case':<24} {'pacing':<7} {'total':>7}  {'peak/s':>6}  calls by kind")
        for r in hour_results:
            print(f"  {r['case']:<24} {r['pacing']:<7} {r['total_per_host_hour']:>7g}  "
                  f"{r['peak_listings_per_second_last_10_min']:>6}  {fmt(r['calls_per_host_hour'])}")
    if vstorm_results:
        print()
        print("boot storms with Pending times (emulated seconds; median over rounds [min-max]):")
        print(f"  {'hosts':>5} {'tables':>6}  {'code':<22} {'gave up':>11} {'median s':>18} {'max s':>18} "
              f"{'calls/host':>18}  serial bound")

        def rng(v: list[float]) -> str:
            return f"{v[0]:g} [{v[1]:g}-{v[2]:g}]"
        for r in vstorm_results:
            print(f"  {r['hosts']:>5} {r['tables']:>6}  {r['code']:<22} {rng(r['gave_up']):>11} "
                  f"{rng(r['median_s']):>18} {rng(r['max_s']):>18} {rng(r['calls_per_host']):>18}  "
                  f"{r['serial_bound_s']:g} s")
    print(f"written to {os.path.relpath(args.out, REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
