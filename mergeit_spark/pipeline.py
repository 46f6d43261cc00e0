"""The pipeline: a list of stages and the executor that runs them. Engine wiring lives here only.

The executor knows no stage by name: it drives every stage through the hooks of
:class:`~mergeit_spark.stages.Stage` (``run`` returns the tables to write and a summary, ``check``
verifies the written tables), so a new stage needs no change here.

Resume: after a stage has written all of its tables and its check passed, the executor records a
fingerprint of what decided them (the stage's declared ``version``, the result-deciding knobs of its
settings sections, what the stage adds, e.g. the input files' sizes and times, and for each input
table the fingerprint of the stage that wrote it AND the table version it wrote) in
``<root>/_state/<stage>.json`` with the versions it wrote. A rerun skips a stage whose fingerprint
matches, whose tables still stand at the recorded versions and whose upstream stages are all
current; it recomputes from the first stage that changed. Because the chain carries table
versions, a stage that is rerun (``--force``, ``--stage``) makes everything below it rerun even
when it computed from unchanged inputs. A driver killed in the middle of a stage leaves no state
file for it, so the rerun redoes that stage (merge keeps the LLM calls it already paid for in its
ledger). A stage that wrote its tables but left work a rerun can finish (a ``Shortfall``: merge
groups that failed on transport, server or budget) is recorded with it and is not current: the
next run runs it again, and the stages below it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from .config import Settings
from .redact import register_secret
from .session import build_session
from .stages import Stage, StageContext, StageOutput
from .tables import TableStore

log = logging.getLogger("mergeit")

STATE_DIR = "_state"
STAGE_ORDER = ("ingest", "embed", "topics", "dedup", "select", "group", "merge", "finalize")


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
    """The MergeIT stages, in order. Imported here so that the stage modules stay engine-free."""
    from .stages.dedup import Dedup
    from .stages.embed import Embed
    from .stages.finalize import Finalize
    from .stages.group import Group
    from .stages.ingest import Ingest
    from .stages.merge import Merge
    from .stages.select import Select
    from .stages.topics import Topics

    # Ingest resolves its inputs here: a missing file or unknown format fails before Spark work.
    stages = [cls.from_settings(settings)
              for cls in (Ingest, Embed, Topics, Dedup, Select, Group, Merge, Finalize)]
    assert tuple(s.name for s in stages) == STAGE_ORDER
    return stages


class Pipeline:
    """Runs stages in order against one run root, skipping those whose outputs are current."""

    def __init__(self, settings: Settings, spark: SparkSession | None = None,
                 stages: list[Stage] | None = None) -> None:
        self.settings = settings
        self.stages = stages if stages is not None else build_stages(settings)
        # The key variable's value is masked in this process's logs; Spark redacts its conf key.
        register_secret(os.environ.get(settings.llm.api_key_env, "") if settings.llm.api_key_env else "")
        self.spark = spark or build_session(settings.spark, secret_env_names=[settings.llm.api_key_env])
        self.store = TableStore(self.spark, settings.output.root, settings.tables.engine)
        self.ctx = StageContext(self.spark, self.store, settings)
        self.root = Path(settings.output.root).absolute()

    # -- state -------------------------------------------------------------------------------
    def _state_path(self, name: str) -> Path:
        return self.root / STATE_DIR / f"{name}.json"

    def state(self, name: str) -> dict[str, Any] | None:
        path = self._state_path(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a torn write counts as not done

    def _write_state(self, name: str, state: dict[str, Any]) -> None:
        path = self._state_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        tmp.replace(path)  # atomic: a state file is whole or absent

    def write_state(self, name: str, state: dict[str, Any] | None) -> None:
        """Put back a stage's state as recorded (None removes it): an undone increment."""
        if state is None:
            self._state_path(name).unlink(missing_ok=True)
        else:
            self._write_state(name, state)

    def mark_current(self, name: str, summary: dict[str, Any], checks: dict[str, Any] | None = None,
                     shortfall: dict[str, Any] | None = None) -> None:
        """Record stage ``name`` as done at its tables' current versions (an increment appended
        to them), with today's fingerprint; its earlier state's timing (and checks, unless
        ``checks`` are given) are kept. A ``shortfall`` (work a rerun must finish) leaves the
        stage not current, as after a full run."""
        stage = self.stages[self._index(name)]
        state = dict(self.state(name) or {})
        state["shortfall"] = shortfall
        state.update(fingerprint=self.fingerprint(stage),
                     versions={t: self.store.version(t) for t in stage.outputs},
                     counts={t: self.store.count(t) for t in stage.outputs},
                     finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     summary=summary)
        if checks is not None:
            state["checks"] = checks
        self._write_state(name, state)

    def run_incremental(self, recluster: bool = False):
        """Bring new inputs into a finished run root (``mergeit run --incremental``): the rules
        are in :mod:`mergeit_spark.incremental`."""
        from .incremental import run_increment
        return run_increment(self, recluster=recluster)

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
        """Done with today's fingerprint, its tables at the versions it wrote, and every stage
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

    def _index(self, name: str) -> int:
        names = self.stage_names()
        if name not in names:
            raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(names)}")
        return names.index(name)

    def run(self, only: str | None = None, force: str | None = None,
            until: str | None = None) -> list[StageResult]:
        """Run every stage up to ``until`` (default: all), or ``only`` one; recompute from
        ``force`` on regardless of state."""
        forced_from = self._index(force) if force else len(self.stages)
        last = self._index(until) if until else len(self.stages) - 1
        selected = [self.stages[self._index(only)]] if only else self.stages[:last + 1]
        results = []
        for stage in selected:
            forced = self._index(stage.name) >= forced_from
            if not forced and self.is_current(stage):
                state = self.state(stage.name) or {}
                log.info("stage %-8s up to date (fingerprint %s), skipped", stage.name, state.get("fingerprint"))
                results.append(StageResult.from_state(stage.name, state))
                continue
            results.append(self.run_stage(stage))
        return results

    def run_stage(self, stage: Stage) -> StageResult:
        """Run one stage: its hooks in order, then its state. Any failure leaves no state."""
        missing = [t for t in stage.inputs if not self.store.exists(t)]
        if missing:
            raise PipelineError(f"stage {stage.name} needs table(s) {', '.join(missing)} under "
                                f"{self.root}; run the stages before it first")
        fingerprint = self.fingerprint(stage)
        log.info("stage %-8s running", stage.name)
        started = time.monotonic()
        before = {t: self.store.version(t) for t in stage.outputs}
        output = _as_output(stage.run(self.ctx, {t: self.store.read(t) for t in stage.inputs}))
        self._write_outputs(stage, output, before)
        # Stages may persist what they read twice (ingest parses once for two tables); once the
        # tables are written nothing downstream reads those caches.
        self.spark.catalog.clearCache()
        versions = {t: self.store.version(t) for t in stage.outputs}
        counts = {t: self.store.count(t) for t in stage.outputs}
        checks = stage.check(self.ctx) or {}
        seconds = time.monotonic() - started
        shortfall = output.shortfall.as_dict() if output.shortfall else None
        self._write_state(stage.name, {
            "fingerprint": fingerprint, "versions": versions, "counts": counts,
            "seconds": round(seconds, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "summary": output.summary, "checks": checks, "shortfall": shortfall,
        })
        log.info("stage %-8s done in %.1fs: %s", stage.name, seconds,
                 ", ".join(f"{t}={n}" for t, n in counts.items()))
        if shortfall:
            log.warning("stage %-8s is not current: %s", stage.name, shortfall["message"])
        return StageResult(stage.name, False, seconds, fingerprint, versions, counts,  # type: ignore[arg-type]
                           output.summary, checks, shortfall)

    def _write_outputs(self, stage: Stage, output: StageOutput, before: dict[str, int | None]) -> None:
        """Write the tables the stage returned; the others it must have written itself."""
        undeclared = sorted(set(output.tables) - set(stage.outputs))
        if undeclared:
            raise PipelineError(f"stage {stage.name} returned table(s) it does not declare: {undeclared}")
        for table in stage.outputs:
            if table in output.tables:
                self.store.write(output.tables[table], table)
            elif table in output.unchanged and self.store.version(table) is not None:
                continue
            elif self.store.version(table) in (None, before[table]):
                raise PipelineError(f"stage {stage.name} neither returned nor wrote table {table!r}")

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
