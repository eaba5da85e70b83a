"""Per-object locks shared by every thread and gunicorn worker of one host's plugin.

Docker may send two calls about one network at once (a retried CreateNetwork, a CreateEndpoint racing a
DeleteNetwork), and the periodic datapath pass touches the same kernel objects. A `flock` on a file in the
state dir serialises them across threads and processes alike (each `open` is its own open file
description, so two threads of one process exclude each other too). Objects map onto a fixed number of
lock files (stripes), so the state dir never fills up with them; two objects sharing a stripe only wait
for each other.

`become_leader` is the other kind: one holder per host for as long as it runs (the route reconciler, the
datapath pass), the other workers waiting their turn in case it dies.

`exclusive_within` is a third: one host-wide change at a time (this host's routes, its prefixes), but a
waiter gives up after a bounded wait with a Retryable naming the lock file, rather than queueing behind a
pass stuck on a cloud for ever.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
import zlib
from contextlib import contextmanager
from typing import IO, Callable, ContextManager, Iterator

from vpcnet.errors import Retryable

STRIPES = 64


def object_lock(state_dir: str, key: str) -> ContextManager[None]:
    folder = os.path.join(state_dir, "locks")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"{zlib.crc32(key.encode()) % STRIPES:02d}.lock")
    return _locked(path)


def host_lock(state_dir: str, name: str) -> ContextManager[None]:
    """A lock of its own (no stripe) for one host-wide thing, held while object locks may be held too:
    sharing a stripe with one of those would wait for itself."""
    folder = os.path.join(state_dir, "locks")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return _locked(os.path.join(folder, f"{name}.lock"))


@contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: A worker waiting to become a leader retries the flock this often (seconds).
LEADER_POLL = 5.0


def become_leader(lock: IO, stop: threading.Event, poll: float = LEADER_POLL) -> bool:
    """Hold `lock` (an open file) exclusively: True once held, False when `stop` is set first. The kernel
    drops the flock when the holder's process dies, and a waiting worker takes over within `poll`."""
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if stop.wait(poll):
                return False


#: A waiter for `exclusive_within` retries the flock this often (seconds).
EXCLUSIVE_POLL = 0.05


@contextmanager
def exclusive_within(path: str, wait: float, doing: str, *, stop: threading.Event | None = None,
                     clock: Callable[[], float] = time.monotonic, started: float | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created, with its folder) for the block, waiting at most `wait`
    seconds from `started` (on `clock`; default: now) for another holder (a process, or a thread: each open
    is its own open file description). Past that: Retryable "another vpcnet process on this host has been
    `doing` for over `wait` s (lock `path`)"; `stop` set while waiting: Retryable too. The retries are
    bounded in count as well as by the clock (an injected clock may stand still)."""
    deadline = (clock() if started is None else started) + wait
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    with open(path, "a") as fh:
        held = False
        for _ in range(int(wait / EXCLUSIVE_POLL) + 2):
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if clock() >= deadline:
                    break
                if stop is None:
                    time.sleep(EXCLUSIVE_POLL)
                elif stop.wait(EXCLUSIVE_POLL):
                    raise Retryable(f"stopping (waiting for lock {path})") from None
        if not held:
            raise Retryable(f"another vpcnet process on this host has been {doing} for over {wait:.0f} s "
                            f"(lock {path})")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
