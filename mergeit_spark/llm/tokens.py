"""Prompt-token estimates for budgets and rate limits, without the server's tokenizer.

A request is sent only when its estimated prompt tokens plus ``llm.max_tokens`` fit what is left
of the budget (``Budget``) and of the minute's token allowance (``RateLimits``); the estimate is
replaced by the server's own count when the reply arrives. So the estimate must not fall short of
what a real tokenizer counts (a cap would be overrun by the difference), while an estimate far
above it only makes budgets stop early. Its yardstick is the bundled model's tokenizer (SmolLM2's
49k byte-level BPE, mostly English in its merges): tokenizers with larger vocabularies split
non-Latin text into fewer tokens than it does, and none spends more than one token per UTF-8 byte.

``estimate_tokens`` adds a cost per character, by script:

* ASCII letters and spaces: 1/2 token each. English averages about 4.8 characters per token on
  SmolLM2's and MiniLM's tokenizers, source code about 3.7; at 1/2 no record of the project's
  data set is underestimated, the ones heavy in digits and signs coming closest.
* ASCII digits, punctuation, line breaks and tabs: 1 token each, and a space before a digit one
  more half. SmolLM2 (like Llama 2 and Mistral) gives every digit a token of its own, which no
  space joins, and a sign or a line break is its own token more often than not: a list or a table
  of numbers is one token per character, twice the rate of letters.
* Greek and Cyrillic 1.25, other Latin letters (accents, Latin Extended) 1.5, Hebrew and Arabic
  1.5: SmolLM2 spends 0.8-0.9, about 1.4 and 1.0-1.3 tokens per such character.
* Han ideographs, kana and the CJK punctuation and full-width forms: 2.5. SmolLM2 has few merges
  for them and spends 1.6-2 tokens per character of Chinese or Japanese text (a rare character
  falls back to its 3 bytes); BERT-style tokenizers (MiniLM) and the large hosted models, about 1
  or less. English's rate would count SmolLM2's tokens for them 3-4 times short.
* Anything else (Hangul, Thai, Devanagari, Ethiopic, Armenian, Georgian, emoji, ...): its UTF-8
  length in bytes, the most a byte-level BPE or a byte-fallback SentencePiece model can spend on
  it; SmolLM2 comes close on several (Hangul about 2.4 of 3, Armenian 2 of 2, Ethiopic 2.4 of 3,
  Thai 1.9 of 3).

``fewest_prompt_tokens`` is the other side: a count every tokenizer in use reaches (a sixth of a
token per ASCII character, half a token per CJK character, a quarter for the rest; a BPE tokenizer
with a very large vocabulary counts about 1 per 4.5 English characters and 1 per 1.5 Chinese ones).
It decides which prompts surely cannot fit a model's context (``prompt_too_long``): refusing a
prompt that would have fitted loses a merge, so that decision must not err high.

What is not covered: random strings (hashes, base64) cost a byte-level BPE 0.7-1 token per
character and are counted at about 0.6-0.8. ``estimate_prompt_tokens`` adds ``MESSAGE_OVERHEAD``
tokens per message for the chat template's role markers.
"""
from __future__ import annotations

import bisect
import math
import re
from typing import Any, Mapping, Sequence

MESSAGE_OVERHEAD = 8  # role markers and separators a chat template adds around each message

_ASCII_COST = tuple(0.5 if (chr(c).isalpha() or chr(c) == " ") else 1.0 for c in range(128))

# (first code point, cost) of ranges above ASCII, sorted; a range runs to the next one's start.
# None means: the character's UTF-8 length (the byte bound).
_RANGES: tuple[tuple[int, float | None], ...] = (
    (0x0080, 1.5),    # Latin-1 Supplement, Latin Extended-A/B, IPA, spacing modifiers
    (0x0300, None),   # combining marks
    (0x0370, 1.25),   # Greek and Coptic, Cyrillic, Cyrillic Supplement
    (0x0530, None),   # Armenian
    (0x0590, 1.5),    # Hebrew, Arabic
    (0x0700, None),   # Syriac ... Ethiopic ... General Punctuation ...
    (0x2E80, 2.5),    # CJK radicals, CJK symbols and punctuation, kana, bopomofo
    (0x3130, None),   # Hangul compatibility jamo
    (0x3190, 2.5),    # kanbun, CJK strokes, kana extensions, enclosed CJK, CJK compatibility
    (0x4DC0, None),   # Yijing hexagram symbols
    (0x4E00, 2.5),    # CJK unified ideographs
    (0xA000, None),   # Yi ... Hangul syllables ... surrogates, private use
    (0xF900, 2.5),    # CJK compatibility ideographs
    (0xFB00, None),
    (0xFE30, 2.5),    # CJK compatibility forms
    (0xFE50, None),
    (0xFF00, 2.5),    # half-width and full-width forms
    (0xFFF0, None),   # specials; every plane above the BMP (emoji, rare ideographs)
)
_STARTS = [start for start, _ in _RANGES]


def char_cost(ch: str) -> float:
    """Estimated tokens for one character (see the module docstring)."""
    code = ord(ch)
    if code < 128:
        return _ASCII_COST[code]
    cost = _RANGES[bisect.bisect_right(_STARTS, code) - 1][1]
    return float(len(ch.encode("utf-8", "surrogatepass"))) if cost is None else cost


_SPACE_BEFORE_DIGIT = re.compile(r" (?=[0-9])")


def estimate_tokens(text: str) -> int:
    """Tokens ``text`` may cost a real tokenizer, rounded up; meant never to fall short of it."""
    if not text:
        return 0
    if text.isascii():
        cost = sum(_ASCII_COST[ord(c)] for c in text)
    else:
        cost = sum(char_cost(c) for c in text)
    # A space before a digit is a token of its own (digits never merge with it).
    cost += 0.5 * len(_SPACE_BEFORE_DIGIT.findall(text))
    return math.ceil(cost)


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Estimated prompt tokens of a chat request: every message's content plus the template's
    ``MESSAGE_OVERHEAD`` per message."""
    return sum(estimate_tokens(str(m.get("content", "") or "")) for m in messages) \
        + MESSAGE_OVERHEAD * len(messages)


def fewest_tokens(text: str) -> int:
    """Tokens ``text`` costs at the least (see the module docstring), rounded down."""
    cost = 0.0
    for ch in text or "":
        code = ord(ch)
        cost += 1 / 6 if code < 128 else 0.5 if char_cost(ch) == 2.5 else 0.25
    return int(cost)


def fewest_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """The least a chat request's messages cost (no template overhead counted)."""
    return sum(fewest_tokens(str(m.get("content", "") or "")) for m in messages)


__all__ = ["MESSAGE_OVERHEAD", "char_cost", "estimate_tokens", "estimate_prompt_tokens", "fewest_tokens",
           "fewest_prompt_tokens"]
