"""eni-prefix addressing for operators: `vpcnet status`, `vpcnet doctor`'s prefix checks, the prefix metrics
and `vpcnet routes sync`, against the real embedded provider (LocalPrefixes, its JSON file in the state dir)
and a real sqlite store. The reserved-range finding against the clouds' stand-ins is in
tests/test_doctor_prefixes.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from fakes import make_config

from vpcnet.cli import status
from vpcnet.cli.doctor.cloud import CloudChecks
from vpcnet.cli.doctor.findings import Context
from vpcnet.cli.doctor.plugin import PluginChecks
from vpcnet.cli.doctor.prefixes import PrefixChecks
from vpcnet.cloud.local import LOCAL_CAPACITY_V4, LocalPrefixes
from vpcnet.config import Config, ConfigError
from vpcnet.observability import events, metrics
from vpcnet.routes import prefixes as prefixes_mod
from vpcnet.routes.prefixes import PrefixPool
from vpcnet.state.store import AssignRecord, Store

CLUSTER = "10.240.0.0/16"


class Host:
    """One host in eni-prefix addressing: its config (state dir of its own), store and pool."""

    def __init__(self, tmp_path, cluster: str = CLUSTER, **settings):
        values = {"warm_prefixes": 1, "prefix_cooldown": 30.0, **settings}
        self.config = Config(state_dir=str(tmp_path / "state"), socket=str(tmp_path / "vpcnet.sock"),
                             instance_id="h1", cluster_cidr=cluster, addressing="eni-prefix", **values)
        self.store = Store(self.config.db_path)
        self.pool = PrefixPool(self.config, self.store, LocalPrefixes(self.config))

    def use(self, count: int) -> list[str]:
        """`count` container addresses, recorded as the IPAM records them (in the take's transaction)."""
        def record(db, address: str) -> None:
            db.execute("INSERT OR IGNORE INTO pools(pool_id, cluster_cidr, gateway, cursor) VALUES(?, ?, ?, 0)",
                       (self.config.cluster_cidr, self.config.cluster_cidr, "10.240.0.1"))
            db.execute("INSERT INTO addresses(pool_id, address) VALUES(?, ?)", (self.config.cluster_cidr, address))
        return [self.pool.take_address(4, record=record).address for _ in range(count)]

    def doctor(self) -> tuple[Context, PrefixChecks]:
        ctx = Context(self.config, "/nonexistent.sock")
        PluginChecks(ctx).check_state()                 # loads the state read-only, as doctor's first check
        return ctx, PrefixChecks(ctx)

    def close(self) -> None:
        self.pool.close()
        self.store.close()


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    yield h
    h.close()


@pytest.fixture
def no_cloud(monkeypatch):
    """Makes any attempt to build a prefix provider fail the test: status and metrics read the store only."""
    def refuse(config):
        raise AssertionError("a prefix provider was made: status and metrics must not reach the cloud")
    monkeypatch.setattr(prefixes_mod, "make_prefix_provider", refuse)


def problems(findings) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in findings:
        if not f.ok:
            assert f.fix, f
            out.setdefault(f.check, []).append(f.detail + " | " + f.fix)
    return out


# -- vpcnet status ------------------------------------------------------------------------------------------
def test_status_shows_the_prefixes_addresses_and_room_per_family_from_the_store(host, no_cloud):
    host.pool.sync()
    host.use(3)
    host.pool.sync()                                    # the first /28 has 3 in use: a second is kept free
    got = status.collect(host.config)
    assert got["addressing"] == "eni-prefix" and got["host_cidrs"] == []
    pool = got["prefixes"]
    assert pool["interface_id"] == "lni-h1" and pool["instance_type"] == "local" and pool["supported"]
    (ipv4,) = pool["families"]
    assert ipv4["prefixes"] == ["10.240.0.0/28", "10.240.0.16/28"]
    assert (ipv4["addresses_in_use"], ipv4["addresses_free"], ipv4["free_prefixes"]) == (3, 11 + 16, 1)
    assert (ipv4["capacity"], ipv4["room"], ipv4["paused_until"]) == (LOCAL_CAPACITY_V4, 13, None)
    json.dumps(got)                                     # --json prints it as is
    text = status.render(got)
    assert "addressing eni-prefix, interface lni-h1 (local):" in text
    assert "IPv4: 2 prefix(es): 10.240.0.0/28, 10.240.0.16/28" in text
    assert "3 address(es) in use, 27 free, 1 prefix(es) wholly free; the interface takes 13 more (of 15)" in text
    assert "host CIDRs" not in text


def test_status_before_any_pass_and_in_route_table_mode(host, no_cloud, tmp_path):
    text = status.render(status.collect(host.config))
    assert "interface: not described yet" in text and "IPv4: 0 prefix(es)" in text and "room not known yet" in text
    route_table = host.config.replace(addressing="route-table")
    got = status.collect(route_table)
    assert got["prefixes"] is None and "host CIDRs:" in status.render(got)
    assert "eni-prefix" not in status.render(got)


def test_status_says_a_growth_pause_and_its_reason(tmp_path, no_cloud):
    host = Host(tmp_path, cluster="10.240.0.0/27", warm_prefixes=3)    # two /28s: three are refused whole
    try:
        assert 4 in host.pool.sync().paused
        (ipv4,) = status.collect(host.config)["prefixes"]["families"]
        assert ipv4["paused_until"] and "VPCNET_CLUSTER_CIDR" in ipv4["pause_reason"]
        text = status.render(status.collect(host.config))
        assert "new prefixes paused for another 12" in text          # 120 s, less the time the test took
    finally:
        host.close()


# -- metrics ----------------------------------------------------------------------------------------------------
def samples_of(collector) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}


def test_metrics_serve_the_prefix_families_in_eni_prefix_mode_only(host, no_cloud):
    host.pool.sync()
    host.use(2)
    collector = metrics.StateCollector(host.store, link_stats=dict,
                                       prefixes=metrics.prefix_status(host.config, host.store))
    samples = samples_of(collector)
    ipv4 = (("family", "ipv4"),)
    assert samples[("vpcnet_prefixes_held", ipv4)] == 1
    assert samples[("vpcnet_prefix_addresses_in_use", ipv4)] == 2
    assert samples[("vpcnet_prefix_addresses_free", ipv4)] == 12          # 16 less the range's two, less 2
    assert samples[("vpcnet_prefix_interface_capacity", ipv4)] == LOCAL_CAPACITY_V4
    assert samples[("vpcnet_prefix_growth_paused", ipv4)] == 0
    # the IPAM's pool is the range, shared by every host: its size is no capacity of this host's
    assert samples[("vpcnet_ipam_addresses_in_use", (("host_cidr", CLUSTER),))] == 2
    assert not [k for k in samples if k[0] == "vpcnet_ipam_addresses_capacity"]
    served = {name for name, _ in samples}
    assert served >= set(events.PREFIX_FAMILIES) - {"vpcnet_prefix_calls_total"}
    assert metrics.prefix_status(host.config.replace(addressing="route-table"), host.store) is None
    plain = samples_of(metrics.StateCollector(host.store, link_stats=dict))
    assert not {name for name, _ in plain} & set(events.PREFIX_FAMILIES)


def test_prefix_calls_are_counted_by_outcome(tmp_path):
    def count(call: str, outcome: str) -> float:
        return events.EVENTS.get_sample_value("vpcnet_prefix_calls_total",
                                              {"call": call, "family": "ipv4", "outcome": outcome}) or 0.0

    before = {k: count(*k) for k in (("assign", "ok"), ("assign", "no_free_prefix"), ("unassign", "ok"))}
    host = Host(tmp_path, cluster="10.240.0.0/27", warm_prefixes=1, prefix_cooldown=0.0)
    try:
        host.pool.sync()                                 # one assign of one /28
        assert count("assign", "ok") == before[("assign", "ok")] + 1
        host.pool.config = host.config.replace(warm_prefixes=3)
        host.pool._end_pause(4)
        host.pool.sync()                                 # two more do not fit in the /27
        assert count("assign", "no_free_prefix") == before[("assign", "no_free_prefix")] + 1
        paused = samples_of(metrics.StateCollector(host.store, link_stats=dict,
                                                   prefixes=metrics.prefix_status(host.config, host.store)))
        assert paused[("vpcnet_prefix_growth_paused", (("family", "ipv4"),))] == 1
        host.pool.config = host.config.replace(warm_prefixes=0)
        host.pool.sync()                                 # unused, no cooldown: given back
        assert count("unassign", "ok") == before[("unassign", "ok")] + 1
    finally:
        host.close()


# -- vpcnet doctor ----------------------------------------------------------------------------------------------
def test_doctor_is_green_on_a_host_whose_pass_ran_and_skips_the_route_findings(host):
    host.pool.sync()
    ctx, checks = host.doctor()
    findings = checks.check_reserved_ranges() + checks.check_prefix_pool()
    assert problems(findings) == {}
    details = " ".join(f.detail for f in findings)
    assert f"the cluster CIDR {CLUSTER} is the subnet's reserved IPv4 range" in details
    assert "IPv4: 1 of 15 prefix slots used, 14 address(es) free" in details
    [skipped] = CloudChecks(ctx).check_routes()
    assert skipped.ok and "skipped: eni-prefix addressing writes no route" in skipped.detail
    ctx.store.close()


def test_doctor_before_any_pass_says_so(host):
    ctx, checks = host.doctor()
    found = problems(checks.check_prefix_pool())
    assert "no prefix pass has described this host's interface yet" in found["prefixes"][0]
    assert "vpcnet routes sync" in found["prefixes"][0]
    ctx.store.close()


def test_doctor_warns_when_the_interface_is_nearly_full_and_when_it_is_full(tmp_path):
    host = Host(tmp_path, warm_prefixes=10)
    try:
        host.pool.sync()                                    # 10 of 15: fine
        ctx, checks = host.doctor()
        assert problems(checks.check_prefix_pool()) == {}
        ctx.store.close()
        LocalPrefixes(host.config).assign(4, 3, "by-hand")   # another tool's prefixes count too: 13 of 15
        host.pool.sync()
        ctx, checks = host.doctor()
        [nearly] = problems(checks.check_prefix_pool())["prefix_capacity"]
        assert "holds 13 of the 15 prefixes its instance type allows (87%)" in nearly
        ctx.store.close()
        LocalPrefixes(host.config).assign(4, 2, "by-hand-2")
        host.pool.sync()
        ctx, checks = host.doctor()
        [full] = problems(checks.check_prefix_pool())["prefix_capacity"]
        assert "holds all the prefixes its instance type allows (15)" in full and "larger instance type" in full
        ctx.store.close()
    finally:
        host.close()


def test_doctor_names_a_growth_pause_with_the_fix(tmp_path):
    host = Host(tmp_path, cluster="10.240.0.0/27", warm_prefixes=3)
    try:
        host.pool.sync()
        ctx, checks = host.doctor()
        [pause] = problems(checks.check_prefix_pool())["prefix_pause"]
        assert "IPv4: new prefixes are paused for another" in pause and "none free" in pause
        ctx.store.close()
    finally:
        host.close()


def test_doctor_names_an_assign_left_unsettled_for_several_passes(host):
    host.pool.sync()
    interval = host.config.reconcile_interval
    host.store.record_assign(AssignRecord("vpcnet-recent", "ipv4", 1, (), time.time() - interval))
    ctx, checks = host.doctor()
    assert problems(checks.check_prefix_pool()) == {}       # one pass old: the next pass settles it
    ctx.store.close()
    host.store.record_assign(AssignRecord("vpcnet-stale", "ipv4", 2, (), time.time() - 4 * interval))
    ctx, checks = host.doctor()
    [stale] = problems(checks.check_prefix_pool())["prefix_assign"]
    assert "an IPv4 assign of 2 prefix(es) sent 12" in stale and "no pass has settled it" in stale
    ctx.store.close()
    host.pool.sync()                                        # the pass settles both: nothing appeared
    ctx, checks = host.doctor()
    assert problems(checks.check_prefix_pool()) == {}
    ctx.store.close()


def test_doctor_in_route_table_mode_has_no_prefix_finding(host):
    ctx = Context(host.config.replace(addressing="route-table"), "/nonexistent.sock")
    checks = PrefixChecks(ctx)
    assert [f.ok for f in checks.check_reserved_ranges() + checks.check_prefix_pool()] == [True, True]


# -- vpcnet routes sync -----------------------------------------------------------------------------------------
def routes_sync(tmp_path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VPCNET_")}
    environ.update({"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": str(tmp_path / "state"),
                    "VPCNET_SOCKET": str(tmp_path / "vpcnet.sock"), "VPCNET_INSTANCE_ID": "h1",
                    "VPCNET_ADDRESSING": "eni-prefix", "VPCNET_CLUSTER_CIDR": CLUSTER, **env})
    return subprocess.run([sys.executable, "-m", "vpcnet.cli", "routes", "sync"], env=environ,
                          capture_output=True, text=True, timeout=60)


def test_routes_sync_runs_one_prefix_pass_and_says_what_it_did(tmp_path):
    first = routes_sync(tmp_path, VPCNET_WARM_PREFIXES="2")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[:2] == ["assigned 10.240.0.0/28", "assigned 10.240.0.16/28"]
    assert "IPv4 on lni-h1: 2 prefix(es) held, 0 address(es) in use, 30 free, room for 13 more" in lines
    assert lines[-1] == "prefixes in place (cloud calls: assign 1, capacity 1, describe 1)"
    again = routes_sync(tmp_path, VPCNET_WARM_PREFIXES="2")       # level-triggered: nothing to do
    assert again.returncode == 0 and "assigned" not in again.stdout
    store = Store(os.path.join(tmp_path, "state", "vpcnet.db"))
    try:
        assert [p.prefix for p in store.held_prefixes()] == ["10.240.0.0/28", "10.240.0.16/28"]
    finally:
        store.close()
    smaller = routes_sync(tmp_path, VPCNET_WARM_PREFIXES="1", VPCNET_PREFIX_COOLDOWN="0")
    assert smaller.returncode == 0 and "released 10.240.0.16/28" in smaller.stdout, smaller.stdout


def test_routes_sync_says_a_pause_and_exits_0(tmp_path):
    LocalPrefixes(Config(state_dir=str(tmp_path / "state"), instance_id="other", cluster_cidr="10.240.0.0/27")
                  ).assign(4, 2, "the-other-host")        # the range's two /28s are another host's
    proc = routes_sync(tmp_path, VPCNET_CLUSTER_CIDR="10.240.0.0/27", VPCNET_HOST_PREFIX="28")
    assert proc.returncode == 0, proc.stderr
    assert "IPv4: new prefixes paused:" in proc.stdout and "VPCNET_CLUSTER_CIDR" in proc.stdout


def test_status_and_doctor_of_a_dual_stack_host(tmp_path, no_cloud):
    host = Host(tmp_path, cluster_cidr_v6="fd00:10::/64")
    try:
        address = host.pool.take_address(6).address        # the host's one /80, assigned there and then
        assert address == "fd00:10::2"
        host.pool.sync()
        got = status.collect(host.config)["prefixes"]
        assert [f["version"] for f in got["families"]] == [4, 6]
        ipv6 = got["families"][1]
        assert (ipv6["prefixes"], ipv6["capacity"], ipv6["room"]) == (["fd00:10::/80"], 1, 0)
        rendered = status.render(status.collect(host.config))
        assert "IPv6: 1 prefix(es): fd00:10::/80" in rendered
        assert "0 address(es) in use, " in rendered and "0 prefix(es) wholly free" not in rendered
        assert not ipv6["short"] and not got["families"][0]["short"], "the /80 in use is no shortage"
        ctx, checks = host.doctor()
        # one /80 is all an interface holds, and its 2**48 addresses never run short: no capacity problem
        findings = checks.check_prefix_pool()
        assert problems(findings) == {}, findings
        assert "IPv6: the interface holds the 1 /80 prefix(es) it can; " in " ".join(f.detail for f in findings)
        details = [f.detail for f in checks.check_reserved_ranges()]
        assert "the cluster CIDR fd00:10::/64 is the subnet's reserved IPv6 range of type prefix" in details
        ctx.store.close()
    finally:
        host.close()


def test_doctor_runs_the_prefix_checks_and_skips_the_route_ones(tmp_path):
    """The whole `vpcnet doctor --json` in eni-prefix addressing (the kernel read only, no engine)."""
    assert routes_sync(tmp_path).returncode == 0
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VPCNET_")}
    environ.update({"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": str(tmp_path / "state"),
                    "VPCNET_SOCKET": str(tmp_path / "vpcnet.sock"), "VPCNET_INSTANCE_ID": "h1",
                    "VPCNET_ADDRESSING": "eni-prefix", "VPCNET_CLUSTER_CIDR": CLUSTER, "VPCNET_METRICS_ADDR": ""})
    proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", "doctor", "--json", "--docker-socket",
                           str(tmp_path / "no-docker.sock")], env=environ, capture_output=True, text=True,
                          timeout=120)
    report = json.loads(proc.stdout)
    by_check = {f["check"]: f for f in report["findings"]}
    assert by_check["reserved_range"]["ok"] and by_check["prefix_capacity"]["ok"], report
    assert by_check["routes"]["ok"] and "skipped: eni-prefix addressing" in by_check["routes"]["detail"]
    assert not {"route", "claim", "quota", "source_dest_check"} & set(by_check)


def test_a_reserved_26_is_a_valid_cluster_cidr_in_eni_prefix_addressing_only(tmp_path):
    """The range is no host block: VPCNET_HOST_PREFIX does not bound it, one /28 does."""
    assert make_config(tmp_path, ADDRESSING="eni-prefix", CLUSTER_CIDR="192.168.0.64/26").cluster_cidr \
        == "192.168.0.64/26"
    with pytest.raises(ConfigError, match="holds no /28 prefix"):
        make_config(tmp_path, ADDRESSING="eni-prefix", CLUSTER_CIDR="192.168.0.64/29")
    with pytest.raises(ConfigError, match="must be larger than one host block"):
        make_config(tmp_path, CLUSTER_CIDR="192.168.0.64/26")


# -- vpcnet routes list / release / gc ------------------------------------------------------------------------
def routes(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`vpcnet routes ARGS` for the Host of `tmp_path` (its state dir, instance h1, eni-prefix addressing)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VPCNET_")}
    environ.update({"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": str(tmp_path / "state"),
                    "VPCNET_SOCKET": str(tmp_path / "vpcnet.sock"), "VPCNET_INSTANCE_ID": "h1",
                    "VPCNET_ADDRESSING": "eni-prefix", "VPCNET_CLUSTER_CIDR": CLUSTER, **env})
    return subprocess.run([sys.executable, "-m", "vpcnet.cli", "routes", *args], env=environ,
                          capture_output=True, text=True, timeout=60)


def on_interface(host: Host) -> tuple[list[str], list[str]]:
    described = LocalPrefixes(host.config).describe()
    return list(described.ipv4), list(described.ipv6)


def test_routes_list_shows_the_prefixes_per_family_from_the_store(host, no_cloud, monkeypatch, capsys):
    from argparse import Namespace

    from vpcnet.routes import cli as routes_cli
    host.use(17)                                     # 14 from the first /28, 3 from a second one
    host.pool.take_address(6)                        # this host's one IPv6 /80
    assert host.pool.sync().ok
    for key, value in {"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": host.config.state_dir,
                       "VPCNET_SOCKET": host.config.socket, "VPCNET_INSTANCE_ID": "h1",
                       "VPCNET_ADDRESSING": "eni-prefix", "VPCNET_CLUSTER_CIDR": CLUSTER}.items():
        monkeypatch.setenv(key, value)
    assert routes_cli.cmd_list(Namespace(config=os.devnull, json=True)) == 0      # no_cloud: from the store only
    got = json.loads(capsys.readouterr().out)
    assert got["addressing"] == "eni-prefix" and got["interface_id"] == "lni-h1"
    v4, v6 = got["families"]
    assert [(p["prefix"], p["state"], p["addresses_in_use"]) for p in v4["prefixes"]] == [
        ("10.240.0.0/28", "held", 14), ("10.240.0.16/28", "held", 3), ("10.240.0.32/28", "held", 0)]
    assert v4["addresses_in_use"] == 17 and v4["room"] == LOCAL_CAPACITY_V4 - 3
    assert v6["version"] == 6 and [p["prefix"] for p in v6["prefixes"]] == on_interface(host)[1]
    assert routes_cli.cmd_list(Namespace(config=os.devnull, json=False)) == 0
    text = capsys.readouterr().out
    assert "addressing eni-prefix (no route is written: this host's prefixes), interface lni-h1" in text
    assert "10.240.0.16/28           held       3" in text and "\nIPv6: 1 prefix(es)" in text
    assert "route table" not in text


def test_routes_release_gives_back_every_prefix_and_refuses_while_used(host, tmp_path):
    from vpcnet.state.store import Network
    used = host.use(2)
    host.pool.take_address(6)
    assert host.pool.sync().ok
    held = [p.prefix for p in host.store.held_prefixes()]
    assert len(held) == 3 and on_interface(host) != ([], [])
    with host.store.tx() as db:                      # a network on this host takes addresses from them
        host.store.add_network(db, Network("n" * 64, CLUSTER, CLUSTER, "10.240.0.1", "vpc-nnnnnnnnnnn", 1500,
                                           False, (), addressing="eni-prefix"))
    refused = routes(tmp_path, "release")
    assert refused.returncode == 1 and "1 vpcnet network(s)" in refused.stderr and "--force" in refused.stderr
    host.store.delete_network("n" * 64)
    busy = routes(tmp_path, "release")
    assert busy.returncode == 1 and "addresses in use" in busy.stderr and "10.240.0.0/28" in busy.stderr
    assert [p.prefix for p in host.store.held_prefixes()] == held, "nothing half-started"
    assert {p.state for p in host.store.held_prefixes()} == {"held"}
    forced = routes(tmp_path, "release", "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(line.split()[1] for line in forced.stdout.splitlines() if line.startswith("released ")) \
        == sorted(held)
    assert forced.stdout.splitlines()[-1] == "released: 3 prefix(es) given back"
    assert host.store.held_prefixes() == [] and on_interface(host) == ([], []), "nothing left on the interface"
    assert used and host.pool.status().families[0].room == LOCAL_CAPACITY_V4


def test_routes_release_adopts_a_lost_assign_before_giving_everything_back(host, tmp_path):
    assert host.pool.sync().ok
    before = on_interface(host)[0]
    host.store.record_assign(AssignRecord("vpcnet-lost", "ipv4", 1, tuple(before), time.time()))
    lost = LocalPrefixes(host.config).assign(4, 1, "vpcnet-lost")      # the answer never reached the store
    proc = routes(tmp_path, "release")
    assert proc.returncode == 0, proc.stderr
    assert f"adopted {lost[0]} (an assign whose answer was lost)" in proc.stdout
    assert on_interface(host) == ([], []) and host.store.assign_records() == []


def test_a_failed_unassign_leaves_the_prefixes_releasing_and_the_next_pass_finishes(host):
    class FailingUnassign(LocalPrefixes):
        def unassign(self, version, prefixes):
            raise prefixes_mod.Retryable("the cloud is away")

    assert host.pool.sync().ok
    held = [p.prefix for p in host.store.held_prefixes()]
    failing = PrefixPool(host.config, host.store, FailingUnassign(host.config))
    result = failing.release_all()
    assert not result.ok and "the cloud is away" in result.problems[0] and result.released == []
    assert {p.state for p in host.store.held_prefixes()} == {"releasing"}
    assert host.pool.take_address(4).prefix not in held, "never handed out again (a new prefix is assigned)"
    finished = host.pool.sync()                      # the next pass gives them back
    assert finished.ok and set(held) <= set(finished.released)
    assert {p.state for p in host.store.held_prefixes()} == {"held"}, "no release left half-done"
    assert sorted(p.prefix for p in host.store.held_prefixes()) == sorted(on_interface(host)[0])


def test_routes_gc_refuses_in_eni_prefix_addressing_naming_the_right_commands(tmp_path):
    proc = routes(tmp_path, "gc", "--yes")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "does not apply in eni-prefix addressing" in proc.stderr
    assert "`vpcnet routes release`" in proc.stderr and "`vpcnet routes sync`" in proc.stderr
