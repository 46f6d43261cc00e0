"""Dedup stage: drop near-duplicate instructions, inside each topic and across close topics.

Space: similarity is the cosine of the unit embeddings in the model's own space (a dot
product), not in the PCA space. The threshold (0.95 by default) is a statement about the model's
similarity; PCA drops 5% of the variance, and cosines between the truncated vectors come out
higher than the model's, so the same threshold would merge more than it says. The PCA space is
used only where k-means geometry is meant: ``topics.distance`` orders rows for the keep rule and
decides which rows are "far" from their centroid.

Keep rule (per cluster, ``groupBy("cluster").applyInPandas``): rows are visited in keep order,
nearest to their centroid first (``topics.distance`` ascending, ties by ``id``). A row whose
cosine similarity with a row already kept is >= ``threshold`` is a duplicate and points at the
most similar kept row (ties: the one earlier in keep order); any other row is kept. So:
- a duplicate always points at a kept row (never at another duplicate), with similarity >=
  threshold;
- within each duplicate set (a kept row and the rows pointing at it) the kept row is the member
  closest to the centroid, ties by id;
- kept rows of a cluster are pairwise below the threshold.
Work is blockwise: rows are taken ``block_size`` at a time and compared with the rows kept so far
in chunks of ``block_size``, so no similarity matrix larger than block_size x block_size is ever
built, however big the cluster. Within a block, rows with no earlier same-block neighbour over
the threshold are settled with array operations; only rows that do have one (near-duplicate
candidates, few) are settled one by one, because "kept so far" depends on the earlier ones.

Cross-cluster check (``cross_cluster``): k-means can split a duplicate pair across a border.
Rows on the border are the far ones: distance to their centroid above the ``cross_cluster_quantile``
of their cluster's distances. Each far row still kept after the first pass becomes a probe: the
centroid matrix (``centroids.embedding_center``, k x d, a few hundred KB) is collected and shipped
to the executors once as a broadcast variable (``sparkContext.broadcast``); a ``mapInArrow``
pass reads it there and sends each probe to its ``cross_cluster_neighbours`` nearest other
clusters (Euclidean distance in the model's space, the same space as the similarity). In each
cluster (``applyInPandas`` again) probes are compared, blockwise, with that cluster's kept rows
that are not far. A probe that reaches the threshold with one of them becomes a duplicate of the
most similar one (over all its neighbour clusters). Targets are never probes, so a target stays
kept and no chain forms; rows that pointed at a probe that turned duplicate are re-pointed at the
probe's target, with their similarity to that target recomputed (it can be below the threshold:
they are duplicates of a duplicate of it). Pairs where both rows are far are not compared across
clusters; that is the price of a result without chains and without a global graph pass.

Computed once: four consumers read the first pass (the kept rows, the probes, the direct and the
re-pointed results). It is cached (no vectors: some 100 bytes a row) and materialised before any
of them runs, so they all see one result and its Python pass runs once; the probe matches (two
consumers) are cached too. The pipeline clears both caches once ``dedup`` is written. The rows to
re-point are few, so they are broadcast and the embeddings are scanned, not shuffled, for them.

Table ``dedup``: ``id``, ``cluster`` (the row's own topic), ``status`` (``kept``/``duplicate``),
``duplicate_of`` (the kept row's id; null when kept), ``similarity`` (cosine to it; null when
kept). Every embedding row appears exactly once: kept + duplicate = rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..config import DedupSettings
from ..tables import Write
from . import Stage, StageContext, StageOutput, with_added

KEPT = "kept"
DUPLICATE = "duplicate"

DEDUP_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("cluster", T.IntegerType(), False),
    T.StructField("status", T.StringType(), False),
    T.StructField("duplicate_of", T.StringType(), True),
    T.StructField("similarity", T.DoubleType(), True),
])
_FIRST_PASS_SCHEMA = T.StructType(list(DEDUP_SCHEMA.fields) + [T.StructField("far", T.BooleanType(), False)])
ROUTED_SCHEMA = "target_cluster int, role string, id string, embedding array<float>"
_MATCH_SCHEMA = T.StructType([
    T.StructField("probe_id", T.StringType(), False),
    T.StructField("target_id", T.StringType(), False),
    T.StructField("match_similarity", T.DoubleType(), False),
])


def embedding_matrix(column: pd.Series) -> np.ndarray:
    """The rows of an array<float> column as one float32 matrix (n x d)."""
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(column.to_numpy()).astype(np.float32, copy=False)


def leader_dedup(vectors: np.ndarray, threshold: float, block_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy leader dedup of unit ``vectors`` given in keep order (best first).

    Returns (kept: bool[n], duplicate_of: int[n] position of the kept row or -1,
    similarity: float[n] or NaN). See the module doc for the rule; blocks are at most
    ``block_size`` x ``block_size``.
    """
    n = vectors.shape[0]
    kept = np.zeros(n, dtype=bool)
    target = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan, dtype=np.float64)
    kept_positions = np.zeros(0, dtype=np.int64)
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        block = vectors[start:stop]
        size = stop - start
        # Best earlier kept row from previous blocks, a chunk of kept rows at a time.
        best_sim = np.full(size, -np.inf, dtype=np.float64)
        best_pos = np.full(size, -1, dtype=np.int64)
        for chunk_start in range(0, kept_positions.size, block_size):
            chunk = kept_positions[chunk_start:chunk_start + block_size]
            sims = block @ vectors[chunk].T
            arg = sims.argmax(axis=1)
            top = sims[np.arange(size), arg].astype(np.float64)
            better = top > best_sim  # strict: on a tie the earlier (better-ranked) kept row stays
            best_sim[better] = top[better]
            best_pos[better] = chunk[arg[better]]
        pre_duplicate = best_sim >= threshold

        inner = block @ block.T
        earlier = np.tri(size, size, k=-1, dtype=bool)  # [i, j] true when j comes before i
        close = (inner >= threshold) & earlier
        close[:, pre_duplicate] = False  # a duplicate is never a leader
        close[pre_duplicate, :] = False  # already decided
        contested = close.any(axis=1)
        block_kept = ~pre_duplicate & ~contested
        # Only near-duplicate candidates are settled in order: each depends on earlier ones.
        for i in np.flatnonzero(contested):
            if not (close[i] & block_kept).any():
                block_kept[i] = True

        # Every duplicate points at its most similar earlier kept row, this block's or before.
        in_block = np.where(earlier & block_kept[None, :], inner, -np.inf)
        in_arg = in_block.argmax(axis=1)
        in_sim = in_block[np.arange(size), in_arg].astype(np.float64)
        use_inner = in_sim > best_sim
        dup = ~block_kept
        pointer = np.where(use_inner, start + in_arg, best_pos)
        pointer_sim = np.where(use_inner, in_sim, best_sim)
        kept[start:stop] = block_kept
        target[start:stop] = np.where(dup, pointer, -1)
        similarity[start:stop] = np.where(dup, pointer_sim, np.nan)
        kept_positions = np.concatenate([kept_positions, start + np.flatnonzero(block_kept)])
    return kept, target, similarity


def keep_order(distance: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions sorted nearest-to-centroid first, ties by id."""
    return np.lexsort((np.asarray(ids, dtype=str), distance))


@dataclass(frozen=True)
class _DedupCluster:
    """First pass: one cluster's rows (id, cluster, distance, embedding) → dedup rows + far flag."""

    threshold: float
    block_size: int
    far_quantile: float

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        ids = frame["id"].to_numpy(dtype=object)
        distance = frame["distance"].to_numpy(dtype=np.float64)
        order = keep_order(distance, ids)
        ids, distance = ids[order], distance[order]
        vectors = embedding_matrix(frame["embedding"])[order]
        kept, target, similarity = leader_dedup(vectors, self.threshold, self.block_size)
        far = distance > np.quantile(distance, self.far_quantile)
        duplicate_of = np.where(kept, None, ids[np.maximum(target, 0)])
        return pd.DataFrame({
            "id": ids,
            "cluster": np.full(len(ids), frame["cluster"].iloc[0], dtype=np.int32),
            "status": np.where(kept, KEPT, DUPLICATE),
            "duplicate_of": duplicate_of,
            "similarity": similarity,
            "far": far,
        })


@dataclass(frozen=True)
class RouteProbes:
    """mapInArrow: each probe row (id, cluster, embedding) to its ``neighbours`` nearest other
    clusters by the broadcast centroid matrix, and to its own cluster too when ``home``."""

    centers: Broadcast
    neighbours: int
    home: bool = False

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        clusters, matrix = self.centers.value  # fetched once per executor, unpickled once per worker
        squared_norms = (matrix.astype(np.float64) ** 2).sum(axis=1)
        take = min(self.neighbours, max(0, clusters.size - 1))
        for batch in batches:
            n = batch.num_rows
            if n == 0 or (take == 0 and not self.home):
                continue
            embedding = batch.column("embedding")
            home = batch.column("cluster").to_numpy(zero_copy_only=False).astype(np.int32)
            routed = [home[:, None]] if self.home else []
            if take:
                vectors = embedding.flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
                # ||x - c||^2 up to the constant ||x||^2, which does not change the ranking.
                dist = squared_norms[None, :] - 2.0 * (vectors.astype(np.float64) @ matrix.T.astype(np.float64))
                dist[clusters[None, :] == home[:, None]] = np.inf
                routed.append(clusters[np.argsort(dist, axis=1, kind="stable")[:, :take]].astype(np.int32))
            targets = np.concatenate(routed, axis=1)
            rows = pa.array(np.repeat(np.arange(n), targets.shape[1]))
            yield pa.RecordBatch.from_pydict({
                "target_cluster": pa.array(targets.reshape(-1)),
                "role": pa.array(np.full(len(rows), "probe", dtype=object), pa.string()),
                "id": batch.column("id").take(rows),
                "embedding": embedding.take(rows),
            })


@dataclass(frozen=True)
class _MatchProbes:
    """In one cluster: each probe's most similar target, when at or above the threshold."""

    threshold: float
    block_size: int

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        probes = frame[frame["role"] == "probe"]
        targets = frame[frame["role"] == "target"].sort_values("id", kind="stable")
        if probes.empty or targets.empty:
            return pd.DataFrame({"probe_id": pd.Series([], dtype=object), "target_id": pd.Series([], dtype=object),
                                 "match_similarity": pd.Series([], dtype=np.float64)})
        p = embedding_matrix(probes["embedding"])
        t = embedding_matrix(targets["embedding"])
        best_sim = np.full(len(p), -np.inf)
        best_pos = np.full(len(p), -1, dtype=np.int64)
        for ps in range(0, len(p), self.block_size):
            block = p[ps:ps + self.block_size]
            rows = np.arange(block.shape[0])
            for ts in range(0, len(t), self.block_size):
                sims = block @ t[ts:ts + self.block_size].T
                arg = sims.argmax(axis=1)
                top = sims[rows, arg].astype(np.float64)
                better = top > best_sim[ps:ps + len(block)]
                best_sim[ps:ps + len(block)][better] = top[better]
                best_pos[ps:ps + len(block)][better] = ts + arg[better]
        hit = best_sim >= self.threshold
        return pd.DataFrame({
            "probe_id": probes["id"].to_numpy(dtype=object)[hit],
            "target_id": targets["id"].to_numpy(dtype=object)[best_pos[hit]],
            "match_similarity": best_sim[hit],
        })


def broadcast_centers(centroids: DataFrame) -> Broadcast | None:
    """(cluster ids, k x d centres) of the non-empty clusters, broadcast; None when there is
    none. Collects k rows."""
    rows = centroids.filter(F.col("size") > 0).select("cluster", "embedding_center").orderBy("cluster").collect()
    if not rows:
        return None
    return centroids.sparkSession.sparkContext.broadcast((
        np.array([r["cluster"] for r in rows], dtype=np.int32),
        np.array([r["embedding_center"] for r in rows], dtype=np.float32).reshape(len(rows), -1)))


def matches_per_cluster(probes: DataFrame, targets: DataFrame, threshold: float, block_size: int) -> DataFrame:
    """Each probe's most similar target at or above ``threshold`` in each cluster it was routed
    to (ties: the smaller target id): (probe_id, target_id, match_similarity), up to one row per
    probe and target cluster. ``probes`` come from :class:`RouteProbes`; ``targets`` are
    (target_cluster, id, embedding)."""
    targets = (targets.join(probes.select("target_cluster").distinct(), "target_cluster", "left_semi")
               .select("target_cluster", F.lit("target").alias("role"), "id", "embedding"))
    match_probes = _MatchProbes(threshold, block_size)
    return (probes.unionByName(targets).groupBy("target_cluster")
            .applyInPandas(lambda frame: match_probes(frame), _MATCH_SCHEMA))


def best_matches(probes: DataFrame, targets: DataFrame, threshold: float, block_size: int) -> DataFrame:
    """Each probe's most similar target at or above ``threshold`` among the targets of the
    clusters it was routed to: (probe_id, target_id, match_similarity), one row per matched
    probe (ties: the smaller target id); :func:`matches_per_cluster` reduced over the clusters."""
    matches = matches_per_cluster(probes, targets, threshold, block_size)
    best = Window.partitionBy("probe_id").orderBy(F.col("match_similarity").desc(), F.col("target_id"))
    return matches.withColumn("n", F.row_number().over(best)).filter("n = 1").drop("n")


def _dot(a: F.Column, b: F.Column) -> F.Column:
    return F.aggregate(F.zip_with(a, b, lambda x, y: (x * y).cast("double")), F.lit(0.0), lambda acc, v: acc + v)


def find_duplicates(embeddings: DataFrame, topics: DataFrame, centroids: DataFrame,
                    settings: DedupSettings) -> DataFrame:
    """The ``dedup`` table. Collects only the centroid matrix (k rows); see the module doc."""
    rows = topics.select("id", "cluster", "distance").join(embeddings.select("id", "embedding"), "id")
    dedup_cluster = _DedupCluster(settings.threshold, settings.block_size, settings.cross_cluster_quantile)
    # A one-argument function: applyInPandas reads the arity (a callable object's includes self).
    first = rows.groupBy("cluster").applyInPandas(lambda frame: dedup_cluster(frame), _FIRST_PASS_SCHEMA)
    columns = [f.name for f in DEDUP_SCHEMA.fields]
    if not settings.cross_cluster or settings.cross_cluster_neighbours == 0:
        return first.select(*columns)
    # Four consumers read the first pass (kept rows, probes, direct, moved): computed once here
    # and cached (small: no vectors), so they all see one result and the Python pass runs once.
    first = first.persist(StorageLevel.MEMORY_AND_DISK)
    first.count()  # materialise now; the pipeline clears the cache once the table is written

    centers = broadcast_centers(centroids)
    if centers is None or len(centers.value[0]) < 2:
        return first.select(*columns)

    kept = first.filter(F.col("status") == KEPT).join(embeddings.select("id", "embedding"), "id")
    probes = (kept.filter("far").select("id", "cluster", "embedding")
              .mapInArrow(RouteProbes(centers, settings.cross_cluster_neighbours), ROUTED_SCHEMA))
    targets = kept.filter(~F.col("far")).select(F.col("cluster").alias("target_cluster"), "id", "embedding")
    matches = best_matches(probes, targets, settings.threshold, settings.block_size)
    # Two consumers (direct, moved): cached too, so the probe pass also runs once.
    matches = matches.persist()

    # Probes that matched become duplicates of their target.
    direct = (first.join(matches, first["id"] == matches["probe_id"], "left")
              .select("id", "cluster",
                      F.when(F.col("target_id").isNotNull(), F.lit(DUPLICATE)).otherwise(F.col("status")).alias("status"),
                      F.coalesce("target_id", "duplicate_of").alias("duplicate_of"),
                      F.coalesce("match_similarity", "similarity").alias("similarity")))
    # Rows that pointed at such a probe now point at the probe's target. They are few (followers
    # of the far rows that matched), so they are broadcast and the embeddings are only scanned,
    # never shuffled, to fetch the two vectors of each.
    vectors = embeddings.select("id", "embedding")
    followers = (first.filter(F.col("status") == DUPLICATE)
                 .join(matches, F.col("duplicate_of") == F.col("probe_id"))
                 .select("id", "target_id"))
    with_own = vectors.withColumnRenamed("embedding", "own").join(F.broadcast(followers), "id")
    moved = (vectors.select(F.col("id").alias("target_id"), F.col("embedding").alias("theirs"))
             .join(F.broadcast(with_own), "target_id")
             .select("id", F.col("target_id").alias("moved_to"), _dot(F.col("own"), F.col("theirs")).alias("moved_similarity")))
    return (direct.join(moved, "id", "left")
            .select("id", "cluster", "status",
                    F.coalesce("moved_to", "duplicate_of").alias("duplicate_of"),
                    F.coalesce("moved_similarity", "similarity").alias("similarity")))


class Dedup(Stage):
    """embeddings, topics, centroids → dedup."""

    name = "dedup"
    inputs = ("embeddings", "topics", "centroids")
    outputs = ("dedup",)
    settings_sections = ("dedup",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        return StageOutput({"dedup": find_duplicates(tables["embeddings"], tables["topics"],
                                                     tables["centroids"], ctx.settings.dedup)})

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """The new rows against the kept rows of their own and neighbouring clusters, then the
        touched clusters' one pass (``cluster_increment``: dedup, selection extension, groups),
        cached and counted once, handed down to the select and group stages."""
        from .cluster_increment import CARRY, COUNTS, curate_new_rows, curated_rows
        curated = curate_new_rows(added["topics"], with_added(tables, added, "embeddings", cache=True),
                                  {t: tables[t] for t in ("dedup", "selected", "merge_groups", "centroids")},
                                  ctx.settings).persist(StorageLevel.MEMORY_AND_DISK)
        found = {(r["table"], r["status"]): r["count"] for r in curated.groupBy("table", "status").count().collect()}
        counts = {"new_kept": found.get(("dedup", KEPT), 0), "new_duplicates": found.get(("dedup", DUPLICATE), 0)}
        rows = {table: sum(n for (t, _), n in found.items() if t == table) for table in ("selected", "merge_groups")}
        return StageOutput({"dedup": Write.append(curated_rows(curated, "dedup"), sum(counts.values()))},
                           summary={"counts": counts}, carry={CARRY: curated, COUNTS: rows})
