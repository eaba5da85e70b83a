"""The `vpcnet` command. Each sub-command lives in the module of the piece it drives; that module
exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int` as the default."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vpcnet import __version__
from vpcnet.config import ConfigError
from vpcnet.errors import VpcnetError

# Modules providing sub-commands, in help order.
COMMAND_MODULES = (
    "vpcnet.serve",         # vpcnet serve
    "vpcnet.status",        # vpcnet status
    "vpcnet.doctor",        # vpcnet doctor
    "vpcnet.routes_cli",    # vpcnet routes list|sync|release|gc
    "vpcnet.emulator.cli",  # vpcnet emulator
    "vpcnet.lab.cli",       # vpcnet lab up|status|down
    "vpcnet.install",       # vpcnet install-systemd
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpcnet", description="Docker network plugin routing containers "
                                     "through the VPC route table (no overlay).")
    parser.add_argument("--version", action="version", version=f"vpcnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not name.startswith(exc.name or "?"):
                raise
            continue   # a piece not installed in this build
        module.register(sub)
    return parser


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML configuration file (default /etc/vpcnet/vpcnet.toml if present; "
                             "VPCNET_* environment variables override it)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from vpcnet import serve  # the plugin process stays lean: no other sub-command imported

        return serve.main(argv[1:])
    args = build_parser().parse_args(argv)
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


def setup_logging(level: str, fmt: str = "text") -> None:
    """Root logging to stderr in `fmt` (vpcnet.logs: text, or one JSON object per line)."""
    from vpcnet.logs import TEXT_FORMAT, formatter

    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=TEXT_FORMAT)
    logging.getLogger().setLevel(level.upper())
    # pyroute2 and urllib3 narrate every message at DEBUG: keep them to warnings. A handler filter,
    # because pyroute2 resets its logger's level when it is imported.
    for handler in logging.getLogger().handlers:
        if fmt != "text":
            handler.setFormatter(formatter(fmt))
        if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
            handler.addFilter(_QuietLibraries())


class _QuietLibraries(logging.Filter):
    NOISY = ("pyroute2", "urllib3", "asyncio")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(self.NOISY)


if __name__ == "__main__":
    sys.exit(main())
