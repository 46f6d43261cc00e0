"""The whole pipeline on real data: every table, the ledger, resume, --force, and a killed driver."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import json
from collections import Counter
from pathlib import Path

import pytest

from _pipeline_run import cli_args, final_content, pipeline_settings, read
from fake_openai import FakeOpenAI
from mergeit_spark.pipeline import Pipeline
from _pipeline_run import STAGE_ORDER

REPO = Path(__file__).resolve().parents[1]
ALL_TABLES = ("records", "rejects", "embeddings", "topics", "centroids", "dedup", "selected",
              "merge_groups", "merges", "final", "lineage")


@pytest.fixture(scope="module")
def fake_llm(pipeline_llm):
    """The server the shared run merged against: a copy of that run finds its merges current."""
    return pipeline_llm


@pytest.fixture(scope="module")
def finished_run(spark, pipeline_run, tmp_path_factory):
    """The session's whole-pipeline run (conftest ``pipeline_run``), copied: the tests below rerun
    it, change its settings and force stages, which the shared run itself must never see."""
    work = tmp_path_factory.mktemp("pipeline")
    root = pipeline_run.copy_to(work / "run")
    pipeline = Pipeline(pipeline_settings(root, pipeline_run.data, pipeline_run.base_url), spark=spark)
    # The reference for the resume tests: final as the uninterrupted run left it.
    pipeline.reference_final = pipeline_run.final
    return pipeline, pipeline_run.results, pipeline_run.n_input, work


def test_every_stage_runs_and_every_table_is_delta(finished_run):
    pipeline, results, _, _ = finished_run
    assert [r.name for r in results] == list(STAGE_ORDER)
    assert not any(r.skipped for r in results)
    for table in ALL_TABLES:
        assert pipeline.store.exists(table), table


def test_ledger_balances_and_ids_trace(finished_run):
    pipeline, _, n_input, work = finished_run
    root = work / "run"
    records, rejects, lineage = read(root, "records"), read(root, "rejects"), read(root, "lineage")
    assert len(records) + len(rejects) == n_input
    assert Counter(r["reason"] for r in rejects)["exact_duplicate"] == 1
    assert len(rejects) == 6
    record_ids = [r["id"] for r in records]
    lineage_ids = Counter(r["id"] for r in lineage if r["fate"] != "rejected")
    assert set(lineage_ids) == set(record_ids) and set(lineage_ids.values()) == {1}
    assert sum(1 for r in lineage if r["fate"] == "rejected") == len(rejects)
    assert len(lineage) == n_input
    # finalize's check compared the tables with ingest's own count of the input lines
    checks = pipeline.state("finalize")["checks"]
    assert checks["input_rows"] == checks["lineage_rows"] == n_input and checks["input_files"] == 1

    fates = Counter(r["fate"] for r in lineage)
    dedup = read(root, "dedup")
    selected = read(root, "selected")
    merges = read(root, "merges")
    merged_groups = {m["group_id"] for m in merges if m["status"] == "merged"}
    groups = {g["group_id"]: g for g in read(root, "merge_groups")}
    assert fates["duplicate"] == sum(1 for d in dedup if d["status"] == "duplicate")
    merged_members = {m for gid in merged_groups for m in groups[gid]["member_ids"]}
    assert fates["merged"] == len(merged_members)
    assert fates["kept"] + fates["merged"] == len(selected)
    assert fates["not_selected"] == sum(1 for d in dedup if d["status"] == "kept") - len(selected)

    final = read(root, "final")
    assert len(final) == fates["kept"] + len(merged_groups)
    by_id = {r["id"]: r for r in records}
    for row in final:
        if row["origin"] == "original":
            assert row["source_ids"] == [row["id"]]
            src = by_id[row["id"]]
            assert (row["instruction"], row["input"], row["output"]) == (src["instruction"], src["input"], src["output"])
        else:
            assert len(row["source_ids"]) >= 2 and set(row["source_ids"]) <= merged_members
    # every lineage row that went somewhere points at a real final row
    final_ids = {r["id"] for r in final}
    assert all(r["final_id"] in final_ids for r in lineage if r["fate"] in ("kept", "merged"))


def test_rerun_skips_everything_and_force_recomputes_from_a_stage(finished_run, fake_llm):
    pipeline, _, _, work = finished_run
    before = final_content(work / "run")
    sent = len(fake_llm.requests)
    again = pipeline.run()
    assert all(r.skipped for r in again)
    forced = pipeline.run(force="select")
    assert [r.name for r in forced if not r.skipped] == ["select", "group", "merge", "finalize"]
    assert len(fake_llm.requests) == sent          # the merge ledger: nothing is paid for twice
    assert final_content(work / "run") == before


def test_a_changed_setting_reruns_from_the_first_stage_it_touches(spark, pipeline_run, fake_llm, tmp_path):
    root = pipeline_run.copy_to(tmp_path / "run")   # its own copy: the other tests keep the settings
    changed = pipeline_settings(root, pipeline_run.data, fake_llm.base_url, "select.budget=8")
    results = Pipeline(changed, spark=spark).run()
    assert [r.name for r in results if not r.skipped] == ["select", "group", "merge", "finalize"]
    assert len(read(root, "selected")) < len(read(pipeline_run.root, "selected")) < len(read(root, "dedup"))


@pytest.mark.slow
def test_driver_killed_during_merge_then_rerun_gives_the_same_final(spark, tmp_path, pipeline_run):
    """Kill the driver process (SIGKILL) while merges are in flight; the rerun finishes the job,
    pays again only for what had not finished, and `final` equals the uninterrupted run's.

    The run root starts with the shared run's tables and state up to the group stage (what a
    driver killed during merge had already written), so the killed driver starts at merge."""
    reference = pipeline_run.final
    data = pipeline_run.data
    root = pipeline_run.copy_to(tmp_path / "run", until="group")
    with FakeOpenAI(latency_s=0.4) as slow:
        settings_args = cli_args(root, data, slow.base_url, "llm.concurrency=1")
        env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1")
        driver = subprocess.Popen([sys.executable, "-m", "mergeit_spark.cli", "run", *settings_args],
                                  cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        ledger = root / "_ledger"
        deadline = time.monotonic() + 900   # a guard against a hang (a loaded machine is slow), not a speed bound
        try:
            while time.monotonic() < deadline and driver.poll() is None:
                if len(slow.requests) >= 3:
                    break
                time.sleep(0.2)
            assert driver.poll() is None, "the driver finished before it could be killed"
            assert len(slow.requests) >= 3, "merge never started"
        finally:
            os.killpg(driver.pid, signal.SIGKILL)   # the driver and its JVM
            driver.wait()
        # PySpark's Python workers live in their own process group and die when they notice the
        # JVM is gone; give them that moment, then take stock of what was paid and what was kept.
        time.sleep(5)
        requested_before_rerun = sum(slow.per_group.values())
        ledgered = sum(1 for f in ledger.rglob("*.jsonl") for line in f.read_text().splitlines()
                       if line.strip())
        lost_in_flight = requested_before_rerun - ledgered
        assert requested_before_rerun >= 3 and ledgered >= 1
        assert not (root / "_state" / "finalize.json").exists()

        resumed = Pipeline(pipeline_settings(root, data, slow.base_url, "llm.concurrency=1"), spark=spark)
        results = resumed.run()
        assert {r.name for r in results if r.skipped} >= {"ingest", "embed", "topics", "dedup", "select", "group"}
        # Each group was asked at most once more than it failed. The scripted server always
        # answers well, so the only failures are requests cut off by the kill: every request is
        # either in the ledger (never sent again) or was lost in flight (sent once more).
        n_groups = len(read(root, "merge_groups"))
        assert len(slow.per_group) == n_groups
        assert max(slow.per_group.values()) <= 2
        assert sum(slow.per_group.values()) == n_groups + lost_in_flight
        assert lost_in_flight <= 4   # concurrency 1 x 2 merge partitions, plus the workers' last breath
    assert final_content(root) == reference


def test_cli_status_stage_export_and_config(finished_run, fake_llm, capsys, tmp_path):
    from mergeit_spark.cli import main

    pipeline, _, _, work = finished_run
    args = cli_args(work / "run", Path(pipeline.settings.input.paths[0]), fake_llm.base_url)
    assert not [r.name for r in pipeline.run() if not r.skipped]   # the root is at these settings

    assert main(["status", "--json", *args]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [row["stage"] for row in status] == list(STAGE_ORDER)
    assert all(row["done"] and row["current"] for row in status)
    assert {t: status[0]["counts"][t] for t in ("records", "rejects")} == {"records": 200, "rejects": 6}

    assert main(["run", "--stage", "finalize", *args]) == 0
    assert "finalize" in capsys.readouterr().out

    out = tmp_path / "final.jsonl"
    assert main(["export", "--format", "jsonl", "--out", str(out), *args]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["id"], r["output"]) for r in exported} == {(r["id"], r["output"]) for r in read(work / "run", "final")}

    assert main(["config", "show", *args]) == 0
    assert "base_url: " + fake_llm.base_url in capsys.readouterr().out
    assert main(["run", "--set", "topics.k=-3"]) == 2      # bad settings: a clear error, no run
    assert "topics.k" in capsys.readouterr().err


def test_a_forced_rerun_of_topics_reruns_dedup_and_everything_below(finished_run, fake_llm):
    """`run --stage topics --force topics`, then `run`: the stages below topics computed from the
    topics table it replaced, so they rerun; with the same clusters nothing is paid twice."""
    pipeline, _, _, work = finished_run
    assert not [r.name for r in pipeline.run() if not r.skipped]   # the root is at these settings
    sent = len(fake_llm.requests)
    assert [r.name for r in pipeline.run(only="topics", force="topics") if not r.skipped] == ["topics"]
    current = {row["stage"]: row["current"] for row in pipeline.status()}
    assert current == {"ingest": True, "decontam": True, "embed": True, "topics": True, "dedup": False, "select": False,
                       "group": False, "merge": False, "finalize": False}
    assert [r.name for r in pipeline.run() if not r.skipped] == ["dedup", "select", "group", "merge", "finalize"]
    assert len(fake_llm.requests) == sent
    assert final_content(work / "run") == pipeline.reference_final
