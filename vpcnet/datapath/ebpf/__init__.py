"""The eBPF fast path of ebpf-mode networks (the default where vpcnet.datapath.features finds the kernel and
capabilities for it, else `-o vpcnet.mode=ebpf`): two small tc programs, assembled here.

Why: on the lab, the cost of a vpcnet packet over the underlay's is the host namespace's own IP stack on
both hosts — the forward (fib lookups, ip_forward) and netfilter (Docker's and vpcnet's iptables-nft
chains). The traffic that pays it is exactly the traffic vpcnet already accepts statelessly and never
NATs: host CIDR <-> cluster CIDR (the conntrack bypass in vpcnet.datapath). These programs hand that
traffic straight between the container's veth and the uplink, as Cilium's "BPF host routing" does:

- `container_program` (tc ingress of each endpoint's host veth, i.e. packets leaving the container; one
  program per network, its endpoints' facts in a map, below):
  source the endpoint's own address (what the routed path's anti-spoofing rule lets through),
  destination in the cluster CIDR, TTL > 1 -> `bpf_fib_lookup` in the host namespace (its routing table
  decides the egress and next hop), TTL decremented, then
  - outside the host CIDR (another host): `bpf_redirect_neigh` out of that device (the neighbour
    subsystem fills L2 and keeps the entry confirmed), only when that device is an uplink (their indexes
    are built into the program; a cluster address routed over a Docker bridge or a second NIC takes the
    normal path and meets the isolation rules, vpcnet.datapath.firewall);
  - inside it (another container of this network on this host): found in the map of this host's
    endpoints by address (endpoints.py: the host veth's index and MAC, the container's MAC), without
    `bpf_fib_lookup`; not found there, by the lookup (the /32 route, the neighbour's MAC), as before. TTL
    decremented, MACs rewritten, and `bpf_redirect` out of the other container's host veth, so same-host
    traffic skips the host's forwarding and netfilter too. Not `bpf_redirect_peer` (tc ingress may use it into
    any veth's peer since 5.10, and it would save the veth's queueing): it bypasses the host veth's
    transmit counters, which vpcnet's per-container receive metrics read.
  An endpoint that publishes ports (`-p`) has them in its entry of the endpoint map: a packet whose source
  port is one of them (the reply to a client that reached the host's port, DNATed) takes the normal path, so the
  host's conntrack un-DNATs it; so do fragments and packets with IP options (their ports are not read),
  and, past 64 published ports, all its TCP, UDP and SCTP cluster traffic (vpcnet.datapath.modes).
- `uplink_program` (tc ingress of the uplink, one filter per network): source in the cluster CIDR,
  destination in the host CIDR, TTL > 1 -> the destination's entry in the map of this host's endpoints
  (or, without one, `bpf_fib_lookup`: the endpoint's /32 route gives its host veth), MACs rewritten from
  it, TTL decremented, `bpf_redirect_peer` straight into the container's namespace (no second queueing on
  the veth).

eni-prefix addressing (docs/eni-prefix.md): the network's block is the range every host shares (the spec's
`shared_range`), so an address in it says nothing of where its container is. Both programs then tell this
host's containers by the maps: the container program delivers a destination found in the map of this
host's endpoints; any other goes to `bpf_fib_lookup`, whose answer is taken when it is an uplink (another
host's container: `bpf_redirect_neigh`) or an endpoint's host veth (an entry in the endpoint map: a GSO
frame the local map did not take); the uplink program delivers the local map's destinations, or what the
lookup routes to an endpoint's host veth, and leaves the rest of the range to the normal path. The IPv6
programs do the same with the IPv6 maps (programs6.py: the IPv6 range, this host's part of it a /80 prefix).

Only a lookup that succeeds is taken: the helper then has also checked the packet (GSO included) against
the egress MTU. The map of this host's endpoints is taken only for a frame no longer than its host veth's
MTU allows (the entry holds it); a longer one (GSO, or one needing fragmentation) goes to the fib lookup,
which checks it as before. The map mirrors the /32 (/128) routes vpcnet writes for its endpoints (an entry
is written after the route, removed before it and before the veth: endpoints.py), so it delivers where
the endpoint's route leads, without the lookup (half to two thirds of those programs' own time:
bench/fastpath_cost.py). Traffic to other hosts still needs `bpf_fib_lookup`: the egress device and the
next hop are the routing table's and the neighbour table's, which change without vpcnet (a route moved, a
next hop's MAC), and `bpf_redirect_neigh` without them would look the route up itself. Everything else —
ARP, the gateway, the host itself, traffic leaving the VPC (masqueraded), a spoofed source, a TTL about to
expire, a packet needing fragmentation, a next hop whose neighbour is not resolved yet (the stack resolves
it; the following packets go the short way) — returns TC_ACT_UNSPEC and takes the normal path, with
vpcnet's firewall rules. So the fast path only ever shortens what the slow path would have done (vpcnet's
own rules accept that traffic statelessly), never decides anything the routing table and vpcnet's own
routes did not; what it bypasses is the host's other rules, DOCKER-USER included (README, Firewall).

Who talks to whom (VPCNET_PEER_METRICS): with the host's peer map (maps.py), the container program first
counts what the container sends, the uplink program what it hands into a container, and `count_program`
(tc egress of every endpoint's host veth, and tc ingress too in routed and bridge modes) the rest, per
(endpoint address, direction, peer address or outside): a map lookup and two adds per packet, measured
by bench/peers_bench.py. The container and counting programs read the endpoint's address from its entry:
only packets from (sent) or to (received) that address are counted, never a forged source or a frame a
bridge flooded to the veth.

One program per network (endpoints.py): the container and counting programs are loaded and verified once
per network, family and process (vpcnet.datapath.tc caches them, and loads again only when what is built in
changes: the uplinks, the anchor, the CIDRs), and attached to every endpoint's host veth. What differs per
endpoint — its own address and its published ports — is its entry in a hash map per family, keyed by the
host veth's interface index (`skb->ifindex` on both of the veth's tc hooks); a veth without an entry takes
the normal path. The entry is looked up once per packet (r9 keeps it across helper calls). Creating an
endpoint is writing its entries (this one, and its entry by address in the map of this host's endpoints)
and attaching a filter: no verifier pass per endpoint.

IPv6 (programs6.py): the same two programs and the counting one for IPv6, separate tc filters of protocol
ETH_P_IPV6 (vpcnet.datapath.tc) for an endpoint with an IPv6 address and a network with an IPv6 block:
`bpf_fib_lookup` with AF_INET6, `bpf_redirect_neigh` to other hosts, `bpf_redirect` to this host's
containers, `bpf_redirect_peer` from the uplink (this host's containers found in the IPv6 map of this
host's endpoints first), the endpoint's own IPv6 address as the only source. The
same rule, only plain traffic the routing table resolves: hop limit <= 1, any extension header (so every
fragment), ICMPv6 neighbour discovery (types 133-137), link-local or multicast addresses, a forged source
(the stack's reverse-path guard drops it), a published port's reply, an address of the block no /128
routes to a veth: all left to the stack. As IPv4's, one program per network, the endpoint's IPv6 address
and published ports in the IPv6 endpoint map.

The programs are a few hundred instructions: assembled at load time (assembler.py, programs.py) (no compiler,
no object file), loaded with the bpf(2) syscall (loader.py) and attached by vpcnet.datapath.tc through netlink.
They are declared "Dual BSD/GPL" to the kernel (bpf_fib_lookup is a GPL-only helper), as Cilium's datapath is.
Little-endian machines only (x86_64, arm64): packet fields are compared as loaded.
"""
from vpcnet.datapath.ebpf.loader import load
from vpcnet.datapath.ebpf.programs import container_program, count_program, uplink_program

__all__ = ["container_program", "count_program", "load", "uplink_program"]
