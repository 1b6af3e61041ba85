"""Training and encoding throughput of the two BPE kinds on a generated caption corpus.

    .venv/bin/python bench/bench_tokenizer.py [--captions 200000] [--vocab-size 16384] [--threads 2]

The corpus mixes the synthetic dataset's captions with varied web-like captions built from
templates and a generated vocabulary of pseudo-words (so that a 16384-token vocabulary is reachable).
Figures are printed and written to bench/results/tokenizer.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tessera.dataprep import synthetic as S  # noqa: E402
from tessera.dataprep.tokenizer import KINDS, train_tokenizer  # noqa: E402

TEMPLATES = [
    "a photo of {a} {n} {p} the {m}",
    "{A} {n} and {a} {n2} on a {m}",
    "close-up of the {n} near {a} {m}, {y}",
    "an illustration of {a} {n} wearing a {n2}",
    "{a} {n} in {c} at sunset",
    "the {m} of {c}, seen from {a} {n2}",
    "{n} #{k} for sale - {a} {n2} ({y})",
]
ONSETS = [
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "ch",
    "cl",
    "dr",
    "gr",
    "pl",
    "sh",
    "st",
    "th",
    "tr",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "oo", "y"]
CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "ck", "m"]


def _words(rng: np.random.Generator, n: int) -> list[str]:
    out = set()
    while len(out) < n:
        k = rng.integers(1, 4)
        out.add(
            "".join(
                ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))] + CODAS[rng.integers(len(CODAS))] for _ in range(k)
            )
        )
    return sorted(out)


def make_corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    nouns, adjs, places, cities = _words(rng, 6000), _words(rng, 2000), _words(rng, 1500), _words(rng, 800)
    preps = ["on", "under", "beside", "behind", "inside", "above", "next to", "in front of"]
    synth = [S.caption(a) for a in S.all_combinations()]

    # Zipf-like word frequencies, as in real captions
    def pick(words):
        return words[min(int(rng.zipf(1.3)) - 1, len(words) - 1) if rng.random() < 0.7 else int(rng.integers(len(words)))]

    out = []
    for i in range(n):
        if i % 4 == 0:
            out.append(synth[int(rng.integers(len(synth)))])
            continue
        t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        a = pick(adjs)
        out.append(
            t.format(
                a=a,
                A=a.capitalize(),
                n=pick(nouns),
                n2=pick(nouns),
                p=preps[int(rng.integers(len(preps)))],
                m=pick(places),
                c=pick(cities).capitalize(),
                y=int(rng.integers(1950, 2025)),
                k=int(rng.integers(1, 10000)),
            )
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=200_000)
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the fastest is reported (the machine is shared)")
    ap.add_argument("--encode-captions", type=int, default=50_000, help="captions encoded per throughput figure")
    ap.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "tokenizer.md"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    corpus = make_corpus(args.captions)
    gen_s = time.perf_counter() - t0
    chars = sum(map(len, corpus))
    print(f"corpus: {len(corpus)} captions, {chars / 1e6:.1f} M characters (generated in {gen_s:.1f} s)")
    enc = corpus[: args.encode_captions]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        # youtokentome twice: Tessera's deterministic trainer (the default) and youtokentome's own C++ trainer
        variants = [(k, True, k) for k in KINDS] + [("youtokentome", False, "youtokentome (C++ trainer)")]
        for kind, deterministic, name in variants:
            train_s = math.inf
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                tok = train_tokenizer(
                    corpus,
                    Path(d) / f"{kind}.model",
                    kind=kind,
                    vocab_size=args.vocab_size,
                    threads=args.threads,
                    deterministic=deterministic,
                )
                train_s = min(train_s, time.perf_counter() - t0)
            figures = {"kind": name, "vocab": tok.vocab_size, "train_s": train_s, "train_caps_s": len(corpus) / train_s}
            for label, dropout, batched in (("batch", 0.0, True), ("batch_dropout", 0.1, True), ("single", 0.0, False)):
                s = math.inf
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    if batched:
                        ids = []
                        for i in range(0, len(enc), 4096):
                            ids.extend(tok.encode_batch(enc[i : i + 4096], dropout=dropout))
                    else:
                        ids = [tok.encode(c, dropout=dropout) for c in enc]
                    s = min(s, time.perf_counter() - t0)
                figures[f"{label}_caps_s"] = len(enc) / s
                figures[f"{label}_tok_s"] = sum(map(len, ids)) / s
                if label == "batch":
                    figures["tokens_per_caption"] = sum(map(len, ids)) / len(ids)
            rows.append(figures)
            print(
                f"{name:>26}: vocab {figures['vocab']}, train {train_s:.1f} s ({figures['train_caps_s']:,.0f} captions/s); "
                f"encode {figures['batch_caps_s']:,.0f} captions/s batched, {figures['batch_dropout_caps_s']:,.0f} with dropout 0.1, "
                f"{figures['single_caps_s']:,.0f} one at a time; {figures['tokens_per_caption']:.1f} tokens/caption"
            )

    lines = [
        "# Tokenizer benchmark (`bench/bench_tokenizer.py`)",
        "",
        f"Corpus: {len(corpus):,} generated captions ({chars / 1e6:.1f} M characters; one in four from the synthetic",
        "shapes dataset, the rest web-like templates over a pseudo-word vocabulary with Zipf frequencies),",
        f"lower-cased. Requested vocabulary {args.vocab_size}; training with {args.threads} threads; encoding figures over",
        f"the first {len(enc):,} captions (batches of 4096, and one call per caption). Fastest of {args.repeat} runs per figure.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs (figures are indicative).",
        "",
        "| kind | vocab | train s | train captions/s | encode captions/s (batch) | tokens/s (batch) | captions/s, BPE-dropout 0.1 | captions/s, one call each | tokens/caption |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['vocab']} | {r['train_s']:.1f} | {r['train_caps_s']:,.0f} | {r['batch_caps_s']:,.0f} | {r['batch_tok_s']:,.0f} | {r['batch_dropout_caps_s']:,.0f} | {r['single_caps_s']:,.0f} | {r['tokens_per_caption']:.1f} |"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
