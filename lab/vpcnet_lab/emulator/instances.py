"""ECS instances the emulator knows: the next hops a route entry may name, and DescribeInstances.

An instance is an id and its underlay (primary private) IP; the kernel-route mirror sends a destination
to that IP. Deregistering one leaves its route entries in place, as releasing an instance does.
"""
from __future__ import annotations

import ipaddress
import threading
from typing import Callable


class Instances:
    """`ips` (instance id -> underlay IP) is guarded by `lock`, shared with the rest of the emulator;
    `changed()` is called with it held after every change."""

    def __init__(self, lock: threading.RLock, changed: Callable[[], None], *, region: str, vpc_id: str):
        self._lock = lock
        self._changed = changed
        self.region = region
        self.vpc_id = vpc_id
        self.ips: dict[str, str] = {}

    def register(self, instance_id: str, underlay_ip: str) -> None:
        ip = str(ipaddress.IPv4Address(underlay_ip))
        with self._lock:
            self.ips[instance_id] = ip
            self._changed()

    def deregister(self, instance_id: str) -> bool:
        """Forget an instance (as if it were released). Its route entries stay, like in a real VPC."""
        with self._lock:
            found = self.ips.pop(instance_id, None) is not None
            if found:
                self._changed()
            return found

    def copy(self) -> dict[str, str]:
        with self._lock:
            return dict(self.ips)

    def describe_instances(self, instance_ids: list[str] | None = None) -> list[dict]:
        with self._lock:
            ids = list(self.ips) if instance_ids is None else instance_ids
            out = []
            for iid in ids:
                ip = self.ips.get(iid)
                if ip is None:
                    continue
                out.append({"InstanceId": iid, "RegionId": self.region, "Status": "Running",
                            "InstanceNetworkType": "vpc",
                            "VpcAttributes": {"VpcId": self.vpc_id,
                                              "PrivateIpAddress": {"IpAddress": [ip]}}})
            return out

    def restore(self, data: dict) -> None:
        """Take the instances from a state file's contents."""
        self.ips = dict(data.get("instances", {}))
