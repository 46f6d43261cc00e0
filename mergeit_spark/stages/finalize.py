"""Finalize: the curated set (``final``) and the fate of every input row (``lineage``).

``final`` holds the selected originals that no accepted merge absorbed, plus the accepted merges:

    id | instruction | input | output | origin (original|merged) | source_ids array<string>

An original keeps its record id and ``source_ids = [id]``; a merge's id is the content hash of the
merged text (the same hash ingest gives records, so ids mean one thing everywhere) and its
``source_ids`` are the group's members, sorted.

``lineage`` has one row per input row, records and rejects alike:

    id | reject_key | source | fate | reason | detail | final_id | group_id | cluster | run_id

(``run_id``: the ingest run in which the row arrived; see ``with_arrival_run``.)

* a record row has ``id`` = its record id and ``reject_key`` null; its fate is ``contaminated``
  (it shares an n-gram with an evaluation item: ``reason`` = ``ngram`` or ``whole_item``,
  ``detail`` = JSON of the evaluation set, file, item and matching text), ``duplicate``
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

import json
from functools import reduce
from typing import Any, Callable, ClassVar

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from ..ids import DEFAULT_ID_LENGTH, ID_SEPARATOR, MERGED_ID_TAG  # shared: the Spark ids equal ids.py's
from ..tables import TableStore, Write
from . import Stage, StageContext, StageOutput, with_added

FATES = ("rejected", "contaminated", "duplicate", "not_selected", "kept", "merged")
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


def content_id_col(instruction: Column, input_: Column, output: Column,
                   length: int = DEFAULT_ID_LENGTH) -> Column:
    """Spark-native twin of :func:`mergeit_spark.ids.content_id` (SHA-256 of the joined fields).

    ``concat_ws`` drops nulls, so nulls become empty strings first to hash exactly what the Python
    function would hash for ``""``.
    """
    joined = F.concat_ws(ID_SEPARATOR, F.coalesce(instruction, F.lit("")), F.coalesce(input_, F.lit("")),
                         F.coalesce(output, F.lit("")))
    return F.substring(F.sha2(joined, 256), 1, length)


def choose_merges(merges: DataFrame, merge_groups: DataFrame, id_length: int = DEFAULT_ID_LENGTH) -> DataFrame:
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
        ID_SEPARATOR, F.lit(MERGED_ID_TAG), F.col("group_id"), F.coalesce(F.col("instruction"), F.lit("")),
        F.coalesce(F.col("input"), F.lit("")), F.coalesce(F.col("output"), F.lit(""))), 256), 1, id_length)
    return (groups.join(best, "group_id", "left")
            .withColumn("accepted", F.coalesce(accepted, F.lit(False)))
            .withColumn("merged_id", F.when(F.col("accepted"), merged_id)))


def build_lineage_and_final(records: DataFrame, rejects: DataFrame, dedup: DataFrame,
                            selected: DataFrame, merge_groups: DataFrame, merges: DataFrame,
                            id_length: int = DEFAULT_ID_LENGTH,
                            contamination: DataFrame | None = None) -> tuple[DataFrame, DataFrame]:
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
              .join(_contamination_detail(records, contamination), "id", "left")
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
        F.when(F.col("fate") == "duplicate", F.col("duplicate_of"))
         .when(F.col("fate") == "contaminated", F.col("contamination")).alias("detail"),
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


def _contamination_detail(records: DataFrame, contamination: DataFrame | None) -> DataFrame:
    """(id, contamination, contamination_kind) of the contaminated records: ``contamination`` is
    the lineage detail (JSON: the evaluation set, file, item and the matching text)."""
    if contamination is None:
        return records.sparkSession.createDataFrame(
            [], "id string, contamination string, contamination_kind string")
    return contamination.select(
        "id", F.to_json(F.struct("eval_set", "file", "item", "match")).alias("contamination"),
        F.col("kind").alias("contamination_kind"))


def _fate_and_reason() -> tuple[Column, Column]:
    """A record's fate and its reason, from its dedup ``status``, ``_selected`` and its group's
    ``merge_status`` / ``accepted`` (columns of the joined record rows)."""
    is_selected = F.coalesce(F.col("_selected"), F.lit(False))
    in_accepted = F.coalesce(F.col("accepted"), F.lit(False))
    contaminated = F.col("contamination").isNotNull()
    fate = (F.when(contaminated, "contaminated")
            .when(F.col("status").isNull(), "not_selected")
            .when(F.col("status") == "duplicate", "duplicate")
            .when(F.col("status") != "kept", "not_selected")
            .when(~is_selected, "not_selected")
            .when(in_accepted, "merged")
            .otherwise("kept"))
    reason = (F.when(contaminated, F.col("contamination_kind"))
              .when(F.col("status").isNull(), F.lit("not_clustered"))
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
    """The one-row aggregates ``rows`` together, computed by ONE Spark action: their stages run at
    once and the query is planned once (an action per aggregate would plan a query each and leave
    cores idle between them, which dominates on a small run). Each row goes as JSON through a
    union (a cross join of the rows would broadcast each one: a Spark job apiece)."""
    names = [c for row in rows for c in row.columns]
    as_json = [row.select(F.to_json(F.struct(*[F.col(c).cast("long").alias(c) for c in row.columns])).alias("n"))
               for row in rows]
    numbers = dict.fromkeys(names, 0)  # to_json leaves out nulls: a sum over no rows
    for row in reduce(DataFrame.unionAll, as_json).collect():
        numbers.update({k: int(v or 0) for k, v in json.loads(row["n"]).items()})
    return numbers


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
        final_original=_count_if(origin == "original"),
        final_merged=_count_if(origin == "merged"),
        final_bad_origin=_count_if(~origin.isin(*ORIGINS) | origin.isNull()),
        final_merged_sources=F.sum(F.when(origin == "merged", F.size("source_ids")).otherwise(0)),
        final_original_bad_sources=_count_if((origin == "original") & (
            (F.size("source_ids") != 1) | (F.col("source_ids")[0] != F.col("id")))),
    )


# The counts each tagged row carries (see _tagged_rows): where the row comes from, and which
# side says that a record went into a final row.
_KEY_FLAGS = ("in_records", "in_lineage", "in_final", "final_claim", "lineage_claim")


def _tagged_rows(records: DataFrame, lineage: DataFrame, final: DataFrame) -> DataFrame:
    """Rows keyed by (record id, final id, kind) with a count in each of ``_KEY_FLAGS``:

    * a records row: ``in_records``, keyed by its id;
    * a lineage row: ``in_lineage`` when it has an id (a record's row); ``lineage_claim`` when its
      fate is kept or merged, keyed by its final id and fate (lineage says the record went there);
    * a final row: ``in_final``, by its own id, and its claims, ``final_claim`` (final says which
      records it holds): an original claims (id, id, kept), a merge (source, merge id, merged)
      for each source."""
    null = F.lit(None).cast("string")

    def tagged(id_: Column, final_id: Column, kind: Column, **flags: Column) -> Column:
        return F.struct(id_.alias("id"), final_id.alias("final_id"), kind.alias("kind"),
                        *[flags.get(f, F.lit(0)).cast("long").alias(f) for f in _KEY_FLAGS])

    fate, origin = F.col("fate"), F.col("origin")
    into_final = fate.isin("kept", "merged")
    record_rows = records.select(tagged(F.col("id"), null, null, in_records=F.lit(1)).alias("t"))
    lineage_rows = (lineage.filter(F.col("id").isNotNull() | into_final).select(tagged(
        F.col("id"), F.when(into_final, F.col("final_id")), F.when(into_final, fate),
        in_lineage=F.col("id").isNotNull(), lineage_claim=into_final).alias("t")))
    sources = F.coalesce(F.col("source_ids"), F.array().cast("array<string>"))
    final_rows = final.select(F.explode(F.concat(
        F.array(tagged(F.col("id"), null, null, in_final=F.lit(1))),
        F.filter(F.array(tagged(F.col("id"), F.col("id"), F.lit("kept"), final_claim=F.lit(1))),
                 lambda _: F.coalesce(origin == "original", F.lit(False))),
        F.filter(F.transform(sources, lambda source: tagged(source, F.col("id"), F.lit("merged"),
                                                            final_claim=F.lit(1))),
                 lambda _: F.coalesce(origin == "merged", F.lit(False))))).alias("t"))
    return record_rows.unionByName(lineage_rows).unionByName(final_rows).select("t.*")


def _keyed_numbers(records: DataFrame, lineage: DataFrame, final: DataFrame) -> DataFrame:
    """Every number that matches rows of the three tables by id, from ONE shuffle by id: full
    outer joins and distinct counts giving the same numbers would take a shuffle, and Spark jobs,
    each (BENCHMARKS.md, incremental).

    The tables' :func:`_tagged_rows`, summed per key, then per id, give exactly what those joins
    give: rows on one side of a key the other side lacks (a key with a null never matches, as in
    a join)."""
    # Grouped by id first: the per-key and the per-id sums then run inside its partitions.
    by_key = (_tagged_rows(records, lineage, final).repartition("id")
              .groupBy("id", "final_id", "kind").agg(*[F.sum(f).alias(f) for f in _KEY_FLAGS]))
    # A claim is matched when final and lineage both make it (and it names both ids).
    matched = (F.col("id").isNotNull() & F.col("final_id").isNotNull()
               & (F.col("final_claim") > 0) & (F.col("lineage_claim") > 0))

    def unmatched(kind: str, side: str) -> Column:
        return F.when((F.col("kind") == kind) & ~matched, F.col(side)).otherwise(0)

    per_key = by_key.select("id", "in_records", "in_lineage", "in_final",
                            unmatched("kept", "final_claim").alias("originals_unmatched"),
                            unmatched("kept", "lineage_claim").alias("kept_unmatched"),
                            unmatched("merged", "final_claim").alias("sources_unmatched"),
                            unmatched("merged", "lineage_claim").alias("merged_unmatched"))
    by_id = per_key.groupBy("id").agg(*[F.sum(c).alias(c) for c in per_key.columns[1:]])
    in_records, in_lineage, in_final = F.col("in_records"), F.col("in_lineage"), F.col("in_final")
    has_id = F.col("id").isNotNull()
    return _one_row(
        by_id,
        records=F.sum(in_records),
        records_distinct_ids=_count_if(has_id & (in_records > 0)),
        lineage_distinct_ids=_count_if(has_id & (in_lineage > 0)),
        final_distinct_ids=_count_if(has_id & (in_final > 0)),
        records_missing_from_lineage=F.sum(F.when(in_lineage == 0, in_records).otherwise(0)),
        lineage_ids_not_in_records=F.sum(F.when(in_records == 0, in_lineage).otherwise(0)),
        final_originals_without_kept_row=F.sum("originals_unmatched"),
        kept_rows_not_in_final=F.sum("kept_unmatched"),
        merged_sources_without_merged_row=F.sum("sources_unmatched"),
        merged_rows_not_in_final=F.sum("merged_unmatched"),
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


def check_ledger(records: DataFrame, rejects: DataFrame, lineage: DataFrame, final: DataFrame,
                 input_rows: int | None = None) -> dict[str, int]:
    """Verify that lineage and final balance against records and rejects, and, when
    ``input_rows`` (the units the input held) is given, records + rejects against it.
    :func:`check_store_ledger` checks the tables written under a run root.

    Every number comes from Spark aggregations (one action; the rows matched by id in one shuffle,
    :func:`_keyed_numbers`); no row reaches the driver.
    Returns the numbers (for the report) or raises :class:`LedgerError` naming every mismatch.
    """
    numbers = _ledger_numbers(records, rejects, lineage, final)
    if input_rows is not None:
        numbers["input_rows"] = int(input_rows)
    return _balanced(numbers)


def _ledger_numbers(records: DataFrame, rejects: DataFrame, lineage: DataFrame, final: DataFrame,
                    *more: DataFrame) -> Numbers:
    """Every number of the ledger rules (and the one-row aggregates ``more``), in one action."""
    return _numbers(_one_row(rejects, rejects=F.count(F.lit(1))), _lineage_numbers(lineage),
                    _final_numbers(final), _keyed_numbers(records, lineage, final), *more)


def _balanced(numbers: Numbers) -> Numbers:
    problems = ledger_problems(numbers)
    if problems:
        raise LedgerError(problems, numbers)
    return numbers


def check_store_ledger(store: TableStore, input_rows: int | None = None) -> dict[str, int]:
    """:func:`check_ledger` on the tables written under ``store``'s run root, against ingest's
    independent input count; the input count is ``input_rows`` when given, else ingest's own
    (``input_files``, required)."""
    counted = [_input_numbers(store)] if input_rows is None else []
    # (Lineage and final are scanned twice, at the few columns used: cheaper than caching them.)
    numbers = _ledger_numbers(store.read("records").select("id"), store.read("rejects"),
                              store.read("lineage").select("id", "fate", "final_id", "group_id"),
                              store.read("final").select("id", "origin", "source_ids"), *counted)
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


def finalize_scope(new_records: DataFrame, new_groups: DataFrame) -> DataFrame:
    """The record ids (column ``id``) whose lineage or final rows an increment can change: its new
    records and the members of its new groups. No other record's fate moves: dedup decisions are
    never revisited, the selection only grows by new records (``mergeit_spark.incremental`` step 5), and the new groups hold
    only rows that were in no group before (step 6), so every older group, merge and merged row
    stays as it is. Rejects only arrive (new rows, outside any bound)."""
    members = new_groups.select(F.explode("member_ids").alias("id"))
    return new_records.select("id").unionByName(members).distinct()


class Finalize(Stage):
    """Selected originals + accepted merges → ``final``; every input row's fate → ``lineage``."""

    name: ClassVar[str] = "finalize"
    version: ClassVar[str] = "2"   # the fate contaminated
    inputs: ClassVar[tuple[str, ...]] = ("records", "rejects", "contamination", "dedup", "selected",
                                         "merge_groups", "merges")
    outputs: ClassVar[tuple[str, ...]] = ("final", "lineage")
    # ingest.id_length decides the length of a merge's content id.
    settings_sections: ClassVar[tuple[str, ...]] = ("ingest",)
    extends_from_tables: ClassVar[bool] = True

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        final, lineage = build_lineage_and_final(
            tables["records"], tables["rejects"], tables["dedup"], tables["selected"],
            tables["merge_groups"], tables["merges"], id_length=ctx.settings.ingest.id_length,
            contamination=tables["contamination"])
        return StageOutput({"final": final, "lineage": with_arrival_run(lineage, ctx.store)})

    def check(self, ctx: StageContext) -> dict[str, Any]:
        """The run fails unless the ledger balances against ingest's independent input count."""
        return check_store_ledger(ctx.store)

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """``final`` and ``lineage`` brought up to date by a merge by record ``id``, one new
        version each. Only the rows an increment can change are computed (:func:`finalize_scope`):
        the stage's rows for the records of the scope, the new rejects, and the new groups with
        their merges. A row of a scope record is inserted or updated; a ``final`` row of a scope
        record that left the set (a new merge absorbed it) is deleted; a reject's row (null id) is
        inserted. A lineage row already there keeps its ``run_id``; every other row arrived in
        this increment."""
        def new(name: str) -> DataFrame:
            return added[name] if name in added else tables[name].limit(0)

        new_groups = new("merge_groups")
        scope = finalize_scope(new("records"), new_groups).persist()
        final, lineage = build_lineage_and_final(
            with_added(tables, added, "records").join(scope, "id", "left_semi"), new("rejects"),
            with_added(tables, added, "dedup"), with_added(tables, added, "selected"), new_groups,
            new("merges"), id_length=ctx.settings.ingest.id_length, contamination=new("contamination"))
        lineage = lineage.withColumn("run_id", F.lit(ctx.run_id))
        return StageOutput({"final": Write.merge(final, ["id"], within=scope),
                            "lineage": Write.merge(lineage, ["id"], within=scope, keep=["run_id"])})
