"""Published ports (`-p`, `-P`, Compose `ports:`) as Docker hands them to a network driver, and the choice of
the host port where Docker leaves it open.

Docker puts the container's port bindings in Join's and ProgramExternalConnectivity's options as
`com.docker.network.portmap`: a list of `{Proto, IP, Port, HostIP, HostPort, HostPortEnd}` (moby's
`types.PortBinding`; Proto 6 tcp, 17 udp, 132 sctp). The daemon builds them from the container's
HostConfig and allocates nothing itself: the bridge driver's port allocator does, inside the bridge driver.
So for a remote driver:
- `-p 8080:80`: HostPort 8080, HostPortEnd 8080 (or 0): that port.
- `-p 8000-8010:80`: HostPort 8000, HostPortEnd 8010: any one free port of the range (as Docker does).
- `-P` (and `-p 80`): HostPort 0: any free port of the host's ephemeral range
  (net.ipv4.ip_local_port_range), as Docker's allocator takes.
- `-p 8000-8001:80-81`: Docker sends one binding per container port, each with its host port.
- HostIP: "" or 0.0.0.0 every address; an IPv4 address of the host only that one. A loopback address is
  refused: without a userland proxy, it would need `route_localnet`, which lets the network reach 127/8.
  IPv6 host addresses wait for IPv6 support: `::` (Docker 28 may add it beside 0.0.0.0) is left out and
  logged, another IPv6 address is refused.
The exposed ports (`com.docker.network.endpoint.exposedports`) need nothing: a container is reachable at
its own address on every port anyway.

A repeated call (Docker 29 programs again whenever the endpoint becomes a gateway again) keeps the ports it
chose: a binding asked the same way again gets the host port it got before (`asked`).
"""
from __future__ import annotations

import ipaddress
import logging
import random
from dataclasses import dataclass
from typing import Callable

from vpcnet.datapath.spec import PROTOCOLS
from vpcnet.errors import Conflict, InvalidRequest, shown
from vpcnet.state.store import Port

log = logging.getLogger(__name__)

PORTMAP = "com.docker.network.portmap"
EXPOSED = "com.docker.network.endpoint.exposedports"
EPHEMERAL = (49153, 65535)     # Docker's allocator's range when ip_local_port_range cannot be read
TRIES = 64                     # host ports tried at most for one binding of -P or a range


@dataclass(frozen=True)
class Asked:
    """One binding as Docker asked it."""
    proto: str
    host_ip: str               # "" for every address
    first: int                 # 0: any (-P)
    last: int
    container_port: int

    @property
    def asked(self) -> str:
        return "" if not self.first else str(self.first) if self.last == self.first else f"{self.first}-{self.last}"

    def __str__(self) -> str:
        return f"-p {self.host_ip + ':' if self.host_ip else ''}{self.asked}:{self.container_port}/{self.proto}"


def parse(options: dict | None) -> list[Asked]:
    """The bindings of Join's / ProgramExternalConnectivity's options; bad ones refused, naming them."""
    raw = (options or {}).get(PORTMAP) or []
    if not isinstance(raw, list):
        raise InvalidRequest(f"{PORTMAP} must be a list of port bindings")
    out: list[Asked] = []
    for binding in raw:
        if not isinstance(binding, dict):
            raise InvalidRequest(f"{PORTMAP}: {shown(binding)} is not a port binding")
        proto = PROTOCOLS.get(binding.get("Proto"))                          # type: ignore[arg-type]
        if proto is None:
            raise InvalidRequest(f"{PORTMAP}: protocol {shown(binding.get('Proto'))} is not tcp (6), udp (17) "
                                 "or sctp (132)")
        port, first, last = (_port(binding, key) for key in ("Port", "HostPort", "HostPortEnd"))
        if not port:
            raise InvalidRequest(f"{PORTMAP}: container port 0 in {shown(binding)}")
        last = last or first
        if last < first:
            raise InvalidRequest(f"{PORTMAP}: host port range {first}-{last} ends before it starts")
        host_ip = _host_ip(binding.get("HostIP"), port, proto)
        if host_ip is None:
            continue
        asked = Asked(proto, host_ip, first, last, port)
        if asked not in out:
            out.append(asked)
    return out


def _port(binding: dict, key: str) -> int:
    value = binding.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise InvalidRequest(f"{PORTMAP}: {key} {shown(value)} is not a port number")
    return value


def _host_ip(raw, port: int, proto: str) -> str | None:
    if raw in (None, "", "0.0.0.0"):
        return ""
    try:
        ip = ipaddress.ip_address(str(raw))
    except ValueError:
        raise InvalidRequest(f"{PORTMAP}: host address {shown(raw)} is not an IP address") from None
    if ip.version == 6:
        if ip.is_unspecified:
            log.info("port %d/%s: not published on the host's IPv6 addresses ([::]): vpcnet networks are IPv4 "
                     "(IPv6 publishing comes with IPv6 support)", port, proto)
            return None
        raise InvalidRequest(f"-p [{ip}]:...:{port}: vpcnet publishes ports on the host's IPv4 addresses only; "
                             "publish on an IPv4 address of the host or 0.0.0.0")
    if ip.is_loopback:
        raise InvalidRequest(f"-p {ip}:...:{port}/{proto}: vpcnet publishes ports without a userland proxy, and a "
                             "loopback address would need route_localnet, which opens 127.0.0.0/8 to the network; "
                             "publish on the host's address (or 0.0.0.0, or omit it) and firewall it in DOCKER-USER, "
                             "or put the container on a Docker bridge network for a loopback-only port")
    return str(ip)


def choose(endpoint_id: str, asked: list[Asked], before: list[Port], taken: Callable[[Port], str],
           ephemeral: tuple[int, int]) -> list[Port]:
    """One host port per binding: the one it got before when asked the same way again (`before`, the
    endpoint's rows), else the one asked, else the first free one of the range (`taken` says why a port is
    not free, "" when it is). A port no one can have is refused with the reason, as Docker refuses."""
    out: list[Port] = []
    kept = {(p.proto, p.host_ip, p.container_port, p.asked): p for p in before}
    for a in asked:
        old = kept.get((a.proto, a.host_ip, a.container_port, a.asked))
        if old is not None:
            out.append(Port(endpoint_id, a.proto, a.host_ip, old.host_port, a.container_port, a.asked))
            continue
        if a.first and a.first == a.last:
            port = Port(endpoint_id, a.proto, a.host_ip, a.first, a.container_port, a.asked)
            why = _clash(port, out) or taken(port)
            if why:
                raise Conflict(f"{a}: cannot publish port {a.first}: {why} (the host port is already allocated)")
            out.append(port)
            continue
        first, last = (a.first, a.last) if a.first else ephemeral
        candidates = list(range(first, last + 1))
        if len(candidates) > TRIES:      # Docker's allocator goes on from a moving start; a random one here
            start = random.randrange(len(candidates))
            candidates = candidates[start:] + candidates[:start]
        reasons = []
        for number in candidates[:TRIES]:
            port = Port(endpoint_id, a.proto, a.host_ip, number, a.container_port, a.asked)
            why = _clash(port, out) or taken(port)
            if not why:
                out.append(port)
                break
            reasons.append(why)
        else:
            tried = f"{first}-{last}" if len(candidates) <= TRIES else f"{TRIES} ports of {first}-{last}"
            raise Conflict(f"{a}: no free host port in {tried} (the host ports are already allocated; last: "
                           f"{reasons[-1] if reasons else 'none'})")
    return out


def _clash(port: Port, chosen: list[Port]) -> str:
    other = next((p for p in chosen if p.clashes(port)), None)
    return f"asked twice for this container ({other.host_port}->{other.container_port})" if other else ""


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """net.ipv4.ip_local_port_range as (first, last), or Docker's fallback."""
    try:
        with open(path) as fh:
            first, last = (int(x) for x in fh.read().split())
        return (first, last) if 0 < first <= last <= 65535 else EPHEMERAL
    except (OSError, ValueError):
        return EPHEMERAL
