"""Does this llama.cpp build run on this CPU? The instruction sets a llama.cpp library
was compiled for (``llama_print_system_info()``) against the running CPU's.

A build for instructions the CPU lacks dies of SIGILL or a protection fault at its first
real computation, with no word from Python. Comparing first turns that crash into one
clear sentence. Igora builds llama.cpp for a portable baseline (``scripts/install-llama.sh``,
``-DGGML_NATIVE=OFF``): on x86-64, SSE4.2, AVX, AVX2, FMA, F16C and BMI2 (Intel Haswell,
AMD Excavator and later), never AVX-512 or AMX; on 64-bit ARM, the ARMv8-A base (NEON).
"""

from __future__ import annotations

import platform
import re
import sys
from pathlib import Path

from .base import EngineError

# Instruction set as llama.cpp names it -> the flag /proc/cpuinfo shows when the CPU has it.
CPU_FLAG = {
    # x86-64
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX_VNNI": "avx_vnni",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
    # 64-bit ARM ("Features" in /proc/cpuinfo)
    "NEON": "asimd",
    "ARM_FMA": "asimd",
    "FP16_VA": "asimdhp",
    "DOTPROD": "asimddp",
    "MATMUL_INT8": "i8mm",
    "SVE": "sve",
    "SME": "sme",
    "SME2": "sme2",
}

PORTABLE = {
    "x86_64": frozenset({"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2"}),
    "aarch64": frozenset({"NEON", "ARM_FMA"}),
}
"""What Igora's portable build may use, by machine; anything else is a native build."""

NOT_INSTRUCTIONS = frozenset(
    {
        "LLAMAFILE",
        "OPENMP",
        "REPACK",
        "ACCELERATE",
        "CPU_HBM",
        "KLEIDIAI",
        "SVE_CNT",
        "RVV_VLEN",
    }
)
"""Names in the system info that are build options or numbers, not instruction sets."""

REBUILD_OLD_CPU = (
    "this CPU is older than the portable baseline: build llama.cpp for it with "
    '`IGORA_LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" scripts/install-llama.sh` '
    "in igora's source folder"
)
REBUILD = (
    "rebuild llama.cpp on this machine: `scripts/install-llama.sh` in igora's "
    "source folder (what `make up` runs)"
)

_ITEM = re.compile(r"([A-Z0-9_]+) = (\w+)")


def library_features(system_info: str) -> set[str]:
    """The CPU features a ``llama_print_system_info()`` text reports as used.

    The text looks like ``CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | ... | REPACK = 1 |``.
    """
    return {name for name, value in _ITEM.findall(system_info) if value not in ("0", "")}


def instruction_sets(features: set[str]) -> set[str]:
    return {f for f in features if f not in NOT_INSTRUCTIONS}


def beyond_portable(features: set[str], machine: str) -> set[str]:
    """Instruction sets a build uses beyond what the portable build of ``machine`` may."""
    return instruction_sets(features) - PORTABLE.get(machine, frozenset())


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The running CPU's flags (Linux), or None where the system does not list them."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def missing(features: set[str], flags: set[str]) -> list[str]:
    """The instruction sets a library uses that a CPU with ``flags`` lacks (known names
    only: a name this table does not know is not checked)."""
    return sorted(
        f for f in instruction_sets(features) if f in CPU_FLAG and CPU_FLAG[f] not in flags
    )


def check(system_info: str, flags: set[str] | None, machine: str | None = None) -> None:
    """Raise EngineError if the library would crash on a CPU with ``flags`` (None: not
    known, nothing checked)."""
    if flags is None:
        return
    lacking = missing(library_features(system_info), flags)
    if not lacking:
        return
    older = set(lacking) <= PORTABLE.get(machine or platform.machine(), frozenset())
    how = REBUILD_OLD_CPU if older else REBUILD
    raise EngineError(
        f"this llama.cpp build uses {', '.join(lacking)}, which this CPU lacks: it would "
        f"crash at the first prompt; {how}"
    )


def check_installed() -> set[str]:
    """Check the installed llama-cpp-python against this CPU (where the CPU's flags are
    known); return the instruction sets it uses."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    check(text, cpu_flags() if sys.platform == "linux" else None)
    return instruction_sets(library_features(text))
