"""The sqlite store: schema versioning, WAL, file mode, serialised writers."""
from __future__ import annotations

import os
import sqlite3
import stat
import threading

import pytest

from vpcnet.errors import StateError
from vpcnet.state.store import SCHEMA_VERSION, AssignRecord, Endpoint, Network, Store


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "state" / "vpcnet.db")


def test_schema_version_recorded(db_path):
    store = Store(db_path)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    conn = sqlite3.connect(db_path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert {"meta", "claims", "pools", "addresses", "networks", "endpoints"} <= tables
    store.close()


def test_reopen_keeps_data(db_path):
    store = Store(db_path)
    with store.tx() as db:
        store.set_meta(db, "k", "v")
    store.close()
    again = Store(db_path)
    assert again.get_meta("k") == "v"
    assert again.get_meta("schema_version") == str(SCHEMA_VERSION)
    again.close()


def test_newer_schema_refused(db_path):
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError) as info:
        Store(db_path)
    message = str(info.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message and "newer" in message and db_path in message
    # the refusal left the recorded version alone
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == \
        str(SCHEMA_VERSION + 1)
    conn.close()


def test_wal_mode(db_path):
    store = Store(db_path)
    assert store.read("PRAGMA journal_mode")[0][0] == "wal"
    conn = sqlite3.connect(db_path)                    # WAL is persistent: any opener sees it
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    store.close()


def test_file_mode_0600(db_path):
    old = os.umask(0o022)
    try:
        Store(db_path).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(db_path)).st_mode) & 0o077 == 0


def test_tx_rolls_back_on_error(db_path):
    store = Store(db_path)
    with pytest.raises(ValueError):
        with store.tx() as db:
            store.set_meta(db, "half", "done")
            raise ValueError("boom")
    assert store.get_meta("half", "absent") == "absent"
    store.close()


def test_networks_and_endpoints_round_trip(db_path):
    store = Store(db_path)
    net = Network("n" * 64, "10.200.0.0/24", "10.200.0.0/16", "10.200.0.1", "vpc-nnnnnnnnnnn", 1500, True,
                  ("192.168.0.0/16",), 1.0)
    ep = Endpoint("e" * 64, net.network_id, "10.200.0.2", "02:42:0a:c8:00:02", "vheeeeeeeeeee", "vceeeeeeeeeee",
                  2.0)
    with store.tx() as db:
        store.add_network(db, net)
        store.add_endpoint(db, ep)
    assert store.network(net.network_id) == net
    assert store.network_by_host_cidr("10.200.0.0/24") == net
    assert store.endpoint(ep.endpoint_id) == ep
    assert store.endpoints(net.network_id) == [ep]
    store.delete_network(net.network_id)              # takes its endpoints along
    assert store.network(net.network_id) is None and store.endpoints() == []
    store.close()


def test_claims(db_path):
    store = Store(db_path)
    store.want_claim("10.200.0.0/16", "claim in progress")
    store.want_claim("10.200.0.0/16", "ignored: already wanted")
    claim = store.claim("10.200.0.0/16")
    assert claim.host_cidr is None and claim.reason == "claim in progress"
    store.record_claim("10.200.0.0/16", "10.200.3.0/24", route_ok=True)
    claim = store.claim("10.200.0.0/16")
    assert claim.host_cidr == "10.200.3.0/24" and claim.route_ok and not claim.static
    store.forget_claim("10.200.0.0/16")
    assert store.claims() == []
    store.close()


def test_concurrent_writers_from_threads_lose_no_update(db_path):
    store = Store(db_path)
    with store.tx() as db:
        store.set_meta(db, "counter", "0")
    threads, rounds = 16, 25
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def bump():
        try:
            start.wait(timeout=10)
            for _ in range(rounds):
                with store.tx() as db:      # read-modify-write inside one transaction
                    value = int(db.execute("SELECT value FROM meta WHERE key='counter'").fetchone()[0])
                    store.set_meta(db, "counter", str(value + 1))
        except BaseException as exc:      # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            store.close()

    workers = [threading.Thread(target=bump) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not errors
    assert not any(t.is_alive() for t in workers)
    assert store.get_meta("counter") == str(threads * rounds)
    store.close()


def test_separate_store_objects_share_one_file(db_path):
    a, b = Store(db_path), Store(db_path)
    with a.tx() as db:
        a.set_meta(db, "x", "1")
    assert b.get_meta("x") == "1"
    a.close()
    b.close()


def test_failed_commit_leaves_the_connection_usable(db_path):
    """A COMMIT refused by sqlite (here a deferred foreign key; in life a full disk) must not leave the
    thread's connection inside the transaction, or every later write of that thread fails."""
    store = Store(db_path)
    ep = Endpoint("e" * 64, "no-such-network", "10.200.0.2", "02:42:0a:c8:00:02", "vheeeeeeeeeee",
                  "vceeeeeeeeeee", 2.0)
    with pytest.raises(sqlite3.IntegrityError):
        with store.tx() as db:
            db.execute("PRAGMA defer_foreign_keys=ON")
            store.add_endpoint(db, ep)            # refused only at COMMIT
    assert store.endpoints() == []
    with store.tx() as db:                        # the same thread's next write works
        store.set_meta(db, "after", "ok")
    assert store.get_meta("after") == "ok"
    store.close()


def test_readonly_store_never_migrates_or_writes(db_path):
    """`vpcnet status` beside a running plugin: an older schema stays as it is, no write happens."""
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn.execute("ALTER TABLE networks DROP COLUMN mode")
    conn.execute("INSERT INTO networks(network_id, host_cidr, cluster_cidr, gateway, bridge, mtu, internal, "
                 "no_nat, created) VALUES('n1', '10.200.0.0/24', '10.200.0.0/16', '10.200.0.1', 'vpc-n1', "
                 "1500, 0, '[]', 1.0)")
    conn.commit()
    conn.close()
    before = os.stat(db_path).st_mtime_ns
    store = Store(db_path, readonly=True)
    assert [n.network_id for n in store.networks()] == ["n1"] and store.networks()[0].mode == "bridge"
    with pytest.raises(StateError, match="cannot write"):
        with store.tx() as db:
            store.set_meta(db, "x", "1")
    store.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
    assert "mode" not in {r[1] for r in conn.execute("PRAGMA table_info(networks)")}
    conn.close()
    assert os.stat(db_path).st_mtime_ns == before


def test_readonly_store_of_a_missing_file_is_an_error_not_a_new_file(db_path):
    with pytest.raises(FileNotFoundError):
        Store(db_path, readonly=True)
    assert not os.path.exists(db_path)


def test_a_schema_7_state_gains_the_prefix_tables_of_eni_prefix_addressing(db_path):
    """Schema 8: the host's prefixes and an assign in flight; a schema 7 state gets them, empty, rows kept."""
    store = Store(db_path)
    with store.tx() as db:
        db.execute("DROP TABLE prefixes")
        db.execute("DROP TABLE prefix_assigns")
        store.set_meta(db, "schema_version", "7")
        store.set_meta(db, "kept", "yes")
    store.close()
    store = Store(db_path)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION) == "9" and store.get_meta("kept") == "yes"
    assert store.held_prefixes() == [] and store.assign_records() == []
    record = AssignRecord("token-1", "ipv4", 2, ("10.0.0.0/28",), 5.0)
    store.record_assign(record)
    assert store.assign_records() == [record]
    store.settle_assign("token-1", "ipv4", ["10.0.0.32/28", "10.0.0.16/28"], 6.0)
    assert store.assign_records() == []
    assert [(p.prefix, p.state, p.unused_since) for p in store.held_prefixes("ipv4")] == \
        [("10.0.0.16/28", "held", 6.0), ("10.0.0.32/28", "held", 6.0)]
    store.close()


def test_a_schema_8_state_s_networks_are_route_table_ones_and_eni_prefix_ones_are_remembered(db_path):
    """Schema 9: a network remembers its addressing; an older state's networks all are route-table ones."""
    store = Store(db_path)
    with store.tx() as db:
        store.add_network(db, Network("aa", "10.200.0.0/24", "10.200.0.0/16", "10.200.0.1", "vpc-aa", 1500, False,
                                      (), 1.0, "routed"))
    store.close()
    conn = sqlite3.connect(db_path)      # back to schema 8: the column gone (sqlite 3.35+ drops columns)
    conn.execute("ALTER TABLE networks DROP COLUMN addressing")
    conn.execute("UPDATE meta SET value='8' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    store = Store(db_path)
    assert store.get_meta("schema_version") == "9" and store.network("aa").addressing == "route-table"
    with store.tx() as db:
        store.add_network(db, Network("bb", "10.0.0.0/20", "10.0.0.0/20", "10.0.0.1", "vpc-bb", 1500, False, (), 2.0,
                                      "routed", addressing="eni-prefix"))
    assert [n.addressing for n in store.networks()] == ["route-table", "eni-prefix"]
    store.close()


# Schema 6's networks and endpoints (before IPv6-only networks): a row keyed by its IPv4 block and address.
SCHEMA_6 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE networks (network_id TEXT PRIMARY KEY, host_cidr TEXT NOT NULL UNIQUE, cluster_cidr TEXT NOT NULL,
    gateway TEXT NOT NULL, bridge TEXT NOT NULL UNIQUE, mtu INTEGER NOT NULL, internal INTEGER NOT NULL,
    no_nat TEXT NOT NULL, created REAL NOT NULL, mode TEXT NOT NULL DEFAULT 'bridge',
    state TEXT NOT NULL DEFAULT 'ready', host_cidr_v6 TEXT NOT NULL DEFAULT '',
    cluster_cidr_v6 TEXT NOT NULL DEFAULT '', gateway_v6 TEXT NOT NULL DEFAULT '');
CREATE TABLE endpoints (endpoint_id TEXT PRIMARY KEY, network_id TEXT NOT NULL REFERENCES networks(network_id),
    address TEXT NOT NULL, mac TEXT NOT NULL, host_veth TEXT NOT NULL UNIQUE, peer_veth TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, state TEXT NOT NULL DEFAULT 'ready', address_v6 TEXT NOT NULL DEFAULT '',
    UNIQUE (network_id, address));
CREATE TABLE ports (endpoint_id TEXT NOT NULL REFERENCES endpoints(endpoint_id) ON DELETE CASCADE,
    family TEXT NOT NULL DEFAULT 'ipv4', proto TEXT NOT NULL, host_ip TEXT NOT NULL, host_port INTEGER NOT NULL,
    container_port INTEGER NOT NULL, asked TEXT NOT NULL, PRIMARY KEY (family, proto, host_ip, host_port));
INSERT INTO meta VALUES ('schema_version', '6');
INSERT INTO networks VALUES ('aa', '10.200.0.0/24', '10.200.0.0/16', '10.200.0.1', 'vpc-aa', 1500, 0, '[]', 1.0,
    'routed', 'ready', 'fd00:1::/80', 'fd00:1::/48', 'fd00:1::1');
INSERT INTO endpoints VALUES ('e1', 'aa', '10.200.0.2', '02:42:0a:c8:00:02', 'vhe1', 'vce1', 2.0, 'ready',
    'fd00:1::2');
INSERT INTO ports VALUES ('e1', 'ipv4', 'tcp', '', 8080, 80, '8080');
"""


def _v6_only(network_id: str, block: str, bridge: str) -> Network:
    return Network(network_id, "", "", "", bridge, 1500, False, (), 3.0, "routed",
                   host_cidr_v6=block, cluster_cidr_v6="fd00:1::/48", gateway_v6=block.split("/")[0] + "1")


def test_schema_6_state_becomes_7_with_its_rows_and_takes_ipv6_only_networks(db_path):
    """A schema 6 state (network rows keyed by their IPv4 block) is rebuilt in place: rows, foreign keys
    and the cascade of ports kept; then IPv6-only rows (no IPv4 block, no IPv4 address) fit, several of them,
    while a block or an address of either family stays one row's."""
    os.makedirs(os.path.dirname(db_path))
    conn = sqlite3.connect(db_path)
    conn.executescript(SCHEMA_6)
    conn.close()
    Store(db_path, readonly=True).networks()          # a reader beside an old plugin reads it as it is
    store = Store(db_path)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert [n.host_cidr for n in store.networks()] == ["10.200.0.0/24"]
    assert [(e.address, e.address_v6) for e in store.endpoints("aa")] == [("10.200.0.2", "fd00:1::2")]
    assert [p.host_port for p in store.ports()] == [8080]
    store.close()
    Store(db_path).close()                              # idempotent: a second start changes nothing
    store = Store(db_path)
    assert store.read("PRAGMA foreign_keys")[0][0] == 1
    with pytest.raises(sqlite3.IntegrityError):         # the foreign key holds after the rebuild
        with store.tx() as db:
            store.add_endpoint(db, Endpoint("e9", "nope", "10.200.0.9", "m", "vhe9", "vce9", 1.0))
    with store.tx() as db:
        store.add_network(db, _v6_only("bb", "fd00:1:0:0:2::/80", "vpc-bb"))
        store.add_network(db, _v6_only("cc", "fd00:1:0:0:3::/80", "vpc-cc"))
        for n in (2, 3):
            store.add_endpoint(db, Endpoint(f"b{n}", "bb", "", f"m{n}", f"vhb{n}", f"vcb{n}", 4.0,
                                            address_v6=f"fd00:1:0:0:2::{n}"))
    assert store.network_by_host_cidr("") is None
    assert store.network_by_host_cidr("fd00:1:0:0:3::/80").network_id == "cc"
    assert [e.address for e in store.endpoints("bb")] == ["", ""]
    for clash in (_v6_only("dd", "fd00:1:0:0:2::/80", "vpc-dd"),
                  Network("ee", "10.200.0.0/24", "10.200.0.0/16", "10.200.0.1", "vpc-ee", 1500, False, (), 5.0)):
        with pytest.raises(sqlite3.IntegrityError):
            with store.tx() as db:
                store.add_network(db, clash)
    for address, address_v6 in (("", "fd00:1:0:0:2::2"), ("10.200.0.2", "")):
        with pytest.raises(sqlite3.IntegrityError):
            with store.tx() as db:
                store.add_endpoint(db, Endpoint("x", "bb" if address_v6 else "aa", address, "m", "vhx", "vcx", 6.0,
                                                address_v6=address_v6))
    store.delete_endpoint("e1")                         # its ports go with it (the cascade)
    assert store.ports() == []
    store.close()
