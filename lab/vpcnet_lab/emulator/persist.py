"""The emulator's state file: one JSON document, replaced atomically after every change.

It holds tables, vSwitches, instances, ClientTokens and nonces (never a secret), so an emulator restarted
on the same file answers as the one before it did: ids, idempotent retries and replay refusals included.
"""
from __future__ import annotations

import json
import os
import tempfile

STATE_VERSION = 1


def save(path: str, data: dict) -> None:
    """Write `data` (plus the format version) to `path` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".emulator-state.", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": STATE_VERSION, **data}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(path: str) -> dict:
    """The document at `path`; ValueError when its version is not this one's (OSError if unreadable)."""
    with open(path) as fh:
        data = json.load(fh)
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported state version {data.get('version')!r}")
    return data
