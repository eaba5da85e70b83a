"""Per-object locks shared by every thread and gunicorn worker of one host's plugin.

Docker may send two calls about one network at once (a retried CreateNetwork, a CreateEndpoint racing a
DeleteNetwork), and the periodic datapath pass touches the same kernel objects. A `flock` on a file in the
state dir serialises them across threads and processes alike (each `open` is its own open file
description, so two threads of one process exclude each other too). Objects map onto a fixed number of
lock files (stripes), so the state dir never fills up with them; two objects sharing a stripe only wait
for each other.
"""
from __future__ import annotations

import fcntl
import os
import zlib
from contextlib import contextmanager
from typing import Iterator

STRIPES = 64


@contextmanager
def object_lock(state_dir: str, key: str) -> Iterator[None]:
    folder = os.path.join(state_dir, "locks")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"{zlib.crc32(key.encode()) % STRIPES:02d}.lock")
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
