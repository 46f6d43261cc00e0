"""Finalize: final + lineage from a small consistent set of stage tables, and the ledger check."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from mergeit_spark.ids import content_id, merged_id
from mergeit_spark.stages.finalize import (FATES, INPUT_FILES, Finalize, LedgerError, build_lineage_and_final,
                                           check_ledger, check_store_ledger, content_id_col)
from mergeit_spark.tables import TableStore

from _pipeline_tables import finalized_run, run_finalize


@pytest.fixture(scope="module")
def finalized(spark, settings, shared_data, tmp_path_factory):
    return finalized_run(spark, settings, shared_data, tmp_path_factory)


def _small(df):
    # test-side only: the fixture tables have a few dozen rows
    return [r.asDict() for r in df.collect()]


def test_stage_contract():
    assert Finalize.name == "finalize"
    assert Finalize.inputs == ("records", "rejects", "contamination", "dedup", "selected", "merge_groups", "merges")
    assert Finalize.outputs == ("final", "lineage")


def test_counts_balance_and_ledger_passes(finalized):
    store, exp = finalized
    lineage, final = store.read("lineage"), store.read("final")
    fates = {r["fate"]: r["count"] for r in _small(lineage.groupBy("fate").count())}
    assert fates == {k: v for k, v in exp.fates.items() if v}
    assert lineage.count() == exp.records + exp.rejects
    origins = {r["origin"]: r["count"] for r in _small(final.groupBy("origin").count())}
    assert origins == {"original": exp.final_original, "merged": exp.final_merged}
    summary = check_store_ledger(store)
    assert (summary["input_rows"], summary["input_files"]) == (exp.records + exp.rejects, 2)
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
        assert merged_id(gid, row["instruction"], row["input"], row["output"]) == mid
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


def _joined_numbers(records, lineage, final) -> dict[str, int]:
    """The matching numbers as the ledger defines them, by pandas joins (the check computes them
    in one Spark shuffle): full outer joins where a null key matches nothing."""
    rec = records[["id"]].assign(_rec=True)
    lin = lineage[lineage["id"].notna()][["id"]].assign(_lin=True)
    by_id = rec.dropna().merge(lin, on="id", how="outer")
    told = (lineage[lineage["fate"].isin(["kept", "merged"])]
            .rename(columns={"fate": "kind"})[["id", "final_id", "kind"]].assign(_lineage=True))
    rows = []
    for r in final.itertuples():
        if r.origin == "original":
            rows.append((r.id, r.id, "kept"))
        elif r.origin == "merged":
            rows.extend((s, r.id, "merged") for s in (r.source_ids if r.source_ids is not None else []))
    claims = pd.DataFrame(rows, columns=["id", "final_id", "kind"]).assign(_final=True)
    keys = ["id", "final_id", "kind"]
    matched = claims.dropna(subset=keys).merge(told.dropna(subset=keys), on=keys, how="outer")
    unmatched_claims = pd.concat([matched[matched["_lineage"].isna()], claims[claims[keys].isna().any(axis=1)]])
    unmatched_told = pd.concat([matched[matched["_final"].isna()], told[told[keys].isna().any(axis=1)]])

    def count(frame, kind):
        return int((frame["kind"] == kind).sum())

    return {
        "records": len(records), "records_distinct_ids": int(records["id"].nunique()),
        "lineage_distinct_ids": int(lineage["id"].nunique()), "final_distinct_ids": int(final["id"].nunique()),
        "records_missing_from_lineage": int(by_id["_lin"].isna().sum() + records["id"].isna().sum()),
        "lineage_ids_not_in_records": int(by_id["_rec"].isna().sum()),
        "final_originals_without_kept_row": count(unmatched_claims, "kept"),
        "kept_rows_not_in_final": count(unmatched_told, "kept"),
        "merged_sources_without_merged_row": count(unmatched_claims, "merged"),
        "merged_rows_not_in_final": count(unmatched_told, "merged"),
    }


def test_ledger_matching_numbers_equal_plain_joins_on_broken_tables(finalized, spark):
    """The check matches rows by id in one shuffle; on tables broken in each way the ledger
    guards against, its numbers equal those of plain joins (and the intact tables match)."""
    store, _ = finalized
    t = _tables(store)
    kept = t["lineage"].filter("fate = 'kept'").select("id").orderBy("id").first()["id"]
    merge_id = t["final"].filter("origin = 'merged'").select("id").orderBy("id").first()["id"]
    null_source = t["final"].filter(F.col("id") == merge_id).withColumn(
        "source_ids", F.array(F.lit(None).cast("string"), F.lit("no-such-id")))
    cases = {
        "intact": t,
        "lineage row dropped": {**t, "lineage": t["lineage"].filter(~F.col("id").eqNullSafe(kept))},
        "lineage row twice": {**t, "lineage": t["lineage"].unionByName(t["lineage"].filter(F.col("id") == kept))},
        "kept row missing from final": {**t, "final": t["final"].filter(F.col("id") != kept)},
        "merge missing from final": {**t, "final": t["final"].filter(F.col("id") != merge_id)},
        "final_id pointing elsewhere": {**t, "lineage": t["lineage"].withColumn(
            "final_id", F.when(F.col("id") == kept, F.lit("elsewhere")).otherwise(F.col("final_id")))},
        "null ids": {**t, "records": t["records"].unionByName(
                         t["records"].limit(2).withColumn("id", F.lit(None).cast("string"))),
                     "final": t["final"].unionByName(null_source)},
        "records twice": {**t, "records": t["records"].unionByName(t["records"].limit(3))},
    }
    broken = 0
    for name, c in cases.items():
        numbers = check_ledger(c["records"], c["rejects"], c["lineage"], c["final"]) if name == "intact" else None
        if numbers is None:
            with pytest.raises(LedgerError) as err:
                check_ledger(c["records"], c["rejects"], c["lineage"], c["final"])
            numbers, broken = err.value.summary, broken + 1
        frames = {k: c[k].toPandas() for k in ("records", "lineage", "final")}  # test side: small tables
        expected = _joined_numbers(frames["records"], frames["lineage"], frames["final"])
        assert {k: numbers[k] for k in expected} == expected, name
    assert broken == len(cases) - 1


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
    default = [r["cid"] for r in df.select(content_id_col(F.col("instruction"), F.col("input"),
                                                          F.col("output")).alias("cid")).collect()]
    assert default == [content_id(i, p or "", o) for i, p, o in rows]


def test_check_store_ledger_checks_a_run_root(finalized):
    store, exp = finalized
    numbers = check_store_ledger(store)
    assert numbers["lineage_rows"] == numbers["input_rows"] == exp.records + exp.rejects
    assert issubclass(LedgerError, ValueError)  # the CLI reports it as a failed run, not a crash


def test_the_stage_check_ran_through_the_executor_and_was_recorded(finalized):
    store, exp = finalized
    assert exp.checks["input_rows"] == exp.checks["lineage_rows"] == exp.records + exp.rejects
    state = json.loads((Path(store.root.local) / "_state" / "finalize.json").read_text())
    assert state["checks"] == exp.checks
    assert state["versions"] == {"final": store.version("final"), "lineage": store.version("lineage")}


def _copy_tables(source: TableStore, target: TableStore, names) -> None:
    for name in names:
        target.write(source.read(name), name)


def test_empty_tables_do_not_balance_against_the_input_count(finalized, store):
    """Tables that all came out empty agree with each other; only ingest's own count of the
    input catches them."""
    full, exp = finalized
    for name in ("records", "rejects", "lineage", "final"):
        store.write(full.read(name).limit(0), name)
    empty = _tables(store)
    assert check_ledger(empty["records"], empty["rejects"], empty["lineage"], empty["final"])["lineage_rows"] == 0
    _copy_tables(full, store, [INPUT_FILES])
    with pytest.raises(LedgerError, match=f"records 0 \\+ rejects 0 = 0 != input rows {exp.records + exp.rejects}"):
        check_store_ledger(store)


def test_a_record_lost_consistently_is_caught_by_the_input_count(finalized, store):
    """A parser that silently drops a row leaves records, lineage and final consistent."""
    full, exp = finalized
    t = _tables(full)
    lost = sorted(exp.not_selected)[0]
    store.write(t["records"].filter(F.col("id") != lost), "records")
    store.write(t["lineage"].filter(~F.col("id").eqNullSafe(lost)), "lineage")
    _copy_tables(full, store, ["rejects", "final", INPUT_FILES])
    with pytest.raises(LedgerError) as err:
        check_store_ledger(store)
    assert err.value.problems == [f"records {exp.records - 1} + rejects {exp.rejects} = "
                                  f"{exp.records + exp.rejects - 1} != input rows {exp.records + exp.rejects}"]


def test_no_input_count_fails_the_check(finalized, store):
    full, _ = finalized
    _copy_tables(full, store, ["records", "rejects", "lineage", "final"])
    with pytest.raises(LedgerError, match="no independent input count: table 'input_files' is missing"):
        check_store_ledger(store)


def test_a_failed_check_fails_the_stage_and_records_no_state(finalized, store, settings):
    full, exp = finalized
    _copy_tables(full, store, [*Finalize.inputs])
    more = full.read(INPUT_FILES).withColumn("units", F.col("units") + F.lit(1))
    store.write(more, INPUT_FILES)
    with pytest.raises(LedgerError, match=f"!= input rows {exp.records + exp.rejects + 2}"):
        run_finalize(store.spark, store, settings)
    assert store.exists("final") and not (Path(store.root.local) / "_state" / "finalize.json").exists()
