"""Finalize: the curated set (``final``) and the fate of every input row (``lineage``).

``final`` holds the selected originals that no accepted merge absorbed, plus the accepted merges:

    id | instruction | input | output | origin (original|merged) | source_ids array<string>

An original keeps its record id and ``source_ids = [id]``; a merge's id is the content hash of the
merged text (the same hash ingest gives records, so ids mean one thing everywhere) and its
``source_ids`` are the group's members, sorted.

``lineage`` has one row per input row, records and rejects alike:

    id | reject_key | source | fate | reason | detail | final_id | group_id | cluster | run_id

(``run_id``: the ingest run in which the row arrived; see ``with_arrival_run``.)

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

``check_ledger`` proves the two tables agree with the inputs using Spark aggregations only, and
records + rejects agree with the number of input units ingest counted without parsing them (the
``input_files`` table): a run whose tables came out short, or empty, does not balance. The stage's
``check`` hook runs it on the written tables, so a run fails when the ledger does not balance.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from ..ids import _SEP  # the separator content_id hashes with; shared so the ids agree
from ..tables import TableStore
from . import Stage, StageContext, StageOutput

FATES = ("rejected", "duplicate", "not_selected", "kept", "merged")
ORIGINS = ("original", "merged")

# Ingest's table of input files, one row per file with ``units``: lines of a JSON Lines file,
# elements of a JSON array, rows of a Parquet/Delta source, counted independently of parsing.
INPUT_FILES = "input_files"

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
    # The merge's id hashes its group id with its text (ids.merged_id): unique per group, so two
    # groups answered alike, or a merge equal to a kept record, cannot put one id twice in final.
    merged_id = F.substring(F.sha2(F.concat_ws(
        _SEP, F.lit("merge"), F.col("group_id"), F.coalesce(F.col("instruction"), F.lit("")),
        F.coalesce(F.col("input"), F.lit("")), F.coalesce(F.col("output"), F.lit(""))), 256), 1, id_length)
    return (groups.join(best, "group_id", "left")
            .withColumn("accepted", F.coalesce(accepted, F.lit(False)))
            .withColumn("merged_id", F.when(F.col("accepted"), merged_id)))


def build_lineage_and_final(records: DataFrame, rejects: DataFrame, dedup: DataFrame,
                            selected: DataFrame, merge_groups: DataFrame, merges: DataFrame,
                            id_length: int = 32) -> tuple[DataFrame, DataFrame]:
    """Return ``(final, lineage)``; see the module docstring for their shape and meaning.

    Both read the merge outcomes and the fated record rows: those two are cached (the caller
    clears the cache once both tables are written, as the pipeline does after every stage), so
    writing the two tables runs the joins, and scans the six inputs, once."""
    outcomes = choose_merges(merges, merge_groups, id_length).persist(StorageLevel.MEMORY_AND_DISK)
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
    fate, reason = _fate_and_reason()
    fated = joined.withColumn("fate", fate).withColumn("reason", reason).persist(StorageLevel.MEMORY_AND_DISK)

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


def _fate_and_reason() -> tuple[Column, Column]:
    """A record's fate and its reason, from its dedup ``status``, ``_selected`` and its group's
    ``merge_status`` / ``accepted`` (columns of the joined record rows)."""
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
    return fate, reason


def reject_key_col() -> Column:
    """``source:line:n`` / ``source:row:n``; a hash of ``raw`` when the reader knew neither."""
    src = F.coalesce(F.col("source"), F.lit("?"))
    return (F.when(F.col("line").isNotNull(), F.concat_ws(":", src, F.lit("line"), F.col("line").cast("string")))
            .when(F.col("row").isNotNull(), F.concat_ws(":", src, F.lit("row"), F.col("row").cast("string")))
            .otherwise(F.concat_ws(":", src, F.lit("raw"),
                                   F.substring(F.sha2(F.coalesce(F.col("raw").cast("string"), F.lit("")), 256), 1, 16))))


def _one_row(df: DataFrame, **aggs: Column) -> DataFrame:
    """``df``'s aggregates ``aggs`` as one row (lazy: :func:`_numbers` computes them)."""
    return df.agg(*[c.alias(k) for k, c in aggs.items()])


def _numbers(*rows: DataFrame) -> dict[str, int]:
    """The one-row aggregates ``rows`` side by side, computed by ONE Spark action: their stages
    run at once and the query is planned once (seven actions one after another cost seconds of
    planning and idle cores on a small run)."""
    together = rows[0]
    for row in rows[1:]:
        together = together.crossJoin(row)
    values = together.first()
    return {k: int(values[k] or 0) for k in together.columns}


def _count_if(cond: Column) -> Column:
    return F.sum(F.when(cond, 1).otherwise(0))


def input_units(store: TableStore) -> dict[str, int]:
    """The input count ingest took independently of parsing: ``input_files`` rows and the sum of
    their ``units`` (lines, array elements or source rows)."""
    return _numbers(_input_numbers(store))


def _input_numbers(store: TableStore) -> DataFrame:
    """:func:`input_units` as a one-row aggregate (lazy); a missing ``input_files`` fails here."""
    if not store.exists(INPUT_FILES):
        raise LedgerError([f"no independent input count: table {INPUT_FILES!r} is missing under "
                           f"{store.root} (rerun ingest)"], {})
    return _one_row(store.read(INPUT_FILES), input_files=F.count(F.lit(1)), input_rows=F.sum("units"))


def _lineage_numbers(lineage: DataFrame) -> DataFrame:
    fate, rid, final_id = F.col("fate"), F.col("id"), F.col("final_id")
    return _one_row(
        lineage,
        lineage_rows=F.count(F.lit(1)),
        lineage_record_rows=_count_if(rid.isNotNull()),
        lineage_distinct_ids=F.countDistinct("id"),
        lineage_reject_rows=_count_if(rid.isNull()),
        lineage_bad_fate=_count_if(~fate.isin(*FATES) | fate.isNull()),
        lineage_reject_fate_mismatch=_count_if(rid.isNull() != (fate == "rejected")),
        lineage_kept=_count_if(fate == "kept"),
        lineage_kept_bad_final=_count_if((fate == "kept") & (final_id.isNull() | (final_id != rid))),
        lineage_merged=_count_if(fate == "merged"),
        lineage_merged_bad=_count_if((fate == "merged") & (final_id.isNull() | F.col("group_id").isNull())),
        lineage_final_id_unexpected=_count_if(~fate.isin("kept", "merged") & final_id.isNotNull()),
        **{f"fate_{f}": _count_if(fate == f) for f in FATES},
    )


def _final_numbers(final: DataFrame) -> DataFrame:
    origin = F.col("origin")
    return _one_row(
        final,
        final_rows=F.count(F.lit(1)),
        final_distinct_ids=F.countDistinct("id"),
        final_original=_count_if(origin == "original"),
        final_merged=_count_if(origin == "merged"),
        final_bad_origin=_count_if(~origin.isin(*ORIGINS) | origin.isNull()),
        final_merged_sources=F.sum(F.when(origin == "merged", F.size("source_ids")).otherwise(0)),
        final_original_bad_sources=_count_if((origin == "original") & (
            (F.size("source_ids") != 1) | (F.col("source_ids")[0] != F.col("id")))),
    )


def _id_numbers(records: DataFrame, lineage: DataFrame) -> DataFrame:
    """Record ids against lineage ids, one full outer join: which side is missing."""
    rec_side = records.select("id", F.lit(True).alias("_rec"))
    lin_side = lineage.filter(F.col("id").isNotNull()).select("id", F.lit(True).alias("_lin"))
    return _one_row(
        rec_side.join(lin_side, "id", "full_outer"),
        records_missing_from_lineage=_count_if(F.col("_lin").isNull()),
        lineage_ids_not_in_records=_count_if(F.col("_rec").isNull()),
    )


def _claim_numbers(final: DataFrame, lineage: DataFrame) -> DataFrame:
    """What final claims about lineage against what lineage says, one full outer join on (record
    id, final id, kind): an original claims (id, id, kept), a merge claims (source, merge id,
    merged) for each of its sources."""
    origin = F.col("origin")
    claims = (final.filter(origin == "original")
              .select("id", F.col("id").alias("final_id"), F.lit("kept").alias("kind"))
              .unionByName(final.filter(origin == "merged")
                           .select(F.explode("source_ids").alias("id"), F.col("id").alias("final_id"),
                                   F.lit("merged").alias("kind")))
              .withColumn("_final", F.lit(True)))
    told = (lineage.filter(F.col("fate").isin("kept", "merged"))
            .select("id", "final_id", F.col("fate").alias("kind"), F.lit(True).alias("_lineage")))
    kind = F.col("kind")
    return _one_row(
        claims.join(told, ["id", "final_id", "kind"], "full_outer"),
        final_originals_without_kept_row=_count_if((kind == "kept") & F.col("_lineage").isNull()),
        kept_rows_not_in_final=_count_if((kind == "kept") & F.col("_final").isNull()),
        merged_sources_without_merged_row=_count_if((kind == "merged") & F.col("_lineage").isNull()),
        merged_rows_not_in_final=_count_if((kind == "merged") & F.col("_final").isNull()),
    )


Numbers = dict[str, int]
# Each rule of the ledger: a condition on the numbers and the text naming a failure.
_RULES: list[tuple[Callable[[Numbers], bool], Callable[[Numbers], str]]] = [
    (lambda s: s["records"] == s["records_distinct_ids"],
     lambda s: f"records has {s['records'] - s['records_distinct_ids']} repeated ids "
               f"({s['records']} rows, {s['records_distinct_ids']} distinct)"),
    (lambda s: "input_files" not in s or s["input_files"] > 0,
     lambda s: f"table {INPUT_FILES} lists no input file"),
    (lambda s: "input_rows" not in s or s["records"] + s["rejects"] == s["input_rows"],
     lambda s: f"records {s['records']} + rejects {s['rejects']} = {s['records'] + s['rejects']} "
               f"!= input rows {s['input_rows']}"),
    (lambda s: s["lineage_rows"] == s["records"] + s["rejects"],
     lambda s: f"lineage rows {s['lineage_rows']} != records {s['records']} + rejects {s['rejects']} "
               f"= {s['records'] + s['rejects']}"),
    (lambda s: s["lineage_record_rows"] == s["records"],
     lambda s: f"lineage has {s['lineage_record_rows']} record rows for {s['records']} records"),
    (lambda s: s["lineage_distinct_ids"] == s["lineage_record_rows"],
     lambda s: f"{s['lineage_record_rows'] - s['lineage_distinct_ids']} record ids appear more than "
               f"once in lineage"),
    (lambda s: s["records_missing_from_lineage"] == 0,
     lambda s: f"{s['records_missing_from_lineage']} records ids are missing from lineage"),
    (lambda s: s["lineage_ids_not_in_records"] == 0,
     lambda s: f"{s['lineage_ids_not_in_records']} lineage ids are not records ids"),
    (lambda s: s["lineage_reject_rows"] == s["rejects"],
     lambda s: f"lineage has {s['lineage_reject_rows']} reject rows for {s['rejects']} rejects"),
    (lambda s: s["lineage_bad_fate"] == 0,
     lambda s: f"{s['lineage_bad_fate']} lineage rows have an unknown fate"),
    (lambda s: s["lineage_reject_fate_mismatch"] == 0,
     lambda s: f"{s['lineage_reject_fate_mismatch']} lineage rows mix up record ids and the rejected fate"),
    (lambda s: s["lineage_kept_bad_final"] == 0,
     lambda s: f"{s['lineage_kept_bad_final']} kept lineage rows do not point at their own id"),
    (lambda s: s["lineage_merged_bad"] == 0,
     lambda s: f"{s['lineage_merged_bad']} merged lineage rows lack a final_id or group_id"),
    (lambda s: s["lineage_final_id_unexpected"] == 0,
     lambda s: f"{s['lineage_final_id_unexpected']} lineage rows that left the set still name a final_id"),
    (lambda s: s["final_rows"] == s["final_distinct_ids"],
     lambda s: f"final has {s['final_rows'] - s['final_distinct_ids']} repeated ids"),
    (lambda s: s["final_bad_origin"] == 0,
     lambda s: f"{s['final_bad_origin']} final rows have an unknown origin"),
    (lambda s: s["final_original_bad_sources"] == 0,
     lambda s: f"{s['final_original_bad_sources']} original final rows do not list exactly their own "
               f"id as source"),
    (lambda s: s["final_original"] == s["lineage_kept"],
     lambda s: f"final originals {s['final_original']} != kept lineage rows {s['lineage_kept']}"),
    (lambda s: s["final_originals_without_kept_row"] == 0,
     lambda s: f"{s['final_originals_without_kept_row']} final originals have no kept lineage row"),
    (lambda s: s["kept_rows_not_in_final"] == 0,
     lambda s: f"{s['kept_rows_not_in_final']} kept lineage rows are missing from final"),
    (lambda s: s["final_merged_sources"] == s["lineage_merged"],
     lambda s: f"merged final rows list {s['final_merged_sources']} sources but lineage has "
               f"{s['lineage_merged']} merged rows"),
    (lambda s: s["merged_sources_without_merged_row"] == 0,
     lambda s: f"{s['merged_sources_without_merged_row']} sources of merged final rows have no "
               f"merged lineage row"),
    (lambda s: s["merged_rows_not_in_final"] == 0,
     lambda s: f"{s['merged_rows_not_in_final']} merged lineage rows point at no merged final row"),
]


def ledger_problems(numbers: Numbers) -> list[str]:
    """The text of every ledger rule that ``numbers`` break (empty when the ledger balances)."""
    return [text(numbers) for holds, text in _RULES if not holds(numbers)]


def check_ledger(records: DataFrame | TableStore, rejects: DataFrame | None = None,
                 lineage: DataFrame | None = None, final: DataFrame | None = None,
                 input_rows: int | None = None) -> dict[str, int]:
    """Verify that lineage and final balance against records and rejects, and records + rejects
    against the input count.

    Call it with the four DataFrames (``input_rows``, the units the input held, adds the input
    check), or with a :class:`TableStore` alone to check the tables written under its run root
    against ingest's independent count in ``input_files``.

    Every number comes from a Spark aggregation or an anti-join count; no row reaches the driver.
    Returns the numbers (for the report) or raises :class:`LedgerError` naming every mismatch.
    """
    if isinstance(records, TableStore):
        return check_store_ledger(records, input_rows=input_rows)
    if rejects is None or lineage is None or final is None:
        raise TypeError("check_ledger needs records, rejects, lineage and final (or one TableStore)")
    numbers = _ledger_numbers(records, rejects, lineage, final)
    if input_rows is not None:
        numbers["input_rows"] = int(input_rows)
    return _balanced(numbers)


def _ledger_numbers(records: DataFrame, rejects: DataFrame, lineage: DataFrame, final: DataFrame,
                    *more: DataFrame) -> Numbers:
    """Every number of the ledger rules (and the one-row aggregates ``more``), in one action."""
    return _numbers(
        _one_row(records, records=F.count(F.lit(1)), records_distinct_ids=F.countDistinct("id")),
        _one_row(rejects, rejects=F.count(F.lit(1))), _lineage_numbers(lineage), _final_numbers(final),
        _id_numbers(records, lineage), _claim_numbers(final, lineage), *more)


def _balanced(numbers: Numbers) -> Numbers:
    problems = ledger_problems(numbers)
    if problems:
        raise LedgerError(problems, numbers)
    return numbers


def check_store_ledger(store: TableStore, input_rows: int | None = None) -> dict[str, int]:
    """:func:`check_ledger` on the tables written under ``store``'s run root; the input count is
    ``input_rows`` when given, else ingest's own count (``input_files``, required)."""
    counted = [_input_numbers(store)] if input_rows is None else []
    # Records, lineage and final are each read by two or three of the checks: read once, at the
    # columns the checks use, and cached for the length of the check.
    records = store.read("records").select("id").persist()
    lineage = store.read("lineage").select("id", "fate", "final_id", "group_id").persist()
    final = store.read("final").select("id", "origin", "source_ids").persist()
    try:
        numbers = _ledger_numbers(records, store.read("rejects"), lineage, final, *counted)
    finally:
        for table in (records, lineage, final):
            table.unpersist()
    if input_rows is not None:
        numbers["input_rows"] = int(input_rows)
    return _balanced(numbers)


def with_arrival_run(lineage: DataFrame, store: TableStore) -> DataFrame:
    """``lineage`` plus ``run_id``: the ingest run in which the row arrived, i.e. the run that
    first read its source (``input_files.run_id``; an incremental run adds its own). Null when
    ``input_files`` is missing."""
    if not store.exists(INPUT_FILES):
        return lineage.withColumn("run_id", F.lit(None).cast("string"))
    runs = store.read(INPUT_FILES).groupBy("source").agg(F.min("run_id").alias("run_id"))
    return (lineage.join(F.broadcast(runs), "source", "left")
            .select(*lineage.columns, "run_id"))


class Finalize(Stage):
    """Selected originals + accepted merges → ``final``; every input row's fate → ``lineage``."""

    name: ClassVar[str] = "finalize"
    inputs: ClassVar[tuple[str, ...]] = ("records", "rejects", "dedup", "selected", "merge_groups", "merges")
    outputs: ClassVar[tuple[str, ...]] = ("final", "lineage")
    # ingest.id_length decides the length of a merge's content id.
    settings_sections: ClassVar[tuple[str, ...]] = ("ingest",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        final, lineage = build_lineage_and_final(
            tables["records"], tables["rejects"], tables["dedup"], tables["selected"],
            tables["merge_groups"], tables["merges"], id_length=ctx.settings.ingest.id_length)
        return StageOutput({"final": final, "lineage": with_arrival_run(lineage, ctx.store)})

    def check(self, ctx: StageContext) -> dict[str, Any]:
        """The run fails unless the ledger balances against ingest's independent input count."""
        return check_store_ledger(ctx.store)
