"""The async merge client with the real ``openai`` client against a scripted loopback server."""
from __future__ import annotations

import asyncio
import email.utils
import json
import time

import pytest

from mergeit_spark.config import load_settings
from mergeit_spark.llm import client as client_mod
from mergeit_spark.llm.client import (Budget, MergeClient, Prices, RateLimits, extract_json_object,
                                      resolve_api_key, retry_after_seconds, validate_merged)
from mergeit_spark.llm.gate import GateResult
from mergeit_spark.llm.prompt import EXAMPLES_BEGIN, build_messages, parse_examples, prompt_hash

from fake_openai import FakeOpenAI, Reply, group_key

EXAMPLES = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat well, move every day and sleep enough."},
    {"instruction": "Explain why sleep is important.", "input": "",
     "output": "Sleep lets the body repair itself and the brain store memories."},
]
KEY = group_key(EXAMPLES)


@pytest.fixture(autouse=True)
def fresh_json_ladder():
    client_mod._LADDER_STEP.clear()
    yield
    client_mod._LADDER_STEP.clear()


def llm_settings(base_url: str, *extra: str):
    return load_settings(overrides=[
        f"llm.base_url={base_url}", "llm.request_timeout_s=5", "llm.max_retries=2",
        "llm.backoff_initial_s=0.01", "llm.backoff_max_s=5", *extra])


def merge_once(settings, examples=EXAMPLES, gate=None, budget=None):
    async def go():
        async with MergeClient(settings.llm, settings.merge, budget) as client:
            return await client.merge(examples, gate=gate)
    return asyncio.run(go())


def test_prompt_carries_examples_as_delimited_data_and_hash_is_stable():
    messages = build_messages(EXAMPLES)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert parse_examples(messages[-1]["content"]) == EXAMPLES
    for shot in (messages[2], messages[4]):  # demonstrations answer with the JSON shape asked for
        assert set(json.loads(shot["content"])) == {"instruction", "input", "output"}
    assert EXAMPLES_BEGIN in messages[0]["content"] and '"or"' in messages[0]["content"]
    h = prompt_hash(messages, "m", {"temperature": 0.25})
    assert h == prompt_hash(build_messages(EXAMPLES), "m", {"temperature": 0.25})
    assert h != prompt_hash(messages, "other", {"temperature": 0.25})
    assert h != prompt_hash(messages, "m", {"temperature": 0.3})
    assert h != prompt_hash(build_messages(EXAMPLES[::-1]), "m", {"temperature": 0.25})


def test_success_records_tokens_latency_and_sends_json_schema():
    with FakeOpenAI() as fake:
        result = merge_once(llm_settings(fake.base_url))
    assert result.status == "merged" and result.error is None
    assert result.attempts == 1 and fake.per_group[KEY] == 1
    assert result.prompt_tokens > 0 and result.completion_tokens > 0 and result.latency_ms > 0
    assert "Sleep lets the body" in result.output
    assert fake.response_formats == ["json_schema"]


def test_429_retry_after_seconds_is_honoured():
    def script(n, key, request):
        return Reply(kind="status", status=429, headers={"Retry-After": "1"}) if n == 1 else Reply()

    with FakeOpenAI(script) as fake:
        result = merge_once(llm_settings(fake.base_url))
    assert result.status == "merged" and result.attempts == 2
    assert [kind for _, _, kind in fake.requests] == ["status", "merge"]
    assert fake.times[1] - fake.times[0] >= 0.95  # backoff alone would have waited ~10 ms


def test_retry_after_http_date_and_cap():
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds({"Retry-After": date}, now=now) == pytest.approx(30, abs=1.5)
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    settings = llm_settings("http://127.0.0.1:9/v1", "llm.backoff_max_s=2")
    assert client_mod.backoff_delay(0, settings.llm, retry_after=30.0) == 2.0
    delays = [client_mod.backoff_delay(i, settings.llm) for i in range(12)]
    assert all(0 < d <= 2.0 for d in delays) and delays[0] <= 0.01


def test_5xx_is_retried_until_success():
    def script(n, key, request):
        return Reply(kind="status", status=500 if n == 1 else 502) if n <= 2 else Reply()

    with FakeOpenAI(script) as fake:
        result = merge_once(llm_settings(fake.base_url))
    assert result.status == "merged" and result.attempts == 3 and fake.count == 3


def test_5xx_forever_fails_after_max_retries():
    with FakeOpenAI(lambda n, k, r: Reply(kind="status", status=503)) as fake:
        result = merge_once(llm_settings(fake.base_url))
    assert result.status == "failed" and result.error.startswith("http_503")
    assert result.attempts == 3 and fake.count == 3  # 1 + llm.max_retries


def test_timeout_is_retried_then_fails():
    with FakeOpenAI(lambda n, k, r: Reply(kind="hang", delay_s=3)) as fake:
        settings = llm_settings(fake.base_url, "llm.request_timeout_s=0.4", "llm.max_retries=1")
        result = merge_once(settings)
    assert result.status == "failed" and result.error.startswith("timeout")
    assert result.attempts == 2 and fake.count == 2
    assert fake.times[1] - fake.times[0] >= 0.4  # the retry went out after the timeout, not before


def test_a_timed_out_request_keeps_its_whole_reservation():
    """A hosted API bills a request whose client gave up waiting: the budget keeps the worst case."""
    with FakeOpenAI(lambda n, k, r: Reply(kind="hang", delay_s=3)) as fake:
        settings = llm_settings(fake.base_url, "llm.request_timeout_s=0.3", "llm.max_retries=0",
                                "llm.max_tokens=500")
        budget = Budget(max_tokens=10_000, max_cost=1.0, prices=Prices(1.0, 1.0))

        async def go():
            async with MergeClient(settings.llm, settings.merge, budget) as client:
                return await client.merge([{"instruction": "Say a", "input": "", "output": "a"},
                                           {"instruction": "Say b", "input": "", "output": "b"}])

        result = asyncio.run(go())
    assert result.error.startswith("timeout") and fake.count == 1
    assert budget.reserved == 0 and budget.tokens > 500 and budget.cost == pytest.approx(budget.tokens / 1e6)


def test_timeout_then_success():
    script = lambda n, k, r: Reply(kind="hang", delay_s=3) if n == 1 else Reply()  # noqa: E731
    with FakeOpenAI(script) as fake:
        result = merge_once(llm_settings(fake.base_url, "llm.request_timeout_s=0.4"))
    assert result.status == "merged" and result.attempts == 2


def test_connection_drop_and_malformed_body_are_retried():
    replies = {1: Reply(kind="close"), 2: Reply(kind="malformed")}
    with FakeOpenAI(lambda n, k, r: replies.get(n, Reply())) as fake:
        result = merge_once(llm_settings(fake.base_url))
    assert result.status == "merged" and result.attempts == 3


def test_malformed_body_forever_fails():
    with FakeOpenAI(lambda n, k, r: Reply(kind="malformed")) as fake:
        result = merge_once(llm_settings(fake.base_url, "llm.max_retries=1"))
    assert result.status == "failed" and result.error.startswith("malformed_response")
    assert result.attempts == 2


def test_bad_request_is_not_retried():
    with FakeOpenAI(lambda n, k, r: Reply(kind="status", status=400, message="bad model")) as fake:
        result = merge_once(llm_settings(fake.base_url, "llm.json_mode=none"))
    assert result.status == "failed" and result.error == "http_400: bad model"
    assert result.attempts == 1


@pytest.mark.parametrize("content", [
    "Sure! Here it is:\n```json\n{\"instruction\": \"Do A and B.\", \"input\": \"\", \"output\": \"A. B.\"}\n```\nHope it helps.",
    "  {\"instruction\": \"Do A and B.\", \"input\": \"\", \"output\": \"A. B.\"}\n",
])
def test_one_object_or_one_fenced_block_is_read(content):
    with FakeOpenAI(lambda n, k, r: Reply(kind="content", content=content)) as fake:
        result = merge_once(llm_settings(fake.base_url))
    assert result.status == "merged"
    assert (result.instruction, result.input, result.output) == ("Do A and B.", "", "A. B.")


@pytest.mark.parametrize("content, why", [
    ("{\"instruction\": \"Do A and B.\", \"input\": \"\", \"output\": \"A. B.\"} trailing words",
     "text after its JSON object"),
    ("Noise {not json} then {\"instruction\": \"Do A and B.\", \"output\": \"A. B.\"}",
     "text before its JSON object"),
])
def test_an_object_amid_other_text_is_not_taken(content, why):
    with FakeOpenAI(lambda n, k, r: Reply(kind="content", content=content)) as fake:
        result = merge_once(llm_settings(fake.base_url, "merge.regenerations=0"))
    assert result.status == "failed" and result.error.startswith("invalid_output") and why in result.error


def test_schema_violation_is_regenerated_then_fails():
    bad = json.dumps({"instruction": 5, "input": "", "output": "x"})
    with FakeOpenAI(lambda n, k, r: Reply(kind="content", content=bad)) as fake:
        settings = llm_settings(fake.base_url, "merge.regenerations=2")
        result = merge_once(settings)
        feedback = fake.last_messages[-1]["content"]
    assert result.status == "failed" and result.error == "invalid_output: 'instruction' is not a string"
    assert result.attempts == 3 and fake.per_group[KEY] == 3
    assert "rejected" in feedback and fake.last_messages[-2]["content"] == bad


def test_invalid_output_then_valid_is_merged():
    replies = {1: Reply(kind="content", content="I cannot do that."),
               2: Reply(kind="content", content=json.dumps({"instruction": "x", "input": "", "output": ""}))}
    with FakeOpenAI(lambda n, k, r: replies.get(n, Reply())) as fake:
        result = merge_once(llm_settings(fake.base_url, "merge.regenerations=2"))
    assert result.status == "merged" and result.attempts == 3


def test_validation_rules():
    ok, _ = validate_merged('{"instruction": "a", "input": "", "output": "b"}', 10)
    assert ok == {"instruction": "a", "input": "", "output": "b"}
    assert validate_merged('{"instruction": "a", "output": "b"}', 10)[0]["input"] == ""
    assert validate_merged('{"instruction": "", "input": "", "output": "b"}', 10)[1] == "'instruction' is empty"
    assert validate_merged('{"instruction": "a", "input": "", "output": "bbbbbbbbbbbb"}', 10)[1] == \
        "'output' longer than 10 characters"
    assert validate_merged('[1, 2]', 10)[1] == "reply is not a JSON object"
    assert extract_json_object('{"a": {"b": 1}}') == {"a": {"b": 1}}
    assert extract_json_object('x {"a": {"b": 1}} y') is None    # the first object found is not taken


def test_auto_json_mode_falls_back_and_remembers():
    with FakeOpenAI(refuse_json_schema=True) as fake:
        settings = llm_settings(fake.base_url)
        first = merge_once(settings)
        second = merge_once(settings)
    assert first.status == "merged" and first.attempts == 2   # refusal + the real answer
    assert second.status == "merged" and second.attempts == 1
    assert fake.response_formats == ["json_schema", "json_object", "json_object"]


def test_explicit_schema_mode_does_not_fall_back():
    with FakeOpenAI(refuse_json_schema=True) as fake:
        result = merge_once(llm_settings(fake.base_url, "llm.json_mode=schema", "llm.max_retries=0"))
    assert result.status == "failed" and result.error.startswith("http_500")


def test_gate_regeneration_then_gate_failed_keeps_candidate():
    calls = []

    async def gate(merged):
        calls.append(merged)
        return GateResult(passed=False, failed=["copy"], copy_of=0)

    with FakeOpenAI() as fake:
        result = merge_once(llm_settings(fake.base_url, "merge.gate_regenerations=1"), gate=gate)
        feedback = fake.last_messages[-1]["content"]
    assert result.status == "gate_failed" and result.error == "gate: copy"
    assert result.attempts == 2 and len(calls) == 2
    assert result.output and json.loads(result.gate)["failed"] == ["copy"]
    assert "repeats one example" in feedback


def test_gate_pass_after_regeneration():
    verdicts = iter([GateResult(passed=False, failed=["output_length"]), GateResult(passed=True)])

    async def gate(merged):
        return next(verdicts)

    with FakeOpenAI() as fake:
        result = merge_once(llm_settings(fake.base_url, "merge.gate_regenerations=2"), gate=gate)
    assert result.status == "merged" and result.attempts == 2


def test_concurrency_is_bounded_and_used():
    groups = [[{"instruction": f"Task {i} a", "input": "", "output": "x"},
               {"instruction": f"Task {i} b", "input": "", "output": "y"}] for i in range(12)]

    with FakeOpenAI(latency_s=0.2) as fake:
        settings = llm_settings(fake.base_url, "llm.concurrency=3")

        async def go():
            async with MergeClient(settings.llm, settings.merge) as client:
                return await asyncio.gather(*(client.merge(g) for g in groups))

        results = asyncio.run(go())
    assert all(r.status == "merged" for r in results)
    assert fake.max_in_flight == 3  # three at once were used, never more


def test_retry_after_holds_back_every_request_of_the_loop():
    first = group_key([{"instruction": "Task 0 a"}, {"instruction": "Task 0 b"}])

    def script(n, key, request):  # the first group's first request is told to wait a second
        return Reply(kind="status", status=429, headers={"Retry-After": "1"}) if n == 1 else Reply()

    groups = [[{"instruction": f"Task {i} a", "input": "", "output": "x"},
               {"instruction": f"Task {i} b", "input": "", "output": "y"}] for i in range(3)]
    with FakeOpenAI(script) as fake:
        settings = llm_settings(fake.base_url, "llm.concurrency=4")

        async def go():
            async with MergeClient(settings.llm, settings.merge) as client:
                head = asyncio.create_task(client.merge(groups[0]))
                await asyncio.sleep(0.2)  # the 429 is in by now; the others must wait it out
                return [await head] + list(await asyncio.gather(*(client.merge(g) for g in groups[1:])))

        results = asyncio.run(go())
    assert [r.status for r in results] == ["merged"] * 3
    assert fake.requests[0][1] == first and fake.requests[0][2] == "status"
    assert min(fake.times[1:]) - fake.times[0] >= 0.95


def test_rate_limits_space_requests_and_tokens():
    async def timed(limits, amounts):
        loop = asyncio.get_running_loop()
        started, stamps = loop.time(), []
        for amount in amounts:
            await limits.acquire(amount)
            stamps.append(loop.time() - started)
        return stamps

    # 4 requests a "minute" of one second: four at once, then one every quarter second
    stamps = asyncio.run(timed(RateLimits(requests_per_minute=4, period_s=1.0), [1] * 6))
    assert stamps[3] < stamps[5] and stamps[5] >= 0.45
    # 100 tokens a second: 60 + 60 cannot both go at once
    stamps = asyncio.run(timed(RateLimits(tokens_per_minute=100, period_s=1.0), [60, 60]))
    assert stamps[1] >= 0.15
    # a request larger than the whole allowance still goes (after the allowance drains)
    assert asyncio.run(timed(RateLimits(tokens_per_minute=100, period_s=1.0), [500]))


def test_the_jobs_rate_limits_are_shared_by_the_loops_that_run_at_once():
    settings = llm_settings("http://127.0.0.1:9/v1", "llm.requests_per_minute=600",
                            "llm.tokens_per_minute=90000")
    share = RateLimits.share(settings.llm, loops=3)
    assert (share.requests_per_minute, share.tokens_per_minute) == (200, 30000)
    assert RateLimits.share(settings.llm, loops=0).requests_per_minute == 600

    async def go():
        async with MergeClient(settings.llm, settings.merge, loops=4) as client:
            return client._limits.requests_per_minute
    assert asyncio.run(go()) == 150


def test_budget_caps_requests_and_marks_the_rest():
    groups = [[{"instruction": f"Task {i} a", "input": "", "output": "x"},
               {"instruction": f"Task {i} b", "input": "", "output": "y"}] for i in range(5)]
    with FakeOpenAI() as fake:
        settings = llm_settings(fake.base_url, "llm.concurrency=1")
        budget = Budget(max_requests=3)

        async def go():
            async with MergeClient(settings.llm, settings.merge, budget) as client:
                return await asyncio.gather(*(client.merge(g) for g in groups))

        results = asyncio.run(go())
    assert fake.count == 3
    assert [r.status for r in results].count("merged") == 3
    assert [r.error for r in results if r.status == "failed"] == ["budget_exhausted"] * 2


def test_token_budget_reserves_worst_case():
    budget = Budget(max_tokens=1000)
    held = budget.reserve(300, 500)
    assert held.total == 800
    assert budget.reserve(300, 500) is None and budget.exhausted
    budget.settle(held, 100, 20)
    assert budget.reserve(300, 500).total == 800 and budget.tokens == 120


def test_money_budget_prices_prompt_and_completion_apart():
    """At 2 per million prompt tokens and 10 per million completion tokens, a request of 300 +
    500 reserves 0.0056; the cap admits what fits and counts what the server said was used."""
    prices = Prices(input_per_million=2.0, output_per_million=10.0)
    assert prices.cost(300, 500) == pytest.approx(0.0056)
    assert prices.cost(0, 0, unsplit_tokens=100) == pytest.approx(0.001)  # old lines: the higher rate
    budget = Budget(max_cost=0.01, prices=prices)
    held = budget.reserve(300, 500)
    assert held is not None and budget.reserve(300, 500) is None and budget.exhausted
    budget.settle(held, 280, 40)            # 0.00056 + 0.0004
    assert budget.cost == pytest.approx(0.00096) and budget.reserved_cost == pytest.approx(0.0)
    assert budget.reserve(300, 500) is not None                    # 0.00096 + 0.0056 fits 0.01
    assert budget.reserve(300, 500) is None                        # one more would not
    budget.grant(cost=0.01)
    assert budget.reserve(300, 500) is not None


def test_api_key_sources_and_scrubbing(tmp_path, monkeypatch):
    settings = llm_settings("http://127.0.0.1:9/v1", "llm.api_key_env=TEST_MERGE_KEY",
                            f"llm.api_key_file={tmp_path / 'key'}")
    monkeypatch.delenv("TEST_MERGE_KEY", raising=False)
    assert resolve_api_key(settings.llm) == "not-needed"
    (tmp_path / "key").write_text("file-secret\n")
    assert resolve_api_key(settings.llm) == "file-secret"
    monkeypatch.setenv("TEST_MERGE_KEY", "env-secret-123")
    assert resolve_api_key(settings.llm) == "env-secret-123"

    echo = lambda n, k, r: Reply(kind="status", status=401, message="bad key env-secret-123")  # noqa: E731
    with FakeOpenAI(echo) as fake:
        settings.llm.base_url = fake.base_url
        result = merge_once(settings)
    assert result.status == "failed" and "env-secret-123" not in result.error and "***" in result.error


def test_gate_text_matches_the_embed_stage():
    import pyarrow as pa

    from mergeit_spark.llm.gate import embedding_text
    from mergeit_spark.stages.embed import record_texts
    pairs = [("Do this.", ""), ("Sort", "3, 1, 2"), ("  padded ", None)]
    expected = record_texts(pa.array([p[0] for p in pairs]), pa.array([p[1] for p in pairs])).to_pylist()
    assert [embedding_text(*p) for p in pairs] == expected
