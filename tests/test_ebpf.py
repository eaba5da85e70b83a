"""The ebpf mode's programs: their encoding, the kernel's verifier, and what they do to crafted packets
(BPF_PROG_TEST_RUN, inside network namespaces the tests make, with routes and neighbours set up so each
program reaches its lookup). Traffic through real veths is in test_dataplane."""
from __future__ import annotations

import ctypes
import ipaddress
import os
import platform
import struct

import pytest
from conftest import is_root, require, run

from vpcnet.datapath.ebpf import assembler, endpoints, loader, programs
from vpcnet.errors import DataplaneError

HOST, CLUSTER = "10.77.3.0/24", "10.77.0.0/16"
TC_ACT_REDIRECT, UNSPEC = 7, -1


# -- encoding (no kernel needed) ----------------------------------------------------------------------

def test_instructions_encode_as_the_kernel_defines_them():
    a = assembler.Asm()
    a.mov(6, 1)                      # BPF_MOV64_REG(R6, R1)            bf 16 0000 00000000
    a.ldx(4, 2, 6, 76)               # BPF_LDX_MEM(BPF_W, R2, R6, 76)   61 62 4c00 00000000
    a.jump(assembler.JNE, 4, "out", imm=8, wide=False)   # BPF_JMP32_IMM(JNE, R4, 8, +1)
    a.movi(0, -1)                    # BPF_MOV64_IMM(R0, -1)             b7 00 0000 ffffffff
    a.label("out")
    a.call(programs.FIB_LOOKUP)          # call 69                           85 00 0000 45000000
    a.exit()                         # 95 00 0000 00000000
    code = a.assemble()
    assert code.hex() == ("bf16000000000000" "61624c0000000000" "5604010008000000" "b7000000ffffffff"
                          "8500000045000000" "9500000000000000")


def test_a_label_defined_twice_is_refused():
    a = assembler.Asm()
    a.label("x")
    with pytest.raises(ValueError, match="twice"):
        a.label("x")


@pytest.mark.parametrize("cidr,expected", [("10.77.0.0/16", (0x00004D0A, 0x0000FFFF)),
                                           ("192.168.1.128/25", (0x8001A8C0, 0x80FFFFFF))])
def test_addresses_are_compared_as_a_load_from_the_packet_sees_them(cidr, expected):
    assert programs._net(cidr) == expected


# -- the kernel -----------------------------------------------------------------------------------------

def test_an_endpoints_entry_holds_its_address_and_its_published_ports_as_the_program_compares_them():
    entry = endpoints.value("10.77.3.2", [("tcp", 8080), ("udp", 53)])
    assert len(entry) == endpoints.VALUE[4] and entry[:4] == bytes([10, 77, 3, 2])
    assert struct.unpack_from("<III", entry, 4) == (2, 0x901F0006, 0x35000011)
    wide = endpoints.value("fd00:77:3:0:1::2", [("tcp", 1000 + i) for i in range(programs.MAX_PUBLISHED + 1)])
    assert len(wide) == endpoints.VALUE[6] and wide[:16] == ipaddress.IPv6Address("fd00:77:3:0:1::2").packed
    assert struct.unpack_from("<I", wide, 16)[0] == programs.MAX_PUBLISHED + 1, "past the limit: the count only"
    assert wide[20:] == bytes(4 * programs.MAX_PUBLISHED)


@pytest.fixture
def kernel():
    require(is_root(), "needs root (bpf(2) with CAP_BPF)")
    require(platform.machine() in loader.SYS_BPF, f"no bpf syscall number known for {platform.machine()}")


@pytest.fixture
def facts(kernel):
    """A fresh pair of endpoint maps (vpcnet.datapath.ebpf.endpoints), closed after."""
    made = endpoints.EndpointFacts()
    yield made
    made.close()


@pytest.mark.parametrize("host,cluster", [(HOST, CLUSTER), ("10.200.1.128/25", "10.200.0.0/16"),
                                          ("192.168.255.0/24", "192.168.0.0/16"), ("10.1.0.0/16", "10.0.0.0/8")])
def test_the_verifier_accepts_both_programs(facts, host, cluster):
    for program in (programs.container_program(host, cluster, facts.fd(4)), programs.uplink_program(host, cluster, 7)):
        os.close(loader.load(program, "vpcnet_test"))


@pytest.mark.parametrize("uplinks", [[], [3], [3, 9, 12]], ids=["no uplink", "one", "three"])
def test_the_verifier_accepts_the_container_program_for_any_number_of_uplinks(facts, uplinks):
    """No uplink (a host without a default route yet) leaves no unreachable instruction behind."""
    os.close(loader.load(programs.container_program(HOST, CLUSTER, facts.fd(4), 5, uplinks), "vpcnet_test"))


def test_a_program_the_verifier_refuses_is_reported_with_its_log(kernel):
    a = assembler.Asm()
    a.mov(0, 5)                    # r5 was never written: the verifier says so
    a.exit()
    with pytest.raises(DataplaneError, match="verifier: .*R5"):
        loader.load(a.assemble(), "vpcnet_bad")


BPF_PROG_TEST_RUN = 10


def prog_test_run(fd: int, packet: bytes, ifindex: int = 0) -> tuple[int, bytes]:
    """Run the program once on `packet` (BPF_PROG_TEST_RUN); the skb arrives on `ifindex`."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx = ctypes.create_string_buffer(192)          # struct __sk_buff, all zero but ifindex
    struct.pack_into("<I", ctx, programs.SKB_IFINDEX, ifindex)
    attr = bytearray(80)
    struct.pack_into("<IIIIQQII", attr, 0, fd, 0, len(packet), len(data_out), ctypes.addressof(data_in),
                     ctypes.addressof(data_out), 1, 0)
    if ifindex:
        struct.pack_into("<IIQQ", attr, 40, len(ctx), 0, ctypes.addressof(ctx), 0)
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    if loader._libc.syscall(loader.SYS_BPF[platform.machine()], BPF_PROG_TEST_RUN, buf, len(attr)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    retval, _size_in, size_out = struct.unpack_from("<iII", buf.raw, 4)
    return retval, data_out.raw[:size_out]


def checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total ^ 0xFFFF


def ipv4(src: str, dst: str, ttl: int = 64, ident: int = 1, proto: int = 17, dst_mac: bytes = b"\x02" * 6,
         ethertype: int = 0x0800) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, ident, 0, ttl, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return dst_mac + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype) + header + b"\x00" * 8


def forwarded_checksum(packet: bytes) -> bytes:
    """The checksum bytes the kernel's ip_decrease_ttl() writes when it forwards `packet`."""
    check = struct.unpack_from("<H", packet, 24)[0] + 0x0001        # htons(0x0100) on little-endian
    return struct.pack("<H", (check + (check >= 0xFFFF)) & 0xFFFF)


def ident_for_checksum(src: str, dst: str, ttl: int, wanted_le: int) -> int:
    """An IP id giving the header a checksum whose little-endian load is `wanted_le` (the carry case)."""
    for ident in range(1 << 16):
        if struct.unpack_from("<H", ipv4(src, dst, ttl, ident), 24)[0] == wanted_le:
            return ident
    raise AssertionError("no such id")


@pytest.fixture
def routed_host(kernel, netns_factory):
    """A netns like a vpcnet host: forwarding on, an uplink with a resolved next hop 192.0.2.1 for the
    cluster, the anchor holding the gateway, and one endpoint's veth with the container's /32 route
    and resolved neighbour. Returns (netns, {name: ifindex})."""
    ns = netns_factory("vpcbpf")
    run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    for a, b in (("uplink0", "uplink0p"), ("vpc-anchor", "vpp-anchor"), ("vhendpoint", "vcendpoint"),
                 ("vhother", "vcother")):
        run(["ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b])
        run(["ip", "-n", ns, "link", "set", a, "up"])
        run(["ip", "-n", ns, "link", "set", b, "up"])
    run(["ip", "-n", ns, "link", "set", "vhendpoint", "address", "02:aa:00:00:00:01"])
    run(["ip", "-n", ns, "addr", "add", "192.0.2.10/24", "dev", "uplink0"])
    run(["ip", "-n", ns, "addr", "add", "10.77.3.1/24", "dev", "vpc-anchor"])
    run(["ip", "-n", ns, "route", "add", CLUSTER, "via", "192.0.2.1"])
    run(["ip", "-n", ns, "neigh", "replace", "192.0.2.1", "lladdr", "02:bb:00:00:00:01", "dev", "uplink0",
         "nud", "permanent"])
    run(["ip", "-n", ns, "route", "add", "10.77.3.2/32", "dev", "vhendpoint", "scope", "link"])
    run(["ip", "-n", ns, "neigh", "replace", "10.77.3.2", "lladdr", "02:42:0a:4d:03:02", "dev", "vhendpoint",
         "nud", "permanent"])
    # a second endpoint of the same network on this host
    run(["ip", "-n", ns, "link", "set", "vhother", "address", "02:aa:00:00:00:02"])
    run(["ip", "-n", ns, "route", "add", "10.77.3.3/32", "dev", "vhother", "scope", "link"])
    run(["ip", "-n", ns, "neigh", "replace", "10.77.3.3", "lladdr", "02:42:0a:4d:03:03", "dev", "vhother",
         "nud", "permanent"])
    # what the uplink program's guards are for: a resolved neighbour behind the anchor, and an address of
    # the block routed back out of the uplink
    run(["ip", "-n", ns, "neigh", "replace", "10.77.3.9", "lladdr", "02:cc:00:00:00:01", "dev", "vpc-anchor",
         "nud", "permanent"])
    run(["ip", "-n", ns, "route", "add", "10.77.3.10/32", "via", "192.0.2.1"])
    index = {}
    for line in run(["ip", "-n", ns, "-o", "link"]).stdout.splitlines():
        number, name = line.split(":")[:2]
        index[name.strip().split("@")[0]] = int(number)
    return ns, index


def run_in(ns: str, fn):
    from vpcnet_lab import netns as lab_netns
    return lab_netns.call_in(ns, fn)


def test_container_program_forwards_cluster_traffic_with_ttl_and_checksum_right(routed_host):
    ns, index = routed_host

    facts = endpoints.EndpointFacts()
    facts.write(index["vhendpoint"], "10.77.3.2", ())

    def check():
        fd = loader.load(programs.container_program(HOST, CLUSTER, facts.fd(4), index["vpc-anchor"]), "vpcnet_test")
        try:
            out = {}
            for case, packet in {
                "to another host": ipv4("10.77.3.2", "10.77.4.2"),
                "checksum carry": ipv4("10.77.3.2", "10.77.4.2", ident=ident_for_checksum(
                    "10.77.3.2", "10.77.4.2", 64, 0xFFFE)),
                "to another container of this host": ipv4("10.77.3.2", "10.77.3.3"),
                "back to itself": ipv4("10.77.3.2", "10.77.3.2"),
                "an address behind the anchor": ipv4("10.77.3.2", "10.77.3.9"),
                "the gateway": ipv4("10.77.3.2", "10.77.3.1"),
                "leaving the cluster": ipv4("10.77.3.2", "198.51.100.2"),
                "spoofed source": ipv4("10.77.9.9", "10.77.4.2"),
                "a neighbour's source": ipv4("10.77.3.3", "10.77.4.2"),
                "a neighbour's source, locally": ipv4("10.77.3.3", "10.77.3.2"),
                "ttl 1": ipv4("10.77.3.2", "10.77.4.2", ttl=1),
                "not IPv4": ipv4("10.77.3.2", "10.77.4.2", ethertype=0x0806),
            }.items():
                out[case] = (packet, *prog_test_run(fd, packet, index["vhendpoint"]))
            return out
        finally:
            os.close(fd)

    try:
        results = run_in(ns, check)
    finally:
        facts.close()
    for case in ("to another host", "checksum carry"):
        packet, verdict, data = results[case]
        assert verdict == TC_ACT_REDIRECT, case
        assert data[22] == packet[22] - 1, "TTL decremented"
        assert checksum(data[14:34]) == 0, f"{case}: the header checksum still adds up"
        assert data[24:26] == forwarded_checksum(packet), f"{case}: the very bytes the kernel's forwarding writes"
        assert data[:22] == packet[:22] and data[23:24] == packet[23:24] and data[26:] == packet[26:]
    packet, verdict, data = results["to another container of this host"]
    assert verdict == TC_ACT_REDIRECT, "same host: straight into the other container"
    assert data[0:6] == bytes.fromhex("02420a4d0303"), "destination MAC: the other container's"
    assert data[6:12] == bytes.fromhex("02aa00000002"), "source MAC: its host veth's"
    assert data[22] == 63 and data[24:26] == forwarded_checksum(packet) and checksum(data[14:34]) == 0
    for case in ("back to itself", "an address behind the anchor", "the gateway", "leaving the cluster",
                 "spoofed source", "a neighbour's source", "a neighbour's source, locally", "ttl 1", "not IPv4"):
        packet, verdict, data = results[case]
        assert verdict == UNSPEC, case
        assert data == packet, f"{case}: left as it was, for the normal path"


def udp_from(src: str, dst: str, sport: int, proto: int = 17) -> bytes:
    """ipv4() with a source port (the first two bytes after the header)."""
    packet = ipv4(src, dst, proto=proto)
    return packet[:34] + sport.to_bytes(2, "big") + packet[36:]


def test_one_container_program_serves_every_endpoint_by_its_entry(routed_host):
    """One program per network: attached to two endpoints' veths, it takes each one's own address
    (and only it) from the veth's entry; a veth without one takes the normal path; published ports are read
    from the entry, so changing them is writing the entry again, with no new program."""
    ns, index = routed_host
    facts = endpoints.EndpointFacts()
    me, other = index["vhendpoint"], index["vhother"]
    facts.write(me, "10.77.3.2", [("udp", 5353), ("tcp", 8080)])
    facts.write(other, "10.77.3.3", ())
    wide = [("udp", 1000 + i) for i in range(programs.MAX_PUBLISHED + 1)]

    def check():
        fd = loader.load(programs.container_program(HOST, CLUSTER, facts.fd(4), index["vpc-anchor"],
                                                    [index["uplink0"]]), "vpcnet_test")
        try:
            runs = {}
            for case, (packet, ifindex) in {
                "mine, from my veth": (udp_from("10.77.3.2", "10.77.4.2", 4000), me),
                "the other's, from its veth": (udp_from("10.77.3.3", "10.77.4.2", 4000), other),
                "mine, from the other's veth": (udp_from("10.77.3.2", "10.77.4.2", 4000), other),
                "the other's, from my veth": (udp_from("10.77.3.3", "10.77.4.2", 4000), me),
                "from a veth with no entry": (udp_from("10.77.3.2", "10.77.4.2", 4000), index["uplink0p"]),
                "my published port's reply": (udp_from("10.77.3.2", "10.77.4.2", 5353), me),
                "my published tcp port's reply": (udp_from("10.77.3.2", "10.77.4.2", 8080, proto=6), me),
                "udp from my published tcp port": (udp_from("10.77.3.2", "10.77.4.2", 8080), me),
                "the other's, from my published port": (udp_from("10.77.3.3", "10.77.4.2", 5353), other),
            }.items():
                runs[case] = prog_test_run(fd, packet, ifindex)[0]
            facts.write(me, "10.77.3.2", ())                     # the ports went: the same program forwards
            runs["my former published port's reply"] = prog_test_run(
                fd, udp_from("10.77.3.2", "10.77.4.2", 5353), me)[0]
            facts.write(me, "10.77.3.2", wide)                   # a wide range: all of its UDP to the host
            runs["any udp, past the limit"] = prog_test_run(fd, udp_from("10.77.3.2", "10.77.4.2", 4000), me)[0]
            runs["icmp, past the limit"] = prog_test_run(fd, ipv4("10.77.3.2", "10.77.4.2", proto=1), me)[0]
            facts.remove(me)
            runs["mine, entry removed"] = prog_test_run(fd, udp_from("10.77.3.2", "10.77.4.2", 4000), me)[0]
            return runs
        finally:
            os.close(fd)

    try:
        runs = run_in(ns, check)
    finally:
        facts.close()
    forwarded = {"mine, from my veth", "the other's, from its veth", "udp from my published tcp port",
                 "the other's, from my published port", "my former published port's reply", "icmp, past the limit"}
    assert {case for case, verdict in runs.items() if verdict == TC_ACT_REDIRECT} == forwarded, runs
    assert all(verdict == UNSPEC for case, verdict in runs.items() if case not in forwarded), runs


def test_uplink_program_hands_this_networks_endpoints_their_packets(routed_host):
    ns, index = routed_host

    def check():
        fd = loader.load(programs.uplink_program(HOST, CLUSTER, index["vpc-anchor"]), "vpcnet_test")
        try:
            return {case: (packet, *prog_test_run(fd, packet, index["uplink0"])) for case, packet in {
                "from another host": ipv4("10.77.4.2", "10.77.3.2"),
                "an address behind the anchor": ipv4("10.77.4.2", "10.77.3.9"),
                "routed back out of the uplink": ipv4("10.77.4.2", "10.77.3.10"),
                "the gateway": ipv4("10.77.4.2", "10.77.3.1"),
                "from outside the cluster": ipv4("198.51.100.2", "10.77.3.2"),
                "another network's block": ipv4("10.77.4.2", "10.77.5.2"),
                "ttl 1": ipv4("10.77.4.2", "10.77.3.2", ttl=1),
            }.items()}
        finally:
            os.close(fd)

    results = run_in(ns, check)
    packet, verdict, data = results["from another host"]
    assert verdict == TC_ACT_REDIRECT
    assert data[0:6] == bytes.fromhex("02420a4d0302"), "destination MAC: the container's"
    assert data[6:12] == bytes.fromhex("02aa00000001"), "source MAC: the endpoint's host veth"
    assert data[22] == 63 and data[24:26] == forwarded_checksum(packet) and checksum(data[14:34]) == 0
    for case in ("an address behind the anchor", "routed back out of the uplink", "the gateway",
                 "from outside the cluster", "another network's block", "ttl 1"):
        packet, verdict, data = results[case]
        assert verdict == UNSPEC and data == packet, (case, packet.hex(), data.hex())


class _RecordingLibc:
    """Wraps libc to record the verifier log level of every BPF_PROG_LOAD (bpf_attr offset 24)."""

    def __init__(self, real):
        self.real = real
        self.log_levels: list[int] = []

    def syscall(self, nr, cmd, buf, size):
        if cmd == loader.BPF_PROG_LOAD:
            self.log_levels.append(struct.unpack_from("<I", buf.raw, 24)[0])
        return self.real.syscall(nr, cmd, buf, size)


def test_a_program_is_loaded_without_the_verifier_log_and_only_a_refusal_asks_for_it(kernel, monkeypatch):
    recorder = _RecordingLibc(loader._libc)
    monkeypatch.setattr(loader, "_libc", recorder)
    facts = endpoints.EndpointFacts()
    try:
        os.close(loader.load(programs.container_program(HOST, CLUSTER, facts.fd(4)), "vpcnet_ctr"))
    finally:
        facts.close()
    assert recorder.log_levels == [0]                     # accepted: one load, no log
    a = assembler.Asm()
    a.mov(0, 5)
    a.exit()
    with pytest.raises(DataplaneError, match="verifier: .*R5"):
        loader.load(a.assemble(), "vpcnet_bad")
    assert recorder.log_levels == [0, 0, 1]               # refused: loaded again with the log, to say why


# -- IPv6 (vpcnet.datapath.ebpf.programs6) ----------------------------------------------------------------
HOST6, CLUSTER6 = "fd00:77:3:0:1::/80", "fd00:77::/32"
ME6, OTHER6, REMOTE6 = "fd00:77:3:0:1::2", "fd00:77:3:0:1::3", "fd00:77:4:0:1::2"


def ipv6(src: str, dst: str, hops: int = 64, nh: int = 17, payload: bytes = b"\x30\x39\x00\x35" + b"\x00" * 12,
         ethertype: int = 0x86DD) -> bytes:
    header = struct.pack("!IHBB16s16s", 0x6000_0000 | 0x12345, len(payload), nh, hops,
                         ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype) + header + payload


def icmp6(src: str, dst: str, kind: int, hops: int = 64) -> bytes:
    return ipv6(src, dst, hops, nh=58, payload=bytes([kind, 0, 0, 0]) + b"\x00" * 12)


def test_ipv6_prefixes_are_compared_word_by_word_as_loads_see_them():
    from vpcnet.datapath.ebpf import programs6
    assert programs6._net6("fd00:77::/48") == [(0x7700_00FD, 0xFFFF_FFFF), (0x0000_0000, 0x0000_FFFF)]
    assert len(programs6._net6(HOST6)) == 3
    for bad in ("fe80::/10", "ff00::/8", "::/0", "fc00::/6"):
        with pytest.raises(ValueError, match="link-local or multicast"):
            programs6.container_program6(HOST6, bad, 0)


@pytest.fixture
def routed_host6(routed_host):
    """routed_host with IPv6: forwarding, the uplink's next hop fd77:a::1 (resolved) for the IPv6 cluster
    CIDR, both endpoints' /128 routes and resolved neighbours, and an address of the block routed back
    out of the uplink."""
    ns, index = routed_host
    run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    run(["ip", "-n", ns, "-6", "addr", "add", "fd77:a::10/64", "dev", "uplink0", "nodad"])
    run(["ip", "-n", ns, "-6", "route", "add", CLUSTER6, "via", "fd77:a::1"])
    run(["ip", "-n", ns, "-6", "neigh", "replace", "fd77:a::1", "lladdr", "02:bb:00:00:00:01", "dev", "uplink0",
         "nud", "permanent"])
    for dev, address, mac in (("vhendpoint", ME6, "02:42:0a:4d:03:02"), ("vhother", OTHER6, "02:42:0a:4d:03:03")):
        run(["ip", "-n", ns, "-6", "route", "add", f"{address}/128", "dev", dev])
        run(["ip", "-n", ns, "-6", "neigh", "replace", address, "lladdr", mac, "dev", dev, "nud", "permanent"])
    run(["ip", "-n", ns, "-6", "route", "add", "fd00:77:3:0:1::10/128", "via", "fd77:a::1"])
    return ns, index


def test_the_verifier_accepts_the_ipv6_programs(facts):
    from vpcnet.datapath.ebpf import programs6
    fd = facts.fd(6)
    for program in (programs6.container_program6(HOST6, CLUSTER6, fd),
                    programs6.container_program6(HOST6, CLUSTER6, fd, 5, []),
                    programs6.container_program6(HOST6, CLUSTER6, fd, 5, [3, 9]),
                    programs6.container_program6("2001:db8:1:2:3::/80", "2001:db8::/32", fd, 5, [3]),
                    programs6.uplink_program6(HOST6, CLUSTER6, 7)):
        os.close(loader.load(program, "vpcnet_test"))


def test_container_program6_forwards_plain_cluster_traffic_and_leaves_the_rest_to_the_stack(routed_host6):
    from vpcnet.datapath.ebpf import programs6
    ns, index = routed_host6

    facts = endpoints.EndpointFacts()
    facts.write(index["vhendpoint"], ME6, [("tcp", 8080)])

    def check():
        fd = loader.load(programs6.container_program6(HOST6, CLUSTER6, facts.fd(6), index["vpc-anchor"],
                                                      [index["uplink0"]]), "vpcnet_test")
        try:
            return {case: (packet, *prog_test_run(fd, packet, index["vhendpoint"])) for case, packet in {
                "to another host": ipv6(ME6, REMOTE6),
                "tcp to another host": ipv6(ME6, REMOTE6, nh=6),
                "echo request": icmp6(ME6, REMOTE6, 128),
                "to another container of this host": ipv6(ME6, OTHER6),
                "back to itself": ipv6(ME6, ME6),
                "an address of the block routed out of the uplink": ipv6(ME6, "fd00:77:3:0:1::10"),
                "an address of the block nobody holds": ipv6(ME6, "fd00:77:3:0:1::99"),
                "the gateway": ipv6(ME6, "fe80::1"),
                "multicast": ipv6(ME6, "ff02::1"),
                "leaving the cluster": ipv6(ME6, "2001:db8::2"),
                "forged source": ipv6("fd00:77:3:0:1::9", REMOTE6),
                "a neighbour's source": ipv6(OTHER6, REMOTE6),
                "link-local source": ipv6("fe80::42:aff:fe4d:302", REMOTE6),
                "hop limit 1": ipv6(ME6, REMOTE6, hops=1),
                "hop limit 0": ipv6(ME6, REMOTE6, hops=0),
                "a fragment": ipv6(ME6, REMOTE6, nh=44),
                "hop-by-hop options": ipv6(ME6, REMOTE6, nh=0),
                "routing header": ipv6(ME6, REMOTE6, nh=43),
                "no next header": ipv6(ME6, REMOTE6, nh=59),
                "router solicitation": icmp6(ME6, REMOTE6, 133),
                "router advertisement": icmp6(ME6, OTHER6, 134),
                "neighbour solicitation": icmp6(ME6, REMOTE6, 135),
                "neighbour advertisement": icmp6(ME6, REMOTE6, 136),
                "redirect": icmp6(ME6, REMOTE6, 137),
                "a published port's reply": ipv6(ME6, REMOTE6, nh=6, payload=b"\x1f\x90\x30\x39" + b"\x00" * 16),
                "not IPv6": ipv6(ME6, REMOTE6, ethertype=0x0800),
                "truncated": ipv6(ME6, REMOTE6, payload=b"\x00\x01"),
            }.items()}
        finally:
            os.close(fd)

    try:
        results = run_in(ns, check)
    finally:
        facts.close()
    for case in ("to another host", "tcp to another host", "echo request"):
        packet, verdict, data = results[case]
        assert verdict == TC_ACT_REDIRECT, case
        assert data[21] == packet[21] - 1, f"{case}: hop limit decremented"
        assert data[:21] == packet[:21] and data[22:] == packet[22:], case
    packet, verdict, data = results["to another container of this host"]
    assert verdict == TC_ACT_REDIRECT, "same host: straight into the other container"
    assert data[0:6] == bytes.fromhex("02420a4d0303"), "destination MAC: the other container's"
    assert data[6:12] == bytes.fromhex("02aa00000002"), "source MAC: its host veth's"
    assert data[21] == 63 and data[12:21] == packet[12:21] and data[22:] == packet[22:]
    passed = set(results) - {"to another host", "tcp to another host", "echo request",
                             "to another container of this host"}
    for case in sorted(passed):
        packet, verdict, data = results[case]
        assert verdict == UNSPEC, case
        assert data == packet, f"{case}: left as it was, for the normal path"


def test_uplink_program6_hands_this_networks_ipv6_endpoints_their_packets(routed_host6):
    from vpcnet.datapath.ebpf import programs6
    ns, index = routed_host6

    def check():
        fd = loader.load(programs6.uplink_program6(HOST6, CLUSTER6, index["vpc-anchor"]), "vpcnet_test")
        try:
            return {case: (packet, *prog_test_run(fd, packet, index["uplink0"])) for case, packet in {
                "from another host": ipv6(REMOTE6, ME6),
                "routed back out of the uplink": ipv6(REMOTE6, "fd00:77:3:0:1::10"),
                "nobody's address": ipv6(REMOTE6, "fd00:77:3:0:1::99"),
                "from outside the cluster": ipv6("2001:db8::2", ME6),
                "another network's block": ipv6(REMOTE6, "fd00:77:5:0:1::2"),
                "hop limit 1": ipv6(REMOTE6, ME6, hops=1),
                "a fragment": ipv6(REMOTE6, ME6, nh=44),
                "router advertisement": icmp6(REMOTE6, ME6, 134),
                "link-local source": ipv6("fe80::1", ME6),
            }.items()}
        finally:
            os.close(fd)

    results = run_in(ns, check)
    packet, verdict, data = results["from another host"]
    assert verdict == TC_ACT_REDIRECT
    assert data[0:6] == bytes.fromhex("02420a4d0302"), "destination MAC: the container's"
    assert data[6:12] == bytes.fromhex("02aa00000001"), "source MAC: the endpoint's host veth"
    assert data[21] == 63 and data[12:21] == packet[12:21] and data[22:] == packet[22:]
    for case in sorted(set(results) - {"from another host"}):
        packet, verdict, data = results[case]
        assert verdict == UNSPEC and data == packet, (case, packet.hex(), data.hex())


def test_the_raw_netlink_attach_makes_the_filter_tc_would(kernel, netns_factory):
    """vpcnet.datapath.rtnl's clsact qdisc and bpf filter (CreateEndpoint's path, instead of pyroute2's):
    the qdisc once, the filter with its priority, protocol and direct action, replaced in place."""
    from vpcnet.datapath import rtnl
    ns = netns_factory("vpcrtnl")
    run(["ip", "-n", ns, "link", "add", "vhx", "type", "veth", "peer", "name", "vcx"])
    index = int(run(["ip", "-n", ns, "-o", "link", "show", "dev", "vhx"]).stdout.split(":")[0])
    facts = endpoints.EndpointFacts()
    fds = [loader.load(programs.container_program(HOST, CLUSTER, facts.fd(4)), "vpcnet_ctr") for _ in range(2)]
    sock = rtnl.open_socket(ns)
    try:
        assert rtnl.add_clsact(sock, index) is True and rtnl.add_clsact(sock, index) is False
        for fd in fds:                                 # the second replaces the first in place
            rtnl.replace_bpf_filter(sock, index, 0xFFFFFFF2, 0x7F00, 0x0800, 1, fd, "vpcnet-abc")
        rtnl.replace_bpf_filter(sock, index, 0xFFFFFFF3, 0x7F04, 0x86DD, 1, fds[0], "vpcnet-abc")
        with pytest.raises(OSError):
            rtnl.replace_bpf_filter(sock, 99999, 0xFFFFFFF2, 0x7F00, 0x0800, 1, fds[0], "vpcnet-abc")
    finally:
        sock.close()
        for fd in fds:
            os.close(fd)
        facts.close()
    ingress = run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "vhx", "ingress"]).stdout
    egress = run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "vhx", "egress"]).stdout
    assert ingress.count("direct-action") == 1 and "protocol ip pref 32512 bpf" in ingress, ingress
    assert "vpcnet-abc" in ingress and "handle 0x1" in ingress, ingress
    assert "protocol ipv6 pref 32516 bpf" in egress and "direct-action" in egress, egress


# -- this host's endpoints by address (vpcnet.datapath.ebpf.endpoints.local_value) ------------------------
# An address of the block with no route at all, in the local map behind vhother: only the map delivers to it
# (the fib lookup finds the anchor's connected route, and the programs leave that to the stack).
MAPPED, MAPPED_MAC = "10.77.3.20", "02:42:0a:4d:03:14"
MAPPED6 = "fd00:77:3:0:1::20"
SHORT_MTU = "10.77.3.21"                    # in the map with an MTU shorter than the test packets: the fib path


def test_a_local_entry_holds_what_delivery_needs_as_the_programs_read_it():
    entry = endpoints.local_value(7, 1500, "02:42:0a:4d:03:14", "02:aa:00:00:00:02")
    assert len(entry) == endpoints.LOCAL_VALUE == 24
    assert struct.unpack_from("<II", entry) == (7, 1514), "the veth's index, the longest frame it takes"
    assert entry[programs.LOCAL_DMAC:programs.LOCAL_DMAC + 6] == bytes.fromhex("02420a4d0314")
    assert entry[programs.LOCAL_SMAC:programs.LOCAL_SMAC + 6] == bytes.fromhex("02aa00000002")
    assert endpoints.local_ifindex(entry) == 7
    with pytest.raises(ValueError, match="not a MAC"):
        endpoints.local_value(7, 1500, "02:42", "02:aa:00:00:00:02")


def test_the_verifier_accepts_the_programs_reading_the_local_map_with_and_without_counting(facts):
    from vpcnet.datapath.ebpf import maps, programs6
    peers = maps.create()
    try:
        for map_fd in (None, peers):
            for program in (
                    programs.container_program(HOST, CLUSTER, facts.fd(4), 5, [3], map_fd=map_fd,
                                               local_fd=facts.local_fd(4)),
                    programs.container_program(HOST, CLUSTER, facts.fd(4), 5, [], map_fd=map_fd,
                                               local_fd=facts.local_fd(4)),
                    programs.uplink_program(HOST, CLUSTER, 7, map_fd=map_fd, local_fd=facts.local_fd(4)),
                    programs6.container_program6(HOST6, CLUSTER6, facts.fd(6), 5, [3], map_fd=map_fd,
                                                 local_fd=facts.local_fd(6)),
                    programs6.uplink_program6(HOST6, CLUSTER6, 7, map_fd=map_fd, local_fd=facts.local_fd(6))):
                os.close(loader.load(program, "vpcnet_test"))
    finally:
        os.close(peers)


def test_the_local_map_delivers_without_a_fib_lookup_and_a_removed_entry_falls_back(routed_host):
    """The uplink program (another host -> a container here) and the container program (-> another container
    of the network here) find the destination in the map of this host's endpoints: MACs and veth from its
    entry, TTL and checksum as the kernel's forwarding writes them, no route or neighbour needed. What the
    fib path leaves to the stack still goes there (TTL 1, a spoofed source, a published port's reply, a
    frame longer than the veth's MTU, back into the veth it came from); a destination without an entry takes
    the fib lookup as before; an entry removed with its endpoint delivers nothing more."""
    from vpcnet.datapath.ebpf import maps
    ns, index = routed_host
    me, other = index["vhendpoint"], index["vhother"]
    facts = endpoints.EndpointFacts()
    facts.write(me, "10.77.3.2", [("udp", 5353)])
    facts.write(other, MAPPED, ())
    facts.write_local(other, MAPPED, endpoints.local_value(other, 1500, MAPPED_MAC, "02:aa:00:00:00:02"))
    local = facts.local_fd(4)
    maps.update(local, ipaddress.IPv4Address(SHORT_MTU).packed,
                endpoints.local_value(other, 20, MAPPED_MAC, "02:aa:00:00:00:02"))
    # this container's own address in the map: the container program must not hand it back to its own veth
    maps.update(local, ipaddress.IPv4Address("10.77.3.2").packed,
                endpoints.local_value(me, 1500, "02:42:0a:4d:03:99", "02:aa:00:00:00:01"))

    def check():
        uplink = loader.load(programs.uplink_program(HOST, CLUSTER, index["vpc-anchor"], local_fd=local), "vpcnet_test")
        ctr = loader.load(programs.container_program(HOST, CLUSTER, facts.fd(4), index["vpc-anchor"],
                                                     [index["uplink0"]], local_fd=local), "vpcnet_test")
        try:
            out = {}
            for case, (fd, packet, ifindex) in {
                "uplink: in the map": (uplink, ipv4("10.77.4.2", MAPPED), index["uplink0"]),
                "uplink: in the map, checksum carry": (uplink, ipv4("10.77.4.2", MAPPED, ident=ident_for_checksum(
                    "10.77.4.2", MAPPED, 64, 0xFFFE)), index["uplink0"]),
                "uplink: routed, in the map with another MAC": (uplink, ipv4("10.77.4.2", "10.77.3.2"),
                                                                 index["uplink0"]),
                "uplink: in the map, ttl 1": (uplink, ipv4("10.77.4.2", MAPPED, ttl=1), index["uplink0"]),
                "uplink: in the map, ttl 0": (uplink, ipv4("10.77.4.2", MAPPED, ttl=0), index["uplink0"]),
                "uplink: longer than the veth's MTU": (uplink, ipv4("10.77.4.2", SHORT_MTU), index["uplink0"]),
                "uplink: from outside the cluster": (uplink, ipv4("198.51.100.2", MAPPED), index["uplink0"]),
                "uplink: in the map, from its own veth": (uplink, ipv4("10.77.4.2", MAPPED), other),
                "container: in the map": (ctr, ipv4("10.77.3.2", MAPPED), me),
                "container: in the map, ttl 1": (ctr, ipv4("10.77.3.2", MAPPED, ttl=1), me),
                "container: spoofed source": (ctr, ipv4("10.77.3.9", MAPPED), me),
                "container: a published port's reply": (ctr, udp_from("10.77.3.2", MAPPED, 5353), me),
                "container: longer than the veth's MTU": (ctr, ipv4("10.77.3.2", SHORT_MTU), me),
                "container: back to itself": (ctr, ipv4("10.77.3.2", "10.77.3.2"), me),
                "container: routed, not in the map": (ctr, ipv4("10.77.3.2", "10.77.3.3"), me),
            }.items():
                out[case] = (packet, *prog_test_run(fd, packet, ifindex))
            facts.remove(other)                                    # its endpoint went: its entries go
            out["removed"] = facts.lookup_local(MAPPED)
            for case, (fd, ifindex) in {"uplink: removed": (uplink, index["uplink0"]),
                                        "container: removed": (ctr, me)}.items():
                packet = ipv4("10.77.4.2" if fd == uplink else "10.77.3.2", MAPPED)
                out[case] = (packet, *prog_test_run(fd, packet, ifindex))
            return out
        finally:
            os.close(uplink)
            os.close(ctr)

    try:
        results = run_in(ns, check)
    finally:
        facts.close()
    assert results.pop("removed") is None, "the entry went with its endpoint"
    for case in ("uplink: in the map", "uplink: in the map, checksum carry", "container: in the map"):
        packet, verdict, data = results.pop(case)
        assert verdict == TC_ACT_REDIRECT, case
        assert data[0:6] == bytes.fromhex("02420a4d0314"), f"{case}: destination MAC: the entry's container's"
        assert data[6:12] == bytes.fromhex("02aa00000002"), f"{case}: source MAC: the entry's host veth's"
        assert data[22] == packet[22] - 1 and checksum(data[14:34]) == 0, f"{case}: TTL and checksum"
        assert data[24:26] == forwarded_checksum(packet), f"{case}: the very bytes the kernel's forwarding writes"
        assert data[12:22] == packet[12:22] and data[23:24] == packet[23:24] and data[26:] == packet[26:], case
    packet, verdict, data = results.pop("uplink: routed, in the map with another MAC")
    assert verdict == TC_ACT_REDIRECT and data[0:6] == bytes.fromhex("02420a4d0399"), "the map's, not the fib's"
    packet, verdict, data = results.pop("container: routed, not in the map")
    assert verdict == TC_ACT_REDIRECT and data[0:6] == bytes.fromhex("02420a4d0303"), "no entry: the fib path"
    for case, (packet, verdict, data) in results.items():
        assert verdict == UNSPEC and data == packet, f"{case}: left as it was, for the normal path"


def test_the_ipv6_local_map_delivers_without_a_fib_lookup_and_a_removed_entry_falls_back(routed_host6):
    from vpcnet.datapath.ebpf import programs6
    ns, index = routed_host6
    me, other = index["vhendpoint"], index["vhother"]
    facts = endpoints.EndpointFacts()
    facts.write(me, ME6, ())
    facts.write(other, MAPPED6, ())
    facts.write_local(other, MAPPED6, endpoints.local_value(other, 1500, MAPPED_MAC, "02:aa:00:00:00:02"))
    local = facts.local_fd(6)

    def check():
        uplink = loader.load(programs6.uplink_program6(HOST6, CLUSTER6, index["vpc-anchor"], local_fd=local),
                             "vpcnet_test")
        ctr = loader.load(programs6.container_program6(HOST6, CLUSTER6, facts.fd(6), index["vpc-anchor"],
                                                       [index["uplink0"]], local_fd=local), "vpcnet_test")
        try:
            out = {}
            for case, (fd, packet, ifindex) in {
                "uplink: in the map": (uplink, ipv6(REMOTE6, MAPPED6), index["uplink0"]),
                "uplink: in the map, hop limit 1": (uplink, ipv6(REMOTE6, MAPPED6, hops=1), index["uplink0"]),
                "uplink: in the map, a fragment": (uplink, ipv6(REMOTE6, MAPPED6, nh=44), index["uplink0"]),
                "uplink: routed, not in the map": (uplink, ipv6(REMOTE6, ME6), index["uplink0"]),
                "container: in the map": (ctr, ipv6(ME6, MAPPED6), me),
                "container: in the map, hop limit 1": (ctr, ipv6(ME6, MAPPED6, hops=1), me),
                "container: forged source": (ctr, ipv6("fd00:77:3:0:1::9", MAPPED6), me),
                "container: neighbour solicitation": (ctr, icmp6(ME6, MAPPED6, 135), me),
            }.items():
                out[case] = (packet, *prog_test_run(fd, packet, ifindex))
            facts.remove(other, (6,))
            out["removed"] = facts.lookup_local(MAPPED6)
            out["uplink: removed"] = (ipv6(REMOTE6, MAPPED6), *prog_test_run(uplink, ipv6(REMOTE6, MAPPED6),
                                                                            index["uplink0"]))
            out["container: removed"] = (ipv6(ME6, MAPPED6), *prog_test_run(ctr, ipv6(ME6, MAPPED6), me))
            return out
        finally:
            os.close(uplink)
            os.close(ctr)

    try:
        results = run_in(ns, check)
    finally:
        facts.close()
    assert results.pop("removed") is None, "the entry went with its endpoint's IPv6 address"
    for case in ("uplink: in the map", "container: in the map"):
        packet, verdict, data = results.pop(case)
        assert verdict == TC_ACT_REDIRECT, case
        assert data[0:6] == bytes.fromhex("02420a4d0314") and data[6:12] == bytes.fromhex("02aa00000002"), case
        assert data[21] == 63 and data[12:21] == packet[12:21] and data[22:] == packet[22:], case
    packet, verdict, data = results.pop("uplink: routed, not in the map")
    assert verdict == TC_ACT_REDIRECT and data[0:6] == bytes.fromhex("02420a4d0302"), "no entry: the fib path"
    for case, (packet, verdict, data) in results.items():
        assert verdict == UNSPEC and data == packet, f"{case}: left as it was, for the normal path"


def test_removing_an_endpoints_entries_spares_a_new_endpoint_holding_its_address(facts):
    """IPAM may hand a deleted endpoint's address to a new one: the old one's removal, however late, leaves
    the new one's entry by address alone."""
    facts.write(11, MAPPED, ())
    facts.write_local(11, MAPPED, endpoints.local_value(11, 1500, MAPPED_MAC, "02:aa:00:00:00:02"))
    facts.write(12, MAPPED, ())
    facts.write_local(12, MAPPED, endpoints.local_value(12, 1500, MAPPED_MAC, "02:aa:00:00:00:03"))
    facts.remove(11)
    assert endpoints.local_ifindex(facts.lookup_local(MAPPED) or b"") == 12
    facts.remove(12)
    assert facts.lookup_local(MAPPED) is None and facts.read_local() == {}
