"""A real Spark standalone cluster on 127.0.0.1: one master and N workers from pyspark's own jars."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyspark

from mergeit_spark.llm.server import free_port

SPARK_HOME = Path(pyspark.__file__).parent


def spark_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "SPARK_HOME": str(SPARK_HOME),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    })
    env.update(extra or {})
    return env


class StandaloneCluster:
    """Start with ``start()``, stop with ``stop()``; logs land in ``workdir``."""

    def __init__(self, workdir: Path, workers: int = 2, cores: int = 1, memory: str = "2g") -> None:
        self.workdir = Path(workdir)
        self.workers = workers
        self.cores = cores
        self.memory = memory
        self.port = free_port()
        self.ui_port = free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), *args],
                                           env=spark_env(), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start(self, timeout: float = 90.0) -> "StandaloneCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(self.port), "--webui-port", str(self.ui_port)])
        for i in range(self.workers):
            work = self.workdir / f"worker{i}"
            work.mkdir(exist_ok=True)
            self._spawn(f"worker{i}", ["org.apache.spark.deploy.worker.Worker", self.master_url,
                                       "--host", "127.0.0.1", "--cores", str(self.cores),
                                       "--memory", self.memory, "--webui-port", str(free_port()),
                                       "--work-dir", str(work)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_workers() >= self.workers:
                return self
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(1)
        logs = "\n".join((self.workdir / f).read_text(errors="replace")[-2000:]
                         for f in os.listdir(self.workdir) if f.endswith(".log"))
        self.stop()
        raise RuntimeError(f"standalone cluster did not come up:\n{logs}")

    def alive_workers(self) -> int:
        import json
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2) as r:
                state = json.load(r)
        except OSError:
            return 0
        return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def submit(self, args: list[str], timeout: float, env: dict[str, str] | None = None,
               log_name: str = "submit.log") -> subprocess.CompletedProcess:
        cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--master", self.master_url,
               "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
               "--conf", "spark.executor.memory=1500m", "--driver-memory", "2g", *args]
        with open(self.workdir / log_name, "wb") as log:
            return subprocess.run(cmd, env=spark_env(env), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
