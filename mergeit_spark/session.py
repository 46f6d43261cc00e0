"""One builder for the Spark session, local mode, cluster masters and Spark Connect alike, and
what the rest of the code asks of a session whichever kind it is.

A Spark Connect session (``spark.remote``) has no ``SparkContext``: no RDDs, broadcast variables,
status tracker or JVM gateway. The functions here (:func:`is_connect`, :func:`parallelism`,
:func:`partition_count`, :func:`ship`, :func:`application_id`, :func:`cancel_jobs`) answer from
the classic session's context where there is one and from the configuration or a query
otherwise, so that the stages have one code path.
"""
from __future__ import annotations

import copy
import os
import sys
import warnings
import weakref
from typing import Generic, Sequence, TypeVar, Union
from urllib.parse import urlparse

from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from .config import Settings, SparkSettings
from .fs import S3_SCHEMES, Storage
from .jars import HADOOP_AWS, JarsError, jar_conf, provides_delta, resolution_failure
from .redact import redaction_regex

DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
# Tables delta-spark creates stay readable by delta-rs and every other Delta reader: no deletion
# vectors and no column mapping unless a table asks for them (Databricks turns them on by default).
DELTA_TABLE_DEFAULTS = {
    "spark.databricks.delta.properties.defaults.enableDeletionVectors": "false",
    "spark.databricks.delta.properties.defaults.columnMapping.mode": "none",
}
CODEGEN_CACHE_ENTRIES = 2000


def object_store_session(settings: Settings) -> tuple[SparkSettings, dict[str, str]]:
    """The Spark settings and extra configuration for a run whose root or inputs are on S3:
    Hadoop's s3a connector (``hadoop-aws`` in ``spark.packages``, unless the packages or jars
    already name it) and s3a's endpoint and region (``storage.*``); unchanged otherwise."""
    paths = [settings.output.root, *settings.input.paths]
    if not any(urlparse(str(p)).scheme in S3_SCHEMES for p in paths):
        return settings.spark, {}
    spark = copy.deepcopy(settings.spark)
    named = " ".join([*spark.packages, *spark.jars])
    if "hadoop-aws" not in named:
        spark.packages = [*spark.packages, HADOOP_AWS]
    conf = {f"spark.hadoop.{k}": v for k, v in Storage.from_settings(settings.storage).hadoop_conf().items()}
    return spark, {k: v for k, v in conf.items() if k not in spark.conf}  # the user's spark.conf wins


def build_session(settings: SparkSettings, extra_conf: dict[str, str] | None = None,
                  secret_env_names: Sequence[str] = ()) -> SparkSession:
    """Get or create the session. A master set by spark-submit wins over ``settings.master``.
    ``secret_env_names``: variables holding secrets (``llm.api_key_env``), redacted by Spark.
    With ``settings.remote`` set, a Spark Connect session (:func:`connect_session`)."""
    # Executors' Python must match the driver's, or pickled functions and Arrow batches disagree.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if settings.remote:
        return connect_session(settings, extra_conf)
    builder = SparkSession.builder.appName(settings.app_name)
    submitted = _submitted_with_master()
    if not submitted:
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
        # delta-rs commits the Parquet Spark writes; Delta readers want microsecond timestamps, not INT96.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # Spark keeps 100 compiled query classes; a run of the pipeline generates several times
        # more, so a session that runs it again (the next batch) would compile nearly every one
        # anew, and the JVM its machine code: a large share of the finalize step's CPU
        # (BENCHMARKS.md, incremental). With room for them, a warm run compiles a handful.
        "spark.sql.codegen.cache.maxEntries": str(CODEGEN_CACHE_ENTRIES),
    }
    # Under spark-submit its --packages/--jars are already on the classpath and win; otherwise
    # the settings' packages and jars are resolved at session start.
    jars = {} if submitted else jar_conf(settings)
    conf.update(jars)
    conf.update(settings.conf)
    conf.update(extra_conf or {})
    if jvm_has_class(DELTA_EXTENSION) if submitted else provides_delta(settings):
        _add_delta_conf(conf)
    # The UI and the event log show a conf value unless its key matches this pattern; Spark's
    # default misses spark.executorEnv.<key variable>, how the LLM key reaches YARN/K8s executors.
    conf["spark.redaction.regex"] = redaction_regex(secret_env_names, conf.get("spark.redaction.regex"))
    for key, value in conf.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # the JVM exited while starting: say which setting, when it is ours
        _explain_start_failure(exc, jars, settings)
        raise
    spark.sparkContext.setLogLevel(settings.log_level)
    return spark


def connect_session(settings: SparkSettings, extra_conf: dict[str, str] | None = None) -> SparkSession:
    """A Spark Connect session. ``local[N]`` starts a local Connect server in this process with
    the settings' packages, jars and Delta's extension, as a classic session would have them; a
    ``sc://`` server has its own classpath and static configuration (Delta's jar and extension
    are the server's to configure), so only runtime settings are sent. The server's executors
    run this package's functions: they need it installed, as a cluster's executors do."""
    local = not settings.remote.startswith("sc://")
    conf = {"spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
            "spark.sql.session.timeZone": "UTC",
            "spark.sql.execution.arrow.pyspark.enabled": "true",
            "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS"}
    if local:
        conf.update({"spark.driver.memory": settings.driver_memory, "spark.ui.showConsoleProgress": "false",
                     "spark.python.worker.reuse": "true", "spark.app.name": settings.app_name,
                     "spark.sql.codegen.cache.maxEntries": str(CODEGEN_CACHE_ENTRIES),
                     "spark.log.level": settings.log_level, **jar_conf(settings)})
    conf.update(settings.conf)
    conf.update(extra_conf or {})
    if local and provides_delta(settings):
        _add_delta_conf(conf)
    builder = SparkSession.builder.remote(settings.remote)
    for key, value in conf.items():
        builder = builder.config(key, value)
    with warnings.catch_warnings():  # the local server has the static settings; the client says it cannot
        warnings.filterwarnings("ignore", message="Failed to set ", category=UserWarning)
        return builder.getOrCreate()


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session (no SparkContext behind it)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


_PARALLELISM: "weakref.WeakKeyDictionary[SparkSession, int]" = weakref.WeakKeyDictionary()


def parallelism(spark: SparkSession) -> int:
    """The session's default parallelism (the cores of its executors, unless configured):
    SparkContext's in a classic session; under Connect ``spark.default.parallelism`` when set,
    else the partitions Spark gives a range of rows (one small job, once per session)."""
    if not is_connect(spark):
        return spark.sparkContext.defaultParallelism
    if spark not in _PARALLELISM:
        configured = spark.conf.get("spark.default.parallelism", None)
        _PARALLELISM[spark] = int(configured) if configured else int(
            spark.range(0, 1 << 20).select(F.spark_partition_id().alias("p")).agg(F.max("p")).first()[0]) + 1
    return _PARALLELISM[spark]


def partition_count(df: DataFrame) -> int | None:
    """How many partitions ``df`` has, when the session can say without a job (classic);
    None under Connect."""
    return None if is_connect(df.sparkSession) else df.rdd.getNumPartitions()


T = TypeVar("T")


class Captured(Generic[T]):
    """A value shipped inside the function that uses it (Spark Connect pickles a UDF's or a
    ``mapInArrow`` function's closure with it), read as a broadcast variable is: ``.value``."""

    def __init__(self, value: T) -> None:
        self.value = value


Shipped = Union[Broadcast, Captured]  # what ship returns; both read through .value


def ship(spark: SparkSession, value: T) -> Shipped:
    """``value`` for the executors, read there through ``.value``: a broadcast variable in a
    classic session (fetched once per executor, however many tasks use it); under Connect, which
    has none, captured in the function's closure (sent with each task: keep it to megabytes)."""
    return Captured(value) if is_connect(spark) else spark.sparkContext.broadcast(value)


def connect_server_host(spark: SparkSession) -> str | None:
    """The host of the Spark Connect server ``spark`` talks to (``localhost`` for a local one);
    None for a classic session, or when the client does not say."""
    if not is_connect(spark):
        return None
    try:
        return spark.client._builder.host  # noqa: SLF001 - the client's channel builder holds the URL's host
    except AttributeError:
        return None


def connect_session_id(spark: SparkSession) -> str | None:
    """The Spark Connect session's id on its server; None for a classic session."""
    return spark.session_id if is_connect(spark) else None


def interrupt_connect_session(spark: SparkSession, session_id: str) -> list[str]:
    """Interrupt every operation of session ``session_id`` on the server ``spark`` talks to: a
    client killed mid-run leaves its operations running on the server, paying for LLM requests
    nobody will read, until the server gives them up. Returns the interrupted operations' ids."""
    from pyspark.sql.connect.client import DefaultChannelBuilder, SparkConnectClient

    url = spark.client._builder.url.geturl()  # noqa: SLF001 - parsed as http://host:port/;params
    builder = DefaultChannelBuilder("sc" + url[url.index("://"):])
    builder.set("session_id", session_id)
    client = SparkConnectClient(builder)
    try:
        return list(client.interrupt_all() or [])
    finally:
        client.close()


def application_id(spark: SparkSession) -> str:
    """The Spark application's id."""
    return spark.conf.get("spark.app.id", None) or "connect"


def cancel_jobs(spark: SparkSession) -> None:
    """Cancel every running job of the session's application (Connect: of this session)."""
    if is_connect(spark):
        spark.interruptAll()
    else:
        spark.sparkContext.cancelAllJobs()


def _add_delta_conf(conf: dict[str, str]) -> None:
    """Delta's extension and catalog, beside (not instead of) what the user configured."""
    extensions = [e.strip() for e in conf.get("spark.sql.extensions", "").split(",") if e.strip()]
    if DELTA_EXTENSION not in extensions:
        conf["spark.sql.extensions"] = ",".join([DELTA_EXTENSION, *extensions])
    # Delta rebuilds a table's state with a Spark job over this many partitions (default 50, far
    # too many for a local session's small logs); the shuffle setting is sized for the deployment.
    conf.setdefault("spark.databricks.delta.snapshotPartitions", conf["spark.sql.shuffle.partitions"])
    for key, value in {"spark.sql.catalog.spark_catalog": DELTA_CATALOG, **DELTA_TABLE_DEFAULTS}.items():
        conf.setdefault(key, value)


def _explain_start_failure(exc: Exception, jars: dict[str, str], settings: SparkSettings) -> None:
    """Raise a ``JarsError`` naming the setting when the session failed because a package could not
    be resolved (checked by resolving again in a child process); return otherwise."""
    if "spark.jars.packages" not in jars or "JAVA_GATEWAY_EXITED" not in str(exc):
        return
    failure = resolution_failure(jars)
    if failure is None:
        return
    raise JarsError(
        f"Spark could not start: spark.packages {settings.packages} "
        f"({jars['spark.jars.packages']}) did not resolve from spark.repositories "
        f"{settings.repositories} (Ivy cache {jars['spark.jars.ivy']}). Ivy said:\n{failure}\n"
        "Fix the coordinates or repositories; or, air-gapped, put the jars in a folder "
        "(python -m mergeit_spark.jars fetch DEST, on a machine that reaches the repository) and "
        "set spark.jars=[DEST] with spark.packages=[]; or set spark.packages=[] to run without "
        "Delta's jar (tables are then written through delta-rs).") from None


def jvm_has_class(name: str) -> bool:
    """Whether the running JVM (spark-submit's, or the session's) can load class ``name``."""
    from pyspark import SparkContext

    SparkContext._ensure_initialized()  # noqa: SLF001 - connects to the running JVM's gateway
    jvm = SparkContext._jvm  # noqa: SLF001
    try:  # loaded, not initialised: initialising io.delta.tables.DeltaTable fails on Spark 4.1.4
        jvm.java.lang.Class.forName(name, False, jvm.Thread.currentThread().getContextClassLoader())
    except Exception:  # Py4JJavaError: ClassNotFoundException
        return False
    return True


def _submitted_with_master() -> bool:
    # Under spark-submit the JVM is already up (its gateway port is in the environment) and the
    # master came from the command line; PYSPARK_SUBMIT_ARGS is the same path for plain `python`.
    return bool(os.environ.get("PYSPARK_GATEWAY_PORT")) or "--master" in os.environ.get("PYSPARK_SUBMIT_ARGS", "")


def has_delta(spark: SparkSession) -> bool:
    """True when Delta Lake's classes are on the JVM classpath and its extension is configured.
    Under Connect the server's classpath cannot be probed: its configured extension answers."""
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    return DELTA_EXTENSION in extensions and (is_connect(spark) or jvm_has_class(DELTA_EXTENSION))
