"""Loading a tc (sched_cls) program with the bpf(2) syscall, through ctypes; attaching is
vpcnet.datapath.tc's job (netlink). Each load is counted by program name and outcome
(`vpcnet_bpf_program_loads_total`, vpcnet.observability.events)."""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

from vpcnet.errors import DataplaneError
from vpcnet.observability import events

# -- loading ------------------------------------------------------------------------------------------
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
SYS_BPF = {"x86_64": 321, "aarch64": 280}
LICENSE = b"Dual BSD/GPL\0"
_libc = ctypes.CDLL(None, use_errno=True)


def load(insns: bytes, name: str) -> int:
    """Load a tc (sched_cls) program; the file descriptor is the caller's to close. A refusal raises
    DataplaneError with the reason (and, for the verifier, the end of its log). Counted either way."""
    try:
        fd = _load(insns, name)
    except DataplaneError:
        events.bpf_program_load(name, ok=False)
        raise
    events.bpf_program_load(name, ok=True)
    return fd


def _load(insns: bytes, name: str) -> int:
    if sys.byteorder != "little":
        raise DataplaneError("vpcnet.mode=ebpf needs a little-endian machine")
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise DataplaneError(f"vpcnet.mode=ebpf does not know the bpf syscall on {platform.machine()}")
    # First without the verifier's log: asking for one makes the kernel format every step of the
    # verification, which costs more than the load itself. Only a refusal is loaded again, with the log,
    # to say why.
    fd, err = _prog_load(nr, insns, name, None)
    if fd >= 0:
        return fd
    log = ctypes.create_string_buffer(1 << 16)
    fd, err = _prog_load(nr, insns, name, log)
    if fd >= 0:              # refused once, accepted now (a transient failure): fine
        return fd
    verifier = log.value.decode(errors="replace").strip().splitlines()[-6:]
    hint = {errno.EPERM: "needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN)",
            errno.EINVAL: "this kernel refuses it (eBPF host routing needs Linux 5.10 or newer)",
            errno.ENOSYS: "this kernel has no bpf(2)"}.get(err, os.strerror(err))
    raise DataplaneError(f"cannot load eBPF program {name}: {hint}"
                         + (f"; verifier: {' | '.join(verifier)}" if verifier else ""))


def _prog_load(nr: int, insns: bytes, name: str, log) -> tuple[int, int]:
    """One BPF_PROG_LOAD (retried on EAGAIN, as the verifier asks); `log`: a buffer for the verifier's log
    (log level 1), or None for none. Returns (fd or -1, errno)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(LICENSE, len(LICENSE))
    attr = bytearray(128)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_SCHED_CLS, len(insns) // 8,
                     ctypes.addressof(code), ctypes.addressof(lic), 1 if log is not None else 0,
                     len(log) if log is not None else 0, ctypes.addressof(log) if log is not None else 0)
    attr[48:48 + 15] = name.encode()[:15].ljust(15, b"\0")
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    fd, err = -1, 0
    for _ in range(3):                                            # EAGAIN: the verifier asks to retry
        fd = _libc.syscall(nr, BPF_PROG_LOAD, buf, len(attr))
        err = ctypes.get_errno()
        if fd >= 0 or err != errno.EAGAIN:
            break
    return fd, err
