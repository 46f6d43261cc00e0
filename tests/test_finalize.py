"""Finalize: final + lineage from a small consistent set of stage tables, and the ledger check."""
from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from mergeit_spark.ids import content_id
from mergeit_spark.stages.finalize import (FATES, Finalize, LedgerError, build_lineage_and_final,
                                           check_ledger, check_store_ledger, content_id_col)

from _pipeline_tables import finalized_run


@pytest.fixture(scope="module")
def finalized(spark, settings, shared_data, tmp_path_factory):
    return finalized_run(spark, settings, shared_data, tmp_path_factory)


def _small(df):
    # test-side only: the fixture tables have a few dozen rows
    return [r.asDict() for r in df.collect()]


def test_stage_contract():
    assert Finalize.name == "finalize"
    assert Finalize.inputs == ("records", "rejects", "dedup", "selected", "merge_groups", "merges")
    assert Finalize.outputs == ("final", "lineage")


def test_counts_balance_and_ledger_passes(finalized):
    store, exp = finalized
    lineage, final = store.read("lineage"), store.read("final")
    fates = {r["fate"]: r["count"] for r in _small(lineage.groupBy("fate").count())}
    assert fates == {k: v for k, v in exp.fates.items() if v}
    assert lineage.count() == exp.records + exp.rejects
    origins = {r["origin"]: r["count"] for r in _small(final.groupBy("origin").count())}
    assert origins == {"original": exp.final_original, "merged": exp.final_merged}
    summary = check_store_ledger(store, input_rows=exp.records + exp.rejects)
    assert summary["lineage_rows"] == exp.records + exp.rejects
    assert summary["final_rows"] == exp.final
    assert all(summary[f"fate_{f}"] == exp.fates[f] for f in FATES)


def test_every_record_id_once(finalized):
    store, exp = finalized
    lineage = store.read("lineage")
    per_id = lineage.filter(F.col("id").isNotNull()).groupBy("id").count()
    assert per_id.count() == exp.records
    assert per_id.filter("count > 1").count() == 0
    assert store.read("records").join(lineage, "id", "left_anti").count() == 0


def test_merged_members_point_at_their_merge(finalized):
    store, exp = finalized
    rows = {r["id"]: r for r in _small(store.read("lineage").filter("fate = 'merged'"))}
    assert set(rows) == set(exp.merged_members)
    for member, gid in exp.merged_members.items():
        assert rows[member]["group_id"] == gid
        assert rows[member]["final_id"] == exp.merged_ids[gid]
    merged = {r["id"]: r for r in _small(store.read("final").filter("origin = 'merged'"))}
    assert set(merged) == set(exp.merged_ids.values())
    for gid, mid in exp.merged_ids.items():
        row = merged[mid]
        assert content_id(row["instruction"], row["input"], row["output"]) == mid
        assert row["source_ids"] == sorted(m for m, g in exp.merged_members.items() if g == gid)


def test_failed_merges_keep_originals(finalized):
    store, exp = finalized
    lineage = {r["id"]: r for r in _small(store.read("lineage").filter(F.col("id").isNotNull()))}
    originals = {r["id"]: r for r in _small(store.read("final").filter("origin = 'original'"))}
    assert set(originals) == exp.kept
    assert exp.kept_after_failed_merge, "fixture must contain failed merges"
    for member, reason in exp.kept_after_failed_merge.items():
        row = lineage[member]
        assert (row["fate"], row["final_id"], row["reason"]) == ("kept", member, reason)
        assert row["group_id"] is not None
        assert originals[member]["source_ids"] == [member]
    # an earlier failed attempt of a group that later merged does not keep its members
    assert not set(exp.kept_after_failed_merge) & set(exp.merged_members)


def test_duplicates_not_selected_and_rejects_are_traceable(finalized):
    store, exp = finalized
    lineage = _small(store.read("lineage"))
    by_id = {r["id"]: r for r in lineage if r["id"] is not None}
    for dup, kept in exp.duplicate_of.items():
        assert (by_id[dup]["fate"], by_id[dup]["detail"], by_id[dup]["final_id"]) == ("duplicate", kept, None)
    assert {i for i, r in by_id.items() if r["fate"] == "not_selected"} == exp.not_selected
    rejected = [r for r in lineage if r["fate"] == "rejected"]
    assert all(r["id"] is None and r["final_id"] is None for r in rejected)
    assert {r["reject_key"] for r in rejected} == exp.reject_keys
    exact = [r for r in rejected if r["reason"] == "exact_duplicate"]
    assert len(exact) == 2 and all(r["detail"] in by_id for r in exact)


def _tables(store):
    return {name: store.read(name) for name in ("records", "rejects", "lineage", "final")}


def test_ledger_catches_a_dropped_lineage_row(finalized):
    store, _ = finalized
    t = _tables(store)
    victim = t["lineage"].filter("fate = 'kept'").select("id").orderBy("id").first()["id"]
    with pytest.raises(LedgerError) as err:
        check_ledger(t["records"], t["rejects"], t["lineage"].filter(~F.col("id").eqNullSafe(victim)), t["final"])
    text = str(err.value)
    assert "records ids are missing from lineage" in text and "1 records ids" in text
    assert f"lineage rows {err.value.summary['records'] + err.value.summary['rejects'] - 1} !=" in text


def test_ledger_catches_a_duplicated_id(finalized):
    store, exp = finalized
    t = _tables(store)
    extra = t["lineage"].filter("fate = 'duplicate'").limit(1)
    with pytest.raises(LedgerError) as err:
        check_ledger(t["records"], t["rejects"], t["lineage"].unionByName(extra), t["final"])
    assert "1 record ids appear more than once in lineage" in str(err.value)
    assert err.value.summary["lineage_rows"] == exp.records + exp.rejects + 1


def test_ledger_catches_final_out_of_step(finalized):
    store, _ = finalized
    t = _tables(store)
    short_final = t["final"].filter("origin = 'original'")  # the merges went missing
    with pytest.raises(LedgerError) as err:
        check_ledger(t["records"], t["rejects"], t["lineage"], short_final)
    assert "merged lineage rows point at no merged final row" in str(err.value)
    with pytest.raises(LedgerError, match="!= input rows"):
        check_ledger(t["records"], t["rejects"], t["lineage"], t["final"], input_rows=1)


def test_record_without_dedup_row_is_accounted_for(finalized, settings):
    store, exp = finalized
    t = {name: store.read(name) for name in Finalize.inputs}
    orphan = t["dedup"].filter("status = 'kept'").select("id").orderBy("id").first()["id"]
    dedup = t["dedup"].filter(F.col("id") != orphan)
    selected = t["selected"].filter(F.col("id") != orphan)
    groups = t["merge_groups"].filter(~F.array_contains("member_ids", orphan))
    final, lineage = build_lineage_and_final(t["records"], t["rejects"], dedup, selected, groups,
                                             t["merges"])
    final, lineage = final.cache(), lineage.cache()  # checked several times below
    row = lineage.filter(F.col("id") == orphan).first()
    assert (row["fate"], row["reason"]) == ("not_selected", "not_clustered")
    check_ledger(t["records"], t["rejects"], lineage, final)


def test_no_groups_means_final_is_the_selection(finalized):
    store, _ = finalized
    t = {name: store.read(name) for name in Finalize.inputs}
    final, lineage = build_lineage_and_final(
        t["records"], t["rejects"], t["dedup"], t["selected"], t["merge_groups"].limit(0), t["merges"].limit(0))
    final, lineage = final.cache(), lineage.cache()  # checked several times below
    assert final.count() == t["selected"].count()
    assert final.filter("origin = 'merged'").count() == 0
    check_ledger(t["records"], t["rejects"], lineage, final)


def test_content_id_col_matches_python(spark):
    rows = [("Übersetze", "", "café ☕"), ("a", None, "b"), ("x\ny", "tab\t", "")]
    df = spark.createDataFrame(rows, "instruction string, input string, output string")
    got = [r["cid"] for r in df.select(content_id_col(F.col("instruction"), F.col("input"), F.col("output"),
                                                      20).alias("cid")).collect()]
    assert got == [content_id(i, p or "", o, 20) for i, p, o in rows]


def test_check_ledger_takes_a_store(finalized):
    store, exp = finalized
    assert check_ledger(store)["lineage_rows"] == exp.records + exp.rejects
    assert issubclass(LedgerError, ValueError)  # the CLI reports it as a failed run, not a crash
