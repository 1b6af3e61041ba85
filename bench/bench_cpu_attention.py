"""Lever study (issue 17): block-sparse attention on the CPU, in torch, against the dense masked attention it would replace.

The transformer's CPU path (`tessera.kernels.attention.attention`) runs torch's fused scaled-dot-product attention over
all S x S pairs with the layer's boolean mask. The row / column / conv masks allow few of them (at the demo's 16 text +
16x16 image tokens, 3-4 key tiles of 16 per query tile out of 17), so a tiled version could skip most of the work:
split the queries into tiles of `b`, gather for each query tile the key / value tiles its mask touches (padded to the
largest count), and run the same fused attention per tile with the tile's token mask. Forward + backward wall time
per layer, fp32, the demo's shapes (batch 32, 4 heads of 32).

    python bench/bench_cpu_attention.py [--text-len 16] [--grid 16] [--conv-kernel 5] [--batch 32] [--tiles 8,16,32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tessera.kernels.attention import attention  # noqa: E402
from tessera.kernels.layouts import layer_layouts  # noqa: E402


def tile_index(mask: torch.Tensor, b: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(tiles, key tiles per query tile m, key tile ids long[nb, m], token mask bool[nb, b, m*b]) of a bool [S, S] mask."""
    s = mask.shape[0]
    nb = -(-s // b)
    padded = torch.zeros(nb * b, nb * b, dtype=torch.bool)
    padded[:s, :s] = mask
    tiles = padded.view(nb, b, nb, b)
    touched = tiles.any(3).any(1)
    m = int(touched.sum(1).max())
    ids = torch.zeros(nb, m, dtype=torch.long)
    valid = torch.zeros(nb, m, dtype=torch.bool)
    for i in range(nb):
        cols = touched[i].nonzero().flatten()
        ids[i, : len(cols)], valid[i, : len(cols)] = cols, True
    tok = tiles[torch.arange(nb)[:, None], :, ids] & valid[:, :, None, None]  # [qi, j, qr, kc]
    return nb, m, ids, tok.permute(0, 2, 1, 3).reshape(nb, b, m * b)


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index, b: int) -> torch.Tensor:
    nb, m, ids, tok = index
    bsz, h, s, d = q.shape
    if nb * b != s:
        q, k, v = (F.pad(t, (0, 0, 0, nb * b - s)) for t in (q, k, v))
    kg = k.view(bsz, h, nb, b, d)[:, :, ids].reshape(bsz, h * nb, m * b, d)
    vg = v.view(bsz, h, nb, b, d)[:, :, ids].reshape(bsz, h * nb, m * b, d)
    y = F.scaled_dot_product_attention(q.reshape(bsz, h * nb, b, d), kg, vg, attn_mask=tok.repeat(h, 1, 1))
    return y.view(bsz, h, nb * b, d)[:, :, :s]


def fwd_bwd_ms(fn, repeats: int = 5) -> float:
    for _ in range(2):
        fn().sum().backward()
    t = time.perf_counter()
    for _ in range(repeats):
        fn().sum().backward()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--conv-kernel", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--tiles", default="8,16,32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| layer | tile | key tiles per query tile | max error | dense ms | tiled ms |\n|---|---|---|---|---|---|")
    for lay in {
        lay.kind: lay for lay in layer_layouts(4, args.text_len, args.grid, args.conv_kernel, "dalle")
    }.values():  # row, column, conv
        mask = lay.mask()
        q, k, v = (torch.randn(args.batch, args.heads, mask.shape[0], args.head_dim, requires_grad=True) for _ in range(3))
        dense = fwd_bwd_ms(lambda: attention(q, k, v, mask))
        for b in (int(x) for x in args.tiles.split(",")):
            index = tile_index(mask, b)
            err = (tiled_attention(q, k, v, index, b) - attention(q, k, v, mask)).abs().max().item()
            tiled = fwd_bwd_ms(lambda: tiled_attention(q, k, v, index, b))
            name = lay.kind + (" (transposed)" if lay.transposed else "")
            print(f"| {name} | {b} | {index[1]} of {index[0]} | {err:.1e} | {dense:.1f} | {tiled:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
