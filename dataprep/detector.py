"""An analytic attribute detector for the synthetic shapes dataset, used to score generated images.

No learning: the attribute tables of `tessera.dataprep.synthetic` are the palette and the geometry.

    background  median of the border pixels, nearest background colour
    foreground  pixels whose distance to the background exceeds half the foreground's own
                distance (the 50 % crossing of the antialiased edge), largest connected component
    color       median of the component's interior pixels, nearest shape colour
    position    the component's centroid: "center" within CENTER_RADIUS of the middle, else a quadrant
    size        the bounding-box side (larger of width and height) against the midpoint of SIZES
    shape       two scale-free features: fill = area / bounding-box area (square ~1, circle ~pi/4,
                triangle ~1/2) and top_mass = fraction of the area in the box's upper half (an upright
                triangle ~1/4, circle and square ~1/2)

`detect` works on any size and never raises on odd content: an image with no foreground returns
None for shape, color, size and position (background is always guessed).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Sequence

import numpy as np

from tessera.core.errors import InputError
from tessera.dataprep.synthetic import BACKGROUNDS, COLORS, POSITIONS, SIZES

# A foreground needs some pixel at least this far (RGB Euclidean) from the background.
MIN_CONTRAST = 45.0
# Centroid within this distance (fraction of the side, per axis) of the middle counts as "center";
# the other positions lie 0.23 +- 0.03 away.
CENTER_RADIUS = 0.5 * abs(POSITIONS["top left"][0] - 0.5)
SIZE_THRESHOLD = 0.5 * (SIZES["small"] + SIZES["large"])
TRIANGLE_TOP_MASS = 0.375  # between 1/4 (triangle) and 1/2
SQUARE_FILL = 0.885
# Border pixels this far (90th percentile, RGB distance) from the background mark a grainy image;
# clean JPEGs of the dataset stay below ~6.
NOISY = 15.0  # between pi/4 ~ 0.785 (circle) and 1 (square)

_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[k] for k in _BG_NAMES], dtype=np.float32)
_FG_NAMES = list(COLORS)
_FG_RGB = np.array([COLORS[k] for k in _FG_NAMES], dtype=np.float32)


def _to_hwc_uint8(image: Any) -> np.ndarray:
    """PIL image, uint8 HxWx3, float HxWx3 / 3xHxW in [0, 1], or a torch tensor -> float32 HxWx3 in [0, 255]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        arr = np.asarray(image.convert("RGB"))
    else:
        if hasattr(image, "detach"):  # torch: uint8 stays uint8 (0..255), floats are in [0, 1]
            t = image.detach().cpu()
            image = t.float().numpy() if t.is_floating_point() else t.numpy()
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(f"detector: expected an RGB image (HxWx3 or 3xHxW), got shape {arr.shape}")
    is_float = arr.dtype.kind == "f"
    arr = np.nan_to_num(arr.astype(np.float32))
    if is_float:  # floats are in [0, 1]
        arr = arr * 255.0
    return np.clip(arr, 0, 255)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (BFS; images here are small)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, cur = 0, 0, 0
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if labels[y0, x0]:
            continue
        cur += 1
        labels[y0, x0] = cur
        q = deque([(y0, x0)])
        size = 0
        while q:
            y, x = q.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = cur
                    q.append((ny, nx))
        if size > best_size:
            best_label, best_size = cur, size
    return labels == best_label if best_label else np.zeros_like(mask)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    m = out.copy()
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def _median3(arr: np.ndarray) -> np.ndarray:
    """Per-channel 3x3 median filter (edges replicated)."""
    p = np.pad(arr, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = arr.shape[:2]
    stack = np.stack([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    return np.median(stack, axis=0)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (outside the image counts as background)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def features(image: Any) -> dict[str, Any]:
    """The measurements `detect` decides from (useful for debugging and thresholds)."""
    arr = _to_hwc_uint8(image)
    h, w, _ = arr.shape
    if h < 4 or w < 4:
        raise InputError(f"detector: image of {w}x{h} pixels is too small (need >= 4x4)")
    b = max(1, min(h, w) // 32)
    border = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3), arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    noise = float(np.percentile(np.linalg.norm(border - bg, axis=-1), 90))
    if noise > NOISY:
        # grainy image (a sampler's texture, sensor-like noise): a 3x3 median filter first
        arr = _median3(arr)
        border = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3), arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3)])
        bg = np.median(border, axis=0)
    dist = np.linalg.norm(arr - bg, axis=-1)
    out: dict[str, Any] = {"bg_rgb": bg, "height": h, "width": w, "noise": noise}
    peak = float(np.percentile(dist, 99.5))
    if peak < MIN_CONTRAST:
        return out
    # The foreground colour from clearly-foreground pixels, then the 50 % crossing of its edge.
    core = dist > 0.75 * peak
    fg = np.median(arr[core], axis=0)
    d_fg = float(np.linalg.norm(fg - bg))
    mask = dist > 0.5 * max(d_fg, MIN_CONTRAST)
    comp = _largest_component(mask)
    area = int(comp.sum())
    if area == 0:
        return out
    interior = comp & (dist > 0.75 * d_fg)
    color_rgb = np.median(arr[interior if interior.any() else comp], axis=0)
    # Soft coverage: the antialiased edge pixels count by their blend fraction, which makes the
    # area and extents sub-pixel accurate (a 14 px square would otherwise lose a partial row).
    region = _dilate(comp)
    # Only the edge ring is soft: inside the shape (pixels whose 4 neighbours are all foreground)
    # coverage is 1, so noise in the shape's colour does not eat into its area.
    alpha = np.where(region, np.clip(dist / max(d_fg, MIN_CONTRAST), 0.0, 1.0), 0.0)
    alpha[_erode(comp)] = 1.0
    soft_area = float(alpha.sum())
    col = alpha.max(axis=0)
    row = alpha.max(axis=1)
    bw, bh = float(col.sum()), float(row.sum())
    yy = np.arange(h, dtype=np.float32) + 0.5
    xx = np.arange(w, dtype=np.float32) + 0.5
    prof_y = alpha.sum(axis=1)
    # box top from the soft extent: the first row holding any coverage, less its missing fraction
    first = int(np.argmax(row > 0))
    top = first + (1.0 - row[first])
    mid = top + bh / 2
    upper = float((prof_y * np.clip(mid - (yy - 0.5), 0.0, 1.0)).sum())
    out.update(
        fg_rgb=color_rgb,
        area=area,
        area_frac=soft_area / (h * w),
        cx=float((alpha.sum(axis=0) * xx).sum() / soft_area) / w,
        cy=float((prof_y * yy).sum() / soft_area) / h,
        box_side=max(bw / w, bh / h),
        fill=soft_area / max(bw * bh, 1e-6),
        top_mass=upper / soft_area,
    )
    return out


def _nearest(rgb: np.ndarray, names: list[str], table: np.ndarray) -> str:
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=-1)))]


def detect(image: Any) -> dict[str, str | None]:
    """{"color", "shape", "size", "position", "background"} of one image (PIL, uint8 HxWx3, float in [0, 1])."""
    f = features(image)
    result: dict[str, str | None] = {
        "color": None,
        "shape": None,
        "size": None,
        "position": None,
        "background": _nearest(f["bg_rgb"], _BG_NAMES, _BG_RGB),
    }
    if "area" not in f:
        return result
    result["color"] = _nearest(f["fg_rgb"], _FG_NAMES, _FG_RGB)
    if f["top_mass"] < TRIANGLE_TOP_MASS:
        result["shape"] = "triangle"
    elif f["fill"] >= SQUARE_FILL:
        result["shape"] = "square"
    else:
        result["shape"] = "circle" if f["fill"] >= 0.64 else "triangle"
    result["size"] = "large" if f["box_side"] >= SIZE_THRESHOLD else "small"
    dx, dy = f["cx"] - 0.5, f["cy"] - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        result["position"] = "center"
    else:
        result["position"] = ("top" if dy < 0 else "bottom") + " " + ("left" if dx < 0 else "right")
    return result


def _split_batch(images: Any) -> list[Any]:
    if hasattr(images, "detach") or isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 3:
            return [arr]
        return [arr[i] for i in range(arr.shape[0])]
    return list(images)


def score(images: Any, attrs_list: Sequence[dict[str, str]] | Iterable[Any]) -> dict[str, float]:
    """Per-attribute agreement of `detect` with the intended attributes.

    `images`: a list of PIL / HxWx3 arrays, or a batch (B, 3, H, W) float in [0, 1] or (B, H, W, 3).
    `attrs_list`: dicts (or `Attrs`) with the intended attributes. Returns color_acc, shape_acc,
    position_acc, size_acc, background_acc, all_acc (all four object attributes right) and n.
    """
    imgs = _split_batch(images)
    attrs = [a.as_dict() if hasattr(a, "as_dict") else dict(a) for a in attrs_list]
    if len(imgs) != len(attrs):
        raise InputError(f"detector.score: {len(imgs)} images but {len(attrs)} attribute rows")
    if not imgs:
        raise InputError("detector.score: no images to score")
    keys = ("color", "shape", "position", "size", "background")
    hits = {k: 0 for k in keys}
    all_hits = 0
    for img, a in zip(imgs, attrs):
        d = detect(img)
        ok = {k: d[k] == a.get(k) for k in keys}
        for k in keys:
            hits[k] += ok[k]
        all_hits += all(ok[k] for k in ("color", "shape", "position", "size"))
    n = len(imgs)
    out = {f"{k}_acc": hits[k] / n for k in keys}
    out["all_acc"] = all_hits / n
    out["n"] = n
    return out


__all__ = ["detect", "features", "score"]
