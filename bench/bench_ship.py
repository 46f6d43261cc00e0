"""How small values reach executors: broadcast variable, closure capture, or a broadcast join.

The centroids at k = 707 (d = 384, float32: 1.1 MB) route probe rows to their nearest clusters
(what the dedup stage's cross-cluster check does, ``stages/dedup.py:RouteProbes``). Spark Connect
has no broadcast variables, so there the matrix travels in the ``mapInArrow`` function's closure
(``session.ship``); a classic session can do either. The third way, a broadcast join of the
probes with the centroid rows and a distance per pair in Spark SQL, is timed on fewer probes (it
makes n x k rows).

    .venv/bin/python bench/bench_ship.py [--probes 200000] [--rounds 3] [--join-probes 5000] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from pyspark.sql import functions as F  # noqa: E402

from bench._common import write_section  # noqa: E402
from mergeit_spark.config import load_settings  # noqa: E402
from mergeit_spark.session import Captured, build_session  # noqa: E402
from mergeit_spark.stages.dedup import ROUTED_SCHEMA, RouteProbes  # noqa: E402

K, D = 707, 384


def probes_frame(spark, n: int, partitions: int):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, D), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    import pyarrow as pa
    table = pa.table({"id": [f"p{i}" for i in range(n)], "cluster": np.zeros(n, dtype=np.int32),
                      "embedding": list(rows)})
    return spark.createDataFrame(table).repartition(partitions).persist()


def timed(frame, centers) -> float:
    started = time.perf_counter()
    frame.mapInArrow(RouteProbes(centers, 3), ROUTED_SCHEMA).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - started


def join_seconds(spark, frame, matrix: np.ndarray, n: int) -> float:
    centroids = spark.createDataFrame([(i, matrix[i].tolist()) for i in range(K)], "cid int, center array<float>")
    dist = F.aggregate(F.zip_with("embedding", "center", lambda a, b: (a - b) * (a - b)), F.lit(0.0),
                       lambda acc, x: acc + x)
    started = time.perf_counter()
    (frame.limit(n).crossJoin(F.broadcast(centroids)).select("id", "cid", dist.alias("d"))
     .groupBy("id").agg(F.min_by("cid", "d")).write.format("noop").mode("overwrite").save())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--join-probes", type=int, default=5_000)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    spark = build_session(load_settings(overrides=["spark.master=local[2]"]).spark)
    matrix = np.random.default_rng(1).standard_normal((K, D), dtype=np.float32)
    value = (np.arange(K, dtype=np.int32), matrix)
    frame = probes_frame(spark, args.probes, args.partitions)
    frame.count()
    timed(frame, spark.sparkContext.broadcast(value))  # warm the workers
    results = {"broadcast variable": [], "closure capture": []}
    for _ in range(args.rounds):
        results["broadcast variable"].append(timed(frame, spark.sparkContext.broadcast(value)))
        results["closure capture"].append(timed(frame, Captured(value)))
    import cloudpickle
    size = len(cloudpickle.dumps(RouteProbes(Captured(value), 3))) / 1e6
    join = join_seconds(spark, frame, matrix, args.join_probes)
    per_probe = np.median(results["closure capture"]) / args.probes
    lines = [f"Routing {args.probes:,} probes ({args.partitions} partitions, local[2], classic session) to their "
             f"3 nearest of k = {K} centroids (d = {D}, float32; the closure carries {size:.2f} MB per task), "
             f"{args.rounds} rounds alternating:", "",
             "| how the centroids travel | median | rounds |", "|---|---:|---|"]
    for name, seconds in results.items():
        lines.append(f"| {name} | {np.median(seconds):.2f} s | {', '.join(f'{s:.2f}' for s in seconds)} |")
    lines.append(f"| broadcast join (n x k rows, distance in SQL) | {join:.2f} s for {args.join_probes:,} probes | "
                 f"{join / args.join_probes / per_probe:.0f}x the closure's time per probe |")
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        write_section("ship", body)
    spark.stop()


if __name__ == "__main__":
    main()
