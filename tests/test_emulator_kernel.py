"""The emulator's router namespace: Available entries become kernel routes (proto 188) in a netns.

Needs root and `ip` (iproute2), checked through conftest.require (a missing one fails under
VPCNET_TEST_STRICT=1); makes a uniquely named namespace and always deletes it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from vpcnet_lab.emulator import Emulator, serve_in_thread
from vpcnet_lab.emulator.kernel import RTPROT_EMULATOR, KernelRouteError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # share the signed client (any import mode)
from conftest import is_root, require, wait_for  # noqa: E402
from test_emulator import TABLE, Client, assert_error  # noqa: E402

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def kernel_tools():
    # through require, not skipif: strict mode must turn a missing one into a failure
    require(is_root(), "needs root to create network namespaces")
    require(shutil.which("ip") is not None, "needs iproute2's `ip`")


def ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


@pytest.fixture
def router_ns():
    """A router namespace with a link to the underlay 192.168.77.0/24 (a veth pair inside it)."""
    name = f"vpcemu-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", "under0", "type", "veth", "peer", "name", "under1")
        ip("-n", name, "addr", "add", "192.168.77.1/24", "dev", "under0")
        ip("-n", name, "link", "set", "under0", "up")
        ip("-n", name, "link", "set", "under1", "up")
        yield name
    finally:
        ip("netns", "del", name, check=False)


def routes(ns: str) -> list[str]:
    return [" ".join(line.split()) for line in ip("-n", ns, "route").splitlines() if line.strip()]


def our_routes(ns: str) -> dict[str, str]:
    out = {}
    for line in ip("-n", ns, "route", "show", "proto", str(RTPROT_EMULATOR)).splitlines():
        words = line.split()
        if words and "via" in words:
            out[words[0]] = words[words.index("via") + 1]
    return out


def has_route(ns: str, dest: str, gateway: str) -> bool:
    return any(r.startswith(f"{dest} via {gateway} ") for r in routes(ns))


@pytest.fixture
def started(router_ns, tmp_path):
    """Start emulators on the router namespace; all are stopped at the end, even on failure."""
    made = []

    def start(**kwargs):
        kwargs.setdefault("router_netns", router_ns)
        emu = Emulator(**kwargs)
        url, stop = serve_in_thread(emu)
        made.append((emu, stop))
        return emu, Client(url)

    yield start
    for emu, stop in made:
        stop()
        emu.close()


def test_available_entries_become_kernel_routes(router_ns, started, tmp_path):
    # a route someone else installed must survive everything below
    ip("-n", router_ns, "route", "add", "10.99.0.0/24", "via", "192.168.77.3")
    emu, client = started(pending_delay=0.5, state_file=str(tmp_path / "emu.json"))
    emu.register_instance("i-host1", "192.168.77.2")
    emu.register_instance("i-host2", "192.168.77.3")

    entry = client.create("10.201.1.0/24")[1]["RouteEntryId"]
    assert not has_route(router_ns, "10.201.1.0/24", "192.168.77.2")      # still Pending
    assert wait_for(lambda: has_route(router_ns, "10.201.1.0/24", "192.168.77.2"), 10)
    assert "via 192.168.77.2" in ip("-n", router_ns, "route", "get", "10.201.1.77")   # packets follow it
    assert wait_for(lambda: client.create("10.201.2.0/24", hop="i-host2")[0] == 200, 10)
    assert wait_for(lambda: has_route(router_ns, "10.201.2.0/24", "192.168.77.3"), 10)

    # an instance that moves: the route is replaced, not duplicated
    emu.register_instance("i-host2", "192.168.77.4")
    assert wait_for(lambda: has_route(router_ns, "10.201.2.0/24", "192.168.77.4"), 10)
    assert [r for r in routes(router_ns) if r.startswith("10.201.2.0/24")] == \
        [r for r in routes(router_ns) if r.startswith("10.201.2.0/24 via 192.168.77.4")]
    assert len([r for r in routes(router_ns) if r.startswith("10.201.2.0/24")]) == 1

    # a hand-made entry whose destination already has a foreign kernel route: the foreign route stays
    emu.add_custom_entry("10.99.0.0/24", "i-host1", name="by-hand")
    emu.sync_kernel()
    assert has_route(router_ns, "10.99.0.0/24", "192.168.77.3")
    assert "10.99.0.0/24" not in our_routes(router_ns)

    # delete -> gone from the kernel too
    assert client.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId=entry)[0] == 200
    assert wait_for(lambda: "10.201.1.0/24" not in our_routes(router_ns), 10)
    assert has_route(router_ns, "10.201.2.0/24", "192.168.77.4")
    assert has_route(router_ns, "10.99.0.0/24", "192.168.77.3")


def test_restart_reconciles_kernel_routes(router_ns, started, tmp_path):
    state = str(tmp_path / "emu.json")
    emu, client = started(state_file=state)
    emu.register_instance("i-host1", "192.168.77.2")
    for i in range(3):
        assert client.create(f"10.202.{i}.0/24")[0] == 200
    assert wait_for(lambda: len(our_routes(router_ns)) == 3, 10)
    emu.close()

    # while the emulator is down: one of its routes vanishes, a stale one of its proto appears,
    # and a foreign route is added
    ip("-n", router_ns, "route", "del", "10.202.1.0/24")
    ip("-n", router_ns, "route", "add", "10.202.9.0/24", "via", "192.168.77.2", "proto", str(RTPROT_EMULATOR))
    ip("-n", router_ns, "route", "add", "10.203.0.0/24", "via", "192.168.77.2")
    emu2, client2 = started(state_file=state)      # reconciles in its constructor
    assert our_routes(router_ns) == {f"10.202.{i}.0/24": "192.168.77.2" for i in range(3)}
    assert has_route(router_ns, "10.203.0.0/24", "192.168.77.2")       # not ours: untouched

    # a kernel route removed by hand while running comes back on the next pass
    ip("-n", router_ns, "route", "del", "10.202.2.0/24")
    emu2.sync_kernel()
    assert "10.202.2.0/24" in our_routes(router_ns)

    # an instance that disappears takes its routes out of the kernel (the entries stay)
    emu2.deregister_instance("i-host1")
    assert wait_for(lambda: our_routes(router_ns) == {}, 10)
    assert len([e for e in client2.list() if e["Type"] == "Custom"]) == 3
    assert_error(client2.create("10.202.5.0/24"), 404, "InvalidInstanceId.NotFound")


def our_routes6(ns: str) -> dict[str, str]:
    out = {}
    for line in ip("-n", ns, "-6", "route", "show", "proto", str(RTPROT_EMULATOR)).splitlines():
        words = line.split()
        if words and "via" in words:
            out[words[0]] = words[words.index("via") + 1]
    return out


def test_ipv6_entries_route_via_the_instances_ipv6_underlay(router_ns, started, tmp_path):
    """IPv6 custom entries (DestinationCidrBlock takes both families) become IPv6 kernel routes in the router
    namespace, via the instance's IPv6 underlay address; IPv4 ones stay as they were."""
    ip("-n", router_ns, "addr", "add", "fd77::1/64", "dev", "under0", "nodad")
    state = str(tmp_path / "emu.json")
    emu, client = started(state_file=state)
    emu.register_instance("i-host1", "192.168.77.2", "fd77::2")
    emu.register_instance("i-host2", "192.168.77.3")                 # no IPv6 underlay
    assert client.create("10.205.1.0/24")[0] == 200
    assert client.create("fd00:1:2:0:1::/80")[0] == 200
    assert wait_for(lambda: our_routes6(router_ns) == {"fd00:1:2:0:1::/80": "fd77::2"}, 10)
    assert our_routes(router_ns) == {"10.205.1.0/24": "192.168.77.2"}
    assert "via fd77::2" in ip("-n", router_ns, "-6", "route", "get", "fd00:1:2:0:1::7")   # packets follow it
    listed = {e["DestinationCidrBlock"]: e for e in client.list()}
    assert listed["fd00:1:2:0:1::/80"]["IpVersion"] == "ipv6" and listed["10.205.1.0/24"]["IpVersion"] == "ipv4"
    assert [e["DestinationCidrBlock"] for e in client.list(IpVersion="IPv6")] == ["fd00:1:2:0:1::/80"]
    assert_error(client.create("fd00:1:2:0:1::/80", hop="i-host2"), 400, "InvalidCIDRBlock.Duplicate")
    assert_error(client.create("fd00:1:2:0:1::1/80"), 400, "InvalidCidrBlock.Malformed")
    # an instance without an IPv6 underlay: its IPv6 entry is listed, but has no kernel route
    assert client.create("fd00:1:2:0:2::/80", hop="i-host2")[0] == 200
    emu.sync_kernel()
    assert "fd00:1:2:0:2::/80" not in our_routes6(router_ns)

    # a restart keeps the IPv6 underlay; an IPv6 route removed by hand comes back
    emu.close()
    ip("-n", router_ns, "-6", "route", "del", "fd00:1:2:0:1::/80")
    emu2, client2 = started(state_file=state)
    assert our_routes6(router_ns) == {"fd00:1:2:0:1::/80": "fd77::2"}
    entry = next(e for e in client2.list() if e["DestinationCidrBlock"] == "fd00:1:2:0:1::/80")
    assert client2.call("DeleteRouteEntry", RouteTableId=TABLE, RouteEntryId=entry["RouteEntryId"])[0] == 200
    assert wait_for(lambda: our_routes6(router_ns) == {}, 10)
    assert our_routes(router_ns) == {"10.205.1.0/24": "192.168.77.2"}


def test_unreachable_gateway_is_reported_not_fatal(router_ns, started):
    emu, client = started()
    emu.register_instance("i-far", "172.31.0.9")       # no link to it in the router namespace
    assert client.create("10.204.0.0/24", hop="i-far")[0] == 200
    problems = emu.sync_kernel()
    assert problems and "10.204.0.0/24" in problems[0]
    assert "10.204.0.0/24" not in our_routes(router_ns)
    # the API keeps working
    assert [e["Status"] for e in client.list() if e["Type"] == "Custom"] == ["Available"]


def test_missing_namespace_is_a_clear_error():
    name = f"vpcemu-missing-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    with pytest.raises(KernelRouteError, match=name):
        Emulator(router_netns=name)
    assert time.monotonic() - started < 5
    assert not os.path.exists(f"/run/netns/{name}")


def test_each_route_table_in_its_own_kernel_table(router_ns):
    """With kernel_tables, each emulated table's routes go into its own kernel table and none into main:
    a router forwarding by the packet's vSwitch sees exactly that vSwitch's table."""
    emu = Emulator(router_netns=router_ns, kernel_tables={TABLE: 101, "vtb-zone2": 102})
    try:
        emu.add_route_table("vtb-zone2")
        emu.register_instance("i-a", "192.168.77.2")
        emu.register_instance("i-b", "192.168.77.3")
        emu.create_route_entry(TABLE, "10.70.1.0/24", "Instance", "i-a")
        emu.create_route_entry("vtb-zone2", "10.70.1.0/24", "Instance", "i-a")
        emu.create_route_entry("vtb-zone2", "10.70.2.0/24", "Instance", "i-b")

        def table(number):
            out = ip("-n", router_ns, "route", "show", "table", str(number), "proto", str(RTPROT_EMULATOR),
                     check=False)      # "FIB table does not exist" until the first route lands
            return sorted(" ".join(line.split()[:3]) for line in out.splitlines() if line.strip())

        assert wait_for(lambda: table(101) == ["10.70.1.0/24 via 192.168.77.2"], 5), table(101)
        assert wait_for(lambda: table(102) == ["10.70.1.0/24 via 192.168.77.2", "10.70.2.0/24 via 192.168.77.3"], 5)
        assert our_routes(router_ns) == {}                                  # nothing in main
        [entry] = [e for e in emu.entries("vtb-zone2") if e["DestinationCidrBlock"] == "10.70.1.0/24"]
        emu.remove_entry(entry["RouteEntryId"])
        assert wait_for(lambda: table(102) == ["10.70.2.0/24 via 192.168.77.3"], 5), table(102)
        assert table(101) == ["10.70.1.0/24 via 192.168.77.2"]             # the other table keeps it
    finally:
        emu.close()
        for number in (101, 102):
            ip("-n", router_ns, "route", "flush", "table", str(number), check=False)


def test_strict_mode_fails_these_tests_where_ip_is_missing(tmp_path):
    """What CI relies on: with VPCNET_TEST_STRICT=1 a missing requirement is a failure, never a skip."""
    here = os.path.abspath(__file__)
    env = dict(os.environ, VPCNET_TEST_STRICT="1", PATH=str(tmp_path))      # no `ip` on this PATH
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", here, "-k",
                           "restart_reconciles or missing_namespace"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(here)))
    assert "2 errors" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
    assert "required by VPCNET_TEST_STRICT=1: needs iproute2's `ip`" in proc.stdout, proc.stdout[-3000:]


def test_eni_prefixes_become_kernel_routes_to_their_instance(router_ns, started, tmp_path):
    """An assigned prefix is delivered to its instance: `prefix via <underlay>` in the router namespace (an
    IPv6 /80 via the instance's IPv6 underlay address); unassigning or releasing the instance takes it out."""
    from vpcnet_lab.emulator.enis import eni_id_of
    ip("-n", router_ns, "addr", "add", "fd77::1/64", "dev", "under0", "nodad")
    state = str(tmp_path / "emu.json")
    # the instances' vSwitch holds the reserved range (a VPC requires it; their underlay addresses, on the
    # router namespace's own link, stand outside it here)
    vswitch = ["10.77.0.0/16"]
    emu, client = started(state_file=state, vswitch_cidrs=vswitch)
    emu.register_instance("i-host1", "192.168.77.2", "fd77::2")
    emu.register_instance("i-host2", "192.168.77.3")
    emu.add_cidr_reservation("vsw-emu0001", "10.77.0.0/26")
    emu.set_vswitch_ipv6("vsw-emu0001", "fd00:77:1::/64")
    eni1, eni2 = eni_id_of("i-host1"), eni_id_of("i-host2")

    def ecs(action, **params):
        status, body = client.call(action, Version="2014-05-26", **params)
        assert status == 200, body
        return body

    ecs("AssignPrivateIpAddresses", NetworkInterfaceId=eni1, Ipv4PrefixCount=2)
    ecs("AssignPrivateIpAddresses", NetworkInterfaceId=eni2, Ipv4PrefixCount=1)
    ecs("AssignIpv6Addresses", NetworkInterfaceId=eni1, Ipv6PrefixCount=1)
    assert wait_for(lambda: our_routes(router_ns) == {"10.77.0.0/28": "192.168.77.2", "10.77.0.16/28": "192.168.77.2",
                                                      "10.77.0.32/28": "192.168.77.3"}, 10), routes(router_ns)
    assert wait_for(lambda: our_routes6(router_ns) == {"fd00:77:1::/80": "fd77::2"}, 10)
    assert "via 192.168.77.3" in ip("-n", router_ns, "route", "get", "10.77.0.40")     # packets follow it
    assert "via fd77::2" in ip("-n", router_ns, "-6", "route", "get", "fd00:77:1::1234")

    # a restart reconciles: a prefix route removed while it was down comes back
    emu.close()
    ip("-n", router_ns, "route", "del", "10.77.0.16/28")
    emu2, client = started(state_file=state, vswitch_cidrs=vswitch)
    assert our_routes(router_ns)["10.77.0.16/28"] == "192.168.77.2"

    status, body = client.call("UnassignPrivateIpAddresses", Version="2014-05-26", NetworkInterfaceId=eni1,
                               **{"Ipv4Prefix.1": "10.77.0.0/28"})
    assert status == 200, body
    status, body = client.call("UnassignIpv6Addresses", Version="2014-05-26", NetworkInterfaceId=eni1,
                               **{"Ipv6Prefix.1": "fd00:77:1::/80"})
    assert status == 200, body
    assert wait_for(lambda: "10.77.0.0/28" not in our_routes(router_ns) and our_routes6(router_ns) == {}, 10)
    emu2.deregister_instance("i-host2")
    assert wait_for(lambda: our_routes(router_ns) == {"10.77.0.16/28": "192.168.77.2"}, 10), routes(router_ns)
