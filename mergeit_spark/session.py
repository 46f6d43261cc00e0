"""One builder for the Spark session, local mode and cluster masters alike."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from .config import SparkSettings

DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"


def build_session(settings: SparkSettings, extra_conf: dict[str, str] | None = None) -> SparkSession:
    """Get or create the session. A master set by spark-submit wins over ``settings.master``."""
    # Executors' Python must match the driver's, or pickled functions and Arrow batches disagree.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(settings.app_name)
    if not _submitted_with_master():
        builder = builder.master(settings.master)
    conf = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.sql.adaptive.enabled": "true",
        "spark.driver.memory": settings.driver_memory,
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.python.worker.reuse": "true",
        # delta-rs reads the staged Parquet; it wants microsecond timestamps, not INT96.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    }
    conf.update(settings.conf)
    conf.update(extra_conf or {})
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.log_level)
    return spark


def _submitted_with_master() -> bool:
    # Under spark-submit the JVM is already up (its gateway port is in the environment) and the
    # master came from the command line; PYSPARK_SUBMIT_ARGS is the same path for plain `python`.
    return bool(os.environ.get("PYSPARK_GATEWAY_PORT")) or "--master" in os.environ.get("PYSPARK_SUBMIT_ARGS", "")


def has_delta(spark: SparkSession) -> bool:
    """True when Delta Lake's classes are on the JVM classpath and its extension is configured."""
    jvm = spark.sparkContext._jvm  # noqa: SLF001 - the only way to probe the JVM classpath
    try:
        jvm.java.lang.Class.forName(
            "io.delta.tables.DeltaTable", True, jvm.Thread.currentThread().getContextClassLoader())
    except Exception:  # Py4JJavaError: ClassNotFoundException
        return False
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    return DELTA_EXTENSION in extensions
