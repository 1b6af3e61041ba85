"""Does low-rank PowerSGD across groups train as well as the uncompressed all-reduce? (issue 16, requirement 3)

Real gloo, 2 processes in the sharded layout 2 groups x 1 rank (`ShardedPowerSGDEngine`, ranks_per_node=1:
each process is a group, FSDP2 has nothing to shard, and every matrix crosses the groups compressed). Every
run starts from the same weights and sees the same batches (global batch split by rank), with the demo's
optimizer recipe (AdamW, betas (0.9, 0.98), weight decay 0.01, linear warm-up then cosine decay, grad clip 1.0),
for the same number of updates, in fp32. What changes between runs is the cross-group reduction only:

  dense             fp32 all-reduce of everything (powersgd_rank 0), the reference
  r{1,2,4,8,...}    the issue's PowerSGD: fixed Gaussian Q drawn once, error feedback, Householder + 1e-6 I
  +warm             the same, Q warm-started from the previous step's Q' (PowerSGD paper's default)
  +startN           the same, the first N reductions uncompressed (torch's powerSGD_hook start_powerSGD_iter)
  +heads            the same, the output heads (text_head, image_head: unembeddings) all-reduced uncompressed too

Data: the embedded synthetic dataset (dataprep/synthetic.py) tokenised without a dVAE: captions word by word
(padding tokens as trainer/token_data.py pads), images rendered at 4 x grid pixels, each 4x4 patch's mean colour
quantised to 8 levels per channel (512 codes), so images are structured and depend on their captions.
Reported per run: the held-out loss at the end (mean over both ranks' halves of 256 held-out examples), the
mean training loss over the last 20 updates, and both relative to the dense run.

    .venv/bin/python bench/bench_powersgd_quality.py [--steps 200] [--ranks 1,2,4,8,64] [--variants fixed,warm,start25]
        [--d-model 128 --layers 4 --grid 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tessera.dataprep import synthetic  # noqa: E402

TEXT_LEN = 16
EVAL_N = 256
TRAIN_POOL = 4096


def vocabulary() -> list[str]:
    words = {"a", "at", "the", "in", "on", "background", "center"}
    for table in (synthetic.SHAPES, synthetic.COLORS, synthetic.SIZES, synthetic.POSITIONS, synthetic.BACKGROUNDS):
        for k in table:
            words.update(k.split())
    return sorted(words)


def make_data(n: int, grid: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n (text ids [n, TEXT_LEN], image codes [n, grid^2]) pairs, deterministic in seed."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    combos = synthetic.all_combinations()
    rng = np.random.default_rng(seed)
    texts, images = [], []
    for i in rng.integers(0, len(combos), size=n):
        a = combos[int(i)]
        ids = [vocab[w] for w in synthetic.caption(a).split()][:TEXT_LEN]
        texts.append(ids + [len(vocab) + j for j in range(len(ids), TEXT_LEN)])
        img = np.asarray(synthetic.render(a, size=4 * grid, rng=rng), dtype=np.float32)
        patches = img.reshape(grid, 4, grid, 4, 3).mean(axis=(1, 3))  # [grid, grid, 3]
        q = np.clip((patches / 32.0).astype(np.int64), 0, 7)
        images.append((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).reshape(-1))
    return torch.tensor(texts), torch.tensor(np.stack(images))


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return args.lr_min + 0.5 * (args.lr - args.lr_min) * (1 + math.cos(math.pi * t))


def parse_variant(name: str) -> tuple[int, bool, int, bool]:
    """'dense' | 'r4' | 'r4+warm' | 'r4+start25' | 'r4+heads' | combinations -> (rank, warm_start, start_iter, dense heads)."""
    if name == "dense":
        return 0, False, 0, False
    head, *opts = name.split("+")
    warm = "warm" in opts
    start = next((int(o[5:]) for o in opts if o.startswith("start")), 0)
    return int(head[1:]), warm, start, "heads" in opts


def run_one(name: str, data, dist, args) -> dict:
    from tessera.cluster.sharded import ShardedPowerSGDEngine
    from tessera.trainer.config import TransformerModelConfig
    from tessera.trainer.transformer import DALLE

    rank, warm, start, heads = parse_variant(name)
    cfg = TransformerModelConfig(
        text_len=TEXT_LEN,
        text_vocab=len(vocabulary()),
        image_grid=args.grid,
        image_vocab=512,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        attention="dalle",
        conv_kernel=5,
    )
    torch.manual_seed(0)
    model = DALLE(cfg)

    def make_opt(params):
        if args.optimizer == "sgd":  # a diagnostic: Vogels et al. trained with SGD + momentum
            return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=0.0)
        return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    eng = ShardedPowerSGDEngine(
        model,
        make_opt,
        dist,
        ranks_per_node=1,
        powersgd_rank=rank,
        grad_clip=1.0,
        d_model=args.d_model,
        powersgd_warm_start=warm,
        powersgd_start_iter=start,
        backend="torch",
        dense_pattern=re.compile(r"emb|head" if heads else r"emb"),
    )
    (tt, ti), (et, ei) = data
    per = args.batch // dist.world_size
    gen = torch.Generator().manual_seed(1)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, tt.shape[0], (args.batch,), generator=gen)[dist.rank * per : (dist.rank + 1) * per]
        eng.set_lr(lr_at(step, args))
        loss = eng.module.loss(tt[idx], ti[idx])["loss"]
        eng.backward(loss)
        eng.step()
        losses.append(_mean(loss.detach(), dist))
    wall = time.perf_counter() - t0
    eng.eval()
    half = EVAL_N // dist.world_size
    sl = slice(dist.rank * half, (dist.rank + 1) * half)
    with torch.no_grad():
        held = _mean(eng.module.loss(et[sl], ei[sl])["loss"], dist)
    stats = eng.comm_stats()
    return {
        "name": name,
        "rank": rank,
        "warm_start": warm,
        "start_iter": start,
        "losses": losses,
        "eval_loss": held,
        "last20": sum(losses[-20:]) / len(losses[-20:]),
        "wall_s": wall,
        "inter_ratio": stats.get("inter_ratio"),
        "finite": all(math.isfinite(x) for x in losses),
    }


def _mean(t: torch.Tensor, dist) -> float:
    t = t.detach().clone().float()
    torch.distributed.all_reduce(t)
    return t.item() / dist.world_size


def worker(args) -> None:
    from tessera.cluster.dist import discover, init, shutdown

    torch.set_num_threads(1)
    dist = init(discover(), backend="gloo")
    data = (make_data(TRAIN_POOL, args.grid, seed=0), make_data(EVAL_N, args.grid, seed=1))
    results = []
    for name in variant_names(args):
        res = run_one(name, data, dist, args)
        results.append(res)
        if dist.rank == 0:
            print(f"{name:>18}: eval {res['eval_loss']:.4f}  last20 {res['last20']:.4f}  {res['wall_s']:.0f} s", flush=True)
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}))
    shutdown(dist)


def variant_names(args) -> list[str]:
    names = ["dense"]
    for r in [int(x) for x in args.ranks.split(",") if x]:
        for v in args.variants.split(","):
            names.append(f"r{r}" if v == "fixed" else f"r{r}+" + v.replace("-", "+"))
    return names


def launch(args) -> None:
    from tessera.cluster.dist import free_port

    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "LOCAL_WORLD_SIZE"))}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env, cwd=REPO))
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"bench_powersgd_quality: workers exited with {codes}")


def report(path: str) -> None:
    from tessera.core import machine

    res = json.loads(Path(path).read_text())
    rows = res["results"]
    base = next(r for r in rows if r["name"] == "dense")
    print(f"machine: {machine.describe()}")
    a = res["args"]
    print(
        f"d_model {a['d_model']}, {a['layers']} layers, grid {a['grid']}, global batch {a['batch']}, {a['steps']} updates, "
        f"{a.get('optimizer', 'adamw')} lr {a['lr']}"
    )
    print("| run | held-out loss | vs dense | last-20 train loss | vs dense | bytes vs dense | within 10% | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        de = r["eval_loss"] / base["eval_loss"] - 1
        dt = r["last20"] / base["last20"] - 1
        ok = "yes" if de <= 0.10 else "no"
        ratio = r["inter_ratio"] or 1.0
        print(
            f"| {r['name']} | {r['eval_loss']:.4f} | {de:+.1%} | {r['last20']:.4f} | {dt:+.1%} | {ratio:.3f} | {ok} | {r['wall_s']:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ranks", default="1,2,4,8,64", help="PowerSGD ranks (64 = full rank where d_model <= 64)")
    ap.add_argument("--variants", default="fixed", help="comma list of fixed | warm | startN | warm-startN")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32, help="global batch (split over the 2 processes)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-min", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="sgd: momentum 0.9 (a diagnostic, not the demo)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.steps < 1 or args.batch % 2:
        sys.exit("bench_powersgd_quality: --steps must be >= 1 and --batch even")
    if args.worker:
        return worker(args)
    if args.json is None:
        args.json = str(Path(tempfile.mkdtemp()) / "powersgd_quality.json")
        sys.argv += ["--json", args.json]
    launch(args)
    report(args.json)


if __name__ == "__main__":
    main()
