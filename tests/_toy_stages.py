"""Three tiny stages on real Spark and real Delta, for executor and fingerprint tests: the
executor must drive them as it drives MergeIT's stages, knowing none of them by name.

    source (settings: embed) -> numbers -> double (settings: topics) -> doubled -> total -> total

``total`` checks its table after it is written. ``source`` and ``double`` can extend (an
increment adds ``NEW`` numbers); ``total`` cannot. ``keyed`` writes by every intent: a merge by
key, an append, a model.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mergeit_spark.stages import Stage, StageContext, StageOutput
from mergeit_spark.tables import Write

ROWS = 10
NEW = 5  # the numbers an increment adds


class Source(Stage):
    name = "source"
    outputs = ("numbers",)
    settings_sections = ("embed",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        return StageOutput({"numbers": ctx.spark.range(ROWS).withColumnRenamed("id", "n")},
                           summary={"made": ROWS})

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        have = tables["numbers"].count()
        if have >= ROWS + NEW:
            return StageOutput()  # nothing new
        new = ctx.spark.range(have, ROWS + NEW).withColumnRenamed("id", "n").persist()
        return StageOutput({"numbers": Write.append(new, new.count())}, summary={"counts": {"new": ROWS + NEW - have}})


class Double(Stage):
    name = "double"
    inputs = ("numbers",)
    outputs = ("doubled",)
    settings_sections = ("topics",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        return StageOutput({"doubled": tables["numbers"].select((F.col("n") * 2).alias("n"))})

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        return StageOutput({"doubled": Write.append(added["numbers"].select((F.col("n") * 2).alias("n")))})


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


class Model:
    """A toy model: ``save(location)`` writes its one number into a file there."""

    def __init__(self, value: int) -> None:
        self.value = value

    def save(self, location) -> None:
        (location / "value").write_bytes(str(self.value).encode())


class Keyed(Stage):
    """numbers -> squares (merged by key n: inserts, updates), log (appended), a saved model."""
    name = "keyed"
    inputs = ("numbers",)
    outputs = ("squares", "log")

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        squares = tables["numbers"].select("n", (F.col("n") * F.col("n")).alias("square"))
        first = not ctx.store.exists("squares")
        return StageOutput({"squares": squares if first else Write.merge(squares, ["n"]),
                            "log": Write.append(ctx.spark.range(1).select(F.lit(ctx.run_id).alias("run_id")))},
                           models={"toy": Model(tables["numbers"].count())})


def toy_stages() -> list[Stage]:
    return [Source(), Double(), Total()]
