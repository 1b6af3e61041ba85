"""Where a run ran: the CPU, its instruction sets that decide the demo's speed, threads and versions.

The demo's figures depend on the machine (issue 17): fp32 matrix products on an AVX2-only CPU reach
about 70 GFLOP/s on 2 threads, bf16 is native only with AVX512-BF16 or AMX. Reports and benchmarks
carry `describe()` so that each figure names its machine.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from tessera.core import portable

# The flags of /proc/cpuinfo that change what the CPU computes fast, in the order they are printed.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def cpu_kind(isa: dict[str, bool]) -> str:
    """A short label of the CPU's kind for the demo's speed: 'amx', 'avx512-bf16', 'avx512', 'avx2' or 'other'."""
    if isa.get("amx_bf16"):
        return "amx"
    if isa.get("avx512_bf16"):
        return "avx512-bf16"
    if isa.get("avx512f"):
        return "avx512"
    return "avx2" if isa.get("avx2") else "other"


def kernels() -> dict[str, Any]:
    """The CPU kernels this process runs: torch's CPU capability and the variables of tessera.core.portable (None where unset)."""
    return {"aten": torch.backends.cpu.get_cpu_capability(), **{k: os.environ.get(k) for k in portable.PINS}}


def describe(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The machine, as a JSON-ready dict: cpu model, cores, torch threads, instruction sets, kind, versions."""
    name, flags = portable.read_cpuinfo(cpuinfo)
    isa = {f: f in flags for f in ISA_FLAGS}
    if not flags:  # no /proc/cpuinfo (not Linux): ask torch's own probes where it has them
        for flag, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
            fn = getattr(torch.cpu, probe, None)
            isa[flag] = bool(fn()) if fn is not None else False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {
        "cpu": name or platform.processor() or platform.machine(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "isa": isa,
        "kind": cpu_kind(isa),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "kernels": kernels(),
    }


def one_line(m: dict[str, Any]) -> str:
    """`describe()` in one line, for tables and logs."""
    isa = ", ".join(f for f in ISA_FLAGS if m["isa"].get(f)) or "none of " + ", ".join(ISA_FLAGS)
    gpu = f"; GPU {m['cuda']}" if m.get("cuda") else ""
    kernels = f", {m['kernels']['aten']} kernels" if m.get("kernels") else ""
    return f"{m['cpu']} ({m['kind']}: {isa}), {m['cores']} cores, {m['threads']} threads{kernels}, torch {m['torch']}{gpu}"


__all__ = ["ISA_FLAGS", "cpu_kind", "describe", "kernels", "one_line"]
