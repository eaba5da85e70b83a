"""30 hosts boot at once into a VPC whose new routes stay Pending 2-5 s, with no other route write
accepted meanwhile (TaskConflict), as on Alibaba: every host's `routes sync` must succeed.

Runs what `routes sync --wait 60` runs, against the real emulator, on a fake clock
(vpcnet_lab.emulator.vstorm): the storm takes minutes of emulated time and seconds of wall time. One
table can take the 30 writes no faster than one after the other, 30 x 3.5 s = 105 s on average, past
the 60 s of --wait: a host must keep waiting while the VPC is making progress.
"""
from __future__ import annotations

import pytest

from vpcnet_lab.emulator.vstorm import serial_bound, virtual_storm

HOSTS = 30


@pytest.mark.parametrize("tables", [1, 3])
def test_thirty_hosts_with_pending_routes_all_converge(tables):
    result = virtual_storm(HOSTS, tables=tables, pending=(2.0, 5.0), seed=11, wait=60.0)
    summary = result.summary()
    print("storm with Pending 2-5 s:", summary)
    failed = {i: p for i, p in result.problems.items() if not result.ok[i]}
    assert not failed, (summary, dict(list(failed.items())[:3]))
    assert result.complete, summary                   # one block per host, the same in every table
    assert result.duplicates == 0 and not result.unclaimed, (summary, result.unclaimed)
    assert result.conflicts > 0                        # the write lock was really hit
    # not slower than twice the serial bound of the claims
    assert max(result.elapsed.values()) < 2 * serial_bound(HOSTS, (2.0, 5.0)) + 30, summary
    assert result.wall_s < 30, summary
