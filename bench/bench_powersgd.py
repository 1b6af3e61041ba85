"""PowerSGD benchmark: compression/decompression compute, ours vs torch's powerSGD_hook, same matrices and rank.

Two measurements:
  1. kernels (CUDA only): compress = P = M Q, orthogonalize(P), Q = M^T P; decompress = P Q^T with
     the error update; the Triton kernels of kernels/powersgd.py against their torch references,
     batched over N equal matrices, with the floor (FLOPs, bytes) of each.
  2. end to end, one process (world size 1, so communication is free and what remains is the
     compression compute): a DDP backward over parameters of those shapes with
       - the default all-reduce hook (baseline),
       - torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook (Gram-Schmidt, torch ops),
       - tessera.cluster.powersgd.ddp_comm_hook (Householder + eps*I; Triton on CUDA, torch on CPU),
     reporting each hook's time over the baseline.

    python bench/bench_powersgd.py [--n 8 --m 4096 --cols 4096 --rank 4]
    python bench/bench_powersgd.py --cpu      # CPU: the end-to-end comparison at small sizes

Without CUDA and without --cpu it exits 1 with a message: Triton's CPU interpreter is not a
speed measure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tessera.cluster.dist import free_port  # noqa: E402
from tessera.cluster.powersgd import PowerSGDReducer, compression_floor, ddp_comm_hook  # noqa: E402


def _time_ms(fn, cuda: bool, reps: int = 10) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=100)
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def print_floor(args) -> dict:
    f = compression_floor(args.m, args.cols, args.rank)
    flops, bytes_ = f["flops"] * args.n, f["bytes"] * args.n
    t_floor = max(flops / (args.peak_tflops * 1e12), bytes_ / (args.bandwidth_tbs * 1e12)) * 1e3
    print(
        f"{args.n} matrices of {args.m}x{args.cols}, rank {args.rank}: sends {f['sent_elements'] * args.n / 1e6:.2f} M "
        f"elements instead of {f['dense_elements'] * args.n / 1e6:.1f} M ({f['dense_elements'] / f['sent_elements']:.0f}x less)"
    )
    print(
        f"floor per step: {flops / 1e9:.2f} GFLOP, {bytes_ / 1e9:.2f} GB (5 passes over fp32 M) -> "
        f"{t_floor:.3f} ms at {args.peak_tflops} TFLOP/s fp32 and {args.bandwidth_tbs} TB/s (assumed peaks)"
    )
    return {"flops": flops, "bytes": bytes_, "t_floor_ms": t_floor}


def bench_kernels(args):
    from tessera.kernels import powersgd as K

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    M = torch.randn(args.n, args.m, args.cols, device=dev, generator=g)
    Q0 = torch.randn(args.n, args.cols, args.rank, device=dev, generator=g)
    err = torch.empty_like(M)
    out = torch.empty_like(M)
    print(f"\nkernels on {torch.cuda.get_device_name()} (fp32 M)")
    for name, (proj, orth, dec) in {
        "triton": (K.project, K.orthogonalize, K.decompress_with_error),
        "torch": (K.project_reference, K.orthogonalize_reference, K.decompress_with_error_reference),
    }.items():
        P = proj(M, Q0)
        t_p = _time_ms(lambda: proj(M, Q0), True)
        t_o = _time_ms(lambda: orth(P.clone()), True)
        t_q = _time_ms(lambda: proj(M, P, transpose=True), True)
        Q = proj(M, P, transpose=True)
        t_d = _time_ms(lambda: dec(M, P, Q, out=out, error=err), True)
        gbytes = M.numel() * 4 / 1e9
        print(
            f"{name:7} P=MQ {t_p:7.3f} ms ({gbytes / t_p:6.1f} TB/s)  orth {t_o:7.3f} ms  Q=M^TP {t_q:7.3f} ms "
            f"({gbytes / t_q:6.1f} TB/s)  decompress+error {t_d:7.3f} ms ({3 * gbytes / t_d:6.1f} TB/s)  "
            f"total {t_p + t_o + t_q + t_d:7.3f} ms"
        )


class _Params(torch.nn.Module):
    def __init__(self, n, m, cols):
        super().__init__()
        self.ws = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(m, cols) * 0.01) for _ in range(n)])

    def forward(self, x):  # x [m, cols]: each gradient is x (a full-rank, dense gradient)
        return sum((w * x).sum() for w in self.ws)


def bench_hooks(args, cuda: bool):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    dev = torch.device("cuda" if cuda else "cpu")
    x = torch.randn(args.m, args.cols, device=dev)
    results = {}

    def make(hook_name):
        model = _Params(args.n, args.m, args.cols).to(dev)
        ddp = DDP(model, device_ids=[0] if cuda else None)
        if hook_name == "torch powerSGD_hook":
            state = torch_psgd.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=args.rank,
                start_powerSGD_iter=2,
                min_compression_rate=2,
                orthogonalization_epsilon=1e-6,
                batch_tensors_with_same_shape=True,
            )
            ddp.register_comm_hook(state, torch_psgd.powerSGD_hook)
        elif hook_name == "tessera reducer":
            ddp.register_comm_hook(PowerSGDReducer(rank=args.rank), ddp_comm_hook)
        else:
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        return ddp

    names = ("allreduce (baseline)", "torch powerSGD_hook", "tessera reducer")
    steps = {}
    for name in names:
        ddp = make(name)

        def step(ddp=ddp):
            ddp.zero_grad(set_to_none=False)
            ddp(x).backward()

        for _ in range(3):  # past torch's start_powerSGD_iter, warm-started Q and error buffers exist
            step()
        steps[name] = step
    for _ in range(3):  # interleaved rounds, best of all: less sensitive to a busy machine
        for name in names:
            t = _time_ms(steps[name], cuda, reps=args.reps)
            results[name] = min(results.get(name, float("inf")), t)
    dist.destroy_process_group()
    base = results["allreduce (baseline)"]
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nDDP backward, world size 1 ({where}): time per step and over the all-reduce baseline")
    for name, t in results.items():
        print(f"{name:22} {t:9.2f} ms  (+{t - base:8.2f} ms)")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="number of matrices of one shape")
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=67.0, help="fp32 (non-tensor-core) peak, H100 SXM")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35, help="memory bandwidth, H100 SXM")
    ap.add_argument("--cpu", action="store_true", help="run the end-to-end hook comparison on CPU (small sizes)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print(
            "bench_powersgd: no CUDA device. The Triton kernels need a GPU to be timed (Triton's CPU "
            "interpreter is not a speed measure); use --cpu for the torch-path hook comparison.",
            file=sys.stderr,
        )
        return 1
    if not cuda:
        args.n, args.m, args.cols = min(args.n, 4), min(args.m, 512), min(args.cols, 512)
    print_floor(args)
    if cuda:
        bench_kernels(args)
    bench_hooks(args, cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
