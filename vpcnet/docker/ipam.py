"""The IPAM driver: a pool is this host's block (host CIDR) inside a cluster CIDR.

- `RequestPool` with no `--subnet` gives this host's block in the default cluster CIDR; `--subnet` equal
  to a cluster CIDR (any range wider than a host block) gives this host's block inside it; `--subnet`
  equal to a block this host owns is Docker replaying an earlier answer. Anything else is refused.
- IPv6 (`V6`: `--ipv6`; alone with `--ipv4=false`, Docker 28+): the same rules, one family at a time, in
  the default IPv6 cluster CIDR (VPCNET_CLUSTER_CIDR_V6, default a ULA /48 derived from the cluster identity)
  with /80 host blocks (VPCNET_HOST_PREFIX_V6), claimed and routed as the IPv4 ones. A `--subnet` of the other
  family is refused; Docker 29's size-only `--subnet ::/N` gets this host's block of the default IPv6 cluster
  CIDR when N is at least the host prefix (the block is as large as asked, or larger), else a refusal naming
  the sizes. The gateway is the block's first address, as for IPv4; container addresses are answered as
  `/128`s: a container then has no on-link prefix and sends everything through its gateway, so the host
  needs no neighbour discovery proxying between containers. A block's addresses are too many to list, so
  the next-fit walk skips the addresses in use from the cursor (`_take_next_v6`), bounded by their number.
- The pool ID is the host CIDR itself, so every replay gets the identical answer; a PoolID not in that
  form (canonical, e.g. 10.200.3.0/24) is refused before it is looked up.
- Addresses are handed out next-fit: a cursor walks the pool, so a just-released address is not handed
  out again before the rest of the pool has been used (stale ARP caches in peers).
- Replays: Docker (with `RequiresRequestReplay`) re-requests, at daemon start, each network's pool
  (RequestPool as the network was created: the block this host answered, or the `--subnet` cluster CIDR
  the user gave), its gateway, and the address of every endpoint it kept (with
  live-restore, its running containers'), in one burst before it serves any new work; our state
  remembers those addresses as in use. A replay window lets each address in use be re-requested once,
  with its identical answer. Outside it, or a second time inside it, a request for an address in use is
  refused: that refusal is what keeps a `docker run --ip X` from getting an address a live container
  holds. The window is therefore kept as narrow as Docker's burst allows:
  - It runs on CLOCK_BOOTTIME, stored with the boot id (/proc/sys/kernel/random/boot_id): one clock for
    every worker process, which an NTP step or `date -s` cannot move, and which restarts at a reboot, so
    a deadline from an earlier boot counts as closed (the wall clock could open or close it wrongly).
  - `Plugin.Activate` opens it (REPLAY_WINDOW seconds) only when none is open. An Activate inside an
    open window (a second one from Docker, or any local process) neither extends it nor re-arms the
    addresses already replayed in it: a duplicate address is worse than a refused replay, which Docker
    only logs as a warning while our state keeps the address in use for that endpoint.
  - In-use addresses of a pool are replayable only after Docker asked for that pool (RequestPool, in
    either form) in the window: Docker does so before its endpoints' addresses, while an Activate that is
    no daemon restart (`docker plugin enable`, a restart of vpcnet itself) replays nothing.
  - It closes early at the first call of new work: RequestAddress for any address, or CreateEndpoint.
    Docker makes those only after its replays, so a daemon restarted again soon after gets a fresh
    window, and a restart followed by container activity does not stay open for the full window.
- eni-prefix addressing (VPCNET_ADDRESSING=eni-prefix, docs/eni-prefix.md): the pool is the range, the
  cluster CIDR every host shares (`--subnet` may only name it), its PoolID the range itself, its gateway the
  range's first address (never handed out by any host). An address comes from one of this host's prefixes
  (vpcnet.routes.prefixes.PrefixPool.take_address, given as `prefixes`), the IPAM's row written in the same
  transaction, and is answered with the range's prefix length; a `--ip` must be inside a prefix this host
  holds. IPv6 (`--ipv6`) the same way: the pool is the IPv6 range (VPCNET_CLUSTER_CIDR_V6, the vSwitch's
  or subnet's IPv6 CIDR), addresses come from this host's /80 prefix and are answered as `/128`s, as in
  route-table addressing (the container's gateway is its host veth's link-local one, which Join answers).
  Bridge mode is the driver's to refuse; a network of the other addressing in the state refuses every
  RequestPool (a host never mixes the two).
- `ReleaseAddress` of an address an endpoint row still holds: Docker releases an address only once it has
  no endpoint on it (after DeleteEndpoint, or after a CreateEndpoint that failed for it: the plugin died
  after the kernel work, before Docker got the answer). The row goes in the same transaction, its veth
  right after (`remove_leftovers`, wired to the driver's), so the address can be handed out again. Only
  while the endpoint's container end is still on the host (`peer_on_host`): one handed to a container
  (Join) is in use whatever the IPAM was told (a `--ip` honoured as a replay), and is kept.
"""
from __future__ import annotations

import bisect
import functools
import ipaddress
import json
import logging
import time
from typing import Callable

from vpcnet.datapath.ipv6 import unavailable as ipv6_unavailable
from vpcnet.errors import Conflict, Exhausted, InvalidRequest, NotFound, shown
from vpcnet.state.store import addressing_conflict

log = logging.getLogger(__name__)

GATEWAY_KEY = "com.docker.network.gateway"
REQUEST_TYPE_KEY = "RequestAddressType"
REPLAY_WINDOW = 300.0   # seconds after Plugin.Activate in which replays of in-use addresses are honoured
REPLAY_KEYS = ("replay_epoch", "replay_until", "replay_boot", "replay_pools")   # the window, in `meta`
RACE_SLACK = 64        # IPv6 next-fit: extra offsets tried for addresses other workers take meanwhile
LOCAL_SPACE = "vpcnet-local"

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
GLOBAL_SPACE = "vpcnet-global"


ENI_PREFIX = "eni-prefix"     # VPCNET_ADDRESSING's value for addresses from this host's ENI prefixes


class Ipam:
    def __init__(self, config, store, routes, clock=None, host_routes=None, prefixes=None):
        self.config = config
        self.store = store
        self.routes = routes
        # eni-prefix addressing: the host's PrefixPool (vpcnet.routes.prefixes), where addresses come from
        self.prefixes = prefixes
        self.clock = clock or boot_clock     # () -> (boot id, seconds since boot)
        # host_routes(cidr) -> descriptions of kernel routes overlapping cidr (the dataplane's view)
        self.host_routes = host_routes
        # remove_leftovers(name) -> removes the kernel state of a forgotten endpoint (the driver's)
        self.remove_leftovers: Callable[[str], object] | None = None
        # peer_on_host(peer veth) -> whether an endpoint's container end is still on the host (not joined)
        self.peer_on_host: Callable[[str], bool] | None = None
        # drop_ipv6(host veth, address) -> removes the IPv6 datapath of an endpoint that lost its address
        self.drop_ipv6: Callable[[str, str], object] | None = None

    # -- capabilities -----------------------------------------------------------------------------
    @staticmethod
    def capabilities() -> dict:
        return {"RequiresMACAddress": False, "RequiresRequestReplay": True}

    @staticmethod
    def default_address_spaces() -> dict:
        return {"LocalDefaultAddressSpace": LOCAL_SPACE, "GlobalDefaultAddressSpace": GLOBAL_SPACE}

    def open_replay_window(self) -> bool:
        """`Plugin.Activate`: open a replay window unless one is open (see the module docstring)."""
        boot, now = self.clock()
        with self.store.tx() as db:
            window = self._window(boot, now)
            if window is not None:
                log.debug("Plugin.Activate while replay window %d is open: kept as it is (not extended, "
                          "not re-armed)", window[0])
                return False
            epoch = int(self.store.get_meta("replay_epoch", "0")) + 1
            for key, value in zip(REPLAY_KEYS, (str(epoch), repr(now + REPLAY_WINDOW), boot, "[]"), strict=True):
                self.store.set_meta(db, key, value)
        log.info("replay window %d open for %.0f s", epoch, REPLAY_WINDOW)
        return True

    def end_replays(self, why: str) -> None:
        """Close an open replay window early: Docker has moved on to new work (`why`)."""
        def close(db, window: tuple[int, list[str]]) -> None:
            self.store.set_meta(db, "replay_until", "0")
            log.info("replay window %d closed: %s", window[0], why)
        self._change_open_window(close)

    def _change_open_window(self, change) -> None:
        """`change(db, window)` in a transaction, if a replay window is open: looked at once without the
        write lock (every RequestAddress asks; mostly none is open), then again inside it."""
        boot, now = self.clock()
        if self._window(boot, now) is None:
            return
        with self.store.tx() as db:
            window = self._window(boot, now)
            if window is not None:
                change(db, window)

    def _window(self, boot: str, now: float) -> tuple[int, list[str]] | None:
        """(epoch, pools replayed in it) of the open replay window, or None when none is open."""
        marks = self.store.read(f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(REPLAY_KEYS))})",
                                REPLAY_KEYS)
        meta = {row["key"]: row["value"] for row in marks}
        if meta.get("replay_boot") != boot or now > float(meta.get("replay_until", "0")):
            return None     # never opened, closed, timed out, or opened before a reboot
        return int(meta["replay_epoch"]), json.loads(meta.get("replay_pools", "[]"))

    def _replay_window(self) -> tuple[int, list[str]]:
        """(epoch, pools replayed in it) of the open replay window, or (0, []) when none is open."""
        return self._window(*self.clock()) or (0, [])

    def _pool_replayed(self, pool_id: str) -> None:
        """Docker replayed RequestPool for `pool_id`: inside an open window, its addresses become replayable."""
        def add(db, window: tuple[int, list[str]]) -> None:
            if pool_id not in window[1]:
                self.store.set_meta(db, "replay_pools", json.dumps(sorted([*window[1], pool_id])))
        self._change_open_window(add)

    # -- pools ------------------------------------------------------------------------------------
    def request_pool(self, pool: str = "", sub_pool: str = "", options: dict | None = None,
                     v6: bool = False, address_space: str = "") -> dict:
        if sub_pool:
            raise InvalidRequest(f"--ip-range {shown(sub_pool)} is not supported: a vpcnet network uses the "
                                 "host's whole block")
        if options:
            names = ", ".join(shown(k) for k in sorted(options)[:5])
            raise InvalidRequest(f"unknown --ipam-opt {names}: vpcnet's IPAM takes no options")
        if address_space and address_space not in (LOCAL_SPACE, GLOBAL_SPACE):
            raise InvalidRequest(f"unknown address space {shown(address_space)}")
        self._refuse_other_addressing()
        if self.eni_prefix:
            return self._request_range(pool, v6)
        if v6 and (why := ipv6_unavailable()):       # before a block is claimed (Docker before 28)
            raise InvalidRequest(f"IPv6 (--ipv6) cannot be served by this vpcnet: {why}")
        cluster, host = self._resolve_pool(pool, 6 if v6 else 4)
        self._pool_replayed(str(host))            # inside a window: Docker's replay, in either form
        gateway = _gateway(host)
        # the next-fit cursor: an address for IPv4; an offset in the pool for IPv6 (an IPv6 address does not
        # fit sqlite's 64-bit INTEGER; an offset in a /16..120 block does)
        cursor = int(gateway) + 1 if host.version == 4 else 2
        with self.store.tx() as db:
            db.execute("INSERT OR IGNORE INTO pools(pool_id, cluster_cidr, gateway, cursor) VALUES(?,?,?,?)",
                       (str(host), str(cluster), str(gateway), cursor))
        log.info("pool %s (cluster %s, gateway %s)", host, cluster, gateway)
        return {"PoolID": str(host), "Pool": str(host),
                "Data": {GATEWAY_KEY: f"{gateway}/{host.prefixlen}"}}

    @property
    def eni_prefix(self) -> bool:
        return self.config.addressing == ENI_PREFIX

    def _refuse_other_addressing(self) -> None:
        """A host never mixes the two addressings: networks of the other one in the state refuse a new pool
        (`vpcnet serve` refuses to start so; this is the same rule, should the state change under it)."""
        mine = self.config.addressing
        others = [n for n in self.store.networks() if n.addressing != mine]
        if others:
            raise Conflict(addressing_conflict(mine, others))

    def _request_range(self, pool: str, v6: bool) -> dict:
        """eni-prefix addressing: the pool is the range (the cluster CIDR, VPCNET_CLUSTER_CIDR_V6 for IPv6)
        every host shares; the gateway its first address. Docker 29's size-only IPv6 `--subnet ::/N` gets the
        range when it is as large as asked, or larger."""
        version, setting = (6, "VPCNET_CLUSTER_CIDR_V6") if v6 else (4, "VPCNET_CLUSTER_CIDR")
        if v6 and (why := ipv6_unavailable()):
            raise InvalidRequest(f"IPv6 (--ipv6) cannot be served by this vpcnet: {why}")
        cluster = ipaddress.ip_network(self.config.default_cluster_cidr_v6 if v6 else self.config.cluster_cidr)
        requested = _requested_pool(pool, version) if pool else None
        if requested is not None and v6 and requested.network_address == ipaddress.IPv6Address(0):
            if requested.prefixlen < cluster.prefixlen:
                raise InvalidRequest(f"--subnet {pool} asks for a /{requested.prefixlen} pool: in eni-prefix "
                                     f"addressing a network's IPv6 pool is the range {cluster} ({setting}); use "
                                     f"--subnet {cluster}, or no IPv6 --subnet")
            requested = cluster                   # a size only: the range is as large as asked, or larger
        if requested is not None and requested != cluster:
            raise InvalidRequest(f"--subnet {pool}: in eni-prefix addressing a network's pool is the range this "
                                 f"host's prefixes come from, {setting} {cluster}; use --subnet "
                                 f"{cluster} or omit --subnet")
        if not pool:          # replays always name their pool: this is a new network
            holder = self.store.network_by_host_cidr(str(cluster))
            if holder is not None:
                raise Conflict(f"the range {cluster} is already used by network {holder.network_id[:12]}: one "
                               "vpcnet network per range per host in eni-prefix addressing")
        self._pool_replayed(str(cluster))
        gateway = _gateway(cluster)
        with self.store.tx() as db:
            db.execute("INSERT OR IGNORE INTO pools(pool_id, cluster_cidr, gateway, cursor) VALUES(?,?,?,?)",
                       (str(cluster), str(cluster), str(gateway), 0))
        log.info("pool %s (eni-prefix range, gateway %s)", cluster, gateway)
        return {"PoolID": str(cluster), "Pool": str(cluster),
                "Data": {GATEWAY_KEY: f"{gateway}/{cluster.prefixlen}"}}

    def _resolve_pool(self, pool: str, version: int) -> tuple[Net, Net]:
        """(cluster CIDR, host CIDR) for a RequestPool's `Pool`, of the family Docker asked for (`V6`)."""
        default, setting = ((self.config.cluster_cidr, "VPCNET_CLUSTER_CIDR") if version == 4 else
                            (self.config.default_cluster_cidr_v6, "VPCNET_CLUSTER_CIDR_V6"))
        prefix = self.config.host_prefix if version == 4 else self.config.host_prefix_v6
        requested = _requested_pool(pool, version) if pool else None
        if requested is not None and version == 6 and requested.network_address == ipaddress.IPv6Address(0):
            # Docker 29's size-only form (`--subnet ::/96`): "a pool of this size, you choose"
            if requested.prefixlen < prefix:
                raise InvalidRequest(f"--subnet {pool} asks for a /{requested.prefixlen} pool: vpcnet gives each "
                                     f"host one /{prefix} block (VPCNET_HOST_PREFIX_V6); use --subnet ::/{prefix} "
                                     "or longer, an IPv6 cluster CIDR, or no IPv6 --subnet")
            log.info("--subnet %s (a size only): this host's /%d block of the default IPv6 cluster CIDR %s",
                     pool, prefix, default)
            requested = None
        if requested is None:
            cluster = ipaddress.ip_network(default)
            self._refuse_overlap(cluster, f"the default {'IPv6 ' if version == 6 else ''}cluster CIDR {cluster} "
                                          f"({setting})")
            host = ipaddress.ip_network(self.routes.host_cidr(str(cluster)))
            self._refuse_auto_pool_in_use(host, cluster)
            return cluster, host
        for claim in self.store.claims():                 # a replay of an earlier answer
            if claim.host_cidr == str(requested):
                return ipaddress.ip_network(claim.cluster_cidr), requested
        if requested.prefixlen >= prefix:
            raise InvalidRequest(
                f"--subnet {pool} is neither a cluster CIDR (a range wider than the /{prefix} "
                f"host blocks, e.g. the default {default}) nor a block this host owns; "
                f"omit --subnet to use the default {'IPv6 ' if version == 6 else ''}cluster CIDR")
        self._refuse_overlap(requested, f"--subnet {pool}")
        return requested, ipaddress.ip_network(self.routes.host_cidr(str(requested)))

    def _refuse_overlap(self, cluster: Net, what: str) -> None:
        """Cluster CIDRs in use on this host are equal or disjoint, whichever path asked for them (a
        default request must not slip inside a wider --subnet cluster CIDR claimed earlier)."""
        for claim in self.store.claims():
            other = ipaddress.ip_network(claim.cluster_cidr)
            if other.version == cluster.version and other != cluster and other.overlaps(cluster):
                raise Conflict(f"{what} overlaps the cluster CIDR {other} already in use on this "
                               "host: use it exactly, or a range that does not overlap it")

    def _refuse_auto_pool_in_use(self, host: Net, cluster: Net) -> None:
        """Without --subnet, Docker checks the pool against the host's routes and, on an overlap, asks
        again — forever, since this host has one block per cluster CIDR. Refuse clearly instead.
        (Replays always name their pool, so they never come this way.)"""
        holder = self.store.network_by_host_cidr(str(host))
        if holder is not None:
            raise Conflict(f"this host's block {host} of the default cluster CIDR {cluster} is already used by "
                           f"network {holder.network_id[:12]}: one vpcnet network per cluster CIDR per host; "
                           "create this one with --subnet <another cluster CIDR>")
        overlapping = self.host_routes(str(host)) if self.host_routes else []
        if overlapping:
            raise Conflict(f"this host's block {host} overlaps route(s) on this host: {'; '.join(overlapping)}; "
                           f"remove them or choose another VPCNET_CLUSTER_CIDR{'_V6' if host.version == 6 else ''}")

    def release_pool(self, pool_id: str) -> dict:
        _require_pool_id(pool_id)
        if not self.store.release_pool(pool_id):
            # Another network of ours still uses it (e.g. a refused duplicate create releasing its
            # request): keep it.
            log.info("pool %s still used by a network: kept", pool_id)
        return {}

    # -- addresses --------------------------------------------------------------------------------
    def request_address(self, pool_id: str, address: str = "", options: dict | None = None) -> dict:
        options = options or {}
        _require_pool_id(pool_id)
        pool = self._pool(pool_id)
        host = ipaddress.ip_network(pool_id)
        gateway = ipaddress.ip_address(pool["gateway"])
        if options.get(REQUEST_TYPE_KEY) == GATEWAY_KEY:
            if address and _parsed(address, host.version) != gateway:
                raise InvalidRequest(f"gateway {shown(address)} is not the gateway of pool {pool_id}: vpcnet's "
                                     f"gateway is {gateway}; omit --gateway")
            return {"Address": f"{gateway}/{host.prefixlen}", "Data": {}}
        if self.eni_prefix:
            return {"Address": f"{self._take_from_prefixes(pool_id, host, gateway, address)}/{_address_prefix(host)}",
                    "Data": {}}
        if address:
            ip = self._check_requested(address, host, gateway)
            self._take_requested(pool_id, ip)
        else:
            self.end_replays(f"a new address was asked of pool {pool_id}")
            ip = (self._take_next(pool_id, host, gateway) if host.version == 4
                  else self._take_next_v6(pool_id, host))
        return {"Address": f"{ip}/{_address_prefix(host)}", "Data": {}}

    def _pool(self, pool_id: str):
        rows = self.store.read("SELECT * FROM pools WHERE pool_id=?", (pool_id,))
        if not rows:
            raise NotFound(f"unknown pool {pool_id}: no such vpcnet pool on this host")
        return rows[0]

    @staticmethod
    def _check_requested(address: str, host: Net, gateway) -> Address:
        ip = _parsed(address, host.version)
        if ip not in host:
            raise InvalidRequest(f"address {ip} is outside pool {host}")
        if host.version == 6 and ip == host.network_address:
            raise InvalidRequest(f"address {ip} is the subnet-router anycast address of pool {host}")
        if host.version == 4 and ip in (host.network_address, host.broadcast_address):
            raise InvalidRequest(f"address {ip} is the {'network' if ip == host.network_address else 'broadcast'}"
                                 f" address of pool {host}")
        if ip == gateway:
            raise InvalidRequest(f"address {ip} is the gateway of pool {host}")
        return ip

    def _take_from_prefixes(self, pool_id: str, host: Net, gateway, address: str) -> Address:
        """eni-prefix addressing: `address` (a --ip, or a replay) if a prefix this host holds has it, else
        the next free one of its prefixes (PrefixPool.take_address), the row written in its transaction."""
        if self.prefixes is None:
            raise InvalidRequest("eni-prefix addressing without this host's prefix pool: restart vpcnet")
        if address:
            ip = self._check_requested(address, host, gateway)

            def held(db) -> None:
                if self.store.mark_prefix_taken(db, str(ip), time.time()) is None:
                    held = ", ".join(p.prefix for p in self.store.held_prefixes(f"ipv{ip.version}")) or "none yet"
                    raise InvalidRequest(f"address {ip} is in none of this host's prefixes ({held}): in eni-prefix "
                                         "addressing a --ip must be inside one of them; omit --ip")
            self._take_requested(pool_id, ip, held)
            return ip
        self.end_replays(f"a new address was asked of pool {pool_id}")
        epoch = self._replay_window()[0]      # stamped as in `_take_next`, for the same reason

        def record(db, taken: str) -> None:
            _require_pool(self.store, db, pool_id)
            db.execute("INSERT INTO addresses(pool_id, address, replay_epoch) VALUES(?,?,?)", (pool_id, taken, epoch))
        return ipaddress.ip_address(self.prefixes.take_address(host.version, record=record).address)

    def _take_requested(self, pool_id: str, ip: Address, check: Callable | None = None) -> None:
        """`ip` recorded in the pool, or honoured as a replay; `check(db)` first, in the same transaction."""
        epoch, replayed_pools = self._replay_window()
        with self.store.tx() as db:
            _require_pool(self.store, db, pool_id)
            if check is not None:
                check(db)
            row = db.execute("SELECT replay_epoch FROM addresses WHERE pool_id=? AND address=?",
                             (pool_id, str(ip))).fetchone()
            if row is None:
                db.execute("INSERT INTO addresses(pool_id, address, replay_epoch) VALUES(?,?,?)",
                           (pool_id, str(ip), epoch))
                return
            if epoch and row["replay_epoch"] < epoch and pool_id in replayed_pools:
                db.execute("UPDATE addresses SET replay_epoch=? WHERE pool_id=? AND address=?",
                           (epoch, pool_id, str(ip)))
                log.info("replayed address %s in pool %s", ip, pool_id)
                return
        raise Conflict(f"address {ip} is already in use in pool {pool_id}")

    def _take_next(self, pool_id: str, host: ipaddress.IPv4Network, gateway) -> ipaddress.IPv4Address:
        first, last = int(host.network_address) + 1, int(host.broadcast_address) - 1
        usable = last - first       # minus the gateway
        # Stamped with the open replay epoch (as `_take_requested` does): an address handed out inside a
        # replay window was not in use when the window opened, so it is not replayable in it; stamping 0
        # would let a later `--ip` for it pass as a "replay" and hand out a duplicate.
        epoch = self._replay_window()[0]
        # The pool's free addresses come from a read outside the write lock (WAL readers never wait for
        # a writer): inside it, one indexed read of the cursor, then an insert that the primary key
        # refuses if someone took that address since the read (try the next free one). An address
        # released since the read counts as used, which next-fit wants anyway.
        used = {int(ipaddress.IPv4Address(a)) for a in self.store.addresses(pool_id)} | {int(gateway)}
        free = [a for a in range(first, last + 1) if a not in used]
        if not free:
            raise Exhausted(f"pool {pool_id} is exhausted: all {usable} container addresses are in use")
        with self.store.tx() as db:
            row = db.execute("SELECT cursor FROM pools WHERE pool_id=?", (pool_id,)).fetchone()
            if row is None:
                raise _released(pool_id)
            cursor = row["cursor"]
            start = bisect.bisect_left(free, cursor) if first <= cursor <= last else 0
            for step in range(len(free)):
                candidate = free[(start + step) % len(free)]
                if db.execute("INSERT OR IGNORE INTO addresses(pool_id, address, replay_epoch) VALUES(?,?,?)",
                              (pool_id, str(ipaddress.IPv4Address(candidate)), epoch)).rowcount:
                    db.execute("UPDATE pools SET cursor=? WHERE pool_id=?", (candidate + 1, pool_id))
                    return ipaddress.IPv4Address(candidate)
        raise Exhausted(f"pool {pool_id} is exhausted: all {usable} container addresses are in use")

    def _take_next_v6(self, pool_id: str, host: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
        """Next-fit in an IPv6 block, which is far too large to list its free addresses (a /80 holds 2**48):
        from the cursor (an offset in the block), the first offset not in use. Offsets 0 (the subnet-router
        anycast address) and 1 (the gateway) are never handed out. Among len(in use) + 1 consecutive
        offsets one is free, so the walk is bounded by the addresses in use (plus RACE_SLACK for addresses
        other workers take meanwhile), not by the block's size."""
        base, size = int(host.network_address), host.num_addresses
        usable = size - 2
        epoch = self._replay_window()[0]      # stamped as in `_take_next`, for the same reason
        used = {int(ipaddress.IPv6Address(a)) - base for a in self.store.addresses(pool_id)}
        if len(used) >= usable:
            raise Exhausted(f"pool {pool_id} is exhausted: all {usable} container addresses are in use")
        with self.store.tx() as db:
            row = db.execute("SELECT cursor FROM pools WHERE pool_id=?", (pool_id,)).fetchone()
            if row is None:
                raise _released(pool_id)
            start = row["cursor"] - 2 if 2 <= row["cursor"] < size else 0
            for step in range(min(usable, len(used) + 1 + RACE_SLACK)):
                offset = 2 + (start + step) % usable
                if offset in used:
                    continue
                candidate = ipaddress.IPv6Address(base + offset)
                if db.execute("INSERT OR IGNORE INTO addresses(pool_id, address, replay_epoch) VALUES(?,?,?)",
                              (pool_id, str(candidate), epoch)).rowcount:
                    db.execute("UPDATE pools SET cursor=? WHERE pool_id=?", (offset + 1, pool_id))
                    return candidate
        raise Exhausted(f"pool {pool_id}: no free address found after {len(used) + 1 + RACE_SLACK} tries "
                        f"({len(used)} in use of {usable})")

    def release_address(self, pool_id: str, address: str) -> dict:
        _require_pool_id(pool_id)
        ip = _parsed(address, ipaddress.ip_network(pool_id).version)
        peer_on_host = self.peer_on_host
        gone, kept = self.store.release_address(
            pool_id, str(ip), forget=lambda ep: peer_on_host is None or peer_on_host(ep.peer_veth))
        for ep in kept:
            if ep.address_v6 == str(ip) and ep.address != str(ip):
                # Docker releases a running container's IPv6 address when the container turns IPv6 off:
                # the endpoint keeps its IPv4 only (the store forgot this one), and so does the datapath
                log.info("ReleaseAddress %s: endpoint %s keeps running without IPv6: its IPv6 route and rules go",
                         ip, ep.endpoint_id[:12])
                if self.drop_ipv6 is not None:
                    self.drop_ipv6(ep.host_veth, str(ip))
                continue
            log.warning("ReleaseAddress %s: endpoint %s still holds it and its interface is in a container: kept",
                        ip, ep.endpoint_id[:12])
        for ep in gone:
            log.warning("ReleaseAddress %s: endpoint %s still held it, which Docker no longer has (its "
                        "CreateEndpoint's answer never reached Docker, or its DeleteEndpoint failed): forgotten, "
                        "veth %s removed", ip, ep.endpoint_id[:12], ep.host_veth)
            if self.remove_leftovers is not None:
                self.remove_leftovers(f"endpoint:{ep.host_veth}")
        return {}


@functools.cache
def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as fh:
        return fh.read().strip()


def boot_clock() -> tuple[str, float]:
    """(this boot's id, seconds since boot): the same for every process of this boot, monotonic (counting
    suspend), and not settable; the boot id tells a deadline from an earlier boot."""
    return _boot_id(), time.clock_gettime(time.CLOCK_BOOTTIME)


def _require_pool(store, db, pool_id: str) -> None:
    """Inside the transaction that takes an address: the pool read before it may have been released since."""
    if not store.has_pool(db, pool_id):
        raise _released(pool_id)


def _released(pool_id: str) -> NotFound:
    return NotFound(f"pool {pool_id} was released meanwhile (ReleasePool): no such vpcnet pool on this host")


def _gateway(host: Net) -> Address:
    return host.network_address + 1


def _address_prefix(host: Net) -> int:
    """The prefix length an address is answered with: the block's for IPv4; /128 for IPv6, so the
    container has no on-link prefix and reaches every other address, its neighbours' too, through its
    gateway (no neighbour discovery between containers, none proxied by the host; Calico answers so)."""
    return host.prefixlen if host.version == 4 else 128


def _requested_pool(pool: str, version: int) -> Net:
    """A RequestPool's `Pool` as a network of the family Docker asked for, or a clear refusal."""
    try:
        requested = ipaddress.ip_network(pool, strict=True)
    except ValueError as exc:
        why = f" ({exc})" if shown(pool) == pool else ""     # the error repeats the value
        raise InvalidRequest(f"--subnet {shown(pool)}: not a valid network{why}") from None
    if requested.version != version:
        raise InvalidRequest(f"--subnet {pool} is an IPv{requested.version} network, asked for an IPv{version} "
                             "pool: give IPv6 subnets with --ipv6, IPv4 ones without")
    return requested


def _parsed(address: str, version: int = 4) -> Address:
    """An `Address` Docker sent (bare, or with the prefix length vpcnet answered) of the pool's family, or a
    clear refusal."""
    try:
        ip = ipaddress.ip_address(address.split("/")[0].strip())
    except ValueError:
        ip = None
    if ip is None or ip.version != version:
        raise InvalidRequest(f"address {shown(address)} is not a valid IPv{version} address") from None
    return ip


def _require_pool_id(pool_id) -> None:
    """Docker only ever sends back the PoolID RequestPool answered: a host CIDR in canonical form."""
    try:
        canonical = str(ipaddress.ip_network(pool_id)) == pool_id
    except (ValueError, TypeError):
        canonical = False
    if not canonical:
        raise InvalidRequest(f"PoolID {shown(pool_id)} is not a vpcnet pool id (a host CIDR such as "
                             "10.200.3.0/24 or fd12:3456:789a::/80, as RequestPool answered)")
