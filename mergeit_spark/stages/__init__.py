"""Pipeline stages. Each stage is a small class with one job: DataFrames in, DataFrames out.

The pipeline (``mergeit_spark.pipeline``) reads a stage's input tables, calls ``run`` and writes
what it returns under the run root; stages never touch the engine wiring themselves. A stage
whose result must be durable while it runs (merge: paid LLM calls) sets ``writes_itself`` and
writes through ``ctx.store`` as it goes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pyspark.sql import DataFrame, SparkSession

from ..config import Settings
from ..tables import TableStore


@dataclass
class StageContext:
    spark: SparkSession
    store: TableStore
    settings: Settings


class Stage:
    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()        # tables read from the run root
    outputs: ClassVar[tuple[str, ...]] = ()       # tables written to the run root
    settings_sections: ClassVar[tuple[str, ...]] = ()  # sections whose change forces a rerun
    writes_itself: ClassVar[bool] = False

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> dict[str, DataFrame]:
        raise NotImplementedError

    def extra_fingerprint(self, ctx: StageContext) -> str:
        """Anything beyond input tables and settings that decides the output (ingest: the files)."""
        return ""
