"""Child process of tests/test_sparknlp.py: its own session with Spark NLP's jar (a test session
already running elsewhere cannot take new jars), the spark-nlp embed backend over the reference
rows, and the result written as the ``embeddings`` Delta table under the given root.

``python tests/_sparknlp_child.py REFERENCE.parquet ROOT [--set section.key=value ...]``;
prints one JSON line: rows, seconds spent embedding.
"""
from __future__ import annotations

import json
import sys
import time

from mergeit_spark.config import load_settings
from mergeit_spark.session import build_session
from mergeit_spark.stages.embed_sparknlp import embed_records
from mergeit_spark.tables import TableStore


def main(reference: str, root: str, overrides: list[str]) -> None:
    settings = load_settings(overrides=overrides, env={})
    spark = build_session(settings.spark)
    try:
        records = spark.read.parquet(reference).select("id", "instruction", "input")
        started = time.perf_counter()
        TableStore(spark, root, engine="delta-rs").write(embed_records(records, settings.embed), "embeddings")
        print(json.dumps({"rows": records.count(), "seconds": time.perf_counter() - started}))
    finally:
        spark.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [a for a in sys.argv[3:] if a != "--set"])
