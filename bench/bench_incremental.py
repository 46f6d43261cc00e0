"""Benchmark: an incremental run of 20% new rows against a full rerun on the same 100%.

Takes the first ``--rows`` records of the ``--data`` files of ../shared/data (default
mergeit-6k.json; ``--data all`` is its three Alpaca-layout JSON sets, 16,978 rows), deals them
80/20 at random (seed 0: the new batch is like the old, as weekly appends are) into two JSON Lines
files, and in ONE process (one Spark session, the same scripted loopback LLM
server for both, answering after ``--llm-latency`` seconds):

0. warm-up (not timed): the same three runs on the first ``--warmup-rows`` rows, so that the
   code paths of both timed runs have run once in this JVM (class loading, JIT, whole-stage
   codegen, Delta's MERGE) and neither timing carries first-use costs the other does not
   (without it the full rerun comes after a base run that exercised all its paths, while the
   increment's own steps run for the first time: 4-5 s of the increment on this machine);
1. full run on the 80% (setup, not timed),
2. ``Pipeline.extend()`` with both files on a fresh copy of that run root (timed: the
   increment),
3. a full run on both files in a fresh run root (timed: the full rerun);
   2 and 3 again for each of ``--pairs`` (the machine's speed drifts by several per cent within
   minutes: each pair is side by side in time, and the ratio reported is the pairs' median).

Writes the ``incremental`` section of BENCHMARKS.md with the wall times, per-step seconds and
the ratio. Goal: the increment costs <= 30% of the full rerun. Usage:

    .venv/bin/python bench/bench_incremental.py [--rows 2000] [--data all | FILE ...]
        [--llm-latency 0.05] [--warmup-rows 500] [--pairs 1] [--no-write] [--profile increment.txt]

``--profile`` records the increment's driver with pyinstrument (text report to that file); the
table always lists the Spark jobs each step of the increment ran.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from bench._common import write_section  # noqa: E402
from fake_openai import FakeOpenAI  # noqa: E402
from mergeit_spark.config import load_settings  # noqa: E402
from mergeit_spark.pipeline import Pipeline  # noqa: E402
from mergeit_spark.session import build_session  # noqa: E402

DATA = (REPO / ".." / "shared" / "data").resolve()


ALL_DATA = ("mergeit-6k.json", "gpteacher-roleplay.json", "gpteacher-toolformer.json")


def write_split(work: Path, rows: int | None, share: float,
                files: tuple[str, ...] | list[str] = ("mergeit-6k.json",)) -> tuple[Path, Path]:
    records = [r for name in files for r in json.loads((DATA / name).read_text())][:rows]
    later = set(random.Random(0).sample(range(len(records)), int(round(len(records) * share))))
    old, new = work / "old.jsonl", work / "new.jsonl"
    parts = ([r for i, r in enumerate(records) if i not in later], [r for i, r in enumerate(records) if i in later])
    for path, part in zip((old, new), parts):
        path.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n"
                                for r in part))
    return old, new


def settings_for(root: Path, paths: list[Path], base_url: str, extra: list[str]):
    return load_settings(overrides=[
        "spark.master=local[2]", "spark.shuffle_partitions=4", "spark.driver_memory=2g",
        f"input.paths=[{','.join(map(str, paths))}]", f"output.root={root}",
        f"llm.base_url={base_url}", "llm.model=fake-model", "llm.concurrency=8", "merge.partitions=2",
        *extra], env={})


def warm_up(work: Path, rows: int, share: float, files: list[str], base_url: str, extra: list[str], spark) -> None:
    """The bench's three runs on ``rows`` rows, untimed: every code path of both timed runs once."""
    work.mkdir(parents=True)
    old, new = write_split(work, rows, share, files)
    Pipeline(settings_for(work / "inc", [old], base_url, extra), spark=spark).run()
    Pipeline(settings_for(work / "inc", [old, new], base_url, extra), spark=spark).extend()
    Pipeline(settings_for(work / "full", [old, new], base_url, extra), spark=spark).run()


def _profiler():
    from pyinstrument import Profiler
    profiler = Profiler(interval=0.01)
    profiler.start()
    return profiler


def timed_increment(base: Path, root: Path, old: Path, new: Path, llm, extra: list[str], spark,
                    profile: Path | None = None) -> dict:
    """The increment on a fresh copy of the ``base`` run root (the copy is not timed)."""
    shutil.copytree(base, root)
    inc = Pipeline(settings_for(root, [old, new], llm.base_url, extra), spark=spark)
    sent = len(llm.requests)
    profiler = _profiler() if profile else None
    started = time.perf_counter()
    result = inc.extend()
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
        profile.write_text(profiler.output_text(unicode=True, show_all=False))
    return {"seconds": seconds, "requests": len(llm.requests) - sent, "result": result}


def timed_full(root: Path, old: Path, new: Path, llm, extra: list[str], spark) -> dict:
    """A full run on both files in the fresh run root ``root``."""
    full = Pipeline(settings_for(root, [old, new], llm.base_url, extra), spark=spark)
    sent = len(llm.requests)
    started = time.perf_counter()
    full.run()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "requests": len(llm.requests) - sent,
            "steps": {name: round(s, 1) for name, s in full.timings().items()}}


def report(pairs: list[tuple[dict, dict]], rows: int, files: list[str], args) -> str:
    """The BENCHMARKS.md section: every pair's two runs, and the median of their ratios."""
    result = pairs[0][0]["result"]
    ratios = [inc["seconds"] / full["seconds"] for inc, full in pairs]
    numbered = len(pairs) > 1
    lines = []
    for n, (inc, full) in enumerate(pairs, 1):
        tag = f" #{n}" if numbered else ""
        r = inc["result"]
        lines.append(f"| increment{tag} (`Pipeline.extend`) | {inc['seconds']:.1f} | {inc['requests']} | "
                     f"{', '.join(f'{k} {v:.1f}' for k, v in r.seconds.items())} "
                     f"(Spark jobs: {', '.join(f'{k} {v}' for k, v in (r.jobs or {}).items())}) |")
        lines.append(f"| full rerun on 100%{tag} | {full['seconds']:.1f} | {full['requests']} | "
                     f"{', '.join(f'{k} {v}' for k, v in full['steps'].items())} |")
    ratio = statistics.median(ratios)
    told = (f"median of {len(pairs)} pairs, each an increment then a full rerun: "
            f"{', '.join(f'{x:.3f}' for x in ratios)}; " if numbered else "")
    return (
        f"{rows} rows of {', '.join(files)}, {int(args.share * 100)}% of them new at random "
        f"({result.counts.get('new_records')} new records), `local[2]`, fake LLM answering in "
        f"{args.llm_latency} s; one process, one Spark session, "
        + (f"after an untimed warm-up of the same three runs on {args.warmup_rows} rows" if args.warmup_rows
           else "no warm-up") + "; increment first"
        f"{', each on a fresh copy of the base run root' if numbered else ''}.\n\n"
        "| run | wall s | LLM requests | per step (s) |\n| --- | ---: | ---: | --- |\n"
        + "\n".join(lines) + "\n\n"
        f"Increment / full = **{ratio:.3f}** ({told}goal <= 0.30). Drift: {result.drift.get('far')}/"
        f"{result.drift.get('rows')} new rows beyond their cluster's p{100 * result.drift.get('quantile', 0):g}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="first rows of --data (0: all)")
    parser.add_argument("--data", nargs="+", default=["mergeit-6k.json"],
                        help="files of ../shared/data, or 'all' (the three JSON sets)")
    parser.add_argument("--share", type=float, default=0.2, help="share of the rows that arrive later")
    parser.add_argument("--llm-latency", type=float, default=0.05, help="seconds the fake LLM takes per reply")
    parser.add_argument("--set", action="append", default=[], dest="extra", metavar="KEY=VALUE")
    parser.add_argument("--warmup-rows", type=int, default=500,
                        help="rows of the untimed warm-up runs (base, increment, full; 0: none)")
    parser.add_argument("--pairs", type=int, default=1,
                        help="timed pairs (an increment, then a full rerun), each increment on a fresh "
                             "copy of the base run root; the ratio reported is their median")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--profile", type=Path, help="pyinstrument text report of the first increment's driver")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        files = list(ALL_DATA) if args.data == ["all"] else args.data
        old, new = write_split(work, args.rows or None, args.share, files)
        with FakeOpenAI(latency_s=args.llm_latency) as llm:
            spark = build_session(settings_for(work / "base", [old], llm.base_url, args.extra).spark)
            if args.warmup_rows:
                warm_up(work / "warmup", args.warmup_rows, args.share, files, llm.base_url, args.extra, spark)
            Pipeline(settings_for(work / "base", [old], llm.base_url, args.extra), spark=spark).run()
            pairs = []
            for n in range(max(1, args.pairs)):
                inc = timed_increment(work / "base", work / f"inc{n}", old, new, llm, args.extra, spark,
                                      args.profile if n == 0 else None)
                full = timed_full(work / f"full{n}", old, new, llm, args.extra, spark)
                pairs.append((inc, full))
                for done in (work / f"inc{n}", work / f"full{n}"):
                    shutil.rmtree(done, ignore_errors=True)
            spark.stop()
        rows = sum(1 for _ in open(old)) + sum(1 for _ in open(new))
        body = report(pairs, rows, files, args)
        print(body)
        if not args.no_write:
            write_section("incremental", body)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
