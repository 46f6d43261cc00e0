"""``llm.mode=batch``: merge requests through the OpenAI Batch API, paid once, resumed after a kill.

A batch run is a few passes over the groups (``stages.merge_batch``). In each pass a task walks
every group's chain of replies so far (``walk_chain``: the same parsing, regenerations and gate as
an online merge) and either records the group's result in the ledger or stages the group's next
request: a line of a batch input file (``Stager``), its spend recorded in the ledger first. Between
two passes the driver (``BatchBook``) submits what the pass staged, polls the batches, and folds
every answer into the ledger. A regeneration or a retry is a line of the next pass's batch.

Durable state, under the ledger root:
  * ``_batches/<pass>/part-<p>-<k>.jsonl``: a batch input file as staged by partition ``p`` of a
    pass, at most ``llm.batch_max_requests`` lines and ``llm.batch_max_bytes`` bytes;
  * ``_batches/<pass>/part-<p>-<k>.json``: its submission record, written after the file; the
    driver rewrites it at each step: ``staged`` -> ``uploaded`` (file id) -> ``submitted`` (batch
    id) -> ``done`` (answers folded into the ledger) or ``abandoned`` (never submitted). Ids are
    recorded before the next call, and a batch is created with the submission's name in its
    metadata: a run killed between creating a batch and recording its id finds the batch by that
    name (``batches.list``) instead of creating a second one;
  * in the ledger buckets, per answer: a reply line (``{"batch_reply": custom id, group_id,
    request_hash, chain, step, status_code, content, ...}``) and the settle line of its spend (the
    tokens the batch billed; a request the batch never ran, expired or cancelled, is voided: it
    costs nothing and is sent again).

Custom ids: ``<group_id>|<request_hash>|<chain>|<step>|<pass>``. A chain is one try at a group's
request: its first request and the regenerations that follow (``step``); a result line closes it
(the line carries ``chain``), and a later run's retry of a failed group starts a new one. ``pass``
names the pass that staged the request, so a retried or re-sent step has a new custom id.

Resume: at the start of a batch run the driver abandons what an earlier run staged but never
submitted (voiding its spends), adopts a batch created but not recorded, polls every submitted
batch to its end and folds it. Only then does a pass stage anything, so no request is staged
while an earlier one for the same group may still be answered.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import openai

from ..config import LLMSettings, MergeSettings
from ..fs import Location
from .client import (ERROR_INVALID, ERROR_TRUNCATED, RETRYABLE_STATUS, STATUS_FAILED, STATUS_GATE_FAILED,
                     STATUS_MERGED, GateVerdict, MergeResult, context_error, feedback_turns,
                     resolve_api_key, validate_merged)
from .ledger import ledger_bucket, parse_lines

log = logging.getLogger(__name__)
progress_log = logging.getLogger("mergeit.progress")

BATCHES_DIR = "_batches"
ENDPOINT = "/v1/chat/completions"
FINISHED = frozenset({"completed", "expired", "cancelled", "failed"})   # a batch's end states
ERROR_PENDING = "batch_pending"   # a group waiting on a batch: retried (resumed) by the next run
WRITE_THREADS = 8


# -- custom ids -----------------------------------------------------------------------------------
def custom_id(group_id: str, request_hash: str, chain: str, step: int, stage: str) -> str:
    return f"{group_id}|{request_hash}|{chain}|{step}|{stage}"


def parse_custom_id(cid: str) -> dict[str, Any] | None:
    """The parts of a custom id (the group id may hold ``|``: it is split from the right)."""
    parts = str(cid).rsplit("|", 4)
    if len(parts) != 5 or not parts[3].isdigit():
        return None
    return {"group_id": parts[0], "request_hash": parts[1], "chain": parts[2], "step": int(parts[3]),
            "stage": parts[4]}


# -- the walk over one group's replies --------------------------------------------------------------
@dataclass
class Next:
    """What a group's chain needs: its result (the chain is over), or its next request."""
    result: MergeResult | None = None
    chain: str | None = None            # the chain walked (None: the group has none open)
    step: int = 0
    messages: list[dict[str, str]] | None = None


Judge = Callable[[dict[str, str]], Awaitable[GateVerdict]]


def _chain_of(replies: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The open chain of a group and its replies (the one with most replies should a crash ever
    leave two open)."""
    chains: dict[str, list[dict[str, Any]]] = {}
    for reply in replies:
        chains.setdefault(str(reply.get("chain")), []).append(reply)
    if not chains:
        return None, []
    chain = max(chains, key=lambda c: (len(chains[c]), c))
    return chain, chains[chain]


def _paid(replies: list[dict[str, Any]]) -> dict[str, int]:
    ran = [r for r in replies if not r.get("not_run")]
    return {"attempts": len(ran), "prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in ran),
            "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in ran)}


def _retryable(reply: dict[str, Any]) -> bool:
    code = reply.get("status_code")
    return code is None or code == 200 or code in RETRYABLE_STATUS or code >= 500   # 200: a malformed body


async def walk_chain(replies: list[dict[str, Any]], base: list[dict[str, str]], llm: LLMSettings,
                     merge: MergeSettings, judge: Judge | None) -> Next:
    """Replay a group's open chain the way ``MergeClient.merge`` runs online: per step, retry a
    failed request up to ``llm.max_retries`` times (a request never run is sent again without
    counting), regenerate an invalid reply up to ``merge.regenerations`` times and one that fails
    the gate up to ``merge.gate_regenerations`` times, each regeneration being the prompt plus the
    rejected reply and what was wrong. Deterministic: a later pass walks the same way."""
    chain, mine = _chain_of(replies)
    paid = _paid(mine)
    steps: dict[int, list[dict[str, Any]]] = {}
    for reply in mine:
        steps.setdefault(int(reply.get("step") or 0), []).append(reply)
    follow_up: list[dict[str, str]] = []
    invalid_left, gate_left = merge.regenerations, merge.gate_regenerations
    step = 0
    while True:
        answered, failure = _step_outcome(steps.get(step, []), llm)
        if failure is not None:
            return Next(MergeResult(status=STATUS_FAILED, error=failure, **paid), chain)
        if answered is None:
            return Next(chain=chain, step=step, messages=base + follow_up)
        content = answered.get("content")
        if answered.get("finish_reason") == "length":
            return Next(MergeResult(status=STATUS_FAILED, error=(
                f"{ERROR_TRUNCATED}: the reply was cut at llm.max_tokens={llm.max_tokens}; raise "
                "llm.max_tokens"), **paid), chain)
        merged, why = validate_merged(content, merge.max_output_chars)
        if merged is None:
            if invalid_left <= 0:
                return Next(MergeResult(status=STATUS_FAILED, error=f"{ERROR_INVALID}: {why}", **paid), chain)
            invalid_left -= 1
            follow_up, step = feedback_turns(content, f"it could not be used: {why}"), step + 1
            continue
        if judge is None:
            return Next(MergeResult(status=STATUS_MERGED, **merged, **paid), chain)
        verdict = await judge(merged)
        if verdict.passed:
            return Next(MergeResult(status=STATUS_MERGED, gate=verdict.describe(), **merged, **paid), chain)
        if gate_left <= 0:
            return Next(MergeResult(status=STATUS_GATE_FAILED, gate=verdict.describe(),
                                    error="gate: " + ",".join(verdict.failed), **merged, **paid), chain)
        gate_left -= 1
        follow_up, step = feedback_turns(content, verdict.feedback()), step + 1


def _step_outcome(replies: list[dict[str, Any]], llm: LLMSettings) -> tuple[dict | None, str | None]:
    """One step's answer (a 200 with a completion) or its failure (a request refused for good, or
    retried ``llm.max_retries`` times); neither: the step needs another request."""
    failures = 0
    for reply in sorted(replies, key=lambda r: str(r.get("batch_reply"))):
        if reply.get("not_run"):
            continue
        if reply.get("status_code") == 200 and reply.get("content") is not None:
            return reply, None
        error = str(reply.get("error") or f"http_{reply.get('status_code')}")
        if not _retryable(reply):
            return None, context_error(int(reply["status_code"]), error) or error
        failures += 1
        if failures > llm.max_retries:
            return None, error
    return None, None


# -- staging (in a task) ------------------------------------------------------------------------------
class Stager:
    """The batch input files of one partition of one pass: lines added in order, cut at the
    API's limits, written (file, then its record) by ``close``. Names are fixed by the pass and
    the partition, so a partition Spark computes again finds its files there and writes none."""

    def __init__(self, folder: Location, partition: int, llm: LLMSettings) -> None:
        self.folder, self.partition, self.llm = folder, partition, llm
        self.chunks: list[list[bytes]] = [[]]
        self._bytes = 0
        self.lines = 0

    def add(self, cid: str, body: dict[str, Any]) -> None:
        line = json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body},
                          ensure_ascii=False).encode("utf-8") + b"\n"
        chunk = self.chunks[-1]
        if chunk and (len(chunk) >= self.llm.batch_max_requests or self._bytes + len(line) > self.llm.batch_max_bytes):
            self.chunks.append([])
            self._bytes = 0
        self.chunks[-1].append(line)
        self._bytes += len(line)
        self.lines += 1

    def close(self) -> int:
        """Write the files and their records; the number of files written."""
        written = 0
        for k, chunk in enumerate(c for c in self.chunks if c):
            name = f"part-{self.partition:05d}-{k:03d}"
            record = self.folder / f"{name}.json"
            if record.exists():
                continue   # this partition computed again: its files are staged already
            data = b"".join(chunk)
            (self.folder / f"{name}.jsonl").write_bytes(data)
            record.write_bytes(json.dumps({"name": name, "state": "staged", "lines": len(chunk),
                                           "bytes": len(data)}).encode())
            written += 1
        return written


def open_batches(ledger_root: Location) -> list[str]:
    """The batches recorded as submitted and not yet folded under ``ledger_root`` (no API call)."""
    found = []
    for pass_dir in (ledger_root / BATCHES_DIR).children():
        for record in pass_dir.files():
            if record.name.endswith(".json"):
                data = json.loads(record.read_bytes() or b"{}")
                if data.get("state") in ("uploaded", "submitted"):
                    found.append(str(data.get("batch_id") or data.get("file_id")))
    return found


# -- the driver's book of batches --------------------------------------------------------------------
@dataclass
class Submission:
    """One batch input file and what became of it (its record, as stored)."""
    folder: Location
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.folder.name}/{self.record['name']}"

    @property
    def state(self) -> str:
        return str(self.record.get("state"))

    def save(self, **changes: Any) -> None:
        self.record.update(changes)
        (self.folder / f"{self.record['name']}.json").write_bytes(json.dumps(self.record).encode())

    def lines(self) -> bytes:
        return (self.folder / f"{self.record['name']}.jsonl").read_bytes() or b""


@dataclass
class BookStats:
    """What the book did in this run, for the summary and the progress line."""
    submitted: int = 0
    adopted: int = 0
    abandoned: int = 0
    folded: int = 0
    answered: int = 0    # requests the folded batches ran (the rest were never run: expired, cancelled)
    by_status: dict[str, int] = field(default_factory=dict)


class BatchBook:
    """The driver's side of batch mode under one ledger root: submit, poll, fold, resume."""

    def __init__(self, ledger_root: Location, llm: LLMSettings, client: Any = None,
                 stop: threading.Event | None = None) -> None:
        self.ledger_root = ledger_root
        self.root = ledger_root / BATCHES_DIR
        self.llm = llm
        self.stop = stop or threading.Event()
        self.stats = BookStats()
        self._client = client or openai.OpenAI(base_url=llm.base_url, api_key=resolve_api_key(llm),
                                               max_retries=llm.max_retries, timeout=llm.request_timeout_s)

    # -- records ------------------------------------------------------------------------------
    def submissions(self, folder: Location | None = None) -> list[Submission]:
        """Every submission record (of one pass's folder, or of all), staged files without a
        record recorded as staged first (a task killed between the two writes)."""
        found = []
        for pass_dir in ([folder] if folder is not None else self.root.children()):
            names = {f.name for f in pass_dir.files()}
            for name in sorted(names):
                if name.endswith(".jsonl") and name[:-1] not in names:
                    Submission(pass_dir, {"name": name[:-6], "state": "staged"}).save()
                    names.add(name[:-1])
            for name in sorted(n for n in names if n.endswith(".json")):
                data = (pass_dir / name).read_bytes()
                if data:
                    found.append(Submission(pass_dir, json.loads(data)))
        return found

    def open(self) -> list[Submission]:
        return [s for s in self.submissions() if s.state == "submitted"]

    # -- resume -------------------------------------------------------------------------------
    def resume(self) -> int:
        """Settle what earlier runs left: abandon staged files never uploaded, adopt or abandon
        uploaded ones, then poll and fold every submitted batch. Returns the batches still open."""
        listed: dict[str, str] | None = None
        for sub in self.submissions():
            if sub.state == "staged":
                self._abandon(sub, "staged by a run that ended before submitting it")
            elif sub.state == "uploaded":
                listed = self._listed() if listed is None else listed
                if sub.name in listed:
                    sub.save(state="submitted", batch_id=listed[sub.name])
                    self.stats.adopted += 1
                    log.info("batch %s of %s adopted (created, not recorded, by a killed run)",
                             listed[sub.name], sub.name)
                else:
                    self._abandon(sub, "uploaded by a run that ended before creating its batch")
        return self.wait()

    def _listed(self) -> dict[str, str]:
        """Submission name -> batch id, for every batch of the account that names one."""
        found = {}
        for batch in self._client.batches.list(limit=100):
            name = (batch.metadata or {}).get("mergeit_submission")
            if name:
                found.setdefault(name, batch.id)
        return found

    def abandon(self, folder: Location, why: str) -> None:
        """Abandon every file of one pass not yet submitted."""
        for sub in self.submissions(folder):
            if sub.state == "staged":
                self._abandon(sub, why)

    def _abandon(self, sub: Submission, why: str) -> None:
        """A file never sent: its spends voided (nothing was paid), its groups staged again."""
        lines = [parse_custom_id(line.get("custom_id", "")) for line in parse_lines(sub.lines())]
        self._write_lines(sub, [{"settle": custom_id(**p), "void": True, "batch": True}
                                for p in lines if p], suffix="void")
        sub.save(state="abandoned", why=why)
        self.stats.abandoned += 1
        log.warning("batch file %s abandoned: %s", sub.name, why)

    # -- submit -------------------------------------------------------------------------------
    def submit(self, folder: Location) -> int:
        """Upload and create a batch for each file a pass staged; the number submitted. A
        batch the API refuses is abandoned (its groups are staged again by the next pass)."""
        count = 0
        for sub in self.submissions(folder):
            if sub.state != "staged":
                continue
            try:
                self._submit(sub)
                count += 1
            except openai.APIStatusError as exc:
                self._abandon(sub, f"refused: http_{exc.status_code}: {str(exc)[:200]}")
        self.stats.submitted += count
        return count

    def _submit(self, sub: Submission) -> None:
        uploaded = self._client.files.create(file=(f"{sub.record['name']}.jsonl", sub.lines()), purpose="batch")
        sub.save(state="uploaded", file_id=uploaded.id)   # before the batch: a kill now is adopted or abandoned
        batch = self._client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                            completion_window=self.llm.batch_completion_window,
                                            metadata={"mergeit_submission": sub.name})
        sub.save(state="submitted", batch_id=batch.id, status=batch.status)
        log.info("batch %s submitted: %s (%d requests)", batch.id, sub.name, sub.record.get("lines", 0))

    # -- poll and fold ------------------------------------------------------------------------
    def wait(self) -> int:
        """Poll the submitted batches every ``llm.batch_poll_s`` until each has ended and its
        answers are folded into the ledger, the stop is asked, or ``llm.batch_max_wait_s`` has
        passed. Returns the batches still open (their groups wait for the next run)."""
        started = time.monotonic()
        while True:
            pending = self.open()
            for sub in pending:
                self._poll(sub)
            pending = [s for s in pending if s.state == "submitted"]
            self._report(pending)
            if not pending or time.monotonic() - started > self.llm.batch_max_wait_s:
                return len(pending)
            if self.stop.wait(self.llm.batch_poll_s):
                log.warning("stop asked: %d batches stay open; the next run resumes polling them", len(pending))
                return len(pending)

    def _poll(self, sub: Submission) -> None:
        try:
            batch = self._client.batches.retrieve(sub.record["batch_id"])
        except openai.APIError as exc:   # a failing poll is tried again at the next look
            log.warning("polling batch %s failed: %s", sub.record["batch_id"], str(exc)[:200])
            return
        counts = getattr(batch, "request_counts", None)
        sub.record.update(status=batch.status, counts=counts.model_dump() if counts is not None else None)
        if batch.status in FINISHED:
            self._fold(sub, batch)

    def _fold(self, sub: Submission, batch: Any) -> None:
        """Every answer of an ended batch into the ledger: reply and settle lines, per bucket;
        the requests it never ran are voided. Written before the record says ``done``, under
        fixed names: a fold killed half way is done again to the same objects."""
        answers: dict[str, dict[str, Any]] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                for line in parse_lines(self._client.files.content(file_id).read()):
                    answers.setdefault(str(line.get("custom_id")), line)
        lines = []
        for request in parse_lines(sub.lines()):
            parts = parse_custom_id(request.get("custom_id", ""))
            if parts is not None:
                lines.extend(answer_lines(parts, answers.get(request["custom_id"]), batch))
        self._write_lines(sub, lines, suffix="answers")
        sub.save(state="done", status=batch.status, output_file_id=batch.output_file_id,
                 error_file_id=batch.error_file_id)
        ran = sum(1 for line in lines if line.get("batch_reply") and not line.get("not_run"))
        self.stats.folded += 1
        self.stats.answered += ran
        self.stats.by_status[batch.status] = self.stats.by_status.get(batch.status, 0) + 1
        log.info("batch %s %s: %d of %d requests answered, folded into the ledger", batch.id, batch.status,
                 ran, len(lines) // 2)

    def _write_lines(self, sub: Submission, lines: Iterable[dict[str, Any]], suffix: str) -> None:
        """``lines`` into their groups' ledger buckets, one object per bucket."""
        per_bucket: dict[int, list[str]] = {}
        for line in lines:
            gid = line.get("group_id") or (parse_custom_id(line.get("settle", "")) or {}).get("group_id", "")
            per_bucket.setdefault(ledger_bucket(str(gid)), []).append(json.dumps(line, ensure_ascii=False) + "\n")
        name = f"batch-{sub.folder.name}-{sub.record['name']}-{suffix}.jsonl"

        def write(item: tuple[int, list[str]]) -> None:
            (self.ledger_root / f"bucket={item[0]}" / name).write_bytes("".join(item[1]).encode("utf-8"))

        with concurrent.futures.ThreadPoolExecutor(WRITE_THREADS) as pool:
            list(pool.map(write, per_bucket.items()))

    def _report(self, pending: list[Submission]) -> None:
        if not pending and not self.stats.folded:
            return
        counts = [s.record.get("counts") or {} for s in pending]
        done = sum(int(c.get("completed") or 0) + int(c.get("failed") or 0) for c in counts)
        total = sum(int(s.record.get("lines") or 0) for s in pending)
        progress_log.info("batches: %d submitted this run, %d open (%d of %d requests answered), %d ended "
                          "and folded (%s)", self.stats.submitted, len(pending), done, total, self.stats.folded,
                          ", ".join(f"{k} {v}" for k, v in sorted(self.stats.by_status.items())) or "none yet")


def answer_lines(parts: dict[str, Any], answer: dict[str, Any] | None, batch: Any) -> list[dict[str, Any]]:
    """The reply and settle lines of one request of an ended batch (``answer``: its line in the
    output or error file, None when neither has it)."""
    cid = custom_id(**parts)
    reply: dict[str, Any] = {"batch_reply": cid, **parts, "batch": batch.id}
    response = (answer or {}).get("response")
    if not response:
        error = (answer or {}).get("error") or {}
        code = error.get("code") or f"batch_{batch.status}"
        reply.update(not_run=True, status_code=None, error=f"{code}: {error.get('message') or 'not run'}")
        return [reply, {"settle": cid, "void": True, "batch": True, "tokens": 0}]
    body = response.get("body") or {}
    usage = body.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    status = int(response.get("status_code") or 0)
    reply.update(status_code=status, prompt_tokens=prompt, completion_tokens=completion)
    choices = body.get("choices") if isinstance(body, dict) else None
    if status == 200 and choices and isinstance(choices[0], dict) and isinstance(choices[0].get("message"), dict):
        reply.update(content=choices[0]["message"].get("content") or "", finish_reason=choices[0].get("finish_reason"))
    elif status == 200:
        reply.update(error="malformed_response: the answer has no choices")
    else:
        message = ((body.get("error") or {}).get("message") if isinstance(body, dict) else None) or "error"
        reply.update(error=f"http_{status}: {str(message)[:300]}")
    return [reply, {"settle": cid, "batch": True, "tokens": prompt + completion, "prompt_tokens": prompt,
                    "completion_tokens": completion}]


FUTILE_PASSES = 3   # batches in a row that ran none of their requests: the run stops staging


def max_passes(llm: LLMSettings, merge: MergeSettings) -> int:
    """A bound on the passes of a batch run, never reached unless batches keep ending with most
    of their requests unrun: every step of the longest chain (each regeneration) retried
    ``llm.max_retries`` times, several times over, and the last pass, which stages nothing."""
    return 4 * (merge.regenerations + merge.gate_regenerations + 1) * (llm.max_retries + 1) + 1
