"""Benchmark: MergeIT's topic-aware filtering (embed → topics → dedup → select) on all shared data.

Runs each stage the way the pipeline does (the stage function, then a Delta write through
``TableStore``), timing each stage's wall time, on every row of ../shared/data: the three
Alpaca-layout files plus the seed tasks flattened to one row per instance (~17k rows). Then, side
by side in the same process and on the same rows, it embeds once with length-sorted batches (the
stage's default) and once with batches in arrival order, and reports the ratio.

Writes the ``filter`` section of BENCHMARKS.md. Usage:

    .venv/bin/python bench/bench_filter.py [--compare-rows 4000] [--set section.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pyspark.sql import functions as F  # noqa: E402

from bench._common import write_section  # noqa: E402
from mergeit_spark.config import load_settings  # noqa: E402
from mergeit_spark.ids import content_id  # noqa: E402
from mergeit_spark.session import build_session  # noqa: E402
from mergeit_spark.stages.dedup import find_duplicates  # noqa: E402
from mergeit_spark.stages.embed import embed_records  # noqa: E402
from mergeit_spark.stages.select import select_representatives  # noqa: E402
from mergeit_spark.stages.topics import assign_topics  # noqa: E402
from mergeit_spark.tables import TableStore  # noqa: E402

DATA = (REPO / ".." / "shared" / "data").resolve()
FILES = ["mergeit-6k.json", "gpteacher-roleplay.json", "gpteacher-toolformer.json", "alpaca-seed-tasks.jsonl"]
RECORDS_DDL = "id string, instruction string, input string, output string, source string, extra string"


def load_records(data: Path = DATA) -> list[dict]:
    """Every row of the shared data (or of the same files under ``data``) as records
    (content-hash ids; exact repeats once)."""
    records, seen = [], set()
    for name in FILES:
        path = data / name
        if name.endswith(".jsonl"):
            raw = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    task = json.loads(line)
                    raw += [{"instruction": task["instruction"], "input": i.get("input", ""),
                             "output": i.get("output", "")} for i in task.get("instances", [])]
        else:
            raw = json.loads(path.read_text(encoding="utf-8"))
        for r in raw:
            rid = content_id(r["instruction"], r.get("input", ""), r.get("output", ""))
            if rid not in seen:
                seen.add(rid)
                records.append({"id": rid, "instruction": r["instruction"], "input": r.get("input", ""),
                                "output": r.get("output", ""), "source": name, "extra": None})
    return records


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-rows", type=int, default=4000,
                        help="rows for the sorted-vs-unsorted embedding comparison (0 = all)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N rows (smoke runs; 0 = all)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args()
    settings = load_settings(overrides=args.overrides)
    spark = build_session(settings.spark)
    root = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    store = TableStore(spark, root / "run", settings.tables.engine)
    load_before = os.getloadavg()
    try:
        records_list = load_records()
        if args.limit > 0:  # smoke runs only; the published numbers use every row
            records_list = records_list[:args.limit]
        n = len(records_list)
        # Stage the input as a table, as ingest would leave it, so every stage reads from disk.
        store.write(spark.createDataFrame(records_list, RECORDS_DDL), "records")
        records = store.read("records")

        times: dict[str, float] = {}
        _, times["embed"] = timed(lambda: store.write(embed_records(records, settings.embed), "embeddings"))
        embeddings = store.read("embeddings")

        def run_topics():
            topics, centroids = assign_topics(embeddings, settings.topics)
            store.write(topics, "topics")
            store.write(centroids, "centroids")
        _, times["topics"] = timed(run_topics)
        topics, centroids = store.read("topics"), store.read("centroids")

        _, times["dedup"] = timed(lambda: store.write(
            find_duplicates(embeddings, topics, centroids, settings.dedup, records=records), "dedup"))
        dedup = store.read("dedup")
        _, times["select"] = timed(lambda: store.write(
            select_representatives(embeddings, dedup, settings.select), "selected"))
        selected = store.read("selected")

        # Small facts for the report (counts and one centroid row).
        meta = centroids.select("k", "pca_components", "explained_variance", "embedding_dim").first()
        status = {r["status"]: r["count"] for r in dedup.groupBy("status").count().collect()}
        across = (dedup.filter("status = 'duplicate'").alias("d")
                  .join(topics.alias("t"), F.col("d.duplicate_of") == F.col("t.id"))
                  .filter(F.col("d.cluster") != F.col("t.cluster")).count())
        n_selected = selected.count()
        n_clusters_used = topics.select("cluster").distinct().count()

        # Length-sorted vs arrival-order batches, same rows, same session, back to back.
        if args.compare_rows > 0:
            # A fixed pseudo-random subset (hash order), staged as its own table.
            store.write(records.orderBy(F.xxhash64("id")).limit(args.compare_rows), "compare_rows")
            sample = store.read("compare_rows")
        else:
            sample = records
        m = sample.count()
        compare = {}
        for label, flag in (("length-sorted batches (stage default)", True), ("arrival-order batches", False)):
            _, compare[label] = timed(lambda flag=flag: store.write(
                embed_records(sample, settings.embed, sort_by_length=flag), f"compare_{int(flag)}"))
        load_after = os.getloadavg()
    finally:
        spark.stop()
        shutil.rmtree(root, ignore_errors=True)

    total = sum(times.values())
    sorted_s, plain_s = compare["length-sorted batches (stage default)"], compare["arrival-order batches"]
    lines = [
        f"Input: {n} rows (all of ../shared/data: {', '.join(FILES)}; seed tasks one row per instance). "
        f"Spark master `{settings.spark.master}`, embed batch {settings.embed.batch_size}, "
        f"max_seq_length {settings.embed.max_seq_length}, torch_threads {settings.embed.torch_threads} "
        f"(0 = torch default). Each stage = its function plus the Delta write of its tables.",
        "",
        f"CPU shared with other processes during the run: load average {load_before[0]:.1f} at start, "
        f"{load_after[0]:.1f} at the end (1-minute), so absolute times are pessimistic.",
        "",
        "| stage | wall time (s) | notes |",
        "| --- | ---: | --- |",
        f"| embed | {times['embed']:.1f} | {n / times['embed']:.1f} rows/s, all-MiniLM-L6-v2 on CPU |",
        f"| topics | {times['topics']:.1f} | PCA to {meta['pca_components']} of {meta['embedding_dim']} dims "
        f"({meta['explained_variance']:.3f} of the variance), k-means k = {meta['k']} "
        f"({n_clusters_used} clusters non-empty) |",
        f"| dedup | {times['dedup']:.1f} | {status.get('duplicate', 0)} duplicates "
        f"({100 * status.get('duplicate', 0) / n:.1f}%), {across} of them across clusters; "
        f"{status.get('kept', 0)} kept (threshold {settings.dedup.threshold}) |",
        f"| select | {times['select']:.1f} | {n_selected} selected (budget {settings.select.budget} per cluster), "
        f"{100 * n_selected / n:.1f}% of the input |",
        f"| **filtering total** | **{total:.1f}** | {n / total:.1f} rows/s end to end |",
        "",
        f"Embedding batches, side by side on the same {m} rows (same process, one after the other):",
        "",
        "| batching | wall time (s) | rows/s |",
        "| --- | ---: | ---: |",
        f"| length-sorted batches (stage default) | {sorted_s:.1f} | {m / sorted_s:.1f} |",
        f"| arrival-order batches | {plain_s:.1f} | {m / plain_s:.1f} |",
        "",
        f"Speed-up from sorting by length: **{plain_s / sorted_s:.2f}x**.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("filter", body)


if __name__ == "__main__":
    main()
