"""Export ``final`` as a training file: Alpaca JSON, JSON Lines or Parquet.

Spark writes the rows as part files (in parallel, on the executors); the driver then joins the
parts into the one file a trainer expects by streaming bytes (JSON) or record batches (Parquet)
from disk to disk: no row is collected into the driver's memory as a whole. The part files and the
target must be on a filesystem the driver sees (a local disk, or a volume every Spark node mounts,
as in docker-compose.yml).

* ``alpaca-json``: one JSON array of ``{"instruction", "input", "output"}`` objects (the Alpaca
  layout most fine-tuning scripts load).
* ``jsonl``: one JSON object per line with every column of ``final`` (id, texts, origin,
  source_ids), so provenance travels with the data.
* ``parquet``: one Parquet file with the same columns.

Rows are ordered by id, so the same ``final`` always exports to the same bytes.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .tables import TableStore

FORMATS = ("alpaca-json", "jsonl", "parquet")
ALPACA_FIELDS = ("instruction", "input", "output")
FINAL_FIELDS = ("id", "instruction", "input", "output", "origin", "source_ids")
_COPY_CHUNK = 1 << 20


class ExportError(ValueError):
    """Unknown format, or columns that ``final`` does not have."""


def export_final(store: TableStore, out_path: str | Path, fmt: str, fields: Sequence[str] | None = None,
                 version: int | None = None) -> Path:
    """Write table ``final`` (at ``version``, default latest) to ``out_path`` as ``fmt``.

    ``fields`` picks the columns (default: the Alpaca three for ``alpaca-json``, every column of
    ``final`` otherwise). The file appears atomically: it is built beside the target and renamed.
    Returns the written path.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    df = store.read("final", version=version)
    fields = list(fields or (ALPACA_FIELDS if fmt == "alpaca-json" else FINAL_FIELDS))
    missing = [f for f in fields if f not in df.columns]
    if missing:
        raise ExportError(f"final has no column(s) {', '.join(missing)}; it has {', '.join(df.columns)}")

    out = Path(out_path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.{uuid.uuid4().hex}"
    parts_dir, partial = work / "parts", work / "file"
    work.mkdir()
    try:
        ordered = df.orderBy("id").select(*fields)  # a projection keeps the sort order
        if fmt == "parquet":
            ordered.write.mode("overwrite").parquet(str(parts_dir))
            _join_parquet(_part_files(parts_dir, ".parquet"), partial, ordered.schema)
        else:
            # Spark drops null fields from JSON unless told otherwise; a trainer wants every key.
            ordered.write.mode("overwrite").option("ignoreNullFields", "false").json(str(parts_dir))
            parts = _part_files(parts_dir, ".json")
            if fmt == "jsonl":
                _join_lines(parts, partial)
            else:
                _join_as_array(parts, partial)
        os.replace(partial, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _part_files(parts_dir: Path, suffix: str) -> list[Path]:
    # Spark numbers its part files in partition order, so name order is row order after orderBy.
    return sorted(p for p in parts_dir.iterdir() if p.name.startswith("part-") and p.name.endswith(suffix))


def _join_lines(parts: list[Path], target: Path) -> None:
    """JSON Lines: the parts one after another, each ending in a newline."""
    with target.open("wb") as sink:
        for part in parts:
            last = b"\n"
            with part.open("rb") as src:
                while chunk := src.read(_COPY_CHUNK):
                    sink.write(chunk)
                    last = chunk[-1:]
            if last != b"\n":
                sink.write(b"\n")


def _join_as_array(parts: list[Path], target: Path) -> None:
    """One JSON array: ``[`` + the lines of every part joined by ``,`` + ``]``, line by line."""
    with target.open("wb") as sink:
        sink.write(b"[")
        first = True
        for part in parts:
            with part.open("rb") as src:
                for line in src:
                    line = line.rstrip(b"\r\n")
                    if not line:
                        continue
                    sink.write(b"\n" if first else b",\n")
                    sink.write(line)
                    first = False
        sink.write(b"]\n" if first else b"\n]\n")


def _join_parquet(parts: list[Path], target: Path, spark_schema) -> None:
    """One Parquet file, written one record batch at a time from the part files."""
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = to_arrow_schema(spark_schema)
    with pq.ParquetWriter(str(target), schema) as writer:
        for part in parts:
            source = pq.ParquetFile(str(part))
            for batch in source.iter_batches():
                # Spark names list items "element"; cast to the schema Spark meant.
                writer.write_table(pa.Table.from_batches([batch]).cast(schema))
