"""Pipeline stages. Each stage is a small class with one job: DataFrames in, DataFrames out.

The executor (``mergeit_spark.pipeline``) knows no stage by name; it drives every stage through
the same hooks, in this order:

1. ``run(ctx, tables)`` gets the stage's input tables and returns a :class:`StageOutput`: the
   tables for the executor to write (any of ``outputs``) and a small JSON-ready ``summary``.
   A stage whose result must be durable while it runs (merge: paid LLM calls) writes that table
   through ``ctx.store`` itself and leaves it out of ``StageOutput.tables``; the executor then
   checks that the table did get a new version.
2. The executor writes the returned tables.
3. ``check(ctx)`` runs once every output table is written: it verifies what the stage promises
   (finalize: the ledger balances) and returns numbers for the stage's state and the report, or
   raises to fail the run. A stage whose check fails records no state, so a rerun redoes it.

``extra_fingerprint`` adds what beyond input tables and settings decides the output (ingest:
the input files' sizes and times).

``version`` is the stage's code version in its fingerprint: bump it in the same commit that
changes what the stage computes from the same inputs and settings (an algorithm, a rule, a schema),
so that every run root recomputes the stage, and the stages below it, on the next run. A change
that only makes it faster leaves it alone.

Work that failed is never reported as success: a stage whose tables are written but whose work
is partly undone for reasons a rerun can fix (merge: groups that failed on transport, server,
budget) returns a :class:`Shortfall`. The executor records it; the stage is then not current, so
the next run runs it again (and everything below it), and past the shortfall's tolerance the run
exits non-zero once every stage has written its tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from pyspark.sql import DataFrame, SparkSession

from ..config import Settings
from ..tables import TableStore


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


@dataclass
class StageContext:
    spark: SparkSession
    store: TableStore
    settings: Settings


@dataclass
class StageOutput(Mapping[str, DataFrame]):
    """What one run of a stage hands the executor; reads as the mapping of its tables."""
    tables: dict[str, DataFrame] = field(default_factory=dict)  # to be written under the run root
    summary: dict[str, Any] = field(default_factory=dict)       # small, JSON-ready: kept in state
    # Tables the stage found already holding exactly what it would write (no new version needed).
    unchanged: tuple[str, ...] = ()
    shortfall: Shortfall | None = None   # work a rerun must finish: the stage stays not current

    def __getitem__(self, name: str) -> DataFrame:
        return self.tables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)


class Stage:
    name: ClassVar[str]
    version: ClassVar[str] = "1"                  # bump when what the stage computes changes
    inputs: ClassVar[tuple[str, ...]] = ()        # tables read from the run root
    outputs: ClassVar[tuple[str, ...]] = ()       # tables written to the run root
    settings_sections: ClassVar[tuple[str, ...]] = ()  # sections whose change forces a rerun

    @classmethod
    def from_settings(cls, settings: Settings) -> "Stage":
        """The stage for these settings (most stages need none until they run)."""
        return cls()

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        raise NotImplementedError

    def check(self, ctx: StageContext) -> dict[str, Any]:
        """After the outputs are written: verify them, return numbers, or raise to fail the run."""
        return {}

    def extra_fingerprint(self, ctx: StageContext) -> str:
        """Anything beyond input tables and settings that decides the output (ingest: the files)."""
        return ""
