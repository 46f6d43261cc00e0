"""The merge ledger: every paid result as a JSON line, durable before it counts.

Layout: ``<ledger root>/bucket=<b>/<writer>-<n>.jsonl``, ``b = ledger_bucket(group_id)``. Nothing
is ever appended to: each group commit of a writer (a task attempt, or the driver) writes one new
immutable object per bucket it touched, ``<n>`` being the writer's commit counter, with
:meth:`~mergeit_spark.fs.Location.write_bytes` (a whole-or-nothing replace: temporary file, fsync
and rename on POSIX, one PUT on an object store). So the ledger works alike on local disk, shared
mounts and object stores (``s3a://``, ``gs://``, ``abfss://``). A bucket is read by listing its
objects (names starting with ``.`` or ``_`` and ``*.tmp`` are skipped) and folding all their lines;
files appended to by older versions (``<task attempt>.jsonl``, the same lines) are read the same
way. A bucket belongs to one Spark task at a time (the request pass hash-partitions on it), so the
objects of one bucket are written by one writer at a time.

Group commit (``LedgerWriter``): lines handed in from the event loop go to one writer thread that
takes every line waiting, writes one object per bucket they fall in (and, on POSIX, fsyncs the
bucket folder so the new name is durable too), and only once every object of the batch is written
resolves the lines' futures. A result counts as recorded once its future resolved; the stage waits
for that before it reports the group, and a task killed at any moment loses at most the results of
the batch not yet written, i.e. requests in flight. The event loop never blocks on the disk.

Order: each line carries ``seq``, a per-bucket sequence. A writer starts a bucket's sequence above
the highest ``seq`` already in that bucket (it reads the bucket before it writes to it), so within
a bucket, across tasks, attempts and runs, a later line has a larger ``seq``: "latest" never
depends on executor clocks. ``finished_ns`` (wall clock) is kept for people, not for ordering.

Spend: when the run has a budget (``merge.max_requests`` / ``merge.max_total_tokens`` /
``merge.max_cost``), every request is recorded in its group's bucket before it is sent
(``{"spend": id, "run": run, "requests": 1, "tokens": reserved, "prompt_tokens": estimate,
"completion_tokens": max_tokens}``, durable like a result), and what it really used after its reply
(``{"settle": id, "tokens": used, "prompt_tokens": p, "completion_tokens": c}``, not waited for:
an unsettled request counts its whole reservation). Cost is never written: it is the tokens at
the prices of the run that reads them (``llm.spend``), so a price given later applies to
everything already spent. A retried task, a recomputed partition and a later run count these
lines, so a cap holds whatever was killed when (``BucketState.spent``, ``ledger_spend``). Spend lines are keyed by
their id and settles by the spend id they settle: a line read twice counts once.

Compaction (``compact_bucket``, ``compact``): folds every object of a bucket into one new object
``compacted-<uuid>.jsonl``, then deletes the objects it folded, so a task reading a bucket never
lists thousands of objects. The new object holds a header line carrying the bucket's highest
``seq`` (later writers keep numbering above it), the latest line per ``(group_id, request_hash)``,
every spend line (one per id), the latest settle per spend id, and for each superseded result line
written without spend lines (a run without a budget) a small ``superseded`` line with its
identity and what it paid, so ``ledger_spend`` sums the same after as before; the superseded
lines' texts are dropped. Folding is idempotent: a compaction killed between its write and its
deletes leaves both copies, and every line that a copy repeats (a result by its identity, a spend by
its id) counts once, so the bucket reads back the same. Compaction must not run while a task
writes the ledger: the merge stage runs it on the driver after its request pass, and ``mergeit
ledger compact`` under the run root's lease.
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
from typing import Any

from ..fs import Location, resolve
from .spend import Prices, Spent, Tokens

log = logging.getLogger(__name__)

LEDGER_BUCKETS = 256   # fixed forever for a run root: bucket dirs must not move between runs
COMPACTED = "compacted-"   # name prefix of a compaction's object
READ_THREADS = 8       # objects of one bucket read at once from a remote store
COMPACT_THREADS = 4    # buckets compacted at once
_STOP = object()


def ledger_bucket(group_id: str) -> int:
    """Ledger bucket of a group: a deterministic function of its id only (any string works)."""
    return int(hashlib.sha256(group_id.encode("utf-8")).hexdigest()[:8], 16) % LEDGER_BUCKETS


def line_order(line: dict[str, Any]) -> tuple[int, int]:
    """Sort key of a ledger line: its bucket sequence (lines of older ledgers, without one, come
    first), then the writer's clock as a last resort."""
    return (int(line.get("seq") or -1), int(line.get("finished_ns") or 0))


IDENTITY = ("group_id", "request_hash", "seq", "finished_ns", "task")   # what tells result lines apart


def line_identity(line: dict[str, Any]) -> tuple:
    """What names one result line whichever copy of it is read: a compaction's copy of a line, or
    its ``superseded`` stand-in, has the identity of the line written first."""
    return tuple(line.get(k) for k in IDENTITY)


def _seq(line: dict[str, Any]) -> int:
    return int(line.get("seq") or 0)


@dataclass
class BucketState:
    """What one bucket of the ledger already holds: the latest line per (group_id, request_hash)
    and the highest sequence number written so far."""
    latest: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    max_seq: int = 0
    reserved: dict[str, tuple[str, Tokens]] = field(default_factory=dict)  # spend id -> (run, reserved)
    settled: dict[str, Tokens] = field(default_factory=dict)               # spend id -> used
    settled_seq: dict[str, int] = field(default_factory=dict, repr=False)
    batch_spends: set[str] = field(default_factory=set)   # spend ids of Batch API requests
    voided: set[str] = field(default_factory=set)          # spend ids of requests never run
    # Batch API replies per (group_id, request_hash): custom id -> reply line (``llm.batch``), and
    # the (group_id, request_hash, chain) whose chain a result line has closed.
    replies: dict[tuple[str, str], dict[str, dict[str, Any]]] = field(default_factory=dict)
    closed: set[tuple[str, str, str]] = field(default_factory=set)

    def spent(self, run: str | None = None, prices: Prices = Prices()) -> Spent:
        """Requests, tokens and cost recorded as spent in this bucket (by run ``run``, or by any);
        an unsettled request counts its whole reservation, a request never run (a batch line that
        expired unanswered) nothing; batch requests at the batch prices."""
        requests, tokens, cost = 0, 0, 0.0
        for sid, (owner, reserved) in self.reserved.items():
            if (run is None or owner == run) and sid not in self.voided:
                used = self.settled.get(sid, reserved)
                requests, tokens = requests + 1, tokens + used.total
                cost += used.cost(prices.of(sid in self.batch_spends))
        return Spent(requests, tokens, cost)

    def open_replies(self, group_id: str, request_hash: str) -> list[dict[str, Any]]:
        """The Batch API replies of the group's request whose chain no result line has closed."""
        found = self.replies.get((group_id, request_hash), {})
        return [r for r in found.values() if (group_id, request_hash, r.get("chain")) not in self.closed]

    def add(self, line: dict[str, Any]) -> None:
        """Fold one parsed line into the state (a line folded twice changes nothing)."""
        self.max_seq = max(self.max_seq, _seq(line))
        if line.get("spend"):
            sid = str(line["spend"])
            self.reserved[sid] = (str(line.get("run")), Tokens.of(line))
            if line.get("batch"):
                self.batch_spends.add(sid)
        elif line.get("settle"):
            sid = str(line["settle"])
            if line.get("void"):
                self.voided.add(sid)
            if _seq(line) >= self.settled_seq.get(sid, -1):
                self.settled[sid], self.settled_seq[sid] = Tokens.of(line), _seq(line)
        elif line.get("batch_reply"):
            key = (str(line.get("group_id")), str(line.get("request_hash")))
            self.replies.setdefault(key, {})[str(line["batch_reply"])] = line
        elif line.get("group_id") and line.get("status"):
            key = (line["group_id"], line.get("request_hash"))
            if line.get("chain"):
                self.closed.add((*key, str(line["chain"])))
            if key not in self.latest or line_order(line) >= line_order(self.latest[key]):
                self.latest[key] = line


def is_ledger_object(name: str) -> bool:
    """A ledger object (not a hidden file, not a write in progress)."""
    return not name.startswith((".", "_")) and not name.endswith(".tmp")


def bucket_objects(root: "Location | str | os.PathLike[str]", bucket: int) -> list[Location]:
    """The objects of one bucket, by name (appended files of older ledgers included)."""
    return [f for f in (resolve(root) / f"bucket={bucket}").files() if is_ledger_object(f.name)]


def _read_all(objects: list[Location]) -> list[bytes | None]:
    """Every object's bytes (None: gone since it was listed); several at once off local disk."""
    if len(objects) < 2 or objects[0].local is not None:
        return [o.read_bytes() for o in objects]
    with concurrent.futures.ThreadPoolExecutor(min(READ_THREADS, len(objects))) as pool:
        return list(pool.map(Location.read_bytes, objects))


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    """The lines of an object; a line that does not parse (an older writer killed mid-append) is
    skipped: its group is simply retried."""
    lines = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def _read_lines(root: "Location | str | os.PathLike[str]", bucket: int) -> tuple[list[Location], list[dict]]:
    """The objects of a bucket that were read and their lines, in name order. An object that is
    gone once listed (a compaction folded it meanwhile) makes the bucket be listed again."""
    for attempt in range(3):
        objects = bucket_objects(root, bucket)
        data = _read_all(objects)
        if all(d is not None for d in data) or attempt == 2:
            break
    read = [(o, d) for o, d in zip(objects, data) if d is not None]
    return [o for o, _ in read], [line for _, d in read for line in parse_lines(d)]


def read_bucket(root: "Location | str | os.PathLike[str]", bucket: int) -> BucketState:
    """The latest line per ``(group_id, request_hash)`` of one bucket, by ``seq``, its highest
    ``seq`` and its spend (``BucketState.spent``), from every object of the bucket."""
    state = BucketState()
    for line in _read_lines(root, bucket)[1]:
        state.add(line)
    return state


# -- compaction -----------------------------------------------------------------------------------
def _paid(line: dict[str, Any]) -> bool:
    return bool(int(line.get("attempts") or 0) or int(line.get("prompt_tokens") or 0)
                or int(line.get("completion_tokens") or 0))


def _superseded(line: dict[str, Any]) -> dict[str, Any]:
    """The stand-in of a superseded result line written without spend lines: its identity and
    what it paid, no texts (``ledger_spend`` counts it like the line)."""
    stub = {k: line.get(k) for k in IDENTITY}
    stub.update(superseded=True, journaled=False, run=line.get("run"),
                attempts=int(line.get("attempts") or 0), prompt_tokens=int(line.get("prompt_tokens") or 0),
                completion_tokens=int(line.get("completion_tokens") or 0))
    return stub


def fold_lines(lines: list[dict[str, Any]], objects: int = 0) -> list[dict[str, Any]]:
    """What a compaction writes for ``lines`` (a bucket's lines, in reading order): a header
    holding the highest ``seq``, the latest result per key, the ``superseded`` stand-ins of paid
    unjournaled results, every spend (one per id), the latest settle per spend id, and any other
    line once. Reading the folded lines gives the state and the spend the lines gave."""
    state = BucketState()
    for line in lines:
        state.add(line)
    winners = {line_identity(line) for line in state.latest.values()}
    stubs: dict[tuple, dict] = {}
    spends: dict[str, dict] = {}
    settles: dict[str, dict] = {}
    voids: dict[str, dict] = {}
    replies: dict[str, dict] = {}
    others: dict[str, dict] = {}
    for line in lines:
        if line.get("spend"):
            spends.setdefault(str(line["spend"]), line)
        elif line.get("settle"):
            sid = str(line["settle"])
            if line.get("void"):
                voids.setdefault(sid, line)
            elif sid not in settles or _seq(line) >= _seq(settles[sid]):
                settles[sid] = line
        elif line.get("batch_reply"):
            # A reply counts until a result closes its chain; then the result holds what it paid.
            chain = (str(line.get("group_id")), str(line.get("request_hash")), line.get("chain"))
            if chain not in state.closed:
                replies.setdefault(str(line["batch_reply"]), line)
        elif line.get("group_id") and line.get("status"):
            identity = line_identity(line)
            if identity not in winners and not line.get("journaled") and _paid(line):
                stubs.setdefault(identity, _superseded(line))
        elif line.get("superseded"):
            identity = line_identity(line)
            if identity not in winners:
                stubs.setdefault(identity, line)
        elif not line.get("compacted"):
            others.setdefault(json.dumps(line, sort_keys=True, ensure_ascii=False), line)
    header = {"compacted": uuid.uuid4().hex, "seq": state.max_seq, "objects": objects}
    return [header, *sorted(state.latest.values(), key=line_order), *stubs.values(),
            *spends.values(), *settles.values(), *voids.values(), *replies.values(), *others.values()]


def _dumps(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


def compact_bucket(root: "Location | str | os.PathLike[str]", bucket: int) -> tuple[int, int]:
    """Fold every object of one bucket into one new object, then delete those it folded; returns
    the number of objects before and after. A bucket of one object is left as it is. Run it only
    while no task writes the ledger (a line committed meanwhile to an object listed before could
    be deleted unread)."""
    folder = resolve(root) / f"bucket={bucket}"
    objects, lines = _read_lines(root, bucket)
    listed = len(objects)
    if listed <= 1:
        return listed, listed
    (folder / f"{COMPACTED}{uuid.uuid4().hex}.jsonl").write_bytes(_dumps(fold_lines(lines, listed)))
    # Durable first, then the deletes: killed in between, both copies read back as one.
    for obj in objects:
        obj.delete()
    return listed, 1


def ledger_buckets(root: "Location | str | os.PathLike[str]") -> list[int]:
    """The buckets of a ledger that have a folder (a prefix, on an object store)."""
    buckets = []
    for child in resolve(root).children():
        key, _, number = child.name.partition("=")
        if key == "bucket" and number.isdigit():
            buckets.append(int(number))
    return sorted(buckets)


def compact(root: "Location | str | os.PathLike[str]", threads: int = COMPACT_THREADS) -> dict[str, int]:
    """:func:`compact_bucket` over every bucket of the ledger (a few at once): the number of
    buckets and the objects before and after."""
    root = resolve(root)
    buckets = ledger_buckets(root)
    if not buckets:
        return {"buckets": 0, "objects_before": 0, "objects_after": 0}
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(buckets)))) as pool:
        counts = list(pool.map(lambda b: compact_bucket(root, b), buckets))
    return {"buckets": len(buckets), "objects_before": sum(c[0] for c in counts),
            "objects_after": sum(c[1] for c in counts)}


# -- writing --------------------------------------------------------------------------------------
class BucketSpend:
    """The spend journal (``llm.client.SpendJournal``) of one group: its requests are recorded in
    its bucket, under this run's id, through the task's writer."""

    def __init__(self, writer: "LedgerWriter", bucket: int, run: str) -> None:
        self.writer, self.bucket, self.run = writer, bucket, run

    async def reserve(self, reservation: Tokens) -> str:
        spend = uuid.uuid4().hex
        await self.writer.commit(self.bucket, {"spend": spend, "run": self.run, "requests": 1,
                                               "tokens": reservation.total, "prompt_tokens": reservation.prompt,
                                               "completion_tokens": reservation.completion})
        return spend

    def settle(self, spend: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.writer.submit(self.bucket, {"settle": spend, "run": self.run, "tokens": prompt_tokens + completion_tokens,
                                         "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})


class LedgerError(RuntimeError):
    """The ledger could not be written: the task must stop paying for results it cannot record."""


class LedgerWriter:
    """Group-committing writer of one task attempt (see the module docstring).

    ``task`` names the writer's objects (``<task>-<n>.jsonl``): unique per writer (a task attempt
    id carries a uuid), else two writers would replace each other's objects. ``open_bucket``
    before the first line of a bucket; ``commit`` (async) or ``submit`` (any thread) a line;
    ``close`` writes what is left and stops the thread.
    """

    def __init__(self, root: "Location | str | os.PathLike[str]", task: str, max_lines: int = 1024) -> None:
        self.root = resolve(root)
        self.task = task
        self.max_lines = max_lines
        self.commits = 0          # group commits (each: one object per bucket touched)
        self.lines = 0
        self.objects = 0          # objects written
        self._next_seq: dict[int, int] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"ledger-{task[:8]}", daemon=True)
        self._thread.start()

    def open_bucket(self, bucket: int, max_seq: int) -> None:
        """Number this writer's lines of ``bucket`` after ``max_seq`` (read from the bucket)."""
        self._next_seq[bucket] = max(self._next_seq.get(bucket, 0), max_seq + 1)

    def submit(self, bucket: int, line: dict[str, Any]) -> concurrent.futures.Future:
        """Queue ``line``; the future resolves to its ``seq`` once it is durable."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._error is not None:
            future.set_exception(LedgerError(f"ledger writer failed: {self._error}"))
        else:
            self._queue.put((bucket, line, future))
        return future

    async def commit(self, bucket: int, line: dict[str, Any]) -> int:
        """Write ``line`` durably; returns when it is written (raises ``LedgerError`` if not)."""
        return await asyncio.wrap_future(self.submit(bucket, line))

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

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

    def object_name(self, commit: int) -> str:
        return f"{self.task}-{commit:06d}.jsonl"

    def _write(self, batch: list[tuple[int, dict[str, Any], concurrent.futures.Future]]) -> None:
        try:
            if self._error is not None:
                raise self._error
            texts: dict[int, list[str]] = {}
            seqs = []
            for bucket, line, _ in batch:
                seq = self._next_seq.get(bucket, 1)
                self._next_seq[bucket] = seq + 1
                line["seq"] = seq
                texts.setdefault(bucket, []).append(json.dumps(line, ensure_ascii=False) + "\n")
                seqs.append(seq)
            name = self.object_name(self.commits)
            for bucket, lines in texts.items():
                folder = self.root / f"bucket={bucket}"
                (folder / name).write_bytes("".join(lines).encode("utf-8"))  # durable, name and all
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            self._error = exc
            log.error("ledger write failed under %s: %s", self.root, exc)
            for _, _, future in batch:
                future.set_exception(LedgerError(f"ledger write failed: {exc}"))
            return
        self.commits += 1
        self.objects += len(texts)
        self.lines += len(batch)
        for (_, _, future), seq in zip(batch, seqs):
            future.set_result(seq)
