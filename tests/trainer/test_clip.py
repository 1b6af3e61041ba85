import io
import json
import tarfile
import tempfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tessera.cli import main
from tessera.core.errors import CheckpointError, InputError
from tessera.core.files import load_checkpoint, save_checkpoint
from tessera.dataprep import synthetic as S
from tessera.dataprep.tokenizer import train_tokenizer
from tessera.trainer.clip import CLIP, load_clip, load_scorer, pad_ids
from tessera.trainer.clip_train import read_pairs, retrieval_accuracy, train_clip
from tessera.trainer.config import ClipConfig

SMALL = dict(
    d_model=64,
    n_layers=2,
    n_heads=4,
    image_width=16,
    image_size=32,
    embed_dim=64,
    text_len=16,
    batch_size=32,
    lr=2e-3,
    warmup_steps=20,
    log_every=25,
    eval_every=0,
    ckpt_every=0,
    eval_samples=400,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the test machines are small and shared; one thread avoids oversubscription
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pairs(combos, n, seed, size=32):
    rng = np.random.default_rng(seed)
    attrs = [combos[i] for i in rng.integers(0, len(combos), n)]
    imgs = torch.from_numpy(np.stack([np.asarray(S.render(a, size, rng)).transpose(2, 0, 1) for a in attrs]))
    return imgs, [S.caption(a) for a in attrs]


def _write_shard(path, imgs, caps):
    with tarfile.open(path, "w") as tf:
        for i, (im, c) in enumerate(zip(imgs, caps)):
            buf = io.BytesIO()
            from PIL import Image

            Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=95)
            for ext, data in (("jpg", buf.getvalue()), ("txt", c.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "bpe.model"
    train_tokenizer([S.caption(a) for a in S.all_combinations()], path, "youtokentome", 256)
    return path


def test_model_shapes_and_padding():
    cfg = ClipConfig(**SMALL)
    m = CLIP(cfg, 100)
    ids = pad_ids([[5, 6, 7], list(range(4, 40)), []], cfg.text_len)
    assert ids.shape == (3, 16) and ids[0, 3:].eq(0).all() and ids[1].eq(torch.arange(4, 20)).all()
    t = m.encode_text(ids)
    i = m.encode_image(torch.rand(3, 3, 48, 48))  # other sizes are resized
    assert t.shape == i.shape == (3, 64)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    # padding does not change a caption's embedding
    longer = pad_ids([[5, 6, 7]], 16)
    assert torch.allclose(m.encode_text(longer), t[:1], atol=1e-5)
    with pytest.raises(InputError, match="expected \\(B, 3, H, W\\)"):
        m.encode_image(torch.rand(3, 32, 32))


def test_training_reaches_retrieval_accuracy_far_above_chance(tmp_path, tok):
    train_combos, held = S.split_combinations(0.1, seed=0)
    pairs = _pairs(train_combos, 1200, seed=1)
    cfg = ClipConfig(**{**SMALL, "steps": 150})
    m = train_clip(cfg, None, tok, tmp_path / "run", pairs=pairs)
    assert m["step"] == 150
    # chance is 1 / (distinct captions) ~ 0.003
    assert m["chance"] < 0.01
    print("clip retrieval after 150 steps:", m)
    assert m["i2t_top1"] > 0.5, m
    assert m["t2i_top1"] > 0.5, m
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tempfile.tempdir, saved = str(scratch), tempfile.tempdir
    try:
        scorer = load_clip(tmp_path / "run")
    finally:
        tempfile.tempdir = saved
    assert list(scratch.iterdir()) == []  # the checkpoint's tokenizer left no temporary files behind
    # unseen renders of training combinations: own caption beats a caption with one attribute changed
    imgs, caps = _pairs(train_combos, 100, seed=2)
    x = imgs.float() / 255
    wrong = [
        c.replace(" on a gray", " on a XX")
        .replace(" on a white", " on a gray")
        .replace(" on a black", " on a white")
        .replace(" on a XX", " on a black")
        for c in caps
    ]
    good, bad = scorer.score(x, caps), scorer.score(x, wrong)
    assert good.shape == (100,) and (good.abs() <= 1.0001).all()
    assert (good > bad).float().mean() > 0.8
    r = retrieval_accuracy(scorer, imgs, caps)
    assert r["i2t_top1"] > 0.3
    best = scorer.rerank(x[:10], caps[0], top=3)
    assert best[0].item() in [i for i in range(10) if caps[i] == caps[0]] or caps.count(caps[0]) == 1
    # PIL images (the crawler's similarity filter) give the same scores as the tensor batch
    from PIL import Image

    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in imgs[:8]]
    crawler_scorer = load_scorer(tmp_path / "run")
    assert torch.allclose(torch.as_tensor(crawler_scorer.score(pil, caps[:8])), good[:8], atol=1e-5)
    # an export directory (config.json "clip" entry + clip.* tensors + clip_tokenizer.model) loads the same model
    exp = tmp_path / "export"
    exp.mkdir()
    state = load_checkpoint(tmp_path / "run", "clip")
    save_file({f"clip.{k}": v.half() for k, v in state["model"].items()}, str(exp / "model.safetensors"))
    (exp / "clip_tokenizer.model").write_bytes(state["tokenizer_bytes"].numpy().tobytes())
    (exp / "clip_tokenizer.model.json").write_text(json.dumps(state["tokenizer_meta"]))
    (exp / "config.json").write_text(
        json.dumps({"clip": {"config": state["config"], "vocab_size": state["vocab_size"], "tokenizer": "clip_tokenizer.model"}})
    )
    assert torch.allclose(load_clip(exp).score(x[:8], caps[:8]), good[:8], atol=2e-2)  # fp16 weights
    (exp / "config.json").write_text(json.dumps({"clip": None}))
    with pytest.raises(CheckpointError, match="holds no CLIP"):
        load_clip(exp)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in metrics if "loss" in row]
    assert losses[-1] < losses[0] * 0.5


def test_cli_shards_checkpoint_and_resume(tmp_path, tok):
    imgs, caps = _pairs(S.all_combinations(), 80, seed=3, size=64)
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "00000.tar", imgs[:50], caps[:50])
    _write_shard(shards / "00001.tar", imgs[50:], caps[50:])
    got, got_caps = read_pairs(shards, 32)
    assert got.shape == (80, 3, 32, 32) and got.dtype == torch.uint8 and got_caps == caps
    over = [f"clip.{k}={v}" for k, v in {**SMALL, "steps": 6, "ckpt_every": 3, "batch_size": 16}.items()]
    run = tmp_path / "run"
    args = ["train", "clip", "--data", str(shards), "--tokenizer", str(tok), "--output", str(run), "--eval-data", str(shards / "00001.tar")]
    assert main(args + over) == 0
    ck = load_checkpoint(run, "clip")
    assert ck["step"] == 6 and ck["metrics"]["n_images"] == 30
    assert (run / "config.toml").is_file() and (run / "checkpoints" / "step_00000006.pt").is_file()
    # resume: a longer run continues from step 6
    assert main(args + over[:-3] + ["clip.steps=9", "clip.ckpt_every=3", "clip.batch_size=16"]) == 0
    assert load_checkpoint(run, "clip")["step"] == 9
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 9


def test_bad_checkpoints_and_inputs(tmp_path, tok):
    from tessera.core.errors import ConfigError

    with pytest.raises(ConfigError, match="clip.checkpoint"):
        train_clip(ClipConfig(**SMALL, checkpoint="ViT-B-32.pt"), None, tok, tmp_path / "r", pairs=_pairs(S.all_combinations(), 4, seed=0))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_clip(bad)
    other = tmp_path / "dvae.pt"
    save_checkpoint(other, "dvae", {"model": {}})
    with pytest.raises(CheckpointError, match="'dvae' checkpoint"):
        load_clip(other)
    with pytest.raises(InputError, match="matches no file"):
        read_pairs(tmp_path / "nothing", 32)
    empty = tmp_path / "e.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(InputError, match="no \\(image, caption\\) pairs"):
        read_pairs(empty, 32)
