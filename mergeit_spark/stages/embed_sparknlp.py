"""Embed backend inside the JVM (``embed.backend=spark-nlp``): Spark NLP runs the configured
sentence-transformers model, exported once to ONNX. No Python worker, no torch on the executors.

The model (why E5Embeddings, the ONNX export, the import into Spark NLP, the pipeline that runs it)
is ``models.py``'s: ``spark_nlp_embedder``. The stage is that pipeline (DocumentAssembler →
E5Embeddings) over the record text, then L2 normalisation in Spark SQL. ``python -m
mergeit_spark.stages.embed_sparknlp export`` makes the ONNX export (where torch is installed).
"""
from __future__ import annotations

import argparse
import sys

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ..config import EmbedSettings
from ..models import export_onnx, spark_nlp_embedder


def record_text() -> Column:
    """``(instruction + " " + input).strip()`` as embed.py computes it (nulls count as empty)."""
    joined = F.concat_ws(" ", F.coalesce("instruction", F.lit("")), F.coalesce("input", F.lit("")))
    return F.regexp_replace(joined, r"(?U)^\s+|\s+$", "")


def unit_length(vector: Column) -> Column:
    norm = F.sqrt(F.aggregate(vector, F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    return F.transform(vector, lambda x: (x / norm).cast("float"))


def embed_records(records: DataFrame, settings: EmbedSettings) -> DataFrame:
    """The ``embeddings`` table for ``records`` (embed.py's schema), computed inside the JVM."""
    from .embed import EMBEDDINGS_SCHEMA

    if settings.partitions > 0:
        records = records.repartition(settings.partitions)
    texts = records.select("id", record_text().alias("text"))
    annotated = spark_nlp_embedder(records.sparkSession, settings, "text", "e5").transform(texts)
    vector = F.col("e5").getItem(0).getField("embeddings")
    out = annotated.select("id", unit_length(vector).alias("embedding"),
                           F.lit(settings.model).alias("model"), F.lit("fp32").alias("precision"))
    return out.select([f.name for f in EMBEDDINGS_SCHEMA])  # embed.py's columns, in its order


def main(argv: list[str] | None = None) -> int:
    from ..config import load_settings

    parser = argparse.ArgumentParser(prog="python -m mergeit_spark.stages.embed_sparknlp",
                                     description="Export embed.model to ONNX for embed.backend=spark-nlp.")
    parser.add_argument("command", choices=["export"])
    parser.add_argument("--conf", action="append", default=[], help="settings profile (YAML)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="section.key=value")
    args = parser.parse_args(argv)
    print(export_onnx(load_settings(args.conf, args.overrides).embed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
