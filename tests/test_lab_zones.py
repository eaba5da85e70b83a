"""The lab with two zones: `vpcnet lab up --hosts 4 --zones 2`. Hosts 1 and 3 sit in zone 1 (vSwitch
bound to the system table), hosts 2 and 4 in zone 2 (vSwitch bound to a custom table). The router
forwards a packet only by the table of the zone it came from, so cross-zone traffic works only while both
tables hold both hosts' routes, and each plugin must find both tables (from their vSwitches) and keep its
route in each.

One test (a lab of four engines takes a while). Needs what tests/test_lab.py needs; refuses to run next to
a lab that is already up; the lab is always taken down.
"""
from __future__ import annotations

import os
import signal

import pytest
from conftest import wait_for
from test_lab import Box, _require_lab_prerequisites

pytestmark = pytest.mark.docker

CLUSTER = "10.242.0.0/16"


def test_two_zones_need_every_route_in_both_tables(request):
    _require_lab_prerequisites()
    from vpcnet_lab import Lab
    from vpcnet_lab.lab import zone_table

    lab = Lab(hosts=4, zones=2, cluster_cidr=CLUSTER, reconcile_interval=2.0)
    request.addfinalizer(lambda: lab.down())
    lab.up()
    boxes = []
    request.addfinalizer(lambda: [b.remove() for b in boxes])
    one, two = zone_table(1), zone_table(2)

    # every host's route is in both tables, with the same block, found by discovery (no table configured)
    def both_tables_complete():
        blocks = {t: {e["NextHops"]["NextHop"][0]["NextHopId"]: e["DestinationCidrBlock"]
                      for e in lab.routes(t) if e["Type"] == "Custom" and e["Status"] == "Available"}
                  for t in (one, two)}
        return blocks if len(blocks[one]) == 4 and blocks[one] == blocks[two] else None

    blocks = wait_for(both_tables_complete, 60, 0.5)
    assert blocks, {t: lab.routes(t) for t in (one, two)}
    assert len(set(blocks[one].values())) == 4
    # the router: one kernel table per zone, one rule per host, nothing in main
    for zone in (1, 2):
        routes = lab.kernel_routes(zone)
        assert all(any(line.startswith(block + " ") for line in routes) for block in blocks[one].values()), routes
        assert any(line.startswith(f"unreachable {CLUSTER}") for line in routes), routes
    assert not any(line.startswith("10.242.") for line in lab.kernel_routes())

    a, b, c = Box(lab, 1), Box(lab, 2), Box(lab, 3)            # zone 1, zone 2, zone 1
    boxes += [a, b, c]
    assert a.pings(b.ip) and b.pings(a.ip), "cross-zone"
    assert a.pings(c.ip) and c.pings(a.ip), "same zone"

    # zone 2's table loses h1's route (h1's reconciler held): zone 2 -> h1 breaks, zone 1 -> h1 does not
    [entry] = [e for e in lab.routes(two) if e["DestinationCidrBlock"] == lab.route_of(1, one)["DestinationCidrBlock"]]
    plugin = lab.host(1).plugin_pid()
    os.killpg(plugin, signal.SIGSTOP)
    try:
        lab.emulator("DELETE", f"/_emulator/entries/{entry['RouteEntryId']}")
        assert wait_for(lambda: not any(line.startswith(entry["DestinationCidrBlock"] + " ")
                                        for line in lab.kernel_routes(2)), 10)
        assert not b.pings(a.ip, wait=1), "zone 2 reached h1 without h1's route in zone 2's table"
        assert not a.pings(b.ip, wait=1), "h1 -> zone 2 answered although the reply path has no route"
        assert c.pings(a.ip) and a.pings(c.ip), "zone 1 must be unaffected"
    finally:
        os.killpg(plugin, signal.SIGCONT)
    # h1's reconciler puts the same block back into zone 2's table, and cross-zone traffic resumes
    assert wait_for(lambda: any(e["DestinationCidrBlock"] == entry["DestinationCidrBlock"]
                                and e["Status"] == "Available" for e in lab.routes(two)), 30, 0.5)
    assert wait_for(lambda: b.pings(a.ip, wait=1), 15) and a.pings(b.ip)
