"""tessera.core.portable: the demo runs torch's AVX2 kernels on every x86 CPU, so one seed gives the same bits everywhere."""

import json
import os
import platform
import subprocess
import sys

import pytest

from tessera.core import portable

AVX2_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"
OLD_CPUINFO = "processor\t: 0\nmodel name\t: old\nflags\t\t: fpu sse2 avx\n"
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _has_avx2() -> bool:
    return "avx2" in portable.read_cpuinfo()[1]


@pytest.mark.skipif(not X86, reason="the pin is for x86 CPUs")
def test_pin_sets_only_what_is_unset_and_honours_the_opt_out(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(AVX2_CPUINFO)
    env = {"MKL_CBWR": "COMPATIBLE"}  # the user's own choice stays
    assert portable.pin(env, cpuinfo=str(info)) == {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}
    assert env == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}
    assert portable.pin(env, cpuinfo=str(info)) == {}  # a second call changes nothing
    off = {portable.OPT_OUT: "1"}
    assert portable.pin(off, cpuinfo=str(info)) == {} and off == {portable.OPT_OUT: "1"}
    info.write_text(OLD_CPUINFO)  # no AVX2: nothing to pin to
    none = {}
    assert portable.pin(none, cpuinfo=str(info)) == {} and none == {}


# conv (oneDNN), GELU and softmax (ATen vectorised) are the kernels whose bits differ between AVX-512 and AVX2 code;
# the GEMM is MKL's. The hashes identify the bits each process computed.
PROBE = """
import hashlib, json, sys
from tessera.core import portable
if sys.argv[1] == "pin":
    portable.pin()
import torch
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
x, w = torch.randn(4, 16, 24, 24, generator=g), torch.randn(32, 16, 3, 3, generator=g)
a, b = torch.randn(300, 200, generator=g), torch.randn(200, 100, generator=g)
outs = {"conv": torch.nn.functional.conv2d(x, w, padding=1), "mm": a @ b}
outs["gelu"] = torch.nn.functional.gelu(outs["mm"])
outs["softmax"] = torch.softmax(outs["mm"], -1)
h = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in outs.items()}
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(), "hashes": h}))
"""


def _probe(mode: str, extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*portable.PINS, portable.OPT_OUT, "MKL_ENABLE_INSTRUCTIONS")}
    env.update(extra_env)
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (X86 and _has_avx2()), reason="needs an x86 CPU with AVX2")
def test_pinned_kernels_compute_the_bits_of_an_avx2_only_cpu():
    pinned = _probe("pin", {})
    assert pinned["aten"] == "AVX2"
    # an AVX2-only CPU, emulated: every library told to use nothing above AVX2
    avx2_only = _probe("none", {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"})
    assert pinned["hashes"] == avx2_only["hashes"]
    native = _probe("none", {portable.OPT_OUT: "1"})
    if native["aten"] != "AVX2":  # an AVX-512 CPU: its own kernels round differently somewhere (here: conv, GELU, softmax)
        assert native["hashes"] != pinned["hashes"]
