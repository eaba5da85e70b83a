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


@pytest.mark.parametrize("tables, cluster_v6", [(1, ""), (3, ""), (1, "fd00:232::/48")],
                         ids=["1-table", "3-tables", "1-table-dual-stack"])
def test_thirty_hosts_with_pending_routes_all_converge(tables, cluster_v6):
    """Dual-stack: each host also claims its IPv6 block (a dual-stack network asked for one), two route
    writes per host in the same VPC: one block of each family per host, no block twice."""
    families = 2 if cluster_v6 else 1
    result = virtual_storm(HOSTS, tables=tables, pending=(2.0, 5.0), seed=11, wait=60.0, cluster_v6=cluster_v6)
    summary = result.summary()
    print("storm with Pending 2-5 s:", summary)
    failed = {i: p for i, p in result.problems.items() if not result.ok[i]}
    assert not failed, (summary, dict(list(failed.items())[:3]))
    assert result.complete, summary                   # one block per host and family, the same in every table
    assert result.duplicates == 0 and not result.unclaimed, (summary, result.unclaimed)
    assert sum(len(b) for b in result.blocks[next(iter(result.blocks))].values()) == HOSTS * families, summary
    assert result.conflicts > 0                        # the write lock was really hit
    # not slower than twice the serial bound of the claims (one write per host and family)
    assert max(result.elapsed.values()) < 2 * serial_bound(HOSTS * families, (2.0, 5.0)) + 30, summary
    assert result.wall_s < 30 * families, summary
