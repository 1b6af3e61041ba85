"""dVAE training throughput (images/s) for one fixed model under several execution settings.

Each setting runs full training steps (gumbel-softmax forward, logit-Laplace + KL loss, backward,
AdamW) on random 64x64 images; the baseline is plain fp32 eager with the default memory format.
CPU settings: fp32, channels_last, bf16 autocast, bf16 + channels_last. GPU (when present) adds
torch.compile. Not a test; prints a table.

    python bench/bench_dvae.py [--device cpu|cuda] [--steps 10] [--batch 32] [--threads N] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tessera.core.root_config import load_root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tessera.trainer.dvae import DVAE  # noqa: E402
from tessera.trainer.dvae_train import dvae_loss  # noqa: E402


def bench(cfg, device, batch, steps, warmup, channels_last, dtype, compile_):
    torch.manual_seed(0)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    model = DVAE(cfg.dvae.model).to(device).to(memory_format=mem)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    s = cfg.dvae.model.image_size
    x = torch.rand(batch, 3, s, s, device=device).contiguous(memory_format=mem)

    def step():
        loss, _ = dvae_loss(fwd, x, 0.5, 1.0, 0.1, None, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step()
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return batch * steps / wall, (time.process_time() - c0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--config", default="demo")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_root(args.config, args.overrides)
    dev = torch.device(args.device)
    m = cfg.dvae.model
    print(
        f"dVAE {m.image_size}px n_hid={m.n_hid} groups={m.n_groups}x{m.n_blk_per_group} vocab={m.vocab_size} n_init={m.n_init}; "
        f"batch {args.batch}, {args.steps} timed steps, device {dev}, threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    settings = [
        ("fp32 eager (baseline)", False, None, False),
        ("fp32 channels_last", True, None, False),
        ("bf16 autocast", False, torch.bfloat16, False),
        ("bf16 autocast + channels_last", True, torch.bfloat16, False),
    ]
    if dev.type == "cuda":
        settings += [("bf16 + channels_last + torch.compile", True, torch.bfloat16, True)]
    base = None
    print(f"{'setting':<40} {'images/s':>10} {'speed-up':>9} {'cpu s/step':>11}")
    for name, cl, dt, comp in settings:
        ips, cpu = bench(cfg, dev, args.batch, args.steps, args.warmup, cl, dt, comp)
        base = base or ips
        print(f"{name:<40} {ips:>10.1f} {ips / base:>8.2f}x {cpu:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
