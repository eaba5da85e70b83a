"""Prometheus metrics: what `/metrics` answers. The families are a contract (dashboards, alerts and
docs/monitoring.md use their names; vpcnet.observability.events lists them).

Two kinds of family:
- Events, counted where they happen through vpcnet.observability.events, the one module of this room the
  others import: Docker's calls, cloud API calls, route passes.
- State, computed here at scrape time from the store and the kernel (`StateCollector`): endpoints, IPAM
  addresses, route availability, route-table entries and quota, per-endpoint traffic (the veth's
  counters read over netlink, named from the container's side: what the container sent is what the host
  end received; what it received is read on the container's own end, which also counts what the ebpf
  fast path redirects into it past the host end). No per-call bookkeeping can drift, and an endpoint's
  series go with it.

Several gunicorn workers: counters and histograms then use prometheus_client's multiprocess mode
(`vpcnet serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory under the state dir before it forks,
and `MultiProcessCollector` adds the workers' files up), so a scrape of the one worker that serves
(the route keeper's, see vpcnet.observability.health) counts every worker's calls; the state families are
computed from shared state and need no such help. With one worker (the default) values stay in memory.
The datapath's own families (pass duration, iptables-restore runs, eBPF program loads) are events too;
the two last-success timestamps are gauges whose newest value across workers is the host's (multiprocess
mode "max": the datapath pass and the route loop move to another worker when theirs dies).
"""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import Callable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vpcnet import __version__
from vpcnet.observability.events import EVENTS, RECONCILER, REPAIR_OBJECTS, ReconcilerState

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

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
    (`peer_rx_*`): one netlink dump and one request per endpoint (vpcnet.datapath.rtnl)."""
    from vpcnet.datapath.rtnl import link_stats

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
        family = CounterMetricFamily("vpcnet_datapath_repairs", "Kernel drift repaired by the periodic datapath "
                                     "pass, by object", labels=["object"])
        counts = self.store.repair_counts()
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
        for pool, used in self.store.addresses_per_pool().items():
            in_use.add_metric([pool], used)
            capacity.add_metric([pool], max(0, ipaddress.IPv4Network(pool).num_addresses - 3))
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
