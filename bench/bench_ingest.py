"""Benchmark: ingest of one big JSON array, streamed (now) against read whole (before issue 13).

Generates an Alpaca JSON array of ``--mb`` MB from the shared data's records (unique edits, a few
planted duplicates; ``tests/_ingest_helpers.write_big_array``; no malformed element, since the
old reader turned everything after the first one into a single reject), then ingests
it side by side in one process, each in a fresh local[2] session so that no Python worker is
shared: the ingest of ``--baseline`` (a git commit: the reader that loaded the file with
``binaryFile`` and decoded it in one string) and the current one (streamed element by element).
Both count records and rejects (parsing once, persisted); the current one also builds
``input_files`` (the independent unit count, a second pass over the file by ijson). Reports wall
time and the peak RSS of any Python worker (sampled every 0.1 s from outside), and the ratios.

Writes the ``ingest`` section of BENCHMARKS.md. Usage:

    .venv/bin/python bench/bench_ingest.py [--mb 256] [--baseline bbf4de2] [--skip-baseline]

With ``--stage``: the ingest stage as a user runs it (``mergeit run --stage ingest``, a fresh
process each: JVM start, three Delta writes and the ledger check included) on all of
../shared/data, the tree at ``--stage-baseline`` (a git commit, extracted with ``git archive``)
against this working tree, alternating for ``--rounds`` rounds so that both see the same load.
Reports the stage's own seconds (its ``_state`` file), the process wall time, and the Spark
jobs and SQL executions its event log holds. Writes the ``ingest-stage`` section:

    .venv/bin/python bench/bench_ingest.py --stage [--stage-baseline HEAD] [--rounds 2]
"""
from __future__ import annotations

import argparse
import importlib.util
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
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from bench._common import write_section  # noqa: E402
from mergeit_spark.config import load_settings  # noqa: E402
from mergeit_spark.inputs import resolve_inputs  # noqa: E402
from mergeit_spark.session import build_session  # noqa: E402

from _ingest_helpers import write_big_array  # noqa: E402
from _worker_memory import WorkerMemory  # noqa: E402

SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
MB = 1 << 20


def baseline_module(ref: str, folder: Path):
    """The ingest module as it was at ``ref``, importable on its own (relative imports made absolute)."""
    source = subprocess.run(["git", "show", f"{ref}:mergeit_spark/stages/ingest.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    source = re.sub(r"^from \.\.(\w+) import", r"from mergeit_spark.\1 import", source, flags=re.M)
    source = re.sub(r"^from \. import .*$", "from mergeit_spark.stages import Stage, StageContext", source, flags=re.M)
    path = folder / f"ingest_{ref}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def run_one(label: str, ingest_fn, path: Path, settings) -> dict:
    spark = build_session(settings.spark)
    source = Path(ingest_fn.__code__.co_filename)
    if not source.is_relative_to(REPO):  # the baseline module: the workers import it too
        spark.sparkContext.addPyFile(str(source))
    try:
        files = resolve_inputs([str(path)], "auto")
        started, load_before = time.monotonic(), os.getloadavg()[0]
        with WorkerMemory(spark) as memory:
            tables = ingest_fn(spark, files, settings.ingest)
            records, rejects = tables[0].count(), tables[1].count()
            parsed = time.monotonic() - started
            units = tables[2].collect()[0]["units"] if len(tables) > 2 else None
        total = time.monotonic() - started
    finally:
        spark.stop()
    result = {"label": label, "records": records, "rejects": rejects, "units": units,
              "parse_s": parsed, "total_s": total, "peak_mib": memory.peak / MB,
              "load": (load_before, os.getloadavg()[0])}
    print(result, flush=True)
    return result


def report(big, results: list[dict], baseline: str) -> str:
    lines = [f"One Alpaca JSON array of {big.bytes / MB:.0f} MiB ({big.rows} elements, "
             f"{big.records} records, {len(big.rejected)} exact duplicates), local[2], one fresh session each. "
             f"Peak RSS: the largest any Python worker reached (sampled every 0.1 s).", "",
             "| reader | records + rejects | units counted | records+rejects s | with unit count s | "
             "peak Python worker RSS |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        units = "—" if r["units"] is None else str(r["units"])
        lines.append(f"| {r['label']} | {r['records'] + r['rejects']} | {units} | {r['parse_s']:.1f} | "
                     f"{r['total_s']:.1f} | {r['peak_mib']:.0f} MiB |")
    lines += ["", "Load average (1 min) during the runs: "
              + ", ".join(f"{r['label']} {r['load'][0]:.1f} to {r['load'][1]:.1f}" for r in results)
              + " (other jobs on the machine slow wall times; the memory figures do not depend on them)."]
    if len(results) == 2:
        old, new = results
        lines += ["", f"Ratios (streamed / {baseline}): time to records+rejects "
                      f"{new['parse_s'] / old['parse_s']:.2f}, peak worker RSS {new['peak_mib'] / old['peak_mib']:.2f}."]
    return "\n".join(lines)


def extract_tree(ref: str, folder: Path) -> Path:
    """The repository's files at ``ref`` (``git archive``), to run as they were."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def event_counts(folder: Path) -> tuple[int, int]:
    """(Spark jobs, SQL executions) in the one event log under ``folder``."""
    jobs = executions = 0
    for log in folder.rglob("*"):
        if log.is_file():
            for line in log.read_text(errors="replace").splitlines():
                event = json.loads(line).get("Event", "") if line.startswith("{") else ""
                jobs += event == "SparkListenerJobStart"
                executions += event.endswith("SparkListenerSQLExecutionStart")
    return jobs, executions


def run_stage(tree: Path, work: Path) -> dict:
    """``mergeit run --stage ingest`` from ``tree`` (driver and Python workers import its code)."""
    work.mkdir(parents=True)
    paths = ",".join(str(p) for p in sorted(SHARED_DATA.iterdir()) if p.suffix in (".json", ".jsonl"))
    events = work / "events"
    events.mkdir()
    spark_conf = {"spark.eventLog.enabled": "true", "spark.eventLog.dir": str(events),
                  "spark.eventLog.compress": "false"}
    command = [sys.executable, "-m", "mergeit_spark.cli", "run", "--conf", str(tree / "conf" / "local.yaml"),
               "--stage", "ingest", "--set", f"input.paths=[{paths}]", "--set", f"output.root={work / 'run'}",
               "--set", f"spark.conf={json.dumps(spark_conf)}"]
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started, load = time.monotonic(), os.getloadavg()[0]
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - started
    state = json.loads((work / "run" / "_state" / "ingest.json").read_text())
    jobs, executions = event_counts(events)
    result = {"stage_s": float(state["seconds"]), "wall_s": wall, "jobs": jobs, "sql": executions,
              "counts": state["counts"], "checks": state["checks"], "load": load}
    print(result, flush=True)
    return result


def stage_main(baseline: str, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-stage-") as tmp:
        trees = {f"before ({baseline})": extract_tree(baseline, Path(tmp) / "base"), "now (working tree)": REPO}
        results: dict[str, list[dict]] = {label: [] for label in trees}
        for i in range(rounds):
            for label, tree in trees.items():
                results[label].append(run_stage(tree, Path(tmp) / f"{i}-{len(results[label])}-{label[:3]}"))
    lines = ["`mergeit run --conf conf/local.yaml --stage ingest` on all of ../shared/data (4 files, 17,153 "
             "units), a fresh process each, the two trees alternating. Stage seconds from `_state/ingest.json`; "
             "wall includes the JVM start.", "",
             "| tree | round | stage s | wall s | Spark jobs | SQL executions | records / rejects / units | load |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for label, runs in results.items():
        for i, r in enumerate(runs):
            lines.append(f"| {label} | {i + 1} | {r['stage_s']:.1f} | {r['wall_s']:.1f} | {r['jobs']} | {r['sql']} | "
                         f"{r['counts']['records']} / {r['counts']['rejects']} / {r['checks']['input_rows']} | "
                         f"{r['load']:.1f} |")
    mean = lambda runs, key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    old, new = results.values()
    lines += ["", f"Mean stage seconds: before {mean(old, 'stage_s'):.1f}, now {mean(new, 'stage_s'):.1f} "
                  f"(ratio {mean(new, 'stage_s') / mean(old, 'stage_s'):.2f}); wall {mean(old, 'wall_s'):.1f} vs "
                  f"{mean(new, 'wall_s'):.1f}."]
    body = "\n".join(lines)
    print(body)
    write_section("ingest-stage", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the generated array")
    parser.add_argument("--baseline", default="bbf4de2", help="git commit whose ingest reads arrays whole")
    parser.add_argument("--skip-baseline", action="store_true", help="only the current reader")
    parser.add_argument("--stage", action="store_true", help="the ingest stage on the shared data, two trees")
    parser.add_argument("--stage-baseline", default="HEAD", help="git commit of the 'before' tree (--stage)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (--stage)")
    args = parser.parse_args()
    if args.stage:
        stage_main(args.stage_baseline, args.rounds)
        return
    settings = load_settings(overrides=["spark.master=local[2]", "spark.shuffle_partitions=4",
                                        "spark.driver_memory=4g", "spark.log_level=ERROR"])
    from mergeit_spark.stages.ingest import ingest
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        big = write_big_array(SHARED_DATA, Path(tmp) / "big.json", args.mb * MB, broken=False)
        results = []
        if not args.skip_baseline:
            old = baseline_module(args.baseline, Path(tmp))
            results.append(run_one(f"whole file ({args.baseline})", old.ingest, big.path, settings))
        results.append(run_one("streamed (now)", ingest, big.path, settings))
    body = report(big, results, args.baseline)
    print(body)
    write_section("ingest", body)


if __name__ == "__main__":
    main()
