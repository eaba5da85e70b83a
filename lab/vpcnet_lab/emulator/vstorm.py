"""A boot storm on a fake clock: N hosts run what `vpcnet routes sync` runs, against the real emulator, in
seconds of wall time however long the storm takes in emulated time.

    result = virtual_storm(hosts=50, tables=3, pending=(2.0, 5.0), seed=1)

Why a fake clock: with realistic Pending times (2-5 s per new route, and no other route write accepted
in the VPC meanwhile) a 50-host storm takes minutes in real time; the figures need several rounds, and
CI needs the storm in seconds. What stays real: the emulator (its API, as the signed requests reach it,
signatures, the VPC write lock answering TaskConflict while any entry is Pending, the per-entry Pending
delays drawn from a seeded generator), the Alibaba provider, and vpcnet's whole pass
(`RouteKeeper.reconcile` with the `Backoff` that `routes sync --wait` builds,
vpcnet.routes.cli.sync_deadlines). What is simulated: time, and the sockets: the provider's HTTP
requests are handed to the emulator's WSGI app in-process (`InProcess`, a requests adapter), since a
real socket server would stall a fake clock on the real timeouts of its connection handling (werkzeug
closes every connection, and a client reusing one waits out its read timeout). Each host is a thread;
`VirtualClock` lets exactly one host thread run at a time, and moves time forward only when every host
is waiting (a backoff pause, a Pending re-check), to the earliest wake-up. An API call takes API_LATENCY
(50 ms) of emulated time, as a real one takes tens of milliseconds. The seeds fix the Pending delays,
the hosts' jitter draws the global `random` (seeded too): a round is repeatable up to thread scheduling.

Used by bench/cloud_calls.py (`--only-vstorm`, the figures in docs/routes.md) and
tests/test_storm_pending.py.
"""
from __future__ import annotations

import heapq
import ipaddress
import logging
import os
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

import requests
from requests.adapters import BaseAdapter

from vpcnet import config as config_mod
from vpcnet.cloud import make_provider
from vpcnet.routes.backoff import Backoff
from vpcnet.routes.cli import sync_deadlines
from vpcnet.routes.keeper import RouteKeeper
from vpcnet.routes.loop import Pacing
from vpcnet.state.store import Store
from vpcnet_lab.emulator.api import create_app
from vpcnet_lab.emulator.state import Emulator
from vpcnet_lab.emulator.storm import host_env

KEY_ID, SECRET = "vstorm-key-id", "vstorm-key-secret"
REGION, VPC = "cn-emu-1", "vpc-vstorm01"
TABLES = ("vtb-vstorm0a", "vtb-vstorm0b", "vtb-vstorm0c", "vtb-vstorm0d", "vtb-vstorm0e")
URL = "http://vstorm.invalid/"   # never resolved: `InProcess` answers every request to it
EPOCH = 1_800_000_000.0          # the emulated wall clock at t = 0
MAX_EMULATED = 3600.0            # no storm may run longer than this in emulated time
API_LATENCY = 0.05               # emulated seconds one API call takes
MIN_SLEEP = 0.001                # a pause of less (a backoff cut to its deadline) still moves time


class VirtualClock:
    """Emulated time shared by host threads: one runs at a time; time jumps to the earliest wake-up when
    all are waiting. `enter()` before a host thread starts, `leave()` when it ends."""

    def __init__(self) -> None:
        self.t = 0.0
        self._cond = threading.Condition()
        self._running = 0
        self._sleepers: list[tuple[float, int]] = []
        self._seq = 0
        self._released: set[int] = set()
        self._turn = threading.Lock()        # held by the one host thread that runs
        self.overrun = False

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> float:
        return EPOCH + self.t

    def enter(self) -> None:
        with self._cond:
            self._running += 1

    def start_turn(self) -> None:
        self._turn.acquire()

    def leave(self) -> None:
        self._turn.release()
        with self._cond:
            self._running -= 1
            self._advance()

    def sleep(self, seconds: float) -> None:
        self._turn.release()
        with self._cond:
            self._seq += 1
            me = self._seq
            heapq.heappush(self._sleepers, (self.t + max(MIN_SLEEP, seconds), me))
            self._running -= 1
            self._advance()
            while me not in self._released:
                self._cond.wait()
            self._released.discard(me)
        self._turn.acquire()

    def spend(self, seconds: float) -> None:
        """The running host spends this long (an API call): nobody else runs meanwhile anyway."""
        with self._cond:
            self.t += seconds

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """`Pacing.wait`: event.wait(timeout) in emulated time."""
        if event.is_set():
            return True
        self.sleep(timeout)
        return event.is_set()

    def _advance(self) -> None:
        """With the condition held: if no host runs, wake the earliest sleeper."""
        if self._running == 0 and self._sleepers:
            wake, who = heapq.heappop(self._sleepers)
            self.t = max(self.t, wake)
            if self.t > MAX_EMULATED:
                self.overrun = True
            self._released.add(who)
            self._running += 1
            self._cond.notify_all()


class InProcess(BaseAdapter):
    """A requests adapter answering from the emulator's WSGI app, without a socket."""

    def __init__(self, app, clock: VirtualClock) -> None:
        super().__init__()
        self._client = app.test_client()
        self._clock = clock

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        self._clock.spend(API_LATENCY)
        path = request.path_url
        answer = self._client.open(path, method=request.method, data=request.body,
                                   headers={k: v for k, v in request.headers.items()
                                            if k.lower() != "content-length"})
        resp = requests.Response()
        resp.status_code = answer.status_code
        resp._content = answer.get_data()
        resp.headers.update(dict(answer.headers))
        resp.url, resp.request, resp.encoding = request.url, request, "utf-8"
        return resp

    def close(self) -> None:
        pass


@dataclass
class VirtualStorm:
    hosts: int
    tables: int
    pending: tuple[float, float]
    ok: dict[str, bool] = field(default_factory=dict)            # instance -> its `routes sync` succeeded
    elapsed: dict[str, float] = field(default_factory=dict)      # instance -> emulated s until it ended
    problems: dict[str, list[str]] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    conflicts: int = 0
    blocks: dict[str, dict[str, list[str]]] = field(default_factory=dict)    # table -> instance -> blocks
    families: int = 1                      # 2: every host also claims an IPv6 block (a dual-stack network)
    unclaimed: list[str] = field(default_factory=list)   # routes to a host without that block in table 1
    wall_s: float = 0.0

    @property
    def gave_up(self) -> int:
        return sum(1 for ok in self.ok.values() if not ok)

    @property
    def calls_per_host(self) -> float:
        return sum(self.requests.values()) / max(1, self.hosts)

    @property
    def duplicates(self) -> int:
        """Hosts with more than one block of a family in a table, or blocks held by more than one host."""
        bad = 0
        for per_host in self.blocks.values():
            held = [b for bs in per_host.values() for b in bs]
            bad += sum(1 for bs in per_host.values() for v6 in (False, True)
                       if len([b for b in bs if (":" in b) == v6]) > 1) + len(held) - len(set(held))
        return bad

    @property
    def complete(self) -> bool:
        """Every host has one block (of each family), the same in every table."""
        first = self.blocks.get(TABLES[0], {})
        return (len(first) == self.hosts and all(len(b) == self.families == len({":" in x for x in b})
                                                 for b in first.values())
                and all(self.blocks.get(t) == first for t in TABLES[:self.tables]))

    def summary(self) -> dict:
        times = sorted(self.elapsed.values())
        return {"hosts": self.hosts, "tables": self.tables, "pending_s": list(self.pending),
                "gave_up": self.gave_up, "median_s": round(statistics.median(times), 1) if times else None,
                "max_s": round(max(times), 1) if times else None,
                "serial_bound_s": round(serial_bound(self.hosts * self.families, self.pending), 1),
                "calls_per_host": round(self.calls_per_host, 2),
                "writes_per_host": round(sum(n for a, n in self.requests.items()
                                             if a.startswith("CreateRouteEntr")) / max(1, self.hosts), 2),
                "conflicts": self.conflicts, "duplicates": self.duplicates, "unclaimed": len(self.unclaimed),
                "complete": self.complete, "wall_s": round(self.wall_s, 1)}


def serial_bound(hosts: int, pending: tuple[float, float]) -> float:
    """The least emulated time N route writes can take in one VPC: one at a time, each holding the VPC
    for a mean Pending time (a claim per host; further tables can share one batch write)."""
    return hosts * (pending[0] + pending[1]) / 2


def virtual_storm(hosts: int, tables: int = 1, pending: tuple[float, float] = (2.0, 5.0), seed: int = 1,
                  wait: float = 60.0, cluster: str = "10.232.0.0/16", workdir: str | None = None,
                  cluster_v6: str = "") -> VirtualStorm:
    """`hosts` hosts boot at once and each runs `routes sync --wait <wait>` into `tables` route tables
    (the first is the claiming table) of one VPC whose new entries stay Pending uniform(*pending) s.
    `cluster_v6`: every host also has a dual-stack network wanting its IPv6 block of that cluster CIDR."""
    if not 1 <= tables <= len(TABLES):
        raise ValueError(f"tables must be 1..{len(TABLES)}")
    clock = VirtualClock()
    emu = Emulator(region=REGION, vpc_id=VPC, route_table_id=TABLES[0], credentials={KEY_ID: SECRET},
                   pending_delay=pending[0], pending_delay_max=pending[1], seed=seed, clock=clock.wall,
                   quota=max(200, hosts + 2))
    ids = list(TABLES[:tables])
    for table in ids[1:]:
        emu.add_route_table(table)
    instances = [f"i-vstorm-{k:04d}" for k in range(1, hosts + 1)]
    for k, instance in enumerate(instances, start=1):
        emu.register_instance(instance, str(ipaddress.IPv4Address("172.16.0.0") + k),
                              str(ipaddress.IPv6Address("fd00:172:16::") + k) if cluster_v6 else "")
    app = create_app(emu)
    result = VirtualStorm(hosts=hosts, tables=tables, pending=pending, families=2 if cluster_v6 else 1)
    saved_state = random.getstate()
    random.seed(seed)                              # the backoff's jitter
    logging.disable(logging.WARNING)
    started = time.monotonic()
    own_dir = tempfile.TemporaryDirectory(prefix="vpcnet-vstorm-") if workdir is None else None
    base: str = own_dir.name if own_dir is not None else str(workdir)
    try:
        def host(instance: str) -> None:
            clock.start_turn()
            try:
                state = os.path.join(base, instance)
                env = host_env(URL, state, instance, cluster=cluster, table=",".join(ids), region=REGION,
                               vpc=VPC, key_id=KEY_ID, secret=SECRET)
                if cluster_v6:
                    env["VPCNET_CLUSTER_CIDR_V6"] = cluster_v6
                config = config_mod.load(os.devnull, environ=env, check_socket_dir=False)
                store = Store(config.db_path)
                if cluster_v6:                 # as RequestPool with V6 leaves it: wanted, not claimed yet
                    store.want_claim(cluster_v6, "a dual-stack network")
                pacing = Pacing(monotonic=clock.monotonic, wall=clock.wall, wait=clock.wait)
                bounds = sync_deadlines(wait)
                backoff = Backoff(deadline=bounds["deadline"], busy_deadline=bounds["busy_deadline"],
                                  sleep=clock.sleep, monotonic=clock.monotonic)

                def provider(config=config):
                    made = make_provider(config)
                    made._session.mount(URL, InProcess(app, clock))  # type: ignore[attr-defined]
                    return made

                keeper = RouteKeeper(config, store, provider_factory=provider, backoff=backoff, pacing=pacing)
                try:
                    outcome = keeper.reconcile(wait_pending=wait)
                    result.ok[instance] = outcome.ok
                    result.problems[instance] = outcome.problems
                except Exception as exc:                 # reported, never hangs the clock
                    result.ok[instance] = False
                    result.problems[instance] = [f"{type(exc).__name__}: {exc}"]
                finally:
                    keeper.close()
                    store.close()
                result.elapsed[instance] = clock.t
            finally:
                clock.leave()

        threads = []
        for instance in instances:
            clock.enter()
            threads.append(threading.Thread(target=host, args=(instance,), name=f"vstorm-{instance}", daemon=True))
        emu.reset_request_counts()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        if any(t.is_alive() for t in threads):
            raise RuntimeError("virtual storm: host threads still running after 600 s of wall time")
    finally:
        logging.disable(logging.NOTSET)
        random.setstate(saved_state)
        result.wall_s = time.monotonic() - started
        result.requests = emu.request_counts
        result.conflicts = emu.conflicts
        for table in ids:
            per_host: dict[str, list[str]] = {}
            for entry in emu.entries(table):
                hop = entry["NextHops"]["NextHop"][0]["NextHopId"]
                if entry["Type"] == "Custom" and hop in instances:
                    per_host.setdefault(hop, []).append(entry["DestinationCidrBlock"])
            result.blocks[table] = per_host
        claimed = {(h, b) for h, bs in result.blocks.get(ids[0], {}).items() for b in bs}
        result.unclaimed = [f"{b} -> {h} in {t}" for t in ids[1:] for h, bs in result.blocks[t].items()
                            for b in bs if (h, b) not in claimed]
        emu.close()
        if own_dir is not None:
            own_dir.cleanup()
    if clock.overrun:
        raise RuntimeError(f"virtual storm ran past {MAX_EMULATED:g} s of emulated time")
    return result
