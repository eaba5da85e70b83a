"""vpcnet's firewall as desired state, written in one `iptables-restore --noflush` transaction.

A network's rules are computed whole (vpcnet.datapath.modes) as chains of vpcnet's own, plus the rules
other chains need to reach them (a jump from `VPCNET-FORWARD`, say). `FirewallTable.apply` reads what the
kernel holds with one `iptables-save`, diffs it against what is wanted, and writes only the difference
with one `iptables-restore --noflush`: a chain that differs is declared (which empties it) and refilled in
the same transaction, so no packet ever meets it empty, and an up-to-date network costs one process run
(the save) and no write. The diff is also the drift report: each difference is named, so a repair can be
logged and counted. Every restore run (this one, `drop`'s, the IPv6 guard's) is counted by family and
outcome in `vpcnet_iptables_restore_total`.

Rules are written exactly as `iptables-save` prints them (`-s`, `-d`, `-i`, `-o`, then matches, then the
target; comments quoted; an address as its network and prefix, and none for `0.0.0.0/0`; conntrack states
in the kernel's order, `ctstate`), so text equality is rule equality. tests/test_firewall_roundtrip.py
proves it on the real kernel, for iptables-legacy and iptables-nft alike (1.8.9 on the test host): every
rule shape vpcnet writes, and generated networks of every mode, comes back from iptables-save as written,
and a second apply writes nothing. Text also spares a hash comment on each rule (Calico Felix's way),
which a user reading `iptables-save` would have to see through. Should another iptables print a rule
otherwise, the rule would be rewritten on every pass; `RepairLoops` (the canary) notices the same write
read back as the same other text three passes in a row and says so once, as an ERROR naming the chain
and both texts, counted in `vpcnet_datapath_repair_loops_total`. Shared chains (`VPCNET-FORWARD`,
`VPCNET-POSTROUTING`, `VPCNET-RAW`, and `VPCNET-DNAT` for published ports) are never declared once they
exist: they may hold the jumps of another vpcnet instance on the host (a managed plugin beside a systemd
one); only missing rules are added to them and only named rules removed.

Isolation (docs/datapath.md): cluster traffic enters and leaves by the uplinks and vpcnet's own links. Two
host-wide filter chains, whole chains computed from the host's uplinks alone (`isolation_chains`, declared
and refilled when the default route moves, like a network's chains): `VPCNET-EGRESS` accepts towards
vpcnet's links and the uplinks and returns the rest to FORWARD's later rules (Docker's); `VPCNET-INGRESS`
accepts from them or as a conntrack reply and drops the rest. Each network's filter chain jumps to them
(vpcnet.datapath.modes). The ingress half is repeated in the mangle table (`VPCNET-INGRESS`, jumped to
from mangle FORWARD for `-o vh+` and `-o vpc-+`), which runs before the filter table and which Docker never
writes: Docker 20.10 inserts a new bridge network's `-i br-x ! -o br-x -j ACCEPT` at the top of filter
FORWARD, ahead of vpcnet's jump until the next pass, and there it would accept a bridge container's
connection to a vpcnet container.

`Ipv6Guard` is the IPv6 side: one raw chain (`VPCNET-IPV6`, jumped to from raw PREROUTING) dropping every
IPv6 packet that arrives on a vpcnet host-side link, one rule per link name prefix. vpcnet's networks carry
no IPv6; this keeps a container's router advertisements and any other IPv6 of its off the host where
the links' IPv6 sysctls cannot be written (vpcnet.datapath.links: a managed plugin built without the
host-sys-net mount, whose /proc/sys is read-only), and beside them everywhere else.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from vpcnet.errors import DataplaneError
from vpcnet.observability import events

log = logging.getLogger(__name__)

FORWARD_CHAIN = "VPCNET-FORWARD"
USER_CHAIN = "DOCKER-USER"          # Docker's chain for the user's own forwarding rules
NAT_CHAIN = "VPCNET-POSTROUTING"
RAW_CHAIN = "VPCNET-RAW"
DNAT_CHAIN = "VPCNET-DNAT"    # published ports (nat): jumped to for local destinations, before routing
PARENTS = {"filter": FORWARD_CHAIN, "nat": NAT_CHAIN, "raw": RAW_CHAIN}
BUILTIN = {"filter": "FORWARD", "nat": "POSTROUTING", "raw": "PREROUTING"}
# The shared chains beyond one per table, and the builtin chains' jumps to them: as Docker jumps to its
# DOCKER chain, for packets to one of the host's own addresses, arriving (PREROUTING) or sent by the host
# itself (OUTPUT; never to 127.0.0.0/8: vpcnet leaves route_localnet alone, docs/usage.md).
MORE_PARENTS = {("nat", DNAT_CHAIN): [("PREROUTING", f"-m addrtype --dst-type LOCAL -j {DNAT_CHAIN}"),
                                      ("OUTPUT", f"! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j {DNAT_CHAIN}")]}
PREFIXES = [("filter", "VPCNET-F-"), ("nat", "VPCNET-N-"), ("raw", "VPCNET-R-"), ("nat", "VPCNET-P-")]
TABLES = ("raw", "mangle", "filter", "nat")
ATTEMPTS = 3                  # save, diff and restore rounds of one apply
FORWARD_MOVE = f"\n-D FORWARD -j {FORWARD_CHAIN}\n"    # in a script that moves FORWARD's jump
HOST_VETHS = "vh+"            # iptables wildcard for every endpoint's host end
# Routed modes: a packet from a container's veth whose source address is not routed back to that veth
# (another network's address, anyone else's) is dropped before anything else sees it. The kernel's own
# strict reverse-path check, per packet, independent of the host's rp_filter sysctls (which take the
# loosest of `all` and the device).
ANTI_SPOOFING = f'-i {HOST_VETHS} -m rpfilter --invert -m comment --comment "vpcnet anti-spoofing" -j DROP'


# IPv6: vpcnet's host-side links by name prefix (vpcnet.datapath.spec): endpoints' host veths, bridges and
# anchors, anchors' peers. Raw PREROUTING: before routing, conntrack, INPUT (where ndisc takes router
# advertisements) and FORWARD, as disable_ipv6=1 on the link would.
IPV6_CHAIN = "VPCNET-IPV6"
IPV6_LINKS = (HOST_VETHS, "vpc-+", "vpp-+")
IPV6_RULES = [f'-i {prefix} -m comment --comment "vpcnet: no IPv6" -j DROP' for prefix in IPV6_LINKS]
IPV6_FORWARD_CHAIN = "VPCNET-FORWARD6"      # IPv6 endpoints' forwarded traffic (vpcnet.datapath.ipv6)

# Where cluster traffic may enter and leave (docs/datapath.md, Isolation): vpcnet's own links and the
# uplinks. Host-wide chains, jumped to from each network's chain (vpcnet.datapath.modes), so a network's
# rules never depend on the uplinks and a moved default route rewrites two chains, not every network's.
# EGRESS: a packet from a vpcnet container is accepted towards vpcnet's links and the uplinks, and as the
# reply of a published port's connection (conntrack DNAT) towards wherever its client is; anything
# else (a Docker bridge, a second NIC, a VPN) falls through to FORWARD's later rules (Docker's), which
# treat it as any outside client: a published port is DNATed and accepted, the rest meets the policy.
# INGRESS: a packet to a vpcnet container is accepted from vpcnet's links and the uplinks, else only as a
# reply (conntrack RELATED,ESTABLISHED: the container opened the connection) or to a published port
# (conntrack DNAT: vpcnet's VPCNET-DNAT chain chose the container); everything else is dropped.
# Cluster traffic is NOTRACK'd (its state UNTRACKED), but it only ever comes by an uplink or a vpcnet link,
# accepted by interface before the state rule.
EGRESS_CHAIN = "VPCNET-EGRESS"
INGRESS_CHAIN = "VPCNET-INGRESS"
VPCNET_LINKS = (HOST_VETHS, "vpc-+", "vpp-+")
REPLIES = "-m conntrack --ctstate RELATED,ESTABLISHED"
# A published port's connection (DNATed to a vpcnet container by VPCNET-DNAT, whatever link it came by: a
# Docker bridge's container or a second NIC reach a published port as any outside client does).
PUBLISHED = "-m conntrack --ctstate DNAT"


# The ingress half once more, in the mangle table's FORWARD (before the filter table's, and a table Docker
# never writes): Docker 20.10 inserts each new bridge network's `-i br-x ! -o br-x -j ACCEPT` at the top of
# filter FORWARD, ahead of vpcnet's jump until the next pass moves it back; there it would accept a bridge
# container's connection to a vpcnet container. In mangle the guard holds whatever order FORWARD is in.
GUARD_TABLE = "mangle"
GUARD_JUMPS = [f"-o {HOST_VETHS} -j {INGRESS_CHAIN}", f"-o vpc-+ -j {INGRESS_CHAIN}"]


def isolation_chains(uplinks: Sequence[str]) -> dict[tuple[str, str], list[str]]:
    """(table, chain) -> rules: the filter chains EGRESS_CHAIN and INGRESS_CHAIN and the mangle guard
    INGRESS_CHAIN (RETURN where filter's accepts), for these uplink names."""
    links = (*VPCNET_LINKS, *sorted(set(uplinks)))
    return {("filter", EGRESS_CHAIN): [rule(oif=link, target="ACCEPT") for link in links]
            + [rule(match=PUBLISHED, target="ACCEPT")],
            ("filter", INGRESS_CHAIN): [rule(iif=link, target="ACCEPT") for link in links]
            + [rule(match=REPLIES, target="ACCEPT"), rule(match=PUBLISHED, target="ACCEPT"), rule(target="DROP")],
            (GUARD_TABLE, INGRESS_CHAIN): [rule(iif=link, target="RETURN") for link in links]
            + [rule(match=REPLIES, target="RETURN"), rule(match=PUBLISHED, target="RETURN"), rule(target="DROP")]}


def rule(src: str = "", dst: str = "", iif: str = "", oif: str = "", match: str = "", comment: str = "",
         target: str = "") -> str:
    """One rule in iptables-save's canonical order and spelling (addresses as `_address` prints them)."""
    parts = []
    for flag, value in (("-s", _address(src)), ("-d", _address(dst)), ("-i", iif), ("-o", oif)):
        if value:
            parts += [flag, value]
    if match:
        parts.append(match)
    if comment:
        parts.append(f'-m comment --comment "{comment}"')
    parts += ["-j", target]
    return " ".join(parts)


@functools.lru_cache(maxsize=4096)
def _address(cidr: str) -> str:
    """An address match as iptables-save prints it: the network's own address (`10.1.2.3/24` is
    `10.1.2.0/24`), and none at all for `0.0.0.0/0` (a cluster CIDR or a no-NAT entry may be that)."""
    if not cidr:
        return ""
    net = ipaddress.ip_network(cidr, strict=False)
    return "" if net.prefixlen == 0 else str(net)


# The order in which iptables-save prints conntrack states, whatever order they were written in.
CTSTATES = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")


def ctstate(*states: str) -> str:
    """A `-m conntrack --ctstate` match in iptables-save's order (`ESTABLISHED,RELATED` prints back as
    `RELATED,ESTABLISHED`)."""
    unknown = sorted(set(states) - set(CTSTATES))
    if unknown or not states:
        raise ValueError(f"conntrack states {unknown or 'none'}: each must be one of {', '.join(CTSTATES)}")
    return "-m conntrack --ctstate " + ",".join(sorted(set(states), key=CTSTATES.index))


@dataclass
class NetworkRules:
    """What one network wants: its own chains (whole), and the rules reaching them from shared chains."""
    tag: str
    chains: dict[tuple[str, str], list[str]] = field(default_factory=dict)        # (table, chain) -> rules
    links: list[tuple[str, str, str]] = field(default_factory=list)               # (table, chain, rule)

    def owned(self) -> set[tuple[str, str]]:
        return set(self.chains)


@dataclass
class Saved:
    """The kernel's rules as `iptables-save` printed them: per table, chain -> rules (in order)."""
    tables: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def chain(self, table: str, chain: str) -> list[str] | None:
        return self.tables.get(table, {}).get(chain)

    def chains(self, table: str) -> dict[str, list[str]]:
        return self.tables.get(table, {})


def parse_save(text: str) -> Saved:
    saved = Saved()
    table: dict[str, list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = saved.tables.setdefault(line[1:].strip(), {})
        elif table is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, rest = line.split(" ", 2)
            table.setdefault(chain, []).append(rest)
    return saved


Runner = Callable[[list[str], str | None], subprocess.CompletedProcess]


class FirewallTable:
    """The applier: `apply(wanted, unwanted)` makes the kernel hold `wanted` networks' rules and none of
    the `unwanted` tags', and returns what it found wrong (empty when the kernel already matched)."""

    def __init__(self, command_prefix: Sequence[str] = (), iptables: str = "iptables"):
        self.prefix = list(command_prefix)
        self.iptables = iptables
        save, restore = _pair(iptables)
        self.save_cmd, self.restore_cmd = save, restore
        self._lock = threading.Lock()
        self.runs = 0                 # process runs so far (the benchmark's figure)
        self.loops = RepairLoops(iptables)

    def _run(self, cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        self.runs += 1
        full = self.prefix + cmd
        try:
            return subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataplaneError(f"{' '.join(full)}: {exc}") from None

    def _restore(self, script: str) -> subprocess.CompletedProcess:
        """One `iptables-restore --noflush` of `script`, counted by outcome (`vpcnet_iptables_restore_total`):
        the only way this module writes rules."""
        try:
            proc = self._run([self.restore_cmd, "-w", "10", "--noflush"], script)
        except DataplaneError:
            events.iptables_restore(self.loops.family, ok=False)
            raise
        events.iptables_restore(self.loops.family, ok=proc.returncode == 0)
        return proc

    def save(self) -> Saved:
        proc = self._run([self.save_cmd])
        if proc.returncode != 0:
            raise DataplaneError(f"{self.save_cmd} failed: {proc.stderr.strip() or proc.returncode}")
        return parse_save(proc.stdout)

    def apply(self, wanted: Sequence[NetworkRules], unwanted: Sequence[str] = (), host: bool = True,
              saved: Saved | None = None, uplinks: Sequence[str] = ()) -> list[str]:
        """One save (unless `saved` is given), one restore if anything differs. `host`: also the shared
        chains, the builtin chains' jumps to them, the anti-spoofing rule and the isolation chains with
        these `uplinks` (interface names)."""
        found: list[str] | None = None
        error, misplaced = "", False
        with self._lock:
            for attempt in range(ATTEMPTS):   # a concurrent writer (another worker, another tool) may win
                current = saved if saved is not None and attempt == 0 else self.save()
                problems, script = self._diff(current, wanted, unwanted, host, uplinks)
                found = problems if found is None else found
                if not script:
                    self.loops.seen(current, "")
                    return found
                proc = self._restore(script)
                if proc.returncode != 0:
                    error, misplaced = proc.stderr.strip(), False
                    continue
                self.loops.seen(current, script)
                # A moved jump goes in at a number read before the restore: a rule another tool put into
                # FORWARD meanwhile shifts it (and loses no one's rule: the deletes are by text). Check.
                misplaced = FORWARD_MOVE in script and bool(_forward_jump(self.save(), []))
                if not misplaced:
                    return found
            if misplaced:
                log.warning("FORWARD changed during the repair of its jump to %s: the next pass moves it",
                            FORWARD_CHAIN, extra={"event": "firewall_drift", "kind": "firewall", "table": "filter",
                                                  "chain": "FORWARD", "outcome": "retry"})
                return found or []
            raise DataplaneError(f"{self.restore_cmd} failed: {error}")

    def set_policy(self, chain: str, policy: str, table: str = "filter") -> None:
        """A builtin chain's policy (`iptables -P`)."""
        proc = self._run([self.iptables, "-w", "10", "-t", table, "-P", chain, policy])
        if proc.returncode != 0:
            raise DataplaneError(f"{self.iptables} -P {chain} {policy} failed: {proc.stderr.strip()}")

    def differs(self, saved: Saved, net: NetworkRules) -> bool:
        """Whether the kernel's rules (as `saved`) differ from what `net` wants."""
        return bool(self._diff(saved, [net], [], False)[1])

    def drop(self, chains: Sequence[tuple[str, str]]) -> None:
        """Remove these (table, chain) and every jump to them, in one transaction."""
        with self._lock:
            saved = self.save()
            lines = {t: [line for table, chain in chains if table == t and saved.chain(t, chain) is not None
                         for line in _drop(saved, t, chain)] for t in TABLES}
            script = "".join(f"*{t}\n" + "".join(x + "\n" for x in lines[t]) + "COMMIT\n"
                             for t in TABLES if lines[t])
            if script:
                proc = self._restore(script)
                if proc.returncode != 0:
                    raise DataplaneError(f"{self.restore_cmd} failed: {proc.stderr.strip()}")

    @staticmethod
    def _diff(saved: Saved, wanted: Sequence[NetworkRules], unwanted: Sequence[str],
              host: bool, uplinks: Sequence[str] = ()) -> tuple[list[str], str]:
        problems: list[str] = []
        lines: dict[str, list[str]] = {t: [] for t in TABLES}
        if host:
            for table in PARENTS:
                parent, builtin = PARENTS[table], BUILTIN[table]
                if saved.chain(table, parent) is None:
                    problems.append(f"{table} chain {parent} missing")
                    lines[table].append(f":{parent} - [0:0]")
                if table == "filter":
                    problems += _forward_jump(saved, lines[table])
                elif f"-j {parent}" not in (saved.chain(table, builtin) or []):
                    problems.append(f"{table} {builtin} has no jump to {parent}")
                    lines[table].append(f"-I {builtin} 1 -j {parent}")
            for (table, parent), jumps in MORE_PARENTS.items():
                if saved.chain(table, parent) is None:
                    problems.append(f"{table} chain {parent} missing")
                    lines[table].append(f":{parent} - [0:0]")
                for builtin, jump in jumps:
                    if jump not in (saved.chain(table, builtin) or []):
                        problems.append(f"{table} {builtin} has no jump to {parent}")
                        lines[table].append(f"-A {builtin} {jump}")
            # whole chains, computed from the host alone: declared (emptied) and refilled when they differ,
            # before any network's chain that jumps to them
            for (table, chain), rules in isolation_chains(uplinks).items():
                have = saved.chain(table, chain)
                if have != rules:
                    problems.append(f"{table} chain {chain} " + ("missing" if have is None else
                                    f"holds {len(have)} rule(s), {sum(r in rules for r in have)} of "
                                    f"{len(rules)} wanted") + f" (uplinks: {', '.join(sorted(uplinks)) or 'none'})")
                    lines[table].append(f":{chain} - [0:0]")
                    lines[table] += [f"-A {chain} {r}" for r in rules]
            for jump in GUARD_JUMPS:
                if jump not in (saved.chain(GUARD_TABLE, "FORWARD") or []):
                    problems.append(f"{GUARD_TABLE} FORWARD has no rule '{jump}'")
                    lines[GUARD_TABLE].append(f"-I FORWARD 1 {jump}")
            if ANTI_SPOOFING not in (saved.chain("raw", RAW_CHAIN) or []):
                problems.append("raw anti-spoofing rule missing")
                lines["raw"].append(f"-A {RAW_CHAIN} {ANTI_SPOOFING}")
        for net in wanted:
            for (table, chain), rules in net.chains.items():
                have = saved.chain(table, chain)
                if have != rules:
                    problems.append(f"{table} chain {chain} " + ("missing" if have is None else
                                    f"holds {len(have)} rule(s), {sum(r in rules for r in have)} of "
                                    f"{len(rules)} wanted"))
                    lines[table].append(f":{chain} - [0:0]")
                    lines[table] += [f"-A {chain} {r}" for r in rules]
            for table, chain, r in net.links:
                if r not in (saved.chain(table, chain) or []):
                    problems.append(f"{table} {chain} has no rule '{r}'")
                    lines[table].append(f"-A {chain} {r}")
            # chains of this network it no longer wants (a network changed to --internal loses its NAT)
            for table, prefix in PREFIXES:
                chain = prefix + net.tag
                if (table, chain) not in net.chains and saved.chain(table, chain) is not None:
                    lines[table] += _drop(saved, table, chain)
            # stale jumps of this network's chains (a host CIDR that changed)
            for table, chain, r in _jumps_to(saved, net.owned()):
                if (table, chain, r) not in net.links:
                    lines[table].append(f"-D {chain} {r}")
        for tag in unwanted:
            for table, prefix in PREFIXES:
                if saved.chain(table, prefix + tag) is not None:
                    lines[table] += _drop(saved, table, prefix + tag)
        script = "".join(f"*{t}\n" + "".join(line + "\n" for line in lines[t]) + "COMMIT\n"
                         for t in TABLES if lines[t])
        return problems, script


# Rules that may sit between DOCKER-USER and vpcnet's jump: Docker's own (jumps to its chains, rules for
# docker0 and its br- bridges). Those never drop vpcnet's packets; the one that could accept some, a
# bridge's `-i br-x ! -o br-x -j ACCEPT` (a bridge container's connection to a vpcnet container), meets the
# mangle table's ingress guard first (GUARD_TABLE). Anything else there (a DROP, say) would decide vpcnet's
# traffic first, so the jump moves back.
_DOCKERS_OWN = re.compile(r"-j DOCKER\S*$|-[io] (docker0|br-[0-9a-f]+)\b")


def _forward_jump(saved: Saved, lines: list[str]) -> list[str]:
    """FORWARD -> VPCNET-FORWARD right after FORWARD -> DOCKER-USER (when Docker made it; the user's own
    rules come first), else first; only Docker's own rules may come between. A misplaced jump (ahead of
    DOCKER-USER, or behind another rule, as after a Docker restart or a firewall tool's reload) is moved
    in the same transaction: every copy deleted by its text (never by number: another tool, Docker or
    firewalld, may change FORWARD between the save and the restore, and a number would then name its
    rule), then one inserted where it belongs; `FirewallTable.apply` reads FORWARD back to check that."""
    forward = saved.chain("filter", "FORWARD") or []
    jump, user = f"-j {FORWARD_CHAIN}", f"-j {USER_CHAIN}"
    ours = [i for i, r in enumerate(forward) if r == jump]
    theirs = [i for i, r in enumerate(forward) if r == user]
    start = theirs[0] + 1 if theirs else 0
    if len(ours) == 1 and ours[0] >= start and all(_DOCKERS_OWN.search(r) for r in forward[start:ours[0]]):
        return []
    lines += [f"-D FORWARD {jump}"] * len(ours)
    lines.append(f"-I FORWARD {start - sum(1 for i in ours if i < start) + 1} {jump}")
    if not ours:
        return [f"filter FORWARD's jump to {FORWARD_CHAIN} missing"]
    where = "ahead of DOCKER-USER" if theirs and ours[0] < start else \
        f"behind {forward[ours[0] - 1]!r}" if len(ours) == 1 else f"there {len(ours)} times"
    return [f"filter FORWARD's jump to {FORWARD_CHAIN} is {where}"]


def _jumps_to(saved: Saved, chains: set[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(table, chain, rule) of the rules in shared chains that jump to one of `chains`."""
    out = []
    for table, chain_name in chains:
        parents = [PARENTS[table], BUILTIN[table]] + [p for t, p in MORE_PARENTS if t == table]
        for parent in parents:
            for r in saved.chain(table, parent) or []:
                if r.endswith(f"-j {chain_name}"):
                    out.append((table, parent, r))
    return out


def _drop(saved: Saved, table: str, chain: str) -> list[str]:
    """Lines removing `chain`: every jump to it as listed, then the chain (declared first: empties it)."""
    return [f"-D {parent} {r}" for _t, parent, r in _jumps_to(saved, {(table, chain)})] + \
        [f":{chain} - [0:0]", f"-X {chain}"]


# -- the canary -----------------------------------------------------------------------------------------
LOOP_PASSES = 3               # the same repair this many times in a row, read back the same way: a loop


@dataclass
class _Write:
    """What one restore wrote into one chain, and what the kernel printed there afterwards."""
    declared: bool            # the chain was emptied and `rules` are all of it; else `rules` were added
    rules: list[str]
    before: list[str]         # the chain as read before the write, less what the write deleted
    printed: list[str] | None = None    # what the write became, as read by the next apply that needed it again
    passes: int = 1
    told: bool = False

    def done(self, now: list[str] | None) -> bool:
        if self.declared:
            return now == self.rules
        return not Counter(self.rules) - Counter(now or [])


class RepairLoops:
    """The canary for the bet that text equality is rule equality. A rule the kernel prints differently
    from how vpcnet writes it is never found in place, so it would be written on every pass, for ever.
    After each write this keeps, per chain, what was written; when the next apply needs the very same
    write again, it reads what the last one became (the chain, or the rules added to it since). The same
    write needed LOOP_PASSES times in a row, coming back each time as the same other text with no rule
    lost (a rule deleted by hand comes back short, a flush comes back empty: ordinary repairs), is
    logged once as an ERROR naming the chain and both texts, and counted
    (`vpcnet_datapath_repair_loops_total`)."""

    def __init__(self, iptables: str):
        self.iptables = iptables
        self.family = "ipv6" if os.path.basename(iptables).startswith("ip6") else "ipv4"
        self.writes: dict[tuple[str, str], _Write] = {}
        self.loops = 0                # loops found by this process

    def seen(self, saved: Saved, script: str) -> None:
        """`script` was just written over `saved` (the kernel as read before it). Cheap when nothing was
        written and nothing is pending: most passes."""
        if not script and not self.writes:
            return
        wrote = _writes(script)
        for key in [k for k, w in self.writes.items()
                    if k not in wrote and (saved.chain(*k) is None or w.done(saved.chain(*k)))]:
            del self.writes[key]      # put right (or gone) since: whatever comes next is a new repair
        for key, (declared, rules, deleted) in wrote.items():
            if not rules and not declared:
                continue              # only deletions
            now = saved.chain(*key) or []
            last = self.writes.get(key)
            if last is None or (last.declared, last.rules) != (declared, rules):
                self.writes[key] = _Write(declared, rules, _added(deleted, now))
                continue
            printed = now if declared else _added(last.before, now)
            whole = len(printed) >= len(rules) and printed != rules
            last.passes = last.passes + 1 if whole and last.printed in (None, printed) else 1 + whole
            last.printed, last.before = printed, _added(deleted, now)
            if last.passes >= LOOP_PASSES and not last.told:
                last.told = True
                self._tell(key, last)

    def _tell(self, key: tuple[str, str], w: _Write) -> None:
        table, chain = key
        ours = [r for r in w.rules if r not in (w.printed or [])] or w.rules
        theirs = [r for r in (w.printed or []) if r not in w.rules]
        self.loops += 1
        events.repair_loop(self.family, table)
        log.error("%s %s chain %s was written %d passes in a row and each time read back differently, so it "
                  "is rewritten on every pass: vpcnet wrote %s; %s-save prints %s. A rule's text differs from how "
                  "this iptables prints it (or another tool rewrites it after each pass); see docs/datapath.md",
                  self.iptables, table, chain, w.passes, " | ".join(ours), self.iptables,
                  " | ".join(theirs) or "(the same rules, in another order)",
                  extra={"event": "datapath_repair_loop", "kind": "firewall", "family": self.family, "table": table,
                         "chain": chain, "outcome": "loop"})


def _writes(script: str) -> dict[tuple[str, str], tuple[bool, list[str], list[str]]]:
    """Per (table, chain) a restore script writes into: (declared, rules, deleted). A chain declared (and
    so emptied) and not deleted holds exactly `rules`; otherwise `rules` were added (-A, -I) to it after
    `deleted` (-D) were taken out."""
    out: dict[tuple[str, str], tuple[bool, list[str], list[str]]] = {}
    table = ""
    for line in script.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            out[(table, line[1:].split()[0])] = (True, [], [])
        elif line.startswith("-X "):
            out.pop((table, line.split()[1]), None)
        elif line.startswith(("-A ", "-I ", "-D ")):
            op, chain, rest = line.split(" ", 2)
            if op == "-I" and rest.split(" ", 1)[0].isdigit():
                rest = rest.split(" ", 1)[1]
            _declared, added, deleted = out.setdefault((table, chain), (False, [], []))
            (deleted if op == "-D" else added).append(rest)
    return out


def _added(before: list[str], now: list[str]) -> list[str]:
    """The rules of `now` beyond those of `before` (counting copies), in `now`'s order."""
    spare = Counter(before)
    out = []
    for r in now:
        if spare[r]:
            spare[r] -= 1
        else:
            out.append(r)
    return out


class Ipv6Guard:
    """The IPv6 drop of vpcnet's host-side links (IPV6_RULES) in ip6tables, put right by `apply` like the
    IPv4 chains: one ip6tables-save, and one ip6tables-restore --noflush only when something differs.
    Host-wide. Without ip6tables or IPv6 in the kernel it does nothing, said once.

    Endpoints with IPv6 (vpcnet.datapath.ipv6): `allow` rules go before the drops in the same raw chain (each
    endpoint's own source address, and neighbour discovery; in bridge mode one rule per endpoint, its address
    from its bridge port, after drops of router advertisements from any port), and `forward` rules fill the
    filter chain `VPCNET-FORWARD6`, jumped to from filter FORWARD while it has any (right after DOCKER-USER
    where Docker made one, else first; a jump found in place is left where it is); both in the same restore, the
    desired state of every IPv6 endpoint of the host at once."""

    def __init__(self, command_prefix: Sequence[str] = (), iptables: str = "iptables"):
        self.table = FirewallTable(command_prefix, ip6tables_of(iptables))
        self.in_place = False         # applied at least once by this process
        self._said = ""               # the kind of failure last logged: each said once, until it changes

    def apply(self, saved: Saved | None = None, allow: Sequence[str] = (), forward: Sequence[str] = ()) -> list[str]:
        """Returns what was wrong (empty when the kernel already held the guard, or cannot)."""
        if not os.path.exists("/proc/net/if_inet6"):
            self._say("no-ipv6", "this kernel has no IPv6: vpcnet's ip6tables guard is not needed")
            return []
        try:
            with self.table._lock:
                current = saved if saved is not None else self.table.save()
                problems, script = self.diff(current, allow, forward)
                if script:
                    proc = self.table._restore(script)
                    if proc.returncode != 0:
                        raise DataplaneError(f"{self.table.restore_cmd} failed: {proc.stderr.strip()}")
                self.table.loops.seen(current, script)
        except DataplaneError as exc:
            self._say("failed", f"cannot drop IPv6 from vpcnet's links with {self.table.iptables} ({exc}): where their "
                      "IPv6 sysctls cannot be set either, a container's IPv6 reaches this host; see "
                      "docs/datapath.md", logging.WARNING)
            return []
        if self._said == "failed":
            log.info("%s drops IPv6 from vpcnet's links now", self.table.iptables)
        self.in_place, self._said = True, ""
        return problems

    def _say(self, kind: str, message: str, level: int = logging.INFO) -> None:
        if kind != self._said:
            log.log(level, "%s", message)
        self._said = kind

    @staticmethod
    def diff(saved: Saved, allow: Sequence[str] = (), forward: Sequence[str] = ()) -> tuple[list[str], str]:
        problems, lines = [], []
        wanted = [*allow, *IPV6_RULES]
        have = saved.chain("raw", IPV6_CHAIN)
        if have != wanted:
            problems.append(f"ip6tables raw chain {IPV6_CHAIN} " + ("missing" if have is None else
                            f"holds {len(have)} rule(s), {sum(r in wanted for r in have)} of "
                            f"{len(wanted)} wanted"))
            lines += [f":{IPV6_CHAIN} - [0:0]"] + [f"-A {IPV6_CHAIN} {r}" for r in wanted]
        if f"-j {IPV6_CHAIN}" not in (saved.chain("raw", "PREROUTING") or []):
            problems.append(f"ip6tables raw PREROUTING has no jump to {IPV6_CHAIN}")
            lines.append(f"-I PREROUTING 1 -j {IPV6_CHAIN}")
        script = "*raw\n" + "".join(line + "\n" for line in lines) + "COMMIT\n" if lines else ""
        filter_lines = []
        have_forward = saved.chain("filter", IPV6_FORWARD_CHAIN)
        if (forward or have_forward) and have_forward != list(forward):
            problems.append(f"ip6tables filter chain {IPV6_FORWARD_CHAIN} holds {len(have_forward or [])} "
                            f"rule(s), {len(forward)} wanted")
            filter_lines += [f":{IPV6_FORWARD_CHAIN} - [0:0]"] + [f"-A {IPV6_FORWARD_CHAIN} {r}" for r in forward]
        builtin = saved.chain("filter", "FORWARD") or []
        if forward and f"-j {IPV6_FORWARD_CHAIN}" not in builtin:
            problems.append(f"ip6tables filter FORWARD has no jump to {IPV6_FORWARD_CHAIN}")
            # right after Docker's DOCKER-USER (Docker 27+ makes it in ip6tables too), so the user's rules
            # there filter vpcnet's IPv6, its published ports included, as IPv4's; first without it
            at = builtin.index(f"-j {USER_CHAIN}") + 2 if f"-j {USER_CHAIN}" in builtin else 1
            filter_lines.append(f"-I FORWARD {at} -j {IPV6_FORWARD_CHAIN}")
        if filter_lines:
            script += "*filter\n" + "".join(line + "\n" for line in filter_lines) + "COMMIT\n"
        return problems, script


def ip6tables_of(iptables: str) -> str:
    """The ip6tables binary of the same family (iptables-legacy -> ip6tables-legacy)."""
    head, base = os.path.split(iptables)
    return os.path.join(head, "ip6" + base[2:] if base.startswith("iptables") else base)


def _pair(iptables: str) -> tuple[str, str]:
    """The save/restore binaries of an iptables binary name (iptables-legacy -> iptables-legacy-save)."""
    if iptables.endswith("-legacy") or iptables.endswith("-nft"):
        base, _, variant = iptables.rpartition("-")
        return f"{base}-{variant}-save", f"{base}-{variant}-restore"
    return f"{iptables}-save", f"{iptables}-restore"
