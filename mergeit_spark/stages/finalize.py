"""Finalize: the curated set (``final``) and the fate of every input row (``lineage``).

``final`` holds the selected originals that no accepted merge absorbed, plus the accepted merges:

    id | instruction | input | output | origin (original|merged) | source_ids array<string>

An original keeps its record id and ``source_ids = [id]``; a merge's id is the content hash of the
merged text (the same hash ingest gives records, so ids mean one thing everywhere) and its
``source_ids`` are the group's members, sorted.

``lineage`` has one row per input row, records and rejects alike:

    id | reject_key | source | fate | reason | detail | final_id | group_id | cluster

* a record row has ``id`` = its record id and ``reject_key`` null; its fate is ``duplicate``
  (``detail`` = the id it duplicates), ``not_selected`` (``reason`` = ``not_clustered`` when no
  dedup row exists for it, i.e. it never reached topics; ``dedup_status_<s>`` for a dedup status
  other than kept/duplicate), ``kept`` (``final_id`` = its own id) or
  ``merged`` (``final_id`` = the merge's id, ``group_id`` = the group). A member of a group whose
  merge failed, failed the gate or was never attempted is ``kept``, with ``group_id`` set and
  ``reason`` = ``merge_failed`` / ``merge_gate_failed`` / ``merge_missing`` (no merges row) /
  ``merge_invalid`` (status merged but an empty instruction or output).
* a reject row has ``id`` null and ``reject_key`` = ``<source>:line:<n>`` or ``<source>:row:<n>``
  (``<source>:raw:<hash>`` when the reader knew neither); ``fate`` = ``rejected``, ``reason`` = the
  reject's reason code and ``detail`` = its detail (for ``exact_duplicate``: the id of the record
  that was kept). Rejects never borrow a record id, so "every records.id appears exactly once" is a
  plain count over the ``id`` column, and a reject stays traceable to its file and line.

``check_ledger`` proves the two tables agree with the inputs using Spark aggregations only.
"""
from __future__ import annotations

from typing import ClassVar

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from ..ids import _SEP  # the separator content_id hashes with; shared so the ids agree
from ..tables import TableStore
from . import Stage, StageContext

FATES = ("rejected", "duplicate", "not_selected", "kept", "merged")
ORIGINS = ("original", "merged")

# The merge stage writes one row per group; should a merges table ever hold several attempts for
# one group, an accepted merge wins over a gate failure, which wins over a plain failure (ties:
# smallest request_hash), so each group has exactly one outcome and no member is counted twice.
_STATUS_RANK = {"merged": 0, "gate_failed": 1, "failed": 2}


class LedgerError(ValueError):
    """The lineage/final tables do not balance against records and rejects (``problems`` lists
    each mismatch with its numbers, ``summary`` holds every number that was checked)."""

    def __init__(self, problems: list[str], summary: dict[str, int]) -> None:
        self.problems = problems
        self.summary = summary
        super().__init__("ledger does not balance: " + "; ".join(problems))


def content_id_col(instruction: Column, input_: Column, output: Column, length: int = 32) -> Column:
    """Spark-native twin of :func:`mergeit_spark.ids.content_id` (SHA-256 of the joined fields).

    ``concat_ws`` drops nulls, so nulls become empty strings first to hash exactly what the Python
    function would hash for ``""``.
    """
    joined = F.concat_ws(_SEP, F.coalesce(instruction, F.lit("")), F.coalesce(input_, F.lit("")),
                         F.coalesce(output, F.lit("")))
    return F.substring(F.sha2(joined, 256), 1, length)


def choose_merges(merges: DataFrame, merge_groups: DataFrame, id_length: int = 32) -> DataFrame:
    """One outcome per merge group: ``group_id, member_ids, cluster, status, accepted, merged_id``
    plus the merged text. Groups without any merge row come out with ``status`` null."""
    rank = F.coalesce(*[F.when(F.col("status") == s, F.lit(r)) for s, r in _STATUS_RANK.items()],
                      F.lit(len(_STATUS_RANK)))
    window = Window.partitionBy("group_id").orderBy(rank, F.col("request_hash").asc_nulls_last())
    best = (merges
            .select("group_id", "request_hash", "status", "instruction", "input", "output")
            .withColumn("_n", F.row_number().over(window))
            .filter(F.col("_n") == 1).drop("_n", "request_hash"))
    groups = merge_groups.select("group_id", "cluster", "member_ids").dropDuplicates(["group_id"])
    # A "merged" row without instruction or output would put an empty example into final; such a
    # row is not accepted and its members go on as originals.
    accepted = ((F.col("status") == "merged") & F.col("instruction").isNotNull()
                & (F.length("instruction") > 0) & F.col("output").isNotNull() & (F.length("output") > 0))
    return (groups.join(best, "group_id", "left")
            .withColumn("accepted", F.coalesce(accepted, F.lit(False)))
            .withColumn("merged_id", F.when(F.col("accepted"), content_id_col(
                F.col("instruction"), F.col("input"), F.col("output"), id_length))))


def build_lineage_and_final(records: DataFrame, rejects: DataFrame, dedup: DataFrame,
                            selected: DataFrame, merge_groups: DataFrame, merges: DataFrame,
                            id_length: int = 32) -> tuple[DataFrame, DataFrame]:
    """Return ``(final, lineage)``; see the module docstring for their shape and meaning."""
    outcomes = choose_merges(merges, merge_groups, id_length)
    membership = (outcomes
                  .select("group_id", F.explode("member_ids").alias("id"), "status", "accepted",
                          "merged_id")
                  .withColumnRenamed("status", "merge_status"))
    dd = dedup.select("id", F.col("cluster").cast("int").alias("cluster"), "status", "duplicate_of")
    sel = selected.select("id").distinct().withColumn("_selected", F.lit(True))

    joined = (records.select("id", "source", "instruction", "input", "output")
              .join(dd, "id", "left")
              .join(sel, "id", "left")
              .join(membership, "id", "left"))
    is_selected = F.coalesce(F.col("_selected"), F.lit(False))
    in_accepted = F.coalesce(F.col("accepted"), F.lit(False))
    fate = (F.when(F.col("status").isNull(), "not_selected")
            .when(F.col("status") == "duplicate", "duplicate")
            .when(F.col("status") != "kept", "not_selected")
            .when(~is_selected, "not_selected")
            .when(in_accepted, "merged")
            .otherwise("kept"))
    reason = (F.when(F.col("status").isNull(), F.lit("not_clustered"))
              .when(~F.col("status").isin("kept", "duplicate"), F.concat(F.lit("dedup_status_"), F.col("status")))
              .when((F.col("status") == "kept") & is_selected & F.col("group_id").isNotNull() & ~in_accepted,
                    F.when(F.col("merge_status").isNull(), F.lit("merge_missing"))
                    .when(F.col("merge_status") == "merged", F.lit("merge_invalid"))
                    .otherwise(F.concat(F.lit("merge_"), F.col("merge_status")))))
    fated = joined.withColumn("fate", fate).withColumn("reason", reason)

    record_lineage = fated.select(
        "id",
        F.lit(None).cast("string").alias("reject_key"),
        "source",
        "fate",
        "reason",
        F.when(F.col("fate") == "duplicate", F.col("duplicate_of")).alias("detail"),
        F.when(F.col("fate") == "kept", F.col("id"))
         .when(F.col("fate") == "merged", F.col("merged_id")).alias("final_id"),
        # a not-selected or duplicate row never reached grouping; only keep a group where it applies
        F.when(F.col("fate").isin("kept", "merged"), F.col("group_id")).alias("group_id"),
        "cluster",
    )
    reject_lineage = rejects.select(
        F.lit(None).cast("string").alias("id"),
        reject_key_col().alias("reject_key"),
        "source",
        F.lit("rejected").alias("fate"),
        F.col("reason").cast("string").alias("reason"),
        F.col("detail").cast("string").alias("detail"),
        F.lit(None).cast("string").alias("final_id"),
        F.lit(None).cast("string").alias("group_id"),
        F.lit(None).cast("int").alias("cluster"),
    )
    lineage = record_lineage.unionByName(reject_lineage)

    originals = fated.filter(F.col("fate") == "kept").select(
        "id", "instruction", "input", "output", F.lit("original").alias("origin"),
        F.array(F.col("id")).alias("source_ids"))
    merged = outcomes.filter("accepted").select(
        F.col("merged_id").alias("id"), "instruction", F.coalesce(F.col("input"), F.lit("")).alias("input"),
        "output", F.lit("merged").alias("origin"), F.array_sort("member_ids").alias("source_ids"))
    final = originals.unionByName(merged)
    return final, lineage


def reject_key_col() -> Column:
    """``source:line:n`` / ``source:row:n``; a hash of ``raw`` when the reader knew neither."""
    src = F.coalesce(F.col("source"), F.lit("?"))
    return (F.when(F.col("line").isNotNull(), F.concat_ws(":", src, F.lit("line"), F.col("line").cast("string")))
            .when(F.col("row").isNotNull(), F.concat_ws(":", src, F.lit("row"), F.col("row").cast("string")))
            .otherwise(F.concat_ws(":", src, F.lit("raw"),
                                   F.substring(F.sha2(F.coalesce(F.col("raw").cast("string"), F.lit("")), 256), 1, 16))))


def _one_row(df: DataFrame, **aggs: Column) -> dict[str, int]:
    row = df.agg(*[c.alias(k) for k, c in aggs.items()]).first()
    return {k: int(row[k] or 0) for k in aggs}


def _count_if(cond: Column) -> Column:
    return F.sum(F.when(cond, 1).otherwise(0))


def check_ledger(records: DataFrame | TableStore, rejects: DataFrame | None = None,
                 lineage: DataFrame | None = None, final: DataFrame | None = None,
                 input_rows: int | None = None) -> dict[str, int]:
    """Verify that lineage and final balance against records and rejects.

    Call it with the four DataFrames, or with a :class:`TableStore` alone to check the tables
    written under its run root.

    Every number comes from a Spark aggregation or an anti-join count; no row reaches the driver.
    Returns the numbers (for the report) or raises :class:`LedgerError` naming every mismatch.
    ``input_rows`` (rows the reader saw, when known) adds the check records + rejects = input.
    """
    if isinstance(records, TableStore):
        return check_store_ledger(records, input_rows=input_rows)
    if rejects is None or lineage is None or final is None:
        raise TypeError("check_ledger needs records, rejects, lineage and final (or one TableStore)")
    s: dict[str, int] = {}
    s.update(_one_row(records, records=F.count(F.lit(1)), records_distinct_ids=F.countDistinct("id")))
    s.update(_one_row(rejects, rejects=F.count(F.lit(1))))
    fate, rid = F.col("fate"), F.col("id")
    s.update(_one_row(
        lineage,
        lineage_rows=F.count(F.lit(1)),
        lineage_record_rows=_count_if(rid.isNotNull()),
        lineage_distinct_ids=F.countDistinct("id"),
        lineage_reject_rows=_count_if(rid.isNull()),
        lineage_bad_fate=_count_if(~fate.isin(*FATES) | fate.isNull()),
        lineage_reject_fate_mismatch=_count_if(rid.isNull() != (fate == "rejected")),
        lineage_kept=_count_if(fate == "kept"),
        lineage_kept_bad_final=_count_if((fate == "kept") & (F.col("final_id").isNull() | (F.col("final_id") != rid))),
        lineage_merged=_count_if(fate == "merged"),
        lineage_merged_bad=_count_if((fate == "merged") & (F.col("final_id").isNull() | F.col("group_id").isNull())),
        lineage_final_id_unexpected=_count_if(~fate.isin("kept", "merged") & F.col("final_id").isNotNull()),
        **{f"fate_{f}": _count_if(fate == f) for f in FATES},
    ))
    origin = F.col("origin")
    s.update(_one_row(
        final,
        final_rows=F.count(F.lit(1)),
        final_distinct_ids=F.countDistinct("id"),
        final_original=_count_if(origin == "original"),
        final_merged=_count_if(origin == "merged"),
        final_bad_origin=_count_if(~origin.isin(*ORIGINS) | origin.isNull()),
        final_merged_sources=F.sum(F.when(origin == "merged", F.size("source_ids")).otherwise(0)),
        final_original_bad_sources=_count_if((origin == "original") & (
            (F.size("source_ids") != 1) | (F.col("source_ids")[0] != F.col("id")))),
    ))

    # Record ids against lineage ids, one full outer join: which side is missing.
    rec_side = records.select("id", F.lit(True).alias("_rec"))
    lin_side = lineage.filter(rid.isNotNull()).select("id", F.lit(True).alias("_lin"))
    s.update(_one_row(
        rec_side.join(lin_side, "id", "full_outer"),
        records_missing_from_lineage=_count_if(F.col("_lin").isNull()),
        lineage_ids_not_in_records=_count_if(F.col("_rec").isNull()),
    ))

    # What final claims about lineage against what lineage says, one full outer join on
    # (record id, final id, kind): an original claims (id, id, kept), a merge claims
    # (source, merge id, merged) for each of its sources.
    claims = (final.filter(origin == "original")
              .select("id", F.col("id").alias("final_id"), F.lit("kept").alias("kind"))
              .unionByName(final.filter(origin == "merged")
                           .select(F.explode("source_ids").alias("id"), F.col("id").alias("final_id"),
                                   F.lit("merged").alias("kind")))
              .withColumn("_final", F.lit(True)))
    told = (lineage.filter(fate.isin("kept", "merged"))
            .select("id", "final_id", fate.alias("kind"), F.lit(True).alias("_lineage")))
    both = claims.join(told, ["id", "final_id", "kind"], "full_outer")
    kind = F.col("kind")
    s.update(_one_row(
        both,
        final_originals_without_kept_row=_count_if((kind == "kept") & F.col("_lineage").isNull()),
        kept_rows_not_in_final=_count_if((kind == "kept") & F.col("_final").isNull()),
        merged_sources_without_merged_row=_count_if((kind == "merged") & F.col("_lineage").isNull()),
        merged_rows_not_in_final=_count_if((kind == "merged") & F.col("_final").isNull()),
    ))

    problems: list[str] = []

    def expect(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    expect(s["records"] == s["records_distinct_ids"],
           f"records has {s['records'] - s['records_distinct_ids']} repeated ids "
           f"({s['records']} rows, {s['records_distinct_ids']} distinct)")
    if input_rows is not None:
        s["input_rows"] = int(input_rows)
        expect(s["records"] + s["rejects"] == input_rows,
               f"records {s['records']} + rejects {s['rejects']} = {s['records'] + s['rejects']} "
               f"!= input rows {input_rows}")
    expect(s["lineage_rows"] == s["records"] + s["rejects"],
           f"lineage rows {s['lineage_rows']} != records {s['records']} + rejects {s['rejects']} "
           f"= {s['records'] + s['rejects']}")
    expect(s["lineage_record_rows"] == s["records"],
           f"lineage has {s['lineage_record_rows']} record rows for {s['records']} records")
    expect(s["lineage_distinct_ids"] == s["lineage_record_rows"],
           f"{s['lineage_record_rows'] - s['lineage_distinct_ids']} record ids appear more than once in lineage")
    expect(s["records_missing_from_lineage"] == 0,
           f"{s['records_missing_from_lineage']} records ids are missing from lineage")
    expect(s["lineage_ids_not_in_records"] == 0,
           f"{s['lineage_ids_not_in_records']} lineage ids are not records ids")
    expect(s["lineage_reject_rows"] == s["rejects"],
           f"lineage has {s['lineage_reject_rows']} reject rows for {s['rejects']} rejects")
    expect(s["lineage_bad_fate"] == 0, f"{s['lineage_bad_fate']} lineage rows have an unknown fate")
    expect(s["lineage_reject_fate_mismatch"] == 0,
           f"{s['lineage_reject_fate_mismatch']} lineage rows mix up record ids and the rejected fate")
    expect(s["lineage_kept_bad_final"] == 0,
           f"{s['lineage_kept_bad_final']} kept lineage rows do not point at their own id")
    expect(s["lineage_merged_bad"] == 0,
           f"{s['lineage_merged_bad']} merged lineage rows lack a final_id or group_id")
    expect(s["lineage_final_id_unexpected"] == 0,
           f"{s['lineage_final_id_unexpected']} lineage rows that left the set still name a final_id")
    expect(s["final_rows"] == s["final_distinct_ids"],
           f"final has {s['final_rows'] - s['final_distinct_ids']} repeated ids")
    expect(s["final_bad_origin"] == 0, f"{s['final_bad_origin']} final rows have an unknown origin")
    expect(s["final_original_bad_sources"] == 0,
           f"{s['final_original_bad_sources']} original final rows do not list exactly their own id as source")
    expect(s["final_original"] == s["lineage_kept"],
           f"final originals {s['final_original']} != kept lineage rows {s['lineage_kept']}")
    expect(s["final_originals_without_kept_row"] == 0,
           f"{s['final_originals_without_kept_row']} final originals have no kept lineage row")
    expect(s["kept_rows_not_in_final"] == 0,
           f"{s['kept_rows_not_in_final']} kept lineage rows are missing from final")
    expect(s["final_merged_sources"] == s["lineage_merged"],
           f"merged final rows list {s['final_merged_sources']} sources but lineage has "
           f"{s['lineage_merged']} merged rows")
    expect(s["merged_sources_without_merged_row"] == 0,
           f"{s['merged_sources_without_merged_row']} sources of merged final rows have no merged lineage row")
    expect(s["merged_rows_not_in_final"] == 0,
           f"{s['merged_rows_not_in_final']} merged lineage rows point at no merged final row")
    if problems:
        raise LedgerError(problems, s)
    return s


def check_store_ledger(store: TableStore, input_rows: int | None = None) -> dict[str, int]:
    """:func:`check_ledger` on the tables written under ``store``'s run root."""
    return check_ledger(store.read("records"), store.read("rejects"), store.read("lineage"),
                        store.read("final"), input_rows=input_rows)


class Finalize(Stage):
    """Selected originals + accepted merges → ``final``; every input row's fate → ``lineage``."""

    name: ClassVar[str] = "finalize"
    inputs: ClassVar[tuple[str, ...]] = ("records", "rejects", "dedup", "selected", "merge_groups", "merges")
    outputs: ClassVar[tuple[str, ...]] = ("final", "lineage")
    # ingest.id_length decides the length of a merge's content id.
    settings_sections: ClassVar[tuple[str, ...]] = ("ingest",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> dict[str, DataFrame]:
        final, lineage = build_lineage_and_final(
            tables["records"], tables["rejects"], tables["dedup"], tables["selected"],
            tables["merge_groups"], tables["merges"], id_length=ctx.settings.ingest.id_length)
        return {"final": final, "lineage": lineage}
