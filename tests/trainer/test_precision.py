"""tessera.trainer.precision: config precision values resolved per device (dVAE, transformer and CLIP trainers)."""

import torch

from tessera.trainer.precision import autocast_dtype, native_bf16, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_native_bf16_follows_the_cpu_probes():
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    assert native_bf16(CPU) == any(bool(f()) for f in probes if f is not None)
    assert native_bf16(CUDA) and not native_bf16(torch.device("meta"))


def test_values_resolve_per_device():
    assert resolve_precision("fast", CPU) == ("bf16" if native_bf16(CPU) else "fp32")
    assert resolve_precision("fast", CUDA) == "bf16" == resolve_precision("auto", CUDA)
    assert resolve_precision("auto", CPU) == "fp32"
    for dev in (CPU, CUDA):
        assert [resolve_precision(p, dev) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_autocast_dtypes():
    # the dVAE's and CLIP's rules: auto is bf16 on GPU and fp32 (None) on CPU; fp32 / bf16 as named
    assert [autocast_dtype(p, CPU) for p in ("auto", "fp32", "bf16", "fp16")] == [None, None, torch.bfloat16, torch.float16]
    assert [autocast_dtype(p, CUDA) for p in ("auto", "fp32", "bf16")] == [torch.bfloat16, None, torch.bfloat16]
    assert autocast_dtype("fast", CPU) == (torch.bfloat16 if native_bf16(CPU) else None)
