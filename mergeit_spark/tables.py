"""The one way to write and read a stage table: Delta under the run root.

Two writers, one result. With Delta's classes on the session's classpath (a cluster with the jar,
Databricks) Spark writes Delta itself. Without them (an air-gapped laptop, this project's CI) Spark
writes staged Parquet and delta-rs commits it as a real Delta table, streaming record batches from
the staged files: no row ever passes through the driver's Python heap in one piece. Either way any
Delta reader opens the table, and versions stay readable (time travel).
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

from .session import has_delta

Mode = Literal["overwrite", "append"]
STAGING_DIR = "_staging"


class TableStore:
    """Delta tables under one run root: ``<root>/<name>``."""

    def __init__(self, spark: SparkSession, root: str | Path, engine: str = "auto") -> None:
        self.spark = spark
        self.root = Path(root).absolute()
        if engine == "auto":
            engine = "delta-spark" if has_delta(spark) else "delta-rs"
        if engine == "delta-spark" and not has_delta(spark):
            raise RuntimeError("tables.engine=delta-spark but the session has no Delta classes "
                               "(add the delta-spark jar and io.delta.sql.DeltaSparkSessionExtension)")
        self.engine = engine

    def path(self, name: str) -> str:
        return str(self.root / name)

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.path(name))

    def version(self, name: str) -> int | None:
        """Latest committed version, or None when the table does not exist."""
        try:
            return DeltaTable(self.path(name)).version()
        except TableNotFoundError:
            return None

    def count(self, name: str) -> int:
        """Row count from the Delta log's per-file statistics (no Spark job); Spark counts when a
        writer left the statistics out."""
        try:
            actions = pa.table(DeltaTable(self.path(name)).get_add_actions(flatten=True))
            if "num_records" in actions.column_names and actions.column("num_records").null_count == 0:
                return int(pc.sum(actions.column("num_records")).as_py() or 0)
        except Exception:  # noqa: BLE001 - any trouble reading stats: fall back to counting
            pass
        return self.read(name).count()

    def write(self, df: DataFrame, name: str, mode: Mode = "overwrite") -> int:
        """Write ``df`` as table ``name`` (replacing it, or appending); returns the new version."""
        if mode not in ("overwrite", "append"):
            raise ValueError(f"mode must be overwrite or append, not {mode!r}")
        target = self.path(name)
        if self.engine == "delta-spark":
            writer = df.write.format("delta").mode(mode)
            if mode == "overwrite":
                writer = writer.option("overwriteSchema", "true")
            writer.save(target)
        else:
            self._write_through_delta_rs(df, target, mode)
        return DeltaTable(target).version()

    def _write_through_delta_rs(self, df: DataFrame, target: str, mode: Mode) -> None:
        staging = self.root / STAGING_DIR / f"{Path(target).name}-{uuid.uuid4().hex}"
        try:
            df.write.mode("overwrite").parquet(str(staging))
            files = sorted(str(p) for p in staging.glob("*.parquet"))
            schema = to_arrow_schema(df.schema)
            if files:
                # Spark names list items "element"; delta-rs wants the schema Spark meant, so read
                # with the Spark-derived schema and let Arrow cast.
                dataset = pads.dataset(files, format="parquet")
                reader = dataset.scanner(batch_size=8192).to_reader()
                reader = _cast_reader(reader, schema)
            else:
                reader = pa.RecordBatchReader.from_batches(schema, iter(()))
            kwargs = {"schema_mode": "overwrite"} if mode == "overwrite" else {}
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            write_deltalake(target, reader, mode=mode, **kwargs)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def read(self, name: str, version: int | None = None) -> DataFrame:
        """Table ``name`` as a DataFrame, at ``version`` when given (time travel)."""
        target = self.path(name)
        if not self.exists(name):
            raise FileNotFoundError(f"no Delta table {name!r} at {target}")
        if self.engine == "delta-spark":
            reader = self.spark.read.format("delta")
            if version is not None:
                reader = reader.option("versionAsOf", version)
            return reader.load(target)
        table = DeltaTable(target, version=version)
        # delta-rs hands back an arro3 schema; pyarrow takes it through the C data interface.
        schema = from_arrow_schema(pa.schema(table.schema().to_arrow()))
        files = table.file_uris()
        if not files:
            return self.spark.createDataFrame([], schema)
        return self.spark.read.schema(schema).parquet(*files)

    def history(self, name: str) -> list[dict]:
        """Commit history, newest first (small: one entry per version)."""
        return DeltaTable(self.path(name)).history()


def _cast_reader(reader: pa.RecordBatchReader, schema: pa.Schema) -> pa.RecordBatchReader:
    if reader.schema.equals(schema):
        return reader

    def batches():
        for batch in reader:
            yield pa.Table.from_batches([batch]).cast(schema).to_batches()[0] if batch.num_rows else \
                pa.RecordBatch.from_pylist([], schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())
