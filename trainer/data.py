"""Streaming webdataset shards for training: rank/worker splitting, deterministic shuffling, resumable streams.

Listing and reading shards (local folders, globs, brace patterns, s3://) is tessera.dataprep.shards,
shared with every other stage; this module decides who reads what, in which order.

Splitting (`split_shards`): consumer c = rank * nworkers + worker of C = world * nworkers takes
shards c, c + C, c + 2C, ... so no two consumers read the same shard. With fewer shards than
consumers, `Assignment` falls back to giving every consumer all shards and keeping sample i where
i % C == c (still disjoint, just more reading).

Determinism: epoch e reads the shards in an order permuted by (seed, e); the shuffle buffer of
consumer c in epoch e draws from a generator seeded with (seed, e, c). A stream's position is
(epoch, samples yielded in that epoch), so resuming replays the epoch's raw records up to that
point (no image decoding) and continues exactly where it stopped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch

from tessera.core.errors import InputError
from tessera.dataprep.shards import decode_image, iter_all_samples, iter_samples, list_shards

# --------------------------------------------------------------------------------------------
# Splitting (generic: image shards and token shards alike)


def split_shards(shards: list[str], rank: int, world: int, worker: int = 0, nworkers: int = 1) -> list[str]:
    """This consumer's shards: consumer c = rank * nworkers + worker takes every C-th shard from c."""
    if not (0 <= rank < world and 0 <= worker < nworkers):
        raise ValueError(f"split_shards: rank {rank}/{world}, worker {worker}/{nworkers} out of range")
    total = world * nworkers
    c = rank * nworkers + worker
    return list(shards[c::total])


@dataclass
class Assignment:
    """What one consumer reads: shards, and a sample stride/offset when shards are fewer than consumers."""

    shards: list[str]
    stride: int = 1
    offset: int = 0


def assign(shards: list[str], rank: int, world: int, worker: int = 0, nworkers: int = 1) -> Assignment:
    total = world * nworkers
    if len(shards) >= total:
        return Assignment(split_shards(shards, rank, world, worker, nworkers))
    return Assignment(list(shards), stride=total, offset=rank * nworkers + worker)


def epoch_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The shard order of an epoch: a permutation seeded by (seed, epoch), the same on every rank."""
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


# --------------------------------------------------------------------------------------------
# The deterministic, resumable sample stream of one consumer


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


def consumer_stream(
    shards: list[str],
    *,
    seed: int,
    rank: int = 0,
    world: int = 1,
    worker: int = 0,
    nworkers: int = 1,
    shuffle_buffer: int = 1000,
    start: tuple[int, int] = (0, 0),
    loop: bool = True,
) -> Iterator[tuple[dict, tuple[int, int]]]:
    """Raw records of one consumer with their position (epoch, index in epoch after this record).

    `start` = (epoch, n) resumes after the n-th record of that epoch.
    """
    epoch, skip = start
    c = rank * nworkers + worker
    while True:
        a = assign(epoch_order(shards, seed, epoch), rank, world, worker, nworkers)

        def records() -> Iterator[dict]:
            i = 0
            for url in a.shards:
                for s in iter_samples(url):
                    if i % a.stride == a.offset:
                        yield s
                    i += 1

        n = 0
        for rec in shuffled(records(), shuffle_buffer, random.Random(f"buffer/{seed}/{epoch}/{c}")):
            n += 1
            if n <= skip:
                continue
            yield rec, (epoch, n)
        if n == 0:
            raise InputError(f"shards ({shards[0]}...): no samples for rank {rank}/{world} worker {worker}/{nworkers}")
        if not loop:
            return
        epoch, skip = epoch + 1, 0


class ImageBatches(torch.utils.data.IterableDataset):
    """Batches (images float[B, 3, S, S], positions) of one rank; with DataLoader workers each worker is a consumer.

    Each batch comes from one worker; its `pos` is that worker's stream position after the batch,
    so `ImageStream.state()` can record exactly where each worker stands.
    """

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
        starts: list[tuple[int, int]],
        rotate: int = 0,
    ):
        super().__init__()
        self.rotate = rotate  # DataLoader worker k plays logical worker (k + rotate) % nworkers
        self.shards, self.image_size, self.batch_size = shards, image_size, batch_size
        self.seed, self.rank, self.world, self.nworkers = seed, rank, world, max(nworkers, 1)
        self.shuffle_buffer, self.starts = shuffle_buffer, starts

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotate) % self.nworkers
        stream = consumer_stream(
            self.shards,
            seed=self.seed,
            rank=self.rank,
            world=self.world,
            worker=worker,
            nworkers=self.nworkers,
            shuffle_buffer=self.shuffle_buffer,
            start=tuple(self.starts[worker]),
        )
        while True:
            imgs, pos = [], None
            for rec, pos in stream:
                imgs.append(decode_image(rec, self.image_size))
                if len(imgs) == self.batch_size:
                    break
            yield torch.stack(imgs), torch.tensor([worker, pos[0], pos[1]])


class ImageStream:
    """An endless, resumable iterator of image batches for one rank (training)."""

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
        self.nworkers = max(workers, 1)
        self.starts: list[tuple[int, int]] = [tuple(p) for p in (state or {}).get("positions", [(0, 0)] * self.nworkers)]  # type: ignore[misc]
        if len(self.starts) != self.nworkers:
            raise InputError(
                f"data state has {len(self.starts)} worker positions but {self.nworkers} workers are configured; resume with the same data.workers"
            )
        # DataLoader takes batches from its workers round-robin starting at worker 0; rotating the
        # logical worker ids makes a resumed loader continue with the worker whose turn it was.
        self.next_worker = int((state or {}).get("next_worker", 0))
        ds = ImageBatches(
            self.shards,
            image_size=image_size,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world=world,
            nworkers=self.nworkers,
            shuffle_buffer=shuffle_buffer,
            starts=self.starts,
            rotate=self.next_worker,
        )
        self.positions = list(self.starts)
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
        w, e, n = (int(v) for v in pos)
        self.positions[w] = (e, n)
        self.next_worker = (w + 1) % self.nworkers
        return imgs

    def state(self) -> dict:
        return {"positions": [list(p) for p in self.positions], "next_worker": self.next_worker}


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


__all__ = ["split_shards", "assign", "epoch_order", "consumer_stream", "ImageStream", "iter_image_batches"]
