"""The merge quality gate: each check on small hand-made inputs, the batching front, and the
labelled set of real records (tests/data/gate_cases.json, see tests/_gate_cases.py) judged with
the real MiniLM encoder, exactly as the merge stage judges."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import numpy as np
import pytest

from mergeit_spark.config import GateSettings, load_settings
from mergeit_spark.llm.gate import (CHECKS, Batcher, BatchGate, GroupSources, check_merge,
                                    complete_ending, content_words, distinctive_recall,
                                    embedding_text)

from _gate_cases import BAD_KINDS, GOOD_KINDS, choose_thresholds, judge_cases, load_cases

SOURCES = [
    {"instruction": "List three benefits of eating fibre.", "input": "",
     "output": "Fibre aids digestion, lowers cholesterol and keeps blood sugar steady."},
    {"instruction": "List three benefits of regular exercise.", "input": "",
     "output": "Exercise strengthens the heart, builds muscle and lifts mood."},
]
VECTORS = np.asarray([[1.0, 0.3, 0.0], [0.3, 1.0, 0.0]])
BOTH = {"instruction": "List three benefits of eating fibre and three of regular exercise.", "input": "",
        "output": "Fibre aids digestion, lowers cholesterol and steadies blood sugar. Exercise "
                  "strengthens the heart, builds muscle and lifts mood."}


def gate(**overrides) -> GateSettings:
    return load_settings(overrides=[f"gate.{k}={v}" for k, v in overrides.items()], env={}).gate


def test_content_words_and_distinctive_recall():
    assert content_words("The numbers 4, 19 and benefits of it!") == {"number", "4", "19", "benefit"}
    a, b = content_words(SOURCES[0]["output"]), content_words(SOURCES[1]["output"])
    both = content_words(BOTH["output"])
    # the merge rewords "keeps ... steady" as "steadies": 7 of the first output's 9 words remain
    assert list(distinctive_recall(both, [a, b])) == [pytest.approx(7 / 9), 1.0]
    assert list(distinctive_recall(a, [a, b])) == [1.0, 0.0]          # answers the first only
    assert list(distinctive_recall(a, [a, a])) == [1.0, 1.0]          # nothing of its own to carry


def test_a_merge_of_both_passes_and_reports_every_number():
    verdict = check_merge(BOTH, SOURCES, np.asarray([1.0, 1.0, 0.0]), VECTORS, gate())
    assert verdict.passed and verdict.failed == []
    detail = json.loads(verdict.describe())
    assert set(detail) == {"passed", "failed", "min_source_similarity", "request_coverage",
                           "output_coverage", "output_ratio", "max_copy_similarity", "copy_of"}
    assert detail["min_source_similarity"] > 0.85 and detail["output_coverage"] == pytest.approx(7 / 9, abs=1e-4)


def test_dropping_one_answer_fails_output_coverage_only():
    fibre_only = dict(BOTH, output="Fibre aids digestion, lowers cholesterol and steadies blood "
                                   "sugar, so it is worth eating every day.")
    verdict = check_merge(fibre_only, SOURCES, np.asarray([1.0, 1.0, 0.0]), VECTORS, gate())
    assert verdict.failed == ["output_coverage"] and verdict.output_coverage == 0.0
    assert "leaves out the answer" in verdict.feedback()


def test_dropping_one_request_fails_request_coverage():
    fibre_task = dict(BOTH, instruction="List three benefits of eating fibre.")
    # the merged text sits on the first source: 1 - 0.3/|(1,.3)| less similar to the second
    verdict = check_merge(fibre_task, SOURCES, VECTORS[0], VECTORS, gate())
    assert "request_coverage" in verdict.failed and verdict.request_coverage < 0
    assert "copy" not in verdict.failed  # the output grew: not a copy


def test_unrelated_text_fails_source_similarity():
    verdict = check_merge(BOTH, SOURCES, np.asarray([0.0, 0.0, 1.0]), VECTORS, gate())
    assert verdict.failed[0] == "source_similarity" and verdict.min_source_similarity == 0.0


def test_cut_off_output_fails_output_complete():
    cut = dict(BOTH, output=BOTH["output"][:-25].rstrip())
    assert not complete_ending(cut["output"])
    verdict = check_merge(cut, SOURCES, np.asarray([1.0, 1.0, 0.0]), VECTORS, gate())
    assert "output_complete" in verdict.failed
    assert check_merge(cut, SOURCES, np.asarray([1.0, 1.0, 0.0]), VECTORS,
                       gate(require_complete_output=False)).passed
    for ending in ("Done.", "x = f(3)", "Total: 42", "Go! #health", "Yes 🙂", "</html>", "`code`"):
        assert complete_ending(ending), ending


def test_output_length_against_longest_source():
    short = dict(BOTH, output="Fibre digestion; exercise heart muscle mood cholesterol blood sugar.")
    verdict = check_merge(short, SOURCES, np.asarray([1.0, 1.0, 0.0]), VECTORS, gate(min_output_ratio=1.5))
    assert verdict.failed == ["output_length"]


def test_copy_needs_high_similarity_and_similar_length():
    copy = dict(SOURCES[0])
    verdict = check_merge(copy, SOURCES, VECTORS[0], VECTORS, gate())
    assert "copy" in verdict.failed and verdict.copy_of == 0
    grown = dict(SOURCES[0], output=SOURCES[0]["output"] + " It also feeds the good gut bacteria.")
    assert "copy" not in check_merge(grown, SOURCES, VECTORS[0], VECTORS, gate()).failed


def test_batcher_groups_waiting_items_into_one_call_off_the_loop():
    calls = []

    def fn(items):
        calls.append((list(items), threading.current_thread() is threading.main_thread()))
        time.sleep(0.05)
        return [i * 10 for i in items]

    async def go():
        batcher = Batcher(fn, max_batch=8)
        return await asyncio.gather(*(batcher.submit(i) for i in range(1, 11)))

    assert asyncio.run(go()) == [i * 10 for i in range(1, 11)]
    assert [len(items) for items, _ in calls] == [8, 2]  # all ten queued before the first call
    assert not any(on_main for _, on_main in calls)


def test_batch_gate_embeds_each_batch_in_one_encoder_call():
    batches = []

    def encode(texts):
        batches.append(list(texts))
        return np.asarray([[1.0, 1.0, 0.0]] * len(texts))

    async def go():
        bg = BatchGate(encode, gate())
        group = GroupSources(SOURCES, VECTORS)
        return await asyncio.gather(*(bg.judge(BOTH, group) for _ in range(6)))

    verdicts = asyncio.run(go())
    assert all(v.passed for v in verdicts)
    assert sum(len(b) for b in batches) == 6 and len(batches) <= 2
    assert batches[0][0] == embedding_text(BOTH["instruction"], BOTH["input"])


# -- the labelled set ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(shared_data):
    settings = load_settings(env={})
    cases = load_cases(shared_data)
    return cases, judge_cases(cases, settings.gate, settings.embed)


def test_labelled_set_covers_every_kind_over_real_records(labelled):
    cases, _ = labelled
    assert len(cases) >= 60
    kinds = Counter(c.kind for c in cases)
    assert set(kinds) == set(GOOD_KINDS) | set(BAD_KINDS) and len(set(kinds.values())) == 1
    assert {c.split for c in cases} == {"tune", "check"}
    assert len({s["id"] for c in cases for s in c.sources}) == 2 * len({c.group for c in cases})


def test_default_thresholds_are_the_ones_chosen_on_the_tune_split(labelled):
    cases, verdicts = labelled
    tune = [(c, v) for c, v in zip(cases, verdicts) if c.split == "tune"]
    chosen = choose_thresholds(tuple(c for c, _ in tune), [v for _, v in tune])
    defaults = GateSettings()
    for name, value in chosen.items():
        assert getattr(defaults, name) == pytest.approx(value, abs=0.005), name


@pytest.mark.parametrize("split", ["tune", "check"])
def test_gate_rejects_every_bad_case_and_accepts_nine_good_in_ten(labelled, split):
    cases, verdicts = labelled
    judged = [(c, v) for c, v in zip(cases, verdicts) if c.split == split]
    accepted_bad = [c.name for c, v in judged if not c.good and v.passed]
    good = [v.passed for c, v in judged if c.good]
    assert accepted_bad == []
    assert sum(good) >= 0.9 * len(good)


def test_each_bad_kind_fails_the_check_meant_for_it(labelled):
    cases, verdicts = labelled
    meant = {"drop_answer": {"output_coverage"}, "drop_request": {"request_coverage"},
             "single": {"request_coverage", "output_coverage"}, "copy": {"copy", "output_coverage"},
             "unrelated": {"source_similarity"}, "truncated": {"output_complete", "output_coverage"}}
    for case, verdict in zip(cases, verdicts):
        if not case.good:
            assert set(verdict.failed) & meant[case.kind], (case.name, verdict.failed)
            assert set(verdict.failed) <= set(CHECKS)
