"""The RouteKeeper through the real aliyun provider against the real emulator over HTTP on 127.0.0.1,
each host with its own Store in tmp_path: claim, restart, faults, racing hosts, drift, Pending, quota,
ownership (sync, release, gc), the background reconciler, and no secret in any log."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from conftest import wait_for

from aliyun_fakes import closed_port, serving_emulator

from vpcnet import routes as routes_mod
from vpcnet.cloud import Route
from vpcnet.cloud.aliyun import AliyunProvider
from vpcnet.config import Config
from vpcnet.errors import Fatal, NotReady, Retryable
from vpcnet.routes import FATAL, PENDING, TRANSIENT, Backoff, RouteKeeper
from vpcnet.store import Store

KEY_ID = "emu-key-id"
SECRET = "S3cret-routes-never-logged-5b7e"         # distinctive, so a leak is found by a plain search
STS_KEY, STS_SECRET, STS_TOKEN = "STS.routes", "sts-S3cret-never-logged-91c2", "sts-T0ken-never-logged-3d4f"
SECRETS = (SECRET, STS_SECRET, STS_TOKEN)
TABLE, VPC, REGION = "vtb-routes01", "vpc-routes01", "cn-emu-1"
CLUSTER = "10.200.0.0/16"
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


FAST = dict(attempts=12, base=0.01, cap=0.1, deadline=20)


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
    assert (claim.host_cidr, claim.route_ok, claim.reason) == ("10.200.0.0/24", True, "")
    [entry] = custom(emu)
    assert (entry["DestinationCidrBlock"], hop(entry), entry["Status"]) == ("10.200.0.0/24", ME, "Available")
    assert entry["RouteEntryName"].startswith("vpcnet") and entry["Description"].startswith("vpcnet")
    # first start: 1 listing pass + 1 create + 1 listing that sees it Available (+ the vSwitch lookup)
    assert keeper.calls == {"list": 2, "create": 1, "delete": 0, "reserved": 1, "instance": 0}
    counts = emu.request_counts
    assert counts["CreateRouteEntry"] == 1 and counts["DescribeRouteEntryList"] == 2

    # per container: IPAM reads the store, no cloud call at all
    emu.reset_request_counts()
    for _ in range(50):
        assert keeper.host_cidr(CLUSTER) == "10.200.0.0/24"
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
    assert store3.claim(CLUSTER).host_cidr == "10.200.0.0/24"
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
    assert store.claim(CLUSTER).host_cidr == "10.200.0.0/24"
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
    for (keeper, store), iid in zip(keepers, instances):
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
    for iid, block in zip(instances, blocks):
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
    assert claim.host_cidr == "10.200.0.0/24" and not claim.route_ok
    assert keeper.host_cidr(CLUSTER) == "10.200.0.0/24"     # IPAM answers once the block is claimed
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
    emu.add_custom_entry("10.200.0.0/24", OTHER, name="vpcnet-10-200-0-0-24")
    emu.add_custom_entry("10.200.1.0/24", OTHER, name="vpcnet-10-200-1-0-24")
    keeper, store = hosts(ME)
    result = keeper.reconcile(wait_pending=5)
    assert not result.ok and result.kinds == [FATAL]
    problem = result.problems[0]
    assert TABLE in problem and "full" in problem
    assert "quota is 2" in problem and "default limit is 200" in problem
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
    assert store.claim(CLUSTER).host_cidr == "10.200.0.0/24"
    assert made[0].reserved_calls == (3 if isinstance(exc, Retryable) else 1)   # through the backoff
    assert "claiming without avoiding them" in caplog.text


def test_reserved_cidrs_are_avoided(emu, hosts):
    class Reserved(AliyunProvider):
        def reserved_cidrs(self):
            return ["10.200.0.0/23", "fd00::/64"]

    keeper, store = hosts(ME, provider_factory=lambda: Reserved(keeper.config))
    assert keeper.reconcile(wait_pending=5).ok
    assert store.claim(CLUSTER).host_cidr == "10.200.2.0/24"


class StaleFirstListing(AliyunProvider):
    """The first listing is empty, as if taken just before other entries were made: the keeper's create
    then meets DuplicateRoute and must decide from a fresh listing."""

    def __init__(self, config):
        super().__init__(config)
        self.listings = 0

    def list_routes(self):
        self.listings += 1
        routes = super().list_routes()
        return [r for r in routes if r.kind == "System"] if self.listings == 1 else routes


def test_duplicate_on_our_own_marked_route_adopts_it(emu, hosts):
    # a vpcnet-marked route to this instance the first listing did not show (an earlier create of ours)
    emu.add_custom_entry("10.200.0.0/24", ME, name="vpcnet-10-200-0-0-24", description="vpcnet: host CIDR")
    keeper, store = hosts(ME, provider_factory=lambda: StaleFirstListing(keeper.config))
    result = keeper.reconcile(wait_pending=5)
    assert result.ok, result.problems
    assert store.claim(CLUSTER).host_cidr == "10.200.0.0/24"
    assert keeper.calls["create"] == 1 and len(custom(emu)) == 1


def test_duplicate_on_a_hand_made_route_to_us_never_adopts_it(emu, hosts):
    # hand-made (unmarked) route to this very instance on the first block: never adopted, but a
    # vpcnet-marked route to this instance seen in the fresh listing is this host's block
    emu.add_custom_entry("10.200.0.0/24", ME, name="by-hand", description="ops made this")
    emu.add_custom_entry("10.200.1.0/24", ME, name="vpcnet-10-200-1-0-24", description="vpcnet: host CIDR")
    keeper, store = hosts(ME, provider_factory=lambda: StaleFirstListing(keeper.config))
    result = keeper.reconcile(wait_pending=5)
    assert result.ok, result.problems
    assert store.claim(CLUSTER).host_cidr == "10.200.1.0/24"
    assert keeper.calls["create"] == 1                     # only the duplicate attempt on 10.200.0.0/24
    assert len(custom(emu)) == 2


def test_duplicate_held_by_a_hand_made_route_to_us_moves_on(emu, hosts):
    emu.add_custom_entry("10.200.0.0/24", ME, name="by-hand")
    emu.add_custom_entry("10.200.1.0/24", OTHER, name="vpcnet-10-200-1-0-24")
    keeper, store = hosts(ME, provider_factory=lambda: StaleFirstListing(keeper.config))
    assert keeper.reconcile(wait_pending=5).ok
    assert store.claim(CLUSTER).host_cidr == "10.200.2.0/24"
    dests = by_dest(emu)
    assert hop(dests["10.200.0.0/24"]) == ME and dests["10.200.0.0/24"]["RouteEntryName"] == "by-hand"
    assert hop(dests["10.200.1.0/24"]) == OTHER
    assert hop(dests["10.200.2.0/24"]) == ME


# -- ownership: sync, release, gc --------------------------------------------------------------------------
def test_ownership_foreign_system_and_hand_made_routes_survive(emu, hosts):
    emu.register_instance(DEAD, "192.168.0.99")
    emu.add_custom_entry("10.200.0.0/24", OTHER, name="vpcnet-10-200-0-0-24")         # another live host
    emu.add_custom_entry("10.200.1.0/24", ME, name="by-hand", description="ops")       # hand-made, to us
    emu.add_custom_entry("10.200.2.0/24", DEAD, name="by-hand-dead")                   # hand-made, dead hop
    emu.add_custom_entry("10.200.3.0/24", DEAD, name="vpcnet-10-200-3-0-24")          # vpcnet's, dead hop
    emu.add_custom_entry("10.99.0.0/24", ME, name="vpcnet-10-99-0-0-24")              # ours, other cluster
    emu.add_custom_entry("10.99.1.0/24", DEAD, name="vpcnet-10-99-1-0-24")            # dead, other cluster
    emu.add_custom_entry("0.0.0.0/0", OTHER, name="nat-gateway")                      # wide, foreign
    emu.add_system_entry("10.201.0.0/24")                                             # another vSwitch
    emu.deregister_instance(DEAD)
    before = by_dest(emu)
    keeper, store = hosts(ME)

    assert keeper.reconcile(wait_pending=5).ok                    # sync
    mine = store.claim(CLUSTER).host_cidr
    assert mine == "10.200.4.0/24"                                # neither adopted nor overlapped anything
    after_sync = by_dest(emu)
    assert set(after_sync) == set(before) | {mine}
    for dest, entry in before.items():
        assert after_sync[dest]["RouteEntryId"] == entry["RouteEntryId"]

    table, me, routes = keeper.table()
    owners = {r.destination: keeper.ownership(r, me, keeper.clusters()) for r in routes}
    assert table == TABLE and me == ME
    assert owners[mine] == "mine"
    assert owners["10.200.0.0/24"] == owners["10.200.3.0/24"] == "ours-other-host"
    assert owners["10.200.1.0/24"] == owners["10.200.2.0/24"] == owners["0.0.0.0/0"] == "foreign"
    assert owners["10.99.0.0/24"] == "ours-other-cluster"
    assert owners["100.64.0.0/10"] == "foreign"

    garbage = keeper.garbage()                                      # gc: only vpcnet's dead-hop route
    assert [r.destination for r in garbage] == ["10.200.3.0/24"]
    assert keeper.delete_garbage(garbage) == garbage
    assert set(by_dest(emu)) == (set(before) | {mine}) - {"10.200.3.0/24"}

    removed = keeper.release()                                      # release: only this host's route
    assert [r.destination for r in removed] == [mine]
    assert set(by_dest(emu)) == set(before) - {"10.200.3.0/24"}
    assert store.claims() == []
    assert keeper.calls["delete"] == 2


def test_gc_keeps_routes_when_it_cannot_tell_whether_the_instance_exists(emu, hosts, tmp_path):
    emu.add_custom_entry("10.200.5.0/24", DEAD, name="vpcnet-10-200-5-0-24")
    keeper, _ = hosts(ME, aliyun_ecs_endpoint=f"http://127.0.0.1:{closed_port()}/")
    assert keeper.garbage() == []
    assert "10.200.5.0/24" in by_dest(emu)


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
        assert keeper.calls["list"] - lists <= 2 + int(spam / routes_mod.MIN_PASS_GAP)
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
    monkeypatch.setattr(routes_mod, "LEADER_POLL", 0.1)
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
