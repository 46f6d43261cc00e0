"""Real-text samples for the filtering tests (embed, topics, dedup, select).

The sample is a few hundred real rows from every file in ../shared/data, plus planted
near-duplicates: copies of real instructions with a small edit (a punctuation change, "the" →
"a") and a different output, so they get their own id. It is embedded once per test session with
the real model through the real Spark stage; the later stages reuse that table. Tests may collect
these small tables to check them; the stages themselves never do.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

from mergeit_spark.ids import content_id

RECORDS_DDL = "id string, instruction string, input string, output string, source string, extra string"

# Rows taken from the head of each file: enough for ~12 clusters, small enough for 2 cores.
SAMPLE_SIZES = {
    "mergeit-6k.json": 180,
    "gpteacher-toolformer.json": 60,
    "gpteacher-roleplay.json": 30,
    "alpaca-seed-tasks.jsonl": 40,
}
PLANTED_PAIRS = 8   # originals from mergeit-6k with one edited copy each
PLANTED_TRIPLES = 2  # originals with two edited copies each


def read_rows(shared_data: Path, name: str, limit: int | None = None) -> list[dict]:
    """Alpaca-layout rows of one shared data file; seed tasks are flattened, one row per instance."""
    path = shared_data / name
    if name.endswith(".jsonl"):
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            task = json.loads(line)
            for instance in task.get("instances", []):
                rows.append({"instruction": task["instruction"], "input": instance.get("input", ""),
                             "output": instance.get("output", ""), "source": name})
    else:
        rows = [dict(instruction=r["instruction"], input=r.get("input", ""), output=r.get("output", ""),
                     source=name) for r in json.loads(path.read_text(encoding="utf-8"))]
    return rows[:limit] if limit is not None else rows


def with_ids(rows: list[dict]) -> list[dict]:
    """Records as ingest writes them (id = content hash); exact repeats are dropped."""
    seen: set[str] = set()
    out = []
    for r in rows:
        rid = content_id(r["instruction"], r["input"], r["output"])
        if rid in seen:
            continue
        seen.add(rid)
        out.append({"id": rid, "instruction": r["instruction"], "input": r["input"], "output": r["output"],
                    "source": r["source"], "extra": None})
    return out


def records_frame(spark: SparkSession, records: list[dict]) -> DataFrame:
    return spark.createDataFrame(records, RECORDS_DDL)


def _edit(text: str, variant: int) -> str:
    """A small edit that keeps the meaning: punctuation, or one article."""
    if variant == 0:
        stripped = text.rstrip()
        return stripped[:-1] + "!" if stripped[-1:] in ".?!" else stripped + "."
    if " the " in text:
        return text.replace(" the ", " a ", 1)
    return text.rstrip(".") + " now."


def planted_copies(originals: list[dict], pairs: int, triples: int) -> tuple[list[dict], dict[str, list[str]]]:
    """Edited copies of real rows with long instructions; returns (copies, original id → copy ids).

    The first ``pairs`` originals get one copy, the next ``triples`` two (different edits).
    """
    candidates = [r for r in originals if len(r["instruction"].split()) >= 8][:pairs + triples]
    copies: list[dict] = []
    planted: dict[str, list[str]] = {}
    for i, original in enumerate(candidates):
        variants = (0, 1) if i >= pairs else (i % 2,)
        planted[original["id"]] = []
        for variant in variants:
            instruction = _edit(original["instruction"], variant)
            output = original["output"] + f" (variant {variant})"
            copy = dict(original, id=content_id(instruction, original["input"], output),
                        instruction=instruction, output=output, source="planted")
            copies.append(copy)
            planted[original["id"]].append(copy["id"])
    return copies, planted


@dataclass
class FilterSample:
    records: list[dict]
    planted: dict[str, list[str]]  # original id → planted copy ids
    frame: DataFrame = field(repr=False)


_CACHE: dict[tuple, object] = {}


def filter_sample(spark: SparkSession, shared_data: Path) -> FilterSample:
    key = ("sample", id(spark))
    if key not in _CACHE:
        records: list[dict] = []
        for name, limit in SAMPLE_SIZES.items():
            records.extend(with_ids(read_rows(shared_data, name, limit)))
        copies, planted = planted_copies([r for r in records if r["source"] == "mergeit-6k.json"],
                                         PLANTED_PAIRS, PLANTED_TRIPLES)
        records = with_ids(records + copies)
        _CACHE[key] = FilterSample(records, planted, records_frame(spark, records))
    return _CACHE[key]  # type: ignore[return-value]


def sample_embeddings(spark: SparkSession, shared_data: Path, embed_settings) -> DataFrame:
    """The sample's ``embeddings`` table, computed once by the real stage.

    Kept as Parquet in a temporary folder (removed at exit), not as a cached plan: a test that
    clears Spark's cache (to read its own tables back) must not make every later test embed the
    sample again with the real model."""
    key = ("embeddings", id(spark))
    if key not in _CACHE:
        from mergeit_spark.stages.embed import embed_records
        folder = Path(tempfile.mkdtemp(prefix="filter-sample-"))
        atexit.register(shutil.rmtree, folder, True)
        embed_records(filter_sample(spark, shared_data).frame, embed_settings).write.parquet(str(folder / "embeddings"))
        _CACHE[key] = spark.read.parquet(str(folder / "embeddings"))
    return _CACHE[key]  # type: ignore[return-value]


def sample_topics(spark: SparkSession, shared_data: Path, settings) -> tuple[DataFrame, DataFrame]:
    """(topics, centroids) of the sample with default topic settings, cached."""
    key = ("topics", id(spark))
    if key not in _CACHE:
        from mergeit_spark.stages.topics import assign_topics
        topics, centroids = assign_topics(sample_embeddings(spark, shared_data, settings.embed), settings.topics)
        topics, centroids = topics.cache(), centroids.cache()
        topics.count()
        _CACHE[key] = (topics, centroids)
    topics, centroids = _CACHE[key]  # type: ignore[misc]
    return _cached(topics), _cached(centroids)


def sample_dedup(spark: SparkSession, shared_data: Path, settings) -> DataFrame:
    """The sample's ``dedup`` table with default settings, cached."""
    key = ("dedup", id(spark))
    if key not in _CACHE:
        from mergeit_spark.stages.dedup import find_duplicates
        topics, centroids = sample_topics(spark, shared_data, settings)
        frame = find_duplicates(sample_embeddings(spark, shared_data, settings.embed), topics, centroids,
                                settings.dedup).cache()
        frame.count()
        _CACHE[key] = frame
    return _cached(_CACHE[key])  # type: ignore[arg-type]


def _cached(frame: DataFrame) -> DataFrame:
    """``frame`` cached again if the suite's per-module ``clearCache`` dropped it (recomputing
    gives the same rows: the topic model is fitted, the rest is deterministic)."""
    if not frame.storageLevel.useMemory:
        frame.cache()
    return frame
