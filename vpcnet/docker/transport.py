"""HTTP and JSON, nothing else: Docker's plugin calls mapped onto the driver and IPAM.

Docker posts JSON without a Content-Type (and `null` for calls without arguments), so bodies are parsed
whatever the headers say. Answers use Docker's plugin media type. Every error leaves as a non-200 status
with `{"Err": "..."}` (the one form both the network and the IPAM client read); the mapping from
vpcnet's exception family happens here and only here.

A body over `MAX_BODY` is refused (413) unread: Docker's calls are a few hundred bytes, the largest
(Join and ProgramExternalConnectivity with a container's port map) 100 bytes or more per published port.
The answer's `Err` and the log line are one line of bounded length whatever the request held.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from vpcnet.docker.names import known
from vpcnet.errors import InvalidRequest, TooLarge, VpcnetError
from vpcnet.observability import events

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY = 1 << 20          # 1 MiB: several thousand published ports' worth of port map
MAX_ERR = 1000              # characters of an answer's Err (and its log line)


class Body(dict):
    """The request body; `field()` fetches with a type check so a malformed call gets a clear error."""

    def field(self, name: str, kind: type | tuple = str, default: Any = None, required: bool = False):
        value = self.get(name)
        if value is None:
            if required:
                raise InvalidRequest(f"missing field {name}")
            return default
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise InvalidRequest(f"field {name} must be {names}, got {type(value).__name__}")
        return value


def endpoint_table(driver, ipam) -> dict[str, Callable[[Body], dict]]:
    """Path → handler. Reads as the protocol: one line per Docker call."""
    return {
        "/Plugin.Activate": lambda b: _activate(ipam),
        # NetworkDriver
        "/NetworkDriver.GetCapabilities": lambda b: driver.capabilities(),
        "/NetworkDriver.GwAllocCheck": lambda b: driver.gw_alloc_check(b.field("Options", dict, {})),
        "/NetworkDriver.CreateNetwork": lambda b: driver.create_network(
            b.field("NetworkID", required=True), b.field("Options", dict, {}),
            b.field("IPv4Data", list, []), b.field("IPv6Data", list, [])),
        "/NetworkDriver.DeleteNetwork": lambda b: driver.delete_network(b.field("NetworkID", required=True)),
        "/NetworkDriver.CreateEndpoint": lambda b: _create_endpoint(driver, ipam, b),
        "/NetworkDriver.EndpointOperInfo": lambda b: driver.endpoint_info(
            b.field("NetworkID", required=True), b.field("EndpointID", required=True)),
        "/NetworkDriver.DeleteEndpoint": lambda b: driver.delete_endpoint(
            b.field("NetworkID", default=""), b.field("EndpointID", required=True)),
        "/NetworkDriver.Join": lambda b: driver.join(
            b.field("NetworkID", required=True), b.field("EndpointID", required=True),
            b.field("SandboxKey", required=True), b.field("Options", dict, {})),
        "/NetworkDriver.Leave": lambda b: driver.leave(
            b.field("NetworkID", default=""), b.field("EndpointID", required=True)),
        "/NetworkDriver.ProgramExternalConnectivity": lambda b: driver.program_external_connectivity(
            b.field("NetworkID", required=True), b.field("EndpointID", required=True),
            b.field("Options", dict, {})),
        "/NetworkDriver.RevokeExternalConnectivity": lambda b: driver.revoke_external_connectivity(
            b.field("NetworkID", default=""), b.field("EndpointID", required=True)),
        "/NetworkDriver.DiscoverNew": lambda b: {},
        "/NetworkDriver.DiscoverDelete": lambda b: {},
        "/NetworkDriver.AllocateNetwork": lambda b: {"Options": {}},
        "/NetworkDriver.FreeNetwork": lambda b: {},
        # IpamDriver
        "/IpamDriver.GetCapabilities": lambda b: ipam.capabilities(),
        "/IpamDriver.GetDefaultAddressSpaces": lambda b: ipam.default_address_spaces(),
        "/IpamDriver.RequestPool": lambda b: ipam.request_pool(
            b.field("Pool", default=""), b.field("SubPool", default=""), b.field("Options", dict, {}),
            b.field("V6", bool, False), b.field("AddressSpace", default="")),
        "/IpamDriver.ReleasePool": lambda b: ipam.release_pool(b.field("PoolID", required=True)),
        "/IpamDriver.RequestAddress": lambda b: ipam.request_address(
            b.field("PoolID", required=True), b.field("Address", default=""), b.field("Options", dict, {})),
        "/IpamDriver.ReleaseAddress": lambda b: ipam.release_address(
            b.field("PoolID", required=True), b.field("Address", required=True)),
    }


def _activate(ipam) -> dict:
    # Docker activates a plugin when it (re)starts using it, before it replays its allocations; the IPAM
    # decides whether this opens a replay window (ipam.py's docstring).
    ipam.open_replay_window()
    return {"Implements": ["NetworkDriver", "IpamDriver"]}


def _create_endpoint(driver, ipam, b: Body) -> dict:
    # A new endpoint is new work: Docker makes none before its replays are done.
    ipam.end_replays("CreateEndpoint")
    return driver.create_endpoint(b.field("NetworkID", required=True), b.field("EndpointID", required=True),
                                  b.field("Interface", dict, {}), b.field("Options", dict, {}))


def create_app(driver, ipam) -> Flask:
    app = Flask("vpcnet")
    table = endpoint_table(driver, ipam)

    @app.route("/<path:call>", methods=["POST"])
    def dispatch(call: str) -> Response:
        path = "/" + call
        started = time.perf_counter()
        handler = table.get(path)
        if handler is None:
            events.docker_call(None, 404, time.perf_counter() - started)
            return _answer({"Err": _one_line(f"{path} is not implemented by vpcnet")}, 404)
        body = Body()
        try:
            body = _parse_body()
            answer = handler(body)
            status = 200
        except VpcnetError as exc:
            answer, status = {"Err": str(exc)}, exc.http_status
        except Exception as exc:     # a bug: still answer Docker with a message, and log the trace
            log.exception("%s failed", path)
            answer, status = {"Err": f"vpcnet internal error in {path}: {type(exc).__name__}: {exc}"}, 500
        if "Err" in answer:
            answer = {"Err": _one_line(str(answer["Err"]))}
        elapsed = time.perf_counter() - started
        events.docker_call(path, status, elapsed)
        log.log(logging.INFO if status != 200 else logging.DEBUG, "%s -> %d %s (%.1f ms)", path, status,
                answer.get("Err", ""), elapsed * 1000, extra=_log_fields(path, status, elapsed, body))
        return _answer(answer, status)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        # What the dispatcher never sees (`POST /`, a GET): still Docker's form, `{"Err": ...}` in the
        # plugin media type, not Flask's HTML page.
        return _answer({"Err": _one_line(f"{request.method} {request.path}: {exc.name}")}, exc.code or 500)

    return app


def _log_fields(path: str, status: int, elapsed: float, body: Body) -> dict:
    """What a JSON log line carries about a call (vpcnet.observability.logs); ids cut to Docker's short form,
    and the container's names when this process has them (vpcnet.docker.names, never asked here)."""
    ids = {key: value[:12] for key, name in (("network", "NetworkID"), ("endpoint", "EndpointID"))
           if isinstance(value := body.get(name), str) and value[:12].isascii() and value[:12].isalnum()}
    fields = {"call": path[1:], "status": status, "duration_ms": round(elapsed * 1000, 3), **ids}
    endpoint = body.get("EndpointID")
    names = known(endpoint) if "endpoint" in ids and isinstance(endpoint, str) else None
    if names is not None:
        fields.update(container=names.container, service=names.service, application=names.application)
    return fields


def _read_body() -> bytes:
    """The body, read only when it is at most MAX_BODY bytes: a longer Content-Length is refused before
    a byte is read, a chunked (or unannounced) body once MAX_BODY + 1 bytes have come."""
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise TooLarge(f"request body of {length} bytes is over vpcnet's limit of {MAX_BODY} bytes (1 MiB)")
    raw = request.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise TooLarge(f"request body is over vpcnet's limit of {MAX_BODY} bytes (1 MiB)")
    return raw


def _parse_body() -> Body:
    raw = _read_body()
    if not raw.strip():
        return Body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"malformed JSON body: {exc}") from None
    if data is None:
        return Body()
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}")
    return Body(data)


def _one_line(text: str) -> str:
    """`text` as one line of at most MAX_ERR characters: control characters escaped (a newline sent in a
    request never starts a forged log line), the rest cut."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_ERR else f"{text[:MAX_ERR]}... ({len(text)} characters)"


def _answer(payload: dict, status: int) -> Response:
    return Response(json.dumps(payload), status=status, mimetype=MEDIA_TYPE)
