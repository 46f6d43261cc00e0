"""Ingest: read instruction data into the ``records``, ``rejects`` and ``input_files`` tables.

Inputs are JSON arrays, JSON Lines, Parquet files and Delta tables (resolved on the driver by
:mod:`mergeit_spark.inputs`). Every object goes through one validation path
(:mod:`mergeit_spark.parsing`: layouts, normalisation, reason codes), whatever file it came from,
and ends up in exactly one place: a record, or a reject with a reason code.

What one input unit is, and how the ledger balances
---------------------------------------------------
The readers *frame* each file into units before anything is parsed:

* JSON Lines: a line that is not blank (1-based ``line``). Blank lines (only spaces and tabs,
  after an optional byte-order mark) separate units, so a trailing newline is not a lost record;
  a line over ``ingest.max_line_bytes`` is always a unit (it is rejected as too large). Lines end
  at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (Hadoop's line reader); ``.jsonl.gz`` is read
  transparently.
* JSON array: an element (0-based ``row``), framed by :mod:`mergeit_spark.jsonstream` as the file
  is streamed: a malformed element is one unit and the next elements still count; a missing value
  (``[a, , b]``), an array the file ends inside, and data after the closing ``]`` are one unit each.
  A ``json`` file that is not an array is a stream of concatenated JSON values, one unit each.
* Parquet / Delta: a table row (0-based ``row``; for Delta, counted over the table's live data
  files sorted by path). Each row is serialised with Spark's ``to_json`` and parsed like a JSON
  line. Null (and floating NaN) values become JSON null; Delta partition values are added back.

Each framed unit becomes exactly one row of ``records`` or ``rejects``, with one exception: an
Alpaca seed task (``instruction`` + a non-empty ``instances`` list) is one unit per instance, and
each instance becomes one row. Exact duplicates are rejects (``exact_duplicate``), one row each,
so they change nothing in the count. Hence, exactly::

    records + rejects = sum(input_files.units)
    units = framed + sum over seed tasks of (len(instances) - 1)

``input_files`` has one row per input file per run: ``source`` (as in records and rejects),
``format``, ``units``, ``bytes``, ``run_id``, ``framed`` and ``version`` (a Delta source's table
version read; null for files: an incremental run reads only the versions after it).
``framed`` is counted apart from the parser, by one Spark job over the readers' output that runs
before any parsing (:func:`frame_inputs`): JSON Lines and Parquet/Delta on the JVM; a JSON array by ijson (yajl, C)
when it reads the file as one clean array, else by the framer. The seed-task term needs the JSON
parsed: each outcome of a seed task carries the length of its list as read (not the number of
rows the parser made), so a lost instance still shows. A parser that drops a unit, or tables that
come out short or empty, do not balance: this stage's check and finalize's ledger check both fail
the run.

Exact duplicates: the first by (input file position, line/row, instance) is kept, the others are
rejected as ``exact_duplicate`` with ``detail`` = the kept id.

A bad row never stops the run (:mod:`mergeit_spark.parsing`: ``too_deep``, ``unparseable``); a bad
file always does, before any table is written. :func:`ingest` reads every input inside the call:
the framing job, then (``persist``) the parse, counted into Spark's cache that the table writes
read. A file that cannot be read whole there (a corrupt or truncated ``.gz``, a ``.parquet`` that
is not Parquet, a file deleted or moved since the run resolved it) fails the call with an
:class:`~mergeit_spark.inputs.InputReadError` naming the file, not a Java trace; the stage
returns no tables, so the executor writes none.

Engine: no row reaches the driver. JSON Lines are read with ``spark.read.text``; exact line numbers
come from a per-block row count (the idea of ``RDD.zipWithIndex``, on the JVM): the framing job
counts the rows of each file block (one row per block comes back to the driver, with the framed
counts: no window over the whole data, no self-join), the driver sums the counts of the earlier
blocks of each file, and a broadcast join adds each row's offset inside its block. Lines travel to
Python as bytes (``cast("binary")``) so a strict UTF-8 decode in the worker catches bad bytes; a
line over the size limit is cut on the JVM side before it is shipped. A JSON array file is streamed by
one task (the format has no split points) a chunk at a time, so a worker's memory stays flat
whatever the file's size. Parquet and Delta rows become JSON text with ``to_json(struct(*))``.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema
from pyspark.sql.types import (DoubleType, FloatType, IntegerType, LongType, StringType, StructField,
                               StructType)

from ..config import IngestSettings, Settings
from ..inputs import (FORMATS, SAMPLE_PATH, InputError, InputFile, InputReadError, data_file_paths,
                      delta_data_files, fingerprint_inputs, input_bytes, pinned, resolve_inputs,
                      unreadable_input)
from ..fs import qualify
from ..jsonstream import count_units
from ..parsing import (DEFAULT_RAW_CHARS, OUTCOME_ARROW, REASONS, ParseLimits, parse_json_file_batches,
                       parse_text_batches)
from ..tables import Write
from . import Stage, StageContext, StageOutput, new_run_id

__all__ = ["FORMATS", "REASONS", "SAMPLE_PATH", "InputError", "InputFile", "InputReadError", "Ingest",
           "IngestCountError", "IngestTables", "check_input_counts", "ingest", "resolve_inputs"]

RECORD_SCHEMA = StructType([
    StructField("id", StringType(), False),
    StructField("instruction", StringType(), False),
    StructField("input", StringType(), False),
    StructField("output", StringType(), False),
    StructField("source", StringType(), False),
    StructField("extra", StringType(), True),
])
INPUT_FILES_SCHEMA = StructType([
    StructField("source", StringType(), False),
    StructField("format", StringType(), False),
    StructField("units", LongType(), False),    # rows of records + rejects this file accounts for
    StructField("bytes", LongType(), False),
    StructField("run_id", StringType(), False),
    StructField("framed", LongType(), False),   # lines, elements or rows, counted apart from parsing
])

_OUTCOME_SCHEMA = from_arrow_schema(OUTCOME_ARROW)
_COUNT_SCHEMA = StructType([StructField("file_index", IntegerType(), False),
                            StructField("framed", LongType(), False)])
_BLANK_LINE = r"^\uFEFF?[ \t]*$"  # Java regex: what separates JSON Lines units
_GLOB_CHARS = re.compile(r"([\\*?\[\]{}])")


class IngestCountError(RuntimeError):
    """records + rejects do not add up to the input units ingest counted."""


class IngestTables(NamedTuple):
    records: DataFrame
    rejects: DataFrame
    input_files: DataFrame


# --------------------------------------------------------------------------------------------
# Readers: framed units (Spark)
# --------------------------------------------------------------------------------------------

def _spark_path(path: str) -> str:
    """``path`` for Spark: qualified (a local path as ``file://``, whatever the cluster's default
    filesystem), with * ? [ ] { } escaped (Hadoop's globs) so a file name is taken literally."""
    return _GLOB_CHARS.sub(r"\\\1", qualify(path))


# A text unit (a JSON Lines line, a table row as JSON) goes to the parser as (file_index, source,
# line, row, raw: binary, size: bytes before any cut).

def _cut(value: Column, limits: ParseLimits) -> Column:
    """Ship at most a prefix of an over-size text to Python: its size alone decides the reject."""
    return F.when(F.length(value) > limits.max_line_bytes,
                  F.substring(value, 1, limits.raw_chars * 4)).otherwise(value)


def _jsonl_lines(spark: SparkSession, files: list[tuple[int, InputFile]]) -> DataFrame:
    """Every line of the JSON Lines files, blank or not, with its block and a position id."""
    return _union([spark.read.text(_spark_path(item.path)).select(
        F.lit(index).cast("int").alias("file_index"),
        F.lit(item.path).alias("source"),
        F.col("_metadata.file_block_start").alias("block"),
        F.monotonically_increasing_id().alias("mid"),
        F.col("value")) for index, item in files])


def _is_unit_line(limits: ParseLimits) -> Column:
    """A line that is a unit: not blank, or over the size limit (then rejected as too large)."""
    size = F.length(F.col("value").cast("binary"))
    return (size > limits.max_line_bytes) | ~F.col("value").rlike(_BLANK_LINE)


def _jsonl_units(spark: SparkSession, files: list[tuple[int, InputFile]], limits: ParseLimits,
                 offsets: list[tuple[int, int, int, int]]) -> DataFrame:
    """JSON Lines units with exact 1-based line numbers, computed without leaving the JVM.

    Each file block (a split) is read by one task, in order, so a row's line number is
    (lines in earlier blocks of the file) + (its position in its block) + 1. The position comes
    from ``monotonically_increasing_id`` (consecutive inside a partition) minus the block's
    smallest id; both per-block numbers come from ``offsets`` (:class:`Framing`). Blank lines
    count for the numbering but are not units.
    """
    blocks = spark.createDataFrame(offsets, "file_index int, block long, first long, before long")
    numbered = _jsonl_lines(spark, files).join(F.broadcast(blocks), ["file_index", "block"])
    value = F.col("value").cast("binary")
    return numbered.filter(_is_unit_line(limits)).select(
        "file_index", "source",
        (F.col("mid") - F.col("first") + F.col("before") + 1).cast("long").alias("line"),
        F.lit(None).cast("long").alias("row"),
        _cut(value, limits).alias("raw"),
        F.length(value).cast("long").alias("size"))


def _table_parts(files: list[tuple[int, InputFile]]) -> Iterator[tuple[int, str, str, int, dict[str, Any]]]:
    """(file_index, source, data file, row offset, partition values) of each Parquet data file."""
    for index, item in files:
        if item.format == "parquet":
            yield index, item.path, item.path, 0, {}
            continue
        offset = item.row_offset
        for data_file, count, partition, _ in delta_data_files(item.path, item.version, item.after_version):
            yield index, item.path, data_file, offset, partition
            if count is None:
                import pyarrow.parquet as pq
                count = pq.read_metadata(data_file).num_rows
            offset += count


def _table_units(spark: SparkSession, files: list[tuple[int, InputFile]], limits: ParseLimits) -> DataFrame:
    """Parquet files and Delta tables: each row as ``to_json(struct(*))``, with its row index."""
    return _union([_parquet_rows(spark, index, source, data_file, offset, partition, limits)
                   for index, source, data_file, offset, partition in _table_parts(files)])


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
        _cut(text, limits).alias("raw"),
        F.length(text).cast("long").alias("size"))


def _json_files(spark: SparkSession, files: list[tuple[int, InputFile]]) -> DataFrame:
    """One row (file_index, source) per JSON file, each in its own partition: one task per file."""
    paths = F.array(*[F.lit(item.path) for _, item in files])
    indexes = F.array(*[F.lit(index) for index, _ in files])
    slot = F.col("id").cast("int") + 1
    return spark.range(0, len(files), 1, len(files)).select(
        F.element_at(indexes, slot).cast("int").alias("file_index"),
        F.element_at(paths, slot).alias("source"))


def _union(frames: list[DataFrame]) -> DataFrame | None:
    if not frames:
        return None
    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame)
    return result


def _by_format(files: list[InputFile], *formats: str) -> list[tuple[int, InputFile]]:
    return [(i, f) for i, f in enumerate(files) if f.format in formats]


# --------------------------------------------------------------------------------------------
# Parsing and counting
# --------------------------------------------------------------------------------------------

def parse_outcomes(spark: SparkSession, files: list[InputFile], limits: ParseLimits,
                   framing: Framing | None = None) -> DataFrame:
    """Every input's outcomes (records and rejects before exact duplicates are found).

    JSON Lines need ``framing`` (their block offsets); it is counted here when not given."""
    jsonl, tables, arrays = (_by_format(files, "jsonl"), _by_format(files, "parquet", "delta"),
                             _by_format(files, "json"))
    if jsonl and framing is None:
        framing = frame_inputs(spark, files, limits)
    text_units = _union([df for df in (_jsonl_units(spark, jsonl, limits, framing.offsets) if jsonl else None,
                                       _table_units(spark, tables, limits) if tables else None)
                         if df is not None])
    parts = []
    if text_units is not None:
        parts.append(text_units.mapInArrow(lambda batches: parse_text_batches(batches, limits), _OUTCOME_SCHEMA))
    if arrays:
        parts.append(_json_files(spark, arrays).mapInArrow(
            lambda batches: parse_json_file_batches(batches, limits), _OUTCOME_SCHEMA))
    return _union(parts) if parts else spark.createDataFrame([], _OUTCOME_SCHEMA)


def _count_json_batches(batches: Iterator[pa.RecordBatch], limits: ParseLimits) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        columns = batch.to_pydict()
        counts = [count_units(source, limits.max_line_bytes, limits.raw_chars, limits.max_depth)
                  for source in columns["source"]]
        yield pa.RecordBatch.from_pydict({"file_index": columns["file_index"], "framed": counts},
                                         schema=pa.schema([pa.field("file_index", pa.int32(), False),
                                                           pa.field("framed", pa.int64(), False)]))


class Framing(NamedTuple):
    """What the readers frame, counted before and apart from parsing (:func:`frame_inputs`).

    ``offsets``: per JSON Lines file block, (file_index, block start, smallest position id, lines
    in the file's earlier blocks); ``framed``: per file index, the units framed (files without
    any are absent). Small: one entry per file block, data file or JSON file.
    """

    offsets: list[tuple[int, int, int, int]]
    framed: dict[int, int]


def _framing_rows(spark: SparkSession, files: list[InputFile], limits: ParseLimits) -> DataFrame:
    """(file_index, block, lines, first, units): one row per JSON Lines block, per table, per
    JSON file (block, lines and first are null but for JSON Lines)."""
    jsonl, tables, arrays = (_by_format(files, "jsonl"), _by_format(files, "parquet", "delta"),
                             _by_format(files, "json"))
    none = F.lit(None).cast("long")
    parts = []
    if jsonl:
        parts.append(_jsonl_lines(spark, jsonl).groupBy("file_index", "block").agg(
            F.count(F.lit(1)).alias("lines"), F.min("mid").alias("first"),
            F.sum(_is_unit_line(limits).cast("long")).alias("units")))
    if tables:
        rows = _union([spark.read.parquet(_spark_path(data_file)).select(F.lit(index).cast("int").alias("file_index"))
                       for index, _, data_file, _, _ in _table_parts(tables)])
        parts.append(rows.groupBy("file_index").agg(none.alias("block"), none.alias("lines"), none.alias("first"),
                                                    F.count(F.lit(1)).alias("units")))
    if arrays:
        parts.append(_json_files(spark, arrays).mapInArrow(
            lambda batches: _count_json_batches(batches, limits), _COUNT_SCHEMA).select(
            "file_index", none.alias("block"), none.alias("lines"), none.alias("first"),
            F.col("framed").alias("units")))
    return _union(parts)


def frame_inputs(spark: SparkSession, files: list[InputFile], limits: ParseLimits) -> Framing:
    """Count what every input frames, in one Spark job before any parsing (see the module
    docstring); the JSON Lines block counts also give each block its line offset."""
    with reading_inputs(files):
        frame = _framing_rows(spark, files, limits)
        # One row per JSON Lines block, table or JSON file: file-scale, not row-scale.
        rows = frame.collect() if frame is not None else []
    framed: dict[int, int] = {}
    blocks = []
    for row in rows:
        framed[row["file_index"]] = framed.get(row["file_index"], 0) + int(row["units"] or 0)
        if row["block"] is not None:
            blocks.append((row["file_index"], row["block"], row["first"], row["lines"]))
    offsets, before, last_file = [], 0, None
    for file_index, block, first, lines in sorted(blocks):
        before = 0 if file_index != last_file else before
        offsets.append((file_index, block, first, before))
        before, last_file = before + lines, file_index
    return Framing(offsets, framed)


def input_files_table(spark: SparkSession, files: list[InputFile], limits: ParseLimits,
                      outcomes: DataFrame, run_id: str, framing: Framing | None = None) -> DataFrame:
    """``input_files``: per file, the units it holds (framed + seed-task instances beyond the
    first), its bytes and the run; see the module docstring. ``framing`` is counted here when
    not given."""
    framing = framing if framing is not None else frame_inputs(spark, files, limits)
    per_unit = (outcomes.filter(F.col("instances") > 1)
                .groupBy("file_index", "line", "row").agg((F.max("instances") - 1).alias("more")))
    extra = per_unit.groupBy("file_index").agg(F.sum("more").alias("more"))
    meta = spark.createDataFrame(
        [(i, f.path, f.format, framing.framed.get(i, 0), input_bytes(f), run_id, delta_version(f))
         for i, f in enumerate(files)],
        "file_index int, source string, format string, framed long, bytes long, run_id string, version long")
    framed = F.col("framed").cast("long")
    return meta.join(extra, "file_index", "left").select(
        "source", "format", (framed + F.coalesce(F.col("more"), F.lit(0))).cast("long").alias("units"),
        F.col("bytes").cast("long"), "run_id", framed.alias("framed"), "version")


def delta_version(item: InputFile) -> int | None:
    """The version of a Delta source that was read (``input_files.version``; null for files):
    an incremental run reads only the data files added after it."""
    return pinned(item).version if item.format == "delta" else None


def split_outcomes(outcomes: DataFrame, existing_ids: DataFrame | None = None,
                   partitions: int | None = None) -> tuple[DataFrame, DataFrame]:
    """(records, rejects): the first of each content id is the record, the rest are
    ``exact_duplicate`` rejects with ``detail`` = that id (a window per id: partitioned, so it
    scales). An id in ``existing_ids`` (an increment: the records ingested before) is a duplicate
    too. With ``partitions``, the rule's shuffle by id spreads the rows over that many
    partitions (content ids are hashes: about equal shares), so the records come out ready to
    embed, one task per core, without a second shuffle."""
    parsed = outcomes.filter(F.col("reason").isNull())
    if partitions:
        parsed = parsed.repartition(partitions, "id")
    first = Window.partitionBy("id").orderBy("file_index", "line", "row", "sub")
    ranked = parsed.withColumn("_rank", F.row_number().over(first))
    is_record = F.col("_rank") == 1
    if existing_ids is not None:
        ranked = ranked.join(existing_ids.select("id", F.lit(True).alias("_known")), "id", "left")
        is_record = is_record & F.col("_known").isNull()
    records = ranked.filter(is_record).select(
        *[F.col(f.name).cast(f.dataType).alias(f.name) for f in RECORD_SCHEMA.fields])
    duplicates = ranked.filter(~is_record).select(
        "source", "line", "row", "raw", F.lit("exact_duplicate").alias("reason"), F.col("id").alias("detail"))
    rejects = outcomes.filter(F.col("reason").isNotNull()).select(
        "source", "line", "row", "raw", "reason", "detail").unionByName(duplicates)
    return records, rejects


def ingest_new_inputs(ctx: StageContext, files: list[InputFile], records_before: DataFrame
                      ) -> tuple[dict[str, int], tuple[DataFrame, DataFrame, DataFrame]]:
    """An increment's ingest of ``files``: the counts, and its (records, rejects, input_files)
    rows, cached and counted (the counts must balance before anything is written; the embed
    step takes the new records from memory). A content id already in ``records_before`` is an
    ``exact_duplicate`` reject, exactly as in a full run."""
    from .embed import embed_partitions
    settings = ctx.settings.ingest
    limits = ParseLimits.from_settings(settings, settings.reject_raw_chars)
    files = [pinned(item) for item in files]  # a new Delta source: one version for every read
    framing = frame_inputs(ctx.spark, files, limits)  # counted once, for the parse and the count
    outcomes = parse_outcomes(ctx.spark, files, limits, framing).persist(StorageLevel.MEMORY_AND_DISK)
    # Counted, then appended: the split (a window and a join against records) runs once.
    records, rejects = split_outcomes(outcomes, records_before, embed_partitions(ctx.settings.embed, ctx.spark))
    input_rows = input_files_table(ctx.spark, files, limits, outcomes, ctx.run_id, framing)
    cached = tuple(df.persist(StorageLevel.MEMORY_AND_DISK) for df in (records, rejects, input_rows))
    try:
        with reading_inputs(files):   # a file broken or gone while parsed: an error naming it
            counts = {"new_records": cached[0].count(), "new_rejects": cached[1].count(),
                      "new_input_rows": int(cached[2].agg(F.sum("units")).first()[0] or 0)}
    finally:
        outcomes.unpersist()  # the three are cached whole now (or the step failed)
    if counts["new_records"] + counts["new_rejects"] != counts["new_input_rows"]:
        raise IngestCountError(f"new inputs: records {counts['new_records']} + rejects "
                               f"{counts['new_rejects']} != {counts['new_input_rows']} input units")
    return counts, cached


def ingest(spark: SparkSession, files: list[InputFile], settings: IngestSettings,
           raw_chars: int = DEFAULT_RAW_CHARS, persist: bool = True, run_id: str | None = None) -> IngestTables:
    """Read ``files`` into (records, rejects, input_files); see the module docstring for the rules.

    With ``persist`` the parsed outcomes are cached (memory and disk) and counted here, so that
    every input is read inside this call (a file that cannot be read raises
    :class:`InputReadError` now, not while the caller writes a table) and writing the tables
    parses the input once.
    """
    for item in files:
        if item.format not in FORMATS:
            raise InputError(f"{item.path}: unknown format {item.format!r}")
    limits = ParseLimits.from_settings(settings, raw_chars)
    with reading_inputs(files):
        files = [pinned(item) for item in files]
        framing = frame_inputs(spark, files, limits)  # one job, before parsing: counts and line offsets
        outcomes = parse_outcomes(spark, files, limits, framing)
        if persist:
            outcomes = _parsed_into_cache(outcomes)
        records, rejects = split_outcomes(outcomes)
        input_files = input_files_table(spark, files, limits, outcomes, run_id or new_run_id(), framing)
    return IngestTables(records, rejects, input_files)


def _parsed_into_cache(outcomes: DataFrame) -> DataFrame:
    """``outcomes`` persisted and counted: the parse runs now, every input file is read by the
    time this returns, and the table writes read the cache. A failed count drops the cache."""
    cached = outcomes.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        cached.count()
    except BaseException:
        cached.unpersist()
        raise
    return cached


# --------------------------------------------------------------------------------------------
# Input files that cannot be read
# --------------------------------------------------------------------------------------------

_CAUSED_BY = re.compile(r"^Caused by: ([\w.$]+): (.+)$", re.MULTILINE)
_PYTHON_ERROR = re.compile(r"^(\w+(?:Error|Exception)): (.+)$", re.MULTILINE)
_CAUSE_CHARS = 300


@contextmanager
def reading_inputs(files: list[InputFile]) -> Iterator[None]:
    """Turn a failure to read one of ``files`` (Spark's is a Java trace, or a worker's Python
    one) into an :class:`InputReadError` that names the file and says what is wrong with it.
    A failure that no input explains passes unchanged."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised as is unless an input is to blame
        blamed = blame_input(files, exc)
        if blamed is None:
            raise
        raise blamed from exc


def blame_input(files: list[InputFile], exc: BaseException) -> InputReadError | None:
    """The input to blame for ``exc``, checked on the driver (:func:`unreadable_input`), or
    the data file the failure names, with the failure's root cause; None when neither."""
    text = _error_text(exc)
    try:
        named = _named_data_file(files, text)
        blamed = unreadable_input(files, named)
    except Exception:  # noqa: BLE001 - the diagnosis must not hide the failure it explains
        return None
    if blamed is None and named is not None:
        blamed = InputReadError(f"input {named} could not be read: {_root_cause(text)}; ingest wrote no table")
    return blamed


def _error_text(exc: BaseException) -> str:
    """The failure's message with Spark's Java trace (``Caused by:`` lines), or Python's."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a JVM gone away cannot render its exception
        return repr(exc)


def _named_data_file(files: list[InputFile], text: str) -> str | None:
    """The data file whose path (plain, or URI-quoted as Hadoop writes it) the failure's text
    holds; the longest when several do (``a.jsonl`` is inside ``a.jsonl.gz``)."""
    named = [path for path in data_file_paths(files) if path in text or quote(path) in text]
    return max(named, key=len) if named else None


def _root_cause(text: str) -> str:
    """The innermost ``Caused by`` of a Java trace, else the last Python exception line, else
    the first line: what went wrong, without the trace."""
    causes = _CAUSED_BY.findall(text) or _PYTHON_ERROR.findall(text)
    if causes:
        kind, message = causes[-1]
        cause = f"{kind.rsplit('.', 1)[-1]}: {message.strip()}"
    else:
        cause = next((line.strip() for line in text.splitlines() if line.strip()), "unknown error")
    return cause if len(cause) <= _CAUSE_CHARS else cause[:_CAUSE_CHARS] + "..."


def check_input_counts(records: int, rejects: int, input_files: DataFrame | pa.Table) -> dict[str, int]:
    """The ingest ledger: records + rejects must equal the units counted in ``input_files`` (a
    DataFrame, or the table as Arrow: one row per input file). Returns the numbers, or raises
    :class:`IngestCountError`."""
    if isinstance(input_files, pa.Table):
        totals = {"files": input_files.num_rows, "units": pc.sum(input_files.column("units")).as_py(),
                  "framed": pc.sum(input_files.column("framed")).as_py()}
    else:
        totals = input_files.agg(F.count(F.lit(1)).alias("files"), F.sum("units").alias("units"),
                                 F.sum("framed").alias("framed")).first()
    numbers = {"input_files": int(totals["files"]), "input_rows": int(totals["units"] or 0),
               "framed_units": int(totals["framed"] or 0), "records": int(records), "rejects": int(rejects)}
    if numbers["records"] + numbers["rejects"] != numbers["input_rows"]:
        raise IngestCountError(
            f"records {records} + rejects {rejects} = {records + rejects} != {numbers['input_rows']} input units "
            f"counted in {numbers['input_files']} input files: rows were lost or made up while parsing")
    return numbers


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------

class Ingest(Stage):
    """Read the input files into ``records``, ``rejects`` and ``input_files``."""

    name = "ingest"
    inputs = ()
    outputs = ("records", "rejects", "input_files")
    settings_sections = ("input", "ingest")

    def __init__(self, files: list[InputFile]) -> None:
        self.files = list(files)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Ingest":
        """Resolve ``input.paths`` (the bundled sample when empty) with ``input.format``."""
        paths = list(settings.input.paths) or [SAMPLE_PATH]
        return cls(resolve_inputs(paths, settings.input.format))

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        out = ingest(ctx.spark, self.files, ctx.settings.ingest,
                     raw_chars=ctx.settings.ingest.reject_raw_chars, run_id=ctx.run_id)
        return StageOutput(dict(out._asdict()), summary={"run_id": ctx.run_id, "input_files": len(self.files)})

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """The inputs not yet in ``input_files`` (``incremental.new_inputs``), appended; no
        output (nothing to do) when there are none."""
        from ..incremental import new_inputs
        fresh = new_inputs(ctx.store, self.files)
        if not fresh:
            return StageOutput(summary={"new_inputs": []})
        counts, (records, rejects, input_rows) = ingest_new_inputs(ctx, fresh, tables["records"])
        return StageOutput(
            {"records": Write.append(records, counts["new_records"]),
             "rejects": Write.append(rejects, counts["new_rejects"]),
             "input_files": Write.append(input_rows, len(fresh))},
            summary={"run_id": ctx.run_id, "input_files": len(fresh), "new_inputs": [f.path for f in fresh],
                     "counts": counts})

    def check(self, ctx: StageContext) -> dict[str, Any]:
        """The run stops here unless records + rejects equal the units ingest counted (over
        every row ever ingested, after an increment). ``input_files`` (one row per input) is
        read on the driver: a Spark read of a fresh Delta table costs snapshot jobs."""
        written = ctx.store.read_small("input_files").select(["units", "framed"])
        return check_input_counts(ctx.store.count("records"), ctx.store.count("rejects"), written)

    def extra_fingerprint(self, ctx: StageContext) -> str:
        return fingerprint_inputs(self.files)
