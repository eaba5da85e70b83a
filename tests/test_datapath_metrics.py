"""The datapath's own metrics (docs/monitoring.md): pass duration, last-success timestamps, iptables-restore
runs and eBPF program loads. Against the real kernel in namespaces the tests make: a real pass is timed and
its success recorded, a failed pass leaves the timestamp where it was and a failing iptables-restore is
counted as failed, the real verifier's refusal is a failed load; and a real `vpcnet serve` exports them."""
from __future__ import annotations

import os
import time

import pytest
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_datapath_faults import box  # noqa: F401  (a fixture: a store, the real dataplane in a namespace)
from test_dataplane import host, ns_run, spec  # noqa: F401  (host: a fixture)
from test_ebpf import kernel  # noqa: F401  (a fixture)
from test_metrics import value

from vpcnet.datapath.ebpf import assembler, loader, programs
from vpcnet.datapath.ebpf.endpoints import EndpointFacts
from vpcnet.datapath.reconciler import DatapathReconciler
from vpcnet.errors import DataplaneError
from vpcnet.observability import events as hooks
from vpcnet.state.store import Network, Store

DATAPATH_TS = "vpcnet_datapath_last_success_timestamp_seconds"
ROUTE_TS = "vpcnet_route_reconcile_last_success_timestamp_seconds"


def scrape(ns: str, url: str) -> dict[tuple[str, tuple], float]:
    """/metrics of a plugin listening on loopback in namespace `ns`, as test_metrics.scrape parses it."""
    text = ns_run(ns, "curl", "-sf", "--max-time", "10", url + "/metrics").stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def events(name: str, **labels) -> float:
    return hooks.EVENTS.get_sample_value(name, labels) or 0.0


def passes(trigger: str) -> float:
    return events("vpcnet_datapath_pass_duration_seconds_count", trigger=trigger)


def restores(outcome: str, family: str = "ipv4") -> float:
    return events("vpcnet_iptables_restore_total", family=family, outcome=outcome)


@pytest.mark.root
def test_a_real_pass_is_timed_and_its_success_recorded(box):  # noqa: F811
    s = spec(mode="routed")
    box.network(s)
    box.container(s, "10.77.3.2", "a" * 64)
    start, periodic, seconds = passes("start"), passes("periodic"), events(
        "vpcnet_datapath_pass_duration_seconds_sum", trigger="start")
    before = time.time()
    box.reconciler.reconcile()                   # this reconciler's first pass: the one a worker runs at start
    assert passes("start") == start + 1 and passes("periodic") == periodic
    assert events("vpcnet_datapath_pass_duration_seconds_sum", trigger="start") > seconds
    stamp = events(DATAPATH_TS)
    assert before <= stamp <= time.time()

    ok = restores("ok")
    assert box.reconciler.reconcile() == []      # undisturbed: read, nothing written
    assert passes("periodic") == periodic + 1 and restores("ok") == ok
    assert events(DATAPATH_TS) >= stamp

    ns_run(box.ns, "iptables", "-F", s.filter_chain)      # drift in one network's chain: one restore repairs it
    assert [r.kind for r in box.reconciler.reconcile()] == ["firewall"]
    assert restores("ok") == ok + 1
    assert passes("periodic") == periodic + 2


@pytest.mark.root
def test_a_failing_iptables_restore_is_counted_and_the_pass_is_no_success(box):  # noqa: F811
    s = spec(mode="routed")
    box.network(s)
    box.reconciler.reconcile()
    stamp, failed, ok = events(DATAPATH_TS), restores("failed"), restores("ok")
    time.sleep(0.01)
    restore, box.dp.firewall.restore_cmd = box.dp.firewall.restore_cmd, "false"   # exits 1, as a refusing restore
    ns_run(box.ns, "iptables", "-F", s.filter_chain)
    with pytest.raises(DataplaneError, match="false failed"):
        box.reconciler.reconcile()
    assert restores("failed") == failed + 3, "each of the apply's 3 attempts is one failed run"
    assert restores("ok") == ok
    assert events(DATAPATH_TS) == stamp, "a failed pass moved the last-success timestamp"
    box.dp.firewall.restore_cmd = restore
    box.reconciler.reconcile()                   # repaired now: a success again
    assert restores("ok") == ok + 1 and events(DATAPATH_TS) > stamp
    assert f"-A {s.filter_chain}" in ns_run(box.ns, "iptables", "-S", s.filter_chain).stdout


def test_a_network_left_unrepaired_is_no_success(tmp_path):
    """A pass that ends with a network it could not put right (logged as ERROR, the pass goes on) does not
    count as a success; the next one that repairs it does."""
    from fakes import FakeDataplane

    store = Store(str(tmp_path / "vpcnet.db"))
    dp = FakeDataplane()
    config = type("Config", (), {"state_dir": str(tmp_path), "datapath_interval": 30.0})()
    reconciler = DatapathReconciler(config, store, dp)
    s = spec()
    with store.tx() as db:
        store.add_network(db, Network(network_id=s.tag + "0" * 52, host_cidr=s.host_cidr,
                                      cluster_cidr=s.cluster_cidr, gateway=s.gateway, bridge=s.bridge,
                                      mtu=s.mtu, internal=s.internal, no_nat=s.no_nat, mode=s.mode))
    reconciler.reconcile()
    stamp = events(DATAPATH_TS)
    dp.networks.clear()                          # the bridge deleted behind vpcnet's back ...
    dp.fail["ensure_network"] = OSError("EBUSY")  # ... and it cannot be made again
    time.sleep(0.01)
    reconciler.reconcile()
    assert dp.unrepaired == [s.tag] and events(DATAPATH_TS) == stamp
    del dp.fail["ensure_network"]
    reconciler.reconcile()
    assert dp.unrepaired == [] and events(DATAPATH_TS) > stamp
    store.close()


def test_the_route_timestamp_moves_only_on_a_pass_without_problems():
    hooks.reconcile_pass(fine=True, repaired=False)
    stamp = events(ROUTE_TS)
    assert stamp > 0
    time.sleep(0.01)
    hooks.reconcile_pass(fine=False, repaired=False)
    assert events(ROUTE_TS) == stamp
    hooks.reconcile_pass(fine=True, repaired=True)         # wrote the route, which is now settling: fine
    assert events(ROUTE_TS) > stamp


def test_program_loads_are_counted_by_program_and_outcome(kernel):  # noqa: F811
    ok, failed = (events("vpcnet_bpf_program_loads_total", program="container", outcome=o) for o in ("ok", "failed"))
    facts = EndpointFacts()
    try:
        os.close(loader.load(programs.container_program("10.77.3.0/24", "10.77.0.0/16", facts.fd(4)), "vpcnet_ctr"))
    finally:
        facts.close()
    bad = assembler.Asm()
    bad.mov(0, 5)                                # r5 never written: the verifier refuses it
    bad.exit()
    with pytest.raises(DataplaneError, match="verifier"):
        loader.load(bad.assemble(), "vpcnet_ctr")
    assert events("vpcnet_bpf_program_loads_total", program="container", outcome="ok") == ok + 1
    assert events("vpcnet_bpf_program_loads_total", program="container", outcome="failed") == failed + 1
    other = events("vpcnet_bpf_program_loads_total", program="other", outcome="failed")
    with pytest.raises(DataplaneError):
        loader.load(bad.assemble(), "anything_else")     # any other name: one bounded label value
    assert events("vpcnet_bpf_program_loads_total", program="other", outcome="failed") == other + 1


@pytest.mark.root
@pytest.mark.parametrize("workers", [1, 2])
def test_the_plugin_exports_its_passes_and_restores(plugin_factory, host, workers):  # noqa: F811
    """`vpcnet serve` in a namespace: after its start passes (one per worker) and some periodic ones,
    /metrics has each family with the values the passes made (with 2 workers, through the multiprocess
    files: the timestamps are the newest of the workers')."""
    started = time.time()
    plugin = plugin_factory({"VPCNET_DATAPATH_INTERVAL": "0.3", "VPCNET_WORKERS": str(workers)}, netns=host)
    url = plugin.metrics_url()
    status, pool = plugin.call("/IpamDriver.RequestPool", {"Pool": ""})
    assert status == 200, pool
    nid = "d2" * 32
    status, answer = plugin.call("/NetworkDriver.CreateNetwork", {
        "NetworkID": nid, "Options": {"com.docker.network.generic": {"vpcnet.mode": "routed"}},
        "IPv4Data": [{"Pool": pool["Pool"], "Gateway": pool["Data"]["com.docker.network.gateway"]}]})
    assert status == 200, answer
    try:
        assert wait_for(lambda: (value(scrape(host, url), "vpcnet_datapath_pass_duration_seconds_count",
                                       trigger="periodic") or 0) >= 3, 10), plugin.log()
        samples = scrape(host, url)
        assert wait_for(lambda: value(scrape(host, url), "vpcnet_datapath_pass_duration_seconds_count",
                                      trigger="start") == workers, 10), plugin.log()
        samples = scrape(host, url)
        assert started < value(samples, DATAPATH_TS) <= time.time()
        assert started < value(samples, ROUTE_TS) <= time.time()
        # the host's chains at start, and the network's: written, none failed
        assert value(samples, "vpcnet_iptables_restore_total", family="ipv4", outcome="ok") >= 2
        assert value(samples, "vpcnet_iptables_restore_total", family="ipv4", outcome="failed") == 0
        assert value(samples, "vpcnet_bpf_program_loads_total", program="container", outcome="failed") == 0
        first = value(samples, DATAPATH_TS)
        assert wait_for(lambda: value(scrape(host, url), DATAPATH_TS) > first, 5), "the timestamp did not move"
    finally:
        plugin.call("/NetworkDriver.DeleteNetwork", {"NetworkID": nid})
