"""A small container image built from this machine's own files, for tests, the lab and benchmarks.

No registry is needed: `/bin/busybox` (Debian's busybox-static) with links for the usual applets, plus
iperf3 and every library it links, are packed into a tar stream and `docker import`ed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

DEFAULT_IMAGE = "vpcnet-testbox:latest"
APPLETS = ("sh", "ip", "ping", "sleep", "nc", "wget", "cat", "echo", "ls", "true", "hostname", "ifconfig",
           "route", "arp", "grep", "awk", "sed", "ps", "kill", "date", "seq", "head", "tail", "wc", "nslookup",
           "timeout", "httpd", "tr", "od", "dd", "env", "mkdir", "sysctl", "uname")


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        for part in parts:
            if part.startswith("/"):
                libs.append(part)
    return libs


def build(docker: list[str] | None = None, name: str = DEFAULT_IMAGE, force: bool = False) -> str:
    """Build (or reuse) the image in the engine reached by `docker` (a command prefix)."""
    docker = docker or ["docker"]
    if not force and subprocess.run([*docker, "image", "inspect", name], capture_output=True).returncode == 0:
        return name
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise RuntimeError("busybox not found: apt-get install busybox-static")
    with tempfile.TemporaryDirectory(prefix="vpcnet-image-") as root:
        for d in ("bin", "usr/bin", "tmp", "etc", "proc", "sys", "dev"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        shutil.copy2(busybox, os.path.join(root, "bin/busybox"))
        for applet in APPLETS:
            os.symlink("busybox", os.path.join(root, "bin", applet))
        iperf3 = shutil.which("iperf3")
        if iperf3:
            shutil.copy2(iperf3, os.path.join(root, "usr/bin/iperf3"))
            for lib in _libraries(iperf3):
                dest = os.path.join(root, lib.lstrip("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy2(os.path.realpath(lib), dest)
        with open(os.path.join(root, "etc/passwd"), "w") as fh:
            fh.write("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
        with open(os.path.join(root, "etc/group"), "w") as fh:
            fh.write("root:x:0:\nnogroup:x:65534:\n")
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        subprocess.run([*docker, "import", "-c", "CMD [\"sh\"]", "-", name], stdin=tar.stdout, check=True,
                       capture_output=True, timeout=300)
        tar.stdout.close()
        tar.wait(timeout=60)
    return name
