"""A graceful stop of the merge stage (``llm.stop``): Ctrl-C on the driver stops new requests, the
ones in flight finish and are recorded, the groups not sent end ``interrupted`` outside the
ledger, the stage is not current; the next run sends exactly those. ``mergeit stop`` asks the
same from another shell."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from mergeit_spark import fs
from mergeit_spark.cli import main
from mergeit_spark.llm.stop import StopMarker, clear_stops
from mergeit_spark.stages.merge import LEDGER_DIR

from fake_openai import FakeOpenAI, Reply
from test_merge_stage import merges_rows, run, small_inputs, stage_settings


@pytest.fixture(scope="module")
def inputs(spark, shared_data):
    return small_inputs(spark, shared_data)


def test_ctrl_c_stops_sending_keeps_what_was_paid_and_the_next_run_sends_the_rest(spark, store, inputs):
    n_groups = len(inputs[3])
    interrupted = threading.Event()

    def ctrl_c_at_the_third(n, key, request):
        if n == 3:
            os.kill(os.getpid(), signal.SIGINT)      # the driver's Ctrl-C, while requests are in flight
            interrupted.set()
        return Reply()

    before = signal.getsignal(signal.SIGINT)
    # One request at a time per task, a second each: a task's six groups take longer than the
    # two seconds between its looks at the stop marker.
    with FakeOpenAI(ctrl_c_at_the_third, latency_s=1.0) as fake:
        stopped = run(spark, store, stage_settings(fake.base_url, "llm.concurrency=1"), inputs)
        assert interrupted.is_set() and stopped.stopped
        assert signal.getsignal(signal.SIGINT) is before            # the handler is the caller's again
        rows = merges_rows(store)
        paid = [r for r in rows if r["status"] != "failed"]
        left = [r for r in rows if r["status"] == "failed"]
        assert len(rows) == n_groups and left and paid                # some answered, some never sent
        assert {r["error"].split(":")[0] for r in left} == {"interrupted"} and {r["attempts"] for r in left} == {0}
        assert stopped.requests == fake.count == sum(r["attempts"] for r in paid)   # in flight: recorded
        assert stopped.errors == {"interrupted": len(left)}
        fake.latency_s = 0.0
        again = run(spark, store, stage_settings(fake.base_url, "llm.concurrency=2"), inputs)
    assert not again.stopped and again.requests == len(left) and fake.count == n_groups
    assert max(fake.per_group.values()) == 1
    assert {r["status"] for r in merges_rows(store)} <= {"merged", "gate_failed"}


def test_mergeit_stop_asks_every_pass_under_the_root(tmp_path):
    root = tmp_path / "run"
    assert main(["stop", "--set", f"output.root={root}"]) == 0
    ledger = fs.resolve(str(root)) / LEDGER_DIR
    assert StopMarker(ledger, "any-run").asked()
    clear_stops(ledger)                                   # what the next pass does when it starts
    assert not StopMarker(ledger, "any-run").asked()


def test_a_run_stopped_is_not_within_tolerance():
    from mergeit_spark.config import load_settings
    from mergeit_spark.stages.merge import merge_shortfall
    merge = load_settings().merge
    assert not merge_shortfall({"http_503": 1}, 100, merge).beyond_tolerance
    assert merge_shortfall({"interrupted": 1}, 100, merge).beyond_tolerance
    assert merge_shortfall({"batch_pending": 1}, 100, merge).beyond_tolerance
    with pytest.raises(AttributeError):
        merge_shortfall({}, 100, merge).beyond_tolerance
