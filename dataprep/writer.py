"""One shard's files, in img2dataset's webdataset layout, built in memory and handed to a storage.

    {shard:05d}.tar          {key}.jpg|webp, {key}.txt (caption), {key}.json per kept sample, in key order
    {shard:05d}.parquet      every input row of the shard (failures too) with status, reason, error_message
    {shard:05d}_dedup.npz    sha256 and perceptual hash of the kept samples (the cross-shard dedup index)
    {shard:05d}_stats.json   counts by status and reason; written LAST: it marks the shard complete

`write_shard` writes them in that order, each atomically, so a shard whose stats file exists is
whole, and a crash at any moment leaves at worst complete-looking files of a shard that a re-run
rewrites identically.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Samples carry no meaningful mtime; a constant keeps shards byte-identical across re-runs.
TAR_MTIME = 946684800  # 2000-01-01

ROW_FIELDS = [
    "key",
    "url",
    "caption",
    "status",
    "reason",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
]


def key_width(shard_size: int) -> int:
    return max(4, len(str(max(shard_size - 1, 0))))


def make_key(shard: int, index: int, shard_size: int) -> str:
    return f"{shard:05d}{index:0{key_width(shard_size)}d}"


def shard_names(shard: int) -> dict[str, str]:
    s = f"{shard:05d}"
    return {"tar": f"{s}.tar", "parquet": f"{s}.parquet", "dedup": f"{s}_dedup.npz", "stats": f"{s}_stats.json"}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uname = info.gname = "tessera"
    tar.addfile(info, io.BytesIO(data))


def build_tar(samples: list[dict[str, Any]], ext: str) -> bytes:
    """`samples`: dicts with key, image (bytes), caption, json (dict), in key order."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT if all(len(s["key"]) < 90 for s in samples) else tarfile.PAX_FORMAT
    ) as tar:
        for s in samples:
            _add(tar, f"{s['key']}.{ext}", s["image"])
            _add(tar, f"{s['key']}.txt", s["caption"].encode("utf-8"))
            _add(tar, f"{s['key']}.json", json.dumps(s["json"], ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return buf.getvalue()


def build_parquet(rows: list[dict[str, Any]], keep_cols: list[str]) -> bytes:
    cols: dict[str, list[Any]] = {f: [r.get(f) for r in rows] for f in ROW_FIELDS}
    for c in keep_cols:
        vals = [r.get("extra", {}).get(c) for r in rows]
        cols[c] = vals
    arrays = {}
    for name, vals in cols.items():
        if name in ("width", "height", "original_width", "original_height"):
            arrays[name] = pa.array(vals, type=pa.int32())
        elif name in ROW_FIELDS:
            arrays[name] = pa.array(vals, type=pa.string())
        else:
            try:
                arrays[name] = pa.array(vals)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                arrays[name] = pa.array([None if v is None else json.dumps(v) for v in vals], type=pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table(arrays), buf)
    return buf.getvalue()


def build_dedup(keys: list[str], shas: list[str], phashes: list[int | None]) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        keys=np.array(keys, dtype="U32"),
        sha256=np.array([bytes.fromhex(s) for s in shas], dtype="S32"),
        phash=np.array([p or 0 for p in phashes], dtype=np.uint64),
        has_phash=np.array([p is not None for p in phashes], dtype=bool),
    )
    return buf.getvalue()


def read_dedup(data: bytes) -> tuple[list[str], list[str], list[int | None]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        keys = [str(k) for k in z["keys"]]
        shas = [bytes(s).hex() for s in z["sha256"]]
        ph = [int(p) if h else None for p, h in zip(z["phash"], z["has_phash"])]
    return keys, shas, ph


def build_stats(rows: list[dict[str, Any]], shard: int, start_time: float) -> dict[str, Any]:
    status = Counter(r["status"] for r in rows)
    reasons = Counter(r["reason"] for r in rows if r["reason"])
    messages = Counter(r["error_message"] for r in rows if r["error_message"])
    end = time.time()
    return {
        "shard": shard,
        "count": len(rows),
        "successes": status.get("success", 0),
        "failed_to_download": status.get("failed_to_download", 0),
        "failed_to_decode": status.get("failed_to_decode", 0),
        "filtered": status.get("filtered", 0),
        "status_counts": dict(sorted(status.items())),
        "reason_counts": dict(sorted(reasons.items())),
        "status_dict": dict(messages.most_common(50)),
        "start_time": start_time,
        "end_time": end,
        "duration": end - start_time,
    }


def write_shard(
    storage, shard: int, samples: list[dict[str, Any]], rows: list[dict[str, Any]], keep_cols: list[str], ext: str, start_time: float
) -> dict[str, Any]:
    """Write the four files of a shard (stats last) and return its stats."""
    names = shard_names(shard)
    kept = [s for s in samples]
    storage.write_bytes(names["tar"], build_tar(kept, ext))
    storage.write_bytes(names["parquet"], build_parquet(rows, keep_cols))
    storage.write_bytes(
        names["dedup"], build_dedup([s["key"] for s in kept], [s["json"]["sha256"] for s in kept], [s.get("phash") for s in kept])
    )
    stats = build_stats(rows, shard, start_time)
    storage.write_bytes(names["stats"], json.dumps(stats, indent=1).encode())
    return stats
