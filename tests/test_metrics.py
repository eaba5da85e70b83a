"""Metrics and health: the outcome mapping, cloud calls counted at each provider's chokepoint (the real
emulator over HTTP, moto for AWS), the state families from a real store, and a real `vpcnet serve`:
`/metrics` values follow the calls made, per-endpoint series come and go with the veth, `/healthz` names a
failing check, the systemd watchdog is pinged only while healthy, and with two workers one process serves
every worker's counts."""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest
from aliyun_fakes import closed_port, serving_emulator
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_aws_provider import aws_env, moto_url, provider_for, vpc  # noqa: F401  (fixtures)

from vpcnet.cloud.aliyun.provider import AliyunProvider
from vpcnet.config import Config
from vpcnet.errors import Retryable, VpcnetError
from vpcnet.observability import events as event_hooks
from vpcnet.observability import health, metrics
from vpcnet.state.store import Store

POOL_REQUEST = {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "", "Options": {}, "V6": False}
NID = "a1b2c3d4e5f6" + "0" * 52
EID = "e1e2e3e4e5e6" + "1" * 52


def events(name: str, **labels) -> float:
    return event_hooks.EVENTS.get_sample_value(name, labels) or 0.0


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed with prometheus_client's own parser: (sample name, sorted labels) -> value."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def healthz(url: str) -> tuple[int, dict]:
    try:
        resp = urllib.request.urlopen(url + "/healthz", timeout=10)
        return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- units -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code, outcome", [
    ("", "ok"), ("Throttling.User", "throttled"), ("RequestLimitExceeded", "throttled"),
    ("TaskConflict", "conflict"), ("InvalidCIDRBlock.Duplicate", "conflict"),
    ("IncorrectStatus.RouteTableStatus", "conflict"), ("Forbidden.RAM", "error"), ("?", "error")])
def test_cloud_outcome_names_throttling_and_conflicts(code, outcome):
    assert event_hooks.cloud_outcome(code, None if outcome == "ok" else Exception()) == outcome


def test_metrics_addr_is_validated():
    from vpcnet import config as config_mod

    assert config_mod.load(environ={"VPCNET_CONFIG": os.devnull, "VPCNET_METRICS_ADDR": ""},
                           check_socket_dir=False).metrics_addr == ""
    assert config_mod.load(environ={"VPCNET_CONFIG": os.devnull},
                           check_socket_dir=False).metrics_addr.startswith("127.0.0.1:")
    for bad in ("9753", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(config_mod.ConfigError, match="VPCNET_METRICS_ADDR"):
            config_mod.load(environ={"VPCNET_CONFIG": os.devnull, "VPCNET_METRICS_ADDR": bad},
                            check_socket_dir=False)


def test_aliyun_calls_are_counted_by_action_and_outcome(tmp_path):
    with serving_emulator({"i-metrics": "192.168.0.10"}, route_table_id="vtb-metrics", vpc_id="vpc-metrics",
                          credentials={"k-metrics": "s-metrics-secret"}) as emu:
        cfg = Config(provider="aliyun", state_dir=str(tmp_path), aliyun_endpoint=emu.test_url,
                     aliyun_region_id="cn-emu-1", aliyun_route_table_id="vtb-metrics",
                     aliyun_instance_id="i-metrics", aliyun_access_key_id="k-metrics",
                     aliyun_access_key_secret="s-metrics-secret",
                     aliyun_metadata_url=f"http://127.0.0.1:{closed_port()}")
        provider = AliyunProvider(cfg)
        action = "DescribeRouteEntryList"
        ok0, thr0 = (events("vpcnet_cloud_api_requests_total", provider="aliyun", action=action, outcome=o)
                     for o in ("ok", "throttled"))
        count0 = events("vpcnet_cloud_api_duration_seconds_count", provider="aliyun", action=action)
        provider.list_routes()
        provider.list_routes()
        emu.set_faults(rate=1.0, codes=("Throttling",))
        with pytest.raises(Retryable):
            provider.list_routes()
        emu.set_faults(rate=0.0)
        provider.close()
    assert events("vpcnet_cloud_api_requests_total", provider="aliyun", action=action, outcome="ok") == ok0 + 2
    assert events("vpcnet_cloud_api_requests_total", provider="aliyun", action=action,
                  outcome="throttled") == thr0 + 1
    assert events("vpcnet_cloud_api_duration_seconds_count", provider="aliyun", action=action) == count0 + 3


def test_aws_calls_are_counted_through_the_botocore_hook(vpc, provider_for):  # noqa: F811
    me = vpc.instance()
    p = provider_for(vpc.config(me))
    before = events("vpcnet_cloud_api_requests_total", provider="aws", action="DescribeRouteTables", outcome="ok")
    p.list_routes()
    assert events("vpcnet_cloud_api_requests_total", provider="aws", action="DescribeRouteTables",
                  outcome="ok") == before + 1
    bad = events("vpcnet_cloud_api_requests_total", provider="aws", action="DescribeRouteTables", outcome="error")
    missing = provider_for(vpc.config(me, aws_route_table_id="rtb-00000000000000000"))
    with pytest.raises(VpcnetError):
        missing.list_routes()
    assert events("vpcnet_cloud_api_requests_total", provider="aws", action="DescribeRouteTables",
                  outcome="error") == bad + 1


def test_state_families_are_computed_from_the_store(tmp_path):
    store = Store(str(tmp_path / "vpcnet.db"))
    with store.tx() as db:
        db.execute("INSERT INTO pools(pool_id, cluster_cidr, gateway, cursor) VALUES(?,?,?,?)",
                   ("10.9.1.0/24", "10.9.0.0/16", "10.9.1.1", 0))
        for ip in ("10.9.1.2", "10.9.1.3"):
            db.execute("INSERT INTO addresses(pool_id, address) VALUES(?,?)", ("10.9.1.0/24", ip))
        db.execute("INSERT INTO pools(pool_id, cluster_cidr, gateway, cursor) VALUES(?,?,?,?)",   # an IPv6 pool
                   ("fd00:9:1:0:1::/80", "fd00:9:1::/48", "fd00:9:1:0:1::1", 2))
        db.execute("INSERT INTO addresses(pool_id, address) VALUES(?,?)", ("fd00:9:1:0:1::/80", "fd00:9:1:0:1::2"))
    store.record_claim("10.9.0.0/16", "10.9.1.0/24", route_ok=False, reason="route is Pending")
    store.record_claim("fd00:9:1::/48", "fd00:9:1:0:1::/80", route_ok=True)
    with store.tx() as db:      # what the datapath pass records (vpcnet.datapath.reconciler)
        store.set_meta(db, "datapath_repairs", '{"firewall": 3, "route": 1}')
    state = event_hooks.ReconcilerState()
    state.table_listed("vtb-x", {"all": (2, 200)})         # the route keeper, after listing a table
    state.table_listed("vtb-y", {"all": (1, 0)})           # quota unknown
    state.table_listed("rtb-z", {"ipv4": (3, 50), "ipv6": (1, 50)})   # a quota per family (AWS)
    collector = metrics.StateCollector(store, link_stats=dict, reconciler=state)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}
    assert value(samples, "vpcnet_ipam_addresses_in_use", host_cidr="10.9.1.0/24") == 2
    assert value(samples, "vpcnet_ipam_addresses_capacity", host_cidr="10.9.1.0/24") == 253
    assert value(samples, "vpcnet_ipam_addresses_in_use", host_cidr="fd00:9:1:0:1::/80") == 1
    assert value(samples, "vpcnet_ipam_addresses_capacity", host_cidr="fd00:9:1:0:1::/80") == 2 ** 48 - 2
    assert value(samples, "vpcnet_route_available", cluster_cidr="fd00:9:1::/48", host_cidr="fd00:9:1:0:1::/80") == 1
    assert value(samples, "vpcnet_route_available", cluster_cidr="10.9.0.0/16", host_cidr="10.9.1.0/24") == 0
    assert value(samples, "vpcnet_route_table_entries", table="vtb-x", family="all") == 2
    assert value(samples, "vpcnet_route_table_quota", table="vtb-x", family="all") == 200
    assert value(samples, "vpcnet_route_table_entries", table="vtb-y", family="all") == 1
    assert ("vpcnet_route_table_quota", (("family", "all"), ("table", "vtb-y"))) not in samples
    assert value(samples, "vpcnet_route_table_entries", table="rtb-z", family="ipv4") == 3
    assert value(samples, "vpcnet_route_table_entries", table="rtb-z", family="ipv6") == 1
    assert value(samples, "vpcnet_route_table_quota", table="rtb-z", family="ipv6") == 50
    assert ("vpcnet_route_table_entries", (("family", "all"), ("table", "rtb-z"))) not in samples
    assert value(samples, "vpcnet_datapath_repairs_total", object="firewall") == 3
    assert value(samples, "vpcnet_datapath_repairs_total", object="route") == 1
    assert value(samples, "vpcnet_datapath_repairs_total", object="link") == 0     # present from the start
    assert value(samples, "vpcnet_build_info", version=metrics.__version__) == 1
    store.close()


def test_sd_notify_reaches_a_datagram_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert health.sd_notify("WATCHDOG=1", {"NOTIFY_SOCKET": path})
        assert sock.recv(64) == b"WATCHDOG=1"
    assert health.watchdog_period({"WATCHDOG_USEC": "30000000", "NOTIFY_SOCKET": path}) == 30.0
    assert health.watchdog_period({"WATCHDOG_USEC": "30000000"}) == 0.0
    assert not health.sd_notify("WATCHDOG=1", {})


# -- a real plugin -----------------------------------------------------------------------------------
def _network_with_endpoint(plugin) -> str:
    status, pool = plugin.call("/IpamDriver.RequestPool", POOL_REQUEST)
    assert status == 200, pool
    gateway = pool["Data"]["com.docker.network.gateway"]
    status, answer = plugin.call("/NetworkDriver.CreateNetwork", {
        "NetworkID": NID, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "vpcnet-local", "Pool": pool["Pool"], "Gateway": gateway}], "IPv6Data": []})
    assert status == 200, answer
    status, address = plugin.call("/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "",
                                                                 "Options": {}})
    assert status == 200, address
    status, answer = plugin.call("/NetworkDriver.CreateEndpoint", {
        "NetworkID": NID, "EndpointID": EID, "Options": {},
        "Interface": {"Address": address["Address"], "AddressIPv6": "", "MacAddress": ""}})
    assert status == 200, answer
    return pool["Pool"]


def test_plugin_metrics_follow_calls_and_endpoints(plugin_factory):
    plugin = plugin_factory()
    url = plugin.metrics_url()
    for _ in range(3):
        assert plugin.call("/NetworkDriver.GetCapabilities", None)[0] == 200
    assert plugin.call("/NetworkDriver.NoSuchCall", {})[0] == 404
    samples = scrape(url)
    assert value(samples, "vpcnet_docker_requests_total", call="NetworkDriver.GetCapabilities", outcome="ok") == 3
    assert value(samples, "vpcnet_docker_requests_total", call="other", outcome="error") == 1
    assert value(samples, "vpcnet_docker_request_duration_seconds_count", call="NetworkDriver.GetCapabilities") == 3

    host_cidr = _network_with_endpoint(plugin)
    try:
        samples = scrape(url)
        assert value(samples, "vpcnet_endpoints", network="", network_id=NID[:12]) == 1
        assert value(samples, "vpcnet_ipam_addresses_in_use", host_cidr=host_cidr) == 1
        assert value(samples, "vpcnet_route_available", cluster_cidr=plugin.cluster, host_cidr=host_cidr) == 1
        assert value(samples, "vpcnet_route_reconcile_total", outcome="error") == 0
        # no Docker network of this id: the names stay empty
        received = value(samples, "vpcnet_endpoint_receive_packets_total", network="", network_id=NID[:12],
                         endpoint=EID[:12], container="", service="", application="")
        assert received is not None, "no per-endpoint series for a live veth"
        assert plugin.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})[0] == 200
        samples = scrape(url)
        assert value(samples, "vpcnet_endpoints", network="", network_id=NID[:12]) == 0
        assert not [k for k in samples if k[0].startswith("vpcnet_endpoint_") and ("endpoint", EID[:12]) in k[1]], \
            "per-endpoint series outlived the endpoint"
    finally:
        plugin.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
        plugin.call("/NetworkDriver.DeleteNetwork", {"NetworkID": NID})


def test_healthz_names_the_failing_check_and_the_watchdog_stops(plugin_factory, tmp_path):
    notify = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(notify)
        sock.settimeout(0.2)
        plugin = plugin_factory({"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "300000"})
        url = plugin.metrics_url()
        status, body = healthz(url)
        assert status == 200 and body["status"] == "ok", body
        assert set(body["checks"]) == {"socket", "store", "reconciler"}

        def got_ping() -> bool:
            try:
                return b"WATCHDOG=1" in sock.recv(64)
            except socket.timeout:
                return False
        assert wait_for(got_ping, 5), "no watchdog ping while healthy"

        os.rename(plugin.socket, plugin.socket + ".moved")     # the plugin no longer reachable by Docker
        try:
            def unhealthy():        # one answer serves /healthz for up to a second
                answer = healthz(url)
                return answer if answer[0] == 503 else None
            status, body = wait_for(unhealthy, 3) or healthz(url)
            assert status == 503 and body["failing"] == ["socket"], body
            assert "does not answer" in body["checks"]["socket"]["problem"]
            time.sleep(0.5)                                      # pings sent before the check failed
            while got_ping():
                pass
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                assert not got_ping(), "watchdog pinged while unhealthy"
        finally:
            os.rename(plugin.socket + ".moved", plugin.socket)
        assert wait_for(got_ping, 5), "watchdog pings did not resume once healthy"
        assert wait_for(lambda: healthz(url)[0] == 200, 3)


def test_two_workers_one_listener_every_worker_counted(plugin_factory):
    """Calls served by a worker that is then killed still count, and the listener moves to the worker
    that takes the reconciler over: counters never go backwards while the plugin runs."""
    import signal

    from vpcnet.observability.health import read_addr

    plugin = plugin_factory({"VPCNET_WORKERS": "2"})
    plugin.metrics_url()
    assert wait_for(lambda: plugin.log().count("Booting worker") == 2, 15), plugin.log()

    def served_by() -> list[str]:
        return [line.split("[")[2].split("]")[0] for line in plugin.log().splitlines()
                if "POST /NetworkDriver.GetCapabilities" in line and line.count("[") >= 3]

    for _ in range(10):
        assert plugin.call("/NetworkDriver.GetCapabilities", None)[0] == 200
    first = served_by()
    assert len(first) == 10, plugin.log()
    victim = first[0]           # a worker that served some of them (which one accepts is the kernel's choice)
    os.kill(int(victim), signal.SIGKILL)                # gunicorn starts another; its files stay counted
    assert wait_for(lambda: plugin.log().count("Booting worker") == 3, 15), plugin.log()
    for _ in range(10):
        assert plugin.call("/NetworkDriver.GetCapabilities", None)[0] == 200
    assert victim not in served_by()[10:], "a killed worker served the second batch?"

    def total() -> float | None:
        try:
            return value(scrape("http://" + read_addr(plugin.state_dir)), "vpcnet_docker_requests_total",
                         call="NetworkDriver.GetCapabilities", outcome="ok")
        except OSError:
            return None
    assert wait_for(lambda: total() == 20, 15), (total(), plugin.log())
    assert plugin.log().count("metrics on http://") <= 2, "more than one process bound the listener at once"


def test_a_docker_engine_that_never_answers_slows_no_plugin_call(plugin_factory, tmp_path):
    """VPCNET_DOCKER_SOCKET at a socket that takes connections and never answers: Docker's calls stay fast
    while the name lookups wait out their timeouts, the names stay empty, and the failures are counted."""
    wedged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wedged.bind(str(tmp_path / "wedged.sock"))
    wedged.listen(64)
    try:
        plugin = plugin_factory({"VPCNET_DOCKER_SOCKET": str(tmp_path / "wedged.sock")})
        url = plugin.metrics_url()
        _network_with_endpoint(plugin)
        try:
            scrape(url)                 # wakes the lookups: they now hang on the engine
            slowest = 0.0
            for _ in range(10):
                started = time.monotonic()
                status, answer = plugin.call("/NetworkDriver.Join", {
                    "NetworkID": NID, "EndpointID": EID, "SandboxKey": "/var/run/docker/netns/0123456789ab",
                    "Options": {}})
                assert status == 200, answer
                slowest = max(slowest, time.monotonic() - started)
                started = time.monotonic()
                samples = scrape(url)
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.3)
            assert slowest < 1.5, f"a call waited {slowest:.2f} s on the Docker engine (its lookups time out at 2 s)"
            labels = {"network": "", "network_id": NID[:12], "endpoint": EID[:12], "container": "", "service": "",
                      "application": ""}
            assert value(samples, "vpcnet_endpoint_receive_packets_total", **labels) is not None
            assert wait_for(lambda: (value(scrape(url), "vpcnet_docker_lookup_failures_total") or 0) >= 1, 15), \
                plugin.log()
        finally:
            plugin.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
            plugin.call("/NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    finally:
        wedged.close()


@pytest.mark.docker
def test_docker_names_every_endpoint_series_and_they_go_with_the_container(plugin_factory, dock):
    """Containers labelled as Compose and swarm make them, and a plain one, on a real engine: every
    per-endpoint family and vpcnet_endpoint_info carry the network's, container's, service's and
    application's names, and `docker rm` takes the container's series away."""
    plugin = plugin_factory()
    url = plugin.metrics_url()
    net = dock.network_create(plugin).name
    network_id = dock("network", "inspect", "-f", "{{.Id}}", net).stdout.strip()[:12]
    web = dock.run_container(net, "--label", "com.docker.compose.project=shop",
                             "--label", "com.docker.compose.service=web").name
    api = dock.run_container(net, "--label", "com.docker.swarm.service.name=pay_api",
                             "--label", "com.docker.stack.namespace=pay").name
    plain = dock.run_container(net).name
    want = {web: ("web", "shop"), api: ("pay_api", "pay"), plain: ("", "")}

    def info() -> dict[str, dict]:
        return {dict(k[1])["container"]: dict(k[1]) for k in scrape(url) if k[0] == "vpcnet_endpoint_info"}

    assert wait_for(lambda: set(want) <= set(info()), 20), (info(), plugin.log())
    seen = info()
    samples = scrape(url)
    for name, (service, application) in want.items():
        labels = seen[name]
        endpoint = dock("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.EndpointID}}{{end}}",
                        name).stdout.strip()[:12]
        assert labels == {"network": net, "network_id": network_id, "endpoint": endpoint, "container": name,
                          "service": service, "application": application, "address": dock.ip_of(name)}
        del labels["address"]
        for suffix, _, _ in metrics.LINK_STATS:
            assert value(samples, f"vpcnet_endpoint_{suffix}", **labels) is not None, (suffix, name)
    assert value(samples, "vpcnet_endpoints", network=net, network_id=network_id) == 3
    assert value(samples, "vpcnet_docker_lookup_failures_total") == 0

    dock("rm", "-f", web)
    assert wait_for(lambda: not [k for k in scrape(url) if ("container", web) in k[1]], 10), \
        "the removed container's series outlived it"
    assert set(info()) == {api, plain}
