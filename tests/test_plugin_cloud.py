"""A real `vpcnet serve` (a subprocess on a unix socket, as Docker sees it) with VPCNET_PROVIDER=aliyun,
pointed at the emulator on 127.0.0.1: the claim is made in the background and RequestPool answers it; an
unreachable cloud never stops the plugin from starting and answering; one reconciler whatever the number
of workers; a clean SIGTERM keeps the route. Needs root (the plugin socket lives in /run/docker/plugins)."""
from __future__ import annotations

import time

import pytest
from aliyun_fakes import closed_port, serving_emulator
from conftest import wait_for

KEY_ID, SECRET = "plugin-key-id", "plugin-S3cret-never-logged-77e1"
TABLE, VPC, REGION = "vtb-plug0001", "vpc-plug0001", "cn-emu-1"
ME = "i-plugin-me"
POOL_REQUEST = {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "", "Options": {}, "V6": False}


@pytest.fixture
def emu():
    with serving_emulator({ME: "192.168.0.10"}, region=REGION, vpc_id=VPC, route_table_id=TABLE,
                          credentials={KEY_ID: SECRET}, seed=9, pending_delay=0.5) as e:
        yield e


def cloud_env(endpoint: str, **extra: str) -> dict[str, str]:
    env = {"VPCNET_PROVIDER": "aliyun", "VPCNET_ALIYUN_ENDPOINT": endpoint, "VPCNET_ALIYUN_REGION_ID": REGION,
           "VPCNET_ALIYUN_ROUTE_TABLE_ID": TABLE, "VPCNET_ALIYUN_INSTANCE_ID": ME,
           "VPCNET_ALIYUN_ACCESS_KEY_ID": KEY_ID, "VPCNET_ALIYUN_ACCESS_KEY_SECRET": SECRET,
           "VPCNET_ALIYUN_METADATA_URL": "http://127.0.0.1:9/",      # never 100.100.100.200
           "VPCNET_RECONCILE_INTERVAL": "30"}
    env.update(extra)
    return env


def mine(emu) -> list[dict]:
    return [e for e in emu.entries(TABLE)
            if e["Type"] == "Custom" and e["NextHops"]["NextHop"][0]["NextHopId"] == ME]


def request_pool(plugin) -> tuple[int, dict]:
    return plugin.call("/IpamDriver.RequestPool", POOL_REQUEST)


def full_log(plugin) -> str:
    with open(plugin.log_path, errors="replace") as fh:
        return fh.read()


def assert_no_secret(plugin) -> None:
    assert SECRET not in full_log(plugin), "the AccessKey secret reached the plugin's log"


def test_claim_in_background_request_pool_and_sigterm_keeps_the_route(emu, plugin_factory):
    plugin = plugin_factory(cloud_env(emu.test_url))
    answered = wait_for(lambda: request_pool(plugin)[0] == 200, 15, step=0.1)
    assert answered, plugin.log()
    status, body = request_pool(plugin)                       # a replay: the same answer
    assert status == 200
    block = body["Pool"]
    assert body["PoolID"] == block and block.endswith("/24")
    assert block.startswith(plugin.cluster.split(".0.0/")[0] + ".")
    assert wait_for(lambda: [e for e in mine(emu) if e["Status"] == "Available"], 10), plugin.log()
    [entry] = mine(emu)
    assert entry["DestinationCidrBlock"] == block
    assert emu.request_counts["CreateRouteEntry"] == 1

    assert plugin.stop() == 0                                 # a clean SIGTERM ...
    [kept] = mine(emu)                                        # ... keeps the route
    assert kept["RouteEntryId"] == entry["RouteEntryId"] and kept["Status"] == "Available"

    emu.reset_request_counts()                                # restart: one listing pass, no create
    plugin.start()
    status, body = request_pool(plugin)
    assert status == 200 and body["Pool"] == block            # at once, from the store
    assert wait_for(lambda: emu.request_counts.get("DescribeRouteEntryList", 0) >= 1, 10), plugin.log()
    time.sleep(0.5)
    assert emu.request_counts == {"DescribeRouteEntryList": 1}
    assert plugin.stop() == 0
    assert [e["RouteEntryId"] for e in mine(emu)] == [entry["RouteEntryId"]]
    assert_no_secret(plugin)


def test_unreachable_cloud_the_plugin_starts_and_answers(plugin_factory):
    plugin = plugin_factory(cloud_env(f"http://127.0.0.1:{closed_port()}/"), start=False)
    took = plugin.start()
    assert took < 1.0, f"socket up after {took:.2f}s"         # typically ~0.3 s: it never waits on the cloud
    for path in ("/Plugin.Activate", "/NetworkDriver.GetCapabilities", "/IpamDriver.GetCapabilities"):
        status, _ = plugin.call(path, None)
        assert status == 200, path
    status, body = request_pool(plugin)
    assert status != 200
    assert body["Err"].startswith("host CIDR not yet claimed: ")
    # once the first attempts failed, the reason says why
    reason = wait_for(lambda: (lambda b: "not answering yet" in b["Err"] or "unreachable" in b["Err"])(
        request_pool(plugin)[1]) and request_pool(plugin)[1]["Err"], 15, step=0.2)
    assert reason and "connection refused" in reason, reason
    assert plugin.proc.poll() is None                          # still serving
    assert plugin.call("/NetworkDriver.GetCapabilities", None)[0] == 200
    assert plugin.stop() == 0
    assert_no_secret(plugin)


def test_three_workers_run_one_reconciler(emu, plugin_factory):
    plugin = plugin_factory(cloud_env(emu.test_url, VPCNET_WORKERS="3"))
    assert wait_for(lambda: [e for e in mine(emu) if e["Status"] == "Available"], 15), plugin.log()
    # every worker answers RequestPool with the one block
    answers = set()
    for _ in range(12):
        status, body = request_pool(plugin)
        assert status == 200, body
        answers.add(body["Pool"])
    assert answers == {mine(emu)[0]["DestinationCidrBlock"]}
    time.sleep(1.0)
    assert emu.request_counts["CreateRouteEntry"] == 1
    assert len(mine(emu)) == 1
    assert full_log(plugin).count("reconciler running") == 1, plugin.log()
    assert plugin.stop() == 0
    assert len(mine(emu)) == 1
    assert_no_secret(plugin)
