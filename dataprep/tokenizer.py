"""BPE caption tokenizers (sentencepiece or youtokentome) behind one interface.

    tessera prep tokenizer --input SHARDS_OR_TEXT --output FILE --vocab-size 16384 --kind youtokentome

trains on the captions of webdataset shards (a folder of `*.tar`, one tar, a glob, a brace pattern
or s3://bucket/prefix, each holding `{key}.txt`) or of a text file (one caption per line), lower-cased as in the
paper (16384 tokens). It writes the model file `FILE` and the sidecar `FILE.json`
(`{"kind", "vocab_size", "lowercase", ...}`), each to a temporary name and then renamed; the sidecar
is renamed last, so a `FILE.json` always describes a complete model.

`load_tokenizer(FILE)` returns a `Tokenizer` with `.encode(text, dropout=0.0) -> list[int]`,
`.encode_batch(texts, dropout=0.0)`, `.decode(ids) -> str` and `.vocab_size`; ids lie in
`[0, vocab_size)`. `dropout > 0` is BPE-dropout (Provilkov et al. 2020; the paper uses 0.1 for
training captions): each merge is skipped with that probability, giving varied segmentations.

Both kinds use the same special ids: pad 0, unk 1, bos 2, eos 3 (`encode` adds none of them).
Training is deterministic by default: the same captions give the same model file. sentencepiece's trainer is; for
youtokentome models the merges are learnt by Tessera's own trainer (`tessera.dataprep.bpe`: youtokentome's algorithm
with one fixed order for ties), because youtokentome's C++ trainer breaks ties in an order that varies from run to
run, even on one thread. `deterministic=False` uses that C++ trainer (multi-threaded, faster on large corpora).
On a small corpus the number of possible merges can be smaller than the requested vocabulary:
both kinds then stop early, the sidecar records the size actually reached, and a note is logged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
import youtokentome as yttm

from tessera.core.errors import InputError
from tessera.dataprep.bpe import train_bpe, write_model
from tessera.dataprep.shards import is_tar_name, iter_members, list_shards, open_text
from tessera.dataprep.storage import is_s3

log = logging.getLogger("tessera.tokenizer")

KINDS = ("sentencepiece", "youtokentome")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SPECIAL = 4


def normalize(text: str, lowercase: bool = True) -> str:
    """Collapse whitespace (newlines included) and lower-case: the form both training and encoding see."""
    text = " ".join(str(text).split())
    return text.lower() if lowercase else text


# --------------------------------------------------------------------------------------------
# Reading captions


def read_captions(spec: str | Path) -> Iterator[str]:
    """Every caption of the input: the `*.txt` members of tar shards, or the lines of a text file.

    `spec` is any shard spec of tessera.dataprep.shards.list_shards (folders, tars, globs, brace
    patterns, s3://); a listed file whose name is not a tar's is read as text, one caption per line
    (a local file is also taken as a tar when it is one). The spec is listed at once, so a bad one
    fails here, before any training.
    """
    return _captions(list_shards(spec))


def _is_tar(url: str) -> bool:
    if is_tar_name(url) or is_s3(url):
        return is_tar_name(url)
    try:
        return tarfile.is_tarfile(url)
    except OSError:  # unreadable: opening it as text names it
        return False


def _captions(files: list[str]) -> Iterator[str]:
    for url in files:
        if _is_tar(url):
            for _, data in iter_members(url, lambda name: name.endswith(".txt")):
                yield data.decode("utf-8", errors="replace")
            continue
        with open_text(url) as fh:
            try:
                yield from fh
            except OSError as e:
                raise InputError(f"caption file '{url}' cannot be read ({e})") from None


# the lister that `tessera prep tokenizer` checks its --input with (the command moves to tessera.cli.prep); list_shards is the name to use


# --------------------------------------------------------------------------------------------
# The tokenizer objects


class Tokenizer:
    """Common interface; see the module docstring. Picklable (reloads from its file), for data workers."""

    kind: str = ""

    def __init__(self, path: str | Path, lowercase: bool = True):
        self.path = Path(path)
        self.lowercase = lowercase
        self._model_bytes: bytes | None = None  # set when loaded from bytes (no file to reload from)
        self._load()

    def _load(self) -> None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, dropout: float = 0.0) -> list[int]:
        return self.encode_batch([text], dropout)[0]

    def encode_batch(self, texts: Sequence[str], dropout: float = 0.0) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def _check_dropout(self, dropout: float) -> None:
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"tokenizer dropout: expected in [0, 1), got {dropout}")

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is out of range [0, {self.vocab_size}) of tokenizer '{self.path}'")
        return out

    def __getstate__(self) -> dict:
        state = {"path": str(self.path), "lowercase": self.lowercase}
        if self._model_bytes is not None:
            state["model_bytes"] = self._model_bytes
        return state

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self.lowercase = state["lowercase"]
        self._model_bytes = state.get("model_bytes")
        if self._model_bytes is None:
            self._load()
        else:
            self._load_bytes(self._model_bytes)

    def _load_bytes(self, model: bytes) -> None:
        """Load from the model file's bytes through a temporary file that is removed again; `path` stays as named."""
        shown = self.path
        with tempfile.TemporaryDirectory(prefix="tessera-tok-") as d:
            self.path = Path(d) / "tokenizer.model"
            self.path.write_bytes(model)
            try:
                self._load()
            except InputError:
                raise InputError(f"tokenizer '{shown}' is not a {self.kind} model") from None
            finally:
                self.path = shown
        self._model_bytes = model

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path='{self.path}', vocab_size={self.vocab_size}, lowercase={self.lowercase})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def _load(self) -> None:
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise InputError(f"tokenizer model '{self.path}' is not a sentencepiece model ({str(e).splitlines()[0][:120]})") from None

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str, dropout: float = 0.0) -> list[int]:
        # one string straight through: the list path costs ~8x more per call for single captions
        self._check_dropout(dropout)
        text = normalize(text, self.lowercase)
        if dropout > 0:
            return self._sp.encode(text, enable_sampling=True, alpha=dropout, nbest_size=-1)
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], dropout: float = 0.0) -> list[list[int]]:
        self._check_dropout(dropout)
        texts = [normalize(t, self.lowercase) for t in texts]
        if dropout > 0:
            # for BPE models, alpha is the merge-dropout probability
            return self._sp.encode(texts, enable_sampling=True, alpha=dropout, nbest_size=-1)
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(self._check_ids(ids))

    @staticmethod
    def train(
        text_file: Path, model_path: Path, vocab_size: int, character_coverage: float, threads: int, deterministic: bool = True
    ) -> None:
        # deterministic either way: its pieces were the same at 1, 2 and 8 threads (tests/dataprep/test_tokenizer.py)
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                input=str(text_file),
                model_writer=buf,
                model_type="bpe",
                vocab_size=vocab_size,
                hard_vocab_limit=False,  # a small corpus may not support the full vocabulary
                character_coverage=character_coverage,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                num_threads=threads,
                minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            if "smaller than required_chars" in msg:
                m = re.search(r"(\d+) vs (\d+)", msg)
                need = f"at least {m.group(2)}" if m else "more"
                raise InputError(
                    f"tokenizer vocab_size {vocab_size} is too small for the corpus's characters plus {NUM_SPECIAL} specials (needs {need}); increase --vocab-size"
                ) from None
            raise InputError(f"sentencepiece training failed: {msg[:200]}") from None
        model_path.write_bytes(buf.getvalue())


class YouTokenToMeTokenizer(Tokenizer):
    kind = "youtokentome"

    def _load(self) -> None:
        if not self.path.is_file():
            raise InputError(f"tokenizer model '{self.path}' does not exist")
        try:
            self._bpe = yttm.BPE(model=str(self.path), n_threads=1)
            n = self._bpe.vocab_size()
        except Exception as e:  # yttm raises ValueError / RuntimeError on corrupt models
            raise InputError(f"tokenizer model '{self.path}' is not a youtokentome model ({type(e).__name__})") from None
        self._vocab_size = int(n)
        self._specials = [PAD_ID, BOS_ID, EOS_ID]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode_batch(self, texts: Sequence[str], dropout: float = 0.0) -> list[list[int]]:
        self._check_dropout(dropout)
        texts = [normalize(t, self.lowercase) for t in texts]
        return self._bpe.encode(texts, output_type=yttm.OutputType.ID, dropout_prob=float(dropout))

    def decode(self, ids: Iterable[int]) -> str:
        return self._bpe.decode([self._check_ids(ids)], ignore_ids=self._specials)[0]

    @staticmethod
    def train(
        text_file: Path, model_path: Path, vocab_size: int, character_coverage: float, threads: int, deterministic: bool = True
    ) -> None:
        if deterministic:
            with open(text_file, encoding="utf-8") as f:
                lines = [ln.rstrip("\n") for ln in f]
            char2id, merges = train_bpe(lines, vocab_size, character_coverage, (PAD_ID, UNK_ID, BOS_ID, EOS_ID))
            write_model(model_path, char2id, merges, (PAD_ID, UNK_ID, BOS_ID, EOS_ID))
            return
        # youtokentome prints its progress through C++ iostreams, which buffer until the process
        # exits; training in a child process keeps that out of our stdout.
        kw = dict(
            data=str(text_file),
            model=str(model_path),
            vocab_size=vocab_size,
            coverage=character_coverage,
            n_threads=threads,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
        )
        code = "import json, sys, youtokentome as y\ntry:\n    y.BPE.train(**json.loads(sys.argv[1]))\nexcept ValueError as e:\n    sys.stderr.write('ValueError: ' + str(e).splitlines()[0] + '\\n'); sys.exit(3)\n"
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(kw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            msg = lines[-1] if lines else f"exit code {proc.returncode}"
            if "too small" in msg:
                need = msg.split("Set ")[-1].split(".")[0] if "Set " in msg else "more"
                raise InputError(
                    f"tokenizer vocab_size {vocab_size} is too small for the corpus's characters ({need}); increase --vocab-size"
                )
            raise InputError(f"youtokentome training failed: {msg[:200]}")


TOKENIZERS: dict[str, type[Tokenizer]] = {"sentencepiece": SentencePieceTokenizer, "youtokentome": YouTokenToMeTokenizer}


def sidecar_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at `path` (model file with its `path.json` sidecar)."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise InputError(f"tokenizer model '{path}' does not exist")
    if not side.is_file():
        raise InputError(f"tokenizer sidecar '{side}' does not exist (train with `tessera prep tokenizer`)")
    try:
        meta = json.loads(side.read_text())
        kind = meta["kind"]
        lowercase = bool(meta.get("lowercase", True))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"tokenizer sidecar '{side}' is not valid JSON with a 'kind' entry") from None
    if kind not in TOKENIZERS:
        raise InputError(f"tokenizer sidecar '{side}': kind {kind!r} is not one of {', '.join(KINDS)}")
    tok = TOKENIZERS[kind](path, lowercase=lowercase)
    if "vocab_size" in meta and int(meta["vocab_size"]) != tok.vocab_size:
        raise InputError(f"tokenizer '{path}' has {tok.vocab_size} tokens but its sidecar says {meta['vocab_size']}")
    return tok


def tokenizer_from_bytes(model: bytes, meta: dict, name: str) -> Tokenizer:
    """A tokenizer from its model file's bytes and sidecar dict, as checkpoints store them.

    `name` says where it came from (shown in errors). Nothing is left on disk; the tokenizer keeps the
    bytes so that it still pickles for data workers.
    """
    try:
        kind = meta["kind"]
        lowercase = bool(meta.get("lowercase", True))
    except (KeyError, TypeError):
        raise InputError(f"tokenizer '{name}': its metadata has no 'kind' entry") from None
    if kind not in TOKENIZERS:
        raise InputError(f"tokenizer '{name}': kind {kind!r} is not one of {', '.join(KINDS)}")
    cls = TOKENIZERS[kind]
    tok = cls.__new__(cls)
    tok.__setstate__({"path": name, "lowercase": lowercase, "model_bytes": bytes(model)})
    if "vocab_size" in meta and int(meta["vocab_size"]) != tok.vocab_size:
        raise InputError(f"tokenizer '{name}' has {tok.vocab_size} tokens but its metadata says {meta['vocab_size']}")
    return tok


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def train_tokenizer(
    captions: Iterable[str],
    output: str | Path,
    kind: str = "youtokentome",
    vocab_size: int = 16384,
    lowercase: bool = True,
    character_coverage: float = 1.0,
    threads: int | None = None,
    deterministic: bool = True,
) -> Tokenizer:
    """Train a BPE tokenizer on `captions` and write `output` + `output.json`; returns the loaded tokenizer.

    `deterministic` (youtokentome only): learn the merges with Tessera's trainer, which gives the same file for the
    same captions; False uses youtokentome's C++ trainer, faster on large corpora, whose ties fall differently from
    run to run. `threads` applies to the C++ trainers (default: every core).
    """
    if kind not in TOKENIZERS:
        raise InputError(f"tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    if vocab_size < NUM_SPECIAL + 2:
        raise InputError(f"tokenizer vocab_size: expected >= {NUM_SPECIAL + 2}, got {vocab_size}")
    if not 0.0 < character_coverage <= 1.0:
        raise InputError(f"tokenizer character_coverage: expected in (0, 1], got {character_coverage}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # youtokentome's C++ training is not deterministic: on the demo's 4,000 captions 8 threads gave 6 different models
    # in 8 runs, 2 threads 2 in 8, and even 1 thread 2 in 10 on another corpus (session 16); the caption ids then differ,
    # and so does everything trained on them. Hence Tessera's trainer by default (deterministic=True)
    threads = threads or (os.cpu_count() or 1)
    trainer = "tessera" if kind == "youtokentome" and deterministic else kind
    n = 0
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmpdir:
        text_file = Path(tmpdir) / "captions.txt"
        with open(text_file, "w", encoding="utf-8") as f:
            for c in captions:
                c = normalize(c, lowercase)
                if c:
                    f.write(c + "\n")
                    n += 1
        if n == 0:
            raise InputError(f"no non-empty captions to train tokenizer '{output}' on")
        tmp_model = Path(tmpdir) / "model"
        TOKENIZERS[kind].train(text_file, tmp_model, vocab_size, character_coverage, threads, deterministic)
        actual = TOKENIZERS[kind](tmp_model, lowercase=lowercase).vocab_size
        tmp_model.replace(output)
    if actual < vocab_size:
        log.warning(
            "tokenizer: the corpus (%d captions) supports only %d tokens; vocabulary is %d (requested %d)", n, actual, actual, vocab_size
        )
    meta = {
        "kind": kind,
        "vocab_size": actual,
        "lowercase": lowercase,
        "requested_vocab_size": vocab_size,
        "trainer": trainer,
        "num_captions": n,
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
    }
    _atomic_json(sidecar_path(output), meta)
    return load_tokenizer(output)


__all__ = ["Tokenizer", "load_tokenizer", "train_tokenizer", "read_captions", "normalize", "KINDS", "TOKENIZERS"]
