"""Lever study (issue 17): several dVAE tokens per transformer position, to shorten the sequence.

A finished `tessera demo --output DIR` gives the tokens, tokenizer, dVAE and CLIP. This trains, on DIR/tokens, a
transformer whose image positions each hold a BH x BW block of tokens: the position's input is the sum of one
embedding per (sub-position, code), and a small local head predicts the block's codes one after another from the
position's hidden state plus the embeddings of the block's earlier codes (a global model over blocks and a local
model within a block, as MEGABYTE does for bytes). 2x2 blocks keep a square 8x8 grid and the paper's row / column /
conv masks; other blocks (1x2: a 16x8 grid) use dense causal attention. The schedule is the demo's (AdamW, warm-up
25, cosine to 1e-4, batch 32, caption dropout 0.1, image loss weight 7). It then samples the demo's 18 prompts,
`candidates` per kept image at the export's sampling settings, keeps the best 4 per prompt by the export's CLIP, and
scores them with the detector, for `--seeds` sampling seeds.

    python bench/bench_block_tokens.py --demo-dir runs/demo --block 2x2 [--steps 560] [--lr 2e-3]
        [--local-layers 1] [--seeds 2] [--output DIR]

Compare with the demo's own transformer (same tokens, same steps): its image cross-entropy is in
DIR/transformer/metrics.jsonl, its top-4 scores from `bench/bench_rerank.py --demo-dir DIR --seeds N`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tessera import demo  # noqa: E402
from tessera.dataprep import synthetic  # noqa: E402
from tessera.trainer import inference  # noqa: E402
from tessera.trainer.sample import next_token  # noqa: E402
from tessera.trainer.token_data import TokenBatches  # noqa: E402
from tessera.trainer.transformer import DALLE  # noqa: E402


class Blocks:
    """Raster image codes (N, G*G) <-> blocks (N, P, K) of K = bh*bw codes at P = (G/bh)*(G/bw) positions."""

    def __init__(self, grid: int, bh: int, bw: int):
        if grid % bh or grid % bw:
            raise SystemExit(f"--block {bh}x{bw} does not divide the {grid}x{grid} token grid")
        self.g, self.bh, self.bw = grid, bh, bw
        self.gh, self.gw = grid // bh, grid // bw
        self.k, self.p = bh * bw, self.gh * self.gw

    def split(self, img: torch.Tensor) -> torch.Tensor:
        n = img.shape[0]
        return img.view(n, self.gh, self.bh, self.gw, self.bw).permute(0, 1, 3, 2, 4).reshape(n, self.p, self.k)

    def join(self, blk: torch.Tensor) -> torch.Tensor:
        n = blk.shape[0]
        return blk.view(n, self.gh, self.gw, self.bh, self.bw).permute(0, 1, 3, 2, 4).reshape(n, self.g, self.g)


class LocalHead(nn.Module):
    """logits of code k of a block from h + sub-position k + sum of the embeddings of codes j < k, then MLPs."""

    def __init__(self, d: int, k: int, vocab: int, layers: int):
        super().__init__()
        self.k, self.vocab = k, vocab
        self.prev = nn.Embedding(k * vocab, d)
        self.sub = nn.Embedding(k, d)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(layers)
        )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("earlier", torch.tril(torch.ones(k, k), -1))  # [k, j] = 1 where j < k

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.mlps:
            x = x + m(x)
        return self.head(self.ln(x))

    def forward(self, h: torch.Tensor, blk: torch.Tensor) -> torch.Tensor:
        """h (N, P, d), blk (N, P, K) (teacher forcing) -> logits (N, P, K, V)."""
        e = self.prev(blk + torch.arange(self.k) * self.vocab)
        return self._out(h.unsqueeze(2) + self.sub.weight + torch.einsum("kj,npjd->npkd", self.earlier, e))

    def step(self, h: torch.Tensor, prev: torch.Tensor, k: int) -> torch.Tensor:
        """h (N, d), prev (N, k) the block's codes so far -> logits of code k (N, V)."""
        x = h + self.sub.weight[k]
        if k:
            x = x + self.prev(prev + torch.arange(k) * self.vocab).sum(1)
        return self._out(x)


class BlockDALLE(nn.Module):
    def __init__(self, mcfg, blocks: Blocks, local_layers: int):
        super().__init__()
        square = blocks.gh == blocks.gw
        cfg = dataclasses.replace(
            mcfg, image_grid=blocks.gh if square else mcfg.image_grid, attention=mcfg.attention if square else "dense"
        )
        self.g, self.b, self.t, self.vocab = DALLE(cfg), blocks, cfg.text_len, mcfg.image_vocab
        self.in_emb = nn.Embedding(blocks.k * self.vocab, cfg.d_model)
        nn.init.normal_(self.in_emb.weight, std=0.02 / math.sqrt(blocks.k))
        self.local = LocalHead(cfg.d_model, blocks.k, self.vocab, local_layers)
        self.local.apply(DALLE._init_weights)
        self.register_buffer("rows", torch.arange(blocks.p) // blocks.gw)
        self.register_buffer("cols", torch.arange(blocks.p) % blocks.gw)

    def embed(self, blk: torch.Tensor, start: int = 0) -> torch.Tensor:
        idx = torch.arange(start, start + blk.shape[1])
        codes = blk + torch.arange(self.b.k) * self.vocab
        return self.in_emb(codes).sum(2) + self.g.image_row(self.rows[idx]) + self.g.image_col(self.cols[idx])

    def loss(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, float]:
        blk = self.b.split(image)
        x = torch.cat([self.g.embed_text(text), self.embed(blk)], 1)
        for block in self.g.blocks:
            x = block(x)
        h = self.g.ln_f(x)
        text_ce = F.cross_entropy(self.g.text_head(h[:, : self.t - 1]).flatten(0, 1), text[:, 1:].flatten())
        image_ce = F.cross_entropy(self.local(h[:, self.t - 1 : self.t - 1 + self.b.p], blk).reshape(-1, self.vocab), blk.flatten())
        return (text_ce + 7.0 * image_ce) / 8.0, image_ce.item()

    @torch.no_grad()
    def sample(self, text: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
        cache = self.g.new_cache(text.shape[0])
        h = self.g.step(self.g.embed_text(text), cache)[:, -1]
        blk = torch.zeros(text.shape[0], self.b.p, self.b.k, dtype=torch.long)
        for p in range(self.b.p):
            for k in range(self.b.k):
                blk[:, p, k] = next_token(self.local.step(h, blk[:, p, :k], k), cfg, gen)
            if p + 1 < self.b.p:
                h = self.g.step(self.embed(blk[:, p : p + 1], start=p), cache)[:, -1]
        return self.b.join(blk)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", required=True, type=Path)
    ap.add_argument("--block", default="2x2", help="BHxBW codes per position")
    ap.add_argument("--steps", type=int, default=560)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--local-layers", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None, help="write grid.png (seed 0's kept images) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = inference.load(args.demo_dir / "export")
    mcfg = pipe.transformer.cfg
    bh, bw = (int(x) for x in args.block.lower().split("x"))
    torch.manual_seed(0)
    model = BlockDALLE(mcfg, Blocks(mcfg.image_grid, bh, bw), args.local_layers)
    batches = TokenBatches(
        str(args.demo_dir / "tokens"),
        text_len=mcfg.text_len,
        text_vocab=mcfg.text_vocab,
        grid=mcfg.image_grid,
        batch_size=32,
        caption_dropout=0.1,
    )
    decay = [
        p
        for n, p in model.named_parameters()
        if p.dim() >= 2 and "emb" not in n and "prev" not in n and "sub" not in n and "image_" not in n
    ]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    warm, lr_min, t0, image_ce = 25, 1e-4, time.perf_counter(), float("nan")
    for s in range(args.steps):
        lr = (
            args.lr * (s + 1) / warm
            if s < warm
            else lr_min + 0.5 * (args.lr - lr_min) * (1 + math.cos(math.pi * (s - warm) / (args.steps - warm)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        loss, image_ce = model.loss(*next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s % 100 == 0:
            print(f"step {s} image CE {image_ce:.3f} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t0
    model.eval()

    scfg, keep = pipe.default_sample_config, 4
    prompts = demo.demo_prompts()
    caps = [synthetic.caption(a) for a in prompts]
    src = json.loads((args.demo_dir / "source" / "synthetic.json").read_text())
    n = keep * scfg.candidates
    draws = []
    for seed in range(args.seeds):
        gen, t1 = torch.Generator().manual_seed(seed), time.perf_counter()
        text = pipe.encode_prompts(caps).repeat_interleave(n, 0)
        images = pipe.decode(torch.cat([model.sample(text[i : i + 64], scfg, gen) for i in range(0, len(text), 64)]))
        sample_s = time.perf_counter() - t1
        kept = torch.cat(
            [
                images[i * n : (i + 1) * n][pipe.clip.score(images[i * n : (i + 1) * n], [c] * n).argsort(descending=True)[:keep]]
                for i, c in enumerate(caps)
            ]
        )
        if seed == 0 and args.output is not None:
            from tessera.dataprep.imaging import save_image_grid

            args.output.mkdir(parents=True, exist_ok=True)
            save_image_grid(kept, args.output / "grid.png", nrow=8)
        arr = (kept.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype("uint8")
        draws.append(demo._score_samples(arr, prompts, src, keep) | {"sample_s": round(sample_s, 1)})
    keys = ("color_acc", "shape_acc", "position_acc", "size_acc", "heldout_shape_acc")
    print(
        json.dumps(
            {
                "block": args.block,
                "steps": args.steps,
                "lr": args.lr,
                "local_layers": args.local_layers,
                "parameters": sum(p.numel() for p in model.parameters()),
                "s_per_update": round(train_s / args.steps, 3),
                "final_image_ce": round(image_ce, 3),
                "mean": {k: round(sum(d[k] for d in draws) / len(draws), 3) for k in keys},
                "draws": draws,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
