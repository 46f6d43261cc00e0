"""The topic model's PCA (mergeit_spark/pca.py): partial scatters that add up exactly, components
that are the covariance's eigenvectors whatever the partitioning, and an MLlib PCAModel holding them."""
from __future__ import annotations

import numpy as np
import pytest

from pyspark.ml import PipelineModel
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import functions as F

from _filter_helpers import sample_embeddings
from mergeit_spark.pca import MERGE_FAN_IN, Scatter, components, fit_pca


def _numpy_scatter(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0)
    return centred.T @ centred


@pytest.mark.parametrize("cuts", [[], [1], [3, 4, 40], list(range(1, 50))])
def test_partial_scatters_add_up_to_the_scatter_of_all_rows(cuts):
    x = np.random.default_rng(5).normal(loc=3.0, size=(50, 6))  # off-centre: cancellation would show
    parts = [Scatter.of(chunk) for chunk in np.split(x, cuts) if len(chunk)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    assert total.rows == 50
    np.testing.assert_allclose(total.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(total.scatter, _numpy_scatter(x), rtol=1e-10, atol=1e-10)


def test_components_are_orthonormal_by_decreasing_variance_with_a_fixed_sign():
    x = np.random.default_rng(6).normal(size=(30, 8)) * np.arange(8, 0, -1)
    pc, shares = components(_numpy_scatter(x))
    np.testing.assert_allclose(pc.T @ pc, np.eye(8), atol=1e-12)
    assert np.all(np.diff(shares) <= 0) and shares.sum() == pytest.approx(1.0)
    variances = np.einsum("ij,ij->j", pc, _numpy_scatter(x) @ pc)
    np.testing.assert_allclose(variances / variances.sum(), shares, rtol=1e-9)
    assert np.all(pc[np.argmax(np.abs(pc), axis=0), np.arange(8)] > 0)
    flipped, _ = components(_numpy_scatter(-x))  # the same rows mirrored: the same components
    np.testing.assert_allclose(flipped, pc, atol=1e-10)


def test_rows_all_the_same_have_no_variance_to_share():
    _, shares = components(_numpy_scatter(np.ones((4, 3))))
    assert np.all(np.isnan(shares))


@pytest.mark.parametrize("partitions", [1, 3, MERGE_FAN_IN + 9])  # the last merges on executors first
def test_fit_pca_gives_the_covariance_eigenvectors_on_any_layout(spark, shared_data, settings, partitions):
    """Real embeddings, fewer rows than dimensions (the rank-deficient case MLlib's F2J SVD can
    get wrong): shares and components are numpy's, and the PCAModel projects rows onto them."""
    embeddings = sample_embeddings(spark, shared_data, settings.embed)
    x = np.array([r["embedding"] for r in embeddings.orderBy("id").collect()], dtype=np.float64)  # test-only
    frame = embeddings.repartition(partitions)
    model = fit_pca(frame, "embedding").mllib(spark, output_col="pca_full")
    pc, shares = model.pc.toArray(), model.explainedVariance.toArray()
    scatter = _numpy_scatter(x)
    expected = np.sort(np.clip(np.linalg.eigvalsh(scatter), 0, None))[::-1]
    assert x.shape[0] < x.shape[1] and pc.shape == (x.shape[1], x.shape[1]) and model.getK() == x.shape[1]
    np.testing.assert_allclose(shares, expected / expected.sum(), atol=1e-12)
    np.testing.assert_allclose(pc.T @ pc, np.eye(x.shape[1]), atol=1e-9)
    # Each column is an eigenvector of the scatter with its share's variance (whatever rotation
    # LAPACK picks inside a repeated eigenvalue), its largest entry positive.
    residual = scatter @ pc - pc * (shares * np.trace(scatter))
    assert np.abs(residual).max() < 1e-9 * np.abs(scatter).max()
    assert np.all(pc[np.argmax(np.abs(pc), axis=0), np.arange(pc.shape[1])] > 0)
    # The PCAModel is MLlib's, in a PipelineModel that saves and loads like any other.
    rows = frame.select("id", array_to_vector(F.col("embedding")).alias("features"))
    projected = PipelineModel(stages=[model]).transform(rows)
    got = {r["id"]: np.asarray(r["p"]) for r in projected.select("id", vector_to_array("pca_full").alias("p")).collect()}
    ids = sorted(got)
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), x @ pc, atol=1e-9)


def test_fit_pca_refuses_no_rows(spark):
    with pytest.raises(ValueError, match="no rows"):
        fit_pca(spark.createDataFrame([], "embedding array<float>"), "embedding")
