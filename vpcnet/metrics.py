"""Prometheus metrics: the families (a contract: dashboards, alerts and docs/monitoring.md use these
names), the hooks other modules call, and the collectors computed at scrape time.

Two kinds of family:
- Events, counted where they happen, each from one chokepoint: Docker's calls (transport's dispatch),
  cloud API calls (aliyun's signed RPC call, a botocore event hook for aws) and reconcile passes
  (the reconciler's loop). Those modules call `docker_call`, `cloud_call`/`instrument_botocore` and
  `reconcile_pass` here and nothing else, so a rewrite of theirs keeps a line or two to carry over.
- State, computed at scrape time from the store and the kernel (`StateCollector`): endpoints, IPAM
  addresses, route availability, route-table entries and quota, per-endpoint traffic (the veth's
  counters read over netlink, named from the container's side: what the container sent is what the host
  end received; what it received is read on the container's own end, which also counts what the ebpf
  fast path redirects into it past the host end). No per-call bookkeeping can drift, and an endpoint's
  series go with it.

Several gunicorn workers: counters and histograms then use prometheus_client's multiprocess mode
(`vpcnet serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory under the state dir before it forks,
and `MultiProcessCollector` adds the workers' files up), so a scrape of the one worker that serves
(the reconciler's, see vpcnet.health) counts every worker's calls; the state families are computed
from shared state and need no such help. With one worker (the default) values stay in memory.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vpcnet import __version__

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
disable_created_metrics()     # no `_created` series: half the lines per scrape, nothing a query needs

# Documented default custom-route quota per table, when the provider's API does not say it.

#: Where the event families live. In multiprocess mode their values are in mmap files instead, and
#: `serving_registry()` builds what a scrape reads.
EVENTS = CollectorRegistry(auto_describe=True)

DOCKER_REQUESTS = Counter("vpcnet_docker_requests_total", "Plugin calls Docker made, by call and outcome",
                          ["call", "outcome"], registry=EVENTS)
DOCKER_DURATION = Histogram("vpcnet_docker_request_duration_seconds", "Time to answer a plugin call",
                            ["call"], registry=EVENTS,
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
RECONCILES = Counter("vpcnet_route_reconcile_total", "Route reconcile passes: ok (nothing to change, or a "
                     "route still settling), repaired (a route had to be written), error", ["outcome"],
                     registry=EVENTS)
CLOUD_REQUESTS = Counter("vpcnet_cloud_api_requests_total", "Cloud API requests (each attempt), by outcome: "
                         "ok, throttled, conflict, error", ["provider", "action", "outcome"], registry=EVENTS)
CLOUD_DURATION = Histogram("vpcnet_cloud_api_duration_seconds", "Time of one cloud API request",
                           ["provider", "action"], registry=EVENTS,
                           buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
for _outcome in ("ok", "repaired", "error"):
    RECONCILES.labels(_outcome)       # present at 0 from the start, so rate() and alerts see them


#: The families of the contract (issue 10): dashboards, alerts and docs/monitoring.md rely on these names.
FAMILIES = (
    "vpcnet_build_info", "vpcnet_docker_requests_total", "vpcnet_docker_request_duration_seconds",
    "vpcnet_endpoints", "vpcnet_ipam_addresses_in_use", "vpcnet_ipam_addresses_capacity",
    "vpcnet_route_available", "vpcnet_route_reconcile_total", "vpcnet_cloud_api_requests_total",
    "vpcnet_cloud_api_duration_seconds", "vpcnet_route_table_entries", "vpcnet_route_table_quota",
    "vpcnet_endpoint_receive_bytes_total", "vpcnet_endpoint_transmit_bytes_total",
    "vpcnet_endpoint_receive_packets_total", "vpcnet_endpoint_transmit_packets_total",
    "vpcnet_endpoint_receive_drops_total", "vpcnet_endpoint_transmit_drops_total",
    "vpcnet_datapath_repairs_total",
)

#: Kernel objects the datapath pass repairs (vpcnet.datapath.spec.Repair kinds): their series exist at 0.
REPAIR_OBJECTS = ("firewall", "link", "address", "route", "tc")


# -- event hooks ------------------------------------------------------------------------------------
def docker_call(path: str | None, status: int, seconds: float) -> None:
    """One plugin call answered (transport's dispatch). Paths vpcnet does not implement come as None and
    share one label value, so a client posting garbage cannot grow the series without bound."""
    call = path[1:] if path else "other"
    DOCKER_REQUESTS.labels(call, "ok" if status == 200 else "error").inc()
    DOCKER_DURATION.labels(call).observe(seconds)


def reconcile_pass(result, repaired: bool) -> None:
    """One reconcile pass ended (the reconciler's loop; `result` a routes.SyncResult): `repaired` when it
    wrote a route (the route is then Pending for a while: not an error), `error` when a problem other
    than a route in transition remained, else `ok`."""
    fine = result.ok or result.pending_only
    RECONCILES.labels("repaired" if repaired else "ok" if fine else "error").inc()
    RECONCILER.passed(fine)


def cloud_outcome(code: str, exc: BaseException | None) -> str:
    """ok / throttled / conflict / error, from an API error code (any provider's spelling)."""
    if exc is None and not code:
        return "ok"
    low = (code or "").lower()
    if "throttl" in low or low in ("requestlimitexceeded", "toomanyrequests", "slowdown", "http429"):
        return "throttled"
    if "conflict" in low or "duplicate" in low or low.startswith("incorrectstatus") or low == "routealreadyexists":
        return "conflict"
    return "error"


def cloud_call(provider: str) -> Callable:
    """Decorator for a provider's one request method `call(self, action, ...)`: counts and times it."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def counted(self, action: str, *args, **kwargs):
            started = time.perf_counter()
            try:
                result = fn(self, action, *args, **kwargs)
            except Exception as exc:
                _cloud_done(provider, action, started, cloud_outcome(getattr(exc, "code", "") or "?", exc))
                raise
            _cloud_done(provider, action, started, "ok")
            return result
        return counted
    return wrap


def _cloud_done(provider: str, action: str, started: float, outcome: str) -> None:
    CLOUD_REQUESTS.labels(provider, action, outcome).inc()
    CLOUD_DURATION.labels(provider, action).observe(time.perf_counter() - started)


def instrument_botocore(client, provider: str = "aws") -> None:
    """Count and time every request a botocore client sends, through its event system (one hook for
    every operation, whatever code path calls it)."""
    events = client.meta.events

    def before(context=None, **_):
        if context is not None:
            context["vpcnet_started"] = time.perf_counter()

    def after(http_response=None, parsed=None, model=None, context=None, **_):
        code = ""
        if http_response is not None and http_response.status_code >= 300:
            code = str(((parsed or {}).get("Error") or {}).get("Code") or f"HTTP{http_response.status_code}")
        _botocore_done(provider, model, context, cloud_outcome(code, None))

    def failed(exception=None, model=None, context=None, **_):
        _botocore_done(provider, model, context, "error")

    events.register("before-call.ec2", before)
    events.register("after-call.ec2", after)
    events.register("after-call-error.ec2", failed)


def _botocore_done(provider: str, model, context, outcome: str) -> None:
    started = (context or {}).get("vpcnet_started")
    action = getattr(model, "name", "?")
    CLOUD_REQUESTS.labels(provider, action, outcome).inc()
    if started is not None:
        CLOUD_DURATION.labels(provider, action).observe(time.perf_counter() - started)


# -- what the reconciler saw ------------------------------------------------------------------------
class ReconcilerState:
    """The reconciler's last pass and the route tables it listed, in the process that runs it (the
    one that serves metrics and health)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_pass: float | None = None      # time.time() of the last finished pass
        self.last_ok: bool | None = None
        self.tables: dict[str, tuple[int, int | None]] = {}   # table id -> (custom entries, quota)

    def passed(self, ok: bool) -> None:
        with self._lock:
            self.last_pass, self.last_ok = time.time(), ok

    def table_listed(self, table: str, entries: int, quota: int) -> None:
        """A full listing of `table`: its custom entries (every owner's) and quota (0 = unknown)."""
        with self._lock:
            self.tables = {**self.tables, table: (entries, quota or None)}

    def snapshot(self) -> tuple[float | None, bool | None, dict[str, tuple[int, int | None]]]:
        with self._lock:
            return self.last_pass, self.last_ok, dict(self.tables)


RECONCILER = ReconcilerState()


def route_quota(provider, table: str) -> int | None:
    """The table's custom-entry quota as the provider knows it (the setting, else the cloud's documented
    default); None for the local table, which has no quota."""
    return provider.table_quota(table) or None


# -- state computed at scrape time ------------------------------------------------------------------
LINK_STATS = (   # (family suffix, container-side direction, host-veth counter; see _counter for the peer's)
    ("receive_bytes_total", "Bytes the container received", "tx_bytes"),
    ("transmit_bytes_total", "Bytes the container sent", "rx_bytes"),
    ("receive_packets_total", "Packets the container received", "tx_packets"),
    ("transmit_packets_total", "Packets the container sent", "rx_packets"),
    ("receive_drops_total", "Packets dropped on their way into the container", "tx_dropped"),
    ("transmit_drops_total", "Packets the container sent that were dropped", "rx_dropped"),
)


def veth_stats() -> dict[str, dict[str, int]]:
    """Endpoint host veth name (`vh...`) -> its 64-bit counters, and its container end's receive counters
    (`peer_rx_*`): one netlink dump and one request per endpoint (vpcnet.rtnl)."""
    from vpcnet.rtnl import link_stats

    return link_stats(prefix="vh", peers=True)


def _counter(counters: dict[str, int], key: str) -> int:
    """What the container received is read on its own end when that end could be read: in ebpf mode
    traffic from other hosts enters the container's namespace without passing the host end's transmit
    side (bpf_redirect_peer), and only the container end counts it."""
    peer = {"tx_bytes": "peer_rx_bytes", "tx_packets": "peer_rx_packets"}.get(key)
    return counters[peer] if peer and peer in counters else counters[key]


class StateCollector:
    """Gauges and per-endpoint counters from the store and the kernel, computed at each scrape."""

    def __init__(self, store, link_stats: Callable[[], dict[str, dict[str, int]]] = veth_stats,
                 reconciler: ReconcilerState = RECONCILER):
        self.store = store
        self.link_stats = link_stats
        self.reconciler = reconciler

    def describe(self):
        return []       # unchecked collector: its series are known only at scrape time

    def collect(self):
        build = GaugeMetricFamily("vpcnet_build_info", "vpcnet's version (always 1)", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        yield from self._endpoints()
        yield from self._ipam()
        yield from self._routes()
        yield from self._tables()
        yield from self._repairs()

    def _repairs(self):
        """Drift the periodic datapath pass repaired, counted in the store (so the count survives a
        restart, and whichever worker ran the pass, the listener's process reads it)."""
        from vpcnet.datapath.reconciler import repair_counts

        family = CounterMetricFamily("vpcnet_datapath_repairs", "Kernel drift repaired by the periodic datapath "
                                     "pass, by object", labels=["object"])
        counts = repair_counts(self.store)
        for obj in sorted(set(REPAIR_OBJECTS) | set(counts)):
            family.add_metric([obj], counts.get(obj, 0))
        yield family

    def _endpoints(self):
        endpoints = GaugeMetricFamily("vpcnet_endpoints", "Endpoints present now, by Docker network id",
                                      labels=["network"])
        networks = {n.network_id: 0 for n in self.store.networks()}
        eps = self.store.endpoints()
        for ep in eps:
            networks[ep.network_id] = networks.get(ep.network_id, 0) + 1
        for network_id, count in networks.items():
            endpoints.add_metric([network_id[:12]], count)
        yield endpoints

    def traffic_text(self) -> str:
        """The per-endpoint counters in the text exposition format (0.0.4), rendered here: with 500
        endpoints they are 3000 samples, which prometheus_client's generic renderer takes ~20 ms of CPU
        (and the GIL) to write; this takes a tenth of that. Same format, checked by its parser in tests."""
        eps = self.store.endpoints()
        try:
            stats = self.link_stats() if eps else {}
        except Exception as exc:      # the kernel unreadable: the store's families still answer
            log.warning("cannot read the veth counters: %s", exc)
            stats = {}
        rows = []
        for ep in eps:
            counters = stats.get(ep.host_veth)
            if counters is not None:  # veth gone (or not yet made): no series, rather than a false 0
                rows.append((f'{{network="{_label(ep.network_id[:12])}",endpoint="{_label(ep.endpoint_id[:12])}"}} ',
                             counters))
        out = []
        for suffix, text, key in LINK_STATS:
            name = f"vpcnet_endpoint_{suffix}"
            out.append(f"# HELP {name} {text}\n# TYPE {name} counter\n")
            out.extend(f"{name}{labels}{float(_counter(counters, key))!r}\n" for labels, counters in rows)
        return "".join(out)

    def _ipam(self):
        in_use = GaugeMetricFamily("vpcnet_ipam_addresses_in_use", "Container addresses handed out",
                                   labels=["host_cidr"])
        capacity = GaugeMetricFamily("vpcnet_ipam_addresses_capacity", "Container addresses a host CIDR "
                                     "holds (without network, broadcast and gateway)", labels=["host_cidr"])
        rows = self.store.read("SELECT p.pool_id AS pool, COUNT(a.address) AS used FROM pools p "
                               "LEFT JOIN addresses a ON a.pool_id = p.pool_id GROUP BY p.pool_id")
        for row in rows:
            in_use.add_metric([row["pool"]], row["used"])
            capacity.add_metric([row["pool"]], max(0, ipaddress.IPv4Network(row["pool"]).num_addresses - 3))
        yield in_use
        yield capacity

    def _routes(self):
        available = GaugeMetricFamily("vpcnet_route_available", "1 when this host's route is Available in "
                                      "every table it must be in", labels=["cluster_cidr", "host_cidr"])
        for claim in self.store.claims():
            if claim.host_cidr:
                available.add_metric([claim.cluster_cidr, claim.host_cidr], 1 if claim.route_ok else 0)
        yield available

    def _tables(self):
        entries = GaugeMetricFamily("vpcnet_route_table_entries", "Custom entries in the route table "
                                    "(as of the last reconcile pass)", labels=["table"])
        quota = GaugeMetricFamily("vpcnet_route_table_quota", "Custom entries the route table may hold",
                                  labels=["table"])
        for table, (count, limit) in self.reconciler.snapshot()[2].items():
            entries.add_metric([table], count)
            if limit is not None:
                quota.add_metric([table], limit)
        yield entries
        yield quota


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """What `/metrics` answers: the registry rendered by prometheus_client, then the per-endpoint
    counters (StateCollector.traffic_text)."""

    def __init__(self, store, link_stats: Callable[[], dict[str, dict[str, int]]] = veth_stats):
        self.state = StateCollector(store, link_stats)
        self.registry = serving_registry(self.state)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry) + self.state.traffic_text().encode()


def serving_registry(state: "StateCollector") -> CollectorRegistry:
    """The events (this process's, or every worker's in multiprocess mode), the process's own resource
    use, and the state computed at scrape time."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(EVENTS))
        ProcessCollector(registry=registry)
    registry.register(state)
    return registry


class _Forward:
    """Another registry's families, as one collector (so the events registry stays importable alone)."""

    def __init__(self, source: CollectorRegistry):
        self.source = source

    def describe(self):
        return []

    def collect(self):
        return self.source.collect()
