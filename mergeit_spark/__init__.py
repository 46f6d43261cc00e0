"""mergeit-spark: MergeIT instruction-data curation (topic-aware filtering + LLM merging) on Spark."""
__version__ = "0.1.0"

# Every process that imports the library (the driver, each Python worker) masks registered
# secrets and URL credentials in every log record, tracebacks included.
from .redact import install_log_scrubbing as _install_log_scrubbing  # noqa: E402

_install_log_scrubbing()

# In a PySpark worker, the per-task import-cache invalidation skips zip archives that did not
# change (see worker_imports): 0.2-0.5 s of worker CPU per task otherwise.
from .worker_imports import in_pyspark_worker as _in_pyspark_worker, install as _install  # noqa: E402

if _in_pyspark_worker():
    _install()
