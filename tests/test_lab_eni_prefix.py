"""The lab in eni-prefix addressing: `vpcnet lab up --addressing eni-prefix` (docs/eni-prefix.md, docs/lab.md).

The emulator holds a vSwitch reserved range of type Prefix (the lab's cluster CIDR) and the vSwitch's IPv6
CIDR; every host is registered with its instance type and primary ENI, and its `vpcnet serve` runs with
VPCNET_ADDRESSING=eni-prefix and that ENI. The first test drives the ECS API itself, with each host's own
settings from inside that host's namespace, the way a host's plugin does: prefixes appear on the right ENI
and as kernel routes via the right host in the router namespace, and never as route-table entries. The
second one is the whole path through the plugins (containers on two hosts ping each other); the last one is
that path over IPv6 (`lab up --addressing eni-prefix --ipv6`: each container's /128 from its host's /80).

Needs what tests/test_lab.py needs; refuses to run next to a lab that is already up; the lab is always
taken down. Run under `flock /tmp/vpclab.lock` on a shared machine.
"""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time

import pytest
from conftest import run, wait_for
from test_lab import Box, _require_lab_prerequisites, vpcnet_cli

pytestmark = pytest.mark.docker

# reserved ranges: inside the lab vSwitch (192.168.240.0/22), beside the hosts' 192.168.240.0/24
RANGE = "192.168.242.0/23"
PING_RANGE = "192.168.241.0/24"
RANGE6 = "fd00:10:246::/64"

# Run inside a host's network namespace with that host's plugin settings: what its ECS client sees and does.
PROBE = """
import json, os, sys
from vpcnet.cloud.prefixes import make_prefix_provider
from vpcnet.config import load

action, token = sys.argv[1], sys.argv[2]
provider = make_prefix_provider(load(environ=dict(os.environ), check_socket_dir=False))
try:
    if action == "assign":
        out = {"interface": provider.interface_id(), "ranges": provider.reserved_ranges(4),
               "capacity": provider.capacity().ipv4_prefixes,
               "ipv4": provider.assign(4, 1, token + "-4"), "ipv6": provider.assign(6, 1, token + "-6")}
    else:
        out = {}
        for version, prefixes in ((4, sys.argv[3].split(",")), (6, sys.argv[4].split(","))):
            provider.unassign(version, prefixes)
    held = provider.describe()
    out["held4"], out["held6"] = list(held.ipv4), list(held.ipv6)
finally:
    provider.close()
print(json.dumps(out))
"""


def probe(lab, k: int, *args: str) -> dict:
    """PROBE run as host k: in its network namespace, with its plugin's settings (its credentials, ENI)."""
    env = lab.host(k).plugin_env(lab.plugin_settings(k))
    proc = run(["ip", "netns", "exec", lab.host_netns(k), sys.executable, "-c", PROBE, *args],
               check=False, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def plugin_environ(lab, k: int) -> dict[str, str]:
    """The environment host k's running `vpcnet serve` got."""
    pid = lab.host(k).plugin_pid()
    assert pid, f"h{k}: no plugin"
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return dict(item.decode().partition("=")[::2] for item in fh.read().split(b"\0") if item)


def custom_entries(lab) -> list[dict]:
    return [e for e in lab.routes() if e["Type"] == "Custom"]


def routed_via(lab, prefix: str, via: str) -> bool:
    family = 6 if ":" in prefix else 4
    return any(line.startswith(f"{prefix} via {via} ") for line in lab.kernel_routes(family=family))


def test_an_eni_prefix_lab_assigns_prefixes_per_host_routes_them_to_it_and_writes_no_route_entry(request):
    _require_lab_prerequisites()
    from vpcnet_lab import Lab
    from vpcnet_lab.emulator.enis import eni_id_of
    from vpcnet_lab.lab import LAB_VSWITCH, instance_id

    # no network: the plugins' eni-prefix IPAM is another piece; this is the lab and the emulated VPC
    lab = Lab(hosts=2, cluster_cidr=RANGE, cluster_cidr_v6=RANGE6, addressing="eni-prefix",
              instance_type="ecs.g7.xlarge", network="", load_image=False, reconcile_interval=1.0)
    request.addfinalizer(lambda: lab.down())
    lab.up()

    # each host's plugin runs in eni-prefix mode against the emulator's ECS API, on its own primary ENI
    for k in (1, 2):
        env = plugin_environ(lab, k)
        assert env["VPCNET_ADDRESSING"] == "eni-prefix" and env["VPCNET_PROVIDER"] == "aliyun"
        assert env["VPCNET_ALIYUN_ECS_ENDPOINT"] == lab.emulator_url
        assert env["VPCNET_ALIYUN_NETWORK_INTERFACE_ID"] == eni_id_of(instance_id(k))
        assert env["VPCNET_CLUSTER_CIDR"] == RANGE and env["VPCNET_CLUSTER_CIDR_V6"] == RANGE6
        eni = lab.interface(k)
        assert eni["id"] == eni_id_of(instance_id(k)) and eni["vswitch"] == LAB_VSWITCH, eni

    # each host asks for one prefix per family through the ECS API, as itself
    got = {k: probe(lab, k, "assign", f"lab-test-h{k}") for k in (1, 2)}
    for k, answer in got.items():
        assert answer["interface"] == eni_id_of(instance_id(k))
        assert answer["ranges"] == [RANGE]              # the vSwitch's reserved range of type Prefix
        assert answer["capacity"] == 14                 # ecs.g7.xlarge: 15 slots, one the primary address
        [p4], [p6] = answer["ipv4"], answer["ipv6"]
        assert ipaddress.ip_network(p4).subnet_of(ipaddress.ip_network(RANGE)) and p4.endswith("/28")
        assert ipaddress.ip_network(p6).subnet_of(ipaddress.ip_network(RANGE6)) and p6.endswith("/80")
        assert p4 in answer["held4"] and p6 in answer["held6"]
        assert p4 in lab.interface(k)["ipv4_prefixes"] and p6 in lab.interface(k)["ipv6_prefixes"]
    assert not set(got[1]["held4"]) & set(got[2]["held4"])
    assert not set(got[1]["held6"]) & set(got[2]["held6"])

    # the router delivers each prefix to its host: one kernel route per prefix, via that host's underlay
    for k, answer in got.items():
        for p, via in ((answer["ipv4"][0], lab.host_ip(k)), (answer["ipv6"][0], lab.host_ip6(k))):
            assert wait_for(lambda p=p, via=via: routed_via(lab, p, via), 10, 0.2), (p, lab.kernel_routes(),
                                                                                   lab.kernel_routes(family=6))

    # status shows the mode and each host's prefixes
    status = lab.status()
    assert status["up"] and status["addressing"] == "eni-prefix", status
    for k, h in zip((1, 2), status["hosts"], strict=True):
        assert got[k]["ipv4"][0] in h["prefixes"] and got[k]["ipv6"][0] in h["prefixes6"], h
        assert h["network_interface_id"] == eni_id_of(instance_id(k))
    shown = vpcnet_cli("lab", "status")
    assert shown.returncode == 0, shown.stderr
    assert "eni-prefix addressing" in shown.stdout and got[2]["ipv4"][0] in shown.stdout, shown.stdout

    # given back: the router forgets it
    released = probe(lab, 1, "release", "-", got[1]["ipv4"][0], got[1]["ipv6"][0])
    assert got[1]["ipv4"][0] not in released["held4"] and got[1]["ipv6"][0] not in released["held6"]
    assert wait_for(lambda: not routed_via(lab, got[1]["ipv4"][0], lab.host_ip(1))
                    and not routed_via(lab, got[1]["ipv6"][0], lab.host_ip6(1)), 10, 0.2)
    assert routed_via(lab, got[2]["ipv4"][0], lab.host_ip(2))

    # a prefix is never a route entry: the VPC (the emulator) delivers it without one
    every = {p for answer in got.values() for p in answer["ipv4"] + answer["ipv6"]}
    assert not [e for e in lab.routes() if e["DestinationCidrBlock"] in every]

    assert lab.down() == []
    assert not any(Lab.leftovers().values()), Lab.leftovers()


def test_plugins_in_eni_prefix_mode_write_no_route_entry(request):
    _require_lab_prerequisites()
    from vpcnet_lab import Lab

    lab = Lab(hosts=1, cluster_cidr=RANGE, addressing="eni-prefix", network="", load_image=False,
              reconcile_interval=1.0)
    request.addfinalizer(lambda: lab.down())
    lab.up()
    time.sleep(4.0)                                   # a few of the plugin's passes
    assert lab.host(1).plugin_pid(), "the plugin runs"
    assert custom_entries(lab) == [], "eni-prefix addressing writes no route entry"


def test_the_lab_refuses_what_eni_prefix_addressing_cannot_do():
    from vpcnet_lab import Lab
    from vpcnet_lab.netns import LabError

    with pytest.raises(LabError, match="one zone"):
        Lab(hosts=2, zones=2, addressing="eni-prefix")
    with pytest.raises(LabError, match="bridge"):
        Lab(mode="bridge", addressing="eni-prefix")
    with pytest.raises(LabError, match="/28"):
        Lab(cluster_cidr="192.168.242.0/29", addressing="eni-prefix")
    # a VPC reserves a range only inside the vSwitch, and the hosts' addresses are not in it
    for outside in ("10.246.0.0/20", "192.168.240.0/23", "192.168.240.128/26"):
        with pytest.raises(LabError, match="inside the lab vSwitch 192.168.240.0/22"):
            Lab(cluster_cidr=outside, addressing="eni-prefix")
    refused = vpcnet_cli("lab", "up", "--addressing", "eni-prefix", "--cluster-cidr", "10.246.0.0/20")
    assert refused.returncode == 1 and "inside the lab vSwitch" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and "vpcnet lab down" not in refused.stderr     # nothing was made
    assert Lab(addressing="eni-prefix").cluster_cidr == "192.168.242.0/23"       # the default range
    assert Lab().cluster_cidr == "10.240.0.0/16"
    with pytest.raises(LabError, match="instance-type"):
        Lab(addressing="eni-prefix", instance_type="ecs.nosuch.large")
    with pytest.raises(LabError, match="addressing"):
        Lab(addressing="eni")


def two_hosts_with_a_box_each(request, **lab_settings) -> tuple:
    """A two-host lab in eni-prefix addressing on PING_RANGE and a container on each host, both removed (and
    the lab taken down) when the test ends, also on failure."""
    _require_lab_prerequisites()
    from vpcnet_lab import Lab

    lab = Lab(hosts=2, cluster_cidr=PING_RANGE, addressing="eni-prefix", reconcile_interval=2.0, **lab_settings)
    request.addfinalizer(lambda: lab.down())
    lab.up()
    boxes: list[Box] = []
    request.addfinalizer(lambda: [b.remove() for b in boxes])
    boxes += [Box(lab, 1), Box(lab, 2)]
    return lab, boxes[0], boxes[1]


def test_containers_on_two_eni_prefix_hosts_reach_each_other_unencapsulated_with_their_own_addresses(request):
    """IPv4 only (the dual-stack test is the last one of the file)."""
    lab, a, b = two_hosts_with_a_box_each(request)
    assert custom_entries(lab) == [], "eni-prefix addressing writes no route entry"

    # each container's address is in a prefix of its own host's ENI, with the range's prefix length
    for box in (a, b):
        prefixes = lab.interface(box.host)["ipv4_prefixes"]
        assert any(ipaddress.ip_address(box.ip) in ipaddress.ip_network(p) for p in prefixes), (box.ip, prefixes)
        length = lab.docker(box.host, "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPPrefixLen}}{{end}}",
                            box.name).stdout.strip()
        assert length == PING_RANGE.split("/")[1]
        for p in prefixes:
            assert wait_for(lambda p=p, k=box.host: routed_via(lab, p, lab.host_ip(k)), 10, 0.2), p

    # the router sees the containers' own addresses, unencapsulated, on its link to h2
    dump = subprocess.Popen(
        ["ip", "netns", "exec", lab.router_netns, "timeout", "20", "tcpdump", "-lnni", "to-h2", "-c", "2",
         f"icmp and host {a.ip} and host {b.ip}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1.0)                                            # tcpdump attaching
        assert wait_for(lambda: a.pings(b.ip), 20, 0.5), f"{a.ip} -> {b.ip}"
        assert b.pings(a.ip), f"{b.ip} -> {a.ip}"
        out, _ = dump.communicate(timeout=30)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait(timeout=10)
    assert f"{a.ip} > {b.ip}: ICMP echo request" in out, out
    assert custom_entries(lab) == []


PING_RANGE6 = "fd00:10:247::/64"


def test_dual_stack_containers_on_two_eni_prefix_hosts_reach_each_other_over_ipv6_with_their_own_addresses(request):
    """`lab up --addressing eni-prefix --ipv6`: vpc0 is dual-stack; each container's IPv6 address is a /128 of
    its own host's /80, and the two reach each other both ways (ping6, TCP) with their own IPv6 source
    addresses, through the router's kernel route per prefix and no route-table entry."""
    from test_lab import ipv6_of, peer6_of

    lab, a, b = two_hosts_with_a_box_each(request, cluster_cidr_v6=PING_RANGE6, ipv6=True)
    addr6 = {box.host: ipv6_of(lab, box.host, box.name, lab.network) for box in (a, b)}

    # each container's IPv6 address is in its own host's /80, and that /80 is routed to the host
    for box in (a, b):
        prefixes = lab.interface(box.host)["ipv6_prefixes"]
        assert any(ipaddress.IPv6Address(addr6[box.host]) in ipaddress.IPv6Network(p) for p in prefixes), (
            addr6[box.host], prefixes)
        for p in prefixes:
            assert ipaddress.IPv6Network(p).subnet_of(ipaddress.IPv6Network(PING_RANGE6)) and p.endswith("/80")
            assert wait_for(lambda p=p, k=box.host: routed_via(lab, p, lab.host_ip6(k)), 10, 0.2), p
    assert addr6[1] != addr6[2]

    # ping6 both ways; the router forwards the containers' own addresses, unencapsulated, to h2
    dump = subprocess.Popen(
        ["ip", "netns", "exec", lab.router_netns, "timeout", "20", "tcpdump", "-lnni", "to-h2", "-c", "2",
         f"ip6 and host {addr6[1]} and host {addr6[2]}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        time.sleep(1.0)                                            # tcpdump attaching
        assert wait_for(lambda: a.sh("ping", "-6", "-c1", "-W2", addr6[2], check=False).returncode == 0, 20, 0.5), (
            f"{addr6[1]} -> {addr6[2]}")
        out, _ = dump.communicate(timeout=30)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait(timeout=10)
    assert f"IP6 {addr6[1]} > {addr6[2]}: ICMP6, echo request" in out, out
    assert f"IP6 {addr6[2]} > {addr6[1]}: ICMP6, echo reply" in out, out
    assert b.sh("ping", "-6", "-c1", "-W2", addr6[1], check=False).returncode == 0, f"{addr6[2]} -> {addr6[1]}"

    # TCP over IPv6 both ways: each server sees the other container's own address
    for server, client, port in ((b, a, 7006), (a, b, 7007)):
        server.sh("sh", "-c", f"nc -ll -p {port} -e cat /proc/net/tcp6 >/dev/null 2>&1 &")
        seen = ""
        for _ in range(10):
            seen = peer6_of(client.sh("sh", "-c", f"nc -w 3 {addr6[server.host]} {port} </dev/null",
                                      check=False).stdout, port)
            if seen:
                break
            time.sleep(0.5)
        assert seen == addr6[client.host], (server.host, seen)
    assert a.pings(b.ip), "IPv4 beside it"
    assert custom_entries(lab) == [], "eni-prefix addressing writes no route entry"
