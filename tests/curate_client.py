"""A user's own Spark Connect job, run by tests/test_connect.py in a process of its own (a process
that opens a Connect session stays in Connect mode): it makes a DataFrame of new rows in its
session, adds them to a finished run root with ``curate(df, incremental=True)``, writes the report
with ``Curated.report()``, and prints, as one JSON line, what it read back through its session.

    python tests/curate_client.py <spec.json>

``spec.json``: ``url`` (the Connect server), ``overrides`` (the ``--set`` overrides of the run
root's full run, ``spark.remote`` among them), ``rows`` (dicts with ``prompt``, ``input``,
``output``: the column mapping is part of what is tested).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from mergeit_spark import curate
from mergeit_spark.config import load_settings
from mergeit_spark.session import is_connect


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    spark = SparkSession.builder.remote(spec["url"]).getOrCreate()
    df = spark.createDataFrame(spec["rows"], "prompt string, input string, output string")
    # The settings of the run root's full run; curate's snapshot of ``df`` becomes the input list.
    settings = load_settings(overrides=spec["overrides"], env={})
    result = curate(df, settings, columns={"instruction": "prompt"}, incremental=True)
    page = result.report()
    fates = result.lineage.groupBy("fate").count().collect()  # an aggregate: a row per fate
    print(json.dumps({
        "connect": is_connect(result.final.sparkSession),
        "new_inputs": result.increment.new_inputs,
        "final_rows": result.final.count(),
        "fates": {r["fate"]: r["count"] for r in fates},
        "report": page,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
