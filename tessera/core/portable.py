"""One set of CPU kernels on every x86 CPU, so that one seed gives the same numbers on every machine (issue 17).

Why: fp32 is not enough for the demo's figures to agree between machines. PyTorch picks its vectorised
kernels by the CPU it finds (ATen's softmax, GELU, layer norm at AVX-512 or AVX2 width; oneDNN's
convolutions with AVX-512 or AVX2 code; MKL's GEMM by processor), and each sums in its own order. A few
hundred training updates amplify the last-bit differences into different models: the same seed gave
29.55 dB on two AMD machines and 29.71 dB on an Intel one (BENCHMARKS.md, machine C).

`pin()` selects the AVX2 code of all three before torch loads, the widest that every x86 CPU the demo
promises to run on has:

    ATEN_CPU_CAPABILITY=avx2     ATen's CPU dispatch (torch.backends.cpu.get_cpu_capability() says "AVX2")
    DNNL_MAX_CPU_ISA=AVX2        oneDNN (convolutions, the dVAE's bulk)
    MKL_CBWR=AVX2,STRICT         MKL's conditional numerical reproducibility: the AVX2 branch, bitwise, on any CPU

Measured on machine D (AMD Zen 4, AVX-512): MKL's fp32 GEMM there already takes the AVX2 branch (the same
bits with and without the pin); the pin changes conv, GELU and softmax bits to exactly those an AVX2-only
CPU computes (`MKL_ENABLE_INSTRUCTIONS=AVX2` emulation gives identical hashes). It costs nothing measurable
there (transformer update 0.527 s pinned, 0.553 s native; the quick demo 84.7 s pinned, 98.6 s native).

A variable the user has already set is left as it is; `TESSERA_NATIVE_KERNELS=1` turns the pin off. It
only takes effect in a process that has not imported torch yet, and in the processes it starts;
`tessera.core.machine.describe()` reports the kernels that ran.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import MutableMapping

PINS: dict[str, str] = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
OPT_OUT = "TESSERA_NATIVE_KERNELS"


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in `path`; ("", empty) where it cannot be read. No torch import:
    the pin reads it before torch loads, and `tessera.core.machine` reads it for reports."""
    name, flags = "", set()
    try:
        text = Path(path).read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, flags


def pin(environ: MutableMapping[str, str] | None = None, *, cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """Set the AVX2 kernel variables that are not set yet; returns the ones this call set (empty when it set none).

    Sets nothing where the user opted out, on a CPU without AVX2 or not x86, or where torch is already imported
    in this process (too late to change its kernels: the report then names the kernels that ran).
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT) == "1" or platform.machine().lower() not in ("x86_64", "amd64") or "avx2" not in read_cpuinfo(cpuinfo)[1]:
        return {}
    if environ is None and "torch" in sys.modules:
        return {}
    done = {}
    for key, value in PINS.items():
        if key not in env:
            env[key] = value
            done[key] = value
    return done


__all__ = ["OPT_OUT", "PINS", "pin", "read_cpuinfo"]
