"""The scripted Files + Batch server (``fake_batches``) driven by the real ``openai`` client."""
from __future__ import annotations

import json

import openai
import pytest

from mergeit_spark.llm.prompt import build_messages

from fake_batches import FakeBatchServer
from fake_openai import Faults, Reply, group_key

CHAT = "/v1/chat/completions"


def group(i: int) -> list[dict]:
    return [{"instruction": f"Task {i}, part one.", "input": "", "output": f"Answer {i}.1"},
            {"instruction": f"Task {i}, part two.", "input": "", "output": f"Answer {i}.2"}]


def batch_line(i: int) -> dict:
    return {"custom_id": f"g{i}", "method": "POST", "url": CHAT,
            "body": {"model": "fake-model", "messages": build_messages(group(i))}}


def jsonl(items: list[dict]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def client_for(fake: FakeBatchServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)


def submit(client: openai.OpenAI, n_lines: int, metadata: dict | None = None):
    uploaded = client.files.create(file=("in.jsonl", jsonl([batch_line(i) for i in range(n_lines)])),
                                   purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                 completion_window="24h", metadata=metadata)


def download(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_upload_create_poll_and_download_output():
    with FakeBatchServer() as fake:
        client = client_for(fake)
        data = jsonl([batch_line(i) for i in range(3)])
        uploaded = client.files.create(file=("in.jsonl", data), purpose="batch")
        assert (uploaded.purpose, uploaded.bytes, uploaded.status) == ("batch", len(data), "processed")
        assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
        assert client.files.content(uploaded.id).read() == data
        created = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                        completion_window="24h", metadata={"run": "r1"})
        assert created.status == "validating" and created.metadata == {"run": "r1"}
        done = client.batches.retrieve(created.id)
        out = download(client, done.output_file_id)
    assert done.status == "completed" and done.error_file_id is None
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 3, 0)
    assert [line["custom_id"] for line in out] == ["g0", "g1", "g2"]
    for i, line in enumerate(out):
        assert line["error"] is None and line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        assert response["body"]["usage"]["total_tokens"] > 0
        merged = json.loads(response["body"]["choices"][0]["message"]["content"])
        assert f"Answer {i}.2" in merged["output"]
    assert fake.count == 3 and fake.served_ok == {group_key(group(i)): 1 for i in range(3)}
    assert fake.lines_answered == {"g0": 1, "g1": 1, "g2": 1}
    assert fake.created_batches == [created.id] and fake.retrieves == 1
    assert fake.batches[created.id]["line_count"] == 3 and fake.files[uploaded.id]["bytes"] == data
    assert fake.output_lines(created.id) == out


def test_chat_and_models_are_still_served():
    with FakeBatchServer() as fake:
        client = client_for(fake)
        assert [m.id for m in client.models.list()] == ["fake-model"]
        reply = client.chat.completions.create(model="fake-model",
                                               messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "OK" and fake.preflights == 1 and fake.count == 0


def test_scripted_failures_land_in_the_error_file_with_their_status():
    replies = {group_key(group(1)): Reply(kind="status", status=500),
               group_key(group(2)): Reply(kind="status", status=429, message="slow down"),
               group_key(group(3)): Reply(kind="malformed"),
               group_key(group(4)): Reply(kind="hang", delay_s=30)}
    with FakeBatchServer(lambda n, key, request: replies.get(key, Reply())) as fake:
        client = client_for(fake)
        done = client.batches.retrieve(submit(client, 5).id)
        out, errors = download(client, done.output_file_id), download(client, done.error_file_id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 3)
    assert [line["custom_id"] for line in out] == ["g0", "g4"]   # a hang is answered normally
    assert {line["custom_id"]: line["response"]["status_code"] for line in errors} == {
        "g1": 500, "g2": 429, "g3": 500}
    assert errors[1]["response"]["body"]["error"]["message"] == "slow down"
    assert [kind for _, _, kind in fake.requests] == ["merge", "status", "status", "malformed", "hang"]


def test_faults_script_answers_every_line_as_chat_would():
    faults, drawn = Faults(rate=1.0, seed=3), []

    def script(n, key, request):
        drawn.append(faults(n, key, request))
        return drawn[-1]

    with FakeBatchServer(script) as fake:
        client = client_for(fake)
        done = client.batches.retrieve(submit(client, 8).id)
        lines = download(client, done.output_file_id) + download(client, done.error_file_id)
    got = {line["custom_id"]: line["response"]["status_code"] for line in lines}
    want = [r.status if r.kind == "status" else 500 if r.kind == "malformed" else 200 for r in drawn]
    assert [got[f"g{i}"] for i in range(8)] == want and sum(faults.injected.values()) == 8
    assert done.request_counts.failed == sum(status != 200 for status in want)


def test_expiry_keeps_the_first_answers_and_never_runs_the_rest():
    with FakeBatchServer(expire_after_lines=2) as fake:
        client = client_for(fake)
        done = client.batches.retrieve(submit(client, 5).id)
        out, errors = download(client, done.output_file_id), download(client, done.error_file_id)
    assert done.status == "expired" and done.expired_at is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 3)
    assert [line["custom_id"] for line in out] == ["g0", "g1"]
    assert [line["custom_id"] for line in errors] == ["g2", "g3", "g4"]
    assert all(line["response"] is None and line["error"]["code"] == "batch_expired" for line in errors)
    assert fake.lines_answered == {"g0": 1, "g1": 1} and fake.count == 2


def test_a_slow_batch_shows_in_progress_with_partial_counts():
    now = [100.0]
    with FakeBatchServer(polls_to_complete=3, clock=lambda: now[0]) as fake:
        client = client_for(fake)
        batch_id = submit(client, 6).id
        first, second = client.batches.retrieve(batch_id), client.batches.retrieve(batch_id)
        fake.seconds_to_complete = 60
        waiting = client.batches.retrieve(batch_id)
        now[0] += 61
        done = client.batches.retrieve(batch_id)
    assert [b.status for b in (first, second, waiting, done)] == ["in_progress"] * 3 + ["completed"]
    assert [b.request_counts.completed for b in (first, second, done)] == [2, 4, 6]
    assert fake.lines_answered == {f"g{i}": 1 for i in range(6)}


def test_poll_failures_raise_500_then_retrieve_normally():
    with FakeBatchServer(poll_failures=1) as fake:
        client = client_for(fake)
        batch_id = submit(client, 1).id
        with pytest.raises(openai.InternalServerError):
            client.batches.retrieve(batch_id)
        assert client.batches.retrieve(batch_id).status == "completed"
    assert fake.retrieves == 2 and fake.poll_failures == 0


def test_cancel_keeps_answered_lines_and_lists_the_rest():
    with FakeBatchServer(polls_to_complete=4) as fake:
        client = client_for(fake)
        batch_id = submit(client, 4).id
        assert client.batches.retrieve(batch_id).request_counts.completed == 1
        assert client.batches.cancel(batch_id).status == "cancelling"
        done = client.batches.retrieve(batch_id)
        out, errors = download(client, done.output_file_id), download(client, done.error_file_id)
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch_id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert [line["custom_id"] for line in out] == ["g0"]
    assert [line["error"]["code"] for line in errors] == ["batch_cancelled"] * 3
    assert fake.lines_answered == {"g0": 1}


def test_list_is_newest_first_and_paginates_with_metadata():
    with FakeBatchServer() as fake:
        client = client_for(fake)
        ids = [submit(client, 1, metadata={"i": str(i)}).id for i in range(5)]
        first_page = client.batches.list(limit=2)
        listed = list(client.batches.list(limit=2))
    assert first_page.has_more and len(first_page.data) == 2
    assert [b.id for b in listed] == ids[::-1]
    assert [b.metadata for b in listed] == [{"i": str(i)} for i in reversed(range(5))]


@pytest.mark.parametrize("options, items", [
    ({"max_file_lines": 2}, [batch_line(i) for i in range(3)]),
    ({"max_file_bytes": 100}, [batch_line(0)]),
    ({}, [batch_line(0), batch_line(0)]),                                # duplicate custom_id
    ({}, [{**batch_line(0), "url": "/v1/embeddings"}]),
    ({}, [{**batch_line(0), "custom_id": 7}]),
])
def test_limits_and_bad_lines_are_rejected_with_400(options, items):
    with FakeBatchServer(**options) as fake:
        with pytest.raises(openai.BadRequestError) as caught:
            client_for(fake).files.create(file=("in.jsonl", jsonl(items)), purpose="batch")
    assert caught.value.status_code == 400 and fake.files == {}


def test_unknown_ids_are_refused():
    with FakeBatchServer() as fake:
        client = client_for(fake)
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve("file-nope")
        with pytest.raises(openai.NotFoundError):
            client.files.content("file-nope")
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_nope")


def test_failed_batches_end_failed_without_output():
    with FakeBatchServer(fail_batches=1) as fake:
        client = client_for(fake)
        failed = client.batches.retrieve(submit(client, 2).id)
        fine = client.batches.retrieve(submit(client, 2).id)
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.output_file_id is None and failed.error_file_id is None
    assert [(e.code, e.message) for e in failed.errors.data] == [("invalid_request", "scripted")]
    assert fine.status == "completed" and fake.lines_answered == {"g0": 1, "g1": 1}
