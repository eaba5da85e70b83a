"""What the emulated API does to a request before its action runs: counts it, delays it, maybe fails it.

Faults are drawn from a seeded generator, so a run with the same seed and the same requests fails the
same ones; an injected fault never changes state. The per-action counts are how tests and benchmarks
measure the calls a plugin makes.
"""
from __future__ import annotations

import random
import threading

from vpcnet_lab.emulator.errors import ApiError

#: Fault codes the emulator can inject, with their HTTP status.
FAULT_STATUS = {
    "Throttling": 400,
    "Throttling.User": 400,
    "Throttling.Api": 400,
    "ServiceUnavailable": 503,
    "InternalError": 500,
    "UnknownError": 500,
    "TaskConflict": 400,
    "OperationConflict": 400,
}
DEFAULT_FAULT_CODES = ("Throttling", "ServiceUnavailable", "InternalError")

_MESSAGES = {
    "ServiceUnavailable": "The request has failed due to a temporary failure of the server.",
    "InternalError": "The request processing has failed due to some unknown error.",
    "UnknownError": "The request processing has failed due to some unknown error.",
    "TaskConflict": "The operation conflicts with another task in progress (injected fault).",
    "OperationConflict": "The operation conflicts with another operation (injected fault).",
}
_THROTTLED = "Request was denied due to request throttling."


class Faults:
    """Fault rate, codes and added latency, and the request counts; guarded by `lock`, shared with the
    rest of the emulator."""

    def __init__(self, lock: threading.RLock, seed: int | None = None):
        self._lock = lock
        self._rng = random.Random(seed)
        self._rate = 0.0
        self._codes: tuple[str, ...] = DEFAULT_FAULT_CODES
        self._latency = 0.0
        self._counts: dict[str, int] = {}

    def set(self, rate: float = 0.0, codes=DEFAULT_FAULT_CODES, latency: float = 0.0,
            seed: int | None = None) -> dict:
        """With probability `rate` a signed action answers one of `codes` without changing state;
        `latency` seconds are added to every signed request. `seed` re-seeds the fault generator."""
        rate = float(rate)
        latency = float(latency)
        if isinstance(codes, str):
            codes = [c for c in codes.split(",") if c.strip()]
        codes = tuple(c.strip() for c in codes)
        if not 0.0 <= rate <= 1.0:
            raise ValueError("fault rate must be between 0 and 1")
        if not 0.0 <= latency <= 60.0:
            raise ValueError("latency must be between 0 and 60 seconds")
        unknown = [c for c in codes if c not in FAULT_STATUS]
        if unknown:
            raise ValueError(f"unknown fault code(s) {', '.join(unknown)}; known: {', '.join(FAULT_STATUS)}")
        if rate > 0 and not codes:
            raise ValueError("a fault rate above 0 needs at least one fault code")
        with self._lock:
            self._rate = rate
            self._codes = codes
            self._latency = latency
            if seed is not None:
                self._rng.seed(seed)
            return self.settings()

    def settings(self) -> dict:
        with self._lock:
            return {"rate": self._rate, "codes": list(self._codes), "latency": self._latency}

    @property
    def latency(self) -> float:
        return self._latency

    def draw(self) -> ApiError | None:
        """Decide whether this request fails with an injected fault (seeded, deterministic)."""
        with self._lock:
            if self._rate <= 0.0 or not self._codes:
                return None
            if self._rng.random() >= self._rate:
                return None
            code = self._rng.choice(self._codes)
        return ApiError(code, _MESSAGES.get(code, _THROTTLED), FAULT_STATUS[code])

    # ------------------------------------------------------------------ request counts

    def count(self, action: str) -> None:
        with self._lock:
            self._counts[action] = self._counts.get(action, 0) + 1

    def counts(self) -> dict[str, int]:
        """Requests received per Action (every request naming an action, faulted or refused included)."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
