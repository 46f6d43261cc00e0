"""Decontam stage: keep benchmark text out of the training data, before anything is embedded.

An evaluation set is one entry of ``decontam.eval_paths``: a file or folder in any format ingest
reads (JSON, JSON Lines, Parquet, Delta) or plain text (``.txt``, one item a line). An item is one
row (one non-blank line): the fields of ``decontam.fields`` it has, joined in that order. Items
and records are compared as normalised words (:mod:`mergeit_spark.ngrams`: NFKC, lower case,
punctuation as spaces). A record is **contaminated** when the words of its instruction, input and
output, read as one sequence (so an item split across instruction and input still matches),
contain an n-gram of ``decontam.ngram`` words (13) of an item; an item shorter than that (but at
least ``decontam.min_item_words``) must appear whole.

Tables:

* ``eval_items``: ``eval_set`` (the path as configured), ``file``, ``item`` (0-based row of the
  item in its file), ``text``, ``words`` (normalised words), ``key`` (a 64-bit hash of the three
  names, what the other tables point at).
* ``eval_ngrams``: ``hash`` (64-bit n-gram hash), ``n`` (its words), ``key``: every distinct
  n-gram of every item, or one whole-item hash for a short item.
* ``contamination``: one row per contaminated record: ``id``, the item it shares most with
  (``eval_set``, ``file``, ``item``; ties: the smallest key), ``match`` (the shared words, as
  the record has them after normalisation), ``kind`` (``ngram`` or ``whole_item``) and
  ``ngrams`` (how many of the record's n-grams are evaluation n-grams).

The embed stage embeds only records without a contamination row; finalize gives them the fate
``contaminated`` with the match in ``detail``, so the ledger still balances. The merge stage
checks every accepted merge against ``eval_ngrams`` too (:func:`contaminated_texts`): a merge
that brings evaluation text in is rejected by the gate's ``contaminated`` check.

Engine: hashing runs in executors (``mapInArrow`` over Arrow batches of texts; numpy on uint64).
The evaluation side is looked up in place when it has at most ``decontam.broadcast_max_ngrams``
distinct n-grams (a sorted int64 array, 8 bytes each, shipped to every executor once as a
broadcast variable; each record's n-grams are searched in it and only hits leave the task). Spark
Connect has no broadcast variables: there the array travels in each task's function, so the
switch is at most ``CAPTURED_MAX_NGRAMS`` (a few megabytes per task);
above that switch, every record n-gram becomes a row that a shuffle join meets with
``eval_ngrams``, so no executor holds the evaluation side and memory stays bounded however many
items there are. Nothing row-scale reaches the driver: the eval hashes in broadcast mode are
bounded by the switch, the n-gram lengths are a handful of numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from ..config import DecontamSettings, Settings
from ..session import Shipped, is_connect, ship
from ..fs import resolve
from ..inputs import InputError, InputFile, delta_data_files, fingerprint_inputs, resolve_inputs
from ..ngrams import WordHasher, as_signed, ngram_hashes, words
from ..tables import Write
from . import ROWS_ADDED, Stage, StageContext, StageError, StageOutput

CONTAMINATED = "contaminated"   # the lineage fate and the gate check
# Under Spark Connect the in-place lookup's array travels in every task's function: 4 MB at most.
CAPTURED_MAX_NGRAMS = 500_000

EVAL_ITEMS_SCHEMA = T.StructType([
    T.StructField("eval_set", T.StringType(), False),
    T.StructField("file", T.StringType(), False),
    T.StructField("item", T.LongType(), False),
    T.StructField("text", T.StringType(), True),
    T.StructField("words", T.IntegerType(), False),
    T.StructField("key", T.LongType(), False),
])
EVAL_NGRAMS_SCHEMA = T.StructType([
    T.StructField("hash", T.LongType(), False),
    T.StructField("n", T.IntegerType(), False),
    T.StructField("key", T.LongType(), False),
])
CONTAMINATION_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("eval_set", T.StringType(), False),
    T.StructField("file", T.StringType(), False),
    T.StructField("item", T.LongType(), False),
    T.StructField("match", T.StringType(), True),
    T.StructField("kind", T.StringType(), False),
    T.StructField("ngrams", T.LongType(), False),
])
_GRAMS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("hash", T.LongType(), False),
    T.StructField("n", T.IntegerType(), False),
    T.StructField("pos", T.IntegerType(), False),
])
_TEXT_SUFFIXES = (".txt", ".txt.gz")


# -- the evaluation side ------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSet:
    """One entry of ``decontam.eval_paths``: its name (the path as given) and its files."""
    name: str
    files: tuple[InputFile, ...]


def resolve_eval_sets(paths: list[str]) -> list[EvalSet]:
    """Each configured path as an :class:`EvalSet`; a ``.txt`` file (or a folder of them) is plain
    text, anything else is resolved as ingest resolves inputs. Raises :class:`StageError` naming
    the path when it is missing or of an unknown format."""
    sets = []
    for given in paths:
        try:
            sets.append(EvalSet(given, tuple(_eval_files(given))))
        except InputError as exc:
            raise StageError(f"decontam.eval_paths: {exc}") from None
    return sets


def _eval_files(given: str) -> list[InputFile]:
    location = resolve(given)
    if location.is_file() and given.lower().endswith(_TEXT_SUFFIXES):
        return [InputFile(given if location.local is None else location.local, "text")]
    if location.is_dir():
        texts = [f for f in location.files(recursive=True)
                 if f.name.lower().endswith(_TEXT_SUFFIXES) and not f.name.startswith((".", "_"))]
        if texts:
            return [InputFile(f.local if f.local is not None else f.uri, "text") for f in sorted(texts, key=lambda f: f.path)]
    return resolve_inputs([given], "auto")


def _read_file(spark: SparkSession, item: InputFile) -> DataFrame:
    """One evaluation file's rows, with ``_file`` and ``_order`` (rows in file order). A file Spark
    cannot read (a malformed JSON line: the reader fails fast, an item must not go unchecked)
    raises :class:`StageError` naming it."""
    try:
        return _spark_read(spark, item)
    except Exception as exc:  # Py4JJavaError, AnalysisException: Spark's message says what
        reason = re.search(r"\[[A-Z_.]+\][^\n]*", str(exc))
        raise StageError(f"evaluation set file {item.path} cannot be read as {item.format}: "
                         f"{reason.group(0) if reason else str(exc).splitlines()[0]}") from None


def _spark_read(spark: SparkSession, item: InputFile) -> DataFrame:
    path = resolve(item.path).uri if resolve(item.path).local is None else item.path
    if item.format == "text":
        frame = spark.read.text(path)
    elif item.format in ("json", "jsonl"):
        frame = (spark.read.option("multiLine", item.format == "json").option("mode", "FAILFAST")
                 .json(path))
    elif item.format == "parquet":
        frame = spark.read.parquet(path)
    else:  # delta: its live data files, read as Parquet (no Delta classes needed)
        files = [f for f, *_ in delta_data_files(item.path)]
        if not files:
            return spark.createDataFrame([], "_file string, _order long")
        frame = spark.read.parquet(*files)
    return frame.withColumn("_file", F.lit(item.path)).withColumn("_order", F.monotonically_increasing_id())


def _item_text(frame: DataFrame, fields: list[str], eval_set: str) -> Column:
    """The item's text: the configured fields it has, joined by newlines (a text file: the line)."""
    types = {f.name: f.dataType for f in frame.schema.fields if not f.name.startswith("_")}
    if list(types) == ["value"] and "value" not in fields:
        return F.col("value")
    present = [f for f in fields if f in types]
    if not present:
        raise StageError(f"evaluation set {eval_set}: none of the fields {fields} (decontam.fields) "
                         f"is a column; it has {sorted(types)}")
    parts = [F.col(f) if isinstance(types[f], T.StringType)
             else F.to_json(F.col(f)) if isinstance(types[f], (T.ArrayType, T.StructType, T.MapType))
             else F.col(f).cast("string") for f in present]
    return F.concat_ws("\n", *parts)


def read_eval_items(spark: SparkSession, sets: list[EvalSet], fields: list[str]) -> DataFrame:
    """(eval_set, file, item, text) of every item of ``sets``, items numbered in file order."""
    frames = []
    for eval_set in sets:
        for item in eval_set.files:
            frame = _read_file(spark, item)
            if "_order" in frame.columns and len(frame.columns) == 2:
                continue  # an empty Delta table
            frames.append(frame.select(F.lit(eval_set.name).alias("eval_set"), F.col("_file").alias("file"),
                                       "_order", _item_text(frame, fields, eval_set.name).alias("text")))
    if not frames:
        return spark.createDataFrame([], "eval_set string, file string, item long, text string")
    rows = frames[0]
    for frame in frames[1:]:
        rows = rows.unionByName(frame)
    order = Window.partitionBy("eval_set", "file").orderBy("_order")
    # Numbered before blank items (a blank line, a row without text) are dropped: an item keeps
    # its line or row number.
    return (rows.withColumn("item", F.row_number().over(order) - 1).drop("_order")
            .filter(F.length(F.trim(F.coalesce("text", F.lit("")))) > 0))


@dataclass(frozen=True)
class _ItemGrams:
    """mapInArrow: evaluation items (eval_set, file, item, text) → their n-gram rows
    (``EVAL_NGRAMS_SCHEMA`` plus ``words``, the item's normalised word count, on every row; an
    item with no n-gram, too short, gets one row with a null hash so that its count survives)."""

    ngram: int
    min_words: int

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        hasher = WordHasher()
        for batch in batches:
            keys = batch.column("key").to_numpy(zero_copy_only=False)
            hashes, lengths, owners, counts = [], [], [], []
            for key, text in zip(keys, batch.column("text").to_pylist()):
                tokens = words(text)
                grams = self._grams(hasher(tokens)) if len(tokens) >= self.min_words else np.zeros(0, np.uint64)
                grams = np.unique(grams)
                n = min(self.ngram, len(tokens))
                if grams.size == 0:
                    hashes.append(np.zeros(1, np.uint64)), lengths.append(np.zeros(1, np.int32))
                    owners.append(np.full(1, key)), counts.append(np.full(1, len(tokens), np.int32))
                    continue
                hashes.append(grams), lengths.append(np.full(grams.size, n, np.int32))
                owners.append(np.full(grams.size, key)), counts.append(np.full(grams.size, len(tokens), np.int32))
            if not hashes:
                continue
            count = np.concatenate(counts)
            valid = count >= self.min_words
            yield pa.RecordBatch.from_arrays([
                pa.array(as_signed(np.concatenate(hashes)), mask=~valid),
                pa.array(np.concatenate(lengths)), pa.array(np.concatenate(owners), pa.int64()),
                pa.array(count)], names=["hash", "n", "key", "words"])

    def _grams(self, word_hashes: np.ndarray) -> np.ndarray:
        if word_hashes.size < self.ngram:
            return ngram_hashes(word_hashes, word_hashes.size)   # a short item: the whole of it
        return ngram_hashes(word_hashes, self.ngram)


def evaluation_tables(spark: SparkSession, sets: list[EvalSet], settings: DecontamSettings
                      ) -> tuple[DataFrame, DataFrame]:
    """The ``eval_items`` and ``eval_ngrams`` tables of ``sets``."""
    items = read_eval_items(spark, sets, settings.fields)
    items = items.withColumn("key", F.xxhash64("eval_set", "file", "item"))
    grams = items.select("key", "text").mapInArrow(
        _ItemGrams(settings.ngram, settings.min_item_words), "hash long, n int, key long, words int")
    counts = grams.groupBy("key").agg(F.first("words").alias("words"))
    eval_items = items.join(counts, "key").select(*EVAL_ITEMS_SCHEMA.fieldNames())
    eval_ngrams = grams.filter(F.col("hash").isNotNull()).select("hash", "n", "key").distinct()
    return eval_items, eval_ngrams


# -- the record side ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordGrams:
    """mapInArrow: texts (``id`` and text columns) → (id, hash, n, pos) of their n-grams of every
    length in ``lengths``, over the words of the columns read as one sequence. With ``lookup``
    (a broadcast sorted int64 array), only n-grams found in it leave the task."""

    columns: tuple[str, ...]
    lengths: tuple[int, ...]
    lookup: Shipped | None = None

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        hasher = WordHasher()
        table = self.lookup.value if self.lookup is not None else None
        for batch in batches:
            ids = batch.column("id").to_pylist()
            texts = [batch.column(c).to_pylist() for c in self.columns]
            out: dict[str, list] = {"id": [], "hash": [], "n": [], "pos": []}
            for row, id_ in enumerate(ids):
                tokens = [w for column in texts for w in words(column[row])]
                word_hashes = hasher(tokens)
                for n in self.lengths:
                    grams = as_signed(ngram_hashes(word_hashes, n))
                    pos = np.arange(grams.size, dtype=np.int32)
                    if table is not None:
                        hit = _found(table, grams)
                        grams, pos = grams[hit], pos[hit]
                    grams, first = np.unique(grams, return_index=True)
                    out["id"].extend([id_] * grams.size)
                    out["hash"].append(grams), out["n"].append(np.full(grams.size, n, np.int32))
                    out["pos"].append(pos[first])
            if out["id"]:
                yield pa.RecordBatch.from_arrays(
                    [pa.array(out["id"], pa.string()), pa.array(np.concatenate(out["hash"])),
                     pa.array(np.concatenate(out["n"])), pa.array(np.concatenate(out["pos"]))],
                    schema=to_arrow_schema(_GRAMS_SCHEMA))


def _found(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which of ``values`` are in the sorted array ``table``."""
    if table.size == 0 or values.size == 0:
        return np.zeros(values.size, dtype=bool)
    at = np.minimum(np.searchsorted(table, values), table.size - 1)
    return table[at] == values


def _match_words(columns: tuple[str, ...]):
    """A UDF: the words [pos, pos + n) of the columns read as one normalised sequence."""
    def match(*args: Any) -> str:
        *texts, pos, n = args
        tokens = [w for text in texts for w in words(text)]
        return " ".join(tokens[pos:pos + n])
    return F.udf(match, T.StringType())


def gram_lengths(eval_ngrams: DataFrame) -> list[int]:
    """The n-gram lengths the evaluation side has (the n-gram size and the short items' lengths)."""
    return sorted(r["n"] for r in eval_ngrams.select("n").distinct().collect())


def lookup_max_ngrams(spark: SparkSession, settings: DecontamSettings) -> int:
    """Up to this many distinct evaluation n-grams are looked up in place (see the module doc)."""
    return min(settings.broadcast_max_ngrams, CAPTURED_MAX_NGRAMS) if is_connect(spark) else settings.broadcast_max_ngrams


def contaminated_texts(texts: DataFrame, columns: tuple[str, ...], eval_items: DataFrame,
                       eval_ngrams: DataFrame, settings: DecontamSettings,
                       lengths: list[int] | None = None) -> DataFrame:
    """For the rows of ``texts`` (``id`` + ``columns``) that share an n-gram with an evaluation
    item: one row each in ``CONTAMINATION_SCHEMA``. See the module doc for the two lookups."""
    spark = texts.sparkSession
    lengths = gram_lengths(eval_ngrams) if lengths is None else lengths
    if not lengths:
        return spark.createDataFrame([], CONTAMINATION_SCHEMA)
    frame = texts.select("id", *columns)
    distinct = eval_ngrams.select("hash").distinct()
    if distinct.count() <= lookup_max_ngrams(spark, settings):
        table = np.sort(distinct.toArrow().column("hash").to_numpy())
        lookup = ship(spark, table)
        grams = frame.mapInArrow(RecordGrams(columns, tuple(lengths), lookup), _GRAMS_SCHEMA)
    else:
        grams = frame.mapInArrow(RecordGrams(columns, tuple(lengths)), _GRAMS_SCHEMA)
    hits = grams.join(eval_ngrams, ["hash", "n"])
    first = Window.partitionBy("id").orderBy("key", "pos")
    best = (hits.withColumn("ngrams", F.count(F.lit(1)).over(Window.partitionBy("id")))
            .withColumn("_r", F.row_number().over(first)).filter("_r = 1").drop("_r"))
    named = best.join(eval_items.select("key", "eval_set", "file", "item"), "key")
    with_text = named.join(frame, "id")
    return with_text.select(
        "id", "eval_set", "file", "item",
        _match_words(columns)(*[F.col(c) for c in columns], F.col("pos"), F.col("n")).alias("match"),
        F.when(F.col("n") < settings.ngram, F.lit("whole_item")).otherwise(F.lit("ngram")).alias("kind"),
        F.col("ngrams").cast("long").alias("ngrams"))


RECORD_COLUMNS = ("instruction", "input", "output")


def no_evaluation(spark: SparkSession) -> dict[str, DataFrame]:
    """Empty ``eval_items`` and ``eval_ngrams``: the inputs of a merge stage run on its own
    (``Pipeline.run_stage``) without an evaluation set."""
    return {"eval_items": spark.createDataFrame([], EVAL_ITEMS_SCHEMA),
            "eval_ngrams": spark.createDataFrame([], EVAL_NGRAMS_SCHEMA)}


def _empty(schema: T.StructType) -> pa.Table:
    return pa.Table.from_pylist([], schema=to_arrow_schema(schema))


class Decontam(Stage):
    """records → contamination (+ the evaluation sets as tables: eval_items, eval_ngrams)."""

    name = "decontam"
    inputs = ("records",)
    outputs = ("eval_items", "eval_ngrams", "contamination")
    settings_sections = ("decontam",)

    def __init__(self, sets: list[EvalSet]) -> None:
        self.sets = sets

    @classmethod
    def from_settings(cls, settings: Settings) -> "Decontam":
        return cls(resolve_eval_sets(settings.decontam.eval_paths))

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        settings = ctx.settings.decontam
        if not self.sets:
            return StageOutput({name: Write.overwrite(_empty(schema)) for name, schema in (
                ("eval_items", EVAL_ITEMS_SCHEMA), ("eval_ngrams", EVAL_NGRAMS_SCHEMA),
                ("contamination", CONTAMINATION_SCHEMA))}, summary={"eval_sets": 0, "contaminated": 0})
        items, ngrams = evaluation_tables(ctx.spark, self.sets, settings)
        items, ngrams = items.persist(), ngrams.persist()
        found = contaminated_texts(tables["records"], RECORD_COLUMNS, items, ngrams, settings).persist()
        return StageOutput({"eval_items": items, "eval_ngrams": ngrams, "contamination": found},
                           summary=self._summary(items, ngrams, found, settings))

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, Any]) -> StageOutput:
        """The new records against the evaluation sets as the full run stored them."""
        new = added.get("records")
        if new is None or added.get(ROWS_ADDED, {}).get("records") == 0 or not self.sets:
            return StageOutput(summary={"contaminated": 0})
        found = contaminated_texts(new, RECORD_COLUMNS, tables["eval_items"], tables["eval_ngrams"],
                                   ctx.settings.decontam).persist()
        count = found.count()
        return StageOutput({"contamination": Write.append(found, count)},
                           summary={"contaminated": count, "counts": {"new_contaminated": count}})

    def extra_fingerprint(self, ctx: StageContext) -> str:
        """The evaluation files as they are (paths, sizes, times): a changed set re-checks every row."""
        files = [f for s in self.sets for f in s.files]
        return fingerprint_inputs(files) if files else ""

    @staticmethod
    def _summary(items: DataFrame, ngrams: DataFrame, found: DataFrame,
                 settings: DecontamSettings) -> dict[str, Any]:
        per_set = {r["eval_set"]: {"items": int(r["items"]), "ignored_short": int(r["short"])}
                   for r in items.groupBy("eval_set").agg(
                       F.count(F.lit(1)).alias("items"),
                       F.sum(F.when(F.col("words") < settings.min_item_words, 1).otherwise(0)).alias("short"))
                   .collect()}
        for r in found.groupBy("eval_set").count().collect():
            per_set.setdefault(r["eval_set"], {})["contaminated"] = int(r["count"])
        distinct = ngrams.select("hash").distinct().count()
        return {"eval_sets": len(per_set), "per_set": per_set, "eval_ngrams": distinct,
                "lookup": "in place" if distinct <= lookup_max_ngrams(ngrams.sparkSession, settings) else "shuffle join",
                "contaminated": sum(s.get("contaminated", 0) for s in per_set.values())}
