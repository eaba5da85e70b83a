"""A boot storm against the emulator: N hosts run `vpcnet routes sync` at the same moment.

    emu = Emulator(write_interval=0.3, ...); url, stop = serve_in_thread(emu)
    result = boot_storm(emu, url, workdir, hosts=50)

Each host is a real `python -m vpcnet.cli routes sync` process with its own instance id and state dir,
configured through the environment (aliyun provider, the emulator's URL, a closed local port as the
metadata URL: nothing leaves 127.0.0.1). All are started together; the result says how each ended and
what the route table looks like afterwards. Used by bench/cloud_calls.py (the figures) and
tests/test_boot_storm.py (the bar a CI run must clear).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import vpcnet
from vpcnet_lab.emulator.state import Emulator

#: The folder holding the vpcnet this process imports (a checkout's root, or site-packages): each host runs it.
CODE = os.path.dirname(os.path.dirname(os.path.abspath(vpcnet.__file__)))


@dataclass
class StormResult:
    hosts: int
    seconds: float                               # from the first start to the last exit
    exits: dict[str, int] = field(default_factory=dict)        # instance -> exit code (None: killed)
    elapsed: dict[str, float] = field(default_factory=dict)    # instance -> seconds until it exited
    blocks: dict[str, list[str]] = field(default_factory=dict)  # instance -> its custom destinations
    requests: dict[str, int] = field(default_factory=dict)     # emulator requests per action
    conflicts: int = 0                           # TaskConflicts answered for the VPC write lock
    stderr: dict[str, str] = field(default_factory=dict)
    others: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # further table -> like `blocks`

    @property
    def same_everywhere(self) -> bool:
        """Every further table holds exactly each host's block of the claiming table."""
        return all(o == self.blocks for o in self.others.values())

    @property
    def calls_per_host(self) -> float:
        return sum(self.requests.values()) / max(1, self.hosts)

    @property
    def converged(self) -> list[str]:
        return [i for i, code in self.exits.items() if code == 0]

    @property
    def slowest(self) -> float:
        return max(self.elapsed.values(), default=0.0)

    def summary(self) -> dict:
        return {"hosts": self.hosts, "converged": len(self.converged), "seconds": round(self.seconds, 2),
                "slowest_host_s": round(self.slowest, 2), "calls_per_host": round(self.calls_per_host, 2),
                "creates": self.requests.get("CreateRouteEntry", 0),
                "batch_creates": self.requests.get("CreateRouteEntries", 0),
                "listings": self.requests.get("DescribeRouteEntryList", 0),
                "conflicts": self.conflicts, "requests": dict(sorted(self.requests.items()))}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_env(url: str, state_dir: str, instance: str, *, cluster: str, table: str, region: str, vpc: str,
             key_id: str, secret: str, prefix: int = 24) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPCNET_")}
    env["PYTHONPATH"] = CODE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({
        "VPCNET_CONFIG": os.devnull, "VPCNET_STATE_DIR": state_dir,
        "VPCNET_SOCKET": os.path.join(state_dir, "vpcnet.sock"), "VPCNET_LOG_LEVEL": "WARNING",
        "VPCNET_PROVIDER": "aliyun", "VPCNET_CLUSTER_CIDR": cluster, "VPCNET_HOST_PREFIX": str(prefix),
        "VPCNET_ALIYUN_ENDPOINT": url, "VPCNET_ALIYUN_REGION_ID": region, "VPCNET_ALIYUN_VPC_ID": vpc,
        "VPCNET_ALIYUN_ROUTE_TABLE_ID": table, "VPCNET_ALIYUN_INSTANCE_ID": instance,
        "VPCNET_ALIYUN_ACCESS_KEY_ID": key_id, "VPCNET_ALIYUN_ACCESS_KEY_SECRET": secret,
        "VPCNET_ALIYUN_METADATA_URL": f"http://127.0.0.1:{closed_port()}/",
    })
    return env


def boot_storm(emu: Emulator, url: str, workdir: str, hosts: int, *, cluster: str = "10.230.0.0/16",
               table: str = "", region: str = "", vpc: str = "", key_id: str = "emu-key-id",
               secret: str = "emu-key-secret", wait: float = 60.0, timeout: float = 240.0,
               first: int = 1, prefix: int = 24) -> StormResult:
    """Start `hosts` `vpcnet routes sync --wait <wait>` processes at once (instances i-storm-<first>...),
    wait for all of them (killing any still running after `timeout` s) and report. `table` may be a
    comma-separated list (the first is the claiming table)."""
    table, region, vpc = table or emu.route_table_id, region or emu.region, vpc or emu.vpc_id
    instances = [f"i-storm-{k:04d}" for k in range(first, first + hosts)]
    for k, instance in enumerate(instances, start=first):
        emu.register_instance(instance, str(ipaddress.IPv4Address("172.16.0.0") + k))
    envs = {}
    for instance in instances:
        state = os.path.join(workdir, instance)
        os.makedirs(state, exist_ok=True)
        envs[instance] = host_env(url, state, instance, cluster=cluster, table=table, region=region, vpc=vpc,
                                  key_id=key_id, secret=secret, prefix=prefix)
    emu.reset_request_counts()
    conflicts_before = emu.conflicts
    procs: dict[str, tuple[subprocess.Popen, float]] = {}
    errs: dict[str, Any] = {}     # instance -> its stderr file, then the text it held
    started = time.monotonic()
    try:
        for instance in instances:
            errs[instance] = open(os.path.join(workdir, f"{instance}.err"), "w+")
            proc = subprocess.Popen([sys.executable, "-m", "vpcnet.cli", "routes", "sync", "--wait", str(wait)],
                                    env=envs[instance], cwd=CODE, stdout=subprocess.DEVNULL,
                                    stderr=errs[instance], stdin=subprocess.DEVNULL)
            procs[instance] = (proc, time.monotonic())
        result = StormResult(hosts=hosts, seconds=0.0)
        deadline = started + timeout
        while len(result.exits) < len(procs):
            for instance, (proc, t0) in procs.items():
                if instance not in result.exits and proc.poll() is not None:
                    result.exits[instance] = proc.returncode
                    result.elapsed[instance] = time.monotonic() - t0
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        result.seconds = time.monotonic() - started
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for instance, fh in errs.items():
            fh.seek(0)
            text = fh.read()
            fh.close()
            if text.strip():
                errs[instance] = text
    for instance in instances:
        result.exits.setdefault(instance, None)   # type: ignore[arg-type]
    result.stderr = {i: t for i, t in errs.items() if isinstance(t, str)}
    result.requests = emu.request_counts
    result.conflicts = emu.conflicts - conflicts_before
    tables = [t.strip() for t in table.split(",") if t.strip()]
    for entry in emu.entries(tables[0]):          # the claiming table
        hop = entry["NextHops"]["NextHop"][0]["NextHopId"]
        if entry["Type"] == "Custom" and hop in envs:
            result.blocks.setdefault(hop, []).append(entry["DestinationCidrBlock"])
    for other in tables[1:]:
        result.others[other] = {}
        for entry in emu.entries(other):
            hop = entry["NextHops"]["NextHop"][0]["NextHopId"]
            if entry["Type"] == "Custom" and hop in envs:
                result.others[other].setdefault(hop, []).append(entry["DestinationCidrBlock"])
    return result
