"""`/metrics` and `/healthz` beside the plugin socket, and the systemd watchdog.

One listener per plugin: the gunicorn worker that holds the reconciler lock (vpcnet.routes) starts it
when it becomes the reconciler (`Observer.start`), so with several workers only one process binds
`VPCNET_METRICS_ADDR`, and it is the one whose reconciler state (last pass, route-table listing) the
health check and the table gauges read; the other workers' counters reach it through prometheus_client's
multiprocess files (vpcnet.observability.metrics). The listener is a small threading HTTP server of its own, never one
of gunicorn's threads: a slow scrape cannot delay a Docker call.

It shares that worker's process, so its clients must not be able to use up the process's threads (under
systemd, TasksMax counts them, and a fork of iptables-restore then fails): each connection gets
`REQUEST_TIMEOUT` to send its request and again to take the answer, one request per connection (no
keep-alive), and at most `VPCNET_METRICS_MAX_CONNECTIONS` at once (`_Slots`); `VPCNET_METRICS_ALLOW`
closes other clients' connections unanswered.

Health checks (`/healthz`: 200 and a JSON body when all pass, 503 naming the failing checks; one answer
serves every request for `HEALTH_MAX_AGE`, so a flood of them costs one round of checks a second):
- `socket`: the plugin socket accepts a connection and answers HTTP (a GET, which reaches no driver code
  and counts as no Docker call);
- `store`: one write transaction on the sqlite store commits (a commit is trusted for `STORE_PROBE_EVERY`,
  so the check writes at most that often);
- `reconciler`: its thread is alive and its last pass ended within `reconciler_deadline()` (a pass may
  legitimately spend minutes in bounded backoff against a failing cloud).

Under systemd with `WatchdogSec=`, the same checks run every third of the watchdog period and
`WATCHDOG=1` is sent to $NOTIFY_SOCKET only when they all pass, so a wedged plugin is restarted.
The bound address (useful with port 0) is written to `<state_dir>/metrics.addr` for `vpcnet doctor`.
"""
from __future__ import annotations

import io
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from vpcnet import config as config_mod

log = logging.getLogger(__name__)

ADDR_FILE = "metrics.addr"
SOCKET_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0       # seconds a client has to send its request, and again to take the answer
MAX_REQUEST_HEAD = 16384    # bytes of request line and headers; a scrape's GET needs a few hundred
HEALTH_MAX_AGE = 1.0        # seconds one /healthz answer serves every request
STORE_PROBE_EVERY = 10.0    # seconds a store write that committed is trusted


def reconciler_deadline(interval: float) -> float:
    """Seconds without a finished pass after which the reconciler counts as dead: three intervals, and
    never less than the longest bounded pass (a few backoffs of up to 60 s each, plus the pass lock)."""
    return max(3 * interval, interval + 300.0)


# -- the checks ---------------------------------------------------------------------------------------
def socket_answers(path: str, timeout: float = SOCKET_TIMEOUT) -> str:
    """'' when the plugin socket answers HTTP, else why not."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: plugin\r\nConnection: close\r\n\r\n")
            head = sock.recv(64)
    except OSError as exc:
        return f"plugin socket {path} does not answer: {exc}"
    if not head.startswith(b"HTTP/1."):
        return f"plugin socket {path} answered something that is not HTTP"
    return ""


def store_writable(store) -> str:
    try:
        with store.tx() as db:
            store.set_meta(db, "health_probe", repr(time.time()))
    except Exception as exc:       # any sqlite failure (disk full, read-only, locked past the timeout)
        return f"store {store.path} is not writable: {exc}"
    return ""


class Health:
    """The named checks, run on demand (`run`) or reused while recent (`recent`)."""

    def __init__(self, config, store, reconciler_thread: Callable[[], threading.Thread | None],
                 last_pass: Callable[[], float | None], started: float | None = None):
        self.config = config
        self.store = store
        self.reconciler_thread = reconciler_thread
        self.last_pass = last_pass
        self.started = started if started is not None else time.time()
        self._lock = threading.Lock()           # one round of checks at a time; the others wait for it
        self._answer: dict[str, str] | None = None
        self._answered = 0.0
        self._store_committed: float | None = None

    def reconciler(self) -> str:
        thread = self.reconciler_thread()
        if thread is None or not thread.is_alive():
            return "the reconciler thread is not running"
        deadline = reconciler_deadline(self.config.reconcile_interval)
        since = self.last_pass() or self.started
        age = time.time() - since
        if age > deadline:
            return f"no reconcile pass finished for {age:.0f} s (limit {deadline:.0f} s)"
        return ""

    def store_check(self) -> str:
        """The write probe, skipped while the last one that committed is recent: a failure is seen at
        most `STORE_PROBE_EVERY` late, and the store is not written on every request."""
        if self._store_committed is not None and time.monotonic() - self._store_committed < STORE_PROBE_EVERY:
            return ""
        problem = store_writable(self.store)
        self._store_committed = None if problem else time.monotonic()
        return problem

    def run(self) -> dict[str, str]:
        """Check name -> '' when it passes, else the problem (checked now)."""
        with self._lock:
            return self._run()

    def recent(self, max_age: float = HEALTH_MAX_AGE) -> dict[str, str]:
        """The last answer while it is younger than `max_age`, else a new one."""
        with self._lock:
            if self._answer is not None and time.monotonic() - self._answered < max_age:
                return dict(self._answer)
            return self._run()

    def _run(self) -> dict[str, str]:
        results = {"socket": socket_answers(self.config.socket), "store": self.store_check(),
                   "reconciler": self.reconciler()}
        self._answer, self._answered = dict(results), time.monotonic()
        return results


def health_body(results: dict[str, str]) -> tuple[int, dict]:
    failing = sorted(name for name, problem in results.items() if problem)
    body: dict[str, Any] = {"status": "fail" if failing else "ok",
                            "checks": {name: ({"ok": False, "problem": problem} if problem else {"ok": True})
                                       for name, problem in results.items()}}
    if failing:
        body["failing"] = failing
    return (503 if failing else 200), body


# -- the listener -----------------------------------------------------------------------------------
class _Slots:
    """At most `limit` connections held at once. Over it, the one that has waited longest without sending
    its request is closed to make room: idle clients cannot keep out a scrape, which sends its request at
    once. When every held connection is being answered, the newcomer is closed instead. An evicted
    connection's thread ends as soon as its read returns; `spare` bounds how many may still be ending."""

    def __init__(self, limit: int):
        self.limit = limit
        self.spare = max(4, limit // 8)
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, None] = {}      # no request yet, oldest first
        self._answering: set[socket.socket] = set()
        self._threads = 0                                   # held ones and evicted ones still ending

    def admit(self, conn: socket.socket) -> bool:
        with self._lock:
            if len(self._waiting) + len(self._answering) >= self.limit:
                if not self._waiting or self._threads >= self.limit + self.spare:
                    return False
                oldest = next(iter(self._waiting))
                del self._waiting[oldest]
                try:
                    oldest.shutdown(socket.SHUT_RDWR)      # its thread's recv returns; it closes the socket
                except OSError:
                    pass
            self._waiting[conn] = None
            self._threads += 1
            return True

    def answering(self, conn: socket.socket) -> bool:
        """Its request arrived: no longer evictable. False when it was evicted meanwhile."""
        with self._lock:
            if conn not in self._waiting:
                return False
            del self._waiting[conn]
            self._answering.add(conn)
            return True

    def release(self, conn: socket.socket) -> None:
        with self._lock:
            self._waiting.pop(conn, None)
            self._answering.discard(conn)
            self._threads -= 1


class _Handler(BaseHTTPRequestHandler):
    """One request per connection, read within the server's timeout whatever pace the client keeps."""
    protocol_version = "HTTP/1.1"
    server_version = "vpcnet"
    timeout = REQUEST_TIMEOUT

    def log_message(self, fmt, *args):
        log.debug("metrics listener: " + fmt, *args)

    server: _Server

    def handle(self) -> None:
        head = self._read_head()
        if head is None or not self.server.slots.answering(self.connection):
            return
        if not re.match(rb"[^\r\n]* HTTP/1\.\d\r?\n", head):     # no HTTP/0.9: its answers have no status line
            self._refuse(400, "Bad Request")
            return
        self.rfile.close()
        self.rfile = io.BytesIO(head)
        self.connection.settimeout(self.server.request_timeout)     # the whole answer within it (sendall)
        self.handle_one_request()

    def _read_head(self) -> bytes | None:
        """The request line and headers, read by one deadline (a per-read timeout would let a client that
        sends a byte now and then hold the connection forever); None when the client sent nothing in
        time, hung up, or sent more than a request needs (answered 431)."""
        deadline = time.monotonic() + self.server.request_timeout
        head = b""
        while True:
            end = re.search(rb"\r?\n\r?\n", head)
            if end:
                return head[:end.end()]
            if len(head) > MAX_REQUEST_HEAD:
                self._refuse(431, "Request Header Fields Too Large")
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                self.connection.settimeout(remaining)
                chunk = self.connection.recv(4096)
            except OSError:
                return None
            if not chunk:
                return None
            head += chunk

    def _refuse(self, status: int, reason: str) -> None:
        try:
            self.connection.settimeout(1.0)
            self.connection.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n"
                                    "Connection: close\r\n\r\n".encode())
        except OSError:
            pass

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            with self.server.render_lock:       # one scrape renders at a time: a flood costs one thread's CPU
                data = self.server.exposition.render()
            self._send(200, data, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            status, body = health_body(self.server.health.recent())
            self._send(status, json.dumps(body).encode() + b"\n", "application/json")
        else:
            self._send(404, b"vpcnet: /metrics or /healthz\n", "text/plain")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    """A thread per connection, for at most `max_connections` of them; clients outside `allow` (when
    given) closed without an answer."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128        # a burst of connects waits in the backlog instead of being retried a second later
    exposition: Any          # vpcnet.observability.metrics.Exposition, set before serving
    health: Health

    def __init__(self, address: tuple[str, int], max_connections: int = 64,
                 allow: tuple[str, ...] = (), request_timeout: float = REQUEST_TIMEOUT):
        self.slots = _Slots(max_connections)
        self.allow = tuple(ipaddress.ip_network(net) for net in allow)
        self.request_timeout = request_timeout
        self.render_lock = threading.Lock()
        super().__init__(address, _Handler)

    def verify_request(self, request, client_address) -> bool:
        if not self.allow:
            return True
        try:
            client = ipaddress.ip_address(client_address[0])
        except ValueError:
            return False
        if any(client in net for net in self.allow):
            return True
        log.debug("metrics listener: %s is outside VPCNET_METRICS_ALLOW, closed", client_address[0])
        return False

    def process_request(self, request, client_address) -> None:
        if not self.slots.admit(request):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)       # starts the connection's thread
        except BaseException:
            self.slots.release(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.slots.release(request)         # before the close: an evictor never sees a closed socket
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # socketserver prints a traceback to stderr; a broken client is not worth more than a debug line.
        log.debug("metrics listener: connection from %s failed", client_address, exc_info=True)


class Observer:
    """The listener and the watchdog of one plugin process; `start()` when it becomes the reconciler."""

    def __init__(self, config, store, routes):
        self.config = config
        self.store = store
        self.routes = routes
        self.reconciler_thread: threading.Thread | None = None
        self.server: _Server | None = None
        self.health = Health(config, store, lambda: self.reconciler_thread,
                             lambda: _last_pass())
        self._stop = threading.Event()

    def start(self) -> None:
        if self.config.metrics_addr:
            self._listen()
        watchdog_thread = watchdog_period()
        if watchdog_thread:
            threading.Thread(target=self._watchdog, args=(watchdog_thread,), name="vpcnet-watchdog",
                             daemon=True).start()

    def _listen(self) -> None:
        from vpcnet.observability import metrics

        try:
            host, port = config_mod.parse_addr(self.config.metrics_addr)
            server = _Server((host, port), max_connections=self.config.metrics_max_connections,
                             allow=self.config.metrics_allow)
        except (OSError, ValueError) as exc:
            # Metrics are worth a loud warning, never the plugin: Docker's calls keep being served.
            log.error("metrics and health listener not started on %s: %s", self.config.metrics_addr, exc)
            return
        server.exposition = metrics.Exposition(self.store, docker_socket=docker_socket(self.config),
                                                per=self.config.endpoint_metrics,
                                                peer_stats=metrics.peer_map if self.config.peers else None,
                                                peers_per_endpoint=self.config.peers_per_endpoint,
                                                prefixes=metrics.prefix_status(self.config, self.store))
        server.health = self.health
        self.server = server
        bound = f"{server.server_address[0]!s}:{server.server_address[1]}"
        _write_addr(self.config.state_dir, bound)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="vpcnet-metrics",
                         daemon=True).start()
        log.info("metrics on http://%s/metrics, health on http://%s/healthz", bound, bound)

    def _watchdog(self, period: float) -> None:
        while not self._stop.wait(period / 3):
            results = self.health.run()
            failing = {k: v for k, v in results.items() if v}
            if failing:
                log.warning("unhealthy, not pinging the systemd watchdog: %s",
                            "; ".join(f"{k}: {v}" for k, v in failing.items()))
                continue
            sd_notify("WATCHDOG=1")

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server.exposition.close()
            try:
                os.unlink(os.path.join(self.config.state_dir, ADDR_FILE))
            except OSError:
                pass


def docker_socket(config) -> str:
    """The engine that names the metrics' endpoints: VPCNET_DOCKER_SOCKET, else DOCKER_HOST's, else the
    standard socket; "" when set to off."""
    from vpcnet.docker.engine_api import default_docker_socket

    if config.docker_socket == "off":
        return ""
    return config.docker_socket or default_docker_socket()


def _last_pass() -> float | None:
    from vpcnet.observability import events

    return events.RECONCILER.snapshot()[0]


def _write_addr(state_dir: str, bound: str) -> None:
    path = os.path.join(state_dir, ADDR_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(bound + "\n")
    os.replace(tmp, path)


def read_addr(state_dir: str) -> str:
    """The address the plugin's listener bound (from its state dir), or ''."""
    try:
        with open(os.path.join(state_dir, ADDR_FILE)) as fh:
            return fh.read().strip()
    except OSError:
        return ""


# -- systemd ------------------------------------------------------------------------------------------
def watchdog_period(environ=os.environ) -> float:
    """The watchdog period in seconds when systemd asked for pings ($WATCHDOG_USEC), else 0. (The unit
    sets NotifyAccess=all: the pings come from a gunicorn worker, not the main process.)"""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0.0
    return usec / 1e6 if usec > 0 and environ.get("NOTIFY_SOCKET") else 0.0


def sd_notify(state: str, environ=os.environ) -> bool:
    """Send one datagram to systemd's notify socket (an abstract address starts with '@')."""
    addr = environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state, exc)
        return False
