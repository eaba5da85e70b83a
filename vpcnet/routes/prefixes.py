"""`PrefixPool`: this host's ENI prefixes in eni-prefix addressing (docs/eni-prefix.md) — a warm pool kept
by level-triggered passes, and the addresses the IPAM takes from it.

A host's block in this mode is the set of prefixes (IPv4 /28s, one IPv6 /80) vpcnet assigned to its network
interface, recorded in the store (`prefixes`). Only those are ever taken from or released: a prefix of the
interface that vpcnet did not assign (another tool's, a hand-made one) is left alone. The provider
(vpcnet.cloud.prefixes) only moves prefixes; everything about which are ours lives here.

- `sync()`, one pass: settle an assign whose answer was lost; forget prefixes gone from the interface; then
  per family in use keep its target (IPv4: VPCNET_WARM_PREFIXES /28s wholly free, no address in use; IPv6:
  one /80 held, never a second, and none once no dual-stack network or address needs it and the warm
  target is 0), assigning the difference (at most MAX_PER_CALL in one call, never past the
  interface's capacity), and give back wholly unused prefixes above that once unused for
  VPCNET_PREFIX_COOLDOWN. After NoFreePrefix growth of that family
  pauses for NO_FREE_PAUSE seconds (as the AWS VPC CNI does), said once in the log with the fix. A pass makes
  at most one describe, one capacity (once per process), and per family one assign and one unassign (plus
  one assign repeating a lost one's token), and starts no call after PASS_BUDGET seconds.
- `take_address(version, in_use, record)`: an address from a held prefix, recorded by the IPAM's `record` in
  the same store transaction; when none is free, one synchronous assign
  (bounded: one call, after a bounded wait for the host's prefix lock), and if that fails the provider's
  error, saying what failed and what to do.
- `release_all(force)`: decommissioning (`vpcnet routes release`): every prefix given back, after settling
  a lost assign; refused while an address is in use unless `force`; all marked releasing in one
  transaction first, so a failed unassign leaves them releasing for the next pass, never handed out again.
- `short_of_warm_target()`: whether containers took the warm prefixes (a family below the target that can
  grow), from the store: the background pass asks it every second and then runs at once. The target is
  IPv4's only: a host holds exactly one IPv6 /80 (assigned when it holds none, never a second), so an
  IPv6 family whose /80 has addresses in use is not short (`_target`).
- `status()`: per family the prefixes, addresses in use and free, how many more the interface takes, and a
  pause; from the store only (a pass writes what it learnt of the interface there), never a cloud call.
  `vpcnet status`, `vpcnet doctor` and the metrics show it; every assign and unassign call is counted
  (vpcnet_prefix_calls_total, by outcome).

Lost answers. Before an assign is sent, its record (client token, family, count, the interface's prefixes
of that family) is in the store; the answer and the record's removal are one transaction. A record found
by a later pass (the answer was lost, or the process died) is settled from a fresh listing: exactly the
prefixes that appeared since are adopted (more than were asked: someone else is assigning on this
interface, none is adopted); none appeared means it did not happen. A cloud that honours client tokens
(`idempotent_assign`) is asked once more with the same token instead, which returns the first answer if
there was one (a listing may lag behind an assign).

What "free" means: a prefix is wholly free when no address of it is in use (the IPAM's addresses and the
endpoints' in the store) and none was handed out in the last TAKE_GRACE seconds (the IPAM records an
address right after taking it). The release and the take are each one store transaction, so an address is
never taken from a prefix being given back. Addresses a prefix never hands out: the range's (the cluster
CIDR's) first address, which is every network's gateway, its network address and (IPv4) its broadcast one.

One pass or assign at a time per host: a threading lock and `<state_dir>/prefixes.lock` (plugin workers,
the CLI; vpcnet.state.locks.exclusive_within), both within one bounded wait.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

from vpcnet.cloud.prefixes import (
    MAX_PER_CALL,
    InterfaceFull,
    InterfacePrefixes,
    NoFreePrefix,
    PrefixCapacity,
    PrefixesUnsupported,
    PrefixProvider,
    make_prefix_provider,
)
from vpcnet.errors import Busy, Exhausted, Fatal, Retryable, VpcnetError
from vpcnet.observability import events
from vpcnet.state import locks
from vpcnet.state.store import HELD, RELEASING, AssignRecord, HeldPrefix

log = logging.getLogger(__name__)

NO_FREE_PAUSE = 120.0     # growth paused this long after NoFreePrefix (the AWS VPC CNI's figure)
TAKE_GRACE = 10.0         # a prefix that just handed out an address counts as in use this long
PASS_BUDGET = 60.0        # a pass starts no cloud call after this many seconds
LOCK_WAIT = 30.0          # longest wait for another pass or assign of this host
LISTING_LAG = 60.0        # a prefix assigned this recently and not listed yet is not taken for gone
PAUSES_KEY = "prefix_pauses"          # meta: growth pauses per family (JSON)
INTERFACE_KEY = "prefix_interface"    # meta: what the last pass learnt of the interface (JSON), for status


@dataclass
class PrefixPassResult:
    """What one `sync()` did, for logs, status and metrics."""
    assigned: list[str] = field(default_factory=list)    # new prefixes from this pass's assigns
    adopted: list[str] = field(default_factory=list)     # prefixes of an earlier assign whose answer was lost
    released: list[str] = field(default_factory=list)    # given back (unused for the cooldown)
    gone: list[str] = field(default_factory=list)        # held but no longer on the interface: forgotten
    full: list[int] = field(default_factory=list)        # IP versions short of the warm target, interface full
    paused: dict[int, str] = field(default_factory=dict)  # IP version -> why its growth is paused
    problems: list[str] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)  # cloud calls made, by kind

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class TakenAddress:
    """An address `take_address` handed out, its prefix, and the prefixes assigned to find it (if any)."""
    address: str
    prefix: str
    assigned: tuple[str, ...] = ()


@dataclass(frozen=True)
class FamilyStatus:
    version: int
    prefixes: tuple[str, ...]             # held (releasing ones included)
    releasing: tuple[str, ...]
    addresses_in_use: int
    addresses_free: int
    free_prefixes: int                    # wholly free ones
    capacity: int | None                  # prefixes the interface can hold in all; None: not known yet
    room: int | None                      # how many more it can take; None: not known yet
    paused_until: float | None = None     # growth paused until then (wall clock)
    pause_reason: str = ""
    short: bool = False                   # below its target (IPv4: the warm /28s; IPv6: its one /80), can grow


@dataclass(frozen=True)
class PoolStatus:
    interface_id: str                     # "" before a pass has described the interface
    instance_type: str
    supported: bool
    reason: str                           # why not supported
    families: tuple[FamilyStatus, ...]


class PrefixPool:
    """This host's prefixes: `sync`, `take_address`, `status`. `clock` is the wall clock of the store's
    times (cooldowns, pauses), `monotonic` bounds a pass; tests inject both."""

    def __init__(self, config, store, provider: PrefixProvider | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.store = store
        self._provider = provider
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._capacity: PrefixCapacity | None = None
        self.calls: Counter[str] = Counter()      # cloud calls of this pool's life, by kind

    @property
    def provider(self) -> PrefixProvider:
        if self._provider is None:
            self._provider = make_prefix_provider(self.config)
        return self._provider

    def close(self) -> None:
        if self._provider is not None:
            self._provider.close()

    def families(self) -> list[int]:
        """IP versions in use: IPv4 always (as the route-table mode claims the default IPv4 block), IPv6 once
        a network has IPv6 or this host holds or is assigning an IPv6 prefix."""
        v6 = bool(self.store.held_prefixes("ipv6")) or any(r.family == "ipv6" for r in self.store.assign_records()) \
            or any(n.cluster_cidr_v6 for n in self.store.networks())
        return [4, 6] if v6 else [4]

    # -- one pass --------------------------------------------------------------------------------------
    def sync(self) -> PrefixPassResult:
        """One level-triggered pass (see the module docstring); problems are reported, never raised."""
        deadline = self._monotonic() + PASS_BUDGET

        def keep(interface: InterfacePrefixes, on_interface: dict[int, set[str]], result: PrefixPassResult) -> None:
            capacity: PrefixCapacity | None = None
            try:
                capacity = self._known_capacity(interface)
            except VpcnetError as exc:
                result.problems.append(f"cannot read the interface's capacity (no prefix is assigned until "
                                       f"then): {exc}")
            for version in self.families():
                self._keep(version, interface, on_interface, capacity, result, deadline)
            self._remember(interface, on_interface, capacity)
        return self._pass(keep)

    def _pass(self, body: Callable[[InterfacePrefixes, dict[int, set[str]], PrefixPassResult], None]
              ) -> PrefixPassResult:
        """The frame every pass shares: under the host's lock, describe the interface, settle lost assigns and
        forget prefixes gone from it, then `body`; its calls counted and its problems logged, never raised."""
        result = PrefixPassResult()
        calls_before = Counter(self.calls)
        try:
            with self._exclusive():
                interface = self._describe()
                on_interface = self._settle(interface, result)
                self._forget_gone(on_interface, result)
                body(interface, on_interface, result)
        except VpcnetError as exc:
            result.problems.append(str(exc))
        result.calls = self.calls - calls_before
        _log_problems(result)
        return result

    def _describe(self) -> InterfacePrefixes:
        self.calls["describe"] += 1
        return self.provider.describe()

    def _settle(self, interface: InterfacePrefixes, result: PrefixPassResult) -> dict[int, set[str]]:
        """Settle every assign whose answer was not recorded; returns the interface's prefixes per version
        (with what a repeated assign added)."""
        on_interface = {4: set(interface.ipv4), 6: set(interface.ipv6)}
        ours = {p.prefix for p in self.store.held_prefixes()}
        for record in self.store.assign_records():
            version = _version(record.family)
            appeared = sorted(on_interface[version] - set(record.before) - ours, key=_sort_key)
            if appeared and len(appeared) <= record.count:
                self.store.settle_assign(record.client_token, record.family, appeared, self._clock())
                result.adopted.extend(appeared)
                ours.update(appeared)
                log.warning("adopted IPv%d prefixes %s: an assign of this host whose answer was lost had "
                            "made them", version, ", ".join(appeared),
                            extra={"event": "prefix_assign", "outcome": "adopted", "family": record.family,
                                   "destination": ",".join(appeared)})
            elif appeared:
                self.store.settle_assign(record.client_token, record.family, [], self._clock())
                result.problems.append(
                    f"an IPv{version} assign of {record.count} prefix(es) lost its answer and {len(appeared)} "
                    f"appeared on interface {interface.interface_id} since ({', '.join(appeared)}): something "
                    "else assigns prefixes on this interface too, so none was adopted; stop the other tool, "
                    "and release the ones nobody uses by hand")
            elif self.provider.idempotent_assign:
                # the listing may lag behind the assign: the same token gets the first answer, or assigns now
                try:
                    got = self._call_assign(version, record.count, record.client_token)
                except Fatal as exc:
                    self.store.settle_assign(record.client_token, record.family, [], self._clock())
                    result.problems.append(f"repeating an IPv{version} assign whose answer was lost: {exc}")
                    continue
                except VpcnetError as exc:
                    result.problems.append(f"repeating an IPv{version} assign whose answer was lost "
                                           f"(tried again on the next pass): {exc}")
                    continue
                self.store.settle_assign(record.client_token, record.family, got, self._clock())
                on_interface[version].update(got)
                ours.update(got)
                result.adopted.extend(got)
            else:
                self.store.settle_assign(record.client_token, record.family, [], self._clock())
                log.info("an IPv%d assign whose answer was lost did not happen (no new prefix on %s)", version,
                         interface.interface_id)
        return on_interface

    def _forget_gone(self, on_interface: dict[int, set[str]], result: PrefixPassResult) -> None:
        """Held prefixes no longer on the interface: a release that finished, or one taken away by hand (not
        one assigned in the last LISTING_LAG seconds, which a listing may not show yet)."""
        now = self._clock()
        for held in self.store.held_prefixes():
            if held.prefix in on_interface[_version(held.family)]:
                continue
            if held.state == HELD and held.added > now - LISTING_LAG:
                continue
            self.store.forget_prefixes([held.prefix])
            if held.state == RELEASING:
                result.released.append(held.prefix)
                continue
            result.gone.append(held.prefix)
            log.error("prefix %s is no longer on this host's interface (removed outside vpcnet): forgotten; "
                      "containers with an address in it are unreachable until they are recreated", held.prefix,
                      extra={"event": "prefix_release", "outcome": "gone", "family": held.family,
                             "destination": held.prefix})

    def _known_capacity(self, interface: InterfacePrefixes) -> PrefixCapacity:
        """The interface's capacity, read once per process (an instance type changes only with a restart);
        an instance without prefixes is a capacity of none, with the reason. `interface` is this pass's own
        describe, handed to the provider so it does not describe the interface again (never an older one:
        the answer is not kept past the call)."""
        if self._capacity is None:
            self.calls["capacity"] += 1
            try:
                self._capacity = self.provider.capacity(interface)
            except PrefixesUnsupported as exc:
                self._capacity = PrefixCapacity("", 0, 0, supported=False, reason=str(exc))
        return self._capacity

    def _keep(self, version: int, interface: InterfacePrefixes, on_interface: dict[int, set[str]],
              capacity: PrefixCapacity | None, result: PrefixPassResult, deadline: float) -> None:
        """One family: finish releases, then grow to the warm target or release above it."""
        family, now = _family(version), self._clock()
        in_use = self.store.prefix_use(family, now)
        held = self.store.held_prefixes(family)
        releasing = [p.prefix for p in held if p.state == RELEASING]
        if releasing and self._in_budget(deadline, result):
            self._unassign(version, releasing, result)
        free = [p for p in held if p.state == HELD and self._wholly_free(p, in_use, now)]
        short, keep_free = self._target(version, sum(1 for p in held if p.state == HELD), len(free))
        if short > 0:
            self._grow(version, short, interface, on_interface, capacity, result, deadline)
        elif len(free) > keep_free and self._in_budget(deadline, result):
            cooled = [p.prefix for p in free[keep_free:]
                      if p.unused_since is not None and p.unused_since <= now - self.config.prefix_cooldown]
            chosen = self.store.begin_release(family, cooled[:MAX_PER_CALL], now - self.config.prefix_cooldown,
                                              now - TAKE_GRACE)
            if chosen:
                self._unassign(version, chosen, result)

    def _target(self, version: int, held: int, free: int) -> tuple[int, int]:
        """(how many prefixes the family is short of, how many wholly free ones it keeps) with `held` held
        (not releasing) and `free` of them wholly free. IPv4: VPCNET_WARM_PREFIXES /28s kept wholly free.
        IPv6: a host holds at most one /80 (2**48 addresses never run short): one assigned when it holds
        none, never a second; an extra one (an older version's, an adopted one) wholly free and cooled is
        given back. The one /80 is wanted while a dual-stack network exists, one of its addresses is in use
        or a warm pool is wanted at all (VPCNET_WARM_PREFIXES > 0): with a warm target of 0 and no
        dual-stack network left, an unused /80 is given back like a /28."""
        warm = self.config.warm_prefixes
        if version == 4:
            return max(0, warm - free), warm
        in_use = held - free
        want = 1 if warm > 0 or in_use > 0 or any(n.cluster_cidr_v6 for n in self.store.networks()) else 0
        return max(0, want - held), max(0, want - in_use)

    def _grow(self, version: int, need: int, interface: InterfacePrefixes, on_interface: dict[int, set[str]],
              capacity: PrefixCapacity | None, result: PrefixPassResult, deadline: float) -> None:
        pause = self._pause(version)
        if pause is not None:
            result.paused[version] = pause[1]
            return
        if capacity is None:
            return                       # the problem is already reported
        if not capacity.supported:
            result.problems.append(f"this instance cannot hold prefixes: {capacity.reason}")
            return
        count = min(need, MAX_PER_CALL, _room(version, interface, on_interface, capacity))
        if count <= 0:
            result.full.append(version)
            return
        if not self._in_budget(deadline, result):
            return
        try:
            got = self._assign(version, count, on_interface[version])
        except NoFreePrefix as exc:
            result.paused[version] = str(exc)
            return
        except InterfaceFull:
            result.full.append(version)
            return
        except VpcnetError as exc:
            result.problems.append(f"assigning {count} IPv{version} prefix(es): {exc}")
            return
        on_interface[version].update(got)
        result.assigned.extend(got)

    def _in_budget(self, deadline: float, result: PrefixPassResult) -> bool:
        if self._monotonic() < deadline:
            return True
        if not any("time budget" in p for p in result.problems):
            result.problems.append(f"the pass used its time budget ({PASS_BUDGET:.0f} s) before it was done: "
                                   "the next pass goes on")
        return False

    @staticmethod
    def _wholly_free(held: HeldPrefix, in_use: dict[str, int], now: float) -> bool:
        return not in_use.get(held.prefix) and held.taken <= now - TAKE_GRACE

    # -- the cloud calls that change the interface ---------------------------------------------------------
    def _call_assign(self, version: int, count: int, token: str) -> list[str]:
        self.calls["assign"] += 1
        try:
            got = list(self.provider.assign(version, count, token))
        except Exception as exc:
            events.prefix_call("assign", _family(version), _outcome(exc))
            raise
        events.prefix_call("assign", _family(version), "ok")
        return got

    def _assign(self, version: int, count: int, before: Collection[str]) -> list[str]:
        """Assign `count` prefixes, recorded before the call so a lost answer is settled later. A Fatal
        answer means nothing was assigned: the record goes (NoFreePrefix also pauses growth); anything else
        leaves it for the next pass."""
        family = _family(version)
        token = "vpcnet-" + uuid.uuid4().hex
        self.store.record_assign(AssignRecord(token, family, count, tuple(sorted(before, key=_sort_key)),
                                              self._clock()))
        try:
            got = self._call_assign(version, count, token)
        except Fatal as exc:
            self.store.settle_assign(token, family, [], self._clock())
            if isinstance(exc, NoFreePrefix):
                self._start_pause(version, exc)
            raise
        self.store.settle_assign(token, family, got, self._clock())
        self._end_pause(version)
        log.info("assigned IPv%d prefixes %s to this host's interface", version, ", ".join(got),
                 extra={"event": "prefix_assign", "outcome": "assigned", "family": family,
                        "destination": ",".join(got)})
        return got

    def _unassign(self, version: int, prefixes: list[str], result: PrefixPassResult, why: str = "") -> None:
        self.calls["unassign"] += 1
        try:
            self.provider.unassign(version, prefixes)
            events.prefix_call("unassign", _family(version), "ok")
        except VpcnetError as exc:
            events.prefix_call("unassign", _family(version), _outcome(exc))
            result.problems.append(f"releasing IPv{version} prefixes {', '.join(prefixes)} (tried again on the "
                                   f"next pass): {exc}")
            return
        self.store.forget_prefixes(prefixes)
        result.released.extend(prefixes)
        log.info("released IPv%d prefixes %s (%s)", version, ", ".join(prefixes),
                 why or f"unused for {self.config.prefix_cooldown:.0f} s, above the warm target of "
                 f"{self.config.warm_prefixes}",
                 extra={"event": "prefix_release", "outcome": "released", "family": _family(version),
                        "destination": ",".join(prefixes)})

    # -- decommissioning ---------------------------------------------------------------------------------
    def release_all(self, force: bool = False) -> PrefixPassResult:
        """Give back every prefix this host holds (`vpcnet routes release`): settle first any assign whose
        answer was lost (its prefixes are ours to give back too; one still unsettled: nothing is released),
        then mark them all releasing in one store transaction, refused while an address of one is in use
        unless `force`; then per family unassign them (MAX_PER_CALL per call) and forget each once the
        cloud answered. An unassign that fails leaves its prefixes releasing, never handed out again: the
        next pass, or `release` again, finishes them. Problems are reported, never raised."""
        def release(interface: InterfacePrefixes, on_interface: dict[int, set[str]],
                    result: PrefixPassResult) -> None:
            unsettled = self.store.assign_records()
            if unsettled:
                result.problems.append(
                    f"{len(unsettled)} assign(s) of this host lost their answer and are not "
                    "settled yet (see above), so their prefixes are not known: nothing was released; run "
                    "`vpcnet routes release` again")
                return
            self._release_every(on_interface, result, force)
            capacity: PrefixCapacity | None = None
            try:
                capacity = self._known_capacity(interface)   # for status's room after it
            except VpcnetError as exc:
                log.info("cannot read the interface's capacity: %s", exc)
            self._remember(interface, on_interface, capacity)
        return self._pass(release)

    def _release_every(self, on_interface: dict[int, set[str]], result: PrefixPassResult, force: bool) -> None:
        releasing, busy = self.store.begin_release_all(self._clock() - TAKE_GRACE, force)
        if busy and not force:
            result.problems.append(
                f"not released: {len(busy)} prefix(es) still have addresses in use or just handed out "
                f"({', '.join(busy[:5])}{' ...' if len(busy) > 5 else ''}): remove the containers first, or "
                "pass --force")
            return
        for version in (4, 6):
            mine = [p.prefix for p in releasing if _version(p.family) == version]
            for start in range(0, len(mine), MAX_PER_CALL):
                chunk = mine[start:start + MAX_PER_CALL]
                self._unassign(version, chunk, result, "this host's prefixes given back: vpcnet routes release")
                if chunk[0] in result.released:
                    on_interface[version].difference_update(chunk)


    # -- growth pauses after NoFreePrefix -----------------------------------------------------------------
    def _pause(self, version: int) -> tuple[float, str] | None:
        """(until, why) while growth of `version` is paused."""
        pause = _json_dict(self.store.get_meta(PAUSES_KEY, "{}")).get(_family(version))
        if isinstance(pause, dict) and pause.get("until", 0) > self._clock():
            return pause["until"], pause.get("reason", "")
        return None

    def _start_pause(self, version: int, exc: NoFreePrefix) -> None:
        family, now = _family(version), self._clock()

        def paused(text: str) -> str:
            pauses = _json_dict(text)
            times = pauses.get(family, {}).get("times", 0) + 1
            pauses[family] = {"until": now + NO_FREE_PAUSE, "reason": str(exc), "times": times}
            return json.dumps(pauses, sort_keys=True)

        times = json.loads(self.store.change_meta(PAUSES_KEY, paused, "{}"))[family]["times"]
        # said once: again only after an assign has succeeded in between
        (log.warning if times == 1 else log.info)(
            "no free IPv%d prefix for this host: new prefixes paused for %.0f s%s (%s)", version, NO_FREE_PAUSE,
            "" if times == 1 else f", {times} times in a row", exc,
            extra={"event": "prefix_problem", "outcome": "paused", "family": family})

    def _end_pause(self, version: int) -> None:
        family = _family(version)
        if family in _json_dict(self.store.get_meta(PAUSES_KEY, "{}")):
            self.store.change_meta(PAUSES_KEY, lambda text: json.dumps(
                {k: v for k, v in _json_dict(text).items() if k != family}, sort_keys=True), "{}")

    # -- what the IPAM asks ------------------------------------------------------------------------------
    def take_address(self, version: int, in_use: Collection[str] = (),
                     record: Callable[[sqlite3.Connection, str], None] | None = None) -> TakenAddress:
        """A free address of IP `version` from a held prefix: not in `in_use` (the caller's view, besides
        the store's), not a reserved one of the range. `record(db, address)` writes the IPAM's row for it in
        the same transaction, so concurrent callers never get the same address; a caller without `record`
        must record it right away and serialise its takes.

        When no held prefix has one: one synchronous assign of one prefix (the next pass restores the warm
        target). Raises NoFreePrefix (also while growth is paused), InterfaceFull, PrefixesUnsupported,
        Busy or Retryable, each saying that the container got no address, why, and what to do."""
        taken = self._take(version, in_use, record)
        if taken is not None:
            return taken
        what = f"no free IPv{version} address for a container on this host"
        pause = self._pause(version)
        if pause is not None:
            raise NoFreePrefix(f"{what}: its prefixes are all in use, and new ones are paused for another "
                               f"{pause[0] - self._clock():.0f} s after: {pause[1]}")
        try:
            with self._exclusive():
                taken = self._take(version, in_use, record)       # another process may have assigned meanwhile
                if taken is not None:
                    return taken
                interface = self._describe()
                settled = PrefixPassResult()
                on_interface = self._settle(interface, settled)
                _log_problems(settled)
                taken = self._take(version, in_use, record)       # a settled assign may have brought one
                if taken is not None:
                    return taken
                capacity = self._known_capacity(interface)
                if not capacity.supported:
                    raise PrefixesUnsupported(capacity.reason)
                if _room(version, interface, on_interface, capacity) <= 0:
                    raise InterfaceFull(
                        f"interface {interface.interface_id} holds all the prefixes its instance type "
                        f"({capacity.instance_type or 'unknown'}) allows and every address in them is in use: "
                        "remove containers, or move them to a host with a larger instance type")
                got = self._assign(version, 1, on_interface[version])
        except VpcnetError as exc:
            raise _explained(exc, what) from exc
        taken = self._take(version, in_use, record, tuple(got))
        if taken is None:
            raise Exhausted(f"{what}: the prefix just assigned ({', '.join(got)}) has no free address "
                            "(taken meanwhile by other containers); try again")
        return taken

    def _take(self, version: int, in_use: Collection[str], record: Callable[[sqlite3.Connection, str], None] | None,
              assigned: tuple[str, ...] = ()) -> TakenAddress | None:
        # Addresses as integers, parsed once: `pick` runs inside the store's write transaction, where every
        # other take and the background pass wait, and per-address ipaddress objects tested against every
        # prefix cost milliseconds at a few hundred containers.
        reserved = {int(a) for a in self._reserved(version)}
        extra = {n for v, n in map(_address_int, filter(None, in_use)) if v == version}

        def pick(held: list[HeldPrefix], used: set[str]) -> tuple[str, str] | None:
            taken = {_address_int(a)[1] for a in used} | extra | reserved
            spans = {p.prefix: _span(p.prefix) for p in held}
            counts = _counts_in(spans.values(), taken - reserved)
            # densest first: the other prefixes stay wholly free, to be kept warm or given back
            ranked = sorted(held, key=lambda p: (-counts[spans[p.prefix][1:]], spans[p.prefix][:2]))
            for prefix in ranked:
                address = _first_free(spans[prefix.prefix], taken)
                if address is not None:
                    return prefix.prefix, address
            return None

        chosen = self.store.take_prefix_address(_family(version), pick, self._clock(), record)
        return None if chosen is None else TakenAddress(chosen[1], chosen[0], assigned)

    def _reserved(self, version: int) -> set:
        """Addresses of the range no prefix hands out: the gateway (the first address) and the network
        address, and for IPv4 the broadcast one."""
        network = ipaddress.ip_network(self.config.cluster_cidr if version == 4 else
                                       self.config.default_cluster_cidr_v6)
        out = {network.network_address, network.network_address + 1}
        if version == 4:
            out.add(network.broadcast_address)
        return out

    # -- status -------------------------------------------------------------------------------------------
    def _remember(self, interface: InterfacePrefixes, on_interface: dict[int, set[str]],
                  capacity: PrefixCapacity | None) -> None:
        """What `status` shows of the interface, as this pass found it."""
        snapshot = {"interface_id": interface.interface_id, "at": self._clock(),
                    "instance_type": capacity.instance_type if capacity else "",
                    "supported": capacity.supported if capacity else True,
                    "reason": capacity.reason if capacity else "",
                    "capacity": {str(v): _capacity(v, capacity) for v in (4, 6)} if capacity else {},
                    "room": {str(v): _room(v, interface, on_interface, capacity) for v in (4, 6)} if capacity else {}}
        with self.store.tx() as db:
            self.store.set_meta(db, INTERFACE_KEY, json.dumps(snapshot, sort_keys=True))

    def status(self) -> PoolStatus:
        """Prefixes, addresses and room per family, from the store (no cloud call)."""
        snapshot = _json_dict(self.store.get_meta(INTERFACE_KEY, "{}"))
        families = []
        for version in sorted({*self.families(), *(_version(p.family) for p in self.store.held_prefixes())}):
            family, now = _family(version), self._clock()
            held = self.store.held_prefixes(family)
            reserved = self._reserved(version)
            spans = {p.prefix: _span(p.prefix) for p in held}
            counts = _counts_in(spans.values(), {_address_int(a)[1] for a in self.store.addresses_in_use(family)})
            in_use = free = free_prefixes = 0
            for prefix in held:
                count = counts[spans[prefix.prefix][1:]]
                in_use += count
                if prefix.state == HELD:
                    network = ipaddress.ip_network(prefix.prefix)
                    free += network.num_addresses - count - sum(1 for a in reserved if a in network)
                    free_prefixes += self._wholly_free(prefix, {prefix.prefix: count}, now)
            pause = self._pause(version)
            room = snapshot.get("room", {}).get(str(version))
            below = self._target(version, sum(1 for p in held if p.state == HELD), free_prefixes)[0] > 0
            families.append(FamilyStatus(
                version, tuple(p.prefix for p in held), tuple(p.prefix for p in held if p.state == RELEASING),
                in_use, free, free_prefixes, snapshot.get("capacity", {}).get(str(version)), room,
                pause[0] if pause else None, pause[1] if pause else "",
                short=below and (room is None or room > 0) and pause is None))
        return PoolStatus(snapshot.get("interface_id", ""), snapshot.get("instance_type", ""),
                          snapshot.get("supported", True), snapshot.get("reason", ""), tuple(families))

    def short_of_warm_target(self) -> bool:
        """Whether containers took the warm prefixes of a family whose growth can go on (room on the
        interface, no pause): the background pass then runs before its interval is over, so that the next
        container start does not wait on an assign. From the store only, cheap enough to ask every second."""
        return any(family.short for family in self.status().families)

    # -- one pass or assign at a time -----------------------------------------------------------------------
    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This host's prefix changes one at a time, across threads and processes; a bounded wait."""
        started = self._monotonic()                  # one wait for the thread lock and the file's
        if not self._lock.acquire(timeout=LOCK_WAIT):
            raise Retryable(f"another pass over this host's prefixes has run for over {LOCK_WAIT:.0f} s")
        try:
            with locks.exclusive_within(os.path.join(self.config.state_dir, "prefixes.lock"), LOCK_WAIT,
                                        "changing its prefixes", clock=self._monotonic, started=started):
                yield
        finally:
            self._lock.release()


def _family(version: int) -> str:
    if version not in (4, 6):
        raise ValueError(f"IP version {version}")
    return f"ipv{version}"


def _version(family: str) -> int:
    return 6 if family == "ipv6" else 4


def _sort_key(prefix: str) -> tuple[int, int]:
    network = ipaddress.ip_network(prefix)
    return network.version, int(network.network_address)


@functools.lru_cache(maxsize=4096)
def _span(prefix: str) -> tuple[int, int, int]:
    """(IP version, first address as an integer, number of addresses) of `prefix`; parsed once per prefix."""
    network = ipaddress.ip_network(prefix)
    return network.version, int(network.network_address), network.num_addresses


def _address_int(address: str) -> tuple[int, int]:
    """(IP version, integer) of an address's text; inet_pton reads the store's canonical text several times
    faster than ipaddress, which still takes (and refuses, with its ValueError) anything else."""
    try:
        if ":" in address:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except OSError:
        ip = ipaddress.ip_address(address)
        return ip.version, int(ip)


def _counts_in(spans: Collection[tuple[int, int, int]], addresses: set[int]) -> Counter:
    """Addresses per prefix, keyed (first address, size): a prefix is aligned to its size, so one pass over
    the addresses per distinct size counts them all."""
    counts: Counter = Counter()
    for size in {span[2] for span in spans}:
        per_block = Counter(a // size for a in addresses)
        for _, first, _size in (span for span in spans if span[2] == size):
            counts[first, size] = per_block[first // size]
    return counts


def _first_free(span: tuple[int, int, int], taken: set[int]) -> str | None:
    """The lowest address of the prefix `span` not in `taken`; bounded by len(taken) even in a /80."""
    version, first, size = span
    for offset in range(min(size, len(taken) + 1)):
        if first + offset not in taken:
            return str(ipaddress.IPv4Address(first + offset) if version == 4 else ipaddress.IPv6Address(first + offset))
    return None


def _capacity(version: int, capacity: PrefixCapacity) -> int:
    return capacity.ipv4_prefixes if version == 4 else capacity.ipv6_prefixes


def _room(version: int, interface: InterfacePrefixes, on_interface: dict[int, set[str]],
          capacity: PrefixCapacity) -> int:
    """How many more prefixes of `version` the interface takes: its capacity less what it holds (anyone's),
    and for IPv4 less its secondary private addresses, which take the same slots."""
    if not capacity.supported:
        return 0
    if version == 4:
        return max(0, capacity.ipv4_prefixes - len(on_interface[4]) - max(0, interface.ipv4_addresses - 1))
    return max(0, capacity.ipv6_prefixes - len(on_interface[6]))


def _outcome(exc: BaseException) -> str:
    """The `outcome` label of vpcnet_prefix_calls_total for a call that raised `exc`."""
    for cls, outcome in ((NoFreePrefix, "no_free_prefix"), (InterfaceFull, "interface_full"),
                         (PrefixesUnsupported, "unsupported"), (Busy, "busy"), (Retryable, "retryable")):
        if isinstance(exc, cls):
            return outcome
    return "refused"


def _log_problems(result: PrefixPassResult) -> None:
    for problem in result.problems:
        log.warning("prefixes: %s", problem, extra={"event": "prefix_problem", "outcome": "failed"})


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _explained(exc: VpcnetError, what: str) -> VpcnetError:
    """`exc` with its message prefixed by what it meant for the caller (same class, so the same answer)."""
    try:
        return type(exc)(f"{what}: {exc}")
    except TypeError:
        return exc

