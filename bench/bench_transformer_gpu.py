"""Transformer training throughput and MFU on a CUDA device, the paper's sequence (256 text + 32x32
image tokens) at a width that fits one GPU: the DALL-E layer pattern through the block-sparse
kernels against dense causal attention (SDPA flash).

One training step = forward, loss (paper weighting), backward, AdamW (fused) under bf16 autocast
with fp32 master weights. Reports tokens/s and MFU = 6 * N * tokens/s / peak, N the parameters
outside the embeddings (the usual 6N count leaves out attention's own FLOPs, which the sparse
layers cut; the attention FLOPs actually done are printed beside it).

    python bench/bench_transformer_gpu.py [--d-model 1024 --layers 12 --heads 16 --batch 8] [--peak-tflops 989]

Needs CUDA (exits 1 without).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 tensor-core peak (H100 SXM: 989)")
    ap.add_argument("--attention", nargs="+", default=["dalle", "dense"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_transformer_gpu: needs a CUDA device", file=sys.stderr)
        return 1
    from tessera.kernels.layouts import layer_layouts
    from tessera.trainer.config import TransformerModelConfig
    from tessera.trainer.transformer import DALLE

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, batch {args.batch}")
    for kind in args.attention:
        cfg = TransformerModelConfig(
            text_len=256,
            text_vocab=16384,
            image_grid=32,
            image_vocab=8192,
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=args.heads,
            attention=kind,
            conv_kernel=11,
        )
        torch.manual_seed(0)
        model = DALLE(cfg).to(dev)
        n_all = sum(p.numel() for p in model.parameters())
        n_emb = sum(
            p.numel() for n, p in model.named_parameters() if n.startswith(("text_emb", "text_pos", "image_emb", "image_row", "image_col"))
        )
        n = n_all - n_emb
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        b, s = args.batch, cfg.text_len + cfg.image_grid**2
        text = torch.randint(0, cfg.text_vocab, (b, cfg.text_len), device=dev)
        image = torch.randint(0, cfg.image_vocab, (b, cfg.image_grid**2), device=dev)

        def step(model=model, opt=opt, text=text, image=image):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(text, image)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        tps = b * s / dt
        mfu = 6 * n * tps / (args.peak_tflops * 1e12)
        pairs = sum(int(lay.mask().sum()) for lay in layer_layouts(cfg.n_layers, cfg.text_len, cfg.image_grid, cfg.conv_kernel, kind))
        attn_flops = 3 * 4 * (cfg.d_model // cfg.n_heads) * cfg.n_heads * pairs * b  # fwd 4*D per pair, fwd+bwd 3x
        print(
            f"{kind:6} params {n_all / 1e6:.1f}M ({n / 1e6:.1f}M outside embeddings): {dt * 1e3:.1f} ms/step, "
            f"{tps:,.0f} tokens/s, MFU(6N) {100 * mfu:.1f}%, attention {attn_flops / dt / 1e12:.1f} TFLOP/s useful, "
            f"loss {loss.item():.3f}, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        )
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
