"""The `vpcnet` command. Each sub-command lives in the module of the piece it drives; that module
exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int` as the default."""
from __future__ import annotations

import argparse
import importlib
import sys

from vpcnet import __version__
from vpcnet.config import ConfigError
from vpcnet.errors import VpcnetError

# Modules providing sub-commands, in help order.
COMMAND_MODULES = (
    "vpcnet.cli.serve",         # vpcnet serve
    "vpcnet.cli.status",        # vpcnet status
    "vpcnet.cli.doctor",        # vpcnet doctor
    "vpcnet.cli.network",       # vpcnet network forget
    "vpcnet.routes.cli",        # vpcnet routes list|sync|release|gc
    "vpcnet_lab.emulator.cli",  # vpcnet emulator (the vpcnet-lab package)
    "vpcnet_lab.cli",           # vpcnet lab up|status|down (the vpcnet-lab package)
    "vpcnet.cli.install",       # vpcnet install-systemd
    "vpcnet.cli.completion",    # vpcnet completion bash|zsh
)

#: Sub-commands of the vpcnet-lab package, which a host running the plugin does not carry.
LAB_COMMANDS = {"vpcnet_lab.emulator.cli": "emulator", "vpcnet_lab.cli": "lab"}
LAB_HINT = ("`vpcnet {command}` is part of vpcnet-lab (the VPC emulator, the multi-host lab and the image "
            "builder), which is not installed here. From a vpcnet checkout: pip install ./lab")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpcnet", description="Docker network plugin routing containers "
                                     "through the VPC route table (no overlay).")
    parser.add_argument("--version", action="version", version=f"vpcnet {__version__}")
    parser.set_defaults(parser=parser)      # for `vpcnet completion`, which completes the whole command
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if name not in LAB_COMMANDS or exc.name != "vpcnet_lab":
                raise
            _register_missing_lab(sub, LAB_COMMANDS[name])
            continue
        module.register(sub)
    return parser


def _register_missing_lab(sub, command: str) -> None:
    """A placeholder that says how to get the lab, instead of an "invalid choice"."""
    hint = LAB_HINT.format(command=command)
    parser = sub.add_parser(command, help="(needs vpcnet-lab) " + hint.split(" is part")[0], add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: _lab_missing(hint), lab_missing=True)


def _lab_missing(hint: str) -> int:
    print(f"vpcnet: {hint}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from vpcnet.cli import serve  # the plugin process stays lean: no other sub-command imported

        return serve.main(argv[1:])
    parser = build_parser()
    # parse_args would refuse the options meant for a missing lab command (`vpcnet lab --help`) before
    # the placeholder could say how to install it.
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "lab_missing", False):
        parser.error("unrecognized arguments: " + " ".join(unknown))
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"vpcnet: configuration error: {exc}", file=sys.stderr)
        return 2
    except VpcnetError as exc:
        print(f"vpcnet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
