"""The datapath as desired state (see the README's "Datapath" section).

- `modes`: one strategy per datapath mode (bridge, routed, ebpf): what a network wants from the kernel.
- `firewall`: vpcnet's chains diffed against `iptables-save` and written in one `iptables-restore
  --noflush` transaction.
- vpcnet.dataplane: the links, addresses, routes and tc programs, applied over netlink.
"""
