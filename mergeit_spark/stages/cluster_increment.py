"""An increment's one pass per touched cluster: the dedup, selection and groups of its new rows.

Steps 4 to 6 of :mod:`mergeit_spark.incremental` read the same clusters' kept rows and vectors,
so they run as one pass: the new rows are routed to their own and neighbouring clusters to meet
those clusters' kept rows (each new row's best match per cluster), then one pass per cluster with
new rows (:class:`ClusterIncrement`) deduplicates the unmatched ones among themselves, extends
the cluster's selection and groups its free selected rows.

The lexical pass (``dedup.minhash``) runs inside that per-cluster pass: a new row left unmatched
is compared by shingles with the cluster's kept rows (a verified Jaccard at or above
``dedup.minhash_threshold`` makes it a ``lexical`` duplicate of the most similar one), and the
new rows left are deduplicated among themselves by both measures, as in a full run. Whether a
text is templated is judged over every row of the cluster, old (kept and duplicate) and new, as a
full run over the same rows would. Across clusters an increment compares by embeddings only (the
probes above): the full run's lexical pass across clusters needs every kept row's shingles.

The dedup stage's ``extend`` computes it (:func:`curate_new_rows`) and hands it down; the select
and group stages take their rows from it (:func:`curated_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..ids import group_id
from ..minhash import LexicalIndex, MinHashParams
from .dedup import (DEDUP_SCHEMA, DUPLICATE, KEPT, LEXICAL, ROUTED_SCHEMA, SEMANTIC, RouteProbes, best_earlier,
                    shipped_centers, dedup_columns, embedding_matrix, keep_order, leader_pass,
                    matches_per_cluster, record_texts)
from .group import group_cluster, merge_groups_schema
from .select import SELECTED_SCHEMA, extend_facility_location, selection_target

CARRY = "cluster_increment"  # the name the dedup stage hands the pass down under
COUNTS = "cluster_increment rows"  # and its rows per table (counted with the dedup rows)

# The schemas of the three tables one pass over a cluster adds to, by table.
CURATED_TABLES = {"dedup": DEDUP_SCHEMA, "selected": SELECTED_SCHEMA,
                  "merge_groups": merge_groups_schema(T.IntegerType())}
CURATED_COLUMNS = {table: schema.fieldNames() for table, schema in CURATED_TABLES.items()}


def _curated_schema() -> T.StructType:
    """One row per table row: ``table`` says which, and every column of the three tables (the
    same name, the same type: ``similarity`` is the dedup row's match similarity or the group's
    mean pairwise similarity), null where the table has none; ``cluster`` always set."""
    fields: dict[str, T.StructField] = {}
    for schema in CURATED_TABLES.values():
        for field in schema.fields:
            if fields.setdefault(field.name, field).dataType != field.dataType:
                raise TypeError(f"column {field.name} has two types in the curated tables")
    return T.StructType([T.StructField("table", T.StringType(), False)] + [
        T.StructField(f.name, f.dataType, f.name != "cluster") for f in fields.values()])


CURATED_SCHEMA = _curated_schema()
_OBJECT_COLUMNS = [f.name for f in CURATED_SCHEMA.fields
                   if isinstance(f.dataType, (T.StringType, T.ArrayType)) and f.name != "table"]


@dataclass(frozen=True)
class ClusterIncrement:
    """One cluster's rows → its new ``dedup``, ``selected`` and ``merge_groups`` rows
    (``CURATED_SCHEMA``): steps 4, 5 and 6 of ``mergeit_spark.incremental`` in one pass, each step's output the
    next one's input, the cluster's vectors decoded once. The rows, by ``role``: ``kept``, the
    cluster's kept rows (``rank``: their selection rank or NaN; ``grouped``: a group holds
    them); ``new``, its new rows (with their centroid ``distance``); ``match``, for a new row of
    the cluster (``id``), its most similar kept row at or above the threshold in one cluster it
    was compared with (``target_id``, ``similarity``; no embedding). With ``lexical``, the kept
    and new rows carry their ``text``, and rows ``duplicate`` (the cluster's old duplicates: id
    and text only) count in which texts are templated."""

    dedup_threshold: float
    dedup_block_size: int
    budget: int
    select_block_size: int
    group_threshold: float
    group_size: int
    lexical: MinHashParams | None = None  # the lexical pass (off: the semantic one alone)

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        cluster = int(frame["cluster"].iloc[0])
        matches = frame[frame["role"] == "match"]
        # A new row's best match over the clusters it was compared with; ties: the smaller id.
        best = (matches.sort_values(["similarity", "target_id"], ascending=[False, True], kind="stable")
                .drop_duplicates("id"))
        duplicates = pd.DataFrame({"table": "dedup", "id": best["id"], "cluster": cluster, "status": DUPLICATE,
                                   "duplicate_of": best["target_id"], "similarity": best["similarity"],
                                   "method": SEMANTIC})
        active = (frame["role"] == "kept") | ((frame["role"] == "new") & ~frame["id"].isin(best["id"]))
        # The cluster's other rows (old duplicates, matched new rows): they count in what is templated.
        others = [] if self.lexical is None else frame.loc[~active & (frame["role"] != "match"), "text"].tolist()
        frame = frame[active]
        if not (frame["role"] == "new").any():
            return _curated([duplicates])
        # id order: the extension breaks ties by position, so by id, as the select stage does.
        frame = frame.sort_values("id", kind="stable").reset_index(drop=True)
        ids = frame["id"].to_numpy(dtype=object)
        vectors = embedding_matrix(frame["embedding"])
        is_new = (frame["role"] == "new").to_numpy(dtype=bool)
        new = np.flatnonzero(is_new)
        order = new[keep_order(frame["distance"].to_numpy(dtype=np.float64)[new], ids[new])]
        texts = None if self.lexical is None else LexicalIndex.of_texts(frame["text"].tolist(), self.lexical, others)
        copies, order = self._lexical_matches(texts, ids, order, np.flatnonzero(~is_new), cluster)
        leaders = leader_pass(vectors[order], self.dedup_threshold, self.dedup_block_size,
                              None if texts is None else texts.take(order))
        dedup = pd.DataFrame({"table": "dedup", "id": ids[order], "cluster": cluster,
                              **dedup_columns(ids[order], leaders)})
        rows = np.sort(np.concatenate([np.flatnonzero(~is_new), order[leaders.kept]]))  # kept rows, id order
        ranks = frame["rank"].to_numpy(dtype=np.float64)[rows]  # NaN: not selected
        picks, gains, start = self._extend(vectors[rows], ranks, is_new[rows])
        picked = rows[picks]
        selected = pd.DataFrame({"table": "selected", "id": ids[picked], "cluster": cluster,
                                 "rank": np.arange(start, start + len(picks)), "gain": gains})
        groups = self._groups(frame, ids, vectors, picked, is_new, cluster) if len(picked) else []
        return _curated([duplicates, copies, dedup, selected,
                         pd.DataFrame(groups, columns=["table", *CURATED_COLUMNS["merge_groups"]])])

    def _lexical_matches(self, texts: LexicalIndex | None, ids: np.ndarray, order: np.ndarray, old: np.ndarray,
                         cluster: int) -> tuple[pd.DataFrame, np.ndarray]:
        """The new rows (``order``, keep order) that are lexical near-copies of the cluster's kept
        rows (``old``): their dedup rows, each pointing at the kept row of highest Jaccard (ties:
        the smaller id, the kept rows being in id order), and the new rows left, in keep order."""
        if texts is None:
            return pd.DataFrame(columns=["table", *CURATED_COLUMNS["dedup"]]), order
        block = self.dedup_block_size
        best_sim = np.full(order.size, -np.inf)
        best_pos = np.full(order.size, -1, dtype=np.int64)
        for start in range(0, order.size, block):
            rows = order[start:start + block]
            best_sim[start:start + block], best_pos[start:start + block] = best_earlier(
                lambda chunk: texts.similarity(rows, chunk), rows.size, old, block)
        hit = best_sim >= texts.threshold
        copies = pd.DataFrame({"table": "dedup", "id": ids[order[hit]], "cluster": cluster, "status": DUPLICATE,
                               "duplicate_of": ids[best_pos[hit]], "similarity": best_sim[hit], "method": LEXICAL})
        return copies, order[~hit]

    def _extend(self, vectors: np.ndarray, ranks: np.ndarray, is_new: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, int]:
        """Step 5 over the cluster's kept rows: (positions picked, gains, first new rank)."""
        old_selected = np.flatnonzero(~np.isnan(ranks))
        chosen = old_selected[np.argsort(ranks[old_selected], kind="stable")]
        target = selection_target(self.budget, len(ranks), int((~is_new).sum()), len(chosen))
        picks, gains = extend_facility_location(vectors, chosen, np.flatnonzero(is_new), target - len(chosen),
                                                self.select_block_size)
        return picks, gains, int(np.nanmax(ranks)) + 1 if len(chosen) else 0

    def _groups(self, frame: pd.DataFrame, ids: np.ndarray, vectors: np.ndarray, picked: np.ndarray,
                is_new: np.ndarray, cluster: int) -> list[tuple]:
        """Step 6: the group stage's rule over the cluster's selected rows in no group yet (the
        old ones and the new picks); the groups holding a new row. A group found here cannot be
        one recorded before: every member of those is in a group already."""
        free = np.flatnonzero(~np.isnan(frame["rank"].to_numpy(dtype=np.float64))
                              & ~frame["grouped"].eq(True).to_numpy())
        free = np.union1d(free, picked)
        new_ids = set(ids[is_new])
        found = group_cluster(ids[free].tolist(), vectors[free], self.group_threshold, self.group_size)
        return [("merge_groups", group_id(members), cluster, members, similarity)
                for members, similarity in found if new_ids.intersection(members)]


def _curated(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """``parts`` (each some of ``CURATED_SCHEMA``'s columns) as one frame in its columns."""
    parts = [p for p in parts if len(p)] or parts[:1]  # pandas deprecates concatenating empty frames
    out = pd.concat(parts, ignore_index=True).reindex(columns=CURATED_SCHEMA.fieldNames())
    # The other tables' columns are NaN after the concat; Arrow takes None as null in a string
    # or array column, not NaN.
    for column in _OBJECT_COLUMNS:
        out[column] = out[column].astype(object).where(out[column].notna(), None)
    return out


def curate_new_rows(new_topics: DataFrame, embeddings: DataFrame, tables: dict[str, DataFrame],
                    settings) -> DataFrame:
    """The ``dedup``, ``selected`` and ``merge_groups`` rows an increment adds (``CURATED_SCHEMA``)
    for ``new_topics`` (id, cluster, distance): steps 4 to 6 of ``mergeit_spark.incremental``. ``tables``: the
    ``dedup``, ``selected``, ``merge_groups`` and ``centroids`` tables before the increment, and
    ``records`` with the new ones (the texts of the lexical pass; without it, the semantic pass
    alone). Two passes: the new rows routed to their own and neighbouring clusters meet those
    clusters' kept rows (each new row's best match per cluster), then one pass per cluster with
    new rows (:class:`ClusterIncrement`) takes its new rows, their matches and its kept rows (and,
    for the lexical pass, every row's text)."""
    dedup = settings.dedup
    lexical = MinHashParams.from_settings(dedup) if "records" in tables else None
    vectors = embeddings.select("id", "embedding")
    # Three consumers (the probes, their home clusters, the pass): cached, joined once.
    new = new_topics.select("id", "cluster", "distance").join(vectors, "id")
    if lexical is not None:
        texts = record_texts(tables["records"])
        new = new.join(texts, "id", "left")
    new = new.persist()
    kept = tables["dedup"].filter(F.col("status") == KEPT).select("id", "cluster")
    neighbours = dedup.cross_cluster_neighbours if dedup.cross_cluster else 0
    probes = new.select("id", "cluster", "embedding").mapInArrow(
        RouteProbes(shipped_centers(tables["centroids"]), neighbours, home=True), ROUTED_SCHEMA)
    matches = (matches_per_cluster(probes, kept.withColumnRenamed("cluster", "target_cluster").join(vectors, "id"),
                                   dedup.threshold, dedup.block_size)
               .join(F.broadcast(new.select(F.col("id").alias("probe_id"), "cluster")), "probe_id")
               .select(F.col("probe_id").alias("id"), "cluster", F.lit("match").alias("role"),
                       F.col("target_id"), F.col("match_similarity").alias("similarity")))
    grouped = tables["merge_groups"].select(F.explode("member_ids").alias("id"), F.lit(True).alias("grouped"))
    touched = new_topics.select("cluster").distinct()
    old = (kept.join(touched, "cluster", "left_semi")
           .join(tables["selected"].select("id", F.col("rank").cast("double")), "id", "left")
           .join(grouped, "id", "left")
           .join(vectors, "id")
           .select("id", "cluster", F.lit("kept").alias("role"), "embedding", "rank",
                   F.coalesce("grouped", F.lit(False)).alias("grouped")))
    new_rows = new.select("id", "cluster", F.lit("new").alias("role"), "embedding",
                          F.col("distance").cast("double"), *(["text"] if lexical is not None else []))
    if lexical is not None:
        old = old.join(texts, "id", "left")
        old_duplicates = (tables["dedup"].filter(F.col("status") == DUPLICATE)
                          .join(touched, "cluster", "left_semi").join(texts, "id", "left")
                          .select("id", "cluster", F.lit("duplicate").alias("role"), "text"))
        new_rows = new_rows.unionByName(old_duplicates, allowMissingColumns=True)
    rows = new_rows.unionByName(old, allowMissingColumns=True).unionByName(matches, allowMissingColumns=True)
    curate = ClusterIncrement(dedup.threshold, dedup.block_size, settings.select.budget,
                              settings.select.block_size, settings.group.threshold, settings.group.size, lexical)
    return rows.groupBy("cluster").applyInPandas(lambda frame: curate(frame), CURATED_SCHEMA)


def curated_rows(curated: DataFrame, table: str) -> DataFrame:
    """``table``'s rows of ``curate_new_rows``' output, in its columns."""
    return curated.filter(F.col("table") == table).select(*CURATED_COLUMNS[table])

