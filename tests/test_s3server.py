"""The real S3 server the tests use (SeaweedFS, tests/s3server.py) does what the project relies on:
plain object round trips, conditional writes (create-if-absent, replace/delete-if-unchanged, what a
lease or a commit marker on S3 stands on), pyarrow's S3 filesystem, and refused bad credentials."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError

from s3server import HOST


def _error(exc: pytest.ExceptionInfo) -> tuple[int, str]:
    """(HTTP status, S3 error code) of a raised ClientError."""
    return exc.value.response["ResponseMetadata"]["HTTPStatusCode"], exc.value.response["Error"]["Code"]


def test_put_get_list_delete(s3_server, s3_bucket):
    s3 = s3_server.client()
    for key in ("run/a.json", "run/b.json", "other/c.json"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    assert s3.get_object(Bucket=s3_bucket, Key="run/b.json")["Body"].read() == b"run/b.json"
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="run/")
    assert [o["Key"] for o in listed["Contents"]] == ["run/a.json", "run/b.json"]
    s3.delete_object(Bucket=s3_bucket, Key="run/a.json")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["other/c.json", "run/b.json"]
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=s3_bucket, Key="run/a.json")
    assert _error(exc) == (404, "NoSuchKey")


def test_if_none_match_creates_once(s3_server, s3_bucket):
    """PUT with If-None-Match: * writes only when the key is absent; the loser gets 412."""
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="lock", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=s3_bucket, Key="lock", Body=b"second", IfNoneMatch="*")
    assert _error(exc) in {(412, "PreconditionFailed"), (409, "ConditionalRequestConflict")}
    assert s3.get_object(Bucket=s3_bucket, Key="lock")["Body"].read() == b"first"


def test_if_none_match_is_atomic_under_a_race(s3_server, s3_bucket):
    """Concurrent create-if-absent on one key: exactly one writer wins (the check and the write
    are one step on the filer, not a read followed by a write)."""
    s3 = s3_server.client()

    def put(i: int) -> str:
        try:
            s3.put_object(Bucket=s3_bucket, Key="race", Body=str(i).encode(), IfNoneMatch="*")
            return "won"
        except ClientError as exc:
            return exc.response["Error"]["Code"]

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(put, range(8)))
    assert outcomes.count("won") == 1, outcomes
    assert set(outcomes) <= {"won", "PreconditionFailed", "ConditionalRequestConflict"}, outcomes


def test_if_match_on_put_and_delete(s3_server, s3_bucket):
    """PUT and DELETE with If-Match: an ETag apply only while the object still has it."""
    s3 = s3_server.client()
    first = s3.put_object(Bucket=s3_bucket, Key="state", Body=b"v1")["ETag"]
    second = s3.put_object(Bucket=s3_bucket, Key="state", Body=b"v2", IfMatch=first)["ETag"]
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=s3_bucket, Key="state", Body=b"v3", IfMatch=first)
    assert _error(exc) == (412, "PreconditionFailed")
    with pytest.raises(ClientError) as exc:
        s3.delete_object(Bucket=s3_bucket, Key="state", IfMatch=first)
    assert _error(exc) == (412, "PreconditionFailed")
    assert s3.get_object(Bucket=s3_bucket, Key="state")["Body"].read() == b"v2"
    s3.delete_object(Bucket=s3_bucket, Key="state", IfMatch=second)
    assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_pyarrow_s3_filesystem(s3_server, s3_bucket):
    from pyarrow import fs
    s3fs = fs.S3FileSystem(access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                           endpoint_override=f"{HOST}:{s3_server.ports['s3']}", scheme="http",
                           region=s3_server.region)
    for name in ("a.txt", "sub/b.txt"):
        with s3fs.open_output_stream(f"{s3_bucket}/data/{name}") as out:
            out.write(name.encode())
    with s3fs.open_input_stream(f"{s3_bucket}/data/sub/b.txt") as src:
        assert src.read() == b"sub/b.txt"
    files = {i.path for i in s3fs.get_file_info(fs.FileSelector(f"{s3_bucket}/data", recursive=True))
             if i.type == fs.FileType.File}
    assert files == {f"{s3_bucket}/data/a.txt", f"{s3_bucket}/data/sub/b.txt"}


@pytest.mark.parametrize("access_key, secret_key", [("mergeit-test", "wrong-secret"), ("nobody", "nothing")])
def test_wrong_credentials_refused(s3_server, s3_bucket, access_key, secret_key):
    s3 = s3_server.client(access_key=access_key, secret_key=secret_key)
    for call in (s3.list_buckets, lambda: s3.list_objects_v2(Bucket=s3_bucket),
                 lambda: s3.put_object(Bucket=s3_bucket, Key="x", Body=b"x")):
        with pytest.raises(ClientError) as exc:
            call()
        assert _error(exc)[0] == 403


def test_unsigned_requests_refused(s3_server, s3_bucket):
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{s3_server.endpoint}/{s3_bucket}?list-type=2", timeout=10)
    assert exc.value.code == 403


def test_env_points_children_at_the_server(s3_server, s3_bucket):
    """A child process configured only by ``env()`` (boto3 reads AWS_ENDPOINT_URL) reaches it."""
    import os
    import subprocess
    import sys
    code = f"import boto3; print(boto3.client('s3').list_objects_v2(Bucket='{s3_bucket}')['KeyCount'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_server.env()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stderr


def test_missing_binary_says_how_to_build_it(monkeypatch, tmp_path):
    from s3server import S3Server
    monkeypatch.setenv("MERGEIT_WEED", str(tmp_path / "weed"))
    with pytest.raises(RuntimeError, match=r"run make weed \(scripts/build-weed.sh\)"):
        S3Server()
