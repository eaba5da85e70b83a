"""The metrics' names (vpcnet.docker.names and the per-endpoint families) against a fake Docker engine API
served over HTTP on a real unix socket: Compose, swarm and plain containers, the labels read once per
container, an endpoint the engine does not list (retried, later named), an engine that does not answer (a
dead socket, a wedged one: the scrape never waits, the labels stay empty, the failures are counted), and the
names and series going with their endpoint. Against the real engine (docker-marked): a real Compose project
and a plain container named while scrapes come (Docker 20.10 has no Compose v2: there, a container with
Compose's labels set by hand), and the churn of 500 containers leaving no per-endpoint series behind. A
swarm service's names are checked here against the fake engine; against a real swarm (the managed plugin
built with --docker-socket, docs/monitoring.md#names) in tests/test_swarm.py."""
from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import scrape, value

from vpcnet.docker.names import MAX_RETRY, NameCache, Names, from_labels
from vpcnet.observability import metrics
from vpcnet.state.store import Endpoint, Network, Store

NET = "a1b2c3d4e5f6" + "0" * 52
EP = {kind: f"{i:012x}" + "e" * 52 for i, kind in enumerate(("compose", "swarm", "plain", "late"), 1)}
CID = {kind: f"{i:012x}" + "c" * 52 for i, kind in enumerate(EP, 1)}
LABELS = {
    "compose": {"com.docker.compose.project": "shop", "com.docker.compose.service": "web",
                "com.docker.compose.container-number": "1"},
    "swarm": {"com.docker.swarm.service.name": "pay_api", "com.docker.stack.namespace": "pay",
              "com.docker.swarm.task.id": "x"},
    "plain": {"maintainer": "someone"},
    "late": {},
}


class FakeDocker(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """GET /networks/{id} and /containers/{id}/json, as the engine answers them, for the containers in
    `attached` (endpoint kinds); every request path is recorded."""
    daemon_threads = True

    def __init__(self, path: str):
        self.attached = {"compose", "swarm", "plain"}
        self.starting: set[str] = set()       # listed as "ep-<endpoint id>", as Docker does during a start
        self.requests: list[str] = []
        super().__init__(path, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: FakeDocker

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path == f"/networks/{NET}":
            body = {"Name": "backend", "Id": NET, "Driver": "vpcnet",
                    "Containers": {(f"ep-{EP[k]}" if k in self.server.starting else CID[k]):
                                   {"Name": f"{k}-1", "EndpointID": EP[k], "IPv4Address": "10.9.1.2/24"}
                                   for k in sorted(self.server.attached)}}
        else:
            kind = next((k for k in self.server.attached if self.path == f"/containers/{CID[k]}/json"), None)
            if kind is None:
                self._send(404, {"message": f"no such object: {self.path}"})
                return
            body = {"Id": CID[kind], "Name": f"/{kind}-1", "Config": {"Labels": LABELS[kind]}}
        self._send(200, body)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def docker(tmp_path):
    server = FakeDocker(str(tmp_path / "docker.sock"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(tmp_path):
    store = Store(str(tmp_path / "vpcnet.db"))
    with store.tx() as db:
        store.add_network(db, Network(NET, "10.9.1.0/24", "10.9.0.0/16", "10.9.1.1", "vbr-a1b2c3", 1500,
                                      False, ()))
        for i, (kind, endpoint_id) in enumerate(EP.items()):
            store.add_endpoint(db, Endpoint(endpoint_id, NET, f"10.9.1.{i + 2}", "02:00:00:00:00:01",
                                            f"vh{kind}", f"vc{kind}"))
    yield store
    store.close()


def cache_for(store, path: str, **kw) -> NameCache:
    return NameCache(path, lambda: metrics._live(store), **kw)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_labels_give_service_and_application():
    assert from_labels(LABELS["compose"]) == ("web", "shop")
    assert from_labels(LABELS["swarm"]) == ("pay_api", "pay")
    assert from_labels(LABELS["plain"]) == ("", "")
    assert from_labels(None) == ("", "")
    both = {**LABELS["compose"], **LABELS["swarm"]}       # Compose's win
    assert from_labels(both) == ("web", "shop")


def test_compose_swarm_and_plain_containers_are_named(docker, store):
    cache = cache_for(store, docker.server_address)
    assert cache.names(NET, EP["compose"]) == Names()       # nothing known before a pass
    assert cache.refresh(now=0.0) == 3
    assert cache.names(NET, EP["compose"]) == Names("backend", "compose-1", "web", "shop")
    assert cache.names(NET, EP["swarm"]) == Names("backend", "swarm-1", "pay_api", "pay")
    assert cache.names(NET, EP["plain"]) == Names("backend", "plain-1", "", "")
    assert cache.names(NET, EP["late"]) == Names("backend")  # not attached on the engine (yet)
    assert cache.failures == 0

    # what /metrics shows: every per-endpoint family with the names, the info metric per address
    collector = metrics.StateCollector(store, link_stats=lambda: {f"vh{k}": COUNTERS for k in EP}, names=cache)
    got = samples(collector.traffic_text())
    web = {"network": "backend", "network_id": NET[:12], "endpoint": EP["compose"][:12], "container": "compose-1",
           "service": "web", "application": "shop"}
    for suffix, _, _ in metrics.LINK_STATS:
        assert (f"vpcnet_endpoint_{suffix}", tuple(sorted(web.items()))) in got, suffix
    info = {k[1]: v for k, v in got.items() if k[0] == "vpcnet_endpoint_info"}
    assert len(info) == 4 and set(info.values()) == {1.0}
    assert tuple(sorted({**web, "address": "10.9.1.2"}.items())) in info
    late = {"network": "backend", "network_id": NET[:12], "endpoint": EP["late"][:12], "container": "",
            "service": "", "application": "", "address": "10.9.1.5"}
    assert tuple(sorted(late.items())) in info
    families = {s.name: s for f in collector.collect() for s in f.samples}
    assert families["vpcnet_endpoints"].labels == {"network": "backend", "network_id": NET[:12]}
    assert families["vpcnet_docker_lookup_failures_total"].value == 0


def test_a_container_listed_while_docker_starts_it_is_named_on_a_later_pass(docker, store):
    """Docker lists a starting container as "ep-<endpoint id>": no labels can be read then, and the
    endpoint is not named with empty ones for good (the bug the real Compose test found): asked again."""
    docker.starting.add("compose")
    cache = cache_for(store, docker.server_address, interval=2.0)
    assert cache.refresh(now=0.0) == 2
    assert cache.names(NET, EP["compose"]) == Names("backend")
    assert not [r for r in docker.requests if "/containers/ep-" in r]
    docker.starting.clear()
    assert cache.refresh(now=2.0) == 1
    assert cache.names(NET, EP["compose"]) == Names("backend", "compose-1", "web", "shop")


COUNTERS = {"rx_bytes": 1, "tx_bytes": 2, "rx_packets": 3, "tx_packets": 4, "rx_dropped": 0, "tx_dropped": 0}


def test_labels_are_read_once_and_an_unlisted_endpoint_is_retried_less_and_less(docker, store):
    cache = cache_for(store, docker.server_address, interval=2.0)
    cache.refresh(now=0.0)
    first = list(docker.requests)
    assert sorted(first) == sorted([f"/networks/{NET}"] + [f"/containers/{CID[k]}/json"
                                                           for k in ("compose", "swarm", "plain")])
    assert cache.refresh(now=0.5) == 0 and docker.requests == first       # "late" not due yet
    assert cache.refresh(now=2.0) == 0 and docker.requests[len(first):] == [f"/networks/{NET}"]
    assert cache.refresh(now=3.9) == 0 and len(docker.requests) == len(first) + 1     # next at 2 + 4
    docker.attached.add("late")
    assert cache.refresh(now=6.0) == 1
    assert docker.requests[len(first) + 1:] == [f"/networks/{NET}", f"/containers/{CID['late']}/json"]
    assert cache.names(NET, EP["late"]) == Names("backend", "late-1", "", "")
    assert cache.refresh(now=100.0) == 0 and len(docker.requests) == len(first) + 3   # all named: no request


def test_series_and_names_go_with_the_endpoint(docker, store):
    cache = cache_for(store, docker.server_address)
    cache.refresh(now=0.0)
    collector = metrics.StateCollector(store, link_stats=lambda: {f"vh{k}": COUNTERS for k in EP}, names=cache)
    assert any(("endpoint", EP["compose"][:12]) in k[1] for k in samples(collector.traffic_text()))
    store.delete_endpoint(EP["compose"])
    cache.refresh(now=1.0)
    assert not [k for k in samples(collector.traffic_text()) if ("endpoint", EP["compose"][:12]) in k[1]]
    assert EP["compose"] in cache._names            # one pass longer, for its DeleteEndpoint's log line
    cache.refresh(now=1.5)
    assert EP["compose"] not in cache._names
    store.delete_network(NET)
    cache.refresh(now=2.0)
    cache.refresh(now=2.5)
    assert cache._names == {} and cache._networks == {} and cache._retry == {} and cache._gone == set()


def test_a_dead_socket_counts_failures_backs_off_and_leaves_names_empty(store, tmp_path):
    dead = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(dead)            # a socket file nobody listens on: connection refused
    cache = cache_for(store, dead, interval=2.0)
    started = time.monotonic()
    assert cache.refresh(now=0.0) == 0
    assert time.monotonic() - started < 1.0
    assert cache.failures == 1 and cache.names(NET, EP["compose"]) == Names()
    assert cache.refresh(now=1.0) == 0 and cache.failures == 1        # backing off: no try
    cache.refresh(now=2.0)
    assert cache.failures == 2
    cache.refresh(now=2.0 + 4.0)
    assert cache.failures == 3
    for i in range(10):
        cache.refresh(now=1000.0 * (i + 1))
    assert cache._engine_delay == MAX_RETRY
    collector = metrics.StateCollector(store, link_stats=dict, names=cache)
    families = {s.name: s for f in collector.collect() for s in f.samples}
    assert families["vpcnet_docker_lookup_failures_total"].value == 13
    assert families["vpcnet_endpoints"].labels == {"network": "", "network_id": NET[:12]}


def test_a_wedged_engine_never_delays_a_scrape(store, tmp_path):
    """The engine accepts and never answers: the background pass waits its timeout, the scrape does not."""
    path = str(tmp_path / "wedged.sock")
    wedged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wedged.bind(path)
    wedged.listen(16)
    exposition = metrics.Exposition(store, link_stats=lambda: {f"vh{k}": COUNTERS for k in EP}, docker_socket=path)
    try:
        assert exposition.names is not None
        exposition.names.timeout = 1.0
        for _ in range(5):
            started = time.monotonic()
            text = exposition.render().decode()
            assert time.monotonic() - started < 0.5, "a scrape waited on the Docker engine"
        assert 'container=""' in text and 'container="compose-1"' not in text
        deadline = time.monotonic() + 10
        while exposition.names.failures < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert exposition.names.failures >= 1
        assert "vpcnet_docker_lookup_failures_total 1.0" in exposition.render().decode()
    finally:
        exposition.close()
        wedged.close()
    assert not exposition.names._thread.is_alive()


def test_the_plugin_setting_names_the_socket(monkeypatch):
    from vpcnet.config import ConfigError, load
    from vpcnet.observability.health import docker_socket

    env = {"VPCNET_CONFIG": os.devnull}
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert docker_socket(load(environ=env, check_socket_dir=False)) == "/var/run/docker.sock"
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/other/docker.sock")
    assert docker_socket(load(environ=env, check_socket_dir=False)) == "/run/other/docker.sock"
    assert docker_socket(load(environ={**env, "VPCNET_DOCKER_SOCKET": "unix:///run/x.sock"},
                              check_socket_dir=False)) == "/run/x.sock"
    assert docker_socket(load(environ={**env, "VPCNET_DOCKER_SOCKET": "off"}, check_socket_dir=False)) == ""
    with pytest.raises(ConfigError, match="VPCNET_DOCKER_SOCKET.*absolute path"):
        load(environ={**env, "VPCNET_DOCKER_SOCKET": "tcp://1.2.3.4:2375"}, check_socket_dir=False)


POOL_REQUEST = {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "", "Options": {}, "V6": False}


def _endpoint_on(plugin) -> str:
    """The network NET and the endpoint EP["compose"] made by Docker's calls; the endpoint's address."""
    status, pool = plugin.call("/IpamDriver.RequestPool", POOL_REQUEST)
    assert status == 200, pool
    assert plugin.call("/NetworkDriver.CreateNetwork", {
        "NetworkID": NET, "Options": {"com.docker.network.generic": {}}, "IPv6Data": [],
        "IPv4Data": [{"AddressSpace": "vpcnet-local", "Pool": pool["Pool"],
                      "Gateway": pool["Data"]["com.docker.network.gateway"]}]})[0] == 200
    status, address = plugin.call("/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "",
                                                                 "Options": {}})
    assert status == 200, address
    assert plugin.call("/NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP["compose"], "Options": {},
        "Interface": {"Address": address["Address"], "AddressIPv6": "", "MacAddress": ""}})[0] == 200
    return address["Address"].split("/")[0]


def _remove(plugin) -> None:
    plugin.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP["compose"]})
    plugin.call("/NetworkDriver.DeleteNetwork", {"NetworkID": NET})


def test_a_real_plugin_names_its_series_and_log_lines(docker, plugin_factory):
    """`vpcnet serve` asking the fake engine: once the engine lists the endpoint, /metrics carries the
    names, and so does the JSON log line of each later call about the endpoint."""
    plugin = plugin_factory({"VPCNET_DOCKER_SOCKET": docker.server_address, "VPCNET_LOG_FORMAT": "json",
                             "VPCNET_LOG_LEVEL": "DEBUG"})
    url = plugin.metrics_url()
    try:
        address = _endpoint_on(plugin)
        labels = {"network": "backend", "network_id": NET[:12], "endpoint": EP["compose"][:12],
                  "container": "compose-1", "service": "web", "application": "shop"}
        assert wait_for(lambda: value(scrape(url), "vpcnet_endpoint_transmit_bytes_total", **labels) is not None,
                        10), (scrape(url), plugin.log())
        info = {k: v for k, v in scrape(url).items() if k[0] == "vpcnet_endpoint_info"}
        assert info == {("vpcnet_endpoint_info", tuple(sorted({**labels, "address": address}.items()))): 1.0}
        assert plugin.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP["compose"]})[0] == 200
        assert not [k for k in scrape(url) if ("container", "compose-1") in k[1]]
    finally:
        _remove(plugin)
    plugin.stop()
    with open(plugin.log_path, errors="replace") as fh:
        records = [json.loads(line) for line in fh.read().splitlines() if line.strip()]
    [create] = [r for r in records if r.get("call") == "NetworkDriver.CreateEndpoint"]
    assert "container" not in create            # not listed by the engine yet: ids only
    delete = [r for r in records if r.get("call") == "NetworkDriver.DeleteEndpoint"][0]
    assert (delete["network"], delete["endpoint"]) == (NET[:12], EP["compose"][:12])
    assert (delete["container"], delete["service"], delete["application"]) == ("compose-1", "web", "shop")


def test_a_real_plugin_in_service_mode_serves_sums_only(docker, plugin_factory):
    plugin = plugin_factory({"VPCNET_DOCKER_SOCKET": docker.server_address, "VPCNET_ENDPOINT_METRICS": "service"})
    url = plugin.metrics_url()
    try:
        _endpoint_on(plugin)
        labels = {"network": "backend", "network_id": NET[:12], "service": "web", "application": "shop"}
        assert wait_for(lambda: value(scrape(url), "vpcnet_endpoint_receive_bytes_total", **labels) is not None,
                        10), (scrape(url), plugin.log())
        assert not [k for k in scrape(url) if k[0].startswith("vpcnet_endpoint_") and "endpoint" in dict(k[1])]
    finally:
        _remove(plugin)


def test_service_mode_sums_per_service_and_never_goes_backwards(docker, store):
    cache = cache_for(store, docker.server_address)
    cache.refresh(now=0.0)
    stats = {f"vh{k}": {key: (i + 1) * 10 + j for j, key in enumerate(COUNTERS)} for i, k in enumerate(EP)}
    collector = metrics.StateCollector(store, link_stats=lambda: stats, names=cache, per="service")
    got = samples(collector.traffic_text())
    assert not [k for k in got if k[0] == "vpcnet_endpoint_info" or "container" in dict(k[1])]

    def sent(application: str, service: str) -> float | None:
        labels = {"network": "backend", "network_id": NET[:12], "application": application, "service": service}
        return samples(collector.traffic_text()).get(("vpcnet_endpoint_transmit_bytes_total",
                                                      tuple(sorted(labels.items()))))

    rx = list(COUNTERS).index("rx_bytes")              # what the container sent: its host end received
    assert sent("shop", "web") == 10 + rx
    assert sent("pay", "pay_api") == 20 + rx
    assert sent("", "") == (30 + rx) + (40 + rx)       # the plain one, and the one the engine does not list
    assert len({k for k in got if k[0] == "vpcnet_endpoint_transmit_bytes_total"}) == 3

    stats["vhcompose"]["rx_bytes"] += 5
    assert sent("shop", "web") == 15 + rx
    store.delete_endpoint(EP["compose"])                # the container goes: its sum stays
    assert sent("shop", "web") == 15 + rx
    docker.attached.add("late")                          # named now: it moves, and "" keeps what it had
    cache.refresh(now=100.0)
    assert cache.names(NET, EP["late"]).container == "late-1"
    assert sent("", "") == (30 + rx) + (40 + rx)
    stats["vhplain"]["rx_bytes"] += 1
    assert sent("", "") == (31 + rx) + (40 + rx)


def test_service_sums_drop_a_bucket_empty_for_an_hour():
    sums = metrics.ServiceSums()
    web, api = ("backend", "a1", "shop", "web"), ("backend", "a1", "shop", "api")
    assert sums.totals({"e1": (web, (5, 1)), "e2": (api, (7, 1))}, now=0.0) == {web: [5, 1], api: [7, 1]}
    assert sums.totals({"e2": (api, None)}, now=10.0) == {web: [5, 1], api: [7, 1]}    # e2's veth unreadable
    assert sums.totals({"e2": (api, (8, 1))}, now=20.0) == {web: [5, 1], api: [8, 1]}
    assert sums.totals({"e2": (api, (8, 1))}, now=10.0 + sums.KEEP_EMPTY) == {web: [5, 1], api: [8, 1]}
    assert sums.totals({"e2": (api, (9, 1))}, now=11.0 + sums.KEEP_EMPTY) == {api: [9, 1]}
    assert sums.totals({}, now=12.0 + sums.KEEP_EMPTY) == {api: [9, 1]}
    assert sums.departed == {api: [9, 1]} and sums.last == {}


def test_the_endpoint_metrics_setting_is_checked():
    from vpcnet.config import ConfigError, load

    env = {"VPCNET_CONFIG": os.devnull}
    assert load(environ=env, check_socket_dir=False).endpoint_metrics == "container"
    assert load(environ={**env, "VPCNET_ENDPOINT_METRICS": "Service"}, check_socket_dir=False).endpoint_metrics \
        == "service"
    with pytest.raises(ConfigError, match="VPCNET_ENDPOINT_METRICS.*container or service"):
        load(environ={**env, "VPCNET_ENDPOINT_METRICS": "pod"}, check_socket_dir=False)


# ---------------------------------------------------------------------------------- the real engine
CHURN, BATCH, THREADS = 500, 50, 8
CHURN_BUDGET = 240.0          # seconds for the whole churn (measured: see _churn_batch)


def _per_endpoint(samples: dict) -> set[tuple[str, tuple]]:
    """The series that exist per endpoint: the traffic families and vpcnet_endpoint_info."""
    return {k for k in samples if k[0].startswith("vpcnet_endpoint_") and "endpoint" in dict(k[1])}


def _churn_batch(dock, net: str, names: list[str]) -> None:
    """`docker run -d` of each name (THREADS at a time), then one `docker rm -f` of them all. Real
    `docker run`s, not plugin calls by hand: 500 of them take about 2 min on Docker 20.10 on this 2-CPU
    machine, 8 in flight (the engine serialises much of the work; more threads do not help)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(THREADS) as pool:
        runs = list(pool.map(lambda n: dock.run_container(net, name=n, check=False), names))
    failed = [(r.name, r.stderr.strip()) for r in runs if r.returncode != 0]
    assert not failed, failed[:3]


@pytest.mark.docker
def test_churn_of_500_containers_leaves_no_per_endpoint_series(plugin_factory, dock):
    """500 containers started (named by the real engine's API) and removed, in batches: the plugin's
    /metrics is back to its before state, series for series (vpcnet_endpoint_info included), and held
    every batch's endpoints while they ran. (plugin_factory before dock: the network is removed while
    the plugin still runs; the other way round Docker retries the gone plugin for about 100 s.)"""
    plugin = plugin_factory({"VPCNET_DATAPATH_INTERVAL": "30"})
    url = plugin.metrics_url()
    net = dock.network_create(plugin).name
    keeper = dock.run_container(net).name           # one that stays: its series must stay too
    assert wait_for(lambda: any(("container", keeper) in k[1] for k in _per_endpoint(scrape(url))), 20), \
        plugin.log()
    before = _per_endpoint(scrape(url))
    info_before = {k for k in before if k[0] == "vpcnet_endpoint_info"}
    assert len(info_before) == 1 and dict(next(iter(info_before))[1])["network"] == net
    started = time.monotonic()
    for batch in range(CHURN // BATCH):
        assert time.monotonic() - started < CHURN_BUDGET, f"churn over budget at batch {batch}"
        names = [f"{dock.label}-{batch}-{i}" for i in range(BATCH)]
        try:
            _churn_batch(dock, net, names)
            now = _per_endpoint(scrape(url))
            assert len({k for k in now if k[0] == "vpcnet_endpoint_info"}) == 1 + BATCH, plugin.log()[-3000:]
            assert before <= now
        finally:
            dock("rm", "-f", *names, check=False, timeout=300)
    took = time.monotonic() - started
    print(f"\nchurn: {CHURN} containers started and removed in {took:.0f} s")
    after = _per_endpoint(scrape(url))
    assert after == before, (sorted(after - before)[:5], sorted(before - after)[:5])
    status = plugin.status()
    [network] = status["networks"]
    assert len(network["endpoints"]) == 1, network["endpoints"][:3]


COMPOSE_FILE = """\
services:
  web:
    image: {image}
    pull_policy: never
    command: ["sleep", "3600"]
    labels: ["{label}"]
    networks: [{network}]
networks:
  {network}:
    external: true
"""


@pytest.mark.docker
def test_a_real_compose_project_and_a_plain_container_are_named(plugin_factory, dock, tmp_path):
    """The names from the real engine: a Compose project's container (real `docker compose up`; on Docker
    20.10, which has no Compose v2, a container carrying the labels Compose sets) and a plain one, while
    Prometheus-like scrapes come every 0.1 s, so lookups run while Docker is still starting them."""
    plugin = plugin_factory()
    url = plugin.metrics_url()
    net = dock.network_create(plugin).name
    project = dock.label.replace("vpcnet-test-", "proj")
    compose = dock("compose", "version", check=False).returncode == 0
    stop = threading.Event()

    def scrapes():
        while not stop.is_set():
            scrape(url)
            time.sleep(0.1)

    scraper = threading.Thread(target=scrapes, daemon=True)
    scraper.start()
    path = tmp_path / "compose.yml"
    try:
        if compose:
            path.write_text(COMPOSE_FILE.format(image=dock.image, label=dock.label, network=net))
            dock("compose", "-p", project, "-f", str(path), "up", "-d")
        else:
            dock.run_container(net, "--label", f"com.docker.compose.project={project}", "--label",
                               "com.docker.compose.service=web", name=f"{project}-web-1")
        plain = dock.run_container(net).name

        def info() -> dict[str, dict]:
            return {dict(k[1])["container"]: dict(k[1]) for k in scrape(url) if k[0] == "vpcnet_endpoint_info"}

        wanted = {f"{project}-web-1": ("web", project), plain: ("", "")}
        named = wait_for(lambda: {c: (i["service"], i["application"]) for c, i in info().items()} == wanted, 15)
        assert named, (info(), plugin.log()[-3000:])
        assert all(i["network"] == net for i in info().values())
    finally:
        stop.set()
        scraper.join(timeout=15)
        if compose and path.exists():
            dock("compose", "-p", project, "-f", str(path), "down", "-t", "1", check=False)
