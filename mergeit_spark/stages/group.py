"""Group stage: inside each cluster, gather the selected rows most similar to each other into
merge groups, best match first.

Space: cosine similarity on the full embedding (unit-length MiniLM vectors from ``embeddings``),
not the PCA-reduced space k-means used. Grouping asks "are these two instructions about the same
thing?", and the full embedding is the space in which ``group.threshold`` (0.55) is meant; PCA
only serves to make k-means fast and stable.

Algorithm (per cluster, in ``group_cluster``):
  1. All pairs with cosine similarity strictly above ``group.threshold`` are candidates, sorted by
     similarity, highest first (ties broken by the member ids, so the result never depends on row
     order).
  2. Walk the sorted pairs; a pair whose two rows are both still free seeds a group. This is the
     global best match first, unlike the reference code's index-order greedy pass.
  3. For ``group.size`` > 2 the seed grows at once, one member at a time: among the free rows, the
     candidate whose *minimum* similarity to the current members is highest joins (complete
     linkage: every member stays above the threshold to every other member), ties broken by the
     higher *average* similarity, then by id. Growth stops at ``group.size`` members or when no
     free row is above the threshold to all members; such a group keeps the members it has (at
     least two), since a smaller merge is still a merge.
  4. Every row is in at most one group. Rows left over are simply not merged (finalize keeps them).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from ..ids import group_id
from ..tables import Write
from . import Stage, StageContext, StageOutput


def group_cluster(ids: list[str], vectors: np.ndarray, threshold: float, size: int
                  ) -> list[tuple[list[str], float]]:
    """Group the rows of one cluster; returns ``(sorted member ids, mean pairwise cosine)`` per group.

    ``vectors`` holds one embedding per id (rows are re-normalised here, so near-unit input is fine).
    """
    if size < 2:
        raise ValueError(f"group size must be >= 2, got {size}")
    n = len(ids)
    if n < 2:
        return []
    # Work in id order: the result is then a function of the set of rows, not of their order.
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ids = [ids[i] for i in order]
    x = np.asarray(vectors, dtype=np.float64)[order]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    sim = x @ x.T

    rows, cols = np.triu_indices(n, k=1)
    pair_sim = sim[rows, cols]
    keep = pair_sim > threshold
    rows, cols, pair_sim = rows[keep], cols[keep], pair_sim[keep]
    # Highest similarity first; ties by (row, col), which are id ranks: deterministic.
    ranked = np.lexsort((cols, rows, -pair_sim))

    free = np.ones(n, dtype=bool)
    groups: list[tuple[list[str], float]] = []
    for k in ranked:
        i, j = int(rows[k]), int(cols[k])
        if not (free[i] and free[j]):
            continue
        members = [i, j]
        free[i] = free[j] = False
        while len(members) < size:
            candidates = np.flatnonzero(free)
            if candidates.size == 0:
                break
            to_members = sim[np.ix_(candidates, members)]
            worst = to_members.min(axis=1)
            mean = to_members.mean(axis=1)
            eligible = worst > threshold
            if not eligible.any():
                break
            candidates, worst, mean = candidates[eligible], worst[eligible], mean[eligible]
            best = np.lexsort((candidates, -mean, -worst))[0]
            pick = int(candidates[best])
            members.append(pick)
            free[pick] = False
        sub = sim[np.ix_(members, members)]
        m = len(members)
        mean_pairwise = float((sub.sum() - np.trace(sub)) / (m * (m - 1)))
        groups.append((sorted(ids[t] for t in members), mean_pairwise))
    return groups


def merge_groups_schema(cluster_type: T.DataType) -> T.StructType:
    return T.StructType([
        T.StructField("group_id", T.StringType(), False),
        T.StructField("cluster", cluster_type, False),
        T.StructField("member_ids", T.ArrayType(T.StringType(), False), False),
        T.StructField("similarity", T.DoubleType(), False),
    ])


def build_merge_groups(selected: DataFrame, embeddings: DataFrame, threshold: float,
                       size: int) -> DataFrame:
    """``merge_groups`` from the ``selected`` rows and their ``embeddings``, one cluster per task."""
    cluster_type = selected.schema["cluster"].dataType
    schema = merge_groups_schema(cluster_type)
    rows = (selected.select("id", "cluster")
            .join(embeddings.select("id", "embedding"), on="id", how="inner"))

    def per_cluster(pdf: pd.DataFrame) -> pd.DataFrame:
        if len(pdf) < 2:
            # object dtype: an empty float column cannot be converted to array<string>.
            return pd.DataFrame({name: pd.Series([], dtype=object) for name in schema.fieldNames()})
        cluster = pdf["cluster"].iloc[0]
        vectors = np.stack([np.asarray(v, dtype=np.float32) for v in pdf["embedding"]])
        found = group_cluster(pdf["id"].tolist(), vectors, threshold, size)
        if not found:
            return pd.DataFrame({name: pd.Series([], dtype=object) for name in schema.fieldNames()})
        return pd.DataFrame({
            "group_id": [group_id(members) for members, _ in found],
            "cluster": [cluster] * len(found),
            "member_ids": [members for members, _ in found],
            "similarity": [sim for _, sim in found],
        })

    return rows.groupBy("cluster").applyInPandas(per_cluster, schema=schema)


class Group(Stage):
    """Pair (or group) similar selected instructions inside each cluster, best match first."""

    name = "group"
    inputs = ("selected", "embeddings")
    outputs = ("merge_groups",)
    settings_sections = ("group",)

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        cfg = ctx.settings.group
        groups = build_merge_groups(tables["selected"], tables["embeddings"], cfg.threshold, cfg.size)
        return StageOutput({"merge_groups": groups})

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """The groups holding a new row, from the dedup stage's one pass (``cluster_increment``);
        existing groups stay."""
        from .cluster_increment import CARRY, COUNTS, curated_rows
        groups, found = curated_rows(added[CARRY], "merge_groups"), added[COUNTS]["merge_groups"]
        return StageOutput({"merge_groups": Write.append(groups, found)}, summary={"counts": {"new_groups": found}})
