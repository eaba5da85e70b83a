"""The feature probe and the default mode, against the real kernel: with all of root's capabilities the
default is ebpf; a plugin started without CAP_BPF and CAP_SYS_ADMIN (setpriv drops them from its bounding
set, so BPF_PROG_LOAD really fails) falls back to routed, and says so in its log, `vpcnet status` and
`vpcnet doctor`. A failed probe is trusted for a while only; a success for the process's life."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from conftest import is_root, require, run, unique

from vpcnet.datapath import features
from vpcnet.datapath.dataplane import Dataplane
from vpcnet.errors import DataplaneError

NO_BPF = ("setpriv", "--bounding-set=-bpf,-sys_admin", "--")
POOL_REQUEST = {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "", "Options": {}, "V6": False}


@pytest.fixture
def privileged():
    require(is_root(), "needs root (veth pairs, bpf(2))")
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")


def links(ns: str | None = None) -> str:
    return run(["ip", *(["-n", ns] if ns else []), "-o", "link"]).stdout


def test_with_roots_capabilities_the_best_mode_is_ebpf_and_nothing_is_left_behind(privileged, netns_factory):
    ns = netns_factory("vpfeat")
    found = features.probe(ns, fresh=True)
    assert found == features.Features("ebpf", {})
    assert features.probe(ns) is found, "cached per process and namespace"
    assert "vpt" not in links(ns), "the probe's veth pair is deleted"
    assert features.default_mode("auto", found) == features.DefaultMode("ebpf", "auto")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_transient_load_failure_gives_routed_until_it_expires_then_ebpf_for_good(privileged, netns_factory,
                                                                                     monkeypatch, caplog):
    """One refused BPF_PROG_LOAD (memory pressure, say) must not leave this process making routed networks
    for the rest of its life: the next network create after FAILURE_TTL probes again."""
    ns = netns_factory("vpfeat")
    clock = FakeClock()
    monkeypatch.setattr(features, "CACHE", features.ProbeCache(clock=clock))
    real_load, loads = features.ebpf.load, []

    def load_failing_once(program, name):
        loads.append(name)
        if len(loads) == 1:
            raise DataplaneError(f"cannot load eBPF program {name}: Cannot allocate memory")
        return real_load(program, name)

    monkeypatch.setattr(features.ebpf, "load", load_failing_once)
    caplog.set_level("INFO", logger=features.__name__)
    dp = Dataplane(netns=ns)                       # what network create asks
    assert features.default_mode("auto", dp.features()).mode == "routed"
    clock.now += features.FAILURE_TTL - 1
    assert features.default_mode("auto", dp.features()).mode == "routed", "a failure is trusted a while"
    assert len(loads) == 1, "and not probed again meanwhile"
    clock.now += 2
    assert features.default_mode("auto", dp.features()) == features.DefaultMode("ebpf", "auto")
    assert "best mode ebpf (was routed)" in caplog.text, "the change is logged"
    probed = len(loads)
    clock.now += 10 * 365 * 86400
    assert dp.features().best == "ebpf"
    assert len(loads) == probed, "a success is never probed again"
    assert "vpt" not in links(ns)


def test_the_probe_cache_keeps_a_success_and_expires_a_failure_per_namespace(monkeypatch):
    """The cache alone (no root): answers scripted per namespace, time from a fake clock."""
    answers = {"a": [features.Features("routed", {"ebpf": "refused"}), features.Features("ebpf")],
               "b": [features.Features("ebpf")]}
    asked: list[str | None] = []

    def fake_probe(netns):
        asked.append(netns)
        return answers[netns].pop(0)

    monkeypatch.setattr(features, "_probe", fake_probe)
    clock = FakeClock()
    cache = features.ProbeCache(clock=clock, failure_ttl=60)
    assert cache.get("a").best == "routed" and cache.get("b").best == "ebpf"
    clock.now += 59.9
    assert cache.get("a").best == "routed" and asked == ["a", "b"]
    clock.now += 0.2
    assert cache.get("a").best == "ebpf" and asked == ["a", "b", "a"]
    clock.now += 10**9
    assert cache.get("a").best == "ebpf" and cache.get("b").best == "ebpf" and asked == ["a", "b", "a"]


def test_without_cap_bpf_the_probe_really_fails_to_load_and_the_best_mode_is_routed(privileged, netns_factory):
    ns = netns_factory("vpfeat")
    proc = run(["ip", "netns", "exec", ns, *NO_BPF, sys.executable, "-m", "vpcnet.datapath.features", "--json"])
    found = features.Features(**json.loads(proc.stdout))
    assert found.best == "routed"
    assert set(found.missing) == {"ebpf"}
    assert "CAP_BPF" in found.missing["ebpf"], found
    assert "vpt" not in links(ns)
    fallback = features.default_mode("auto", found)
    assert fallback.mode == "routed" and "CAP_BPF" in fallback.fallback
    assert "VPCNET_DEFAULT_MODE=routed" in fallback.fallback
    pinned = features.default_mode("ebpf", found)
    assert pinned.mode == "ebpf" and "CAP_BPF" in pinned.unsupported


def create_network(plugin, generic: dict | None = None, cluster: str = "") -> tuple[int, dict, str]:
    status, pool = plugin.call("/IpamDriver.RequestPool", {**POOL_REQUEST, "Pool": cluster})
    assert status == 200, pool
    nid = unique("fea7") + "0" * 54          # 64 lowercase hex: the form Docker makes
    status, answer = plugin.call("/NetworkDriver.CreateNetwork", {
        "NetworkID": nid, "Options": {"com.docker.network.generic": generic or {}}, "IPv6Data": [],
        "IPv4Data": [{"AddressSpace": "vpcnet-local", "Pool": pool["Pool"],
                      "Gateway": pool["Data"]["com.docker.network.gateway"]}]})
    return status, answer, nid


def status_of(plugin, ns: str) -> dict:
    proc = run(["ip", "netns", "exec", ns, sys.executable, "-m", "vpcnet.cli", "status", "--json"], env=plugin.env)
    return json.loads(proc.stdout)


def test_a_plugin_without_cap_bpf_makes_routed_networks_by_default_and_says_why(privileged, netns_factory,
                                                                                 plugin_factory):
    ns = netns_factory("vpfeat")
    plugin = plugin_factory(netns=ns, wrap=NO_BPF)
    status, answer, nid = create_network(plugin)
    assert status == 200, answer
    [net] = [n for n in status_of(plugin, ns)["networks"] if n["network_id"] == nid]
    assert net["mode"] == "routed"
    assert f"vpc-{nid[:11]}" in links(ns) and f"vpp-{nid[:11]}" in links(ns), "routed mode's anchor"
    assert "vpt" not in links(ns)
    # an explicit ebpf network is refused too, saying why and what works
    status, answer, _ = create_network(plugin, {"vpcnet.mode": "ebpf"}, "10.250.0.0/16")  # outside next_cluster()'s
    assert status == 400 and "CAP_BPF" in answer["Err"] and "-o vpcnet.mode=routed" in answer["Err"], answer

    default = status_of(plugin, ns)["default_mode"]
    assert default["mode"] == "routed" and default["setting"] == "auto" and "CAP_BPF" in default["fallback"]
    text = run(["ip", "netns", "exec", ns, sys.executable, "-m", "vpcnet.cli", "status"], env=plugin.env).stdout
    assert "default mode for new networks: routed (VPCNET_DEFAULT_MODE=auto), fell back: ebpf: " in text
    assert "networks created without -o vpcnet.mode get routed mode" in plugin.log()

    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "vpcnet.cli", "doctor", "--json"],
                          env=plugin.env, capture_output=True, text=True, timeout=120)
    [finding] = [f for f in json.loads(proc.stdout)["findings"] if f["check"] == "default_mode"]
    assert not finding["ok"] and "routed" in finding["detail"] and "CAP_BPF" in finding["detail"]
    assert "as the plugin resolved it" in finding["detail"] and "CAP_BPF" in finding["fix"]


def test_a_pinned_default_the_plugin_cannot_do_is_refused_at_network_create(privileged, netns_factory,
                                                                             plugin_factory):
    ns = netns_factory("vpfeat")
    plugin = plugin_factory({"VPCNET_DEFAULT_MODE": "ebpf"}, netns=ns, wrap=NO_BPF)
    status, answer, nid = create_network(plugin)
    assert status == 400, answer
    assert "VPCNET_DEFAULT_MODE=ebpf" in answer["Err"] and "CAP_BPF" in answer["Err"]
    assert "-o vpcnet.mode=routed" in answer["Err"]
    assert f"vpc-{nid[:11]}" not in links(ns) and status_of(plugin, ns)["networks"] == []
    assert "cannot do it" in plugin.log()


def test_the_probe_is_cheap(privileged, netns_factory):
    ns = netns_factory("vpfeat")
    started = time.monotonic()
    for _ in range(5):
        features.probe(ns, fresh=True)
    assert (time.monotonic() - started) / 5 < 0.5


def test_a_network_made_as_bridge_stays_bridge_when_the_plugin_restarts_with_the_ebpf_default(
        privileged, netns_factory, plugin_factory):
    """What an upgrade does to a host: networks created under the old default (bridge) keep their mode
    through the restart and its datapath pass; only new networks get the new default."""
    ns = netns_factory("vpfeat")
    plugin = plugin_factory({"VPCNET_DEFAULT_MODE": "bridge"}, netns=ns)      # as the old default did
    status, answer, old = create_network(plugin)
    assert status == 200, answer
    plugin.stop()
    plugin.env["VPCNET_DEFAULT_MODE"] = "auto"
    plugin.start()
    status, answer, new = create_network(plugin, {}, "10.250.0.0/16")
    assert status == 200, answer
    modes = {n["network_id"]: n["mode"] for n in status_of(plugin, ns)["networks"]}
    assert modes == {old: "bridge", new: "ebpf"}
    assert "bridge" in run(["ip", "-n", ns, "-d", "link", "show", f"vpc-{old[:11]}"]).stdout, "still a bridge"
    assert f"vpp-{new[:11]}" in links(ns), "the new one: routed mode's anchor (plus the fast path)"
