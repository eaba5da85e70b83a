"""`vpcnet emulator`: run the Alibaba-Cloud-compatible VPC API emulator in the foreground."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

DEFAULT_LISTEN = "127.0.0.1:8790"
#: Extra access keys as `ID:SECRET[,ID:SECRET...]`, so secrets need not appear on a command line.
ACCESS_KEYS_ENV = "VPCNET_EMULATOR_ACCESS_KEYS"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "emulator", help="run an Alibaba-Cloud-compatible VPC API emulator (for tests and the lab)",
        description="Serve a subset of the Alibaba Cloud VPC API (CreateRouteEntry, DeleteRouteEntry, "
                    "CreateRouteEntries, DeleteRouteEntries, DescribeRouteEntryList, DescribeRouteTableList, "
                    "DescribeInstances) with signature checks, Pending/Deleting delays, per-table quotas, a "
                    "VPC-wide write lock (TaskConflict), several route tables bound to vSwitches and fault "
                    "injection. Admin "
                    "endpoints (unsigned JSON) live under /_emulator/.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to listen on (default {DEFAULT_LISTEN})")
    p.add_argument("--state", metavar="FILE", help="persist the state to FILE (JSON, loaded at start)")
    p.add_argument("--router-netns", metavar="NS",
                   help="install each Available entry as a kernel route in this network namespace")
    p.add_argument("--pending-delay", type=float, default=0.0, metavar="S",
                   help="seconds an entry stays Pending (default 0)")
    p.add_argument("--pending-delay-max", type=float, default=0.0, metavar="S",
                   help="above --pending-delay: each new entry stays Pending a delay drawn from "
                        "uniform(--pending-delay, S), e.g. 2 and 5 for Alibaba's few seconds (default 0: fixed)")
    p.add_argument("--deleting-delay", type=float, default=0.0, metavar="S",
                   help="seconds an entry stays Deleting (default 0)")
    p.add_argument("--quota", type=int, default=200, metavar="N",
                   help="custom entries per route table (default 200)")
    p.add_argument("--write-interval", type=float, default=0.0, metavar="S",
                   help="the VPC takes one route-table write per S seconds, answering TaskConflict to "
                        "writes in between (default 0: only while an entry is Pending/Deleting)")
    p.add_argument("--route-table", action="append", default=[], metavar="ID[=VSW:CIDR,...]",
                   help="an extra (custom) route table, with the vSwitches bound to it (repeatable; the "
                        "--route-table-id table binds vSwitches the same way)")
    p.add_argument("--kernel-table", action="append", default=[], metavar="ID=N",
                   help="with --router-netns: install route table ID's routes in kernel table N (repeatable; "
                        "default: every table into the main table)")
    p.add_argument("--fault-rate", type=float, default=0.0, metavar="P",
                   help="probability (0..1) that a signed request fails with an injected fault")
    p.add_argument("--fault-codes", default="Throttling,ServiceUnavailable,InternalError", metavar="A,B",
                   help="codes to inject (default Throttling,ServiceUnavailable,InternalError)")
    p.add_argument("--latency", type=float, default=0.0, metavar="S", help="seconds added to each request")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="seed of the fault generator")
    p.add_argument("--region", default="cn-emu-1")
    p.add_argument("--vpc-id", default="vpc-emu0001")
    p.add_argument("--route-table-id", default="vtb-emu0001")
    p.add_argument("--vswitch-cidr", action="append", default=None, metavar="CIDR",
                   help="a vSwitch CIDR shown as a System entry (repeatable; default 192.168.0.0/24)")
    p.add_argument("--describe-vswitches", action="store_true",
                   help="also serve DescribeVSwitches (the vSwitch CIDRs of the System entries)")
    p.add_argument("--access-key", action="append", default=[], metavar="ID:SECRET",
                   help="accept this AccessKey (repeatable; also $" + ACCESS_KEYS_ENV + "; "
                        "default: the test key emu-key-id)")
    p.add_argument("--sts-key", action="append", default=[], metavar="ID:SECRET:TOKEN",
                   help="accept this temporary key with its SecurityToken (repeatable)")
    p.add_argument("--instance", action="append", default=[], metavar="ID=IP[,IP6]",
                   help="register an instance and its underlay IP, and optionally its IPv6 underlay address, "
                        "which its IPv6 route entries go via in the router namespace (repeatable)")
    p.add_argument("--prefix-range", action="append", default=[], metavar="VSW=CIDR",
                   help="a reserved CIDR block of type Prefix in vSwitch VSW, where ENI IPv4 /28 prefixes come "
                        "from (repeatable)")
    p.add_argument("--vswitch-ipv6", action="append", default=[], metavar="VSW=CIDR",
                   help="the IPv6 CIDR of vSwitch VSW, where ENI IPv6 /80 prefixes come from (repeatable)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (request lines show method, path and status only)")
    p.set_defaults(func=run)


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--listen wants HOST:PORT, got {text!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--listen: bad port {port!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"--listen: bad port {port!r}")
    return host, number


def _parse_keys(items: list[str]) -> dict[str, str]:
    keys = {}
    for item in items:
        key_id, sep, secret = item.partition(":")
        if not sep or not key_id or not secret:
            # never echo the value: it holds a secret
            raise ValueError("an access key must be given as ID:SECRET")
        keys[key_id] = secret
    return keys


def run(args: argparse.Namespace) -> int:
    from vpcnet.observability.logs import setup_logging
    from vpcnet_lab.emulator import Emulator, make_emulator_server
    from vpcnet_lab.emulator.errors import ApiError
    from vpcnet_lab.emulator.kernel import KernelRouteError

    setup_logging(args.log_level)

    try:
        host, port = _parse_listen(args.listen)
        env_keys = [k for k in os.environ.get(ACCESS_KEYS_ENV, "").split(",") if k.strip()]
        credentials = _parse_keys(args.access_key + env_keys) or None
        sts = []
        for item in args.sts_key:
            parts = item.split(":", 2)
            if len(parts) != 3 or not all(parts):
                raise ValueError("an STS key must be given as ID:SECRET:TOKEN")
            sts.append(parts)
        instances = []
        for item in args.instance:
            iid, sep, ips = item.partition("=")
            ip, comma, ip6 = ips.partition(",")
            if not sep or not iid or not ip or (comma and not ip6):
                raise ValueError(f"--instance wants ID=IP[,IP6], got {item!r}")
            instances.append((iid, ip, ip6))
        ranges: list[tuple[str, str]] = []
        ipv6: list[tuple[str, str]] = []
        for option, items, into in (("--prefix-range", args.prefix_range, ranges),
                                    ("--vswitch-ipv6", args.vswitch_ipv6, ipv6)):
            for item in items:
                vsw, sep, cidr = item.partition("=")
                if not sep or not vsw or not cidr:
                    raise ValueError(f"{option} wants VSW=CIDR, got {item!r}")
                into.append((vsw, cidr))
        tables = []
        for item in args.route_table:
            table_id, _, binds = item.partition("=")
            vswitches = {}
            for bind in (b for b in binds.split(",") if b):
                vsw, sep, cidr = bind.partition(":")
                if not sep or not vsw or not cidr:
                    raise ValueError(f"--route-table wants ID[=VSW:CIDR,...], got {item!r}")
                vswitches[vsw] = cidr
            if not table_id:
                raise ValueError(f"--route-table wants ID[=VSW:CIDR,...], got {item!r}")
            tables.append((table_id, vswitches))
        kernel_tables = {}
        for item in args.kernel_table:
            table_id, sep, number = item.partition("=")
            if not sep or not table_id or not number.isdigit() or not 0 < int(number) < 2 ** 31:
                raise ValueError(f"--kernel-table wants ID=N (N a kernel table number), got {item!r}")
            kernel_tables[table_id] = int(number)
        kwargs = {"vswitch_api": args.describe_vswitches, "write_interval": args.write_interval,
                  "kernel_tables": kernel_tables}
        if args.vswitch_cidr:
            kwargs["vswitch_cidrs"] = args.vswitch_cidr
        emu = Emulator(region=args.region, vpc_id=args.vpc_id, route_table_id=args.route_table_id,
                       credentials=credentials, pending_delay=args.pending_delay,
                       pending_delay_max=args.pending_delay_max,
                       deleting_delay=args.deleting_delay, quota=args.quota, state_file=args.state,
                       router_netns=args.router_netns, seed=args.seed, **kwargs)
    except (ValueError, KernelRouteError) as exc:
        print(f"vpcnet emulator: {exc}", file=sys.stderr)
        return 2

    server = None
    try:
        for key_id, secret, token in sts:
            emu.add_sts_credentials(key_id, secret, token)
        for iid, ip, ip6 in instances:
            emu.register_instance(iid, ip, ip6)
        known = {t["RouteTableId"] for t in emu.route_tables()}
        for table_id, vswitches in tables:
            if table_id not in known:          # a state file may hold it already
                emu.add_route_table(table_id, vswitches=vswitches)
            else:
                for vsw, cidr in vswitches.items():
                    emu.add_vswitch(vsw, cidr, table_id)
        for vsw, cidr in ranges:
            emu.add_cidr_reservation(vsw, cidr)
        for vsw, cidr in ipv6:
            emu.set_vswitch_ipv6(vsw, cidr)
        emu.set_faults(rate=args.fault_rate, codes=args.fault_codes, latency=args.latency)
        server = make_emulator_server(emu, host, port)
    except (ValueError, OSError, ApiError) as exc:       # ApiError: a --prefix-range outside its vSwitch
        print(f"vpcnet emulator: {exc}", file=sys.stderr)
        emu.close()
        return 2

    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="vpcnet-emulator-http", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    print(f"vpcnet emulator: listening on http://{shown}:{server.server_port}/ (region {args.region}, "
          f"vpc {args.vpc_id}, route table {args.route_table_id}, quota {emu.quota}, "
          f"pending {emu.pending_delay}s, faults {emu.faults()['rate']}"
          + (f", router netns {args.router_netns}" if args.router_netns else "") + ")", flush=True)
    try:
        while not stop.wait(1.0):
            if not thread.is_alive():
                print("vpcnet emulator: server thread died", file=sys.stderr)
                return 1
    finally:
        server.shutdown()
        thread.join(timeout=5.0)
        server.server_close()
        emu.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("vpcnet emulator: stopped", flush=True)
    return 0
