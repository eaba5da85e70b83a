"""The metrics and health listener under abuse, over real sockets on 127.0.0.1: thousands of idle
connections keep its threads bounded and are dropped within seconds while a scrape (and, against a real
`vpcnet serve`, Docker's calls on the plugin socket) still gets answered; a flood of /healthz writes
nothing to the store; garbage, a huge head and a request that never ends are answered or dropped without
harm; the allow-list closes other clients' connections unanswered."""
from __future__ import annotations

import os
import resource
import select
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import wait_for

from vpcnet.config import Config
from vpcnet.observability import events, health
from vpcnet.state.store import Store

IDLE = 2000             # idle connections of a flood
OPEN_SECONDS = 4.0      # opened at a steady pace over this long
DROP_WITHIN = 7.0       # "a few seconds": the listener's request timeout (5 s) and some slack
CAP = 64                # VPCNET_METRICS_MAX_CONNECTIONS's default
THREAD_ROOM = CAP + 16  # handler threads the cap allows, with room for evicted ones still ending


def get(url: str, path: str, timeout: float = 10.0) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url + path, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@pytest.fixture
def nofile():
    """Room for both ends of every connection in this process; the old limit comes back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * IDLE + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {want} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _PluginStandIn(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The plugin socket the `socket` check connects to: answers HTTP and counts the connections."""
    daemon_threads = True
    request_queue_size = 64
    connections = 0

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            self.server.connections += 1
            self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


class Listener:
    """The listener of a real Observer (a real store, the stand-in plugin socket, a live reconciler)."""

    def __init__(self, base: str, **settings):
        self.stand_in = _PluginStandIn(os.path.join(base, "plugin.sock"), _PluginStandIn.Handler)
        threading.Thread(target=self.stand_in.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self.config = Config(socket=os.path.join(base, "plugin.sock"), state_dir=base,
                             metrics_addr="127.0.0.1:0", **settings)
        self.store = Store(self.config.db_path)
        self.reconciling = threading.Event()
        reconciler = threading.Thread(target=self.reconciling.wait, daemon=True)
        reconciler.start()
        self.observer = health.Observer(self.config, self.store, routes=None)
        self.observer.reconciler_thread = reconciler
        self.observer.start()
        addr = health.read_addr(base)
        assert addr, "the listener did not start"
        host, port = addr.rsplit(":", 1)
        self.addr = (host, int(port))
        self.url = f"http://{addr}"

    def close(self) -> None:
        self.observer.stop()
        self.reconciling.set()
        self.stand_in.shutdown()
        self.stand_in.server_close()
        self.store.close()


@pytest.fixture
def listener(tmp_path, monkeypatch):
    # a freshly started plugin's reconciler state: earlier tests of this process recorded route passes in the
    # process-wide one, and once they are older than the reconciler's deadline /healthz rightly answers 503
    monkeypatch.setattr(events, "RECONCILER", events.ReconcilerState())
    made: list[Listener] = []

    def start(**settings) -> Listener:
        base = tmp_path / f"l{len(made)}"
        base.mkdir()
        made.append(Listener(str(base), **settings))
        return made[-1]

    yield start
    for one in made:
        one.close()


class Flood:
    """Idle TCP connections opened at a steady pace; when the server closed each one."""

    def __init__(self, addr: tuple[str, int]):
        self.addr = addr
        self.socks: list[socket.socket] = []
        self.opened: list[float] = []
        self.closed: dict[int, float] = {}
        self.poll = select.poll()
        self._index: dict[int, int] = {}

    def open(self, count: int, seconds: float, step: int, at_step) -> None:
        start = time.monotonic()
        for i in range(count):
            delay = start + seconds * i / count - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sock = socket.create_connection(self.addr, timeout=10)
            sock.setblocking(False)
            self.socks.append(sock)
            self.opened.append(time.monotonic())
            self._index[sock.fileno()] = i
            self.poll.register(sock, select.POLLIN)
            if i % 20 == 0:
                self.reap()
            if i % step == 0 or i == count - 1:
                at_step(i)

    def reap(self) -> None:
        """Note the connections the server has closed (EOF or reset) since the last look."""
        now = time.monotonic()
        for fd, _ in self.poll.poll(0):
            i = self._index.pop(fd)
            self.poll.unregister(fd)
            try:
                data = self.socks[i].recv(1024)
            except BlockingIOError:
                self._index[fd] = i
                self.poll.register(fd, select.POLLIN)
                continue
            except OSError:
                data = b""
            assert data == b"", f"an idle connection got an answer: {data[:80]!r}"
            self.closed[i] = now

    def wait_all_closed(self, seconds: float) -> bool:
        return bool(wait_for(lambda: self.reap() or len(self.closed) == len(self.socks), seconds, step=0.1))

    def median_open(self) -> float:
        lifetimes = sorted(self.closed[i] - self.opened[i] for i in self.closed)
        return lifetimes[len(lifetimes) // 2] if lifetimes else float("nan")

    def longest_open(self) -> float:
        """Seconds the longest-lived connection stayed open (still-open ones count until now)."""
        now = time.monotonic()
        return max(self.closed.get(i, now) - opened for i, opened in enumerate(self.opened))

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tasks(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# -- idle connections -------------------------------------------------------------------------------
def test_idle_flood_keeps_threads_bounded_drops_idle_ones_and_still_answers(listener, nofile):
    server = listener()
    assert get(server.url, "/metrics")[0] == 200
    base_threads, base_fds = threading.active_count(), fds()
    flood = Flood(server.addr)
    peak = {"threads": 0, "server_fds": 0}
    answered: list[tuple[int, int]] = []

    def at_step(i: int) -> None:
        peak["threads"] = max(peak["threads"], threading.active_count() - base_threads)
        peak["server_fds"] = max(peak["server_fds"], fds() - base_fds - len(flood.socks))    # less the client ends
        if i in (IDLE // 2, IDLE - 1):
            answered.append((get(server.url, "/metrics")[0], get(server.url, "/healthz")[0]))

    try:
        flood.open(IDLE, OPEN_SECONDS, 100, at_step)
        all_closed = flood.wait_all_closed(DROP_WITHIN)
        print(f"\nin-process listener, {IDLE} idle connections: peak +{peak['threads']} threads, "
              f"+{peak['server_fds']} server fds; open {flood.median_open():.2f} s (median), "
              f"{flood.longest_open():.2f} s (longest); "
              f"{len(flood.closed)} closed by the server")
        assert answered == [(200, 200), (200, 200)], "a scrape was not answered during the flood"
        assert peak["threads"] <= THREAD_ROOM, f"{peak['threads']} listener threads for {IDLE} idle connections"
        assert peak["server_fds"] <= THREAD_ROOM, f"{peak['server_fds']} server-side fds held"
        assert all_closed, f"{IDLE - len(flood.closed)} idle connections still open after {DROP_WITHIN} s"
        assert flood.longest_open() <= DROP_WITHIN
    finally:
        flood.close()


def test_idle_flood_against_a_real_plugin_leaves_docker_calls_answered(plugin_factory, nofile):
    """The real `vpcnet serve`: the worker holding the listener (the one serving Docker's socket too)
    keeps its threads and fds bounded, and Docker's calls on the plugin socket succeed meanwhile."""
    plugin = plugin_factory()
    url = plugin.metrics_url()
    host, port = url[len("http://"):].rsplit(":", 1)
    with open(f"/proc/{plugin.proc.pid}/task/{plugin.proc.pid}/children") as fh:
        (worker,) = [int(pid) for pid in fh.read().split()]
    for call in ("/Plugin.Activate", "/NetworkDriver.GetCapabilities"):
        assert plugin.call(call, None)[0] == 200
    assert get(url, "/metrics")[0] == 200
    base_threads, base_fds = tasks(worker), fds(worker)
    flood = Flood((host, int(port)))
    peak = {"threads": 0, "fds": 0}
    failed: list[str] = []

    def at_step(i: int) -> None:
        peak["threads"] = max(peak["threads"], tasks(worker) - base_threads)
        peak["fds"] = max(peak["fds"], fds(worker) - base_fds)
        for call in ("/Plugin.Activate", "/NetworkDriver.GetCapabilities"):
            status, answer = plugin.call(call, None)
            if status != 200:
                failed.append(f"{call} at connection {i}: {status} {answer}")
        if i in (IDLE // 2, IDLE - 1):
            for path in ("/metrics", "/healthz"):
                status = get(url, path)[0]
                if status != 200:
                    failed.append(f"{path} at connection {i}: {status}")

    try:
        flood.open(IDLE, OPEN_SECONDS, 100, at_step)
        all_closed = flood.wait_all_closed(DROP_WITHIN)
        print(f"\nvpcnet serve worker, {IDLE} idle connections: {base_threads} threads and {base_fds} fds before, "
              f"peak +{peak['threads']} threads, +{peak['fds']} fds; open {flood.median_open():.2f} s (median), "
              f"{flood.longest_open():.2f} s (longest); "
              f"{len(flood.closed)} closed by the server")
        assert not failed, failed
        assert peak["threads"] <= THREAD_ROOM, f"{peak['threads']} more threads for {IDLE} idle connections"
        assert peak["fds"] <= THREAD_ROOM + 16, f"{peak['fds']} more fds for {IDLE} idle connections"
        assert all_closed, f"{IDLE - len(flood.closed)} idle connections still open after {DROP_WITHIN} s"
        assert flood.longest_open() <= DROP_WITHIN
    finally:
        flood.close()
    assert plugin.proc.poll() is None, plugin.log()


# -- /healthz is cheap ------------------------------------------------------------------------------
def _healthz_flood(url: str, seconds: float = 3.0) -> list[int]:
    """/healthz from 8 clients at once, back to back, for `seconds` (well inside the store probe's 10 s)."""
    deadline = time.monotonic() + seconds

    def client(_) -> list[int]:
        statuses = []
        while time.monotonic() < deadline:
            statuses.append(get(url, "/healthz")[0])
        return statuses

    with ThreadPoolExecutor(8) as pool:
        return [status for statuses in pool.map(client, range(8)) for status in statuses]


def test_healthz_flood_writes_nothing_and_runs_the_checks_about_once_a_second(listener):
    server = listener()
    assert get(server.url, "/healthz")[0] == 200
    probe = server.store.get_meta("health_probe")
    checks = server.stand_in.connections
    started = time.monotonic()
    statuses = _healthz_flood(server.url)
    elapsed = time.monotonic() - started
    ran = server.stand_in.connections - checks
    print(f"\n{len(statuses)} /healthz in {elapsed:.2f} s: checks ran {ran} times")
    assert len(statuses) >= 100 and set(statuses) == {200}, statuses[:20]
    assert server.store.get_meta("health_probe") == probe, "a /healthz of the flood wrote to the store"
    assert 1 <= ran <= elapsed + 2, f"the checks ran {ran} times in {elapsed:.1f} s (answers kept about a second)"


def test_healthz_flood_on_a_real_plugin_writes_nothing_to_its_store(plugin_factory):
    plugin = plugin_factory()
    url = plugin.metrics_url()
    assert get(url, "/healthz")[0] == 200
    state = Store(os.path.join(plugin.state_dir, "vpcnet.db"), readonly=True)
    try:
        probe = state.get_meta("health_probe")
        assert probe, "the first /healthz proved the store writable"
        statuses = _healthz_flood(url)
        assert len(statuses) >= 100 and set(statuses) == {200}, statuses[:20]
        assert state.get_meta("health_probe") == probe, "a /healthz of the flood wrote to the store"
    finally:
        state.close()


# -- bad input --------------------------------------------------------------------------------------
def _exchange(addr, data: bytes, seconds: float = 10.0) -> tuple[bytes, float]:
    """Send `data`, read until the server closes; what came back and after how long."""
    started = time.monotonic()
    with socket.create_connection(addr, timeout=seconds) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return got, time.monotonic() - started


def _listener_lives(server: Listener) -> None:
    status, body, _ = get(server.url, "/metrics")
    assert status == 200 and b"vpcnet_build_info" in body
    assert get(server.url, "/healthz")[0] == 200


def test_garbage_is_answered_400_and_the_listener_lives(listener):
    server = listener()
    for garbage in (b"\x16\x03\x01\x00\xa5garbage \xff\xfe\r\n\r\n",        # two words: HTTP/0.9 to http.server
                    b"\x00\x01\x02\r\n\r\n", b"GET /metrics HTTP/7.0\r\n\r\n"):
        got, _ = _exchange(server.addr, garbage)
        assert got.startswith(b"HTTP/1.1 400 "), f"{garbage!r} answered {got[:200]!r}"
    _listener_lives(server)


def test_an_oversized_head_is_refused_at_once(listener):
    """A header line that has not ended after far more than a GET needs is answered 431 now, rather than
    holding a thread until the line ends."""
    server = listener()
    with socket.create_connection(server.addr, timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000)
        sock.settimeout(2.0)
        try:
            got = sock.recv(4096)
        except socket.timeout:
            got = b"(nothing within 2 s)"
    assert got.startswith(b"HTTP/1.1 431 "), f"answered {got[:200]!r}"
    huge, _ = _exchange(server.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
    assert huge == b"" or huge.startswith(b"HTTP/1.1 431 "), f"answered {huge[:200]!r}"
    _listener_lives(server)


def test_a_never_ending_request_is_dropped(listener):
    """One header byte a second: a per-read timeout would wait forever; the request's deadline does not."""
    server = listener()
    with socket.create_connection(server.addr, timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        dropped = None
        while time.monotonic() - started < DROP_WITHIN + 3:
            try:
                sock.sendall(b"X")
                readable, _, _ = select.select([sock], [], [], 1.0)
                if readable and sock.recv(4096) == b"":
                    dropped = time.monotonic() - started
                    break
            except OSError:          # reset: dropped too
                dropped = time.monotonic() - started
                break
    assert dropped is not None and dropped <= DROP_WITHIN, f"a never-ending request held on for {dropped} s"
    _listener_lives(server)


def test_an_idle_connection_is_dropped_and_no_connection_is_kept_alive(listener):
    server = listener()
    idle, waited = _exchange(server.addr, b"", seconds=DROP_WITHIN + 3)
    assert idle == b"" and waited <= DROP_WITHIN, f"an idle connection: {idle[:200]!r} after {waited:.1f} s"
    for path in ("/metrics", "/healthz", "/nowhere"):
        headers = get(server.url, path)[2]
        assert headers.get("Connection", "").lower() == "close", f"{path}: keep-alive holds a thread per idle scraper"
    # A second request on the same connection is not read: the answer to the first ends it.
    got, waited = _exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
    assert got.count(b"HTTP/1.1 ") == 1 and waited < 2, f"{got[:300]!r} after {waited:.1f} s"


# -- the allow-list ---------------------------------------------------------------------------------
def test_allow_list_closes_other_clients_unanswered(listener):
    server = listener(metrics_allow=("192.0.2.0/24",))       # TEST-NET-1: not where this test connects from
    for path in ("/metrics", "/healthz"):
        got, _ = _exchange(server.addr, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert got == b"", f"a client outside the allow-list got an answer: {got[:80]!r}"
    allowed = listener(metrics_allow=("192.0.2.0/24", "127.0.0.0/8"))
    assert get(allowed.url, "/metrics")[0] == 200


def test_monitoring_guide_allow_list_example_loads(tmp_path):
    from test_docs import blocks

    from vpcnet import config as config_mod

    (example,) = blocks("monitoring.md", "toml config")
    (tmp_path / "vpcnet.toml").write_text(example)
    cfg = config_mod.load(str(tmp_path / "vpcnet.toml"), environ={}, check_socket_dir=False)
    assert cfg.metrics_allow and not cfg.metrics_addr.startswith("127.")


def test_listener_settings_are_validated():
    from vpcnet import config as config_mod

    cfg = config_mod.load(environ={"VPCNET_CONFIG": os.devnull, "VPCNET_METRICS_ALLOW": "10.0.0.0/8, 192.0.2.7",
                                   "VPCNET_METRICS_MAX_CONNECTIONS": "16"}, check_socket_dir=False)
    assert cfg.metrics_allow == ("10.0.0.0/8", "192.0.2.7/32") and cfg.metrics_max_connections == 16
    defaults = config_mod.load(environ={"VPCNET_CONFIG": os.devnull}, check_socket_dir=False)
    assert defaults.metrics_allow == () and defaults.metrics_max_connections == CAP
    for key, bad in (("VPCNET_METRICS_ALLOW", "10.0.0.1/8"), ("VPCNET_METRICS_ALLOW", "nowhere"),
                     ("VPCNET_METRICS_MAX_CONNECTIONS", "0")):
        with pytest.raises(config_mod.ConfigError, match=key):
            config_mod.load(environ={"VPCNET_CONFIG": os.devnull, key: bad}, check_socket_dir=False)
