"""`vpcnet routes list|sync|release|gc` as subprocesses, configured through the environment, against the
real emulator on 127.0.0.1 (the metadata URL is a closed local port: nothing leaves the host)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from aliyun_fakes import blocks_of, closed_port, serving_emulator

from vpcnet.cloud import route_name

KEY_ID, SECRET = "cli-key-id", "cli-S3cret-never-printed-0a9d"
TABLE, VPC, REGION = "vtb-cli0001", "vpc-cli0001", "cn-emu-1"
CLUSTER = "10.210.0.0/16"
ME, OTHER, DEAD = "i-cli-me", "i-cli-other", "i-cli-dead"
B = blocks_of(ME, CLUSTER, 10)


@pytest.fixture
def emu():
    with serving_emulator({ME: "192.168.0.10", OTHER: "192.168.0.11"}, region=REGION, vpc_id=VPC,
                          route_table_id=TABLE, credentials={KEY_ID: SECRET}, seed=5) as e:
        yield e


@pytest.fixture
def vpcnet(emu, tmp_path):
    """vpcnet(*args, **env) -> CompletedProcess; stdout and stderr are checked for the secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPCNET_")}
    env.update({
        "VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": str(tmp_path / "state"),
        "VPCNET_SOCKET": str(tmp_path / "vpcnet-cli.sock"), "VPCNET_LOG_LEVEL": "DEBUG",
        "VPCNET_PROVIDER": "aliyun", "VPCNET_CLUSTER_CIDR": CLUSTER,
        "VPCNET_ALIYUN_ENDPOINT": emu.test_url, "VPCNET_ALIYUN_REGION_ID": REGION,
        "VPCNET_ALIYUN_VPC_ID": VPC,            # the table is found through DescribeRouteTableList
        "VPCNET_ALIYUN_INSTANCE_ID": ME,
        "VPCNET_ALIYUN_ACCESS_KEY_ID": KEY_ID, "VPCNET_ALIYUN_ACCESS_KEY_SECRET": SECRET,
        "VPCNET_ALIYUN_METADATA_URL": "http://127.0.0.1:9/",
    })

    def run(*args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", "routes", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=timeout)
        assert SECRET not in proc.stdout and SECRET not in proc.stderr
        return proc

    return run


def custom(emu) -> dict[str, dict]:
    return {e["DestinationCidrBlock"]: e for e in emu.entries(TABLE) if e["Type"] == "Custom"}


def hop(entry: dict) -> str:
    return entry["NextHops"]["NextHop"][0]["NextHopId"]


def test_sync_then_list(emu, vpcnet):
    emu.add_custom_entry(B[0], OTHER, name=route_name(B[0]))     # another host's block
    emu.configure(pending_delay=0.5)
    sync = vpcnet("sync", "--wait", "10")
    assert sync.returncode == 0, sync.stderr
    assert f"10.210.0.0/16 -> {B[1]}: route Available" in sync.stdout
    assert "routes in place" in sync.stdout
    entry = custom(emu)[B[1]]
    assert hop(entry) == ME and entry["Status"] == "Available"

    again = vpcnet("sync", "--wait", "0")             # restart-like: nothing to do, still exit 0
    assert again.returncode == 0, again.stderr
    assert len(custom(emu)) == 2

    table = vpcnet("list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"provider aliyun, this instance {ME}, cluster CIDRs {CLUSTER} (10.210.0.0-16)")
    assert f"route table {TABLE}: 2/200 custom entries used" in lines
    mine = next(line for line in lines if line.startswith(B[1]))
    assert ME in mine and "Available" in mine and "Custom" in mine and mine.endswith("mine")
    assert next(line for line in lines if line.startswith(B[0])).endswith("ours-other-host")
    assert next(line for line in lines if line.startswith("100.64.0.0/10")).endswith("foreign")

    data = json.loads(vpcnet("list", "--json").stdout)
    assert data["route_table"] == TABLE and data["instance"] == ME and data["cluster_cidrs"] == [CLUSTER]
    assert data["route_tables"] == [{"id": TABLE, "usage": [{"family": "all", "entries": 2, "quota": 200}]}]
    owners = {r["destination"]: r["owner"] for r in data["routes"]}
    assert owners[B[1]] == "mine" and owners[B[0]] == "ours-other-host"
    assert owners["192.168.0.0/24"] == "foreign"
    assert data["claims"] == [{"cluster_cidr": CLUSTER, "host_cidr": B[1], "route_ok": True,
                               "reason": ""}]


def test_sync_reports_pending_then_succeeds_with_a_longer_wait(emu, vpcnet):
    emu.configure(pending_delay=1.5)
    short = vpcnet("sync", "--wait", "0")
    assert short.returncode == 1
    assert "is Pending" in short.stderr and "try a longer --wait" in short.stderr
    assert B[0] in short.stdout
    longer = vpcnet("sync", "--wait", "10")
    assert longer.returncode == 0, longer.stderr
    assert emu.request_counts["CreateRouteEntry"] == 1


def test_sync_fails_clearly_on_a_full_table(emu, vpcnet):
    emu.configure(quota=1)
    emu.add_custom_entry(B[0], OTHER, name=route_name(B[0]))
    proc = vpcnet("sync", "--wait", "2")
    assert proc.returncode == 1
    assert TABLE in proc.stderr and "full" in proc.stderr and "quota is 1" in proc.stderr
    assert "(not claimed)" in proc.stdout


def test_sync_fails_clearly_when_the_cloud_is_unreachable(vpcnet):
    proc = vpcnet("sync", "--wait", "1", VPCNET_ALIYUN_ENDPOINT=f"http://127.0.0.1:{closed_port()}/",
                  VPCNET_ALIYUN_ROUTE_TABLE_ID=TABLE, timeout=30)
    assert proc.returncode == 1
    assert "unreachable" in proc.stderr and "connection refused" in proc.stderr


def test_release_removes_only_this_hosts_routes(emu, vpcnet):
    emu.add_custom_entry(B[0], OTHER, name=route_name(B[0]))
    emu.add_custom_entry(B[9], ME, name="by-hand")                    # hand-made, to us
    assert vpcnet("sync", "--wait", "5").returncode == 0
    assert hop(custom(emu)[B[1]]) == ME
    proc = vpcnet("release")
    assert proc.returncode == 0, proc.stderr
    assert f"removed {B[1]} -> {ME} from {TABLE}" in proc.stdout
    assert "1 route(s) removed" in proc.stdout
    assert set(custom(emu)) == {B[0], B[9]}
    again = vpcnet("release")
    assert again.returncode == 0 and "0 route(s) removed" in again.stdout
    assert set(custom(emu)) == {B[0], B[9]}


def test_release_refuses_while_networks_use_the_block(emu, vpcnet, tmp_path):
    """A network in the state on this host's block: release names it and the way out, and removes
    nothing; once the network is gone it releases; `--force` releases regardless."""
    from vpcnet.datapath.spec import bridge_name
    from vpcnet.state.store import Network, Store

    assert vpcnet("sync", "--wait", "5").returncode == 0
    store = Store(str(tmp_path / "state" / "vpcnet.db"))
    try:
        [claim] = store.claims()
        block = claim.host_cidr
        assert block in B
        nid = "ab" * 32
        with store.tx() as db:
            store.add_network(db, Network(nid, block, CLUSTER, block.replace(".0/24", ".1"), bridge_name(nid),
                                          1500, False, ()))
        proc = vpcnet("release")
        assert proc.returncode == 1 and proc.stdout == "", proc
        assert f"1 vpcnet network(s) on this host still use its block(s): {nid[:12]} ({block})" in proc.stderr
        assert "docker network rm" in proc.stderr and "--force" in proc.stderr
        assert hop(custom(emu)[block]) == ME and store.claims() == [claim]           # nothing released

        forced = vpcnet("release", "--force")
        assert forced.returncode == 0, forced.stderr
        assert f"removed {block} -> {ME} from {TABLE}" in forced.stdout and block not in custom(emu)

        assert vpcnet("sync", "--wait", "5").returncode == 0                           # claimed again
        store.delete_network(nid)
        proc = vpcnet("release")
        assert proc.returncode == 0, proc.stderr
        assert "1 route(s) removed" in proc.stdout and store.claims() == []
    finally:
        store.close()


def test_gc_is_a_dry_run_unless_yes(emu, vpcnet):
    emu.add_custom_entry(B[5], DEAD, name=route_name(B[5]))     # vpcnet's, instance gone
    emu.add_custom_entry(B[6], DEAD, name="by-hand")                  # hand-made, instance gone
    emu.add_custom_entry(B[7], OTHER, name=route_name(B[7]))    # vpcnet's, live
    dry = vpcnet("gc")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {B[5]} -> {DEAD}" in dry.stdout and "--yes" in dry.stdout
    assert B[6] not in dry.stdout and B[7] not in dry.stdout
    assert set(custom(emu)) == {B[5], B[6], B[7]}
    wet = vpcnet("gc", "--yes")
    assert wet.returncode == 0, wet.stderr
    assert f"removed {B[5]} -> {DEAD}" in wet.stdout
    assert set(custom(emu)) == {B[6], B[7]}
    assert "no vpcnet route points at a vanished instance" in vpcnet("gc").stdout


def test_configuration_error_exits_2(vpcnet):
    proc = vpcnet("list", VPCNET_PROVIDER="nowhere")
    assert proc.returncode == 2 and "configuration error" in proc.stderr


def test_bad_credentials_exit_1_with_a_hint(vpcnet):
    proc = vpcnet("list", VPCNET_ALIYUN_ACCESS_KEY_SECRET="wrong-secret-value")
    assert proc.returncode == 1
    assert "SignatureDoesNotMatch" in proc.stderr and "wrong-secret-value" not in proc.stderr
