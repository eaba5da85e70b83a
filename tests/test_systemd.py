"""systemd units (checked with systemd-analyze verify) and `vpcnet install-systemd` into a temporary prefix."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import require, run

from vpcnet import config as config_mod
from vpcnet.cli import install

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = {"vpcnet.service": install.render_service, "vpcnet-emulator.service": install.render_emulator_service}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "vpcnet.cli", *args], check=check)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_files_in_the_tree_are_the_generated_ones(unit):
    with open(os.path.join(REPO, "systemd", unit)) as fh:
        assert fh.read() == UNITS[unit](), f"systemd/{unit} is stale: vpcnet install-systemd --print {unit}"


def test_service_ordering_and_hardening():
    text = install.render_service()
    lines = set(text.splitlines())
    for wanted in ("Before=docker.service", "After=network-online.target", "Restart=on-failure",
                   "EnvironmentFile=-/etc/vpcnet/vpcnet.env", "StateDirectory=vpcnet", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                   "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF", "SystemCallFilter=@system-service bpf",
                   "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6",
                   "ExecStartPre=+/bin/mkdir -p /run/docker/plugins", "ExecStart=/usr/local/bin/vpcnet serve",
                   # the watchdog is pinged by a worker (vpcnet.observability.health), not by gunicorn's master
                   "WatchdogSec=60s", "NotifyAccess=all"):
        assert wanted in lines, wanted
    rw = next(line for line in lines if line.startswith("ReadWritePaths="))
    for path in ("/run/docker/plugins", "/var/lib/vpcnet", "/run/xtables.lock"):
        assert path in rw


def _executable_stub(tmp_path) -> str:
    stub = tmp_path / "bin" / "vpcnet"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return str(stub)


def _verify(paths: list[str]) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True, timeout=120)
    # unknown keys and bad values are only warnings (exit 0): fail on any message about our units
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if any(os.path.basename(p) in line or p in line for p in paths)]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_systemd_analyze_verify(tmp_path):
    require(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (apt-get install systemd)")
    vpcnet = _executable_stub(tmp_path)
    paths = []
    for unit, render in UNITS.items():
        path = tmp_path / unit
        path.write_text(render(vpcnet))
        paths.append(str(path))
    _verify(paths)


def test_systemd_analyze_catches_a_broken_unit(tmp_path):
    require(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (apt-get install systemd)")
    path = tmp_path / "vpcnet.service"
    path.write_text(install.render_service(str(tmp_path / "missing" / "vpcnet")))
    with pytest.raises(AssertionError):
        _verify([str(path)])


def test_install_systemd_into_a_prefix(tmp_path):
    vpcnet = _executable_stub(tmp_path)
    prefix = tmp_path / "root"
    out = cli("install-systemd", "--prefix", str(prefix), "--vpcnet", vpcnet, "--emulator").stdout
    etc = prefix / "etc" / "vpcnet"
    assert mode(etc) == 0o750
    assert mode(etc / "vpcnet.toml") == 0o640
    assert mode(etc / "vpcnet.env") == 0o600
    assert mode(etc / "emulator.env") == 0o600
    assert mode(prefix / "var" / "lib" / "vpcnet") == 0o700
    unit = prefix / "etc" / "systemd" / "system" / "vpcnet.service"
    assert unit.read_text() == install.render_service(vpcnet)
    assert (prefix / "etc/systemd/system/vpcnet-emulator.service").exists()
    assert "daemon-reload" not in out          # never for a prefix other than /
    assert "systemctl enable --now vpcnet.service" in out
    if shutil.which("systemd-analyze"):
        _verify([str(unit), str(prefix / "etc/systemd/system/vpcnet-emulator.service")])

    # a second run keeps the user's configuration and secrets, and refreshes the unit
    (etc / "vpcnet.toml").write_text('provider = "aws"\n')
    (etc / "vpcnet.env").write_text("VPCNET_ALIYUN_ACCESS_KEY_SECRET=s3cret\n")
    unit.write_text("stale\n")
    out = cli("install-systemd", "--prefix", str(prefix), "--vpcnet", vpcnet).stdout
    assert (etc / "vpcnet.toml").read_text() == 'provider = "aws"\n'
    assert (etc / "vpcnet.env").read_text() == "VPCNET_ALIYUN_ACCESS_KEY_SECRET=s3cret\n"
    assert unit.read_text() == install.render_service(vpcnet)
    assert "keep existing" in out


def test_install_systemd_dry_run_changes_nothing(tmp_path):
    prefix = tmp_path / "root"
    out = cli("install-systemd", "--prefix", str(prefix), "--dry-run").stdout
    assert not prefix.exists()
    assert "would write" in out and "vpcnet.service" in out and "would create directory" in out


def test_daemon_reload_only_for_prefix_root_under_systemd(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(install, "systemd_running", lambda: True)
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **kw: calls.append(a))
    install.Installer(str(tmp_path / "root"), vpcnet="/usr/local/bin/vpcnet", out=open(os.devnull, "w")).run()
    assert calls == []
    install.Installer("/", dry_run=True, vpcnet="/usr/local/bin/vpcnet", out=open(os.devnull, "w")).run()
    assert calls == []          # dry run: said, not done


def test_generated_toml_is_every_setting_at_its_default(tmp_path):
    text = install.render_toml()
    path = tmp_path / "vpcnet.toml"
    path.write_text(text)
    assert config_mod.load(str(path), environ={}, check_socket_dir=False) == config_mod.Config()
    # uncommenting every setting as written changes nothing
    uncommented = "\n".join(line[1:] if line.startswith("#") and " = " in line and not line.startswith("# ")
                            else line for line in text.splitlines())
    path.write_text(uncommented)
    loaded = config_mod.load(str(path), environ={}, check_socket_dir=False)
    assert loaded == config_mod.Config()
    for s in config_mod.SETTINGS:
        assert f"#{s.attr} = " in text and s.description in text
