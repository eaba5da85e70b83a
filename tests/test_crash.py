"""The plugin killed in the middle of a call, between the store commit and the kernel work.

End to end on a dedicated engine in its own netns (test_daemon_restart's `engine_host`: a daemon restart
there touches nobody else): `vpcnet serve` is armed with its test-only crash point
(VPCNET_TEST_CRASH_AFTER_COMMIT, vpcnet.docker.driver), which SIGKILLs the whole plugin right after
CreateNetwork's (CreateEndpoint's) first commit; the plugin is started again, as systemd would, while Docker
still waits on the call. Then a `docker network create` on the same cluster CIDR, and a `docker run` given
the same address, must work, and a daemon restart (Docker's replays) must find everything in order. The
same for a CreateEndpoint killed after its last commit, before Docker read the answer. The network is
dual-stack, so every check holds for both families (test_races.ipv6_in_order: one /128 route per IPv6
address and no other, no IPv6 address twice, the guard as the store wants it).
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import free_cluster, run, unique, wait_for
from test_daemon_restart import engine_host, errors_in, ip6_of, ip_of, log_since, ping  # noqa: F401
from test_doctor import doctor
from test_races import ipv6_in_order

from vpcnet_lab import image

pytestmark = pytest.mark.docker

CRASH_ENV = "VPCNET_TEST_CRASH_AFTER_COMMIT"


def rows(plugin, table: str) -> list[dict]:
    conn = sqlite3.connect(os.path.join(plugin.state_dir, "vpcnet.db"))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
    finally:
        conn.close()


def crashed_call(engine, plugin, trigger, call: str, *docker_args: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run a docker command whose `call` (network, endpoint) kills the plugin after its commit; start the
    plugin again as soon as it is dead. Returns the command's outcome and the rows the dead call left."""
    trigger.write_text(call)
    kind = call.split("-")[0]
    table = f"{kind}s"
    before = {r[f"{kind}_id"] for r in rows(plugin, table)}
    proc = subprocess.Popen([*engine.docker, *docker_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        plugin.proc.wait(timeout=60)
        assert plugin.proc.returncode == -9, f"the crash point did not kill the plugin:\n{plugin.log()}"
        assert not trigger.exists(), "one crash per arming"
        left = [r for r in rows(plugin, table) if r[f"{kind}_id"] not in before]
        plugin.start()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), left


def test_a_plugin_killed_between_commit_and_kernel_work_strands_nothing(engine_host, plugin_factory,  # noqa: F811
                                                                        tmp_path):
    """On a dual-stack network: the dead calls strand no block and no address of either family, leave no
    /128 route and no IPv6 address twice, and the guard keeps matching the store."""
    engine, ns = engine_host
    trigger = tmp_path / "crash-after-commit"
    cluster6 = "fd00:5e:2::/48"
    plugin = plugin_factory({CRASH_ENV: str(trigger), "VPCNET_CLUSTER_CIDR_V6": cluster6}, netns=ns)
    engine.start(live_restore=True)
    img = image.build(engine.docker)
    create = ["network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, "--subnet", plugin.cluster,
              "--ipv6", "--subnet", cluster6]

    # CreateNetwork dies after its commit: its row holds the host's block of each cluster CIDR.
    lost_net, left = crashed_call(engine, plugin, trigger, "network", *create, "vpc-lost")
    assert len(left) == 1 and left[0]["state"] == "pending" and left[0]["host_cidr_v6"], left
    assert lost_net.returncode != 0, "Docker never got an answer: the create failed"
    lost_bridge = left[0]["bridge"]
    engine(*create, "vpc0")          # on the same cluster CIDRs, so on the same host blocks
    assert "died between the commit and the kernel work" in plugin.log()
    assert [r["network_id"] for r in rows(plugin, "networks")] == [
        engine("network", "inspect", "-f", "{{.Id}}", "vpc0").stdout.strip()]
    engine("run", "-d", "--name", "one", "--network", "vpc0", img, "sleep", "3600")

    # CreateEndpoint dies after its commit: its row holds the address.
    lost_run, left = crashed_call(engine, plugin, trigger, "endpoint",
                                  "run", "-d", "--name", "lost", "--network", "vpc0", img, "sleep", "3600")
    assert len(left) == 1 and left[0]["state"] == "pending" and left[0]["address_v6"], left
    assert lost_run.returncode != 0, "Docker never got an answer: the run failed"
    address, address6, lost_veth = left[0]["address"], left[0]["address_v6"], left[0]["host_veth"]
    engine("rm", "-f", "lost")
    engine("run", "-d", "--name", "two", "--network", "vpc0", "--ip", address, "--ip6", address6, img, "sleep",
           "3600")
    assert (ip_of(engine, "two"), ip6_of(engine, "two")) == (address, address6), "neither address stranded"
    assert ping(engine, "two", ip_of(engine, "one")) and ping(engine, "two", ip6_of(engine, "one"))
    ipv6_in_order(ns, plugin.status())
    # CreateEndpoint dies after its second commit, before Docker has the answer: Docker releases the
    # address, and the endpoint (never handed to a container) goes with it.
    late_run, left = crashed_call(engine, plugin, trigger, "endpoint-ready",
                                  "run", "-d", "--name", "late", "--network", "vpc0", img, "sleep", "3600")
    assert len(left) == 1 and left[0]["state"] == "ready", left
    assert late_run.returncode != 0, "Docker never got the answer: the run failed"
    late_address, late6, late_veth = left[0]["address"], left[0]["address_v6"], left[0]["host_veth"]
    engine("rm", "-f", "late")
    engine("run", "-d", "--name", "three", "--network", "vpc0", "--ip", late_address, "--ip6", late6, img, "sleep",
           "3600")
    assert ping(engine, "three", address) and ping(engine, "three", address6)
    ipv6_in_order(ns, plugin.status())
    links = run(["ip", "-n", ns, "-o", "link"]).stdout
    assert lost_veth not in links and lost_bridge not in links and late_veth not in links, \
        "the dead calls' kernel state is gone"

    # Docker's replays after a daemon restart (RequestPool, RequestAddress of the running containers) all
    # succeed, and only the two containers' endpoints are left.
    engine.stop()
    offset = os.path.getsize(plugin.log_path)
    engine.start(live_restore=True)
    ips = (ip_of(engine, "one"), address, late_address)
    assert wait_for(lambda: all(f"replayed address {ip} in pool" in log_since(plugin, offset) for ip in ips), 20), \
        log_since(plugin, offset)[-5000:]
    assert errors_in(plugin, log_since(plugin, offset)) == []
    assert ping(engine, "one", address) and ping(engine, "one", late6)
    assert sorted((r["address"], r["state"]) for r in rows(plugin, "endpoints")) == sorted(
        (ip, "ready") for ip in ips)
    ipv6_in_order(ns, plugin.status())
    engine("rm", "-f", "one", "two", "three")
    engine("network", "rm", "vpc0")
    assert rows(plugin, "networks") == [] and rows(plugin, "leftovers") == []
    assert "vpc-" not in run(["ip", "-n", ns, "-o", "link"]).stdout
    assert ipv6_in_order(ns, plugin.status()) == {"routes": [], "dnat": []}


def test_network_forget_removes_a_network_docker_does_not_have_and_refuses_one_it_has(
        plugin_factory, netns_factory, docker_engine):
    """The escape hatch against the real store, kernel (a namespace of the test's) and Docker; doctor names
    the stranded network first."""
    ns = netns_factory("vpfgt")
    plugin = plugin_factory(netns=ns)
    kept = unique("vkeep")
    run([*docker_engine, "network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, kept])
    try:
        kept_id = run([*docker_engine, "network", "inspect", "-f", "{{.Id}}", kept]).stdout.strip()
        # One Docker does not have (as when CreateNetwork's answer never reached it), with an endpoint.
        status, pool = plugin.call("/IpamDriver.RequestPool", {"AddressSpace": "vpcnet-local", "Options": {},
                                                               "Pool": free_cluster(100, 227, (plugin.cluster,)),
                                                               "SubPool": "", "V6": False})
        assert status == 200, pool
        nid, eid = unique("f0") + "0" * 56, unique("e0") + "1" * 56
        status, answer = plugin.call("/NetworkDriver.CreateNetwork", {
            "NetworkID": nid, "Options": {"com.docker.network.generic": {"vpcnet.mode": "routed"}}, "IPv6Data": [],
            "IPv4Data": [{"AddressSpace": "vpcnet-local", "Pool": pool["Pool"],
                          "Gateway": pool["Data"]["com.docker.network.gateway"]}]})
        assert status == 200, answer
        address = plugin.call("/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": ""})[1]["Address"]
        assert plugin.call("/NetworkDriver.CreateEndpoint", {"NetworkID": nid, "EndpointID": eid,
                                                              "Interface": {"Address": address}})[0] == 200
        [net] = [r for r in rows(plugin, "networks") if r["network_id"] == nid]
        [ep] = rows(plugin, "endpoints")
        links = run(["ip", "-n", ns, "-o", "link"]).stdout
        assert net["bridge"] in links and ep["host_veth"] in links
        db = sqlite3.connect(os.path.join(plugin.state_dir, "vpcnet.db"))
        db.execute("UPDATE networks SET created = created - 1000")      # older than a call can be
        db.commit()
        db.close()

        problems = doctor(plugin, ns)[1]
        [finding] = problems.get("stranded", [])
        assert nid[:12] in finding["detail"] and finding["fix"] == f"vpcnet network forget {nid[:12]}"
        assert kept_id[:12] not in str(problems)

        forget = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "vpcnet.cli", "network", "forget"]
        refused = run([*forget, kept_id[:12]], env=plugin.env, check=False)
        assert refused.returncode == 3 and f"Docker still has network {kept}" in refused.stderr, refused
        unasked = run([*forget, nid[:12], "--docker-socket", "/nonexistent.sock"], env=plugin.env, check=False)
        assert unasked.returncode == 3 and "cannot ask Docker" in unasked.stderr and "--force" in unasked.stderr
        unknown = run([*forget, "0123456789ab"], env=plugin.env, check=False)
        assert unknown.returncode == 1 and "vpcnet has no network 0123456789ab" in unknown.stderr, unknown
        assert len(rows(plugin, "networks")) == 2 and len(rows(plugin, "endpoints")) == 1, "nothing removed"

        done = run([*forget, nid[:12]], env=plugin.env)
        assert f"forgot network {nid[:12]}" in done.stdout and f"address {ep['address']} released" in done.stdout
        assert "kernel state removed" in done.stdout, done.stdout
        assert [r["network_id"] for r in rows(plugin, "networks")] == [kept_id]
        assert rows(plugin, "endpoints") == [] and rows(plugin, "leftovers") == []
        assert ep["address"] not in [r["address"] for r in rows(plugin, "addresses")]
        links = run(["ip", "-n", ns, "-o", "link"]).stdout
        assert net["bridge"] not in links and ep["host_veth"] not in links and kept_id[:11] in links
        assert nid[:12] not in run(["ip", "netns", "exec", ns, "iptables-save"]).stdout
        assert "stranded" not in doctor(plugin, ns)[1]
    finally:
        run([*docker_engine, "network", "rm", kept], check=False)
