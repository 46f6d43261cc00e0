"""The merge stage's machinery without Spark: the group-committing ledger writer and the event loop
that one task feeds continuously (real threads, real files, real fsync)."""
from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import pytest

from mergeit_spark.llm.ledger import LedgerError, LedgerWriter, read_bucket
from mergeit_spark.llm.pump import RequestPump


def test_writer_commits_lines_in_groups_and_numbers_them_per_bucket(tmp_path):
    writer = LedgerWriter(tmp_path, "task-a")
    writer.open_bucket(3, max_seq=0)
    writer.open_bucket(7, max_seq=41)          # the bucket already holds lines up to seq 41

    def send(i):
        bucket = 3 if i % 2 else 7
        return bucket, writer.submit(bucket, {"group_id": f"g{i}", "request_hash": "h",
                                              "status": "merged"}).result()

    with ThreadPoolExecutor(8) as pool:
        seqs = list(pool.map(send, range(200)))
    writer.close()
    assert sorted(s for b, s in seqs if b == 3) == list(range(1, 101))
    assert sorted(s for b, s in seqs if b == 7) == list(range(42, 142))
    assert writer.lines == 200 and writer.commits < 200   # several lines per write + fsync
    # One new object per bucket a commit touched, named by the writer and its commit counter.
    objects = sorted((tmp_path / "bucket=7").glob("*.jsonl"))
    assert objects and all(o.name.startswith("task-a-") for o in objects)
    assert writer.objects == len(objects) + len(list((tmp_path / "bucket=3").glob("*.jsonl")))
    lines = [json.loads(x) for o in objects for x in o.read_text().splitlines()]
    assert len(lines) == 100 and all(line["seq"] >= 42 for line in lines)

    # A later writer (another attempt, another run) numbers after what the bucket holds.
    state = read_bucket(tmp_path, 7)
    assert state.max_seq == 141 and len(state.latest) == 100
    later = LedgerWriter(tmp_path, "task-b")
    later.open_bucket(7, state.max_seq)
    assert later.submit(7, {"group_id": "g0", "request_hash": "h", "status": "failed"}).result() == 142
    later.close()
    assert read_bucket(tmp_path, 7).latest[("g0", "h")]["status"] == "failed"


def test_a_line_counts_only_once_it_is_on_disk(tmp_path):
    writer = LedgerWriter(tmp_path, "t")
    writer.open_bucket(0, 0)

    async def go():
        seq = await writer.commit(0, {"group_id": "g", "request_hash": "h", "status": "merged"})
        # committed: another reader (a retried task) sees it before this task even closes
        return seq, read_bucket(tmp_path, 0).latest

    seq, seen = asyncio.run(go())
    writer.close()
    assert seq == 1 and seen[("g", "h")]["seq"] == 1


def test_a_ledger_that_cannot_be_written_fails_every_commit(tmp_path):
    blocked = tmp_path / "ledger"
    blocked.write_text("a file where the ledger folder should be")
    writer = LedgerWriter(blocked, "t")
    with pytest.raises(LedgerError):
        writer.submit(0, {"group_id": "g", "status": "merged"}).result()
    with pytest.raises(LedgerError):
        writer.submit(1, {"group_id": "h", "status": "merged"}).result()
    writer.close()


def _session(handle):
    @asynccontextmanager
    async def session():
        yield handle
    return session


def test_loop_is_fed_continuously_without_a_barrier_between_batches():
    finished, state = [], {"now": 0, "max": 0}
    lock = threading.Lock()

    async def handle(job):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.6 if job == 0 else 0.01)
        with lock:
            state["now"] -= 1
            finished.append(job)
        return job

    results = []
    with RequestPump(_session(handle), workers=4, queue_size=8) as pump:
        for start in range(0, 48, 8):                  # six "Arrow batches" of eight jobs
            pump.put(list(range(start, start + 8)))
            results.extend(pump.take())
        for rows in pump.finish():
            results.extend(rows)
    assert sorted(results) == list(range(48)) and sorted(finished) == list(range(48))
    # The slow job of the first batch held one worker; the other workers went through the later
    # batches meanwhile (a barrier per batch would have finished job 0 before any of them).
    assert finished[-1] == 0 and set(finished[:40]) >= set(range(8, 40))
    assert state["max"] == 4


def test_results_stream_back_before_the_input_ends():
    async def handle(job):
        await asyncio.sleep(0.005)
        return job * 2

    with RequestPump(_session(handle), workers=2, queue_size=2) as pump:
        pump.put(list(range(20)))      # returns once the last job is queued: most are done
        early = pump.take()
        late = [r for rows in pump.finish() for r in rows]
    assert early and sorted(early + late) == [2 * i for i in range(20)]


def test_a_failing_handler_stops_the_task():
    async def handle(job):
        if job == 3:
            raise LedgerError("disk full")
        await asyncio.sleep(0.01)
        return job

    with pytest.raises(LedgerError, match="disk full"):
        with RequestPump(_session(handle), workers=2, queue_size=2) as pump:
            for start in range(0, 40, 4):
                pump.put(list(range(start, start + 4)))
            list(pump.finish())


def test_a_session_that_cannot_start_fails_at_once():
    @asynccontextmanager
    async def broken():
        raise RuntimeError("no client")
        yield  # pragma: no cover

    with pytest.raises(RuntimeError, match="no client"):
        with RequestPump(broken, workers=2, queue_size=2):
            pass
