"""No row can crash ingest, and no bad file slips through it (real Spark, real Delta tables).

Rows nested past ``ingest.max_depth``, numbers too long to parse and lone surrogates are each one
reject with its reason, the rows around them are records, and every file's ledger balances. A
corrupt or truncated ``.gz``, a ``.parquet`` that is not Parquet and a file that vanishes while
the run reads it each stop the run with an error naming the file, before any table is written.
"""
from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from _ingest_helpers import DEPTHS, nested_json
from mergeit_spark.config import load_settings
from mergeit_spark.inputs import InputError, InputReadError, resolve_inputs
from mergeit_spark.pipeline import Pipeline
from mergeit_spark.stages import ingest as ingest_module
from mergeit_spark.stages.ingest import Ingest

TABLES = ("records", "rejects", "input_files")
HUGE = "1" + "0" * 5000  # 5,001 digits: past Python's int max str digits (4,300)


def _pipeline(spark, root: Path, files) -> tuple[Pipeline, Ingest]:
    settings = load_settings(overrides=[f"output.root={root}"], env={})
    stage = Ingest(files)
    return Pipeline(settings, spark=spark, stages=[stage]), stage


def _read(root: Path, table: str) -> list[dict]:
    return DeltaTable(str(root / table)).to_pyarrow_table().to_pylist()


# --------------------------------------------------------------------------------------------
# Hostile rows
# --------------------------------------------------------------------------------------------

def hostile_units() -> list[tuple[str, str | None, str | None]]:
    """(JSON text, expected reason or None, instruction of the record or None), one per unit;
    depths count every array/object, the outermost one included."""
    units = []
    for depth in DEPTHS:
        deep = depth > 100
        units += [
            ('{"instruction": "Meta %d?", "output": "Yes.", "meta": %s}' % (depth, nested_json(depth - 1)),
             "too_deep" if deep else None, None if deep else f"Meta {depth}?"),
            ('{"instruction": "Noisy %d?", "output": "Yes.", "x": %s}' % (depth, nested_json(depth - 1, noisy=True)),
             "too_deep" if deep else None, None if deep else f"Noisy {depth}?"),
            ('{"instruction": %s, "output": "Yes."}' % nested_json(depth - 1, kinds="{"),
             "too_deep" if deep else "non_string_field", None),
            ('{"instruction": "Seed %d?", "instances": [{"input": "a", "output": "b", "m": %s}]}'
             % (depth, nested_json(depth - 3)), "too_deep" if deep else None, None if deep else f"Seed {depth}?"),
        ]
    units += [
        ('{"instruction": "Huge?", "output": "Yes.", "meta": {"n": %s}}' % HUGE, "malformed_json", None),
        ('{"instruction": "Lone \\ud800 surrogate?", "output": "Yes."}', "invalid_utf8", None),
        ('{"instruction": "Reversed pair?", "output": "\\udc00\\ud800"}', "invalid_utf8", None),
        ('{"instruction": "Surrogate in meta?", "output": "Yes.", "meta": "x\\ud800"}', None,
         "Surrogate in meta?"),
    ]
    return [unit for i, hostile in enumerate(units) for unit in
            (hostile, ('{"instruction": "Good %d?", "output": "Fine."}' % i, None, f"Good {i}?"))]


def deep_parquet(path: Path) -> list[tuple[str | None, str | None]]:
    """A Parquet file whose list column nests 120 deep in one row, and whose string column holds
    JSON text 3,000 deep in another (a string: kept as text, never parsed); (reason, instruction)
    per row."""
    list_type, value = pa.int64(), 1
    for _ in range(119):  # the row's object, then 119 lists: 120 deep in all
        list_type, value = pa.list_(list_type), [value]
    pq.write_table(pa.table({
        "instruction": ["Deep list?", "Deep string?", "Flat?"],
        "output": ["Yes.", "Yes.", "Yes."],
        "meta": pa.array([value, None, None], list_type),
        "note": [None, "[" * 3000 + "]" * 3000, "x"],
    }), path)
    return [("too_deep", None), (None, "Deep string?"), (None, "Flat?")]


def test_hostile_rows_are_rejects_and_the_rest_records(spark, tmp_path):
    """Every hostile unit is exactly one reject with its reason (or the record it should be),
    in JSON Lines, a JSON array and Parquet alike; the tables are written to Delta, read back,
    and each file's units equal its records + rejects."""
    units = hostile_units()
    lines, array, table = tmp_path / "hostile.jsonl", tmp_path / "hostile.json", tmp_path / "deep.parquet"
    lines.write_text("\n".join(text for text, _, _ in units) + "\n")
    array.write_text("[\n" + ",\n".join(text for text, _, _ in units) + "\n]")
    parquet_expected = deep_parquet(table)
    root = tmp_path / "run"
    pipeline, stage = _pipeline(spark, root, resolve_inputs([str(lines), str(array), str(table)], "auto"))
    checks = pipeline.run_stage(stage).checks

    records, rejects, input_files = (_read(root, name) for name in TABLES)
    assert checks["records"] + checks["rejects"] == checks["input_rows"] == len(units) * 2 + 3
    made = collections.Counter(r["source"] for r in records + rejects)
    assert {f["source"]: f["units"] for f in input_files} == {
        str(lines): len(units), str(array): len(units), str(table): 3} == dict(made)

    expected_rejects = sorted(
        [(str(lines), n + 1, None, reason) for n, (_, reason, _) in enumerate(units) if reason]
        + [(str(array), None, n, reason) for n, (_, reason, _) in enumerate(units) if reason]
        + [(str(table), None, n, reason) for n, (reason, _) in enumerate(parquet_expected) if reason],
        key=repr)
    got = sorted([(r["source"], r["line"], r["row"], r["reason"]) for r in rejects if r["reason"] != "exact_duplicate"],
                 key=repr)
    assert got == expected_rejects
    kept = [instruction for _, _, instruction in units if instruction]
    assert sorted(r["instruction"] for r in records) == sorted(kept + ["Deep string?", "Flat?"])
    # the same units in two files: the JSON array's copies are duplicates of the lines' records
    assert sum(r["reason"] == "exact_duplicate" for r in rejects) == len(kept)

    by_reason = collections.defaultdict(list)
    for r in rejects:
        by_reason[r["reason"]].append(r)
    assert {r["detail"] for r in by_reason["too_deep"]} == {"nested more than ingest.max_depth=100 arrays/objects deep"}
    assert all("4300" in r["detail"] for r in by_reason["malformed_json"])
    assert all(len(r["raw"]) <= 2000 for r in rejects)
    extras = {r["instruction"]: r["extra"] for r in records}
    assert json.loads(extras["Surrogate in meta?"]) == {"meta": "x\ud800"}  # kept, escaped in JSON
    assert json.loads(extras["Meta 100?"])["meta"] == json.loads(nested_json(99))
    assert json.loads(extras["Deep string?"])["note"] == "[" * 3000 + "]" * 3000


# --------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------

ROWS = "".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n" for i in range(500))


def _flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


BAD_FILES = {
    "plain text under a .gz name": ("data.jsonl.gz", lambda: ROWS.encode(), "not a valid gzip file"),
    "truncated .gz": ("cut.jsonl.gz", lambda: gzip.compress(ROWS.encode())[:-40], "truncated gzip"),
    "damaged .gz": ("flipped.jsonl.gz", lambda: _flip_a_byte(gzip.compress(ROWS.encode())), "not a valid gzip file"),
    "not Parquet": ("rows.parquet", lambda: b"instruction,output\nHi?,Hello.\n" * 20, "not a readable Parquet file"),
}


def _assert_failed_before_writing(root: Path, error: Exception, name: str, problem: str) -> None:
    message = str(error)
    assert name in message and problem in message, message
    assert "at org.apache" not in message and len(message) < 1000, message  # a sentence, no trace
    assert isinstance(error, ValueError)  # the CLI's exit code 1, with the message
    assert [t for t in TABLES if (root / t).exists()] == []
    states = [p.name for p in (root / "_state").glob("*.json")]
    assert [s for s in states if not s.startswith("lease-")] == []  # no stage's state record
    assert all(json.loads((root / "_state" / s).read_text()).get("released") for s in states)  # given back


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_fails_the_run_naming_it_before_any_table(spark, tmp_path, case):
    name, content, problem = BAD_FILES[case]
    good = tmp_path / "good.jsonl"
    good.write_text(ROWS)
    bad = tmp_path / name
    bad.write_bytes(content())
    root = tmp_path / "run"
    pipeline, stage = _pipeline(spark, root, resolve_inputs([str(good), str(bad)], "auto"))
    with pytest.raises(InputReadError) as failed:
        pipeline.run_stage(stage)
    _assert_failed_before_writing(root, failed.value, str(bad), problem)


def _good_and_doomed(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    """A good JSON Lines file and a file of format ``fmt`` that a test will delete mid-run."""
    rows = [json.loads(line) for line in ROWS.splitlines()]
    good, doomed = tmp_path / "good.jsonl", tmp_path / f"doomed.{fmt}"
    good.write_text(ROWS)
    if fmt == "jsonl":
        doomed.write_text(ROWS)
    elif fmt == "json":
        doomed.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), doomed)
    return good, doomed


def _delete_after(monkeypatch, name: str, path: Path) -> None:
    """Make ``stages.ingest.<name>`` delete ``path`` once it has returned."""
    real = getattr(ingest_module, name)

    def then_delete(*args, **kwargs):
        result = real(*args, **kwargs)
        path.unlink()
        return result

    monkeypatch.setattr(ingest_module, name, then_delete)


@pytest.mark.parametrize("fmt,step", [("jsonl", "_framing_rows"), ("json", "_framing_rows"),
                                      ("parquet", "_framing_rows"), ("jsonl", "parse_outcomes")])
def test_a_file_vanishing_while_spark_reads_fails_the_run_naming_it(spark, tmp_path, monkeypatch, fmt, step):
    """The file is deleted once ingest has planned a read of it, before Spark reads it: for the
    count of units (a JVM read, or a Python worker's for a JSON array) or for the parse."""
    good, doomed = _good_and_doomed(tmp_path, fmt)
    _delete_after(monkeypatch, step, doomed)
    root = tmp_path / "run"
    pipeline, stage = _pipeline(spark, root, resolve_inputs([str(good), str(doomed)], "auto"))
    with pytest.raises(InputReadError) as failed:
        pipeline.run_stage(stage)
    _assert_failed_before_writing(root, failed.value, str(doomed), "no longer exists")


def test_a_file_deleted_once_ingest_has_read_it_changes_no_table(spark, tmp_path, monkeypatch):
    """Ingest reads every file before its tables are handed over: deleting one then (before the
    executor writes them) loses nothing, and the ledger balances."""
    good, doomed = _good_and_doomed(tmp_path, "jsonl")
    _delete_after(monkeypatch, "ingest", doomed)
    root = tmp_path / "run"
    pipeline, stage = _pipeline(spark, root, resolve_inputs([str(good), str(doomed)], "auto"))
    checks = pipeline.run_stage(stage).checks
    assert (checks["records"], checks["rejects"], checks["input_rows"]) == (500, 500, 1000)
    assert not doomed.exists()


def test_a_file_deleted_before_ingest_starts_fails_the_run_naming_it(spark, tmp_path):
    good, gone = tmp_path / "good.jsonl", tmp_path / "gone.jsonl"
    good.write_text(ROWS)
    gone.write_text(ROWS)
    root = tmp_path / "run"
    pipeline, stage = _pipeline(spark, root, resolve_inputs([str(good), str(gone)], "auto"))
    gone.unlink()
    with pytest.raises(InputError) as failed:
        pipeline.run_stage(stage)
    _assert_failed_before_writing(root, failed.value, str(gone), "not found")


def test_a_failure_is_blamed_on_the_file_it_names_or_passes_unchanged(tmp_path):
    """A read failure whose trace names an input that looks fine on the driver still names it,
    with the trace's root cause; a failure that names no input, with every input fine, is not
    blamed on any (it is re-raised as it was)."""
    fine = tmp_path / "fine.jsonl"
    fine.write_text(ROWS)
    other = tmp_path / "fine.jsonl.gz"
    other.write_bytes(gzip.compress(ROWS.encode()))
    files = resolve_inputs([str(fine), str(other)], "auto")
    trace = (f"An error occurred while calling o1.collectToPython.\n: org.apache.spark.SparkException: "
             f"[FAILED_READ_FILE.NO_HINT] Encountered error while reading file file://{other}.\n"
             f"\tat org.apache.spark.sql.errors.QueryExecutionErrors$.cannotReadFilesError\n"
             f"Caused by: java.io.IOException: Input/output error\n\tat java.base/java.io.FileInputStream\n")
    blamed = ingest_module.blame_input(files, RuntimeError(trace))
    assert str(blamed) == f"input {other} could not be read: IOException: Input/output error; ingest wrote no table"
    assert ingest_module.blame_input(files, RuntimeError("Java heap space")) is None
