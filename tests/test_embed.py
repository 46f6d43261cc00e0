"""Embed stage on real text with the real all-MiniLM-L6-v2, through local Spark."""
from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from _filter_helpers import filter_sample, records_frame, sample_embeddings
from mergeit_spark import models
from mergeit_spark.models import cpu_flags, encode_texts, resolve_model_path, resolve_precision, worker_precision
from mergeit_spark.stages import StageContext
from mergeit_spark.stages.embed import Embed, embed_records, row_windows


def _texts(records: list[dict]) -> list[str]:
    return [(r["instruction"] + " " + r["input"]).strip() for r in records]


@functools.lru_cache(maxsize=2)
def _reference_model(model: str, max_seq_length: int):
    from sentence_transformers import SentenceTransformer
    reference = SentenceTransformer(resolve_model_path(model), device="cpu")
    reference.max_seq_length = max_seq_length
    return reference


_REFERENCE_VECTORS: dict[tuple[str, int, str], np.ndarray] = {}


def _reference(settings, texts: list[str]) -> np.ndarray:
    """fp32 ``SentenceTransformer.encode``, the way a user would call it; loaded once per test
    process, and each text encoded once (the tests below compare overlapping samples with it)."""
    key = (settings.embed.model, settings.embed.max_seq_length)
    missing = list(dict.fromkeys(t for t in texts if (*key, t) not in _REFERENCE_VECTORS))
    if missing:
        vectors = _reference_model(*key).encode(missing, batch_size=32, normalize_embeddings=True)
        _REFERENCE_VECTORS.update({(*key, t): v for t, v in zip(missing, vectors)})
    return np.stack([_REFERENCE_VECTORS[(*key, t)] for t in texts])


def _chosen(records: list[dict]) -> list[dict]:
    """Every 5th record plus the longest ones (truncated at max_seq_length), empty inputs included."""
    chosen = records[::5] + sorted(records, key=lambda r: -len(r["instruction"] + r["input"]))[:5]
    assert any(r["input"] == "" for r in chosen) and any(r["input"] for r in chosen)
    return chosen


def _native_bf16_here() -> bool:
    """Read /proc/cpuinfo independently of the code under test."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^(flags|Features)\s*:.*\b(avx512_bf16|amx_bf16|bf16)\b", text, re.M) is not None


def test_embeddings_are_unit_length_and_match_sentence_transformers(spark, shared_data, settings):
    sample = filter_sample(spark, shared_data)
    embeddings = sample_embeddings(spark, shared_data, settings.embed)  # precision auto
    rows = embeddings.collect()  # test-only: a few hundred rows
    assert len(rows) == len(sample.records)
    assert {r["id"] for r in rows} == {r["id"] for r in sample.records}
    assert {r["model"] for r in rows} == {settings.embed.model}
    auto_here = "bf16" if _native_bf16_here() else "fp32"
    assert {r["precision"] for r in rows} == {auto_here}
    by_id = {r["id"]: np.asarray(r["embedding"], dtype=np.float32) for r in rows}
    matrix = np.stack(list(by_id.values()))
    assert matrix.shape[1] == 384
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)

    chosen = _chosen(sample.records)
    expected = _reference(settings, _texts(chosen))
    ours = np.stack([by_id[r["id"]] for r in chosen])
    if auto_here == "fp32":
        assert np.abs(ours - expected).max() <= 1e-5
    else:
        assert (ours * expected).sum(axis=1).min() >= 0.999


def test_fp32_stays_within_1e5_of_sentence_transformers(spark, shared_data, settings):
    chosen = _chosen(filter_sample(spark, shared_data).records)
    texts = _texts(chosen)
    fp32 = dataclasses.replace(settings.embed, precision="fp32", batch_size=16)
    assert np.abs(encode_texts(texts, fp32) - _reference(settings, texts)).max() <= 1e-5


def test_bf16_vectors_are_faithful_to_fp32(spark, shared_data, settings):
    sample = filter_sample(spark, shared_data)
    # A third of the sample, every source in it: bf16 is emulated (slow) on CPUs without it.
    records = sample.records[::3]
    bf16 = dataclasses.replace(settings.embed, precision="bf16")
    frame = sample.frame.where(F.col("id").isin([r["id"] for r in records]))
    rows = embed_records(frame, bf16).collect()  # test-only: about a hundred rows
    assert len(rows) == len(records) >= 100
    assert {r["precision"] for r in rows} == {"bf16"}
    by_id = {r["id"]: np.asarray(r["embedding"], dtype=np.float32) for r in rows}
    ours = np.stack([by_id[r["id"]] for r in records])
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosine = (ours * _reference(settings, _texts(records))).sum(axis=1)
    assert cosine.mean() >= 0.9999, cosine.mean()
    assert cosine.min() >= 0.999, cosine.min()
    assert np.abs(cosine - 1).max() > 0  # really bf16: not bit-identical to fp32


def test_auto_precision_resolves_for_this_cpu():
    assert resolve_precision("auto", "cpu") == ("bf16" if _native_bf16_here() else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # asked for: honoured even where it is slow


@pytest.mark.parametrize("flags, expected", [
    ({"avx", "avx2", "fma"}, "fp32"),                                  # this project's AVX2 machines
    ({"avx2", "avx512f", "avx512bw", "avx512vl"}, "fp32"),             # AVX-512 without BF16: emulated
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),                      # Zen 4, Cooper Lake
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "bf16"),      # Sapphire Rapids
    ({"fp", "asimd", "bf16"}, "bf16"),                                 # Arm with the BF16 extension
    (set(), "fp32"),                                                   # flags unreadable
])
def test_auto_precision_on_cpu_flag_sets(flags, expected):
    assert resolve_precision("auto", "cpu", flags=flags) == expected


def test_auto_precision_on_other_devices():
    assert resolve_precision("auto", "cuda", cuda_bf16=True) == "bf16"
    assert resolve_precision("auto", "cuda:1", cuda_bf16=False) == "fp32"
    assert resolve_precision("auto", "mps", flags={"avx512_bf16"}) == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_bf16_casts_the_weights_on_a_gpu_and_uses_autocast_on_a_cpu():
    # Autocast re-casts operands every operation: 4-5x slower than fp32 on an H200 at batch 32
    # (BENCHMARKS.md, embed-device), so a GPU's bf16 lives in a bf16 copy of the weights.
    from mergeit_spark.config import EmbedSettings
    assert models.model_key(EmbedSettings(device="cuda", precision="bf16"))[3] == "bf16"
    assert models.model_key(EmbedSettings(device="cuda", precision="fp32"))[3] == "fp32"
    assert models.model_key(EmbedSettings(device="cpu", precision="bf16"))[3] == "fp32"
    assert type(models._autocast("cuda", "bf16")).__name__ == "nullcontext"
    assert type(models._autocast("cpu", "bf16")).__name__ == "autocast"
    assert type(models._autocast("cpu", "fp32")).__name__ == "nullcontext"


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_precision_choice_is_logged_once_per_process(settings, monkeypatch, caplog):
    monkeypatch.setattr(models, "_PRECISIONS", {})  # as in a fresh worker process
    with caplog.at_level(logging.INFO, logger="mergeit.embed"):
        choices = {worker_precision(settings.embed) for _ in range(3)}
        worker_precision(dataclasses.replace(settings.embed, batch_size=7))  # same precision key
    assert choices == {resolve_precision(settings.embed.precision, settings.embed.device)}
    logged = [r.getMessage() for r in caplog.records if r.name == "mergeit.embed"]
    assert len(logged) == 1 and f"precision {choices.pop()} (asked auto" in logged[0], logged


def test_row_windows_span_arrow_batches_in_order():
    sizes = [7, 0, 5, 20, 1]
    batches, start = [], 0
    for n in sizes:
        batches.append(pa.RecordBatch.from_pydict({"id": [str(i) for i in range(start, start + n)]}))
        start += n
    windows = list(row_windows(iter(batches), 10))
    assert [w.num_rows for w in windows] == [10, 10, 10, 3]
    assert [i for w in windows for i in w.column("id").to_pylist()] == [str(i) for i in range(33)]
    assert [w.num_rows for w in row_windows(iter(batches), 100)] == [33]
    assert list(row_windows(iter([]), 10)) == []


def test_worker_heap_is_frozen_once_the_model_is_loaded(spark, shared_data, settings):
    """PySpark's daemon runs gc.collect() after every task of a reused worker: the loaded model's
    objects (hundreds of thousands) go to the permanent generation so it does not walk them each
    time. On the driver nothing is frozen (a notebook's dropped cycles must stay collectable)."""
    sample = filter_sample(spark, shared_data)
    stats = (embed_records(records_frame(spark, sample.records[:40]),
                           dataclasses.replace(settings.embed, partitions=2), with_worker_stats=True)
             .groupBy("worker_pid").agg(F.min("worker_frozen_objects").alias("frozen")).collect())
    assert stats and all(r["frozen"] > 100_000 for r in stats), stats  # the model and torch, frozen
    models.load_model(settings.embed)  # in this (driver) process
    assert gc.get_freeze_count() == 0


def test_model_loads_once_per_worker_process(spark, shared_data, settings):
    sample = filter_sample(spark, shared_data)
    frame = records_frame(spark, sample.records[:120])
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key)
    spark.conf.set(key, "10")  # many Arrow batches per task, several tasks per worker
    try:
        # Windows of 25 rows: a task regroups its Arrow batches of 10 into several windows.
        embed_settings = dataclasses.replace(settings.embed, partitions=3, sort_window_rows=25)
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


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_length_sorted_batches_give_the_same_vectors_in_row_order(settings, precision):
    """Sorting by length changes only which texts share a batch (so the padding), never which
    vector goes to which row. In fp32 the vectors agree to float rounding; where ``auto`` picks
    bf16 (a CPU with native bf16), a batch's padding moves them by bf16 rounding only."""
    texts = ["Short.", "A somewhat longer instruction about the weather in spring.",
             "x " * 300, "", "Translate 'good morning' into French.", "Why is the sky blue?"] * 2
    embed_settings = dataclasses.replace(settings.embed, batch_size=4, precision=precision)
    sorted_run = encode_texts(texts, embed_settings, sort_by_length=True)
    plain_run = encode_texts(texts, embed_settings, sort_by_length=False)
    assert sorted_run.dtype == np.float32 and sorted_run.shape == (12, 384)
    np.testing.assert_allclose(sorted_run[0], sorted_run[6], atol=1e-6)  # same text, same batch mates
    if precision == "fp32":
        np.testing.assert_allclose(sorted_run, plain_run, atol=1e-5)
    else:
        cosines = (sorted_run * plain_run).sum(axis=1)
        assert cosines.min() > 0.999, cosines
        # and every row is nearest to its own text's vector, not to a neighbour's
        assert ((sorted_run @ plain_run.T).argmax(axis=1) % 6 == np.arange(12) % 6).all()


def test_partitions_setting(spark, shared_data, settings):
    sample = filter_sample(spark, shared_data)
    single = records_frame(spark, sample.records[:50]).coalesce(1)
    spread = embed_records(single, dataclasses.replace(settings.embed, partitions=3))
    assert spread.rdd.getNumPartitions() == 3
    default = embed_records(single, settings.embed)  # 0: Spark's default parallelism
    assert default.rdd.getNumPartitions() == spark.sparkContext.defaultParallelism


def test_stage_writes_a_delta_table(spark, shared_data, settings, store):
    sample = filter_sample(spark, shared_data)
    stage = Embed()
    assert (stage.inputs, stage.outputs, stage.settings_sections) == (("records", "contamination"), ("embeddings",),
                                                                      ("embed",))
    # The decontam stage found the last record contaminated: it is not embedded.
    from mergeit_spark.stages.decontam import CONTAMINATION_SCHEMA
    contaminated = sample.records[8]
    contamination = spark.createDataFrame([(contaminated["id"], "eval.jsonl", "eval.jsonl", 0, "x", "ngram", 1)],
                                          CONTAMINATION_SCHEMA)
    out = stage.run(StageContext(spark, store, settings),
                    {"records": records_frame(spark, sample.records[:9]), "contamination": contamination})
    store.write(out["embeddings"], "embeddings")
    back = store.read("embeddings")
    assert back.columns == ["id", "embedding", "model", "precision"]
    assert back.count() == 8
    norms = back.selectExpr("aggregate(embedding, 0D, (a, x) -> a + x * x) AS n").collect()
    assert all(abs(r["n"] - 1.0) < 1e-5 for r in norms)
    from deltalake import DeltaTable  # an independent reader sees the precision each row used
    table = DeltaTable(store.path("embeddings")).to_pyarrow_table()
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in sample.records[:8])
    assert set(table.column("precision").to_pylist()) == {resolve_precision("auto", "cpu")}


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


def test_precision_is_in_the_embed_fingerprint_and_speed_knobs_are_not():
    from mergeit_spark.config import Settings

    def fingerprint(**embed) -> str:
        base = Settings()
        return dataclasses.replace(base, embed=dataclasses.replace(base.embed, **embed)).fingerprint("embed")

    assert fingerprint(precision="bf16") != fingerprint(precision="fp32") != fingerprint()
    assert fingerprint(sort_window_rows=100, batch_size=7, torch_threads=2, partitions=5) == fingerprint()
