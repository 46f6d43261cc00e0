"""The merge stage in batch mode (``llm.mode=batch``): passes over the groups, batches between them.

Each pass is the request pass's Spark job (``merge.bucket_ranges``, ``mapInArrow``) with
``BatchMergeTask``: it triages every group against the ledger like an online task, then walks
each open group's chain of batch replies (``llm.batch.walk_chain``: parsing, regenerations, the
gate) to its result, recorded in the ledger, or to its next request, staged into the partition's
batch input file after its spend is recorded. Between passes the driver submits what the pass
staged, polls the batches and folds their answers into the ledger (``llm.batch.BatchBook``). The
run ends with the first pass that stages nothing; its rows are the ``merges`` rows. A pass stages
nothing after ``llm.batch.FUTILE_PASSES`` batches in a row ran none of their requests, nor while a
batch of the root is still open (the stop was asked, ``llm.batch_max_wait_s``
passed), so a request is never sent twice: those groups end ``failed`` with ``batch_pending`` and
the next run resumes the open batches before its first pass.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from pyspark import StorageLevel
from pyspark.sql import DataFrame

from ..config import Settings
from ..session import parallelism
from ..fs import Location
from ..llm.batch import BATCHES_DIR, ERROR_PENDING, FUTILE_PASSES, BatchBook, Stager, custom_id, max_passes, walk_chain
from ..llm.client import ERROR_BUDGET, JSON_LADDERS, MergeResult, chat_request
from ..llm.gate import BatchGate, GroupSources, model_encoder
from ..llm.prompt import build_messages
from ..llm.stop import DriverStop
from ..llm.tokens import estimate_prompt_tokens
from .merge import (MISSING_HASH, PASS_SCHEMA, Job, MergeRunSummary, MergeTask, RequestPlan, _TaskState,
                    _pass_row, _unsent_row, bucket_ranges, summarise)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchMergeTask(MergeTask):
    """One partition of one batch pass: results from the replies so far, the next requests staged."""
    stage_id: str = ""            # this pass: names the chains it starts and the requests it stages
    staging: bool = True          # False: requests a group needs are not staged (it stays pending)

    @property
    def journaled(self) -> bool:
        return True   # every batch request has a spend line: the driver settles it from the batch's answer

    def _new_state(self, task: str) -> _TaskState:
        from pyspark import TaskContext
        state = super()._new_state(task)
        state.budget.prices = self.shares.prices.batch()
        ctx = TaskContext.get()
        state.stager = Stager(self.ledger_root / BATCHES_DIR / self.stage_id,
                              ctx.partitionId() if ctx is not None else 0, self.llm)
        return state

    def _finish(self, state: _TaskState) -> None:
        if self.staging:
            state.stager.close()

    def _ledger_source(self, line: dict[str, Any]) -> str:
        return "llm" if line.get("run") == self.run_id else "ledger"   # paid in an earlier pass of this run

    def _line(self, job: Job, result: MergeResult, task: str) -> dict[str, Any]:
        return dict(super()._line(job, result, task), batch=True)

    @asynccontextmanager
    async def _session(self, state: _TaskState, task: str) -> AsyncIterator[Callable]:
        gate = BatchGate(model_encoder(self.embed), self.gate, self.copy_length_ratio,
                         max_batch=max(self.embed.batch_size, 4 * self.llm.concurrency))

        async def handle(job: Job) -> dict[str, Any]:
            if job.request_hash == MISSING_HASH or job.hit is not None:
                result, source = await self._outcome(job, None, gate, None)   # type: ignore[arg-type]
                return await self._record(state, job, result, task, source)
            return await self._walk(state, job, gate, task)

        yield handle

    async def _walk(self, state: _TaskState, job: Job, gate: BatchGate, task: str) -> dict[str, Any]:
        messages = build_messages(job.members)
        too_long = self._too_long(messages)
        if too_long:
            return await self._record(state, job, MergeResult(status="failed", error=too_long), task, "llm")
        sources = GroupSources(job.members, job.vectors)
        replies = state.buckets[job.bucket].open_replies(job.group_id, job.request_hash)
        step = await walk_chain(replies, messages, self.llm, self.merge, lambda m: gate.judge(m, sources))
        if step.result is not None:
            return await self._record(state, job, step.result, task, "llm", chain=step.chain)
        if not self.staging:
            return _unsent_row(job, self.llm.model, f"{ERROR_PENDING}: not sent this run (a batch of the "
                               "run root is still open, or the run was stopped)", "pending")
        estimate = estimate_prompt_tokens(step.messages)
        reservation = state.budget.reserve(estimate, self.llm.max_tokens)
        if reservation is None:
            return _unsent_row(job, self.llm.model, ERROR_BUDGET, "llm")
        cid = custom_id(job.group_id, job.request_hash, step.chain or self.stage_id, step.step, self.stage_id)
        await state.writer.commit(job.bucket, {
            "spend": cid, "run": self.run_id, "requests": 1, "tokens": reservation.total, "batch": True,
            "prompt_tokens": reservation.prompt, "completion_tokens": reservation.completion})
        state.stager.add(cid, chat_request(self.llm, step.messages, JSON_LADDERS[self.llm.json_mode][0]))
        return _unsent_row(job, self.llm.model, f"{ERROR_PENDING}: in a batch", "staged")

    async def _record(self, state: _TaskState, job: Job, result: MergeResult, task: str, source: str,
                      chain: str | None = None) -> dict[str, Any]:
        line = self._line(job, result, task)
        if chain:
            line["chain"] = chain
        await state.writer.commit(job.bucket, line)
        return _pass_row(line, source)


def batch_passes(jobs: DataFrame, settings: Settings, ledger_root: Location, plan: RequestPlan,
                 stop: DriverStop, partitions: int | None = None,
                 book: BatchBook | None = None) -> tuple[DataFrame, MergeRunSummary, BatchBook]:
    """The batch run: resume what earlier runs left open, then passes and batches until a pass
    stages nothing. Returns that pass's rows (persisted), its summary and the book."""
    p = min(partitions or settings.merge.partitions or parallelism(jobs.sparkSession), 256)
    book = book or BatchBook(ledger_root, settings.llm, stop=stop)
    still_open = book.resume()
    jobs = jobs.persist(StorageLevel.MEMORY_AND_DISK)   # every pass reads them: joined once
    try:
        return _passes(jobs, settings, ledger_root, plan, stop, p, book, still_open)
    finally:
        jobs.unpersist()


def _passes(jobs: DataFrame, settings: Settings, ledger_root: Location, plan: RequestPlan, stop: DriverStop,
            p: int, book: BatchBook, still_open: int) -> tuple[DataFrame, MergeRunSummary, BatchBook]:
    slots, futile = parallelism(jobs.sparkSession), 0
    passes = max_passes(settings.llm, settings.merge)
    for number in range(passes):
        staging = not still_open and not stop.asked() and futile < FUTILE_PASSES and number < passes - 1
        task = BatchMergeTask(
            llm=settings.llm, merge=settings.merge, gate=settings.gate, embed=settings.embed,
            ledger_root=ledger_root, shares=plan.shares, copy_length_ratio=settings.gate.copy_length_ratio,
            loops=min(p, slots), run_id=plan.run_id,
            context_tokens=plan.preflight.context_tokens or settings.llm.context_tokens or None,
            stage_id=f"{plan.run_id[:12]}p{number}", staging=staging)
        passed = (bucket_ranges(jobs, p).sortWithinPartitions("bucket").mapInArrow(task, PASS_SCHEMA)
                  .persist(StorageLevel.MEMORY_AND_DISK))
        summary = summarise(passed, p)
        staged = summary.by_source.get("staged", 0)
        log.info("batch pass %d: %d groups, %d requests staged, statuses %s", number, summary.groups, staged,
                 summary.by_status)
        if not staged:
            return passed, summary, book
        passed.unpersist()
        if stop.asked():
            book.abandon(ledger_root / BATCHES_DIR / task.stage_id, "the run was stopped before submitting it")
            continue
        answered = book.stats.answered
        book.submit(ledger_root / BATCHES_DIR / task.stage_id)
        still_open = book.wait()
        futile = 0 if book.stats.answered > answered else futile + 1
    raise AssertionError("the last batch pass stages nothing")
