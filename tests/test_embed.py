"""Embed stage on real text with the real all-MiniLM-L6-v2, through local Spark."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from _filter_helpers import filter_sample, records_frame, sample_embeddings
from mergeit_spark.stages import StageContext
from mergeit_spark.stages.embed import (Embed, embed_records, encode_texts, resolve_model_path)


def _texts(records: list[dict]) -> list[str]:
    return [(r["instruction"] + " " + r["input"]).strip() for r in records]


def test_embeddings_are_unit_length_and_match_sentence_transformers(spark, shared_data, settings):
    from sentence_transformers import SentenceTransformer

    sample = filter_sample(spark, shared_data)
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    rows = embeddings.collect()  # test-only: a few hundred rows
    assert len(rows) == len(sample.records)
    assert {r["id"] for r in rows} == {r["id"] for r in sample.records}
    assert {r["model"] for r in rows} == {settings.embed.model}
    by_id = {r["id"]: np.asarray(r["embedding"], dtype=np.float32) for r in rows}
    matrix = np.stack(list(by_id.values()))
    assert matrix.shape[1] == 384
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)

    # Every 3rd record plus the longest ones (truncated at max_seq_length), empty inputs included.
    chosen = sample.records[::5]
    chosen += sorted(sample.records, key=lambda r: -len(r["instruction"] + r["input"]))[:5]
    assert any(r["input"] == "" for r in chosen) and any(r["input"] for r in chosen)
    reference = SentenceTransformer(resolve_model_path(settings.embed.model), device="cpu")
    reference.max_seq_length = settings.embed.max_seq_length
    expected = reference.encode(_texts(chosen), batch_size=32, normalize_embeddings=True)
    ours = np.stack([by_id[r["id"]] for r in chosen])
    assert np.abs(ours - expected).max() <= 1e-5


def test_model_loads_once_per_worker_process(spark, shared_data, settings):
    sample = filter_sample(spark, shared_data)
    frame = records_frame(spark, sample.records[:120])
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key)
    spark.conf.set(key, "10")  # many Arrow batches per task, several tasks per worker
    try:
        embed_settings = dataclasses.replace(settings.embed, partitions=3)
        stats = (embed_records(frame, embed_settings, with_worker_stats=True)
                 .groupBy("worker_pid").agg({"worker_model_loads": "max", "id": "count"})
                 .collect())
    finally:
        spark.conf.set(key, before)
    loads = {r["worker_pid"]: r["max(worker_model_loads)"] for r in stats}
    rows = {r["worker_pid"]: r["count(id)"] for r in stats}
    assert os.getpid() not in loads  # embedded in Python workers, not the driver
    assert set(loads.values()) == {1}, loads  # each process loaded the model exactly once
    assert sum(rows.values()) == 120
    assert max(rows.values()) > 10 * 2  # at least one process served several batches


def test_length_sorted_batches_give_the_same_vectors_in_row_order(settings):
    texts = ["Short.", "A somewhat longer instruction about the weather in spring.",
             "x " * 300, "", "Translate 'good morning' into French.", "Why is the sky blue?"] * 2
    embed_settings = dataclasses.replace(settings.embed, batch_size=4)
    sorted_run = encode_texts(texts, embed_settings, sort_by_length=True)
    plain_run = encode_texts(texts, embed_settings, sort_by_length=False)
    assert sorted_run.dtype == np.float32 and sorted_run.shape == (12, 384)
    np.testing.assert_allclose(sorted_run, plain_run, atol=1e-5)
    np.testing.assert_allclose(sorted_run[0], sorted_run[6], atol=1e-6)  # same text, same vector


def test_partitions_setting(spark, shared_data, settings):
    sample = filter_sample(spark, shared_data)
    single = records_frame(spark, sample.records[:50]).coalesce(1)
    spread = embed_records(single, dataclasses.replace(settings.embed, partitions=3))
    assert spread.rdd.getNumPartitions() == 3
    default = embed_records(single, settings.embed)  # 0: Spark's default parallelism
    assert default.rdd.getNumPartitions() == spark.sparkContext.defaultParallelism


def test_stage_writes_a_delta_table(spark, shared_data, settings, store):
    sample = filter_sample(spark, shared_data)
    records = records_frame(spark, sample.records[:8])
    stage = Embed()
    assert (stage.inputs, stage.outputs, stage.settings_sections) == (("records",), ("embeddings",), ("embed",))
    out = stage.run(StageContext(spark, store, settings), {"records": records})
    store.write(out["embeddings"], "embeddings")
    back = store.read("embeddings")
    assert back.columns == ["id", "embedding", "model"]
    assert back.count() == 8
    norms = back.selectExpr("aggregate(embedding, 0D, (a, x) -> a + x * x) AS n").collect()
    assert all(abs(r["n"] - 1.0) < 1e-5 for r in norms)


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_bundled_model_resolves_to_a_local_folder(name):
    path = resolve_model_path(name)
    assert os.path.isfile(os.path.join(path, "modules.json"))
    assert resolve_model_path("/some/other/model") == "/some/other/model"


def test_record_text_is_instruction_space_input_stripped():
    import pyarrow as pa

    from mergeit_spark.stages.embed import record_texts
    got = record_texts(pa.array(["Sum these.", " Say hi ", None, "Only"]),
                       pa.array(["1 2", "", " x ", None])).to_pylist()
    assert got == ["Sum these. 1 2", "Say hi", "x", "Only"]
