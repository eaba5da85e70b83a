"""A small eBPF assembler: the instruction set vpcnet's programs use (linux/bpf.h, linux/bpf_common.h),
labels with forward jumps, and the encoding the kernel loads. No compiler, no object file (why not restricted C,
measured: docs/datapath.md, "Why a Python assembler, not C")."""
from __future__ import annotations

import struct

# -- the instruction set (linux/bpf.h, linux/bpf_common.h) -------------------------------------------
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM = 0x00, 0x60
PSEUDO_MAP_FD = 1                          # ld_imm64's src: imm is a map's file descriptor
K, X = 0x00, 0x08
ADD, SUB, OR, AND, LSH, MOV = 0x00, 0x10, 0x40, 0x50, 0x60, 0xB0
JA, JEQ, JGT, JNE, JLT, JLE, CALL, EXIT = 0x00, 0x10, 0x20, 0x50, 0xA0, 0xB0, 0x80, 0x90
SIZES = {1: B, 2: H, 4: W, 8: DW}
FP = 10                                    # the frame pointer register (read only)


class Asm:
    """A minimal eBPF assembler: one method per instruction form, labels for forward jumps."""

    def __init__(self):
        self.insns: list[list[int]] = []          # [code, dst, src, off, imm]
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.insns.append([code, dst, src, off, imm])

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = len(self.insns)

    # moves and arithmetic
    def mov(self, dst: int, src: int) -> None:
        self._emit(ALU64 | MOV | X, dst, src)

    def movi(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | MOV | K, dst, imm=imm)

    def add(self, dst: int, src: int) -> None:
        self._emit(ALU64 | ADD | X, dst, src)

    def addi(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | ADD | K, dst, imm=imm)

    def subi(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | SUB | K, dst, imm=imm)

    def andi32(self, dst: int, imm: int) -> None:
        self._emit(ALU | AND | K, dst, imm=_s32(imm))

    def or_(self, dst: int, src: int) -> None:
        self._emit(ALU64 | OR | X, dst, src)

    def lshi(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | LSH | K, dst, imm=imm)

    # memory
    def ld_map(self, dst: int, map_fd: int) -> None:
        """dst = the map behind `map_fd` (ld_imm64 with BPF_PSEUDO_MAP_FD: two instruction slots; the
        kernel swaps the descriptor for the map when it loads the program)."""
        self._emit(LD | IMM | DW, dst, PSEUDO_MAP_FD, imm=map_fd)
        self._emit(0)

    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        self._emit(LDX | MEM | SIZES[size], dst, src, off)

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        self._emit(STX | MEM | SIZES[size], dst, src, off)

    def st(self, size: int, dst: int, off: int, imm: int) -> None:
        self._emit(ST | MEM | SIZES[size], dst, off=off, imm=imm)

    # control flow
    def jump(self, op: int, dst: int, target: str, imm: int | None = None, src: int | None = None,
             wide: bool = True) -> None:
        cls = JMP if wide else JMP32
        if src is not None:
            self._emit(cls | op | X, dst, src)
        else:
            self._emit(cls | op | K, dst, imm=_s32(imm or 0))
        self.fixups.append((len(self.insns) - 1, target))

    def goto(self, target: str) -> None:
        self._emit(JMP | JA)
        self.fixups.append((len(self.insns) - 1, target))

    def call(self, helper: int) -> None:
        self._emit(JMP | CALL, imm=helper)

    def exit(self) -> None:
        self._emit(JMP | EXIT)

    def assemble(self) -> bytes:
        for at, target in self.fixups:
            self.insns[at][3] = self.labels[target] - at - 1
        return b"".join(struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
                        for code, dst, src, off, imm in self.insns)


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value
