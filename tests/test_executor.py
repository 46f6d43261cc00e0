"""The executor drives any stage through the Stage hooks (run -> tables + summary, write, check),
knowing none by name; real Spark, real Delta, read back with delta-rs."""
from __future__ import annotations

import json

import pytest
from deltalake import DeltaTable

from _toy_stages import NEW, ROWS, Double, Keyed, Source, Total, toy_stages
from mergeit_spark.config import load_settings
from mergeit_spark.pipeline import Pipeline, PipelineError
from mergeit_spark.stages import CannotExtend, StageOutput


def _pipeline(spark, root, stages, *overrides):
    settings = load_settings(overrides=[f"output.root={root}", *overrides], env={})
    return Pipeline(settings, spark=spark, stages=stages)


def _state(root, name):
    return json.loads((root / "_state" / f"{name}.json").read_text())


def test_returned_tables_are_written_and_summary_and_checks_recorded(spark, tmp_path):
    root = tmp_path / "run"
    results = _pipeline(spark, root, toy_stages()).run()
    assert [(r.name, r.skipped) for r in results] == [("source", False), ("double", False), ("total", False)]
    assert DeltaTable(str(root / "doubled")).to_pandas()["n"].sort_values().tolist() == [2 * i for i in range(ROWS)]
    assert results[0].summary == {"made": ROWS} == _state(root, "source")["summary"]
    assert results[2].checks == {"total": Total.expected} == _state(root, "total")["checks"]
    assert _state(root, "total")["counts"] == {"total": 1}


def test_the_executor_performs_every_write_intent_and_saves_models(spark, tmp_path):
    """A stage writes nothing itself: its merge by key, its append and its model are the
    executor's to perform, each a new table version."""
    root = tmp_path / "run"
    pipeline = _pipeline(spark, root, [Source(), Keyed()])
    pipeline.run()
    assert (root / "_models" / "toy" / "value").read_text() == str(ROWS)
    pipeline.run(force="keyed")  # squares merged by key (all matched, none changed), log appended
    squares = DeltaTable(str(root / "squares")).to_pandas().sort_values("n")
    assert squares["square"].tolist() == [n * n for n in range(ROWS)]
    assert DeltaTable(str(root / "squares")).version() == 1
    log = DeltaTable(str(root / "log")).to_pandas()["run_id"].tolist()
    assert len(log) == 2 and len(set(log)) == 2  # one row per run, each run its own id
    assert [e["stage"] for e in pipeline.run_log()] == ["source", "keyed", "keyed"]


def test_an_increment_extends_each_stage_and_leaves_them_current(spark, tmp_path):
    root = tmp_path / "run"
    pipeline = _pipeline(spark, root, [Source(), Double()])
    pipeline.run()
    increment = pipeline.extend()
    assert increment.counts == {"new": NEW}
    doubled = DeltaTable(str(root / "doubled")).to_pandas()["n"].sort_values().tolist()
    assert doubled == [2 * n for n in range(ROWS + NEW)]
    assert {t: DeltaTable(str(root / t)).version() for t in ("numbers", "doubled")} == {"numbers": 1, "doubled": 1}
    assert all(row["current"] for row in pipeline.status())
    assert [e["increment"] for e in pipeline.run_log()] == [False, False, True, True]
    again = pipeline.extend()  # nothing new: nothing written
    assert not again.summaries["source"] and DeltaTable(str(root / "numbers")).version() == 1
    assert all(r.skipped for r in pipeline.run())


def test_a_stage_that_cannot_extend_stops_the_increment_and_it_is_rolled_back(spark, tmp_path):
    root = tmp_path / "run"
    pipeline = _pipeline(spark, root, toy_stages())
    pipeline.run()
    with pytest.raises(CannotExtend, match="stage total cannot extend"):
        pipeline.extend()
    assert DeltaTable(str(root / "numbers")).to_pandas().shape[0] == ROWS + NEW  # written before the stop
    # Rolled back before it starts: without that, the source would find its rows there already.
    with pytest.raises(CannotExtend):
        pipeline.extend()
    assert pipeline.store.read_state("increment")["status"] == "running"
    # A plain run rolls the unfinished increment back too, then finds every stage current.
    assert all(r.skipped for r in pipeline.run())
    assert DeltaTable(str(root / "numbers")).to_pandas()["n"].sort_values().tolist() == list(range(ROWS))
    assert pipeline.store.read_state("increment")["status"] == "rolled_back"


def test_a_failed_check_fails_the_run_and_leaves_no_state(spark, tmp_path):
    class WrongTotal(Total):
        expected = -1

    root = tmp_path / "run"
    with pytest.raises(ValueError, match="total 90 != -1"):
        _pipeline(spark, root, [Source(), Double(), WrongTotal()]).run()
    assert (root / "_state" / "double.json").is_file()
    assert not (root / "_state" / "total.json").exists()   # so the rerun redoes it
    assert [r.name for r in _pipeline(spark, root, toy_stages()).run() if not r.skipped] == ["total"]


def test_outputs_must_be_declared_and_produced(spark, tmp_path):
    class Undeclared(Source):
        def run(self, ctx, tables):
            return StageOutput({"numbers": ctx.spark.range(1), "other": ctx.spark.range(1)})

    class Forgetful(Source):
        def run(self, ctx, tables):
            return StageOutput(summary={"forgot": "numbers"})

    with pytest.raises(PipelineError, match=r"returned table\(s\) it does not declare: \['other'\]"):
        _pipeline(spark, tmp_path / "a", [Undeclared()]).run()
    with pytest.raises(PipelineError, match="returned no rows for table 'numbers'"):
        _pipeline(spark, tmp_path / "b", [Forgetful()]).run()
    # An old table from an earlier run does not count as written by this one.
    _pipeline(spark, tmp_path / "c", [Source()]).run()
    with pytest.raises(PipelineError, match="returned no rows for table"):
        _pipeline(spark, tmp_path / "c", [Forgetful()]).run(force="source")


def test_a_stage_may_keep_a_table_it_found_unchanged_but_not_a_missing_one(spark, tmp_path):
    class AlreadyThere(Source):  # like merge when `merges` already holds exactly its rows
        def run(self, ctx, tables):
            return StageOutput(unchanged=("numbers",))

    _pipeline(spark, tmp_path / "d", [Source()]).run()
    [kept] = _pipeline(spark, tmp_path / "d", [AlreadyThere()]).run(force="source")
    assert not kept.skipped and kept.versions == {"numbers": 0}
    with pytest.raises(PipelineError, match="returned no rows for table 'numbers'"):
        _pipeline(spark, tmp_path / "e", [AlreadyThere()]).run()


def test_until_stops_after_a_stage_and_missing_inputs_are_named(spark, tmp_path):
    root = tmp_path / "run"
    assert [r.name for r in _pipeline(spark, root, toy_stages()).run(until="double")] == ["source", "double"]
    assert not (root / "total").exists()
    with pytest.raises(PipelineError, match="stage double needs table"):
        _pipeline(spark, tmp_path / "empty", toy_stages()).run(only="double")
