"""Failures are never reported as success: the preflight, the circuit breaker, replies cut short,
prompts too long, the failed-share exit code, spend caps that hold across recomputed partitions and
reruns, speculation refused, a torn merge-runs line. Real Spark, real sockets, the real openai client
against the scripted loopback server."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from mergeit_spark.config import load_settings
from mergeit_spark.llm import client as client_mod
from mergeit_spark.llm.client import MergeClient, MissingAPIKey, resolve_api_key
from mergeit_spark.llm.ledger import read_bucket
from mergeit_spark.llm.preflight import PreflightError, preflight
from mergeit_spark.stages import StageContext
from mergeit_spark.stages.merge import (LEDGER_DIR, build_jobs, ledger_spend, merge_runs,
                                        plan_requests, request_pass)
from mergeit_spark.tables import RUN_LOG, STATE_DIR

from _merge_helpers import kill_a_merge_worker, load_rows, make_inputs, run_merge_stage
from _pipeline_run import cli_args
from fake_openai import FakeOpenAI, Reply

EXAMPLES = [{"instruction": "Name a prime number.", "input": "", "output": "7 is prime."},
            {"instruction": "Name an even number.", "input": "", "output": "4 is even."}]


@pytest.fixture(scope="module")
def inputs(spark, shared_data):
    embed = load_settings().embed
    rows = load_rows(shared_data, 48)
    records, embeddings, groups, member_lists = make_inputs(spark, rows, embed, threshold=0.5, max_groups=12)
    assert len(member_lists) >= 8
    return records, embeddings, groups, member_lists


@pytest.fixture(autouse=True)
def fresh_json_ladder():
    client_mod._LADDER_STEP.clear()


def llm_settings(base_url: str, *extra: str):
    return load_settings(overrides=[f"llm.base_url={base_url}", "llm.max_retries=1", "llm.backoff_initial_s=0.01",
                                    "llm.request_timeout_s=5", *extra], env={})


def stage_settings(base_url: str, *extra: str):
    return llm_settings(base_url, "spark.master=local[2]", "merge.partitions=2", "llm.concurrency=4", *extra)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- preflight ----------------------------------------------------------------------------------
def test_preflight_answers_and_reads_the_context_window():
    with FakeOpenAI(context_tokens=2048) as fake:
        checked = preflight(llm_settings(fake.base_url, "llm.model=fake-model").llm)
    assert checked.requests == 1 and checked.context_tokens == 2048 and fake.preflights == 1
    assert fake.count == 0     # the preflight is not a merge request


@pytest.mark.parametrize("reply, words", [
    (Reply(kind="status", status=401, message="invalid api key"), "refused the API key"),
    (Reply(kind="status", status=403, message="forbidden"), "refused the API key"),
    (Reply(kind="status", status=404, message="model not found"), "does not know model 'nope'"),
    (Reply(kind="close"), "closed the connection without an answer"),
])
def test_preflight_errors_name_the_url_and_the_fix(reply, words):
    with FakeOpenAI(preflight_reply=reply) as fake:
        address = fake.base_url.split("//")[1]
        url = f"http://someone:hunter2@{address}"
        with pytest.raises(PreflightError) as err:
            preflight(llm_settings(url, "llm.model=nope", "llm.api_key_env=MERGEIT_TEST_KEY").llm,
                      api_key="sk-test-abcdef")
    message = str(err.value)
    assert words in message and address in message
    assert "hunter2" not in message and "sk-test-abcdef" not in message
    if reply.status == 404:
        assert "fake-model" in message     # what the server does serve


def test_preflight_on_a_closed_port_or_an_unknown_host():
    with pytest.raises(PreflightError, match="connection refused"):
        preflight(llm_settings(f"http://127.0.0.1:{closed_port()}/v1").llm)
    with pytest.raises(PreflightError, match="cannot resolve the host"):
        preflight(llm_settings("http://no-such-host.invalid/v1", "llm.api_key_env=MERGEIT_TEST_KEY").llm,
                  api_key="k")


def test_missing_key_is_an_error_only_away_from_loopback(tmp_path):
    local = llm_settings("http://127.0.0.1:9/v1", "llm.api_key_env=MERGEIT_NO_SUCH_VAR").llm
    assert resolve_api_key(local, env={}) == "not-needed"
    remote = llm_settings("https://api.example.com/v1", "llm.api_key_env=MERGEIT_NO_SUCH_VAR").llm
    with pytest.raises(MissingAPIKey, match="MERGEIT_NO_SUCH_VAR"):
        resolve_api_key(remote, env={})
    assert resolve_api_key(remote, env={"MERGEIT_NO_SUCH_VAR": "sk-1"}) == "sk-1"


# -- the client ----------------------------------------------------------------------------------
def merge_all(settings, n: int) -> list:
    async def go():
        async with MergeClient(settings.llm, settings.merge) as client:
            return [await client.merge(EXAMPLES) for _ in range(n)]
    return asyncio.run(go())


def test_circuit_breaker_stops_sending_after_failures_in_a_row():
    with FakeOpenAI(break_after=0) as fake:     # every merge request: 503
        settings = llm_settings(fake.base_url, "llm.max_retries=2", "llm.circuit_breaker_failures=5")
        results = merge_all(settings, 10)
    assert fake.count == 5              # the first group's 3 attempts, 2 of the second's, then nothing
    assert all(r.status == "failed" for r in results)
    assert results[0].error.startswith("http_503")
    assert [r.error.split(":")[0] for r in results[1:]] == ["circuit_open"] * 9
    assert "5 transport/auth/5xx failures in a row" in results[-1].error and "http_503" in results[-1].error


def test_circuit_breaker_counts_only_failures_in_a_row():
    flaky = lambda n, key, request: Reply(kind="status", status=503) if n % 3 else Reply()  # noqa: E731
    with FakeOpenAI(script=flaky) as fake:
        settings = llm_settings(fake.base_url, "llm.max_retries=0", "llm.circuit_breaker_failures=3")
        results = merge_all(settings, 12)
    assert fake.count == 12 and not any("circuit_open" in (r.error or "") for r in results)


def test_truncated_reply_fails_at_once_and_says_what_to_raise():
    cut = lambda n, key, request: Reply(kind="content", content='{"instruction": "Name a prime', finish_reason="length")  # noqa: E731,E501
    with FakeOpenAI(script=cut) as fake:
        settings = llm_settings(fake.base_url, "merge.regenerations=2", "llm.max_tokens=64")
        [result] = merge_all(settings, 1)
    assert fake.count == 1                      # not regenerated: the same request is cut the same way
    assert result.status == "failed" and result.error.startswith("truncated")
    assert "llm.max_tokens=64" in result.error


# -- the stage -----------------------------------------------------------------------------------
def run(spark, store, settings, inputs):
    records, embeddings, groups = inputs[:3]
    return run_merge_stage(StageContext(spark, store, settings), groups, records, embeddings)


def ledger_lines(store) -> list[dict]:
    lines = []
    for path in Path(store.ledger_path("merges").local).glob("bucket=*/*.jsonl"):
        lines += [json.loads(t) for t in path.read_text().splitlines() if t.strip()]
    return lines


@pytest.mark.slow   # its own driver: speculation is set when a Spark context starts
def test_stage_refuses_speculation(pipeline_run, tmp_path):
    root = pipeline_run.copy_to(tmp_path / "run", until="group")
    with FakeOpenAI() as fake:
        done = subprocess.run(
            [sys.executable, "-m", "mergeit_spark.cli", "run", "--stage", "merge",
             *cli_args(root, pipeline_run.data, fake.base_url, "spark.conf={spark.speculation: 'true'}")],
            capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "spark.speculation" in done.stderr and "would both pay" in done.stderr
    assert fake.count == 0 and fake.preflights == 0
    assert not (root / "merges").exists() and not list((root / LEDGER_DIR).glob("bucket=*/*.jsonl"))


def test_prompt_too_long_for_the_server_context_is_not_sent(spark, store, inputs):
    with FakeOpenAI(context_tokens=1200) as fake:
        summary = run(spark, store, stage_settings(fake.base_url, "llm.max_tokens=1024"), inputs)
    assert fake.count == 0 and summary.groups == len(inputs[3])
    assert summary.errors == {"prompt_too_long": summary.groups}
    assert summary.retryable_failed == 0 and summary.shortfall(load_settings().merge) is None
    row = DeltaTable(store.path("merges")).to_pyarrow_table().to_pylist()[0]
    assert row["attempts"] == 0 and "context of 1200 tokens" in row["error"]


def test_request_cap_holds_when_spark_computes_the_pass_twice(spark, store, inputs):
    records, embeddings, groups = inputs[:3]
    with FakeOpenAI() as fake:
        settings = stage_settings(fake.base_url, "merge.max_requests=6", "llm.concurrency=1")
        ledger_root = store.ledger_path("merges")
        jobs = build_jobs(groups, records, embeddings, settings.llm)
        plan = plan_requests(jobs, settings, ledger_root, has_groups=True)
        passed, _ = request_pass(jobs, settings, ledger_root, plan=plan)
        first = passed.collect()
        again = passed.collect()    # recomputed partitions: the same run, the same ledger
    assert fake.preflights + fake.count <= 6 and fake.count == 5
    assert sorted(r["group_id"] for r in first) == sorted(r["group_id"] for r in again)
    assert ledger_spend(spark, ledger_root)[0] == 6
    spent = sum(read_bucket(ledger_root, b).spent(plan.run_id)[0] for b in range(256))
    assert spent == 5


def test_request_cap_holds_across_reruns_and_counts_the_preflight(spark, store, inputs):
    with FakeOpenAI() as fake:
        capped = stage_settings(fake.base_url, "merge.max_requests=5", "llm.concurrency=1")
        first = run(spark, store, capped, inputs)
        second = run(spark, store, capped, inputs)     # the same cap: nothing left to spend
    assert first.requests + first.preflight_requests == 5 and second.requests == 0
    assert second.preflight_requests == 0 and fake.count + fake.preflights == 5
    assert second.budget_exhausted == second.groups - first.by_status.get("merged", 0) - \
        first.by_status.get("gate_failed", 0)
    message = second.shortfall(capped.merge).message
    assert "budget_exhausted" in message and "raise merge.max_requests" in message


def test_torn_run_log_line_is_skipped_and_the_next_line_stays_whole(store):
    store.append_log(RUN_LOG, {"stage": "merge", "summary": {"groups": 1}})
    with open(Path(store.root.local) / STATE_DIR / f"{RUN_LOG}.jsonl", "a") as handle:
        handle.write('{"stage": "merge", "summary": {"groups": 2, "finish')  # a driver killed mid-append
    store.append_log(RUN_LOG, {"stage": "merge", "summary": {"groups": 3}})
    assert [r["groups"] for r in merge_runs(store)] == [1, 3]


# -- the run -------------------------------------------------------------------------------------
def test_closed_port_fails_the_run_before_any_task(pipeline_run, tmp_path):
    from mergeit_spark.cli import main
    root = pipeline_run.copy_to(tmp_path / "run", until="group")
    url = f"http://127.0.0.1:{closed_port()}/v1"
    assert main(["run", *cli_args(root, pipeline_run.data, url)]) == 1
    assert not (root / "merges").exists() and not (root / "_state" / "merge.json").exists()
    assert not list((root / LEDGER_DIR).glob("bucket=*/*.jsonl"))   # no group marked
    [log_file] = (root / "_logs").glob("run-*.log")
    failure = [line for line in log_file.read_text().splitlines() if "run failed" in line]
    assert failure and "connection refused" in failure[0] and url in failure[0]


def test_server_dying_halfway_fails_the_run_and_a_plain_rerun_pays_only_the_failed(pipeline_run, tmp_path):
    from mergeit_spark.cli import main
    from mergeit_spark.pipeline import Pipeline
    from _pipeline_run import pipeline_settings
    root = pipeline_run.copy_to(tmp_path / "run", until="group")
    dying = FakeOpenAI().start()
    url = dying.base_url
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    stop_after = 4

    def die(n, key, request):
        # The process is gone: no new connection is accepted, and requests on connections kept
        # alive from before get no answer.
        if n == stop_after:
            dying.stop_soon()
        return Reply() if n <= stop_after else Reply(kind="close")
    dying.script = die
    args = cli_args(root, pipeline_run.data, url, "llm.circuit_breaker_failures=3")
    try:
        assert main(["run", "--report", *args]) == 3     # every table written, too many groups failed
    finally:
        dying.stop()
    merges = {r["group_id"]: r for r in DeltaTable(str(root / "merges")).to_pyarrow_table().to_pylist()}
    failed = {g for g, r in merges.items() if r["status"] == "failed"}
    assert failed and len(failed) < len(merges)
    assert all(r["error"].split(":")[0] in ("connection", "circuit_open", "timeout") for g, r in merges.items()
               if g in failed)
    pipeline = Pipeline(pipeline_settings(root, pipeline_run.data, url))
    merge_state = pipeline.state("merge")
    assert merge_state["shortfall"]["failed"] == len(failed)
    assert not pipeline.is_current(pipeline.stages[pipeline.stage_names().index("merge")])
    assert (root / "final").exists()           # finalize ran: every table written
    page = (root / "report" / "report.html").read_text()
    banner = page[page.index("<main>"):page.index("<h1>")]      # at the top, before the title
    assert "class='banner failed'" in banner and f"{len(failed)} of {len(merges)} merge groups" in banner

    with FakeOpenAI(port=port) as healthy:
        assert main(["run", "--report", *args]) == 0
    assert healthy.count == len(failed)       # exactly the failed groups, each once
    merges = DeltaTable(str(root / "merges")).to_pyarrow_table().to_pylist()
    assert not [r for r in merges if r["status"] == "failed"]
    assert Pipeline(pipeline_settings(root, pipeline_run.data, url)).state("merge")["shortfall"] is None
    page = (root / "report" / "report.html").read_text()
    assert "class='banner" not in page[page.index("<main>"):page.index("<h1>")]


@pytest.mark.slow   # its own driver, whose merge task is killed mid-flight
def test_request_cap_holds_when_a_task_is_killed(pipeline_run, tmp_path):
    root = pipeline_run.copy_to(tmp_path / "run", until="group")
    cap, killed, driver = 8, [], []
    with FakeOpenAI(script=kill_a_merge_worker(driver, killed)) as fake:
        args = cli_args(root, pipeline_run.data, fake.base_url, f"merge.max_requests={cap}",
                        "llm.concurrency=2", "spark.master=local[2,4]")   # up to 4 attempts a task
        driver.append(subprocess.Popen([sys.executable, "-m", "mergeit_spark.cli", "run", "--until", "merge",
                                        *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        output, _ = driver[0].communicate(timeout=900)
    assert killed, "no worker was killed: the test proved nothing"
    assert driver[0].returncode in (0, 3), output[-3000:]
    assert fake.count + fake.preflights <= cap      # every request the server saw, retries included
    assert "Lost task" in output              # Spark saw the attempt die and ran it again
    requests, _ = ledger_spend_of(root)
    assert fake.count + fake.preflights <= requests <= cap   # the ledger counts what was sent, or more


def ledger_spend_of(root: Path) -> tuple[int, int]:
    """The ledger's spend read without Spark: spend lines (unsettled ones at their reservation)."""
    reserved, settled = {}, {}
    for path in (root / LEDGER_DIR).glob("bucket=*/*.jsonl"):
        for text in path.read_text().splitlines():
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if line.get("spend"):
                reserved[line["spend"]] = line.get("tokens") or 0
            elif line.get("settle"):
                settled[line["settle"]] = line.get("tokens") or 0
    return len(reserved), sum(settled.get(k, v) for k, v in reserved.items())
