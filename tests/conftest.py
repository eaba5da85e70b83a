"""Shared fixtures: root/kernel/Docker checks, a vpcnet plugin process per test, clean-up that runs
even when a test fails.

Tests that need root, the kernel or a Docker engine skip with a reason when those are missing; with
VPCNET_TEST_STRICT=1 (set by .ci/run, where all three are provided) a missing one fails instead, so in CI
nothing of the core skips silently.

Engines: the tests drive whatever `docker` answers (DOCKER_HOST). tests/engines/with-docker.sh runs them
against a current engine in a sandbox and sets VPCNET_TEST_ENGINE to its version; the engine then has
to be that one. Tests of what only current engines send (`current_docker`) skip on older ones.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from vpcnet_lab import plugin_client

STRICT = os.environ.get("VPCNET_TEST_STRICT") == "1"

# Defense in depth: nothing in the test process may reach a cloud metadata address, whatever a
# configuration says (plugins started as subprocesses get closed 127.0.0.1 ports in their environment).
FORBIDDEN_ADDRESSES = {"100.100.100.200", "169.254.169.254"}
_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex


def _guard(address) -> None:
    if isinstance(address, tuple) and address and address[0] in FORBIDDEN_ADDRESSES:
        raise AssertionError(f"a test tried to reach the metadata address {address[0]}")


def _guarded_connect(self, address):
    _guard(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _guard(address)
    return _real_connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = _guarded_connect, _guarded_connect_ex
PLUGIN_DIR = "/run/docker/plugins"
_cluster_counter = itertools.count()


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if STRICT:
        pytest.fail(f"required by VPCNET_TEST_STRICT=1: {reason}")
    pytest.skip(reason)


def is_root() -> bool:
    return os.geteuid() == 0


def docker_up(docker: list[str] | None = None) -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run([*(docker or ["docker"]), "info"], capture_output=True, timeout=30).returncode == 0


def run(cmd: list[str], check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def free_cluster(first: int, last: int, exclude: tuple[str, ...] = (), shuffle: bool = False) -> str:
    """A 10.N.0.0/16 (first <= N <= last) that no route or address on this machine overlaps (another
    run's or another test's network), nor any of `exclude`."""
    import ipaddress
    import random

    text = (subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
            + subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout)
    taken = [ipaddress.IPv4Network(e) for e in exclude]
    for word in text.split():
        if word.startswith("10."):
            try:
                taken.append(ipaddress.IPv4Network(word, strict=False))
            except ValueError:
                pass
    span = last - first + 1
    offsets = random.sample(range(span), span) if shuffle else [
        (next(_cluster_counter) + os.getpid() + i) % span for i in range(span)]
    for offset in offsets:
        candidate = ipaddress.IPv4Network(f"10.{first + offset}.0.0/16")
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    raise RuntimeError(f"no free cluster CIDR in 10.{first}-{last}.0.0/16 on this machine")


def next_cluster() -> str:
    """A cluster CIDR for a test plugin (10.100-227.0.0/16), clear of everything else on the machine."""
    return free_cluster(100, 227)


def wait_for(predicate, seconds: float, step: float = 0.05):
    """Poll `predicate` until it returns something truthy or `seconds` pass (bounded); its last value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@pytest.fixture
def root():
    require(is_root(), "needs root (network namespaces, bridges, iptables)")


def engine_version(docker: list[str] | None = None) -> str:
    return run([*(docker or ["docker"]), "version", "--format", "{{.Server.Version}}"], timeout=30).stdout.strip()


def engine_major(docker: list[str] | None = None) -> int:
    return int(engine_version(docker).split(".")[0])


CURRENT_DOCKER = 28       # the engine the protocol cases of Docker 28/29 are tested on


@pytest.fixture(scope="session")
def docker_engine():
    require(is_root(), "needs root")
    require(docker_up(), "needs a running Docker engine (docker info failed)")
    expected = os.environ.get("VPCNET_TEST_ENGINE")
    if expected and engine_version() != expected:
        pytest.fail(f"VPCNET_TEST_ENGINE={expected} but docker answers with {engine_version()}: check DOCKER_HOST")
    return ["docker"]


@pytest.fixture(scope="session")
def current_docker(docker_engine):
    """Docker 28 or newer (what users run): protocol cases older engines never send."""
    version = engine_version(docker_engine)
    if int(version.split(".")[0]) < CURRENT_DOCKER:
        pytest.skip(f"needs Docker >= {CURRENT_DOCKER} (this engine is {version}); .ci/run runs it on a "
                    "current engine through tests/engines/with-docker.sh")
    return docker_engine


@pytest.fixture(scope="session")
def test_image(docker_engine):
    from vpcnet_lab import image

    return image.build(docker_engine)


class PluginProcess:
    """`vpcnet serve` as a child process, with its own socket name (= driver name), state and cluster."""

    def __init__(self, tmp_path, env: dict[str, str] | None = None, netns: str | None = None,
                 plugin_dir: str = PLUGIN_DIR, wrap: tuple[str, ...] = ()):
        self.name = unique("vpcnet-t")
        self.socket = os.path.join(plugin_dir, self.name + ".sock")
        self.state_dir = str(tmp_path / f"state-{self.name}")
        self.log_path = str(tmp_path / f"{self.name}.log")
        self.netns = netns
        self.wrap = list(wrap)          # a command the plugin runs under, e.g. setpriv dropping capabilities
        self.env = dict(os.environ)
        self.env.update({"VPCNET_SOCKET": self.socket, "VPCNET_STATE_DIR": self.state_dir,
                         "VPCNET_CLUSTER_CIDR": next_cluster(), "VPCNET_LOG_LEVEL": "DEBUG",
                         "VPCNET_CONFIG": os.devnull,
                         # a free loopback port each: test plugins never fight over the default one
                         "VPCNET_METRICS_ADDR": "127.0.0.1:0"})
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None

    @property
    def cluster(self) -> str:
        return self.env["VPCNET_CLUSTER_CIDR"]

    def start(self, wait: float = 10.0) -> float:
        """Start and wait until the socket answers; returns the seconds until it accepted connections
        (the socket is "up": Docker's calls queue in its backlog until the worker is ready)."""
        prefix = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
        started = time.monotonic()
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([*prefix, *self.wrap, sys.executable, "-m", "vpcnet.cli", "serve"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = started + wait
        up_after = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vpcnet serve exited {self.proc.returncode}:\n{self.log()}")
            if up_after is None and self.connectable():
                up_after = time.monotonic() - started
            if up_after is not None and self.answers():
                return up_after
            time.sleep(0.02)
        raise AssertionError(f"socket {self.socket} not up within {wait}s:\n{self.log()}")

    def connectable(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(self.socket)
                return True
            except OSError:
                return False

    def answers(self) -> bool:
        try:
            return self.call("/Plugin.Activate", None)[0] == 200
        except OSError:
            return False

    def call(self, path: str, body) -> tuple[int, dict]:
        """One raw plugin call over the unix socket (what Docker does)."""
        return plugin_client.call(self.socket, path, body)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        try:   # workers orphaned by a kill -9 of the master
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, AttributeError, TypeError):
            pass
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def log(self) -> str:
        try:
            with open(self.log_path) as fh:
                return fh.read()[-20000:]
        except OSError:
            return ""

    def metrics_url(self, wait: float = 10.0) -> str:
        """http://HOST:PORT of this plugin's /metrics and /healthz listener (it writes the bound address
        to its state dir once it is the reconciler)."""
        from vpcnet.observability.health import read_addr

        addr = wait_for(lambda: read_addr(self.state_dir), wait)
        assert addr, f"no metrics listener within {wait}s:\n{self.log()}"
        return f"http://{addr}"

    def status(self) -> dict:
        out = run([sys.executable, "-m", "vpcnet.cli", "status", "--json"], env=self.env)
        return json.loads(out.stdout)


class DockerSession:
    """Docker CLI helpers that remember what a test made and remove it afterwards."""

    def __init__(self, docker: list[str], image: str):
        self.docker = docker
        self.image = image
        self.label = unique("vpcnet-test-")
        self.networks: list[str] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return run([*self.docker, *args], check=check, timeout=timeout)

    def network_create(self, plugin: PluginProcess, name: str | None = None, *extra: str,
                       check: bool = True) -> subprocess.CompletedProcess:
        name = name or unique("vnet")
        proc = self("network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, *extra, name,
                    check=check)
        if proc.returncode == 0:
            self.networks.append(name)
        proc.name = name
        return proc

    def run_container(self, network: str, *args: str, name: str | None = None, detach: bool = True,
                      check: bool = True, cmd: tuple[str, ...] = ("sleep", "3600")) -> subprocess.CompletedProcess:
        name = name or unique("c")
        proc = self("run", *(("-d",) if detach else ("--rm",)), "--label", self.label, "--name", name,
                    "--network", network, *args, self.image, *cmd, check=check)
        proc.name = name
        return proc

    def exec(self, container: str, *cmd: str, check: bool = True, timeout: float = 60):
        return self("exec", container, *cmd, check=check, timeout=timeout)

    def ip_of(self, container: str) -> str:
        out = self("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container)
        return out.stdout.split()[0]

    def cleanup(self) -> None:
        ids = self("ps", "-aq", "--filter", f"label={self.label}", check=False).stdout.split()
        if ids:
            self("rm", "-f", *ids, check=False)
        for net in reversed(self.networks):
            self("network", "rm", net, check=False)


@pytest.fixture
def plugin_factory(tmp_path, root):
    made: list[PluginProcess] = []

    def make(env: dict[str, str] | None = None, start: bool = True, **kw) -> PluginProcess:
        plugin = PluginProcess(tmp_path, env, **kw)
        made.append(plugin)
        if start:
            plugin.start()
        return plugin

    yield make
    for plugin in made:
        plugin.cleanup()


@pytest.fixture
def dock(docker_engine, test_image):
    session = DockerSession(docker_engine, test_image)
    yield session
    session.cleanup()


def source_seen_by(ns: str, listen_ip: str, dock, container: str, port: int = 7007) -> str:
    """Connect from the container to a TCP server on listen_ip in `ns`; the source address the server saw
    ("" when nothing arrived). The client starts only once the server listens (a loaded machine may take
    seconds to start Python), and tries again while nothing arrived, at most 3 times."""
    import textwrap

    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(f"""
            import socket
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("{listen_ip}", {port})); s.listen(1); s.settimeout(20)
            print("listening", flush=True)
            c, addr = s.accept(); print(addr[0], flush=True); c.close()
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "listening":       # ends at the server's exit, at worst
            return ""
        for _ in range(3):
            dock.exec(container, "sh", "-c", f"echo hi | nc -w 3 {listen_ip} {port}", check=False)
            if server.poll() is not None:
                break
            time.sleep(0.5)
            if server.poll() is not None:
                break
        out, _ = server.communicate(timeout=25)
        return out.strip()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.fixture
def remote_host(netns_factory):
    """make(cluster CIDR, link name) -> (netns, address): 'another host' of the cluster behind a veth of
    this host named `link`, holding an address in a block of the cluster CIDR that is not this host's,
    routed both ways as the VPC route table would. The veth is not the default route's device: a plugin
    reaching that host needs it among its uplinks (VPCNET_UPLINKS=<link>), as on a host whose VPC NIC
    does not carry the default route. Its link is removed at the end."""
    import ipaddress

    links: list[str] = []

    def make(cluster: str, link: str) -> tuple[str, str]:
        block = list(ipaddress.IPv4Network(cluster).subnets(new_prefix=24))[-2]   # far from claimed blocks
        ns = netns_factory("vpcrh")
        host_ip, peer_ip = str(block[1]), str(block[2])
        run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns])
        links.append(link)
        run(["ip", "addr", "add", f"{host_ip}/24", "dev", link])
        run(["ip", "link", "set", link, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{peer_ip}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", host_ip])
        return ns, peer_ip

    yield make
    for link in links:
        subprocess.run(["ip", "link", "del", link], capture_output=True)


@pytest.fixture
def netns_factory(root):
    """Network namespaces named uniquely, deleted at the end whatever happens."""
    made: list[str] = []

    def make(prefix: str = "vpct") -> str:
        name = unique(prefix)
        run(["ip", "netns", "add", name])
        made.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "pids", name], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def stop_group(proc: subprocess.Popen) -> None:
    """End a process started with start_new_session=True, and its group: SIGTERM, then SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
