"""Topics stage: PCA to the variance target, then MLlib k-means; the fitted model is saved.

The model is ``models.py``'s estimator/model pair: ``TopicClustering`` fits (steps 1-4 below),
``TopicModel`` assigns rows (step 5), saves and loads. This module builds the stage's tables.

Spaces: the embeddings are unit vectors in the model's space (384-d for all-MiniLM-L6-v2).
k-means runs in the PCA space: the fewest principal components that explain
``settings.topics.variance`` of the variance (95% by default, as in MergeIT). Dropping the
low-variance tail removes dimensions that carry little topic signal and makes every k-means
iteration cheaper. ``topics.distance`` is the Euclidean distance to the row's centroid in that
same PCA space, so it is exactly the quantity k-means minimises.

How, pass by pass (n rows, d model dimensions, m kept components):
1. One small job counts the rows and reads d. Above ``settings.topics.fit_rows_per_cluster`` x k
   rows (256 per cluster), steps 2-4 see a sample of about that many, the rows whose id hashes
   (xxhash64, seeded) under that share of n: the same rows whatever the partitioning, so a rerun
   or a bigger cluster fits the same model. k follows all n rows, and step 5 assigns every row, so
   the cost the stage reports (``summary.cost``, the sum of squared distances) is over all of
   them; ``summary.kmeans_training_cost`` is the sample's. Placing k centres takes a few hundred
   rows per centre, not all of them, so the sample grows with k (as sqrt(n) under the paper's
   rule) while the work it saves grows with n.
2. PCA with all d components (which gives the explained-variance curve), by ``pca.py``: one pass
   over the embeddings as they are read (spread over the cores first when the table has fewer
   files than that) sums each partition's scatter matrix, numpy's symmetric eigensolver on the
   driver decomposes the d x d total, and the result is an MLlib ``PCAModel``. Not MLlib's own
   ``PCA.fit``: its pure-Java SVD can return non-orthonormal components on a rank-deficient
   covariance (fewer rows than d), without an error. Nothing is cached for this pass.
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
5. Rows are assigned by ``TopicModel.transform``: one ``mapInArrow`` pass over the embeddings
   with the basis (d x m) and the centres (k x m) broadcast, numpy computing the projection, the
   nearest centre and the distance to it (float64: float32 moves rows near a tie between two
   centres). The result is cached (id, cluster, distance:
   small) so the per-cluster statistics and the table write share it.
6. Two aggregations give each cluster's size and distance statistics (from the cached
   assignment) and its mean unit embedding (``TopicModel.cluster_sums``: each Arrow batch of the
   embeddings assigned again in numpy and summed per cluster, the partial sums added by
   cluster): k rows each to the driver, and no join of the assignment back to the embeddings.

The fitted model is saved under the run root (``<root>/_models/topics``, ``TopicModel.save``):
``pipeline`` is an MLlib ``PipelineModel`` (``PCAModel`` with all components, a ``VectorSlicer``
keeping the first m, ``KMeansModel`` when k >= 2), loadable by any Spark (input column
``features``, a vector; output ``cluster``); ``centroids.parquet`` holds the centroids rows below
(k rows, written from the driver). ``TopicModel.load`` and ``TopicModel.transform`` put later rows
in the same topics without refitting.

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

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.ml.functions import array_to_vector
from pyspark.ml.stat import Summarizer
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ..config import TopicsSettings
from ..models import CENTROIDS_SCHEMA, TOPICS_SCHEMA, TopicClustering, TopicModel, rows_and_dim
from ..tables import Write
from . import Stage, StageContext, StageOutput

log = logging.getLogger("mergeit.topics")

MODEL_NAME = "topics"  # the store saves it under <root>/_models/topics
DISTANCE_QUANTILES = (0.5, 0.9, 0.99)


def _centroid_rows(topics: DataFrame, embeddings: DataFrame, model: TopicModel, dim: int
                   ) -> tuple[list[dict[str, Any]], float]:
    """The model's centroid rows with, per cluster: size, mean unit embedding, distance
    statistics (two jobs, k rows back each; no join of the assignment to the embeddings); and the
    k-means cost of the assignment (sum of squared distances)."""
    stats = {row["cluster"]: row for row in topics.groupBy("cluster").agg(
                 F.count(F.lit(1)).alias("size"),
                 F.avg("distance").alias("distance_mean"),
                 F.max("distance").alias("distance_max"),
                 F.sum(F.col("distance") * F.col("distance")).alias("cost"),
                 F.percentile_approx("distance", list(DISTANCE_QUANTILES), 10_000).alias("distance_quantiles"),
             ).collect()}
    sums = {row["cluster"]: row["embedding_sum"].toArray() / row["rows"] for row in
            model.cluster_sums(embeddings).groupBy("cluster").agg(
                F.sum("rows").alias("rows"),
                Summarizer.sum(array_to_vector(F.col("embedding_sum"))).alias("embedding_sum")).collect()}
    rows = []
    for fitted in model.centroids:
        stat = stats.get(fitted["cluster"])
        rows.append({
            "cluster": fitted["cluster"], "center": fitted["center"],
            "embedding_center": sums[fitted["cluster"]].tolist() if stat else [0.0] * dim,
            "size": int(stat["size"]) if stat else 0,
            "k": fitted["k"], "pca_components": fitted["pca_components"],
            "explained_variance": fitted["explained_variance"], "embedding_dim": fitted["embedding_dim"],
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
    n, dim = rows_and_dim(embeddings)
    if n == 0:
        return TopicsResult(spark.createDataFrame([], TOPICS_SCHEMA), spark.createDataFrame([], CENTROIDS_SCHEMA),
                            None, {"rows": 0})
    fitted = TopicClustering.from_settings(settings).fit(embeddings, size=(n, dim))
    topics = fitted.transform(embeddings).persist()
    rows, cost = _centroid_rows(topics, embeddings, fitted, dim)
    model = fitted.with_centroids(rows)
    centroids = spark.createDataFrame(model.centroids_arrow(), CENTROIDS_SCHEMA)  # k rows, through Arrow
    return TopicsResult(topics, centroids, model, dict(fitted.summary, cost=cost))


def assign_topics(embeddings: DataFrame, settings: TopicsSettings) -> tuple[DataFrame, DataFrame]:
    """(``topics``, ``centroids``) for the ``embeddings`` table; the model is not saved."""
    result = fit_topics(embeddings, settings)
    return result.topics, result.centroids


def grown_centroids(centroids: pa.Table, added: dict[int, int]) -> pa.Table:
    """``centroids`` (its k rows) with ``size`` plus the rows ``added`` to each cluster; the
    fitted centres and distance statistics stay."""
    size = centroids.schema.get_field_index("size")
    grown = pc.add(centroids.column(size), pa.array([added.get(c, 0) for c in centroids.column("cluster").to_pylist()],
                                                     type=centroids.schema.field(size).type))
    return centroids.set_column(size, centroids.schema.field(size), grown)


class Topics(Stage):
    """embeddings → topics, centroids, and the fitted topic model (saved under the run root)."""

    name = "topics"
    version = "3"  # 2: fit on a sample above topics.fit_rows_per_cluster x k; 3: PCA by pca.py
    inputs = ("embeddings",)
    outputs = ("topics", "centroids")
    settings_sections = ("topics",)
    refits = True
    extends_from_tables = True  # the new embeddings, read back once embed's append is done

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        result = fit_topics(tables["embeddings"], ctx.settings.topics)
        return StageOutput({"topics": result.topics, "centroids": result.centroids}, result.summary,
                           models={MODEL_NAME: result.model})

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """The saved model assigns the new embeddings (no refit); ``centroids.size`` grows by
        each cluster's new rows (k rows, rewritten from the driver). The summary holds the drift:
        the share of new rows beyond their cluster's ``incremental.drift_quantile`` of the fitted
        rows' distances (see :mod:`mergeit_spark.incremental`, step 3)."""
        from ..incremental import arrivals_by_cluster, drift_of
        model = TopicModel.load(ctx.store.model_path(MODEL_NAME))
        assigned = model.transform(added["embeddings"]).persist()
        settings = ctx.settings.incremental
        slot = DISTANCE_QUANTILES.index(settings.drift_quantile) + 1
        arrivals = arrivals_by_cluster(assigned, tables["centroids"], slot)
        drift = drift_of(arrivals, settings.drift_quantile)
        drift["alarm_share"] = settings.drift_alarm_share
        drift["recluster_advised"] = drift["share"] > settings.drift_alarm_share
        if drift["recluster_advised"]:
            log.warning("incremental: %.1f%% of the new rows lie beyond their cluster's p%g distance "
                        "(alarm at %.1f%%): full re-cluster advised (mergeit run --incremental --recluster)",
                        100 * drift["share"], 100 * drift["quantile"], 100 * drift["alarm_share"])
        writes: dict[str, Any] = {"topics": Write.append(assigned, drift["rows"])}
        if drift["rows"]:
            sizes = {cluster: n for cluster, (n, _) in arrivals.items()}
            writes["centroids"] = Write.overwrite(grown_centroids(ctx.store.read_small("centroids"), sizes))
        return StageOutput(writes, summary={"drift": drift, "counts": {"assigned": drift["rows"]}})
