"""Benchmark: MergeIT's filtering, the pipeline (ingest → select) against a single-process reference.

In ONE run, on every row of ../shared/data, side by side:

(a) the reference, one plain Python process written here: the files parsed, sentence-transformers
    ``encode(batch_size=32)`` (unit vectors), sklearn ``PCA(n_components=0.95)``, sklearn
    ``KMeans(k=int(sqrt(n/2)))``, facility location (submodlib, lazy greedy, cosine) with budget 75
    per cluster on the raw embeddings, as MergeIT's code does;
(b) the pipeline as a user runs it: ``mergeit run --conf conf/local.yaml --until select`` in a
    fresh process (JVM start, every Delta write and the near-duplicate removal (a) does not do,
    included). Per-stage seconds come from the run's ``_state`` files; "start and bookkeeping" is
    the rest of the wall time.

Then at each of ``--scale-rows`` sizes (100,000 by default; ``--scale-rows 100000,1000000`` for
the million-row comparison, about an hour on two cores): the embeddings (b) wrote, repeated with small
noise (each copy a new unit vector at cosine ~0.93 of its original) and staged as a Delta
``embeddings`` table; (a') sklearn PCA + KMeans + facility location on those vectors in this
process against (b') the pipeline's topics → dedup → select on that table in a fresh process (the
executor of ``mergeit run``, JVM start included). The same sub-steps are compared at the full
data's size, so the two ratios show whether Spark's share grows with n.

Writes the ``stage1`` section of BENCHMARKS.md. Usage (quietly, nothing else running):

    .venv/bin/python bench/bench_stage1.py [--conf conf/local.yaml] [--scale-rows 100000,1000000] [--set k=v ...]

``--scale-from TABLE`` runs the scale comparison alone, from an ``embeddings`` Delta table a
pipeline run already wrote (e.g. ``out/run/embeddings`` after ``mergeit run --until embed`` on all
of ../shared/data), and writes the ``stage1-scale`` section instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

import numpy as np  # noqa: E402

from bench._common import write_section  # noqa: E402
from bench.bench_filter import DATA, FILES, load_records  # noqa: E402

BUDGET = 75
SEED = 42
FILTER_STAGES = ("topics", "dedup", "select")
# k-means cost (sum of squared distances to the centroids, PCA space) of the topics stage before
# issue 10, on these 17,149 records with the default settings (8 shuffle partitions), measured
# side by side with the new code on 2026-11-25; the new stage must stay within 1% of it.
COST_BEFORE_ISSUE_10 = {17149: 7197.97}
# The same with topics.max_iter 20 after issue 10's first wave: 7147.70 (10 iterations: 7197.13,
# 14: 7164.47). The figures are exact: the same rows, seed and partitioning give the same fit.
COST_MAX_ITER_20 = {17149: 7147.70}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# --- (a) the single-process reference ------------------------------------------------------
def reference_select(embeddings: np.ndarray, labels: np.ndarray) -> int:
    """Facility location per cluster (submodlib, as MergeIT): rows picked."""
    from submodlib import FacilityLocationFunction
    picked = 0
    for cluster in np.unique(labels):
        members = embeddings[labels == cluster]
        if len(members) <= BUDGET:
            picked += len(members)
            continue
        function = FacilityLocationFunction(n=len(members), mode="dense", data=members, metric="cosine")
        picked += len(function.maximize(budget=BUDGET, optimizer="LazyGreedy", stopIfZeroGain=False,
                                        stopIfNegativeGain=False, verbose=False, show_progress=False))
    return picked


def reference_cluster(embeddings: np.ndarray, times: dict[str, float]) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    reduced, times["pca"] = timed(lambda: PCA(n_components=0.95).fit_transform(embeddings))
    k = int(math.sqrt(len(embeddings) / 2))
    kmeans, times["kmeans"] = timed(lambda: KMeans(n_clusters=k, random_state=SEED).fit(reduced))
    picked, times["select"] = timed(lambda: reference_select(embeddings, kmeans.labels_))
    return {"k": k, "components": reduced.shape[1], "inertia": float(kmeans.inertia_), "selected": picked}


def run_reference(data: Path) -> tuple[dict[str, float], dict]:
    from sentence_transformers import SentenceTransformer

    from mergeit_spark.models import resolve_model_path
    times: dict[str, float] = {}
    records, times["read"] = timed(lambda: load_records(data))
    texts = [f"{r['instruction']} {r['input']}".strip() for r in records]

    def embed():
        model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
        return model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    embeddings, times["embed"] = timed(embed)
    facts = reference_cluster(np.asarray(embeddings, dtype=np.float32), times)
    return times, dict(facts, rows=len(records))


# --- (b) the pipeline, in a fresh process ------------------------------------------------------
def run_pipeline(command: list[str], root: Path) -> tuple[dict[str, float], float, dict]:
    """Run ``command`` (a fresh process); per-stage seconds, wall time, and the stages' state."""
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    states = {p.stem: json.loads(p.read_text()) for p in sorted((root / "_state").glob("*.json"))
              if not p.stem.startswith("lease-")}  # a stage's state file; the lease is the run's
    return {name: float(state["seconds"]) for name, state in states.items()}, wall, states


def cli_command(args: argparse.Namespace, data: Path, root: Path) -> list[str]:
    paths = ",".join(str(data / name) for name in FILES)
    command = [str(REPO / ".venv" / "bin" / "mergeit"), "run", "--until", "select",
               "--set", f"input.paths=[{paths}]", "--set", f"output.root={root}"]
    for conf in args.conf:
        command += ["--conf", conf]
    for override in args.overrides:
        command += ["--set", override]
    return command


def filter_stages_main(root: str, confs: list[str], overrides: list[str]) -> None:
    """(b') entry point: topics → dedup → select on the embeddings table under ``root``."""
    from mergeit_spark.config import load_settings
    from mergeit_spark.pipeline import Pipeline
    from mergeit_spark.stages.dedup import Dedup
    from mergeit_spark.stages.select import Select
    from mergeit_spark.stages.topics import Topics
    settings = load_settings([Path(c) for c in confs], overrides=[*overrides, f"output.root={root}"])
    pipeline = Pipeline(settings, stages=[Topics(), Dedup(), Select()])
    pipeline.run()
    pipeline.spark.stop()


def truncated_copy(folder: Path, rows: int) -> Path:
    """Smoke runs: the first ``rows`` raw rows (seed tasks: lines) of each file, same formats."""
    folder.mkdir(parents=True)
    for name in FILES:
        source = DATA / name
        if name.endswith(".jsonl"):
            lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
            (folder / name).write_text("\n".join(lines[:rows]) + "\n", encoding="utf-8")
        else:
            (folder / name).write_text(json.dumps(json.loads(source.read_text(encoding="utf-8"))[:rows]),
                                       encoding="utf-8")
    return folder


# --- scale: the full data's embeddings repeated with noise ------------------------------------
def scaled_embeddings(source: Path, rows: int) -> tuple[list[str], np.ndarray]:
    """``rows`` unit vectors: the pipeline's embeddings, then noisy copies of them (cos ~0.93)."""
    from deltalake import DeltaTable
    table = DeltaTable(str(source)).to_pyarrow_table(columns=["id", "embedding"])  # bench only: 17k rows
    base = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    ids = table.column("id").to_pylist()
    rng = np.random.default_rng(SEED)
    out_ids, blocks = list(ids), [base]
    copy = 0
    while sum(len(b) for b in blocks) < rows:
        copy += 1
        noisy = base + rng.normal(scale=0.02, size=base.shape).astype(np.float32)
        blocks.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
        out_ids += [f"{i}-copy{copy}" for i in ids]
    return out_ids[:rows], np.concatenate(blocks)[:rows]


def stage_scaled(root: Path, ids: list[str], vectors: np.ndarray) -> None:
    import pyarrow as pa
    from deltalake import write_deltalake
    dim = vectors.shape[1]
    embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, vectors.size + 1, dim, dtype=np.int32)),
                                         pa.array(vectors.ravel()))
    table = pa.table({"id": pa.array(ids), "embedding": embedding,
                      "model": pa.array(["all-MiniLM-L6-v2"] * len(ids))})
    write_deltalake(str(root / "embeddings"), table)
    # The dedup stage reads records for its lexical pass, which these scaled vectors (noisy copies
    # without text of their own) leave out: dedup.minhash=false in run_scaled, empty texts here.
    empty = pa.array([""] * len(ids))
    write_deltalake(str(root / "records"), pa.table({"id": pa.array(ids), "instruction": empty, "input": empty,
                                                      "output": empty}))


def run_scaled(args: argparse.Namespace, work: Path, source: Path, rows: int) -> dict:
    """(a') and (b') at ``rows`` rows; seconds per sub-step and a few facts."""
    ids, vectors = scaled_embeddings(source, rows)
    root = work / f"scaled-{rows}"
    stage_scaled(root, ids, vectors)
    times: dict[str, float] = {}
    facts = reference_cluster(vectors, times)
    del ids, vectors
    print(f"(a') at {rows} rows: seconds {json.dumps(times)}; {json.dumps(facts)}", flush=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--filter-stages", str(root),
               "--set", "dedup.minhash=false"]
    for conf in args.conf:
        command += ["--conf", conf]
    for override in args.overrides:
        command += ["--set", override]
    stages, wall, states = run_pipeline(command, root)
    shutil.rmtree(root, ignore_errors=True)
    print(f"(b') at {rows} rows: wall {wall:.1f} s, stage seconds {json.dumps(stages)}", flush=True)
    return {"rows": rows, "reference": times, "reference_facts": facts, "stages": stages, "wall": wall,
            "states": states}


def _row(label: str, a: float | None, b: float | None, note: str = "") -> str:
    cell = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    return f"| {label} | {cell(a)} | {cell(b)} | {note} |"


def full_table(ref: dict[str, float], ref_facts: dict, stages: dict[str, float], wall: float,
               states: dict) -> list[str]:
    ref_total = sum(ref.values())
    start = wall - sum(stages.values())
    summary = states["topics"].get("summary", {})
    counts = {name: state.get("counts", {}) for name, state in states.items()}
    dedup_rows = counts.get("dedup", {}).get("dedup", 0)
    cost_before = COST_BEFORE_ISSUE_10.get(ref_facts["rows"])
    cost_20 = COST_MAX_ITER_20.get(ref_facts["rows"])
    cost_note = (f"; k-means cost {summary.get('cost', 0):.2f} "
                 + (f"({summary.get('cost', 0) / cost_before - 1:+.2%} against {cost_before} before issue 10, "
                    f"{summary.get('cost', 0) / cost_20 - 1:+.2%} against {cost_20} with max_iter 20)"
                    if cost_before and cost_20 else ""))
    return [
        "| step | (a) reference (s) | (b) pipeline (s) | notes |",
        "| --- | ---: | ---: | --- |",
        _row("start (JVM, session) and bookkeeping", None, start, "(b): wall time less the stages' own seconds"),
        _row("read the files / ingest", ref["read"], stages.get("ingest"),
             f"{ref_facts['rows']} rows / {counts.get('ingest', {}).get('records', 0)} records"),
        _row("embed", ref["embed"], stages.get("embed"), "(a) encode(batch_size=32), torch threads default"),
        _row("PCA + k-means / topics", ref["pca"] + ref["kmeans"], stages.get("topics"),
             f"(a) {ref_facts['components']} components, k = {ref_facts['k']}, inertia "
             f"{ref_facts['inertia']:.2f}; (b) {summary.get('pca_components')} components, k = "
             f"{summary.get('k')}, {summary.get('kmeans_iterations')} iterations{cost_note}"),
        _row("near-duplicates / dedup", None, stages.get("dedup"), f"(b) only; {dedup_rows} rows judged"),
        _row("facility location / select", ref["select"], stages.get("select"),
             f"(a) {ref_facts['selected']} picked; (b) {counts.get('select', {}).get('selected', 0)} picked "
             "(after dedup)"),
        f"| **total** | **{ref_total:.1f}** | **{wall:.1f}** | **(b) / (a) = {wall / ref_total:.2f}** (goal <= 0.60) |",
    ]


def _cells(values: list[float | None]) -> str:
    return " | ".join("" if v is None else f"{v:.1f}" for v in values)


def scaled_table(runs: list[dict]) -> list[str]:
    """Per-step seconds at each size, (a') beside (b'), then the ratios the goals name."""
    head = " | ".join(f"{r['rows']:,} (a') | {r['rows']:,} (b')" for r in runs)
    lines = [f"| step (s) | {head} |", "| --- |" + " ---: |" * (2 * len(runs))]
    steps = [("start (JVM, session) and bookkeeping", lambda r: None, lambda r: r["wall"] - sum(r["stages"].values())),
             ("PCA / k-means, topics", lambda r: r["reference"]["pca"] + r["reference"]["kmeans"],
              lambda r: r["stages"].get("topics")),
             ("near-duplicates, dedup", lambda r: None, lambda r: r["stages"].get("dedup")),
             ("facility location, select", lambda r: r["reference"]["select"], lambda r: r["stages"].get("select")),
             ("**total**", lambda r: sum(r["reference"][k] for k in ("pca", "kmeans", "select")),
              lambda r: r["wall"])]
    for label, a, b in steps:
        lines.append(f"| {label} | " + _cells([v for r in runs for v in (a(r), b(r))]) + " |")
    lines += ["", "| rows | k | components (a') / (b') | (b') fitted on | iterations (b') | topics / "
              "(PCA + k-means) | topics + dedup + select / reference (stages; with start) | k-means cost "
              "(b') all rows / (a') inertia | picked (a') / (b') |",
              "| ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for r in runs:
        ref, stages, facts = r["reference"], r["stages"], r["reference_facts"]
        summary = r["states"]["topics"].get("summary", {})
        start = r["wall"] - sum(stages.values())
        a, b, _ = filter_ratio(ref, stages, 0.0)
        picked = r["states"]["select"].get("counts", {}).get("selected", "?")
        lines.append(
            f"| {r['rows']:,} | {facts['k']} / {summary.get('k')} | {facts['components']} / "
            f"{summary.get('pca_components')} | {summary.get('fit_rows', r['rows']):,} | "
            f"{summary.get('kmeans_iterations')} | {stages.get('topics', 0) / (ref['pca'] + ref['kmeans']):.2f} | "
            f"{b / a:.2f}; {(b + start) / a:.2f} | {summary.get('cost', 0) / facts['inertia']:.4f} "
            f"({summary.get('cost', 0):.1f} / {facts['inertia']:.1f}) | {facts['selected']} / {picked} |")
    return lines


def filter_ratio(ref: dict[str, float], stages: dict[str, float], start: float) -> tuple[float, float, float]:
    a = ref["pca"] + ref["kmeans"] + ref["select"]
    b = sum(stages.get(s, 0.0) for s in FILTER_STAGES) + start
    return a, b, b / a


def scale_only_main(args: argparse.Namespace) -> None:
    """(a') against (b') alone, from an existing embeddings table; the ``stage1-scale`` section."""
    work = Path(tempfile.mkdtemp(prefix="bench-stage1-scale-"))
    load_before = os.getloadavg()
    try:
        runs = [run_scaled(args, work, Path(args.scale_from).absolute(), rows) for rows in args.scale_rows]
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = "\n".join([
        f"Embeddings: {args.scale_from} (all of ../shared/data, embedded by the pipeline), repeated with "
        "noise to each size (each copy a new unit vector at cosine ~0.93 of its original). (a') one Python "
        "process: sklearn PCA(0.95), KMeans(int(sqrt(n/2)), random_state 42), submodlib facility location "
        f"(budget {BUDGET}, lazy greedy) per cluster. (b') topics → dedup → select (`--filter-stages`) with "
        f"{', '.join(Path(c).name for c in args.conf)}"
        f"{' and ' + ', '.join(args.overrides) if args.overrides else ''}, dedup.minhash=false (the copies "
        "have no text), a fresh process per size (JVM start included).",
        "",
        f"Load average (1 minute) {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end: on a "
        "shared machine absolute seconds are pessimistic; (a') and (b') ran one after the other.",
        "",
        *scaled_table(runs),
    ])
    print(body)
    if not args.no_write:
        write_section("stage1-scale", body)


def _sizes(text: str) -> list[int]:
    return [int(v) for v in text.replace("_", "").split(",") if int(v) > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conf", action="append", default=[], help="settings profile(s) for (b)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value for (b)")
    parser.add_argument("--scale-rows", type=_sizes, default=[100_000],
                        help="rows for the scale runs, comma-separated (e.g. 100000,1000000; 0 = skip)")
    parser.add_argument("--limit", type=int, default=0,
                        help="smoke runs only: the first N raw rows of each file (0 = all; published numbers use all)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    parser.add_argument("--scale-from", metavar="TABLE", help="the scale run alone, from this embeddings table")
    parser.add_argument("--filter-stages", metavar="ROOT", help=argparse.SUPPRESS)  # (b') entry point
    args = parser.parse_args()
    args.conf = args.conf or [str(REPO / "conf" / "local.yaml")]
    if args.filter_stages:
        filter_stages_main(args.filter_stages, args.conf, args.overrides)
        return
    if args.scale_from:
        scale_only_main(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-stage1-"))
    load_before = os.getloadavg()
    try:
        data = truncated_copy(work / "data", args.limit) if args.limit else DATA
        ref, ref_facts = run_reference(data)
        print(f"(a) seconds {json.dumps(ref)}; {json.dumps(ref_facts)}", flush=True)  # partial results, as they come
        root = work / "run"
        stages, wall, states = run_pipeline(cli_command(args, data, root), root)
        print(f"(b) wall {wall:.1f} s; stage seconds {json.dumps(stages)}", flush=True)
        scaled = [run_scaled(args, work, root / "embeddings", rows) for rows in args.scale_rows]
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Input: all of ../shared/data ({', '.join(FILES)}; seed tasks one row per instance). (a) one "
        "Python process: sentence-transformers encode(batch_size=32), sklearn PCA(0.95) and "
        "KMeans(int(sqrt(n/2)), random_state 42), submodlib facility location (budget 75, lazy greedy) per "
        f"cluster. (b) `mergeit run --until select` with {', '.join(Path(c).name for c in args.conf)}"
        f"{' and ' + ', '.join(args.overrides) if args.overrides else ''}, a fresh process.",
        "",
        f"Load average (1 minute) {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end: "
        "on a shared machine absolute seconds are pessimistic; (a) and (b) ran one after the other.",
        "",
        *full_table(ref, ref_facts, stages, wall, states),
    ]
    if scaled:
        lines += ["", "Clustering and selection alone on the embeddings above repeated with noise (cosine ~0.93 "
                  "to their originals), a fresh process per size:", "", *scaled_table(scaled)]
    body = "\n".join(lines)
    print(body)
    if not args.no_write and not args.limit:  # smoke runs never replace the published numbers
        write_section("stage1", body)


if __name__ == "__main__":
    main()
