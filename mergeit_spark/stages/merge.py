"""Merge stage: ask an LLM to merge each group into one richer example, gate the result, and keep
a ledger so that no merge is ever paid for twice.

How it runs on Spark
  1. ``build_jobs``: explode each group's ``member_ids``, join ``records`` (texts) and
     ``embeddings`` (Spark joins), ``collect_list`` the members back per group; a small Arrow pass
     adds the ledger ``bucket`` and the ``request_hash`` (hash of the exact prompt, model and
     request settings, see ``llm.prompt.prompt_hash``). The jobs are persisted on the executors:
     the request pass and the compaction both read them.
  2. ``execute_jobs``: ``repartition(P, "bucket")`` (P = ``merge.partitions`` or Spark's default
     parallelism), sorted by bucket inside each partition, then ``mapInArrow`` runs one asyncio
     loop per Arrow batch with one ``MergeClient`` (``llm.concurrency`` requests in flight per
     partition). Only a handful of aggregate rows (counts, tokens) come back to the driver.
  3. ``compact_ledger``: ``spark.read.json`` of the ledger, joined to the current
     ``(group_id, request_hash)`` keys, one row per group: its latest terminal result (``merged``
     or ``gate_failed``), else its latest failure. Written with ``ctx.store.write(df, "merges")``.

The ledger (``<run root>/_ledger/merges/bucket=<b>/<task attempt uuid>.jsonl``)
  * Every finished group is appended at once, from the executor, as one JSON line, flushed and
    fsynced before the next group's line: a task killed at any moment loses at most the requests
    in flight at that moment.
  * Before calling the LLM, a task reads the ledger files of the buckets it holds and skips every
    group whose ``(group_id, request_hash)`` already has a terminal line; ``failed`` groups are
    retried. A rerun of the stage therefore sends 0 requests for finished work, and a Spark task
    retry after a crash resumes where the dead attempt stopped.
  * ``bucket = sha256(group_id)[:8] % LEDGER_BUCKETS``: a fixed number of buckets, independent
    of P, so a rerun with other partitions (a laptop run continued on a cluster) still finds its
    ledger. A partition holds whole buckets (hash partitioning on the bucket).
  * The run root must be a filesystem path that every executor can write and read (local disk
    in local mode; on a cluster a shared mount such as NFS, EFS or a DBFS/HDFS fuse mount). Object
    stores without append (``s3://``) are not supported for the ledger.
  * Speculative execution (``spark.speculation``, off by default) must stay off for this stage:
    two live attempts of one task would both pay.
  * If the gate settings change (``gate.*``, ``merge.max_output_chars``, the embedding model), a
    terminal line from the ledger is re-judged against the new gate with no new request.

Budget (``merge.max_requests`` / ``merge.max_total_tokens``, 0 = no cap)
  The caps are split across ledger buckets in proportion to their number of groups. A task adds
  a bucket's share to its own allowance when it reaches that bucket (partitions are sorted by
  bucket), so no task spends another task's share and unspent share carries on within the task.
  Requests (retries included) never exceed ``max_requests``; tokens never exceed
  ``max_total_tokens`` unless a server counts more prompt tokens than the client's estimate
  (one token per two characters), since a request is only sent if its worst case
  (estimate + ``llm.max_tokens``) fits. Groups left when the allowance runs out are recorded
  ``failed`` with error ``budget_exhausted`` and are retried by a later run.

Statuses: ``merged`` (valid and passed the gate), ``gate_failed`` (valid reply that failed the
gate: its text is KEPT in instruction/input/output so the report can show it; finalize uses only
``merged`` rows), ``failed`` (no valid reply: HTTP errors after retries, invalid output after
regenerations, budget, a group with a member missing from ``records``/``embeddings``; text null).
``attempts`` counts HTTP requests sent for the result (retries and regenerations included),
``latency_ms`` the time spent waiting on them.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..config import EmbedSettings, GateSettings, LLMSettings, MergeSettings, Settings
from ..llm.client import (ERROR_BUDGET, STATUS_FAILED, STATUS_GATE_FAILED, STATUS_MERGED, Budget,
                          MergeClient, MergeResult, validate_merged)
from ..llm.gate import BatchEncoder, EmbeddingGate, model_encoder
from ..llm.prompt import build_messages, prompt_hash
from . import Stage, StageContext

log = logging.getLogger(__name__)

LEDGER_BUCKETS = 256          # fixed forever for a run root: bucket dirs must not move between runs
LEDGER_DIR = "_ledger/merges"
RUNS_FILE = "_ledger/merge_runs.jsonl"
TERMINAL = (STATUS_MERGED, STATUS_GATE_FAILED)
MISSING_HASH = ""             # request_hash of a group that cannot be requested (member missing)

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
    T.StructField("finished_ns", T.LongType()),    # wall clock, orders lines of one group
    T.StructField("task", T.StringType()),         # task attempt that wrote it
])
MEMBER_FIELDS = ("id", "instruction", "input", "output", "embedding")
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
# What each task reports back per group: small, aggregated before it reaches the driver.
REPORT_SCHEMA = T.StructType([
    T.StructField("group_id", T.StringType()),
    T.StructField("status", T.StringType()),
    T.StructField("source", T.StringType()),       # llm | ledger | rejudged | missing
    T.StructField("error_kind", T.StringType()),
    T.StructField("requests", T.LongType()),
    T.StructField("prompt_tokens", T.LongType()),
    T.StructField("completion_tokens", T.LongType()),
])


def ledger_bucket(group_id: str) -> int:
    """Ledger bucket of a group: a deterministic function of its id only (any string works)."""
    return int(hashlib.sha256(group_id.encode("utf-8")).hexdigest()[:8], 16) % LEDGER_BUCKETS


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
@dataclass(frozen=True)
class _AddRequestHash:
    llm: LLMSettings

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        schema = _arrow_schema(JOB_SCHEMA)
        settings = request_settings(self.llm)
        for batch in batches:
            rows = []
            for row in batch.to_pylist():
                members = sorted(row["members"] or [], key=lambda m: m["id"] or "")
                missing = [m["id"] for m in members
                           if m["instruction"] is None or m["embedding"] is None]
                if missing or len(members) < 2:
                    rh = MISSING_HASH
                else:
                    rh = prompt_hash(build_messages(members), self.llm.model, settings)
                rows.append({"group_id": row["group_id"], "bucket": ledger_bucket(row["group_id"]),
                             "request_hash": rh, "missing": ",".join(missing) or None,
                             "members": members})
            yield pa.RecordBatch.from_pylist(rows, schema=schema)


def build_jobs(groups: DataFrame, records: DataFrame, embeddings: DataFrame,
               llm: LLMSettings) -> DataFrame:
    """One row per group: bucket, request hash and the members' texts and embeddings."""
    # A group listed twice would otherwise collect its members twice.
    exploded = (groups.select("group_id", "member_ids").dropDuplicates(["group_id"])
                .select("group_id", F.explode("member_ids").alias("id")))
    members = (exploded
               .join(records.select("id", "instruction", "input", "output"), on="id", how="left")
               .join(embeddings.select("id", "embedding"), on="id", how="left"))
    gathered = (members.groupBy("group_id")
                .agg(F.collect_list(F.struct(*[F.col(c) for c in MEMBER_FIELDS])).alias("members")))
    return gathered.mapInArrow(_AddRequestHash(llm), JOB_SCHEMA)


# -- 2. the request pass ------------------------------------------------------------------------
class LedgerWriter:
    """Append-only JSON lines, one file per (bucket, task attempt); each line fsynced."""

    def __init__(self, root: str, task: str) -> None:
        self.root = Path(root)
        self.task = task
        self._files: dict[int, Any] = {}

    def append(self, bucket: int, line: dict[str, Any]) -> None:
        handle = self._files.get(bucket)
        if handle is None:
            folder = self.root / f"bucket={bucket}"
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / f"{self.task}.jsonl", "a", encoding="utf-8")
            self._files[bucket] = handle
        handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def read_bucket(root: str, bucket: int) -> dict[tuple[str, str], dict[str, Any]]:
    """Latest terminal line per ``(group_id, request_hash)`` in one bucket of the ledger.

    Lines that do not parse (a task killed mid-write) are skipped: their group is simply retried.
    """
    best: dict[tuple[str, str], dict[str, Any]] = {}
    folder = Path(root) / f"bucket={bucket}"
    if not folder.is_dir():
        return best
    for path in sorted(folder.iterdir()):
        if path.name.startswith((".", "_")) or not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            for text in handle:
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if not isinstance(line, dict) or line.get("status") not in TERMINAL:
                    continue
                key = (line.get("group_id"), line.get("request_hash"))
                if key not in best or line.get("finished_ns", 0) > best[key].get("finished_ns", 0):
                    best[key] = line
    return best


@dataclass(frozen=True)
class BudgetShares:
    """Per-bucket shares of the run's request and token caps (0 = no cap)."""
    requests: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    cap_requests: bool = False
    cap_tokens: bool = False


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


@dataclass(frozen=True)
class _MergePartition:
    """Per-partition request pass, shipped to executors (settings and paths only)."""
    llm: LLMSettings
    merge: MergeSettings
    gate: GateSettings
    embed: EmbedSettings
    ledger_root: str
    shares: BudgetShares
    copy_length_ratio: float

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        _worker_logging()
        task = _task_attempt_id()
        writer = LedgerWriter(self.ledger_root, task)
        budget = Budget(0 if self.shares.cap_requests else None,
                        0 if self.shares.cap_tokens else None)
        state: dict[str, Any] = {"hits": {}, "seen": set(), "done": 0}
        acceptance = acceptance_key(self.gate, self.merge, self.embed, self.copy_length_ratio)
        schema = _arrow_schema(REPORT_SCHEMA)
        try:
            for batch in batches:
                jobs = batch.to_pylist()
                if not jobs:
                    continue
                for b in sorted({j["bucket"] for j in jobs} - state["seen"]):
                    state["seen"].add(b)
                    state["hits"].update(read_bucket(self.ledger_root, b))
                    budget.grant(self.shares.requests.get(b, 0), self.shares.tokens.get(b, 0))
                reports = asyncio.run(self._run_batch(jobs, state, writer, task, acceptance, budget))
                state["done"] += len(jobs)
                log.info("merge task %s: %d groups done (budget: %d requests, %d tokens used)",
                         task[:8], state["done"], budget.requests, budget.tokens)
                yield pa.RecordBatch.from_pylist(reports, schema=schema)
        finally:
            writer.close()

    async def _run_batch(self, jobs: list[dict], state: dict, writer: LedgerWriter, task: str,
                         acceptance: str, budget: Budget) -> list[dict]:
        encoder = BatchEncoder(model_encoder(self.embed), max_batch=self.embed.batch_size)
        total = len(jobs)
        progress = {"done": 0, "next_log": max(1, total // 10)}
        async with MergeClient(self.llm, self.merge, budget) as client:

            async def one(job: dict) -> dict:
                try:
                    line, report = await self._one_group(job, state["hits"], client, encoder,
                                                         acceptance)
                except Exception as exc:  # noqa: BLE001 - one group must not sink the partition
                    log.exception("merge of group %s crashed", job["group_id"])
                    result = MergeResult(status=STATUS_FAILED, error=f"internal: {type(exc).__name__}")
                    line = self._line(job, result, acceptance)
                    report = _report(job["group_id"], result, "llm")
                if line is not None:
                    line["finished_ns"] = time.time_ns()
                    line["task"] = task
                    writer.append(job["bucket"], line)
                progress["done"] += 1
                if progress["done"] >= progress["next_log"]:
                    progress["next_log"] += max(1, total // 10)
                    log.info("merge task %s: batch %d/%d groups", task[:8], progress["done"], total)
                return report

            return list(await asyncio.gather(*(one(job) for job in jobs)))

    async def _one_group(self, job: dict, hits: dict, client: MergeClient, encoder: BatchEncoder,
                         acceptance: str) -> tuple[dict | None, dict]:
        gid, rh = job["group_id"], job["request_hash"]
        members = job["members"] or []
        if rh == MISSING_HASH:
            result = MergeResult(status=STATUS_FAILED,
                                 error=f"missing_member: {job['missing'] or 'fewer than 2 members'}")
            return self._line(job, result, acceptance), _report(gid, result, "missing")
        vectors = np.asarray([m["embedding"] for m in members], dtype=np.float32)
        gate = EmbeddingGate(members, vectors, self.gate, encoder, self.copy_length_ratio)
        hit = hits.get((gid, rh))
        if hit is not None and hit.get("acceptance") == acceptance:
            return None, {"group_id": gid, "status": hit["status"], "source": "ledger",
                          "error_kind": None, "requests": 0, "prompt_tokens": 0,
                          "completion_tokens": 0}
        if hit is not None:
            result = await _rejudge(hit, gate, self.merge.max_output_chars)
            return self._line(job, result, acceptance), _report(gid, result, "rejudged", paid=False)
        result = await client.merge(members, gate=gate, messages=build_messages(members))
        return self._line(job, result, acceptance), _report(gid, result, "llm")

    def _line(self, job: dict, result: MergeResult, acceptance: str) -> dict[str, Any]:
        line = {"group_id": job["group_id"], "request_hash": job["request_hash"],
                "model": self.llm.model, "acceptance": acceptance}
        line.update(result.as_dict())
        if result.status == STATUS_FAILED:
            line.update(instruction=None, input=None, output=None)
        return line


async def _rejudge(hit: dict, gate: EmbeddingGate, max_chars: int) -> MergeResult:
    """A terminal ledger result judged again under the current gate (no request)."""
    paid = {k: hit.get(k) or 0 for k in ("attempts", "prompt_tokens", "completion_tokens", "latency_ms")}
    candidate = {k: hit.get(k) for k in ("instruction", "input", "output")}
    merged, why = validate_merged(json.dumps(candidate), max_chars)
    if merged is None:
        return MergeResult(status=STATUS_FAILED, error=f"invalid_output: {why}", **paid)
    verdict = await gate(merged)
    if verdict.passed:
        return MergeResult(status=STATUS_MERGED, gate=verdict.describe(), **merged, **paid)
    return MergeResult(status=STATUS_GATE_FAILED, gate=verdict.describe(),
                       error="gate: " + ",".join(verdict.failed), **merged, **paid)


def _report(gid: str, result: MergeResult, source: str, paid: bool = True) -> dict[str, Any]:
    kind = (result.error or "").split(":", 1)[0] or None
    return {"group_id": gid, "status": result.status, "source": source, "error_kind": kind,
            "requests": result.attempts if paid else 0,
            "prompt_tokens": result.prompt_tokens if paid else 0,
            "completion_tokens": result.completion_tokens if paid else 0}


def _worker_logging() -> None:
    """Progress lines from executors go to the executor's stderr (its log), at INFO."""
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
    errors: dict[str, int] = field(default_factory=dict)         # error kind -> groups, this run
    budget_exhausted: int = 0
    partitions: int = 0
    seconds: float = 0.0
    table_version: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_tokens"] = self.total_tokens
        return out


def execute_jobs(jobs: DataFrame, settings: Settings, ledger_root: str,
                 partitions: int | None = None) -> MergeRunSummary:
    """Run the request pass over ``jobs`` (from ``build_jobs``); returns this run's totals."""
    spark = jobs.sparkSession
    p = partitions or settings.merge.partitions or spark.sparkContext.defaultParallelism
    Path(ledger_root).mkdir(parents=True, exist_ok=True)
    counts = {int(r["bucket"]): int(r["count"])
              for r in jobs.groupBy("bucket").count().collect()}  # <= LEDGER_BUCKETS small rows
    cfg = settings.merge
    shares = BudgetShares(requests=split_budget(cfg.max_requests, counts),
                          tokens=split_budget(cfg.max_total_tokens, counts),
                          cap_requests=cfg.max_requests > 0, cap_tokens=cfg.max_total_tokens > 0)
    fn = _MergePartition(llm=settings.llm, merge=settings.merge, gate=settings.gate,
                         embed=settings.embed, ledger_root=ledger_root, shares=shares,
                         copy_length_ratio=settings.gate.copy_length_ratio)
    reports = (jobs.repartition(p, "bucket").sortWithinPartitions("bucket")
               .mapInArrow(fn, REPORT_SCHEMA))
    rows = (reports.groupBy("status", "source", "error_kind")
            .agg(F.count("*").alias("groups"), F.sum("requests").alias("requests"),
                 F.sum("prompt_tokens").alias("prompt_tokens"),
                 F.sum("completion_tokens").alias("completion_tokens"))
            .collect())  # a few aggregate rows, never per-group data
    summary = MergeRunSummary(partitions=p)
    for r in rows:
        n = int(r["groups"])
        summary.groups += n
        summary.requests += int(r["requests"] or 0)
        summary.prompt_tokens += int(r["prompt_tokens"] or 0)
        summary.completion_tokens += int(r["completion_tokens"] or 0)
        summary.by_status[r["status"]] = summary.by_status.get(r["status"], 0) + n
        summary.by_source[r["source"]] = summary.by_source.get(r["source"], 0) + n
        if r["error_kind"]:
            summary.errors[r["error_kind"]] = summary.errors.get(r["error_kind"], 0) + n
        if r["error_kind"] == ERROR_BUDGET:
            summary.budget_exhausted += n
    return summary


# -- 3. compaction ------------------------------------------------------------------------------
def read_ledger(spark: SparkSession, ledger_root: str) -> DataFrame:
    """Every ledger line as a DataFrame (``LEDGER_SCHEMA`` plus the ``bucket`` folder column)."""
    root = Path(ledger_root)
    if not any(root.glob("bucket=*/*")):
        return spark.createDataFrame([], LEDGER_SCHEMA)
    return (spark.read.schema(LEDGER_SCHEMA).option("mode", "DROPMALFORMED")
            .json(str(root)).where(F.col("group_id").isNotNull() & F.col("status").isNotNull()))


def compact_ledger(spark: SparkSession, ledger_root: str, keys: DataFrame, model: str) -> DataFrame:
    """One ``merges`` row per ``(group_id, request_hash)`` in ``keys``: the latest terminal
    ledger line, else the latest failure, else a ``failed``/``no_result`` row (never lost)."""
    ledger = read_ledger(spark, ledger_root).drop("bucket")
    keyed = keys.select("group_id", "request_hash").join(
        ledger, on=["group_id", "request_hash"], how="left")
    terminal = F.when(F.col("status").isin(*TERMINAL), 1).otherwise(0)
    w = Window.partitionBy("group_id").orderBy(terminal.desc(), F.col("finished_ns").desc_nulls_last())
    best = keyed.withColumn("_rank", F.row_number().over(w)).where(F.col("_rank") == 1)
    filled = (best
              .withColumn("error", F.when(F.col("status").isNull(), F.lit("no_result"))
                          .otherwise(F.col("error")))
              .withColumn("model", F.coalesce(F.col("model"), F.lit(model)))
              .withColumn("status", F.coalesce(F.col("status"), F.lit(STATUS_FAILED)))
              .fillna({"attempts": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": 0.0}))
    return filled.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in MERGES_SCHEMA.fields])


# -- the stage ----------------------------------------------------------------------------------
def run_merge(ctx: StageContext, groups: DataFrame, records: DataFrame, embeddings: DataFrame,
              partitions: int | None = None) -> MergeRunSummary:
    """Build jobs, run the request pass, compact the ledger into the ``merges`` table.

    Returns this run's summary (also appended to ``<run root>/_ledger/merge_runs.jsonl``).
    """
    started = time.perf_counter()
    settings = ctx.settings
    ledger_root = str(Path(ctx.store.root) / LEDGER_DIR)
    jobs = build_jobs(groups, records, embeddings, settings.llm).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        summary = execute_jobs(jobs, settings, ledger_root, partitions)
        log.info("merge: %d groups, %d requests sent, %d tokens; statuses %s", summary.groups,
                 summary.requests, summary.total_tokens, summary.by_status)
        merges = compact_ledger(ctx.spark, ledger_root, jobs, settings.llm.model)
        summary.table_version = ctx.store.write(merges, "merges")
    finally:
        jobs.unpersist()
    summary.seconds = round(time.perf_counter() - started, 3)
    runs = Path(ctx.store.root) / RUNS_FILE
    runs.parent.mkdir(parents=True, exist_ok=True)
    with open(runs, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 **summary.as_dict()}) + "\n")
    return summary


def merge_runs(run_root: str | Path) -> list[dict[str, Any]]:
    """Every merge run's summary for a run root, oldest first (for the report)."""
    path = Path(run_root) / RUNS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Merge(Stage):
    """LLM merging of each group, gated, ledgered; writes ``merges`` itself as it goes."""

    name = "merge"
    inputs = ("merge_groups", "records", "embeddings")
    outputs = ("merges",)
    settings_sections = ("llm", "merge", "gate", "embed")
    writes_itself = True

    def __init__(self) -> None:
        self.summary: MergeRunSummary | None = None

    def run(self, ctx: StageContext, tables: dict[str, DataFrame]) -> dict[str, DataFrame]:
        self.summary = run_merge(ctx, tables["merge_groups"], tables["records"], tables["embeddings"])
        return {"merges": ctx.store.read("merges")}
