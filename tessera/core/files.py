"""Files written atomically, and checkpoint files.

Everything the pipeline writes goes to a temporary name in the same folder, is flushed to disk and
then renamed, so a crash never leaves a half-written file under a final name. Checkpoints are state
dicts plus their kind and format, never pickled modules; they are loaded with `weights_only=True`.
A checkpoint directory's manifest.json (below) records the sha256 and size of every kept checkpoint's files, so that a
corrupt or partial latest checkpoint is found on resume and the previous one used (`select_checkpoint`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from tessera.core.atomic import atomic_write_bytes  # its home since the crawler's workers stopped importing torch
from tessera.core.errors import CheckpointError, InputError

CHECKPOINT_FORMAT = 1


def checkpoint_bytes(kind: str, state: dict[str, Any]) -> bytes:
    """The bytes `save_checkpoint` writes: `state` with its kind and format, as torch.save makes them."""
    buf = io.BytesIO()
    torch.save({"kind": kind, "format": CHECKPOINT_FORMAT, **state}, buf)
    return buf.getvalue()


def save_checkpoint(path: str | Path, kind: str, state: dict[str, Any]) -> dict[str, Any]:
    """Save `state` (tensors, numbers, strings, dicts, lists) with its kind, atomically; returns the file's digest
    ({"size", "sha256"}, what the checkpoint manifest records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = checkpoint_bytes(kind, state)
    atomic_write_bytes(path, data)
    return digest(data)


def load_checkpoint(path: str | Path, kind: str | tuple[str, ...], map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, checking its kind.

    A run directory is accepted too: its checkpoints/latest.pt, or where the checkpoint manifest shows that file damaged,
    the newest intact checkpoint it lists (`readable_latest`). Raises CheckpointError with one line naming the file for a
    missing, truncated, corrupt, or other-kind checkpoint.
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if path.is_dir():
        path = readable_latest(path)
    if not path.exists():
        raise InputError(f"checkpoint '{path}' does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong format, pickled modules refused by weights_only
        raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(obj, dict) or "kind" not in obj:
        raise CheckpointError(f"checkpoint '{path}' is not a Tessera checkpoint (no 'kind' entry)")
    if obj["kind"] not in kinds:
        raise CheckpointError(f"checkpoint '{path}' is a '{obj['kind']}' checkpoint, expected {' or '.join(repr(k) for k in kinds)}")
    return obj


# -- the checkpoint manifest ----------------------------------------------------------------------------------------------
# A checkpoint directory's manifest.json lists every kept checkpoint (a step_XXXXXXXX.pt file, or a step_XXXXXXXX/ folder
# of files) with the sha256 and size of each of its files, oldest first:
#     {"format": 1, "checkpoints": [{"name": "step_00000009.pt", "step": 9, "files": {"step_00000009.pt": {"size", "sha256"}}}]}
# It is rewritten atomically after each checkpoint is complete, so a checkpoint that it does not list is one whose save did
# not finish. `select_checkpoint` verifies the newest one against it on restore and falls back to the previous one.

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
QUARANTINE = "corrupt."  # the prefix of a checkpoint moved aside: never matched by step_* again
_STEP = re.compile(r"^step_(\d+)")


def digest(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_digest(path: str | Path) -> dict[str, Any]:
    """{"size", "sha256"} of a file, read in 4 MiB pieces."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def step_of(name: str) -> int | None:
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def checkpoint_files(directory: Path, name: str) -> list[str]:
    """The files of checkpoint `name` relative to `directory`: the file itself, or every file under the folder."""
    p = directory / name
    if p.is_dir():
        return sorted(str(f.relative_to(directory)) for f in p.rglob("*") if f.is_file())
    return [name] if p.is_file() else []


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of `directory`, or None where there is none (a run written before manifests) or it is unreadable."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict) or not isinstance(m.get("checkpoints"), list):
            raise ValueError("no 'checkpoints' list")
        return m
    except (OSError, ValueError) as e:
        warn(f"checkpoint manifest '{path}' is unreadable ({type(e).__name__}); loading the checkpoints without verifying them")
        return None


def _write_manifest(directory: Path, entries: list[dict[str, Any]]) -> None:
    entries = sorted(entries, key=lambda e: e["step"])
    data = json.dumps({"format": MANIFEST_FORMAT, "checkpoints": entries}, indent=1).encode()
    atomic_write_bytes(directory / MANIFEST, data)


def record_checkpoint(directory: str | Path, name: str, step: int, keep: list[str], known: dict[str, dict] | None = None) -> None:
    """Add the complete checkpoint `name` to `directory`'s manifest (its files hashed, or their digests in `known`) and keep
    only the entries named in `keep` (the checkpoints that pruning leaves); written atomically. Call it before pruning."""
    directory = Path(directory)
    old = {e["name"]: e for e in (read_manifest(directory) or {"checkpoints": []})["checkpoints"]}
    known = known or {}
    entries = []
    for n in dict.fromkeys([*keep, name]):
        if n in old and n != name:
            entries.append(old[n])
        elif n == name or (directory / n).exists():  # the new one; a kept one the manifest lacks (written before it)
            rel = checkpoint_files(directory, n)
            entries.append(
                {
                    "name": n,
                    "step": int(step if n == name else step_of(n) or 0),
                    "files": {f: known.get(f) or file_digest(directory / f) for f in rel},
                }
            )
    _write_manifest(directory, entries)


def verify_checkpoint(directory: Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with checkpoint `entry` of the manifest (one phrase naming the file), or None when every file matches."""
    files = entry.get("files") or {}
    if not files:
        return "is listed without files"
    for rel, want in files.items():
        p = directory / rel
        if not p.is_file():
            return f"is missing its file '{rel}'" if rel != entry["name"] else "is missing"
        size = p.stat().st_size
        what = f"'{rel}': " if rel != entry["name"] else ""
        if size != want["size"]:
            how = "truncated" if size < want["size"] else "too long"
            return f"is {how} ({what}{size} bytes, the manifest says {want['size']})"
        if file_digest(p)["sha256"] != want["sha256"]:
            return f"is corrupt ({what}its sha256 differs from the manifest's)"
    return None


def quarantine(directory: Path, name: str) -> str:
    """Rename checkpoint `name` aside to corrupt.<name> (corrupt.<name>.2, ... when taken); returns the new name."""
    new, i = f"{QUARANTINE}{name}", 1
    while (directory / new).exists():
        i += 1
        new = f"{QUARANTINE}{name}.{i}"
    (directory / name).rename(directory / new)
    return new


def warn(line: str) -> None:
    print(f"tessera: warning: {line}", file=sys.stderr, flush=True)


def select_checkpoint(directory: str | Path, on_disk: list[str]) -> tuple[str | None, bool]:
    """The checkpoint to resume from among `on_disk` (the step_* names in `directory`) and whether it was verified.

    Without a manifest: (None, False), the caller loads as before manifests existed. Else the newest checkpoint whose files
    match the manifest, (None, True) when it lists none. Newer checkpoints that fail (corrupt, truncated, missing, or a save
    that did not finish: on disk, not listed) are renamed aside (corrupt.<name>) and dropped from the manifest, with one
    warning line each on stderr; when none is intact, CheckpointError (nothing is moved). Call it on one process only.
    """
    directory = Path(directory)
    m = read_manifest(directory)
    if m is None:
        return None, False
    listed = sorted(m["checkpoints"], key=lambda e: e["step"], reverse=True)
    newest = listed[0]["step"] if listed else -1
    names = {e["name"] for e in listed}
    bad = [
        (n, "did not finish saving (it is not in the manifest)")
        for n in sorted(on_disk, reverse=True)
        if n not in names and (step_of(n) or 0) > newest
    ]
    good = None
    for e in listed:
        why = verify_checkpoint(directory, e)
        if why is None:
            good = e
            break
        bad.append((e["name"], why))
    if good is None and bad:
        raise CheckpointError(f"no intact checkpoint in '{directory}': " + "; ".join(f"{n} {w}" for n, w in bad))
    for n, why in bad:
        aside = quarantine(directory, n) if (directory / n).exists() else None
        moved = f"moved aside to '{aside}'" if aside else "dropped"
        warn(f"checkpoint '{directory / n}' {why}; {moved}, resuming from {good['name']}")
    if bad:
        _write_manifest(directory, [e for e in m["checkpoints"] if e["name"] not in {n for n, _ in bad}])
    return (good["name"] if good else None), True


def readable_latest(run_dir: str | Path) -> Path:
    """The checkpoint file a reader of run directory `run_dir` (export, encode, sample) should load; nothing is changed.

    checkpoints/latest.pt when it is intact. With a manifest it is checked against the newest listed single-file
    checkpoint (latest.pt is that file's copy); when it is damaged or missing, the newest listed checkpoint whose file
    matches the manifest is used instead, with one warning line: what resume does (`select_checkpoint`), without moving
    anything aside. Without a manifest (runs from before manifests), latest.pt as it is.
    """
    run_dir = Path(run_dir)
    ck = run_dir / "checkpoints"
    latest = ck / "latest.pt"
    m = read_manifest(ck) if ck.is_dir() else None
    listed = sorted(
        (e for e in (m or {}).get("checkpoints", []) if str(e.get("name", "")).endswith(".pt")),
        key=lambda e: e.get("step", -1),
        reverse=True,
    )
    if not listed:
        if not latest.exists():
            raise CheckpointError(f"run directory '{run_dir}' holds no checkpoint (expected {latest})")
        return latest
    want = (listed[0].get("files") or {}).get(listed[0]["name"])
    if want and latest.is_file() and latest.stat().st_size == want["size"] and file_digest(latest)["sha256"] == want["sha256"]:
        return latest
    why = "is missing" if not latest.is_file() else f"differs from {listed[0]['name']} in the manifest"
    for e in listed:
        if verify_checkpoint(ck, e) is None:
            warn(f"checkpoint '{latest}' {why}; loading {e['name']}, the newest intact one")
            return ck / e["name"]
    raise CheckpointError(f"no intact checkpoint in '{ck}': latest.pt {why}, and no listed one matches the manifest")
