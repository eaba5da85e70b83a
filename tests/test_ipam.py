"""IPAM against a real Store and a real RouteKeeper with the local provider (all inside tmp_path)."""
from __future__ import annotations

import ipaddress
import multiprocessing
import os
import threading
import time

import pytest
from fakes import Clock, make_config
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vpcnet.docker import ipam as ipam_module
from vpcnet.docker.ipam import GATEWAY_KEY, REPLAY_WINDOW, REQUEST_TYPE_KEY, Ipam
from vpcnet.errors import Conflict, Exhausted, InvalidRequest, NotFound
from vpcnet.routes.keeper import RouteKeeper
from vpcnet.state.store import Network, Store

GATEWAY_OPTS = {REQUEST_TYPE_KEY: GATEWAY_KEY}


def build(tmp_path, clock=None, **env):
    config = make_config(tmp_path, **env)
    store = Store(config.db_path)
    routes = RouteKeeper(config, store)
    return Ipam(config, store, routes, clock=clock or Clock())


@pytest.fixture
def ipam(tmp_path):
    return build(tmp_path)


@pytest.fixture
def small(tmp_path):
    """A /28 host block: 14 usable addresses, the gateway and 13 for containers."""
    return build(tmp_path / "small", VPCNET_HOST_PREFIX="28")


def ip_of(answer: dict) -> str:
    return answer["Address"].split("/")[0]


# -- capabilities -------------------------------------------------------------------------------------
def test_capabilities(ipam):
    assert ipam.capabilities() == {"RequiresMACAddress": False, "RequiresRequestReplay": True}
    spaces = ipam.default_address_spaces()
    assert set(spaces) == {"LocalDefaultAddressSpace", "GlobalDefaultAddressSpace"}


# -- pools --------------------------------------------------------------------------------------------
def test_default_pool_is_host_block_with_gateway(ipam):
    answer = ipam.request_pool()
    host = ipaddress.IPv4Network(answer["Pool"])
    assert answer["PoolID"] == answer["Pool"]
    assert host.prefixlen == 24 and host.subnet_of(ipaddress.IPv4Network("10.200.0.0/16"))
    assert answer["Data"] == {GATEWAY_KEY: f"{host.network_address + 1}/24"}
    # the claim is recorded and the local route table holds host block -> this instance
    assert ipam.store.claim("10.200.0.0/16").host_cidr == answer["Pool"]
    routes = ipam.routes.provider.list_routes()
    assert [(r.destination, r.next_hop) for r in routes] == [(answer["Pool"], "i-test-host")]


def test_default_pool_again_is_identical(ipam):
    assert ipam.request_pool() == ipam.request_pool()
    assert len(ipam.store.pools()) == 1


def test_subnet_equal_to_cluster_gives_block_inside(ipam):
    answer = ipam.request_pool(pool="10.77.0.0/16")
    assert ipaddress.IPv4Network(answer["Pool"]).subnet_of(ipaddress.IPv4Network("10.77.0.0/16"))
    assert ipaddress.IPv4Network(answer["Pool"]).prefixlen == 24


def test_two_cluster_cidrs_coexist(ipam):
    a = ipam.request_pool()
    b = ipam.request_pool(pool="10.77.0.0/16")
    c = ipam.request_pool(pool="172.20.0.0/20")
    pools = {a["Pool"], b["Pool"], c["Pool"]}
    assert len(pools) == 3
    assert {r["pool_id"] for r in ipam.store.pools()} == pools
    assert {c.cluster_cidr for c in ipam.store.claims()} == {"10.200.0.0/16", "10.77.0.0/16", "172.20.0.0/20"}


def test_replay_of_host_cidr_is_identical(ipam):
    first = ipam.request_pool()
    assert ipam.request_pool(pool=first["Pool"]) == first
    other = ipam.request_pool(pool="10.77.0.0/16")
    assert ipam.request_pool(pool=other["Pool"]) == other


def test_static_host_cidr(tmp_path):
    ipam = build(tmp_path, VPCNET_HOST_CIDR="10.200.42.0/24")
    answer = ipam.request_pool()
    assert answer["Pool"] == "10.200.42.0/24"
    assert answer["Data"][GATEWAY_KEY] == "10.200.42.1/24"


@pytest.mark.parametrize("subnet", ["10.200.9.0/24", "10.200.9.0/25", "192.168.1.0/24"])
def test_subnet_neither_cluster_nor_ours_refused(ipam, subnet):
    ipam.request_pool()
    with pytest.raises(InvalidRequest) as info:
        ipam.request_pool(pool=subnet)
    message = str(info.value)
    assert subnet in message and "neither a cluster CIDR" in message and "omit --subnet" in message


@pytest.mark.parametrize("subnet", ["10.200.0.1/16", "nonsense", "10.200.0.0/40"])
def test_invalid_subnet_refused(ipam, subnet):
    with pytest.raises(InvalidRequest, match="not a valid network"):
        ipam.request_pool(pool=subnet)


@pytest.mark.parametrize("subnet", ["10.200.0.0/17", "10.0.0.0/8", "10.200.128.0/20"])
def test_overlapping_cluster_cidr_refused(ipam, subnet):
    ipam.request_pool()                                     # 10.200.0.0/16 in use
    before = ipam.store.claims()
    with pytest.raises(Conflict, match="overlaps the cluster CIDR 10.200.0.0/16"):
        ipam.request_pool(pool=subnet)
    assert ipam.store.claims() == before


def test_default_cluster_overlapping_a_wider_subnet_in_use_refused(ipam):
    ipam.request_pool(pool="10.0.0.0/8")                   # contains the default 10.200.0.0/16
    with pytest.raises(Conflict, match="overlaps the cluster CIDR 10.0.0.0/8"):
        ipam.request_pool()


def test_subpool_options_and_a_family_mismatch_refused(ipam):
    with pytest.raises(InvalidRequest, match="fd00::/64 is an IPv6 network, asked for an IPv4 pool"):
        ipam.request_pool(pool="fd00::/64")
    with pytest.raises(InvalidRequest, match="10.0.0.0/8 is an IPv4 network, asked for an IPv6 pool"):
        ipam.request_pool(pool="10.0.0.0/8", v6=True)
    with pytest.raises(InvalidRequest, match="--ip-range"):
        ipam.request_pool(sub_pool="10.200.0.0/26")
    with pytest.raises(InvalidRequest, match="unknown --ipam-opt color"):
        ipam.request_pool(options={"color": "blue"})
    with pytest.raises(InvalidRequest, match="address space"):
        ipam.request_pool(address_space="elsewhere")
    assert ipam.store.pools() == []
    assert ipam.request_pool(address_space="vpcnet-local")["Pool"]


def test_release_unknown_pool_succeeds(ipam):
    assert ipam.release_pool("10.9.9.0/24") == {}


def test_a_pool_id_vpcnet_never_answered_is_refused(ipam):
    """Docker only sends back the PoolID RequestPool answered: a host CIDR, canonical."""
    pool = ipam.request_pool()["PoolID"]
    before = ipam.store.pools()
    calls = (ipam.release_pool, ipam.request_address, lambda pool_id: ipam.release_address(pool_id, "10.200.0.5"))
    for bad in ("garbage", "", f"{pool}\n", f" {pool}", "10.200.0.1/24", "10.200.0.0/33", "fd00:0::/64", "FD00::/64",
                "10.200.0.0", "010.200.0.0/24", "x" * 5_000_000):
        for call in calls:
            with pytest.raises(InvalidRequest, match="is not a vpcnet pool id") as info:
                call(bad)
            assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert ipam.store.pools() == before


def test_release_pool_forgets_addresses(ipam):
    pool = ipam.request_pool()["PoolID"]
    ipam.request_address(pool)
    ipam.release_pool(pool)
    assert ipam.store.pools() == [] and ipam.store.addresses(pool) == []
    with pytest.raises(NotFound):
        ipam.request_address(pool)
    # requesting it again gives the same block (the claim stays)
    assert ipam.request_pool()["PoolID"] == pool


def test_release_pool_keeps_pool_used_by_network(ipam):
    answer = ipam.request_pool()
    pool = answer["PoolID"]
    addr = ip_of(ipam.request_address(pool))
    with ipam.store.tx() as db:
        ipam.store.add_network(db, Network("n" * 64, pool, "10.200.0.0/16", "10.200.0.1", "vpc-nnnnnnnnnnn",
                                           1500, False, ()))
    assert ipam.release_pool(pool) == {}
    assert [r["pool_id"] for r in ipam.store.pools()] == [pool]
    assert ipam.store.addresses(pool) == [addr]


INJECTED = "x\n2024-01-01 00:00:00 INFO vpcnet: forged line " + "y" * 100_000


def test_a_refusal_quotes_what_it_was_sent_on_one_short_line(ipam):
    """A message names the value it refuses, escaped and cut: no newline into a log, no 100 kB echo."""
    pool = ipam.request_pool()["PoolID"]
    before = (ipam.store.pools(), ipam.store.claims())
    calls = [lambda: ipam.request_pool(pool=INJECTED), lambda: ipam.request_pool(sub_pool=INJECTED),
             lambda: ipam.request_pool(options={INJECTED: "1"}), lambda: ipam.request_pool(address_space=INJECTED),
             lambda: ipam.request_address(pool, INJECTED), lambda: ipam.release_address(pool, INJECTED),
             lambda: ipam.request_address(pool, INJECTED, options=GATEWAY_OPTS),      # once a 500: a ValueError
             lambda: ipam.release_pool(INJECTED)]
    for call in calls:
        with pytest.raises(InvalidRequest) as info:
            call()
        message = str(info.value)
        assert "'x\\n2024-01-01 00:00:00 INFO vpcnet: forged line" in message, message[:300]
        assert "\n" not in message and len(message) < 300 and f"({len(INJECTED)} characters)" in message, message[:400]
    assert (ipam.store.pools(), ipam.store.claims()) == before


# -- addresses ----------------------------------------------------------------------------------------
def test_gateway_request_answers_gateway(ipam):
    answer = ipam.request_pool()
    pool = answer["PoolID"]
    gateway = answer["Data"][GATEWAY_KEY]
    assert ipam.request_address(pool, options=GATEWAY_OPTS) == {"Address": gateway, "Data": {}}
    assert ipam.request_address(pool, gateway, options=GATEWAY_OPTS) == {"Address": gateway, "Data": {}}
    assert ipam.request_address(pool, gateway.split("/")[0], options=GATEWAY_OPTS)["Address"] == gateway
    assert ipam.store.addresses(pool) == []                # the gateway is not a container address


def test_wrong_gateway_refused(ipam):
    pool = ipam.request_pool()["PoolID"]
    net = ipaddress.IPv4Network(pool)
    with pytest.raises(InvalidRequest, match="not the gateway") as info:
        ipam.request_address(pool, f"{net.network_address + 254}", options=GATEWAY_OPTS)
    assert "omit --gateway" in str(info.value)


def test_first_address_follows_gateway(ipam):
    pool = ipam.request_pool()["PoolID"]
    net = ipaddress.IPv4Network(pool)
    assert ipam.request_address(pool) == {"Address": f"{net.network_address + 2}/24", "Data": {}}
    assert ip_of(ipam.request_address(pool)) == str(net.network_address + 3)


def test_requested_address_honoured(ipam):
    pool = ipam.request_pool()["PoolID"]
    net = ipaddress.IPv4Network(pool)
    want = str(net.network_address + 77)
    assert ipam.request_address(pool, want) == {"Address": f"{want}/24", "Data": {}}
    assert ipam.request_address(pool, str(net.network_address + 78) + "/24")["Address"] == \
        f"{net.network_address + 78}/24"
    assert sorted(ipam.store.addresses(pool)) == sorted([want, str(net.network_address + 78)])


def test_requested_address_refusals(ipam):
    pool = ipam.request_pool()["PoolID"]
    net = ipaddress.IPv4Network(pool)
    taken = ip_of(ipam.request_address(pool))
    before = sorted(ipam.store.addresses(pool))
    cases = {
        "10.9.9.9": (InvalidRequest, "outside pool"),
        str(net.network_address): (InvalidRequest, "network address"),
        str(net.broadcast_address): (InvalidRequest, "broadcast address"),
        str(net.network_address + 1): (InvalidRequest, "gateway"),
        "not-an-ip": (InvalidRequest, "not a valid IPv4 address"),
        taken: (Conflict, f"address {taken} is already in use in pool {pool}"),
    }
    for address, (kind, text) in cases.items():
        with pytest.raises(kind, match=text):
            ipam.request_address(pool, address)
    assert sorted(ipam.store.addresses(pool)) == before


def test_unknown_pool(ipam):
    with pytest.raises(NotFound, match="unknown pool"):
        ipam.request_address("10.1.1.0/24")


def test_next_fit_does_not_reuse_released_address_early(small):
    pool = small.request_pool()["PoolID"]
    first = [ip_of(small.request_address(pool)) for _ in range(5)]
    small.release_address(pool, first[1])
    rest = [ip_of(small.request_address(pool)) for _ in range(8)]    # the 8 never-used ones
    assert first[1] not in rest
    assert len(set(first + rest)) == 13
    assert ip_of(small.request_address(pool)) == first[1]              # only now, after a full turn


def test_released_address_comes_back_after_full_turn_in_cursor_order(small):
    pool = small.request_pool()["PoolID"]
    got = [ip_of(small.request_address(pool)) for _ in range(13)]
    small.release_address(pool, got[9])
    small.release_address(pool, got[2])
    assert ip_of(small.request_address(pool)) == got[2]    # the cursor wrapped to the start
    assert ip_of(small.request_address(pool)) == got[9]


def test_exhaustion_says_how_many_in_use(small):
    pool = small.request_pool()["PoolID"]
    got = {ip_of(small.request_address(pool)) for _ in range(13)}
    assert len(got) == 13
    with pytest.raises(Exhausted) as info:
        small.request_address(pool)
    assert f"pool {pool} is exhausted" in str(info.value) and "13" in str(info.value)
    assert len(small.store.addresses(pool)) == 13


def test_release_unknown_address_succeeds(ipam):
    pool = ipam.request_pool()["PoolID"]
    assert ipam.release_address(pool, "10.200.0.99/24") == {}
    assert ipam.release_address("10.123.0.0/24", "10.123.0.5") == {}
    ip = ip_of(ipam.request_address(pool))
    assert ipam.release_address(pool, ip + "/24") == {}
    assert ipam.release_address(pool, ip) == {}             # twice: still fine
    assert ipam.store.addresses(pool) == []


# -- replays ------------------------------------------------------------------------------------------
def test_replay_window(tmp_path):
    clock = Clock()
    ipam = build(tmp_path, clock=clock)
    pool = ipam.request_pool()["PoolID"]
    a = ipam.request_address(pool)
    b = ipam.request_address(pool, "10.200.0.50")
    with pytest.raises(Conflict):                           # no window open: in use
        ipam.request_address(pool, ip_of(a))

    ipam.open_replay_window()                               # Plugin.Activate after a daemon restart
    assert ipam.request_pool(pool=pool)["PoolID"] == pool
    assert ipam.request_address(pool, a["Address"]) == a    # identical answers
    assert ipam.request_address(pool, ip_of(b)) == b
    with pytest.raises(Conflict, match="already in use"):   # once only
        ipam.request_address(pool, ip_of(a))

    clock.now += REPLAY_WINDOW + 1                          # window closed
    ipam.open_replay_window()
    clock.now += REPLAY_WINDOW + 1
    with pytest.raises(Conflict):
        ipam.request_address(pool, ip_of(a))
    assert sorted(ipam.store.addresses(pool)) == sorted([ip_of(a), ip_of(b)])


def test_replay_window_reopens_for_next_restart(tmp_path):
    clock = Clock()
    ipam = build(tmp_path, clock=clock)
    pool = ipam.request_pool()["PoolID"]
    a = ipam.request_address(pool)
    for _ in range(3):                                      # three daemon restarts
        clock.now += 1000
        ipam.open_replay_window()
        assert ipam.request_pool(pool=pool)["PoolID"] == pool     # Docker replays the pool first
        assert ipam.request_address(pool, a["Address"]) == a
        with pytest.raises(Conflict):
            ipam.request_address(pool, a["Address"])


def test_address_allocated_inside_window_is_not_replayable(tmp_path):
    """A container started during the replay window gets an address; a `--ip` for that same address a
    moment later must be refused, not treated as a replay (that would hand out a duplicate)."""
    clock = Clock()
    ipam = build(tmp_path, clock=clock)
    pool = ipam.request_pool()["PoolID"]
    ipam.open_replay_window()
    ipam.request_pool(pool=pool)
    requested = ip_of(ipam.request_address(pool, "10.200.0.99"))
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool, requested)
    fresh = ip_of(ipam.request_address(pool))
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool, fresh)


def restarted(ipam, pool: str) -> None:
    """What Docker sends at a daemon start: Plugin.Activate, then RequestPool naming the pool."""
    ipam.open_replay_window()
    assert ipam.request_pool(pool=pool)["PoolID"] == pool


def test_the_replay_window_runs_on_the_boot_clock_not_the_wall_clock(tmp_path, monkeypatch):
    """An NTP step or `date -s` (time.time jumping a day either way) neither closes nor opens the window;
    only CLOCK_BOOTTIME moving past it closes it. Stored with the boot id, beside the deadline."""
    ipam = build(tmp_path)
    ipam.clock = ipam_module.boot_clock                     # the real clock, as `vpcnet serve` builds it
    pool = ipam.request_pool()["PoolID"]
    a, b = ip_of(ipam.request_address(pool)), ip_of(ipam.request_address(pool))
    restarted(ipam, pool)
    with open("/proc/sys/kernel/random/boot_id") as fh:
        assert ipam.store.get_meta("replay_boot") == fh.read().strip()
    until = float(ipam.store.get_meta("replay_until"))
    assert 0 < until - time.clock_gettime(time.CLOCK_BOOTTIME) <= REPLAY_WINDOW
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall + 86400)          # stepped a day forward
    assert ip_of(ipam.request_address(pool, a)) == a                  # still open
    monkeypatch.setattr(time, "time", lambda: wall - 86400)          # and a day back
    boottime = time.clock_gettime(time.CLOCK_BOOTTIME)
    real_gettime = time.clock_gettime
    monkeypatch.setattr(time, "clock_gettime", lambda clk: real_gettime(clk) + (
        REPLAY_WINDOW + 1 if clk == time.CLOCK_BOOTTIME else 0))       # the boot clock moved past it
    assert boottime + REPLAY_WINDOW + 1 > until
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool, b)
    ipam.store.close()


def test_a_window_from_an_earlier_boot_is_closed(tmp_path):
    """After a reboot the boot clock starts again near 0, under the old deadline: the boot id tells."""
    clock = Clock(now=5000.0, boot="boot-1")
    ipam = build(tmp_path, clock=clock)
    pool = ipam.request_pool()["PoolID"]
    a = ip_of(ipam.request_address(pool))
    restarted(ipam, pool)
    clock.boot, clock.now = "boot-2", 30.0                  # rebooted: 30 s since boot < the deadline
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool, a)
    restarted(ipam, pool)                                   # Docker starts on the new boot: a new window
    assert ip_of(ipam.request_address(pool, a)) == a


def test_activate_inside_an_open_window_neither_extends_nor_rearms_it(tmp_path):
    """A second Plugin.Activate (Docker re-activating, or any local process) cannot let an address be
    replayed twice, and cannot keep the window open past REPLAY_WINDOW after the first."""
    clock = Clock()
    ipam = build(tmp_path, clock=clock)
    pool = ipam.request_pool()["PoolID"]
    a, b = ip_of(ipam.request_address(pool)), ip_of(ipam.request_address(pool))
    restarted(ipam, pool)
    assert ip_of(ipam.request_address(pool, a)) == a
    for _ in range(3):
        clock.now += REPLAY_WINDOW / 4
        assert ipam.open_replay_window() is False
        ipam.request_pool(pool=pool)
        with pytest.raises(Conflict, match="already in use"):
            ipam.request_address(pool, a)                   # not re-armed
    clock.now += REPLAY_WINDOW / 4 + 1                      # REPLAY_WINDOW + 1 after the first Activate
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool, b)                       # not extended
    assert ipam.open_replay_window() is True                # the next restart gets its own window
    ipam.request_pool(pool=pool)
    assert ip_of(ipam.request_address(pool, b)) == b


def test_activate_without_a_pool_replay_replays_nothing(tmp_path):
    """`docker plugin enable` or a restart of vpcnet activates the plugin without a daemon restart: Docker
    replays no pool, so a `docker run --ip` for an address in use is refused, not taken as a replay."""
    clock = Clock()
    ipam = build(tmp_path, clock=clock)
    pool = ipam.request_pool()["PoolID"]
    a = ip_of(ipam.request_address(pool))
    ipam.open_replay_window()
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool, a)


def test_new_work_closes_the_window_so_a_second_restart_gets_its_own(tmp_path):
    """Docker asks for a new address only after its replays: the window closes then, and a daemon
    restarted again a minute later replays into a fresh window."""
    clock = Clock()
    ipam = build(tmp_path, clock=clock)
    pool = ipam.request_pool()["PoolID"]
    a, b = ip_of(ipam.request_address(pool)), ip_of(ipam.request_address(pool))
    restarted(ipam, pool)
    assert ip_of(ipam.request_address(pool, a)) == a
    ipam.request_address(pool)                              # a new container
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool, b)                       # closed early
    clock.now += 60
    restarted(ipam, pool)
    assert ip_of(ipam.request_address(pool, a)) == a and ip_of(ipam.request_address(pool, b)) == b


# -- property tests -----------------------------------------------------------------------------------
_counter = iter(range(10**9))


class AllocationMachine(RuleBasedStateMachine):
    """Random sequences of request/release/replay against a model of the in-use set of a /28."""

    def __init__(self):
        super().__init__()
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="vpcnet-ipam-")
        from pathlib import Path

        self.clock = Clock()
        self.ipam = build(Path(self._dir.name), clock=self.clock, VPCNET_HOST_PREFIX="28")
        answer = self.ipam.request_pool()
        self.pool = answer["PoolID"]
        self.net = ipaddress.IPv4Network(self.pool)
        self.gateway = str(self.net.network_address + 1)
        self.in_use: set[str] = set()
        self.handed: list[str] = []           # every address handed out, in order (for next-fit)
        self.replayable: set[str] = set()     # may be replayed in the open window
        self.usable = [str(a) for a in self.net.hosts() if str(a) != self.gateway]

    def teardown(self):
        self.ipam.store.close()
        self._dir.cleanup()

    def stored(self) -> set[str]:
        return set(self.ipam.store.addresses(self.pool))

    @rule()
    def request_any(self):
        self.replayable = set()               # new work: Docker's replays are over, the window closes
        if len(self.in_use) == len(self.usable):
            with pytest.raises(Exhausted):
                self.ipam.request_address(self.pool)
            return
        answer = self.ipam.request_address(self.pool)
        ip = ip_of(answer)
        assert answer["Address"] == f"{ip}/28"
        assert ip not in self.in_use, f"duplicate {ip}"
        assert ip in self.usable
        self.in_use.add(ip)
        self.handed.append(ip)

    @rule(data=st.data())
    def request_specific(self, data):
        ip = data.draw(st.sampled_from(self.usable))
        if ip in self.in_use:
            if ip in self.replayable:
                assert self.ipam.request_address(self.pool, ip) == {"Address": f"{ip}/28", "Data": {}}
                self.replayable.discard(ip)
            else:
                with pytest.raises(Conflict):
                    self.ipam.request_address(self.pool, ip)
            return
        assert ip_of(self.ipam.request_address(self.pool, ip)) == ip
        self.in_use.add(ip)

    @precondition(lambda self: self.in_use)
    @rule(data=st.data())
    def release(self, data):
        ip = data.draw(st.sampled_from(sorted(self.in_use)))
        before = self.stored()
        self.ipam.release_address(self.pool, ip)
        after = self.stored()
        assert after == before - {ip}                    # exact: only X went, and X is free
        self.in_use.discard(ip)
        self.replayable.discard(ip)

    @rule(data=st.data())
    def release_free(self, data):
        ip = data.draw(st.sampled_from(self.usable))
        if ip in self.in_use:
            return
        before = self.stored()
        assert self.ipam.release_address(self.pool, ip) == {}
        assert self.stored() == before

    @rule()
    def daemon_restart(self):
        self.clock.now += REPLAY_WINDOW + 1
        self.ipam.open_replay_window()
        self.replayable = set(self.in_use)
        assert self.ipam.request_pool(pool=self.pool)["PoolID"] == self.pool

    @rule()
    def window_closes(self):
        self.clock.now += REPLAY_WINDOW + 1
        self.replayable = set()

    @invariant()
    def allocations_equal_model(self):
        assert self.stored() == self.in_use
        assert self.gateway not in self.stored()


TestAllocationMachine = AllocationMachine.TestCase
TestAllocationMachine.settings = settings(max_examples=50, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])


def test_next_fit_property(tmp_path):
    """Deterministic sweep: across random-ish release patterns, a released address is handed out only
    after every never-used address of the pool has been."""
    ipam = build(tmp_path, VPCNET_HOST_PREFIX="28")
    pool = ipam.request_pool()["PoolID"]
    got = [ip_of(ipam.request_address(pool)) for _ in range(6)]
    for ip in got[::2]:
        ipam.release_address(pool, ip)
    later = [ip_of(ipam.request_address(pool)) for _ in range(7)]   # the 7 never used
    assert not set(later) & set(got)
    assert [ip_of(ipam.request_address(pool)) for _ in range(3)] == got[::2]


# -- concurrency --------------------------------------------------------------------------------------
def test_threads_never_get_the_same_address(tmp_path):
    ipam = build(tmp_path)
    pool = ipam.request_pool()["PoolID"]
    threads, per_thread = 24, 5
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker():
        try:
            start.wait(timeout=10)
            mine = [ip_of(ipam.request_address(pool)) for _ in range(per_thread)]
            with lock:
                results.extend(mine)
        except BaseException as exc:      # noqa: BLE001
            errors.append(exc)
        finally:
            ipam.store.close()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not errors
    assert len(results) == threads * per_thread
    assert len(set(results)) == len(results)
    assert set(ipam.store.addresses(pool)) == set(results)


def test_threads_racing_for_one_requested_address(tmp_path):
    ipam = build(tmp_path)
    pool = ipam.request_pool()["PoolID"]
    wins, losses = [], []
    start = threading.Barrier(20)

    def worker():
        start.wait(timeout=10)
        try:
            wins.append(ipam.request_address(pool, "10.200.0.123"))
        except Conflict:
            losses.append(1)
        finally:
            ipam.store.close()

    workers = [threading.Thread(target=worker) for _ in range(20)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert len(wins) == 1 and len(losses) == 19


def _process_worker(state_dir: str, socket: str, count: int, out, barrier) -> None:
    environ = {"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": state_dir, "VPCNET_SOCKET": socket,
               "VPCNET_INSTANCE_ID": "i-test-host"}
    from vpcnet import config as config_mod

    config = config_mod.load(environ=environ)
    store = Store(config.db_path)
    ipam = Ipam(config, store, RouteKeeper(config, store))
    pool = ipam.request_pool()["PoolID"]              # the same pool: the claim is in the shared store
    barrier.wait(timeout=30)                           # all four request at once
    got = [ipam.request_address(pool)["Address"] for _ in range(count)]
    store.close()
    out.put((pool, got))


def test_processes_never_get_the_same_address(tmp_path):
    config = make_config(tmp_path)
    pool = build(tmp_path).request_pool()["PoolID"]
    ctx = multiprocessing.get_context("fork")     # each child opens its own Store
    out, barrier = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=_process_worker, args=(config.state_dir, config.socket, 25, out, barrier))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    addresses = [a for _, got in results for a in got]
    assert {p for p, _ in results} == {pool}
    assert len(addresses) == 100 and len(set(addresses)) == 100


def _pool_worker(state_dir: str, socket: str, out, barrier) -> None:
    environ = {"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": state_dir, "VPCNET_SOCKET": socket,
               "VPCNET_INSTANCE_ID": "i-test-host"}
    from vpcnet import config as config_mod

    config = config_mod.load(environ=environ)
    store = Store(config.db_path)
    ipam = Ipam(config, store, RouteKeeper(config, store))
    barrier.wait(timeout=30)
    pool = ipam.request_pool()                          # first claim, raced by four workers
    address = ipam.request_address(pool["PoolID"])["Address"]
    store.close()
    out.put((pool, address))


def test_processes_racing_for_the_first_pool_agree(tmp_path):
    """Four gunicorn-like workers on a fresh state dir all ask for the default pool at once: one claim,
    one route, one identical answer for all, and still distinct addresses."""
    config = make_config(tmp_path)
    os.makedirs(config.state_dir, exist_ok=True)
    Store(config.db_path).close()                       # the master creates the schema before forking
    ctx = multiprocessing.get_context("fork")
    out, barrier = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=_pool_worker, args=(config.state_dir, config.socket, out, barrier))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    pools = [pool for pool, _ in results]
    assert all(p == pools[0] for p in pools)
    assert len({a for _, a in results}) == 4
    routes = RouteKeeper(config, Store(config.db_path)).provider.list_routes()
    assert [r.destination for r in routes] == [pools[0]["Pool"]]


def test_allocation_reads_the_pool_outside_the_write_lock(tmp_path):
    """Inside BEGIN IMMEDIATE .. COMMIT (which every other writer of the host waits for) an allocation runs
    a bounded number of indexed statements: never a read of the whole pool's addresses."""
    ipam = build(tmp_path)
    pool = ipam.request_pool()["PoolID"]
    for _ in range(20):
        ipam.request_address(pool)
    statements: list[str] = []
    ipam.store._conn().set_trace_callback(statements.append)
    ipam.request_address(pool)
    ipam.store._conn().set_trace_callback(None)
    begin = statements.index("BEGIN IMMEDIATE")
    inside = statements[begin:statements.index("COMMIT", begin)]
    assert not [s for s in inside if "FROM addresses" in s], inside
    assert len(inside) <= 4, inside


# -- a pool released while an address is taken from it ------------------------------------------------------
@pytest.mark.parametrize("wanted", ["next", "requested"])
def test_a_pool_released_while_an_address_is_taken_is_a_clear_not_found(ipam, monkeypatch, wanted):
    """ReleasePool lands between RequestAddress's first look at the pool and its transaction: a 404 naming
    the pool (not a TypeError or a foreign-key error, which would be a 500), and nothing is written."""
    pool = ipam.request_pool()["PoolID"]
    address = str(ipaddress.IPv4Network(pool).network_address + 7) if wanted == "requested" else ""
    window = ipam._replay_window

    def released_meanwhile():
        ipam.release_pool(pool)
        return window()

    monkeypatch.setattr(ipam, "_replay_window", released_meanwhile)
    with pytest.raises(NotFound, match=f"pool {pool} was released meanwhile"):
        ipam.request_address(pool, address)
    assert ipam.store.pools() == [] and ipam.store.addresses(pool) == []


def test_a_pool_replayed_as_its_subnet_cluster_cidr_makes_its_addresses_replayable(tmp_path):
    """A network made with `--subnet <cluster CIDR>` is replayed in that form (Docker keeps the user's
    subnet), not as the block this host answered: it counts as the pool's replay all the same."""
    clock = Clock()
    ipam = build(tmp_path, clock=clock)
    cluster = "10.77.0.0/16"
    pool = ipam.request_pool(pool=cluster)["PoolID"]
    a = ip_of(ipam.request_address(pool))
    assert ipam.open_replay_window() is True
    assert ipam.request_pool(pool=cluster)["PoolID"] == pool
    assert ip_of(ipam.request_address(pool, a)) == a


# -- IPv6 pools and addresses -----------------------------------------------------------------------
def test_v6_default_pool_is_this_hosts_block_of_the_derived_ula(ipam):
    answer = ipam.request_pool(v6=True)
    host = ipaddress.IPv6Network(answer["Pool"])
    cluster = ipaddress.IPv6Network(ipam.config.default_cluster_cidr_v6)
    assert cluster.prefixlen == 48 and cluster.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    assert answer["PoolID"] == answer["Pool"] and host.prefixlen == 80 and host.subnet_of(cluster)
    assert answer["Data"] == {GATEWAY_KEY: f"{host.network_address + 1}/80"}
    # the same call again (Docker's replay, in either form) answers the same; the v4 pool is apart
    assert ipam.request_pool(v6=True) == answer == ipam.request_pool(pool=answer["Pool"], v6=True)
    v4 = ipam.request_pool()
    assert ipaddress.ip_network(v4["Pool"]).version == 4
    assert {c.cluster_cidr: c.host_cidr for c in ipam.store.claims()} == {
        "10.200.0.0/16": v4["Pool"], str(cluster): answer["Pool"]}
    # both blocks are this host's routes in the (local) route table, each of its own cluster identity
    routes = {r.destination: r for r in ipam.routes.provider.list_routes()}
    assert set(routes) == {v4["Pool"], answer["Pool"]}
    assert routes[answer["Pool"]].cluster == str(cluster).replace("/", "-").replace(":", ".")


def test_v6_cluster_cidr_setting_and_subnet(tmp_path):
    ipam = build(tmp_path, VPCNET_CLUSTER_CIDR_V6="fd00:aa::/48", VPCNET_HOST_PREFIX_V6="64")
    answer = ipam.request_pool(v6=True)
    assert ipaddress.IPv6Network(answer["Pool"]).subnet_of(ipaddress.IPv6Network("fd00:aa::/48"))
    assert answer["Pool"].endswith("/64")
    other = ipam.request_pool(pool="fd00:bb::/56", v6=True)       # --subnet: an IPv6 cluster CIDR
    assert ipaddress.IPv6Network(other["Pool"]).subnet_of(ipaddress.IPv6Network("fd00:bb::/56"))
    with pytest.raises(Conflict, match="overlaps the cluster CIDR fd00:bb::/56"):
        ipam.request_pool(pool="fd00:bb::/52", v6=True)
    with pytest.raises(InvalidRequest, match="neither a cluster CIDR"):
        ipam.request_pool(pool="fd00:cc::/64", v6=True)
    with pytest.raises(InvalidRequest, match="not a valid network"):
        ipam.request_pool(pool="fd00:cc::1/48", v6=True)


def test_v6_size_only_subnet_gets_the_default_block_or_a_clear_refusal(ipam):
    """Docker 29 sends `--subnet ::/96` to a remote IPAM as the pool "::/96"."""
    answer = ipam.request_pool(pool="::/96", v6=True)
    assert answer == ipam.request_pool(v6=True)
    before = ipam.store.claims()
    for pool in ("::/64", "::/0"):
        with pytest.raises(InvalidRequest, match=r"vpcnet gives each host one /80 block.*::/80 or longer"):
            ipam.request_pool(pool=pool, v6=True)
    assert ipam.store.claims() == before


def test_v6_addresses_next_fit_as_128s_ip6_and_no_duplicate(ipam):
    pool = ipam.request_pool(v6=True)["PoolID"]
    host = ipaddress.IPv6Network(pool)
    gw = ipam.request_address(pool, options=GATEWAY_OPTS)
    assert gw["Address"] == f"{host.network_address + 1}/80"
    first, second = (ipam.request_address(pool)["Address"] for _ in range(2))
    assert (first, second) == (f"{host.network_address + 2}/128", f"{host.network_address + 3}/128")
    wanted = str(host.network_address + 0xabcd)                      # docker run --ip6
    assert ipam.request_address(pool, address=wanted)["Address"] == f"{wanted}/128"
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool, address=wanted)
    with pytest.raises(Conflict, match="already in use"):             # any spelling of the same address
        ipam.request_address(pool, address=ipaddress.IPv6Address(wanted).exploded)
    ipam.release_address(pool, first)
    third = ip_of(ipam.request_address(pool))                         # next-fit: not the one just released
    assert third == str(host.network_address + 4)
    for bad, why in ((str(host.network_address), "subnet-router anycast"), (str(host.network_address + 1),
                     "gateway"), ("fd00:ffff::5", "outside pool"), ("10.200.0.5", "not a valid IPv6 address"),
                     ("zz::1", "not a valid IPv6 address")):
        with pytest.raises(InvalidRequest, match=why):
            ipam.request_address(pool, address=bad)
    assert sorted(ipam.store.addresses(pool)) == sorted(str(host.network_address + k) for k in (3, 4, 0xabcd))


def test_v6_small_block_exhausts_wraps_and_leaves_nothing_half_written(tmp_path):
    ipam = build(tmp_path, VPCNET_HOST_PREFIX_V6="120")          # 256 addresses: 254 for containers
    pool = ipam.request_pool(v6=True)["PoolID"]
    got = [ip_of(ipam.request_address(pool)) for _ in range(254)]
    assert len(set(got)) == 254
    with pytest.raises(Exhausted, match="all 254 container addresses are in use"):
        ipam.request_address(pool)
    assert len(ipam.store.addresses(pool)) == 254
    ipam.release_address(pool, got[100])
    assert ip_of(ipam.request_address(pool)) == got[100]          # after the wrap, the one free address


def test_v6_concurrent_requests_never_share_an_address(tmp_path):
    ipam = build(tmp_path)
    pool = ipam.request_pool(v6=True)["PoolID"]
    got: list[str] = []
    errors: list[Exception] = []

    def worker():
        for _ in range(25):
            try:
                got.append(ip_of(ipam.request_address(pool)))
            except Exception as exc:       # noqa: BLE001 - collected and asserted below
                errors.append(exc)
    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(got) == 150 and len(set(got)) == 150


def test_v6_pool_ids_in_canonical_form_only(ipam):
    pool = ipam.request_pool(v6=True)["PoolID"]
    with pytest.raises(InvalidRequest, match="not a vpcnet pool id"):
        ipam.request_address(ipaddress.IPv6Network(pool).exploded)
    assert ipam.release_pool(pool) == {}
    assert ipam.store.pools() == [] or pool not in [p["pool_id"] for p in ipam.store.pools()]
