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
from fakes import make_plugin
from test_transport import EID, NID, ok, post, setup_network

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


def test_a_full_state_disk_fails_clearly_changes_nothing_and_recovers(tmp_path):
    require(is_root(), "needs root (mounts a small tmpfs as the state dir)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)])
    try:
        plug = make_plugin(tmp_path, VPCNET_STATE_DIR=str(mnt / "state"))
        client = plug.app().test_client()
        pool = setup_network(client)
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as fh:      # fill the disk to the last block
            for size in (65536, 4096, 512):
                try:
                    while True:
                        fh.write(b"\0" * size)
                except OSError:
                    pass
        links_before = dict(plug.dataplane.links)
        answers = []
        for _ in range(20):                            # until sqlite needs a new page and cannot have it
            status, answer = post(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})
            answers.append((status, answer))
            if status != 200:
                break
            address = answer["Address"]
            status, answer = post(client, "/NetworkDriver.CreateEndpoint", {
                "NetworkID": NID, "EndpointID": uuid.uuid4().hex * 2, "Interface": {"Address": address}})
            answers.append((status, answer))
            if status != 200:
                break
        status, answer = answers[-1]
        assert status == 507 and "cannot write vpcnet's state" in answer["Err"], answers[-1]
        assert "free space" in answer["Err"]
        # nothing half-applied: no veth beyond those of endpoints the store holds
        assert set(plug.dataplane.links) == {e.host_veth for e in plug.store.endpoints()} | set(links_before)
        os.remove(filler)                              # space is back: the next calls work
        address = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
        ok(client, "/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID,
                                                       "Interface": {"Address": address}})
        assert plug.store.endpoint(EID) is not None
        plug.store.close()
    finally:
        run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def test_the_replay_window_answers_only_identical_replays(tmp_path):
    """Inside the window a new container asking for an address in use is refused once the replay of it
    has been answered; outside it, always."""
    plug = make_plugin(tmp_path)
    client = plug.app().test_client()
    pool = setup_network(client)
    address = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
    plug.ipam.open_replay_window()                     # a daemon restart
    body = {"PoolID": pool["PoolID"], "Address": address.split("/")[0]}
    assert ok(client, "/IpamDriver.RequestAddress", body)["Address"] == address      # the replay
    status, answer = post(client, "/IpamDriver.RequestAddress", body)                # a new container
    assert status == 409 and "already in use" in answer["Err"]
    _ = sqlite3  # the store is sqlite; nothing else to check here
