"""Parsing, in the Python workers: one JSON value in, its outcomes out (records or rejects).

Every input format ends here: a JSON Lines line or a Parquet/Delta row as JSON text goes through
:func:`parse_text`, a JSON array file element by element through :func:`parse_json_file` (framed
by :mod:`mergeit_spark.jsonstream`); both hand each value to :func:`interpret_object`, so the
layouts, normalisation and reason codes below are the same whatever the file. Each framed unit
gives at least one outcome: one, or one per instance of a seed task (each outcome of a seed task
carries ``instances``, the length of its list, so the ledger can count them; see
:mod:`mergeit_spark.stages.ingest`).

No unit can stop a run: a value nested past ``ingest.max_depth`` is rejected (``too_deep``) from
its brackets before ``json`` or any code that walks the value sees it, and any exception while
turning one unit into outcomes (or one seed-task instance into a row, or an outcome into Arrow)
makes that unit, instance or row an ``unparseable`` reject naming the exception. Either way the
unit still gives exactly its outcomes, so the ledger balances.

Layouts (checked in this order, per object)
-------------------------------------------
* ShareGPT ``conversations: [{from, value}]`` and OpenAI ``messages: [{role, content}]``:
  instruction = the first user turn, input = "", output = the first assistant turn after it.
  Roles human/user, gpt/assistant/chatgpt/bard/bing/model and system are recognised. The system
  prompt, every other turn (with its index and role) and the object's other keys go to ``extra``.
* Seed task: ``instruction`` + ``instances``; one outcome per instance; the task's other keys (id,
  name, is_classification, ...) and the instance index go to ``extra``. An empty ``instances``
  list is one reject.
* Alpaca: ``instruction``, ``input`` (optional), ``output``; any other key goes to ``extra``.

Normalisation: strip surrounding whitespace and turn ``\\r\\n`` and ``\\r`` into ``\\n``. A null
(or NaN, pandas' null) ``input`` is "". The fields are never coerced: a number, boolean, list or
object where text is expected is ``non_string_field`` (``42`` as an output is more likely a
broken export than an answer). ``extra`` is a JSON object string (non-finite floats become null),
or null when there is nothing beyond the three fields. ``id`` is
:func:`mergeit_spark.ids.content_id` of the normalised text.

Reason codes
------------
===================== =========================================================================
code                  meaning
===================== =========================================================================
malformed_json        not valid JSON (a line, an array element, a damaged stretch of an array
                      file, a number too long to parse, an empty text)
too_deep              arrays/objects nested more than ``ingest.max_depth`` deep (the outermost
                      counts one), found before parsing; or deeper than Python's ``json`` can go
invalid_utf8          the raw bytes are not UTF-8, or a JSON string escapes a lone surrogate
                      (``"\\ud800"``), which has no UTF-8 form
not_an_object         the JSON value is an array, string, number, boolean or null; also a seed
                      task instance that is not an object
unknown_layout        an object with none of the keys of a known layout, or a seed task whose
                      ``instances`` is not a list
bad_conversation      ``conversations``/``messages`` is not a list of turns with a role
missing_instruction   no instruction (absent or null); in a conversation, no user turn
missing_output        no output (absent or null); in a conversation, no assistant reply after
                      the first user turn; a seed task with no instances
non_string_field      instruction, input or output (or the turn used for one) is not a string
empty_text            instruction or output is empty or whitespace after normalisation
too_large             the raw line/element/row is over ``ingest.max_line_bytes`` bytes, or
                      instruction + input + output are over ``ingest.max_record_chars`` chars
exact_duplicate       same normalised instruction, input and output as a kept record;
                      ``detail`` is the kept record's id (decided in the ingest stage)
unparseable           turning the unit into a record raised an unexpected error; ``detail``
                      names the exception and its message
===================== =========================================================================

``raw`` in a reject is the offending text (invalid UTF-8 shown with U+FFFD), cut to
``raw_chars`` characters.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

import pyarrow as pa

from .config import IngestSettings
from .fs import Storage, default_storage, resolve
from .ids import content_id
from .jsonstream import RECURSION_DETAIL, Element, JsonFramer, nests_deeper_than, too_deep_detail

REASONS = ("malformed_json", "too_deep", "invalid_utf8", "not_an_object", "unknown_layout", "bad_conversation",
           "missing_instruction", "missing_output", "non_string_field", "empty_text", "too_large",
           "exact_duplicate", "unparseable")
DEFAULT_RAW_CHARS = IngestSettings().reject_raw_chars
DEFAULT_MAX_DEPTH = IngestSettings().max_depth

# What the parser returns: a record (reason null) or a reject, with its position for ordering.
OUTCOME_ARROW = pa.schema([
    pa.field("file_index", pa.int32(), False), pa.field("source", pa.string(), False),
    pa.field("line", pa.int64()), pa.field("row", pa.int64()), pa.field("sub", pa.int32(), False),
    pa.field("instances", pa.int32()),
    pa.field("id", pa.string()), pa.field("instruction", pa.string()), pa.field("input", pa.string()),
    pa.field("output", pa.string()), pa.field("extra", pa.string()), pa.field("raw", pa.string()),
    pa.field("reason", pa.string()), pa.field("detail", pa.string()),
])
# A worker flushes its outcomes at this many rows or characters, whichever comes first: its
# memory stays flat however big the file it walks.
_BATCH_ROWS = 2048
_BATCH_CHARS = 8_000_000
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class ParseLimits:
    max_record_chars: int
    max_line_bytes: int
    id_length: int
    raw_chars: int = DEFAULT_RAW_CHARS
    max_depth: int = DEFAULT_MAX_DEPTH
    storage: Storage | None = None  # how executors reach an input on an object store

    @classmethod
    def from_settings(cls, settings: IngestSettings, raw_chars: int = DEFAULT_RAW_CHARS,
                      storage: Storage | None = None) -> "ParseLimits":
        return cls(settings.max_record_chars, settings.max_line_bytes, settings.id_length, raw_chars,
                   settings.max_depth, storage or default_storage())


@dataclass(frozen=True)
class Position:
    file_index: int
    source: str
    line: int | None
    row: int | None


class _Reject(Exception):
    """Raised inside the parser to turn the current unit into a reject."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}
_ALPACA_FIELDS = ("instruction", "input", "output")


def parse_text(raw: bytes | None, size: int | None, pos: Position, limits: ParseLimits) -> list[dict]:
    """Outcomes of one JSON text (a JSON Lines line, a Parquet row as JSON). A blank text is a
    ``malformed_json`` reject: the readers frame units, so every unit gives an outcome; an
    exception on the way is an ``unparseable`` reject of the unit."""
    try:
        return _text_outcomes(raw, size, pos, limits)
    except Exception as exc:  # noqa: BLE001 - one unit's failure must not stop the run
        return [_failure_reject(pos, raw or b"", exc, limits)]


def _text_outcomes(raw: bytes | None, size: int | None, pos: Position, limits: ParseLimits) -> list[dict]:
    """:func:`parse_text` unguarded: size, bytes, depth, JSON, layout, in that order."""
    raw = raw or b""
    size = len(raw) if size is None else size
    if size > limits.max_line_bytes:
        return [_reject(pos, raw, "too_large", f"{size} bytes > ingest.max_line_bytes={limits.max_line_bytes}",
                        limits)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [_reject(pos, raw, "invalid_utf8", f"byte {exc.start}: {exc.reason}", limits)]
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip(" \t\r\n"):  # JSON's own whitespace only; "\x1f" is not blank
        return [_reject(pos, raw, "malformed_json", "empty text", limits)]
    if nests_deeper_than(text, limits.max_depth):
        return [_reject(pos, text, "too_deep", too_deep_detail(limits.max_depth), limits)]
    try:
        value = json.loads(text)
    except RecursionError:
        return [_reject(pos, text, "too_deep", RECURSION_DETAIL, limits)]
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        return [_reject(pos, text, "malformed_json", str(exc), limits)]
    return interpret_object(value, text, pos, limits)


def parse_json_file(handle: BinaryIO, file_index: int, source: str, limits: ParseLimits) -> Iterator[dict]:
    """Outcomes of a JSON array file (or a stream of concatenated JSON values), element by element,
    reading ``handle`` a chunk at a time (see :mod:`mergeit_spark.jsonstream` for the framing)."""
    framer = JsonFramer(handle, limits.max_line_bytes, limits.raw_chars, max_depth=limits.max_depth)
    for element in framer.elements():
        yield from element_outcomes(element, Position(file_index, source, None, element.row), limits)


def parse_document(content: bytes | None, file_index: int, source: str, limits: ParseLimits) -> list[dict]:
    """:func:`parse_json_file` on bytes in memory (small documents, tests)."""
    return list(parse_json_file(io.BytesIO(content or b""), file_index, source, limits))


def element_outcomes(element: Element, pos: Position, limits: ParseLimits) -> list[dict]:
    """Outcomes of one framed unit of a JSON file: the same checks, in the same order, as
    :func:`parse_text` (size, bytes, depth, JSON, layout), and the same ``unparseable`` reject
    for an exception on the way."""
    try:
        return _element_outcomes(element, pos, limits)
    except Exception as exc:  # noqa: BLE001 - one unit's failure must not stop the run
        return [_failure_reject(pos, element.text, exc, limits)]


def _element_outcomes(element: Element, pos: Position, limits: ParseLimits) -> list[dict]:
    if element.size > limits.max_line_bytes:
        return [_reject(pos, element.text, "too_large",
                        f"{element.size} bytes > ingest.max_line_bytes={limits.max_line_bytes}", limits)]
    bad = _first_escaped_byte(element.text)
    if bad is not None:
        return [_reject(pos, element.text, "invalid_utf8", f"byte 0x{bad:02x} is not UTF-8", limits)]
    if element.too_deep:  # the framer says how (past max_depth, or past json's recursion)
        return [_reject(pos, element.text, "too_deep", element.problem or too_deep_detail(limits.max_depth), limits)]
    if not element.parsed:
        return [_reject(pos, element.text, "malformed_json", element.problem or "not JSON", limits)]
    return interpret_object(element.value, element.text, pos, limits)


def _first_escaped_byte(text: str) -> int | None:
    """The first undecodable byte kept by ``surrogateescape`` (U+DC80..U+DCFF), if any."""
    if text.isascii():
        return None
    found = _ESCAPED_BYTE.search(text)
    return None if found is None else ord(found.group()) - 0xDC00


def interpret_object(value: Any, raw_text: str, pos: Position, limits: ParseLimits) -> list[dict]:
    """Map one parsed JSON value to its outcomes: records, or rejects with a reason code."""
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        kind = {"list": "array", "dict": "object", "str": "string", "int": "number",
                "float": "number", "bool": "boolean"}.get(kind, kind)
        return [_reject(pos, raw_text, "not_an_object", f"JSON {kind}, expected an object", limits)]
    try:
        if "conversations" in value or "messages" in value:
            return [_conversation_record(value, raw_text, pos, limits)]
        if "instances" in value:
            return _seed_task_records(value, raw_text, pos, limits)
        if any(key in value for key in _ALPACA_FIELDS):
            extra = {k: v for k, v in value.items() if k not in _ALPACA_FIELDS}
            return [_record(value.get("instruction"), value.get("input"), value.get("output"), extra,
                            raw_text, pos, 0, limits)]
        keys = ", ".join(sorted(value)[:8]) or "none"
        raise _Reject("unknown_layout", f"no instruction/output, conversations, messages or instances "
                                        f"(keys: {keys})")
    except _Reject as rej:
        return [_reject(pos, raw_text, rej.reason, rej.detail, limits)]


def _seed_task_records(task: dict, raw_text: str, pos: Position, limits: ParseLimits) -> list[dict]:
    instances = task["instances"]
    if not isinstance(instances, list):
        raise _Reject("unknown_layout", f"instances is a {type(instances).__name__}, expected a list")
    if not instances:
        raise _Reject("missing_output", "seed task has no instances")
    shared = {k: v for k, v in task.items() if k not in ("instruction", "instances")}
    outcomes = []
    for i, instance in enumerate(instances):
        try:
            if not isinstance(instance, dict):
                raise _Reject("not_an_object", f"instance {i} is not an object")
            extra = dict(shared)
            extra.update({k: v for k, v in instance.items() if k not in ("input", "output")})
            extra["instance"] = i
            outcomes.append(_record(task.get("instruction"), instance.get("input"), instance.get("output"),
                                    extra, raw_text, pos, i, limits))
        except _Reject as rej:
            outcomes.append(_reject(pos, raw_text, rej.reason, f"instance {i}: {rej.detail}", limits, sub=i))
        except Exception as exc:  # noqa: BLE001 - one instance's failure costs that instance only
            outcomes.append(_failure_reject(pos, raw_text, exc, limits, sub=i, prefix=f"instance {i}: "))
    for outcome in outcomes:  # the list's length, not the rows made: a lost instance shows
        outcome["instances"] = len(instances)
    return outcomes


def _conversation_record(obj: dict, raw_text: str, pos: Position, limits: ParseLimits) -> dict:
    layout = "sharegpt" if "conversations" in obj else "messages"
    turns = obj[layout if layout == "messages" else "conversations"]
    if not isinstance(turns, list):
        raise _Reject("bad_conversation", f"{layout}: expected a list of turns, got {type(turns).__name__}")
    parsed: list[tuple[str, Any]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Reject("bad_conversation", f"turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        if not isinstance(role, str):
            raise _Reject("bad_conversation", f"turn {i} has no role (from/role)")
        role = role.strip().lower()
        role = "user" if role in _USER_ROLES else "assistant" if role in _ASSISTANT_ROLES else role
        parsed.append((role, turn.get("value", turn.get("content"))))
    user = next((i for i, (role, _) in enumerate(parsed) if role == "user"), None)
    if user is None:
        raise _Reject("missing_instruction", f"{layout}: no user turn")
    reply = next((i for i in range(user + 1, len(parsed)) if parsed[i][0] == "assistant"), None)
    if reply is None:
        raise _Reject("missing_output", f"{layout}: no assistant reply after the first user turn")
    system_turn = next((i for i, (role, _) in enumerate(parsed) if role == "system"), None)
    extra: dict[str, Any] = {k: v for k, v in obj.items() if k not in ("conversations", "messages")}
    extra["layout"] = layout
    if system_turn is not None:
        extra["system"] = parsed[system_turn][1]
    used = {user, reply, system_turn}
    rest = [{"index": i, "role": role, "content": content}
            for i, (role, content) in enumerate(parsed) if i not in used]
    if rest:
        extra["turns"] = rest
    return _record(_turn_text(parsed[user][1]), "", _turn_text(parsed[reply][1]), extra,
                   raw_text, pos, 0, limits)


def _turn_text(content: Any) -> Any:
    """OpenAI content may be a list of parts; only all-text parts count as text."""
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return content


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def normalise_text(text: str) -> str:
    """Strip surrounding whitespace and unify newlines (CRLF and CR become LF)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _record(instruction: Any, input_: Any, output: Any, extra: dict, raw_text: str, pos: Position,
            sub: int, limits: ParseLimits) -> dict:
    if _is_null(instruction):
        raise _Reject("missing_instruction", "instruction is absent or null")
    if not isinstance(instruction, str):
        raise _Reject("non_string_field", f"instruction is a {_json_type(instruction)}, not a string")
    if _is_null(input_):
        input_ = ""
    if not isinstance(input_, str):
        raise _Reject("non_string_field", f"input is a {_json_type(input_)}, not a string")
    if _is_null(output):
        raise _Reject("missing_output", "output is absent or null")
    if not isinstance(output, str):
        raise _Reject("non_string_field", f"output is a {_json_type(output)}, not a string")
    instruction, input_, output = normalise_text(instruction), normalise_text(input_), normalise_text(output)
    if not instruction:
        raise _Reject("empty_text", "instruction is empty")
    if not output:
        raise _Reject("empty_text", "output is empty")
    chars = len(instruction) + len(input_) + len(output)
    if chars > limits.max_record_chars:
        raise _Reject("too_large", f"{chars} chars > ingest.max_record_chars={limits.max_record_chars}")
    for name, text in (("instruction", instruction), ("input", input_), ("output", output)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _Reject("invalid_utf8", f"{name}: lone surrogate at char {exc.start}, no UTF-8 form") from None
    return {
        "file_index": pos.file_index, "source": pos.source, "line": pos.line, "row": pos.row, "sub": sub,
        "instances": None, "id": content_id(instruction, input_, output, limits.id_length),
        "instruction": instruction, "input": input_, "output": output,
        "extra": _extra_json(extra), "raw": _clip(raw_text, limits.raw_chars),
        "reason": None, "detail": None,
    }


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {"list": "array", "dict": "object"}.get(type(value).__name__, type(value).__name__)


def _extra_json(extra: dict) -> str | None:
    if not extra:
        return None
    clean = _finite(extra)
    text = json.dumps(clean, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: keep it as a JSON escape
        text = json.dumps(clean, ensure_ascii=True)
    return text


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _clip(text: str | bytes, limit: int) -> str:
    """Printable, UTF-8-safe prefix of the offending text for the rejects table."""
    if isinstance(text, bytes):
        return text[: limit * 4].decode("utf-8", "replace")[:limit]
    text = text[:limit]
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # bytes kept by surrogateescape: show them as U+FFFD
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return text.encode("utf-8", "replace").decode("utf-8")


def _reject(pos: Position, raw: str | bytes, reason: str, detail: str, limits: ParseLimits,
            sub: int = 0) -> dict:
    return {
        "file_index": pos.file_index, "source": pos.source, "line": pos.line, "row": pos.row, "sub": sub,
        "instances": None, "id": None, "instruction": None, "input": None, "output": None, "extra": None,
        "raw": _clip(raw, limits.raw_chars), "reason": reason, "detail": _clip(detail, limits.raw_chars),
    }


_FAILURE_MESSAGE_CHARS = 300


def describe_exception(exc: BaseException) -> str:
    """``Type: message``, the message clipped: what an ``unparseable`` reject's detail says."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a message that cannot be rendered is not worth a crash
        message = "(message unavailable)"
    if len(message) > _FAILURE_MESSAGE_CHARS:
        message = message[:_FAILURE_MESSAGE_CHARS] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _failure_reject(pos: Position, raw: str | bytes, exc: Exception, limits: ParseLimits, sub: int = 0,
                    prefix: str = "") -> dict:
    """The ``unparseable`` reject of a unit (or instance) whose parsing raised ``exc``."""
    return _reject(pos, raw, "unparseable", prefix + describe_exception(exc), limits, sub=sub)


def _storable(outcome: dict, raw_chars: int) -> dict:
    """``outcome`` if Arrow takes it, else an ``unparseable`` reject in its place (same unit,
    instance and count, so the ledger is unchanged): a row Arrow cannot hold must not fail the
    batch of rows around it."""
    try:
        pa.RecordBatch.from_pylist([outcome], schema=OUTCOME_ARROW)
        return outcome
    except Exception as exc:  # noqa: BLE001 - whatever Arrow refuses becomes this row's reject
        replacement = {key: outcome.get(key) for key in ("file_index", "source", "line", "row", "sub", "instances")}
        replacement.update(id=None, instruction=None, input=None, output=None, extra=None,
                           raw=_clip(str(outcome.get("raw") or ""), raw_chars), reason="unparseable",
                           detail=_clip("cannot be stored: " + describe_exception(exc), raw_chars))
        return replacement


class _Batcher:
    """Outcomes gathered into Arrow batches of bounded rows and characters."""

    def __init__(self, raw_chars: int = DEFAULT_RAW_CHARS) -> None:
        self.pending: list[dict] = []
        self.chars = 0
        self.raw_chars = raw_chars

    def add(self, outcomes: list[dict]) -> pa.RecordBatch | None:
        """Take outcomes; return a full batch when one is ready."""
        self.pending.extend(outcomes)
        for o in outcomes:
            self.chars += sum(len(o[k] or "") for k in ("instruction", "input", "output", "extra", "raw"))
        if len(self.pending) >= _BATCH_ROWS or self.chars >= _BATCH_CHARS:
            return self.flush()
        return None

    def flush(self) -> pa.RecordBatch | None:
        if not self.pending:
            return None
        try:
            batch = pa.RecordBatch.from_pylist(self.pending, schema=OUTCOME_ARROW)
        except Exception:  # noqa: BLE001 - find the rows Arrow refuses; the others go through
            rows = [_storable(outcome, self.raw_chars) for outcome in self.pending]
            batch = pa.RecordBatch.from_pylist(rows, schema=OUTCOME_ARROW)
        self.pending, self.chars = [], 0
        return batch


def parse_text_batches(batches: Iterator[pa.RecordBatch], limits: ParseLimits) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: text units (JSON Lines lines, table rows as JSON) in, outcomes out."""
    batcher = _Batcher(limits.raw_chars)
    for batch in batches:
        columns = batch.to_pydict()
        for file_index, source, line, row, raw, size in zip(
                columns["file_index"], columns["source"], columns["line"], columns["row"],
                columns["raw"], columns["size"]):
            full = batcher.add(parse_text(raw, size, Position(file_index, source, line, row), limits))
            if full is not None:
                yield full
    last = batcher.flush()
    if last is not None:
        yield last


def parse_json_file_batches(batches: Iterator[pa.RecordBatch], limits: ParseLimits) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: (file_index, source) of JSON files in, their outcomes out, streamed."""
    batcher = _Batcher(limits.raw_chars)
    for batch in batches:
        columns = batch.to_pydict()
        for file_index, source in zip(columns["file_index"], columns["source"]):
            with resolve(source, limits.storage).open_input() as handle:
                for outcome in parse_json_file(handle, file_index, source, limits):
                    full = batcher.add([outcome])
                    if full is not None:
                        yield full
    last = batcher.flush()
    if last is not None:
        yield last
