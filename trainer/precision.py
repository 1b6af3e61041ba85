"""The precision a training run computes in: the config values ("auto", "fast", "fp32", "bf16", "fp16")
resolved per device, in one place for the dVAE, transformer and CLIP trainers.

    auto   bf16 autocast on GPU, fp32 on CPU
    fast   bf16 autocast wherever bf16 matrix products are native (`native_bf16`), else fp32
    fp32 / bf16 / fp16   as named

Each stage's config says which of these values it accepts.
"""

from __future__ import annotations

import contextlib

import torch


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix products are native: CUDA, or a CPU with AVX512-BF16 or AMX tiles.

    Measured on the demo's transformer (bench/bench_transformer.py): a Zen 5 EPYC with AVX512-BF16
    trains 1.3-1.6x faster in bf16 than in fp32; an AVX2-only EPYC 18x slower."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(f()) for f in probes if f is not None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision ("fp32", "bf16" or "fp16") of a config value on `device`."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fast":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a config value on `device`, or None for fp32."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(precision, device)]


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on `device`, or nothing for None (fp32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["native_bf16", "resolve_precision", "autocast_dtype", "autocast"]
