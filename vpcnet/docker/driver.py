"""The network driver: Docker's network model on top of the store and the dataplane.

Knows which calls Docker makes in which order, and which must be idempotent: Docker never replays
CreateNetwork (so the network is stored before it answers), and at daemon start it sends Leave,
DeleteEndpoint and ReleaseAddress for sandboxes that may already be gone — those succeed.
A failed call changes no state: the store is written first (the desired state: a full state disk or a
lost race fails before the kernel is touched), and on a kernel failure both are undone. Deletion
removes the row first and then the kernel state; what the kernel refuses to give up is recorded as a
leftover and removed by the next start or datapath pass. Calls about one network are serialised by a
file lock (vpcnet.state.locks), across threads and gunicorn workers.

A crash in the middle of a call (kill -9, an OOM kill, gunicorn's worker timeout) between the commit and
the kernel work left a row nothing removed: a network row holds the host's block of its cluster CIDR (every
later `docker network create` on it was refused), an endpoint row its address (every `docker run` given
that address was refused). So CreateNetwork and CreateEndpoint write their row `pending`, in the same
transaction that reserves it, and set it `ready` after the kernel work, before they answer. A row found
pending under its network's lock belongs to a call that died (a live call holds the lock from the first
commit to the second), Docker got no answer and has no such object: the datapath pass (at start, and
every VPCNET_DATAPATH_INTERVAL) undoes the row and its kernel state (`DatapathReconciler.settle_pending`).
Chosen over asking Docker's API for what it has: the managed plugin has no Docker socket, a plugin may
serve an engine other than the socket it could find, and a wrong answer there would delete a network
Docker still has. The lock makes the pending state exact, so no grace period is needed. What is left is
the window after the second commit and before Docker read the answer: Docker then believes the call
failed. For an endpoint it releases the address, which forgets the row (vpcnet.docker.ipam). For a
network it releases the pool, which cannot tell that from a refused duplicate create releasing its own
request; `vpcnet doctor` names such a network (Docker does not have it) and `vpcnet network forget` removes
it (vpcnet.cli.network).

Test only: `VPCNET_TEST_CRASH_AFTER_COMMIT=<file>` arms `_crash_point`; while the file holds "network" (or
"endpoint"), the next CreateNetwork (CreateEndpoint) deletes it and SIGKILLs the plugin's process group
right after its first commit, as a crash there would; "endpoint-ready": right after CreateEndpoint's second
commit, before the answer (tests/test_crash.py). Unset, or without the file, it does nothing.

Docker's ids are accepted only in the forms Docker makes (64 lowercase hex; 25 base-36 characters for a
swarm network's id), and a SandboxKey only as a path ending in a sandbox name: an id ends up in link and
chain names, rows and log lines. Values an error message quotes go through `vpcnet.errors.shown`.

Options: `-o com.docker.network.driver.mtu=N`, and `-o vpcnet.mode=bridge|routed|ebpf`: the datapath of
the network, stored with it (see vpcnet.datapath: routed mode has no bridge, proxy ARP and a /32 route
per endpoint, for a shorter per-packet path; ebpf mode adds a tc fast path that skips the host's IP stack
for cluster traffic). Without it the network gets the host's default mode (`default_mode`):
`VPCNET_DEFAULT_MODE=auto` takes the best mode this kernel and the plugin's capabilities allow, as probed
once per process by vpcnet.datapath.features (ebpf, else routed, else bridge); a pinned mode the host
cannot do is refused, naming why. The mode is stored, so a network keeps it across restarts and upgrades
whatever the default becomes. Unknown options and modes are refused.

IPv6 (`--ipv6`, dual-stack, every mode; ebpf with its IPv6 fast path, vpcnet.datapath.ebpf.programs6): the
network keeps its IPv6 block from IPv6Data, an endpoint its IPv6 address from Interface.AddressIPv6 (a /128,
vpcnet.docker.ipam), the host gives it IPv6 on its veth and a /128 route (vpcnet.datapath.ipv6; bridge mode:
the block routed to the bridge, and a guard rule for the port), and Join answers `GatewayIPv6`: a link-local
address of the host veth's (bridge mode: the bridge's) own (vpcnet.datapath.ipv6.link_gateway: no proxy NDP,
and a container on two networks gets each one's routes on its own interface), as a /128 on the interface
and with the IPv6 cluster CIDR through it; in
bridge mode also the host's block as a connected route, so the network's containers resolve each other on
the bridge. IPv6-only networks (`--ipv6 --ipv4=false`, Docker 28+, routed and ebpf modes: no IPv4
RequestPool, an empty IPv4Data): the row has only its IPv6 block (store schema 7), each endpoint only its
IPv6 address, Join answers no `Gateway` and only the IPv6 route, the datapath makes nothing of IPv4 for
them, and `-p` on them is refused (vpcnet publishes on IPv4 only so far). `--internal --ipv6`: the
network's IPv6 stays inside its IPv6 cluster CIDR as its IPv4 inside the IPv4 one
(vpcnet.datapath.ipv6.forward_rules).

What current engines (Docker 28/29) add:
- `GwAllocChecker: true`: Docker then posts GwAllocCheck with the network's options before it asks IPAM
  for a pool, so a network vpcnet would refuse (unknown -o, --ipv4=false without --ipv6 or in bridge mode) is
  refused before its
  RequestPool claims a host block. The answer is always "allocate the gateway" (vpcnet's IPAM gives
  it). Docker before 28 ignores the field and never calls GwAllocCheck.
- `--ipv4=false` (`com.docker.network.enable_ipv4: false`, empty IPv4Data): an IPv6-only network with --ipv6,
  refused naming the flag without it.
- Endpoint label `com.docker.network.endpoint.sysctls`: Docker applies it itself in the container, to
  the interface vpcnet hands over; nothing to do here. `com.docker.network.endpoint.ifname`: refused,
  since Docker names a plugin's interface from `DstPrefix` and never from this label.
- `gw-priority`, and Docker 29 sending ProgramExternalConnectivity only to the gateway endpoint: Join
  always offers the gateway and a static route for the cluster CIDR through it, so cluster traffic
  keeps vpcnet's interface when another network gives the default route; nothing but published ports
  depends on ProgramExternalConnectivity.

Published ports (`-p`, `-P`, Compose `ports:`): ProgramExternalConnectivity publishes the endpoint's port
bindings (vpcnet.docker.ports parses them and chooses host ports), RevokeExternalConnectivity and
DeleteEndpoint unpublish them. The `ports` rows are the desired state, written first; the network's rules
follow (vpcnet.datapath.modes), in ebpf mode the endpoint's program too. Both calls may repeat (Docker 29
sends them whenever the endpoint becomes, or stops being, the container's gateway): the same request
keeps the same ports. Host ports are host-wide, so one Program or Revoke at a time chooses them (the
`ports.lock` file, inside the network's lock). IPv6 (vpcnet.docker.ports says which binding takes which
family): an endpoint with an IPv6 address publishes its IPv6 bindings to that address, with ip6tables
(vpcnet.datapath.ports6), host ports chosen and checked per family; one whose IPv6 address Docker releases
loses its IPv6 ports with it (`drop_ipv6`).
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import re
import signal
import sqlite3
import time
from contextlib import contextmanager
from typing import Iterator

from vpcnet.datapath.features import DEFAULT_MODE_KEY, DefaultMode, default_mode
from vpcnet.datapath.ipv6 import link_gateway
from vpcnet.datapath.ipv6 import unavailable as ipv6_unavailable
from vpcnet.datapath.protocol import Datapath
from vpcnet.datapath.reconciler import DatapathReconciler, spec_of
from vpcnet.datapath.spec import MODES, EndpointSpec, bridge_name, mac_for, veth_names
from vpcnet.docker import ports
from vpcnet.errors import Conflict, InvalidRequest, NotFound, shown
from vpcnet.state.locks import object_lock
from vpcnet.state.store import PENDING, READY, Endpoint, Network, Port

__all__ = ["NetworkDriver", "spec_of"]

log = logging.getLogger(__name__)

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
# The ids Docker makes, and nothing else: they end up in link and chain names, rows and log lines.
# libnetwork's stringid.GenerateRandomID (64 lowercase hex) for networks and endpoints; swarmkit's
# identity.NewID (25 lowercase base-36 characters) for swarm-scoped networks (CreateManagedNetwork).
_IDS = {"NetworkID": (re.compile(r"[0-9a-f]{64}|[0-9a-z]{25}"),
                      "64 lowercase hex characters, or 25 lowercase letters and digits for a swarm network"),
        "EndpointID": (re.compile(r"[0-9a-f]{64}"), "64 lowercase hex characters")}
# SandboxKey: <exec root>/netns/<up to 12 characters of the sandbox id, or "default", "ingress_sbox"...>;
# the exec root is the daemon's (--exec-root, rootless: $XDG_RUNTIME_DIR/docker), so only its shape is checked.
_SANDBOX_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
GENERIC = "com.docker.network.generic"
MTU_OPTION = "com.docker.network.driver.mtu"
IPV6_MIN_MTU = 1280                   # RFC 8200: every IPv6 link carries 1280-byte packets
INTERNAL_OPTION = "com.docker.network.internal"
IPV6_OPTION = "com.docker.network.enable_ipv6"
IPV4_OPTION = "com.docker.network.enable_ipv4"            # Docker 28+: false with --ipv4=false
IFNAME_OPTION = "com.docker.network.endpoint.ifname"      # Docker 28+: driver-opt / Compose interface_name
MODE_OPTION = "vpcnet.mode"
KNOWN_GENERIC_OPTIONS = {MTU_OPTION, MODE_OPTION}
# A swarm-scoped network made in one line reaches the nodes with Docker's default IPAM: say what works.
SWARM_HINT = ("For a swarm-scoped network, give each node its IPAM config: on every node `docker network create "
              "--config-only --ipam-driver <this driver> [--subnet <cluster CIDR>] NET-config`, then on a manager "
              "`docker network create -d <this driver> --scope swarm --attachable --config-from NET-config NET` "
              "(docs/swarm.md)")
ROUTE_NEXTHOP = 0                                         # Join's StaticRoutes[].RouteType: via NextHop
ROUTE_CONNECTED = 1                                       # ... on the interface's link, no next hop
CRASH_ENV = "VPCNET_TEST_CRASH_AFTER_COMMIT"              # test only: see the module docstring


class NetworkDriver:
    def __init__(self, config, store, dataplane: Datapath):
        self.config = config
        self.store = store
        self.dataplane = dataplane
        self.reconciler = DatapathReconciler(config, store, dataplane)
        self._recorded_default: dict | None = None     # what the store holds for `vpcnet status`/doctor

    @staticmethod
    def capabilities() -> dict:
        # Scope local: Docker keeps the network per engine (no swarm store needed). The connectivity
        # is cross-host, through the VPC route table.
        # GwAllocChecker: Docker 28+ then calls gw_alloc_check() before IPAM (see the module docstring).
        return {"Scope": "local", "ConnectivityScope": "global", "GwAllocChecker": True}

    def gw_alloc_check(self, options: dict) -> dict:
        """Docker 28+, before RequestPool: refuse what create_network would, while no block is claimed
        yet; vpcnet always wants its gateway address."""
        generic = self._check_network_options(options or {})
        mode = self._network_mode(generic.get(MODE_OPTION))
        if _ipv4_off(options or {}):
            _ipv6_only_mode(mode)
        if _ipv4_off(options or {}) or _truthy((options or {}).get(IPV6_OPTION)):
            _ipv6_served()
        return {"SkipIPv4": False, "SkipIPv6": False}

    def default_mode(self) -> DefaultMode:
        """The mode a network created without `-o vpcnet.mode` gets on this host, and why."""
        return default_mode(self.config.default_mode, self.dataplane.features())

    def _network_mode(self, raw) -> str:
        """The mode asked for with -o vpcnet.mode, else the host's default; a mode the host cannot do is
        refused, naming why (before a pool is claimed, through gw_alloc_check, on Docker 28+); so is bridge
        mode in eni-prefix addressing (a bridge needs an on-link block of its own, the range is every host's)."""
        mode = self._host_mode(raw)
        if mode == "bridge" and self.config.addressing == "eni-prefix":
            asked = f"-o {MODE_OPTION}=bridge" if _mode(raw) else f"VPCNET_DEFAULT_MODE={self.config.default_mode}"
            raise InvalidRequest(f"{asked}: bridge mode is refused in eni-prefix addressing (VPCNET_ADDRESSING="
                                 "eni-prefix): a bridge needs an on-link block of this host's own, and the range "
                                 f"is shared by every host; use -o {MODE_OPTION}=routed or ebpf")
        return mode

    def _host_mode(self, raw) -> str:
        mode = _mode(raw)
        if mode is not None:
            features = self.dataplane.features()
            if not features.supports(mode):
                raise InvalidRequest(f"-o {MODE_OPTION}={mode}: this host cannot do {mode} mode "
                                     f"({features.why_not(mode)}); use -o {MODE_OPTION}={features.best}")
            return mode
        default = self.default_mode()
        if default.unsupported:
            best = self.dataplane.features().best
            raise InvalidRequest(f"VPCNET_DEFAULT_MODE={default.setting}: this host cannot do {default.mode} mode "
                                 f"({default.unsupported}), or create the network with -o {MODE_OPTION}={best}")
        return default.mode

    @staticmethod
    def _check_network_options(options: dict) -> dict:
        """The `-o` options (generic) of a network, once every option vpcnet cannot honour is refused."""
        generic = options.get(GENERIC) or {}
        if not isinstance(generic, dict):
            raise InvalidRequest(f"{GENERIC} must be an object")
        unknown = sorted(set(generic) - KNOWN_GENERIC_OPTIONS)
        if unknown:
            raise InvalidRequest(f"unknown option -o {', '.join(shown(k) for k in unknown[:5])} (vpcnet knows: "
                                 f"{', '.join(sorted(KNOWN_GENERIC_OPTIONS))})")
        if _ipv4_off(options) and not _truthy(options.get(IPV6_OPTION)):
            raise InvalidRequest("IPv4 is disabled for this network (--ipv4=false) and IPv6 is not enabled: a "
                                 "network needs one family; add --ipv6, or create it without --ipv4=false")
        _mode(generic.get(MODE_OPTION))
        return generic

    # -- networks ---------------------------------------------------------------------------------
    def create_network(self, network_id: str, options: dict, ipv4_data: list, ipv6_data: list) -> dict:
        _require_id("NetworkID", network_id)
        options = options or {}
        generic = self._check_network_options(options)
        ipv4_off = _ipv4_off(options)
        if ipv4_off:
            _ipv6_only_mode(self._network_mode(generic.get(MODE_OPTION)))
        pools = {r["pool_id"]: r for r in self.store.pools()}
        if ipv4_off:                 # IPv6-only (Docker 28+): no IPv4 pool asked, none given
            if ipv4_data:
                raise InvalidRequest(f"--ipv4=false, yet Docker sent {len(ipv4_data)} IPv4 pool(s) (IPv4Data): "
                                     "an IPv6-only network has none")
            if not ipv6_data:
                raise InvalidRequest("an IPv6-only network (--ipv4=false) needs an IPv6 pool: add --ipv6")
            pool, v4 = "", {"host_cidr": "", "cluster_cidr": "", "gateway": ""}
        else:
            if not ipv4_data or len(ipv4_data) != 1:
                raise InvalidRequest(f"a vpcnet network needs exactly one IPv4 pool, got {len(ipv4_data or [])} "
                                     "(an IPv6-only one: --ipv6 --ipv4=false, Docker 28+)")
            entry = ipv4_data[0] or {}
            if not isinstance(entry, dict) or not isinstance(entry.get("Pool", ""), str):
                raise InvalidRequest("IPv4Data[0] must be an object with a string Pool")
            pool = entry.get("Pool", "")
            if pool not in pools or ":" in pool:
                raise InvalidRequest(f"pool {shown(pool) or '(none)'} is not a vpcnet pool (IPv4): create the network "
                                     "with vpcnet as its IPAM driver too (--ipam-driver, the same name as -d). "
                                     f"{SWARM_HINT}")
            v4 = {"host_cidr": pool, "cluster_cidr": pools[pool]["cluster_cidr"], "gateway": pools[pool]["gateway"]}
        mode = self._network_mode(generic.get(MODE_OPTION))
        v6 = _ipv6_pool(ipv6_data, pools)
        mtu = self._mtu(generic.get(MTU_OPTION))
        if v6.get("host_cidr_v6") and mtu < IPV6_MIN_MTU:
            raise InvalidRequest(f"an IPv6 network needs an MTU of at least {IPV6_MIN_MTU} (IPv6's minimum), got "
                                 f"{mtu}{'' if generic.get(MTU_OPTION) else ' (the uplink MTU)'}: set -o "
                                 f"{MTU_OPTION}=1280 or more, or leave out --ipv6")
        net = Network(network_id=network_id, **v4, bridge=bridge_name(network_id), mtu=mtu,
                      internal=_truthy(options.get(INTERNAL_OPTION)),
                      no_nat=tuple(self.config.no_nat_cidrs), created=time.time(), mode=mode, state=PENDING,
                      addressing=self.config.addressing, **v6)
        with self._locked(network_id):
            existing = self.store.network(network_id)      # under the lock: a racing identical call won
            if existing is not None:
                if (existing.host_cidr, existing.host_cidr_v6) == (net.host_cidr, net.host_cidr_v6):
                    self.dataplane.ensure_network(self._spec(existing))
                    if existing.state == PENDING:          # its first call died before the kernel work
                        self.store.set_ready("networks", network_id)
                    return {}
                raise Conflict(f"network {network_id[:12]} already exists with pool "
                               f"{existing.host_cidr or existing.host_cidr_v6}")
            holder = self.store.network_by_host_cidr(pool) or self.store.network_by_host_cidr(net.host_cidr_v6)
            if holder is not None:
                block, cluster = (pool, net.cluster_cidr) if pool and holder.host_cidr == pool else \
                    (net.host_cidr_v6, net.cluster_cidr_v6)
                raise Conflict(f"host CIDR {block} (cluster CIDR {cluster}) is already used by network "
                               f"{holder.network_id[:12]} on this host: one vpcnet network per cluster CIDR per "
                               "host; create this one with --subnet <another cluster CIDR> (if `docker network ls "
                               f"--no-trunc` has no {holder.network_id[:12]}: vpcnet network forget "
                               f"{holder.network_id[:12]})")
            namesake = next((n for n in self.store.networks() if n.bridge == net.bridge), None)
            if namesake is not None:     # ids sharing the prefix the bridge name is made of: never touch theirs
                raise Conflict(f"network {network_id[:12]} would reuse bridge {net.bridge} of network "
                               f"{namesake.network_id[:12]}")
            # The store first (the desired state), the kernel after: a full state disk or a lost race
            # fails here, before anything is in the kernel.
            try:
                with self.store.tx() as db:
                    # A ReleasePool may have removed the pool since it was read above: checked in the
                    # transaction that adds the network, as ReleasePool checks for a network in its own.
                    for wanted in (pool, net.host_cidr_v6):
                        if wanted and not self.store.has_pool(db, wanted):
                            raise Conflict(f"pool {wanted} was released meanwhile (ReleasePool): request a pool "
                                           "again, then create the network")
                    self.store.add_network(db, net)
            except sqlite3.IntegrityError:
                raise Conflict(f"host CIDR {pool or net.host_cidr_v6} or bridge {net.bridge} was taken by another "
                               "network meanwhile") from None
            _crash_point("network")
            spec = spec_of(net)
            try:
                self.dataplane.ensure_network(spec)
                self.store.set_ready("networks", network_id)
            except Exception:
                self._undo(lambda: self.store.delete_network(network_id))
                self._undo(lambda: self.dataplane.delete_network(spec))
                raise
        log.info("network %s: %s mode, %s %s, %s, mtu %d%s", network_id[:12], mode,
                 "anchor" if spec.routed else "bridge", net.bridge,
                 ", ".join(f"{block} via {gateway}" for block, gateway in ((net.host_cidr, net.gateway),
                                                                           (net.host_cidr_v6, "link-local")) if block),
                 net.mtu, ", internal" if net.internal else "")
        self._record_default_mode()      # the probe may have answered otherwise since start
        return {}

    def _mtu(self, raw) -> int:
        if raw in (None, ""):
            return self.config.mtu or self.dataplane.uplink_mtu()
        try:
            mtu = int(str(raw).strip())
        except ValueError:
            raise InvalidRequest(f"-o {MTU_OPTION}={shown(raw)}: not a number") from None
        if not 576 <= mtu <= 65535:
            raise InvalidRequest(f"-o {MTU_OPTION}={mtu}: out of range (576..65535)")
        return mtu

    def delete_network(self, network_id: str) -> dict:
        """The row first (with its kernel state recorded as a leftover), then the kernel. Docker ignores
        an error here, so a kernel failure must not keep the network: it would be rebuilt at every start
        and its host CIDR would block the next network. Whatever the kernel kept is removed later, by the
        next start or datapath pass (`remove_leftovers`)."""
        _require_id("NetworkID", network_id)
        with self._locked(network_id):
            net = self.store.network(network_id)
            if net is None:
                log.info("DeleteNetwork %s: not known (already gone)", network_id[:12])
                return {}
            self.store.delete_network(network_id, leftover=True)
            self.remove_leftovers(f"network:{network_id}")
        log.info("network %s deleted", network_id[:12])
        return {}

    def remove_leftovers(self, only: str | None = None) -> int:
        return self.reconciler.remove_leftovers(only)

    # -- endpoints --------------------------------------------------------------------------------
    def create_endpoint(self, network_id: str, endpoint_id: str, interface: dict | None,
                        options: dict | None) -> dict:
        _require_id("NetworkID", network_id)
        _require_id("EndpointID", endpoint_id)
        net = self._network(network_id)
        interface = interface or {}
        ifname = (options or {}).get(IFNAME_OPTION)
        if ifname:
            raise InvalidRequest(f"{IFNAME_OPTION}={shown(ifname)}: Docker does not let a network plugin name the "
                                 "container's interface (it is eth<N>); remove the option (Compose: "
                                 "interface_name)")
        address_v6 = _address_v6(net, interface.get("AddressIPv6") or "")
        ip = _address_v4(net, interface.get("Address") or "")
        if not ip and (net.host_cidr or not address_v6):
            raise InvalidRequest(f"CreateEndpoint without an {'IPv4' if net.host_cidr else 'IPv6'} address: create "
                                 "the network with vpcnet as its IPAM driver too (--ipam-driver, the same name as -d)")
        given_mac = interface.get("MacAddress") or ""
        if given_mac and (not isinstance(given_mac, str) or not _MAC.fullmatch(given_mac)):
            raise InvalidRequest(f"Interface.MacAddress {shown(given_mac)} is not a MAC address")
        mac = given_mac or mac_for(ip or address_v6)
        host_veth, peer_veth = veth_names(endpoint_id)
        existing = self.store.endpoint(endpoint_id)
        if existing is not None:
            if (existing.address, existing.address_v6) != (ip, address_v6) or existing.network_id != network_id:
                raise Conflict(f"endpoint {endpoint_id[:12]} already exists with address "
                               f"{' and '.join(a for a in (existing.address, existing.address_v6) if a)}")
            with self._locked(network_id):
                self._ensure_endpoint(net, existing)
                self._ready(existing)
            return {"Interface": {} if given_mac else {"MacAddress": existing.mac}}
        for column, value in (("address", ip), ("address_v6", address_v6)):
            clash = self.store.endpoint_where(network_id=network_id, **{column: value}) if value else None
            if clash:
                raise Conflict(f"{'IPv6 address' if column == 'address_v6' else 'address'} {value} is already used "
                               f"by endpoint {clash.endpoint_id[:12]}")
        namesake = self.store.endpoint_where(host_veth=host_veth)
        if namesake:                 # ids sharing the prefix veth names are made of: never touch theirs
            raise Conflict(f"endpoint {endpoint_id[:12]} would reuse veth {host_veth} of endpoint "
                           f"{namesake.endpoint_id[:12]}")
        ep = Endpoint(endpoint_id=endpoint_id, network_id=network_id, address=ip, mac=mac,
                      host_veth=host_veth, peer_veth=peer_veth, created=time.time(), state=PENDING,
                      address_v6=address_v6)
        with self._locked(network_id):
            again = self.store.endpoint(endpoint_id)       # a racing identical call won: its answer
            if again is not None:
                if (again.address, again.address_v6) != (ip, address_v6) or again.network_id != network_id:
                    raise Conflict(f"endpoint {endpoint_id[:12]} already exists with address "
                                   f"{' and '.join(a for a in (again.address, again.address_v6) if a)}")
                self._ensure_endpoint(net, again)
                self._ready(again)
                return {"Interface": {} if given_mac else {"MacAddress": again.mac}}
            # The row first: it reserves the address and the veth names, so the undo below can only ever
            # remove this endpoint's veth and /32 route, never a racing winner's.
            try:
                with self.store.tx() as db:
                    self.store.add_endpoint(db, ep)
            except sqlite3.IntegrityError:
                raise Conflict(f"address {' or '.join(a for a in (ip, address_v6) if a)} or veth {host_veth} was "
                               "taken by another endpoint meanwhile") from None
            _crash_point("endpoint")
            try:
                self._ensure_endpoint(net, ep)
                self.store.set_ready("endpoints", endpoint_id)
                _crash_point("endpoint-ready")
            except Exception:
                self._undo(lambda: self.store.delete_endpoint(endpoint_id))
                self._undo(lambda: self.dataplane.delete_endpoint(host_veth))
                raise
        return {"Interface": {} if given_mac else {"MacAddress": mac}}

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> dict:
        _optional_id("NetworkID", network_id)
        _require_id("EndpointID", endpoint_id)
        ep = self.store.endpoint(endpoint_id)
        if ep is None:
            return {}
        with self._locked(ep.network_id):
            if self.store.endpoint(endpoint_id) is None:
                return {}
            published = self.store.ports(endpoint_id=endpoint_id)
            self.store.delete_endpoint(endpoint_id, leftover=True)      # its ports with it
            self.remove_leftovers(f"endpoint:{ep.host_veth}")
            net = self.store.network(ep.network_id)
            if published and net is not None:     # normally gone already (RevokeExternalConnectivity)
                try:
                    self.dataplane.ensure_ports(self._spec(net), [], adding=False)
                except Exception as exc:
                    log.warning("endpoint %s: the rules of its published ports stay until the datapath pass: %s",
                                endpoint_id[:12], exc)
        return {}

    def endpoint_info(self, network_id: str, endpoint_id: str) -> dict:
        _require_id("NetworkID", network_id)
        ep = self._endpoint(network_id, endpoint_id)
        return {"Value": {"address": ep.address, "mac": ep.mac, "host_veth": ep.host_veth}}

    def join(self, network_id: str, endpoint_id: str, sandbox_key: str, options: dict | None) -> dict:
        _require_id("NetworkID", network_id)
        _require_id("EndpointID", endpoint_id)
        _require_sandbox_key(sandbox_key)
        net = self._network(network_id)
        ep = self._endpoint(network_id, endpoint_id)
        if not self.dataplane.link_exists(ep.peer_veth):
            # After a host reboot, or a Leave that let the sandbox delete it: make a fresh pair, under the
            # network's lock and from rows read again under it. A DeleteNetwork or DeleteEndpoint that won
            # meanwhile would otherwise get its veth back, and a racing Join would delete this one's pair.
            with self._locked(network_id):
                net = self._network(network_id)
                ep = self._endpoint(network_id, endpoint_id)
                if not self.dataplane.link_exists(ep.peer_veth):
                    self.dataplane.delete_endpoint(ep.host_veth)
                    self._ensure_endpoint(net, ep)
        # The cluster CIDR through the gateway: other hosts' containers stay on this interface even when
        # another network of the container gives the default route (gw-priority, Docker 28+). In eni-prefix
        # addressing the cluster CIDR is the range, the container's on-link prefix already (proxy ARP answers).
        routes = [{"Destination": net.cluster_cidr, "RouteType": ROUTE_NEXTHOP, "NextHop": net.gateway}] \
            if ep.address and net.addressing != "eni-prefix" else []
        answer = {"InterfaceName": {"SrcName": ep.peer_veth, "DstPrefix": "eth"}, "StaticRoutes": routes,
                  "DisableGatewayService": True}
        if ep.address:              # an IPv6-only network's endpoint has no IPv4 and no IPv4 gateway
            answer["Gateway"] = net.gateway
        if ep.address_v6:           # IPv6: the gateway on the host veth or bridge, link-local (vpcnet.datapath.ipv6)
            gateway6 = link_gateway(net.bridge if net.mode == "bridge" else ep.host_veth)
            answer["GatewayIPv6"] = gateway6
            # the gateway on this interface first: Docker asks the kernel which link reaches a next hop
            routes.append({"Destination": f"{gateway6}/128", "RouteType": ROUTE_CONNECTED})
            routes.append({"Destination": net.cluster_cidr_v6, "RouteType": ROUTE_NEXTHOP, "NextHop": gateway6})
            if net.mode == "bridge":    # the block on the bridge's link: the network's containers resolve each other
                routes.append({"Destination": net.host_cidr_v6, "RouteType": ROUTE_CONNECTED})
        return answer

    def leave(self, network_id: str, endpoint_id: str) -> dict:
        _optional_id("NetworkID", network_id)
        _require_id("EndpointID", endpoint_id)
        return {}      # Docker moves the interface back out of the sandbox; DeleteEndpoint removes it

    def program_external_connectivity(self, network_id: str, endpoint_id: str, options: dict | None) -> dict:
        """Publish the endpoint's ports (vpcnet.docker.ports): the rows (the desired state) replace the
        endpoint's, then the network's rules follow (and, in ebpf mode, the endpoint's program). A repeated
        call (Docker 29) finds the same rows and only makes sure of the kernel. A port no one can have is
        refused with nothing changed; a kernel failure puts the rows back as they were."""
        _require_id("NetworkID", network_id)
        _require_id("EndpointID", endpoint_id)
        net = self._network(network_id)
        asked = ports.parse(options, ipv6=bool(self._endpoint(network_id, endpoint_id).address_v6))
        if asked and not net.host_cidr:
            raise InvalidRequest(f"network {network_id[:12]} is IPv6-only (--ipv4=false): vpcnet publishes ports (-p) "
                                 "on networks with IPv4 (and on their IPv6) so far; publish on a dual-stack network")
        if asked and net.internal:
            raise InvalidRequest(f"network {network_id[:12]} is --internal: it has no way out, so nothing on it can "
                                 "publish a port (-p); publish on a network that is not internal")
        with self._locked(network_id), self._ports_lock():
            ep = self._endpoint(network_id, endpoint_id)
            if any(a.family == "ipv6" for a in asked) and not ep.address_v6:    # released meanwhile
                asked = [a for a in asked if a.family != "ipv6"]
            everyone = self.store.ports()
            before = [p for p in everyone if p.endpoint_id == endpoint_id]
            others = [p for p in everyone if p.endpoint_id != endpoint_id]

            def taken(port: Port) -> str:
                holder = next((o for o in others if o.clashes(port)), None)
                if holder is not None:
                    return (f"vpcnet publishes it for endpoint {holder.endpoint_id[:12]} ({holder.address}:"
                            f"{holder.container_port}/{holder.proto})")
                if any(b.clashes(port) for b in before):
                    return ""             # this endpoint's own, asked otherwise now
                return self.dataplane.port_taken(port.proto, port.host_ip, port.host_port, port.family)

            chosen = ports.choose(endpoint_id, asked, before, taken, ports.ephemeral_range())
            if not chosen and not before:
                return {}                 # nothing published, before or now: nothing to do
            if _rows(chosen) != _rows(before):
                self.store.set_ports(endpoint_id, chosen)
            try:
                self._apply_ports(net, ep, adding=True)
            except Exception:
                if _rows(chosen) != _rows(before):
                    self._undo(lambda: self.store.set_ports(endpoint_id, before))
                    self._undo(lambda: self._apply_ports(net, ep, adding=False))
                raise
        if _rows(chosen) != _rows(before):
            log.info("endpoint %s (%s): published ports %s", endpoint_id[:12], ep.address,
                     ", ".join(f"{p.host}->{p.container_port}/{p.proto}"
                               for p in chosen) or "none")
        return {}

    def revoke_external_connectivity(self, network_id: str, endpoint_id: str) -> dict:
        """Unpublish the endpoint's ports: the rows go, then the rules. Docker ignores a failure here, so a
        kernel failure is logged and left to the datapath pass (the rules follow the rows). Repeats and
        unknown endpoints are fine."""
        _optional_id("NetworkID", network_id)
        _require_id("EndpointID", endpoint_id)
        ep = self.store.endpoint(endpoint_id)
        if ep is None:
            return {}
        with self._locked(ep.network_id), self._ports_lock():
            if not self.store.ports(endpoint_id=endpoint_id):
                return {}
            self.store.set_ports(endpoint_id, [])
            net = self.store.network(ep.network_id)
            if net is not None:
                try:
                    self._apply_ports(net, ep, adding=False)
                except Exception as exc:
                    log.warning("endpoint %s: its published ports are forgotten, but the kernel kept their rules "
                                "(the datapath pass removes them): %s", endpoint_id[:12], exc)
        log.info("endpoint %s (%s): published ports removed", endpoint_id[:12], ep.address)
        return {}

    def drop_ipv6(self, host_veth: str, address: str) -> None:
        """ReleaseAddress of a running container's IPv6 address (it turned IPv6 off; the store has already
        cleared the endpoint's address_v6 and its IPv6 ports' rows, vpcnet.state.store.release_address): its
        /128 route goes, and with its ports the network's IPv6 rules are written again at once, so no DNAT
        outlives the address (IPAM may hand it to another container)."""
        ep = self.store.endpoint_where(host_veth=host_veth)
        self.dataplane.drop_endpoint_ipv6(host_veth, address)
        if ep is None:
            return
        with self._locked(ep.network_id), self._ports_lock():
            net = self.store.network(ep.network_id)
            if net is not None:
                self._apply_ports(net, ep, adding=False)

    def _apply_ports(self, net: Network, ep: Endpoint, adding: bool) -> None:
        self.dataplane.ensure_ports(self._spec(net), [EndpointSpec(ep.host_veth, ep.peer_veth, ep.mac, ep.address)],
                                    adding)

    def _spec(self, net: Network):
        """The network's spec with its published ports (the store's rows)."""
        return spec_of(net, self.store.ports(network_id=net.network_id))

    @contextmanager
    def _ports_lock(self) -> Iterator[None]:
        """Host ports are host-wide: one Program/Revoke at a time chooses them (a file of its own, never a
        stripe of the per-network locks, which are held around it)."""
        with open(os.path.join(self.config.state_dir, "ports.lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- restart ----------------------------------------------------------------------------------
    def restore(self) -> None:
        """At start: one datapath pass (vpcnet.datapath.reconciler) rebuilds what each known network and
        endpoint lacks (after a reboot, or rules flushed by someone), removes deleted objects' leftovers,
        then per-network chains and uplink programs of networks vpcnet no longer knows are dropped."""
        nets = self.store.networks()
        self._record_default_mode()
        self.dataplane.ensure_host()
        self.reconciler.reconcile()
        known = {spec_of(n).tag for n in nets}
        for table, chain in self.dataplane.stale_chains(known):
            log.info("removing stale chain %s/%s", table, chain)
            self.dataplane.drop_stale_chain(table, chain)
        for name in self.dataplane.drop_stale_uplink_programs(known):
            log.info("removed stale uplink program %s", name)

    def _record_default_mode(self, default: DefaultMode | None = None) -> None:
        """Log the default and keep it in the store for `vpcnet status`/`doctor` (which may run with other
        capabilities than the plugin's): at start, and again whenever a later probe answers otherwise (a
        transient failure at start is probed again after a while, vpcnet.datapath.features)."""
        default = default or self.default_mode()
        if default.to_dict() == self._recorded_default:
            return
        if default.unsupported:
            log.error("VPCNET_DEFAULT_MODE=%s: this host cannot do it (%s); networks created without -o %s "
                      "are refused", default.setting, default.unsupported, MODE_OPTION)
        elif default.fallback:
            log.warning("networks created without -o %s get %s mode: %s", MODE_OPTION, default.mode,
                        default.fallback)
        else:
            log.info("networks created without -o %s get %s mode (VPCNET_DEFAULT_MODE=%s)", MODE_OPTION,
                     default.mode, default.setting)
        try:
            with self.store.tx() as db:
                self.store.set_meta(db, DEFAULT_MODE_KEY, json.dumps(default.to_dict(), sort_keys=True))
            self._recorded_default = default.to_dict()
        except Exception as exc:        # a full disk must not stop the start: the log has it
            log.warning("cannot record the default mode: %s", exc)

    # -- helpers ----------------------------------------------------------------------------------
    def _ensure_endpoint(self, net: Network, ep: Endpoint) -> None:
        self.dataplane.ensure_endpoint(self._spec(net), ep.host_veth, ep.peer_veth, ep.mac, ep.address,
                                       ipv6=bool(ep.address_v6))
        if ep.address_v6:
            self.dataplane.ensure_endpoint_ipv6(self._spec(net), ep.host_veth, ep.address_v6)

    def _ready(self, ep: Endpoint) -> None:
        if ep.state != READY:                # a replayed call finishing what a dead one began
            self.store.set_ready("endpoints", ep.endpoint_id)

    def _network(self, network_id: str) -> Network:
        _require_id("NetworkID", network_id)
        net = self.store.network(network_id)
        if net is None:
            raise NotFound(f"unknown network {network_id[:12]}: vpcnet has no such network")
        return net

    def _endpoint(self, network_id: str, endpoint_id: str) -> Endpoint:
        _require_id("EndpointID", endpoint_id)
        ep = self.store.endpoint(endpoint_id)
        if ep is None:
            raise NotFound(f"unknown endpoint {endpoint_id[:12]} in network {network_id[:12]}")
        return ep

    def _locked(self, network_id: str):
        """Calls about one network, and the datapath pass over it, one at a time (threads and workers)."""
        return object_lock(self.config.state_dir, network_id)

    @staticmethod
    def _undo(action) -> None:
        try:
            action()
        except Exception:
            log.exception("undo failed")


def _rows(chosen: list[Port]) -> list[tuple]:
    """Rows as stored (the address is read with them, not stored)."""
    return sorted((p.family, p.proto, p.host_ip, p.host_port, p.container_port, p.asked) for p in chosen)


def _crash_point(call: str) -> None:
    """TEST ONLY (tests/test_crash.py): with VPCNET_TEST_CRASH_AFTER_COMMIT=<file> set and the file holding
    `call` ("network", "endpoint", "endpoint-ready"), delete the file (one crash per arming) and SIGKILL the plugin's
    process group, master and workers, as kill -9 of the plugin would. Inert otherwise."""
    path = os.environ.get(CRASH_ENV)
    if not path:
        return
    try:
        with open(path) as fh:
            if fh.read().strip() != call:
                return
        os.unlink(path)
    except OSError:
        return
    log.warning("%s: test crash point %s: killing the plugin", CRASH_ENV, call)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _require_id(field: str, value) -> None:
    """`value` is an id of the form Docker makes for `field` (NetworkID, EndpointID); anything else is
    refused before it reaches a row, a link name or a log line."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"missing field {field}")
    form, described = _IDS[field]
    if not form.fullmatch(value):
        raise InvalidRequest(f"{field} {shown(value)} is not an id Docker makes ({described})")


def _optional_id(field: str, value) -> None:
    """Leave, DeleteEndpoint and RevokeExternalConnectivity may come without a NetworkID; one given is checked."""
    if value:
        _require_id(field, value)


def _require_sandbox_key(value) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRequest("Join without a SandboxKey")
    name = value.rpartition("/")[2]
    if not (value.startswith("/") and len(value) <= 4096 and value.isprintable() and _SANDBOX_NAME.fullmatch(name)):
        raise InvalidRequest(f"SandboxKey {shown(value)} is not a sandbox path Docker makes "
                             "(<exec root>/netns/<id>, e.g. /var/run/docker/netns/0123456789ab)")


def _mode(raw) -> str | None:
    if raw in (None, ""):
        return None
    mode = str(raw).strip().lower()
    if mode not in MODES:
        raise InvalidRequest(f"-o {MODE_OPTION}={shown(raw)}: unknown mode (vpcnet knows: {', '.join(MODES)})")
    return mode


def _ipv6_only_mode(mode: str) -> None:
    """An IPv6-only network needs routed mode's path (a bridge carries IPv6 beside IPv4 only, so far)."""
    if mode == "bridge":
        raise InvalidRequest(f"an IPv6-only network (--ipv6 --ipv4=false) needs -o {MODE_OPTION}=routed or ebpf: "
                             "bridge mode carries IPv6 only beside IPv4 so far")


def _ipv6_served() -> None:
    """IPv6 needs a writable /proc/sys (vpcnet.datapath.ipv6.unavailable): refused before a block is claimed."""
    why = ipv6_unavailable()
    if why:
        raise InvalidRequest(f"IPv6 (--ipv6) cannot be served by this vpcnet: {why}")


def _ipv6_pool(ipv6_data, pools: dict) -> dict:
    """The IPv6 half of a network (Network's host_cidr_v6, cluster_cidr_v6, gateway_v6) from CreateNetwork's
    IPv6Data: none, or one vpcnet IPv6 pool."""
    if not ipv6_data:
        return {}
    _ipv6_served()
    entry = ipv6_data[0] if len(ipv6_data) == 1 else None
    if not isinstance(entry, dict) or not isinstance(entry.get("Pool", ""), str):
        raise InvalidRequest(f"a vpcnet network takes one IPv6 pool (an object with a string Pool), got "
                             f"{len(ipv6_data)}")
    pool = entry.get("Pool", "")
    if pool not in pools or ":" not in pool:
        raise InvalidRequest(f"IPv6 pool {shown(pool) or '(none)'} is not a vpcnet IPv6 pool: create the network "
                             "with vpcnet as its IPAM driver too (--ipam-driver, the same name as -d)")
    return {"host_cidr_v6": pool, "cluster_cidr_v6": pools[pool]["cluster_cidr"], "gateway_v6": pools[pool]["gateway"]}


def _ipv4_off(options: dict) -> bool:
    """--ipv4=false (Docker 28+): an IPv6-only network."""
    value = options.get(IPV4_OPTION)
    return value is False or str(value).lower() == "false"


def _address_v4(net: Network, address: str) -> str:
    """CreateEndpoint's Interface.Address (CIDR form) as a bare address inside the network's IPv4 block, or ""
    when none was given."""
    if not address:
        return ""
    if not net.host_cidr:
        raise InvalidRequest(f"Interface.Address {shown(address)}: network {net.network_id[:12]} is IPv6-only "
                             "(--ipv4=false): it has no IPv4 addresses")
    try:
        ip = ipaddress.IPv4Interface(address).ip
    except ValueError:
        raise InvalidRequest(f"Interface.Address {shown(address)} is not an IPv4 CIDR address") from None
    if ip not in ipaddress.IPv4Network(net.host_cidr):
        raise InvalidRequest(f"address {ip} is outside the network's host CIDR {net.host_cidr}")
    return str(ip)


def _address_v6(net: Network, address: str) -> str:
    """CreateEndpoint's Interface.AddressIPv6 (CIDR form) as a bare address inside the network's IPv6 block,
    or "" when none was given."""
    if not address:
        return ""
    if not net.host_cidr_v6:
        raise InvalidRequest(f"Interface.AddressIPv6 {shown(address)}: network {net.network_id[:12]} has no IPv6 "
                             "(create it with --ipv6)")
    try:
        ip = ipaddress.IPv6Interface(address).ip
    except ValueError:
        raise InvalidRequest(f"Interface.AddressIPv6 {shown(address)} is not an IPv6 CIDR address") from None
    if ip not in ipaddress.IPv6Network(net.host_cidr_v6):
        raise InvalidRequest(f"address {ip} is outside the network's IPv6 block {net.host_cidr_v6}")
    return str(ip)


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")
