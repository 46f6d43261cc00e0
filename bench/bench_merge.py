"""Benchmark: the merge stage, whole stage, in merges/s (issue 11).

Inputs: 2,000 groups of real records (mergeit-6k.json, then gpteacher-roleplay.json as needed),
grouped the way the group stage groups a cluster (``group_cluster``: best match first, cosine >
``group.threshold``) inside chunks of 300 consecutive rows standing in for clusters. Embeddings
come from the embed stage's ``encode_texts`` and are cached under ``$TMPDIR/mergeit-bench`` (setup,
not timed). Records, embeddings and groups are Parquet files every run reads the same way.

Server: the scripted OpenAI-protocol server of the tests (``tests/fake_openai.py``) on loopback,
answering each request after ``--latency-ms`` (100), so the numbers measure the stage, not a model.
Its merges join both sources, so they pass the gate; the gate still embeds every merged
instruction with the real MiniLM.

Runs, one after the other on one machine, each on a fresh run root, each after a warm-up run on
a few groups (Spark's Python workers started, the gate's model loaded once per worker):
  1. this tree against the clean server, then its rerun (0 requests);
  2. this tree with ``--fault-rate`` (30 %) of requests faulted (429 + Retry-After, 500, 503,
     hangs past the timeout, non-JSON bodies, JSON missing a key, refusals), then its rerun
     (requests only for the groups that failed on the way);
  3. and 4. the same two with a stand-in encoder (``tiny_encoder``: one 32-wide layer, nearly
     free) for the inputs and the gate: the stage without the cost of MiniLM on this CPU;
  5. baseline: the merge stage of git revision ``--baseline-rev`` (HEAD: the code before this
     change) in a subprocess with its own Spark session, then its rerun (last: the slowest).
The section of BENCHMARKS.md is rewritten after each run, so a cut-short run leaves its rows.
Stage time is the merge stage run by the executor end to end (job build, requests, gate, ledger, Delta write); the
request phase is first request to last answer as the server saw it. Also timed: the gate's
encoder alone on 400 merged instruction texts (what bounds the stage on a small CPU).

Usage: .venv/bin/python bench/bench_merge.py [--groups 2000] [--latency-ms 100] [--concurrency 32]
       [--partitions 2] [--fault-rate 0.3] [--baseline-rev HEAD | --no-baseline] [--no-faults]
Writes the "merge" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench._common import write_section  # noqa: E402
from mergeit_spark.config import load_settings  # noqa: E402
from mergeit_spark.ids import content_id, group_id  # noqa: E402
from mergeit_spark.llm.gate import embedding_text  # noqa: E402
from mergeit_spark.stages.group import group_cluster  # noqa: E402

from fake_openai import FakeOpenAI, Faults, merged_content  # noqa: E402

DATA = (REPO / ".." / "shared" / "data").resolve()
FILES = ("mergeit-6k.json", "gpteacher-roleplay.json", "gpteacher-toolformer.json")
CHUNK = 300
CACHE = Path(tempfile.gettempdir()) / "mergeit-bench"
ENCODER_SAMPLE = 400   # merged texts timed through the gate's encoder alone
PEAK_GFLOPS = 160.0    # fp32 matrix products, 2 cores of this AVX2 CPU (torch sgemm: ~80 GFLOP/s a core)

# Run one merge stage (this tree's or the baseline's: whichever ``mergeit_spark`` is first on
# sys.path) on the Parquet inputs; print one JSON line per timed run.
RUNNER = r"""
import json, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
from mergeit_spark.config import load_settings
from mergeit_spark.session import build_session
from mergeit_spark.pipeline import Pipeline
from mergeit_spark.stages import StageContext
from mergeit_spark.stages.merge import Merge
try:  # a baseline tree from before the decontam stage: the merge stage reads no evaluation set
    from mergeit_spark.stages.decontam import no_evaluation
except ImportError:
    no_evaluation = lambda spark: {}
from mergeit_spark.tables import TableStore
try:  # a baseline tree from before the executor performed every write
    from mergeit_spark.stages.merge import run_merge
except ImportError:
    run_merge = None
settings = load_settings(overrides=args["overrides"])
spark = build_session(settings.spark)
read = lambda name: spark.read.parquet(str(Path(args["inputs"]) / f"{name}.parquet"))
records, embeddings, groups = read("records").cache(), read("embeddings").cache(), read("groups").cache()
def once(root, groups):
    settings.output.root = str(root)
    started = time.perf_counter()
    if run_merge is not None:
        s = run_merge(StageContext(spark, TableStore(spark, root), settings), groups, records, embeddings).as_dict()
    else:
        pipeline = Pipeline(settings, spark=spark, stages=[Merge()])
        s = pipeline.run_stage(pipeline.stages[0], {"merge_groups": groups, "records": records,
                                                    "embeddings": embeddings, **no_evaluation(spark)}).summary
    return {"seconds": time.perf_counter() - started, "requests": s["requests"], "groups": s["groups"],
            "by_status": s["by_status"], "errors": s["errors"], "gate_rejections": s.get("gate_rejections", {})}
once(Path(args["root"]) / "warm", groups.limit(8))
print("WARM", flush=True)
sys.stdin.readline()  # the parent resets the server's counters, then says go
for label in ("first", "rerun"):
    print("RESULT " + json.dumps({"label": label, **once(Path(args["root"]) / "run", groups)}), flush=True)
spark.stop()
"""


def load_rows(limit: int) -> list[dict]:
    rows, seen = [], set()
    for name in FILES:
        for r in json.loads((DATA / name).read_text(encoding="utf-8")):
            ins, inp, out = r["instruction"].strip(), (r.get("input") or "").strip(), r["output"].strip()
            rid = content_id(ins, inp, out)
            if ins and out and rid not in seen:
                seen.add(rid)
                rows.append({"id": rid, "instruction": ins, "input": inp, "output": out,
                             "source": name, "extra": None})
            if len(rows) >= limit:
                return rows
    return rows


def cached_embeddings(rows: list[dict], embed) -> np.ndarray:
    """The embed stage's vectors of ``rows`` (one chunk), cached on disk by model and texts."""
    texts = [embedding_text(r["instruction"], r["input"]) for r in rows]
    key = hashlib.sha256(json.dumps([embed.model, texts]).encode()).hexdigest()[:16]
    path = CACHE / f"embeddings-{key}.npy"
    if path.is_file():
        return np.load(path)
    from mergeit_spark.models import encode_texts
    print(f"embedding {len(texts)} rows once (cached in {CACHE})", flush=True)
    vectors = encode_texts(texts, embed)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def build_inputs(n_groups: int, threshold: float, embed, out: Path) -> tuple[int, list[dict]]:
    """Write records, embeddings and groups as Parquet under ``out``; returns the group count and
    the member rows of each group (for the encoder timing)."""
    rows = load_rows(int(n_groups / 0.2) + CHUNK)
    chunks = []   # embedded chunk by chunk, only as far as the groups need
    found = []
    for start in range(0, len(rows), CHUNK):
        ids = [r["id"] for r in rows[start:start + CHUNK]]
        chunks.append(cached_embeddings(rows[start:start + CHUNK], embed))
        found += group_cluster(ids, chunks[-1], threshold, 2)
        if len(found) >= n_groups:
            break
    vectors = np.concatenate(chunks)
    found = found[:n_groups]
    used = {m for members, _ in found for m in members}
    keep = [i for i, r in enumerate(rows[:len(vectors)]) if r["id"] in used]
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([rows[i] for i in keep]), out / "records.parquet")
    pq.write_table(pa.table({
        "id": [rows[i]["id"] for i in keep],
        "embedding": pa.array([vectors[i].tolist() for i in keep], pa.list_(pa.float32())),
        "model": [embed.model] * len(keep)}), out / "embeddings.parquet")
    pq.write_table(pa.table({
        "group_id": [group_id(m) for m, _ in found], "cluster": pa.array([0] * len(found), pa.int32()),
        "member_ids": [m for m, _ in found], "similarity": [s for _, s in found]}), out / "groups.parquet")
    by_id = {r["id"]: r for r in rows}
    return len(found), [[by_id[m] for m in members] for members, _ in found]


def run_stage(tree: Path, inputs: Path, root: Path, overrides: list[str], fake: FakeOpenAI) -> dict:
    """One warm-up, then the timed first run and rerun, in a subprocess importing ``tree``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(REPO / "tests")]))
    args = json.dumps({"inputs": str(inputs), "root": str(root), "overrides": overrides})
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, args], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(inputs.parent))
    assert proc.stdout is not None and proc.stdin is not None
    results, sent = {}, {}
    for line in proc.stdout:
        if line.startswith("WARM"):
            with fake.lock:
                fake.requests.clear()
                fake.times.clear()
                fake.count = 0
                fake.max_in_flight = 0
            proc.stdin.write("go\n")
            proc.stdin.flush()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            with fake.lock:
                times, count = list(fake.times), fake.count
                fake.times.clear()
            sent[result["label"]] = count - sum(s for s in sent.values())
            if result["label"] == "first" and times:
                result["request_phase"] = max(times) - min(times) + fake.latency_s
            results[result["label"]] = result
    if proc.wait() != 0:
        raise RuntimeError(f"merge run in {tree} failed (exit {proc.returncode})")
    results["first"]["served"] = sent.get("first", 0)
    results["rerun"]["served"] = sent.get("rerun", 0)
    return results


def tiny_encoder(into: Path) -> Path:
    """A stand-in sentence-transformers model: MiniLM's tokenizer on a one-layer, 32-wide BERT with
    fixed random weights. Nearly free to run, so a run with it measures the stage without the
    cost of the gate's encoder (its verdicts mean nothing; the gate is relaxed for that run)."""
    if (into / "modules.json").is_file():
        return into
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mergeit_spark.models import resolve_model_path
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    raw = into.parent / (into.name + "-bert")
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    word = models.Transformer(str(raw), max_seq_length=256)
    SentenceTransformer(modules=[word, models.Pooling(32), models.Normalize()]).save(str(into))
    return into


RELAXED_GATE = ["gate.min_source_similarity=-1", "gate.min_request_coverage=-2",
                "gate.min_output_coverage=0", "gate.max_copy_similarity=1"]


def baseline_tree(rev: str, into: Path) -> Path:
    """The ``mergeit_spark`` package at git revision ``rev``, extracted under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "mergeit_spark"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# MiniLM-L6 (6 layers, width 384, feed-forward 1536): multiply-adds per token in its dense layers.
MINILM_MACS_PER_TOKEN = 6 * (4 * 384 * 384 + 2 * 384 * 1536)


def encoder_rate(groups: list[list[dict]], embed) -> dict:
    """The gate's encoder alone on merged instruction texts, in this process: texts per second
    (wall) and CPU milliseconds per text, as the gate calls it (calls of 32 texts, its forward
    passes); and the FLOP per merge (dense layers plus attention over the text's tokens)."""
    from mergeit_spark.llm.gate import model_encoder
    from mergeit_spark.models import load_model
    texts = []
    for members in groups:
        merged = json.loads(merged_content(members))
        texts.append(embedding_text(merged["instruction"], merged["input"]))
    encode = model_encoder(embed)
    encode(texts[:16])
    texts = texts[:ENCODER_SAMPLE]
    tokens = np.minimum([len(t) for t in load_model(embed).tokenizer(texts)["input_ids"]], embed.max_seq_length)
    flop = float(np.sum(2 * MINILM_MACS_PER_TOKEN * tokens + 2 * 2 * 6 * 384 * tokens ** 2)) / len(texts)
    started, cpu = time.perf_counter(), time.thread_time()
    for start in range(0, len(texts), 32):
        encode(texts[start:start + 32])
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
    return {"rate": len(texts) / wall, "cpu_ms": 1000 * cpu / len(texts), "tokens": float(tokens.mean()),
            "gflop": flop / 1e9}


def table(results: dict[str, dict], n: int) -> list[str]:
    lines = ["| run | requests sent | request phase | merges/s (requests) | stage time | "
             "merges/s (stage) | rerun: time, requests | rerun / first | statuses | gate rejections |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in results.items():
        first, rerun = r["first"], r["rerun"]
        phase = first.get("request_phase") or float("nan")
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(first["by_status"].items()))
        rejections = ", ".join(f"{k} {v}" for k, v in sorted(first["gate_rejections"].items())) or "-"
        lines.append(
            f"| {label} | {first['served']} | {phase:.1f} s | {n / phase:.0f} | {first['seconds']:.1f} s | "
            f"**{n / first['seconds']:.0f}** | {rerun['seconds']:.1f} s, {rerun['served']} | "
            f"{rerun['seconds'] / first['seconds']:.1%} | {statuses} | {rejections} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--latency-ms", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--baseline-rev", default="HEAD")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-faults", action="store_true", help="leave out the two fault-injection runs")
    args = parser.parse_args()
    base = load_settings(env={})
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        work = Path(tmp)
        n, member_rows = build_inputs(args.groups, base.group.threshold, base.embed, work / "inputs")
        enc = encoder_rate(member_rows, base.embed)
        tiny = load_settings(overrides=[f"embed.model={tiny_encoder(CACHE / 'tiny-encoder')}"], env={})
        build_inputs(args.groups, base.group.threshold, tiny.embed, work / "inputs-tiny")
        common = ["spark.master=local[2]", "spark.shuffle_partitions=4", "spark.driver_memory=2g",
                  f"merge.partitions={args.partitions}", f"llm.concurrency={args.concurrency}"]
        faulty = ["llm.request_timeout_s=2", "llm.backoff_initial_s=0.2", "llm.backoff_max_s=2"]
        runs = [("this tree", REPO, [], None),
                (f"this tree, {args.fault_rate:.0%} faults", REPO, faulty, args.fault_rate),
                ("this tree, stand-in encoder (no gate cost)", REPO,
                 [f"embed.model={tiny.embed.model}", *RELAXED_GATE], None),
                (f"this tree, stand-in encoder, {args.fault_rate:.0%} faults", REPO,
                 [f"embed.model={tiny.embed.model}", *RELAXED_GATE, *faulty], args.fault_rate)]
        if args.no_faults:
            runs = [run for run in runs if run[3] is None]
        if not args.no_baseline:   # last: the slowest, and not needed for the other rows
            runs.append((f"baseline ({args.baseline_rev})",
                         baseline_tree(args.baseline_rev, work / "baseline"), [], None))
        results: dict[str, dict] = {}
        with FakeOpenAI(latency_s=args.latency_ms / 1000) as fake:
            for i, (label, tree, extra, fault_rate) in enumerate(runs):
                fake.script = Faults(rate=fault_rate, hang_s=3.0) if fault_rate else None
                inputs = work / ("inputs-tiny" if "stand-in" in label else "inputs")
                overrides = common + [f"llm.base_url={fake.base_url}", *extra]
                results[label] = r = run_stage(tree, inputs, work / f"run{i}", overrides, fake)
                print(f"{label}: {n} groups, first {r['first']['seconds']:.1f} s "
                      f"({n / r['first']['seconds']:.0f} merges/s, {r['first']['served']} requests), "
                      f"rerun {r['rerun']['seconds']:.1f} s ({r['rerun']['served']} requests); "
                      f"{r['first']['by_status']}", flush=True)
                write_section("merge", report(results, n, enc, args))   # partial results land too


def report(results: dict[str, dict], n: int, enc: dict, args: argparse.Namespace) -> str:
    load = os.getloadavg()
    return "\n".join([
        f"{n} groups of 2 real records; loopback OpenAI-protocol server (tests/fake_openai.py) "
        f"answering each request after {args.latency_ms} ms; local Spark (`local[2]`), "
        f"`merge.partitions={args.partitions}`, `llm.concurrency={args.concurrency}` per task; the "
        f"real MiniLM gate on the executors unless the row says stand-in encoder. Stage time: "
        f"the merge stage (executor `run_stage`) end to end (job build, requests, gate, ledger, Delta write), after a warm-up "
        f"run on 8 groups; request phase: first request to last answer at the server. The rerun "
        f"answers every recorded group from the ledger and re-requests only `failed` groups whose "
        f"failure is retryable (transport, server, budget). Faults: {args.fault_rate:.0%} of requests "
        f"get a 429 + Retry-After, 500, 503, a hang past the timeout, a non-JSON body, JSON missing "
        f"a key or a refusal.",
        "",
        *table(results, n),
        "",
        f"The gate's encoder alone (`llm.gate.model_encoder`: embed stage `encode_texts`, one "
        f"torch thread, {ENCODER_SAMPLE} merged instruction texts in calls of 32, this machine): "
        f"{enc['rate']:.0f} texts/s wall, {enc['cpu_ms']:.1f} ms of CPU per text. A merged "
        f"instruction text averages {enc['tokens']:.0f} tokens, {enc['gflop']:.2f} GFLOP through "
        f"MiniLM-L6; at {PEAK_GFLOPS:.0f} GFLOP/s (2 cores x AVX2 FMA, the fp32 matrix-product peak "
        f"measured here) the gate alone caps the stage at {PEAK_GFLOPS / enc['gflop']:.0f} merges/s "
        f"with nothing else running; at the CPU per text measured, {2000 / enc['cpu_ms']:.0f} merges/s.",
        "",
        f"Load average when written: {load[0]:.1f} (the machine is shared; compare rows of one run).",
    ])


if __name__ == "__main__":
    main()
