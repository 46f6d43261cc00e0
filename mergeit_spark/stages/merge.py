"""Merge stage: ask an LLM to merge each group into one richer example, gate the result, and keep
a ledger so that no merge is ever paid for twice.

How it runs on Spark
  0. ``plan_requests`` (driver): refuses ``spark.speculation`` (two live attempts of a task would
     both pay), counts what the ledger has spent when there is a budget, and sends the preflight
     request (``llm.preflight``): a server that cannot answer fails the run here, before any task
     starts or any group is marked. The server's context window, when it says, is kept for the
     ``prompt_too_long`` check.
  1. ``build_jobs``: explode each group's ``member_ids``, join ``records`` (texts) and
     ``embeddings`` (Spark joins), gather the members back per group sorted by id; an Arrow pass
     adds the ledger ``bucket`` and the ``request_hash`` (hash of the exact prompt, model and
     request settings, see ``llm.prompt.prompt_hash``), reading only the texts (embeddings stay in
     Arrow).
  2. ``request_pass``: P partitions of contiguous bucket ranges (``bucket_ranges``; P =
     ``merge.partitions`` or Spark's default parallelism), sorted by bucket inside each
     partition, then ``mapInArrow`` with ``MergeTask``. Each task runs ONE event loop for its
     whole partition (``llm.pump.RequestPump``): its thread reads the Arrow batches, answers
     from the ledger what the ledger already holds, and feeds the rest into a bounded queue (2 x
     ``llm.concurrency``) that ``llm.concurrency`` workers drain, one group at a time each, with
     no barrier between batches. Member embeddings go from Arrow to numpy directly. Results
     stream back as Arrow batches of a few hundred rows.
  3. The pass returns one row per group (its merges row and what this run paid for it); it is
     persisted, summed into the run's summary (a few aggregate rows reach the driver) and written
     as ``merges`` with ``ctx.store.write``. A group's row is its latest ledger line. The same
     aggregation fingerprints the rows (``MergeRunSummary.content``); when they equal the rows of
     the last run that wrote ``merges`` and no one has written it since, no new version is written
     (a rerun that changed nothing pays no Delta commit).

Per group (one worker): request, validate, regenerate, gate (``llm.gate.BatchGate``: merged texts
of the groups finishing together are embedded in one ``encode_texts`` call on a worker thread,
with the embed stage's model and precision), then the result goes to the ledger.

The ledger (``llm.ledger``; ``<run root>/_ledger/merges/bucket=<b>/<task attempt>-<n>.jsonl``)
  * Group commit: a writer thread takes every waiting line and writes, per bucket they fall in,
    one new immutable object (never an append: the same on POSIX and object stores), then
    releases them; a worker reports its group (and takes the next one) only once its line is
    durable. So a task killed at any moment never re-pays a recorded result and loses at most the
    requests in flight; the event loop never waits on the disk. A ledger that cannot be written
    fails the task.
  * Before calling the LLM, a task reads the ledger buckets it holds. A group whose latest line
    for its ``(group_id, request_hash)`` is terminal (``merged``/``gate_failed``) is answered from
    the ledger; judged under other gate settings (``gate.*``, ``merge.max_output_chars``, the
    embedding model), it is re-judged with no request. A group whose reply stayed invalid after
    every regeneration (``invalid_output``) is not re-paid either, unless ``merge.retry_failed``
    (``mergeit run --retry-failed``), a larger ``merge.regenerations``, or a changed request (other
    prompt, model or request settings: another ``request_hash``). Other failures (transport,
    server, ``budget_exhausted``, ``circuit_open``, a crash) are retried by the next run; until
    then the stage is not current (its ``Shortfall``). A ``truncated`` reply is not re-paid for
    the same request; a ``prompt_too_long`` group is checked again (it costs nothing).
  * ``bucket = sha256(group_id)[:8] % 256``: fixed, independent of P, so a rerun with other
    partitions (a laptop run continued on a cluster) still finds its ledger. A partition holds
    whole buckets: a contiguous range of them, the same number per task give or take one
    (``bucket_ranges``).
  * "Latest" is the per-bucket sequence ``seq`` (a writer numbers its lines after the highest
    ``seq`` in the bucket), never an executor's clock.
  * The run root must be a place every executor can write and read: local disk in local mode; on
    a cluster a shared mount (NFS, EFS) or an object store (``s3a://``, ``gs://``, ``abfss://``;
    ``fs.resolve``). A bucket is read by listing its objects.
  * Compaction: once the request pass is done (and again with ``mergeit ledger compact``), the
    driver folds each bucket's objects into one (``llm.ledger.compact``): the latest line per
    ``(group_id, request_hash)``, every spend line, the latest settle, the highest ``seq``. So a
    task never lists thousands of objects; nothing it answers or counts changes.
  * Speculative execution (``spark.speculation``) is refused: two live attempts of one task would
    both pay.

Budget and rate (``merge.max_requests`` / ``merge.max_total_tokens`` / ``merge.max_cost``, 0 = no cap;
``llm.requests_per_minute`` / ``llm.tokens_per_minute``, 0 = no limit)
  The caps are for the run root, counted from the ledger. With a cap, every request is recorded in
  its group's bucket before it is sent (``llm.ledger.BucketSpend``), and the preflight's on the
  driver. A run starts from what the ledger holds as spent (``ledger_spend``: every run before it,
  killed ones included) and splits what is left across the ledger buckets in proportion to their
  number of groups. A task adds a bucket's share, less what this run already spent in that bucket
  (an earlier attempt of the task, a partition Spark computes again), to its allowance when it
  reaches the bucket (partitions are sorted by bucket), so no task spends another task's share.
  Requests (retries included) never exceed ``max_requests``; tokens never exceed
  ``max_total_tokens``, nor their cost ``max_cost`` (prompt and completion tokens at
  ``llm.price_input_per_million`` / ``llm.price_output_per_million``, ``llm.spend``), unless a
  server counts more prompt tokens than the client's estimate, since a request is only sent if its
  worst case (estimate + ``llm.max_tokens``) fits. Groups left when
  the allowance runs out are recorded ``failed`` with error ``budget_exhausted``. The per-minute
  limits are split evenly across the tasks that run at once (min(P, Spark's default
  parallelism)); 429s and Retry-After are honoured on top (``llm.client``).

Statuses: ``merged`` (valid and passed the gate), ``gate_failed`` (valid reply that failed the
gate: its text is KEPT in instruction/input/output so the report can show it; finalize uses only
``merged`` rows), ``failed`` (no valid reply; text null). A failure's ``error`` starts with its
kind: ``http_<status>``, ``connection``, ``timeout``, ``malformed_response``, ``circuit_open``,
``budget_exhausted``, ``internal`` (a rerun retries these), ``invalid_output``, ``truncated``,
``prompt_too_long``, ``missing_member`` (it does not; ``llm.client.rerun_can_fix``).
``attempts`` counts HTTP requests sent for the result (retries and regenerations included),
``latency_ms`` the time spent waiting on them. An attempt counts from the moment it is started, so
the count errs towards spend: one that timed out may never have reached the server (a worker
stalled for longer than ``llm.request_timeout_s`` times out before its bytes leave).
``gate`` is the verdict as JSON, including the checks that failed: ``gate_rejections(merges)``
counts them per check.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, AsyncIterator, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..config import DecontamSettings, EmbedSettings, GateSettings, LLMSettings, MergeSettings, Settings
from ..session import parallelism
from ..fs import Location, resolve
from ..llm.client import (ERROR_BUDGET, ERROR_INVALID, ERROR_MISSING_MEMBER, ERROR_PROMPT_TOO_LONG,
                          ERROR_TRUNCATED, STATUS_FAILED, STATUS_GATE_FAILED, STATUS_MERGED, Budget,
                          MergeClient, MergeResult, error_kind, rerun_can_fix, validate_merged)
from ..llm.gate import BatchGate, GroupSources, model_encoder
from ..llm.batch import ERROR_PENDING, open_batches
from ..llm.ledger import (IDENTITY, LEDGER_BUCKETS, BucketSpend, BucketState, LedgerWriter, compact,
                          ledger_bucket, ledger_buckets, read_bucket)
from ..llm.preflight import Preflight, preflight
from ..llm.progress import MergeProgress
from ..llm.spend import Prices, Spent
from ..llm.prompt import build_messages, prompt_hash
from ..llm.tokens import fewest_prompt_tokens
from ..llm.pump import RequestPump
from ..llm.stop import ERROR_INTERRUPTED, DriverStop, StopMarker, TaskStop, clear_stops, ignoring_interrupts
from ..models import load_model
from ..redact import install_log_scrubbing
from ..tables import RUN_LOG, TableStore, Write
from . import Shortfall, Stage, StageContext, StageError, StageOutput, rows_added, with_added
from .decontam import CONTAMINATED, RECORD_COLUMNS, contaminated_texts, gram_lengths

log = logging.getLogger(__name__)

LEDGER_NAME = "merges"        # the ledger's folder: <root>/_ledger/merges (TableStore.ledger_path)
LEDGER_DIR = "_ledger/" + LEDGER_NAME
TERMINAL = (STATUS_MERGED, STATUS_GATE_FAILED)
MISSING_HASH = ""             # request_hash of a group that cannot be requested (member missing)
PASS_ROWS = 256               # result rows per Arrow batch a task streams back

MERGES_SCHEMA = T.StructType([
    T.StructField("group_id", T.StringType(), False),
    T.StructField("request_hash", T.StringType()),
    T.StructField("status", T.StringType(), False),
    T.StructField("instruction", T.StringType()),
    T.StructField("input", T.StringType()),
    T.StructField("output", T.StringType()),
    T.StructField("model", T.StringType()),
    T.StructField("attempts", T.IntegerType()),
    T.StructField("prompt_tokens", T.LongType()),
    T.StructField("completion_tokens", T.LongType()),
    T.StructField("latency_ms", T.DoubleType()),
    T.StructField("error", T.StringType()),
    T.StructField("gate", T.StringType()),
])
# A ledger line: a merges row plus what the ledger itself needs.
LEDGER_SCHEMA = T.StructType(list(MERGES_SCHEMA.fields) + [
    T.StructField("acceptance", T.StringType()),   # hash of the gate settings that judged it
    T.StructField("regenerations", T.IntegerType()),  # merge.regenerations the result had
    T.StructField("seq", T.LongType()),            # per-bucket sequence: orders the lines of a group
    T.StructField("finished_ns", T.LongType()),    # writer's wall clock, for people only
    T.StructField("task", T.StringType()),         # task attempt that wrote it
])
MEMBER_FIELDS = ("id", "instruction", "input", "output", "embedding")
TEXT_FIELDS = ("id", "instruction", "input", "output")
JOB_SCHEMA = T.StructType([
    T.StructField("group_id", T.StringType(), False),
    T.StructField("bucket", T.IntegerType(), False),
    T.StructField("request_hash", T.StringType(), False),
    T.StructField("missing", T.StringType()),      # comma-separated member ids without text/embedding
    T.StructField("members", T.ArrayType(T.StructType([
        T.StructField("id", T.StringType()),
        T.StructField("instruction", T.StringType()),
        T.StructField("input", T.StringType()),
        T.StructField("output", T.StringType()),
        T.StructField("embedding", T.ArrayType(T.FloatType())),
    ]))),
])
# What the request pass returns per group: its merges row, plus what THIS run paid for it and
# where the result came from (aggregated for the summary; never collected per group).
PASS_SCHEMA = T.StructType(list(MERGES_SCHEMA.fields) + [
    T.StructField("source", T.StringType()),       # llm | ledger | rejudged | missing
    T.StructField("gate_failed", T.StringType()),  # comma-separated checks a gate_failed merge failed
    T.StructField("paid_requests", T.LongType()),
    T.StructField("paid_prompt_tokens", T.LongType()),
    T.StructField("paid_completion_tokens", T.LongType()),
])


def request_settings(llm: LLMSettings) -> dict[str, Any]:
    """The request settings that change what the LLM is asked (part of the request hash)."""
    return {"temperature": llm.temperature, "max_tokens": llm.max_tokens, "json_mode": llm.json_mode}


def acceptance_key(gate: GateSettings, merge: MergeSettings, embed: EmbedSettings,
                   copy_length_ratio: float) -> str:
    """Hash of everything that decides whether a reply is accepted; a ledger line judged under a
    different key is re-judged (no new request)."""
    payload = {"gate": asdict(gate), "max_output_chars": merge.max_output_chars,
               "embed_model": embed.model, "copy_length_ratio": copy_length_ratio}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# -- 1. jobs ------------------------------------------------------------------------------------
def _member_texts(members: pa.ListArray) -> tuple[np.ndarray, dict[str, list]]:
    """Per-row member offsets and the members' text fields as Python lists (no embeddings)."""
    lengths = pc.list_value_length(members).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = members.flatten()
    return offsets, {f: flat.field(f).to_pylist() for f in TEXT_FIELDS}


def _member_vectors(members: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """All members' embeddings as one ``(members, dim)`` float32 array (zeros where missing) and
    a mask of the members that have one; straight from Arrow, never through Python lists."""
    emb = members.flatten().field("embedding")
    lengths = pc.list_value_length(emb).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    dim = int(lengths.max()) if lengths.size else 0
    values = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    has = lengths == dim if dim else np.zeros(len(lengths), dtype=bool)
    if has.all():
        return values.reshape(len(lengths), dim), has
    vectors = np.zeros((len(lengths), dim), dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = np.nonzero(has)[0]
    vectors[rows] = values[starts[rows, None] + np.arange(dim)]
    return vectors, has


@dataclass(frozen=True)
class _AddRequestHash:
    llm: LLMSettings

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        settings = request_settings(self.llm)
        for batch in batches:
            members = batch.column("members")
            offsets, texts = _member_texts(members)
            _, has_vector = _member_vectors(members)
            gids = batch.column("group_id").to_pylist()
            hashes, missing = [], []
            for row in range(batch.num_rows):
                lo, hi = int(offsets[row]), int(offsets[row + 1])
                group = [{f: texts[f][i] for f in TEXT_FIELDS} for i in range(lo, hi)]
                absent = [texts["id"][i] for i in range(lo, hi)
                          if texts["instruction"][i] is None or not has_vector[i]]
                missing.append(",".join(absent) or None)
                usable = not absent and len(group) >= 2
                hashes.append(prompt_hash(build_messages(group), self.llm.model, settings)
                              if usable else MISSING_HASH)
            yield pa.RecordBatch.from_arrays(
                [batch.column("group_id"), pa.array([ledger_bucket(g) for g in gids], pa.int32()),
                 pa.array(hashes, pa.string()), pa.array(missing, pa.string()), members],
                names=[f.name for f in JOB_SCHEMA.fields])


def build_jobs(groups: DataFrame, records: DataFrame, embeddings: DataFrame,
               llm: LLMSettings) -> DataFrame:
    """One row per group: bucket, request hash and the members' texts and embeddings."""
    # A group listed twice would otherwise collect its members twice.
    exploded = (groups.select("group_id", "member_ids").dropDuplicates(["group_id"])
                .select("group_id", F.explode("member_ids").alias("id")))
    members = (exploded
               .join(records.select("id", "instruction", "input", "output"), on="id", how="left")
               .join(embeddings.select("id", "embedding"), on="id", how="left"))
    # Sorted by member id (the struct's first field) in Spark: the prompt lists them in this order.
    gathered = (members.groupBy("group_id")
                .agg(F.sort_array(F.collect_list(F.struct(*[F.col(c) for c in MEMBER_FIELDS])))
                     .alias("members")))
    return gathered.mapInArrow(_AddRequestHash(llm), JOB_SCHEMA)


@dataclass
class Job:
    """One group on its way through a task."""
    group_id: str
    bucket: int
    request_hash: str
    missing: str | None
    members: list[dict[str, Any]]
    vectors: np.ndarray
    hit: dict[str, Any] | None = None   # a terminal ledger line to re-judge instead of requesting


def decode_jobs(batch: pa.RecordBatch) -> list[Job]:
    """The jobs of one Arrow batch of ``JOB_SCHEMA``."""
    members = batch.column("members")
    offsets, texts = _member_texts(members)
    vectors, _ = _member_vectors(members)
    jobs = []
    for row, (gid, bucket, rh, missing) in enumerate(zip(
            batch.column("group_id").to_pylist(), batch.column("bucket").to_pylist(),
            batch.column("request_hash").to_pylist(), batch.column("missing").to_pylist())):
        lo, hi = int(offsets[row]), int(offsets[row + 1])
        group = [{f: texts[f][i] for f in TEXT_FIELDS} for i in range(lo, hi)]
        jobs.append(Job(gid, int(bucket), rh, missing, group, vectors[lo:hi]))
    return jobs


# -- 2. the request pass ------------------------------------------------------------------------
@dataclass(frozen=True)
class BudgetShares:
    """Per-bucket shares of the run's request, token and money caps (0 = no cap)."""
    requests: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    cost: dict[int, float] = field(default_factory=dict)
    cap_requests: bool = False
    cap_tokens: bool = False
    cap_cost: bool = False
    prices: Prices = Prices()

    @property
    def capped(self) -> bool:
        return self.cap_requests or self.cap_tokens or self.cap_cost


def split_budget(total: int, counts: dict[int, int]) -> dict[int, int]:
    """Split ``total`` across buckets in proportion to ``counts``; shares sum to exactly ``total``
    (largest remainders get the leftover units)."""
    n = sum(counts.values())
    if total <= 0 or n == 0:
        return {b: 0 for b in counts}
    exact = {b: total * c / n for b, c in counts.items()}
    shares = {b: int(v) for b, v in exact.items()}
    left = total - sum(shares.values())
    for b in sorted(exact, key=lambda b: (-(exact[b] - shares[b]), b))[:left]:
        shares[b] += 1
    return shares


def split_amount(total: float, counts: dict[int, int]) -> dict[int, float]:
    """Split a money amount across buckets in proportion to ``counts`` (no unit to round to)."""
    n = sum(counts.values())
    return {b: (total * c / n if total > 0 and n else 0.0) for b, c in counts.items()}


def answered_by_ledger(line: dict[str, Any], merge: MergeSettings) -> bool:
    """Whether the ledger's latest line for a group's request spares the request: a terminal
    result (re-judged when the gate settings changed, never sent again) or a settled failure."""
    return line.get("status") in TERMINAL or settled_failure(line, merge)


def settled_failure(line: dict[str, Any], merge: MergeSettings) -> bool:
    """A failed result that a plain rerun does not pay for again: the reply stayed invalid after
    at least as many regenerations as the current settings allow, or it was cut at ``llm.max_tokens``
    (``truncated``: the same request, ``max_tokens`` included in its hash, is cut the same way)."""
    if line.get("status") != STATUS_FAILED or merge.retry_failed:
        return False
    kind = error_kind(line.get("error"))
    if kind == ERROR_TRUNCATED:
        return True
    return kind == ERROR_INVALID and int(line.get("regenerations") or 0) >= merge.regenerations


@dataclass
class _TaskState:
    """What one task knows: the ledger buckets read so far, its budget, its ledger writer."""
    writer: LedgerWriter
    budget: Budget
    buckets: dict[int, BucketState] = field(default_factory=dict)
    groups: int = 0
    stop: TaskStop | None = None
    stager: Any = None   # batch mode: the partition's batch input files (``llm.batch.Stager``)


@dataclass(frozen=True)
class MergeTask:
    """The request pass over one partition: the callable ``mapInArrow`` runs in each task,
    shipped to executors (settings and paths only)."""
    llm: LLMSettings
    merge: MergeSettings
    gate: GateSettings
    embed: EmbedSettings
    ledger_root: Location
    shares: BudgetShares
    copy_length_ratio: float
    loops: int = 1   # tasks running at once: they share the per-minute rate limits
    run_id: str = ""                   # this run of the pass: spend lines carry it
    context_tokens: int | None = None  # the model's context window, when known
    stop: StopMarker | None = None     # where a graceful stop is asked (``llm.stop``)

    @property
    def journaled(self) -> bool:
        """Requests are recorded before they are sent when the run has a budget."""
        return self.shares.capped

    @cached_property
    def acceptance(self) -> str:
        return acceptance_key(self.gate, self.merge, self.embed, self.copy_length_ratio)

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        _worker_logging()
        task = _task_attempt_id()
        state = self._new_state(task)
        workers = self.llm.concurrency
        with ignoring_interrupts():
            try:
                with RequestPump(lambda: self._session(state, task), workers, 2 * workers) as pump:
                    for batch in batches:
                        yield from self._feed(pump, state, *self._triage(decode_jobs(batch), state))
                    for rows in pump.finish(PASS_ROWS):
                        yield _pass_batch(rows)
                self._finish(state)
            finally:
                state.writer.close()
        log.info("merge task %s: %d groups, %d ledger commits for %d lines (budget: %d requests, "
                 "%d tokens used)", task[:8], state.groups, state.writer.commits, state.writer.lines,
                 state.budget.requests, state.budget.tokens)

    def _new_state(self, task: str) -> _TaskState:
        return _TaskState(LedgerWriter(self.ledger_root, task),
                          Budget(0 if self.shares.cap_requests else None, 0 if self.shares.cap_tokens else None,
                                 0.0 if self.shares.cap_cost else None, self.shares.prices),
                          stop=TaskStop(self.stop) if self.stop is not None else None)

    def _finish(self, state: _TaskState) -> None:
        """After the last group of the partition, before the ledger writer closes."""

    def _feed(self, pump: RequestPump, state: _TaskState, rows: list[dict], todo: list[Job]) -> Iterator[pa.RecordBatch]:
        """Hand one input batch's jobs to the pump, a queue's worth at a time, and stream back the
        results ready; once a stop is asked, the jobs not handed over end ``interrupted``."""
        if todo:
            # The gate's model, loaded before the first request rather than by the first verdict:
            # loading holds the interpreter (and freezes the worker's heap) for a while, which must
            # not eat in-flight requests' timeouts.
            load_model(self.embed)
        for start in range(0, len(todo), pump.queue_size):
            if state.stop is not None and state.stop.asked():
                rows.extend(self._interrupted(job) for job in todo[start:])
                break
            pump.put(todo[start:start + pump.queue_size])
            rows.extend(pump.take())
            if len(rows) >= PASS_ROWS:
                yield _pass_batch(rows)
                rows = []
        if rows:
            yield _pass_batch(rows)

    def _triage(self, jobs: list[Job], state: _TaskState) -> tuple[list[dict], list[Job]]:
        """Split jobs into results the ledger already holds and jobs for the loop."""
        rows, todo = [], []
        for job in jobs:
            state.groups += 1
            bucket = self._open_bucket(job.bucket, state)
            line = bucket.latest.get((job.group_id, job.request_hash))
            if line is not None and job.request_hash == MISSING_HASH:
                rows.append(_pass_row(line, "missing"))
            elif line is not None and answered_by_ledger(line, self.merge):
                if line.get("status") in TERMINAL and line.get("acceptance") != self.acceptance:
                    job.hit = line   # judged under other gate settings: judged again, not requested
                    todo.append(job)
                else:
                    rows.append(_pass_row(line, self._ledger_source(line)))
            else:
                todo.append(job)
        return rows, todo

    def _interrupted(self, job: Job) -> dict[str, Any]:
        """The row of a group not sent because a stop was asked."""
        return _unsent_row(job, self.llm.model, f"{ERROR_INTERRUPTED}: stopped before it was sent", "interrupted")

    def _ledger_source(self, line: dict[str, Any]) -> str:
        """The source of a group the ledger answers."""
        return "ledger"

    def _open_bucket(self, bucket: int, state: _TaskState) -> BucketState:
        known = state.buckets.get(bucket)
        if known is None:
            known = state.buckets[bucket] = read_bucket(self.ledger_root, bucket)
            state.writer.open_bucket(bucket, known.max_seq)
            # A bucket's share less what this run already spent on it (a killed attempt of this
            # task, a partition Spark computes again): the cap holds across both.
            spent = known.spent(self.run_id, self.shares.prices)
            state.budget.grant(self.shares.requests.get(bucket, 0) - spent.requests,
                               self.shares.tokens.get(bucket, 0) - spent.tokens,
                               self.shares.cost.get(bucket, 0.0) - spent.cost)
        return known

    @asynccontextmanager
    async def _session(self, state: _TaskState, task: str) -> AsyncIterator[Callable]:
        """The loop side of a task: one client, one batching gate; ``handle`` per job."""
        async with MergeClient(self.llm, self.merge, state.budget, loops=self.loops) as client:
            gate = BatchGate(model_encoder(self.embed), self.gate, self.copy_length_ratio,
                             max_batch=max(self.embed.batch_size, 4 * self.llm.concurrency))

            async def handle(job: Job) -> dict[str, Any]:
                if state.stop is not None and state.stop.asked():   # queued, not yet sent: not sent
                    return self._interrupted(job)
                journal = BucketSpend(state.writer, job.bucket, self.run_id) if self.journaled else None
                result, source = await self._outcome(job, client, gate, journal)
                line = self._line(job, result, task)
                await state.writer.commit(job.bucket, line)   # durable before it is reported
                return _pass_row(line, source, paid=result if source == "llm" else None)

            yield handle

    async def _outcome(self, job: Job, client: MergeClient, gate: BatchGate,
                       journal: BucketSpend | None) -> tuple[MergeResult, str]:
        if job.request_hash == MISSING_HASH:
            return MergeResult(status=STATUS_FAILED, error=f"{ERROR_MISSING_MEMBER}: "
                               + (job.missing or "fewer than 2 members")), "missing"
        try:
            sources = GroupSources(job.members, job.vectors)
            if job.hit is not None:
                return await _rejudge(job.hit, sources, gate, self.merge.max_output_chars), "rejudged"
            messages = build_messages(job.members)
            too_long = self._too_long(messages)
            if too_long:
                return MergeResult(status=STATUS_FAILED, error=too_long), "llm"
            judge = lambda merged: gate.judge(merged, sources)  # noqa: E731
            return await client.merge(job.members, gate=judge, messages=messages, journal=journal), "llm"
        except Exception as exc:  # noqa: BLE001 - one group must not sink the partition
            log.exception("merge of group %s crashed", job.group_id)
            return MergeResult(status=STATUS_FAILED, error=f"internal: {type(exc).__name__}"), "llm"

    def _too_long(self, messages: list[dict[str, str]]) -> str | None:
        """Why a prompt cannot fit the model's context with room for ``llm.max_tokens``, or None.
        Counted at the fewest tokens any tokenizer spends, not the budget's worst case: a prompt
        is refused only when it surely does not fit (the server's own 400 is the backstop)."""
        if not self.context_tokens:
            return None
        prompt = fewest_prompt_tokens(messages)
        if prompt + self.llm.max_tokens <= self.context_tokens:
            return None
        return (f"{ERROR_PROMPT_TOO_LONG}: at least {prompt} prompt tokens + llm.max_tokens "
                f"{self.llm.max_tokens} exceed the model's context of {self.context_tokens} tokens")

    def _line(self, job: Job, result: MergeResult, task: str) -> dict[str, Any]:
        line = {"group_id": job.group_id, "request_hash": job.request_hash,
                "model": self.llm.model, "acceptance": self.acceptance,
                "regenerations": self.merge.regenerations, "run": self.run_id,
                "journaled": self.journaled}
        line.update(result.as_dict())
        if result.status == STATUS_FAILED:
            line.update(instruction=None, input=None, output=None)
        line.update(finished_ns=time.time_ns(), task=task)
        return line


async def _rejudge(hit: dict, sources: GroupSources, gate: BatchGate, max_chars: int) -> MergeResult:
    """A terminal ledger result judged again under the current gate (no request)."""
    paid = {k: hit.get(k) or 0 for k in ("attempts", "prompt_tokens", "completion_tokens", "latency_ms")}
    candidate = {k: hit.get(k) for k in ("instruction", "input", "output")}
    merged, why = validate_merged(json.dumps(candidate), max_chars)
    if merged is None:
        return MergeResult(status=STATUS_FAILED, error=f"{ERROR_INVALID}: {why}", **paid)
    verdict = await gate.judge(merged, sources)
    if verdict.passed:
        return MergeResult(status=STATUS_MERGED, gate=verdict.describe(), **merged, **paid)
    return MergeResult(status=STATUS_GATE_FAILED, gate=verdict.describe(),
                       error="gate: " + ",".join(verdict.failed), **merged, **paid)


def _gate_failed(status: str | None, gate: str | None) -> str | None:
    if status != STATUS_GATE_FAILED or not gate:
        return None
    try:
        return ",".join(json.loads(gate).get("failed") or []) or None
    except (json.JSONDecodeError, AttributeError):
        return None


def _pass_row(line: dict[str, Any], source: str, paid: MergeResult | None = None) -> dict[str, Any]:
    """The pass output of one group: its ledger line as a merges row, and what this run paid
    (nothing when the ledger answered)."""
    row = {f.name: line.get(f.name) for f in MERGES_SCHEMA.fields}
    row.update(source=source, gate_failed=_gate_failed(line.get("status"), line.get("gate")),
               paid_requests=paid.attempts if paid else 0,
               paid_prompt_tokens=paid.prompt_tokens if paid else 0,
               paid_completion_tokens=paid.completion_tokens if paid else 0)
    return row


def _unsent_row(job: Job, model: str, error: str, source: str) -> dict[str, Any]:
    """The pass output of a group that got no result this pass (stopped, waiting on a batch):
    ``failed`` with ``error``, in no ledger line, so that the next run takes it up."""
    row = {f.name: None for f in PASS_SCHEMA.fields}
    row.update(group_id=job.group_id, request_hash=job.request_hash, status=STATUS_FAILED, model=model,
               attempts=0, prompt_tokens=0, completion_tokens=0, latency_ms=0.0, error=error, source=source,
               paid_requests=0, paid_prompt_tokens=0, paid_completion_tokens=0)
    return row


def _pass_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=_arrow_schema(PASS_SCHEMA))


def _worker_logging() -> None:
    """Progress lines from executors go to the executor's stderr (its log), at INFO, with
    secrets and URL credentials masked in every record of the worker process (the task's, the
    LLM client's, the ledger's): importing the package installs no scrubbing, so the task does."""
    install_log_scrubbing()
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _task_attempt_id() -> str:
    """A unique name for this task attempt: Spark's ids when in a task, plus a random uuid."""
    try:
        from pyspark import TaskContext
        ctx = TaskContext.get()
    except Exception:  # noqa: BLE001 - outside Spark
        ctx = None
    prefix = f"p{ctx.partitionId()}-a{ctx.taskAttemptId()}-" if ctx is not None else ""
    return prefix + uuid.uuid4().hex


def _arrow_schema(schema: T.StructType) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema
    return to_arrow_schema(schema)


@dataclass
class MergeRunSummary:
    """What one run of the merge stage did and paid (requests and tokens sent THIS run)."""
    groups: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_status: dict[str, int] = field(default_factory=dict)      # status of each group after this run
    by_source: dict[str, int] = field(default_factory=dict)      # llm / ledger / rejudged / missing
    errors: dict[str, int] = field(default_factory=dict)         # error kind -> failed groups
    gate_rejections: dict[str, int] = field(default_factory=dict)  # check -> gate_failed groups
    budget_exhausted: int = 0
    preflight_requests: int = 0  # the driver's check before the pass (not in requests)
    preflight_tokens: int = 0
    cost: float = 0.0            # this run's tokens, the preflight's included, at llm.price_*
    partitions: int = 0
    seconds: float = 0.0
    table_version: int | None = None
    content: str = ""            # fingerprint of the merges rows this run produced (see summarise)
    rewritten: bool = True       # False: `merges` already held exactly these rows, no new version
    ledger_objects: dict[str, int] = field(default_factory=dict)  # compaction: objects before, after
    stopped: bool = False        # a stop was asked (Ctrl-C, `mergeit stop`): groups left for the next run
    batches: dict[str, Any] = field(default_factory=dict)         # batch mode: ``llm.batch.BookStats``

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def retryable_failed(self) -> int:
        """Failed groups a plain rerun retries (``rerun_can_fix``)."""
        return sum(n for kind, n in self.errors.items() if rerun_can_fix(kind))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_tokens"] = self.total_tokens
        out["retryable_failed"] = self.retryable_failed
        return out

    def add_preflight(self, checked: Preflight) -> None:
        """The driver's preflight: counted apart from the groups' requests (and in the budget)."""
        self.preflight_requests += checked.requests
        self.preflight_tokens += checked.tokens

    def shortfall(self, merge: MergeSettings) -> Shortfall | None:
        """The groups a rerun must retry, if any: they keep the stage from being current."""
        return merge_shortfall(self.errors, self.groups, merge)

    def add(self, row: Any) -> None:
        """Fold in one aggregate row of the request pass."""
        n = int(row["groups"])
        self.groups += n
        self.requests += int(row["requests"] or 0)
        self.prompt_tokens += int(row["prompt_tokens"] or 0)
        self.completion_tokens += int(row["completion_tokens"] or 0)
        self.by_status[row["status"]] = self.by_status.get(row["status"], 0) + n
        self.by_source[row["source"]] = self.by_source.get(row["source"], 0) + n
        if row["error_kind"]:
            self.errors[row["error_kind"]] = self.errors.get(row["error_kind"], 0) + n
        if row["error_kind"] == ERROR_BUDGET:
            self.budget_exhausted += n
        for check in (row["gate_failed"] or "").split(","):
            if check:
                self.gate_rejections[check] = self.gate_rejections.get(check, 0) + n
        xor, low = (int(row["content_xor"] or 0), int(row["content_sum"] or 0))
        count, seen_xor, seen_low = (int(v, 16) for v in (self.content or "0:0:0").split(":"))
        self.content = f"{count + n:x}:{(seen_xor ^ xor) & _MASK64:x}:{seen_low + low:x}"


def merge_shortfall(errors: dict[str, int], groups: int, merge: MergeSettings) -> Shortfall | None:
    """From a pass's failed groups per error kind: those a rerun retries, as a ``Shortfall``
    whose message names the top errors and the command that retries them."""
    retryable = {k: n for k, n in errors.items() if rerun_can_fix(k)}
    failed = sum(retryable.values())
    if not failed:
        return None
    top = ", ".join(f"{k} ({n})" for k, n in sorted(retryable.items(), key=lambda kv: -kv[1])[:3])
    hint = ("; raise merge.max_requests / merge.max_total_tokens / merge.max_cost first"
            if ERROR_BUDGET in retryable else "")
    # A stopped run, or one that left batches open, did not do its work: never within tolerance.
    unfinished = ERROR_INTERRUPTED in retryable or ERROR_PENDING in retryable
    return Shortfall(failed=failed, total=groups, tolerance=0.0 if unfinished else merge.max_failed_share,
                     message=(f"{failed} of {groups} merge groups failed for a reason a rerun can fix: "
                              f"{top}. Run the same `mergeit run` again to retry exactly those "
                              f"(nothing already paid is paid again){hint}"))


def capped(merge: MergeSettings) -> bool:
    """Whether the run has a budget (requests, tokens or money): its requests are journaled."""
    return merge.max_requests > 0 or merge.max_total_tokens > 0 or merge.max_cost > 0


def _budget_shares(jobs: DataFrame, settings: Settings, left: Spent) -> BudgetShares:
    """What is left of the caps, split across the buckets in proportion to their groups."""
    merge = settings.merge
    if not capped(merge):
        return BudgetShares()  # no caps: no need to count groups per bucket
    counts = {int(r["bucket"]): int(r["count"])
              for r in jobs.groupBy("bucket").count().collect()}  # <= LEDGER_BUCKETS small rows
    return BudgetShares(requests=split_budget(left.requests, counts), tokens=split_budget(left.tokens, counts),
                        cost=split_amount(left.cost, counts), cap_requests=merge.max_requests > 0,
                        cap_tokens=merge.max_total_tokens > 0, cap_cost=merge.max_cost > 0,
                        prices=Prices.from_settings(settings.llm))


@dataclass
class RequestPlan:
    """Decided on the driver before the request pass starts a task: this run's id, the budget
    left after every earlier run's spend, the preflight's answer."""
    run_id: str
    shares: BudgetShares
    preflight: Preflight = field(default_factory=Preflight)
    spent_before: Spent = Spent()   # requests, tokens and cost the ledger held at the start


def refuse_speculation(spark: SparkSession) -> None:
    """Speculative execution runs a second attempt of a slow task beside the first: both would
    pay for the same merges. The stage refuses to start under it."""
    if (spark.conf.get("spark.speculation", None) or "false").strip().lower() == "true":
        raise StageError("the merge stage does not run with spark.speculation=true: two live attempts "
                         "of one task would both pay for the same LLM calls. Run it with "
                         "--conf spark.speculation=false (spark.conf in the settings)")


def plan_requests(jobs: DataFrame, settings: Settings, ledger_root: Location | str,
                  has_groups: bool) -> RequestPlan:
    """Refuse speculation, count what the ledger has spent, send the preflight request."""
    spark = jobs.sparkSession
    ledger_root = resolve(ledger_root)
    refuse_speculation(spark)
    merge, prices = settings.merge, Prices.from_settings(settings.llm)
    if merge.max_cost > 0 and not (prices.input_per_million or prices.output_per_million):
        raise StageError("merge.max_cost is set but no price is: every request would cost 0 and the cap "
                         "would never stop one. Set llm.price_input_per_million and "
                         "llm.price_output_per_million to what the endpoint charges")
    plan = RequestPlan(run_id=uuid.uuid4().hex, shares=BudgetShares())
    if capped(merge):
        plan.spent_before = ledger_spend(spark, ledger_root, prices)
    can_send = ((merge.max_requests <= 0 or plan.spent_before.requests < merge.max_requests)
                and (merge.max_cost <= 0 or plan.spent_before.cost < merge.max_cost))
    if has_groups and settings.llm.preflight and can_send:
        plan.preflight = preflight(settings.llm)
        if capped(merge):
            _record_driver_spend(ledger_root, plan)
    checked = plan.preflight
    plan.shares = _budget_shares(jobs, settings, Spent(
        max(0, merge.max_requests - plan.spent_before.requests - checked.requests),
        max(0, merge.max_total_tokens - plan.spent_before.tokens - checked.tokens),
        max(0.0, merge.max_cost - plan.spent_before.cost - prices.cost(checked.prompt_tokens,
                                                                      checked.completion_tokens))))
    return plan


def _record_driver_spend(ledger_root: Location, plan: RequestPlan) -> None:
    """The preflight's request in the ledger (bucket 0), so that later runs count it too. Its run
    id is apart from the tasks': their shares were computed with it already taken off."""
    writer = LedgerWriter(ledger_root, f"driver-{plan.run_id}")
    try:
        writer.open_bucket(0, read_bucket(ledger_root, 0).max_seq)
        checked = plan.preflight
        for n in range(checked.requests):
            prompt, completion = (checked.prompt_tokens, checked.completion_tokens) if n == 0 else (0, 0)
            writer.submit(0, {"spend": uuid.uuid4().hex, "run": f"{plan.run_id}-preflight", "requests": 1,
                              "tokens": prompt + completion, "prompt_tokens": prompt,
                              "completion_tokens": completion}).result()
    finally:
        writer.close()


def ledger_spend(spark: SparkSession, ledger_root: Location | str, prices: Prices = Prices(),
                 run: str | None = None) -> Spent:
    """Requests, tokens and their cost at ``prices`` that the ledger records as spent, over every
    run (or by run ``run``): the spend lines (an unsettled request counts its whole reservation,
    a batch request never run nothing, a batch request at the batch prices), plus the requests and
    tokens of results written without spend lines (runs without a budget; those a compaction
    superseded count through their ``superseded`` lines). A line counts once however many copies
    the ledger holds (a compaction killed before its deletes): spends by id, results by
    ``llm.ledger.IDENTITY``. A Spark aggregation: a few rows to the driver."""
    lines = ledger_lines(spark, ledger_root, SPEND_SCHEMA)
    if lines is None:
        return Spent()
    mine = F.col("run") == run if run is not None else F.lit(True)
    split = [F.coalesce(c, F.lit(0)) for c in ("tokens", "prompt_tokens", "completion_tokens")]
    batch = F.coalesce(F.col("batch"), F.lit(False)).alias("b")
    reserved = (lines.where(F.col("spend").isNotNull() & mine)
                .select(F.col("spend").alias("sid"), *[c.alias(f"r{i}") for i, c in enumerate(split)], batch)
                .dropDuplicates(["sid"]))
    settled = (lines.where(F.col("settle").isNotNull()).groupBy(F.col("settle").alias("sid"))
               .agg(*[F.max(F.when(~F.coalesce(F.col("void"), F.lit(False)), c)).alias(f"u{i}")
                      for i, c in enumerate(split)],
                    F.max(F.coalesce(F.col("void"), F.lit(False))).alias("void")))
    used = [F.when(F.col("u0").isNotNull(), F.col(f"u{i}")).otherwise(F.col(f"r{i}")) for i in range(3)]
    spend = (reserved.join(settled, "sid", "left").where(~F.coalesce(F.col("void"), F.lit(False)))
             .select(*[c.alias(n) for c, n in zip(used, ("t", "p", "c"))], "b"))
    results = (lines.where((F.col("status").isNotNull() | F.coalesce(F.col("superseded"), F.lit(False)))
                           & ~F.coalesce(F.col("journaled"), F.lit(False)) & mine)
               .dropDuplicates(list(IDENTITY))
               .select(split[1].alias("p"), split[2].alias("c"), F.col("attempts").alias("n"),
                       F.lit(False).alias("b")))
    totals = (spend.select((F.col("t") - F.col("p") - F.col("c")).alias("u"), "p", "c", F.lit(1).alias("n"), "b")
              .unionByName(results.withColumn("u", F.lit(0)))
              .groupBy("b").agg(F.sum("n").alias("requests"), F.sum("p").alias("prompt"),
                                F.sum("c").alias("completion"), F.sum(F.greatest("u", F.lit(0))).alias("unsplit"))
              .collect())
    spent = Spent()
    for row in totals:
        p, c, u = (int(row[k] or 0) for k in ("prompt", "completion", "unsplit"))
        spent = Spent(spent.requests + int(row["requests"] or 0), spent.tokens + p + c + u,
                      spent.cost + prices.of(bool(row["b"])).cost(p, c, u),
                      spent.prompt_tokens + p, spent.completion_tokens + c)
    return spent


def ledger_lines(spark: SparkSession, ledger_root: Location | str, schema: T.StructType) -> DataFrame | None:
    """Every line of the ledger's objects in ``schema`` (lines that do not parse are dropped), or
    None when the ledger holds no object."""
    root = resolve(ledger_root)
    if not _has_ledger_objects(root):
        return None
    return spark.read.schema(schema).option("mode", "DROPMALFORMED").json(f"{root.uri}/bucket=*/*.jsonl")


def _has_ledger_objects(root: Location) -> bool:
    """Whether any bucket of the ledger holds an object Spark would read."""
    return any(f.name.endswith(".jsonl") for b in ledger_buckets(root)
               for f in (root / f"bucket={b}").files())


SPEND_SCHEMA = T.StructType([
    T.StructField("spend", T.StringType()), T.StructField("settle", T.StringType()),
    T.StructField("tokens", T.LongType()), T.StructField("status", T.StringType()),
    T.StructField("journaled", T.BooleanType()), T.StructField("attempts", T.LongType()),
    T.StructField("prompt_tokens", T.LongType()), T.StructField("completion_tokens", T.LongType()),
    T.StructField("superseded", T.BooleanType()), T.StructField("group_id", T.StringType()),
    T.StructField("request_hash", T.StringType()), T.StructField("seq", T.LongType()),
    T.StructField("finished_ns", T.LongType()), T.StructField("task", T.StringType()),
    T.StructField("run", T.StringType()), T.StructField("batch", T.BooleanType()),
    T.StructField("void", T.BooleanType()),
])


def compact_ledger(ledger_root: Location | str) -> dict[str, int] | None:
    """Fold each bucket of the ledger into one object (``llm.ledger.compact``), on the driver,
    while no task writes it. A compaction that fails leaves the ledger as written (it reads the
    same, just slower) and does not fail the stage; the next one folds it."""
    root = resolve(ledger_root)
    try:
        done = compact(root)
    except Exception as exc:  # noqa: BLE001 - the results are recorded; compaction only tidies
        log.warning("ledger compaction under %s failed, the ledger stays as written: %s", root, exc)
        return None
    log.info("ledger compacted: %d objects -> %d", done["objects_before"], done["objects_after"])
    return done


def request_pass(jobs: DataFrame, settings: Settings, ledger_root: Location | str,
                 partitions: int | None = None, plan: RequestPlan | None = None,
                 stop: StopMarker | None = None) -> tuple[DataFrame, int]:
    """The request pass over ``jobs`` (from ``build_jobs``), lazily: one ``PASS_SCHEMA`` row per
    group, and the number of partitions it runs in. ``plan`` (``plan_requests``) is made here
    when not given."""
    spark = jobs.sparkSession
    slots = parallelism(spark)
    p = min(partitions or settings.merge.partitions or slots, LEDGER_BUCKETS)
    ledger_root = resolve(ledger_root)
    plan = plan or plan_requests(jobs, settings, ledger_root, has_groups=True)
    fn = MergeTask(llm=settings.llm, merge=settings.merge, gate=settings.gate,
                   embed=settings.embed, ledger_root=ledger_root, shares=plan.shares,
                   copy_length_ratio=settings.gate.copy_length_ratio, loops=min(p, slots),
                   run_id=plan.run_id, stop=stop,
                   context_tokens=plan.preflight.context_tokens or settings.llm.context_tokens or None)
    return bucket_ranges(jobs, p).sortWithinPartitions("bucket").mapInArrow(fn, PASS_SCHEMA), p


def bucket_ranges(jobs: DataFrame, partitions: int) -> DataFrame:
    """``jobs`` in ``partitions`` partitions, partition i holding the buckets b with
    ``b * partitions // LEDGER_BUCKETS == i``: whole buckets, the same number per task give or
    take one. Hash partitioning on the bucket itself gives the tasks unequal shares of the 256
    buckets: a straggler the whole stage waits for (BENCHMARKS.md, incremental)."""
    keys = partition_keys(jobs.sparkSession, partitions)
    part = F.floor(F.col("bucket") * partitions / LEDGER_BUCKETS).cast("int")
    return jobs.repartition(partitions, F.element_at(F.array(*[F.lit(k) for k in keys]), part + 1))


def partition_keys(spark: SparkSession, partitions: int) -> list[int]:
    """For each partition i, an int that ``repartition(partitions, <int column>)`` sends to
    partition i. Spark's own hash decides (``pmod(hash(v), partitions)``, the expression hash
    partitioning uses): one tiny job the first time a process asks for a number of partitions."""
    if partitions not in _PARTITION_KEYS:
        keys: dict[int, int] = {}
        first = 0
        while len(keys) < partitions:
            last = first + 64 * partitions - 1
            row = spark.sql(f"SELECT transform(sequence({first}, {last}), v -> pmod(hash(v), {partitions})) AS p"
                            ).first()
            for offset, partition in enumerate(row["p"]):
                keys.setdefault(partition, first + offset)
            first = last + 1
        _PARTITION_KEYS[partitions] = [keys[i] for i in range(partitions)]
    return _PARTITION_KEYS[partitions]


_PARTITION_KEYS: dict[int, list[int]] = {}  # Spark's hash is fixed: the keys hold for every session


_MASK64 = (1 << 64) - 1


def _merges_columns() -> list:
    """The pass output's columns as the ``merges`` table has them."""
    return [F.col(f.name).cast(f.dataType).alias(f.name) for f in MERGES_SCHEMA.fields]


def summarise(passed: DataFrame, partitions: int) -> MergeRunSummary:
    """This run's totals from the pass output: a Spark aggregation, a few rows to the driver."""
    error_kind = F.when(F.col("status") == STATUS_FAILED,
                        F.nullif(F.split(F.col("error"), ":").getItem(0), F.lit("")))
    # An order-free fingerprint of the merges rows (xor and sum of a hash of each whole row as
    # JSON, which names every non-null field): equal fingerprints, equal tables.
    row_hash = F.xxhash64(F.to_json(F.struct(*_merges_columns())))
    rows = (passed.groupBy("status", "source", error_kind.alias("error_kind"), "gate_failed")
            .agg(F.count("*").alias("groups"), F.sum("paid_requests").alias("requests"),
                 F.sum("paid_prompt_tokens").alias("prompt_tokens"),
                 F.sum("paid_completion_tokens").alias("completion_tokens"),
                 F.bit_xor(row_hash).alias("content_xor"),
                 F.sum(row_hash.bitwiseAND(F.lit(0xFFFFFFFF))).alias("content_sum"))
            .collect())
    summary = MergeRunSummary(partitions=partitions)
    for row in rows:
        summary.add(row)
    return summary


def gate_rejections(merges: DataFrame) -> dict[str, int]:
    """Per gate check, how many groups of ``merges`` ended ``gate_failed`` with that check failing
    (a merge failing two checks counts under both). A Spark aggregation: a few rows to the driver."""
    failed = F.from_json("gate", "struct<failed:array<string>>").getField("failed")
    rows = (merges.where(F.col("status") == STATUS_GATE_FAILED)
            .select(F.explode(failed).alias("check")).groupBy("check").count().collect())
    return {r["check"]: int(r["count"]) for r in sorted(rows, key=lambda r: r["check"])}


# -- the stage ----------------------------------------------------------------------------------
_GATE_JSON = ("struct<passed:boolean,failed:array<string>,min_source_similarity:double,"
              "request_coverage:double,output_coverage:double,output_ratio:double,"
              "max_copy_similarity:double,copy_of:int>")


def reject_contaminated(passed: DataFrame, evaluation: tuple[DataFrame, DataFrame] | None,
                        settings: DecontamSettings) -> DataFrame:
    """The gate's last check, ``contaminated``: each accepted merge of the pass output whose text
    shares an n-gram with an evaluation item (``evaluation``: the ``eval_items`` and
    ``eval_ngrams`` tables) becomes ``gate_failed``, its gate JSON naming the check and the item.
    A Spark join over the merged rows (the evaluation side may be large), run after the request
    pass; the ledger keeps the reply as the LLM gave it, and a rerun judges it the same way."""
    if evaluation is None:
        return passed
    items, ngrams = evaluation
    lengths = gram_lengths(ngrams)
    if not lengths:
        return passed
    passed.count()   # the request pass runs once, into the cache, before two branches read it
    merged = passed.filter(F.col("status") == STATUS_MERGED).select(
        F.col("group_id").alias("id"), "instruction", "input", "output")
    found = contaminated_texts(merged, RECORD_COLUMNS, items, ngrams, settings, lengths).select(
        F.col("id").alias("group_id"), F.struct("eval_set", "file", "item", "match").alias("_item"))
    verdict = F.from_json("gate", _GATE_JSON)
    gate = F.to_json(F.struct(
        F.lit(False).alias("passed"),
        F.concat(F.coalesce(verdict.getField("failed"), F.array().cast("array<string>")),
                 F.array(F.lit(CONTAMINATED))).alias("failed"),
        *[verdict.getField(f).alias(f) for f in ("min_source_similarity", "request_coverage", "output_coverage",
                                                 "output_ratio", "max_copy_similarity", "copy_of")],
        F.col("_item").alias(CONTAMINATED)))
    hit = F.col("_item").isNotNull()
    replaced = {"status": F.when(hit, F.lit(STATUS_GATE_FAILED)).otherwise(F.col("status")),
                "error": F.when(hit, F.lit(f"gate: {CONTAMINATED}")).otherwise(F.col("error")),
                "gate": F.when(hit, gate).otherwise(F.col("gate")),
                "gate_failed": F.when(hit, F.lit(CONTAMINATED)).otherwise(F.col("gate_failed"))}
    return (passed.join(found, "group_id", "left")
            .select(*[replaced.get(c, F.col(c)).alias(c) for c in passed.columns]))


def merge_pass(ctx: StageContext, groups: DataFrame, records: DataFrame, embeddings: DataFrame,
               partitions: int | None = None, has_groups: bool | None = None,
               evaluation: tuple[DataFrame, DataFrame] | None = None) -> tuple[MergeRunSummary, DataFrame]:
    """Build jobs, check the server (preflight) and run the request pass over ``groups``: this
    pass's summary and its rows in the columns of ``merges``, cached for the executor to write.
    Should Spark recompute a piece of them, the ledger answers every group already recorded, so
    nothing is paid twice. ``has_groups``: whether ``groups`` has a row, when the caller knows."""
    started = time.perf_counter()
    settings = ctx.settings
    ledger_root = resolve(ctx.store.ledger_path(LEDGER_NAME))
    jobs = build_jobs(groups, records, embeddings, settings.llm)
    clear_stops(ledger_root)
    if settings.llm.mode != "batch":
        refuse_open_batches(ledger_root)
    plan = plan_requests(jobs, settings, ledger_root,
                         has_groups=not groups.isEmpty() if has_groups is None else has_groups)
    stop = DriverStop(StopMarker(ledger_root, plan.run_id))
    with stop.catching_interrupts():
        if settings.llm.mode == "batch":
            summary, passed = _batch_pass(jobs, settings, ledger_root, plan, stop, partitions, evaluation)
        else:
            summary, passed = _online_pass(jobs, groups, settings, ledger_root, plan, stop, partitions, evaluation)
    summary.add_preflight(plan.preflight)
    summary.cost += Prices.from_settings(settings.llm).cost(plan.preflight.prompt_tokens,
                                                            plan.preflight.completion_tokens)
    summary.stopped = stop.asked()
    # The pass is done and its rows cached: no task writes the ledger until the next pass.
    summary.ledger_objects = compact_ledger(ledger_root) or {}
    summary.seconds = round(time.perf_counter() - started, 3)
    log.info("merge: %d groups, %d requests sent, %d tokens (cost %.4f); statuses %s; gate rejections %s",
             summary.groups, summary.requests, summary.total_tokens, summary.cost, summary.by_status,
             summary.gate_rejections)
    return summary, passed.select(*_merges_columns())


def refuse_open_batches(ledger_root: Location) -> None:
    """An online run while batches of an earlier batch-mode run are open would pay for their
    groups again: it is refused until a batch-mode run has resumed them."""
    still = open_batches(ledger_root)
    if still:
        raise StageError(f"{len(still)} batches sent by an earlier llm.mode=batch run are still open under "
                         f"{ledger_root} ({', '.join(still[:3])}{', ...' if len(still) > 3 else ''}): an online run "
                         "would pay for their groups again. Run with llm.mode=batch to resume them first")


def _online_pass(jobs: DataFrame, groups: DataFrame, settings: Settings, ledger_root: Location, plan: RequestPlan,
                 stop: DriverStop, partitions: int | None,
                 evaluation: tuple[DataFrame, DataFrame] | None) -> tuple[MergeRunSummary, DataFrame]:
    """The request pass, its rows cached and summed, with the progress line while it pays."""
    passed, p = request_pass(jobs, settings, ledger_root, partitions, plan, stop.marker)
    passed = passed.persist(StorageLevel.MEMORY_AND_DISK)
    checked = reject_contaminated(passed, evaluation, settings.decontam)
    if checked is not passed:
        passed = checked.persist(StorageLevel.MEMORY_AND_DISK)
    prices = Prices.from_settings(settings.llm)
    progress = MergeProgress(ledger_root, plan.run_id, groups.count, prices, settings.merge.progress_interval_s)
    try:
        with progress:
            summary = summarise(passed, p)
    except BaseException:
        passed.unpersist()
        raise
    summary.cost = prices.cost(summary.prompt_tokens, summary.completion_tokens)
    return summary, passed


def _batch_pass(jobs: DataFrame, settings: Settings, ledger_root: Location, plan: RequestPlan, stop: DriverStop,
                partitions: int | None,
                evaluation: tuple[DataFrame, DataFrame] | None) -> tuple[MergeRunSummary, DataFrame]:
    """The batch passes (``stages.merge_batch``); what this run paid is its spend in the ledger,
    since a group's requests span several passes (and batches resumed from a killed run count
    for the run that sent them)."""
    from .merge_batch import batch_passes
    passed, summary, book = batch_passes(jobs, settings, ledger_root, plan, stop, partitions)
    checked = reject_contaminated(passed, evaluation, settings.decontam)
    if checked is not passed:
        passed = checked.persist(StorageLevel.MEMORY_AND_DISK)
        summary = summarise(passed, summary.partitions)
    prices = Prices.from_settings(settings.llm)
    paid = ledger_spend(jobs.sparkSession, ledger_root, prices, run=plan.run_id)
    summary.requests, summary.cost = paid.requests, paid.cost
    summary.prompt_tokens, summary.completion_tokens = paid.prompt_tokens, paid.completion_tokens
    summary.batches = asdict(book.stats)
    return summary, passed


def merge_runs(store: TableStore) -> list[dict[str, Any]]:
    """Every merge pass's summary under the store's run root (full runs and increments), oldest
    first, from the run log: ``finished_at``, ``table_version`` (the version of ``merges`` it
    left), ``incremental_run`` for an increment's pass."""
    runs = []
    for entry in store.read_log(RUN_LOG):
        if entry.get("stage") != Merge.name:
            continue
        run = dict(entry.get("summary") or {}, finished_at=entry.get("written_at"),
                   table_version=(entry.get("versions") or {}).get("merges"))
        if entry.get("increment"):
            run["incremental_run"] = entry.get("run_id")
        runs.append(run)
    return runs


def _unchanged_version(ctx: StageContext, content: str) -> int | None:
    """The current version of ``merges`` when the last full merge run wrote it (no other writer
    since) from rows with fingerprint ``content``, else None: a rerun that changed nothing (every
    group answered by the ledger as before) writes no new version."""
    written = [r for r in merge_runs(ctx.store)
               if r.get("content") and r.get("table_version") is not None and "incremental_run" not in r]
    if not content or not written or written[-1]["content"] != content:
        return None
    version = ctx.store.version("merges")
    return version if version == written[-1]["table_version"] else None


class Merge(Stage):
    """LLM merging of each group, gated, ledgered: ``merges``, one row per group."""

    name = "merge"
    version = "2"   # merges that share an n-gram with an evaluation item fail the gate
    inputs = ("merge_groups", "records", "embeddings", "eval_items", "eval_ngrams")
    outputs = ("merges",)
    settings_sections = ("llm", "merge", "gate", "embed", "decontam")

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> StageOutput:
        summary, rows = merge_pass(ctx, tables["merge_groups"], tables["records"], tables["embeddings"],
                                   evaluation=(tables["eval_items"], tables["eval_ngrams"]))
        summary.table_version = _unchanged_version(ctx, summary.content)
        if summary.table_version is not None:
            summary.rewritten = False
            log.info("merge: `merges` version %d already holds these rows; not rewritten", summary.table_version)
        return StageOutput({"merges": rows} if summary.rewritten else {}, summary=summary.as_dict(),
                           unchanged=() if summary.rewritten else ("merges",),
                           shortfall=summary.shortfall(ctx.settings.merge))

    def extend(self, ctx: StageContext, tables: dict[str, DataFrame],
               added: dict[str, DataFrame]) -> StageOutput:
        """The request pass over the new groups only; merges paid before stay (the ledger
        answers any group already recorded without a request)."""
        groups, count = added.get("merge_groups"), rows_added(added, "merge_groups")
        if groups is None or count == 0 or (count is None and groups.isEmpty()):
            return StageOutput(summary={"groups": 0, "requests": 0})
        summary, rows = merge_pass(ctx, groups, with_added(tables, added, "records"),
                                   with_added(tables, added, "embeddings", cache=True), has_groups=True,
                                   evaluation=(tables["eval_items"], tables["eval_ngrams"]))
        return StageOutput({"merges": Write.append(rows, summary.groups)}, summary=summary.as_dict(),
                           shortfall=summary.shortfall(ctx.settings.merge))
