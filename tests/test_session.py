"""The session's own defaults, beyond Delta's (test_jars.py): what a session that runs the
pipeline more than once relies on."""
from __future__ import annotations

from mergeit_spark.session import CODEGEN_CACHE_ENTRIES


def compilations(spark) -> int:
    """How many query classes the session's JVM has compiled so far (Spark's codegen metric)."""
    return spark._jvm.org.apache.spark.metrics.source.CodegenMetrics.METRIC_COMPILATION_TIME().getCount()  # noqa: SLF001


def test_a_query_run_again_after_many_others_is_not_compiled_again(spark):
    """One run of the pipeline generates more query classes than Spark keeps by default (100):
    the session keeps ``CODEGEN_CACHE_ENTRIES``, so a second run (an increment) finds its
    classes compiled rather than compiling every one, and the JVM its machine code."""
    assert int(spark.conf.get("spark.sql.codegen.cache.maxEntries")) == CODEGEN_CACHE_ENTRIES > 150

    def query() -> list:
        return spark.range(5).selectExpr("id * 7919 + 1 AS x").filter("x % 3 = 0").collect()

    rows = query()
    started = compilations(spark)
    for k in range(150):  # 150 other classes: an integer literal is written into the generated code
        spark.range(1).selectExpr(f"id * 104729 + {k} AS x").collect()
    assert compilations(spark) >= started + 150  # each one was compiled: the counter sees them
    before = compilations(spark)
    assert query() == rows
    assert compilations(spark) == before
