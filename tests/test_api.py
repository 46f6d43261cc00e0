"""The Python API: ``curate(df, settings, root=...)`` from a user's own Spark job, on real rows,
real Spark and Delta, and a scripted LLM server; results read back by delta-rs as well."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from _pipeline_run import read
from fake_openai import FakeOpenAI
from mergeit_spark import curate

ROWS = 60


def _settings(base_url: str) -> dict:
    return {"spark.shuffle_partitions": 4, "select.budget": 12, "group.threshold": 0.5,
            "llm": {"base_url": base_url, "model": "fake-model", "concurrency": 4, "request_timeout_s": 10},
            "merge.partitions": 2}


@pytest.fixture(scope="module")
def curated(spark, shared_data, tmp_path_factory):
    """A user's DataFrame with its own column names: real rows, one exact duplicate, one row
    without an answer; curated twice with the same rows and settings."""
    rows = json.loads((shared_data / "mergeit-6k.json").read_text())[:ROWS]
    data = [(r["instruction"], r["input"], r["output"], "web") for r in rows]
    data += [data[3], ("What is two plus two?", "", None, "web")]
    df = spark.createDataFrame(data, "question string, context string, answer string, origin_site string")
    root = tmp_path_factory.mktemp("api") / "run"
    mapping = {"instruction": "question", "input": "context", "output": "answer"}
    with FakeOpenAI() as llm:
        first = curate(df, _settings(llm.base_url), root=str(root), columns=mapping)
        paid = len(llm.requests)
        second = curate(df, _settings(llm.base_url), root=str(root), columns=mapping)
        paid_again = len(llm.requests) - paid
    return dict(df=df, root=root, first=first, second=second, paid=paid, paid_again=paid_again)


def test_final_and_lineage_come_back_and_every_row_traces_to_its_fate(curated):
    first, root = curated["first"], curated["root"]
    lineage = first.lineage.collect()
    assert len(lineage) == ROWS + 2  # every row of the DataFrame, the bad ones too
    fates = Counter(r["fate"] for r in lineage)
    assert fates["rejected"] == 2 and sum(fates.values()) == ROWS + 2
    [source] = {r["source"] for r in lineage}
    assert source.startswith(str(root / "_inputs"))  # the snapshot of the DataFrame's rows
    final_ids = {r["id"] for r in first.final.collect()}
    assert final_ids == {r["id"] for r in read(root, "final")}  # an independent reader agrees
    assert {r["final_id"] for r in lineage if r["fate"] in ("kept", "merged")} <= final_ids
    # the user's column names map onto the Alpaca fields, the rest is kept in `extra`
    records = read(root, "records")
    assert {r["instruction"] for r in records} <= {row["question"] for row in curated["df"].collect()}
    assert all(json.loads(r["extra"]) == {"origin_site": "web"} for r in records)
    assert Counter(r["reason"] for r in read(root, "rejects")) == {"exact_duplicate": 1, "missing_output": 1}
    assert first.table("merges").count() == curated["paid"] > 0
    assert first.shortfalls == {}


def test_the_same_rows_again_recompute_nothing(curated):
    assert all(r.skipped for r in curated["second"].results)
    assert curated["paid_again"] == 0
    assert len(list((curated["root"] / "_inputs").iterdir())) == 1  # one snapshot, reused


def test_a_column_mapping_must_name_alpaca_fields_and_existing_columns(spark, tmp_path):
    df = spark.createDataFrame([("q", "a")], "question string, answer string")
    with pytest.raises(ValueError, match="only instruction, input, output can be mapped"):
        curate(df, root=str(tmp_path), columns={"prompt": "question"})
    with pytest.raises(ValueError, match="which the DataFrame lacks"):
        curate(df, root=str(tmp_path), columns={"instruction": "query"})
    assert not (tmp_path / "_inputs").exists()
