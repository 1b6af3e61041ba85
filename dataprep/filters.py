"""Crawler filters other than the image-size ones (those live in imaging.py, applied on the header):

- `check_caption`: empty / too short / too long / not UTF-8, applied BEFORE downloading;
- `DedupIndex`: exact (sha256 of the downloaded bytes) and near (64-bit dHash within a Hamming
  distance) duplicates. The earliest row wins: within a shard by row order, across shards the
  lower shard id (the orchestrator finalises shards in id order and reads the `_dedup.npz`
  indices that other parts wrote beside their shards);
- `Scorer`: the pluggable image-text similarity interface (`score(images, captions) -> floats`),
  loaded by `load_scorer(spec)`; LAION kept pairs with CLIP similarity >= 0.28.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from tessera.core.errors import ConfigError


def decode_caption(raw: bytes | str | None) -> tuple[str, bool]:
    """(caption text, was valid UTF-8). Invalid bytes are replaced so the text can still be recorded."""
    if raw is None:
        return "", True
    if isinstance(raw, str):
        return raw, True
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), False


def check_caption(text: str, valid_utf8: bool, *, min_chars: int, max_chars: int, reject_non_utf8: bool = True) -> tuple[str, str] | None:
    """(reason, message) when the caption is rejected, else None."""
    if not valid_utf8 and reject_non_utf8:
        return "caption_not_utf8", "caption is not valid UTF-8"
    n = len(text.strip())
    if n == 0 and min_chars >= 1:
        return "caption_empty", "caption is empty"
    if n < min_chars:
        return "caption_too_short", f"caption has {n} characters < min_caption_chars {min_chars}"
    if max_chars and n > max_chars:
        return "caption_too_long", f"caption has {n} characters > max_caption_chars {max_chars}"
    return None


def hamming_within(query: int, hashes: np.ndarray, bits: int) -> int:
    """Index of the first hash within `bits` Hamming distance of `query`, or -1."""
    if hashes.size == 0:
        return -1
    x = np.bitwise_xor(hashes, np.uint64(query))
    d = np.bitwise_count(x)
    hit = np.flatnonzero(d <= bits)
    return int(hit[0]) if hit.size else -1


class DedupIndex:
    """Content hashes (exact) and perceptual hashes (near) of kept samples, with the key of each."""

    def __init__(self, exact: bool = True, near: bool = False, near_bits: int = 4):
        self.exact = exact
        self.near = near
        self.near_bits = near_bits
        self._sha: dict[str, str] = {}
        self._ph_chunks: list[np.ndarray] = []
        self._ph_keys: list[str] = []
        self._ph_pending: list[int] = []

    def __len__(self) -> int:
        return len(self._sha) if self.exact else len(self._ph_keys)

    def _phashes(self) -> np.ndarray:
        if self._ph_pending:
            self._ph_chunks.append(np.array(self._ph_pending, dtype=np.uint64))
            self._ph_pending = []
        if len(self._ph_chunks) > 1:
            self._ph_chunks = [np.concatenate(self._ph_chunks)]
        return self._ph_chunks[0] if self._ph_chunks else np.zeros(0, np.uint64)

    def find(self, sha: str, phash: int | None) -> tuple[str, str] | None:
        """(reason, key of the earlier copy) when this sample duplicates an indexed one."""
        if self.exact and sha in self._sha:
            return "duplicate", self._sha[sha]
        if self.near and phash is not None:
            i = hamming_within(phash, self._phashes(), self.near_bits)
            if i >= 0:
                return "near_duplicate", self._ph_keys[i]
        return None

    def add(self, key: str, sha: str, phash: int | None) -> None:
        if self.exact:
            self._sha.setdefault(sha, key)
        if self.near and phash is not None:
            self._ph_pending.append(phash)
            self._ph_keys.append(key)

    def add_many(self, keys: Sequence[str], shas: Sequence[str], phashes: Sequence[int | None]) -> None:
        for k, s, p in zip(keys, shas, phashes):
            self.add(k, s, p)


# --------------------------------------------------------------------------------------------
# Image-text similarity


@runtime_checkable
class Scorer(Protocol):
    """Scores (image, caption) pairs; higher is more similar (CLIP cosine similarity, roughly [-1, 1])."""

    def score(self, images: Sequence, captions: Sequence[str]) -> Sequence[float]:
        """`images`: RGB PIL images; returns one float per pair."""
        ...


ScorerLoader = Callable[[str], Scorer]
_LOADERS: list[tuple[Callable[[str], bool], ScorerLoader]] = []


def register_scorer_loader(matches: Callable[[str], bool], loader: ScorerLoader) -> None:
    """Hook for model owners: `load_scorer(spec)` uses the first registered loader whose `matches(spec)`."""
    _LOADERS.insert(0, (matches, loader))


def load_scorer(spec: str, default: ScorerLoader | None = None) -> Scorer:
    """A scorer from `spec`: `module:factory` or `file.py:factory` (called with no argument), a
    spec claimed by a registered loader, or else a path handed to `default` (the crawler passes the
    project's CLIP loader, tessera.trainer.clip.load_scorer: models sit above this data layer)."""
    for matches, loader in _LOADERS:
        if matches(spec):
            return _checked(loader(spec), spec)
    if ":" in spec and not Path(spec).exists():
        mod_name, _, attr = spec.rpartition(":")
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"similarity model '{spec}': file '{path}' does not exist")
            s = importlib.util.spec_from_file_location(f"_tessera_scorer_{path.stem}", path)
            mod = importlib.util.module_from_spec(s)  # type: ignore[arg-type]
            s.loader.exec_module(mod)  # type: ignore[union-attr]
        else:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError as e:
                raise ConfigError(f"similarity model '{spec}': cannot import '{mod_name}': {e}") from None
        factory = getattr(mod, attr, None)
        if factory is None:
            raise ConfigError(f"similarity model '{spec}': '{mod_name}' has no attribute '{attr}'")
        return _checked(factory(), spec)
    if default is None:
        raise ConfigError(f"similarity model '{spec}': not module:factory or file.py:factory, and no model loader was given for a path")
    return _checked(default(spec), spec)


def _checked(obj: object, spec: str) -> Scorer:
    if not callable(getattr(obj, "score", None)):
        raise ConfigError(f"similarity model '{spec}' did not give an object with score(images, captions)")
    return obj  # type: ignore[return-value]
