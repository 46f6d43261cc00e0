"""Table store: real Delta tables from both writers (delta-spark, and Spark's Parquet committed by
delta-rs), each read back by the other writer's reader and by delta-rs straight from the path."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import types as T

from mergeit_spark.tables import TableStore

ENGINES = ["delta-spark", "delta-rs"]
OTHER = {"delta-spark": "delta-rs", "delta-rs": "delta-spark"}


@pytest.fixture(params=ENGINES)
def engine_store(request, spark, tmp_path):
    return TableStore(spark, tmp_path / "run", engine=request.param)


def other_reader(store: TableStore) -> TableStore:
    return TableStore(store.spark, store.root, engine=OTHER[store.engine])


def log_actions(table: Path) -> list[dict]:
    """Every action of every JSON commit, in order (the tables here are too young for checkpoints)."""
    return [json.loads(line) for commit in sorted((table / "_delta_log").glob("*.json"))
            for line in commit.read_text().splitlines()]


def test_overwrite_append_and_versions_read_back_independently(spark, engine_store):
    store = engine_store
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

    # Our reader and the other engine's reader agree, at both versions.
    for reader in (store, other_reader(store)):
        assert sorted(r.id for r in reader.read("t").collect()) == ["a", "b", "c"]
        assert sorted(r.id for r in reader.read("t", version=0).collect()) == ["a", "b"]

    # Overwrite replaces content (and may change the schema); older versions stay readable.
    third = spark.createDataFrame([("d", 4)], "id string, n long")
    assert store.write(third, "t") == 2
    assert DeltaTable(store.path("t")).to_pyarrow_table().to_pylist() == [{"id": "d", "n": 4}]
    assert [tuple(r) for r in other_reader(store).read("t").collect()] == [("d", 4)]
    assert store.read("t", version=1).count() == 3
    assert [h["operation"] for h in store.history("t")][:1] in (["WRITE"], ["CREATE OR REPLACE TABLE"])


def as_nullable(dt: T.DataType) -> T.DataType:
    if isinstance(dt, T.StructType):
        return T.StructType([T.StructField(f.name, as_nullable(f.dataType), True) for f in dt])
    if isinstance(dt, T.ArrayType):
        return T.ArrayType(as_nullable(dt.elementType), True)
    return dt


def test_nullability_and_list_items_are_what_spark_meant(spark, engine_store):
    # embed.py's schema: a non-null id and a non-null array of non-null floats.
    schema = T.StructType([
        T.StructField("id", T.StringType(), False),
        T.StructField("embedding", T.ArrayType(T.FloatType(), False), False),
        T.StructField("tags", T.ArrayType(T.StringType(), True), True),
        T.StructField("gate", T.StructType([T.StructField("passed", T.BooleanType())]))])
    df = spark.createDataFrame([("a", [0.5], ["x", None], (True,))], schema)
    engine_store.write(df, "typed")
    logged = json.loads(DeltaTable(engine_store.path("typed")).schema().to_json())
    # delta-rs commits Spark's schema as it is; delta-spark, writing by path, makes every column
    # nullable (Delta's documented behaviour: NOT NULL needs a CREATE TABLE). Types and item
    # names agree either way.
    expected = schema if engine_store.engine == "delta-rs" else as_nullable(schema)
    assert logged == json.loads(expected.json())
    for reader in (engine_store, other_reader(engine_store)):
        back = reader.read("typed")
        assert [(f.name, as_nullable(f.dataType)) for f in back.schema] == \
            [(f.name, as_nullable(f.dataType)) for f in schema]
        assert [tuple(r) for r in back.collect()] == [("a", [0.5], ["x", None], (True,))]


def test_empty_table_keeps_its_schema(spark, engine_store):
    empty = spark.createDataFrame([], "id string, embedding array<float>")
    engine_store.write(empty, "empty")
    assert DeltaTable(engine_store.path("empty")).to_pyarrow_table().num_rows == 0
    for reader in (engine_store, other_reader(engine_store)):
        back = reader.read("empty")
        assert back.count() == 0 and back.columns == ["id", "embedding"]


def test_a_small_table_rewritten_on_the_driver_reads_back_everywhere(spark, engine_store):
    """What the increment does to ``centroids``: k rows read and overwritten through delta-rs,
    whichever engine wrote the table; one new version, same schema, any reader sees the rows."""
    store = engine_store
    rows = spark.createDataFrame([(0, [0.5, 0.25], 3), (1, [1.0, 0.0], 7)],
                                 "cluster int, center array<double>, size long")
    assert store.write(rows, "small") == 0
    small = store.read_small("small")
    sizes = small.column("size").to_pylist()
    grown = small.set_column(2, small.schema.field("size"), pa.array([n + 1 for n in sizes], pa.int64()))
    assert store.overwrite_small(grown, "small") == 1
    for reader in (store, other_reader(store)):
        back = reader.read("small")
        assert back.schema == rows.schema
        assert sorted((r.cluster, r.center, r.size) for r in back.collect()) == [(0, [0.5, 0.25], 4), (1, [1.0, 0.0], 8)]
    assert sorted(DeltaTable(store.path("small"), version=0).to_pyarrow_table().column("size").to_pylist()) == [3, 7]
    if store.engine == "delta-spark":  # Delta's own reader, at both versions
        delta = spark.read.format("delta")
        assert sorted(r.size for r in delta.load(store.path("small")).collect()) == [4, 8]
        assert sorted(r.size for r in delta.option("versionAsOf", 0).load(store.path("small")).collect()) == [3, 7]


def test_missing_table_is_a_clear_error(store):
    assert not store.exists("nope") and store.version("nope") is None
    with pytest.raises(FileNotFoundError, match="nope"):
        store.read("nope")


def test_count_comes_from_the_delta_log_and_matches_spark(spark, engine_store):
    df = spark.range(1234).selectExpr("cast(id as string) as id").repartition(3)
    engine_store.write(df, "c")
    engine_store.write(df.limit(10), "c", mode="append")
    assert engine_store.count("c") == 1244 == engine_store.read("c").count()


def test_delta_rs_commits_the_files_spark_wrote_with_stats(spark, tmp_path):
    store = TableStore(spark, tmp_path / "run", engine="delta-rs")
    df = spark.range(3000).selectExpr("cast(id as string) as id", "id * 2 as twice").repartition(3)
    store.write(df, "big")
    table = Path(store.location("big").local)
    adds = [a["add"] for a in log_actions(table) if "add" in a]
    on_disk = sorted(str(p.relative_to(table)) for p in table.glob("*/*.parquet"))
    assert sorted(a["path"] for a in adds) == on_disk and len(on_disk) == 3
    for add in adds:
        footer = pq.read_metadata(table / add["path"])
        assert "parquet-mr" in footer.created_by  # Spark's own file, never rewritten by the driver
        stats = json.loads(add["stats"])
        assert stats["numRecords"] == footer.num_rows and stats["nullCount"] == {"id": 0, "twice": 0}
        assert 0 <= stats["minValues"]["twice"] <= stats["maxValues"]["twice"] <= 5998
    assert sum(json.loads(a["stats"])["numRecords"] for a in adds) == 3000
    assert not list(table.glob("*/_delta_log")), "the footer scan leaves no second log behind"


def test_delta_rs_overwrite_removes_old_files_logically(spark, tmp_path):
    store = TableStore(spark, tmp_path / "run", engine="delta-rs")
    store.write(spark.range(10).repartition(2), "t")
    first_files = {a["add"]["path"] for a in log_actions(Path(store.location("t").local)) if "add" in a}
    store.write(spark.range(5), "t")
    actions = log_actions(Path(store.location("t").local))
    removed = {a["remove"]["path"] for a in actions if "remove" in a}
    assert removed == first_files
    assert all((Path(store.location("t").local) / f).is_file() for f in first_files)  # still there for time travel
    assert store.count("t") == 5 and store.read("t", version=0).count() == 10


def test_delta_rs_driver_never_holds_the_rows(spark, tmp_path):
    """The driver's Python process reads Parquet footers, never the rows: what it reads from disk
    and its resident memory stay flat while the table grows tenfold (about 4 MB to 40 MB)."""
    store = TableStore(spark, tmp_path / "run", engine="delta-rs")
    me = psutil.Process()

    def write(rows: int) -> tuple[int, int, int]:
        df = spark.range(rows, numPartitions=4).selectExpr(  # hex digests: Parquet cannot shrink them much
            "id", "concat(sha2(cast(id as string), 512), sha2(cast(id as string), 256)) as text")
        read_before, rss_before = me.io_counters().read_chars, me.memory_info().rss
        store.write(df, f"t{rows}")
        table_bytes = sum(p.stat().st_size for p in Path(store.location(f"t{rows}").local).glob("*/*.parquet"))
        return me.io_counters().read_chars - read_before, me.memory_info().rss - rss_before, table_bytes

    small_read, _, small_bytes = write(20_000)
    big_read, big_rss, big_bytes = write(200_000)
    assert store.count("t200000") == 200_000
    assert big_bytes > 9 * small_bytes
    assert big_read < big_bytes / 20          # footers only: the old path read every staged byte
    assert big_rss < big_bytes / 2            # no batch of rows, let alone the table, in the driver


@pytest.mark.parametrize("engine", ["delta-rs", "delta-spark"])
def test_a_plain_root_is_local_disk_whatever_the_default_filesystem(spark, tmp_path, engine):
    """A cluster whose default filesystem is not the driver's disk (HDFS; here a Hadoop viewfs
    mount that sends the run root's folder elsewhere): a plain output.root is qualified as
    ``file://``, so Spark writes where the driver and delta-rs look, and nothing lands elsewhere."""
    store = TableStore(spark, tmp_path / "run", engine=engine)
    assert store.path("t") == (tmp_path / "run" / "t").as_uri()
    elsewhere = tmp_path / "executors-disk"
    elsewhere.mkdir()
    mount = f"hidden{uuid.uuid4().hex[:8]}"  # a fresh name: Hadoop caches file systems per mount
    spark.conf.set(f"fs.viewfs.mounttable.{mount}.link.{store.root.local}", elsewhere.as_uri())
    spark.conf.set(f"fs.viewfs.mounttable.{mount}.linkFallback", "file:///")
    spark.conf.set("fs.defaultFS", f"viewfs://{mount}/")
    try:
        store.write(spark.range(100).repartition(3), "t")
        assert store.read("t").count() == 100
    finally:
        spark.conf.unset("fs.defaultFS")
    assert not list(elsewhere.rglob("*.parquet"))
    assert DeltaTable(str(tmp_path / "run" / "t")).to_pyarrow_table().num_rows == 100


def test_merge_inserts_and_updates_by_key_in_one_version(spark, engine_store):
    """MERGE INTO keyed by id: a new key is inserted, a changed row takes the source's values but
    keeps its ``keep`` column, a row the source does not name stays, and so does its file; one new
    version per merge, also when nothing changes. Read back by delta-rs straight from the path."""
    store = engine_store
    schema = "id string, note string, tags array<string>, run string"
    store.write(spark.createDataFrame([("a", "x", ["1"], "r0"), ("b", "y", None, "r0")], schema).coalesce(1), "t")
    store.write(spark.createDataFrame([("c", "z", ["3"], "r0")], schema).coalesce(1), "t", mode="append")
    c_file = set(DeltaTable(store.path("t")).file_uris()) - set(DeltaTable(store.path("t"), version=0).file_uris())
    assert sorted(r.id for r in store.read_added("t", 0).collect()) == ["c"]  # appended since v0
    # a as it is, b changed (its run stays r0), d new
    source = spark.createDataFrame([("a", "x", ["1"], "r1"), ("b", "y2", None, "r1"), ("d", None, ["4"], "r1")],
                                   schema)

    assert store.merge(source, "t", ["id"], keep=["run"]) == 2
    table = DeltaTable(store.path("t"))
    expected = [("a", "x", ["1"], "r0"), ("b", "y2", None, "r0"), ("c", "z", ["3"], "r0"), ("d", None, ["4"], "r1")]
    rows = table.to_pyarrow_table().to_pylist()
    assert sorted((r["id"], r["note"], r["tags"], r["run"]) for r in rows) == expected
    assert table.history(1)[0]["operation"] == ("MERGE" if store.engine == "delta-spark" else "WRITE")
    assert c_file <= set(table.file_uris())  # c's file holds no row the source names: it stays
    with pytest.raises(ValueError, match="not an append"):
        store.read_added("t", 1)  # the merge removed a file: no longer an append
    assert store.merge(source, "t", ["id"], keep=["run"]) == 3  # the same merge again: a version, no change
    assert sorted((r["id"], r["note"], r["tags"], r["run"]) for r in store.read("t").collect()) == expected


def test_a_bounded_merge_deletes_only_within_its_bounds(spark, engine_store):
    """``within`` bounds the deletes: a bounded row the source lacks is deleted, rows outside the
    bounds stay, also those sharing a file with a changed row (the delta-rs writer rewrites that
    file), and a source row with a null key matches nothing: it is inserted, as often as it comes."""
    store = engine_store
    schema = "id string, note string"
    store.write(spark.createDataFrame([("a", "x"), ("b", "y"), ("c", "z"), (None, "r")], schema).coalesce(1), "t")
    source = spark.createDataFrame([("b", "y2"), ("d", "new"), (None, "r"), (None, "r")], schema)
    within = spark.createDataFrame([("a",), ("b",), ("e",)], "id string")  # a, b, e bounded; c and the null not

    assert store.merge(source, "t", ["id"], within=within) == 1
    rows = DeltaTable(store.path("t")).to_pyarrow_table().to_pylist()
    assert sorted((r["id"] or "", r["note"]) for r in rows) == [
        ("", "r"), ("", "r"), ("", "r"), ("b", "y2"), ("c", "z"), ("d", "new")]
    # bounded by b and c, the source names c only: c changes and b goes
    assert store.merge(spark.createDataFrame([("c", "z2")], schema), "t", ["id"],
                       within=spark.createDataFrame([("b",), ("c",)], "id string")) == 2
    assert sorted(r.note for r in store.read("t").collect()) == ["new", "r", "r", "r", "z2"]


def test_an_older_version_with_deletion_vectors_is_read_through_delta(spark, tmp_path):
    """A pinned version is read as its Parquet files only where those files are its rows (reader
    protocol 1). A table someone gave deletion vectors keeps a deleted row in its file, so the
    delta-spark store reads such a version through Delta's time travel: the deleted row stays
    deleted."""
    store = TableStore(spark, tmp_path / "run", engine="delta-spark")
    path = store.path("t").replace("`", "``")
    spark.sql(f"CREATE TABLE delta.`{path}` (id string) USING delta "
              "TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    store.write(spark.createDataFrame([("a",), ("b",), ("c",)], "id string").coalesce(1), "t", mode="append")
    spark.sql(f"DELETE FROM delta.`{path}` WHERE id = 'b'")
    deleted_at = store.version("t")
    store.write(spark.createDataFrame([("d",)], "id string"), "t", mode="append")
    assert DeltaTable(store.path("t")).protocol().min_reader_version > 1
    assert any(a.get("add", {}).get("deletionVector") for a in log_actions(Path(store.location("t").local)))
    assert sorted(r.id for r in store.read("t", version=deleted_at).collect()) == ["a", "c"]
    assert sorted(r.id for r in store.read("t").collect()) == ["a", "c", "d"]


def test_an_older_version_of_a_plain_table_is_its_files_at_that_version(spark, engine_store):
    """Reader protocol 1 (our tables): a pinned version reads the files live at that version, the
    rows a writer appended and the rows an overwrite replaced included or not as at that version."""
    store = engine_store
    store.write(spark.createDataFrame([("a",), ("b",)], "id string"), "t")
    store.write(spark.createDataFrame([("c",)], "id string"), "t", mode="append")
    store.write(spark.createDataFrame([("z",)], "id string"), "t")
    assert DeltaTable(store.path("t")).protocol().min_reader_version == 1
    expected = {0: ["a", "b"], 1: ["a", "b", "c"], 2: ["z"]}
    for version, ids in expected.items():
        assert sorted(r.id for r in store.read("t", version=version).collect()) == ids
        assert sorted(DeltaTable(store.path("t"), version=version).to_pyarrow_table().column("id").to_pylist()) == ids


def test_a_partitioned_table_keeps_its_partition_values_at_any_version(spark, tmp_path):
    """Partition values live in the Delta log, not in the files: a partitioned table, at an older
    version or the current one, is read through Delta's reader, the partition column filled in."""
    store = TableStore(spark, tmp_path / "run", engine="delta-spark")
    rows = spark.createDataFrame([("a", 1), ("b", 2)], "id string, part int")
    rows.write.format("delta").partitionBy("part").save(store.path("t"))
    store.write(spark.createDataFrame([("c", 3)], "id string, part int"), "t", mode="append")
    assert DeltaTable(store.path("t")).metadata().partition_columns == ["part"]
    assert sorted(tuple(r) for r in store.read("t", version=0).collect()) == [("a", 1), ("b", 2)]
    assert sorted(tuple(r) for r in store.read("t").collect()) == [("a", 1), ("b", 2), ("c", 3)]
