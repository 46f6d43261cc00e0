"""The run root's store: every table, state record, run log and saved model, by name.

One store per run root; everything the pipeline keeps goes through it, addressed by the root and
a name: tables (``<root>/<name>``), stage state and the increment marker (``<root>/_state/<name>.json``),
run logs (``<root>/_state/<name>.jsonl``, one JSON line per entry), saved models
(``<root>/_models/<name>``) and the merge ledger's folder (``<root>/_ledger``). The verbs: read a
table (at a version), read what was added since a version, write (overwrite, append, merge by key,
restore), and read or write state. No other module opens a run-root table or state file itself.

The root is a path or a URI (``s3a://``, ``gs://``, ``abfss://``, ``hdfs://``, ``file://``; a plain
path is local, qualified as ``file://`` so that a cluster whose default filesystem is HDFS writes
where the driver looks). Spark gets table URIs; delta-rs gets them with the storage options of
``storage.*``; state files, logs and model side files go through :mod:`mergeit_spark.fs`. Nothing
is appended to: a state record or a run log is replaced whole (a rename on POSIX, one PUT on an
object store), which only one writer does at a time (the run lease).

Tables: Delta.

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
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Sequence
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, Schema, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions
from deltalake.writer import convert_to_deltalake
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from .fs import Location, Storage, StorageError, qualify, resolve, use_storage
from .session import connect_server_host, has_delta, is_connect

log = logging.getLogger("mergeit.store")

Mode = Literal["overwrite", "append"]
STATE_DIR = "_state"
MODELS_DIR = "_models"
LEDGER_DIR = "_ledger"
RUN_LOG = "runs"  # the executor's run log: one line per stage run or extension
# The first commit file of a Delta log: where convert_to_deltalake leaves a folder's add actions.
FIRST_COMMIT = "_delta_log/" + "0" * 20 + ".json"


# delta-rs storage options that make its commits safe on S3 (a commit is a put-if-absent).
S3_COMMIT_OPTIONS = ("aws_s3_locking_provider", "conditional_put", "aws_conditional_put",
                     "aws_s3_allow_unsafe_rename")


class TableWriteError(RuntimeError):
    """Spark's files cannot be committed as written (the driver does not see them all)."""


@dataclass(frozen=True)
class Write:
    """A write intent: what a stage asks the executor to do with one table.

    ``overwrite`` replaces the table (``rows`` a DataFrame, or a few rows the driver holds as an
    Arrow table, committed without a Spark job); ``append`` adds ``rows`` in the table's column
    order and types (``count`` = 0 says there are none: no new version); ``merge`` is MERGE INTO
    by ``keys`` (see :meth:`TableStore.merge` for ``within`` and ``keep``)."""

    rows: Any  # DataFrame, or pyarrow.Table for a small overwrite
    mode: Literal["overwrite", "append", "merge"] = "overwrite"
    keys: tuple[str, ...] = ()
    within: DataFrame | None = None
    keep: tuple[str, ...] = ()
    count: int | None = None

    @classmethod
    def overwrite(cls, rows: Any) -> "Write":
        return cls(rows)

    @classmethod
    def append(cls, rows: DataFrame, count: int | None = None) -> "Write":
        return cls(rows, "append", count=count)

    @classmethod
    def merge(cls, rows: DataFrame, keys: Sequence[str], within: DataFrame | None = None,
              keep: Sequence[str] = ()) -> "Write":
        return cls(rows, "merge", tuple(keys), within, tuple(keep))


class TableStore:
    """Delta tables under one run root: ``<root>/<name>``."""

    def __init__(self, spark: SparkSession, root: str | os.PathLike[str], engine: str = "auto",
                 storage: Storage | None = None, catalog: str = "", schema: str = "") -> None:
        self.spark = spark
        self.schema = ".".join(f"`{part}`" for part in (catalog, schema) if part) if schema else ""
        self._registered: set[str] = set()
        self.storage = storage or Storage()
        use_storage(self.storage)  # paths this driver reads outside the store (inputs, exports)
        self.root: Location = resolve(root, self.storage)
        if self.root.s3:
            _configure_s3a(spark, self.storage)
        _check_reachable_by_server(spark, self.root)  # after s3a's settings: the server writes the probe
        if engine == "auto":
            engine = "delta-spark" if has_delta(spark) else "delta-rs"
        if engine == "delta-spark" and not has_delta(spark):
            raise RuntimeError("tables.engine=delta-spark but the session has no Delta classes: keep "
                               "`delta` in spark.packages, put Delta's jars in spark.jars, or give "
                               "spark-submit --packages with Delta's coordinate")
        if engine == "delta-rs" and not self._delta_rs_commits_safely():
            raise StorageError(
                f"tables.engine=delta-rs cannot commit safely under {self.root} : S3 has no atomic "
                "rename, so delta-rs needs a locking provider or conditional puts. Set storage.options "
                "AWS_S3_LOCKING_PROVIDER: dynamodb (with DELTA_DYNAMO_TABLE_NAME), or conditional_put: "
                "etag where the store supports If-None-Match (AWS S3 does), or use tables.engine="
                "delta-spark (auto picks it when the session has Delta's classes)")
        if self.schema and engine != "delta-spark":
            raise RuntimeError(f"output.schema {schema!r}: catalog tables need Delta's classes in the "
                               "session (tables.engine=delta-spark, `delta` in spark.packages)")
        self.engine = engine

    def catalog_name(self, name: str) -> str | None:
        """Table ``name``'s name in the session's catalog (``catalog.schema.name``), or None."""
        return f"{self.schema}.`{name}`" if self.schema and "/" not in name else None

    def register(self, name: str) -> None:
        """Make table ``name`` an external catalog table at its location (once per store). A
        catalog table of that name at another location is an error: its readers would read
        another run root."""
        table = self.catalog_name(name)
        if table is None or name in self._registered:
            return
        location = self.path(name)
        if self.spark.catalog.tableExists(table.replace("`", "")):
            rows = self.spark.sql(f"DESCRIBE TABLE EXTENDED {table}").collect()
            there = next((r["data_type"] for r in rows if r["col_name"] == "Location"), None)
            if there is not None and qualify(there) != location:
                raise RuntimeError(f"catalog table {table} is at {there}, not at this run root's {location}: "
                                   f"DROP TABLE {table} (an external table: its files stay) or set another "
                                   "output.schema")
        else:
            self.spark.sql(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            self.spark.sql(f"CREATE TABLE IF NOT EXISTS {table} USING DELTA LOCATION '{_sql_string(location)}'")
        self._registered.add(name)

    def path(self, name: str) -> str:
        """Table ``name``'s URI (what Spark and delta-rs are given)."""
        return (self.root / name).uri

    def location(self, *names: str) -> Location:
        """``<root>/<names...>`` for reading or writing files outside Spark."""
        location = self.root
        for name in names:
            location = location / name
        return location

    def _delta_rs_commits_safely(self) -> bool:
        """Whether delta-rs may commit here: anywhere but S3, or S3 with a locking option."""
        return not self.root.s3 or any(k.lower() in S3_COMMIT_OPTIONS for k in self.storage.options)

    def _delta_uri(self, name: str) -> str:
        return (self.root / name).delta_uri

    def _delta(self, name: str, version: int | None = None) -> DeltaTable:
        return DeltaTable(self._delta_uri(name), version=version, storage_options=self.root.delta_options())

    # -- state, run logs, models ----------------------------------------------------------------
    def _state_file(self, name: str, suffix: str = ".json") -> Location:
        return self.location(STATE_DIR, f"{name}{suffix}")

    def read_state(self, name: str) -> dict[str, Any] | None:
        """State record ``name`` (a stage's, the increment marker), or None when absent or torn."""
        data = self._state_file(name).read_bytes()
        if data is None:
            return None
        try:
            state = json.loads(data)
        except json.JSONDecodeError:
            return None  # a torn write counts as not done
        return state if isinstance(state, dict) else None

    def write_state(self, name: str, state: dict[str, Any] | None) -> None:
        """Replace state record ``name`` atomically (whole or absent); None removes it."""
        path = self._state_file(name)
        if state is None:
            path.delete()
        else:
            path.write_bytes(json.dumps(state, indent=2, sort_keys=True).encode("utf-8"))

    def create_state(self, name: str, state: dict[str, Any]) -> bool:
        """Create state record ``name`` only where none is (an exclusive create: ``O_EXCL`` on
        POSIX, a conditional PUT on S3); False when one is there. Of two callers at once,
        exactly one gets True."""
        return self._state_file(name).create(json.dumps(state, indent=2, sort_keys=True).encode("utf-8"))

    def state_names(self, prefix: str) -> list[str]:
        """The names of the state records starting with ``prefix``, sorted."""
        return [f.name[:-len(".json")] for f in self.location(STATE_DIR).files()
                if f.name.startswith(prefix) and f.name.endswith(".json")]

    def append_log(self, name: str, entry: dict[str, Any]) -> None:
        """One line of run log ``name``, stamped with when it was written. The log is replaced
        whole with the line added (object stores cannot append); one run writes it at a time."""
        path = self._state_file(name, ".jsonl")
        line = json.dumps({"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry})
        before = path.read_bytes() or b""
        if before and not before.endswith(b"\n"):
            before += b"\n"  # a torn last line (an older writer killed mid-append) is ended first
        path.write_bytes(before + line.encode("utf-8") + b"\n")

    def read_log(self, name: str) -> list[dict[str, Any]]:
        """Run log ``name``'s entries, oldest first; a torn line (a driver killed while writing
        it) is skipped with a warning."""
        path = self._state_file(name, ".jsonl")
        data = path.read_bytes()
        if data is None:
            return []
        entries = []
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is torn (a run killed while writing it); skipped", path, number)
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def model_path(self, name: str) -> Location:
        """Where model ``name`` is saved (its ``save`` and ``load`` take this location)."""
        return self.location(MODELS_DIR, name)

    def save_model(self, name: str, model: Any) -> None:
        """``model.save(location)`` at :meth:`model_path`; None removes a model saved before."""
        if model is None:
            self.model_path(name).delete_tree()
        else:
            model.save(self.model_path(name))

    def ledger_path(self, name: str) -> Location:
        """A folder of the LLM ledger (``<root>/_ledger/<name>``), written by executor tasks."""
        return self.location(LEDGER_DIR, name)

    # -- tables -------------------------------------------------------------------------------
    def apply(self, name: str, write: Write) -> int | None:
        """Perform ``write`` on table ``name``; the new version, or None when nothing was written
        (an append of no rows). With a catalog schema, the table is also a catalog table."""
        version = self._apply(name, write)
        if version is not None:
            self.register(name)
        return version

    def _apply(self, name: str, write: Write) -> int | None:
        if write.mode == "overwrite":
            if isinstance(write.rows, pa.Table):
                return self.overwrite_small(write.rows, name)
            return self.write(write.rows, name)
        if write.mode == "append":
            if write.count == 0:
                return None
            if not self.exists(name):
                return self.write(write.rows, name)
            target = self.read(name).schema
            aligned = write.rows.select(*[F.col(f"`{f.name}`").cast(f.dataType).alias(f.name)
                                          for f in target.fields])
            return self.write(aligned, name, mode="append")
        if write.mode == "merge":
            return self.merge(write.rows, name, write.keys, within=write.within, keep=write.keep)
        raise ValueError(f"unknown write mode {write.mode!r}")

    def restore(self, name: str, version: int) -> None:
        """Table ``name`` back to the content of ``version`` (Delta RESTORE: a new version)."""
        if self.version(name) == version:
            return
        if self._delta_rs_commits_safely():
            self._delta(name).restore(version)
        else:  # delta-spark's own RESTORE: its S3 log store is the one writing this table
            self.spark.sql(f"RESTORE TABLE delta.`{_quoted(self.path(name))}` TO VERSION AS OF {int(version)}")

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self._delta_uri(name), storage_options=self.root.delta_options())

    def version(self, name: str) -> int | None:
        """Latest committed version, or None when the table does not exist."""
        try:
            return self._delta(name).version()
        except TableNotFoundError:
            return None

    def count(self, name: str) -> int:
        """Row count from the Delta log's per-file statistics (no Spark job); Spark counts when a
        writer left the statistics out."""
        try:
            actions = pa.table(self._delta(name).get_add_actions(flatten=True))
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
            self._write_through_delta_rs(df, name, mode)
        return self.version(name)

    def read_small(self, name: str) -> pa.Table:
        """Table ``name``'s rows on the driver, read by delta-rs without a Spark job: only for a
        table of a few rows (the k centroids), never for row-scale data."""
        return self._delta(name).to_pyarrow_table()

    def overwrite_small(self, rows: pa.Table, name: str) -> int:
        """Replace table ``name`` by ``rows`` (a few rows the driver holds, in the table's schema,
        e.g. from :meth:`read_small`), whichever the engine: delta-rs writes and commits them
        itself, so no Spark job runs (Spark's overwrite of k rows costs seconds of planning and
        log work). On S3 without a locking option for delta-rs, Spark writes them. Returns the
        new version."""
        if not self._delta_rs_commits_safely():
            return self.write(self.spark.createDataFrame(rows), name)
        write_deltalake(self._delta_uri(name), rows, mode="overwrite", storage_options=self.root.delta_options())
        return self.version(name)

    def merge(self, source: DataFrame, name: str, keys: Sequence[str], within: DataFrame | None = None,
              keep: Sequence[str] = ()) -> int:
        """MERGE INTO table ``name`` from ``source``, keyed by ``keys`` (unique in ``source`` and in
        the table): a source row whose key matches no table row is inserted; a matched table row
        takes the source row's values where they differ, except the ``keep`` columns, which it
        keeps; a table row whose key is one of ``within``'s rows (a DataFrame of ``keys``) but
        not ``source``'s is deleted; every other table row stays. Keys match by equality, so a
        source row with a null key matches nothing and is inserted. Returns the new version: one
        per call, as Delta's MERGE commits one even when no row changes.

        delta-spark: Delta's MERGE INTO with ``source`` and the deletes (the ``within`` keys that
        ``source`` lacks: an anti-join of the two, the table is not read for it) as its source; Delta
        rewrites the files holding a matched or deleted row, as its MERGE does. delta-rs: Spark
        rewrites the files holding a changed or deleted row (their other rows as they are) plus
        the inserts, and delta-rs commits the new files and the removal of the old ones in one
        transaction (copy-on-write; only file names reach the driver)."""
        fields = self.read(name).schema.fields
        aligned = source.select(*[F.col(f"`{f.name}`").cast(f.dataType).alias(f.name) for f in fields])
        keys, keep = list(keys), list(keep)
        values = [f.name for f in fields if f.name not in keys and f.name not in keep]
        gone = (self.spark.createDataFrame([], aligned.select(*keys).schema) if within is None
                else within.select(*keys).join(aligned.select(*keys), keys, "left_anti").distinct())
        if self.engine == "delta-spark":
            self._merge_through_delta_spark(aligned, gone, name, keys, values)
        else:
            self._merge_through_delta_rs(aligned, gone, name, keys, values)
        return self.version(name)

    def _merge_through_delta_spark(self, aligned: DataFrame, gone: DataFrame, name: str, keys: list[str],
                                   values: list[str]) -> None:
        """Delta's MERGE INTO (in SQL: the SQL extension finds Delta's classes wherever the session
        loaded them); the deletes are rows of ``gone``'s keys marked ``_delete``."""
        rows = aligned.withColumn("_delete", F.lit(False)).unionByName(
            gone.withColumn("_delete", F.lit(True)), allowMissingColumns=True)
        view = f"_merge_source_{uuid.uuid4().hex}"
        rows.createOrReplaceTempView(view)
        listed = ", ".join(f"`{c}`" for c in aligned.columns)
        update = ""
        if values:
            same = " AND ".join(f"t.`{c}` <=> s.`{c}`" for c in values)
            update = (f"WHEN MATCHED AND NOT ({same}) THEN UPDATE SET "
                      + ", ".join(f"t.`{c}` = s.`{c}`" for c in values))
        target = _quoted(self.path(name))
        try:
            self.spark.sql(
                f"MERGE INTO delta.`{target}` AS t USING {view} AS s "
                f"ON {' AND '.join(f't.`{k}` = s.`{k}`' for k in keys)} "
                f"WHEN MATCHED AND s._delete THEN DELETE {update} "
                f"WHEN NOT MATCHED AND NOT s._delete THEN INSERT ({listed}) VALUES "
                f"({', '.join(f's.`{c}`' for c in aligned.columns)})")
        finally:
            self.spark.catalog.dropTempView(view)

    def _merge_through_delta_rs(self, aligned: DataFrame, gone: DataFrame, name: str, keys: list[str],
                                values: list[str]) -> None:
        """Copy-on-write: the files holding a row that changes or goes are rewritten with the
        inserts, and committed with their removal in one delta-rs transaction."""
        columns = aligned.columns
        old = self.read(name).select(*[F.col(f"`{c}`").alias(f"_t_{c}") for c in columns],
                                     F.col("_metadata.file_path").alias("_t_file"))
        gone = gone.select(*[F.col(f"`{k}`").alias(f"_t_{k}") for k in keys], F.lit(True).alias("_t_gone"))
        old = old.join(gone, [f"_t_{k}" for k in keys], "left")
        on = _all([F.col(f"`{k}`") == F.col(f"_t_{k}") for k in keys])
        joined = (aligned.withColumn("_s", F.lit(True)).join(old.withColumn("_t", F.lit(True)), on, "full_outer")
                  .persist(StorageLevel.MEMORY_AND_DISK))
        try:
            matched, removed = F.col("_s").isNotNull() & F.col("_t").isNotNull(), F.col("_t_gone").isNotNull()
            differs = F.lit(False) if not values else ~_all(
                [F.col(f"`{c}`").eqNullSafe(F.col(f"_t_{c}")) for c in values])
            touched = {row["_t_file"] for row in joined.filter((matched & differs) | removed)
                       .select("_t_file").distinct().collect()}
            # A touched file's new content: its rows that stay (a matched row with the source's
            # values, its kept columns as they were), plus every source row that matched nothing.
            def value(c: str) -> Column:  # the keys and kept columns: the table's, where it has the row
                from_table = F.col("_s").isNull() if c in values else F.col("_t").isNotNull()
                return F.when(from_table, F.col(f"_t_{c}")).otherwise(F.col(f"`{c}`")).alias(c)
            rewrite = joined.filter(F.col("_t").isNull() | (~removed & F.col("_t_file").isin(sorted(touched)))
                                    ).select(*[value(c) for c in columns])
            self._write_through_delta_rs(rewrite, name, "append",
                                         self._remove_actions(name, touched))
        finally:
            joined.unpersist()

    def _remove_actions(self, name: str, file_uris: set[str]) -> list[RemoveAction]:
        """Remove actions for the table's files that Spark named by URI (``_metadata.file_path``),
        matched by their path below the table's folder."""
        table = unquote(urlparse(self.path(name)).path).rstrip("/") + "/"
        wanted = {unquote(urlparse(uri).path).removeprefix(table) for uri in file_uris}
        now = int(time.time() * 1000)
        actions = pa.table(self._delta(name).get_add_actions(flatten=True)).to_pylist()
        removes = [RemoveAction(a["path"], True, now, a["size_bytes"]) for a in actions
                   if unquote(a["path"]) in wanted]
        if len(removes) != len(wanted):
            raise TableWriteError(f"{table}: {len(wanted) - len(removes)} file(s) to rewrite are not in the table")
        return removes

    def _write_through_delta_rs(self, df: DataFrame, name: str, mode: Mode,
                                removes: Sequence[RemoveAction] = ()) -> None:
        """Spark writes Parquet into ``<table>/<write id>/``; delta-rs commits exactly those files
        (with ``removes``, in the same append transaction). Overwrite removes the old files
        logically (remove actions) and replaces the schema."""
        write_id = uuid.uuid4().hex
        target, folder = self._delta_uri(name), self.location(name, write_id)
        options = self.root.delta_options()
        written = Observation()
        try:
            df.observe(written, F.count(F.lit(1)).alias("rows")).write.parquet(folder.uri)
            rows = int(written.get["rows"])
            actions = self._add_actions(folder, write_id, rows)
            schema = Schema.from_json(df.schema.json())  # Delta's schema is Spark's, nullability and all
            if DeltaTable.is_deltatable(target, storage_options=options):
                DeltaTable(target, storage_options=options).create_write_transaction(
                    [*actions, *removes], mode, schema)
            else:
                create_table_with_add_actions(target, schema, actions, mode="error", storage_options=options)
        except BaseException:
            folder.delete_tree()  # uncommitted files: nobody references them
            raise

    def _add_actions(self, folder: Location, write_id: str, rows: int) -> list[AddAction]:
        """Add actions for the Parquet files Spark wrote into ``folder``, with delta-rs's own
        statistics from their footers; fails unless they hold every row Spark wrote."""
        seen = [f for f in folder.files() if f.name.endswith(".parquet")]
        if not seen:
            adds = []
        else:  # delta-rs reads the footers (in Rust, not the rows) and logs stats as its writer does
            convert_to_deltalake(folder.delta_uri, storage_options=folder.delta_options())
            log = (folder / FIRST_COMMIT).read_bytes() or b""
            adds = [a["add"] for a in map(json.loads, log.decode("utf-8").splitlines()) if "add" in a]
            (folder / "_delta_log").delete_tree()
        found = sum(json.loads(a["stats"])["numRecords"] for a in adds)
        if found != rows:
            raise TableWriteError(
                f"Spark wrote {rows} rows to {folder}, but the driver sees {len(seen)} files holding "
                f"{found}; nothing was committed. output.root ({self.root}) must be storage that the "
                "driver and every executor share (HDFS, an object store, a shared mount).")
        return [AddAction(f"{write_id}/{a['path']}", a["size"], {}, a["modificationTime"], True, a["stats"])
                for a in adds]

    def read(self, name: str, version: int | None = None) -> DataFrame:
        """Table ``name`` as a DataFrame, at ``version`` when given (time travel), else current.

        The table's live Parquet files at that version are listed from the Delta log (through
        delta-rs) and read straight whenever its reader protocol is 1 (no deletion vectors, no
        column mapping: those files are exactly its rows; the session's table defaults keep it
        so) and it has no partition columns (their values live in the log, not the files).
        Delta's own reader plans each read with Spark jobs that rebuild the table's snapshot
        after every commit, several times the cost of reading its files, and a pipeline reads a
        table right after writing it all the time. Other tables go through Delta's reader."""
        target = self.path(name)
        if not self.exists(name):
            raise FileNotFoundError(f"no Delta table {name!r} at {target}")
        table = self._delta(name, version)
        if self.engine == "delta-spark" and (table.protocol().min_reader_version > 1
                                             or table.metadata().partition_columns):
            reader = self.spark.read.format("delta")
            return (reader if version is None else reader.option("versionAsOf", version)).load(target)
        return self._read_files(table, table.file_uris())

    def read_added(self, name: str, since: int) -> DataFrame:
        """The rows appended to table ``name`` after version ``since``: the data files added
        since, read straight (no join against the older rows). Only for a table that was only
        appended to in between; a file removed since fails."""
        now, then = self._delta(name), self._delta(name, since)
        live, before = set(now.file_uris()), set(then.file_uris())
        if not before <= live:
            raise ValueError(f"table {name!r} lost files since version {since}: not an append")
        return self._read_files(now, sorted(live - before))

    def _read_files(self, table: DeltaTable, files: list[str]) -> DataFrame:
        """``files`` of ``table`` read as Parquet with the table's schema."""
        # delta-rs hands back an arro3 schema; pyarrow takes it through the C data interface.
        schema = from_arrow_schema(pa.schema(table.schema().to_arrow()))
        if not files:
            return self.spark.createDataFrame([], schema)
        return self.spark.read.schema(schema).parquet(*map(qualify, files))  # delta-rs lists local files bare

    def history(self, name: str) -> list[dict]:
        """Commit history, newest first (small: one entry per version)."""
        return self._delta(name).history()


def _check_reachable_by_server(spark: SparkSession, root: Location) -> None:
    """Under Spark Connect the server's executors write the tables and this process reads their
    logs and writes the state beside them: both sides must reach the same ``root``. The server
    writes a probe there and this process looks for it (a local folder is shared only with a
    server on this machine, or where both mount the same volume)."""
    if not is_connect(spark):
        return
    probe = root / STATE_DIR / f"_probe-{uuid.uuid4().hex}"
    spark.createDataFrame([("probe",)], "value string").coalesce(1).write.text(probe.uri)
    if probe.exists():
        probe.delete_tree()
        return
    raise StorageError(f"output.root {root}: the Spark Connect server ({connect_server_host(spark)}) wrote a "
                       "file there that this process cannot see, so its tables would be written where the "
                       "run's state is not. Put the run root on storage both reach (s3a://, abfss://, gs://, "
                       "hdfs://, a volume both mount at the same path)")


def _sql_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _quoted(uri: str) -> str:
    """``uri`` inside SQL backticks."""
    return uri.replace("`", "``")


def _configure_s3a(spark: SparkSession, storage: Storage) -> None:
    """s3a's endpoint and region from ``storage.*`` / the environment, where the session has
    none of its own (a user's session keeps what it set; credentials are s3a's own chain)."""
    for key, value in storage.hadoop_conf().items():
        if not spark.conf.get(key, None) and not spark.conf.get(f"spark.hadoop.{key}", None):
            spark.conf.set(key, value)


def _all(conditions: list[Column]) -> Column:
    result = conditions[0]
    for condition in conditions[1:]:
        result = result & condition
    return result
