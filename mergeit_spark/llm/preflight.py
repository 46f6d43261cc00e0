"""Preflight: one small chat request from the driver before the merge stage starts any task.

A merge run against a server that cannot answer (nothing listening, a host that does not resolve,
a key it refuses, a model it does not serve, a server that crashes on its first request) would
otherwise mark every group ``failed`` in executor tasks, one retry ladder at a time. The preflight
finds that out with one request of one completion token, with the configured key and model, and
fails the run there with an error that names the URL (credentials masked) and what to fix.

It also asks ``GET /models`` what the server says of the model's context window: vLLM lists
``max_model_len``, llama.cpp's own server ``meta.n_ctx_train``, others ``context_length``. That
number, when the server gives one, decides which prompts cannot fit (``prompt_too_long``);
otherwise ``llm.context_tokens`` does.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import openai

from ..config import LLMSettings
from .client import backoff_delay, mask_url, resolve_api_key, retry_after_seconds

log = logging.getLogger(__name__)

PROMPT = [{"role": "user", "content": "Reply with the word OK."}]
_CONTEXT_KEYS = ("max_model_len", "context_length", "context_window", "n_ctx", "n_ctx_train")


class PreflightError(RuntimeError):
    """The LLM server cannot serve merges; the message says what to fix."""


@dataclass
class Preflight:
    """What the preflight request cost and what the server said of its model."""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    context_tokens: int | None = None   # from the server, when it says
    models: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def preflight(llm: LLMSettings, api_key: str | None = None) -> Preflight:
    """Send one minimal chat request to ``llm.base_url``; raise ``PreflightError`` if it fails.

    Transient answers (429, 5xx, timeouts) are retried as merge requests are (``llm.max_retries``
    with backoff); a refused connection, an unknown host, 401/403/404 fail at once."""
    key = api_key if api_key is not None else resolve_api_key(llm)
    client = openai.OpenAI(base_url=llm.base_url, api_key=key, max_retries=0,
                           timeout=llm.request_timeout_s)
    try:
        result = Preflight()
        result.models, result.context_tokens = _models(client, llm.model)
        _chat(client, llm, result, key)
        return result
    finally:
        client.close()


def _chat(client: openai.OpenAI, llm: LLMSettings, result: Preflight, key: str) -> None:
    for retry in range(llm.max_retries + 1):
        result.requests += 1
        try:
            response = client.chat.completions.create(model=llm.model, messages=PROMPT, max_tokens=1,
                                                      temperature=0.0)
        except openai.APIStatusError as exc:
            if not (exc.status_code in (408, 409, 429) or exc.status_code >= 500) or retry == llm.max_retries:
                raise PreflightError(_status_message(llm, exc, result.models, key)) from None
            time.sleep(backoff_delay(retry, llm, retry_after_seconds(exc.response.headers), random.Random()))
            continue
        except openai.APITimeoutError:
            if retry == llm.max_retries:
                raise PreflightError(f"the LLM server at {mask_url(llm.base_url)} did not answer within "
                                     f"{llm.request_timeout_s:g} s (llm.request_timeout_s)") from None
            continue
        except openai.APIConnectionError as exc:
            raise PreflightError(_connection_message(llm, exc)) from None
        _count(response, result)
        log.info("preflight: %s answers for model %s%s", mask_url(llm.base_url), llm.model,
                 f" (context {result.context_tokens} tokens)" if result.context_tokens else "")
        return


def _count(response: Any, result: Preflight) -> None:
    if not getattr(response, "choices", None):
        raise PreflightError("the LLM server answered the preflight request with something that is "
                             "not a chat completion (no choices): is llm.base_url an OpenAI-compatible "
                             "endpoint (usually ending in /v1)?")
    usage = getattr(response, "usage", None)
    result.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
    result.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)


def _models(client: openai.OpenAI, model: str) -> tuple[tuple[str, ...], int | None]:
    """The model ids the server lists and the context window it gives for ``model`` (or for its
    only model); nothing when it cannot say. Never fails the preflight: the chat request decides."""
    try:
        page = client.models.list()
    except openai.OpenAIError:
        return (), None
    entries = [e.model_dump() if hasattr(e, "model_dump") else dict(e) for e in page.data]
    ids = tuple(str(e.get("id")) for e in entries if e.get("id"))
    chosen = [e for e in entries if e.get("id") == model] or (entries if len(entries) == 1 else [])
    return ids, (_context_of(chosen[0]) if chosen else None)


def _context_of(entry: dict[str, Any]) -> int | None:
    for where in (entry, entry.get("meta") or {}):
        for name in _CONTEXT_KEYS:
            value = where.get(name) if isinstance(where, dict) else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _connection_message(llm: LLMSettings, exc: openai.APIConnectionError) -> str:
    url = mask_url(llm.base_url)
    cause = " ".join(str(c) for c in _causes(exc)).lower()
    if "refused" in cause:
        return (f"cannot reach the LLM server at {url}: connection refused. Start it (`mergeit llm serve`, "
                f"or `mergeit run --serve-llm`) or point llm.base_url at a running server")
    if any(w in cause for w in ("name or service not known", "nodename nor servname", "getaddrinfo",
                                "name resolution", "no address associated")):
        return f"cannot resolve the host of llm.base_url ({url}): check the address"
    return (f"the LLM server at {url} closed the connection without an answer ({_short(exc)}): did it "
            f"crash? Check its log (the bundled server logs to <output.root>/_logs/)")


def _status_message(llm: LLMSettings, exc: openai.APIStatusError, models: tuple[str, ...], key: str) -> str:
    url = mask_url(llm.base_url)
    said = _short(exc, key)
    status = exc.status_code
    if status in (401, 403):
        where = f"the environment variable {llm.api_key_env}" if llm.api_key_env else "llm.api_key_file"
        return (f"the LLM server at {url} refused the API key (HTTP {status}: {said}); set a valid key in "
                f"{where} (or llm.api_key_file)")
    if status == 404:
        listed = f"; it serves: {', '.join(models[:10])}" if models else ""
        return (f"the LLM server at {url} does not know model {llm.model!r} (HTTP 404: {said}){listed}. "
                f"Set llm.model, or check that llm.base_url ends where the API does (usually /v1)")
    return f"the LLM server at {url} failed the preflight request (HTTP {status}: {said})"


def _causes(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _short(exc: BaseException, key: str = "") -> str:
    text = str(getattr(exc, "message", None) or exc)
    if key and len(key) > 3:
        text = text.replace(key, "***")
    return text[:200]
