"""Progress of the merge stage while it pays: one line every few seconds on the driver.

The request pass runs in executor tasks; what they have recorded is in the ledger, durable before
it counts (``llm.ledger``). A driver thread lists the ledger's objects every
``merge.progress_interval_s`` seconds, reads the ones it has not read before (a ledger object is
never rewritten while tasks write), and counts this pass's result lines (``run`` = the pass's id):
groups recorded by status, requests, tokens and their cost at ``llm.price_*``, the rate, and a time
left. Groups that the ledger already answered (a rerun) are not recorded again, so they are not in
the count; the time left is then an upper bound. On a terminal the line is rewritten in place;
otherwise (a log file, a cluster's driver log) it is one log line per interval.
"""
from __future__ import annotations

import logging
from collections import Counter
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from ..fs import Location
from .ledger import is_ledger_object, parse_lines
from .spend import Prices

log = logging.getLogger("mergeit.progress")   # the run's log: the console and <root>/_logs


@dataclass
class PassCounts:
    """What one pass has recorded in the ledger so far."""
    status: dict[str, str] = field(default_factory=dict)   # group id -> its latest status this pass
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, line: dict) -> None:
        self.status[str(line["group_id"])] = str(line["status"])
        self.requests += int(line.get("attempts") or 0)
        self.prompt_tokens += int(line.get("prompt_tokens") or 0)
        self.completion_tokens += int(line.get("completion_tokens") or 0)

    def by_status(self) -> dict[str, int]:
        return dict(Counter(self.status.values()))


class MergeProgress:
    """The driver's progress line for one request pass (a context manager around the pass).

    ``total``: called once, in the thread, for the number of groups of the pass (a Spark count, so
    that the pass does not wait for it)."""

    def __init__(self, ledger_root: Location, run_id: str, total: Callable[[], int], prices: Prices,
                 interval_s: float, out: TextIO | None = None) -> None:
        self.root, self.run_id, self.prices, self.interval_s = ledger_root, run_id, prices, interval_s
        self._total_of, self.total = total, None
        self.out = out if out is not None else sys.stderr
        self.counts = PassCounts()
        self._read: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> "MergeProgress":
        if self.interval_s > 0:
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="mergeit-merge-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self.poll()
        self._show(final=True)

    def _run(self) -> None:
        try:
            self.total = self._total_of()
        except Exception:  # noqa: BLE001 - progress must never fail the stage
            log.debug("merge progress: no group count", exc_info=True)
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
                self._show()
            except Exception:  # noqa: BLE001 - a listing that failed is tried again next time
                log.debug("merge progress: ledger not read", exc_info=True)

    def poll(self) -> None:
        """Read the ledger objects not read before; count this pass's result lines."""
        for obj in self.root.files(recursive=True):
            if obj.uri in self._read or not is_ledger_object(obj.name):
                continue
            data = obj.read_bytes()
            if data is None:
                continue
            self._read.add(obj.uri)
            for line in parse_lines(data):
                if line.get("run") == self.run_id and line.get("group_id") and line.get("status"):
                    self.counts.add(line)

    def describe(self) -> str:
        """The progress line."""
        c = self.counts
        done, seconds = len(c.status), max(1e-9, time.monotonic() - self._started)
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(c.by_status().items())) or "none yet"
        rate = done / seconds
        total = "?" if self.total is None else str(self.total)
        left = ""
        if self.total is not None and rate > 0 and done < self.total:
            left = f", at most {(self.total - done) / rate:.0f} s left"
        tokens = c.prompt_tokens + c.completion_tokens
        return (f"merge: {done}/{total} groups recorded this run ({statuses}); {c.requests} requests, "
                f"{tokens} tokens, cost {self.prices.cost(c.prompt_tokens, c.completion_tokens):.4f}; "
                f"{rate:.1f} groups/s{left}")

    def _show(self, final: bool = False) -> None:
        text = self.describe()
        if getattr(self.out, "isatty", lambda: False)():
            self.out.write("\r" + text + ("\n" if final else ""))
            self.out.flush()
        else:
            log.info(text)
