"""The pipeline through Spark Connect: a real Connect server (tests/connect_server.py) on 127.0.0.1,
``mergeit`` as its client in another process (``spark.remote``).

One run root goes through what a Databricks serverless or shared-cluster user does: the whole
pipeline, its client killed during merge and the run resumed (the dead client's operations on the
server are interrupted, so no group is paid for twice), then an increment from a user's own Connect
job (``curate(df, incremental=True)`` on a DataFrame made in its session) and the report. The final
table equals the classic session's run on the same rows.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from _pipeline_run import final_content, pipeline_overrides, read
from connect_server import ConnectServer
from fake_openai import FakeOpenAI
from mergeit_spark.config import SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]
NEW_ROWS = 30
NEW_OFFSET = 400


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory):
    with ConnectServer(tmp_path_factory.mktemp("connect")) as server:
        yield server


def _overrides(root: Path, data: str, base_url: str, server: ConnectServer) -> list[str]:
    return pipeline_overrides(root, Path(data), base_url, f"spark.remote={server.url}", "llm.concurrency=1")


def _start(*command: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *command], cwd=REPO, env=dict(os.environ, SPARK_LOCAL_IP="127.0.0.1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _client(root: Path, data: str, base_url: str, server: ConnectServer) -> subprocess.Popen:
    """``mergeit run`` as the server's client."""
    args = [arg for item in _overrides(root, data, base_url, server) for arg in ("--set", item)]
    return _start("-m", "mergeit_spark.cli", "run", *args)


def _curate_client(work: Path, server: ConnectServer, rows: list[dict], overrides: list[str]) -> dict:
    """tests/curate_client.py as the server's client; the JSON line it printed last."""
    spec = work / "curate.json"
    spec.write_text(json.dumps({"url": server.url, "overrides": overrides, "rows": rows}))
    return json.loads(_finish(_start(str(REPO / "tests" / "curate_client.py"), str(spec))).strip().splitlines()[-1])


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

        # An increment from a user's own Connect job: curate() on a DataFrame of new rows made in
        # its session, then the report; against the same server, answering at once.
        llm.latency_s = 0.0
        rows = json.loads((shared_data / "mergeit-6k.json").read_text())[NEW_OFFSET:NEW_OFFSET + NEW_ROWS]
        new = [{"prompt": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows]
        new.append(dict(new[3]))  # an exact duplicate
        records_before = len(read(root, "records"))
        groups_before = {g["group_id"] for g in read(root, "merge_groups")}
        paid_before = Counter(llm.per_group)
        seen = _curate_client(tmp_path, connect_server, new,
                              _overrides(root, data, llm.base_url, connect_server))
        records, rejects, lineage = read(root, "records"), read(root, "rejects"), read(root, "lineage")
        assert seen["connect"] and len(seen["new_inputs"]) == 1
        assert len(records) + len(rejects) == pipeline_run.n_input + len(new)
        assert len(records) > records_before
        traced = Counter(r["id"] for r in lineage if r["fate"] != "rejected")
        assert set(traced) == {r["id"] for r in records} and set(traced.values()) == {1}
        # Only the new groups are paid, once each; no group of the full run is asked again.
        paid = Counter(llm.per_group) - paid_before  # keyed by the group's instructions
        new_groups = {g["group_id"] for g in read(root, "merge_groups")} - groups_before
        assert sum(paid.values()) == len(new_groups) > 0 and set(paid.values()) == {1}
        assert not set(paid) & set(paid_before)
    # What the client read through its session, and its report, equal the tables as written.
    final = read(root, "final")
    fates = Counter(r["fate"] for r in lineage)
    assert seen["final_rows"] == len(final) and seen["fates"] == dict(fates)
    report = json.loads((root / "report" / "report.json").read_text())
    assert seen["report"].endswith("report.html") and (root / "report" / "report.html").is_file()
    assert report["input_rows"] == pipeline_run.n_input + len(new) == sum(fates.values())
    assert {k: v for k, v in report["fates"].items() if v} == dict(fates)
    assert report["tables"]["final"]["rows"] == len(final) and report["ledger"]["balanced"]
    final_ids = {r["id"] for r in final}
    assert all(r["final_id"] in final_ids for r in lineage if r["fate"] in ("kept", "merged"))


def test_spark_remote_takes_a_connect_url_or_a_local_master():
    assert load_settings(overrides=["spark.remote=sc://127.0.0.1:15002"], env={}).spark.remote.startswith("sc://")
    assert load_settings(overrides=["spark.remote=local[2]"], env={}).spark.remote == "local[2]"
    with pytest.raises(SettingsError, match="spark.remote"):
        load_settings(overrides=["spark.remote=http://127.0.0.1:15002"], env={})
