"""`vpcnet install-systemd`: run vpcnet directly on a host under systemd.

Installs `vpcnet.service` (and, with `--emulator`, `vpcnet-emulator.service`) into
`<prefix>/etc/systemd/system`, creates `<prefix>/etc/vpcnet` (0750) with a commented `vpcnet.toml`
(0640, generated from `vpcnet.config.SETTINGS`) and an environment file for secrets (0600) — neither is
ever overwritten — and the state dir `<prefix>/var/lib/vpcnet` (0700). `systemctl daemon-reload` runs
only when the prefix is `/` and systemd is PID 1. `--dry-run` prints what it would do.

The unit files in the source tree's `systemd/` are this module's output for `/usr/local/bin/vpcnet`
(a test checks they match), so there is one definition of each unit. That path is the link
`python3 -m vpcnet.bootstrap` makes to the venv in `/opt/vpcnet` (the README's first command).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

from vpcnet.config import DEFAULT_CONFIG_FILE, SETTINGS

DEFAULT_VPCNET = "/usr/local/bin/vpcnet"
ENV_FILE = "/etc/vpcnet/vpcnet.env"
EMULATOR_ENV_FILE = "/etc/vpcnet/emulator.env"
STATE_DIR = "/var/lib/vpcnet"
UNIT_DIR = "/etc/systemd/system"

SERVICE = """\
# vpcnet: Docker network + IPAM plugin routing containers through the VPC route table.
# Installed by `vpcnet install-systemd`; configuration in /etc/vpcnet/vpcnet.toml (VPCNET_* variables in
# /etc/vpcnet/vpcnet.env override it, e.g. secrets), state in /var/lib/vpcnet. See docs/systemd.md.
[Unit]
Description=vpcnet Docker network plugin (routed containers through the VPC route table)
Documentation=man:systemd.exec(5)
Wants=network-online.target
After=network-online.target
# Docker looks for the plugin socket when it restores containers on vpcnet networks
Before=docker.service

[Service]
# gunicorn tells systemd when the socket is bound (sd_notify READY=1): docker.service starts after that.
# The worker running the reconciler pings the watchdog (WATCHDOG=1) only while /healthz passes, so a
# wedged plugin is restarted; it is not the main process, hence NotifyAccess=all.
Type=notify
NotifyAccess=all
WatchdogSec=60s
EnvironmentFile=-{env_file}
# '+': outside the sandbox below, which makes /run read-only
ExecStartPre=+/bin/mkdir -p /run/docker/plugins
ExecStartPre=+/bin/sh -c 'test -e /run/xtables.lock || : > /run/xtables.lock'
ExecStart={vpcnet} serve
Restart=on-failure
RestartSec=2s
TimeoutStopSec=20s
StateDirectory=vpcnet
StateDirectoryMode=0700
UMask=0077

# Hardening that still allows netlink (bridges, veths, addresses) and the firewall (iptables):
# root without any capability but CAP_NET_ADMIN (netlink, nf_tables, ip_forward), CAP_NET_RAW
# (iptables-legacy's raw socket) and CAP_BPF (the tc programs of -o vpcnet.mode=ebpf networks).
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF
AmbientCapabilities=
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=-/run/docker/plugins -/run/xtables.lock /var/lib/vpcnet
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# not ProtectKernelTunables: vpcnet sets net.ipv4.ip_forward=1 when Docker has not yet done it
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
# bpf(2) for the ebpf mode's programs: not in @system-service
SystemCallFilter=@system-service bpf

[Install]
WantedBy=multi-user.target
"""

EMULATOR_SERVICE = """\
# vpcnet VPC API emulator: an Alibaba-Cloud-compatible route table API for labs and tests, never for
# production. Installed by `vpcnet install-systemd --emulator`. Listens on 127.0.0.1:8790 by default;
# extra access keys go in /etc/vpcnet/emulator.env as VPCNET_EMULATOR_ACCESS_KEYS=ID:SECRET[,...] and
# more options as EMULATOR_ARGS="--pending-delay 2 --quota 50".
[Unit]
Description=vpcnet VPC API emulator (lab only)
After=network.target

[Service]
Type=simple
Environment=EMULATOR_LISTEN=127.0.0.1:8790
EnvironmentFile=-{emulator_env_file}
ExecStart={vpcnet} emulator --listen ${{EMULATOR_LISTEN}} --state /var/lib/vpcnet-emulator/state.json $EMULATOR_ARGS
Restart=on-failure
RestartSec=2s
DynamicUser=yes
StateDirectory=vpcnet-emulator
StateDirectoryMode=0700
UMask=0077
CapabilityBoundingSet=
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service

[Install]
WantedBy=multi-user.target
"""

ENV_TEMPLATE = """\
# Environment of vpcnet.service (mode 0600: put secrets here rather than in vpcnet.toml).
# VPCNET_* variables override /etc/vpcnet/vpcnet.toml. Examples:
#VPCNET_ALIYUN_ACCESS_KEY_ID=LTAI...
#VPCNET_ALIYUN_ACCESS_KEY_SECRET=...
#AWS_ACCESS_KEY_ID=...        (better: an instance profile)
"""

EMULATOR_ENV_TEMPLATE = """\
# Environment of vpcnet-emulator.service (mode 0600).
#EMULATOR_LISTEN=127.0.0.1:8790
#VPCNET_EMULATOR_ACCESS_KEYS=lab-key:lab-secret
#EMULATOR_ARGS=--pending-delay 1 --instance i-lab1=192.168.0.11
"""


def render_service(vpcnet: str = DEFAULT_VPCNET) -> str:
    return SERVICE.format(vpcnet=vpcnet, env_file=ENV_FILE)


def render_emulator_service(vpcnet: str = DEFAULT_VPCNET) -> str:
    return EMULATOR_SERVICE.format(vpcnet=vpcnet, emulator_env_file=EMULATOR_ENV_FILE)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
    return json.dumps(str(value))


def render_toml() -> str:
    """A commented vpcnet.toml: every setting with its description and default, all commented out
    (uncommenting a line as it is changes nothing)."""
    lines = ["# vpcnet configuration (TOML). Every setting, commented out at its default; uncomment and",
             "# change what you need. VPCNET_* environment variables (e.g. in /etc/vpcnet/vpcnet.env)",
             "# override this file. Secrets are better kept in the 0600 environment file.", ""]
    for s in SETTINGS:
        lines.append(f"# {s.description}" + (" [secret: prefer vpcnet.env]" if s.secret else "") +
                     f" (env {s.env})")
        lines.append(f"#{s.attr} = {_toml_value(s.default)}")
        lines.append("")
    return "\n".join(lines)


class Installer:
    def __init__(self, prefix: str = "/", dry_run: bool = False, vpcnet: str | None = None,
                 emulator: bool = False, out=None):
        self.prefix = os.path.abspath(prefix)
        self.dry_run = dry_run
        self.vpcnet = vpcnet or find_vpcnet()
        self.emulator = emulator
        self.out = out or sys.stdout

    def path(self, absolute: str) -> str:
        return os.path.join(self.prefix, absolute.lstrip("/"))

    def say(self, text: str) -> None:
        print(("would " if self.dry_run else "") + text, file=self.out)

    def mkdir(self, absolute: str, mode: int) -> None:
        path = self.path(absolute)
        if os.path.isdir(path):
            if (os.stat(path).st_mode & 0o777) != mode:
                self.say(f"chmod {mode:04o} {path}")
                if not self.dry_run:
                    os.chmod(path, mode)
            return
        self.say(f"create directory {path} (mode {mode:04o})")
        if not self.dry_run:
            os.makedirs(path, mode=mode, exist_ok=True)
            os.chmod(path, mode)

    def write(self, absolute: str, text: str, mode: int, overwrite: bool) -> None:
        path = self.path(absolute)
        if os.path.exists(path) and not overwrite:
            print(f"keep existing {path}", file=self.out)
            return
        if os.path.exists(path):
            with open(path) as fh:
                if fh.read() == text:
                    print(f"unchanged {path}", file=self.out)
                    return
        self.say(f"write {path} (mode {mode:04o})")
        if self.dry_run:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    def run(self) -> int:
        self.mkdir("/etc/vpcnet", 0o750)
        self.write(DEFAULT_CONFIG_FILE, render_toml(), 0o640, overwrite=False)
        self.write(ENV_FILE, ENV_TEMPLATE, 0o600, overwrite=False)
        self.mkdir(STATE_DIR, 0o700)
        self.mkdir(UNIT_DIR, 0o755)
        self.write(f"{UNIT_DIR}/vpcnet.service", render_service(self.vpcnet), 0o644, overwrite=True)
        if self.emulator:
            self.write(EMULATOR_ENV_FILE, EMULATOR_ENV_TEMPLATE, 0o600, overwrite=False)
            self.write(f"{UNIT_DIR}/vpcnet-emulator.service", render_emulator_service(self.vpcnet), 0o644,
                       overwrite=True)
        if self.prefix == "/" and systemd_running():
            self.say("run systemctl daemon-reload")
            if not self.dry_run:
                subprocess.run(["systemctl", "daemon-reload"], check=True, timeout=60)
        print("next: edit /etc/vpcnet/vpcnet.toml, then: systemctl enable --now vpcnet.service"
              + (" (and vpcnet-emulator.service for a lab)" if self.emulator else ""), file=self.out)
        return 0


def systemd_running() -> bool:
    """systemd is PID 1 (sd_booted(3))."""
    return os.path.isdir("/run/systemd/system")


def find_vpcnet() -> str:
    """The installed `vpcnet` command, as an absolute path for ExecStart."""
    argv0 = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == "vpcnet" else ""
    for candidate in (argv0, shutil.which("vpcnet") or "", DEFAULT_VPCNET):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return DEFAULT_VPCNET


def register(sub) -> None:
    parser = sub.add_parser("install-systemd", help="install the systemd unit, config and state dir",
                            description=__doc__.split("\n\n")[1])
    parser.add_argument("--prefix", default="/", metavar="DIR", help="install under DIR (default /)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    parser.add_argument("--emulator", action="store_true", help="also install vpcnet-emulator.service (labs)")
    parser.add_argument("--vpcnet", metavar="PATH", default=None,
                        help="the vpcnet command for ExecStart (default: the one running, else "
                             f"{DEFAULT_VPCNET})")
    parser.add_argument("--print", dest="print_unit", choices=["vpcnet.service", "vpcnet-emulator.service",
                                                                 "vpcnet.toml"],
                        help="print one generated file and exit")

    def func(args) -> int:
        if args.print_unit:
            vpcnet = args.vpcnet or DEFAULT_VPCNET
            text = {"vpcnet.service": lambda: render_service(vpcnet),
                    "vpcnet-emulator.service": lambda: render_emulator_service(vpcnet),
                    "vpcnet.toml": render_toml}[args.print_unit]()
            sys.stdout.write(text)
            return 0
        if args.emulator and not _lab_installed():
            # the unit would start `vpcnet emulator`, which lives in vpcnet-lab: refuse before writing
            print("vpcnet: --emulator: the emulator is part of vpcnet-lab, which is not installed here "
                  "(from a vpcnet checkout: /opt/vpcnet/bin/pip install ./lab)", file=sys.stderr)
            return 2
        return Installer(args.prefix, args.dry_run, args.vpcnet, args.emulator).run()

    parser.set_defaults(func=func)


def _lab_installed() -> bool:
    try:
        return importlib.util.find_spec("vpcnet_lab") is not None
    except ImportError:
        return False
