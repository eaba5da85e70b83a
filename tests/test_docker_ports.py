"""Published ports with the real engine and kernel: `docker run -p/-P`, Compose `ports:`, conflicts,
stop/start/rm, a plugin kill -9 and restart, DOCKER-USER. The published container answers every client with
the table of its TCP connections (`nc -ll -e cat /proc/net/tcp /proc/net/tcp6`), so a test reads the source address the
container saw: no proxy in between, the client's own address."""
from __future__ import annotations

import ipaddress
import shlex
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest
from conftest import run, unique
from test_docker_current import require_compose
from test_docker_e2e import OUTSIDE_HOST_IP, OUTSIDE_PEER_IP, outside, outside_link  # noqa: F401  (fixtures)
from test_docker_ipv6 import ipv6_sysctls_kept  # noqa: F401  (a fixture)
from test_doctor import doctor

pytestmark = pytest.mark.docker

SERVE = ("nc", "-ll", "-p", "80", "-e", "cat", "/proc/net/tcp", "/proc/net/tcp6")   # nc listens on IPv6 too
CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as c:
            c.settimeout(3)
            data = b""
            while len(data) < 262144:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            print(data.decode())
    except OSError as exc:
        print(type(exc).__name__)
""")


def peer_of(table: str, port: int = 80) -> str:
    """The remote address of the established connection to `port` in a /proc/net/tcp{,6} dump ("" if none;
    an IPv4-mapped IPv6 address is the IPv4 address in its last word)."""
    for line in table.splitlines():
        fields = line.split()
        # the connection being served: ESTABLISHED (01), or CLOSE_WAIT (08) when the client closed its side
        # (nc); earlier ones are closing from the server's side (FIN_WAIT, TIME_WAIT)
        if len(fields) > 3 and fields[3] in ("01", "08") and int(fields[1].split(":")[1], 16) == port:
            return socket.inet_ntoa(bytes.fromhex(fields[2].split(":")[0][-8:])[::-1])
    return ""


def seen_from_host(address: str, port: int, ns: str | None = None) -> str:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    out = run([*prefix, sys.executable, "-c", CONNECT, address, str(port)], timeout=15).stdout
    return peer_of(out)


def seen_from_container(dock, container: str, address: str, port: int) -> str:
    out = dock.exec(container, "sh", "-c", f"nc -w 3 {address} {port} </dev/null", check=False).stdout
    return peer_of(out)


def host_address() -> str:
    """This host's address on its default route's device (the engine's namespace under with-docker.sh)."""
    dev = run(["ip", "route", "show", "default"]).stdout.split(" dev ")[1].split()[0]
    return run(["ip", "-4", "-o", "addr", "show", "dev", dev]).stdout.split()[3].split("/")[0]


def published(plugin) -> list[str]:
    return sorted(f"{p['host_ip']}:{p['host_port']}->{ep['address']}:{p['container_port']}/{p['proto']}"
                  for n in plugin.status()["networks"] for ep in n["endpoints"] for p in ep["ports"])


def ports_chain(plugin) -> list[str]:
    tag = plugin.status()["networks"][0]["network_id"][:12]
    proc = run(["iptables", "-t", "nat", "-S", f"VPCNET-P-{tag}"], check=False)
    return sorted(line for line in proc.stdout.splitlines() if line.startswith("-A "))


def test_published_ports_answer_with_the_clients_address_and_follow_the_container(plugin_factory, dock, outside):  # noqa: F811
    plugin = plugin_factory()
    net = dock.network_create(plugin).name
    web = dock.run_container(net, "-p", "18080:80", "-p", "18081-18089:81", "-p", "15353:53/udp", "--expose", "82",
                             "-P", cmd=SERVE).name
    ip_web = dock.ip_of(web)
    have = published(plugin)
    assert f"0.0.0.0:18080->{ip_web}:80/tcp" in have and f"0.0.0.0:15353->{ip_web}:53/udp" in have, have
    (ranged,) = [p for p in have if p.endswith(":81/tcp")]
    assert 18081 <= int(ranged.split(":")[1].split("-")[0]) <= 18089
    assert len(have) == 4 and any(p.endswith(":82/tcp") for p in have), "-P publishes the exposed port"
    assert len(ports_chain(plugin)) == 4

    me = host_address()
    client = dock.run_container(net).name
    assert seen_from_host(OUTSIDE_HOST_IP, 18080, outside) == OUTSIDE_PEER_IP, "outside: its own address"
    assert seen_from_container(dock, client, me, 18080) == dock.ip_of(client), "hairpin: its own address"
    assert seen_from_host(me, 18080) != "", "the host itself"
    assert seen_from_container(dock, client, ip_web, 80) == dock.ip_of(client), "and still at its own address"

    # DOCKER-USER filters published ports as on Docker's bridge networks
    rule = ["DOCKER-USER", "-s", OUTSIDE_PEER_IP, "-m", "comment", "--comment", unique("vpcnet-test-"), "-j", "DROP"]
    run(["iptables", "-I", *rule])
    try:
        assert seen_from_host(OUTSIDE_HOST_IP, 18080, outside) == ""
    finally:
        run(["iptables", "-D", *rule])
    assert seen_from_host(OUTSIDE_HOST_IP, 18080, outside) == OUTSIDE_PEER_IP

    # conflicts: another container's port, a host process's, a loopback address; nothing left behind
    taken = dock.run_container(net, "-p", "18080:80", check=False)
    assert taken.returncode != 0 and "18080" in taken.stderr and "already allocated" in taken.stderr, taken.stderr
    holder = subprocess.Popen([sys.executable, "-c", "import socket,time; s=socket.socket(); "
                               "s.bind(('0.0.0.0', 18090)); s.listen(); print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        busy = dock.run_container(net, "-p", "18090:80", check=False)
        assert busy.returncode != 0 and "Address already in use" in busy.stderr, busy.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
    loopback = dock.run_container(net, "-p", "127.0.0.1:18091:80", check=False)
    assert loopback.returncode != 0 and "route_localnet" in loopback.stderr, loopback.stderr
    assert published(plugin) == have and len(ports_chain(plugin)) == 4

    # kill -9 and a restart: the mappings stay exactly as they were, and answer
    rules = ports_chain(plugin)
    plugin.kill9()
    plugin.start()
    assert published(plugin) == have and ports_chain(plugin) == rules
    assert seen_from_host(OUTSIDE_HOST_IP, 18080, outside) == OUTSIDE_PEER_IP

    # stop, start, rm: the mappings follow the container
    dock("stop", "-t", "1", web)
    assert published(plugin) == [] and ports_chain(plugin) == []
    dock("start", web)
    again = published(plugin)
    assert len(again) == 4 and f"0.0.0.0:18080->{dock.ip_of(web)}:80/tcp" in again
    assert seen_from_host(OUTSIDE_HOST_IP, 18080, outside) == OUTSIDE_PEER_IP
    dock("network", "disconnect", net, web)
    assert published(plugin) == [] and ports_chain(plugin) == []
    assert seen_from_host(OUTSIDE_HOST_IP, 18080, outside) == ""
    dock("network", "connect", net, web)          # a running container joins: Docker publishes again
    assert len(published(plugin)) == 4 and seen_from_host(OUTSIDE_HOST_IP, 18080, outside) == OUTSIDE_PEER_IP
    dock("rm", "-f", web)
    assert published(plugin) == [] and ports_chain(plugin) == []
    assert seen_from_host(OUTSIDE_HOST_IP, 18080, outside) == ""


COMPOSE = """\
services:
  web:
    image: {image}
    command: ["nc", "-ll", "-p", "80", "-e", "cat", "/proc/net/tcp", "/proc/net/tcp6"]
    networks: [vnet]
    ports:
      - "18180:80"
      - target: 80
        published: "18181"
        protocol: tcp
        host_ip: 0.0.0.0
networks:
  vnet:
    driver: {driver}
    ipam:
      driver: {driver}
"""


def test_compose_ports_short_and_long_form_come_up_and_down_leaves_nothing(current_docker, plugin_factory, dock,
                                                                         tmp_path, outside):  # noqa: F811
    require_compose(current_docker)
    plugin = plugin_factory()
    project = unique("vpcp")
    path = tmp_path / f"{project}.yml"
    path.write_text(COMPOSE.format(image=dock.image, driver=plugin.name))
    compose = [*current_docker, "compose", "-p", project, "-f", str(path)]
    try:
        run([*compose, "up", "-d"], timeout=180)
        have = published(plugin)
        assert [p.split("->")[0] for p in have] == ["0.0.0.0:18180", "0.0.0.0:18181"], have
        for port in (18180, 18181):
            assert seen_from_host(OUTSIDE_HOST_IP, port, outside) == OUTSIDE_PEER_IP
    finally:
        down = run([*compose, "down", "--timeout", "1"], check=False, timeout=180)
    assert down.returncode == 0, down.stderr
    assert plugin.status()["networks"] == [], "no network, endpoint or published port left in vpcnet's store"
    assert "VPCNET-P-" not in run(["iptables-save", "-t", "nat"]).stdout


# -- IPv6 ------------------------------------------------------------------------------------------------------
OUTSIDE_HOST_IP6, OUTSIDE_PEER_IP6 = "2001:db8:5100::1", "2001:db8:5100::2"      # beside the outside's IPv4


def peer6_of(table: str, port: int = 80) -> str:
    """The remote IPv6 address of the established connection to `port` in a /proc/net/tcp6 dump ("" if none)."""
    for line in table.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] in ("01", "08") and len(fields[2].split(":")[0]) == 32 and \
                int(fields[1].split(":")[1], 16) == port:
            raw = bytes.fromhex(fields[2].split(":")[0])
            return str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return ""


def published6(plugin) -> list[str]:
    return sorted(f"[{p['host_ip']}]:{p['host_port']}->[{ep['address_v6']}]:{p['container_port']}/{p['proto']}"
                  for n in plugin.status()["networks"] for ep in n["endpoints"] for p in ep["ports"]
                  if p["family"] == "ipv6")


def ports_chain6(plugin) -> list[str]:
    tag = plugin.status()["networks"][0]["network_id"][:12]
    proc = run(["ip6tables", "-t", "nat", "-S", f"VPCNET-P-{tag}"], check=False)
    return sorted(line for line in proc.stdout.splitlines() if line.startswith("-A "))


def test_ipv6_published_ports_on_a_dual_stack_network(plugin_factory, dock, outside, outside_link,  # noqa: F811
                                                      ipv6_sysctls_kept):  # noqa: F811
    """`-p 18480:80` on a dual-stack network publishes on the host's IPv6 addresses too (Docker 28 sends
    [::] beside 0.0.0.0, 20.10 one binding without an address: both), `-p [addr]:18481:80` on one of them;
    the container sees each client's own IPv6 address; [::1] and a port a host process holds on IPv6 are
    refused; DOCKER-USER filters them where Docker has it in ip6tables; kill -9 keeps them, stop takes them."""
    cluster6 = f"fd{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::/48"
    plugin = plugin_factory({"VPCNET_CLUSTER_CIDR_V6": cluster6})
    run(["ip", "-6", "addr", "add", f"{OUTSIDE_HOST_IP6}/64", "dev", outside_link, "nodad"])
    run(["ip", "-n", outside, "-6", "addr", "add", f"{OUTSIDE_PEER_IP6}/64", "dev", "eth0", "nodad"])
    net = dock.network_create(plugin, None, "--ipv6", "--subnet", plugin.cluster, "--subnet", cluster6).name
    web = dock.run_container(net, "-p", "18480:80", "-p", f"[{OUTSIDE_HOST_IP6}]:18481:80", cmd=SERVE).name
    ip6_web = next(ep["address_v6"] for ep in plugin.status()["networks"][0]["endpoints"])
    have = published6(plugin)
    assert have == sorted([f"[::]:18480->[{ip6_web}]:80/tcp", f"[{OUTSIDE_HOST_IP6}]:18481->[{ip6_web}]:80/tcp"]), have
    assert f"0.0.0.0:18480->{dock.ip_of(web)}:80/tcp" in published(plugin), "IPv4 as before"
    assert len(ports_chain6(plugin)) == 2 and all(f"[{ip6_web}]:80" in r for r in ports_chain6(plugin))

    def seen6(port: int, ns: str | None = outside, address: str = OUTSIDE_HOST_IP6) -> str:
        prefix = ["ip", "netns", "exec", ns] if ns else []
        return peer6_of(run([*prefix, sys.executable, "-c", CONNECT, address, str(port)], timeout=15).stdout)

    assert seen6(18480) == OUTSIDE_PEER_IP6 and seen6(18481) == OUTSIDE_PEER_IP6, "outside: its own address"
    assert seen_from_host(OUTSIDE_HOST_IP, 18480, outside) == OUTSIDE_PEER_IP, "and over IPv4"
    client = dock.run_container(net).name
    ip6_client = next(ep["address_v6"] for ep in plugin.status()["networks"][0]["endpoints"]
                      if ep["address"] == dock.ip_of(client))
    out = dock.exec(client, "sh", "-c", f"nc -w 3 {OUTSIDE_HOST_IP6} 18480 </dev/null", check=False).stdout
    assert peer6_of(out) == ip6_client, "hairpin: its own address"
    assert seen6(18480, None) != "", "the host itself"
    if run(["ip6tables", "-S", "DOCKER-USER"], check=False).returncode == 0:       # Docker 27+: its IPv6 chains
        rule = ["DOCKER-USER", "-s", OUTSIDE_PEER_IP6, "-m", "comment", "--comment", unique("vpcnet-test-"), "-j",
                "DROP"]
        run(["ip6tables", "-I", *rule])
        try:
            assert seen6(18480) == "", "DOCKER-USER filters IPv6 published ports"
        finally:
            run(["ip6tables", "-D", *rule])

    loopback = dock.run_container(net, "-p", "[::1]:18482:80", check=False)
    assert loopback.returncode != 0 and "route_localnet" in loopback.stderr, loopback.stderr
    holder = subprocess.Popen([sys.executable, "-c", "import socket,time; s=socket.socket(socket.AF_INET6); "
                               "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s.bind(('::', 18483)); "
                               "s.listen(); print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        busy = dock.run_container(net, "-p", "18483:80", check=False)
        assert busy.returncode != 0 and "[::]:18483/tcp: Address already in use" in busy.stderr, busy.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert published6(plugin) == have and len(ports_chain6(plugin)) == 2, "nothing left of the refused ones"

    # doctor checks them: in place, then a DNAT rule deleted by hand is named
    assert "firewall" not in doctor(plugin)[1]
    tag = plugin.status()["networks"][0]["network_id"][:12]
    dnat = shlex.split(ports_chain6(plugin)[0])[2:]
    run(["ip6tables", "-t", "nat", "-D", f"VPCNET-P-{tag}", *dnat])
    finding = doctor(plugin)[1]["firewall"][0]
    assert f"ip6tables nat chain VPCNET-P-{tag} does not hold its published ports ([" in finding["detail"], finding
    run(["ip6tables", "-t", "nat", "-A", f"VPCNET-P-{tag}", *dnat])

    rules = ports_chain6(plugin)
    plugin.kill9()
    plugin.start()
    assert published6(plugin) == have and ports_chain6(plugin) == rules
    assert seen6(18480) == OUTSIDE_PEER_IP6
    dock("stop", "-t", "1", web)
    assert published6(plugin) == [] and ports_chain6(plugin) == [] and seen6(18480) == ""
    dock("rm", "-f", web)
    assert "VPCNET-P-" not in run(["ip6tables-save", "-t", "nat"]).stdout
