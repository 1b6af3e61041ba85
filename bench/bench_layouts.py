"""Tokens/s and MFU of the demo's transformer in each layout, on CPU gloo: one process, DDP, DeepSpeed ZeRO-2 and the
paper's sharded layout (FSDP2 within groups, PowerSGD rank 4 across) as 1 group of 2 and as 2 groups of 1.

    python bench/bench_layouts.py [steps]          # on a quiet machine; the figures go to bench/results/layouts.md

Each layout runs in fresh processes (one per rank, torchrun's variables) on the same global batch of 8
sequences of the demo's shape (16 text + 16x16 image tokens, d_model 128, 4 layers: row, column, row,
conv), after two untimed updates. The machine's 2 cores are shared: one process runs 2 threads, two
ranks 1 thread each, so every layout has the same cores and the multi-rank figures show the layouts'
overheads, not scaling.

MFU = model FLOPs / time / peak:
  * model FLOPs per sequence = 6 x (parameters outside the embeddings) x tokens for the matrix products,
    plus 3 (forward + backward) x 4 x d_model per allowed (query, key) pair of each layer's attention
    pattern (QK^T and PV; tessera.cluster.plan_model.attention_pairs counts the unmasked pairs only,
    so what the sparse layers skip is not counted as work done);
  * peak = this machine's fp32 matmul rate at 2 threads (2048 x 2048 x 2048, best of 5), measured
    here first.
Also printed: the bytes each rank hands to collectives per update across groups (sharded layouts).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BATCH = 8
STEPS = 10
# (name, world, engine, ranks_per_node, powersgd rank)
LAYOUTS = [
    ("single", 1, "plain", 0, 0),
    ("ddp 2", 2, "ddp", 0, 0),
    ("zero-2 2", 2, "zero2", 0, 0),
    ("sharded 1x2 r4", 2, "sharded", 2, 4),
    ("sharded 2x1 r4", 2, "sharded", 1, 4),
]


def model_cfg():
    from tessera.trainer.config import TransformerModelConfig

    return TransformerModelConfig(
        text_len=16, text_vocab=256, image_grid=16, image_vocab=512, d_model=128, n_layers=4, n_heads=4, conv_kernel=5
    )


def flops_per_sequence(model, cfg) -> tuple[float, float]:
    """(matmul FLOPs, allowed-pair attention FLOPs) of one sequence's forward + backward."""
    from tessera.cluster.plan_model import attention_pairs

    emb = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False))
    n = sum(p.numel() for p in model.parameters()) - emb
    s = cfg.text_len + cfg.image_grid**2
    pairs, _ = attention_pairs(cfg)
    return 6.0 * n * s, 3.0 * 4.0 * cfg.d_model * pairs


def peak_flops(threads: int = 2, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an fp32 n^3 matmul at `threads` threads on this CPU, best of `repeats` (bench_demo_flops' probe)."""
    from bench_demo_flops import matmul_peak  # a sibling script: bench/ is sys.path[0] when either runs

    torch.set_num_threads(threads)
    return matmul_peak(torch.float32, n, repeats)


def _engine(kind: str, model, dist, ranks_per_node: int, rank: int):
    from tessera.cluster.config import DistConfig
    from tessera.cluster.engine import build_engine

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if kind == "sharded":
        cfg = DistConfig(backend="gloo", sharded=True, ranks_per_node=ranks_per_node, powersgd_rank=rank)
    elif kind == "zero2":
        cfg = DistConfig(backend="gloo", zero_stage=2)
    else:
        cfg = DistConfig(backend="gloo")
    return build_engine(model, opt, dist, cfg, micro_batch_size=BATCH // dist.world_size)


def worker(out: Path, kind: str, ranks_per_node: int, rank: int, steps: int) -> None:
    from tessera.cluster.dist import discover, shutdown
    from tessera.trainer.transformer import DALLE
    from tessera.trainer.transformer_task import dalle_loss

    dist = discover()
    torch.set_num_threads(max(1, 2 // dist.world_size))
    cfg = model_cfg()
    torch.manual_seed(0)
    model = DALLE(cfg)
    matmul, attention = flops_per_sequence(model, cfg)
    eng = _engine(kind, model, dist, ranks_per_node, rank)
    per = BATCH // dist.world_size
    g = torch.Generator().manual_seed(0)
    text, image = torch.randint(0, 256, (BATCH, 16), generator=g), torch.randint(0, 512, (BATCH, 256), generator=g)
    a, b = text[dist.rank * per : (dist.rank + 1) * per], image[dist.rank * per : (dist.rank + 1) * per]
    for step in range(steps + 2):
        if step == 2:
            dist.barrier()
            t0 = time.perf_counter()
        loss = dalle_loss(eng, a, b, 7.0)["loss"]  # through the engine's forward (DDP's and DeepSpeed's hooks run)
        eng.backward(loss)
        eng.step()
    dist.barrier()
    dt = time.perf_counter() - t0
    if dist.rank == 0:
        res = {"seconds": dt, "sequences": steps * BATCH, "tokens": steps * BATCH * 272, "flops": (matmul + attention) * steps * BATCH}
        res.update(matmul_share=matmul / (matmul + attention), stats=eng.comm_stats())
        (out / "result.json").write_text(json.dumps(res))
    shutdown(dist)


def run(kind: str, world: int, ranks_per_node: int, rank: int, steps: int) -> dict:
    from tessera.cluster.dist import free_port

    with tempfile.TemporaryDirectory() as d:
        port, procs = free_port(), []
        for r in range(world):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "LOCAL_WORLD_SIZE"))}
            env.update(OMP_NUM_THREADS=str(max(1, 2 // world)), PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            args = [sys.executable, __file__, "--worker", d, kind, str(ranks_per_node), str(rank), str(steps)]
            procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errs = [p.communicate()[1] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"{kind} at {world} ranks failed:\n" + "\n".join(e[-2000:] for e in errs))
        return json.loads((Path(d) / "result.json").read_text())


def main() -> None:
    from tessera.core import machine

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else STEPS
    peak = peak_flops()
    print(f"machine: {machine.describe()}")
    print(f"peak: fp32 matmul 2048^3 at 2 threads {peak / 1e9:.1f} GFLOP/s; {steps} timed updates of {BATCH} x 272 tokens")
    print(f"{'layout':16s} ranks  tokens/s   MFU    across groups B/update (rank 0)")
    for name, world, kind, k, r in LAYOUTS:
        res = run(kind, world, k, r, steps)
        st = res["stats"]
        across = f"{st['inter_bytes']:,} of {st['inter_dense_bytes']:,} dense" if st.get("inter_dense_bytes") else "-"
        mfu = res["flops"] / res["seconds"] / peak
        print(f"{name:16s} {world:5d}  {res['tokens'] / res['seconds']:8.0f}  {100 * mfu:5.1f}%  {across}")
    print(f"(matmul share of the model FLOPs: {res['matmul_share']:.3f}; the rest is allowed-pair attention)")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
