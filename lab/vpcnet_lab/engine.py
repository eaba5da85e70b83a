"""One simulated host's processes: its Docker engine and its `vpcnet serve`.

The engine runs inside the host's network namespace and in a private mount namespace of its own
(`unshare -m --propagation private`), where tmpfs mounts over `/run/docker` and `/run/containerd` give
it its own plugin folder (it discovers only its own host's plugin socket), its own netns folder and its
own managed containerd. Copies of other namespaces' nsfs mounts are dropped from that private mount
table first, so the lab never keeps another engine's (or test's) network namespace alive.

The plugin enters the same mount and network namespaces (`nsenter --mount=/proc/<dockerd>/ns/mnt
--net=...`), so its socket lands in that engine's plugin folder and its bridges in that host.

Containers go into the cgroup parent `/vpclab-hK`, so whatever survives a hard stop is found and
killed by cgroup, never by process name.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from vpcnet_lab import netns
from vpcnet_lab.netns import LabError, run

log = logging.getLogger(__name__)

RUN_ROOT = "/run/vpclab"
DATA_ROOT = "/var/lib/vpclab"
CGROUP_ROOT = "/sys/fs/cgroup"
PLUGIN_SOCKET = "/run/docker/plugins/vpcnet.sock"     # inside the host's mount namespace
ENGINE_START_TIMEOUT = 60.0
PLUGIN_START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0

_ENGINE_SCRIPT = r"""
set -e
# Drop copies of other namespaces' nsfs mounts: they would keep those namespaces alive.
for m in $(awk '$0 ~ / - nsfs / {print $5}' /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null || true
done
mount -t tmpfs -o mode=0755,size=64m vpclab-docker /run/docker
mkdir -p /run/docker/plugins
if [ -d /run/containerd ]; then mount -t tmpfs -o mode=0711,size=64m vpclab-containerd /run/containerd; fi
exec "$@"
"""


def _proc_env(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [p.decode(errors="replace") for p in fh.read().split(b"\0") if p]
    except OSError:
        return []


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)     # reap if it is our child
        except ChildProcessError:
            pass
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)


def _stop_pid(pid: int | None, group: bool = False, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, bounded wait, then SIGKILL (the process group too when `group`)."""
    if pid is None or not alive(pid):
        return
    try:
        if group:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_gone(pid, timeout):
        if group:
            try:
                os.killpg(pid, signal.SIGKILL)   # workers left behind
            except ProcessLookupError:
                pass
        return
    try:
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _wait_gone(pid, 5.0)


@dataclass
class HostPaths:
    index: int

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def run_dir(self) -> str:
        return os.path.join(RUN_ROOT, self.name)

    @property
    def data_dir(self) -> str:
        return os.path.join(DATA_ROOT, self.name)

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "docker.sock")

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def exec_root(self) -> str:
        return os.path.join(self.run_dir, "exec")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.run_dir, "dockerd.pid")

    @property
    def plugin_pidfile(self) -> str:
        return os.path.join(self.run_dir, "vpcnet.pid")

    @property
    def data_root(self) -> str:
        return os.path.join(self.data_dir, "docker")

    @property
    def state_dir(self) -> str:
        return os.path.join(self.data_dir, "vpcnet")

    @property
    def engine_log(self) -> str:
        return os.path.join(self.data_dir, "dockerd.log")

    @property
    def plugin_log(self) -> str:
        return os.path.join(self.data_dir, "vpcnet.log")

    @property
    def cgroup_parent(self) -> str:
        return f"vpclab-{self.name}"


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _write_pid(path: str, pid: int) -> None:
    with open(path, "w") as fh:
        fh.write(f"{pid}\n")


class Host:
    """Processes and files of simulated host K (its namespace is `netns_name`)."""

    def __init__(self, index: int, netns_name: str):
        self.paths = HostPaths(index)
        self.netns = netns_name

    @property
    def docker(self) -> list[str]:
        return ["docker", "-H", self.paths.docker_host]

    # -- engine ---------------------------------------------------------------------------------
    def engine_pid(self) -> int | None:
        pid = _read_pid(self.paths.pidfile)
        if pid and alive(pid) and self.paths.socket in " ".join(_cmdline(pid)):
            return pid
        return None

    def engine_answers(self) -> bool:
        if not os.path.exists(self.paths.socket):
            return False
        return subprocess.run([*self.docker, "version", "--format", "{{.Server.Version}}"],
                              capture_output=True, timeout=20).returncode == 0

    def start_engine(self, timeout: float = ENGINE_START_TIMEOUT) -> int:
        pid = self.engine_pid()
        if pid and self.engine_answers():
            return pid
        if pid:
            raise LabError(f"{self.paths.name}: dockerd {pid} runs but does not answer on {self.paths.socket}")
        p = self.paths
        for d in (p.run_dir, p.exec_root, p.data_root, p.state_dir):
            os.makedirs(d, mode=0o711, exist_ok=True)
        for stale in (p.socket, p.pidfile):
            if os.path.exists(stale):
                os.unlink(stale)
        config_file = os.path.join(p.run_dir, "daemon.json")
        with open(config_file, "w") as fh:
            fh.write("{}\n")                   # not /etc/docker/daemon.json: the lab's own settings
        cmd = ["unshare", "-m", "--propagation", "private", "--",
               "nsenter", f"--net={netns.path(self.netns)}", "--",
               "sh", "-c", _ENGINE_SCRIPT, "vpclab-engine",
               "dockerd", "--config-file", config_file, "-H", p.docker_host,
               "--data-root", p.data_root, "--exec-root", p.exec_root, "--pidfile", p.pidfile,
               "--cgroup-parent", f"/{p.cgroup_parent}", "--log-level", "warn"]
        with open(p.engine_log, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=_clean_env())
        # unshare, nsenter and sh all exec: the child's pid is dockerd's.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"{p.name}: dockerd exited {proc.returncode}; last log lines:\n"
                               + _tail(p.engine_log))
            if os.path.exists(p.socket) and self.engine_answers():
                return proc.pid
            time.sleep(0.3)
        raise LabError(f"{p.name}: dockerd did not answer on {p.socket} within {timeout:.0f}s; log:\n"
                       + _tail(p.engine_log))

    def stop_engine(self) -> None:
        p = self.paths
        pid = self.engine_pid()
        if pid and self.engine_answers():
            ids = run([*self.docker, "ps", "-aq"], check=False, timeout=30).stdout.split()
            if ids:
                run([*self.docker, "rm", "-f", *ids], check=False, timeout=120)
            run([*self.docker, "swarm", "leave", "--force"], check=False, timeout=30)
        _stop_pid(pid, group=False, timeout=STOP_TIMEOUT)
        kill_cgroup(p.cgroup_parent)
        # anything else started from the engine's mount namespace (containerd, shims)
        for shim in _pids_mentioning(p.run_dir + "/"):
            _stop_pid(shim, timeout=5.0)

    # -- plugin ---------------------------------------------------------------------------------
    def plugin_pid(self) -> int | None:
        pid = _read_pid(self.paths.plugin_pidfile)
        if pid and alive(pid) and _proc_env(pid).get("VPCNET_STATE_DIR") == self.paths.state_dir:
            return pid
        return None

    def plugin_env(self, settings: dict[str, str]) -> dict[str, str]:
        env = with_code_path(_clean_env())
        env.update({"VPCNET_CONFIG": os.devnull, "VPCNET_SOCKET": PLUGIN_SOCKET,
                    "VPCNET_STATE_DIR": self.paths.state_dir})
        env.update(settings)
        return env

    def start_plugin(self, settings: dict[str, str], timeout: float = PLUGIN_START_TIMEOUT) -> int:
        pid = self.plugin_pid()
        if pid:
            return pid
        engine = self.engine_pid()
        if not engine:
            raise LabError(f"{self.paths.name}: the engine is not running, so the plugin has no namespace")
        cmd = ["nsenter", f"--mount=/proc/{engine}/ns/mnt", f"--net={netns.path(self.netns)}", "--",
               sys.executable, "-m", "vpcnet.cli", "serve"]
        with open(self.paths.plugin_log, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=self.plugin_env(settings))
        _write_pid(self.paths.plugin_pidfile, proc.pid)
        socket_path = f"/proc/{engine}/root{PLUGIN_SOCKET}"      # the socket as the engine sees it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"{self.paths.name}: vpcnet serve exited {proc.returncode}:\n"
                               + _tail(self.paths.plugin_log))
            if os.path.exists(socket_path):
                return proc.pid
            time.sleep(0.1)
        raise LabError(f"{self.paths.name}: plugin socket not up within {timeout:.0f}s:\n"
                       + _tail(self.paths.plugin_log))

    def kill_plugin(self, sig: int = signal.SIGKILL) -> None:
        """Kill the plugin's process group at once (as `kill -9` would), no clean-up by it."""
        pid = self.plugin_pid()
        if pid:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
            _wait_gone(pid, 10.0)

    def stop_plugin(self) -> None:
        _stop_pid(self.plugin_pid(), group=True, timeout=10.0)
        if os.path.exists(self.paths.plugin_pidfile):
            os.unlink(self.paths.plugin_pidfile)

    def remove_files(self) -> None:
        for d in (self.paths.run_dir, self.paths.data_dir):
            _remove_tree(d)


def _remove_tree(path: str) -> None:
    if not os.path.lexists(path):
        return
    # overlay mounts of the engine live in its (now gone) mount namespace; anything still mounted here
    # under the lab's folders is unmounted first, deepest first.
    for mnt in sorted(lab_mounts(path), reverse=True):
        run(["umount", "-l", mnt], check=False)
    shutil.rmtree(path, ignore_errors=True)


def lab_mounts(under: str = "") -> list[str]:
    """Mount points in this mount namespace that belong to the lab (under its folders, or its netns)."""
    prefixes = (under,) if under else (RUN_ROOT, DATA_ROOT, os.path.join(netns.NETNS_DIR, "vpclab-"))
    out = []
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                point = line.split()[4].encode().decode("unicode_escape")
                if any(point == p or point.startswith(p.rstrip("/") + "/") or
                       (p.endswith("-") and point.startswith(p)) for p in prefixes):
                    out.append(point)
    except OSError:
        pass
    return out


def _clean_env() -> dict[str, str]:
    """This environment without proxies (lab traffic never goes through one) or Docker overrides."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not k.startswith("DOCKER_") and not k.startswith("VPCNET_")}
    env["NO_PROXY"] = env["no_proxy"] = "*"
    return env


def with_code_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with PYTHONPATH led by the folders this process imports vpcnet and vpcnet_lab from (a checkout's
    root and its lab/, or site-packages), so a `python -m vpcnet.cli` child runs this same code."""
    import vpcnet
    import vpcnet_lab

    roots: list[str] = []
    for module in (vpcnet, vpcnet_lab):
        root = os.path.dirname(os.path.dirname(os.path.abspath(str(module.__file__))))
        if root not in roots:
            roots.append(root)
    env["PYTHONPATH"] = os.pathsep.join(roots + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


def kill_cgroup(name: str) -> None:
    """Kill every process in cgroup `/<name>` (any controller) and remove the cgroups, bounded."""
    dirs = [d for d in glob.glob(os.path.join(CGROUP_ROOT, "*", name)) + [os.path.join(CGROUP_ROOT, name)]
            if os.path.isdir(d)]
    for _ in range(10):
        pids: set[int] = set()
        for d in dirs:
            for procs in glob.glob(os.path.join(d, "**", "cgroup.procs"), recursive=True):
                try:
                    with open(procs) as fh:
                        pids.update(int(x) for x in fh.read().split())
                except (OSError, ValueError):
                    pass
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    for d in dirs:
        subdirs = sorted((root for root, _dirs, _files in os.walk(d)), key=len, reverse=True)
        for sub in subdirs:
            try:
                os.rmdir(sub)
            except OSError:
                pass


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions `text` (a lab folder: containerd, shims)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            if any(text in part for part in _cmdline(int(entry))):
                out.append(int(entry))
    return out
