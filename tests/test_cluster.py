"""spark-submit of the whole pipeline, with Delta's jar, to a real standalone cluster (master + 2 workers)
on 127.0.0.1: the tables are written by delta-spark."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from _cluster import StandaloneCluster
from _pipeline_run import read, write_input
from fake_openai import FakeOpenAI
from mergeit_spark.config import load_settings
from mergeit_spark.jars import jar_conf

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a standalone cluster: not in `make test-fast`


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = StandaloneCluster(tmp_path_factory.mktemp("cluster"), workers=2, cores=1, memory="2g").start()
    yield c
    c.stop()


def test_spark_submit_runs_the_whole_pipeline_on_two_workers(cluster, shared_data, tmp_path):
    import subprocess
    import sys

    zip_path = Path(subprocess.run([sys.executable, str(REPO / "jobs" / "package.py"), str(tmp_path / "mergeit_spark.zip")],
                                   check=True, capture_output=True, text=True).stdout.strip())
    data, n_input = write_input(shared_data, tmp_path / "in.jsonl", rows=160, offset=1000)
    root = tmp_path / "run"
    # Delta's jar the way a cluster user passes it: spark-submit resolves the coordinate
    # (--packages, through the project's Ivy settings and cache) for the driver and executors.
    jars = jar_conf(load_settings().spark)
    ivy = [arg for key in ("spark.jars.ivy", "spark.jars.ivySettings") for arg in ("--conf", f"{key}={jars[key]}")]
    with FakeOpenAI() as llm:
        result = cluster.submit([
            "--packages", jars["spark.jars.packages"], *ivy,
            "--py-files", str(zip_path),
            "--conf", "spark.executor.cores=1",
            str(REPO / "jobs" / "run_pipeline.py"),
            "--conf", str(REPO / "conf" / "cluster.yaml"),
            "--set", f"input.paths=[{data}]", "--set", f"output.root={root}",
            "--set", "spark.shuffle_partitions=4", "--set", "embed.partitions=2",
            "--set", "select.budget=10", "--set", "group.threshold=0.5",
            "--set", f"llm.base_url={llm.base_url}", "--set", "llm.model=fake-model",
            "--set", "merge.partitions=2", "--report",
        ], timeout=900)
        log = (cluster.workdir / "submit.log").read_text(errors="replace")
        assert result.returncode == 0, log[-5000:]
        assert len(llm.requests) > 0

    # The job really ran on the cluster's executors, not in a local master: each worker
    # keeps a work directory per application it ran executors for.
    apps = list((cluster.workdir / "worker0").glob("app-*")) + list((cluster.workdir / "worker1").glob("app-*"))
    assert apps, "no executor ran on the workers"
    assert len({p.parent.name for p in apps}) == 2, "both workers should have run executors"

    # Every table was written by delta-spark on the cluster (commitInfo names the writer).
    for table in ("records", "embeddings", "merges", "final", "lineage"):
        assert all("Delta-Lake/" in h.get("engineInfo", "") for h in DeltaTable(str(root / table)).history()), table
    records, rejects, lineage, final = (read(root, t) for t in ("records", "rejects", "lineage", "final"))
    assert len(records) + len(rejects) == n_input
    assert len(lineage) == n_input
    assert Counter(r["id"] for r in lineage if r["fate"] != "rejected") == Counter(r["id"] for r in records)
    assert 0 < len(final) < len(records)
    merges = read(root, "merges")
    assert {m["status"] for m in merges} <= {"merged", "gate_failed", "failed"}
    assert len(merges) == len(read(root, "merge_groups"))
    report = json.loads((root / "report" / "report.json").read_text())  # written by the submitted job
    assert report["input_rows"] == n_input
    assert report["ledger"]["balanced"] is True
    assert report["final"]["original"] + report["final"]["merged"] == len(final)
