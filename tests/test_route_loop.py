"""The background reconciler's pacing, on a fake clock against the real emulator over HTTP on 127.0.0.1:
a Pending route is re-checked at growing pauses, every pause is jittered (hosts booting together drift
apart), and the source/destination check runs on every FORWARDING_EVERY-th pass only. No test waits
for real: the loop's clock, waits and random source are injected (`Pacing`)."""
from __future__ import annotations

import random
import threading
import time
import types
from itertools import pairwise

import pytest
from aliyun_fakes import serving_emulator
from test_routes import CLUSTER, FAST, KEY_ID, ME, OTHER, REGION, SECRET, TABLE, VPC, make_config

from vpcnet.cloud.aliyun.provider import AliyunProvider
from vpcnet.routes import loop, sync
from vpcnet.routes.backoff import Backoff
from vpcnet.routes.keeper import RouteKeeper
from vpcnet.routes.loop import Pacing
from vpcnet.state.store import Store
from vpcnet_lab.emulator import tables as emulator_tables


class FakeClock:
    """Time that moves only when the loop waits; `done()` is called once `horizon` seconds have
    passed, `hook(clock)` before every wait."""

    def __init__(self, horizon: float):
        self.t, self.base, self.horizon = 0.0, time.time(), horizon
        self.done = lambda: None
        self.hook = lambda clock: None

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.base + self.t

    def wait(self, event: threading.Event, timeout: float) -> bool:
        self.hook(self)
        if event.is_set():
            return True
        self.t += timeout
        if self.t >= self.horizon:
            self.done()
        return event.is_set()


class Timed(AliyunProvider):
    """Notes the fake time of every listing and counts the forwarding checks (as AWS's provider would
    make them: `checks_forwarding`); `problems` are what the next checks report."""

    checks_forwarding = True

    def __init__(self, config, clock: FakeClock | None):
        super().__init__(config)
        self.clock, self.listed, self.forwarding, self.problems = clock, [], 0, []

    def list_routes(self, table=""):
        self.listed.append(self.clock.t if self.clock else 0.0)
        return super().list_routes(table)

    def check_forwarding(self, disable):
        self.forwarding += 1
        return self.problems.pop(0) if self.problems else []


@pytest.fixture
def emu():
    with serving_emulator({ME: "192.168.0.10", OTHER: "192.168.0.11"}, region=REGION, vpc_id=VPC,
                          route_table_id=TABLE, credentials={KEY_ID: SECRET}, seed=11) as e:
        yield e


@pytest.fixture
def host(emu, tmp_path):
    """host(instance, seed, horizon) -> (keeper, store, provider, clock), the loop on a fake clock."""
    made = []

    def make(instance=ME, seed=1, horizon=600.0, **kw):
        cfg = make_config(emu, tmp_path / f"{instance}-{len(made)}", instance, **kw)
        store = Store(cfg.db_path)
        clock = FakeClock(horizon)
        made_provider: list[Timed] = []
        pacing = Pacing(rand=random.Random(seed), monotonic=clock.monotonic, wall=clock.wall, wait=clock.wait)
        keeper = RouteKeeper(cfg, store, provider_factory=lambda: made_provider.append(Timed(cfg, clock))
                             or made_provider[0], backoff=Backoff(**FAST), pacing=pacing)
        clock.done = keeper.stop
        made.append((keeper, store))
        return keeper, store, lambda: made_provider[0], clock

    yield make
    for keeper, store in made:
        keeper.close()
        store.close()


def run_loop(keeper) -> None:
    """The background reconciler until its fake clock reaches the horizon (seconds of real time)."""
    thread = keeper.start_background()
    thread.join(60)
    assert not thread.is_alive()


EVERY = 10          # the source/destination check: once per this many passes (sync.FORWARDING_EVERY)
PENDING_FIRST_PAUSE_MAX = sync.PENDING_POLL * (1 + loop.JITTER) + 1e-9


def test_a_route_pending_for_60_s_is_relisted_at_growing_pauses(emu, host, monkeypatch):
    keeper, store, provider, clock = host(horizon=120.0, reconcile_interval=30.0)
    monkeypatch.setattr(emulator_tables, "time", types.SimpleNamespace(time=clock.wall))   # the VPC's clock too
    emu.configure(pending_delay=60.0)
    run_loop(keeper)
    claim = store.claim(CLUSTER)
    assert claim.host_cidr and claim.route_ok
    listed = provider().listed
    available_at = next(t for t in listed if t >= 60.0)          # the first listing after the 60 s
    until_available = [t for t in listed if t <= available_at]
    # 1 s, 2 s, 4 s ... (jittered, capped by the interval) instead of one listing a second: 60+
    assert len(until_available) <= 10, until_available
    gaps = [b - a for a, b in pairwise(until_available[1:])]   # [0], [1]: list, create, list
    assert all(later > earlier for earlier, later in pairwise(gaps[:-1])), gaps
    assert available_at < 60.0 + 30.0 * (1 + loop.JITTER)                    # seen within one interval
    assert keeper.calls["create"] == 1


def test_a_new_want_resets_the_pending_pause(emu, host, monkeypatch):
    keeper, store, provider, clock = host(horizon=40.0, reconcile_interval=30.0)
    monkeypatch.setattr(emulator_tables, "time", types.SimpleNamespace(time=clock.wall))
    emu.configure(pending_delay=1000.0)
    woke = []

    def network_create(clock):           # IPAM wakes the loop (a network create) at t = 20 s
        if clock.t >= 20.0 and not woke:
            woke.append(clock.t)
            keeper._wake.set()

    clock.hook = network_create
    run_loop(keeper)
    after = [t for t in provider().listed if t >= woke[0]]
    assert len(after) >= 2, after
    assert after[0] - woke[0] <= 1.0                     # the wake's own pass
    assert after[1] - after[0] <= PENDING_FIRST_PAUSE_MAX, after    # then 1 s again, not 16 or 30


def test_every_pause_is_jittered_and_hosts_started_together_drift_apart(emu, host):
    interval = 30.0
    runs = {}
    for seed in (1, 2, 1):
        keeper, store, provider, clock = host(instance=ME, seed=seed, horizon=1200.0, reconcile_interval=interval)
        run_loop(keeper)
        runs.setdefault(seed, []).append(provider().listed)
        keeper.release()
    a, b = runs[1][0], runs[2][0]
    assert runs[1][0] == runs[1][1]                                      # seeded: deterministic
    steady = [y - x for x, y in pairwise(a[2:])]
    assert len(steady) >= 25
    assert all(interval * (1 - loop.JITTER) - 1e-9 <= g <= interval * (1 + loop.JITTER) + 1e-9 for g in steady)
    assert max(steady) - min(steady) > interval * loop.JITTER          # not all the same pause
    # the same start, different seeds: out of phase after a few passes, and they stay apart
    offsets = [abs(x - y) for x, y in zip(a[10:], b[10:], strict=False)]
    assert offsets and min(offsets[-5:]) > 1.0, offsets


def test_the_forwarding_check_runs_once_per_forwarding_every_passes(emu, host):
    assert sync.FORWARDING_EVERY == EVERY
    keeper, store, provider, clock = host()
    for _ in range(3 * EVERY):
        assert keeper.reconcile().ok
    assert provider().forwarding == 3                     # passes 1, 11 and 21 of 30

    # a problem found is re-checked every pass until it is gone, then every FORWARDING_EVERY-th again
    keeper2, _, provider2, _ = host(instance=OTHER)
    keeper2.reconcile()
    provider2().problems = [["source/destination check is enabled"]] * 2
    passes = [keeper2.reconcile() for _ in range(2 * EVERY)]      # passes 2 .. 21
    failed = [n for n, r in enumerate(passes, start=2) if not r.ok]
    assert failed == [1 + EVERY, 2 + EVERY]
    assert all("source/destination" in passes[n - 2].problems[0] for n in failed)
    # checks on pass 1 (clean), 11 and 12 (the problem), 13 (clean); the next would be pass 23
    assert provider2().forwarding == 4


def test_the_background_loop_checks_forwarding_at_most_once_per_ten_passes(emu, host):
    keeper, store, provider, clock = host(horizon=3000.0, reconcile_interval=30.0)
    run_loop(keeper)
    passes = len(provider().listed) - 1                  # the first pass lists twice (before, after the create)
    assert passes >= 80
    assert provider().forwarding <= passes // EVERY + 1
