#!/usr/bin/env python3
"""Write (or check) the managed plugin's config.json from `vpcnet.config.SETTINGS`.

    python3 plugin/genconfig.py            # print config.json
    python3 plugin/genconfig.py -o FILE    # write it
    python3 plugin/genconfig.py --check    # exit 1 if plugin/config.json is not what SETTINGS gives

Every `VPCNET_*` setting becomes a settable `Env` entry ({Name, Description, Settable, Value}) with the
setting's default, so `docker plugin set NAME VPCNET_X=...` works for each of them and nothing else.
The rest of the file is fixed here; plugin/build.sh runs this script, so a build always matches the
checkout it was made from.

Capabilities (Docker adds its default set — CHOWN, DAC_OVERRIDE, NET_RAW, SETUID, ... — to these):
- CAP_NET_ADMIN: netlink (bridges, veth pairs, addresses, MTU) and the firewall (iptables-nft talks
  netlink to nf_tables; iptables-legacy uses setsockopt on a raw socket, which CAP_NET_RAW from the
  default set covers).
- CAP_BPF: loading the tc programs of ebpf-mode networks, the default mode where the kernel allows it
  (with CAP_NET_ADMIN, which networking program types need too). Without it new networks default to
  routed mode (vpcnet status and doctor say why) and -o vpcnet.mode=ebpf is refused, with the reason.
Nothing else: no CAP_SYS_ADMIN (vpcnet never enters a network namespace in the plugin; Docker moves the
container end of the veth itself), no CAP_SYS_MODULE (the host's Docker has already loaded the netfilter
and bridge modules).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vpcnet.config import SETTINGS  # noqa: E402

STATE_DIR = "/var/lib/vpcnet"
XTABLES_LOCK = "/run/xtables.lock"      # XT_LOCK_NAME of iptables(8)
ENTRYPOINT = ["/usr/local/sbin/vpcnet-entrypoint", "serve"]
CAPABILITIES = ["CAP_NET_ADMIN", "CAP_BPF"]


def env_value(default) -> str:
    """A setting's default as the string `docker plugin set` would give."""
    if isinstance(default, (tuple, list)):
        return ",".join(str(x) for x in default)
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def env_entries() -> list[dict]:
    return [{"Name": s.env, "Description": s.description, "Settable": ["value"], "Value": env_value(s.default)}
            for s in SETTINGS]


def config() -> dict:
    return {
        "Description": "vpcnet: routed container networking through the cloud VPC route table (network "
                       "and IPAM driver, no overlay)",
        "Documentation": "docs/managed-plugin.md in the vpcnet source",
        "Entrypoint": ENTRYPOINT,
        "WorkDir": "/",
        "Interface": {"Types": ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"], "Socket": "vpcnet.sock"},
        # host network: vpcnet makes bridges and veths in the host's namespace and reaches the
        # instance metadata service and the cloud API from the host's address.
        "Network": {"Type": "host"},
        "Linux": {"Capabilities": CAPABILITIES, "AllowAllDevices": False, "Devices": None},
        "Mounts": [{
            "Name": "state",
            "Description": "Host directory holding vpcnet's state (sqlite store, local route table); it "
                           "outlives the plugin, so an upgrade keeps networks and addresses",
            "Settable": ["source"],
            "Source": STATE_DIR,
            "Destination": STATE_DIR,
            "Type": "bind",
            "Options": ["rbind", "rw"],
        }, {
            # iptables-legacy serialises every writer of the host's rule set with flock on this file:
            # without the host's own file, the plugin's iptables and Docker's (or firewalld's) could
            # interleave and lose each other's rules. iptables-nft ignores it. A bind mount needs the
            # file to exist: build.sh (and `touch`, see docs/managed-plugin.md) makes it.
            "Name": "xtables-lock",
            "Description": "The host's iptables lock file, so the plugin's rule changes and the host's "
                           "(Docker, firewalld) never interleave",
            "Settable": ["source"],
            "Source": XTABLES_LOCK,
            "Destination": XTABLES_LOCK,
            "Type": "bind",
            "Options": ["bind", "rw"],
        }],
        "Env": env_entries(),
    }


def render() -> str:
    return json.dumps(config(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", metavar="FILE")
    parser.add_argument("--check", action="store_true", help="compare with plugin/config.json")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        path = os.path.join(HERE, "config.json")
        with open(path) as fh:
            if fh.read() != text:
                print(f"{path} is stale: run python3 plugin/genconfig.py -o {path}", file=sys.stderr)
                return 1
        return 0
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
