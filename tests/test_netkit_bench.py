"""bench/netkit_vs_veth.py: its ratios, and its netkit request against the real kernel (root)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import netkit_vs_veth as nk  # noqa: E402

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def test_ratios_are_to_the_underlay_and_rr_is_inverted():
    samples = {"underlay": {"tcp1_bps": [10.0, 10.0, 8.0], "rr_p50_us": [20.0, 20.0, 40.0]},
               "veth+tc": {"tcp1_bps": [9.0, 5.0, 8.0], "rr_p50_us": [40.0, 20.0, 20.0]}}
    ratios = nk.summarise(samples)["veth+tc"]
    assert ratios["tcp1_bps"] == {"median": 0.8, "min": 0.5, "max": 1.0}
    # lower latency is better: underlay / contender, so a contender twice as slow is 0.5
    assert ratios["rr_p50_us"] == {"median": 1.0, "min": 0.5, "max": 2.0}


@pytest.fixture
def netns():
    name = f"nkt-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@root
def test_the_request_framing_makes_a_pair_with_the_names_asked(netns, monkeypatch):
    # netkit's peer info is attribute 1 as veth's is (VETH_INFO_PEER), and veth ignores netkit's other
    # attributes: the same request with only the kind changed checks the framing on any kernel
    real = nk.netkit_request
    monkeypatch.setattr(nk, "netkit_request", lambda p, q: real(p, q).replace(b"netkit", b"veth\0\0"))
    nk.create_netkit(netns, "prim0", "peer0")
    assert nk.link(netns, "peer0")["link"] == "prim0"


@root
def test_a_netkit_pair_in_l2_mode_or_the_kernels_refusal(netns):
    try:
        nk.create_netkit(netns, "nkprim0", "nkpeer0")
    except OSError as exc:
        assert exc.errno == errno.EOPNOTSUPP, exc          # only "no such device type" means no netkit
        pytest.skip(f"this kernel has no netkit: {exc}")
    detail = subprocess.run(["ip", "-n", netns, "-d", "-j", "link", "show", "nkpeer0"], capture_output=True,
                            text=True, check=True).stdout
    assert '"netkit"' in detail and nk.link(netns, "nkpeer0")["address"] != "00:00:00:00:00:00"   # L2: a MAC


@root
def test_moving_a_device_by_a_process_pid_as_docker_does(netns):
    sandbox = f"nkt-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", sandbox], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "add", "out0", "type", "veth", "peer", "name", "in0"], check=True)
        assert nk.move_by_pid(netns, "in0", sandbox) == "link set in0 netns <pid>: ok"
        assert nk.link(sandbox, "in0")["ifname"] == "in0"
        assert subprocess.run(["ip", "-n", netns, "link", "show", "in0"], capture_output=True).returncode != 0
    finally:
        subprocess.run(["ip", "netns", "del", sandbox], check=False)
