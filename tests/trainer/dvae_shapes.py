"""Test/scratch data for the dVAE: coloured shapes on flat backgrounds, written as image shards
in the crawler's webdataset layout (CONTRACTS.md item 2: {key}.jpg + .txt + .json in {shard:05d}.tar)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


def shape_image(rng: random.Random, size: int = 64) -> tuple[Image.Image, str]:
    names = list(COLOURS)
    bg = rng.choice(names)
    fg = rng.choice([n for n in names if n != bg])
    shape = rng.choice(SHAPES)
    img = Image.new("RGB", (size, size), COLOURS[bg])
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 8, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[fg])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
    return img, f"a {fg} {shape} on a {bg} background"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_shape_shards(folder: str | Path, n_shards: int, per_shard: int, size: int = 64, seed: int = 0, quality: int = 95) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for s in range(n_shards):
        p = folder / f"{s:05d}.tar"
        with tarfile.open(p, "w") as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                img, cap = shape_image(rng, size)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=quality)
                _add(tf, f"{key}.jpg", buf.getvalue())
                _add(tf, f"{key}.txt", cap.encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "caption": cap, "status": "success"}).encode())
        paths.append(p)
    return paths
