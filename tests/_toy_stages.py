"""Three tiny stages on real Spark and real Delta, for executor and fingerprint tests: the
executor must drive them as it drives MergeIT's stages, knowing none of them by name.

    source (settings: embed) -> numbers -> double (settings: topics) -> doubled -> total -> total

``total`` checks its table after it is written; ``ledgered`` writes its table itself.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mergeit_spark.stages import Stage, StageContext, StageOutput

ROWS = 10


class Source(Stage):
    name = "source"
    outputs = ("numbers",)
    settings_sections = ("embed",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        return StageOutput({"numbers": ctx.spark.range(ROWS).withColumnRenamed("id", "n")},
                           summary={"made": ROWS})


class Double(Stage):
    name = "double"
    inputs = ("numbers",)
    outputs = ("doubled",)
    settings_sections = ("topics",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        return StageOutput({"doubled": tables["numbers"].select((F.col("n") * 2).alias("n"))})


class Total(Stage):
    name = "total"
    inputs = ("doubled",)
    outputs = ("total",)
    expected = ROWS * (ROWS - 1)  # 2 * (0 + 1 + ... + 9)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        return StageOutput({"total": tables["doubled"].agg(F.sum("n").alias("total"))})

    def check(self, ctx: StageContext) -> dict:
        total = ctx.store.read("total").first()["total"]
        if total != self.expected:
            raise ValueError(f"total {total} != {self.expected}")
        return {"total": total}


class Ledgered(Stage):
    """Writes its table through the store as it goes (as merge does), returns only a summary."""
    name = "ledgered"
    inputs = ("numbers",)
    outputs = ("ledger",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        version = ctx.store.write(tables["numbers"].filter("n % 2 = 0"), "ledger")
        return StageOutput(summary={"written_version": version})


def toy_stages() -> list[Stage]:
    return [Source(), Double(), Total()]
