"""Streaming webdataset shards for training: listing, rank/worker splitting, deterministic shuffling.

Shard specs (`list_shards`): a folder (its `*.tar`, sorted), a brace pattern
(`data/{00000..00009}.tar`), a glob, a comma-separated list of any of these, or
`s3://bucket/prefix` (boto3; endpoint from AWS_ENDPOINT_URL when set).

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

import glob
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tessera.core.errors import InputError

# --------------------------------------------------------------------------------------------
# Listing and splitting (generic: image shards and token shards alike)


def _s3_client():
    try:
        from tessera.dataprep.storage import s3_client  # type: ignore

        return s3_client()
    except Exception:
        import boto3

        return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def _split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


def _list_s3(spec: str, suffix: str) -> list[str]:
    bucket, prefix = _split_s3(spec.rstrip("/") + ("/" if not spec.endswith(suffix) else ""))
    if spec.endswith(suffix):
        return [spec]
    client = _s3_client()
    out: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith(suffix) and "/" not in key[len(prefix) :]:
                    out.append(f"s3://{bucket}/{key}")
    except Exception as e:
        raise InputError(f"shards '{spec}': cannot list the S3 prefix ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    return sorted(out)


def list_shards(spec: str | list[str] | tuple[str, ...], suffix: str = ".tar") -> list[str]:
    """The shard paths/URLs of `spec`, sorted and de-duplicated; InputError naming `spec` if none."""
    if isinstance(spec, (list, tuple)):
        parts = [str(s) for s in spec]
    else:
        if not spec or not str(spec).strip():
            raise InputError("shards: no shard spec given (expected a folder, a brace pattern of tars, or s3://bucket/prefix)")
        parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    out: list[str] = []
    for part in parts:
        if part.startswith("s3://"):
            found = _list_s3(part, suffix)
        else:
            from braceexpand import braceexpand

            found = []
            for pat in braceexpand(part):
                p = Path(pat)
                if p.is_dir():
                    found.extend(str(x) for x in sorted(p.glob(f"*{suffix}")))
                elif any(ch in pat for ch in "*?["):
                    found.extend(sorted(glob.glob(pat)))
                elif p.is_file():
                    found.append(str(p))
                else:
                    raise InputError(f"shards '{part}': '{pat}' does not exist")
        if not found:
            raise InputError(f"shards '{part}': no *{suffix} files found")
        out.extend(found)
    return sorted(dict.fromkeys(out))


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
# Reading tars


def open_shard(url: str):
    """A binary stream of a local or s3:// shard."""
    if url.startswith("s3://"):
        bucket, key = _split_s3(url)
        try:
            return _s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            raise InputError(f"shard '{url}': cannot read ({type(e).__name__})") from None
    try:
        return open(url, "rb")
    except OSError as e:
        raise InputError(f"shard '{url}': cannot open ({e.strerror})") from None


def iter_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one webdataset tar: dicts {"__key__", "__shard__", ext: bytes}, grouped by key."""
    stream = open_shard(url)
    cur: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                name = os.path.basename(m.name)
                if name.startswith("."):
                    continue
                key, _, ext = name.partition(".")
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        yield cur
                    cur = {"__key__": key, "__shard__": url}
                cur[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise InputError(f"shard '{url}' is truncated or not a tar ({type(e).__name__})") from None
    finally:
        stream.close()
    if cur is not None:
        yield cur


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def decode_image(sample: dict[str, Any], size: int) -> torch.Tensor:
    """float[3, size, size] in [0, 1]; other sizes are resized (shorter side) and center-cropped."""
    from PIL import Image

    raw = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if raw is None:
        raise InputError(f"shard '{sample.get('__shard__')}': sample '{sample['__key__']}' has no image ({'/'.join(IMAGE_EXTS)})")
    try:
        img = Image.open(io.BytesIO(raw)).convert("RGB")
    except Exception as e:
        raise InputError(
            f"shard '{sample.get('__shard__')}': image of sample '{sample['__key__']}' is undecodable ({type(e).__name__})"
        ) from None
    if img.size != (size, size):
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


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
    """One ordered pass (no shuffling, no splitting) over shards: (images, samples) batches, for evaluation."""
    shards = list_shards(spec) if not isinstance(spec, list) else spec
    imgs: list[torch.Tensor] = []
    recs: list[dict] = []
    seen = 0
    for url in shards:
        for s in iter_samples(url):
            if limit is not None and seen >= limit:
                break
            imgs.append(decode_image(s, image_size))
            recs.append(s)
            seen += 1
            if len(imgs) == batch_size:
                yield torch.stack(imgs), recs
                imgs, recs = [], []
    if imgs:
        yield torch.stack(imgs), recs


def caption_of(sample: dict) -> str:
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace")
    if "json" in sample:
        try:
            return str(json.loads(sample["json"]).get("caption", ""))
        except ValueError:
            return ""
    return ""
