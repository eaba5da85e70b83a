"""Log formats: the default text lines, or `VPCNET_LOG_FORMAT=json` — one JSON object per line.

A JSON line holds `time` (UTC, ISO 8601), `level`, `logger`, `pid`, `message`, and the fields a log call
passed as `extra`: transport's line for each Docker call carries `call`, `status`, `duration_ms`,
`network` and `endpoint` (12-character ids, when the call names them), and `container`, `service` and
`application` once the process serving /metrics has read them from Docker (vpcnet.docker.names).
The datapath pass's repair lines and the route pass's claim, create, delete and problem lines carry
`event` (`datapath_repair`, `route_create`, ...), `kind`, `outcome` and what they name of `network`,
`cluster`, `table`, `chain`, `family`, `destination`, `next_hop` (docs/monitoring.md lists them).
gunicorn's own lines use the same formatter, so every line of the plugin's output parses. No secret is
ever put in a record (providers scrub their messages); the formatter adds nothing that was not in the
record.
"""
from __future__ import annotations

import json
import logging
import sys
import time

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXTRA_FIELDS = ("call", "status", "duration_ms", "network", "endpoint", "container", "service", "application",
                "event", "kind", "outcome", "cluster", "table", "destination", "next_hop", "family", "chain")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
               "pid": record.process, "message": record.getMessage()}
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, ""):
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def gunicorn_logger_class(fmt: str):
    """gunicorn's logger, its lines in `fmt` too (its text format stays gunicorn's own)."""
    from gunicorn.glogging import Logger

    if fmt != "json":
        return Logger

    class JsonLogger(Logger):
        def setup(self, cfg):
            super().setup(cfg)
            for handler in self.error_log.handlers + self.access_log.handlers:
                handler.setFormatter(JsonFormatter())

    return JsonLogger


def setup_logging(level: str, fmt: str = "text") -> None:
    """Root logging to stderr in `fmt` (vpcnet.observability.logs: text, or one JSON object per line)."""
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
