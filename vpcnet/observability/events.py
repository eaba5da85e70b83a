"""The event hooks: the only part of observability that the rooms it observes import.

Each event is counted where it happens, at one chokepoint: Docker's calls (transport's dispatch), cloud
API calls (aliyun's signed RPC call, a botocore event hook for aws), route passes (the route keeper's
loop), firewall repair loops (the firewall's canary), datapath passes (the datapath reconciler),
iptables-restore runs (the firewall's one runner of it), eBPF program loads (the loader) and ENI prefix
assigns and releases (the prefix pool). Those modules call `docker_call`, `cloud_call`/`instrument_botocore`,
`reconcile_pass`, `repair_loop`, `datapath_pass`, `iptables_restore`, `bpf_program_load`, `prefix_call` and
`RECONCILER.table_listed` here and nothing else; this module imports nothing of vpcnet's, so the arrows
point one way. The families are part of the metrics contract (docs/monitoring.md); vpcnet.observability
.metrics renders them with the state it computes at scrape time.
"""
from __future__ import annotations

import functools
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()     # no `_created` series: half the lines per scrape, nothing a query needs

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
REPAIR_LOOPS = Counter("vpcnet_datapath_repair_loops_total", "Firewall chains vpcnet rewrote on several "
                       "passes in a row while iptables-save printed the same other text back each time (a rule "
                       "it spells differently: rewritten on every pass); each is also one ERROR log line",
                       ["family", "table"], registry=EVENTS)
# The datapath's own work (Calico Felix's families are the model). The timestamps are gauges that only
# grow: with several workers (multiprocess mode) the newest of every worker's, dead ones' included, is
# the host's ("max"); the pass and the route loop run in one worker at a time, and that worker changes.
DATAPATH_PASS = Histogram("vpcnet_datapath_pass_duration_seconds", "Time of one datapath pass (read the kernel, "
                          "repair what differs from the state): start (a worker's first, which rebuilds after "
                          "a reboot) or periodic", ["trigger"], registry=EVENTS,
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
DATAPATH_LAST_SUCCESS = Gauge("vpcnet_datapath_last_success_timestamp_seconds", "Unix time the last datapath "
                              "pass ended with the kernel matching the state (0: none yet)", registry=EVENTS,
                              multiprocess_mode="max")
ROUTE_LAST_SUCCESS = Gauge("vpcnet_route_reconcile_last_success_timestamp_seconds", "Unix time the last route "
                           "reconcile pass ended without a problem (a route still Pending counts as none; 0: none yet)",
                           registry=EVENTS, multiprocess_mode="max")
IPTABLES_RESTORES = Counter("vpcnet_iptables_restore_total", "iptables-restore (ipv4) and ip6tables-restore "
                            "(ipv6) runs, by outcome: ok, failed (a non-zero exit, or it could not be run)",
                            ["family", "outcome"], registry=EVENTS)
BPF_LOADS = Counter("vpcnet_bpf_program_loads_total", "eBPF programs loaded into the kernel (bpf(2) PROG_LOAD), "
                    "by program (container, uplink, probe) and outcome: ok, failed (the kernel refused it)",
                    ["program", "outcome"], registry=EVENTS)
PREFIX_CALLS = Counter("vpcnet_prefix_calls_total", "eni-prefix addressing: prefix assign and unassign calls "
                       "to the cloud, by IP family and outcome: ok, no_free_prefix (the subnet or reserved range "
                       "has none left), interface_full, unsupported (the instance type holds none), busy "
                       "(throttled), retryable (a timeout, a 5xx, a lost answer), refused (any other refusal)",
                       ["call", "family", "outcome"], registry=EVENTS)
#: Its outcomes (vpcnet.routes.prefixes maps each exception to one), so the label stays bounded.
PREFIX_OUTCOMES = ("ok", "no_free_prefix", "interface_full", "unsupported", "busy", "retryable", "refused")
#: The `program` label of each kernel program name (vpcnet.datapath.tc attaches the first two,
#: vpcnet.datapath.features probes with the others); any other name is "other", so the label stays bounded.
BPF_PROGRAMS = {"vpcnet_ctr": "container", "vpcnet_uplink": "uplink", "vpcnet_probe_c": "probe",
                "vpcnet_probe_u": "probe", "vpcnet_count": "count"}

for _outcome in ("ok", "repaired", "error"):
    RECONCILES.labels(_outcome)       # present at 0 from the start, so rate() and alerts see them
for _family, _table in (("ipv4", "raw"), ("ipv4", "filter"), ("ipv4", "nat"), ("ipv6", "raw")):
    REPAIR_LOOPS.labels(_family, _table)
for _trigger in ("start", "periodic"):
    DATAPATH_PASS.labels(_trigger)
for _outcome in ("ok", "failed"):
    for _family in ("ipv4", "ipv6"):
        IPTABLES_RESTORES.labels(_family, _outcome)
    for _program in ("container", "uplink"):
        BPF_LOADS.labels(_program, _outcome)


#: The families of the contract: dashboards, alerts and docs/monitoring.md rely on these names.
FAMILIES = (
    "vpcnet_build_info", "vpcnet_docker_requests_total", "vpcnet_docker_request_duration_seconds",
    "vpcnet_endpoints", "vpcnet_ipam_addresses_in_use", "vpcnet_ipam_addresses_capacity",
    "vpcnet_route_available", "vpcnet_route_reconcile_total", "vpcnet_cloud_api_requests_total",
    "vpcnet_cloud_api_duration_seconds", "vpcnet_route_table_entries", "vpcnet_route_table_quota",
    "vpcnet_endpoint_receive_bytes_total", "vpcnet_endpoint_transmit_bytes_total",
    "vpcnet_endpoint_receive_packets_total", "vpcnet_endpoint_transmit_packets_total",
    "vpcnet_endpoint_receive_drops_total", "vpcnet_endpoint_transmit_drops_total",
    "vpcnet_datapath_repairs_total", "vpcnet_datapath_repair_loops_total",
    "vpcnet_endpoint_info", "vpcnet_docker_lookup_failures_total",
    "vpcnet_datapath_pass_duration_seconds", "vpcnet_datapath_last_success_timestamp_seconds",
    "vpcnet_route_reconcile_last_success_timestamp_seconds", "vpcnet_iptables_restore_total",
    "vpcnet_bpf_program_loads_total",
    "vpcnet_endpoint_peer_transmit_bytes_total", "vpcnet_endpoint_peer_receive_bytes_total",
    "vpcnet_endpoint_peer_transmit_packets_total", "vpcnet_endpoint_peer_receive_packets_total",
    "vpcnet_prefixes_held", "vpcnet_prefix_addresses_in_use", "vpcnet_prefix_addresses_free",
    "vpcnet_prefix_interface_capacity", "vpcnet_prefix_growth_paused", "vpcnet_prefix_calls_total",
)
#: The families served only with VPCNET_ADDRESSING=eni-prefix (the state ones by vpcnet.observability.metrics,
#: the calls once the prefix pool has made one).
PREFIX_FAMILIES = tuple(f for f in FAMILIES if f.startswith(("vpcnet_prefix_", "vpcnet_prefixes_")))

#: Kernel objects the datapath pass repairs (vpcnet.datapath.spec.Repair kinds): their series exist at 0.
REPAIR_OBJECTS = ("firewall", "link", "address", "route", "tc")


# -- event hooks ------------------------------------------------------------------------------------
def docker_call(path: str | None, status: int, seconds: float) -> None:
    """One plugin call answered (transport's dispatch). Paths vpcnet does not implement come as None and
    share one label value, so a client posting garbage cannot grow the series without bound."""
    call = path[1:] if path else "other"
    DOCKER_REQUESTS.labels(call, "ok" if status == 200 else "error").inc()
    DOCKER_DURATION.labels(call).observe(seconds)


def reconcile_pass(fine: bool, repaired: bool) -> None:
    """One route pass ended (the route keeper's loop): `repaired` when it wrote a route (the route is then
    Pending for a while: not an error), `error` when it was not `fine` (a problem other than a route in
    transition remained), else `ok`."""
    RECONCILES.labels("repaired" if repaired else "ok" if fine else "error").inc()
    RECONCILER.passed(fine)
    if fine:
        ROUTE_LAST_SUCCESS.set_to_current_time()


def datapath_pass(trigger: str, seconds: float, ok: bool) -> None:
    """One datapath pass ended (the datapath reconciler), `ok` when the kernel matched the state at its
    end (every difference repaired); `trigger`: start (a worker's first pass) or periodic."""
    DATAPATH_PASS.labels(trigger).observe(seconds)
    if ok:
        DATAPATH_LAST_SUCCESS.set_to_current_time()


def iptables_restore(family: str, ok: bool) -> None:
    """One iptables-restore (`family` ipv4) or ip6tables-restore (ipv6) run ended (the firewall)."""
    IPTABLES_RESTORES.labels(family, "ok" if ok else "failed").inc()


def bpf_program_load(name: str, ok: bool) -> None:
    """One eBPF program load ended (the loader): accepted, or refused for good."""
    BPF_LOADS.labels(BPF_PROGRAMS.get(name, "other"), "ok" if ok else "failed").inc()


def prefix_call(call: str, family: str, outcome: str) -> None:
    """One prefix assign or unassign call to the cloud ended (the prefix pool): `call` assign or unassign,
    `family` ipv4 or ipv6, `outcome` one of PREFIX_OUTCOMES (anything else counts as refused)."""
    PREFIX_CALLS.labels(call, family, outcome if outcome in PREFIX_OUTCOMES else "refused").inc()


def repair_loop(family: str, table: str) -> None:
    """The firewall found a chain it rewrites on every pass (vpcnet.datapath.firewall.RepairLoops)."""
    REPAIR_LOOPS.labels(family, table).inc()


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
        # table id -> {family ("all", "ipv4", "ipv6"): (custom entries, quota)}
        self.tables: dict[str, dict[str, tuple[int, int | None]]] = {}

    def passed(self, ok: bool) -> None:
        with self._lock:
            self.last_pass, self.last_ok = time.time(), ok

    def table_listed(self, table: str, usage: dict[str, tuple[int, int]]) -> None:
        """A full listing of `table`: per family its quota counts ("all" where one quota counts both), its
        custom entries (every owner's) and quota (0 = unknown)."""
        with self._lock:
            self.tables = {**self.tables, table: {family: (entries, quota or None)
                                                  for family, (entries, quota) in usage.items()}}

    def snapshot(self) -> tuple[float | None, bool | None, dict[str, dict[str, tuple[int, int | None]]]]:
        with self._lock:
            return self.last_pass, self.last_ok, dict(self.tables)


RECONCILER = ReconcilerState()
