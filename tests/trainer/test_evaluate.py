import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.cli import main
from tessera.core.errors import InputError
from tessera.dataprep import synthetic as S
from tessera.dataprep.tokenizer import train_tokenizer
from tessera.trainer.clip import load_clip
from tessera.trainer.clip_train import train_clip
from tessera.trainer.config import ClipConfig
from tessera.trainer.evaluate import evaluate, frechet_distance, inception_score, load_images


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g) * torch.tensor([1.0, 2, 3, 0.5, 1, 1]) + 1.0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, -2, 0, 0, 3, 0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)
    # b = 2a: S_b = 4 S_a commutes with S_a, so FD = ||mu||^2 + Tr(S_a + 4 S_a - 4 S_a) = ||mu||^2 + Tr(S_a)
    expected = float(a.double().mean(0).pow(2).sum() + torch.cov(a.double().t()).trace())
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    x, y = torch.randn(300, 1, generator=g), torch.randn(200, 1, generator=g) * 3 + 2
    ref = (x.double().mean() - y.double().mean()) ** 2 + (x.double().std() - y.double().std()) ** 2
    assert frechet_distance(x, y) == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(InputError, match="need >= 2"):
        frechet_distance(a[:1], a)


def test_inception_score_extremes():
    k = 8
    onehot = torch.eye(k).repeat(10, 1)  # confident and evenly spread: IS = k
    assert inception_score(onehot)[0] == pytest.approx(k, rel=1e-6)
    same = torch.zeros(40, k)
    same[:, 3] = 1  # confident but all one class: IS = 1
    assert inception_score(same)[0] == pytest.approx(1.0, abs=1e-6)
    uniform = torch.full((40, k), 1.0 / k)  # unsure: IS = 1
    assert inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-6)
    mean, std = inception_score(torch.eye(k).repeat(12, 1), splits=4)  # folds of 24 = 3 cycles each
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def _render_set(combos, n, seed, size=64):
    rng = np.random.default_rng(seed)
    attrs = [combos[i] for i in rng.integers(0, len(combos), n)]
    return [S.render(a, size, rng) for a in attrs], [S.caption(a) for a in attrs]


def _write_shard(path, imgs, caps):
    with tarfile.open(path, "w") as tf:
        for i, (im, c) in enumerate(zip(imgs, caps)):
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=95)
            for ext, data in (("jpg", buf.getvalue()), ("txt", c.encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small shared test machines: avoid oversubscription
    root = tmp_path_factory.mktemp("eval")
    tok = root / "bpe.model"
    train_tokenizer([S.caption(a) for a in S.all_combinations()], tok, "youtokentome", 256)
    combos = S.all_combinations()
    imgs, caps = _render_set(combos, 600, seed=0, size=32)
    pairs = (torch.from_numpy(np.stack([np.asarray(i).transpose(2, 0, 1) for i in imgs])), caps)
    cfg = ClipConfig(
        d_model=64,
        n_layers=2,
        n_heads=4,
        image_width=16,
        image_size=32,
        embed_dim=64,
        text_len=16,
        steps=120,
        batch_size=32,
        lr=2e-3,
        warmup_steps=10,
        eval_every=0,
        ckpt_every=0,
        eval_samples=100,
    )
    train_clip(cfg, None, tok, root / "clip", pairs=pairs)
    # reference shards and a `tessera sample`-like folder of "generated" images (PNG + prompts.txt)
    ref_imgs, ref_caps = _render_set(combos, 150, seed=1)
    (root / "ref").mkdir()
    _write_shard(root / "ref" / "00000.tar", ref_imgs, ref_caps)
    gen = root / "gen"
    gen.mkdir()
    prompts = ref_caps[:20]
    rng = np.random.default_rng(2)
    for p, c in enumerate(prompts):
        for k in range(3):
            S.render(S.parse_caption(c), 64, rng).save(gen / f"{p:03d}_{k:02d}.png")
    (gen / "prompts.txt").write_text("\n".join(prompts) + "\n")
    Image.new("RGB", (200, 100)).save(gen / "grid.png")  # must be skipped
    noise = root / "noise"
    noise.mkdir()
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise / f"{i:03d}.png")
        (noise / f"{i:03d}.txt").write_text(prompts[i % 20])
    yield root
    torch.set_num_threads(threads)


def test_load_images_finds_captions(setup):
    imgs, caps = load_images(setup / "gen")
    assert imgs.shape == (60, 3, 64, 64) and imgs.dtype == torch.uint8
    prompts = (setup / "gen" / "prompts.txt").read_text().splitlines()
    assert caps[0] == caps[2] == prompts[0] and caps[3] == prompts[1] and caps[-1] == prompts[19]
    ref, ref_caps = load_images(setup / "ref", 32)
    assert ref.shape == (150, 3, 32, 32) and all(ref_caps)
    with pytest.raises(InputError, match="no images"):
        load_images(setup / "clip" / "samples")


def test_evaluate_ranks_good_images_above_noise(setup):
    scorer = load_clip(setup / "clip")
    ref, ref_caps = load_images(setup / "ref", 64)
    gen, gen_caps = load_images(setup / "gen", 64)
    noise, noise_caps = load_images(setup / "noise", 64)
    good = evaluate(gen, gen_caps, ref, ref_caps, clip=scorer)
    bad = evaluate(noise, noise_caps, ref, ref_caps, clip=scorer)
    assert good["feature_space"] == "clip" and "fid" not in good
    assert good["fid_clip"] < bad["fid_clip"]
    assert good["clip_score"] > bad["clip_score"] + 0.2
    assert good["is_clip_classes"] == len(set(ref_caps) | set(gen_caps))
    assert good["is_clip"] > bad["is_clip"]
    assert good["attributes"]["n"] == 60 and good["attributes"]["all_acc"] >= 0.95
    assert bad["attributes"]["all_acc"] < 0.3
    assert -1 <= good["clip_score_reference"] <= 1
    # shuffled captions score lower than the right ones
    shuffled = gen_caps[20:] + gen_caps[:20]
    assert evaluate(gen, shuffled, ref, ref_caps, clip=scorer)["clip_score"] < good["clip_score"]


def test_cli_report_paired_and_errors(setup, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert (
        main(
            ["eval", "--images", str(setup / "gen"), "--reference", str(setup / "ref"), "--clip", str(setup / "clip"), "--output", str(out)]
        )
        == 0
    )
    rep = json.loads(out.read_text())
    assert rep["n_images"] == 60 and rep["n_reference"] == 150 and math.isfinite(rep["fid_clip"])
    assert "fid_clip" in capsys.readouterr().out
    # paired PSNR/SSIM: a folder against itself
    out2 = tmp_path / "paired.json"
    assert main(["eval", "--images", str(setup / "noise"), "--reference", str(setup / "noise"), "--paired", "--output", str(out2)]) == 0
    rep = json.loads(out2.read_text())
    assert rep["psnr"] > 90 and rep["ssim"] == pytest.approx(1.0, abs=1e-4) and "fid_clip" not in rep
    assert main(["eval", "--images", str(setup / "gen"), "--reference", str(setup / "ref"), "--paired", "--output", str(out2)]) == 2
    assert "--paired" in capsys.readouterr().err
    assert main(["eval", "--images", str(tmp_path / "none*.png"), "--reference", str(setup / "ref"), "--output", str(out2)]) == 2
    assert "match no image" in capsys.readouterr().err
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"x")
    assert (
        main(
            ["eval", "--images", str(setup / "gen"), "--reference", str(setup / "ref"), "--inception", str(weights), "--output", str(out2)]
        )
        == 2
    )
    assert "inception" in capsys.readouterr().err.lower()
