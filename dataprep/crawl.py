"""`tessera prep crawl`: download, filter, resize and shard a (url, caption) list.

How a crawl runs
1. The url list is read (tessera.dataprep.readers) and cut into shards of `shard_size` rows: shard `s`
   holds rows `[s * shard_size, (s+1) * shard_size)` whatever the partitioning, so shard ids of
   different parts never collide. `--part I/N` takes the I-th of N contiguous blocks of shards.
2. Shards whose `_stats.json` exists are complete and skipped (resume); leftovers of a killed run
   carry temporary names and are removed. `crawl.json` records the input and the settings that
   shape the output; re-running into an output made with other settings needs `--overwrite`.
3. `processes` worker processes each take one shard at a time and download its rows with
   `threads` concurrent requests over one pooled keep-alive client, filter captions before
   downloading, check and resize images, score image-text similarity when asked, and drop
   duplicates within the shard (the earlier row wins).
4. The main process finalises shards strictly in id order: it drops duplicates of samples kept in
   lower shards (this run's, and those other parts wrote, read from their `_dedup.npz`), then
   writes the shard's files, stats last (tessera.dataprep.writer). So a crawl killed at any moment and
   re-run gives exactly the samples of an uninterrupted run.

Partitioned runs and dedup: a part drops duplicates of every lower shard that is complete when it
finalises a shard. Parts run one after another in part order (or re-run) therefore give exactly
the single run's samples; parts running at the same time catch the cross-part duplicates whose
first copy was already finished, and may keep a few whose first copy was still being crawled.

Every input row ends in exactly one status: success, failed_to_download, failed_to_decode or
filtered, with a reason code and a message, in the shard's parquet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import queue
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from tessera.core.errors import ConfigError, InputError
from tessera.core.progress import bar
from tessera.dataprep.config import CrawlConfig
from tessera.dataprep.crawl_worker import _W, _init_worker, _run_shard_in_worker, process_shard
from tessera.dataprep.filters import DedupIndex, load_scorer
from tessera.dataprep.readers import read_url_list
from tessera.dataprep.storage import open_storage
from tessera.dataprep.writer import read_dedup, shard_names, write_shard
from tessera.trainer.clip import load_scorer as load_clip_scorer

CRAWL_META = "crawl.json"
META_FORMAT = 1
_SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json|_dedup\.npz)$")


# --------------------------------------------------------------------------------------------
# Main side


def parse_part(part: str | tuple[int, int] | None) -> tuple[int, int]:
    """'I/N' (0 <= I < N) or (I, N) -> (I, N); None -> (0, 1)."""
    if part is None:
        return 0, 1
    if isinstance(part, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", part)
        if not m:
            raise InputError(f"--part '{part}': expected I/N with 0 <= I < N, e.g. 0/4")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        i, n = int(part[0]), int(part[1])
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--part '{i}/{n}': expected I/N with 0 <= I < N")
    return i, n


def part_shards(n_shards: int, part: tuple[int, int]) -> range:
    i, n = part
    return range(i * n_shards // n, (i + 1) * n_shards // n)


def _meta(urls: Any, cfg: CrawlConfig) -> dict:
    shaping = {
        k: getattr(cfg, k)
        for k in ("url_col", "caption_col", "keep_cols", "image_size", "resize", "output_format", "quality", "shard_size")
    }
    shaping["filters"] = dataclasses.asdict(cfg.filters)
    return {"format": META_FORMAT, "input": urls.fingerprint(), "settings": shaping}


def _diff(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
            if d:
                return d
        return ""
    return "" if a == b else f"{prefix}: {a!r} there vs {b!r} now"


class _GlobalIndex:
    """Dedup index over finalised shards with lower ids (this run's and other parts')."""

    def __init__(self, storage: Any, cfg: CrawlConfig):

        f = cfg.filters
        self.enabled = f.dedup_exact or f.dedup_near
        self.index = DedupIndex(f.dedup_exact, f.dedup_near, f.near_dup_bits)
        self.storage = storage
        self.loaded: set[int] = set()

    def refresh(self, below: int) -> None:
        """Load the `_dedup.npz` of every complete shard with id < `below` not loaded yet, in id order."""

        if not self.enabled:
            return
        names = set(self.storage.list())
        todo = []
        for name in names:
            m = _SHARD_FILE.match(name)
            if m and m.group(2) == "_stats.json":
                s = int(m.group(1))
                if s < below and s not in self.loaded and shard_names(s)["dedup"] in names:
                    todo.append(s)
        for s in sorted(todo):
            keys, shas, phs = read_dedup(self.storage.read_bytes(shard_names(s)["dedup"]))
            self.index.add_many(keys, shas, phs)
            self.loaded.add(s)

    def filter(self, shard: int, rows: list[dict], samples: list[dict]) -> list[dict]:
        if not self.enabled:
            return samples
        self.refresh(shard)
        by_key = {r["key"]: r for r in rows}
        kept = []
        for s in samples:
            dup = self.index.find(s["json"]["sha256"], s.get("phash"))
            if dup:
                by_key[s["key"]].update(status="filtered", reason=dup[0], error_message=f"{dup[0].replace('_', ' ')} of {dup[1]}")
            else:
                kept.append(s)
        for s in kept:
            self.index.add(s["key"], s["json"]["sha256"], s.get("phash"))
        self.loaded.add(shard)
        return kept


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass


def crawl(
    input: str | Path,
    output: str | Path,
    cfg: CrawlConfig | None = None,
    part: str | tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Crawl `input` (url list file or folder) into shards at `output` (folder or s3://bucket/prefix).

    Returns the stats of this part: rows, shards (written and already complete), successes,
    counts by status and by reason, duration and images/s of this invocation.
    """

    cfg = cfg or CrawlConfig()
    cfg.validate()
    f = cfg.filters
    if f.similarity_threshold > 0:
        if not f.similarity_model:
            raise ConfigError("config key 'crawl.filters.similarity_threshold' > 0 needs 'crawl.filters.similarity_model'")
        load_scorer(f.similarity_model, default=load_clip_scorer)  # fail here, with one line, rather than inside a worker
    pi, pn = parse_part(part)
    urls = read_url_list(input, cfg.url_col, cfg.caption_col, cfg.keep_cols)
    storage = open_storage(output, cfg.s3_endpoint_url)
    storage.prepare()

    n_rows = urls.num_rows
    n_shards = math.ceil(n_rows / cfg.shard_size)
    mine = list(part_shards(n_shards, (pi, pn)))
    existing = _open_output(storage, urls, cfg, mine, pn, overwrite)
    complete = [s for s in mine if shard_names(s)["stats"] in existing]
    todo = [s for s in mine if shard_names(s)["stats"] not in existing]
    totals: dict[str, Any] = {"status_counts": {}, "reason_counts": {}}
    done_rows = _account_complete(storage, complete, totals)

    t0 = time.time()
    gindex = _GlobalIndex(storage, cfg)
    total_rows = sum(min(n_rows, (s + 1) * cfg.shard_size) - s * cfg.shard_size for s in mine)
    pbar = (
        bar(total=total_rows, desc=f"crawl{'' if pn == 1 else f' part {pi}/{pn}'}", unit="row", initial=done_rows)
        if progress
        else _NullBar()
    )
    written, new_ok = _crawl_shards(cfg, urls, storage, todo, gindex, pbar, totals, t0)
    duration = time.time() - t0
    return _summary(storage, (pi, pn), len(mine), written, len(complete), totals, new_ok, duration)


def _open_output(storage: Any, urls: Any, cfg: CrawlConfig, mine: list[int], pn: int, overwrite: bool) -> set[str]:
    """Make `storage` ready for the shards `mine`; returns the names it held before temporaries went.

    With `overwrite`, deletes the shard files (all of them, or this part's when partitioned) and
    writes a new `crawl.json`; else checks that the `crawl.json` there describes this input and
    settings, or writes one into an output without shards. Then removes this part's leftovers of
    a killed run.
    """

    mine_names = {n for s in mine for n in shard_names(s).values()}
    existing = set(storage.list())
    meta = _meta(urls, cfg)
    if overwrite:
        for name in sorted(existing):
            m = _SHARD_FILE.match(name)
            if m and (pn == 1 or name in mine_names):
                storage.delete(name)
        existing = set(storage.list())
        storage.write_bytes(CRAWL_META, json.dumps(meta, indent=1, sort_keys=True).encode())
    elif CRAWL_META in existing:
        try:
            old = json.loads(storage.read_bytes(CRAWL_META))
        except ValueError:
            raise InputError(f"output '{storage}': {CRAWL_META} is not JSON; use --overwrite") from None
        d = _diff(old, meta)
        if d:
            raise InputError(f"output '{storage}' holds a crawl of another input or settings ({d}); use --overwrite or another output")
    else:
        if any(_SHARD_FILE.match(n) for n in existing):
            raise InputError(f"output '{storage}' holds shards without {CRAWL_META}; use --overwrite or another output")
        storage.write_bytes(CRAWL_META, json.dumps(meta, indent=1, sort_keys=True).encode())
    storage.clean_temporaries(mine_names)
    return existing


def _account(totals: dict[str, Any], st: dict) -> None:
    """Add one shard's stats (its `_stats.json`) to the status and reason counts in `totals`."""
    for k in ("status_counts", "reason_counts"):
        for name, c in st[k].items():
            totals[k][name] = totals[k].get(name, 0) + c


def _account_complete(storage: Any, complete: list[int], totals: dict[str, Any]) -> int:
    """Add the stats of the shards already complete to `totals`; returns their row count."""
    done_rows = 0
    for s in complete:
        st = json.loads(storage.read_bytes(shard_names(s)["stats"]))
        _account(totals, st)
        done_rows += st["count"]
    return done_rows


def _start_workers(cfg: CrawlConfig) -> tuple[Any, Any, Any]:
    """(executor, function it runs per shard, queue the workers report progress on).

    With one process the shards run on a thread of this process, else in `processes` spawned
    worker processes.
    """

    ctx = mp.get_context("spawn")
    f = cfg.filters
    # the CLIP scorer's loader travels (by name) only to a crawl that filters by similarity: the others' worker processes
    # then never import tessera.trainer.clip and torch (1.5-2 s each)
    scorer_factory = load_clip_scorer if f.similarity_threshold > 0 and f.similarity_model else None
    in_process = cfg.processes == 1
    progress_q: Any = queue.Queue() if in_process else ctx.Queue()
    if in_process:
        _init_worker(cfg, progress_q, os.getppid(), scorer_factory)
        executor: Any = ThreadPoolExecutor(1)
        submit_fn = process_shard
    else:
        executor = ProcessPoolExecutor(
            cfg.processes, mp_context=ctx, initializer=_init_worker, initargs=(cfg, progress_q, os.getpid(), scorer_factory)
        )
        submit_fn = _run_shard_in_worker
    return executor, submit_fn, progress_q


def _crawl_shards(
    cfg: CrawlConfig, urls: Any, storage: Any, todo: list[int], gindex: _GlobalIndex, pbar: Any, totals: dict[str, Any], t0: float
) -> tuple[int, int]:
    """Crawl the shards `todo` on the workers and finalise them in id order; returns (shards written, successes).

    At most 2 * `processes` shards are in flight or waiting for a lower one. Closes `pbar`.
    """

    # never more worker processes than shards: one shard (the demo's eval list) runs on a thread of this process, not
    # in a spawned worker that first imports the crawler (0.3-0.5 s each, more on a slow CPU)
    cfg = dataclasses.replace(cfg, processes=max(1, min(cfg.processes, len(todo))))
    in_process = cfg.processes == 1
    executor, submit_fn, progress_q = _start_workers(cfg)
    new_rows = new_ok = 0

    def drain() -> None:
        nonlocal new_rows, new_ok
        while True:
            try:
                r, ok = progress_q.get_nowait()
            except queue.Empty:
                return
            new_rows += r
            new_ok += ok
            pbar.update(r)

    written = 0
    try:
        pending: dict[int, Future] = {}
        ready: dict[int, dict] = {}
        nxt_submit = 0
        nxt_final = 0
        limit = 2 * cfg.processes
        while nxt_final < len(todo):
            while nxt_submit < len(todo) and len(pending) + len(ready) < limit:
                s = todo[nxt_submit]
                pending[s] = executor.submit(submit_fn, s, urls.rows(s * cfg.shard_size, min(urls.num_rows, (s + 1) * cfg.shard_size)))
                nxt_submit += 1
            done, _ = wait(list(pending.values()), timeout=0.25, return_when=FIRST_COMPLETED)
            for s in [s for s, fu in pending.items() if fu in done]:
                ready[s] = pending.pop(s).result()
            drain()
            elapsed = max(time.time() - t0, 1e-6)
            pbar.set_postfix(ok=f"{(new_ok / new_rows if new_rows else 0):.1%}", img_s=f"{new_ok / elapsed:.0f}", refresh=False)
            while nxt_final < len(todo) and todo[nxt_final] in ready:
                s = todo[nxt_final]
                res = ready.pop(s)
                samples = gindex.filter(s, res["rows"], res["samples"])
                st = write_shard(storage, s, samples, res["rows"], urls.keep_cols, cfg.output_format, res["start_time"])
                _account(totals, st)
                written += 1
                nxt_final += 1
        drain()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        pbar.close()
        if in_process:
            _W["pool"].shutdown(wait=False)
            _W["downloader"].close()
    return written, new_ok


def _summary(
    storage: Any, part: tuple[int, int], n_mine: int, written: int, skipped: int, totals: dict[str, Any], new_ok: int, duration: float
) -> dict[str, Any]:
    """The stats `crawl` returns (see there)."""
    sc = totals["status_counts"]
    total = sum(sc.values())
    return {
        "output": str(storage),
        "part": f"{part[0]}/{part[1]}",
        "rows": total,
        "shards": n_mine,
        "shards_written": written,
        "shards_skipped": skipped,
        "successes": sc.get("success", 0),
        "success_rate": (sc.get("success", 0) / total) if total else 0.0,
        "status_counts": dict(sorted(sc.items())),
        "reason_counts": dict(sorted(totals["reason_counts"].items())),
        "duration": duration,
        "images_per_s": new_ok / duration if duration > 0 else 0.0,
    }
