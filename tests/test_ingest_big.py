"""A big JSON array streamed by one Python worker in flat memory, every element counted.

A reader that holds the file whole in one worker needs its bytes and the decoded text at once
(``bench/bench_ingest.py`` measured the old whole-file reader at 1.75 GiB for 256 MiB) and fails
the 512 MiB bound on the worker's peak at this size already; the streamed reader takes a fraction
of it. The array is over 256 MiB: big enough that only a streaming reader passes, small enough for
the suite. Issue 13's gigabyte is the benchmark's (``bench/bench_ingest.py --mb 1040
--skip-baseline``: measures the same reader at that size).
Slow (about a quarter of a million elements parsed by one task, counted again by ijson);
``make test-fast`` leaves it out. The worker's peak RSS is printed (``-s``) for the record.
"""
from __future__ import annotations

import time

import pytest
from pyspark.sql import functions as F

from mergeit_spark.config import IngestSettings
from mergeit_spark.inputs import resolve_inputs
from mergeit_spark.stages.ingest import ingest

from _ingest_helpers import write_big_array
from _worker_memory import WorkerMemory

MiB = 1 << 20
MEMORY_BOUND = 512 * MiB    # what one Python worker may take while the array streams through it
ARRAY_BYTES = 272 * MiB     # the old reader's 1.75 GiB at 256 MiB is far past the bound


@pytest.mark.slow
def test_a_big_json_array_streams_within_a_memory_bound(spark, shared_data, tmp_path):
    big = write_big_array(shared_data, tmp_path / "big.json", target_bytes=ARRAY_BYTES)
    assert big.bytes > 256 * MiB
    started = time.monotonic()
    with WorkerMemory(spark) as memory:
        records, rejects, input_files = ingest(spark, resolve_inputs([str(big.path)], "auto"), IngestSettings())
        n_records = records.count()
        # the rejects are few (test side): their element numbers must be exact
        rejected = {r["row"]: r["reason"] for r in rejects.select("row", "reason").collect()}
        [counted] = input_files.collect()
        shortest = records.agg(F.min(F.length("output"))).first()[0]
    seconds = time.monotonic() - started
    print(f"\n{big.bytes / MiB:.0f} MiB array: {big.rows} elements, {seconds:.0f} s, "
          f"peak Python worker memory taken {memory.peak / MiB:.0f} MiB ({memory.samples} samples)")

    assert n_records == big.records
    assert {"malformed_json", "missing_output", "exact_duplicate"} <= set(big.rejected.values())
    assert rejected == big.rejected
    assert (counted["units"], counted["framed"], counted["bytes"]) == (big.rows, big.rows, big.bytes)
    assert n_records + len(rejected) == counted["units"]
    assert shortest > 0
    # Bounded: the old reader decoded the whole file in one worker (several times its size).
    assert memory.samples > 10 and 0 < memory.peak < MEMORY_BOUND
