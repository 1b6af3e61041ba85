"""tessera.trainer.clip_train: a tiny CLIP on coloured-shape image/caption pairs (the token fixtures' captions),
its run directory and "clip" checkpoints, the schedule, retrieval accuracy and reading pairs from shards.

tests/trainer/test_clip.py covers the model, the scorer, the CLI and resuming; this module the
training loop's own outputs.
"""

import dataclasses
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.core import config as C
from tessera.core.errors import CheckpointError, InputError
from tessera.core.files import load_checkpoint
from tessera.core.root_config import from_run_dict, load_root
from tessera.trainer.clip import CLIP
from tessera.trainer.clip_train import _param_groups, read_pairs, retrieval_accuracy, train_clip
from tessera.trainer.config import ClipConfig
from tessera.trainer.schedules import warmup_cosine

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square")  # the captions of tests/trainer/token_fixtures.py: "a {colour} {shape}"
TINY = dict(
    d_model=32,
    n_layers=1,
    n_heads=2,
    image_width=8,
    image_size=16,
    embed_dim=16,
    text_len=8,
    batch_size=16,
    lr=3e-3,
    lr_min=1e-5,
    warmup_steps=5,
    log_every=1,
    eval_every=20,
    ckpt_every=20,
    eval_samples=64,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pairs(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, list[str]]:
    """uint8 (n, 3, size, size) images of a coloured circle or square on a noisy gray background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2 + 0.5
    masks = {"circle": yy**2 + xx**2 < (0.35 * size) ** 2, "square": (abs(yy) < 0.3 * size) & (abs(xx) < 0.3 * size)}
    imgs, caps = [], []
    for _ in range(n):
        c, s = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
        im = np.full((size, size, 3), 128, np.int16) + rng.integers(-20, 21, (size, size, 3))
        im[masks[s]] = COLORS[c]
        imgs.append(np.clip(im, 0, 255).astype(np.uint8).transpose(2, 0, 1))
        caps.append(f"a {c} {s}")
    return torch.from_numpy(np.stack(imgs)), caps


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tessera.dataprep.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("cliptok") / "bpe.model"
    train_tokenizer([f"a {c} {s}" for c in COLORS for s in SHAPES] * 8, path, vocab_size=40, threads=1)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok):
    run = tmp_path_factory.mktemp("clipruns") / "run"
    cfg = ClipConfig(**TINY, steps=40)
    m = train_clip(cfg, None, tok, run, pairs=make_pairs(256, seed=0), seed=0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return cfg, run, m, rows


def test_contrastive_loss_falls_and_retrieval_beats_chance(trained):
    cfg, run, m, rows = trained
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40
    assert losses[0] > 0.8 * math.log(16)  # about chance for a batch of 16 at the start
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    assert m["step"] == 40 and m["loss"] == losses[-1]
    assert (m["n_captions"], m["n_images"], m["chance"]) == (8, 64, 1 / 8)
    assert m["i2t_top1"] >= 0.5 and m["t2i_top1"] >= 0.5  # chance is 0.125


def test_schedule_and_evaluations_are_logged(trained):
    cfg, run, m, rows = trained
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    for r in train_rows:  # the rate used for update s (logged as step s + 1)
        assert r["lr"] == pytest.approx(warmup_cosine(r["step"] - 1, cfg.lr, cfg.lr_min, cfg.warmup_steps, cfg.steps))
        assert r["temperature"] > 0
    assert train_rows[0]["temperature"] == pytest.approx(cfg.temperature_init, rel=0.05)
    evals = [r for r in rows if "eval_i2t_top1" in r]
    assert [r["step"] for r in evals] == [20, 40]  # every eval_every, then the final one
    assert evals[-1]["eval_i2t_top1"] == m["i2t_top1"] and evals[-1]["eval_n_captions"] == 8


def test_run_dir_and_clip_checkpoints(trained, tok):
    cfg, run, m, _ = trained
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest.pt", "manifest.json", "step_00000020.pt", "step_00000040.pt"]
    assert m["checkpoint"] == str(run / "checkpoints" / "step_00000040.pt")
    ck = load_checkpoint(run, "clip")
    assert ck["kind"] == "clip" and ck["step"] == 40
    assert ck["config"] == dataclasses.asdict(cfg) and ck["vocab_size"] == 40
    assert ck["tokenizer_bytes"].numpy().tobytes() == tok.read_bytes()
    assert ck["metrics"] == {k: v for k, v in m.items() if k != "checkpoint"}
    assert "state" in ck["optimizer"] and ck["optimizer"]["param_groups"][0]["weight_decay"] == cfg.weight_decay
    mid = load_checkpoint(run / "checkpoints" / "step_00000020.pt", "clip")
    assert mid["step"] == 20 and not torch.equal(mid["model"]["image.proj.weight"], ck["model"]["image.proj.weight"])
    with pytest.raises(CheckpointError, match="is a 'clip' checkpoint, expected 'transformer'"):
        load_checkpoint(run, "transformer")
    # config.toml: the default root config with this [clip] section
    root = from_run_dict(C.load_toml(run / "config.toml"))
    assert root.clip == cfg and root.dvae == load_root().dvae


def test_same_seed_same_weights(tmp_path, tok):
    pairs = make_pairs(48, seed=1, size=32)  # 32-pixel images: resized to the tower's 16 first
    cfg = ClipConfig(**{**TINY, "steps": 4, "eval_every": 0, "ckpt_every": 0})
    train_clip(cfg, None, tok, tmp_path / "a", pairs=pairs, seed=3)
    train_clip(cfg, None, tok, tmp_path / "b", pairs=pairs, seed=3)
    train_clip(cfg, None, tok, tmp_path / "c", pairs=pairs, seed=4)
    a, b, c = (load_checkpoint(tmp_path / x, "clip")["model"] for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_time_budget_stops_early(tmp_path, tok):
    cfg = ClipConfig(**{**TINY, "steps": 1000, "time_budget_s": 1e-6, "eval_every": 0, "ckpt_every": 0})
    m = train_clip(cfg, None, tok, tmp_path / "run", pairs=make_pairs(32, seed=2))
    assert m["step"] < 1000
    assert load_checkpoint(tmp_path / "run", "clip")["step"] == m["step"]


def test_weight_decay_groups():
    model = CLIP(ClipConfig(**TINY), 40)
    decay, no_decay = _param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert d.isdisjoint(nd) and d | nd == set(names.values())
    assert "image.proj.weight" in d and "text.blocks.0.qkv.weight" in d and "image.stem.0.weight" in d  # linear and conv weights
    assert {"logit_scale", "text.tok.weight", "image.proj.bias", "text.ln.weight"} <= nd  # temperature, embeddings, biases, norms


def test_positions_are_not_decayed():
    model = CLIP(ClipConfig(**TINY), 40)
    _, no_decay = _param_groups(model, 0.1)
    assert any(p is model.text.pos for p in no_decay["params"])


# ---------------------------------------------------------------- retrieval_accuracy


class FixedScorer:
    """similarity() returns a fixed (images x distinct captions) matrix and records its inputs."""

    def __init__(self, sim):
        self.sim = torch.tensor(sim, dtype=torch.float32)
        self.seen = None

    def similarity(self, images, captions):
        self.seen = (images, list(captions))
        return self.sim


def test_retrieval_accuracy_counts_both_directions():
    captions = ["b", "a", "b", "c"]  # distinct, sorted: a, b, c
    sim = [
        [0.1, 0.9, 0.0],  # image 0 (b) -> b: right
        [0.2, 0.8, 0.0],  # image 1 (a) -> b: wrong
        [0.0, 0.5, 0.6],  # image 2 (b) -> c: wrong
        [0.3, 0.1, 0.7],  # image 3 (c) -> c: right
    ]
    # text -> image: a -> image 3 (c, wrong), b -> image 0 (b, right), c -> image 3 (c, right)
    scorer = FixedScorer(sim)
    images = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    r = retrieval_accuracy(scorer, images, captions)
    assert r == {"i2t_top1": 0.5, "t2i_top1": pytest.approx(2 / 3), "chance": pytest.approx(1 / 3), "n_captions": 3, "n_images": 4}
    x, distinct = scorer.seen
    assert distinct == ["a", "b", "c"]
    assert x.dtype == torch.float32 and float(x.max()) == 1.0  # uint8 scaled to [0, 1]


@pytest.mark.parametrize("n_images, n_caps", [(3, 4), (0, 0)])
def test_retrieval_accuracy_needs_matching_nonempty_sets(n_images, n_caps):
    with pytest.raises(InputError, match=f"retrieval_accuracy: {n_images} images and {n_caps} captions"):
        retrieval_accuracy(FixedScorer([[0.0]]), torch.zeros(n_images, 3, 8, 8), ["x"] * n_caps)


# ---------------------------------------------------------------- read_pairs


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _tar(path, entries):
    with tarfile.open(path, "w") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_read_pairs_crops_the_center_skips_unpaired_and_limits(tmp_path):
    wide = np.zeros((16, 32, 3), np.uint8)
    wide[:, :8] = (255, 0, 0)
    wide[:, 24:] = (0, 0, 255)
    wide[:, 8:24] = (0, 255, 0)  # the center square is green
    _tar(
        tmp_path / "a.tar",
        [
            ("k1.png", _png(wide)),
            ("k1.txt", b"  a wide one \n"),
            ("k2.png", _png(np.full((8, 8, 3), 7, np.uint8))),  # no caption: skipped
            ("k3.txt", b"no image"),  # no image: skipped
            ("k4.PNG", _png(np.full((8, 8, 3), 200, np.uint8))),
            ("k4.txt", b"small"),
            ("k4.json", b"{}"),
        ],
    )
    imgs, caps = read_pairs(tmp_path / "a.tar", 8)
    assert caps == ["a wide one", "small"] and imgs.shape == (2, 3, 8, 8) and imgs.dtype == torch.uint8
    assert (imgs[0, 1] == 255).all() and (imgs[0, 0] == 0).all() and (imgs[0, 2] == 0).all()  # only the green center
    assert (imgs[1] == 200).all()
    imgs, caps = read_pairs(tmp_path / "a.tar", 8, limit=1)
    assert caps == ["a wide one"] and len(imgs) == 1


def test_read_pairs_bad_inputs_name_the_file(tmp_path):
    _tar(tmp_path / "b.tar", [("x7.jpg", b"not a jpeg"), ("x7.txt", b"cap")])
    with pytest.raises(InputError) as e:
        read_pairs(tmp_path / "b.tar", 8)
    assert str(e.value) == f"shard '{tmp_path / 'b.tar'}': image 'x7' cannot be decoded"


def _twenty_pairs(path):
    """20 (png, txt) pairs: 40 members of 1024 bytes each (a 512-byte header and one data block)."""
    entries = []
    for i in range(20):
        entries += [(f"k{i:02d}.png", _png(np.full((8, 8, 3), i, np.uint8))), (f"k{i:02d}.txt", f"cap {i}".encode())]
    _tar(path, entries)
    assert len(read_pairs(path, 8)[1]) == 20
    return path.read_bytes()


def test_read_pairs_truncated_inside_a_member(tmp_path):
    data = _twenty_pairs(tmp_path / "g.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 11 * 1024 + 512 + 100])  # inside the data of member 11
    with pytest.raises(InputError) as e:
        read_pairs(cut, 8)
    assert str(e.value) == f"shard '{cut}' is not a readable tar file (ReadError)"


def test_read_pairs_truncated_inside_a_header(tmp_path):
    data = _twenty_pairs(tmp_path / "g.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 20 * 1024 + 300])  # inside the header of member 20 (pair 10's image)
    with pytest.raises(InputError, match="cut.tar"):
        read_pairs(cut, 8)
