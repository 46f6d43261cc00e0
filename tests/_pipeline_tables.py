"""A small, consistent set of stage tables built from real rows, for finalize/report/export tests.

The text is real (the first rows of ``mergeit-6k.json``); what the model stages would compute is
made up but consistent with the table contracts in DESIGN.md: embeddings are random unit vectors
around one random direction per cluster (so a topic map shows clusters), dedup marks a few rows as
near-duplicates of a kept row of their cluster, select keeps a fixed share of the kept rows, the
group stage pairs selected rows of one cluster, and merge outcomes cover every case finalize must
handle: accepted, gate failed, failed, never attempted, and a group with an earlier failed
attempt plus an accepted one.

``build_pipeline_tables`` writes them through a real ``TableStore`` and returns what the tests
should find afterwards, computed independently of the code under test.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from mergeit_spark.ids import content_id, group_id
from mergeit_spark.tables import TableStore

SOURCE = "mergeit-6k.json"
MODEL = "SmolLM2-135M-Instruct"

RECORDS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False), T.StructField("instruction", T.StringType()),
    T.StructField("input", T.StringType()), T.StructField("output", T.StringType()),
    T.StructField("source", T.StringType()), T.StructField("extra", T.StringType())])
REJECTS_SCHEMA = T.StructType([
    T.StructField("source", T.StringType()), T.StructField("line", T.LongType()),
    T.StructField("row", T.LongType()), T.StructField("raw", T.StringType()),
    T.StructField("reason", T.StringType()), T.StructField("detail", T.StringType())])
EMBEDDINGS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType()), T.StructField("embedding", T.ArrayType(T.FloatType())),
    T.StructField("model", T.StringType())])
TOPICS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType()), T.StructField("cluster", T.IntegerType()),
    T.StructField("distance", T.DoubleType())])
CENTROIDS_SCHEMA = T.StructType([
    T.StructField("cluster", T.IntegerType()), T.StructField("center", T.ArrayType(T.DoubleType())),
    T.StructField("size", T.LongType()), T.StructField("pca_components", T.IntegerType()),
    T.StructField("k", T.IntegerType())])
DEDUP_SCHEMA = T.StructType([
    T.StructField("id", T.StringType()), T.StructField("cluster", T.IntegerType()),
    T.StructField("status", T.StringType()), T.StructField("duplicate_of", T.StringType()),
    T.StructField("similarity", T.DoubleType())])
SELECTED_SCHEMA = T.StructType([
    T.StructField("id", T.StringType()), T.StructField("cluster", T.IntegerType()),
    T.StructField("rank", T.IntegerType()), T.StructField("gain", T.DoubleType())])
GROUPS_SCHEMA = T.StructType([
    T.StructField("group_id", T.StringType()), T.StructField("cluster", T.IntegerType()),
    T.StructField("member_ids", T.ArrayType(T.StringType())), T.StructField("similarity", T.DoubleType())])
MERGES_SCHEMA = T.StructType([
    T.StructField("group_id", T.StringType()), T.StructField("request_hash", T.StringType()),
    T.StructField("status", T.StringType()), T.StructField("instruction", T.StringType()),
    T.StructField("input", T.StringType()), T.StructField("output", T.StringType()),
    T.StructField("model", T.StringType()), T.StructField("attempts", T.IntegerType()),
    T.StructField("prompt_tokens", T.LongType()), T.StructField("completion_tokens", T.LongType()),
    T.StructField("latency_ms", T.DoubleType()), T.StructField("error", T.StringType()),
    T.StructField("gate", T.StringType())])


@dataclass
class Expected:
    """What finalize must produce from the tables; computed here, independently of finalize."""
    records: int
    rejects: int
    rejects_by_reason: dict[str, int]
    fates: dict[str, int]
    final_original: int
    final_merged: int
    merged_members: dict[str, str]          # member id -> group_id of its accepted merge
    merged_ids: dict[str, str]              # group_id -> content id of the merged text
    kept_after_failed_merge: dict[str, str]  # member id -> reason
    duplicate_of: dict[str, str]
    not_selected: set[str]
    kept: set[str]
    merge_statuses: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    clusters: int
    cluster_sizes: dict[int, int]
    reject_keys: set[str] = field(default_factory=set)

    @property
    def final(self) -> int:
        return self.final_original + self.final_merged


def _request_hash(gid: str, attempt: str) -> str:
    return hashlib.sha256(f"{gid}|{MODEL}|{attempt}".encode()).hexdigest()[:32]


def _merge_text(a: dict, b: dict) -> tuple[str, str, str]:
    instruction = f"{a['instruction'].rstrip('.')}. Then: {b['instruction']}"
    input_ = "\n".join(x for x in (a["input"], b["input"]) if x)
    output = f"{a['output']}\n\n{b['output']}"
    return instruction, input_, output


def build_pipeline_tables(spark: SparkSession, store: TableStore, data_dir: Path, n_records: int = 36,
                          n_clusters: int = 3, dim: int = 32, seed: int = 7) -> Expected:
    """Write records, rejects, embeddings, topics, centroids, dedup, selected, merge_groups and
    merges for ``n_records`` real rows to ``store``; return what finalize must find."""
    rng = np.random.default_rng(seed)
    raw_rows = json.loads((data_dir / "mergeit-6k.json").read_text())
    rows, seen = [], set()
    for r in raw_rows:
        rid = content_id(r["instruction"], r["input"], r["output"])
        if rid not in seen:
            seen.add(rid)
            rows.append((rid, r))
        if len(rows) == n_records:
            break
    records = [(rid, r["instruction"], r["input"], r["output"], SOURCE,
                json.dumps({k: v for k, v in r.items() if k not in ("instruction", "input", "output")}))
               for rid, r in rows]
    ids = [rid for rid, _ in rows]
    by_id = {rid: r for rid, r in rows}

    # Rejects: two exact duplicates (detail = the id kept), one unparsable line, one missing field.
    rejects = [
        (SOURCE, None, 9001, json.dumps(rows[0][1]), "exact_duplicate", ids[0]),
        (SOURCE, None, 9002, json.dumps(rows[5][1]), "exact_duplicate", ids[5]),
        ("broken.jsonl", 3, None, '{"instruction": "Say hi", "input": ', "bad_json", "Expecting value"),
        ("broken.jsonl", 4, None, '{"input": "x", "output": "y"}', "missing_field", "instruction"),
    ]
    reject_keys = {f"{SOURCE}:row:9001", f"{SOURCE}:row:9002", "broken.jsonl:line:3", "broken.jsonl:line:4"}

    cluster_of = {rid: i % n_clusters for i, rid in enumerate(ids)}
    directions = rng.normal(size=(n_clusters, dim))
    embeddings, topics = [], []
    for rid in ids:
        v = directions[cluster_of[rid]] + 0.35 * rng.normal(size=dim)
        v /= np.linalg.norm(v)
        embeddings.append((rid, [float(x) for x in v.astype(np.float32)], "random-unit-test"))
        topics.append((rid, cluster_of[rid], float(rng.uniform(0.1, 0.9))))
    members = {c: [rid for rid in ids if cluster_of[rid] == c] for c in range(n_clusters)}
    pca_components = 8
    centroids = [(c, [float(x) for x in rng.normal(size=pca_components)], len(members[c]), pca_components,
                  n_clusters) for c in range(n_clusters)]

    # Dedup: the last member of the first clusters duplicates the first member of its cluster.
    duplicate_of = {}
    for c in range(n_clusters):
        duplicate_of[members[c][-1]] = members[c][0]
    duplicate_of[members[0][-2]] = members[0][0]
    dedup = [(rid, cluster_of[rid], "duplicate" if rid in duplicate_of else "kept", duplicate_of.get(rid),
              0.97 if rid in duplicate_of else None) for rid in ids]

    # Select: every kept row but the two last kept ones of each cluster.
    selected, not_selected = [], set()
    for c in range(n_clusters):
        kept_c = [rid for rid in members[c] if rid not in duplicate_of]
        for rank, rid in enumerate(kept_c[:-2]):
            selected.append((rid, c, rank, float(1.0 / (rank + 1))))
        not_selected.update(kept_c[-2:])
    selected_ids = [s[0] for s in selected]

    # Groups: pairs of selected rows of one cluster, six in all.
    pairs = []
    for c in range(n_clusters):
        sel_c = [s[0] for s in selected if s[1] == c]
        pairs += [(c, sel_c[0], sel_c[1]), (c, sel_c[2], sel_c[3])]
    groups = [(group_id([a, b]), c, sorted([a, b]), 0.6 + 0.03 * i) for i, (c, a, b) in enumerate(pairs)]

    # Merge outcomes: merged, gate_failed, failed, merged (after an earlier failed attempt), none, merged.
    plan = ["merged", "gate_failed", "failed", "retry_merged", None, "merged"]
    merges, merged_members, merged_ids, kept_after = [], {}, {}, {}
    statuses: dict[str, int] = {}
    prompt_tokens = completion_tokens = 0
    for (gid, c, member_ids, _), outcome in zip(groups, plan):
        a, b = by_id[member_ids[0]], by_id[member_ids[1]]
        if outcome is None:
            for m in member_ids:
                kept_after[m] = "merge_missing"
            continue
        attempts = []
        if outcome == "retry_merged":
            attempts.append(("failed", None, None, None, "HTTP 503 after 5 retries", "early"))
            outcome = "merged"
        if outcome == "merged":
            ins, inp, out = _merge_text(a, b)
            attempts.append(("merged", ins, inp, out, None, "final"))
            merged_ids[gid] = content_id(ins, inp, out)
            for m in member_ids:
                merged_members[m] = gid
        elif outcome == "gate_failed":
            attempts.append(("gate_failed", a["instruction"], a["input"], a["output"], None, "final"))
            for m in member_ids:
                kept_after[m] = "merge_gate_failed"
        else:
            attempts.append(("failed", None, None, None, "reply was not JSON", "final"))
            for m in member_ids:
                kept_after[m] = "merge_failed"
        for status, ins, inp, out, error, tag in attempts:
            pt, ct = 300 + len(merges) * 11, (120 + len(merges) * 7) if ins else 0
            prompt_tokens += pt
            completion_tokens += ct
            statuses[status] = statuses.get(status, 0) + 1
            gate = json.dumps({"copy_similarity": 0.99}) if status == "gate_failed" else None
            merges.append((gid, _request_hash(gid, tag), status, ins, inp, out, MODEL, 1 if ins else 3,
                           pt, ct, 850.0 + 10 * len(merges), error, gate))

    kept = set(selected_ids) - set(merged_members)
    fates = {"rejected": len(rejects), "duplicate": len(duplicate_of), "not_selected": len(not_selected),
             "kept": len(kept), "merged": len(merged_members)}
    assert sum(fates.values()) == len(records) + len(rejects)

    tables = {
        "records": (records, RECORDS_SCHEMA), "rejects": (rejects, REJECTS_SCHEMA),
        "embeddings": (embeddings, EMBEDDINGS_SCHEMA), "topics": (topics, TOPICS_SCHEMA),
        "centroids": (centroids, CENTROIDS_SCHEMA), "dedup": (dedup, DEDUP_SCHEMA),
        "selected": (selected, SELECTED_SCHEMA), "merge_groups": (groups, GROUPS_SCHEMA),
        "merges": (merges, MERGES_SCHEMA),
    }
    for name, (data, schema) in tables.items():
        store.write(spark.createDataFrame(data, schema), name)

    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r[4]] = reasons.get(r[4], 0) + 1
    return Expected(
        records=len(records), rejects=len(rejects), rejects_by_reason=reasons, fates=fates,
        final_original=len(kept), final_merged=len(merged_ids), merged_members=merged_members,
        merged_ids=merged_ids, kept_after_failed_merge=kept_after, duplicate_of=duplicate_of,
        not_selected=not_selected, kept=kept, merge_statuses=statuses, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, clusters=n_clusters,
        cluster_sizes={c: len(m) for c, m in members.items()}, reject_keys=reject_keys)


def run_finalize(spark: SparkSession, store: TableStore, settings) -> None:
    """Run the Finalize stage the way the pipeline does: read inputs, run, write outputs."""
    from mergeit_spark.stages import StageContext
    from mergeit_spark.stages.finalize import Finalize

    stage = Finalize()
    tables = {name: store.read(name) for name in stage.inputs}
    for name, df in stage.run(StageContext(spark, store, settings), tables).items():
        store.write(df, name)


_FINALIZED: dict[str, tuple[TableStore, Expected]] = {}


def finalized_run(spark: SparkSession, settings, data_dir: Path, tmp_path_factory) -> tuple[TableStore, Expected]:
    """The fixture tables plus finalize's output, built once per test session and shared by the
    finalize, report and export tests (none of them writes to this store)."""
    key = str(data_dir)
    if key not in _FINALIZED:
        store = TableStore(spark, tmp_path_factory.mktemp("pipeline") / "run")
        expected = build_pipeline_tables(spark, store, data_dir)
        run_finalize(spark, store, settings)
        _FINALIZED[key] = (store, expected)
    return _FINALIZED[key]
