"""Reading the model's reply: one JSON object, and only one, or no merge.

A reply is usable when either

* the whole reply (whitespace stripped) is one JSON object, or
* the reply holds exactly one fenced code block (a line of three backticks with an optional
  language name such as ``json``, up to a line of three backticks) whose content is one JSON
  object, and the text around that block holds no JSON object of its own.

Anything else is refused with a reason: two objects, an object followed or preceded by other text,
two code blocks, a JSON value that is not an object. Taking "the first object found anywhere"
would take whatever came first: an example the model quoted before its answer, the first of two
candidate merges, a draft it then corrected. Which object is the merge must not be a guess; a
refused reply is regenerated with the reason (``merge.regenerations``).

Prose around a single code block is allowed: a chat model asked for JSON without a server-side
JSON mode (the bottom of the client's json-mode ladder) often writes "Here is the merged example:"
before a fenced block, and the fence marks beyond doubt where the object starts and ends, so
refusing that shape would pay for a regeneration to learn nothing new. Prose that itself holds an
object makes the reply ambiguous again and is refused.

Fences are recognised only on lines of their own. A JSON string cannot hold a raw line break, so
a merged output that contains Markdown code blocks (escaped as ``\\n```python\\n...`` inside the
string) is never mistaken for a fence, and a reply that is one object is accepted before fences
are looked for at all.
"""
from __future__ import annotations

import json
import re
from typing import Any

from .prompt import FIELDS

NOT_AN_OBJECT = "reply is not a JSON object"

# A fence line: optional indentation, three or more backticks, an optional info string (one word).
_FENCE_LINE = re.compile(r"^[ \t]*(`{3,})[ \t]*([\w+.-]*)[ \t]*$", re.M)
_DECODER = json.JSONDecoder()


def _one_object(text: str, where: str = "reply") -> tuple[dict[str, Any] | None, str]:
    """``(object, "")`` when ``text`` (stripped) is exactly one JSON object, else ``(None, why)``."""
    text = text.strip()
    if not text:
        return None, f"{where} is empty"
    try:
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        if text.startswith("{"):
            return None, f"{where} is not valid JSON ({exc.msg} at character {exc.pos})"
        return None, NOT_AN_OBJECT if where == "reply" else f"{where} is not a JSON object"
    rest = text[end:].strip()
    if not isinstance(value, dict):
        return None, NOT_AN_OBJECT if where == "reply" else f"{where} is not a JSON object"
    if rest:
        if _holds_object(rest):
            return None, f"{where} holds more than one JSON object"
        return None, f"{where} has text after its JSON object"
    return value, ""


def _holds_object(text: str) -> bool:
    """Whether a JSON object can be decoded starting at some ``{`` of ``text``."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            pass
        else:
            if isinstance(value, dict):
                return True
        start = text.find("{", start + 1)
    return False


def _fenced_blocks(text: str) -> tuple[list[tuple[int, int, int, int]], bool]:
    """Fenced code blocks of ``text`` as ``(block start, content start, content end, block end)``
    offsets, and whether a fence was left open."""
    blocks: list[tuple[int, int, int, int]] = []
    opening: re.Match | None = None
    for line in _FENCE_LINE.finditer(text):
        if opening is None:
            opening = line
        elif not line.group(2) and len(line.group(1)) >= len(opening.group(1)):
            blocks.append((opening.start(), opening.end(), line.start(), line.end()))
            opening = None
    return blocks, opening is not None


def parse_reply(text: str | None) -> tuple[dict[str, Any] | None, str]:
    """The JSON object a reply consists of: ``(object, "")``, or ``(None, why)`` when the reply is
    not exactly one object, bare or in a single fenced code block (see the module docstring)."""
    text = (text or "").strip()
    if not text:
        return None, "reply is empty"
    if text[0] in "{[":
        return _one_object(text)
    blocks, unclosed = _fenced_blocks(text)
    if not blocks:
        if unclosed:
            return None, "reply has a code fence that is never closed"
        if _holds_object(text):
            return None, "reply has text before its JSON object"
        return None, NOT_AN_OBJECT
    if len(blocks) > 1:
        return None, f"reply holds {len(blocks)} code blocks, not one"
    start, inner_start, inner_end, end = blocks[0]
    obj, why = _one_object(text[inner_start:inner_end], "the code block")
    if obj is None:
        return None, why
    if unclosed:
        return None, "reply has a code fence that is never closed"
    if _holds_object(text[:start]) or _holds_object(text[end:]):
        return None, "reply holds a JSON object outside its code block"
    return obj, ""


def extract_json_object(text: str | None) -> dict[str, Any] | None:
    """The object ``parse_reply`` reads from ``text``, or None."""
    return parse_reply(text)[0]


def validate_merged(content: str | None, max_chars: int) -> tuple[dict[str, str] | None, str]:
    """``(merged example, "")`` when the reply is usable, else ``(None, why)``: the reply is one
    JSON object (``parse_reply``) with string ``instruction``, ``input`` (may be missing: "") and
    ``output``, each at most ``max_chars`` long, instruction and output not empty once stripped."""
    obj, why = parse_reply(content)
    if obj is None:
        return None, why
    merged: dict[str, str] = {}
    for name in FIELDS:
        value = obj.get(name, "" if name == "input" else None)
        if value is None:
            return None, f"missing {name!r}"
        if not isinstance(value, str):
            return None, f"{name!r} is not a string"
        if len(value) > max_chars:
            return None, f"{name!r} longer than {max_chars} characters"
        merged[name] = value.strip()
    for name in ("instruction", "output"):
        if not merged[name]:
            return None, f"{name!r} is empty"
    return merged, ""


__all__ = ["NOT_AN_OBJECT", "extract_json_object", "parse_reply", "validate_merged"]
