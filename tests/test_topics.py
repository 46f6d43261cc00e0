"""Topics stage (MLlib PCA + KMeans) on real embeddings, and the engine rule on driver collects."""
from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from _filter_helpers import sample_embeddings, sample_topics
from mergeit_spark.stages.topics import Topics, assign_topics, cluster_count, components_for_variance

STAGES = Path(__file__).resolve().parents[1] / "mergeit_spark" / "stages"


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 1), (2, 1), (7, 1), (8, 2), (200, 10), (412, 14),
                                         (17153, 92), (10**6, 707)])
def test_k_follows_the_paper_rule(n, expected):
    assert cluster_count(n) == expected == (max(1, min(int(math.sqrt(n / 2)), n)) if n else 0)


def test_k_setting_wins_but_never_exceeds_n():
    assert cluster_count(100, 5) == 5
    assert cluster_count(3, 5) == 3


def test_components_for_variance_is_the_smallest_reaching_the_target():
    shares = np.array([0.5, 0.3, 0.15, 0.04, 0.01])
    assert components_for_variance(shares, 0.5) == 1
    assert components_for_variance(shares, 0.8) == 2
    assert components_for_variance(shares, 0.95) == 3
    assert components_for_variance(shares, 0.96) == 4
    assert components_for_variance(shares, 1.0) == 5


def _collected(spark, shared_data, settings):
    """Test-only: the sample's embeddings, topics and centroids on the driver (a few hundred rows)."""
    embeddings = {r["id"]: np.asarray(r["embedding"], dtype=np.float64)
                  for r in sample_embeddings(spark, shared_data, settings.embed).collect()}
    topics, centroids = sample_topics(spark, shared_data, settings)
    return embeddings, topics.collect(), centroids.orderBy("cluster").collect()


def test_pca_reaches_the_variance_target_and_one_fewer_does_not(spark, shared_data, settings):
    embeddings, _, centroids = _collected(spark, shared_data, settings)
    x = np.stack(list(embeddings.values()))
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    cumulative = np.cumsum(eigenvalues) / eigenvalues.sum()
    m = centroids[0]["pca_components"]
    assert {c["pca_components"] for c in centroids} == {m}
    assert cumulative[m - 1] >= settings.topics.variance
    assert cumulative[m - 2] < settings.topics.variance
    assert centroids[0]["explained_variance"] == pytest.approx(cumulative[m - 1], abs=1e-6)
    assert all(len(c["center"]) == m for c in centroids)
    assert centroids[0]["embedding_dim"] == x.shape[1]


def test_clusters_sizes_and_distances(spark, shared_data, settings):
    embeddings, topics, centroids = _collected(spark, shared_data, settings)
    n = len(embeddings)
    k = cluster_count(n)
    assert {c["k"] for c in centroids} == {k} and len(centroids) == k
    assert len(topics) == n and {t["id"] for t in topics} == set(embeddings)
    members: dict[int, list[str]] = {}
    for t in topics:
        members.setdefault(t["cluster"], []).append(t["id"])
    assert set(members) <= set(range(k))
    assert [c["size"] for c in centroids] == [len(members.get(c["cluster"], [])) for c in centroids]
    assert sum(c["size"] for c in centroids) == n

    # embedding_center is the mean of the members' unit embeddings (the model's space).
    for c in centroids:
        ids = members.get(c["cluster"], [])
        if ids:
            np.testing.assert_allclose(c["embedding_center"], np.mean([embeddings[i] for i in ids], axis=0),
                                       atol=1e-6)

    # distance is the Euclidean distance to the centroid in the m-component PCA space: project
    # with numpy's own eigenvectors (signs may differ from MLlib's; distances do not care) and
    # compare with the distance to the members' mean, which a converged k-means centre is.
    x = np.stack(list(embeddings.values()))
    index = {i: j for j, i in enumerate(embeddings)}
    m = centroids[0]["pca_components"]
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    basis = vectors[:, np.argsort(values)[::-1][:m]]
    projected = x @ basis
    for t in topics:
        own = projected[[index[i] for i in members[t["cluster"]]]].mean(axis=0)
        assert t["distance"] == pytest.approx(np.linalg.norm(projected[index[t["id"]]] - own), abs=2e-3)
    # The centre table agrees with the members' mean up to a sign per component.
    for c in centroids:
        ids = members.get(c["cluster"], [])
        if ids:
            mean = projected[[index[i] for i in ids]].mean(axis=0)
            np.testing.assert_allclose(np.abs(c["center"]), np.abs(mean), atol=2e-3)


def test_single_cluster_when_k_is_one(spark, shared_data, settings):
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    stage = Topics()
    assert (stage.inputs, stage.outputs) == (("embeddings",), ("topics", "centroids"))
    topics, centroids = assign_topics(embeddings, dataclasses.replace(settings.topics, k=1))
    rows = centroids.collect()
    assert len(rows) == 1 and rows[0]["k"] == 1 and rows[0]["size"] == embeddings.count()
    assert topics.select("cluster").distinct().collect()[0]["cluster"] == 0
    assert topics.filter("distance < 0 OR distance IS NULL").count() == 0


# --- engine rule: no row-scale data on the driver ---------------------------------------------
# Every driver-side fetch in the filtering stages, with why it is small. Anything else fails.
DRIVER_FETCHES = {
    "embed.py": [],
    "topics.py": [
        ("count", "vectors"),                                           # one number
        ("first", 'embeddings.select(F.size("embedding")'),             # one row: the dimension
        ("first", 'projected.agg(Summarizer.mean(F.col("pca"))'),       # one row (k = 1 only)
        ("collect", 'assigned.groupBy("cluster").agg('),                # k rows: sizes and means
    ],
    "dedup.py": [
        ("take", 'batch.column("id")'),  # pyarrow take inside the executor-side probe router
        ("take", "embedding"),           # same
        ("collect", 'centroids.filter(F.col("size") > 0)'),  # k rows: the centroid matrix
    ],
    "select.py": [],
}
FETCH_METHODS = {"collect", "toPandas", "toLocalIterator", "first", "take", "head", "tail", "count",
                 "toArrow", "collectAsList"}


@pytest.mark.parametrize("module", sorted(DRIVER_FETCHES))
def test_stages_fetch_only_small_things_to_the_driver(module):
    source = (STAGES / module).read_text()
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FETCH_METHODS:
            receiver = ast.get_source_segment(source, node.func.value) or ""
            if receiver == "F":  # pyspark.sql.functions.count & co.: aggregates, not fetches
                continue
            calls.append((node.lineno, node.col_offset, node.func.attr, receiver))
    found = [(method, receiver) for _, _, method, receiver in sorted(calls)]
    allowed = DRIVER_FETCHES[module]
    assert len(found) == len(allowed), found
    for (method, receiver), (allowed_method, allowed_prefix) in zip(found, allowed):
        assert method == allowed_method and receiver.startswith(allowed_prefix), (method, receiver)
    assert ".rdd.collect" not in source and "toPandas" not in source and "toLocalIterator" not in source
