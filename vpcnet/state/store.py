"""The plugin's memory across restarts: one sqlite file (WAL) in the state dir.

Docker never replays CreateNetwork, so everything a later call needs is written here before the call
answers. Every change is one `BEGIN IMMEDIATE` transaction: sqlite serialises writers across threads and
gunicorn workers, so two concurrent RequestAddress calls can never take the same address, and a crash
mid-call leaves either the old state or the new one.

A call that also changes the kernel spans two transactions with the kernel work between them: a network
or endpoint row is written `pending` and set `ready` once the kernel holds it (schema 4). A row still
pending when nobody holds its network's lock belongs to a call that died in between (kill -9, an OOM
kill, gunicorn's watchdog): Docker never got an answer, so it has no such network or endpoint, and the
datapath pass undoes the row and its kernel state (vpcnet.datapath.reconciler, `settle_pending`).

IPv6-only networks (schema 7): a network row without an IPv4 block has host_cidr, cluster_cidr and gateway
'', its endpoints address ''; host blocks and addresses are unique per family where set (partial indexes,
which replaced schema 6's UNIQUE constraints: the migration rebuilds both tables in place, foreign keys
checked before it commits).

eni-prefix addressing (schema 8): `prefixes` holds the prefixes this host holds on its network interface and
since when each is wholly unused, `prefix_assigns` an assign whose answer is not in yet (its client token and
the interface's prefixes before it), so a lost answer is settled by the next pass (vpcnet.routes.prefixes).
A network remembers its addressing (schema 9, `networks.addressing`): in eni-prefix mode its host_cidr is the
range every host shares (the pool), and this host's part of it is the prefixes it holds.

Published ports (schema 5) are rows of `ports`, one per host port and family, going with their endpoint (a
foreign key with ON DELETE CASCADE; an IPv6 one also with the endpoint's IPv6 address); every change moves
the meta key `ports_version` (triggers), so a datapath pass that read them before a concurrent Program or
Revoke passes again.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import os
import sqlite3
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from vpcnet.errors import Conflict, StateError

REPAIRS_KEY = "datapath_repairs"      # meta key: the datapath pass's repair counts (JSON)
PORTS_VERSION_KEY = "ports_version"   # meta key: moved by every change of the published ports (a trigger)
SCHEMA_VERSION = 9     # 2: networks.mode (bridge | routed); 3: leftovers; 4: networks/endpoints.state; 5: ports;
                       # 6: IPv6 (networks.host_cidr_v6, cluster_cidr_v6, gateway_v6; endpoints.address_v6);
                       # 7: IPv6-only networks (networks.host_cidr '' allowed: unique where set, per family);
                       # 8: eni-prefix addressing (prefixes, prefix_assigns); 9: networks.addressing
PENDING, READY = "pending", "ready"   # a row's state: its call's kernel work not done yet, or done
HELD, RELEASING = "held", "releasing"  # a prefix's state: addresses may be taken from it, or it is being given back
# A published port's container address: its endpoint's of the port's family.
_ADDRESS = "CASE p.family WHEN 'ipv6' THEN e.address_v6 ELSE e.address END"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- This host's block inside each cluster CIDR (static, or claimed in the route table).
CREATE TABLE IF NOT EXISTS claims (
    cluster_cidr TEXT PRIMARY KEY,
    host_cidr    TEXT,                -- NULL while wanted but not yet claimed
    static       INTEGER NOT NULL DEFAULT 0,
    reason       TEXT NOT NULL DEFAULT '',   -- why not claimed yet, or the last route problem
    route_ok     INTEGER NOT NULL DEFAULT 0, -- 1 when the last reconcile found the route Available here
    updated      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pools (
    pool_id      TEXT PRIMARY KEY,    -- the host CIDR itself: deterministic, so replays match
    cluster_cidr TEXT NOT NULL,
    gateway      TEXT NOT NULL,
    cursor       INTEGER NOT NULL     -- next-fit position: released addresses wait for a full turn
);
CREATE TABLE IF NOT EXISTS addresses (
    pool_id      TEXT NOT NULL REFERENCES pools(pool_id),
    address      TEXT NOT NULL,
    replay_epoch INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (pool_id, address)
);
CREATE TABLE IF NOT EXISTS networks (
    network_id   TEXT PRIMARY KEY,
    host_cidr    TEXT NOT NULL,       -- this host's IPv4 block, '' for an IPv6-only network (7)
    cluster_cidr TEXT NOT NULL,
    gateway      TEXT NOT NULL,
    bridge       TEXT NOT NULL UNIQUE,
    mtu          INTEGER NOT NULL,
    internal     INTEGER NOT NULL,
    no_nat       TEXT NOT NULL,       -- JSON list
    created      REAL NOT NULL,
    mode         TEXT NOT NULL DEFAULT 'bridge',  -- datapath: 'bridge', 'routed' or 'ebpf' (schema 2)
    state        TEXT NOT NULL DEFAULT 'ready',   -- 'pending' until CreateNetwork's kernel work is done (4)
    host_cidr_v6    TEXT NOT NULL DEFAULT '',     -- this host's IPv6 block, '' for an IPv4-only network (6)
    cluster_cidr_v6 TEXT NOT NULL DEFAULT '',
    gateway_v6      TEXT NOT NULL DEFAULT '',     -- the IPv6 pool's gateway (the block's first address)
    addressing      TEXT NOT NULL DEFAULT 'route-table'   -- 'route-table', or 'eni-prefix': host_cidr is the
                                                          -- range shared by every host (9)
);
CREATE TABLE IF NOT EXISTS endpoints (
    endpoint_id  TEXT PRIMARY KEY,
    network_id   TEXT NOT NULL REFERENCES networks(network_id),
    address      TEXT NOT NULL,       -- bare IPv4 address, '' on an IPv6-only network (7)
    mac          TEXT NOT NULL,
    host_veth    TEXT NOT NULL UNIQUE,
    peer_veth    TEXT NOT NULL UNIQUE,
    created      REAL NOT NULL,
    state        TEXT NOT NULL DEFAULT 'ready',   -- 'pending' until CreateEndpoint's kernel work is done (4)
    address_v6   TEXT NOT NULL DEFAULT ''         -- bare IPv6 address, '' without one (6)
);
-- Published ports (-p, schema 5): each one host port to one endpoint's container port. A row goes with its
-- endpoint (ON DELETE CASCADE), the rules are the network's (vpcnet.datapath.modes), recomputed from here.
CREATE TABLE IF NOT EXISTS ports (
    endpoint_id    TEXT NOT NULL REFERENCES endpoints(endpoint_id) ON DELETE CASCADE,
    family         TEXT NOT NULL DEFAULT 'ipv4',   -- 'ipv4', or 'ipv6' (to the endpoint's address_v6)
    proto          TEXT NOT NULL,                  -- tcp | udp | sctp
    host_ip        TEXT NOT NULL,                  -- '' for every address of the host
    host_port      INTEGER NOT NULL,               -- the one in use (chosen from `asked` for -P or a range)
    container_port INTEGER NOT NULL,
    asked          TEXT NOT NULL,                  -- the host port as Docker asked: '' (-P), '8080', '8000-8010'
    PRIMARY KEY (family, proto, host_ip, host_port)
);
-- eni-prefix addressing (8): the prefixes this host holds on its interface (only those vpcnet assigned or
-- adopted from an assign of its own: any other prefix of the interface is never taken or released).
CREATE TABLE IF NOT EXISTS prefixes (
    prefix       TEXT PRIMARY KEY,    -- as the cloud writes it: 10.0.0.16/28, fd00:1::/80
    family       TEXT NOT NULL,       -- 'ipv4' | 'ipv6'
    state        TEXT NOT NULL DEFAULT 'held',   -- 'held', or 'releasing' once chosen to be given back
    unused_since REAL,                -- since when no address of it is in use (NULL while one is)
    taken        REAL NOT NULL DEFAULT 0,        -- when an address of it was last handed out
    added        REAL NOT NULL
);
-- An assign whose answer has not been recorded: settled by the next pass (the prefixes that appeared).
CREATE TABLE IF NOT EXISTS prefix_assigns (
    client_token TEXT PRIMARY KEY,
    family       TEXT NOT NULL,
    count        INTEGER NOT NULL,
    before       TEXT NOT NULL,       -- JSON list: the interface's prefixes of the family just before it
    since        REAL NOT NULL
);
-- Kernel state of deleted networks and endpoints not removed yet (the row went first, a later datapath
-- pass removes what the kernel still holds). Never blocks a new network, it is not in `networks`.
CREATE TABLE IF NOT EXISTS leftovers (
    name         TEXT PRIMARY KEY,    -- 'network:<id>' or 'endpoint:<host veth>'
    data         TEXT NOT NULL,       -- JSON: the deleted row (a network also lists its host veths)
    since        REAL NOT NULL
);
"""
# Schema 7: a host block is one network's, and an address one endpoint's, per family; '' (none of that family,
# an IPv6-only network's IPv4) is no block and no address. Made after the column migrations (the IPv6 columns).
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS networks_host_cidr ON networks(host_cidr) WHERE host_cidr != '';
CREATE UNIQUE INDEX IF NOT EXISTS networks_host_cidr_v6 ON networks(host_cidr_v6) WHERE host_cidr_v6 != '';
CREATE UNIQUE INDEX IF NOT EXISTS endpoints_address ON endpoints(network_id, address) WHERE address != '';
CREATE UNIQUE INDEX IF NOT EXISTS endpoints_address_v6 ON endpoints(network_id, address_v6) WHERE address_v6 != '';
"""
# 6 -> 7: the UNIQUE constraints these indexes replace (a table constraint is dropped only by rebuilding it)
OLD_UNIQUE = {"networks": ["host_cidr"], "endpoints": ["network_id", "address"]}


@dataclass(frozen=True)
class Network:
    network_id: str
    host_cidr: str
    cluster_cidr: str
    gateway: str
    bridge: str
    mtu: int
    internal: bool
    no_nat: tuple[str, ...]
    created: float = 0.0
    mode: str = "bridge"
    state: str = READY
    host_cidr_v6: str = ""      # IPv6: this host's block, its cluster CIDR and gateway ("" without IPv6)
    cluster_cidr_v6: str = ""
    gateway_v6: str = ""
    addressing: str = "route-table"     # eni-prefix: host_cidr is the range every host shares (docs/eni-prefix.md)


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    network_id: str
    address: str
    mac: str
    host_veth: str
    peer_veth: str
    created: float = 0.0
    state: str = READY
    address_v6: str = ""        # bare IPv6 address, "" without one


@dataclass(frozen=True)
class Port:
    """A `ports` row; `address` is its endpoint's of the row's family (read with it, not stored twice)."""
    endpoint_id: str
    proto: str
    host_ip: str
    host_port: int
    container_port: int
    asked: str = ""
    family: str = "ipv4"
    address: str = ""

    @property
    def host(self) -> str:
        """The host side as a user writes it: `0.0.0.0:8080`, `10.0.0.5:8080`, `[::]:8080`, `[2001:db8::1]:8080`."""
        if self.family == "ipv6":
            return f"[{self.host_ip or '::'}]:{self.host_port}"
        return f"{self.host_ip or '0.0.0.0'}:{self.host_port}"

    def clashes(self, other: Port) -> bool:
        """Both would take the same host port: same family and protocol and port, and one of them on every
        address or both on the same one."""
        return (self.family, self.proto, self.host_port) == (other.family, other.proto, other.host_port) and \
            (not self.host_ip or not other.host_ip or self.host_ip == other.host_ip)


@dataclass(frozen=True)
class HeldPrefix:
    """A `prefixes` row: a prefix this host holds on its interface."""
    prefix: str
    family: str                 # 'ipv4' | 'ipv6'
    state: str = HELD
    unused_since: float | None = None
    taken: float = 0.0
    added: float = 0.0


@dataclass(frozen=True)
class AssignRecord:
    """A `prefix_assigns` row: an assign sent whose answer is not recorded yet."""
    client_token: str
    family: str
    count: int
    before: tuple[str, ...]
    since: float


@dataclass(frozen=True)
class Claim:
    cluster_cidr: str
    host_cidr: str | None
    static: bool
    reason: str
    route_ok: bool
    updated: float


class Store:
    """`readonly=True` (for `vpcnet status`, `vpcnet doctor` and other readers beside a running plugin): the file is
    opened read-only and never migrated; a missing file is an error rather than a new empty store."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.readonly = readonly
        self._local = threading.local()
        if readonly:
            if not os.path.exists(path):
                raise FileNotFoundError(f"no vpcnet state at {path}")
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self._migrate()

    # -- plumbing ---------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            if self.readonly:
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, isolation_level=None,
                                       check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            if not self.readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; taken immediately so concurrent writers queue instead of racing."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            # Also after a failed COMMIT (disk full, a deferred constraint): sqlite may keep the
            # transaction open, and this thread's connection would then refuse every later BEGIN.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self._drop_connection()
            if isinstance(exc, sqlite3.OperationalError) and _storage_failure(exc):
                raise StateError(f"cannot write vpcnet's state {self.path}: {exc}; nothing was changed "
                                 "(free space on its filesystem, then retry)") from None
            raise

    def _drop_connection(self) -> None:
        """Forget this thread's connection (a broken one): the next call opens a fresh one."""
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, args).fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _migrate(self) -> None:
        # A table rebuilt (6 -> 7) is dropped and its copy renamed: with foreign keys on, the drop would
        # delete (or refuse) the rows referring to it. Off for the migration only (outside a transaction, as
        # sqlite wants), checked whole before the commit (PRAGMA foreign_key_check).
        self._conn().execute("PRAGMA foreign_keys=OFF")
        try:
            self._migrate_tx()
        finally:
            self._conn().execute("PRAGMA foreign_keys=ON")

    def _migrate_tx(self) -> None:
        with self.tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row["value"]) if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"state {self.path} has schema version {version}, newer than this "
                                   f"vpcnet ({SCHEMA_VERSION}): upgrade vpcnet or move the state away")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            # 1 -> 2: networks gain their datapath mode; every network of a v1 state is a bridge one.
            columns = {r["name"] for r in db.execute("PRAGMA table_info(networks)")}
            if "mode" not in columns:
                db.execute("ALTER TABLE networks ADD COLUMN mode TEXT NOT NULL DEFAULT 'bridge'")
            # 5: every change of `ports` (cascades from a deleted endpoint included) moves `ports_version`, so a
            # datapath pass that read the ports before a concurrent change sees it and passes again.
            for event in ("INSERT", "DELETE"):
                db.execute(f"CREATE TRIGGER IF NOT EXISTS ports_{event.lower()} AFTER {event} ON ports BEGIN "
                           f"INSERT OR REPLACE INTO meta(key, value) VALUES('{PORTS_VERSION_KEY}', "
                           f"COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key='{PORTS_VERSION_KEY}'), 0) "
                           "+ 1); END")
            # 3 -> 4: rows gain their state; every row of a v3 state answered its call.
            for table in ("networks", "endpoints"):
                if "state" not in {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN state TEXT NOT NULL DEFAULT 'ready'")
            # 5 -> 6: IPv6; every row of an older state is IPv4-only.
            for table, column in (("networks", "host_cidr_v6"), ("networks", "cluster_cidr_v6"),
                                  ("networks", "gateway_v6"), ("endpoints", "address_v6")):
                if column not in {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            # 8 -> 9: networks remember their addressing; every network of an older state is route-table.
            if "addressing" not in {r["name"] for r in db.execute("PRAGMA table_info(networks)")}:
                db.execute("ALTER TABLE networks ADD COLUMN addressing TEXT NOT NULL DEFAULT 'route-table'")
            # 6 -> 7: IPv6-only networks; their rows have no IPv4 block or address ('').
            for table in OLD_UNIQUE:
                if _has_unique(db, table, OLD_UNIQUE[table]):
                    _rebuild(db, table)
            for statement in INDEXES.split(";"):
                if statement.strip():
                    db.execute(statement)
            broken = db.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"state {self.path}: {len(broken)} row(s) refer to rows that do not exist "
                                   f"(first: {tuple(broken[0])}): nothing was changed")
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?)",
                       (str(SCHEMA_VERSION),))
        os.chmod(self.path, 0o600)

    # -- meta -------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str = "") -> str:
        rows = self.read("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0]["value"] if rows else default

    def set_meta(self, db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    def change_meta(self, key: str, change: Callable[[str], str], default: str = "") -> str:
        """Read, change and write one meta value in one transaction; returns the new value."""
        with self.tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            value = change(row["value"] if row else default)
            self.set_meta(db, key, value)
            return value

    # -- the datapath pass's repairs ----------------------------------------------------------------
    def repair_counts(self) -> dict[str, int]:
        """Repairs so far by object kind (firewall, link, address, route, tc): kept here so the count
        survives a restart and any worker's pass adds to it."""
        try:
            return {k: int(v) for k, v in json.loads(self.get_meta(REPAIRS_KEY, "{}")).items()}
        except ValueError:
            return {}

    def add_repairs(self, new: dict[str, int]) -> None:
        with self.tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key=?", (REPAIRS_KEY,)).fetchone()
            total = Counter(json.loads(row["value"]) if row else {})
            total.update(new)
            self.set_meta(db, REPAIRS_KEY, json.dumps(dict(total), sort_keys=True))

    # -- claims -----------------------------------------------------------------------------------
    def claims(self) -> list[Claim]:
        return [_claim(r) for r in self.read("SELECT * FROM claims ORDER BY cluster_cidr")]

    def claim(self, cluster_cidr: str) -> Claim | None:
        rows = self.read("SELECT * FROM claims WHERE cluster_cidr=?", (cluster_cidr,))
        return _claim(rows[0]) if rows else None

    def want_claim(self, cluster_cidr: str, reason: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO claims(cluster_cidr, host_cidr, reason, updated) "
                       "VALUES(?, NULL, ?, ?)", (cluster_cidr, reason, time.time()))

    def record_claim(self, cluster_cidr: str, host_cidr: str | None, static: bool = False,
                     reason: str = "", route_ok: bool = False) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO claims(cluster_cidr, host_cidr, static, reason, route_ok, "
                       "updated) VALUES(?, ?, ?, ?, ?, ?)",
                       (cluster_cidr, host_cidr, int(static), reason, int(route_ok), time.time()))

    def forget_claim(self, cluster_cidr: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM claims WHERE cluster_cidr=?", (cluster_cidr,))

    # -- eni-prefix addressing: this host's prefixes ----------------------------------------------------
    def held_prefixes(self, family: str | None = None) -> list[HeldPrefix]:
        """The prefixes this host holds (of one family), lowest first."""
        rows = self.read("SELECT * FROM prefixes" + (" WHERE family=?" if family else ""),
                         (family,) if family else ())
        return sorted((HeldPrefix(**dict(r)) for r in rows), key=lambda p: _sort_key(p.prefix))

    def addresses_in_use(self, family: str) -> set[str]:
        """Every address of `family` the IPAM handed out or an endpoint holds."""
        return _in_use(self._conn(), family)

    def prefix_use(self, family: str, now: float) -> dict[str, int]:
        """Addresses in use per held prefix of `family` (releasing ones included); in the same transaction a
        prefix found wholly unused gets `unused_since` (now, unless it has one), one in use loses it."""
        with self.tx() as db:
            used = _parsed(_in_use(db, family))
            counts: dict[str, int] = {}
            for row in db.execute("SELECT prefix, unused_since FROM prefixes WHERE family=?", (family,)).fetchall():
                counts[row["prefix"]] = count = _count_in(row["prefix"], used)
                if count:
                    db.execute("UPDATE prefixes SET unused_since=NULL WHERE prefix=?", (row["prefix"],))
                elif row["unused_since"] is None:
                    db.execute("UPDATE prefixes SET unused_since=? WHERE prefix=?", (now, row["prefix"]))
            return counts

    @staticmethod
    def mark_prefix_taken(db: sqlite3.Connection, address: str, now: float) -> str | None:
        """Inside a transaction: the held prefix holding `address` (a --ip, a replay), marked taken now as
        `take_prefix_address` marks it (no pass gives it back meanwhile); None when no held prefix has it."""
        ip = ipaddress.ip_address(address)
        family = f"ipv{ip.version}"
        for row in db.execute("SELECT prefix FROM prefixes WHERE family=? AND state=?", (family, HELD)).fetchall():
            if ip in ipaddress.ip_network(row["prefix"]):
                db.execute("UPDATE prefixes SET taken=?, unused_since=NULL WHERE prefix=?", (now, row["prefix"]))
                return row["prefix"]
        return None

    def take_prefix_address(self, family: str, pick: Callable[[list[HeldPrefix], set[str]], tuple[str, str] | None],
                            now: float, record: Callable[[sqlite3.Connection, str], None] | None = None
                            ) -> tuple[str, str] | None:
        """(prefix, address) that `pick(held prefixes, addresses in use)` chooses, in one transaction that
        marks the prefix taken (in use from now, so no pass releases it before the address is recorded) and
        calls `record(db, address)` (the IPAM's row: a concurrent take then sees the address in use); None
        when `pick` finds none."""
        with self.tx() as db:
            held = [HeldPrefix(**dict(r)) for r in
                    db.execute("SELECT * FROM prefixes WHERE family=? AND state=?", (family, HELD)).fetchall()]
            chosen = pick(sorted(held, key=lambda p: _sort_key(p.prefix)), _in_use(db, family))
            if chosen is not None:
                db.execute("UPDATE prefixes SET taken=?, unused_since=NULL WHERE prefix=?", (now, chosen[0]))
                if record is not None:
                    record(db, chosen[1])
            return chosen

    def begin_release(self, family: str, prefixes: list[str], unused_before: float, taken_before: float) -> list[str]:
        """Of `prefixes`, those still held, unused since before `unused_before`, not handed an address since
        `taken_before` and with no address in use now, become `releasing` (no address is taken from them any
        more); returns them. One transaction, so a concurrent take either wins or sees them releasing."""
        with self.tx() as db:
            used = _parsed(_in_use(db, family))
            chosen = []
            for prefix in prefixes:
                row = db.execute("SELECT * FROM prefixes WHERE prefix=? AND family=? AND state=?",
                                 (prefix, family, HELD)).fetchone()
                if row is None or row["unused_since"] is None or row["unused_since"] > unused_before \
                        or row["taken"] > taken_before or _count_in(prefix, used):
                    continue
                db.execute("UPDATE prefixes SET state=? WHERE prefix=?", (RELEASING, prefix))
                chosen.append(prefix)
            return chosen

    def begin_release_all(self, taken_before: float, force: bool) -> tuple[list[HeldPrefix], list[str]]:
        """Decommissioning: (every prefix now `releasing`, those of them with an address in use or handed one
        since `taken_before`). In one transaction: unless `force`, any such prefix leaves every prefix as it
        was (nothing is half-started); else, or with none, every held prefix becomes `releasing`, so no
        address is taken from any of them any more."""
        with self.tx() as db:
            rows = [HeldPrefix(**dict(r)) for r in db.execute("SELECT * FROM prefixes").fetchall()]
            used = {f: _parsed(_in_use(db, f)) for f in {r.family for r in rows}}
            busy = [r.prefix for r in sorted(rows, key=lambda r: _sort_key(r.prefix))
                    if _count_in(r.prefix, used[r.family]) or r.taken > taken_before]
            if busy and not force:
                return [], busy
            db.execute("UPDATE prefixes SET state=?", (RELEASING,))
            releasing = [HeldPrefix(**dict(r)) for r in db.execute("SELECT * FROM prefixes").fetchall()]
            return sorted(releasing, key=lambda r: _sort_key(r.prefix)), busy

    def forget_prefixes(self, prefixes: list[str]) -> None:
        """The prefixes are off the interface (released, or gone behind vpcnet's back)."""
        with self.tx() as db:
            db.executemany("DELETE FROM prefixes WHERE prefix=?", [(p,) for p in prefixes])

    def assign_records(self) -> list[AssignRecord]:
        return [AssignRecord(r["client_token"], r["family"], r["count"], tuple(json.loads(r["before"])), r["since"])
                for r in self.read("SELECT * FROM prefix_assigns ORDER BY since")]

    def record_assign(self, record: AssignRecord) -> None:
        """Written before the assign is sent: its answer may be lost, the record is not."""
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO prefix_assigns(client_token, family, count, before, since) "
                       "VALUES(?, ?, ?, ?, ?)", (record.client_token, record.family, record.count,
                                                 json.dumps(list(record.before)), record.since))

    def settle_assign(self, client_token: str, family: str, prefixes: list[str], now: float) -> None:
        """The assign's prefixes are this host's (none: it did not happen), and its record goes, in one
        transaction: a crash leaves either the record (settled again) or the prefixes."""
        with self.tx() as db:
            db.executemany("INSERT OR IGNORE INTO prefixes(prefix, family, state, unused_since, taken, added) "
                           "VALUES(?, ?, ?, ?, 0, ?)", [(p, family, HELD, now, now) for p in prefixes])
            db.execute("DELETE FROM prefix_assigns WHERE client_token=?", (client_token,))

    # -- networks and endpoints -------------------------------------------------------------------
    def networks(self) -> list[Network]:
        return [_network(r) for r in self.read("SELECT * FROM networks ORDER BY created")]

    def network(self, network_id: str) -> Network | None:
        rows = self.read("SELECT * FROM networks WHERE network_id=?", (network_id,))
        return _network(rows[0]) if rows else None

    def network_by_host_cidr(self, host_cidr: str) -> Network | None:
        """The network holding a host block of either family ('' is no block: none)."""
        if not host_cidr:
            return None
        rows = self.read("SELECT * FROM networks WHERE host_cidr=? OR host_cidr_v6=?", (host_cidr, host_cidr))
        return _network(rows[0]) if rows else None

    def add_network(self, db: sqlite3.Connection, net: Network) -> None:
        row = asdict(net)
        row["no_nat"] = json.dumps(list(net.no_nat))
        row["internal"] = int(net.internal)
        db.execute(f"INSERT INTO networks({', '.join(row)}) VALUES({', '.join('?' * len(row))})",
                   tuple(row.values()))

    def delete_network(self, network_id: str, leftover: bool = False, release_addresses: bool = False) -> None:
        """Forget a network and its endpoints; with `leftover`, in the same transaction record their
        kernel state as still to be removed (see `leftovers`); with `release_addresses`, give their
        endpoints' addresses back to the pool too (`vpcnet network forget`: Docker holds none of them)."""
        with self.tx() as db:
            if release_addresses:
                db.execute("DELETE FROM addresses WHERE pool_id=(SELECT host_cidr FROM networks WHERE network_id=?) "
                           "AND address IN (SELECT address FROM endpoints WHERE network_id=?)",
                           (network_id, network_id))
                db.execute("DELETE FROM addresses WHERE pool_id=(SELECT host_cidr_v6 FROM networks WHERE "
                           "network_id=?) AND address IN (SELECT address_v6 FROM endpoints WHERE network_id=?)",
                           (network_id, network_id))
            if leftover:
                net = db.execute("SELECT * FROM networks WHERE network_id=?", (network_id,)).fetchone()
                rows = db.execute("SELECT host_veth, address FROM endpoints WHERE network_id=?",
                                  (network_id,)).fetchall()
                if net is not None:
                    data = dict(net) | {"host_veths": [r["host_veth"] for r in rows],
                                        "addresses": [r["address"] for r in rows]}
                    db.execute("INSERT OR REPLACE INTO leftovers(name, data, since) VALUES(?, ?, ?)",
                               (f"network:{network_id}", json.dumps(data), time.time()))
            db.execute("DELETE FROM endpoints WHERE network_id=?", (network_id,))
            db.execute("DELETE FROM networks WHERE network_id=?", (network_id,))

    def set_ready(self, table: str, key: str) -> None:
        """The kernel holds the network (`table` "networks", `key` its id) or endpoint ("endpoints", its id)."""
        column = {"networks": "network_id", "endpoints": "endpoint_id"}[table]
        with self.tx() as db:
            db.execute(f"UPDATE {table} SET state=? WHERE {column}=? AND state=?", (READY, key, PENDING))

    def pending(self) -> tuple[list[Network], list[Endpoint]]:
        """The networks and endpoints whose call has not finished its kernel work (or died before)."""
        nets = [_network(r) for r in self.read("SELECT * FROM networks WHERE state=? ORDER BY created", (PENDING,))]
        eps = [Endpoint(**dict(r)) for r in
               self.read("SELECT * FROM endpoints WHERE state=? ORDER BY created", (PENDING,))]
        return nets, eps

    def release_address(self, pool_id: str, address: str,
                        forget: Callable[[Endpoint], bool] = lambda ep: True) -> tuple[list[Endpoint], list[Endpoint]]:
        """Give an address back to its pool; in the same transaction, an endpoint row still holding it for
        which `forget` says so goes to the leftovers (Docker releases an address only when it has no
        endpoint on it: after DeleteEndpoint, or after a CreateEndpoint whose answer never reached it).
        Returns (the endpoints forgotten, those kept)."""
        with self.tx() as db:
            rows = db.execute("SELECT e.* FROM endpoints e JOIN networks n ON n.network_id = e.network_id "
                              "WHERE (n.host_cidr=? AND e.address=?) OR (n.host_cidr_v6=? AND e.address_v6=?)",
                              (pool_id, address, pool_id, address)).fetchall()
            gone, kept = [], []
            for row in rows:
                ep = Endpoint(**dict(row))
                if not forget(ep):
                    kept.append(ep)
                    if ep.address_v6 == address and ep.address != address:
                        # Docker released the IPv6 address of a running container (it turned IPv6 off by
                        # sysctl) without telling the driver: the endpoint keeps its IPv4 only, so nothing
                        # of the datapath lets the address through any more (the guard reads this row).
                        db.execute("UPDATE endpoints SET address_v6='' WHERE endpoint_id=?", (ep.endpoint_id,))
                        # ... nor any IPv6 port it published: their rows go with the address (the driver
                        # writes the rules again from the rows, vpcnet.docker.driver.drop_ipv6)
                        db.execute("DELETE FROM ports WHERE endpoint_id=? AND family='ipv6'", (ep.endpoint_id,))
                    continue
                gone.append(ep)
                db.execute("INSERT OR REPLACE INTO leftovers(name, data, since) VALUES(?, ?, ?)",
                           (f"endpoint:{row['host_veth']}", json.dumps(dict(row)), time.time()))
                db.execute("DELETE FROM endpoints WHERE endpoint_id=?", (row["endpoint_id"],))
            db.execute("DELETE FROM addresses WHERE pool_id=? AND address=?", (pool_id, address))
        return gone, kept

    def endpoints(self, network_id: str | None = None) -> list[Endpoint]:
        if network_id is None:
            rows = self.read("SELECT * FROM endpoints ORDER BY created")
        else:
            rows = self.read("SELECT * FROM endpoints WHERE network_id=? ORDER BY created", (network_id,))
        return [Endpoint(**dict(r)) for r in rows]

    def endpoint(self, endpoint_id: str) -> Endpoint | None:
        rows = self.read("SELECT * FROM endpoints WHERE endpoint_id=?", (endpoint_id,))
        return Endpoint(**dict(rows[0])) if rows else None

    def endpoint_where(self, **match: str) -> Endpoint | None:
        """The endpoint whose columns equal `match` (e.g. host_veth=..., or network_id=... address=...)."""
        where = " AND ".join(f"{column}=?" for column in match)
        rows = self.read(f"SELECT * FROM endpoints WHERE {where} LIMIT 1", tuple(match.values()))
        return Endpoint(**dict(rows[0])) if rows else None

    def add_endpoint(self, db: sqlite3.Connection, ep: Endpoint) -> None:
        row = asdict(ep)
        db.execute(f"INSERT INTO endpoints({', '.join(row)}) VALUES({', '.join('?' * len(row))})",
                   tuple(row.values()))

    def delete_endpoint(self, endpoint_id: str, leftover: bool = False) -> None:
        with self.tx() as db:
            if leftover:
                row = db.execute("SELECT * FROM endpoints WHERE endpoint_id=?", (endpoint_id,)).fetchone()
                if row is not None:
                    db.execute("INSERT OR REPLACE INTO leftovers(name, data, since) VALUES(?, ?, ?)",
                               (f"endpoint:{row['host_veth']}", json.dumps(dict(row)), time.time()))
            db.execute("DELETE FROM endpoints WHERE endpoint_id=?", (endpoint_id,))

    # -- published ports ----------------------------------------------------------------------------
    def ports(self, network_id: str | None = None, endpoint_id: str | None = None) -> list[Port]:
        """The published ports (of one network, or one endpoint), each with its endpoint's address."""
        where, args = [], []
        for column, value in (("e.network_id", network_id), ("p.endpoint_id", endpoint_id)):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        rows = self.read("SELECT p.*, " + _ADDRESS + " AS address FROM ports p JOIN endpoints e ON e.endpoint_id = "
                         f"p.endpoint_id {'WHERE ' + ' AND '.join(where) if where else ''} "
                         "ORDER BY p.family, p.proto, p.host_port, p.host_ip", tuple(args))
        return [Port(**dict(r)) for r in rows]

    def ports_version(self) -> str:
        return self.get_meta(PORTS_VERSION_KEY, "0")

    def set_ports(self, endpoint_id: str, ports: list[Port]) -> None:
        """The endpoint's published ports become `ports`, in one transaction that also checks them against
        every other endpoint's (raises `Conflict` naming the holder: nothing is changed then)."""
        with self.tx() as db:
            others = [Port(**dict(r)) for r in db.execute(
                "SELECT p.*, " + _ADDRESS + " AS address FROM ports p JOIN endpoints e ON e.endpoint_id = "
                "p.endpoint_id WHERE p.endpoint_id<>?", (endpoint_id,))]
            for port in ports:
                holder = next((o for o in others if o.clashes(port)), None)
                if holder is not None:
                    raise Conflict(f"host port {port.host}/{port.proto} is already "
                                   f"published by vpcnet for endpoint {holder.endpoint_id[:12]} ({holder.address}:"
                                   f"{holder.container_port})")
            db.execute("DELETE FROM ports WHERE endpoint_id=?", (endpoint_id,))
            for port in ports:
                db.execute("INSERT INTO ports(endpoint_id, family, proto, host_ip, host_port, container_port, asked) "
                           "VALUES(?, ?, ?, ?, ?, ?, ?)", (endpoint_id, port.family, port.proto, port.host_ip,
                                                           port.host_port, port.container_port, port.asked))

    def ipv6_endpoints(self) -> list[tuple[str, str]]:
        """(host veth, IPv6 address) of every endpoint with one: what the IPv6 datapath lets through."""
        return [(r["host_veth"], r["address_v6"]) for r in
                self.read("SELECT host_veth, address_v6 FROM endpoints WHERE address_v6 != '' ORDER BY host_veth")]

    def ipv6_internal(self) -> list[tuple[str, str]]:
        """(host IPv6 block, IPv6 cluster CIDR) of every --internal network with IPv6: kept inside it."""
        return [(r["host_cidr_v6"], r["cluster_cidr_v6"]) for r in
                self.read("SELECT host_cidr_v6, cluster_cidr_v6 FROM networks WHERE internal=1 AND host_cidr_v6 != '' "
                          "ORDER BY host_cidr_v6")]

    def ipv6_bridge_ports(self) -> dict[str, str]:
        """host veth -> bridge of every IPv6 endpoint of a bridge-mode network (its veth is a port of it)."""
        return {r["host_veth"]: r["bridge"] for r in self.read(
            "SELECT e.host_veth, n.bridge FROM endpoints e JOIN networks n ON n.network_id = e.network_id "
            "WHERE e.address_v6 != '' AND n.mode = 'bridge'")}

    def leftovers(self) -> list[tuple[str, dict]]:
        """(name, data) of deleted objects whose kernel state may still be there."""
        return [(r["name"], json.loads(r["data"])) for r in self.read("SELECT * FROM leftovers ORDER BY since")]

    def forget_leftover(self, name: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM leftovers WHERE name=?", (name,))

    # -- pools and addresses (the allocation logic itself lives in ipam) -----------------------------
    def pools(self) -> list[sqlite3.Row]:
        return self.read("SELECT * FROM pools ORDER BY pool_id")

    @staticmethod
    def has_pool(db: sqlite3.Connection, pool_id: str) -> bool:
        """Inside a transaction: whether the pool is (still) there."""
        return db.execute("SELECT 1 FROM pools WHERE pool_id=?", (pool_id,)).fetchone() is not None

    def release_pool(self, pool_id: str) -> bool:
        """Forget a pool and its addresses unless a network uses it (False then). The check and the delete
        are one transaction: a CreateNetwork cannot take the pool in between."""
        with self.tx() as db:
            if db.execute("SELECT 1 FROM networks WHERE host_cidr=? OR host_cidr_v6=?",
                          (pool_id, pool_id)).fetchone() is not None:
                return False
            db.execute("DELETE FROM addresses WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM pools WHERE pool_id=?", (pool_id,))
        return True

    def addresses_per_pool(self) -> dict[str, int]:
        """Pool (host CIDR) -> addresses handed out from it, pools without any included."""
        rows = self.read("SELECT p.pool_id AS pool, COUNT(a.address) AS used FROM pools p "
                         "LEFT JOIN addresses a ON a.pool_id = p.pool_id GROUP BY p.pool_id")
        return {row["pool"]: row["used"] for row in rows}

    def addresses(self, pool_id: str) -> list[str]:
        return [r["address"] for r in self.read("SELECT address FROM addresses WHERE pool_id=?", (pool_id,))]


def addressing_conflict(mine: str, others: list[Network]) -> str:
    """The refusal to serve in addressing `mine` while `others` (networks of the other one) exist."""
    ids = " ".join(n.network_id[:12] for n in others)
    return (f"VPCNET_ADDRESSING is {mine} but this host's state has {len(others)} network(s) of "
            f"{others[0].addressing} addressing ({ids}): a host never mixes the two; remove them first "
            f"(docker network rm {ids}), or set VPCNET_ADDRESSING back to {others[0].addressing} "
            "(docs/eni-prefix.md, Switching modes)")


def _in_use(db: sqlite3.Connection, family: str) -> set[str]:
    """The addresses of `family` the IPAM handed out or an endpoint holds (IPv6 ones contain a colon)."""
    rows = db.execute("SELECT address FROM addresses UNION SELECT address FROM endpoints "
                      "UNION SELECT address_v6 FROM endpoints").fetchall()
    v6 = family == "ipv6"
    return {r[0] for r in rows if r[0] and (":" in r[0]) == v6}


def _parsed(addresses: set[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Parsed once per transaction, not once per prefix they are counted against."""
    return [ipaddress.ip_address(a) for a in addresses]


def _count_in(prefix: str, addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> int:
    network = _prefix_network(prefix)
    return sum(1 for a in addresses if a in network)


@functools.lru_cache(maxsize=4096)
def _prefix_network(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(prefix)


@functools.lru_cache(maxsize=4096)
def _sort_key(prefix: str) -> tuple[int, int]:
    network = ipaddress.ip_network(prefix)
    return network.version, int(network.network_address)


def _storage_failure(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("disk is full", "disk i/o error", "readonly database",
                                         "unable to open database"))


class DamagedState(Exception):
    """The state file exists but is not a sound vpcnet store."""


def check_state(path: str) -> None:
    """Refuse a damaged state file rather than start on it (or, worse, start empty while containers
    exist): an existing file must be a sound sqlite database holding vpcnet's schema. A missing file is a
    new host. Read-only: nothing is written."""
    if not os.path.exists(path):
        return
    recovery = (f"restore {path} from a backup, or move it aside (mv {path} {path}.damaged) and re-create "
                "this host's vpcnet networks; see docs/datapath.md, 'A damaged state file'")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise DamagedState(f"state file {path} is damaged ({exc}): {recovery}") from None
    if verdict != "ok":
        raise DamagedState(f"state file {path} is damaged (integrity check: {verdict}): {recovery}")
    if not {"meta", "networks", "endpoints"} <= tables:
        raise DamagedState(f"state file {path} holds no vpcnet state (empty or truncated): {recovery}")


def _has_unique(db: sqlite3.Connection, table: str, columns: list[str]) -> bool:
    """Whether `table` still has a UNIQUE table constraint on exactly `columns` (an older schema's)."""
    for index in db.execute(f"PRAGMA index_list({table})").fetchall():
        if index["origin"] == "u" and \
                [r["name"] for r in db.execute(f"PRAGMA index_info('{index['name']}')")] == columns:
            return True
    return False


def _rebuild(db: sqlite3.Connection, table: str) -> None:
    """`table` as SCHEMA has it now, its rows kept (sqlite's way to drop a table constraint: a new table, the
    rows copied, the old one dropped, the new one renamed). Inside the migration's transaction."""
    create = next(s for s in SCHEMA.split(";") if f"CREATE TABLE IF NOT EXISTS {table} (" in s)
    db.execute(create.replace(f"CREATE TABLE IF NOT EXISTS {table} (", f"CREATE TABLE {table}_new ("))
    columns = ", ".join(r["name"] for r in db.execute(f"PRAGMA table_info({table})"))
    db.execute(f"INSERT INTO {table}_new({columns}) SELECT {columns} FROM {table}")
    db.execute(f"DROP TABLE {table}")
    db.execute(f"ALTER TABLE {table}_new RENAME TO {table}")


def _network(row: sqlite3.Row) -> Network:
    data = dict(row)
    data["no_nat"] = tuple(json.loads(data["no_nat"]))
    data["internal"] = bool(data["internal"])
    return Network(**data)


def _claim(row: sqlite3.Row) -> Claim:
    data = dict(row)
    data["static"] = bool(data["static"])
    data["route_ok"] = bool(data["route_ok"])
    return Claim(**data)
