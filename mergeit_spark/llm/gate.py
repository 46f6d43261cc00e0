"""Quality gate for merges, without an LLM scorer (the paper says "no LLM scoring"; the reference
code used Deita anyway).

A merged example is accepted only if every check passes. ``m`` is the embedding of the merged
instruction text (``instruction + " " + input``, the text the embed stage embeds, encoded by the
embed stage's own encoder, ``models.encode_texts``: same model, same precision), ``s_i`` the
embedding of source ``i``'s instruction text (read from the ``embeddings`` table, never recomputed).

``source_similarity``
    ``cos(m, s_i) >= gate.min_source_similarity`` for every source: the merge is about its sources
    at all (unrelated text fails here).
``request_coverage``
    For every source ``i``: the share of its *distinctive* request words (content words of its
    instruction + input that no other source of the group has) that the merged instruction + input
    keeps, minus how much less similar the merge is to ``s_i`` than to the closest source
    (``max_j cos(m, s_j) - cos(m, s_i)``), at least ``gate.min_request_coverage``. A merge that asks
    for one source's task only keeps none of the other's distinctive words and leans towards the
    source it kept; a real merge keeps some words of each and sits between them. Similarity alone
    cannot catch it: groups are built from pairs above 0.55, so a text close to one source is close
    to the other too.
``output_coverage``
    For every source: the share of the words only its output has (not the other sources' outputs)
    that the merged output carries, at least ``gate.min_output_coverage``. A merge that answers one
    source only, a copy of one source, or an output cut before the second answer carries ~none.
    Lexical on purpose: on the labelled set an embedding of the outputs separated good merges from
    one-answer merges worse (see ``tests/test_gate.py``), and outputs are long: embedding them costs
    several times what the instruction text costs per merge on a CPU.
``output_complete`` (``gate.require_complete_output``)
    The output ends where a sentence or a block ends (punctuation, a closing bracket/quote/tag, a
    digit, a hashtag, an emoji), not mid-sentence: a cut-off output fails here. Every script's
    sentence ends count (Unicode's sentence terminals: 。！？ of CJK, Devanagari ।, Arabic ؟ and
    ۔, Armenian ։, Ethiopic ።, ...), and so do the closing brackets and quotes of every script
    (」』）» ...). Thai and Lao end a sentence with a space, not a sign: there the last letter is an
    end, and a cut is left to the coverage checks.
``output_length``
    ``len(merged output) >= gate.min_output_ratio * len(longest source output)``.
``copy``
    ``cos(m, s) >= gate.max_copy_similarity`` for one source ``s`` AND the merged output is at most
    ``copy_length_ratio`` times as long as ``s``'s output: the merge just returned one input.

Words are ``content_words``: for scripts written without spaces (Chinese, Japanese, Thai, ...)
and for Korean, the character bigrams of each run. The embedding model, all-MiniLM-L6-v2, is an
English model: on Chinese and Japanese text it puts unrelated texts at cosine 0.4-0.6, so there
``source_similarity`` seldom refuses a merge about something else and the two coverage checks do;
the thresholds are those chosen on English.

Every check is computed every time; ``GateResult.failed`` lists the failing ones in the order
above, and ``describe()`` gives the numbers as JSON (the ``merges.gate`` column), from which the
stage counts rejections per check.

``BatchGate`` judges merges in batches: verdicts asked for while a batch is judged wait and go
together into the next one, on a worker thread (one ``encode_texts`` call per batch), so the event
loop keeps requests flowing while the model runs.
"""
from __future__ import annotations

import asyncio
import json
import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

import numpy as np

from ..config import EmbedSettings, GateSettings

CHECK_SOURCE_SIMILARITY = "source_similarity"
CHECK_REQUEST_COVERAGE = "request_coverage"
CHECK_OUTPUT_COVERAGE = "output_coverage"
CHECK_OUTPUT_COMPLETE = "output_complete"
CHECK_OUTPUT_LENGTH = "output_length"
CHECK_COPY = "copy"
CHECKS = (CHECK_SOURCE_SIMILARITY, CHECK_REQUEST_COVERAGE, CHECK_OUTPUT_COVERAGE,
          CHECK_OUTPUT_COMPLETE, CHECK_OUTPUT_LENGTH, CHECK_COPY)
DEFAULT_COPY_LENGTH_RATIO = GateSettings().copy_length_ratio

_FEEDBACK = {
    CHECK_SOURCE_SIMILARITY: "the merged instruction is not about the given examples",
    CHECK_REQUEST_COVERAGE: "the merged instruction leaves out what one of the examples asks",
    CHECK_OUTPUT_COVERAGE: "the merged output leaves out the answer to one of the examples",
    CHECK_OUTPUT_COMPLETE: "the merged output stops in the middle of a sentence",
    CHECK_OUTPUT_LENGTH: "the merged output is much shorter than the outputs it replaces",
    CHECK_COPY: "it repeats one example instead of combining all of them",
}

# Function words carry no content: a merge need not keep them. Short and fixed, so verdicts do not
# depend on a library's list.
_STOP_WORDS = frozenset("""
a an the and or of to in on for with by at from as is are was were be been being it its this that
these those which who whom what when where why how you he she we they them their his her our your
my me us do does did done can could should would will shall may might must not no nor so than then
there here also such each both any all some other into over under about after before between
through during up down out off again further once only own same too very just but if because while
until whether
""".split())


def _code_ranges(keep: Callable[[str], bool], below: int = 0x20000) -> str:
    """A regex character-class body of the code points under ``below`` that ``keep`` accepts."""
    out, start = [], None
    for code in range(below + 1):
        inside = code < below and keep(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            last = code - 1
            out.append(re.escape(chr(start)) + ("" if last == start else "-" + re.escape(chr(last))))
            start = None
    return "".join(out)


# Combining marks (Unicode categories Mn, Mc, Me) continue a word: Python's ``\w`` leaves them out,
# which cut Devanagari, Thai and other words apart at every vowel sign (precomposed Latin text has
# none, so its words are what they were).
_MARKS = _code_ranges(lambda ch: unicodedata.category(ch) in ("Mn", "Mc", "Me"))
_WORD = re.compile(r"[^\W_](?:[^\W_]|[" + _MARKS + r"])*")
# Scripts written without spaces between words (Han, kana, Thai, Lao, Khmer, Myanmar), and Hangul,
# whose spaced words carry their particles: a run of them becomes overlapping character bigrams.
_UNSPACED = re.compile(
    "[\u0E00-\u0EFF\u1000-\u109F\u1100-\u11FF\u1780-\u17FF\u3005-\u3007\u3040-\u30FF"
    "\u3130-\u318F\u31F0-\u31FF\u3400-\u4DBF\u4E00-\u9FFF\uA960-\uA97F\uAC00-\uD7FF"
    "\uF900-\uFAFF\uFF66-\uFF9F\U00020000-\U0003FFFF]+")
# Where a finished output can end: sentence or clause punctuation, a closing bracket, quote, tag or
# code fence, a digit, a hashtag, an emoji.
_COMPLETE_END = re.compile(r"""([.!?…"'”’)\]}>`*;:]|\d|#\w+|[\U0001F000-\U0001FFFF\u2600-\u27BF])\s*$""")
# The same in every script: the characters with Unicode's Sentence_Terminal property (PropList.txt;
# tests compare the set with the ``regex`` package's \p{Sentence_Terminal}): 。！？．｡ of CJK,
# Devanagari danda । ॥, Arabic ؟ ۔, Armenian ։, Ethiopic ። ፧, Myanmar ။, Khmer ។, ... .
SENTENCE_TERMINALS = frozenset(chr(code) for first, last in (
    (0x0021, 0x0021), (0x002E, 0x002E), (0x003F, 0x003F), (0x0589, 0x0589), (0x061D, 0x061F),
    (0x06D4, 0x06D4), (0x0700, 0x0702), (0x07F9, 0x07F9), (0x0837, 0x0837), (0x0839, 0x0839),
    (0x083D, 0x083E), (0x0964, 0x0965), (0x104A, 0x104B), (0x1362, 0x1362), (0x1367, 0x1368),
    (0x166E, 0x166E), (0x1735, 0x1736), (0x17D4, 0x17D5), (0x1803, 0x1803), (0x1809, 0x1809),
    (0x1944, 0x1945), (0x1AA8, 0x1AAB), (0x1B4E, 0x1B4F), (0x1B5A, 0x1B5B), (0x1B5E, 0x1B5F),
    (0x1B7D, 0x1B7F), (0x1C3B, 0x1C3C), (0x1C7E, 0x1C7F), (0x2024, 0x2024), (0x203C, 0x203D),
    (0x2047, 0x2049), (0x2CF9, 0x2CFB), (0x2E2E, 0x2E2E), (0x2E3C, 0x2E3C), (0x2E53, 0x2E54),
    (0x2E60, 0x2E61), (0x3002, 0x3002), (0xA4FF, 0xA4FF), (0xA60E, 0xA60F), (0xA6F3, 0xA6F3),
    (0xA6F7, 0xA6F7), (0xA876, 0xA877), (0xA8CE, 0xA8CF), (0xA92F, 0xA92F), (0xA9C8, 0xA9C9),
    (0xAA5D, 0xAA5F), (0xAAF0, 0xAAF1), (0xABEB, 0xABEB), (0xFE12, 0xFE12), (0xFE15, 0xFE16),
    (0xFE52, 0xFE52), (0xFE56, 0xFE57), (0xFF01, 0xFF01), (0xFF0E, 0xFF0E), (0xFF1F, 0xFF1F),
    (0xFF61, 0xFF61), (0x10A56, 0x10A57), (0x10F55, 0x10F59), (0x10F86, 0x10F89), (0x11047, 0x11048),
    (0x110BE, 0x110C1), (0x11141, 0x11143), (0x111C5, 0x111C6), (0x111CD, 0x111CD),
    (0x111DE, 0x111DF), (0x11238, 0x11239), (0x1123B, 0x1123C), (0x112A9, 0x112A9),
    (0x113D4, 0x113D5), (0x1144B, 0x1144C), (0x115C2, 0x115C3), (0x115C9, 0x115D7),
    (0x11641, 0x11642), (0x1173C, 0x1173E), (0x11944, 0x11944), (0x11946, 0x11946),
    (0x11A42, 0x11A43), (0x11A9B, 0x11A9C), (0x11C41, 0x11C42), (0x11EF7, 0x11EF8),
    (0x11F43, 0x11F44), (0x16A6E, 0x16A6F), (0x16AF5, 0x16AF5), (0x16B37, 0x16B38),
    (0x16B44, 0x16B44), (0x16D6E, 0x16D6F), (0x16E98, 0x16E98), (0x1BC9F, 0x1BC9F),
    (0x1DA88, 0x1DA88),
) for code in range(first, last + 1))
# Other ends that are not sentence terminals: ellipses (… is in _COMPLETE_END), the quotes that
# close German and Polish quotations (“ ‘), the full-width colon and semicolon, Tibetan shads.
_OTHER_ENDS = frozenset("‥⋯“‘；：\u0F0D\u0F0E\u0F0F\u0F10\u0F11\u0F12")
# Thai and Lao mark a sentence's end with a space, not a sign: their last letter is an end.
_NO_TERMINAL_SCRIPTS = re.compile("[\u0E00-\u0EFF]$")
_TRAILING_SELECTORS = "\uFE0E\uFE0F\u200D"


def embedding_text(instruction: str | None, input: str | None) -> str:  # noqa: A002
    """The text embedded for a record: ``(instruction + " " + input).strip()``, as the embed stage
    does (``stages.embed.record_texts``); merged and source texts must match to compare."""
    return f"{instruction or ''} {input or ''}".strip()


def _add_word(words: set[str], word: str) -> None:
    """The rules for one word of a spaced script (Latin, Cyrillic, Devanagari, ...)."""
    if word in _STOP_WORDS or (len(word) < 3 and not word.isdigit()):
        return
    if len(word) > 4 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    words.add(word)


def content_words(text: str | None) -> frozenset[str]:
    """Lower-cased words of ``text`` without function words, words under 3 letters (numbers are
    kept whole) and a plural ``s``: what a merge must keep of an example.

    A run of a script written without spaces (Chinese, Japanese, Thai, ...; and Korean) gives its
    overlapping character bigrams instead (a lone character, itself): such text has no spaces to
    find its words by, a dictionary segmenter for each language is a dependency the gate can do
    without, and bigrams are what CJK search indexes use (Lucene's CJK bigram filter) because most
    words there are two characters long, so a kept word keeps its bigram whatever the wording
    around it. Single characters would match across unrelated texts, whole runs would be whole
    clauses that a reworded merge never repeats."""
    words: set[str] = set()
    for run in _WORD.findall((text or "").lower()):
        if _UNSPACED.search(run) is None:
            _add_word(words, run)
            continue
        at = 0
        for seg in _UNSPACED.finditer(run):
            if seg.start() > at:
                _add_word(words, run[at:seg.start()])
            chars = seg.group()
            words.update([chars] if len(chars) == 1 else
                         (chars[i:i + 2] for i in range(len(chars) - 1)))
            at = seg.end()
        if at < len(run):
            _add_word(words, run[at:])
    return frozenset(words)


def distinctive_recall(merged: frozenset[str], sources: Sequence[frozenset[str]]) -> np.ndarray:
    """Per source: the share of its words that no other source has which ``merged`` carries
    (1.0 when it has none of its own)."""
    out = np.ones(len(sources))
    for i, words in enumerate(sources):
        others = frozenset().union(*(sources[j] for j in range(len(sources)) if j != i))
        own = words - others
        if own:
            out[i] = len(own & merged) / len(own)
    return out


def complete_ending(text: str | None) -> bool:
    """Whether ``text`` ends where a sentence or block ends, in any script."""
    text = (text or "").rstrip().rstrip(_TRAILING_SELECTORS)
    if _COMPLETE_END.search(text):
        return True
    if not text:
        return False
    last = text[-1]
    return (last in SENTENCE_TERMINALS or last in _OTHER_ENDS
            or unicodedata.category(last) in ("Pe", "Pf")      # closing brackets, final quotes
            or _NO_TERMINAL_SCRIPTS.search(text) is not None)


@dataclass
class GateResult:
    passed: bool
    failed: list[str] = field(default_factory=list)
    min_source_similarity: float = 0.0
    request_coverage: float = 0.0
    output_coverage: float = 0.0
    output_ratio: float = 0.0
    max_copy_similarity: float = 0.0
    copy_of: int | None = None

    def describe(self) -> str:
        """Compact JSON of the verdict and its numbers (the ``merges.gate`` column)."""
        return json.dumps({
            "passed": self.passed, "failed": self.failed,
            "min_source_similarity": round(self.min_source_similarity, 4),
            "request_coverage": round(self.request_coverage, 4),
            "output_coverage": round(self.output_coverage, 4),
            "output_ratio": round(self.output_ratio, 4),
            "max_copy_similarity": round(self.max_copy_similarity, 4),
            "copy_of": self.copy_of,
        }, separators=(",", ":"))

    def feedback(self) -> str:
        """Why the merge was refused, in words the LLM can act on (regeneration request)."""
        return "; ".join(_FEEDBACK[name] for name in self.failed) or "it failed the quality check"


class GroupSources:
    """What the gate needs of one group's sources, computed once per group: their instruction
    embeddings, their request and output words, their output lengths."""

    def __init__(self, sources: Sequence[Mapping[str, Any]], vectors: np.ndarray) -> None:
        v = np.asarray(vectors, dtype=np.float64).reshape(len(sources), -1)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        self.vectors = v / np.where(norms > 0, norms, 1.0)
        self.request_words = [content_words(embedding_text(s.get("instruction"), s.get("input")))
                              for s in sources]
        self.output_words = [content_words(s.get("output")) for s in sources]
        self.output_lengths = np.asarray([len(str(s.get("output") or "")) for s in sources])


def _unit(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def judge(merged: Sequence[Mapping[str, str]], groups: Sequence[GroupSources],
          merged_vectors: np.ndarray, settings: GateSettings,
          copy_length_ratio: float = DEFAULT_COPY_LENGTH_RATIO) -> list[GateResult]:
    """Verdicts for a batch of merges: ``merged[k]`` of the sources in ``groups[k]``, its
    instruction text embedded as ``merged_vectors[k]`` (any scale: vectors are re-normalised)."""
    m = _unit(np.asarray(merged_vectors).reshape(len(merged), -1))
    return [_verdict(merged[k], groups[k], groups[k].vectors @ m[k], settings, copy_length_ratio)
            for k in range(len(merged))]


def _verdict(merged: Mapping[str, str], group: GroupSources, sims: np.ndarray,
             settings: GateSettings, copy_length_ratio: float) -> GateResult:
    output = merged.get("output") or ""
    request = distinctive_recall(content_words(embedding_text(merged.get("instruction"),
                                                              merged.get("input"))),
                                 group.request_words) - (sims.max() - sims)
    carried = distinctive_recall(content_words(output), group.output_words)
    longest = int(group.output_lengths.max())
    copies = np.nonzero((sims >= settings.max_copy_similarity)
                        & (len(output) <= copy_length_ratio * group.output_lengths))[0]
    failing = {
        CHECK_SOURCE_SIMILARITY: float(sims.min()) < settings.min_source_similarity,
        CHECK_REQUEST_COVERAGE: float(request.min()) < settings.min_request_coverage,
        CHECK_OUTPUT_COVERAGE: float(carried.min()) < settings.min_output_coverage,
        CHECK_OUTPUT_COMPLETE: settings.require_complete_output and not complete_ending(output),
        CHECK_OUTPUT_LENGTH: len(output) < settings.min_output_ratio * longest,
        CHECK_COPY: copies.size > 0,
    }
    failed = [name for name in CHECKS if failing[name]]
    ratio = len(output) / longest if longest else (1e6 if output else 1.0)
    return GateResult(passed=not failed, failed=failed, min_source_similarity=float(sims.min()),
                      request_coverage=float(request.min()), output_coverage=float(carried.min()),
                      output_ratio=float(min(ratio, 1e6)), max_copy_similarity=float(sims.max()),
                      copy_of=int(copies[0]) if copies.size else None)


def check_merge(merged: Mapping[str, str], sources: Sequence[Mapping[str, Any]],
                merged_vector: np.ndarray, source_vectors: np.ndarray, settings: GateSettings,
                copy_length_ratio: float = DEFAULT_COPY_LENGTH_RATIO) -> GateResult:
    """The verdict for one merge (``judge`` on a batch of one)."""
    return judge([merged], [GroupSources(sources, source_vectors)],
                 np.asarray(merged_vector)[None, :], settings, copy_length_ratio)[0]


T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Async front of a blocking ``fn(items) -> results`` (one result per item, in order).

    Items submitted while ``fn`` runs queue up and go together into the next call, on a worker
    thread: with many merges in flight the gate embeds them in batches without blocking the loop.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int = 256) -> None:
        self._fn = fn
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._draining = False

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pending.append((item, future))
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
                    results = await asyncio.to_thread(self._fn, [item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to every waiter
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), result in zip(batch, results):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._draining = False


# Texts per forward pass of the gate. A gate call holds the few dozen merges that finished
# together, of mixed lengths (10-250 tokens); ``encode_texts`` orders them by token count and cuts
# them into forward passes, each padded to its longest text. At the embed stage's 32 a call is one
# pass, and most of its texts are padded far beyond their length; passes of 8 pad little while
# their matrices stay large enough to run at full speed (BENCHMARKS.md, merge-gate). Only the
# padding changes: the vectors are the same to float rounding.
GATE_FORWARD_ROWS = 8


def model_encoder(settings: EmbedSettings) -> Callable[[list[str]], np.ndarray]:
    """``encode(texts)`` with the embed stage's model and precision (loaded once per process),
    in forward passes of at most ``GATE_FORWARD_ROWS`` texts of similar length."""
    from ..models import encode_texts

    gate_settings = replace(settings, batch_size=min(settings.batch_size, GATE_FORWARD_ROWS))

    def encode(texts: list[str]) -> np.ndarray:
        return encode_texts(texts, gate_settings)

    return encode


class BatchGate:
    """The gate of one event loop: ``await gate.judge(merged, group)`` embeds the merged
    instruction text together with the others waiting and runs ``judge`` on the batch."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], settings: GateSettings,
                 copy_length_ratio: float = DEFAULT_COPY_LENGTH_RATIO, max_batch: int = 256) -> None:
        self._encode = encode
        self.settings = settings
        self.copy_length_ratio = copy_length_ratio
        self._batcher: Batcher[tuple[Mapping[str, str], GroupSources], GateResult] = Batcher(
            self._judge_batch, max_batch)

    def _judge_batch(self, items: list[tuple[Mapping[str, str], GroupSources]]) -> list[GateResult]:
        vectors = self._encode([embedding_text(m.get("instruction"), m.get("input")) for m, _ in items])
        return judge([m for m, _ in items], [g for _, g in items], vectors, self.settings,
                     self.copy_length_ratio)

    async def judge(self, merged: Mapping[str, str], group: GroupSources) -> GateResult:
        return await self._batcher.submit((merged, group))
