"""The pipeline: a list of stages and the executor that runs them. Engine wiring lives here only.

Resume: after a stage has written all of its tables, the executor records a fingerprint of what
decided them (the stage's code version, its settings sections, its inputs' fingerprints, and
anything the stage adds, e.g. the input files' sizes and times) in ``<root>/_state/<stage>.json``
with the versions it wrote. A rerun skips a stage whose fingerprint matches and whose tables still
stand at the recorded versions, and recomputes from the first stage that changed. Fingerprints
chain through the inputs, so a change upstream reruns everything below it. A driver killed in the
middle of a stage leaves no state file for it, so the rerun redoes that stage (merge keeps the
LLM calls it already paid for in its ledger).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from . import __version__
from .config import Settings
from .session import build_session
from .stages import Stage, StageContext
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

    # Resolving the inputs fails fast (missing file, unknown format), before any Spark work.
    stages: list[Stage] = [Ingest.from_settings(settings), Embed(), Topics(), Dedup(), Select(), Group(), Merge(), Finalize()]
    assert tuple(s.name for s in stages) == STAGE_ORDER
    return stages


class Pipeline:
    """Runs stages in order against one run root, skipping those whose outputs are current."""

    def __init__(self, settings: Settings, spark: SparkSession | None = None,
                 stages: list[Stage] | None = None) -> None:
        self.settings = settings
        self.stages = stages if stages is not None else build_stages(settings)
        self.spark = spark or build_session(settings.spark)
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

    def _producer(self, table: str) -> Stage:
        for stage in self.stages:
            if table in stage.outputs:
                return stage
        raise PipelineError(f"no stage writes table {table!r}")

    def fingerprint(self, stage: Stage) -> str:
        upstream = {}
        for table in stage.inputs:
            producer = self._producer(table)
            state = self.state(producer.name)
            upstream[table] = state["fingerprint"] if state else self.fingerprint(producer)
        payload = {
            "stage": stage.name,
            "code": __version__,
            "settings": self.settings.fingerprint(*stage.settings_sections),
            "inputs": upstream,
            "extra": stage.extra_fingerprint(self.ctx),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def is_current(self, stage: Stage) -> bool:
        state = self.state(stage.name)
        if not state or state.get("fingerprint") != self.fingerprint(stage):
            return False
        return all(self.store.version(t) == v for t, v in state.get("versions", {}).items())

    # -- running -----------------------------------------------------------------------------
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def _index(self, name: str) -> int:
        names = self.stage_names()
        if name not in names:
            raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(names)}")
        return names.index(name)

    def run(self, only: str | None = None, force: str | None = None) -> list[StageResult]:
        """Run every stage (or ``only`` one), recomputing from ``force`` on regardless of state."""
        forced_from = self._index(force) if force else len(self.stages)
        selected = [self.stages[self._index(only)]] if only else self.stages
        results = []
        for stage in selected:
            forced = self._index(stage.name) >= forced_from
            if not forced and self.is_current(stage):
                state = self.state(stage.name) or {}
                log.info("stage %-8s up to date (fingerprint %s), skipped", stage.name, state.get("fingerprint"))
                results.append(StageResult(stage.name, True, 0.0, state.get("fingerprint", ""),
                                           state.get("versions", {}), state.get("counts", {}),
                                           state.get("summary", {})))
                continue
            results.append(self.run_stage(stage))
        return results

    def run_stage(self, stage: Stage) -> StageResult:
        missing = [t for t in stage.inputs if not self.store.exists(t)]
        if missing:
            raise PipelineError(f"stage {stage.name} needs table(s) {', '.join(missing)} under "
                                f"{self.root}; run the stages before it first")
        fingerprint = self.fingerprint(stage)
        log.info("stage %-8s running", stage.name)
        started = time.monotonic()
        inputs = {t: self.store.read(t) for t in stage.inputs}
        outputs = stage.run(self.ctx, inputs)
        # A stage may leave a small summary of its run (merge: requests and tokens paid).
        summary = getattr(stage, "summary", None) or {}
        summary = summary.as_dict() if hasattr(summary, "as_dict") else dict(summary)
        if not stage.writes_itself:
            for table in stage.outputs:
                if table not in outputs:
                    raise PipelineError(f"stage {stage.name} did not produce table {table!r}")
                self.store.write(outputs[table], table)
        # Stages may persist what they read twice (ingest parses once for two tables); once the
        # tables are written nothing downstream reads those caches.
        self.spark.catalog.clearCache()
        versions = {t: self.store.version(t) for t in stage.outputs}
        if any(v is None for v in versions.values()):
            raise PipelineError(f"stage {stage.name} left table(s) unwritten: {versions}")
        counts = {t: self.store.count(t) for t in stage.outputs}
        seconds = time.monotonic() - started
        if stage.name == "finalize":
            self.check_ledger()
        self._write_state(stage.name, {
            "fingerprint": fingerprint, "versions": versions, "counts": counts,
            "seconds": round(seconds, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "summary": summary,
        })
        log.info("stage %-8s done in %.1fs: %s", stage.name, seconds,
                 ", ".join(f"{t}={n}" for t, n in counts.items()))
        return StageResult(stage.name, False, seconds, fingerprint, versions, counts, summary)  # type: ignore[arg-type]

    def check_ledger(self) -> None:
        from .stages.finalize import check_ledger
        check_ledger(self.store)

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
                "counts": (state or {}).get("counts", {}),
                "versions": tables,
                "seconds": (state or {}).get("seconds"),
            })
        return rows

    def timings(self) -> dict[str, float]:
        return {s.name: (self.state(s.name) or {}).get("seconds", 0.0) for s in self.stages}
