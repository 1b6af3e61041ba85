"""The embedded demo dataset: coloured shapes of a few sizes at a few positions over plain backgrounds.

Each image shows one shape; its caption names every attribute, e.g.
"a small red circle at the top left on a gray background". The attribute tables below are the
single source of truth: the caption template, the renderer and `tessera.dataprep.detector` all read them.

A fraction of the attribute combinations is held out of training (`split_combinations`); the
evaluation images use only those, so a model that composes attributes can be told apart from one
that memorised pairs.

Images are rendered at `source_size` (square, 2x supersampled for antialiasing) and written as
JPEG with two url lists (`train.parquet`, `eval.parquet`) whose `url` column is a path relative to
the output folder; `serve(directory)` starts a local HTTP server and `write_url_lists(...)` turns the
lists into absolute URLs for the crawler.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing as mp
import os
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from tessera.core.errors import InputError
from tessera.core.progress import bar
from tessera.dataprep.config import SyntheticConfig

# --------------------------------------------------------------------------------------------
# Attribute tables (the single source of truth)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Well-separated hues that stay apart after JPEG chroma subsampling and a 64 px resize, and each
# far (RGB distance >= 90) from every background below.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 185),
    "orange": (245, 130, 20),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (18, 18, 18),
}

# Side of the shape's bounding box as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.22, "large": 0.38}

# Centre of the shape (its area centroid) as (x, y) fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "position", "background")

# Random variation so that no two images are identical (fractions of the image side / of the size).
POSITION_JITTER = 0.03
SIZE_JITTER = 0.10
COLOR_JITTER = 10  # per channel, shape and background independently
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Attrs:
    """One attribute combination."""

    shape: str
    color: str
    size: str
    position: str
    background: str

    def as_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ATTRIBUTES}


_CAPTION_INDEX: dict[str, "Attrs"] = {}


def _as_attrs(attrs: Attrs | dict[str, str]) -> Attrs:
    if isinstance(attrs, Attrs):
        return attrs
    try:
        a = Attrs(**{k: attrs[k] for k in ATTRIBUTES})
    except KeyError as e:
        raise InputError(f"synthetic attributes: missing key {e.args[0]!r}; expected {', '.join(ATTRIBUTES)}") from None
    tables = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}
    for k, table in tables.items():
        if getattr(a, k) not in table:
            raise InputError(f"synthetic attribute {k}={getattr(a, k)!r}: expected one of {', '.join(table)}")
    return a


def all_combinations() -> list[Attrs]:
    """Every (shape, color, size, position, background) combination, in a fixed order."""
    return [Attrs(*c) for c in itertools.product(SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS)]


def split_combinations(holdout_fraction: float, seed: int = 0) -> tuple[list[Attrs], list[Attrs]]:
    """Deterministically split the combinations into (train, held out).

    The held-out set never takes the last training combination of any attribute value, so every
    single value (e.g. "purple", "bottom left") is still seen in training.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise InputError(f"holdout_fraction: expected in [0, 1), got {holdout_fraction}")
    combos = all_combinations()
    n_hold = int(round(holdout_fraction * len(combos)))
    order = np.random.default_rng(seed).permutation(len(combos))
    counts = {(k, getattr(c, k)): 0 for c in combos for k in ATTRIBUTES}
    for c in combos:
        for k in ATTRIBUTES:
            counts[(k, getattr(c, k))] += 1
    held: set[int] = set()
    for i in order:
        if len(held) >= n_hold:
            break
        c = combos[i]
        if all(counts[(k, getattr(c, k))] > 1 for k in ATTRIBUTES):
            held.add(int(i))
            for k in ATTRIBUTES:
                counts[(k, getattr(c, k))] -= 1
    train = [c for i, c in enumerate(combos) if i not in held]
    heldout = [c for i, c in enumerate(combos) if i in held]
    return train, heldout


def caption(attrs: Attrs | dict[str, str]) -> str:
    """'a small red circle at the top left on a gray background' / '... in the center on ...'."""
    a = _as_attrs(attrs)
    where = "in the center" if a.position == "center" else f"at the {a.position}"
    return f"a {a.size} {a.color} {a.shape} {where} on a {a.background} background"


def parse_caption(text: str) -> Attrs | None:
    """The attributes of a caption written by `caption` (case and spacing ignored), else None."""
    words = " ".join(str(text).lower().split())
    return _CAPTION_INDEX.get(words)


# --------------------------------------------------------------------------------------------
# Rendering


def _jitter_color(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    d = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + d, 0, 255))


def render(attrs: Attrs | dict[str, str], size: int = 128, rng: np.random.Generator | None = None) -> Image.Image:
    """One RGB image of side `size`: the shape's area centroid at the position, antialiased by supersampling."""
    a = _as_attrs(attrs)
    if size < 8:
        raise InputError(f"synthetic render size: expected >= 8 pixels, got {size}")
    rng = rng if rng is not None else np.random.default_rng()
    ss = size * SUPERSAMPLE
    bg = _jitter_color(BACKGROUNDS[a.background], rng)
    fg = _jitter_color(COLORS[a.color], rng)
    img = Image.new("RGB", (ss, ss), bg)
    draw = ImageDraw.Draw(img)
    side = SIZES[a.size] * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * ss
    px, py = POSITIONS[a.position]
    cx = (px + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * ss
    cy = (py + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * ss
    h = side / 2
    if a.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fg)
    elif a.shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fg)
    else:  # upright isosceles triangle, base = height = side; its centroid lies side/6 below the box centre
        top = cy - 2 * side / 3
        bottom = cy + side / 3
        draw.polygon([(cx, top), (cx + h, bottom), (cx - h, bottom)], fill=fg)
    return img.resize((size, size), Image.Resampling.BOX)


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _render_job(job: tuple[str, dict[str, str], int, int, int]) -> None:
    path, attrs, size, quality, seed = job
    img = render(attrs, size, np.random.default_rng(seed))
    _write_atomic(Path(path), _encode_jpeg(img, quality))


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:

    cols = list(rows[0].keys()) if rows else ["url", "caption", *ATTRIBUTES]
    table = pa.table({c: [r[c] for r in rows] for c in cols})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    tmp.replace(path)


def generate(out_dir: str | Path, cfg: SyntheticConfig | None = None, seed: int = 0, processes: int | None = None) -> dict[str, Any]:
    """Write the dataset under `out_dir` and return a summary.

    Layout: images/train/NNNNNN.jpg, images/eval/NNNNNN.jpg, train.parquet, eval.parquet (columns
    url [relative to out_dir], caption, shape, color, size, position, background) and
    synthetic.json (the config, the seed, and the held-out combinations). Training images draw
    uniformly from the training combinations, eval images from the held-out ones (from all
    combinations when holdout_fraction is 0).
    """

    cfg = cfg or SyntheticConfig()
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_combos, held = split_combinations(cfg.holdout_fraction, seed)
    eval_combos = held or train_combos
    rng = np.random.default_rng(seed)
    jobs = []
    lists: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for split, n, combos in (("train", cfg.num_train, train_combos), ("eval", cfg.num_eval, eval_combos)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        picks = rng.integers(0, len(combos), size=n)
        seeds = rng.integers(0, 2**63 - 1, size=n)
        for i, (p, s) in enumerate(zip(picks, seeds)):
            a = combos[int(p)]
            rel = f"images/{split}/{i:06d}.jpg"
            jobs.append((str(out / rel), a.as_dict(), cfg.source_size, cfg.jpeg_quality, int(s)))
            lists[split].append({"url": rel, "caption": caption(a), **a.as_dict()})
    n_proc = processes if processes is not None else min(os.cpu_count() or 1, 8)
    with bar(len(jobs), "synthetic images", "img") as pb:
        # a daemonic process (e.g. a pool worker) may not start children: render serially there
        if n_proc > 1 and len(jobs) >= 200 and not mp.current_process().daemon:
            with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(n_proc) as pool:
                for _ in pool.imap_unordered(_render_job, jobs, chunksize=64):
                    pb.update(1)
        else:
            for j in jobs:
                _render_job(j)
                pb.update(1)
    _write_parquet(lists["train"], out / "train.parquet")
    _write_parquet(lists["eval"], out / "eval.parquet")
    summary = {
        "train": str(out / "train.parquet"),
        "eval": str(out / "eval.parquet"),
        "num_train": len(lists["train"]),
        "num_eval": len(lists["eval"]),
        "train_combinations": len(train_combos),
        "heldout_combinations": [a.as_dict() for a in held],
        "seed": seed,
        "source_size": cfg.source_size,
    }
    _write_atomic(out / "synthetic.json", json.dumps(summary, indent=2).encode())
    return summary


def write_url_lists(data_dir: str | Path, base_url: str, out_dir: str | Path | None = None) -> dict[str, str]:
    """Rewrite train.parquet/eval.parquet with absolute URLs (`base_url` + relative path).

    Writes `train_urls.parquet` and `eval_urls.parquet` (into `out_dir`, default `data_dir`) and
    returns {"train": path, "eval": path}.
    """

    data_dir = Path(data_dir)
    out = Path(out_dir) if out_dir is not None else data_dir
    out.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/") + "/"
    result = {}
    for split in ("train", "eval"):
        src = data_dir / f"{split}.parquet"
        if not src.is_file():
            raise InputError(f"synthetic url list '{src}' does not exist (run `tessera prep synthetic` first)")
        rows = pq.read_table(src).to_pylist()
        for r in rows:
            r["url"] = base + r["url"].lstrip("/")
        dst = out / f"{split}_urls.parquet"
        _write_parquet(rows, dst)
        result[split] = str(dst)
    return result


# --------------------------------------------------------------------------------------------
# A local HTTP server for the crawler


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass


class FileServer(ThreadingHTTPServer):
    """A threaded static-file server on 127.0.0.1; `stop()` (or leaving a `with` block) shuts it down."""

    daemon_threads = True
    # the crawler opens up to processes x threads connections at once (the demo: 2 x 16); with socketserver's backlog
    # of 5 the kernel dropped the others' SYNs and their clients retried after a second: the demo's 100-image eval crawl
    # took 1.1-1.3 s at 16 threads, 0.13 s at 4 (machine D)
    request_queue_size = 128

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> "FileServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(directory: str | Path) -> tuple[FileServer, str]:
    """Serve `directory` on 127.0.0.1 at an ephemeral port from a background thread: (server, base_url)."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"directory to serve '{d}' does not exist")

    def handler(*args: Any, **kw: Any) -> _QuietHandler:
        return _QuietHandler(*args, directory=str(d), **kw)

    server = FileServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="synthetic-http", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}/"


_CAPTION_INDEX.update({caption(a): a for a in all_combinations()})

__all__ = [
    "SHAPES",
    "parse_caption",
    "COLORS",
    "BACKGROUNDS",
    "SIZES",
    "POSITIONS",
    "ATTRIBUTES",
    "Attrs",
    "all_combinations",
    "split_combinations",
    "caption",
    "render",
    "generate",
    "write_url_lists",
    "serve",
    "FileServer",
]


def iter_rows(url_list: str | Path) -> Iterable[dict[str, Any]]:
    """The rows of a synthetic url list (parquet) as dicts."""

    p = Path(url_list)
    if not p.is_file():
        raise InputError(f"synthetic url list '{p}' does not exist")
    return pq.read_table(p).to_pylist()
