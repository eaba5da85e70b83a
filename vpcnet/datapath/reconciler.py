"""The store is the desired state; this makes the kernel match it: at start-up, and again periodically.

Docker's calls change the store and then the kernel (vpcnet.docker.driver, under the network's lock). This pass
finds what changed behind vpcnet's back by reading the kernel — one `iptables-save`, one link, address,
route and qdisc dump — not by remembering what it did, and repairs it: a firewall flushed by another tool,
a bridge or a /32 route deleted by hand, eBPF programs left on an old uplink, a published port's DNAT
rule deleted (the published ports are the `ports` rows, part of each network's firewall). Each repair is logged once
at WARNING saying what was wrong, and counted per object kind (`datapath_repairs`, kept in the store's
meta so `vpcnet status` shows it whichever worker did the work). Deleted objects the kernel kept
(`leftovers`) are removed here too.

First of all, the pass settles rows a dead call left `pending` (vpcnet.state.store): under the network's
lock, which a live CreateNetwork or CreateEndpoint holds from its first commit to its second, a pending row
is one whose call died between the commit and the kernel work (or during it). Docker got no answer, so it
has no such network or endpoint: the row goes, and its kernel state with it (as a deletion does, through
`leftovers`). Never anything Docker has: Docker only ever heard of rows that were set `ready`. Pending
rows of calls still running are left out of the pass.

One pass per host at a time: the pass runs in the worker holding `datapath.lock` in the state dir (as the
route reconciler does with its own lock), every `VPCNET_DATAPATH_INTERVAL` seconds.

Each pass is timed (`vpcnet_datapath_pass_duration_seconds`, `trigger` start for a worker's first pass,
which rebuilds after a reboot, else periodic), and one that ends with the kernel matching the store (no
exception, no network whose repair failed: `Datapath.unrepaired`) moves
`vpcnet_datapath_last_success_timestamp_seconds` (vpcnet.observability.events).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Sequence

from vpcnet.datapath.protocol import Datapath
from vpcnet.datapath.spec import EndpointSpec, NetworkGone, NetworkSpec, PortMapping, Repair
from vpcnet.observability import events
from vpcnet.state.locks import become_leader, object_lock
from vpcnet.state.store import PENDING, READY, Network, Port, Store

log = logging.getLogger(__name__)


def spec_of(net: Network, ports: Sequence[Port] = ()) -> NetworkSpec:
    """The network's spec; with `ports` (the store's rows of its endpoints), its published ports too."""
    return NetworkSpec(tag=net.network_id[:12], bridge=net.bridge, gateway=net.gateway, host_cidr=net.host_cidr,
                       cluster_cidr=net.cluster_cidr, mtu=net.mtu, internal=net.internal, no_nat=net.no_nat,
                       mode=net.mode, host_cidr_v6=net.host_cidr_v6, cluster_cidr_v6=net.cluster_cidr_v6,
                       shared_range=net.addressing == "eni-prefix",
                       ports=tuple(sorted(
                           PortMapping(p.proto, p.host_ip, p.host_port, p.address, p.container_port, p.family)
                           for p in ports)))


class DatapathReconciler:
    def __init__(self, config, store: Store, dataplane: Datapath):
        self.config = config
        self.store = store
        self.dataplane = dataplane
        self.repairs: Counter[str] = Counter()      # this process's repairs by kind (for metrics)
        self._stop = threading.Event()
        self.passes = 0
        self._trigger = "start"       # this process's first pass (driver.restore's), then "periodic"

    def _lock_for(self, ids: dict[str, str]) -> Callable[[NetworkSpec], ContextManager]:
        @contextmanager
        def locked(spec: NetworkSpec) -> Iterator[None]:
            network_id = ids.get(spec.tag, spec.tag)
            with object_lock(self.config.state_dir, network_id):
                if self.store.network(network_id) is None:
                    raise NetworkGone(network_id)
                yield
        return locked

    def reconcile(self) -> list[Repair]:
        """One pass over every network of the store; returns the repairs made. Timed, and a success
        (the kernel matches the store at its end) is recorded (vpcnet.observability.events)."""
        trigger, self._trigger = self._trigger, "periodic"
        started, ok = time.monotonic(), False
        try:
            repairs = self._pass()
            ok = not self.dataplane.unrepaired
            return repairs
        finally:
            events.datapath_pass(trigger, time.monotonic() - started, ok)

    def _pass(self) -> list[Repair]:
        """One pass; again (at most twice) while the published ports changed under it (a Program or Revoke
        that wrote its rules after this pass read the store, which this pass would otherwise undo)."""
        repairs: list[Repair] = []
        for _ in range(3):
            version = self.store.ports_version()
            repairs += self._once()
            if self.store.ports_version() == version:
                break
        return repairs

    def _once(self) -> list[Repair]:
        self.settle_pending()
        nets = [n for n in self.store.networks() if n.state == READY]
        ids = {spec_of(n).tag: n.network_id for n in nets}
        wanted = []
        ports: dict[str, list[Port]] = {}
        for port in self.store.ports():
            ports.setdefault(port.endpoint_id, []).append(port)
        for net in nets:
            endpoints = [e for e in self.store.endpoints(net.network_id) if e.state == READY]
            eps = [EndpointSpec(e.host_veth, e.peer_veth, e.mac, e.address) for e in endpoints]
            wanted.append((spec_of(net, [p for e in endpoints for p in ports.get(e.endpoint_id, [])]), eps))
        repairs = self.dataplane.repair(wanted, self._lock_for(ids),
                                        lambda tag: self.store.network(ids.get(tag, tag)) is not None)
        self.passes += 1
        for r in repairs:
            log.warning("datapath repaired (%s%s): %s", r.kind,
                        f", network {r.network}" if r.network != "-" else "", r.what,
                        extra={"event": "datapath_repair", "kind": r.kind, "outcome": "repaired",
                               "network": r.network if r.network != "-" else None})
        if repairs:
            self._count(Counter(r.kind for r in repairs))
        self.remove_leftovers()
        return repairs

    def settle_pending(self) -> list[str]:
        """Undo the networks and endpoints a dead call left pending (see the module docstring); returns
        what was undone ("network <id>", "endpoint <id>")."""
        undone = []
        nets, eps = self.store.pending()
        for network_id in sorted({n.network_id for n in nets} | {e.network_id for e in eps}):
            with object_lock(self.config.state_dir, network_id):      # waits for a live call to finish
                net = self.store.network(network_id)
                if net is not None and net.state == PENDING:
                    self.store.delete_network(network_id, leftover=True)     # its endpoints with it
                    self.remove_leftovers(f"network:{network_id}")
                    undone.append(f"network {network_id}")
                    log.warning("network %s: its CreateNetwork died between the commit and the kernel work "
                                "(Docker has no such network): row and kernel state removed", network_id[:12])
                    continue
                for ep in self.store.endpoints(network_id):
                    if ep.state != PENDING:
                        continue
                    self.store.delete_endpoint(ep.endpoint_id, leftover=True)
                    self.remove_leftovers(f"endpoint:{ep.host_veth}")
                    undone.append(f"endpoint {ep.endpoint_id}")
                    log.warning("endpoint %s (network %s, %s): its CreateEndpoint died between the commit and "
                                "the kernel work (Docker has no such endpoint): row and veth %s removed",
                                ep.endpoint_id[:12], network_id[:12], ep.address, ep.host_veth)
        return undone

    def _count(self, new: Counter) -> None:
        self.repairs.update(new)
        try:
            self.store.add_repairs(new)
        except Exception as exc:       # a full disk must not stop repairs: the log has them
            log.warning("cannot record the repair counts: %s", exc)

    def remove_leftovers(self, only: str | None = None) -> int:
        """Remove the kernel state of deleted networks and endpoints (all, or the one named `only`);
        forget each once it is gone. A failure is logged and retried by the next call. Returns how many
        are still left."""
        left = 0
        for name, data in self.store.leftovers():
            if only is not None and name != only:
                continue
            try:
                if name.startswith("network:"):
                    for veth in data.get("host_veths", []):
                        self.dataplane.delete_endpoint(veth)
                    # an IPv6-only network's endpoints have no IPv4 address ("")
                    self.dataplane.forget_peers([a for a in data.get("addresses", []) if a])
                    row = {k: v for k, v in data.items() if k not in ("host_veths", "addresses")}
                    row["no_nat"] = tuple(json.loads(row["no_nat"]))
                    row["internal"] = bool(row["internal"])
                    self.dataplane.delete_network(spec_of(Network(**row)))
                else:
                    self.dataplane.delete_endpoint(data["host_veth"])
                    self.dataplane.forget_peers([data["address"]] if data.get("address") else [])
                self.store.forget_leftover(name)
            except Exception as exc:
                left += 1
                log.warning("cannot remove the kernel state of deleted %s yet (retried later): %s", name, exc)
        return left

    # -- the periodic pass ------------------------------------------------------------------------
    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="vpcnet-datapath", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            with open(os.path.join(self.config.state_dir, "datapath.lock"), "a") as lock:
                if not become_leader(lock, self._stop):      # one pass per host
                    return
                interval = self.config.datapath_interval
                log.info("datapath pass every %.0fs in this worker (pid %d)", interval, os.getpid())
                while not self._stop.wait(interval):
                    started = time.monotonic()
                    try:
                        self.reconcile()
                    except Exception:
                        log.exception("datapath pass failed")
                    log.debug("datapath pass took %.3fs", time.monotonic() - started)
        except Exception:
            log.exception("datapath reconciler stopped by an unexpected error")
