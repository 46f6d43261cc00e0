"""The run report: numbers equal the tables, pictures are real images, the HTML stands alone."""
from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pytest
from PIL import Image
from pyspark.sql import functions as F

from mergeit_spark.config import load_settings
from mergeit_spark.plan import Figure, MergePlan, no_sample, record_plan
from mergeit_spark.report import (PICTURES, build_report, contaminated_merges, decontam_numbers,
                                  plan_against_actual, project_2d, render_html)
from mergeit_spark.stages.decontam import EVAL_ITEMS_SCHEMA
from mergeit_spark.tables import RUN_LOG, TableStore

from _pipeline_run import EVAL_ROWS, eval_set, pipeline_settings
from _pipeline_tables import finalized_run

TOPIC_SAMPLE = 20   # fewer than the fixture's 36 embeddings: the sample cap must hold
EXAMPLES = 2
URL_PASSWORD = "url-password-canary-5acd"
CONF_SECRET = "conf-secret-canary-91be"


@pytest.fixture(scope="module")
def report(spark, settings, shared_data, tmp_path_factory):
    store, expected = finalized_run(spark, settings, shared_data, tmp_path_factory)
    report_settings = load_settings(overrides=["spark.master=local[2]", "spark.shuffle_partitions=4",
                                               f"report.topic_map_sample={TOPIC_SAMPLE}",
                                               f"report.examples={EXAMPLES}",
                                               f"llm.base_url=https://reporter:{URL_PASSWORD}@llm.example/v1",
                                               "spark.conf={'spark.executorEnv.MERGEIT_LLM_API_KEY': "
                                               f"'{CONF_SECRET}', 'spark.eventLog.enabled': 'false'}}"],
                                    env={})
    out = tmp_path_factory.mktemp("report")
    page = build_report(store, out, report_settings, timings={"ingest": 1.25, "embed": 30.5},
                        extra={"run": "fixture"})
    return page, json.loads((out / "report.json").read_text()), store, expected


def test_files_exist(report):
    page, _, _, _ = report
    assert page.name == "report.html" and page.is_file()
    for name in ("report.json", *(f"{p}.png" for p in PICTURES)):
        assert (page.parent / name).stat().st_size > 0, name


def test_json_numbers_equal_the_tables(report):
    _, data, store, exp = report
    for name, info in data["tables"].items():
        assert info["rows"] == store.read(name).count(), name
        assert info["version"] == store.version(name)
    assert data["input_rows"] == exp.records + exp.rejects      # ingest's count, from input_files
    assert data["input"]["files"] == 2
    assert sum(s["units"] for s in data["input"]["sources"]) == data["input_rows"]
    assert data["rejects_by_reason"] == exp.rejects_by_reason
    assert data["embed_precision"] == {"fp32": exp.records}
    assert data["fates"] == {"contaminated": 0} | exp.fates
    assert data["final"] == {"original": exp.final_original, "merged": exp.final_merged}
    assert data["dedup"] == {"kept": exp.records - exp.fates["duplicate"], "duplicate": exp.fates["duplicate"]}
    assert data["topics"]["k"] == exp.clusters
    assert data["topics"]["pca_components"] == 8
    assert {c["cluster"]: c["size"] for c in data["topics"]["clusters"]} == exp.cluster_sizes
    assert sum(c["selected"] for c in data["topics"]["clusters"]) == data["tables"]["selected"]["rows"]
    assert data["topics"]["topic_map_sample"] == TOPIC_SAMPLE
    merging = data["merging"]
    assert merging["requests_by_status"] == exp.merge_statuses
    gate_failed = exp.merge_statuses["gate_failed"]
    assert merging["gate_rejections"] == {"source_similarity": gate_failed, "copy": gate_failed}
    assert merging["prompt_tokens"] == exp.prompt_tokens
    assert merging["completion_tokens"] == exp.completion_tokens
    assert merging["total_tokens"] == exp.prompt_tokens + exp.completion_tokens
    assert merging["groups"] == data["tables"]["merge_groups"]["rows"]
    assert [s["rows"] for s in data["funnel"]] == [
        exp.records + exp.rejects, exp.records, exp.records - exp.fates["duplicate"],
        data["tables"]["selected"]["rows"], exp.final]
    assert data["ledger"]["balanced"] is True
    assert data["ledger"]["input_rows"] == exp.records + exp.rejects
    assert data["decontamination"] == {"eval_sets": 0, "checked": "not_run"}   # no eval_items table
    assert data["timings"] == {"ingest": 1.25, "embed": 30.5}
    assert data["extra"]["run"] == "fixture"
    assert len(data["merge_examples"]) == EXAMPLES
    assert all(ex["status"] == "merged" and len(ex["sources"]) == 2 for ex in data["merge_examples"])


def test_pictures_are_real_images(report):
    page, _, _, _ = report
    for name in PICTURES:
        path = page.parent / f"{name}.png"
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.width >= 600 and img.height >= 300, (name, img.size)
            pixels = np.asarray(img.convert("L"), dtype=float)
        # a plot, not a blank canvas: plenty of non-white pixels and real contrast
        assert (pixels < 200).mean() > 0.01, name
        assert pixels.std() > 10, name


def test_html_is_self_contained_with_inlined_images(report):
    page, _, _, _ = report
    text = page.read_text(encoding="utf-8")
    for name in PICTURES:
        encoded = base64.b64encode((page.parent / f"{name}.png").read_bytes()).decode("ascii")
        assert f"data:image/png;base64,{encoded}" in text, name
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    assert "<script" not in text and "<link" not in text
    assert "ledger balances" in text
    assert f"{exp_input(report):,} input rows" in text
    assert "gate check failed" in text and "fp32" in text
    assert "<h2>Decontamination</h2>" in text
    assert "NOT checked for contamination</span>: the decontam stage has not run" in text


def exp_input(report) -> int:
    _, _, _, exp = report
    return exp.records + exp.rejects


def test_settings_are_shown_with_credentials_masked(report):
    page, data, _, _ = report
    assert data["settings"]["llm"]["base_url"] == "https://***@llm.example/v1"
    assert data["settings"]["spark"]["conf"] == {"spark.executorEnv.MERGEIT_LLM_API_KEY": "*********(redacted)",
                                                 "spark.eventLog.enabled": "false"}
    for path in page.parent.iterdir():
        content = path.read_bytes()
        assert URL_PASSWORD.encode() not in content and CONF_SECRET.encode() not in content, path.name


def test_report_of_a_partial_run(spark, settings, shared_data, tmp_path_factory, store, tmp_path):
    """A run that stopped after ingest still gets a report, with the missing sections left out
    but for decontamination, which says that the run was not checked."""
    full, exp = finalized_run(spark, settings, shared_data, tmp_path_factory)
    for name in ("input_files", "records", "rejects"):
        store.write(full.read(name), name)
    page = build_report(store, tmp_path / "report", settings)
    data = json.loads((page.parent / "report.json").read_text())
    assert data["input_rows"] == exp.records + exp.rejects
    assert [s["step"] for s in data["funnel"]] == ["input rows", "records (valid, unique)"]
    assert "ledger" not in data and data["topics"] == {"topic_map_sample": 0}
    assert (page.parent / "funnel.png").is_file()
    assert not (page.parent / "topic_map.png").exists()
    assert "No topic map" in page.read_text()
    assert data["decontamination"] == {"eval_sets": 0, "checked": "not_run"}
    assert "NOT checked for contamination</span>: the decontam stage has not run" in page.read_text()


# -- decontamination: the shared whole-pipeline run, whose evaluation set contaminates three rows --

@pytest.fixture(scope="module")
def pipeline_report(spark, pipeline_run, tmp_path_factory):
    """The report of the shared run (read only: the report is written elsewhere) and its tables."""
    store = TableStore(spark, pipeline_run.root)
    settings = pipeline_settings(pipeline_run.root, pipeline_run.data, pipeline_run.base_url)
    page = build_report(store, tmp_path_factory.mktemp("pipeline-report"), settings)
    return page, json.loads((page.parent / "report.json").read_text()), store


def _by(df, *keys) -> dict:
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: int(r["count"])
            for r in df.groupBy(*keys).count().collect()}


def test_decontamination_numbers_equal_the_tables(pipeline_report):
    _, data, store = pipeline_report
    dec = data["decontamination"]
    name = str(eval_set())
    assert dec["eval_sets"] == 1 and [s["eval_set"] for s in dec["sets"]] == [name]
    items = store.read("eval_items")
    found = store.read("contamination")
    lineage = store.read("lineage")
    (s,) = dec["sets"]
    assert s["items"] == items.count() == 4
    assert s["ignored_short"] == items.filter(F.col("words") < 3).count()
    # records removed per set == contamination rows per set == the lineage fate
    fated = lineage.filter("fate = 'contaminated'").withColumn("eval_set", F.get_json_object("detail", "$.eval_set"))
    assert s["records_removed"] == _by(found, "eval_set")[name] == _by(fated, "eval_set")[name] == len(EVAL_ROWS)
    assert dec["records_removed"] == data["fates"]["contaminated"] == lineage.filter("fate = 'contaminated'").count()
    assert s["merges_rejected"] == sum(contaminated_merges(store.read("merges")).values())
    assert s["merges_rejected"] == data["merging"]["gate_rejections"].get("contaminated", 0)


def test_the_funnel_removes_contaminated_rows_before_embedding(pipeline_report):
    _, data, _ = pipeline_report
    steps = {s["step"]: s["rows"] for s in data["funnel"]}
    assert [s["step"] for s in data["funnel"]][:3] == ["input rows", "records (valid, unique)", "after decontamination"]
    records = data["tables"]["records"]["rows"]
    assert steps["after decontamination"] == records - data["fates"]["contaminated"]
    assert steps["after decontamination"] == data["tables"]["embeddings"]["rows"]   # only these were embedded
    assert steps["kept after dedup"] <= steps["after decontamination"]
    assert sum(data["fates"].values()) == data["input_rows"] and data["ledger"]["balanced"] is True


def test_top_items_and_examples_name_real_items_and_records(pipeline_report):
    _, data, store = pipeline_report
    (s,) = data["decontamination"]["sets"]
    items = {(r["file"], r["item"]): r["text"] for r in store.read("eval_items").collect()}
    found = {r["id"]: r for r in store.read("contamination").collect()}
    counts = _by(store.read("contamination"), "file", "item")
    top = s["top_items"]
    assert [(i["file"], i["item"], i["records"]) for i in top] == sorted(
        ((f, i, n) for (f, i), n in counts.items()), key=lambda x: (-x[2], x[0], x[1]))[:5]
    assert all(" ".join(items[(i["file"], i["item"])].split()).startswith(i["text"].rstrip(" …")) for i in top)
    records = {r["id"]: r for r in store.read("records").filter(F.col("id").isin(list(found))).collect()}
    assert len(s["examples"]) == 3 and len({e["id"] for e in s["examples"]}) == 3
    for e in s["examples"]:
        assert (e["file"], e["item"]) == (found[e["id"]]["file"], found[e["id"]]["item"])
        assert e["match"] == found[e["id"]]["match"] and e["kind"] == found[e["id"]]["kind"]
        assert " ".join(records[e["id"]]["instruction"].split()).startswith(e["instruction"].rstrip(" …"))


def test_the_html_has_the_decontamination_section(pipeline_report):
    page, data, _ = pipeline_report
    text = page.read_text(encoding="utf-8")
    (s,) = data["decontamination"]["sets"]
    section = text[text.index("<h2>Decontamination</h2>"):]
    section = section[:section.index("<h2>", 5)]
    assert f"<h3>{html.escape(s['eval_set'])}</h3>" in section
    assert "3 records removed" in section and "NOT checked" not in section
    assert "<td>row 0</td>" in section          # a one-file set: its items by row, under its heading
    for e in s["examples"]:
        assert html.escape(e["id"]) in section and html.escape(e["match"]) in section
    assert "after decontamination" in text


def test_decontam_numbers_per_set_with_contaminated_merges(spark):
    """Built tables: two sets, a short item, one item matched twice, merges the gate rejected for
    either set (one also for a copy), one rejected for a copy only and one accepted."""
    items = spark.createDataFrame(
        [("a.jsonl", "a.jsonl", 0, "alpha item text here", 4), ("a.jsonl", "a.jsonl", 1, "ok", 1),
         ("a.jsonl", "a.jsonl", 2, "another alpha item", 3), ("b", "b/x.txt", 0, "<b>beta</b> & item", 3)],
        "eval_set string, file string, item long, text string, words int")
    found = spark.createDataFrame(
        [("r1", "a.jsonl", "a.jsonl", 2, "another alpha item", "whole_item"),
         ("r2", "a.jsonl", "a.jsonl", 0, "alpha item text", "ngram"),
         ("r3", "a.jsonl", "a.jsonl", 0, "alpha item text", "ngram"),
         ("r4", "b", "b/x.txt", 0, "beta item", "whole_item")],
        "id string, eval_set string, file string, item long, match string, kind string")
    records = spark.createDataFrame([(f"r{i}", f"instruction {i}") for i in range(1, 6)],
                                    "id string, instruction string")

    def gate(failed, eval_name=None):
        hit = {"contaminated": {"eval_set": eval_name, "file": eval_name, "item": 0, "match": "x"}} if eval_name else {}
        return json.dumps({"passed": not failed, "failed": failed, "min_source_similarity": 0.8, **hit})
    merges = spark.createDataFrame(
        [("g1", "gate_failed", gate(["contaminated"], "a.jsonl")),
         ("g2", "gate_failed", gate(["copy", "contaminated"], "b")),
         ("g3", "gate_failed", gate(["copy"])), ("g4", "merged", gate([])), ("g5", "failed", None)],
        "group_id string, status string, gate string")
    assert contaminated_merges(merges) == {"a.jsonl": 1, "b": 1}
    dec = decontam_numbers({"eval_items": items, "contamination": found, "records": records, "merges": merges}, 3)
    assert (dec["eval_sets"], dec["items"], dec["ignored_short"], dec["records_removed"], dec["merges_rejected"]) \
        == (2, 4, 1, 4, 2)
    a, b = dec["sets"]        # most records removed first
    assert (a["eval_set"], a["items"], a["ignored_short"], a["records_removed"], a["merges_rejected"]) \
        == ("a.jsonl", 3, 1, 3, 1)
    assert [(i["item"], i["records"]) for i in a["top_items"]] == [(0, 2), (2, 1)]
    assert [e["id"] for e in a["examples"]] == ["r1", "r2", "r3"]      # one per item first, then by id
    assert a["examples"][0]["instruction"] == "instruction 1" and a["examples"][0]["item_text"] == "another alpha item"
    assert (b["eval_set"], b["records_removed"], b["merges_rejected"]) == ("b", 1, 1)
    assert b["top_items"][0]["text"] == "<b>beta</b> & item"
    page = render_html({"run_root": "r", "generated_at": "now", "decontamination": dec}, {}, [])
    assert "&lt;b&gt;beta&lt;/b&gt; &amp; item" in page and "<b>beta</b>" not in page
    assert "x.txt · row 0" in page and "2 merges rejected" in page


def test_a_run_without_an_evaluation_set_says_it_was_not_checked(spark):
    """The decontam stage of a run without ``decontam.eval_paths`` writes empty tables: the report
    says in one line that nothing was checked, and the funnel has no decontamination step."""
    empty = spark.createDataFrame([], EVAL_ITEMS_SCHEMA)
    dec = decontam_numbers({"eval_items": empty, "contamination": empty.select("eval_set")}, 3)
    assert dec == {"eval_sets": 0, "checked": "no_eval_items"}
    page = render_html({"run_root": "r", "generated_at": "now", "decontamination": dec}, {}, [])
    assert "NOT checked for contamination</span>: no evaluation set was configured" in page


# -- plan against actual: plans and merge runs logged by hand ----------------------------------

SPENT = ("requests", "prompt_tokens", "completion_tokens", "cost", "seconds", "preflight_requests", "preflight_tokens")


def _a_plan(model: str = "m", requests: float = 40.0) -> MergePlan:
    return MergePlan(model=model, groups=50, answered=5, to_send=45,
                     requests=Figure(requests, "measured", "1.1 requests per group"),
                     prompt_tokens=Figure(20_000.0, "calibrated", "estimate x 0.9"),
                     completion_tokens=Figure(8_000.0, "measured"), cost=Figure(0.18, "priced", "tokens measured"),
                     seconds=Figure(30.0, "measured", "<latency> & limits"), sampled=5)


def _log_run(store: TableStore, stage: str = "merge", **summary) -> dict:
    store.append_log(RUN_LOG, {"stage": stage, "run_id": "x", "increment": False, "versions": {}, "summary": summary})
    return summary


def _spent(*values) -> dict:
    return dict(zip(SPENT, values))


def test_plan_against_actual_takes_the_latest_plan_a_run_followed(store):
    """Runs before the plan and plans after the last run do not count; two runs after it are summed;
    another stage's log lines are not merge runs; the sample stays apart."""
    assert plan_against_actual(store) is None
    _log_run(store, **_spent(99, 9_999, 9_999, 9.0, 99.0, 1, 9))             # before the plan
    sample = no_sample() | _spent(6, 2_400, 1_000, 0.02, 4.5, 1, 12) | {"groups": 5}
    chosen = record_plan(store, _a_plan(), sample)
    runs = [_log_run(store, **_spent(30, 15_000, 6_000, 0.135, 20.25, 1, 12)), _log_run(store, stage="finalize"),
            _log_run(store, **_spent(14, 7_000, 2_800, 0.063, 9.5, 0, 0))]
    record_plan(store, _a_plan("later", 7.0), no_sample())                    # no run after it
    got = plan_against_actual(store)
    assert chosen["merge_runs_before"] == 1 and chosen["covered"] == {"groups": 50, "answered": 5, "to_send": 45,
                                                                      "sampled": 5}
    assert (got["model"], got["made_at"], got["plans_recorded"], got["runs_after"]) == ("m", chosen["made_at"], 2, 2)
    assert got["sample"] == sample and got["covered"] == chosen["covered"]
    assert got["actual_preflight"] == {"requests": 1, "tokens": 12}
    plan = chosen["plan"]
    for key in ("requests", "prompt_tokens", "completion_tokens", "cost", "seconds"):
        fig = got["figures"][key]
        actual = sum(r[key] for r in runs if r)
        assert (fig["planned"], fig["source"], fig["note"]) == (plan[key]["value"], plan[key]["source"],
                                                                plan[key]["note"])
        assert fig["actual"] == pytest.approx(actual)
        assert fig["ratio"] == pytest.approx(actual / fig["planned"], abs=1e-4)
    assert got["figures"]["requests"]["actual"] == 44 and isinstance(got["figures"]["requests"]["actual"], int)
    page = render_html({"run_root": "r", "generated_at": "now", "merging": {"plan_vs_actual": got}}, {}, [])
    assert "paid by the plan&#x27;s --sample (apart)</th>" in page and "what 2 merge runs finished after it" in page
    assert '<td class="n">0.1800</td><td class="n">0.1980</td><td class="n">1.10</td>' in page    # cost
    assert "this is the latest one a merge run followed" in page


def test_a_plan_without_a_run_after_it_has_no_actual_and_reads_well(store):
    _log_run(store, **_spent(10, 1, 1, 0.0, 1.0, 0, 0))
    record_plan(store, _a_plan("<b>m</b>"), no_sample())
    got = plan_against_actual(store)
    assert got["runs_after"] == 0 and got["actual_preflight"] is None and got["sample"]["requests"] == 0
    assert all(f["actual"] is None and f["ratio"] is None for f in got["figures"].values())
    assert got["figures"]["requests"]["planned"] == 40.0
    page = render_html({"run_root": "r", "generated_at": "now", "merging": {"groups": 50, "plan_vs_actual": got}},
                       {}, [])
    section = page[page.index("<h3>Plan against actual</h3>"):]
    assert "No merge run has finished since this plan" in section and "&lt;b&gt;m&lt;/b&gt;" in section
    assert "<b>m</b>" not in page and "&lt;latency&gt; &amp; limits" in section
    assert ('<td>requests</td><td class="n">40</td><td class="n">–</td><td class="n">–</td>'
            '<td>measured: 1.1 requests per group</td>') in section
    assert "paid by the plan" not in section   # no sample: no sample column


def test_project_2d_keeps_the_main_axis():
    rng = np.random.default_rng(0)
    points = np.outer(rng.normal(size=200), [3.0, 0, 0, 0]) + 0.01 * rng.normal(size=(200, 4))
    flat, ratio = project_2d(points)
    assert flat.shape == (200, 2)
    assert ratio[0] > 0.99
