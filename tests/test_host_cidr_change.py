"""VPCNET_HOST_CIDR changed while a network uses the old block: `vpcnet serve` refuses to start, and a
reconcile pass keeps the old block's route and reports it FATAL instead of removing it. Real sqlite
store and the local provider (a JSON route table in the state dir): no cloud, no Docker."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from fakes import dump_db, make_config, make_plugin
from test_transport import NID, setup_network

from vpcnet.cli.serve import stranded_networks
from vpcnet.cloud.local import TABLE_FILE
from vpcnet.routes.claims import FATAL
from vpcnet.routes.keeper import RouteKeeper
from vpcnet.state.store import Store

OLD, NEW = "10.200.0.0/24", "10.200.5.0/24"


def a_host_on(tmp_path, block: str, network: bool = True):
    """A host with static block `block`, its route in the local table, and (with `network`) a network on it."""
    plug = make_plugin(tmp_path, VPCNET_HOST_CIDR=block)
    if network:
        assert setup_network(plug.app().test_client())["Pool"] == block
    assert plug.routes.reconcile().ok
    plug.routes.close()
    plug.store.close()
    return plug.config


def local_table(config) -> list[str]:
    with open(os.path.join(config.state_dir, TABLE_FILE)) as fh:
        return sorted(e["destination"] for e in json.load(fh))


def test_serve_refuses_a_changed_host_cidr_under_a_network_in_one_line_and_writes_nothing(tmp_path):
    config = a_host_on(tmp_path, OLD)
    Store(config.db_path).close()                       # checkpointed: the files below are what a start would change
    files = sorted(os.listdir(config.state_dir))
    db, table = dump_db(config.db_path), local_table(config)
    # Unbindable on purpose: were the refusal ever gone, serve fails at the bind rather than serving (and
    # restoring bridges) on this host.
    socket = tmp_path / ("s" * 120 + ".sock")          # over AF_UNIX's 108 bytes
    env = dict(os.environ, VPCNET_CONFIG=os.devnull, VPCNET_STATE_DIR=config.state_dir, VPCNET_SOCKET=str(socket),
               VPCNET_INSTANCE_ID="i-test-host", VPCNET_HOST_CIDR=NEW)
    proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", "serve"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert NID[:12] in line and OLD in line and NEW in line, line
    assert f"docker network rm {NID[:12]}" in line and f"VPCNET_HOST_CIDR back to {OLD}" in line, line
    # sqlite's side files of a read-only open (as check_state makes them) aside, no file came or changed
    side = {os.path.basename(config.db_path) + s for s in ("-wal", "-shm")}
    assert sorted(set(os.listdir(config.state_dir)) - side) == sorted(set(files) - side)
    wal = config.db_path + "-wal"
    assert not os.path.exists(wal) or os.path.getsize(wal) == 0
    assert dump_db(config.db_path) == db and local_table(config) == table == [OLD]


def test_the_start_check_passes_when_no_network_is_on_another_block(tmp_path):
    config = a_host_on(tmp_path, OLD)
    assert stranded_networks(config) == ""                                     # unchanged setting
    assert stranded_networks(make_config(tmp_path)) == ""                      # no static block
    assert stranded_networks(make_config(tmp_path, VPCNET_HOST_CIDR="10.201.5.0/24",
                                         VPCNET_CLUSTER_CIDR="10.201.0.0/16")) == ""   # another cluster's network
    assert NID[:12] in stranded_networks(make_config(tmp_path, VPCNET_HOST_CIDR=NEW))
    assert stranded_networks(make_config(tmp_path / "new-host", VPCNET_HOST_CIDR=NEW)) == ""   # no state yet


def test_a_pass_keeps_the_route_of_a_block_a_network_uses_and_reports_it_fatal(tmp_path):
    a_host_on(tmp_path, OLD)
    config = make_config(tmp_path, VPCNET_HOST_CIDR=NEW)
    store = Store(config.db_path)
    keeper = RouteKeeper(config, store)
    try:
        for _ in range(2):                              # and on every later pass
            result = keeper.reconcile()
            assert not result.ok and FATAL in result.kinds, result
            problem = result.problems[result.kinds.index(FATAL)]
            assert NID[:12] in problem and OLD in problem and f"VPCNET_HOST_CIDR back to {OLD}" in problem
            assert local_table(config) == [OLD, NEW]      # the old route stays beside the new block's
        assert store.network(NID).host_cidr == OLD
        store.delete_network(NID)                       # `docker network rm`: now the old block may go
        assert keeper.reconcile().ok and local_table(config) == [NEW]
    finally:
        keeper.close()
        store.close()


def test_without_a_network_on_the_old_block_a_changed_host_cidr_moves_the_route(tmp_path):
    a_host_on(tmp_path, OLD, network=False)
    config = make_config(tmp_path, VPCNET_HOST_CIDR=NEW)
    store = Store(config.db_path)
    keeper = RouteKeeper(config, store)
    try:
        assert stranded_networks(config) == ""
        assert keeper.reconcile().ok
        assert local_table(config) == [NEW]
        assert keeper.host_cidr(config.cluster_cidr) == NEW
    finally:
        keeper.close()
        store.close()
