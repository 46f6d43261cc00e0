"""Keeping secrets out of everything the project prints or writes.

Three places a key could leak, one module:

* **Log records.** :func:`install_log_scrubbing` wraps the process's log record factory, so every
  record, whatever logger made it and whichever handler prints it (a file, the console, Python's
  last-resort stderr handler on executors), has registered secrets and URL credentials replaced
  by ``***`` in its message and its traceback before any handler sees it. Importing
  ``mergeit_spark`` installs nothing (a library must not change the logging of the process that
  imports it): a run installs it where it starts (``mergeit`` and ``Pipeline`` on the driver, each
  merge task in its Python worker). :func:`register_secret` adds a value and installs the
  scrubbing if it is not yet in place, so that the value is masked wherever it was registered (the
  LLM client registers the key it resolves, on the driver and in workers).
* **Spark's conf.** Spark hides a conf value in its UI and event log only when the key matches
  ``spark.redaction.regex``; its default does not match ``spark.executorEnv.MERGEIT_LLM_API_KEY``
  (the way the key reaches executors on YARN and Kubernetes). :func:`redaction_regex` extends the
  pattern with the variable names that hold secrets.
* **Printed settings.** :func:`redact_settings` is what ``config show`` and the report print:
  URL credentials and conf values whose key matches the redaction pattern are masked.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any, Iterable

MASK = "***"
# Spark's own default for spark.redaction.regex (Spark 4.1); ours extends it, never narrows it.
SPARK_REDACTION_REGEX = r"(?i)secret|password|token|access[.]?key|credential"
# What Spark puts in place of a redacted value; used for settings too, so both read the same.
REDACTED = "*********(redacted)"
# scheme://user:password@host or scheme://token@host: everything between :// and the last @
# before the path goes (a password may itself hold an @).
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s\"'<>]+@")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
# A value this short is too likely to occur in ordinary text to be masked everywhere.
_MIN_SECRET_CHARS = 4

# Longest first, so that no part of a longer secret is left behind; replaced whole (a tuple) so
# that a thread scrubbing a record never sees it change under it.
_secrets: tuple[str, ...] = ()
_lock = threading.Lock()
_installed = False


def register_secret(value: str | None) -> str | None:
    """Mask ``value`` in every later log record of this process (installing
    :func:`install_log_scrubbing` if needed); returns ``value`` unchanged."""
    global _secrets
    if value and len(value.strip()) >= _MIN_SECRET_CHARS:
        with _lock:
            _secrets = tuple(sorted({*_secrets, value.strip()}, key=len, reverse=True))
        install_log_scrubbing()
    return value


def scrub(text: str) -> str:
    """``text`` with registered secrets and URL credentials replaced by ``***``."""
    if not text:
        return text
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if "@" in text:
        text = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return text


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is the handler's problem, not ours
        return
    clean = scrub(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        clean = scrub(text)
        if clean != text:
            # Handlers print exc_text when it is set; dropping exc_info keeps the raw exception
            # (whose args hold the secret) away from handlers that would format it again.
            record.exc_text, record.exc_info = clean, None
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)


def install_log_scrubbing() -> None:
    """Scrub every log record of this process: wraps the current log record factory (chaining
    whatever factory is in place). Idempotent: a second call, from any caller, wraps nothing more,
    so each record is scrubbed once. Called where a run starts (CLI, ``Pipeline``) and in the
    worker code that logs (a merge task); importing the package does not call it."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def redaction_regex(secret_env_names: Iterable[str] = (), base: str | None = None) -> str:
    """``spark.redaction.regex`` that also matches each named variable (e.g. the conf key
    ``spark.executorEnv.MERGEIT_LLM_API_KEY``). ``base`` is a pattern already configured."""
    names = sorted({n for n in secret_env_names if n})
    bad = [n for n in names if not _ENV_NAME.match(n)]
    if bad:
        raise ValueError(f"not a variable name: {', '.join(map(repr, bad))}")
    pattern = base or SPARK_REDACTION_REGEX
    extra = [re.escape(n) for n in names if not re.search(pattern, n)]
    if not extra:
        return pattern
    # The base keeps its own (?i) flag at the front; Java and Python read a leading flag the same.
    return pattern + "|" + "|".join(extra)


def redact_settings(settings: dict[str, Any], secret_env_names: Iterable[str] = ()) -> dict[str, Any]:
    """A copy of ``settings`` (``Settings.to_dict()``) fit to print: URL credentials masked in
    every string, and ``spark.conf`` values whose key matches the redaction pattern (such as
    ``spark.executorEnv.<VAR>``) replaced, as Spark itself shows them."""
    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and "@" in value:
            return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", value)
        return value

    out = walk(settings)
    conf = (out.get("spark") or {}).get("conf")
    if conf:
        pattern = re.compile(redaction_regex(secret_env_names, conf.get("spark.redaction.regex")))
        out["spark"]["conf"] = {k: REDACTED if pattern.search(k) else v for k, v in conf.items()}
    return out
