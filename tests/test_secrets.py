"""Secrets stay secret: the API key and credentials in URLs never reach a log, a table, a report,
Spark's event log or ``config show``; a canary key proves it on a real run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from deltalake import DeltaTable

from _pipeline_run import cli_args
from fake_openai import FakeOpenAI, Reply
from mergeit_spark.redact import REDACTED, SPARK_REDACTION_REGEX, redact_settings, redaction_regex, scrub

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-canary-7f3e9b2c41d84a0e"            # the API key, as the environment holds it
URL_PASSWORD = "urlpw-canary-c0ffee42"        # a password inside llm.base_url
EXECUTOR_ENV = "spark.executorEnv.MERGEIT_LLM_API_KEY"


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with no log handler configured, as a Spark Python
    worker runs: records go to Python's last-resort handler on stderr."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize("source", ["env", "file"])
def test_log_records_and_tracebacks_are_scrubbed_in_a_worker_process(source, tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    settings = ("LLMSettings(api_key_env='TEST_CANARY_KEY')" if source == "env"
                else f"LLMSettings(api_key_env='', api_key_file={str(key_file)!r})")
    done = _python(f"""
        import logging
        from mergeit_spark.config import LLMSettings
        from mergeit_spark.llm.client import resolve_api_key

        log = logging.getLogger("mergeit_spark.stages.merge")
        key = resolve_api_key({settings})
        assert key == {KEY!r}
        url = "https://bob:{URL_PASSWORD}@llm.example/v1"
        try:
            raise RuntimeError("Incorrect API key provided: " + key + " for " + url)
        except RuntimeError:
            log.exception("merge of group %s crashed (key %s)", "g1", key)
        log.warning("retrying against %s", url)
    """, {"TEST_CANARY_KEY": KEY})
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "merge of group g1 crashed (key ***)" in err
    assert "Traceback" in err and "RuntimeError: Incorrect API key provided: ***" in err
    assert "retrying against https://***@llm.example/v1" in err
    assert KEY not in err and URL_PASSWORD not in err


def test_importing_the_package_leaves_the_log_record_factory_alone():
    done = _python("""
        import logging
        import mergeit_spark, mergeit_spark.cli, mergeit_spark.redact, mergeit_spark.llm.client
        assert logging.getLogRecordFactory() is logging.LogRecord, logging.getLogRecordFactory()
    """, {})
    assert done.returncode == 0, done.stderr


def test_installing_twice_scrubs_each_record_once():
    done = _python(f"""
        import logging
        from mergeit_spark import redact

        redact.install_log_scrubbing()
        installed = logging.getLogRecordFactory()
        assert installed is not logging.LogRecord
        redact.install_log_scrubbing()
        assert logging.getLogRecordFactory() is installed       # not wrapped a second time
        calls = []
        scrub_record = redact._scrub_record
        redact._scrub_record = lambda record: (calls.append(record), scrub_record(record))
        redact.register_secret({KEY!r})
        logging.getLogger("mergeit").warning("key %s", {KEY!r})
        assert len(calls) == 1, calls
        assert calls[0].getMessage() == "key ***", calls[0].getMessage()
    """, {})
    assert done.returncode == 0, done.stderr
    assert "key ***" in done.stderr and KEY not in done.stderr


def test_a_merge_task_scrubs_its_worker_process():
    """A merge task installs the scrubbing in its Python worker, key or no key registered."""
    done = _python(f"""
        import logging
        from mergeit_spark.stages.merge import _worker_logging

        assert logging.getLogRecordFactory() is logging.LogRecord
        _worker_logging()
        logging.getLogger("mergeit_spark.llm.client").warning("retrying against %s",
                                                               "https://bob:{URL_PASSWORD}@llm.example/v1")
    """, {})
    assert done.returncode == 0, done.stderr
    assert "retrying against https://***@llm.example/v1" in done.stderr and URL_PASSWORD not in done.stderr


@pytest.mark.parametrize("text, shown", [
    ("https://bob:pw@llm.example/v1", "https://***@llm.example/v1"),
    ("https://bob:p@ss@llm.example:8/v1?to=a@b", "https://***@llm.example:8/v1?to=a@b"),  # @ in the password
    ("token only: http://tok123@10.0.0.1:8000/v1 and http://plain/v1", "token only: http://***@10.0.0.1:8000/v1 and http://plain/v1"),
    ("http://host/path@not-userinfo", "http://host/path@not-userinfo"),
    ("mail bob@example.org", "mail bob@example.org"),
])
def test_url_credentials_are_masked_and_nothing_else(text, shown):
    assert scrub(text) == shown


def test_spark_redaction_pattern_covers_the_key_variable():
    conf_key = EXECUTOR_ENV
    assert not re.search(SPARK_REDACTION_REGEX, conf_key)     # why the default is not enough
    assert re.search(redaction_regex(["MERGEIT_LLM_API_KEY"]), conf_key)
    assert re.search(redaction_regex(["MY_LLM_KEY"]), "spark.executorEnv.MY_LLM_KEY")
    mine = redaction_regex(["MY_LLM_KEY"], base="(?i)passphrase")
    assert re.search(mine, "spark.x.passphrase") and not re.search(mine, "spark.x.password")
    with pytest.raises(ValueError, match="not a variable name"):
        redaction_regex(["KEY|.*"])


def test_redacted_settings_mask_urls_and_secret_conf_only():
    settings = {"llm": {"base_url": f"https://bob:{URL_PASSWORD}@llm.example/v1", "api_key_env": "MY_KEY",
                        "max_tokens": 512},
                "spark": {"conf": {"spark.executorEnv.MY_KEY": KEY, "spark.hadoop.fs.s3a.secret.key": "s3",
                                   "spark.executor.memory": "4g"}}}
    shown = redact_settings(settings, ["MY_KEY"])
    assert shown["llm"] == {"base_url": "https://***@llm.example/v1", "api_key_env": "MY_KEY", "max_tokens": 512}
    assert shown["spark"]["conf"] == {"spark.executorEnv.MY_KEY": REDACTED, "spark.hadoop.fs.s3a.secret.key": REDACTED,
                                      "spark.executor.memory": "4g"}
    assert settings["spark"]["conf"]["spark.executorEnv.MY_KEY"] == KEY      # the original is untouched


def test_config_show_masks_credentials(capsys):
    from mergeit_spark.cli import main

    assert main(["config", "show", "--set", f"llm.base_url=http://bob:{URL_PASSWORD}@127.0.0.1:9/v1",
                 "--set", f"spark.conf={{'{EXECUTOR_ENV}': '{KEY}'}}"]) == 0
    out = capsys.readouterr().out
    assert "base_url: http://***@127.0.0.1:9/v1" in out and f"{EXECUTOR_ENV}: '{REDACTED}'" in out
    assert KEY not in out and URL_PASSWORD not in out


def _echo_the_key(n: int, key: str, request: dict) -> Reply:
    """A server that quotes the key back in its errors, as hosted APIs do for a wrong key: one
    request refused for good (401), and every third one a retryable 500."""
    if n == 2:
        return Reply(kind="status", status=401, message=f"Incorrect API key provided: {KEY}")
    if n % 3 == 1:
        return Reply(kind="status", status=500, message=f"upstream failed for key {KEY}")
    return Reply()


def _table_text(path: Path) -> str:
    """Every value of a Delta table as text (test data: a few dozen rows)."""
    return json.dumps(DeltaTable(str(path)).to_pyarrow_table().to_pylist(), default=str)


@pytest.mark.slow
def test_a_canary_key_appears_nowhere(pipeline_run, tmp_path):
    """A real `mergeit run --report --export` in a fresh process with the key in its environment
    and Spark conf. Its root starts with the shared run's tables and state up to the group stage
    (stages that take no LLM setting), so the process starts its session, finds them current and
    runs what talks to the LLM and writes what users read: merge, finalize, the report and the
    export; everything under the root is searched, the copied tables included."""
    data = pipeline_run.data
    root, events = pipeline_run.copy_to(tmp_path / "run", until="group"), tmp_path / "events"
    events.mkdir()
    conf = {"spark.eventLog.enabled": "true", "spark.eventLog.dir": events.as_uri(),
            "spark.eventLog.compress": "false", EXECUTOR_ENV: KEY}   # the key as YARN/K8s runs pass it
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "MERGEIT_LLM_API_KEY": KEY}
    with FakeOpenAI(_echo_the_key) as fake:
        base_url = fake.base_url.replace("http://", f"http://bob:{URL_PASSWORD}@")
        # The scripted 401 and 500 fail two groups: tolerated here, so that the run ends in 0.
        args = cli_args(root, data, base_url, f"spark.conf={json.dumps(conf)}", "merge.max_failed_share=1")
        run = subprocess.run([sys.executable, "-m", "mergeit_spark.cli", "run", "--report", "--export", "jsonl",
                              *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        show = subprocess.run([sys.executable, "-m", "mergeit_spark.cli", "config", "show", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ran = {stage: json.loads((root / "_state" / f"{stage}.json").read_text())["finished_at"]
           for stage in ("group", "merge", "finalize")}
    assert ran["group"] < ran["merge"] <= ran["finalize"]     # merge and finalize ran in this process
    assert show.returncode == 0 and "base_url: http://***@127.0.0.1" in show.stdout
    # The path was taken: the server quoted the key back, and Spark did get the conf entry.
    assert {kind for _, _, kind in fake.requests} >= {"status", "merge"}
    event_logs = [p for p in events.rglob("*") if p.is_file()]
    assert event_logs and any(EXECUTOR_ENV in p.read_text(errors="replace") for p in event_logs)

    outputs = {"run stdout": run.stdout, "run stderr": run.stderr, "config show": show.stdout + show.stderr}
    for path in [*root.rglob("*"), *event_logs]:
        if path.is_file():
            outputs[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
    for table in (p.parent for p in root.glob("*/_delta_log")):
        outputs[f"table {table.name}"] = _table_text(table)   # Parquet pages may be compressed
    assert any(name.endswith("report.json") for name in outputs) and "table merges" in outputs
    leaks = [name for name, text in outputs.items() if KEY in text or URL_PASSWORD in text]
    assert not leaks
