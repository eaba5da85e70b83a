"""The emulator: one `Emulator` object that the HTTP layer (`api.py`), the CLI, the lab and tests drive.

It puts together the pieces, each in its own module, around one lock (safe from many threads):
`tables` (route tables, entries and their Pending/Deleting timers, quotas), `entries` (the API's writes
and the VPC write lock), `instances` (next hops, DescribeInstances), `auth` (signature, timestamp, nonces),
`faults` (injected faults, latency, request counts), `enis` (ECS network interfaces and their address
prefixes, reserved ranges, instance types), `kernel` (the routes in a router namespace: route entries and
prefixes) and `persist` (the state file). Everything that decides an answer lives in those pieces; `api.py` only parses
requests and turns `ApiError` into Alibaba-shaped error answers.

Timed transitions happen lazily on every access and in a small ticker thread here (so kernel routes and
the state file follow promptly even when nobody asks).
"""
from __future__ import annotations

import ipaddress
import os
import threading
from typing import Callable

from vpcnet_lab.emulator import persist
from vpcnet_lab.emulator.auth import Authenticator
from vpcnet_lab.emulator.enis import INSTANCE_TYPES, NetworkInterfaces, eni_id_of
from vpcnet_lab.emulator.entries import RouteEntries
from vpcnet_lab.emulator.errors import ApiError
from vpcnet_lab.emulator.faults import DEFAULT_FAULT_CODES, Faults
from vpcnet_lab.emulator.instances import Instances
from vpcnet_lab.emulator.kernel import KernelMirror
from vpcnet_lab.emulator.tables import DEFAULT_VSWITCH_CIDRS, RouteTables


class Emulator:
    """State of an Alibaba-Cloud-compatible VPC: route tables, entries and instances."""

    def __init__(self, *, region: str = "cn-emu-1", vpc_id: str = "vpc-emu0001",
                 route_table_id: str = "vtb-emu0001",
                 credentials: dict[str, str] | None = None,
                 pending_delay: float = 0.0, deleting_delay: float = 0.0, quota: int = 200,
                 state_file: str | None = None, router_netns: str | None = None,
                 seed: int | None = None,
                 vswitch_cidrs: tuple[str, ...] | list[str] = DEFAULT_VSWITCH_CIDRS,
                 vswitch_api: bool = False, write_interval: float = 0.0, batch_api: bool = True,
                 kernel_tables: dict[str, int] | None = None, pending_delay_max: float = 0.0,
                 clock: Callable[[], float] | None = None):
        self.region = region
        self.vpc_id = vpc_id
        self.route_table_id = route_table_id
        self.state_file = state_file
        self.router_netns = router_netns
        #: Emulated route table -> kernel routing table number in the router namespace. Empty: every
        #: table's routes go into the main table (the first table wins a destination held by several).
        #: Given: each emulated table gets its own kernel table, so a router forwarding by the table of
        #: the packet's vSwitch (policy rules, set up by the lab) sees exactly that table's routes.
        self.kernel_tables = dict(kernel_tables or {})
        #: Whether DescribeVSwitches is served (off by default: an endpoint without it is a case the
        #: provider must handle, and the agreed interface does not include it).
        self.vswitch_api = bool(vswitch_api)
        # False: CreateRouteEntries/DeleteRouteEntries are unknown actions (an endpoint without them)
        self.batch_api = bool(batch_api)

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = threading.Event()
        self._mirror: KernelMirror | None = None
        self._threads: list[threading.Thread] = []

        self._tables = RouteTables(self._lock, self._changed, region=region, vpc_id=vpc_id,
                                   route_table_id=route_table_id, vswitch_cidrs=vswitch_cidrs,
                                   clock=clock, seed=seed)
        self._auth = Authenticator(self._lock, credentials)
        self._instances = Instances(self._lock, self._changed, region=region, vpc_id=vpc_id)
        self._entries = RouteEntries(self._lock, self._changed, self._tables, self._instances)
        self._enis = NetworkInterfaces(self._lock, self._changed, region=region, vpc_id=vpc_id,
                                       vswitch_of=self._vswitch_of, vswitch_cidr=self._vswitch_cidr,
                                       clock=clock)
        self.configure(pending_delay=pending_delay, deleting_delay=deleting_delay, quota=quota,
                       write_interval=write_interval, pending_delay_max=pending_delay_max)
        self._faults = Faults(self._lock, seed)

        with self._lock:
            if state_file and os.path.exists(state_file):
                self._load(state_file)
            if route_table_id not in self._tables.tables:
                self._tables.add_table_locked(route_table_id, vpc_id)
            self._save_locked()

        if router_netns:
            self._mirror = KernelMirror(router_netns, self.kernel_tables, self.desired_kernel_routes)
            self.sync_kernel()          # reconcile the namespace with the table at start
            mirror = self._mirror
            self._start_thread(lambda: mirror.run(self._closed), "vpcnet-emulator-kernel")
        self._start_thread(self._tick_loop, "vpcnet-emulator-ticker")

    # ------------------------------------------------------------------ lifecycle

    def _start_thread(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        """Stop the background threads (state is already saved after every change)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        if self._mirror is not None:
            self._mirror.poke()
        for thread in self._threads:
            thread.join(timeout=5.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _changed(self) -> None:
        """Called with the lock held after every change: persist, wake the ticker and the kernel mirror."""
        self._save_locked()
        self._cond.notify_all()
        if self._mirror is not None:
            self._mirror.poke()

    def _tick_loop(self) -> None:
        with self._cond:
            while not self._closed.is_set():
                self._tables.advance()
                nxt = self._tables.next_due()
                timeout = 1.0 if nxt is None else min(1.0, max(0.0, nxt - self._tables.clock()) + 0.001)
                self._cond.wait(timeout)

    # ------------------------------------------------------------------ configuration

    def configure(self, *, pending_delay: float | None = None, deleting_delay: float | None = None,
                  quota: int | None = None, write_interval: float | None = None,
                  pending_delay_max: float | None = None) -> dict:
        """`pending_delay_max` above `pending_delay`: each new entry stays Pending for a delay drawn from
        uniform(pending_delay, pending_delay_max) (seeded by `seed`); 0: exactly `pending_delay`."""
        with self._lock:
            self._tables.configure(pending_delay=pending_delay, deleting_delay=deleting_delay, quota=quota,
                                   pending_delay_max=pending_delay_max)
            self._entries.configure(write_interval=write_interval)
            return {"pending_delay": self.pending_delay, "pending_delay_max": self._tables.pending_delay_max,
                    "deleting_delay": self.deleting_delay,
                    "quota": self.quota, "write_interval": self.write_interval}

    @property
    def pending_delay(self) -> float:
        return self._tables.pending_delay

    @property
    def deleting_delay(self) -> float:
        return self._tables.deleting_delay

    @property
    def quota(self) -> int:
        return self._tables.quota

    @property
    def write_interval(self) -> float:
        return self._entries.write_interval

    def add_credentials(self, key_id: str, secret: str) -> None:
        self._auth.add_credentials(key_id, secret)

    def add_sts_credentials(self, key_id: str, secret: str, token: str) -> None:
        self._auth.add_sts_credentials(key_id, secret, token)

    def set_faults(self, rate: float = 0.0, codes=DEFAULT_FAULT_CODES, latency: float = 0.0,
                   seed: int | None = None) -> dict:
        return self._faults.set(rate, codes, latency, seed)

    def faults(self) -> dict:
        return self._faults.settings()

    @property
    def latency(self) -> float:
        return self._faults.latency

    # ------------------------------------------------------------------ what every request passes

    def authenticate(self, method: str, params: dict[str, str], now: float | None = None) -> str:
        return self._auth.authenticate(method, params, now)

    def draw_fault(self) -> ApiError | None:
        return self._faults.draw()

    def count_request(self, action: str) -> None:
        self._faults.count(action)

    @property
    def request_counts(self) -> dict[str, int]:
        return self._faults.counts()

    def reset_request_counts(self) -> None:
        self._faults.reset_counts()

    @property
    def conflicts(self) -> int:
        return self._entries.conflicts

    # ------------------------------------------------------------------ instances, tables, vSwitches

    def register_instance(self, instance_id: str, underlay_ip: str, underlay_ip6: str = "",
                          instance_type: str = "") -> None:
        """An instance (and its primary ENI); `instance_type` (default: kept, else ecs.g7.large) fixes
        how many prefixes the ENI can hold."""
        if instance_type and instance_type not in INSTANCE_TYPES:
            raise ValueError(f"unknown instance type {instance_type!r}; known: {', '.join(INSTANCE_TYPES)}")
        with self._lock:
            self._instances.register(instance_id, underlay_ip, underlay_ip6)
            self._enis.attach_primary(instance_id, self._instances.ips[instance_id],
                                      self._instances.ips6.get(instance_id, ""), instance_type)

    def deregister_instance(self, instance_id: str) -> bool:
        """Forget an instance: its route entries stay, its primary ENI and prefixes go with it."""
        with self._lock:
            self._enis.detach_instance(instance_id)
            return self._instances.deregister(instance_id)

    def _vswitch_of(self, ip: str) -> str:
        """The vSwitch whose CIDR holds `ip`, else the VPC's first one (caller holds the lock)."""
        vswitches = self._tables.describe_vswitches(self.vpc_id)
        address = ipaddress.ip_address(ip)
        for vsw in vswitches:
            if address in ipaddress.ip_network(vsw["CidrBlock"]):
                return vsw["VSwitchId"]
        return vswitches[0]["VSwitchId"] if vswitches else "vsw-emu0001"

    def _vswitch_cidr(self, vswitch_id: str) -> str:
        """A vSwitch's IPv4 CIDR, "" when no VPC has it (caller holds the lock)."""
        for vsw in self._tables.describe_vswitches(self.vpc_id):
            if vsw["VSwitchId"] == vswitch_id:
                return str(vsw["CidrBlock"])
        return ""

    def instances(self) -> dict[str, str]:
        return self._instances.copy()

    def add_route_table(self, route_table_id: str, vpc_id: str | None = None, quota: int | None = None,
                        vswitches: dict[str, str] | None = None) -> None:
        self._tables.add_route_table(route_table_id, vpc_id, quota, vswitches)

    def set_table_quota(self, route_table_id: str, quota: int | None) -> None:
        self._tables.set_table_quota(route_table_id, quota)

    def table_quota(self, route_table_id: str) -> int:
        return self._tables.table_quota(route_table_id)

    def add_vswitch(self, vswitch_id: str, cidr: str, route_table_id: str | None = None,
                    zone_id: str = "") -> None:
        self._tables.add_vswitch(vswitch_id, cidr, route_table_id, zone_id)

    def vswitches(self) -> dict[str, dict]:
        return self._tables.copy_vswitches()

    def route_tables(self) -> list[dict]:
        return self._tables.list_tables()

    # ------------------------------------------------------------------ network interfaces, prefixes

    @property
    def enis(self) -> NetworkInterfaces:
        """The ECS side: primary ENIs, their prefixes, reserved ranges (the ECS actions in api.py use it)."""
        return self._enis

    def add_cidr_reservation(self, vswitch_id: str, cidr: str, kind: str = "Prefix") -> str:
        return self._enis.add_reservation(vswitch_id, cidr, kind)

    def set_vswitch_ipv6(self, vswitch_id: str, cidr: str) -> None:
        self._enis.set_vswitch_ipv6(vswitch_id, cidr)

    def network_interface_id(self, instance_id: str) -> str:
        """The primary ENI of a registered instance."""
        return eni_id_of(instance_id)

    def hold_interface(self, eni_id: str, seconds: float) -> None:
        self._enis.hold(eni_id, seconds)

    # ------------------------------------------------------------------ entries by hand

    def add_system_entry(self, destination: str, next_hop_type: str = "local", next_hop_id: str = "",
                         route_table_id: str | None = None) -> str:
        return self._tables.add_system_entry(destination, next_hop_type, next_hop_id, route_table_id)

    def add_custom_entry(self, destination: str, next_hop_id: str, *, name: str = "", description: str = "",
                         route_table_id: str | None = None, next_hop_type: str = "Instance",
                         status: str = "Available") -> str:
        return self._tables.add_custom_entry(destination, next_hop_id, name=name, description=description,
                                             route_table_id=route_table_id, next_hop_type=next_hop_type,
                                             status=status)

    def remove_entry(self, entry_id: str) -> bool:
        return self._tables.remove_entry(entry_id)

    def entries(self, route_table_id: str | None = None) -> list[dict]:
        return self._tables.entries(route_table_id)

    # ------------------------------------------------------------------ API actions

    def create_route_entry(self, route_table_id: str, destination: str, next_hop_type: str,
                           next_hop_id: str, name: str = "", description: str = "",
                           client_token: str = "") -> str:
        return self._entries.create_route_entry(route_table_id, destination, next_hop_type, next_hop_id,
                                                name, description, client_token)

    def create_route_entries(self, entries: list[dict], client_token: str = "") -> tuple[list[str], list[dict]]:
        return self._entries.create_route_entries(entries, client_token)

    def delete_route_entry(self, route_table_id: str = "", entry_id: str = "", destination: str = "",
                           next_hop_id: str = "") -> str:
        return self._entries.delete_route_entry(route_table_id, entry_id, destination, next_hop_id)

    def delete_route_entries(self, entries: list[dict]) -> tuple[list[str], list[dict]]:
        return self._entries.delete_route_entries(entries)

    def describe_route_entries(self, route_table_id: str, filters: dict[str, str] | None = None,
                               max_result: int = 100, next_token: str = "") -> tuple[list[dict], str]:
        return self._entries.describe_route_entries(route_table_id, filters, max_result, next_token)

    def describe_route_tables(self, vpc_id: str = "", route_table_id: str = "",
                              vswitch_id: str = "") -> list[dict]:
        return self._tables.describe_route_tables(vpc_id, route_table_id, vswitch_id)

    def describe_vswitches(self, vpc_id: str = "") -> list[dict]:
        return self._tables.describe_vswitches(vpc_id)

    def describe_instances(self, instance_ids: list[str] | None = None) -> list[dict]:
        return self._instances.describe_instances(instance_ids)

    # ------------------------------------------------------------------ kernel routes

    def desired_kernel_routes(self, route_table_id: str | None = None) -> dict[str, str]:
        """destination -> underlay IP of the next hop, for every Available (or Deleting) instance entry
        whose instance is registered, of one table (default: all; the first table wins a destination
        two tables hold), and for every ENI prefix (in every table)."""
        with self._lock:
            routes = self._tables.instance_routes(self._instances.ips, route_table_id, self._instances.ips6)
            # the VPC delivers a prefix's addresses to its interface whatever the route table
            routes.update(self._enis.kernel_routes())
            return routes

    def sync_kernel(self) -> list[str]:
        """Make the router namespace's routes (our proto only) match the tables now. Returns problems."""
        return self._mirror.sync() if self._mirror is not None else []

    # ------------------------------------------------------------------ snapshot and state file

    def snapshot(self) -> dict:
        """Everything but secrets, for `GET /_emulator/state`."""
        with self._lock:
            self._tables.advance()
            return {
                "region": self.region,
                "vpc_id": self.vpc_id,
                "route_table_id": self.route_table_id,
                "route_tables": self._tables.summary(),
                "vswitches": self._tables.copy_vswitches(),
                "write_conflicts": self._entries.conflicts,
                "instances": self._instances.copy(),
                "network_interfaces": {k: dict(v) for k, v in self._enis.enis.items()},
                "cidr_reservations": {k: list(v) for k, v in self._enis.reservations.items()},
                "config": {"pending_delay": self.pending_delay, "deleting_delay": self.deleting_delay,
                           "quota": self.quota, "write_interval": self.write_interval},
                "faults": self.faults(),
                "request_counts": self.request_counts,
                "router_netns": self.router_netns,
                "access_key_ids": self._auth.key_count(),
            }

    def _save_locked(self) -> None:
        if self.state_file:
            persist.save(self.state_file, {**self._tables.dump(), "instances": self._instances.ips,
                                           "instances6": self._instances.ips6,
                                           "client_tokens": self._entries.client_tokens,
                                           "nonces": self._auth.nonces, **self._enis.dump()})

    def _load(self, path: str) -> None:
        try:
            data = persist.load(path)
            self._tables.restore(data)
            self._instances.restore(data)
            self._entries.restore(data)
            self._enis.restore(data)
            self._auth.restore(data)
            for instance_id, ip in self._instances.ips.items():   # a state file from before ENIs existed
                self._enis.attach_primary(instance_id, ip, self._instances.ips6.get(instance_id, ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot load emulator state from {path}: {exc}") from exc
        self._tables.advance()
