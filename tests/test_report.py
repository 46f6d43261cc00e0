"""The run report: numbers equal the tables, pictures are real images, the HTML stands alone."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from mergeit_spark.config import load_settings
from mergeit_spark.report import PICTURES, build_report, project_2d

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
    assert data["fates"] == exp.fates
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
    """A run that stopped after ingest still gets a report, with the missing sections left out."""
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


def test_project_2d_keeps_the_main_axis():
    rng = np.random.default_rng(0)
    points = np.outer(rng.normal(size=200), [3.0, 0, 0, 0]) + 0.01 * rng.normal(size=(200, 4))
    flat, ratio = project_2d(points)
    assert flat.shape == (200, 2)
    assert ratio[0] > 0.99
