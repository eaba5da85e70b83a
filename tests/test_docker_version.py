"""Docker 29.0.0 to 29.0.2 crash dockerd whenever a container whose gateway endpoint belongs to a remote
network driver stops: on a vpcnet network, every container. `vpcnet doctor` names it (check
`docker_version`) and `vpcnet serve` logs a WARNING, both with the fix (29.0.3 or later).

The version parser and the verdicts as unit tests; doctor and serve against a small fake Docker API (a
real HTTP server on a unix socket in the test's directory, answering /version); doctor against the real
engine (marker `docker`).
"""
from __future__ import annotations

import http.server
import json
import logging
import os
import socketserver
import subprocess
import sys
import threading

import pytest
from conftest import engine_version, wait_for

from vpcnet.cli.doctor.engine import engine_crash, parse_version, version_findings
from vpcnet.cli.serve import warn_about_engine

CRASHING = ["29.0.0", "29.0.1", "29.0.2", "29.0.2-1", "29.0.2+dfsg1", "29.0.2+dfsg1-1", "29.0.1-rc.1",
            "29.0.0-rc1", "v29.0.2", "5:29.0.2-1~debian.12~bookworm", "29.0", " 29.0.1\n", "29.0.2~ds1"]
FINE = ["29.0.3", "29.0.3-1", "29.0.10", "29.1.0", "29.1.0-rc.1", "30.0.0", "28.5.2", "28.5.2+dfsg1",
        "20.10.24+dfsg1", "27.3.1", "28.0.0-rc.1", "dev", "master-dockerproject-2025-11-20", "", "?", "29"]


@pytest.mark.parametrize("text, numbers", [
    ("29.0.2", (29, 0, 2)), ("29.0.2-1", (29, 0, 2)), ("29.0.2+dfsg1", (29, 0, 2)), ("v29.0.1", (29, 0, 1)),
    ("20.10.24+dfsg1", (20, 10, 24)), ("29.0", (29, 0, 0)), ("5:29.0.2-1~debian.12", (29, 0, 2)),
    ("29.0.10", (29, 0, 10)), ("28.5.2~ds1-1", (28, 5, 2)), ("19.03.12", (19, 3, 12)),
    ("dev", None), ("", None), ("29", None), ("?", None)])
def test_parse_version_reads_what_builds_and_distributions_print(text, numbers):
    assert parse_version(text) == numbers


@pytest.mark.parametrize("version", CRASHING)
def test_29_0_0_to_29_0_2_are_named_with_the_fix(version):
    crash = engine_crash(version)
    assert crash and "crashes" in crash and "fixed in 29.0.3" in crash and version in crash


@pytest.mark.parametrize("version", FINE)
def test_other_versions_have_no_known_crash(version):
    assert engine_crash(version) is None


def verdicts(version: str) -> dict[str, tuple[bool, str, str]]:
    return {f.check: (f.ok, f.detail, f.fix) for f in version_findings({"Version": version, "ApiVersion": "1.52"})}


def test_version_findings_a_crashing_release_an_old_one_and_a_dev_build():
    found = verdicts("29.0.1")
    assert found["docker"][0] and not found["docker_version"][0]
    assert "29.0.1" in found["docker_version"][1] and "29.0.3 or later" in found["docker_version"][2]
    found = verdicts("19.03.12")
    assert not found["docker"][0] and found["docker_version"][0]
    found = verdicts("dev")
    assert found["docker"][0] and found["docker_version"][0]
    assert all(ok for ok, _, _ in verdicts("29.0.3").values())


class FakeEngine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Docker API on a unix socket: /version answers `version` (after `hold` is set, when given),
    /networks an empty list; `asked` is set once /version was asked."""
    daemon_threads = True

    def __init__(self, path: str, version: str, hold: threading.Event | None = None):
        self.version, self.hold, self.asked = version, hold, threading.Event()
        super().__init__(path, _EngineHandler)


class _EngineHandler(http.server.BaseHTTPRequestHandler):
    server: FakeEngine

    def do_GET(self) -> None:        # noqa: N802 (http.server's naming)
        if self.path == "/version":
            self.server.asked.set()
            if self.server.hold is not None:
                self.server.hold.wait(30)
            body = {"Version": self.server.version, "ApiVersion": "1.52", "Os": "linux"}
        elif self.path == "/networks":
            body = []
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args) -> None:       # a unix peer has no address to print
        pass


@pytest.fixture
def fake_engine(tmp_path):
    made: list[FakeEngine] = []

    def make(version: str, hold: threading.Event | None = None) -> FakeEngine:
        engine = FakeEngine(str(tmp_path / f"docker-{len(made)}.sock"), version, hold)
        threading.Thread(target=engine.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        if engine.hold is not None:
            engine.hold.set()
        engine.shutdown()
        engine.server_close()


def doctor_findings(tmp_path, docker_socket: str | None = None) -> dict[str, dict]:
    """`vpcnet doctor --json` on a host with no plugin (its other checks may fail); findings by check."""
    env = dict(os.environ, VPCNET_CONFIG=os.devnull, VPCNET_STATE_DIR=str(tmp_path / "state"),
               VPCNET_SOCKET=str(tmp_path / "plugin.sock"), VPCNET_METRICS_ADDR="127.0.0.1:9")
    args = ["--docker-socket", docker_socket] if docker_socket else []
    proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", "doctor", "--json", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    return {f["check"]: f for f in json.loads(proc.stdout)["findings"]}


def test_doctor_names_a_crashing_engine_and_its_fix(tmp_path, fake_engine):
    finding = doctor_findings(tmp_path, fake_engine("29.0.1").server_address)["docker_version"]
    assert not finding["ok"], finding
    assert "Docker 29.0.1 crashes" in finding["detail"] and finding["fix"] == (
        "upgrade the Docker engine to 29.0.3 or later")
    finding = doctor_findings(tmp_path, fake_engine("29.0.3").server_address)["docker_version"]
    assert finding["ok"], finding


def test_serve_warns_about_a_crashing_engine(fake_engine, caplog):
    caplog.set_level(logging.DEBUG, logger="vpcnet.cli.serve")
    stop = threading.Event()
    assert warn_about_engine(fake_engine("29.0.2+dfsg1").server_address, stop) == "29.0.2+dfsg1"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "Docker 29.0.2+dfsg1 crashes" in warning and "fix: upgrade the Docker engine to 29.0.3 or later" in warning
    caplog.clear()
    assert warn_about_engine(fake_engine("28.5.2").server_address, stop) == "28.5.2"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_serve_without_an_engine_gives_up_quietly(tmp_path, caplog):
    assert warn_about_engine(str(tmp_path / "none.sock"), threading.Event(), look_for=0.3, every=0.1) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.root
def test_the_plugin_serves_before_the_engine_answers_then_logs_the_warning(plugin_factory, fake_engine):
    hold = threading.Event()
    engine = fake_engine("29.0.0", hold)
    plugin = plugin_factory({"DOCKER_HOST": f"unix://{engine.server_address}", "VPCNET_METRICS_ADDR": ""},
                            start=False)
    plugin.start(wait=30)       # returns once the socket answers /Plugin.Activate
    assert wait_for(engine.asked.is_set, 30, 0.1), f"serve never asked the engine:\n{plugin.log()}"
    assert not any("crashes" in line for line in plugin.log().splitlines()), "answered before the engine did"
    hold.set()
    line = wait_for(lambda: [ln for ln in plugin.log().splitlines() if "Docker 29.0.0 crashes" in ln], 30, 0.1)
    assert line and "WARNING" in line[0] and "29.0.3 or later" in line[0], plugin.log()
    assert plugin.stop() == 0


@pytest.mark.docker
def test_doctor_finds_no_known_crash_in_the_real_engine(tmp_path, docker_engine):
    finding = doctor_findings(tmp_path)["docker_version"]
    assert finding["ok"] and engine_version() in finding["detail"], finding
