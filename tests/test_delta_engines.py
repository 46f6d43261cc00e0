"""Both Delta writers run the whole pipeline: delta-spark (Spark writes Delta itself) and delta-rs
(Spark writes Parquet, delta-rs commits it). Every table either one writes is read back by the
other, by delta-rs straight from the path, and by a reader that shares no code with either (the
Delta log replayed here by hand, the Parquet files read by DuckDB); time travel works both ways.
DuckDB's own delta extension would be the natural third reader, but it downloads from
extensions.duckdb.org at INSTALL time, which this project's machines cannot reach."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import duckdb
import pytest
from deltalake import DeltaTable

from _pipeline_run import final_content, pipeline_settings
from mergeit_spark.pipeline import Pipeline
from _pipeline_run import STAGE_ORDER
from mergeit_spark.tables import TableStore

pytestmark = pytest.mark.slow  # a whole-pipeline run of its own (delta-rs): not in `make test-fast`
ENGINES = ("delta-spark", "delta-rs")
OTHER = {"delta-spark": "delta-rs", "delta-rs": "delta-spark"}
TABLES = ("records", "rejects", "embeddings", "topics", "centroids", "dedup", "selected",
          "merge_groups", "merges", "final", "lineage")
# What each writer puts in commitInfo.engineInfo: proof of who wrote a table.
ENGINE_INFO = {"delta-spark": "Delta-Lake/", "delta-rs": "delta-rs"}


@pytest.fixture(scope="module")
def runs(spark, pipeline_run, pipeline_llm, tmp_path_factory):
    """The same input through the whole pipeline once per engine, in one session: delta-spark is
    the session's default engine, so its run is the shared one (conftest ``pipeline_run``, read
    here, never written); delta-rs runs it again here, against the same scripted server."""
    roots = {"delta-spark": pipeline_run.root}
    assert TableStore(spark, pipeline_run.root).engine == "delta-spark"   # what "auto" chose there
    assert [r.name for r in pipeline_run.results] == list(STAGE_ORDER)
    assert not any(r.skipped for r in pipeline_run.results)
    root = tmp_path_factory.mktemp("engines") / "delta-rs"
    settings = pipeline_settings(root, pipeline_run.data, pipeline_llm.base_url, "tables.engine=delta-rs")
    pipeline = Pipeline(settings, spark=spark)
    assert pipeline.store.engine == "delta-rs"
    results = pipeline.run()
    assert [r.name for r in results] == list(STAGE_ORDER) and not any(r.skipped for r in results)
    roots["delta-rs"] = root
    return roots, pipeline_run.n_input


def canonical(rows) -> Counter:
    """Rows as a multiset of JSON strings: order-free, exact (floats included)."""
    return Counter(json.dumps(r, sort_keys=True, default=str) for r in rows)


def spark_rows(df) -> Counter:
    return canonical(r.asDict(recursive=True) for r in df.collect())


def replayed_files(table: Path, version: int | None = None) -> list[str]:
    """The data files of a table at a version, by replaying its JSON commits: add, then remove."""
    live: dict[str, None] = {}
    for commit in sorted((table / "_delta_log").glob("*.json")):
        if version is not None and int(commit.stem) > version:
            break
        for action in map(json.loads, commit.read_text().splitlines()):
            if "add" in action:
                live[unquote(action["add"]["path"])] = None
            elif "remove" in action:
                live.pop(unquote(action["remove"]["path"]), None)
    return [str(table / p) for p in live]


def duckdb_count(table: Path, version: int | None = None) -> int:
    files = replayed_files(table, version)
    if not files:
        return 0
    return duckdb.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchall()[0][0]


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_writes_every_table_of_the_whole_pipeline(runs, engine):
    roots, n_input = runs
    for table in TABLES:
        history = DeltaTable(str(roots[engine] / table)).history()
        assert history and all(ENGINE_INFO[engine] in h.get("engineInfo", "") for h in history), table
    lineage = DeltaTable(str(roots[engine] / "lineage")).to_pyarrow_table()
    assert lineage.num_rows == n_input


def test_both_engines_give_the_same_result(runs):
    roots, _ = runs
    assert final_content(roots["delta-spark"]) == final_content(roots["delta-rs"])
    for table in ("records", "rejects", "dedup", "selected", "lineage"):
        a, b = (DeltaTable(str(roots[e] / table)).to_pyarrow_table() for e in ENGINES)
        assert a.num_rows == b.num_rows, table


@pytest.mark.parametrize("engine", ENGINES)
def test_every_table_reads_back_through_every_reader(spark, runs, engine):
    roots, _ = runs
    own, other = (TableStore(spark, roots[engine], engine=e) for e in (engine, OTHER[engine]))
    for table in TABLES:
        path = roots[engine] / table
        by_delta_rs = DeltaTable(str(path)).to_pyarrow_table()
        expected = canonical(by_delta_rs.to_pylist())
        assert spark_rows(own.read(table)) == expected, table
        assert spark_rows(other.read(table)) == expected, table
        assert duckdb_count(path) == by_delta_rs.num_rows == own.count(table), table


@pytest.mark.parametrize("engine", ENGINES)
def test_time_travel_across_engines(spark, runs, tmp_path, engine):
    """A table one engine wrote gets a new version from the other; both read both versions."""
    roots, _ = runs
    root = tmp_path / "tt"
    source = TableStore(spark, roots[engine], engine=engine).read("final")
    first, second = (TableStore(spark, root, engine=e) for e in (engine, OTHER[engine]))
    v0 = first.write(source, "final")
    before = spark_rows(first.read("final"))
    extra = source.limit(3)
    v1 = second.write(extra, "final", mode="append")
    v2 = second.write(extra, "final")  # overwrite by the other engine: old files stay for time travel
    assert (v0, v1, v2) == (0, 1, 2)
    for reader in (first, second):
        assert spark_rows(reader.read("final", version=v0)) == before
        assert reader.read("final", version=v1).count() == sum(before.values()) + 3
        assert reader.read("final").count() == 3
    assert duckdb_count(root / "final", version=v0) == sum(before.values())
    assert DeltaTable(str(root / "final"), version=v0).to_pyarrow_table().num_rows == sum(before.values())


def test_delta_spark_tables_need_no_feature_beyond_what_delta_rs_reads(runs):
    """Deletion vectors and column mapping are off unless a table asks: reader protocol 1, no
    reader features, and none of the properties that would switch them on."""
    roots, _ = runs
    for table in TABLES:
        dt = DeltaTable(str(roots["delta-spark"] / table))
        protocol = dt.protocol()
        assert protocol.min_reader_version == 1 and not protocol.reader_features, (table, protocol)
        assert not set(protocol.writer_features or []) & {"deletionVectors", "columnMapping"}, table
        config = dt.metadata().configuration
        assert config.get("delta.enableDeletionVectors", "false") == "false", table
        assert config.get("delta.columnMapping.mode", "none") == "none", table
