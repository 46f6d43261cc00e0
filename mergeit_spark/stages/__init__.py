"""Pipeline stages. Each stage is a small class with one job: DataFrames in, write intents out.

The executor (``mergeit_spark.pipeline``) knows no stage by name; it drives every stage through
the same hooks. A stage never writes a table, a model or a state file: it returns a
:class:`StageOutput` and the executor performs every write through the store.

- ``run(ctx, tables)``, a full run: ``tables`` holds the stage's ``inputs`` as they stand. The
  output's ``tables`` maps each of its ``outputs`` to a DataFrame (overwrite) or a
  :class:`~mergeit_spark.tables.Write` (overwrite, append, merge by key); ``models`` maps a
  model name to an object with ``save(path)`` (None removes it); ``summary`` is small and
  JSON-ready (kept in the stage's state and the run log). A table the stage finds already
  holding what it would write goes in ``unchanged`` (no new version).
- ``extend(ctx, tables, added)``, an increment (``mergeit run --incremental``): ``tables`` holds
  every table of the run root (its own outputs included) as it stood before the increment; ``added`` holds,
  per table, the rows the stages above appended in this increment (in memory: the executor
  writes them in the background meanwhile), plus what they handed down in ``carry``. The stage
  returns the writes that bring its outputs up to date (an append of its new rows, a merge by
  key, a small overwrite). A stage with ``extends_from_tables`` gets ``added`` as the rows its
  tables gained, read back once every write above it is done: a short plan, where the frames
  in memory carry the plans of every stage above (finalize's MERGE source). The default says the
  stage cannot extend: the increment stops and asks for a full run.
- ``check(ctx)`` runs once every output is written (after ``run`` or ``extend``): it verifies what
  the stage promises (finalize: the ledger balances) and returns numbers for the state and the
  report, or raises to fail the run. A stage whose check fails records no state, so a rerun
  redoes it.
- ``extra_fingerprint(ctx)`` adds what beyond input tables and settings decides the output
  (ingest: the input files' sizes and times).

``version`` is the stage's code version in its fingerprint: bump it in the same commit that
changes what the stage computes from the same inputs and settings (an algorithm, a rule, a schema),
so that every run root recomputes the stage, and the stages below it, on the next run. A change
that only makes it faster leaves it alone.

``refits`` marks the stage that fits a model on every row (topics): an increment extends it with
the saved model, and ``--recluster`` reruns it, and every stage below, in full instead.

Work that failed is never reported as success: a stage whose tables are written but whose work
is partly undone for reasons a rerun can fix (merge: groups that failed on transport, server,
budget) returns a :class:`Shortfall`. The executor records it; the stage is then not current, so
the next run runs it again (and everything below it), and past the shortfall's tolerance the run
exits non-zero once every stage has written its tables.

A new stage is one module with a ``Stage`` subclass and one line in the pipeline's list of
stages (``pipeline.build_stages``); its increment is its ``extend``.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession

from ..config import Settings
from ..tables import TableStore, Write


class StageError(RuntimeError):
    """A stage cannot run as configured; the message says what to change."""


@dataclass
class Shortfall:
    """Units of a stage's work (``failed`` of ``total``) left for a rerun, and what to tell the user."""
    failed: int
    total: int
    tolerance: float   # the share of ``total`` that may fail before the run exits non-zero
    message: str

    @property
    def share(self) -> float:
        return self.failed / self.total if self.total else 0.0

    @property
    def beyond_tolerance(self) -> bool:
        return self.failed > 0 and self.share > self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {"failed": self.failed, "total": self.total, "tolerance": self.tolerance,
                "share": round(self.share, 4), "beyond_tolerance": self.beyond_tolerance,
                "message": self.message}


def new_run_id() -> str:
    """A run's id: when it started (UTC) and a random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclass
class StageContext:
    spark: SparkSession
    store: TableStore
    settings: Settings
    run_id: str = field(default_factory=new_run_id)  # this run's (or increment's) id


@dataclass
class StageOutput(Mapping[str, DataFrame]):
    """What one run or extension of a stage hands the executor; reads as the mapping of its
    tables' rows."""
    tables: dict[str, DataFrame | Write] = field(default_factory=dict)  # a DataFrame: overwrite
    summary: dict[str, Any] = field(default_factory=dict)       # small, JSON-ready: kept in state
    # Tables the stage found already holding exactly what it would write (no new version needed).
    unchanged: tuple[str, ...] = ()
    shortfall: Shortfall | None = None   # work a rerun must finish: the stage stays not current
    models: dict[str, Any] = field(default_factory=dict)  # name -> object with save(path); None removes
    # In an increment: frames (or small values) for the stages below, in their ``added``; not written.
    carry: dict[str, Any] = field(default_factory=dict)

    def writes(self) -> dict[str, Write]:
        """Each returned table as a write intent (a plain DataFrame is an overwrite)."""
        return {name: w if isinstance(w, Write) else Write.overwrite(w) for name, w in self.tables.items()}

    def __getitem__(self, name: str) -> DataFrame:
        value = self.tables[name]
        return value.rows if isinstance(value, Write) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)


def with_added(tables: Mapping[str, DataFrame], added: dict[str, Any], name: str, cache: bool = False) -> DataFrame:
    """In an increment: table ``name`` as it stood before, plus the rows added to it above. With
    ``cache``, the rows are read and decoded once for every stage below that asks with ``cache``
    too (kept in ``added``; the executor releases them when the increment ends)."""
    key = f"{name} with added rows"
    if cache and key in added:
        return added[key]
    rows = tables[name].unionByName(added[name]) if name in added else tables[name]
    if cache:
        rows = added[key] = rows.persist(StorageLevel.MEMORY_AND_DISK)
    return rows


ROWS_ADDED = "rows added"  # in ``added``: per table, how many rows the stages above appended, where known


def rows_added(added: Mapping[str, Any], name: str) -> int | None:
    """How many rows the stages above appended to table ``name`` in this increment (None: not
    known, or nothing appended)."""
    return added.get(ROWS_ADDED, {}).get(name)


class CannotExtend(StageError):
    """The stage has no increment: the run root needs a full run."""


class Stage:
    name: ClassVar[str]
    version: ClassVar[str] = "1"                  # bump when what the stage computes changes
    inputs: ClassVar[tuple[str, ...]] = ()        # tables read from the run root
    outputs: ClassVar[tuple[str, ...]] = ()       # tables written to the run root
    settings_sections: ClassVar[tuple[str, ...]] = ()  # sections whose change forces a rerun
    refits: ClassVar[bool] = False                # fits a model on every row (see the module doc)
    # In an increment: wait for the writes above, and read ``added`` from the tables written.
    extends_from_tables: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "Stage":
        """The stage for these settings (most stages need none until they run)."""
        return cls()

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        raise NotImplementedError

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """An increment: the writes that bring this stage's outputs up to date with ``added``."""
        raise CannotExtend(f"stage {self.name} cannot extend a run root: run a full run (mergeit run)")

    def check(self, ctx: StageContext) -> dict[str, Any]:
        """After the outputs are written: verify them, return numbers, or raise to fail the run."""
        return {}

    def extra_fingerprint(self, ctx: StageContext) -> str:
        """Anything beyond input tables and settings that decides the output (ingest: the files)."""
        return ""
