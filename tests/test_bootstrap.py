"""The README's first command, the way a newcomer runs it on a stock Debian/Ubuntu.

From a fresh clone, with the machine's `/usr/bin/python3` (externally managed, PEP 668, on Debian 12) and
sudo's minimal environment: the command installs vpcnet into /opt/vpcnet, links /usr/local/bin/vpcnet, and
starts `vpcnet serve`; Docker can then create a vpcnet network on that plugin. Whatever /opt/vpcnet and
/usr/local/bin/vpcnet held before is moved aside and put back afterwards.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest
from conftest import PLUGIN_DIR, next_cluster, require, run, unique, wait_for

from vpcnet import bootstrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PYTHON = "/usr/bin/python3"
SUDO_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}


def readme_first_command() -> str:
    with open(os.path.join(REPO, "README.md")) as fh:
        text = fh.read()
    section = text.split("## The two commands", 1)[1]
    block = re.search(r"```sh\n(.*?)\n```", section, re.S)
    assert block, "no sh block under 'The two commands'"
    command = block.group(1).strip()
    assert "\n" not in command and "vpcnet serve" in command
    return command


def shell_words(command: str) -> str:
    """The inner command of `sudo sh -c '...'`: we are root already, and sudo's environment is SUDO_ENV."""
    match = re.fullmatch(r"sudo sh -c '([^']*)'", command)
    assert match, f"the README's first command is not of the form sudo sh -c '...': {command}"
    return match.group(1)


def externally_managed() -> bool:
    out = subprocess.run([SYSTEM_PYTHON, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return bool(out) and os.path.exists(os.path.join(out, "EXTERNALLY-MANAGED"))


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    require(os.geteuid() == 0, "needs root (installs into /opt/vpcnet)")
    require(os.access(SYSTEM_PYTHON, os.X_OK), f"needs the distribution's {SYSTEM_PYTHON}")
    require(externally_managed(), f"{SYSTEM_PYTHON} is not externally managed here (not a PEP 668 distribution)")
    clone = str(tmp_path_factory.mktemp("readme") / "vpcnet")
    if os.path.isdir(os.path.join(REPO, ".git")):
        run(["git", "clone", "-q", REPO, clone])
    else:
        shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build"))
    return clone


@pytest.fixture(scope="module")
def install_locations(fresh_clone):
    """/opt/vpcnet and /usr/local/bin/vpcnet as the command uses them, with what was there put back."""
    saved = []
    for path in (bootstrap.DEFAULT_PREFIX, os.path.join(bootstrap.DEFAULT_BIN_DIR, "vpcnet")):
        if os.path.lexists(path):
            aside = f"{path}.before-test-{os.getpid()}"
            os.rename(path, aside)
            saved.append((path, aside))
    yield
    for path in (bootstrap.DEFAULT_PREFIX, os.path.join(bootstrap.DEFAULT_BIN_DIR, "vpcnet")):
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
    for path, aside in saved:
        os.rename(aside, path)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(proc: subprocess.Popen) -> None:
    """The command's shell, vpcnet serve and its worker: one session we started, ended as Ctrl-C ends a
    foreground job (every process of it signalled), and waited for as a whole: the shell exits at once,
    gunicorn's master only once its worker has stopped and it has removed the socket."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    proc.wait(timeout=20)
    if wait_for(lambda: not group_alive(proc.pid), 30, 0.1):
        return
    os.killpg(proc.pid, signal.SIGKILL)
    wait_for(lambda: not group_alive(proc.pid), 10, 0.1)


def test_readme_first_command_installs_and_serves_on_the_system_python(fresh_clone, install_locations,
                                                                       docker_engine, tmp_path):
    name = unique("vpcnet-readme")
    env = dict(SUDO_ENV, VPCNET_SOCKET=os.path.join(PLUGIN_DIR, f"{name}.sock"), VPCNET_CONFIG=os.devnull,
               VPCNET_STATE_DIR=str(tmp_path / "state"), VPCNET_CLUSTER_CIDR=next_cluster())
    log_path = tmp_path / "command.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["sh", "-c", shell_words(readme_first_command())], cwd=fresh_clone, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    network = unique("readme")
    try:
        served = wait_for(lambda: proc.poll() is not None or os.path.exists(env["VPCNET_SOCKET"]), 600, 0.5)
        assert served and proc.poll() is None, f"the command stopped:\n{log_path.read_text()}"
        link = os.path.join(bootstrap.DEFAULT_BIN_DIR, "vpcnet")
        assert os.readlink(link) == os.path.join(bootstrap.DEFAULT_PREFIX, "bin", "vpcnet")
        venv_python = os.path.realpath(os.path.join(bootstrap.DEFAULT_PREFIX, "bin", "python"))
        assert venv_python == os.path.realpath(SYSTEM_PYTHON), "the venv is not built on the system Python"
        created = wait_for(lambda: run(["docker", "network", "create", "-d", name, "--ipam-driver", name,
                                        network], check=False, timeout=60), 30, 1)
        assert created.returncode == 0, f"{created.stderr}\n{log_path.read_text()}"
        inspect = run(["docker", "network", "inspect", "-f", "{{.Driver}} {{range .IPAM.Config}}{{.Subnet}}{{end}}",
                       network])
        assert inspect.stdout.split()[0] == name
    finally:
        subprocess.run(["docker", "network", "rm", network], capture_output=True, timeout=60)
        stop_group(proc)
    assert not os.path.exists(env["VPCNET_SOCKET"]), "vpcnet serve left its socket behind on SIGTERM"


def test_without_a_docker_engine_the_command_says_so_in_one_line(fresh_clone, install_locations, tmp_path):
    install = shell_words(readme_first_command()).split("&&")[0].strip()
    env = dict(SUDO_ENV, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    proc = subprocess.run(["sh", "-c", f"{install} && echo SERVE-WOULD-START"], cwd=fresh_clone, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == bootstrap.EXIT_NO_DOCKER, proc.stderr
    assert "SERVE-WOULD-START" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "Docker engine" in line]
    assert len(lines) == 1 and "no-docker.sock" in lines[0] and "apt-get install docker.io" in lines[0], proc.stderr


def test_link_replaces_an_older_link_but_never_a_foreign_file(tmp_path):
    prefix, bin_dir = str(tmp_path / "opt"), str(tmp_path / "bin")
    os.makedirs(bin_dir)
    os.symlink("/nowhere/vpcnet", os.path.join(bin_dir, "vpcnet"))
    assert os.readlink(bootstrap.link(prefix, bin_dir)) == os.path.join(prefix, "bin", "vpcnet")
    os.unlink(os.path.join(bin_dir, "vpcnet"))
    with open(os.path.join(bin_dir, "vpcnet"), "w") as fh:
        fh.write("#!/bin/sh\necho someone else's tool\n")
    with pytest.raises(bootstrap.BootstrapError, match="not vpcnet's"):
        bootstrap.link(prefix, bin_dir)
    with open(os.path.join(bin_dir, "vpcnet")) as fh:
        assert "someone else" in fh.read()
