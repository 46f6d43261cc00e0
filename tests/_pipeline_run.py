"""Shared by the whole-pipeline tests: a real-data input file and the settings to run on it."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from deltalake import DeltaTable

from mergeit_spark.config import Settings, load_settings

BROKEN_LINES = [
    '{"instruction": "Name three primary colours.", "output": ',           # truncated JSON
    '{"instruction": "", "input": "", "output": "nothing asked"}',         # empty instruction
    '{"instruction": "Say hi.", "input": ""}',                             # no output
    '{"instruction": 42, "input": "", "output": "forty-two"}',             # not a string
    '[1, 2, 3]',                                                           # not an object
]


def write_input(shared_data: Path, dest: Path, rows: int = 200, offset: int = 0) -> tuple[Path, int]:
    """JSON Lines: ``rows`` real records from mergeit-6k, one exact duplicate, and broken lines.

    Returns the file and its number of input rows (lines)."""
    records = json.loads((shared_data / "mergeit-6k.json").read_text())[offset:offset + rows]
    lines = [json.dumps({k: r[k] for k in ("instruction", "input", "output")}) for r in records]
    lines.append(lines[3])          # an exact duplicate
    lines.extend(BROKEN_LINES)
    dest.write_text("\n".join(lines) + "\n")
    return dest, len(lines)


SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
# Rows of mergeit-6k whose text an evaluation set of every pipeline run holds: the instruction of
# row 3 as a question, the output of row 50 as an answer, row 170's instruction split in two
# fields (170 is among the new rows of the incremental tests). Those records come out contaminated.
EVAL_ROWS = (3, 50, 170)


def eval_set() -> Path:
    """The evaluation set of the pipeline runs (JSON Lines, question/answer), written once."""
    path = Path(tempfile.gettempdir()) / f"mergeit-test-eval-{os.getpid()}.jsonl"
    if not path.exists():
        rows = json.loads((SHARED_DATA / "mergeit-6k.json").read_text())
        instruction = rows[EVAL_ROWS[2]]["instruction"].split()
        items = [{"question": rows[EVAL_ROWS[0]]["instruction"], "answer": "42"},
                 {"question": "Explain.", "answer": rows[EVAL_ROWS[1]]["output"]},
                 {"question": " ".join(instruction[:len(instruction) // 2]),
                  "answer": " ".join(instruction[len(instruction) // 2:])},
                 {"question": "An evaluation item that no training row holds, about lunar basalt.", "answer": "B"}]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(item) for item in items) + "\n")
        tmp.replace(path)
    return path


def pipeline_overrides(root: Path, data: Path, base_url: str, *extra: str) -> list[str]:
    """The ``--set`` overrides of a small, fast run against a scripted LLM server."""
    return [
        "spark.master=local[2]", "spark.shuffle_partitions=4",
        f"input.paths=[{data}]", f"output.root={root}", f"decontam.eval_paths=[{eval_set()}]",
        "select.budget=12",              # small clusters, so that some rows are not selected
        "group.threshold=0.5",
        f"llm.base_url={base_url}", "llm.model=fake-model", "llm.concurrency=4",
        "llm.request_timeout_s=10", "llm.max_retries=2", "llm.backoff_initial_s=0.05",
        "merge.partitions=2",
        *extra,
    ]


def pipeline_settings(root: Path, data: Path, base_url: str, *extra: str) -> Settings:
    return load_settings(overrides=pipeline_overrides(root, data, base_url, *extra), env={})


def cli_args(root: Path, data: Path, base_url: str, *extra: str) -> list[str]:
    return [arg for item in pipeline_overrides(root, data, base_url, *extra) for arg in ("--set", item)]


def read(root: Path, table: str) -> list[dict]:
    return DeltaTable(str(root / table)).to_pyarrow_table().to_pylist()


def final_content(root: Path) -> set[tuple]:
    return {(r["id"], r["instruction"], r["input"], r["output"], r["origin"], tuple(sorted(r["source_ids"])))
            for r in read(root, "final")}


@dataclass
class WholeRun:
    """One uninterrupted run of every stage (default tables engine, scripted LLM), shared by the
    tests that only read its tables; a test that reruns or changes anything works on ``copy_to``."""
    root: Path
    data: Path
    n_input: int
    base_url: str
    results: list
    final: set[tuple]                       # final_content(root), taken right after the run
    outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)   # stage -> tables it writes

    def copy_to(self, dest: Path, until: str | None = None) -> Path:
        """A copy of the run root at ``dest``; with ``until``, only what the stages up to that
        one wrote (their tables and state), so a run there starts at the stage after it.
        Delta logs name their files relative to the table, so a copied table is a whole table."""
        shutil.copytree(self.root, dest)
        if until is not None:
            names = list(self.outputs)
            for stage in names[names.index(until) + 1:]:
                for table in self.outputs[stage]:
                    shutil.rmtree(dest / table, ignore_errors=True)
                (dest / "_state" / f"{stage}.json").unlink(missing_ok=True)
            if "merge" in names[names.index(until) + 1:]:
                shutil.rmtree(dest / "_ledger", ignore_errors=True)   # the merge stage's ledger
        return dest


def run_whole_pipeline(spark, shared_data: Path, work: Path, base_url: str) -> WholeRun:
    """Every stage on ``write_input``'s 200 real rows in the given session."""
    from mergeit_spark.pipeline import Pipeline

    data, n_input = write_input(shared_data, work / "in.jsonl")
    pipeline = Pipeline(pipeline_settings(work / "run", data, base_url), spark=spark)
    results = pipeline.run()
    return WholeRun(root=work / "run", data=data, n_input=n_input, base_url=base_url, results=results,
                    final=final_content(work / "run"), outputs={s.name: tuple(s.outputs) for s in pipeline.stages})

# The MergeIT stages in the order the pipeline must run them.
STAGE_ORDER = ("ingest", "decontam", "embed", "topics", "dedup", "select", "group", "merge", "finalize")
