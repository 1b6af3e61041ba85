"""Token shards (CONTRACTS.md item 4) for transformer training: manifest, records, resumable batches.

A token-shard folder holds `{shard:05d}.tar` files with `{key}.codes.npy` (uint16 [G, G]),
`{key}.ids.npy` (int32 BPE ids of the lower-cased caption), `{key}.txt` (caption), and a
`manifest.json` ({"grid", "image_vocab", "text_vocab", "tokenizer", "dvae", "count", "shards"}).

Listing and reading come from tessera.dataprep.shards; the global order (the same global batches at any world
size), each rank's slice of it and exact resume from `tessera.trainer.data` (shared with the dVAE's image stream);
this module decodes token records and builds (text, image) batches, with caption dropout and BPE-dropout
(re-encoding the caption) when a tokenizer is given.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tessera.core.errors import InputError
from tessera.dataprep.shards import iter_all_samples, list_shards
from tessera.trainer.data import ORDER, Position, global_batches, global_stream, position_of, rank_slice

MANIFEST_KEYS = ("grid", "image_vocab", "text_vocab")


def pad_text(ids: list[int], text_len: int, text_vocab: int) -> list[int]:
    """Truncate to `text_len` and fill the remaining positions i with their padding token text_vocab + i."""
    ids = [int(i) for i in ids[:text_len]]
    return ids + [text_vocab + i for i in range(len(ids), text_len)]


@dataclass
class TokenManifest:
    grid: int
    image_vocab: int
    text_vocab: int
    tokenizer: str | None
    dvae: str | None
    count: int
    shards: list[str]
    folder: Path

    def resolve(self, p: str | None) -> str | None:
        """A path named in the manifest: absolute as is, relative to the manifest's folder otherwise."""
        if not p:
            return None
        q = Path(p)
        if not q.is_absolute() and not q.exists():
            q = self.folder / q
        return str(q.absolute())


def manifest_folder(spec: str) -> Path:
    """The folder whose manifest.json describes `spec` (a folder, or the folder of its first tar)."""
    first = str(spec).split(",")[0].strip()
    if first.startswith("s3://"):
        raise InputError(f"token shards '{spec}': reading the manifest from S3 is not supported; copy manifest.json locally")
    p = Path(first)
    return p if p.is_dir() else p.parent


def read_manifest(spec: str | Path) -> TokenManifest:
    folder = manifest_folder(str(spec))
    path = folder / "manifest.json"
    if not path.exists():
        raise InputError(f"token shards '{spec}': no manifest.json in '{folder}' (expected the output of 'tessera prep encode')")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"token manifest '{path}' is unreadable ({type(e).__name__})") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(m.get(k), int)]
    if missing:
        raise InputError(f"token manifest '{path}': missing or non-integer keys {', '.join(missing)}")
    return TokenManifest(
        grid=int(m["grid"]),
        image_vocab=int(m["image_vocab"]),
        text_vocab=int(m["text_vocab"]),
        tokenizer=m.get("tokenizer"),
        dvae=m.get("dvae"),
        count=int(m.get("count", 0)),
        shards=list(m.get("shards", [])),
        folder=folder,
    )


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def load_npy(raw: bytes) -> np.ndarray:
    """np.load of one small .npy (no pickles): the header of each distinct (dtype, shape) is parsed once.

    np.load parses every header with ast.literal_eval; for the token shards' tiny arrays that was most of the cost of
    reading a record. The first array with a given header goes through np.load, which validates it; later ones with
    the same header bytes are views of their data."""
    hlen = int.from_bytes(raw[8:10], "little") if raw[:8] == b"\x93NUMPY\x01\x00" else -1
    head = raw[: 10 + hlen] if hlen >= 0 else b""
    known = _NPY_HEADERS.get(head) if head else None
    if known is None:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        if head and len(_NPY_HEADERS) < 4096 and arr.flags.c_contiguous and len(raw) == len(head) + arr.nbytes:
            _NPY_HEADERS[head] = (arr.dtype, arr.shape, arr.nbytes)
        return arr
    dtype, shape, nbytes = known
    if len(raw) != len(head) + nbytes:
        raise ValueError(f".npy of {len(raw)} bytes: its header says {dtype} {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=len(head)).reshape(shape)


def decode_record(rec: dict[str, Any], grid: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids int64[n], codes int64[grid*grid], caption) of one raw token record."""
    where = f"shard '{rec.get('__shard__')}': sample '{rec.get('__key__')}'"
    try:
        codes = load_npy(rec["codes.npy"])
        ids = load_npy(rec["ids.npy"])
    except KeyError as e:
        raise InputError(f"{where} lacks {e.args[0]}") from None
    except Exception as e:
        raise InputError(f"{where} has an unreadable .npy ({type(e).__name__})") from None
    if codes.shape != (grid, grid):
        raise InputError(f"{where}: codes have shape {codes.shape}, the manifest says grid {grid}")
    caption = rec["txt"].decode("utf-8", errors="replace") if "txt" in rec else ""
    return ids.astype(np.int64).reshape(-1), codes.astype(np.int64).reshape(-1), caption


class TokenBatches:
    """An endless, resumable iterator of this rank's rows (text long[B/W, T], image long[B/W, N]) of each global batch of
    `batch_size` samples (tessera.trainer.data: the same global batches at any world size).

    `caption_dropout`: probability of replacing a caption with the empty one (all padding).
    `tokenizer` + `bpe_dropout`: re-encode the caption with BPE-dropout (paper section 2.2);
    otherwise the stored ids are used. The caption-dropout draw of a sample comes from (seed, its stream position),
    whichever rank decodes it; BPE-dropout draws from the tokenizer library's own generator (sentencepiece and
    youtokentome take no seed per call), so its segmentations are not reproducible. The stream position is part of
    `state()`, so a resumed run sees exactly the same batches, at any world size.
    """

    def __init__(
        self,
        spec: str,
        *,
        text_len: int,
        text_vocab: int,
        grid: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 1000,
        caption_dropout: float = 0.0,
        tokenizer: Any = None,
        bpe_dropout: float = 0.0,
        state: dict | None = None,
    ):
        self.shards = list_shards(spec)
        self.text_len, self.text_vocab, self.grid = text_len, text_vocab, grid
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.caption_dropout, self.tokenizer, self.bpe_dropout = caption_dropout, tokenizer, bpe_dropout
        rank_slice(batch_size, rank, world)
        self.position, self.batches = position_of(state)
        stream = global_stream(self.shards, seed=seed, shuffle_buffer=shuffle_buffer, start=self.position)
        self._batches = global_batches(stream, batch_size=batch_size, rank=rank, world=world)

    def __iter__(self):
        return self

    def _text(self, ids: np.ndarray, caption: str, pos: Position) -> list[int]:
        if self.caption_dropout > 0 and np.random.default_rng([self.seed, pos[0], pos[1]]).random() < self.caption_dropout:
            return pad_text([], self.text_len, self.text_vocab)
        if self.tokenizer is not None and self.bpe_dropout > 0 and caption:
            ids = self.tokenizer.encode(caption.lower(), dropout=self.bpe_dropout)
        ids = [i for i in ids if 0 <= i < self.text_vocab]
        return pad_text(ids, self.text_len, self.text_vocab)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        recs, self.position = next(self._batches)
        texts, images = [], []
        for rec, pos in recs:
            ids, codes, caption = decode_record(rec, self.grid)
            texts.append(self._text(ids, caption, pos))
            images.append(codes)
        self.batches += 1
        return torch.tensor(texts, dtype=torch.long), torch.from_numpy(np.stack(images))

    def state(self) -> dict:
        return {"order": ORDER, "position": list(self.position), "batches": self.batches}


def load_token_set(
    spec: str, text_len: int, text_vocab: int, grid: int, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One ordered pass over shards (evaluation): (text long[n, T], image long[n, N], captions)."""
    texts, images, caps = [], [], []
    for rec in iter_all_samples(list_shards(spec), limit):
        ids, codes, caption = decode_record(rec, grid)
        texts.append(pad_text([i for i in ids.tolist() if 0 <= i < text_vocab], text_len, text_vocab))
        images.append(codes)
        caps.append(caption)
    if not caps:
        raise InputError(f"token shards '{spec}': no samples")
    return torch.tensor(texts, dtype=torch.long), torch.from_numpy(np.stack(images)), caps


def iter_token_records(spec: str, grid: int) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    for rec in iter_all_samples(list_shards(spec)):
        yield decode_record(rec, grid)


__all__ = [
    "pad_text",
    "load_npy",
    "TokenManifest",
    "read_manifest",
    "decode_record",
    "TokenBatches",
    "load_token_set",
    "iter_token_records",
]
