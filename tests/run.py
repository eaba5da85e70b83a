#!/usr/bin/env python3
"""`sudo python3 tests/run.py [pytest args]`: the test suite on a stock Debian/Ubuntu, with its own python3.

The distribution's Python is "externally managed" (PEP 668): pytest and the test dependencies cannot be
pip-installed into it. So this script, standard library only, prepares what the suite needs and runs it:
  1. as root with apt-get, the Debian packages the tests use, when dpkg says they are missing (`--no-apt`
     skips this; without root it only says what is missing). No Docker engine: tests needing one skip
     without it (.ci/run installs and starts one);
  2. a virtual environment, <checkout>/.venv (or $VPCNET_TEST_VENV), made by vpcnet.bootstrap's make_venv
     (the same python3-venv fallback as the README's first command);
  3. `pip install -e <checkout>[test] -e <checkout>/lab` into it, skipped while a stamp of both
     pyproject.toml files (and the checkout's path) says it is current;
  4. `<venv>/bin/python -m pytest ARGS` (default -q) in the checkout; its exit status is this script's,
     except that "no tests collected" (5) is a failure (1): a selection that matches nothing proves nothing.
Environment: VPCNET_TEST_VENV, VPCNET_TEST_TIMEOUT (seconds for the pytest run, default 10800).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What the tests use from the distribution (the Docker engine is not among them, see above).
DEBIAN_PACKAGES = (
    "python3-venv",     # ensurepip, for the venv
    "iperf3", "busybox-static",     # the registry-free test image
    "tcpdump",          # the lab checks what crosses the emulated VPC
    "iproute2", "iptables", "kmod", "procps", "psmisc", "util-linux",
    "debootstrap",      # the managed plugin's rootfs
    "prometheus",       # a real server scraping the plugin; promtool for docs/monitoring.md's rules
    "systemd",          # systemd-analyze verify for the units
)
STAMP = ".vpcnet-test-stamp"
NO_TESTS_COLLECTED = 5
DEFAULT_TIMEOUT = 3 * 3600


class RunError(Exception):
    """A step failed; the message says which and what to do."""


def say(message: str) -> None:
    print(f"run.py: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise RunError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from None


def tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-lines:])


def missing_packages(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> list[str] | None:
    """The packages dpkg does not have installed; None when this is no dpkg system."""
    if shutil.which("dpkg-query") is None:
        return None
    proc = run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *packages], 60)
    installed = {line.split()[0] for line in proc.stdout.splitlines()
                 if len(line.split()) > 1 and line.split()[1] == "ii"}
    return [p for p in packages if p not in installed]


def apt_install(packages: list[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    say("apt-get update")
    proc = run(["apt-get", "update", "-q"], 900, env=env)
    if proc.returncode != 0:
        raise RunError(f"apt-get update failed (run with --no-apt to skip this step):\n{tail(proc)}")
    say(f"apt-get install {' '.join(packages)}")
    proc = run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], 1800, env=env)
    if proc.returncode != 0:
        raise RunError(f"apt-get install failed (run with --no-apt to skip this step):\n{tail(proc)}")


def system_packages() -> None:
    missing = missing_packages()
    if missing is None:
        say("no dpkg-query here: not checking the Debian packages the tests use")
        return
    if not missing:
        say("the Debian packages the tests use are installed")
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        apt_install(missing)
        return
    say(f"missing Debian packages: {' '.join(missing)} (sudo apt-get install {' '.join(missing)}); going on: "
        "tests needing them skip")


def venv_dir() -> str:
    return os.path.abspath(os.environ.get("VPCNET_TEST_VENV") or os.path.join(CHECKOUT, ".venv"))


def make_venv(prefix: str) -> str:
    """vpcnet.bootstrap's make_venv, imported from this checkout (it and vpcnet/__init__ are stdlib-only)."""
    if CHECKOUT not in sys.path:
        sys.path.insert(0, CHECKOUT)
    from vpcnet import bootstrap

    try:
        bootstrap.check_prefix(prefix)      # VPCNET_TEST_VENV may name any directory: `venv --clear` empties it
        python = bootstrap.make_venv(prefix)
        bootstrap.mark(prefix)
        return python
    except bootstrap.BootstrapError as exc:
        raise RunError(str(exc)) from None


def stamp() -> str:
    """What the install depends on: both distributions' metadata and where the checkout is."""
    digest = hashlib.sha256(CHECKOUT.encode())
    for path in ("pyproject.toml", os.path.join("lab", "pyproject.toml")):
        with open(os.path.join(CHECKOUT, path), "rb") as fh:
            digest.update(b"\0" + fh.read())
    return digest.hexdigest()


def install(python: str, prefix: str) -> None:
    path = os.path.join(prefix, STAMP)
    want = stamp()
    try:
        with open(path) as fh:
            if fh.read().strip() == want:
                say(f"{prefix} is current (pyproject.toml unchanged): no pip install")
                return
    except OSError:
        pass
    targets = [f"{CHECKOUT}[test]", os.path.join(CHECKOUT, "lab")]
    say(f"pip install -e {' -e '.join(targets)} into {prefix} (minutes the first time)")
    proc = run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                "--no-warn-script-location", *(a for t in targets for a in ("-e", t))], 1800)
    if proc.returncode != 0:
        raise RunError(f"pip install failed:\n{tail(proc)}")
    with open(path, "w") as fh:
        fh.write(want + "\n")


def run_pytest(python: str, args: list[str], timeout: float) -> int:
    """pytest as a child, so its status can be mapped. Ctrl-C reaches it from the terminal (it tears its
    fixtures down); a SIGTERM to this script is passed on; at the timeout it gets SIGINT, then SIGKILL."""
    prefix = os.path.dirname(os.path.dirname(python))
    # as if activated: a test running `vpcnet` or `ruff` by name gets this checkout's
    env = dict(os.environ, VIRTUAL_ENV=prefix,
               PATH=os.pathsep.join([os.path.join(prefix, "bin"), os.environ.get("PATH", "")]))
    say(f"{python} -m pytest {' '.join(args)}")
    proc = subprocess.Popen([python, "-m", "pytest", *args], cwd=CHECKOUT, env=env)
    # A handler, not SIG_IGN: an ignored SIGINT would be inherited by pytest.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"pytest still running after {timeout:.0f} s (VPCNET_TEST_TIMEOUT): interrupting it")
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        return 1


def main(argv: list[str]) -> int:
    apt = "--no-apt" not in argv
    args = [a for a in argv if a != "--no-apt"] or ["-q"]
    try:
        timeout = float(os.environ.get("VPCNET_TEST_TIMEOUT") or DEFAULT_TIMEOUT)
        if sys.version_info < (3, 11):
            raise RunError(f"vpcnet needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}")
        if apt:
            system_packages()
        prefix = venv_dir()
        say(f"virtual environment {prefix}")
        python = make_venv(prefix)
        install(python, prefix)
    except (RunError, OSError, ValueError) as exc:
        say(f"failed: {exc}")
        return 1
    status = run_pytest(python, args, timeout)
    if status == NO_TESTS_COLLECTED:
        say("pytest collected no tests (exit 5): failing, a selection that matches nothing proves nothing")
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
