"""One data layer for webdataset shards: listing and reading, local or `s3://`, for every stage.

The dVAE stream (tessera.trainer.data), the CLIP (`read_pairs`), the tokenizer (`prep tokenizer`),
the encode job and evaluation all list and read shards here.

Shard specs (`list_shards`): a folder (its `*.tar`, sorted), one file, a glob (`data/*.tar`), a
brace pattern (`data/{00000..00009}.tar`, `data/{a,b}.tar`), a comma-separated list of any of these, and the same
for S3: `s3://bucket/prefix` (the prefix's `*.tar`, not those of deeper "folders"), `s3://bucket/key.tar`,
`s3://bucket/train/*.tar`, `s3://bucket/data-{000..009}.tar`. The result is sorted and de-duplicated;
nothing found gives one InputError naming the spec. S3 clients come from
tessera.dataprep.storage.s3_client: boto3's own settings (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL,
credentials and profiles), so S3-compatible stores and moto's server work alike.

Reading (`iter_members`): a tar is read as a stream (S3 bodies are not seekable; gzip, bz2 and xz
tars are unpacked on the fly), so the same code reads local and remote shards. Two checks make a
damaged shard an error instead of a quietly shorter one: `tarfile` stops without complaint at a
member header cut short or missing, so the archive must end with its end-of-archive zero blocks
(>= 1024 bytes) after the last member; and a member name that is absolute or climbs out with `..`
is refused. Either gives one InputError line naming the shard.

Samples (`iter_samples`): consecutive members with the same key (the file name up to its first
dot) form a webdataset sample {"__key__", "__shard__", ext: bytes}. `read_pairs` reads (image,
caption) pairs into memory for the CLIP and evaluation.
"""

from __future__ import annotations

import bz2
import fnmatch
import glob
import gzip
import io
import json
import lzma
import os
import tarfile
from contextlib import closing
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from braceexpand import UnbalancedBracesError, braceexpand
from PIL import Image

from tessera.core.errors import InputError
from tessera.dataprep.storage import is_s3, s3_client

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
GLOB_CHARS = "*?["

# --------------------------------------------------------------------------------------------
# Listing


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def split_s3(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`."""
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


def _glob_match(key: str, pattern: str) -> bool:
    """Glob semantics on S3 keys: `*` and `?` stay within one `/`-separated part, as on a file system."""
    ks, ps = key.split("/"), pattern.split("/")
    return len(ks) == len(ps) and all(fnmatch.fnmatchcase(k, p) for k, p in zip(ks, ps))


def _s3_keys(part: str, bucket: str, prefix: str, one_level: bool) -> tuple[list[str], bool]:
    """The object keys under `prefix` (only those of its own level when `one_level`) and whether deeper "folders" exist."""
    if not bucket:
        raise InputError(f"shards '{part}' names no bucket; expected s3://bucket/prefix")
    kw = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": "/"} if one_level else {})}
    try:
        keys, deeper = [], False
        for page in s3_client().get_paginator("list_objects_v2").paginate(**kw):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
            deeper = deeper or bool(page.get("CommonPrefixes"))
        return keys, deeper
    except Exception as e:  # botocore's errors (no bucket, no endpoint, no credentials) come in many types
        raise InputError(f"shards '{part}': cannot list the S3 prefix ({_why(e)})") from None


def _list_s3(part: str, pat: str, suffix: str) -> list[str]:
    bucket, key = split_s3(pat)
    if any(ch in key for ch in GLOB_CHARS):
        literal = key[: min(key.index(ch) for ch in GLOB_CHARS if ch in key)]
        keys, _ = _s3_keys(part, bucket, literal, one_level="/" not in key[len(literal) :])
        return sorted(f"s3://{bucket}/{k}" for k in keys if _glob_match(k, key))
    if key and not key.endswith("/") and key in _s3_keys(part, bucket, key, one_level=True)[0]:
        return [pat]  # one object
    folder = key.rstrip("/") + "/" if key.strip("/") else ""
    inside, deeper = _s3_keys(part, bucket, folder, one_level=True)  # the folder's own objects, not deeper ones
    if not inside and not deeper:
        raise InputError(f"shards '{part}'" + (f": '{pat}'" if pat != part else "") + " matches no file")
    return sorted(f"s3://{bucket}/{k}" for k in inside if k.endswith(suffix))


def _list_local(part: str, pat: str, suffix: str) -> list[str]:
    if any(ch in pat for ch in GLOB_CHARS):
        return sorted(m for m in glob.glob(pat) if os.path.isfile(m))
    p = Path(pat)
    if p.is_dir():
        return [str(x) for x in sorted(p.glob(f"*{suffix}")) if x.is_file()]
    if p.is_file():
        return [str(p)]
    raise InputError(f"shards '{part}'" + (f": '{pat}'" if pat != part else "") + " matches no file")


def _split_commas(text: str) -> list[str]:
    """`a,b{1,2}` -> ['a', 'b{1,2}']: commas inside braces belong to the brace pattern."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth <= 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    return parts + ["".join(cur)]


def _spec_parts(spec: str | Path | Iterable[str | Path]) -> list[str]:
    if isinstance(spec, (str, Path)):
        parts = [p.strip() for p in _split_commas(str(spec)) if p.strip()]
    else:
        parts = [str(s).strip() for s in spec if str(s).strip()]
    if not parts:
        raise InputError("shards: no shard spec given (expected a folder, a tar, a glob or brace pattern of tars, or s3://bucket/prefix)")
    return parts


def list_shards(spec: str | Path | Iterable[str | Path], suffix: str = ".tar") -> list[str]:
    """The shard paths/URLs of `spec` (see the module docstring), sorted and de-duplicated; InputError naming `spec` if none."""
    out: list[str] = []
    for part in _spec_parts(spec):
        try:
            patterns = list(braceexpand(part))
        except UnbalancedBracesError:
            raise InputError(f"shards '{part}': unbalanced braces") from None
        found: list[str] = []
        for pat in patterns:
            found.extend(_list_s3(part, pat, suffix) if is_s3(pat) else _list_local(part, pat, suffix))
        if not found:
            raise InputError(f"shards '{part}': no *{suffix} files found")
        out.extend(found)
    return sorted(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------
# Opening and reading


class _Reader(io.RawIOBase):
    """A read-only stream over `src` (anything with `read(n)`) that counts its bytes and where the last
    non-zero byte was, for the end-of-archive check; the source's errors (botocore's too) become OSError."""

    def __init__(self, src: Any):
        super().__init__()
        self.src, self.pos, self.data_end = src, 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        try:
            data = self.src.read(len(b))
        except OSError:
            raise
        except Exception as e:  # a connection reset or short body while streaming from S3
            raise OSError(_why(e)) from None
        n = len(data)
        b[:n] = data
        kept = len(data.rstrip(b"\0"))
        if kept:
            self.data_end = self.pos + kept
        self.pos += n
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.src.close()
        finally:
            super().close()


def open_shard(url: str) -> Any:
    """A binary stream of a local or s3:// file (an InputError naming it when it cannot be opened)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            raise InputError(f"shard '{url}': cannot read ({_why(e)})") from None
    try:
        return open(url, "rb")
    except OSError as e:
        raise InputError(f"shard '{url}': cannot open ({e.strerror})") from None


def open_text(url: str) -> io.TextIOWrapper:
    """A text stream (UTF-8, undecodable bytes replaced) of a local or s3:// file."""
    return io.TextIOWrapper(io.BufferedReader(_Reader(open_shard(url))), encoding="utf-8", errors="replace")


_COMPRESSED: tuple[tuple[bytes, Callable[[Any], Any]], ...] = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)


def _tar_stream(url: str) -> _Reader:
    """The (unpacked) bytes of a shard as a counted stream."""
    raw = io.BufferedReader(_Reader(open_shard(url)), 1 << 20)
    try:
        head = raw.peek(6)[:6]
    except OSError as e:
        raw.close()
        raise InputError(f"shard '{url}' cannot be read ({e})") from None
    for magic, unpack in _COMPRESSED:
        if head.startswith(magic):
            return _Reader(unpack(raw))
    return _Reader(raw)


def _check_name(url: str, name: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts:
        raise InputError(f"shard '{url}': member '{name}' has an unsafe path (absolute or with '..')")


def _check_end(url: str, stream: _Reader, end: int) -> None:
    """A whole archive has only zero blocks (>= 1024 bytes) after its last member, at byte `end`."""
    while stream.read(1 << 20):
        pass
    if stream.pos - end < 1024 or stream.data_end > end:
        raise InputError(f"shard '{url}' is truncated (its members stop at byte {end} of {stream.pos}, without the end-of-archive blocks)")


def iter_members(url: str, select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the file members of one tar, in order; `select(name)` False skips a member unread.

    Truncation, an unreadable tar and unsafe member names raise InputError naming the shard.
    """
    stream = _tar_stream(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                _check_name(url, m.name)
                if not m.isfile() or (select is not None and not select(m.name)):
                    continue
                f = tf.extractfile(m)
                yield m.name, f.read() if f is not None else b""
            end = tf.offset
        _check_end(url, stream, end)
    except (tarfile.TarError, EOFError) as e:
        raise InputError(f"shard '{url}' is not a readable tar file ({type(e).__name__})") from None
    except OSError as e:
        raise InputError(f"shard '{url}' cannot be read ({e})") from None
    finally:
        stream.close()


def iter_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one webdataset tar: dicts {"__key__", "__shard__", ext: bytes}, consecutive members grouped by key.

    The key is a member's file name (its folders dropped) up to the first dot; hidden files are skipped.
    """
    cur: dict[str, Any] | None = None
    for name, data in iter_members(url, lambda n: not os.path.basename(n).startswith(".")):
        key, _, ext = os.path.basename(name).partition(".")
        if cur is None or cur["__key__"] != key:
            if cur is not None:
                yield cur
            cur = {"__key__": key, "__shard__": url}
        cur[ext] = data
    if cur is not None:
        yield cur


def iter_all_samples(shards: Iterable[str], limit: int | None = None) -> Iterator[dict[str, Any]]:
    """One ordered pass over the samples of the listed `shards` (at most `limit`)."""
    n = 0
    for url in shards:
        if limit is not None and n >= limit:
            return
        with closing(iter_samples(url)) as samples:
            for s in samples:
                if limit is not None and n >= limit:
                    break
                n += 1
                yield s


def is_tar_name(url: str) -> bool:
    name = url.lower()
    return name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


# --------------------------------------------------------------------------------------------
# Images and captions of samples


def caption_of(sample: dict) -> str:
    """A sample's caption: its `txt`, else the `caption` of its `json`, else ''."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace")
    if "json" in sample:
        try:
            return str(json.loads(sample["json"]).get("caption", ""))
        except (ValueError, AttributeError):
            return ""
    return ""


def decode_image(sample: dict[str, Any], size: int) -> torch.Tensor:
    """float[3, size, size] in [0, 1] (the dVAE's input); other sizes are resized (shorter side) and center-cropped."""
    return image_tensor(decode_image_u8(sample, size))


def image_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8[size, size, 3] -> float[3, size, size] in [0, 1] (a new tensor; `arr` is left as it is)."""
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    """The encoded image of a sample: its first member with an image extension (IMAGE_EXTS), else None."""
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def decode_image_u8(sample: dict[str, Any], size: int) -> np.ndarray:
    """uint8[size, size, 3] of a sample's image (a writable array of its own), sized as decode_image says."""
    raw = image_bytes(sample)
    where = f"shard '{sample.get('__shard__')}'"
    if raw is None:
        raise InputError(f"{where}: sample '{sample['__key__']}' has no image ({'/'.join(IMAGE_EXTS)})")
    try:
        img = Image.open(io.BytesIO(raw)).convert("RGB")
    except Exception as e:
        raise InputError(f"{where}: image of sample '{sample['__key__']}' is undecodable ({type(e).__name__})") from None
    if img.size != (size, size):
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)


def crop_resize(im: Image.Image, size: int) -> Image.Image:
    """The center square of `im`, resized (bicubic) to size x size: how the CLIP and evaluation size images."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.Resampling.BICUBIC)


def _decode_pair(data: bytes, size: int, url: str, key: str) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:
        raise InputError(f"shard '{url}': image '{key}' cannot be decoded") from None
    return np.asarray(crop_resize(im, size)).transpose(2, 0, 1).copy()


def _pair_member(name: str) -> bool:
    ext = name.rpartition(".")[2].lower()
    return ext in IMAGE_EXTS or ext == "txt"


def read_pairs(spec: str | Path, image_size: int, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """(images uint8 (N, 3, S, S), captions) from webdataset shards ({key}.jpg|jpeg|png|webp + {key}.txt).

    `spec`: any shard spec (see list_shards). A member's key is its name up to the last dot (the
    extension's case is ignored); a pair is complete when its key has both an image and a caption,
    in either order, and keys with only one are skipped. Images of another size are center-cropped
    and resized (bicubic) to `image_size`. Captions are stripped. At most `limit` pairs.
    """
    imgs: list[np.ndarray] = []
    caps: list[str] = []
    for url in list_shards(spec):
        pending: dict[str, dict[str, bytes]] = {}
        with closing(iter_members(url, _pair_member)) as members:
            for name, data in members:
                key, _, ext = name.rpartition(".")
                entry = pending.setdefault(key, {})
                entry["txt" if ext.lower() == "txt" else "img"] = data
                if "txt" in entry and "img" in entry:
                    del pending[key]
                    imgs.append(_decode_pair(entry["img"], image_size, url, key))
                    caps.append(entry["txt"].decode("utf-8", errors="replace").strip())
                    if limit is not None and len(caps) >= limit:
                        return torch.from_numpy(np.stack(imgs)), caps
    if not caps:
        raise InputError(f"image shards '{spec}' hold no (image, caption) pairs")
    return torch.from_numpy(np.stack(imgs)), caps


def first_image_size(spec: str | Path) -> int:
    """The side (shorter edge) of the first image in the first shard of `spec`."""
    url = list_shards(spec)[0]
    with closing(iter_members(url, lambda n: n.rpartition(".")[2].lower() in IMAGE_EXTS)) as members:
        for name, data in members:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    return min(im.size)
            except Exception:
                raise InputError(f"shard '{url}': image '{name}' cannot be decoded") from None
    raise InputError(f"shard '{url}' holds no images")


__all__ = [
    "list_shards",
    "open_shard",
    "open_text",
    "iter_members",
    "iter_samples",
    "iter_all_samples",
    "read_pairs",
    "decode_image",
    "decode_image_u8",
    "image_bytes",
    "image_tensor",
    "caption_of",
    "crop_resize",
    "first_image_size",
    "split_s3",
]
