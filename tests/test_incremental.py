"""Incremental runs on real data: a full run on 80%, an increment of 20%, compared with a full run
on 100%; a second identical increment changes nothing; the facility-location extension."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from _pipeline_run import BROKEN_LINES, pipeline_settings, read
from fake_openai import FakeOpenAI
from mergeit_spark.incremental import TOUCHED, selection_target
from mergeit_spark.pipeline import Pipeline
from mergeit_spark.stages.select import extend_facility_location, lazy_greedy_facility_location

OLD_ROWS, NEW_ROWS = 160, 40


def _line(record: dict) -> str:
    return json.dumps({k: record[k] for k in ("instruction", "input", "output")})


@pytest.fixture(scope="module")
def split_data(shared_data, tmp_path_factory):
    """old.jsonl (80%) and new.jsonl (20%): the new file also holds an exact duplicate of an old
    row, a near-duplicate of another (same words, other case: cosine 1 for the uncased model, a
    different content id) and a broken line."""
    work = tmp_path_factory.mktemp("incremental")
    rows = json.loads((shared_data / "mergeit-6k.json").read_text())[:OLD_ROWS + NEW_ROWS]
    old, new = rows[:OLD_ROWS], rows[OLD_ROWS:]
    near = next(r for r in old[10:] if r["instruction"] != r["instruction"].upper())
    near_copy = dict(near, instruction=near["instruction"].upper())
    (work / "old.jsonl").write_text("\n".join([_line(r) for r in old] + BROKEN_LINES[:2]) + "\n")
    new_lines = [_line(r) for r in new] + [_line(old[3]), _line(near_copy), BROKEN_LINES[2]]
    (work / "new.jsonl").write_text("\n".join(new_lines) + "\n")
    return work, near, near_copy, old[3]


def _versions(root: Path) -> dict[str, int]:
    return {t: DeltaTable(str(root / t)).version() for t in (*TOUCHED, "centroids")}


@pytest.fixture(scope="module")
def runs(spark, split_data):
    """A full run on old, then the increment with old + new (twice), and the ingest of a full run
    on old + new, with what each did."""
    work, *_ = split_data
    old, new = str(work / "old.jsonl"), str(work / "new.jsonl")
    with FakeOpenAI() as llm:
        base = Pipeline(pipeline_settings(work / "inc", Path(old), llm.base_url), spark=spark)
        base.run()
        before = _versions(work / "inc")
        first_run = base.state("ingest")["summary"]["run_id"]
        inc = Pipeline(pipeline_settings(work / "inc", Path(f"{old},{new}"), llm.base_url), spark=spark)
        requests_before = len(llm.requests)
        increment = inc.run_incremental()
        paid = len(llm.requests) - requests_before
        after = _versions(work / "inc")
        again = inc.run_incremental()
        paid_again = len(llm.requests) - requests_before - paid
        after_again = _versions(work / "inc")
        rerun = inc.run()  # a plain run with the same settings: everything is current
        after_rerun = _versions(work / "inc")
        full = Pipeline(pipeline_settings(work / "full", Path(f"{old},{new}"), llm.base_url), spark=spark)
        full.run(until="ingest")  # records and rejects are what a full run is compared on
    return dict(work=work, inc=inc, full=full, increment=increment, paid=paid, before=before, after=after,
                again=again, paid_again=paid_again, after_again=after_again, rerun=rerun,
                after_rerun=after_rerun, first_run=first_run)


def test_records_and_ledger_match_a_full_run(runs):
    inc_root, full_root = runs["work"] / "inc", runs["work"] / "full"
    assert {r["id"] for r in read(inc_root, "records")} == {r["id"] for r in read(full_root, "records")}
    assert (Counter(r["reason"] for r in read(inc_root, "rejects"))
            == Counter(r["reason"] for r in read(full_root, "rejects")))
    checks = runs["inc"].state("finalize")["checks"]
    n_input = OLD_ROWS + 2 + NEW_ROWS + 3
    assert checks["input_rows"] == checks["lineage_rows"] == n_input
    assert checks["records"] + checks["rejects"] == n_input
    lineage = read(inc_root, "lineage")
    assert len(lineage) == n_input and len({r["id"] for r in lineage if r["id"]}) == checks["records"]


def test_only_new_rows_are_embedded_and_each_table_gains_one_version(runs):
    inc_root, increment = runs["work"] / "inc", runs["increment"]
    new_records = increment.counts["new_records"]
    assert new_records == NEW_ROWS + 1  # the near-duplicate is a new record; the exact duplicate is not
    assert increment.counts["embedded"] == new_records
    old_vectors = {r["id"]: r["embedding"] for r in
                   DeltaTable(str(inc_root / "embeddings"), version=runs["before"]["embeddings"]).to_pyarrow_table().to_pylist()}
    now = {r["id"]: r["embedding"] for r in read(inc_root, "embeddings")}
    assert len(now) == len(old_vectors) + new_records
    assert all(now[i] == v for i, v in old_vectors.items())  # old rows not recomputed
    grown = {t for t in runs["after"] if runs["after"][t] != runs["before"][t]}
    assert all(runs["after"][t] - runs["before"][t] == 1 for t in grown)
    assert "centroids" not in grown  # no refit
    assert {"records", "rejects", "input_files", "embeddings", "topics", "dedup", "final", "lineage"} <= grown


def test_cross_split_near_duplicate_and_rejects_of_new_rows(runs, split_data):
    from mergeit_spark.ids import content_id
    _, near, near_copy, exact = split_data
    inc_root = runs["work"] / "inc"
    records = {(r["instruction"], r["input"], r["output"]): r["id"] for r in read(inc_root, "records")}
    old_id = records[(near["instruction"], near["input"], near["output"])]
    copy_id = records[(near_copy["instruction"], near_copy["input"], near_copy["output"])]
    dedup = {r["id"]: r for r in read(inc_root, "dedup")}
    assert dedup[copy_id]["status"] == "duplicate"
    target = old_id if dedup[old_id]["status"] == "kept" else dedup[old_id]["duplicate_of"]
    assert dedup[copy_id]["duplicate_of"] == target and dedup[copy_id]["similarity"] >= 0.95
    new_source = str(runs["work"] / "new.jsonl")
    rejects = [r for r in read(inc_root, "rejects") if r["source"] == new_source]
    exact_id = content_id(exact["instruction"], exact["input"], exact["output"])
    assert sorted(r["reason"] for r in rejects) == ["exact_duplicate", "missing_output"]
    assert next(r for r in rejects if r["reason"] == "exact_duplicate")["detail"] == exact_id
    lineage = read(inc_root, "lineage")
    arrived = Counter((r["source"], r["run_id"]) for r in lineage)
    assert arrived == Counter({(str(runs["work"] / "old.jsonl"), runs["first_run"]): OLD_ROWS + 2,
                               (new_source, runs["increment"].run_id): NEW_ROWS + 3})


def test_selection_extends_and_only_new_groups_are_paid(runs):
    inc_root, before = runs["work"] / "inc", runs["before"]
    old_selected = DeltaTable(str(inc_root / "selected"), version=before["selected"]).to_pyarrow_table().to_pylist()
    selected = read(inc_root, "selected")
    by_id = {r["id"]: r for r in selected}
    assert all(by_id[r["id"]] == r for r in old_selected)  # the existing selection stays as it was
    new_ids = {r["id"] for r in read(inc_root, "records")} - {
        r["id"] for r in DeltaTable(str(inc_root / "records"), version=before["records"]).to_pyarrow_table().to_pylist()}
    new_picks = [r for r in selected if r["id"] in new_ids]
    assert len(new_picks) == runs["increment"].counts["new_selected"] > 0
    for cluster in {r["cluster"] for r in new_picks}:  # ranks continue after the existing picks
        ranks = sorted(r["rank"] for r in selected if r["cluster"] == cluster)
        assert ranks == list(range(len(ranks)))
    old_groups = {r["group_id"] for r in DeltaTable(str(inc_root / "merge_groups"),
                                                    version=before["merge_groups"]).to_pyarrow_table().to_pylist()}
    groups = read(inc_root, "merge_groups")
    added = [g for g in groups if g["group_id"] not in old_groups]
    assert all(set(g["member_ids"]) & new_ids for g in added)
    assert runs["paid"] == len(added) == runs["increment"].counts["new_groups"]
    assert len({r["group_id"] for r in read(inc_root, "merges")}) == len(groups)


def test_second_identical_increment_changes_nothing(runs):
    assert not runs["again"].changed
    assert runs["paid_again"] == 0
    assert runs["after_again"] == runs["after"]
    assert all(r.skipped for r in runs["rerun"])  # the state says every stage is current
    assert runs["after_rerun"] == runs["after"]


def test_extension_continues_the_plain_greedy():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    picks, gains = lazy_greedy_facility_location(vectors, 20, block_size=16)
    chosen = picks[:8]
    candidates = np.setdiff1d(np.arange(60), chosen)
    more, more_gains = extend_facility_location(vectors, chosen, candidates, 12, block_size=16)
    assert more.tolist() == picks[8:].tolist()
    assert np.allclose(more_gains, gains[8:])
    only_new, _ = extend_facility_location(vectors, chosen, np.arange(50, 60), 30, block_size=16)
    assert set(only_new.tolist()) == set(range(50, 60))  # capped by the candidates


@pytest.mark.parametrize("budget,kept,kept_before,selected_before,expected", [
    (75, 40, 30, 30, 40),      # kept whole before: stays whole
    (75, 100, 70, 70, 100),    # whole cluster keeps its rate (1) past the budget
    (75, 360, 300, 75, 90),    # over budget: the rate 75/300 applies to the grown cluster
    (75, 310, 300, 75, 78),
    (10, 5, 0, 0, 5),          # an empty cluster fills up to the budget
])
def test_selection_target(budget, kept, kept_before, selected_before, expected):
    assert selection_target(budget, kept, kept_before, selected_before) == expected
