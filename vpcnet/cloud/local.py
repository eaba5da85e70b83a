"""The embedded default provider: a route table kept as a JSON file in the state dir.

No network call, ever. On a single host it simply records the host's claim; several vpcnet instances
sharing one state dir (or one file through `VPCNET_STATE_DIR` on shared storage) see each other's
claims exactly as hosts do in a cloud route table, which is what the claim logic relies on.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import uuid
from contextlib import contextmanager

from vpcnet.cloud import DuplicateRoute, Provider, Route

TABLE_FILE = "local-routes.json"


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

    @contextmanager
    def _table(self, write: bool):
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        with open(self._path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            try:
                with open(self._path) as fh:
                    entries = json.load(fh)
            except FileNotFoundError:
                entries = []
            yield entries
            if write:
                tmp = f"{self._path}.{os.getpid()}.tmp"
                with open(tmp, "w") as fh:
                    json.dump(entries, fh, indent=1)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self._path)

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
