"""ECS instances the emulator knows: the next hops a route entry may name, and DescribeInstances.

An instance is an id and its underlay (primary private) IP, and optionally an IPv6 underlay address; the
kernel-route mirror sends a destination to the underlay address of its family. Deregistering one leaves its
route entries in place, as releasing an instance does.
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
        self.ips6: dict[str, str] = {}

    def register(self, instance_id: str, underlay_ip: str, underlay_ip6: str = "") -> None:
        ip = str(ipaddress.IPv4Address(underlay_ip))
        ip6 = str(ipaddress.IPv6Address(underlay_ip6)) if underlay_ip6 else ""
        with self._lock:
            self.ips[instance_id] = ip
            if ip6:
                self.ips6[instance_id] = ip6
            else:
                self.ips6.pop(instance_id, None)
            self._changed()

    def deregister(self, instance_id: str) -> bool:
        """Forget an instance (as if it were released). Its route entries stay, like in a real VPC."""
        with self._lock:
            found = self.ips.pop(instance_id, None) is not None
            self.ips6.pop(instance_id, None)
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
        self.ips6 = dict(data.get("instances6", {}))
