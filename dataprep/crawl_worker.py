"""The worker side of `tessera prep crawl` (tessera.dataprep.crawl): what each spawned worker process runs.

A module of its own so that a worker imports only what it uses: neither tessera.trainer nor torch (1.5-2 s of start-up
per process), unless the crawl filters by image-text similarity, whose scorer loader the main process then passes in.
"""

from __future__ import annotations

import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from PIL import Image

from tessera.dataprep.config import CrawlConfig
from tessera.dataprep.download import Downloader, DownloadError
from tessera.dataprep.filters import DedupIndex, check_caption, decode_caption, load_scorer
from tessera.dataprep.imaging import ImageReject, ImageSpec, process_image
from tessera.dataprep.writer import make_key

# --------------------------------------------------------------------------------------------
# Worker side (runs in each worker process; state in one dict set by the initializer)

_W: dict[str, Any] = {}


def _init_worker(cfg: CrawlConfig, progress_q: Any, parent_pid: int, scorer_factory: Callable[..., Any] | None = None) -> None:
    """Set up this worker: the config, the progress queue, the downloader, the image spec, the thread pool and, with
    `scorer_factory` (tessera.trainer.clip.load_scorer when the crawl filters by similarity), the scorer."""

    f = cfg.filters
    _W["cfg"] = cfg
    _W["progress"] = progress_q
    _W["parent"] = parent_pid
    _W["downloader"] = Downloader(
        timeout=cfg.timeout,
        retries=cfg.retries,
        max_bytes=cfg.max_bytes,
        max_redirects=cfg.max_redirects,
        allowed_schemes=cfg.allowed_schemes,
        user_agent=cfg.user_agent,
        respect_robots_header=cfg.respect_robots_header,
        backoff=cfg.retry_backoff,
        pool_size=cfg.threads,
    )
    _W["spec"] = ImageSpec(
        size=cfg.image_size,
        resize=cfg.resize,
        output_format=cfg.output_format,
        quality=cfg.quality,
        max_pixels=f.max_pixels,
        min_image_size=f.min_image_size,
        max_aspect_ratio=f.max_aspect_ratio,
        phash=f.dedup_near,
    )
    _W["pool"] = ThreadPoolExecutor(cfg.threads, thread_name_prefix="crawl")
    _W["scorer"] = load_scorer(f.similarity_model, default=scorer_factory) if scorer_factory is not None else None


class _Progress:
    """Batches (rows, successes) increments to the main process a few times a second."""

    def __init__(self, q: Any):
        self.q = q
        self.lock = threading.Lock()
        self.rows = 0
        self.ok = 0
        self.last = time.monotonic()

    def add(self, ok: bool) -> None:
        with self.lock:
            self.rows += 1
            self.ok += int(ok)
            now = time.monotonic()
            if now - self.last > 0.25:
                self._flush(now)

    def _flush(self, now: float) -> None:
        if self.q is not None and self.rows:
            self.q.put((self.rows, self.ok))
        self.rows = self.ok = 0
        self.last = now

    def flush(self) -> None:
        with self.lock:
            self._flush(time.monotonic())


def _process_row(shard: int, idx: int, row: tuple, progress: _Progress) -> tuple[dict, dict | None]:

    if os.getppid() != _W["parent"]:  # the crawl that started us is gone (e.g. kill -9): stop now
        os._exit(3)
    cfg: CrawlConfig = _W["cfg"]
    f = cfg.filters
    row_index, url, cap_raw, extra = row
    caption, valid = decode_caption(cap_raw)
    rec: dict[str, Any] = {
        "key": make_key(shard, idx, cfg.shard_size),
        "url": url,
        "caption": caption,
        "status": "success",
        "reason": None,
        "error_message": None,
        "width": None,
        "height": None,
        "original_width": None,
        "original_height": None,
        "sha256": None,
        "extra": extra,
    }
    sample = None
    rej = check_caption(
        caption, valid, min_chars=f.min_caption_chars, max_chars=f.max_caption_chars, reject_non_utf8=f.reject_non_utf8_captions
    )
    if rej is not None:
        rec.update(status="filtered", reason=rej[0], error_message=rej[1])
    else:
        try:
            body = _W["downloader"].fetch(url).body
            img = process_image(body, _W["spec"])
        except DownloadError as e:
            rec.update(status="failed_to_download", reason=e.reason, error_message=e.message)
        except ImageReject as e:
            rec.update(status=e.status, reason=e.reason, error_message=e.message)
        except Exception as e:  # a URL or response nobody foresaw must cost one row, not the crawl
            rec.update(status="failed_to_download", reason="unexpected_error", error_message=f"{type(e).__name__}: {str(e)[:200]}")
        else:
            rec.update(
                width=img.width,
                height=img.height,
                original_width=img.original_width,
                original_height=img.original_height,
                sha256=img.sha256,
            )
            sample = {"key": rec["key"], "image": img.data, "caption": caption, "phash": img.phash}
    progress.add(sample is not None)
    return rec, sample


def _sample_json(rec: dict, phash: int | None) -> dict:
    j = {
        k: rec[k]
        for k in ("url", "caption", "key", "status", "error_message", "width", "height", "original_width", "original_height", "sha256")
    }
    if phash is not None:
        j["phash"] = f"{phash:016x}"
    for k, v in rec["extra"].items():
        j[k] = v
    return j


def _score(samples: list[dict], rows_by_key: dict[str, dict], threshold: float) -> list[dict]:

    scorer = _W["scorer"]
    kept = []
    for i in range(0, len(samples), 64):
        batch = samples[i : i + 64]
        images = [Image.open(io.BytesIO(s["image"])).convert("RGB") for s in batch]
        scores = list(scorer.score(images, [s["caption"] for s in batch]))
        if len(scores) != len(batch):
            raise RuntimeError(f"similarity scorer returned {len(scores)} scores for {len(batch)} pairs")
        for s, sc in zip(batch, scores):
            if float(sc) >= threshold:
                kept.append(s)
            else:
                rows_by_key[s["key"]].update(
                    status="filtered", reason="low_similarity", error_message=f"image-text similarity {float(sc):.3f} < {threshold:g}"
                )
    return kept


def process_shard(shard: int, rows: list[tuple]) -> dict:
    """Download and process one shard's rows; returns {'rows': [...], 'samples': [...]} in row order.

    Samples are deduplicated within the shard (earlier row wins); cross-shard duplicates are the
    main process's business.
    """

    cfg: CrawlConfig = _W["cfg"]
    progress = _Progress(_W["progress"])
    start = time.time()
    futures = [_W["pool"].submit(_process_row, shard, i, row, progress) for i, row in enumerate(rows)]
    recs, samples = [], []
    for fut in futures:
        rec, sample = fut.result()
        recs.append(rec)
        if sample is not None:
            samples.append(sample)
    progress.flush()
    by_key = {r["key"]: r for r in recs}
    f = cfg.filters
    if _W["scorer"] is not None and samples:
        samples = _score(samples, by_key, f.similarity_threshold)
    if f.dedup_exact or f.dedup_near:
        index = DedupIndex(f.dedup_exact, f.dedup_near, f.near_dup_bits)
        kept = []
        for s in samples:
            rec = by_key[s["key"]]
            dup = index.find(rec["sha256"], s["phash"])
            if dup:
                rec.update(status="filtered", reason=dup[0], error_message=f"{dup[0].replace('_', ' ')} of {dup[1]}")
            else:
                index.add(s["key"], rec["sha256"], s["phash"])
                kept.append(s)
        samples = kept
    for s in samples:
        s["json"] = _sample_json(by_key[s["key"]], s["phash"])
    return {"shard": shard, "rows": recs, "samples": samples, "start_time": start}


def _run_shard_in_worker(shard: int, rows: list[tuple]) -> dict:
    return process_shard(shard, rows)
