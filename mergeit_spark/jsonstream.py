"""A JSON array file, element by element, in bounded memory (ingest's reader for ``json`` inputs).

:class:`JsonFramer` walks a file from a binary handle, a chunk at a time, and yields one
:class:`Element` per array element: its 0-based ``row``, its exact text, its size in bytes and its
parsed value. It holds one chunk plus the element being read, and of an element over the size
limit only a prefix (its end is found by scanning, not by keeping it), so a worker's memory does
not grow with the file.

Framing rules (what one element, one *unit* of the input, is)
-------------------------------------------------------------
* An array element is the text between two separators (``[``, ``,``, ``]``) at the array's own
  depth, found by tracking strings (with their escapes) and bracket depth. Each element is parsed
  on its own with Python's ``json`` (``raw_decode``; the structural scan only runs where that
  fails, e.g. at a chunk boundary), so a malformed element is one unit and the elements after it
  still count.
* ``[a, , b]`` and ``[a, ]``: the missing value is one unit (``problem`` says so).
* The file ends inside an element (an open string or bracket): that element is one unit with a
  ``problem``. It ends after a complete element or a comma without ``]``: one more unit,
  "array not closed". Data after the closing ``]`` is one unit (from there to the end).
* A file that does not start with ``[`` (after whitespace and a byte-order mark) is a stream of
  concatenated JSON values: each value (an object or array up to its closing bracket, a string, or
  a bare token up to whitespace or a bracket) is one unit.
* Bytes that are not UTF-8 are kept (``surrogateescape``): they spoil only the element they sit in.

Depth: with ``max_depth`` set, an element that nests more arrays/objects than that is framed by
structure and never decoded (``too_deep``): :func:`nests_deeper_than` measures it before Python's
``json`` (which recurses once per level) sees it, so a deep element costs that element only.

:func:`count_units` counts the units of a file without the framer when it can: a file that ijson
(yajl, C) reads as one clean array has exactly as many units as elements, since on valid JSON the
structural rules above and JSON's grammar agree; any other file is counted by the framer. Either
way the count is taken apart from the parser that makes records. ijson is read as bare events
(``basic_parse``, elements counted by depth): its ``items`` builds every element and tracks a
path prefix per event, so one element nested 20,000 deep took a gigabyte.
"""
from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from ijson import get_backend as ijson_backend

CHUNK_BYTES = 1 << 20  # read size; a worker holds about one chunk plus the current element

_WS = re.compile(r"[ \t\n\r]*")
_SPECIAL = re.compile(r'["\[\]{},]')
_STRING_BODY = re.compile(r'[^"\\]*(?:\\[\s\S][^"\\]*)*')  # stops at the closing quote or the end
_TOKEN_END = re.compile(r'[ \t\n\r"\[\]{},]')
# Everything up to the next run of opening or closing brackets outside strings (strings skipped
# whole, escapes included); the run is group 1, None where the text (or an unclosed string) ends.
_TO_BRACKET_RUN = re.compile(r'[^"\[\]{}]*(?:"[^"\\]*(?:\\[\s\S][^"\\]*)*"[^"\[\]{}]*)*([\[{]+|[\]}]+)?')
_DECODER = json.JSONDecoder()


@dataclass
class Element:
    """One unit of a JSON file: an array element, a value of a stream, or a damaged stretch."""
    row: int
    text: str                   # exact text (surrogateescape'd bytes); a prefix when oversize
    size: int                   # bytes of the whole unit
    value: Any = None
    parsed: bool = False        # ``value`` holds the parsed text
    problem: str | None = None  # framing damage, or the JSON error of a text that did not parse
    too_deep: bool = False      # nested past ``max_depth`` (or past what ``json`` can recurse)


def too_deep_detail(limit: int) -> str:
    """What a reject says of a value nested past the limit."""
    return f"nested more than ingest.max_depth={limit} arrays/objects deep"


RECURSION_DETAIL = "nested too deeply for Python's json (RecursionError)"


def nests_deeper_than(text: str, limit: int, start: int = 0) -> bool:
    """Whether the JSON value at ``start`` (after whitespace) nests more than ``limit``
    arrays/objects deep, the outermost counting one.

    Counts brackets outside strings (escaped quotes included) without parsing: no recursion,
    linear in the value's length, and it stops at the value's end or as soon as the limit is
    passed. A value cut short (or malformed) is measured as far as its brackets go; a scalar
    is depth 0. This runs before ``json`` decodes a value, since ``json`` recurses per level.
    """
    pos = _WS.match(text, start).end()
    if pos >= len(text) or text[pos] not in "[{":
        return False
    depth = 0
    while True:
        match = _TO_BRACKET_RUN.match(text, pos)
        run = match.group(1)
        if run is None:
            return False
        pos = match.end()
        if run[0] in "[{":
            depth += len(run)
            if depth > limit:
                return True
        else:
            depth -= len(run)
            if depth <= 0:
                return False


class _Window:
    """The decoded text of the file read so far that is still needed (appended chunk by chunk)."""

    def __init__(self, handle: BinaryIO, chunk_bytes: int) -> None:
        self.handle = handle
        self.chunk_bytes = chunk_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.text = ""
        self.eof = False

    def more(self) -> bool:
        """Append the next chunk; False once the file is exhausted."""
        if self.eof:
            return False
        data = self.handle.read(self.chunk_bytes)
        tail = self.decoder.decode(data, final=not data)
        self.eof = not data
        self.text += tail
        return bool(data) or bool(tail)


def byte_size(text: str) -> int:
    """UTF-8 size of a surrogateescape'd text (an escaped byte counts one)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))


class JsonFramer:
    """Yields the :class:`Element` s of one JSON file (see the module docstring for the rules).

    ``max_bytes``: an element over this size is not kept whole, only its first ``keep_chars``
    characters (its ``size`` is still exact, so the caller can reject it as too large).
    ``max_depth``: an element nested deeper is framed but not decoded (``too_deep``); None leaves
    the depth to ``json``'s own recursion guard.
    """

    def __init__(self, handle: BinaryIO, max_bytes: int, keep_chars: int,
                 chunk_bytes: int = CHUNK_BYTES, max_depth: int | None = None) -> None:
        self.win = _Window(handle, chunk_bytes)
        self.pos = 0
        self.pin: int | None = None  # start of a decoded element while the text after it is read
        self.max_bytes = max_bytes
        self.keep_chars = keep_chars
        self.max_depth = max_depth
        self.row = 0

    # -- reading ------------------------------------------------------------------------------
    def _compact(self) -> None:
        """Forget the text before ``pos`` (and before ``pin``, when set)."""
        cut = self.pos if self.pin is None else min(self.pos, self.pin)
        if cut:
            self.win.text = self.win.text[cut:]
            self.pos -= cut
            if self.pin is not None:
                self.pin -= cut

    def _release(self) -> None:
        """Between elements: drop the text already consumed once it is over a chunk's worth."""
        if self.pos > self.win.chunk_bytes:
            self._compact()

    def _skip_ws(self) -> bool:
        """Move past whitespace; False at the end of the file."""
        while True:
            self.pos = _WS.match(self.win.text, self.pos).end()
            if self.pos < len(self.win.text):
                return True
            self._compact()
            if not self.win.more():
                return False

    def elements(self) -> Iterator[Element]:
        if not self._skip_ws():
            return
        if self.win.text.startswith("\ufeff", self.pos):
            self.pos += 1
            if not self._skip_ws():
                return
        if self.win.text[self.pos] == "[":
            self.pos += 1
            yield from self._array()
        else:
            yield from self._stream()

    def _unit(self, text: str, size: int, problem: str | None = None, value: Any = None,
              parsed: bool = False, too_deep: bool = False) -> Element:
        element = Element(self.row, text, size, value, parsed, problem, too_deep)
        self.row += 1
        return element

    # -- arrays -------------------------------------------------------------------------------
    def _array(self) -> Iterator[Element]:
        while True:
            self._release()
            if not self._skip_ws():
                yield self._unit("", 0, "array not closed (the file ends)")
                return
            if self.row == 0 and self.win.text[self.pos] == "]":
                self.pos += 1
                yield from self._after_array()
                return
            element, terminator, cut = self._array_element()
            yield element
            if terminator == "]":
                yield from self._after_array()
                return
            if terminator is None:  # the file ended in or after this element
                if not cut:
                    yield self._unit("", 0, "array not closed (the file ends)")
                return

    def _array_element(self) -> tuple[Element, str | None, bool]:
        """The element at ``pos``, the separator after it (None at the end of the file) and
        whether the file ended inside it. Leaves ``pos`` after the separator."""
        start = self.pos
        decoded = self._decode_at(start)
        if decoded is not None:
            value, end = decoded
            text = self.win.text[start:end]
            self.pos, self.pin = end, start
            more = self._skip_ws()  # may read on (and compact): ``pin`` keeps the start
            start, self.pin = self.pin, None
            if not more:  # the file ends after a complete element
                return self._unit(text, byte_size(text), value=value, parsed=True), None, False
            terminator = self.win.text[self.pos]
            if terminator in ",]":
                self.pos += 1
                return self._unit(text, byte_size(text), value=value, parsed=True), terminator, False
        return self._framed_element(start, in_array=True)

    def _after_array(self) -> Iterator[Element]:
        if self._skip_ws():
            text, size, _ = self._consume_rest()
            yield self._unit(text, size, "data after the closing ]")

    # -- streams of values ----------------------------------------------------------------------
    def _stream(self) -> Iterator[Element]:
        while self._release() or self._skip_ws():
            start = self.pos
            decoded = self._decode_at(start)
            if decoded is not None:
                value, self.pos = decoded
                text = self.win.text[start:self.pos]
                yield self._unit(text, byte_size(text), value=value, parsed=True)
            else:
                yield self._framed_element(start, in_array=False)[0]

    # -- parsing and scanning ------------------------------------------------------------------
    def _decode_at(self, start: int) -> tuple[Any, int] | None:
        """``json`` decode of the value at ``start`` when it lies whole in the window and is not
        nested past ``max_depth`` (then the structural scan frames it, without decoding)."""
        if self.max_depth is not None and nests_deeper_than(self.win.text, self.max_depth, start):
            return None
        while True:
            try:
                value, end = _DECODER.raw_decode(self.win.text, start)
            except (ValueError, RecursionError):
                return None
            # A number or literal that reaches the window's end may go on in the next chunk.
            if end < len(self.win.text) or self.win.eof or not self.win.more():
                return value, end

    def _framed_element(self, start: int, in_array: bool) -> tuple[Element, str | None, bool]:
        """Frame the element at ``start`` by structure, then parse it on its own."""
        scan = _Scan(self, start, in_array)
        end, terminator, cut = scan.run()
        if scan.prefix is not None:  # oversize: only its prefix was kept
            size = scan.dropped_bytes + byte_size(self.win.text[scan.start:end])
            text = scan.prefix
        else:
            text = self.win.text[start:end].rstrip(" \t\n\r")
            size = byte_size(text)
        self.pos = end + (1 if terminator else 0)
        if cut:
            where = "element (array not closed)" if in_array else "value"
            problem = f"the file ends inside this {where}"
            if scan.too_deep:
                problem = f"{too_deep_detail(self.max_depth)}; {problem}"
            return self._unit(text, size, problem, too_deep=scan.too_deep), None, True
        if not text:
            return self._unit(text, size, f"no value before {terminator!r}"), terminator, False
        if scan.prefix is not None or size > self.max_bytes:
            return self._unit(text, size), terminator, False  # too large: the caller rejects it
        if scan.too_deep:
            return self._unit(text, size, too_deep_detail(self.max_depth), too_deep=True), terminator, False
        return self._parse_whole(text, size), terminator, False

    def _parse_whole(self, text: str, size: int) -> Element:
        try:
            value, stop = _DECODER.raw_decode(text)
        except RecursionError:
            return self._unit(text, size, RECURSION_DETAIL, too_deep=True)
        except ValueError as exc:
            return self._unit(text, size, _json_error(exc))
        if stop != len(text):
            return self._unit(text, size, f"extra data after the value at char {stop}")
        return self._unit(text, size, value=value, parsed=True)

    def _consume_rest(self) -> tuple[str, int, bool]:
        """Everything from ``pos`` to the end of the file: (prefix, bytes, True)."""
        prefix = self.win.text[self.pos:self.pos + self.keep_chars]
        size = 0
        while True:
            size += byte_size(self.win.text[self.pos:])
            self.pos = len(self.win.text)
            self._compact()
            if not self.win.more():
                return prefix, size, True
            if len(prefix) < self.keep_chars:
                prefix += self.win.text[:self.keep_chars - len(prefix)]


class _Scan:
    """Find where an element ends by its structure (strings, escapes, bracket depth), reading more
    of the file as needed. An element that grows past the size limit is not kept: its first
    characters go to ``prefix`` and the rest only counts toward ``dropped_bytes``. ``too_deep``
    says whether its brackets nest past the framer's ``max_depth``."""

    def __init__(self, framer: JsonFramer, start: int, in_array: bool) -> None:
        self.framer = framer
        self.start = start
        self.in_array = in_array
        self.prefix: str | None = None
        self.dropped_bytes = 0
        self.depth_limit = framer.max_depth if framer.max_depth is not None else math.inf
        self.too_deep = False

    def run(self) -> tuple[int, str | None, bool]:
        """(end, terminator, cut): the element is text[start:end]; terminator is the ',' or ']'
        at ``end`` (None otherwise); cut when the file ends inside it."""
        text = self.framer.win.text
        first = text[self.start]
        if not self.in_array and first not in '{["':
            return self._token()
        return self._brackets()

    def _token(self) -> tuple[int, str | None, bool]:
        """A bare token of a stream (number, literal or garbage): up to whitespace or a bracket."""
        pos = self.start + 1
        while True:
            match = _TOKEN_END.search(self.framer.win.text, pos)
            if match is not None:
                return match.start(), None, False
            pos = len(self.framer.win.text)
            pos = self._more(pos)
            if pos is None:
                return len(self.framer.win.text), None, False

    def _brackets(self) -> tuple[int, str | None, bool]:
        depth, in_string, pos = 0, False, self.start
        while True:
            text = self.framer.win.text
            if in_string:
                pos = _STRING_BODY.match(text, pos).end()
                if pos < len(text) and text[pos] == '"':
                    in_string, pos = False, pos + 1
                    if depth == 0 and not self.in_array:
                        return pos, None, False
                    continue
            else:
                match = _SPECIAL.search(text, pos)
                if match is not None:
                    char, pos = match.group(), match.end()
                    if char == '"':
                        in_string = True
                    elif char in "[{":
                        depth += 1
                        if depth > self.depth_limit:
                            self.too_deep = True
                    elif depth == 0 and self.in_array and char in ",]":
                        return pos - 1, char, False
                    elif char in "]}" and depth > 0:
                        depth -= 1
                        if depth == 0 and not self.in_array:
                            return pos, None, False
                    continue
                pos = len(text)
            pos = self._more(pos)
            if pos is None:
                return len(self.framer.win.text), None, in_string or depth > 0

    def _more(self, pos: int) -> int | None:
        """Read on from ``pos`` (dropping an oversize element's middle); None at the end."""
        framer = self.framer
        if pos - self.start > framer.max_bytes:  # chars <= bytes: it is over the limit
            text = framer.win.text
            if self.prefix is None:
                self.prefix = text[self.start:self.start + framer.keep_chars]
            self.dropped_bytes += byte_size(text[self.start:pos])
            framer.win.text = text[pos:]
            self.start, pos = 0, 0
        return pos if framer.win.more() else None


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at char {exc.pos}"
    return str(exc)


def starts_with_array(handle: BinaryIO) -> bool:
    """Whether the first significant byte (after whitespace and a byte-order mark) is ``[``."""
    head = handle.read(65536).lstrip(b" \t\r\n")
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip(b" \t\r\n")
    return head[:1] == b"["


def _ijson():
    """ijson's C backend (yajl2_c); its default pick when that is missing."""
    try:
        return ijson_backend("yajl2_c")
    except ImportError:
        import ijson
        return ijson


def _array_elements(events: Iterator[tuple[str, Any]]) -> int:
    """Elements of the top-level array, from ijson's bare events: each value that starts at
    depth 1. Flat in memory whatever the nesting (a depth counter, no path, no values kept)."""
    depth = elements = 0
    for event, _ in events:
        if event in ("start_map", "start_array"):
            elements += depth == 1
            depth += 1
        elif event in ("end_map", "end_array"):
            depth -= 1
        elif event != "map_key":
            elements += depth == 1
    return elements


def count_units(path: str, max_bytes: int, keep_chars: int, max_depth: int | None = None) -> int:
    """Units of one JSON file (see the module docstring): ijson's element count for a clean array,
    else the framer's count (``max_depth`` as the parser's framer uses it: deep elements are
    framed, not decoded)."""
    from .fs import resolve

    ijson = _ijson()
    location = resolve(path)
    with location.open_input() as handle:
        clean_array = starts_with_array(handle)
    if clean_array:
        try:
            with location.open_input() as handle:
                return _array_elements(ijson.basic_parse(handle, use_float=True))
        except Exception:  # any complaint (damage, NaN, a BOM, bad UTF-8): count by framing
            pass
    with location.open_input() as handle:
        return sum(1 for _ in JsonFramer(handle, max_bytes, keep_chars, max_depth=max_depth).elements())
