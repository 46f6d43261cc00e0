"""Lexical near-copies: MinHash signatures of word shingles, LSH banding, exact Jaccard checks.

Embeddings at cosine 0.95 miss near-copies that a reader sees at once: a prefix such as "Please
answer:", a dropped word, a swapped synonym in a short instruction (on the benchmark,
``bench/bench_dedup_recall.py``, 43 of 500 planted copies). Their word shingles (runs of
``shingle`` words, hashed by :mod:`mergeit_spark.ngrams`, after its normalisation: case and
punctuation do not count) still overlap mostly, so the dedup stage also compares shingle sets.

- **Shingles.** A text's set of ``shingle``-word n-gram hashes; a text shorter than that has its
  whole word sequence as its one shingle; an empty text has none (and no lexical duplicate).
- **Signatures.** ``bands x rows`` MinHash values per text: the minimum over its shingles of
  ``bands x rows`` hash permutations, each ``mix(x * a + b)`` (``a`` odd, so ``x * a + b`` is a
  bijection mod 2**64, then the SplitMix64 finaliser, a bijection too). The ``a`` and ``b`` come
  from ``numpy.random.default_rng(seed)``: every process and machine draws the same ones.
- **Banding.** Each band of ``rows`` values folds into one hash; two texts that share a band's
  whole hash are candidates. A pair of Jaccard similarity J shares at least one of ``bands``
  bands with probability ``1 - (1 - J**rows)**bands`` (the defaults, 50 x 3: 0.9987 at the
  default threshold J = 0.5, 0.96 at 0.4, 0.33 at 0.2).
- **Verification.** Every candidate pair's exact Jaccard similarity of the two shingle sets
  (not the MinHash estimate) is computed; the pair is a lexical near-copy when it is at or above
  ``threshold``. A band collision of unrelated texts therefore costs a check, never a false pair.
- **Templated texts are left to the semantic pass.** A long shared preamble (a tool description,
  "Rewrite the following sentence ...") makes any two rows of a template near-copies by shingles,
  whatever their distinct part asks: on the shared data, Jaccard 0.8 paired "What is the current
  population of Los Angeles?" with "What is the current value of Bitcoin?" behind one search-tool
  preamble, hundreds of times. So a text at least ``template_share`` of whose shingles each occur
  in ``template_rows`` or more texts of its batch (its cluster: templates cluster together) takes
  no part in the lexical pass; the embeddings judge it (on the benchmark: 3,635 of 8,473 rows,
  the tool-use prompts). The threshold counts texts, not a share of the batch, so a template is
  found in a small cluster and a big one alike. The price: five or more copies of one text are
  a template too, left to the semantic pass (which finds case and punctuation variants: they are
  one text to the uncased model). With 10 texts instead of 5 the benchmark's real rows gave 2 to
  8 times as many pairs of templated rows over the threshold.

All of it is numpy on arrays of uint64 for a whole batch of texts (an executor's cluster): no
Python loop per shingle, per permutation or per candidate pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from .ngrams import WordHasher, ngram_hashes, words

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_FOLD = np.uint64(0x100000001B3)
_BAND = np.uint64(0x9E3779B97F4A7C15)
_EMPTY = np.iinfo(np.uint64).max
_CHUNK_ELEMENTS = 1 << 22  # shingles x permutations hashed at once (32 MB of uint64)

# A text is templated when this share of its shingles each occur in this many texts of its batch.
TEMPLATE_ROWS = 5
TEMPLATE_SHARE = 0.5

_HASHER: WordHasher | None = None  # one per Python worker process: its cache serves every task


def _word_hasher() -> WordHasher:
    global _HASHER
    if _HASHER is None:
        _HASHER = WordHasher()
    return _HASHER


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise (a bijection of uint64)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class MinHashParams:
    """The lexical pass's knobs (``dedup.minhash_*``), small enough to ship to every task."""

    shingle: int = 3
    bands: int = 50
    rows: int = 3
    threshold: float = 0.5
    seed: int = 1
    template_rows: int = TEMPLATE_ROWS
    template_share: float = TEMPLATE_SHARE

    @classmethod
    def from_settings(cls, dedup) -> "MinHashParams | None":
        """The pass's knobs from ``DedupSettings``; None when ``dedup.minhash`` is off."""
        if not dedup.minhash:
            return None
        return cls(dedup.minhash_shingle, dedup.minhash_bands, dedup.minhash_rows, dedup.minhash_threshold,
                   dedup.minhash_seed)

    @property
    def permutations(self) -> int:
        return self.bands * self.rows


def shingles(text: str | None, size: int, hasher: WordHasher | None = None) -> np.ndarray:
    """The sorted, distinct shingle hashes of ``text`` (uint64): its ``size``-word n-grams, or its
    whole word sequence as one shingle when it has fewer words; empty for an empty text."""
    word_hashes = (hasher or _word_hasher())(words(text))
    if word_hashes.size == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.unique(ngram_hashes(word_hashes, min(size, word_hashes.size)))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + l) for s, l in zip(starts, lengths)])``, without the loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    steps = np.ones(total, dtype=np.int64)
    nonempty = lengths > 0
    first = (ends - lengths)[nonempty]
    steps[0] = starts[nonempty][0]
    # At each segment's first element jump from the previous segment's last one to its start.
    steps[first[1:]] = starts[nonempty][1:] - (starts[nonempty][:-1] + lengths[nonempty][:-1] - 1)
    return np.cumsum(steps)


@dataclass(frozen=True)
class ShingleSets:
    """Many texts' shingle sets, stored flat: row ``i``'s sorted hashes are
    ``values[offsets[i]:offsets[i + 1]]``."""

    offsets: np.ndarray  # int64, n + 1
    values: np.ndarray   # uint64

    @classmethod
    def of_texts(cls, texts: Sequence[str | None], size: int) -> "ShingleSets":
        hasher = _word_hasher()
        sets = [shingles(t, size, hasher) for t in texts]
        offsets = np.zeros(len(sets) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([s.size for s in sets])
        values = np.concatenate(sets) if sets else np.zeros(0, dtype=np.uint64)
        return cls(offsets, values.astype(np.uint64, copy=False))

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def concat(self, other: "ShingleSets") -> "ShingleSets":
        """These rows, then ``other``'s."""
        return ShingleSets(np.concatenate([self.offsets, self.offsets[-1] + other.offsets[1:]]),
                           np.concatenate([self.values, other.values]))

    def templated(self, min_rows: int, share: float, population: "ShingleSets | None" = None) -> np.ndarray:
        """bool per row: at least ``share`` of its shingles each occur in ``min_rows`` or more rows
        of ``population`` (default: these rows). A row without shingles is not templated."""
        population = self if population is None else population
        distinct, rows = np.unique(population.values, return_counts=True)  # a row holds a value once
        common = distinct[rows >= min_rows]
        lengths = self.lengths
        row_of = np.repeat(np.arange(len(self)), lengths)
        per_row = np.bincount(row_of, weights=np.isin(self.values, common), minlength=len(self))
        return (lengths > 0) & (per_row >= share * lengths)

    def take(self, positions: np.ndarray) -> "ShingleSets":
        """The sets of rows ``positions``, in that order."""
        lengths = self.lengths[positions]
        offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        return ShingleSets(offsets, self.values[_ranges(self.offsets[:-1][positions], lengths)])

    def jaccard(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Exact Jaccard similarity of the sets of rows ``left[p]`` and ``right[p]``, per pair p
        (two empty sets: 0). Each element of a left set is looked up in its right set by one
        binary search over (row, value) keys, all pairs at once."""
        left, right = np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
        lengths = self.lengths
        keys, distinct, value_ids = self._keys()
        pair = np.repeat(np.arange(left.size), lengths[left])
        elements = _ranges(self.offsets[:-1][left], lengths[left])
        query = right[pair] * distinct + value_ids[elements]
        found = np.searchsorted(keys, query)
        hit = keys[np.minimum(found, max(keys.size - 1, 0))] == query if keys.size else np.zeros(0, dtype=bool)
        common = np.bincount(pair[hit], minlength=left.size).astype(np.float64)
        union = lengths[left] + lengths[right] - common
        return np.divide(common, union, out=np.zeros(left.size), where=union > 0)

    def _keys(self) -> tuple[np.ndarray, int, np.ndarray]:
        """(row x distinct + value id, sorted; distinct; value id of each element): the ids
        number the distinct values in order, so each row's keys ascend and so do all."""
        cached = self.__dict__.get("_key_cache")
        if cached is None:
            distinct_values, value_ids = np.unique(self.values, return_inverse=True)
            distinct = max(int(distinct_values.size), 1)
            rows = np.repeat(np.arange(len(self), dtype=np.int64), self.lengths)
            cached = (rows * distinct + value_ids, distinct, value_ids.astype(np.int64))
            object.__setattr__(self, "_key_cache", cached)
        return cached


def permutations(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of ``count`` hash permutations ``mix(x * a + b)``, ``a`` odd: the same for a seed
    in every process."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2 ** 64, size=count, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2 ** 64, size=count, dtype=np.uint64)
    return a, b


def signatures(sets: ShingleSets, count: int, seed: int) -> np.ndarray:
    """MinHash signatures (n x ``count`` uint64): per row, the minimum of each permutation over
    its shingles; a row without shingles is all ``2**64 - 1``. Hashed a chunk of permutations
    at a time, so at most ``_CHUNK_ELEMENTS`` values are held."""
    a, b = permutations(count, seed)
    out = np.full((len(sets), count), _EMPTY, dtype=np.uint64)
    nonempty = sets.lengths > 0
    if not nonempty.any():
        return out
    starts = sets.offsets[:-1][nonempty]
    step = max(1, _CHUNK_ELEMENTS // max(sets.values.size, 1))
    for first in range(0, count, step):
        cols = slice(first, first + step)
        with np.errstate(over="ignore"):
            hashed = _mix(sets.values[:, None] * a[None, cols] + b[None, cols])
        out[nonempty, cols] = np.minimum.reduceat(hashed, starts, axis=0)
    return out


def band_hashes(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One hash per band of ``rows`` consecutive signature values (n x ``bands`` uint64); each
    band mixes in its own index, so equal values in different bands do not collide."""
    n = signature.shape[0]
    grouped = signature[:, :bands * rows].reshape(n, bands, rows)
    acc = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            acc = acc * _FOLD + grouped[:, :, r]
        return _mix(acc ^ (np.arange(1, bands + 1, dtype=np.uint64) * _BAND)[None, :])


@dataclass(frozen=True)
class LexicalIndex:
    """The texts of one batch (a cluster) ready for the lexical pass: their shingle sets and band
    hashes. :meth:`similarity` gives, for two lists of rows, the verified Jaccard of every
    candidate pair at or above the threshold, 0 elsewhere."""

    sets: ShingleSets
    bands: np.ndarray   # n x bands uint64
    active: np.ndarray  # bool: the text has shingles and is not templated (see the module doc)
    threshold: float

    @classmethod
    def of_texts(cls, texts: Sequence[str | None], params: MinHashParams,
                 others: Sequence[str | None] = ()) -> "LexicalIndex":
        """The index of ``texts``; whether a text is templated is judged among ``texts`` and
        ``others`` (the rest of the batch, not indexed)."""
        sets = ShingleSets.of_texts(texts, params.shingle)
        population = sets.concat(ShingleSets.of_texts(others, params.shingle)) if len(others) else sets
        active = (sets.lengths > 0) & ~sets.templated(params.template_rows, params.template_share, population)
        signature = signatures(sets, params.permutations, params.seed)
        return cls(sets, band_hashes(signature, params.bands, params.rows), active, params.threshold)

    def __len__(self) -> int:
        return len(self.sets)

    def take(self, positions: np.ndarray) -> "LexicalIndex":
        """The index of rows ``positions``, in that order."""
        return LexicalIndex(self.sets.take(positions), self.bands[positions], self.active[positions], self.threshold)

    def candidates(self, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
        """bool (len(rows) x len(others)): the pair shares a band's whole hash, and both texts are
        active."""
        shared = np.zeros((len(rows), len(others)), dtype=bool)
        for band in range(self.bands.shape[1]):
            shared |= self.bands[rows, band][:, None] == self.bands[others, band][None, :]
        return shared & self.active[rows][:, None] & self.active[others][None, :]

    def similarity(self, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
        """float64 (len(rows) x len(others)): the exact Jaccard of each candidate pair at or above
        the threshold; 0 for every other pair."""
        rows, others = np.asarray(rows, dtype=np.int64), np.asarray(others, dtype=np.int64)
        out = np.zeros((len(rows), len(others)), dtype=np.float64)
        i, j = np.nonzero(self.candidates(rows, others))
        if i.size:
            jaccard = self.sets.jaccard(rows[i], others[j])
            near = jaccard >= self.threshold
            out[i[near], j[near]] = jaccard[near]
        return out


def text_jaccard(left: Sequence[str | None], right: Sequence[str | None], shingle: int) -> np.ndarray:
    """Exact Jaccard similarity of the shingle sets of ``left[p]`` and ``right[p]``, per pair."""
    sets = ShingleSets.of_texts([*left, *right], shingle)
    n = len(left)
    return sets.jaccard(np.arange(n), np.arange(n, 2 * n))
