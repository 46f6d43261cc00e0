"""The pipeline through Spark Connect: a real Connect server (tests/connect_server.py) on 127.0.0.1,
``mergeit`` as its client in another process (``spark.remote``).

One run root goes through what a Databricks serverless or shared-cluster user does: the whole
pipeline, its client killed during merge and the run resumed (the dead client's operations on the
server are interrupted, so no group is paid for twice), then an increment. The final table equals
the classic session's run on the same rows.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from _pipeline_run import cli_args, final_content, read, write_input
from connect_server import ConnectServer
from fake_openai import FakeOpenAI
from mergeit_spark.config import SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]
NEW_ROWS = 30


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory):
    with ConnectServer(tmp_path_factory.mktemp("connect")) as server:
        yield server


def _client(root: Path, data: str, base_url: str, server: ConnectServer, *extra: str,
            incremental: bool = False) -> subprocess.Popen:
    args = cli_args(root, Path(data), base_url, f"spark.remote={server.url}", "llm.concurrency=1", *extra)
    command = [sys.executable, "-m", "mergeit_spark.cli", "run", *(["--incremental"] if incremental else []), *args]
    return subprocess.Popen(command, cwd=REPO, env=dict(os.environ, SPARK_LOCAL_IP="127.0.0.1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(client: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = client.communicate(timeout=timeout)  # a guard against a hang, not a speed bound
    text = out.decode(errors="replace")
    assert client.returncode == 0, text[-4000:]
    return text


@pytest.mark.slow
def test_whole_run_killed_client_rerun_and_increment_through_spark_connect(
        connect_server, pipeline_run, shared_data, tmp_path):
    root = tmp_path / "run"
    data = str(pipeline_run.data)
    # Slow answers, one request at a time per merge task: the merge stage lasts long enough for
    # the client to be killed with most groups still to send.
    with FakeOpenAI(latency_s=3.0) as llm:
        client = _client(root, data, llm.base_url, connect_server)
        deadline = time.monotonic() + 900
        try:
            while time.monotonic() < deadline and client.poll() is None and len(llm.requests) < 3:
                time.sleep(0.2)
            assert client.poll() is None, client.stdout.read().decode(errors="replace")[-4000:]
            assert len(llm.requests) >= 3, "merge never started"
        finally:
            os.killpg(client.pid, signal.SIGKILL)  # the client only: its operations go on on the server
            client.wait()
        assert not (root / "_state" / "finalize.json").exists()

        log = _finish(_client(root, data, llm.base_url, connect_server))
        assert "interrupted" in log  # the rerun took the dead client's lease and stopped its operations
        n_groups = len(read(root, "merge_groups"))
        assert len(llm.per_group) == n_groups and max(llm.per_group.values()) <= 2
        # Requests cut off when the dead client's operations were interrupted are sent again;
        # any other group is paid once: the interrupted tasks stop asking.
        assert sum(llm.per_group.values()) - n_groups <= 4  # 2 tasks in flight, and their last breath
        assert final_content(root) == pipeline_run.final  # what the classic session made of the same rows

        # An increment against the same server (the merge stage's settings name it), answering at once.
        llm.latency_s = 0.0
        new, new_lines = write_input(shared_data, tmp_path / "new.jsonl", rows=NEW_ROWS, offset=400)
        records_before = len(read(root, "records"))
        groups_before = {g["group_id"] for g in read(root, "merge_groups")}
        paid_before = Counter(llm.per_group)
        _finish(_client(root, f"{data},{new}", llm.base_url, connect_server, incremental=True))
        records, rejects, lineage = read(root, "records"), read(root, "rejects"), read(root, "lineage")
        assert len(records) + len(rejects) == pipeline_run.n_input + new_lines
        assert len(records) > records_before
        traced = Counter(r["id"] for r in lineage if r["fate"] != "rejected")
        assert set(traced) == {r["id"] for r in records} and set(traced.values()) == {1}
        # Only the new groups are paid, once each; no group of the full run is asked again.
        paid = Counter(llm.per_group) - paid_before  # keyed by the group's instructions
        new_groups = {g["group_id"] for g in read(root, "merge_groups")} - groups_before
        assert sum(paid.values()) == len(new_groups) > 0 and set(paid.values()) == {1}
        assert not set(paid) & set(paid_before)
    final_ids = {r["id"] for r in read(root, "final")}
    assert all(r["final_id"] in final_ids for r in lineage if r["fate"] in ("kept", "merged"))


def test_spark_remote_takes_a_connect_url_or_a_local_master():
    assert load_settings(overrides=["spark.remote=sc://127.0.0.1:15002"], env={}).spark.remote.startswith("sc://")
    assert load_settings(overrides=["spark.remote=local[2]"], env={}).spark.remote == "local[2]"
    with pytest.raises(SettingsError, match="spark.remote"):
        load_settings(overrides=["spark.remote=http://127.0.0.1:15002"], env={})
