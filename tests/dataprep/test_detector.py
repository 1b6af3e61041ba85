import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tessera.core.errors import InputError
from tessera.dataprep import synthetic as S
from tessera.dataprep.detector import detect, features, score


def crawl_like(img: Image.Image, size: int = 64, quality: int = 95) -> Image.Image:
    """What the crawler does to a served image: JPEG, center crop, resize, JPEG again."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _sample(n, seed, size=64):
    rng = np.random.default_rng(seed)
    combos = S.all_combinations()
    attrs = [combos[i] for i in rng.integers(0, len(combos), size=n)]
    return [crawl_like(S.render(a, 128, rng), size) for a in attrs], attrs


def test_agreement_after_crawler_pipeline_at_64px():
    imgs, attrs = _sample(600, seed=11)
    r = score(imgs, attrs)
    assert r["n"] == 600
    for k in ("color_acc", "shape_acc", "position_acc", "size_acc", "background_acc"):
        assert r[k] >= 0.98, (k, r)
    assert r["all_acc"] >= 0.97


def test_other_sizes_and_input_layouts():
    imgs, attrs = _sample(100, seed=12, size=128)
    assert score(imgs, attrs)["all_acc"] >= 0.97
    imgs, attrs = _sample(100, seed=13, size=32)
    assert score(imgs, attrs)["all_acc"] >= 0.9
    # float batch (B, 3, H, W) in [0, 1], as the samplers produce
    imgs, attrs = _sample(20, seed=14)
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in imgs])
    assert score(batch, attrs)["all_acc"] == score(imgs, attrs)["all_acc"] >= 0.9
    assert detect(batch[0]) == detect(imgs[0]) == detect(np.asarray(imgs[0]))
    # uint8 tensors (B, 3, H, W) are 0..255, not [0, 1]
    as_uint8 = (batch * 255).round().to(torch.uint8)
    assert score(as_uint8, attrs)["all_acc"] == score(imgs, attrs)["all_acc"]


def test_grainy_and_blurred_images_keep_high_agreement():
    imgs, attrs = _sample(150, seed=15)
    rng = np.random.default_rng(0)
    noisy = [np.clip(np.asarray(im).astype(float) + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8) for im in imgs]
    assert score(noisy, attrs)["all_acc"] >= 0.95
    blurred = [im.filter(ImageFilter.GaussianBlur(1.5)) for im in imgs]
    assert score(blurred, attrs)["all_acc"] >= 0.95


def test_a_known_image():
    img = crawl_like(S.render(S.Attrs("triangle", "orange", "small", "bottom left", "black"), 128, np.random.default_rng(0)))
    assert detect(img) == {"color": "orange", "shape": "triangle", "size": "small", "position": "bottom left", "background": "black"}


def test_blurry_and_noisy_images_give_best_guesses():
    rng = np.random.default_rng(1)
    a = S.Attrs("circle", "green", "large", "top right", "white")
    img = crawl_like(S.render(a, 128, rng)).filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img).astype(float) + rng.normal(0, 20, size=(64, 64, 3))
    d = detect(np.clip(arr, 0, 255).astype(np.uint8))
    assert d["color"] == "green" and d["position"] == "top right" and d["size"] == "large" and d["background"] == "white"
    # two blobs: the larger one wins
    two = np.asarray(S.render(S.Attrs("square", "red", "large", "top left", "gray"), 64, rng)).copy()
    two[50:56, 50:56] = S.COLORS["blue"]
    d = detect(two)
    assert d["color"] == "red" and d["position"] == "top left" and d["shape"] == "square"
    # pure noise and garbage never crash and give valid labels or None
    for garbage in (rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8), rng.random((3, 16, 16)).astype(np.float32)):
        d = detect(garbage)
        assert set(d) == {"color", "shape", "size", "position", "background"}
        assert d["background"] in S.BACKGROUNDS
        assert d["shape"] in (None, *S.SHAPES) and d["color"] in (None, *S.COLORS)


def test_empty_foreground_returns_none():
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    d = detect(flat)
    assert d == {"color": None, "shape": None, "size": None, "position": None, "background": "gray"}
    nan = np.full((3, 32, 32), np.nan, dtype=np.float32)
    assert detect(nan)["shape"] is None
    assert "area" not in features(flat)


def test_bad_input():
    with pytest.raises(InputError, match="RGB image"):
        detect(np.zeros((64, 64)))
    with pytest.raises(InputError, match="too small"):
        detect(np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="2 images but 1"):
        score([np.zeros((8, 8, 3), np.uint8)] * 2, [S.Attrs("circle", "red", "small", "center", "gray")])
