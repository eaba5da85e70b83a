"""Prometheus metrics: what `/metrics` answers. The families are a contract (dashboards, alerts and
docs/monitoring.md use their names; vpcnet.observability.events lists them).

Two kinds of family:
- Events, counted where they happen through vpcnet.observability.events, the one module of this room the
  others import: Docker's calls, cloud API calls, route passes.
- State, computed here at scrape time from the store and the kernel (`StateCollector`): endpoints, IPAM
  addresses, route availability, route-table entries and quota, in eni-prefix addressing this host's
  prefixes (`PrefixPool.status()`, from the store: no cloud call; the IPAM's pool is then the range all
  hosts share, so it gets no capacity series), per-endpoint traffic (the veth's
  counters read over netlink, named from the container's side: what the container sent is what the host
  end received; what it received is read on the container's own end, which also counts what the ebpf
  fast path redirects into it past the host end). No per-call bookkeeping can drift, and an endpoint's
  series go with it.

Per-endpoint series are named the way operators think: `network` (the Docker network's name; its
12-character id is `network_id`), `container`, `service` and `application` (Compose's or swarm's), read
from the Docker engine in the background by vpcnet.docker.names and empty until it answers;
`vpcnet_endpoint_info` joins an address to them. VPCNET_ENDPOINT_METRICS=service serves the traffic
families summed per (network, application, service) instead (ServiceSums).

Who talks to whom (`vpcnet_endpoint_peer_{transmit,receive}_{bytes,packets}_total`, the same labels plus
`peer`): read at scrape time from the host's peer map, which vpcnet's eBPF programs write
(vpcnet.datapath.ebpf.maps; VPCNET_PEER_METRICS). `peer` is the other side's address inside the cluster
CIDR, `outside` beyond it, `other` the sum of the peers past VPCNET_PEERS_PER_ENDPOINT (PeerTotals: sticky
per endpoint, cumulative, so no counter ever goes down). Off with VPCNET_ENDPOINT_METRICS=service: a
service sum has no endpoint to hang a peer on, and the per-address join that names peers
(vpcnet_endpoint_info) is not served then either.

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
import time
from typing import Callable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vpcnet import __version__
from vpcnet.docker.names import NONE, NameCache
from vpcnet.observability.events import EVENTS, RECONCILER, REPAIR_OBJECTS, ReconcilerState
from vpcnet.routes.prefixes import PoolStatus

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


PEER_FAMILIES = (   # (family suffix, help, direction in the peer map, 0 bytes / 1 packets)
    ("transmit_bytes_total", "Bytes the container sent, by peer", 0, 0),
    ("receive_bytes_total", "Bytes the container received, by peer", 1, 0),
    ("transmit_packets_total", "Packets the container sent, by peer", 0, 1),
    ("receive_packets_total", "Packets the container received, by peer", 1, 1),
)
OUTSIDE, OTHER = "outside", "other"
PeerReading = dict[tuple[str | None, int, str | None], tuple[int, int]]   # vpcnet.datapath.ebpf.maps.read_all


def peer_map() -> PeerReading:
    from vpcnet.datapath.ebpf import maps

    return maps.read_all()


class PeerTotals:
    """The bounded, never-decreasing peer series of each endpoint. Per endpoint and direction, up to
    `bound` peers get a series of their own: when a slot is free, the busiest new peers since the last
    scrape take it, and keep it for the endpoint's life (a series that came and went would read as a
    counter reset). Every other peer's traffic adds to `other`; `outside` is always its own. Each value is
    the sum of what the map gained between scrapes (a key's value that went down was evicted and made
    again: all of it is new), so an LRU eviction loses at most what was counted since the last scrape,
    and never lowers a counter. A new series is served at 0 at its first scrape and with its value from
    the next one on: Prometheus takes a series' first sample as its start, so a peer that appeared
    holding its first traffic would never show that traffic in rate() or increase() (a short exchange,
    over before the next scrape, not at all). An endpoint that goes takes its state with it."""

    def __init__(self, bound: int):
        self.bound = bound
        self.last: dict[str, dict[tuple[int, str | None], tuple[int, int]]] = {}   # endpoint id -> raw values
        self.chosen: dict[str, dict[int, set[str]]] = {}                             # endpoint id -> dir -> peers
        self.totals: dict[str, dict[tuple[int, str], list[int]]] = {}               # endpoint id -> (dir, label)
        self.served: dict[str, set[tuple[int, str]]] = {}                            # series served once

    def update(self, live: dict[str, dict[tuple[int, str | None], tuple[int, int]]]) \
            -> dict[str, dict[tuple[int, str], list[int]]]:
        """`live`: endpoint id -> (direction, peer or None for outside) -> (bytes, packets) as the map
        holds them now. Returns endpoint id -> (direction, peer label) -> [bytes, packets]."""
        for gone in set(self.last) - set(live):
            del self.last[gone], self.chosen[gone], self.totals[gone]
            self.served.pop(gone, None)
        for endpoint_id, raw in live.items():
            last = self.last.get(endpoint_id, {})
            chosen = self.chosen.setdefault(endpoint_id, {})
            totals = self.totals.setdefault(endpoint_id, {})
            deltas: dict[tuple[int, str | None], tuple[int, int]] = {}
            for key, (nbytes, npackets) in raw.items():
                before = last.get(key)
                if before is not None and nbytes >= before[0] and npackets >= before[1]:
                    nbytes, npackets = nbytes - before[0], npackets - before[1]
                if nbytes or npackets:
                    deltas[key] = (nbytes, npackets)
            self.last[endpoint_id] = dict(raw)
            for (direction, peer), (nbytes, npackets) in sorted(deltas.items(), key=lambda kv: -kv[1][0]):
                label = OUTSIDE if peer is None else peer
                mine = chosen.setdefault(direction, set())
                if peer is not None and label not in mine:
                    if len(mine) < self.bound:
                        mine.add(label)
                    else:
                        label = OTHER
                acc = totals.setdefault((direction, label), [0, 0])
                acc[0] += nbytes
                acc[1] += npackets
        return self.view()

    def view(self) -> dict[str, dict[tuple[int, str], list[int]]]:
        """What a scrape serves: each series' total, or 0 the first time it is served."""
        out: dict[str, dict[tuple[int, str], list[int]]] = {}
        for endpoint_id, totals in self.totals.items():
            served = self.served.setdefault(endpoint_id, set())
            out[endpoint_id] = {key: (list(v) if key in served else [0, 0]) for key, v in totals.items()}
            served.update(totals)
        return out


def _counter(counters: dict[str, int], key: str) -> int:
    """What the container received is read on its own end when that end could be read: in ebpf mode
    traffic from other hosts enters the container's namespace without passing the host end's transmit
    side (bpf_redirect_peer), and only the container end counts it."""
    peer = {"tx_bytes": "peer_rx_bytes", "tx_packets": "peer_rx_packets"}.get(key)
    return counters[peer] if peer and peer in counters else counters[key]


class StateCollector:
    """Gauges and per-endpoint counters from the store and the kernel, computed at each scrape."""

    def __init__(self, store, link_stats: Callable[[], dict[str, dict[str, int]]] = veth_stats,
                 reconciler: ReconcilerState = RECONCILER, names: NameCache | None = None,
                 per: str = "container", peer_stats: Callable[[], PeerReading] | None = None,
                 peers_per_endpoint: int = 32, prefixes: Callable[[], PoolStatus] | None = None):
        self.store = store
        self.link_stats = link_stats
        self.reconciler = reconciler
        self.names = names          # None: no Docker engine to ask, every name empty
        self.per = per              # VPCNET_ENDPOINT_METRICS: container, or service (sums, see ServiceSums)
        self.sums = ServiceSums()
        self.peer_stats = peer_stats    # None: VPCNET_PEER_METRICS=off, no peer families
        self.peers = PeerTotals(peers_per_endpoint)
        self.prefixes = prefixes        # None: route-table addressing, no prefix families

    def describe(self):
        return []       # unchecked collector: its series are known only at scrape time

    def collect(self):
        build = GaugeMetricFamily("vpcnet_build_info", "vpcnet's version (always 1)", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        yield from self._endpoints()
        yield from self._lookups()
        yield from self._ipam()
        yield from self._routes()
        yield from self._tables()
        yield from self._prefix_families()
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
        endpoints = GaugeMetricFamily("vpcnet_endpoints", "Endpoints present now, by Docker network",
                                      labels=["network", "network_id"])
        networks = {n.network_id: 0 for n in self.store.networks()}
        eps = self.store.endpoints()
        for ep in eps:
            networks[ep.network_id] = networks.get(ep.network_id, 0) + 1
        for network_id, count in networks.items():
            name = self.names.network_name(network_id) if self.names else ""
            endpoints.add_metric([name, network_id[:12]], count)
        yield endpoints

    def _lookups(self):
        failures = CounterMetricFamily("vpcnet_docker_lookup_failures", "Passes that could not read container "
                                       "and network names from the Docker engine (it did not answer in time)")
        failures.add_metric([], self.names.failures if self.names else 0)
        yield failures
        if self.names:
            self.names.kick()       # names for endpoints still unnamed, looked up in the background

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
        if self.per == "service":
            return self._service_text(eps, stats)
        rows = []
        info: list[str] = []
        peer_rows = self._peer_rows(eps)
        peer_series: dict[tuple[int, str], list[int]] = {}
        for ep in eps:
            names = self.names.names(ep.network_id, ep.endpoint_id) if self.names else NONE
            labels = (f'network="{_label(names.network)}",network_id="{_label(ep.network_id[:12])}",'
                      f'endpoint="{_label(ep.endpoint_id[:12])}",container="{_label(names.container)}",'
                      f'service="{_label(names.service)}",application="{_label(names.application)}"')
            info.extend(f'vpcnet_endpoint_info{{{labels},address="{_label(address)}"}} 1.0\n'
                        for address in (ep.address or ep.address_v6,) if address)   # IPv6-only: its IPv6
            counters = stats.get(ep.host_veth)
            if counters is not None:  # veth gone (or not yet made): no series, rather than a false 0
                rows.append((f"{{{labels}}} ", [_counter(counters, key) for _, _, key in LINK_STATS]))
            for (direction, peer), values in sorted(peer_rows.get(ep.endpoint_id, {}).items()):
                peer_series[(direction, f'{{{labels},peer="{_label(peer)}"}} ')] = values
        out = _render(rows, ["# HELP vpcnet_endpoint_info An endpoint on this host and its names (always 1; "
                             "one series per address)\n# TYPE vpcnet_endpoint_info gauge\n", *info])
        return out + (_render_peers(peer_series) if self.peer_stats is not None else "")

    def _peer_rows(self, eps) -> dict[str, dict[tuple[int, str], list[int]]]:
        """Endpoint id -> (direction, peer label) -> [bytes, packets], from the peer map (PeerTotals)."""
        if self.peer_stats is None:
            return {}
        try:
            reading = self.peer_stats() if eps else {}
        except Exception as exc:      # the map unreadable: no new counts this scrape, none lost
            log.warning("cannot read the peer map: %s", exc)
            return self.peers.view()
        by_address: dict[str, dict[tuple[int, str | None], tuple[int, int]]] = {}
        for (address, direction, peer), values in reading.items():
            if address is not None:
                by_address.setdefault(address, {})[(direction, peer)] = values
        live = {ep.endpoint_id: by_address.get(ep.address, {}) for ep in eps if ep.address}
        return self.peers.update(live)

    def _service_text(self, eps, stats) -> str:
        """VPCNET_ENDPOINT_METRICS=service: the same families summed per (network, application, service),
        no per-container series (and no vpcnet_endpoint_info)."""
        live = {}
        for ep in eps:
            names = self.names.names(ep.network_id, ep.endpoint_id) if self.names else NONE
            counters = stats.get(ep.host_veth)
            values = tuple(_counter(counters, key) for _, _, key in LINK_STATS) if counters is not None else None
            live[ep.endpoint_id] = ((names.network, ep.network_id[:12], names.application, names.service), values)
        rows = [(f'{{network="{_label(net)}",network_id="{_label(nid)}",application="{_label(app)}",'
                 f'service="{_label(svc)}"}} ', values)
                for (net, nid, app, svc), values in sorted(self.sums.totals(live, time.monotonic()).items())]
        return _render(rows, [])

    def _ipam(self):
        in_use = GaugeMetricFamily("vpcnet_ipam_addresses_in_use", "Container addresses handed out",
                                   labels=["host_cidr"])
        capacity = GaugeMetricFamily("vpcnet_ipam_addresses_capacity", "Container addresses a host CIDR "
                                     "holds (without network, broadcast and gateway)", labels=["host_cidr"])
        for pool, used in self.store.addresses_per_pool().items():
            in_use.add_metric([pool], used)
            if self.prefixes is not None:
                continue     # eni-prefix: the pool is the range every host shares; vpcnet_prefix_* say this host's
            block = ipaddress.ip_network(pool)    # without network, broadcast, gateway (IPv6: anycast, gateway)
            capacity.add_metric([pool], max(0, block.num_addresses - (3 if block.version == 4 else 2)))
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
                                    "(as of the last reconcile pass), of the family its quota counts (all: "
                                    "one quota for both)", labels=["table", "family"])
        quota = GaugeMetricFamily("vpcnet_route_table_quota", "Custom entries of the family the route table "
                                  "may hold", labels=["table", "family"])
        for table, usage in self.reconciler.snapshot()[2].items():
            for family, (count, limit) in usage.items():
                entries.add_metric([table, family], count)
                if limit is not None:
                    quota.add_metric([table, family], limit)
        yield entries
        yield quota


    def _prefix_families(self):
        """eni-prefix addressing: this host's prefixes per family, as the store holds them (what the last
        pass learnt of the interface for its capacity; none until a pass has read it)."""
        if self.prefixes is None:
            return
        status = self.prefixes()
        held = GaugeMetricFamily("vpcnet_prefixes_held", "eni-prefix addressing: prefixes this host holds on "
                                 "its interface (being released included)", labels=["family"])
        in_use = GaugeMetricFamily("vpcnet_prefix_addresses_in_use", "eni-prefix addressing: container "
                                   "addresses in use in this host's prefixes", labels=["family"])
        free = GaugeMetricFamily("vpcnet_prefix_addresses_free", "eni-prefix addressing: addresses still free "
                                 "in this host's prefixes (not being released, without the range's own)",
                                 labels=["family"])
        capacity = GaugeMetricFamily("vpcnet_prefix_interface_capacity", "eni-prefix addressing: prefixes the "
                                     "interface can hold in all, from its instance type (held ones and other "
                                     "tools' included)", labels=["family"])
        paused = GaugeMetricFamily("vpcnet_prefix_growth_paused", "eni-prefix addressing: 1 while new prefixes "
                                   "are paused after the cloud had no free one", labels=["family"])
        for family in status.families:
            name = f"ipv{family.version}"
            held.add_metric([name], len(family.prefixes))
            in_use.add_metric([name], family.addresses_in_use)
            free.add_metric([name], family.addresses_free)
            if family.capacity is not None:
                capacity.add_metric([name], family.capacity)
            paused.add_metric([name], 1 if family.paused_until is not None else 0)
        yield from (held, in_use, free, capacity, paused)


def prefix_status(config, store) -> Callable[[], PoolStatus] | None:
    """What the prefix families are computed from: in eni-prefix addressing the prefix pool's `status`
    (the store only; the pool here never makes a cloud call), else None."""
    if config.addressing != "eni-prefix":
        return None
    from vpcnet.routes.prefixes import PrefixPool

    return PrefixPool(config, store).status


def _render(rows: list[tuple[str, list[int]]], out: list[str]) -> str:
    """The per-endpoint families' text: `rows` of (labels, one value per LINK_STATS family)."""
    for i, (suffix, text, _) in enumerate(LINK_STATS):
        name = f"vpcnet_endpoint_{suffix}"
        out.append(f"# HELP {name} {text}\n# TYPE {name} counter\n")
        out.extend(f"{name}{labels}{float(values[i])!r}\n" for labels, values in rows)
    return "".join(out)


def _render_peers(rows: dict[tuple[int, str], list[int]]) -> str:
    """The peer families' text: `rows` (direction, labels) -> [bytes, packets]."""
    out = []
    for suffix, text, direction, which in PEER_FAMILIES:
        name = f"vpcnet_endpoint_peer_{suffix}"
        out.append(f"# HELP {name} {text}\n# TYPE {name} counter\n")
        out.extend(f"{name}{labels}{float(values[which])!r}\n"
                   for (d, labels), values in rows.items() if d == direction)
    return "".join(out)


class ServiceSums:
    """The per-service counters of VPCNET_ENDPOINT_METRICS=service. A bucket's value is its live
    endpoints' counters plus what its departed ones had counted when last read, so a sum does not go
    down when a container goes, or moves to another bucket once its names are known (which `rate()`
    would read as a counter reset); what a departed endpoint counted after the last scrape is lost. A
    bucket without endpoints for KEEP_EMPTY seconds is dropped, so churning services cannot grow the
    series without bound."""

    KEEP_EMPTY = 3600.0

    def __init__(self):
        self.last: dict[str, tuple[tuple, tuple[int, ...]]] = {}    # endpoint id -> (bucket, values read)
        self.departed: dict[tuple, list[int]] = {}
        self.empty_since: dict[tuple, float] = {}

    def totals(self, live: dict[str, tuple[tuple, tuple[int, ...] | None]], now: float) -> dict[tuple, list[int]]:
        """`live`: endpoint id -> (bucket, its counters, or None when its veth cannot be read now)."""
        seen: dict[str, tuple[tuple, tuple[int, ...]]] = {}
        for endpoint_id, (bucket, values) in live.items():
            if values is None:                      # veth not readable now: keep what it had
                if endpoint_id in self.last and self.last[endpoint_id][0] == bucket:
                    seen[endpoint_id] = self.last[endpoint_id]
                continue
            seen[endpoint_id] = (bucket, values)
        for endpoint_id, (bucket, values) in self.last.items():
            if endpoint_id not in seen or seen[endpoint_id][0] != bucket:
                acc = self.departed.setdefault(bucket, [0] * len(values))
                for i, v in enumerate(values):
                    acc[i] += v
        self.last = seen
        totals = {bucket: list(acc) for bucket, acc in self.departed.items()}
        for bucket, values in seen.values():
            acc = totals.setdefault(bucket, [0] * len(values))
            for i, v in enumerate(values):
                acc[i] += v
        occupied = {bucket for bucket, _ in seen.values()}
        for bucket in list(totals):
            if bucket in occupied:
                self.empty_since.pop(bucket, None)
            elif now - self.empty_since.setdefault(bucket, now) > self.KEEP_EMPTY:
                del totals[bucket], self.departed[bucket], self.empty_since[bucket]
        return totals


def _live(store) -> tuple[list[str], list[tuple[str, str]]]:
    """This host's network ids and (network id, endpoint id) pairs, for the name lookups."""
    return [n.network_id for n in store.networks()], [(e.network_id, e.endpoint_id) for e in store.endpoints()]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """What `/metrics` answers: the registry rendered by prometheus_client, then the per-endpoint
    counters (StateCollector.traffic_text). `docker_socket`: the engine whose API names the endpoints
    ("" for none: names stay empty); its lookups start at once, in a thread of their own. `prefixes`: in
    eni-prefix addressing, the prefix pool's `status` (its families are served then only)."""

    def __init__(self, store, link_stats: Callable[[], dict[str, dict[str, int]]] = veth_stats,
                 docker_socket: str = "", per: str = "container", peer_stats: Callable[[], PeerReading] | None = None,
                 peers_per_endpoint: int = 32, prefixes: Callable[[], PoolStatus] | None = None):
        self.names = NameCache(docker_socket, lambda: _live(store)) if docker_socket else None
        self.state = StateCollector(store, link_stats, names=self.names, per=per,
                                    peer_stats=peer_stats if per == "container" else None,
                                    peers_per_endpoint=peers_per_endpoint, prefixes=prefixes)
        self.registry = serving_registry(self.state)
        if self.names:
            self.names.kick()

    def close(self) -> None:
        if self.names:
            self.names.stop()

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
