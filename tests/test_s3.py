"""The run root and the inputs on a real S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py).

The whole pipeline with input and root on ``s3a://`` and its tables in a Hive-compatible
metastore gives the same ``final`` as on local disk, read back by delta-rs with storage options
and by a second session as ``curation.final``; a Python worker killed mid-merge: no recorded
group is paid for twice; the lease's exclusive create is S3's conditional PUT, so of two runs on
one root the second is refused; state, logs, report and export go through the filesystem layer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import duckdb
import pyarrow.dataset
import pytest
from deltalake import DeltaTable

from _pipeline_run import cli_args
from _toy_stages import Source
from _merge_helpers import kill_a_merge_worker
from fake_openai import FakeOpenAI
from test_lease import _holder, assert_one_of_eight_takes
from mergeit_spark.config import load_settings
from mergeit_spark.fs import Storage, resolve
from mergeit_spark.lease import RootBusy, RunLease
from mergeit_spark.pipeline import Pipeline
from mergeit_spark.tables import TableStore


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """This process's AWS variables pointed at the server (the SDKs read them, as on AWS)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.env()


def _storage(s3_server) -> Storage:
    return Storage(endpoint_url=s3_server.endpoint)


def test_files_round_trip_and_the_exclusive_create_is_exclusive(s3_env, s3_server, s3_bucket):
    folder = resolve(f"s3a://{s3_bucket}/x", _storage(s3_server))
    (folder / "a.json").write_bytes(b'{"a": 1}')
    (folder / "sub" / "b.json").write_bytes(b"2")
    assert (folder / "a.json").read_bytes() == b'{"a": 1}' and (folder / "missing").read_bytes() is None
    assert [f.uri for f in folder.files(recursive=True)] == [f"s3a://{s3_bucket}/x/a.json",
                                                            f"s3a://{s3_bucket}/x/sub/b.json"]
    assert (folder / "c").create(b"first") and not (folder / "c").create(b"second")
    assert (folder / "c").read_bytes() == b"first"
    folder.delete_tree()
    assert folder.files(recursive=True) == [] and not folder.exists()


def test_of_runs_starting_at_once_on_s3_exactly_one_gets_the_lease(spark, s3_env, s3_server, s3_bucket):
    store = TableStore(spark, f"s3a://{s3_bucket}/run", storage=_storage(s3_server))
    assert_one_of_eight_takes(store)


def test_a_second_run_on_an_s3_root_is_refused_naming_the_holder(spark, s3_env, s3_server, s3_bucket):
    root = f"s3a://{s3_bucket}/run"
    settings = load_settings(overrides=[f"output.root={root}"], env={})
    pipeline = Pipeline(settings, spark=spark, stages=[Source()])
    with RunLease(TableStore(spark, root, storage=_storage(s3_server)), timeout_s=60) as held:
        with pytest.raises(RootBusy, match=f"held by another run \\(holder {held.holder}"):
            pipeline.run()
    assert _holder(pipeline.store) is None  # given back


def test_delta_rs_engine_on_s3_needs_a_locking_option(spark, s3_env, s3_server, s3_bucket):
    root = f"s3a://{s3_bucket}/run"
    with pytest.raises(RuntimeError, match="AWS_S3_LOCKING_PROVIDER"):
        TableStore(spark, root, engine="delta-rs", storage=_storage(s3_server))
    store = TableStore(spark, root, engine="delta-rs",
                       storage=Storage(s3_server.endpoint, options={"conditional_put": "etag"}))
    import pyarrow as pa
    assert store.overwrite_small(pa.table({"cluster": [0, 1]}), "centroids") == 0
    assert store.read_small("centroids").column("cluster").to_pylist() == [0, 1]


def _metastore(folder) -> str:
    """Spark settings for a Hive-compatible metastore in ``folder`` (Derby), as a ``--set``."""
    return ("spark.conf={spark.sql.catalogImplementation: hive, "
            f"spark.sql.warehouse.dir: '{folder}/warehouse', spark.hadoop.javax.jdo.option.ConnectionURL: "
            f"'jdbc:derby:;databaseName={folder}/metastore_db;create=true'}}")


# A second session on the same metastore: what a lakehouse user's next job sees.
READ_FROM_CATALOG = """
import json, sys
from mergeit_spark.config import load_settings
from mergeit_spark.session import build_session, object_store_session
settings = load_settings(overrides=[f"output.root={sys.argv[1]}", "spark.master=local[1]", sys.argv[2]], env={})
spark = build_session(*object_store_session(settings))
print("IDS", json.dumps(sorted(r.id for r in spark.sql("SELECT id FROM curation.final").collect())))
"""


@pytest.mark.slow   # two drivers of their own (Hadoop's s3a connector on their classpath)
def test_the_whole_pipeline_on_s3_matches_local_disk_and_pays_each_group_once(
        pipeline_run, s3_env, s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    client.upload_file(str(pipeline_run.data), s3_bucket, "input/in.jsonl")
    root, data = f"s3a://{s3_bucket}/run", f"s3a://{s3_bucket}/input/in.jsonl"
    env = {**os.environ, **s3_env}
    driver, killed = [], []
    with FakeOpenAI(script=kill_a_merge_worker(driver, killed)) as fake:
        args = ["run", *cli_args(root, data, fake.base_url, "spark.master=local[2,4]", "llm.concurrency=2",
                                 "output.catalog=spark_catalog", "output.schema=curation", _metastore(tmp_path)),
                "--report", "--export", "jsonl"]
        driver.append(subprocess.Popen([sys.executable, "-m", "mergeit_spark.cli", *args], env=env, cwd=tmp_path,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        output, _ = driver[0].communicate(timeout=900)
        assert driver[0].returncode == 0, output[-4000:]
        assert killed and "Lost task" in output, "no merge worker was killed: the test proved nothing"

    options = Storage(s3_server.endpoint).delta_options(root)
    table = DeltaTable(f"{root}/final", storage_options=options)
    final = table.to_pyarrow_table().to_pylist()
    assert {(r["id"], r["instruction"], r["input"], r["output"], r["origin"], tuple(sorted(r["source_ids"])))
            for r in final} == pipeline_run.final
    # DuckDB over the live files delta-rs lists (its S3 extension is a download this machine cannot
    # make, so the files come through pyarrow with the same endpoint and credentials).
    live = pyarrow.dataset.dataset([u.split("://", 1)[1] for u in table.file_uris()],
                                   filesystem=resolve(root, Storage(s3_server.endpoint)).filesystem)
    engine = duckdb.connect()
    engine.register("live", live)
    assert engine.sql("SELECT count(*), count(DISTINCT id) FROM live").fetchall() == [(len(final), len(final))]
    # Each group answered once, but for the requests in flight in the killed task (at most its
    # concurrency), which were sent and never recorded.
    merges = DeltaTable(f"{root}/merges", storage_options=options).to_pyarrow_table().to_pylist()
    served = Counter(fake.served_ok)
    assert sum(served.values()) - len(merges) <= 2 and all(n <= 2 for n in served.values())
    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for o in page.get("Contents", [])}
    assert "run/report/report.html" in keys and "run/export/final.jsonl" in keys
    assert any(k.startswith("run/_logs/run-") for k in keys) and any(k.startswith("run/_ledger/") for k in keys)
    exported = client.get_object(Bucket=s3_bucket, Key="run/export/final.jsonl")["Body"].read().decode()
    assert sorted(json.loads(line)["id"] for line in exported.splitlines()) == sorted(r["id"] for r in final)
    read = subprocess.run([sys.executable, "-c", READ_FROM_CATALOG, root, _metastore(tmp_path)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert read.returncode == 0, read.stderr[-3000:]
    assert f"IDS {json.dumps(sorted(r['id'] for r in final))}" in read.stdout
    assert not any(k.endswith(".tmp") or "/." in k for k in keys), keys  # no leftovers of atomic writes


def test_inputs_on_s3_resolve_count_and_fingerprint_as_on_disk(s3_env, s3_server, s3_bucket, shared_data, tmp_path):
    """A folder of inputs on S3 (an array, JSON Lines in a subfolder, a Delta table, hidden files)
    resolves to the same inputs, formats, sizes and units as the same folder on local disk."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from mergeit_spark.inputs import fingerprint_inputs, input_bytes, resolve_inputs
    from mergeit_spark.jsonstream import count_units

    local = tmp_path / "in"
    (local / "sub").mkdir(parents=True)
    (local / "array.json").write_bytes((shared_data / "gpteacher-roleplay.json").read_bytes())
    (local / "sub" / "lines.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 3)
    (local / "_SUCCESS").write_text("")
    client = s3_server.client()
    for path in (p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_bucket, f"in/{path.relative_to(local)}")
    table = pa.table({"instruction": ["x", "y"], "output": ["1", "2"]})
    write_deltalake(str(local / "table"), table)
    write_deltalake(f"s3a://{s3_bucket}/in/table", table, storage_options=Storage().delta_options(f"s3a://{s3_bucket}"))

    on_disk, on_s3 = resolve_inputs([str(local)], "auto"), resolve_inputs([f"s3a://{s3_bucket}/in"], "auto")
    assert [(i.path[len(str(local)):], i.format) for i in on_disk] == \
        [(i.path[len(f"s3a://{s3_bucket}/in"):], i.format) for i in on_s3] == \
        [("/array.json", "json"), ("/sub/lines.jsonl", "jsonl"), ("/table", "delta")]
    assert [input_bytes(i) for i in on_disk[:2]] == [input_bytes(i) for i in on_s3[:2]]
    assert count_units(on_s3[0].path, 1 << 20, 100) == count_units(on_disk[0].path, 1 << 20, 100) > 100
    assert fingerprint_inputs(on_s3) == fingerprint_inputs(on_s3) != fingerprint_inputs(on_disk)
