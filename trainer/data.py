"""Streaming webdataset shards for training: one global, deterministic, resumable order of samples, cut into global
batches of which each rank decodes its own slice.

Listing and reading shards (local folders, globs, brace patterns, s3://) is tessera.dataprep.shards,
shared with every other stage; this module decides who reads what, in which order.

The order is a function of the seed and the global batch B only, never of the number of ranks W or of data-loader
workers: every consumer walks the same stream of raw records (`global_stream`: epoch e reads the shards in an order
permuted by (seed, e), through a shuffle buffer seeded by (seed, e)); the stream is cut into global batches of B
records; global batch b goes to data-loader worker b % nworkers of every rank (DataLoader takes its workers' batches
round-robin, so batches arrive in stream order), and rank r decodes records [r*B/W, (r+1)*B/W) of it
(`global_batches`). Reading a raw record costs its bytes from the tar, no image decoding, so every rank and worker
reads every shard and decodes only its own slice. The samples of global update s are thus the same ordered list at
1, 2 or 4 ranks, and so is a random draw keyed by a record's position (epoch, n) (token_data's caption dropout).

Position: (epoch, records of that epoch consumed) after the last global batch, the same on every rank. A data state
(`{"order": "global", "position": [e, n], "batches": k}`) resumes by replaying that epoch's raw records up to it and
continues exactly, at any world size and worker count (`resume_state`). States of the older per-rank order (each rank
and worker its own shards and position) are no point of this order: they resume at the start of the epoch after the
furthest one recorded.

`split_shards` (consumer c of C takes shards c, c + C, ...) is the disjoint split of `tessera prep encode --part`.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch

from tessera.core.errors import ConfigError, InputError
from tessera.dataprep.shards import decode_image, decode_image_u8, image_bytes, image_tensor, iter_all_samples, iter_samples, list_shards

ORDER = "global"  # the data-state format: a position in the global stream, valid at any world size

Position = tuple[int, int]


def split_shards(shards: list[str], rank: int, world: int, worker: int = 0, nworkers: int = 1) -> list[str]:
    """This consumer's shards: consumer c = rank * nworkers + worker takes every C-th shard from c."""
    if not (0 <= rank < world and 0 <= worker < nworkers):
        raise ValueError(f"split_shards: rank {rank}/{world}, worker {worker}/{nworkers} out of range")
    total = world * nworkers
    c = rank * nworkers + worker
    return list(shards[c::total])


def epoch_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The shard order of an epoch: a permutation seeded by (seed, epoch), the same on every rank."""
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


# --------------------------------------------------------------------------------------------
# The global stream and its global batches


def shuffled(records: Iterator[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle buffer: keep `buffer` records, yield a random one as each new record arrives, drain at the end."""
    if buffer <= 1:
        yield from records
        return
    buf: list[dict] = []
    for r in records:
        if len(buf) < buffer:
            buf.append(r)
            continue
        i = rng.randrange(len(buf))
        buf[i], r = r, buf[i]
        yield r
    rng.shuffle(buf)
    yield from buf


CACHE_BYTES = 64 << 20  # a stream keeps the raw records of its shards in memory while they total at most this


class RecordCache:
    """The raw records of whole shards, kept while they total at most `limit` bytes (0: keep none).

    A small dataset (the demo's: 1-2 MB of tokens, 4-13 MB of images) is read for many epochs; parsing its tars again
    each epoch cost a third of a small transformer's update time (bench/results/demo.md, session 16). A shard is kept
    only once it has been read whole and it fits, so a large dataset is streamed as before, with at most one shard's
    records in memory. Each reader gets its own copy of a record's dict (the bytes are shared and immutable). Records
    read while their shard still fits carry `"__kept__": True` (DecodedImages keeps the decoded pixels of those only).
    """

    def __init__(self, limit: int = CACHE_BYTES):
        self.limit, self.used = limit, 0
        self.shards: dict[str, list[dict]] = {}

    def samples(self, url: str) -> Iterator[dict]:
        kept = self.shards.get(url)
        if kept is not None:
            yield from (dict(r) for r in kept)
            return
        recs: list[dict] | None = []
        size = 0
        for rec in iter_samples(url):
            if recs is not None:
                size += sum(len(v) for k, v in rec.items() if not k.startswith("__"))
                if self.used + size > self.limit:
                    recs = None  # this shard streams; what it read so far is dropped
                else:
                    rec["__kept__"] = True
                    recs.append(dict(rec))
            yield rec
        if recs is not None:
            self.shards[url], self.used = recs, self.used + size


def global_stream(
    shards: list[str],
    *,
    seed: int,
    shuffle_buffer: int = 1000,
    start: Position = (0, 0),
    loop: bool = True,
    cache_bytes: int = CACHE_BYTES,
) -> Iterator[tuple[dict, Position]]:
    """Every raw record of every epoch, in the one order of (seed), with its position (epoch, index in epoch after it).

    `start` = (epoch, n) resumes after the n-th record of that epoch. Shards are read once and then served from memory
    while they total at most `cache_bytes` (RecordCache); the records and their order do not depend on it.
    """
    if not shards:
        raise InputError("training shards: the list is empty")
    epoch, skip = start
    cache = RecordCache(cache_bytes)
    while True:

        def records(e: int = epoch) -> Iterator[dict]:
            for url in epoch_order(shards, seed, e):
                yield from cache.samples(url)

        n = 0
        for rec in shuffled(records(), shuffle_buffer, random.Random(f"buffer/{seed}/{epoch}")):
            n += 1
            if n > skip:
                yield rec, (epoch, n)
        if n == 0:
            raise InputError(f"shards ({shards[0]}...): no samples")
        if not loop:
            return
        epoch, skip = epoch + 1, 0


def rank_slice(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch that rank `rank` of `world` trains on."""
    if batch_size % world or not 0 <= rank < world:
        raise ConfigError(f"global batch {batch_size}: expected a multiple of the world size {world} (rank {rank})")
    per = batch_size // world
    return rank * per, (rank + 1) * per


def global_batches(
    stream: Iterator[tuple[dict, Position]], *, batch_size: int, rank: int = 0, world: int = 1, worker: int = 0, nworkers: int = 1
) -> Iterator[tuple[list[tuple[dict, Position]], Position]]:
    """This rank's rows of global batches worker, worker + nworkers, ... of `stream` (batches of `batch_size` records):
    (its records with their positions, the stream position after the whole global batch)."""
    lo, hi = rank_slice(batch_size, rank, world)
    b, i, mine = 0, 0, []
    for rec, pos in stream:
        if b % nworkers == worker and lo <= i < hi:
            mine.append((rec, pos))
        i += 1
        if i == batch_size:
            if b % nworkers == worker:
                yield mine, pos
            b, i, mine = b + 1, 0, []


def resume_state(states: list | None) -> dict | None:
    """The data state every rank resumes from, given the saved states of all ranks (None: from the start).

    Global states are the same on every rank (any of them, whatever the world size it was saved at). States of the
    older per-rank order start the epoch after the furthest one any rank or worker had reached, on every rank."""
    states = [s for s in (states or []) if s]
    if not states:
        return None
    if all(s.get("order") == ORDER for s in states):
        return dict(states[0])
    epochs = [int(p[0]) for s in states for p in s.get("positions", [s.get("position", (0, 0))])]
    return {"order": ORDER, "position": [1 + max(epochs), 0], "batches": max(int(s.get("batches", 0)) for s in states)}


def position_of(state: dict | None) -> tuple[Position, int]:
    """(position, batches taken) of one saved data state (see resume_state); ((0, 0), 0) without one."""
    state = resume_state([state]) if state else None
    if not state:
        return (0, 0), 0
    e, n = state["position"]
    return (int(e), int(n)), int(state.get("batches", 0))


class ImageBatches(torch.utils.data.IterableDataset):
    """This rank's image rows (float[B/W, 3, S, S]) of each global batch, with the position after it; with DataLoader
    workers, worker k takes global batches k, k + nworkers, ... (DataLoader's round-robin keeps the stream order)."""

    def __init__(
        self,
        shards: list[str],
        *,
        image_size: int,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        nworkers: int,
        shuffle_buffer: int,
        start: Position,
    ):
        super().__init__()
        self.shards, self.image_size, self.batch_size = shards, image_size, batch_size
        self.seed, self.rank, self.world, self.nworkers = seed, rank, world, max(nworkers, 1)
        self.shuffle_buffer, self.start = shuffle_buffer, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        stream = global_stream(self.shards, seed=self.seed, shuffle_buffer=self.shuffle_buffer, start=self.start)
        worker = info.id if info is not None else 0
        kw = dict(batch_size=self.batch_size, rank=self.rank, world=self.world, worker=worker, nworkers=self.nworkers)
        images = DecodedImages(self.image_size)
        for recs, pos in global_batches(stream, **kw):
            yield torch.stack([images(rec) for rec, _ in recs]), torch.tensor(pos)


DECODED_BYTES = 256 << 20  # an image stream keeps decoded images while they total at most this


class DecodedImages:
    """decode_image with a memo of the decoded pixels (uint8) of the records the RecordCache keeps (`__kept__`), keyed
    by the image's bytes, while they total at most `limit` bytes: a small dataset's images are decoded once, not once
    per epoch (the demo's dVAE decoded each of its 4,000 JPEGs 4 times; bench/results/demo.md, session 16), and a
    dataset too large to be kept is decoded as it streams, without a memo that would never be hit. The same bytes give
    the same pixels, so the batches do not depend on the memo. Python caches a bytes object's hash, so a hit on a kept
    record costs a dict lookup."""

    def __init__(self, size: int, limit: int = DECODED_BYTES):
        self.size, self.limit, self.used = size, limit, 0
        self.memo: dict[bytes, np.ndarray] = {}

    def __call__(self, rec: dict) -> torch.Tensor:
        raw = image_bytes(rec)
        arr = self.memo.get(raw) if raw is not None else None
        if arr is None:
            arr = decode_image_u8(rec, self.size)
            if raw is not None and rec.get("__kept__") and self.used + arr.nbytes + len(raw) <= self.limit:
                self.memo[raw], self.used = arr, self.used + arr.nbytes + len(raw)
        return image_tensor(arr)


class ImageStream:
    """An endless, resumable iterator of this rank's rows (batch_size // world) of each global batch of `batch_size` images."""

    def __init__(
        self,
        spec: str | list[str],
        *,
        image_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        shuffle_buffer: int = 1000,
        state: dict | None = None,
    ):
        self.shards = list_shards(spec)
        rank_slice(batch_size, rank, world)
        self.position, self.batches = position_of(state)
        ds = ImageBatches(
            self.shards,
            image_size=image_size,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world=world,
            nworkers=workers,
            shuffle_buffer=shuffle_buffer,
            start=self.position,
        )
        if workers > 0:
            self._it = iter(
                torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False, prefetch_factor=4)
            )
        else:
            self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        imgs, pos = next(self._it)
        self.position = (int(pos[0]), int(pos[1]))
        self.batches += 1
        return imgs

    def state(self) -> dict:
        return {"order": ORDER, "position": list(self.position), "batches": self.batches}


def iter_image_batches(
    spec: str | list[str], image_size: int, batch_size: int, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, list[dict]]]:
    """One ordered pass (no shuffling, no splitting) over shards: (images, samples) batches, for evaluation.

    A list is taken as the shards themselves, in its order; anything else is listed with list_shards.
    """
    shards = spec if isinstance(spec, list) else list_shards(spec)
    imgs: list[torch.Tensor] = []
    recs: list[dict] = []
    for s in iter_all_samples(shards, limit):
        imgs.append(decode_image(s, image_size))
        recs.append(s)
        if len(imgs) == batch_size:
            yield torch.stack(imgs), recs
            imgs, recs = [], []
    if imgs:
        yield torch.stack(imgs), recs


__all__ = [
    "split_shards",
    "epoch_order",
    "global_stream",
    "RecordCache",
    "DecodedImages",
    "CACHE_BYTES",
    "global_batches",
    "rank_slice",
    "resume_state",
    "ImageStream",
    "iter_image_batches",
]
