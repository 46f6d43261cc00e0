"""Table store: real Delta tables, read back by an independent reader (delta-rs), time travel."""
from __future__ import annotations

from deltalake import DeltaTable


def test_overwrite_append_and_versions_read_back_independently(spark, store):
    first = spark.createDataFrame(
        [("a", [0.6, 0.8], "x"), ("b", [1.0, 0.0], None)], "id string, embedding array<float>, note string")
    second = spark.createDataFrame([("c", [0.0, 1.0], "z")], "id string, embedding array<float>, note string")
    assert store.write(first, "t") == 0
    assert store.write(second, "t", mode="append") == 1

    # The independent reader: delta-rs straight from the path, not our store.
    dt = DeltaTable(store.path("t"))
    assert dt.version() == 1
    latest = dt.to_pyarrow_table().to_pylist()
    assert sorted(r["id"] for r in latest) == ["a", "b", "c"]
    row_a = next(r for r in latest if r["id"] == "a")
    assert row_a["embedding"] == [0.6000000238418579, 0.800000011920929] and row_a["note"] == "x"
    v0 = DeltaTable(store.path("t"), version=0).to_pyarrow_table()
    assert sorted(v0.column("id").to_pylist()) == ["a", "b"]

    # And our reader agrees, at both versions.
    assert sorted(r.id for r in store.read("t").collect()) == ["a", "b", "c"]
    assert sorted(r.id for r in store.read("t", version=0).collect()) == ["a", "b"]

    # Overwrite replaces content (and may change the schema); older versions stay readable.
    third = spark.createDataFrame([("d", 4)], "id string, n long")
    assert store.write(third, "t") == 2
    assert DeltaTable(store.path("t")).to_pyarrow_table().to_pylist() == [{"id": "d", "n": 4}]
    assert store.read("t", version=1).count() == 3
    assert [h["operation"] for h in store.history("t")][:1] in (["WRITE"], ["CREATE OR REPLACE TABLE"])


def test_empty_table_keeps_its_schema(spark, store):
    empty = spark.createDataFrame([], "id string, embedding array<float>")
    store.write(empty, "empty")
    assert DeltaTable(store.path("empty")).to_pyarrow_table().num_rows == 0
    back = store.read("empty")
    assert back.count() == 0 and back.columns == ["id", "embedding"]


def test_missing_table_is_a_clear_error(store):
    import pytest
    assert not store.exists("nope") and store.version("nope") is None
    with pytest.raises(FileNotFoundError, match="nope"):
        store.read("nope")


def test_written_through_spark_without_the_driver_holding_rows(spark, store):
    # 50k rows over 4 partitions: the writer streams staged Parquet, and no staging is left behind.
    df = spark.range(50_000).selectExpr("cast(id as string) as id", "id * 2 as twice").repartition(4)
    store.write(df, "big")
    dt = DeltaTable(store.path("big"))
    assert dt.to_pyarrow_table().num_rows == 50_000
    assert list((store.root / "_staging").glob("*")) == []
    assert store.read("big").agg({"twice": "sum"}).first()[0] == sum(range(50_000)) * 2


def test_count_comes_from_the_delta_log_and_matches_spark(spark, store):
    df = spark.range(1234).selectExpr("cast(id as string) as id").repartition(3)
    store.write(df, "c")
    store.write(df.limit(10), "c", mode="append")
    assert store.count("c") == 1244 == store.read("c").count()
