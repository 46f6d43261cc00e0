"""Quality gate for merges, without an LLM scorer (the paper says "no LLM scoring"; the reference
code used Deita anyway).

A merged example is accepted only if all three checks pass:

(a) ``source_similarity``: the embedding of the merged instruction text (``instruction + " " +
    input``, stripped, the same text the embed stage embeds) has cosine similarity at least
    ``gate.min_source_similarity`` to EVERY source's embedding. A merge that drops one source's
    task fails here.
(b) ``output_length``: ``len(merged output) >= gate.min_output_ratio * len(longest source
    output)`` in characters. A merge that answers less than its sources did fails here.
(c) ``copy``: the merge is a near-copy of one source ``s`` when BOTH
    ``cos(merged, s) >= gate.max_copy_similarity`` AND
    ``len(merged output) <= copy_length_ratio * len(s's output)`` (default 1.1, i.e. the output
    grew by at most 10 %). Such a "merge" just returned one of its inputs; the others are lost.

All three are computed every time; ``GateResult.failed`` lists the checks that failed, in the
order a, b, c, and ``describe()`` gives the numbers as JSON (stored in ``merges.gate``).

Embeddings of merged texts are computed on the executor with the embed stage's ``encode_texts``
(model loaded once per worker process). ``BatchEncoder`` collects the texts of the groups that
finish at about the same time into one forward pass, off the event loop's thread.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import EmbedSettings, GateSettings

CHECK_SOURCE_SIMILARITY = "source_similarity"
CHECK_OUTPUT_LENGTH = "output_length"
CHECK_COPY = "copy"
DEFAULT_COPY_LENGTH_RATIO = GateSettings().copy_length_ratio

_FEEDBACK = {
    CHECK_SOURCE_SIMILARITY: "the merged instruction leaves out part of what some example asks",
    CHECK_OUTPUT_LENGTH: "the merged output is much shorter than the outputs it replaces",
    CHECK_COPY: "it repeats one example instead of combining all of them",
}


def embedding_text(instruction: str | None, input: str | None) -> str:  # noqa: A002
    """The text embedded for a record: ``(instruction + " " + input).strip()``, as the embed stage
    does (``stages.embed.record_texts``); merged and source texts must match to compare."""
    return f"{instruction or ''} {input or ''}".strip()


@dataclass
class GateResult:
    passed: bool
    failed: list[str] = field(default_factory=list)
    min_source_similarity: float = 0.0
    output_ratio: float = 0.0
    max_copy_similarity: float = 0.0
    copy_of: int | None = None

    def describe(self) -> str:
        """Compact JSON of the verdict and its numbers (the ``merges.gate`` column)."""
        return json.dumps({
            "passed": self.passed, "failed": self.failed,
            "min_source_similarity": round(self.min_source_similarity, 4),
            "output_ratio": round(self.output_ratio, 4),
            "max_copy_similarity": round(self.max_copy_similarity, 4),
            "copy_of": self.copy_of,
        }, separators=(",", ":"))

    def feedback(self) -> str:
        """Why the merge was refused, in words the LLM can act on (regeneration request)."""
        return "; ".join(_FEEDBACK[name] for name in self.failed) or "it failed the quality check"


def check_merge(merged: Mapping[str, str], sources: Sequence[Mapping[str, Any]],
                merged_vector: np.ndarray, source_vectors: np.ndarray, settings: GateSettings,
                copy_length_ratio: float = DEFAULT_COPY_LENGTH_RATIO) -> GateResult:
    """Apply checks (a), (b), (c) to one merge. Vectors are re-normalised, so any scale works."""
    m = np.asarray(merged_vector, dtype=np.float64).ravel()
    s = np.asarray(source_vectors, dtype=np.float64).reshape(len(sources), -1)
    m = m / (np.linalg.norm(m) or 1.0)
    s = s / np.where((n := np.linalg.norm(s, axis=1, keepdims=True)) > 0, n, 1.0)
    sims = s @ m
    out_len = len(merged.get("output") or "")
    source_out = [len(str(src.get("output") or "")) for src in sources]
    longest = max(source_out) if source_out else 0
    ratio = out_len / longest if longest else float("inf") if out_len else 1.0

    failed = []
    if sims.size and float(sims.min()) < settings.min_source_similarity:
        failed.append(CHECK_SOURCE_SIMILARITY)
    if out_len < settings.min_output_ratio * longest:
        failed.append(CHECK_OUTPUT_LENGTH)
    copy_of = None
    for i, (sim, length) in enumerate(zip(sims, source_out)):
        if sim >= settings.max_copy_similarity and out_len <= copy_length_ratio * length:
            copy_of = i
            failed.append(CHECK_COPY)
            break
    return GateResult(passed=not failed, failed=failed,
                      min_source_similarity=float(sims.min()) if sims.size else 1.0,
                      output_ratio=float(min(ratio, 1e6)),
                      max_copy_similarity=float(sims.max()) if sims.size else 0.0,
                      copy_of=copy_of)


class BatchEncoder:
    """Async front of a blocking ``encode(texts) -> (n, dim) array``.

    Texts asked for while a forward pass runs are queued and go together into the next one, so a
    partition with many merges in flight embeds them in batches, on a worker thread, without
    blocking the event loop (requests keep flowing while the model runs).
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_batch: int = 64) -> None:
        self._encode = encode
        self._max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._draining = False

    async def encode(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pending.append((text, future))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self._max_batch]
                self._pending = self._pending[self._max_batch:]
                try:
                    vectors = await asyncio.to_thread(self._encode, [t for t, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to every waiter
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), vec in zip(batch, vectors):
                    if not fut.done():
                        fut.set_result(vec)
        finally:
            self._draining = False


def model_encoder(settings: EmbedSettings) -> Callable[[list[str]], np.ndarray]:
    """``encode(texts)`` with the embed stage's model (loaded once per worker process)."""
    from ..stages.embed import encode_texts

    def encode(texts: list[str]) -> np.ndarray:
        return encode_texts(texts, settings)

    return encode


class EmbeddingGate:
    """The gate for one group: ``await gate(merged)`` embeds the merge and runs ``check_merge``."""

    def __init__(self, sources: Sequence[Mapping[str, Any]], source_vectors: np.ndarray,
                 settings: GateSettings, encoder: BatchEncoder,
                 copy_length_ratio: float = DEFAULT_COPY_LENGTH_RATIO) -> None:
        self.sources = sources
        self.source_vectors = source_vectors
        self.settings = settings
        self.encoder = encoder
        self.copy_length_ratio = copy_length_ratio

    async def __call__(self, merged: Mapping[str, str]) -> GateResult:
        vector = await self.encoder.encode(embedding_text(merged.get("instruction"), merged.get("input")))
        return check_merge(merged, self.sources, vector, self.source_vectors, self.settings,
                           self.copy_length_ratio)
