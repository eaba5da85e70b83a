#!/usr/bin/env python3
"""TCP request-response ping-pong, the same program for every contender (run in the contender's network
namespace with `nsenter --net=...`), so only the network path differs.

    rr.py server --port P [--max-seconds S]      echo fixed-size messages, one connection at a time
    rr.py client --host H --port P [--count N]   N round trips after a warm-up; prints JSON percentiles

Every wait is bounded: the server exits after --max-seconds, sockets time out after 5 s.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time

SIZE = 64


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < SIZE:
        n = conn.recv_into(view[got:], SIZE - got)
        if not n:
            return False
        got += n
    return True


def server(port: int, max_seconds: float) -> int:
    deadline = time.monotonic() + max_seconds
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(4)
    lsock.settimeout(1.0)
    buf = bytearray(SIZE)
    view = memoryview(buf)
    while time.monotonic() < deadline:
        try:
            conn, _ = lsock.accept()
        except socket.timeout:
            continue
        conn.settimeout(5.0)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while _recv_exact(conn, view):
                conn.sendall(buf)
        except OSError:
            pass
        finally:
            conn.close()
    return 0


def client(host: str, port: int, count: int, warmup: int) -> int:
    sock = socket.create_connection((host, port), timeout=5.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * SIZE
    buf = bytearray(SIZE)
    view = memoryview(buf)
    samples = []
    clock = time.perf_counter_ns
    for i in range(warmup + count):
        t0 = clock()
        sock.sendall(msg)
        if not _recv_exact(sock, view):
            print(json.dumps({"error": "connection closed"}))
            return 1
        if i >= warmup:
            samples.append(clock() - t0)
    sock.close()
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p * len(samples)))] / 1000.0

    print(json.dumps({"count": count, "p50_us": pct(0.50), "p99_us": pct(0.99), "min_us": samples[0] / 1000.0,
                      "mean_us": sum(samples) / len(samples) / 1000.0}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--max-seconds", type=float, default=3600.0)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, default=5000)
    c.add_argument("--warmup", type=int, default=500)
    args = p.parse_args()
    if args.mode == "server":
        return server(args.port, args.max_seconds)
    return client(args.host, args.port, args.count, args.warmup)


if __name__ == "__main__":
    sys.exit(main())
