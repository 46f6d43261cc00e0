"""Benchmark decontamination: evaluation items planted into real rows are found however they are
disguised, rows that share only common phrases are not, and a merge that copies an item fails
the gate."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from mergeit_spark.config import DecontamSettings
from mergeit_spark.ngrams import WordHasher, ngram_hashes, normalise, words
from mergeit_spark.stages import StageError
from mergeit_spark.stages.decontam import (RECORD_COLUMNS, contaminated_texts, evaluation_tables,
                                           resolve_eval_sets)
from mergeit_spark.stages.merge import PASS_SCHEMA, reject_contaminated

COMMON = "In this task you will"


def test_normalise_folds_case_punctuation_width_and_space():
    assert normalise("  Hello,\tWORLD!!  It's   well-known ") == "hello world it s well known"
    assert normalise("Ｆｕｌｌ　ｗｉｄｔｈ") == "full width"       # NFKC
    assert words(None) == [] and words("...") == []


def test_ngram_hashes_are_stable_and_positional():
    h = WordHasher()
    a = ngram_hashes(h(words("the cat sat on the mat")), 3)
    b = ngram_hashes(h(words("THE cat, sat on the mat!")), 3)
    assert list(a) == list(b) and len(a) == 4 and len(set(a)) == 4
    assert ngram_hashes(h(words("the cat")), 3).size == 0
    # An m-gram and an n-gram of the same leading words differ.
    assert ngram_hashes(h(["a", "b", "c"]), 3)[0] not in set(ngram_hashes(h(["a", "b", "c", "d"]), 4))


@pytest.fixture(scope="module")
def real(shared_data):
    return (json.loads((shared_data / "mergeit-6k.json").read_text()),
            json.loads((shared_data / "gpteacher-roleplay.json").read_text()))


def _eval_sets(tmp_path, roleplay):
    """Three evaluation sets in three formats: JSON Lines with question/answer, Parquet with
    instruction/output, plain text (one item a line, short ones among them)."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": r["instruction"], "answer": r["output"], "id": i})
                            for i, r in enumerate(roleplay[:40])) + "\n")
    pq.write_table(pa.table({"instruction": [r["instruction"] for r in roleplay[40:80]],
                             "output": [r["output"] for r in roleplay[40:80]]}), tmp_path / "io.parquet")
    (tmp_path / "short.txt").write_text("What is the capital of Peru\n\nok\n"
                                        f"{COMMON} write a poem about the sea under the moonlight in four lines\n")
    return [str(qa), str(tmp_path / "io.parquet"), str(tmp_path / "short.txt")]


def _planted(training, roleplay):
    """Real training rows (mergeit-6k) and planted rows, by the item each must match."""
    q0, a5, q7, o41 = (roleplay[0]["instruction"], roleplay[5]["output"], roleplay[7]["instruction"],
                       roleplay[41]["output"])
    half = len(q7.split()) // 2
    planted = {
        "verbatim": (q0, "", "Sure."),
        "inside": ("Read this first. " + q0 + " Then answer in one line.", "", "Done."),
        "disguised": ("Continue the story.", "", "  ".join(a5.upper().split()).replace(".", " ;; ")),
        "split": (" ".join(q7.split()[:half]), " ".join(q7.split()[half:]), "An answer."),
        "parquet": ("Summarise.", o41, "A summary."),
        "short": ("Geography quiz: what is the capital of Peru?", "", "Lima."),
    }
    negatives = {
        "common phrase": (f"{COMMON} classify the sentiment of this review.", "I loved it.", "positive"),
        "short prefix only": ("What is the capital of France?", "", "Paris."),
        "ok": ("Reply ok if you agree.", "", "ok"),
    }
    rows = [(f"real-{i}", r["instruction"], r["input"], r["output"]) for i, r in enumerate(training[:300])]
    rows += [(name, *texts) for name, texts in {**planted, **negatives}.items()]
    return rows, set(planted)


@pytest.fixture(scope="module")
def contamination(spark, real, tmp_path_factory):
    training, roleplay = real
    tmp = tmp_path_factory.mktemp("eval")
    sets = resolve_eval_sets(_eval_sets(tmp, roleplay))
    rows, planted = _planted(training, roleplay)
    records = spark.createDataFrame(rows, "id string, instruction string, input string, output string")
    settings = DecontamSettings()
    items, ngrams = evaluation_tables(spark, sets, settings)
    items, ngrams = items.persist(), ngrams.persist()
    found = {r["id"]: r.asDict() for r in contaminated_texts(records, RECORD_COLUMNS, items, ngrams, settings).collect()}
    return found, planted, items, ngrams, records, sets


def test_every_planted_item_is_found_and_nothing_else(contamination):
    found, planted, *_ = contamination
    assert set(found) == planted


def test_the_match_names_the_set_the_item_and_the_text(contamination, real):
    found, _, items, *_ = contamination
    _, roleplay = real
    assert found["verbatim"]["eval_set"].endswith("qa.jsonl") and found["verbatim"]["item"] == 0
    assert found["verbatim"]["kind"] == "ngram" and found["verbatim"]["match"] in normalise(roleplay[0]["instruction"])
    assert len(found["verbatim"]["match"].split()) == 13
    assert found["disguised"]["item"] == 5 and found["split"]["item"] == 7
    assert found["parquet"]["eval_set"].endswith("io.parquet") and found["parquet"]["item"] == 1
    short = found["short"]
    assert short["eval_set"].endswith("short.txt") and short["item"] == 0
    assert short["kind"] == "whole_item" and short["match"] == "what is the capital of peru"
    # The verbatim copy shares every 13-gram of the question; the split one its inner ones too.
    assert found["verbatim"]["ngrams"] >= len(words(roleplay[0]["instruction"])) - 12


def test_items_keep_their_line_numbers_and_short_ones_are_counted(contamination):
    _, _, items, ngrams, *_ = contamination
    text = {r["item"]: r for r in items.filter(F.col("eval_set").endswith("short.txt")).collect()}
    assert sorted(text) == [0, 2, 3]            # the blank line 1 is no item, but lines keep their numbers
    assert text[2]["words"] == 1                 # "ok": under decontam.min_item_words, ignored
    assert ngrams.join(items.filter(F.col("item") == 2).filter(F.col("eval_set").endswith("short.txt")),
                       "key").count() == 0
    assert items.filter(F.col("eval_set").endswith("qa.jsonl")).count() == 40


def test_the_shuffle_join_finds_the_same_rows(contamination, spark):
    found, _, items, ngrams, records, _ = contamination
    shuffled = contaminated_texts(records, RECORD_COLUMNS, items, ngrams, DecontamSettings(broadcast_max_ngrams=1))
    assert {r["id"]: r.asDict() for r in shuffled.collect()} == found


def test_a_set_without_the_fields_is_a_clear_error(spark, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_text": "x", "label": 1}\n')
    with pytest.raises(StageError, match="none of the fields"):
        evaluation_tables(spark, resolve_eval_sets([str(bad)]), DecontamSettings())
    with pytest.raises(StageError, match="eval_paths"):
        resolve_eval_sets([str(tmp_path / "missing.jsonl")])
    broken = tmp_path / "broken.jsonl"   # an item that cannot be read must not go unchecked
    broken.write_text('{"question": "one two three"}\n{"question": "cut off\n')
    with pytest.raises(StageError, match=r"broken.jsonl cannot be read as jsonl: \[MALFORMED_RECORD"):
        evaluation_tables(spark, resolve_eval_sets([str(broken)]), DecontamSettings())


def test_a_merge_copying_an_item_fails_the_gate(spark, contamination, real):
    _, _, items, ngrams, *_ = contamination
    _, roleplay = real
    gate = json.dumps({"passed": True, "failed": [], "min_source_similarity": 0.8, "request_coverage": 1.0,
                       "output_coverage": 0.9, "output_ratio": 1.0, "max_copy_similarity": 0.7, "copy_of": None},
                      separators=(",", ":"))
    base = {f.name: None for f in PASS_SCHEMA.fields}
    rows = [dict(base, group_id="clean", status="merged", instruction="Merge these two tasks.", input="",
                 output="A plain answer that copies nothing.", gate=gate, source="llm"),
            dict(base, group_id="copied", status="merged", instruction="Answer both parts.", input="",
                 output="First part. " + roleplay[3]["output"], gate=gate, source="llm"),
            dict(base, group_id="refused", status="gate_failed", instruction=roleplay[3]["instruction"],
                 input="", output="x", gate=gate.replace('"passed":true,"failed":[]', '"passed":false,"failed":["copy"]'),
                 error="gate: copy", gate_failed="copy", source="llm")]
    passed = spark.createDataFrame(rows, PASS_SCHEMA)
    out = {r["group_id"]: r for r in reject_contaminated(passed, (items, ngrams), DecontamSettings()).collect()}
    assert out["clean"]["status"] == "merged" and out["clean"]["gate"] == gate
    copied = out["copied"]
    assert copied["status"] == "gate_failed" and copied["error"] == "gate: contaminated"
    assert copied["gate_failed"] == "contaminated"
    verdict = json.loads(copied["gate"])
    assert verdict["passed"] is False and verdict["failed"] == ["contaminated"]
    assert verdict["contaminated"]["item"] == 3 and verdict["contaminated"]["eval_set"].endswith("qa.jsonl")
    assert verdict["min_source_similarity"] == 0.8          # the gate's numbers are kept
    assert out["refused"]["status"] == "gate_failed" and out["refused"]["gate_failed"] == "copy"
    assert out["copied"]["output"] == rows[1]["output"]     # the reply stays as the LLM gave it


def test_a_pipeline_run_gives_contaminated_rows_their_fate(pipeline_run):
    """The shared run's evaluation set (``_pipeline_run.eval_set``) holds the text of three of its
    rows: those rows are contaminated, never embedded, and the ledger balances."""
    from _pipeline_run import EVAL_ROWS, SHARED_DATA, read
    from mergeit_spark.ids import content_id

    rows = json.loads((SHARED_DATA / "mergeit-6k.json").read_text())
    expected = {content_id(rows[i]["instruction"], rows[i]["input"], rows[i]["output"]) for i in EVAL_ROWS}
    lineage = {r["id"]: r for r in read(pipeline_run.root, "lineage") if r["id"]}
    contaminated = {i for i, r in lineage.items() if r["fate"] == "contaminated"}
    assert contaminated == expected
    details = {i: json.loads(lineage[i]["detail"]) for i in contaminated}
    assert sorted(d["item"] for d in details.values()) == [0, 1, 2]
    assert all(d["eval_set"] == str(pipeline_run_eval(pipeline_run)) and d["match"] for d in details.values())
    assert {lineage[i]["reason"] for i in contaminated} == {"ngram"}
    assert not expected & {r["id"] for r in read(pipeline_run.root, "embeddings")}
    assert expected <= {r["id"] for r in read(pipeline_run.root, "records")}
    table = {r["id"]: r for r in read(pipeline_run.root, "contamination")}
    assert set(table) == expected
    summary = next(r for r in pipeline_run.results if r.name == "decontam").summary
    assert summary["contaminated"] == 3 and summary["per_set"][str(pipeline_run_eval(pipeline_run))]["items"] == 4


def pipeline_run_eval(run) -> str:
    from _pipeline_run import eval_set
    return eval_set()


def test_json_arrays_and_delta_tables_are_evaluation_sets_too(spark, tmp_path, real):
    from deltalake import write_deltalake
    _, roleplay = real
    (tmp_path / "arr.json").write_text(json.dumps([{"prompt": r["instruction"]} for r in roleplay[200:203]]))
    write_deltalake(str(tmp_path / "delta"), pa.table({"question": [r["instruction"] for r in roleplay[300:304]]}))
    sets = resolve_eval_sets([str(tmp_path / "arr.json"), str(tmp_path / "delta")])
    assert [f.format for s in sets for f in s.files] == ["json", "delta"]
    items, ngrams = evaluation_tables(spark, sets, DecontamSettings())
    assert sorted((r["eval_set"].rsplit("/", 1)[-1], r["item"]) for r in items.collect()) == [
        ("arr.json", 0), ("arr.json", 1), ("arr.json", 2), ("delta", 0), ("delta", 1), ("delta", 2), ("delta", 3)]
    records = spark.createDataFrame([("a", "x " + roleplay[201]["instruction"], "", "y"),
                                     ("b", roleplay[303]["instruction"].lower(), "", "z"),
                                     ("c", roleplay[0]["instruction"], "", "w")],
                                    "id string, instruction string, input string, output string")
    found = {r["id"]: (r["eval_set"].rsplit("/", 1)[-1], r["item"])
             for r in contaminated_texts(records, RECORD_COLUMNS, items, ngrams, DecontamSettings()).collect()}
    assert found == {"a": ("arr.json", 1), "b": ("delta", 3)}


def test_a_changed_evaluation_set_makes_decontam_and_every_stage_below_rerun(pipeline_run, tmp_path):
    """The evaluation files are part of the stage's fingerprint: the same settings pointing at a
    changed file leave decontam and the stages below it not current (an increment would refuse to
    start); the run's own set leaves everything current."""
    from _pipeline_run import eval_set, pipeline_settings
    from mergeit_spark.pipeline import Pipeline

    root = pipeline_run.copy_to(tmp_path / "run")
    same = Pipeline(pipeline_settings(root, pipeline_run.data, pipeline_run.base_url))
    assert all(row["current"] for row in same.status())
    changed = tmp_path / "eval.jsonl"
    changed.write_text(eval_set().read_text() + json.dumps({"question": "One more benchmark item."}) + "\n")
    other = Pipeline(pipeline_settings(root, pipeline_run.data, pipeline_run.base_url,
                                       f"decontam.eval_paths=[{changed}]"))
    current = {row["stage"]: row["current"] for row in other.status()}
    assert current["ingest"] and not any(v for k, v in current.items() if k != "ingest")
