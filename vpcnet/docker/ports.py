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
- HostIP, per family (an endpoint with an IPv6 address, on a dual-stack network, publishes IPv6 too):
  - 0.0.0.0: every IPv4 address of the host; `::`: every IPv6 one (Docker 28 sends both for `-p 8080:80`).
  - "" (no address: Docker 20.10's `-p 8080:80`, which never sends `::`): every address of both families,
    as 20.10's own bridge driver does for a container with an IPv6 address (it adds the `::` binding
    itself, moby 20.10 drivers/bridge/port_mapping.go); on 28 `-p 0.0.0.0:8080:80` stays IPv4 only, and so
    does an explicit 0.0.0.0 on 20.10.
  - one address of the host, of either family: only that one.
  - loopback (127.0.0.0/8, ::1) is refused: without a userland proxy, it would need `route_localnet`, which
    lets the network reach 127/8 (IPv6 has no route_localnet at all: the kernel never routes ::1 out).
    An IPv6 link-local host address is refused too (it needs a zone).
  - An IPv6 binding for an endpoint without an IPv6 address (an IPv4-only network, or a container that
    turned IPv6 off): `::` is left out and logged, another IPv6 address is refused.
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
    """One binding as Docker asked it, for one family."""
    proto: str
    host_ip: str               # "" for every address of the family
    first: int                 # 0: any (-P)
    last: int
    container_port: int
    family: str = "ipv4"

    @property
    def asked(self) -> str:
        return "" if not self.first else str(self.first) if self.last == self.first else f"{self.first}-{self.last}"

    def __str__(self) -> str:
        host = f"[{self.host_ip or '::'}]:" if self.family == "ipv6" else f"{self.host_ip}:" if self.host_ip else ""
        return f"-p {host}{self.asked}:{self.container_port}/{self.proto}"


def parse(options: dict | None, ipv6: bool = False) -> list[Asked]:
    """The bindings of Join's / ProgramExternalConnectivity's options, one per family; bad ones refused, naming
    them. `ipv6`: the endpoint has an IPv6 address (its IPv6 bindings are published, else left out)."""
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
        for family, host_ip in _host_ips(binding.get("HostIP"), port, proto, ipv6):
            asked = Asked(proto, host_ip, first, last, port, family)
            if asked not in out:
                out.append(asked)
    return out


def _port(binding: dict, key: str) -> int:
    value = binding.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise InvalidRequest(f"{PORTMAP}: {key} {shown(value)} is not a port number")
    return value


def _host_ips(raw, port: int, proto: str, ipv6: bool) -> list[tuple[str, str]]:
    """(family, host address or "" for all of it) a binding's HostIP asks for."""
    if raw in (None, ""):               # no address (Docker 20.10's -p 8080:80): both families
        return [("ipv4", ""), ("ipv6", "")] if ipv6 else [("ipv4", "")]
    try:
        ip = ipaddress.ip_address(str(raw))
    except ValueError:
        raise InvalidRequest(f"{PORTMAP}: host address {shown(raw)} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        shown_ip = f"[{ip}]" if ip.version == 6 else str(ip)
        raise InvalidRequest(f"-p {shown_ip}:...:{port}/{proto}: vpcnet publishes ports without a userland proxy, "
                             "and a loopback address would need route_localnet, which opens 127.0.0.0/8 to the "
                             "network (IPv6 has none: the kernel never routes ::1 out); publish on the host's address "
                             "(or omit it) and firewall it in DOCKER-USER, or put the container on a Docker bridge "
                             "network for a loopback-only port")
    if ip.version == 4:
        return [("ipv4", "" if ip.is_unspecified else str(ip))]
    if not ipv6:
        if ip.is_unspecified:
            log.info("port %d/%s: not published on the host's IPv6 addresses ([::]): the endpoint has no IPv6 "
                     "address (an IPv4-only network, or its container turned IPv6 off)", port, proto)
            return []
        raise InvalidRequest(f"-p [{ip}]:...:{port}/{proto}: the endpoint has no IPv6 address (create the network "
                             "with --ipv6 to publish on the host's IPv6 addresses); publish on an IPv4 address of "
                             "the host or 0.0.0.0")
    if ip.is_link_local:
        raise InvalidRequest(f"-p [{ip}]:...:{port}/{proto}: a link-local host address cannot be published on "
                             "(it needs a zone); publish on a global or unique-local IPv6 address of the host, or [::]")
    return [("ipv6", "" if ip.is_unspecified else str(ip))]


def choose(endpoint_id: str, asked: list[Asked], before: list[Port], taken: Callable[[Port], str],
           ephemeral: tuple[int, int]) -> list[Port]:
    """One host port per binding: the one it got before when asked the same way again (`before`, the
    endpoint's rows), else the one asked, else the first free one of the range (`taken` says why a port is
    not free, "" when it is; for -P and a range, the port the other family's twin binding got first, so
    `[::]` and 0.0.0.0 share one). A port no one can have is refused with the reason, as Docker refuses."""
    out: list[Port] = []
    kept = {(p.family, p.proto, p.host_ip, p.container_port, p.asked): p for p in before}
    for a in asked:
        old = kept.get((a.family, a.proto, a.host_ip, a.container_port, a.asked))
        if old is not None:
            out.append(Port(endpoint_id, a.proto, a.host_ip, old.host_port, a.container_port, a.asked, a.family))
            continue
        if a.first and a.first == a.last:
            port = Port(endpoint_id, a.proto, a.host_ip, a.first, a.container_port, a.asked, a.family)
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
        twin = next((p.host_port for p in out if (p.proto, p.container_port, p.asked) ==
                     (a.proto, a.container_port, a.asked) and p.family != a.family), None)
        if twin in candidates:           # the other family's binding got it: both families on one port, as
            candidates.remove(twin)      # Docker gives them
            candidates.insert(0, twin)
        reasons = []
        for number in candidates[:TRIES]:
            port = Port(endpoint_id, a.proto, a.host_ip, number, a.container_port, a.asked, a.family)
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
