"""Benchmark: the whole pipeline in a classic session against a local Spark Connect session.

Every Alpaca-layout set of ../shared/data (``--data all``: 16,978 rows) goes through ``mergeit
run`` twice, each in its own process with a fresh run root: once classic (``spark.master=
local[N]``), once through Spark Connect (``spark.remote=local[N]``: a local Connect server started
in that process, the client talking to it over gRPC on loopback). Both runs share one scripted
OpenAI-protocol server on loopback (answers after ``--llm-latency`` seconds). ``--pairs`` repeats
both, alternating which goes first. The ratio is Connect's wall time over classic's (median over
the pairs); the table gives each stage's seconds from the run log. Goal: <= 1.2x.

    .venv/bin/python bench/bench_connect.py [--data all | FILE ...] [--rows 0] [--pairs 1]
        [--cores 2] [--llm-latency 0.05] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench._common import write_section  # noqa: E402

SHARED = (REPO / ".." / "shared" / "data").resolve()
ALL = ["mergeit-6k.json", "gpteacher-roleplay.json", "gpteacher-toolformer.json"]


def input_file(names: list[str], rows: int, dest: Path) -> tuple[Path, int]:
    records = []
    for name in names:
        records += json.loads((SHARED / name).read_text())
    records = records[:rows] if rows else records
    dest.write_text("".join(json.dumps({k: r.get(k, "") for k in ("instruction", "input", "output")}) + "\n"
                            for r in records))
    return dest, len(records)


def run(kind: str, data: Path, root: Path, base_url: str, cores: int) -> tuple[float, dict[str, float]]:
    session = f"spark.remote=local[{cores}]" if kind == "connect" else f"spark.master=local[{cores}]"
    sets = [session, f"input.paths=[{data}]", f"output.root={root}", f"llm.base_url={base_url}",
            "llm.model=fake-model", "llm.concurrency=16", f"spark.shuffle_partitions={2 * cores}"]
    command = [sys.executable, "-m", "mergeit_spark.cli", "run", "--conf", str(REPO / "conf" / "local.yaml"),
               *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stages = {}
    for line in (root / "_state" / "runs.jsonl").read_text().splitlines():
        entry = json.loads(line)
        stages[entry["stage"]] = entry["seconds"]
    return seconds, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["all"])
    parser.add_argument("--rows", type=int, default=0, help="first rows only (0: all)")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--llm-latency", type=float, default=0.05)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from fake_openai import FakeOpenAI

    names = ALL if args.data == ["all"] else args.data
    work = Path(tempfile.mkdtemp(prefix="bench-connect-"))
    data, rows = input_file(names, args.rows, work / "in.jsonl")
    results: dict[str, list[tuple[float, dict[str, float]]]] = {"classic": [], "connect": []}
    with FakeOpenAI(latency_s=args.llm_latency) as llm:
        for pair in range(args.pairs):
            order = ["classic", "connect"] if pair % 2 == 0 else ["connect", "classic"]
            for kind in order:
                root = work / f"{kind}-{pair}"
                results[kind].append(run(kind, data, root, llm.base_url, args.cores))
                print(f"{kind}: {results[kind][-1][0]:.1f} s", flush=True)
                shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(c[0] / k[0] for c, k in zip(results["connect"], results["classic"]))
    stages = list(results["classic"][0][1])
    lines = [f"{rows:,} rows ({', '.join(names)}), local[{args.cores}], scripted LLM on loopback "
             f"({args.llm_latency} s per reply), {args.pairs} pair(s), each run its own process and JVM.", "",
             "| | classic | Spark Connect | ratio |", "|---|---:|---:|---:|"]
    for stage in stages:
        a = statistics.median(r[1].get(stage, 0.0) for r in results["classic"])
        b = statistics.median(r[1].get(stage, 0.0) for r in results["connect"])
        lines.append(f"| {stage} | {a:.1f} s | {b:.1f} s | {b / a if a else float('nan'):.2f}x |")
    a = statistics.median(r[0] for r in results["classic"])
    b = statistics.median(r[0] for r in results["connect"])
    lines.append(f"| **whole run (process wall time)** | **{a:.1f} s** | **{b:.1f} s** | **{ratio:.2f}x** |")
    lines += ["", f"Goal: Spark Connect <= 1.2x classic. Measured: {ratio:.2f}x."]
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        write_section("connect", body)


if __name__ == "__main__":
    main()
