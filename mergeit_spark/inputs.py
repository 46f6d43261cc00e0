"""Input resolution, on the driver before any Spark work: which files a run reads, in which format.

:func:`resolve_inputs` turns user paths (files, directories, Delta tables) into typed
:class:`InputFile` s, or fails with :class:`InputError` naming the path: a missing file or an
unknown format never reaches Spark. Also here: the live data files of a Delta table, read from
its log (:func:`delta_data_files`), the size of an input (:func:`input_bytes`), the
fingerprint of the inputs that decides whether ingest must rerun (:func:`fingerprint_inputs`),
and, once a read has failed, which input was to blame and why (:func:`unreadable_input`).

A path is a local path or a URI (``s3a://``, ``gs://``, ``abfss://``, ``hdfs://``, ``file://``),
listed and read through :mod:`mergeit_spark.fs`. An input's ``path`` (every row's ``source``) is
the absolute local path for a local file, else its URI.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote, urlparse

import pyarrow as pa
from pyarrow import fs as pafs

from .fs import Location, StorageError, resolve

SAMPLE_PATH = str(Path(__file__).resolve().parent / "data" / "sample.jsonl")
"""The bundled demo sample, used when ``input.paths`` is empty."""

FORMATS = ("json", "jsonl", "parquet", "delta")

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
_UNSUPPORTED_DELTA_READER_FEATURES = {"columnMapping"}


class InputError(ValueError):
    """An input path is missing, unreadable or of a format this stage cannot read."""


class InputReadError(InputError):
    """An input that resolved could not be read whole when the run read it: a corrupt or
    truncated ``.gz``, a ``.parquet`` that is not Parquet, a file deleted or moved mid-run.
    The message names the file; ingest raises it before writing any table."""


@dataclass(frozen=True)
class InputFile:
    """One input: a file (json, jsonl, parquet) or a Delta table directory (delta)."""
    path: str     # absolute local path, or a URI
    format: str   # one of FORMATS
    # A Delta table read by an incremental run: only the data files added after ``after_version``
    # up to ``version``, their rows numbered on from ``row_offset`` (the rows read before).
    version: int | None = None
    after_version: int | None = None
    row_offset: int = 0


def pinned(item: InputFile) -> InputFile:
    """``item`` with a Delta source's version fixed at its current one (files as they are): one
    ingest reads a Delta source several times (framing, parsing, bytes, ``input_files.version``),
    and a writer appending between those reads must not make them see different versions (rows
    framed but not parsed, or a recorded version past the rows read)."""
    if item.format != "delta" or item.version is not None:
        return item
    return replace(item, version=_delta_table(item.path).version())


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


def _name(location: Location) -> str:
    """An input's name: its local path, or its URI."""
    return location.local if location.local is not None else location.uri


def _resolve_one(given: str, fmt: str) -> list[InputFile]:
    try:
        location = resolve(given)
        kind = location.info().type
    except (StorageError, OSError) as exc:
        raise InputError(f"{given}: {exc}") from None
    if kind == pafs.FileType.NotFound:
        raise InputError(f"input not found: {given}")
    if location.local is not None and not os.access(location.local, os.R_OK):
        raise InputError(f"input not readable: {given}")
    if kind == pafs.FileType.Directory:
        return _resolve_directory(location, given, fmt)
    return [InputFile(_name(location), _file_format(_name(location), fmt))]


def _resolve_directory(folder: Location, given: str, fmt: str) -> list[InputFile]:
    if (folder / "_delta_log").is_dir():
        if fmt not in ("auto", "delta"):
            raise InputError(f"{given} is a Delta table; read it with format delta (or auto), not {fmt}")
        _check_delta(_name(folder))
        return [InputFile(_name(folder), "delta")]
    if fmt == "delta":
        raise InputError(f"{given} is not a Delta table (no _delta_log directory)")
    found: list[InputFile] = []
    unknown: list[str] = []
    pending = [folder]
    while pending:  # depth first, by name, as os.walk with sorted folders
        here = pending.pop()
        if here is not folder and (here / "_delta_log").is_dir():
            _check_delta(_name(here))
            found.append(InputFile(_name(here), "delta"))
            continue
        entries = [(e, kind) for e, kind in here.entries() if not e.name.startswith((".", "_"))]
        for entry, kind in entries:
            if kind != pafs.FileType.File:
                continue
            try:
                found.append(InputFile(_name(entry), _file_format(_name(entry), fmt)))
            except InputError:
                unknown.append(entry.path[len(folder.path):].lstrip("/"))
        pending += reversed([e for e, kind in entries if kind == pafs.FileType.Directory])
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
    with resolve(path).open_input() as handle:
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


def _delta_table(path: str, version: int | None = None):
    """delta-rs's table at ``path`` (a local path or a URI, with the storage options)."""
    from deltalake import DeltaTable
    location = resolve(path)
    return DeltaTable(location.delta_uri, version=version, storage_options=location.delta_options())


def _check_delta(path: str) -> None:
    try:
        table = _delta_table(path)
    except Exception as exc:  # TableNotFoundError, a damaged log, ...
        raise InputError(f"{path}: cannot open Delta table: {exc}") from None
    features = set(table.protocol().reader_features or ())
    blocked = features & _UNSUPPORTED_DELTA_READER_FEATURES
    if blocked:
        raise InputError(f"{path}: Delta reader feature(s) {sorted(blocked)} cannot be read from the "
                         f"data files directly")
    if "deletionVectors" in features and pa.table(table.deletion_vectors().read_all()).num_rows:
        raise InputError(f"{path}: Delta table has deletion vectors; rewrite it (OPTIMIZE/PURGE) first")


def delta_data_files(path: str, version: int | None = None,
                     after_version: int | None = None) -> list[tuple[str, int | None, dict[str, Any], int]]:
    """(absolute data file, row count if logged, partition values, bytes) for the table's live
    files (at ``version``; only those not live at ``after_version`` when given), sorted by path."""
    actions = pa.table(_delta_table(path, version).get_add_actions(flatten=True)).to_pylist()
    if after_version is not None:
        seen = set(pa.table(_delta_table(path, after_version).get_add_actions(flatten=True))
                   .column("path").to_pylist())
        actions = [a for a in actions if a["path"] not in seen]
    files = []
    for action in actions:
        rel = action["path"]
        parsed = urlparse(rel)
        if parsed.scheme == "file":
            full = unquote(parsed.path)
        elif len(parsed.scheme) > 1:  # an absolute URI (a shallow clone's files)
            full = rel
        else:
            full = f"{path.rstrip('/')}/{unquote(rel)}"
        partition = {key[len("partition."):]: value for key, value in action.items()
                     if key.startswith("partition.")}
        files.append((full, action.get("num_records"), partition, int(action.get("size_bytes") or 0)))
    return sorted(files, key=lambda item: item[0])


def input_bytes(item: InputFile) -> int:
    """Bytes of an input: the file's size, or a Delta table's live data files."""
    if item.format == "delta":
        return sum(size for *_, size in delta_data_files(item.path, item.version, item.after_version))
    return int(resolve(item.path).info().size or 0)


def fingerprint_inputs(files: Iterable[InputFile]) -> str:
    """Hash of each input's path, format, and every data file's size and mtime."""
    digest = hashlib.sha256()
    for item in files:
        digest.update(f"{item.format}\0{item.path}\n".encode())
        location = resolve(item.path)
        info = location.info()
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input not found: {item.path}")
        targets = [location] if info.type == pafs.FileType.File else location.files(recursive=True)
        for target in targets:
            stat = target.info() if target is not location else info
            rel = target.path[len(location.path):].lstrip("/") or "."
            digest.update(f"{rel}\0{stat.size}\0{stat.mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


_PROBE_CHUNK = 1 << 20


def unreadable_input(files: Iterable[InputFile], named: str | None = None) -> InputReadError | None:
    """The input that cannot be read whole, checked on the driver once a read has failed (the
    checks read whole files, so they run only then): a data file that vanished; else ``named``
    (the data file the failure's message names) when given; else every data file (Parquet
    footers, then gzip streams to their end). None when nothing is found."""
    parts = [(item, data_file, fmt) for item in files for data_file, fmt in _data_files(item)]
    for item, data_file, _ in parts:
        if not resolve(data_file).exists():
            return _read_error(item, data_file, "no longer exists (deleted or moved while the run read it)")
    if named is not None:
        parts = [part for part in parts if part[1] == named]
    else:  # cheap checks first
        parts.sort(key=lambda part: part[1].lower().endswith(".gz"))
    for item, data_file, fmt in parts:
        problem = data_file_problem(data_file, fmt)
        if problem is not None:
            return _read_error(item, data_file, problem)
    return None


def data_file_paths(files: Iterable[InputFile]) -> list[str]:
    """Every data file the inputs read (a Delta table's live files in its place)."""
    return [data_file for item in files for data_file, _ in _data_files(item)]


def data_file_problem(path: str, fmt: str) -> str | None:
    """Why one data file cannot be read whole (``fmt``: its input's format), or None."""
    location = resolve(path)
    if not location.exists():
        return "no longer exists (deleted or moved while the run read it)"
    if location.local is not None and not os.access(path, os.R_OK):
        return "is no longer readable (permissions)"
    if fmt in ("parquet", "delta"):
        return _parquet_problem(path)
    if path.lower().endswith(".gz"):
        return _gzip_problem(path)
    return None


def _data_files(item: InputFile) -> list[tuple[str, str]]:
    """(data file, format) of one input: the file itself, or a Delta table's live data files."""
    if item.format != "delta":
        return [(item.path, item.format)]
    try:
        return [(path, "delta") for path, *_ in delta_data_files(item.path, item.version, item.after_version)]
    except Exception:  # noqa: BLE001 - a table whose log cannot be read is itself the culprit
        return [(item.path, "delta")]


def _read_error(item: InputFile, data_file: str, problem: str) -> InputReadError:
    where = (f"input {item.path}" if data_file == item.path
             else f"input {item.path} (Delta table): data file {data_file}")
    return InputReadError(f"{where} {problem}; ingest wrote no table")


def _parquet_problem(path: str) -> str | None:
    if resolve(path).is_dir():  # a Delta table whose log could not be read
        try:
            _delta_table(path)
            return None
        except Exception as exc:  # noqa: BLE001
            return f"cannot be opened as a Delta table: {exc}"
    import pyarrow.parquet as pq
    try:
        with resolve(path).open_input() as handle:
            pq.read_metadata(handle)
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError: not Parquet, either way
        return f"is not a readable Parquet file: {exc}"
    return None


def _gzip_problem(path: str) -> str | None:
    """Read a gzip file to its end: the damage shows only where the stream breaks off."""
    try:
        with resolve(path).open_input() as raw, gzip.open(raw, "rb") as stream:
            while stream.read(_PROBE_CHUNK):
                pass
    except EOFError:
        return "is a truncated gzip file (the compressed stream ends early)"
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        return f"is not a valid gzip file: {exc}"
    return None
