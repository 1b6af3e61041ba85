"""Transformer training throughput and MFU on a CUDA device, the paper's sequence (256 text + 32x32
image tokens) at a width that fits one GPU: the DALL-E layer pattern through the block-sparse
kernels against dense causal attention (SDPA flash).

One training step = forward, loss (paper weighting), backward, AdamW (fused), fp32 master weights,
under autocast in one of:
  * bf16 (`--precision bf16`, the default);
  * fp16 with one global dynamic loss scale (`--precision fp16`, torch.amp.GradScaler);
  * fp16 with per-resblock gradient scales (`--precision fp16 --per-resblock`,
    tessera.trainer.grad_scale.wrap_resblocks: one scale per resblock, the logits heads in fp32,
    `unscale_()` after backward and the optimizer step only when `update()` allows it).

Reported per attention kind: ms/step, tokens/s and two MFU figures against `--peak-tflops`:
  * MFU = (matmul FLOPs + attention FLOPs of the allowed (query, key) pairs) / time / peak, where the
    matmul FLOPs are 6 per parameter per token it multiplies (the resblocks' parameters on every
    token, the text head on the text positions it predicts, the image head on the image positions;
    embeddings are lookups and count nothing) and the attention FLOPs are 3 (forward + backward)
    x 4 x d_model per allowed pair of each layer's layout (QK^T and PV), summed over the layers:
    what the sparse layers skip is not counted as work done;
  * MFU(6N) = 6 * N * tokens/s / peak, N the parameters outside the embeddings (the usual count,
    no attention FLOPs).

The data are `--data-batches` fixed batches of random tokens, cycled: the loss can fall only by
memorising them, which is what `--check-training` asks for (the loss finite, the mean of the last
10 losses below that of the first 10, and fewer than 10% of the updates skipped; prints PASS or
FAIL and exits 1 on FAIL). `--log-every N` prints the loss, the min/max gradient scale and the
skipped updates every N steps.

    python bench/bench_transformer_gpu.py [--d-model 1024 --layers 12 --heads 16 --batch 8] [--peak-tflops 989]
    python bench/bench_transformer_gpu.py --d-model 2048 --layers 20 --heads 16 --precision fp16 --per-resblock
    python bench/bench_transformer_gpu.py --d-model 512 --layers 8 --heads 8 --attention dalle \\
        --precision fp16 --per-resblock --steps 200 --log-every 50 --check-training

Needs CUDA: without it, it exits 1 with a one-line message (`--device cpu` runs the same code at toy
sizes, for tests; its MFU is not printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

EMBEDDINGS = ("text_emb", "text_pos", "image_emb", "image_row", "image_col")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=13, help="training steps in all, the first --warmup of them untimed")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (compilation, allocator)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16/fp16 tensor-core peak (H100 SXM and H200: 989)")
    ap.add_argument("--attention", nargs="+", default=["dalle", "dense"], choices=["dalle", "dense"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="autocast dtype (fp32 master weights)")
    ap.add_argument("--per-resblock", action="store_true", help="fp16 only: per-resblock gradient scales instead of one global scale")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--data-batches", type=int, default=1, help="fixed random batches, cycled")
    ap.add_argument("--log-every", type=int, default=0, help="print loss, grad scales and skipped updates every N steps (0: never)")
    ap.add_argument("--check-training", action="store_true", help="PASS/FAIL: loss finite and fell, under 10%% of updates skipped")
    ap.add_argument("--target-mfu", type=float, default=0.0, help="also print PASS/FAIL against this MFU in percent (0: no target)")
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--grid", type=int, default=32, help="image tokens per side")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: toy sizes for tests only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.per_resblock and args.precision != "fp16":
        ap.error("--per-resblock needs --precision fp16")
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.check_training and args.steps < 20:
        ap.error("--check-training needs --steps >= 20 (it compares the first and last 10 losses)")
    if args.d_model % args.heads:
        ap.error(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    return args


def model_flops_per_sequence(model, cfg, layouts) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs of the allowed pairs) of one sequence's forward + backward."""
    s = cfg.text_len + cfg.image_grid**2
    block_params = sum(p.numel() for p in model.blocks.parameters())
    matmul = 6.0 * (
        block_params * s + model.text_head.weight.numel() * (cfg.text_len - 1) + model.image_head.weight.numel() * cfg.image_grid**2
    )
    pairs = sum(int(lay.mask().sum()) for lay in layouts)
    attention = 3.0 * 4.0 * cfg.d_model * pairs  # forward: QK^T and PV, 2 * head_dim each per pair and head; backward 2x
    return matmul, attention


class Trainer:
    """One model, its optimizer and its precision; `step(text, image)` -> (loss tensor, update applied or not tensor)."""

    def __init__(self, model, lr: float, precision: str, per_resblock: bool, device: torch.device):
        from tessera.trainer.grad_scale import wrap_resblocks

        self.model, self.device = model, device
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
        self.blocks = None
        self.amp = None
        if per_resblock:
            self.blocks = wrap_resblocks(model, model.blocks, fp32_modules=[model.text_head, model.image_head], replicas=1)
        elif precision == "fp16":
            self.amp = torch.amp.GradScaler(device.type)

    def step(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, bool]:
        with torch.autocast(self.device.type, dtype=self.dtype):
            loss = self.model.loss(text, image)["loss"]
        self.opt.zero_grad(set_to_none=True)
        if self.blocks is not None:
            loss.backward()
            self.blocks.unscale_()
            applied = self.blocks.update()
            if applied:
                self.opt.step()
        elif self.amp is not None:
            before = self.amp.get_scale()
            self.amp.scale(loss).backward()
            self.amp.step(self.opt)
            self.amp.update()
            applied = self.amp.get_scale() >= before
        else:
            loss.backward()
            self.opt.step()
            applied = True
        return loss.detach(), applied

    def scales(self) -> tuple[float, float, int]:
        """(min scale, max scale, skipped updates); one global scale counts as min = max."""
        if self.blocks is not None:
            m = self.blocks.metrics()
            return m["grad_scale/min"], m["grad_scale/max"], int(m["grad_scale/skipped"])
        if self.amp is not None:
            s = float(self.amp.get_scale())
            return s, s, -1
        return 1.0, 1.0, 0


def run_one(args, kind: str, dev: torch.device) -> tuple[bool, float]:
    """Train one model; returns (the training check passed or was not asked for, MFU in percent or nan)."""
    from tessera.kernels.layouts import layer_layouts
    from tessera.trainer.config import TransformerModelConfig
    from tessera.trainer.transformer import DALLE

    cfg = TransformerModelConfig(
        text_len=args.text_len,
        text_vocab=16384,
        image_grid=args.grid,
        image_vocab=8192,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        attention=kind,
        conv_kernel=11,
    )
    torch.manual_seed(args.seed)
    model = DALLE(cfg).to(dev)
    n_all = sum(p.numel() for p in model.parameters())
    n = n_all - sum(p.numel() for name, p in model.named_parameters() if name.startswith(EMBEDDINGS))
    trainer = Trainer(model, args.lr, args.precision, args.per_resblock, dev)
    b, s = args.batch, cfg.text_len + cfg.image_grid**2
    g = torch.Generator().manual_seed(args.seed + 1)
    data = [
        (
            torch.randint(0, cfg.text_vocab, (b, cfg.text_len), generator=g).to(dev),
            torch.randint(0, cfg.image_vocab, (b, cfg.image_grid**2), generator=g).to(dev),
        )
        for _ in range(args.data_batches)
    ]
    cuda = dev.type == "cuda"
    losses, skipped = [], 0
    t0 = time.perf_counter()
    for i in range(args.steps):
        if i == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss, applied = trainer.step(*data[i % len(data)])
        losses.append(loss)
        skipped += 0 if applied else 1
        if args.log_every and ((i + 1) % args.log_every == 0 or i == 0):
            lo, hi, sk = trainer.scales()
            print(f"  {kind} step {i + 1:4d}  loss {loss.item():.4f}  scale min {lo:.4g} max {hi:.4g}  skipped {skipped}", flush=True)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / (args.steps - args.warmup)
    tps = b * s / dt
    matmul, attn = model_flops_per_sequence(model, cfg, layer_layouts(cfg.n_layers, cfg.text_len, cfg.image_grid, cfg.conv_kernel, kind))
    mfu = 100 * (matmul + attn) * b / dt / (args.peak_tflops * 1e12) if cuda else float("nan")
    mfu_6n = 100 * 6 * n * tps / (args.peak_tflops * 1e12) if cuda else float("nan")
    loss_all = torch.stack(losses).float().cpu()
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    mfu_text = f"MFU {mfu:.1f}% (6 x params x tokens + allowed-pair attention), MFU(6N) {mfu_6n:.1f}%, " if cuda else ""
    print(
        f"{kind:6} params {n_all / 1e6:.1f}M ({n / 1e6:.1f}M outside embeddings): {dt * 1e3:.1f} ms/step, {tps:,.0f} tokens/s, "
        f"{mfu_text}attention {attn * b / dt / 1e12:.1f} TFLOP/s on allowed pairs, loss {loss_all[-1].item():.3f}, "
        f"skipped {skipped}/{args.steps}, peak memory {memory:.1f} GiB",
        flush=True,
    )
    ok = True
    if args.check_training:
        k = 10
        first, last = loss_all[:k].mean().item(), loss_all[-k:].mean().item()
        finite = bool(torch.isfinite(loss_all).all())
        few_skips = skipped < 0.1 * args.steps
        ok = finite and last < first and few_skips
        print(
            f"{'PASS' if ok else 'FAIL'} training check ({kind}, {args.precision}{' per-resblock' if args.per_resblock else ''}): "
            f"losses finite {finite}, mean of first {k} {first:.4f} -> last {k} {last:.4f} (fell {last < first}), "
            f"skipped {skipped}/{args.steps} (< 10%: {few_skips})",
            flush=True,
        )
    if args.target_mfu and cuda:
        print(f"{'PASS' if mfu >= args.target_mfu else 'FAIL'} MFU target {args.target_mfu:.0f}% ({kind}): {mfu:.1f}%", flush=True)
    if trainer.blocks is not None:
        trainer.blocks.remove()
    del model, trainer
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return ok, mfu


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_transformer_gpu: needs a CUDA device (none found; --device cpu runs toy sizes for tests)", file=sys.stderr)
        return 1
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name()
    else:
        name = "cpu"
    scaling = " per-resblock scales" if args.per_resblock else (" global loss scale" if args.precision == "fp16" else "")
    print(
        f"{name}, torch {torch.__version__}, {args.precision} autocast{scaling}, batch {args.batch}, "
        f"d_model {args.d_model}, {args.layers} layers, {args.heads} heads, {args.text_len} text + {args.grid}x{args.grid} image tokens, "
        f"{args.steps} steps ({args.warmup} untimed), peak {args.peak_tflops:g} TFLOP/s",
        flush=True,
    )
    ok = True
    for kind in args.attention:
        passed, _ = run_one(args, kind, dev)
        ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
