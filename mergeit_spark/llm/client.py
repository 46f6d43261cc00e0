"""Async merge client for any OpenAI-compatible chat server (OpenAI, vLLM, llama.cpp).

One ``MergeClient`` lives in one event loop (one Spark partition). It owns an
``openai.AsyncOpenAI`` with the library's own retries switched off (``max_retries=0``): the
retry policy is ours, so it is the same on every server and is counted and recorded.

Per HTTP request:
  * a timeout of ``llm.request_timeout_s`` (the client's timeout plus an ``asyncio`` guard for
    servers that trickle bytes); the clock starts when the attempt is counted, before its bytes
    are written, so an event loop stalled past the timeout counts an attempt the server may never
    have seen (spend is over-counted, never under-counted);
  * at most ``llm.concurrency`` requests in flight (an ``asyncio.Semaphore``, held only while a
    request is on the wire, not during backoff);
  * at most this loop's share of ``llm.requests_per_minute`` and ``llm.tokens_per_minute``
    (``RateLimits``: ``aiolimiter`` leaky buckets; a request counts its prompt estimate plus
    ``llm.max_tokens``, as hosted APIs count it);
  * retried up to ``llm.max_retries`` times on 408, 409, 429, 5xx, timeouts, connection errors and
    bodies that are not valid JSON, with exponential backoff and jitter (``backoff_initial_s``
    doubling, times a random factor in [0.5, 1]); a ``Retry-After`` (seconds or HTTP date) or
    ``retry-after-ms`` header replaces the backoff, capped by ``llm.backoff_max_s``, and holds back
    every request of the loop until it has passed (the server asked the client, not one request,
    to wait);
  * other 4xx (bad request, auth, not found) fail at once: retrying cannot help;
  * a circuit breaker (``llm.circuit_breaker_failures``): after that many consecutive transport,
    auth or 5xx failures in this loop, the client sends nothing more and every merge asked of it
    fails at once with ``circuit_open`` (a server that is down is not hammered by every group
    in turn; the next run retries those groups).

A reply the server cut at ``llm.max_tokens`` (``finish_reason == "length"``) fails the merge with
``truncated`` at once: regenerating the same request would be cut the same way.

Structured output (``llm.json_mode``): ``schema`` sends ``response_format`` json_schema (OpenAI,
vLLM); ``json_object`` sends plain JSON mode; ``none`` sends nothing and parses text; ``auto``
walks the ladder json_schema -> json_object with a ``schema`` (llama-cpp-python's grammar mode)
-> json_object -> none, stepping down when the server refuses a ``response_format`` (HTTP 400,
422, or the 500 that llama-cpp-python answers, with ``response_format`` in the message) and
remembering the step for the process. A reply is read as one JSON object, or one fenced block
holding one (``llm.reply``): an object found somewhere in other text is not taken.

Per merge (``MergeClient.merge``): the reply must be a JSON object with string ``instruction``,
``input`` and ``output``, non-empty instruction and output, each at most
``merge.max_output_chars``; an invalid reply is regenerated up to ``merge.regenerations`` times,
a reply that fails the quality gate up to ``merge.gate_regenerations`` times. A regeneration
re-sends the prompt plus the rejected reply and one line saying what was wrong. Nothing raises
out of ``merge``: every outcome is a ``MergeResult``.

API key: the environment variable ``llm.api_key_env``, else the file ``llm.api_key_file``. Only a
server on a loopback address may go without one (the placeholder ``not-needed``, which local
servers ignore); for any other address a missing key is a ``MissingAPIKey`` error. The key is
never logged, never stored, and scrubbed from error texts.

Error texts start with their kind (``kind: detail``); ``rerun_can_fix`` says which kinds a plain
rerun retries (transport, server, timeout, auth, ``circuit_open``, ``budget_exhausted``, a crash)
and which it does not (``invalid_output``, ``truncated``, ``prompt_too_long``, ``missing_member``).
"""
from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence

import openai
from aiolimiter import AsyncLimiter

from ..config import LLMSettings, MergeSettings
from ..redact import register_secret
from .prompt import MERGED_SCHEMA, build_messages
from .reply import extract_json_object, validate_merged
from .spend import Prices, Tokens
from .tokens import estimate_prompt_tokens

log = logging.getLogger(__name__)

PLACEHOLDER_KEY = "not-needed"
RETRYABLE_STATUS = frozenset({408, 409, 429})
JSON_LADDERS: dict[str, tuple[str, ...]] = {
    "auto": ("json_schema", "json_object_schema", "json_object", "none"),
    "schema": ("json_schema",),
    "json_object": ("json_object",),
    "none": ("none",),
}
# How far down its ladder each (base_url, model, json_mode) has stepped in this process.
_LADDER_STEP: dict[tuple[str, str, str], int] = {}

STATUS_MERGED = "merged"
STATUS_GATE_FAILED = "gate_failed"
STATUS_FAILED = "failed"
ERROR_BUDGET = "budget_exhausted"
ERROR_CIRCUIT_OPEN = "circuit_open"
ERROR_TRUNCATED = "truncated"
ERROR_PROMPT_TOO_LONG = "prompt_too_long"
ERROR_INVALID = "invalid_output"
ERROR_MISSING_MEMBER = "missing_member"
# Failures a plain rerun cannot fix: the same request would fail the same way.
SETTLED_ERRORS = frozenset({ERROR_INVALID, ERROR_TRUNCATED, ERROR_PROMPT_TOO_LONG, ERROR_MISSING_MEMBER})
# HTTP statuses that count towards the circuit breaker besides 5xx: the server or the key is down.
_BREAKER_STATUS = frozenset({401, 403})


class MissingAPIKey(ValueError):
    """No API key for a server that is not on this machine."""


def error_kind(error: str | None) -> str:
    """The kind of a failure text (``"http_503: ..."`` -> ``"http_503"``); "" for none."""
    return (error or "").split(":", 1)[0].strip()


def rerun_can_fix(error: str | None) -> bool:
    """Whether a failed group's error is one a plain rerun retries (transport, server, timeout,
    auth, circuit_open, budget_exhausted, a crash), as opposed to one the same request would hit
    again (invalid output after every regeneration, a truncated reply, a prompt too long for the
    model, a missing member)."""
    return error_kind(error) not in SETTLED_ERRORS


def is_loopback(base_url: str) -> bool:
    """Whether ``base_url`` names this machine (localhost or a loopback address)."""
    host = (urlsplit(base_url).hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mask_url(url: str) -> str:
    """``url`` with any user:password in it replaced by ``***``, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def resolve_api_key(llm: LLMSettings, env: Mapping[str, str] | None = None) -> str:
    """The API key: environment variable, else key file; a placeholder only for a loopback server.

    Raises ``MissingAPIKey`` for any other server: a placeholder there fails every request with
    401, after the run has marked every group."""
    env = os.environ if env is None else env
    value = env.get(llm.api_key_env, "").strip() if llm.api_key_env else ""
    if value:
        return register_secret(value)  # masked in every log record of this process from now on
    if llm.api_key_file:
        path = Path(llm.api_key_file).expanduser()
        if path.is_file():
            value = path.read_text().strip()
            if value:
                return register_secret(value)
    if is_loopback(llm.base_url):
        return PLACEHOLDER_KEY
    where = f"the environment variable {llm.api_key_env}" if llm.api_key_env else "no variable"
    if llm.api_key_file:
        where += f" or the file {llm.api_key_file}"
    raise MissingAPIKey(f"no API key for {mask_url(llm.base_url)}: set {where} "
                        "(llm.api_key_env / llm.api_key_file)")


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds a server asked us to wait: ``retry-after-ms``, ``Retry-After`` seconds or HTTP date."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_ts = time.time() if now is None else now
    return max(0.0, when.timestamp() - now_ts)


def backoff_delay(retry: int, llm: LLMSettings, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Delay before retry number ``retry`` (0-based): Retry-After when given, else exponential
    backoff with jitter; never more than ``llm.backoff_max_s``."""
    if retry_after is not None:
        return min(retry_after, llm.backoff_max_s)
    base = min(llm.backoff_initial_s * (2 ** retry), llm.backoff_max_s)
    return base * (0.5 + 0.5 * (rng or random).random())


# -- budget -------------------------------------------------------------------------------------
class Budget:
    """Request, token and money allowance for one event loop (one Spark task); ``None`` = no cap.

    A request is sent only when one more request fits ``max_requests`` and its worst case
    (estimated prompt tokens + ``llm.max_tokens``, and what they cost at ``prices``) fits what
    is left of ``max_tokens`` and ``max_cost``; the estimate is replaced by the real usage when the
    reply arrives. So requests never exceed the cap, and tokens and cost exceed theirs only if the
    server counts more prompt tokens than the estimate (``llm.tokens``: per-script rates meant
    never to fall short of a real tokenizer).
    """

    def __init__(self, max_requests: int | None = None, max_tokens: int | None = None,
                 max_cost: float | None = None, prices: Prices = Prices()) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.max_cost = max_cost
        self.prices = prices
        self.requests = 0
        self.tokens = 0
        self.cost = 0.0
        self.reserved = 0
        self.reserved_cost = 0.0
        self.exhausted = False

    def grant(self, requests: int = 0, tokens: int = 0, cost: float = 0.0) -> None:
        """Raise the caps that exist (a share of the run's budget arrives)."""
        if self.max_requests is not None:
            self.max_requests += requests
        if self.max_tokens is not None:
            self.max_tokens += tokens
        if self.max_cost is not None:
            self.max_cost += cost

    def reserve(self, prompt_estimate: int, completion_max: int) -> Tokens | None:
        """Reserve room for one request; the reservation, or None when the budget is spent."""
        need = Tokens(prompt_estimate, completion_max)
        price = need.cost(self.prices)
        if ((self.max_requests is not None and self.requests >= self.max_requests)
                or (self.max_tokens is not None and self.tokens + self.reserved + need.total > self.max_tokens)
                or (self.max_cost is not None and self.cost + self.reserved_cost + price > self.max_cost)):
            self.exhausted = True
            return None
        self.requests += 1
        self.reserved += need.total
        self.reserved_cost += price
        return need

    def settle(self, reservation: Tokens, prompt_tokens: int, completion_tokens: int) -> None:
        """Replace a reservation by what the request really used."""
        self.reserved -= reservation.total
        self.reserved_cost -= reservation.cost(self.prices)
        self.tokens += prompt_tokens + completion_tokens
        self.cost += self.prices.cost(prompt_tokens, completion_tokens)


# -- rate limits --------------------------------------------------------------------------------
class RateLimits:
    """Requests and tokens per minute for one event loop; 0 = no limit.

    A Spark job has several loops at once (one per running task); ``share`` gives each its part of
    the job's ``llm.requests_per_minute`` / ``llm.tokens_per_minute``. Create it inside the loop
    that uses it.
    """

    def __init__(self, requests_per_minute: float = 0.0, tokens_per_minute: float = 0.0,
                 period_s: float = 60.0) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        # period_s is a minute; tests shorten it to see the limits act within a second.
        self._requests = AsyncLimiter(requests_per_minute, period_s) if requests_per_minute > 0 else None
        self._tokens = AsyncLimiter(tokens_per_minute, period_s) if tokens_per_minute > 0 else None

    @classmethod
    def share(cls, llm: LLMSettings, loops: int = 1) -> "RateLimits":
        """This loop's part of the job's limits when ``loops`` loops run at once."""
        loops = max(1, loops)
        return cls(llm.requests_per_minute / loops, llm.tokens_per_minute / loops)

    async def acquire(self, tokens: int) -> None:
        """Wait until one request of ``tokens`` tokens fits both limits. A request larger than a
        whole minute's allowance waits for the whole allowance (it could never fit otherwise)."""
        if self._requests is not None:
            await self._requests.acquire(min(1.0, self._requests.max_rate))
        if self._tokens is not None:
            await self._tokens.acquire(min(float(tokens), self._tokens.max_rate))


# -- results ------------------------------------------------------------------------------------
@dataclass
class ChatResult:
    """One logical request (retries and json-mode fallbacks included)."""
    content: str | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    error: str | None = None
    finish_reason: str | None = None


class SpendJournal(Protocol):
    """Where a task records a request durably before sending it (``merge.max_requests``,
    ``merge.max_total_tokens`` and ``merge.max_cost`` are counted from these records, so they
    hold across task retries and reruns): ``reserve`` returns once the record is durable,
    ``settle`` records what the request really used."""

    async def reserve(self, reservation: Tokens) -> str: ...
    def settle(self, spend: str, prompt_tokens: int, completion_tokens: int) -> None: ...


@dataclass
class MergeResult:
    """What happened to one group: the row the ledger and ``merges`` keep."""
    status: str
    instruction: str | None = None
    input: str | None = None  # noqa: A003 - the field's name in the data
    output: str | None = None
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    error: str | None = None
    gate: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class GateVerdict(Protocol):
    """What a gate callable returns (``gate.GateResult`` is one)."""
    passed: bool
    failed: list[str]

    def describe(self) -> str: ...
    def feedback(self) -> str: ...


GateFn = Callable[[dict[str, str]], Awaitable[GateVerdict]]


@dataclass
class _Attempts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0

    def add(self, chat: ChatResult) -> None:
        self.requests += chat.requests
        self.prompt_tokens += chat.prompt_tokens
        self.completion_tokens += chat.completion_tokens
        self.latency_ms += chat.latency_ms

    def result(self, status: str, **kw: Any) -> MergeResult:
        return MergeResult(status=status, attempts=self.requests, prompt_tokens=self.prompt_tokens,
                           completion_tokens=self.completion_tokens,
                           latency_ms=round(self.latency_ms, 3), **kw)


class MergeClient:
    """Merge requests to one OpenAI-compatible endpoint from one event loop.

    Use as ``async with MergeClient(llm, merge) as client: result = await client.merge(examples)``.
    """

    def __init__(self, llm: LLMSettings, merge: MergeSettings, budget: Budget | None = None,
                 *, api_key: str | None = None, rng: random.Random | None = None,
                 loops: int = 1) -> None:
        self.llm = llm
        self.merge_settings = merge
        self.budget = budget or Budget()
        self._loops = loops  # event loops sharing the job's rate limits (RateLimits.share)
        self._limits: RateLimits | None = None
        self._paused_until = 0.0  # loop time before which no request is sent (Retry-After)
        self._api_key = api_key if api_key is not None else resolve_api_key(llm)
        self._rng = rng or random.Random()
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._ladder = JSON_LADDERS[llm.json_mode]
        self._ladder_key = (llm.base_url, llm.model, llm.json_mode)
        self._failures_in_a_row = 0
        self._last_failure = ""

    @property
    def circuit_open(self) -> bool:
        """True once ``llm.circuit_breaker_failures`` transport/auth/5xx failures came in a row."""
        limit = self.llm.circuit_breaker_failures
        return limit > 0 and self._failures_in_a_row >= limit

    def _circuit_error(self) -> str:
        return (f"{ERROR_CIRCUIT_OPEN}: {self._failures_in_a_row} transport/auth/5xx failures in a "
                f"row; last: {self._last_failure}")

    def _note(self, error: str | None, breaks: bool) -> None:
        """Count a failure that says the server or the key is down; any other outcome resets the count."""
        if breaks:
            self._failures_in_a_row += 1
            self._last_failure = (error or "")[:200]
            if self._failures_in_a_row == self.llm.circuit_breaker_failures:
                log.error("circuit breaker open after %d failures in a row (last: %s); this task "
                          "sends no more requests", self._failures_in_a_row, self._last_failure)
        else:
            self._failures_in_a_row = 0

    async def __aenter__(self) -> "MergeClient":
        self._client = openai.AsyncOpenAI(base_url=self.llm.base_url, api_key=self._api_key,
                                          max_retries=0, timeout=self.llm.request_timeout_s)
        self._semaphore = asyncio.Semaphore(self.llm.concurrency)
        self._limits = RateLimits.share(self.llm, self._loops)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- one logical request --------------------------------------------------------------------
    def _response_format(self) -> tuple[str, dict | None]:
        step = min(_LADDER_STEP.get(self._ladder_key, 0), len(self._ladder) - 1)
        mode = self._ladder[step]
        return mode, response_format(mode)

    def _step_down(self, mode: str) -> bool:
        """Move this endpoint one rung down the json-mode ladder; False at the bottom."""
        step = self._ladder.index(mode)
        if step + 1 >= len(self._ladder):
            return False
        if _LADDER_STEP.get(self._ladder_key, 0) <= step:
            # Concurrent requests are refused together; the first to come back moves the rung.
            _LADDER_STEP[self._ladder_key] = step + 1
            log.warning("server refused response_format %s; using %s from now on in this process",
                        mode, self._ladder[step + 1])
        return True

    def _scrub(self, text: str) -> str:
        if self._api_key and self._api_key != PLACEHOLDER_KEY:
            text = text.replace(self._api_key, "***")
        return text[:300]

    async def chat(self, messages: list[dict[str, str]],
                   journal: SpendJournal | None = None) -> ChatResult:
        """Send one chat request, retrying transient failures; never raises for server trouble.

        With a ``journal``, each request is recorded there (durably) before it is sent."""
        assert self._client is not None and self._semaphore is not None, "use `async with`"
        assert self._limits is not None
        result = ChatResult()
        retries = 0
        estimate = estimate_prompt_tokens(messages)
        while True:
            await self._respect_pause()
            await self._limits.acquire(estimate + self.llm.max_tokens)
            mode, kwargs = self._request(messages)
            retry_after: float | None = None
            async with self._semaphore:
                if self.circuit_open:
                    result.error = self._circuit_error()
                    return result
                reservation = self.budget.reserve(estimate, self.llm.max_tokens)
                if reservation is None:
                    result.error = ERROR_BUDGET
                    return result
                spent = await journal.reserve(reservation) if journal is not None else None
                result.requests += 1
                used = (0, 0)
                error, breaks = "", False
                started = time.perf_counter()
                try:
                    response = await asyncio.wait_for(
                        self._client.chat.completions.create(**kwargs),
                        timeout=self.llm.request_timeout_s)
                    used = _count_usage(response, result)
                    _read_content(response, result)
                    return result
                except openai.APIStatusError as exc:
                    message = _error_message(exc)
                    status = exc.status_code
                    if (status in (400, 422, 500) and _mentions_response_format(message)
                            and mode != "none" and self._step_down(mode)):
                        continue  # a refusal of the json mode, not a failure: try the next rung
                    error = f"http_{status}: {self._scrub(message)}"
                    breaks = status >= 500 or status in _BREAKER_STATUS
                    if not (status in RETRYABLE_STATUS or status >= 500):
                        result.error = context_error(status, message) or error
                        return result
                    retry_after = retry_after_seconds(exc.response.headers)
                except (openai.APITimeoutError, asyncio.TimeoutError):
                    error = f"timeout: no reply within {self.llm.request_timeout_s:g} s"
                    breaks = True
                    used = reservation.prompt, reservation.completion   # the server may bill it all
                except openai.APIConnectionError as exc:
                    error = f"connection: {self._scrub(str(exc))}"
                    breaks = True
                except (openai.APIResponseValidationError, _Malformed, json.JSONDecodeError,
                        ValueError, TypeError, AttributeError) as exc:
                    error = f"malformed_response: {self._scrub(type(exc).__name__ + ': ' + str(exc))}"
                    if used == (0, 0):   # answered, so billed, but without saying how much
                        used = reservation.prompt, reservation.completion
                finally:
                    result.latency_ms += (time.perf_counter() - started) * 1000.0
                    self.budget.settle(reservation, *used)
                    if spent is not None:
                        journal.settle(spent, *used)
                    self._note(error, breaks)
            result.error = error
            if self.circuit_open:
                result.error = self._circuit_error()
                return result
            if retry_after is not None:
                self._pause(min(retry_after, self.llm.backoff_max_s))
            if retries >= self.llm.max_retries:
                return result
            delay = backoff_delay(retries, self.llm, retry_after, self._rng)
            retries += 1
            log.debug("retry %d in %.2f s after %s", retries, delay, error.split(":")[0])
            await asyncio.sleep(delay)

    def _request(self, messages: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        """The json-mode rung in use and the arguments of one chat completion request."""
        mode, _ = self._response_format()
        return mode, chat_request(self.llm, messages, mode)

    def _pause(self, seconds: float) -> None:
        """Hold back every request of this loop for ``seconds`` (a server's Retry-After)."""
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + seconds)

    async def _respect_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while (wait := self._paused_until - loop.time()) > 0:
            await asyncio.sleep(wait)

    # -- one merge ------------------------------------------------------------------------------
    async def merge(self, examples: Sequence[Mapping[str, Any]], gate: GateFn | None = None,
                    messages: list[dict[str, str]] | None = None,
                    journal: SpendJournal | None = None) -> MergeResult:
        """Merge one group: request, validate, gate, regenerate as allowed. Never raises."""
        base = messages if messages is not None else build_messages(examples)
        attempts = _Attempts()
        invalid_left = self.merge_settings.regenerations
        gate_left = self.merge_settings.gate_regenerations
        follow_up: list[dict[str, str]] = []
        try:
            while True:
                chat = await self.chat(base + follow_up, journal)
                attempts.add(chat)
                if chat.error is not None:
                    return attempts.result(STATUS_FAILED, error=chat.error)
                if chat.finish_reason == "length":
                    return attempts.result(STATUS_FAILED, error=(
                        f"{ERROR_TRUNCATED}: the reply was cut at llm.max_tokens="
                        f"{self.llm.max_tokens}; raise llm.max_tokens"))
                merged, why = validate_merged(chat.content, self.merge_settings.max_output_chars)
                if merged is None:
                    if invalid_left > 0:
                        invalid_left -= 1
                        follow_up = feedback_turns(chat.content, f"it could not be used: {why}")
                        continue
                    return attempts.result(STATUS_FAILED, error=f"{ERROR_INVALID}: {why}")
                if gate is None:
                    return attempts.result(STATUS_MERGED, **merged)
                verdict = await gate(merged)
                if verdict.passed:
                    return attempts.result(STATUS_MERGED, gate=verdict.describe(), **merged)
                if gate_left > 0:
                    gate_left -= 1
                    follow_up = feedback_turns(chat.content, verdict.feedback())
                    continue
                return attempts.result(STATUS_GATE_FAILED, gate=verdict.describe(),
                                       error="gate: " + ",".join(verdict.failed), **merged)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one group's bug must not sink the partition
            log.exception("merge crashed")
            return attempts.result(STATUS_FAILED,
                                   error=self._scrub(f"internal: {type(exc).__name__}: {exc}"))


def response_format(mode: str) -> dict | None:
    """The ``response_format`` of a json-mode rung (``JSON_LADDERS``); None sends none."""
    if mode == "json_schema":
        return {"type": "json_schema",
                "json_schema": {"name": "merged_example", "strict": True, "schema": MERGED_SCHEMA}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": MERGED_SCHEMA}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def chat_request(llm: LLMSettings, messages: list[dict[str, str]], mode: str) -> dict[str, Any]:
    """The body of one chat completion request at json-mode rung ``mode``."""
    body: dict[str, Any] = {"model": llm.model, "messages": messages, "temperature": llm.temperature,
                            "max_tokens": llm.max_tokens}
    fmt = response_format(mode)
    if fmt is not None:
        body["response_format"] = fmt
    return body


class _Malformed(ValueError):
    """The server answered 200 with a body that is not a chat completion."""


def _count_usage(response: Any, result: ChatResult) -> tuple[int, int]:
    """Add a completion's token usage to ``result``; returns the prompt and completion tokens
    it used."""
    usage = getattr(response, "usage", None)
    p_tok = int(getattr(usage, "prompt_tokens", 0) or 0)
    c_tok = int(getattr(usage, "completion_tokens", 0) or 0)
    result.prompt_tokens += p_tok
    result.completion_tokens += c_tok
    return p_tok, c_tok


def _read_content(response: Any, result: ChatResult) -> None:
    """Put a completion's text into ``result``; ``_Malformed`` when the body has no message."""
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise _Malformed("reply has no choices")
    result.content = choices[0].message.content or ""
    result.finish_reason = getattr(choices[0], "finish_reason", None)
    result.error = None


_CONTEXT_WORDS = ("context length", "context window", "maximum context", "context_length",
                  "too many tokens", "exceeds the context", "n_ctx")


def context_error(status: int, message: str) -> str | None:
    """A 400/413 that says the prompt does not fit the model's context, as ``prompt_too_long``."""
    lowered = message.lower()
    if status in (400, 413, 422) and any(word in lowered for word in _CONTEXT_WORDS):
        return f"{ERROR_PROMPT_TOO_LONG}: the server says: {message[:200]}"
    return None


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(body.get("detail"), (str, list)):
            return json.dumps(body["detail"])[:1000]
    return str(exc.message or exc)


def _mentions_response_format(message: str) -> bool:
    lowered = message.lower()
    return "response_format" in lowered or "json_schema" in lowered


def feedback_turns(reply: str | None, problem: str) -> list[dict[str, str]]:
    """The rejected reply and one line on what was wrong: the tail of a regeneration request."""
    return [
        {"role": "assistant", "content": (reply or "")[:4000]},
        {"role": "user", "content": (f"Your reply was rejected because {problem}. Merge the same "
                                     "examples again, following every rule, and answer with only "
                                     "the JSON object.")},
    ]



__all__ = [
    "Budget", "ChatResult", "MergeClient", "MergeResult", "Prices", "RateLimits", "resolve_api_key",
    "retry_after_seconds",
    "backoff_delay", "extract_json_object", "validate_merged", "STATUS_MERGED", "STATUS_GATE_FAILED",
    "STATUS_FAILED", "ERROR_BUDGET", "ERROR_CIRCUIT_OPEN", "ERROR_TRUNCATED", "ERROR_PROMPT_TOO_LONG",
    "ERROR_INVALID", "MissingAPIKey", "SpendJournal", "error_kind", "rerun_can_fix", "is_loopback", "mask_url",
]
