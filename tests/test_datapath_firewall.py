"""vpcnet's firewall as one transaction: the diff (pure) and the real iptables inside a test netns."""
from __future__ import annotations

import subprocess
import threading

import pytest
from conftest import is_root, require, run

from vpcnet.datapath.dataplane import Dataplane
from vpcnet.datapath.firewall import ANTI_SPOOFING, FirewallTable, _forward_jump, parse_save
from vpcnet.datapath.modes import strategy
from vpcnet.datapath.spec import NetworkSpec, bridge_name


def spec(tag="a1b2c3d4e5f6", host="10.77.3.0/24", mode="bridge", internal=False) -> NetworkSpec:
    return NetworkSpec(tag=tag, bridge=bridge_name(tag + "0" * 52), gateway=host.rsplit(".", 1)[0] + ".1",
                       host_cidr=host, cluster_cidr="10.77.0.0/16", mtu=1500, internal=internal, mode=mode)


def script_for(saved_text: str, *specs: NetworkSpec, unwanted=()) -> tuple[list[str], str]:
    wanted = [strategy(s.mode).firewall(s) for s in specs]
    return FirewallTable._diff(parse_save(saved_text), wanted, list(unwanted), True)


def test_a_chain_that_differs_is_emptied_and_refilled_in_the_same_transaction():
    s = spec()
    problems, script = script_for("*filter\n:FORWARD DROP [0:0]\n:VPCNET-F-a1b2c3d4e5f6 - [0:0]\nCOMMIT\n", s)
    assert "filter chain VPCNET-F-a1b2c3d4e5f6 holds 0 rule(s), 0 of 2 wanted" in problems
    filter_part = script.split("*filter\n")[1].split("COMMIT")[0].splitlines()
    at = filter_part.index(":VPCNET-F-a1b2c3d4e5f6 - [0:0]")
    assert filter_part[at + 1].startswith("-A VPCNET-F-a1b2c3d4e5f6 -i vpc-") and len(filter_part) > at + 2
    assert script.count("COMMIT") == 4                     # raw, mangle, filter, nat: one restore for all


def test_a_kernel_that_matches_needs_no_write():
    s = spec(mode="routed")
    _, script = script_for("", s)
    restored = parse_save(_as_save(script))
    problems, again = FirewallTable._diff(restored, [strategy("routed").firewall(s)], [], True)
    assert problems == [] and again == ""


def _as_save(script: str) -> str:
    """What iptables-save would print after `script` on an empty kernel (no -I/-D/-X in a first write)."""
    out = []
    for line in script.splitlines():
        out.append(line.replace("-I FORWARD 1 ", "-A FORWARD ").replace("-I POSTROUTING 1 ", "-A POSTROUTING ")
                   .replace("-I PREROUTING 1 ", "-A PREROUTING "))
    return "\n".join(out)


def test_shared_chains_are_never_declared_once_they_exist():
    """They may hold another vpcnet instance's jumps: only missing rules are added."""
    saved = ("*filter\n:VPCNET-FORWARD - [0:0]\n-A FORWARD -j VPCNET-FORWARD\n"
             "-A VPCNET-FORWARD -j VPCNET-F-other0000000\nCOMMIT\n")
    _, script = script_for(saved, spec())
    assert ":VPCNET-FORWARD" not in script and "-D VPCNET-FORWARD" not in script
    assert "-A VPCNET-FORWARD -j VPCNET-F-a1b2c3d4e5f6" in script


def test_an_unwanted_network_loses_its_chains_and_jumps():
    saved = ("*nat\n:VPCNET-POSTROUTING - [0:0]\n:VPCNET-N-a1b2c3d4e5f6 - [0:0]\n"
             "-A VPCNET-POSTROUTING -s 10.77.3.0/24 -j VPCNET-N-a1b2c3d4e5f6\n"
             "-A VPCNET-N-a1b2c3d4e5f6 -j MASQUERADE\nCOMMIT\n")
    _, script = FirewallTable._diff(parse_save(saved), [], ["a1b2c3d4e5f6"], False)
    assert script == ("*nat\n-D VPCNET-POSTROUTING -s 10.77.3.0/24 -j VPCNET-N-a1b2c3d4e5f6\n"
                      ":VPCNET-N-a1b2c3d4e5f6 - [0:0]\n-X VPCNET-N-a1b2c3d4e5f6\nCOMMIT\n")


# -- the real iptables ------------------------------------------------------------------------------------

@pytest.fixture
def ns(netns_factory):
    require(is_root(), "needs root")
    return netns_factory("vpcfw")


@pytest.mark.parametrize("mode,internal", [("bridge", False), ("bridge", True), ("routed", False),
                                           ("routed", True), ("ebpf", False)])
def test_written_rules_read_back_identical_so_a_second_pass_writes_nothing(ns, mode, internal):
    """The desired rules are spelled as iptables-save prints them; otherwise every pass would rewrite."""
    dp = Dataplane(netns=ns)
    s = spec(mode=mode, internal=internal)
    first = dp.firewall.apply([strategy(mode).firewall(s)])
    assert first, "an empty kernel: everything was missing"
    runs = dp.firewall.runs
    assert dp.firewall.apply([strategy(mode).firewall(s)]) == []
    assert dp.firewall.runs == runs + 1, "one iptables-save, no restore"


def test_network_create_and_delete_cost_a_few_iptables_runs(ns):
    run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])   # on already: no policy to set
    dp = Dataplane(netns=ns)
    s = spec()
    dp.ensure_network(s)
    assert dp.firewall.runs == 2                          # one save, one restore
    dp.delete_network(s)
    assert dp.firewall.runs == 4
    saved = run(["ip", "netns", "exec", ns, "iptables-save"]).stdout
    assert s.tag not in saved and "VPCNET-FORWARD" in saved and ANTI_SPOOFING in saved


def _filter(script: str) -> str:
    """The filter table's part of a restore script (mangle has a FORWARD chain too: the ingress guard's)."""
    return script.split("*filter\n", 1)[1].split("COMMIT\n", 1)[0] if "*filter\n" in script else ""


def test_the_forward_jump_comes_after_docker_user_and_a_misplaced_one_moves():
    saved = "*filter\n:FORWARD DROP [0:0]\n-A FORWARD -j VPCNET-FORWARD\n-A FORWARD -j DOCKER-USER\nCOMMIT\n"
    problems, script = FirewallTable._diff(parse_save(saved), [], [], True)
    assert "-D FORWARD -j VPCNET-FORWARD\n-I FORWARD 2 -j VPCNET-FORWARD\n" in script
    assert any("ahead of DOCKER-USER" in p for p in problems)
    placed = "*filter\n:FORWARD DROP [0:0]\n-A FORWARD -j DOCKER-USER\n-A FORWARD -j VPCNET-FORWARD\nCOMMIT\n"
    assert "FORWARD" not in _filter(FirewallTable._diff(parse_save(placed), [], [], True)[1]).replace(
        "VPCNET-FORWARD - ", "")
    _, fresh = FirewallTable._diff(parse_save("*filter\n:FORWARD DROP [0:0]\n-A FORWARD -j DOCKER-USER\nCOMMIT\n"),
                                   [], [], True)
    assert "-I FORWARD 2 -j VPCNET-FORWARD" in fresh


def test_a_forward_jump_behind_another_rule_moves_back_but_not_behind_dockers_own():
    """After a Docker restart or a firewall tool's reload the jump may sit behind a DROP: it moves back to
    right after DOCKER-USER. Docker's own rules between (its chains, docker0, br- bridges) are left alone."""
    def diff(*rules: str) -> tuple[list[str], str]:
        saved = "*filter\n:FORWARD DROP [0:0]\n" + "".join(f"-A FORWARD {r}\n" for r in rules) + "COMMIT\n"
        problems, script = FirewallTable._diff(parse_save(saved), [], [], True)
        return [p for p in problems if "FORWARD's jump" in p], _filter(script)

    problems, script = diff("-j DOCKER-USER", "-j DOCKER-FORWARD", "-j DROP", "-j VPCNET-FORWARD")
    assert "-D FORWARD -j VPCNET-FORWARD\n-I FORWARD 2 -j VPCNET-FORWARD\n" in script
    assert problems == ["filter FORWARD's jump to VPCNET-FORWARD is behind '-j DROP'"]
    problems, script = diff("-s 10.0.0.0/8 -j DROP", "-j VPCNET-FORWARD")       # no Docker: first
    assert "-D FORWARD -j VPCNET-FORWARD\n-I FORWARD 1 -j VPCNET-FORWARD\n" in script and problems
    problems, script = diff("-j DOCKER-USER", "-j VPCNET-FORWARD", "-j DROP", "-j VPCNET-FORWARD")
    assert "-D FORWARD -j VPCNET-FORWARD\n" * 2 + "-I FORWARD 2 -j VPCNET-FORWARD\n" in script
    assert problems == ["filter FORWARD's jump to VPCNET-FORWARD is there 2 times"]
    for fine in (("-j DOCKER-USER", "-j VPCNET-FORWARD", "-j DROP"),
                 ("-j DOCKER-USER", "-j DOCKER-ISOLATION-STAGE-1", "-o docker0 -j DOCKER",
                  "-i br-0123abcd -o br-0123abcd -j ACCEPT", "-j VPCNET-FORWARD")):
        problems, script = diff(*fine)
        assert problems == [] and " FORWARD " not in script, (fine, script)


# -- the FORWARD repair beside another tool writing FORWARD --------------------------------------------------
def forward(ns: str) -> list[str]:
    return parse_save(run(["ip", "netns", "exec", ns, "iptables-save", "-t", "filter"]).stdout).chain(
        "filter", "FORWARD") or []


def other_tools_rule(ns: str, n: int) -> subprocess.CompletedProcess:
    """What Docker or firewalld does to FORWARD, as far as vpcnet can tell: a rule inserted at the top."""
    return subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", "10", "-I", "FORWARD", "1", "-j", "ACCEPT",
                           "-m", "comment", "--comment", f"other-{n}"], capture_output=True, text=True)


def test_a_rule_inserted_between_the_save_and_the_repair_is_kept_and_the_jump_still_moves(ns, monkeypatch):
    """Another tool inserts a rule into FORWARD right after vpcnet read it and before its restore: the
    misplaced jump is deleted by its text, so the other rule stays (a number would have named it), and the
    check after the restore moves the jump again to where it belongs."""
    fw = Dataplane(netns=ns).firewall
    fw.apply([])
    other_tools_rule(ns, 0)                               # the jump is now behind another rule: a repair
    save, inserted = fw.save, []

    def then_another_tool():
        saved = save()
        if not inserted:
            inserted.append(other_tools_rule(ns, 1).returncode)
        return saved

    monkeypatch.setattr(fw, "save", then_another_tool)
    problems = fw.apply([])
    assert problems == ["filter FORWARD's jump to VPCNET-FORWARD is behind '-m comment --comment other-0 -j ACCEPT'"]
    assert forward(ns) == ["-j VPCNET-FORWARD", "-m comment --comment other-1 -j ACCEPT",
                           "-m comment --comment other-0 -j ACCEPT"]


def test_repairs_racing_another_tool_writing_forward_never_delete_its_rules(ns):
    """A thread inserts rules into FORWARD in a loop (as Docker or a firewalld reload would) while vpcnet
    repairs its jump again and again: every one of the other tool's rules is still there, and once the
    other tool stops, one pass puts the jump back where it belongs, once."""
    fw = Dataplane(netns=ns).firewall
    fw.apply([])
    stop, inserted = threading.Event(), []

    def other_tool():
        n = 0
        while not stop.is_set():
            if other_tools_rule(ns, n).returncode == 0:
                inserted.append(n)
            n += 1

    thread = threading.Thread(target=other_tool)
    thread.start()
    try:
        for _ in range(40):
            fw.apply([])
    finally:
        stop.set()
        thread.join(timeout=30)
    fw.apply([])
    rules = forward(ns)
    assert inserted and len(inserted) > 10
    missing = [n for n in inserted if f"-m comment --comment other-{n} -j ACCEPT" not in rules]
    assert missing == [], f"{len(missing)} of the other tool's {len(inserted)} rules deleted"
    assert rules.count("-j VPCNET-FORWARD") == 1 and rules[0] == "-j VPCNET-FORWARD", rules[:5]
    assert _forward_jump(parse_save(run(["ip", "netns", "exec", ns, "iptables-save"]).stdout), []) == []
