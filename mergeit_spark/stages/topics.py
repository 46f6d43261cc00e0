"""Topics stage: PCA to the variance target, then k-means, both MLlib.

Spaces: the embeddings are unit vectors in the model's space (384-d for all-MiniLM-L6-v2).
k-means runs in the PCA space: the fewest principal components that explain
``settings.topics.variance`` of the variance (95% by default, as in MergeIT). Dropping the
low-variance tail removes dimensions that carry little topic signal and makes every k-means
iteration cheaper. ``topics.distance`` is the Euclidean distance to the row's centroid in that
same PCA space, so it is exactly the quantity k-means minimises.

How: MLlib ``PCA`` is fitted once with all components, which gives the explained-variance curve;
the projection keeps the first m components by slicing the full projection (``VectorSlicer``)
rather than fitting again. MLlib ``KMeans`` with a fixed seed then clusters the projected rows.
k is ``settings.topics.k`` when set, else the paper's rule int(sqrt(n / 2)); either way at least
1 and at most n. MLlib's KMeans needs k >= 2, so k = 1 is one cluster whose centre is the mean.

Tables:
- ``topics``: ``id``, ``cluster`` (int), ``distance`` (double, to its centroid in PCA space).
- ``centroids``: one row per cluster, small (k rows), built on the driver from the fitted model:
  ``cluster`` (int), ``center`` (array<double>, PCA space, length ``pca_components``),
  ``embedding_center`` (array<double>, the mean of the cluster's unit embeddings in the model's
  space; dedup ranks clusters by it for its cross-cluster check), ``size`` (long, rows
  assigned; 0 for a centre k-means left empty), and run metadata repeated on every row for the
  report: ``k`` (int, clusters fitted), ``pca_components`` (int), ``explained_variance`` (double,
  cumulative share of variance the kept components explain), ``embedding_dim`` (int).
"""
from __future__ import annotations

import math

import numpy as np
from pyspark.ml.clustering import KMeans
from pyspark.ml.feature import PCA, VectorSlicer
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.ml.stat import Summarizer
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..config import TopicsSettings
from . import Stage, StageContext

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


def _squared_distance(a: F.Column, b: F.Column) -> F.Column:
    """Squared Euclidean distance between two array<double> columns, in Spark SQL (no Python)."""
    return F.aggregate(F.zip_with(a, b, lambda x, y: (x - y) * (x - y)), F.lit(0.0), lambda acc, v: acc + v)


def assign_topics(embeddings: DataFrame, settings: TopicsSettings) -> tuple[DataFrame, DataFrame]:
    """(``topics``, ``centroids``) for the ``embeddings`` table. See the module doc for both."""
    spark = embeddings.sparkSession
    # k-means|| samples its seeds partition by partition, so the same seed gives the same
    # clusters only if rows arrive in the same partitions in the same order. Files read back
    # from Delta come in no fixed order; hash-partitioning by id (an explicit count, which AQE
    # leaves alone) and sorting makes a rerun or a resumed run cluster exactly as the first did.
    partitions = int(spark.conf.get("spark.sql.shuffle.partitions"))
    vectors = (embeddings.select("id", array_to_vector(F.col("embedding")).alias("features"))
               .repartition(partitions, "id").sortWithinPartitions("id"))
    n = vectors.count()
    if n == 0:
        return (spark.createDataFrame([], TOPICS_SCHEMA), spark.createDataFrame([], CENTROIDS_SCHEMA))
    dim = embeddings.select(F.size("embedding").alias("d")).first()["d"]  # one row: small

    pca = PCA(k=dim, inputCol="features", outputCol="pca_full").fit(vectors)
    explained = np.asarray(pca.explainedVariance.toArray())
    m = components_for_variance(explained, settings.variance)
    explained_at_m = float(np.nansum(explained[:m]))
    slicer = VectorSlicer(inputCol="pca_full", outputCol="pca", indices=list(range(m)))
    projected = slicer.transform(pca.transform(vectors)).select("id", "features", "pca")
    projected = projected.persist()
    try:
        k = cluster_count(n, settings.k)
        if k >= 2:
            model = KMeans(k=k, seed=settings.seed, maxIter=settings.max_iter, tol=settings.tol,
                           featuresCol="pca", predictionCol="cluster").fit(projected)
            centers = [np.asarray(c, dtype=np.float64) for c in model.clusterCenters()]
            assigned = model.transform(projected).withColumn("cluster", F.col("cluster").cast("int"))
        else:
            mean = projected.agg(Summarizer.mean(F.col("pca")).alias("m")).first()["m"]
            centers = [np.asarray(mean.toArray(), dtype=np.float64)]
            assigned = projected.withColumn("cluster", F.lit(0).cast("int"))

        # Per-cluster size and mean unit embedding: k rows come back to the driver.
        stats = {row["cluster"]: row for row in assigned.groupBy("cluster").agg(
            F.count(F.lit(1)).alias("size"),
            Summarizer.mean(F.col("features")).alias("embedding_center"),
        ).collect()}
        rows = []
        for cluster, center in enumerate(centers):
            stat = stats.get(cluster)
            embedding_center = (stat["embedding_center"].toArray().tolist() if stat is not None
                                else [0.0] * dim)
            rows.append((cluster, center.tolist(), embedding_center,
                         int(stat["size"]) if stat is not None else 0,
                         len(centers), m, explained_at_m, int(dim)))
        centroids = spark.createDataFrame(rows, CENTROIDS_SCHEMA)

        topics = (assigned
                  .join(F.broadcast(centroids.select("cluster", "center")), "cluster")
                  .select("id", "cluster",
                          F.sqrt(_squared_distance(vector_to_array(F.col("pca"), "float64"),
                                                   F.col("center"))).alias("distance")))
    finally:
        # The returned plan recomputes the projection from the source when written; keeping
        # the cache past the stage would pin it for the whole session.
        projected.unpersist()
    return topics, centroids


class Topics(Stage):
    """embeddings → topics, centroids."""

    name = "topics"
    inputs = ("embeddings",)
    outputs = ("topics", "centroids")
    settings_sections = ("topics",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> dict[str, DataFrame]:
        topics, centroids = assign_topics(tables["embeddings"], ctx.settings.topics)
        return {"topics": topics, "centroids": centroids}
