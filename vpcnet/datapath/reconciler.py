"""The store is the desired state; this makes the kernel match it: at start-up, and again periodically.

Docker's calls change the store and then the kernel (vpcnet.docker.driver, under the network's lock). This pass
finds what changed behind vpcnet's back by reading the kernel — one `iptables-save`, one link, address,
route and qdisc dump — not by remembering what it did, and repairs it: a firewall flushed by another tool,
a bridge or a /32 route deleted by hand, eBPF programs left on an old uplink. Each repair is logged once
at WARNING saying what was wrong, and counted per object kind (`datapath_repairs`, kept in the store's
meta so `vpcnet status` shows it whichever worker did the work). Deleted objects the kernel kept
(`leftovers`) are removed here too.

One pass per host at a time: the pass runs in the worker holding `datapath.lock` in the state dir (as the
route reconciler does with its own lock), every `VPCNET_DATAPATH_INTERVAL` seconds.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

from vpcnet.datapath.protocol import Datapath
from vpcnet.datapath.spec import EndpointSpec, NetworkGone, NetworkSpec, Repair
from vpcnet.state.locks import become_leader, object_lock
from vpcnet.state.store import Network, Store

log = logging.getLogger(__name__)

def spec_of(net: Network) -> NetworkSpec:
    return NetworkSpec(tag=net.network_id[:12], bridge=net.bridge, gateway=net.gateway, host_cidr=net.host_cidr,
                       cluster_cidr=net.cluster_cidr, mtu=net.mtu, internal=net.internal, no_nat=net.no_nat,
                       mode=net.mode)


class DatapathReconciler:
    def __init__(self, config, store: Store, dataplane: Datapath):
        self.config = config
        self.store = store
        self.dataplane = dataplane
        self.repairs: Counter[str] = Counter()      # this process's repairs by kind (for metrics)
        self._stop = threading.Event()
        self.passes = 0

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
        """One pass over every network of the store; returns the repairs made."""
        nets = self.store.networks()
        ids = {spec_of(n).tag: n.network_id for n in nets}
        wanted = []
        for net in nets:
            eps = [EndpointSpec(e.host_veth, e.peer_veth, e.mac, e.address)
                   for e in self.store.endpoints(net.network_id)]
            wanted.append((spec_of(net), eps))
        repairs = self.dataplane.repair(wanted, self._lock_for(ids),
                                        lambda tag: self.store.network(ids.get(tag, tag)) is not None)
        self.passes += 1
        for r in repairs:
            log.warning("datapath repaired (%s%s): %s", r.kind,
                        f", network {r.network}" if r.network != "-" else "", r.what)
        if repairs:
            self._count(Counter(r.kind for r in repairs))
        self.remove_leftovers()
        return repairs

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
                    row = {k: v for k, v in data.items() if k != "host_veths"}
                    row["no_nat"] = tuple(json.loads(row["no_nat"]))
                    row["internal"] = bool(row["internal"])
                    self.dataplane.delete_network(spec_of(Network(**row)))
                else:
                    self.dataplane.delete_endpoint(data["host_veth"])
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
