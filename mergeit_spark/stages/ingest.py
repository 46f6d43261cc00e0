"""Ingest: read instruction data from files into the ``records`` and ``rejects`` tables.

Inputs are JSON arrays, JSON Lines, Parquet files and Delta tables (see :func:`resolve_inputs`).
Every object goes through one validation path (:func:`interpret_object`), whatever file it came
from, and ends up in exactly one place: a record, or a reject with a reason code. The ledger
always balances: input rows = ``records`` + ``rejects``.

What counts as one input row
----------------------------
* JSON Lines: one non-blank line (1-based ``line``). Blank or whitespace-only lines separate rows,
  they are not rows themselves (a trailing newline is not a lost record). Lines end at ``\n``,
  ``\r\n`` or a lone ``\r`` (Hadoop's line reader); ``.jsonl.gz`` is read transparently.
* JSON array: one element (0-based ``row``). A file that is not valid JSON as a whole is
  salvaged: the elements that parse before the damage are kept, and the unparseable remainder
  becomes one ``malformed_json`` reject whose ``row`` is the index the next element would have had.
  A ``json`` file that is not an array is read as a stream of concatenated JSON values.
* Parquet / Delta: one table row (0-based ``row``; for Delta, counted over the table's data files
  sorted by path). Each row is serialised with Spark's ``to_json`` and parsed like a JSON line, so
  there is one validation path. Null (and floating NaN) values become JSON null; Delta partition
  values are added back as columns.
* Alpaca seed tasks (``instances: [{input, output}, ...]``): one row per instance, so one line
  can yield several records (each instance is its own unit of the ledger). An empty ``instances``
  list is one reject.

Layouts (checked in this order, per object)
-------------------------------------------
* ShareGPT ``conversations: [{from, value}]`` and OpenAI ``messages: [{role, content}]``:
  instruction = the first user turn, input = "", output = the first assistant turn after it.
  Roles human/user, gpt/assistant/chatgpt/bard/bing/model and system are recognised. The system
  prompt, every other turn (with its index and role) and the object's other keys go to ``extra``.
* Seed task: ``instruction`` + ``instances``; the task's other keys (id, name,
  is_classification, ...) and the instance index go to ``extra``.
* Alpaca: ``instruction``, ``input`` (optional), ``output``; any other key goes to ``extra``.

Normalisation: strip surrounding whitespace and turn ``\\r\\n`` and ``\\r`` into ``\\n``. A null
(or NaN, pandas' null) ``input`` is "". The fields are never coerced: a number, boolean, list or
object where text is expected is ``non_string_field`` (``42`` as an output is more likely a
broken export than an answer). ``extra`` is a JSON object string (non-finite floats become null),
or null when there is nothing beyond the three fields.

``id`` is :func:`mergeit_spark.ids.content_id` of the normalised text. Records with the same id are
exact duplicates: the first by (input file position, line/row, instance) is kept, the others are
rejected as ``exact_duplicate`` with ``detail`` = the kept id.

Reason codes
------------
===================== =========================================================================
code                  meaning
===================== =========================================================================
malformed_json        not valid JSON (a line, an array element, an array's unparseable
                      remainder, nesting too deep, a number too long to parse)
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
                      ``detail`` is the kept record's id
===================== =========================================================================

``raw`` in a reject is the offending text (invalid UTF-8 shown with U+FFFD), cut to
``raw_chars`` characters.

Engine: no row reaches the driver. JSON Lines are read with ``spark.read.text``; exact line numbers
come from a per-block row count (the same idea as ``RDD.zipWithIndex``, but on the JVM: count rows
per file block, prefix-sum the counts, and add each row's offset inside its block). Lines travel to
Python as bytes (``cast("binary")``) so a strict UTF-8 decode in the worker catches bad bytes; a
line over the size limit is cut on the JVM side before it is shipped. JSON arrays are read whole with
``binaryFile``, one file per task (inherent to the format). Parquet and Delta rows become JSON text
with ``to_json(struct(*))``. All of them meet in one ``mapInArrow``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import unquote, urlparse

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (BinaryType, DoubleType, FloatType, IntegerType, LongType, StringType,
                               StructField, StructType)

from ..config import IngestSettings, Settings
from ..ids import content_id
from . import Stage, StageContext

SAMPLE_PATH = str(Path(__file__).resolve().parents[1] / "data" / "sample.jsonl")
"""The bundled demo sample, used when ``input.paths`` is empty."""

FORMATS = ("json", "jsonl", "parquet", "delta")
REASONS = ("malformed_json", "invalid_utf8", "not_an_object", "unknown_layout", "bad_conversation",
           "missing_instruction", "missing_output", "non_string_field", "empty_text", "too_large",
           "exact_duplicate")
DEFAULT_RAW_CHARS = IngestSettings().reject_raw_chars

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
_UNSUPPORTED_DELTA_READER_FEATURES = {"columnMapping"}

RECORD_SCHEMA = StructType([
    StructField("id", StringType(), False),
    StructField("instruction", StringType(), False),
    StructField("input", StringType(), False),
    StructField("output", StringType(), False),
    StructField("source", StringType(), False),
    StructField("extra", StringType(), True),
])
REJECT_SCHEMA = StructType([
    StructField("source", StringType(), True),
    StructField("line", LongType(), True),
    StructField("row", LongType(), True),
    StructField("raw", StringType(), True),
    StructField("reason", StringType(), False),
    StructField("detail", StringType(), True),
])

# What the readers hand to the parser: one JSON text (a line, a Parquet row) or one whole document.
_UNIT_SCHEMA = StructType([
    StructField("file_index", IntegerType(), False),
    StructField("source", StringType(), False),
    StructField("line", LongType(), True),
    StructField("row", LongType(), True),
    StructField("kind", StringType(), False),      # "text" | "document"
    StructField("raw", BinaryType(), True),        # cut to a prefix when size > max_line_bytes
    StructField("size", LongType(), True),         # bytes before any cut
])
# What the parser returns: a record (reason null) or a reject, with its position for ordering.
_OUTCOME_SCHEMA = StructType([
    StructField("file_index", IntegerType(), False),
    StructField("source", StringType(), False),
    StructField("line", LongType(), True),
    StructField("row", LongType(), True),
    StructField("sub", IntegerType(), False),      # instance index inside a seed task, else 0
    StructField("id", StringType(), True),
    StructField("instruction", StringType(), True),
    StructField("input", StringType(), True),
    StructField("output", StringType(), True),
    StructField("extra", StringType(), True),
    StructField("raw", StringType(), True),
    StructField("reason", StringType(), True),
    StructField("detail", StringType(), True),
])
_OUTCOME_ARROW = pa.schema([
    pa.field("file_index", pa.int32(), False), pa.field("source", pa.string(), False),
    pa.field("line", pa.int64()), pa.field("row", pa.int64()), pa.field("sub", pa.int32(), False),
    pa.field("id", pa.string()), pa.field("instruction", pa.string()), pa.field("input", pa.string()),
    pa.field("output", pa.string()), pa.field("extra", pa.string()), pa.field("raw", pa.string()),
    pa.field("reason", pa.string()), pa.field("detail", pa.string()),
])
_OUTCOMES_PER_BATCH = 2048  # bounds a worker's memory while it walks one big JSON array


class InputError(ValueError):
    """An input path is missing, unreadable or of a format this stage cannot read."""


@dataclass(frozen=True)
class InputFile:
    """One input: a file (json, jsonl, parquet) or a Delta table directory (delta)."""
    path: str     # absolute
    format: str   # one of FORMATS


# --------------------------------------------------------------------------------------------
# Resolving paths (driver, before any Spark work)
# --------------------------------------------------------------------------------------------

def resolve_inputs(paths: list[str], fmt: str) -> list[InputFile]:
    """Turn user paths into typed inputs; raise :class:`InputError` for anything unreadable.

    Directories expand to their data files, sorted, skipping hidden and ``_``-prefixed entries as
    Spark does (``_SUCCESS``, ``.crc``); a directory holding ``_delta_log`` is one Delta input.
    With ``fmt="auto"`` a file's format comes from its extension (``.json`` is sniffed: ``[``
    means an array, ``{`` JSON Lines); a file of unknown type in a directory is an error, not
    something skipped in silence. An explicit ``fmt`` applies to every file found. A path given
    twice is read once. Paths are made absolute (not resolved through symlinks): that string is
    the ``source`` of every row read from it.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; expected auto, {', '.join(FORMATS)}")
    resolved: list[InputFile] = []
    seen: set[str] = set()
    for given in paths:
        for item in _resolve_one(str(given), fmt):
            if item.path not in seen:
                seen.add(item.path)
                resolved.append(item)
    return resolved


def _resolve_one(given: str, fmt: str) -> list[InputFile]:
    scheme = urlparse(given).scheme
    if scheme == "file":
        given = unquote(urlparse(given).path)
    elif len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise InputError(f"{given}: only local (or mounted) paths are supported, not {scheme}:// URIs")
    path = os.path.abspath(os.path.expanduser(given))
    if not os.path.exists(path):
        raise InputError(f"input not found: {given}")
    if not os.access(path, os.R_OK):
        raise InputError(f"input not readable: {given}")
    if os.path.isdir(path):
        return _resolve_directory(path, given, fmt)
    return [InputFile(path, _file_format(path, fmt))]


def _resolve_directory(path: str, given: str, fmt: str) -> list[InputFile]:
    if os.path.isdir(os.path.join(path, "_delta_log")):
        if fmt not in ("auto", "delta"):
            raise InputError(f"{given} is a Delta table; read it with format delta (or auto), not {fmt}")
        _check_delta(path)
        return [InputFile(path, "delta")]
    if fmt == "delta":
        raise InputError(f"{given} is not a Delta table (no _delta_log directory)")
    found: list[InputFile] = []
    unknown: list[str] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        if root != path and os.path.isdir(os.path.join(root, "_delta_log")):
            _check_delta(root)
            found.append(InputFile(root, "delta"))
            dirs[:] = []
            continue
        for name in sorted(files):
            if name.startswith((".", "_")):
                continue
            full = os.path.join(root, name)
            try:
                found.append(InputFile(full, _file_format(full, fmt)))
            except InputError:
                unknown.append(os.path.relpath(full, path))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InputError(f"{given}: files of unknown format: {shown} (move them out, or set input.format)")
    if not found:
        raise InputError(f"{given}: directory holds no data files")
    return found


def _file_format(path: str, fmt: str) -> str:
    if fmt == "delta":
        raise InputError(f"{path}: format delta wants a table directory, not a file")
    if fmt != "auto":
        return fmt
    lower = path.lower()
    if lower.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".json"):
        first = _first_significant_byte(path)
        if first in (b"", b"{"):  # an empty file has no rows whichever way it is read
            return "jsonl"
        if first == b"[":
            return "json"
        raise InputError(f"{path}: cannot tell the JSON layout: starts with {first!r}, expected '[' "
                         f"(array) or '{{' (JSON Lines); set input.format")
    raise InputError(f"{path}: unknown input format (expected .json, .jsonl, .ndjson, .parquet or a "
                     f"Delta table directory; or set input.format)")


def _first_significant_byte(path: str) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(65536)
        while head:
            stripped = head.lstrip(b" \t\r\n")
            if stripped.startswith(b"\xef\xbb\xbf"):
                stripped = stripped[3:]
            stripped = stripped.lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1]
            head = handle.read(65536)
    return b""


def _check_delta(path: str) -> None:
    from deltalake import DeltaTable
    try:
        table = DeltaTable(path)
    except Exception as exc:  # TableNotFoundError, a damaged log, ...
        raise InputError(f"{path}: cannot open Delta table: {exc}") from None
    features = set(table.protocol().reader_features or ())
    blocked = features & _UNSUPPORTED_DELTA_READER_FEATURES
    if blocked:
        raise InputError(f"{path}: Delta reader feature(s) {sorted(blocked)} cannot be read from the "
                         f"data files directly")
    if "deletionVectors" in features and pa.table(table.deletion_vectors().read_all()).num_rows:
        raise InputError(f"{path}: Delta table has deletion vectors; rewrite it (OPTIMIZE/PURGE) first")


def _delta_data_files(path: str) -> list[tuple[str, int | None, dict[str, Any]]]:
    """(absolute data file, row count if logged, partition values) for the table's live files."""
    from deltalake import DeltaTable
    actions = pa.table(DeltaTable(path).get_add_actions(flatten=True)).to_pylist()
    files = []
    for action in actions:
        rel = action["path"]
        parsed = urlparse(rel)
        if parsed.scheme == "file":
            full = unquote(parsed.path)
        elif parsed.scheme:
            raise InputError(f"{path}: data file {rel} is not local")
        else:
            full = os.path.join(path, unquote(rel))
        partition = {key[len("partition."):]: value for key, value in action.items()
                     if key.startswith("partition.")}
        files.append((full, action.get("num_records"), partition))
    return sorted(files, key=lambda item: item[0])


def fingerprint_inputs(files: Iterable[InputFile]) -> str:
    """Hash of each input's path, format, and every data file's size and mtime."""
    digest = hashlib.sha256()
    for item in files:
        digest.update(f"{item.format}\0{item.path}\n".encode())
        if not os.path.exists(item.path):
            raise InputError(f"input not found: {item.path}")
        targets = [item.path]
        if os.path.isdir(item.path):
            targets = sorted(os.path.join(root, name) for root, _, names in os.walk(item.path)
                             for name in names)
        for target in targets:
            stat = os.stat(target)
            rel = os.path.relpath(target, item.path)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Parsing (Python workers): one path for every input format
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParseLimits:
    max_record_chars: int
    max_line_bytes: int
    id_length: int
    raw_chars: int = DEFAULT_RAW_CHARS

    @classmethod
    def from_settings(cls, settings: IngestSettings, raw_chars: int = DEFAULT_RAW_CHARS) -> "ParseLimits":
        return cls(settings.max_record_chars, settings.max_line_bytes, settings.id_length, raw_chars)


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
_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def parse_text(raw: bytes | None, size: int | None, pos: Position, limits: ParseLimits,
               blank_is_row: bool = False) -> list[dict]:
    """Outcomes of one JSON text (a JSON Lines line, a Parquet row as JSON).

    Returns [] for a blank line unless ``blank_is_row`` (then it is ``malformed_json``).
    """
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
    if not text.strip(" \t\r\n"):  # JSON's own whitespace only; "\x1f" is not a blank line
        return [_reject(pos, raw, "malformed_json", "empty text", limits)] if blank_is_row else []
    try:
        value = json.loads(text)
    except RecursionError:
        return [_reject(pos, text, "malformed_json", "nested too deeply", limits)]
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        return [_reject(pos, text, "malformed_json", str(exc), limits)]
    return interpret_object(value, text, pos, limits)


def parse_document(content: bytes | None, file_index: int, source: str,
                   limits: ParseLimits) -> Iterator[dict]:
    """Outcomes of a JSON array file (or a stream of concatenated JSON values), element by element.

    Elements that parse are interpreted in order; at the first element that does not, the rest of
    the file becomes one ``malformed_json`` reject (its ``row`` is the index that element would
    have had). Bytes that are not UTF-8 only spoil the elements they sit in (``invalid_utf8``).
    """
    text = (content or b"").decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    end = len(text)
    at = _WHITESPACE.match(text, 0).end()
    if at == end:
        return
    in_array = text[at] == "["
    if in_array:
        at = _WHITESPACE.match(text, at + 1).end()
        if at < end and text[at] == "]":
            at = _WHITESPACE.match(text, at + 1).end()
            if at < end:
                yield _remainder(text, at, 0, file_index, source, limits, "data after the closing ]")
            return
    index = 0
    while True:
        pos = Position(file_index, source, None, index)
        if at >= end:
            if in_array:
                yield _remainder(text, at, index, file_index, source, limits, "array not closed (file ends)")
            return
        try:
            value, stop = _DECODER.raw_decode(text, at)
        except RecursionError:
            yield _remainder(text, at, index, file_index, source, limits, "nested too deeply")
            return
        except ValueError as exc:
            yield _remainder(text, at, index, file_index, source, limits, _json_error(exc, text, at))
            return
        yield from _interpret_element(value, text[at:stop], pos, limits)
        index += 1
        at = _WHITESPACE.match(text, stop).end()
        if not in_array:
            continue
        if at < end and text[at] == ",":
            at = _WHITESPACE.match(text, at + 1).end()
            continue
        if at < end and text[at] == "]":
            at = _WHITESPACE.match(text, at + 1).end()
            if at < end:
                yield _remainder(text, at, index, file_index, source, limits, "data after the closing ]")
            return
        yield _remainder(text, at, index, file_index, source, limits,
                         "expected ',' or ']' after element" if at < end else "array not closed (file ends)")
        return


def _interpret_element(value: Any, raw_text: str, pos: Position, limits: ParseLimits) -> list[dict]:
    size = len(raw_text.encode("utf-8", "surrogateescape"))
    if size > limits.max_line_bytes:
        return [_reject(pos, raw_text, "too_large",
                        f"{size} bytes > ingest.max_line_bytes={limits.max_line_bytes}", limits)]
    bad = _first_escaped_byte(raw_text)
    if bad is not None:
        return [_reject(pos, raw_text, "invalid_utf8", f"byte 0x{bad:02x} is not UTF-8", limits)]
    return interpret_object(value, raw_text, pos, limits)


def _first_escaped_byte(text: str) -> int | None:
    """The first undecodable byte kept by ``surrogateescape`` (U+DC80..U+DCFF), if any."""
    for char in text:
        if "\udc80" <= char <= "\udcff":
            return ord(char) - 0xDC00
    return None


def _remainder(text: str, at: int, index: int, file_index: int, source: str, limits: ParseLimits,
               why: str) -> dict:
    line = text.count("\n", 0, at) + 1
    return _reject(Position(file_index, source, None, index), text[at:], "malformed_json",
                   f"unparseable remainder from line {line} ({len(text) - at} chars): {why}", limits)


def _json_error(exc: ValueError, text: str, at: int) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc)


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
        "id": content_id(instruction, input_, output, limits.id_length),
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
        "id": None, "instruction": None, "input": None, "output": None, "extra": None,
        "raw": _clip(raw, limits.raw_chars), "reason": reason, "detail": _clip(detail, limits.raw_chars),
    }


def _parse_batches(batches: Iterator[pa.RecordBatch], limits: ParseLimits) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: units in, outcomes out."""
    for batch in batches:
        columns = batch.to_pydict()
        pending: list[dict] = []
        for file_index, source, line, row, kind, raw, size in zip(
                columns["file_index"], columns["source"], columns["line"], columns["row"],
                columns["kind"], columns["raw"], columns["size"]):
            if kind == "document":
                for outcome in parse_document(raw, file_index, source, limits):
                    pending.append(outcome)
                    if len(pending) >= _OUTCOMES_PER_BATCH:
                        yield pa.RecordBatch.from_pylist(pending, schema=_OUTCOME_ARROW)
                        pending = []
            else:
                # A Parquet/Delta row is never "blank": an empty to_json is still a row.
                pending.extend(parse_text(raw, size, Position(file_index, source, line, row), limits,
                                          blank_is_row=row is not None))
        if pending:
            yield pa.RecordBatch.from_pylist(pending, schema=_OUTCOME_ARROW)


# --------------------------------------------------------------------------------------------
# Reading (Spark)
# --------------------------------------------------------------------------------------------

_GLOB_CHARS = re.compile(r"([\\*?\[\]{}])")


def _spark_path(path: str) -> str:
    """Hadoop treats * ? [ ] { } as a glob; escape them so a file name is taken literally."""
    return _GLOB_CHARS.sub(r"\\\1", path)


def _cut(value, limits: ParseLimits):
    """Ship at most a prefix of an over-size text to Python: its size alone decides the reject."""
    return F.when(F.length(value) > limits.max_line_bytes,
                  F.substring(value, 1, limits.raw_chars * 4)).otherwise(value)


def _jsonl_units(spark: SparkSession, files: list[tuple[int, InputFile]], limits: ParseLimits) -> DataFrame:
    """JSON Lines as units with exact 1-based line numbers, computed without leaving the JVM.

    Each file block (a split) is read by one task, in order, so a row's line number is
    (rows in earlier blocks of the file) + (its position in its block) + 1. The position comes
    from ``monotonically_increasing_id`` (consecutive inside a partition) minus the block's
    smallest id; the earlier-block counts from a small aggregate (one row per block).
    """
    scans = []
    for index, item in files:
        scans.append(spark.read.text(_spark_path(item.path)).select(
            F.lit(index).cast("int").alias("file_index"),
            F.lit(item.path).alias("source"),
            F.col("_metadata.file_block_start").alias("block"),
            F.monotonically_increasing_id().alias("mid"),
            F.col("value").cast("binary").alias("value")))
    lines = _union(scans)
    blocks = lines.groupBy("file_index", "block").agg(F.count(F.lit(1)).alias("n"), F.min("mid").alias("first"))
    earlier = Window.partitionBy("file_index").orderBy("block").rowsBetween(Window.unboundedPreceding, -1)
    blocks = blocks.withColumn("before", F.coalesce(F.sum("n").over(earlier), F.lit(0)))
    numbered = lines.join(F.broadcast(blocks.select("file_index", "block", "first", "before")),
                          ["file_index", "block"])
    return numbered.select(
        "file_index", "source",
        (F.col("mid") - F.col("first") + F.col("before") + 1).cast("long").alias("line"),
        F.lit(None).cast("long").alias("row"),
        F.lit("text").alias("kind"),
        _cut(F.col("value"), limits).alias("raw"),
        F.length("value").cast("long").alias("size"))


def _json_document_units(spark: SparkSession, files: list[tuple[int, InputFile]]) -> DataFrame:
    scans = [spark.read.format("binaryFile").load(_spark_path(item.path)).select(
        F.lit(index).cast("int").alias("file_index"),
        F.lit(item.path).alias("source"),
        F.lit(None).cast("long").alias("line"),
        F.lit(None).cast("long").alias("row"),
        F.lit("document").alias("kind"),
        F.col("content").alias("raw"),
        F.col("length").cast("long").alias("size")) for index, item in files]
    return _union(scans)


def _table_units(spark: SparkSession, files: list[tuple[int, InputFile]], limits: ParseLimits) -> DataFrame:
    """Parquet files and Delta tables: each row as ``to_json(struct(*))``, with its row index."""
    scans = []
    for index, item in files:
        if item.format == "parquet":
            parts = [(item.path, 0, {})]
        else:
            parts, offset = [], 0
            for data_file, count, partition in _delta_data_files(item.path):
                parts.append((data_file, offset, partition))
                if count is None:
                    import pyarrow.parquet as pq
                    count = pq.read_metadata(data_file).num_rows
                offset += count
        for data_file, offset, partition in parts:
            scans.append(_parquet_rows(spark, index, item.path, data_file, offset, partition, limits))
    return _union(scans)


def _parquet_rows(spark: SparkSession, index: int, source: str, data_file: str, offset: int,
                  partition: dict[str, Any], limits: ParseLimits) -> DataFrame:
    df = spark.read.parquet(_spark_path(data_file))
    fields = []
    for field in df.schema.fields:
        value = F.col(f"`{field.name}`")
        if isinstance(field.dataType, (DoubleType, FloatType)):
            # to_json writes NaN as the string "NaN"; NaN is pandas' null, and JSON has no NaN.
            value = F.when(F.isnan(value), F.lit(None)).otherwise(value)
        fields.append(value.alias(field.name))
    for key, value in partition.items():  # Delta keeps partition values in the log, not the files
        if key not in df.columns:
            fields.append(F.lit(value).alias(key))
    # Keep nulls as JSON null so a null column still shows up in extra.
    text = (F.to_json(F.struct(*fields), {"ignoreNullFields": "false"}).cast("binary") if fields
            else F.lit(b"{}"))
    return df.select(
        F.lit(index).cast("int").alias("file_index"),
        F.lit(source).alias("source"),
        F.lit(None).cast("long").alias("line"),
        (F.col("_metadata.row_index") + F.lit(offset)).cast("long").alias("row"),
        F.lit("text").alias("kind"),
        _cut(text, limits).alias("raw"),
        F.length(text).cast("long").alias("size"))


def _union(frames: list[DataFrame]) -> DataFrame | None:
    if not frames:
        return None
    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame)
    return result


def read_units(spark: SparkSession, files: list[InputFile], limits: ParseLimits) -> DataFrame:
    """All inputs as one DataFrame of parser units (schema ``_UNIT_SCHEMA``)."""
    indexed = list(enumerate(files))
    parts = [
        _jsonl_units(spark, [(i, f) for i, f in indexed if f.format == "jsonl"], limits)
        if any(f.format == "jsonl" for f in files) else None,
        _json_document_units(spark, [(i, f) for i, f in indexed if f.format == "json"])
        if any(f.format == "json" for f in files) else None,
        _table_units(spark, [(i, f) for i, f in indexed if f.format in ("parquet", "delta")], limits)
        if any(f.format in ("parquet", "delta") for f in files) else None,
    ]
    units = _union([p for p in parts if p is not None])
    if units is None:
        return spark.createDataFrame([], _UNIT_SCHEMA)
    return units


def ingest(spark: SparkSession, files: list[InputFile], settings: IngestSettings,
           raw_chars: int = DEFAULT_RAW_CHARS, persist: bool = True) -> tuple[DataFrame, DataFrame]:
    """Read ``files`` into (records, rejects); see the module docstring for the rules.

    The parsed outcomes are persisted (memory and disk) when ``persist`` so that writing both
    tables parses the input once.
    """
    for item in files:
        if item.format not in FORMATS:
            raise InputError(f"{item.path}: unknown format {item.format!r}")
    limits = ParseLimits.from_settings(settings, raw_chars)
    units = read_units(spark, files, limits)
    outcomes = units.mapInArrow(lambda batches: _parse_batches(batches, limits), _OUTCOME_SCHEMA)
    if persist:
        outcomes = outcomes.persist(StorageLevel.MEMORY_AND_DISK)

    parsed = outcomes.filter(F.col("reason").isNull())
    first = Window.partitionBy("id").orderBy("file_index", "line", "row", "sub")
    ranked = parsed.withColumn("_rank", F.row_number().over(first))
    records = ranked.filter(F.col("_rank") == 1).select(
        *[F.col(f.name).cast(f.dataType).alias(f.name) for f in RECORD_SCHEMA.fields])
    duplicates = ranked.filter(F.col("_rank") > 1).select(
        "source", "line", "row", "raw", F.lit("exact_duplicate").alias("reason"), F.col("id").alias("detail"))
    rejects = outcomes.filter(F.col("reason").isNotNull()).select(
        "source", "line", "row", "raw", "reason", "detail").unionByName(duplicates)
    return records, rejects


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------

class Ingest(Stage):
    """Read the input files into ``records`` and ``rejects``."""

    name = "ingest"
    inputs = ()
    outputs = ("records", "rejects")
    settings_sections = ("input", "ingest")

    def __init__(self, files: list[InputFile]) -> None:
        self.files = list(files)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Ingest":
        """Resolve ``input.paths`` (the bundled sample when empty) with ``input.format``."""
        paths = list(settings.input.paths) or [SAMPLE_PATH]
        return cls(resolve_inputs(paths, settings.input.format))

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> dict[str, DataFrame]:
        records, rejects = ingest(ctx.spark, self.files, ctx.settings.ingest,
                                  raw_chars=ctx.settings.ingest.reject_raw_chars)
        return {"records": records, "rejects": rejects}

    def extra_fingerprint(self, ctx: StageContext) -> str:
        return fingerprint_inputs(self.files)
