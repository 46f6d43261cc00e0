"""Incremental runs: new input rows join a curated run root without recomputing it.

``mergeit run --incremental`` (``Pipeline.extend``) against a run root whose stages are
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
2. **Decontam and embed**: the new records are checked against the evaluation sets the full run
   stored (``eval_ngrams``); the contaminated ones get ``contamination`` rows, the others are
   embedded; append to ``embeddings``.
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
   among themselves per cluster by the full run's keep rule (nearest to the centre first). With
   ``dedup.minhash``, a new row is also compared by word shingles with its own cluster's kept
   rows, and the new rows among themselves (lexical near-copies); across clusters an increment
   compares by embeddings only.
5. **Selection**: the existing selection stays; each cluster with new kept rows is extended by
   lazy greedy facility location whose gains count the existing selection (the same objective
   over all the cluster's kept rows, old and new). Budget rule: a cluster keeps its selection
   rate, and never falls under the budget: ``target = min(kept, max(budget, ceil(selected_before
   x kept / kept_before)))`` (``kept`` after the increment); a cluster kept whole stays whole.
   New picks continue ``rank`` after the existing ones.
6. **Group and merge**: the selected rows not in any existing group, in the clusters that gained
   selected rows, are grouped by the group stage's rule; only groups holding at least one new
   row are kept, appended to ``merge_groups`` and sent to the LLM. Merges paid before stay (the
   merge ledger answers any group already recorded without a request). The pass is one merge
   line of the run log (``<root>/_state/runs.jsonl``), like a full run's merge stage.
7. **Finalize**: ``final`` and ``lineage`` are brought up to date by MERGE INTO
   (a merge write, ``TableStore.merge``; Delta's MERGE on delta-spark, copy-on-write of the
   touched files committed by delta-rs otherwise), one new version per table. Only the rows an increment can
   change are computed: the finalize stage's rows for the new records and the members of the
   new groups (no other record's fate can move: see ``finalize_scope``), the new rejects, and
   the new groups with their merges; they go to the MERGE as its source as they are (no model
   or LLM work, no diff against the tables first). Both tables are keyed by record ``id``: a
   scope record's row is inserted, or updated where it changed; a ``final`` row of a scope
   record that left the set (a new merge absorbed it) is deleted; a reject's row (no id) is
   inserted. ``lineage.run_id`` says in which run each row arrived: a row already in lineage
   keeps its run, every other row gets this increment's. The ledger check runs as in a full run.
8. **Idempotent**: when no input is new, nothing is read, written or requested.

Each step is the ``extend`` of the stage named (see :mod:`mergeit_spark.stages` for the contract),
run by the executor (``Pipeline.extend``), which performs every write. Each touched table gets
exactly one new version per increment (an append; centroids an overwrite of its k rows,
committed by delta-rs from the driver; final and lineage a merge). Steps 4 to 6 are one pass
(``stages.cluster_increment``): after the new rows are compared with the kept rows (one pass,
routed by cluster), one pass per touched cluster deduplicates its unmatched new rows among
themselves, extends its selection and groups its free selected rows; the dedup stage's
``extend`` computes it and hands it down (``carry``), and the select and group stages take their
rows from it, so the three tables come from one cached result rather than three rounds of Spark
jobs over the same clusters. Every stage reads the tables as they stood before the increment plus
the rows added above it (in memory), so the writes run in the background while the next stage
computes; finalize waits for them and reads the added rows back from the tables (a short plan for
its MERGE source). Afterwards every stage's state records the new versions, so ``mergeit status`` shows
the run current and a plain ``mergeit run`` with the same settings recomputes nothing.

Crash safety: before the first write, the run records the version of every table and every stage
state in the store's state record ``increment`` (``<root>/_state/increment.json``). Any run, full
or incremental, that finds it unfinished restores each table to its recorded version (Delta RESTORE, a new version
with that content) and the states (pointed at the restored versions), then goes on; merges
already paid come back from the ledger without a request.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from .inputs import InputFile, delta_data_files, input_bytes
from .tables import TableStore

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger("mergeit.incremental")

MARKER = "increment"  # the store's state record of the increment in progress


class IncrementalError(RuntimeError):
    """An increment cannot run: no finished run to extend, a changed input, a count mismatch."""


@dataclass
class Increment:
    """What one incremental run did: each extended stage's summary (small, JSON-ready)."""

    run_id: str
    summaries: dict[str, dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)  # Spark jobs per step (for profiling)
    recluster: bool = False

    @property
    def new_inputs(self) -> list[str]:
        return [path for s in self.summaries.values() for path in s.get("new_inputs", [])]

    @property
    def changed(self) -> bool:
        return bool(self.new_inputs)

    @property
    def counts(self) -> dict[str, int]:
        """Every stage's counts (new records, rejects, kept rows, picks, groups ...)."""
        return {k: v for s in self.summaries.values() for k, v in s.get("counts", {}).items()}

    @property
    def drift(self) -> dict[str, Any]:
        return next((s["drift"] for s in self.summaries.values() if "drift" in s), {})

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "new_inputs": self.new_inputs, "counts": self.counts,
                "drift": self.drift, "stages": self.summaries, "seconds": self.seconds,
                "recluster": self.recluster, "jobs": self.jobs}


# ------------------------------------------------------------------------------------------
# Step 1: which inputs are new
# ------------------------------------------------------------------------------------------

def new_inputs(store: TableStore, files: list[InputFile]) -> list[InputFile]:
    """The inputs to read: those not yet in ``input_files``, and for a Delta source table that
    gained versions since it was read, its data files added since (:func:`grown_delta_source`).
    Fails on any other input whose size changed since."""
    table = store.read_small("input_files")  # a row per input read (or per version read): small
    rows = table.select([c for c in ("source", "bytes", "framed", "version") if c in table.column_names]).to_pylist()
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = seen.setdefault(row["source"], {"bytes": 0, "framed": 0, "version": None})
        entry["bytes"] += int(row["bytes"] or 0)
        entry["framed"] += int(row["framed"] or 0)
        if row.get("version") is not None:
            entry["version"] = max(int(row["version"]), entry["version"] or 0)
    fresh = []
    for item in files:
        if item.path not in seen:
            fresh.append(item)
            continue
        before, now = seen[item.path]["bytes"], input_bytes(item)
        if now == before:
            continue
        if item.format == "delta" and seen[item.path]["version"] is not None:
            fresh.append(grown_delta_source(item, seen[item.path]["version"], seen[item.path]["framed"]))
            continue
        raise IncrementalError(
            f"input {item.path} changed since it was ingested ({before} -> {now} bytes): an increment "
            "takes new files or rows appended to a Delta table; run a full run (mergeit run --force ingest)")
    return fresh


def grown_delta_source(item: InputFile, read_version: int, rows_read: int) -> InputFile:
    """A Delta source table read at ``read_version`` that has newer versions: the input of its
    data files added since (up to the current version), rows numbered on after the ``rows_read``.
    Only appends qualify: a file live at ``read_version`` that is gone now (a delete, update,
    merge or compaction) fails the run, which then needs a full run."""
    from .inputs import pinned
    current = pinned(item)
    then = {f[0] for f in delta_data_files(item.path, read_version)}
    now = {f[0] for f in delta_data_files(item.path, current.version)}
    if not then <= now:
        raise IncrementalError(
            f"Delta source {item.path}: {len(then - now)} data file(s) read at version {read_version} are "
            f"gone at version {current.version} (rows deleted or rewritten, not only appended); "
            "run a full run (mergeit run --force ingest)")
    return InputFile(item.path, "delta", version=current.version, after_version=read_version, row_offset=rows_read)


# ------------------------------------------------------------------------------------------
# Step 3: drift
# ------------------------------------------------------------------------------------------

def arrivals_by_cluster(assigned: DataFrame, centroids: DataFrame, slot: int) -> dict[int, tuple[int, int]]:
    """Per cluster: how many ``assigned`` rows (id, cluster, distance) it gained, and how many of
    them lie beyond the fitted rows' distance quantile at (1-based) position ``slot`` of
    ``centroids.distance_quantiles`` (one aggregate; k rows to the driver)."""
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
# The run: a finished run root to extend, and crash safety
# ------------------------------------------------------------------------------------------

def require_finished_run(pipeline: "Pipeline") -> None:
    """Every stage done with its current settings and its tables as it left them. The first
    stage's fingerprint is not compared: it holds the input list, which grew."""
    for index, stage in enumerate(pipeline.stages):
        state = pipeline.state(stage.name)
        if state is None:
            raise IncrementalError(f"stage {stage.name} has not run under {pipeline.root}: an increment "
                                   "extends a finished run; run `mergeit run` first")
        stale = any(pipeline.store.version(t) != v for t, v in state.get("versions", {}).items())
        if index > 0:
            stale = stale or state.get("fingerprint") != pipeline.fingerprint(stage)
        if stale:
            raise IncrementalError(f"stage {stage.name} is not current (settings or tables changed since "
                                   "the last run); run `mergeit run` before an increment")
        if state.get("shortfall"):
            raise IncrementalError(f"stage {stage.name} left work for a rerun ({state['shortfall']['message']}); "
                                   "run `mergeit run` to finish it before an increment")


class IncrementMarker:
    """The state record that makes an increment undoable: taken before its first write, closed
    after its last; found open by the next run, it is rolled back."""

    def __init__(self, pipeline: "Pipeline") -> None:
        self.pipeline = pipeline
        self.store = pipeline.store

    def begin(self, versions: dict[str, int | None], states: dict[str, Any]) -> None:
        self.store.write_state(MARKER, {"run_id": self.pipeline.ctx.run_id, "status": "running",
                                        "versions": versions, "states": states})

    def finish(self, result: Increment) -> None:
        marker = self.store.read_state(MARKER) or {}
        marker.update(status="done", result=result.as_dict())
        self.store.write_state(MARKER, marker)

    def roll_back_unfinished(self) -> bool:
        """Undo an increment that did not finish: each table back to its version before it (Delta
        RESTORE, a new version with that content), every stage state as it was, pointed at the
        restored versions. True when there was one."""
        marker = self.store.read_state(MARKER)
        if not marker or marker.get("status") != "running":
            return False
        log.warning("incremental run %s did not finish: restoring the tables and state before it", marker["run_id"])
        for table, version in marker["versions"].items():
            if version is not None:
                self.store.restore(table, version)
        self._restore_states(marker["states"])
        marker["status"] = "rolled_back"
        self.store.write_state(MARKER, marker)
        return True

    def _restore_states(self, states: dict[str, Any]) -> None:
        """Each stage's state as recorded before the increment, at the versions RESTORE made (same
        content, new numbers). Fingerprints chain on upstream versions, so every stage below the
        first gets its fingerprint again, in stage order; the first keeps its own (its input list
        is the increment's to read)."""
        pipeline = self.pipeline
        for index, stage in enumerate(pipeline.stages):
            state = states.get(stage.name)
            if state is not None:
                state = dict(state, versions={t: self.store.version(t) for t in state.get("versions", {})})
            self.store.write_state(stage.name, state)
            if state is not None and index > 0:
                state["fingerprint"] = pipeline.fingerprint(stage)
                self.store.write_state(stage.name, state)
