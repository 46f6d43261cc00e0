"""The one way to write and read a stage table: Delta under the run root.

Two writers, one result. With Delta's classes on the session's classpath (``spark.packages``
holds ``delta``, the default; a cluster with the jar; Databricks) Spark writes Delta itself.
Without them (``tables.engine=delta-rs``, or an air-gapped session with no jars) Spark writes the
Parquet files straight into a fresh folder inside the table folder and delta-rs commits those very
files (add actions with per-file statistics read from the Parquet footers): no row passes through
the driver, which only reads footers. Either way any Delta reader opens the table, and versions
stay readable (time travel).
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, Schema
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction, create_table_with_add_actions
from deltalake.writer import convert_to_deltalake
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from .session import has_delta

Mode = Literal["overwrite", "append"]
# The first commit file of a Delta log: where convert_to_deltalake leaves a folder's add actions.
FIRST_COMMIT = "_delta_log/" + "0" * 20 + ".json"


class TableWriteError(RuntimeError):
    """Spark's files cannot be committed as written (the driver does not see them all)."""


class TableStore:
    """Delta tables under one run root: ``<root>/<name>``."""

    def __init__(self, spark: SparkSession, root: str | Path, engine: str = "auto") -> None:
        self.spark = spark
        self.root = Path(root).absolute()
        if engine == "auto":
            engine = "delta-spark" if has_delta(spark) else "delta-rs"
        if engine == "delta-spark" and not has_delta(spark):
            raise RuntimeError("tables.engine=delta-spark but the session has no Delta classes: keep "
                               "`delta` in spark.packages, put Delta's jars in spark.jars, or give "
                               "spark-submit --packages with Delta's coordinate")
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
        """Spark writes Parquet into ``<table>/<write id>/``; delta-rs commits exactly those files.
        Overwrite removes the old files logically (remove actions) and replaces the schema."""
        write_id = uuid.uuid4().hex
        folder = Path(target) / write_id
        written = Observation()
        try:
            df.observe(written, F.count(F.lit(1)).alias("rows")).write.parquet(str(folder))
            rows = int(written.get["rows"])
            actions = self._add_actions(folder, write_id, rows)
            schema = Schema.from_json(df.schema.json())  # Delta's schema is Spark's, nullability and all
            if DeltaTable.is_deltatable(target):
                DeltaTable(target).create_write_transaction(actions, mode, schema)
            else:
                create_table_with_add_actions(target, schema, actions, mode="error")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # uncommitted files: nobody references them
            raise

    def _add_actions(self, folder: Path, write_id: str, rows: int) -> list[AddAction]:
        """Add actions for the Parquet files Spark wrote into ``folder``, with delta-rs's own
        statistics from their footers; fails unless they hold every row Spark wrote."""
        seen = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if not seen:
            adds = []
        else:  # delta-rs reads the footers (in Rust, not the rows) and logs stats as its writer does
            convert_to_deltalake(str(folder))
            log = folder / FIRST_COMMIT
            adds = [a["add"] for a in map(json.loads, log.read_text().splitlines()) if "add" in a]
            shutil.rmtree(folder / "_delta_log")
        found = sum(json.loads(a["stats"])["numRecords"] for a in adds)
        if found != rows:
            raise TableWriteError(
                f"Spark wrote {rows} rows to {folder}, but the driver sees {len(seen)} files holding "
                f"{found}; nothing was committed. output.root ({self.root}) must be storage that the "
                "driver and every executor share (HDFS, an object store, a shared mount).")
        return [AddAction(f"{write_id}/{a['path']}", a["size"], {}, a["modificationTime"], True, a["stats"])
                for a in adds]

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
