"""Swarm services on vpcnet across lab hosts, with the managed plugin on every node (Docker refuses
legacy socket plugins in swarm mode), on a current engine (Docker 28+: tests/engines/with-docker.sh).

A 2-host lab (its own engines and emulated VPC); the lab's own `vpcnet serve` are stopped and each
engine gets the managed plugin (plugin/build.sh --docker-socket, with its own engine's socket, so the
metrics carry the tasks' names) set up as the lab's plugin was (aliyun provider against the emulator), on
a cluster CIDR of its own. Then a swarm across both engines, the per-node config-only
networks and the swarm-scoped network made from them (docs/swarm.md), and a service on it.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import sys
import time

import pytest
from conftest import CURRENT_DOCKER, engine_major, is_root, require, run, unique, wait_for

from vpcnet_lab import swarm as lab_swarm

pytestmark = pytest.mark.docker

LAB_CLUSTER = "10.241.0.0/16"
SWARM_CLUSTER = "10.247.0.0/16"
PLUGIN = "vpcnet-swarm:latest"


@pytest.fixture(scope="module")
def swarm(request, docker_engine):
    require(is_root(), "needs root")
    if engine_major(docker_engine) < CURRENT_DOCKER:
        pytest.skip(f"Swarm on vpcnet is tested on Docker >= {CURRENT_DOCKER} (tests/engines/with-docker.sh)")
    missing = [t for t in ("dockerd", "nsenter", "unshare", "debootstrap") if not shutil.which(t)]
    require(not missing, f"needs {', '.join(missing)}")
    from vpcnet_lab import Lab

    left = Lab.present()
    require(not left, f"a vpcnet lab is already on this machine ({left}): `vpcnet lab down` first")
    lab = Lab(hosts=2, cluster_cidr=LAB_CLUSTER, reconcile_interval=2.0)
    request.addfinalizer(lambda: lab.down())
    lab.up()
    for k in (1, 2):
        lab_swarm.install_managed_plugin(lab, k, SWARM_CLUSTER, PLUGIN)
    lab_swarm.init_swarm(lab, [1, 2])
    return lab


def tasks(lab, service: str) -> list[dict]:
    """The service's running tasks: node, container id, address (from the node that runs it)."""
    out = []
    for k in (1, 2):
        ids = lab.docker(k, "ps", "-q", "--filter", "status=running",
                         "--filter", f"label=com.docker.swarm.service.name={service}").stdout.split()
        for cid in ids:
            inspect = lab.docker(k, "inspect", cid, check=False)
            if inspect.returncode != 0:        # removed in between (a task moving)
                continue
            info = json.loads(inspect.stdout)[0]
            nets = info["NetworkSettings"]["Networks"]
            net = next(iter(nets.values()))
            out.append({"host": k, "id": cid, "ip": net["IPAddress"], "ip6": net["GlobalIPv6Address"],
                        "name": info["Name"].lstrip("/")})
    return out


def block_of(lab, k: int, cluster: str) -> ipaddress.IPv4Network | None:
    """Host k's block of `cluster`: its route in the emulated VPC route table."""
    for entry in lab.routes():
        hops = [h.get("NextHopId") for h in entry.get("NextHops", {}).get("NextHop", [])]
        dest = ipaddress.ip_network(entry["DestinationCidrBlock"])
        if f"i-vpclab-h{k}" in hops and dest.version == 4 and dest.subnet_of(ipaddress.IPv4Network(cluster)):
            return dest
    return None


def test_a_service_on_a_swarm_scoped_vpcnet_network_across_two_hosts(swarm):
    lab = swarm
    lab_swarm.swarm_network(lab, [1, 2], "vpcs", SWARM_CLUSTER, PLUGIN)
    service = unique("web")
    lab.docker(1, "service", "create", "--detach", "--no-resolve-image", "--name", service, "--network", "vpcs",
               "--replicas", "2", "--replicas-max-per-node", "1", "vpcnet-testbox:latest",
               "sh", "-c", "while true; do echo hi | nc -l -p 8080; done", timeout=120)
    running = wait_for(lambda: len(tasks(lab, service)) == 2, 90, 1.0)
    ps = lab.docker(1, "service", "ps", "--no-trunc", service).stdout
    assert running, ps
    found = tasks(lab, service)
    blocks = {k: block_of(lab, k, SWARM_CLUSTER) for k in (1, 2)}
    assert None not in blocks.values() and blocks[1] != blocks[2], blocks
    for t in found:
        assert ipaddress.IPv4Address(t["ip"]) in blocks[t["host"]], (t, blocks)
    one, two = sorted(found, key=lambda t: t["host"])
    assert lab.docker(1, "exec", one["id"], "ping", "-c1", "-W2", two["ip"], check=False).returncode == 0
    answer = lab.docker(1, "exec", one["id"], "sh", "-c", f"nc -w 3 {service} 8080", check=False)
    assert "hi" in answer.stdout, ("the service VIP", answer.stderr)
    assert lab.docker(2, "exec", two["id"], "ping", "-c1", "-W2", f"tasks.{service}", check=False).returncode == 0
    lab.swarm_service = service


def endpoints_on(lab, k: int) -> list[str]:
    """Addresses the managed plugin of host k holds (its state, on the host)."""
    out = run([sys.executable, "-m", "vpcnet.cli", "status", "--json"],
              env=dict(os.environ, VPCNET_STATE_DIR=lab_swarm.managed_state_dir(k),
                       VPCNET_CONFIG=os.devnull)).stdout
    return sorted(ep["address"] for n in json.loads(out)["networks"] for ep in n["endpoints"])


def converged(lab, service: str, replicas: int) -> list[dict]:
    """Wait (bounded) until the service runs `replicas` tasks; they are returned."""
    assert wait_for(lambda: len(tasks(lab, service)) == replicas, 90, 1.0), \
        lab.docker(1, "service", "ps", "--no-trunc", service).stdout
    return tasks(lab, service)


SWARM6_CLUSTER, SWARM6_CLUSTER_V6 = "10.249.0.0/16", "fd00:10:249::/48"


def test_a_dual_stack_service_across_two_hosts(swarm):
    """IPv6 for swarm services: a swarm network made from config-only networks made with `--ipv6` (each node
    asks its own vpcnet for IPv6: swarm's allocator is not involved; Docker refuses `--ipv6` beside
    `--config-from` itself). The managed plugin writes the host veths' IPv6 settings through its host-sys-net
    mount (Docker mounts its /proc/sys read-only), so each task gets an IPv6 address of its own host's IPv6
    block, claimed in the VPC route table, and the tasks reach each other over IPv6 across the two hosts."""
    lab = swarm
    beside = lab.docker(1, "network", "create", "-d", PLUGIN, "--scope", "swarm", "--ipv6", "--config-from",
                        "none-config", "vpcbad6", check=False)
    assert beside.returncode != 0 and "configuration network" in beside.stderr, beside.stderr
    lab_swarm.swarm_network(lab, [1, 2], "vpcs6", SWARM6_CLUSTER, PLUGIN, ipv6=SWARM6_CLUSTER_V6)
    service = unique("six")
    try:
        lab.docker(1, "service", "create", "--detach", "--no-resolve-image", "--name", service, "--network", "vpcs6",
                   "--replicas", "2", "--replicas-max-per-node", "1", "vpcnet-testbox:latest", "sleep", "3600",
                   timeout=120)
        assert wait_for(lambda: len(tasks(lab, service)) == 2, 90, 1.0), \
            lab.docker(1, "service", "ps", "--no-trunc", service).stdout
        one, two = sorted(tasks(lab, service), key=lambda t: t["host"])
        assert (one["host"], two["host"]) == (1, 2), (one, two)
        blocks6 = {}
        for entry in lab.routes():
            dest = ipaddress.ip_network(entry["DestinationCidrBlock"])
            if dest.version == 6 and dest.subnet_of(ipaddress.IPv6Network(SWARM6_CLUSTER_V6)):
                for hop in entry.get("NextHops", {}).get("NextHop", []):
                    blocks6[hop.get("NextHopId")] = dest
        for t in (one, two):
            assert t["ip6"] and ipaddress.IPv6Address(t["ip6"]) in blocks6[f"i-vpclab-h{t['host']}"], (t, blocks6)
        for k, src, dst in ((1, one, two), (2, two, one)):
            assert lab.docker(k, "exec", src["id"], "ping", "-6", "-c1", "-W2", dst["ip6"],
                              check=False).returncode == 0, (src, dst)
        assert lab.docker(1, "exec", one["id"], "ping", "-c1", "-W2", two["ip"], check=False).returncode == 0
    finally:
        lab.docker(1, "service", "rm", service, check=False)
        assert wait_for(lambda: lab.docker(1, "network", "rm", "vpcs6", check=False).returncode == 0, 60, 1.0)
        for k in (1, 2):
            lab.docker(k, "network", "rm", "vpcs6-config", check=False)

        def left() -> list[str]:       # the tasks' endpoints, until each node has removed its task
            return [a for k in (1, 2) for a in endpoints_on(lab, k)
                    if ipaddress.ip_address(a) in ipaddress.ip_network(SWARM6_CLUSTER)]
        assert wait_for(lambda: not left(), 60, 1.0), left()


def test_scale_drain_and_a_daemon_restart(swarm):
    lab, service = swarm, swarm.swarm_service
    lab.docker(1, "service", "update", "--detach", "--replicas-max-per-node", "0", service)
    lab.docker(1, "service", "scale", "--detach", f"{service}=4")
    found = converged(lab, service, 4)
    assert len({t["ip"] for t in found}) == 4, found
    for k in (1, 2):
        assert sorted(t["ip"] for t in found if t["host"] == k) == endpoints_on(lab, k)
    # drain h2: its tasks move to h1, and nothing they held is left on h2
    lab.docker(1, "node", "update", "--availability", "drain", lab.docker(2, "info", "-f", "{{.Swarm.NodeID}}")
               .stdout.strip())
    assert wait_for(lambda: [t["host"] for t in tasks(lab, service)] == [1] * 4, 90, 1.0), tasks(lab, service)
    assert endpoints_on(lab, 2) == [] and "vh" not in run(["ip", "-n", lab.host_netns(2), "-o", "link"]).stdout
    lab.docker(1, "node", "update", "--availability", "active", lab.docker(2, "info", "-f", "{{.Swarm.NodeID}}")
               .stdout.strip())
    lab.docker(1, "service", "scale", "--detach", f"{service}=2")
    lab.docker(1, "service", "update", "--detach", "--force", "--replicas-max-per-node", "1", service)
    assert wait_for(lambda: sorted(t["host"] for t in tasks(lab, service)) == [1, 2], 120, 1.0), tasks(lab, service)
    # h2's daemon restarts: the managed plugin and the task come back, and reach h1's
    host = lab.host(2)
    pid = host.engine_pid()
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: host.engine_pid() is None, 60, 0.5)
    host.start_engine()
    back = wait_for(lambda: sorted(t["host"] for t in tasks(lab, service)) == [1, 2], 120, 1.0)
    assert back, lab.docker(1, "service", "ps", "--no-trunc", service).stdout
    one, two = sorted(tasks(lab, service), key=lambda t: t["host"])
    assert wait_for(lambda: lab.docker(2, "exec", two["id"], "ping", "-c1", "-W2", one["ip"],
                                       check=False).returncode == 0, 30, 1.0)
    assert endpoints_on(lab, 2) == [two["ip"]], "no address leaked by the restart"


def test_the_one_line_swarm_form_fails_saying_what_to_run_instead(swarm):
    lab = swarm
    lab.docker(1, "network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "--scope", "swarm", "--attachable",
               "--subnet", "10.248.0.0/16", "vpcbad")
    service = unique("bad")
    lab.docker(1, "service", "create", "--detach", "--no-resolve-image", "--name", service, "--network", "vpcbad",
               "vpcnet-testbox:latest", "sleep", "3600")
    errors = wait_for(lambda: [line for line in lab.docker(1, "service", "ps", "--no-trunc", "--format", "{{.Error}}",
                                                            service).stdout.splitlines() if line], 60, 1.0)
    lab.docker(1, "service", "rm", service)
    assert errors and "--config-only" in errors[0] and "--config-from" in errors[0], errors


STACK = """\
services:
  app:
    image: vpcnet-testbox:latest
    command: ["sleep", "3600"]
    networks: [vpcs]
    deploy:
      replicas: 2
      placement:
        max_replicas_per_node: 1
networks:
  vpcs:
    external: true
"""


def test_a_stack_on_the_external_swarm_network(swarm, tmp_path):
    """Also the names and the Grafana dashboard against the managed plugins (built with --docker-socket):
    a real Prometheus scrapes both while the stack's tasks talk across hosts; each task is named on its
    host's /metrics (service = the swarm service, application = the stack), and the dashboard's panels
    answer and show the stack's service by name."""
    from test_lab import RouterPrometheus, _series, dashboard_queries, substitute

    from vpcnet_lab.lab import METRICS_PORT

    lab = swarm
    path = tmp_path / "stack.yml"
    path.write_text(STACK)
    stack = unique("st")
    prom = RouterPrometheus(lab, tmp_path, [1, 2])
    lab.docker(1, "stack", "deploy", "--resolve-image", "never", "--detach=true", "-c", str(path), stack)
    try:
        service = f"{stack}_app"
        found = converged(lab, service, 2)
        assert sorted(t["host"] for t in found) == [1, 2]
        for t in found:
            assert ipaddress.IPv4Address(t["ip"]) in lab_swarm_block(lab, t["host"]), t
        instance = {k: f"{lab.host_ip(k)}:{METRICS_PORT}" for k in (1, 2)}
        for t in found:          # each plugin names its own host's task, from its engine's socket
            info = (f'vpcnet_endpoint_info{{instance="{instance[t["host"]]}",network="vpcs",container="{t["name"]}",'
                    f'service="{service}",application="{stack}",address="{t["ip"]}"}}')
            assert wait_for(lambda info=info: prom.query(info), 30, 0.5), \
                f"{info}: {json.dumps(prom.query('vpcnet_endpoint_info'))}"
        one, two = sorted(found, key=lambda t: t["host"])
        assert lab.docker(1, "exec", one["id"], "ping", "-c1", "-W2", f"tasks.{stack}_app",
                          check=False).returncode == 0
        assert lab.docker(1, "exec", one["id"], "ping", "-c1", "-W2", two["ip"], check=False).returncode == 0
        flood = lab.docker(1, "exec", one["id"], "ping", "-A", "-q", "-c", "300", "-s", "1000", two["ip"],
                           check=False, timeout=60)
        assert "300 packets received" in flood.stdout, flood.stdout
        time.sleep(2)                                            # a scrape of each host after it
        panels, variables = dashboard_queries()
        everything = {name: ".*" for name in variables}
        failed = {t: a for t, exprs in panels.items() for e in exprs
                  if (a := prom.answer(substitute(e, everything)))["status"] != "success"}
        assert not failed, failed
        sent = {r["metric"]["instance"] for e in panels["Sent per host"]
                for r in prom.query(substitute(e, everything)) if float(r["value"][1]) > 0}
        assert len(sent) == 2, sent

        def shown(title: str, variables: dict[str, str]) -> list[dict]:
            return [r for e in panels[title] for r in prom.query(substitute(e, variables))]

        # the stack picked as the application: its service's traffic, by name, from both hosts
        picked = dict(everything, application=stack)
        per_service = shown("Sent per service", picked)
        assert {(r["metric"]["application"], r["metric"]["service"]) for r in per_service} == {(stack, service)}, \
            per_service
        assert sum(_series(per_service, application=stack, service=service)) > 0, per_service
        table = {(r["metric"]["instance"], r["metric"]["container"], r["metric"]["service"],
                  r["metric"]["application"], r["metric"]["address"]) for r in shown("Containers", picked)}
        assert table == {(instance[t["host"]], t["name"], service, stack, t["ip"]) for t in found}, table
    finally:
        prom.stop()
        lab.docker(1, "stack", "rm", stack)
    assert wait_for(lambda: tasks(lab, f"{stack}_app") == [], 60, 1.0)


def test_a_published_service_in_host_mode_answers_through_vpcnet_and_the_routing_mesh_needs_ipvs(swarm):
    """`--publish` on a service on a vpcnet network. `mode=host` publishes on the task's node through vpcnet
    (ProgramExternalConnectivity on the task's vpcnet endpoint, its gateway): it answers with the client's
    own address, and the task is still reached over vpcnet at its own address. The ingress routing mesh
    (the default mode) is Docker's own: the task also joins the `ingress` overlay and `docker_gwbridge`,
    and Docker programs the mesh with IPVS, which this machine's kernel lacks (dockerd logs "Could not get
    ipvs family information from the kernel"): where /proc/net/ip_vs exists, the mesh must answer on
    every node, else it must not answer here at all (so a kernel with IPVS makes this test check it)."""
    from test_docker_ports import SERVE, peer_of

    lab = swarm
    if lab.docker(1, "network", "inspect", "vpcs", check=False).returncode != 0:
        lab_swarm.swarm_network(lab, [1, 2], "vpcs", SWARM_CLUSTER, PLUGIN)
    service = unique("pub")
    # By node id: the lab's engines share the machine's hostname, so `node.hostname` matches every node.
    node = lab.docker(1, "info", "-f", "{{.Swarm.NodeID}}").stdout.strip()
    lab.docker(1, "service", "create", "--detach", "--no-resolve-image", "--name", service, "--network", "vpcs",
               "--replicas", "1", "--constraint", f"node.id=={node}", "--publish", "published=18088,target=80",
               "--publish", "mode=host,published=18089,target=80", "vpcnet-testbox:latest", *SERVE, timeout=120)
    try:
        assert wait_for(lambda: len(tasks(lab, service)) == 1, 90, 1.0), lab.docker(1, "service", "ps", service).stdout
        [task] = tasks(lab, service)
        assert task["host"] == 1, task
        own = lab.docker(1, "inspect", "-f", '{{(index .NetworkSettings.Networks "vpcs").IPAddress}}',
                         task["id"]).stdout.strip()

        def seen(k: int, address: str, port: int) -> str:
            proc = run(["ip", "netns", "exec", lab.host_netns(k), "busybox", "nc", "-w", "3", address, str(port)],
                       input="", check=False)
            return peer_of(proc.stdout)

        assert ipaddress.IPv4Address(own) in lab_swarm_block(lab, 1)
        assert wait_for(lambda: seen(2, "192.168.240.11", 18089) == "192.168.240.12", 30, 1.0), "host mode"
        assert seen(2, own, 80) == "192.168.240.12", "over vpcnet, at the task's own address"
        ipvs = run(["ip", "netns", "exec", lab.host_netns(1), "test", "-e", "/proc/net/ip_vs"],
                   check=False).returncode == 0
        mesh = [seen(2, "192.168.240.11", 18088), seen(1, "192.168.240.12", 18088)]
        assert all(mesh) if ipvs else not any(mesh), (ipvs, mesh)
    finally:
        lab.docker(1, "service", "rm", service, check=False)
    assert wait_for(lambda: tasks(lab, service) == [], 60, 1.0)


def lab_swarm_block(lab, k: int) -> ipaddress.IPv4Network:
    block = block_of(lab, k, SWARM_CLUSTER)
    assert block is not None
    return block
