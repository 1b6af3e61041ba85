"""Transformer speed on this machine: training tokens/s (fp32 and bf16 autocast) and sampling images/s
with and without the KV cache, for a small config (by default the demo's shape: 24 text + 8x8 image tokens).

    .venv/bin/python bench/bench_transformer.py [--d-model 128] [--layers 4] [--batch 32] [--steps 5]
        [--grid 8] [--text-len 24] [--attention dalle|dense] [--skip-bf16] [--skip-sampling]

Prints one line per figure. Timings are wall-clock medians; on a shared machine, also compare the
process CPU time printed beside them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tessera.trainer.config import SampleConfig, TransformerModelConfig
from tessera.trainer.sample import sample_codes
from tessera.trainer.transformer import DALLE


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--attention", default="dalle", choices=("dalle", "dense"))
    ap.add_argument("--grid", type=int, default=8, help="image tokens per side")
    ap.add_argument("--text-len", type=int, default=24)
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--skip-sampling", action="store_true")
    args = ap.parse_args()
    cfg = TransformerModelConfig(
        text_len=args.text_len,
        text_vocab=256,
        image_grid=args.grid,
        image_vocab=512,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        conv_kernel=5,
        attention=args.attention,
    )
    torch.manual_seed(0)
    model = DALLE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text = torch.randint(0, 256, (args.batch, args.text_len))
    image = torch.randint(0, 512, (args.batch, args.grid**2))
    tokens = args.batch * model.seq_len
    print(
        f"config: d_model={args.d_model} layers={args.layers} heads={args.heads} params={model.num_parameters() / 1e6:.2f}M "
        f"seq={model.seq_len} batch={args.batch} threads={torch.get_num_threads()} attention={args.attention}"
    )

    for prec in ("fp32",) + (() if args.skip_bf16 else ("bf16",)):

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                out = model.loss(text, image)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

        wall, cpu = timed(step, args.steps if prec == "fp32" else max(1, args.steps // 3))
        print(f"train {prec}: {tokens / wall:,.0f} tokens/s ({wall:.3f} s/step wall, {cpu:.3f} s/step process CPU)")

    if args.skip_sampling:
        return
    model.eval()
    st = text[: args.sample_batch]
    for cache in (True, False):
        scfg = SampleConfig(top_k=32, use_kv_cache=cache)
        wall, cpu = timed(lambda: sample_codes(model, st, scfg, torch.Generator().manual_seed(0)), 2)
        print(
            f"sample kv_cache={cache}: {args.sample_batch / wall:.2f} images/s ({wall:.2f} s per batch of {args.sample_batch} wall, {cpu:.2f} s CPU)"
        )
    scfg = SampleConfig(top_k=32, guidance_scale=3.0)
    wall, cpu = timed(lambda: sample_codes(model, st, scfg, torch.Generator().manual_seed(0)), 2)
    print(f"sample kv_cache=True guidance=3: {args.sample_batch / wall:.2f} images/s ({wall:.2f} s per batch wall)")


if __name__ == "__main__":
    main()
