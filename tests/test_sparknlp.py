"""The spark-nlp embed backend for real: Spark NLP's jar resolved by Ivy, the model exported to ONNX,
imported with loadSavedModel, run inside the JVM on 300 real rows, and compared with the
sentence-transformers vectors of the same rows.

Where it runs: in the Spark NLP venv (`make test` builds .venv-sparknlp: pyspark 3.5 + Spark NLP
5.5.3, whose jar this project's Maven mirror serves). In the main venv (pyspark 4.1, Spark NLP
7.0.0) it skips, saying so, when the jar for that Spark cannot be resolved (the mirror here serves
no Spark NLP for Scala 2.13). The Spark work runs in a child process with its own session: a
session already running in this process cannot take new jars.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyspark
import pytest
from deltalake import DeltaTable

from mergeit_spark.config import load_settings
from mergeit_spark.jars import jar_conf, resolution_failure, spark_nlp_coordinate
from mergeit_spark.models import EXPORT_INFO, spark_nlp_model_dir

pytestmark = pytest.mark.slow  # a child Spark session with Spark NLP: not in `make test-fast`
REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MERGEIT_SPARKNLP_REFERENCE", REPO / "out" / "sparknlp" / "reference.parquet"))
# Spark NLP 5.5.3's jar depends on native engines (TensorFlow, OpenVINO, llama.cpp) that the ONNX
# path never runs and this project's mirror does not serve; TensorFlow's Java classes are still
# touched when the model is serialised, so they come from tensorflow-core-api (no natives).
SPARK3_MIRROR = [
    "spark.packages=[spark-nlp,org.tensorflow:tensorflow-core-api:0.4.2]",
    "spark.jars_excludes=[com.johnsnowlabs.nlp:tensorflow-cpu_2.12,com.johnsnowlabs.nlp:jsl-llamacpp-cpu_2.12,"
    "com.johnsnowlabs.nlp:jsl-openvino-cpu_2.12]",
]


def overrides() -> list[str]:
    jars = SPARK3_MIRROR if pyspark.__version__.startswith("3.") else ["spark.packages=[spark-nlp]"]
    return ["spark.master=local[2]", "spark.driver_memory=2g", "embed.backend=spark-nlp", *jars]


JAR_FAILURE = "Spark could not start: spark.packages"  # the JarsError, raised or logged by the command


def skip_unresolved(settings, why: str) -> None:
    pytest.skip(f"Spark NLP's jar for pyspark {pyspark.__version__} ({spark_nlp_coordinate()}) does not "
                f"resolve from {settings.spark.repositories}: {why}")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    settings = load_settings(overrides=overrides(), env={})
    if not REFERENCE.is_file():  # the main venv has torch to make it; the Spark NLP venv has not
        failure = resolution_failure(jar_conf(settings.spark))  # no reference work for a test that skips
        if failure:
            skip_unresolved(settings, failure.splitlines()[0])
        if importlib.util.find_spec("torch") is None:
            pytest.fail(f"no reference vectors at {REFERENCE}: run `make sparknlp-prep` in the main venv")
        from _sparknlp_reference import write_reference
        write_reference(REFERENCE)
    root = tmp_path_factory.mktemp("sparknlp") / "run"
    args = [arg for item in overrides() for arg in ("--set", item)]
    # Spark NLP 5.5 leaves a copy of every ONNX model it loads in java.io.tmpdir (87 MB a load,
    # fixed upstream by spark-nlp PR 14792): keep those copies under pytest's own temp folder.
    jvm_tmp = tmp_path_factory.mktemp("jvm-tmp")
    env = {**os.environ, "JAVA_TOOL_OPTIONS": f"-Djava.io.tmpdir={jvm_tmp}"}
    reference = pq.read_table(REFERENCE).to_pylist()
    done = subprocess.run([sys.executable, str(REPO / "tests" / "_sparknlp_child.py"), str(len(reference)),
                           str(root), *args], capture_output=True, text=True, timeout=1800, check=False,
                          env=dict(env, PYTHONPATH=str(REPO / "tests")))
    # No resolution ahead of the child (a whole spark-submit): where the jar does not resolve, the
    # child's session start fails with the JarsError that names the setting and quotes Ivy.
    if done.returncode != 0 and JAR_FAILURE in done.stderr:
        ivy = done.stderr[done.stderr.rindex(JAR_FAILURE):].split("Ivy said:\n", 1)[-1]
        skip_unresolved(settings, ivy.splitlines()[0] if ivy.strip() else "see the JarsError")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    table = DeltaTable(str(root / "embeddings"))
    rows = {r["id"]: r for r in table.to_pyarrow_table().to_pylist()}
    return settings, reference, rows, table


def test_every_row_is_embedded_once_unit_length(embedded):
    _, reference, rows, _ = embedded
    assert sorted(rows) == sorted(r["id"] for r in reference)
    norms = np.array([np.linalg.norm(np.array(r["embedding"], dtype=np.float64)) for r in rows.values()])
    assert np.allclose(norms, 1.0, atol=1e-5)
    assert {len(r["embedding"]) for r in rows.values()} == {384}
    assert {(r["model"], r["precision"]) for r in rows.values()} == {("all-MiniLM-L6-v2", "fp32")}


def test_vectors_match_sentence_transformers(embedded):
    """Measured here on 300 real rows: mean cosine 0.9995, 299 rows above 0.9999, one row of French
    in brackets and quotes at 0.859 (Spark NLP's tokenizer splits it differently)."""
    _, reference, rows, _ = embedded
    cosine = np.array([np.dot(np.array(rows[r["id"]]["embedding"], dtype=np.float64),
                              np.array(r["embedding"], dtype=np.float64)) for r in reference])
    assert cosine.mean() >= 0.999, cosine.mean()
    assert np.mean(cosine >= 0.999) >= 0.98, np.sort(cosine)[:10]
    assert cosine.min() >= 0.8, cosine.min()


def test_schema_is_embed_py_s(embedded):
    from mergeit_spark.stages.embed import EMBEDDINGS_SCHEMA

    _, _, _, table = embedded
    logged = json.loads(table.schema().to_json())["fields"]
    assert [(f["name"], without_nullability(f["type"])) for f in logged] == \
        [(f.name, without_nullability(json.loads(f.dataType.json()))) for f in EMBEDDINGS_SCHEMA]


def without_nullability(dtype):
    """A Delta/Spark JSON type with its nullability flags left out (names and types only)."""
    if isinstance(dtype, dict):
        return {k: without_nullability(v) for k, v in dtype.items() if k not in ("containsNull", "nullable")}
    if isinstance(dtype, list):
        return [without_nullability(v) for v in dtype]
    return dtype


def test_the_export_and_the_imported_model_are_kept_for_reuse(embedded):
    settings, *_ = embedded
    folder = spark_nlp_model_dir(settings.embed)
    info = json.loads((folder / "onnx" / EXPORT_INFO).read_text())
    assert info["graph"] == "pooled-per-token" and info["max_seq_length"] == settings.embed.max_seq_length
    assert (folder / "e5" / "metadata").is_dir()
