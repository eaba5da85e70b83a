"""The README's first command, the way a newcomer runs it on a stock Debian/Ubuntu.

From a fresh clone, with the machine's `/usr/bin/python3` (externally managed, PEP 668, on Debian 12) and
sudo's minimal environment: the command installs vpcnet into /opt/vpcnet, links /usr/local/bin/vpcnet, and
starts `vpcnet serve`; Docker can then create a vpcnet network on that plugin. Whatever /opt/vpcnet and
/usr/local/bin/vpcnet held before is moved aside and put back afterwards.

And the prefix it installs into: making the venv empties the directory, so one that is not vpcnet's
(another program's files, a venv without vpcnet) is refused with nothing touched, while a new or empty
one, one marked by an earlier run, or an older version's venv holding vpcnet is accepted.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

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
    assert bootstrap.whose_prefix(bootstrap.DEFAULT_PREFIX) == "marked", "the install did not mark its venv"


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


def tree_of(path) -> dict[str, bytes | str]:
    """Every file (its bytes), link (its target) and directory under `path`, by relative path."""
    out: dict[str, bytes | str] = {}
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(top, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = "-> " + os.readlink(full)
            elif os.path.isdir(full):
                out[rel] = "dir"
            else:
                with open(full, "rb") as fh:
                    out[rel] = fh.read()
    return out


def test_a_prefix_holding_another_programs_files_is_refused_with_nothing_touched(tmp_path):
    require(os.access(SYSTEM_PYTHON, os.X_OK), f"needs the distribution's {SYSTEM_PYTHON}")
    prefix, bin_dir = tmp_path / "opt", tmp_path / "bin"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "tool").write_text("#!/bin/sh\necho another program\n")
    (prefix / "tool.conf").write_text("setting = 1\n")
    bin_dir.mkdir()
    os.symlink("/elsewhere/bin/vpcnet", bin_dir / "vpcnet")
    before = tree_of(prefix)
    env = dict(SUDO_ENV, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    proc = subprocess.run([SYSTEM_PYTHON, "-m", "vpcnet.bootstrap", "--prefix", str(prefix), "--bin-dir",
                           str(bin_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.splitlines()
    assert str(prefix) in line and "not vpcnet's" in line and "choose a new or empty directory" in line, line
    assert tree_of(prefix) == before
    assert os.readlink(bin_dir / "vpcnet") == "/elsewhere/bin/vpcnet"


def make_plain_venv(path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)


def test_whose_prefix_accepts_only_what_vpcnet_made_or_nothing(tmp_path):
    assert bootstrap.whose_prefix(str(tmp_path / "new")) == "missing"
    (tmp_path / "empty").mkdir()
    assert bootstrap.whose_prefix(str(tmp_path / "empty")) == "empty"
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "leftover").write_text("")
    (tmp_path / "marked" / bootstrap.MARKER).write_text("")
    assert bootstrap.whose_prefix(str(tmp_path / "marked")) == "marked"
    (tmp_path / "file").write_text("")
    assert bootstrap.whose_prefix(str(tmp_path / "file")) is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data").write_text("")
    assert bootstrap.whose_prefix(str(tmp_path / "other")) is None
    for system_dir in ("/opt", "/usr", "/etc"):       # only read
        assert bootstrap.whose_prefix(system_dir) is None, system_dir


def test_an_older_versions_venv_holding_vpcnet_is_accepted_another_venv_is_not(tmp_path):
    venv = tmp_path / "venv"
    make_plain_venv(venv)
    assert bootstrap.whose_prefix(str(venv)) is None, "a venv without vpcnet is someone else's"
    [site] = (venv / "lib").glob("python3*/site-packages")
    (site / "vpcnet_lab-0.1.0.dist-info").mkdir()
    assert bootstrap.whose_prefix(str(venv)) is None, "vpcnet-lab alone does not make it vpcnet's"
    (site / "vpcnet-0.1.0.dist-info").mkdir()
    assert bootstrap.whose_prefix(str(venv)) == "vpcnet venv"
    with pytest.raises(bootstrap.BootstrapError):
        bootstrap.check_prefix(str(tmp_path))       # holds the venv: not itself a venv


def test_an_empty_prefix_is_installed_into_marked_and_accepted_again(tmp_path, monkeypatch):
    prefix, bin_dir = tmp_path / "opt", tmp_path / "bin"
    prefix.mkdir()
    installs: list[str] = []
    monkeypatch.setattr(bootstrap, "pip_install", lambda python, tree, extras: installs.append(python))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    argv = ["--prefix", str(prefix), "--bin-dir", str(bin_dir)]
    assert bootstrap.main(argv) == bootstrap.EXIT_NO_DOCKER
    assert bootstrap.whose_prefix(str(prefix)) == "marked"
    assert os.access(prefix / "bin" / "python", os.X_OK)
    assert os.readlink(bin_dir / "vpcnet") == str(prefix / "bin" / "vpcnet")
    assert bootstrap.main(argv) == bootstrap.EXIT_NO_DOCKER, "a rerun (an upgrade) is refused"
    assert len(installs) == 2


def test_a_venv_that_failed_half_way_is_marked_so_a_rerun_may_clear_it(tmp_path, monkeypatch):
    prefix = tmp_path / "opt"

    def half_made(path: str) -> str:
        os.makedirs(os.path.join(path, "bin"))
        open(os.path.join(path, "pyvenv.cfg"), "w").close()
        raise bootstrap.BootstrapError("could not create the virtual environment: no ensurepip")

    monkeypatch.setattr(bootstrap, "make_venv", half_made)
    assert bootstrap.main(["--prefix", str(prefix), "--bin-dir", str(tmp_path / "bin")]) == 1
    assert bootstrap.whose_prefix(str(prefix)) == "marked"
    assert not os.path.lexists(tmp_path / "bin" / "vpcnet")
