"""tessera.core.machine: the machine a report names, read from /proc/cpuinfo and checked against torch's own probes."""

from pathlib import Path

import pytest
import torch

from tessera.core.machine import ISA_FLAGS, cpu_kind, describe, one_line

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx avx2 fma bmi2

processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx avx2 fma bmi2
"""


def test_an_avx2_only_cpuinfo_is_read_as_avx2(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text(CPUINFO)
    m = describe(p)
    assert m["cpu"] == "AMD EPYC 7B12"
    assert m["isa"] == {"avx2": True, "avx512f": False, "avx512_bf16": False, "avx512_fp16": False, "amx_bf16": False}
    assert m["kind"] == "avx2"
    assert m["threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    assert "AMD EPYC 7B12 (avx2: avx2)" in one_line(m)


def test_kinds_rank_amx_over_avx512_bf16_over_avx512():
    assert cpu_kind({"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": True}) == "amx"
    assert cpu_kind({"avx2": True, "avx512f": True, "avx512_bf16": True}) == "avx512-bf16"
    assert cpu_kind({"avx2": True, "avx512f": True}) == "avx512"
    assert cpu_kind({}) == "other"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_this_machine_agrees_with_torchs_probes():
    m = describe()
    assert m["cpu"] and m["cores"] >= 1 and set(m["isa"]) == set(ISA_FLAGS)
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None:
        assert m["isa"]["avx512_bf16"] == bool(probe())
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        assert m["isa"]["amx_bf16"] and m["kind"] == "amx"


def test_an_unreadable_cpuinfo_falls_back_to_torchs_probes(tmp_path):
    m = describe(tmp_path / "missing")
    assert m["cpu"]  # platform's name or the architecture
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None:
        assert m["isa"]["avx512_bf16"] == bool(probe())


def test_the_report_names_the_kernels_that_ran():
    """tessera.core.portable pins the demo's kernels; describe() says which ran (torch's own CPU capability)."""
    from tessera.core import portable

    k = describe()["kernels"]
    assert k["aten"] == torch.backends.cpu.get_cpu_capability()
    assert set(k) == {"aten", *portable.PINS}
    assert f", {k['aten']} kernels," in one_line(describe())
