"""Where the CPU goes on each contender's path: `perf record` (cpu-clock sampling, every CPU) during one
TCP stream, kernel symbols grouped by the piece of the datapath they belong to, as CPU milliseconds per
gigabyte delivered. Used by `bench/run.py --profile` (`--profile-runs N`: N such streams per contender,
combined by `median_of`); needs perf (Debian: linux-perf). IPv4's and IPv6's symbols fall in the same groups.

Per gigabyte, so a slower path is not made to look cheaper by moving fewer bytes. The groups are the
datapath's pieces: copying to and from user space (the useful work, the same on every path), the TCP
stack, routing and IP forwarding, netfilter rule walks, conntrack and NAT, the bridge (with
br_netfilter), veth and the device queues, eBPF, VXLAN encapsulation.
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile

FREQUENCY = 999                   # samples per second per CPU
GROUPS = [  # (group, symbol pattern); first match wins
    ("idle", r"(halt|idle|mwait|poll_idle|cpuidle)"),
    ("copy", r"(copy_(to|from)_iter|copy_user|memcpy|csum_partial_copy|__pi_memcpy|rep_movs)"),
    ("vxlan", r"^(vxlan|udp_tunnel|iptunnel|__iptunnel|udp4_lib_rcv|__udp4_lib_rcv|udp_queue_rcv|skb_udp_tunnel)"),
    ("conntrack+nat", r"^(__)?(nf_conntrack|nf_ct_|nf_nat|nf_confirm|hash_conntrack|tcp_in_window|"
                      r"nf_nat_ipv4|__nf_ct|nf_ct_seq)"),
    ("netfilter rules", r"^(__)?(nft_|nf_hook|nf_tables|ipt_|ip6t_|ip6table_|iptable_|xt_|nft_do_chain|nf_reinject|"
                        r"nf_iterate)"),
    ("bridge", r"^(__)?(br_|nf_bridge|brnf_|br_nf)"),
    ("ebpf", r"^(bpf_|__bpf|cls_bpf|sch_handle_ingress|tcf_classify|skb_do_redirect|bpf_prog_)"),
    ("routing+ip", r"^(__)?(ip_|ip4_|fib|rt_|dst_|inet_|ipv4_|ip_forward|icmp_|neigh_|__neigh|arp_|"
                   r"ip6_|ip6mr|ipv6_|rt6_|inet6_|icmpv6_|icmp6_|ndisc_|nd_tbl)"),        # IPv6's too
    ("veth+queues", r"^(__)?(veth_|netif_|napi_|process_backlog|net_rx_action|dev_|__dev_|enqueue_to_backlog|"
                    r"handle_softirqs|do_softirq|__local_bh_enable_ip|"
                    r"eth_type_trans|skb_|__skb_|validate_xmit|sch_direct|qdisc|kfree_skb|consume_skb|"
                    r"__alloc_skb|gro_|dev_gro|inet_gro|tcp4_gro|tcp_gro)"),
    ("tcp", r"^(__)?(tcp|sock_|sk_|release_sock|lock_sock|security_sock|__release_sock|udp)"),
]
_COMPILED = [(name, re.compile(pattern)) for name, pattern in GROUPS]
ORDER = [name for name, _ in GROUPS if name != "idle"] + ["other"]


def available() -> bool:
    if not shutil.which("perf"):
        return False
    probe = subprocess.run(["perf", "record", "-a", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"],
                           capture_output=True, text=True, timeout=30)
    return probe.returncode == 0


def group_of(symbol: str) -> str:
    for name, pattern in _COMPILED:
        if pattern.search(symbol):
            return name
    return "other"


def record(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """Run `cmd` under system-wide sampling; returns its result and CPU seconds per group (idle left out)."""
    with tempfile.TemporaryDirectory(prefix="vpcnet-perf-") as tmp:
        data = os.path.join(tmp, "perf.data")
        proc = subprocess.run(["perf", "record", "-a", "-e", "cpu-clock", "-F", str(FREQUENCY), "-o", data,
                               "--", *cmd], capture_output=True, text=True, timeout=timeout)
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "sym",
                                 "-F", "sample,sym", "--percent-limit", "0"], capture_output=True, text=True,
                                timeout=120)
    seconds: dict[str, float] = {}
    for line in report.stdout.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].isdigit() or parts[1] not in ("[k]", "[.]"):
            continue
        group = group_of(parts[2]) if parts[1] == "[k]" else "user"
        if group != "idle":
            seconds[group] = seconds.get(group, 0.0) + int(parts[0]) / FREQUENCY
    return proc, seconds


def per_gigabyte(seconds: dict[str, float], delivered_bytes: float) -> dict[str, float]:
    """CPU milliseconds per GB delivered, per group (user space folded into other)."""
    gb = delivered_bytes / 1e9
    out = {name: 0.0 for name in ORDER}
    for group, value in seconds.items():
        out[group if group in out else "other"] += value * 1000 / gb
    out["total"] = sum(out[name] for name in ORDER)
    return out


def median_of(runs: list[dict[str, float]]) -> dict:
    """Several `per_gigabyte` results of one contender as one: each piece's median, `total` the median of
    the runs' totals (so not always the sum of the pieces' medians), and `samples` the runs' totals in run
    order, which bench/goals.py pairs run by run with the baseline's like rounds."""
    if not runs:
        raise ValueError("no profile runs")
    out: dict = {name: statistics.median(r.get(name, 0.0) for r in runs) for name in ORDER}
    out["total"] = statistics.median(r["total"] for r in runs)
    out["samples"] = [r["total"] for r in runs]
    return out
