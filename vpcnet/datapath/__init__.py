"""The datapath as desired state: the store says what each network and endpoint should be, this makes the
kernel match (see the README's Usage and Layout).

- `modes`: one strategy per datapath mode (bridge, routed, ebpf): what a network wants from the kernel.
- `features`: which modes this kernel and process can do, probed once; the default mode of new networks.
- `firewall`: vpcnet's chains diffed against `iptables-save` and written in one `iptables-restore
  --noflush` transaction.
- vpcnet.dataplane: the links, addresses, routes and tc programs, applied over netlink.
"""
