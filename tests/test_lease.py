"""One run per run root: the lease (exclusive create, heartbeat, takeover of a dead run's lease),
on the toy stages with real Spark and Delta."""
from __future__ import annotations

import os
import threading
import time

import pytest

from _toy_stages import Source
from mergeit_spark.config import load_settings
from mergeit_spark.lease import LeaseLost, RootBusy, RunLease, current_lease
from mergeit_spark.pipeline import Pipeline


class Waiting(Source):
    """The source stage, held open until the test lets it finish."""
    entered = threading.Event()
    go = threading.Event()

    def run(self, ctx, tables):
        Waiting.entered.set()
        assert Waiting.go.wait(60)
        return super().run(ctx, tables)


def _pipeline(spark, root, stages, *overrides):
    settings = load_settings(overrides=[f"output.root={root}", *overrides], env={})
    return Pipeline(settings, spark=spark, stages=stages)


def _holder(store):
    """The current lease's record, unless it was given back (None)."""
    record = current_lease(store)[1]
    return None if record is None or record.get("released") else record


def _plant(store, record):
    """``record`` as the next lease generation (what a run that died left behind)."""
    return store.create_state(f"lease-{current_lease(store)[0] + 1:012d}", record)


def _until(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_second_run_on_a_held_root_fails_at_once_naming_the_holder(spark, tmp_path):
    root = tmp_path / "run"
    first, second = _pipeline(spark, root, [Waiting()]), _pipeline(spark, root, [Source()])
    errors = []
    thread = threading.Thread(target=lambda: errors.extend(_run_catching(first)))
    thread.start()
    try:
        assert Waiting.entered.wait(60)
        holder = _holder(first.store)
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(RootBusy, match=f"held by another run \\(holder {holder['holder']}"):
            second.run()
        with pytest.raises(RootBusy):
            second.extend()
    finally:
        Waiting.go.set()
        thread.join()
    assert errors == [] and _holder(first.store) is None  # given back at the end
    assert [r.skipped for r in second.run(force="source")] == [False]  # the root is free again


def _run_catching(pipeline):
    try:
        pipeline.run()
    except Exception as exc:  # noqa: BLE001 - handed to the test thread
        return [exc]
    return []


def test_a_dead_runs_lease_is_taken_over_after_the_timeout(spark, tmp_path, caplog):
    root = tmp_path / "run"
    pipeline = _pipeline(spark, root, [Source()], "run.lease_timeout_s=30")
    dead = {"holder": "gone", "host": "elsewhere", "pid": 1, "started": time.time() - 100,
            "heartbeat": time.time() - 31, "timeout_s": 30}
    assert _plant(pipeline.store, dead)
    with caplog.at_level("WARNING", logger="mergeit.lease"):
        [result] = pipeline.run()
    assert not result.skipped and "taking over the lease" in caplog.text and "holder gone" in caplog.text
    assert _holder(pipeline.store) is None
    assert pipeline.store.state_names("lease-") == ["lease-000000000001"]  # the dead one removed
    # A lease beating within the timeout is not taken.
    assert _plant(pipeline.store, dict(dead, heartbeat=time.time()))
    with pytest.raises(RootBusy, match="holder gone, host elsewhere, pid 1"):
        pipeline.run()


def test_a_lease_whose_process_is_gone_on_this_host_is_taken_over_at_once(spark, tmp_path):
    import socket
    pipeline = _pipeline(spark, tmp_path / "run", [Source()])
    dead = {"holder": "killed", "host": socket.gethostname(), "pid": _gone_pid(),
            "started": time.time(), "heartbeat": time.time(), "timeout_s": 300}
    assert _plant(pipeline.store, dead)
    [result] = pipeline.run()
    assert not result.skipped and _holder(pipeline.store) is None


def _gone_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_heartbeat_renews_and_a_lease_taken_over_stops_its_run(store):
    lease = RunLease(store, timeout_s=0.4).acquire()
    try:
        first = _holder(store)["heartbeat"]
        _until(lambda: _holder(store)["heartbeat"] > first)
        lease.check()  # still ours
        assert _plant(store, dict(_holder(store), holder="another run"))  # a run that took it over
        _until(lambda: lease.lost)
        with pytest.raises(LeaseLost, match="took this run's lease over"):
            lease.check()
    finally:
        lease.release()
    assert _holder(store)["holder"] == "another run"  # not ours to give back
    for name in store.state_names("lease-"):
        store.write_state(name, None)


def test_of_runs_starting_at_once_exactly_one_gets_the_lease(store):
    assert_one_of_eight_takes(store)


def assert_one_of_eight_takes(store):
    """Eight runs take a free root at once, then eight take over the winner's dead lease at once:
    each time exactly one gets it and the others are told who holds it."""
    for round in range(2):
        start, won, busy = threading.Barrier(8), [], []

        def take():
            start.wait()
            try:
                won.append(RunLease(store, timeout_s=60).acquire())
            except RootBusy as exc:
                busy.append(str(exc))

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(busy) == 7, busy
        [winner] = won
        assert _holder(store)["holder"] == winner.holder and current_lease(store)[0] == winner.generation
        winner._stop.set()  # the winner dies: no more heartbeats, its lease left behind
        winner._thread.join()
        store.write_state(f"lease-{winner.generation:012d}", dict(_holder(store), heartbeat=time.time() - 61))
    for name in store.state_names("lease-"):
        store.write_state(name, None)


def test_a_lease_record_never_written_whole_is_busy_then_taken_over(store):
    """A run killed between its exclusive create and its write leaves an empty record: a run
    starting beside it is refused (it may be a run starting this instant), and once the file is
    older than the timeout the root is taken over, not stuck for good."""
    torn = os.path.join(store.root.local, "_state", "lease-000000000000.json")
    os.makedirs(os.path.dirname(torn), exist_ok=True)
    open(torn, "w").close()
    with pytest.raises(RootBusy, match="not written whole"):
        RunLease(store, timeout_s=30).acquire()
    os.utime(torn, (time.time() - 31, time.time() - 31))
    lease = RunLease(store, timeout_s=30).acquire()
    try:
        assert current_lease(store)[0] == 1 and _holder(store)["holder"] == lease.holder
        assert not os.path.exists(torn)  # the older generation removed
    finally:
        lease.release()
