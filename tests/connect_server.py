"""A real Spark Connect server on 127.0.0.1 for the tests: pyspark's own ``SparkConnectServer``
(``spark-connect_2.13`` ships in pyspark's jars) started by ``spark-submit`` in local mode, with
Delta's jar and SQL extension as a Databricks or Spark 4 cluster would have them.

    with ConnectServer(workdir) as server:
        subprocess.run(["mergeit", "run", "--set", f"spark.remote={server.url}", ...])

Clients are other processes: a Python process that opened a Spark Connect session stays in
Connect mode (PySpark's functions then build Connect columns), so the tests' classic session and
a Connect client cannot share one process.
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from _cluster import SPARK_HOME, spark_env
from mergeit_spark.config import load_settings
from mergeit_spark.jars import jar_conf
from mergeit_spark.llm.server import free_port
from mergeit_spark.session import DELTA_CATALOG, DELTA_EXTENSION, DELTA_TABLE_DEFAULTS

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"


class ConnectServer:
    """Start with ``start()`` (or ``with``), stop with ``stop()``; its log lands in ``workdir``."""

    def __init__(self, workdir: Path, cores: int = 2, memory: str = "3g") -> None:
        self.workdir = Path(workdir)
        self.cores = cores
        self.memory = memory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"sc://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "connect-server.log"

    def conf(self) -> dict[str, str]:
        spark = load_settings(overrides=["spark.master=local[2]"], env={}).spark
        return {
            **jar_conf(spark),
            "spark.connect.grpc.binding.address": "127.0.0.1",
            "spark.connect.grpc.binding.port": str(self.port),
            "spark.sql.extensions": DELTA_EXTENSION,
            "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
            "spark.databricks.delta.snapshotPartitions": "2",
            "spark.sql.shuffle.partitions": "4",
            "spark.ui.enabled": "false",
            "spark.python.worker.reuse": "true",
            **DELTA_TABLE_DEFAULTS,
        }

    def start(self, timeout: float = 180.0) -> "ConnectServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [str(SPARK_HOME / "bin" / "spark-submit"), "--master", f"local[{self.cores}]",
                "--driver-memory", self.memory, "--class", SERVER_CLASS]
        for key, value in self.conf().items():
            args += ["--conf", f"{key}={value}"]
        args.append("spark-internal")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, env=spark_env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"Spark Connect server did not come up on {self.url}:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "ConnectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
