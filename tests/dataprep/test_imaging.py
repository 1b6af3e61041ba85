"""Decoding and resizing: modes, draft decoding, bomb guard before decoding, orientation, alpha, formats."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from crawl_helpers import noisy_jpeg, png_header_bomb
from PIL import Image

from tessera.dataprep.imaging import ImageReject, ImageSpec, dhash, process_image


def _png(mode, size, color):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode, expect", [("center_crop", (32, 32)), ("keep_ratio", (43, 32)), ("border", (32, 32))])
def test_resize_modes(mode, expect):
    out = process_image(noisy_jpeg(1, (96, 72)), ImageSpec(size=32, resize=mode))
    im = Image.open(io.BytesIO(out.data))
    assert im.size == expect == (out.width, out.height) and im.format == "JPEG"
    assert (out.original_width, out.original_height) == (96, 72)
    if mode == "border":  # 96x72 -> 32x24 plus 4-pixel black bands top and bottom
        a = np.asarray(im).astype(int)
        assert a[:3].mean() < 8 and a[-3:].mean() < 8 and a[8:24].mean() > 40


def test_draft_decoding_matches_full_decode():
    yy, xx = np.mgrid[0:384, 0:512]
    smooth = np.stack([xx / 2, yy / 1.5, (xx + yy) / 4], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    fast = np.asarray(Image.open(io.BytesIO(process_image(data, ImageSpec(size=64, quality=100)).data))).astype(float)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS, box=(64, 0, 448, 384))
    diff = np.abs(fast - np.asarray(full).astype(float)).mean()
    assert diff < 3.0, diff  # DCT-domain scaling differs from a full decode only slightly


def test_bomb_rejected_before_decoding():
    data = png_header_bomb(20000, 20000)
    t = time.perf_counter()
    with pytest.raises(ImageReject) as e:
        process_image(data, ImageSpec(max_pixels=100_000_000))
    assert e.value.reason == "decompression_bomb" and time.perf_counter() - t < 0.5


def test_size_and_aspect_filters_and_garbage():
    with pytest.raises(ImageReject) as e:
        process_image(noisy_jpeg(1, (96, 72)), ImageSpec(min_image_size=80))
    assert (e.value.status, e.value.reason) == ("filtered", "too_small")
    with pytest.raises(ImageReject) as e:
        process_image(noisy_jpeg(1, (200, 40)), ImageSpec(max_aspect_ratio=3.0))
    assert e.value.reason == "aspect_ratio"
    data = noisy_jpeg(2)
    for bad in (b"<html></html>", data[: len(data) // 2], b""):
        with pytest.raises(ImageReject) as e:
            process_image(bad, ImageSpec())
        assert (e.value.status, e.value.reason) == ("failed_to_decode", "not_an_image")


def test_alpha_on_white_orientation_and_webp():
    out = process_image(_png("RGBA", (40, 40), (255, 0, 0, 0)), ImageSpec(size=16, output_format="webp"))
    im = Image.open(io.BytesIO(out.data))
    assert im.format == "WEBP" and np.asarray(im.convert("RGB")).min() > 240  # transparent -> white
    # EXIF orientation 6 (rotate 90): a 60x30 stored image is shown 30x60
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 30), (0, 0, 255)).save(buf, format="JPEG", exif=exif)
    out = process_image(buf.getvalue(), ImageSpec(size=10, resize="keep_ratio"))
    assert (out.width, out.height) == (10, 20)


def test_dhash_near_and_far():
    a = Image.open(io.BytesIO(noisy_jpeg(5, (96, 72))))
    b = a.resize((80, 60)).convert("RGB")
    c = Image.open(io.BytesIO(noisy_jpeg(6, (96, 72))))
    ha, hb, hc = dhash(a), dhash(b), dhash(c)
    assert bin(ha ^ hb).count("1") <= 6 < bin(ha ^ hc).count("1")
