"""Principal components of a vector column: the scatter matrix summed over partitions, then
numpy's symmetric eigensolver on the driver; the result is an MLlib ``PCAModel``.

Why not MLlib's ``PCA.fit``: it takes the SVD of the covariance with the JVM's LAPACK, which is
F2J's pure-Java translation (dgesdd) when no native LAPACK is installed. On a rank-deficient
covariance (fewer rows than dimensions: a small run, a small re-cluster) it can return
"components" that are not orthonormal and explained variances that do not add up to the
variance, without an error: the topics are then silently wrong, and the same rows give other
topics when their embeddings differ in the last bit. Here the covariance is decomposed by
LAPACK's symmetric solver through numpy (``numpy.linalg.eigh``).

How the covariance is built, so that it is accurate and the same on every layout of the same
partitions: each partition's rows are centred on their own mean (float64) and their scatter
summed; partial scatters are combined by the pairwise update of Chan, Golub and LeVeque (exact
in exact arithmetic, no large-minus-large cancellation), in partition order. Above
``MERGE_FAN_IN`` partitions the partials are merged by executors in groups first, so the driver
receives at most that many d x d matrices.

Components come back sorted by decreasing variance, each with its largest entry positive (an
eigenvector's sign is arbitrary; this fixes it, whatever LAPACK build ran).
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
from pyspark import TaskContext
from pyspark.ml.feature import PCAModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

# The most partial scatters the driver combines itself (each is d x d float64: 1.2 MB at d = 384).
MERGE_FAN_IN = 16

SCATTER_SCHEMA = T.StructType([
    T.StructField("part", T.IntegerType(), False),   # the first partition it covers: the merge order
    T.StructField("rows", T.LongType(), False),
    T.StructField("mean", T.BinaryType(), False),     # d float64
    T.StructField("scatter", T.BinaryType(), False),  # d x d float64: sum of (x - mean)(x - mean)^T
])
_ARROW_SCHEMA = pa.schema([pa.field("part", pa.int32(), False), pa.field("rows", pa.int64(), False),
                           pa.field("mean", pa.binary(), False), pa.field("scatter", pa.binary(), False)])


@dataclass(frozen=True)
class Scatter:
    """Rows, their mean and their scatter matrix about that mean."""

    rows: int
    mean: np.ndarray     # d
    scatter: np.ndarray  # d x d

    @classmethod
    def of(cls, x: np.ndarray) -> "Scatter":
        mean = x.mean(axis=0)
        centred = x - mean
        return cls(len(x), mean, centred.T @ centred)

    def __add__(self, other: "Scatter") -> "Scatter":
        """The scatter of both row sets (Chan, Golub and LeVeque's pairwise update)."""
        n = self.rows + other.rows
        delta = other.mean - self.mean
        return Scatter(n, self.mean + delta * (other.rows / n),
                       self.scatter + other.scatter + np.outer(delta, delta) * (self.rows * other.rows / n))

    def to_batch(self, part: int) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays(
            [pa.array([part], pa.int32()), pa.array([self.rows], pa.int64()),
             pa.array([self.mean.tobytes()], pa.binary()), pa.array([self.scatter.tobytes()], pa.binary())],
            schema=_ARROW_SCHEMA)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Scatter":
        """The scatter a ``SCATTER_SCHEMA`` row holds."""
        mean = np.frombuffer(row["mean"], dtype=np.float64)
        return cls(row["rows"], mean, np.frombuffer(row["scatter"], dtype=np.float64).reshape(mean.size, mean.size))


def _added(total: Scatter | None, part: Scatter) -> Scatter:
    return part if total is None else total + part


@dataclass(frozen=True)
class _PartitionScatter:
    """mapInArrow: a partition's vectors (array<float|double> in ``column``) → one scatter row,
    the batches added in the order they come."""

    column: str

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        total = None
        for batch in batches:
            if batch.num_rows:
                flat = batch.column(self.column).flatten().to_numpy(zero_copy_only=False)
                total = _added(total, Scatter.of(flat.reshape(batch.num_rows, -1).astype(np.float64)))
        if total is not None:
            yield total.to_batch(TaskContext.get().partitionId())


def _merge_scatters(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow: scatter rows, sorted by ``part`` → their sum, one row, labelled with the first."""
    total, first = None, None
    for batch in batches:
        for row in batch.to_pylist():
            first = row["part"] if first is None else first
            total = _added(total, Scatter.from_row(row))
    if total is not None:
        yield total.to_batch(first)


def scatter_of(vectors: DataFrame, column: str) -> Scatter | None:
    """The scatter of every row of ``vectors[column]``; None when there are no rows. Partials are
    added in partition order, so the same partitions give the same bits."""
    partials = vectors.select(column).mapInArrow(_PartitionScatter(column), SCATTER_SCHEMA)
    partitions = vectors.rdd.getNumPartitions()
    if partitions > MERGE_FAN_IN:
        groups = min(MERGE_FAN_IN, math.ceil(partitions / MERGE_FAN_IN))
        partials = (partials.repartitionByRange(groups, "part").sortWithinPartitions("part")
                    .mapInArrow(_merge_scatters, SCATTER_SCHEMA))
    total = None
    for row in sorted(partials.collect(), key=lambda r: r["part"]):  # at most MERGE_FAN_IN d x d matrices
        total = _added(total, Scatter.from_row(row))
    return total


def components(scatter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(components as columns, d x d, by decreasing variance; each one's share of the variance).
    The shares are NaN when there is no variance (every row the same), as MLlib reports them."""
    variances, vectors = np.linalg.eigh(scatter)
    variances, vectors = np.clip(variances[::-1], 0.0, None), vectors[:, ::-1]
    largest = np.argmax(np.abs(vectors), axis=0)
    vectors = vectors * np.where(vectors[largest, np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
    total = variances.sum()
    shares = variances / total if total > 0 else np.full_like(variances, np.nan)
    return np.ascontiguousarray(vectors), shares


def fit_pca(vectors: DataFrame, column: str, output_col: str) -> PCAModel:
    """An MLlib ``PCAModel`` with all d components of ``vectors[column]`` (array of numbers),
    reading vectors from ``features`` when it transforms. Raises ValueError on no rows."""
    scatter = scatter_of(vectors, column)
    if scatter is None:
        raise ValueError("fit_pca: no rows")
    pc, shares = components(scatter.scatter)
    return pca_model(vectors.sparkSession, pc, shares, output_col)


def pca_model(spark: SparkSession, pc: np.ndarray, shares: np.ndarray, output_col: str,
              input_col: str = "features") -> PCAModel:
    """The MLlib ``PCAModel`` holding ``pc`` (d x k, columns) and ``shares``, as ``PCA.fit``
    would have made it (MLlib has no public constructor; its Scala one is package-private)."""
    from pyspark.ml.common import _py2java
    from pyspark.ml.linalg import DenseMatrix, DenseVector
    sc = spark.sparkContext
    d, k = pc.shape
    java = sc._jvm.org.apache.spark.ml.feature.PCAModel(
        f"PCA_{uuid.uuid4().hex[-12:]}",  # the uid PCA.fit would give its model
        _py2java(sc, DenseMatrix(d, k, pc.ravel(order="F").tolist())),
        _py2java(sc, DenseVector(shares.tolist())))
    java.setInputCol(input_col).setOutputCol(output_col)
    model = PCAModel._from_java(java)
    return model._set(k=k)
