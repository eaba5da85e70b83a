"""Retries of cloud calls: bounded exponential backoff with full jitter, interruptible by a stop event.

Every cloud call of the routes room goes through `Backoff` (vpcnet.routes.tables); a create keeps one
ClientToken across its retries. `Busy` answers (another host's write in progress, or throttling) are
retried without an attempt limit; other retryable failures get `attempts` tries within `deadline`.
Every wait is bounded, so an unreachable cloud only delays the claim: the plugin keeps serving.

How long a busy VPC is waited for, and why (BUSY_DEADLINE, BUSY_LIMIT). Alibaba's VPC takes one route
write at a time: while a new entry is Pending (a few seconds: 2-5 s taken as realistic, mean 3.5 s)
every other write in the VPC is refused (TaskConflict). N hosts booting at once therefore need at least
N x 3.5 s to write their routes, one after the other: 105 s for 30 hosts, 175 s for 50, 700 s for a full
200-entry table. No fixed deadline fits every N (the old fixed one, 120 s or `routes sync --wait`'s 60
s, gave up on 33 of 50 hosts of a storm that was still progressing), and a host does not know N. So the
deadline is adaptive: a caller that can tell whether the VPC is moving (`progress`: the route tables
changed since it last looked; vpcnet.routes.sync lists the tables) keeps retrying while it is, and gives
up only after BUSY_DEADLINE seconds (60: over a dozen realistic Pending times) in which the tables did
not change at all, i.e. a VPC stuck rather than busy. BUSY_LIMIT (900 s: the serial bound of a full
200-entry table, 700 s, plus margin) bounds the whole wait however much progress is seen. A caller
without a progress probe gives up after BUSY_DEADLINE. `bench/cloud_calls.py --only-vstorm` measures
storms of 30 and 50 hosts against this bound (docs/routes.md).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

from vpcnet.errors import Busy, Retryable

log = logging.getLogger(__name__)

BUSY_DEADLINE = 60.0        # busy answers retried this long without the VPC changing (see the docstring)
BUSY_LIMIT = 900.0          # and at most this long in all, however much it changes
# Pauses while the cloud is busy: uniform(0, min(BUSY_CAP, BUSY_BASE * 2**n)) after the n-th busy answer.
# Settled with bench/cloud_calls.py's boot storms (one write per 0.3 s per VPC): a cap of 5 s gave 8.2
# calls per host for 50 hosts (32 s) and 17.7 for 200 (105 s); 10 s gives 7.7 (35 s) and 14.1 (115 s).
BUSY_BASE = 0.5
BUSY_CAP = 10.0


@dataclass
class Backoff:
    """Bounded exponential backoff with full jitter for retryable cloud answers.

    A `Busy` answer (the VPC is taking another host's write, or throttling) is not a failure: it is
    retried without counting against `attempts`, until `busy_deadline` seconds (default BUSY_DEADLINE)
    have passed without progress: with a `progress` probe given to `run`, each time that much time has
    passed it is asked whether the VPC changed meanwhile, and if so the wait goes on (up to
    `busy_limit`, default BUSY_LIMIT, in all). `monotonic` and `sleep` are the clock (a fake one in the
    storm benchmark and tests)."""

    attempts: int = 8
    base: float = 0.2
    cap: float = 5.0
    deadline: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    busy_deadline: float | None = None
    busy_base: float = BUSY_BASE
    busy_cap: float = BUSY_CAP
    busy_limit: float | None = None
    monotonic: Callable[[], float] = time.monotonic

    def run(self, what: str, fn: Callable, on_retry: Callable[[Exception], None] | None = None,
            stop: threading.Event | None = None, progress: Callable[[], bool] | None = None):
        """`fn()` until it succeeds, raises a non-retryable error, or the attempts or time run out.

        `on_retry(exc)` is told about each retryable failure; `stop`, once set, ends the waiting;
        `progress()` (True: the VPC changed since it was last asked) extends a busy wait that is still
        progressing (see the class)."""
        start = window = self.monotonic()
        busy_deadline = BUSY_DEADLINE if self.busy_deadline is None else self.busy_deadline
        busy_limit = max(busy_deadline, BUSY_LIMIT if self.busy_limit is None else self.busy_limit)
        failures = busy = 0
        while True:
            try:
                return fn()
            except Busy as exc:
                last: Exception = exc
                busy += 1
                now = self.monotonic()
                elapsed = now - start
                if now - window >= busy_deadline and elapsed < busy_limit and progress is not None \
                        and self._moved(progress):
                    window = now               # the VPC is busy, not stuck: another window
                if now - window >= busy_deadline or elapsed >= busy_limit:
                    why = (f", the last {now - window:.0f} s without any change in the route tables"
                           if progress is not None and elapsed < busy_limit else "")
                    raise Retryable(f"{what}: the cloud stayed busy for {elapsed:.0f} s{why} ({busy} answers; "
                                    f"last: {exc})") from None
                delay = random.uniform(0, min(self.busy_cap, self.busy_base * 2 ** min(busy, 16)))
                delay = min(delay, max(0.0, min(window + busy_deadline, start + busy_limit) - now))
                attempt = failures + busy
            except Retryable as exc:
                last = exc
                failures += 1
                elapsed = self.monotonic() - start
                if failures >= self.attempts or elapsed >= self.deadline:
                    raise Retryable(f"{what}: still failing after {failures + busy} attempts: {exc}") from None
                delay = random.uniform(0, min(self.cap, self.base * 2 ** failures))
                delay = min(delay, max(0.0, self.deadline - elapsed))
                attempt = failures + busy
            if stop is not None and stop.is_set():
                raise Retryable(f"{what}: stopped while retrying: {last}") from None
            log.info("%s: retryable (%s), attempt %d, retrying in %.2fs", what, last, attempt, delay)
            if on_retry is not None:
                on_retry(last)
            if stop is not None and self.sleep is time.sleep:
                if stop.wait(delay):
                    raise Retryable(f"{what}: stopped while retrying: {last}") from None
            else:
                self.sleep(delay)

    @staticmethod
    def _moved(progress: Callable[[], bool]) -> bool:
        """Ask the progress probe; a probe that fails says nothing moved."""
        try:
            return bool(progress())
        except Exception as exc:  # a listing failing here must not turn a busy wait into a crash
            log.info("cannot tell whether the route tables changed (%s): counting it as no change", exc)
            return False

