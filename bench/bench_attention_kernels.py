"""Per-kernel times of the block-sparse attention (forward, dK/dV, dQ) and a sweep of their launch
settings, on a CUDA device: where the forward+backward time of bench_attention.py goes.

For each DALL-E layout at 256 text + 32x32 image tokens (64-dim heads, block 64) it times each of
the three Triton kernels alone for every (num_warps, num_stages) of the sweep, prints the best and
the current default, the time of the backward's small delta = rowsum(dO * O) kernel, and the
whole forward+backward through autograd with the defaults and with the best settings, beside dense
causal SDPA (flash).

    python bench/bench_attention_kernels.py [--batch 4 --heads 16 --dtype fp16] [--sweep]

Without --sweep only the defaults are timed. Needs CUDA (exits 1 without).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tessera.kernels import block_sparse_attention as A  # noqa: E402
from tessera.kernels.layouts import Layout  # noqa: E402

TEXT_LEN, GRID, CONV_KERNEL = 256, 32, 11
KINDS = {
    "row": Layout("row", TEXT_LEN, GRID, CONV_KERNEL),
    "column": Layout("column", TEXT_LEN, GRID, CONV_KERNEL, transposed=True),
    "conv": Layout("conv", TEXT_LEN, GRID, CONV_KERNEL),
    "causal": Layout("causal", TEXT_LEN, GRID, CONV_KERNEL),
}
SWEEP = [{"num_warps": w, "num_stages": s} for w, s in itertools.product((4, 8), (1, 2, 3, 4))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of the row layout's fwd+bwd")
    ap.add_argument(
        "--write-best", default=None, help="with --sweep: write the best setting per kernel (JSON) for bench_attention.py --launch-file"
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention_kernels: needs a CUDA device", file=sys.stderr)
        return 1
    import torch.nn.functional as F
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    b, h, d, blk = args.batch, args.heads, args.head_dim, args.block
    s = TEXT_LEN + GRID * GRID
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, s, d, device=dev, dtype=dtype, generator=g) for _ in range(4))
    scale = d**-0.5
    qk = scale * A._LOG2E
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    t_sdpa_f = bench(sdpa)
    t_sdpa = triton.testing.do_bench(lambda: sdpa().backward(do), warmup=10, rep=50, grad_to_none=[qg, kg, vg], return_mode="median")
    print(f"{torch.cuda.get_device_name()} {args.dtype} B={b} H={h} S={s} D={d} block {blk}")
    print(f"SDPA causal flash: fwd {t_sdpa_f:.3f} ms, fwd+bwd {t_sdpa:.3f} ms")

    totals: dict[str, dict[str, float]] = {}  # kernel -> setting -> summed ms over the layouts
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    for kind, lay in KINDS.items():
        idx = A.build_index(lay.mask(dev), blk)
        sp, nb = idx.padded_len, idx.n_blocks
        grid = (nb, b * h)
        out = torch.empty_like(q)
        lse = torch.empty(b * h, sp, device=dev, dtype=torch.float32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty(b * h, sp, device=dev, dtype=torch.float32)
        launches = {
            "fwd": lambda o: A._bsa_fwd_kernel[grid](
                q,
                k,
                v,
                out,
                lse,
                idx.mask_i8,
                idx.row_ptr,
                idx.col_idx,
                idx.row_partial,
                qk,
                s,
                sp,
                BLOCK=blk,
                HEAD_DIM=d,
                PREC="tf32",
                **o,
            ),
            "dkdv": lambda o: A._bsa_bwd_dkdv_kernel[grid](
                q,
                k,
                v,
                do,
                lse,
                delta,
                dk,
                dv,
                idx.mask_i8_t,
                idx.col_ptr,
                idx.row_idx,
                idx.col_partial,
                scale,
                qk,
                s,
                sp,
                BLOCK=blk,
                HEAD_DIM=d,
                PREC="tf32",
                **o,
            ),
            "dq": lambda o: A._bsa_bwd_dq_kernel[grid](
                q,
                k,
                v,
                do,
                lse,
                delta,
                dq,
                idx.mask_i8,
                idx.row_ptr,
                idx.col_idx,
                idx.row_partial,
                scale,
                qk,
                s,
                sp,
                BLOCK=blk,
                HEAD_DIM=d,
                PREC="tf32",
                **o,
            ),
        }
        launches["fwd"](A._launch_opts("fwd", blk, d))  # lse for the backward kernels
        delta_launch = lambda: A._bsa_bwd_delta_kernel[grid](
            out, do, delta, s, sp, BLOCK=blk, HEAD_DIM=d, **A._launch_opts("delta", blk, d)
        )  # noqa: E731
        delta_launch()
        line = [f"{kind:7} nnz {idx.nnz_blocks:3d}  delta {bench(delta_launch):.3f}"]
        for name, launch in launches.items():
            default = A._launch_opts(name, blk, d)
            t_def = bench(lambda: launch(default))
            best, t_best = default, t_def
            for o in SWEEP if args.sweep else []:
                try:
                    t = bench(lambda: launch(o))
                except Exception as exc:  # out of resources for this setting: skip it
                    print(f"  {kind} {name} {o}: {type(exc).__name__}")
                    continue
                key = f"w{o['num_warps']}s{o['num_stages']}"
                totals.setdefault(name, {})[key] = totals.get(name, {}).get(key, 0.0) + t
                if t < t_best:
                    best, t_best = o, t
            line.append(f"{name} {t_def:.3f} (best {t_best:.3f} w{best['num_warps']}s{best['num_stages']})")
        print("  ".join(line))
        t_full = triton.testing.do_bench(
            lambda: A.block_sparse_attention(qq, kk, vv, idx, block=blk).backward(do),
            warmup=10,
            rep=50,
            grad_to_none=[qq, kk, vv],
            return_mode="median",
        )
        print(f"  {kind} fwd+bwd through autograd: {t_full:.3f} ms (SDPA causal {t_sdpa:.3f})")
        if args.profile and kind == "row":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    A.block_sparse_attention(qq, kk, vv, idx, block=blk).backward(do)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10))
    best_settings = {}
    for name, by in totals.items():
        ranked = sorted(by.items(), key=lambda kv: kv[1])
        print(f"sweep {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ranked[:4]) + f" (sum over {len(KINDS)} layouts, ms)")
        w, st = ranked[0][0][1:].split("s")
        best_settings[f"{name},{blk},{d}"] = {"num_warps": int(w), "num_stages": int(st)}
    if args.write_best and best_settings:
        import json

        Path(args.write_best).write_text(json.dumps(best_settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
