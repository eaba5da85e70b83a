"""The RouteKeeper through the real aliyun provider against the real emulator over HTTP on 127.0.0.1,
each host with its own Store in tmp_path: claim, restart, faults, racing hosts, drift, Pending, quota,
ownership (sync, release, gc), the background reconciler, and no secret in any log."""
from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time

import pytest
from aliyun_fakes import blocks_of, closed_port, serving_emulator
from conftest import wait_for

from vpcnet.cloud import Route, route_name
from vpcnet.cloud.aliyun.provider import AliyunProvider
from vpcnet.config import Config
from vpcnet.errors import Fatal, NotReady, Retryable
from vpcnet.routes import loop
from vpcnet.routes.backoff import Backoff
from vpcnet.routes.claims import FATAL, PENDING, TRANSIENT
from vpcnet.routes.journal import UNCERTAIN_FILE
from vpcnet.routes.keeper import RouteKeeper
from vpcnet.state.store import Store

KEY_ID = "emu-key-id"
SECRET = "S3cret-routes-never-logged-5b7e"         # distinctive, so a leak is found by a plain search
STS_KEY, STS_SECRET, STS_TOKEN = "STS.routes", "sts-S3cret-never-logged-91c2", "sts-T0ken-never-logged-3d4f"
SECRETS = (SECRET, STS_SECRET, STS_TOKEN)
TABLE, VPC, REGION = "vtb-routes01", "vpc-routes01", "cn-emu-1"
CLUSTER = "10.200.0.0/16"


B = blocks_of("i-routes-me", CLUSTER)
ME, OTHER, DEAD = "i-routes-me", "i-routes-other", "i-routes-dead"
FAULT_CODES = ("Throttling", "ServiceUnavailable", "InternalError", "TaskConflict")


@pytest.fixture(autouse=True)
def no_secret_logged(caplog):
    """Everything logged at DEBUG by vpcnet, requests/urllib3, werkzeug and the emulator is captured;
    none of it may hold a secret."""
    caplog.set_level(logging.DEBUG)
    yield
    text = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    for secret in SECRETS:
        assert secret not in text, "a secret reached a log line"


@pytest.fixture
def emu():
    with serving_emulator({ME: "192.168.0.10", OTHER: "192.168.0.11"}, region=REGION, vpc_id=VPC,
                          route_table_id=TABLE, credentials={KEY_ID: SECRET}, pending_delay=0.0, seed=11) as e:
        e.add_sts_credentials(STS_KEY, STS_SECRET, STS_TOKEN)
        yield e


def make_config(emu, state_dir, instance=ME, **kw) -> Config:
    values = dict(provider="aliyun", state_dir=str(state_dir), cluster_cidr=CLUSTER, host_prefix=24,
                  reconcile_interval=30.0, aliyun_endpoint=emu.test_url, aliyun_region_id=REGION,
                  aliyun_route_table_id=TABLE, aliyun_vpc_id=VPC, aliyun_instance_id=instance,
                  aliyun_access_key_id=KEY_ID, aliyun_access_key_secret=SECRET,
                  aliyun_metadata_url=f"http://127.0.0.1:{closed_port()}")   # never 100.100.100.200
    values.update(kw)
    return Config(**values)


FAST = dict(attempts=12, base=0.01, cap=0.1, deadline=20, busy_base=0.01, busy_cap=0.1)


@pytest.fixture
def hosts(emu, tmp_path):
    """make(instance, name=...) -> (keeper, store); everything closed at the end."""
    made = []

    def make(instance=ME, name=None, provider_factory=None, backoff=None, **kw):
        state = tmp_path / (name or instance)
        cfg = make_config(emu, state, instance, **kw)
        store = Store(cfg.db_path)
        keeper = RouteKeeper(cfg, store, provider_factory=provider_factory, backoff=backoff or Backoff(**FAST))
        made.append((keeper, store))
        return keeper, store

    yield make
    for keeper, store in made:
        keeper.close()
        store.close()


def custom(emu) -> list[dict]:
    return [e for e in emu.entries(TABLE) if e["Type"] == "Custom"]


def hop(entry: dict) -> str:
    return entry["NextHops"]["NextHop"][0]["NextHopId"]


def by_dest(emu) -> dict[str, dict]:
    return {e["DestinationCidrBlock"]: e for e in emu.entries(TABLE)}


def converge(keeper, passes=30, seconds=30.0):
    """Run passes the way the background loop would, bounded in count and time."""
    deadline = time.monotonic() + seconds
    result = None
    for _ in range(passes):
        result = keeper.reconcile(wait_pending=5)
        if result.ok or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return result


# -- claim, restart, per container ------------------------------------------------------------------
def test_first_start_claims_and_restart_lists_once(emu, hosts, tmp_path):
    keeper, store = hosts(ME, name="h")
    result = keeper.reconcile(wait_pending=5)
    assert result.ok, result.problems
    claim = store.claim(CLUSTER)
    assert (claim.host_cidr, claim.route_ok, claim.reason) == (B[0], True, "")
    [entry] = custom(emu)
    assert (entry["DestinationCidrBlock"], hop(entry), entry["Status"]) == (B[0], ME, "Available")
    assert entry["RouteEntryName"].startswith("vpcnet") and entry["Description"].startswith("vpcnet")
    # first start: 1 listing pass + 1 create + 1 listing that sees it Available (+ the vSwitch lookup)
    assert keeper.calls == {"list": 2, "create": 1, "delete": 0, "reserved": 1, "instance": 0}
    assert keeper.route_table_usage() == {TABLE: {"all": (1, 200)}}      # one quota for both families
    counts = emu.request_counts
    assert counts["CreateRouteEntry"] == 1 and counts["DescribeRouteEntryList"] == 2

    # per container: IPAM reads the store, no cloud call at all
    emu.reset_request_counts()
    for _ in range(50):
        assert keeper.host_cidr(CLUSTER) == B[0]
    assert emu.request_counts == {}

    # restart (same state dir): one listing pass, no create
    keeper.close()
    store.close()
    keeper2, store2 = hosts(ME, name="h")
    result = keeper2.reconcile()
    assert result.ok, result.problems
    assert keeper2.calls == {"list": 1, "create": 0, "delete": 0, "reserved": 0, "instance": 0}
    assert emu.request_counts == {"DescribeRouteEntryList": 1}

    # reinstall (state dir lost): the block is found again in the route table, still no create
    emu.reset_request_counts()
    keeper3, store3 = hosts(ME, name="h-reinstalled")
    assert keeper3.reconcile().ok
    assert store3.claim(CLUSTER).host_cidr == B[0]
    assert keeper3.calls["create"] == 0 and keeper3.calls["list"] == 1
    assert emu.request_counts == {"DescribeRouteEntryList": 1}
    assert len(custom(emu)) == 1


def test_sts_credentials_from_a_file_work_and_stay_out_of_logs(emu, hosts, tmp_path):
    path = tmp_path / "aliyun.credentials"
    path.write_text(f"access_key_id = {STS_KEY}\naccess_key_secret = {STS_SECRET}\nsecurity_token = {STS_TOKEN}\n")
    os.chmod(path, 0o600)
    keeper, store = hosts(ME, aliyun_access_key_id="", aliyun_access_key_secret="",
                          aliyun_credentials_file=str(path))
    assert keeper.reconcile(wait_pending=5).ok
    assert store.claim(CLUSTER).host_cidr == B[0]
    assert STS_TOKEN not in repr(keeper.provider) and STS_SECRET not in repr(keeper.provider)


# -- faults, races ------------------------------------------------------------------------------------
def test_convergence_with_30_percent_retryable_faults(emu, hosts):
    emu.configure(pending_delay=0.2)
    emu.set_faults(rate=0.3, codes=FAULT_CODES, seed=3)
    instances = [f"i-faulty-{i}" for i in range(4)]
    for i, iid in enumerate(instances):
        emu.register_instance(iid, f"192.168.0.{50 + i}")
    keepers = [hosts(iid) for iid in instances]
    started = time.monotonic()
    for round_ in range(2):              # a first start, then a restart of every host under the same faults
        for keeper, _ in keepers:
            result = converge(keeper)
            assert result.ok, result.problems
        # a route deleted behind vpcnet's back is repaired under faults too
        victim = next(e for e in custom(emu) if hop(e) == instances[round_])
        emu.remove_entry(victim["RouteEntryId"])
        assert converge(keepers[round_][0]).ok
    assert time.monotonic() - started < 60
    emu.set_faults(rate=0.0)
    entries = custom(emu)
    blocks = [s.claim(CLUSTER).host_cidr for _, s in keepers]
    assert len(set(blocks)) == len(instances)                          # all distinct
    assert sorted(e["DestinationCidrBlock"] for e in entries) == sorted(blocks)   # nothing leaked
    for (_keeper, store), iid in zip(keepers, instances, strict=True):
        mine = [e for e in entries if hop(e) == iid]
        assert len(mine) == 1 and mine[0]["DestinationCidrBlock"] == store.claim(CLUSTER).host_cidr
        assert mine[0]["Status"] == "Available"
    assert sum(k.calls["create"] for k, _ in keepers) >= len(instances)
    assert emu.request_counts.get("CreateRouteEntry", 0) > 0


@pytest.mark.parametrize("count", [2, 8])
def test_hosts_claiming_at_once_get_distinct_blocks(emu, hosts, count):
    emu.configure(pending_delay=0.1)
    instances = [f"i-race{count}-{i}" for i in range(count)]
    for i, iid in enumerate(instances):
        emu.register_instance(iid, f"192.168.0.{100 + i}")
    keepers = [hosts(iid) for iid in instances]
    barrier = threading.Barrier(count)
    results: dict[int, object] = {}

    def run(i, keeper):
        try:
            barrier.wait(10)
            results[i] = converge(keeper, seconds=40)
        except Exception as exc:           # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, k), daemon=True) for i, (k, _) in enumerate(keepers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert all(getattr(r, "ok", False) for r in results.values()) and len(results) == count, results
    blocks = [s.claim(CLUSTER).host_cidr for _, s in keepers]
    assert len(set(blocks)) == count
    entries = custom(emu)
    assert len(entries) == count                                     # one route each, no leftovers
    for iid, block in zip(instances, blocks, strict=True):
        [mine] = [e for e in entries if hop(e) == iid]
        assert mine["DestinationCidrBlock"] == block and mine["Status"] == "Available"


# -- drift, Pending, quota -----------------------------------------------------------------------------
def test_drift_is_repaired(emu, hosts):
    keeper, store = hosts(ME)
    assert keeper.reconcile(wait_pending=5).ok
    [entry] = custom(emu)
    assert emu.remove_entry(entry["RouteEntryId"])
    assert custom(emu) == []
    result = keeper.reconcile(wait_pending=5)
    assert result.ok, result.problems
    [again] = custom(emu)
    assert again["DestinationCidrBlock"] == entry["DestinationCidrBlock"] and hop(again) == ME
    assert again["RouteEntryId"] != entry["RouteEntryId"]
    assert keeper.calls["create"] == 2
    assert store.claim(CLUSTER).route_ok


def test_pending_is_waited_for_boundedly(emu, hosts):
    emu.configure(pending_delay=1.0)
    keeper, store = hosts(ME)
    result = keeper.reconcile()                       # no wait: the route is claimed but still Pending
    assert not result.ok and result.pending_only and result.kinds == [PENDING]
    assert "Pending" in result.problems[0]
    claim = store.claim(CLUSTER)
    assert claim.host_cidr == B[0] and not claim.route_ok
    assert keeper.host_cidr(CLUSTER) == B[0]     # IPAM answers once the block is claimed
    started = time.monotonic()
    result = keeper.reconcile(wait_pending=5)
    waited = time.monotonic() - started
    assert result.ok, result.problems
    assert waited < 3.0
    assert keeper.calls["create"] == 1
    assert keeper.calls["list"] <= 2 + 4                     # one listing per PENDING_POLL, no spinning

    # a wait shorter than the Pending delay gives up in time, with the reason
    emu.configure(pending_delay=3.0)
    [entry] = custom(emu)
    emu.remove_entry(entry["RouteEntryId"])
    started = time.monotonic()
    result = keeper.reconcile(wait_pending=0.5)
    assert time.monotonic() - started < 2.5
    assert not result.ok and result.pending_only


def test_full_route_table_is_a_clear_fatal_error(emu, hosts):
    emu.configure(quota=2)
    emu.add_custom_entry(B[0], OTHER, name=route_name(B[0]))
    emu.add_custom_entry(B[1], OTHER, name=route_name(B[1]))
    keeper, store = hosts(ME)
    result = keeper.reconcile(wait_pending=5)
    assert not result.ok and result.kinds == [FATAL]
    problem = result.problems[0]
    assert TABLE in problem and "full" in problem
    assert "quota is 2" in problem and "Quota Center" in problem and "does not retry" in problem
    claim = store.claim(CLUSTER)
    assert claim.host_cidr is None and "full" in claim.reason and TABLE in claim.reason
    with pytest.raises(NotReady, match=r"^host CIDR not yet claimed: .*full"):
        keeper.host_cidr(CLUSTER)
    assert keeper.calls["create"] == 1                # fatal: not retried
    assert len(custom(emu)) == 2


def test_unreachable_cloud_is_a_reason_not_a_failure(hosts, tmp_path, emu):
    keeper, store = hosts(ME, aliyun_endpoint=f"http://127.0.0.1:{closed_port()}/",
                          backoff=Backoff(attempts=3, base=0.01, cap=0.02, deadline=2))
    with pytest.raises(NotReady, match=r"^host CIDR not yet claimed: claim in progress"):
        keeper.host_cidr(CLUSTER)                     # answers at once, never waits on the cloud
    started = time.monotonic()
    result = keeper.reconcile(wait_pending=10)        # waits for Pending only, not for a dead endpoint
    assert time.monotonic() - started < 5
    assert not result.ok and result.kinds == [TRANSIENT]
    assert "unreachable" in result.problems[0] and "connection refused" in result.problems[0]
    with pytest.raises(NotReady, match=r"^host CIDR not yet claimed: aliyun route table unreachable"):
        keeper.host_cidr(CLUSTER)


# -- reserved CIDRs, duplicates --------------------------------------------------------------------------
class FlakyReserved(AliyunProvider):
    """reserved_cidrs always fails (retryably or fatally); counts its calls."""

    def __init__(self, config, exc):
        super().__init__(config)
        self.exc, self.reserved_calls = exc, 0

    def reserved_cidrs(self):
        self.reserved_calls += 1
        raise self.exc


@pytest.mark.parametrize("exc", [Retryable("DescribeVSwitches: Throttling"), Fatal("DescribeVSwitches: Forbidden.RAM")])
def test_reserved_cidrs_failing_means_none_known(emu, hosts, exc, caplog):
    made = []

    def factory():
        made.append(FlakyReserved(cfg, exc))
        return made[-1]

    keeper, store = hosts(ME, provider_factory=factory, backoff=Backoff(attempts=3, base=0.01, cap=0.02))
    cfg = keeper.config
    assert keeper.reconcile(wait_pending=5).ok
    assert store.claim(CLUSTER).host_cidr == B[0]
    assert made[0].reserved_calls == (3 if isinstance(exc, Retryable) else 1)   # through the backoff
    assert "claiming without avoiding them" in caplog.text


def test_reserved_cidrs_are_avoided(emu, hosts):
    class Reserved(AliyunProvider):
        def reserved_cidrs(self):
            return [B[0], B[1], "fd00::/64"]

    keeper, store = hosts(ME, provider_factory=lambda: Reserved(keeper.config))
    assert keeper.reconcile(wait_pending=5).ok
    assert store.claim(CLUSTER).host_cidr == B[2]


class StaleFirstListing(AliyunProvider):
    """The first listing is empty, as if taken just before other entries were made: the keeper's create
    then meets DuplicateRoute and must decide from a fresh listing."""

    def __init__(self, config):
        super().__init__(config)
        self.listings = 0

    def list_routes(self, table=""):
        self.listings += 1
        routes = super().list_routes(table)
        return [r for r in routes if r.kind == "System"] if self.listings == 1 else routes


def test_duplicate_on_our_own_marked_route_adopts_it(emu, hosts):
    # a vpcnet-marked route to this instance the first listing did not show (an earlier create of ours)
    emu.add_custom_entry(B[0], ME, name=route_name(B[0]), description="vpcnet: host CIDR")
    keeper, store = hosts(ME, provider_factory=lambda: StaleFirstListing(keeper.config))
    result = keeper.reconcile(wait_pending=5)
    assert result.ok, result.problems
    assert store.claim(CLUSTER).host_cidr == B[0]
    assert keeper.calls["create"] == 1 and len(custom(emu)) == 1


def test_duplicate_on_a_hand_made_route_to_us_never_adopts_it(emu, hosts):
    # hand-made (unmarked) route to this very instance on the first block: never adopted, but a
    # vpcnet-marked route to this instance seen in the fresh listing is this host's block
    emu.add_custom_entry(B[0], ME, name="by-hand", description="ops made this")
    emu.add_custom_entry(B[1], ME, name=route_name(B[1]), description="vpcnet: host CIDR")
    keeper, store = hosts(ME, provider_factory=lambda: StaleFirstListing(keeper.config))
    result = keeper.reconcile(wait_pending=5)
    assert result.ok, result.problems
    assert store.claim(CLUSTER).host_cidr == B[1]
    assert keeper.calls["create"] == 1                     # only the duplicate attempt on 10.200.0.0/24
    assert len(custom(emu)) == 2


def test_duplicate_held_by_a_hand_made_route_to_us_moves_on(emu, hosts):
    emu.add_custom_entry(B[0], ME, name="by-hand")
    emu.add_custom_entry(B[1], OTHER, name=route_name(B[1]))
    keeper, store = hosts(ME, provider_factory=lambda: StaleFirstListing(keeper.config))
    assert keeper.reconcile(wait_pending=5).ok
    assert store.claim(CLUSTER).host_cidr == B[2]
    dests = by_dest(emu)
    assert hop(dests[B[0]]) == ME and dests[B[0]]["RouteEntryName"] == "by-hand"
    assert hop(dests[B[1]]) == OTHER
    assert hop(dests[B[2]]) == ME


# -- ownership: sync, release, gc --------------------------------------------------------------------------
def test_ownership_foreign_system_and_hand_made_routes_survive(emu, hosts):
    emu.register_instance(DEAD, "192.168.0.99")
    emu.add_custom_entry(B[0], OTHER, name=route_name(B[0]))         # another live host
    emu.add_custom_entry(B[1], ME, name="by-hand", description="ops")       # hand-made, to us
    emu.add_custom_entry(B[2], DEAD, name="by-hand-dead")                   # hand-made, dead hop
    emu.add_custom_entry(B[3], DEAD, name=route_name(B[3]))          # vpcnet's, dead hop
    emu.add_custom_entry("10.99.0.0/24", ME, name="vpcnet-10-99-0-0-24")              # ours, other cluster
    emu.add_custom_entry("10.99.1.0/24", DEAD, name="vpcnet-10-99-1-0-24")            # dead, other cluster
    emu.add_custom_entry("0.0.0.0/0", OTHER, name="nat-gateway")                      # wide, foreign
    emu.add_system_entry("10.201.0.0/24")                                             # another vSwitch
    emu.deregister_instance(DEAD)
    before = by_dest(emu)
    keeper, store = hosts(ME)

    assert keeper.reconcile(wait_pending=5).ok                    # sync
    mine = store.claim(CLUSTER).host_cidr
    assert mine == B[4]                                # neither adopted nor overlapped anything
    after_sync = by_dest(emu)
    assert set(after_sync) == set(before) | {mine}
    for dest, entry in before.items():
        assert after_sync[dest]["RouteEntryId"] == entry["RouteEntryId"]

    tables, me, routes = keeper.table()
    owners = {r.destination: keeper.ownership(r, me, keeper.clusters()) for r in routes}
    assert tables == [TABLE] and me == ME and {r.table for r in routes} == {TABLE}
    assert owners[mine] == "mine"
    assert owners[B[0]] == owners[B[3]] == "ours-other-host"
    assert owners[B[1]] == owners[B[2]] == owners["0.0.0.0/0"] == "foreign"
    assert owners["10.99.0.0/24"] == "ours-other-cluster"
    assert owners["100.64.0.0/10"] == "foreign"

    garbage = keeper.garbage()                                      # gc: only vpcnet's dead-hop route
    assert [r.destination for r in garbage] == [B[3]]
    assert keeper.delete_garbage(garbage) == garbage
    assert set(by_dest(emu)) == (set(before) | {mine}) - {B[3]}

    removed = keeper.release()                                      # release: only this host's route
    assert [r.destination for r in removed] == [mine]
    assert set(by_dest(emu)) == set(before) - {B[3]}
    assert store.claims() == []
    assert keeper.calls["delete"] == 2


def test_gc_keeps_routes_when_it_cannot_tell_whether_the_instance_exists(emu, hosts, tmp_path):
    emu.add_custom_entry(B[5], DEAD, name=route_name(B[5]))
    keeper, _ = hosts(ME, aliyun_ecs_endpoint=f"http://127.0.0.1:{closed_port()}/")
    assert keeper.garbage() == []
    assert B[5] in by_dest(emu)


# -- the background reconciler ----------------------------------------------------------------------------
def test_background_reconciler_claims_repairs_and_stops(emu, hosts, caplog):
    keeper, store = hosts(ME, reconcile_interval=0.5)
    thread = keeper.start_background()
    try:
        assert wait_for(lambda: store.claim(CLUSTER) and store.claim(CLUSTER).route_ok, 10)
        [entry] = custom(emu)
        emu.remove_entry(entry["RouteEntryId"])
        assert wait_for(lambda: [e for e in custom(emu) if e["Status"] == "Available"], 10)
        # woken on every RequestPool, it still never spins: passes at least MIN_PASS_GAP apart
        lists, spam_started = keeper.calls["list"], time.monotonic()
        for _ in range(200):
            keeper._wake.set()
            time.sleep(0.005)
        spam = time.monotonic() - spam_started
        assert keeper.calls["list"] - lists <= 2 + int(spam / loop.MIN_PASS_GAP)
    finally:
        keeper.stop()
        thread.join(5)
    assert not thread.is_alive()
    assert caplog.text.count("reconciler running") == 1


def test_background_reconciler_against_a_dead_endpoint_keeps_calm(emu, hosts):
    keeper, store = hosts(ME, reconcile_interval=30, aliyun_endpoint=f"http://127.0.0.1:{closed_port()}/",
                          backoff=Backoff(attempts=2, base=0.01, cap=0.02, deadline=1))
    thread = keeper.start_background()
    try:
        time.sleep(2.5)
        assert 1 <= keeper.calls["list"] <= 3      # 1 pass, then pauses of 2 s, 4 s ...: no busy loop
        assert "unreachable" in store.claim(CLUSTER).reason
    finally:
        keeper.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_one_reconciler_per_state_dir_and_the_lock_passes_on(emu, hosts, caplog, monkeypatch):
    monkeypatch.setattr(loop, "LEADER_POLL", 0.1)
    first, store = hosts(ME, name="shared", reconcile_interval=0.5)
    second, _ = hosts(ME, name="shared", reconcile_interval=0.5)
    threads = [first.start_background(), second.start_background()]
    try:
        assert wait_for(lambda: store.claim(CLUSTER) and store.claim(CLUSTER).route_ok, 10)
        time.sleep(0.3)
        assert caplog.text.count("reconciler running") == 1
        leader, follower = (first, second) if first.calls["list"] else (second, first)
        assert follower.calls["list"] == 0
        leader.stop()
        threads[0 if leader is first else 1].join(5)
        assert wait_for(lambda: follower.calls["list"] > 0, 5)      # the follower took over
        assert caplog.text.count("reconciler running") == 2
        assert emu.request_counts["CreateRouteEntry"] == 1
    finally:
        first.stop()
        second.stop()
        for t in threads:
            t.join(5)
    assert not any(t.is_alive() for t in threads)


def test_static_host_cidr_route_is_created_and_kept(emu, hosts):
    keeper, store = hosts(ME, host_cidr="10.200.77.0/24")
    assert keeper.host_cidr(CLUSTER) == "10.200.77.0/24"           # at once, from the configuration
    assert keeper.reconcile(wait_pending=5).ok
    [entry] = custom(emu)
    assert entry["DestinationCidrBlock"] == "10.200.77.0/24" and hop(entry) == ME
    assert store.claim(CLUSTER).static


def test_a_block_taken_by_another_instance_is_reported_not_touched(emu, hosts):
    keeper, store = hosts(ME)
    assert keeper.reconcile(wait_pending=5).ok
    [entry] = custom(emu)
    emu.remove_entry(entry["RouteEntryId"])
    emu.add_custom_entry(entry["DestinationCidrBlock"], OTHER, name="by-hand")   # someone re-pointed it
    result = keeper.reconcile()
    assert not result.ok and result.kinds == [FATAL]
    assert OTHER in result.problems[0] and "does not touch" in result.problems[0]
    assert hop(by_dest(emu)[entry["DestinationCidrBlock"]]) == OTHER
    assert keeper.release() == []                                    # not ours to delete
    assert hop(by_dest(emu)[entry["DestinationCidrBlock"]]) == OTHER


def test_route_dataclass_marker():
    assert Route("10.0.0.0/24", ME, name="vpcnet-x").marked
    assert not Route("10.0.0.0/24", ME, name="x", description="made by vpcnet").marked


# -- several route tables -----------------------------------------------------------------------------
TABLE_B = "vtb-routes02"


def custom_in(emu, table) -> dict[str, str]:
    return {e["DestinationCidrBlock"]: hop(e) for e in emu.entries(table) if e["Type"] == "Custom"}


def test_every_host_route_goes_into_every_listed_table_with_one_block(emu, hosts):
    emu.add_route_table(TABLE_B)
    both = f"{TABLE},{TABLE_B}"
    # another host holds B[0] in the second table only: taken, whatever the first table says
    emu.add_custom_entry(B[0], OTHER, name=route_name(B[0]), route_table_id=TABLE_B)
    keeper, store = hosts(ME, aliyun_route_table_id=both)
    assert keeper.reconcile(wait_pending=5).ok
    block = store.claim(CLUSTER).host_cidr
    assert block == B[1]
    assert custom_in(emu, TABLE)[block] == ME and custom_in(emu, TABLE_B)[block] == ME
    assert B[0] not in custom_in(emu, TABLE)                      # nothing made for the taken block
    assert set(keeper.route_table_usage()) == {TABLE, TABLE_B}

    other, other_store = hosts(OTHER, aliyun_route_table_id=both)
    assert other.reconcile(wait_pending=5).ok
    assert other_store.claim(CLUSTER).host_cidr == B[0]           # found its own block, in the second table
    assert custom_in(emu, TABLE)[B[0]] == OTHER                   # and completed it in the first

    # a host missing from one table re-creates it there (same block), and only there
    [entry] = [e for e in emu.entries(TABLE_B) if e["DestinationCidrBlock"] == block]
    emu.remove_entry(entry["RouteEntryId"])
    emu.reset_request_counts()
    assert keeper.reconcile(wait_pending=5).ok
    assert custom_in(emu, TABLE_B)[block] == ME
    assert emu.request_counts["CreateRouteEntry"] == 1

    # restart with the state dir lost: the block is found again, no create
    emu.reset_request_counts()
    again, again_store = hosts(ME, name="me-again", aliyun_route_table_id=both)
    assert again.reconcile().ok and again_store.claim(CLUSTER).host_cidr == block
    assert "CreateRouteEntry" not in emu.request_counts

    # release and gc act on every table
    removed = keeper.release()
    assert sorted(r.table for r in removed) == [TABLE, TABLE_B]
    assert block not in custom_in(emu, TABLE) and block not in custom_in(emu, TABLE_B)
    emu.deregister_instance(OTHER)
    garbage = keeper.garbage()
    assert sorted((r.destination, r.table) for r in garbage) == [(B[0], TABLE), (B[0], TABLE_B)]


def test_never_two_blocks_for_one_host(emu, hosts):
    """Different blocks of this host in different tables (an old claim, a hand-edited table): the first
    table's block wins and the other is removed, so every table ends with the same block."""
    emu.add_route_table(TABLE_B)
    emu.add_custom_entry(B[2], ME, name=route_name(B[2]), description="vpcnet: host CIDR", route_table_id=TABLE)
    emu.add_custom_entry(B[3], ME, name=route_name(B[3]), description="vpcnet: host CIDR", route_table_id=TABLE_B)
    keeper, store = hosts(ME, aliyun_route_table_id=f"{TABLE},{TABLE_B}")
    assert converge(keeper).ok
    assert store.claim(CLUSTER).host_cidr == B[2]
    assert custom_in(emu, TABLE) == {B[2]: ME} and custom_in(emu, TABLE_B) == {B[2]: ME}


def test_tables_are_discovered_from_the_vswitches_bound_to_them(emu, hosts):
    emu.add_vswitch("vsw-a", "192.168.0.0/24")                          # bound to the system table
    emu.add_route_table(TABLE_B, vswitches={"vsw-b": "192.168.1.0/24"})
    emu.add_route_table("vtb-unused")                                   # bound to no vSwitch: not used
    keeper, store = hosts(ME, aliyun_route_table_id="")
    assert keeper.reconcile(wait_pending=5).ok
    block = store.claim(CLUSTER).host_cidr
    assert custom_in(emu, TABLE) == {block: ME} and custom_in(emu, TABLE_B) == {block: ME}
    assert custom_in(emu, "vtb-unused") == {}


def test_ambiguous_discovery_is_refused_naming_the_candidates(emu, hosts):
    emu.add_route_table(TABLE_B)                                        # two tables, no vSwitch bound
    keeper, store = hosts(ME, aliyun_route_table_id="")
    result = keeper.reconcile()
    assert not result.ok and result.kinds == [FATAL]
    assert TABLE in result.problems[0] and TABLE_B in result.problems[0]
    assert "VPCNET_ALIYUN_ROUTE_TABLE_ID" in result.problems[0]
    assert custom_in(emu, TABLE) == {} and custom_in(emu, TABLE_B) == {}


# -- quota ---------------------------------------------------------------------------------------------
def test_quota_is_checked_before_the_create(emu, hosts):
    emu.add_custom_entry(B[0], OTHER, name=route_name(B[0]))
    emu.add_custom_entry("10.99.0.0/24", OTHER, name="by-hand")
    keeper, store = hosts(ME, route_table_quota=2)
    emu.reset_request_counts()
    result = keeper.reconcile(wait_pending=5)
    assert not result.ok and result.kinds == [FATAL]
    assert f"route table {TABLE} is full: 2/2 custom entries" in result.problems[0]
    assert "Quota Center" in result.problems[0] and "does not retry" in result.problems[0]
    assert "CreateRouteEntry" not in emu.request_counts and keeper.calls["create"] == 0
    assert keeper.route_table_usage() == {TABLE: {"all": (2, 2)}}
    assert "full" in store.claim(CLUSTER).reason


# -- clusters sharing a VPC ------------------------------------------------------------------------------
def test_two_clusters_in_one_table_never_touch_each_others_routes(emu, hosts):
    a, sa = hosts(ME, name="a", cluster_name="alpha")
    b, sb = hosts(OTHER, name="b", cluster_name="beta", cluster_cidr="10.201.0.0/16")
    assert a.reconcile(wait_pending=5).ok and b.reconcile(wait_pending=5).ok
    block_a, block_b = sa.claim(CLUSTER).host_cidr, sb.claim("10.201.0.0/16").host_cidr
    entries = by_dest(emu)
    assert "cluster=alpha" in entries[block_a]["Description"] and "cluster=beta" in entries[block_b]["Description"]
    # a route of cluster beta's next hop in alpha's CIDR (another host of beta, say): alpha leaves it
    emu.add_custom_entry(B[4], ME, name=route_name(B[4]), description=f"vpcnet: host CIDR {B[4]} of {ME} "
                         "cluster=gamma")
    tables, me, routes = a.table()
    owners = {r.destination: a.ownership(r, me, a.clusters()) for r in routes}
    assert owners[block_a] == "mine" and owners[block_b] == "ours-other-cluster"
    result = a.reconcile()
    assert not result.ok and "overlaps route" in result.problems[0] and "cluster gamma" in result.problems[0]
    assert "VPCNET_CLUSTER_NAME=gamma" in result.problems[0]
    emu.remove_entry(by_dest(emu)[B[4]]["RouteEntryId"])
    emu.deregister_instance(OTHER)
    assert a.garbage() == []                                       # beta's dead host is not alpha's to collect
    assert [r.destination for r in a.release()] == [block_a]
    assert block_b in by_dest(emu)


def test_overlapping_cluster_cidrs_are_refused_clearly(emu, hosts):
    a, sa = hosts(ME, name="a", cluster_name="alpha")
    assert a.reconcile(wait_pending=5).ok
    before = by_dest(emu)
    b, sb = hosts(OTHER, name="b", cluster_name="beta", cluster_cidr="10.200.0.0/17")
    result = b.reconcile(wait_pending=5) if ipaddress.IPv4Network(sa.claim(CLUSTER).host_cidr).subnet_of(
        ipaddress.IPv4Network("10.200.0.0/17")) else None
    b2, sb2 = hosts(OTHER, name="b2", cluster_name="beta", cluster_cidr=CLUSTER)   # the same CIDR
    for r in (result, b2.reconcile(wait_pending=5)):
        if r is None:
            continue
        assert not r.ok and r.kinds == [FATAL]
        assert "cluster alpha" in r.problems[0] and "disjoint" in r.problems[0]
    assert sb2.claim(CLUSTER).host_cidr is None
    assert by_dest(emu) == before                                     # beta made nothing, touched nothing
    # alpha, seeing a route of beta's inside its own CIDR, reports it, keeps its own route in place (a
    # route deleted behind its back comes back) and leaves beta's alone
    beta = emu.add_custom_entry("10.200.200.0/24", OTHER, name="vpcnet-x",
                                description="vpcnet: host CIDR 10.200.200.0/24 of x cluster=beta")
    mine = sa.claim(CLUSTER).host_cidr
    emu.remove_entry(by_dest(emu)[mine]["RouteEntryId"])
    result = a.reconcile(wait_pending=5)
    assert not result.ok and result.kinds == [FATAL] and "cluster beta" in result.problems[0]
    assert hop(by_dest(emu)[mine]) == ME
    assert by_dest(emu)["10.200.200.0/24"]["RouteEntryId"] == beta


# -- leaks: a create whose outcome or marking is uncertain -------------------------------------------------
class LostAnswer(AliyunProvider):
    """CreateRouteEntry lands but its answer is lost (times out) `lose` times."""

    lose = 0

    def create_route(self, destination, name, description, client_token, table=""):
        super().create_route(destination, name, description, client_token, table=table)
        if LostAnswer.lose > 0:
            LostAnswer.lose -= 1
            raise Retryable("CreateRouteEntry: did not answer within 3+10 s")


def test_a_create_that_landed_without_an_answer_is_adopted(emu, hosts):
    LostAnswer.lose = 100           # every answer lost for this pass
    keeper, store = hosts(ME, provider_factory=lambda: LostAnswer(keeper.config),
                          backoff=Backoff(attempts=2, base=0.01, cap=0.02, deadline=2))
    assert not keeper.reconcile().ok
    state = os.path.join(keeper.config.state_dir, UNCERTAIN_FILE)
    assert os.path.exists(state)                                    # persisted, not only in memory
    LostAnswer.lose = 0
    assert keeper.reconcile(wait_pending=5).ok
    assert store.claim(CLUSTER).host_cidr == B[0]
    assert custom_in(emu, TABLE) == {B[0]: ME}                        # the landed one, no second block
    assert not os.path.exists(state)


# -- boot storms: busy answers (where the search starts: tests/test_route_claims.py) ----------------------
def test_busy_answers_do_not_use_up_the_attempts_but_stop_at_their_deadline():
    from vpcnet.errors import Busy
    answers = iter([Busy("TaskConflict")] * 20 + ["done"])

    def call():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    waits = []
    backoff = Backoff(attempts=3, base=0.01, cap=0.02, deadline=1, busy_base=0.01, busy_cap=0.02,
                      sleep=waits.append)
    assert backoff.run("create", call) == "done"                      # 20 busy answers, 3 attempts allowed
    assert len(waits) == 20 and max(waits) <= 0.02
    always_busy = Backoff(attempts=3, busy_deadline=0.2, busy_base=0.01, busy_cap=0.05)
    started = time.monotonic()
    with pytest.raises(Retryable, match="stayed busy"):
        always_busy.run("create", lambda: (_ for _ in ()).throw(Busy("TaskConflict")))
    assert 0.2 <= time.monotonic() - started < 1.0
    # a real failure still counts: three attempts, whatever the busy answers in between
    failing = iter([Busy("x"), Retryable("5xx"), Busy("x"), Retryable("5xx"), Retryable("5xx"), "never"])

    def flaky():
        answer = next(failing)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with pytest.raises(Retryable, match="still failing after 5 attempts"):
        Backoff(attempts=3, base=0.001, cap=0.001, busy_base=0.001, busy_cap=0.001).run("create", flaky)



# -- IPv6 ---------------------------------------------------------------------------------------------
V6 = "fd00:1:2::/48"


def test_ipv6_blocks_through_the_aliyun_api_share_the_table_and_its_quota(emu, hosts):
    """IPv6 host blocks are CreateRouteEntry entries like IPv4 ones (DestinationCidrBlock takes both), claimed
    apart per host, kept in place, and counted against the table's one quota of custom entries (Alibaba's
    documents name a single 200-entry quota, not one per family: planned as shared)."""
    a, sa = hosts(ME, name="a", cluster_cidr_v6=V6)
    b, sb = hosts(OTHER, name="b", cluster_cidr_v6=V6)
    for keeper in (a, b):
        with pytest.raises(NotReady, match="not yet claimed"):
            keeper.host_cidr(V6)
        assert keeper.reconcile(wait_pending=5).ok
    block_a, block_b = sa.claim(V6).host_cidr, sb.claim(V6).host_cidr
    assert block_a != block_b and {ipaddress.IPv6Network(x).prefixlen for x in (block_a, block_b)} == {80}
    entries = by_dest(emu)
    assert (hop(entries[block_a]), hop(entries[block_b])) == (ME, OTHER)
    assert entries[block_a]["IpVersion"] == "ipv6" and "cluster=fd00.1.2..-48" in entries[block_a]["Description"]
    assert len(custom(emu)) == 4                                   # each host: one IPv4 and one IPv6 block

    # drift: an IPv6 route removed by hand comes back
    emu.remove_entry(entries[block_a]["RouteEntryId"])
    assert converge(a).ok and hop(by_dest(emu)[block_a]) == ME

    # one quota for both families: a third host's IPv6 claim meets the table full of four entries
    emu.configure(quota=4)
    c, sc = hosts(DEAD, name="c", cluster_cidr_v6=V6, cluster_cidr="10.251.0.0/16", route_table_quota=4)
    emu.register_instance(DEAD, "192.168.0.12")
    sc.want_claim(V6, "asked")
    result = c.reconcile(wait_pending=5)
    assert not result.ok and all("full: 4/4" in p for p in result.problems) and len(custom(emu)) == 4
    assert sc.claim(V6).host_cidr is None

    # release takes both of a host's blocks, and nobody else's
    v4_b = sb.claim(CLUSTER).host_cidr
    assert sorted(r.destination for r in b.release()) == sorted([block_b, v4_b])
    assert wait_for(lambda: block_b not in by_dest(emu) and v4_b not in by_dest(emu), 10)
    assert hop(by_dest(emu)[block_a]) == ME
