"""Published ports on the real kernel, every mode, two simulated hosts (test_dataplane.two_hosts:
their uplinks are the two ends of one link, each routing the other's host CIDR to it as the VPC does).

Host A publishes 192.0.2.10:8080 -> container A1 (10.77.3.2):80 (and 5353/udp -> 53, asked from B1). It answers from:
- host B (another host of the VPC, and what an outside client looks like: its source is no cluster address),
- container B1 on host B (10.77.4.2; B's network has the VPC on its no-NAT list, so A1 sees the cluster
  address: the reply goes towards the cluster CIDR, which in ebpf mode is the fast path's traffic),
- container A2 on host A (hairpin through the host address), A1 itself (its own published port),
- host A itself (OUTPUT).
A1 sees each client's own address (no proxy), but its own, masqueraded for the hairpin to itself.
In ebpf mode, the same programs without the published port show the catch: B1's connection fails.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
from conftest import run
from test_dataplane import attach_container, ns_run, spec, two_hosts  # noqa: F401  (a fixture)

from vpcnet.datapath import rtnl
from vpcnet.datapath.dataplane import Dataplane, held_in_proc
from vpcnet.datapath.spec import EndpointSpec, PortMapping, mac_for, veth_names

pytestmark = pytest.mark.root

SERVE = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80)); s.listen(16); s.settimeout(60)
    print("ready", flush=True)
    while True:
        try:
            c, addr = s.accept()
        except OSError:
            break
        c.sendall(("hello " + addr[0]).encode()); c.close()
""")

UDP_SERVE = textwrap.dedent("""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 53)); s.settimeout(60)
    print("ready", flush=True)
    while True:
        try:
            data, addr = s.recvfrom(512)
        except OSError:
            break
        s.sendto(("hello " + addr[0]).encode(), addr)
""")

UDP_ASK = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
    for _ in range(3):
        s.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
        try:
            data, addr = s.recvfrom(512)
            print(data.decode() if addr == (sys.argv[1], int(sys.argv[2])) else "from " + str(addr)); break
        except OSError as exc:
            err = type(exc).__name__
    else:
        print(err)
""")

CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
            c.settimeout(2)
            print(c.recv(64).decode() or "no answer")
    except OSError as exc:
        print(type(exc).__name__)
""")


def ask(ns: str, address: str = "192.0.2.10", port: int = 8080) -> str:
    """What the server said to a connection from `ns` ("hello <the source it saw>"), or the error."""
    proc = run(["ip", "netns", "exec", ns, sys.executable, "-c", CONNECT, address, str(port)], timeout=10)
    return proc.stdout.strip()


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_a_published_port_answers_every_client_with_its_real_source(two_hosts, netns_factory, mode):  # noqa: F811
    a, b = two_hosts
    sa = spec(mode=mode, host="10.77.3.0/24")
    sb = spec(mode=mode, tag="b1b2c3d4e5f6", host="10.77.4.0/24", no_nat=["192.0.2.0/24"])
    dpa, dpb = Dataplane(netns=a), Dataplane(netns=b)
    dpa.ensure_host()
    dpb.ensure_host()
    dpa.ensure_network(sa)
    dpb.ensure_network(sb)
    a1 = attach_container(a, dpa, sa, netns_factory, "10.77.3.2", "a" * 64)
    a2 = attach_container(a, dpa, sa, netns_factory, "10.77.3.3", "c" * 64)
    b1 = attach_container(b, dpb, sb, netns_factory, "10.77.4.2", "b" * 64)
    for ns in (a, b):
        ns_run(ns, "iptables", "-P", "FORWARD", "DROP")      # as Docker leaves it
    server = subprocess.Popen(["ip", "netns", "exec", a1, sys.executable, "-c", SERVE], stdout=subprocess.PIPE,
                              text=True)
    udp = subprocess.Popen(["ip", "netns", "exec", a1, sys.executable, "-c", UDP_SERVE], stdout=subprocess.PIPE,
                           text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        assert udp.stdout is not None and udp.stdout.readline().strip() == "ready"
        assert ask(b) != "hello 192.0.2.20", "nothing published yet"
        a1_veth = EndpointSpec(*veth_names("a" * 64), mac_for("10.77.3.2"), "10.77.3.2")
        published = sa.__class__(**{**sa.__dict__, "ports": (PortMapping("tcp", "", 8080, "10.77.3.2", 80),
                                                             PortMapping("udp", "", 5353, "10.77.3.2", 53))})
        dpa.ensure_ports(published, [a1_veth])
        dpa.ensure_ports(published, [a1_veth])                # idempotent
        assert dpa.firewall.apply([], host=True, uplinks=dpa.uplink_names()) == []
        assert "-j DNAT --to-destination 10.77.3.2:80" in ns_run(a, "iptables", "-t", "nat", "-S").stdout

        assert ask(b) == "hello 192.0.2.20", "another host of the VPC (or outside): its own address"
        assert ask(b1) == "hello 10.77.4.2", "a container on another host: its own address"
        assert ask(a2) == "hello 10.77.3.3", "a container on this host (hairpin): its own address"
        assert ask(a1).startswith("hello "), "the container itself, through the host's port"
        assert ask(a).startswith("hello "), "the host itself (OUTPUT)"
        assert ask(b, port=8081) != "hello 192.0.2.20"
        assert ask(b, "10.77.3.2", 80) == "hello 192.0.2.20", "still reachable at its own address"
        udp_ask = ["ip", "netns", "exec", b1, sys.executable, "-c", UDP_ASK, "192.0.2.10", "5353"]
        assert run(udp_ask, timeout=10).stdout.strip() == "hello 10.77.4.2", "UDP, from the host's address:port"

        if mode == "ebpf":     # the catch: the program without the published port sends replies the fast way
            with dpa.nl.ipr() as ipr:
                dpa.tc.attach_endpoint(ipr, sa, dpa.nl.link_index(ipr, a1_veth.host_veth), "10.77.3.2")
            assert ask(b1) != "hello 10.77.4.2", "the reply skipped host A's conntrack: not un-DNATed"
            dpa.ensure_ports(published, [a1_veth])
            assert ask(b1) == "hello 10.77.4.2"

        # a DNAT rule deleted behind vpcnet's back: the datapath pass finds it by reading the kernel, puts it back
        ns_run(a, "iptables", "-t", "nat", "-F", published.ports_chain)
        assert ask(b) != "hello 192.0.2.20"
        repairs = dpa.repair([(published, [a1_veth])])
        assert [r.what for r in repairs] == [f"nat chain {published.ports_chain} holds 0 rule(s), 0 of 2 wanted"]
        assert ask(b) == "hello 192.0.2.20" and dpa.repair([(published, [a1_veth])]) == []

        dpa.ensure_ports(sa, [a1_veth], adding=False)        # unpublished
        assert ask(b) != "hello 192.0.2.20" and ask(b1) != "hello 10.77.4.2"
        assert "VPCNET-P-" not in ns_run(a, "iptables", "-t", "nat", "-S").stdout
        assert ask(b, "10.77.3.2", 80) == "hello 192.0.2.20"
    finally:
        for proc in (server, udp):
            proc.kill()
            proc.wait(timeout=10)


def test_port_taken_sees_host_sockets_and_dockers_rules(two_hosts):  # noqa: F811
    a, _b = two_hosts
    dp = Dataplane(netns=a)
    assert dp.port_taken("tcp", "", 8089) == ""
    holder = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-c",
                               "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 8089)); s.listen(); "
                               "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert "Address already in use" in dp.port_taken("tcp", "", 8089)
        # without CAP_NET_BIND_SERVICE (the managed plugin) a port below 1024 cannot be bound to try: the
        # kernel's socket tables answer instead
        held = lambda *args: rtnl.in_netns(a, lambda: held_in_proc(*args))    # noqa: E731
        assert "a socket of the host holds it (0.0.0.0)" in held("tcp", "", 8089)
        assert held("tcp", "192.0.2.10", 8089) and not held("tcp", "", 8090) and not held("udp", "", 8089)
        assert "Address already in use" in dp.port_taken("tcp", "192.0.2.10", 8089)
        assert dp.port_taken("udp", "", 8089) == ""
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert "Cannot assign requested address" in dp.port_taken("tcp", "192.0.2.99", 8089), "not the host's"
    ns_run(a, "iptables", "-t", "nat", "-N", "DOCKER")
    ns_run(a, "iptables", "-t", "nat", "-A", "DOCKER", "!", "-i", "docker0", "-p", "udp", "-m", "udp", "--dport",
           "5353", "-j", "DNAT", "--to-destination", "172.17.0.2:53")
    dp = Dataplane(netns=a)                 # Docker's rules are read once per call (2 s): a fresh read
    assert "Docker publishes it" in dp.port_taken("udp", "", 5353)
    assert dp.port_taken("udp", "", 535) == "" and dp.port_taken("tcp", "", 5353) == ""


# -- IPv6 ----------------------------------------------------------------------------------------------------
H6, H6_OTHER, B6 = "2001:db8:1::10", "2001:db8:1::11", "2001:db8:1::20"      # host A's uplink addresses, host B's
A1_6, A2_6 = "fd00:77:3:0:1::2", "fd00:77:3:0:1::3"                          # containers of host A's IPv6 block


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_a_published_port_answers_on_the_hosts_ipv6_addresses(two_hosts, netns_factory, mode):  # noqa: F811
    """`-p 8080:80` and `-p [2001:db8:1::10]:8081:80` on a dual-stack network: ip6tables DNATs the host's IPv6
    address to the container's, which sees each client's own source (another host, a container of this host
    through the host's address, itself, the host); the repair pass puts a flushed chain back, and
    unpublishing takes every rule."""
    from test_datapath_ipv6 import container

    from vpcnet.datapath import ports6
    from vpcnet.datapath.firewall import parse_save
    from vpcnet.datapath.ipv6 import Ipv6Endpoint

    a, b = two_hosts
    for ns, mine in ((a, (H6, H6_OTHER)), (b, (B6,))):
        for address in mine:
            run(["ip", "-n", ns, "-6", "addr", "add", f"{address}/64", "dev", "uplink0", "nodad"])
    sa = dataclasses.replace(spec(mode=mode, host="10.77.3.0/24"), host_cidr_v6="fd00:77:3:0:1::/80",
                             cluster_cidr_v6="fd00:77::/32")       # dual-stack: only such a network has IPv6 ports
    dpa = Dataplane(netns=a)
    v6 = [Ipv6Endpoint(veth_names("a" * 64)[0], A1_6), Ipv6Endpoint(veth_names("c" * 64)[0], A2_6)]
    dpa.ipv6_endpoints = lambda: v6
    dpa.ensure_host()
    dpa.ensure_network(sa)
    a1 = container(a, dpa, sa, netns_factory, "10.77.3.2", A1_6, "a" * 64)
    a2 = container(a, dpa, sa, netns_factory, "10.77.3.3", A2_6, "c" * 64)
    for ep in v6:
        dpa.ensure_endpoint_ipv6(sa, ep.host_veth, ep.address)
    ns_run(a, "ip6tables", "-P", "FORWARD", "DROP")         # as Docker 27+ leaves it
    server = subprocess.Popen(["ip", "netns", "exec", a1, sys.executable, "-c", SERVE.replace(
        "socket.socket()", "socket.socket(socket.AF_INET6)").replace('"0.0.0.0"', '"::"')], stdout=subprocess.PIPE,
        text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        assert ask(b, H6) != f"hello {B6}", "nothing published yet"
        a1_veth = EndpointSpec(*veth_names("a" * 64), mac_for("10.77.3.2"), "10.77.3.2")
        published = sa.__class__(**{**sa.__dict__, "ports": (
            PortMapping("tcp", "", 8080, A1_6, 80, "ipv6"), PortMapping("tcp", H6, 8081, A1_6, 80, "ipv6"))})
        dpa.ensure_ports(published, [a1_veth])
        dpa.ensure_ports(published, [a1_veth])                # idempotent
        saved = parse_save(ns_run(a, "ip6tables-save").stdout)
        assert ports6.diff(saved, [published]) == ([], ""), "every rule reads back as written"
        assert f"-j DNAT --to-destination [{A1_6}]:80" in ns_run(a, "ip6tables", "-t", "nat", "-S").stdout
        assert "VPCNET-P-" not in ns_run(a, "iptables", "-t", "nat", "-S").stdout, "no IPv4 rule for them"

        assert ask(b, H6) == f"hello {B6}", "another host (or outside): its own address"
        assert ask(b, H6_OTHER) == f"hello {B6}", "[::]: every IPv6 address of the host"
        assert ask(b, H6, 8081) == f"hello {B6}" and ask(b, H6_OTHER, 8081) != f"hello {B6}", "one address only"
        assert ask(a2, H6) == f"hello {A2_6}", "a container on this host (hairpin): its own address"
        assert ask(a1, H6).startswith("hello "), "the container itself, through the host's port"
        assert ask(a, H6).startswith("hello "), "the host itself (OUTPUT)"
        assert ask(b, "192.0.2.10") != f"hello {B6}" and not ask(b, "192.0.2.10").startswith("hello")

        # a DNAT chain flushed behind vpcnet's back: the datapath pass finds it and puts it back
        ns_run(a, "ip6tables", "-t", "nat", "-F", published.ports_chain)
        assert ask(b, H6) != f"hello {B6}"
        repairs = dpa.repair([(published, [a1_veth])])
        flushed = f"ip6tables nat chain {published.ports_chain} holds 0 rule(s), 0 of 2 wanted"
        assert flushed in [r.what for r in repairs]
        assert ask(b, H6) == f"hello {B6}" and dpa.repair([(published, [a1_veth])]) == []

        dpa.ensure_ports(sa, [a1_veth], adding=False)        # unpublished
        assert ask(b, H6) != f"hello {B6}" and ask(a2, H6) != f"hello {A2_6}"
        assert "VPCNET-P-" not in ns_run(a, "ip6tables", "-t", "nat", "-S").stdout
        dpa.ensure_ports(published, [a1_veth])
        dpa.delete_network(published)
        assert "VPCNET-P-" not in ns_run(a, "ip6tables", "-t", "nat", "-S").stdout, "a deleted network's go too"
    finally:
        server.kill()
        server.wait(timeout=10)


def test_port_taken_checks_ipv6_apart(two_hosts):  # noqa: F811
    """IPv6: a trial bind with IPV6_V6ONLY (a socket on 0.0.0.0 holds no IPv6 port, one on [::] holds both)
    and Docker's ip6tables DNAT rules."""
    a, _b = two_hosts
    run(["ip", "-n", a, "-6", "addr", "add", f"{H6}/64", "dev", "uplink0", "nodad"])
    dp = Dataplane(netns=a)
    for bound, v4, v6 in (("0.0.0.0", True, False), ("::", True, True)):
        family = "AF_INET6" if ":" in bound else "AF_INET"
        holder = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-c",
                                   f"import socket,time; s=socket.socket(socket.{family}); s.bind(('{bound}', 8089)); "
                                   "s.listen(); print('ready', flush=True); time.sleep(60)"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            assert bool(dp.port_taken("tcp", "", 8089)) == v4, bound
            assert bool(dp.port_taken("tcp", "", 8089, "ipv6")) == v6, bound
            assert bool(dp.port_taken("tcp", H6, 8089, "ipv6")) == v6, bound
            held = rtnl.in_netns(a, lambda: held_in_proc("tcp", "", 8089, "ipv6"))
            assert bool(held) == v6 and (not v6 or "[::]:8089/tcp: a socket of the host holds it" in held)
        finally:
            holder.kill()
            holder.wait(timeout=10)
    assert "Cannot assign requested address" in dp.port_taken("tcp", "2001:db8:1::99", 8089, "ipv6"), "not the host's"
    ns_run(a, "ip6tables", "-t", "nat", "-N", "DOCKER")
    ns_run(a, "ip6tables", "-t", "nat", "-A", "DOCKER", "!", "-i", "docker0", "-p", "tcp", "-m", "tcp", "--dport",
           "8443", "-j", "DNAT", "--to-destination", "[fd00:dead::2]:443")
    dp = Dataplane(netns=a)
    assert "Docker publishes it" in dp.port_taken("tcp", "", 8443, "ipv6")
    assert dp.port_taken("tcp", "", 8443) == "", "Docker's IPv6 rule holds no IPv4 port"
