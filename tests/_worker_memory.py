"""Peak resident memory of the Spark Python workers, sampled from outside while a job runs."""
from __future__ import annotations

import threading

import psutil


class WorkerMemory:
    """Context manager: samples the RSS of every Python process under the Spark JVM (the
    pyspark daemon and its workers) every ``interval`` seconds; ``peak`` is the largest RSS one
    such process reached, in bytes."""

    def __init__(self, spark, interval: float = 0.1) -> None:
        self.jvm = psutil.Process(spark.sparkContext._gateway.proc.pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for proc in self.jvm.children(recursive=True):
                try:
                    if "python" in proc.name().lower():
                        self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.Error:  # a worker that just exited
                    continue
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
