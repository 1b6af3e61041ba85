"""Gradient underflow in fp16: one global dynamic loss scale against per-resblock scales (paper App. D).

A deep, narrow pre-LN residual model (token embedding, `depth` resblocks x + g_l * mlp(ln(x)),
final norm, logits head; the head runs in fp32 in both cases) is compared on the same weights and
batches in three backward passes:

  * fp32: the reference gradients;
  * fp16 autocast, one global scale S (torch.amp.GradScaler semantics: the loss times S, every
    gradient divided by S before the step);
  * fp16 autocast, per-resblock scales s_i (tessera.trainer.grad_scale.wrap_resblocks).

Reported: the fraction of resblock parameter-gradient entries that are exactly zero in fp16 while
the fp32 reference is not (flushed to zero), for each scaling.

The branch gains g_l are fixed (LayerScale-style, Touvron et al. 2021), log-uniform from
2^gain_top for the first block to 2^(gain_top - gain_span) for the last. They stand in for what
depth and width do to a large model (the paper: the activation gradients of the later resblocks
fall below fp16's range): a toy's own gradients are nearly uniform over depth. Measured here with
gain_span 0 (depth 24, width 16), the largest gradient of the blocks spans only about 3-5 bits
over depth and neither scaling flushes anything (both fractions 0.0); a spread of gradient
magnitudes across blocks is what per-resblock scaling exists for, so the spread is made explicit.
Because of the layer norms, what counts is the ratio of the gains, not their level.

Which scales: what each rule settles at in a long run, found per batch by search, favouring the
global scale. GradScaler halves S on an overflow and doubles it after 2000 clean steps, so it
spends its time at the largest power of two whose backward has no Inf/NaN: S = 2^k*, the best
value it ever holds. A per-resblock scale grows by 2^(1/1000) per clean update and drops by sqrt(2)
when its block overflows, so it lives between t_i / sqrt(2) and t_i, t_i being the largest scale
at which block i has no overflow; s_i = clamp(t_i / sqrt(2), M 2^7, M 2^24) is taken, the bottom
of that band (t_i searched on a grid of 2^(1/4) steps).

    python bench/bench_grad_scale.py [--depth 48 --width 16 --batches 4 --gain-span 40 --gain-top 8]

Prints a JSON line with both fractions and the settings (the figures in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tessera.trainer.grad_scale import BACKOFF, keep_fp32, wrap_resblocks  # noqa: E402


class ResBlock(nn.Module):
    """x + gain * mlp(ln(x)), with a fixed LayerScale-style branch gain (Touvron et al. 2021)."""

    def __init__(self, width: int, gain: float = 1.0, ratio: int = 4):
        super().__init__()
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, ratio * width), nn.GELU(), nn.Linear(ratio * width, width))
        self.register_buffer("gain", torch.tensor(float(gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * self.mlp(self.ln_2(x))


class DeepNarrow(nn.Module):
    """Token embedding, `depth` pre-LN MLP resblocks, final norm, logits head (GPT-style initialisation).

    Block l's branch gain is 2^(gain_top - gain_span * l / (depth - 1)): 2^gain_top for the first
    block down to 2^(gain_top - gain_span) for the last; its parameter gradients scale with it."""

    def __init__(self, depth: int = 48, width: int = 16, vocab: int = 64, gain_span: float = 0.0, gain_top: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(ResBlock(width, 2.0 ** (gain_top - gain_span * i / max(depth - 1, 1))) for i in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def task_batch(step: int, batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: predict (3 t + 1) mod vocab from token t."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randint(0, vocab, (batch,), generator=g)
    return x, (3 * x + 1) % vocab


def pretrain(model: DeepNarrow, steps: int, batch: int, lr: float = 3e-3) -> list[float]:
    """fp32 AdamW updates (optional: to measure on trained rather than initial weights)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for s in range(steps):
        x, y = task_batch(s, batch, model.head.out_features)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def block_grads(model: DeepNarrow) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for b in model.blocks for p in b.parameters()])


def grads_fp32(model: DeepNarrow, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return block_grads(model)


def grads_global(model: DeepNarrow, x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, bool]:
    """fp16 autocast with the loss times `scale`; (unscaled block gradients, all gradients finite)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y)
    (loss * scale).backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    return block_grads(model) / scale, finite


def grads_per_block(model: DeepNarrow, scaler, x: torch.Tensor, y: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 autocast with per-block `scales`; (unscaled block gradients, finite flag per block)."""
    scaler.scales = scales.to(torch.float32)
    scaler.found = torch.zeros(scaler.n_blocks + 1)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    finite = scaler.unscale_()[:-1]
    scaler._finite = None  # measurement only: no update() is made
    return block_grads(model), finite


def flushed(ref: torch.Tensor, got: torch.Tensor) -> tuple[int, int]:
    """(entries zero in `got` but not in `ref`, entries not zero in `ref`)."""
    nz = ref != 0
    return int((nz & (got == 0)).sum()), int(nz.sum())


def global_equilibrium(model: DeepNarrow, x: torch.Tensor, y: torch.Tensor, max_log2: int = 40) -> int:
    """k*: the largest k with a finite backward at S = 2^k (GradScaler's resting value), by bisection."""
    lo, hi = 0, max_log2 + 1  # finite at 2^lo (assumed for lo = 0), overflow at 2^hi (or beyond the range)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if grads_global(model, x, y, 2.0**mid)[1] else (lo, mid)
    return lo


def per_block_equilibrium(model: DeepNarrow, scaler, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s_i = clamp(t_i / sqrt(2)), t_i the largest scale on a 2^(1/4) grid at which block i stays finite.

    All blocks are bisected at once (the filter at each block's boundary keeps one block's
    overflow out of the others' gradients)."""
    lo_b, hi_b = scaler.bounds
    n = scaler.n_blocks
    lo = torch.full((n,), 4 * math.log2(lo_b))  # finite there (assumed: nothing lower is allowed)
    hi = torch.full((n,), 4 * math.log2(hi_b) + 2)  # above the clamp: no need to look further
    while bool((hi - lo > 1).any()):
        mid = torch.where(hi - lo > 1, torch.div(lo + hi, 2, rounding_mode="floor"), lo)
        _, finite = grads_per_block(model, scaler, x, y, 2.0 ** (mid.double() / 4))
        open_ = hi - lo > 1
        lo = torch.where(open_ & finite, mid, lo)
        hi = torch.where(open_ & ~finite, mid, hi)
    s = (2.0 ** (lo.double() / 4) * BACKOFF).clamp(lo_b, hi_b)
    for _ in range(8):  # blocks interact a little (filtered neighbours); lower any that still overflows
        _, finite = grads_per_block(model, scaler, x, y, s)
        if bool(finite.all()):
            break
        s = torch.where(finite, s, (s * BACKOFF).clamp(lo_b, hi_b))
    return s


def measure(
    depth: int = 48,
    width: int = 16,
    vocab: int = 64,
    batch: int = 512,
    pretrain_steps: int = 0,
    batches: int = 4,
    gain_span: float = 40.0,
    gain_top: float = 8.0,
    seed: int = 0,
) -> dict:
    """The flushed-to-zero fractions of both scalings, summed over `batches` held-out batches."""
    torch.manual_seed(seed)
    model = DeepNarrow(depth, width, vocab, gain_span, gain_top)
    losses = pretrain(model, pretrain_steps, batch)
    keep_fp32([model.head])
    counts = {"global": [0, 0], "per_block": [0, 0]}
    log2_global, log2_blocks = [], []
    for b in range(batches):
        x, y = task_batch(1_000_000 + b, batch, vocab)
        ref = grads_fp32(model, x, y)
        k = global_equilibrium(model, x, y)
        log2_global.append(k)
        g, finite = grads_global(model, x, y, 2.0**k)
        assert finite
        for i, v in enumerate(flushed(ref, g)):
            counts["global"][i] += v
        scaler = wrap_resblocks(model, model.blocks, replicas=1)
        s = per_block_equilibrium(model, scaler, x, y)
        log2_blocks.append(torch.log2(s))
        g, finite = grads_per_block(model, scaler, x, y, s)
        scaler.remove()
        for i, v in enumerate(flushed(ref, g)):
            counts["per_block"][i] += v
    lb = torch.stack(log2_blocks).mean(0)
    return {
        "depth": depth,
        "width": width,
        "batch": batch,
        "gain_log2_first_last": [gain_top, gain_top - gain_span],
        "pretrain_steps": pretrain_steps,
        "pretrain_loss": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
        "batches": batches,
        "flushed_global": counts["global"][0] / max(counts["global"][1], 1),
        "flushed_per_block": counts["per_block"][0] / max(counts["per_block"][1], 1),
        "nonzero_ref_entries": counts["global"][1],
        "log2_global_scale": log2_global,
        "log2_block_scale_first_mid_last": [round(float(lb[0]), 2), round(float(lb[len(lb) // 2]), 2), round(float(lb[-1]), 2)],
        "log2_block_scale_min_max": [round(float(lb.min()), 2), round(float(lb.max()), 2)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=48)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--pretrain-steps", type=int, default=0, help="fp32 AdamW updates before measuring")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--gain-span", type=float, default=40.0, help="log2 of the first over the last block's branch gain")
    ap.add_argument("--gain-top", type=float, default=8.0, help="log2 of the first block's branch gain")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t = time.time()
    out = measure(
        a.depth,
        a.width,
        batch=a.batch,
        pretrain_steps=a.pretrain_steps,
        batches=a.batches,
        gain_span=a.gain_span,
        gain_top=a.gain_top,
        seed=a.seed,
    )
    out["seconds"] = round(time.time() - t, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
