"""The embedded default provider: a route table, and an interface's prefixes, kept as JSON files in the
state dir.

No network call, ever. On a single host it simply records the host's claim; several vpcnet instances
sharing one state dir (or one file through `VPCNET_STATE_DIR` on shared storage) see each other's
claims exactly as hosts do in a cloud route table, which is what the claim logic relies on.

`LocalPrefixes` is the same for eni-prefix addressing: every instance sharing the file has one embedded
"interface", and /28s (and /80s) are carved from the cluster CIDR as a cloud carves them from a subnet:
no two interfaces ever hold the same one. It behaves as Alibaba's ECS does where the pool above relies on
it: a call assigns all it asks or nothing, a client token repeated with the same parameters gets the first
answer (with other parameters: refused), and the interface's capacity is a fixed number of prefixes.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import socket
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from vpcnet.cloud import DuplicateRoute, Provider, Route
from vpcnet.cloud.prefixes import (
    IPV4_PREFIX_LEN,
    IPV6_PREFIX_LEN,
    MAX_PER_CALL,
    InterfaceFull,
    InterfacePrefixes,
    NoFreePrefix,
    PrefixCapacity,
    PrefixProvider,
)
from vpcnet.errors import Fatal, InvalidRequest

TABLE_FILE = "local-routes.json"
PREFIXES_FILE = "local-prefixes.json"
LOCAL_CAPACITY_V4 = 15      # IPv4 prefixes per embedded interface (a cloud's is its instance type's)
LOCAL_CAPACITY_V6 = 1       # IPv6 prefixes: one /80, as both clouds give a dual-stack host
TOKENS_KEPT = 1000          # client tokens remembered (the oldest forgotten first): retries come soon


@contextmanager
def _locked_json(path: str, write: bool, empty: Any) -> Iterator[Any]:
    """The JSON document at `path` (`empty` when there is none), under a lock beside it (shared to read,
    exclusive to write) across threads and processes; written back whole (atomically) with `write`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        try:
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            data = empty
        yield data
        if write:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump(data, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)


class LocalProvider(Provider):
    name = "local"
    instant = True

    def __init__(self, config):
        self._path = os.path.join(config.state_dir, TABLE_FILE)
        self._instance = config.instance_id or socket.gethostname()

    def instance_id(self) -> str:
        return self._instance

    def table_id(self) -> str:
        return self._path

    def _table(self, write: bool):
        return _locked_json(self._path, write, [])

    def list_routes(self, table: str = "") -> list[Route]:
        with self._table(write=False) as entries:
            return [Route(**{**e, "table": self._path}) for e in entries]

    def create_route(self, destination: str, name: str, description: str, client_token: str,
                     table: str = "") -> None:
        with self._table(write=True) as entries:
            if any(e["destination"] == destination for e in entries):
                raise DuplicateRoute(f"local route table already has an entry for {destination}")
            entries.append(dict(destination=destination, next_hop=self._instance, name=name,
                                description=description, route_id="lrt-" + uuid.uuid4().hex[:12]))

    def delete_route(self, route: Route) -> None:
        with self._table(write=True) as entries:
            entries[:] = [e for e in entries
                          if not (e["destination"] == route.destination and e["next_hop"] == route.next_hop)]


class LocalPrefixes(PrefixProvider):
    """The prefixes of this instance's embedded interface, in `<state_dir>/local-prefixes.json`:
    `{"interfaces": {interface id: {"ipv4": [...], "ipv6": [...]}}, "tokens": [[token, request, answer]]}`."""

    name = "local"
    idempotent_assign = True

    def __init__(self, config):
        self._path = os.path.join(config.state_dir, PREFIXES_FILE)
        self._interface = "lni-" + (config.instance_id or socket.gethostname())
        self._ranges = {4: ipaddress.ip_network(config.cluster_cidr),
                        6: ipaddress.ip_network(config.default_cluster_cidr_v6)}

    def _file(self, write: bool):
        return _locked_json(self._path, write, {"interfaces": {}, "tokens": []})

    def interface_id(self) -> str:
        return self._interface

    def describe(self) -> InterfacePrefixes:
        with self._file(write=False) as data:
            held = data["interfaces"].get(self._interface, {})
            return InterfacePrefixes(self._interface, ipv4=tuple(held.get("ipv4", ())),
                                     ipv6=tuple(held.get("ipv6", ())))

    def assign(self, version: int, count: int, client_token: str) -> list[str]:
        key = _family(version)
        if not 1 <= count <= MAX_PER_CALL:
            raise InvalidRequest(f"assign {count} prefixes: one call assigns 1..{MAX_PER_CALL}")
        request = [self._interface, version, count]
        with self._file(write=True) as data:
            for token, asked, answer in data["tokens"]:
                if token == client_token:
                    if asked != request:     # Alibaba's IdempotentFailed
                        raise Fatal(f"client token {client_token} was used for another assign ({asked}, now "
                                    f"{request}): a retry must repeat its call exactly, a new call needs a new token")
                    return list(answer)
            held = data["interfaces"].setdefault(self._interface, {"ipv4": [], "ipv6": []})
            mine = held.setdefault(key, [])
            capacity = LOCAL_CAPACITY_V4 if version == 4 else LOCAL_CAPACITY_V6
            if len(mine) + count > capacity:
                raise InterfaceFull(f"interface {self._interface} holds {len(mine)} IPv{version} prefixes of "
                                    f"{capacity} (the local provider's fixed capacity): {count} more do not fit; "
                                    "release containers' addresses, or run fewer containers on this host")
            taken = {p for other in data["interfaces"].values() for p in other.get(key, ())}
            new = _carve(self._ranges[version], version, taken, count)
            if len(new) < count:
                raise NoFreePrefix(f"cluster CIDR {self._ranges[version]} has {len(new)} free "
                                   f"/{_prefix_len(version)} left, {count} asked ({len(taken)} held by the hosts "
                                   f"sharing {self._path}): widen VPCNET_CLUSTER_CIDR"
                                   f"{'_V6' if version == 6 else ''} for new networks, or release the prefixes "
                                   "of hosts that are gone")
            mine.extend(new)
            data["tokens"] = data["tokens"][-(TOKENS_KEPT - 1):] + [[client_token, request, new]]
            return new

    def unassign(self, version: int, prefixes: Sequence[str]) -> None:
        key, gone = _family(version), set(prefixes)
        with self._file(write=True) as data:
            held = data["interfaces"].get(self._interface)
            if held is not None:
                held[key] = [p for p in held.get(key, ()) if p not in gone]

    def capacity(self, held: InterfacePrefixes | None = None) -> PrefixCapacity:
        return PrefixCapacity("local", ipv4_prefixes=LOCAL_CAPACITY_V4, ipv6_prefixes=LOCAL_CAPACITY_V6)

    def reserved_ranges(self, version: int = 4) -> list[str] | None:
        """The range prefixes come from: the cluster CIDR (the embedded subnet has nothing else)."""
        return [str(self._ranges[version])]


def _family(version: int) -> str:
    if version not in (4, 6):
        raise InvalidRequest(f"IP version {version}: prefixes are IPv4 or IPv6")
    return f"ipv{version}"


def _prefix_len(version: int) -> int:
    return IPV4_PREFIX_LEN if version == 4 else IPV6_PREFIX_LEN


def _carve(network, version: int, taken: set[str], count: int) -> list[str]:
    """The `count` lowest prefix-sized blocks of `network` not in `taken` (fewer when it has no more).
    Bounded by the blocks held: at most len(taken) + count candidates are looked at."""
    length = _prefix_len(version)
    if network.prefixlen > length:
        return []
    size = 1 << (network.max_prefixlen - length)
    blocks = 1 << (length - network.prefixlen)
    out: list[str] = []
    for index in range(min(blocks, len(taken) + count)):
        block = str(ipaddress.ip_network((int(network.network_address) + index * size, length)))
        if block not in taken:
            out.append(block)
            if len(out) == count:
                break
    return out
