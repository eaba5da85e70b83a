"""vpcnet.state.locks.exclusive_within: one host-wide change at a time, a bounded wait, an error naming the
lock file; and the two users (the route keeper's routes.lock, the prefix pool's prefixes.lock) giving up
on a held lock that way. Real flocks on real files: another open file description (another thread's open,
another process) is another holder."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest

from vpcnet.cloud.local import LocalPrefixes
from vpcnet.config import Config
from vpcnet.errors import Retryable
from vpcnet.routes import keeper as keeper_module
from vpcnet.routes import prefixes as prefixes_module
from vpcnet.routes.keeper import RouteKeeper
from vpcnet.routes.prefixes import PrefixPool
from vpcnet.state import locks
from vpcnet.state.locks import exclusive_within
from vpcnet.state.store import Store


def held_elsewhere(path: str):
    """An open file description of `path` holding its flock (close it to release)."""
    fh = open(path, "a")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fh


def free(path: str) -> bool:
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def test_holds_the_lock_for_the_block_and_creates_its_folder(tmp_path):
    path = str(tmp_path / "state" / "x.lock")
    with exclusive_within(path, 1.0, "testing"):
        assert oct(os.stat(tmp_path / "state").st_mode & 0o777) == "0o700"
        assert not free(path), "another open of the file must wait"
    assert free(path)


def test_gives_up_after_the_wait_naming_the_lock_file(tmp_path):
    path = str(tmp_path / "x.lock")
    holder = held_elsewhere(path)
    try:
        began = time.monotonic()
        with pytest.raises(Retryable) as caught:
            with exclusive_within(path, 0.3, "changing widgets"):
                pytest.fail("entered a held lock")
        waited = time.monotonic() - began
    finally:
        holder.close()
    assert 0.3 <= waited < 3.0
    assert str(caught.value) == ("another vpcnet process on this host has been changing widgets for over 0 s "
                                 f"(lock {path})")


def test_a_process_holding_the_lock_is_waited_for_then_the_lock_is_taken(tmp_path):
    path = str(tmp_path / "x.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"fh = open({path!r}, 'a'); fcntl.flock(fh, fcntl.LOCK_EX); print('held', flush=True); time.sleep(0.5)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        began = time.monotonic()
        with exclusive_within(path, 10.0, "testing"):
            waited = time.monotonic() - began
            assert holder.poll() is not None or not free(path)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert 0.2 < waited < 5.0, "taken once the process ended (the kernel drops its flock), not before"


def test_a_clock_standing_still_still_ends_the_wait(tmp_path):
    """The retries are counted too: an injected clock that never moves (a test's) cannot make it spin."""
    path = str(tmp_path / "x.lock")
    holder = held_elsewhere(path)
    try:
        began = time.monotonic()
        with pytest.raises(Retryable, match="x.lock"):
            with exclusive_within(path, 0.2, "testing", clock=lambda: 100.0):
                pass
        assert time.monotonic() - began < 3.0
    finally:
        holder.close()


def test_the_wait_counts_from_started(tmp_path):
    """A caller that already waited (the pool, for its thread lock) passes when its wait began."""
    path = str(tmp_path / "x.lock")
    holder = held_elsewhere(path)
    try:
        began = time.monotonic()
        with pytest.raises(Retryable):
            with exclusive_within(path, 30.0, "testing", started=time.monotonic() - 29.9):
                pass
        assert time.monotonic() - began < 2.0
    finally:
        holder.close()


def test_stop_ends_the_wait(tmp_path):
    path = str(tmp_path / "x.lock")
    holder = held_elsewhere(path)
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    try:
        began = time.monotonic()
        with pytest.raises(Retryable, match=r"stopping \(waiting for lock .*x\.lock\)"):
            with exclusive_within(path, 30.0, "testing", stop=stop):
                pass
        assert time.monotonic() - began < 3.0
    finally:
        timer.cancel()
        holder.close()


# -- its users --------------------------------------------------------------------------------------------
def test_the_prefix_pool_gives_up_on_a_held_prefixes_lock(tmp_path, monkeypatch):
    config = Config(state_dir=str(tmp_path / "state"), instance_id="h1", cluster_cidr="10.240.0.0/24",
                    addressing="eni-prefix", warm_prefixes=1)
    store = Store(str(tmp_path / "vpcnet.db"))
    pool = PrefixPool(config, store, LocalPrefixes(config), monotonic=lambda: 5.0)     # a clock standing still
    monkeypatch.setattr(prefixes_module, "LOCK_WAIT", 0.2)
    os.makedirs(config.state_dir, exist_ok=True)
    holder = held_elsewhere(os.path.join(config.state_dir, "prefixes.lock"))
    try:
        result = pool.sync()
    finally:
        holder.close()
        pool.close()
    assert not result.ok and any("changing its prefixes" in p and "prefixes.lock" in p for p in result.problems)
    assert store.held_prefixes() == [], "nothing assigned without the lock"
    assert pool.sync().ok and [p.prefix for p in store.held_prefixes()] == ["10.240.0.0/28"]


def test_the_route_keeper_gives_up_on_a_held_routes_lock(tmp_path, monkeypatch):
    config = Config(state_dir=str(tmp_path / "state"), instance_id="h1", cluster_cidr="10.240.0.0/16",
                    provider="local")
    store = Store(str(tmp_path / "vpcnet.db"))
    keeper = RouteKeeper(config, store)
    monkeypatch.setattr(keeper_module, "PASS_LOCK_WAIT", 0.2)
    os.makedirs(config.state_dir, exist_ok=True)
    holder = held_elsewhere(os.path.join(config.state_dir, "routes.lock"))
    try:
        with pytest.raises(Retryable, match=r"changing routes for over 0 s \(lock .*routes\.lock\)"):
            keeper.release()
    finally:
        holder.close()
        keeper.close()


def test_exclusive_within_is_the_one_flock_loop(tmp_path):
    """Both users call the helper (no copy of the loop left behind to drift)."""
    for module in (keeper_module, prefixes_module):
        source = open(module.__file__).read()
        assert "locks.exclusive_within(" in source and "LOCK_NB" not in source, module.__name__
    assert locks.EXCLUSIVE_POLL > 0
