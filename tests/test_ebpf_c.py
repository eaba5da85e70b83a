"""The restricted-C version of the IPv4 container program (bench/ebpf_c/container4.c, a measuring artefact of
bench/ebpf_c_vs_asm.py: docs/datapath.md, "Why a Python assembler, not C") against the assembled one: the
same verdicts and packets on every case, the same peer counts and the same egress devices; that the check
finds a program that differs; how the object is linked. Needs clang, which neither vpcnet nor CI installs
(the comparison is run by hand): without it every test here skips, and without root the kernel ones do."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import is_root

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")
SCRIPT = os.path.join(BENCH, "ebpf_c_vs_asm.py")
sys.path.insert(0, BENCH)

import ebpf_c_vs_asm  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("clang") is None,
                                reason="needs clang (the C comparison only; vpcnet itself never compiles)")
needs_root = pytest.mark.skipif(not is_root(), reason="needs root (a network namespace, bpf(2))")


def _compile(tmp_path, source: str) -> str:
    path, out = tmp_path / "container4.c", str(tmp_path / "container4.o")
    path.write_text(source)
    ebpf_c_vs_asm.compile_c(str(path), out)
    return out


def _check(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--check-only", *extra], capture_output=True, text=True,
                          timeout=300, check=False)


@needs_root
@pytest.mark.root
def test_the_c_program_and_the_assembled_one_agree_on_every_case():
    proc = _check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "same verdicts, packets, peer maps and devices on every case" in proc.stdout


@needs_root
@pytest.mark.root
def test_the_check_finds_a_c_program_that_differs(tmp_path):
    with open(ebpf_c_vs_asm.SOURCE) as fh:
        source = fh.read()
    assert "ip->ttl <= 1" in source
    proc = _check("--object", _compile(tmp_path, source.replace("ip->ttl <= 1", "ip->ttl <= 0")))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no ports, TTL 1: verdict asm -1 c 7" in proc.stdout
    assert "TTL 2" not in proc.stdout                     # only what differs is named


def test_the_object_is_linked_to_the_maps_given_and_its_frozen_configuration(tmp_path):
    """Every ld_imm64 of a map gets that map's descriptor, every read-only variable the configuration map's
    descriptor and its own offset; a map the caller does not give is refused by name."""
    with open(ebpf_c_vs_asm.SOURCE) as fh:
        with open(_compile(tmp_path, fh.read()), "rb") as obj_file:
            obj = ebpf_c_vs_asm.ElfObject(obj_file.read())
    insns = ebpf_c_vs_asm.link(obj, {"vpcnet_ep4": 101, "vpcnet_peers": 102}, 103)
    loads = {}
    for at in range(0, len(insns) // 8):
        if insns[8 * at] == ebpf_c_vs_asm.LD_IMM64 and insns[8 * at + 1] >> 4:
            kind, imm = insns[8 * at + 1] >> 4, int.from_bytes(insns[8 * at + 4:8 * at + 8], "little")
            loads.setdefault((kind, imm), set()).add(int.from_bytes(insns[8 * at + 12:8 * at + 16], "little"))
    offsets = {value for (_name, shndx, value, _size) in obj.symbols if shndx == obj.section(".rodata")}
    assert loads.pop((ebpf_c_vs_asm.BPF_PSEUDO_MAP_FD, 101)) == {0}
    assert loads.pop((ebpf_c_vs_asm.BPF_PSEUDO_MAP_FD, 102)) == {0}
    assert loads.pop((ebpf_c_vs_asm.BPF_PSEUDO_MAP_VALUE, 103)) <= offsets
    assert loads == {}
    image = obj.rodata({"anchor_ifindex": 7, "uplinks": [3, 4]})
    sym = {name: value for (name, _shndx, value, _size) in obj.symbols}
    assert image[sym["anchor_ifindex"]:sym["anchor_ifindex"] + 4] == (7).to_bytes(4, "little")
    assert image[sym["uplinks"]:sym["uplinks"] + 8] == (3).to_bytes(4, "little") + (4).to_bytes(4, "little")
    with pytest.raises(ValueError, match="map 'vpcnet_peers', which the caller does not give"):
        ebpf_c_vs_asm.link(obj, {"vpcnet_ep4": 101}, 103)
    with pytest.raises(ValueError, match="no read-only variable 'nonesuch'"):
        obj.rodata({"nonesuch": 1})
    with pytest.raises(ValueError, match="do not fit"):
        obj.rodata({"uplinks": list(range(9))})
