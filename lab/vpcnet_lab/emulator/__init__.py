"""An Alibaba-Cloud-compatible VPC API emulator (route tables, signed RPC, faults, router netns).

    emu = Emulator(pending_delay=1.0)
    emu.register_instance("i-host1", "192.168.77.2")
    url, stop = serve_in_thread(emu)      # http://127.0.0.1:PORT/
    ...
    stop(); emu.close()
"""
from __future__ import annotations

import logging
import threading
from urllib.parse import urlsplit

from werkzeug.serving import WSGIRequestHandler, make_server

from vpcnet_lab.emulator.errors import ApiError
from vpcnet_lab.emulator.state import Emulator

__all__ = ["Emulator", "ApiError", "serve_in_thread", "make_emulator_server", "QuietRequestHandler"]

log = logging.getLogger("vpcnet_lab.emulator.http")


class QuietRequestHandler(WSGIRequestHandler):
    """Logs method, path and status only: query strings carry the AccessKeyId, Signature and possibly a
    SecurityToken, which must never reach a log."""

    def log_request(self, code="-", size="-"):
        log.info("%s %s %s", self.command, urlsplit(self.path).path, code)

    def log_error(self, format, *args):   # noqa: A002 (werkzeug's signature)
        log.warning("http: " + format, *args)

    def log_message(self, format, *args):   # noqa: A002
        log.debug("http: " + format, *args)


def make_emulator_server(emulator: Emulator, host: str = "127.0.0.1", port: int = 0):
    """A threaded werkzeug server for the emulator's app (not started)."""
    from vpcnet_lab.emulator.api import create_app
    return make_server(host, port, create_app(emulator), threaded=True, request_handler=QuietRequestHandler)


def serve_in_thread(emulator: Emulator, host: str = "127.0.0.1", port: int = 0):
    """Serve the emulator on host:port (0 = a free port) in a background thread.
    Returns (url, stop); stop() shuts the server down and joins the thread (bounded), idempotent."""
    server = make_emulator_server(emulator, host, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"vpcnet-emulator-http-{server.server_port}", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/"
    stopped = threading.Lock()
    done: list[bool] = []

    def stop(timeout: float = 5.0) -> None:
        with stopped:
            if done:
                return
            done.append(True)
            if thread.is_alive():       # serve_forever sets its shut-down flag even when it fails
                server.shutdown()
            thread.join(timeout=timeout)
            server.server_close()

    return url, stop
