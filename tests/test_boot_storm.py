"""50 hosts boot at once: 50 real `vpcnet routes sync` processes against the emulator, which takes one
route-table write per 0.3 s for the whole VPC and answers TaskConflict in between (as the real VPC does).

The bar: every host exits 0 within 60 s, 50 distinct blocks, one route per host, nothing
foreign touched, at most 10 API calls per host on average. bench/cloud_calls.py measures the same storm
(and 200 hosts, and a 201st host on a full table) and reports the figures.
"""
from __future__ import annotations

import pytest
from aliyun_fakes import serving_emulator

from vpcnet_lab.emulator.storm import boot_storm

HOSTS = 50
CLUSTER = "10.230.0.0/16"
FOREIGN_HOP = "i-storm-foreign"


@pytest.fixture
def emu():
    with serving_emulator({FOREIGN_HOP: "172.17.0.2"}, write_interval=0.3, pending_delay=0.0, seed=7) as e:
        yield e


def test_fifty_hosts_booting_at_once_all_converge(emu, tmp_path):
    hand = emu.add_custom_entry("10.230.7.0/24", FOREIGN_HOP, name="by-hand", description="ops")
    other = emu.add_custom_entry("10.230.9.0/24", FOREIGN_HOP, name="vpcnet-10-230-9-0-24",
                                 description=f"vpcnet: host CIDR 10.230.9.0/24 of {FOREIGN_HOP} cluster=10.230.0.0-16")
    before = {e["RouteEntryId"]: e for e in emu.entries()
              if e["Type"] == "System" or e["RouteEntryId"] in (hand, other)}

    result = boot_storm(emu, emu.test_url, str(tmp_path), HOSTS, cluster=CLUSTER, wait=60, timeout=90)
    print("boot storm:", result.summary())

    failed = {i: result.stderr.get(i, "")[-300:] for i, code in result.exits.items() if code != 0}
    assert not failed, failed
    assert result.slowest < 60, result.summary()
    assert sorted(result.blocks) == sorted(result.exits)                   # every host has a route ...
    assert all(len(b) == 1 for b in result.blocks.values()), result.blocks  # ... exactly one
    blocks = [b[0] for b in result.blocks.values()]
    assert len(set(blocks)) == HOSTS and not set(blocks) & {"10.230.7.0/24", "10.230.9.0/24"}
    after = {e["RouteEntryId"]: e for e in emu.entries()}
    assert all(after.get(i) == e for i, e in before.items())              # nothing foreign touched
    assert result.calls_per_host <= 10, result.summary()
    assert result.conflicts > 0                                             # the write lock was really hit
