"""Select stage: a diverse, representative subset of each topic by facility location.

Objective, per cluster, over the cluster's kept rows V (dedup status ``kept``):

    f(S) = sum over i in V of max(0, max over j in S of sim(i, j))

where sim is the cosine similarity of the unit embeddings in the model's own space (a dot
product), the space in which the similarity means what the model means (the PCA space is for
clustering only). Negative similarities count as 0: a row is never "represented" worse than by
nothing. That is the facility-location function of submodlib, which the MergeIT reference uses
(its nearest-similarity vector starts at 0), and the tests check this module against it.

Optimiser: lazy greedy. Every candidate sits in a priority queue under an upper bound of its
marginal gain (initially f({j}), computed blockwise so no more than block_size x block_size
similarities exist at once). The best bound is popped; if it was computed against the current
selection it is the true best gain and the row is picked, else its gain is recomputed (one
matrix-vector product) and it goes back. Submodularity makes a stale bound an upper bound, so
the result is exactly the plain greedy's. Ties go to the smaller id.

Budget: ``settings.select.budget`` picks per cluster; a cluster with no more kept rows than that
is kept whole, still in greedy order, so ``rank`` and ``gain`` mean the same everywhere.

Table ``selected``: ``id``, ``cluster``, ``rank`` (int, pick order from 0: the first pick is
rank 0), ``gain`` (double, the marginal gain f(S + {row}) - f(S) when it was picked).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..config import SelectSettings
from ..tables import Write
from . import Stage, StageContext, StageOutput
from .dedup import KEPT, embedding_matrix

DEFAULT_BLOCK_SIZE = SelectSettings().block_size

SELECTED_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("cluster", T.IntegerType(), False),
    T.StructField("rank", T.IntegerType(), False),
    T.StructField("gain", T.DoubleType(), False),
])


def facility_location_value(vectors: np.ndarray, chosen: np.ndarray) -> float:
    """f(S) for the rows ``chosen`` of unit ``vectors`` (reference for tests and reports)."""
    if len(chosen) == 0:
        return 0.0
    sims = vectors @ vectors[np.asarray(chosen)].T
    return float(np.maximum(sims.max(axis=1), 0.0).astype(np.float64).sum())


def lazy_greedy_facility_location(vectors: np.ndarray, budget: int, block_size: int = DEFAULT_BLOCK_SIZE
                                  ) -> tuple[np.ndarray, np.ndarray]:
    """(positions picked in order, marginal gain of each) maximising f over unit ``vectors``."""
    n = vectors.shape[0]
    picks_wanted = min(budget, n)
    if picks_wanted <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    # Initial bounds f({j}) = sum_i max(0, sim(i, j)), one block_size x block_size tile at a time.
    singleton = np.zeros(n, dtype=np.float64)
    for i0 in range(0, n, block_size):
        rows = vectors[i0:i0 + block_size]
        for j0 in range(0, n, block_size):
            tile = rows @ vectors[j0:j0 + block_size].T
            singleton[j0:j0 + block_size] += np.maximum(tile, 0.0).sum(axis=0, dtype=np.float64)

    # Heap entries: (-bound, position, selection size the bound was computed at).
    heap = [(-g, j, 0) for j, g in enumerate(singleton.tolist())]
    return _lazy_greedy(vectors, np.zeros(n, dtype=np.float64), heap, picks_wanted)


def extend_facility_location(vectors: np.ndarray, chosen: np.ndarray, candidates: np.ndarray,
                             picks: int, block_size: int = DEFAULT_BLOCK_SIZE
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Lazy greedy facility location over all ``vectors`` (unit rows) that starts from the rows
    ``chosen`` and may pick only ``candidates``: (positions picked in order, their gains). The
    selection an incremental run extends; from an empty ``chosen`` it is the plain greedy."""
    n = vectors.shape[0]
    nearest = np.zeros(n, dtype=np.float64)  # max(0, best similarity to the selection so far)
    for start in range(0, len(chosen), block_size):
        sims = vectors @ vectors[chosen[start:start + block_size]].T
        nearest = np.maximum(nearest, sims.max(axis=1))
    picks = min(picks, len(candidates))
    if picks <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    # Exact gains given the existing selection; ties: the smaller position (id order).
    heap = [(-_gain(vectors, nearest, int(j)), int(j), 0) for j in candidates]
    return _lazy_greedy(vectors, nearest, heap, picks)


def _gain(vectors: np.ndarray, nearest: np.ndarray, j: int) -> float:
    return float(np.maximum(vectors @ vectors[j] - nearest, 0.0).sum(dtype=np.float64))


def _lazy_greedy(vectors: np.ndarray, nearest: np.ndarray, heap: list[tuple[float, int, int]],
                 picks_wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """The lazy greedy loop: ``heap`` holds (-upper bound on the gain, position, selection size
    the bound was computed at); a bound computed at the current size is exact, so it is picked."""
    heapq.heapify(heap)
    picks: list[int] = []
    gains: list[float] = []
    while len(picks) < picks_wanted:
        neg_bound, j, stamp = heapq.heappop(heap)
        if stamp == len(picks):
            picks.append(j)
            gains.append(-neg_bound)
            nearest = np.maximum(nearest, vectors @ vectors[j])
            continue
        heapq.heappush(heap, (-_gain(vectors, nearest, j), j, len(picks)))
    return np.asarray(picks, dtype=np.int64), np.asarray(gains, dtype=np.float64)


def selection_target(budget: int, kept: int, kept_before: int, selected_before: int) -> int:
    """The cluster's selection size after an increment (``mergeit_spark.incremental``, step 5)."""
    if kept_before <= 0:
        return min(kept, budget)
    return min(kept, max(budget, math.ceil(selected_before * kept / kept_before)))


@dataclass(frozen=True)
class _SelectCluster:
    """One cluster's kept rows (id, cluster, embedding) → its picks in greedy order."""

    budget: int
    block_size: int

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.sort_values("id", kind="stable")  # position order = id order: ties by id
        vectors = embedding_matrix(frame["embedding"])
        picks, gains = lazy_greedy_facility_location(vectors, self.budget, self.block_size)
        return pd.DataFrame({
            "id": frame["id"].to_numpy(dtype=object)[picks],
            "cluster": np.full(len(picks), frame["cluster"].iloc[0], dtype=np.int32),
            "rank": np.arange(len(picks), dtype=np.int32),
            "gain": gains,
        })


def select_representatives(embeddings: DataFrame, dedup: DataFrame, settings: SelectSettings) -> DataFrame:
    """The ``selected`` table: facility-location picks among each cluster's kept rows."""
    kept = (dedup.filter(F.col("status") == KEPT).select("id", "cluster")
            .join(embeddings.select("id", "embedding"), "id"))
    select_cluster = _SelectCluster(settings.budget, settings.block_size)
    # A one-argument function: applyInPandas reads the arity (a callable object's includes self).
    return kept.groupBy("cluster").applyInPandas(lambda frame: select_cluster(frame), SELECTED_SCHEMA)


class Select(Stage):
    """embeddings, dedup → selected."""

    name = "select"
    inputs = ("embeddings", "dedup")
    outputs = ("selected",)
    settings_sections = ("select",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        return StageOutput({"selected": select_representatives(tables["embeddings"], tables["dedup"],
                                                              ctx.settings.select)})

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """The touched clusters' selections extended (the dedup stage's one pass: see
        ``cluster_increment``); the existing picks stay."""
        from .cluster_increment import CARRY, COUNTS, curated_rows
        rows, picks = curated_rows(added[CARRY], "selected"), added[COUNTS]["selected"]
        return StageOutput({"selected": Write.append(rows, picks)}, summary={"counts": {"new_selected": picks}})
