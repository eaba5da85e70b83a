"""The state's own faults: a full state disk, a damaged or truncated database."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import uuid

import pytest
from conftest import is_root, require, run
from fakes import dump_db, make_plugin
from test_transport import EID, EID2, NID, SANDBOX, ok, post, setup_network

from vpcnet.state.store import Store


def serve(tmp_path, state_dir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VPCNET_CONFIG=os.devnull, VPCNET_STATE_DIR=state_dir,
               VPCNET_SOCKET=str(tmp_path / f"t-{uuid.uuid4().hex[:6]}.sock"))
    return subprocess.run([sys.executable, "-m", "vpcnet.cli", "serve"], env=env, capture_output=True,
                          text=True, timeout=30)


def a_state_with_a_network(state_dir) -> str:
    plug = make_plugin(state_dir.parent, VPCNET_STATE_DIR=str(state_dir))
    setup_network(plug.app().test_client())
    plug.store.close()
    return plug.config.db_path


@pytest.mark.parametrize("damage", ["garbage", "empty", "half"])
def test_serve_refuses_a_damaged_state_file_in_one_line(tmp_path, damage):
    state_dir = tmp_path / "state"
    db = a_state_with_a_network(state_dir)
    Store(db).close()                                   # checkpointed into the main file
    for extra in ("-wal", "-shm"):
        if os.path.exists(db + extra):
            os.remove(db + extra)
    size = os.path.getsize(db)
    with open(db, "r+b") as fh:
        if damage == "garbage":
            fh.seek(0)
            fh.write(b"this is not sqlite" * 8)
        else:
            fh.truncate(0 if damage == "empty" else size // 2)
    before = open(db, "rb").read()
    proc = serve(tmp_path, str(state_dir))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and db in lines[0] and "docs/datapath.md" in lines[0] and "mv " in lines[0], proc.stderr
    assert open(db, "rb").read() == before, "the damaged file is left as it was, for recovery"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs for the state dir, unmounted at the end."""
    require(is_root(), "needs root (mounts a small tmpfs as the state dir)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)])
    try:
        yield mnt
    finally:
        run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def fill(mnt, db_path: str):
    """The filesystem full to its last block, the store's WAL emptied first: the very next write of the
    state needs a new block and cannot have it (a WAL with room left would take a few more commits)."""
    conn = sqlite3.connect(db_path)
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    conn.close()
    assert busy == 0 and os.path.getsize(db_path + "-wal") == 0
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (65536, 4096, 512):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return filler


def join(client, eid: str):
    return post(client, "/NetworkDriver.Join", {"NetworkID": NID, "EndpointID": eid, "SandboxKey": SANDBOX,
                                                "Options": {}})


@pytest.mark.parametrize("call, family", [
    ("CreateNetwork", "ipv4"), ("RequestAddress", "ipv4"), ("CreateEndpoint", "ipv4"),
    ("CreateNetwork", "dual"), ("RequestAddress", "dual"), ("CreateEndpoint", "dual"),
    ("ProgramExternalConnectivity", "dual")])
def test_a_full_state_disk_fails_the_call_clearly_changes_nothing_and_recovers(tmp_path, small_disk, call, family):
    """Each call that writes the state, on a disk that is full when it writes: 507 naming the state file,
    no row (no half-written one: an endpoint without its IPv6 address, a port of one family) and nothing in
    the kernel (no bridge, no veth, no /128 route, no DNAT), and the same call works once space is back.
    `dual`: on a dual-stack network, the IPv6 address (RequestAddress of the IPv6 pool), the endpoint with
    both addresses, the published port on both families."""
    plug = make_plugin(tmp_path, VPCNET_STATE_DIR=str(small_disk / "state"))
    client = plug.app().test_client()
    db = plug.config.db_path
    dual = family == "dual"
    network = {"NetworkID": NID, "Options": {"com.docker.network.generic": {}}, "IPv6Data": []}
    pool = ok(client, "/IpamDriver.RequestPool", {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "",
                                                  "Options": {}, "V6": False})
    network["IPv4Data"] = [{"AddressSpace": "vpcnet-local", "Pool": pool["Pool"],
                            "Gateway": pool["Data"]["com.docker.network.gateway"]}]
    if dual:
        pool6 = ok(client, "/IpamDriver.RequestPool", {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "",
                                                       "Options": {}, "V6": True})
        network["IPv6Data"] = [{"AddressSpace": "vpcnet-local", "Pool": pool6["Pool"],
                                "Gateway": pool6["Data"]["com.docker.network.gateway"]}]
        network["Options"]["com.docker.network.enable_ipv6"] = True

    def interface() -> dict:
        out = {"Address": ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]}
        if dual:
            out["AddressIPv6"] = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool6["PoolID"]})["Address"]
        return out

    endpoint: dict = {"NetworkID": NID, "EndpointID": EID}
    if call != "CreateNetwork":
        ok(client, "/NetworkDriver.CreateNetwork", network)
        ok(client, "/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2, "Interface": interface()})
    if call == "CreateEndpoint":
        endpoint["Interface"] = interface()
    portmap = {"com.docker.network.portmap": [{"Proto": 6, "IP": "", "Port": 80, "HostIP": ip, "HostPort": 18080,
                                               "HostPortEnd": 18080} for ip in ("0.0.0.0", "::")]}
    path, body = {"CreateNetwork": ("/NetworkDriver.CreateNetwork", network),
                  "RequestAddress": ("/IpamDriver.RequestAddress", {"PoolID": (pool6 if dual else pool)["PoolID"]}),
                  "CreateEndpoint": ("/NetworkDriver.CreateEndpoint", endpoint),
                  "ProgramExternalConnectivity": ("/NetworkDriver.ProgramExternalConnectivity",
                                                  {"NetworkID": NID, "EndpointID": EID2, "Options": portmap}),
                  }[call]

    rows, kernel = dump_db(db), plug.dataplane.state()
    filler = fill(small_disk, db)
    status, answer = post(client, path, body)
    assert status == 507, answer
    assert f"cannot write vpcnet's state {db}" in answer["Err"] and "free space" in answer["Err"], answer
    assert dump_db(db) == rows, "no row written"
    assert plug.dataplane.state() == kernel, "nothing in the kernel: no bridge, no veth, no route, no rule"
    if call == "CreateEndpoint":
        assert join(client, EID)[0] == 404, "Join of the endpoint that failed: nothing half made to join"
        assert join(client, EID2)[0] == 200, "Join writes no state: a full disk does not stop it"
        assert plug.dataplane.state() == kernel

    os.remove(filler)                                  # space is back: the same call works
    answer = ok(client, path, body)
    if call == "CreateNetwork":
        assert plug.store.network(NID) is not None and len(plug.dataplane.networks) == 1
        assert plug.store.network(NID).host_cidr_v6 == (pool6["Pool"] if dual else "")
    elif call == "RequestAddress":
        assert plug.store.endpoint_where(network_id=NID, address=answer["Address"].split("/")[0]) is None
        assert len(dump_db(db)["addresses"]) == len(rows["addresses"]) + 1
    elif call == "CreateEndpoint":
        ep = plug.store.endpoint(EID)
        assert ep is not None and ep.host_veth in plug.dataplane.links
        assert ep.address_v6 == (endpoint["Interface"]["AddressIPv6"].split("/")[0] if dual else "")
        assert join(client, EID)[0] == 200
    else:
        assert sorted(p.family for p in plug.store.ports()) == ["ipv4", "ipv6"]
        assert len(plug.dataplane.published()) == 2
    plug.store.close()


def test_the_replay_window_answers_only_identical_replays(tmp_path):
    """Inside the window a new container asking for an address in use is refused once the replay of it
    has been answered; outside it, always."""
    plug = make_plugin(tmp_path)
    client = plug.app().test_client()
    pool = setup_network(client)
    address = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
    plug.ipam.open_replay_window()                     # a daemon restart
    ok(client, "/IpamDriver.RequestPool", {"Pool": pool["Pool"]})                   # replays the pool first
    body = {"PoolID": pool["PoolID"], "Address": address.split("/")[0]}
    assert ok(client, "/IpamDriver.RequestAddress", body)["Address"] == address      # the replay
    status, answer = post(client, "/IpamDriver.RequestAddress", body)                # a new container
    assert status == 409 and "already in use" in answer["Err"]
