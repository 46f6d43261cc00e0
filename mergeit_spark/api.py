"""The Python API: curate a DataFrame from your own Spark job, with the same executor and the
same resume as the ``mergeit`` command (which is a thin layer over the same pipeline).

    from mergeit_spark import curate

    result = curate(df, {"topics": {"k": 50}, "llm": {"base_url": "http://llm:8000/v1"}},
                    root="/lake/curation/run-1")
    result.final.write.saveAsTable("curation.final")
    result.lineage.groupBy("fate").count().show()

``df`` holds the Alpaca columns (``instruction``, ``input``, ``output``), or others named by
``columns`` (``{"instruction": "question", "output": "answer"}``); other columns are kept in
``extra``, as for a file. Its rows are first written under the run root as a Delta table named by
their content (``<root>/_inputs/<content hash>``): the pipeline then ingests that snapshot with
the same rules as any input (reject reason codes, ``input_files``, the ledger), lineage rows trace
to it, and a second call with the same rows and settings finds every stage current and
recomputes nothing. ``incremental=True`` adds ``df``'s rows to a finished run root instead
(``mergeit run --incremental``).
"""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from .config import Settings, load_settings
from .incremental import Increment
from .pipeline import Pipeline, StageResult
from .fs import Storage
from .tables import TableStore

ALPACA_COLUMNS = ("instruction", "input", "output")
INPUTS_DIR = "_inputs"


@dataclass
class Curated:
    """What :func:`curate` did: the stage results (or the increment) and the run root's tables."""

    pipeline: Pipeline
    results: list[StageResult] = field(default_factory=list)
    increment: Increment | None = None

    def table(self, name: str) -> DataFrame:
        """Any table of the run root by name (``records``, ``merges``, ``dedup`` ...)."""
        return self.pipeline.store.read(name)

    @property
    def final(self) -> DataFrame:
        """The curated set: kept originals and accepted merges."""
        return self.table("final")

    @property
    def lineage(self) -> DataFrame:
        """Every input row's fate, traced to its source row."""
        return self.table("lineage")

    def report(self) -> str:
        """Write the run root's report (``report.json``, PNGs, ``report.html``) under
        ``<root>/report``, as ``mergeit report`` does; where its page is."""
        from .report import write_report
        return write_report(self.pipeline)

    @property
    def shortfalls(self) -> dict[str, dict[str, Any]]:
        """Work a rerun must finish, by stage (merge groups that failed for a reason a rerun fixes)."""
        return {r["stage"]: r["shortfall"] for r in self.pipeline.status() if r["shortfall"]}


def curate(df: DataFrame | None = None, settings: Settings | Mapping[str, Any] | None = None, *,
           root: str | None = None, columns: Mapping[str, str] | None = None,
           until: str | None = None, force: str | None = None,
           incremental: bool = False, recluster: bool = False) -> Curated:
    """Run the pipeline over ``df`` (or, with no ``df``, over ``settings.input.paths``).

    ``settings``: a :class:`~mergeit_spark.config.Settings`, or a mapping of sections (as in a
    YAML profile; dotted keys work too); ``MERGEIT__*`` environment variables apply as for the
    command. ``root`` overrides ``output.root``. ``until`` and ``force`` are the command's
    ``--until`` and ``--force``."""
    settings = copy.deepcopy(settings) if isinstance(settings, Settings) else load_settings(values=settings)
    if root is not None:
        settings.output.root = str(root)
    if df is not None:
        settings.input.paths = [snapshot_input(df, settings, columns)]
        settings.input.format = "delta"
    pipeline = Pipeline(settings, spark=df.sparkSession if df is not None else None)
    if incremental:
        return Curated(pipeline, increment=pipeline.extend(recluster=recluster))
    return Curated(pipeline, results=pipeline.run(until=until, force=force))


def alpaca_frame(df: DataFrame, columns: Mapping[str, str] | None = None) -> DataFrame:
    """``df`` with the columns that ``columns`` maps to the Alpaca names renamed to them."""
    renames = dict(columns or {})
    unknown = sorted(set(renames) - set(ALPACA_COLUMNS))
    if unknown:
        raise ValueError(f"columns maps {unknown}: only {', '.join(ALPACA_COLUMNS)} can be mapped")
    missing = sorted(source for source in renames.values() if source not in df.columns)
    if missing:
        raise ValueError(f"columns names {missing}, which the DataFrame lacks (it has {df.columns})")
    by_source = {source: target for target, source in renames.items()}
    clashes = sorted(t for t in renames if t in df.columns and t not in by_source)
    if clashes:
        raise ValueError(f"the DataFrame has column(s) {clashes} already; map them too or drop them")
    return df.select(*[F.col(f"`{c}`").alias(by_source.get(c, c)) for c in df.columns])


def snapshot_input(df: DataFrame, settings: Settings, columns: Mapping[str, str] | None = None) -> str:
    """Write ``df``'s rows under the run root as a Delta table named by their content, unless a
    snapshot of the same rows is there already; its path."""
    frame = alpaca_frame(df, columns)
    store = TableStore(frame.sparkSession, settings.output.root, settings.tables.engine,
                       Storage.from_settings(settings.storage))
    name = f"{INPUTS_DIR}/{content_hash(frame)}"
    if not store.exists(name):
        store.write(frame, name)
    return store.path(name)


def content_hash(df: DataFrame) -> str:
    """An order-free hash of ``df``'s rows and schema (one aggregation): equal hashes, equal rows."""
    row = F.xxhash64(F.to_json(F.struct(*[F.col(f"`{c}`") for c in df.columns]), {"ignoreNullFields": "false"}))
    totals = df.agg(F.count(F.lit(1)).alias("rows"), F.bit_xor(row).alias("xor"),
                    F.sum(row.bitwiseAND(F.lit(0xFFFFFFFF))).alias("low")).first()
    text = f"{df.schema.json()}|{totals['rows']}|{totals['xor']}|{totals['low']}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]
