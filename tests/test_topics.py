"""Topics stage (MLlib PCA + KMeans) on real embeddings, and the engine rule on driver collects."""
from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from deltalake import DeltaTable
from pyspark.ml.functions import array_to_vector

from _filter_helpers import sample_embeddings, sample_topics
from mergeit_spark.config import TopicsSettings
from mergeit_spark.models import (TOPICS_SCHEMA, TopicClustering, TopicModel, cluster_count, components_for_variance,
                                  fit_sample, kmeans_partitions, saved_pca_components)
from mergeit_spark.stages import StageContext
from mergeit_spark.tables import TableStore
from mergeit_spark.stages.topics import DISTANCE_QUANTILES, MODEL_NAME, Topics, assign_topics, fit_topics

PACKAGE = Path(__file__).resolve().parents[1] / "mergeit_spark"


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

    # Each centre carries its members' distance statistics (the yardstick for later rows).
    distance = {t["id"]: t["distance"] for t in topics}
    for c in centroids:
        mine = np.array([distance[i] for i in members.get(c["cluster"], [])])
        if mine.size == 0:
            assert (c["distance_mean"], c["distance_max"], c["distance_quantiles"]) == (0.0, 0.0, [])
            continue
        assert c["distance_max"] == pytest.approx(mine.max(), abs=1e-12)
        assert c["distance_mean"] == pytest.approx(mine.mean(), abs=1e-9)
        quantiles = c["distance_quantiles"]
        assert len(quantiles) == len(DISTANCE_QUANTILES) and quantiles == sorted(quantiles)
        for q, value in zip(DISTANCE_QUANTILES, quantiles):
            assert value in set(mine.tolist())  # approximate percentile: one of the members' values
            assert np.mean(mine <= value) >= q - 1.0 / mine.size


def test_single_cluster_when_k_is_one(spark, shared_data, settings):
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    stage = Topics()
    assert (stage.inputs, stage.outputs) == (("embeddings",), ("topics", "centroids"))
    topics, centroids = assign_topics(embeddings, dataclasses.replace(settings.topics, k=1))
    rows = centroids.collect()
    assert len(rows) == 1 and rows[0]["k"] == 1 and rows[0]["size"] == embeddings.count()
    assert topics.select("cluster").distinct().collect()[0]["cluster"] == 0
    assert topics.filter("distance < 0 OR distance IS NULL").count() == 0


def test_clusters_do_not_depend_on_shuffle_partitions_or_input_order(spark, shared_data, settings):
    """k-means|| seeds partition by partition: the k-means input is partitioned by the row count
    alone, so 2 or 16 shuffle partitions (and any input order) give the same clusters."""
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    n = embeddings.count()
    topic_settings = dataclasses.replace(settings.topics, partition_rows=64)  # several partitions
    before = spark.conf.get("spark.sql.shuffle.partitions")
    runs = []
    try:
        for shuffle_partitions, input_partitions in ((2, 3), (16, 5)):
            spark.conf.set("spark.sql.shuffle.partitions", str(shuffle_partitions))
            result = fit_topics(embeddings.repartition(input_partitions), topic_settings)
            runs.append(({r["id"]: (r["cluster"], r["distance"]) for r in result.topics.collect()}, result.summary))
            spark.catalog.clearCache()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)
    (first, first_summary), (second, second_summary) = runs
    assert first_summary["kmeans_partitions"] == second_summary["kmeans_partitions"] == kmeans_partitions(n, 64) > 2
    assert {i: c for i, (c, _) in first.items()} == {i: c for i, (c, _) in second.items()}
    for i, (_, distance) in first.items():
        assert second[i][1] == pytest.approx(distance, abs=1e-9)


@pytest.fixture(scope="module")
def stage_run(spark, shared_data, settings, tmp_path_factory):
    """The topics stage run once on the sample: its tables written, its model saved. The tests
    below only read them (one k-means fit for the file instead of one per test)."""
    store = TableStore(spark, tmp_path_factory.mktemp("topics") / "run")
    out = Topics().run(StageContext(spark, store, settings), {"embeddings": sample_embeddings(spark, shared_data,
                                                                                             settings.embed)})
    for table in ("topics", "centroids"):
        store.write(out[table], table)
    for name, model in out.models.items():  # as the executor saves them
        store.save_model(name, model)
    spark.catalog.clearCache()
    return store, out


def test_saved_model_reloads_and_assigns_rows_as_the_stage_did(spark, shared_data, settings, stage_run):
    store, out = stage_run
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    assert out.summary["k"] == cluster_count(embeddings.count()) and out.summary["cost"] > 0
    # Read back by an independent reader (delta-rs), not by Spark.
    written = DeltaTable(store.path("topics")).to_pandas().set_index("id")
    centroids = DeltaTable(store.path("centroids")).to_pandas().sort_values("cluster")

    model = TopicModel.load(store.model_path(MODEL_NAME))
    assert store.model_path(MODEL_NAME).uri == f"{store.root.uri}/_models/{MODEL_NAME}"
    assert saved_pca_components(store.model_path(MODEL_NAME) / "pipeline") is not None  # no fallback
    basis = model.basis  # a loaded model reads it from the saved PCA's data file, not through Spark
    assert [type(s).__name__ for s in model.pipeline.stages] == ["PCAModel", "VectorSlicer", "KMeansModel"]
    np.testing.assert_array_equal(basis, model.pipeline.stages[0].pc.toArray()[:, :model.components])
    assert model.k == len(centroids) and model.components == centroids["pca_components"].iloc[0]
    np.testing.assert_array_equal(model.centers, np.stack(centroids["center"].to_numpy()))
    again = model.transform(embeddings).toPandas().set_index("id")  # test-only: a few hundred rows
    assert sorted(again.index) == sorted(written.index)
    assert (again["cluster"] == written.loc[again.index, "cluster"]).all()
    np.testing.assert_allclose(again["distance"], written.loc[again.index, "distance"], rtol=0, atol=1e-12)

    # The saved MLlib pipeline alone (no project code) predicts the same topics.
    features = embeddings.select("id", array_to_vector("embedding").alias("features"))
    mllib = model.pipeline.transform(features).select("id", "cluster").toPandas().set_index("id")
    assert (mllib["cluster"] == written.loc[mllib.index, "cluster"]).all()


def test_new_rows_go_to_their_nearest_saved_centre_without_refit(spark, shared_data, settings, stage_run):
    store, _ = stage_run
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    model = TopicModel.load(store.model_path(MODEL_NAME))
    # New rows: real embeddings nudged off their place (test-only, a few dozen rows).
    rng = np.random.default_rng(5)
    rows = []
    for r in embeddings.limit(40).collect():
        v = np.asarray(r["embedding"], dtype=np.float64) + rng.normal(scale=0.05, size=len(r["embedding"]))
        rows.append((f"new-{r['id']}", (v / np.linalg.norm(v)).astype(np.float32).tolist()))
    new = spark.createDataFrame(rows, "id string, embedding array<float>")
    got = {r["id"]: r for r in model.transform(new).collect()}
    assert len(got) == len(rows)
    centers, basis = model.centers, model.basis
    for rid, vector in rows:
        x = np.asarray(vector, dtype=np.float64) @ basis
        distances = np.linalg.norm(centers - x, axis=1)
        assert got[rid]["cluster"] == int(np.argmin(distances))
        assert got[rid]["distance"] == pytest.approx(distances.min(), abs=1e-9)


def test_no_rows_no_model(spark, settings, store):
    empty = spark.createDataFrame([], "id string, embedding array<float>")
    out = Topics().run(StageContext(spark, store, settings), {"embeddings": empty})
    assert out["topics"].count() == 0 and out["centroids"].count() == 0
    with pytest.raises(FileNotFoundError):
        TopicModel.load(store.model_path(MODEL_NAME))


# --- the estimator and its model (models.py) ---------------------------------------------------
def _blobs(spark, n_per_blob=30, dim=8, seed=3):
    """Test-only: three tight blobs of unit vectors (id, embedding), 90 rows, created on the driver."""
    rng = np.random.default_rng(seed)
    rows = []
    for blob in range(3):
        centre = np.zeros(dim)
        centre[blob] = 1.0
        for i in range(n_per_blob):
            v = centre + rng.normal(scale=0.05, size=dim)
            rows.append((f"b{blob}-{i:02d}", (v / np.linalg.norm(v)).astype(np.float32).tolist()))
    return spark.createDataFrame(rows, "id string, embedding array<float>")


def test_topic_clustering_takes_its_defaults_and_parameters_from_the_settings():
    defaults = TopicsSettings()
    names = [f.name for f in dataclasses.fields(TopicsSettings)]
    assert [f.name for f in dataclasses.fields(TopicClustering)] == names  # a new knob must be a parameter
    assert dataclasses.asdict(TopicClustering()) == {n: getattr(defaults, n) for n in names}
    tuned = dataclasses.replace(defaults, k=7, variance=0.8, seed=1, partition_rows=64)
    assert dataclasses.asdict(TopicClustering.from_settings(tuned)) == dataclasses.asdict(tuned)
    with pytest.raises(ValueError, match="variance"):
        TopicClustering(variance=0.0)


def test_topic_model_saves_and_loads_back_assigning_the_same_topics(spark, tmp_path):
    embeddings = _blobs(spark)
    fitted = TopicClustering(k=3, partition_rows=32).fit(embeddings)
    assert fitted.k == 3 and fitted.summary["rows"] == 90 and fitted.summary["kmeans_partitions"] == 3
    assert fitted.summary["k"] == 3 and fitted.summary["pca_components"] == fitted.components
    assert fitted.explained_variance == pytest.approx(fitted.summary["explained_variance"])
    before = fitted.transform(embeddings)
    assert before.schema == TOPICS_SCHEMA
    before = before.toPandas().set_index("id").sort_index()  # test-only: 90 rows
    assert before.groupby("cluster").size().tolist() == [30, 30, 30]  # the three blobs

    path = str(tmp_path / "model")
    fitted.save(path)
    fitted.save(path)  # replaces what is there
    loaded = TopicModel.load(path)
    assert loaded.fitted is None and loaded.summary == {} and loaded.path.local == path
    assert saved_pca_components(tmp_path / "model" / "pipeline") is not None  # the basis without Spark
    assert loaded.k == fitted.k and loaded.components == fitted.components
    assert loaded.explained_variance == fitted.explained_variance
    assert loaded.centroids == fitted.centroids  # the fit's rows, as they were
    np.testing.assert_array_equal(loaded.centers, fitted.centers)
    np.testing.assert_array_equal(loaded.basis, fitted.basis)
    assert [type(s).__name__ for s in loaded.pipeline.stages] == ["PCAModel", "VectorSlicer", "KMeansModel"]
    after = loaded.transform(embeddings).toPandas().set_index("id").sort_index()
    assert list(after.index) == list(before.index)
    assert (after["cluster"] == before["cluster"]).all()
    np.testing.assert_array_equal(after["distance"].to_numpy(), before["distance"].to_numpy())

    # A file:// URI names the same folder; a folder without a model is an error.
    uri = TopicModel.load((tmp_path / "model").as_uri())
    assert uri.centroids == loaded.centroids
    np.testing.assert_array_equal(uri.basis, loaded.basis)
    with pytest.raises(FileNotFoundError):
        TopicModel.load(str(tmp_path / "nothing"))
    TopicModel.remove(path)
    with pytest.raises(FileNotFoundError):
        TopicModel.load(path)


def test_fit_sample_is_about_fit_rows_ids_whatever_the_partitioning(spark, shared_data, settings):
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    n = embeddings.count()
    for fit_rows in (n, n + 1, 0):  # at or under fit_rows, or no limit: every row
        rows, count = fit_sample(embeddings, n, fit_rows, seed=42)
        assert rows is embeddings and count == n
    half, expected = fit_sample(embeddings, n, n // 2, seed=42)
    assert abs(expected - n // 2) <= 1
    ids = {r["id"] for r in half.select("id").collect()}  # test-only: a few hundred ids
    assert abs(len(ids) - n / 2) <= 4 * math.sqrt(n / 4)  # a binomial draw of about n/2
    spread, _ = fit_sample(embeddings.repartition(7), n, n // 2, seed=42)
    assert {r["id"] for r in spread.select("id").collect()} == ids  # the ids decide, not the layout
    other, _ = fit_sample(embeddings, n, n // 2, seed=7)
    assert {r["id"] for r in other.select("id").collect()} != ids


def test_a_sampled_fit_keeps_k_of_all_rows_assigns_every_row_and_costs_all(spark, shared_data, settings):
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    n = embeddings.count()
    per_cluster = n // (2 * cluster_count(n))  # about half the rows
    sampled = dataclasses.replace(settings.topics, fit_rows_per_cluster=per_cluster)
    result = fit_topics(embeddings, sampled)
    _, in_sample = fit_sample(embeddings, n, per_cluster * cluster_count(n), seed=sampled.seed)
    summary = result.summary
    assert summary["rows"] == n and summary["k"] == cluster_count(n)  # k from all n rows, not the sample
    assert summary["fit_rows"] < n and abs(summary["fit_rows"] - in_sample) <= 4 * math.sqrt(n / 4)
    assert summary["kmeans_partitions"] == kmeans_partitions(in_sample, sampled.partition_rows)
    topics = result.topics.toPandas()  # test-only: a few hundred rows
    assert len(topics) == n and topics["id"].is_unique
    assert summary["cost"] == pytest.approx(float((topics["distance"] ** 2).sum()), rel=1e-9)
    full = fit_topics(embeddings, dataclasses.replace(settings.topics, fit_rows_per_cluster=0)).summary
    assert full["fit_rows"] == n and full["k"] == summary["k"]
    # Fitted on half the rows, the clustering of all of them stays close to the full fit's.
    assert summary["cost"] <= 1.10 * full["cost"]


def test_one_row_is_one_topic_at_its_own_centre(spark, settings):
    """MLlib's PCA refuses a covariance of one row; a run of one record still gets its topic."""
    one = spark.createDataFrame([("a", [0.6, 0.8, 0.0])], "id string, embedding array<float>")
    result = fit_topics(one, settings.topics)
    assert [tuple(r) for r in result.topics.collect()] == [("a", 0, 0.0)]
    assert result.summary["k"] == 1 and result.summary["pca_components"] == 1 and result.summary["cost"] == 0.0


def test_topic_clustering_refuses_no_rows(spark):
    with pytest.raises(ValueError, match="no rows"):
        TopicClustering().fit(spark.createDataFrame([], "id string, embedding array<float>"))


# --- engine rule: no row-scale data on the driver ---------------------------------------------
# Every driver-side fetch in the filtering stages, with why it is small. Anything else fails.
DRIVER_FETCHES = {
    "models.py": [
        ("collect", "gc"),  # the garbage collector's pass in a worker (freeze_worker_heap), no rows
        ("count", "embeddings"),                                        # one number
        ("first", 'embeddings.select(F.size("embedding")'),             # one row: the dimension
        ("count", "projected"),                                         # one number: fills the cache
        ("first", "projected.agg(Summarizer.mean("),                    # one row (k = 1 only)
    ],
    "pca.py": [
        ("collect", "partials"),                                        # at most MERGE_FAN_IN d x d matrices
    ],
    "stages/embed.py": [],
    "stages/topics.py": [
        ("collect", 'topics.groupBy("cluster")'),           # k rows: per-cluster distance statistics
        ("collect", "model.cluster_sums(embeddings)"),      # k rows: per-cluster embedding sums
    ],
    "stages/dedup.py": [
        ("take", 'batch.column("id")'),  # pyarrow take inside the executor-side probe router
        ("take", "embedding"),           # same
        ("collect", 'centroids.filter(F.col("size") > 0)'),  # k rows: the centroid matrix
        ("count", "first"),              # one number: materialises the cached first pass
        ("collect", 'curated.groupBy("table", "status").count()'),  # a few rows: the increment's counts
        ("count", 'curated.groupBy("table", "status")'),  # (GroupedData.count: the aggregate collected above)
    ],
    "stages/select.py": [],
}
FETCH_METHODS = {"collect", "toPandas", "toLocalIterator", "first", "take", "head", "tail", "count",
                 "toArrow", "collectAsList"}


@pytest.mark.parametrize("module", sorted(DRIVER_FETCHES))
def test_stages_fetch_only_small_things_to_the_driver(module):
    source = (PACKAGE / module).read_text()
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FETCH_METHODS:
            receiver = ast.get_source_segment(source, node.func.value) or ""
            if receiver == "F":  # pyspark.sql.functions.count & co.: aggregates, not fetches
                continue
            if receiver.startswith("pa."):  # a pyarrow array built in place (Array.take): executor-side
                continue
            calls.append((node.lineno, node.col_offset, node.func.attr, receiver))
    found = [(method, receiver) for _, _, method, receiver in sorted(calls)]
    allowed = DRIVER_FETCHES[module]
    assert len(found) == len(allowed), found
    for (method, receiver), (allowed_method, allowed_prefix) in zip(found, allowed):
        assert method == allowed_method and receiver.startswith(allowed_prefix), (method, receiver)
    assert ".rdd.collect" not in source and "toPandas" not in source and "toLocalIterator" not in source
