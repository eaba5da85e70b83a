"""The background reconciler: one per host, whatever the number of gunicorn workers.

The worker holding an exclusive flock on `<state_dir>/reconciler.lock` runs it; if that worker dies the
lock passes to another (within `LEADER_POLL` seconds). It runs a pass every `reconcile_interval`
seconds; while this host's route is Pending the re-check pause grows from PENDING_POLL (1 s, 2 s, 4 s
... capped by MAX_PENDING_PAUSE and the interval, back to PENDING_POLL once Available or when woken), and
after failed passes a growing pause (capped by MAX_FAILURE_PAUSE and the interval). Every pause is
jittered by ±JITTER (`Pacing`), so hosts that boot together drift apart instead of listing their route
tables in the same second for ever. It is woken early when IPAM wants a block, but never spins: a pass
is followed by a pause of at least `MIN_PASS_GAP`.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from vpcnet.observability import events
from vpcnet.routes.claims import TRANSIENT
from vpcnet.routes.sync import PENDING_POLL, SyncResult
from vpcnet.state.locks import LEADER_POLL, become_leader

log = logging.getLogger(__name__)

MIN_PASS_GAP = 0.5          # background passes start at least this far apart, however often woken
MAX_FAILURE_PAUSE = 60.0    # cap of the growing pause after failed passes (also capped by the interval)
MAX_PENDING_PAUSE = 60.0    # cap of the growing pause while Pending (also capped by the interval)
PENDING_GROWTH = 2.0        # each Pending pass doubles the next re-check pause
JITTER = 0.2                # every pause is scaled by uniform(1 - JITTER, 1 + JITTER)


def _wait(event: threading.Event, timeout: float) -> bool:
    return event.wait(timeout)


@dataclass
class Pacing:
    """How the loop spaces its passes and tells time. Tests and bench/cloud_calls.py pass a seeded
    `rand` and a fake clock (`monotonic`, `wall`, `wait`), so no test waits for real; `jitter=0`,
    `pending_growth=1` give the loop's old fixed pauses (the benchmark's "before")."""

    jitter: float = JITTER
    pending_growth: float = PENDING_GROWTH
    rand: random.Random = field(default_factory=random.Random)
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    wait: Callable[[threading.Event, float], bool] = _wait     # event.wait(timeout): True when set

    def jittered(self, pause: float) -> float:
        return pause * self.rand.uniform(1.0 - self.jitter, 1.0 + self.jitter) if self.jitter else pause


class ReconcileLoop:
    """Runs `reconcile()` in a thread while this process is the host's reconciler. `creates()` is the
    count of creates so far (a pass that made one repaired something); `stop` ends it, `wake` asks for
    a pass now."""

    def __init__(self, config, store, reconcile: Callable[[], SyncResult], creates: Callable[[], int],
                 stop: threading.Event, wake: threading.Event, pacing: Pacing | None = None):
        self.config = config
        self.store = store
        self._reconcile = reconcile
        self._creates = creates
        self._stop = stop
        self._wake = wake
        self.pacing = pacing or Pacing()
        self.on_leader: Callable[[], None] = lambda: None   # told when this process becomes the reconciler

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="vpcnet-reconciler", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            lock_path = os.path.join(self.config.state_dir, "reconciler.lock")
            with open(lock_path, "a") as lock:
                if not become_leader(lock, self._stop, LEADER_POLL):     # the host's one reconciler
                    return
                log.info("reconciler running (pid %d, every %.0fs)", os.getpid(),
                         self.config.reconcile_interval)
                self.on_leader()
                self._loop()
        except Exception:   # never take the worker down; the flock passes to another worker
            log.exception("reconciler stopped by an unexpected error")

    def _loop(self) -> None:
        failures = pending = 0
        clock = self.pacing
        while not self._stop.is_set():
            started, started_wall, creates = clock.monotonic(), clock.wall(), self._creates()
            try:
                result = self._reconcile()
            except Exception as exc:
                log.exception("reconcile pass failed")
                result = SyncResult(ok=False, problems=[f"{type(exc).__name__}: {exc}"], kinds=[TRANSIENT])
            events.reconcile_pass(result.ok or result.pending_only, repaired=self._creates() > creates)
            interval = self.config.reconcile_interval
            if result.ok:
                failures = pending = 0
                pause = interval
            elif result.pending_only:
                pause = min(interval, MAX_PENDING_PAUSE,
                            PENDING_POLL * clock.pending_growth ** min(pending, 16))
                pending += 1
            else:
                log.warning("routes not in place: %s", "; ".join(result.problems),
                            extra={"event": "route_problem", "outcome": "not_in_place"})
                failures += 1
                pause = min(interval, MAX_FAILURE_PAUSE, 2.0 ** min(failures, 6))
            if self._idle(max(clock.jittered(pause), MIN_PASS_GAP), started, started_wall):
                pending = 0                 # a new want (a network create): re-check Pending promptly

    def _idle(self, pause: float, started: float, started_wall: float) -> bool:
        """Wait `pause` seconds after a pass (which began at `started`); end early, but never sooner
        than MIN_PASS_GAP after its start, when woken or when another worker wants a new cluster CIDR.
        True when ended early that way."""
        clock = self.pacing
        until = clock.monotonic() + pause
        while not self._stop.is_set():
            remaining = until - clock.monotonic()
            if remaining <= 0:
                return False
            if clock.wait(self._wake, min(1.0, remaining)) or self._new_wants(started_wall):
                self._wake.clear()
                gap = started + MIN_PASS_GAP - clock.monotonic()
                if gap > 0:
                    clock.wait(self._stop, gap)
                return True
        return False

    def _new_wants(self, since: float) -> bool:
        """A cluster CIDR asked for (by any worker) since the last pass began and not claimed yet."""
        try:
            return any(c.host_cidr is None and c.updated >= since and c.reason == "claim in progress"
                       for c in self.store.claims())
        except Exception:   # a busy or broken store must not stop the reconciler
            log.debug("cannot read the claims", exc_info=True)
            return False
