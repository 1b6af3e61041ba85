"""A deterministic BPE trainer that writes youtokentome's model format.

youtokentome's own trainer breaks ties between pairs of equal count in an order that changes from run to run
(its priority queue is only sorted when built with DETERMINISTIC_QUEUE), so the same captions can give different
merges, different caption ids and, downstream, different models. This trainer runs the same algorithm with one fixed
order, so the same captions always give the same file, byte for byte; youtokentome's C++ encoder then loads and
applies it (BPE-dropout included), as it does its own models.

The algorithm, as youtokentome's:
- a word is a maximal run of non-space characters, prefixed with the word-start mark U+2581;
- characters are kept from the most frequent down until `coverage` of the text's characters (spaces counted in the
  total) is covered; the rest are dropped from the words (the encoder maps them to unk);
- ids: the special tokens first, then U+2581, then the kept characters by descending count (ties: higher code point
  first), then one id per merge in the order the merges were made;
- each merge joins the most frequent adjacent pair, counted over words weighted by their frequency, with a run of
  L equal tokens holding floor(L / 2) pairs of that token with itself (pairs do not overlap); ties go to the pair
  whose larger id is smaller, then whose smaller id is smaller, then whose left id is larger (youtokentome's
  MergeCandidate order);
- merging stops at `vocab_size` tokens or when no pair is left.

Cost: one pass to count words, then each merge touches only the words that hold its pair. The demo's 4,000
captions train in well under a second; `bench/bench_tokenizer.py` times larger corpora.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from tessera.core.errors import InputError

WORD_START = "\u2581"


def _pairs(word: tuple[int, ...]) -> Counter:
    """Adjacent pairs of `word`; a run of L equal tokens holds floor(L / 2) self-pairs."""
    out: Counter = Counter()
    i, n = 0, len(word)
    while i < n:
        j = i
        while j + 1 < n and word[j + 1] == word[i]:
            j += 1
        run = j - i + 1
        if run > 1:
            out[(word[i], word[i])] += run // 2
        if j + 1 < n:
            out[(word[j], word[j + 1])] += 1
        i = j + 1
    return out


def _merge(word: tuple[int, ...], x: int, y: int, z: int) -> tuple[int, ...]:
    """`word` with each (x, y), taken left to right without overlap, replaced by z."""
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == x and word[i + 1] == y:
            out.append(z)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _priority(count: int, x: int, y: int) -> tuple[int, int, int, int]:
    """Heap key: the smallest key is the next merge (most frequent, then youtokentome's tie order)."""
    return (-count, max(x, y), min(x, y), -x)


def _alphabet(words: Counter, total: int, coverage: float, n_special: int) -> dict[str, int]:
    """{character: id}: the word-start mark, then the characters kept for `coverage` by descending count."""
    chars: Counter = Counter()  # words hold no spaces: str.split() removed them (youtokentome's spaces among them)
    for w, c in words.items():
        for ch in w:
            chars[ch] += c
    # drop characters from the rarest up while the rest still cover `coverage` of the text
    by_count = sorted(((c, ord(ch)) for ch, c in chars.items()), reverse=True)
    removed = 0
    kept = len(by_count)
    while kept > 0 and total - removed - by_count[kept - 1][0] > total * coverage:
        kept -= 1
        removed += by_count[kept][0]
    char2id = {WORD_START: n_special}
    for i, (_, cp) in enumerate(by_count[:kept]):
        char2id[chr(cp)] = n_special + 1 + i
    return char2id


def _learn_merges(seqs: Counter, next_id: int, vocab_size: int) -> list[tuple[int, int, int]]:
    """Merges (x, y, z) over the words `seqs` ({id tuple: count}) until `vocab_size` ids or no pair is left."""
    vocab: list[tuple[int, ...]] = sorted(seqs)
    freq = [seqs[w] for w in vocab]
    counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that may hold it
    for i, w in enumerate(vocab):
        for p, k in _pairs(w).items():
            counts[p] += k * freq[i]
            where[p].add(i)
    heap = [(*_priority(c, *p), p) for p, c in counts.items() if c > 0]
    heapq.heapify(heap)
    merges: list[tuple[int, int, int]] = []
    while next_id < vocab_size and heap:
        neg, _, _, _, (x, y) = heapq.heappop(heap)
        if counts.get((x, y), 0) != -neg:
            continue  # stale entry: the count changed since it was pushed
        z = next_id
        next_id += 1
        merges.append((x, y, z))
        changed: set[tuple[int, int]] = set()
        for i in where.pop((x, y), ()):  # any order: the counts are sums
            old = vocab[i]
            new = _merge(old, x, y, z)
            if new == old:
                continue
            for p, k in _pairs(old).items():
                counts[p] -= k * freq[i]
                changed.add(p)
            for p, k in _pairs(new).items():
                counts[p] += k * freq[i]
                where[p].add(i)
                changed.add(p)
            vocab[i] = new
        counts.pop((x, y), None)
        changed.discard((x, y))
        for p in changed:
            c = counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (*_priority(c, *p), p))
            else:
                counts.pop(p, None)
    return merges


def train_bpe(
    lines: Iterable[str],
    vocab_size: int,
    coverage: float = 1.0,
    special_ids: tuple[int, int, int, int] = (0, 1, 2, 3),
) -> tuple[dict[str, int], list[tuple[int, int, int]]]:
    """BPE on `lines` (already normalised). Returns ({character: id}, [(x, y, z) merges in order]).

    `special_ids` are (pad, unk, bos, eos) and must be 0..3 in some order: the other ids follow them.
    """
    if sorted(special_ids) != [0, 1, 2, 3]:
        raise InputError(f"BPE special ids {special_ids}: expected the ids 0, 1, 2 and 3")
    if not 0.0 < coverage <= 1.0:
        raise InputError(f"BPE coverage: expected in (0, 1], got {coverage}")
    n_special = len(special_ids)
    words: Counter = Counter()
    total = 0  # every character, spaces included (youtokentome's coverage denominator)
    for line in lines:
        total += len(line) + 1  # the newline that ends the line in the training file
        words.update(line.replace(WORD_START, " ").split())
    char2id = _alphabet(words, total, coverage, n_special)
    if len(char2id) + n_special > vocab_size:
        raise InputError(
            f"tokenizer vocab_size {vocab_size} is too small for the corpus's characters (needs >= {len(char2id) + n_special}); increase --vocab-size"
        )
    # words as id tuples (dropped characters removed; words that become equal are counted together)
    seqs: Counter = Counter()
    for w, c in words.items():
        seqs[(char2id[WORD_START],) + tuple(char2id[ch] for ch in w if ch in char2id)] += c
    return char2id, _learn_merges(seqs, n_special + len(char2id), vocab_size)


def write_model(
    path: str | Path, char2id: dict[str, int], merges: list[tuple[int, int, int]], special_ids: tuple[int, int, int, int]
) -> None:
    """youtokentome's model file: "n_chars n_merges", one "code_point id" per character, one "x y z" per merge,
    then "unk pad bos eos" (`special_ids` is given as pad, unk, bos, eos)."""
    pad, unk, bos, eos = special_ids
    lines = [f"{len(char2id)} {len(merges)}"]
    lines += [f"{ord(ch)} {i}" for ch, i in sorted(char2id.items(), key=lambda kv: kv[1])]
    lines += [f"{x} {y} {z}" for x, y, z in merges]
    lines.append(f"{unk} {pad} {bos} {eos}")
    Path(path).write_text("\n".join(lines) + "\n")


__all__ = ["train_bpe", "write_model", "WORD_START"]
