"""The VPC emulator over real HTTP (127.0.0.1 only), with requests signed by the shared signer."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests
from conftest import wait_for

from vpcnet.cloud.aliyun.signature import sign
from vpcnet_lab.emulator import Emulator, serve_in_thread

KEY_ID, SECRET = "emu-key-id", "emu-key-secret"
TABLE = "vtb-emu0001"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timestamp(offset: float = 0.0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%SZ")


class Client:
    """A tiny signed-request helper (the real provider is vpcnet.cloud.aliyun)."""

    def __init__(self, url: str, key_id: str = KEY_ID, secret: str = SECRET, token: str | None = None):
        self.url, self.key_id, self.secret, self.token = url, key_id, secret, token
        self.session = requests.Session()

    def signed(self, action: str, method: str = "GET", nonce: str | None = None, skew: float = 0.0,
               **params) -> dict:
        p = {"Action": action, "Version": "2016-04-28", "Format": "JSON", "AccessKeyId": self.key_id,
             "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0",
             "SignatureNonce": nonce or uuid.uuid4().hex, "Timestamp": _timestamp(skew),
             "RegionId": "cn-emu-1"}
        if self.token is not None:
            p["SecurityToken"] = self.token
        p.update({k: str(v) for k, v in params.items()})
        p["Signature"] = sign(method, p, self.secret)
        return p

    def send(self, method: str, params: dict) -> tuple[int, dict]:
        if method == "GET":
            r = self.session.get(self.url, params=params, timeout=10)
        else:
            r = self.session.post(self.url, data=params, timeout=10)
        return r.status_code, r.json()

    def call(self, action: str, method: str = "GET", **params) -> tuple[int, dict]:
        return self.send(method, self.signed(action, method=method, **params))

    def ok(self, action: str, **params) -> dict:
        status, body = self.call(action, **params)
        assert status == 200, body
        assert body["RequestId"]
        return body

    def create(self, dest: str, hop: str = "i-host1", **params) -> tuple[int, dict]:
        params.setdefault("RouteTableId", TABLE)
        return self.call("CreateRouteEntry", DestinationCidrBlock=dest, NextHopType="Instance",
                         NextHopId=hop, **params)

    def list(self, **params) -> list[dict]:
        params.setdefault("RouteTableId", TABLE)
        out, token = [], ""
        for _ in range(100):
            body = self.ok("DescribeRouteEntryList", NextToken=token, **params) if token else \
                self.ok("DescribeRouteEntryList", **params)
            out.extend(body["RouteEntrys"]["RouteEntry"])
            token = body["NextToken"]
            if not token:
                return out
        raise AssertionError("paging did not end")


def assert_error(result: tuple[int, dict], status: int, code: str) -> dict:
    got_status, body = result
    assert (got_status, body.get("Code")) == (status, code), body
    assert set(body) >= {"RequestId", "HostId", "Code", "Message"}
    return body


@pytest.fixture
def make_emu(request):
    """Start emulators (with an HTTP server each); everything is stopped even if the test fails."""
    made = []

    def make(**kwargs):
        emu = Emulator(**kwargs)
        url, stop = serve_in_thread(emu)
        made.append((emu, stop))
        emu.register_instance("i-host1", "192.168.77.2")
        emu.register_instance("i-host2", "192.168.77.3")
        return emu, Client(url)

    yield make
    for emu, stop in made:
        stop()
        emu.close()


@pytest.fixture
def emu_client(make_emu):
    return make_emu()


# ---------------------------------------------------------------------- common parameters

def test_url_is_loopback(emu_client):
    _, client = emu_client
    assert client.url.startswith("http://127.0.0.1:") and client.url.endswith("/")


def test_signature_mismatch(emu_client):
    _, client = emu_client
    params = client.signed("DescribeRouteEntryList", RouteTableId=TABLE)
    params["RouteTableId"] = "vtb-other"            # tampered after signing
    assert_error(client.send("GET", params), 400, "SignatureDoesNotMatch")
    wrong = Client(client.url, secret="not-the-secret")
    assert_error(wrong.call("DescribeRouteEntryList", RouteTableId=TABLE), 400, "SignatureDoesNotMatch")
    # signed for GET, sent as POST: the method is part of the string to sign
    params = client.signed("DescribeRouteEntryList", RouteTableId=TABLE)
    assert_error(client.send("POST", params), 400, "SignatureDoesNotMatch")


def test_unknown_access_key(emu_client):
    _, client = emu_client
    stranger = Client(client.url, key_id="nobody", secret=SECRET)
    assert_error(stranger.call("DescribeRouteEntryList", RouteTableId=TABLE), 404, "InvalidAccessKeyId.NotFound")


def test_nonce_reuse(emu_client):
    _, client = emu_client
    nonce = uuid.uuid4().hex
    assert client.call("DescribeRouteEntryList", nonce=nonce, RouteTableId=TABLE)[0] == 200
    assert_error(client.call("DescribeRouteEntryList", nonce=nonce, RouteTableId=TABLE), 400,
                 "SignatureNonceUsed")
    # a refused (badly signed) request does not burn its nonce
    nonce2 = uuid.uuid4().hex
    bad = Client(client.url, secret="wrong")
    assert_error(bad.call("DescribeRouteEntryList", nonce=nonce2, RouteTableId=TABLE), 400, "SignatureDoesNotMatch")
    assert client.call("DescribeRouteEntryList", nonce=nonce2, RouteTableId=TABLE)[0] == 200


@pytest.mark.parametrize("skew", [-16 * 60, 16 * 60, -24 * 3600])
def test_timestamp_skew_refused(emu_client, skew):
    _, client = emu_client
    assert_error(client.call("DescribeRouteEntryList", skew=skew, RouteTableId=TABLE), 400,
                 "InvalidTimeStamp.Expired")


@pytest.mark.parametrize("skew", [-14 * 60, 14 * 60])
def test_timestamp_within_window_accepted(emu_client, skew):
    _, client = emu_client
    assert client.call("DescribeRouteEntryList", skew=skew, RouteTableId=TABLE)[0] == 200


def test_missing_and_malformed_common_params(emu_client):
    _, client = emu_client
    params = client.signed("DescribeRouteEntryList", RouteTableId=TABLE)
    del params["SignatureNonce"]
    assert_error(client.send("GET", params), 400, "MissingParameter")
    params = client.signed("DescribeRouteEntryList", RouteTableId=TABLE)
    params["Timestamp"] = "yesterday"
    params["Signature"] = sign("GET", params, SECRET)
    assert_error(client.send("GET", params), 400, "InvalidTimeStamp.Format")
    assert_error(client.call("NoSuchAction"), 404, "InvalidAction.NotFound")
    r = requests.get(client.url, timeout=5)
    assert r.status_code == 400 and r.json()["Code"] == "MissingParameter"


def test_sts_security_token(emu_client):
    emu, client = emu_client
    emu.add_sts_credentials("STS.key", "sts-secret", "the-token")
    good = Client(client.url, key_id="STS.key", secret="sts-secret", token="the-token")
    assert good.call("DescribeRouteEntryList", RouteTableId=TABLE)[0] == 200
    wrong = Client(client.url, key_id="STS.key", secret="sts-secret", token="other-token")
    status, body = wrong.call("DescribeRouteEntryList", RouteTableId=TABLE)
    assert status == 400 and body["Code"].startswith("InvalidSecurityToken")
    missing = Client(client.url, key_id="STS.key", secret="sts-secret")
    status, body = missing.call("DescribeRouteEntryList", RouteTableId=TABLE)
    assert status == 400 and "SecurityToken" in body["Code"]
    # a plain key must not come with a token
    plain = Client(client.url, token="the-token")
    status, body = plain.call("DescribeRouteEntryList", RouteTableId=TABLE)
    assert status == 400 and body["Code"].startswith("InvalidSecurityToken")


def test_post_form_accepted(emu_client):
    _, client = emu_client
    status, body = client.call("CreateRouteEntry", method="POST", RouteTableId=TABLE,
                               DestinationCidrBlock="10.20.0.0/24", NextHopType="Instance", NextHopId="i-host1")
    assert status == 200 and body["RouteEntryId"]
    status, body = client.call("DescribeRouteEntryList", method="POST", RouteTableId=TABLE,
                               DestinationCidrBlock="10.20.0.0/24")
    assert status == 200 and [e["RouteEntryId"] for e in body["RouteEntrys"]["RouteEntry"]] == \
        [body["RouteEntrys"]["RouteEntry"][0]["RouteEntryId"]]


# ---------------------------------------------------------------------- actions: happy paths

def test_fresh_table_has_system_entries(emu_client):
    _, client = emu_client
    entries = client.list()
    system = {e["DestinationCidrBlock"]: e for e in entries if e["Type"] == "System"}
    assert "192.168.0.0/24" in system and "100.64.0.0/10" in system
    assert all(e["Status"] == "Available" for e in system.values())
    assert not [e for e in entries if e["Type"] == "Custom"]


def test_create_describe_delete(emu_client):
    emu, client = emu_client
    status, body = client.create("10.10.1.0/24", RouteEntryName="vpcnet-host1", Description="vpcnet route")
    assert status == 200 and body["RouteEntryId"].startswith("rte-")
    entry_id = body["RouteEntryId"]
    custom = client.list(RouteEntryType="Custom")
    assert len(custom) == 1
    e = custom[0]
    assert e == {**e, "RouteEntryId": entry_id, "RouteEntryName": "vpcnet-host1", "RouteTableId": TABLE,
                 "DestinationCidrBlock": "10.10.1.0/24", "Type": "Custom", "Status": "Available",
                 "Description": "vpcnet route"}
    assert e["NextHops"]["NextHop"][0] == {**e["NextHops"]["NextHop"][0], "NextHopId": "i-host1",
                                           "NextHopType": "Instance"}
    # filters
    assert [x["RouteEntryId"] for x in client.list(DestinationCidrBlock="10.10.1.0/24")] == [entry_id]
    assert client.list(DestinationCidrBlock="10.10.2.0/24") == []
    assert all(x["Type"] == "System" for x in client.list(RouteEntryType="System"))
    assert [x["DestinationCidrBlock"] for x in emu.entries(TABLE) if x["Type"] == "Custom"] == ["10.10.1.0/24"]
    # delete by id
    assert client.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId=entry_id)[0] == 200
    assert client.list(RouteEntryType="Custom") == []
    # delete by destination + next hop
    client.create("10.10.3.0/24", hop="i-host2")
    assert_error(client.call("DeleteRouteEntry", RouteTableId=TABLE, DestinationCidrBlock="10.10.3.0/24",
                             NextHopId="i-host1"), 404, "InvalidRouteEntry.NotFound")
    assert client.call("DeleteRouteEntry", RouteTableId=TABLE, DestinationCidrBlock="10.10.3.0/24",
                       NextHopId="i-host2")[0] == 200
    assert client.list(RouteEntryType="Custom") == []


def test_describe_route_table_list(emu_client):
    emu, client = emu_client
    emu.add_route_table("vtb-emu0002")
    emu.add_route_table("vtb-othervpc", vpc_id="vpc-other")
    body = client.ok("DescribeRouteTableList", VpcId="vpc-emu0001")
    tables = body["RouterTableList"]["RouterTableListType"]
    assert sorted(t["RouteTableId"] for t in tables) == [TABLE, "vtb-emu0002"]
    assert body["TotalCount"] == 2
    assert all(t["VpcId"] == "vpc-emu0001" for t in tables)
    assert {t["RouteTableId"]: t["RouteTableType"] for t in tables} == {TABLE: "System", "vtb-emu0002": "Custom"}
    body = client.ok("DescribeRouteTableList", RouteTableId="vtb-othervpc")
    assert [t["VpcId"] for t in body["RouterTableList"]["RouterTableListType"]] == ["vpc-other"]
    assert client.ok("DescribeRouteTableList", VpcId="vpc-nope")["TotalCount"] == 0
    # a second table is independent and has its own system entries
    assert client.create("10.30.0.0/24", RouteTableId="vtb-emu0002")[0] == 200
    assert client.list(RouteTableId=TABLE, RouteEntryType="Custom") == []
    assert len(client.list(RouteTableId="vtb-emu0002", RouteEntryType="Custom")) == 1
    assert client.list(RouteTableId="vtb-emu0002", RouteEntryType="System")


def test_describe_vswitches_is_opt_in(make_emu):
    _, client = make_emu()
    assert_error(client.call("DescribeVSwitches", VpcId="vpc-emu0001"), 404, "InvalidAction.NotFound")


def test_describe_vswitches(make_emu):
    emu, client = make_emu(vswitch_api=True)
    emu.add_system_entry("192.168.1.0/24")
    emu.add_route_table("vtb-othervpc", vpc_id="vpc-other")
    body = client.ok("DescribeVSwitches", VpcId="vpc-emu0001", PageSize=50)
    assert body["TotalCount"] == 2
    assert [v["CidrBlock"] for v in body["VSwitches"]["VSwitch"]] == ["192.168.0.0/24", "192.168.1.0/24"]
    assert all(v["VpcId"] == "vpc-emu0001" and v["VSwitchId"] for v in body["VSwitches"]["VSwitch"])
    page2 = client.ok("DescribeVSwitches", VpcId="vpc-emu0001", PageSize=1, PageNumber=2)
    assert [v["CidrBlock"] for v in page2["VSwitches"]["VSwitch"]] == ["192.168.1.0/24"]
    assert client.ok("DescribeVSwitches", VpcId="vpc-nope")["TotalCount"] == 0


def test_describe_instances(emu_client):
    _, client = emu_client
    body = client.ok("DescribeInstances", InstanceIds=json.dumps(["i-host1", "i-gone"]))
    assert body["TotalCount"] == 1
    inst = body["Instances"]["Instance"]
    assert [i["InstanceId"] for i in inst] == ["i-host1"]
    assert inst[0]["VpcAttributes"]["PrivateIpAddress"]["IpAddress"] == ["192.168.77.2"]
    assert client.ok("DescribeInstances", InstanceIds='["i-gone"]')["Instances"]["Instance"] == []
    assert client.ok("DescribeInstances")["TotalCount"] == 2
    assert_error(client.call("DescribeInstances", InstanceIds="i-host1"), 400, "InvalidInstanceIds.Malformed")


def test_paging_over_more_than_100_entries(emu_client):
    emu, client = emu_client
    emu.configure(quota=300)
    for i in range(250):
        status, body = client.create(f"10.{100 + i // 200}.{i % 200}.0/24")
        assert status == 200, body
    # default page size is 100 and tokens chain to the end
    first = client.ok("DescribeRouteEntryList", RouteTableId=TABLE)
    assert len(first["RouteEntrys"]["RouteEntry"]) == 100 and first["NextToken"]
    everything = client.list()
    assert len(everything) == 252          # 250 custom + 2 system
    assert len({e["RouteEntryId"] for e in everything}) == 252
    # small pages with a filter
    small = []
    token = ""
    for _ in range(100):
        params = {"RouteTableId": TABLE, "MaxResult": 7, "RouteEntryType": "Custom"}
        if token:
            params["NextToken"] = token
        body = client.ok("DescribeRouteEntryList", **params)
        assert len(body["RouteEntrys"]["RouteEntry"]) <= 7
        small.extend(body["RouteEntrys"]["RouteEntry"])
        token = body["NextToken"]
        if not token:
            break
    assert [e["RouteEntryId"] for e in small] == [e["RouteEntryId"] for e in everything if e["Type"] == "Custom"]
    # exactly one full page: no dangling token
    body = client.ok("DescribeRouteEntryList", RouteTableId=TABLE, MaxResult=2, RouteEntryType="System")
    assert len(body["RouteEntrys"]["RouteEntry"]) == 2 and body["NextToken"] == ""
    status, body = client.call("DescribeRouteEntryList", RouteTableId=TABLE, MaxResult=101)
    assert status == 400 and body["Code"].startswith("InvalidParameter")
    status, body = client.call("DescribeRouteEntryList", RouteTableId=TABLE, NextToken="garbage")
    assert status == 400 and body["Code"] == "InvalidNextToken"


# ---------------------------------------------------------------------- asynchronous states

def test_pending_then_available_after_delay(make_emu):
    emu, client = make_emu(pending_delay=0.6)
    started = time.monotonic()
    status, body = client.create("10.40.0.0/24")
    assert status == 200
    assert client.list(RouteEntryType="Custom")[0]["Status"] == "Pending"

    def available():
        entries = client.list(RouteEntryType="Custom")
        return entries[0]["Status"] == "Available"

    assert wait_for(available, 5.0)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 3.0, elapsed
    # the ticker moves the entry even when nobody lists it
    client.create("10.40.1.0/24")
    time.sleep(1.0)
    assert {e["Status"] for e in emu.entries(TABLE)} == {"Available"}


def test_task_conflict_while_pending(make_emu):
    emu, client = make_emu(pending_delay=0.5)
    assert client.create("10.41.0.0/24")[0] == 200
    assert_error(client.create("10.41.1.0/24", hop="i-host2"), 400, "TaskConflict")
    # deleting a Pending entry is refused with a status error
    entry_id = client.list(RouteEntryType="Custom")[0]["RouteEntryId"]
    assert_error(client.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId=entry_id), 400,
                 "IncorrectRouteEntryStatus")
    assert wait_for(lambda: client.list(RouteEntryType="Custom")[0]["Status"] == "Available", 5.0)
    assert client.create("10.41.1.0/24", hop="i-host2")[0] == 200
    # the write lock is the VPC's: another table of the same VPC waits too, another VPC's does not
    emu.add_route_table("vtb-emu0002")
    emu.add_route_table("vtb-othervpc", vpc_id="vpc-other")
    assert_error(client.create("10.41.2.0/24", RouteTableId="vtb-emu0002"), 400, "TaskConflict")
    assert client.create("10.41.2.0/24", RouteTableId="vtb-othervpc")[0] == 200
    assert wait_for(lambda: {e["Status"] for e in emu.entries("vtb-emu0001")} == {"Available"}, 5.0)
    assert client.create("10.41.2.0/24", RouteTableId="vtb-emu0002")[0] == 200


def test_vswitches_bound_to_route_tables(make_emu):
    emu, client = make_emu(vswitch_api=True)
    emu.add_vswitch("vsw-a", "192.168.10.0/24")                       # the system table
    emu.add_route_table("vtb-zone-b", vswitches={"vsw-b": "192.168.20.0/24"})
    tables = {t["RouteTableId"]: t for t in
              client.ok("DescribeRouteTableList", VpcId="vpc-emu0001")["RouterTableList"]["RouterTableListType"]}
    assert tables[TABLE]["VSwitchIds"]["VSwitchId"] == ["vsw-a"]
    assert tables["vtb-zone-b"]["VSwitchIds"]["VSwitchId"] == ["vsw-b"]
    assert tables["vtb-zone-b"]["RouteTableType"] == "Custom"
    only = client.ok("DescribeRouteTableList", VpcId="vpc-emu0001", VSwitchId="vsw-b")
    assert [t["RouteTableId"] for t in only["RouterTableList"]["RouterTableListType"]] == ["vtb-zone-b"]
    # a vSwitch is bound to exactly one table: binding it elsewhere moves it
    emu.add_vswitch("vsw-a", "192.168.10.0/24", "vtb-zone-b")
    tables = {t["RouteTableId"]: t for t in
              client.ok("DescribeRouteTableList", VpcId="vpc-emu0001")["RouterTableList"]["RouterTableListType"]}
    assert tables[TABLE]["VSwitchIds"]["VSwitchId"] == []
    assert tables["vtb-zone-b"]["VSwitchIds"]["VSwitchId"] == ["vsw-a", "vsw-b"]
    cidrs = {v["VSwitchId"]: v["CidrBlock"] for v in client.ok("DescribeVSwitches", VpcId="vpc-emu0001",
                                                                PageSize=50)["VSwitches"]["VSwitch"]}
    assert cidrs["vsw-a"] == "192.168.10.0/24" and cidrs["vsw-b"] == "192.168.20.0/24"
    r = requests.post(client.url + "_emulator/vswitches", json={"vswitch_id": "vsw-c", "cidr": "192.168.30.0/24",
                                                                "route_table_id": "vtb-nope"}, timeout=5)
    assert r.status_code == 404 and "InvalidRouteTableId.NotFound" in r.json()["error"]


def test_per_table_quota(make_emu):
    emu, client = make_emu(quota=3)
    emu.add_route_table("vtb-small", quota=1)
    assert client.create("10.60.0.0/24", RouteTableId="vtb-small")[0] == 200
    body = assert_error(client.create("10.60.1.0/24", RouteTableId="vtb-small"), 400, "QuotaExceeded.RouteEntry")
    assert "vtb-small" in body["Message"] and "quota is 1" in body["Message"]
    for i in range(3):                                             # the other table keeps the default
        assert client.create(f"10.61.{i}.0/24")[0] == 200
    assert_error(client.create("10.61.9.0/24"), 400, "QuotaExceeded.RouteEntry")
    r = requests.post(client.url + "_emulator/route-tables/vtb-small", json={"quota": 2}, timeout=5)
    assert r.json() == {"route_table_id": "vtb-small", "quota": 2}
    assert client.create("10.60.1.0/24", RouteTableId="vtb-small")[0] == 200


def test_vpc_write_lock_serialises_writes(make_emu):
    emu, client = make_emu(write_interval=0.4)
    emu.add_route_table("vtb-emu0002")
    assert client.create("10.62.0.0/24")[0] == 200
    # any write in the VPC within write_interval of the last one is refused, whatever the table
    assert_error(client.create("10.62.1.0/24", RouteTableId="vtb-emu0002"), 400, "TaskConflict")
    assert_error(client.call("DeleteRouteEntry", RouteTableId=TABLE, DestinationCidrBlock="10.62.0.0/24"),
                 400, "TaskConflict")
    assert emu.conflicts == 2
    assert [e["DestinationCidrBlock"] for e in emu.entries("vtb-emu0002") if e["Type"] == "Custom"] == []
    time.sleep(0.45)
    assert client.create("10.62.1.0/24", RouteTableId="vtb-emu0002")[0] == 200
    # reads are never refused
    assert client.list(RouteEntryType="Custom")


def test_batch_create_and_delete(make_emu):
    emu, client = make_emu(write_interval=0.3)
    emu.add_route_table("vtb-emu0002")
    params = {}
    for i, table in enumerate((TABLE, "vtb-emu0002", "vtb-emu0002"), start=1):
        params.update({f"RouteEntries.{i}.RouteTableId": table, f"RouteEntries.{i}.DstCidrBlock": "10.63.0.0/24",
                       f"RouteEntries.{i}.NextHopType": "Instance", f"RouteEntries.{i}.NextHop": "i-host1",
                       f"RouteEntries.{i}.Name": "vpcnet-x", f"RouteEntries.{i}.Describption": "vpcnet: x"})
    body = client.ok("CreateRouteEntries", **params)
    # one write: both tables got the entry; the third (same destination again) failed on its own
    assert (body["SuccessCount"], body["FailedCount"]) == (2, 1)
    assert body["FailedRouteEntries"][0]["FailedCode"] == "InvalidCIDRBlock.Duplicate"
    for table in (TABLE, "vtb-emu0002"):
        [entry] = [e for e in emu.entries(table) if e["Type"] == "Custom"]
        assert entry["DestinationCidrBlock"] == "10.63.0.0/24" and entry["Description"] == "vpcnet: x"
    assert_error(client.call("CreateRouteEntries", **{"RouteEntries.1.RouteTableId": TABLE,
                                                      "RouteEntries.1.DstCidrBlock": "10.63.1.0/24",
                                                      "RouteEntries.1.NextHop": "i-host1"}), 400, "TaskConflict")
    time.sleep(0.35)
    too_many = {}
    for i in range(1, 52):
        too_many.update({f"RouteEntries.{i}.RouteTableId": TABLE, f"RouteEntries.{i}.DstCidrBlock": f"10.64.{i}.0/24",
                         f"RouteEntries.{i}.NextHop": "i-host1"})
    assert_error(client.call("CreateRouteEntries", **too_many), 400, "InvalidParameter.RouteEntries")
    body = client.ok("DeleteRouteEntries", **{"RouteEntries.1.RouteTableId": TABLE,
                                               "RouteEntries.1.DstCidrBlock": "10.63.0.0/24",
                                               "RouteEntries.2.RouteTableId": "vtb-emu0002",
                                               "RouteEntries.2.DstCidrBlock": "10.63.0.0/24",
                                               "RouteEntries.3.RouteTableId": TABLE,
                                               "RouteEntries.3.DstCidrBlock": "10.63.9.0/24"})
    assert (body["SuccessCount"], body["FailedCount"]) == (2, 1)
    assert body["FailedRouteEntries"][0]["FailedCode"] == "InvalidRouteEntry.NotFound"
    assert not [e for e in emu.entries() if e["Type"] == "Custom"]


def test_deleting_then_gone(make_emu):
    emu, client = make_emu(deleting_delay=0.6)
    entry_id = client.create("10.42.0.0/24")[1]["RouteEntryId"]
    client.create("10.42.1.0/24")
    assert client.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId=entry_id)[0] == 200
    entries = {e["RouteEntryId"]: e for e in client.list(RouteEntryType="Custom")}
    assert entries[entry_id]["Status"] == "Deleting"
    # while one entry is Deleting, the table takes no other change
    assert_error(client.create("10.42.2.0/24"), 400, "TaskConflict")
    assert_error(client.call("DeleteRouteEntry", RouteTableId=TABLE, DestinationCidrBlock="10.42.1.0/24"),
                 400, "TaskConflict")
    assert_error(client.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId=entry_id), 400,
                 "IncorrectRouteEntryStatus")
    assert wait_for(lambda: entry_id not in {e["RouteEntryId"] for e in client.list()}, 5.0)
    assert client.create("10.42.2.0/24")[0] == 200
    assert_error(client.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId=entry_id), 404,
                 "InvalidRouteEntry.NotFound")


# ---------------------------------------------------------------------- errors

def test_duplicate_destination(emu_client):
    _, client = emu_client
    assert client.create("10.43.0.0/24")[0] == 200
    assert_error(client.create("10.43.0.0/24", hop="i-host2"), 400, "InvalidCIDRBlock.Duplicate")
    assert_error(client.create("10.43.0.0/24"), 400, "InvalidCIDRBlock.Duplicate")
    assert len(client.list(RouteEntryType="Custom")) == 1


@pytest.mark.parametrize("cidr", ["10.44.0.1/24", "not-a-cidr", "10.44.0.0/33", "10.44.0.0", "300.1.1.0/24"])
def test_malformed_cidr(emu_client, cidr):
    _, client = emu_client
    assert_error(client.create(cidr), 400, "InvalidCidrBlock.Malformed")


def test_overlapping_system_entry_refused(emu_client):
    _, client = emu_client
    assert_error(client.create("100.64.1.0/24"), 400, "InvalidCidrBlock")
    assert_error(client.create("192.168.0.0/25"), 400, "InvalidCidrBlock")


def test_not_found_errors(emu_client):
    _, client = emu_client
    assert_error(client.create("10.45.0.0/24", RouteTableId="vtb-nope"), 404, "InvalidRouteTableId.NotFound")
    assert_error(client.create("10.45.0.0/24", hop="i-nope"), 404, "InvalidInstanceId.NotFound")
    assert_error(client.call("DescribeRouteEntryList", RouteTableId="vtb-nope"), 404,
                 "InvalidRouteTableId.NotFound")
    assert_error(client.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId="rte-nope"), 404,
                 "InvalidRouteEntry.NotFound")
    assert_error(client.call("DeleteRouteEntry", RouteTableId=TABLE, DestinationCidrBlock="10.45.0.0/24"), 404,
                 "InvalidRouteEntry.NotFound")
    assert client.list(RouteEntryType="Custom") == []


def test_system_entries_cannot_be_deleted(emu_client):
    _, client = emu_client
    system = client.list(RouteEntryType="System")
    for entry in system:
        status, body = client.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId=entry["RouteEntryId"])
        assert status in (400, 403) and body["Code"] != "IncorrectRouteEntryStatus", body
    assert client.list(RouteEntryType="System") == system


def test_quota(make_emu):
    emu, client = make_emu(quota=3)
    for i in range(3):
        assert client.create(f"10.46.{i}.0/24")[0] == 200
    body = assert_error(client.create("10.46.3.0/24"), 400, "QuotaExceeded.RouteEntry")
    assert "3" in body["Message"] and TABLE in body["Message"]
    assert len(client.list(RouteEntryType="Custom")) == 3       # system entries do not count
    # raised at run time through the admin endpoint
    r = requests.post(client.url + "_emulator/config", json={"quota": 4}, timeout=5)
    assert r.status_code == 200 and r.json()["quota"] == 4
    assert client.create("10.46.3.0/24")[0] == 200
    assert_error(client.create("10.46.4.0/24"), 400, "QuotaExceeded.RouteEntry")


def test_client_token_idempotency(make_emu):
    emu, client = make_emu(pending_delay=0.5)
    token = "vpcnet-" + uuid.uuid4().hex
    status, first = client.create("10.47.0.0/24", ClientToken=token, RouteEntryName="vpcnet")
    assert status == 200
    # a retry with the same token and parameters: same id, no TaskConflict, no second entry
    status, again = client.create("10.47.0.0/24", ClientToken=token, RouteEntryName="vpcnet")
    assert status == 200 and again["RouteEntryId"] == first["RouteEntryId"]
    assert wait_for(lambda: client.list(RouteEntryType="Custom")[0]["Status"] == "Available", 5.0)
    status, third = client.create("10.47.0.0/24", ClientToken=token, RouteEntryName="vpcnet")
    assert status == 200 and third["RouteEntryId"] == first["RouteEntryId"]
    assert len(client.list(RouteEntryType="Custom")) == 1
    # the same token with other parameters is refused
    status, body = client.create("10.47.1.0/24", ClientToken=token, RouteEntryName="vpcnet")
    assert status == 400 and body["Code"] == "IdempotentParameterMismatch"
    assert len(client.list(RouteEntryType="Custom")) == 1


def test_concurrent_creates_never_duplicate(make_emu):
    emu, client = make_emu()
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def worker(dest: str, hop: str):
        mine = Client(client.url)
        outcome = mine.create(dest, hop=hop)
        with lock:
            results.append((outcome[0], outcome[1]))

    threads = [threading.Thread(target=worker, args=("10.60.0.0/24", f"i-host{1 + i % 2}")) for i in range(8)]
    threads += [threading.Thread(target=worker, args=(f"10.61.{i}.0/24", "i-host1")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    custom = [e["DestinationCidrBlock"] for e in client.list(RouteEntryType="Custom")]
    assert custom.count("10.60.0.0/24") == 1
    assert sorted(set(custom)) == sorted(custom) and len(custom) == 9
    codes = sorted(body.get("Code", "ok") for status, body in results)
    assert codes.count("InvalidCIDRBlock.Duplicate") == 7 and codes.count("ok") == 9


# ---------------------------------------------------------------------- faults

def _fault_run(make_emu, seed: int, n: int = 40) -> list[tuple[int, str]]:
    emu, client = make_emu(quota=500)
    emu.set_faults(rate=0.5, seed=seed)
    outcomes = []
    created = set()
    for i in range(n):
        status, body = client.create(f"10.48.{i}.0/24")
        outcomes.append((status, body.get("Code", "")))
        if status == 200:
            created.add(f"10.48.{i}.0/24")
    emu.set_faults(rate=0.0)
    custom = {e["DestinationCidrBlock"] for e in client.list(RouteEntryType="Custom")}
    assert custom == created          # a faulted request changed nothing
    return outcomes


def test_fault_injection_is_seeded_and_changes_no_state(make_emu):
    first = _fault_run(make_emu, seed=1234)
    second = _fault_run(make_emu, seed=1234)
    assert first == second
    faults = [o for o in first if o[0] != 200]
    assert 8 <= len(faults) <= 32, first       # rate 0.5 of 40
    expected = {"Throttling": 400, "ServiceUnavailable": 503, "InternalError": 500}
    for status, code in faults:
        assert expected[code] == status
    assert {code for _, code in faults} <= set(expected)
    assert _fault_run(make_emu, seed=99) != first


def test_fault_rate_one_and_codes_from_admin(emu_client):
    emu, client = emu_client
    r = requests.post(client.url + "_emulator/faults", json={"rate": 1.0, "codes": ["ServiceUnavailable"]},
                      timeout=5)
    assert r.status_code == 200 and r.json()["rate"] == 1.0
    for i in range(5):
        assert_error(client.create(f"10.49.{i}.0/24"), 503, "ServiceUnavailable")
    # faults never apply to an unauthenticated request: that one is refused for what it is
    stranger = Client(client.url, key_id="nobody")
    assert_error(stranger.call("DescribeRouteEntryList", RouteTableId=TABLE), 404, "InvalidAccessKeyId.NotFound")
    assert requests.post(client.url + "_emulator/faults", json={"rate": 0}, timeout=5).status_code == 200
    assert client.list(RouteEntryType="Custom") == []
    assert requests.post(client.url + "_emulator/faults", json={"rate": 2}, timeout=5).status_code == 400
    assert requests.post(client.url + "_emulator/faults", json={"codes": ["Nope"]}, timeout=5).status_code == 400


def test_latency(emu_client):
    emu, client = emu_client
    emu.set_faults(latency=0.3)
    started = time.monotonic()
    assert client.call("DescribeRouteEntryList", RouteTableId=TABLE)[0] == 200
    assert time.monotonic() - started >= 0.3
    emu.set_faults(latency=0.0)


def test_request_counts(emu_client):
    emu, client = emu_client
    emu.reset_request_counts()
    client.create("10.50.0.0/24")
    client.list()
    client.list()
    client.call("DescribeRouteTableList", VpcId="vpc-emu0001")
    assert emu.request_counts == {"CreateRouteEntry": 1, "DescribeRouteEntryList": 2, "DescribeRouteTableList": 1}


# ---------------------------------------------------------------------- admin and direct helpers

def test_admin_endpoints(emu_client):
    emu, client = emu_client
    state = requests.get(client.url + "_emulator/state", timeout=5).json()
    assert state["route_table_id"] == TABLE and state["instances"]["i-host1"] == "192.168.77.2"
    assert SECRET not in json.dumps(state)
    r = requests.post(client.url + "_emulator/instances", json={"instance_id": "i-new", "ip": "192.168.77.9"},
                      timeout=5)
    assert r.status_code == 200 and emu.instances()["i-new"] == "192.168.77.9"
    assert requests.post(client.url + "_emulator/instances", json={"instance_id": "i-x", "ip": "bogus"},
                         timeout=5).status_code == 400
    assert client.create("10.51.0.0/24", hop="i-new")[0] == 200
    assert requests.delete(client.url + "_emulator/instances/i-new", timeout=5).status_code == 200
    assert requests.delete(client.url + "_emulator/instances/i-new", timeout=5).status_code == 404
    assert_error(client.create("10.51.1.0/24", hop="i-new"), 404, "InvalidInstanceId.NotFound")
    assert client.ok("DescribeInstances", InstanceIds='["i-new"]')["TotalCount"] == 0
    r = requests.post(client.url + "_emulator/config", json={"pending_delay": 0.2, "deleting_delay": 0.1},
                      timeout=5)
    assert r.json() == {"pending_delay": 0.2, "pending_delay_max": 0.0, "deleting_delay": 0.1, "quota": 200,
                        "write_interval": 0.0}
    assert requests.post(client.url + "_emulator/config", json={"quota": -1}, timeout=5).status_code == 400
    # hand-made entries and removals behind the plugin's back
    r = requests.post(client.url + "_emulator/entries",
                      json={"destination": "10.52.0.0/24", "next_hop_id": "i-host1", "name": "by-hand"}, timeout=5)
    assert r.status_code == 200
    hand = r.json()["RouteEntryId"]
    assert [e["RouteEntryName"] for e in client.list(DestinationCidrBlock="10.52.0.0/24")] == ["by-hand"]
    assert requests.delete(client.url + f"_emulator/entries/{hand}", timeout=5).status_code == 200
    assert client.list(DestinationCidrBlock="10.52.0.0/24") == []
    r = requests.post(client.url + "_emulator/route-tables", json={"route_table_id": "vtb-admin"}, timeout=5)
    assert r.status_code == 200
    assert "vtb-admin" in [t["RouteTableId"] for t in emu.route_tables()]
    state = requests.get(client.url + "_emulator/state", timeout=5).json()
    assert state["config"]["pending_delay"] == 0.2
    assert requests.get(client.url + "_emulator/nothing", timeout=5).status_code == 404


def test_direct_entry_helpers(emu_client):
    emu, client = emu_client
    sys_id = emu.add_system_entry("192.168.1.0/24")
    own = emu.add_custom_entry("10.53.0.0/24", "i-host1", name="hand-made", description="not vpcnet")
    by_id = {e["RouteEntryId"]: e for e in client.list()}
    assert by_id[sys_id]["Type"] == "System"
    assert by_id[own]["Type"] == "Custom" and by_id[own]["RouteEntryName"] == "hand-made"
    snapshot = emu.entries()
    snapshot[0]["Status"] = "Broken"       # a snapshot, not the live state
    assert all(e["Status"] != "Broken" for e in emu.entries())
    assert emu.remove_entry(own) and not emu.remove_entry(own)


# ---------------------------------------------------------------------- persistence

def test_persistence_across_restart(make_emu, tmp_path):
    path = str(tmp_path / "state" / "emulator.json")
    emu, client = make_emu(state_file=path, pending_delay=0.3)
    token = uuid.uuid4().hex
    nonce = uuid.uuid4().hex
    first = client.create("10.54.0.0/24", ClientToken=token, nonce=nonce)[1]["RouteEntryId"]
    emu.register_instance("i-late", "192.168.77.7")
    emu.add_route_table("vtb-emu0002")
    # stop while the entry is still Pending
    data = json.loads(open(path).read())
    assert data["version"] == 1
    assert [n for n in os.listdir(tmp_path / "state") if n != "emulator.json"] == []   # atomic: no tmp left

    emu2, client2 = make_emu(state_file=path, pending_delay=0.3)
    entries = {e["DestinationCidrBlock"]: e for e in client2.list(RouteEntryType="Custom")}
    assert entries["10.54.0.0/24"]["RouteEntryId"] == first
    assert wait_for(lambda: client2.list(RouteEntryType="Custom")[0]["Status"] == "Available", 5.0)
    assert emu2.instances()["i-late"] == "192.168.77.7"
    assert "vtb-emu0002" in [t["RouteTableId"] for t in emu2.route_tables()]
    # the ClientToken and the nonce are remembered too
    assert client2.create("10.54.0.0/24", ClientToken=token)[1]["RouteEntryId"] == first
    assert_error(client2.call("DescribeRouteEntryList", nonce=nonce, RouteTableId=TABLE), 400, "SignatureNonceUsed")
    # new ids do not collide with old ones
    second = client2.create("10.54.1.0/24")[1]["RouteEntryId"]
    assert second != first
    # deletions persist as well
    assert wait_for(lambda: client2.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId=first)[0] == 200, 5.0)
    emu3 = Emulator(state_file=path)
    try:
        assert [e["RouteEntryId"] for e in emu3.entries(TABLE) if e["Type"] == "Custom"] == [second]
    finally:
        emu3.close()


def test_corrupt_state_file_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load emulator state"):
        Emulator(state_file=str(path))


# ---------------------------------------------------------------------- CLI

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    secret = "cli-secret-" + uuid.uuid4().hex
    state = tmp_path / "cli-state.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vpcnet.cli", "emulator", "--listen", f"127.0.0.1:{port}",
         "--access-key", f"cli-key:{secret}", "--instance", "i-cli=192.168.77.5",
         "--instance", "i-cli6=192.168.77.6,fd00:77::6", "--pending-delay", "0.1",
         "--quota", "7", "--fault-rate", "0", "--seed", "3", "--state", str(state)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"

        def up():
            try:
                return requests.get(url + "_emulator/state", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        assert wait_for(up, 15.0, 0.1), "emulator did not come up"
        state_body = requests.get(url + "_emulator/state", timeout=5).json()
        assert state_body["config"]["quota"] == 7 and state_body["instances"] == {"i-cli": "192.168.77.5",
                                                                                 "i-cli6": "192.168.77.6"}
        client = Client(url, key_id="cli-key", secret=secret)
        assert client.create("10.55.0.0/24", hop="i-cli")[0] == 200
        assert_error(Client(url).call("DescribeRouteEntryList", RouteTableId=TABLE), 404,
                     "InvalidAccessKeyId.NotFound")          # the default test key is off when keys are given
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert "listening on http://127.0.0.1:" in out
    assert secret not in out and secret not in err
    assert "Signature=" not in err          # request lines carry no query string
    assert "10.55.0.0/24" in state.read_text()
    assert json.loads(state.read_text())["instances6"] == {"i-cli6": "fd00:77::6"}, "ID=IP,IP6: its IPv6 underlay"


def test_cli_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", "emulator", "--listen", "nonsense",
                           "--access-key", "x:topsecret"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", "emulator", "--access-key", "no-colon-secret"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no-colon-secret" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", "emulator", "--instance", "i-x=192.168.77.5,"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--instance wants ID=IP[,IP6]" in proc.stderr, proc.stderr
