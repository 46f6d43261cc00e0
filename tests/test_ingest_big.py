"""A JSON array over 1 GB: streamed by one Python worker in flat memory, every element counted.

Slow (several minutes on 2 cores: about a million elements parsed by one task, counted again by
ijson); ``make test-fast`` leaves it out. The worker's peak RSS is printed (``-s``) for the record.
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

GB = 1 << 30


@pytest.mark.slow
def test_one_gigabyte_json_array(spark, shared_data, tmp_path):
    big = write_big_array(shared_data, tmp_path / "big.json", target_bytes=GB + (16 << 20))
    assert big.bytes > GB
    started = time.monotonic()
    with WorkerMemory(spark) as memory:
        records, rejects, input_files = ingest(spark, resolve_inputs([str(big.path)], "auto"), IngestSettings())
        n_records = records.count()
        # the rejects are few (test side): their element numbers must be exact
        rejected = {r["row"]: r["reason"] for r in rejects.select("row", "reason").collect()}
        [counted] = input_files.collect()
        shortest = records.agg(F.min(F.length("output"))).first()[0]
    seconds = time.monotonic() - started
    print(f"\n1 GB array: {big.bytes / GB:.2f} GiB, {big.rows} elements, {seconds:.0f} s, "
          f"peak Python worker memory taken {memory.peak / 2**20:.0f} MiB ({memory.samples} samples)")

    assert n_records == big.records
    assert rejected == big.rejected
    assert (counted["units"], counted["framed"], counted["bytes"]) == (big.rows, big.rows, big.bytes)
    assert n_records + len(rejected) == counted["units"]
    assert shortest > 0
    # Bounded: the old reader decoded the whole file in one worker (several times its size).
    assert memory.samples > 10 and 0 < memory.peak < 512 << 20
