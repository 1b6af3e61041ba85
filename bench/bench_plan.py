"""The capacity planner against a measured CPU run: peak memory and step time of a small transformer.

    .venv/bin/python bench/bench_plan.py [--config demo] [--batch 16] [--steps 4] [--threads 1] [key=value ...]

Runs a few AdamW training steps (fp32, plain engine, no checkpointing) of the config's transformer
on random tokens in a fresh child process, and prints beside the planner's projection:
  * the peak resident memory the steps added (Linux VmHWM after resetting it through
    /proc/self/clear_refs, less the resident size before the model was built), against the planned
    peak (weights + gradients + Adam moments + saved activations + buffers, all held at once);
  * the median step time, against the planner's step time for one "GPU" whose peak FLOPS are the
    matmul rate this CPU reaches on the model's MLP shape (measured first), at efficiency 1.

`--child` is the measuring process itself (prints one JSON line); tests/cluster/test_plan.py runs it too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def matmul_flops(m: int, k: int, n: int, threads: int, repeats: int = 5) -> float:
    """FLOP/s of an fp32 [m, k] x [k, n] matmul on this CPU (best of `repeats`)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * m * k * n / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _train(model, text, image, steps: int) -> list[float]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.loss(text, image)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def child(preset: str, overrides: list[str], batch: int, steps: int, threads: int) -> dict:
    """Train `steps` steps in this process; the peak RSS they added and their step times."""
    import torch

    from tessera.core.root_config import load_root
    from tessera.trainer.transformer import DALLE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mcfg = load_root(preset, overrides).transformer.model
    text = torch.randint(0, mcfg.text_vocab, (batch, mcfg.text_len))
    image = torch.randint(0, mcfg.image_vocab, (batch, mcfg.image_grid**2))
    _train(DALLE(mcfg).train(), text[:1], image[:1], 2)  # page in the kernels' code first: it counts in the resident size too
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base_kb = _status_kb("VmRSS")
    times = _train(DALLE(mcfg).train(), text, image, steps)
    peak_kb = _status_kb("VmHWM")
    return {"peak_bytes": (peak_kb - base_kb) * 1024, "step_s": statistics.median(times[1:] or times), "times": times}


def measure(preset: str, overrides: list[str], batch: int, steps: int = 4, threads: int = 1) -> dict:
    """Run `child` in a fresh interpreter (so earlier allocations do not hide the peak)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--config", preset, "--batch", str(batch)]
    cmd += ["--steps", str(steps), "--threads", str(threads), *overrides]
    # a fixed mmap threshold: every tensor above 64 KiB gets its own mapping, returned to the system when freed, so the
    # resident size follows the live tensors (with glibc's adaptive threshold, freed heap memory stays resident)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"bench_plan child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def projection(preset: str, overrides: list[str], batch: int, cpu_flops: float) -> dict:
    """The planner's peak memory and step time for the same run (1 device, fp32, no checkpointing, plain)."""
    from tessera.cluster.plan import Hardware, memory, step_time
    from tessera.cluster.plan_model import transformer_shape
    from tessera.core.root_config import load_root

    shape = transformer_shape(load_root(preset, overrides).transformer.model)
    hw = Hardware(gpus=1, gpus_per_node=1, name="cpu", memory_gb=1e6, tflops_override=cpu_flops / 1e12, efficiency=1.0)
    mem = memory(shape, "ddp", "fp32", hw, batch, False)
    mem["peak"] -= mem.pop("comm_buffers")  # a single process has no DDP buckets
    t = step_time(shape, "ddp", "fp32", hw, batch, batch, False, 0)
    return {"peak_bytes": mem["peak"], "memory": mem, "step_s": t["compute_s"], "params": shape.params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.overrides, args.batch, args.steps, args.threads)))
        return
    from tessera.core.root_config import load_root

    m = load_root(args.config, args.overrides).transformer.model
    s = m.text_len + m.image_grid**2
    rate = matmul_flops(args.batch * s, m.d_model, int(m.d_model * m.mlp_ratio), args.threads)
    got = measure(args.config, args.overrides, args.batch, args.steps, args.threads)
    want = projection(args.config, args.overrides, args.batch, rate)
    print(
        f"config {args.config} {' '.join(args.overrides)}: {want['params']:,} parameters, batch {args.batch}, fp32, {args.threads} thread(s)"
    )
    print(f"cpu matmul rate on the MLP shape: {rate / 1e9:.1f} GFLOP/s (used as the device's peak, efficiency 1)")
    print(
        f"peak memory: planned {want['peak_bytes'] / 2**20:.1f} MiB, measured {got['peak_bytes'] / 2**20:.1f} MiB,"
        f" ratio planned/measured {want['peak_bytes'] / got['peak_bytes']:.3f}"
    )
    print("  planned items (MiB): " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in want["memory"].items() if k != "peak"))
    print(
        f"step time: projected {want['step_s']:.3f} s, measured {got['step_s']:.3f} s (median),"
        f" ratio projected/measured {want['step_s'] / got['step_s']:.3f}"
    )


if __name__ == "__main__":
    main()
