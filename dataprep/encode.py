"""Encode image shards to token shards (CONTRACTS.md item 4): `tessera prep encode` and `encode_shards(...)`.

For every input shard (sorted listing of `--input`), one output shard with the same position in
that listing: `{index:05d}.tar` holding `{key}.codes.npy` (uint16 [G, G], argmax of the dVAE
encoder logits, no gumbel noise), `{key}.ids.npy` (int32 BPE ids of the caption; the tokenizer
lower-cases per its sidecar; no dropout) and `{key}.txt`. Tars are byte-deterministic (fixed
mtime/owner), written to a temporary name and renamed.

`--part I/N` encodes input shards I, I+N, I+2N, ... (tessera.trainer.data.split_shards), so parts never
write the same file and together produce exactly what one run produces. Each part writes
`manifest.part-I-of-N.json`; whichever part finds all N part manifests present writes
`manifest.json` (the same content whichever does).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.core.errors import InputError
from tessera.core.files import atomic_write_bytes
from tessera.core.progress import bar
from tessera.dataprep.shards import caption_of, decode_image, iter_samples, list_shards
from tessera.dataprep.tokenizer import load_tokenizer
from tessera.trainer.data import split_shards
from tessera.trainer.dvae import load_dvae


def parse_part(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--part '{text}': expected I/N with 0 <= I < N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise InputError(f"--part '{text}': expected I/N with 0 <= I < N, e.g. 0/4")
    return i, n


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    tf.addfile(ti, io.BytesIO(data))


def _manifest_parts(out: Path, n: int) -> list[Path]:
    return [out / f"manifest.part-{i:05d}-of-{n:05d}.json" for i in range(n)]


def _encode_shard(url: str, model: Any, tok: Any, image_size: int, batch_size: int, device: torch.device, pbar: Any) -> tuple[bytes, int]:
    """The token tar (bytes) of one image shard and its sample count."""
    buf = io.BytesIO()
    count = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        batch: list[tuple[str, torch.Tensor, str]] = []

        def flush() -> None:
            nonlocal count
            if not batch:
                return
            x = torch.stack([b[1] for b in batch]).to(device)
            codes = model.get_codes(x).cpu().numpy().astype(np.uint16)
            ids = tok.encode_batch([b[2] for b in batch]) if hasattr(tok, "encode_batch") else [tok.encode(b[2]) for b in batch]
            for (key, _, cap), c, t in zip(batch, codes, ids):
                _add(tf, f"{key}.codes.npy", _npy(c))
                _add(tf, f"{key}.ids.npy", _npy(np.asarray(t, dtype=np.int32)))
                _add(tf, f"{key}.txt", cap.encode("utf-8"))
            count += len(batch)
            pbar.update(len(batch))
            batch.clear()

        for s in iter_samples(url):
            batch.append((s["__key__"], decode_image(s, image_size), caption_of(s)))
            if len(batch) == batch_size:
                flush()
        flush()
    return buf.getvalue(), count


@torch.no_grad()
def encode_shards(
    dvae: str | Path,
    tokenizer: str | Path,
    input: str | list[str],
    output: str | Path,
    *,
    batch_size: int | None = None,
    part: tuple[int, int] | str | None = None,
    device: str | torch.device | None = None,
    cfg: Any = None,
) -> dict[str, Any]:
    """Encode (this part of) the input shards; returns this part's manifest (or the full one when complete).

    `input`: any shard spec of tessera.dataprep.shards.list_shards (folders, globs, brace patterns, s3://).
    `cfg` (tessera.dataprep.config.EncodeConfig) supplies the batch size when `batch_size` is not given.
    """
    batch_size = batch_size or (cfg.batch_size if cfg is not None else 64)
    i_part, n_part = parse_part(part) if isinstance(part, (str, type(None))) else part
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, mcfg = load_dvae(dvae)
    if not getattr(model, "has_encoder", True):
        raise InputError(f"dVAE '{dvae}' holds no encoder weights (an export with the decoder only); give the dVAE run directory")
    model = model.to(device)
    tok = load_tokenizer(tokenizer)
    shards = list_shards(input)
    index = {s: k for k, s in enumerate(shards)}
    mine = split_shards(shards, i_part, n_part)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    entries = []
    pbar = bar(None, f"encode {i_part}/{n_part}", "img")
    for url in mine:
        name = f"{index[url]:05d}.tar"
        data, count = _encode_shard(url, model, tok, mcfg.image_size, batch_size, device, pbar)
        atomic_write_bytes(out / name, data)
        entries.append({"name": name, "count": count, "input": url})
    pbar.close()

    common = {
        "grid": mcfg.grid_size,
        "image_vocab": mcfg.vocab_size,
        "text_vocab": int(tok.vocab_size),
        "tokenizer": str(Path(tokenizer).resolve()),
        "dvae": str(Path(dvae).resolve()),
    }
    part_manifest = {**common, "part": [i_part, n_part], "count": sum(e["count"] for e in entries), "entries": entries}
    if n_part == 1:
        return _write_manifest(out, common, entries)
    atomic_write_bytes(_manifest_parts(out, n_part)[i_part], (json.dumps(part_manifest, indent=2) + "\n").encode())
    parts = _manifest_parts(out, n_part)
    if all(p.exists() for p in parts):
        all_entries = []
        for p in parts:
            all_entries.extend(json.loads(p.read_text())["entries"])
        return _write_manifest(out, common, all_entries)
    return part_manifest


def _write_manifest(out: Path, common: dict, entries: list[dict]) -> dict:
    entries = sorted(entries, key=lambda e: e["name"])
    manifest = {
        **common,
        "count": sum(e["count"] for e in entries),
        "shards": [e["name"] for e in entries],
        "counts": {e["name"]: e["count"] for e in entries},
    }
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
