"""The llama.cpp build runs on any CPU of its kind, and a build that would not says so.

A build for the building machine's CPU (llama.cpp's default, ``-march=native``) used
AVX-512 and AMX and crashed a worker in silence (issue 12). The installed build must
use no instruction set beyond the portable baseline, and the engine compares the
library's instruction sets with the CPU's before loading any model.
"""

from __future__ import annotations

import platform
from pathlib import Path

import llama_cpp
import pytest

from igora.engines import cpu, llama
from igora.engines.base import EngineError

NATIVE_AMX = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
    "BMI2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | "
    "AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
PORTABLE_X86 = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
ARM = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | SVE = 1 | SVE_CNT = 16 | "


def flags(listed: str) -> set[str]:
    """CPU flags as /proc/cpuinfo lists them."""
    return set(listed.split(" "))


HASWELL = flags("fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2")
SAPPHIRE_RAPIDS = HASWELL | flags("avx512f avx512vbmi avx512_vnni avx512_bf16 amx_int8 avx_vnni")
SANDY_BRIDGE = flags("fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx")
GRAVITON2 = flags("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp")


def installed_system_info() -> str:
    return str(llama_cpp.llama_print_system_info().decode())


def test_installed_llama_cpp_uses_no_instruction_set_beyond_the_portable_baseline() -> None:
    machine = platform.machine()
    assert machine in cpu.PORTABLE, f"no portable baseline known for {machine}"
    used = cpu.library_features(installed_system_info())
    assert cpu.beyond_portable(used, machine) == set(), (
        f"llama.cpp was built for one CPU ({installed_system_info()}): it can crash on "
        "another; install it with scripts/install-llama.sh"
    )
    # ... and is still fast: the whole baseline is used (a build without it is generic).
    assert cpu.PORTABLE[machine] <= used, installed_system_info()


def test_installed_llama_cpp_runs_on_this_cpu() -> None:
    assert cpu.check_installed() == cpu.instruction_sets(
        cpu.library_features(installed_system_info())
    )


REBUILD = "rebuild llama.cpp on this machine: `scripts/install-llama.sh`"
FOR_THIS_CPU = 'IGORA_LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" scripts/install'
AVX512_AMX = "AMX_INT8, AVX512, AVX512_BF16, AVX512_VBMI, AVX512_VNNI, AVX_VNNI"
CASES = [  # library, machine, CPU flags, what it lacks (None: it runs), how to rebuild
    (NATIVE_AMX, "x86_64", HASWELL, AVX512_AMX, REBUILD),
    (NATIVE_AMX, "x86_64", SAPPHIRE_RAPIDS, None, None),
    (PORTABLE_X86, "x86_64", HASWELL, None, None),
    (PORTABLE_X86, "x86_64", SAPPHIRE_RAPIDS, None, None),
    (PORTABLE_X86, "x86_64", SANDY_BRIDGE, "AVX2, BMI2, F16C, FMA", FOR_THIS_CPU),
    (ARM, "aarch64", GRAVITON2, "SVE", REBUILD),
    (ARM, "aarch64", GRAVITON2 | {"sve"}, None, None),
    (NATIVE_AMX, "x86_64", None, None, None),  # no /proc/cpuinfo: nothing to compare
]


@pytest.mark.parametrize("info, machine, flags, lacking, how", CASES)
def test_a_library_using_instructions_the_cpu_lacks_is_refused(
    info: str,
    machine: str,
    flags: set[str] | None,
    lacking: str | None,
    how: str | None,
) -> None:
    if lacking is None:
        cpu.check(info, flags, machine)
        return
    with pytest.raises(EngineError) as err:
        cpu.check(info, flags, machine)
    said = str(err.value)
    assert f"this llama.cpp build uses {lacking}, which this CPU lacks" in said
    assert how in said, said


def test_what_a_native_build_uses_beyond_the_portable_one() -> None:
    native = cpu.library_features(NATIVE_AMX)
    assert cpu.beyond_portable(native, "x86_64") == {
        "AVX_VNNI",
        "AVX512",
        "AVX512_VBMI",
        "AVX512_VNNI",
        "AVX512_BF16",
        "AMX_INT8",
    }
    assert cpu.beyond_portable(cpu.library_features(PORTABLE_X86), "x86_64") == set()
    # Build options and numbers are not instruction sets; on ARM, SVE is beyond the base.
    assert cpu.beyond_portable(cpu.library_features(ARM), "aarch64") == {
        "FP16_VA",
        "DOTPROD",
        "SVE",
    }
    # An instruction set of a machine with no known baseline counts as beyond it.
    assert (
        cpu.beyond_portable(cpu.library_features(PORTABLE_X86), "riscv64") == cpu.PORTABLE["x86_64"]
    )


def test_cpu_flags_are_read_from_proc_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\n"
        "flags\t\t: fpu sse2 avx avx2 avx512f amx_int8\nbugs\t\t: spectre_v1\n"
    )
    assert cpu.cpu_flags(x86) == {"fpu", "sse2", "avx", "avx2", "avx512f", "amx_int8"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd asimddp sve\n")
    assert cpu.cpu_flags(arm) == {"fp", "asimd", "asimddp", "sve"}
    assert cpu.cpu_flags(tmp_path / "missing") is None
    assert cpu.cpu_flags(Path("/proc/cpuinfo")), "this Linux machine lists its CPU flags"


def test_the_engine_refuses_a_library_this_cpu_cannot_run_before_loading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real library and engine, on a CPU (as /proc/cpuinfo tells) without AVX2."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: " + " ".join(sorted(SANDY_BRIDGE)) + "\n")
    real = cpu.cpu_flags
    monkeypatch.setattr(cpu, "cpu_flags", lambda: real(cpuinfo))
    llama.llama_class.cache_clear()
    try:
        with pytest.raises(EngineError, match="uses AVX2, BMI2, F16C, FMA, which this CPU lacks"):
            llama.LlamaEngine(tmp_path / "never-read.gguf")
    finally:
        llama.llama_class.cache_clear()
