"""End to end on the multi-host lab: engines in separate host namespaces, routes in the emulated VPC.

Needs root, dockerd, nsenter/unshare, iperf3, busybox and tcpdump (skipped with a reason otherwise; a
failure under VPCNET_TEST_STRICT=1). The lab's names are fixed (vpclab-*), so these tests refuse to run
next to a lab someone already has up. Everything is taken down in finalizers, whatever happens.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import is_root, require, run, stop_group, unique, wait_for

pytestmark = pytest.mark.docker

CLUSTER = "10.241.0.0/16"
EBPF_CLUSTER = "10.244.0.0/16"        # a second cluster CIDR, for the ebpf-mode network
DUAL_CLUSTER = "10.245.0.0/16"        # a third, for the dual-stack network (IPv6: the lab's IPv6 cluster CIDR)
TOOLS = ("dockerd", "docker", "nsenter", "unshare", "iperf3", "busybox", "tcpdump", "ip")


def _require_lab_prerequisites() -> None:
    require(is_root(), "needs root (network namespaces, Docker engines, mounts)")
    missing = [t for t in TOOLS if not shutil.which(t)]
    require(not missing, f"needs {', '.join(missing)}")
    from vpcnet_lab import Lab
    left = Lab.present()
    require(not left, f"a vpcnet lab is already on this machine ({left}): `vpcnet lab down` first")


def vpcnet_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "vpcnet.cli", *args], check=False, timeout=timeout)


@pytest.fixture(scope="module")
def lab(request):
    _require_lab_prerequisites()
    from vpcnet_lab import Lab

    lab = Lab(hosts=2, cluster_cidr=CLUSTER, reconcile_interval=2.0)
    request.addfinalizer(lambda: lab.down())
    lab.up()
    return lab


class Box:
    """A test container on one lab host."""

    def __init__(self, lab, host: int, network: str = "vpc0"):
        self.lab, self.host = lab, host
        self.name = unique(f"lab{host}-")
        lab.docker(host, "run", "-d", "--name", self.name, "--network", network, "vpcnet-testbox:latest",
                   "sleep", "3600")
        self.ip = lab.docker(host, "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                             self.name).stdout.strip()
        self.pid = int(lab.docker(host, "inspect", "-f", "{{.State.Pid}}", self.name).stdout.strip())

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.lab.docker(self.host, "exec", self.name, *cmd, check=check, timeout=timeout)

    def pings(self, ip: str, wait: int = 2) -> bool:
        return self.sh("ping", "-c1", f"-W{wait}", ip, check=False).returncode == 0

    def remove(self) -> None:
        self.lab.docker(self.host, "rm", "-f", self.name, check=False)


@pytest.fixture
def boxes(lab):
    made: list[Box] = []

    def make(host: int) -> Box:
        box = Box(lab, host)
        made.append(box)
        return box

    yield make
    for box in made:
        box.remove()


# ------------------------------------------------------------------------------------------ the CLI
# First in the file: it needs the machine without a lab, before the module's lab fixture builds one.

def test_cli_up_twice_status_and_down_leave_nothing(request):
    """`lab up --ipv6`: a dual-stack lab, each host's IPv4 and IPv6 blocks routed by the emulated VPC via its
    underlay address of the same family; `lab down` leaves nothing."""
    from vpcnet_lab.lab import DEFAULT_CLUSTER_V6

    _require_lab_prerequisites()
    request.addfinalizer(lambda: vpcnet_cli("lab", "down", timeout=180))
    up = vpcnet_cli("lab", "up", "--hosts", "2", "--cluster-cidr", CLUSTER, "--no-image", "--ipv6")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "DOCKER_HOST=unix:///run/vpclab/h1/docker.sock" in up.stdout
    assert "DOCKER_HOST=unix:///run/vpclab/h2/docker.sock" in up.stdout

    again = vpcnet_cli("lab", "up", "--hosts", "2", "--cluster-cidr", CLUSTER, "--no-image", "--ipv6")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already up") == 2

    other = vpcnet_cli("lab", "up", "--cluster-cidr", "10.242.0.0/16")
    assert other.returncode == 1 and "already up with cluster CIDR" in other.stderr
    v4only = vpcnet_cli("lab", "up", "--cluster-cidr", CLUSTER)
    assert v4only.returncode == 1 and "already up with --ipv6" in v4only.stderr, v4only.stderr

    status = vpcnet_cli("lab", "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    data = json.loads(status.stdout)
    assert [h["host"] for h in data["hosts"]] == ["h1", "h2"]
    cidrs = [h["host_cidr"] for h in data["hosts"]]
    assert len(set(cidrs)) == 2
    for h in data["hosts"]:
        assert ipaddress.IPv4Network(h["host_cidr"]).subnet_of(ipaddress.IPv4Network(CLUSTER))
        assert h["route_available"] and h["route"]["destination"] == h["host_cidr"]
        assert any(line.startswith(f"{h['host_cidr']} via {h['underlay_ip']}") for line in data["kernel_routes"])
        # vpc0 is dual-stack: the host's /80 of the lab's IPv6 cluster CIDR, routed via its IPv6 underlay address
        block6 = ipaddress.IPv6Network(h["host_cidr6"])
        assert block6.prefixlen == 80 and block6.subnet_of(ipaddress.IPv6Network(DEFAULT_CLUSTER_V6)), h
        assert h["route6_available"] and h["route6"]["destination"] == h["host_cidr6"], h
        assert any(line.startswith(f"{h['host_cidr6']} via {h['underlay_ip6']}") for line in data["kernel_routes6"])
    assert data["ipv6"] and len({h["host_cidr6"] for h in data["hosts"]}) == 2
    human = vpcnet_cli("lab", "status")
    assert human.returncode == 0 and "Available" in human.stdout and "i-vpclab-h2" in human.stdout
    assert "dual-stack" in human.stdout and f"{data['hosts'][1]['host_cidr6']} Available" in human.stdout

    down = vpcnet_cli("lab", "down", timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [n for n in run(["ip", "netns", "list"]).stdout.split() if n.startswith("vpclab-")]
    assert "/run/vpclab/" not in run(["ps", "-eo", "args"]).stdout
    assert "vpclab" not in run(["cat", "/proc/self/mountinfo"]).stdout
    assert not os.path.exists("/run/vpclab") and not os.path.exists("/var/lib/vpclab")
    after = vpcnet_cli("lab", "status")
    assert after.returncode == 3 and "lab is down" in after.stdout


def test_down_after_a_half_failed_up_removes_it_all(request):
    """A lab whose second host never got an engine (as if `up` died there) is removed completely."""
    _require_lab_prerequisites()
    from vpcnet_lab import Lab, netns
    from vpcnet_lab import lab as lab_mod

    request.addfinalizer(lambda: Lab().down())
    half = Lab(hosts=1, cluster_cidr=CLUSTER, load_image=False)
    half.up()
    netns.add(lab_mod.host_netns(2))                               # h2 begun, never finished
    netns.p2p_link(lab_mod.ROUTER_NS, "to-h2", lab_mod.ROUTER_IP, lab_mod.host_netns(2), "uplink",
                   lab_mod.host_ip(2))
    os.makedirs("/var/lib/vpclab/h2/docker", exist_ok=True)
    assert Lab().down() == []
    assert Lab.leftovers() == {"netns": [], "processes": [], "mounts": [], "dirs": []}



def test_the_files_of_a_lab_whose_processes_are_gone_block_nothing(request):
    """What a reboot or a torn-down sandbox leaves of a lab (its folders and state, with no namespace, engine
    or emulator alive) does not count as a lab up; while a `vpcnet lab` command holds the lock, it does."""
    import fcntl

    _require_lab_prerequisites()
    from vpcnet_lab import Lab
    from vpcnet_lab import lab as lab_mod

    request.addfinalizer(lambda: Lab().down())
    os.makedirs("/run/vpclab/h1", mode=0o700)
    os.makedirs("/var/lib/vpclab/h1/docker")
    dead = subprocess.Popen(["true"])
    dead.wait()                                                    # a pid that is surely not running
    with open(lab_mod.EMULATOR_PIDFILE, "w") as fh:
        fh.write(str(dead.pid))
    with open(lab_mod.STATE_FILE, "w") as fh:
        fh.write('{"hosts": {"1": {"netns": "vpclab-h1"}}, "emulator_pid": %d}' % dead.pid)
    fd = os.open(lab_mod.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)                             # as `lab up` holds it while it works
        assert Lab.present() == {"dirs": ["/run/vpclab", "/var/lib/vpclab"]}
    finally:
        os.close(fd)
    assert Lab.present() == {}
    assert not os.path.exists("/run/vpclab") and not os.path.exists("/var/lib/vpclab")


# ------------------------------------------------------------------------------------------ datapath

def test_containers_on_two_hosts_talk_over_plain_ip_through_the_router(lab, boxes):
    a, b = boxes(1), boxes(2)
    h1, h2 = ipaddress.IPv4Network(lab.host_cidr(1)), ipaddress.IPv4Network(lab.host_cidr(2))
    assert h1 != h2 and ipaddress.IPv4Address(a.ip) in h1 and ipaddress.IPv4Address(b.ip) in h2
    assert a.sh("cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1500"     # no encapsulation overhead

    # The router sees the containers' own addresses, on plain IP, both ways; nothing on UDP 4789.
    capture = subprocess.Popen(
        ["ip", "netns", "exec", lab.router_netns, "timeout", "20", "tcpdump", "-lnni", "to-h2", "-c", "4",
         f"(host {a.ip} and host {b.ip}) or udp port 4789"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)                                            # tcpdump attaching
        assert a.pings(b.ip) and b.pings(a.ip)
        out, _ = capture.communicate(timeout=25)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 4, out
    assert any(f"IP {a.ip} > {b.ip}: ICMP echo request" in line for line in lines), out
    assert any(f"IP {b.ip} > {a.ip}: ICMP echo request" in line for line in lines), out
    assert not any("4789" in line or "VXLAN" in line.upper() for line in lines), out

    # TCP data, both directions across the VPC.
    b.sh("sh", "-c", "iperf3 -s -1 -D")
    assert wait_for(lambda: a.sh("iperf3", "-c", b.ip, "-t", "1", "-J", check=False).returncode == 0, 15)
    b.sh("sh", "-c", "iperf3 -s -1 -D")
    time.sleep(0.5)
    result = json.loads(a.sh("iperf3", "-c", b.ip, "-t", "2", "-R", "-J").stdout)
    assert result["end"]["sum_received"]["bytes"] > 10_000_000

    # No vxlan device anywhere in the lab: neither in its namespaces nor in the containers.
    for ns in [lab.router_netns] + [lab.host_netns(k) for k in lab.host_indexes()]:
        assert "vxlan" not in run(["ip", "-n", ns, "-d", "link", "show"]).stdout, ns
    for box in (a, b):
        assert "vxlan" not in run(["nsenter", "-t", str(box.pid), "-n", "ip", "-d", "link", "show"]).stdout


def ipv6_of(lab, k: int, container: str, network: str) -> str:
    return lab.docker(k, "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").GlobalIPv6Address}}}}',
                      container).stdout.strip()


def peer6_of(table: str, port: int) -> str:
    """The remote address of the established connection to `port` in a /proc/net/tcp6 dump ("" if none)."""
    for line in table.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] in ("01", "08") and int(fields[1].split(":")[1], 16) == port:
            raw = bytes.fromhex(fields[2].split(":")[0])           # four 32-bit words, each in host order
            return str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return ""


def test_a_dual_stack_network_carries_ipv6_between_hosts_unencapsulated_with_the_containers_addresses(lab):
    """A dual-stack network on both hosts (what `lab up --ipv6` makes vpc0): a container on h1 reaches one on
    h2 over IPv6, the receiver sees the sender's own IPv6 address, and the router forwards plain IPv6
    carrying the containers' addresses; IPv4 works beside it."""
    lab.create_network("vpc6", DUAL_CLUSTER, ipv6=True)
    a, b = Box(lab, 1, "vpc6"), Box(lab, 2, "vpc6")
    try:
        a6, b6 = ipv6_of(lab, 1, a.name, "vpc6"), ipv6_of(lab, 2, b.name, "vpc6")
        for k, addr in ((1, a6), (2, b6)):
            block = lab.host_cidr(k, "vpc6", family=6)
            assert ipaddress.IPv6Network(block).subnet_of(ipaddress.IPv6Network(lab.cluster_cidr_v6)), block
            assert ipaddress.IPv6Address(addr) in ipaddress.IPv6Network(block), (addr, block)
            assert (lab.route_of(k, family=6) or {}).get("DestinationCidrBlock") == block
            assert wait_for(lambda b=block, k=k: any(r.startswith(f"{b} via {lab.host_ip6(k)}")
                                                     for r in lab.kernel_routes(family=6)), 20, 0.5)
        capture = subprocess.Popen(
            ["ip", "netns", "exec", lab.router_netns, "timeout", "20", "tcpdump", "-lnni", "to-h2", "-c", "2",
             f"ip6 and host {a6} and host {b6}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)                                            # tcpdump attaching
            assert wait_for(lambda: a.sh("ping", "-6", "-c1", "-W2", b6, check=False).returncode == 0, 20, 0.5)
            out, _ = capture.communicate(timeout=25)
        finally:
            if capture.poll() is None:
                capture.kill()
                capture.wait()
        assert f"IP6 {a6} > {b6}: ICMP6, echo request" in out, out
        assert f"IP6 {b6} > {a6}: ICMP6, echo reply" in out, out
        # TCP over IPv6: the server on h2 sees h1's container's own address
        b.sh("sh", "-c", "nc -ll -p 7006 -e cat /proc/net/tcp6 >/dev/null 2>&1 &")
        seen = ""
        for _ in range(10):
            seen = peer6_of(a.sh("sh", "-c", f"nc -w 3 {b6} 7006 </dev/null", check=False).stdout, 7006)
            if seen:
                break
            time.sleep(0.5)
        assert seen == a6
        assert a.pings(b.ip), "IPv4 beside it"
    finally:
        a.remove()
        b.remove()
        for k in (1, 2):
            lab.docker(k, "network", "rm", "vpc6", check=False)


def test_a_deleted_route_breaks_traffic_until_the_reconciler_restores_it(lab, boxes):
    a, b = boxes(1), boxes(2)
    assert a.pings(b.ip)
    block = lab.host_cidr(2)          # vpc0's: h2 may hold blocks of other cluster CIDRs too

    def entry_of() -> dict:
        return next((e for e in lab.routes() if e["DestinationCidrBlock"] == block), {})
    entry = entry_of()
    assert entry and entry["Status"] == "Available"
    plugin = lab.host(2).plugin_pid()
    os.killpg(plugin, signal.SIGSTOP)               # hold h2's reconciler while we look at the break
    try:
        lab.emulator("DELETE", f"/_emulator/entries/{entry['RouteEntryId']}")
        assert wait_for(lambda: not any(r.startswith(entry["DestinationCidrBlock"] + " ")
                                        for r in lab.kernel_routes()), 10)
        assert not a.pings(b.ip, wait=1), "h1 -> h2 still works without h2's route"
    finally:
        os.killpg(plugin, signal.SIGCONT)
    restored = wait_for(lambda: entry_of().get("Status") == "Available", 30, 0.5)
    assert restored, lab.status()["route_table"]
    assert wait_for(lambda: a.pings(b.ip, wait=1), 15)


def flow_through_a_plugin_kill(lab, a: Box, b: Box) -> dict:
    """A 10 s iperf3 TCP flow a -> b during which h2's plugin is killed (-9) and, 2 s later, started
    again; iperf3's JSON result, once it is checked that every second moved data."""
    b.sh("sh", "-c", "iperf3 -s -1 -D")
    time.sleep(0.5)
    client = subprocess.Popen([*lab.docker_cmd(1), "exec", a.name, "iperf3", "-c", b.ip, "-t", "10", "-i", "1",
                               "-J"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        lab.kill_plugin(2)
        assert lab.host(2).plugin_pid() is None
        time.sleep(2)
        lab.start_plugin(2)
        out, err = client.communicate(timeout=40)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    result = json.loads(out)
    rates = [i["sum"]["bits_per_second"] for i in result["intervals"]]
    assert len(rates) >= 9 and min(rates) > 1e6, rates           # every second moved data
    return result


def test_killing_and_restarting_h2s_plugin_does_not_interrupt_a_flow(lab, boxes):
    a, b = boxes(1), boxes(2)
    flow_through_a_plugin_kill(lab, a, b)
    # The restarted plugin serves again: a new container on h2 gets an address in h2's block.
    c = boxes(2)
    assert ipaddress.IPv4Address(c.ip) in ipaddress.IPv4Network(lab.host_cidr(2))
    assert a.pings(c.ip)


def forward_count(lab, k: int, name: str, *match: str) -> int:
    """Packets counted by a rule named `name` at the top of host k's FORWARD chain (added if missing)."""
    ns = lab.host_netns(k)
    listed = run(["ip", "netns", "exec", ns, "iptables", "-L", "FORWARD", "-v", "-n", "-x"]).stdout
    for line in listed.splitlines():
        if f"/* {name} */" in line:
            return int(line.split()[0])
    run(["ip", "netns", "exec", ns, "iptables", "-I", "FORWARD", "1", *match, "-m", "comment", "--comment", name])
    return 0


def uplink_programs(lab, k: int) -> list[str]:
    out = run(["ip", "netns", "exec", lab.host_netns(k), "tc", "filter", "show", "dev", "uplink", "ingress"],
              check=False).stdout
    return [word for word in out.split() if word.startswith("vpcnet-")]


def test_ebpf_mode_carries_cross_host_traffic_past_both_hosts_stacks_and_outlives_a_plugin_kill(lab):
    before = [uplink_programs(lab, k) for k in (1, 2)]        # vpc0's (the default mode: ebpf on this kernel)
    lab.create_network("vpce", EBPF_CLUSTER, mode="ebpf")
    a, b = Box(lab, 1, "vpce"), Box(lab, 2, "vpce")
    try:
        assert wait_for(lambda: a.pings(b.ip, wait=1), 40, 0.5), "h2's block of the new cluster CIDR is routed"
        assert a.sh("cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1500"
        # one program per ebpf network on each uplink: vpce's, and vpc0's (the lab's network, made without
        # -o vpcnet.mode: ebpf, the default on this kernel)
        assert [sorted(Counter(uplink_programs(lab, k)).values()) for k in (1, 2)] == [[1, 1], [1, 1]]
        for k in (1, 2):
            forward_count(lab, k, f"ebpf-{k}-out", "-s", a.ip, "-d", b.ip)
            forward_count(lab, k, f"ebpf-{k}-back", "-s", b.ip, "-d", a.ip)
        # the router still sees the containers' own addresses, on plain IP
        capture = subprocess.Popen(
            ["ip", "netns", "exec", lab.router_netns, "timeout", "20", "tcpdump", "-lnni", "to-h2", "-c", "2",
             f"host {a.ip} and host {b.ip}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            assert a.pings(b.ip)
            out, _ = capture.communicate(timeout=25)
        finally:
            if capture.poll() is None:
                capture.kill()
                capture.wait()
        assert f"IP {a.ip} > {b.ip}: ICMP echo request" in out and f"IP {b.ip} > {a.ip}: ICMP echo reply" in out, out

        # h2's plugin killed and restarted under a flow: the kernel keeps the programs attached
        result = flow_through_a_plugin_kill(lab, a, b)
        assert result["end"]["sum_received"]["bytes"] > 100_000_000
        # Neither host's IP stack forwarded the flow (but for packets before a neighbour was resolved).
        counts = {name: forward_count(lab, k, name) for k in (1, 2) for name in (f"ebpf-{k}-out", f"ebpf-{k}-back")}
        assert max(counts.values()) <= 5, counts
        # The restarted plugin re-ensured the programs in place: still exactly one per uplink.
        assert wait_for(lambda: lab.host(2).plugin_pid() is not None and
                        lab.docker(2, "network", "inspect", "vpce", check=False).returncode == 0, 20)
        assert [sorted(Counter(uplink_programs(lab, k)).values()) for k in (1, 2)] == [[1, 1], [1, 1]]
        c = Box(lab, 2, "vpce")
        assert a.pings(c.ip)
        c.remove()
    finally:
        a.remove()
        b.remove()
        for k in (1, 2):
            lab.docker(k, "network", "rm", "vpce", check=False)
    assert [uplink_programs(lab, k) for k in (1, 2)] == before, "the programs go with the network"


# ------------------------------------------------------------------------------ the Grafana dashboard
DASHBOARD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "grafana",
                         "vpcnet.json")
PEER_FAMILIES = [f"vpcnet_endpoint_peer_{d}_{u}_total" for d in ("transmit", "receive") for u in ("bytes", "packets")]
PROMETHEUS_PORT = 19090        # in the lab's router namespace, which has nothing else on it
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
COMPOSE_FILE = """\
services:
  {service}:
    image: vpcnet-testbox:latest
    pull_policy: never
    command: ["sleep", "3600"]
    networks: [{network}]
networks:
  {network}:
    external: true
"""
#: (host, Compose project, service): two projects, one on each host, talking across hosts
PROJECTS = ((1, "shop", "web"), (2, "pay", "api"))
FLOOD_COUNT, FLOOD_SIZE = 600, 1000


class RouterPrometheus:
    """A real Prometheus in the lab's router namespace, scraping every host's plugin on its underlay
    address (the lab serves /metrics there) every second; queried with curl in that namespace."""

    def __init__(self, lab, tmp_path, hosts: list[int]):
        from vpcnet_lab.lab import METRICS_PORT

        require(shutil.which("prometheus") is not None and shutil.which("curl") is not None,
                "needs prometheus (Debian's prometheus package) and curl")
        self.netns = lab.router_netns
        self.dir = tmp_path / "prometheus"
        self.dir.mkdir()
        targets = ", ".join(f"'{lab.host_ip(k)}:{METRICS_PORT}'" for k in hosts)
        (self.dir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: vpcnet\n    static_configs:\n      - targets: [{targets}]\n")
        self.url = f"http://127.0.0.1:{PROMETHEUS_PORT}"
        self.log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
             "--log.level=warn"], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        assert wait_for(lambda: self._ready(), 30, step=0.3), self.tail()
        # scraped every host once: what happens from here is in its data
        assert wait_for(lambda: len(self.query("up == 1")) == len(hosts), 30, step=0.3), self.query("up")

    def _get(self, path: str, *args: str) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.netns, "curl", "-sS", "--noproxy", "*", "--max-time", "10",
                    *args, self.url + path], check=False, timeout=20)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.tail()
        return self._get("/-/ready", "-f").returncode == 0

    def tail(self) -> str:
        self.log.flush()
        return (self.dir / "prometheus.log").read_text()[-3000:]

    def answer(self, expr: str) -> dict:
        """Prometheus's whole answer to an instant query (status success or error)."""
        out = self._get("/api/v1/query", "--data-urlencode", f"query={expr}")
        assert out.returncode == 0, (expr, out.stderr)
        return json.loads(out.stdout)

    def query(self, expr: str) -> list[dict]:
        answer = self.answer(expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def families(self) -> set[str]:
        return set(json.loads(self._get("/api/v1/label/__name__/values").stdout)["data"])

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


def substitute(expr: str, variables: dict[str, str]) -> str:
    """A panel's query as Grafana sends it: its built-in intervals and the dashboard's variables (each
    a regex, as Grafana formats a multi-value variable for =~) put in."""
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    for name, value in variables.items():
        expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"(?![A-Za-z0-9_])", lambda _m, v=value: v, expr)
    left = re.findall(r"\$\{?[A-Za-z_][A-Za-z0-9_]*", expr)
    assert not left, f"a variable the dashboard does not define: {left} in {expr}"
    return expr


def dashboard_queries() -> tuple[dict[str, list[str]], dict[str, str]]:
    """The panels' queries by title, and the template variables' queries by name."""
    with open(DASHBOARD) as fh:
        board = json.load(fh)
    panels = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in board["panels"] if p["type"] != "row"}
    variables = {v["name"]: v.get("definition", "") for v in board["templating"]["list"] if v["type"] == "query"}
    return panels, variables


def start_project(lab, k: int, project: str, service: str, tmp_path, compose: bool) -> str:
    """Compose project `project` with one service on host k (vpc0); its container's name. Where the
    engine has no Compose v2 (Docker 20.10), the container is made with the labels Compose would set."""
    if compose:
        path = tmp_path / f"{project}.yml"
        path.write_text(COMPOSE_FILE.format(service=service, network=lab.network))
        lab.docker(k, "compose", "-p", project, "-f", str(path), "up", "-d", timeout=120)
    else:
        lab.docker(k, "run", "-d", "--name", f"{project}-{service}-1", "--network", lab.network,
                   "--label", f"com.docker.compose.project={project}", "--label",
                   f"com.docker.compose.service={service}", "--label", "com.docker.compose.container-number=1",
                   "vpcnet-testbox:latest", "sleep", "3600")
    return f"{project}-{service}-1"


def stop_project(lab, k: int, project: str, service: str, tmp_path, compose: bool) -> None:
    if compose and (tmp_path / f"{project}.yml").exists():
        lab.docker(k, "compose", "-p", project, "-f", str(tmp_path / f"{project}.yml"), "down", "-t", "1",
                   check=False, timeout=120)
    lab.docker(k, "rm", "-f", f"{project}-{service}-1", check=False)


def _series(result: list[dict], **labels: str) -> list[float]:
    return [float(r["value"][1]) for r in result if all(r["metric"].get(k) == v for k, v in labels.items())]


def test_the_grafana_dashboard_answers_from_a_real_prometheus(lab, tmp_path):
    """docs/grafana/vpcnet.json against a real Prometheus scraping both hosts' plugins while two
    Compose projects talk across the hosts: every panel's and variable's query answers, and the
    traffic panels show the traffic under the right application, service, container and host."""
    from vpcnet.observability.events import FAMILIES
    from vpcnet_lab.lab import METRICS_PORT

    panels, variables = dashboard_queries()
    known = set(FAMILIES) | set(PEER_FAMILIES)
    used = {name for exprs in [*panels.values(), list(variables.values())] for e in exprs
            for name in re.findall(r"\bvpcnet_[a-z0-9_]+", e)}
    unknown = {n for n in used if n not in known and re.sub(r"_(bucket|sum|count)$", "", n) not in known}
    assert not unknown, f"the dashboard names families vpcnet does not serve: {sorted(unknown)}"

    compose = lab.docker(1, "compose", "version", check=False).returncode == 0
    names = {}
    prom = None
    try:
        # a container come and gone first: h1's call families exist before Prometheus's first scrape, so
        # the Compose project's calls make their rate
        lab.docker(1, "run", "--rm", "--network", lab.network, "vpcnet-testbox:latest", "true")
        prom = RouterPrometheus(lab, tmp_path, [1, 2])
        for k, project, service in PROJECTS:
            names[project] = start_project(lab, k, project, service, tmp_path, compose)
        ip = {p: lab.docker(k, "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                            names[p]).stdout.strip() for k, p, _ in PROJECTS}
        instance = {k: f"{lab.host_ip(k)}:{METRICS_PORT}" for k in (1, 2)}
        # the names reach Prometheus from both hosts (each plugin asks its own engine)
        for k, project, service in PROJECTS:
            info = (f'vpcnet_endpoint_info{{instance="{instance[k]}",application="{project}",service="{service}",'
                    f'container="{names[project]}",address="{ip[project]}"}}')
            assert wait_for(lambda info=info: prom.query(info), 30, 0.5), \
                f"{info}: {json.dumps(prom.query('vpcnet_endpoint_info'))}"
        flood = lab.docker(1, "exec", names["shop"], "ping", "-A", "-q", "-c", str(FLOOD_COUNT), "-s",
                           str(FLOOD_SIZE), "-W", "5", ip["pay"], timeout=120)
        assert f"{FLOOD_COUNT} packets transmitted, {FLOOD_COUNT} packets received" in flood.stdout, flood.stdout
        sent = FLOOD_COUNT * (FLOOD_SIZE + 28)
        by_service = "sum by (application, service) (increase(vpcnet_endpoint_transmit_bytes_total[1m]))"
        assert wait_for(lambda: [v for v in _series(prom.query(by_service), application="shop", service="web")
                                 if v >= sent * 0.9], 20, 0.5), prom.query(by_service)
        time.sleep(2)                                           # one more scrape on each host

        everything = {name: ".*" for name in variables}
        failed, empty = {}, []
        for title, exprs in panels.items():
            for expr in exprs:
                answer = prom.answer(substitute(expr, everything))
                if answer["status"] != "success":
                    failed[title] = answer
                elif not answer["data"]["result"]:
                    empty.append(title)
        for name, definition in variables.items():      # label_values(SELECTOR, LABEL), as Grafana asks it
            m = re.fullmatch(r"label_values\((.*), *(\w+)\)", definition)
            assert m, definition
            answer = prom.answer(f"group by ({m[2]}) ({substitute(m[1], everything)})")
            if answer["status"] != "success" or not answer["data"]["result"]:
                failed[f"variable {name}"] = answer
        assert not failed, failed

        def shown(title: str, variables: dict[str, str] = everything) -> list[dict]:
            return [r for e in panels[title] for r in prom.query(substitute(e, variables))]

        def rate_of(title: str, variables: dict[str, str] = everything, **labels: str) -> float:
            return sum(_series(shown(title, variables), **labels))

        # the flood is in the last minute: every level shows it, named
        assert rate_of("Cluster traffic") > 0
        assert rate_of("Sent per host", instance=instance[1]) > 0       # the echo requests
        assert rate_of("Sent per host", instance=instance[2]) > 0       # and their replies
        assert rate_of("Sent per application", application="shop") > 0
        assert rate_of("Sent per service", application="shop", service="web") > 0
        assert rate_of("Sent per service", application="pay", service="api") > 0      # the replies
        assert rate_of("Packets sent per service", application="shop", service="web") > 0
        assert rate_of("Sent per container", container=names["shop"], instance=instance[1]) > 0
        top = shown("Top 10 containers (sent + received)")
        assert {r["metric"].get("container") for r in top} >= {names["shop"], names["pay"]}, top
        assert rate_of("Top 10 services (sent + received)", application="shop", service="web") > 0
        table = {(r["metric"]["instance"], r["metric"]["container"], r["metric"]["service"],
                  r["metric"]["application"], r["metric"]["address"]) for r in shown("Containers")}
        assert (instance[1], names["shop"], "web", "shop", ip["shop"]) in table, table
        assert (instance[2], names["pay"], "api", "pay", ip["pay"]) in table, table
        assert rate_of("Endpoints") >= 2 and rate_of("Hosts scraped") == 2
        routes = shown("Route available")                       # every host's route of every cluster CIDR
        assert {r["metric"]["instance"] for r in routes} == set(instance.values()), routes
        assert all(float(r["value"][1]) == 1 for r in routes), routes
        assert rate_of("Docker calls", call="NetworkDriver.CreateEndpoint") > 0, \
            json.dumps(prom.query('vpcnet_docker_requests_total{call="NetworkDriver.CreateEndpoint"}[1m]'))
        latency = _series(shown("Docker call p99 latency"), call="NetworkDriver.Join")
        assert latency and 0 < latency[0] < 10, shown("Docker call p99 latency")
        assert rate_of("Since the last good datapath pass") > 0
        # one application picked: only its services; one host picked: only its containers
        pay = dict(everything, application="pay")
        assert {(r["metric"]["application"], r["metric"]["service"]) for r in shown("Sent per service", pay)} \
            == {("pay", "api")}
        one = dict(everything, instance=re.escape(instance[2]).replace("\\", "\\\\"))   # as Grafana escapes it
        assert {r["metric"]["instance"] for r in shown("Sent per container", one)} == {instance[2]}

        pairs = "Service to service (bytes/s sent)"
        plugin_families = prom.families()
        assert set(PEER_FAMILIES) <= plugin_families, plugin_families
        assert rate_of(pairs, application="shop", service="web", peer_application="pay",
                       peer_service="api") > 0, shown(pairs)

        print("\nsum by (application, service) of the traffic families, bytes in the last minute:")
        for family in ("transmit_bytes", "receive_bytes", "transmit_packets", "receive_packets"):
            expr = f"sum by (application, service) (increase(vpcnet_endpoint_{family}_total[1m]))"
            for r in prom.query(expr):
                print(f"  {family:17} {r['metric']}: {float(r['value'][1]):.0f}")
        served = sorted(set(PEER_FAMILIES) & plugin_families)
        print(f"service-to-service join ({pairs}), peer families served: {served}")
        for r in shown(pairs):
            print(f"  {r['metric']}: {float(r['value'][1]):.0f} B/s")
        print(f"panels answering: {sum(len(e) for e in panels.values()) } queries of {len(panels)} panels, "
              f"{len(variables)} variables; empty with this traffic: {sorted(set(empty))}")
    finally:
        if prom is not None:
            prom.stop()
        for k, project, service in PROJECTS:
            stop_project(lab, k, project, service, tmp_path, compose)


def test_a_published_port_answers_a_container_on_another_host_in_ebpf_mode(lab, boxes):
    """Issue 20's catch: h1's container publishes 18080; h2's container connects to it at h1's gateway of vpc0
    (a cluster address: h2 sends it unmasqueraded, the fast paths carry the request) and at h1's own address
    (masqueraded by h2). The reply to the cluster address must leave h1 through its conntrack (un-DNATed),
    not the container program's fast path: the connection answers, and the server saw the client's own
    address. h2's host itself reaches it too."""
    from test_docker_ports import SERVE, peer_of

    assert uplink_programs(lab, 1), "vpc0 is an ebpf-mode network (the default on this kernel)"
    web = unique("lab1-web-")
    lab.docker(1, "run", "-d", "--name", web, "--network", "vpc0", "-p", "18080:80", "vpcnet-testbox:latest", *SERVE)
    try:
        gateway = lab.docker(1, "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", "vpc0").stdout.strip()
        client = boxes(2)
        h1 = "192.168.240.11"                 # host 1 on the underlay (vpcnet_lab.lab)

        def seen(address: str) -> str:
            return peer_of(client.sh("sh", "-c", f"nc -w 3 {address} 18080 </dev/null", check=False).stdout)

        assert wait_for(lambda: seen(gateway) == client.ip, 20, 0.5), "h2's container, unmasqueraded"
        assert seen(h1) == "192.168.240.12", "h2's container through h1's own address (masqueraded by h2)"
        out = run(["ip", "netns", "exec", lab.host_netns(2), "busybox", "nc", "-w", "3", h1, "18080"],
                  input="", check=False).stdout
        assert peer_of(out) == "192.168.240.12", "h2 itself"
    finally:
        lab.docker(1, "rm", "-f", web, check=False)
    assert seen(gateway) == "", "gone with the container"


def test_a_third_host_joining_later_gets_its_own_block_and_is_reachable(lab, boxes):
    k = lab.add_host()
    assert k == 3
    blocks = [ipaddress.IPv4Network(lab.host_cidr(h)) for h in (1, 2, 3)]
    assert len(set(blocks)) == 3
    assert all(b.subnet_of(ipaddress.IPv4Network(CLUSTER)) for b in blocks)
    assert (lab.route_of(3) or {}).get("Status") == "Available"
    a, b, c = boxes(1), boxes(2), boxes(3)
    assert a.pings(c.ip) and b.pings(c.ip) and c.pings(a.ip) and c.pings(b.ip)
