"""Rows a call left `pending` when it died between its commit and its kernel work, and endpoints Docker
gave up on: the logic on the real sqlite store, the driver, IPAM and reconciler of `make_plugin`, the kernel
a FakeDataplane (tests/test_crash.py does it end to end with `vpcnet serve`, the kernel and Docker).

A crash is an exception no `except Exception` catches (the process is gone: no undo runs), raised by the
dataplane before or after it did its work."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from fakes import make_plugin
from test_transport import EID, EID2, NID, NID2, ok, setup_endpoint, setup_network

from vpcnet.cli.doctor.engine import STRANDED_AFTER, stranded_findings
from vpcnet.state.locks import object_lock
from vpcnet.state.store import SCHEMA_VERSION, Store


class Crash(BaseException):
    """The process died here."""


def crash_in(plug, method: str, after_work: bool) -> None:
    """The next call of the dataplane's `method` dies, before or after doing its work."""
    real = getattr(plug.dataplane, method)

    def dying(*args, **kw):
        setattr(plug.dataplane, method, real)
        if after_work:
            real(*args, **kw)
        raise Crash(method)

    setattr(plug.dataplane, method, dying)


@pytest.fixture
def plug(tmp_path):
    return make_plugin(tmp_path)


@pytest.mark.parametrize("after_work", [False, True], ids=["before-kernel-work", "during-kernel-work"])
def test_a_network_whose_create_died_is_undone_by_the_next_pass_and_frees_its_block(plug, after_work):
    client = plug.app().test_client()
    crash_in(plug, "ensure_network", after_work)
    with pytest.raises(Crash):
        setup_network(client)
    [net] = plug.store.networks()
    assert net.state == "pending"
    assert bool(plug.dataplane.networks) == after_work
    pool = net.host_cidr

    undone = plug.driver.reconciler.settle_pending()
    assert undone == [f"network {NID}"]
    assert plug.store.networks() == [] and plug.store.leftovers() == []
    assert plug.dataplane.networks == {} and plug.dataplane.chains == set(), "its kernel state went too"
    # the next create on that cluster CIDR gets the same host block
    setup_network(client, nid=NID2)
    [again] = plug.store.networks()
    assert (again.network_id, again.host_cidr, again.state) == (NID2, pool, "ready")


@pytest.mark.parametrize("after_work", [False, True], ids=["before-kernel-work", "during-kernel-work"])
def test_an_endpoint_whose_create_died_is_undone_and_its_address_can_be_used(plug, after_work):
    client = plug.app().test_client()
    pool = setup_network(client)
    crash_in(plug, "ensure_endpoint", after_work)
    with pytest.raises(Crash):
        address = setup_endpoint(client, pool)
    [ep] = plug.store.endpoints()
    assert ep.state == "pending" and (ep.host_veth in plug.dataplane.links) == after_work

    plug.driver.reconciler.reconcile()            # the periodic pass settles first
    assert plug.store.endpoints() == [] and plug.dataplane.links == {}
    assert [n.state for n in plug.store.networks()] == ["ready"], "the network is not touched"
    # Docker released the address of its failed call; the same address, asked for by the next container
    address = ep.address
    ok(client, "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": address})
    ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": address, "Options": {}})
    ok(client, "/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2, "Options": {},
                                                 "Interface": {"Address": address + "/24", "AddressIPv6": "",
                                                               "MacAddress": ""}})
    assert [(e.endpoint_id, e.state) for e in plug.store.endpoints()] == [(EID2, "ready")]


def test_a_pending_row_of_a_call_still_running_is_left_to_it(plug):
    """The pass waits for the network's lock; the live call holds it from its first commit to its second."""
    client = plug.app().test_client()
    pool = setup_network(client)
    in_kernel, finish = threading.Event(), threading.Event()
    real = plug.dataplane.ensure_endpoint

    def slow(*args, **kw):
        in_kernel.set()
        assert finish.wait(10)
        return real(*args, **kw)

    plug.dataplane.ensure_endpoint = slow
    call = threading.Thread(target=setup_endpoint, args=(plug.app().test_client(), pool))
    call.start()
    assert in_kernel.wait(10)
    assert [e.state for e in plug.store.endpoints()] == ["pending"]
    settled: list = []
    pass_ = threading.Thread(target=lambda: settled.extend(plug.driver.reconciler.settle_pending()))
    pass_.start()
    time.sleep(0.3)
    assert pass_.is_alive(), "the pass waits for the call's lock"
    finish.set()
    call.join(10)
    pass_.join(10)
    assert settled == []
    assert [e.state for e in plug.store.endpoints()] == ["ready"]
    assert len(plug.dataplane.links) == 1


def test_a_replayed_create_finishes_what_the_dead_call_began(plug):
    client = plug.app().test_client()
    pool = ok(client, "/IpamDriver.RequestPool", {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "",
                                                  "Options": {}, "V6": False})
    create = {"NetworkID": NID, "Options": {"com.docker.network.generic": {}}, "IPv6Data": [],
              "IPv4Data": [{"AddressSpace": "vpcnet-local", "Pool": pool["Pool"], "AuxAddresses": None,
                            "Gateway": pool["Data"]["com.docker.network.gateway"]}]}
    crash_in(plug, "ensure_network", after_work=False)
    with pytest.raises(Crash):
        ok(client, "/NetworkDriver.CreateNetwork", create)
    ok(client, "/NetworkDriver.CreateNetwork", create)      # Docker's identical call again
    assert [n.state for n in plug.store.networks()] == ["ready"]
    setup_endpoint(client, pool)
    assert plug.driver.reconciler.settle_pending() == []
    assert len(plug.store.endpoints()) == 1


def test_release_address_forgets_an_endpoint_docker_has_given_up_on(plug, caplog):
    """CreateEndpoint finished, but its answer never reached Docker: Docker releases the address. The row
    and the veth go with it, so the address can be used again."""
    client = plug.app().test_client()
    pool = setup_network(client)
    address = setup_endpoint(client, pool)
    [ep] = plug.store.endpoints()
    assert ep.state == "ready" and ep.host_veth in plug.dataplane.links
    ok(client, "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": address})
    assert plug.store.endpoints() == [] and plug.dataplane.links == {} and plug.store.leftovers() == []
    assert plug.store.addresses(pool["PoolID"]) == []
    assert f"endpoint {EID[:12]} still held it" in caplog.text
    ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": address, "Options": {}})
    ok(client, "/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2, "Options": {},
                                                 "Interface": {"Address": address, "AddressIPv6": "",
                                                               "MacAddress": ""}})


def test_release_after_delete_endpoint_forgets_nothing_else(plug):
    """Docker's own order (DeleteEndpoint, then ReleaseAddress) is unchanged; another endpoint stays."""
    client = plug.app().test_client()
    pool = setup_network(client)
    first = setup_endpoint(client, pool)
    setup_endpoint(client, pool, eid=EID2)
    ok(client, "/NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
    ok(client, "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": first})
    assert [e.endpoint_id for e in plug.store.endpoints()] == [EID2]
    assert len(plug.dataplane.links) == 1


def test_a_v3_state_is_migrated_with_every_row_ready(tmp_path):
    path = str(tmp_path / "vpcnet.db")
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '3');
        CREATE TABLE networks (network_id TEXT PRIMARY KEY, host_cidr TEXT NOT NULL UNIQUE,
            cluster_cidr TEXT NOT NULL, gateway TEXT NOT NULL, bridge TEXT NOT NULL UNIQUE, mtu INTEGER NOT NULL,
            internal INTEGER NOT NULL, no_nat TEXT NOT NULL, created REAL NOT NULL,
            mode TEXT NOT NULL DEFAULT 'bridge');
        CREATE TABLE endpoints (endpoint_id TEXT PRIMARY KEY, network_id TEXT NOT NULL REFERENCES networks(network_id),
            address TEXT NOT NULL, mac TEXT NOT NULL, host_veth TEXT NOT NULL UNIQUE, peer_veth TEXT NOT NULL UNIQUE,
            created REAL NOT NULL, UNIQUE (network_id, address));
    """)
    conn.execute("INSERT INTO networks VALUES (?, '10.9.0.0/24', '10.9.0.0/16', '10.9.0.1', 'vpc-a', 1500, 0, '[]', 1, "
                 "'routed')", (NID,))
    conn.execute("INSERT INTO endpoints VALUES (?, ?, '10.9.0.2', '02:42:0a:09:00:02', 'vh1', 'vc1', 2)", (EID, NID))
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION) == "9"
    assert [n.state for n in store.networks()] == ["ready"] and [e.state for e in store.endpoints()] == ["ready"]
    assert store.pending() == ([], [])
    assert store.ports() == [], "schema 5: the ports table, empty"
    assert [n.host_cidr_v6 for n in store.networks()] == [""] and store.ipv6_endpoints() == [], "6: IPv4-only rows"


def test_doctor_names_a_network_docker_does_not_have_once_past_the_grace(plug):
    client = plug.app().test_client()
    setup_network(client)
    [net] = plug.store.networks()
    now = net.created + STRANDED_AFTER + 1
    [finding] = stranded_findings([net], set(), now)
    assert not finding.ok and NID[:12] in finding.detail and finding.fix == f"vpcnet network forget {NID[:12]}"
    assert stranded_findings([net], {NID}, now)[0].ok, "Docker has it"
    assert stranded_findings([net], set(), net.created + 1)[0].ok, "a create Docker has not seen answered yet"


def test_the_pass_holds_the_lock_it_checks(plug, tmp_path):
    """While another holder has the network's lock, a pending row of that network is not touched."""
    client = plug.app().test_client()
    crash_in(plug, "ensure_network", after_work=False)
    with pytest.raises(Crash):
        setup_network(client)
    held, release = threading.Event(), threading.Event()

    def hold():
        with object_lock(plug.config.state_dir, NID):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    result: list = []
    pass_ = threading.Thread(target=lambda: result.extend(plug.driver.reconciler.settle_pending()))
    pass_.start()
    time.sleep(0.3)
    assert [n.state for n in plug.store.networks()] == ["pending"], "untouched while the lock is held"
    release.set()
    holder.join(5)
    pass_.join(5)
    assert result == [f"network {NID}"] and plug.store.networks() == []


def test_release_address_keeps_an_endpoint_whose_interface_is_in_a_container(plug, caplog):
    """An address released while a joined endpoint holds it (an `--ip` honoured as a replay, then refused by
    CreateEndpoint): the container keeps its endpoint; only the address is released, as before."""
    client = plug.app().test_client()
    pool = setup_network(client)
    address = setup_endpoint(client, pool)
    [ep] = plug.store.endpoints()
    plug.dataplane.lose_peer(ep.host_veth)        # the container end is in the sandbox, not on the host
    ok(client, "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": address})
    assert plug.store.endpoints() == [ep] and ep.host_veth in plug.dataplane.links
    assert plug.store.addresses(pool["PoolID"]) == []
    assert "its interface is in a container: kept" in caplog.text
