"""The journal of uncertain creates: route creates whose outcome or marking is not known yet (leaks).

Before each create `(table, destination, cluster)` is written to `<state_dir>/uncertain-routes.json`
and removed once the create is known to have landed marked (or not at all). A create whose answer was
lost, or whose marking failed after the route landed (AWS CreateRoute ok, CreateTags failing), stays
recorded across restarts; the next pass, before claiming anything, marks such a route
(`Provider.mark_route`) and so adopts it — it is then this host's block, or an earlier one that the pass
removes — instead of leaving an unmarked route that would look hand-made forever.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable

from vpcnet.cloud import Route, route_description, route_name
from vpcnet.errors import VpcnetError
from vpcnet.routes.claims import landed_unmarked

log = logging.getLogger(__name__)

UNCERTAIN_FILE = "uncertain-routes.json"   # creates whose outcome or marking is not known yet


class Journal:
    """The uncertain creates of one state dir, kept in a file so they survive a restart."""

    def __init__(self, state_dir: str, default_cluster: str):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, UNCERTAIN_FILE)
        self.default_cluster = default_cluster    # for records written before they named their cluster

    def records(self) -> list[dict]:
        try:
            with open(self.path) as fh:
                data = json.load(fh)
            return [d for d in data if isinstance(d, dict) and d.get("table") and d.get("destination")]
        except (OSError, ValueError):
            return []

    def _write(self, records: list[dict]) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        if not records:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(records, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def add(self, table: str, destination: str, cluster: str) -> None:
        records = [r for r in self.records() if (r["table"], r["destination"]) != (table, destination)]
        self._write(records + [{"table": table, "destination": destination, "cluster": cluster,
                                "since": time.time()}])

    def drop(self, table: str, destination: str) -> None:
        records = self.records()
        kept = [r for r in records if (r["table"], r["destination"]) != (table, destination)]
        if len(kept) != len(records):
            self._write(kept)

    def settle(self, listings: dict[str, list[Route]], me: str, cluster_name: Callable[[str], str],
               mark: Callable[[str, Route, str, str], bool]) -> list[str]:
        """Creates recorded as uncertain: a route to this instance that landed without vpcnet's marker is
        marked (adopted, and then kept or removed like any of this host's routes); anything else (never
        landed, marked after all, someone else's) is forgotten. `listings` is updated in place;
        `mark(table, route, name, description)` marks a route (retried), False when the provider cannot.
        Returns the problems (a marking that failed: tried again on the next pass)."""
        problems = []
        for record in self.records():
            table, destination = record["table"], record["destination"]
            entry = landed_unmarked(listings.get(table, []), destination, me)
            if entry is not None:
                cluster = record.get("cluster") or self.default_cluster
                name = route_name(destination)
                description = route_description(destination, me, cluster_name(cluster))
                try:
                    marked = mark(table, entry, name, description)
                except VpcnetError as exc:
                    problems.append(f"route {destination} -> {me} in {table} landed without vpcnet's marker and "
                                    f"cannot be marked yet ({exc}); trying again on the next pass")
                    continue
                if marked:
                    log.warning("route %s -> %s in %s had landed without vpcnet's marker: marked (adopted)",
                                destination, me, table)
                    listings[table] = [dataclasses.replace(r, name=name, description=description)
                                       if r is entry else r for r in listings[table]]
                else:
                    log.warning("route %s -> %s in %s is unmarked and this provider cannot mark it afterwards: "
                                "left alone", destination, me, table)
            self.drop(table, destination)
        return problems
