"""The merge ledger as immutable objects: one object per bucket per group commit, buckets read by
listing, compaction that folds a bucket into one object without changing what it answers or
counts, a killed writer or compaction that loses nothing recorded. Real files and threads; Spark
only where ``ledger_spend`` (a Spark aggregation) is the thing checked."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mergeit_spark import fs
from mergeit_spark.llm import ledger as ledger_mod
from mergeit_spark.llm.spend import Prices
from mergeit_spark.llm.ledger import (BucketState, LedgerWriter, bucket_objects, compact, compact_bucket,
                                      fold_lines, read_bucket)

REPO = Path(__file__).resolve().parents[1]


def _root(tmp_path: Path) -> fs.Location:
    return fs.resolve(str(tmp_path / "ledger"))


def _objects(root: fs.Location, bucket: int) -> list[str]:
    return [o.name for o in bucket_objects(root, bucket)]


def _state(state: BucketState) -> tuple:
    """A bucket state's content, for comparing (the settle order bookkeeping aside)."""
    return (state.latest, state.max_seq, state.reserved, state.settled, state.spent())


def _result(gid: str, status: str = "merged", **extra) -> dict:
    line = {"group_id": gid, "request_hash": "h", "status": status, "attempts": 1,
            "prompt_tokens": 10, "completion_tokens": 5, "journaled": False, "run": "r1"}
    line.update(extra)
    return line


PRICES = Prices(input_per_million=2.0, output_per_million=10.0)


def _cost(line: dict, prices: Prices) -> float:
    """A line's tokens at ``prices``: those it does not split into prompt and completion (lines
    of older versions) at the higher rate."""
    prompt, completion = int(line.get("prompt_tokens") or 0), int(line.get("completion_tokens") or 0)
    rest = int(line.get("tokens") or prompt + completion) - prompt - completion
    return (prompt * prices.input_per_million + completion * prices.output_per_million
            + rest * max(prices.input_per_million, prices.output_per_million)) / 1e6


def _spend_of(root: fs.Location, prices: Prices = Prices()) -> tuple[int, int, float]:
    """What ``ledger_spend`` counts, read without Spark (the same rules, for the fast tests)."""
    reserved, settled, results = {}, {}, {}
    for bucket in ledger_mod.ledger_buckets(root):
        for obj in bucket_objects(root, bucket):
            for line in ledger_mod.parse_lines(obj.read_bytes() or b""):
                if line.get("spend"):
                    reserved[line["spend"]] = line
                elif line.get("settle"):
                    old = settled.get(line["settle"])
                    if old is None or int(line.get("tokens") or 0) > int(old.get("tokens") or 0):
                        settled[line["settle"]] = line
                elif (line.get("status") or line.get("superseded")) and not line.get("journaled"):
                    results[ledger_mod.line_identity(line)] = line
    used = [settled.get(k, v) for k, v in reserved.items()] + list(results.values())
    requests = len(reserved) + sum(int(r.get("attempts") or 0) for r in results.values())
    tokens = sum(int(x.get("tokens") or 0) for x in used[:len(reserved)]) + sum(
        int(r.get("prompt_tokens") or 0) + int(r.get("completion_tokens") or 0) for r in results.values())
    return requests, tokens, sum(_cost(x, prices) for x in used)


def _busy_bucket(root: fs.Location, bucket: int = 5) -> dict:
    """A bucket written by three writers (two runs): superseded results paid without spend lines,
    journaled results with their spends and settles, an unsettled spend, a legacy appended file."""
    folder = Path(root.local) / f"bucket={bucket}"
    folder.mkdir(parents=True)
    legacy = [_result("g1", "failed", error="timeout: x", seq=1, finished_ns=1, task="old"),
              _result("g2", "merged", seq=2, finished_ns=2, task="old")]
    (folder / "p0-a1-old.jsonl").write_text("".join(json.dumps(x) + "\n" for x in legacy) + '{"group_id": "g9", "st')

    first = LedgerWriter(root, "p0-a2-first", max_lines=1)
    first.open_bucket(bucket, read_bucket(root, bucket).max_seq)
    for gid in ("g1", "g3"):     # g1 superseded again below; g3 only here
        first.submit(bucket, _result(gid, "failed", error="http_500: x", task="first")).result()
    first.submit(bucket, _result("g1", "merged", task="first", attempts=3)).result()
    first.close()

    second = LedgerWriter(root, "p0-a3-second", max_lines=1)
    second.open_bucket(bucket, read_bucket(root, bucket).max_seq)
    # A budgeted run: spend lines, journaled results. s0 as older versions wrote it (tokens only),
    # s1 and the unsettled one with prompt and completion apart.
    second.submit(bucket, {"spend": "s0", "run": "r2", "requests": 1, "tokens": 100}).result()
    second.submit(bucket, {"settle": "s0", "run": "r2", "tokens": 40}).result()
    second.submit(bucket, _result("g3", "gate_failed", journaled=True, run="r2", task="second")).result()
    second.submit(bucket, {"spend": "s1", "run": "r2", "requests": 1, "tokens": 100, "prompt_tokens": 60,
                           "completion_tokens": 40}).result()
    second.submit(bucket, {"settle": "s1", "run": "r2", "tokens": 41, "prompt_tokens": 30,
                           "completion_tokens": 11}).result()
    second.submit(bucket, _result("g4", "gate_failed", journaled=True, run="r2", task="second")).result()
    second.submit(bucket, {"spend": "s-unsettled", "run": "r2", "requests": 1, "tokens": 77, "prompt_tokens": 27,
                           "completion_tokens": 50}).result()
    second.close()
    return {"objects": len(_objects(root, bucket))}


# -- writing ------------------------------------------------------------------------------------
def test_every_commit_is_a_new_object_and_the_bucket_reads_back_what_was_written(tmp_path):
    root = _root(tmp_path)
    writer = LedgerWriter(root, "p1-a7-abc")
    writer.open_bucket(3, 0)
    writer.open_bucket(4, 0)
    written = {}
    for i in range(30):
        bucket = 3 if i % 3 else 4
        line = _result(f"g{i % 12}", "merged" if i % 2 else "failed", n=i)
        line["seq"] = writer.submit(bucket, line).result()   # one line per commit
        written.setdefault(bucket, {})[(line["group_id"], "h")] = line
    writer.close()
    assert writer.commits == 30 and writer.objects == 30 and writer.lines == 30
    names = _objects(root, 3) + _objects(root, 4)
    assert len(names) == 30 and len(set(names)) == 30
    assert all(n.startswith("p1-a7-abc-") and n.endswith(".jsonl") for n in names)
    assert not list(Path(root.local).rglob("*.tmp"))
    for bucket, expected in written.items():
        state = read_bucket(root, bucket)
        assert state.latest == expected       # the latest line per key, by seq
        assert state.max_seq == max(line["seq"] for line in expected.values())


def test_one_group_commit_writes_one_object_per_bucket_it_touched(tmp_path):
    root = _root(tmp_path)
    writer = LedgerWriter(root, "w")
    futures = []
    # Queue lines faster than the thread takes them: a group commit holds several lines and
    # several buckets, and still writes one object per bucket.
    for i in range(300):
        futures.append(writer.submit(i % 3, _result(f"g{i}")))
    seqs = [f.result() for f in futures]
    writer.close()
    assert writer.commits < 300 and writer.lines == 300
    assert writer.objects == sum(len(_objects(root, b)) for b in range(3))
    for bucket in range(3):
        assert len(read_bucket(root, bucket).latest) == 100
        assert sorted(s for i, s in enumerate(seqs) if i % 3 == bucket) == list(range(1, 101))


def test_close_writes_what_is_left(tmp_path):
    root = _root(tmp_path)
    writer = LedgerWriter(root, "w")
    futures = [writer.submit(0, _result(f"g{i}")) for i in range(50)]
    writer.close()
    assert all(f.done() for f in futures) and len(read_bucket(root, 0).latest) == 50


_KILLED_WRITER = textwrap.dedent("""
    import sys
    from mergeit_spark.llm.ledger import LedgerWriter
    writer = LedgerWriter(sys.argv[1], "killed")
    i = 0
    while True:
        writer.submit(0, {"group_id": f"g{i}", "request_hash": "h", "status": "merged"}).result()
        print(f"g{i}", flush=True)   # reported only once durable
        i += 1
""")


def test_a_killed_writer_loses_only_lines_not_yet_committed(tmp_path):
    root = _root(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, root.uri], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    reported = []
    try:
        while len(reported) < 40:
            reported.append(proc.stdout.readline().strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    reported += [line.strip() for line in proc.stdout if line.strip()]
    state = read_bucket(root, 0)
    recorded = {gid for gid, _ in state.latest}
    assert set(reported) <= recorded                       # everything reported is on disk
    assert len(recorded - set(reported)) <= 1              # at most the line in flight
    assert state.max_seq == len(recorded)                  # no torn object, no gap


def test_a_write_cut_short_fails_its_batch_and_leaves_the_bucket_readable(tmp_path, monkeypatch):
    root = _root(tmp_path)
    writer = LedgerWriter(root, "w")
    writer.open_bucket(0, 0)
    assert writer.submit(0, _result("g0")).result() == 1
    real = fs.Location.write_bytes

    def torn(self, data):
        # The process dies mid-write: half a temporary file, never renamed into place.
        Path(f"{self.path}.deadbeef.tmp").write_bytes(data[: len(data) // 2])
        raise OSError("killed mid-write")
    monkeypatch.setattr(fs.Location, "write_bytes", torn)
    with pytest.raises(ledger_mod.LedgerError):
        writer.submit(0, _result("g1")).result()
    with pytest.raises(ledger_mod.LedgerError):         # the writer stays failed
        writer.submit(0, _result("g2")).result()
    writer.close()
    monkeypatch.setattr(fs.Location, "write_bytes", real)
    state = read_bucket(root, 0)
    assert set(state.latest) == {("g0", "h")} and state.max_seq == 1


def test_legacy_appended_files_are_read_with_the_objects(tmp_path):
    root = _root(tmp_path)
    folder = Path(root.local) / "bucket=2"
    folder.mkdir(parents=True)
    (folder / "p0-a1-0123.jsonl").write_text(   # appended by an older version, torn at the end
        json.dumps(_result("a", "failed", seq=1)) + "\n" + json.dumps(_result("b", seq=2)) + '\n{"grou')
    (folder / ".hidden.jsonl").write_text(json.dumps(_result("x", seq=50)) + "\n")
    (folder / "_SUCCESS").write_text("")
    writer = LedgerWriter(root, "new")
    writer.open_bucket(2, read_bucket(root, 2).max_seq)
    assert writer.submit(2, _result("a")).result() == 3
    writer.close()
    state = read_bucket(root, 2)
    assert {k: v["status"] for k, v in state.latest.items()} == {("a", "h"): "merged", ("b", "h"): "merged"}
    assert state.max_seq == 3
    assert compact_bucket(root, 2) == (2, 1)
    assert _state(read_bucket(root, 2)) == _state(state)


# -- compaction ---------------------------------------------------------------------------------
def test_compaction_keeps_latest_lines_spend_and_sequence_in_one_object(tmp_path):
    root = _root(tmp_path)
    made = _busy_bucket(root)
    before, spend_before = read_bucket(root, 5), _spend_of(root)
    assert made["objects"] > 10

    assert compact_bucket(root, 5) == (made["objects"], 1)
    [name] = _objects(root, 5)
    assert name.startswith("compacted-")
    after = read_bucket(root, 5)
    assert _state(after) == _state(before)
    assert _spend_of(root) == spend_before
    assert after.spent("r2")[:3] == (3, 40 + 41 + 77, 0.0)   # spends by id, settled or at reservation
    # At prices: s0's 40 unsplit tokens at the higher rate, s1 as settled, the unsettled spend as
    # reserved: (40 * 10 + 30 * 2 + 11 * 10 + 27 * 2 + 50 * 10) / 1e6.
    assert after.spent("r2", PRICES)[:3] == (3, 158, pytest.approx(1124e-6))
    lines = ledger_mod.parse_lines(Path(root.local, "bucket=5", name).read_bytes())
    results = [x for x in lines if x.get("status")]
    assert len(results) == len(before.latest) == 4         # g1..g4: one line each
    # The superseded unjournaled results keep only what they paid, without texts or status.
    stubs = [x for x in lines if x.get("superseded")]
    assert sorted(x["group_id"] for x in stubs) == ["g1", "g1", "g3"]   # g3's successor was journaled
    assert all("status" not in x and "instruction" not in x for x in stubs)

    assert compact_bucket(root, 5) == (1, 1)               # one object: nothing to fold


def test_a_compaction_killed_before_its_deletes_reads_back_the_same(tmp_path):
    root = _root(tmp_path)
    made = _busy_bucket(root)
    before, spend_before = read_bucket(root, 5), _spend_of(root)
    # The compacted object is written, the process dies before deleting what it folded.
    lines = ledger_mod._read_lines(root, 5)[1]
    (root / "bucket=5" / "compacted-killed.jsonl").write_bytes(ledger_mod._dumps(fold_lines(lines)))
    assert len(_objects(root, 5)) == made["objects"] + 1
    assert _state(read_bucket(root, 5)) == _state(before)
    assert _spend_of(root) == spend_before
    # The next compaction folds both copies into one; still the same.
    assert compact_bucket(root, 5) == (made["objects"] + 1, 1)
    assert _state(read_bucket(root, 5)) == _state(before)
    assert _spend_of(root) == spend_before


def test_a_writer_after_compaction_numbers_above_the_old_sequence(tmp_path):
    root = _root(tmp_path)
    _busy_bucket(root)
    top = read_bucket(root, 5).max_seq
    compact_bucket(root, 5)
    [obj] = bucket_objects(root, 5)
    header = ledger_mod.parse_lines(obj.read_bytes())[0]
    assert header["compacted"] and header["seq"] == top
    state = BucketState()     # the header alone keeps the sequence, whatever lines are kept
    state.add(header)
    assert state.max_seq == top

    writer = LedgerWriter(root, "later")
    writer.open_bucket(5, read_bucket(root, 5).max_seq)
    assert writer.submit(5, _result("g2", "failed", error="timeout: x")).result() == top + 1
    writer.close()
    assert read_bucket(root, 5).latest[("g2", "h")]["status"] == "failed"   # the later line wins


def test_compact_folds_every_bucket_and_counts_objects(tmp_path):
    root = _root(tmp_path)
    writer = LedgerWriter(root, "w", max_lines=1)
    for i in range(40):
        writer.submit(i % 4, _result(f"g{i % 8}", n=i)).result()
    writer.close()
    states = {b: _state(read_bucket(root, b)) for b in range(4)}
    assert compact(root) == {"buckets": 4, "objects_before": 40, "objects_after": 4}
    assert {b: _state(read_bucket(root, b)) for b in range(4)} == states
    assert compact(root) == {"buckets": 4, "objects_before": 4, "objects_after": 4}
    assert compact(fs.resolve(str(tmp_path / "none"))) == {"buckets": 0, "objects_before": 0, "objects_after": 0}


def test_a_reader_listing_before_a_compaction_lists_again(tmp_path, monkeypatch):
    root = _root(tmp_path)
    _busy_bucket(root)
    expected = _state(read_bucket(root, 5))
    real, slipped = ledger_mod.bucket_objects, []

    def listing(where, bucket):
        objects = real(where, bucket)
        if not slipped:       # a compaction runs between this reader's listing and its reads
            slipped.append(True)
            compact_bucket(where, bucket)
        return objects
    monkeypatch.setattr(ledger_mod, "bucket_objects", listing)
    assert _state(read_bucket(root, 5)) == expected and slipped


def test_ledger_spend_counts_each_line_once_across_compaction_and_a_killed_one(spark, tmp_path):
    from mergeit_spark.stages.merge import ledger_spend
    root = _root(tmp_path)
    _busy_bucket(root, bucket=5)
    _busy_bucket(root, bucket=9)
    spent = ledger_spend(spark, root, PRICES)
    requests, tokens, cost = _spend_of(root, PRICES)
    assert spent[:3] == (requests, tokens, pytest.approx(cost)) and requests > 0 and cost > 0
    lines = ledger_mod._read_lines(root, 9)[1]
    (root / "bucket=9" / "compacted-killed.jsonl").write_bytes(ledger_mod._dumps(fold_lines(lines)))
    assert ledger_spend(spark, root, PRICES) == spent                   # copies count once
    compact(root)
    assert ledger_spend(spark, root, PRICES) == spent                   # superseded lines still count
    assert ledger_spend(spark, root)[:3] == (requests, tokens, 0.0)     # free: the same tokens
    assert ledger_spend(spark, fs.resolve(str(tmp_path / "empty")))[:3] == (0, 0, 0.0)


def test_cli_ledger_compact_takes_the_lease(spark, tmp_path, capsys):
    from mergeit_spark.cli import main
    from mergeit_spark.lease import RunLease
    from mergeit_spark.tables import TableStore
    store = TableStore(spark, tmp_path / "run")
    root = store.ledger_path("merges")
    writer = LedgerWriter(root, "w", max_lines=1)
    for i in range(6):
        writer.submit(i % 2, _result(f"g{i}")).result()
    writer.close()
    args = ["ledger", "compact", "--set", f"output.root={tmp_path / 'run'}"]
    with RunLease(store, 300):                       # a run holds the root: no compaction under it
        assert main(args) == 1
    assert "held by another run" in capsys.readouterr().err
    assert len(_objects(root, 0)) == 3
    assert main(args) == 0
    assert "6 objects -> 2" in capsys.readouterr().out
    assert len(_objects(root, 0)) == len(_objects(root, 1)) == 1


def test_ledger_on_s3(s3_server, s3_bucket, monkeypatch):
    """Write, read and compact a ledger on a real S3 server: objects, listing, deletes."""
    for key, value in s3_server.env().items():      # the credentials, the way every AWS SDK takes them
        monkeypatch.setenv(key, value)
    fs._s3.cache_clear()                             # no filesystem made before these credentials
    try:
        _s3_ledger(fs.resolve(f"s3a://{s3_bucket}/ledger", fs.Storage(endpoint_url=s3_server.endpoint)))
    finally:
        fs._s3.cache_clear()


def _s3_ledger(root: fs.Location) -> None:
    writer = LedgerWriter(root, "s3-writer", max_lines=1)
    writer.open_bucket(1, read_bucket(root, 1).max_seq)
    for i in range(6):
        writer.submit(1, _result(f"g{i % 3}", n=i)).result()
    writer.submit(1, {"spend": "s", "run": "r", "requests": 1, "tokens": 9}).result()
    writer.close()
    assert len(_objects(root, 1)) == 7
    before = _state(read_bucket(root, 1))
    assert len(read_bucket(root, 1).latest) == 3
    assert compact(root) == {"buckets": 1, "objects_before": 7, "objects_after": 1}
    assert _state(read_bucket(root, 1)) == before
    later = LedgerWriter(root, "s3-later")
    later.open_bucket(1, read_bucket(root, 1).max_seq)
    assert later.submit(1, _result("g0", "failed")).result() == 8
    later.close()
