"""Topics stage: PCA to the variance target, then k-means, both MLlib; the fitted model is saved.

Spaces: the embeddings are unit vectors in the model's space (384-d for all-MiniLM-L6-v2).
k-means runs in the PCA space: the fewest principal components that explain
``settings.topics.variance`` of the variance (95% by default, as in MergeIT). Dropping the
low-variance tail removes dimensions that carry little topic signal and makes every k-means
iteration cheaper. ``topics.distance`` is the Euclidean distance to the row's centroid in that
same PCA space, so it is exactly the quantity k-means minimises.

How, pass by pass (n rows, d model dimensions, m kept components):
1. One small job counts the rows and reads d.
2. MLlib ``PCA`` with all d components (which gives the explained-variance curve) is fitted on the
   embeddings as they are read (spread over the cores first when the table has fewer files than
   that): the covariance does not depend on row order, and nothing is cached for it.
3. The k-means input is the projection onto the first m components (the full projection sliced,
   not a second fit), kept as m float32 per row, the width k-means needs, and cached: k-means
   reads it some fifteen times. It is hash-partitioned by id into ceil(n / ``partition_rows``)
   partitions and sorted by id. That partitioning depends on the rows alone, never on
   ``spark.sql.shuffle.partitions`` or the cores: MLlib's k-means|| draws its seeds partition by
   partition, so this is what makes the same rows cluster the same on a laptop and on a cluster.
4. MLlib ``KMeans`` (block solver: distances to all centres by one matrix product per block of
   rows) with a fixed seed; k is ``settings.topics.k`` when set, else the paper's rule
   int(sqrt(n / 2)); at least 1 and at most n. MLlib needs k >= 2, so k = 1 is one cluster whose
   centre is the mean.
5. Rows are assigned by :func:`assign_to_topics`: one ``mapInArrow`` pass over the embeddings
   with the basis (d x m) and the centres (k x m) broadcast, numpy computing the projection, the
   nearest centre and the distance to it. The result is cached (id, cluster, distance: small) so
   the per-cluster statistics and the table write share it.
6. One aggregation (the assignment joined to the embeddings) gives each cluster's size, mean
   unit embedding and distance statistics: k rows to the driver.

The fitted model is saved under the run root (``<root>/_models/topics``): ``pipeline`` is an MLlib
``PipelineModel`` (``PCAModel`` with all components, a ``VectorSlicer`` keeping the first m,
``KMeansModel`` when k >= 2), loadable by any Spark (input column ``features``, a vector; output
``cluster``); ``centroids.parquet`` holds the centroids rows below (k rows, written from the
driver). :func:`load_topic_model` and :func:`assign_to_topics` put later rows in the same topics
without refitting.

Tables:
- ``topics``: ``id``, ``cluster`` (int), ``distance`` (double, to its centroid in PCA space).
- ``centroids``: one row per cluster, small (k rows), built on the driver from the fitted model:
  ``cluster`` (int), ``center`` (array<double>, PCA space, length ``pca_components``),
  ``embedding_center`` (array<double>, the mean of the cluster's unit embeddings in the model's
  space; dedup ranks clusters by it for its cross-cluster check), ``size`` (long, rows
  assigned; 0 for a centre k-means left empty), run metadata repeated on every row for the
  report: ``k`` (int, clusters fitted), ``pca_components`` (int), ``explained_variance`` (double,
  cumulative share of variance the kept components explain), ``embedding_dim`` (int); and the
  distances of the cluster's rows to its centre, the yardstick for rows assigned later (drift):
  ``distance_mean``, ``distance_max`` (double, 0 when empty) and ``distance_quantiles``
  (array<double> at :data:`DISTANCE_QUANTILES`, approximate to 1e-4 of the rank; empty when the
  cluster is).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.broadcast import Broadcast
from pyspark.ml import PipelineModel
from pyspark.ml.clustering import KMeans
from pyspark.ml.feature import PCA, PCAModel, VectorSlicer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.stat import Summarizer
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from ..config import TopicsSettings
from . import Stage, StageContext, StageOutput

MODEL_DIR = ("_models", "topics")  # under the run root
CENTROIDS_FILE = "centroids.parquet"
DISTANCE_QUANTILES = (0.5, 0.9, 0.99)

TOPICS_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("cluster", T.IntegerType(), False),
    T.StructField("distance", T.DoubleType(), False),
])
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


def kmeans_partitions(n: int, partition_rows: int) -> int:
    """Partitions of the k-means input: decided by the row count alone (see the module doc)."""
    return max(1, math.ceil(n / partition_rows))


def topic_model_path(root: str | Path) -> Path:
    """Where the topics stage saves its fitted model under run root ``root``."""
    return Path(root).absolute().joinpath(*MODEL_DIR)


@dataclass(frozen=True)
class TopicModel:
    """A fitted topic model: what assigns rows to topics without refitting.

    ``centroids``: the centroids rows (see the module doc), one per cluster, in cluster order.
    ``fitted``: the MLlib models of a fit (PCA with all components → the first m → k-means when
    k >= 2); None for a model loaded from ``path``, whose :attr:`pipeline` is loaded when first
    asked for. Assigning rows needs only the PCA basis, which a loaded model reads from the
    saved PCA's data file (no Spark job; loading the PipelineModel runs a dozen).
    """

    centroids: list[dict[str, Any]] = field(repr=False)
    fitted: PipelineModel | None = None
    path: Path | None = None

    @cached_property
    def pipeline(self) -> PipelineModel:
        return self.fitted if self.fitted is not None else PipelineModel.load(str(self.path / "pipeline"))

    @property
    def k(self) -> int:
        return len(self.centroids)

    @property
    def components(self) -> int:
        return len(self.centroids[0]["center"])

    @property
    def centers(self) -> np.ndarray:
        """k x m, the cluster centres in the PCA space."""
        return np.array([c["center"] for c in self.centroids], dtype=np.float64)

    @cached_property
    def basis(self) -> np.ndarray:
        """d x m: MLlib's principal components (columns), the first m. Like MLlib's transform,
        the projection is x @ basis (no centring: distances do not change)."""
        if self.fitted is None:
            saved = saved_pca_components(self.path / "pipeline")
            if saved is not None:
                return saved[:, :self.components]
        pca: PCAModel = self.pipeline.stages[0]
        return np.asarray(pca.pc.toArray(), dtype=np.float64)[:, :self.components]


def saved_pca_components(pipeline_path: Path) -> np.ndarray | None:
    """The principal components (d x d, columns) of the PCAModel saved as the first stage of
    the PipelineModel at ``pipeline_path``, read from its data file in MLlib's matrix layout
    (dense; column-major unless transposed); None when the file is not that (then load the model)."""
    stages = sorted((pipeline_path / "stages").glob("0_*/data/*.parquet"))
    if len(stages) != 1:
        return None
    table = pq.read_table(stages[0])
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
    """The batch's embeddings projected onto ``basis`` (float64, rows x m)."""
    flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(batch.num_rows, -1).astype(np.float64) @ basis


@dataclass(frozen=True)
class _ProjectRows:
    """mapInArrow: (id, embedding) batches → (id, pca): the first m components, as float32."""

    basis: Broadcast  # d x m, float64

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


@dataclass(frozen=True)
class _AssignRows:
    """mapInArrow: (id, embedding) batches → (id, cluster, distance), nearest centre first."""

    model: Broadcast  # (basis d x m, centres k x m), float64

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        basis, centers = self.model.value  # fetched once per executor, unpickled once per worker
        center_norms = np.einsum("ij,ij->i", centers, centers)
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            x = _projected(batch, basis)
            # ||x - c||^2 = ||c||^2 - 2 x.c + ||x||^2; the last term does not change the argmin.
            nearest = np.argmin(center_norms[None, :] - 2.0 * (x @ centers.T), axis=1)
            diff = x - centers[nearest]  # the distance itself exactly, not by the expansion
            yield pa.RecordBatch.from_arrays(
                [batch.column("id"), pa.array(nearest.astype(np.int32)),
                 pa.array(np.sqrt(np.einsum("ij,ij->i", diff, diff)))],
                names=["id", "cluster", "distance"])


def assign_to_topics(embeddings: DataFrame, model: TopicModel) -> DataFrame:
    """The ``topics`` rows of ``embeddings`` (id, embedding) under a fitted (or loaded) model:
    each row's nearest centre in the model's PCA space and its distance to it. No refit."""
    spark = embeddings.sparkSession
    shipped = spark.sparkContext.broadcast((model.basis, model.centers))
    return (embeddings.select("id", "embedding")
            .mapInArrow(_AssignRows(shipped), TOPICS_SCHEMA))


def _rows_and_dim(embeddings: DataFrame) -> tuple[int, int]:
    n = embeddings.count()  # reads no column
    if n == 0:
        return 0, 0
    return n, int(embeddings.select(F.size("embedding").alias("d")).first()["d"])  # one row


@dataclass(frozen=True)
class _Fit:
    pipeline: PipelineModel
    centers: np.ndarray
    explained_variance: float
    summary: dict[str, Any]


def _fit(embeddings: DataFrame, n: int, dim: int, settings: TopicsSettings) -> _Fit:
    """MLlib PCA, then MLlib k-means on the sliced projection (see the module doc, steps 2-4)."""
    vectors = embeddings.select(array_to_vector(F.col("embedding")).alias("features"))
    cores = embeddings.sparkSession.sparkContext.defaultParallelism
    if vectors.rdd.getNumPartitions() < cores:  # a table of few files: spread the two PCA passes
        vectors = vectors.repartition(cores)
    pca = PCA(k=dim, inputCol="features", outputCol="pca_full").fit(vectors)
    explained = np.asarray(pca.explainedVariance.toArray())
    m = components_for_variance(explained, settings.variance)
    slicer = VectorSlicer(inputCol="pca_full", outputCol="pca", indices=list(range(m)))
    partitions = kmeans_partitions(n, settings.partition_rows)
    # The same projection as the pipeline's PCAModel + slicer, computed by numpy (the JVM would
    # multiply by all d components and slice afterwards).
    basis = embeddings.sparkSession.sparkContext.broadcast(np.asarray(pca.pc.toArray())[:, :m])
    projected = (embeddings.select("id", "embedding").mapInArrow(_ProjectRows(basis), _PROJECTED_SCHEMA)
                 .repartition(partitions, "id").sortWithinPartitions("id")
                 .persist())
    try:
        k = cluster_count(n, settings.k)
        summary: dict[str, Any] = {"rows": n, "pca_components": m, "kmeans_partitions": partitions}
        if k >= 2:
            kmeans = KMeans(k=k, seed=settings.seed, maxIter=settings.max_iter, tol=settings.tol,
                            initSteps=settings.init_steps, featuresCol="pca",
                            predictionCol="cluster").fit(projected)
            stages = [pca, slicer, kmeans]
            centers = np.array([np.asarray(c) for c in kmeans.clusterCenters()], dtype=np.float64)
            summary.update(kmeans_iterations=kmeans.summary.numIter,
                           kmeans_training_cost=float(kmeans.summary.trainingCost))
        else:
            mean = projected.agg(Summarizer.mean(array_to_vector(F.col("pca"))).alias("m")).first()["m"]
            stages = [pca, slicer]
            centers = np.asarray(mean.toArray(), dtype=np.float64)[None, :]
    finally:
        projected.unpersist()
    summary["k"] = len(centers)  # MLlib returns fewer than k centres when there are fewer distinct rows
    return _Fit(PipelineModel(stages=stages), centers, float(np.nansum(explained[:m])), summary)


def _centroid_rows(topics: DataFrame, embeddings: DataFrame, fit: _Fit, dim: int
                   ) -> tuple[list[dict[str, Any]], float]:
    """Per cluster: size, mean unit embedding, distance statistics (one job, k rows back); and
    the k-means cost of the assignment (sum of squared distances)."""
    stats = {row["cluster"]: row for row in topics.join(embeddings.select("id", "embedding"), "id")
             .groupBy("cluster").agg(
                 F.count(F.lit(1)).alias("size"),
                 Summarizer.mean(array_to_vector(F.col("embedding"))).alias("embedding_center"),
                 F.avg("distance").alias("distance_mean"),
                 F.max("distance").alias("distance_max"),
                 F.sum(F.col("distance") * F.col("distance")).alias("cost"),
                 F.percentile_approx("distance", list(DISTANCE_QUANTILES), 10_000).alias("distance_quantiles"),
             ).collect()}
    k, m = fit.centers.shape
    rows = []
    for cluster, center in enumerate(fit.centers):
        stat = stats.get(cluster)
        rows.append({
            "cluster": cluster, "center": center.tolist(),
            "embedding_center": stat["embedding_center"].toArray().tolist() if stat else [0.0] * dim,
            "size": int(stat["size"]) if stat else 0,
            "k": k, "pca_components": m, "explained_variance": fit.explained_variance, "embedding_dim": dim,
            "distance_mean": float(stat["distance_mean"]) if stat else 0.0,
            "distance_max": float(stat["distance_max"]) if stat else 0.0,
            "distance_quantiles": [float(q) for q in stat["distance_quantiles"]] if stat else [],
        })
    return rows, float(sum(stat["cost"] for stat in stats.values()))


@dataclass(frozen=True)
class TopicsResult:
    """What the topics stage computes: its two tables, the fitted model, a small summary."""

    topics: DataFrame
    centroids: DataFrame
    model: TopicModel | None  # None when there are no rows
    summary: dict[str, Any]


def fit_topics(embeddings: DataFrame, settings: TopicsSettings) -> TopicsResult:
    """Fit the topic model on ``embeddings`` and assign every row. See the module doc.

    ``topics`` comes back cached (id, cluster, distance: small), so writing it does not recompute
    it; the pipeline clears the cache once the stage's tables are written.
    """
    spark = embeddings.sparkSession
    n, dim = _rows_and_dim(embeddings)
    if n == 0:
        return TopicsResult(spark.createDataFrame([], TOPICS_SCHEMA), spark.createDataFrame([], CENTROIDS_SCHEMA),
                            None, {"rows": 0})
    fit = _fit(embeddings, n, dim, settings)
    provisional = TopicModel([{"center": c.tolist()} for c in fit.centers], fitted=fit.pipeline)
    topics = assign_to_topics(embeddings, provisional).persist()
    rows, cost = _centroid_rows(topics, embeddings, fit, dim)
    centroids = spark.createDataFrame(_centroids_arrow(rows), CENTROIDS_SCHEMA)  # k rows, through Arrow
    summary = dict(fit.summary, explained_variance=fit.explained_variance, cost=cost)
    return TopicsResult(topics, centroids, TopicModel(rows, fitted=fit.pipeline), summary)


def assign_topics(embeddings: DataFrame, settings: TopicsSettings) -> tuple[DataFrame, DataFrame]:
    """(``topics``, ``centroids``) for the ``embeddings`` table; the model is not saved."""
    result = fit_topics(embeddings, settings)
    return result.topics, result.centroids


def _centroids_arrow(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=to_arrow_schema(CENTROIDS_SCHEMA))


def save_topic_model(model: TopicModel | None, path: str | Path) -> None:
    """Save ``model`` at ``path``, replacing what is there: ``pipeline`` (the MLlib
    PipelineModel) and ``centroids.parquet`` (k rows, written from the driver); ``None`` (no
    rows) leaves no model behind."""
    target = Path(path).absolute()
    if model is None:
        shutil.rmtree(target, ignore_errors=True)
        return
    model.pipeline.write().overwrite().save(str(target / "pipeline"))
    pq.write_table(_centroids_arrow(model.centroids), target / CENTROIDS_FILE)


def load_topic_model(root: str | Path) -> TopicModel:
    """The topic model the topics stage saved under run root ``root`` (needs an active session)."""
    path = topic_model_path(root)
    if not (path / CENTROIDS_FILE).is_file() or not (path / "pipeline").is_dir():
        raise FileNotFoundError(f"no topic model under {path}; run the topics stage first")
    return TopicModel(pq.read_table(path / CENTROIDS_FILE).to_pylist(), path=path)  # k rows: small


class Topics(Stage):
    """embeddings → topics, centroids (+ the fitted model under the run root)."""

    name = "topics"
    inputs = ("embeddings",)
    outputs = ("topics", "centroids")
    settings_sections = ("topics",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        result = fit_topics(tables["embeddings"], ctx.settings.topics)
        save_topic_model(result.model, topic_model_path(ctx.store.root))
        return StageOutput({"topics": result.topics, "centroids": result.centroids}, result.summary)
