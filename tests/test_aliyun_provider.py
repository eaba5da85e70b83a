"""The aliyun provider against the real emulator over HTTP (and, for answers the emulator never gives,
against a small fake API): routes created, listed across pages and deleted; every error class mapped."""
from __future__ import annotations

import logging
import os
import time

import pytest
from aliyun_fakes import ApiHandler, ApiState, blocks_of, closed_port, serve, serving_emulator

from vpcnet.cloud import DuplicateRoute, QuotaExceeded, Route, route_name
from vpcnet.cloud.aliyun import rpc
from vpcnet.cloud.aliyun.provider import AliyunProvider, _ecs_endpoint
from vpcnet.config import Config
from vpcnet.errors import Fatal, Retryable
from vpcnet_lab.emulator.faults import FAULT_STATUS

KEY_ID, SECRET = "emu-key-id", "emu-key-secret"
ME, OTHER = "i-emu-h1", "i-emu-h2"
TABLE, VPC, REGION = "vtb-emu0001", "vpc-emu0001", "cn-emu-1"


@pytest.fixture
def emu():
    with serving_emulator({ME: "192.168.77.2", OTHER: "192.168.77.3"}, region=REGION, vpc_id=VPC,
                          route_table_id=TABLE, credentials={KEY_ID: SECRET}, pending_delay=0.0, quota=200,
                          seed=7) as e:
        yield e


@pytest.fixture
def providers():
    made = []
    yield made
    for p in made:
        p.close()


def config(endpoint: str, **kw) -> Config:
    values = dict(provider="aliyun", aliyun_endpoint=endpoint, aliyun_region_id=REGION,
                  aliyun_route_table_id=TABLE, aliyun_vpc_id=VPC, aliyun_instance_id=ME,
                  aliyun_access_key_id=KEY_ID, aliyun_access_key_secret=SECRET,
                  # a closed port: any unexpected metadata lookup fails at once, and never leaves the host
                  aliyun_metadata_url=f"http://127.0.0.1:{closed_port()}")
    values.update(kw)
    return Config(**values)


@pytest.fixture
def make(providers):
    def _make(endpoint: str, **kw) -> AliyunProvider:
        p = AliyunProvider(config(endpoint, **kw))
        providers.append(p)
        return p
    return _make


def custom(routes: list[Route]) -> list[Route]:
    return [r for r in routes if r.kind == "Custom"]


# -- the happy path ------------------------------------------------------------------------------------
def test_create_list_delete(emu, make):
    p = make(emu.test_url)
    p.create_route("10.200.1.0/24", "vpcnet-10-200-1-0-24", "vpcnet: host CIDR 10.200.1.0/24", "tok-1")
    routes = p.list_routes()
    [mine] = custom(routes)
    assert mine.destination == "10.200.1.0/24"
    assert (mine.next_hop, mine.next_hop_type, mine.status) == (ME, "Instance", "Available")
    assert mine.name == "vpcnet-10-200-1-0-24" and mine.marked
    assert mine.description == "vpcnet: host CIDR 10.200.1.0/24"
    assert mine.route_id.startswith("rte-")
    system = [r for r in routes if r.kind == "System"]
    assert system and all(r.next_hop == "" for r in system)
    p.delete_route(mine)
    assert custom(p.list_routes()) == []


def test_delete_of_an_entry_already_gone_succeeds(emu, make):
    p = make(emu.test_url)
    p.create_route("10.200.2.0/24", "vpcnet-x", "vpcnet: x", "tok-2")
    [route] = custom(p.list_routes())
    p.delete_route(route)
    p.delete_route(route)                                          # by id, gone
    p.delete_route(Route(destination="10.200.2.0/24", next_hop=ME))  # by destination, gone


def test_delete_by_destination_and_next_hop(emu, make):
    p = make(emu.test_url)
    p.create_route("10.200.3.0/24", "vpcnet-x", "vpcnet: x", "tok-3")
    p.delete_route(Route(destination="10.200.3.0/24", next_hop=ME))
    assert custom(p.list_routes()) == []


def test_a_retried_create_with_the_same_client_token_is_idempotent(emu, make):
    p = make(emu.test_url)
    for _ in range(3):
        p.create_route("10.200.4.0/24", "vpcnet-x", "vpcnet: x", "same-token")
    assert len(custom(p.list_routes())) == 1


def test_pending_entries_are_listed_as_pending_and_turn_available(emu, make):
    emu.configure(pending_delay=0.4)
    p = make(emu.test_url)
    p.create_route("10.200.5.0/24", "vpcnet-x", "vpcnet: x", "tok-5")
    [route] = custom(p.list_routes())
    assert route.status == "Pending"
    with pytest.raises(Retryable, match="IncorrectRouteEntryStatus"):
        p.delete_route(route)                      # only Available entries can be deleted
    with pytest.raises(Retryable, match="TaskConflict"):
        p.create_route("10.200.6.0/24", "vpcnet-y", "vpcnet: y", "tok-6")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and custom(p.list_routes())[0].status != "Available":
        time.sleep(0.1)
    assert custom(p.list_routes())[0].status == "Available"


def test_listing_pages_over_more_than_100_entries(emu, make):
    emu.configure(quota=1000)
    for i in range(250):
        emu.add_custom_entry(f"10.{100 + i // 200}.{i % 200}.0/24", OTHER, name=f"hand-{i}")
    p = make(emu.test_url)
    p.create_route("10.200.7.0/24", "vpcnet-x", "vpcnet: x", "tok-7")
    emu.reset_request_counts()
    routes = p.list_routes()
    assert len(custom(routes)) == 251
    assert len({r.route_id for r in routes}) == len(routes)
    assert any(r.next_hop == ME and r.destination == "10.200.7.0/24" for r in routes)
    pages = emu.request_counts["DescribeRouteEntryList"]
    assert pages == (len(routes) + 99) // 100


def test_route_table_is_discovered_from_the_vpc_id(emu, make):
    emu.add_route_table("vtb-other0001", "vpc-other0001")
    p = make(emu.test_url, aliyun_route_table_id="")
    assert p.table_id() == TABLE
    p.create_route("10.200.8.0/24", "vpcnet-x", "vpcnet: x", "tok-8")
    assert [r.destination for r in custom(p.list_routes())] == ["10.200.8.0/24"]
    assert emu.request_counts["DescribeRouteTableList"] == 1   # found once, then remembered


def test_vpc_without_a_route_table_is_fatal(emu, make):
    p = make(emu.test_url, aliyun_route_table_id="", aliyun_vpc_id="vpc-nothere")
    with pytest.raises(Fatal, match="no route table found for VPC vpc-nothere"):
        p.list_routes()
    assert "not yet known" in p.table_id()


def test_instance_exists_asks_ecs_describe_instances(emu, make):
    p = make(emu.test_url)
    assert p.instance_exists(ME)
    assert not p.instance_exists("i-emu-gone")


def test_instance_exists_says_true_when_unsure(emu, make):
    emu.set_faults(rate=1.0, codes=("ServiceUnavailable",))
    p = make(emu.test_url)
    assert p.instance_exists("i-emu-gone")
    unreachable = make(f"http://127.0.0.1:{closed_port()}/")
    assert unreachable.instance_exists("i-emu-gone")


def test_reserved_cidrs_is_empty_where_describe_vswitches_is_missing(emu, make):
    assert make(emu.test_url).reserved_cidrs() == []


def test_reserved_cidrs_lists_vswitch_cidrs_when_the_endpoint_has_them(make):
    state = ApiState(secrets={KEY_ID: SECRET}, answers={"DescribeVSwitches": (200, {
        "TotalCount": 2, "VSwitches": {"VSwitch": [{"VSwitchId": "vsw-1", "CidrBlock": "192.168.0.0/24"},
                                                   {"VSwitchId": "vsw-2", "CidrBlock": "192.168.1.0/24"}]}})})
    url, stop = serve(ApiHandler, state)
    try:
        p = make(url + "/")
        assert p.reserved_cidrs() == ["192.168.0.0/24", "192.168.1.0/24"]
        assert p.reserved_cidrs() == ["192.168.0.0/24", "192.168.1.0/24"]
        assert len(state.calls) == 1               # cached
        assert state.calls[0]["VpcId"] == VPC
    finally:
        stop()


# -- errors from the emulator ------------------------------------------------------------------------------
def test_duplicate_destination_raises_duplicate_route(emu, make):
    emu.add_custom_entry("10.200.9.0/24", OTHER, name="vpcnet-other")
    p = make(emu.test_url)
    with pytest.raises(DuplicateRoute, match="10.200.9.0/24"):
        p.create_route("10.200.9.0/24", "vpcnet-x", "vpcnet: x", "tok-9")


def test_full_table_raises_quota_exceeded_naming_table_and_limit(emu, make):
    emu.configure(quota=2)
    p = make(emu.test_url)
    p.create_route("10.200.10.0/24", "vpcnet-a", "vpcnet: a", "tok-10")
    p.create_route("10.200.11.0/24", "vpcnet-b", "vpcnet: b", "tok-11")
    with pytest.raises(QuotaExceeded) as err:
        p.create_route("10.200.12.0/24", "vpcnet-c", "vpcnet: c", "tok-12")
    assert TABLE in str(err.value) and "200 custom entries" in str(err.value)
    assert isinstance(err.value, Fatal)


def test_bad_secret_is_fatal_signature_mismatch_without_the_secret(emu, make, caplog):
    caplog.set_level(logging.DEBUG)
    p = make(emu.test_url, aliyun_access_key_secret="the-wrong-secret")
    with pytest.raises(Fatal, match="SignatureDoesNotMatch") as err:
        p.list_routes()
    assert not isinstance(err.value, Retryable)
    assert "check the AccessKey secret" in str(err.value)
    for text in (str(err.value), repr(err.value), caplog.text, repr(p)):
        assert "the-wrong-secret" not in text and SECRET not in text


def test_unknown_access_key_is_fatal(emu, make):
    p = make(emu.test_url, aliyun_access_key_id="nobody")
    with pytest.raises(Fatal, match="InvalidAccessKeyId.NotFound"):
        p.list_routes()


def test_unknown_route_table_is_fatal(emu, make):
    p = make(emu.test_url, aliyun_route_table_id="vtb-nothere")
    with pytest.raises(Fatal, match="InvalidRouteTableId.NotFound.*VPCNET_ALIYUN_ROUTE_TABLE_ID"):
        p.list_routes()


def test_unknown_next_hop_instance_is_fatal(emu, make):
    p = make(emu.test_url, aliyun_instance_id="i-emu-unknown")
    with pytest.raises(Fatal, match="InvalidInstanceId.NotFound"):
        p.create_route("10.200.13.0/24", "vpcnet-x", "vpcnet: x", "tok-13")


def test_destination_overlapping_a_system_range_is_fatal(emu, make):
    p = make(emu.test_url)
    with pytest.raises(Fatal, match="InvalidCidrBlock.*VPCNET_CLUSTER_CIDR") as err:
        p.create_route("100.64.1.0/24", "vpcnet-x", "vpcnet: x", "tok-14")
    assert not isinstance(err.value, (Retryable, DuplicateRoute))


@pytest.mark.parametrize("code", sorted(FAULT_STATUS))
def test_every_injected_fault_is_retryable(emu, make, code):
    emu.set_faults(rate=1.0, codes=(code,))
    p = make(emu.test_url)
    with pytest.raises(Retryable, match=code):
        p.list_routes()
    with pytest.raises(Retryable, match=code):
        p.create_route("10.200.15.0/24", "vpcnet-x", "vpcnet: x", "tok-15")
    emu.set_faults(rate=0.0)
    assert custom(p.list_routes()) == []          # a faulted create changed nothing


def test_unreachable_endpoint_is_retryable_at_once(make):
    p = make(f"http://127.0.0.1:{closed_port()}/")
    start = time.monotonic()
    with pytest.raises(Retryable, match="cannot reach .*connection refused"):
        p.list_routes()
    assert time.monotonic() - start < rpc.API_TIMEOUT[0] + 1


def test_a_slow_endpoint_is_retryable_after_the_read_timeout(emu, make, monkeypatch):
    monkeypatch.setattr(rpc, "API_TIMEOUT", (1.0, 0.3))
    emu.set_faults(rate=0.0, latency=1.5)
    p = make(emu.test_url)
    start = time.monotonic()
    with pytest.raises(Retryable, match="did not answer"):
        p.list_routes()
    assert time.monotonic() - start < 1.5


def test_ram_role_keys_work_against_the_emulator(emu, make, tmp_path):
    """STS keys with a SecurityToken, here from a credentials file (the metadata path is tested apart)."""
    emu.add_sts_credentials("STS.emu", "sts-emu-secret", "sts-emu-token")
    path = tmp_path / "creds"
    path.write_text("access_key_id = STS.emu\naccess_key_secret = sts-emu-secret\nsecurity_token = sts-emu-token\n")
    os.chmod(path, 0o600)
    p = make(emu.test_url, aliyun_access_key_id="", aliyun_access_key_secret="", aliyun_credentials_file=str(path))
    assert custom(p.list_routes()) == []


# -- answers the emulator never gives: a fake API --------------------------------------------------------
@pytest.fixture
def fake_api():
    state = ApiState(secrets={KEY_ID: SECRET})
    url, stop = serve(ApiHandler, state)
    state.url = url + "/"
    try:
        yield state
    finally:
        stop()


RETRYABLE = ["TaskConflict", "OperationConflict", "IncorrectRouteEntryStatus", "IncorrectStatus.RouteTableStatus",
             "IncorrectVpcStatus", "IncorrectInstanceStatus", "Throttling", "Throttling.User", "Throttling.Api",
             "ServiceUnavailable", "InternalError", "SystemBusy", "UnknownError", "SignatureNonceUsed"]


@pytest.mark.parametrize("code", RETRYABLE)
@pytest.mark.parametrize("status", [400, 503])
def test_every_retryable_code_is_retryable(fake_api, make, code, status):
    fake_api.answers["DescribeRouteEntryList"] = (status, {"Code": code, "Message": "try later"})
    with pytest.raises(Retryable, match=code):
        make(fake_api.url).list_routes()


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_any_5xx_is_retryable_even_with_an_unknown_code(fake_api, make, status):
    fake_api.answers["DescribeRouteEntryList"] = (status, {"Code": "SomethingNew", "Message": "oops"})
    with pytest.raises(Retryable, match="SomethingNew"):
        make(fake_api.url).list_routes()


@pytest.mark.parametrize("code", ["InvalidCIDRBlock.Duplicate", "InvalidRouteEntry.Duplicate",
                                  "RouterEntryConflict.Duplicated"])
def test_every_duplicate_code_is_duplicate_route(fake_api, make, code):
    fake_api.answers["CreateRouteEntry"] = (400, {"Code": code, "Message": "exists"})
    with pytest.raises(DuplicateRoute):
        make(fake_api.url).create_route("10.200.16.0/24", "vpcnet-x", "vpcnet: x", "tok-16")


@pytest.mark.parametrize("code,hint", [
    ("InvalidTimeStamp.Expired", "clock"),
    ("Forbidden.RAM", "vpc:CreateRouteEntry"),
    ("InvalidCidrBlock.Malformed", "not a valid CIDR"),
    ("InvalidAccessKeyId.Inactive", "disabled"),
    ("SomethingNobodyKnows", "error reference"),
])
def test_fatal_codes_say_what_to_check(fake_api, make, code, hint):
    fake_api.answers["DescribeRouteEntryList"] = (400, {"Code": code, "Message": "no"})
    with pytest.raises(Fatal, match=code) as err:
        make(fake_api.url).list_routes()
    assert hint in str(err.value)
    assert not isinstance(err.value, (Retryable, DuplicateRoute, QuotaExceeded))


@pytest.mark.parametrize("code", ["InvalidRouteEntry.NotFound", "InvalidRouteEntryId.NotFound"])
def test_delete_of_a_missing_entry_is_success(fake_api, make, code):
    fake_api.answers["DeleteRouteEntry"] = (404, {"Code": code, "Message": "gone"})
    make(fake_api.url).delete_route(Route(destination="10.200.17.0/24", next_hop=ME, route_id="rte-1"))


def test_non_json_answers(fake_api, make):
    p = make(fake_api.url)
    fake_api.answers["DescribeRouteEntryList"] = (200, {"NotRoutes": True})
    assert p.list_routes() == []                         # a well-formed but empty answer
    # A proxy error page (no JSON) with 502 is retryable; a 404 page means a wrong endpoint URL.
    url, stop = serve(_HtmlHandler, None)
    try:
        q = make(url + "/")
        _HtmlHandler.status = 502
        with pytest.raises(Retryable, match="HTTP 502"):
            q.list_routes()
        _HtmlHandler.status = 404
        with pytest.raises(Fatal, match="HTTP 404.*VPCNET_ALIYUN_ENDPOINT"):
            q.list_routes()
    finally:
        stop()


class _HtmlHandler(ApiHandler):
    status = 502

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(self.status, "<html>bad gateway</html>", "text/html")


def test_create_sends_the_documented_parameters(fake_api, make):
    make(fake_api.url).create_route("10.200.18.0/24", "vpcnet-n", "vpcnet: d", "tok-18")
    call = fake_api.calls[-1]
    assert {k: call[k] for k in ("Action", "Version", "Format", "SignatureMethod", "SignatureVersion",
                                 "RegionId", "RouteTableId", "DestinationCidrBlock", "NextHopType",
                                 "NextHopId", "RouteEntryName", "Description", "ClientToken")} == {
        "Action": "CreateRouteEntry", "Version": "2016-04-28", "Format": "JSON", "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0", "RegionId": REGION, "RouteTableId": TABLE,
        "DestinationCidrBlock": "10.200.18.0/24", "NextHopType": "Instance", "NextHopId": ME,
        "RouteEntryName": "vpcnet-n", "Description": "vpcnet: d", "ClientToken": "tok-18"}
    assert time.strptime(call["Timestamp"], "%Y-%m-%dT%H:%M:%SZ")
    assert "SecurityToken" not in call
    make(fake_api.url).list_routes()
    assert fake_api.calls[-1]["SignatureNonce"] != call["SignatureNonce"]
    assert fake_api.calls[-1]["MaxResult"] == "100"


def test_paging_that_never_ends_is_bounded(fake_api, make):
    fake_api.answers["DescribeRouteEntryList"] = (200, {"RouteEntrys": {"RouteEntry": []}, "NextToken": "same"})
    with pytest.raises(Retryable, match="NextToken repeated"):
        make(fake_api.url).list_routes()
    assert len(fake_api.calls) == 2


# -- with the route keeper ---------------------------------------------------------------------------------
def test_route_keeper_claims_a_block_through_the_emulator_despite_faults(emu, tmp_path):
    from vpcnet.routes.backoff import Backoff
    from vpcnet.routes.keeper import RouteKeeper
    from vpcnet.state.store import Store

    emu.set_faults(rate=0.3, codes=("Throttling", "ServiceUnavailable", "InternalError"))
    first, second = blocks_of(ME, "10.200.0.0/16", 2)
    emu.add_custom_entry(first, OTHER, name=route_name(first))                 # another host's block
    cfg = config(emu.test_url, state_dir=str(tmp_path))
    store = Store(cfg.db_path)
    keeper = RouteKeeper(cfg, store, backoff=Backoff(attempts=12, base=0.01, cap=0.1, deadline=20))
    try:
        result = keeper.reconcile(wait_pending=5)
        assert result.ok, result.problems
        assert store.claim(cfg.cluster_cidr).host_cidr == second
        emu.set_faults(rate=0.0)
        mine = [e for e in emu.entries(TABLE) if e["NextHops"]["NextHop"][0]["NextHopId"] == ME]
        assert [e["DestinationCidrBlock"] for e in mine] == [second]
    finally:
        keeper.provider.close()
        store.close()


def test_reserved_cidrs_is_empty_when_describe_vswitches_is_forbidden(fake_api, make):
    fake_api.answers["DescribeVSwitches"] = (403, {"Code": "Forbidden.RAM", "Message": "no"})
    assert make(fake_api.url).reserved_cidrs() == []


@pytest.mark.parametrize("vpc,ecs", [
    ("https://vpc.cn-hangzhou.aliyuncs.com/", "https://ecs.cn-hangzhou.aliyuncs.com/"),
    ("https://vpc.aliyuncs.com", "https://ecs.aliyuncs.com"),
    ("https://vpc-vpc.cn-hangzhou.aliyuncs.com/", "https://ecs-vpc.cn-hangzhou.aliyuncs.com/"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/"),
])
def test_ecs_endpoint_sits_next_to_the_vpc_endpoint(vpc, ecs):
    assert _ecs_endpoint(vpc) == ecs


# -- several tables: CreateRouteEntries ------------------------------------------------------------------
TABLE_B, TABLE_C = "vtb-emu000b", "vtb-emu000c"


def _three_tables(emu) -> str:
    emu.add_route_table(TABLE_B)
    emu.add_route_table(TABLE_C)
    return f"{TABLE},{TABLE_B},{TABLE_C}"


def _mine(emu, table: str, instance: str = ME) -> list[str]:
    return [e["DestinationCidrBlock"] for e in emu.entries(table)
            if e["Type"] == "Custom" and e["NextHops"]["NextHop"][0]["NextHopId"] == instance]


def test_create_routes_writes_several_tables_in_one_call(emu, make):
    p = make(emu.test_url, aliyun_route_table_id=_three_tables(emu))
    emu.reset_request_counts()
    results = p.create_routes("10.200.3.0/24", "vpcnet-x", "vpcnet: x", "tok-1", [TABLE, TABLE_B, TABLE_C])
    assert results == {TABLE: None, TABLE_B: None, TABLE_C: None}
    assert emu.request_counts == {"CreateRouteEntries": 1}
    for table in (TABLE, TABLE_B, TABLE_C):
        [entry] = [e for e in emu.entries(table) if e["DestinationCidrBlock"] == "10.200.3.0/24"]
        assert entry["RouteEntryName"] == "vpcnet-x" and entry["Description"] == "vpcnet: x"   # the marker
    # the same call again (its answer was lost): the same token creates nothing twice
    assert p.create_routes("10.200.3.0/24", "vpcnet-x", "vpcnet: x", "tok-1", [TABLE, TABLE_B, TABLE_C]) == \
        {TABLE: None, TABLE_B: None, TABLE_C: None}
    assert all(_mine(emu, t) == ["10.200.3.0/24"] for t in (TABLE, TABLE_B, TABLE_C))


def test_a_partial_batch_failure_is_reported_per_table(emu, make):
    """One entry lands, one table already routes the block elsewhere, one is full: each table gets its own
    answer and nothing is rolled back or retried; the quota error names the table, figures and remedy."""
    p = make(emu.test_url, aliyun_route_table_id=_three_tables(emu))
    emu.add_custom_entry("10.200.3.0/24", OTHER, name="vpcnet-other")          # in the first table
    emu.set_table_quota(TABLE_C, 0)
    results = p.create_routes("10.200.3.0/24", "vpcnet-x", "vpcnet: x", "tok-2", [TABLE, TABLE_B, TABLE_C])
    assert results[TABLE_B] is None
    assert isinstance(results[TABLE], DuplicateRoute) and TABLE in str(results[TABLE])
    assert isinstance(results[TABLE_C], QuotaExceeded)
    assert TABLE_C in str(results[TABLE_C]) and "quota 200" in str(results[TABLE_C])
    assert "Quota Center" in str(results[TABLE_C])
    assert _mine(emu, TABLE_B) == ["10.200.3.0/24"] and _mine(emu, TABLE_C) == []
    assert _mine(emu, TABLE, OTHER) == ["10.200.3.0/24"]


def test_a_busy_vpc_fails_the_whole_batch_retryably(emu, make):
    p = make(emu.test_url, aliyun_route_table_id=_three_tables(emu))
    emu.configure(write_interval=30)
    p.create_route("10.200.8.0/24", "vpcnet-8", "vpcnet: 8", "t8", table=TABLE)    # the VPC's last write
    from vpcnet.errors import Busy
    with pytest.raises(Busy, match="TaskConflict"):
        p.create_routes("10.200.8.0/24", "vpcnet-8", "vpcnet: 8", "t9", [TABLE_B, TABLE_C])
    assert _mine(emu, TABLE_B) == [] and _mine(emu, TABLE_C) == []                # nothing half-written


def test_an_endpoint_without_the_batch_call_gets_one_create_per_table(make, tmp_path):
    from vpcnet.cloud import BatchUnsupported
    with serving_emulator({ME: "192.168.77.2"}, region=REGION, vpc_id=VPC, route_table_id=TABLE,
                          credentials={KEY_ID: SECRET}, batch_api=False) as emu:
        tables = _three_tables(emu)
        p = make(emu.test_url, aliyun_route_table_id=tables)
        with pytest.raises(BatchUnsupported):
            p.create_routes("10.200.4.0/24", "vpcnet-4", "vpcnet: 4", "t4", [TABLE_B, TABLE_C])
        assert not p.batch_create and _mine(emu, TABLE_B) == []
        keeper, store, cfg = _keeper(emu, tmp_path, tables)
        try:
            emu.reset_request_counts()
            assert keeper.reconcile(wait_pending=5).ok
            block = store.claim(cfg.cluster_cidr).host_cidr
            assert all(_mine(emu, t) == [block] for t in (TABLE, TABLE_B, TABLE_C))
            counts = emu.request_counts
            assert counts.get("CreateRouteEntries") == 1 and counts.get("CreateRouteEntry") == 3, counts
        finally:
            keeper.close()
            store.close()


def _keeper(emu, tmp_path, tables: str, instance: str = ME):
    from vpcnet.routes.backoff import Backoff
    from vpcnet.routes.keeper import RouteKeeper
    from vpcnet.state.store import Store

    cfg = config(emu.test_url, state_dir=str(tmp_path / instance), aliyun_route_table_id=tables,
                 aliyun_instance_id=instance)
    os.makedirs(cfg.state_dir, exist_ok=True)
    store = Store(cfg.db_path)
    return RouteKeeper(cfg, store, backoff=Backoff(attempts=6, base=0.01, cap=0.05, deadline=10,
                                                   busy_base=0.05, busy_cap=0.2)), store, cfg


def test_route_keeper_fills_the_other_tables_with_one_batch(emu, tmp_path):
    tables = _three_tables(emu)
    keeper, store, cfg = _keeper(emu, tmp_path, tables)
    try:
        emu.reset_request_counts()
        assert keeper.reconcile(wait_pending=5).ok
        block = store.claim(cfg.cluster_cidr).host_cidr
        assert all(_mine(emu, t) == [block] for t in (TABLE, TABLE_B, TABLE_C))
        counts = emu.request_counts
        # the claim in the first table (the arbiter), then one call for the two others
        assert counts.get("CreateRouteEntry") == 1 and counts.get("CreateRouteEntries") == 1, counts
        # the route lost from two tables: one batch puts it back in both
        for table in (TABLE_B, TABLE_C):
            [entry] = [e for e in emu.entries(table) if e["DestinationCidrBlock"] == block]
            emu.remove_entry(entry["RouteEntryId"])
        emu.reset_request_counts()
        assert keeper.reconcile(wait_pending=5).ok
        assert emu.request_counts.get("CreateRouteEntries") == 1 and "CreateRouteEntry" not in emu.request_counts
        assert all(_mine(emu, t) == [block] for t in (TABLE, TABLE_B, TABLE_C))
        assert not os.path.exists(os.path.join(cfg.state_dir, "uncertain-routes.json"))
    finally:
        keeper.close()
        store.close()


def test_route_keeper_reports_a_full_table_of_a_batch_and_keeps_the_rest(emu, tmp_path):
    tables = _three_tables(emu)
    emu.set_table_quota(TABLE_C, 0)
    keeper, store, cfg = _keeper(emu, tmp_path, tables)
    try:
        result = keeper.reconcile(wait_pending=5)
        assert not result.ok and "fatal" in result.kinds
        block = store.claim(cfg.cluster_cidr).host_cidr
        text = " ".join(result.problems)
        assert f"{TABLE_C} is full: 0/200" in text or f"route table {TABLE_C}" in text, text
        assert _mine(emu, TABLE) == _mine(emu, TABLE_B) == [block] and _mine(emu, TABLE_C) == []
        # the cloud's own quota answer inside the batch (vpcnet's figure said there was room)
        emu.set_table_quota(TABLE_C, None)
        emu.set_table_quota(TABLE_B, 0)
        [entry] = [e for e in emu.entries(TABLE_B) if e["DestinationCidrBlock"] == block]
        emu.remove_entry(entry["RouteEntryId"])
        result = keeper.reconcile(wait_pending=5)
        assert _mine(emu, TABLE_C) == [block] and _mine(emu, TABLE_B) == []
        assert not result.ok and any(TABLE_B in p and "Quota Center" in p for p in result.problems), result.problems
    finally:
        keeper.close()
        store.close()
