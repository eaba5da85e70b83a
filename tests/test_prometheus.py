"""A real Prometheus (Debian's package, started here on a loopback port with its own config and data dir)
scrapes a real `vpcnet serve` (aliyun provider against the real emulator) while the real Docker engine
runs containers on it; everything is read back through Prometheus's HTTP API, values checked:
- every family of the contract is there;
- `vpcnet_endpoints` follows `docker run` / `docker rm`, and `vpcnet_docker_requests_total` counts them;
- a container's receive bytes grow by at least what a ping flood sent it;
- `vpcnet_route_available` drops to 0 when the route is deleted in the emulator and comes back to 1 once
  the reconciler has re-created it (`repaired` counted), with the cloud calls counted per action."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest
from conftest import require, stop_group, wait_for
from test_plugin_cloud import ME, TABLE, cloud_env, mine

from vpcnet.observability.events import FAMILIES, PREFIX_FAMILIES

SCRAPE = "1s"
PEER_FAMILIES = tuple(f for f in FAMILIES if f.startswith("vpcnet_endpoint_peer_"))
SERVICE_JOIN = """sum by (application, service, peer_application, peer_service) (
  label_replace(rate(vpcnet_endpoint_peer_transmit_bytes_total{peer!~"outside|other"}[5m]),
                "address", "$1", "peer", "(.*)")
  * on (address) group_left (peer_application, peer_service)
    label_replace(label_replace(max by (address, application, service) (vpcnet_endpoint_info),
                                "peer_application", "$1", "application", "(.*)"),
                  "peer_service", "$1", "service", "(.*)")
)"""
PING_COUNT, PING_SIZE = 1500, 1000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    def __init__(self, tmp_path, target: str):
        require(shutil.which("prometheus") is not None, "needs prometheus (Debian's prometheus package)")
        self.dir = tmp_path / "prometheus"
        self.dir.mkdir()
        (self.dir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {SCRAPE}\n  evaluation_interval: {SCRAPE}\n"
            f"scrape_configs:\n  - job_name: vpcnet\n    static_configs:\n      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={self.url[len('http://'):]}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        ready = wait_for(lambda: self._ready(), 30, step=0.2)
        assert ready, self.tail()

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.tail()
        try:
            return urllib.request.urlopen(self.url + "/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def tail(self) -> str:
        self.log.flush()
        return (self.dir / "prometheus.log").read_text()[-3000:]

    def query(self, expr: str) -> list[dict]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, wanted, seconds: float = 20.0) -> float | None:
        """Poll until `wanted(value)` (bounded); the last value."""
        def matched():
            v = self.value(expr)
            return (v,) if v is not None and wanted(v) else None     # a tuple: 0 is a value to wait for
        found = wait_for(matched, seconds, step=0.5)
        return found[0] if found else self.value(expr)

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


@pytest.fixture
def emulator():
    from test_plugin_cloud import KEY_ID, REGION, SECRET, VPC

    from vpcnet_lab.emulator import Emulator, serve_in_thread

    emu = Emulator(region=REGION, vpc_id=VPC, route_table_id=TABLE, credentials={KEY_ID: SECRET}, seed=5,
                   pending_delay=3.0)
    emu.register_instance(ME, "192.168.0.10")
    url, stop = serve_in_thread(emu)
    emu.test_url = url
    yield emu
    stop()
    emu.close()


def test_prometheus_scrapes_vpcnet_while_docker_runs_containers(emulator, plugin_factory, dock, tmp_path):
    addr = f"127.0.0.1:{_free_port()}"
    plugin = plugin_factory(cloud_env(emulator.test_url, VPCNET_METRICS_ADDR=addr, VPCNET_RECONCILE_INTERVAL="1"))
    assert wait_for(lambda: [e for e in mine(emulator) if e["Status"] == "Available"], 20), plugin.log()
    prom = Prometheus(tmp_path, addr)
    try:
        net = dock.network_create(plugin).name
        network = dock("network", "inspect", "-f", "{{.Id}}", net).stdout.strip()[:12]
        a, b, c = (dock.run_container(net).name for _ in range(3))

        count = f'vpcnet_endpoints{{network="{net}",network_id="{network}"}}'
        assert prom.wait_value(count, lambda v: v == 3) == 3
        assert prom.wait_value('vpcnet_docker_requests_total{call="NetworkDriver.CreateEndpoint",outcome="ok"}',
                               lambda v: v == 3) == 3
        assert prom.wait_value('vpcnet_docker_requests_total{call="NetworkDriver.Join",outcome="ok"}',
                               lambda v: v == 3) == 3
        dock("rm", "-f", c)
        assert prom.wait_value(count, lambda v: v == 2) == 2
        assert prom.wait_value('vpcnet_ipam_addresses_in_use', lambda v: v == 2) == 2

        # every family of the contract, through Prometheus
        names = set(json.loads(urllib.request.urlopen(prom.url + "/api/v1/label/__name__/values",
                                                      timeout=10).read())["data"])
        served = {f for f in FAMILIES if f in names or f + "_count" in names}
        # series only once containers talk: below; the prefix families only in eni-prefix addressing
        before_traffic = set(FAMILIES) - set(PEER_FAMILIES) - set(PREFIX_FAMILIES)
        assert served >= before_traffic, f"missing: {sorted(before_traffic - served)}"
        # the datapath's own work: the start pass succeeded, the network's chains were written
        assert prom.value("time() - vpcnet_datapath_last_success_timestamp_seconds") < 120
        assert prom.value("time() - vpcnet_route_reconcile_last_success_timestamp_seconds") < 120
        assert prom.value('vpcnet_iptables_restore_total{family="ipv4",outcome="ok"}') >= 1
        assert prom.value('vpcnet_iptables_restore_total{family="ipv4",outcome="failed"}') == 0
        assert prom.value(f'vpcnet_route_table_quota{{table="{TABLE}",family="all"}}') == 200
        assert prom.value(f'vpcnet_route_table_entries{{table="{TABLE}",family="all"}}') == 1

        # traffic: B's receive bytes grow by at least what the flood sent it
        endpoint = dock("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.EndpointID}}{{end}}",
                        b).stdout.strip()[:12]
        received = f'vpcnet_endpoint_receive_bytes_total{{endpoint="{endpoint}"}}'
        before = prom.wait_value(received, lambda v: True)
        assert before is not None, prom.query("vpcnet_endpoint_receive_bytes_total")
        flood = dock.exec(a, "ping", "-A", "-q", "-c", str(PING_COUNT), "-s", str(PING_SIZE), "-W", "5",
                          dock.ip_of(b), timeout=120)
        assert f"{PING_COUNT} packets transmitted" in flood.stdout, flood.stdout
        sent = PING_COUNT * (PING_SIZE + 8 + 20)      # ICMP payload + header + IPv4 header, per request
        after = prom.wait_value(received, lambda v: v - before >= sent)
        assert after - before >= sent, (before, after, sent)
        packets = prom.value(f'vpcnet_endpoint_receive_packets_total{{endpoint="{endpoint}"}}')
        assert packets >= PING_COUNT

        # who talks to whom: B received the flood from A's address, A sent it to B's, counted in the kernel
        # (VPCNET_PEER_METRICS is on by default), and the documented join names both sides
        a_ip, b_ip = dock.ip_of(a), dock.ip_of(b)
        from_a = f'vpcnet_endpoint_peer_receive_bytes_total{{endpoint="{endpoint}",peer="{a_ip}"}}'
        got = prom.wait_value(from_a, lambda v: v >= sent)
        assert got is not None and got >= sent, prom.query("vpcnet_endpoint_peer_receive_bytes_total")
        a_endpoint = dock("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.EndpointID}}{{end}}",
                          a).stdout.strip()[:12]
        to_b = f'vpcnet_endpoint_peer_transmit_packets_total{{endpoint="{a_endpoint}",peer="{b_ip}"}}'
        got = prom.wait_value(to_b, lambda v: v >= PING_COUNT)
        assert got is not None and got >= PING_COUNT, prom.query("vpcnet_endpoint_peer_transmit_packets_total")
        names = set(json.loads(urllib.request.urlopen(prom.url + "/api/v1/label/__name__/values",
                                                      timeout=10).read())["data"])
        assert set(PEER_FAMILIES) <= names, sorted(set(PEER_FAMILIES) - names)
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "monitoring.md")) as fh:
            assert SERVICE_JOIN in fh.read(), "the join below is the one docs/monitoring.md shows"
        # the join's rate over traffic that goes on while Prometheus scrapes
        dock.exec(a, "ping", "-A", "-q", "-c", "200", "-W", "5", b_ip, timeout=60)
        got = prom.wait_value(f"sum({SERVICE_JOIN})", lambda v: v > 0)
        assert got is not None and got > 0, prom.query(SERVICE_JOIN)

        # the route deleted behind vpcnet's back: 0, then repaired and 1 again
        repaired = prom.value('vpcnet_route_reconcile_total{outcome="repaired"}')
        available = "vpcnet_route_available"
        assert prom.value(available) == 1
        [entry] = mine(emulator)
        assert emulator.remove_entry(entry["RouteEntryId"])
        assert prom.wait_value(available, lambda v: v == 0) == 0
        assert prom.wait_value(available, lambda v: v == 1, seconds=30) == 1
        assert prom.value('vpcnet_route_reconcile_total{outcome="repaired"}') > repaired
        assert prom.value('sum(vpcnet_cloud_api_requests_total{provider="aliyun",action="CreateRouteEntry",'
                          'outcome="ok"})') == 2
        assert prom.value('sum(vpcnet_cloud_api_requests_total{action="DescribeRouteEntryList",outcome="ok"})') > 2
    finally:
        prom.stop()
