"""Incremental runs: new input rows join a curated run root without recomputing it.

``mergeit run --incremental`` (``Pipeline.run_incremental``) against a run root whose stages are
all done and current. The rules, step by step:

1. **Which rows are new.** Each input of ``input.paths`` whose ``source`` is not yet in
   ``input_files`` is read (the usual ingest: same parser, reason codes, unit counts). An input
   already listed there with the same ``bytes`` is not read again; a file whose size changed
   stops the run (``IncrementalError``): batches arrive as new files (or a new folder of files),
   and a file rewritten in place needs a full run. A Delta source table records the version read
   (``input_files.version``); when it has gained versions since, only the data files added after
   that version are read (their rows numbered on after the rows read before), and the current
   version is recorded; a file of the version read that is gone now (a delete, update or
   compaction rather than an append) stops the run. Of the new inputs, a parsed
   row whose content id is already in ``records`` (or earlier in the new inputs) is an
   ``exact_duplicate`` reject with ``detail`` = that id, exactly as in a full run; bad rows are
   rejects with their reason codes. ``input_files`` gains one row per new input with this run's
   ``run_id``, so ``sum(input_files.units) == records + rejects`` still holds over every row ever
   ingested (checked before anything is written, and again by finalize).
2. **Embed** only the new records; append to ``embeddings``.
3. **Topics**: the saved topic model (``<root>/_models/topics``) assigns the new rows, no refit;
   ``topics`` gains their rows; ``centroids`` keeps the fitted centres and statistics, its
   ``size`` grows by the new rows of each cluster. **Drift**: the share of new rows
   whose distance to their (nearest) centre exceeds that cluster's ``incremental.drift_quantile``
   of the fitted rows' distances (``centroids.distance_quantiles``). With no drift that share is
   about ``1 - drift_quantile``; above ``incremental.drift_alarm_share`` the run logs a warning
   that a full re-cluster is advised (``mergeit run --incremental --recluster`` does it: the new
   rows are ingested and embedded, then topics and every stage below rerun in full).
4. **Dedup** (same threshold, same space): each new row is compared with the kept rows of its
   own cluster and, when ``dedup.cross_cluster``, of its ``dedup.cross_cluster_neighbours``
   nearest other clusters (by ``centroids.embedding_center``); at or above the threshold it is a
   duplicate of the most similar of them. Kept rows stay kept (an earlier decision is never
   revisited), so the existing kept rows win over new ones. The new rows left are deduplicated
   among themselves per cluster by the full run's keep rule (nearest to the centre first).
5. **Selection**: the existing selection stays; each cluster with new kept rows is extended by
   lazy greedy facility location whose gains count the existing selection (the same objective
   over all the cluster's kept rows, old and new). Budget rule: a cluster keeps its selection
   rate, and never falls under the budget: ``target = min(kept, max(budget, ceil(selected_before
   x kept / kept_before)))`` (``kept`` after the increment); a cluster kept whole stays whole.
   New picks continue ``rank`` after the existing ones.
6. **Group and merge**: the selected rows not in any existing group, in the clusters that gained
   selected rows, are grouped by the group stage's rule; only groups holding at least one new
   row are kept, appended to ``merge_groups`` and sent to the LLM. Merges paid before stay (the
   merge ledger answers any group already recorded without a request). The pass is one line of
   ``_ledger/merge_runs.jsonl`` (with ``incremental_run``), like a full run's merge stage.
7. **Finalize**: ``final`` and ``lineage`` are brought up to date by MERGE INTO
   (``TableStore.merge``; Delta's MERGE on delta-spark, copy-on-write of the touched files
   committed by delta-rs otherwise), one new version per table. Only the rows an increment can
   change are computed: the finalize stage's rows for the new records and the members of the
   new groups (no other record's fate can move: see ``finalize_scope``), the new rejects, and
   the new groups with their merges; they go to the MERGE as its source as they are (no model
   or LLM work, no diff against the tables first). Both tables are keyed by record ``id``: a
   scope record's row is inserted, or updated where it changed; a ``final`` row of a scope
   record that left the set (a new merge absorbed it) is deleted; a reject's row (no id) is
   inserted. ``lineage.run_id`` says in which run each row arrived: a row already in lineage
   keeps its run, every other row gets this increment's. The ledger check runs as in a full run.
8. **Idempotent**: when no input is new, nothing is read, written or requested.

Each touched table gets exactly one new version per increment (an append; centroids an
overwrite of its k rows, committed by delta-rs from the driver; final and lineage a merge).
Steps 4 to 6 are one step (``curate``): after the new rows are compared with the kept rows (one
pass, routed by cluster), ONE pass per touched cluster deduplicates its unmatched new rows among
themselves, extends its selection and groups its free selected rows (``CurateCluster``), and the
new ``dedup``, ``selected`` and ``merge_groups`` rows come from that one cached result: each of
the three was a round of Spark jobs over the same clusters' kept rows before. Writes to different
tables in one step go at once (ingest's three tables; topics and centroids; dedup, selected and
merge_groups; final and lineage): each one's driver-side Delta work overlaps the other's tasks.
Ingest's appends run while the embed step embeds the new records from memory, the topics
step's while the curate step takes the assigned rows from memory, the curate step's while the
merge step runs, and the merge step's while finalize's MERGEs run, which take the new merges
from memory (``Writes``); each is waited for before a step that reads its table. The curate and
merge steps share one cached copy of ``embeddings``. Afterwards every stage's state
records the new versions, so ``mergeit status`` shows the run current and a plain ``mergeit
run`` with the same settings recomputes nothing.

Crash safety: before writing, the run records the version of every table and every stage state
in ``<root>/_state/incremental.json``. A run that finds that file unfinished restores each table
to its recorded version (Delta RESTORE through delta-rs, a new version with that content) and
the states (pointed at the restored versions), then starts over; merges already paid come back
from the ledger without a request.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from pyspark import InheritableThread, StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from .ids import group_id
from .stages import StageContext
from .stages.dedup import (DEDUP_SCHEMA, DUPLICATE, KEPT, ROUTED_SCHEMA, RouteProbes, broadcast_centers,
                           embedding_matrix, keep_order, leader_dedup, matches_per_cluster)
from .stages.finalize import build_lineage_and_final
from .stages.group import group_cluster, merge_groups_schema
from .stages.ingest import (RECORD_SCHEMA, IngestCountError, frame_inputs, input_files_table, new_run_id,
                            parse_outcomes, reading_inputs)
from .stages.select import SELECTED_SCHEMA, extend_facility_location
from .stages.topics import DISTANCE_QUANTILES, assign_to_topics, load_topic_model
from .tables import TableStore

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger("mergeit.incremental")

MARKER = "incremental.json"  # under <root>/_state
# Every table an increment may write, in the order the steps write them.
TOUCHED = ("records", "rejects", "input_files", "embeddings", "topics", "centroids", "dedup", "selected",
           "merge_groups", "merges", "final", "lineage")
STAGES_BEFORE_FINALIZE = ("ingest", "embed", "topics", "dedup", "select", "group", "merge")

Result = TypeVar("Result")


class IncrementalError(RuntimeError):
    """An increment cannot run: no finished run to extend, a changed input, a count mismatch."""


@dataclass
class Increment:
    """What one incremental run did (small, JSON-ready through ``as_dict``)."""

    run_id: str
    new_inputs: list[str]
    counts: dict[str, int]
    drift: dict[str, Any]
    merge: dict[str, Any]
    seconds: dict[str, float]
    recluster: bool = False
    jobs: dict[str, int] | None = None  # Spark jobs per step (for profiling)

    @property
    def changed(self) -> bool:
        return bool(self.new_inputs)

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "new_inputs": self.new_inputs, "counts": self.counts,
                "drift": self.drift, "merge": self.merge, "seconds": self.seconds,
                "recluster": self.recluster, "jobs": self.jobs}


# ------------------------------------------------------------------------------------------
# Step 1: which rows are new
# ------------------------------------------------------------------------------------------

def new_inputs(store: TableStore, files: list) -> list:
    """The inputs to read: those not yet in ``input_files``, and for a Delta source table that
    gained versions since it was read, its data files added since (:func:`grown_delta_source`).
    Fails on any other input whose size changed since."""
    from .inputs import input_bytes
    table = store.read_small("input_files")  # a row per input read (or per version read): small
    if "version" not in table.column_names:
        table = table.append_column("version", pa.nulls(table.num_rows, pa.int64()))
    seen = {row["source"]: {"bytes": row["bytes_sum"], "framed": row["framed_sum"], "version": row["version_max"]}
            for row in table.group_by("source").aggregate(
                [("bytes", "sum"), ("framed", "sum"), ("version", "max")]).to_pylist()}
    fresh = []
    for item in files:
        if item.path not in seen:
            fresh.append(item)
            continue
        before, now = int(seen[item.path]["bytes"]), input_bytes(item)
        if now == before:
            continue
        if item.format == "delta" and seen[item.path]["version"] is not None:
            fresh.append(grown_delta_source(item, int(seen[item.path]["version"]), int(seen[item.path]["framed"])))
            continue
        raise IncrementalError(
            f"input {item.path} changed since it was ingested ({before} -> {now} bytes): an increment "
            "takes new files or rows appended to a Delta table; run a full run (mergeit run --force ingest)")
    return fresh


def grown_delta_source(item, read_version: int, rows_read: int):
    """A Delta source table read at ``read_version`` that has newer versions: the input of its
    data files added since (up to the current version), rows numbered on after the ``rows_read``.
    Only appends qualify: a file live at ``read_version`` that is gone now (a delete, update,
    merge or compaction) fails the run, which then needs a full run."""
    from .inputs import InputFile
    current = DeltaTable(item.path)
    then = set(pa.table(DeltaTable(item.path, version=read_version).get_add_actions(flatten=True))
               .column("path").to_pylist())
    now = set(pa.table(current.get_add_actions(flatten=True)).column("path").to_pylist())
    if not then <= now:
        raise IncrementalError(
            f"Delta source {item.path}: {len(then - now)} data file(s) read at version {read_version} are "
            f"gone at version {current.version()} (rows deleted or rewritten, not only appended); "
            "run a full run (mergeit run --force ingest)")
    return InputFile(item.path, "delta", version=current.version(), after_version=read_version, row_offset=rows_read)


def split_against(outcomes: DataFrame, existing_ids: DataFrame,
                  partitions: int | None = None) -> tuple[DataFrame, DataFrame]:
    """(new records, new rejects) of ``outcomes``: ingest's rule (the first of each content id is
    the record), with every id already in ``existing_ids`` an ``exact_duplicate`` as well. With
    ``partitions``, the rule's shuffle by id spreads the rows over that many partitions (content
    ids are hashes: about equal shares), so the new records come out ready to embed, one task
    per core, without a second shuffle."""
    parsed = outcomes.filter(F.col("reason").isNull())
    if partitions:
        parsed = parsed.repartition(partitions, "id")
    first = Window.partitionBy("id").orderBy("file_index", "line", "row", "sub")
    ranked = (parsed.withColumn("_rank", F.row_number().over(first))
              .join(existing_ids.select("id", F.lit(True).alias("_known")), "id", "left"))
    is_record = (F.col("_rank") == 1) & F.col("_known").isNull()
    records = ranked.filter(is_record).select(
        *[F.col(f.name).cast(f.dataType).alias(f.name) for f in RECORD_SCHEMA.fields])
    duplicates = ranked.filter(~is_record).select(
        "source", "line", "row", "raw", F.lit("exact_duplicate").alias("reason"), F.col("id").alias("detail"))
    rejects = outcomes.filter(F.col("reason").isNotNull()).select(
        "source", "line", "row", "raw", "reason", "detail").unionByName(duplicates)
    return records, rejects


def ingest_increment(ctx: StageContext, files: list, run_id: str, records_version: int,
                     writes: "Writes") -> tuple[dict[str, int], DataFrame]:
    """Parse the new inputs; their records, rejects and input_files rows are appended through
    ``writes`` (in the background: the caller's next step need not wait for them); the counts
    must balance before anything is written. Returns the counts and the new records (cached: the
    embed step reads them from memory). ``records`` is read at ``records_version``: a read that
    is not pinned would see the records this step appends and call them duplicates."""
    from .inputs import pinned
    from .parsing import ParseLimits
    settings = ctx.settings.ingest
    limits = ParseLimits.from_settings(settings, settings.reject_raw_chars)
    files = [pinned(item) for item in files]  # a new Delta source: one version for every read
    framing = frame_inputs(ctx.spark, files, limits)  # counted once, for the parse and the count
    outcomes = parse_outcomes(ctx.spark, files, limits, framing).persist(StorageLevel.MEMORY_AND_DISK)
    # Counted, then appended: the split (a window and a join against records) runs once. The
    # three cached results are released once their appends are done (``writes``).
    from .stages.embed import embed_partitions
    records, rejects = split_against(outcomes, ctx.store.read("records", version=records_version),
                                     embed_partitions(ctx.settings.embed, ctx.spark))
    input_rows = input_files_table(ctx.spark, files, limits, outcomes, run_id, framing)
    cached = tuple(df.persist(StorageLevel.MEMORY_AND_DISK) for df in (records, rejects, input_rows))
    records, rejects, input_rows = cached
    try:
        with reading_inputs(files):   # a file broken or gone while parsed: an error naming it
            counts = {"new_records": records.count(), "new_rejects": rejects.count(),
                      "new_input_rows": int(input_rows.agg(F.sum("units")).first()[0] or 0)}
    finally:
        outcomes.unpersist()  # the three are cached whole now (or the step failed)
    if counts["new_records"] + counts["new_rejects"] != counts["new_input_rows"]:
        raise IngestCountError(f"new inputs: records {counts['new_records']} + rejects "
                               f"{counts['new_rejects']} != {counts['new_input_rows']} input units")
    writes.start(partial(append, ctx.store, records, "records", counts["new_records"]),
                 partial(append, ctx.store, rejects, "rejects", counts["new_rejects"]),
                 partial(append, ctx.store, input_rows, "input_files", len(files)), release=cached)
    return counts, records


# ------------------------------------------------------------------------------------------
# Table helpers
# ------------------------------------------------------------------------------------------

def append(store: TableStore, df: DataFrame, table: str, rows: int | None = None) -> int | None:
    """Append ``df`` to ``table`` in the table's own column order and types; nothing (no new
    version) when ``rows`` says it is empty. Returns the new version or None."""
    if rows == 0:
        return None
    target = store.read(table).schema
    aligned = df.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in target.fields])
    return store.write(aligned, table, mode="append")


class _Call:
    """``call()`` on its own thread, which carries the session's local properties (job group,
    scheduler pool); :meth:`result` waits for it, then returns its value or raises its error."""

    def __init__(self, call: Callable[[], Result]) -> None:
        self._call, self._value, self._error = call, None, None
        self._thread = InheritableThread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as error:  # noqa: BLE001 - handed over by result()
            self._error = error

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Result:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def concurrently(*calls: Callable[[], Result]) -> list[Result]:
    """The results of ``calls``, run at once: independent writes (each to its own table)
    overlap, so one's driver-side work (planning, Delta's log and commit) runs while the other's
    tasks hold the cores. Every call runs to its end; then the first failure, if any, is raised
    (the increment's marker rolls back what was written)."""
    writes = Writes()
    writes.start(*calls)
    return writes.wait()


class Writes:
    """Table writes that run in the background while the increment's next step computes (their
    driver-side Delta work, planning, log and commit, overlaps that step's tasks). ``wait``
    joins them all: every write runs to its end, then the first failure is raised (the marker
    rolls back what was written). The cached rows they write are released once they are done,
    rather than held in memory until the run ends."""

    def __init__(self) -> None:
        self._running: list[_Call] = []
        self._cached: list[DataFrame] = []

    def start(self, *calls: Callable[[], Any], release: tuple[DataFrame, ...] = ()) -> None:
        """Run ``calls`` in the background; unpersist ``release`` once they (and every write
        started before) are done."""
        self._running += [_Call(call) for call in calls]
        self._cached += release

    def wait(self) -> list[Any]:
        running = self.join()
        return [call.result() for call in running]

    def join(self) -> list[_Call]:
        """Wait for every write started and release their cached rows; their failures are left
        to :meth:`wait`."""
        running, self._running = self._running, []
        for call in running:
            call.join()
        cached, self._cached = self._cached, []
        for df in cached:
            df.unpersist()
        return running


def added_rows(store: TableStore, table: str, before: int | None) -> DataFrame:
    """Rows of ``table`` now that were not in it at version ``before``: an increment only appends
    to the tables it reads this way, so these are the files added since (no join)."""
    if before is None:
        return store.read(table)
    return store.read_added(table, before)


# ------------------------------------------------------------------------------------------
# Step 3: topics and drift
# ------------------------------------------------------------------------------------------

def arrivals_by_cluster(assigned: DataFrame, centroids: DataFrame, quantile: float) -> dict[int, tuple[int, int]]:
    """Per cluster: how many ``assigned`` rows (id, cluster, distance) it gained, and how many of
    them lie beyond its ``quantile`` of the fitted rows' distances (one aggregate; k rows to the
    driver)."""
    slot = DISTANCE_QUANTILES.index(quantile) + 1
    bounds = centroids.select("cluster", F.element_at("distance_quantiles", slot).alias("bound"))
    rows = (assigned.join(F.broadcast(bounds), "cluster", "left").groupBy("cluster")
            .agg(F.count(F.lit(1)).alias("rows"),
                 F.sum(F.when(F.col("distance") > F.coalesce("bound", F.lit(0.0)), 1).otherwise(0)).alias("far"))
            .collect())
    return {int(r["cluster"]): (int(r["rows"]), int(r["far"] or 0)) for r in rows}


def drift_of(arrivals: dict[int, tuple[int, int]], quantile: float) -> dict[str, Any]:
    """The share of new rows beyond their cluster's ``quantile`` (``arrivals_by_cluster``)."""
    rows = sum(n for n, _ in arrivals.values())
    far = sum(f for _, f in arrivals.values())
    return {"rows": rows, "far": far, "quantile": quantile, "share": far / rows if rows else 0.0,
            "expected_share": round(1.0 - quantile, 6)}


# ------------------------------------------------------------------------------------------
# Steps 4-6: dedup, selection and groups of the new rows
# ------------------------------------------------------------------------------------------

def selection_target(budget: int, kept: int, kept_before: int, selected_before: int) -> int:
    """The cluster's selection size after an increment (module doc, step 5)."""
    if kept_before <= 0:
        return min(kept, budget)
    return min(kept, max(budget, math.ceil(selected_before * kept / kept_before)))


# The schemas of the three tables one pass over a cluster adds to, by table.
CURATED_TABLES = {"dedup": DEDUP_SCHEMA, "selected": SELECTED_SCHEMA,
                  "merge_groups": merge_groups_schema(T.IntegerType())}
CURATED_COLUMNS = {table: schema.fieldNames() for table, schema in CURATED_TABLES.items()}


def _curated_schema() -> T.StructType:
    """One row per table row: ``table`` says which, and every column of the three tables (the
    same name, the same type: ``similarity`` is the dedup row's match similarity or the group's
    mean pairwise similarity), null where the table has none; ``cluster`` always set."""
    fields: dict[str, T.StructField] = {}
    for schema in CURATED_TABLES.values():
        for field in schema.fields:
            if fields.setdefault(field.name, field).dataType != field.dataType:
                raise TypeError(f"column {field.name} has two types in the curated tables")
    return T.StructType([T.StructField("table", T.StringType(), False)] + [
        T.StructField(f.name, f.dataType, f.name != "cluster") for f in fields.values()])


CURATED_SCHEMA = _curated_schema()
_OBJECT_COLUMNS = [f.name for f in CURATED_SCHEMA.fields
                   if isinstance(f.dataType, (T.StringType, T.ArrayType)) and f.name != "table"]


@dataclass(frozen=True)
class CurateCluster:
    """One cluster's rows → its new ``dedup``, ``selected`` and ``merge_groups`` rows
    (``CURATED_SCHEMA``): steps 4, 5 and 6 of the module doc in one pass, each step's output the
    next one's input, the cluster's vectors decoded once. The rows, by ``role``: ``kept``, the
    cluster's kept rows (``rank``: their selection rank or NaN; ``grouped``: a group holds
    them); ``new``, its new rows (with their centroid ``distance``); ``match``, for a new row of
    the cluster (``id``), its most similar kept row at or above the threshold in one cluster it
    was compared with (``target_id``, ``similarity``; no embedding)."""

    dedup_threshold: float
    dedup_block_size: int
    budget: int
    select_block_size: int
    group_threshold: float
    group_size: int

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        cluster = int(frame["cluster"].iloc[0])
        matches = frame[frame["role"] == "match"]
        # A new row's best match over the clusters it was compared with; ties: the smaller id.
        best = (matches.sort_values(["similarity", "target_id"], ascending=[False, True], kind="stable")
                .drop_duplicates("id"))
        duplicates = pd.DataFrame({"table": "dedup", "id": best["id"], "cluster": cluster, "status": DUPLICATE,
                                   "duplicate_of": best["target_id"], "similarity": best["similarity"]})
        frame = frame[(frame["role"] == "kept") | ((frame["role"] == "new") & ~frame["id"].isin(best["id"]))]
        if not (frame["role"] == "new").any():
            return _curated([duplicates])
        # id order: the extension breaks ties by position, so by id, as the select stage does.
        frame = frame.sort_values("id", kind="stable").reset_index(drop=True)
        ids = frame["id"].to_numpy(dtype=object)
        vectors = embedding_matrix(frame["embedding"])
        is_new = (frame["role"] == "new").to_numpy(dtype=bool)
        new = np.flatnonzero(is_new)
        order = new[keep_order(frame["distance"].to_numpy(dtype=np.float64)[new], ids[new])]
        kept, target, similarity = leader_dedup(vectors[order], self.dedup_threshold, self.dedup_block_size)
        dedup = pd.DataFrame({
            "table": "dedup", "id": ids[order], "cluster": cluster, "status": np.where(kept, KEPT, DUPLICATE),
            "duplicate_of": np.where(kept, None, ids[order][np.maximum(target, 0)]), "similarity": similarity})
        rows = np.sort(np.concatenate([np.flatnonzero(~is_new), order[kept]]))  # kept rows, id order
        ranks = frame["rank"].to_numpy(dtype=np.float64)[rows]  # NaN: not selected
        picks, gains, start = self._extend(vectors[rows], ranks, is_new[rows])
        picked = rows[picks]
        selected = pd.DataFrame({"table": "selected", "id": ids[picked], "cluster": cluster,
                                 "rank": np.arange(start, start + len(picks)), "gain": gains})
        groups = self._groups(frame, ids, vectors, picked, is_new, cluster) if len(picked) else []
        return _curated([duplicates, dedup, selected,
                         pd.DataFrame(groups, columns=["table", *CURATED_COLUMNS["merge_groups"]])])

    def _extend(self, vectors: np.ndarray, ranks: np.ndarray, is_new: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, int]:
        """Step 5 over the cluster's kept rows: (positions picked, gains, first new rank)."""
        old_selected = np.flatnonzero(~np.isnan(ranks))
        chosen = old_selected[np.argsort(ranks[old_selected], kind="stable")]
        target = selection_target(self.budget, len(ranks), int((~is_new).sum()), len(chosen))
        picks, gains = extend_facility_location(vectors, chosen, np.flatnonzero(is_new), target - len(chosen),
                                                self.select_block_size)
        return picks, gains, int(np.nanmax(ranks)) + 1 if len(chosen) else 0

    def _groups(self, frame: pd.DataFrame, ids: np.ndarray, vectors: np.ndarray, picked: np.ndarray,
                is_new: np.ndarray, cluster: int) -> list[tuple]:
        """Step 6: the group stage's rule over the cluster's selected rows in no group yet (the
        old ones and the new picks); the groups holding a new row. A group found here cannot be
        one recorded before: every member of those is in a group already."""
        free = np.flatnonzero(~np.isnan(frame["rank"].to_numpy(dtype=np.float64))
                              & ~frame["grouped"].eq(True).to_numpy())
        free = np.union1d(free, picked)
        new_ids = set(ids[is_new])
        found = group_cluster(ids[free].tolist(), vectors[free], self.group_threshold, self.group_size)
        return [("merge_groups", group_id(members), cluster, members, similarity)
                for members, similarity in found if new_ids.intersection(members)]


def _curated(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """``parts`` (each some of ``CURATED_SCHEMA``'s columns) as one frame in its columns."""
    out = pd.concat(parts, ignore_index=True).reindex(columns=CURATED_SCHEMA.fieldNames())
    # The other tables' columns are NaN after the concat; Arrow takes None as null in a string
    # or array column, not NaN.
    for column in _OBJECT_COLUMNS:
        out[column] = out[column].astype(object).where(out[column].notna(), None)
    return out


def curate_new_rows(new_topics: DataFrame, embeddings: DataFrame, tables: dict[str, DataFrame],
                    settings) -> DataFrame:
    """The ``dedup``, ``selected`` and ``merge_groups`` rows an increment adds (``CURATED_SCHEMA``)
    for ``new_topics`` (id, cluster, distance): steps 4 to 6 of the module doc. ``tables``: the
    ``dedup``, ``selected``, ``merge_groups`` and ``centroids`` tables before the increment.
    Two passes: the new rows routed to their own and neighbouring clusters meet those clusters'
    kept rows (each new row's best match per cluster), then one pass per cluster with new rows
    (:class:`CurateCluster`) takes its new rows, their matches and its kept rows."""
    vectors = embeddings.select("id", "embedding")
    # Three consumers (the probes, their home clusters, the pass): cached, joined once.
    new = new_topics.select("id", "cluster", "distance").join(vectors, "id").persist()
    kept = tables["dedup"].filter(F.col("status") == KEPT).select("id", "cluster")
    dedup = settings.dedup
    neighbours = dedup.cross_cluster_neighbours if dedup.cross_cluster else 0
    probes = new.select("id", "cluster", "embedding").mapInArrow(
        RouteProbes(broadcast_centers(tables["centroids"]), neighbours, home=True), ROUTED_SCHEMA)
    matches = (matches_per_cluster(probes, kept.withColumnRenamed("cluster", "target_cluster").join(vectors, "id"),
                                   dedup.threshold, dedup.block_size)
               .join(F.broadcast(new.select(F.col("id").alias("probe_id"), "cluster")), "probe_id")
               .select(F.col("probe_id").alias("id"), "cluster", F.lit("match").alias("role"),
                       F.col("target_id"), F.col("match_similarity").alias("similarity")))
    grouped = tables["merge_groups"].select(F.explode("member_ids").alias("id"), F.lit(True).alias("grouped"))
    old = (kept.join(new_topics.select("cluster").distinct(), "cluster", "left_semi")
           .join(tables["selected"].select("id", F.col("rank").cast("double")), "id", "left")
           .join(grouped, "id", "left")
           .join(vectors, "id")
           .select("id", "cluster", F.lit("kept").alias("role"), "embedding", "rank",
                   F.coalesce("grouped", F.lit(False)).alias("grouped")))
    rows = (new.select("id", "cluster", F.lit("new").alias("role"), "embedding", F.col("distance").cast("double"))
            .unionByName(old, allowMissingColumns=True).unionByName(matches, allowMissingColumns=True))
    curate = CurateCluster(dedup.threshold, dedup.block_size, settings.select.budget,
                           settings.select.block_size, settings.group.threshold, settings.group.size)
    return rows.groupBy("cluster").applyInPandas(lambda frame: curate(frame), CURATED_SCHEMA)


def curated_rows(curated: DataFrame, table: str) -> DataFrame:
    """``table``'s rows of ``curate_new_rows``' output, in its columns."""
    return curated.filter(F.col("table") == table).select(*CURATED_COLUMNS[table])


def merge_new_groups(ctx: StageContext, groups: DataFrame, records: DataFrame,
                     embeddings: DataFrame) -> tuple[dict[str, Any], DataFrame]:
    """The merge stage's request pass over ``groups`` only: its summary, and its rows in the
    columns of ``merges`` (cached until the run's end: the caller appends them, and finalize
    takes the new merges from memory rather than from the table)."""
    from .stages.merge import LEDGER_DIR, MERGES_SCHEMA, build_jobs, request_pass, summarise
    ledger_root = str(Path(ctx.store.root) / LEDGER_DIR)
    jobs = build_jobs(groups, records, embeddings, ctx.settings.llm)
    passed, partitions = request_pass(jobs, ctx.settings, ledger_root)
    passed = passed.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        summary = summarise(passed, partitions)
    except BaseException:
        passed.unpersist()
        raise
    return summary.as_dict(), passed.select(*[F.col(f.name) for f in MERGES_SCHEMA.fields])


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

class _Timer:
    """Seconds and Spark jobs per step (steps run one after another: the jobs since the last step
    are this step's). Job ids come from the status tracker (``spark.ui.retainedJobs`` recent)."""

    def __init__(self, spark) -> None:
        self.tracker = spark.sparkContext.statusTracker()
        self.seconds: dict[str, float] = {}
        self.jobs: dict[str, int] = {}
        self._seen = self._job_ids()

    def _job_ids(self) -> set[int]:
        return set(self.tracker.getJobIdsForGroup())

    def step(self, name: str, started: float) -> None:
        self.seconds[name] = round(time.monotonic() - started, 3)
        now = self._job_ids()
        self.jobs[name] = len(now - self._seen)
        self._seen = now


def _marker_path(pipeline: "Pipeline") -> Path:
    return pipeline.root / "_state" / MARKER


def _write_marker(pipeline: "Pipeline", marker: dict[str, Any]) -> None:
    path = _marker_path(pipeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=2, sort_keys=True))
    tmp.replace(path)


def roll_back_unfinished(pipeline: "Pipeline") -> bool:
    """Undo an increment that did not finish: each table back to its version before it (Delta
    RESTORE, a new version with that content), every stage state as it was, pointed at the
    restored versions. True when there was one."""
    path = _marker_path(pipeline)
    if not path.is_file():
        return False
    marker = json.loads(path.read_text())
    if marker.get("status") != "running":
        return False
    log.warning("incremental run %s did not finish: restoring the tables and state before it", marker["run_id"])
    for table, version in marker["versions"].items():
        if version is not None and pipeline.store.version(table) != version:
            DeltaTable(pipeline.store.path(table)).restore(version)
    _restore_states(pipeline, marker["states"])
    marker["status"] = "rolled_back"
    _write_marker(pipeline, marker)
    return True


def _restore_states(pipeline: "Pipeline", states: dict[str, Any]) -> None:
    """Each stage's state as recorded before the increment, at the versions RESTORE made (same
    content, new numbers). Fingerprints chain on upstream versions, so every stage below ingest
    gets its fingerprint again, in stage order; ingest keeps its own (its input list is the
    increment's to read)."""
    for name in pipeline.stage_names():
        state = states.get(name)
        if state is not None:
            state = dict(state, versions={t: pipeline.store.version(t) for t in state.get("versions", {})})
        pipeline.write_state(name, state)
        if state is not None and name != "ingest":
            state["fingerprint"] = pipeline.fingerprint(pipeline.stages[pipeline.stage_names().index(name)])
            pipeline.write_state(name, state)


def _require_finished_run(pipeline: "Pipeline") -> None:
    """Every stage done with its current settings and its tables as it left them."""
    for stage in pipeline.stages:
        state = pipeline.state(stage.name)
        if state is None:
            raise IncrementalError(f"stage {stage.name} has not run under {pipeline.root}: an increment "
                                   "extends a finished run; run `mergeit run` first")
        stale = any(pipeline.store.version(t) != v for t, v in state.get("versions", {}).items())
        if stage.name != "ingest":  # ingest's fingerprint holds the input list, which grew
            stale = stale or state.get("fingerprint") != pipeline.fingerprint(stage)
        if stale:
            raise IncrementalError(f"stage {stage.name} is not current (settings or tables changed since "
                                   "the last run); run `mergeit run` before an increment")
        if state.get("shortfall"):
            raise IncrementalError(f"stage {stage.name} left work for a rerun ({state['shortfall']['message']}); "
                                   "run `mergeit run` to finish it before an increment")


def run_increment(pipeline: "Pipeline", recluster: bool = False) -> Increment:
    """Bring the new inputs of ``pipeline``'s settings into its run root; see the module doc."""
    roll_back_unfinished(pipeline)
    _require_finished_run(pipeline)
    ingest_stage = pipeline.stages[0]
    fresh = new_inputs(pipeline.store, ingest_stage.files)
    run_id = new_run_id()
    if not fresh:
        log.info("incremental: no new input; nothing to do")
        return Increment(run_id, [], {}, {}, {}, {})
    store, ctx = pipeline.store, pipeline.ctx
    before = {t: store.version(t) for t in TOUCHED}
    _write_marker(pipeline, {"run_id": run_id, "status": "running", "versions": before,
                             "states": {s: pipeline.state(s) for s in pipeline.stage_names()}})
    timer, counts, writes = _Timer(pipeline.spark), {}, Writes()
    try:
        started = time.monotonic()
        ingested, records = ingest_increment(ctx, fresh, run_id, before["records"], writes)
        counts.update(ingested)
        timer.step("ingest", started)

        started = time.monotonic()
        _embed_new(ctx, records, counts["new_records"])
        counts["embedded"] = counts["new_records"]
        writes.wait()  # records, rejects, input_files: long done, and every later step reads them
        timer.step("embed", started)
        if recluster:
            result = _finish(pipeline, run_id, fresh, counts, timer, ("ingest", "embed"))
            pipeline.run(force="topics")
            result.recluster = True
            return result

        drift, assigned = _assign_new(ctx, before["embeddings"], timer, writes)
        counts["assigned"] = drift["rows"]
        # The curate and merge steps join the vectors: read and decoded once, kept for them.
        embeddings = store.read("embeddings").persist(StorageLevel.MEMORY_AND_DISK)
        groups = _curate(ctx, before, counts, timer, embeddings, assigned, writes)
        merge, new_merges = _merge(ctx, run_id, groups, counts, timer, embeddings, writes)
        return _finish(pipeline, run_id, fresh, counts, timer, STAGES_BEFORE_FINALIZE, drift, merge, before,
                       writes, new_merges)
    except BaseException:
        writes.join()  # no write still running when the failure leaves (the next run rolls back)
        pipeline.spark.catalog.clearCache()
        raise


def _embed_new(ctx: StageContext, records: DataFrame, rows: int) -> None:
    """Embed the increment's new ``records`` (``rows`` of them) and append them."""
    if ctx.settings.embed.backend == "spark-nlp":
        from .stages.embed_sparknlp import embed_records as embed_in_jvm
        embedded = embed_in_jvm(records, ctx.settings.embed)
    else:
        from .stages.embed import embed_records
        # spread by ingest_increment already (cached): no second shuffle of the texts
        embedded = embed_records(records, ctx.settings.embed, spread=False)
    append(ctx.store, embedded, "embeddings", rows)


def _assign_new(ctx: StageContext, embeddings_before: int, timer: _Timer,
                writes: Writes) -> tuple[dict[str, Any], DataFrame]:
    """Assign the new embeddings with the saved topic model; append them (``topics``) and grow
    ``centroids`` through ``writes``; return the drift and the assigned rows (cached, for the
    curate step: it need not wait for the append)."""
    started = time.monotonic()
    model = load_topic_model(ctx.store.root)
    assigned = assign_to_topics(added_rows(ctx.store, "embeddings", embeddings_before), model).persist()
    settings = ctx.settings.incremental
    arrivals = arrivals_by_cluster(assigned, ctx.store.read("centroids"), settings.drift_quantile)
    drift = drift_of(arrivals, settings.drift_quantile)
    drift["alarm_share"] = settings.drift_alarm_share
    drift["recluster_advised"] = drift["share"] > settings.drift_alarm_share
    writes.start(partial(append, ctx.store, assigned, "topics", drift["rows"]),
                 partial(grow_centroids, ctx.store, {cluster: n for cluster, (n, _) in arrivals.items()}),
                 release=(assigned,))
    if drift["recluster_advised"]:
        log.warning("incremental: %.1f%% of the new rows lie beyond their cluster's p%g distance "
                    "(alarm at %.1f%%): full re-cluster advised (mergeit run --incremental --recluster)",
                    100 * drift["share"], 100 * drift["quantile"], 100 * drift["alarm_share"])
    timer.step("topics", started)
    return drift, assigned


def _curate(ctx: StageContext, before: dict[str, int | None], counts: dict[str, int], timer: _Timer,
            embeddings: DataFrame, assigned: DataFrame, writes: Writes) -> DataFrame:
    """Steps 4 to 6 for the ``assigned`` rows: their ``dedup``, ``selected`` and ``merge_groups``
    rows, counted in one action and appended through ``writes`` (while the merge step runs);
    returns the new groups (cached, for the merge step)."""
    store, started = ctx.store, time.monotonic()
    # Read at their versions before the increment: the tables this step appends to, and the
    # centres (the topics step's write may still be growing their sizes; the centres stay).
    tables = {t: store.read(t, version=before[t]) for t in ("dedup", "selected", "merge_groups", "centroids")}
    curated = curate_new_rows(assigned, embeddings, tables, ctx.settings).persist(StorageLevel.MEMORY_AND_DISK)
    found = {(r["table"], r["status"]): r["count"] for r in curated.groupBy("table", "status").count().collect()}
    writes.wait()  # the topics step's writes (long done): the assigned rows, in ``curated`` now, are released
    counts.update(new_kept=found.get(("dedup", KEPT), 0), new_duplicates=found.get(("dedup", DUPLICATE), 0),
                  new_selected=found.get(("selected", None), 0), new_groups=found.get(("merge_groups", None), 0))
    rows = {"dedup": counts["new_kept"] + counts["new_duplicates"], "selected": counts["new_selected"],
            "merge_groups": counts["new_groups"]}
    writes.start(*[partial(append, store, curated_rows(curated, table), table, n) for table, n in rows.items()])
    # (``curated`` stays cached: the merge step reads its groups; the run's end releases it)
    timer.step("curate", started)
    return curated_rows(curated, "merge_groups")


def _merge(ctx: StageContext, run_id: str, groups: DataFrame, counts: dict[str, int], timer: _Timer,
           embeddings: DataFrame, writes: Writes) -> tuple[dict[str, Any], DataFrame | None]:
    """The request pass over the new ``groups``: its summary, and its rows (cached), whose
    append to ``merges`` runs through ``writes`` (beside finalize's MERGEs)."""
    started = time.monotonic()
    merge: dict[str, Any] = {"groups": 0, "requests": 0}
    merges = None
    if counts["new_groups"]:
        from .stages.merge import record_merge_run
        merge, merges = merge_new_groups(ctx, groups, ctx.store.read("records"), embeddings)
        record_merge_run(ctx.store.root, {"incremental_run": run_id, **merge})
    writes.wait()  # dedup, selected, merge_groups (long done): finalize reads them
    if merges is not None:
        writes.start(partial(append, ctx.store, merges, "merges", merge["groups"]))
    timer.step("merge", started)
    return merge, merges


def _finish(pipeline: "Pipeline", run_id: str, fresh: list, counts: dict[str, int], timer: _Timer,
            stages: tuple[str, ...], drift: dict[str, Any] | None = None,
            merge: dict[str, Any] | None = None, before: dict[str, int | None] | None = None,
            writes: Writes | None = None, new_merges: DataFrame | None = None) -> Increment:
    """Finalize from the table versions ``before`` the increment (none: a re-cluster follows,
    which finalizes), with the new merges from memory (``new_merges``) while their append
    (``writes``) runs; then record the states of ``stages`` at their new versions, run the ledger
    check, and close the marker."""
    result = Increment(run_id, [f.path for f in fresh], counts, drift or {}, merge or {}, timer.seconds,
                       jobs=timer.jobs)
    started = time.monotonic()
    versions = None
    if before is not None:
        versions = merge_final_and_lineage(pipeline, result, before, new_merges)
    if writes is not None:
        writes.wait()  # the merges append
    pipeline.spark.catalog.clearCache()  # the steps' cached rows: every table they fed is written
    for name in stages:
        pipeline.mark_current(name, {"incremental_run": run_id, **_stage_summary(name, result)},
                              shortfall=_shortfall(name, result, pipeline.settings))
    if versions is not None:
        check_and_mark_finalize(pipeline, result, versions)
        timer.step("finalize", started)
    marker = json.loads(_marker_path(pipeline).read_text())
    marker.update(status="done", result=result.as_dict())
    _write_marker(pipeline, marker)
    log.info("incremental run %s: %s", run_id, json.dumps(result.as_dict()))
    return result


def merge_final_and_lineage(pipeline: "Pipeline", result: Increment, before: dict[str, int | None],
                            new_merges: DataFrame | None = None) -> dict[str, int]:
    """``final`` and ``lineage`` brought up to date by MERGE INTO (``TableStore.merge``), one new
    version per table (returned).

    Only the rows an increment can change are computed (:func:`finalize_scope`): the finalize
    stage's rows for the records of the scope, the new rejects and the new groups with their
    merges (``new_merges``: the request pass's rows; else read from ``merges``). Both tables are
    keyed by record ``id``: a row of a scope record is inserted or updated, a ``final`` row of a
    scope record that left the set (a new merge absorbed it) is deleted, and a reject's row (null
    id) is inserted. A lineage row already there keeps its ``run_id``; every other row arrived in
    this increment."""
    ctx, store = pipeline.ctx, pipeline.ctx.store
    new_groups = added_rows(store, "merge_groups", before["merge_groups"])
    if new_merges is None:
        new_merges = store.read("merges").join(new_groups.select("group_id"), "group_id", "left_semi")
    scope = finalize_scope(added_rows(store, "records", before["records"]), new_groups).persist()
    try:
        final, lineage = build_lineage_and_final(
            store.read("records").join(scope, "id", "left_semi"), added_rows(store, "rejects", before["rejects"]),
            store.read("dedup"), store.read("selected"), new_groups, new_merges,
            id_length=ctx.settings.ingest.id_length)
        lineage = lineage.withColumn("run_id", F.lit(result.run_id))
        final_version, lineage_version = concurrently(
            lambda: store.merge(final, "final", ["id"], within=scope),
            lambda: store.merge(lineage, "lineage", ["id"], within=scope, keep=["run_id"]))
    finally:
        scope.unpersist()
    return {"final": final_version, "lineage": lineage_version}


def check_and_mark_finalize(pipeline: "Pipeline", result: Increment, versions: dict[str, int]) -> dict[str, Any]:
    """The finalize stage's ledger check over every table, then its state at the new versions."""
    stage = pipeline.stages[pipeline.stage_names().index("finalize")]
    checks = stage.check(pipeline.ctx) or {}
    pipeline.mark_current(stage.name, {"incremental_run": result.run_id, "merged_versions": versions},
                          checks=checks)
    return checks


def finalize_scope(new_records: DataFrame, new_groups: DataFrame) -> DataFrame:
    """The record ids (column ``id``) whose lineage or final rows an increment can change: its new
    records and the members of its new groups. No other record's fate moves: dedup decisions are
    never revisited, the selection only grows by new records (step 5), and the new groups hold
    only rows that were in no group before (step 6), so every older group, merge and merged row
    stays as it is. Rejects only arrive (new rows, outside any bound)."""
    members = new_groups.select(F.explode("member_ids").alias("id"))
    return new_records.select("id").unionByName(members).distinct()


def grow_centroids(store: TableStore, added: dict[int, int]) -> int | None:
    """``centroids.size`` plus the rows ``added`` to each cluster (the fitted centres and
    distance statistics stay): the k rows rewritten on the driver, one new version (every row
    changes anyway). None when nothing was added."""
    if not any(added.values()):
        return None
    centroids = store.read_small("centroids")  # k rows
    size = centroids.schema.get_field_index("size")
    grown = pc.add(centroids.column(size), pa.array([added.get(c, 0) for c in centroids.column("cluster").to_pylist()],
                                                     type=centroids.schema.field(size).type))
    return store.overwrite_small(centroids.set_column(size, centroids.schema.field(size), grown), "centroids")


def _shortfall(name: str, result: Increment, settings) -> dict[str, Any] | None:
    """The merge step's groups a plain rerun must retry (see ``stages.Shortfall``)."""
    if name != "merge" or not result.merge:
        return None
    from .stages.merge import merge_shortfall
    short = merge_shortfall(result.merge.get("errors") or {}, int(result.merge.get("groups") or 0), settings.merge)
    return short.as_dict() if short else None


def _stage_summary(name: str, result: Increment) -> dict[str, Any]:
    c = result.counts
    return {
        "ingest": {"run_id": result.run_id, "input_files": len(result.new_inputs),
                   "new_records": c.get("new_records"), "new_rejects": c.get("new_rejects")},
        "embed": {"embedded": c.get("embedded")},
        "topics": {"assigned": c.get("assigned"), "drift": result.drift},
        "dedup": {"new_kept": c.get("new_kept"), "new_duplicates": c.get("new_duplicates")},
        "select": {"new_selected": c.get("new_selected")},
        "group": {"new_groups": c.get("new_groups")},
        "merge": result.merge,
    }.get(name, {})
