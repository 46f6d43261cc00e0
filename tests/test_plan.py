"""``mergeit plan`` on a copy of the shared whole-pipeline run stopped after ``group``, against the
scripted LLM server: a plan with nothing measured sends nothing and says what it assumed; a
sampled plan pays for its sample once (the ledger keeps it) and measures; the real run then pays
only the rest, close to what the plan said. Each plan is recorded under the run root, and the
report sets it against what the merge runs after it sent."""
from __future__ import annotations

import json

import pytest

from _pipeline_run import cli_args, pipeline_settings, read
from fake_openai import FakeOpenAI
from mergeit_spark.cli import main
from mergeit_spark.llm.spend import Prices
from mergeit_spark.pipeline import Pipeline
from mergeit_spark.plan import no_sample, plan_merge
from mergeit_spark.report import collect_report_data, plan_against_actual
from mergeit_spark.tables import TableStore

PRICES = ("llm.price_input_per_million=3", "llm.price_output_per_million=15")
SAMPLE = 3
FIGURES = ("requests", "prompt_tokens", "completion_tokens", "cost", "seconds")


def merge_summaries(root) -> list[dict]:
    """The merge passes' summaries in the run log, read as plain JSON lines."""
    lines = (root / "_state" / "runs.jsonl").read_text().splitlines()
    return [e["summary"] for e in map(json.loads, filter(None, lines)) if e["stage"] == "merge"]


@pytest.fixture()
def root(pipeline_run, tmp_path):
    return pipeline_run.copy_to(tmp_path / "run", until="group")


def test_plan_without_history_sends_nothing_and_says_what_it_assumed(spark, pipeline_run, root, capsys):
    n_groups = len(read(root, "merge_groups"))
    with FakeOpenAI() as fake:
        code = main(["plan", *cli_args(root, pipeline_run.data, fake.base_url, *PRICES), "--json", "--sample", "0"])
    assert code == 0 and fake.count == 0 and fake.preflights == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["groups"], plan["answered"], plan["to_send"], plan["sampled"]) == (n_groups, 0, n_groups, 0)
    assert plan["requests"] == {"value": n_groups, "source": "assumed", "note": plan["requests"]["note"]}
    assert plan["completion_tokens"]["value"] == n_groups * 1024 and plan["completion_tokens"]["source"] == "assumed"
    assert plan["prompt_tokens"]["source"] == "estimated" and plan["prompt_tokens"]["value"] > 0
    assert plan["cost"]["value"] == pytest.approx(
        Prices(3, 15).cost(plan["prompt_tokens"]["value"], plan["completion_tokens"]["value"]))
    assert not (root / "_ledger").exists()
    # The plan is recorded; the merge run of the shared run, logged before it, is no actual of it.
    against = plan_against_actual(TableStore(spark, root))
    assert merge_summaries(root) and against["runs_after"] == 0 and against["sample"] == no_sample()
    assert {k: (f["planned"], f["source"], f["actual"]) for k, f in against["figures"].items()} == \
        {k: (plan[k]["value"], plan[k]["source"], None) for k in FIGURES}


def test_a_sampled_plan_is_paid_once_and_the_run_pays_the_rest_as_planned(spark, pipeline_run, root):
    n_groups = len(read(root, "merge_groups"))
    with FakeOpenAI() as fake:
        settings = pipeline_settings(root, pipeline_run.data, fake.base_url, *PRICES)
        plan = plan_merge(Pipeline(settings, spark=spark), sample=SAMPLE)
        sample_requests = fake.count
        assert plan.sampled == SAMPLE and plan.answered == SAMPLE and plan.to_send == n_groups - SAMPLE
        assert sample_requests == plan.history["attempts"] >= SAMPLE
        assert {plan.requests.source, plan.completion_tokens.source, plan.prompt_tokens.source} == \
            {"measured", "calibrated"}
        sample_preflights, runs_before = fake.preflights, len(merge_summaries(root))
        Pipeline(settings, spark=spark).run()
        sent = fake.count - sample_requests
        run_preflights = fake.preflights - sample_preflights
    merges = read(root, "merges")
    assert len(merges) == n_groups
    paid = [m for m in merges if m["attempts"]]
    prompt = sum(m["prompt_tokens"] for m in paid) - plan.history["prompt_tokens"]
    completion = sum(m["completion_tokens"] for m in paid) - plan.history["completion_tokens"]
    print(f"\nplan {plan.requests.value:.0f} requests, {plan.prompt_tokens.value:.0f} prompt, "
          f"{plan.completion_tokens.value:.0f} completion; actual {sent}, {prompt}, {completion}")
    assert sent == pytest.approx(plan.requests.value, rel=0.10)
    assert prompt == pytest.approx(plan.prompt_tokens.value, rel=0.15)
    assert completion == pytest.approx(plan.completion_tokens.value, rel=0.15)
    # The report: the plan's figures against the sum of the merge runs logged after it.
    against = collect_report_data(TableStore(spark, root), settings)["merging"]["plan_vs_actual"]
    runs = merge_summaries(root)[runs_before:]
    assert against["runs_after"] == len(runs) == 1 and against["covered"]["sampled"] == SAMPLE
    for key in FIGURES:
        fig, planned = against["figures"][key], getattr(plan, key)
        assert (fig["planned"], fig["source"]) == (planned.value, planned.source)
        assert fig["actual"] == pytest.approx(sum(r[key] for r in runs))
        assert fig["ratio"] == pytest.approx(fig["actual"] / planned.value, abs=1e-4)
    figures = against["figures"]
    assert (figures["requests"]["actual"], figures["prompt_tokens"]["actual"],
            figures["completion_tokens"]["actual"]) == (sent, prompt, completion)
    assert against["actual_preflight"]["requests"] == run_preflights
    sample = against["sample"]
    assert (sample["groups"], sample["requests"], sample["prompt_tokens"], sample["completion_tokens"],
            sample["preflight_requests"]) == (SAMPLE, sample_requests, plan.history["prompt_tokens"],
                                              plan.history["completion_tokens"], sample_preflights)


def test_a_plan_with_the_models_tokenizer_counts_prompt_tokens_rather_than_estimating(spark):
    from mergeit_spark.config import load_settings
    from mergeit_spark.plan import _PLANNED_SCHEMA, make_plan
    planned = spark.createDataFrame([("g1", "h1", False, 700), ("g2", "h2", False, 300), ("g3", "h3", True, 0)],
                                    _PLANNED_SCHEMA)
    counted = make_plan(load_settings(overrides=["llm.tokenizer=bundled"]), planned, {}, slots=2)
    assert (counted.to_send, counted.prompt_tokens.value, counted.prompt_tokens.source) == (2, 1000, "counted")
    assert "SmolLM2" in counted.prompt_tokens.note
    batch = make_plan(load_settings(overrides=["llm.mode=batch", "llm.price_input_per_million=2",
                                               "llm.price_batch_discount=0.5"]), planned, {}, slots=2)
    assert batch.prompt_tokens.source == "estimated" and batch.seconds.source == "assumed"
    assert batch.cost.value == pytest.approx(1000 * 2 * 0.5 / 1e6)
