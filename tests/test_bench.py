"""The benchmark harness's own logic: rr.py's clients against its server on loopback (real sockets), how
bench/run.py aggregates samples, checks the benchmark goals (bench/goals.py) and writes its Markdown
(bench/report.py), and that the default run fits its time budget. The lab runs themselves are not here:
they are benchmarks, run by hand (bench/run.py's docstring)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
sys.path.insert(0, BENCH)

import goals  # noqa: E402
import report  # noqa: E402
import rr  # noqa: E402
import run  # noqa: E402

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rr_server():
    yield from _server()


@pytest.fixture
def fresh_rr_server():
    yield from _server()


def _server():
    port, flows_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(BENCH, "rr.py"), "server", "--port", str(port),
                             "--flows-port", str(flows_port), "--max-seconds", "120"], start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", flows_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port, flows_port
    proc.kill()
    proc.wait(timeout=10)


def _rr(*args: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "rr.py"), *args], capture_output=True, text=True,
                          timeout=60)
    return run.parse_rr("test", args[0], proc.stdout, proc.stderr)


def test_rr_client_reports_round_trip_percentiles(rr_server):
    out = _rr("client", "--host", "127.0.0.1", "--port", str(rr_server[0]), "--count", "300", "--warmup", "10")
    assert out["count"] == 300
    assert 0 < out["min_us"] <= out["p50_us"] <= out["p99_us"]


def test_crr_makes_one_connection_per_request_and_the_server_closes_first(fresh_rr_server):
    rr_server = fresh_rr_server
    out = _rr("crr", "--host", "127.0.0.1", "--port", str(rr_server[0]), "--seconds", "0.3", "--warmup", "5")
    assert out["connections"] > 10
    assert out["cps"] == pytest.approx(out["connections"] / out["seconds"])
    assert 0.3 <= out["seconds"] < 5
    assert out["p50_us"] <= out["p99_us"]
    # the client took no TIME_WAIT: it closed only after the server's FIN (passive close)
    ss = subprocess.run(["ss", "-tan", "state", "time-wait", f"dport = :{rr_server[0]}"], capture_output=True,
                        text=True)
    if ss.returncode == 0:
        assert len(ss.stdout.strip().splitlines()) <= 1, ss.stdout


def test_crr_stops_at_max_count(rr_server):
    out = _rr("crr", "--host", "127.0.0.1", "--port", str(rr_server[0]), "--seconds", "30", "--max-count", "40",
              "--warmup", "0")
    assert out["connections"] == 40


def test_flows_keeps_every_connection_busy(rr_server):
    out = _rr("flows", "--host", "127.0.0.1", "--port", str(rr_server[1]), "--flows", "16", "--seconds", "0.4",
              "--warmup-seconds", "0.1")
    assert out["flows"] == 16
    assert out["transactions"] > 16
    assert out["tps"] == pytest.approx(out["transactions"] / out["seconds"])


def test_a_client_that_cannot_connect_says_so():
    with pytest.raises(RuntimeError, match="test: rr.py crr failed: ConnectionRefusedError"):
        _rr("crr", "--host", "127.0.0.1", "--port", str(_free_port()), "--seconds", "0.2")


def test_parse_rr_names_the_contender_on_garbage():
    with pytest.raises(RuntimeError, match="cross:vpcnet: rr.py flows printed no result: Traceback"):
        run.parse_rr("cross:vpcnet", "flows", "", "Traceback ...")
    assert run.parse_rr("k", "crr", 'noise\n{"cps": 5.0}\n')["cps"] == 5.0


def test_percentiles():
    p = rr.percentiles_us([i * 1000 for i in range(1, 101)])     # 1..100 µs
    assert (p["p50_us"], p["p99_us"], p["min_us"], p["mean_us"]) == (51.0, 100.0, 1.0, 50.5)
    with pytest.raises(ValueError):
        rr.percentiles_us([])


# -- aggregation and goals ------------------------------------------------------------------------
CROSS_MEDIANS = {  # metric -> contender -> median (underlay 100 / overlay 70 where higher is better)
    "tcp_1stream_bps": {"underlay": 100, "vpcnet": 98, "vpcnet-routed": 90, "overlay": 70},
    "tcp_4stream_bps": {"underlay": 100, "vpcnet": 97, "vpcnet-routed": 99, "overlay": 80},
    "udp_64b_pps": {"underlay": 100, "vpcnet": 94, "vpcnet-routed": 96, "overlay": 50},
    "rr_p50_us": {"underlay": 40, "vpcnet": 42, "vpcnet-routed": 43, "overlay": 50},
    "rr_p99_us": {"underlay": 80, "vpcnet": 89, "vpcnet-routed": 89, "overlay": 100},
    "crr_cps": {"underlay": 1000, "vpcnet": 900, "vpcnet-routed": 950, "overlay": 900},
    "flows_tps": {"underlay": 1000, "vpcnet": 950, "vpcnet-routed": 800, "overlay": 700},
}
SAME_MEDIANS = {
    "tcp_1stream_bps": {"vpcnet": 100, "vpcnet-routed": 90, "docker-bridge": 95},
    "rr_p50_us": {"vpcnet": 30, "vpcnet-routed": 30, "docker-bridge": 30},
    "container_start_s": {"vpcnet": 0.43, "vpcnet-routed": 0.40, "docker-bridge": 0.40},
}


def _samples(medians: dict) -> dict:
    out: dict = {m[0]: {} for m in run.METRICS}
    for metric, by in medians.items():
        for name, value in by.items():
            out[metric][name] = [value * 0.9, value, value * 1.2]            # median: value
    return out


def _result(cpu: dict | None = None, same: bool = True) -> dict:
    samples = {goals.CROSS: _samples(CROSS_MEDIANS), goals.SAME: _samples(SAME_MEDIANS if same else {})}
    mtu = {goals.CROSS: {n: 1500 for n in ("underlay", "vpcnet", "vpcnet-routed", "overlay")},
           goals.SAME: {n: 1500 for n in ("vpcnet", "vpcnet-routed", "docker-bridge")} if same else {}}
    meta = {"date": "2026-12-01T00:00:00+00:00", "command": "python3 bench/run.py --rounds 3", "rounds": 3,
            "duration_s": 3, "rr_count": 5000, "crr_seconds": 2, "flows": 64, "flows_seconds": 2,
            "kernel": "6.1", "cpus": 2, "docker": "28.5.2", "iperf3": "iperf 3.12", "default_mode": "ebpf",
            "loadavg_at_end": ["1.0", "1.0", "1.0"], "elapsed_s": 600}
    return run.assemble(meta, samples, mtu, cpu or {})


def _verdict(res: dict, contender: str, text: str) -> dict:
    found = [v for v in res["goals"] if v["contender"] == contender and v["goal"] == text]
    assert len(found) == 1, (contender, text)
    return found[0]


def test_assemble_keeps_cross_host_at_the_top_and_same_host_apart():
    res = _result()
    assert res["tcp_1stream_bps"]["vpcnet"]["median"] == 98
    assert res["tcp_1stream_bps"]["vpcnet"]["samples"] == pytest.approx([88.2, 98, 117.6])
    assert res["same_host"]["tcp_1stream_bps"]["docker-bridge"]["median"] == 95
    assert res["ratios"]["tcp_1stream_bps:vpcnet/underlay"] == pytest.approx(0.98)
    assert res["ratios"]["same:tcp_1stream_bps:vpcnet/docker-bridge"] == pytest.approx(100 / 95)
    assert "tcp_1stream_bps:overlay/underlay" not in res["ratios"]               # only vpcnet's ratios
    json.dumps(res)                                                              # latest.json


def test_goals_are_the_documented_bounds():
    res = _result()                         # every round has the medians' ratio: each verdict is clear-cut
    met, missed = goals.MET, goals.MISSED
    assert _verdict(res, "vpcnet", "TCP 1 stream ≥ 0.97 × underlay")["verdict"] == met        # 0.98
    assert _verdict(res, "vpcnet", "TCP 4 streams ≥ 0.97 × underlay")["verdict"] == met       # 0.97: the bound
    assert _verdict(res, "vpcnet", "UDP 64 B pps ≥ 0.95 × underlay")["verdict"] == missed     # 0.94
    assert _verdict(res, "vpcnet", "RR p50 ≤ 1.05 × underlay")["verdict"] == met              # 1.05
    assert _verdict(res, "vpcnet", "RR p99 ≤ 1.1 × underlay")["verdict"] == missed            # 1.10 + ε
    assert _verdict(res, "vpcnet", "TCP 1 stream ≥ 1.25 × overlay")["verdict"] == met         # 1.40
    assert _verdict(res, "vpcnet", "connections/s ≥ 0.9 × underlay")["verdict"] == met        # 0.90
    assert _verdict(res, "vpcnet", "connections/s > 1 × overlay")["verdict"] == missed        # equal is not ahead
    assert _verdict(res, "vpcnet-routed", "64 flows transactions/s ≥ 0.9 × underlay")["verdict"] == missed
    assert _verdict(res, "vpcnet", "same host: TCP 1 stream ≥ 1 × docker-bridge")["verdict"] == met
    assert _verdict(res, "vpcnet", "same host: RR p50 ≤ 1 × docker-bridge")["verdict"] == met  # equal latency
    assert _verdict(res, "vpcnet", "same host: docker run -d time ≤ 1.05 × docker-bridge")["verdict"] == missed
    assert _verdict(res, "vpcnet-routed", "same host: docker run -d time ≤ 1.05 × docker-bridge")["verdict"] == met


def test_a_goal_not_measured_is_neither_met_nor_missed():
    res = _result()
    v = _verdict(res, "vpcnet", "CPU ms per GB ≤ 1 × underlay")                           # no --profile
    assert v["ratio"] is None and v["verdict"] is None and v["rounds"] is None
    assert _verdict(res, "vpcnet", "same host: UDP 64 B pps ≥ 1 × docker-bridge")["verdict"] is None
    count = goals.summary(res["goals"], "vpcnet")
    assert sum(count.values()) == len(goals.GOALS) and count["not measured"] >= 2


def test_cpu_goal_uses_the_profile_totals():
    cpu = {n: {"total": t} for n, t in (("underlay", 600), ("vpcnet", 590), ("vpcnet-routed", 800),
                                        ("overlay", 900))}
    res = _result(cpu=cpu)
    assert _verdict(res, "vpcnet", "CPU ms per GB ≤ 1 × underlay")["ratio"] == pytest.approx(590 / 600)
    assert _verdict(res, "vpcnet-routed", "CPU ms per GB ≤ 1 × underlay")["ratio"] == pytest.approx(800 / 600)


def test_fastest_is_the_contender_meeting_most_goals():
    res = _result()
    counts = {n: goals.summary(res["goals"], n)[goals.MET] for n in ("vpcnet", "vpcnet-routed")}
    assert res["fastest"] == max(counts, key=counts.get)
    # a tie goes to the higher TCP 1 stream median
    tie = [{"contender": "a", "verdict": "met"}, {"contender": "b", "verdict": "met"},
           {"contender": "a", "verdict": "within noise"}]
    assert goals.fastest(tie, {"tcp_1stream_bps": {"a": {"median": 1}, "b": {"median": 2}}}) == "b"
    assert goals.fastest([], {}) is None


# -- verdicts on paired rounds: met, missed, within noise, one sample ---------------------------------
TCP1 = "TCP 1 stream ≥ 0.97 × underlay"
CPU = "CPU ms per GB ≤ 1 × underlay"


def _rounds(underlay: list[float], vpcnet: list[float], cpu: dict | None = None) -> dict:
    """A result whose only figures are per-round TCP 1 stream samples (round i of each is one round)."""
    samples: dict = {goals.CROSS: {m[0]: {} for m in run.METRICS}, goals.SAME: {m[0]: {} for m in run.METRICS}}
    samples[goals.CROSS]["tcp_1stream_bps"] = {"underlay": underlay, "vpcnet": vpcnet}
    meta = {"date": "2026-12-01T00:00:00+00:00", "command": "python3 bench/run.py", "rounds": len(vpcnet),
            "duration_s": 3, "rr_count": 5000, "kernel": "6.1", "cpus": 2, "docker": "28.5.2",
            "iperf3": "iperf 3.12", "default_mode": "ebpf"}
    mtu = {goals.CROSS: {"underlay": 1500, "vpcnet": 1500}, goals.SAME: {}}
    return run.assemble(meta, samples, mtu, cpu or {})


# the underlay swings from round to round with the machine's load; what counts is each round's pair
UNDERLAY = [100.0, 60.0, 110.0, 80.0, 95.0, 70.0, 105.0, 90.0, 65.0]


def test_overlapping_rounds_are_within_noise_even_when_the_medians_meet_the_goal():
    # medians 90 / 90 = 1.00 ≥ 0.97, but vpcnet is ahead in only 5 of 9 rounds: ranges overlap
    vpcnet = [90.0, 100.0, 65.0, 95.0, 60.0, 110.0, 70.0, 105.0, 80.0]
    v = _verdict(_rounds(UNDERLAY, vpcnet), "vpcnet", TCP1)
    assert v["ratio"] == pytest.approx(1.0)
    assert v["verdict"] == goals.NOISE and v["rounds"] == [5, 9]


def test_a_win_on_most_rounds_is_met():
    vpcnet = [u * 0.99 for u in UNDERLAY]
    vpcnet[1] = 40.0                                    # one bad round does not undo eight
    v = _verdict(_rounds(UNDERLAY, vpcnet), "vpcnet", TCP1)
    assert v["verdict"] == goals.MET and v["rounds"] == [8, 9]


def test_a_loss_on_most_rounds_is_missed():
    vpcnet = [u * 0.9 for u in UNDERLAY]
    vpcnet[0], vpcnet[4] = 120.0, 100.0                 # two lucky rounds do not make it noise
    v = _verdict(_rounds(UNDERLAY, vpcnet), "vpcnet", TCP1)
    assert v["verdict"] == goals.MISSED and v["rounds"] == [2, 9]


def test_the_medians_and_the_rounds_must_agree():
    # ahead on 6 of 9 rounds, yet the ratio of medians (88 / 90) misses the bound: not met
    vpcnet = [101.0, 61.0, 111.0, 81.0, 96.0, 71.0, 88.0, 60.0, 40.0]
    v = _verdict(_rounds(UNDERLAY, vpcnet), "vpcnet", TCP1)
    assert v["ratio"] < 0.97 and v["rounds"] == [6, 9] and v["verdict"] == goals.NOISE


def test_a_goal_on_one_sample_gets_no_verdict():
    cpu = {"underlay": {"total": 600.0}, "vpcnet": {"total": 500.0}}          # one perf run each
    res = _rounds(UNDERLAY, UNDERLAY, cpu=cpu)
    v = _verdict(res, "vpcnet", CPU)
    assert v["ratio"] == pytest.approx(500 / 600) and v["verdict"] == goals.ONE
    one_round = _verdict(_rounds([100.0], [120.0]), "vpcnet", TCP1)           # a 1-round run, likewise
    assert one_round["verdict"] == goals.ONE and one_round["rounds"] == [1, 1]


def test_several_cpu_samples_are_judged_like_rounds():
    cpu = {"underlay": {"total": 600.0, "samples": [600.0, 650.0, 580.0]},
           "vpcnet": {"total": 500.0, "samples": [500.0, 520.0, 560.0]}}
    v = _verdict(_rounds(UNDERLAY, UNDERLAY, cpu=cpu), "vpcnet", CPU)
    assert v["verdict"] == goals.MET and v["rounds"] == [3, 3]


def test_rounds_that_cannot_be_paired_are_not_a_verdict():
    v = _verdict(_rounds([100.0, 100.0, 100.0], [120.0, 120.0]), "vpcnet", TCP1)
    assert v["rounds"] is None and v["verdict"] == goals.NOISE


def test_markdown_shows_each_verdict_with_its_round_count():
    vpcnet = [90.0, 100.0, 65.0, 95.0, 60.0, 110.0, 70.0, 105.0, 80.0]
    pieces = dict.fromkeys(run.cpu_profile.ORDER, 0.0)
    res = _rounds(UNDERLAY, vpcnet, cpu={"underlay": {**pieces, "total": 600.0}, "vpcnet": {**pieces, "total": 630.0}})
    md = report.markdown(res)
    assert f"| {TCP1} | 1.00 within noise (5/9 rounds) |" in md
    assert f"| {CPU} | 1.05 one sample |" in md
    assert "`vpcnet`: 0 of 2 goals met (1 within noise, 1 on one sample); 18 not measured in this run." in md
    md = report.markdown(_rounds(UNDERLAY, [u * 0.9 for u in UNDERLAY]))
    assert f"| {TCP1} | 0.90 **no** (0/9 rounds) |" in md and "0 of 1 goals met (1 missed)" in md
    md = report.markdown(_rounds(UNDERLAY, UNDERLAY))
    assert f"| {TCP1} | 1.00 yes (9/9 rounds) |" in md and "1 of 1 goals met;" in md


def test_default_contender_comes_first():
    assert goals.vpcnet_contenders(_result())[0] == "vpcnet"
    assert not goals.is_vpcnet("overlay") and goals.is_vpcnet("vpcnet-ebpf")


# -- Markdown and docs/benchmarks.md------------------------------------------------------------------
def test_markdown_has_both_groups_the_goal_table_and_the_summary():
    md = report.markdown(_result())
    assert "Across hosts" in md and "On one host" in md
    assert "| goal | vpcnet (no -o: ebpf" in md
    assert "| TCP 1 stream ≥ 0.97 × underlay | 0.98 yes (3/3 rounds) |" in md
    assert "| UDP 64 B pps ≥ 0.95 × underlay | 0.94 **no** (0/3 rounds) |" in md
    assert "| CPU ms per GB ≤ 1 × underlay | – | – |" in md
    assert "- the default network" in md and "goals met" in md
    assert "| TCP connect + request + close (k conn/s) | 1.00 (0.90–1.20) | 0.90 (0.81–1.08) |" in md


def test_markdown_without_same_host_contenders():
    md = report.markdown(_result(same=False))
    assert "On one host" not in md and "Across hosts" in md


def test_readme_table_is_replaced_between_the_markers_only():
    text = f"intro\n{report.README_START}\nold table\n{report.README_END}\nHow to read it\n"
    new = report.replace_readme_table(text, "| new |\n")
    assert new == f"intro\n{report.README_START}\n| new |\n{report.README_END}\nHow to read it\n"
    assert report.replace_readme_table(new, "| new |\n") == new
    with pytest.raises(ValueError, match="markers"):
        report.replace_readme_table("no markers here", "x")


def test_readme_has_the_bench_table_markers():
    with open(BENCHMARKS) as fh:
        text = fh.read()
    start, end = text.find(report.README_START), text.find(report.README_END)
    assert 0 <= start < end, "docs/benchmarks.md needs both bench/run.py table markers, in order"
    assert "Benchmark " in text[start:end]


# -- time budget ----------------------------------------------------------------------------------
def _args(**kw):
    defaults = {"rounds": 9, "duration": 3, "rr_count": 5000, "crr_seconds": 2.0, "flows_seconds": 2.0,
                "no_bridge": False, "no_same_host": False, "skip_mode": [], "all_modes": False, "profile": True,
                "ipv6": False, "profile_runs": 1}
    defaults.update(kw)
    return type("Args", (), defaults)()


def test_a_default_nine_round_profiled_run_fits_in_half_an_hour():
    est = run.estimate(_args())
    assert est["contenders"] == {"cross": 6, "same": 4}          # the default's own mode is not measured twice
    assert est["total_s"] <= 30 * 60, run.estimate_text(est, 9)


def test_estimate_grows_with_what_is_measured():
    base = run.estimate(_args())["total_s"]
    assert run.estimate(_args(all_modes=True))["total_s"] > base
    assert run.estimate(_args(no_same_host=True, no_bridge=True))["total_s"] < base
    assert run.estimate(_args(rounds=18))["total_s"] > base


def test_wanted_modes_leaves_out_the_default_and_skipped_ones():
    assert run.wanted_modes(_args(), "ebpf") == ["bridge", "routed"]
    assert run.wanted_modes(_args(all_modes=True), "ebpf") == ["bridge", "routed", "ebpf"]
    assert run.wanted_modes(_args(skip_mode=["bridge"]), None) == ["routed", "ebpf"]


def test_every_contender_has_its_own_ports():
    seen = [p for group, name in run.ALL for p in run.ports(group, name)]
    assert len(seen) == len(set(seen))


# -- what a run needs, checked before it starts ----------------------------------------------------
class _Watched:
    """Stands in for the lab and perf: records any use, so a test can show that nothing ran."""

    calls: list[str] = []

    def __init__(self, *args, **kw):
        self.calls.append("Lab()")

    @classmethod
    def present(cls):
        cls.calls.append("Lab.present")
        return {}


def _no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # `import matplotlib` now fails
    monkeypatch.setattr(_Watched, "calls", [])
    monkeypatch.setattr(run, "Lab", _Watched)
    monkeypatch.setattr(run.cpu_profile, "available", lambda: _Watched.calls.append("perf") or True)
    monkeypatch.setattr(run.signal, "signal", lambda *a: _Watched.calls.append("signal"))


def test_a_run_without_matplotlib_stops_at_once_saying_how_to_get_it(monkeypatch, capsys, tmp_path):
    _no_matplotlib(monkeypatch)
    out = tmp_path / "results"
    assert run.main(["--rounds", "1", "--profile", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""                                  # not even the time estimate
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "pip install '.[bench]'" in lines[0] and "matplotlib" in lines[0], lines
    assert _Watched.calls == [] and not out.exists()


def test_no_chart_and_estimate_need_no_matplotlib(monkeypatch, capsys, tmp_path):
    _no_matplotlib(monkeypatch)
    assert run.main(["--estimate"]) == 0
    assert "pip install" not in capsys.readouterr().err
    monkeypatch.setattr(run.os, "geteuid", lambda: 0)
    monkeypatch.setattr(_Watched, "present", classmethod(lambda cls: {"netns": ["vpclab-h1"]}))
    # --no-chart gets past the check: on to the next one, a lab already up (stubbed), which stops it
    assert run.main(["--no-chart", "--out", str(tmp_path / "results")]) == 2
    assert "a vpcnet lab is already on this machine" in capsys.readouterr().err


def test_the_chart_check_agrees_with_whether_matplotlib_imports():
    """Whatever this venv holds (the test extra leaves matplotlib out), the check says what import says."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install '.[bench]'" in (report.chart_unavailable() or "")
    else:
        assert report.chart_unavailable() is None


# -- plugin_bench's goals -------------------------------------------------------------------------
def _endpoints(n: int, p99: float, rss: float) -> dict:
    return {"endpoints": n, "create_endpoint_plus_join_ms": {"p50": 1.0, "p99": p99, "max": p99},
            "rss_mb": {"idle": 60.0, f"with_{n}_endpoints": rss}}


def test_plugin_bench_goals_per_mode():
    import plugin_bench

    result = {"endpoints": {"default": _endpoints(500, 14.9, 79.0), "ebpf": _endpoints(500, 15.1, 81.0)},
              "docker_run": {"ratio_over_bridge": {"vpcnet": 1.04, "vpcnet-ebpf": 1.06}}}
    verdicts = {(g["mode"], g["goal"].split()[0]): g["met"] for g in plugin_bench.check_goals(result)}
    assert verdicts == {("default", "CreateEndpoint"): True, ("default", "plugin"): True,
                        ("ebpf", "CreateEndpoint"): False, ("ebpf", "plugin"): False,
                        ("default", "docker"): True, ("ebpf", "docker"): False}
    assert "| ebpf | plugin RSS <= 80 MB | 81.0 | **no** |" in plugin_bench.goals_markdown(result)


def test_plugin_bench_goals_need_500_endpoints():
    import plugin_bench

    goals_ = plugin_bench.check_goals({"endpoints": {"routed": _endpoints(40, 5.0, 70.0)}})
    assert [g["met"] for g in goals_] == [None, None]
    assert all("measured at 40 endpoints, not 500" in g["goal"] for g in goals_)


def test_plugin_bench_options():
    import plugin_bench

    assert plugin_bench.generic_options("default") == {}
    assert plugin_bench.generic_options("ebpf") == {"com.docker.network.generic": {"vpcnet.mode": "ebpf"}}
    assert plugin_bench._modes("ebpf, default,ebpf") == ["ebpf", "default"]
    with pytest.raises(Exception, match="fast unknown"):
        plugin_bench._modes("fast")
    assert plugin_bench._prefix_for(500) == 23 and plugin_bench._prefix_for(200) == 24


def test_summary_says_when_the_default_is_the_fastest():
    res = _result()
    res["fastest"] = "vpcnet"
    assert "- the default network (also the fastest), `vpcnet`:" in report.markdown(res)


# -- IPv6 contenders (bench/run.py --ipv6) -----------------------------------------------------------
V6_MEDIANS = {  # the IPv6 underlay at half the IPv4 one: a goal judged against the wrong family would show it
    "tcp_1stream_bps": {"underlay-v6": 50, "vpcnet-v6": 49, "overlay-v6": 30},
    "tcp_4stream_bps": {"underlay-v6": 50, "vpcnet-v6": 45, "overlay-v6": 30},
    "udp_64b_pps": {"underlay-v6": 50, "vpcnet-v6": 48},
    "rr_p50_us": {"underlay-v6": 80, "vpcnet-v6": 82},
    "crr_cps": {"underlay-v6": 500, "vpcnet-v6": 490, "overlay-v6": 400},
    "flows_tps": {"underlay-v6": 500, "vpcnet-v6": 499, "overlay-v6": 300},
}


def _v6_result(cpu: dict | None = None, not_measured: dict | None = None) -> dict:
    res = _result(cpu=cpu)
    samples = {goals.CROSS: _samples({m: {**CROSS_MEDIANS.get(m, {}), **V6_MEDIANS.get(m, {})}
                                      for m in set(CROSS_MEDIANS) | set(V6_MEDIANS)}),
               goals.SAME: _samples(SAME_MEDIANS)}
    mtu = {goals.CROSS: {n: 1500 for n in ("underlay", "vpcnet", "vpcnet-routed", "overlay", "underlay-v6",
                                           "vpcnet-v6", "overlay-v6")},
           goals.SAME: {n: 1500 for n in ("vpcnet", "vpcnet-routed", "docker-bridge")}}
    meta = {**res["meta"], "ipv6": True, **({"not_measured": not_measured} if not_measured else {})}
    return run.assemble(meta, samples, mtu, cpu or {})


def test_ipv6_contenders_are_judged_against_the_ipv6_baselines():
    res = _v6_result()
    assert res["ratios"]["tcp_1stream_bps:vpcnet-v6/underlay-v6"] == pytest.approx(49 / 50)
    assert res["ratios"]["tcp_1stream_bps:vpcnet-v6/overlay-v6"] == pytest.approx(49 / 30)
    assert not [k for k in res["ratios"] if k.endswith("/underlay") and "-v6" in k]    # never across families
    assert "tcp_1stream_bps:vpcnet/underlay-v6" not in res["ratios"]
    v = _verdict(res, "vpcnet-v6", TCP1)
    assert v["versus"] == "underlay-v6" and v["ratio"] == pytest.approx(0.98) and v["verdict"] == goals.MET
    assert v["rounds"] == [3, 3] and v["spread"] == pytest.approx([0.98, 0.98])
    assert _verdict(res, "vpcnet-v6", "TCP 4 streams ≥ 0.97 × underlay")["verdict"] == goals.MISSED   # 0.90
    assert _verdict(res, "vpcnet-v6", "UDP 64 B pps ≥ 0.95 × underlay")["ratio"] == pytest.approx(0.96)
    assert _verdict(res, "vpcnet-v6", "RR p50 ≤ 1.05 × underlay")["ratio"] == pytest.approx(82 / 80)
    assert _verdict(res, "vpcnet-v6", "TCP 1 stream ≥ 1.25 × overlay")["versus"] == "overlay-v6"
    # the IPv4 default keeps its IPv4 baselines
    assert _verdict(res, "vpcnet", TCP1)["versus"] == "underlay"
    assert _verdict(res, "vpcnet", TCP1)["ratio"] == pytest.approx(0.98)
    assert goals.vpcnet_contenders(res) == ["vpcnet", "vpcnet-routed", "vpcnet-v6"]
    assert goals.baseline("underlay", "vpcnet-v6") == "underlay-v6"
    assert goals.baseline("underlay-v6", "vpcnet-v6") == "underlay-v6"
    assert goals.baseline("docker-bridge", "vpcnet-routed") == "docker-bridge"


def test_the_fastest_mode_is_an_ipv4_one():
    verdicts = [{"contender": "vpcnet-v6", "verdict": "met"}, {"contender": "vpcnet-v6", "verdict": "met"},
                {"contender": "vpcnet", "verdict": "met"}]
    tcp = {"tcp_1stream_bps": {"vpcnet": {"median": 1}, "vpcnet-v6": {"median": 2}}}
    assert goals.fastest(verdicts, tcp) == "vpcnet"
    assert goals.fastest([{"contender": "vpcnet-v6", "verdict": "met"}], tcp) is None


def test_the_spread_is_the_paired_rounds_ratios():
    vpcnet = [90.0, 100.0, 65.0, 95.0, 60.0, 110.0, 70.0, 105.0, 80.0]
    v = _verdict(_rounds(UNDERLAY, vpcnet), "vpcnet", TCP1)
    each = [x / y for x, y in zip(vpcnet, UNDERLAY, strict=True)]
    assert v["spread"] == pytest.approx([min(each), max(each)])
    assert _verdict(_rounds([100.0], [120.0]), "vpcnet", TCP1)["spread"] is None        # one pair: no spread


def test_markdown_shows_ipv6_in_a_table_of_its_own_and_what_was_left_out():
    why = "fd00:250::2 on h1 got no reply from fd00:250::3 on h2 within 30 s"
    md = report.markdown(_v6_result(not_measured={"overlay-v6": why}))
    ipv4, _, rest = md.partition("Across hosts over IPv6")
    assert "| metric | underlay | vpcnet | vpcnet-routed | overlay |" in ipv4 and "-v6" not in ipv4.split("\n\n")[2]
    assert "| metric | underlay-v6 | vpcnet-v6 | overlay-v6 |" in rest
    assert "| TCP request-response p50 (µs) | 80.0 (72.0–96.0) | 82.0 (73.8–98.4) | – |" in rest
    assert f"Not measured: `overlay-v6`: {why}" in md
    md = report.markdown(_v6_result(not_measured={"overlay-v6": "exited 125: deadline\n\nRun 'docker run --help'"}))
    assert "Not measured: `overlay-v6`: exited 125: deadline Run 'docker run --help'\n" in md
    assert "| vpcnet-v6/underlay-v6 | vpcnet-v6/overlay-v6 |" in md
    assert "| goal | vpcnet (no -o: ebpf, fastest) | vpcnet-routed | vpcnet-v6 |" in md
    assert ("| TCP 1 stream ≥ 0.97 × underlay | 0.98 yes (3/3 rounds) | 0.90 **no** (0/3 rounds) "
            "| 0.98 yes (3/3 rounds) |") in md
    assert "against the baseline over IPv6" in md
    assert "- the default network over IPv6, `vpcnet-v6`:" in md
    assert "Across hosts over IPv6" not in report.markdown(_result())       # an IPv4 run reads as before


def test_cpu_profile_groups_ipv6_symbols_like_ipv4_ones():
    group = run.cpu_profile.group_of
    for v4, v6 in (("ip_forward", "ip6_forward"), ("ip_rcv", "ipv6_rcv"), ("fib_table_lookup", "fib6_table_lookup"),
                   ("ip_finish_output2", "ip6_finish_output2"), ("ipt_do_table", "ip6t_do_table"),
                   ("arp_process", "ndisc_rcv"), ("icmp_rcv", "icmpv6_rcv"), ("rt_dst_alloc", "rt6_lookup"),
                   ("tcp_v4_rcv", "tcp_v6_rcv")):
        assert group(v6) == group(v4) != "other", (v4, v6)


def test_several_profile_runs_give_the_cpu_goal_a_verdict():
    pieces = dict.fromkeys(run.cpu_profile.ORDER, 0.0)
    def runs(*totals):
        return [{**pieces, "tcp": t * 0.5, "copy": t * 0.5, "total": t} for t in totals]
    under = run.cpu_profile.median_of(runs(600, 700, 650))
    assert under["total"] == 650 and under["samples"] == [600, 700, 650] and under["tcp"] == 325
    mine = run.cpu_profile.median_of(runs(590, 690, 640))
    res = _rounds(UNDERLAY, UNDERLAY, cpu={"underlay": under, "vpcnet": mine})
    v = _verdict(res, "vpcnet", CPU)
    assert v["verdict"] == goals.MET and v["rounds"] == [3, 3]
    assert v["spread"] == pytest.approx([590 / 600, 690 / 700])
    md = report.markdown(res)
    assert "3 runs per contender" in md and "| total, min–max | 600–700 | 590–690 |" in md
    with pytest.raises(ValueError):
        run.cpu_profile.median_of([])


def test_ipv6_contenders_in_the_estimate():
    base = run.estimate(_args())
    v6 = run.estimate(_args(ipv6=True))
    assert v6["contenders"] == {"cross": base["contenders"]["cross"] + 3, "same": base["contenders"]["same"]}
    assert v6["total_s"] > base["total_s"] and v6["profile_s"] > base["profile_s"]
    assert run.estimate(_args(profile_runs=3))["profile_s"] == pytest.approx(3 * base["profile_s"])
    seen = [p for group, name in run.ALL for p in run.ports(group, name)]
    assert len(seen) == len(set(seen)) and (goals.CROSS, "vpcnet-v6") in run.ALL


class _Lab(_Watched):
    """A lab that records how it was asked for and fails to come up, so main() stops right after."""

    made: list[dict] = []

    def __init__(self, *args, **kw):
        self.made.append(kw)

    def up(self):
        raise run.LabError("not in a unit test")

    def down(self):
        return []


@pytest.mark.parametrize("flags, ipv6", [([], False), (["--ipv6"], True)])
def test_ipv6_brings_the_lab_up_dual_stack(monkeypatch, capsys, tmp_path, flags, ipv6):
    monkeypatch.setattr(run, "Lab", _Lab)
    monkeypatch.setattr(_Lab, "made", [])
    monkeypatch.setattr(run.os, "geteuid", lambda: 0)
    monkeypatch.setattr(run.signal, "signal", lambda *a: None)
    assert run.main(["--no-chart", "--rounds", "1", "--out", str(tmp_path), *flags]) == 1
    assert [kw.get("ipv6") for kw in _Lab.made] == [ipv6]
    assert "bench failed: not in a unit test" in capsys.readouterr().err


def test_profile_runs_are_checked_before_anything_starts(monkeypatch, capsys):
    _no_matplotlib(monkeypatch)
    assert run.main(["--profile-runs", "3", "--no-chart"]) == 2                # without --profile
    assert run.main(["--profile", "--profile-runs", "0", "--no-chart"]) == 2
    assert "--profile-runs 1..20" in capsys.readouterr().err and _Watched.calls == []
    assert run.main(["--estimate", "--ipv6", "--profile", "--profile-runs", "3"]) == 0
    assert "9 cross-host + 4 same-host contenders" in capsys.readouterr().out


class _RefusingLab:
    """A lab whose engine refuses the dual-stack overlay: records every docker call."""

    def __init__(self):
        self.calls: list[tuple] = []

    def docker(self, k, *args, check=True, timeout=120):
        self.calls.append((k, *args))
        return subprocess.CompletedProcess(args, 1, "", "Error response from daemon: IPv6 not supported\n")


def test_an_overlay_refusing_ipv6_is_left_out_saying_why():
    lab = _RefusingLab()
    bench = run.Bench(lab, _args(ipv6=True))
    bench.overlay_v6()
    assert bench.contenders == []
    assert bench.not_measured == {"overlay-v6": "`docker network create -d overlay --ipv6 --subnet fd00:250::/64` "
                                                "refused: Error response from daemon: IPv6 not supported"}
    assert [c[1:3] for c in lab.calls] == [("network", "create")]          # nothing else made, nothing to remove


def test_reachable_pings_an_ipv6_peer_in_its_namespace(netns_factory):
    """The check each contender passes before it is measured (and overlay-v6 must pass to be measured at
    all), over IPv6 between two real namespaces: the peer answers, an address nobody holds does not."""
    a, b = netns_factory("bv6a"), netns_factory("bv6b")
    subprocess.run(["ip", "-n", a, "link", "add", "v6a", "type", "veth", "peer", "name", "v6b", "netns", b],
                   check=True)
    for ns, dev, addr in ((a, "v6a", "fd00:be::1/64"), (b, "v6b", "fd00:be::2/64")):
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev, "nodad"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    client = run.Endpoint(f"/run/netns/{a}", "", "v6a", "fd00:be::1")
    server = run.Endpoint(f"/run/netns/{b}", "", "v6b", "fd00:be::2")
    bench = run.Bench(None, _args(ipv6=True))
    assert bench.reachable(run.Contender(goals.CROSS, "underlay-v6", client, server, "fd00:be::2", None), 10)
    started = time.monotonic()
    assert not bench.reachable(run.Contender(goals.CROSS, "underlay-v6", client, server, "fd00:be::3", None), 1.5)
    assert time.monotonic() - started < 10
    assert client.mtu() == 1500


class _SameAddressLab(_RefusingLab):
    """An engine pair that creates the overlay, gives both containers the same IPv6 address and fails
    `docker run --ip6` on it as Docker 20.10 did in the lab."""

    def docker(self, k, *args, check=True, timeout=120):
        self.calls.append((k, *args))
        if args[0] == "run" and "--ip6" in args:
            raise run.LabError("docker run ... exited 125: attaching to network failed: context deadline exceeded")
        out = {"inspect": "4242\n" if "{{.State.Pid}}" in args else "10.0.250.2 fd00:250::2\n"}.get(args[0], "")
        return subprocess.CompletedProcess(args, 0, out, "")


def test_an_overlay_giving_both_containers_one_ipv6_address_is_left_out():
    lab = _SameAddressLab()
    bench = run.Bench(lab, _args(ipv6=True))
    bench.overlay_v6()
    assert bench.contenders == []
    why = bench.not_measured["overlay-v6"]
    assert why == ("both containers on ov6 got the same IPv6 address fd00:250::2, and `docker run --ip6 "
                   "fd00:250::a2` on h2 failed: docker run ... exited 125: attaching to network failed: context "
                   "deadline exceeded")
    runs = [c for c in lab.calls if c[1] == "run"]
    assert [(c[0], "--ip6" in c) for c in runs] == [(1, False), (2, False), (2, True)]
    assert (1, "rm", "-f", "bench-ov6-1") in lab.calls and (2, "rm", "-f", "bench-ov6-2") in lab.calls
    assert lab.calls[-1] == (1, "network", "rm", "ov6")                # nothing of it left behind


class _UnattachableLab(_RefusingLab):
    """Creates the overlay, but its engine fails the container's attachment, saying why only in its log."""

    def __init__(self, log: str):
        super().__init__()
        self.paths = type("Paths", (), {"engine_log": log})()

    def host(self, k):
        return self

    def docker(self, k, *args, check=True, timeout=120):
        self.calls.append((k, *args))
        if args[0] == "run":
            raise run.LabError("docker run ... exited 125: attaching to network failed, make sure your network "
                               "options are correct and check manager logs: context deadline exceeded")
        return subprocess.CompletedProcess(args, 0, "", "")


def test_an_overlay_attachment_failure_is_explained_from_the_engine_log(tmp_path):
    log = tmp_path / "dockerd.log"
    log.write_text('time="x" level=info msg="loading plugin"\n'
                   'time="x" level=error msg="fatal task error" error="Invalid address fd00:250::2: It does not '
                   'belong to any of this network\'s subnets" module=node/agent/taskmanager\n')
    bench = run.Bench(_UnattachableLab(str(log)), _args(ipv6=True))
    bench.overlay_v6()
    assert bench.contenders == []
    assert bench.not_measured["overlay-v6"].endswith(
        "context deadline exceeded (h1's engine log: fatal task error: Invalid address fd00:250::2: It does not "
        "belong to any of this network's subnets)")
    assert bench.task_errors(2) and not run.Bench(_UnattachableLab(str(tmp_path / "none")), None).task_errors(1)


# -- eni-prefix addressing (bench/run.py --addressing eni-prefix) ------------------------------------
def _eni_result(ipv6: bool = False) -> dict:
    """An eni-prefix run's figures: the route-table ones with `vpcnet` named `vpcnet-eni`, no explicit mode."""
    def renamed(medians: dict) -> dict:
        return {m: {{"vpcnet": "vpcnet-eni", "vpcnet-v6": "vpcnet-eni-v6"}.get(n, n): v for n, v in by.items()
                    if n != "vpcnet-routed"} for m, by in medians.items()}
    cross = {m: {**CROSS_MEDIANS.get(m, {}), **(V6_MEDIANS.get(m, {}) if ipv6 else {})}
             for m in set(CROSS_MEDIANS) | set(V6_MEDIANS)}
    samples = {goals.CROSS: _samples(renamed(cross)), goals.SAME: _samples(renamed(SAME_MEDIANS))}
    names = ("underlay", "vpcnet-eni", "overlay") + (("underlay-v6", "vpcnet-eni-v6", "overlay-v6") if ipv6 else ())
    mtu = {goals.CROSS: dict.fromkeys(names, 1500), goals.SAME: dict.fromkeys(("vpcnet-eni", "docker-bridge"), 1500)}
    meta = {**_result()["meta"], "addressing": "eni-prefix", "ipv6": ipv6,
            "not_measured": {"vpcnet-routed": "a host has one vpcnet network per range"}}
    return run.assemble(meta, samples, mtu, {})


def test_eni_prefix_default_network_is_held_to_the_default_s_goals():
    res = _eni_result(ipv6=True)
    assert goals.vpcnet_contenders(res) == ["vpcnet-eni", "vpcnet-eni-v6"]
    assert goals.is_default("vpcnet-eni") and not goals.is_default("vpcnet-ebpf")
    assert res["ratios"]["tcp_1stream_bps:vpcnet-eni/underlay"] == pytest.approx(0.98)
    assert res["ratios"]["same:tcp_1stream_bps:vpcnet-eni/docker-bridge"] == pytest.approx(100 / 95)
    assert _verdict(res, "vpcnet-eni", TCP1)["verdict"] == goals.MET                           # 0.98
    assert _verdict(res, "vpcnet-eni", "UDP 64 B pps ≥ 0.95 × underlay")["verdict"] == goals.MISSED   # 0.94
    v6 = _verdict(res, "vpcnet-eni-v6", TCP1)
    assert v6["versus"] == "underlay-v6" and v6["ratio"] == pytest.approx(49 / 50)
    assert res["fastest"] == "vpcnet-eni"
    per_contender = {n: sum(1 for v in res["goals"] if v["contender"] == n) for n in goals.vpcnet_contenders(res)}
    assert per_contender == {"vpcnet-eni": len(goals.GOALS), "vpcnet-eni-v6": len(goals.GOALS)}


def test_eni_prefix_markdown_names_the_addressing_and_what_was_left_out():
    md = report.markdown(_eni_result(ipv6=True))
    assert "Addressing: **eni-prefix**" in md and "`vpcnet-eni` is the lab's network" in md
    assert "| metric | underlay | vpcnet-eni | overlay |" in md
    assert "| metric | underlay-v6 | vpcnet-eni-v6 | overlay-v6 |" in md
    assert "| goal | vpcnet-eni (no -o: ebpf, fastest) | vpcnet-eni-v6 |" in md
    assert "- the default network (also the fastest), `vpcnet-eni`:" in md
    assert "- the default network over IPv6, `vpcnet-eni-v6`:" in md
    assert "Not measured: `vpcnet-routed`: a host has one vpcnet network per range" in md
    assert "Addressing: route-table." in report.markdown(_result())


def test_eni_prefix_runs_measure_no_explicit_mode_in_the_estimate():
    eni = run.estimate(_args(addressing="eni-prefix"))
    assert eni["contenders"] == {"cross": 4, "same": 2}         # underlay, vpcnet-eni, overlay, bridge; + docker-bridge
    assert run.estimate(_args(addressing="eni-prefix", ipv6=True))["contenders"] == {"cross": 7, "same": 2}
    assert eni["total_s"] < run.estimate(_args())["total_s"]
    assert "(eni-prefix addressing)" in run.estimate_text(eni, 9)
    assert "addressing" not in run.estimate_text(run.estimate(_args()), 9)
    for default_mode in ("ebpf", "routed", None):
        assert run.wanted_modes(_args(addressing="eni-prefix"), default_mode) == []
    assert run.default_contender(_args(addressing="eni-prefix")) == "vpcnet-eni"
    assert run.default_contender(_args()) == "vpcnet"
    assert run.results_name(_args(addressing="eni-prefix")) == "eni-prefix"
    assert run.results_name(_args()) == "latest"


def test_eni_prefix_says_why_each_explicit_mode_is_left_out():
    bench = run.Bench(None, _args(addressing="eni-prefix"))
    bench.default_mode = "ebpf"
    why = bench.eni_prefix_left_out()
    assert sorted(why) == ["vpcnet-bridge", "vpcnet-routed"]           # ebpf: the default network itself
    assert "bridge mode is refused in eni-prefix addressing" in why["vpcnet-bridge"]
    assert "one vpcnet network per range" in why["vpcnet-routed"] and "-o vpcnet.mode=routed" in why["vpcnet-routed"]


@pytest.mark.parametrize("flag", [["--readme"], ["--all-modes"], ["--skip-mode", "routed"]])
def test_eni_prefix_refuses_what_it_cannot_do_before_anything_starts(monkeypatch, capsys, flag):
    _no_matplotlib(monkeypatch)
    assert run.main(["--addressing", "eni-prefix", "--no-chart", *flag]) == 2
    assert "--addressing eni-prefix measures the default network alone" in capsys.readouterr().err
    assert _Watched.calls == []


@pytest.mark.parametrize("flags, addressing", [([], "route-table"), (["--addressing", "eni-prefix"], "eni-prefix")])
def test_addressing_brings_the_lab_up_in_that_mode(monkeypatch, capsys, tmp_path, flags, addressing):
    monkeypatch.setattr(run, "Lab", _Lab)
    monkeypatch.setattr(_Lab, "made", [])
    monkeypatch.setattr(run.os, "geteuid", lambda: 0)
    monkeypatch.setattr(run.signal, "signal", lambda *a: None)
    assert run.main(["--no-chart", "--rounds", "1", "--out", str(tmp_path), *flags]) == 1
    assert [kw.get("addressing") for kw in _Lab.made] == [addressing]
    # eni-prefix takes the lab's own reserved range: the emulator refuses one outside the lab's vSwitch
    assert [kw.get("cluster_cidr") for kw in _Lab.made] == [run.CLUSTER if addressing == "route-table" else None]
    assert list(tmp_path.iterdir()) == []                          # a failed run writes no results
