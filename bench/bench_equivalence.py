"""Does a 2-rank ZeRO-2 run train on the same global batches as a 1-rank run? The demo transformer's loss at update 30.

    OMP_NUM_THREADS=1 python bench/bench_equivalence.py [--steps 30] [--before COMMIT]

Token shards shaped like the demo's (16 text tokens, 16x16 image tokens of a 512-code vocabulary, ~1.0M-parameter
transformer of configs/demo.toml) are written from the embedded synthetic dataset: captions of every attribute
combination, a BPE tokenizer trained on them, and as image codes each 16x16 rendering's pixels quantised to 3 bits
per channel (8^3 = 512 codes), so the model has something to learn without a trained dVAE. The demo's
`transformer.train` keys train it (global batch 32, lr 2e-3, warm-up 25, caption dropout 0.1) in fp32 (bf16 rounding
would blur the comparison) without time budget, at 1 rank (plain engine) and at 2 ranks with cluster.zero_stage=2,
each in fresh processes (torch's gloo on this machine's cores). Printed: the logged loss at update `--steps` and the
largest relative difference over the curve. With `--before COMMIT` the same runs are repeated on that commit's tree
(extracted with git archive), e.g. the per-rank order before the global one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "kernels", "dataprep", "cluster")


def write_tokens(folder: Path, n: int = 2048, per_shard: int = 512) -> Path:
    """Demo-shaped token shards + manifest.json (+ tokenizer) from the synthetic dataset's captions and renderings."""
    import numpy as np

    from tessera.dataprep.synthetic import all_combinations, caption, render
    from tessera.dataprep.tokenizer import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    combos = all_combinations()
    rng = np.random.default_rng(0)
    rows = []
    for j in range(n):
        attrs = combos[j % len(combos)]
        px = np.asarray(render(attrs, size=16, rng=rng).convert("RGB"), dtype=np.int64) >> 5  # 3 bits per channel
        rows.append((caption(attrs), (px[..., 0] * 64 + px[..., 1] * 8 + px[..., 2]).astype(np.uint16)))
    tok = train_tokenizer([c for c, _ in rows], folder / "bpe.model", vocab_size=128, threads=1)
    shards = []
    for s in range(0, n, per_shard):
        name = f"{s // per_shard:05d}.tar"
        shards.append(name)
        with tarfile.open(folder / name, "w") as tf:
            for j in range(s, min(s + per_shard, n)):
                cap, codes = rows[j]
                for ext, data in (
                    ("codes.npy", _npy(codes)),
                    ("ids.npy", _npy(np.array(tok.encode(cap), dtype=np.int32))),
                    ("txt", cap.encode()),
                ):
                    ti = tarfile.TarInfo(f"{j:09d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    manifest = {"grid": 16, "image_vocab": 512, "text_vocab": tok.vocab_size, "tokenizer": str(folder / "bpe.model")}
    manifest.update(dvae=None, count=n, shards=shards)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _npy(a) -> bytes:
    import numpy as np

    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def worker(tokens: Path, run: Path, steps: int, zero: int) -> None:
    import torch

    torch.set_num_threads(1)
    from tessera.core.root_config import load_root
    from tessera.trainer.transformer_train import train_transformer

    over = [f"transformer.train.{k}" for k in ("precision=fp32", f"steps={steps}", "log_every=1", "time_budget_s=0")]
    over += [f"transformer.train.{k}=0" for k in ("sample_every", "ckpt_every", "threads")] + [f"cluster.zero_stage={zero}"]
    train_transformer(load_root("demo", over), str(tokens), run)


def launch(tree: Path, tokens: Path, run: Path, world: int, steps: int, zero: int) -> list[float]:
    from tessera.cluster.dist import free_port

    port, procs = free_port(), []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "LOCAL_WORLD_SIZE"))}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(tree), TESSERA_PROGRESS="0")
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, __file__, "--worker", str(tokens), str(run), str(steps), str(zero)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out = p.communicate()[0]
        if p.returncode:
            sys.exit(f"bench_equivalence: a worker failed ({world} ranks, {tree}):\n{out[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def old_tree(commit: str, where: Path) -> Path:
    """That commit's files, with tessera/<package> links so that its own modules import (not this checkout's)."""
    where.mkdir(parents=True)
    data = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(data)).extractall(where)
    for p in PACKAGES:
        (where / "tessera" / p).symlink_to(where / p)
    return where


def compare(tree: Path, tokens: Path, tmp: Path, steps: int, label: str) -> dict:
    one = launch(tree, tokens, tmp / f"{label}_1", 1, steps, 0)
    two = launch(tree, tokens, tmp / f"{label}_2", 2, steps, 2)
    diff = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    print(f"{label}: loss at update {steps}: 1 rank {one[-1]:.4f}, 2 ranks ZeRO-2 {two[-1]:.4f}; max relative difference {diff:.2e}")
    return {"one": one, "two": two, "max_rel_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--before", default=None, help="also run this commit's tree (e.g. the per-rank order)")
    ap.add_argument("--json", default=None, help="write the curves here")
    args = ap.parse_args()
    from tessera.core import machine

    print(f"machine: {machine.describe()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tokens = write_tokens(tmp / "tokens")
        res = {"after": compare(REPO, tokens, tmp, args.steps, "after")}
        if args.before:
            res["before"] = compare(old_tree(args.before, tmp / "before_tree"), tokens, tmp, args.steps, f"before ({args.before})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
