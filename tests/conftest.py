"""Shared fixtures: one local Spark session for the whole test run, real data paths."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# This machine resolves its hostname to a non-loopback address; tests stay on 127.0.0.1.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (real model, cluster, LLM)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data missing: {SHARED_DATA} (clone beside ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def settings():
    from mergeit_spark.config import load_settings
    return load_settings(overrides=["spark.master=local[2]", "spark.shuffle_partitions=4"])


@pytest.fixture(scope="session")
def spark(settings):
    from mergeit_spark.session import build_session
    session = build_session(settings.spark)
    yield session
    session.stop()


@pytest.fixture()
def store(spark, tmp_path):
    from mergeit_spark.tables import TableStore
    return TableStore(spark, tmp_path / "run")


@pytest.fixture(scope="session")
def pipeline_llm():
    """The scripted OpenAI-protocol server of the shared whole-pipeline run (``pipeline_run``);
    tests that rerun a copy of that run against it find the merge stage current."""
    from fake_openai import FakeOpenAI
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="session")
def pipeline_run(spark, shared_data, tmp_path_factory, pipeline_llm):
    """Every stage once on 200 real rows in the shared session, for the whole test run: the
    pipeline, engine and resume tests read it (never write to it) or work on ``copy_to`` copies."""
    from _pipeline_run import run_whole_pipeline
    return run_whole_pipeline(spark, shared_data, tmp_path_factory.mktemp("shared-run"), pipeline_llm.base_url)


@pytest.fixture(autouse=True, scope="module")
def _no_cache_across_modules():
    """Rows a module cached (a stage's persist called outside the pipeline, which clears its
    caches) are dropped before the next module: one test's 750 MB of parsed outcomes left in
    the shared session's storage memory once starved a later module's sort of execution memory."""
    yield
    from pyspark.sql import SparkSession
    active = SparkSession.getActiveSession()
    if active is not None:
        active.catalog.clearCache()


@pytest.fixture(scope="session")
def s3_server():
    """One real S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py) for the whole test run;
    needs the binary that `make weed` builds."""
    from s3server import S3Server
    with S3Server() as server:
        yield server


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, uniquely named bucket on ``s3_server``; removed afterwards (with what it holds),
    so that a long run does not pile up buckets (each one is a SeaweedFS collection)."""
    import uuid
    name = s3_server.make_bucket(f"test-{uuid.uuid4().hex[:16]}")
    yield name
    client = s3_server.client()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        client.delete_bucket(Bucket=name)
    except Exception:  # best effort: the server's temp folder goes at the end of the run anyway
        pass
