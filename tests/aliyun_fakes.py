"""Small real HTTP servers on 127.0.0.1 standing in for the ECS metadata service and an Alibaba RPC API.

Used by the aliyun tests that need to see exactly what the provider sends (headers, credentials) or to
answer what the emulator would not (an STS token, an echoed string-to-sign). Each server runs in a
thread on a free port; `stop()` shuts it down and is safe to call twice.
"""
from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from vpcnet.cloud.aliyun.signature import string_to_sign, verify


def serve(handler_cls, state) -> tuple[str, callable]:
    """Serve `handler_cls` (which reads `self.server.state`) on 127.0.0.1; return (url, stop)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    server.state = state
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            stopped.append(True)
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    return f"http://127.0.0.1:{server.server_address[1]}", stop


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):   # keep test output clean
        pass

    def _send(self, status: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# -- metadata ----------------------------------------------------------------------------------------
@dataclass
class MetadataState:
    token_mode: bool = True                 # False: PUT /latest/api/token answers `refuse_status`
    refuse_status: int = 404
    values: dict = field(default_factory=lambda: {
        "instance-id": "i-meta0001", "region-id": "cn-meta-1", "vpc-id": "vpc-meta0001",
        "vswitch-id": "vsw-meta0001", "vpc-cidr-block": "192.168.0.0/16", "private-ipv4": "192.168.1.10"})
    roles: dict = field(default_factory=dict)     # role -> list of credential dicts, served in turn
    requests: list = field(default_factory=list)  # (method, path, headers dict)
    tokens: list = field(default_factory=list)

    def role_answer(self, role: str):
        answers = self.roles.get(role)
        if not answers:
            return None
        return answers.pop(0) if len(answers) > 1 else answers[0]


class MetadataHandler(_Quiet):
    def _record(self):
        state: MetadataState = self.server.state
        state.requests.append((self.command, self.path, dict(self.headers)))
        return state

    def do_PUT(self):
        state = self._record()
        if self.path != "/latest/api/token":
            return self._send(404, "not found")
        if not state.token_mode:
            return self._send(state.refuse_status, "refused")
        if not self.headers.get("X-aliyun-ecs-metadata-token-ttl-seconds"):
            return self._send(400, "missing ttl")
        token = f"tok-{len(state.tokens) + 1}"
        state.tokens.append(token)
        self._send(200, token)

    def do_GET(self):
        state = self._record()
        if state.token_mode and self.headers.get("X-aliyun-ecs-metadata-token") not in state.tokens:
            return self._send(401, "token required")
        prefix = "/latest/meta-data/"
        if not self.path.startswith(prefix):
            return self._send(404, "not found")
        key = self.path[len(prefix):]
        if key.startswith("ram/security-credentials/"):
            answer = state.role_answer(key.rsplit("/", 1)[1])
            if answer is None:
                return self._send(404, "not found")
            return self._send(200, json.dumps(answer), "application/json")
        if key in state.values:
            return self._send(200, state.values[key])
        self._send(404, "not found")


# -- an Alibaba-style RPC API ------------------------------------------------------------------------
@dataclass
class ApiState:
    secrets: dict = field(default_factory=dict)    # AccessKeyId -> secret
    tokens: dict = field(default_factory=dict)     # AccessKeyId -> SecurityToken it must carry
    calls: list = field(default_factory=list)      # every request's params (parsed form body)
    answers: dict = field(default_factory=dict)    # Action -> (status, body dict), default 200 {}
    echo_string_to_sign: bool = True               # SignatureDoesNotMatch echoes it, as Alibaba does


class ApiHandler(_Quiet):
    def do_POST(self):
        state: ApiState = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        params = dict(parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True))
        params.update(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
        state.calls.append(params)
        key_id = params.get("AccessKeyId", "")
        if key_id not in state.secrets:
            return self._error(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        if not verify(self.command, params, state.secrets[key_id]):
            message = "Specified signature is not matched with our calculation."
            if state.echo_string_to_sign:
                message += " server string to sign is:" + string_to_sign(self.command, params)
            return self._error(400, "SignatureDoesNotMatch", message)
        if key_id in state.tokens and params.get("SecurityToken") != state.tokens[key_id]:
            return self._error(400, "InvalidSecurityToken.Mismatch", "The security token is not valid.")
        status, body = state.answers.get(params.get("Action"), (200, {}))
        body = dict(body)
        body.setdefault("RequestId", "req-fake")
        self._send(status, json.dumps(body), "application/json")

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, json.dumps({"RequestId": "req-fake", "HostId": "fake", "Code": code,
                                       "Message": message}), "application/json")


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on: an unreachable endpoint that answers at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving_emulator(instances: dict[str, str], **emulator_args):
    """The real emulator on 127.0.0.1 with `instances` (id -> underlay IP) registered; `.test_url` set."""
    from vpcnet_lab.emulator import Emulator, serve_in_thread

    emu = Emulator(**emulator_args)
    for instance_id, ip in instances.items():
        emu.register_instance(instance_id, ip)
    url, stop = serve_in_thread(emu)
    emu.test_url = url
    try:
        yield emu
    finally:
        stop()
        emu.close()


def blocks_of(instance: str, cluster: str, count: int = 6, prefix: int = 24) -> list[str]:
    """The first `count` blocks `instance` tries in `cluster`, in order: a cloud host's search starts at a
    block derived from its instance id (vpcnet.routes.claims.start_index), so tests name blocks this way."""
    import ipaddress

    from vpcnet.routes.claims import start_index
    net = ipaddress.IPv4Network(cluster)
    start, blocks, size = start_index(instance, net, prefix), 2 ** (prefix - net.prefixlen), 2 ** (32 - prefix)
    return [str(ipaddress.IPv4Network((int(net.network_address) + ((start + k) % blocks) * size, prefix)))
            for k in range(count)]
