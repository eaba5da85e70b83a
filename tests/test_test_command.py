"""The README's second command, `sudo python3 tests/run.py`, the way a newcomer runs it on a stock Debian/Ubuntu.

From a fresh clone, with the machine's externally managed python3 (PEP 668) and sudo's minimal
environment: run.py builds the clone's own venv (.venv), installs the test extra and ./lab into it and
runs pytest there, which passes real tests. A selection matching no test is a failure, not a green run.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest
from conftest import require, run
from test_bootstrap import SUDO_ENV, SYSTEM_PYTHON, externally_managed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ["python3", "tests/run.py", "-q", "--no-apt"]     # apt: the machine running the suite has them


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    require(os.geteuid() == 0, "needs root (the README's command runs under sudo)")
    python3 = shutil.which("python3", path=SUDO_ENV["PATH"])
    require(python3 is not None and os.path.realpath(python3) == os.path.realpath(SYSTEM_PYTHON),
            f"python3 on sudo's PATH is not the distribution's {SYSTEM_PYTHON}")
    require(externally_managed(), f"{SYSTEM_PYTHON} is not externally managed here (not a PEP 668 distribution)")
    clone = str(tmp_path_factory.mktemp("testcmd") / "vpcnet")
    if os.path.isdir(os.path.join(REPO, ".git")) or os.path.isfile(os.path.join(REPO, ".git")):
        run(["git", "clone", "-q", REPO, clone])       # HEAD: what was committed, not the working tree
    else:
        shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build"))
    return clone


@pytest.fixture(scope="module")
def first_run(fresh_clone):
    """The command once on the fresh clone (venv made and filled here: minutes)."""
    started = time.monotonic()
    proc = subprocess.run([*COMMAND, "tests/test_config.py"], cwd=fresh_clone, env=dict(SUDO_ENV),
                          capture_output=True, text=True, timeout=1800)
    return proc, time.monotonic() - started


@pytest.mark.root
def test_the_command_runs_the_tests_in_a_venv_of_the_clone(fresh_clone, first_run):
    proc, seconds = first_run
    output = f"after {seconds:.0f} s, exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, output
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) > 0, output
    assert not re.search(r"\d+ (failed|error)", proc.stdout), output
    python = os.path.join(fresh_clone, ".venv", "bin", "python")
    assert os.path.realpath(python) == os.path.realpath(SYSTEM_PYTHON), "the venv is not built on the system Python"
    imported = run([python, "-c", "import hypothesis, moto, pytest, vpcnet, vpcnet_lab; print(vpcnet.__file__)"],
                   cwd="/", env=dict(SUDO_ENV))
    assert imported.stdout.startswith(os.path.join(fresh_clone, "vpcnet", "")), imported.stdout


@pytest.mark.root
def test_a_selection_matching_no_test_fails(fresh_clone, first_run):
    assert first_run[0].returncode == 0, "the first run failed (see the test above)"
    proc = subprocess.run([*COMMAND, "-k", "no_test_is_named_like_this", "tests/test_config.py"], cwd=fresh_clone,
                          env=dict(SUDO_ENV), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "no tests" in proc.stderr and "no pip install" in proc.stderr, proc.stderr


def test_ci_runs_the_command_as_the_readme_gives_it():
    """.ci/run's first pass is the command exactly (as root already: no sudo), the current-engine pass the
    same command inside the engine sandbox; neither installs into the system Python."""
    with open(os.path.join(REPO, ".ci", "run")) as fh:
        ci = fh.read()
    assert re.search(r"^python3 tests/run\.py$", ci, re.M), ".ci/run must run the README's `python3 tests/run.py`"
    assert re.search(r"^tests/engines/with-docker.sh python3 tests/run.py -q -m docker$", ci, re.M)
    assert not re.search(r"pip install|-m pytest", ci)


def test_a_venv_directory_holding_other_files_is_refused_and_left_alone(tmp_path):
    """VPCNET_TEST_VENV may name any directory, and making a venv there empties it: one that is not
    vpcnet's is refused, untouched, before anything else runs."""
    other = tmp_path / "not-a-venv"
    other.mkdir()
    (other / "keep.txt").write_text("someone else's\n")
    proc = subprocess.run([SYSTEM_PYTHON, os.path.join(REPO, "tests", "run.py"), "--no-apt", "-q"],
                          env={**SUDO_ENV, "VPCNET_TEST_VENV": str(other)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "not vpcnet's" in proc.stderr, proc.stderr
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    assert (other / "keep.txt").read_text() == "someone else's\n"
