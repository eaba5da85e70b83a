#!/usr/bin/env python3
"""Write (or check) the managed plugin's config.json from `vpcnet.config.SETTINGS`.

    python3 plugin/genconfig.py            # print config.json
    python3 plugin/genconfig.py -o FILE    # write it
    python3 plugin/genconfig.py --check    # exit 1 if plugin/config.json is not what SETTINGS gives
    python3 plugin/genconfig.py --docker-socket [-o FILE]   # with the host's Docker socket (see below)

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
Mounts besides the state directory and the host's iptables lock: `host-sys-net` binds the host's
/proc/sys/net read-write at /run/vpcnet/host-sys-net (vpcnet.datapath.netlink.HOST_SYS_NET). Docker mounts
the plugin's own /proc/sys read-only, and the kernel takes a link's IPv6 settings (accept_ra, autoconf,
accept_dad, disable_ipv6, forwarding) only there (netlink's IFLA_INET6 takes only the token and
addr_gen_mode): without it, no IPv6 for the plugin's networks, nor for swarm services, which need the
managed plugin. The plugin shares the host's network namespace, and /proc/sys/net shows the namespace of
the process that opens it, so its writes there set the host's own settings. Security: the plugin can write
every net.* sysctl of the host's network namespace (vpcnet writes only its links' IPv6 settings and
net.ipv6.conf.all.forwarding, and reads the rest as before); CAP_NET_ADMIN, which it already has, sets
most of the IPv4 ones through netlink anyway. It gives nothing outside /proc/sys/net (no kernel.*, vm.*,
fs.*), and `docker plugin install` lists the mount among the privileges the user grants.
--docker-socket (plugin/build.sh --docker-socket): one more mount, `docker-socket`, binds the host's
/var/run/docker.sock at /run/docker-host.sock, and VPCNET_DOCKER_SOCKET defaults to that path, so the
metrics carry container, service and application names. It hands the plugin full control of the engine
(the Docker API is root on the host), so the shipped config.json does not have it; `docker plugin
install` of such a build lists the mount among the privileges the user grants. A build-time option, not
a settable mount with an empty source in every build: Docker hands a mount's source to runc as it is
(moby's plugin/v2 InitSpec), and a bind of an empty or missing source fails the plugin's enable.

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
HOST_SYS_NET_SOURCE = "/proc/sys/net"               # the host's net sysctls (its network namespace's)
HOST_SYS_NET = "/run/vpcnet/host-sys-net"           # vpcnet.datapath.netlink.HOST_SYS_NET
DOCKER_SOCKET_SOURCE = "/var/run/docker.sock"       # the host's engine (docker-socket.source moves it)
DOCKER_SOCKET_PATH = "/run/docker-host.sock"        # where the plugin reads it


def env_value(default) -> str:
    """A setting's default as the string `docker plugin set` would give."""
    if isinstance(default, (tuple, list)):
        return ",".join(str(x) for x in default)
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def env_entries(docker_socket: bool = False) -> list[dict]:
    entries = [{"Name": s.env, "Description": s.description, "Settable": ["value"], "Value": env_value(s.default)}
               for s in SETTINGS]
    if docker_socket:
        for entry in entries:
            if entry["Name"] == "VPCNET_DOCKER_SOCKET":
                entry["Value"] = DOCKER_SOCKET_PATH
    return entries


def docker_socket_mount() -> dict:
    return {
        "Name": "docker-socket",
        "Description": "The host's Docker API socket, for the metrics' container, service and application "
                       "names; it gives the plugin full control of the Docker engine",
        "Settable": ["source"],
        "Source": DOCKER_SOCKET_SOURCE,
        "Destination": DOCKER_SOCKET_PATH,
        "Type": "bind",
        # ro keeps the plugin from replacing the file; it does not stop API calls (connect() on a
        # socket of a read-only mount works)
        "Options": ["rbind", "ro"],
    }


def config(docker_socket: bool = False) -> dict:
    """The plugin's config.json; `docker_socket` adds the host's Docker socket (see the module doc)."""
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
        }, {
            # the links' IPv6 settings and IPv6 forwarding (see the module doc): the plugin's own
            # /proc/sys is read-only
            "Name": "host-sys-net",
            "Description": "The host's /proc/sys/net, read-write: the links' IPv6 settings (accept_ra, "
                           "disable_ipv6, ...) and IPv6 forwarding, which the kernel takes only there; it lets "
                           "the plugin write every net.* sysctl of the host",
            "Settable": [],
            "Source": HOST_SYS_NET_SOURCE,
            "Destination": HOST_SYS_NET,
            "Type": "bind",
            "Options": ["rbind", "rw"],
        }] + ([docker_socket_mount()] if docker_socket else []),
        "Env": env_entries(docker_socket),
    }


def render(docker_socket: bool = False) -> str:
    return json.dumps(config(docker_socket), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", metavar="FILE")
    parser.add_argument("--check", action="store_true", help="compare with plugin/config.json")
    parser.add_argument("--docker-socket", action="store_true",
                        help=f"bind the host's {DOCKER_SOCKET_SOURCE} at {DOCKER_SOCKET_PATH} for the metrics' "
                             "names (grants the plugin full control of the Docker engine)")
    args = parser.parse_args(argv)
    if args.check and args.docker_socket:
        parser.error("--check compares the shipped plugin/config.json, which has no Docker socket")
    text = render(args.docker_socket)
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
