"""Who talks to whom: the peer map written by vpcnet's eBPF programs (vpcnet.datapath.ebpf.maps,
vpcnet.datapath.tc) and the `vpcnet_endpoint_peer_*` families (vpcnet.observability.metrics.PeerTotals).
Real kernel, in namespaces the tests make (two simulated hosts as in test_dataplane), real traffic (ping):
counts per peer and direction for a same-host peer, another host's container and outside, in every mode;
a forged source (and in bridge mode a flooded frame) counted under no one;
the bound (N series + other, never decreasing, also across an eviction); the switch off loads nothing;
the counting programs go with their endpoint and network, and the periodic pass puts them back."""
from __future__ import annotations

import os
import re
import uuid

import pytest
from conftest import is_root, require, run, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_dataplane import attach_container, spec

from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.ebpf import maps
from vpcnet.datapath.spec import EndpointSpec, mac_for, veth_names
from vpcnet.observability import metrics
from vpcnet.state.store import Endpoint, Network, Store

CLUSTER = "10.78.0.0/16"
A_BLOCK, B_BLOCK = "10.78.3.0/24", "10.78.4.0/24"
PAYLOAD = 100
FRAME = 14 + 20 + 8 + PAYLOAD          # what skb->len is at tc: Ethernet, IPv4, ICMP, payload
TX, RX = maps.TRANSMIT, maps.RECEIVE


@pytest.fixture
def hosts(netns_factory):
    """Two simulated hosts on one link (the VPC), each routing the other's block to it."""
    require(is_root(), "needs root (bpf(2), namespaces)")
    a, b = netns_factory("vpcpa"), netns_factory("vpcpb")
    run(["ip", "-n", a, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0", "netns", b])
    for ns, me, other, block in ((a, "192.0.2.10", "192.0.2.20", B_BLOCK), (b, "192.0.2.20", "192.0.2.10", A_BLOCK)):
        run(["ip", "-n", ns, "addr", "add", f"{me}/24", "dev", "uplink0"])
        run(["ip", "-n", ns, "link", "set", "uplink0", "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", other])
        run(["ip", "-n", ns, "route", "add", block, "via", other])
    return a, b


def ping(ns: str, target: str, count: int = 3) -> tuple[int, int]:
    """(echo requests sent, replies received), as ping counted them (a loaded machine may lose one)."""
    out = run(["ip", "netns", "exec", ns, "busybox", "ping", "-q", "-A", "-c", str(count), "-W", "2", "-s",
               str(PAYLOAD), target]).stdout
    sent, received = re.search(r"(\d+) packets transmitted, (\d+) packets received", out).groups()
    assert int(sent) == count, out
    return int(sent), int(received)


def reading(address: str) -> dict[tuple[int, str | None], tuple[int, int]]:
    return {(d, peer): v for (ep, d, peer), v in maps.read_all().items() if ep == address}


def setup(hosts, netns_factory, mode: str, peers: bool = True):
    a, b = hosts
    sa = spec(mode=mode, host=A_BLOCK, cluster=CLUSTER, tag="a1b2c3d4e5f7")
    sb = spec(mode=mode, host=B_BLOCK, cluster=CLUSTER, tag="b1b2c3d4e5f7")
    dpa, dpb = Dataplane(netns=a, peers=peers), Dataplane(netns=b, peers=peers)
    dpa.ensure_network(sa)
    dpb.ensure_network(sb)
    boxes = {ip: attach_container(ns, dp, s, netns_factory, ip, eid * 64)
             for ns, dp, s, ip, eid in ((a, dpa, sa, "10.78.3.2", "a"), (a, dpa, sa, "10.78.3.3", "c"),
                                        (b, dpb, sb, "10.78.4.2", "b"))}
    return dpa, dpb, sa, sb, boxes


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_traffic_is_counted_per_peer_and_direction_in_every_mode(hosts, netns_factory, mode):
    dpa, dpb, sa, sb, boxes = setup(hosts, netns_factory, mode)
    me = "10.78.3.2"
    try:
        maps.forget({me, "10.78.3.3", "10.78.4.2"})         # a leftover of an earlier run on this kernel
        counted = {"10.78.3.3": ping(boxes[me], "10.78.3.3", 3),     # same host
                   "10.78.4.2": ping(boxes[me], "10.78.4.2", 4),     # another host
                   None: ping(boxes[me], "192.0.2.20", 5)}           # outside the cluster CIDR (masqueraded)
        got = reading(me)
        for peer, (sent, received) in counted.items():
            assert got[(TX, peer)] == (sent * FRAME, sent), (peer, got)
            assert got[(RX, peer)] == (received * FRAME, received), (peer, got)
        assert set(got) == {(d, p) for d in (TX, RX) for p in ("10.78.3.3", "10.78.4.2", None)}, got
        # the other ends saw it the other way round (each answered every request it got)
        assert reading("10.78.4.2")[(TX, me)] >= got[(RX, "10.78.4.2")]
        assert reading("10.78.3.3")[(TX, me)] >= got[(RX, "10.78.3.3")]
    finally:
        dpa.delete_network(sa)
        dpb.delete_network(sb)
        dpa.forget_peers([me, "10.78.3.3", "10.78.4.2"])
    assert reading(me) == {}


FORGE = """
import socket, struct, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def csum(b):
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    t = (t >> 16) + (t & 0xffff)
    return ~(t + (t >> 16)) & 0xffff
icmp = struct.pack("!BBHHH", 8, 0, 0, 7, 1) + b"x" * {payload}
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
if len(sys.argv) > 4:          # a broadcast frame, as a bridge floods it to every port
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind(("eth0", 0x0800))
    for _ in range(n):
        s.send(b"\\xff" * 6 + s.getsockname()[4] + b"\\x08\\x00" + ip + icmp)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for _ in range(n):
        s.sendto(ip + icmp, (dst, 0))
""".replace("{payload}", str(PAYLOAD))


def veth_packets(ns: str, link: str, direction: str = "rx") -> int:
    return int(run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{link}/statistics/{direction}_packets"]).stdout)


@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_a_forged_source_is_counted_under_no_one(hosts, netns_factory, mode):
    """A container sends echo requests from another container's address and from one nobody holds: no
    key under either, none under its own for them (its real ping alone is counted), though its host
    veth saw them (what vpcnet_endpoint_transmit_* read). Bridge mode: a frame the bridge floods to every
    port is not counted as the receive of the endpoints it was not for."""
    dpa, dpb, sa, sb, boxes = setup(hosts, netns_factory, mode)
    a, _b = hosts
    me, other, nobody = "10.78.3.2", "10.78.3.3", "10.78.3.77"
    host_veth = veth_names("a" * 64)[0]
    try:
        maps.forget({me, other, nobody, "10.78.4.2"})
        before = veth_packets(a, host_veth)
        for forged in (other, nobody):
            run(["ip", "netns", "exec", boxes[me], "python3", "-c", FORGE, forged, "10.78.4.2", "3"])
        assert wait_for(lambda: veth_packets(a, host_veth) - before >= 6, 5, 0.05), "the forged packets left"
        sent, _received = ping(boxes[me], "10.78.4.2", 2)
        if mode == "bridge":
            flooded = veth_packets(a, host_veth, "tx")
            run(["ip", "netns", "exec", boxes[other], "python3", "-c", FORGE, other, nobody, "3", "broadcast"])
            assert wait_for(lambda: veth_packets(a, host_veth, "tx") - flooded >= 3, 5, 0.05), "not flooded to me"
        got = reading(me)
        assert got[(TX, "10.78.4.2")] == (sent * FRAME, sent), got
        assert not [k for k in got if k[0] == TX and k[1] != "10.78.4.2"], got
        assert (RX, other) not in got, got
        assert not [k for k in reading(other) if k[0] == TX and k[1] != nobody], reading(other)
        assert reading(nobody) == {}
    finally:
        dpa.delete_network(sa)
        dpb.delete_network(sb)
        dpa.forget_peers([me, other, nobody, "10.78.4.2"])


def test_the_switch_off_loads_no_counting_and_serves_no_family(hosts, netns_factory, tmp_path):
    dpa, dpb, sa, sb, boxes = setup(hosts, netns_factory, "routed", peers=False)
    a, _b = hosts
    maps.forget({"10.78.3.2"})
    ping(boxes["10.78.3.2"], "10.78.4.2", 2)
    assert reading("10.78.3.2") == {}
    host_veth = veth_names("a" * 64)[0]
    filters = run(["ip", "netns", "exec", a, "tc", "filter", "show", "dev", host_veth, "egress"], check=False).stdout
    assert "bpf" not in filters
    store = Store(str(tmp_path / "vpcnet.db"))
    collector = metrics.StateCollector(store, link_stats=dict, peer_stats=None)
    assert "vpcnet_endpoint_peer" not in collector.traffic_text()
    store.close()


def test_counting_programs_go_with_the_endpoint_and_the_pass_puts_them_back(hosts, netns_factory):
    dpa, dpb, sa, sb, boxes = setup(hosts, netns_factory, "routed")
    a, _b = hosts
    host_veth, peer_veth = veth_names("a" * 64)

    def filters(direction: str) -> str:
        return run(["ip", "netns", "exec", a, "tc", "filter", "show", "dev", host_veth, direction], check=False).stdout

    assert "vpcnet_count" in filters("ingress") and "vpcnet_count" in filters("egress")
    run(["ip", "netns", "exec", a, "tc", "qdisc", "del", "dev", host_veth, "clsact"])
    ep = EndpointSpec(host_veth, peer_veth, mac_for("10.78.3.2"), "10.78.3.2")
    repairs = dpa.repair([(sa, [ep])])
    assert any("counting" in r.what for r in repairs), repairs
    assert "vpcnet_count" in filters("ingress") and "vpcnet_count" in filters("egress")
    maps.forget({"10.78.3.2"})
    ping(boxes["10.78.3.2"], "10.78.4.2", 2)
    assert reading("10.78.3.2")[(TX, "10.78.4.2")][1] == 2


# -- the exporter: bounded, sticky, never decreasing ----------------------------------------------------

NET = "d1b2c3d4e5f6" + "0" * 52
EID = "f" * 64


@pytest.fixture
def store(tmp_path):
    store = Store(str(tmp_path / "vpcnet.db"))
    with store.tx() as db:
        store.add_network(db, Network(NET, "10.9.1.0/24", "10.9.0.0/16", "10.9.1.1", "vbr-d1b2c3", 1500, False, ()))
        store.add_endpoint(db, Endpoint(EID, NET, "10.9.1.2", "02:00:00:00:00:01", "vhpeers", "vcpeers"))
    yield store
    store.close()


def peer_samples(text: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels["peer"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("vpcnet_endpoint_peer_")}


def test_the_busiest_peers_keep_their_series_the_rest_sum_into_other_and_nothing_goes_down(store):
    """N=3 peers of their own out of N+k=5, then an eviction (a value that went down), new peers and more
    traffic: 3 series + other + outside, each never lower than at the scrape before."""
    now: dict = {}
    collector = metrics.StateCollector(store, link_stats=dict, peer_stats=lambda: dict(now), peers_per_endpoint=3)
    me = "10.9.1.2"
    for i, nbytes in enumerate((500, 400, 300, 200, 100)):
        now[(me, TX, f"10.9.2.{i}")] = (nbytes, 1)
    now[(me, TX, None)] = (50, 1)
    born = peer_samples(collector.traffic_text())
    tx = "vpcnet_endpoint_peer_transmit_bytes_total"
    # a new series is served at 0 first, so rate() sees its first traffic
    assert {p for n, p in born if n == tx} == {"10.9.2.0", "10.9.2.1", "10.9.2.2", "other", "outside"}, born
    assert set(born.values()) == {0}, born
    first = peer_samples(collector.traffic_text())
    assert {p for n, p in first if n == tx} == {"10.9.2.0", "10.9.2.1", "10.9.2.2", "other", "outside"}, first
    assert first[(tx, "other")] == 300 and first[(tx, "10.9.2.0")] == 500
    assert first[("vpcnet_endpoint_peer_transmit_packets_total", "other")] == 2
    # the busiest peer's key is evicted and made again (smaller), a new big peer appears, others grow
    now[(me, TX, "10.9.2.0")] = (10, 1)
    now[(me, TX, "10.9.2.9")] = (10_000, 5)
    now[(me, TX, "10.9.2.4")] = (150, 2)
    second = peer_samples(collector.traffic_text())
    assert set(second) == set(first), second                    # sticky: no new series, none gone
    assert all(second[k] >= first[k] for k in first), (first, second)
    assert second[(tx, "10.9.2.0")] == 510
    assert second[(tx, "other")] == 300 + 10_000 + 50
    # a dropped map entry (LRU eviction without re-creation) lowers nothing
    del now[(me, TX, "10.9.2.1")]
    third = peer_samples(collector.traffic_text())
    assert all(third[k] >= second[k] for k in second)
    # the endpoint goes: its series go
    store.delete_endpoint(EID)
    assert peer_samples(collector.traffic_text()) == {}


def test_with_n_plus_k_real_peers_the_bound_holds(hosts, netns_factory, tmp_path):
    """A container sends UDP to 6 addresses of another host's block (counted as they leave it, whoever
    answers) with VPCNET_PEERS_PER_ENDPOINT=4: 4 series and other, whose sum is what the map holds."""
    dpa, dpb, sa, sb, boxes = setup(hosts, netns_factory, "ebpf")
    me = "10.78.3.2"
    maps.forget({me})
    send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(6):\n    for _ in range(i + 1): s.sendto(b'x' * 100, (f'10.78.4.{i + 2}', 9))")
    run(["ip", "netns", "exec", boxes[me], "python3", "-c", send])
    wait_for(lambda: sum(p for (d, _), (_, p) in reading(me).items() if d == TX) >= 21, 5, 0.05)
    store = Store(str(tmp_path / "vpcnet.db"))
    try:
        with store.tx() as db:
            store.add_network(db, Network(NET, A_BLOCK, CLUSTER, "10.78.3.1", "vbr-d1b2c3", 1500, False, ()))
            store.add_endpoint(db, Endpoint(EID, NET, me, "02:00:00:00:00:01", "vhpeers", "vcpeers"))
        collector = metrics.StateCollector(store, link_stats=dict, peer_stats=maps.read_all, peers_per_endpoint=4)
        assert set(peer_samples(collector.traffic_text()).values()) == {0}      # born at 0: rate() sees it all
        got = peer_samples(collector.traffic_text())
        packets = {p: v for (n, p), v in got.items() if n == "vpcnet_endpoint_peer_transmit_packets_total"}
        assert len(packets) == 5 and "other" in packets, packets
        assert sum(packets.values()) == sum(range(1, 7)), packets
        assert packets["other"] == 1 + 2, packets               # the two quietest
    finally:
        store.close()


def test_the_programs_with_counting_pass_the_verifier(hosts):
    from vpcnet.datapath.ebpf import load, programs
    from vpcnet.datapath.ebpf.endpoints import EndpointFacts
    fd = maps.find_or_create()
    facts = EndpointFacts()
    try:
        ep = facts.fd(4)
        for name, code in (("c", programs.container_program(A_BLOCK, CLUSTER, ep, 5, [2], map_fd=fd)),
                           ("u", programs.uplink_program(A_BLOCK, CLUSTER, 5, map_fd=fd)),
                           ("t", programs.count_program(TX, CLUSTER, fd, ep)),
                           ("r", programs.count_program(RX, CLUSTER, fd, ep))):
            os.close(load(code, f"vpcnet_test_{name}"))
    finally:
        os.close(fd)
        facts.close()


def test_keys_are_ipv6_ready_and_round_trip():
    key = maps.peer_key("10.78.3.2", RX, "10.78.4.9")
    assert len(key) == maps.KEY_SIZE
    assert maps.parse_key(key) == ("10.78.3.2", RX, "10.78.4.9")
    assert maps.parse_key(maps.peer_key("fd00::2", TX, None)) == ("fd00::2", TX, None)



@pytest.mark.parametrize("env,expected", [({"VPCNET_PEER_METRICS": "off"}, "off (VPCNET_PEER_METRICS=off)"),
                                          ({"VPCNET_ENDPOINT_METRICS": "service"}, "off (VPCNET_ENDPOINT_METRICS"),
                                          ({}, "on: ")])
def test_doctor_says_whether_peers_are_counted_and_why_not(env, expected):
    require(is_root(), "needs root (the features probe, the map lookup)")
    from vpcnet import config as config_mod
    from vpcnet.cli.doctor.datapath import DatapathChecks
    from vpcnet.cli.doctor.findings import Context

    config = config_mod.load(environ={"VPCNET_CONFIG": os.devnull, **env}, check_socket_dir=False)
    assert config.peers is (not env)
    [finding] = DatapathChecks(Context(config, "")).check_peer_counting()
    assert finding.ok and finding.detail.startswith(expected), finding


def test_bad_peer_settings_are_refused_by_name():
    from vpcnet import config as config_mod

    for env, word in (({"VPCNET_PEER_METRICS": "maybe"}, "VPCNET_PEER_METRICS"),
                      ({"VPCNET_PEERS_PER_ENDPOINT": "0"}, "VPCNET_PEERS_PER_ENDPOINT")):
        with pytest.raises(config_mod.ConfigError, match=word):
            config_mod.load(environ={"VPCNET_CONFIG": os.devnull, **env}, check_socket_dir=False)


def map_ids() -> set[int]:
    fds = maps.find_all()
    try:
        return {maps.map_id(fd) for fd in fds}
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_the_map_goes_with_the_last_program_holding_it(hosts, netns_factory, mode, monkeypatch):
    """No pinning, no descriptor kept: the endpoints' and uplinks' programs hold the map, and when the
    endpoints and the network are gone, so is the map (nothing is left in the kernel). The map gets a
    name of this test's own: a plugin running elsewhere on this kernel (another engine's, a lab's) holds
    one named vpcnet_peers, which the dataplane would share."""
    monkeypatch.setattr(maps, "MAP_NAME", f"vpcnet_t{uuid.uuid4().hex[:6]}".encode())
    assert not map_ids()
    dpa, dpb, sa, sb, boxes = setup(hosts, netns_factory, mode)
    ours = map_ids()
    assert len(ours) == 1, ours          # one map for both simulated hosts, every endpoint and uplink
    for box in boxes.values():
        run(["ip", "netns", "del", box])  # the containers go: their veth pairs, and the filters, with them
    dpa.delete_network(sa)
    dpb.delete_network(sb)
    assert wait_for(lambda: not (map_ids() & ours), 10), "the map outlived its programs"


WITHOUT_SYS_ADMIN = """
import json, sys
sys.path.insert(0, {root!r})
from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.ebpf import maps
from vpcnet.datapath.spec import EndpointSpec, NetworkSpec
spec = NetworkSpec(**json.loads(sys.argv[1]))
ep = EndpointSpec(*json.loads(sys.argv[2]))
dp = Dataplane(peers=True)
assert maps.local(), "CAP_SYS_ADMIN was not dropped"
if sys.argv[3] == "create":
    dp.ensure_network(spec)
    dp.ensure_endpoint(spec, ep.host_veth, ep.peer_veth, ep.mac, ep.address)
else:
    dp.repair([(spec, [ep])])
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps([[k[1], k[2], v] for k, v in maps.read_all().items() if k[0] == ep.address]), flush=True)
"""


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_without_cap_sys_admin_the_map_is_the_processs_and_a_restart_takes_the_programs_over(
        hosts, netns_factory, mode):
    """The managed plugin and the systemd unit have CAP_BPF and CAP_NET_ADMIN, not CAP_SYS_ADMIN: no map
    lookup by id. A process (in host A, capability dropped) makes the network and endpoint and exits; the
    next process's datapath pass attaches the counting programs again, and it reads what they count."""
    import dataclasses
    import json
    import subprocess
    import sys

    require(shutil_which("setpriv"), "needs setpriv (util-linux)")
    a, b = hosts
    s = spec(mode=mode, host=A_BLOCK, cluster=CLUSTER, tag="a1b2c3d4e5f8")
    sb = spec(mode=mode, host=B_BLOCK, cluster=CLUSTER, tag="b1b2c3d4e5f8")
    Dataplane(netns=b, peers=True).ensure_network(sb)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    host_veth, peer_veth = veth_names("d" * 64)
    ep = EndpointSpec(host_veth, peer_veth, mac_for("10.78.3.2"), "10.78.3.2")
    script = WITHOUT_SYS_ADMIN.format(root=root)
    cmd = ["ip", "netns", "exec", a, "setpriv", "--bounding-set", "-sys_admin", sys.executable, "-c", script,
           json.dumps(dataclasses.asdict(s)), json.dumps(dataclasses.astuple(ep))]
    run([*cmd, "create"])
    box = netns_factory("vpcsb")
    run(["ip", "-n", a, "link", "set", peer_veth, "netns", box])
    for step in (["link", "set", peer_veth, "name", "eth0"], ["addr", "add", "10.78.3.2/24", "dev", "eth0"],
                 ["link", "set", "eth0", "up"], ["route", "add", "default", "via", s.gateway]):
        run(["ip", "-n", box, *step])
    other = Dataplane(netns=b, peers=True)
    other.ensure_endpoint(sb, *veth_names("e" * 64), mac_for("10.78.4.2"), "10.78.4.2")
    box_b = netns_factory("vpcsb")
    run(["ip", "-n", b, "link", "set", veth_names("e" * 64)[1], "netns", box_b])
    for step in (["link", "set", veth_names("e" * 64)[1], "name", "eth0"],
                 ["addr", "add", "10.78.4.2/24", "dev", "eth0"],
                 ["link", "set", "eth0", "up"], ["route", "add", "default", "via", sb.gateway]):
        run(["ip", "-n", box_b, *step])
    proc = subprocess.Popen([*cmd, "adopt"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        sent, received = ping(box, "10.78.4.2", 4)
        proc.stdin.write("\n")
        proc.stdin.flush()
        got = {(d, p): tuple(v) for d, p, v in json.loads(proc.stdout.readline())}
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert got[(TX, "10.78.4.2")] == (sent * FRAME, sent), got
    assert got[(RX, "10.78.4.2")] == (received * FRAME, received), got


def shutil_which(name: str) -> bool:
    import shutil
    return shutil.which(name) is not None


def test_status_says_whether_peers_are_counted_and_why_not(tmp_path):
    from vpcnet import config as config_mod
    from vpcnet.cli import status

    def line(env: dict, default: dict | None) -> str:
        config = config_mod.load(environ={"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": str(tmp_path), **env},
                                 check_socket_dir=False)
        return status.peer_line(config, default)

    assert line({}, {"mode": "ebpf", "setting": "auto"}) == "peer counting: on (vpcnet_endpoint_peer_*)"
    assert "off (VPCNET_PEER_METRICS=off)" in line({"VPCNET_PEER_METRICS": "off"}, None)
    assert "off (VPCNET_ENDPOINT_METRICS=service)" in line({"VPCNET_ENDPOINT_METRICS": "service"}, None)
    fell_back = {"mode": "routed", "setting": "auto", "fallback": "cannot load eBPF programs: EPERM"}
    assert "cannot load eBPF programs (cannot load eBPF programs: EPERM)" in line({}, fell_back)
    config = config_mod.load(environ={"VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": str(tmp_path)},
                             check_socket_dir=False)
    assert "peer counting: on" in status.render(status.collect(config))


DOCTOR = """
import json, os, sys, types
sys.path.insert(0, {root!r})
from vpcnet import config as config_mod
from vpcnet.cli.doctor.datapath import DatapathChecks
from vpcnet.cli.doctor.findings import Context
config = config_mod.load(environ={{"VPCNET_CONFIG": os.devnull}}, check_socket_dir=False)
ctx = Context(config, "", endpoints=[types.SimpleNamespace(host_veth=sys.argv[1])])
[f] = DatapathChecks(ctx).check_peer_counting()
print(json.dumps([f.ok, f.detail]))
"""


def test_doctor_names_an_endpoint_whose_counting_filter_was_deleted(hosts, netns_factory):
    import json
    import sys

    dpa, dpb, sa, sb, boxes = setup(hosts, netns_factory, "bridge")
    a, _b = hosts
    host_veth = veth_names("a" * 64)[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def doctor() -> list:
        out = run(["ip", "netns", "exec", a, sys.executable, "-c", DOCTOR.format(root=root), host_veth]).stdout
        return json.loads(out.strip().splitlines()[-1])

    assert doctor()[0] is True
    run(["ip", "netns", "exec", a, "tc", "filter", "del", "dev", host_veth, "egress"])
    found, detail = doctor()
    assert found is False and host_veth in detail, detail
