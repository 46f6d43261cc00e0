"""Batch mode (``llm.mode=batch``): the chain walk, the driver's book of batches against the
scripted Files + Batch server (real sockets, the real openai client), and the merge stage on
local Spark with faults: failed lines, expiry with partial output, a slow batch, 500s on poll, a
run killed while polling, a budget. Nothing is paid twice; every group ends with a status."""
from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from mergeit_spark import fs
from mergeit_spark.config import load_settings
from mergeit_spark.llm import batch as batch_mod
from mergeit_spark.llm.batch import BATCHES_DIR, BatchBook, Stager, custom_id, parse_custom_id, walk_chain
from mergeit_spark.llm.ledger import ledger_bucket, read_bucket
from mergeit_spark.llm.spend import Prices
from mergeit_spark.stages import StageError
from mergeit_spark.stages.merge import LEDGER_DIR, ledger_spend

from fake_batches import FakeBatchServer
from fake_openai import Reply, merged_content
from test_merge_stage import merges_rows, run, small_inputs, stage_settings

EXAMPLES = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Add 4 and 4.", "input": "", "output": "8"}]
BASE = [{"role": "user", "content": "merge these"}]


@pytest.fixture(scope="module")
def inputs(spark, shared_data):
    return small_inputs(spark, shared_data)


def _llm(**kw):
    settings = load_settings(overrides=[f"llm.{k}={v}" for k, v in kw.items()])
    return settings.llm, settings.merge


def _reply(step: int, stage: str, status=200, content=None, not_run=False, chain="c0"):
    cid = custom_id("g1", "h1", chain, step, stage)
    return {"batch_reply": cid, **parse_custom_id(cid), "status_code": None if not_run else status,
            "content": content, "not_run": not_run, "prompt_tokens": 0 if not_run else 10,
            "completion_tokens": 0 if not_run else 5,
            "error": None if status == 200 else f"http_{status}: scripted"}


def walk(replies, **kw):
    llm, merge = _llm(**kw)
    return asyncio.run(walk_chain(replies, BASE, llm, merge, None))


# -- the walk -----------------------------------------------------------------------------------------
def test_custom_ids_round_trip_even_with_a_bar_in_the_group_id():
    cid = custom_id("a|b", "0" * 32, "run1p0", 2, "run1p3")
    assert parse_custom_id(cid) == {"group_id": "a|b", "request_hash": "0" * 32, "chain": "run1p0",
                                    "step": 2, "stage": "run1p3"}
    assert parse_custom_id("garbage") is None


def test_a_group_without_replies_needs_its_first_request():
    step = walk([])
    assert (step.result, step.chain, step.step, step.messages) == (None, None, 0, BASE)


def test_a_valid_reply_is_merged_with_what_the_chain_paid():
    good = merged_content(EXAMPLES)
    step = walk([_reply(0, "p0", status=500), _reply(0, "p1", content=good)], max_retries=2)
    assert step.result.status == "merged" and step.chain == "c0"
    assert (step.result.attempts, step.result.prompt_tokens, step.result.completion_tokens) == (2, 20, 10)
    assert json.loads(good)["output"] == step.result.output


def test_an_invalid_reply_is_regenerated_with_the_reply_and_the_reason():
    step = walk([_reply(0, "p0", content="not json at all")])
    assert step.result is None and step.step == 1 and step.chain == "c0"
    assert step.messages[:1] == BASE and step.messages[1] == {"role": "assistant", "content": "not json at all"}
    assert "could not be used" in step.messages[2]["content"]
    final = walk([_reply(0, "p0", content="no"), _reply(1, "p1", content="no"), _reply(2, "p2", content="no")])
    assert final.result.status == "failed" and final.result.error.startswith("invalid_output")
    assert final.result.attempts == 3


def test_retries_stop_at_max_retries_and_requests_never_run_are_sent_again_uncounted():
    step = walk([_reply(0, "p0", status=503), _reply(0, "p1", not_run=True)], max_retries=1)
    assert step.result is None and step.step == 0                      # one retry left
    over = walk([_reply(0, "p0", status=503), _reply(0, "p1", status=429)], max_retries=1)
    assert over.result.status == "failed" and over.result.error.startswith("http_429")
    refused = walk([_reply(0, "p0", status=400)])
    assert refused.result.error.startswith("http_400") and refused.result.attempts == 1
    cut = walk([dict(_reply(0, "p0", content="{"), finish_reason="length")])
    assert cut.result.error.startswith("truncated")


# -- the book -----------------------------------------------------------------------------------------
def _stage_file(ledger_root, name: str, keys: list[str], llm) -> list[str]:
    stager = Stager(ledger_root / BATCHES_DIR / name, 0, llm)
    cids = []
    for i, key in enumerate(keys):
        cid = custom_id(f"g{i}", "h", name, 0, name)
        stager.add(cid, {"model": "m", "messages": [{"role": "user", "content": key}]})
        cids.append(cid)
    stager.close()
    return cids


def _answers(ledger_root, cids):
    found = {}
    for cid in cids:
        state = read_bucket(ledger_root, ledger_bucket(parse_custom_id(cid)["group_id"]))
        for replies in state.replies.values():
            found.update({k: v for k, v in replies.items() if k == cid})
    return found


def test_the_book_submits_polls_through_500s_and_folds_each_answer_once(tmp_path):
    root = fs.resolve(str(tmp_path / "ledger"))
    with FakeBatchServer(polls_to_complete=3, poll_failures=2) as fake:
        llm, _ = _llm(base_url=fake.base_url, batch_poll_s=0.01, max_retries=0, batch_max_requests=3)
        cids = _stage_file(root, "p0", [f"q{i}" for i in range(7)], llm)
        book = BatchBook(root, llm)
        assert book.submit(root / BATCHES_DIR / "p0") == 3 == len(fake.created_batches)   # 3 + 3 + 1 lines
        assert book.wait() == 0
        answers = _answers(root, cids)
        assert set(answers) == set(cids) and all(a["status_code"] == 200 for a in answers.values())
        assert sum(fake.lines_answered.values()) == 7 and fake.retrieves >= 3 + 2 + 2
        assert {s.state for s in book.submissions()} == {"done"}
        assert book.resume() == 0 and len(fake.created_batches) == 3          # nothing left to do


def test_expiry_keeps_the_answers_and_voids_the_rest(tmp_path):
    root = fs.resolve(str(tmp_path / "ledger"))
    with FakeBatchServer(expire_after_lines=2) as fake:
        llm, _ = _llm(base_url=fake.base_url, batch_poll_s=0.01)
        cids = _stage_file(root, "p0", ["a", "b", "c", "d"], llm)
        book = BatchBook(root, llm)
        book.submit(root / BATCHES_DIR / "p0")
        book.wait()
    answers = _answers(root, cids)
    assert [answers[c].get("not_run", False) for c in cids] == [False, False, True, True]
    assert answers[cids[3]]["error"].startswith("batch_expired")
    spent = ledger_spend_lines(root)
    assert spent["void"] == set(cids[2:]) and spent["settled"] == set(cids[:2])


def ledger_spend_lines(root):
    voids, settled = set(), set()
    for bucket in range(256):
        state = read_bucket(root, bucket)
        voids |= state.voided
        settled |= set(state.settled) - state.voided
    return {"void": voids, "settled": settled}


def test_a_batch_created_but_not_recorded_is_adopted_not_created_again(tmp_path):
    """A run killed between creating a batch and recording its id: the next run finds the batch
    by the submission's name in its metadata."""
    root = fs.resolve(str(tmp_path / "ledger"))
    with FakeBatchServer() as fake:
        llm, _ = _llm(base_url=fake.base_url, batch_poll_s=0.01)
        cids = _stage_file(root, "p0", ["a", "b"], llm)
        book = BatchBook(root, llm)
        sub = book.submissions()[0]
        real_save = sub.save

        def killed_after_create(**changes):
            if changes.get("state") == "submitted":
                raise KeyboardInterrupt   # the kill: the batch exists, its id is not recorded
            real_save(**changes)
        sub.save = killed_after_create
        with pytest.raises(KeyboardInterrupt):
            book._submit(sub)
        assert len(fake.created_batches) == 1 and book.submissions()[0].state == "uploaded"
        again = BatchBook(root, llm)
        assert again.resume() == 0
        assert again.stats.adopted == 1 and len(fake.created_batches) == 1
        assert set(_answers(root, cids)) == set(cids) and sum(fake.lines_answered.values()) == 2


def test_files_staged_but_never_submitted_are_abandoned_and_their_spends_voided(tmp_path):
    root = fs.resolve(str(tmp_path / "ledger"))
    with FakeBatchServer() as fake:
        llm, _ = _llm(base_url=fake.base_url, batch_poll_s=0.01)
        cids = _stage_file(root, "p0", ["a", "b"], llm)
        (root / BATCHES_DIR / "p0" / "part-00000-000.json").delete()     # killed before its record
        book = BatchBook(root, llm)
        assert book.resume() == 0 and book.stats.abandoned == 1 and not fake.created_batches
    assert ledger_spend_lines(root)["void"] == set(cids)


# -- the stage ----------------------------------------------------------------------------------------
def batch_settings(base_url, *extra):
    return stage_settings(base_url, "llm.mode=batch", "llm.batch_poll_s=0.01", *extra)


def test_batch_run_gives_every_group_a_status_and_a_rerun_sends_nothing(spark, store, inputs):
    n_groups = len(inputs[3])
    with FakeBatchServer(polls_to_complete=2, poll_failures=1) as fake:
        first = run(spark, store, batch_settings(fake.base_url, *PRICES), inputs)
        rows = merges_rows(store)
        assert len(rows) == n_groups and {r["status"] for r in rows} <= {"merged", "gate_failed"}
        assert first.requests == fake.count == sum(fake.lines_answered.values()) >= n_groups
        assert max(fake.lines_answered.values()) == 1 and first.batches["submitted"] == len(fake.created_batches)
        assert sum(r["attempts"] for r in rows) == first.requests
        billed = sum(r["prompt_tokens"] for r in rows), sum(r["completion_tokens"] for r in rows)
        assert (first.prompt_tokens, first.completion_tokens) == billed
        assert first.cost == pytest.approx(Prices(3, 15).cost(*billed) * 0.5
                                           + Prices(3, 15).cost(first.preflight_tokens, 0), rel=1e-3)
        batches = len(fake.created_batches)
        again = run(spark, store, batch_settings(fake.base_url, *PRICES), inputs)
        assert again.requests == 0 and len(fake.created_batches) == batches and fake.count == first.requests


PRICES = ("llm.price_input_per_million=3", "llm.price_output_per_million=15", "llm.price_batch_discount=0.5")


class _FlakyFirstTries:
    """Script: a group's first request answers 503 and its second an invalid reply (both go to a
    later batch), the third merges: every group walks a retry and a regeneration."""

    def __init__(self):
        self.tries = Counter()

    def __call__(self, n, key, request):
        self.tries[key] += 1
        if self.tries[key] == 1:
            return Reply(kind="status", status=503)
        if self.tries[key] == 2:
            return Reply(kind="content", content="I cannot do that.")
        return Reply()


def test_failed_lines_and_invalid_replies_go_to_later_batches_paid_once(spark, store, inputs):
    n_groups = len(inputs[3])
    script = _FlakyFirstTries()
    with FakeBatchServer(script) as fake:
        summary = run(spark, store, batch_settings(fake.base_url, "llm.max_retries=1"), inputs)
    rows = merges_rows(store)
    assert {r["status"] for r in rows} <= {"merged", "gate_failed"} and len(rows) == n_groups
    assert all(r["attempts"] == 3 for r in rows) and summary.requests == 3 * n_groups == fake.count
    assert len(fake.created_batches) == 3 * 2            # three passes sent, two partitions each
    assert max(fake.lines_answered.values()) == 1        # every line answered once: none sent twice
    last = [line for b in fake.created_batches[4:] for line in fake.batches[b]["lines"]]
    assert len(last) == n_groups and all(line["body"]["messages"][-2] == {
        "role": "assistant", "content": "I cannot do that."} for line in last)   # regenerations


def test_expired_batch_resends_only_what_it_did_not_answer(spark, store, inputs):
    n_groups = len(inputs[3])
    with FakeBatchServer(expire_after_lines=2) as fake:
        summary = run(spark, store, batch_settings(fake.base_url, "merge.partitions=1"), inputs)
        first = fake.created_batches[0]
        assert fake.batches[first]["status"] == "expired"
    rows = merges_rows(store)
    assert len(rows) == n_groups and {r["status"] for r in rows} <= {"merged", "gate_failed"}
    assert summary.requests == n_groups == fake.count and max(fake.per_group.values()) == 1
    assert len(fake.created_batches) == -(-n_groups // 2)   # 2 answered per batch, the rest sent again


def test_a_run_killed_while_polling_is_resumed_without_a_new_batch(spark, store, inputs, monkeypatch):
    n_groups = len(inputs[3])
    with FakeBatchServer(polls_to_complete=1000) as fake:
        real_poll = batch_mod.BatchBook._poll

        def killed(self, sub):
            real_poll(self, sub)
            raise KeyboardInterrupt   # the driver dies while the batches run
        monkeypatch.setattr(batch_mod.BatchBook, "_poll", killed)
        with pytest.raises(KeyboardInterrupt):
            run(spark, store, batch_settings(fake.base_url), inputs)
        monkeypatch.setattr(batch_mod.BatchBook, "_poll", real_poll)
        submitted, preflights = list(fake.created_batches), fake.preflights
        assert submitted and fake.count < n_groups
        with pytest.raises(StageError, match="still open"):   # online now would pay those groups again
            run(spark, store, stage_settings(fake.base_url), inputs)
        assert fake.preflights == preflights
        fake.polls_to_complete = 1
        summary = run(spark, store, batch_settings(fake.base_url), inputs)
        assert fake.created_batches == submitted            # polled again, none created
        assert summary.requests == 0                        # paid by the killed run
    rows = merges_rows(store)
    assert len(rows) == n_groups and {r["status"] for r in rows} <= {"merged", "gate_failed"}
    assert fake.count == n_groups and max(fake.per_group.values()) == 1


def test_a_stop_while_polling_ends_pending_then_the_next_run_finishes(spark, store, inputs):
    n_groups = len(inputs[3])
    ledger = fs.resolve(str(store.root)) / LEDGER_DIR
    with FakeBatchServer(polls_to_complete=1000) as fake:
        real_retrieve = fake._retrieve

        def retrieve_then_stop(*args):
            from mergeit_spark.llm.stop import ask_stop
            ask_stop(ledger)                                 # `mergeit stop` from another shell
            return real_retrieve(*args)
        fake._retrieve = retrieve_then_stop
        stopped = run(spark, store, batch_settings(fake.base_url), inputs)
        assert stopped.stopped and stopped.by_status == {"failed": n_groups}
        assert stopped.errors == {"batch_pending": n_groups} and fake.count < n_groups
        fake._retrieve = real_retrieve
        fake.polls_to_complete = 1
        batches = list(fake.created_batches)
        done = run(spark, store, batch_settings(fake.base_url), inputs)
        assert fake.created_batches == batches and not done.stopped
    assert {r["status"] for r in merges_rows(store)} <= {"merged", "gate_failed"}
    assert max(fake.per_group.values()) == 1


def test_a_request_cap_holds_in_batch_mode_and_a_higher_cap_finishes(spark, store, inputs):
    n_groups = len(inputs[3])
    ledger = fs.resolve(str(store.root)) / LEDGER_DIR
    with FakeBatchServer() as fake:
        capped = run(spark, store, batch_settings(fake.base_url, "merge.max_requests=5", "llm.preflight=false"),
                     inputs)
        assert capped.requests == fake.count <= 5 and capped.budget_exhausted == n_groups - fake.count
        assert ledger_spend(spark, ledger).requests == fake.count
        rest = run(spark, store, batch_settings(fake.base_url, "merge.max_requests=100", "llm.preflight=false"),
                   inputs)
    assert rest.requests == n_groups - capped.requests and fake.count == n_groups
    assert max(fake.per_group.values()) == 1


def test_a_batch_that_fails_validation_runs_nothing_and_is_sent_again_by_the_next_pass(tmp_path):
    root = fs.resolve(str(tmp_path / "ledger"))
    with FakeBatchServer(fail_batches=1) as fake:
        llm, _ = _llm(base_url=fake.base_url, batch_poll_s=0.01)
        cids = _stage_file(root, "p0", ["a", "b"], llm)
        book = BatchBook(root, llm)
        book.submit(root / BATCHES_DIR / "p0")
        assert book.wait() == 0 and book.stats.by_status == {"failed": 1} and book.stats.answered == 0
    answers = _answers(root, cids)
    assert all(a["not_run"] and a["error"].startswith("batch_failed") for a in answers.values())
    assert ledger_spend_lines(root)["void"] == set(cids) and fake.count == 0
    step = walk(list(answers.values())[:1])
    assert step.result is None and step.step == 0          # the group's request is staged again
