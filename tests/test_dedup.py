"""Dedup stage on real embeddings: planted near-duplicates, the keep rule, the cross-cluster check."""
from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import pytest
from pyspark import SparkContext
from pyspark.sql import functions as F

from _filter_helpers import filter_sample, sample_dedup, sample_embeddings, sample_topics
from mergeit_spark.stages.dedup import DUPLICATE, KEPT, Dedup, find_duplicates, leader_dedup


def _embeddings_by_id(spark, shared_data, settings) -> dict[str, np.ndarray]:
    return {r["id"]: np.asarray(r["embedding"], dtype=np.float32)
            for r in sample_embeddings(spark, shared_data, settings.embed).collect()}


def _run(spark, shared_data, settings, topics=None, records=None, **changes):
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    sample_t, centroids = sample_topics(spark, shared_data, settings)
    dedup_settings = dataclasses.replace(settings.dedup, **changes)
    return find_duplicates(embeddings, topics if topics is not None else sample_t, centroids, dedup_settings,
                           records=records)


def _default_result(spark, shared_data, settings) -> dict[str, dict]:
    return {r["id"]: r.asDict() for r in sample_dedup(spark, shared_data, settings).collect()}


def test_ledger_balances_and_duplicates_point_at_kept_rows(spark, shared_data, settings):
    rows = _default_result(spark, shared_data, settings)
    n = sample_embeddings(spark, shared_data, settings.embed).count()
    assert len(rows) == n  # one row per embedding, no id twice
    statuses = [r["status"] for r in rows.values()]
    assert statuses.count(KEPT) + statuses.count(DUPLICATE) == n
    assert statuses.count(DUPLICATE) > 0
    for r in rows.values():
        if r["status"] == KEPT:
            assert r["duplicate_of"] is None and r["similarity"] is None and r["method"] is None
        else:
            assert rows[r["duplicate_of"]]["status"] == KEPT  # never a duplicate of a duplicate
            assert r["similarity"] is not None and r["method"] == "semantic"  # no texts: semantic alone


def test_planted_near_duplicates_point_at_their_kept_twin(spark, shared_data, settings):
    sample = filter_sample(spark, shared_data)
    rows = _default_result(spark, shared_data, settings)
    distance = {t["id"]: t["distance"] for t in sample_topics(spark, shared_data, settings)[0].collect()}
    vectors = _embeddings_by_id(spark, shared_data, settings)
    assert len(sample.planted) == 10
    for original, copies in sample.planted.items():
        group = [original, *copies]
        for a in group:  # the plant is real: the edited copies are near-duplicates to the model
            for b in group:
                assert float(vectors[a] @ vectors[b]) >= settings.dedup.threshold
        assert len({rows[i]["cluster"] for i in group}) == 1
        # Keep rule: the member nearest its centroid (ties by id) is kept, the others point at it.
        keeper = min(group, key=lambda i: (distance[i], i))
        assert rows[keeper]["status"] == KEPT
        for other in group:
            if other != keeper:
                assert rows[other]["status"] == DUPLICATE
                assert rows[other]["duplicate_of"] == keeper
                assert rows[other]["similarity"] == pytest.approx(float(vectors[other] @ vectors[keeper]), abs=1e-5)


def _naive_leader(ids, distances, vectors, threshold):
    """Independent reference: visit rows nearest-first (ties by id), compare with every kept row."""
    order = sorted(range(len(ids)), key=lambda i: (distances[i], ids[i]))
    kept: list[int] = []
    out = {}
    for i in order:
        best, best_sim = None, -2.0
        for j in kept:
            sim = float(np.dot(vectors[i].astype(np.float64), vectors[j].astype(np.float64)))
            if sim > best_sim + 1e-7:  # strict, so the earlier kept row wins a tie
                best, best_sim = j, sim
        if best is not None and best_sim >= threshold:
            out[ids[i]] = (DUPLICATE, ids[best], best_sim)
        else:
            kept.append(i)
            out[ids[i]] = (KEPT, None, None)
    return out


@pytest.mark.parametrize("block_size", [16, 1024])
def test_within_cluster_result_equals_an_independent_implementation(spark, shared_data, settings, block_size):
    got = {r["id"]: r for r in _run(spark, shared_data, settings, cross_cluster=False,
                                     block_size=block_size).collect()}
    vectors = _embeddings_by_id(spark, shared_data, settings)
    topics = sample_topics(spark, shared_data, settings)[0].collect()
    clusters: dict[int, list] = {}
    for t in topics:
        clusters.setdefault(t["cluster"], []).append(t)
    expected = {}
    for members in clusters.values():
        ids = [t["id"] for t in members]
        expected.update(_naive_leader(ids, [t["distance"] for t in members], [vectors[i] for i in ids],
                                      settings.dedup.threshold))
    assert set(got) == set(expected)
    for rid, (status, target, sim) in expected.items():
        assert (got[rid]["status"], got[rid]["duplicate_of"]) == (status, target), rid
        if sim is not None:
            assert got[rid]["similarity"] == pytest.approx(sim, abs=1e-5)


def test_leader_dedup_blocks_do_not_change_the_result():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(40, 24)).astype(np.float32)
    x = np.repeat(base, 3, axis=0) + rng.normal(scale=0.04, size=(120, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x[rng.permutation(120)]
    reference = leader_dedup(x, 0.95, 1000)
    for block in (1, 5, 17, 64):
        result = leader_dedup(x, 0.95, block)
        np.testing.assert_array_equal(result[0], reference[0])
        np.testing.assert_array_equal(result[1], reference[1])
        np.testing.assert_allclose(result[2], reference[2], atol=1e-6)
    kept = np.flatnonzero(reference[0])
    sims = x[kept] @ x[kept].T
    assert (sims[~np.eye(len(kept), dtype=bool)] < 0.95).all()  # kept rows are pairwise below


def test_cross_cluster_pairs_are_found_through_the_broadcast_centroids(spark, shared_data, settings, monkeypatch):
    """k-means splitting a near-duplicate pair is simulated by moving planted copies to the
    nearest other cluster, farther from its centre than any member: the far-row check must find
    them, point them (and rows that pointed at them) at the kept twin, and only with the check on."""
    sample = filter_sample(spark, shared_data)
    topics, centroids = sample_topics(spark, shared_data, settings)
    rows = {t["id"]: t for t in topics.collect()}
    centroid_rows = centroids.collect()
    centres = {c["cluster"]: np.asarray(c["embedding_center"]) for c in centroid_rows if c["size"] > 0}
    big = {c["cluster"] for c in centroid_rows if c["size"] >= 12}
    vectors = _embeddings_by_id(spark, shared_data, settings)
    baseline = _default_result(spark, shared_data, settings)
    # A triple: the original and two copies. Keep the kept member home, move the two others.
    original, copies = next((o, c) for o, c in sample.planted.items() if len(c) == 2)
    group = [original, *copies]
    twin = next(i for i in group if baseline[i]["status"] == KEPT)
    moved = [i for i in group if i != twin]
    home = rows[twin]["cluster"]
    cluster_distances = [t["distance"] for t in rows.values() if t["cluster"] == home]
    assert rows[twin]["distance"] <= np.quantile(cluster_distances, settings.dedup.cross_cluster_quantile)
    # A cluster big enough that its quantile falls below the two moved rows, so both are far.
    away = min((c for c in big if c != home),
               key=lambda c: float(np.sum((vectors[moved[0]] - centres[c]) ** 2)))
    top = max(t["distance"] for t in rows.values() if t["cluster"] == away)
    new_distance = {moved[0]: top + 1.0, moved[1]: top + 2.0}  # moved[0] leads, moved[1] follows it
    changed = topics
    for rid, dist in new_distance.items():
        changed = changed.withColumn("cluster", F.when(F.col("id") == rid, F.lit(away)).otherwise(F.col("cluster")))
        changed = changed.withColumn("distance", F.when(F.col("id") == rid, F.lit(dist)).otherwise(F.col("distance")))

    without = {r["id"]: r for r in _run(spark, shared_data, settings, topics=changed, cross_cluster=False).collect()}
    assert without[moved[0]]["status"] == KEPT  # alone in its new cluster, nothing to match
    assert without[moved[1]]["duplicate_of"] == moved[0]

    broadcasts = []
    real_broadcast = SparkContext.broadcast

    def spy(self, value):
        broadcasts.append(value)
        return real_broadcast(self, value)

    monkeypatch.setattr(SparkContext, "broadcast", spy)
    with_check = {r["id"]: r for r in _run(spark, shared_data, settings, topics=changed).collect()}
    assert len(broadcasts) == 1
    cluster_ids, matrix = broadcasts[0]
    assert matrix.shape == (len(centres), 384) and sorted(cluster_ids.tolist()) == sorted(centres)

    for rid in moved:
        assert with_check[rid]["status"] == DUPLICATE
        assert with_check[rid]["duplicate_of"] == twin
        assert with_check[rid]["cluster"] == away
        assert with_check[rid]["similarity"] == pytest.approx(float(vectors[rid] @ vectors[twin]), abs=1e-5)
    assert with_check[twin]["status"] == KEPT
    assert len(with_check) == len(rows)
    for r in with_check.values():
        if r["status"] == DUPLICATE:
            assert with_check[r["duplicate_of"]]["status"] == KEPT


def test_first_pass_runs_once_so_every_consumer_sees_one_result(spark, shared_data, settings, tmp_path):
    """The first pass feeds four consumers (kept rows, probes, direct, moved). Its input here is
    drawn anew each time it is computed (a non-deterministic Python UDF, which also logs every
    call to a file): read once, the result is consistent; recomputed per consumer, the consumers
    would see different first passes and a duplicate could point at a row that is not kept."""
    calls = tmp_path / "calls"
    calls.mkdir()

    def redrawn_distance(distance: float) -> float:
        with open(calls / str(os.getpid()), "a") as log:  # executors here share this filesystem
            log.write("1\n")
        return random.random()

    redraw = F.udf(redrawn_distance, "double").asNondeterministic()
    topics, centroids = sample_topics(spark, shared_data, settings)
    noisy = topics.withColumn("distance", redraw("distance"))
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    # Quantile 0: every row but each cluster's nearest is far, so nearly every kept row is a probe.
    rows = {r["id"]: r for r in find_duplicates(embeddings, noisy, centroids,
                                                dataclasses.replace(settings.dedup, cross_cluster_quantile=0.0)
                                                ).collect()}
    n = embeddings.count()
    assert sum(len(p.read_text().splitlines()) for p in calls.iterdir()) == n  # computed once
    assert len(rows) == n
    for r in rows.values():
        if r["status"] == DUPLICATE:
            assert rows[r["duplicate_of"]]["status"] == KEPT
    spark.catalog.clearCache()


def test_minhash_off_with_records_equals_the_semantic_pass(spark, shared_data, settings):
    """With the texts at hand and ``dedup.minhash`` off, the result is the semantic pass's, row for
    row (the lexical pass's own tests are in test_lexical.py)."""
    records = filter_sample(spark, shared_data).frame
    off = {r["id"]: r.asDict() for r in _run(spark, shared_data, settings, records=records, minhash=False).collect()}
    assert off == _default_result(spark, shared_data, settings)
    assert {r["method"] for r in off.values()} == {None, "semantic"}


def test_planted_near_duplicates_stay_semantic_with_the_lexical_pass_on(spark, shared_data, settings):
    """The sample's planted copies are semantic near-duplicates: with the lexical pass on they
    still point at their kept twin, found by the semantic measure (it is preferred)."""
    sample = filter_sample(spark, shared_data)
    both = {r["id"]: r.asDict() for r in _run(spark, shared_data, settings, records=sample.frame).collect()}
    semantic = _default_result(spark, shared_data, settings)
    assert len(both) == len(semantic)
    for original, copies in sample.planted.items():
        for rid in [original, *copies]:
            assert both[rid]["status"] == semantic[rid]["status"]
            if both[rid]["status"] == DUPLICATE:
                assert (both[rid]["duplicate_of"], both[rid]["method"]) == (semantic[rid]["duplicate_of"], "semantic")
    for r in both.values():
        if r["status"] == DUPLICATE:
            assert both[r["duplicate_of"]]["status"] == KEPT


def test_stage_wrapper(spark, shared_data, settings, store):
    from mergeit_spark.stages import StageContext
    stage = Dedup()
    assert stage.inputs == ("records", "embeddings", "topics", "centroids") and stage.outputs == ("dedup",)
    topics, centroids = sample_topics(spark, shared_data, settings)
    out = stage.run(StageContext(spark, store, settings), {
        "records": filter_sample(spark, shared_data).frame,
        "embeddings": sample_embeddings(spark, shared_data, settings.embed), "topics": topics,
        "centroids": centroids})
    store.write(out["dedup"], "dedup")
    back = store.read("dedup")
    assert back.columns == ["id", "cluster", "status", "duplicate_of", "similarity", "method"]
    assert back.count() == sample_embeddings(spark, shared_data, settings.embed).count()
