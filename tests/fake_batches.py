"""A scripted OpenAI Files + Batch server on a real loopback socket, for fault-injection tests.

``FakeBatchServer`` is a ``FakeOpenAI`` (it still serves ``GET /v1/models`` and
``POST /v1/chat/completions``: the driver's preflight uses chat) that also serves:

  POST /v1/files                  multipart upload (fields ``purpose`` and ``file``) -> FileObject.
                                  A ``batch`` file must hold at most ``max_file_lines`` lines and
                                  ``max_file_bytes`` bytes, each line a JSON object with a string
                                  ``custom_id`` unique in the file, ``method`` "POST", ``url``
                                  "/v1/chat/completions" and a ``body`` object; else HTTP 400
  GET  /v1/files/{id}[/content]   the FileObject, or the raw bytes; 404 for an unknown id
  POST /v1/batches                {input_file_id, endpoint, completion_window, metadata} -> a Batch
                                  "validating"; an unknown file, endpoint or window -> 400
  GET  /v1/batches/{id}           the Batch, advanced by this retrieve (see progression)
  GET  /v1/batches?limit=&after=  newest first, cursor-paginated as OpenAI does (no advance)
  POST /v1/batches/{id}/cancel    "cancelling"; the next retrieve shows "cancelled" (409 if over)

Every batch line is answered by the chat machinery: the same ``script(n, key, request)``, the
same ``Reply`` kinds and bodies (``usage`` included), counted in ``count``, ``requests``,
``per_group`` and ``served_ok`` (a line without a group is a preflight, as in chat). A 200 reply
becomes an output-file line ``{"id": "batch_req_<n>", "custom_id", "response": {"status_code":
200, "request_id": "req_<n>", "body": <chat completion>}, "error": null}``; a ``status`` reply an
error-file line with that status and its error body; ``malformed``/``close`` an error-file line
with status 500; ``hang`` is answered normally (a batch has no timeout). Nothing is slept.

Progression, driven by retrieves: the i-th retrieve of a running batch answers its lines, in
input order, up to ``total * i // polls_to_complete`` and shows "in_progress" with those in
``request_counts``; the retrieve that is at least the ``polls_to_complete``-th (default 1: the
first) and finds the batch at least ``seconds_to_complete`` old (by ``clock``, default
``time.monotonic``) answers the rest and ends it "completed". Output and error files are real
files (purpose ``batch_output``); ``output_file_id``/``error_file_id`` are null when that file
would be empty. ``request_counts``: completed = 200 answers, failed = every other line.

Faults (constructor options, each also settable on the instance between calls):
  script / Faults        failed lines land in the error file with their status
  expire_after_lines=k   only the first k lines are ever answered; a batch with more ends
                         "expired", the rest in the error file as ``batch_expired`` (response
                         null), never scripted, counted or billed. None: never
  polls_to_complete, seconds_to_complete   a slow batch
  poll_failures=n        the next n ``GET /v1/batches/{id}`` answer HTTP 500 (no advance)
  fail_batches=n         the next n created batches end "failed" on their first retrieve, with
                         ``errors`` listed and no output
A cancelled batch keeps the lines answered before the cancel; the rest are ``batch_cancelled``.

Counters (mutated under ``lock``): ``files`` (id -> {"bytes": content, "purpose", "filename",
"created_at"}), ``batches`` (id -> the Batch's fields plus ``line_count``, ``lines`` (the
parsed input), ``polls``, ``results`` (records answered so far)), ``created_batches`` (ids in
creation order), ``retrieves`` (batch GETs, failed ones included), ``lines_answered``
(custom_id -> times answered). ``output_lines(batch_id)`` and ``error_lines(batch_id)`` parse a
finished batch's files.
"""
from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from collections import Counter
from typing import Any, Callable
from urllib.parse import parse_qs

from fake_openai import FakeOpenAI, Script

CHAT_URL = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
BATCH_FIELDS = (
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "request_counts", "metadata")
UNANSWERED = {
    "expired": ("batch_expired",
                "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
}
SERVER_ERROR = {"error": {"message": "The server had an error while processing your request.",
                          "type": "server_error", "param": None, "code": None}}


class ApiError(Exception):
    """An OpenAI error answer: HTTP ``status`` with ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": None, "code": None}}


class FakeBatchServer(FakeOpenAI):
    """Scripted Files + Batch (and chat) server; use as a context manager, ``base_url`` to connect."""

    def __init__(self, script: Script | None = None, *, polls_to_complete: int = 1,
                 seconds_to_complete: float = 0.0, expire_after_lines: int | None = None,
                 poll_failures: int = 0, fail_batches: int = 0, max_file_lines: int = 50_000,
                 max_file_bytes: int = 200 * 1024 * 1024,
                 clock: Callable[[], float] = time.monotonic, **chat_options: Any) -> None:
        super().__init__(script, **chat_options)
        self.polls_to_complete = polls_to_complete
        self.seconds_to_complete = seconds_to_complete
        self.expire_after_lines = expire_after_lines
        self.poll_failures = poll_failures
        self.fail_batches = fail_batches
        self.max_file_lines = max_file_lines
        self.max_file_bytes = max_file_bytes
        self.clock = clock
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.created_batches: list[str] = []
        self.retrieves = 0
        self.lines_answered: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._batch_lock = threading.RLock()   # one files/batches operation at a time

    def start(self) -> "FakeBatchServer":
        super().start()
        # headers and body go out in two writes: without this every answer waits ~40 ms for a
        # delayed ACK, and a batch test polls a lot (only this server's handler class changes)
        self._server.RequestHandlerClass.disable_nagle_algorithm = True
        return self

    # -- helpers for tests --------------------------------------------------------------------
    def file_lines(self, file_id: str | None) -> list[dict]:
        """The JSON lines of a stored file ([] for None)."""
        if file_id is None:
            return []
        return [json.loads(line) for line in self.files[file_id]["bytes"].splitlines()]

    def output_lines(self, batch_id: str) -> list[dict]:
        return self.file_lines(self.batches[batch_id]["output_file_id"])

    def error_lines(self, batch_id: str) -> list[dict]:
        return self.file_lines(self.batches[batch_id]["error_file_id"])

    # -- routing ------------------------------------------------------------------------------
    def _serve_more(self, handler: Any, method: str, raw: bytes) -> bool:
        path, _, query = handler.path.partition("?")
        for verb, pattern, name in _ROUTES:
            match = re.fullmatch(pattern, path.rstrip("/"))
            if verb == method and match:
                with self._batch_lock:
                    try:
                        status, body = getattr(self, name)(handler, raw, query, *match.groups())
                    except ApiError as exc:
                        status, body = exc.status, exc.body
                    except ValueError as exc:   # a body that is not JSON, a limit not a number
                        status, body = 400, ApiError(400, str(exc)).body
                _reply(handler, status, body)
                return True
        return False

    # -- files --------------------------------------------------------------------------------
    def _create_file(self, handler: Any, raw: bytes, query: str) -> tuple[int, Any]:
        fields = _multipart(handler.headers.get("Content-Type", ""), raw)
        if "file" not in fields or "purpose" not in fields:
            raise ApiError(400, "a multipart upload needs the fields 'file' and 'purpose'")
        filename, data = fields["file"]
        purpose = fields["purpose"][1].decode()
        if purpose == "batch":
            self._check_batch_file(data)
        return 200, _file_object(self._store_file(data, purpose, filename or "upload"))

    def _check_batch_file(self, data: bytes) -> None:
        if len(data) > self.max_file_bytes:
            raise ApiError(400, f"the file is {len(data)} bytes, over the {self.max_file_bytes} allowed")
        lines = data.splitlines()
        if not lines or len(lines) > self.max_file_lines:
            raise ApiError(400, f"the file has {len(lines)} requests; 1 to {self.max_file_lines} allowed")
        seen: set[str] = set()
        for number, line in enumerate(lines, 1):
            problem = _line_problem(line, seen)
            if problem:
                raise ApiError(400, f"line {number}: {problem}")

    def _store_file(self, data: bytes, purpose: str, filename: str) -> dict:
        with self.lock:
            file_id = f"file-fake{next(self._ids)}"
            entry = {"id": file_id, "bytes": data, "purpose": purpose, "filename": filename,
                     "created_at": int(time.time())}
            self.files[file_id] = entry
        return entry

    def _get_file(self, handler: Any, raw: bytes, query: str, file_id: str) -> tuple[int, Any]:
        return 200, _file_object(self._file(file_id))

    def _get_content(self, handler: Any, raw: bytes, query: str, file_id: str) -> tuple[int, Any]:
        return 200, self._file(file_id)["bytes"]

    def _file(self, file_id: str) -> dict:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}")
        return self.files[file_id]

    # -- batches ------------------------------------------------------------------------------
    def _create_batch(self, handler: Any, raw: bytes, query: str) -> tuple[int, Any]:
        request = json.loads(raw or b"{}")
        entry = self.files.get(request.get("input_file_id", ""))
        if entry is None or entry["purpose"] != "batch":
            raise ApiError(400, f"no batch input file {request.get('input_file_id')!r}")
        if request.get("endpoint") != CHAT_URL or request.get("completion_window") != "24h":
            raise ApiError(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        lines = [json.loads(line) for line in entry["bytes"].splitlines()]
        now = int(time.time())
        with self.lock:
            batch_id = f"batch_fake{next(self._ids)}"
            doomed = self.fail_batches > 0
            self.fail_batches -= doomed
            state = {field: None for field in BATCH_FIELDS}
            state.update(id=batch_id, object="batch", endpoint=CHAT_URL, status="validating",
                         input_file_id=entry["id"], completion_window="24h", created_at=now,
                         expires_at=now + 86_400, metadata=request.get("metadata"),
                         request_counts={"total": len(lines), "completed": 0, "failed": 0},
                         line_count=len(lines), polls=0, results=[], lines=lines,
                         doomed=doomed, born=self.clock())
            self.batches[batch_id] = state
            self.created_batches.append(batch_id)
        return 200, _batch_object(state)

    def _retrieve(self, handler: Any, raw: bytes, query: str, batch_id: str) -> tuple[int, Any]:
        with self.lock:
            self.retrieves += 1
            failing = self.poll_failures > 0
            self.poll_failures -= failing
        if failing:
            raise ApiError(500, "scripted poll failure", "server_error")
        state = self._batch(batch_id)
        self._advance(state)
        return 200, _batch_object(state)

    def _list(self, handler: Any, raw: bytes, query: str) -> tuple[int, Any]:
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        limit = min(max(int(params.get("limit", 20)), 1), 100)
        ids = self.created_batches[::-1]
        start = ids.index(params["after"]) + 1 if params.get("after") in ids else 0
        page = [_batch_object(self.batches[i]) for i in ids[start:start + limit]]
        return 200, {"object": "list", "data": page, "has_more": start + limit < len(ids),
                     "first_id": page[0]["id"] if page else None,
                     "last_id": page[-1]["id"] if page else None}

    def _cancel(self, handler: Any, raw: bytes, query: str, batch_id: str) -> tuple[int, Any]:
        state = self._batch(batch_id)
        if state["status"] in TERMINAL:
            raise ApiError(409, f"Cannot cancel a batch with status {state['status']}")
        with self.lock:
            if state["status"] != "cancelling":
                state.update(status="cancelling", cancelling_at=int(time.time()))
        return 200, _batch_object(state)

    def _batch(self, batch_id: str) -> dict:
        if batch_id not in self.batches:
            raise ApiError(404, f"No such Batch object: {batch_id}")
        return self.batches[batch_id]

    # -- progression --------------------------------------------------------------------------
    def _advance(self, state: dict) -> None:
        """One retrieve's worth of progress on a batch that is not over."""
        if state["status"] in TERMINAL:
            return
        if state["status"] == "cancelling":
            self._finish(state, "cancelled")
            return
        with self.lock:
            state["polls"] += 1
            state["in_progress_at"] = state["in_progress_at"] or int(time.time())
        if state["doomed"]:
            self._fail(state)
            return
        total, needed = state["line_count"], max(1, self.polls_to_complete)
        done = (state["polls"] >= needed
                and self.clock() - state["born"] >= self.seconds_to_complete)
        target = total if done else min(total, total * state["polls"] // needed)
        cap = total if self.expire_after_lines is None else min(total, self.expire_after_lines)
        self._answer_upto(state, min(target, cap))
        if done:
            self._finish(state, "completed" if len(state["results"]) == total else "expired")
        else:
            with self.lock:
                state.update(status="in_progress", request_counts=_counts(state, total))

    def _answer_upto(self, state: dict, k: int) -> None:
        for line in state["lines"][len(state["results"]):k]:
            record = self._answer_line(line)
            with self.lock:
                state["results"].append(record)
                self.lines_answered[line["custom_id"]] += 1

    def _answer_line(self, line: dict) -> dict:
        """One batch line through the chat machinery: its output- or error-file record."""
        request = line["body"]
        reply, n, examples, messages = self._route(request)
        if reply.kind in ("close", "malformed"):
            status, body = 500, SERVER_ERROR
        else:
            status, body = self._reply_body(request, reply, n, examples, messages)
        with self.lock:
            seq = next(self._ids)
        return {"id": f"batch_req_{seq}", "custom_id": line["custom_id"],
                "response": {"status_code": status, "request_id": f"req_{seq}", "body": body},
                "error": None}

    def _finish(self, state: dict, status: str) -> None:
        """End a batch: write its output and error files, set its counts and timestamps."""
        ok = [r for r in state["results"] if r["response"]["status_code"] == 200]
        errors = [r for r in state["results"] if r["response"]["status_code"] != 200]
        if status in UNANSWERED:
            errors += [self._unanswered(line, status) for line in state["lines"][len(state["results"]):]]
        output_id, error_id = self._write(state, "output", ok), self._write(state, "error", errors)
        now = int(time.time())
        with self.lock:
            state.update(status=status, output_file_id=output_id, error_file_id=error_id,
                         request_counts=_counts(state, state["line_count"], len(errors)))
            state["finalizing_at"] = state["finalizing_at"] or now
            state[f"{status}_at"] = now

    def _unanswered(self, line: dict, status: str) -> dict:
        code, message = UNANSWERED[status]
        with self.lock:
            seq = next(self._ids)
        return {"id": f"batch_req_{seq}", "custom_id": line["custom_id"], "response": None,
                "error": {"code": code, "message": message}}

    def _write(self, state: dict, which: str, records: list[dict]) -> str | None:
        if not records:
            return None
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        return self._store_file(data, "batch_output", f"{state['id']}_{which}.jsonl")["id"]

    def _fail(self, state: dict) -> None:
        errors = {"object": "list", "data": [{"code": "invalid_request", "message": "scripted"}]}
        with self.lock:
            state.update(status="failed", failed_at=int(time.time()), errors=errors,
                         request_counts={"total": 0, "completed": 0, "failed": 0})


_ROUTES = (
    ("POST", r"/v1/files", "_create_file"),
    ("GET", r"/v1/files/([^/]+)", "_get_file"),
    ("GET", r"/v1/files/([^/]+)/content", "_get_content"),
    ("POST", r"/v1/batches", "_create_batch"),
    ("GET", r"/v1/batches", "_list"),
    ("GET", r"/v1/batches/([^/]+)", "_retrieve"),
    ("POST", r"/v1/batches/([^/]+)/cancel", "_cancel"),
)


def _counts(state: dict, total: int, failed: int | None = None) -> dict:
    """``request_counts``: completed = 200 answers so far; failed = the other answers, or
    ``failed`` when the batch is over."""
    ok = sum(r["response"]["status_code"] == 200 for r in state["results"])
    bad = len(state["results"]) - ok if failed is None else failed
    return {"total": total, "completed": ok, "failed": bad}


def _line_problem(line: bytes, seen: set[str]) -> str | None:
    """What is wrong with one line of a batch input file (None: nothing)."""
    try:
        item = json.loads(line)
    except ValueError:
        return "not JSON"
    if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
        return "no string custom_id"
    if item["custom_id"] in seen:
        return f"duplicate custom_id {item['custom_id']!r}"
    seen.add(item["custom_id"])
    if item.get("method") != "POST" or item.get("url") != CHAT_URL:
        return f"method must be POST and url {CHAT_URL}"
    if not isinstance(item.get("body"), dict):
        return "body must be an object"
    return None


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, bytes)."""
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "expected multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _file_object(entry: dict) -> dict:
    return {"id": entry["id"], "object": "file", "bytes": len(entry["bytes"]),
            "created_at": entry["created_at"], "filename": entry["filename"],
            "purpose": entry["purpose"], "status": "processed"}


def _batch_object(state: dict) -> dict:
    return {field: state[field] for field in BATCH_FIELDS}


def _reply(handler: Any, status: int, body: Any) -> None:
    """Send JSON, or raw bytes (a file's content) as application/octet-stream."""
    if not isinstance(body, bytes):
        handler._send(status, body)
        return
    handler.send_response(status)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()
