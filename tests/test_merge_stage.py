"""Merge stage on local Spark against the scripted loopback server (real sockets, the real openai
client): balance, ledger, budget, fault injection, reruns, merged ids that finalize accepts."""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from mergeit_spark.config import load_settings
from mergeit_spark.ids import group_id
from mergeit_spark.llm import client as client_mod
from mergeit_spark.stages import StageContext, StageError
from mergeit_spark.llm.ledger import LEDGER_BUCKETS
from mergeit_spark.stages.decontam import no_evaluation
from mergeit_spark.llm.spend import Prices
from mergeit_spark.report import _merging_html, collect_report_data
from mergeit_spark.stages.merge import (LEDGER_DIR, LEDGER_NAME, MERGES_SCHEMA, Merge, bucket_ranges, gate_rejections,
                                        ledger_bucket, ledger_spend, merge_runs, read_bucket,
                                        split_budget)

from _merge_helpers import finalize_merges, load_rows, make_inputs, run_merge_stage
from fake_openai import REFUSAL, FakeOpenAI, Faults, Reply, group_key

STATUSES = {"merged", "gate_failed", "failed"}


@pytest.fixture(scope="module")
def inputs(spark, shared_data):
    return small_inputs(spark, shared_data)


def small_inputs(spark, shared_data):
    """A dozen groups of real rows: records, embeddings, groups, member lists, the fake's keys."""
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
    return run_merge_stage(ctx, groups, records, embeddings)


def read_ledger(spark, ledger_root: str):
    """Every ledger line as a DataFrame (``LEDGER_SCHEMA`` plus the ``bucket`` folder column)."""
    from mergeit_spark.stages.merge import LEDGER_SCHEMA
    return (spark.read.schema(LEDGER_SCHEMA).option("mode", "DROPMALFORMED")
            .json(ledger_root).where(F.col("group_id").isNotNull() & F.col("status").isNotNull()))


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
        # Same rows as the version the first run wrote: no new version of `merges`.
        assert not second.rewritten and second.content == first.content
        assert second.table_version == first.table_version == DeltaTable(store.path("merges")).version()

        # Another writer changed `merges` since: the next rerun writes it again, whole.
        store.write(store.read("merges").limit(2), "merges")
        third = run(spark, store, settings, inputs)
        assert third.requests == 0 and third.rewritten and third.content == first.content
        assert third.table_version == first.table_version + 2
        assert sorted(merges_rows(store), key=lambda r: r["group_id"]) == \
            sorted(rows, key=lambda r: r["group_id"])
    runs = merge_runs(store)
    assert [r["requests"] for r in runs] == [n_groups, 0, 0]


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


def test_money_cap_holds_across_runs_and_a_higher_cap_finishes_the_rest(spark, store, inputs):
    """merge.max_cost at stated prices: what the server says it used (the merges rows' tokens, the
    preflight's too) stays under the cap; a rerun at the same cap sends nothing, since the ledger
    already holds the spend; a higher cap sends exactly the groups the first left."""
    prices = ("llm.price_input_per_million=2", "llm.price_output_per_million=10", "llm.max_tokens=600")
    cap = 0.03   # a reservation is about 0.007 (its prompt estimate and 600 completion tokens)
    n_groups = len(inputs[3])
    ledger = store.ledger_path(LEDGER_NAME)

    def paid(rows):
        return sum(r["prompt_tokens"] * 2 + r["completion_tokens"] * 10 for r in rows) / 1e6

    with FakeOpenAI() as fake:
        first = run(spark, store, stage_settings(fake.base_url, *prices, f"merge.max_cost={cap}"), inputs)
        rows = merges_rows(store)
        spent = ledger_spend(spark, ledger, Prices(2.0, 10.0))
        assert 0 < first.requests < n_groups and first.budget_exhausted == n_groups - first.requests
        assert paid(rows) <= first.cost <= spent.cost <= cap      # settled, then what the ledger holds
        assert spent.requests == first.requests + fake.preflights
        again = run(spark, store, stage_settings(fake.base_url, *prices, f"merge.max_cost={cap}"), inputs)
        assert again.requests == 0 and fake.count == first.requests
        assert again.budget_exhausted == first.budget_exhausted
        more = run(spark, store, stage_settings(fake.base_url, *prices, "merge.max_cost=1"), inputs)
    assert more.requests == first.budget_exhausted and fake.count == n_groups
    rows = merges_rows(store)
    assert {r["status"] for r in rows} <= {"merged", "gate_failed"}
    # The report: the merges rows' cost, and the ledger's spend on the root over the three runs.
    merging = collect_report_data(store, stage_settings("http://127.0.0.1:9/v1", *prices))["merging"]
    assert merging["cost"] == pytest.approx(paid(rows), abs=1e-6)
    assert merging["ledger_spent"]["requests"] == n_groups + fake.preflights
    spent = ledger_spend(spark, ledger, Prices(2.0, 10.0))
    assert merging["ledger_spent"]["cost"] == pytest.approx(spent.cost, abs=1e-6)
    assert f"<td>{merging['ledger_spent']['cost']:.4f}</td>" in "".join(_merging_html(merging))


def test_a_money_cap_without_prices_is_refused_before_any_request(spark, store, inputs):
    with FakeOpenAI() as fake:
        with pytest.raises(StageError, match="llm.price_input_per_million"):
            run(spark, store, stage_settings(fake.base_url, "merge.max_cost=5"), inputs)
    assert fake.count == 0 and fake.preflights == 0


def test_progress_lines_count_up_to_what_the_pass_recorded(spark, store, inputs):
    """While the pass runs (a slow server), the driver logs what the ledger holds every interval:
    counts that only grow, and a last line equal to the stage's own summary."""
    n_groups = len(inputs[3])
    pattern = re.compile(r"merge: (\d+)/(\d+) groups recorded this run \((.*)\); (\d+) requests, (\d+) tokens, "
                         r"cost (\S+); .* groups/s")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("mergeit.progress")   # the run's log (the CLI's console and log file)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with FakeOpenAI(latency_s=0.4) as fake:
            settings = stage_settings(fake.base_url, "llm.concurrency=1", "merge.progress_interval_s=0.3",
                                      "llm.price_input_per_million=1")
            summary = run(spark, store, settings, inputs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    seen = [pattern.match(r.getMessage()) for r in records]
    assert len(seen) >= 3 and all(seen)
    done = [int(m.group(1)) for m in seen]
    assert done == sorted(done) and done[0] < n_groups and {m.group(2) for m in seen[1:]} == {str(n_groups)}
    last = seen[-1]
    statuses = dict((s, int(n)) for n, s in (part.split(" ") for part in last.group(3).split(", ")))
    assert done[-1] == n_groups and statuses == summary.by_status
    assert (int(last.group(4)), int(last.group(5))) == (summary.requests, summary.total_tokens)
    assert float(last.group(6)) == pytest.approx(summary.prompt_tokens / 1e6, abs=1e-4)


def test_changed_gate_rejudges_from_the_ledger_without_requests(spark, store, inputs):
    with FakeOpenAI() as fake:
        run(spark, store, stage_settings(fake.base_url), inputs)
        sent = fake.count
        strict = stage_settings(fake.base_url, "gate.min_source_similarity=0.999")
        summary = run(spark, store, strict, inputs)
    assert fake.count == sent and summary.requests == 0
    assert summary.by_source == {"rejudged": len(inputs[3])}
    assert summary.rewritten  # other verdicts: other rows, a new version
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
        summary = run_merge_stage(ctx, with_ghost[0].unionByName(with_ghost[1]), records, embeddings)
    n_groups = len(inputs[3])
    assert fake.count == 2 * n_groups  # first try + one regeneration each; the ghost costs nothing
    rows = {r["group_id"]: r for r in merges_rows(store)}
    assert len(rows) == n_groups + 1
    assert rows["g" * 32]["error"].startswith("missing_member: missing-id-1")
    assert all(r["status"] == "failed" for r in rows.values())
    assert summary.errors == {"invalid_output": n_groups, "missing_member": 1}


def test_ledger_reader_skips_torn_lines_and_keeps_the_latest_by_sequence(tmp_path):
    gid = "ab" * 16
    folder = tmp_path / f"bucket={ledger_bucket(gid)}"
    folder.mkdir()
    lines = [  # finished_ns (executor clocks) disagree with seq on purpose: seq decides
        {"group_id": gid, "request_hash": "h", "status": "gate_failed", "seq": 1, "finished_ns": 9},
        {"group_id": gid, "request_hash": "h", "status": "merged", "seq": 3, "finished_ns": 1},
        {"group_id": gid, "request_hash": "old", "status": "merged", "seq": 2, "finished_ns": 5},
    ]
    (folder / "t1.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:2]) + '\n{"group_id": "ab')
    (folder / "t2.jsonl").write_text(json.dumps(lines[2]) + "\n")
    state = read_bucket(str(tmp_path), ledger_bucket(gid))
    assert state.latest[(gid, "h")]["status"] == "merged" and state.max_seq == 3
    assert set(state.latest) == {(gid, "h"), (gid, "old")}


def test_split_budget_is_proportional_and_exact():
    shares = split_budget(10, {0: 5, 1: 3, 2: 2, 3: 0})
    assert sum(shares.values()) == 10 and shares == {0: 5, 1: 3, 2: 2, 3: 0}
    shares = split_budget(7, {b: 1 for b in range(10)})
    assert sum(shares.values()) == 7 and set(shares.values()) == {0, 1}
    assert split_budget(0, {0: 4}) == {0: 0}


@pytest.mark.parametrize("partitions", [1, 2, 3, 7, LEDGER_BUCKETS])
def test_request_pass_tasks_hold_equal_ranges_of_whole_buckets(spark, partitions):
    # Three rows per bucket: a task must hold every row of its buckets (the ledger is per bucket).
    jobs = spark.createDataFrame([(b, r) for b in range(LEDGER_BUCKETS) for r in range(3)], "bucket int, row int")
    placed = (bucket_ranges(jobs, partitions).select("bucket", F.spark_partition_id().alias("task"))
              .groupBy("bucket").agg(F.collect_set("task").alias("tasks")).collect())
    task_of = {r["bucket"]: r["tasks"] for r in placed}
    assert task_of == {b: [b * partitions // LEDGER_BUCKETS] for b in range(LEDGER_BUCKETS)}
    per_task = Counter(t[0] for t in task_of.values())
    assert max(per_task.values()) - min(per_task.values()) <= 1 and len(per_task) == partitions


def test_merge_stage_pays_into_its_ledger_and_hands_its_rows_to_the_executor(spark, store, inputs):
    """The paid calls are durable in the ledger as they land; the ``merges`` table is the
    executor's to write: the stage writes no table itself."""
    records, embeddings, groups = inputs[:3]
    assert Merge.inputs == ("merge_groups", "records", "embeddings", "eval_items", "eval_ngrams")
    with FakeOpenAI() as fake:
        ctx = StageContext(spark, store, stage_settings(fake.base_url))
        stage = Merge()
        out = stage.run(ctx, {"merge_groups": groups, "records": records, "embeddings": embeddings,
                              **no_evaluation(spark)})
    assert not store.exists("merges")
    assert any(Path(store.root.local, LEDGER_DIR).glob("bucket=*/*.jsonl"))
    merges = out["merges"]
    assert merges.count() == len(inputs[3]) == out.summary["groups"] == fake.count
    assert merges.where(F.col("status").isNull()).count() == 0
    spark.catalog.clearCache()


def test_no_groups_gives_an_empty_merges_table(spark, store, inputs):
    records, embeddings, groups = inputs[:3]
    with FakeOpenAI() as fake:
        summary = run_merge_stage(StageContext(spark, store, stage_settings(fake.base_url)),
                            groups.limit(0), records, embeddings)
    assert summary.groups == 0 and summary.requests == 0 and fake.count == 0
    assert store.exists("merges") and store.read("merges").count() == 0


# -- faults, reruns, merged ids -------------------------------------------------------------------
@pytest.fixture(scope="module")
def many(spark, shared_data):
    """About forty groups of real records (for fault injection)."""
    embed = load_settings().embed
    rows = load_rows(shared_data, 160, offset=400)
    records, embeddings, groups, member_lists = make_inputs(spark, rows, embed, threshold=0.5,
                                                            max_groups=40)
    by_id = {r["id"]: r for r in rows}
    keys = {group_key([by_id[m] for m in members]): members for members in member_lists}
    assert len(member_lists) >= 30
    return records, embeddings, groups, member_lists, keys


TRANSPORT = ("http_", "timeout", "connection", "malformed_response")


def test_thirty_percent_faults_every_group_ends_with_a_reason_and_a_rerun_pays_only_failures(
        spark, store, many):
    records, embeddings, groups, member_lists, keys = many
    n = len(member_lists)
    # The client counts an attempt before it writes it, so a worker stalled past the timeout
    # counts one the server never saw. 0.5 s did that on a loaded CI runner (55 counted, 54 seen);
    # 2 s held against 1.2 s interpreter stalls in a side-by-side check. Hangs outlast it.
    faults = Faults(rate=0.3, hang_s=4.0)
    with FakeOpenAI(faults) as fake:
        settings = stage_settings(fake.base_url, "llm.max_retries=1", "merge.regenerations=0",
                                  "llm.request_timeout_s=2", "llm.backoff_max_s=0.5")
        first = run(spark, store, settings, many)
        assert set(faults.injected) >= {"429", "500", "503", "hang", "non_json", "missing_key", "refusal"}
        rows = merges_rows(store)
        by_gid = {r["group_id"]: r for r in rows}
        assert len(rows) == n == len(by_gid) == first.groups       # one row per group, none lost
        assert sum(first.by_status.values()) == n and first.requests == fake.count
        for r in rows:
            assert r["status"] in STATUSES
            if r["status"] == "failed":
                assert r["error"] and r["output"] is None          # a reason, no text
            else:
                assert json.loads(r["gate"])["passed"] == (r["status"] == "merged")
        failed = {r["group_id"]: r["error"] for r in rows if r["status"] == "failed"}
        retryable = {g for g, e in failed.items() if e.startswith(TRANSPORT)}
        assert retryable and set(failed) - retryable    # both kinds of failure happened
        assert all(failed[g].startswith("invalid_output") for g in set(failed) - retryable)

        # No group twice in final, and finalize's ledger balances on these merges.
        final, lineage, numbers = finalize_merges(spark, records, groups, store.read("merges"))
        assert numbers["final_rows"] == numbers["final_distinct_ids"]
        assert numbers["final_merged"] == first.by_status.get("merged", 0)

        # The rerun pays only for the groups that failed on the way (not invalid replies).
        sent_before = Counter(k for _, k, _ in fake.requests)
        second = run(spark, store, settings, many)
        sent_again = Counter(k for _, k, _ in fake.requests) - sent_before
    gid_of = {key: group_id(members) for key, members in keys.items()}
    assert {gid_of[k] for k in sent_again} == retryable
    assert second.requests == sum(sent_again.values())
    assert second.by_source.get("ledger", 0) == n - len(retryable)
    assert len(merges_rows(store)) == n


def test_invalid_replies_are_not_repaid_unless_asked_or_the_request_changes(spark, store, inputs):
    refused = sorted(inputs[4])[:3]
    script = lambda n, k, r: Reply(kind="content", content=REFUSAL) if k in refused else Reply()  # noqa: E731
    with FakeOpenAI(script) as fake:
        base = stage_settings(fake.base_url, "merge.regenerations=1")
        first = run(spark, store, base, inputs)
        assert first.errors == {"invalid_output": 3} and fake.count == len(inputs[3]) + 3
        again = run(spark, store, base, inputs)                          # plain rerun
        assert again.requests == 0 and again.by_status == first.by_status
        retried = run(spark, store, stage_settings(fake.base_url, "merge.regenerations=1",
                                                   "merge.retry_failed=true"), inputs)
        assert retried.requests == 3 * 2 and retried.by_source["llm"] == 3
        more = run(spark, store, stage_settings(fake.base_url, "merge.regenerations=2"), inputs)
        assert more.requests == 3 * 3                                    # a larger allowance
        before = fake.count
        changed = run(spark, store, stage_settings(fake.base_url, "merge.regenerations=2",
                                                   "llm.temperature=0.3"), inputs)
    assert changed.requests == fake.count - before == len(inputs[3]) + 3 * 2  # a new request for all
    assert {r["status"] for r in merges_rows(store) if r["error"]} == {"failed"}


RELAXED_GATE = ("gate.min_source_similarity=-1", "gate.min_request_coverage=-2",  # accept anything
                "gate.min_output_coverage=0", "gate.require_complete_output=false",
                "gate.min_output_ratio=0", "gate.max_copy_similarity=1")


def test_identical_merges_and_a_merge_equal_to_a_kept_record_do_not_break_finalize(spark, store, inputs):
    records, embeddings, groups, member_lists = inputs[:4]
    grouped = {m for members in member_lists for m in members}
    kept = next(r for r in records.collect() if r["id"] not in grouped)   # test-sized: 48 rows
    as_record = json.dumps({"instruction": kept["instruction"], "input": kept["input"],
                            "output": kept["output"]})
    same = json.dumps({"instruction": "Do both tasks.", "input": "", "output": "Both are done."})
    first_key = sorted(inputs[4])[0]
    script = lambda n, k, r: Reply(kind="content", content=as_record if k == first_key else same)  # noqa: E731
    with FakeOpenAI(script) as fake:
        summary = run(spark, store, stage_settings(fake.base_url, *RELAXED_GATE), inputs)
    assert summary.by_status == {"merged": len(member_lists)}
    final, lineage, numbers = finalize_merges(spark, records, groups, store.read("merges"))
    assert numbers["final_rows"] == numbers["final_distinct_ids"]
    assert numbers["final_merged"] == len(member_lists)
    texts = final.where(F.col("origin") == "merged").groupBy("output").count()
    assert texts.where(F.col("output") == "Both are done.").first()["count"] == len(member_lists) - 1
    twins = final.where(F.col("output") == kept["output"]).select("id", "origin").collect()
    assert sorted(r["origin"] for r in twins) == ["merged", "original"]
    assert kept["id"] in {r["id"] for r in twins}


def test_gate_rejections_are_counted_per_check(spark, store, inputs):
    only_first = lambda n, k, r: Reply(kind="content", content=json.dumps({  # noqa: E731
        "instruction": "Answer the first example.", "input": "", "output": "Only the first part."}))
    with FakeOpenAI(only_first) as fake:
        summary = run(spark, store, stage_settings(fake.base_url), inputs)
    n = len(inputs[3])
    assert summary.by_status == {"gate_failed": n}
    counted = gate_rejections(store.read("merges"))
    assert counted == summary.gate_rejections and counted["output_coverage"] == n
    assert set(counted) <= {"source_similarity", "request_coverage", "output_coverage",
                            "output_complete", "output_length", "copy"}


def test_ledger_lines_carry_a_sequence_and_the_merges_row_is_the_latest(spark, store, inputs):
    ledger_root = store.ledger_path("merges")
    with FakeOpenAI() as fake:
        run(spark, store, stage_settings(fake.base_url), inputs)
        first = {r["group_id"]: r["seq"] for r in read_ledger(spark, ledger_root.uri).collect()}
        run(spark, store, stage_settings(fake.base_url, "gate.min_source_similarity=0.999"), inputs)
    # Each pass ends with the ledger compacted: one object per bucket, the re-judging (a later
    # seq) kept and the result it superseded dropped.
    buckets = list(Path(ledger_root.local).glob("bucket=*"))
    assert buckets and all(len(list(b.glob("*.jsonl"))) == 1 for b in buckets)
    ledger = read_ledger(spark, ledger_root.uri)
    per_group = ledger.groupBy("group_id").agg(F.count("*").alias("lines"), F.max("seq").alias("seq"))
    assert {r["lines"] for r in per_group.collect()} == {1}
    latest = {r["group_id"]: r for r in per_group.join(ledger, ["group_id", "seq"]).collect()}
    assert set(latest) == set(first) and all(latest[g]["seq"] > first[g] for g in first)
    assert {r["status"] for r in latest.values()} == {"gate_failed"}
    assert {r["status"] for r in merges_rows(store)} == {"gate_failed"}
