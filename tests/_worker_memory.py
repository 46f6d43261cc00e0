"""Peak resident memory of the Spark Python workers, sampled from outside while a job runs."""
from __future__ import annotations

import threading

import psutil


class WorkerMemory:
    """Context manager: samples the RSS of every Python process under the Spark JVM (the
    pyspark daemon and its workers) every ``interval`` seconds; ``peak`` is the most memory one
    such process took while the block ran, in bytes: its RSS, less what it already held on entry.

    Why less: Spark reuses Python workers, so in a shared session a worker may still hold a
    model loaded by an earlier test (over 1 GiB with torch); that memory is not the job's."""

    def __init__(self, spark, interval: float = 0.1) -> None:
        self.jvm = psutil.Process(spark.sparkContext._gateway.proc.pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._held: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid, rss in self._python_workers():
                self.peak = max(self.peak, rss - self._held.get(pid, 0))
            self.samples += 1
            self._stop.wait(self.interval)

    def _python_workers(self):
        for proc in self.jvm.children(recursive=True):
            try:
                if "python" in proc.name().lower():
                    yield proc.pid, proc.memory_info().rss
            except psutil.Error:
                continue

    def __enter__(self) -> "WorkerMemory":
        self._held = dict(self._python_workers())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
