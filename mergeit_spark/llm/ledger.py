"""The merge ledger: every paid result as a JSON line, durable before it counts.

Layout: ``<ledger root>/bucket=<b>/<task attempt>.jsonl``, ``b = ledger_bucket(group_id)``. A
bucket belongs to one Spark task at a time (the request pass hash-partitions on it), so the lines
of one bucket are written by one writer at a time.

Group commit (``LedgerWriter``): lines handed in from the event loop go to one writer thread that
writes every line waiting, then flushes and fsyncs each file it touched, and only then resolves the
lines' futures. A result counts as recorded once its future resolved; the stage waits for that
before it reports the group, and a task killed at any moment loses at most the results not yet
fsynced, i.e. requests in flight. The event loop never blocks on the disk.

Order: each line carries ``seq``, a per-bucket sequence. A writer starts a bucket's sequence above
the highest ``seq`` already in that bucket (it reads the bucket before it writes to it), so within
a bucket, across tasks, attempts and runs, a later line has a larger ``seq``: "latest" never
depends on executor clocks. ``finished_ns`` (wall clock) is kept for people, not for ordering.

Spend: when the run has a budget (``merge.max_requests`` / ``merge.max_total_tokens``), every
request is recorded in its group's bucket before it is sent (``{"spend": id, "run": run, "requests":
1, "tokens": reserved}``, durable like a result), and what it really used after its reply
(``{"settle": id, "tokens": used}``, not waited for: an unsettled request counts its whole
reservation). A retried task, a recomputed partition and a later run count these lines, so a cap
holds whatever was killed when (``BucketState.spent``, ``ledger_spend``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import queue
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, IO

log = logging.getLogger(__name__)

LEDGER_BUCKETS = 256   # fixed forever for a run root: bucket dirs must not move between runs
_STOP = object()


def ledger_bucket(group_id: str) -> int:
    """Ledger bucket of a group: a deterministic function of its id only (any string works)."""
    return int(hashlib.sha256(group_id.encode("utf-8")).hexdigest()[:8], 16) % LEDGER_BUCKETS


def line_order(line: dict[str, Any]) -> tuple[int, int]:
    """Sort key of a ledger line: its bucket sequence (lines of older ledgers, without one, come
    first), then the writer's clock as a last resort."""
    return (int(line.get("seq") or -1), int(line.get("finished_ns") or 0))


@dataclass
class BucketState:
    """What one bucket of the ledger already holds: the latest line per (group_id, request_hash)
    and the highest sequence number written so far."""
    latest: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    max_seq: int = 0
    reserved: dict[str, tuple[str, int]] = field(default_factory=dict)  # spend id -> (run, tokens)
    settled: dict[str, int] = field(default_factory=dict)               # spend id -> tokens used

    def spent(self, run: str | None = None) -> tuple[int, int]:
        """Requests and tokens recorded as spent in this bucket (by run ``run``, or by any)."""
        requests = tokens = 0
        for sid, (owner, reserved) in self.reserved.items():
            if run is None or owner == run:
                requests += 1
                tokens += self.settled.get(sid, reserved)
        return requests, tokens

    def add(self, line: dict[str, Any]) -> None:
        """Fold one parsed line into the state."""
        self.max_seq = max(self.max_seq, int(line.get("seq") or 0))
        if line.get("spend"):
            self.reserved[str(line["spend"])] = (str(line.get("run")), int(line.get("tokens") or 0))
        elif line.get("settle"):
            self.settled[str(line["settle"])] = int(line.get("tokens") or 0)
        elif line.get("group_id") and line.get("status"):
            key = (line["group_id"], line.get("request_hash"))
            if key not in self.latest or line_order(line) >= line_order(self.latest[key]):
                self.latest[key] = line


def read_bucket(root: str | Path, bucket: int) -> BucketState:
    """The latest line per ``(group_id, request_hash)`` of one bucket, by ``seq``.

    Lines that do not parse (a task killed mid-write) are skipped: their group is simply retried.
    Spend lines are summed (``BucketState.spent``).
    """
    state = BucketState()
    folder = Path(root) / f"bucket={bucket}"
    if not folder.is_dir():
        return state
    for path in sorted(folder.iterdir()):
        if path.name.startswith((".", "_")) or not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            for text in handle:
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(line, dict):
                    state.add(line)
    return state


class BucketSpend:
    """The spend journal (``llm.client.SpendJournal``) of one group: its requests are recorded in
    its bucket, under this run's id, through the task's writer."""

    def __init__(self, writer: "LedgerWriter", bucket: int, run: str) -> None:
        self.writer, self.bucket, self.run = writer, bucket, run

    async def reserve(self, tokens: int) -> str:
        spend = uuid.uuid4().hex
        await self.writer.commit(self.bucket, {"spend": spend, "run": self.run, "requests": 1,
                                               "tokens": int(tokens)})
        return spend

    def settle(self, reservation: str, used_tokens: int) -> None:
        self.writer.submit(self.bucket, {"settle": reservation, "run": self.run, "tokens": int(used_tokens)})


class LedgerError(RuntimeError):
    """The ledger could not be written: the task must stop paying for results it cannot record."""


class LedgerWriter:
    """Group-committing writer of one task attempt (see the module docstring).

    ``open_bucket`` before the first line of a bucket; ``commit`` (async) or ``submit`` (any
    thread) a line; ``close`` writes what is left and stops the thread.
    """

    def __init__(self, root: str | Path, task: str, max_lines: int = 1024) -> None:
        self.root = Path(root)
        self.task = task
        self.max_lines = max_lines
        self.commits = 0          # write+fsync rounds, for tests and logs
        self.lines = 0
        self._next_seq: dict[int, int] = {}
        self._files: dict[int, IO[str]] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"ledger-{task[:8]}", daemon=True)
        self._thread.start()

    def open_bucket(self, bucket: int, max_seq: int) -> None:
        """Number this writer's lines of ``bucket`` after ``max_seq`` (read from the bucket)."""
        self._next_seq[bucket] = max(self._next_seq.get(bucket, 0), max_seq + 1)

    def submit(self, bucket: int, line: dict[str, Any]) -> concurrent.futures.Future:
        """Queue ``line``; the future resolves to its ``seq`` once it is fsynced."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._error is not None:
            future.set_exception(LedgerError(f"ledger writer failed: {self._error}"))
        else:
            self._queue.put((bucket, line, future))
        return future

    async def commit(self, bucket: int, line: dict[str, Any]) -> int:
        """Write ``line`` durably; returns when it is fsynced (raises ``LedgerError`` if not)."""
        return await asyncio.wrap_future(self.submit(bucket, line))

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    # -- the writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            batch = []
            while item is not _STOP:
                batch.append(item)
                if len(batch) >= self.max_lines:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stop = item is _STOP
            if batch:
                self._write(batch)

    def _write(self, batch: list[tuple[int, dict[str, Any], concurrent.futures.Future]]) -> None:
        try:
            if self._error is not None:
                raise self._error
            touched: dict[int, IO[str]] = {}
            seqs = []
            for bucket, line, _ in batch:
                seq = self._next_seq.get(bucket, 1)
                self._next_seq[bucket] = seq + 1
                line["seq"] = seq
                handle = touched.get(bucket) or self._handle(bucket)
                touched[bucket] = handle
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                seqs.append(seq)
            for handle in touched.values():
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            self._error = exc
            log.error("ledger write failed under %s: %s", self.root, exc)
            for _, _, future in batch:
                future.set_exception(LedgerError(f"ledger write failed: {exc}"))
            return
        self.commits += 1
        self.lines += len(batch)
        for (_, _, future), seq in zip(batch, seqs):
            future.set_result(seq)

    def _handle(self, bucket: int) -> IO[str]:
        handle = self._files.get(bucket)
        if handle is None:
            folder = self.root / f"bucket={bucket}"
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / f"{self.task}.jsonl", "a", encoding="utf-8")
            self._files[bucket] = handle
        return handle
