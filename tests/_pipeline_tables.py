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

from mergeit_spark.ids import content_id, group_id, merged_id
from mergeit_spark.stages.decontam import CONTAMINATION_SCHEMA
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
    T.StructField("model", T.StringType()), T.StructField("precision", T.StringType())])
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
INPUT_FILES_SCHEMA = T.StructType([
    T.StructField("source", T.StringType()), T.StructField("format", T.StringType()),
    T.StructField("units", T.LongType()), T.StructField("bytes", T.LongType()),
    T.StructField("run_id", T.StringType())])


# The merges.gate verdicts of the fixture: one merge refused by two checks, accepted ones passed.
GATE_FAILED = {"passed": False, "failed": ["source_similarity", "copy"], "min_source_similarity": 0.41,
               "output_ratio": 1.0, "max_copy_similarity": 0.99, "copy_of": 0}
GATE_PASSED = {"passed": True, "failed": [], "min_source_similarity": 0.8, "output_ratio": 1.4,
               "max_copy_similarity": 0.7, "copy_of": None}


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
    checks: dict = field(default_factory=dict)  # the finalize stage's check numbers, once it ran

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


def _real_rows(data_dir: Path, n_records: int) -> list[tuple[str, dict]]:
    """The first ``n_records`` distinct rows of mergeit-6k.json with their content ids."""
    rows, seen = [], set()
    for r in json.loads((data_dir / "mergeit-6k.json").read_text()):
        rid = content_id(r["instruction"], r["input"], r["output"])
        if rid not in seen:
            seen.add(rid)
            rows.append((rid, r))
        if len(rows) == n_records:
            break
    return rows


def _vectors(ids: list[str], n_clusters: int, dim: int, rng: np.random.Generator) -> dict:
    """Random unit vectors around one direction per cluster; topics and centroids to match."""
    cluster_of = {rid: i % n_clusters for i, rid in enumerate(ids)}
    directions = rng.normal(size=(n_clusters, dim))
    embeddings, topics = [], []
    for rid in ids:
        v = directions[cluster_of[rid]] + 0.35 * rng.normal(size=dim)
        v /= np.linalg.norm(v)
        embeddings.append((rid, [float(x) for x in v.astype(np.float32)], "random-unit-test", "fp32"))
        topics.append((rid, cluster_of[rid], float(rng.uniform(0.1, 0.9))))
    members = {c: [rid for rid in ids if cluster_of[rid] == c] for c in range(n_clusters)}
    pca_components = 8
    centroids = [(c, [float(x) for x in rng.normal(size=pca_components)], len(members[c]), pca_components,
                  n_clusters) for c in range(n_clusters)]
    return {"cluster_of": cluster_of, "members": members, "embeddings": embeddings, "topics": topics,
            "centroids": centroids}


def _dedup_and_select(ids: list[str], cluster_of: dict[str, int], members: dict[int, list[str]]) -> dict:
    # Dedup: the last member of each cluster (and one more in the first) duplicates its first member.
    duplicate_of = {m[-1]: m[0] for m in members.values()}
    duplicate_of[members[0][-2]] = members[0][0]
    dedup = [(rid, cluster_of[rid], "duplicate" if rid in duplicate_of else "kept", duplicate_of.get(rid),
              0.97 if rid in duplicate_of else None) for rid in ids]
    # Select: every kept row but the two last kept ones of each cluster.
    selected, not_selected = [], set()
    for c, member_ids in members.items():
        kept_c = [rid for rid in member_ids if rid not in duplicate_of]
        selected += [(rid, c, rank, float(1.0 / (rank + 1))) for rank, rid in enumerate(kept_c[:-2])]
        not_selected.update(kept_c[-2:])
    # Groups: pairs of selected rows of one cluster, two per cluster.
    pairs = []
    for c in members:
        sel_c = [s[0] for s in selected if s[1] == c]
        pairs += [(c, sel_c[0], sel_c[1]), (c, sel_c[2], sel_c[3])]
    groups = [(group_id([a, b]), c, sorted([a, b]), 0.6 + 0.03 * i) for i, (c, a, b) in enumerate(pairs)]
    return {"duplicate_of": duplicate_of, "dedup": dedup, "selected": selected, "not_selected": not_selected,
            "groups": groups}


def _attempts(outcome: str, a: dict, b: dict) -> list[tuple]:
    """The merges rows one group's outcome leaves: (status, instruction, input, output, error, tag)."""
    attempts = []
    if outcome == "retry_merged":
        attempts.append(("failed", None, None, None, "HTTP 503 after 5 retries", "early"))
        outcome = "merged"
    if outcome == "merged":
        attempts.append(("merged", *_merge_text(a, b), None, "final"))
    elif outcome == "gate_failed":
        attempts.append(("gate_failed", a["instruction"], a["input"], a["output"], None, "final"))
    else:
        attempts.append(("failed", None, None, None, "reply was not JSON", "final"))
    return attempts


def _merges(groups: list[tuple], by_id: dict[str, dict]) -> dict:
    """Merge outcomes: merged, gate_failed, failed, merged (after an earlier failed attempt), none,
    merged; with what finalize and the report must make of them."""
    plan = ["merged", "gate_failed", "failed", "retry_merged", None, "merged"]
    out = {"merges": [], "merged_members": {}, "merged_ids": {}, "kept_after": {}, "statuses": {},
           "prompt_tokens": 0, "completion_tokens": 0}
    merges = out["merges"]
    for (gid, _, member_ids, _), outcome in zip(groups, plan):
        if outcome is None:
            out["kept_after"].update({m: "merge_missing" for m in member_ids})
            continue
        for status, ins, inp, outp, error, tag in _attempts(outcome, by_id[member_ids[0]], by_id[member_ids[1]]):
            pt, ct = 300 + len(merges) * 11, (120 + len(merges) * 7) if ins else 0
            out["prompt_tokens"] += pt
            out["completion_tokens"] += ct
            out["statuses"][status] = out["statuses"].get(status, 0) + 1
            gate = (json.dumps(GATE_FAILED) if status == "gate_failed"
                    else json.dumps(GATE_PASSED) if status == "merged" else None)
            merges.append((gid, _request_hash(gid, tag), status, ins, inp, outp, MODEL, 1 if ins else 3,
                           pt, ct, 850.0 + 10 * len(merges), error, gate))
        if outcome in ("merged", "retry_merged"):
            ins, inp, outp = _merge_text(by_id[member_ids[0]], by_id[member_ids[1]])
            out["merged_ids"][gid] = merged_id(gid, ins, inp, outp)
            out["merged_members"].update({m: gid for m in member_ids})
        else:
            out["kept_after"].update({m: f"merge_{outcome}" for m in member_ids})
    return out


def build_pipeline_tables(spark: SparkSession, store: TableStore, data_dir: Path, n_records: int = 36,
                          n_clusters: int = 3, dim: int = 32, seed: int = 7) -> Expected:
    """Write records, rejects, input_files, embeddings, topics, centroids, dedup, selected,
    merge_groups and merges for ``n_records`` real rows to ``store``; return what finalize must find."""
    rows = _real_rows(data_dir, n_records)
    records = [(rid, r["instruction"], r["input"], r["output"], SOURCE,
                json.dumps({k: v for k, v in r.items() if k not in ("instruction", "input", "output")}))
               for rid, r in rows]
    ids = [rid for rid, _ in rows]
    # Rejects: two exact duplicates (detail = the id kept), one unparsable line, one missing field.
    rejects = [
        (SOURCE, None, 9001, json.dumps(rows[0][1]), "exact_duplicate", ids[0]),
        (SOURCE, None, 9002, json.dumps(rows[5][1]), "exact_duplicate", ids[5]),
        ("broken.jsonl", 3, None, '{"instruction": "Say hi", "input": ', "bad_json", "Expecting value"),
        ("broken.jsonl", 4, None, '{"input": "x", "output": "y"}', "missing_field", "instruction"),
    ]
    # What ingest counted in each file without parsing it: every unit became a record or a reject.
    input_files = [(SOURCE, "json", len(records) + 2, 123_456, "run-1"), ("broken.jsonl", "jsonl", 2, 99, "run-1")]
    vec = _vectors(ids, n_clusters, dim, np.random.default_rng(seed))
    sel = _dedup_and_select(ids, vec["cluster_of"], vec["members"])
    mrg = _merges(sel["groups"], dict(rows))

    tables = {
        "records": (records, RECORDS_SCHEMA), "rejects": (rejects, REJECTS_SCHEMA),
        "embeddings": (vec["embeddings"], EMBEDDINGS_SCHEMA), "topics": (vec["topics"], TOPICS_SCHEMA),
        "centroids": (vec["centroids"], CENTROIDS_SCHEMA), "dedup": (sel["dedup"], DEDUP_SCHEMA),
        "selected": (sel["selected"], SELECTED_SCHEMA), "merge_groups": (sel["groups"], GROUPS_SCHEMA),
        "merges": (mrg["merges"], MERGES_SCHEMA), "input_files": (input_files, INPUT_FILES_SCHEMA),
        "contamination": ([], CONTAMINATION_SCHEMA),   # no evaluation set: nothing contaminated
    }
    for name, (data, schema) in tables.items():
        store.write(spark.createDataFrame(data, schema), name)
    return _expected(records, rejects, vec, sel, mrg, n_clusters)


def _expected(records: list, rejects: list, vec: dict, sel: dict, mrg: dict, n_clusters: int) -> Expected:
    kept = {s[0] for s in sel["selected"]} - set(mrg["merged_members"])
    fates = {"rejected": len(rejects), "contaminated": 0, "duplicate": len(sel["duplicate_of"]), "not_selected": len(sel["not_selected"]),
             "kept": len(kept), "merged": len(mrg["merged_members"])}
    assert sum(fates.values()) == len(records) + len(rejects)
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r[4]] = reasons.get(r[4], 0) + 1
    reject_keys = {f"{r[0]}:line:{r[1]}" if r[1] is not None else f"{r[0]}:row:{r[2]}" for r in rejects}
    return Expected(
        records=len(records), rejects=len(rejects), rejects_by_reason=reasons, fates=fates,
        final_original=len(kept), final_merged=len(mrg["merged_ids"]), merged_members=mrg["merged_members"],
        merged_ids=mrg["merged_ids"], kept_after_failed_merge=mrg["kept_after"], duplicate_of=sel["duplicate_of"],
        not_selected=sel["not_selected"], kept=kept, merge_statuses=mrg["statuses"],
        prompt_tokens=mrg["prompt_tokens"], completion_tokens=mrg["completion_tokens"], clusters=n_clusters,
        cluster_sizes={c: len(m) for c, m in vec["members"].items()}, reject_keys=reject_keys)


def run_finalize(spark: SparkSession, store: TableStore, settings) -> dict:
    """Run the Finalize stage through the pipeline's executor (read inputs, run, write outputs,
    check the ledger, record state); returns the stage's check numbers."""
    import copy

    from mergeit_spark.pipeline import Pipeline
    from mergeit_spark.stages.finalize import Finalize

    here = copy.deepcopy(settings)
    here.output.root = str(store.root)
    stage = Finalize()
    return Pipeline(here, spark=spark, stages=[stage]).run_stage(stage).checks


_FINALIZED: dict[str, tuple[TableStore, Expected]] = {}


def finalized_run(spark: SparkSession, settings, data_dir: Path, tmp_path_factory) -> tuple[TableStore, Expected]:
    """The fixture tables plus finalize's output, built once per test session and shared by the
    finalize, report and export tests (none of them writes to this store)."""
    key = str(data_dir)
    if key not in _FINALIZED:
        store = TableStore(spark, tmp_path_factory.mktemp("pipeline") / "run")
        expected = build_pipeline_tables(spark, store, data_dir)
        expected.checks = run_finalize(spark, store, settings)
        _FINALIZED[key] = (store, expected)
    return _FINALIZED[key]
