"""Dedup stage: drop near-duplicate instructions, inside each topic and across close topics.

Space: similarity is the cosine of the unit embeddings in the model's own space (a dot
product), not in the PCA space. The threshold (0.95 by default) is a statement about the model's
similarity; PCA drops 5% of the variance, and cosines between the truncated vectors come out
higher than the model's, so the same threshold would merge more than it says. The PCA space is
used only where k-means geometry is meant: ``topics.distance`` orders rows for the keep rule and
decides which rows are "far" from their centroid.

Two measures (``dedup.minhash``: both; off: the semantic one alone). **Semantic**: cosine >=
``threshold``. **Lexical** (:mod:`mergeit_spark.minhash`): the texts' word-shingle sets (the text
the embedding is made from, ``instruction + " " + input``, normalised) have a verified Jaccard
similarity >= ``minhash_threshold``; candidates come from MinHash signatures with LSH banding,
computed in the executors, each cluster's texts once. It finds the near-copies embeddings miss
(a prefix such as "Please answer:", dropped words). Templated texts (most shingles shared by
several rows of their cluster: a tool preamble) take no part in it (see that module).

Keep rule (per cluster, ``groupBy("cluster").applyInPandas``): rows are visited in keep order,
nearest to their centroid first (``topics.distance`` ascending, ties by ``id``). A row that is a
near-duplicate, by either measure, of a row already kept is a duplicate; any other row is kept.
A duplicate points at the kept row of highest cosine when that cosine reaches ``threshold``
(``method`` ``semantic``, ``similarity`` the cosine), else at the kept row of highest Jaccard
(``method`` ``lexical``, ``similarity`` the Jaccard); ties: the one earlier in keep order. The
semantic match is preferred because the two scales do not compare (a cosine of 0.96 is no
"less similar" than a Jaccard of 0.97), and so a row the semantic pass alone flags points where
it pointed before. So:
- a duplicate always points at a kept row (never at another duplicate), with similarity >= its
  method's threshold;
- within each duplicate set (a kept row and the rows pointing at it) the kept row is the member
  closest to the centroid, ties by id;
- kept rows of a cluster are pairwise below both thresholds.
Work is blockwise: rows are taken ``block_size`` at a time and compared with the rows kept so far
in chunks of ``block_size``, so no similarity matrix larger than block_size x block_size is ever
built, however big the cluster. Within a block, rows with no earlier same-block neighbour over
the threshold are settled with array operations; only rows that do have one (near-duplicate
candidates, few) are settled one by one, because "kept so far" depends on the earlier ones. The
lexical measure follows the same blocks: two rows are candidates when they share a band's hash
(compared block against chunk like the cosines, at a cost of ``minhash_bands`` comparisons per
pair instead of a 384-long dot product), and only candidates get their exact Jaccard computed.

Cross-cluster check (``cross_cluster``): k-means can split a duplicate pair across a border.
Rows on the border are the far ones: distance to their centroid above the ``cross_cluster_quantile``
of their cluster's distances. Each far row still kept after the first pass becomes a probe: the
centroid matrix (``centroids.embedding_center``, k x d, a few hundred KB) is collected and shipped
to the executors (:func:`~mergeit_spark.session.ship`: a broadcast variable in a classic session,
the ``mapInArrow`` function's closure under Spark Connect); a ``mapInArrow`` pass reads it there and sends each probe to its ``cross_cluster_neighbours`` nearest other
clusters (Euclidean distance in the model's space, the same space as the similarity). In each
cluster (``applyInPandas`` again) probes are compared, blockwise, with that cluster's kept rows
that are not far. A probe that reaches the threshold with one of them becomes a duplicate of the
most similar one (over all its neighbour clusters). Targets are never probes, so a target stays
kept and no chain forms; rows that pointed at a probe that turned duplicate are re-pointed at the
probe's target, with their similarity to that target recomputed (it can be below the threshold:
they are duplicates of a duplicate of it). Pairs where both rows are far are not compared across
clusters; that is the price of a result without chains and without a global graph pass.

Lexical pairs across clusters (``cross_cluster`` with the lexical pass on): near-copies whose
embeddings fall either side of a border are found by LSH over every cluster's kept rows, after
the semantic check: each such row's band hashes are exploded and joined on (band, hash) with
other clusters' rows; each candidate pair is verified by the exact Jaccard of the two shingle
sets (Spark's array functions). Of a verified pair the row later in keep order (farther from its
centroid, ties by id) is the source; a source is never a target, so targets stay kept and no
chain forms; each source becomes a ``lexical`` duplicate of its most similar target, and rows
that pointed at it are re-pointed as above (a lexical follower's similarity is its Jaccard with
the new target).

Computed once: four consumers read the first pass (the kept rows, the probes, the direct and the
re-pointed results). It is cached (no vectors: some 100 bytes a row, and some 700 more for a kept
row of the lexical pass: its band hashes and shingles) and materialised before any of them runs,
so they all see one result and its Python pass runs once; the probe matches (two consumers) are
cached too, and with the lexical pass the semantic step's result and the verified lexical pairs.
The pipeline clears these caches once ``dedup`` is written. The rows to re-point are few, so they
are broadcast and the embeddings are scanned, not shuffled, for them.

Table ``dedup``: ``id``, ``cluster`` (the row's own topic), ``status`` (``kept``/``duplicate``),
``duplicate_of`` (the kept row's id; null when kept), ``similarity`` (to it, in the method's
measure; null when kept), ``method`` (``semantic``/``lexical``: which measure found it; null
when kept). Every embedding row appears exactly once: kept + duplicate = rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..config import DedupSettings
from ..session import Shipped, ship
from ..minhash import LexicalIndex, MinHashParams, text_jaccard
from ..ngrams import as_signed
from ..tables import Write
from . import Stage, StageContext, StageOutput, with_added

KEPT = "kept"
DUPLICATE = "duplicate"
SEMANTIC = "semantic"  # method: the cosine of the embeddings found it
LEXICAL = "lexical"    # method: the Jaccard of the shingle sets found it

DEDUP_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("cluster", T.IntegerType(), False),
    T.StructField("status", T.StringType(), False),
    T.StructField("duplicate_of", T.StringType(), True),
    T.StructField("similarity", T.DoubleType(), True),
    T.StructField("method", T.StringType(), True),
])
# The first pass adds, per row: far (a probe candidate), its centroid distance, and for a kept row
# in the lexical pass its band hashes and shingle set (for the pass across clusters; else null).
_FIRST_PASS_SCHEMA = T.StructType(list(DEDUP_SCHEMA.fields) + [
    T.StructField("far", T.BooleanType(), False),
    T.StructField("distance", T.DoubleType(), False),
    T.StructField("bands", T.ArrayType(T.LongType()), True),
    T.StructField("shingles", T.ArrayType(T.LongType()), True),
])
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


class Leaders(NamedTuple):
    """The leader pass over rows in keep order: ``kept``, ``target`` (position of the kept row a
    duplicate points at, -1 when kept), ``similarity`` (to it, NaN when kept) and ``lexical``
    (the duplicate was found by the lexical pass: ``similarity`` is a Jaccard similarity)."""
    kept: np.ndarray
    target: np.ndarray
    similarity: np.ndarray
    lexical: np.ndarray


def best_earlier(score: Callable[[np.ndarray], np.ndarray], size: int, candidates: np.ndarray,
                 block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a block: (best score, position) over ``candidates``, ``block_size`` of them at
    a time; ``score(chunk)`` is the block x chunk matrix. Ties: the earlier candidate (strict)."""
    best_sim = np.full(size, -np.inf, dtype=np.float64)
    best_pos = np.full(size, -1, dtype=np.int64)
    rows = np.arange(size)
    for chunk_start in range(0, candidates.size, block_size):
        chunk = candidates[chunk_start:chunk_start + block_size]
        sims = score(chunk)
        arg = sims.argmax(axis=1)
        top = sims[rows, arg].astype(np.float64)
        better = top > best_sim
        best_sim[better] = top[better]
        best_pos[better] = chunk[arg[better]]
    return best_sim, best_pos


def _settle_block(close: np.ndarray, pre_duplicate: np.ndarray) -> np.ndarray:
    """Which rows of a block are kept: those with no earlier kept neighbour in the block and none
    kept before it (``pre_duplicate``). Only near-duplicate candidates are settled in order."""
    close = close.copy()
    close[:, pre_duplicate] = False  # a duplicate is never a leader
    close[pre_duplicate, :] = False  # already decided
    contested = close.any(axis=1)
    block_kept = ~pre_duplicate & ~contested
    for i in np.flatnonzero(contested):
        if not (close[i] & block_kept).any():
            block_kept[i] = True
    return block_kept


def _pointer(inner: np.ndarray, earlier_kept: np.ndarray, start: int, best_sim: np.ndarray,
             best_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's most similar earlier kept row, this block's (``inner``) or before (``best_*``)."""
    in_block = np.where(earlier_kept, inner, -np.inf)
    in_arg = in_block.argmax(axis=1)
    in_sim = in_block[np.arange(in_block.shape[0]), in_arg].astype(np.float64)
    use_inner = in_sim > best_sim  # strict: rows kept before the block come earlier
    return np.where(use_inner, start + in_arg, best_pos), np.where(use_inner, in_sim, best_sim)


def leader_pass(vectors: np.ndarray, threshold: float, block_size: int,
                lexical: LexicalIndex | None = None) -> Leaders:
    """Greedy leader dedup of unit ``vectors`` (and, with ``lexical``, their texts) given in keep
    order (best first): a row is a duplicate when a row already kept has cosine >= ``threshold``
    with it, or (``lexical``) a verified shingle Jaccard >= the index's threshold; it points at
    the kept row of highest cosine when one reaches ``threshold``, else at the kept row of highest
    Jaccard. See the module doc; blocks are at most ``block_size`` x ``block_size``."""
    n = vectors.shape[0]
    kept = np.zeros(n, dtype=bool)
    target = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan, dtype=np.float64)
    found_lexically = np.zeros(n, dtype=bool)
    kept_positions = np.zeros(0, dtype=np.int64)
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        block, positions, size = vectors[start:stop], np.arange(start, stop), stop - start
        sem_sim, sem_pos = best_earlier(lambda chunk: block @ vectors[chunk].T, size, kept_positions, block_size)
        inner = block @ block.T
        earlier = np.tri(size, size, k=-1, dtype=bool)  # [i, j] true when j comes before i
        close = inner >= threshold
        pre_duplicate = sem_sim >= threshold
        if lexical is not None:
            lex_sim, lex_pos = best_earlier(lambda chunk: lexical.similarity(positions, chunk), size,
                                            kept_positions, block_size)
            inner_lex = lexical.similarity(positions, positions)
            close |= inner_lex >= lexical.threshold
            pre_duplicate |= lex_sim >= lexical.threshold
        block_kept = _settle_block(close & earlier, pre_duplicate)

        earlier_kept = earlier & block_kept[None, :]
        pointer, pointer_sim = _pointer(inner, earlier_kept, start, sem_sim, sem_pos)
        by_words = np.zeros(size, dtype=bool)
        if lexical is not None:
            lex_pointer, lex_pointer_sim = _pointer(inner_lex, earlier_kept, start, lex_sim, lex_pos)
            by_words = pointer_sim < threshold  # no semantic match: the lexical one found it
            pointer = np.where(by_words, lex_pointer, pointer)
            pointer_sim = np.where(by_words, lex_pointer_sim, pointer_sim)
        dup = ~block_kept
        kept[start:stop] = block_kept
        target[start:stop] = np.where(dup, pointer, -1)
        similarity[start:stop] = np.where(dup, pointer_sim, np.nan)
        found_lexically[start:stop] = dup & by_words
        kept_positions = np.concatenate([kept_positions, start + np.flatnonzero(block_kept)])
    return Leaders(kept, target, similarity, found_lexically)


def leader_dedup(vectors: np.ndarray, threshold: float, block_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The semantic leader pass alone: (kept: bool[n], duplicate_of: int[n] position of the kept
    row or -1, similarity: float[n] or NaN) of unit ``vectors`` in keep order."""
    kept, target, similarity, _ = leader_pass(vectors, threshold, block_size)
    return kept, target, similarity


def keep_order(distance: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions sorted nearest-to-centroid first, ties by id."""
    return np.lexsort((np.asarray(ids, dtype=str), distance))


@dataclass(frozen=True)
class _DedupCluster:
    """First pass: one cluster's rows (id, cluster, distance, embedding, and with ``lexical``
    text) → dedup rows + far flag."""

    threshold: float
    block_size: int
    far_quantile: float
    lexical: MinHashParams | None = None

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        ids = frame["id"].to_numpy(dtype=object)
        distance = frame["distance"].to_numpy(dtype=np.float64)
        order = keep_order(distance, ids)
        ids, distance = ids[order], distance[order]
        vectors = embedding_matrix(frame["embedding"])[order]
        texts = None if self.lexical is None else LexicalIndex.of_texts(frame["text"].to_numpy()[order], self.lexical)
        leaders = leader_pass(vectors, self.threshold, self.block_size, texts)
        bands, shingles = _lexical_columns(texts, leaders.kept)
        return pd.DataFrame({
            "id": ids,
            "cluster": np.full(len(ids), frame["cluster"].iloc[0], dtype=np.int32),
            **dedup_columns(ids, leaders),
            "far": distance > np.quantile(distance, self.far_quantile),
            "distance": distance,
            "bands": bands,
            "shingles": shingles,
        })


def _lexical_columns(texts: LexicalIndex | None, kept: np.ndarray) -> tuple[list, list]:
    """Per row: its band hashes and shingle set as int64 arrays when it is kept and in the
    lexical pass (the pass across clusters compares those rows), else None."""
    bands: list = [None] * len(kept)
    shingles: list = [None] * len(kept)
    if texts is not None:
        offsets, values = texts.sets.offsets, as_signed(texts.sets.values)
        for i in np.flatnonzero(kept & texts.active):
            bands[i] = as_signed(texts.bands[i])
            shingles[i] = values[offsets[i]:offsets[i + 1]]
    return bands, shingles


def dedup_columns(ids: np.ndarray, leaders: Leaders) -> dict[str, np.ndarray]:
    """``status``, ``duplicate_of``, ``similarity`` and ``method`` of rows ``ids`` (keep order)."""
    dup = ~leaders.kept
    return {
        "status": np.where(leaders.kept, KEPT, DUPLICATE),
        "duplicate_of": np.where(dup, ids[np.maximum(leaders.target, 0)], None),
        "similarity": leaders.similarity,
        "method": np.where(dup, np.where(leaders.lexical, LEXICAL, SEMANTIC), None),
    }


@dataclass(frozen=True)
class RouteProbes:
    """mapInArrow: each probe row (id, cluster, embedding) to its ``neighbours`` nearest other
    clusters by the shipped centroid matrix, and to its own cluster too when ``home``."""

    centers: Shipped
    neighbours: int
    home: bool = False

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        clusters, matrix = self.centers.value  # a broadcast: fetched once per executor, unpickled once per worker
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


def shipped_centers(centroids: DataFrame) -> Shipped | None:
    """(cluster ids, k x d centres) of the non-empty clusters, shipped to the executors; None when
    there is none. Collects k rows."""
    rows = centroids.filter(F.col("size") > 0).select("cluster", "embedding_center").orderBy("cluster").collect()
    if not rows:
        return None
    return ship(centroids.sparkSession, (
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


def record_texts(records: DataFrame) -> DataFrame:
    """(id, text): the text each record's embedding is made from, ``instruction + " " + input``
    (the lexical pass normalises whitespace, so the embed stage's strip changes nothing)."""
    return records.select("id", F.concat_ws(" ", F.coalesce("instruction", F.lit("")),
                                            F.coalesce("input", F.lit(""))).alias("text"))


def _jaccard_of(shingle: int):
    """A pandas UDF: the exact shingle Jaccard similarity of two text columns, row by row."""
    @F.pandas_udf("double")
    def jaccard(left: pd.Series, right: pd.Series) -> pd.Series:
        return pd.Series(text_jaccard(left.tolist(), right.tolist(), shingle), index=left.index)
    return jaccard


def find_duplicates(embeddings: DataFrame, topics: DataFrame, centroids: DataFrame,
                    settings: DedupSettings, records: DataFrame | None = None) -> DataFrame:
    """The ``dedup`` table. Collects only the centroid matrix (k rows); see the module doc.
    ``records`` give the texts of the lexical pass (``dedup.minhash``); without them (a caller
    holding only vectors) the semantic pass runs alone."""
    lexical = MinHashParams.from_settings(settings) if records is not None else None
    texts = record_texts(records) if lexical is not None else None
    rows = topics.select("id", "cluster", "distance").join(embeddings.select("id", "embedding"), "id")
    if texts is not None:
        rows = rows.join(texts, "id", "left")  # a row without a record has no text, never goes missing
    dedup_cluster = _DedupCluster(settings.threshold, settings.block_size, settings.cross_cluster_quantile, lexical)
    # A one-argument function: applyInPandas reads the arity (a callable object's includes self).
    first = rows.groupBy("cluster").applyInPandas(lambda frame: dedup_cluster(frame), _FIRST_PASS_SCHEMA)
    columns = [f.name for f in DEDUP_SCHEMA.fields]
    if not settings.cross_cluster or (settings.cross_cluster_neighbours == 0 and lexical is None):
        return first.select(*columns)
    # Every step across clusters reads the first pass (kept rows, probes, direct, moved): computed
    # once here and cached, so they all see one result and its Python pass runs once.
    first = first.persist(StorageLevel.MEMORY_AND_DISK)
    first.count()  # materialise now; the pipeline clears the cache once the table is written
    result = first.select(*columns)

    centers = shipped_centers(centroids) if settings.cross_cluster_neighbours > 0 else None
    if centers is not None and len(centers.value[0]) >= 2:
        kept = first.filter(F.col("status") == KEPT).join(embeddings.select("id", "embedding"), "id")
        probes = (kept.filter("far").select("id", "cluster", "embedding")
                  .mapInArrow(RouteProbes(centers, settings.cross_cluster_neighbours), ROUTED_SCHEMA))
        targets = kept.filter(~F.col("far")).select(F.col("cluster").alias("target_cluster"), "id", "embedding")
        # Two consumers (direct, moved): cached too, so the probe pass also runs once.
        matches = best_matches(probes, targets, settings.threshold, settings.block_size).persist()
        result = apply_matches(result, matches, SEMANTIC, embeddings, texts, lexical)
    if lexical is None:
        return result
    # Three consumers (the kept rows, direct, moved) of the semantic step's result: cached.
    result = result.persist(StorageLevel.MEMORY_AND_DISK)
    matches = lexical_matches(first, result.filter(F.col("status") == KEPT).select("id"), lexical).persist()
    return apply_matches(result, matches, LEXICAL, embeddings, texts, lexical)


def apply_matches(result: DataFrame, matches: DataFrame, method: str, embeddings: DataFrame,
                  texts: DataFrame | None, lexical: MinHashParams | None) -> DataFrame:
    """``result`` (dedup rows) with each matched kept row (``matches``: probe_id, target_id,
    match_similarity) now a duplicate of its target found by ``method``, and the rows that pointed
    at it re-pointed at that target (:func:`_repointed`)."""
    matched = F.col("target_id").isNotNull()
    direct = (result.join(matches, result["id"] == matches["probe_id"], "left")
              .select("id", "cluster",
                      F.when(matched, F.lit(DUPLICATE)).otherwise(F.col("status")).alias("status"),
                      F.coalesce("target_id", "duplicate_of").alias("duplicate_of"),
                      F.coalesce("match_similarity", "similarity").alias("similarity"),
                      F.when(matched, F.lit(method)).otherwise(F.col("method")).alias("method")))
    moved = _repointed(result, matches, embeddings, texts, lexical)
    return (direct.join(moved, "id", "left")
            .select("id", "cluster", "status",
                    F.coalesce("moved_to", "duplicate_of").alias("duplicate_of"),
                    F.coalesce("moved_similarity", "similarity").alias("similarity"), "method"))


def lexical_matches(first: DataFrame, kept: DataFrame, params: MinHashParams) -> DataFrame:
    """Lexical near-copies across clusters among the ``kept`` rows (id) in the lexical pass:
    (probe_id, target_id, match_similarity), one row per row that turns duplicate.

    Candidates share a band's hash (the band hashes exploded, joined on (band, hash), clusters
    apart); each is verified by the exact Jaccard of the two shingle sets (Spark's own array
    functions, no Python). Of a verified pair, the row later in keep order (farther from its
    centroid, ties by id) is the source, the other the target. A row that is a source is never a
    target, so every target stays kept and no chain forms; each source points at its most similar
    target (ties: the smaller id), and a source whose every partner is a source stays kept."""
    rows = (first.filter(F.col("bands").isNotNull()).join(kept, "id", "left_semi")
            .select("id", "cluster", "distance", "bands", "shingles"))
    exploded = rows.select("id", "cluster", F.posexplode("bands").alias("band", "hash"))
    a, b = exploded.alias("a"), exploded.alias("b")
    pairs = (a.join(b, (F.col("a.band") == F.col("b.band")) & (F.col("a.hash") == F.col("b.hash"))
                    & (F.col("a.cluster") != F.col("b.cluster")) & (F.col("a.id") < F.col("b.id")))
             .select(F.col("a.id").alias("left_id"), F.col("b.id").alias("right_id")).distinct())
    left, right = rows.alias("l"), rows.alias("r")
    later = (F.col("l.distance") > F.col("r.distance")) | (
        (F.col("l.distance") == F.col("r.distance")) & (F.col("l.id") > F.col("r.id")))
    common = F.size(F.array_intersect("l.shingles", "r.shingles"))
    jaccard = common / (F.size("l.shingles") + F.size("r.shingles") - common)
    verified = (pairs.join(left, F.col("left_id") == F.col("l.id")).join(right, F.col("right_id") == F.col("r.id"))
                .select(F.when(later, F.col("l.id")).otherwise(F.col("r.id")).alias("probe_id"),
                        F.when(later, F.col("r.id")).otherwise(F.col("l.id")).alias("target_id"),
                        jaccard.cast("double").alias("match_similarity"))
                .filter(F.col("match_similarity") >= params.threshold)
                .persist())  # two consumers: the sources, and the pairs whose target is none
    sources = verified.select(F.col("probe_id").alias("source_id")).distinct()
    allowed = verified.join(sources, F.col("target_id") == F.col("source_id"), "left_anti")
    best = Window.partitionBy("probe_id").orderBy(F.col("match_similarity").desc(), F.col("target_id"))
    return allowed.withColumn("n", F.row_number().over(best)).filter("n = 1").drop("n")


def _repointed(result: DataFrame, matches: DataFrame, embeddings: DataFrame, texts: DataFrame | None,
               lexical: MinHashParams | None) -> DataFrame:
    """(id, moved_to, moved_similarity) of the rows that pointed at a row that matched: they
    now point at its target. A row keeps its method; its similarity to the new target is
    recomputed in that method's measure (cosine, or shingle Jaccard; it can be below the
    threshold: a duplicate of a duplicate of it). They are few, so they are broadcast and the
    embeddings (and texts) are only scanned, never shuffled, to fetch the two vectors (texts)
    of each."""
    vectors = embeddings.select("id", "embedding")
    followers = (result.filter(F.col("status") == DUPLICATE)
                 .join(matches, F.col("duplicate_of") == F.col("probe_id"))
                 .select("id", "target_id", "method"))
    with_own = vectors.withColumnRenamed("embedding", "own").join(F.broadcast(followers), "id")
    moved = (vectors.select(F.col("id").alias("target_id"), F.col("embedding").alias("theirs"))
             .join(F.broadcast(with_own), "target_id")
             .select("id", F.col("target_id").alias("moved_to"), "method",
                     _dot(F.col("own"), F.col("theirs")).alias("moved_similarity")))
    if texts is None or lexical is None:
        return moved.drop("method")
    by_words = followers.filter(F.col("method") == LEXICAL).select("id", "target_id")
    own = texts.withColumnRenamed("text", "own").join(F.broadcast(by_words), "id")
    jaccard = (texts.select(F.col("id").alias("target_id"), F.col("text").alias("theirs"))
               .join(F.broadcast(own), "target_id")
               .select("id", _jaccard_of(lexical.shingle)("own", "theirs").alias("jaccard")))
    return (moved.join(jaccard, "id", "left")
            .select("id", "moved_to", F.when(F.col("method") == LEXICAL, F.col("jaccard"))
                    .otherwise(F.col("moved_similarity")).alias("moved_similarity")))


class Dedup(Stage):
    """records, embeddings, topics, centroids → dedup."""

    name = "dedup"
    version = "2"  # 2: the lexical pass (MinHash + LSH) beside the semantic one; the method column
    inputs = ("records", "embeddings", "topics", "centroids")
    outputs = ("dedup",)
    settings_sections = ("dedup",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        return StageOutput({"dedup": find_duplicates(tables["embeddings"], tables["topics"], tables["centroids"],
                                                     ctx.settings.dedup, records=tables["records"])})

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """The new rows against the kept rows of their own and neighbouring clusters, then the
        touched clusters' one pass (``cluster_increment``: dedup by both measures, selection
        extension, groups), cached and counted once, handed down to the select and group stages."""
        from .cluster_increment import CARRY, COUNTS, curate_new_rows, curated_rows
        before = {t: tables[t] for t in ("dedup", "selected", "merge_groups", "centroids")}
        curated = curate_new_rows(added["topics"], with_added(tables, added, "embeddings", cache=True),
                                  {**before, "records": with_added(tables, added, "records")},
                                  ctx.settings).persist(StorageLevel.MEMORY_AND_DISK)
        found = {(r["table"], r["status"]): r["count"] for r in curated.groupBy("table", "status").count().collect()}
        counts = {"new_kept": found.get(("dedup", KEPT), 0), "new_duplicates": found.get(("dedup", DUPLICATE), 0)}
        rows = {table: sum(n for (t, _), n in found.items() if t == table) for table in ("selected", "merge_groups")}
        return StageOutput({"dedup": Write.append(curated_rows(curated, "dedup"), sum(counts.values()))},
                           summary={"counts": counts}, carry={CARRY: curated, COUNTS: rows})
