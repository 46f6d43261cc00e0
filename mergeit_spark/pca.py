"""Principal components of a vector column: the scatter matrix summed over partitions, then
numpy's symmetric eigensolver on the driver; the result becomes an MLlib ``PCAModel`` when one is
saved.

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
from pyspark.ml.linalg import DenseMatrix, DenseVector, MatrixUDT, VectorUDT
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from .fs import Location
from .session import is_connect, partition_count

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
    partitions = partition_count(vectors) or MERGE_FAN_IN + 1  # unknown (Connect): merge in a tree
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


@dataclass(frozen=True)
class PrincipalComponents:
    """All d principal components of a vector column: ``pc`` (d x d, components as columns, by
    decreasing variance) and ``explained`` (each one's share of the variance)."""

    pc: np.ndarray
    explained: np.ndarray

    def mllib(self, spark: SparkSession, output_col: str, input_col: str = "features",
              scratch: Location | None = None) -> PCAModel:
        """The MLlib ``PCAModel`` holding these components (see :func:`pca_model`)."""
        return pca_model(spark, self.pc, self.explained, output_col, input_col, scratch)


def fit_pca(vectors: DataFrame, column: str) -> PrincipalComponents:
    """The principal components of ``vectors[column]`` (array of numbers). Raises ValueError on
    no rows."""
    scatter = scatter_of(vectors, column)
    if scatter is None:
        raise ValueError("fit_pca: no rows")
    return PrincipalComponents(*components(scatter.scatter))


def pca_model(spark: SparkSession, pc: np.ndarray, shares: np.ndarray, output_col: str,
              input_col: str = "features", scratch: Location | None = None) -> PCAModel:
    """The MLlib ``PCAModel`` holding ``pc`` (d x k, columns) and ``shares``, as ``PCA.fit``
    would have made it. MLlib has no public constructor: a classic session calls the Scala one
    (package-private) through the JVM gateway; under Spark Connect, which has no gateway, the
    model is written in MLlib's own layout to ``scratch`` (a folder the server can write, e.g.
    under the run root; required there) and loaded from it."""
    uid = f"PCA_{uuid.uuid4().hex[-12:]}"  # the uid PCA.fit would give its model
    d, k = pc.shape
    matrix, variances = DenseMatrix(d, k, pc.ravel(order="F").tolist()), DenseVector(shares.tolist())
    if is_connect(spark):
        if scratch is None:
            raise ValueError("pca_model: under Spark Connect the model is written and loaded: give scratch")
        return _pca_model_through_files(spark, uid, matrix, variances, output_col, input_col, scratch)
    from pyspark.ml.common import _py2java
    sc = spark.sparkContext
    java = sc._jvm.org.apache.spark.ml.feature.PCAModel(uid, _py2java(sc, matrix), _py2java(sc, variances))
    java.setInputCol(input_col).setOutputCol(output_col)
    model = PCAModel._from_java(java)
    return model._set(k=k)


def _pca_model_through_files(spark: SparkSession, uid: str, matrix: DenseMatrix, variances: DenseVector,
                             output_col: str, input_col: str, scratch: Location) -> PCAModel:
    """Write a PCAModel as MLlib's writer does (``metadata``: one JSON line; ``data``: one
    Parquet row of the matrix and the vector), by Spark, and load it."""
    import json
    import time

    from pyspark import __version__ as spark_version
    schema = T.StructType([T.StructField("pc", MatrixUDT()), T.StructField("explainedVariance", VectorUDT())])
    spark.createDataFrame([(matrix, variances)], schema).write.mode("overwrite").parquet((scratch / "data").uri)
    metadata = {"class": "org.apache.spark.ml.feature.PCAModel", "timestamp": int(time.time() * 1000),
                "sparkVersion": spark_version, "uid": uid,
                "paramMap": {"inputCol": input_col, "outputCol": output_col, "k": matrix.numCols},
                "defaultParamMap": {}}
    (spark.createDataFrame([(json.dumps(metadata),)], "value string").coalesce(1)
     .write.mode("overwrite").text((scratch / "metadata").uri))
    return PCAModel.load(scratch.uri)
