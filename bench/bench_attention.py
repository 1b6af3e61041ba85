"""Block-sparse attention benchmark: the paper's layouts at 256 text + 32x32 image tokens, 64-dim heads.

For each layer kind (row, column on transposed states, conv 11x11; causal as the dense baseline)
it prints the block-level ceiling computed from the layouts (non-empty tiles of the dense causal
layout over those of the layer's layout: the most a kernel that skips empty tiles can gain over a
dense causal one) and the floors (useful FLOPs, bytes). On a CUDA device it then times forward and
forward+backward of
  - `block_sparse_attention` (kernels/block_sparse_attention.py),
  - torch SDPA, dense causal, flash backend (what the layer would cost without sparsity),
  - FlexAttention with a block mask built from the same token mask,
and reports TFLOP/s counting only unmasked (query, key) pairs, and the speedup over SDPA causal
beside the ceiling.

    python bench/bench_attention.py [--batch 4 --heads 16 --block 64 --dtype fp16]
    python bench/bench_attention.py --ceilings-only   # CPU: layouts and floors only

Without CUDA it prints the ceilings and exits 1 with a message: Triton's CPU interpreter runs the
kernels with numpy and says nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tessera.kernels.layouts import Layout, dense_over_sparse  # noqa: E402

TEXT_LEN, GRID, CONV_KERNEL = 256, 32, 11  # paper: 256 BPE tokens + 32x32 image tokens (Sec. 2.2)
LAYOUTS = {
    "row": Layout("row", TEXT_LEN, GRID, CONV_KERNEL),
    "column": Layout("column", TEXT_LEN, GRID, CONV_KERNEL, transposed=True),
    "conv": Layout("conv", TEXT_LEN, GRID, CONV_KERNEL),
    "causal": Layout("causal", TEXT_LEN, GRID, CONV_KERNEL),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def ceilings(block: int, flex_block: int = 128) -> list[dict]:
    from tessera.kernels.block_sparse_attention import build_index

    rows = []
    for name, lay in LAYOUTS.items():
        mask = lay.mask()
        idx = build_index(mask, block)
        rows.append(
            {
                "kind": name,
                "seq_len": lay.seq_len,
                "density": mask.float().mean().item(),
                "blocks": idx.nnz_blocks,
                "partial_blocks": int(idx.partial.sum()),
                "ceiling": dense_over_sparse(mask, block),
                "ceiling_flex": dense_over_sparse(mask, flex_block),
                "block_efficiency": idx.allowed_pairs / (idx.nnz_blocks * block * block),
                "allowed_pairs": idx.allowed_pairs,
            }
        )
    return rows


def floors(allowed_pairs: int, s: int, b: int, h: int, d: int, elem: int = 2) -> dict:
    """Useful FLOPs (4*D per allowed pair forward, 2.5x that backward) and the bytes a kernel must
    move at least (read q, k, v, write o; backward also reads o, dO, writes dq, dk, dv)."""
    fwd = 4 * d * allowed_pairs * b * h
    tensor_bytes = b * h * s * d * elem
    return {"fwd_flops": fwd, "fwdbwd_flops": 3.5 * fwd, "fwd_bytes": 4 * tensor_bytes, "fwdbwd_bytes": 4 * tensor_bytes + 8 * tensor_bytes}


def print_ceilings(args) -> list[dict]:
    rows = ceilings(args.block)
    print(f"layouts at S = {TEXT_LEN} + {GRID}x{GRID} = {TEXT_LEN + GRID * GRID}, block {args.block} (FlexAttention ceiling at block 128)")
    print(
        f"{'kind':8} {'density':>8} {'blocks':>7} {'partial':>8} {'useful/computed':>16} {'ceiling':>8} {'ceil@128':>9} "
        f"{'fwd GFLOP':>10} {'fwd+bwd GFLOP':>14} {'fwd MB':>7}"
    )
    for r in rows:
        f = floors(r["allowed_pairs"], r["seq_len"], args.batch, args.heads, args.head_dim)
        print(
            f"{r['kind']:8} {r['density']:8.4f} {r['blocks']:7d} {r['partial_blocks']:8d} {r['block_efficiency']:16.3f} "
            f"{r['ceiling']:7.2f}x {r['ceiling_flex']:8.2f}x {f['fwd_flops'] / 1e9:10.2f} {f['fwdbwd_flops'] / 1e9:14.2f} "
            f"{f['fwd_bytes'] / 1e6:7.1f}"
        )
    print(
        f"(FLOPs/bytes for batch {args.batch} x {args.heads} heads x {args.head_dim} dims; 'useful/computed' = allowed pairs "
        "over pairs in non-empty tiles)"
    )
    return rows


def bench_gpu(args, rows):
    import torch.nn.functional as F
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from tessera.kernels.block_sparse_attention import block_sparse_attention, build_index

    dev = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    b, h, d = args.batch, args.heads, args.head_dim
    s = TEXT_LEN + GRID * GRID
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(b, h, s, d, device=dev, dtype=dtype, generator=gen)
    flex = torch.compile(flex_attention, dynamic=False)

    def timed(fn):
        fwd = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

        def fb():
            fn().backward(do)

        both = triton.testing.do_bench(fb, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
        return fwd, both

    def sdpa_causal():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    causal_pairs = next(r["allowed_pairs"] for r in rows if r["kind"] == "causal")
    base_fwd, base_both = timed(sdpa_causal)
    fc = floors(causal_pairs, s, b, h, d)
    print(f"\n{torch.cuda.get_device_name()} {args.dtype}, B={b} H={h} S={s} D={d}, block {args.block}")
    print(
        f"SDPA causal (flash): fwd {base_fwd:.3f} ms ({fc['fwd_flops'] / base_fwd / 1e9:.1f} TFLOP/s), "
        f"fwd+bwd {base_both:.3f} ms ({fc['fwdbwd_flops'] / base_both / 1e9:.1f} TFLOP/s)"
    )
    print(f"{'kind':8} {'impl':12} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'speedup fwd+bwd':>16} {'ceiling':>8}")
    for r in rows:
        mask = LAYOUTS[r["kind"]].mask(dev)
        f = floors(r["allowed_pairs"], s, b, h, d)
        index = build_index(mask, args.block)
        block_mask = create_block_mask(lambda bb, hh, qi, ki: mask[qi, ki], None, None, s, s, device=dev)
        impls = {
            "block-sparse": lambda: block_sparse_attention(q, k, v, index, block=args.block),
            "flex": lambda: flex(q, k, v, block_mask=block_mask),
        }
        for name, fn in impls.items():
            try:
                t_fwd, t_both = timed(fn)
            except Exception as exc:  # report and go on: one failing implementation should not hide the rest
                print(f"{r['kind']:8} {name:12} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                continue
            ceil = r["ceiling"] if name == "block-sparse" else r["ceiling_flex"]
            print(
                f"{r['kind']:8} {name:12} {t_fwd:8.3f} {f['fwd_flops'] / t_fwd / 1e9:8.1f} {t_both:11.3f} "
                f"{f['fwdbwd_flops'] / t_both / 1e9:8.1f} {base_both / t_both:15.2f}x {ceil:7.2f}x"
            )


def bench_cpu_reference(args, rows):
    """Times of the torch reference on CPU (fp32, batch 1, 1 head): for orientation only."""
    import time

    from tessera.kernels.block_sparse_attention import block_sparse_attention_reference

    s = TEXT_LEN + GRID * GRID
    q, k, v = (torch.randn(1, 1, s, args.head_dim, requires_grad=True) for _ in range(3))
    print(
        f"\nCPU torch reference (fp32, B=1, H=1, S={s}, D={args.head_dim}, {torch.get_num_threads()} threads): "
        "dense masked math, same cost for every layout"
    )
    for r in rows:
        mask = LAYOUTS[r["kind"]].mask()
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            block_sparse_attention_reference(q, k, v, mask).sum().backward()
            best = min(best, time.perf_counter() - t0)
        print(f"{r['kind']:8} fwd+bwd {best * 1e3:8.2f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64, choices=[64, 128])
    ap.add_argument("--block", type=int, default=64, choices=[32, 64, 128])
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--ceilings-only", action="store_true", help="print layouts, ceilings and floors, no timing")
    ap.add_argument("--cpu-reference", action="store_true", help="also time the torch reference on CPU")
    ap.add_argument(
        "--launch-file", default=None, help="JSON of launch settings per 'kernel,block,head_dim' (bench_attention_kernels.py --write-best)"
    )
    args = ap.parse_args(argv)
    rows = print_ceilings(args)
    if args.cpu_reference:
        bench_cpu_reference(args, rows)
    if args.ceilings_only:
        return 0
    if not torch.cuda.is_available():
        print(
            "\nbench_attention: no CUDA device. Kernel timings need a GPU; Triton's CPU interpreter "
            "(TRITON_INTERPRET=1) runs kernels with numpy and is not a speed measure. "
            "Use --ceilings-only (or --cpu-reference) on CPU.",
            file=sys.stderr,
        )
        return 1
    if args.launch_file:
        import json

        from tessera.kernels import block_sparse_attention as A

        for key, opts in json.loads(Path(args.launch_file).read_text()).items():
            name, blk, hd = key.split(",")
            A.LAUNCH[(name, int(blk), int(hd))] = opts
        print(f"launch settings from {args.launch_file}: {json.loads(Path(args.launch_file).read_text())}")
    bench_gpu(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
