"""Retries of cloud calls: bounded exponential backoff with full jitter, interruptible by a stop event.

Every cloud call of the routes room goes through `Backoff` (vpcnet.routes.tables); a create keeps one
ClientToken across its retries. `Busy` answers (another host's write in progress — Alibaba's VPC takes
one route-table write at a time — or throttling) are retried without an attempt limit until
BUSY_DEADLINE (120 s; a 200-host boot storm against a VPC that takes one write per 0.3 s converges well
within it, see bench/cloud_calls.py); other retryable failures get `attempts` tries within `deadline`.
Every wait is bounded, so an unreachable cloud only delays the claim: the plugin keeps serving.
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

BUSY_DEADLINE = 120.0       # how long "busy" answers (TaskConflict, throttling) are retried: a boot storm
# Pauses while the cloud is busy: uniform(0, min(BUSY_CAP, BUSY_BASE * 2**n)) after the n-th busy answer.
# Settled with bench/cloud_calls.py's boot storms (one write per 0.3 s per VPC): a cap of 5 s gave 8.2
# calls per host for 50 hosts (32 s) and 17.7 for 200 (105 s); 10 s gives 7.7 (35 s) and 14.1 (115 s).
BUSY_BASE = 0.5
BUSY_CAP = 10.0


@dataclass
class Backoff:
    """Bounded exponential backoff with full jitter for retryable cloud answers.

    A `Busy` answer (the VPC is taking another host's write, or throttling) is not a failure: it is
    retried without counting against `attempts`, until `busy_deadline` seconds have passed (default
    BUSY_DEADLINE, long enough to cover a boot storm; see bench/cloud_calls.py)."""

    attempts: int = 8
    base: float = 0.2
    cap: float = 5.0
    deadline: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    busy_deadline: float | None = None
    busy_base: float = BUSY_BASE
    busy_cap: float = BUSY_CAP
    monotonic: Callable[[], float] = time.monotonic     # the clock (a fake one in the storm benchmark and tests)

    def run(self, what: str, fn: Callable, on_retry: Callable[[Exception], None] | None = None,
            stop: threading.Event | None = None):
        """`fn()` until it succeeds, raises a non-retryable error, or the attempts or time run out.

        `on_retry(exc)` is told about each retryable failure; `stop`, once set, ends the waiting."""
        start = self.monotonic()
        busy_deadline = BUSY_DEADLINE if self.busy_deadline is None else self.busy_deadline
        failures = busy = 0
        while True:
            try:
                return fn()
            except Busy as exc:
                last: Exception = exc
                busy += 1
                elapsed = self.monotonic() - start
                if elapsed >= busy_deadline:
                    raise Retryable(f"{what}: the cloud stayed busy for {elapsed:.0f} s ({busy} answers; last: "
                                    f"{exc})") from None
                delay = random.uniform(0, min(self.busy_cap, self.busy_base * 2 ** min(busy, 16)))
                delay = min(delay, max(0.0, busy_deadline - elapsed))
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

