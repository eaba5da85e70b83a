"""`vpcnet serve`: the plugin process — gunicorn serving the Flask app on the plugin socket.

Start-up order matters for Docker: configuration and the state's schema are checked (and a static
VPCNET_HOST_CIDR against the blocks stored networks use: a changed one would take their route away), then
the socket is bound — well inside a second, because nothing here waits on a cloud. The gunicorn master
stays lean (it imports neither Flask nor pyroute2: every process's memory counts); each worker assembles
the plugin, restores the datapath of known networks (after a reboot the bridges are gone but the state is
not; done under a lock, and idempotent) and then serves. Calls arriving meanwhile wait in the socket's
backlog. The route keeper runs in the background of the one worker holding the reconciler lock; that
worker also asks the Docker engine its version once, in a thread of its own (Docker may start after the
plugin, or be waiting on it), and logs a WARNING for a release known to crash under vpcnet. SIGTERM stops
serving and removes the socket; the datapath stays, so running containers keep talking.

eni-prefix addressing (VPCNET_ADDRESSING=eni-prefix, docs/eni-prefix.md): start-up is refused while the
state holds networks of route-table addressing (and the other way round); the IPAM takes addresses from the
host's PrefixPool, and the worker that would run the route keeper runs the pool's pass instead
(`PrefixKeeper`: PrefixPool.sync() every VPCNET_RECONCILE_INTERVAL and as soon as containers took the warm
prefixes, each pass bounded by its own budget).
"""
from __future__ import annotations

import fcntl
import http.client
import logging
import os
import sys
import threading
import time

from gunicorn.app.base import BaseApplication

from vpcnet import config as config_mod
from vpcnet.observability.logs import gunicorn_logger_class
from vpcnet.state.store import DamagedState, Store, check_state

log = logging.getLogger(__name__)

ENGINE_LOOK_FOR = 600.0     # seconds to keep asking for the engine's version (Docker may start after vpcnet)
ENGINE_LOOK_EVERY = 10.0


class Plugin:
    """The assembled plugin: one of each piece, wired the way imports flow (transport → driver → …)."""

    def __init__(self, config, dataplane=None, provider_factory=None):
        from vpcnet.datapath.dataplane import Dataplane
        from vpcnet.docker.driver import NetworkDriver
        from vpcnet.docker.ipam import Ipam
        from vpcnet.docker.transport import create_app
        from vpcnet.observability.health import Observer
        from vpcnet.routes.keeper import RouteKeeper

        self.config = config
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        self.store = Store(config.db_path)
        self.dataplane = dataplane or Dataplane(extra_uplinks=config.uplinks, peers=config.peers,
                                                local_endpoints=config.workers <= 1)
        from vpcnet.datapath.ipv6 import Ipv6Endpoint
        from vpcnet.state.locks import host_lock
        # the IPv6 guard's desired state: every IPv6 endpoint in the store, read each time it is written
        self.dataplane.ipv6_endpoints = lambda: self._ipv6_endpoints(Ipv6Endpoint)
        self.dataplane.ipv6_internal = self.store.ipv6_internal
        # one guard writer at a time on the host, reading the rows under it: none writes an older state last
        self.dataplane.ipv6_guard_lock = lambda: host_lock(config.state_dir, "ipv6-guard")
        self.routes = RouteKeeper(config, self.store, provider_factory)
        self.prefixes = None
        if config.addressing == "eni-prefix":
            from vpcnet.routes.prefixes import PrefixPool
            self.prefixes = PrefixPool(config, self.store)
        self.ipam = Ipam(config, self.store, self.routes, host_routes=self.dataplane.overlapping_routes,
                         prefixes=self.prefixes)
        self.driver = NetworkDriver(config, self.store, self.dataplane)
        self.ipam.remove_leftovers = self.driver.remove_leftovers     # ReleaseAddress of a stale endpoint
        self.ipam.peer_on_host = self.dataplane.link_exists
        self.ipam.drop_ipv6 = self.driver.drop_ipv6
        self.app = create_app(self.driver, self.ipam)
        self.observer = Observer(config, self.store, self.routes)
        self._stopping = threading.Event()
        self.routes.on_leader = self._on_leader         # once per host: the reconciler's process
        self.prefix_keeper = None if self.prefixes is None else \
            PrefixKeeper(config, self.prefixes, self._stopping, self._on_leader)

    def _ipv6_endpoints(self, make) -> list:
        """The IPv6 guard's desired state: every IPv6 endpoint in the store (vpcnet.datapath.ipv6.Ipv6Endpoint),
        with its bridge when its network is in bridge mode."""
        ports = self.store.ipv6_bridge_ports()
        return [make(v, a, ports.get(v, "")) for v, a in self.store.ipv6_endpoints()]

    def _on_leader(self) -> None:
        self.observer.start()
        from vpcnet.docker.engine_api import default_docker_socket

        threading.Thread(target=warn_about_engine, args=(default_docker_socket(), self._stopping),
                         name="vpcnet-engine-version", daemon=True).start()

    def start_background(self) -> None:
        """In a worker, once it serves: the route keeper (and, in the worker that wins its lock,
        /metrics) and the periodic datapath pass (each in one worker per host)."""
        if self.prefix_keeper is not None:     # eni-prefix: no route to keep, the prefixes instead
            self.observer.reconciler_thread = self.prefix_keeper.start()
        else:
            self.observer.reconciler_thread = self.routes.start_background()
        self.driver.reconciler.start_background()

    def stop_background(self) -> None:
        self._stopping.set()
        self.routes.stop()
        self.driver.reconciler.stop()
        self.observer.stop()
        if self.prefixes is not None:
            self.prefixes.close()

    def restore(self) -> None:
        """Rebuild the datapath of known networks; one worker at a time."""
        with open(os.path.join(self.config.state_dir, "restore.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.driver.restore()


REFILL_POLL = 1.0     # seconds between the prefix keeper's looks (store only) for a used-up warm pool


class PrefixKeeper:
    """eni-prefix addressing's background pass: `PrefixPool.sync()` every VPCNET_RECONCILE_INTERVAL seconds, and
    as soon as containers took the warm prefixes (seen within REFILL_POLL s), in the host's one reconciler (the
    worker holding `<state_dir>/reconciler.lock`, as the route loop). A pass is bounded by the pool
    (PASS_BUDGET, one call of each kind); its problems it logs itself."""

    def __init__(self, config, pool, stop: threading.Event, on_leader):
        self.config = config
        self.pool = pool
        self._stop = stop
        self._on_leader = on_leader
        self.passes = 0

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="vpcnet-prefixes", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        from vpcnet.state.locks import LEADER_POLL, become_leader
        try:
            with open(os.path.join(self.config.state_dir, "reconciler.lock"), "a") as lock:
                if not become_leader(lock, self._stop, LEADER_POLL):
                    return
                log.info("prefix keeper running (pid %d, every %.0fs)", os.getpid(), self.config.reconcile_interval)
                self._on_leader()
                while not self._stop.is_set():
                    result = self.run_once()
                    self._wait_for_next_pass(refill=result.ok)
        except Exception:   # never take the worker down; the flock passes to another worker
            log.exception("prefix keeper stopped by an unexpected error")

    def _wait_for_next_pass(self, refill: bool) -> None:
        """Until VPCNET_RECONCILE_INTERVAL is over, or, after a pass without problems, until containers took
        the warm prefixes (asked of the store every REFILL_POLL s: the IPAM may run in another worker), so a
        container start rarely waits on an assign. After a failed pass only the interval: no retry storm."""
        deadline = time.monotonic() + self.config.reconcile_interval
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.wait(min(REFILL_POLL, left)):
                return
            if refill and self.pool.short_of_warm_target():
                return

    def run_once(self):
        """One pass, logged: what it changed at INFO, a quiet one at DEBUG."""
        from vpcnet.observability import events

        result = self.pool.sync()
        self.passes += 1
        events.reconcile_pass(result.ok, repaired=False)     # the host's reconciler in this mode (/healthz)
        changed = {"assigned": result.assigned, "adopted": result.adopted, "released": result.released,
                   "gone": result.gone}
        said = "; ".join(f"{what} {', '.join(prefixes)}" for what, prefixes in changed.items() if prefixes)
        calls = ", ".join(f"{kind} {n}" for kind, n in sorted(result.calls.items())) or "none"
        (log.info if said else log.debug)("prefix pass: %s (cloud calls: %s)%s", said or "nothing to change",
                                           calls, "" if result.ok else f", {len(result.problems)} problem(s)")
        return result


def warn_about_engine(docker_socket: str, stop: threading.Event, look_for: float = ENGINE_LOOK_FOR,
                      every: float = ENGINE_LOOK_EVERY) -> str | None:
    """Ask the engine on `docker_socket` its version until it answers (or `look_for` seconds pass); log a
    WARNING when that release crashes under vpcnet. Returns the version, None when none answered."""
    from vpcnet.cli.doctor.engine import CRASH_FIX, engine_crash
    from vpcnet.docker.engine_api import docker_get

    deadline = time.monotonic() + look_for
    while not stop.is_set():
        try:
            version = str(docker_get(docker_socket, "/version", timeout=5.0).get("Version", "?"))
        except (OSError, ValueError, http.client.HTTPException, AttributeError) as exc:
            log.debug("no Docker version from %s yet: %s", docker_socket, exc)
            if time.monotonic() + every > deadline:
                return None
            stop.wait(every)
            continue
        crash = engine_crash(version)
        if crash:
            log.warning("%s (engine on %s); fix: %s", crash, docker_socket, CRASH_FIX)
        else:
            log.debug("Docker %s on %s has no known crash with remote network drivers", version, docker_socket)
        return version
    return None


class _Gunicorn(BaseApplication):
    def __init__(self, config):
        self.config = config
        self.plugin: Plugin | None = None
        super().__init__()

    def load_config(self) -> None:
        cfg = self.config
        settings = {
            "bind": f"unix:{cfg.socket}",
            "workers": cfg.workers,
            "threads": cfg.threads,
            "worker_class": "gthread",
            "umask": 0o117,                 # socket 0660: only root and the docker group
            "timeout": 60,
            "graceful_timeout": 5,
            "loglevel": cfg.log_level.lower(),
            "errorlog": "-",
            "logger_class": gunicorn_logger_class(cfg.log_format),
            "accesslog": None,
            "proc_name": "vpcnet",
            "control_socket_disable": True,
            "post_worker_init": lambda worker: self._plugin_call("start_background"),
            "worker_exit": lambda server, worker: self._plugin_call("stop_background"),
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def _plugin_call(self, name: str) -> None:
        if self.plugin is not None:
            getattr(self.plugin, name)()

    def load(self):
        """In each worker, before it accepts: assemble the plugin and restore the datapath."""
        from vpcnet.observability.logs import setup_logging

        setup_logging(self.config.log_level, self.config.log_format)
        self.plugin = Plugin(self.config)
        self.plugin.restore()
        return self.plugin.app


def run(config) -> int:
    try:
        check_state(config.db_path)     # a damaged file: refuse, never start empty beside live containers
    except DamagedState as exc:
        print(f"vpcnet: {exc}", file=sys.stderr)
        return 1
    stranded = stranded_networks(config) or mixed_addressing(config)
    if stranded:                        # refuse before anything is written: no route, no state
        print(f"vpcnet: {stranded}", file=sys.stderr)
        return 1
    log.info("vpcnet starting: driver %s, socket %s, provider %s, cluster %s, config from %s",
             config.driver_name, config.socket, config.provider, config.cluster_cidr, config.source)
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    Store(config.db_path).close()      # schema checked (and migrated) before the socket is bound
    _prepare_multiprocess_metrics(config)
    _Gunicorn(config).run()
    return 0


def stranded_networks(config) -> str:
    """Stored networks of the configured cluster CIDR on a block other than the static VPCNET_HOST_CIDR
    (the setting changed while they exist): the refusal to give, or "". The next reconcile pass would make
    the new block this host's and the networks would lose their route. Read-only."""
    if not config.host_cidr or not os.path.exists(config.db_path):
        return ""
    # The rule of vpcnet.routes.claims.static_host_cidr, not imported: the routes room pulls in
    # prometheus_client, and the master stays lean.
    store = Store(config.db_path, readonly=True)
    try:
        by_block: dict[str, list[str]] = {}
        for net in store.networks():
            if net.cluster_cidr == config.cluster_cidr and net.host_cidr != config.host_cidr:
                by_block.setdefault(net.host_cidr, []).append(net.network_id[:12])
    finally:
        store.close()
    if not by_block:
        return ""
    old = ", ".join(f"{block} (network {', '.join(ids)})" for block, ids in sorted(by_block.items()))
    ids = " ".join(i for block in sorted(by_block) for i in by_block[block])
    return (f"VPCNET_HOST_CIDR is {config.host_cidr} but this host's networks of cluster {config.cluster_cidr} "
            f"use its earlier block {old}; starting would take that block's route away from them: remove them "
            f"first (docker network rm {ids}), or set VPCNET_HOST_CIDR back to {', '.join(sorted(by_block))}")


def mixed_addressing(config) -> str:
    """Stored networks of the other addressing than VPCNET_ADDRESSING's (a host never mixes them,
    docs/eni-prefix.md): the refusal to give, or "". Read-only."""
    if not os.path.exists(config.db_path):
        return ""
    from vpcnet.state.store import addressing_conflict
    store = Store(config.db_path, readonly=True)
    try:
        others = [n for n in store.networks() if n.addressing != config.addressing]
    finally:
        store.close()
    return addressing_conflict(config.addressing, others) if others else ""


def _prepare_multiprocess_metrics(config) -> None:
    """Several workers share their counters through prometheus_client's multiprocess files, in a fresh
    directory made before the fork (vpcnet.observability.metrics). Here, not there: the master imports no client."""
    import shutil

    path = os.path.join(config.state_dir, "metrics-multiproc")
    shutil.rmtree(path, ignore_errors=True)     # counters restart with the plugin, as Prometheus expects
    if config.workers > 1 and config.metrics_addr:
        os.makedirs(path, mode=0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    else:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def main(argv: list[str]) -> int:
    """`vpcnet serve [--config FILE]`, entered without building the full CLI (whose other sub-commands
    import Flask, pyroute2 and more): the master process imports only what it needs."""
    import argparse

    from vpcnet.config import add_config_argument
    from vpcnet.observability.logs import setup_logging

    parser = argparse.ArgumentParser(prog="vpcnet serve", description=SERVE_HELP)
    add_config_argument(parser)
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"vpcnet: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    return run(config)


SERVE_HELP = "run the plugin (network + IPAM driver) on its socket"


def register(sub) -> None:
    from vpcnet.config import add_config_argument

    parser = sub.add_parser("serve", help=SERVE_HELP)   # for `vpcnet --help`; cli.main routes serve to main()
    add_config_argument(parser)
    parser.set_defaults(func=lambda args: main(["--config", args.config] if args.config else []))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
