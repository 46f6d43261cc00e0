"""A scripted OpenAI-protocol server on a real loopback socket, for tests and benchmarks.

``FakeOpenAI`` serves ``GET /v1/models`` and ``POST /v1/chat/completions`` from a
``ThreadingHTTPServer``. What each chat request gets is decided by ``script(n, key, request)``:
``n`` is the 1-based number of the request across the server, ``key`` identifies the merge group
(derived from the examples in the prompt, see ``group_key``), ``request`` is the parsed JSON body.
The script returns a ``Reply``; the default is a good merge of the group's examples.

Reply kinds:
  merge      200, content = a plausible merge of the examples (joined instructions and outputs)
  content    200, content = ``Reply.content`` verbatim (not JSON, JSON of the wrong shape, fenced...)
  status     HTTP ``Reply.status`` with an OpenAI-style error body and ``Reply.headers``
  hang       sleep ``Reply.delay_s`` before answering (past the client's timeout)
  malformed  200 with a body that is not JSON
  close      close the connection without an answer

Options: ``latency_s`` (fixed delay before every answer), ``break_after`` (after that many chat
requests every further one gets ``broken_reply``, default 503), ``refuse_json_schema`` (answer a
json_schema response_format with llama-cpp-python's refusal: HTTP 500 naming response_format),
``preflight_reply`` (what a request without a group gets: the driver's preflight; counted in
``preflights``, never in ``requests``/``count``, and no script sees it), ``context_tokens`` (listed
as ``max_model_len`` in ``/v1/models``, as vLLM does), ``port`` (0: any free one; a test that
"restarts" a server binds the old one's). ``stop_soon`` stops the server from inside a script.
Counters: ``requests`` (list of ``(n, key, kind)``), ``per_group`` (requests per key),
``served_ok`` (200 merge/content replies per key), ``times`` (arrival, monotonic),
``response_formats`` (type asked per request), ``max_in_flight``, ``last_messages``.

``Faults`` is a script that injects a mix of faults into a share of the requests (fault
injection for tests and the merge benchmark).
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping, Sequence

from mergeit_spark.llm.prompt import EXAMPLES_BEGIN, parse_examples


@dataclass
class Reply:
    kind: str = "merge"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content: str | None = None
    delay_s: float = 0.0
    message: str = "scripted failure"
    finish_reason: str = "stop"


Script = Callable[[int, str, dict], Reply]


def group_key(examples: Sequence[Mapping[str, Any]]) -> str:
    """The fake's name for a group: hash of its sorted instructions (tests compute it the same way)."""
    text = "\x1f".join(sorted(str(e.get("instruction", "")) for e in examples))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def merged_content(examples: Sequence[Mapping[str, Any]]) -> str:
    """A crude but honest merge: every instruction, every input, every output, joined."""
    instructions = [str(e.get("instruction", "")).strip().rstrip(".") for e in examples]
    inputs = [str(e.get("input", "")).strip() for e in examples if str(e.get("input", "")).strip()]
    outputs = [str(e.get("output", "")).strip() for e in examples]
    merged = {
        "instruction": "; then ".join(instructions) + ".",
        "input": "\n".join(inputs),
        "output": "\n\n".join(outputs) + "\n\nTogether these answers cover every part of the task.",
    }
    return json.dumps(merged)


FAULT_KINDS = ("429", "500", "503", "hang", "non_json", "missing_key", "refusal")
REFUSAL = "I'm sorry, but I can't help with merging these examples."


class Faults:
    """Script: each request fails with probability ``rate``, with one of ``FAULT_KINDS`` (429 with
    Retry-After, 500, 503, a hang past the client's timeout, a body that is not JSON, JSON missing
    the ``output`` key, a refusal). The draw depends only on (seed, group, the group's attempt
    number), so a rerun meets the same faults on the same attempts. ``injected`` counts each kind.
    """

    def __init__(self, rate: float = 0.3, seed: int = 11, hang_s: float = 1.5,
                 retry_after: str = "0.2") -> None:
        self.rate, self.seed, self.hang_s, self.retry_after = rate, seed, hang_s, retry_after
        self.attempts: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, n: int, key: str, request: dict) -> Reply:
        with self._lock:
            self.attempts[key] += 1
            draw = random.Random(f"{self.seed}:{key}:{self.attempts[key]}")
            if draw.random() >= self.rate:
                return Reply()
            kind = FAULT_KINDS[draw.randrange(len(FAULT_KINDS))]
            self.injected[kind] += 1
        return {
            "429": Reply(kind="status", status=429, headers={"Retry-After": self.retry_after}),
            "500": Reply(kind="status", status=500),
            "503": Reply(kind="status", status=503),
            "hang": Reply(kind="hang", delay_s=self.hang_s),
            "non_json": Reply(kind="malformed"),
            "missing_key": Reply(kind="content", content=json.dumps({"instruction": "Do both.", "input": ""})),
            "refusal": Reply(kind="content", content=REFUSAL),
        }[kind]


class FakeOpenAI:
    """Scripted OpenAI-compatible server; use as a context manager, ``base_url`` to connect."""

    def __init__(self, script: Script | None = None, *, latency_s: float = 0.0,
                 break_after: int | None = None, broken_reply: Reply | None = None,
                 refuse_json_schema: bool = False, model: str = "fake-model",
                 preflight_reply: Reply | None = None, context_tokens: int | None = None,
                 port: int = 0) -> None:
        self.script = script
        self.preflight_reply = preflight_reply or Reply(kind="content", content="OK")
        self.context_tokens = context_tokens
        self.port = port
        self.preflights = 0
        self.latency_s = latency_s
        self.break_after = break_after
        self.broken_reply = broken_reply or Reply(kind="status", status=503, message="broken")
        self.refuse_json_schema = refuse_json_schema
        self.model = model
        self.lock = threading.Lock()
        self.count = 0
        self.requests: list[tuple[int, str, str]] = []
        self.per_group: Counter[str] = Counter()
        self.served_ok: Counter[str] = Counter()
        self.response_formats: list[str | None] = []
        self.times: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_messages: list[dict] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                if self.path.rstrip("/") == "/v1/models":
                    entry = {"id": fake.model, "object": "model", "owned_by": "tests"}
                    if fake.context_tokens:
                        entry["max_model_len"] = fake.context_tokens   # as vLLM lists it
                    self._send(200, {"object": "list", "data": [entry]})
                elif not fake._serve_more(self, "GET", b""):
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    if not fake._serve_more(self, "POST", raw):
                        self._send(404, {"error": {"message": "not found"}})
                    return
                try:
                    request = json.loads(raw)
                except ValueError:  # what is left of a connection the client gave up on
                    self.close_connection = True
                    return
                with fake.lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    fake._handle_chat(self, request)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None,
                      raw: bytes | None = None) -> None:
                data = raw if raw is not None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

        self._server = _QuietServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop_soon(self) -> None:
        """Stop serving from inside a request handler (the server dies mid-run): new connections
        are refused from then on."""
        threading.Thread(target=self.stop, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling ---------------------------------------------------------------------
    def _serve_more(self, handler: Any, method: str, raw: bytes) -> bool:
        """Hook for subclasses that serve more paths; False: not served (the handler sends 404)."""
        return False

    def _handle_chat(self, handler: Any, request: dict) -> None:
        reply, n, examples, messages = self._route(request)
        self._answer(handler, request, reply, n, examples, messages)

    def _route(self, request: dict) -> tuple[Reply, int, list, list]:
        """Count one chat request and pick its reply: ``(reply, n, examples, messages)``."""
        messages = request.get("messages", [])
        if not _group_turn(messages):   # the driver's preflight: counted apart, scripted apart
            with self.lock:
                self.preflights += 1
            return self.preflight_reply, 0, [], messages
        try:
            examples = parse_examples(_group_turn(messages))
        except (ValueError, json.JSONDecodeError):
            examples = []
        key = group_key(examples)
        fmt = (request.get("response_format") or {}).get("type")
        with self.lock:
            self.count += 1
            n = self.count
            self.per_group[key] += 1
            self.response_formats.append(fmt)
            self.times.append(time.monotonic())
            self.last_messages = messages
        if self.refuse_json_schema and fmt == "json_schema":
            reply = Reply(kind="status", status=500, message=(
                "1 validation error: ('body', 'response_format', 'type') Input should be 'text' "
                "or 'json_object'"))
        elif self.break_after is not None and n > self.break_after:
            reply = self.broken_reply
        elif self.script is not None:
            reply = self.script(n, key, request)
        else:
            reply = Reply()
        with self.lock:
            self.requests.append((n, key, reply.kind))
            if reply.kind in ("merge", "content"):
                self.served_ok[key] += 1
        return reply, n, examples, messages

    def _answer(self, handler: Any, request: dict, reply: Reply, n: int, examples: list,
                messages: list) -> None:
        if self.latency_s:
            time.sleep(self.latency_s)
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.kind == "close":
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        if reply.kind == "malformed":
            handler._send(200, None, raw=b'{"id": "chatcmpl-1", "choices": [{"message": ')
            return
        status, body = self._reply_body(request, reply, n, examples, messages)
        handler._send(status, body, reply.headers)

    def _reply_body(self, request: dict, reply: Reply, n: int, examples: list,
                    messages: list) -> tuple[int, dict]:
        """``(status_code, body)`` of a ``status`` reply or a 200 one (merge, content, hang)."""
        if reply.kind == "status":
            return reply.status, {"error": {"message": reply.message, "type": "scripted",
                                            "code": reply.status}}
        content = merged_content(examples) if reply.kind in ("merge", "hang") else (reply.content or "")
        prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
        body = {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": max(1, prompt_chars // 4),
                      "completion_tokens": max(1, len(content) // 4),
                      "total_tokens": max(1, prompt_chars // 4) + max(1, len(content) // 4)},
        }
        return 200, body


class _QuietServer(ThreadingHTTPServer):
    """A client that times out closes its connection under a hanging reply: not worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _group_turn(messages: Sequence[Mapping[str, Any]]) -> str:
    """The group is in the last user turn holding the examples marker (a regeneration adds a
    feedback turn after it; the demonstrations come before it)."""
    for m in reversed(messages):
        if m.get("role") == "user" and EXAMPLES_BEGIN in str(m.get("content", "")):
            return str(m["content"])
    return ""
