"""Names for the metrics' endpoints, from the Docker engine that calls the plugin: the network's name, the
container's, and the Compose or swarm service and application the container's labels give.

Docker's plugin calls carry only ids (a network id, an endpoint id, a sandbox key), so the names are read
from the engine's API (vpcnet.docker.engine_api), in a background thread of the process that serves
/metrics, and never on a plugin call's path:
- GET /networks/{id} gives the network's name and, by endpoint id, the containers attached on this engine;
- GET /containers/{id}/json gives a container's labels (read once per container: they never change).
  While Docker starts a container the network lists it as `ep-<endpoint id>`, no container id: such an
  endpoint (or one whose container the engine does not know) is asked about again on a later pass.

`NameCache.names()` answers from memory at once, and is empty for what is not known yet. A scrape
(`kick()`) wakes the thread, which also wakes by itself every `interval` seconds (then it reads the
store, and asks the engine only about endpoints still unnamed), so a new container is named within
seconds whether or not Prometheus is scraping. An endpoint the
engine does not list (yet, or ever: a plugin driven by hand) is retried with a growing delay (up to
`MAX_RETRY` seconds). When the engine does not answer within `timeout` (no socket, a dead one, a wedged
dockerd), the pass stops, `failures` counts it and the next one waits `interval`, doubling up to
`MAX_RETRY`: the labels stay empty until the engine answers. Entries go when their endpoint goes (`prune`),
so the cache is as large as the endpoints on this host.

The same names go on the JSON log line of each plugin call about a known endpoint (`known()`, read by
vpcnet.docker.transport from the cache of its own process).

Labels: `service` is com.docker.compose.service, else com.docker.swarm.service.name; `application` is
com.docker.compose.project, else com.docker.stack.namespace; empty where none applies.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import quote

from vpcnet.docker.engine_api import docker_status

log = logging.getLogger(__name__)

SERVICE_LABELS = ("com.docker.compose.service", "com.docker.swarm.service.name")
APPLICATION_LABELS = ("com.docker.compose.project", "com.docker.stack.namespace")
MAX_RETRY = 60.0


@dataclass(frozen=True)
class Names:
    network: str = ""
    container: str = ""
    service: str = ""
    application: str = ""


NONE = Names()
_ACTIVE: "NameCache | None" = None       # the cache this process's /metrics runs (for the log lines)


def known(endpoint_id: str) -> Names | None:
    """The container's names if this process's cache has them (never asks the engine): the log line of a
    plugin call names the container the way the metrics do. None in a worker that does not serve /metrics,
    and before the engine has listed the endpoint (its CreateEndpoint and first Join)."""
    cache = _ACTIVE
    if cache is None:
        return None
    with cache._lock:
        return cache._names.get(endpoint_id)


def from_labels(labels: dict | None) -> tuple[str, str]:
    """(service, application) from a container's labels: Compose's, else swarm's, else empty."""
    labels = labels or {}
    service = next((str(labels[k]) for k in SERVICE_LABELS if labels.get(k)), "")
    application = next((str(labels[k]) for k in APPLICATION_LABELS if labels.get(k)), "")
    return service, application


class EngineUnanswered(Exception):
    """The engine did not answer (in time, or with anything but JSON or a 404)."""


class NameCache:
    """Endpoint id -> Names, filled by a background thread from the engine at `socket_path` ("" turns
    lookups off: every name stays empty). `live()` gives this host's network ids and (network id, endpoint
    id) pairs (the store's)."""

    def __init__(self, socket_path: str, live: Callable[[], tuple[list[str], list[tuple[str, str]]]],
                 timeout: float = 2.0, interval: float = 2.0):
        self.socket_path = socket_path
        self.live = live
        self.timeout = timeout
        self.interval = interval
        self.failures = 0
        self._lock = threading.Lock()
        self._names: dict[str, Names] = {}                         # endpoint id -> its names, once known
        self._networks: dict[str, str] = {}                        # network id -> name
        self._containers: dict[str, tuple[str, str]] = {}          # container id -> (service, application)
        self._retry: dict[str, tuple[int, float]] = {}             # unnamed endpoint or network -> (tries, next try)
        self._gone: set[str] = set()                               # named endpoints gone at the last prune
        self._engine_retry = 0.0                                   # the engine's next try after a failure
        self._engine_delay = 0.0
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what a scrape reads (never waits on the engine) --------------------------------------------------
    def names(self, network_id: str, endpoint_id: str) -> Names:
        with self._lock:
            known = self._names.get(endpoint_id)
            return known if known is not None else Names(network=self._networks.get(network_id, ""))

    def network_name(self, network_id: str) -> str:
        with self._lock:
            return self._networks.get(network_id, "")

    def prune(self, networks: Iterable[str], live: Iterable[tuple[str, str]]) -> None:
        """Forget endpoints, networks (and containers) no longer on this host."""
        live = list(live)
        keep = set(networks) | {e for _, e in live}
        with self._lock:
            for table in (self._retry, self._networks):
                for key in [k for k in table if k not in keep]:
                    del table[key]
            # A gone endpoint's names stay one pass longer: its DeleteEndpoint's log line, written just
            # after the row goes, still names it (the series come from the store and are gone already).
            gone = {k for k in self._names if k not in keep}
            for key in gone & self._gone:
                del self._names[key]
            self._gone = gone - self._gone
            endpoints = {e for _, e in live}
            if len(self._containers) > 2 * len(endpoints) + 16:     # containers gone: labels read again
                self._containers.clear()

    def kick(self) -> None:
        """Ask for a pass now (a scrape does); starts the thread on first use (the metrics listener's start)."""
        if not self.socket_path:
            return
        global _ACTIVE
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vpcnet-names", daemon=True)
            self._thread.start()
            _ACTIVE = self
        self._kick.set()

    def stop(self) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout * 3 + 1)

    # -- the background thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.interval)
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception:       # never let the thread die: the names would then stop for good
                log.exception("endpoint name lookup failed")

    def refresh(self, now: float | None = None) -> int:
        """One pass: look up the networks with an endpoint still unnamed (and due), or a name not known.
        Returns how many endpoints it named; counts a failure (and backs off) when the engine does not
        answer."""
        now = time.monotonic() if now is None else now
        networks, live = self.live()
        self.prune(networks, live)
        if not self.socket_path or now < self._engine_retry:
            return 0
        with self._lock:
            due: dict[str, set[str]] = {n: set() for n in networks
                                        if n not in self._networks and self._retry.get(n, (0, 0.0))[1] <= now}
            for network_id, endpoint_id in live:
                if endpoint_id not in self._names and self._retry.get(endpoint_id, (0, 0.0))[1] <= now:
                    due.setdefault(network_id, set()).add(endpoint_id)
        named = 0
        try:
            for network_id, wanted in due.items():
                named += self._lookup(network_id, wanted, now)
        except EngineUnanswered as exc:
            self.failures += 1
            first = not self._engine_delay
            self._engine_delay = min(MAX_RETRY, max(self.interval, self._engine_delay * 2))
            self._engine_retry = now + self._engine_delay
            (log.warning if first else log.debug)(       # once per outage (a managed plugin has no socket)
                "container names for the metrics: the Docker engine at %s did not answer (%s); names stay "
                "empty, next try in %.0f s", self.socket_path, exc, self._engine_delay)
            return named
        self._engine_delay = 0.0
        return named

    def _later(self, key: str, now: float) -> None:
        """`key` (an endpoint or network id) not found on the engine: try again later, less and less often."""
        tries, _ = self._retry.get(key, (0, 0.0))
        self._retry[key] = (tries + 1, now + min(MAX_RETRY, self.interval * 2 ** tries))

    def _get(self, path: str):
        """GET one API path: the JSON, None for a 404; EngineUnanswered otherwise."""
        try:
            status, body = docker_status(self.socket_path, path, timeout=self.timeout)
        except OSError as exc:
            raise EngineUnanswered(str(exc) or type(exc).__name__) from None
        if status == 404:
            return None
        if status != 200:
            raise EngineUnanswered(f"HTTP {status} for {path}")
        try:
            return json.loads(body)
        except ValueError:
            raise EngineUnanswered(f"not JSON for {path}") from None

    def _lookup(self, network_id: str, wanted: set[str], now: float) -> int:
        network = self._get(f"/networks/{quote(network_id, safe='')}")
        attached: dict[str, tuple[str, str]] = {}            # endpoint id -> (container id, name)
        if network is None:
            with self._lock:
                self._later(network_id, now)
        else:
            with self._lock:
                self._networks[network_id] = str(network.get("Name") or "")
                self._retry.pop(network_id, None)
            for container_id, info in (network.get("Containers") or {}).items():
                if info.get("EndpointID"):
                    attached[info["EndpointID"]] = (container_id, str(info.get("Name") or ""))
        named = 0
        for endpoint_id in wanted:
            if endpoint_id not in attached:
                with self._lock:
                    self._later(endpoint_id, now)
                continue
            container_id, name = attached[endpoint_id]
            with self._lock:
                labels = self._containers.get(container_id)
            if labels is None:
                # While Docker starts a container, the network lists it under "ep-<endpoint id>" instead of
                # its id, and that is no container (404): not named yet, asked again on a later pass.
                info = None if container_id.startswith("ep-") else \
                    self._get(f"/containers/{quote(container_id, safe='')}/json")
                if info is None:
                    with self._lock:
                        self._later(endpoint_id, now)
                    continue
                labels = from_labels((info.get("Config") or {}).get("Labels"))
                with self._lock:
                    self._containers[container_id] = labels
            with self._lock:
                self._names[endpoint_id] = Names(self._networks.get(network_id, ""), name.lstrip("/"), *labels)
                self._retry.pop(endpoint_id, None)
            named += 1
        return named
