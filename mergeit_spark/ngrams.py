"""Word n-grams as 64-bit hashes: the shared machinery of decontamination and lexical dedup.

Normalisation (the same on both sides of every comparison): Unicode NFKC, lower case, every
character that is neither a letter, a digit nor whitespace replaced by a space (so "well-known"
and "well known" agree), runs of whitespace collapsed. Words are what is left, split on
whitespace.

A word's hash is the first 8 bytes of its BLAKE2b digest, stable across processes and machines
(Python's ``hash`` is salted per process). An n-gram's hash folds its word hashes in order
(polynomial, wrapping at 2**64) and mixes the result with n through the SplitMix64 finaliser, so
an m-gram and an n-gram of the same words never share a hash by construction. All of it is numpy
on arrays of uint64: an executor hashes a batch of texts without a Python loop per n-gram.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

import numpy as np

_NOT_WORD = re.compile(r"[^\w\s]|_", re.UNICODE)
_SPACE = re.compile(r"\s+", re.UNICODE)
_MULTIPLIER = np.uint64(0x100000001B3)   # odd: multiplication by it is a bijection mod 2**64
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def normalise(text: str | None) -> str:
    """Lower case, NFKC, punctuation and symbols as spaces, single spaces, stripped."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _NOT_WORD.sub(" ", text)).strip()


def words(text: str | None) -> list[str]:
    """The normalised words of ``text``."""
    norm = normalise(text)
    return norm.split(" ") if norm else []


class WordHasher:
    """Word -> uint64, with a cache (a task sees the same words again and again)."""

    def __init__(self, max_cached: int = 500_000) -> None:
        self._cache: dict[str, int] = {}
        self._max = max_cached

    def __call__(self, tokens: Iterable[str]) -> np.ndarray:
        cache = self._cache
        out = []
        for token in tokens:
            value = cache.get(token)
            if value is None:
                value = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
                if len(cache) < self._max:
                    cache[token] = value
            out.append(value)
        return np.array(out, dtype=np.uint64)


def _finalise(values: np.ndarray, n: int) -> np.ndarray:
    """SplitMix64's finaliser over ``values`` xor a constant derived from ``n``."""
    with np.errstate(over="ignore"):
        z = values ^ (np.uint64(n) * _GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return z ^ (z >> np.uint64(31))


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every run of ``n`` consecutive words, in order (empty when fewer words)."""
    count = word_hashes.size - n + 1
    if n <= 0 or count <= 0:
        return np.zeros(0, dtype=np.uint64)
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n):
            acc = acc * _MULTIPLIER + word_hashes[offset:offset + count]
    return _finalise(acc, n)


def as_signed(values: np.ndarray) -> np.ndarray:
    """uint64 hashes as int64 (Spark's long), bit for bit."""
    return values.view(np.int64)
