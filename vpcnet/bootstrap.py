"""`python3 -m vpcnet.bootstrap`: install vpcnet from this source tree on a stock distribution.

Debian 12 and Ubuntu 23.04+ mark their Python "externally managed" (PEP 668): `pip install` into it is
refused, and `--break-system-packages` would mix vpcnet's dependencies with the distribution's. So vpcnet
lives in its own virtual environment, `/opt/vpcnet`, built with the distribution's own `python3`, and
`/usr/local/bin/vpcnet` links to it (on sudo's `secure_path`, and where the systemd unit and the docs
expect it). The managed plugin's rootfs uses the same `/opt/vpcnet` layout.

Runs with the standard library only (it is run from the checkout, before anything is installed). Steps:
the prefix is checked to be vpcnet's — missing, empty, marked by an earlier run (`.vpcnet-bootstrap`), or
a venv holding vpcnet (older versions wrote no mark) — because making the venv empties it; any other
directory is refused with nothing touched → the venv (Debian ships `venv` without `ensurepip` until
`python3-venv` is installed: as root with apt, that package is installed, else the command says what to
install) → `pip install` of this tree into it (again on every run: that is how a checkout is upgraded) →
the link → one look for a Docker engine: without one answering, it says so in one line with how to get
one, and exits non-zero so `&& vpcnet serve` does not start a plugin nobody can call.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import http.client
import os
import shutil
import socket
import subprocess
import sys

DEFAULT_PREFIX = "/opt/vpcnet"
DEFAULT_BIN_DIR = "/usr/local/bin"
DOCKER_SOCKET = "/var/run/docker.sock"
DOCKER_HELP = ("install and start one (Debian/Ubuntu: apt-get install docker.io && systemctl start docker; "
               "or https://docs.docker.com/engine/install/), then run: vpcnet serve")
EXIT_NO_DOCKER = 3
MARKER = ".vpcnet-bootstrap"      # in the prefix: this directory is vpcnet's venv, made by this command


class BootstrapError(Exception):
    """A step failed; the message names it and what to do."""


def _say(message: str) -> None:
    print(f"vpcnet bootstrap: {message}", file=sys.stderr, flush=True)


def source_tree() -> str:
    """The checkout this module runs from (the directory holding pyproject.toml)."""
    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(tree, "pyproject.toml")):
        raise BootstrapError(f"{tree} is not a vpcnet source tree (no pyproject.toml): run this from a checkout")
    return tree


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BootstrapError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from None


def _tail(proc: subprocess.CompletedProcess, lines: int = 6) -> str:
    return "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-lines:])


def _install_venv_package() -> None:
    """Debian/Ubuntu keep ensurepip (which venv needs for pip) in the python3-venv package."""
    apt = shutil.which("apt-get")
    if os.geteuid() != 0 or apt is None:
        raise BootstrapError("this Python cannot create a virtual environment with pip: install the "
                             "python3-venv package (apt-get install python3-venv) and run this again")
    _say("installing python3-venv (the distribution's venv/ensurepip) with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for attempt in range(2):       # a fresh machine may have no package lists yet: update once, then retry
        proc = subprocess.run([apt, "install", "-y", "-q", "python3-venv"], capture_output=True, text=True,
                              timeout=600, env=env)
        if proc.returncode == 0:
            return
        if attempt == 0:
            subprocess.run([apt, "update", "-q"], capture_output=True, text=True, timeout=600, env=env)
    raise BootstrapError(f"apt-get install python3-venv failed:\n{_tail(proc)}")


def whose_prefix(prefix: str) -> str | None:
    """Why `prefix` may be made into vpcnet's venv (`venv --clear` empties it): "missing", "empty",
    "marked", "vpcnet venv"; None when it holds anything else."""
    if not os.path.lexists(prefix):
        return "missing"
    if not os.path.isdir(prefix):
        return None
    if not os.listdir(prefix):
        return "empty"
    if os.path.isfile(os.path.join(prefix, MARKER)):
        return "marked"
    if os.path.isfile(os.path.join(prefix, "pyvenv.cfg")):
        for site in glob.glob(os.path.join(glob.escape(prefix), "lib*", "python3*", "site-packages")):
            for entry in os.listdir(site):
                name = entry.lower()
                if name == "vpcnet" or (name.startswith("vpcnet-") and name.endswith((".dist-info", ".egg-info"))):
                    return "vpcnet venv"
    return None


def check_prefix(prefix: str) -> None:
    """Refuse, before anything is touched, a prefix that is not vpcnet's."""
    if whose_prefix(prefix) is not None:
        return
    what = "holds files that are not vpcnet's" if os.path.isdir(prefix) else "exists and is not a directory"
    example = "" if os.path.abspath(prefix) == DEFAULT_PREFIX else f" (e.g. {DEFAULT_PREFIX})"
    raise BootstrapError(f"--prefix {prefix} {what} (no {MARKER}, no venv with vpcnet in it) and installing would "
                         f"empty it, so nothing was changed: choose a new or empty directory{example}")


def mark(prefix: str) -> None:
    """Mark the prefix as vpcnet's, even a half-made venv, so that a run after a failed one may clear it."""
    if os.path.isdir(prefix):
        with contextlib.suppress(OSError), open(os.path.join(prefix, MARKER), "w") as fh:
            fh.write("vpcnet's virtual environment, made by python3 -m vpcnet.bootstrap\n")


def make_venv(prefix: str) -> str:
    python = os.path.join(prefix, "bin", "python")
    if os.access(python, os.X_OK) and _run([python, "-m", "pip", "--version"], 60).returncode == 0:
        return python
    for attempt in range(2):
        proc = _run([sys.executable, "-m", "venv", "--clear", prefix], 300)
        if proc.returncode == 0:
            return python
        if attempt == 0 and "ensurepip" in (proc.stdout + proc.stderr):
            _install_venv_package()
            continue
        break
    raise BootstrapError(f"could not create the virtual environment {prefix}:\n{_tail(proc)}")


def pip_install(python: str, tree: str, extras: str) -> None:
    target = f"{tree}[{extras}]" if extras else tree
    _say(f"installing {target} into {os.path.dirname(os.path.dirname(python))}")
    proc = _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--no-warn-script-location", target], 900)
    if proc.returncode != 0:
        raise BootstrapError(f"pip install {target} failed:\n{_tail(proc)}")


def link(prefix: str, bin_dir: str) -> str:
    """`bin_dir/vpcnet` → the venv's; an older link or a pip-made `vpcnet` script is replaced, any other
    file of that name is left alone and refused."""
    target = os.path.join(prefix, "bin", "vpcnet")
    path = os.path.join(bin_dir, "vpcnet")
    if os.path.lexists(path) and not os.path.islink(path):
        with open(path, "rb") as fh:
            head = fh.read(4096)
        if b"vpcnet" not in head:
            raise BootstrapError(f"{path} exists and is not vpcnet's: move it away, or pass --bin-dir")
    os.makedirs(bin_dir, exist_ok=True)
    tmp = f"{path}.bootstrap-{os.getpid()}"
    os.symlink(target, tmp)
    os.replace(tmp, path)            # atomic: a running `vpcnet` never sees the name missing
    return path


def docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host[len("unix://"):]
    return DOCKER_SOCKET


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def docker_answers(path: str, timeout: float = 3.0) -> bool:
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m vpcnet.bootstrap", description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="virtual environment (default %(default)s)")
    parser.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, help="where `vpcnet` is linked (default %(default)s)")
    parser.add_argument("--extras", default="", help="optional dependencies, e.g. aws (botocore)")
    args = parser.parse_args(argv)
    try:
        if sys.version_info < (3, 11):
            raise BootstrapError(f"vpcnet needs Python 3.11 or newer; {sys.executable} is "
                                 f"{sys.version.split()[0]}")
        tree = source_tree()
        check_prefix(args.prefix)
        try:
            python = make_venv(args.prefix)
        finally:
            mark(args.prefix)
        pip_install(python, tree, args.extras)
        path = link(args.prefix, args.bin_dir)
    except (BootstrapError, OSError) as exc:
        _say(f"failed: {exc}")
        return 1
    _say(f"installed: {path} -> {os.path.join(args.prefix, 'bin', 'vpcnet')}")
    sock = docker_socket()
    if not docker_answers(sock):
        print(f"vpcnet: no Docker engine answers on {sock}: {DOCKER_HELP}", file=sys.stderr)
        return EXIT_NO_DOCKER
    return 0


if __name__ == "__main__":
    sys.exit(main())
