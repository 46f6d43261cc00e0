"""Incremental runs on real data: a full run on 80%, an increment of 20%, compared with a full run
on 100%; a second identical increment changes nothing; the facility-location extension."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from _pipeline_run import BROKEN_LINES, EVAL_ROWS, pipeline_settings, read
from fake_openai import FakeOpenAI
from mergeit_spark.background import Writes
from mergeit_spark.pipeline import Pipeline
from mergeit_spark.stages.select import extend_facility_location, lazy_greedy_facility_location, selection_target
from mergeit_spark.tables import TableStore

OLD_ROWS, NEW_ROWS = 160, 40
# Every table an increment may write.
TABLES = ("records", "rejects", "input_files", "contamination", "embeddings", "topics", "centroids", "dedup", "selected",
          "merge_groups", "merges", "final", "lineage")
# A Delta source table (read by the full run), appended to before the increment.
DELTA_OLD, DELTA_NEW = 20, 10


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
    # Two rows of another kind (tool-use prompts) among the new ones: they lie far from every
    # fitted topic, so the drift measure has rows beyond the fitted rows' median to see (the
    # fitted rows span the PCA space, which makes ordinary new rows look closer than they are).
    other = json.loads((shared_data / "gpteacher-toolformer.json").read_text())
    new[-2:] = [other[100], other[2000]]
    near = next(r for r in old[10:] if r["instruction"] != r["instruction"].upper())
    near_copy = dict(near, instruction=near["instruction"].upper())
    (work / "old.jsonl").write_text("\n".join([_line(r) for r in old] + BROKEN_LINES[:2]) + "\n")
    new_lines = [_line(r) for r in new] + [_line(old[3]), _line(near_copy), BROKEN_LINES[2]]
    (work / "new.jsonl").write_text("\n".join(new_lines) + "\n")
    more = json.loads((shared_data / "mergeit-6k.json").read_text())[OLD_ROWS + NEW_ROWS:][:DELTA_OLD + DELTA_NEW]
    write_deltalake(str(work / "src"), _delta_rows(more[:DELTA_OLD]))
    return work, near, near_copy, old[3], more[DELTA_OLD:]


def _delta_rows(records: list[dict]) -> pa.Table:
    return pa.table({k: [r[k] for r in records] for k in ("instruction", "input", "output")})


def _read_at(root: Path, table: str, version: int) -> list[dict]:
    return DeltaTable(str(root / table), version=version).to_pyarrow_table().to_pylist()


def _versions(root: Path) -> dict[str, int]:
    return {t: DeltaTable(str(root / t)).version() for t in TABLES}


def _crash_then_redo(spark, llm, work: Path, old: str, new: str) -> dict:
    """On a copy of the run root before the increment: an increment whose ``merge_groups`` append
    (the group stage's, which runs in the background during the merge step) fails, so the
    run fails after its merge requests were paid, before final and lineage are written; then the
    same increment again, which rolls the first back and redoes it. A drift alarm at 0 (past the
    median distance) makes the run advise a re-cluster."""
    settings = pipeline_settings(work / "crash", Path(f"{old},{new}"), llm.base_url,
                                 "incremental.drift_quantile=0.5", "incremental.drift_alarm_share=0.0")
    pipeline = Pipeline(settings, spark=spark)
    before, requests = _versions(work / "crash"), len(llm.requests)
    apply = TableStore.apply

    def failing(store, table, write):
        if table == "merge_groups":
            raise RuntimeError("disk full writing merge_groups")
        return apply(store, table, write)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TableStore, "apply", failing)
        with pytest.raises(RuntimeError, match="disk full writing merge_groups"):
            pipeline.extend()
    paid_crashed = len(llm.requests) - requests
    crashed = _versions(work / "crash")
    redone = pipeline.extend()
    return dict(before=before, crashed=crashed, paid_crashed=paid_crashed, redone=redone,
                paid_redo=len(llm.requests) - requests - paid_crashed)


@pytest.fixture(scope="module")
def runs(spark, split_data):
    """A full run on old, then the increment with old + new (twice), and the ingest of a full run
    on old + new, with what each did; on copies of the root before the increment: a crashed
    increment redone, and an increment with --recluster."""
    work, *_, appended = split_data
    src = str(work / "src")
    old, new = f"{work / 'old.jsonl'},{src}", str(work / "new.jsonl")
    with FakeOpenAI() as llm:
        base = Pipeline(pipeline_settings(work / "inc", Path(old), llm.base_url), spark=spark)
        base.run()
        for copy in ("crash", "recluster"):
            shutil.copytree(work / "inc", work / copy)
        write_deltalake(src, _delta_rows(appended), mode="append")  # the source table gains rows
        before = _versions(work / "inc")
        first_run = base.state("ingest")["summary"]["run_id"]
        inc = Pipeline(pipeline_settings(work / "inc", Path(f"{old},{new}"), llm.base_url), spark=spark)
        requests_before = len(llm.requests)
        increment = inc.extend()
        paid = len(llm.requests) - requests_before
        after = _versions(work / "inc")
        again = inc.extend()
        paid_again = len(llm.requests) - requests_before - paid
        after_again = _versions(work / "inc")
        rerun = inc.run()  # a plain run with the same settings: everything is current
        after_rerun = _versions(work / "inc")
        crash = _crash_then_redo(spark, llm, work, old, new)
        reclustered = Pipeline(pipeline_settings(work / "recluster", Path(f"{old},{new}"), llm.base_url),
                               spark=spark).extend(recluster=True)
        full = Pipeline(pipeline_settings(work / "full", Path(f"{old},{new}"), llm.base_url), spark=spark)
        full.run(until="topics")  # records, rejects and topics are what a full run is compared on
    return dict(work=work, inc=inc, full=full, increment=increment, paid=paid, before=before, after=after,
                again=again, paid_again=paid_again, after_again=after_again, rerun=rerun,
                after_rerun=after_rerun, first_run=first_run, crash=crash, reclustered=reclustered)


def test_records_and_ledger_match_a_full_run(runs):
    inc_root, full_root = runs["work"] / "inc", runs["work"] / "full"
    assert {r["id"] for r in read(inc_root, "records")} == {r["id"] for r in read(full_root, "records")}
    assert (Counter(r["reason"] for r in read(inc_root, "rejects"))
            == Counter(r["reason"] for r in read(full_root, "rejects")))
    checks = runs["inc"].state("finalize")["checks"]
    n_input = OLD_ROWS + 2 + NEW_ROWS + 3 + DELTA_OLD + DELTA_NEW
    assert checks["input_rows"] == checks["lineage_rows"] == n_input
    assert checks["records"] + checks["rejects"] == n_input
    lineage = read(inc_root, "lineage")
    assert len(lineage) == n_input and len({r["id"] for r in lineage if r["id"]}) == checks["records"]


def test_only_new_rows_are_embedded_and_each_table_gains_one_version(runs):
    inc_root, increment = runs["work"] / "inc", runs["increment"]
    new_records = increment.counts["new_records"]
    # the near-duplicate is a new record, the exact duplicate is not; the Delta source's appended rows
    assert new_records == NEW_ROWS + 1 + DELTA_NEW
    # One new row (EVAL_ROWS[2]) holds an evaluation item: checked in the increment, not embedded.
    new_contaminated = [i for i in EVAL_ROWS if OLD_ROWS <= i < OLD_ROWS + NEW_ROWS]
    assert len(new_contaminated) == 1 and increment.summaries["decontam"]["contaminated"] == 1
    assert increment.counts["embedded"] == new_records - 1
    old_vectors = {r["id"]: r["embedding"] for r in _read_at(inc_root, "embeddings", runs["before"]["embeddings"])}
    now = {r["id"]: r["embedding"] for r in read(inc_root, "embeddings")}
    assert len(now) == len(old_vectors) + new_records - 1
    assert all(now[i] == v for i, v in old_vectors.items())  # old rows not recomputed
    contaminated = {r["id"] for r in read(inc_root, "lineage") if r["fate"] == "contaminated"}
    assert contaminated == {r["id"] for r in read(inc_root, "contamination")} and len(contaminated) == len(EVAL_ROWS)
    assert not contaminated & set(now)
    grown = {t for t in runs["after"] if runs["after"][t] != runs["before"][t]}
    assert all(runs["after"][t] - runs["before"][t] == 1 for t in grown)
    assert {"records", "rejects", "input_files", "contamination", "embeddings", "topics", "centroids", "dedup",
            "final", "lineage"} <= grown
    # No refit: the centres stay, the sizes count the new rows too.
    centroids_before = {r["cluster"]: r for r in _read_at(inc_root, "centroids", runs["before"]["centroids"])}
    centroids = {r["cluster"]: r for r in read(inc_root, "centroids")}
    assert all(centroids[c]["embedding_center"] == r["embedding_center"] for c, r in centroids_before.items())
    assert Counter(r["cluster"] for r in read(inc_root, "topics")) == {
        c: r["size"] for c, r in centroids.items() if r["size"]}


def test_final_and_lineage_are_merged_not_rewritten(runs):
    """One MERGE per table; the lineage rows of old rows that no new group took in are as they
    were; the final rows before the increment are still there unless a new merge absorbed them."""
    inc_root, before, increment = runs["work"] / "inc", runs["before"], runs["increment"]
    engine = runs["inc"].store.engine
    for table in ("final", "lineage"):
        last = DeltaTable(str(inc_root / table)).history(1)[0]
        assert last["operation"] == ("MERGE" if engine == "delta-spark" else "WRITE"), table
    old_lineage = _read_at(inc_root, "lineage", before["lineage"])
    now = Counter(tuple(sorted(r.items())) for r in read(inc_root, "lineage"))
    regrouped = _regrouped(inc_root, before)
    unchanged = [r for r in old_lineage if r["id"] not in regrouped]
    assert unchanged and all(now[tuple(sorted(r.items()))] for r in unchanged)
    assert {r["run_id"] for r in unchanged} == {runs["first_run"]}
    old_final = _read_at(inc_root, "final", before["final"])
    final_ids = {r["id"] for r in read(inc_root, "final")}
    assert {r["id"] for r in old_final if not set(r["source_ids"]) & regrouped} <= final_ids
    # the increment's merge pass is in the run's merge ledger, as a full run's is
    from mergeit_spark.stages.merge import merge_runs
    passes = [r for r in merge_runs(runs["inc"].store) if r.get("incremental_run") == increment.run_id]
    assert len(passes) == 1 and passes[0]["requests"] == runs["paid"]


def test_bounded_finalize_equals_the_stage_over_every_row(runs):
    """The increment computes and compares only the rows it can change (its new records, the
    members of its new groups, its rejects); the finalize stage run over every row of the tables
    it left gives exactly the final and lineage rows it merged."""
    inc, inc_root = runs["inc"], runs["work"] / "inc"
    stage = inc.stages[inc.stage_names().index("finalize")]
    output = stage.run(inc.ctx, {t: inc.store.read(t) for t in stage.inputs})
    # run_id: a row already in lineage before the increment arrived in its run; the rest in the increment
    arrived = {r["id"] or r["reject_key"]: r["run_id"]
               for r in _read_at(inc_root, "lineage", runs["before"]["lineage"])}
    try:
        final = [r.asDict(recursive=True) for r in output.tables["final"].collect()]
        lineage = [dict(r.asDict(recursive=True),
                        run_id=arrived.get(r["id"] or r["reject_key"], runs["increment"].run_id))
                   for r in output.tables["lineage"].collect()]
        for table, rows in (("final", final), ("lineage", lineage)):
            computed = Counter(json.dumps(r, sort_keys=True) for r in rows)
            merged = Counter(json.dumps(r, sort_keys=True) for r in read(inc_root, table))
            assert computed == merged, table
    finally:
        inc.spark.catalog.clearCache()
    # the bound held old rows whose fate could move: members of a new group selected before
    old_ids = {r["id"] for r in _read_at(inc_root, "records", runs["before"]["records"])}
    assert _regrouped(inc_root, runs["before"]) & old_ids


def _regrouped(root: Path, before: dict[str, int]) -> set[str]:
    """Members of the groups an increment added."""
    old_groups = {r["group_id"] for r in _read_at(root, "merge_groups", before["merge_groups"])}
    return {i for g in read(root, "merge_groups") if g["group_id"] not in old_groups for i in g["member_ids"]}


def test_a_crashed_increment_is_rolled_back_and_redone_without_paying_twice(runs):
    crash, work = runs["crash"], runs["work"]
    assert crash["paid_crashed"] == runs["paid"] > 0  # the crash came after the merge requests
    assert crash["paid_redo"] == 0  # the redo's merges come back from the ledger
    assert any(crash["crashed"][t] != crash["before"][t] for t in crash["before"])
    redo_id, clean_id = crash["redone"].run_id, runs["increment"].run_id
    for table in ("records", "rejects", "dedup", "selected", "merge_groups", "merges", "final"):
        assert _rows(work / "crash", table) == _rows(work / "inc", table), table
    lineage = {r.replace(redo_id, clean_id) for r in _rows(work / "crash", "lineage")}
    assert lineage == _rows(work / "inc", "lineage")
    drift = crash["redone"].drift  # beyond the median, alarm at 0: a re-cluster is advised
    assert drift["quantile"] == 0.5 and drift["share"] > 0 and drift["recluster_advised"]


def test_recluster_gives_the_topics_of_a_full_run(runs):
    work = runs["work"]
    assert runs["reclustered"].recluster
    def partition(root: Path) -> set[frozenset]:
        clusters: dict[int, set] = {}
        for r in read(root, "topics"):
            clusters.setdefault(r["cluster"], set()).add(r["id"])
        return {frozenset(ids) for ids in clusters.values()}
    assert partition(work / "recluster") == partition(work / "full")
    contaminated = {r["id"] for r in read(work / "full", "contamination")}
    assert len(contaminated) == len(EVAL_ROWS)   # never embedded, never clustered
    assert len(read(work / "recluster", "topics")) == len(read(work / "full", "records")) - len(contaminated)


def test_cross_split_near_duplicate_and_rejects_of_new_rows(runs, split_data):
    from mergeit_spark.ids import content_id
    _, near, near_copy, exact, _ = split_data
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
    src = str(runs["work"] / "src")
    assert arrived == Counter({(str(runs["work"] / "old.jsonl"), runs["first_run"]): OLD_ROWS + 2,
                               (new_source, runs["increment"].run_id): NEW_ROWS + 3,
                               (src, runs["first_run"]): DELTA_OLD, (src, runs["increment"].run_id): DELTA_NEW})


def test_a_delta_source_is_read_from_the_version_after_the_last_one_read(runs):
    """The Delta source gained a version between the full run and the increment: the increment
    reads only the rows added since (recorded with the version read), and a second increment
    reads nothing more."""
    inc_root, src = runs["work"] / "inc", str(runs["work"] / "src")
    reads = sorted((r["version"], r["units"], r["run_id"]) for r in read(inc_root, "input_files")
                   if r["source"] == src)
    assert reads == [(0, DELTA_OLD, runs["first_run"]), (1, DELTA_NEW, runs["increment"].run_id)]
    assert src in runs["increment"].new_inputs and not runs["again"].new_inputs
    appended = {r["id"] for r in read(inc_root, "lineage") if r["source"] == src
                and r["run_id"] == runs["increment"].run_id}
    records = {r["id"]: r for r in read(inc_root, "records")}
    assert len(appended) == DELTA_NEW and appended <= set(records)


def test_selection_extends_and_only_new_groups_are_paid(runs):
    inc_root, before = runs["work"] / "inc", runs["before"]
    old_selected = _read_at(inc_root, "selected", before["selected"])
    selected = read(inc_root, "selected")
    by_id = {r["id"]: r for r in selected}
    assert all(by_id[r["id"]] == r for r in old_selected)  # the existing selection stays as it was
    new_ids = {r["id"] for r in read(inc_root, "records")} - {
        r["id"] for r in _read_at(inc_root, "records", before["records"])}
    new_picks = [r for r in selected if r["id"] in new_ids]
    assert len(new_picks) == runs["increment"].counts["new_selected"] > 0
    for cluster in {r["cluster"] for r in new_picks}:  # ranks continue after the existing picks
        ranks = sorted(r["rank"] for r in selected if r["cluster"] == cluster)
        assert ranks == list(range(len(ranks)))
    old_groups = {r["group_id"] for r in _read_at(inc_root, "merge_groups", before["merge_groups"])}
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


# merges: what a group's merge said; the rest of a row (timings, task, sequence) is bookkeeping.
_COMPARED = {"merges": ("group_id", "status", "instruction", "input", "output")}


def _rows(root: Path, table: str) -> set[str]:
    """A table's rows as JSON text (for merges, the columns that say what the merge was)."""
    keep = _COMPARED.get(table)
    return {json.dumps({k: v for k, v in r.items() if keep is None or k in keep}, sort_keys=True, default=str)
            for r in read(root, table)}


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


def test_background_writes_land_release_their_rows_and_raise_the_first_failure(spark, store):
    """``Writes``: writes started in the background all run to their end; ``wait`` returns their
    results in order, releases the cached rows handed over with them, and raises a failure only
    once every write has finished."""
    rows = spark.createDataFrame([("a", 1), ("b", 2)], "id string, n long").persist()
    assert rows.count() == 2 and rows.is_cached
    writes = Writes()
    writes.start(lambda: store.write(rows, "one"), release=(rows,))
    writes.start(lambda: store.write(rows.limit(1), "two"))
    assert writes.wait() == [0, 0] and not rows.is_cached
    assert sorted(r.id for r in store.read("one").collect()) == ["a", "b"] and store.read("two").count() == 1

    def fails():
        raise ValueError("no such column")

    writes.start(fails, lambda: store.write(rows, "one", mode="append"))
    with pytest.raises(ValueError, match="no such column"):
        writes.wait()
    assert store.version("one") == 1 and store.read("one").count() == 4
    assert writes.wait() == []  # nothing left running


def test_one_pass_per_cluster_dedups_extends_and_groups_the_new_rows():
    """``ClusterIncrement`` on one cluster: a new row matched to kept rows is a duplicate of the
    best match; the other new rows are deduplicated among themselves (nearest to the centre
    kept), the selection is extended after its existing ranks, and only groups of free
    selected rows that hold a new row are made."""
    from mergeit_spark.ids import group_id
    from mergeit_spark.stages.cluster_increment import CURATED_SCHEMA, ClusterIncrement
    axes = np.eye(12, dtype=np.float32)

    def unit(*parts):
        v = sum(w * axes[i] for i, w in parts)
        return (v / np.linalg.norm(v)).tolist()

    def kept(row_id, vector, rank=np.nan, grouped=False):
        return dict(id=row_id, role="kept", embedding=vector, rank=rank, grouped=grouped)

    rows = [
        kept("a0", unit((0, 1), (1, 0.6)), 0.0),              # selected, free: groups with n1
        kept("a1", unit((0, 1), (3, 0.5)), 1.0, True),        # like n1, but already in a group
        kept("a2", unit((6, 1))), kept("a3", unit((7, 1))), kept("a4", unit((8, 1))), kept("a5", unit((9, 1))),
        kept("a6", unit((4, 1)), 2.0), kept("a7", unit((4, 1), (5, 0.3)), 3.0),  # a pair, but no new row
        dict(id="n2", role="new", embedding=unit((0, 1), (2, 0.05)), distance=0.2),  # near-dup of n1, farther
        dict(id="n1", role="new", embedding=unit((0, 1)), distance=0.1),
        dict(id="n3", role="new", embedding=unit((10, 1)), distance=0.3),  # matched: no pick, no group
        dict(id="n3", role="match", target_id="b9", similarity=0.97),      # (kept rows of other clusters)
        dict(id="n3", role="match", target_id="b2", similarity=0.99),
        dict(id="n3", role="match", target_id="b1", similarity=0.99),      # a tie: the smaller id
    ]
    frame = pd.DataFrame(rows, columns=["id", "role", "embedding", "distance", "rank", "grouped", "target_id",
                                        "similarity"])
    frame.insert(1, "cluster", 7)
    out = ClusterIncrement(0.95, 4, 2, 4, 0.55, 2)(frame)
    assert list(out.columns) == CURATED_SCHEMA.fieldNames() and set(out["cluster"]) == {7}
    dedup = out[out["table"] == "dedup"].set_index("id")
    assert sorted(dedup.index) == ["n1", "n2", "n3"]
    assert dedup.loc["n1", "status"] == "kept" and dedup.loc["n2", "status"] == "duplicate"
    assert dedup.loc["n2", "duplicate_of"] == "n1" and dedup.loc["n2", "similarity"] >= 0.95
    assert (dedup.loc["n3", "status"], dedup.loc["n3", "duplicate_of"], dedup.loc["n3", "similarity"]) == (
        "duplicate", "b1", 0.99)
    # 8 kept and 4 selected before, 9 kept now: ceil(4 x 9 / 8) = 5 picks, so n1 joins at rank 4
    selected = out[out["table"] == "selected"]
    assert selected["id"].tolist() == ["n1"] and selected["rank"].tolist() == [4]
    assert selected["gain"].iloc[0] > 0
    groups = out[out["table"] == "merge_groups"]
    assert [list(m) for m in groups["member_ids"]] == [["a0", "n1"]]
    assert groups["group_id"].tolist() == [group_id(["a0", "n1"])]
    assert abs(groups["similarity"].iloc[0] - 1 / np.sqrt(1.36)) < 1e-5
    assert out["member_ids"].iloc[0] is None and out["duplicate_of"][out["table"] != "dedup"].isna().all()
    # a cluster whose new rows all matched: their duplicate rows only
    only_matched = ClusterIncrement(0.95, 4, 2, 4, 0.55, 2)(frame[frame["id"].isin(["a0", "a2", "n3"])])
    assert only_matched[["table", "id", "duplicate_of"]].values.tolist() == [["dedup", "n3", "b1"]]


def test_new_records_come_out_spread_for_the_embed_step_with_the_same_split(spark):
    """The increment's split spreads the new records over the embed step's partitions in its
    own shuffle by id (about equal shares), with the same records and rejects as unspread; the
    embed step then adds no second shuffle of the texts."""
    from mergeit_spark.stages.ingest import split_outcomes
    from mergeit_spark.stages.embed import embed_records
    from mergeit_spark.config import EmbedSettings

    schema = ("id string, reason string, file_index int, line long, row long, sub int, source string, "
              "raw string, detail string, instruction string, input string, output string, extra string")
    rows = [(f"{i % 300:04x}" if i % 7 else f"{i:04x}x", None, 0, i, None, 0, "new.jsonl", None, None,
             f"task {i}", "", f"answer {i}", None) for i in range(900)]
    rows.append((None, "bad_json", 0, 900, None, 0, "new.jsonl", "{", "not JSON", None, None, None, None))
    outcomes = spark.createDataFrame(rows, schema)
    existing = spark.createDataFrame([("0001",), ("0002",)], "id string")
    plain = split_outcomes(outcomes, existing)
    records, rejects = split_outcomes(outcomes, existing, partitions=3)
    sizes = records.rdd.glom().map(len).collect()
    assert len(sizes) == 3 and min(sizes) > 0.25 * sum(sizes)
    assert sorted(map(tuple, records.collect())) == sorted(map(tuple, plain[0].collect()))  # unique ids
    assert sorted(map(str, rejects.collect())) == sorted(map(str, plain[1].collect()))
    assert records.count() == 300 - 2 + 900 // 7 + 1  # first of each id, minus the ids already there

    def shuffles_on_top(spread: bool) -> bool:  # an exchange above the cached rows
        plan = embed_records(records, EmbedSettings(), spread=spread)._jdf.queryExecution().executedPlan()
        return "Exchange" in plan.toString().split("InMemoryRelation")[0]
    records.persist()
    try:
        assert not shuffles_on_top(False) and shuffles_on_top(True)
    finally:  # the session is shared by every test
        records.unpersist()
