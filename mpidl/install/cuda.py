"""CUDA architectures: the lists torch, nvcc and users give, what a compiled library carries (read
from its fatbinary, so any Horovod can be judged, not only one mpidl built), and whether that runs
on a GPU of a given compute capability.

Architectures are numbers as Horovod's HOROVOD_BUILD_CUDA_CC_LIST writes them: 80 is compute
capability 8.0 (A100), 90 is 9.0 (H100), 100 is 10.0, 121 is 12.1.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from mpidl.errors import BadInput


def arch_numbers(text: str) -> list[int]:
    """torch's or nvcc's names ('sm_70 sm_80 sm_90a compute_90') -> [70, 80, 90]."""
    return sorted({int(n) for n in re.findall(r"(?:sm|compute)_(\d+)", text)})


def parse_cc_list(text: str, where: str) -> list[int]:
    """A user's list in Horovod's form, '70,80,90'; BadInput naming `where` otherwise."""
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or not all(re.fullmatch(r"\d{2,3}", s) for s in items):
        raise BadInput(f"{where}={text!r}: give compute capabilities without the dot, comma separated, "
                       "e.g. 70,80,90 (V100, A100, H100)")
    return sorted({int(s) for s in items})


def cap_number(cap: tuple[int, int]) -> int:
    return cap[0] * 10 + cap[1]


def cap_text(number: int) -> str:
    return f"{number // 10}.{number % 10}"


@dataclass(frozen=True)
class Kernels:
    """What a library carries: machine code (SASS) runs on GPUs of the same major capability and
    an equal or higher minor one; PTX is compiled by the driver for any GPU at least as new."""
    sass: frozenset = frozenset()
    ptx: frozenset = frozenset()

    def __bool__(self) -> bool:
        return bool(self.sass or self.ptx)

    def __or__(self, other: "Kernels") -> "Kernels":
        return Kernels(self.sass | other.sass, self.ptx | other.ptx)

    def runs_on(self, cap: tuple[int, int]) -> bool:
        major, minor = cap
        return (any(a // 10 == major and a % 10 <= minor for a in self.sass)
                or any(p <= cap_number(cap) for p in self.ptx))

    def describe(self) -> str:
        text = ", ".join(f"sm_{a}" for a in sorted(self.sass)) or "no machine code"
        if self.ptx:
            text += " (+PTX " + ", ".join(cap_text(p) for p in sorted(self.ptx)) + ")"
        return text


def missed(kernels: Kernels, caps: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The capabilities among `caps` that no kernel in `kernels` runs on (each once, in order)."""
    out: list[tuple[int, int]] = []
    for cap in caps:
        if not kernels.runs_on(cap) and cap not in out:
            out.append(cap)
    return out


# ---------------------------------------------------------------- reading a library's fatbinary
FATBIN_MAGIC = 0xBA55ED50
_KIND_PTX, _KIND_SASS = 1, 2


def _elf_section(path: Path, name: str) -> Optional[bytes]:
    """The contents of section `name` of a 64-bit little-endian ELF file, or None."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        if not shoff or shentsize < 64 or shstrndx >= shnum:
            return None
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        str_off, str_size = sections[shstrndx][4], sections[shstrndx][5]
        f.seek(str_off)
        names = f.read(str_size)
        want = name.encode()
        for name_off, _type, _flags, _addr, offset, size in sections:
            if names[name_off:names.find(b"\0", name_off)] == want:
                f.seek(offset)
                return f.read(size)
    return None


def fatbin_kernels(blob: bytes) -> Kernels:
    """The architectures in a `.nv_fatbin` section: a run of containers (magic, version, header
    size, payload size), each holding entries whose header names the kind (1 PTX, 2 ELF/SASS) and,
    at byte 28, the architecture."""
    sass: set[int] = set()
    ptx: set[int] = set()
    pos = 0
    while pos + 16 <= len(blob):
        magic, _version, head, size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned; skip padding
            continue
        entry, end = pos + head, min(pos + head + size, len(blob))
        while entry + 32 <= end:
            kind, _unused, entry_head, payload = struct.unpack_from("<HHIQ", blob, entry)
            arch, = struct.unpack_from("<I", blob, entry + 28)
            if entry_head < 32:
                break
            (ptx if kind == _KIND_PTX else sass if kind == _KIND_SASS else set()).add(arch)
            entry += entry_head + payload
        pos = (end + 7) // 8 * 8
    return Kernels(frozenset(sass), frozenset(ptx))


def library_kernels(path: Path) -> Kernels:
    blob = _elf_section(path, ".nv_fatbin")
    return fatbin_kernels(blob) if blob else Kernels()


def package_kernels(folder: Path) -> Kernels:
    """Every CUDA kernel architecture in the shared libraries under `folder` (an installed package)."""
    found = Kernels()
    for lib in sorted(folder.rglob("*.so")):
        found = found | library_kernels(lib)
    return found
