"""Batch mode on all of ../shared/data: a run killed while it polls, then the rerun that finishes.

A copy of a run root embedded by the pipeline (`--root-from`) with local.yaml, `llm.mode=batch`,
against the scripted Files + Batch server (tests/fake_batches.py) with faults: a share of the
batch lines fail (500/503/429 in the error file) or answer an invalid reply (regenerated in a
later batch), batches are slow (several polls) and the first polls of each answer 500. The merge
stage runs in a child `mergeit run`, killed with SIGKILL (its JVM too) once its batches are
submitted and polled; a second `mergeit run` resumes. Checked: every group ends with a status, no
request line is answered twice, and no batch is created for a request already submitted (section
`batch` of BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import REPO, write_section

sys.path.insert(0, str(REPO / "tests"))
from fake_batches import FakeBatchServer  # noqa: E402
from fake_openai import Faults  # noqa: E402

SHARED = (REPO / ".." / "shared" / "data").resolve()
INPUTS = ["alpaca-seed-tasks.jsonl", "gpteacher-roleplay.json", "gpteacher-toolformer.json", "mergeit-6k.json"]
PRICES = {"input": 0.5, "output": 1.5, "discount": 0.5}


def mergeit(root: Path, base_url: str, until: str = "merge") -> list[str]:
    return [sys.executable, "-m", "mergeit_spark.cli", "run", "--until", until,
            "--conf", str(REPO / "conf" / "local.yaml"),
            "--set", f"input.paths=[{','.join(str(SHARED / name) for name in INPUTS)}]",
            "--set", f"output.root={root}", "--set", f"llm.base_url={base_url}", "--set", "llm.model=fake-model",
            "--set", "llm.mode=batch", "--set", "llm.batch_poll_s=0.5", "--set", "llm.max_retries=2",
            "--set", f"llm.price_input_per_million={PRICES['input']}",
            "--set", f"llm.price_output_per_million={PRICES['output']}",
            "--set", f"llm.price_batch_discount={PRICES['discount']}"]


def kill_tree(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)   # the driver and its JVM: a machine lost, not a polite stop
    proc.wait()


def merge_summary(root: Path) -> dict:
    runs = [json.loads(line) for line in (root / "_state" / "runs.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in runs if r.get("stage") == "merge"][-1]["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root-from", required=True, help="a run root of all ../shared/data, embedded")
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--kill-after-polls", type=int, default=4)
    args = parser.parse_args()
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp) / "run"
        shutil.copytree(args.root_from, root)
        subprocess.run(mergeit(root, "http://127.0.0.1:9/v1", until="group"), env=env, check=True)
        faults = Faults(rate=args.fault_rate, seed=7)
        with FakeBatchServer(faults, polls_to_complete=3, poll_failures=0) as fake:
            started = time.perf_counter()
            child = subprocess.Popen(mergeit(root, fake.base_url), env=env, start_new_session=True)
            while fake.retrieves < args.kill_after_polls and child.poll() is None:
                time.sleep(0.2)
            kill_tree(child)
            killed_s = time.perf_counter() - started
            submitted_before = list(fake.created_batches)
            answered_before = sum(fake.lines_answered.values())
            fake.poll_failures = 2                      # the resumed run's first polls answer 500
            started = time.perf_counter()
            rerun = subprocess.run(mergeit(root, fake.base_url), env=env)
            rerun_s = time.perf_counter() - started
            lines = [line["custom_id"] for b in fake.created_batches for line in fake.batches[b]["lines"]]
            before = {line["custom_id"] for b in submitted_before for line in fake.batches[b]["lines"]}
            after = {line["custom_id"] for b in fake.created_batches[len(submitted_before):]
                     for line in fake.batches[b]["lines"]}
            statuses = Counter(fake.batches[b]["status"] for b in fake.created_batches)
            summary = merge_summary(root)
    twice = [cid for cid, n in Counter(lines).items() if n > 1]
    assert not twice, f"{len(twice)} request lines submitted twice"
    assert max(fake.lines_answered.values()) == 1
    assert fake.created_batches[:len(submitted_before)] == submitted_before
    ended = summary["by_status"]
    body = (f"All of ../shared/data ({summary['groups']} merge groups), local.yaml, `llm.mode=batch`, scripted "
            f"Files + Batch server: {args.fault_rate:.0%} of lines faulted (500/503/429 in the error file, a hang "
            "answered normally, a body that is not JSON as a 500, an invalid reply or a refusal regenerated in a "
            "later batch), each batch answering over 3 polls. The first `mergeit run` was killed with SIGKILL "
            f"(driver and JVM) after {args.kill_after_polls} polls ({killed_s:.0f} s): "
            f"{len(submitted_before)} batches submitted, {answered_before} lines answered by then. The rerun "
            f"({rerun_s:.0f} s, exit {rerun.returncode}; its first 2 polls answered 500) resumed them.\n\n"
            "| | |\n| --- | ---: |\n"
            f"| groups, by final status | {', '.join(f'{k} {v}' for k, v in sorted(ended.items()))} |\n"
            f"| batches created, in all | {len(fake.created_batches)} ({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}) |\n"
            f"| request lines of the rerun's batches that the killed run had submitted | {len(before & after)} |\n"
            f"| request lines submitted / answered / answered twice | {len(lines)} / "
            f"{sum(fake.lines_answered.values())} / {len(twice)} |\n"
            f"| requests the rerun paid (its ledger spend) | {summary['requests']} |\n"
            f"| cost at batch prices (rerun) | {summary['cost']:.4f} |\n")
    write_section("batch", body)
    print(body)
    sys.exit(0 if rerun.returncode == 0 else 1)


if __name__ == "__main__":
    main()
