"""A small client of the Docker engine's API over its unix socket (GET only, the standard library only):
what `vpcnet doctor`, `vpcnet network forget` and `vpcnet serve` ask the engine, and where the metrics'
container, service and application names come from (vpcnet.docker.names). Not the plugin's own socket:
that is Docker calling vpcnet (vpcnet.docker.transport)."""
from __future__ import annotations

import http.client
import json
import os
import socket

DOCKER_SOCKET = "/var/run/docker.sock"


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def docker_status(sock: str, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET one Docker API path: (HTTP status, body); raises OSError when the engine does not answer (each
    socket operation within `timeout`)."""
    conn = _UnixHTTP(sock, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except http.client.HTTPException as exc:
        raise OSError(f"no HTTP answer from {sock}: {exc}") from None
    finally:
        conn.close()


def docker_get(sock: str, path: str, timeout: float = 10.0):
    """GET one Docker API path; the decoded JSON, or raises OSError / ValueError."""
    status, body = docker_status(sock, path, timeout)
    if status != 200:
        said = body[:200].decode(errors="replace").strip()
        raise ValueError(f"Docker answered HTTP {status} for {path}: {said}")
    return json.loads(body)


def default_docker_socket(environ=os.environ) -> str:
    """The engine the docker CLI would talk to: DOCKER_HOST when it names a unix socket (rootless Docker,
    a second engine), else the standard socket."""
    host = environ.get("DOCKER_HOST", "")
    return host[len("unix://"):] if host.startswith("unix://") else DOCKER_SOCKET
