"""The datapath as desired state: the store says what each network and endpoint should be, this makes the
kernel match (docs/datapath.md says what each mode does, docs/architecture.md where this room sits).

- `modes`: one strategy per datapath mode (bridge, routed, ebpf): what a network wants from the kernel.
- `features`: which modes this kernel and process can do, probed once; the default mode of new networks.
- `firewall`: vpcnet's chains diffed against `iptables-save` and written in one `iptables-restore
  --noflush` transaction.
- `spec`: the desired state as values (a network's and an endpoint's specs, vpcnet's names, `Repair`).
- `netlink`: this thread's netlink sockets in one namespace, sysctls, link lookups.
- `links`: bridges, anchors, veth pairs, addresses, routes, proxy ARP.
- `tc`: the eBPF fast path's programs (vpcnet.datapath.ebpf) attached, found and removed.
- `dataplane`: `Dataplane`, the real implementation of `protocol.Datapath`, composing the appliers; its
  `repair` reads the kernel and puts drift right.
- `reconciler`: the periodic pass that calls `repair` for every network in the store.
"""
