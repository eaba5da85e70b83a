"""Access to one network namespace's kernel: this thread's netlink sockets (pyroute2's and vpcnet.datapath.rtnl's
raw one), sysctls, and the few lookups every applier needs (a link by name, the uplinks, a link's removal).

Sockets are opened once per thread and process (opening one costs more than the request itself) and
dropped after any failure that may have put them out of step.

Sysctls are read and written under /proc/sys (`sysctl_path`), except in a managed plugin: Docker mounts
its /proc/sys read-only, and plugin/config.json binds the host's /proc/sys/net read-write at `HOST_SYS_NET`
(the plugin shares the host's network namespace, and /proc/sys/net shows the namespace of the process that
opens it), so there the `net.*` ones are written through that mount: the links' IPv6 settings, which the
kernel takes nowhere else (netlink refuses IPv6 devconf), and IPv6 forwarding.
"""
from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

from pyroute2 import IPRoute, NetlinkError

from vpcnet.datapath import rtnl
from vpcnet.datapath.spec import DEFAULT_MTU
from vpcnet.errors import DataplaneError

PROC_SYS_NET = "/proc/sys/net"
HOST_SYS_NET = "/run/vpcnet/host-sys-net"    # the managed plugin's mount of the host's /proc/sys/net


def sys_net_root(proc: str = PROC_SYS_NET, mount: str = HOST_SYS_NET) -> str:
    """Where the `net.*` sysctls are written: /proc/sys/net, or the managed plugin's rw mount of it when
    /proc/sys is read-only here and the mount is present (plugin/config.json, plugin/genconfig.py)."""
    probe = "ipv4/ip_forward"       # a file (sysctl directories refuse W_OK even to root), always there
    if os.access(os.path.join(proc, probe), os.W_OK) or not os.access(os.path.join(mount, probe), os.W_OK):
        return proc
    return mount


def sysctl_path(key: str) -> str:
    """The file of a sysctl ("net.ipv6.conf.all.forwarding"): `net.*` ones under `sys_net_root()`."""
    path = key.replace(".", "/")
    if path.startswith("net/"):
        return sys_net_root() + path[3:]
    return "/proc/sys/" + path


class Netlink:
    def __init__(self, netns: str | None = None, extra_uplinks: Sequence[str] = ()):
        self.netns = netns
        self.extra_uplinks = tuple(extra_uplinks)     # VPCNET_UPLINKS: uplinks besides the default route's
        self._local = threading.local()

    @contextmanager
    def ipr(self) -> Iterator[IPRoute]:
        """This thread's pyroute2 socket."""
        ipr = getattr(self._local, "ipr", None)
        if ipr is None or self._local.pid != os.getpid():
            ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
            self._local.ipr, self._local.pid = ipr, os.getpid()
        try:
            yield ipr
        except NetlinkError:
            raise                               # the kernel said no; the socket is fine
        except BaseException:
            self._local.ipr = None              # anything else may have broken it: open a new one next time
            try:
                ipr.close()
            except Exception:
                pass
            raise

    def rtnl(self):
        """This thread's raw rtnetlink socket (vpcnet.datapath.rtnl), for what pyroute2 has no call for."""
        sock = getattr(self._local, "rtnl", None)
        if sock is None or self._local.rtnl_pid != os.getpid():
            sock = rtnl.open_socket(self.netns)
            self._local.rtnl, self._local.rtnl_pid = sock, os.getpid()
        return sock

    def drop_rtnl(self) -> None:
        """Close and forget this thread's rtnetlink socket (after a failure it may be out of step)."""
        sock, self._local.rtnl = getattr(self._local, "rtnl", None), None
        if sock is not None:
            sock.close()

    def cmd(self, *args: str) -> list[str]:
        """A command line run inside the namespace."""
        return (["ip", "netns", "exec", self.netns] if self.netns else []) + list(args)

    def read_sysctl(self, key: str) -> str:
        """A sysctl of this namespace (under /proc/sys)."""
        def read() -> str:
            with open(sysctl_path(key)) as fh:
                return fh.read().strip()

        try:
            return rtnl.in_netns(self.netns, read)
        except OSError as exc:
            raise DataplaneError(f"cannot read {key}: {exc}") from None

    def sysctl(self, key: str, value: str) -> str:
        """Set a sysctl of this namespace (under /proc/sys) unless it already holds `value`; returns the value
        it held."""
        def write() -> str:
            path = sysctl_path(key)
            with open(path) as fh:
                old = fh.read().strip()
            if old != value:
                with open(path, "w") as fh:
                    fh.write(value)
            return old

        try:
            return rtnl.in_netns(self.netns, write)
        except OSError as exc:
            raise DataplaneError(f"cannot set {key}={value}: {exc}") from None

    def link_sysctls(self, names: Sequence[str], wanted: Sequence[tuple[str, str]], fresh: bool = False) -> list[str]:
        """Set each of `wanted` ((key, value), e.g. ("ipv6/accept_ra", "0")) under /proc/sys/net/<key's
        family>/conf/<name>/ of every link in `names` where it differs; returns what differed ("<name>
        accept_ra=1"). `fresh` (links just made): written without reading first, nothing returned. A link
        or family the kernel has not (gone, or no IPv6) is skipped. Raises OSError when /proc/sys cannot
        be written (read-only, as in a managed plugin without the `HOST_SYS_NET` mount)."""
        def write() -> list[str]:
            changed = []
            root = sys_net_root()
            for name in names:
                for key, value in wanted:
                    family, _, leaf = key.partition("/")
                    path = f"{root}/{family}/conf/{name}/{leaf}"
                    try:
                        if not fresh:
                            with open(path, "rb") as fh:
                                old = fh.read().decode().strip()
                            if old == value:
                                continue
                            changed.append(f"{name} {leaf}={old}")
                        fd = os.open(path, os.O_WRONLY)
                        try:
                            os.write(fd, value.encode())
                        finally:
                            os.close(fd)
                    except OSError as exc:
                        if exc.errno not in (errno.ENOENT, errno.ENODEV):
                            raise
                        break              # this link is gone, or the kernel has no such family
            return changed

        return rtnl.in_netns(self.netns, write)

    def index_of(self, ipr: IPRoute, name: str) -> int | None:
        """link_index over the raw socket (vpcnet.datapath.rtnl: a fraction of pyroute2's cost per call, which
        counts on CreateEndpoint's path); pyroute2's where the raw socket fails."""
        try:
            return rtnl.link_index(self.rtnl(), name)
        except OSError:
            self.drop_rtnl()
            return self.link_index(ipr, name)

    @staticmethod
    def link_index(ipr: IPRoute, name: str) -> int | None:
        # A targeted RTM_GETLINK by name: link_lookup() would dump every link, which grows with the
        # number of endpoints on the host.
        try:
            return ipr.link("get", ifname=name)[0]["index"]
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise

    @staticmethod
    def link_name(ipr: IPRoute, index: int) -> str | None:
        try:
            return ipr.link("get", index=index)[0].get_attr("IFLA_IFNAME")
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise

    @staticmethod
    def uplinks(ipr: IPRoute) -> list[int]:
        """Indexes of the devices carrying the default route (main table), in route order."""
        out: list[int] = []
        for route in ipr.route("dump", table=254, family=2):
            if route.get("dst_len") == 0:
                hops = [route.get("RTA_OIF")] + [hop["oif"] for hop in route.get("RTA_MULTIPATH") or []]
                out += [index for index in hops if index and index not in out]
        return out

    def all_uplinks(self, ipr: IPRoute) -> list[int]:
        """`uplinks`, then the indexes of the configured extra uplinks that exist (VPCNET_UPLINKS). Read with
        the raw route dump (vpcnet.datapath.rtnl): every ebpf endpoint's program asks, and pyroute2's parse
        of a table holding a /32 and a /128 per container cost ~10 ms at 60 containers, the raw one a
        fraction of it; pyroute2's where the raw socket fails."""
        try:
            out = rtnl.dump_routes(self.rtnl())[1]
        except OSError:
            self.drop_rtnl()
            out = self.uplinks(ipr)
        for name in self.extra_uplinks:
            index = self.link_index(ipr, name)
            if index is not None and index not in out:
                out.append(index)
        return out

    def uplink_mtu(self) -> int:
        """MTU of the interface carrying the default route (the VPC link), 1500 without one."""
        with self.ipr() as ipr:
            for index in self.uplinks(ipr):
                links = ipr.link("get", index=index)
                return int(links[0].get("IFLA_MTU") or DEFAULT_MTU)
        return DEFAULT_MTU

    def delete_link(self, name: str) -> None:
        """Delete a link if it exists (a veth's peer goes with it, wherever it is)."""
        with self.ipr() as ipr:
            idx = self.index_of(ipr, name)
            if idx is None:
                return
            try:                        # the raw socket; pyroute2's, and its error, where that fails
                rtnl.delete_link(self.rtnl(), idx)
                return
            except OSError:
                self.drop_rtnl()
            try:
                ipr.link("del", index=idx)
            except NetlinkError as exc:
                if exc.code not in (errno.ENODEV, errno.ENOENT):
                    raise DataplaneError(f"cannot delete {name}: {exc}") from None
