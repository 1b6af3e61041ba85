"""Test data for the transformer: a learnable token-shard folder (CONTRACTS.md item 4) with a real
youtokentome tokenizer and a tiny (untrained) dVAE checkpoint named by its manifest."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import torch

from tessera.core.root_config import load_root

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square")
GRID = 4
IMAGE_VOCAB = 16


def caption_codes(rng: random.Random) -> tuple[str, np.ndarray]:
    """A caption and codes that depend on it: colour picks the fill code, shape the pattern."""
    c, s = rng.randrange(len(COLORS)), rng.randrange(len(SHAPES))
    codes = np.full((GRID, GRID), 15, dtype=np.uint16)  # background
    fill = 1 + c
    if SHAPES[s] == "square":
        codes[1:3, 1:3] = fill
    else:
        codes[1, 1:3] = fill
        codes[2, 0:4] = fill
    if rng.random() < 0.1:  # a little noise
        codes[rng.randrange(GRID), rng.randrange(GRID)] = 8 + rng.randrange(4)
    return f"a {COLORS[c]} {SHAPES[s]}", codes


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def make_dvae(path: Path) -> Path:
    from tessera.core.files import save_checkpoint
    from tessera.trainer.config import DVAEModelConfig
    from tessera.trainer.dvae import DVAE

    kw = dict(image_size=16, n_hid=8, n_groups=3, n_blk_per_group=1, vocab_size=IMAGE_VOCAB)
    if "n_init" in DVAEModelConfig.__dataclass_fields__:
        kw["n_init"] = 8
    cfg = DVAEModelConfig(**kw)
    torch.manual_seed(0)
    model = DVAE(cfg)
    save_checkpoint(path, "dvae", {"model": model.state_dict(), "ema": model.state_dict(), "model_cfg": dataclasses.asdict(cfg)})
    return path


def make_token_shards(folder: Path, n: int = 256, per_shard: int = 128, seed: int = 0, dvae: bool = True) -> Path:
    """Write {shard}.tar token shards + manifest.json (+ tokenizer and dVAE) into `folder`."""
    from tessera.dataprep.tokenizer import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = [caption_codes(rng) for _ in range(n)]
    tok = train_tokenizer([c for c, _ in rows] * 4, folder / "bpe.model", vocab_size=40, threads=1)
    shards = []
    for s in range(0, n, per_shard):
        name = f"{s // per_shard:05d}.tar"
        shards.append(name)
        with tarfile.open(folder / name, "w") as tf:
            for j in range(s, min(s + per_shard, n)):
                key = f"{s // per_shard:05d}{j - s:04d}"
                cap, codes = rows[j]
                b = io.BytesIO()
                np.save(b, codes)
                _add(tf, f"{key}.codes.npy", b.getvalue())
                b = io.BytesIO()
                np.save(b, np.array(tok.encode(cap), dtype=np.int32))
                _add(tf, f"{key}.ids.npy", b.getvalue())
                _add(tf, f"{key}.txt", cap.encode())
    manifest = {
        "grid": GRID,
        "image_vocab": IMAGE_VOCAB,
        "text_vocab": tok.vocab_size,
        "tokenizer": str(folder / "bpe.model"),
        "dvae": str(make_dvae(folder / "dvae.pt")) if dvae else None,
        "count": n,
        "shards": shards,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def tiny_root(extra: tuple[str, ...] = (), **train):
    """The demo root config shrunk to a tiny transformer and a few steps (`extra`: more key=value overrides)."""

    over = [
        "transformer.model.text_len=8",
        "transformer.model.d_model=32",
        "transformer.model.n_layers=4",
        "transformer.model.n_heads=2",
        "transformer.model.conv_kernel=3",
        "transformer.train.batch_size=16",
        "transformer.train.warmup_steps=5",
        "transformer.train.log_every=5",
        "transformer.train.sample_every=0",
        "transformer.train.ckpt_every=0",
        "transformer.train.time_budget_s=0",
        "transformer.train.time_budget_mode=horizon",  # the demo preset is step-bound (safety); these tests fit the horizon
        "transformer.train.lr=3e-3",
        "transformer.train.shuffle_buffer=64",
        "sample.batch_size=8",
        "transformer.train.precision=fp32",
    ]  # the demo's "fast" would be bf16 on some CPUs
    over += [f"transformer.train.{k}={v}" for k, v in train.items()]
    return load_root("demo", [*over, *extra])


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP barrier stalls
    (with 2 threads and other jobs running, each small op waited ~15 ms for a descheduled thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
