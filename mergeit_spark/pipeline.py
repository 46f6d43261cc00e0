"""The pipeline: a list of stages and the executor that runs them. Engine wiring lives here only.

The executor knows no stage by name: it drives every stage through the hooks of
:class:`~mergeit_spark.stages.Stage` (``run`` or ``extend`` returns write intents and a summary,
``check`` verifies the written tables) and performs every write itself through the run root's
store, so a new stage needs no change here.

Resume: after a stage has written all of its tables and its check passed, the executor records a
fingerprint of what decided them (the stage's declared ``version``, the result-deciding knobs of its
settings sections, what the stage adds, e.g. the input files' sizes and times, and for each input
table the fingerprint of the stage that wrote it AND the table version it wrote) in the stage's
state record (``<root>/_state/<stage>.json``) with the versions it wrote, and one line in the run
log (``<root>/_state/runs.jsonl``). A rerun skips a stage whose fingerprint matches, whose tables
still stand at the recorded versions and whose upstream stages are all current; it recomputes
from the first stage that changed. Because the chain carries table versions, a stage that is
rerun (``--force``, ``--stage``) makes everything below it rerun even when it computed from
unchanged inputs. A driver killed in the middle of a stage leaves no state for it, so the rerun
redoes that stage (merge keeps the LLM calls it already paid for in its ledger). A stage that wrote
its tables but left work a rerun can finish (a ``Shortfall``: merge groups that failed on
transport, server or budget) is recorded with it and is not current: the next run runs it again,
and the stages below it.

Increments (``extend``; the rules are in :mod:`mergeit_spark.incremental`): every stage's
``extend`` in order, each given the rows the stages above added (in memory) while their writes
run in the background; then every write is waited for, each stage's check runs and its state
records the new versions. A marker taken before the first write lets a crashed increment be
rolled back by the next run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from .background import Writes
from .config import Settings
from .incremental import Increment, IncrementMarker, require_finished_run
from .lease import RunLease
from .redact import install_log_scrubbing, register_secret
from .fs import Storage
from .session import build_session, is_connect, object_store_session
from .stages import ROWS_ADDED, Stage, StageContext, StageOutput, new_run_id
from .tables import RUN_LOG, TableStore

log = logging.getLogger("mergeit")



class PipelineError(RuntimeError):
    """A run cannot go on: missing inputs, an unknown stage, a ledger that does not balance."""


@dataclass
class StageResult:
    name: str
    skipped: bool
    seconds: float
    fingerprint: str
    versions: dict[str, int]
    counts: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    shortfall: dict[str, Any] | None = None   # Shortfall.as_dict() of work left for a rerun

    @classmethod
    def from_state(cls, name: str, state: dict[str, Any]) -> "StageResult":
        return cls(name, True, 0.0, state.get("fingerprint", ""), state.get("versions", {}),
                   state.get("counts", {}), state.get("summary", {}), state.get("checks", {}))


def build_stages(settings: Settings) -> list[Stage]:
    """The MergeIT stages, in order: the pipeline's one list of stages."""
    from .stages.decontam import Decontam
    from .stages.dedup import Dedup
    from .stages.embed import Embed
    from .stages.finalize import Finalize
    from .stages.group import Group
    from .stages.ingest import Ingest
    from .stages.merge import Merge
    from .stages.select import Select
    from .stages.topics import Topics

    # Ingest (and decontam, its evaluation sets) resolve their inputs here: a missing file or
    # unknown format fails before Spark work.
    return [cls.from_settings(settings)
            for cls in (Ingest, Decontam, Embed, Topics, Dedup, Select, Group, Merge, Finalize)]


class _TablesAt(Mapping[str, DataFrame]):
    """``names`` read from the store on first use, each at its version in ``versions``."""

    def __init__(self, store: TableStore, names: tuple[str, ...], versions: dict[str, int | None]) -> None:
        self._store, self._names, self._versions = store, names, versions
        self._read: dict[str, DataFrame] = {}

    def __getitem__(self, name: str) -> DataFrame:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._read:
            self._read[name] = self._store.read(name, version=self._versions.get(name))
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class StepTimer:
    """Seconds and Spark jobs per step (steps run one after another: the jobs since the last step
    are this step's). Job ids come from the status tracker (``spark.ui.retainedJobs`` recent);
    a Spark Connect session has none, so there only seconds are kept."""

    def __init__(self, spark: SparkSession) -> None:
        self.tracker = None if is_connect(spark) else spark.sparkContext.statusTracker()
        self.seconds: dict[str, float] = {}
        self.jobs: dict[str, int] = {}
        self._seen = set(self.tracker.getJobIdsForGroup()) if self.tracker else set()

    def step(self, name: str, started: float) -> None:
        self.seconds[name] = round(time.monotonic() - started, 3)
        if self.tracker is not None:
            now = set(self.tracker.getJobIdsForGroup())
            self.jobs[name] = len(now - self._seen)
            self._seen = now


class Pipeline:
    """Runs stages in order against one run root, skipping those whose outputs are current."""

    def __init__(self, settings: Settings, spark: SparkSession | None = None,
                 stages: list[Stage] | None = None) -> None:
        install_log_scrubbing()
        self.settings = settings
        self.stages = stages if stages is not None else build_stages(settings)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise PipelineError(f"two stages share a name: {names}")
        # The key variable's value is masked in this process's logs; Spark redacts its conf key.
        register_secret(os.environ.get(settings.llm.api_key_env, "") if settings.llm.api_key_env else "")
        if spark is None:
            spark_settings, conf = object_store_session(settings)
            spark = build_session(spark_settings, conf, secret_env_names=[settings.llm.api_key_env])
        self.spark = spark
        self.store = TableStore(self.spark, settings.output.root, settings.tables.engine,
                                Storage.from_settings(settings.storage), settings.output.catalog,
                                settings.output.schema)
        self.ctx = StageContext(self.spark, self.store, settings)
        self.root = self.store.root
        self._lease: RunLease | None = None

    # -- state -------------------------------------------------------------------------------
    def state(self, name: str) -> dict[str, Any] | None:
        return self.store.read_state(name)

    def mark_current(self, stage: Stage, output: StageOutput, checks: dict[str, Any]) -> None:
        """Record ``stage`` as done at its tables' current versions after an increment, with
        the fingerprint it has now; its earlier state's timing is kept. A shortfall leaves it not current."""
        state = dict(self.state(stage.name) or {})
        state.update(fingerprint=self.fingerprint(stage),
                     versions={t: self.store.version(t) for t in stage.outputs},
                     counts={t: self.store.count(t) for t in stage.outputs},
                     finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     summary={"incremental_run": self.ctx.run_id, **output.summary},
                     shortfall=output.shortfall.as_dict() if output.shortfall else None)
        if checks:
            state["checks"] = checks
        self.store.write_state(stage.name, state)
        self._log_run(stage, state, increment=True)

    def _log_run(self, stage: Stage, state: dict[str, Any], increment: bool) -> None:
        self.store.append_log(RUN_LOG, {
            "stage": stage.name, "run_id": self.ctx.run_id, "increment": increment,
            "versions": state["versions"], "counts": state["counts"], "seconds": state.get("seconds"),
            "summary": state["summary"], "shortfall": state.get("shortfall")})

    def run_log(self, stage: str | None = None) -> list[dict[str, Any]]:
        """The run log's entries (of ``stage`` only, when given), oldest first."""
        return [e for e in self.store.read_log(RUN_LOG) if stage is None or e.get("stage") == stage]

    def _outputs(self) -> list[str]:
        return [t for stage in self.stages for t in stage.outputs]

    def _producer(self, table: str) -> Stage | None:
        """The stage of this pipeline that writes ``table``; None for a table made elsewhere."""
        return next((stage for stage in self.stages if table in stage.outputs), None)

    def fingerprint(self, stage: Stage) -> str:
        """What decides ``stage``'s tables; chains through the producers of its inputs."""
        upstream = {}
        for table in stage.inputs:
            producer = self._producer(table)
            state = self.state(producer.name) if producer else None
            if producer is None:  # made outside this pipeline: its version is all we know
                upstream[table] = [None, self.store.version(table)]
            elif state:
                # The version pins the very table this stage reads: a producer rerun with the same
                # fingerprint still writes a new version, and everything below must follow it.
                upstream[table] = [state["fingerprint"], state.get("versions", {}).get(table)]
            else:
                upstream[table] = [self.fingerprint(producer), None]
        payload = {
            "stage": stage.name,
            "code": stage.version,
            "settings": self.settings.fingerprint(*stage.settings_sections),
            "inputs": upstream,
            "extra": stage.extra_fingerprint(self.ctx),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def is_current(self, stage: Stage, _known: dict[str, bool] | None = None) -> bool:
        """Done with the fingerprint it has now, its tables at the versions it wrote, and every stage
        above it current too."""
        known = {} if _known is None else _known
        if stage.name not in known:
            state = self.state(stage.name)
            known[stage.name] = bool(
                state and not state.get("shortfall")
                and state.get("fingerprint") == self.fingerprint(stage)
                and all(self.store.version(t) == v for t, v in state.get("versions", {}).items())
                and all(self.is_current(p, known) for p in map(self._producer, stage.inputs) if p))
        return known[stage.name]

    # -- running -----------------------------------------------------------------------------
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> Stage:
        names = self.stage_names()
        if name not in names:
            raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(names)}")
        return self.stages[names.index(name)]

    def _index(self, name: str) -> int:
        return self.stages.index(self.stage(name))

    @contextmanager
    def holding_root(self) -> Iterator[None]:
        """Hold the run root's lease (:mod:`mergeit_spark.lease`) for what runs inside: a second
        run on the root fails at once, naming this one. Re-entrant within this pipeline."""
        if self._lease is not None:
            self._lease.check()
            yield
            return
        lease = RunLease(self.store, self.settings.run.lease_timeout_s).acquire()
        self._lease = lease
        try:
            yield
        finally:
            self._lease = None
            lease.release()

    def run(self, only: str | None = None, force: str | None = None,
            until: str | None = None) -> list[StageResult]:
        """Run every stage up to ``until`` (default: all), or ``only`` one; recompute from
        ``force`` on regardless of state. Holds the run root's lease while it runs."""
        with self.holding_root():
            return self._run(only, force, until)

    def _run(self, only: str | None, force: str | None, until: str | None) -> list[StageResult]:
        forced_from = self._index(force) if force else len(self.stages)
        last = self._index(until) if until else len(self.stages) - 1
        selected = [self.stage(only)] if only else self.stages[:last + 1]
        IncrementMarker(self).roll_back_unfinished()  # else a later increment's rollback would undo this run
        self.ctx.run_id = new_run_id()
        results = []
        for stage in selected:
            self._lease.check()  # type: ignore[union-attr]
            forced = self._index(stage.name) >= forced_from
            if not forced and self.is_current(stage):
                state = self.state(stage.name) or {}
                log.info("stage %-8s up to date (fingerprint %s), skipped", stage.name, state.get("fingerprint"))
                results.append(StageResult.from_state(stage.name, state))
                continue
            results.append(self._run_stage(stage))
        return results

    def run_stage(self, stage: Stage, inputs: Mapping[str, DataFrame] | None = None) -> StageResult:
        """Run one stage: its hooks in order, its writes, then its state. Any failure leaves no
        state. ``inputs``: the stage's input tables as DataFrames made elsewhere (one stage run
        on a user's own rows), instead of the run root's tables."""
        with self.holding_root():
            return self._run_stage(stage, inputs)

    def _run_stage(self, stage: Stage, inputs: Mapping[str, DataFrame] | None = None) -> StageResult:
        missing = [t for t in stage.inputs if t not in (inputs or {}) and not self.store.exists(t)]
        if missing:
            raise PipelineError(f"stage {stage.name} needs table(s) {', '.join(missing)} under "
                                f"{self.root}; run the stages before it first")
        fingerprint = self.fingerprint(stage)
        log.info("stage %-8s running", stage.name)
        started = time.monotonic()
        given = inputs or {}
        tables = {t: given[t] if t in given else self.store.read(t) for t in stage.inputs}
        output = _as_output(stage.run(self.ctx, tables))
        self._check_declared(stage, output)
        self._check_complete(stage, output)
        for name, write in output.writes().items():
            self.store.apply(name, write)
        for name, model in output.models.items():
            self.store.save_model(name, model)
        # Stages may persist what they read twice (ingest parses once for two tables); once the
        # tables are written nothing downstream reads those caches.
        self.spark.catalog.clearCache()
        versions = {t: self.store.version(t) for t in stage.outputs}
        counts = {t: self.store.count(t) for t in stage.outputs}
        checks = stage.check(self.ctx) or {}
        seconds = time.monotonic() - started
        shortfall = output.shortfall.as_dict() if output.shortfall else None
        state = {
            "fingerprint": fingerprint, "versions": versions, "counts": counts,
            "seconds": round(seconds, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "summary": output.summary, "checks": checks, "shortfall": shortfall,
        }
        self.store.write_state(stage.name, state)
        self._log_run(stage, state, increment=False)
        log.info("stage %-8s done in %.1fs: %s", stage.name, seconds,
                 ", ".join(f"{t}={n}" for t, n in counts.items()))
        if shortfall:
            log.warning("stage %-8s is not current: %s", stage.name, shortfall["message"])
        return StageResult(stage.name, False, seconds, fingerprint, versions, counts,  # type: ignore[arg-type]
                           output.summary, checks, shortfall)

    def _check_declared(self, stage: Stage, output: StageOutput) -> None:
        undeclared = sorted(set(output.tables) - set(stage.outputs))
        if undeclared:
            raise PipelineError(f"stage {stage.name} returned table(s) it does not declare: {undeclared}")

    def _check_complete(self, stage: Stage, output: StageOutput) -> None:
        """Every declared table is to be written now, or is one the stage called unchanged."""
        for table in stage.outputs:
            if table in output.tables:
                continue
            if table in output.unchanged and self.store.version(table) is not None:
                continue
            raise PipelineError(f"stage {stage.name} returned no rows for table {table!r}")

    # -- increments ----------------------------------------------------------------------------
    def extend(self, recluster: bool = False) -> Increment:
        """Bring the new inputs into this finished run root (``mergeit run --incremental``): the
        rules are in :mod:`mergeit_spark.incremental`. With ``recluster``, the stages above the
        one that ``refits`` are extended, then it and every stage below run in full. Holds the
        run root's lease while it runs."""
        with self.holding_root():
            return self._extend(recluster)

    def _extend(self, recluster: bool) -> Increment:
        marker = IncrementMarker(self)
        marker.roll_back_unfinished()
        require_finished_run(self)
        self.ctx.run_id = new_run_id()
        before = {t: self.store.version(t) for stage in self.stages for t in (*stage.inputs, *stage.outputs)}
        states = {s.name: self.state(s.name) for s in self.stages}
        timer, pending = StepTimer(self.spark), []  # each stage's writes, oldest first
        added: dict[str, DataFrame] = {}
        done: list[tuple[Stage, StageOutput]] = []
        try:
            for stage in self.stages:
                if recluster and stage.refits:
                    break
                self._lease.check()  # type: ignore[union-attr]
                started = time.monotonic()
                # A stage's writes overlap the next stage's work, and are done before the one after
                # starts (more at once only compete for the same cores).
                while len(pending) > (0 if stage.extends_from_tables else 1):
                    pending.pop(0).wait()
                if stage.extends_from_tables:
                    added = self._added_from_tables(added, before)
                tables = _TablesAt(self.store, tuple(before), before)  # every table, as it stood
                output = _as_output(stage.extend(self.ctx, tables, added))
                self._check_declared(stage, output)
                if not done and not output.tables:
                    log.info("incremental: nothing new; nothing to do")
                    return Increment(self.ctx.run_id, {stage.name: output.summary})
                if not done:
                    marker.begin({t: before[t] for t in self._outputs()}, states)
                for name, write in output.writes().items():
                    if write.mode == "append":
                        added[name] = write.rows
                        if write.count is not None:
                            added.setdefault(ROWS_ADDED, {})[name] = write.count
                added.update(output.carry)
                pending.append(Writes())
                pending[-1].start(*[partial(self.store.apply, name, write) for name, write in output.writes().items()])
                for name, model in output.models.items():
                    self.store.save_model(name, model)
                done.append((stage, output))
                timer.step(stage.name, started)
            started = time.monotonic()
            while pending:
                pending.pop(0).wait()
        except BaseException:
            for writes in pending:
                writes.join()  # no write still running when the failure leaves (the next run rolls back)
            self.spark.catalog.clearCache()
            raise
        self.spark.catalog.clearCache()  # the steps' cached rows: every table they fed is written
        for stage, output in done:
            self.mark_current(stage, output, stage.check(self.ctx) or {})
        timer.step("writes and checks", started)
        result = Increment(self.ctx.run_id, {stage.name: output.summary for stage, output in done},
                           seconds=timer.seconds, jobs=timer.jobs, recluster=recluster)
        marker.finish(result)  # the increment is whole; a re-cluster below is a plain run
        if recluster:
            self.run(force=next(s.name for s in self.stages if s.refits))
        log.info("incremental run %s: %s", result.run_id, json.dumps(result.as_dict()))
        return result

    def _added_from_tables(self, added: dict[str, DataFrame], before: dict[str, int | None]
                           ) -> dict[str, DataFrame]:
        """``added`` with each written table's frame replaced by the rows it gained since
        ``before`` (read from its files); frames handed down in ``carry`` stay."""
        written = {name: (self.store.read_added(name, before[name]) if before.get(name) is not None
                          else self.store.read(name))
                   for name in added if name in before and self.store.exists(name)}
        return {**added, **written}

    # -- reporting ---------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Per stage: done or not, current or stale, row counts and table versions (small)."""
        rows = []
        for stage in self.stages:
            state = self.state(stage.name)
            tables = {t: self.store.version(t) for t in stage.outputs}
            rows.append({
                "stage": stage.name,
                "done": state is not None,
                "current": bool(state) and self.is_current(stage),
                "shortfall": (state or {}).get("shortfall"),
                "counts": (state or {}).get("counts", {}),
                "versions": tables,
                "seconds": (state or {}).get("seconds"),
            })
        return rows

    def timings(self) -> dict[str, float]:
        return {s.name: (self.state(s.name) or {}).get("seconds", 0.0) for s in self.stages}


def _as_output(result: StageOutput | dict[str, DataFrame] | None) -> StageOutput:
    """A stage's ``run`` result as a :class:`StageOutput` (a plain dict of tables is accepted)."""
    if isinstance(result, StageOutput):
        return result
    return StageOutput(tables=dict(result or {}))
