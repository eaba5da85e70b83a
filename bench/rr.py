#!/usr/bin/env python3
"""Request-response over TCP, the same program for every contender (run in the contender's network
namespace with `nsenter --net=...`), so only the network path differs.

    rr.py server --port P [--flows-port Q] [--max-seconds S]
    rr.py client --host H --port P [--count N]            one connection, N ping-pongs (TCP_RR)
    rr.py crr --host H --port P [--seconds S]             connect, 1 ping-pong, close, repeatedly (TCP_CRR)
    rr.py flows --host H --port Q [--flows 64] [--seconds S]  64 connections ping-ponging at once

Every message is 64 bytes, TCP_NODELAY on both ends. Each client prints one JSON object.

- `client`: the latency of one warm connection (p50/p99 of round trips): the path's per-packet delay.
- `crr`: what a short-lived connection costs: the handshake, one request and its response, and the close.
  A CRR request starts with `C`: the server answers and closes first, and the client closes when it reads
  the end of the stream. So the TIME_WAIT state stays with the server (whose port is fixed) and the
  client's ephemeral ports free at once; its new SYNs to a TIME_WAIT pair are accepted (timestamps).
  Connections per second, and p50/p99 of each connection's whole life.
- `flows`: 64 connections with one request each in flight at all times. With that many in flight both
  CPUs of this machine stay busy, so the transactions per second are set by CPU cost per transaction,
  i.e. by what the path does to every packet of every flow (rule walks, conntrack lookups, forwarding,
  the bridge), unlike `client`, which waits on one round trip at a time and leaves the CPUs idle between.

The server's `--port` serves `client` and `crr` one connection at a time (a blocking loop, as lean as a
round trip can be); `--flows-port` serves `flows`, many connections at once (an epoll loop in a thread
of the same process). Every wait is bounded: the server exits after --max-seconds, sockets time out
after 5 s, and a client that sees no progress for 5 s gives up with an error.
"""
from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import threading
import time

SIZE = 64
CLOSE = ord("C")                 # first byte of a CRR request: answer, then close from the server side
STALL_S = 5.0                    # a client that sees no answer this long gives up
REQUEST = b"x" * SIZE
CRR_REQUEST = b"C" + b"x" * (SIZE - 1)


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < SIZE:
        n = conn.recv_into(view[got:], SIZE - got)
        if not n:
            return False
        got += n
    return True


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    """p50, p99, min and mean of round-trip samples in nanoseconds, as microseconds."""
    if not samples_ns:
        raise ValueError("no samples")
    ordered = sorted(samples_ns)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1000.0

    return {"p50_us": pct(0.50), "p99_us": pct(0.99), "min_us": ordered[0] / 1000.0,
            "mean_us": sum(ordered) / len(ordered) / 1000.0}


# -- server ---------------------------------------------------------------------------------------
def _listen(port: int, backlog: int) -> socket.socket:
    """Both families where the namespace has IPv6 (one dual-stack socket), else IPv4."""
    try:
        lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("::", port))
    except OSError:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("0.0.0.0", port))
    lsock.listen(backlog)
    return lsock


def serve_sequential(lsock: socket.socket, deadline: float) -> None:
    """One connection at a time: echo each 64-byte message; after a CRR request, close first."""
    lsock.settimeout(1.0)
    buf = bytearray(SIZE)
    view = memoryview(buf)
    while time.monotonic() < deadline:
        try:
            conn, _ = lsock.accept()
        except socket.timeout:
            continue
        conn.settimeout(STALL_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while _recv_exact(conn, view):
                conn.sendall(buf)
                if buf[0] == CLOSE:
                    break
        except OSError:
            pass
        finally:
            conn.close()


class _Conn:
    __slots__ = ("sock", "inbuf", "outbuf", "writing")

    def __init__(self, sock: socket.socket):
        self.sock, self.inbuf, self.outbuf, self.writing = sock, bytearray(), bytearray(), False


def serve_concurrent(lsock: socket.socket, deadline: float) -> None:
    """Many connections at once (epoll): echo every complete 64-byte message on each."""
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    try:
        while time.monotonic() < deadline:
            for key, mask in sel.select(timeout=1.0):
                if key.data is None:
                    _accept_all(lsock, sel)
                else:
                    _serve_ready(sel, key.data, mask)
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()


def _accept_all(lsock: socket.socket, sel: selectors.BaseSelector) -> None:
    for _ in range(256):                                   # bounded: the rest wait for the next event
        try:
            conn, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(conn, selectors.EVENT_READ, _Conn(conn))


def _serve_ready(sel: selectors.BaseSelector, c: _Conn, mask: int) -> None:
    try:
        if mask & selectors.EVENT_READ:
            data = c.sock.recv(4096)
            if not data:
                raise ConnectionResetError
            c.inbuf += data
            whole = len(c.inbuf) - len(c.inbuf) % SIZE
            if whole:
                c.outbuf += c.inbuf[:whole]
                del c.inbuf[:whole]
        if c.outbuf:
            sent = c.sock.send(c.outbuf)
            del c.outbuf[:sent]
        if bool(c.outbuf) != c.writing:                    # wait for room only while bytes are left over
            c.writing = bool(c.outbuf)
            sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.writing else 0), c)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        sel.unregister(c.sock)
        c.sock.close()


def server(port: int, flows_port: int | None, max_seconds: float) -> int:
    deadline = time.monotonic() + max_seconds
    sequential = _listen(port, 128)
    if flows_port:
        concurrent = _listen(flows_port, 1024)
        threading.Thread(target=serve_concurrent, args=(concurrent, deadline), daemon=True).start()
    serve_sequential(sequential, deadline)
    return 0


# -- clients --------------------------------------------------------------------------------------
def _connect(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(STALL_S)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def client(host: str, port: int, count: int, warmup: int) -> dict:
    sock = _connect(host, port)
    buf = bytearray(SIZE)
    view = memoryview(buf)
    samples = []
    clock = time.perf_counter_ns
    try:
        for i in range(warmup + count):
            t0 = clock()
            sock.sendall(REQUEST)
            if not _recv_exact(sock, view):
                return {"error": "connection closed"}
            if i >= warmup:
                samples.append(clock() - t0)
    finally:
        sock.close()
    return {"count": count, **percentiles_us(samples)}


def crr(host: str, port: int, seconds: float, max_count: int, warmup: int) -> dict:
    """Connections per second of connect + one 64-byte request and response + close."""
    buf = bytearray(SIZE)
    view = memoryview(buf)
    clock = time.perf_counter_ns
    samples: list[int] = []
    started = end = 0
    for i in range(warmup + max_count):
        if i == warmup:
            started = clock()
            end = started + int(seconds * 1e9)
        elif i > warmup and clock() >= end:
            break
        t0 = clock()
        sock = _connect(host, port)
        try:
            sock.sendall(CRR_REQUEST)
            if not _recv_exact(sock, view):
                return {"error": "connection closed before the response"}
            if sock.recv(1):                               # the server closes first: wait for its FIN
                return {"error": "the server sent more than one response"}
        finally:
            sock.close()
        if i >= warmup:
            samples.append(clock() - t0)
    elapsed = (clock() - started) / 1e9
    return {"connections": len(samples), "seconds": elapsed, "cps": len(samples) / elapsed,
            **percentiles_us(samples)}


def flows(host: str, port: int, n: int, seconds: float, warmup_s: float) -> dict:
    """Aggregate transactions per second of `n` connections, each with one 64-byte request in flight."""
    socks = []
    try:
        for _ in range(n):
            socks.append(_connect(host, port))
        return _ping_pong_all(socks, seconds, warmup_s)
    finally:
        for sock in socks:
            sock.close()


def _ping_pong_all(socks: list[socket.socket], seconds: float, warmup_s: float) -> dict:
    clock = time.perf_counter_ns
    sel = selectors.DefaultSelector()
    got = [0] * len(socks)
    sent_at = [0] * len(socks)
    bufs = [bytearray(SIZE) for _ in socks]
    samples: list[int] = []
    now = clock()
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
        sent_at[i] = now
        sock.send(REQUEST)                                 # 64 B into an empty send buffer: never partial
    counting_from = now + int(warmup_s * 1e9)
    end = counting_from + int(seconds * 1e9)
    last_progress = now
    try:
        while now < end:
            events = sel.select(timeout=1.0)
            now = clock()
            if not events and now - last_progress > STALL_S * 1e9:
                return {"error": f"no answer for {STALL_S:.0f}s"}
            for key, _mask in events:
                i = key.data
                sock = socks[i]
                try:
                    n = sock.recv_into(memoryview(bufs[i])[got[i]:], SIZE - got[i])
                except (BlockingIOError, InterruptedError):
                    continue
                if not n:
                    return {"error": "connection closed"}
                got[i] += n
                if got[i] < SIZE:
                    continue
                last_progress = now
                if now >= counting_from:
                    samples.append(now - sent_at[i])
                got[i] = 0
                sent_at[i] = now
                sock.send(REQUEST)
    finally:
        sel.close()
    elapsed = (now - counting_from) / 1e9
    return {"flows": len(socks), "transactions": len(samples), "seconds": elapsed,
            "tps": len(samples) / elapsed, **percentiles_us(samples)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True, help="one connection at a time (client, crr)")
    s.add_argument("--flows-port", type=int, help="many connections at once (flows)")
    s.add_argument("--max-seconds", type=float, default=3600.0)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, default=5000)
    c.add_argument("--warmup", type=int, default=500)
    r = sub.add_parser("crr")
    r.add_argument("--host", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--seconds", type=float, default=2.0)
    r.add_argument("--max-count", type=int, default=200_000, help="stop after this many connections anyway")
    r.add_argument("--warmup", type=int, default=50)
    f = sub.add_parser("flows")
    f.add_argument("--host", required=True)
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--flows", type=int, default=64)
    f.add_argument("--seconds", type=float, default=2.0)
    f.add_argument("--warmup-seconds", type=float, default=0.3)
    args = p.parse_args()
    if args.mode == "server":
        return server(args.port, args.flows_port, args.max_seconds)
    if getattr(args, "seconds", 1.0) <= 0 or not 1 <= getattr(args, "flows", 1) <= 1000:
        p.error("--seconds must be > 0 and --flows 1..1000")
    try:
        if args.mode == "client":
            result = client(args.host, args.port, args.count, args.warmup)
        elif args.mode == "crr":
            result = crr(args.host, args.port, args.seconds, args.max_count, args.warmup)
        else:
            result = flows(args.host, args.port, args.flows, args.seconds, args.warmup_seconds)
    except OSError as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
