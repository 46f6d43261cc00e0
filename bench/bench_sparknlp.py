"""Benchmark: the spark-nlp embed backend beside the sentence-transformers one, on the same real rows.

Two processes, because the two backends live in two venvs here (Spark NLP's jar for Spark 4 is not
served by this project's Maven mirror; Spark NLP 5.5.3 runs on Spark 3.5 in .venv-sparknlp):

  1. this script in the main venv: writes the reference vectors (sentence-transformers, fp32) for
     ROWS real rows, makes both ONNX exports, and times embed.py's Spark path (local[2], a noop
     write, so that only the embedding is timed; the second pass is the warm one);
  2. the same script with ``--phase sparknlp`` in .venv-sparknlp: times Spark NLP's E5Embeddings on
     the pooled export (what the backend uses) and measures, against the reference, the cosine of
     E5 on the pooled export, E5 on the plain export (Spark NLP's own pooling) at batch sizes 1
     and 32, and BertEmbeddings + SentenceEmbeddings (average of word vectors).

Writes the ``sparknlp`` section of BENCHMARKS.md. Usage:

    .venv/bin/python bench/bench_sparknlp.py [--rows 300]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

import numpy as np  # noqa: E402

from mergeit_spark.config import load_settings  # noqa: E402

SPARKNLP_PYTHON = REPO / ".venv-sparknlp" / "bin" / "python"
BASE = ["spark.master=local[2]", "spark.driver_memory=2g", "spark.shuffle_partitions=2", "embed.partitions=2"]
SPARK3_JARS = ["spark.packages=[spark-nlp,org.tensorflow:tensorflow-core-api:0.4.2]",
               "spark.jars_excludes=[com.johnsnowlabs.nlp:tensorflow-cpu_2.12,"
               "com.johnsnowlabs.nlp:jsl-llamacpp-cpu_2.12,com.johnsnowlabs.nlp:jsl-openvino-cpu_2.12]"]


def timed_twice(run) -> tuple[float, float]:
    """Wall seconds of a cold and a warm run of ``run()``."""
    times = []
    for _ in range(2):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def python_phase(rows: int, reference: Path) -> dict:
    from _sparknlp_reference import write_reference

    from mergeit_spark.session import build_session
    from mergeit_spark.stages.embed import embed_records
    from mergeit_spark.models import export_onnx

    settings = load_settings(overrides=[*BASE, "spark.packages=[]", "embed.precision=fp32"], env={})
    write_reference(reference, rows)
    export_onnx(settings.embed)
    export_onnx(settings.embed, pooled=False)
    spark = build_session(settings.spark)
    try:
        records = spark.read.parquet(str(reference)).select("id", "instruction", "input").cache()
        records.count()
        cold, warm = timed_twice(lambda: embed_records(records, settings.embed).write.format("noop")
                                 .mode("overwrite").save())
    finally:
        spark.stop()
    return {"rows": rows, "cold_s": cold, "warm_s": warm}


def sparknlp_phase(reference: Path) -> dict:
    import pyarrow.parquet as pq

    from mergeit_spark.session import build_session
    from mergeit_spark.stages.embed_sparknlp import embed_records

    settings = load_settings(overrides=[*BASE, *SPARK3_JARS, "embed.backend=spark-nlp"], env={})
    spark = build_session(settings.spark)
    try:
        records = spark.read.parquet(str(reference)).select("id", "instruction", "input").cache()
        n = records.count()
        cold, warm = timed_twice(lambda: embed_records(records, settings.embed).write.format("noop")
                                 .mode("overwrite").save())
        truth = {r["id"]: np.array(r["embedding"], dtype=np.float64) for r in pq.read_table(reference).to_pylist()}
        fidelity = {"E5, pooled export (the backend)": cosines(embed_records(records, settings.embed), truth)}
        fidelity.update(spark_nlp_pooling(spark, records, settings, truth))
    finally:
        spark.stop()
    return {"rows": n, "cold_s": cold, "warm_s": warm, "fidelity": fidelity}


def spark_nlp_pooling(spark, records, settings, truth: dict) -> dict:
    """Spark NLP pooling the plain export itself: E5 (masked mean) and BERT word vectors averaged."""
    from pyspark.ml import Pipeline
    from sparknlp.annotator import BertEmbeddings, E5Embeddings, SentenceEmbeddings, Tokenizer
    from sparknlp.base import DocumentAssembler

    from mergeit_spark.models import spark_nlp_model_dir
    from mergeit_spark.stages.embed_sparknlp import record_text

    plain = str(spark_nlp_model_dir(settings.embed) / "onnx-unpooled")
    texts = records.select("id", record_text().alias("text"))
    document = DocumentAssembler().setInputCol("text").setOutputCol("document")
    found = {}
    for batch in (1, 32):
        e5 = (E5Embeddings.loadSavedModel(plain, spark).setInputCols(["document"]).setOutputCol("vec")
              .setCaseSensitive(False).setMaxSentenceLength(settings.embed.max_seq_length).setBatchSize(batch))
        found[f"E5, Spark NLP pooling, batch {batch}"] = cosines(vectors(Pipeline(stages=[document, e5]), texts), truth)
    bert = (BertEmbeddings.loadSavedModel(plain, spark).setInputCols(["document", "token"]).setOutputCol("words")
            .setCaseSensitive(False).setMaxSentenceLength(settings.embed.max_seq_length))
    average = SentenceEmbeddings().setInputCols(["document", "words"]).setOutputCol("vec").setPoolingStrategy("AVERAGE")
    stages = [document, Tokenizer().setInputCols(["document"]).setOutputCol("token"), bert, average]
    found["BertEmbeddings + SentenceEmbeddings (average)"] = cosines(vectors(Pipeline(stages=stages), texts), truth)
    return found


def vectors(pipeline, texts):
    from pyspark.sql import functions as F

    from mergeit_spark.stages.embed_sparknlp import unit_length

    out = pipeline.fit(texts).transform(texts)
    return out.select("id", unit_length(F.col("vec").getItem(0).getField("embeddings")).alias("embedding"))


def cosines(embeddings, truth: dict) -> dict:
    # A benchmark on a few hundred rows: bringing the vectors to the driver is the measurement.
    values = np.array([np.dot(np.array(r["embedding"], dtype=np.float64), truth[r["id"]])
                       for r in embeddings.select("id", "embedding").collect()])
    return {"mean": float(values.mean()), "min": float(values.min()), "p1": float(np.percentile(values, 1)),
            "share_ge_0.999": float(np.mean(values >= 0.999))}


def report(python: dict, sparknlp: dict) -> str:
    rows = python["rows"]
    lines = ["| backend | rows | cold s | warm s | warm rows/s |", "|---|---|---|---|---|",
             f"| sentence-transformers (torch, Python workers; Spark 4.1) | {rows} | {python['cold_s']:.1f} | "
             f"{python['warm_s']:.1f} | {rows / python['warm_s']:.1f} |",
             f"| spark-nlp (E5Embeddings, ONNX in the JVM; Spark 3.5, Spark NLP 5.5.3) | {sparknlp['rows']} | "
             f"{sparknlp['cold_s']:.1f} | {sparknlp['warm_s']:.1f} | {sparknlp['rows'] / sparknlp['warm_s']:.1f} |",
             "", f"spark-nlp / sentence-transformers, warm: {python['warm_s'] / sparknlp['warm_s']:.2f}x the rows/s",
             "", "Cosine to sentence-transformers (fp32) on the same rows:", "",
             "| how | mean | min | 1st percentile | share >= 0.999 |", "|---|---|---|---|---|"]
    for name, f in sparknlp["fidelity"].items():
        lines.append(f"| {name} | {f['mean']:.4f} | {f['min']:.4f} | {f['p1']:.4f} | {f['share_ge_0.999']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--phase", choices=["python", "sparknlp"], default="python")
    parser.add_argument("--reference", type=Path, default=REPO / "out" / "sparknlp" / "bench-reference.parquet")
    args = parser.parse_args()
    if args.phase == "sparknlp":
        print(json.dumps(sparknlp_phase(args.reference)))
        return
    python = python_phase(args.rows, args.reference)
    done = subprocess.run([str(SPARKNLP_PYTHON), __file__, "--phase", "sparknlp", "--reference", str(args.reference)],
                          capture_output=True, text=True, check=True)
    sparknlp = json.loads(done.stdout.strip().splitlines()[-1])
    body = report(python, sparknlp)
    print(body)
    from bench._common import write_section
    write_section("sparknlp", body)


if __name__ == "__main__":
    main()
