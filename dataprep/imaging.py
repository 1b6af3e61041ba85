"""Decoding, checking and resizing downloaded images.

`process_image(data, spec)` opens the bytes lazily (header only), rejects decompression bombs from
the header's pixel count BEFORE any pixel is decoded, applies the size/aspect filters on the
original size, decodes JPEGs with DCT-domain downscaling (Pillow `draft`) when the target is much
smaller, applies EXIF orientation, flattens transparency onto white, resizes (img2dataset's modes)
and encodes as JPEG or WebP. Failures raise `ImageReject(status, reason, message)`.

Resize modes (as img2dataset's):
- center_crop: the shorter side becomes `size`, then the centre `size x size` is cut out;
- keep_ratio:  the shorter side becomes `size`, the aspect ratio is kept;
- border:      the longer side becomes `size`, then black borders make it `size x size`.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tessera.core.atomic import atomic_write_bytes

if TYPE_CHECKING:  # the crawler's worker processes import this module: no torch there (1.5-2 s each)
    import torch

# We check the pixel count ourselves (max_pixels), before decoding; Pillow's own guard would
# raise or warn at a fixed limit instead.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

RESIZE_MODES = ("center_crop", "keep_ratio", "border")


class ImageReject(Exception):
    def __init__(self, status: str, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ImageSpec:
    size: int = 64
    resize: str = "center_crop"
    output_format: str = "jpg"
    quality: int = 95
    max_pixels: int = 89_478_485
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0
    phash: bool = False


@dataclass
class ProcessedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str
    phash: int | None


def target_size(w: int, h: int, size: int, mode: str) -> tuple[int, int]:
    """Output (width, height) for an oriented source of w x h."""
    if mode == "center_crop" or mode == "border":
        return size, size
    if mode == "keep_ratio":
        if w <= h:
            return size, max(1, round(h * size / w))
        return max(1, round(w * size / h)), size
    raise ValueError(f"resize mode {mode!r}; expected one of {RESIZE_MODES}")


def resize(im: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize an RGB image with one of RESIZE_MODES."""
    w, h = im.size
    if mode == "center_crop":
        side = min(w, h)
        left = (w - side) / 2
        top = (h - side) / 2
        # One resampling pass over the crop box (no intermediate image).
        return im.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side), reducing_gap=3.0)
    if mode == "keep_ratio":
        return im.resize(target_size(w, h, size, mode), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if mode == "border":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        small = im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = Image.new("RGB", (size, size), (0, 0, 0))
        out.paste(small, ((size - nw) // 2, (size - nh) // 2))
        return out
    raise ValueError(f"resize mode {mode!r}; expected one of {RESIZE_MODES}")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() or 1.0
        im = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


def dhash(im: Image.Image) -> int:
    """64-bit difference hash (a perceptual hash): robust to re-encoding and rescaling."""
    g = np.asarray(im.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def encode(im: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"output format {fmt!r}; expected jpg or webp")
    return buf.getvalue()


def process_image(data: bytes, spec: ImageSpec) -> ProcessedImage:
    """Check, decode, resize and encode one downloaded image (see the module docstring)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except Exception as e:
        msg = "unknown image format" if isinstance(e, UnidentifiedImageError) else _short(e)
        raise ImageReject("failed_to_decode", "not_an_image", f"not a decodable image: {msg}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageReject("failed_to_decode", "not_an_image", f"image has size {w}x{h}")
    if spec.max_pixels and w * h > spec.max_pixels:
        raise ImageReject("failed_to_decode", "decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds max_pixels {spec.max_pixels}")
    if spec.min_image_size and min(w, h) < spec.min_image_size:
        raise ImageReject("filtered", "too_small", f"shorter side {min(w, h)} < min_image_size {spec.min_image_size}")
    if spec.max_aspect_ratio and max(w, h) / min(w, h) > spec.max_aspect_ratio:
        raise ImageReject(
            "filtered", "aspect_ratio", f"aspect ratio {max(w, h) / min(w, h):.2f} > max_aspect_ratio {spec.max_aspect_ratio:g}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if im.format == "JPEG":
                # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 while every side that the
                # resize needs stays >= the target (draft keeps both requested sides).
                s = spec.size
                if spec.resize == "border":
                    m = max(w, h)
                    req = (max(1, -(-w * s // m)), max(1, -(-h * s // m)))
                else:
                    req = (s, s)
                im.draft("RGB", req)
            im.load()
            im = ImageOps.exif_transpose(im) or im
            im = _to_rgb(im)
            out = resize(im, spec.size, spec.resize)
            ph = dhash(out) if spec.phash else None
            payload = encode(out, spec.output_format, spec.quality)
    except ImageReject:
        raise
    except Exception as e:  # truncated data, corrupt streams, unsupported modes
        raise ImageReject("failed_to_decode", "not_an_image", f"not a decodable image: {_short(e)}") from None
    return ProcessedImage(
        data=payload,
        width=out.size[0],
        height=out.size[1],
        original_width=w,
        original_height=h,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=ph,
    )


def _short(e: BaseException) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s[:200]


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, pad: int = 2) -> None:
    """Write a (N, 3, H, W) batch in [0, 1] as one PNG grid (atomically)."""
    images = images.detach().float().clamp(0, 1).cpu().numpy()
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    arr = (grid * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
