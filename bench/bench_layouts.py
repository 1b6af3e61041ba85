"""Tokens/s of a tiny DALLE in the plain, DDP and sharded (FSDP2 within groups, PowerSGD across) layouts, on CPU gloo.

    OMP_NUM_THREADS=1 python bench/bench_layouts.py [steps]

Each layout runs in fresh processes (one per rank) on the same global batch; the figure is the
global batch's tokens per second of wall time over the timed steps (after two warm-up steps), with
the sharded engine's bytes per step across groups. On a 2-core machine the multi-rank layouts
share the cores, so the figures compare overheads, not scaling.
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
LAYOUTS = [("plain", 1, 0, 0), ("ddp", 2, 0, 0), ("sharded", 2, 2, 0), ("sharded", 2, 1, 4), ("sharded", 4, 2, 4)]


def worker(out: Path, layout: str, ranks_per_node: int, rank: int, steps: int) -> None:
    from tessera.cluster.dist import discover, init, shutdown
    from tessera.cluster.engine import build_engine
    from tessera.cluster.sharded import ShardedPowerSGDEngine
    from tessera.trainer.config import TransformerModelConfig
    from tessera.trainer.transformer import DALLE

    torch.set_num_threads(1)
    dist = discover()
    if dist.world_size > 1:
        dist = init(dist, backend="gloo")
    cfg = TransformerModelConfig(text_len=16, text_vocab=256, image_grid=8, image_vocab=256, d_model=64, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    model = DALLE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if layout == "sharded":
        eng = ShardedPowerSGDEngine(model, opt, dist, ranks_per_node=ranks_per_node, powersgd_rank=rank, d_model=cfg.d_model)
    else:
        eng = build_engine(model, opt, dist)
    per = BATCH // dist.world_size
    g = torch.Generator().manual_seed(0)
    text, image = torch.randint(0, 256, (BATCH, 16), generator=g), torch.randint(0, 256, (BATCH, 64), generator=g)
    a, b = text[dist.rank * per : (dist.rank + 1) * per], image[dist.rank * per : (dist.rank + 1) * per]
    for step in range(steps + 2):
        if step == 2:
            dist.barrier()
            t0 = time.perf_counter()
        loss = eng.module.loss(a, b)["loss"]
        eng.backward(loss)
        eng.step()
    dist.barrier()
    dt = time.perf_counter() - t0
    if dist.rank == 0:
        stats = eng.comm_stats() if hasattr(eng, "comm_stats") else {}
        (out / "result.json").write_text(json.dumps({"tokens_per_s": steps * BATCH * 80 / dt, "stats": stats}))
    shutdown(dist)


def run(layout: str, world: int, ranks_per_node: int, rank: int, steps: int) -> dict:
    from tessera.cluster.dist import free_port

    with tempfile.TemporaryDirectory() as d:
        port, procs = free_port(), []
        for r in range(world):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_WORLD_SIZE"))}
            env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            if world > 1:
                env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            args = [sys.executable, __file__, "--worker", d, layout, str(ranks_per_node), str(rank), str(steps)]
            procs.append(subprocess.Popen(args, env=env, cwd=REPO))
        if any(p.wait() for p in procs):
            raise SystemExit(f"{layout} at {world} ranks failed")
        return json.loads((Path(d) / "result.json").read_text())


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    for layout, world, k, r in LAYOUTS:
        res = run(layout, world, k, r, steps)
        name = layout if layout != "sharded" else f"sharded {world // k}x{k} r{r}"
        st = res["stats"]
        extra = f"  across {st['inter_bytes']} B/step of {st['inter_dense_bytes']} dense" if st else ""
        print(f"{name:22s} {world} ranks  {res['tokens_per_s']:9.0f} tokens/s{extra}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
