"""Ingest stage: real local Spark on the shared data, the bundled sample and hostile inputs.

Expected counts are computed independently (``tests/_ingest_helpers.py``: plain ``json``), never
through the stage's own parser.
"""
from __future__ import annotations

import collections
import gzip
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from mergeit_spark.config import IngestSettings
from mergeit_spark.ids import content_id
from mergeit_spark.inputs import SAMPLE_PATH, InputError, InputFile, fingerprint_inputs, pinned, resolve_inputs
from mergeit_spark import parsing
from mergeit_spark.parsing import REASONS, ParseLimits, Position, parse_document, parse_text, parse_text_batches
from mergeit_spark.stages import StageContext
from mergeit_spark.stages.ingest import (RECORD_SCHEMA, Ingest, IngestCountError, check_input_counts, ingest,
                                         input_files_table, parse_outcomes, split_outcomes)

from _ingest_helpers import (DEPTHS, expect_alpaca_array, expect_jsonl, expect_seed_tasks, expected_id,
                             fuzz_corpus, nested_json, norm)

DEFAULT = IngestSettings()


def run_ingest(spark, paths, fmt="auto", settings=DEFAULT, units=None):
    """Ingest ``paths`` (the tables are small here) and check the ingest ledger on the way: each
    file's units (counted apart from parsing) equal the rows it made in records + rejects, and
    equal ``units`` (source -> expected units) when given."""
    files = resolve_inputs([str(p) for p in paths], fmt)
    tables = ingest(spark, files, settings)
    records, rejects = tables.records.collect(), tables.rejects.collect()
    counted = {r["source"]: r for r in tables.input_files.collect()}
    assert sorted(counted) == sorted(f.path for f in files)
    made = collections.Counter(r["source"] for r in records + rejects)
    assert {s: r["units"] for s, r in counted.items()} == {s: made[s] for s in counted}
    if units is not None:
        assert {s: r["units"] for s, r in counted.items()} == {str(k): v for k, v in units.items()}
    return records, rejects


def assert_no_single_partition(*frames):
    """No operator of these plans moves all rows to one task: no SinglePartition exchange, and
    every window is partitioned (its spec starts with a partition key, not an ordering)."""
    for df in frames:
        plan = df._jdf.queryExecution().executedPlan().toString()
        assert "SinglePartition" not in plan, plan
        for spec in re.findall(r"windowspecdefinition\(([^,]*)", plan):
            assert not re.search(r" (ASC|DESC)\b|^specifiedwindowframe", spec), plan


def check_records(records, id_length=32):
    """Ids unique and equal to the content hash of the normalised text stored in the row."""
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    for r in records:
        assert r["id"] == content_id(r["instruction"], r["input"], r["output"], id_length)
        assert r["id"] == expected_id(r["instruction"], r["input"], r["output"], id_length)
        for text in (r["instruction"], r["input"], r["output"]):
            assert text == norm(text)
        assert r["instruction"] and r["output"]


def check_rejects(rejects):
    for r in rejects:
        assert r["reason"] in REASONS, r
        assert r["source"]
        assert r["raw"] is None or len(r["raw"]) <= 2000


# --------------------------------------------------------------------------------------------
# The shared real data
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mergeit-6k.json", "gpteacher-roleplay.json",
                                  "gpteacher-toolformer.json", "alpaca-seed-tasks.jsonl"])
def test_shared_data_counts_balance(spark, shared_data, name):
    path = shared_data / name
    exp = expect_seed_tasks(path) if name.endswith(".jsonl") else expect_alpaca_array(path)
    # units: array elements, or seed-task instances, counted here with plain json
    records, rejects = run_ingest(spark, [path], units={path: exp.rows})

    assert len(records) == exp.records
    assert len(rejects) == exp.rejects
    assert len(records) + len(rejects) == exp.rows
    assert sorted(r["id"] for r in records) == sorted(exp.kept_ids)
    reasons = collections.Counter(r["reason"] for r in rejects)
    assert reasons["exact_duplicate"] == exp.duplicates
    assert sum(reasons.values()) - reasons["exact_duplicate"] == exp.invalid
    check_records(records)
    check_rejects(rejects)
    assert {r["source"] for r in records} == {str(path)}
    if name.endswith(".json"):
        assert all(r["line"] is None and 0 <= r["row"] < exp.rows for r in rejects)
    if name == "mergeit-6k.json":
        assert all(set(json.loads(r["extra"])) == {"quality_score", "complexity_score"} for r in records)
    if name == "alpaca-seed-tasks.jsonl":
        check_seed_extras(path, records)


def check_seed_extras(path, records):
    """Each instance keeps its task's id, name and is_classification, and its instance index."""
    tasks = {t["id"]: t for t in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    assert len(records) == sum(len(t["instances"]) for t in tasks.values())
    for r in records:
        extra = json.loads(r["extra"])
        task = tasks[extra["id"]]
        assert extra["name"] == task["name"] and extra["is_classification"] == task["is_classification"]
        instance = task["instances"][extra["instance"]]
        assert r["instruction"] == norm(task["instruction"])
        assert (r["input"], r["output"]) == (norm(instance["input"]), norm(instance["output"]))


# --------------------------------------------------------------------------------------------
# The bundled sample
# --------------------------------------------------------------------------------------------

def test_bundled_sample(spark):
    path = Path(SAMPLE_PATH)
    assert path.is_file() and path.stat().st_size < 200_000
    assert path.parent.name == "data" and path.parent.parent.name == "mergeit_spark"
    exp, rejected_lines = expect_jsonl(path)
    assert 280 <= exp.rows <= 320 and exp.duplicates >= 5
    records, rejects = run_ingest(spark, [path], units={path: exp.rows})
    assert len(records) == exp.records and len(rejects) == exp.rejects == len(rejected_lines)
    assert sorted(r["line"] for r in rejects) == rejected_lines
    reasons = collections.Counter(r["reason"] for r in rejects)
    assert reasons["exact_duplicate"] == exp.duplicates
    for reason in ("malformed_json", "missing_output", "empty_text", "non_string_field", "not_an_object"):
        assert reasons[reason] >= 1, reason
    check_records(records)
    # the kept copy of a duplicate is its first line; the reject names the kept id
    kept = {r["id"] for r in records}
    assert all(r["detail"] in kept for r in rejects if r["reason"] == "exact_duplicate")
    assert len({r["instruction"] for r in records}) > 250   # varied, not templated


def test_ingest_stage_defaults_to_sample_and_writes_tables(spark, store, settings, tmp_path):
    stage = Ingest.from_settings(settings)
    assert stage.files == [InputFile(SAMPLE_PATH, "jsonl")]
    assert (Ingest.name, Ingest.inputs) == ("ingest", ())
    assert Ingest.outputs == ("records", "rejects", "input_files")
    assert Ingest.settings_sections == ("input", "ingest")
    ctx = StageContext(spark, store, settings)
    out = stage.run(ctx, {})
    for name, df in out.items():
        store.write(df, name)
    records = DeltaTable(store.path("records")).to_pyarrow_table()
    rejects = DeltaTable(store.path("rejects")).to_pyarrow_table()
    input_files = DeltaTable(store.path("input_files")).to_pyarrow_table().to_pylist()
    exp, _ = expect_jsonl(Path(SAMPLE_PATH))
    assert records.num_rows + rejects.num_rows == exp.rows
    assert records.column_names == ["id", "instruction", "input", "output", "source", "extra"]
    assert rejects.column_names == ["source", "line", "row", "raw", "reason", "detail"]
    assert rejects.schema.field("line").type == pa.int64() and rejects.schema.field("row").type == pa.int64()
    # the input count, taken apart from parsing: one row per file, the run it belongs to
    [counted] = input_files
    assert counted == {"source": SAMPLE_PATH, "format": "jsonl", "units": exp.rows, "framed": exp.rows,
                       "bytes": Path(SAMPLE_PATH).stat().st_size, "run_id": out.summary["run_id"], "version": None}
    assert stage.check(ctx) == {"input_files": 1, "input_rows": exp.rows, "framed_units": exp.rows,
                                "records": records.num_rows, "rejects": rejects.num_rows}
    # tables that came out short do not pass the stage's check
    store.write(spark.createDataFrame(records.to_pylist()[1:], RECORD_SCHEMA), "records")
    with pytest.raises(IngestCountError, match=f"!= {exp.rows} input units"):
        stage.check(ctx)

    # the fingerprint follows the files: same files, same hash; a touched file, a new hash
    data = tmp_path / "in.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    files = resolve_inputs([str(data)], "auto")
    first = Ingest(files).extra_fingerprint(ctx)
    assert first == fingerprint_inputs(files)
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert Ingest(files).extra_fingerprint(ctx) != first


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

def test_sharegpt_and_messages_layouts(spark, tmp_path):
    sharegpt = tmp_path / "chat.json"
    sharegpt.write_text(json.dumps([
        {"id": "c1", "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "  What is the capital of Peru?\r\n"},
            {"from": "gpt", "value": "Lima."},
            {"from": "human", "value": "And of Chile?"},
            {"from": "gpt", "value": "Santiago."}]},
        {"conversations": [{"from": "gpt", "value": "Hello!"}, {"from": "user", "value": "Hi"},
                           {"from": "assistant", "value": "How can I help?"}]},
        {"conversations": [{"from": "human", "value": "anyone?"}]},
        {"conversations": [{"value": "no role"}]},
        {"conversations": [{"from": "human", "value": 12}, {"from": "gpt", "value": "twelve"}]},
    ]))
    messages = tmp_path / "messages.jsonl"
    messages.write_text("\n".join(json.dumps(o) for o in [
        {"messages": [{"role": "system", "content": "Be kind."},
                      {"role": "user", "content": "Say hi in French."},
                      {"role": "assistant", "content": "Bonjour !"}], "meta": {"lang": "fr"}},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Part one."},
                                                   {"type": "text", "text": "Part two."}]},
                      {"role": "tool", "content": "ignored tool output"},
                      {"role": "assistant", "content": "Both parts read."}]},
        {"messages": [{"role": "system", "content": "only a system prompt"}]},
    ]) + "\n")
    records, rejects = run_ingest(spark, [sharegpt, messages])
    check_records(records)
    by_instruction = {r["instruction"]: r for r in records}
    assert set(by_instruction) == {"What is the capital of Peru?", "Hi", "Say hi in French.",
                                   "Part one.\nPart two."}

    peru = by_instruction["What is the capital of Peru?"]
    assert (peru["input"], peru["output"], peru["source"]) == ("", "Lima.", str(sharegpt))
    extra = json.loads(peru["extra"])
    assert extra["id"] == "c1" and extra["layout"] == "sharegpt" and extra["system"] == "You are terse."
    assert extra["turns"] == [{"index": 3, "role": "user", "content": "And of Chile?"},
                              {"index": 4, "role": "assistant", "content": "Santiago."}]
    hi = json.loads(by_instruction["Hi"]["extra"])
    assert by_instruction["Hi"]["output"] == "How can I help?"
    assert hi["turns"] == [{"index": 0, "role": "assistant", "content": "Hello!"}]

    french = by_instruction["Say hi in French."]
    assert french["output"] == "Bonjour !" and french["source"] == str(messages)
    extra = json.loads(french["extra"])
    assert extra == {"meta": {"lang": "fr"}, "layout": "messages", "system": "Be kind."}
    parts = json.loads(by_instruction["Part one.\nPart two."]["extra"])
    assert parts["turns"] == [{"index": 1, "role": "tool", "content": "ignored tool output"}]

    got = sorted((r["source"], r["line"], r["row"], r["reason"]) for r in rejects)
    assert got == sorted([
        (str(sharegpt), None, 2, "missing_output"),
        (str(sharegpt), None, 3, "bad_conversation"),
        (str(sharegpt), None, 4, "non_string_field"),
        (str(messages), 3, None, "missing_instruction"),
    ])


def test_seed_tasks_one_record_per_instance(spark, tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in [
        {"id": "seed_task_0", "name": "antonyms", "instruction": "Give the antonym.", "is_classification": False,
         "instances": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"},
                       {"input": "big", "output": "small"}]},
        {"id": "seed_task_1", "name": "empty", "instruction": "Nothing here.", "instances": []},
        {"id": "seed_task_2", "name": "mixed", "instruction": "Spell it.",
         "instances": ["not an object", {"input": "cat", "output": "c-a-t"}, {"input": "dog"}]},
    ]) + "\n")
    # 3 + 1 + 3 units (instances; the empty task is one) from 3 lines
    records, rejects = run_ingest(spark, [path], units={path: 7})
    assert sorted((r["input"], r["output"]) for r in records) == [
        ("big", "small"), ("cat", "c-a-t"), ("hot", "cold"), ("up", "down")]
    antonyms = [json.loads(r["extra"]) for r in records if r["instruction"] == "Give the antonym."]
    assert sorted(e["instance"] for e in antonyms) == [0, 1, 2]
    assert all(e["name"] == "antonyms" and e["is_classification"] is False for e in antonyms)
    assert sorted((r["line"], r["reason"]) for r in rejects) == [
        (2, "missing_output"), (3, "missing_output"), (3, "not_an_object")]
    # 3 + 1 + 3 units in, 4 records + 3 rejects out
    assert len(records) + len(rejects) == 7


def test_seed_tasks_count_their_instances_in_arrays_and_parquet(spark, tmp_path):
    tasks = [{"instruction": "Antonym?", "instances": [{"input": "hot", "output": "cold"},
                                                        {"input": "up", "output": "down"}]},
             {"instruction": "Capital?", "instances": [{"input": "France", "output": "Paris."}]}]
    array = tmp_path / "seed.json"
    array.write_text(json.dumps(tasks))
    table = tmp_path / "seed.parquet"
    pq.write_table(pa.Table.from_pylist(tasks), table)
    for path in (array, table):  # 2 + 1 instances; framed: 2 elements or rows
        records, rejects = run_ingest(spark, [path], units={path: 3})
        assert sorted(r["output"] for r in records) == ["Paris.", "cold", "down"] and not rejects


# --------------------------------------------------------------------------------------------
# Hostile input
# --------------------------------------------------------------------------------------------

def test_fuzzed_corpus_balances(spark, tmp_path):
    limits = IngestSettings(max_line_bytes=20_000, max_record_chars=10_000)
    corpus = fuzz_corpus(seed=7, valid_lines=300, broken_lines=300, max_line_bytes=limits.max_line_bytes)
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line.data for line in corpus) + b"\n")
    rows = [(n, line) for n, line in enumerate(corpus, start=1) if line.reason != "blank"]
    valid_ids = []
    for _, line in rows:
        if line.valid:
            obj = json.loads(line.data)
            valid_ids.append(expected_id(norm(obj["instruction"]), norm(obj.get("input") or ""),
                                         norm(obj["output"])))

    records, rejects = run_ingest(spark, [path], settings=limits, units={path: len(rows)})
    assert len(records) + len(rejects) == len(rows)
    assert sorted(r["id"] for r in records) == sorted(valid_ids)
    check_records(records)
    check_rejects(rejects)
    expected = sorted((n, line.reason) for n, line in rows if not line.valid)
    assert sorted((r["line"], r["reason"]) for r in rejects) == expected
    too_large = [r for r in rejects if r["reason"] == "too_large"]
    assert too_large and all(len(r["raw"]) <= 2000 for r in too_large)
    assert any("\ufffd" in r["raw"] for r in rejects if r["reason"] == "invalid_utf8")


def _limits(**kw):
    base = {"max_record_chars": 5000, "max_line_bytes": 8000, "id_length": 32}
    base.update(kw)
    return ParseLimits(**base)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_parser_never_raises_on_bytes(raw):
    outcomes = parse_text(raw, None, Position(0, "f", 1, None), _limits())
    for o in outcomes:
        assert (o["reason"] is None) == (o["id"] is not None)
        assert o["reason"] is None or o["reason"] in REASONS
        for key in ("raw", "detail", "instruction", "input", "output", "extra"):
            if o[key] is not None:
                o[key].encode("utf-8")  # everything must be storable as UTF-8


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["instruction", "input", "output", "conversations", "messages", "instances",
                         "from", "value", "role", "content", "x"]), children, max_size=5),
    max_leaves=20)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_parser_handles_any_json_value(value):
    text = json.dumps(value).encode()
    outcomes = parse_text(text, None, Position(0, "f", 1, None), _limits(max_line_bytes=10 ** 6))
    assert outcomes
    for o in outcomes:
        assert o["reason"] is None or o["reason"] in REASONS
        if o["reason"] is None:
            assert o["id"] == content_id(o["instruction"], o["input"], o["output"])
            if o["extra"] is not None:
                json.loads(o["extra"])


@hsettings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda s: s.strip()),
       st.one_of(st.none(), st.text(max_size=40)),
       st.text(min_size=1, max_size=40).filter(lambda s: s.strip()))
def test_parser_keeps_every_valid_alpaca_object(instruction, input_, output):
    obj = {"instruction": instruction, "input": input_, "output": output}
    outcomes = parse_text(json.dumps(obj).encode(), None, Position(0, "f", 1, None), _limits())
    triple = (norm(instruction), norm(input_ or ""), norm(output))
    if not triple[0] or not triple[2] or any("\ud800" <= c <= "\udfff" for c in "".join(triple)):
        assert outcomes[0]["reason"] in ("empty_text", "invalid_utf8")
        return
    assert [o["reason"] for o in outcomes] == [None]
    assert outcomes[0]["id"] == expected_id(*triple)


def _deep_unit(where: str, depth: int, noisy: bool) -> tuple[str, str | None]:
    """A unit nesting ``depth`` deep in all through ``where``, and the reason it must get at the
    default limit of 100 (None: a record)."""
    if where == "meta":  # an extra field: a record up to the limit
        return '{"instruction": "Deep?", "output": "Yes.", "meta": %s}' % nested_json(depth - 1, noisy=noisy), None
    if where in ("instruction", "output"):  # a main field: never text
        other = "output" if where == "instruction" else "instruction"
        return '{"%s": %s, "%s": "Yes."}' % (where, nested_json(depth - 1, noisy=noisy), other), "non_string_field"
    if where == "instance":  # a seed task instance's extra field
        return ('{"instruction": "Seed?", "instances": [{"input": "a", "output": "b", "meta": %s}]}'
                % nested_json(depth - 3, noisy=noisy)), None
    # a chat turn's content
    return ('{"messages": [{"role": "user", "content": %s}, {"role": "assistant", "content": "ok"}]}'
            % nested_json(depth - 3, noisy=noisy)), "non_string_field"


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(DEPTHS) | st.integers(4, 1500),
       st.sampled_from(["meta", "instruction", "output", "instance", "turn"]), st.booleans())
def test_deep_values_are_rejected_before_parsing(depth, where, noisy):
    """Past ingest.max_depth (100) a unit is one ``too_deep`` reject, as a JSON Lines line and as
    an array element alike, wherever the depth is; up to it, the layout rules decide as usual."""
    text, reason_within = _deep_unit(where, depth, noisy)
    expected = "too_deep" if depth > 100 else reason_within
    limits = _limits(max_line_bytes=10 ** 6)
    as_line = parse_text(text.encode(), None, Position(0, "f", 1, None), limits)
    as_element = parse_document(("[" + text + ', {"instruction": "Next?", "output": "Yes."}]').encode(),
                                0, "f", limits)
    for outcomes in (as_line, as_element[:1]):
        assert [o["reason"] for o in outcomes] == [expected], (depth, where, outcomes[0]["detail"])
        if expected == "too_deep":
            assert outcomes[0]["detail"] == "nested more than ingest.max_depth=100 arrays/objects deep"
        if expected is None and where == "meta":
            assert json.loads(outcomes[0]["extra"])["meta"] == json.loads(nested_json(depth - 1, noisy=noisy))
    assert [o["instruction"] for o in as_element[1:]] == ["Next?"]


def test_an_unexpected_error_rejects_only_its_unit(monkeypatch):
    """An exception no check foresaw (here: hashing a record) makes that unit, or that seed-task
    instance, an ``unparseable`` reject naming the exception; the others are unaffected."""
    real = parsing.content_id

    def failing(instruction, input_, output, length):
        if "boom" in (instruction, input_, output):
            raise ArithmeticError("boom at the hash")
        return real(instruction, input_, output, length)

    monkeypatch.setattr(parsing, "content_id", failing)
    limits = _limits()
    [line] = parse_text(b'{"instruction": "boom", "output": "x"}', None, Position(0, "f", 7, None), limits)
    assert (line["reason"], line["line"], line["detail"]) == ("unparseable", 7, "ArithmeticError: boom at the hash")
    assert line["raw"] == '{"instruction": "boom", "output": "x"}'
    seed = (b'{"instruction": "Spell.", "instances": '
            b'[{"input": "cat", "output": "c"}, {"input": "boom", "output": "b"}]}')
    outcomes = parse_text(seed, None, Position(0, "f", 1, None), limits)
    assert [(o["sub"], o["reason"], o["instances"]) for o in outcomes] == [(0, None, 2), (1, "unparseable", 2)]
    assert outcomes[1]["detail"] == "instance 1: ArithmeticError: boom at the hash"
    array = b'[{"instruction": "boom", "output": "x"}, {"instruction": "fine", "output": "y"}]'
    assert [o["reason"] for o in parse_document(array, 0, "f", limits)] == ["unparseable", None]
    assert parsing.describe_exception(ValueError("x" * 1000)) == "ValueError: " + "x" * 300 + "..."


def test_a_row_arrow_refuses_becomes_a_reject_not_a_failed_batch(monkeypatch):
    """An outcome Arrow cannot hold (a lone surrogate that slipped into ``extra``) is replaced by
    an ``unparseable`` reject of the same unit; the batch around it is written as it was."""
    real = parsing._extra_json
    monkeypatch.setattr(parsing, "_extra_json",
                        lambda extra: "\ud800" if extra.get("poison") else real(extra))
    lines = [b'{"instruction": "One?", "output": "1."}', b'{"instruction": "Two?", "output": "2.", "poison": 1}',
             b'{"instruction": "Three?", "output": "3.", "meta": {"a": 1}}']
    batch = pa.RecordBatch.from_pydict({
        "file_index": [0, 0, 0], "source": ["f"] * 3, "line": [1, 2, 3], "row": [None] * 3,
        "raw": lines, "size": [len(line) for line in lines]})
    [out] = list(parse_text_batches(iter([batch]), _limits()))
    rows = out.to_pylist()
    assert [(r["line"], r["reason"]) for r in rows] == [(1, None), (2, "unparseable"), (3, None)]
    assert rows[1]["detail"].startswith("cannot be stored: UnicodeEncodeError")
    assert rows[1]["id"] is None and rows[1]["raw"] == lines[1].decode()
    assert json.loads(rows[2]["extra"]) == {"meta": {"a": 1}}


def test_json_array_salvage(spark, tmp_path):
    good = [{"instruction": f"Question {word}?", "output": f"Answer {word}."} for word in ("one", "two", "three")]
    body = ",\n".join(json.dumps(o) for o in good)
    truncated = tmp_path / "truncated.json"
    truncated.write_text("[\n" + body + ',\n{"instruction": "cut off", "outp')
    unclosed = tmp_path / "unclosed.json"
    unclosed.write_text("[" + body)
    trailing = tmp_path / "trailing.json"
    trailing.write_text("[" + body + "] garbage")
    badbytes = tmp_path / "badbytes.json"
    badbytes.write_bytes(b'[{"instruction": "caf\xe9?", "output": "yes"},\n' + body.encode() + b"]")
    expected_ids = sorted(expected_id(o["instruction"], "", o["output"]) for o in good)

    records, rejects = run_ingest(spark, [truncated], units={truncated: 4})
    assert sorted(r["id"] for r in records) == expected_ids
    assert [(r["row"], r["reason"]) for r in rejects] == [(3, "malformed_json")]
    assert rejects[0]["raw"].startswith('{"instruction": "cut off"')
    assert "ends inside this element" in rejects[0]["detail"]

    for path, row, why in ((unclosed, 3, "array not closed"), (trailing, 3, "data after the closing ]")):
        records, rejects = run_ingest(spark, [path], units={path: 4})
        assert sorted(r["id"] for r in records) == expected_ids
        assert [(r["row"], r["reason"]) for r in rejects] == [(row, "malformed_json")]
        assert why in rejects[0]["detail"]

    records, rejects = run_ingest(spark, [badbytes], units={badbytes: 4})
    assert sorted(r["id"] for r in records) == expected_ids
    assert [(r["row"], r["reason"]) for r in rejects] == [(0, "invalid_utf8")]
    assert "\ufffd" in rejects[0]["raw"]


def test_json_array_damage_costs_only_the_damaged_element(spark, tmp_path):
    """A malformed element, a missing value or a trailing comma is one reject each; the elements
    after it are still read, with their own row numbers."""
    good = [json.dumps({"instruction": f"Question {n}?", "output": f"Answer {n}."}) for n in range(4)]
    path = tmp_path / "damaged.json"
    path.write_text("[" + ",\n".join([good[0], '{"instruction": "x", "output": tru}', good[1], "",
                                         good[2], "{'python': 'repr'}", good[3]]) + ",\n]")
    records, rejects = run_ingest(spark, [path], units={path: 8})
    assert sorted(r["instruction"] for r in records) == [f"Question {n}?" for n in range(4)]
    assert sorted((r["row"], r["reason"]) for r in rejects) == [
        (1, "malformed_json"), (3, "malformed_json"), (5, "malformed_json"), (7, "malformed_json")]
    by_row = {r["row"]: r for r in rejects}
    assert by_row[1]["raw"] == '{"instruction": "x", "output": tru}'
    assert by_row[3]["detail"] == "no value before ','" and by_row[7]["detail"] == "no value before ']'"


def test_oversize_array_element_is_rejected_and_the_rest_kept(spark, tmp_path):
    """An element over ingest.max_line_bytes is not held whole: its size decides, its prefix is
    kept as raw, and the elements after it are read."""
    limits = IngestSettings(max_line_bytes=50_000)
    big = {"instruction": "Too big?", "output": "z" * 3_000_000}  # over a read chunk, too
    path = tmp_path / "oversize.json"
    path.write_text(json.dumps([{"instruction": "Before?", "output": "Yes."}, big,
                                {"instruction": "After?", "output": "Yes."}]))
    records, rejects = run_ingest(spark, [path], settings=limits, units={path: 3})
    assert sorted(r["instruction"] for r in records) == ["After?", "Before?"]
    [rej] = rejects
    assert (rej["row"], rej["reason"]) == (1, "too_large")
    assert rej["raw"].startswith('{"instruction": "Too big?"') and len(rej["raw"]) == 2000
    assert rej["detail"].startswith(f"{len(json.dumps(big))} bytes")


def test_parse_document_streams_and_objects():
    limits = _limits()
    stream = b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}  7'
    outcomes = list(parse_document(stream, 0, "f", limits))
    assert [(o["row"], o["reason"]) for o in outcomes] == [(0, None), (1, None), (2, "not_an_object")]
    assert list(parse_document(b"  [ ]  ", 0, "f", limits)) == []
    assert list(parse_document(b"", 0, "f", limits)) == []
    [deep] = list(parse_document(b"[" + b"[" * 3000, 0, "f", limits))
    assert deep["reason"] == "too_deep"  # measured before it is parsed, cut short or not


def test_duplicates_across_files_keep_the_first_input(spark, tmp_path):
    line = json.dumps({"instruction": "Same question?", "output": "Same answer."})
    first = tmp_path / "b_first.jsonl"
    first.write_text('{"instruction": "Other?", "output": "Other."}\n' + line + "\n")
    second = tmp_path / "a_second.jsonl"
    second.write_text(line + "\n" + line.replace('"Same answer."', '"Same answer.  "') + "\n")
    records, rejects = run_ingest(spark, [first, second])
    same = expected_id("Same question?", "", "Same answer.")
    kept = [r for r in records if r["id"] == same]
    assert len(kept) == 1 and kept[0]["source"] == str(first)
    assert sorted((r["source"], r["line"], r["reason"], r["detail"]) for r in rejects) == [
        (str(second), 1, "exact_duplicate", same), (str(second), 2, "exact_duplicate", same)]


def test_line_numbers_exact_across_many_splits(spark, tmp_path):
    """Force the sample into many small splits: line numbers must still be exact."""
    path = tmp_path / "sample copy.jsonl"
    path.write_bytes(Path(SAMPLE_PATH).read_bytes())
    exp, rejected_lines = expect_jsonl(path)
    old = spark.conf.get("spark.sql.files.maxPartitionBytes")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "16384")
    try:
        assert spark.read.text(str(path)).rdd.getNumPartitions() >= 6
        records, rejects, input_files = ingest(spark, resolve_inputs([str(path)], "auto"), DEFAULT)
        assert_no_single_partition(records, rejects, input_files)
        [counted] = input_files.collect()
        records, rejects = records.collect(), rejects.collect()
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", old)
    assert len(records) == exp.records
    assert counted["units"] == counted["framed"] == exp.rows == len(records) + len(rejects)
    assert sorted(r["line"] for r in rejects) == rejected_lines
    # every duplicate points back at a kept record
    sample_lines = path.read_text(encoding="utf-8").split("\n")
    for r in rejects:
        assert sample_lines[r["line"] - 1].startswith(r["raw"][:50])


def test_no_window_over_the_whole_data(spark, tmp_path):
    """The line numbering used a running-sum window whose only partition key (the file) is a
    constant for a single file: every block went through one task, and Spark warned."""
    lines = tmp_path / "one.jsonl"
    lines.write_bytes(Path(SAMPLE_PATH).read_bytes())
    array = tmp_path / "one.json"
    array.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    for paths in ([lines], [array], [lines, array]):
        assert_no_single_partition(*ingest(spark, resolve_inputs([str(p) for p in paths], "auto"), DEFAULT))


def test_count_is_taken_apart_from_the_parser(spark, tmp_path):
    """A parser that silently loses a unit, or one instance of a seed task, leaves records +
    rejects short of the count: the count comes from the readers, not from the parser's rows."""
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        json.dumps({"instruction": "One?", "output": "1."}),
        json.dumps({"instruction": "Two?", "output": "2."}),
        json.dumps({"instruction": "Spell.", "instances": [{"input": w, "output": "-".join(w)}
                                                           for w in ("cat", "dog", "owl")]}),
        "not json"]) + "\n")
    files = resolve_inputs([str(path)], "auto")
    limits = ParseLimits.from_settings(DEFAULT)
    outcomes = parse_outcomes(spark, files, limits).cache()  # parsed once for the five ledgers

    def ledger(parsed):
        records, rejects = split_outcomes(parsed)
        return check_input_counts(records.count(), rejects.count(),
                                  input_files_table(spark, files, limits, parsed, "run-1"))

    assert ledger(outcomes) == {"input_files": 1, "input_rows": 6, "framed_units": 4, "records": 5, "rejects": 1}
    for lost in ("line = 2", "sub = 1", "reason IS NOT NULL"):  # a line; an instance; every reject
        with pytest.raises(IngestCountError, match="!= 6 input units"):
            ledger(outcomes.filter(f"NOT ({lost})"))
    outcomes.unpersist()


# --------------------------------------------------------------------------------------------
# Resolving inputs, Parquet, Delta
# --------------------------------------------------------------------------------------------

def test_resolve_inputs_errors_before_spark(tmp_path):
    # no spark fixture here: these must fail on the driver before any Spark work
    with pytest.raises(InputError, match="not found"):
        resolve_inputs([str(tmp_path / "missing.jsonl")], "auto")
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(InputError, match="unknown input format"):
        resolve_inputs([str(odd)], "auto")
    with pytest.raises(InputError, match="unknown input format"):
        resolve_inputs([str(odd)], "xml")
    weird = tmp_path / "weird.json"
    weird.write_text('"a string"')
    with pytest.raises(InputError, match="cannot tell"):
        resolve_inputs([str(weird)], "auto")
    with pytest.raises(InputError, match="wants a table directory"):
        resolve_inputs([str(odd)], "delta")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no data files"):
        resolve_inputs([str(empty_dir)], "auto")
    with pytest.raises(InputError, match="unknown scheme ftp://"):
        resolve_inputs(["ftp://host/data.jsonl"], "auto")  # object stores are inputs (tests/test_s3.py)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "x"}\n')
    assert resolve_inputs([data.as_uri()], "auto") == resolve_inputs([str(data)], "auto")  # file:// is local


def test_resolve_inputs_formats_and_directories(tmp_path):
    (tmp_path / "d" / "nested").mkdir(parents=True)
    array = tmp_path / "d" / "array.json"
    array.write_text('\ufeff  \n [{"instruction": "a", "output": "b"}]')
    lines = tmp_path / "d" / "lines.json"
    lines.write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "d" / "nested" / "more.ndjson").write_text("")
    (tmp_path / "d" / "nested" / "rows.parquet").write_bytes(b"")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    (tmp_path / "d" / ".hidden.crc").write_text("")
    write_deltalake(str(tmp_path / "d" / "table"), pa.table({"instruction": ["a"], "output": ["b"]}))
    got = resolve_inputs([str(tmp_path / "d"), str(array)], "auto")
    assert [(Path(f.path).relative_to(tmp_path).as_posix(), f.format) for f in got] == [
        ("d/array.json", "json"), ("d/lines.json", "jsonl"), ("d/nested/more.ndjson", "jsonl"),
        ("d/nested/rows.parquet", "parquet"), ("d/table", "delta")]
    assert resolve_inputs([str(tmp_path / "d" / "table")], "auto") == [InputFile(str(tmp_path / "d" / "table"), "delta")]
    assert resolve_inputs([str(lines)], "json") == [InputFile(str(lines), "json")]
    (tmp_path / "d" / "notes.txt").write_text("not data")
    with pytest.raises(InputError, match="notes.txt"):
        resolve_inputs([str(tmp_path / "d")], "auto")
    with pytest.raises(InputError, match="is a Delta table"):
        resolve_inputs([str(tmp_path / "d" / "table")], "parquet")
    relative = os.path.relpath(lines)
    assert resolve_inputs([relative], "auto")[0].path == str(lines)


def test_parquet_round_trip(spark, store, tmp_path):
    path = tmp_path / "rows.parquet"
    table = pa.table({
        "instruction": ["Name a planet.", "Name a metal.", None, "Name a gas.", "Name a planet."],
        "input": pa.array([None, None, None, None, None], pa.float64()),   # pandas' all-missing column
        "output": ["Mars.", "Iron.", "Orphan.", "Neon.", "Mars."],
        "quality_score": [0.9, float("nan"), 0.5, 0.7, 0.1],
    })
    pq.write_table(table, path, row_group_size=2)
    records, rejects, input_files = ingest(spark, resolve_inputs([str(path)], "auto"), DEFAULT)
    store.write(records, "records")
    store.write(rejects, "rejects")
    store.write(input_files, "input_files")
    [counted] = DeltaTable(store.path("input_files")).to_pyarrow_table().to_pylist()
    assert (counted["units"], counted["framed"], counted["bytes"]) == (5, 5, path.stat().st_size)
    back = DeltaTable(store.path("records")).to_pyarrow_table().to_pylist()
    assert sorted(r["instruction"] for r in back) == ["Name a gas.", "Name a metal.", "Name a planet."]
    assert all(r["input"] == "" and r["source"] == str(path) for r in back)
    metal = next(r for r in back if r["instruction"] == "Name a metal.")
    assert json.loads(metal["extra"]) == {"quality_score": None}   # NaN is null; JSON has no NaN
    check_records(back)
    bad = DeltaTable(store.path("rejects")).to_pyarrow_table().to_pylist()
    assert sorted((r["row"], r["line"], r["reason"]) for r in bad) == [
        (2, None, "missing_instruction"), (4, None, "exact_duplicate")]
    assert json.loads(next(r for r in bad if r["row"] == 2)["raw"])["output"] == "Orphan."


def test_delta_input_with_partitions(spark, tmp_path):
    table_path = tmp_path / "instructions table"
    write_deltalake(str(table_path), pa.table({
        "instruction": ["Say hi.", "Say bye.", "Say hi."],
        "output": ["Hi!", "Bye!", "Hi!"],
        "lang": ["en", "en", "de"],
    }), partition_by=["lang"])
    write_deltalake(str(table_path), pa.table({"instruction": ["Count to two."], "output": [None],
                                               "lang": ["en"]}), mode="append")
    files = resolve_inputs([str(table_path)], "auto")
    assert files == [InputFile(str(table_path), "delta")]
    records, rejects = run_ingest(spark, [table_path], units={table_path: 4})
    # data files are taken in path order, so lang=de/... comes first and its "Say hi." is kept
    assert sorted((r["instruction"], json.loads(r["extra"])["lang"]) for r in records) == [
        ("Say bye.", "en"), ("Say hi.", "de")]
    assert all(r["source"] == str(table_path) for r in records + rejects)
    assert sorted(r["reason"] for r in rejects) == ["exact_duplicate", "missing_output"]
    rows = sorted(r["row"] for r in rejects)
    assert len(set(rows)) == 2 and all(0 <= n < 4 for n in rows)
    assert len(records) + len(rejects) == DeltaTable(str(table_path)).to_pyarrow_table().num_rows


def test_a_delta_source_is_read_at_one_version_while_a_writer_appends(spark, tmp_path):
    """Every read of one ingest (framing, parsing, bytes, input_files.version) sees the version
    pinned at its start, not rows a writer appended meanwhile."""
    table_path = tmp_path / "growing"
    write_deltalake(str(table_path), pa.table({"instruction": ["One.", "Two."], "output": ["1", "2"]}))
    [item] = resolve_inputs([str(table_path)], "auto")
    at_start = pinned(item)
    assert at_start.version == 0 and pinned(at_start) == at_start
    write_deltalake(str(table_path), pa.table({"instruction": ["Three."], "output": ["3"]}), mode="append")
    records, rejects, input_files = ingest(spark, [at_start], DEFAULT)
    [row] = input_files.collect()
    assert (records.count(), rejects.count(), row["units"], row["version"]) == (2, 0, 2, 0)
    records, _, input_files = ingest(spark, [item], DEFAULT)  # unpinned: the version current now
    [row] = input_files.collect()
    assert (records.count(), row["units"], row["version"]) == (3, 3, 1)


def test_gzip_and_glob_characters_in_names(spark, tmp_path):
    gz = tmp_path / "part[1].jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write('{"instruction": "Zipped?", "output": "Yes."}\n\n{"bad json\n')
    records, rejects = run_ingest(spark, [gz], units={gz: 2})
    assert [r["instruction"] for r in records] == ["Zipped?"]
    assert [(r["line"], r["reason"]) for r in rejects] == [(3, "malformed_json")]


def test_one_line_without_newline_and_an_empty_file(spark, tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    records, rejects = run_ingest(spark, [path, empty], units={path: 1, empty: 0})
    assert len(records) == 1 and not rejects


def test_no_inputs_gives_empty_tables_with_the_schema(spark):
    records, rejects, input_files = ingest(spark, [], DEFAULT)
    assert records.columns == ["id", "instruction", "input", "output", "source", "extra"]
    assert rejects.columns == ["source", "line", "row", "raw", "reason", "detail"]
    assert input_files.columns == ["source", "format", "units", "bytes", "run_id", "framed", "version"]
    assert records.count() == 0 and rejects.count() == 0 and input_files.count() == 0
