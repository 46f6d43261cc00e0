"""Benchmark: the whole pipeline with its run root on an S3 server against the root on local disk.

In ONE run, side by side: ``mergeit run`` over every row of ../shared/data (the inputs on local
disk both times) in a fresh process each, once with ``output.root`` on local disk and once on
``s3a://`` of a real S3 server on 127.0.0.1 (SeaweedFS, tests/s3server.py; ``make weed`` builds
it), the LLM a scripted OpenAI-protocol server on loopback (tests/fake_openai.py), so that what
differs is where the tables, state and ledger live. Per-stage seconds come from the command's
output; the wall time includes the JVM start. Then the merge stage's ledger: objects per bucket
before compaction (every group commit one object) and after (the merge summary's
``ledger_objects``, and a listing of the S3 root's ledger).

Writes the ``s3-root`` section of BENCHMARKS.md. Usage (quietly, nothing else running):

    .venv/bin/python bench/bench_s3.py [--reps 1] [--set k=v ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from bench._common import write_section  # noqa: E402
from bench.bench_filter import DATA, FILES  # noqa: E402
from fake_openai import FakeOpenAI  # noqa: E402
from s3server import S3Server  # noqa: E402

STAGE_LINE = re.compile(r"^(\w+)\s+([\d.]+)s\s")


def run_once(root: str, base_url: str, env: dict[str, str], extra: list[str]) -> dict:
    """One ``mergeit run`` in a fresh process: wall seconds and each stage's seconds."""
    overrides = ["spark.master=local[2]", "spark.shuffle_partitions=4", f"input.paths=[{','.join(str(DATA / f) for f in FILES)}]",
                 f"output.root={root}", f"llm.base_url={base_url}", "llm.model=fake-model",
                 "llm.concurrency=8", "merge.partitions=2", *extra]
    args = [sys.executable, "-m", "mergeit_spark.cli", "run", *[a for o in overrides for a in ("--set", o)]]
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"mergeit run on {root} failed:\n{done.stderr[-4000:]}")
    stages = {m[1]: float(m[2]) for m in map(STAGE_LINE.match, done.stdout.splitlines()) if m}
    return {"wall": wall, "stages": stages}


def merge_summary(root_state: bytes) -> dict:
    """The last merge entry's summary in a run log's bytes."""
    entries = [json.loads(line) for line in root_state.decode().splitlines() if line.strip()]
    return [e for e in entries if e.get("stage") == "merge"][-1]["summary"]


def ledger_listing(client, bucket: str, prefix: str) -> dict[str, int]:
    """Objects per ledger bucket under ``prefix`` (``.../bucket=<b>/...``)."""
    counts: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found = re.search(r"bucket=(\d+)/", item["Key"])
            if found and item["Key"].endswith(".jsonl"):
                counts[found[1]] = counts.get(found[1], 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=1, help="runs of each (alternating, S3 first)")
    parser.add_argument("--set", action="append", default=[], dest="extra", help="section.key=value")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    times: dict[str, list[dict]] = {"local": [], "s3": []}
    with S3Server() as s3, FakeOpenAI() as llm:
        env = {**os.environ, **s3.env()}
        client = s3.client()
        for rep in range(args.reps):
            bucket = s3.make_bucket(f"bench-{rep}")
            times["s3"].append(run_once(f"s3a://{bucket}/run", llm.base_url, env, args.extra))
            times["local"].append(run_once(str(work / f"run-{rep}"), llm.base_url, env, args.extra))
        log = client.get_object(Bucket=bucket, Key="run/_state/runs.jsonl")["Body"].read()
        compaction = merge_summary(log).get("ledger_objects", {})
        after = ledger_listing(client, bucket, "run/_ledger/merges/")
        local_log = (work / f"run-{args.reps - 1}" / "_state" / "runs.jsonl").read_bytes()
        local_compaction = merge_summary(local_log).get("ledger_objects", {})
    write_section("s3-root", report(times, compaction, after, local_compaction))
    print(report(times, compaction, after, local_compaction))


def report(times: dict, compaction: dict, after: dict[str, int], local_compaction: dict) -> str:
    def best(kind: str) -> dict:
        return min(times[kind], key=lambda t: t["wall"])
    local, s3 = best("local"), best("s3")
    stages = list(local["stages"])
    lines = ["Whole pipeline (`mergeit run`, a fresh process each, every row of ../shared/data, inputs on "
             "local disk, scripted LLM on loopback), the run root on local disk against `s3a://` on "
             "SeaweedFS's S3 gateway on 127.0.0.1; best of "
             f"{len(times['local'])} run(s) each, S3 first.", "",
             "| | local root (s) | S3 root (s) | S3 / local |", "| --- | ---: | ---: | ---: |"]
    for name in stages:
        a, b = local["stages"].get(name, 0.0), s3["stages"].get(name, 0.0)
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b / a if a else float('nan'):.2f}x |")
    lines.append(f"| **wall (JVM start included)** | {local['wall']:.1f} | {s3['wall']:.1f} | "
                 f"{s3['wall'] / local['wall']:.2f}x |")
    buckets = compaction.get("buckets", 0)
    lines += ["", "Merge ledger, objects (one per bucket per group commit) before and after the "
              "end-of-pass compaction:", "",
              "| root | buckets written | objects before | per bucket before | objects after | per bucket after |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, done in (("local", local_compaction), ("S3", compaction)):
        n = done.get("buckets", 0) or 1
        lines.append(f"| {name} | {done.get('buckets', 0)} | {done.get('objects_before', 0)} | "
                     f"{done.get('objects_before', 0) / n:.1f} | {done.get('objects_after', 0)} | "
                     f"{done.get('objects_after', 0) / n:.1f} |")
    lines += ["", f"Listed on S3 after the run: {sum(after.values())} objects in {len(after)} buckets "
              f"(max {max(after.values(), default=0)} per bucket); the summary said {buckets} buckets."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
