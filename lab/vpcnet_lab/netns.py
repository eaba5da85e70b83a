"""Network namespaces and point-to-point links of the lab, and running things inside them.

Every link is created directly inside lab namespaces (`ip -n NS link add ... peer ... netns OTHER`), so
nothing ever appears in, or is changed in, the machine's own network namespace. A host's underlay link is
point-to-point: `192.168.240.(10+K)/32 peer 192.168.240.1` on the host side, `192.168.240.1/32 peer
192.168.240.(10+K)` on the router side, and the same in IPv6 (`fd00:192:168:240::(10+K)/128 peer
fd00:192:168:240::1`). Every packet between hosts therefore crosses the router, as in a
VPC, where every packet goes through the vRouter.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.error
import urllib.request
from typing import Any, Callable

from vpcnet.datapath.rtnl import CLONE_NEWNET, NETNS_DIR, setns


class LabError(Exception):
    """Something the lab could not build or remove; the message says what and why."""


def run(cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(cmd)}: no answer within {timeout:.0f}s") from None
    except OSError as exc:
        raise LabError(f"{' '.join(cmd)}: {exc}") from None
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def listed(prefix: str) -> list[str]:
    """Namespaces whose name starts with `prefix`."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def add(name: str) -> None:
    """Create the namespace (kept if it exists) with loopback up."""
    if not exists(name):
        run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete(name: str) -> None:
    """Kill what still runs in the namespace, then delete it (nothing if it is gone)."""
    if not exists(name):
        return
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "del", name], check=False)


def sysctl(name: str, key: str, value: str) -> None:
    run(["ip", "netns", "exec", name, "sysctl", "-qw", f"{key}={value}"])


def link_exists(name: str, ifname: str) -> bool:
    return run(["ip", "-n", name, "link", "show", ifname], check=False).returncode == 0


def p2p_link(router_ns: str, router_if: str, router_ip: str, host_ns: str, host_if: str, host_ip: str,
             mtu: int = 1500, router_ip6: str = "", host_ip6: str = "") -> None:
    """A veth pair router_ns:router_if <-> host_ns:host_if, addressed point to point, both ends up,
    and the host's default route via the router; with `router_ip6` and `host_ip6`, the same in IPv6
    (`/128 peer /128`, no duplicate address detection: both ends are known). Idempotent."""
    if not link_exists(router_ns, router_if):
        if link_exists(host_ns, host_if):
            run(["ip", "-n", host_ns, "link", "del", host_if], check=False)
        run(["ip", "-n", router_ns, "link", "add", router_if, "mtu", str(mtu), "type", "veth",
             "peer", "name", host_if, "mtu", str(mtu), "netns", host_ns])
    for ns, ifname, local, peer in ((router_ns, router_if, router_ip, host_ip),
                                    (host_ns, host_if, host_ip, router_ip)):
        run(["ip", "-n", ns, "addr", "replace", f"{local}/32", "peer", f"{peer}/32", "dev", ifname])
        run(["ip", "-n", ns, "link", "set", ifname, "up"])
    run(["ip", "-n", host_ns, "route", "replace", "default", "via", router_ip, "dev", host_if])
    if router_ip6 and host_ip6:
        for ns, ifname, local, peer in ((router_ns, router_if, router_ip6, host_ip6),
                                        (host_ns, host_if, host_ip6, router_ip6)):
            run(["ip", "-n", ns, "-6", "addr", "replace", f"{local}/128", "peer", f"{peer}/128", "dev", ifname,
                 "nodad"])
        # onlink: the /128 peer route comes only once the kernel has seen the veth's carrier (linkwatch, up to
        # a second later); without it the gateway was sometimes "No route to host"
        run(["ip", "-n", host_ns, "-6", "route", "replace", "default", "via", router_ip6, "dev", host_if, "onlink"])


def ip_d_link(name: str) -> str:
    return run(["ip", "-n", name, "-d", "link", "show"]).stdout


# -- doing things inside a namespace from this process -------------------------------------------

def call_in(name: str, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Run fn() in a fresh thread that has joined network namespace `name` (network namespaces are per
    thread), so its sockets live there; the rest of the process stays where it was."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(path(name), os.O_RDONLY)
            try:
                setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:   # handed back to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LabError(f"call in network namespace {name} did not finish within {timeout:.0f}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def http_json(name: str, method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    """One JSON HTTP request made from inside namespace `name`."""
    def request() -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        # No proxy, ever: the address is inside the lab.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise LabError(f"{method} {url}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise LabError(f"{method} {url}: {getattr(exc, 'reason', exc)}") from None
    return call_in(name, request, timeout=timeout + 5)
