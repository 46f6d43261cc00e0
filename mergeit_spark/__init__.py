"""mergeit-spark: MergeIT instruction-data curation (topic-aware filtering + LLM merging) on Spark."""
__version__ = "0.1.0"

# Importing the package leaves the process's logging alone: log scrubbing (redact) is installed
# where a run starts (the CLI, the pipeline) and where worker code that logs starts (a merge
# task, the LLM client resolving its key).

# In a PySpark worker, the per-task import-cache invalidation skips zip archives that did not
# change (see worker_imports): re-reading every archive costs each task CPU whatever its rows.
from .worker_imports import in_pyspark_worker as _in_pyspark_worker, install as _install  # noqa: E402

if _in_pyspark_worker():
    _install()

__all__ = ["Curated", "Pipeline", "Settings", "curate", "load_settings"]

_EXPORTS = {"curate": ".api", "Curated": ".api", "Pipeline": ".pipeline", "Settings": ".config",
            "load_settings": ".config"}


def __getattr__(name: str):
    """The public names, imported on first use (a PySpark worker imports the package for every
    task and needs none of them)."""
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
