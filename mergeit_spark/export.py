"""Export ``final`` as a training file: Alpaca JSON, JSON Lines or Parquet.

Spark writes the rows as part files (in parallel, on the executors); the driver then joins the
parts into the one file a trainer expects by streaming bytes (JSON) or record batches (Parquet)
from storage to storage: no row is collected into the driver's memory as a whole. The part files
and the target are on a filesystem the driver and the executors share: an object store, HDFS, or a
local disk in local mode (or a volume every Spark node mounts, as in docker-compose.yml).

* ``alpaca-json``: one JSON array of ``{"instruction", "input", "output"}`` objects (the Alpaca
  layout most fine-tuning scripts load).
* ``jsonl``: one JSON object per line with every column of ``final`` (id, texts, origin,
  source_ids), so provenance travels with the data.
* ``parquet``: one Parquet file with the same columns.

Rows are ordered by id, so the same ``final`` always exports to the same bytes.
"""
from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .fs import Location, resolve
from .tables import TableStore

FORMATS = ("alpaca-json", "jsonl", "parquet")
ALPACA_FIELDS = ("instruction", "input", "output")
FINAL_FIELDS = ("id", "instruction", "input", "output", "origin", "source_ids")
_COPY_CHUNK = 1 << 20


class ExportError(ValueError):
    """Unknown format, or columns that ``final`` does not have."""


def export_final(store: TableStore, out_path: str | Path | Location, fmt: str,
                 fields: Sequence[str] | None = None, version: int | None = None) -> Location:
    """Write table ``final`` (at ``version``, default latest) to ``out_path`` as ``fmt``.

    ``fields`` picks the columns (default: the Alpaca three for ``alpaca-json``, every column of
    ``final`` otherwise). The file appears atomically: on a local disk it is built beside the
    target and renamed; on an object store it is one upload, complete when it closes. Returns
    where it was written.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    df = store.read("final", version=version)
    fields = list(fields or (ALPACA_FIELDS if fmt == "alpaca-json" else FINAL_FIELDS))
    missing = [f for f in fields if f not in df.columns]
    if missing:
        raise ExportError(f"final has no column(s) {', '.join(missing)}; it has {', '.join(df.columns)}")

    out = resolve(out_path)
    out.parent.make_dirs()
    work = out.parent / f".{out.name}.{uuid.uuid4().hex}"
    parts_dir = work / "parts"
    partial = work / "file" if out.local is not None else out
    try:
        ordered = df.orderBy("id").select(*fields)  # a projection keeps the sort order
        if fmt == "parquet":
            ordered.write.mode("overwrite").parquet(parts_dir.uri)
            _join_parquet(_part_files(parts_dir, ".parquet"), partial, ordered.schema)
        else:
            # Spark drops null fields from JSON unless told otherwise; a trainer wants every key.
            ordered.write.mode("overwrite").option("ignoreNullFields", "false").json(parts_dir.uri)
            parts = _part_files(parts_dir, ".json")
            if fmt == "jsonl":
                _join_lines(parts, partial)
            else:
                _join_as_array(parts, partial)
        if out.local is not None:
            os.replace(partial.local, out.local)
    finally:
        work.delete_tree()
    return out


def _part_files(parts_dir: Location, suffix: str) -> list[Location]:
    # Spark numbers its part files in partition order, so name order is row order after orderBy.
    return [p for p in parts_dir.files() if p.name.startswith("part-") and p.name.endswith(suffix)]


def _sink(target: Location):
    target.parent.make_dirs()
    return target.filesystem.open_output_stream(target.path)


def _join_lines(parts: list[Location], target: Location) -> None:
    """JSON Lines: the parts one after another, each ending in a newline."""
    with _sink(target) as sink:
        for part in parts:
            last = b"\n"
            with part.open_input() as src:
                while chunk := src.read(_COPY_CHUNK):
                    sink.write(chunk)
                    last = chunk[-1:]
            if last != b"\n":
                sink.write(b"\n")


def _join_as_array(parts: list[Location], target: Location) -> None:
    """One JSON array: ``[`` + the lines of every part joined by ``,`` + ``]``, line by line."""
    with _sink(target) as sink:
        sink.write(b"[")
        first = True
        for part in parts:
            with part.open_input() as raw, io.BufferedReader(raw) as src:
                for line in src:
                    line = line.rstrip(b"\r\n")
                    if not line:
                        continue
                    sink.write(b"\n" if first else b",\n")
                    sink.write(line)
                    first = False
        sink.write(b"]\n" if first else b"\n]\n")


def _join_parquet(parts: list[Location], target: Location, spark_schema) -> None:
    """One Parquet file, written one record batch at a time from the part files."""
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = to_arrow_schema(spark_schema)
    with _sink(target) as sink, pq.ParquetWriter(sink, schema) as writer:
        for part in parts:
            source = pq.ParquetFile(part.open_input())
            for batch in source.iter_batches():
                # Spark names list items "element"; cast to the schema Spark meant.
                writer.write_table(pa.Table.from_batches([batch]).cast(schema))
