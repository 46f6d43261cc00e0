"""Merge stage on local Spark against the scripted loopback server: balance, ledger, budget."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from mergeit_spark.config import load_settings
from mergeit_spark.llm import client as client_mod
from mergeit_spark.stages import StageContext
from mergeit_spark.stages.merge import (LEDGER_DIR, MERGES_SCHEMA, Merge, ledger_bucket, merge_runs,
                                        read_bucket, run_merge, split_budget)

from _merge_helpers import load_rows, make_inputs
from fake_openai import FakeOpenAI, Reply, group_key

STATUSES = {"merged", "gate_failed", "failed"}


@pytest.fixture(scope="module")
def inputs(spark, shared_data):
    embed = load_settings().embed
    rows = load_rows(shared_data, 48)
    records, embeddings, groups, member_lists = make_inputs(spark, rows, embed, threshold=0.5,
                                                            max_groups=12)
    by_id = {r["id"]: r for r in rows}
    keys = {group_key([by_id[m] for m in members]) for members in member_lists}
    assert len(member_lists) >= 8
    return records, embeddings, groups, member_lists, keys


@pytest.fixture(autouse=True)
def fresh_json_ladder():
    client_mod._LADDER_STEP.clear()


def stage_settings(base_url: str, *extra: str):
    return load_settings(overrides=[
        "spark.master=local[2]", f"llm.base_url={base_url}", "llm.max_retries=0",
        "llm.backoff_initial_s=0.01", "llm.request_timeout_s=10", "merge.partitions=2",
        "llm.concurrency=4", *extra])


def run(spark, store, settings, inputs):
    records, embeddings, groups = inputs[:3]
    ctx = StageContext(spark, store, settings)
    return run_merge(ctx, groups, records, embeddings)


def merges_rows(store):
    """The merges table read back with delta-rs (test-sized: a dozen rows)."""
    return DeltaTable(store.path("merges")).to_pyarrow_table().to_pylist()


def test_every_group_gets_exactly_one_row_and_rerun_sends_nothing(spark, store, inputs):
    n_groups = len(inputs[3])
    with FakeOpenAI() as fake:
        settings = stage_settings(fake.base_url)
        first = run(spark, store, settings, inputs)
        rows = merges_rows(store)
        assert first.groups == n_groups and first.requests == fake.count == n_groups
        assert first.prompt_tokens > 0 and first.completion_tokens > 0
        assert first.by_source == {"llm": n_groups}

        # Balance: one row per group, nothing lost, nothing twice.
        assert sorted(r["group_id"] for r in rows) == sorted(g["group_id"] for g in inputs[2].collect())
        assert {r["status"] for r in rows} <= STATUSES - {"failed"}
        assert sum(first.by_status.values()) == n_groups
        assert Counter(r["status"] for r in rows) == Counter(first.by_status)
        assert set(fake.per_group) == inputs[4] and set(fake.per_group.values()) == {1}
        for r in rows:
            assert r["attempts"] == 1 and r["prompt_tokens"] > 0 and r["model"] == settings.llm.model
            assert r["instruction"] and r["output"] and r["request_hash"]
            gate = json.loads(r["gate"])
            assert gate["passed"] == (r["status"] == "merged")
        assert [f.name for f in store.read("merges").schema.fields] == MERGES_SCHEMA.fieldNames()

        # The whole stage again: every group has a terminal result in the ledger -> 0 requests.
        second = run(spark, store, settings, inputs)
        assert fake.count == n_groups
        assert second.requests == 0 and second.total_tokens == 0
        assert second.by_source == {"ledger": n_groups}
        assert sorted(merges_rows(store), key=lambda r: r["group_id"]) == \
            sorted(rows, key=lambda r: r["group_id"])
    runs = merge_runs(store.root)
    assert [r["requests"] for r in runs] == [n_groups, 0]


def test_server_breaking_midway_then_rerun_pays_each_group_at_most_once_more(spark, store, inputs):
    n_groups = len(inputs[3])
    with FakeOpenAI(break_after=5) as fake:
        settings = stage_settings(fake.base_url, "llm.concurrency=1")
        first = run(spark, store, settings, inputs)
        assert first.requests == n_groups
        assert first.by_status["failed"] == n_groups - 5
        assert first.errors == {"http_503": n_groups - 5}
        failed_once = Counter(k for n, k, kind in fake.requests if kind == "status")

        fake.break_after = None  # the server recovers
        second = run(spark, store, settings, inputs)
    assert second.requests == n_groups - 5 and second.by_source == {"ledger": 5, "llm": n_groups - 5}
    for key in inputs[4]:
        assert fake.served_ok[key] == 1                          # paid exactly once for the merge
        assert fake.per_group[key] <= failed_once[key] + 1       # at most once more than it failed
    rows = merges_rows(store)
    assert len(rows) == n_groups and {r["status"] for r in rows} <= {"merged", "gate_failed"}


def test_budget_cap_leaves_groups_failed_and_a_later_run_finishes_them(spark, store, inputs):
    n_groups = len(inputs[3])
    with FakeOpenAI() as fake:
        capped = stage_settings(fake.base_url, "merge.max_requests=4", "llm.concurrency=1")
        first = run(spark, store, capped, inputs)
        assert fake.count == first.requests <= 4
        assert first.budget_exhausted == n_groups - first.requests
        rows = merges_rows(store)
        exhausted = [r for r in rows if r["error"] == "budget_exhausted"]
        assert len(exhausted) == n_groups - first.requests
        assert all(r["status"] == "failed" and r["attempts"] == 0 and r["output"] is None
                   for r in exhausted)

        second = run(spark, store, stage_settings(fake.base_url), inputs)
    assert second.requests == len(exhausted) and fake.count == n_groups
    assert {r["status"] for r in merges_rows(store)} <= {"merged", "gate_failed"}


def test_token_budget_is_never_exceeded(spark, store, inputs):
    with FakeOpenAI() as fake:
        settings = stage_settings(fake.base_url, "merge.max_total_tokens=12000", "llm.max_tokens=600")
        summary = run(spark, store, settings, inputs)
    assert 0 < summary.requests < len(inputs[3])
    assert summary.total_tokens <= 12000
    assert summary.budget_exhausted == len(inputs[3]) - summary.requests


def test_changed_gate_rejudges_from_the_ledger_without_requests(spark, store, inputs):
    with FakeOpenAI() as fake:
        run(spark, store, stage_settings(fake.base_url), inputs)
        sent = fake.count
        strict = stage_settings(fake.base_url, "gate.min_source_similarity=0.999")
        summary = run(spark, store, strict, inputs)
    assert fake.count == sent and summary.requests == 0
    assert summary.by_source == {"rejudged": len(inputs[3])}
    rows = merges_rows(store)
    assert {r["status"] for r in rows} == {"gate_failed"}
    assert all("source_similarity" in json.loads(r["gate"])["failed"] for r in rows)
    assert all(r["attempts"] == 1 for r in rows)  # what the result cost, carried over


def test_invalid_replies_and_missing_members_end_failed_not_lost(spark, store, inputs):
    records, embeddings, groups = inputs[:3]
    ghost = spark.createDataFrame([("g" * 32, 0, ["missing-id-1", "missing-id-2"], 0.9)], groups.schema)
    with_ghost = (groups, ghost)
    bad = json.dumps({"instruction": "", "input": "", "output": "x"})
    with FakeOpenAI(lambda n, k, r: Reply(kind="content", content=bad)) as fake:
        settings = stage_settings(fake.base_url, "merge.regenerations=1")
        ctx = StageContext(spark, store, settings)
        summary = run_merge(ctx, with_ghost[0].unionByName(with_ghost[1]), records, embeddings)
    n_groups = len(inputs[3])
    assert fake.count == 2 * n_groups  # first try + one regeneration each; the ghost costs nothing
    rows = {r["group_id"]: r for r in merges_rows(store)}
    assert len(rows) == n_groups + 1
    assert rows["g" * 32]["error"].startswith("missing_member: missing-id-1")
    assert all(r["status"] == "failed" for r in rows.values())
    assert summary.errors == {"invalid_output": n_groups, "missing_member": 1}


def test_ledger_reader_skips_torn_lines_and_keeps_latest_terminal(tmp_path):
    gid = "ab" * 16
    folder = tmp_path / f"bucket={ledger_bucket(gid)}"
    folder.mkdir()
    lines = [
        {"group_id": gid, "request_hash": "h", "status": "gate_failed", "finished_ns": 1},
        {"group_id": gid, "request_hash": "h", "status": "merged", "finished_ns": 3},
        {"group_id": gid, "request_hash": "h", "status": "failed", "finished_ns": 9},
        {"group_id": gid, "request_hash": "old", "status": "merged", "finished_ns": 5},
    ]
    (folder / "t1.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"group_id": "ab')
    hits = read_bucket(str(tmp_path), ledger_bucket(gid))
    assert hits[(gid, "h")]["status"] == "merged" and hits[(gid, "h")]["finished_ns"] == 3
    assert set(hits) == {(gid, "h"), (gid, "old")}


def test_split_budget_is_proportional_and_exact():
    shares = split_budget(10, {0: 5, 1: 3, 2: 2, 3: 0})
    assert sum(shares.values()) == 10 and shares == {0: 5, 1: 3, 2: 2, 3: 0}
    shares = split_budget(7, {b: 1 for b in range(10)})
    assert sum(shares.values()) == 7 and set(shares.values()) == {0, 1}
    assert split_budget(0, {0: 4}) == {0: 0}


def test_merge_stage_class_writes_itself(spark, store, inputs):
    records, embeddings, groups = inputs[:3]
    assert Merge.writes_itself and Merge.inputs == ("merge_groups", "records", "embeddings")
    with FakeOpenAI() as fake:
        ctx = StageContext(spark, store, stage_settings(fake.base_url))
        stage = Merge()
        out = stage.run(ctx, {"merge_groups": groups, "records": records, "embeddings": embeddings})
    assert out["merges"].count() == len(inputs[3]) == stage.summary.groups
    assert store.exists("merges")
    assert any(Path(store.root, LEDGER_DIR).glob("bucket=*/*.jsonl"))
    assert out["merges"].where(F.col("status").isNull()).count() == 0


def test_no_groups_gives_an_empty_merges_table(spark, store, inputs):
    records, embeddings, groups = inputs[:3]
    with FakeOpenAI() as fake:
        summary = run_merge(StageContext(spark, store, stage_settings(fake.base_url)),
                            groups.limit(0), records, embeddings)
    assert summary.groups == 0 and summary.requests == 0 and fake.count == 0
    assert store.exists("merges") and store.read("merges").count() == 0
