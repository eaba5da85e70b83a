"""Lint, types and the layering contract, as part of the suite: `ruff check vpcnet lab tests bench`, `mypy` and
`lint-imports` (all configured in pyproject.toml) must pass, run from the environment running the tests.

The contract is only worth something if it can fail: a copy of vpcnet/ with one import pointing up the
layers (the store importing the command line) must break it, and lint-imports must name that import.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib

import pytest
from conftest import require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(REPO, "pyproject.toml")
BIN = os.path.dirname(sys.executable)     # the venv's bin, not resolved: its python is a symlink
TIMEOUT = 600


def tool(name: str) -> str:
    path = os.path.join(BIN, name)
    require(os.access(path, os.X_OK), f"{name} is not installed beside {sys.executable} "
                                      "(tests/run.py installs the test extra into its venv)")
    return path


def check(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)


@pytest.mark.parametrize("cmd", [
    ["ruff", "check", "vpcnet", "lab", "tests", "bench"],
    ["mypy"],
    ["lint-imports", "--no-cache", "--no-logo"],
], ids=["ruff", "mypy", "lint-imports"])
def test_code_passes(cmd):
    proc = check([tool(cmd[0]), *cmd[1:]], cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_an_import_up_the_layers_breaks_the_contract(tmp_path):
    shutil.copytree(os.path.join(REPO, "vpcnet"), tmp_path / "vpcnet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "vpcnet" / "state" / "store.py", "a") as fh:
        fh.write("import vpcnet.cli.main  # noqa\n")
    # lint-imports puts its working directory first on sys.path, then PYTHONPATH: both are the copy.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = check([tool("lint-imports"), "--no-cache", "--no-logo", PYPROJECT], cwd=tmp_path, env=env)
    assert proc.returncode != 0, f"the back-edge went unnoticed:\n{proc.stdout}\n{proc.stderr}"
    assert "vpcnet.state.store -> vpcnet.cli.main" in proc.stdout, proc.stdout + proc.stderr


def test_the_bootstrap_contract_names_every_room():
    """`vpcnet.bootstrap stands alone` lists what it may not import; a new room must be on that list."""
    with open(PYPROJECT, "rb") as fh:
        contracts = tomllib.load(fh)["tool"]["importlinter"]["contracts"]
    forbidden = next(c for c in contracts if c.get("id") == "bootstrap")["forbidden_modules"]
    rooms = set()
    for entry in os.listdir(os.path.join(REPO, "vpcnet")):
        path = os.path.join(REPO, "vpcnet", entry)
        if os.path.isfile(os.path.join(path, "__init__.py")):
            rooms.add(f"vpcnet.{entry}")
        elif entry.endswith(".py") and entry not in ("__init__.py", "bootstrap.py"):
            rooms.add(f"vpcnet.{entry[:-3]}")
    assert set(forbidden) == rooms
