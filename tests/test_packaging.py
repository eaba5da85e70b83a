"""What each distribution ships: `pip install .` (vpcnet) holds the runtime and nothing of the lab, the
emulator or the image builder; `pip install ./lab` (vpcnet-lab) holds exactly those and none of the
runtime. Without vpcnet-lab, `vpcnet lab` and `vpcnet emulator` say in one line how to get it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = os.path.join(REPO, "lab")
# Path parts of the lab's code that must never be in the runtime's wheel.
LAB_PARTS = {"vpcnet_lab", "emulator", "lab", "image.py", "plugin_client.py", "emulator.py", "lab.py"}


def _env() -> dict[str, str]:
    """The checkout under test first on the path: vpcnet from REPO, vpcnet_lab from REPO/lab."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, LAB] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _sources(root: str, package: str) -> set[str]:
    """The .py files of a package in the checkout, as paths inside a wheel."""
    out = set()
    for folder, dirs, files in os.walk(os.path.join(root, package)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        out.update(f"{rel}/{f}" for f in files if f.endswith(".py"))
    return out


def _wheel(source: str, out: str) -> list[str]:
    """Build `source` as pip would for `pip install` and return the file names in its wheel. setuptools'
    scratch (build/, *.egg-info) is removed again if this build made it: a stale build/lib would put
    old files into later wheels."""
    before = set(os.listdir(source))
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                               "--disable-pip-version-check", "-q", "-w", out, source],
                              capture_output=True, text=True, timeout=300)
    finally:
        for name in set(os.listdir(source)) - before:
            if name == "build" or name.endswith(".egg-info"):
                shutil.rmtree(os.path.join(source, name), ignore_errors=True)
    assert proc.returncode == 0, f"building {source} failed (the `wheel` package is in '.[test]'):\n" \
                                 f"{proc.stdout}\n{proc.stderr}"
    wheels = [f for f in os.listdir(out) if f.endswith(".whl")]
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(os.path.join(out, wheels[0])) as whl:
        return whl.namelist()


def test_the_runtime_wheel_holds_vpcnet_and_nothing_of_the_lab(tmp_path):
    names = _wheel(REPO, str(tmp_path))
    code = [n for n in names if ".dist-info/" not in n]
    assert "vpcnet/cli/main.py" in code and "vpcnet/docker/driver.py" in code
    assert all(n.startswith("vpcnet/") for n in code), [n for n in code if not n.startswith("vpcnet/")]
    leaks = [n for n in names if LAB_PARTS & set(n.split("/"))]
    assert not leaks, f"lab code in the runtime wheel: {leaks}"
    # exactly the checkout's modules: nothing left over from an older layout, nothing missing
    assert {n for n in code if n.endswith(".py")} == _sources(REPO, "vpcnet")


def test_the_lab_wheel_holds_vpcnet_lab_and_nothing_of_the_runtime(tmp_path):
    names = _wheel(LAB, str(tmp_path))
    code = [n for n in names if ".dist-info/" not in n]
    assert "vpcnet_lab/emulator/state.py" in code and "vpcnet_lab/image.py" in code
    assert all(n.startswith("vpcnet_lab/") for n in code), [n for n in code if not n.startswith("vpcnet_lab/")]
    assert not [n for n in names if n.startswith("vpcnet/")]
    assert {n for n in code if n.endswith(".py")} == _sources(LAB, "vpcnet_lab")


# `vpcnet` on a host with only `pip install .`: vpcnet_lab is on the path here, so a finder refuses it the way
# a missing package fails. If the refusal did not hold, exit 99 rather than run a real `vpcnet lab up`.
VPCNET_WITHOUT = textwrap.dedent("""
    import sys

    REFUSE, MISSING = sys.argv[1], sys.argv[2]

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == REFUSE or name.startswith(REFUSE + "."):
                raise ModuleNotFoundError(f"No module named {MISSING!r}", name=MISSING)
            return None

    sys.meta_path.insert(0, Refuse())
    try:
        __import__(REFUSE)
    except ModuleNotFoundError:
        pass
    else:
        sys.exit(99)
    from vpcnet.cli.main import main
    sys.exit(main(sys.argv[3:]))
""")


def _without(refuse: str, missing: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", VPCNET_WITHOUT, refuse, missing, *argv], capture_output=True,
                          text=True, env=_env(), timeout=60)


def _without_lab(*argv: str) -> subprocess.CompletedProcess:
    return _without("vpcnet_lab", "vpcnet_lab", *argv)


@pytest.mark.parametrize("argv", [("lab", "up"), ("lab", "--help"), ("emulator",),
                                  ("emulator", "--listen", "127.0.0.1:0")])
def test_lab_commands_without_vpcnet_lab_say_how_to_install_it(argv):
    proc = _without_lab(*argv)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"`vpcnet {argv[0]}` is part of vpcnet-lab" in lines[0]
    assert lines[0].endswith("pip install ./lab")


def test_the_emulator_unit_is_refused_without_vpcnet_lab_and_nothing_is_written(tmp_path):
    proc = _without_lab("install-systemd", "--emulator", "--prefix", str(tmp_path))
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "vpcnet-lab, which is not installed" in proc.stderr and "pip install ./lab" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_without_vpcnet_lab_still_lists_lab_and_emulator():
    proc = _without_lab("--help")
    assert proc.returncode == 0, proc.stderr
    commands = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("    ")}
    assert "(needs vpcnet-lab)" in commands["lab"]
    assert "(needs vpcnet-lab)" in commands["emulator"]
    assert "routes" in commands and "status" in commands


def test_a_lab_missing_a_dependency_is_not_taken_for_a_missing_lab():
    """Only vpcnet_lab itself missing means "not installed"; a module the lab lacks is a real error."""
    proc = _without("vpcnet_lab.emulator.cli", "werkzeug", "--help")
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "ModuleNotFoundError: No module named 'werkzeug'" in proc.stderr


@pytest.mark.parametrize("command", ["emulator", "lab"])
def test_lab_commands_work_when_vpcnet_lab_is_installed(command):
    proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", command, "--help"], capture_output=True,
                          text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: vpcnet {command}")
    assert "needs vpcnet-lab" not in proc.stdout


def test_processes_the_lab_starts_run_the_code_this_process_runs():
    """The lab's plugins and emulator, and the boot storm's hosts, are `python -m vpcnet.cli` children: their
    path leads with the folders this process imported vpcnet and vpcnet_lab from (here: the checkout)."""
    import vpcnet
    import vpcnet_lab
    from vpcnet_lab import engine
    from vpcnet_lab.emulator import storm

    roots = engine.with_code_path({"PYTHONPATH": "/elsewhere"})["PYTHONPATH"].split(os.pathsep)
    assert roots[-1] == "/elsewhere" and len(roots) in (2, 3)
    assert os.path.join(roots[0], "vpcnet", "__init__.py") == os.path.abspath(vpcnet.__file__)
    assert os.path.join(roots[-2], "vpcnet_lab", "__init__.py") == os.path.abspath(vpcnet_lab.__file__)
    assert os.path.join(storm.CODE, "vpcnet", "__init__.py") == os.path.abspath(vpcnet.__file__)
