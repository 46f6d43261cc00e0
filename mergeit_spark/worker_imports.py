"""Python workers: ``importlib.invalidate_caches()`` re-reads only the zip archives that changed.

PySpark's worker calls ``importlib.invalidate_caches()`` at the start of every task (after putting
the job's Python includes on ``sys.path``). On Python 3.10-3.12 that makes every
``zipimporter`` re-read its archive's whole central directory, in Python, right away
(CPython gh-103200; 3.13 re-reads lazily). A worker holds one importer per package directory it
imported from inside ``pyspark.zip``, plus Spark's core jar and every ``spark.jars.packages`` jar
(PySpark puts those on the Python path too), so every task pays a fixed CPU cost, whatever its
rows, and more with Spark NLP's hundred jars: most of the workers' CPU time in small tasks, which
a cluster's executors pay on every task (BENCHMARKS.md, ``incremental``). Spark 4.2 only
invalidates when the includes changed (SPARK-54744).

:func:`install` replaces ``zipimporter.invalidate_caches`` with :func:`invalidate_when_changed`:
an archive whose size and modification time are those of its last read keeps the directory
read then; any other archive is re-read as before. It is installed when the package is imported
inside a PySpark worker process (``pyspark.worker`` loaded), on Python before 3.13; the driver's
interpreter is left alone.
"""
from __future__ import annotations

import os
import sys
import zipimport

# Archive path -> (st_mtime_ns, st_size) when its directory was last read through this module.
_READ_AT: dict[str, tuple[int, int]] = {}
_EAGER = zipimport.zipimporter.invalidate_caches


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def invalidate_when_changed(importer: zipimport.zipimporter) -> None:
    """``importer``'s directory re-read only when its archive changed since the last read."""
    stamp = _stamp(importer.archive)
    shared = zipimport._zip_directory_cache.get(importer.archive)  # noqa: SLF001 - the stdlib's own cache
    if stamp is not None and shared is not None and _READ_AT.get(importer.archive) == stamp:
        importer._files = shared  # noqa: SLF001 - what the eager re-read would have produced
        return
    _EAGER(importer)
    if stamp is not None:
        _READ_AT[importer.archive] = stamp


def install() -> bool:
    """Use :func:`invalidate_when_changed` for every zipimporter of this process; True when it
    is (now or already) in place, False on Python 3.13+, whose own invalidation is lazy."""
    if sys.version_info >= (3, 13):
        return False
    zipimport.zipimporter.invalidate_caches = invalidate_when_changed
    return True


def installed() -> bool:
    """Whether this process's zipimporters use :func:`invalidate_when_changed`."""
    return zipimport.zipimporter.invalidate_caches is invalidate_when_changed


def in_pyspark_worker() -> bool:
    """Whether this process is a PySpark Python worker (forked by ``pyspark.daemon``)."""
    return "pyspark.worker" in sys.modules
