"""`vpcnet serve`: the plugin process — gunicorn serving the Flask app on the plugin socket.

Start-up order matters for Docker: configuration is checked, the datapath of known networks is restored
(after a reboot the bridges are gone but the state is not), then the socket is bound — well inside a
second, because nothing here waits on a cloud. The route keeper runs in the background of the one worker
holding the reconciler lock. SIGTERM stops serving and removes the socket; the datapath stays, so
running containers keep talking.
"""
from __future__ import annotations

import logging
import os

from gunicorn.app.base import BaseApplication

from vpcnet import config as config_mod
from vpcnet.dataplane import Dataplane
from vpcnet.driver import NetworkDriver
from vpcnet.ipam import Ipam
from vpcnet.routes import RouteKeeper
from vpcnet.store import Store
from vpcnet.transport import create_app

log = logging.getLogger(__name__)


class Plugin:
    """The assembled plugin: one of each piece, wired the way imports flow (transport → driver → …)."""

    def __init__(self, config, dataplane: Dataplane | None = None, provider_factory=None):
        self.config = config
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        self.store = Store(config.db_path)
        self.dataplane = dataplane or Dataplane()
        self.routes = RouteKeeper(config, self.store, provider_factory)
        self.ipam = Ipam(config, self.store, self.routes, host_routes=self.dataplane.overlapping_routes)
        self.driver = NetworkDriver(config, self.store, self.dataplane)
        self.app = create_app(self.driver, self.ipam)


class _Gunicorn(BaseApplication):
    def __init__(self, plugin: Plugin):
        self.plugin = plugin
        super().__init__()

    def load_config(self) -> None:
        cfg = self.plugin.config
        keeper = self.plugin.routes
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
            "accesslog": None,
            "proc_name": "vpcnet",
            "control_socket_disable": True,
            "post_worker_init": lambda worker: keeper.start_background(),
            "worker_exit": lambda server, worker: keeper.stop(),
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        return self.plugin.app


def run(config) -> int:
    plugin = Plugin(config)
    log.info("vpcnet starting: driver %s, socket %s, provider %s, cluster %s, config from %s",
             config.driver_name, config.socket, config.provider, config.cluster_cidr, config.source)
    plugin.driver.restore()
    plugin.store.close()       # connections are per process: workers open their own after the fork
    _Gunicorn(plugin).run()
    return 0


def register(sub) -> None:
    from vpcnet.cli import add_config_argument, setup_logging

    parser = sub.add_parser("serve", help="run the plugin (network + IPAM driver) on its socket")
    add_config_argument(parser)

    def func(args) -> int:
        config = config_mod.load(args.config)
        setup_logging(config.log_level)
        return run(config)

    parser.set_defaults(func=func)
