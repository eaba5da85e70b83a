"""eni-prefix addressing: the warm pool of this host's prefixes (vpcnet.routes.prefixes) against the real
embedded provider (LocalPrefixes, its JSON file shared by the "hosts" of a test) and a real sqlite store.

Addresses in use are rows of the store's `addresses` table, as the IPAM writes them; the wall clock is
injected, so cooldowns and pauses pass without sleeping.
"""
from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import threading
from typing import Sequence

import pytest

from vpcnet.cloud.local import LOCAL_CAPACITY_V4, LocalPrefixes
from vpcnet.cloud.prefixes import (
    InterfaceFull,
    InterfacePrefixes,
    NoFreePrefix,
    PrefixCapacity,
    PrefixesUnsupported,
    PrefixProvider,
    make_prefix_provider,
)
from vpcnet.config import Config
from vpcnet.errors import Busy, Fatal, Retryable
from vpcnet.routes.prefixes import LISTING_LAG, NO_FREE_PAUSE, PASS_BUDGET, TAKE_GRACE, PrefixPool
from vpcnet.state.store import Store

CLUSTER = "10.240.0.0/24"          # 16 /28s
CLUSTER_V6 = "fd00:10::/64"


class Clock:
    """The wall clock the pool reads, moved by the test."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Counting(PrefixProvider):
    """The real LocalPrefixes, its calls counted (a test's way to see what reached the "cloud")."""

    def __init__(self, inner: PrefixProvider):
        self.inner = inner
        self.idempotent_assign = inner.idempotent_assign
        self.assigns: list[tuple[int, int, str]] = []
        self.unassigns: list[tuple[int, tuple[str, ...]]] = []

    def interface_id(self) -> str:
        return self.inner.interface_id()

    def describe(self) -> InterfacePrefixes:
        return self.inner.describe()

    def assign(self, version: int, count: int, client_token: str) -> list[str]:
        self.assigns.append((version, count, client_token))
        return self.inner.assign(version, count, client_token)

    def unassign(self, version: int, prefixes: Sequence[str]) -> None:
        self.unassigns.append((version, tuple(prefixes)))
        self.inner.unassign(version, prefixes)

    def capacity(self, held: InterfacePrefixes | None = None) -> PrefixCapacity:
        return self.inner.capacity(held)


class Host:
    """One vpcnet host of the test: its config, store, provider and pool (the hosts of a test share the
    provider's file, as hosts share a subnet)."""

    def __init__(self, tmp_path, name: str = "h1", clock: Clock | None = None, **settings):
        settings = {"warm_prefixes": 1, "prefix_cooldown": 30.0, **settings}
        self.config = Config(state_dir=str(tmp_path / "shared"), instance_id=name, cluster_cidr=CLUSTER,
                             cluster_cidr_v6=CLUSTER_V6, addressing="eni-prefix", **settings)
        self.store = Store(str(tmp_path / name / "vpcnet.db"))
        self.clock = clock or Clock()
        self.provider = Counting(LocalPrefixes(self.config))
        self.pool = PrefixPool(self.config, self.store, self.provider, clock=self.clock)

    def held(self, version: int = 4) -> list[str]:
        return [p.prefix for p in self.store.held_prefixes(f"ipv{version}")]

    def on_interface(self, version: int = 4) -> list[str]:
        described = self.provider.inner.describe()
        return list(described.ipv4 if version == 4 else described.ipv6)

    @staticmethod
    def record(db, address: str) -> None:
        """The IPAM's row for an address it hands out (inside the take's transaction)."""
        db.execute("INSERT OR IGNORE INTO pools(pool_id, cluster_cidr, gateway, cursor) VALUES(?, ?, ?, 0)",
                   ("eni", CLUSTER, "10.240.0.1"))
        db.execute("INSERT INTO addresses(pool_id, address) VALUES('eni', ?)", (address,))

    def use(self, address: str) -> None:
        """The IPAM records an address it handed out."""
        with self.store.tx() as db:
            self.record(db, address)

    def free(self, address: str) -> None:
        with self.store.tx() as db:
            db.execute("DELETE FROM addresses WHERE address=?", (address,))

    def take(self, version: int = 4) -> str:
        """take_address, the address recorded in the same transaction, as the IPAM does."""
        return self.pool.take_address(version, record=self.record).address


@pytest.fixture
def host(tmp_path):
    return Host(tmp_path)


def inside(address: str, prefix: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(prefix)


# -- the embedded provider -----------------------------------------------------------------------------------
def test_local_prefixes_carve_distinct_28s_for_each_host_sharing_the_file(tmp_path):
    one, two = Host(tmp_path, "h1"), Host(tmp_path, "h2")
    assert one.provider.assign(4, 2, "t1") == ["10.240.0.0/28", "10.240.0.16/28"]
    assert two.provider.assign(4, 1, "t2") == ["10.240.0.32/28"]
    one.provider.unassign(4, ["10.240.0.0/28", "10.240.0.99/28"])      # one it never held: not an error
    assert two.provider.assign(4, 1, "t3") == ["10.240.0.0/28"]        # given back, so anyone's again
    assert one.on_interface() == ["10.240.0.16/28"]
    assert two.on_interface() == ["10.240.0.32/28", "10.240.0.0/28"]
    assert one.provider.describe().interface_id == "lni-h1"


def test_local_prefixes_honour_the_client_token_like_alibaba(host):
    first = host.provider.assign(4, 2, "token-1")
    assert host.provider.assign(4, 2, "token-1") == first             # a retry gets the first answer
    assert host.on_interface() == first                               # and assigns nothing more
    with pytest.raises(Fatal, match="another assign"):
        host.provider.assign(4, 3, "token-1")                         # same token, other parameters
    assert host.provider.inner.idempotent_assign is True


def test_local_prefixes_refuse_past_the_range_or_the_capacity_all_or_nothing(tmp_path):
    one, two = Host(tmp_path, "h1"), Host(tmp_path, "h2")
    one.provider.assign(4, 10, "a")
    with pytest.raises(InterfaceFull, match="15"):
        one.provider.assign(4, 6, "b")                                 # 16 > the capacity of 15
    assert len(one.on_interface()) == 10
    two.provider.assign(4, 5, "c")
    with pytest.raises(NoFreePrefix) as info:
        two.provider.assign(4, 2, "d")                                 # one /28 left of the 16
    assert "VPCNET_CLUSTER_CIDR" in str(info.value) and len(two.on_interface()) == 5
    assert one.provider.capacity() == PrefixCapacity("local", ipv4_prefixes=LOCAL_CAPACITY_V4, ipv6_prefixes=1)


def test_local_prefixes_give_one_80_per_host_from_the_ipv6_range(tmp_path):
    one, two = Host(tmp_path, "h1"), Host(tmp_path, "h2")
    assert one.provider.assign(6, 1, "a") == ["fd00:10::/80"]
    assert two.provider.assign(6, 1, "b") == ["fd00:10:0:0:1::/80"]
    with pytest.raises(InterfaceFull):
        one.provider.assign(6, 1, "c")


def test_the_local_provider_is_the_prefix_provider_of_the_local_route_provider(host):
    assert isinstance(make_prefix_provider(host.config), LocalPrefixes)


# -- the warm target ----------------------------------------------------------------------------------------
def test_a_pass_keeps_the_warm_target_free_with_three_calls_and_the_next_makes_no_assign(host):
    result = host.pool.sync()
    assert result.ok, result.problems
    assert result.assigned == ["10.240.0.0/28"] and host.held() == ["10.240.0.0/28"]
    assert dict(result.calls) == {"describe": 1, "capacity": 1, "assign": 1}
    again = host.pool.sync()
    assert again.ok and again.assigned == [] and dict(again.calls) == {"describe": 1}
    assert host.on_interface() == ["10.240.0.0/28"]


def test_a_warm_target_of_three_is_one_call_of_three(tmp_path):
    host = Host(tmp_path, warm_prefixes=3)
    result = host.pool.sync()
    assert len(result.assigned) == 3 and [a[1] for a in host.provider.assigns] == [3]


def test_addresses_taken_grow_the_pool_and_skip_the_gateway_and_the_range_s_own_addresses(host):
    host.pool.sync()
    first = [host.take() for _ in range(14)]        # 16 less the range's network address and gateway
    assert first[0] == "10.240.0.2" and all(inside(a, "10.240.0.0/28") for a in first)
    assert "10.240.0.0" not in first and "10.240.0.1" not in first
    assert len(host.provider.assigns) == 1          # all from the warm prefix: no cloud call
    result = host.pool.sync()                       # the warm one is in use now: one more
    assert result.assigned == ["10.240.0.16/28"]
    assert host.take() == "10.240.0.16"
    # densest first: a gap in the first prefix is filled before the second is used further
    host.free("10.240.0.5")
    assert host.take() == "10.240.0.5"


def test_with_no_free_address_one_synchronous_assign_serves_the_container(tmp_path):
    host = Host(tmp_path, warm_prefixes=0)
    taken = host.pool.take_address(4)
    assert taken.assigned == ("10.240.0.0/28",) and taken.prefix == "10.240.0.0/28"
    assert taken.address == "10.240.0.2"
    assert [(v, n) for v, n, _ in host.provider.assigns] == [(4, 1)]
    assert host.pool.take_address(4, in_use=[taken.address]).address == "10.240.0.3"


def test_the_broadcast_address_of_the_range_is_never_handed_out(tmp_path):
    other = Host(tmp_path, "h2")
    other.provider.inner.assign(4, 10, "a")
    other.provider.inner.assign(4, 5, "b")          # another host holds 15 of the 16 /28s
    host = Host(tmp_path, warm_prefixes=0)
    taken = [host.take() for _ in range(15)]        # the last /28: 16 addresses less the broadcast one
    assert host.held() == ["10.240.0.240/28"] and "10.240.0.255" not in taken
    assert sorted(taken, key=ipaddress.ip_address)[-1] == "10.240.0.254"
    with pytest.raises(NoFreePrefix, match="^no free IPv4 address for a container on this host: "):
        host.take()                                 # and the range is used up


def test_concurrent_containers_never_get_the_same_address(tmp_path):
    host = Host(tmp_path, warm_prefixes=2)
    host.pool.sync()
    got: list[str] = []
    errors: list[Exception] = []

    def start_containers() -> None:
        try:
            for _ in range(6):
                got.append(host.take())
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start_containers) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(got) == 36 and len(set(got)) == 36
    # the warm pair holds 30 addresses; the rest from one synchronous assign, whoever came first
    assert [count for _, count, _ in host.provider.assigns] == [2, 1]


# -- release after the cooldown --------------------------------------------------------------------------------
def test_an_unused_prefix_above_the_target_goes_only_after_the_cooldown(host):
    start = host.clock.now
    host.pool.sync()                                        # 10.240.0.0/28, warm
    address = host.take()
    host.clock.now = start + 1
    assert host.pool.sync().assigned == ["10.240.0.16/28"]   # warm again; unused since start + 1
    host.clock.now = start + 5
    host.free(address)                                      # both wholly free now: one above the target
    assert host.pool.sync().released == []
    host.clock.now = start + 30
    assert host.pool.sync().released == []
    host.clock.now = start + 31.5
    result = host.pool.sync()
    assert result.released == ["10.240.0.16/28"] and result.assigned == []
    assert host.held() == ["10.240.0.0/28"] and host.on_interface() == ["10.240.0.0/28"]
    assert host.provider.unassigns == [(4, ("10.240.0.16/28",))]
    assert host.pool.sync().released == []                   # at the target: kept


def test_a_prefix_that_just_handed_out_an_address_is_kept_until_the_ipam_records_it(tmp_path):
    host = Host(tmp_path, warm_prefixes=0, prefix_cooldown=0.0)
    taken = host.pool.take_address(4)               # not recorded yet: the IPAM writes it right after
    assert host.pool.sync().released == []
    host.clock.now += TAKE_GRACE + 1                # never recorded (the container start failed): it goes
    assert host.pool.sync().released == [taken.prefix]
    assert host.held() == [] and host.on_interface() == []


def test_a_prefix_in_use_is_never_released_whatever_the_cooldown(tmp_path):
    host = Host(tmp_path, warm_prefixes=0, prefix_cooldown=0.0)
    address = host.take()
    host.clock.now += 3600
    assert host.pool.sync().released == [] and inside(address, host.held()[0])


def test_prefixes_vpcnet_did_not_assign_are_never_taken_from_or_released(tmp_path):
    host = Host(tmp_path, warm_prefixes=0, prefix_cooldown=0.0)
    foreign = host.provider.inner.assign(4, 1, "someone-else")
    host.clock.now += 3600
    assert host.pool.sync().released == [] and host.on_interface() == foreign
    taken = host.pool.take_address(4)
    assert taken.assigned and not inside(taken.address, foreign[0])
    assert host.held() == list(taken.assigned)


def test_a_prefix_removed_behind_vpcnet_s_back_is_forgotten_and_replaced(host, caplog):
    host.pool.sync()
    host.provider.inner.unassign(4, ["10.240.0.0/28"])
    host.clock.now += 1                             # a listing may lag behind an assign: not gone yet
    assert host.pool.sync().gone == [] and host.held() == ["10.240.0.0/28"]
    host.clock.now += LISTING_LAG
    with caplog.at_level(logging.ERROR, logger="vpcnet.routes.prefixes"):
        result = host.pool.sync()
    assert result.gone == ["10.240.0.0/28"] and len(result.assigned) == 1
    assert "no longer on this host's interface" in caplog.text
    assert host.held() == result.assigned


def test_no_address_is_taken_from_a_prefix_being_given_back(tmp_path):
    host = Host(tmp_path, warm_prefixes=0, prefix_cooldown=0.0)
    host.pool.sync()
    first = host.pool.take_address(4)
    host.clock.now += TAKE_GRACE + 1
    host.store.prefix_use("ipv4", host.clock.now)          # a pass finds it unused (never recorded)
    # the release's transaction has marked it; its unassign has not been answered yet
    assert host.store.begin_release("ipv4", [first.prefix], host.clock.now, host.clock.now) == [first.prefix]
    taken = host.pool.take_address(4)
    assert taken.prefix != first.prefix and taken.assigned == (taken.prefix,)
    assert host.pool.sync().released == [first.prefix]     # the next pass finishes the release
    assert host.held() == [taken.prefix]


def test_a_pass_starts_no_cloud_call_after_its_time_budget(tmp_path):
    host = Host(tmp_path)
    readings = itertools.count(0.0, PASS_BUDGET + 1)        # a slow pass: each reading a budget later
    host.pool._monotonic = lambda: next(readings)
    result = host.pool.sync()
    assert "time budget" in result.problems[0] and host.provider.assigns == []
    assert dict(result.calls) == {"describe": 1, "capacity": 1}


# -- no free prefix: growth pauses ---------------------------------------------------------------------------
def test_no_free_prefix_pauses_growth_for_120_s_said_once_with_the_fix(tmp_path, caplog):
    clock = Clock()
    other = Host(tmp_path, "h2", clock, warm_prefixes=10)
    other.pool.sync()
    other.provider.inner.assign(4, 5, "more")       # the other host holds 15 of the 16 /28s
    other.pool.config = other.config.replace(warm_prefixes=0, prefix_cooldown=0.0)
    host = Host(tmp_path, "h1", clock, warm_prefixes=2)
    with caplog.at_level(logging.INFO, logger="vpcnet.routes.prefixes"):
        first = host.pool.sync()                    # asks for 2, one is left: refused whole
        assert first.paused and "VPCNET_CLUSTER_CIDR" in first.paused[4] and host.held() == []
        clock.now += NO_FREE_PAUSE - 1
        second = host.pool.sync()
        assert "assign" not in second.calls and 4 in second.paused
        with pytest.raises(NoFreePrefix) as info:
            host.pool.take_address(4)               # no cloud call while paused
        assert "no free IPv4 address for a container" in str(info.value) and "paused" in str(info.value)
        assert len(host.provider.assigns) == 1
        clock.now += 2
        host.pool.sync()                            # the pause is over: one try, refused again
        assert len(host.provider.assigns) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "paused" in r.getMessage()]
    assert len(warnings) == 1, caplog.text           # said once: the second pause is an INFO line
    assert "VPCNET_CLUSTER_CIDR" in warnings[0].getMessage()
    other.pool.sync()                               # the other host gives 10 back (unused, no cooldown)
    clock.now += NO_FREE_PAUSE + 1
    result = host.pool.sync()
    assert len(result.assigned) == 2 and not result.paused and host.pool.status().families[0].paused_until is None


# -- the interface is full -----------------------------------------------------------------------------------
def test_a_full_interface_stops_growth_without_a_call_and_a_container_gets_a_clear_error(tmp_path):
    host = Host(tmp_path, warm_prefixes=3)
    host.provider.inner.assign(4, 10, "foreign-1")
    host.provider.inner.assign(4, 4, "foreign-2")   # 14 of 15 slots taken by prefixes vpcnet did not assign
    assert host.pool.sync().assigned == ["10.240.0.224/28"]
    result = host.pool.sync()
    assert result.full == [4] and "assign" not in result.calls and result.ok
    for _ in range(16):
        host.take()
    with pytest.raises(InterfaceFull) as info:
        host.pool.take_address(4)
    message = str(info.value)
    assert message.startswith("no free IPv4 address for a container on this host")
    assert "larger instance type" in message
    assert len(host.provider.assigns) == 1
    status = host.pool.status().families[0]
    assert (status.capacity, status.room, status.addresses_in_use, status.addresses_free) == (15, 0, 16, 0)


def test_interface_full_from_the_cloud_is_said_to_the_container(tmp_path):
    host = Host(tmp_path, warm_prefixes=0)
    host.pool._capacity = PrefixCapacity("bigger-than-true", 40, 1)   # the cloud knows better: it refuses
    host.provider.inner.assign(4, 10, "f1")
    host.provider.inner.assign(4, 5, "f2")
    with pytest.raises(InterfaceFull, match="^no free IPv4 address for a container on this host: interface"):
        host.pool.take_address(4)
    assert host.store.assign_records() == []        # refused: nothing in flight


class Described(Counting):
    """The real provider, with what a cloud adds: secondary private addresses on the interface, an instance
    type without prefixes, or a busy answer to assigns."""

    def __init__(self, inner: PrefixProvider, secondary: int = 0, unsupported: bool = False, busy: bool = False):
        super().__init__(inner)
        self.secondary, self.unsupported, self.busy = secondary, unsupported, busy

    def describe(self) -> InterfacePrefixes:
        seen = self.inner.describe()
        return InterfacePrefixes(seen.interface_id, seen.ipv4, seen.ipv6, ipv4_addresses=1 + self.secondary)

    def capacity(self, held: InterfacePrefixes | None = None) -> PrefixCapacity:
        if self.unsupported:
            raise PrefixesUnsupported("instance type t2.micro is not built on Nitro: only Nitro instances hold "
                                      "prefixes; use a Nitro instance type")
        return self.inner.capacity(held)

    def assign(self, version: int, count: int, client_token: str) -> list[str]:
        if self.busy:
            self.assigns.append((version, count, client_token))
            raise Busy("Throttling: the request was denied due to request throttling; try again")
        return super().assign(version, count, client_token)


def test_secondary_private_addresses_take_prefix_slots(tmp_path):
    host = Host(tmp_path, warm_prefixes=10)
    host.pool._provider = host.provider = Described(host.provider.inner, secondary=9)
    result = host.pool.sync()                       # 15 slots less 9 secondary addresses: 6 prefixes
    assert len(result.assigned) == 6 and [n for _, n, _ in host.provider.assigns] == [6]
    assert host.pool.sync().full == [4]


def test_an_instance_without_prefixes_says_so_in_the_pass_and_to_the_container(tmp_path):
    host = Host(tmp_path)
    host.pool._provider = host.provider = Described(host.provider.inner, unsupported=True)
    result = host.pool.sync()
    assert "cannot hold prefixes" in result.problems[0] and "Nitro" in result.problems[0]
    with pytest.raises(PrefixesUnsupported, match="^no free IPv4 address for a container on this host: .*Nitro"):
        host.pool.take_address(4)
    assert host.provider.assigns == [] and host.pool.status().supported is False


def test_a_throttled_synchronous_assign_is_a_busy_answer_settled_by_the_next_pass(tmp_path):
    host = Host(tmp_path, warm_prefixes=0)
    host.pool._provider = host.provider = Described(host.provider.inner, busy=True)
    with pytest.raises(Busy, match="^no free IPv4 address for a container on this host: Throttling"):
        host.pool.take_address(4)
    assert len(host.provider.assigns) == 1          # one call, no retry loop in a container start
    host.provider.busy = False
    result = host.pool.sync()                       # nothing appeared: asked again with the same token
    tokens = {token for _, _, token in host.provider.assigns}
    assert len(host.provider.assigns) == 2 and len(tokens) == 1
    assert result.adopted == host.held() == host.on_interface() and host.store.assign_records() == []


def test_a_release_whose_answer_was_lost_is_finished_by_the_next_pass(tmp_path):
    host = Host(tmp_path, warm_prefixes=0, prefix_cooldown=0.0)
    taken = host.pool.take_address(4)
    host.clock.now += TAKE_GRACE + 1
    host.store.prefix_use("ipv4", host.clock.now)
    host.store.begin_release("ipv4", [taken.prefix], host.clock.now, host.clock.now)
    host.provider.inner.unassign(4, [taken.prefix])   # the unassign landed; vpcnet died before forgetting it
    result = host.pool.sync()
    assert result.released == [taken.prefix] and result.gone == [] and host.held() == []
    assert host.provider.unassigns == []


# -- a lost answer ---------------------------------------------------------------------------------------------
class LostAnswer(Counting):
    """A cloud without client tokens (AWS AssignPrivateIpAddresses): the first assign takes effect, and its
    answer is lost on the way back (a timeout), so the caller cannot know what it got."""

    idempotent_assign = False

    def __init__(self, inner: PrefixProvider, happens: bool = True):
        super().__init__(inner)
        self.idempotent_assign = False
        self.happens = happens

    def assign(self, version: int, count: int, client_token: str) -> list[str]:
        if self.assigns:
            return super().assign(version, count, client_token)
        self.assigns.append((version, count, client_token))
        if self.happens:
            self.inner.assign(version, count, client_token)
        raise Retryable("read timeout: the answer was lost")


def test_a_lost_answer_ends_with_exactly_the_new_prefix_adopted_and_no_second_assign(host):
    host.provider.inner.assign(4, 1, "foreign")    # on the interface before, not vpcnet's
    host.pool._provider = host.provider = LostAnswer(host.provider.inner)
    first = host.pool.sync()
    assert not first.ok and "answer was lost" in first.problems[0]
    assert host.held() == [] and len(host.store.assign_records()) == 1
    second = host.pool.sync()
    assert second.adopted == ["10.240.0.16/28"] and second.assigned == [] and second.ok
    assert host.held() == ["10.240.0.16/28"] and host.store.assign_records() == []
    assert len(host.provider.assigns) == 1
    assert host.pool.sync().assigned == [] and len(host.provider.assigns) == 1
    assert host.on_interface() == ["10.240.0.0/28", "10.240.0.16/28"]


def test_a_lost_assign_that_did_not_happen_is_forgotten_and_made_again(host):
    host.pool._provider = host.provider = LostAnswer(host.provider.inner, happens=False)
    host.pool.sync()
    second = host.pool.sync()
    assert second.adopted == [] and second.assigned == ["10.240.0.0/28"]
    assert host.held() == host.on_interface() == ["10.240.0.0/28"] and host.store.assign_records() == []


def test_more_prefixes_than_asked_appearing_after_a_lost_answer_are_not_adopted(host):
    host.pool._provider = host.provider = LostAnswer(host.provider.inner)
    host.pool.sync()
    host.provider.inner.assign(4, 1, "someone-else")   # another tool assigns meanwhile
    result = host.pool.sync()
    assert result.adopted == [] and "something else assigns prefixes" in " ".join(result.problems)
    assert host.store.assign_records() == []


class LaggingListing(Counting):
    """A cloud with client tokens (Alibaba ClientToken) whose first answer is lost and whose listing does
    not show the new prefix yet."""

    def __init__(self, inner: PrefixProvider):
        super().__init__(inner)
        self.hidden: set[str] = set()

    def assign(self, version: int, count: int, client_token: str) -> list[str]:
        got = super().assign(version, count, client_token)
        if len(self.assigns) == 1:
            self.hidden.update(got)
            raise Retryable("read timeout: the answer was lost")
        return got

    def describe(self) -> InterfacePrefixes:
        seen = self.inner.describe()
        return InterfacePrefixes(seen.interface_id, tuple(p for p in seen.ipv4 if p not in self.hidden), seen.ipv6)


def test_a_lost_answer_on_a_cloud_with_client_tokens_is_asked_again_with_the_same_token(host):
    host.pool._provider = host.provider = LaggingListing(host.provider.inner)
    host.pool.sync()
    result = host.pool.sync()
    assert result.adopted == ["10.240.0.0/28"] and result.assigned == []
    tokens = [token for _, _, token in host.provider.assigns]
    assert len(tokens) == 2 and tokens[0] == tokens[1]
    assert host.on_interface() == host.held() == ["10.240.0.0/28"]      # assigned once


# -- IPv6: one /80 --------------------------------------------------------------------------------------------
def test_an_ipv6_address_comes_from_the_host_s_one_80_and_its_capacity_is_respected(host):
    taken = host.pool.take_address(6)
    assert taken.assigned == ("fd00:10::/80",) and taken.address == "fd00:10::2"
    host.use(taken.address)
    assert host.pool.families() == [4, 6]
    result = host.pool.sync()                       # the /80 is in use: it is still all this host wants
    assert result.ok and result.full == [] and not any(v == 6 for v, _, _ in host.provider.assigns[1:])
    assert host.take(6) == "fd00:10::3"


def test_the_warm_target_is_ipv4_s_only_the_ipv6_family_is_never_short_while_its_80_is_held(tmp_path):
    host = Host(tmp_path, warm_prefixes=3)
    host.use(host.pool.take_address(6).address)
    assert host.pool.sync().ok
    assert len(host.held(4)) == 3 and host.held(6) == ["fd00:10::/80"]
    v4, v6 = host.pool.status().families
    assert (v4.free_prefixes, v4.short) == (3, False)
    assert (v6.free_prefixes, v6.short, v6.room) == (0, False, 0)
    assert not host.pool.short_of_warm_target(), "the background pass must not run every second for IPv6"
    assert host.pool.sync().full == []
    host.take()                                     # an IPv4 /28 no longer wholly free: IPv4 is short
    assert host.pool.status().families[0].short and host.pool.short_of_warm_target()


def test_a_host_without_its_80_is_short_and_gets_one_and_gives_it_back_once_nothing_needs_it(tmp_path):
    from vpcnet.state.store import Network
    host = Host(tmp_path, warm_prefixes=0)
    with host.store.tx() as db:                     # a dual-stack network: IPv6 is in use, no /80 held yet
        host.store.add_network(db, Network("n" * 64, CLUSTER, CLUSTER, "10.240.0.1", "vpc-nnnnnnnnnnn", 1500, False,
                                           (), cluster_cidr_v6=CLUSTER_V6, addressing="eni-prefix"))
    v4, v6 = host.pool.status().families
    assert not v4.short and v6.short and host.pool.short_of_warm_target()
    result = host.pool.sync()
    assert result.ok and result.assigned == ["fd00:10::/80"] and host.held(4) == []
    assert not host.pool.short_of_warm_target()
    assert host.pool.sync().assigned == [], "never a second /80"
    # the dual-stack network gone and no warm pool wanted: the unused /80 goes after the cooldown, like a /28
    host.store.delete_network("n" * 64)
    host.pool.sync()
    assert host.held(6) == ["fd00:10::/80"], "not before the cooldown"
    host.clock.now += 31
    assert host.pool.sync().released == ["fd00:10::/80"] and host.held(6) == []
    assert not host.pool.short_of_warm_target()


# -- status ---------------------------------------------------------------------------------------------------
def test_status_says_prefixes_addresses_and_room_per_family_without_a_cloud_call(host):
    host.pool.sync()
    for _ in range(3):
        host.take()
    host.pool.sync()
    calls = dict(host.pool.calls)
    status = host.pool.status()
    assert dict(host.pool.calls) == calls
    assert status.interface_id == "lni-h1" and status.instance_type == "local" and status.supported
    (ipv4,) = status.families
    assert ipv4.prefixes == ("10.240.0.0/28", "10.240.0.16/28") and ipv4.releasing == ()
    assert (ipv4.addresses_in_use, ipv4.addresses_free, ipv4.free_prefixes) == (3, 11 + 16, 1)
    assert (ipv4.capacity, ipv4.room, ipv4.paused_until) == (15, 13, None)
    assert json.loads(host.store.get_meta("prefix_interface"))["interface_id"] == "lni-h1"
