"""The bet behind vpcnet's text diff, proved on the real kernel for iptables-legacy and iptables-nft: every
rule vpcnet writes comes back from iptables-save exactly as written, so a second apply finds nothing to
repair and writes nothing. And the canary for the day it does not: the same chain rewritten on every pass
is said once, as an ERROR, and counted.

Each backend runs in a network namespace of the test's own (its own netfilter tables, legacy and
nf_tables alike); a backend this machine or kernel lacks fails in strict mode and skips otherwise.
"""
from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from dataclasses import dataclass

import pytest
from conftest import is_root, require, run
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vpcnet.datapath.firewall import (
    ANTI_SPOOFING,
    FORWARD_CHAIN,
    HOST_VETHS,
    IPV6_CHAIN,
    IPV6_RULES,
    LOOP_PASSES,
    NAT_CHAIN,
    RAW_CHAIN,
    FirewallTable,
    Ipv6Guard,
    NetworkRules,
    _forward_jump,
    ctstate,
    ip6tables_of,
    rule,
)
from vpcnet.datapath.ipv6 import guard_rules
from vpcnet.datapath.modes import strategy
from vpcnet.datapath.spec import MODES, NetworkSpec, PortMapping, bridge_name
from vpcnet.observability.events import EVENTS

BACKENDS = ("iptables-legacy", "iptables-nft")
# What Docker leaves in FORWARD before vpcnet's first pass (20.10's and 28's chains; DOCKER-USER first).
DOCKER_FORWARD = ("*filter\n:DOCKER-USER - [0:0]\n:DOCKER - [0:0]\n:DOCKER-FORWARD - [0:0]\n"
                  "-A FORWARD -j DOCKER-USER\n-A FORWARD -j DOCKER-FORWARD\n-A FORWARD -o docker0 -j DOCKER\n"
                  "-A DOCKER-USER -j RETURN\nCOMMIT\n")


@pytest.fixture(params=BACKENDS)
def backend(request, netns_factory) -> tuple[str, str]:
    """(netns, iptables binary), the namespace holding Docker's FORWARD chains."""
    iptables = request.param
    require(is_root(), "needs root")
    for binary in (iptables, ip6tables_of(iptables)):
        require(all(shutil.which(b) for b in (binary, f"{binary}-save", f"{binary}-restore")),
                f"{binary}, -save and -restore are not installed")
    ns = netns_factory("vpcrt")
    for binary in (iptables, ip6tables_of(iptables)):
        probe = subprocess.run(["ip", "netns", "exec", ns, binary, "-w", "10", "-t", "raw", "-S"],
                               capture_output=True, text=True)
        require(probe.returncode == 0, f"{binary} does not work with this kernel: {probe.stderr.strip()}")
        kind = "legacy" if binary.endswith("-legacy") else "nf_tables"
        assert kind in version(binary), f"{binary} is not the {kind} backend: {version(binary)}"
    run(["ip", "netns", "exec", ns, f"{iptables}-restore", "--noflush"], input=DOCKER_FORWARD)
    return ns, iptables


def table(backend: tuple[str, str], ipv6: bool = False) -> FirewallTable:
    ns, iptables = backend
    return FirewallTable(["ip", "netns", "exec", ns], ip6tables_of(iptables) if ipv6 else iptables)


def version(binary: str) -> str:
    return run([binary, "--version"]).stdout.strip()


# -- every rule shape, one by one -------------------------------------------------------------------------
UPLINKS = ("eth0", "ens5", "enp0s31f6", "bond0.100", "wlp3s0-long-15")      # the last: 15, the kernel's limit
WILDCARDS = (HOST_VETHS, "vpc-+", "vpp-+", "br-+", "eth+")
TAG = "0123456789ab"
COMMENT = f"vpcnet {TAG}"
SHAPES: dict[str, list[str]] = {
    "raw": [
        ANTI_SPOOFING,
        rule(dst="10.77.3.1/32", comment=COMMENT, target="RETURN"),
        rule(src="10.77.3.0/24", dst="10.77.0.0/16", comment=COMMENT, target="CT --notrack"),
        rule(src="0.0.0.0/0", dst="10.0.0.0/8", comment=COMMENT, target="CT --notrack"),      # /0: no -s
    ],
    "filter": [
        *(rule(iif=name, comment=COMMENT, target="ACCEPT") for name in UPLINKS + WILDCARDS),
        *(rule(oif=name, comment=COMMENT, target="DROP") for name in WILDCARDS),
        rule(iif="vpc-0123456789a", oif="vpc-0123456789a", comment=COMMENT, target="ACCEPT"),
        rule(src="10.77.3.0/24", dst="10.77.0.0/16", iif=HOST_VETHS, comment=COMMENT, target="ACCEPT"),
        rule(src="10.77.0.0/16", dst="10.77.3.0/24", oif=HOST_VETHS, comment=COMMENT, target="ACCEPT"),
        # the host-wide chains' shapes: uplink names and wildcards with conntrack state matches
        *(rule(iif=uplink, oif=HOST_VETHS, match=ctstate("ESTABLISHED", "RELATED"), target="ACCEPT")
          for uplink in UPLINKS),
        rule(iif=HOST_VETHS, oif="eth0", match=ctstate("NEW"), comment=COMMENT, target="ACCEPT"),
        rule(iif="vpc-+", oif="br-+", match=ctstate("RELATED", "ESTABLISHED"), target="RETURN"),
        rule(iif="eth+", match=ctstate("INVALID"), target="DROP"),
        rule(match=ctstate("UNTRACKED", "DNAT", "NEW", "INVALID", "ESTABLISHED", "SNAT", "RELATED"), target="DROP"),
        rule(iif="docker0", oif=HOST_VETHS, target="DROP"),
        rule(src="10.1.2.3/24", target="ACCEPT"),                   # host bits: printed as 10.1.2.0/24
    ],
    "nat": [
        rule(dst="10.77.0.0/16", comment=COMMENT, target="RETURN"),
        rule(dst="0.0.0.0/0", comment=COMMENT, target="RETURN"),    # a no-NAT list of 0.0.0.0/0
        rule(dst="192.168.7.9/32", comment=COMMENT, target="RETURN"),
        rule(oif="vpc-0123456789a", comment=COMMENT, target="RETURN"),
        rule(oif="eth0", match=ctstate("NEW"), comment=COMMENT, target="MASQUERADE"),
        rule(comment=COMMENT, target="MASQUERADE"),
    ],
}
SHAPES_V6 = [*IPV6_RULES, rule(iif="eth+", match=ctstate("ESTABLISHED", "RELATED"), target="ACCEPT"),
             # the guard's rules for IPv6 endpoints, routed and bridge mode (vpcnet.datapath.ipv6)
             *guard_rules(True, bridged=True)]
SHAPE_CHAINS = {"raw": "VPCNET-R-shapes", "filter": "VPCNET-F-shapes", "nat": "VPCNET-N-shapes"}


def test_every_rule_shape_reads_back_as_written(backend):
    """Each shape in a chain of its own, written by one apply: iptables-save prints every rule exactly as
    written, in order, and the next apply runs iptables-save once and nothing else."""
    for ipv6, shapes in ((False, {t: SHAPES[t] for t in SHAPE_CHAINS}), (True, {"raw": SHAPES_V6})):
        fw = table(backend, ipv6)
        net = NetworkRules("shapes", {(t, SHAPE_CHAINS[t]): rules for t, rules in shapes.items()})
        try:
            assert fw.apply([net], host=False), "an empty chain set: everything was missing"
            saved = fw.save()
            for t, rules in shapes.items():
                printed = saved.chain(t, SHAPE_CHAINS[t])
                assert printed == rules, [(w, p) for w, p in zip(rules, printed or [], strict=False) if w != p]
            runs = fw.runs
            assert fw.apply([net], host=False) == []
            assert fw.runs == runs + 1, "one iptables-save, no restore"
        finally:
            fw.drop(list(net.chains))


# Spellings iptables rewrites: what the proof would catch, and what rule() and ctstate() spell for them.
REWRITTEN = [
    ("-s 0.0.0.0/0 -j ACCEPT", "-j ACCEPT", rule(src="0.0.0.0/0", target="ACCEPT")),
    ("-d 10.1.2.3/24 -j ACCEPT", "-d 10.1.2.0/24 -j ACCEPT", rule(dst="10.1.2.3/24", target="ACCEPT")),
    ("-i eth0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
     "-i eth0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
     rule(iif="eth0", match=ctstate("ESTABLISHED", "RELATED"), target="ACCEPT")),
]


def test_the_proof_sees_a_rule_printed_otherwise(backend):
    """Not canonical spellings do read back differently (so the tests above can fail), and the
    generator spells them as the kernel prints them."""
    fw = table(backend)
    written = [w for w, _, _ in REWRITTEN]
    net = NetworkRules("spell", {("filter", "VPCNET-F-spell"): written})
    try:
        fw.apply([net], host=False)
        assert fw.save().chain("filter", "VPCNET-F-spell") == [p for _, p, _ in REWRITTEN]
        assert fw.apply([net], host=False), "rewritten again: text equality fails for these spellings"
    finally:
        fw.drop(list(net.chains))
    assert [g for _, _, g in REWRITTEN] == [p for _, p, _ in REWRITTEN]


# -- whole networks, generated ------------------------------------------------------------------------
@dataclass(frozen=True)
class Net:
    tag: str
    mode: str
    internal: bool
    cluster: str
    host: str
    no_nat: tuple[str, ...]
    ports: tuple[tuple[str, str, int, int], ...] = ()     # published: (proto, host ip, host port, container port)

    def spec(self) -> NetworkSpec:
        host = ipaddress.IPv4Network(self.host)
        address = str(host.network_address + 2)
        ports = () if self.internal else tuple(sorted(PortMapping(proto, host_ip, host_port, address, port)
                                                      for proto, host_ip, host_port, port in self.ports))
        return NetworkSpec(tag=self.tag, bridge=bridge_name(self.tag), gateway=str(host.network_address + 1),
                           host_cidr=self.host, cluster_cidr=self.cluster, mtu=1500, internal=self.internal,
                           no_nat=self.no_nat, mode=self.mode, ports=ports)


PORTS = st.tuples(st.sampled_from(("tcp", "udp", "sctp")),
                  st.one_of(st.just(""), st.builds(lambda a: str(ipaddress.IPv4Address(a)), st.integers(1, 2**32 - 2))),
                  st.integers(1, 65535), st.integers(1, 65535))


CIDRS = st.builds(lambda a, p: str(ipaddress.IPv4Network((a, p), strict=False)),
                  st.integers(0, 2**32 - 1), st.integers(0, 32))


@st.composite
def nets(draw, tag: str) -> tuple[Net, Net]:
    """A network, and the same network changed: another host CIDR, no-NAT list and --internal."""
    cluster = ipaddress.IPv4Network((draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 15))), strict=False)
    made = []
    for _ in range(2):
        prefix = draw(st.integers(16, 30))
        block = draw(st.integers(0, 2 ** (prefix - cluster.prefixlen) - 1))
        host = ipaddress.IPv4Network((int(cluster.network_address) + block * 2 ** (32 - prefix), prefix))
        published = tuple(draw(st.lists(PORTS, max_size=3, unique_by=lambda p: (p[0], p[1], p[2]))))
        made.append((str(host), tuple(draw(st.lists(CIDRS, max_size=4))), draw(st.booleans()), published))
    mode = draw(st.sampled_from(MODES))
    first, second = (Net(tag, mode, internal, str(cluster), host, no_nat, published)
                     for host, no_nat, internal, published in made)
    return first, second


@st.composite
def hosts(draw) -> list[tuple[Net, Net]]:
    tags = draw(st.lists(st.text("0123456789abcdef", min_size=12, max_size=12), min_size=1, max_size=3,
                         unique=True))
    return [draw(nets(tag)) for tag in tags]


ODD = [(Net("00000000000a", "bridge", False, "0.0.0.0/0", "10.9.0.0/16", ("0.0.0.0/0", "192.168.1.7/32"),
            (("tcp", "", 8080, 80), ("udp", "10.0.0.5", 53, 53), ("sctp", "", 65535, 1))),
        Net("00000000000a", "bridge", True, "0.0.0.0/0", "172.16.4.0/30", ())),
       (Net("00000000000b", "routed", True, "0.0.0.0/0", "10.9.0.0/24", ()),
        Net("00000000000b", "routed", False, "0.0.0.0/0", "10.9.1.0/24", ("0.0.0.0/0",))),
       (Net("00000000000c", "ebpf", False, "10.0.0.0/8", "10.255.255.252/30",
            ("10.0.0.0/8", "100.64.0.0/10", "192.168.0.0/16", "8.8.8.8/32")),
        Net("00000000000c", "ebpf", True, "10.0.0.0/8", "10.1.0.0/16", ("1.0.0.0/8",)))]


def settled(fw: FirewallTable, wanted: list[NetworkRules]) -> None:
    """A second apply finds nothing to repair and runs iptables-save only; nothing differs."""
    runs = fw.runs
    assert fw.apply(wanted) == []
    assert fw.runs == runs + 1, "one iptables-save, no restore"
    saved = fw.save()
    assert not any(fw.differs(saved, net) for net in wanted)
    assert _forward_jump(saved, []) == [], "vpcnet's jump right after DOCKER-USER"
    forward = saved.chain("filter", "FORWARD")
    assert forward[:2] == ["-j DOCKER-USER", f"-j {FORWARD_CHAIN}"], forward


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          database=None)
@given(host=hosts())
@example(host=ODD)
def test_generated_networks_of_every_mode_need_no_second_write(backend, host):
    """One to three networks of any mode, --internal or not, host CIDRs /16../30 in a cluster CIDR as wide
    as 0.0.0.0/0, no-NAT lists of several CIDRs (0.0.0.0/0 and /32 among them), with Docker's FORWARD chains
    present: applied, then changed (another host CIDR, no-NAT list, --internal), each settles in one pass.
    The IPv6 guard the same way. Then removed, nothing of theirs is left."""
    fw, guard = table(backend), Ipv6Guard(*_guard_args(backend))
    firsts = [strategy(a.mode).firewall(a.spec()) for a, _b in host]
    changed = [strategy(b.mode).firewall(b.spec()) for _a, b in host]
    try:
        fw.apply(firsts)
        settled(fw, firsts)
        fw.apply(changed)
        settled(fw, changed)
        guard.apply()
        runs = guard.table.runs
        assert guard.apply() == [] and guard.table.runs == runs + 1
        assert guard.table.save().chain("raw", IPV6_CHAIN) == IPV6_RULES
        assert not [w for w in fw.loops.writes.values() if w.passes > 1]
    finally:
        fw.apply([], unwanted=[a.tag for a, _b in host], host=False)
    text = run(["ip", "netns", "exec", backend[0], f"{backend[1]}-save"]).stdout
    assert not [a.tag for a, _b in host if a.tag in text]


def _guard_args(backend: tuple[str, str]) -> tuple[list[str], str]:
    ns, iptables = backend
    return ["ip", "netns", "exec", ns], iptables


# -- the canary ---------------------------------------------------------------------------------------------
def loops_counted(table_name: str, family: str = "ipv4") -> float:
    return EVENTS.get_sample_value("vpcnet_datapath_repair_loops_total",
                                   {"family": family, "table": table_name}) or 0.0


class Misprinting(FirewallTable):
    """A backend that prints one rule otherwise: the real iptables in the namespace, with iptables-save's
    output rewritten as another version might print it (`-j MASQUERADE` as `-j MASQUERADE --random`)."""

    def _run(self, cmd, stdin=None):
        proc = super()._run(cmd, stdin)
        if cmd[0] == self.save_cmd:
            proc.stdout = proc.stdout.replace(" -j MASQUERADE\n", " -j MASQUERADE --random\n")
        return proc


NET = Net("cafe00000001", "bridge", False, "10.77.0.0/16", "10.77.3.0/24", ("192.168.0.0/16",))


def test_a_rule_printed_otherwise_is_said_once_as_an_error_and_counted(backend, caplog):
    ns, iptables = backend
    fw = Misprinting(["ip", "netns", "exec", ns], iptables)
    wanted = [strategy(NET.mode).firewall(NET.spec())]
    before, other = loops_counted("nat"), loops_counted("filter")
    with caplog.at_level(logging.WARNING, logger="vpcnet.datapath.firewall"):
        for n in range(LOOP_PASSES + 3):
            problems = fw.apply(wanted)
            assert problems, f"pass {n}: the misprinted chain is 'repaired' again"
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == (n + 1 >= LOOP_PASSES), (n, [r.getMessage() for r in errors])
    message = errors[0].getMessage()
    assert f"nat chain VPCNET-N-{NET.tag} was written {LOOP_PASSES} passes in a row" in message
    assert f'vpcnet wrote -m comment --comment "vpcnet {NET.tag}" -j MASQUERADE;' in message
    assert f'prints -m comment --comment "vpcnet {NET.tag}" -j MASQUERADE --random' in message
    assert loops_counted("nat") == before + 1 and loops_counted("filter") == other
    assert fw.loops.loops == 1


def test_a_rule_added_to_a_shared_chain_and_printed_otherwise_is_said_once(backend, caplog):
    """A rule added to a shared chain (never declared) comes back as another rule each time: the chain
    grows, and what the kernel prints is the rule added since the last pass."""
    ns, iptables = backend

    written, printed = "-s 10.77.3.0/24 -j", "-s 10.77.3.0/24 -m mark --mark 0x1 -j"

    class Jumps(FirewallTable):
        """Prints the jump otherwise, and (as a kernel would) takes its printed text back in a delete."""
        def _run(self, cmd, stdin=None):
            proc = super()._run(cmd, stdin.replace(printed, written) if stdin else stdin)
            if cmd[0] == self.save_cmd:
                proc.stdout = proc.stdout.replace(f"-A {NAT_CHAIN} {written}", f"-A {NAT_CHAIN} {printed}")
            return proc

    fw = Jumps(["ip", "netns", "exec", ns], iptables)
    wanted = [strategy(NET.mode).firewall(NET.spec())]
    with caplog.at_level(logging.ERROR, logger="vpcnet.datapath.firewall"):
        for _ in range(LOOP_PASSES + 2):
            assert fw.apply(wanted)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert f"nat chain {NAT_CHAIN} was written" in errors[0]
    assert f"prints -s 10.77.3.0/24 -m mark --mark 0x1 -j VPCNET-N-{NET.tag}" in errors[0]


def by_hand(backend: tuple[str, str], *args: str) -> None:
    ns, iptables = backend
    run(["ip", "netns", "exec", ns, iptables, "-w", "10", *args])


def test_real_repairs_never_trip_the_canary(backend, caplog):
    """A rule deleted by hand once, or on every pass; a chain flushed on every pass; a shared chain's jump
    deleted on every pass: each is repaired (and logged as a repair by the pass), never called a loop."""
    fw = table(backend)
    spec = NET.spec()
    wanted = [strategy(NET.mode).firewall(spec)]
    fw.apply(wanted)
    masquerade = f'-m comment --comment "vpcnet {NET.tag}" -j MASQUERADE'
    with caplog.at_level(logging.ERROR, logger="vpcnet.datapath.firewall"):
        by_hand(backend, "-t", "nat", "-D", spec.nat_chain, *_args(masquerade))
        assert fw.apply(wanted) and fw.apply(wanted) == []
        for undo in (["-t", "nat", "-D", spec.nat_chain, *_args(masquerade)],
                     ["-t", "filter", "-F", spec.filter_chain],
                     ["-t", "raw", "-D", RAW_CHAIN, "-j", spec.raw_chain],
                     ["-t", "raw", "-D", RAW_CHAIN, *_args(ANTI_SPOOFING)]):
            for _ in range(LOOP_PASSES + 2):
                by_hand(backend, *undo)
                assert fw.apply(wanted), undo
            assert fw.apply(wanted) == []
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == []
    assert fw.loops.loops == 0 and fw.loops.writes == {}


def _args(text: str) -> list[str]:
    """A rule's text as iptables arguments (a quoted comment as one argument)."""
    head, quote, rest = text.partition('"')
    if not quote:
        return text.split()
    comment, _, tail = rest.partition('"')
    return head.split() + [comment] + tail.split()


def test_a_conntrack_state_iptables_does_not_know_is_refused():
    with pytest.raises(ValueError, match=r"conntrack states \['ESTABLISH'\]: each must be one of INVALID, NEW"):
        ctstate("RELATED", "ESTABLISH")
    with pytest.raises(ValueError, match="conntrack states none"):
        ctstate()
