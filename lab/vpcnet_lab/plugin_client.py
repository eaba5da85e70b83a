"""Speak Docker's plugin protocol to a plugin socket the way Docker does: POST, JSON body, no
Content-Type. For tests, benchmarks and diagnostics; the plugin itself never calls this."""
from __future__ import annotations

import json
import socket


def call(socket_path: str, path: str, body, timeout: float = 10.0) -> tuple[int, dict]:
    """One call, e.g. call(sock, "/IpamDriver.RequestPool", {"Pool": ""}) -> (status, answer)."""
    payload = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: plugin\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, answer = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(answer or b"{}")
