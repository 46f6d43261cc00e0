"""Small real inputs for the group and merge tests: rows of ../shared/data/mergeit-6k.json with
content ids, real MiniLM embeddings (``encode_texts``), and merge groups found by the group stage's
own per-cluster algorithm."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from mergeit_spark.config import EmbedSettings
from mergeit_spark.ids import content_id, group_id
from mergeit_spark.llm.gate import embedding_text
from mergeit_spark.stages.group import group_cluster

RECORDS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False), T.StructField("instruction", T.StringType()),
    T.StructField("input", T.StringType()), T.StructField("output", T.StringType()),
    T.StructField("source", T.StringType()), T.StructField("extra", T.StringType())])
EMBEDDINGS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("embedding", T.ArrayType(T.FloatType(), False), False),
    T.StructField("model", T.StringType(), False)])
GROUPS_SCHEMA = T.StructType([
    T.StructField("group_id", T.StringType(), False), T.StructField("cluster", T.IntegerType(), False),
    T.StructField("member_ids", T.ArrayType(T.StringType(), False), False),
    T.StructField("similarity", T.DoubleType(), False)])


def load_rows(shared_data: Path, n: int, offset: int = 0) -> list[dict]:
    """``n`` real records (with content ids) from mergeit-6k.json."""
    data = json.loads((shared_data / "mergeit-6k.json").read_text())[offset:offset + n]
    rows = []
    for r in data:
        ins, inp, out = r["instruction"].strip(), (r.get("input") or "").strip(), r["output"].strip()
        rows.append({"id": content_id(ins, inp, out), "instruction": ins, "input": inp, "output": out,
                     "source": "mergeit-6k.json", "extra": None})
    return rows


@lru_cache(maxsize=8)
def _encode_cached(texts: tuple[str, ...], model: str) -> np.ndarray:
    from mergeit_spark.models import encode_texts
    return encode_texts(list(texts), EmbedSettings(model=model))


def embed_rows(rows: list[dict], embed: EmbedSettings) -> np.ndarray:
    return _encode_cached(tuple(embedding_text(r["instruction"], r["input"]) for r in rows), embed.model)


def make_inputs(spark: SparkSession, rows: list[dict], embed: EmbedSettings, threshold: float = 0.5,
                size: int = 2, max_groups: int | None = None
                ) -> tuple[DataFrame, DataFrame, DataFrame, list[list[str]]]:
    """``records``, ``embeddings`` and ``merge_groups`` DataFrames for ``rows`` (one cluster)."""
    vectors = embed_rows(rows, embed)
    found = group_cluster([r["id"] for r in rows], vectors, threshold, size)
    if max_groups is not None:
        found = found[:max_groups]
    records = spark.createDataFrame(rows, RECORDS_SCHEMA)
    embeddings = spark.createDataFrame(
        [{"id": r["id"], "embedding": [float(x) for x in v], "model": embed.model}
         for r, v in zip(rows, vectors)], EMBEDDINGS_SCHEMA)
    groups = spark.createDataFrame(
        [{"group_id": group_id(m), "cluster": 0, "member_ids": m, "similarity": s} for m, s in found],
        GROUPS_SCHEMA)
    return records, embeddings, groups, [m for m, _ in found]


REJECTS_SCHEMA = T.StructType([
    T.StructField("source", T.StringType()), T.StructField("line", T.LongType()),
    T.StructField("row", T.LongType()), T.StructField("raw", T.StringType()),
    T.StructField("reason", T.StringType()), T.StructField("detail", T.StringType())])


def finalize_merges(spark: SparkSession, records: DataFrame, groups: DataFrame, merges: DataFrame):
    """``final`` and ``lineage`` for merge-test inputs, every record selected and kept by dedup (no
    rejects), and the ledger check of finalize on them (raises when it does not balance)."""
    from pyspark.sql import functions as F

    from mergeit_spark.stages.finalize import build_lineage_and_final, check_ledger
    rejects = spark.createDataFrame([], REJECTS_SCHEMA)
    dedup = records.select("id", F.lit(0).alias("cluster"), F.lit("kept").alias("status"),
                           F.lit(None).cast("string").alias("duplicate_of"))
    selected = records.select("id")
    final, lineage = build_lineage_and_final(records, rejects, dedup, selected, groups, merges)
    numbers = check_ledger(records, rejects, lineage, final, input_rows=records.count())
    return final, lineage, numbers


def run_merge_stage(ctx, groups: DataFrame, records: DataFrame, embeddings: DataFrame):
    """The merge stage over these frames, run by the executor (which writes ``merges`` and logs
    the pass) against ``ctx.store``'s run root: its summary, with the version of ``merges`` left."""
    import copy
    from dataclasses import fields

    from mergeit_spark.pipeline import Pipeline
    from mergeit_spark.stages.decontam import no_evaluation
    from mergeit_spark.stages.merge import Merge, MergeRunSummary
    settings = copy.deepcopy(ctx.settings)
    settings.output.root, settings.tables.engine = str(ctx.store.root), ctx.store.engine
    pipeline = Pipeline(settings, spark=ctx.spark, stages=[Merge()])
    result = pipeline.run_stage(pipeline.stages[0], {"merge_groups": groups, "records": records,
                                                     "embeddings": embeddings, **no_evaluation(ctx.spark)})
    summary = MergeRunSummary(**{f.name: result.summary[f.name] for f in fields(MergeRunSummary)})
    summary.table_version = result.versions["merges"]
    return summary


def kill_a_merge_worker(driver: list, killed: list, at: int = 3):
    """A script for the scripted LLM: at request ``at`` a merge task has requests in flight; kill
    the Python worker running it (the first process in ``driver``'s tree that is a pyspark daemon's
    fork), so that Spark runs the task again. The pids killed go to ``killed``."""
    import psutil

    from fake_openai import Reply

    def script(n, key, request):
        if n == at and driver:
            for proc in psutil.Process(driver[0].pid).children(recursive=True):
                try:
                    if "pyspark.daemon" in " ".join(proc.cmdline()) and proc.parent().name() != "java":
                        proc.kill()
                        killed.append(proc.pid)
                except psutil.Error:
                    pass
        return Reply()
    return script
