"""`vpcnet doctor` against a real `vpcnet serve`: a healthy host answers exit 0, then one fault at a time
is made for real and doctor names exactly that fault (and its fix), and is green again once the fault is
undone. Kernel faults (the FORWARD jump and policy, ip_forward, a stale veth) are made in a network
namespace of the test's own, where its plugin runs; cloud faults (the route deleted, the cloud
unreachable) against the real emulator on 127.0.0.1."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
from conftest import run, unique, wait_for
from test_plugin_cloud import ME, TABLE, cloud_env, mine

POOL_REQUEST = {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "", "Options": {}, "V6": False}


def doctor(plugin, netns: str | None = None, **env: str) -> tuple[int, dict[str, list[dict]]]:
    """Run `vpcnet doctor --json` as an operator would (same configuration as the plugin); returns the
    exit code and the problems by check name."""
    prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "vpcnet.cli", "doctor", "--json"],
                          env={**plugin.env, **env}, capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    problems: dict[str, list[dict]] = {}
    for finding in report["findings"]:
        if not finding["ok"]:
            problems.setdefault(finding["check"], []).append(finding)
    assert report["ok"] == (proc.returncode == 0) == (not problems), (proc.returncode, report, proc.stderr)
    return proc.returncode, problems


def only(problems: dict, check: str) -> dict:
    assert set(problems) == {check}, problems
    [finding] = problems[check]
    assert finding["fix"], finding
    return finding


def test_doctor_text_output_names_problem_and_fix(plugin_factory):
    plugin = plugin_factory({"VPCNET_METRICS_ADDR": ""})
    proc = run([sys.executable, "-m", "vpcnet.cli", "doctor", "--docker-socket", "/nonexistent.sock"],
               env=plugin.env, check=False)
    assert proc.returncode == 1
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM")]
    assert line.startswith("PROBLEM docker: the Docker engine at /nonexistent.sock does not answer")
    assert "; fix: start Docker" in line
    assert proc.stdout.splitlines()[-1].startswith("vpcnet doctor: 1 problem(s)")


def test_kernel_faults_are_named_one_at_a_time(plugin_factory, netns_factory, docker_engine):
    ns = netns_factory("vpdoc")
    # as after a boot: forwarding off; vpcnet turns it on and FORWARD's policy to DROP
    run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=0"])
    plugin = plugin_factory(netns=ns)
    status, pool = plugin.call("/IpamDriver.RequestPool", POOL_REQUEST)
    assert status == 200, pool
    nid, eid = unique("d0c7") + "0" * 54, unique("e0c7") + "1" * 54
    status, answer = plugin.call("/NetworkDriver.CreateNetwork", {         # a bridge to hang a stale veth on
        "NetworkID": nid, "Options": {"com.docker.network.generic": {"vpcnet.mode": "bridge"}}, "IPv6Data": [],
        "IPv4Data": [{"AddressSpace": "vpcnet-local", "Pool": pool["Pool"],
                      "Gateway": pool["Data"]["com.docker.network.gateway"]}]})
    assert status == 200, answer
    address = plugin.call("/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": ""})[1]["Address"]
    assert plugin.call("/NetworkDriver.CreateEndpoint", {"NetworkID": nid, "EndpointID": eid,
                                                          "Interface": {"Address": address}})[0] == 200
    ip = ["ip", "netns", "exec", ns]

    assert doctor(plugin, ns) == (0, {}), "a healthy host"

    run([*ip, "iptables", "-D", "FORWARD", "-j", "VPCNET-FORWARD"])
    finding = only(doctor(plugin, ns)[1], "forward_chain")
    assert "no jump to VPCNET-FORWARD" in finding["detail"] and "iptables -I FORWARD 1" in finding["fix"]
    run([*ip, "iptables", "-I", "FORWARD", "1", "-j", "VPCNET-FORWARD"])
    # a rule that drops before vpcnet's jump is named; one that only sees another interface is not
    run([*ip, "iptables", "-I", "FORWARD", "1", "-o", "docker0", "-j", "DROP"])
    assert doctor(plugin, ns) == (0, {})
    run([*ip, "iptables", "-I", "FORWARD", "1", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])
    assert "FORWARD rule 1" in only(doctor(plugin, ns)[1], "forward_chain")["detail"]
    run([*ip, "iptables", "-D", "FORWARD", "1"])
    run([*ip, "iptables", "-D", "FORWARD", "1"])
    assert doctor(plugin, ns) == (0, {})

    # the isolation chains name this host's uplinks; a stale uplink there (the default route moved) is named
    run([*ip, "iptables", "-I", "VPCNET-EGRESS", "4", "-o", "eth9", "-j", "ACCEPT"])
    assert "VPCNET-EGRESS does not match this host's uplinks" in only(doctor(plugin, ns)[1], "isolation")["detail"]
    run([*ip, "iptables", "-D", "VPCNET-EGRESS", "-o", "eth9", "-j", "ACCEPT"])
    assert doctor(plugin, ns) == (0, {})

    run([*ip, "iptables", "-P", "FORWARD", "ACCEPT"])             # forwarding everything between interfaces
    assert "iptables -P FORWARD DROP" in only(doctor(plugin, ns)[1], "forward_policy")["fix"]
    run([*ip, "iptables", "-P", "FORWARD", "DROP"])
    assert doctor(plugin, ns) == (0, {})

    run([*ip, "sysctl", "-qw", "net.ipv4.ip_forward=0"])       # this namespace's only, never the machine's
    assert "sysctl -w net.ipv4.ip_forward=1" in only(doctor(plugin, ns)[1], "ip_forward")["fix"]
    run([*ip, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    assert doctor(plugin, ns) == (0, {})

    # a published port: its DNAT rule deleted by hand, or the jump to vpcnet's DNAT chain, is named
    status, answer = plugin.call("/NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": nid, "EndpointID": eid, "Options": {"com.docker.network.portmap": [
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 18080, "HostPortEnd": 18080}]}})
    assert status == 200, answer
    assert doctor(plugin, ns) == (0, {})
    chain = f"VPCNET-P-{nid[:12]}"
    dnat = shlex.split(run([*ip, "iptables", "-t", "nat", "-S", chain]).stdout.splitlines()[1])[2:]
    run([*ip, "iptables", "-t", "nat", "-D", chain, *dnat])
    finding = only(doctor(plugin, ns)[1], "firewall")
    assert f"nat chain {chain} does not hold its published ports (0.0.0.0:18080->" in finding["detail"], finding
    run([*ip, "iptables", "-t", "nat", "-A", chain, *dnat])
    jump = ["OUTPUT", "!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "VPCNET-DNAT"]
    run([*ip, "iptables", "-t", "nat", "-D", *jump])
    assert "no jump from nat OUTPUT to VPCNET-DNAT" in only(doctor(plugin, ns)[1], "firewall")["detail"]
    run([*ip, "iptables", "-t", "nat", "-A", *jump])
    assert doctor(plugin, ns) == (0, {})

    stale = "vh" + unique("")[:6] + "stal"
    bridge = "vpc-" + nid[:11]
    run(["ip", "-n", ns, "link", "add", stale, "type", "veth", "peer", "name", "vc" + stale[2:]])
    run(["ip", "-n", ns, "link", "set", stale, "master", bridge])
    finding = only(doctor(plugin, ns)[1], "stale_veth")
    assert stale in finding["detail"] and finding["fix"] == f"ip link del {stale}"
    run(["ip", "-n", ns, "link", "del", stale])
    assert doctor(plugin, ns) == (0, {})


def test_cloud_faults_are_named_one_at_a_time(plugin_factory, docker_engine):
    from test_plugin_cloud import KEY_ID, REGION, SECRET, VPC

    from vpcnet_lab.emulator import Emulator, serve_in_thread

    emu = Emulator(region=REGION, vpc_id=VPC, route_table_id=TABLE, credentials={KEY_ID: SECRET}, seed=3)
    emu.register_instance(ME, "192.168.0.10")
    url, stop = serve_in_thread(emu)
    try:
        plugin = plugin_factory(cloud_env(url, VPCNET_RECONCILE_INTERVAL="600"))
        assert wait_for(lambda: [e for e in mine(emu) if e["Status"] == "Available"], 15), plugin.log()
        plugin.metrics_url()
        assert doctor(plugin) == (0, {}), "a healthy host"

        [entry] = mine(emu)
        assert emu.remove_entry(entry["RouteEntryId"])            # deleted behind vpcnet's back
        finding = only(doctor(plugin)[1], "route")
        assert "is missing from" in finding["detail"] and "vpcnet routes sync" in finding["fix"]
        assert run([sys.executable, "-m", "vpcnet.cli", "routes", "sync"], env=plugin.env).returncode == 0
        assert doctor(plugin) == (0, {})

        stop()                                                    # the cloud's API no longer answers
        finding = only(doctor(plugin)[1], "cloud")
        assert "unreachable" in finding["detail"]
        assert SECRET not in json.dumps(finding)
    finally:
        stop()
        emu.close()


def test_doctor_talks_to_the_engine_docker_host_names():
    """Like the docker CLI: a rootless engine or a second one is found through DOCKER_HOST."""
    from vpcnet.cli.doctor import DOCKER_SOCKET, default_docker_socket

    assert default_docker_socket({"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}) == "/run/user/1000/docker.sock"
    assert default_docker_socket({"DOCKER_HOST": "tcp://127.0.0.1:2375"}) == DOCKER_SOCKET
    assert default_docker_socket({}) == DOCKER_SOCKET


# `vpcnet doctor`'s firewall checks, run inside a namespace (they read its /proc/sys and `iptables -S`)
FORWARD_POLICY = """
import json
from dataclasses import asdict
from vpcnet.cli.doctor.findings import Context
from vpcnet.cli.doctor.firewall import FirewallChecks
findings = FirewallChecks(Context(None, "")).check_firewall()
print(json.dumps([asdict(f) for f in findings if f.check == "forward_policy"]))
"""


@pytest.mark.root
def test_forwarding_with_an_accept_policy_is_named_with_its_fix(netns_factory):
    ns = netns_factory("vpdoc")
    ip = ["ip", "netns", "exec", ns]

    def finding() -> dict:
        [found] = json.loads(run([*ip, sys.executable, "-c", FORWARD_POLICY]).stdout)
        return found

    run([*ip, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    run([*ip, "iptables", "-P", "FORWARD", "ACCEPT"])
    found = finding()
    assert not found["ok"] and "ip_forward is 1 and the filter FORWARD policy is ACCEPT" in found["detail"]
    assert found["fix"].startswith("iptables -P FORWARD DROP") and "Docker" in found["fix"]
    run([*ip, "iptables", "-P", "FORWARD", "DROP"])
    assert finding()["ok"]
    run([*ip, "iptables", "-P", "FORWARD", "ACCEPT"])
    run([*ip, "sysctl", "-qw", "net.ipv4.ip_forward=0"])       # not forwarding: nothing to say here
    assert finding()["ok"]


IPV6_GUARD = """
import json
from dataclasses import asdict
from vpcnet.cli.doctor.findings import Context
from vpcnet.cli.doctor.firewall import FirewallChecks
print(json.dumps([asdict(f) for f in FirewallChecks(Context(None, "")).check_ipv6_guard()]))
"""


@pytest.mark.root
def test_the_ipv6_guard_missing_or_incomplete_is_named_with_its_fix(netns_factory):
    """In a namespace of the test's own: no VPCNET-IPV6 chain, then the guard as the plugin writes it,
    then one drop gone, the PREROUTING jump gone, and a vpcnet link with IPv6 on."""
    from vpcnet.datapath.firewall import IPV6_CHAIN, Ipv6Guard

    ns = netns_factory("vpdoc")
    ip = ["ip", "netns", "exec", ns]

    def finding() -> dict:
        [found] = json.loads(run([*ip, sys.executable, "-c", IPV6_GUARD]).stdout)
        return found

    found = finding()
    assert not found["ok"] and f"ip6tables raw chain {IPV6_CHAIN} missing" in found["detail"], found
    assert f"raw PREROUTING has no jump to {IPV6_CHAIN}" in found["detail"]
    assert found["fix"].startswith("restart the plugin") and f"ip6tables -t raw -N {IPV6_CHAIN}" in found["fix"]
    assert Ipv6Guard(["ip", "netns", "exec", ns]).apply()                   # what the plugin writes at start
    assert finding()["ok"], finding()
    run([*ip, "ip6tables", "-t", "raw", "-D", IPV6_CHAIN, "1"])
    found = finding()
    assert not found["ok"] and "holds 2 rule(s), 2 of 3 wanted" in found["detail"], found
    assert Ipv6Guard(["ip", "netns", "exec", ns]).apply()
    run([*ip, "ip6tables", "-t", "raw", "-D", "PREROUTING", "-j", IPV6_CHAIN])
    found = finding()
    assert not found["ok"] and found["detail"].startswith(f"ip6tables raw PREROUTING has no jump to {IPV6_CHAIN}")
    assert Ipv6Guard(["ip", "netns", "exec", ns]).apply()
    assert finding()["ok"]

    run(["ip", "-n", ns, "link", "add", "vhdoc0", "type", "veth", "peer", "name", "other0"])
    run([*ip, "sysctl", "-qw", "net.ipv6.conf.vhdoc0.disable_ipv6=0"])
    found = finding()
    assert not found["ok"] and "IPv6 is on on vpcnet link(s) vhdoc0 " in found["detail"], found
    assert "sysctl -w net.ipv6.conf.vhdoc0.disable_ipv6=1" in found["fix"]
    run([*ip, "sysctl", "-qw", "net.ipv6.conf.vhdoc0.disable_ipv6=1"])
    assert finding()["ok"]


@pytest.mark.parametrize("listening", ["no file", "a socket nobody listens on"])
def test_doctor_plugin_without_an_engine_answering_is_one_line_naming_the_socket(tmp_path, listening):
    """`vpcnet doctor --plugin NAME` needs the engine to read the plugin's settings: with none answering at
    the socket it says so in one finding naming the socket (text and JSON), not with a traceback."""
    import socket as socket_mod

    path = str(tmp_path / "docker.sock")
    if listening != "no file":
        sock = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
        sock.bind(path)                                    # bound, never listening: connect is refused
    base = [sys.executable, "-m", "vpcnet.cli", "doctor", "--plugin", "vpcnet:latest", "--docker-socket", path]
    try:
        text = run(base, check=False)
        as_json = run([*base, "--json"], check=False)
    finally:
        if listening != "no file":
            sock.close()
    assert text.returncode == as_json.returncode == 1, (text.stderr, as_json.stderr)
    assert "Traceback" not in text.stderr + as_json.stderr, text.stderr + as_json.stderr
    [line, summary] = text.stdout.splitlines()
    assert line.startswith(f"PROBLEM docker: the Docker engine at {path} does not answer ("), line
    assert "managed plugin vpcnet:latest" in line and "; fix: start Docker" in line
    assert summary == "vpcnet doctor: 1 problem(s), 0 check(s) passed"
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and [f["check"] for f in report["findings"]] == ["docker"]
    assert path in report["findings"][0]["detail"] and report["findings"][0]["fix"]


@pytest.mark.docker
def test_doctor_plugin_that_docker_does_not_have_is_one_line_naming_it(docker_engine):
    proc = run([sys.executable, "-m", "vpcnet.cli", "doctor", "--plugin", "vpcnet-nosuch:latest"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    [line, _] = proc.stdout.splitlines()
    assert line.startswith("PROBLEM docker: cannot read managed plugin vpcnet-nosuch:latest from the Docker engine "
                           "at "), line
    assert "HTTP 404" in line and "; fix: `docker plugin ls`" in line
