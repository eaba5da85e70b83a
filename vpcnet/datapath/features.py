"""What each datapath mode needs, checked on this kernel with this process's capabilities.

A network created without `-o vpcnet.mode` gets the best mode this host can do (ebpf, else routed, else
bridge; `VPCNET_DEFAULT_MODE` pins one). "Can do" is found by doing it once, on a throwaway veth pair that
is deleted again, never assumed from a kernel version:

- ebpf: both fast-path programs of vpcnet.datapath.ebpf pass BPF_PROG_LOAD (the verifier then has also checked
  the helpers they call, bpf_fib_lookup, bpf_redirect_neigh and bpf_redirect_peer), and a clsact qdisc
  with a direct-action bpf filter attaches. Refused without CAP_BPF (or CAP_SYS_ADMIN) or on kernels
  before 5.10.
- routed: a veth pair can be made (the anchor and the endpoints' veths) and proxy ARP and its delay can be
  set on it over netlink.
- bridge: always (what every vpcnet host already needs).

The probe costs a few milliseconds (two program loads, one veth pair) and is cached per process and network
namespace (`ProbeCache`): an answer with nothing missing for the process's life, any other for
FAILURE_TTL seconds only, so a transient failure (a BPF load refused under memory pressure) does not
leave a worker making lesser networks for good. It runs at network create, never per endpoint. The
throwaway pair is named `vpt<pid>` and lives in the namespace
the datapath works in, so a crash in between leaves at most one down veth pair, which the next probe of a
process with that pid replaces.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from pyroute2 import IPRoute, NetlinkError

from vpcnet.datapath import ebpf, rtnl
from vpcnet.datapath.ebpf.endpoints import EndpointFacts
from vpcnet.errors import DataplaneError

log = logging.getLogger(__name__)

ORDER = ("ebpf", "routed", "bridge")          # best first
DEFAULT_MODE_KEY = "datapath_default"         # store meta: the default the plugin resolved at its start
TC_INGRESS = 0xFFFFFFF2
ETH_P_IP = 0x0800
FAILURE_TTL = 60.0                            # seconds a probe that found something missing is trusted
# CIDRs only for assembling the programs; nothing is routed by them
_HOST, _CLUSTER = "10.255.0.0/24", "10.255.0.0/16"


@dataclass(frozen=True)
class Features:
    """The probe's answer: the best mode this host supports, and why each better one is not."""
    best: str
    missing: dict[str, str] = field(default_factory=dict)    # mode -> one line a user understands

    def supports(self, mode: str) -> bool:
        return ORDER.index(mode) >= ORDER.index(self.best)

    def why_not(self, mode: str) -> str:
        return self.missing.get(mode, "")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DefaultMode:
    """The mode a network created without `-o vpcnet.mode` gets, and why (for status and doctor)."""
    mode: str
    setting: str                 # VPCNET_DEFAULT_MODE: auto | bridge | routed | ebpf
    fallback: str = ""           # auto chose less than ebpf: why, and what to do
    unsupported: str = ""        # a pinned mode this host cannot do: why (network create refuses it)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for `vpcnet status` and `vpcnet doctor`."""
        text = f"{self.mode} (VPCNET_DEFAULT_MODE={self.setting})"
        if self.unsupported:
            return f"{text}, which this host cannot do: {self.unsupported}"
        return f"{text}, fell back: {self.fallback}" if self.fallback else text


def default_mode(setting: str, features: Features) -> DefaultMode:
    """`auto`: the best supported mode; a pinned mode as given (create_network refuses one the host cannot
    do, naming why)."""
    if setting != "auto":
        return DefaultMode(setting, setting, unsupported="" if features.supports(setting) else
                           f"{features.why_not(setting)}; set VPCNET_DEFAULT_MODE=auto or {features.best}")
    if features.best == "ebpf":
        return DefaultMode("ebpf", setting)
    why = "; ".join(f"{m}: {features.missing[m]}" for m in ORDER if m in features.missing)
    return DefaultMode(features.best, setting, f"{why}. Give the plugin what is missing, or pin "
                                               f"VPCNET_DEFAULT_MODE={features.best} to silence this")


class ProbeCache:
    """The probe's answers per network namespace. A success is kept for the process's life; a failure
    expires after `failure_ttl` seconds of `clock`, and the next `get` probes again."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, failure_ttl: float = FAILURE_TTL):
        self.clock = clock
        self.failure_ttl = failure_ttl
        self._entries: dict[str | None, tuple[Features, float | None]] = {}    # netns -> answer, expiry
        self._lock = threading.Lock()

    def get(self, netns: str | None = None, fresh: bool = False) -> Features:
        with self._lock:
            entry = self._entries.get(netns)
            if entry is not None and not fresh and (entry[1] is None or self.clock() < entry[1]):
                return entry[0]
            found = _probe(netns)
            previous = entry[0] if entry is not None else None
            expires = None if not found.missing else self.clock() + self.failure_ttl
            self._entries[netns] = (found, expires)
            if found != previous:        # the first answer, or a change: a re-probe that found the same is quiet
                log.info("datapath features%s: best mode %s%s%s%s", _where(netns), found.best,
                         f" (was {previous.best})" if previous is not None else "",
                         "".join(f"; no {m}: {why}" for m, why in found.missing.items()),
                         f"; probed again at a network create after {self.failure_ttl:.0f} s" if found.missing
                         else "")
            return found


CACHE = ProbeCache()


def probe(netns: str | None = None, fresh: bool = False) -> Features:
    """The host's features, through the process-wide cache (see ProbeCache)."""
    return CACHE.get(netns, fresh)


def _where(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""


def _probe(netns: str | None) -> Features:
    missing: dict[str, str] = {}
    name = f"vpt{os.getpid() % 10**11}"
    try:
        with IPRoute(netns=netns) if netns else IPRoute() as ipr:
            index, why = _scratch_veth(ipr, name)
            try:
                if index is None:
                    missing["routed"] = missing["ebpf"] = why
                else:
                    why = _routed(index, netns)
                    if why:
                        missing["routed"] = missing["ebpf"] = why
                    else:
                        why = _ebpf(ipr, index)
                        if why:
                            missing["ebpf"] = why
            finally:
                if index is not None:
                    _delete(ipr, index)
    except (OSError, NetlinkError) as exc:
        missing["routed"] = missing["ebpf"] = f"netlink is not usable here: {exc}"
    best = next(m for m in ORDER if m not in missing)
    return Features(best, {m: why for m, why in missing.items() if ORDER.index(m) < ORDER.index(best)})


def _scratch_veth(ipr: IPRoute, name: str) -> tuple[int | None, str]:
    try:
        ipr.link("del", ifname=name)              # a pair left by a crashed process of this pid
    except NetlinkError:
        pass
    try:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": name + "p"})
        return ipr.link("get", ifname=name)[0]["index"], ""
    except NetlinkError as exc:
        return None, f"cannot create a veth pair ({_errstr(exc)}): the kernel needs the veth driver"


def _routed(index: int, netns: str | None) -> str:
    sock = None
    try:
        sock = rtnl.open_socket(netns)
        rtnl.set_proxy_arp(sock, index)
        rtnl.set_arp_proxy_delay(sock, index, 0)
        return ""
    except OSError as exc:
        return f"cannot set proxy ARP over netlink ({exc})"
    finally:
        if sock is not None:
            sock.close()


def _ebpf(ipr: IPRoute, index: int) -> str:
    fds = []
    facts = EndpointFacts()                   # the endpoint maps the programs read (closed after)
    try:
        ep, local = facts.fd(4), facts.local_fd(4)
        for program, prog_name in ((ebpf.container_program(_HOST, _CLUSTER, ep, local_fd=local), "vpcnet_probe_c"),
                                   (ebpf.uplink_program(_HOST, _CLUSTER, index, local_fd=local), "vpcnet_probe_u")):
            fds.append(ebpf.load(program, prog_name))
    except DataplaneError as exc:
        facts.close()
        return str(exc).replace("cannot load eBPF program", "the kernel refuses the fast-path program", 1)
    facts.close()                             # the loaded programs hold the map
    try:
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            return f"cannot add a clsact qdisc ({_errstr(exc)}): the kernel needs sch_ingress/clsact"
        try:
            ipr.tc("add-filter", "bpf", index, 1, fd=fds[0], name="vpcnet-probe", parent=TC_INGRESS,
                   classid=1, direct_action=True, prio=1, protocol=ETH_P_IP)
        except NetlinkError as exc:
            return f"cannot attach a tc bpf filter ({_errstr(exc)}): the kernel needs cls_bpf"
        return ""
    finally:
        for fd in fds:
            os.close(fd)


def _delete(ipr: IPRoute, index: int) -> None:
    try:
        ipr.link("del", index=index)               # its peer, qdisc and filter go with it
    except NetlinkError as exc:
        if exc.code not in (errno.ENODEV, errno.ENOENT):
            log.warning("cannot delete the probe's veth (link %d): %s", index, exc)


def _errstr(exc: NetlinkError) -> str:
    return os.strerror(exc.code) if exc.code else str(exc)


def main(argv: list[str] | None = None) -> int:
    """`python3 -m vpcnet.datapath.features [--json]`: probe this process's view of the host."""
    parser = argparse.ArgumentParser(prog="python3 -m vpcnet.datapath.features")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    features = probe()
    if args.json:
        print(json.dumps(features.to_dict()))
    else:
        print(f"best mode: {features.best}")
        for mode, why in features.missing.items():
            print(f"no {mode}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
