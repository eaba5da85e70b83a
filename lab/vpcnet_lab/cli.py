"""`vpcnet lab up|status|down`: the multi-host lab from the command line."""
from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    from vpcnet_lab.lab import (
        ADDRESSING_MODES,
        DEFAULT_CLUSTER,
        DEFAULT_CLUSTER_V6,
        DEFAULT_ENI_RANGE,
        DEFAULT_INSTANCE_TYPE,
        DEFAULT_NETWORK,
        DEFAULT_RECONCILE,
        UNDERLAY,
        UNDERLAY_ALL,
    )

    p = subparsers.add_parser(
        "lab", help="several simulated hosts on this machine (netns + own Docker engine + vpcnet each) "
                    "behind an emulated VPC router",
        description="Build, inspect and remove a multi-host lab: a router namespace (vpclab-vpc) running "
                    "the VPC emulator, and hosts vpclab-h1..hN, each with its own Docker engine "
                    "(/run/vpclab/hK/docker.sock) and its own `vpcnet serve` using the aliyun provider "
                    "against the emulator. Underlay 192.168.240.0/24 and fd00:192:168:240::/64, all inside the lab's "
                    "namespaces.")
    sub = p.add_subparsers(dest="lab_command", metavar="ACTION")
    sub.required = True

    up = sub.add_parser("up", help="build the lab (safe to run again; adds hosts up to --hosts)")
    up.add_argument("--hosts", type=int, default=2, metavar="N", help="number of hosts (default 2)")
    up.add_argument("--zones", type=int, default=1, metavar="Z",
                    help="zones (1..4): host K in zone (K-1)%%Z+1, each zone a vSwitch bound to its own route "
                         "table; the router forwards by the table of the packet's zone (default 1)")
    up.add_argument("--cluster-cidr", default=None, metavar="CIDR",
                    help=f"cluster CIDR the hosts' blocks are carved from (default {DEFAULT_CLUSTER}); with "
                         f"--addressing eni-prefix the reserved range, inside the lab vSwitch {UNDERLAY_ALL} "
                         f"beside the hosts' {UNDERLAY} (default {DEFAULT_ENI_RANGE})")
    up.add_argument("--ipv6", action="store_true",
                    help="make that network dual-stack: every container also gets an IPv6 address of its host's "
                         "/80 of --cluster-cidr-v6, routed by the emulated VPC like the IPv4 blocks")
    up.add_argument("--cluster-cidr-v6", default=DEFAULT_CLUSTER_V6, metavar="CIDR",
                    help=f"IPv6 cluster CIDR the hosts' IPv6 blocks are carved from (default {DEFAULT_CLUSTER_V6})")
    up.add_argument("--addressing", default="route-table", choices=ADDRESSING_MODES,
                    help="route-table (default: each host's block a route in the emulated route table) or "
                         "eni-prefix (the cluster CIDR is the vSwitch's reserved range of type Prefix, the IPv6 "
                         "one its IPv6 CIDR; each host's plugin assigns /28 and /80 prefixes to its ENI; the "
                         "route table stays empty)")
    up.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE, metavar="TYPE",
                    help="the hosts' ECS instance type, which fixes how many prefixes their ENI holds "
                         f"(default {DEFAULT_INSTANCE_TYPE})")
    up.add_argument("--network", default=DEFAULT_NETWORK, metavar="NAME",
                    help=f"name of the vpcnet network created on every host (default {DEFAULT_NETWORK}; "
                         "'' for none)")
    up.add_argument("--mode", default="default", metavar="MODE",
                    help="datapath of that network: default (no -o: the plugins' default mode, ebpf where "
                         "supported), bridge, routed or ebpf (-o vpcnet.mode=MODE)")
    up.add_argument("--reconcile-interval", type=float, default=DEFAULT_RECONCILE, metavar="S",
                    help=f"each plugin's VPCNET_RECONCILE_INTERVAL (default {DEFAULT_RECONCILE:g})")
    up.add_argument("--no-image", action="store_true", help="do not load the test image into the engines")
    up.set_defaults(func=_up)

    st = sub.add_parser("status", help="hosts, host CIDRs, the emulated route table, route availability")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    down = sub.add_parser("down", help="remove everything the lab made (also after a failed up)")
    down.set_defaults(func=_down)


def _up(args) -> int:
    from vpcnet_lab.lab import Lab
    from vpcnet_lab.netns import LabError

    try:
        lab = Lab(hosts=args.hosts, cluster_cidr=args.cluster_cidr, network=args.network, mode=args.mode,
                  zones=args.zones, ipv6=args.ipv6, cluster_cidr_v6=args.cluster_cidr_v6,
                  addressing=args.addressing, instance_type=args.instance_type,
                  reconcile_interval=args.reconcile_interval, load_image=not args.no_image, out=sys.stdout)
    except LabError as exc:               # settings refused before anything is made
        print(f"vpcnet lab up: {exc}", file=sys.stderr)
        return 1
    try:
        lab.up()
    except LabError as exc:
        print(f"vpcnet lab up: {exc}\n(run `vpcnet lab down` to remove what was made)", file=sys.stderr)
        return 1
    print(f"lab up: {len(lab.state['hosts'])} host(s) in {lab.zones} zone(s), {lab.addressing} addressing, "
          f"cluster {lab.cluster_cidr}"
          f"{' and ' + lab.cluster_cidr_v6 if lab.ipv6 else ''}, "
          f"network {lab.network or '(none)'} ({lab.mode} mode{', dual-stack' if lab.ipv6 else ''}); "
          "`vpcnet lab status` shows the route table and prefixes, "
          "`vpcnet lab down` removes it all")
    return 0


def _status(args) -> int:
    from vpcnet_lab.lab import Lab

    status = Lab().status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if status.get("up") else 3
    if not status.get("hosts") and not status.get("emulator_url"):
        left = {k: v for k, v in status.get("leftovers", {}).items() if v}
        print("lab is down" + (f" (leftovers: {left}; run `vpcnet lab down`)" if left else ""))
        return 3
    eni_prefix = status.get("addressing") == "eni-prefix"
    print(f"lab {'up' if status['up'] else 'DEGRADED'}: {status.get('addressing', 'route-table')} addressing"
          + (f" ({status.get('instance_type')} hosts)" if eni_prefix else "")
          + f", {'reserved range' if eni_prefix else 'cluster'} {status['cluster_cidr']}"
          f"{' and ' + status['cluster_cidr_v6'] if status['ipv6'] else ''}, network "
          f"{status['network'] or '(none)'} ({status['mode']} mode{', dual-stack' if status['ipv6'] else ''}), "
          f"router {status['router_netns']}, "
          f"emulator {status['emulator_url']} "
          f"({'up' if status['emulator_up'] else 'down'})")
    print(f"{'host':<5} {'netns':<11} {'underlay':<15} {'host CIDR':<16} {'engine':<7} {'plugin':<7} route")
    for h in status["hosts"]:
        route = h["route"]
        shown = f"{route['destination']} {route['status']}" if route else "none"
        if eni_prefix:       # a route here would be a bug: shown too
            shown = (f"ENI {h.get('network_interface_id') or '-'}" + (f", route {shown}" if route else ""))
        print(f"{h['host']:<5} {h['netns']:<11} {h['underlay_ip']:<15} {h['host_cidr'] or '-':<16} "
              f"{'up' if h['engine_up'] else 'down':<7} {'up' if h['plugin_up'] else 'down':<7} {shown}")
        if eni_prefix:
            print(f"      prefixes: {', '.join(h.get('prefixes', []) + h.get('prefixes6', [])) or 'none'}")
        route6 = h["route6"]
        if eni_prefix and (route6 or h["host_cidr6"]):     # the range, no block: a route here would be a bug
            print(f"      IPv6: underlay {h['underlay_ip6']}, range {h['host_cidr6'] or '-'}"
                  + (f", route {route6['destination']} {route6['status']}" if route6 else ""))
        elif route6 or h["host_cidr6"]:
            print(f"      IPv6: underlay {h['underlay_ip6']}, host block {h['host_cidr6'] or '-'}, route "
                  + (f"{route6['destination']} {route6['status']}" if route6 else "none"))
        print(f"      DOCKER_HOST={h['docker_host']}")
    for table, entries in status.get("route_tables", {}).items():
        print(f"zone route table {table}: {', '.join(entries) or 'no custom entry'}")
    print("emulated route table:")
    for e in status["route_table"]:
        print(f"  {e['destination']:<18} {e['type']:<7} {e['status']:<10} {e['next_hop'] or '-':<14} {e['entry_id']}")
    print(f"kernel routes in {status['router_netns']}:")
    for line in status["kernel_routes"] + [r for r in status["kernel_routes6"] if " via " in r]:
        print(f"  {line}")
    return 0 if status["up"] else 3


def _down(args) -> int:
    from vpcnet_lab.lab import Lab

    left = Lab().down()
    if left:
        print("vpcnet lab down: left behind: " + "; ".join(left), file=sys.stderr)
        return 1
    print("lab down: no vpclab namespace, engine, mount or file left")
    return 0
