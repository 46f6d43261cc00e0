"""Embed backend inside the JVM (``embed.backend=spark-nlp``): Spark NLP runs the configured
sentence-transformers model, exported once to ONNX. No Python worker, no torch on the executors.

Why E5Embeddings: all-MiniLM-L6-v2 (like every mean-pooled sentence-transformers BERT) is a BERT
encoder whose sentence vector is the mean of the last hidden states over every word piece the
attention mask keeps ([CLS] and [SEP] included), L2-normalised. Spark NLP's E5Embeddings is BERT
plus that mean pooling. ``BertEmbeddings`` + ``SentenceEmbeddings`` is not: it keeps one vector per
*word* (its first word piece) and averages those. bench/bench_sparknlp.py measures both.

Once per (model, max_seq_length), under ``embed.sparknlp_dir``:
  1. ``export_onnx`` (driver, needs torch: the main venv): the transformer under the
     sentence-transformers model, with its mean pooling in the graph (``_encoder_graph`` says
     why), to ``onnx/model.onnx`` (torch.onnx's TorchScript exporter, one file) with its
     vocabulary as ``onnx/assets/vocab.txt``, the layout ``loadSavedModel`` reads.
  2. ``import_model`` (driver, Spark NLP's jar): ``E5Embeddings.loadSavedModel`` on that folder,
     saved as a Spark NLP model under ``e5/``; later sessions ``E5Embeddings.load`` it in seconds.
The stage itself is DocumentAssembler → E5Embeddings, then L2 normalisation in Spark SQL.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from ..config import EmbedSettings
from ..session import _jvm_has_class

E5_CLASS = "com.johnsnowlabs.nlp.embeddings.E5Embeddings"
EXPORT_INFO = "mergeit-export.json"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class SparkNLPUnavailable(RuntimeError):
    """embed.backend=spark-nlp without Spark NLP's classes (or without its export)."""


def model_dir(settings: EmbedSettings) -> Path:
    """``<embed.sparknlp_dir>/<model>-len<max_seq_length>``: the export and the imported model."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.model).strip("_")
    return Path(settings.sparknlp_dir).expanduser() / f"{slug}-len{settings.max_seq_length}"


def export_onnx(settings: EmbedSettings, pooled: bool = True) -> Path:
    """Export the model's transformer to ONNX (once; later calls return the cached folder).
    ``pooled=False`` leaves the pooling to Spark NLP (for bench/bench_sparknlp.py's comparison)."""
    target = model_dir(settings) / ("onnx" if pooled else "onnx-unpooled")
    if (target / EXPORT_INFO).is_file():
        return target
    import torch
    from sentence_transformers import SentenceTransformer

    from .embed import resolve_model_path

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
    of a padded batch is wrong (measured on 64 real rows against sentence-transformers: mean
    cosine 0.998 at batch size 1, 0.884 at 8, 0.945 at 32); with the pooling in the graph it is
    0.998 at every batch size."""
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


def import_model(spark: SparkSession, settings: EmbedSettings) -> Path:
    """The Spark NLP model folder for ``settings``, imported from the ONNX export on first use."""
    from sparknlp.annotator import E5Embeddings

    saved = model_dir(settings) / "e5"
    if (saved / "metadata").is_dir():
        return saved
    onnx = model_dir(settings) / "onnx"
    if not (onnx / EXPORT_INFO).is_file():
        try:
            export_onnx(settings)
        except ImportError as exc:  # no torch here (the Spark NLP venv): the export is a separate step
            raise SparkNLPUnavailable(
                f"no ONNX export of {settings.model!r} in {onnx}: run `python -m "
                "mergeit_spark.stages.embed_sparknlp export` where torch is installed (make sparknlp-model)"
            ) from exc
    annotator = E5Embeddings.loadSavedModel(str(onnx), spark)
    staging = saved.with_name(f"e5.{spark.sparkContext.applicationId}")
    annotator.write().overwrite().save(str(staging))
    shutil.rmtree(saved, ignore_errors=True)
    staging.rename(saved)
    return saved


def annotator(spark: SparkSession, settings: EmbedSettings) -> Any:
    """E5Embeddings over ``document`` into ``e5``, configured like the sentence-transformers model."""
    from sparknlp.annotator import E5Embeddings

    if not _jvm_has_class(E5_CLASS):
        raise SparkNLPUnavailable("embed.backend=spark-nlp needs Spark NLP's jar in the session: add "
                                  "`spark-nlp` to spark.packages (or its jars to spark.jars, or spark-submit "
                                  "--packages); see README, Spark NLP")
    saved = import_model(spark, settings)
    info = json.loads((model_dir(settings) / "onnx" / EXPORT_INFO).read_text())
    return (E5Embeddings.load(str(saved)).setInputCols(["document"]).setOutputCol("e5")
            .setCaseSensitive(info["case_sensitive"]).setMaxSentenceLength(settings.max_seq_length)
            .setBatchSize(settings.batch_size))


def record_text() -> Column:
    """``(instruction + " " + input).strip()`` as embed.py computes it (nulls count as empty)."""
    joined = F.concat_ws(" ", F.coalesce("instruction", F.lit("")), F.coalesce("input", F.lit("")))
    return F.regexp_replace(joined, r"(?U)^\s+|\s+$", "")


def unit_length(vector: Column) -> Column:
    norm = F.sqrt(F.aggregate(vector, F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    return F.transform(vector, lambda x: (x / norm).cast("float"))


def embed_records(records: DataFrame, settings: EmbedSettings) -> DataFrame:
    """The ``embeddings`` table for ``records`` (embed.py's schema), computed inside the JVM."""
    from pyspark.ml import Pipeline
    from sparknlp.base import DocumentAssembler

    from .embed import EMBEDDINGS_SCHEMA

    spark = records.sparkSession
    if settings.partitions > 0:
        records = records.repartition(settings.partitions)
    texts = records.select("id", record_text().alias("text"))
    assembler = DocumentAssembler().setInputCol("text").setOutputCol("document")
    annotated = Pipeline(stages=[assembler, annotator(spark, settings)]).fit(texts).transform(texts)
    vector = F.col("e5").getItem(0).getField("embeddings")
    out = annotated.select("id", unit_length(vector).alias("embedding"),
                           F.lit(settings.model).alias("model"), F.lit("fp32").alias("precision"))
    return out.select([f.name for f in EMBEDDINGS_SCHEMA])  # embed.py's columns, in its order


def main(argv: list[str] | None = None) -> int:
    from ..config import load_settings

    parser = argparse.ArgumentParser(prog="python -m mergeit_spark.stages.embed_sparknlp",
                                     description="Export embed.model to ONNX for embed.backend=spark-nlp.")
    parser.add_argument("command", choices=["export"])
    parser.add_argument("--conf", action="append", default=[], help="settings profile (YAML)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="section.key=value")
    args = parser.parse_args(argv)
    print(export_onnx(load_settings(args.conf, args.overrides).embed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
