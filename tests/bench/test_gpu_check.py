"""bench/gpu_check.sh on CPU: its dry run, and bench_transformer_gpu.py's refusal without CUDA and its toy-size CPU path.

The dry run runs the interpreter the venv was made from with the venv's site-packages on
PYTHONPATH: .pth files there are not processed, so the editable install's finder is absent and
tessera imports only through the script's own sitecustomize, as on a GPU machine that has the
working tree and no install.
"""

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"
BENCH = REPO / "bench" / "bench_transformer_gpu.py"
STEPS = ("tests", "attention", "powersgd", "mfu", "fp16-200")


def _uninstalled_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHON"] = getattr(sys, "_base_executable", sys.executable) or sys.executable
    env["PYTHONPATH"] = os.pathsep.join([*site.getsitepackages(), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_dry_run_lists_the_five_steps_and_finds_every_script(tmp_path):
    env = _uninstalled_env()
    env["OUT"] = str(tmp_path)
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for name in STEPS:
        assert re.search(rf"^\[\d\] step {re.escape(name)}, timeout \d+s: ", out, re.M), (name, out)
    for script in ("bench_attention.py", "bench_attention_kernels.py", "bench_powersgd.py", "bench_transformer_gpu.py"):
        assert f"ok: bench/{script} exists, --help exits 0" in out, out
    assert re.search(r"ok: \d+/\d+ tests collected", out), out  # the gpu marker selects tests in tests/kernels
    assert "[imports] ok" in out and "dry run: all 7 commands ready" in out, out
    assert f"results would go to {tmp_path}/gpu_check.txt" in out
    timeouts = [int(t) for t in re.findall(r"^\[\d\] step \S+, timeout (\d+)s", out, re.M)]
    assert sum(timeouts) < 8 * 60, timeouts
    assert not list(tmp_path.iterdir())  # a dry run writes no results


def test_refuses_without_cuda_or_with_an_unknown_argument(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown argument --frobnicate" in r.stderr
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "r.txt")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "r.txt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_bench_transformer_gpu_refuses_without_cuda_in_one_line():
    r = subprocess.run(
        [sys.executable, str(BENCH), "--d-model", "64", "--layers", "2", "--heads", "2"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA device" in lines[0], r.stderr


def test_bench_transformer_gpu_rejects_bad_flags():
    r = subprocess.run([sys.executable, str(BENCH), "--precision", "bf16", "--per-resblock"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--per-resblock needs --precision fp16" in r.stderr
    r = subprocess.run([sys.executable, str(BENCH), "--steps", "3", "--warmup", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must exceed --warmup" in r.stderr


def test_bench_transformer_gpu_fp16_per_resblock_trains_on_cpu_at_toy_size():
    """The code path of the 200-update check, 30 updates of a toy model: loss logged, scales grow, PASS."""
    args = ["--device", "cpu", "--text-len", "16", "--grid", "4", "--d-model", "32", "--layers", "2", "--heads", "2", "--batch", "2"]
    args += ["--attention", "dalle", "--precision", "fp16", "--per-resblock", "--steps", "30", "--warmup", "1", "--lr", "1e-3"]
    args += ["--log-every", "10", "--check-training"]
    r = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    logged = re.findall(r"step +(\d+) +loss ([\d.]+) +scale min (\S+) max (\S+) +skipped (\d+)", r.stdout)
    assert [int(s) for s, *_ in logged] == [1, 10, 20, 30], r.stdout
    assert float(logged[-1][1]) < float(logged[0][1])
    assert float(logged[-1][2]) > 2.0**13  # every clean update grows each block's scale by 2^(1/1000)
    assert "PASS training check (dalle, fp16 per-resblock)" in r.stdout, r.stdout
    assert "MFU" not in r.stdout  # not measured on CPU
