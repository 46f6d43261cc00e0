"""The filesystem layer on local disk (tests/test_s3.py runs it on a real S3 server): what a URI
means, atomic replace, exclusive create, listings; and what reaches Spark and delta-rs from the
environment (an endpoint and a region, never a credential)."""
from __future__ import annotations

import os
import threading

import pytest

from mergeit_spark.fs import Storage, StorageError, qualify, resolve


def test_plain_paths_and_file_uris_are_the_same_local_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "a b%20c"
    assert qualify("rel/x") == f"file://{tmp_path}/rel/x"
    assert qualify(str(odd)) == f"file://{odd}"  # Hadoop-style: not percent-encoded
    assert resolve(f"file://{odd}").local == resolve(str(odd)).local == str(odd)
    assert resolve(f"file:{odd}").local == str(odd)
    assert qualify("s3a://bucket/run/") == "s3a://bucket/run"
    with pytest.raises(StorageError, match="unknown scheme ftp://"):
        qualify("ftp://host/x")


def test_writes_are_whole_creates_are_exclusive_and_listings_sorted(tmp_path):
    root = resolve(tmp_path / "root")
    (root / "b" / "two.json").write_bytes(b"2")
    (root / "a.json").write_bytes(b"1")
    (root / "a.json").write_bytes(b"one")  # replaced, no temp file left beside it
    assert (root / "a.json").read_bytes() == b"one" and (root / "none").read_bytes() is None
    assert [f.name for f in root.files()] == ["a.json"]
    assert [f.uri for f in root.files(recursive=True)] == [f"{root.uri}/a.json", f"{root.uri}/b/two.json"]
    assert [c.name for c in root.children()] == ["a.json", "b"]

    won = []
    start = threading.Barrier(8)

    def create(n):
        start.wait()
        won.append((root / "lease").create(str(n).encode()))

    threads = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 7 + [True]
    root.delete_tree()
    assert not root.exists() and root.files() == []
    (root / "x").delete()  # nothing there: nothing to do


def test_the_environment_gives_endpoint_and_region_never_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-copy")
    storage = Storage()
    options, hadoop = storage.delta_options("s3a://b/t"), storage.hadoop_conf()
    assert options["AWS_ENDPOINT_URL"] == hadoop["fs.s3a.endpoint"] == "http://127.0.0.1:8333"
    assert options["AWS_REGION"] == hadoop["fs.s3a.endpoint.region"] == "eu-west-3"
    assert options["AWS_ALLOW_HTTP"] == "true" and hadoop["fs.s3a.path.style.access"] == "true"
    assert "do-not-copy" not in repr(options) + repr(hadoop) + repr(storage)
    assert Storage(endpoint_url="https://s3.example", region="us-west-2").hadoop_conf() == {
        "fs.s3a.endpoint.region": "us-west-2", "fs.s3a.endpoint": "https://s3.example",
        "fs.s3a.path.style.access": "true", "fs.s3a.connection.ssl.enabled": "true"}
    assert storage.delta_options("/local/t") == {}
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "do-not-copy"
